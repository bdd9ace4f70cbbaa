//! VMI reconciler: start (virt-launcher pod, scheduling, Running) and keep running.

use std::collections::BTreeSet;
use std::sync::Arc;
use std::time::Duration;

use commonground::api::kubevirt::{VirtualMachineInstance, CREATED_BY_LABEL, LIVE_MIGRATABLE};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};
use serde_json::json;

use super::{now_rfc3339, pods, Ctx, Error, ANN_NOT_MIGRATABLE, FIELD_MANAGER, VMI_NODE_LABEL};

/// Nodes that should hold the VMI's memory: where it runs, plus a migration target once chosen.
pub(crate) fn wanted_nodes(vmi: &VirtualMachineInstance) -> BTreeSet<String> {
    let mut out = BTreeSet::new();
    let Some(st) = &vmi.status else {
        return out;
    };
    if st.phase.as_deref() != Some("Running") {
        return out;
    }
    if let Some(n) = &st.node_name {
        out.insert(n.clone());
    }
    if let Some(ms) = &st.migration_state {
        if !ms.completed && !ms.failed {
            if let Some(t) = &ms.target_node {
                out.insert(t.clone());
            }
        }
    }
    out
}

/// Pods have no kubelet here: once bound, the stand-in reports them running.
pub(crate) async fn mark_pod_running(pods: &Api<Pod>, pod: &Pod) -> Result<(), Error> {
    let running = pod
        .status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .is_some_and(|p| p == "Running");
    if running
        || pod
            .spec
            .as_ref()
            .and_then(|s| s.node_name.as_ref())
            .is_none()
    {
        return Ok(());
    }
    let now = now_rfc3339();
    let cond = |t: &str| json!({"type": t, "status": "True", "lastTransitionTime": now});
    pods.patch_status(
        &pod.name_any(),
        &PatchParams::default(),
        &Patch::Strategic(json!({"status": {
            "phase": "Running",
            "startTime": now,
            "conditions": [cond("Initialized"), cond("ContainersReady"), cond("Ready")],
        }})),
    )
    .await?;
    Ok(())
}

fn conditions(vmi: &VirtualMachineInstance) -> serde_json::Value {
    let now = now_rfc3339();
    let migratable = vmi
        .annotations()
        .get(ANN_NOT_MIGRATABLE)
        .is_none_or(|v| v != "true");
    let live = if migratable {
        json!({"type": LIVE_MIGRATABLE, "status": "True", "lastTransitionTime": now})
    } else {
        json!({"type": LIVE_MIGRATABLE, "status": "False", "reason": "DisksNotLiveMigratable",
               "message": format!("not migratable (annotation {ANN_NOT_MIGRATABLE})"),
               "lastTransitionTime": now})
    };
    json!([{"type": "Ready", "status": "True", "lastTransitionTime": now}, live])
}

pub(crate) async fn reconcile(
    vmi: Arc<VirtualMachineInstance>,
    ctx: Arc<Ctx>,
) -> Result<Action, Error> {
    let ns = vmi.namespace().unwrap_or_default();
    let name = vmi.name_any();
    if vmi.metadata.deletion_timestamp.is_some() {
        ctx.sync_memory(&vmi, &BTreeSet::new()).await?;
        return Ok(Action::await_change());
    }
    let pods: Api<Pod> = ctx.api(&ns);
    let vmis: Api<VirtualMachineInstance> = ctx.api(&ns);
    let status = vmi.status.clone().unwrap_or_default();
    let uid = vmi.uid().unwrap_or_default();

    match (status.phase.as_deref(), status.node_name.as_deref()) {
        (Some("Running"), Some(node)) => {
            let launchers = pods
                .list(&ListParams::default().labels(&format!("{CREATED_BY_LABEL}={uid}")))
                .await?;
            for p in launchers
                .items
                .iter()
                .filter(|p| p.spec.as_ref().and_then(|s| s.node_name.as_deref()) == Some(node))
            {
                mark_pod_running(&pods, p).await?;
            }
            let want = conditions(&vmi);
            let want_live = want[1]["status"].as_str();
            let have_live = status
                .conditions
                .iter()
                .find(|c| c.r#type == LIVE_MIGRATABLE)
                .map(|c| c.status.as_str());
            if want_live != have_live {
                vmis.patch_status(
                    &name,
                    &PatchParams::default(),
                    &Patch::Merge(json!({"status": {"conditions": want}})),
                )
                .await?;
            }
            let ready = ctx.sync_memory(&vmi, &wanted_nodes(&vmi)).await?;
            let next = if ready {
                ctx.cfg.resync
            } else {
                Duration::from_millis(200)
            };
            return Ok(Action::requeue(next));
        }
        (Some("Succeeded" | "Failed"), _) => return Ok(Action::await_change()),
        _ => {}
    }

    // Starting: ensure the virt-launcher pod, wait for kube-scheduler to bind it.
    let pod_name = pods::launcher_pod_name(&vmi);
    let pod = match pods.get_opt(&pod_name).await? {
        Some(p) => p,
        None => {
            let pod = pods::launcher_pod(&vmi, &ctx.cfg.launcher_image);
            let pp = PostParams {
                field_manager: Some(FIELD_MANAGER.into()),
                ..Default::default()
            };
            match pods.create(&pp, &pod).await {
                Ok(p) => {
                    tracing::info!(vmi = %format!("{ns}/{name}"), pod = %pod_name, "created virt-launcher pod");
                    p
                }
                Err(kube::Error::Api(e)) if e.code == 409 => pods.get(&pod_name).await?,
                Err(e) => return Err(e.into()),
            }
        }
    };
    let Some(node) = pod.spec.as_ref().and_then(|s| s.node_name.clone()) else {
        let pod_cond = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|cs| cs.iter().find(|c| c.type_ == "PodScheduled"));
        let have = status
            .conditions
            .iter()
            .find(|c| c.r#type == "PodScheduled")
            .map(|c| (c.status.clone(), c.reason.clone()));
        let want = pod_cond.map(|c| (c.status.clone(), c.reason.clone()));
        if status.phase.as_deref() != Some("Scheduling") || have != want {
            let mut st = json!({"phase": "Scheduling"});
            if let Some(c) = pod_cond {
                st["conditions"] = json!([{"type": "PodScheduled", "status": c.status,
                    "reason": c.reason, "message": c.message}]);
            }
            vmis.patch_status(
                &name,
                &PatchParams::default(),
                &Patch::Merge(json!({ "status": st })),
            )
            .await?;
        }
        // The pod watch triggers as soon as kube-scheduler binds it.
        return Ok(Action::requeue(ctx.cfg.resync));
    };

    mark_pod_running(&pods, &pod).await?;
    let wanted = BTreeSet::from([node.clone()]);
    if !ctx.sync_memory(&vmi, &wanted).await? {
        return Ok(Action::requeue(Duration::from_millis(100)));
    }
    vmis.patch(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {VMI_NODE_LABEL: node}}})),
    )
    .await?;
    vmis.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {
            "phase": "Running",
            "nodeName": node,
            "conditions": conditions(&vmi),
        }})),
    )
    .await?;
    tracing::info!(vmi = %format!("{ns}/{name}"), %node, "VMI running");
    Ok(Action::requeue(ctx.cfg.resync))
}
