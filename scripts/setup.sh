#!/usr/bin/env bash
# Installs everything the demo and the tests need, idempotently, with caches so a second run
# is fast: Debian packages (apt-get, only when missing), the upstream control plane built from
# Go modules (cached under ~/.cache/commonground), and the Rust workspace.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

say() { echo "[setup] $*" >&2; }

# Debian packages the harness and tests use.
need=()
# ip and nft: the relay tests build network namespaces and interception rules.
for pair in openssl:openssl curl:curl bc:bc python3:python3 gcc:gcc cpio:cpio ip:iproute2 nft:nftables; do
  cmd=${pair%%:*} pkg=${pair##*:}
  command -v "$cmd" >/dev/null 2>&1 || need+=("$pkg")
done
if ((${#need[@]})); then
  say "installing Debian packages: ${need[*]}"
  SUDO=""; [[ $(id -u) -ne 0 ]] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi

command -v cargo >/dev/null || { say "cargo not found: install Rust (https://rustup.rs) first"; exit 1; }
command -v go >/dev/null || { say "go not found: install Go 1.25+ first (it only builds the test control plane)"; exit 1; }

# The real control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler,
# kubectl) from the Go module proxy; ~10 minutes the first time, instant afterwards.
say "control plane binaries"
e2e/controlplane/build.sh >&2

say "building the workspace"
cargo build --workspace --bins --quiet
say "ready"
