#!/usr/bin/env bash
# Runs every test: formatting and lint checks first (a clippy warning fails the run, as does
# unformatted code), the dependency audit (scripts/dependency-audit.sh), then unit and integration tests of the commonground crate, then the
# end-to-end suite against the real control plane (e2e/run-tests). Ends with the test
# runner's summary.
set -uo pipefail
# A full run builds every test binary once: incremental data would only add gigabytes to
# target/ (the clean-clone CI machine has little disk to spare).
export CARGO_INCREMENTAL=0
cd "$(dirname "${BASH_SOURCE[0]}")/.."

scripts/setup.sh || exit 1

echo "[test] cargo fmt --check" >&2
if ! cargo fmt --all --check >&2; then
  echo "[test] formatting differs from rustfmt's: run \`cargo fmt --all\`" >&2
  exit 1
fi
echo "[test] cargo clippy (warnings are errors)" >&2
if ! cargo clippy --workspace --all-targets --quiet -- -D warnings >&2; then
  echo "[test] clippy found warnings or errors" >&2
  exit 1
fi

echo "[test] dependency audit (cargo deny)" >&2
scripts/dependency-audit.sh || exit 1

echo "[test] unit and integration tests" >&2
if ! cargo test --workspace --exclude commonground-e2e --no-fail-fast 2>&1 | tee /tmp/commonground-unit-tests.log; then
  echo "[test] unit or integration tests failed" >&2
  grep -E "^test result:" /tmp/commonground-unit-tests.log | tail -1
  exit 1
fi

echo "[test] end-to-end suite on the real control plane" >&2
exec e2e/run-tests
