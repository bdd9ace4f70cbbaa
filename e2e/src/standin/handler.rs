//! The stand-in's half when KubeVirt's own virt-controller runs: what virt-handler and the
//! kubelet would do, and nothing virt-controller does.
//!
//! - **kubelet**: a virt-launcher pod bound to a node becomes `Running` (pod IP, host IP, every
//!   container running and ready, conditions), since there is no kubelet; a deleted pod is
//!   removed (`gracePeriodSeconds: 0`) once "its containers stopped"; a launcher whose domain
//!   left (the source after a migration, a stopped VMI) ends `Succeeded`, a failed target
//!   `Failed`.
//! - **virt-handler, VMI**: a VMI virt-controller handed over (`Scheduled` on a node) becomes
//!   `Running` with the conditions virt-handler reports (`Ready`, `LiveMigratable`) and
//!   `migrationMethod`; a VMI being deleted is shut down (`Succeeded`), so virt-controller can
//!   remove its finalizer.
//! - **virt-handler, migration** (after virt-controller created the target pod and handed the
//!   migration over in `status.migrationState`): the target side advertises its address and
//!   ports (`targetNodeAddress`, `targetDirectMigrationNodePorts`), the source side starts the
//!   transfer (`startTimestamp`, `mode`), and at the end either the target side takes the VMI
//!   over (`targetNodeDomainDetected`, `targetNodeDomainReadyTimestamp`, `endTimestamp`,
//!   `completed`, `status.nodeName` and the `kubevirt.io/nodeName` label) or the source side
//!   reports the failure (`failed`, `failureReason`, `endTimestamp`). An abort virt-controller
//!   requests (`abortRequested`) ends the transfer as failed with `abortStatus: Succeeded`, and
//!   the target launcher ends.
//! - **virt-api's VMIM mutation** (no virt-api runs): a new VMIM gets the finalizer
//!   `kubevirt.io/migrationJobFinalize`, which virt-controller removes once the migration is
//!   final, so deleting an unfinished VMIM aborts it as in a real cluster. (Added by a watch
//!   moments after the create, not at admission.)
//! - **virt-handler, node**: the `kubevirt.io/heartbeat` annotation and
//!   `kubevirt.io/schedulable` label on the namespace's pool of fake nodes.
//!
//! Failure injection reads the same annotations as before (on the VMIM, else the VMI); see
//! [`super::ANN_FAIL_AT_PERCENT`]. [`super::ANN_TARGET_UNSCHEDULABLE`] has no handler-side
//! equivalent: the target pod is virt-controller's, so tests give the VMIM an impossible
//! `spec.addedNodeSelector` instead.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use commonground::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL, LIVE_MIGRATABLE,
    MIGRATION_JOB_UID_LABEL,
};
use futures::StreamExt;
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::{ListParams, Patch, PatchParams};
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, ResourceExt};
use serde_json::{json, Value};

use super::vmi::wanted_nodes;
use super::{
    grace0, ignore_404, injected, pods, Ctx, Error, ANN_FAILURE_REASON, ANN_FAIL_AT_PERCENT,
    ANN_NOT_MIGRATABLE, ANN_TRANSFER_SECONDS, VMI_NODE_LABEL,
};

/// Label virt-controller puts on a VMI naming the migration's target node; the target
/// virt-handler removes it once the VMI is its own.
const MIGRATION_TARGET_NODE_LABEL: &str = "kubevirt.io/migrationTargetNodeName";
/// Annotation virt-handler refreshes on its node (virt-controller's node controller fails the
/// VMIs of a node whose heartbeat is older than 5 minutes).
pub const HEARTBEAT_ANNOTATION: &str = "kubevirt.io/heartbeat";
pub const SCHEDULABLE_LABEL: &str = "kubevirt.io/schedulable";
/// The port the target "listens" on for the migration (what virt-handler's proxy reports).
const TARGET_PORT: &str = "49152";

/// Now, at the precision Kubernetes' `metav1.Time` keeps (seconds). virt-controller patches
/// VMIs with JSON-patch `test` operations on what it read; a sub-second timestamp we wrote would
/// never compare equal to its re-encoding and every such patch would be rejected.
fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn node_of(pod: &Pod) -> Option<&str> {
    pod.spec.as_ref()?.node_name.as_deref()
}

fn phase_of(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("Pending")
}

/// A fake pod IP per pod (stable: derived from its UID).
fn pod_ip(pod: &Pod) -> String {
    let h = xxhash_rust::xxh3::xxh3_64(pod.uid().unwrap_or_default().as_bytes());
    format!("10.244.{}.{}", (h >> 8) % 250 + 1, h % 250 + 2)
}

/// kubelet: the pod runs (every container started and ready).
async fn pod_running(api: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    if phase_of(pod) != "Pending"
        || node_of(pod).is_none()
        || pod.metadata.deletion_timestamp.is_some()
    {
        return Ok(());
    }
    let now = now_rfc3339();
    let spec = pod.spec.as_ref().expect("bound pod has a spec");
    let running = |name: &str, image: &Option<String>| {
        json!({"name": name, "image": image.clone().unwrap_or_default(), "imageID": "",
               "ready": true, "started": true, "restartCount": 0,
               "state": {"running": {"startedAt": now}}})
    };
    let containers: Vec<Value> = spec
        .containers
        .iter()
        .map(|c| running(&c.name, &c.image))
        .collect();
    let inits: Vec<Value> = spec
        .init_containers
        .iter()
        .flatten()
        .map(|c| running(&c.name, &c.image))
        .collect();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    let ip = pod_ip(pod);
    api.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {
            "phase": "Running",
            "startTime": now,
            "hostIP": "127.0.0.1",
            "hostIPs": [{"ip": "127.0.0.1"}],
            "podIP": ip,
            "podIPs": [{"ip": ip}],
            "conditions": [cond("PodReadyToStartContainers"), cond("Initialized"),
                           cond("ContainersReady"), cond("Ready")],
            "containerStatuses": containers,
            "initContainerStatuses": inits,
        }})),
    )
    .await?;
    tracing::info!(pod = %pod.name_any(), node = ?node_of(pod), "pod running");
    Ok(())
}

/// kubelet: every container of the pod terminated (`Succeeded` with exit code 0, else `Failed`).
async fn pod_terminated(api: &Api<Pod>, pod: &Pod, ok: bool) -> Result<(), Error> {
    if matches!(phase_of(pod), "Succeeded" | "Failed") {
        return Ok(());
    }
    let now = now_rfc3339();
    let code = if ok { 0 } else { 1 };
    let spec = pod.spec.as_ref().expect("pod has a spec");
    let done = |name: &str| {
        json!({"name": name, "image": "", "imageID": "", "ready": false, "started": false,
               "restartCount": 0,
               "state": {"terminated": {"exitCode": code, "reason": if ok { "Completed" } else { "Error" },
                                         "startedAt": now, "finishedAt": now}}})
    };
    let containers: Vec<Value> = spec.containers.iter().map(|c| done(&c.name)).collect();
    let cond = |t: &str| json!({"type": t, "status": "False", "reason": "PodCompleted", "lastTransitionTime": now});
    let r = api
        .patch_status(
            &pod.name_any(),
            &PatchParams::default(),
            &Patch::Strategic(json!({"status": {
                "phase": if ok { "Succeeded" } else { "Failed" },
                "conditions": [cond("ContainersReady"), cond("Ready")],
                "containerStatuses": containers,
            }})),
        )
        .await;
    ignore_404(r)?;
    tracing::info!(pod = %pod.name_any(), ok, "pod terminated");
    Ok(())
}

/// The kubelet's part for one virt-launcher pod.
pub(crate) async fn reconcile_pod(pod: Arc<Pod>, ctx: Arc<Ctx>) -> Result<Action, Error> {
    let api: Api<Pod> = ctx.api(&pod.namespace().unwrap_or_default());
    if pod.metadata.deletion_timestamp.is_some() {
        // Its containers "stopped" at once: finish the deletion, as the kubelet would.
        ignore_404(api.delete(&pod.name_any(), &grace0()).await)?;
        return Ok(Action::await_change());
    }
    pod_running(&api, &pod).await?;
    Ok(Action::await_change())
}

/// virt-handler's VMI conditions: `Ready` and `LiveMigratable` replaced, the others kept.
fn handler_conditions(vmi: &VirtualMachineInstance, raw: &Value) -> Value {
    let now = now_rfc3339();
    let migratable = vmi
        .annotations()
        .get(ANN_NOT_MIGRATABLE)
        .is_none_or(|v| v != "true");
    let live = if migratable {
        json!({"type": LIVE_MIGRATABLE, "status": "True", "lastProbeTime": null, "lastTransitionTime": now})
    } else {
        json!({"type": LIVE_MIGRATABLE, "status": "False", "reason": "DisksNotLiveMigratable",
               "message": format!("not migratable (annotation {ANN_NOT_MIGRATABLE})"),
               "lastProbeTime": null, "lastTransitionTime": now})
    };
    let ready = json!({"type": "Ready", "status": "True", "lastProbeTime": null, "lastTransitionTime": now});
    let mut out: Vec<Value> = raw
        .pointer("/status/conditions")
        .and_then(Value::as_array)
        .cloned()
        .unwrap_or_default()
        .into_iter()
        .filter(|c| !matches!(c["type"].as_str(), Some("Ready" | LIVE_MIGRATABLE)))
        .collect();
    out.push(ready);
    out.push(live);
    Value::Array(out)
}

fn ts(v: &Value, key: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    v.get(key)?
        .as_str()
        .and_then(|s| chrono::DateTime::parse_from_rfc3339(s).ok())
        .map(|t| t.with_timezone(&chrono::Utc))
}

struct Handler {
    ctx: Arc<Ctx>,
    ns: String,
    vmis: Api<VirtualMachineInstance>,
    pods: Api<Pod>,
    vmims: Api<VirtualMachineInstanceMigration>,
}

/// `~` and `/` escaped for a JSON pointer segment.
fn pointer_segment(key: &str) -> String {
    key.replace('~', "~0").replace('/', "~1")
}

/// `v` without its `null` object members (recursively through objects, not inside arrays): what
/// a merge patch member set to `v` leaves where nothing was before.
fn without_null_members(v: &Value) -> Value {
    match v {
        Value::Object(m) => Value::Object(
            m.iter()
                .filter(|(_, v)| !v.is_null())
                .map(|(k, v)| (k.clone(), without_null_members(v)))
                .collect(),
        ),
        other => other.clone(),
    }
}

/// JSON-patch operations that change `base` (the value at `path`) as the merge patch `delta`
/// would — objects merged member by member, a `null` member removed — except that every value
/// is written exactly as given. A merge patch also drops the `null`s *inside* arrays it writes
/// (the `lastProbeTime: null` of each VMI condition), which KubeVirt's Go types write back;
/// virt-controller's JSON-patch `test`s on `/status` and `/status/conditions` then never match.
fn merge_ops(base: Option<&Value>, path: &str, delta: &Value, ops: &mut Vec<Value>) {
    let (Some(Value::Object(base)), Value::Object(delta)) = (base, delta) else {
        ops.push(json!({"op": "add", "path": path, "value": without_null_members(delta)}));
        return;
    };
    for (k, v) in delta {
        let p = format!("{path}/{}", pointer_segment(k));
        match (base.get(k), v) {
            (None, Value::Null) => {}
            (Some(_), Value::Null) => ops.push(json!({"op": "remove", "path": p})),
            (Some(b @ Value::Object(_)), Value::Object(_)) => merge_ops(Some(b), &p, v, ops),
            _ => ops.push(json!({"op": "add", "path": p, "value": without_null_members(v)})),
        }
    }
}

impl Handler {
    /// KubeVirt's VMI CRD has no status subresource: virt-handler writes status through the
    /// object itself (a whole-object update of its Go types). `status` is applied to `raw`'s
    /// status like a merge patch, as a JSON patch so that nulls KubeVirt keeps stay (see
    /// [`merge_ops`]). A path that went away since `raw` was read fails the patch; the
    /// reconcile is retried on a fresh read.
    async fn patch_status(&self, vmi: &str, raw: &Value, status: Value) -> Result<(), Error> {
        let mut ops = Vec::new();
        merge_ops(raw.get("status"), "/status", &status, &mut ops);
        if ops.is_empty() {
            return Ok(());
        }
        let patch: json_patch::Patch =
            serde_json::from_value(Value::Array(ops)).expect("well-formed JSON patch");
        ignore_404(
            self.vmis
                .patch(vmi, &PatchParams::default(), &Patch::Json::<()>(patch))
                .await,
        )
    }

    async fn launchers(&self, vmi: &VirtualMachineInstance) -> Result<Vec<Pod>, Error> {
        let uid = vmi.uid().unwrap_or_default();
        Ok(self
            .pods
            .list(&ListParams::default().labels(&format!("{CREATED_BY_LABEL}={uid}")))
            .await?
            .items)
    }

    /// The VMIM a migrationState belongs to (for its failure-injection annotations).
    async fn vmim_by_uid(
        &self,
        uid: &str,
    ) -> Result<Option<VirtualMachineInstanceMigration>, Error> {
        Ok(self
            .vmims
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .find(|m| m.uid().as_deref() == Some(uid)))
    }

    fn transfer(
        &self,
        vmim: Option<&VirtualMachineInstanceMigration>,
        vmi: &VirtualMachineInstance,
    ) -> Duration {
        let ann = |k: &str| match vmim {
            Some(m) => injected(m, vmi, k),
            None => vmi.annotations().get(k).map(String::as_str),
        };
        if let Some(s) = ann(ANN_TRANSFER_SECONDS).and_then(|v| v.parse::<f64>().ok()) {
            return Duration::from_secs_f64(s.max(0.0));
        }
        let cfg = &self.ctx.cfg;
        let bytes = pods::vmi_memory_bytes(vmi) as f64;
        Duration::from_secs_f64((bytes / cfg.bandwidth_bytes_per_sec * cfg.time_scale).max(0.0))
    }

    async fn reconcile(&self, vmi: &VirtualMachineInstance) -> Result<Action, Error> {
        let name = vmi.name_any();
        let ns = vmi.namespace().unwrap_or_default();
        // Untyped view: the typed status drops fields virt-controller set that we must keep.
        let Some(raw) = self.raw_vmi(&name).await? else {
            return Ok(Action::await_change());
        };
        // Decide on what the API holds now, not on the (possibly older) object that triggered us.
        let fresh: Option<VirtualMachineInstance> = serde_json::from_value(raw.clone()).ok();
        let vmi = fresh.as_ref().unwrap_or(vmi);
        let phase = raw
            .pointer("/status/phase")
            .and_then(Value::as_str)
            .unwrap_or("");
        let node = raw
            .pointer("/status/nodeName")
            .and_then(Value::as_str)
            .map(String::from);

        if vmi.metadata.deletion_timestamp.is_some() {
            // Shut the domain down; virt-controller then deletes the pod and the finalizer.
            self.ctx.sync_memory(vmi, &BTreeSet::new()).await?;
            if !matches!(phase, "Succeeded" | "Failed") && node.is_some() {
                self.patch_status(&name, &raw, json!({"phase": "Succeeded"}))
                    .await?;
            }
            for p in self.launchers(vmi).await? {
                pod_terminated(&self.pods, &p, true).await?;
            }
            return Ok(Action::await_change());
        }

        match (phase, node) {
            ("Scheduled", Some(node)) => {
                let wanted = BTreeSet::from([node.clone()]);
                if !self.ctx.sync_memory(vmi, &wanted).await? {
                    return Ok(Action::requeue(Duration::from_millis(100)));
                }
                self.patch_status(
                    &name,
                    &raw,
                    json!({
                        "phase": "Running",
                        "conditions": handler_conditions(vmi, &raw),
                        "migrationMethod": "LiveMigration",
                        // No SELinux on the host (virt-controller needs it set to migrate).
                        "selinuxContext": "none",
                    }),
                )
                .await?;
                tracing::info!(vmi = %format!("{ns}/{name}"), %node, "VMI running");
                Ok(Action::requeue(self.ctx.cfg.resync))
            }
            ("Running", Some(node)) => self.running(vmi, &raw, &node).await,
            _ => Ok(Action::requeue(self.ctx.cfg.resync)),
        }
    }

    async fn raw_vmi(&self, name: &str) -> Result<Option<Value>, Error> {
        let ar = kube::api::ApiResource::erase::<VirtualMachineInstance>(&());
        let api: Api<kube::api::DynamicObject> =
            Api::namespaced_with(self.ctx.client.clone(), &self.ns, &ar);
        Ok(api
            .get_opt(name)
            .await?
            .and_then(|o| serde_json::to_value(o).ok()))
    }

    async fn running(
        &self,
        vmi: &VirtualMachineInstance,
        raw: &Value,
        node: &str,
    ) -> Result<Action, Error> {
        let name = vmi.name_any();
        let ns = vmi.namespace().unwrap_or_default();
        // Keep the LiveMigratable condition in line with the annotation (tests flip it).
        let want = handler_conditions(vmi, raw);
        let want_live = want
            .as_array()
            .and_then(|a| a.iter().find(|c| c["type"] == LIVE_MIGRATABLE))
            .and_then(|c| c["status"].as_str());
        let have_live = vmi
            .status
            .as_ref()
            .and_then(|s| s.conditions.iter().find(|c| c.r#type == LIVE_MIGRATABLE))
            .map(|c| c.status.as_str());
        if want_live != have_live {
            self.patch_status(&name, raw, json!({"conditions": want}))
                .await?;
        }
        // The launcher on the VMI's node runs (a restarted stand-in catches up).
        let launchers = self.launchers(vmi).await?;
        for p in launchers.iter().filter(|p| node_of(p) == Some(node)) {
            pod_running(&self.pods, p).await?;
        }

        let Some(ms) = raw
            .pointer("/status/migrationState")
            .filter(|m| m.is_object())
        else {
            let ready = self.ctx.sync_memory(vmi, &wanted_nodes(vmi)).await?;
            return Ok(Action::requeue(if ready {
                self.ctx.cfg.resync
            } else {
                Duration::from_millis(200)
            }));
        };
        let completed = ms["completed"].as_bool().unwrap_or(false);
        let failed = ms["failed"].as_bool().unwrap_or(false);
        let target = ms["targetNode"]
            .as_str()
            .filter(|s| !s.is_empty())
            .map(String::from);
        let uid = ms["migrationUid"].as_str().unwrap_or_default().to_string();
        if completed || failed || target.is_none() || uid.is_empty() {
            // Finished (or not handed over yet): the launchers the migration left end.
            self.finish_pods(vmi, ms, &launchers, node, completed && !failed)
                .await?;
            let ready = self.ctx.sync_memory(vmi, &wanted_nodes(vmi)).await?;
            return Ok(Action::requeue(if ready {
                self.ctx.cfg.resync
            } else {
                Duration::from_millis(200)
            }));
        }
        let target = target.expect("checked");
        let vmim = self.vmim_by_uid(&uid).await?;
        let who = format!("{ns}/{name}");

        // Target side: the target launcher runs and holds the memory, then advertises itself.
        if ms["targetNodeAddress"].as_str().is_none_or(str::is_empty) {
            if !self.ctx.sync_memory(vmi, &wanted_nodes(vmi)).await? {
                return Ok(Action::requeue(Duration::from_millis(100)));
            }
            let address = self.node_address(&target).await?;
            let ports = json!({ TARGET_PORT: 0 });
            let mut state = json!({
                "targetNodeAddress": address,
                "targetDirectMigrationNodePorts": ports,
            });
            if ms.get("targetState").is_some_and(Value::is_object) {
                state["targetState"] =
                    json!({"nodeAddress": address, "directMigrationNodePorts": ports});
            }
            self.patch_status(&name, raw, json!({ "migrationState": state }))
                .await?;
            tracing::info!(vmi = %who, %target, %address, "migration target ready");
            return Ok(Action::requeue(Duration::from_millis(50)));
        }

        // Source side: start the transfer; a guest that cannot live-migrate fails right away (in a
        // real cluster virt-api refuses such a VMIM at admission; none runs here).
        let Some(start) = ts(ms, "startTimestamp") else {
            if !vmi.condition_true(LIVE_MIGRATABLE) {
                let now = now_rfc3339();
                self.patch_status(
                    &name,
                    raw,
                    json!({"migrationState": {
                        "startTimestamp": now,
                        "failed": true,
                        "failureReason": "VirtualMachineInstance is not live-migratable",
                        "endTimestamp": now,
                    }}),
                )
                .await?;
                tracing::info!(vmi = %who, "not live-migratable; migration failed");
                self.end_target_pods(&launchers, &uid).await?;
                return Ok(Action::requeue(Duration::from_millis(50)));
            }
            self.patch_status(
                &name,
                raw,
                json!({"migrationState": {"startTimestamp": now_rfc3339(), "mode": "PreCopy"}}),
            )
            .await?;
            tracing::info!(vmi = %who, from = %node, to = %target, "migration started");
            return Ok(Action::requeue(Duration::from_millis(50)));
        };

        if ms["abortRequested"].as_bool() == Some(true) {
            self.patch_status(
                &name,
                raw,
                json!({"migrationState": {
                    "failed": true,
                    "abortStatus": "Succeeded",
                    "failureReason": super::ABORTED_REASON,
                    "endTimestamp": now_rfc3339(),
                }}),
            )
            .await?;
            tracing::info!(vmi = %who, "migration aborted");
            self.end_target_pods(&launchers, &uid).await?;
            return Ok(Action::requeue(Duration::from_millis(50)));
        }

        let elapsed = (chrono::Utc::now() - start).to_std().unwrap_or_default();
        let total = self.transfer(vmim.as_ref(), vmi);
        let ann = |k: &str| match &vmim {
            Some(m) => injected(m, vmi, k).map(String::from),
            None => vmi.annotations().get(k).cloned(),
        };
        let mut deadline = total;
        if let Some(pct) = ann(ANN_FAIL_AT_PERCENT).and_then(|v| v.parse::<f64>().ok()) {
            let at = total.mul_f64((pct / 100.0).clamp(0.0, 1.0));
            if elapsed >= at {
                let reason = ann(ANN_FAILURE_REASON).unwrap_or_else(|| "injected failure".into());
                self.patch_status(
                    &name,
                    raw,
                    json!({"migrationState": {
                        "failed": true,
                        "failureReason": reason,
                        "endTimestamp": now_rfc3339(),
                    }}),
                )
                .await?;
                tracing::info!(vmi = %who, %reason, "migration failed");
                self.end_target_pods(&launchers, &uid).await?;
                return Ok(Action::requeue(Duration::from_millis(50)));
            }
            deadline = at;
        }
        if elapsed < total {
            return Ok(Action::requeue(deadline - elapsed));
        }

        // Target side: the domain arrived and runs; the VMI is the target's now.
        let now = now_rfc3339();
        self.vmis
            .patch(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {"labels": {
                    VMI_NODE_LABEL: target,
                    MIGRATION_TARGET_NODE_LABEL: null,
                }}})),
            )
            .await?;
        let mut state = json!({
            "targetNodeDomainDetected": true,
            "targetNodeDomainReadyTimestamp": now,
            "endTimestamp": now,
            "completed": true,
        });
        if ms.get("targetState").is_some_and(Value::is_object) {
            state["targetState"] = json!({"domainDetected": true, "domainReadyTimestamp": now});
        }
        self.patch_status(
            &name,
            raw,
            json!({"nodeName": target, "migrationTransport": "Unix", "migrationState": state}),
        )
        .await?;
        tracing::info!(vmi = %who, from = %node, to = %target, "migration completed");
        // The domain left the source: its launcher (the one on the source node, not this
        // migration's target) exits.
        for p in launchers.iter().filter(|p| {
            node_of(p) == Some(node)
                && p.labels().get(MIGRATION_JOB_UID_LABEL).map(String::as_str) != Some(uid.as_str())
        }) {
            pod_terminated(&self.pods, p, true).await?;
        }
        Ok(Action::requeue(Duration::from_millis(50)))
    }

    /// The target's virt-handler tears its domain down after a failed or aborted migration: the
    /// migration's target launcher ends `Failed`.
    async fn end_target_pods(&self, launchers: &[Pod], uid: &str) -> Result<(), Error> {
        for p in launchers
            .iter()
            .filter(|p| p.labels().get(MIGRATION_JOB_UID_LABEL).map(String::as_str) == Some(uid))
        {
            pod_terminated(&self.pods, p, false).await?;
        }
        Ok(())
    }

    /// After a migration ended: the launcher(s) the VMI no longer runs in terminate.
    async fn finish_pods(
        &self,
        vmi: &VirtualMachineInstance,
        ms: &Value,
        launchers: &[Pod],
        node: &str,
        succeeded: bool,
    ) -> Result<(), Error> {
        let uid = ms["migrationUid"].as_str().unwrap_or_default();
        if uid.is_empty() || ms["endTimestamp"].is_null() {
            return Ok(());
        }
        let target_pod = ms["targetPod"].as_str().unwrap_or_default();
        let active: BTreeSet<String> = self
            .vmims
            .list(&ListParams::default())
            .await?
            .items
            .into_iter()
            .filter(|m| !m.is_final())
            .filter_map(|m| m.uid())
            .collect();
        for p in launchers {
            let is_target = p.name_any() == target_pod
                || p.labels().get(MIGRATION_JOB_UID_LABEL).map(String::as_str) == Some(uid);
            // The target pod of a migration still under way is not ours to end.
            if p.labels()
                .get(MIGRATION_JOB_UID_LABEL)
                .is_some_and(|u| active.contains(u))
            {
                continue;
            }
            if succeeded && !is_target && node_of(p) != Some(node) {
                // The source launcher: its domain left, virt-launcher exits.
                pod_terminated(&self.pods, p, true).await?;
            } else if !succeeded && is_target {
                // The target launcher of a failed migration: virt-handler tears its domain down.
                pod_terminated(&self.pods, p, false).await?;
            }
        }
        let _ = vmi;
        Ok(())
    }

    /// The address the target virt-handler advertises: its node's InternalIP.
    async fn node_address(&self, node: &str) -> Result<String, Error> {
        let nodes: Api<Node> = Api::all(self.ctx.client.clone());
        Ok(nodes
            .get_opt(node)
            .await?
            .and_then(|n| n.status?.addresses)
            .and_then(|a| a.into_iter().find(|a| a.type_ == "InternalIP"))
            .map(|a| a.address)
            .unwrap_or_else(|| "127.0.0.1".into()))
    }
}

/// virt-api's mutating webhook adds the migration finalizer on create; we add it on sight.
pub(crate) async fn reconcile_vmim(
    vmim: Arc<VirtualMachineInstanceMigration>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    if vmim.metadata.deletion_timestamp.is_some()
        || vmim.is_final()
        || vmim.finalizers().iter().any(|f| f == super::VMIM_FINALIZER)
    {
        return Ok(Action::await_change());
    }
    let api: Api<VirtualMachineInstanceMigration> = ctx.api(&vmim.namespace().unwrap_or_default());
    match super::add_vmim_finalizer(&api, &vmim).await {
        Ok(_) => Ok(Action::await_change()),
        Err(kube::Error::Api(e)) if e.code == 409 || e.code == 404 => {
            Ok(Action::requeue(Duration::from_millis(50)))
        }
        Err(e) => Err(e.into()),
    }
}

pub(crate) async fn reconcile_vmi(
    vmi: Arc<VirtualMachineInstance>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = vmi.namespace().unwrap_or_default();
    let h = Handler {
        vmis: ctx.api(&ns),
        pods: ctx.api(&ns),
        vmims: ctx.api(&ns),
        ns,
        ctx,
    };
    h.reconcile(&vmi).await
}

/// virt-handler's node heartbeat on every node of `pool` (label `pool_label=pool`), or on all
/// nodes labelled `kubevirt.io/schedulable` when there is no pool.
pub(crate) async fn heartbeats(
    ctx: Arc<Ctx>,
    pool: Option<(String, String)>,
) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ctx.client.clone());
    let lp = match &pool {
        Some((k, v)) => ListParams::default().labels(&format!("{k}={v}")),
        None => ListParams::default().labels(SCHEDULABLE_LABEL),
    };
    let mut tick = tokio::time::interval(Duration::from_secs(30));
    loop {
        tick.tick().await;
        let Ok(list) = nodes.list(&lp).await else {
            continue;
        };
        let now = chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
        for n in list {
            let patch = json!({"metadata": {
                "annotations": {HEARTBEAT_ANNOTATION: now},
                "labels": {SCHEDULABLE_LABEL: "true"},
            }});
            let _ = nodes
                .patch(&n.name_any(), &PatchParams::default(), &Patch::Merge(patch))
                .await;
        }
    }
}

/// Runs the handler/kubelet half until dropped.
pub(crate) async fn run(
    ctx: Arc<Ctx>,
    vmis: Api<VirtualMachineInstance>,
    vmims: Api<VirtualMachineInstanceMigration>,
    pods: Api<Pod>,
    pool: Option<(String, String)>,
) -> anyhow::Result<()> {
    let launcher_pods = watcher::Config::default().labels("kubevirt.io=virt-launcher");
    let vmim_ctrl = Controller::new(vmims.clone(), watcher::Config::default())
        .run(reconcile_vmim, super::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "VMIM finalizer");
            }
        });
    let vmi_ctrl = Controller::new(vmis, watcher::Config::default())
        .owns(pods.clone(), launcher_pods.clone())
        .watches(
            vmims,
            watcher::Config::default(),
            |m: VirtualMachineInstanceMigration| {
                let r = ObjectRef::new(&m.spec.vmi_name);
                Some(match m.namespace() {
                    Some(ns) => r.within(&ns),
                    None => r,
                })
            },
        )
        .run(reconcile_vmi, super::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "handler VMI controller");
            }
        });
    let pod_ctrl = Controller::new(pods, launcher_pods)
        .run(reconcile_pod, super::error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "kubelet pod controller");
            }
        });
    tokio::select! {
        _ = vmi_ctrl => anyhow::bail!("handler VMI controller stopped"),
        _ = pod_ctrl => anyhow::bail!("kubelet pod controller stopped"),
        _ = vmim_ctrl => anyhow::bail!("VMIM finalizer controller stopped"),
        r = heartbeats(ctx.clone(), pool) => r,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ops(base: Value, delta: Value) -> Value {
        let mut out = Vec::new();
        merge_ops(base.get("status"), "/status", &delta, &mut out);
        // Member order depends on serde_json's map; compare by path.
        out.sort_by_key(|o| o["path"].as_str().unwrap_or_default().to_string());
        Value::Array(out)
    }

    #[test]
    fn merge_ops_keep_nulls_inside_arrays_and_merge_objects() {
        let base = json!({"status": {"phase": "Scheduled", "migrationState": {"targetNode": "b"},
                                     "reason": "x"}});
        let delta = json!({
            "conditions": [{"type": "Ready", "status": "True", "lastProbeTime": null}],
            "migrationState": {"startTimestamp": "t", "mode": "PreCopy", "gone": null},
            "reason": null,
            "absent": null,
        });
        assert_eq!(
            ops(base, delta),
            json!([
                {"op": "add", "path": "/status/conditions",
                 "value": [{"type": "Ready", "status": "True", "lastProbeTime": null}]},
                {"op": "add", "path": "/status/migrationState/mode", "value": "PreCopy"},
                {"op": "add", "path": "/status/migrationState/startTimestamp", "value": "t"},
                {"op": "remove", "path": "/status/reason"},
            ])
        );
    }

    #[test]
    fn merge_ops_add_a_missing_status_whole_and_escape_keys() {
        assert_eq!(
            ops(
                json!({}),
                json!({"phase": "Running", "x": null, "m": {"a/b~": 1}})
            ),
            json!([{"op": "add", "path": "/status", "value": {"phase": "Running", "m": {"a/b~": 1}}}])
        );
        assert_eq!(
            ops(json!({"status": {"m": {}}}), json!({"m": {"a/b~": 1}})),
            json!([{"op": "add", "path": "/status/m/a~1b~0", "value": 1}])
        );
    }
}
