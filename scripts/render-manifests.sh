#!/usr/bin/env bash
# Regenerates what is derived from the chart and the CRDs:
#   charts/commonground/crds/commonground.yaml   copy of crds/commonground.yaml
#   deploy/crds.yaml                             copy of crds/commonground.yaml
#   deploy/commonground.yaml                     the Namespace + `helm template` of the chart
#   docs/reference/*.md                          CRD fields, flags, metrics (tests/manifests.rs)
#
# Usage:  scripts/render-manifests.sh            write the files
#         scripts/render-manifests.sh --check    render into a temp dir and diff; exit 1 if stale
#         scripts/render-manifests.sh --deploy-only [--check]   skip docs/ (no cargo)
#
# deploy/ is rendered with release name and namespace "commonground", with the values in
# deploy/values.yaml (no cluster-key Secret: `helm template` cannot look an existing key up,
# so a random one would change on every render; README/NOTES say how to create it).
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
CHECK=0
DOCS=1
for arg in "$@"; do
  case "$arg" in
    --check) CHECK=1 ;;
    --deploy-only) DOCS=0 ;;
    -h|--help) sed -n '2,15p' "$0"; exit 0 ;;
    *) echo "render-manifests.sh: unknown argument: $arg" >&2; exit 2 ;;
  esac
done

RELEASE=commonground
NAMESPACE=commonground
HELM=$("$ROOT/scripts/helm.sh")

OUT=$(mktemp -d)
trap 'rm -rf "$OUT"' EXIT
mkdir -p "$OUT/deploy" "$OUT/chart-crds"

cp "$ROOT/crds/commonground.yaml" "$OUT/chart-crds/commonground.yaml"
cp "$ROOT/crds/commonground.yaml" "$OUT/deploy/crds.yaml"
{
  cat <<YAML
# Rendered by scripts/render-manifests.sh from charts/commonground with deploy/values.yaml
# (release "$RELEASE", namespace "$NAMESPACE"). Do not edit: change the chart and re-render.
# Install: kubectl apply --server-side -f deploy/crds.yaml -f deploy/commonground.yaml
---
apiVersion: v1
kind: Namespace
metadata:
  name: $NAMESPACE
  labels:
    app.kubernetes.io/part-of: commonground
YAML
  # --kube-version: the rendered objects do not depend on the cluster version, but pin it
  # so the output does not change with the helm binary's default.
  "$HELM" template "$RELEASE" "$ROOT/charts/commonground" \
    --namespace "$NAMESPACE" \
    --values "$ROOT/deploy/values.yaml" \
    --kube-version 1.33.0 \
    --skip-crds
} > "$OUT/deploy/commonground.yaml"

status=0
compare() { # compare <fresh> <committed>
  if ! diff -u "$2" "$1" >&2 2>/dev/null; then
    if [[ ! -e "$2" ]]; then echo "missing: ${2#"$ROOT"/}" >&2; fi
    echo "stale: ${2#"$ROOT"/} (run scripts/render-manifests.sh)" >&2
    status=1
  fi
}

if [[ $CHECK == 1 ]]; then
  compare "$OUT/chart-crds/commonground.yaml" "$ROOT/charts/commonground/crds/commonground.yaml"
  compare "$OUT/deploy/crds.yaml" "$ROOT/deploy/crds.yaml"
  compare "$OUT/deploy/commonground.yaml" "$ROOT/deploy/commonground.yaml"
else
  mkdir -p "$ROOT/charts/commonground/crds" "$ROOT/deploy"
  cp "$OUT/chart-crds/commonground.yaml" "$ROOT/charts/commonground/crds/commonground.yaml"
  cp "$OUT/deploy/crds.yaml" "$ROOT/deploy/crds.yaml"
  cp "$OUT/deploy/commonground.yaml" "$ROOT/deploy/commonground.yaml"
  echo "wrote deploy/crds.yaml deploy/commonground.yaml charts/commonground/crds/commonground.yaml" >&2
fi

if [[ $DOCS == 1 ]]; then
  # The reference generator lives beside its staleness check in tests/manifests.rs.
  if [[ $CHECK == 1 ]]; then
    (cd "$ROOT" && cargo test -q --test manifests reference_docs) || status=1
  else
    (cd "$ROOT" && COMMONGROUND_BLESS=1 cargo test -q --test manifests reference_docs)
  fi
fi
exit $status
