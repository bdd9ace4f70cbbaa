# The two commands of the README.
.PHONY: demo test setup

# The main job: a local demo on a real control plane.
demo:
	scripts/demo.sh

# Every test: unit, integration and end-to-end.
test:
	scripts/test.sh

setup:
	scripts/setup.sh
