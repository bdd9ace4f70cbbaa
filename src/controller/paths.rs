//! Extra migration paths in the cluster: choose them with the planning core's loop,
//! activate them (claim the MigrationNetwork, apply nmstate policies where needed, raise the
//! migration's bandwidth with a per-migration KubeVirt MigrationPolicy that selects only this
//! VMI), and remove every trace afterwards, whatever the outcome. Every object is named after
//! the request, so a restarted controller finds and cleans up what an earlier one created.

use std::collections::BTreeMap;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};

use super::error::Result;
use super::labels;
use super::validate::{self, MigrationBudget};
use super::Context;
use crate::api::kubevirt::{
    MigrationPolicy, MigrationPolicySelectors, MigrationPolicySpec, NncpSpec,
    NodeNetworkConfigurationPolicy, VirtualMachineInstance, HOSTNAME_LABEL,
};
use crate::api::migration::{PathUseStatus, VirtualMachineMigrationStatus};
use crate::api::network::Activation;
use crate::api::{MigrationNetwork, VirtualMachineMigration, FIELD_MANAGER};
use crate::plan::estimate::EstimateInput;
use crate::plan::paths::{choose_paths, PathBudget, PathDecision, PathOption};
use crate::plan::{NodeFacts, Plan};
use crate::view::quantity;

/// Label on every object created for one request's paths, and on its VMI while it migrates.
pub const PATH_OWNER_LABEL: &str = "commonground.dev/migration-paths";

/// Short deterministic id of a request (a valid label value and object name).
pub fn path_owner_id(vmm: &VirtualMachineMigration) -> String {
    labels::owner_id(&vmm.metadata)
}

fn who(vmm: &VirtualMachineMigration) -> String {
    format!("{}/{}", vmm.namespace().unwrap_or_default(), vmm.name_any())
}

fn now() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true)
}

fn on_node(network: &MigrationNetwork, node: Option<&NodeFacts>) -> bool {
    node.is_some_and(|n| {
        network
            .spec
            .node_selector
            .iter()
            .all(|(k, v)| n.labels.get(k) == Some(v))
    })
}

/// Runs the path loop for this plan when the request has a time budget. Also returns a note
/// for every MigrationNetwork left out because its spec cannot be used.
pub fn decide(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    budget: &MigrationBudget,
    plan: &Plan,
    base: &EstimateInput,
    cores_per_gbps: f64,
) -> (
    Option<std::result::Result<PathDecision, String>>,
    Vec<String>,
) {
    let Some(max) = budget.max_duration else {
        return (None, Vec::new());
    };
    let max_seconds = max.as_secs_f64();
    let setup_seconds = budget.path_setup_budget.map_or(30.0, |d| d.as_secs_f64());
    let planner = ctx.view.planner(false);
    let facts = |name: &str| {
        planner
            .node_position(name)
            .map(|i| &planner.snapshot().nodes[i])
    };
    let target = plan.target_node.as_deref().and_then(facts);
    let source = facts(&plan.source_node);
    let me = who(vmm);
    let mut ignored = Vec::new();
    let options: Vec<PathOption> = ctx
        .view
        .networks
        .state()
        .iter()
        .filter_map(|n| match validate::network_spec(&n.spec) {
            Ok(figures) => Some((n, figures)),
            Err(e) => {
                ignored.push(format!("MigrationNetwork {} left out: {e}", n.name_any()));
                None
            }
        })
        .map(|(n, figures)| PathOption {
            name: n.name_any(),
            bandwidth: figures.bandwidth as f64,
            setup_seconds: figures.setup_time.as_secs_f64(),
            on_source: on_node(n, source),
            on_target: on_node(n, target),
            in_use: n
                .status
                .as_ref()
                .and_then(|s| s.in_use_by.as_deref())
                .is_some_and(|u| u != me),
        })
        .collect();
    // The VM's own CPU lands on the target with it: not spare for extra streams.
    let vm_cpu = ctx.view.launcher_cpu_millis(&plan.vm).unwrap_or(0);
    let spare_cores = target.map_or(0.0, |t| {
        crate::plan::paths::target_spare_cores(t.free().cpu_millis, vm_cpu)
    });
    let budget = PathBudget {
        max_seconds,
        setup_seconds,
        target_spare_cores: spare_cores,
        cores_per_gbps,
    };
    (
        Some(choose_paths(base, &options, &budget).map_err(|e| e.to_string())),
        ignored,
    )
}

/// Brings the decided paths up; true once every path is usable and the bandwidth raised.
pub async fn activate(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    status: &mut VirtualMachineMigrationStatus,
    decision: &PathDecision,
    source: &str,
    target: &str,
) -> Result<bool> {
    if decision.added.is_empty() {
        return Ok(true);
    }
    let owner = path_owner_id(vmm);
    let me = who(vmm);
    let ns = vmm.namespace().unwrap_or_default();
    let networks: Api<MigrationNetwork> = Api::all(ctx.client.clone());
    let nncps: Api<NodeNetworkConfigurationPolicy> = Api::all(ctx.client.clone());
    let mut all_ready = true;
    for name in &decision.added {
        let Some(network) = ctx
            .view
            .networks
            .get(&kube::runtime::reflector::ObjectRef::new(name))
        else {
            continue;
        };
        if !status.paths.iter().any(|p| &p.network == name) {
            status.paths.push(PathUseStatus {
                network: name.clone(),
                bandwidth_bytes_per_second: quantity::bytes(&network.spec.bandwidth).unwrap_or(0)
                    as f64,
                added_time: Some(now()),
                ready_time: None,
                removed_time: None,
            });
        }
        // Claim the path.
        let claim = serde_json::json!({
            "apiVersion": "commonground.dev/v1alpha1", "kind": "MigrationNetwork",
            "status": {"inUseBy": me, "since": now()}
        });
        if network.status.as_ref().and_then(|s| s.in_use_by.as_deref()) != Some(me.as_str()) {
            networks
                .patch_status(
                    name,
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&claim),
                )
                .await?;
        }
        let ready = match network.spec.activation {
            Activation::Preattached => true,
            Activation::Nmstate => {
                let mut ready = true;
                for (side, node) in [("src", source), ("dst", target)] {
                    let nncp_name = labels::bounded_name(&format!("{owner}-{name}-{side}"));
                    let existing = nncps.get_opt(&nncp_name).await?;
                    match existing {
                        None => {
                            let mut p = NodeNetworkConfigurationPolicy::new(
                                &nncp_name,
                                NncpSpec {
                                    node_selector: Some(
                                        [(HOSTNAME_LABEL.to_string(), node.to_string())].into(),
                                    ),
                                    desired_state: serde_json::json!({"interfaces": [{
                                        "name": network.spec.bond.clone().unwrap_or_else(|| "migration0".into()),
                                        "type": "bond",
                                        "state": "up",
                                        "link-aggregation": {"mode": "balance-rr", "port": [network.spec.interface.clone().unwrap_or_default()]}
                                    }]}),
                                },
                            );
                            let (l, a) = labels::owner_marks(PATH_OWNER_LABEL, &vmm.metadata);
                            (p.metadata.labels, p.metadata.annotations) = (Some(l), Some(a));
                            match nncps.create(&PostParams::default(), &p).await {
                                Ok(_) => {}
                                Err(kube::Error::Api(e)) if e.code == 409 => {}
                                Err(e) => return Err(e.into()),
                            }
                            ready = false;
                        }
                        Some(p) => {
                            let available = p.status.as_ref().is_some_and(|s| {
                                s.conditions
                                    .iter()
                                    .any(|c| c.r#type == "Available" && c.status == "True")
                            });
                            ready &= available;
                        }
                    }
                }
                ready
            }
        };
        if ready {
            if let Some(p) = status.paths.iter_mut().find(|p| &p.network == name) {
                p.ready_time.get_or_insert_with(now);
            }
        }
        all_ready &= ready;
    }
    if !all_ready {
        return Ok(false);
    }
    // Make the bandwidth real for KubeVirt: a MigrationPolicy for this VMI only.
    let policies: Api<MigrationPolicy> = Api::all(ctx.client.clone());
    if policies.get_opt(&owner).await?.is_none() {
        let mut policy = MigrationPolicy::new(
            &owner,
            MigrationPolicySpec {
                selectors: MigrationPolicySelectors {
                    virtual_machine_instance_selector: Some(
                        [(PATH_OWNER_LABEL.to_string(), owner.clone())].into(),
                    ),
                    namespace_selector: None,
                },
                bandwidth_per_migration: Some(format!(
                    "{}Mi",
                    (decision.bandwidth / (1u64 << 20) as f64).floor() as u64
                )),
                ..Default::default()
            },
        );
        let (l, a) = labels::owner_marks(PATH_OWNER_LABEL, &vmm.metadata);
        (policy.metadata.labels, policy.metadata.annotations) = (Some(l), Some(a));
        match policies.create(&PostParams::default(), &policy).await {
            Ok(_) => {}
            Err(kube::Error::Api(e)) if e.code == 409 => {}
            Err(e) => return Err(e.into()),
        }
    }
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
    let label: BTreeMap<&str, &str> = [(PATH_OWNER_LABEL, owner.as_str())].into();
    vmis.patch(
        &vmm.spec.vmi_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": label}})),
    )
    .await?;
    Ok(true)
}

/// Removes every path object of this request and releases its claims. Idempotent.
pub async fn cleanup(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    status: &mut VirtualMachineMigrationStatus,
) -> Result<()> {
    if status.paths.iter().all(|p| p.removed_time.is_some()) {
        return Ok(());
    }
    let owner = path_owner_id(vmm);
    let me = who(vmm);
    let selector =
        ListParams::default().labels(&labels::owner_selector(PATH_OWNER_LABEL, &vmm.metadata));
    let nncps: Api<NodeNetworkConfigurationPolicy> = Api::all(ctx.client.clone());
    for p in nncps.list(&selector).await? {
        let _ = nncps.delete(&p.name_any(), &DeleteParams::default()).await;
    }
    let policies: Api<MigrationPolicy> = Api::all(ctx.client.clone());
    match policies.delete(&owner, &DeleteParams::default()).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let vmis: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &vmm.namespace().unwrap_or_default());
    match vmis
        .patch(
            &vmm.spec.vmi_name,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"metadata": {"labels": {PATH_OWNER_LABEL: null}}})),
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 404 => {}
        Err(e) => return Err(e.into()),
    }
    let networks: Api<MigrationNetwork> = Api::all(ctx.client.clone());
    for n in ctx.view.networks.state() {
        if n.status.as_ref().and_then(|s| s.in_use_by.as_deref()) == Some(me.as_str()) {
            // Applying an empty status with our manager drops the fields we own.
            let release = serde_json::json!({
                "apiVersion": "commonground.dev/v1alpha1", "kind": "MigrationNetwork", "status": {}
            });
            networks
                .patch_status(
                    &n.name_any(),
                    &PatchParams::apply(FIELD_MANAGER).force(),
                    &Patch::Apply(&release),
                )
                .await?;
        }
    }
    let t = now();
    for p in &mut status.paths {
        p.removed_time.get_or_insert_with(|| t.clone());
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::migration::VirtualMachineMigrationSpec;

    #[test]
    fn owner_id_is_a_valid_stable_label_value() {
        let mut v = VirtualMachineMigration::new(
            "x",
            VirtualMachineMigrationSpec {
                vmi_name: "vm".into(),
                target: None,
                max_duration: None,
                path_setup_budget: None,
                group: None,
                dry_run: false,
            },
        );
        v.metadata.uid = Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789".into());
        let id = path_owner_id(&v);
        assert_eq!(id, "cg-0a1b2c3d4e5f6789");
        assert!(id.len() <= 63);
    }
}
