//! VirtualMachineInstanceMigration reconciler: target pod, phases, migrationState, the move.

use std::sync::Arc;
use std::time::Duration;

use commonground::api::kubevirt::{
    MigrationState, VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL,
    LIVE_MIGRATABLE,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ApiResource, DynamicObject, ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::vmi::{mark_pod_running, wanted_nodes};
use super::{grace0, ignore_404};
use super::{
    injected, now_rfc3339, pods, Ctx, Error, ABORTED_REASON, ANN_FAILURE_REASON,
    ANN_FAIL_AT_PERCENT, ANN_TARGET_UNSCHEDULABLE, ANN_TRANSFER_SECONDS, FIELD_MANAGER,
    VMIM_FINALIZER, VMI_NODE_LABEL,
};

/// What one step of the phase walk asks for next.
enum Next {
    /// The phase changed; take the next step now.
    Step,
    Done(Action),
}

struct Migration {
    ctx: Arc<Ctx>,
    vmims: Api<VirtualMachineInstanceMigration>,
    vmis: Api<VirtualMachineInstance>,
    pods: Api<Pod>,
    /// The VMIM as last read or written.
    m: VirtualMachineInstanceMigration,
}

fn parse_ts(s: &str) -> Option<chrono::DateTime<chrono::Utc>> {
    chrono::DateTime::parse_from_rfc3339(s)
        .ok()
        .map(|t| t.with_timezone(&chrono::Utc))
}

impl Migration {
    fn name(&self) -> String {
        self.m.name_any()
    }

    fn uid(&self) -> String {
        self.m.uid().unwrap_or_default()
    }

    fn state(&self) -> MigrationState {
        self.m
            .status
            .as_ref()
            .and_then(|s| s.migration_state.clone())
            .unwrap_or_default()
    }

    /// Sets the VMIM phase and migrationState, appending to `phaseTransitionTimestamps`.
    async fn set_phase(&mut self, phase: &str, ms: &MigrationState) -> Result<(), Error> {
        // The typed VMIM drops phaseTransitionTimestamps; read them untyped.
        let ar = ApiResource::erase::<VirtualMachineInstanceMigration>(&());
        let raw: Api<DynamicObject> = Api::namespaced_with(
            self.ctx.client.clone(),
            &self.m.namespace().unwrap_or_default(),
            &ar,
        );
        let mut stamps = raw
            .get(&self.name())
            .await?
            .data
            .pointer("/status/phaseTransitionTimestamps")
            .and_then(|v| v.as_array().cloned())
            .unwrap_or_default();
        stamps.push(json!({"phase": phase, "phaseTransitionTimestamp": now_rfc3339()}));
        self.m = self
            .vmims
            .patch_status(
                &self.name(),
                &PatchParams::default(),
                &Patch::Merge(json!({"status": {
                    "phase": phase,
                    "migrationState": ms,
                    "phaseTransitionTimestamps": stamps,
                }})),
            )
            .await?;
        tracing::info!(vmim = %format!("{}/{}", self.m.namespace().unwrap_or_default(), self.name()), phase, "migration phase");
        Ok(())
    }

    /// Replaces the VMI's migrationState (and, when given, moves it to `node`).
    async fn patch_vmi(
        &self,
        vmi: &str,
        ms: &MigrationState,
        node: Option<&str>,
    ) -> Result<VirtualMachineInstance, Error> {
        // One merge patch replacing migrationState whole: fields `ms` lacks are nulled (removed)
        // so nothing lingers from an earlier migration, and no watcher sees a half-written state.
        let mut state = serde_json::to_value(ms).map_err(|e| Error::Memory(e.to_string()))?;
        for key in [
            "sourceNode",
            "targetNode",
            "targetPod",
            "startTimestamp",
            "endTimestamp",
            "failureReason",
            "mode",
            "migrationUid",
            "abortRequested",
        ] {
            if state.get(key).is_none() {
                state[key] = serde_json::Value::Null;
            }
        }
        let mut status = json!({ "migrationState": state });
        if let Some(node) = node {
            self.vmis
                .patch(
                    vmi,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"labels": {VMI_NODE_LABEL: node}}})),
                )
                .await?;
            status["nodeName"] = json!(node);
        }
        Ok(self
            .vmis
            .patch_status(
                vmi,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": status })),
            )
            .await?)
    }

    async fn remove_finalizer(&mut self) -> Result<(), Error> {
        if !self.m.finalizers().iter().any(|f| f == VMIM_FINALIZER) {
            return Ok(());
        }
        let keep: Vec<&String> = self
            .m
            .finalizers()
            .iter()
            .filter(|f| *f != VMIM_FINALIZER)
            .collect();
        let r = self
            .vmims
            .patch(
                &self.name(),
                &PatchParams::default(),
                &Patch::Merge(json!({"metadata": {
                    "finalizers": keep,
                    "resourceVersion": self.m.resource_version(),
                }})),
            )
            .await;
        match r {
            Ok(m) => self.m = m,
            Err(kube::Error::Api(e)) if e.code == 404 => {}
            Err(e) => return Err(e.into()),
        }
        Ok(())
    }

    /// Ends the migration as failed: target pod and memory gone, VMI stays on the source.
    async fn fail(
        &mut self,
        vmi: Option<&VirtualMachineInstance>,
        reason: &str,
        abort: bool,
    ) -> Result<(), Error> {
        let target_pod = self.state().target_pod;
        if let Some(p) = &target_pod {
            ignore_404(self.pods.delete(p, &grace0()).await)?;
        }
        let mut ms = self.state();
        ms.failed = true;
        ms.completed = false;
        ms.failure_reason = Some(reason.to_string());
        ms.end_timestamp = Some(now_rfc3339());
        ms.migration_uid = Some(self.uid());
        if abort {
            ms.abort_requested = Some(true);
        }
        if let Some(vmi) = vmi {
            let vmi_ms = vmi.status.as_ref().and_then(|s| s.migration_state.as_ref());
            if vmi_ms.and_then(|m| m.migration_uid.as_deref()) == Some(&self.uid()) {
                let updated = self.patch_vmi(&vmi.name_any(), &ms, None).await?;
                self.ctx
                    .sync_memory(&updated, &wanted_nodes(&updated))
                    .await?;
            }
        }
        tracing::info!(vmim = %self.name(), reason, "migration failed");
        self.set_phase("Failed", &ms).await
    }

    /// Ends the migration as succeeded: the VMI runs on the target, the source pod is gone.
    async fn succeed(&mut self, vmi: &VirtualMachineInstance) -> Result<(), Error> {
        let mut ms = self.state();
        let vmi_ms = vmi
            .status
            .as_ref()
            .and_then(|s| s.migration_state.clone())
            .unwrap_or_default();
        let target = ms
            .target_node
            .clone()
            .ok_or_else(|| Error::Memory("running migration without target node".into()))?;
        ms.completed = true;
        ms.failed = false;
        ms.end_timestamp = if vmi_ms.migration_uid == Some(self.uid()) && vmi_ms.completed {
            vmi_ms.end_timestamp
        } else {
            None
        }
        .or_else(|| Some(now_rfc3339()));
        let updated = self.patch_vmi(&vmi.name_any(), &ms, Some(&target)).await?;
        // Delete the source launcher pod(s): the VMI's pods not on the target node.
        let uid = vmi.uid().unwrap_or_default();
        let launchers = self
            .pods
            .list(&ListParams::default().labels(&format!("{CREATED_BY_LABEL}={uid}")))
            .await?;
        for p in launchers.items {
            let node = p.spec.as_ref().and_then(|s| s.node_name.as_deref());
            if node != Some(target.as_str()) && Some(p.name_any()) != ms.target_pod {
                ignore_404(self.pods.delete(&p.name_any(), &grace0()).await)?;
            }
        }
        self.ctx
            .sync_memory(&updated, &wanted_nodes(&updated))
            .await?;
        self.set_phase("Succeeded", &ms).await
    }

    fn transfer(&self, vmi: &VirtualMachineInstance) -> Duration {
        if let Some(s) =
            injected(&self.m, vmi, ANN_TRANSFER_SECONDS).and_then(|v| v.parse::<f64>().ok())
        {
            return Duration::from_secs_f64(s.max(0.0));
        }
        let cfg = &self.ctx.cfg;
        let bytes = pods::vmi_memory_bytes(vmi) as f64;
        Duration::from_secs_f64((bytes / cfg.bandwidth_bytes_per_sec * cfg.time_scale).max(0.0))
    }

    async fn step(&mut self) -> Result<Next, Error> {
        let vmi_name = self.m.spec.vmi_name.clone();
        let Some(vmi) = self.vmis.get_opt(&vmi_name).await? else {
            let reason = format!("VirtualMachineInstance {vmi_name} does not exist");
            self.fail(None, &reason, false).await?;
            return Ok(Next::Step);
        };
        let phase = self.m.phase().unwrap_or("Pending").to_string();
        let uid = self.uid();
        match phase.as_str() {
            "Succeeded" | "Failed" => {
                self.remove_finalizer().await?;
                Ok(Next::Done(Action::await_change()))
            }
            "Pending" => {
                let st = vmi.status.clone().unwrap_or_default();
                let (Some("Running"), Some(source)) = (st.phase.as_deref(), st.node_name.clone())
                else {
                    self.fail(Some(&vmi), "VirtualMachineInstance is not running", false)
                        .await?;
                    return Ok(Next::Step);
                };
                if !vmi.condition_true(LIVE_MIGRATABLE) {
                    let why = st
                        .conditions
                        .iter()
                        .find(|c| c.r#type == LIVE_MIGRATABLE)
                        .and_then(|c| c.message.clone().or(c.reason.clone()))
                        .unwrap_or_else(|| "no LiveMigratable condition".into());
                    let reason = format!("VirtualMachineInstance is not live-migratable: {why}");
                    self.fail(Some(&vmi), &reason, false).await?;
                    return Ok(Next::Step);
                }
                if let Some(other) = st.migration_state.as_ref().filter(|m| {
                    m.migration_uid.as_deref() != Some(&uid) && !m.completed && !m.failed
                }) {
                    tracing::debug!(vmim = %self.name(), other = ?other.migration_uid, "another migration in progress; waiting");
                    if self.m.phase().is_none() {
                        self.set_phase("Pending", &MigrationState::default())
                            .await?;
                    }
                    return Ok(Next::Done(Action::requeue(Duration::from_secs(1))));
                }
                let never =
                    injected(&self.m, &vmi, ANN_TARGET_UNSCHEDULABLE).is_some_and(|v| v == "true");
                let pod = pods::target_pod(&vmi, &self.m, &self.ctx.cfg.launcher_image, never);
                let pp = PostParams {
                    field_manager: Some(FIELD_MANAGER.into()),
                    ..Default::default()
                };
                match self.pods.create(&pp, &pod).await {
                    Ok(_) => {}
                    Err(kube::Error::Api(e)) if e.code == 409 => {}
                    Err(e) => return Err(e.into()),
                }
                let ms = MigrationState {
                    source_node: Some(source),
                    target_pod: pod.metadata.name.clone(),
                    migration_uid: Some(uid),
                    mode: Some("PreCopy".into()),
                    ..Default::default()
                };
                self.patch_vmi(&vmi_name, &ms, None).await?;
                self.set_phase("Scheduling", &ms).await?;
                Ok(Next::Step)
            }
            "Scheduling" => {
                let mut ms = self.state();
                let pod_name = ms.target_pod.clone().unwrap_or_default();
                let Some(pod) = self.pods.get_opt(&pod_name).await? else {
                    let reason = format!("target pod {pod_name} disappeared");
                    self.fail(Some(&vmi), &reason, false).await?;
                    return Ok(Next::Step);
                };
                if let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    ms.target_node = Some(node);
                    self.patch_vmi(&vmi_name, &ms, None).await?;
                    self.set_phase("Scheduled", &ms).await?;
                    return Ok(Next::Step);
                }
                let created = pod
                    .metadata
                    .creation_timestamp
                    .as_ref()
                    .map(|t| t.0)
                    .unwrap_or_else(jiff_now);
                let age = (jiff_now().as_millisecond() - created.as_millisecond()).max(0) as u64;
                let timeout = self.ctx.cfg.unschedulable_timeout;
                if Duration::from_millis(age) >= timeout {
                    let why = pod
                        .status
                        .as_ref()
                        .and_then(|s| s.conditions.as_ref())
                        .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"))
                        .and_then(|c| c.message.clone())
                        .unwrap_or_default();
                    let reason = format!(
                        "target pod {pod_name} unschedulable for {}s: {why}",
                        timeout.as_secs()
                    );
                    self.fail(Some(&vmi), &reason, false).await?;
                    return Ok(Next::Step);
                }
                let left = timeout - Duration::from_millis(age);
                Ok(Next::Done(Action::requeue(left.min(self.ctx.cfg.resync))))
            }
            "Scheduled" => {
                let ms = self.state();
                if let Some(pod) = self
                    .pods
                    .get_opt(ms.target_pod.as_deref().unwrap_or_default())
                    .await?
                {
                    mark_pod_running(&self.pods, &pod).await?;
                }
                self.set_phase("PreparingTarget", &ms).await?;
                Ok(Next::Step)
            }
            "PreparingTarget" => {
                if !self.ctx.sync_memory(&vmi, &wanted_nodes(&vmi)).await? {
                    return Ok(Next::Done(Action::requeue(Duration::from_millis(100))));
                }
                let ms = self.state();
                self.set_phase("TargetReady", &ms).await?;
                Ok(Next::Step)
            }
            "TargetReady" => {
                let mut ms = self.state();
                ms.start_timestamp = Some(now_rfc3339());
                self.patch_vmi(&vmi_name, &ms, None).await?;
                self.set_phase("Running", &ms).await?;
                Ok(Next::Step)
            }
            "Running" => {
                let ms = self.state();
                let vmi_ms = vmi.status.as_ref().and_then(|s| s.migration_state.as_ref());
                if vmi_ms.is_some_and(|m| m.migration_uid.as_deref() == Some(&uid) && m.completed) {
                    // A previous run moved the VMI and stopped before finishing up.
                    self.succeed(&vmi).await?;
                    return Ok(Next::Step);
                }
                let start = ms
                    .start_timestamp
                    .as_deref()
                    .and_then(parse_ts)
                    .unwrap_or_else(chrono::Utc::now);
                let elapsed = (chrono::Utc::now() - start).to_std().unwrap_or_default();
                let total = self.transfer(&vmi);
                let mut deadline = total;
                if let Some(pct) =
                    injected(&self.m, &vmi, ANN_FAIL_AT_PERCENT).and_then(|v| v.parse::<f64>().ok())
                {
                    let at = total.mul_f64((pct / 100.0).clamp(0.0, 1.0));
                    if elapsed >= at {
                        let reason = injected(&self.m, &vmi, ANN_FAILURE_REASON)
                            .unwrap_or("injected failure")
                            .to_string();
                        self.fail(Some(&vmi), &reason, false).await?;
                        return Ok(Next::Step);
                    }
                    deadline = at;
                }
                if elapsed >= total {
                    self.succeed(&vmi).await?;
                    return Ok(Next::Step);
                }
                Ok(Next::Done(Action::requeue(deadline - elapsed)))
            }
            other => {
                tracing::warn!(vmim = %self.name(), phase = other, "unknown phase; leaving it");
                Ok(Next::Done(Action::await_change()))
            }
        }
    }
}

fn jiff_now() -> k8s_openapi::jiff::Timestamp {
    k8s_openapi::jiff::Timestamp::now()
}

pub(crate) async fn reconcile(
    vmim: Arc<VirtualMachineInstanceMigration>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = vmim.namespace().unwrap_or_default();
    let mut mig = Migration {
        vmims: ctx.api(&ns),
        vmis: ctx.api(&ns),
        pods: ctx.api(&ns),
        m: (*vmim).clone(),
        ctx,
    };
    let has_finalizer = vmim.finalizers().iter().any(|f| f == VMIM_FINALIZER);
    if vmim.metadata.deletion_timestamp.is_some() {
        if has_finalizer {
            if !vmim.is_final() {
                let vmi = mig.vmis.get_opt(&vmim.spec.vmi_name).await?;
                mig.fail(vmi.as_ref(), ABORTED_REASON, true).await?;
            }
            mig.remove_finalizer().await?;
        }
        return Ok(Action::await_change());
    }
    if vmim.is_final() {
        mig.remove_finalizer().await?;
        return Ok(Action::await_change());
    }
    if !has_finalizer {
        mig.m = super::add_vmim_finalizer(&mig.vmims, &vmim).await?;
    }
    // Walk as far as the world allows now; each phase is its own write, so watchers see all.
    for _ in 0..16 {
        match mig.step().await? {
            Next::Step => continue,
            Next::Done(a) => return Ok(a),
        }
    }
    Ok(Action::requeue(Duration::from_millis(100)))
}
