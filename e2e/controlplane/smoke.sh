#!/usr/bin/env bash
# End-to-end smoke test of the local control plane (e2e/cluster), using only curl
# and python3 (no kubectl) against the API:
#   - fake Ready nodes (create Node, then PATCH its status subresource)
#   - a pod in a fresh namespace (service account admission) is bound by kube-scheduler
#   - garbage collection of an owner's dependents, namespace deletion
#   - the CRDs from e2e/crds are served (VMI with status subresource)
#   - kube-scheduler calls a scheduler extender given with `up --extender-url`
#
# Usage: e2e/controlplane/smoke.sh [--state-dir DIR]   (brings the cluster up, leaves it up)
set -euo pipefail
E2E=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
STATE_ARGS=("$@")

say() { echo "[smoke] $*" >&2; }
fail() { say "FAIL: $*"; "$E2E/cluster" logs "${STATE_ARGS[@]}" >&2 || true; exit 1; }

line=$("$E2E/cluster" up "${STATE_ARGS[@]}")
[[ $line == KUBECONFIG=/* ]] || fail "unexpected output of up: $line"
export KUBECONFIG=${line#KUBECONFIG=}
say "using $KUBECONFIG"

# Everything a client needs is in the kubeconfig: server, CA data, bearer token.
SERVER=$(sed -n 's/^ *server: //p' "$KUBECONFIG" | head -1)
TOKEN=$(sed -n 's/^ *token: //p' "$KUBECONFIG" | head -1)
CA=$(mktemp); trap 'rm -f "$CA"' EXIT
sed -n 's/^ *certificate-authority-data: //p' "$KUBECONFIG" | head -1 | base64 -d >"$CA"

# k METHOD PATH [BODY [CONTENT-TYPE]] -> prints the body; fails on HTTP >= 400
k() {
  local method=$1 path=$2 body=${3:-} ctype=${4:-application/json}
  local args=(-sS --fail-with-body --noproxy '*' --cacert "$CA" -H "Authorization: Bearer $TOKEN" -X "$method")
  [[ -n $body ]] && args+=(-H "Content-Type: $ctype" --data-binary "$body")
  curl "${args[@]}" "$SERVER$path"
}
# jq-less JSON field access: jget EXPR (python expression on `d`)
jget() { python3 -c "import json,sys; d=json.load(sys.stdin); print($1)"; }

wait_for() { # wait_for SECONDS DESCRIPTION COMMAND...
  local t=$1 what=$2; shift 2
  local deadline=$((SECONDS + t))
  until "$@"; do
    ((SECONDS < deadline)) || fail "timed out waiting for $what"
    sleep 0.5
  done
}

fake_node() { # fake_node NAME
  local name=$1
  k POST /api/v1/nodes "{\"apiVersion\":\"v1\",\"kind\":\"Node\",\"metadata\":{\"name\":\"$name\",\"labels\":{\"kubernetes.io/hostname\":\"$name\",\"commonground.io/fake\":\"true\"}}}" >/dev/null
  local now; now=$(date -u +%Y-%m-%dT%H:%M:%SZ)
  k PATCH "/api/v1/nodes/$name/status" "{\"status\":{
      \"capacity\":{\"cpu\":\"16\",\"memory\":\"64Gi\",\"pods\":\"110\"},
      \"allocatable\":{\"cpu\":\"16\",\"memory\":\"64Gi\",\"pods\":\"110\"},
      \"conditions\":[{\"type\":\"Ready\",\"status\":\"True\",\"reason\":\"KubeletReady\",\"message\":\"fake node\",
                       \"lastHeartbeatTime\":\"$now\",\"lastTransitionTime\":\"$now\"}]}}" \
    application/merge-patch+json >/dev/null
}

pod_json() { # pod_json NAME
  cat <<EOF
{"apiVersion":"v1","kind":"Pod","metadata":{"name":"$1"},
 "spec":{"containers":[{"name":"c","image":"registry.invalid/none:1",
   "resources":{"requests":{"cpu":"100m","memory":"64Mi"}}}]}}
EOF
}

pod_node() { k GET "/api/v1/namespaces/$1/pods/$2" | jget 'd["spec"].get("nodeName","")'; }
pod_bound() { [[ -n $(pod_node "$1" "$2") ]]; }
gone() { ! curl -sS -o /dev/null -w '%{http_code}' --noproxy '*' --cacert "$CA" -H "Authorization: Bearer $TOKEN" "$SERVER$1" | grep -qv 404; }
has_default_sa() { k GET "/api/v1/namespaces/$1/serviceaccounts/default" >/dev/null 2>&1; }

suffix=$RANDOM
n1=fake-node-a-$suffix n2=fake-node-b-$suffix
say "creating fake nodes $n1 $n2 and marking them Ready via the status subresource"
fake_node "$n1"; fake_node "$n2"
ready=$(k GET "/api/v1/nodes/$n1" | jget '[c["status"] for c in d["status"]["conditions"] if c["type"]=="Ready"][0]')
[[ $ready == True ]] || fail "node $n1 not Ready: $ready"
sleep 2
ready=$(k GET "/api/v1/nodes/$n1" | jget '[c["status"] for c in d["status"]["conditions"] if c["type"]=="Ready"][0]')
[[ $ready == True ]] || fail "node $n1 lost its Ready condition (is node-lifecycle-controller running?)"

ns=smoke-$suffix
say "creating namespace $ns and a pod in it"
k POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$ns\"}}" >/dev/null
wait_for 30 "default ServiceAccount in $ns" has_default_sa "$ns"
k POST "/api/v1/namespaces/$ns/pods" "$(pod_json p1)" >/dev/null
wait_for 30 "pod p1 to be scheduled" pod_bound "$ns" p1
say "pod p1 bound to $(pod_node "$ns" p1) by kube-scheduler"

say "garbage collection: deleting an owner ConfigMap must delete its dependent"
uid=$(k POST "/api/v1/namespaces/$ns/configmaps" '{"metadata":{"name":"owner"},"data":{"a":"b"}}' | jget 'd["metadata"]["uid"]')
k POST "/api/v1/namespaces/$ns/configmaps" "{\"metadata\":{\"name\":\"dependent\",\"ownerReferences\":[{\"apiVersion\":\"v1\",\"kind\":\"ConfigMap\",\"name\":\"owner\",\"uid\":\"$uid\"}]}}" >/dev/null
k DELETE "/api/v1/namespaces/$ns/configmaps/owner" >/dev/null
wait_for 30 "dependent ConfigMap to be garbage collected" gone "/api/v1/namespaces/$ns/configmaps/dependent"
say "dependent garbage collected"

say "CRDs: creating a VirtualMachineInstance and writing its status subresource"
k POST "/apis/kubevirt.io/v1/namespaces/$ns/virtualmachineinstances" '{"apiVersion":"kubevirt.io/v1","kind":"VirtualMachineInstance","metadata":{"name":"vm1"},"spec":{"nodeSelector":{"a":"b"},"domain":{"cpu":{"model":"host-model"},"resources":{"requests":{"memory":"1Gi","cpu":2}},"devices":{"disks":[]}}}}' >/dev/null
k PATCH "/apis/kubevirt.io/v1/namespaces/$ns/virtualmachineinstances/vm1/status" '{"status":{"phase":"Running","nodeName":"'"$n1"'","migrationState":{"sourceNode":"'"$n1"'","completed":false,"startTimestamp":"2024-01-01T00:00:00Z","sourcePod":"x"}}}' application/merge-patch+json >/dev/null
got=$(k GET "/apis/kubevirt.io/v1/namespaces/$ns/virtualmachineinstances/vm1" | jget 'd["status"]["phase"], d["status"]["migrationState"]["sourcePod"], d["spec"]["domain"]["devices"]')
[[ $got == "Running x {'disks': []}" ]] || fail "VMI round trip: $got"

say "namespace deletion (pods bound to fake nodes are force-deleted first: there is no kubelet)"
k DELETE "/api/v1/namespaces/$ns/pods/p1?gracePeriodSeconds=0" >/dev/null
k DELETE "/api/v1/namespaces/$ns" >/dev/null
wait_for 60 "namespace $ns to be deleted" gone "/api/v1/namespaces/$ns"
say "namespace deleted"

# ---- scheduler extender ----
ext_dir=$(mktemp -d)
cat >"$ext_dir/extender.py" <<'EOF'
import http.server, json, sys
log = open(sys.argv[2], "a", buffering=1)
class H(http.server.BaseHTTPRequestHandler):
    def do_POST(self):
        args = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        verb = self.path.rstrip("/").rsplit("/", 1)[-1]
        nodes = args.get("Nodes") or {"items": []}
        names = [n["metadata"]["name"] for n in nodes.get("items") or []]
        log.write(f"{verb} pod={args['Pod']['metadata']['name']} nodes={','.join(names)}\n")
        if verb == "filter":
            out = {"Nodes": args.get("Nodes"), "FailedNodes": {}, "Error": ""}
        else:
            out = [{"Host": n, "Score": 0} for n in names]
        body = json.dumps(out).encode()
        self.send_response(200); self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body))); self.end_headers(); self.wfile.write(body)
    def log_message(self, *a): pass
srv = http.server.HTTPServer(("127.0.0.1", int(sys.argv[1])), H)
print(srv.server_address[1], flush=True)
srv.serve_forever()
EOF
coproc EXT { exec python3 "$ext_dir/extender.py" 0 "$ext_dir/calls.log"; }
ext_pid=$EXT_PID
read -r ext_port <&"${EXT[0]}"
trap 'kill $ext_pid 2>/dev/null || true; rm -rf "$ext_dir" "$CA"' EXIT
say "extender listening on 127.0.0.1:$ext_port; restarting kube-scheduler with it"
line2=$("$E2E/cluster" up "${STATE_ARGS[@]}" --extender-url "http://127.0.0.1:$ext_port")
[[ $line2 == "$line" ]] || fail "kubeconfig changed: $line2"
ns=smoke-ext-$suffix
k POST /api/v1/namespaces "{\"apiVersion\":\"v1\",\"kind\":\"Namespace\",\"metadata\":{\"name\":\"$ns\"}}" >/dev/null
wait_for 30 "default ServiceAccount in $ns" has_default_sa "$ns"
k POST "/api/v1/namespaces/$ns/pods" "$(pod_json p2)" >/dev/null
wait_for 30 "pod p2 to be scheduled" pod_bound "$ns" p2
grep -q "^filter pod=p2 " "$ext_dir/calls.log" || fail "extender filter was not called: $(cat "$ext_dir/calls.log")"
say "extender calls: $(tr '\n' ';' <"$ext_dir/calls.log")"
say "pod p2 bound to $(pod_node "$ns" p2) after the extender's filter"
k DELETE "/api/v1/namespaces/$ns/pods/p2?gracePeriodSeconds=0" >/dev/null
k DELETE "/api/v1/namespaces/$ns" >/dev/null
k DELETE "/api/v1/nodes/$n1" >/dev/null
k DELETE "/api/v1/nodes/$n2" >/dev/null

say "back to a scheduler without extender"
"$E2E/cluster" up "${STATE_ARGS[@]}" >/dev/null
kill "$ext_pid" 2>/dev/null || true
say "PASS"
echo "1 passed, 0 failed"
