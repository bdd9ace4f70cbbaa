#!/usr/bin/env bash
# Prints the path of a helm binary, building it once from the Go module proxy
# (helm.sh/helm/v3/cmd/helm) into the commonground cache, like
# e2e/controlplane/build.sh does for the control plane. Go is only a build tool
# here; helm renders charts/commonground into deploy/ and nothing of it ships.
#
# Usage:  scripts/helm.sh            build if needed, print the binary's path on stdout
#         scripts/helm.sh --force    rebuild
# Environment:
#   COMMONGROUND_HELM_VERSION  (default v3.22.0)
#   COMMONGROUND_CACHE         cache root (default ${XDG_CACHE_HOME:-$HOME/.cache}/commonground)
set -euo pipefail

HELM_VERSION=${COMMONGROUND_HELM_VERSION:-v3.22.0}
CACHE_ROOT=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}
DIR="$CACHE_ROOT/helm/$HELM_VERSION"
BIN="$DIR/bin/helm"

FORCE=0
for arg in "$@"; do
  case "$arg" in
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,12p' "$0"; exit 0 ;;
    *) echo "helm.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[helm.sh] $*" >&2; }

if [[ $FORCE == 0 && -x "$BIN" && -f "$DIR/stamp" ]]; then
  echo "$BIN"
  exit 0
fi

if ! command -v go >/dev/null 2>&1; then
  log "helm $HELM_VERSION is not in $DIR and Go is not installed to build it."
  log "Install Go (Debian: apt-get install golang-go, 1.24 or newer), or put a helm binary at $BIN."
  exit 1
fi

mkdir -p "$DIR"
exec 9>"$DIR/.lock"
flock 9
if [[ $FORCE == 0 && -x "$BIN" && -f "$DIR/stamp" ]]; then
  echo "$BIN"
  exit 0
fi

log "building helm $HELM_VERSION from the Go module proxy (first time only, ~1-3 min)"
export GOTOOLCHAIN=local CGO_ENABLED=0
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-buildvcs=false"
rm -f "$DIR/stamp"
GOBIN="$DIR/bin" go install -trimpath \
  -ldflags "-s -w -X helm.sh/helm/v3/internal/version.version=$HELM_VERSION" \
  "helm.sh/helm/v3/cmd/helm@$HELM_VERSION" >&2
"$BIN" version --short >&2
date -u +%FT%TZ > "$DIR/stamp"
log "helm in $BIN"
echo "$BIN"
