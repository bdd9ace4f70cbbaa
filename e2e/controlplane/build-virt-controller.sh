#!/usr/bin/env bash
# Builds KubeVirt's own virt-controller (kubevirt.io/kubevirt/cmd/virt-controller)
# for the commonground e2e harness, from the Go module proxy, and generates the
# complete KubeVirt CRDs of the same release (crds.yaml) with KubeVirt's
# operator code. Go is only a build tool here; nothing built by this script
# ships in the product, and no KubeVirt or generated Go code is kept in the
# repository: the wrapper module is written by this script into the cache.
#
# Output (built once, then cached):
#   ${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/virt-controller/<version>/bin/virt-controller
#   ${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}/virt-controller/<version>/crds.yaml
#   .../virt-controller/<version>/stamp        (version, go, build seconds)
#
# Usage:
#   e2e/controlplane/build-virt-controller.sh                 build if needed; progress on stderr
#   e2e/controlplane/build-virt-controller.sh --print-bin-dir build if needed, then print the bin dir on stdout
#   e2e/controlplane/build-virt-controller.sh --print-dir     build if needed, then print <version> dir on stdout
#   e2e/controlplane/build-virt-controller.sh --force         rebuild even if cached
#
# Environment:
#   COMMONGROUND_KUBEVIRT_VERSIONS  candidate versions, tried in order (newest first);
#       default "v1.9.2 v1.9.1 v1.9.0 v1.8.2 v1.8.1 v1.8.0 v1.7.2 v1.7.1 v1.7.0 v1.6.0".
#       The module proxy refuses to list versions, so exact versions are tried.
#       The first one that is cached is used; otherwise the first one that builds.
#   COMMONGROUND_KUBEVIRT_SUBSTITUTES  extra "module@version" pins, space separated, that
#       override KubeVirt's own requirement of that module (for a dependency the proxy
#       or the checksum database does not serve), e.g.
#       "github.com/rhobs/operator-observability-toolkit@v0.0.29". Default: none.
#       Substituted builds are cached apart (<version>+subst-<hash>).
#
# Running it against the harness API server (seen with v1.7.0 and v1.8.2, kube-apiserver v1.37.2):
#   kubectl apply --server-side -f crds.yaml      (17 CRDs, kubevirts.kubevirt.io included)
#   kubectl create ns kubevirt                     (namespace; read from the SA file, else "kubevirt")
#   a KubeVirt CR in that namespace, and its status.phase set (e.g. Deployed, via the status
#     subresource): virt-controller ignores a KubeVirt CR whose status.phase is empty and
#     runs on built-in defaults until then (healthz shows "config-resource-version": "")
#   the VMI namespace's "default" ServiceAccount (kube-controller-manager makes it; without
#     it the launcher pod is forbidden)
#   virt-controller --kubeconfig K --listen 127.0.0.1 --port P --launcher-image IMG \
#     --prom-cert-file CRT --prom-key-file KEY  (it serves /healthz and /leader over HTTPS with
#     that pair; without it TLS handshakes fail). It takes the kubevirt/virt-controller lease.
#     /etc/virt-controller/exportca is hard-coded (export controller only); its absence is
#     logged at level "fatal" but does not stop the process.
set -euo pipefail

VERSIONS=(${COMMONGROUND_KUBEVIRT_VERSIONS:-v1.9.2 v1.9.1 v1.9.0 v1.8.2 v1.8.1 v1.8.0 v1.7.2 v1.7.1 v1.7.0 v1.6.0})
# Bump when the recipe below changes in a way that must invalidate old builds.
RECIPE=2
SUBSTITUTES=${COMMONGROUND_KUBEVIRT_SUBSTITUTES:-}
SUBST_TAG=
if [[ -n "$SUBSTITUTES" ]]; then
  SUBST_TAG="+subst-$(printf '%s' "$SUBSTITUTES" | sha256sum | cut -c1-8)"
fi

CACHE_ROOT=${COMMONGROUND_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/commonground}
VC_ROOT="$CACHE_ROOT/virt-controller"

PRINT=
FORCE=0
for arg in "$@"; do
  case "$arg" in
    --print-bin-dir) PRINT=bin ;;
    --print-dir) PRINT=dir ;;
    --force) FORCE=1 ;;
    -h|--help) sed -n '2,42p' "$0"; exit 0 ;;
    *) echo "build-virt-controller.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

log() { echo "[virt-controller/build] $*" >&2; }

export GOTOOLCHAIN=local
export GOFLAGS="${GOFLAGS:+$GOFLAGS }-mod=mod -buildvcs=false"
export CGO_ENABLED=0

vdir() { echo "$VC_ROOT/$1$SUBST_TAG"; }

is_built() {
  local dir
  dir=$(vdir "$1")
  [[ -f "$dir/stamp" && -x "$dir/bin/virt-controller" && -s "$dir/crds.yaml" ]] &&
    grep -qx "recipe=$RECIPE" "$dir/stamp"
}

finish() {
  local dir
  dir=$(vdir "$1")
  case "$PRINT" in
    bin) echo "$dir/bin" ;;
    dir) echo "$dir" ;;
    *) log "virt-controller $1 in $dir/bin, CRDs in $dir/crds.yaml" ;;
  esac
}

use_cached() {
  local v
  for v in "${VERSIONS[@]}"; do
    if is_built "$v"; then
      log "cached: KubeVirt $v ($(vdir "$v"))"
      finish "$v"
      return 0
    fi
  done
  return 1
}

# --- fast path -------------------------------------------------------------
if [[ $FORCE == 0 ]] && use_cached; then exit 0; fi

command -v go >/dev/null || { log "ERROR: go is not on PATH"; exit 1; }

# The CRD generator: a tiny program compiled inside the wrapper module. It asks
# KubeVirt's virt-operator for its install strategy (the same code the operator
# runs to create the CRDs in a real cluster) and prints the CRDs as YAML.
write_crdgen() {
  local src=$1 version=$2
  mkdir -p "$src/crdgen"
  cat >"$src/crdgen/main.go" <<EOF
// Generated by e2e/controlplane/build-virt-controller.sh. Do not edit.
package main

import (
	"encoding/json"
	"fmt"
	"os"

	extv1 "k8s.io/apiextensions-apiserver/pkg/apis/apiextensions/v1"

	metav1 "k8s.io/apimachinery/pkg/apis/meta/v1"
	"k8s.io/apimachinery/pkg/apis/meta/v1/unstructured"
	virtv1 "kubevirt.io/api/core/v1"
	"sigs.k8s.io/yaml"

	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/components"
	"kubevirt.io/kubevirt/pkg/virt-operator/resource/generate/install"
	operatorutil "kubevirt.io/kubevirt/pkg/virt-operator/util"
)

func main() {
	os.Setenv(operatorutil.VirtOperatorImageEnvName, "quay.io/kubevirt/virt-operator:$version")
	os.Setenv(operatorutil.KubeVirtVersionEnvName, "$version")
	kv := &virtv1.KubeVirt{ObjectMeta: metav1.ObjectMeta{Name: "kubevirt", Namespace: "kubevirt"}}
	config := operatorutil.GetTargetConfigFromKV(kv)
	strategy, err := install.GenerateCurrentInstallStrategy(config, "", "kubevirt")
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	// The install strategy holds every CRD the operator creates except its own
	// (kubevirts.kubevirt.io), which is created with the operator; add it first.
	kvCrd, err := components.NewKubeVirtCrd()
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	crds := append([]*extv1.CustomResourceDefinition{kvCrd}, strategy.CRDs()...)
	for _, crd := range crds {
		crd.TypeMeta = metav1.TypeMeta{APIVersion: "apiextensions.k8s.io/v1", Kind: "CustomResourceDefinition"}
		b, err := json.Marshal(crd)
		if err != nil {
			panic(err)
		}
		var u unstructured.Unstructured
		if err := json.Unmarshal(b, &u.Object); err != nil {
			panic(err)
		}
		unstructured.RemoveNestedField(u.Object, "metadata", "creationTimestamp")
		unstructured.RemoveNestedField(u.Object, "status")
		out, err := yaml.Marshal(u.Object)
		if err != nil {
			panic(err)
		}
		fmt.Printf("---\n%s", out)
	}
}
EOF
}

build_version() {
  local version=$1
  local dir src
  dir=$(vdir "$version")
  src="$dir/src"
  rm -rf "$dir/bin.tmp" "$dir/stamp" "$src"
  mkdir -p "$dir/bin.tmp" "$src"
  local t0=$SECONDS

  log "KubeVirt $version: downloading kubevirt.io/kubevirt@$version from the module proxy"
  local json gomod
  json=$(cd "$src" && GOFLAGS= go mod download -json "kubevirt.io/kubevirt@$version" 2>&1) || true
  gomod=$(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"GoMod": "\(.*\)",\{0,1\}$/\1/p')
  if [[ -z "$gomod" || ! -f "$gomod" ]] || printf '%s\n' "$json" | grep -q '"Error"'; then
    log "KubeVirt $version: not available: $(printf '%s\n' "$json" | sed -n 's/^[[:space:]]*"Error": "\(.*\)",\{0,1\}$/\1/p' | head -1)"
    return 1
  fi

  # go directive and replace lines from KubeVirt's own go.mod. Replacements into
  # its staging tree ("kubevirt.io/api => ./staging/src/kubevirt.io/api") become
  # the published module of the same version; other local-path replacements
  # cannot be honoured outside KubeVirt's tree and are dropped (and reported).
  local godirective replaces
  godirective=$(awk '$1 == "go" && NF == 2 {print $2; exit}' "$gomod")
  replaces=$(awk -v v="$version" '
      /^replace[[:space:]]*\(/ {inblock=1; next}
      inblock && /^\)/ {inblock=0; next}
      {
        line=$0
        sub(/\/\/.*/, "", line)
        if (!inblock) { if (line !~ /^replace[[:space:]]/) next; sub(/^replace[[:space:]]+/, "", line) }
        if (line !~ /=>/) next
        split(line, lr, /=>/)
        n=split(lr[1], l, /[[:space:]]+/); lhs=""; for (i=1; i<=n; i++) if (l[i] != "") { lhs = lhs (lhs == "" ? "" : " ") l[i] }
        n=split(lr[2], r, /[[:space:]]+/); rhs=""; for (i=1; i<=n; i++) if (r[i] != "") { rhs = rhs (rhs == "" ? "" : " ") r[i] }
        if (rhs ~ /^\.\.?\//) {
          if (rhs ~ /^\.\/staging\/src\/kubevirt\.io\//) { split(lhs, m, " "); printf "\t%s => %s %s\n", m[1], m[1], v }
          else printf "\t// dropped local replace: %s => %s\n", lhs, rhs
          next
        }
        printf "\t%s => %s\n", lhs, rhs
      }' "$gomod")
  local sub mod
  for sub in $SUBSTITUTES; do
    mod=${sub%@*}
    replaces=$(printf '%s\n' "$replaces" | awk -v m="$mod" '$1 != m')
    replaces+=$'\n'"	$mod => $mod ${sub##*@} // substitute (COMMONGROUND_KUBEVIRT_SUBSTITUTES)"
    log "KubeVirt $version: substituting $mod ${sub##*@}"
  done
  log "KubeVirt $version: $(printf '%s\n' "$replaces" | grep -c '=>') replace lines, go $godirective"
  printf '%s\n' "$replaces" | grep 'dropped' >&2 || true

  cat >"$src/go.mod" <<EOF
// Generated by e2e/controlplane/build-virt-controller.sh from kubevirt.io/kubevirt@$version's go.mod. Do not edit.
module commonground.local/e2e/controlplane/virt-controller

go $godirective

require (
	kubevirt.io/api $version
	kubevirt.io/client-go $version
	kubevirt.io/kubevirt $version
)

replace (
$replaces
)
EOF
  rm -f "$src/go.sum"
  write_crdgen "$src" "$version"

  # Version information normally stamped in by KubeVirt's hack/version.sh.
  local vpkg=kubevirt.io/client-go/version
  local ldflags="-s -w -X $vpkg.gitVersion=$version -X $vpkg.gitTreeState=clean -X $vpkg.buildDate=$(date -u +%Y-%m-%dT%H:%M:%SZ)"

  log "KubeVirt $version: resolving module graph"
  (cd "$src" && go list -deps kubevirt.io/kubevirt/cmd/virt-controller ./crdgen >/dev/null)
  log "KubeVirt $version: compiling virt-controller (cold: several minutes on 2 cores) ..."
  local t1=$SECONDS
  (cd "$src" && go build -trimpath -ldflags "$ldflags" -o "$dir/bin.tmp/virt-controller" kubevirt.io/kubevirt/cmd/virt-controller)
  local took_vc=$((SECONDS - t1))
  log "KubeVirt $version: virt-controller built in ${took_vc}s"

  log "KubeVirt $version: generating CRDs ..."
  t1=$SECONDS
  (cd "$src" && go build -trimpath -ldflags "-s -w" -o "$src/crdgen.bin" ./crdgen)
  # (KubeVirt's operator logs warnings about monitoring namespaces here; keep them out of the way.)
  if ! "$src/crdgen.bin" >"$dir/crds.yaml.tmp" 2>"$src/crdgen.log"; then
    log "KubeVirt $version: ERROR: CRD generation failed:"; cat "$src/crdgen.log" >&2; return 1
  fi
  mv "$dir/crds.yaml.tmp" "$dir/crds.yaml"
  local took_crd=$((SECONDS - t1))
  log "KubeVirt $version: $(grep -c '^kind: CustomResourceDefinition' "$dir/crds.yaml") CRDs in $dir/crds.yaml (${took_crd}s)"

  rm -rf "$dir/bin"
  mv "$dir/bin.tmp" "$dir/bin"
  local took=$((SECONDS - t0))
  {
    echo "kubevirt=$version"
    echo "recipe=$RECIPE"
    echo "substitutes=$SUBSTITUTES"
    echo "go=$(go env GOVERSION)"
    echo "built=$(date -u +%Y-%m-%dT%H:%M:%SZ)"
    echo "seconds=$took"
    echo "virt_controller_seconds=$took_vc"
    echo "crds_seconds=$took_crd"
  } >"$dir/stamp"
  log "KubeVirt $version: done in ${took}s"
}

# Serialize concurrent builds.
mkdir -p "$VC_ROOT"
exec 9>"$VC_ROOT/.build.lock"
if ! flock -n 9; then
  log "another build is running; waiting for it ..."
  flock 9
fi
if [[ $FORCE == 0 ]] && use_cached; then exit 0; fi
log "using $(go version)"

for v in "${VERSIONS[@]}"; do
  set +e
  (set -e; build_version "$v")
  rc=$?
  set -e
  if [[ $rc == 0 ]]; then
    finish "$v"
    exit 0
  fi
  log "KubeVirt $v: failed; trying the next version"
  rm -rf "$(vdir "$v")"   # nothing half-built stays in the cache
done
log "ERROR: no KubeVirt version built (tried ${VERSIONS[*]})"
exit 1
