//! Extra migration paths in the cluster: choose them with the planning core's loop,
//! activate them (claim the MigrationNetwork, raise the migration's bandwidth with a
//! per-migration KubeVirt MigrationPolicy that selects only this VMI), and remove every trace
//! afterwards, whatever the outcome. Every object is named after the request, so a restarted
//! controller finds and cleans up what an earlier one created.
//!
//! Paths are networks the nodes already have (`activation: Preattached`). commonground never
//! edits a node's network: the removed `Nmstate` activation rewrote a migration bond's port
//! list through nmstate, which replaces the list (dropping the ports already in it), let two
//! paths on one node write over one bond, and was not undone by deleting the policy.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::Namespace;
use kube::api::{DeleteParams, Patch, PatchParams};
use kube::runtime::reflector::ObjectRef;
use kube::{Api, ResourceExt};

use super::error::Result;
use super::labels;
use super::validate::{self, MigrationBudget, NetworkFigures};
use super::Context;
use crate::api::kubevirt::{MigrationPolicy, MigrationPolicySpec, VirtualMachineInstance};
use crate::api::migration::{PathUseStatus, VirtualMachineMigrationStatus};
use crate::api::network::{Activation, MigrationNetworkSpec};
use crate::api::{time, write};
use crate::api::{MigrationNetwork, VirtualMachineMigration, FIELD_MANAGER};
use crate::plan::estimate::EstimateInput;
use crate::plan::paths::{choose_paths, PathBudget, PathDecision, PathOption};
use crate::plan::{NodeFacts, Plan};
use crate::view::{bandwidth, quantity};

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
        .filter_map(|n| match usable(&n.spec) {
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

/// The figures of a path the controller can use, or why it cannot.
fn usable(spec: &MigrationNetworkSpec) -> std::result::Result<NetworkFigures, String> {
    if spec.activation != Activation::Preattached {
        return Err(format!(
            "spec.activation {:?} is no longer supported (commonground does not edit a node's \
             network); attach the network on the nodes and use Preattached",
            spec.activation
        ));
    }
    validate::network_spec(spec).map_err(|e| e.to_string())
}

/// Brings the decided paths up; true once every path is usable and the bandwidth raised.
pub async fn activate(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    status: &mut VirtualMachineMigrationStatus,
    decision: &PathDecision,
) -> Result<bool> {
    if decision.added.is_empty() {
        return Ok(true);
    }
    for name in &decision.added {
        let Some(network) = ctx.view.networks.get(&ObjectRef::new(name)) else {
            continue;
        };
        record_path(status, &network);
        claim(ctx, vmm, &network).await?;
        // A preattached path is usable once claimed.
        if let Some(p) = status.paths.iter_mut().find(|p| &p.network == name) {
            p.ready_time.get_or_insert_with(time::now_rfc3339);
        }
    }
    raise_bandwidth(ctx, vmm, decision.bandwidth).await?;
    Ok(true)
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

/// The per-migration policy's spec: the settings of the administrator's policy KubeVirt
/// would otherwise apply to the VMI (`admin`), with only the bandwidth changed. Its selectors
/// are that policy's plus the request's label on the VMI, one label more than any policy that
/// applies to the VMI, so KubeVirt, which takes the policy matching the most labels, takes it.
pub fn path_policy_spec(
    admin: Option<&MigrationPolicySpec>,
    owner: &str,
    bandwidth: f64,
) -> MigrationPolicySpec {
    let mut spec = admin.cloned().unwrap_or_default();
    spec.selectors
        .virtual_machine_instance_selector
        .get_or_insert_with(BTreeMap::new)
        .insert(PATH_OWNER_LABEL.to_string(), owner.to_string());
    spec.bandwidth_per_migration = Some(format!(
        "{}Mi",
        (bandwidth / (1u64 << 20) as f64).floor() as u64
    ));
    spec
}

/// Makes the bandwidth real for KubeVirt: a MigrationPolicy that selects only this VMI (by
/// the request's label, set on the VMI here) and raises its `bandwidthPerMigration`, keeping
/// every other setting of the administrator's policy it displaces for this migration.
async fn raise_bandwidth(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    bandwidth: f64,
) -> Result<()> {
    let owner = path_owner_id(vmm);
    let namespace = vmm.namespace().unwrap_or_default();
    let policies: Api<MigrationPolicy> = Api::all(ctx.client.clone());
    if policies.get_opt(&owner).await?.is_none() {
        let namespaces: Api<Namespace> = Api::all(ctx.client.clone());
        let namespace_labels = namespaces
            .get_opt(&namespace)
            .await?
            .and_then(|n| n.metadata.labels);
        let vmi_labels = ctx
            .view
            .vmi(&namespace, &vmm.spec.vmi_name)
            .and_then(|v| v.metadata.labels.clone())
            .unwrap_or_default();
        let known = ctx.view.policies.state();
        let admin = bandwidth::applicable_policy(
            &vmi_labels,
            namespace_labels.as_ref(),
            known.iter().map(|p| &**p),
        );
        let mut policy = MigrationPolicy::new(
            &owner,
            path_policy_spec(admin.map(|p| &p.spec), &owner, bandwidth),
        );
        let (l, a) = labels::owner_marks(PATH_OWNER_LABEL, &vmm.metadata);
        (policy.metadata.labels, policy.metadata.annotations) = (Some(l), Some(a));
        write::create_or_exists(&policies, &policy).await?;
    }
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &namespace);
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

    fn admin_policy() -> MigrationPolicySpec {
        serde_json::from_value(serde_json::json!({
            "selectors": {"virtualMachineInstanceSelector": {"tier": "db"},
                          "namespaceSelector": {"team": "a"}},
            "bandwidthPerMigration": "64Mi",
            "completionTimeoutPerGiB": 300,
            "allowAutoConverge": true,
            "allowWorkloadDisruption": true
        }))
        .unwrap()
    }

    #[test]
    fn the_path_policy_keeps_the_administrators_settings_and_changes_only_the_bandwidth() {
        let admin = admin_policy();
        let ours = path_policy_spec(Some(&admin), "cg-1", 3.0 * (1u64 << 30) as f64);
        assert_eq!(ours.bandwidth_per_migration.as_deref(), Some("3072Mi"));
        assert_eq!(ours.completion_timeout_per_gi_b, Some(300));
        assert_eq!(ours.allow_auto_converge, Some(true));
        assert_eq!(
            ours.other.get("allowWorkloadDisruption"),
            Some(&serde_json::json!(true))
        );
        assert_eq!(
            ours.selectors.namespace_selector,
            admin.selectors.namespace_selector
        );
        let vmi_sel = ours.selectors.virtual_machine_instance_selector.unwrap();
        assert_eq!(vmi_sel.get("tier").map(String::as_str), Some("db"));
        assert_eq!(
            vmi_sel.get(PATH_OWNER_LABEL).map(String::as_str),
            Some("cg-1")
        );
        // Without an administrator's policy: the VMI's label and the bandwidth only.
        let alone = path_policy_spec(None, "cg-1", (1u64 << 30) as f64);
        assert_eq!(alone.completion_timeout_per_gi_b, None);
        assert_eq!(alone.bandwidth_per_migration.as_deref(), Some("1024Mi"));
        assert_eq!(
            alone
                .selectors
                .virtual_machine_instance_selector
                .unwrap()
                .len(),
            1
        );
    }

    #[test]
    fn kubevirt_takes_the_path_policy_over_the_one_it_displaces() {
        let mut admin = MigrationPolicy::new("admin", admin_policy());
        admin.metadata.labels = None;
        let mut ours =
            MigrationPolicy::new("cg-1", path_policy_spec(Some(&admin.spec), "cg-1", 1e9));
        ours.metadata.labels = None; // as KubeVirt sees it: it does not skip commonground's own
        let vmi: BTreeMap<String, String> = [
            ("tier".to_string(), "db".to_string()),
            (PATH_OWNER_LABEL.to_string(), "cg-1".to_string()),
        ]
        .into();
        let ns: BTreeMap<String, String> = [("team".to_string(), "a".to_string())].into();
        let chosen = bandwidth::applicable_policy(&vmi, Some(&ns), [&admin, &ours]).unwrap();
        assert_eq!(chosen.metadata.name.as_deref(), Some("cg-1"));
        // Another VMI the administrator's policy selects keeps it.
        let other: BTreeMap<String, String> = [("tier".to_string(), "db".to_string())].into();
        let chosen = bandwidth::applicable_policy(&other, Some(&ns), [&admin, &ours]).unwrap();
        assert_eq!(chosen.metadata.name.as_deref(), Some("admin"));
    }

    #[test]
    fn a_stored_nmstate_path_is_left_out_with_a_reason() {
        let mut spec: MigrationNetworkSpec = serde_json::from_value(serde_json::json!({
            "networkAttachmentDefinition": {"namespace": "kubevirt", "name": "spare"},
            "bandwidth": "1Gi",
            "activation": "Nmstate",
            "interface": "ens2f1",
            "bond": "migration0"
        }))
        .unwrap();
        let e = usable(&spec).unwrap_err();
        assert!(e.contains("no longer supported"), "{e}");
        spec.activation = Activation::Preattached;
        assert_eq!(usable(&spec).unwrap().bandwidth, 1 << 30);
    }

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
