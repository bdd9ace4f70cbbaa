//! Extra migration paths in the cluster: choose them with the planning core's loop,
//! activate them (claim the MigrationNetwork, apply nmstate policies where needed, raise the
//! migration's bandwidth with a per-migration KubeVirt MigrationPolicy that selects only this
//! VMI), and remove every trace afterwards, whatever the outcome. Every object is named after
//! the request, so a restarted controller finds and cleans up what an earlier one created.

use std::collections::BTreeMap;

use kube::api::{DeleteParams, ListParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
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
use crate::api::{time, write};
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
    // Measured idle CPU, where the target's agent publishes it, over what requests leave.
    let spare_cores = target.map_or(0.0, |t| {
        crate::plan::paths::target_spare_cores(
            t.free().cpu_millis,
            ctx.view.measured_idle_cores(&t.name),
            vm_cpu,
        )
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
    let mut all_ready = true;
    for name in &decision.added {
        let Some(network) = ctx.view.networks.get(&ObjectRef::new(name)) else {
            continue;
        };
        record_path(status, &network);
        claim(ctx, vmm, &network).await?;
        let ready = match network.spec.activation {
            Activation::Preattached => true,
            Activation::Nmstate => {
                let mut ready = true;
                for (side, node) in [("src", source), ("dst", target)] {
                    ready &= nmstate_ready(ctx, vmm, &network, side, node).await?;
                }
                ready
            }
        };
        if ready {
            if let Some(p) = status.paths.iter_mut().find(|p| &p.network == name) {
                p.ready_time.get_or_insert_with(time::now_rfc3339);
            }
        }
        all_ready &= ready;
    }
    if all_ready {
        raise_bandwidth(ctx, vmm, decision.bandwidth).await?;
    }
    Ok(all_ready)
}

/// Records in the request's status that this path is being added (once).
fn record_path(status: &mut VirtualMachineMigrationStatus, network: &MigrationNetwork) {
    let name = network.name_any();
    if !status.paths.iter().any(|p| p.network == name) {
        status.paths.push(PathUseStatus {
            network: name,
            bandwidth_bytes_per_second: quantity::bytes(&network.spec.bandwidth).unwrap_or(0)
                as f64,
            added_time: Some(time::now_rfc3339()),
            ready_time: None,
            removed_time: None,
        });
    }
}

/// Claims the path for this request in the MigrationNetwork's status (when not ours yet).
async fn claim(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    network: &MigrationNetwork,
) -> Result<()> {
    let me = who(vmm);
    if network.status.as_ref().and_then(|s| s.in_use_by.as_deref()) == Some(me.as_str()) {
        return Ok(());
    }
    let networks: Api<MigrationNetwork> = Api::all(ctx.client.clone());
    let claim = serde_json::json!({"inUseBy": me, "since": time::now_rfc3339()});
    write::apply_status(&networks, FIELD_MANAGER, &network.name_any(), &claim).await?;
    Ok(())
}

/// The nmstate policy that adds the path's interface to the migration bond on one node:
/// made when missing (not ready yet), ready once nmstate reports it `Available`.
async fn nmstate_ready(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    network: &MigrationNetwork,
    side: &str,
    node: &str,
) -> Result<bool> {
    let nncps: Api<NodeNetworkConfigurationPolicy> = Api::all(ctx.client.clone());
    let owner = path_owner_id(vmm);
    let nncp_name = labels::bounded_name(&format!("{owner}-{}-{side}", network.name_any()));
    if let Some(p) = nncps.get_opt(&nncp_name).await? {
        return Ok(p.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == "Available" && c.status == "True")
        }));
    }
    let mut p = NodeNetworkConfigurationPolicy::new(
        &nncp_name,
        NncpSpec {
            node_selector: Some([(HOSTNAME_LABEL.to_string(), node.to_string())].into()),
            desired_state: serde_json::json!({"interfaces": [{
                "name": network.spec.bond.clone().unwrap_or_else(|| "migration0".into()),
                "type": "bond",
                "state": "up",
                "link-aggregation": {
                    "mode": "balance-rr",
                    "port": [network.spec.interface.clone().unwrap_or_default()]
                }
            }]}),
        },
    );
    let (l, a) = labels::owner_marks(PATH_OWNER_LABEL, &vmm.metadata);
    (p.metadata.labels, p.metadata.annotations) = (Some(l), Some(a));
    write::create_or_exists(&nncps, &p).await?;
    Ok(false)
}

/// Makes the bandwidth real for KubeVirt: a MigrationPolicy that selects only this VMI (by
/// the request's label, set on the VMI here) and raises its `bandwidthPerMigration`.
async fn raise_bandwidth(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    bandwidth: f64,
) -> Result<()> {
    let owner = path_owner_id(vmm);
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
                    (bandwidth / (1u64 << 20) as f64).floor() as u64
                )),
                ..Default::default()
            },
        );
        let (l, a) = labels::owner_marks(PATH_OWNER_LABEL, &vmm.metadata);
        (policy.metadata.labels, policy.metadata.annotations) = (Some(l), Some(a));
        write::create_or_exists(&policies, &policy).await?;
    }
    let vmis: Api<VirtualMachineInstance> =
        Api::namespaced(ctx.client.clone(), &vmm.namespace().unwrap_or_default());
    let label: BTreeMap<&str, &str> = [(PATH_OWNER_LABEL, owner.as_str())].into();
    vmis.patch(
        &vmm.spec.vmi_name,
        &PatchParams::default(),
        &Patch::Merge(serde_json::json!({"metadata": {"labels": label}})),
    )
    .await?;
    Ok(())
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
        write::delete_ignore_missing(&nncps, &p.name_any(), &DeleteParams::default()).await?;
    }
    let policies: Api<MigrationPolicy> = Api::all(ctx.client.clone());
    write::delete_ignore_missing(&policies, &owner, &DeleteParams::default()).await?;
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
        Err(e) if !write::is_status(&e, 404) => return Err(e.into()),
        _ => {}
    }
    let networks: Api<MigrationNetwork> = Api::all(ctx.client.clone());
    for n in ctx.view.networks.state() {
        if n.status.as_ref().and_then(|s| s.in_use_by.as_deref()) == Some(me.as_str()) {
            // Applying an empty status with our manager drops the fields we own.
            write::apply_status(
                &networks,
                FIELD_MANAGER,
                &n.name_any(),
                &serde_json::json!({}),
            )
            .await?;
        }
    }
    let t = time::now_rfc3339();
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
                follow_deadline: None,
                group: None,
                dry_run: false,
                max_attempts: None,
                unschedulable_timeout: None,
            },
        );
        v.metadata.uid = Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789".into());
        let id = path_owner_id(&v);
        assert_eq!(id, "cg-0a1b2c3d4e5f6789");
        assert!(id.len() <= 63);
    }
}
