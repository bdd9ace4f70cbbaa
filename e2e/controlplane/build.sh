#!/usr/bin/env bash
# Builds the upstream Kubernetes control plane used by the commonground e2e
# harness (e2e/cluster): etcd, kube-apiserver, kube-scheduler,
# kube-controller-manager and kubectl, from Go modules served by the Go module
# proxy. Go is only a build tool here; nothing built by this script ships in the
# product.
#
# Output (built once, then cached):
#   ${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/controlplane/<version>/bin/
#
# Usage:
#   e2e/controlplane/build.sh                 build if needed; progress on stderr
#   e2e/controlplane/build.sh --print-bin-dir build if needed, then print the bin dir on stdout
#   e2e/controlplane/build.sh --force         rebuild even if cached
#
# Environment:
#   COMMONGROUND_K8S_VERSION   (default v1.37.2; falls back to v1.36.3 if it fails to build)
#   COMMONGROUND_ETCD_VERSION  (default v3.7.3)
#   COMMONGROUND_SKIP_KUBECTL=1  do not build kubectl
set -euo pipefail

SCRIPT_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)

K8S_VERSION=${COMMONGROUND_K8S_VERSION:-v1.37.2}
K8S_FALLBACK_VERSION=v1.36.3
ETCD_VERSION=${COMMONGROUND_ETCD_VERSION:-v3.7.3}
# Bump when the recipe below changes in a way that must invalidate old builds.
RECIPE=1

CACHE_ROOT=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}
CP_ROOT="$CACHE_ROOT/controlplane"

PRINT_BIN_DIR=0
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --print-bin-dir) PRINT_BIN_DIR=1 ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,20p' "$0"; exit 0 ;;
    *) echo "build.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[controlplane/build] $*" >&2; }

# Go settings: never download a toolchain, let the wrapper modules resolve their
# requirements, and keep the default (persistent) module and build caches.
export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod -buildvcs=false"
export CGO_ENABLED=0

BINARIES=(etcd kube-apiserver kube-controller-manager kube-scheduler)
if [[ "${COMMONGROUND_SKIP_KUBECTL:-0}" != 1 ]]; then
  BINARIES+=(kubectl)
fi

version_id() { echo "k8s-$1_etcd-${ETCD_VERSION}_r${RECIPE}"; }

is_built() {
  local dir="$CP_ROOT/$(version_id "$1")"
  [[ -f "$dir/stamp" ]] || return 1
  local b
  for b in "${BINARIES[@]}"; do
    [[ -x "$dir/bin/$b" ]] || return 1
  done
}

finish() {
  local dir="$CP_ROOT/$(version_id "$1")"
  if [[ $PRINT_BIN_DIR == 1 ]]; then
    echo "$dir/bin"
  else
    log "binaries in $dir/bin"
  fi
}

# --- fast path -------------------------------------------------------------
if [[ $FORCE == 0 ]]; then
  for v in "$K8S_VERSION" "$K8S_FALLBACK_VERSION"; do
    if is_built "$v"; then
      log "cached: $(version_id "$v") ($CP_ROOT/$(version_id "$v")/bin)"
      finish "$v"
      exit 0
    fi
  done
fi

command -v go >/dev/null || { log "ERROR: go is not on PATH"; exit 1; }
log "using $(go version)"

build_etcd() {
  local out=$1 work=$2
  local src="$work/etcd"
  mkdir -p "$src"
  cp "$SCRIPT_DIR/etcd/main.go" "$src/main.go"
  cat >"$src/go.mod" <<EOF
module commonground.local/e2e/controlplane/etcd

go 1.25

require go.etcd.io/etcd/server/v3 $ETCD_VERSION
EOF
  rm -f "$src/go.sum"
  log "etcd: resolving go.etcd.io/etcd/server/v3@$ETCD_VERSION"
  (cd "$src" && go mod tidy)
  log "etcd: compiling (go build) ..."
  local t0=$SECONDS
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$out/etcd" .)
  log "etcd: done in $((SECONDS - t0))s"
}

build_k8s() {
  local version=$1 out=$2 work=$3
  local staging=${version/#v1./v0.}   # v1.37.2 -> v0.37.2
  local src="$work/kubernetes"
  mkdir -p "$src"

  log "kubernetes $version: downloading k8s.io/kubernetes go.mod from the module proxy"
  local json gomod
  json=$(cd "$src" && GOFLAGS= go mod download -json "k8s.io/kubernetes@$version")
  gomod=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  [[ -n "$gomod" && -f "$gomod" ]] || { log "ERROR: could not find go.mod of k8s.io/kubernetes@$version"; printf '%s\n' "$json" >&2; return 1; }

  # The go directive and the staging replace list come from k8s.io/kubernetes's own
  # go.mod: every "k8s.io/X => ./staging/src/k8s.io/X" becomes "k8s.io/X => k8s.io/X $staging".
  local godirective replaces
  godirective=$(awk '$1 == "go" && NF == 2 {print $2; exit}' "$gomod")
  replaces=$(awk -v v="$staging" '
      /^replace[[:space:]]*\(/ {inblock=1; next}
      inblock && /^\)/ {inblock=0; next}
      {
        line=$0
        if (!inblock) { if (line !~ /^replace[[:space:]]/) next; sub(/^replace[[:space:]]+/, "", line) }
        n=split(line, f, /[[:space:]]+/)
        # fields may start with an empty string because of leading whitespace
        for (i=1; i<=n; i++) if (f[i] != "") { mod=f[i]; break }
        if (line ~ /=>[[:space:]]*\.\/staging\/src\/k8s\.io\// && mod ~ /^k8s\.io\//) printf "\t%s => %s %s\n", mod, mod, v
      }' "$gomod")
  local count
  count=$(printf '%s\n' "$replaces" | grep -c '=>' || true)
  [[ $count -gt 0 ]] || { log "ERROR: found no staging replace lines in $gomod"; return 1; }
  log "kubernetes $version: generated $count replace lines (k8s.io/* staging modules => $staging), go $godirective"

  cat >"$src/go.mod" <<EOF
// Generated by e2e/controlplane/build.sh from k8s.io/kubernetes@$version's go.mod. Do not edit.
module commonground.local/e2e/controlplane/kubernetes

go $godirective

require k8s.io/kubernetes $version

replace (
$replaces
)
EOF
  rm -f "$src/go.sum"

  # Version information normally stamped in by the upstream release tooling.
  local major minor
  major=$(echo "$version" | sed 's/^v\([0-9]*\)\..*/\1/')
  minor=$(echo "$version" | sed 's/^v[0-9]*\.\([0-9]*\)\..*/\1/')
  local date
  date=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  local ldflags="-s -w"
  local pkg
  for pkg in k8s.io/component-base/version k8s.io/client-go/pkg/version; do
    ldflags+=" -X $pkg.gitVersion=$version -X $pkg.gitMajor=$major -X $pkg.gitMinor=$minor"
    ldflags+=" -X $pkg.gitTreeState=clean -X $pkg.buildDate=$date"
  done

  local cmds=(kube-apiserver kube-controller-manager kube-scheduler)
  [[ " ${BINARIES[*]} " == *" kubectl "* ]] && cmds+=(kubectl)
  local pkgs=()
  for pkg in "${cmds[@]}"; do pkgs+=("k8s.io/kubernetes/cmd/$pkg"); done

  log "kubernetes $version: resolving module graph (first run downloads ~all of Kubernetes' dependencies)"
  (cd "$src" && go list -deps "${pkgs[@]}" >/dev/null)
  log "kubernetes $version: compiling ${cmds[*]} (cold: tens of minutes on 2 cores; go's build cache is reused afterwards)"
  local t0=$SECONDS
  # Build one at a time so progress is visible; packages compiled for the first
  # binary are reused from Go's build cache by the following ones.
  for pkg in "${cmds[@]}"; do
    local t1=$SECONDS
    log "kubernetes $version: building $pkg ..."
    (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$out/$pkg" "k8s.io/kubernetes/cmd/$pkg")
    log "kubernetes $version: $pkg done in $((SECONDS - t1))s"
  done
  log "kubernetes $version: all done in $((SECONDS - t0))s"
}

build_version() {
  local version=$1
  local dir="$CP_ROOT/$(version_id "$version")"
  local tmpbin="$dir/bin.tmp"
  rm -rf "$tmpbin" "$dir/stamp"
  mkdir -p "$tmpbin" "$dir/src"
  local t0=$SECONDS
  log "building control plane $(version_id "$version") into $dir/bin"
  build_etcd "$tmpbin" "$dir/src" || return 1
  build_k8s "$version" "$tmpbin" "$dir/src" || return 1
  rm -rf "$dir/bin"
  mv "$tmpbin" "$dir/bin"
  local took=$((SECONDS - t0))
  {
    echo "k8s=$version"
    echo "etcd=$ETCD_VERSION"
    echo "recipe=$RECIPE"
    echo "go=$(go env GOVERSION)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=$took"
    echo "binaries=${BINARIES[*]}"
  } >"$dir/stamp"
  log "built $(version_id "$version") in ${took}s"
}

# Serialize concurrent builds (two `e2e/cluster up` at once, say).
mkdir -p "$CP_ROOT"
exec 9>"$CP_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it ..."
  flock 9
fi
if [[ $FORCE == 0 ]]; then
  for v in "$K8S_VERSION" "$K8S_FALLBACK_VERSION"; do
    if is_built "$v"; then
      log "cached: $(version_id "$v") (built by a concurrent run)"
      finish "$v"
      exit 0
    fi
  done
fi

# build_version runs in a subshell with errexit in force. (errexit is ignored for
# everything called from an `if` condition or a `||` list, so the status is
# collected with errexit switched off around a plain command.)
set +e
(set -e; build_version "$K8S_VERSION")
rc=$?
set -e
if [[ $rc == 0 ]]; then
  finish "$K8S_VERSION"
  exit 0
fi
if [[ "$K8S_VERSION" != "$K8S_FALLBACK_VERSION" ]]; then
  log "WARNING: building Kubernetes $K8S_VERSION failed; falling back to $K8S_FALLBACK_VERSION"
  set +e
  (set -e; build_version "$K8S_FALLBACK_VERSION")
  rc=$?
  set -e
  if [[ $rc == 0 ]]; then
    finish "$K8S_FALLBACK_VERSION"
    exit 0
  fi
fi
log "ERROR: control plane build failed"
exit 1
