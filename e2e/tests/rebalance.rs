//! The rebalancer against the real control plane: a RebalancePolicy evens a hot and a cold
//! fake node from the loads published in their NodeRegionDigests, by a VirtualMachineMigration
//! it owns, executed through the KubeVirt stand-in; a dry-run policy only records decisions.

mod common;

use std::time::{Duration, Instant};

use common::{ensure_controller_for_process, keys, publish_digest, set_vm_loads, vm_summary};
use commonground::api::kubevirt::VirtualMachineInstance;
use commonground::api::migration::MigrationPhase;
use commonground::api::rebalance::RebalancePolicySpec;
use commonground::api::{RebalancePolicy, VirtualMachineMigration};
use commonground::controller::labels::{owner_id, owner_selector};
use commonground_e2e::{wait_for_object, FakeNode, TestCluster, TestNamespace};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};

const T: Duration = Duration::from_secs(120);
const GIB: u64 = 1 << 30;
const POLICY_LABEL: &str = "commonground.dev/rebalance-policy";
const POOL_LABEL: &str = "e2e.commonground.dev/pool";

/// Deletes the (cluster-scoped) policy when the test ends, however it ends.
struct PolicyGuard {
    api: Api<RebalancePolicy>,
    name: String,
}

impl Drop for PolicyGuard {
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

/// A hot node running vm-a (4 busy cores), vm-b (2) and vm-c (1), and an idle cold node, both
/// in this test's pool; digests published with those loads. Returns (hot, cold).
async fn hot_and_cold(ns: &TestNamespace) -> anyhow::Result<(String, String)> {
    let hot = ns.node_name("hot");
    let cold = ns.node_name("cold");
    ns.create_fake_node(FakeNode::new(&hot, "wg-1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for vm in ["vm-a", "vm-b", "vm-c"] {
        ns.create_vmi(ns.vmi(vm, "1Gi", "500m")).await?;
    }
    for vm in ["vm-a", "vm-b", "vm-c"] {
        wait_for_object(&vmis, vm, T, "VMI running on the hot node", |v| {
            v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                && v.node_name() == Some(hot.as_str())
                && v.condition_true("LiveMigratable")
        })
        .await?;
    }
    // The cold node only now, so every VMI started on the hot one.
    ns.create_fake_node(FakeNode::new(&cold, "wg-1")).await?;
    let vms = ["vm-a", "vm-b", "vm-c"]
        .iter()
        .enumerate()
        .map(|(i, vm)| vm_summary(&ns.name, vm, GIB, &keys(1_000_000 * (i as u64 + 1), 500)))
        .collect();
    publish_digest(&ns.client, &hot, "wg-1", vms, &[]).await?;
    publish_digest(&ns.client, &cold, "wg-1", vec![], &[]).await?;
    set_vm_loads(
        &ns.client,
        &hot,
        &[
            ("vm-a", 4.0, 0.0, GIB),
            ("vm-b", 2.0, 0.0, GIB),
            ("vm-c", 1.0, 0.0, GIB),
        ],
    )
    .await?;
    Ok((hot, cold))
}

/// A SenderInitiated policy over this test's pool, rounds every 2 s, one migration at a time.
async fn create_policy(ns: &TestNamespace, dry_run: bool) -> anyhow::Result<PolicyGuard> {
    let spec: RebalancePolicySpec = serde_json::from_value(serde_json::json!({
        "mode": "SenderInitiated",
        "interval": "2s",
        "maxConcurrent": 1,
        "maxConcurrentPerNode": 1,
        "nodeSelector": { POOL_LABEL: ns.name },
        "dryRun": dry_run,
    }))?;
    let api: Api<RebalancePolicy> = Api::all(ns.client.clone());
    api.create(
        &PostParams::default(),
        &RebalancePolicy::new(&ns.name, spec),
    )
    .await?;
    Ok(PolicyGuard {
        api,
        name: ns.name.clone(),
    })
}

async fn owned_migrations(ns: &TestNamespace) -> anyhow::Result<Vec<VirtualMachineMigration>> {
    let api: Api<VirtualMachineMigration> = ns.api();
    // The label carries the policy's UID-derived id (names may be longer than label values).
    let policy = Api::<RebalancePolicy>::all(ns.client.clone())
        .get(&ns.name)
        .await?;
    let lp = ListParams::default().labels(&owner_selector(POLICY_LABEL, &policy.metadata));
    Ok(api.list(&lp).await?.items)
}

async fn on_failure<T>(ns: &TestNamespace, r: anyhow::Result<T>) -> anyhow::Result<T> {
    if r.is_err() {
        eprintln!("controller log:\n{}", common::controller_log());
        eprintln!("{}", ns.dump().await);
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sender_initiated_policy_moves_the_vm_that_evens_the_pair_to_the_cold_node(
) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_controller_for_process();
    let ns = TestCluster::get().fresh_namespace("rebalance").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (hot, cold) = hot_and_cold(&ns).await?;
    let policies: Api<RebalancePolicy> = Api::all(ns.client.clone());
    let _policy = create_policy(&ns, false).await?;

    // Loads 4+2+1 cores plus 3 x 1 GiB at weight 0.5 per 4 GiB: 7.375 against 0. Half the
    // difference is 3.69: vm-a (4.125) leaves the pair most even (3.25 against 4.125).
    let decided = wait_for_object(&policies, &ns.name, T, "a rebalancing decision", |p| {
        p.status.as_ref().is_some_and(|s| !s.decisions.is_empty())
    })
    .await;
    let decided = on_failure(&ns, decided).await?;
    let status = decided.status.unwrap();
    assert!(
        (status.loads[&hot] - 7.375).abs() < 1e-6,
        "{:?}",
        status.loads
    );
    assert_eq!(status.loads[&cold], 0.0, "{:?}", status.loads);
    assert_eq!(status.decisions.len(), 1, "{:?}", status.decisions);
    let d = &status.decisions[0];
    assert_eq!(d.vm, format!("{}/vm-a", ns.name));
    assert_eq!(
        (d.from.as_str(), d.to.as_str()),
        (hot.as_str(), cold.as_str())
    );
    assert!(d.reason.contains("sender-initiated"), "{}", d.reason);
    let name = d
        .migration
        .clone()
        .expect("not a dry run: a migration is named");

    // The migration is labelled with and owned by the policy, and moves vm-a to the cold node.
    let vmms: Api<VirtualMachineMigration> = ns.api();
    let done = wait_for_object(&vmms, &name, T, "the rebalancing migration finished", |m| {
        m.status.as_ref().is_some_and(|s| s.phase.is_final())
    })
    .await;
    let done = on_failure(&ns, done).await?;
    let policy = policies.get(&ns.name).await?;
    assert_eq!(
        done.labels().get(POLICY_LABEL),
        Some(&owner_id(&policy.metadata))
    );
    assert_eq!(done.annotations().get(POLICY_LABEL), Some(&ns.name));
    assert_eq!(
        done.owner_references()
            .iter()
            .map(|o| (o.kind.as_str(), o.name.as_str()))
            .collect::<Vec<_>>(),
        [("RebalancePolicy", ns.name.as_str())]
    );
    let s = done.status.unwrap();
    assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
    assert_eq!(s.target_node.as_deref(), Some(cold.as_str()));
    let vmi: VirtualMachineInstance = ns.api().get("vm-a").await?;
    assert_eq!(vmi.node_name(), Some(cold.as_str()));
    for other in ["vm-b", "vm-c"] {
        let vmi: VirtualMachineInstance = ns.api().get(other).await?;
        assert_eq!(vmi.node_name(), Some(hot.as_str()), "{other} stayed");
    }

    // Until the agents measure again, neither node's load is known: three more rounds and
    // no second VM chases the load that already moved.
    let round_after = |t: &str| {
        chrono::DateTime::parse_from_rfc3339(t).expect("RFC 3339")
            > chrono::DateTime::parse_from_rfc3339(status.last_round_time.as_deref().unwrap())
                .unwrap()
                + chrono::Duration::seconds(6)
    };
    wait_for_object(&policies, &ns.name, T, "three more rounds", |p| {
        p.status
            .as_ref()
            .and_then(|s| s.last_round_time.as_deref())
            .is_some_and(round_after)
    })
    .await?;
    let owned = owned_migrations(&ns).await?;
    assert_eq!(
        owned.iter().map(|m| m.name_any()).collect::<Vec<_>>(),
        [name],
        "one migration only"
    );
    eprintln!(
        "rebalance e2e (move to the cold node): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_policy_records_decisions_and_creates_nothing() -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_controller_for_process();
    let ns = TestCluster::get().fresh_namespace("rebalance-dry").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (hot, cold) = hot_and_cold(&ns).await?;
    let policies: Api<RebalancePolicy> = Api::all(ns.client.clone());
    let _policy = create_policy(&ns, true).await?;
    let decided = wait_for_object(&policies, &ns.name, T, "a dry-run decision", |p| {
        p.status.as_ref().is_some_and(|s| !s.decisions.is_empty())
    })
    .await;
    let status = on_failure(&ns, decided).await?.status.unwrap();
    let d = &status.decisions[0];
    assert_eq!(d.vm, format!("{}/vm-a", ns.name));
    assert_eq!(
        (d.from.as_str(), d.to.as_str()),
        (hot.as_str(), cold.as_str())
    );
    assert_eq!(d.migration, None, "a dry run names no migration");
    // Rounds go on deciding the same move, and nothing is ever created or moved.
    let first = status.last_round_time.clone().unwrap();
    wait_for_object(&policies, &ns.name, T, "a later dry-run round", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.last_round_time.as_deref() > Some(first.as_str())
                && s.decisions.iter().any(|d| d.vm.ends_with("/vm-a"))
        })
    })
    .await?;
    assert!(owned_migrations(&ns).await?.is_empty());
    let vmi: VirtualMachineInstance = ns.api().get("vm-a").await?;
    assert_eq!(vmi.node_name(), Some(hot.as_str()));
    eprintln!(
        "rebalance e2e (dry run): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}

/// Node `a` with CPU for two VMs only, running vm-a and vm-b, then node `b` with vm-c and
/// vm-d, each VMI waited for until it runs live-migratable on its node. Each launcher pod
/// asks for the VM's 500m plus KubeVirt's console-log sidecar (5m), so two need 1010m.
async fn two_vms_on_each_of(ns: &TestNamespace, a: &str, b: &str) -> anyhow::Result<()> {
    let vmis: Api<VirtualMachineInstance> = ns.api();
    ns.create_fake_node(FakeNode::new(a, "wg-1").capacity("1100m", "64Gi"))
        .await?;
    for (vms, node) in [(["vm-a", "vm-b"], a), (["vm-c", "vm-d"], b)] {
        if node == b {
            ns.create_fake_node(FakeNode::new(b, "wg-1")).await?;
        }
        for vm in vms {
            ns.create_vmi(ns.vmi(vm, "1Gi", "500m")).await?;
        }
        for vm in vms {
            wait_for_object(&vmis, vm, T, "VMI running on its node", |v| {
                v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
                    && v.node_name() == Some(node)
                    && v.condition_true("LiveMigratable")
            })
            .await?;
        }
    }
    Ok(())
}

/// Two nodes of equal load: no move, until an administrator annotates one with a load
/// override; then the policy sends a VM from it to the other.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn load_override_annotation_pushes_a_vm_off_the_node() -> anyhow::Result<()> {
    ensure_controller_for_process();
    let ns = TestCluster::get()
        .fresh_namespace("rebalance-override")
        .await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (a, b) = (ns.node_name("a"), ns.node_name("b"));
    two_vms_on_each_of(&ns, &a, &b).await?;
    for (node, vms, base) in [(&a, ["vm-a", "vm-b"], 1), (&b, ["vm-c", "vm-d"], 3)] {
        let summaries = vms
            .iter()
            .enumerate()
            .map(|(i, vm)| vm_summary(&ns.name, vm, GIB, &keys(1_000_000 * (base + i as u64), 500)))
            .collect();
        publish_digest(&ns.client, node, "wg-1", summaries, &[]).await?;
        set_vm_loads(
            &ns.client,
            node,
            &[(vms[0], 3.0, 0.0, GIB), (vms[1], 3.0, 0.0, GIB)],
        )
        .await?;
    }
    let policies: Api<RebalancePolicy> = Api::all(ns.client.clone());
    let _policy = create_policy(&ns, true).await?;
    // Balanced: rounds run and decide nothing.
    let quiet = wait_for_object(&policies, &ns.name, T, "a round without decisions", |p| {
        p.status
            .as_ref()
            .is_some_and(|s| s.last_round_time.is_some() && s.decisions.is_empty())
    })
    .await;
    on_failure(&ns, quiet).await?;
    let nodes: Api<k8s_openapi::api::core::v1::Node> = Api::all(ns.client.clone());
    nodes
        .patch(
            &a,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                commonground::plan::rebalance::LOAD_OVERRIDE_ANNOTATION: "+10"}}})),
        )
        .await?;
    let decided = wait_for_object(
        &policies,
        &ns.name,
        T,
        "a decision after the override",
        |p| p.status.as_ref().is_some_and(|s| !s.decisions.is_empty()),
    )
    .await;
    let status = on_failure(&ns, decided).await?.status.unwrap();
    let d = &status.decisions[0];
    assert_eq!((d.from.as_str(), d.to.as_str()), (a.as_str(), b.as_str()));
    Ok(())
}

/// Non-VM work of fake node `node`: a shell spinning on one CPU, its command line marked with
/// the node (`--e2e-node <node>`, as the stand-in's memory helpers are) so that only that
/// node's agent counts it. Stopped when dropped.
fn host_work(node: &str) -> common::Component {
    common::Component::start_program(
        std::path::Path::new("/bin/sh"),
        &[
            "-c",
            "while :; do :; done",
            "host-work",
            commonground_e2e::memory::NODE_ARG,
            node,
        ],
        &format!("host-work-{node}"),
    )
}

/// CPU cores of a node's published load beyond its VMs' (what the policy counts as host load).
fn host_cores(d: &commonground::api::NodeRegionDigest) -> Option<f64> {
    let s = d.status.as_ref()?;
    Some(s.load.cpu_cores - s.vms.iter().map(|v| v.load.cpu_cores).sum::<f64>())
}

/// Two nodes of two VMs each, every figure published by the nodes' agents from real
/// processes: no move while only idle VMs run; once one node's non-VM work (a process burning
/// a CPU) is measured by its agent, a policy counting host load moves a VM off that node.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_work_the_agent_measures_pushes_a_vm_off_the_node() -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_controller_for_process();
    let ns = TestCluster::get()
        .fresh_namespace("rebalance-hostload")
        .await?;
    let mut cfg = ns.standin_config();
    cfg.memory = Some(TestNamespace::memory_config(env!(
        "CARGO_BIN_EXE_vm-memory"
    )));
    let _standin = ns.start_standin(cfg);
    let (a, b) = (ns.node_name("a"), ns.node_name("b"));
    let digests: Api<commonground::api::NodeRegionDigest> = Api::all(ns.client.clone());
    for n in [&a, &b] {
        // Digests left over from an earlier run with the same names would confuse the waits.
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }
    two_vms_on_each_of(&ns, &a, &b).await?;
    let _agents = [common::start_agent(&a), common::start_agent(&b)];
    for (node, vms) in [(&a, ["vm-a", "vm-b"]), (&b, ["vm-c", "vm-d"])] {
        let published = wait_for_object(&digests, node, T, "the agent's digest", |d| {
            d.status
                .as_ref()
                .is_some_and(|s| vms.iter().all(|vm| s.vms.iter().any(|v| &v.name == vm)))
        })
        .await;
        on_failure(&ns, published).await?;
    }

    // Sender-initiated, counting host load; a node above 0.1 (a tenth of a core, or 800 MiB
    // of memory at the default weights) looks for a peer.
    let spec: RebalancePolicySpec = serde_json::from_value(serde_json::json!({
        "mode": "SenderInitiated",
        "interval": "2s",
        "maxConcurrent": 1,
        "maxConcurrentPerNode": 1,
        "highThreshold": 0.1,
        "includeHostLoad": true,
        "nodeSelector": { POOL_LABEL: ns.name },
    }))?;
    let policies: Api<RebalancePolicy> = Api::all(ns.client.clone());
    policies
        .create(
            &PostParams::default(),
            &RebalancePolicy::new(&ns.name, spec),
        )
        .await?;
    let _policy = PolicyGuard {
        api: policies.clone(),
        name: ns.name.clone(),
    };
    // Idle VMs only: rounds over both nodes decide nothing.
    let quiet = wait_for_object(&policies, &ns.name, T, "a round without decisions", |p| {
        p.status.as_ref().is_some_and(|s| {
            s.loads.contains_key(&a) && s.loads.contains_key(&b) && s.decisions.is_empty()
        })
    })
    .await;
    let quiet = on_failure(&ns, quiet).await?.status.unwrap();
    eprintln!("loads with idle VMs only: {:?}", quiet.loads);

    // Work on node a that is no VM. Its agent measures it over its next intervals (one
    // second each); the refresh annotation asks it to publish now instead of at its
    // once-a-minute pace: what it publishes is its own measurement.
    let _work = host_work(&a);
    tokio::time::sleep(Duration::from_secs(3)).await;
    digests
        .patch(
            &a,
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Merge(serde_json::json!({"metadata": {"annotations": {
                commonground::agent::publish::REFRESH_ANNOTATION:
                    commonground::api::time::now_rfc3339()}}})),
        )
        .await?;
    let measured = wait_for_object(&digests, &a, T, "node a's host work published", |d| {
        host_cores(d).is_some_and(|c| c > 0.1)
    })
    .await;
    let measured = on_failure(&ns, measured).await?;
    let host_a = host_cores(&measured).unwrap();
    let host_b = host_cores(&digests.get(&b).await?).unwrap_or_default();
    eprintln!("host CPU measured by the agents: {a}: {host_a:.3} cores, {b}: {host_b:.3} cores");
    assert!(host_b < 0.1, "node b runs no host work: {host_b}");

    let decided = wait_for_object(&policies, &ns.name, T, "a rebalancing decision", |p| {
        p.status.as_ref().is_some_and(|s| !s.decisions.is_empty())
    })
    .await;
    let status = on_failure(&ns, decided).await?.status.unwrap();
    eprintln!("loads with the host work: {:?}", status.loads);
    let d = &status.decisions[0];
    assert_eq!((d.from.as_str(), d.to.as_str()), (a.as_str(), b.as_str()));
    assert!(d.reason.contains("sender-initiated"), "{}", d.reason);
    assert!(
        status.loads[&a] > 0.1 && status.loads[&a] > 1.25 * status.loads[&b],
        "{:?}",
        status.loads
    );
    let moved = d.vm.rsplit('/').next().unwrap_or_default().to_string();
    assert!(["vm-a", "vm-b"].contains(&moved.as_str()), "{}", d.vm);
    let name = d
        .migration
        .clone()
        .expect("not a dry run: a migration is named");
    let vmms: Api<VirtualMachineMigration> = ns.api();
    let done = wait_for_object(&vmms, &name, T, "the rebalancing migration finished", |m| {
        m.status.as_ref().is_some_and(|s| s.phase.is_final())
    })
    .await;
    let s = on_failure(&ns, done).await?.status.unwrap();
    assert_eq!(s.phase, MigrationPhase::Succeeded, "{s:?}");
    let vmi: VirtualMachineInstance = ns.api().get(&moved).await?;
    assert_eq!(vmi.node_name(), Some(b.as_str()));
    eprintln!(
        "rebalance e2e (measured host load): {:.1} s",
        started.elapsed().as_secs_f64()
    );
    Ok(())
}
