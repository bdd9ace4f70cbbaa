#!/usr/bin/env bash
# The local demo (`make demo`): a real Kubernetes control plane on loopback, commonground's
# controller, scheduler extender and one node agent per fake node as processes, and VMs whose
# memory is real (the KubeVirt stand-in starts one process per VM, filled from an "OS image").
# A VirtualMachineMigration is planned from what the agents measured and carried out; then a
# plain KubeVirt migration (as a node drain makes) is placed by the extender.
#
# Re-runnable: it replaces what an earlier run created. On exit it stops the processes it
# started and leaves the control plane up (the hint it prints says how to stop it).
#
#   COMMONGROUND_DEMO_DIR            where the cluster state and logs go (default target/demo)
#   COMMONGROUND_DEMO_EXTENDER_PORT  extender port on 127.0.0.1 (default 18444)
#   COMMONGROUND_DEMO_SKIP_SETUP=1   skip scripts/setup.sh (everything is built already)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT=$PWD

DEMO_DIR=${COMMONGROUND_DEMO_DIR:-$ROOT/target/demo}
STATE=$DEMO_DIR/cluster
LOGS=$DEMO_DIR/logs
PORT=${COMMONGROUND_DEMO_EXTENDER_PORT:-18444}
NS=commonground-demo
NODES=(demo-node-1 demo-node-2 demo-node-3 demo-node-4)
GROUPS_OF=(wg-east wg-east wg-west wg-west)
IMAGE_MIB=128
PRIVATE_MIB=32
T0=$(date +%s)

bold=$'\033[1m' dim=$'\033[2m' off=$'\033[0m'
[[ -t 1 ]] || { bold="" dim="" off=""; }
STEP=0
step() { STEP=$((STEP + 1)); printf '\n%s[%3ss] %d. %s%s\n' "$bold" "$(($(date +%s) - T0))" "$STEP" "$*" "$off"; }
info() { printf '   %s\n' "$*"; }
show() { printf '%s   $ %s%s\n' "$dim" "$*" "$off"; }
die() { printf '\ndemo: ERROR: %s\n' "$*" >&2; exit 1; }

# --- 1. install and build ----------------------------------------------------------------------
step "Installing what is missing and building (scripts/setup.sh; the first run takes a while)"
if [[ ${COMMONGROUND_DEMO_SKIP_SETUP:-} == 1 ]]; then
  info "skipped (COMMONGROUND_DEMO_SKIP_SETUP=1)"
else
  scripts/setup.sh
fi
TARGET=${CARGO_TARGET_DIR:-$ROOT/target}
BIN=$TARGET/debug
for b in commonground kubevirt-standin vm-memory; do
  [[ -x $BIN/$b ]] || die "$BIN/$b is missing: run scripts/setup.sh"
done
KUBECTL="$(e2e/controlplane/build.sh --print-bin-dir 2>/dev/null)/kubectl"
[[ -x $KUBECTL ]] || die "kubectl not found (e2e/controlplane/build.sh builds it)"
mkdir -p "$LOGS"

# --- background processes, stopped on exit ------------------------------------------------------
PIDS=()
NAMES=()
cleanup() {
  local rc=$?
  trap - EXIT INT TERM
  if ((${#PIDS[@]})); then
    printf '\n%sstopping the demo processes (%s)%s\n' "$dim" "${NAMES[*]}" "$off"
    for p in "${PIDS[@]}"; do kill -TERM "$p" 2>/dev/null || true; done
    for p in "${PIDS[@]}"; do wait "$p" 2>/dev/null || true; done
  fi
  echo
  echo "Logs:           $LOGS"
  echo "The control plane is still up. Look around with:"
  echo "  export KUBECONFIG=${KUBECONFIG:-$STATE/kubeconfig} PATH=$(dirname "$KUBECTL"):\$PATH"
  echo "  kubectl get vmm,vmim,vmi -n $NS -o wide; kubectl get nrd"
  echo "Stop it with:   e2e/cluster down --state-dir $STATE"
  exit "$rc"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

start() { # start NAME ARGS...: a background process logging to $LOGS/NAME.log
  local name=$1
  shift
  "$@" >"$LOGS/$name.log" 2>&1 &
  PIDS+=($!)
  NAMES+=("$name")
  info "$name (pid $!) -> $LOGS/$name.log"
}
alive() { # fails (with the log tail) if a started process died
  local i
  for i in "${!PIDS[@]}"; do
    if ! kill -0 "${PIDS[$i]}" 2>/dev/null; then
      tail -20 "$LOGS/${NAMES[$i]}.log" >&2
      die "${NAMES[$i]} exited; its log is above"
    fi
  done
}
until_ok() { # until_ok SECONDS WHAT COMMAND...: polls COMMAND every 0.5 s
  local deadline=$(($(date +%s) + $1)) what=$2
  shift 2
  until "$@" >/dev/null 2>&1; do
    alive
    (($(date +%s) < deadline)) || die "timed out waiting for $what"
    sleep 0.5
  done
}
k() { "$KUBECTL" "$@"; }

# --- 2. control plane ----------------------------------------------------------------------------
if ! python3 -c "import socket,sys; s=socket.socket(); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1); s.bind(('127.0.0.1',int(sys.argv[1])))" "$PORT" 2>/dev/null; then
  PORT=$(python3 -c "import socket; s=socket.socket(); s.bind(('127.0.0.1',0)); print(s.getsockname()[1])")
  info "port ${COMMONGROUND_DEMO_EXTENDER_PORT:-18444} is taken; the extender uses $PORT"
fi
EXTENDER_URL=http://127.0.0.1:$PORT
step "Starting the control plane (etcd, kube-apiserver, kube-controller-manager, kube-scheduler calling $EXTENDER_URL, KubeVirt's virt-controller)"
up_out=$(e2e/cluster up --state-dir "$STATE" --extender-url "$EXTENDER_URL" 2> >(sed 's/^/   /' >&2)) ||
  die "e2e/cluster up failed"
KUBECONFIG=$(sed -n 's/^KUBECONFIG=//p' <<<"$up_out")
export KUBECONFIG
[[ -f $KUBECONFIG ]] || die "no kubeconfig from e2e/cluster up"
info "KUBECONFIG=$KUBECONFIG"
# With KubeVirt's own virt-controller (the default; COMMONGROUND_VIRT_CONTROLLER=standin turns it
# off) the stand-in plays only virt-handler and kubelet.
STANDIN_ROLE=()
if [[ $(python3 -c 'import json,sys; print(json.load(open(sys.argv[1])).get("virt-controller-mode", ""))' \
  "$STATE/state.json" 2>/dev/null) == real ]]; then
  STANDIN_ROLE=(--handler-only)
  info "KubeVirt: the real virt-controller ($(e2e/cluster status --state-dir "$STATE" | sed -n 's/.*version=//p'))"
fi

# --- 3. commonground and the KubeVirt stand-in ---------------------------------------------------
step "Starting commonground (extender, controller) and the KubeVirt stand-in"
export RUST_LOG=${RUST_LOG:-info,kube=warn}
start extender "$BIN/commonground" extender --listen "127.0.0.1:$PORT" --distances wg-east:wg-west=10
start controller "$BIN/commonground" controller --no-leader-election --health-addr 127.0.0.1:0 \
  --distances wg-east:wg-west=10 --migration-bandwidth 125000000
start kubevirt-standin "$BIN/kubevirt-standin" --memory --memory-helper "$BIN/vm-memory" \
  --memory-dies-with-standin --namespace "$NS" --resync-secs 2 ${STANDIN_ROLE[@]+"${STANDIN_ROLE[@]}"}
until_ok 30 "the extender" curl -sf "$EXTENDER_URL/healthz"

# --- 4. a clean slate ----------------------------------------------------------------------------
step "Removing what an earlier run left (namespace $NS, demo nodes, their digests)"
k create namespace "$NS" --dry-run=client -o yaml | k apply -f - >/dev/null
k delete vmm --all -n "$NS" --wait=false >/dev/null 2>&1 || true
for m in $(k get vmim -n "$NS" -o name 2>/dev/null); do
  k patch -n "$NS" "$m" --type=merge -p '{"metadata":{"finalizers":null}}' >/dev/null 2>&1 || true
done
k delete vmim --all -n "$NS" --wait=false >/dev/null 2>&1 || true
k delete vmi --all -n "$NS" --wait=false >/dev/null 2>&1 || true
k delete pods --all -n "$NS" --force --grace-period=0 >/dev/null 2>&1 || true
k delete nodes -l commonground.dev/demo=true --wait=false >/dev/null 2>&1 || true
k delete nrd "${NODES[@]}" --ignore-not-found --wait=false >/dev/null 2>&1 || true
until_ok 60 "the old VMIs to go" bash -c "[[ -z \$('$KUBECTL' get vmi,vmim,pods -n $NS -o name 2>/dev/null) ]]"
until_ok 60 "the old nodes to go" bash -c "[[ -z \$('$KUBECTL' get nodes -l commonground.dev/demo=true -o name 2>/dev/null) ]]"
info "clean"

# --- 5. nodes and agents -------------------------------------------------------------------------
step "Creating 4 fake nodes in 2 work groups, and one commonground agent per node"
now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
# cpu/memory/pods, plus what virt-handler's device plugins and a kubelet report (virt-launcher
# pods request them).
res='{"cpu":"16","memory":"64Gi","pods":"110","ephemeral-storage":"100Gi","devices.kubevirt.io/kvm":"1k","devices.kubevirt.io/tun":"1k","devices.kubevirt.io/vhost-net":"1k"}'
for i in "${!NODES[@]}"; do
  n=${NODES[$i]} wg=${GROUPS_OF[$i]}
  cat <<EOF | k apply -f - >/dev/null
apiVersion: v1
kind: Node
metadata:
  name: $n
  labels:
    commonground.dev/demo: "true"
    topology.kubernetes.io/zone: $wg
    kubernetes.io/hostname: $n
    kubernetes.io/os: linux
    kubernetes.io/arch: amd64
    kubevirt.io/schedulable: "true"
  annotations:
    kubevirt.io/heartbeat: "$now"
EOF
  k patch node "$n" --subresource=status --type=merge -p "{\"status\":{
    \"capacity\":$res, \"allocatable\":$res,
    \"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",
      \"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" >/dev/null
  # All fake nodes share this machine's /proc: --process-node-arg tells each agent which VM
  # processes are "its" (the stand-in's memory processes carry --e2e-node <node>).
  start "agent-$n" "$BIN/commonground" agent --node-name "$n" --interval 2 \
    --health-addr 127.0.0.1:0 --process-node-arg=--e2e-node
done
show "kubectl get nodes -L topology.kubernetes.io/zone"
k get nodes -l commonground.dev/demo=true -L topology.kubernetes.io/zone | sed 's/^/   /'

# --- 6. VMs with real memory ---------------------------------------------------------------------
# name image node: web-1 and web-2 boot the same image (their image pages are identical), as do
# db-1 and db-2; the rest of each VM's memory is its own.
VMS=("web-1 debian-12 demo-node-1" "web-2 debian-12 demo-node-2" "db-1 fedora-40 demo-node-3"
  "db-2 fedora-40 demo-node-4" "cache-1 alpine-3.20 demo-node-1")
step "Creating ${#VMS[@]} VMs (${IMAGE_MIB} MiB from an OS image + ${PRIVATE_MIB} MiB of their own, real memory)"
info "each VM is placed by cordoning the other nodes while the real kube-scheduler binds it"
for vm in "${VMS[@]}"; do
  read -r name image node <<<"$vm"
  for n in "${NODES[@]}"; do
    if [[ $n == "$node" ]]; then k uncordon "$n" >/dev/null; else k cordon "$n" >/dev/null; fi
  done
  cat <<EOF | k apply -f - >/dev/null
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstance
metadata:
  name: $name
  namespace: $NS
  annotations:
    e2e.commonground.dev/image: $image
    e2e.commonground.dev/image-mib: "$IMAGE_MIB"
    e2e.commonground.dev/private-mib: "$PRIVATE_MIB"
    e2e.commonground.dev/transfer-seconds: "6"
spec:
  domain:
    cpu: {cores: 1}
    memory: {guest: 2Gi}
    resources: {requests: {memory: 2Gi, cpu: "1"}}
    devices: {}
EOF
  until_ok 60 "VMI $name to run" bash -c "[[ \$('$KUBECTL' get vmi -n $NS $name -o jsonpath='{.status.phase}') == Running ]]"
  info "$name ($image) running on $(k get vmi -n "$NS" "$name" -o jsonpath='{.status.nodeName}')"
done
for n in "${NODES[@]}"; do k uncordon "$n" >/dev/null; done
show "ps -o pid,rss,args -C vm-memory   # the VMs' memory"
ps -o pid=,rss=,args= -C vm-memory | grep -- "guest=${NS}_" |
  awk '{sub(",debug-threads=on", "", $5); printf "   pid %-7s %4d MiB resident  %s  on %s  image %s\n", $1, $2/1024, $5, $9, $11}' || true

# --- 7. digests ----------------------------------------------------------------------------------
step "Waiting for the agents to scan the VMs' memory and publish NodeRegionDigests"
digests_ready() {
  local want=(2 1 1 1) i got
  for i in "${!NODES[@]}"; do
    got=$(k get nrd "${NODES[$i]}" -o jsonpath='{.status.vmCount}:{.status.workGroup}' 2>/dev/null) || return 1
    [[ $got == "${want[$i]}:${GROUPS_OF[$i]}" ]] || return 1
  done
}
until_ok 120 "the digests" digests_ready
show "kubectl get nrd -o wide"
k get nrd "${NODES[@]}" -o wide | sed 's/^/   /'
show "what demo-node-2's digest says (never memory content: keyed region identities, sampled)"
k get nrd demo-node-2 -o json >"$DEMO_DIR/nrd.json"
python3 - "$DEMO_DIR/nrd.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
s = d["status"]
print(f"   object size {len(json.dumps(d))} bytes, regions of {s['regionPages'] * s['pageSize'] // 1024} KiB,"
      f" key id {s['keyId']}, scan mode {s['scanMode']}, node sketch {len(s['sketch'])} chars")
for v in s["vms"]:
    print(f"   VM {v['namespace']}/{v['name']}: {v['regions']} regions ({v['memoryBytes'] >> 20} MiB),"
          f" {v['zeroRegions']} zero, sketch {len(v['sketch'])} chars")
PY

# --- 8. a VirtualMachineMigration ------------------------------------------------------------------
VMM=$(
  cat <<EOF
apiVersion: commonground.dev/v1alpha1
kind: VirtualMachineMigration
metadata:
  name: move-web-1
  namespace: $NS
spec:
  vmiName: web-1
  target:
    scope: Cluster
EOF
)
step "Asking commonground to move web-1 off demo-node-1 (it picks the target)"
show "kubectl apply -f -"
sed 's/^/     /' <<<"$VMM"
k apply -f - <<<"$VMM" >/dev/null
info "phases as they happen:"
watch_phases() { # watch_phases KIND NAME: prints VMM/VMIM phase changes until the end
  local kind=$1 name=$2 last="" now vmim vp deadline=$(($(date +%s) + 120)) t1
  t1=$(date +%s.%N)
  while (($(date +%s) < deadline)); do
    alive
    if [[ $kind == vmm ]]; then
      now=$(k get vmm -n "$NS" "$name" -o jsonpath='{.status.phase}|{.status.kubevirtMigration}|{.status.targetNode}' 2>/dev/null || true)
      IFS='|' read -r p vmim target <<<"$now"
      vp=""
      [[ -n $vmim ]] && vp=$(k get vmim -n "$NS" "$vmim" -o jsonpath='{.status.phase}' 2>/dev/null || true)
      now="VirtualMachineMigration ${p:-<none>}${target:+ (target $target)}${vmim:+   KubeVirt migration $vmim: ${vp:-<none>}}"
    else
      p=$(k get vmim -n "$NS" "$name" -o jsonpath='{.status.phase}' 2>/dev/null || true)
      now="VirtualMachineInstanceMigration ${p:-<none>}"
    fi
    if [[ $now != "$last" ]]; then
      printf '   %6.1fs  %s\n' "$(echo "$(date +%s.%N) - $t1" | bc)" "$now"
      last=$now
    fi
    case $p in
      Succeeded) return 0 ;;
      Failed | Cancelled)
        k get "$kind" -n "$NS" "$name" -o yaml | sed 's/^/   /'
        die "$kind $name ended in phase $p"
        ;;
    esac
    sleep 0.3
  done
  die "$kind $name did not finish in 120 s"
}
watch_phases vmm move-web-1
show "kubectl get vmm -o wide"
k get vmm -n "$NS" -o wide | sed 's/^/   /'
show "why that target: the candidates and the estimate (kubectl get vmm move-web-1 -o yaml)"
k get vmm -n "$NS" move-web-1 -o json >"$DEMO_DIR/vmm.json"
python3 - "$DEMO_DIR/vmm.json" <<'PY'
import json, sys
def h(n):
    for u in ["B", "KiB", "MiB", "GiB"]:
        if abs(n) < 1024 or u == "GiB":
            return f"{n:.1f} {u}" if u != "B" else f"{int(n)} B"
        n /= 1024
s = json.load(open(sys.argv[1]))["status"]
print(f"   {s.get('sourceNode')} -> {s.get('targetNode')} (work group {s.get('targetWorkGroup')}), phase {s['phase']}")
print(f"   {'node':<13} {'group':<8} {'in common':>10} {'dist':>5} {'load':>5} {'score':>5}  {'verdict':<9} reason")
for c in s.get("candidates", []):
    print(f"   {c['node']:<13} {c.get('workGroup', ''):<8} {h(c.get('commonBytes', 0)):>10}"
          f" {c.get('distance', 0):>5.0f} {c.get('load', 0):>5.2f} {c.get('score', 0):>5}"
          f"  {c['verdict']:<9} {c.get('reason') or ('most memory in common' if c['verdict'] == 'Chosen' else '')}")
e = s.get("estimate") or {}
if e:
    print(f"   estimate: {h(e['totalBytes'])} of memory ({h(e.get('zeroBytes', 0))} zero),"
          f" {h(e['commonBytes'])} already on the target; the relay would move {h(e['toMoveBytes'])},"
          f" stock transport sends {h(e.get('stockBytes', 0))};"
          f" about {e.get('durationHuman') or '?'} with {e.get('transport') or 'Stock'} transport")
    if e.get("transportReason"):
        print(f"   transport: {e['transportReason']}")
for n in s.get("notes", []):
    print(f"   note: {n}")
PY
show "kubectl get events -n $NS --field-selector involvedObject.name=move-web-1"
k get events -n "$NS" --field-selector involvedObject.name=move-web-1 \
  -o custom-columns=REASON:.reason,MESSAGE:.message --sort-by=.lastTimestamp | sed 's/^/   /'
info "waiting for the agents' next scans to show web-1 on its new node"
until_ok 60 "web-1 in the target's digest" bash -c "'$KUBECTL' get nrd -o jsonpath='{range .items[*]}{.metadata.name}={.status.vms[*].name};{end}' | grep -q \"\$('$KUBECTL' get vmi -n $NS web-1 -o jsonpath='{.status.nodeName}')=[^;]*web-1\""
show "kubectl get nrd"
k get nrd "${NODES[@]}" | sed 's/^/   /'
k get nrd "${NODES[@]}" -o jsonpath='{range .items[*]}{"   "}{.metadata.name}{": "}{.status.vms[*].name}{"\n"}{end}'

# --- 9. a node drain: a plain KubeVirt migration, placed by the extender -------------------------
step "Draining demo-node-3: a plain VirtualMachineInstanceMigration for db-1, placed by the extender"
info "(kubectl drain, virtctl migrate and evictions make these; commonground is not asked, but"
info " kube-scheduler calls its extender for the target pod)"
show "kubectl cordon demo-node-3"
k cordon demo-node-3 | sed 's/^/   /'
VMIM=$(
  cat <<EOF
apiVersion: kubevirt.io/v1
kind: VirtualMachineInstanceMigration
metadata:
  name: drain-db-1
  namespace: $NS
spec:
  vmiName: db-1
EOF
)
show "kubectl apply -f -"
sed 's/^/     /' <<<"$VMIM"
k apply -f - <<<"$VMIM" >/dev/null
watch_phases vmim drain-db-1
show "kubectl get vmim drain-db-1 -o wide; kubectl get vmi db-1"
k get vmim -n "$NS" drain-db-1 -o wide | sed 's/^/   /'
k get vmi -n "$NS" db-1 -o custom-columns=NAME:.metadata.name,NODE:.status.nodeName,MIGRATED-FROM:.status.migrationState.sourceNode,TO:.status.migrationState.targetNode | sed 's/^/   /'
uid=$(k get vmim -n "$NS" drain-db-1 -o jsonpath='{.metadata.uid}')
pod=$(k get pods -n "$NS" -l "kubevirt.io/migrationJobUID=$uid" -o jsonpath='{.items[0].metadata.name}' 2>/dev/null || true)
show "kubectl get events --field-selector involvedObject.name=$pod   # the target pod, bound by kube-scheduler"
k get events -n "$NS" --field-selector "involvedObject.name=$pod" -o custom-columns=REASON:.reason,MESSAGE:.message | sed 's/^/   /'
show "curl $EXTENDER_URL/metrics   # kube-scheduler asked the extender"
curl -s "$EXTENDER_URL/metrics" | grep -E '^commonground_extender_(requests|migration_pods)_total' | sed 's/^/   /' || true
target=$(k get vmi -n "$NS" db-1 -o jsonpath='{.status.nodeName}')
if [[ $target == demo-node-4 ]]; then
  info "db-1 went to demo-node-4, where db-2 already holds the fedora-40 image pages."
else
  info "db-1 went to $target."
fi

step "Done in $(($(date +%s) - T0)) s"
