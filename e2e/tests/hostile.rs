//! Hostile but accepted objects against the real control plane: values the API server admits
//! (an absurd maxDuration, names at the 253-character limit, a VMI or node that does not
//! exist, zero durations, a RebalancePolicy whose weights are all 0, a MigrationNetwork with an
//! absurd setup time). The controller must stay up, give each object a status that says why,
//! and still carry out an ordinary request afterwards.

mod common;

use std::time::Duration;

use common::{controller_running, ensure_controller_for_process, keys, publish_digest, vm_summary};
use commonground::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use commonground::api::migration::{
    MigrationPhase, MigrationTarget, VirtualMachineMigrationSpec, VirtualMachineMigrationStatus,
};
use commonground::api::rebalance::RebalancePolicySpec;
use commonground::api::{MigrationNetwork, RebalancePolicy, VirtualMachineMigration};
use commonground::controller::labels::owner_id;
use commonground_e2e::{wait_for_object, FakeNode, TestCluster, TestNamespace};
use kube::api::{DeleteParams, PostParams};
use kube::{Api, ResourceExt};

const T: Duration = Duration::from_secs(120);
const GIB: u64 = 1 << 30;
const HUGE: &str = "99999999999999999999h";

/// Deletes a cluster-scoped object when the test ends, however it ends.
struct Cleanup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    api: Api<K>,
    name: String,
}

impl<K> Drop for Cleanup<K>
where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + std::fmt::Debug + Send + 'static,
{
    fn drop(&mut self) {
        let (api, name) = (self.api.clone(), self.name.clone());
        let _ = std::thread::spawn(move || {
            tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .map(|rt| rt.block_on(api.delete(&name, &DeleteParams::default())))
        })
        .join();
    }
}

fn spec(vmi: &str) -> VirtualMachineMigrationSpec {
    VirtualMachineMigrationSpec {
        vmi_name: vmi.into(),
        target: None,
        max_duration: None,
        path_setup_budget: None,
        follow_deadline: None,
        group: None,
        dry_run: false,
        max_attempts: None,
        unschedulable_timeout: None,
    }
}

/// A valid object name of exactly 253 characters that starts with `prefix`.
fn name_253(prefix: &str) -> String {
    let name = format!("{prefix}-{}", "x".repeat(253 - prefix.len() - 1));
    assert_eq!(name.len(), 253);
    name
}

async fn final_status(
    ns: &TestNamespace,
    name: &str,
    phases: &[MigrationPhase],
) -> anyhow::Result<VirtualMachineMigrationStatus> {
    let api: Api<VirtualMachineMigration> = ns.api();
    let r = wait_for_object(&api, name, T, "VirtualMachineMigration phase", |m| {
        m.status.as_ref().is_some_and(|s| phases.contains(&s.phase))
    })
    .await;
    if r.is_err() {
        eprintln!("controller log:\n{}", common::controller_log());
        eprintln!("{}", ns.dump().await);
    }
    Ok(r?.status.unwrap_or_default())
}

fn condition<'a>(
    status: &'a VirtualMachineMigrationStatus,
    kind: &str,
) -> &'a commonground::api::conditions::Condition {
    status
        .conditions
        .iter()
        .find(|c| c.r#type == kind)
        .unwrap_or_else(|| panic!("condition {kind} in {status:?}"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hostile_objects_get_a_status_and_the_controller_keeps_working() -> anyhow::Result<()> {
    ensure_controller_for_process();
    let ns = TestCluster::get().fresh_namespace("hostile").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-1")).await?;
    let vms = ["vm-huge", "vm-long", "vm-pinned", "vm-zero", "vm-ordinary"];
    for vm in vms {
        ns.create_vmi(ns.vmi(vm, "1Gi", "500m")).await?;
    }
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for vm in vms {
        wait_for_object(&vmis, vm, T, "VMI running on the source", |v| {
            v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && v.condition_true("LiveMigratable")
        })
        .await?;
    }
    let targets = [ns.node_name("b"), ns.node_name("c")];
    for t in &targets {
        ns.create_fake_node(FakeNode::new(t, "wg-1")).await?;
    }
    let summaries = vms
        .iter()
        .enumerate()
        .map(|(i, vm)| vm_summary(&ns.name, vm, GIB, &keys(1_000_000 * (i as u64 + 1), 500)))
        .collect();
    publish_digest(&ns.client, &source, "wg-1", summaries, &[]).await?;
    for t in &targets {
        publish_digest(&ns.client, t, "wg-1", vec![], &[]).await?;
    }

    // A MigrationNetwork with an absurd setup time, present on every node of this test.
    let networks: Api<MigrationNetwork> = Api::all(ns.client.clone());
    let network_name = format!("{}-slow", ns.name);
    let network: MigrationNetwork = serde_json::from_value(serde_json::json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "MigrationNetwork",
        "metadata": {"name": network_name},
        "spec": {
            "networkAttachmentDefinition": {"namespace": ns.name, "name": "nad"},
            "bandwidth": "1250Mi", "setupTime": HUGE, "activation": "Preattached",
            "nodeSelector": {commonground_e2e::POOL_LABEL: ns.name},
        }
    }))?;
    networks.create(&PostParams::default(), &network).await?;
    let _network = Cleanup {
        api: networks.clone(),
        name: network_name.clone(),
    };

    let vmms: Api<VirtualMachineMigration> = ns.api();
    let create = |name: String, spec: VirtualMachineMigrationSpec| {
        let vmms = vmms.clone();
        async move {
            vmms.create(
                &PostParams::default(),
                &VirtualMachineMigration::new(&name, spec),
            )
            .await
        }
    };
    let mut huge = spec("vm-huge");
    huge.max_duration = Some(HUGE.into());
    create("huge-max-duration".into(), huge).await?;
    let long_name = name_253("long");
    create(long_name.clone(), spec("vm-long")).await?;
    create("no-such-vmi".into(), spec("does-not-exist")).await?;
    let mut pinned = spec("vm-pinned");
    pinned.target = Some(MigrationTarget {
        node_name: Some("no-such-node".into()),
        ..Default::default()
    });
    create("pinned-to-no-node".into(), pinned).await?;
    let mut zero = spec("vm-zero");
    zero.max_duration = Some("0s".into());
    zero.path_setup_budget = Some("0s".into());
    create("zero-durations".into(), zero).await?;
    // The CRD pattern admits no sign: a negative duration never reaches the controller.
    let mut negative = spec("vm-zero");
    negative.max_duration = Some("-5s".into());
    match create("negative-duration".into(), negative).await {
        Err(kube::Error::Api(e)) => assert_eq!(e.code, 422, "{e:?}"),
        other => panic!("a negative duration must be refused by the API server: {other:?}"),
    }

    let policies: Api<RebalancePolicy> = Api::all(ns.client.clone());
    let zero_weights_name = name_253(&format!("{}-w", ns.name));
    let zero_weights: RebalancePolicySpec = serde_json::from_value(serde_json::json!({
        "interval": "1s", "cooldown": "0s",
        "weights": {"cpu": 0.0, "io": 0.0, "memory": 0.0},
        "nodeSelector": {commonground_e2e::POOL_LABEL: ns.name},
    }))?;
    policies
        .create(
            &PostParams::default(),
            &RebalancePolicy::new(&zero_weights_name, zero_weights),
        )
        .await?;
    let _zero_weights = Cleanup {
        api: policies.clone(),
        name: zero_weights_name.clone(),
    };
    let huge_interval_name = format!("{}-huge-interval", ns.name);
    let huge_interval: RebalancePolicySpec = serde_json::from_value(serde_json::json!({
        "interval": HUGE, "dryRun": true,
        "nodeSelector": {commonground_e2e::POOL_LABEL: ns.name},
    }))?;
    policies
        .create(
            &PostParams::default(),
            &RebalancePolicy::new(&huge_interval_name, huge_interval),
        )
        .await?;
    let _huge_interval = Cleanup {
        api: policies.clone(),
        name: huge_interval_name.clone(),
    };

    // Each says why.
    let s = final_status(&ns, "huge-max-duration", &[MigrationPhase::Failed]).await?;
    let failed = condition(&s, "Failed");
    assert_eq!(failed.reason, "InvalidSpec", "{s:?}");
    assert!(
        failed.message.contains("spec.maxDuration") && failed.message.contains("87600h"),
        "{}",
        failed.message
    );
    let s = final_status(&ns, "no-such-vmi", &[MigrationPhase::Failed]).await?;
    assert_eq!(condition(&s, "Failed").reason, "VmiNotFound", "{s:?}");
    let s = final_status(&ns, "pinned-to-no-node", &[MigrationPhase::Failed]).await?;
    let failed = condition(&s, "Failed");
    assert_eq!(failed.reason, "PlanError", "{s:?}");
    assert!(
        failed.message.contains("no-such-node"),
        "{}",
        failed.message
    );

    let huge = wait_for_object(&policies, &huge_interval_name, T, "policy status", |p| {
        p.status.as_ref().is_some_and(|s| !s.conditions.is_empty())
    })
    .await?;
    let ready = &huge.status.unwrap().conditions[0];
    assert_eq!(
        (
            ready.r#type.as_str(),
            ready.status.as_str(),
            ready.reason.as_str()
        ),
        ("Ready", "False", "InvalidSpec")
    );
    assert!(
        ready.message.contains("spec.interval") && ready.message.contains("87600h"),
        "{}",
        ready.message
    );
    let zero = wait_for_object(&policies, &zero_weights_name, T, "a round", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.last_round_time.is_some())
    })
    .await?;
    let status = zero.status.unwrap();
    let ready = &status.conditions[0];
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", "AllWeightsZero")
    );
    assert!(
        status.loads.values().all(|l| *l == 0.0),
        "{:?}",
        status.loads
    );
    assert!(status.decisions.is_empty(), "{:?}", status.decisions);

    // The accepted-but-odd ones that can be carried out are.
    let s = final_status(
        &ns,
        "zero-durations",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
    assert_eq!(condition(&s, "TimeBudget").reason, "OverBudget", "{s:?}");
    assert!(
        s.notes
            .iter()
            .any(|n| n.contains(&network_name) && n.contains("spec.setupTime")),
        "the unusable network is named: {:?}",
        s.notes
    );
    let s = final_status(
        &ns,
        &long_name,
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
    let long = vmms.get(&long_name).await?;
    let vmim: VirtualMachineInstanceMigration = ns
        .api()
        .get(s.kubevirt_migration.as_deref().expect("migration named"))
        .await?;
    assert!(vmim.name_any().len() <= 253);
    let owner_label = "commonground.dev/virtual-machine-migration";
    assert_eq!(
        vmim.labels().get(owner_label),
        Some(&owner_id(&long.metadata))
    );
    assert_eq!(
        vmim.annotations().get(owner_label),
        Some(&format!("{}/{long_name}", ns.name))
    );

    // The controller is still the same process, and an ordinary request still succeeds.
    assert!(
        controller_running(),
        "controller exited:\n{}",
        common::controller_log()
    );
    create("ordinary".into(), spec("vm-ordinary")).await?;
    let s = final_status(
        &ns,
        "ordinary",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
    assert!(controller_running(), "{}", common::controller_log());
    let log = common::controller_log();
    assert!(!log.contains("panicked"), "{log}");
    Ok(())
}
