//! The controller against the real control plane: a VirtualMachineMigration is planned from
//! published digests, executed through the KubeVirt stand-in and the real kube-scheduler, and
//! every outcome is read back from the API.

mod common;

use std::time::{Duration, Instant};

use common::{ensure_controller, keys, publish_digest, vm_summary};
use commonground::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use commonground::api::migration::{AttemptOutcome, MigrationPhase, VirtualMachineMigrationSpec};
use commonground::api::{NodeRegionDigest, VirtualMachineMigration};
use commonground_e2e::{wait_for, wait_for_object, FakeNode, TestCluster, TestNamespace};
use k8s_openapi::api::core::v1::{Event, Pod};
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};

const T: Duration = Duration::from_secs(120);
const GIB: u64 = 1 << 30;

/// Polls `f` until it yields something (a `wait_for` over plain options).
async fn until<V, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<V>
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<V>>,
{
    wait_for(what, timeout, move || {
        let fut = f();
        async move { Ok(fut.await) }
    })
    .await
}

fn vmm_spec(vmi: &str) -> VirtualMachineMigrationSpec {
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

async fn create_vmm(
    ns: &TestNamespace,
    name: &str,
    spec: VirtualMachineMigrationSpec,
) -> anyhow::Result<VirtualMachineMigration> {
    let api: Api<VirtualMachineMigration> = ns.api();
    Ok(api
        .create(
            &PostParams::default(),
            &VirtualMachineMigration::new(name, spec),
        )
        .await?)
}

async fn vmm_in_phase(
    ns: &TestNamespace,
    name: &str,
    phases: &[MigrationPhase],
) -> anyhow::Result<VirtualMachineMigration> {
    let api: Api<VirtualMachineMigration> = ns.api();
    let r = wait_for_object(&api, name, T, "VirtualMachineMigration phase", |m| {
        m.status.as_ref().is_some_and(|s| phases.contains(&s.phase))
    })
    .await;
    if r.is_err() {
        eprintln!("controller log:\n{}", common::controller_log());
        eprintln!("{}", ns.dump().await);
    }
    r
}

/// A running VMI on a source node, then `others` nodes (suffix, work group) added.
async fn vm_on_source(
    ns: &TestNamespace,
    vmi_name: &str,
    others: &[(&str, &str)],
) -> anyhow::Result<(String, Vec<String>)> {
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-1")).await?;
    ns.create_vmi(ns.vmi(vmi_name, "1Gi", "500m")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    wait_for_object(&vmis, vmi_name, T, "VMI running with LiveMigratable", |v| {
        v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
            && v.condition_true("LiveMigratable")
    })
    .await?;
    let mut names = Vec::new();
    for (suffix, wg) in others {
        let n = ns.node_name(suffix);
        ns.create_fake_node(FakeNode::new(&n, *wg)).await?;
        names.push(n);
    }
    Ok((source, names))
}

/// Digests: the VM's content on the source; node i holds `shares[i]` of it.
async fn publish(
    ns: &TestNamespace,
    vmi: &str,
    source: &str,
    targets: &[String],
    shares: &[u64],
) -> anyhow::Result<()> {
    let content = keys(1_000_000, 1000);
    publish_digest(
        &ns.client,
        source,
        "wg-1",
        vec![vm_summary(&ns.name, vmi, GIB, &content)],
        &[],
    )
    .await?;
    for (node, share) in targets.iter().zip(shares) {
        let held: Vec<u64> = content[..(*share as usize * 10)].to_vec();
        publish_digest(&ns.client, node, "wg-1", vec![], &held).await?;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_goes_to_the_node_with_the_most_memory_in_common() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-best").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (source, targets) =
        vm_on_source(&ns, "vm1", &[("b", "wg-1"), ("c", "wg-1"), ("d", "wg-1")]).await?;
    // b holds 20%, c 80%, d 50% of the VM's regions.
    publish(&ns, "vm1", &source, &targets, &[20, 80, 50]).await?;
    create_vmm(&ns, "move-vm1", vmm_spec("vm1")).await?;
    let done = vmm_in_phase(
        &ns,
        "move-vm1",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:?}");
    assert_eq!(status.source_node.as_deref(), Some(source.as_str()));
    assert_eq!(status.target_node.as_deref(), Some(targets[1].as_str()));
    let chosen: Vec<_> = status
        .candidates
        .iter()
        .filter(|c| c.verdict == "Chosen")
        .collect();
    assert_eq!(chosen.len(), 1);
    assert_eq!(chosen[0].node, targets[1]);
    assert!(status.candidates.iter().any(|c| c.node == targets[0]
        && c.verdict == "Lost"
        && c.reason.contains("fewer regions")));
    assert!(status
        .candidates
        .iter()
        .any(|c| c.node == source && c.verdict == "Filtered"));
    let est = status.estimate.expect("estimate in status");
    assert_eq!(
        est.common_bytes,
        800 * 65536,
        "80% of the 1000 non-zero regions"
    );
    assert_eq!(est.to_move_bytes, 200 * 65536);
    assert!(est.duration_seconds.unwrap() > 0.0);
    // The VMI really is on the chosen node now.
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    assert_eq!(vmi.node_name(), Some(targets[1].as_str()));
    // Republished at once: the destination's digest lists the VM right away.
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    until("destination digest lists the VM", T, || async {
        let d = digests.get(&targets[1]).await.ok()?;
        d.status?.vms.iter().any(|v| v.name == "vm1").then_some(())
    })
    .await?;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    assert_eq!(vmims.list(&ListParams::default()).await?.items.len(), 1);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dry_run_plans_and_stops() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-dry").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (source, targets) = vm_on_source(&ns, "vm1", &[("b", "wg-1"), ("c", "wg-1")]).await?;
    publish(&ns, "vm1", &source, &targets, &[60, 30]).await?;
    let mut spec = vmm_spec("vm1");
    spec.dry_run = true;
    create_vmm(&ns, "plan-only", spec).await?;
    let planned = vmm_in_phase(
        &ns,
        "plan-only",
        &[MigrationPhase::Planned, MigrationPhase::Failed],
    )
    .await?;
    let status = planned.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Planned);
    assert_eq!(status.target_node.as_deref(), Some(targets[0].as_str()));
    // Nothing was handed to KubeVirt, and nothing will be.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    assert!(vmims.list(&ListParams::default()).await?.items.is_empty());
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    assert_eq!(vmi.node_name(), Some(source.as_str()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn missing_vmi_fails_with_a_reason_and_an_event() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-missing").await?;
    create_vmm(&ns, "move-ghost", vmm_spec("ghost")).await?;
    let failed = vmm_in_phase(&ns, "move-ghost", &[MigrationPhase::Failed]).await?;
    let status = failed.status.unwrap();
    assert!(status.reason.unwrap().contains("does not exist"));
    assert!(status
        .conditions
        .iter()
        .any(|c| c.r#type == "Failed" && c.reason == "VmiNotFound"));
    let events: Api<Event> = ns.api();
    until("a VmiNotFound event", T, || async {
        let list = events.list(&ListParams::default()).await.ok()?;
        list.items
            .iter()
            .any(|e| e.reason.as_deref() == Some("VmiNotFound"))
            .then_some(())
    })
    .await?;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn non_migratable_vmi_fails() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-nonmig").await?;
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-1")).await?;
    // A VMI that never gets a node (no stand-in runs here): not running.
    ns.create_vmi(ns.vmi("idle", "1Gi", "500m")).await?;
    create_vmm(&ns, "move-idle", vmm_spec("idle")).await?;
    let failed = vmm_in_phase(&ns, "move-idle", &[MigrationPhase::Failed]).await?;
    assert!(failed
        .status
        .unwrap()
        .reason
        .unwrap()
        .contains("not running"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unfinished_migration_aborts_it() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-abort").await?;
    let mut cfg = ns.standin_config();
    cfg.bandwidth_bytes_per_sec = 1e6; // 1 GiB at 1 MB/s, scaled: ~10 s
    let _standin = ns.start_standin(cfg);
    let (source, targets) = vm_on_source(&ns, "vm1", &[("b", "wg-1")]).await?;
    publish(&ns, "vm1", &source, &targets, &[50]).await?;
    create_vmm(&ns, "move-vm1", vmm_spec("vm1")).await?;
    let m = vmm_in_phase(&ns, "move-vm1", &[MigrationPhase::Migrating]).await?;
    let vmim_name = m.status.unwrap().kubevirt_migration.unwrap();
    let api: Api<VirtualMachineMigration> = ns.api();
    api.delete("move-vm1", &DeleteParams::default()).await?;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    until("the KubeVirt migration is gone", T, || async {
        vmims
            .get_opt(&vmim_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await?;
    until("the request is gone (finalizer released)", T, || async {
        api.get_opt("move-vm1").await.ok()?.is_none().then_some(())
    })
    .await?;
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    assert_eq!(
        vmi.node_name(),
        Some(source.as_str()),
        "aborted: the VM stays"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn outbound_limit_per_node_holds_extra_requests_pending() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-limit").await?;
    let mut cfg = ns.standin_config();
    cfg.bandwidth_bytes_per_sec = 1e6; // ~10 s per migration
    let _standin = ns.start_standin(cfg);
    // Three VMs on one source node before any other node exists.
    let (source, _) = vm_on_source(&ns, "vm0", &[]).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for i in 1..3 {
        ns.create_vmi(ns.vmi(&format!("vm{i}"), "1Gi", "500m"))
            .await?;
    }
    for i in 1..3 {
        wait_for_object(&vmis, &format!("vm{i}"), T, "VMI running", |v| {
            v.node_name() == Some(source.as_str())
        })
        .await?;
    }
    let target = ns.node_name("b");
    ns.create_fake_node(FakeNode::new(&target, "wg-1")).await?;
    let targets = vec![target];
    publish(&ns, "vm0", &source, &targets, &[50]).await?;
    for i in 0..3 {
        create_vmm(&ns, &format!("move-{i}"), vmm_spec(&format!("vm{i}"))).await?;
    }
    // KubeVirt's default parallelOutboundMigrationsPerNode is 2: one request waits.
    let api: Api<VirtualMachineMigration> = ns.api();
    let pending = until(
        "two migrating and one pending on the outbound limit",
        T,
        || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            let phases: Vec<_> = list.items.iter().filter_map(|m| m.status.clone()).collect();
            let migrating = phases
                .iter()
                .filter(|s| s.phase == MigrationPhase::Migrating)
                .count();
            let waiting = phases.iter().find(|s| {
                s.phase == MigrationPhase::Pending
                    && s.reason
                        .as_deref()
                        .is_some_and(|r| r.contains("parallelOutboundMigrationsPerNode"))
            })?;
            (migrating == 2).then(|| waiting.clone())
        },
    )
    .await?;
    assert!(pending.reason.unwrap().contains(&source));
    // All finish in the end.
    for i in 0..3 {
        let m = vmm_in_phase(
            &ns,
            &format!("move-{i}"),
            &[MigrationPhase::Succeeded, MigrationPhase::Failed],
        )
        .await?;
        assert_eq!(m.status.unwrap().phase, MigrationPhase::Succeeded);
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn invalid_requests_are_rejected_by_the_api_server() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmm-invalid").await?;
    let api: Api<VirtualMachineMigration> = ns.api();
    let reject = |body: serde_json::Value| {
        let api = api.clone();
        async move {
            let obj: VirtualMachineMigration = match serde_json::from_value(body.clone()) {
                Ok(o) => o,
                Err(_) => return true, // cannot even be expressed in the typed client
            };
            api.create(&PostParams::default(), &obj).await.is_err()
        }
    };
    let base = |name: &str, spec: serde_json::Value| {
        serde_json::json!({
            "apiVersion": "commonground.dev/v1alpha1", "kind": "VirtualMachineMigration",
            "metadata": {"name": name}, "spec": spec
        })
    };
    // Raw API for bodies the typed struct cannot hold.
    let raw = |body: serde_json::Value| {
        let client = ns.client.clone();
        let ns_name = ns.name.clone();
        async move {
            let req = http::Request::post(format!(
                "/apis/commonground.dev/v1alpha1/namespaces/{ns_name}/virtualmachinemigrations"
            ))
            .header("content-type", "application/json")
            .body(serde_json::to_vec(&body).unwrap())
            .unwrap();
            client.request::<serde_json::Value>(req).await.is_err()
        }
    };
    assert!(
        reject(base("empty-name", serde_json::json!({"vmiName": ""}))).await,
        "empty vmiName"
    );
    assert!(
        reject(base(
            "bad-name",
            serde_json::json!({"vmiName": "Not_A_Name"})
        ))
        .await,
        "vmiName pattern"
    );
    assert!(
        reject(base(
            "both",
            serde_json::json!({"vmiName": "a", "target": {"nodeName": "n", "workGroup": "w"}})
        ))
        .await,
        "nodeName and workGroup"
    );
    assert!(
        reject(base(
            "bad-duration",
            serde_json::json!({"vmiName": "a", "maxDuration": "five minutes"})
        ))
        .await,
        "maxDuration format"
    );
    assert!(
        raw(base(
            "bad-scope",
            serde_json::json!({"vmiName": "a", "target": {"scope": "Galaxy"}})
        ))
        .await,
        "unknown scope"
    );
    assert!(
        raw(base("no-vmi", serde_json::json!({"dryRun": true}))).await,
        "missing vmiName"
    );
    assert!(
        raw(base(
            "bad-group",
            serde_json::json!({"vmiName": "a", "group": "Herd"})
        ))
        .await,
        "unknown group mode"
    );
    // A valid one is accepted, and its vmiName cannot be changed afterwards. Merge patches
    // (no resourceVersion precondition), since the running controller also writes the object.
    api.create(
        &PostParams::default(),
        &VirtualMachineMigration::new("fine", vmm_spec("a")),
    )
    .await?;
    let patch = |body: serde_json::Value| {
        let api = api.clone();
        async move {
            api.patch(
                "fine",
                &kube::api::PatchParams::default(),
                &kube::api::Patch::Merge(&body),
            )
            .await
        }
    };
    let err = patch(serde_json::json!({"spec": {"vmiName": "b"}}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("vmiName is immutable"), "{err}");
    patch(serde_json::json!({"spec": {"target": {"nodeName": "y"}}})).await?;
    let err = patch(serde_json::json!({"spec": {"target": {"nodeName": "x"}}}))
        .await
        .unwrap_err();
    assert!(err.to_string().contains("target is immutable"), "{err}");
    Ok(())
}

/// Prints how long 1,000 dry-run requests take to be planned end to end on the real API server
/// (a benchmark: it asserts only that all were planned).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bench_one_thousand_dry_run_requests_planned() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-bench").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (source, targets) = vm_on_source(&ns, "vm1", &[("b", "wg-1"), ("c", "wg-1")]).await?;
    publish(&ns, "vm1", &source, &targets, &[60, 30]).await?;
    let api: Api<VirtualMachineMigration> = ns.api();
    let n = std::env::var("E2E_BENCH_REQUESTS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1000usize);
    let start = Instant::now();
    let mut creates = futures::stream::iter((0..n).map(|i| {
        let api = api.clone();
        async move {
            let mut spec = vmm_spec("vm1");
            spec.dry_run = true;
            api.create(
                &PostParams::default(),
                &VirtualMachineMigration::new(&format!("dry-{i}"), spec),
            )
            .await
        }
    }))
    .buffer_unordered(16);
    use futures::StreamExt;
    while let Some(r) = creates.next().await {
        r?;
    }
    let created = start.elapsed();
    until(
        "every request planned",
        Duration::from_secs(600),
        || async {
            let list = api.list(&ListParams::default()).await.ok()?;
            let planned = list
                .items
                .iter()
                .filter(|m| {
                    m.status
                        .as_ref()
                        .is_some_and(|s| s.phase == MigrationPhase::Planned)
                })
                .count();
            (planned == n).then_some(())
        },
    )
    .await?;
    let total = start.elapsed();
    println!("BENCH: {n} dry-run VirtualMachineMigrations created in {:.1}s, all planned after {:.1}s ({:.0} per second)",
        created.as_secs_f64(), total.as_secs_f64(), n as f64 / total.as_secs_f64());
    let names: Vec<String> = api
        .list(&ListParams::default())
        .await?
        .items
        .iter()
        .map(|m| m.name_any())
        .collect();
    assert_eq!(names.len(), n);
    Ok(())
}

/// Two VMs labelled into one memory group on the source.
/// [`group_on_source`], two empty nodes `b` and `c` in its work group, and the source's digest
/// with the members' contents (500 regions each, keys from `base` and `base + 10,000,000`):
/// (source, b, c, vm1's keys, vm2's keys).
async fn together_group_and_two_nodes(
    ns: &TestNamespace,
    base: u64,
) -> anyhow::Result<(String, String, Vec<u64>, Vec<u64>)> {
    let source = group_on_source(ns).await?;
    let (b, c) = (ns.node_name("b"), ns.node_name("c"));
    ns.create_fake_node(FakeNode::new(&b, "wg-1")).await?;
    ns.create_fake_node(FakeNode::new(&c, "wg-1")).await?;
    let (c1, c2) = (keys(base, 500), keys(base + 10_000_000, 500));
    publish_group(ns, &source, &c1, &c2).await?;
    Ok((b, c, c1, c2))
}

/// The source's digest with the group's two VMs, of content `c1` and `c2`.
async fn publish_group(
    ns: &TestNamespace,
    source: &str,
    c1: &[u64],
    c2: &[u64],
) -> anyhow::Result<()> {
    publish_digest(
        &ns.client,
        source,
        "wg-1",
        vec![
            vm_summary(&ns.name, "vm1", GIB, c1),
            vm_summary(&ns.name, "vm2", GIB, c2),
        ],
        &[],
    )
    .await
}

async fn group_on_source(ns: &TestNamespace) -> anyhow::Result<String> {
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for name in ["vm1", "vm2"] {
        let mut v = ns.vmi(name, "1Gi", "500m");
        v.metadata.labels = Some(
            [(
                "commonground.dev/memory-group".to_string(),
                "shm-1".to_string(),
            )]
            .into(),
        );
        ns.create_vmi(v).await?;
    }
    for name in ["vm1", "vm2"] {
        wait_for_object(&vmis, name, T, "VMI running", |v| {
            v.condition_true("LiveMigratable")
        })
        .await?;
    }
    Ok(source)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn together_group_moves_every_member_to_one_node() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-together").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (b, c, c1, c2) = together_group_and_two_nodes(&ns, 10_000_000).await?;
    // b holds all of vm1 but nothing of vm2; c holds 70% of both: the union prefers c.
    publish_digest(&ns.client, &b, "wg-1", vec![], &c1).await?;
    let mut both: Vec<u64> = c1[..350].to_vec();
    both.extend_from_slice(&c2[..350]);
    publish_digest(&ns.client, &c, "wg-1", vec![], &both).await?;
    let mut spec = vmm_spec("vm1");
    spec.group = Some(commonground::api::migration::GroupMode::Together);
    create_vmm(&ns, "move-group", spec).await?;
    let done = vmm_in_phase(
        &ns,
        "move-group",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:?}");
    assert_eq!(status.target_node.as_deref(), Some(c.as_str()));
    assert_eq!(status.members.len(), 1);
    assert_eq!(status.members[0].name, "vm2");
    assert_eq!(status.members[0].phase, "Succeeded");
    for name in ["vm1", "vm2"] {
        let v: VirtualMachineInstance = ns.api().get(name).await?;
        assert_eq!(
            v.node_name(),
            Some(c.as_str()),
            "{name} moved with the group"
        );
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_group_member_that_touches_shared_memory_follows_to_the_same_node(
) -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-follow").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let source = group_on_source(&ns).await?;
    let b = ns.node_name("b");
    ns.create_fake_node(FakeNode::new(&b, "wg-1")).await?;
    let c1 = keys(30_000_000, 500);
    publish_group(&ns, &source, &c1, &c1).await?;
    publish_digest(&ns.client, &b, "wg-1", vec![], &c1[..100]).await?;
    let mut spec = vmm_spec("vm1");
    spec.group = Some(commonground::api::migration::GroupMode::Follow);
    create_vmm(&ns, "move-follow", spec).await?;
    let api: Api<VirtualMachineMigration> = ns.api();
    let first = vmm_in_phase(
        &ns,
        "move-follow",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    assert_eq!(
        first.status.as_ref().unwrap().phase,
        MigrationPhase::Succeeded
    );
    // vm2 has not touched the shared range yet: it waits on the source, the group is open.
    let waiting = until("member waiting, shared transfer incomplete", T, || async {
        let m = api.get("move-follow").await.ok()?;
        let s = m.status?;
        (s.members.first()?.phase == "Waiting"
            && s.conditions
                .iter()
                .any(|c| c.r#type == "SharedTransferComplete" && c.status == "False"))
        .then_some(s)
    })
    .await?;
    assert!(waiting.members[0].kubevirt_migration.is_none());
    // The source's agent reports vm2 touching the shared memory.
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    let patch = serde_json::json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "NodeRegionDigest",
        "status": {"memoryGroups": [{
            "name": "shm-1", "members": [format!("{}/vm1", ns.name), format!("{}/vm2", ns.name)],
            "sharedBytes": 1048576, "recentlyAccessedBy": [format!("{}/vm2", ns.name)]
        }]}
    });
    digests
        .patch_status(
            &source,
            &kube::api::PatchParams::apply("e2e-agent-groups").force(),
            &kube::api::Patch::Apply(&patch),
        )
        .await?;
    let done = until(
        "vm2 followed and the shared transfer completed",
        T,
        || async {
            let m = api.get("move-follow").await.ok()?;
            let s = m.status?;
            s.conditions
                .iter()
                .any(|c| c.r#type == "SharedTransferComplete" && c.status == "True")
                .then_some(s)
        },
    )
    .await?;
    assert!(done.members[0].reason.contains("touched the shared memory"));
    let v2: VirtualMachineInstance = ns.api().get("vm2").await?;
    assert_eq!(
        v2.node_name(),
        Some(b.as_str()),
        "vm2 followed vm1 to the same node"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn time_budget_adds_a_path_and_removes_every_trace_afterwards() -> anyhow::Result<()> {
    use commonground::api::kubevirt::MigrationPolicy;
    use commonground::api::network::{Activation, MigrationNetworkSpec, NadReference};
    use commonground::api::MigrationNetwork;
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-paths").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (source, targets) = vm_on_source(&ns, "vm1", &[("b", "wg-1")]).await?;
    // 1 GiB of non-zero memory: ~8.6 s over the controller's 125 MB/s default network.
    let content = keys(40_000_000, 16_000);
    publish_digest(
        &ns.client,
        &source,
        "wg-1",
        vec![vm_summary(&ns.name, "vm1", GIB, &content)],
        &[],
    )
    .await?;
    publish_digest(&ns.client, &targets[0], "wg-1", vec![], &content[..1600]).await?;
    let networks: Api<MigrationNetwork> = Api::all(ns.client.clone());
    let pool: std::collections::BTreeMap<String, String> =
        [(commonground_e2e::POOL_LABEL.to_string(), ns.name.clone())].into();
    let net = |name: &str, bandwidth: &str, setup: &str, activation: Activation| {
        let mut n = MigrationNetwork::new(
            &format!("{}-{name}", ns.name),
            MigrationNetworkSpec {
                network_attachment_definition: NadReference {
                    namespace: ns.name.clone(),
                    name: name.into(),
                },
                bandwidth: bandwidth.into(),
                setup_time: setup.into(),
                activation,
                node_selector: pool.clone(),
            },
        );
        n.metadata.labels =
            Some([("e2e.commonground.dev/test".to_string(), ns.name.clone())].into());
        n
    };
    let fast = format!("{}-fast", ns.name);
    let slow = format!("{}-slow-setup", ns.name);
    networks
        .create(
            &PostParams::default(),
            &net("fast", "250Mi", "2s", Activation::Preattached),
        )
        .await?;
    networks
        .create(
            &PostParams::default(),
            &net("slow-setup", "1Gi", "60s", Activation::Preattached),
        )
        .await?;

    // The administrator's policy for this namespace: the per-migration policy must keep its
    // settings and change only the bandwidth.
    let policies: Api<MigrationPolicy> = Api::all(ns.client.clone());
    let admin_name = format!("{}-admin", ns.name);
    let admin: MigrationPolicy = serde_json::from_value(serde_json::json!({
        "apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
        "metadata": {"name": admin_name,
                     "labels": {"e2e.commonground.dev/test": ns.name}},
        "spec": {"selectors": {"namespaceSelector": {"kubernetes.io/metadata.name": ns.name}},
                 "allowAutoConverge": true, "completionTimeoutPerGiB": 321,
                 "allowWorkloadDisruption": true}
    }))?;
    policies.create(&PostParams::default(), &admin).await?;

    let mut spec = vmm_spec("vm1");
    spec.max_duration = Some("5s".into());
    spec.path_setup_budget = Some("10s".into());
    let vmm = create_vmm(&ns, "move-fast", spec).await?;
    let owner = {
        let uid: String = vmm
            .metadata
            .uid
            .clone()
            .unwrap()
            .chars()
            .filter(|c| *c != '-')
            .take(16)
            .collect();
        format!("cg-{uid}")
    };
    // While it migrates: the per-migration MigrationPolicy and the VMI label exist, the path is claimed.
    let policy = until("the per-migration MigrationPolicy", T, || async {
        policies.get_opt(&owner).await.ok()?
    })
    .await?;
    let bw = policy.spec.bandwidth_per_migration.clone().unwrap();
    assert!(
        bw.ends_with("Mi") && bw.trim_end_matches("Mi").parse::<u64>()? > 300,
        "raised bandwidth {bw}"
    );
    assert_eq!(policy.spec.allow_auto_converge, Some(true), "{policy:?}");
    assert_eq!(policy.spec.completion_timeout_per_gi_b, Some(321));
    assert_eq!(
        policy.spec.other.get("allowWorkloadDisruption"),
        Some(&serde_json::json!(true))
    );
    assert_eq!(
        policy.spec.selectors.namespace_selector, admin.spec.selectors.namespace_selector,
        "selected by the administrator's labels and the request's, so KubeVirt takes it"
    );
    let done = vmm_in_phase(
        &ns,
        "move-fast",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:?}");
    let budget = status
        .conditions
        .iter()
        .find(|c| c.r#type == "TimeBudget")
        .unwrap();
    assert_eq!(budget.reason, "FitsWithPaths", "{budget:?}");
    assert_eq!(status.estimate.as_ref().unwrap().paths, vec![fast.clone()]);
    assert_eq!(status.paths.len(), 1);
    assert!(
        status.paths[0].added_time.is_some()
            && status.paths[0].ready_time.is_some()
            && status.paths[0].removed_time.is_some()
    );
    // Nothing left behind.
    assert!(
        policies.get_opt(&admin_name).await?.is_some(),
        "the administrator's policy stays"
    );
    assert!(policies.get_opt(&owner).await?.is_none());
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    assert!(!vmi
        .labels()
        .contains_key("commonground.dev/migration-paths"));
    until("the path is released", T, || async {
        let n = networks.get(&fast).await.ok()?;
        n.status.and_then(|s| s.in_use_by).is_none().then_some(())
    })
    .await?;
    assert!(
        networks
            .get(&slow)
            .await?
            .status
            .and_then(|s| s.in_use_by)
            .is_none(),
        "the slow path was never used"
    );
    for n in [&fast, &slow] {
        networks.delete(n, &DeleteParams::default()).await?;
    }
    policies
        .delete(&admin_name, &DeleteParams::default())
        .await?;
    Ok(())
}

/// The planner's first choice cannot take the migration target pod, for a reason only
/// kube-scheduler sees: a pod already bound to that node has a required anti-affinity against
/// the VM's launcher pods (the planner checks the VM's own anti-affinity, not other pods').
/// KubeVirt's target pod stays unschedulable there, virt-controller gives up after the
/// request's `unschedulableTimeout`, and the request is planned again and succeeds on the
/// next-best node, both attempts in its status.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_the_scheduler_rejects_is_replaced_by_the_next_best_node() -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("vmm-replan").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (source, targets) = vm_on_source(&ns, "vm1", &[("b", "wg-1"), ("c", "wg-1")]).await?;
    // b holds 80% of the VM's regions, c 20%: b is the first choice.
    publish(&ns, "vm1", &source, &targets, &[80, 20]).await?;
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    let uid = vmi.metadata.uid.clone().unwrap_or_default();
    let blocker: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "keeps-vms-off", "namespace": ns.name},
        "spec": {
            "nodeName": targets[0],
            "containers": [{"name": "c", "image": "registry.invalid/none"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchLabels": {"kubevirt.io/created-by": uid}},
                "topologyKey": "kubernetes.io/hostname"}]}}
        }
    }))?;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &blocker).await?;

    let mut spec = vmm_spec("vm1");
    spec.unschedulable_timeout = Some("3s".into());
    spec.max_attempts = Some(2);
    create_vmm(&ns, "move-vm1", spec).await?;
    let done = vmm_in_phase(
        &ns,
        "move-vm1",
        &[MigrationPhase::Succeeded, MigrationPhase::Failed],
    )
    .await?;
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:?}");
    assert_eq!(status.target_node.as_deref(), Some(targets[1].as_str()));
    let attempts: Vec<(&str, AttemptOutcome)> = status
        .attempts
        .iter()
        .map(|a| (a.node.as_str(), a.outcome))
        .collect();
    assert_eq!(
        attempts,
        vec![
            (targets[0].as_str(), AttemptOutcome::Failed),
            (targets[1].as_str(), AttemptOutcome::Succeeded)
        ],
        "{:?}",
        status.attempts
    );
    assert!(
        status.attempts[0].reason.contains("never ran on"),
        "{:?}",
        status.attempts[0]
    );
    assert!(status.candidates.iter().any(|c| c.node == targets[0]
        && c.verdict == "Filtered"
        && c.reason
            .starts_with("an earlier attempt to migrate here failed")));
    // One KubeVirt migration per attempt, each pinned to its node and carrying the timeout.
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    let mut made = vmims.list(&ListParams::default()).await?.items;
    made.sort_by_key(|m| m.name_any());
    assert_eq!(made.len(), 2);
    for (m, a) in made.iter().zip(&status.attempts) {
        assert_eq!(m.name_any(), a.kubevirt_migration);
        assert_eq!(
            m.spec
                .added_node_selector
                .as_ref()
                .and_then(|s| s.get("kubernetes.io/hostname")),
            Some(&a.node)
        );
        assert_eq!(
            m.annotations()
                .get("kubevirt.io/migrationUnschedulablePodTimeoutSeconds")
                .map(String::as_str),
            Some("3")
        );
    }
    assert_eq!(made[0].phase(), Some("Failed"));
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    assert_eq!(vmi.node_name(), Some(targets[1].as_str()));
    Ok(())
}

/// A `Together` group's first choice cannot take either member's target pod (a pod bound
/// there has a required anti-affinity against both VMs' launcher pods, which only
/// kube-scheduler sees): both KubeVirt migrations fail at the request's
/// `unschedulableTimeout`, and the whole group is planned again and moves to the next-best
/// node, each member by a KubeVirt migration of the second attempt.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_together_group_the_scheduler_rejects_moves_as_a_whole_to_the_next_best_node(
) -> anyhow::Result<()> {
    let started = Instant::now();
    ensure_controller();
    let ns = TestCluster::get()
        .fresh_namespace("vmm-together-replan")
        .await?;
    let _standin = ns.start_standin(ns.standin_config());
    let (b, c, c1, c2) = together_group_and_two_nodes(&ns, 40_000_000).await?;
    // b holds 70% of both, c 30%: b is the first choice.
    for (node, n) in [(&b, 350), (&c, 150)] {
        let mut held: Vec<u64> = c1[..n].to_vec();
        held.extend_from_slice(&c2[..n]);
        publish_digest(&ns.client, node, "wg-1", vec![], &held).await?;
    }
    let mut uids = Vec::new();
    for name in ["vm1", "vm2"] {
        let v: VirtualMachineInstance = ns.api().get(name).await?;
        uids.push(v.metadata.uid.clone().unwrap_or_default());
    }
    let blocker: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "keeps-the-group-off", "namespace": ns.name},
        "spec": {
            "nodeName": b,
            "containers": [{"name": "c", "image": "registry.invalid/none"}],
            "affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
                "labelSelector": {"matchExpressions": [{
                    "key": "kubevirt.io/created-by", "operator": "In", "values": uids}]},
                "topologyKey": "kubernetes.io/hostname"}]}}
        }
    }))?;
    let pods: Api<Pod> = ns.api();
    pods.create(&PostParams::default(), &blocker).await?;

    let mut spec = vmm_spec("vm1");
    spec.group = Some(commonground::api::migration::GroupMode::Together);
    spec.unschedulable_timeout = Some("3s".into());
    spec.max_attempts = Some(2);
    create_vmm(&ns, "move-group", spec).await?;
    // Two attempts of two KubeVirt migrations each, the first pair ended by virt-controller's
    // unschedulable timeout: on this shared machine that took up to about two minutes, so
    // the wait is longer than the single-request test's.
    let api: Api<VirtualMachineMigration> = ns.api();
    let done = wait_for_object(
        &api,
        "move-group",
        2 * T,
        "the group moved or failed",
        |m| m.status.as_ref().is_some_and(|s| s.phase.is_final()),
    )
    .await;
    if done.is_err() {
        eprintln!("controller log:\n{}", common::controller_log());
        eprintln!("{}", ns.dump().await);
    }
    let done = done?;
    eprintln!(
        "together replan e2e: request final after {:.1} s",
        started.elapsed().as_secs_f64()
    );
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:?}");
    assert_eq!(status.target_node.as_deref(), Some(c.as_str()));
    let attempts: Vec<(&str, AttemptOutcome)> = status
        .attempts
        .iter()
        .map(|a| (a.node.as_str(), a.outcome))
        .collect();
    assert_eq!(
        attempts,
        vec![
            (b.as_str(), AttemptOutcome::Failed),
            (c.as_str(), AttemptOutcome::Succeeded)
        ],
        "{:?}",
        status.attempts
    );
    assert!(
        status.attempts[0].reason.contains("never ran on"),
        "{:?}",
        status.attempts[0]
    );
    assert_eq!(status.members.len(), 1);
    assert_eq!(status.members[0].phase, "Succeeded");
    let member_vmim = status.members[0]
        .kubevirt_migration
        .clone()
        .unwrap_or_default();
    assert_eq!(
        member_vmim,
        format!("{}-m-vm2", status.attempts[1].kubevirt_migration),
        "the member moved by a migration of the second attempt"
    );
    for name in ["vm1", "vm2"] {
        let v: VirtualMachineInstance = ns.api().get(name).await?;
        assert_eq!(
            v.node_name(),
            Some(c.as_str()),
            "{name} moved with the group"
        );
    }
    // Two KubeVirt migrations per attempt, each pinned to the attempt's node; nothing else.
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    let made = vmims.list(&ListParams::default()).await?.items;
    let mut seen: Vec<(String, String, String)> = made
        .iter()
        .map(|m| {
            (
                m.spec.vmi_name.clone(),
                m.spec
                    .added_node_selector
                    .as_ref()
                    .and_then(|s| s.get("kubernetes.io/hostname").cloned())
                    .unwrap_or_default(),
                m.phase().unwrap_or_default().to_string(),
            )
        })
        .collect();
    seen.sort();
    let expected =
        |vm: &str, node: &str, phase: &str| (vm.to_string(), node.to_string(), phase.to_string());
    let mut want = vec![
        expected("vm1", &b, "Failed"),
        expected("vm1", &c, "Succeeded"),
        expected("vm2", &b, "Failed"),
        expected("vm2", &c, "Succeeded"),
    ];
    want.sort();
    assert_eq!(seen, want);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_digest_made_under_another_cluster_key_is_flagged_on_the_digest_and_by_an_event(
) -> anyhow::Result<()> {
    use commonground::controller::keys::KEY_CONDITION;
    use kube::api::{Patch, PatchParams};
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("key-mismatch").await?;
    let (good, bad) = (ns.node_name("good"), ns.node_name("bad"));
    for n in [&good, &bad] {
        ns.create_fake_node(FakeNode::new(n, "wg-1")).await?;
        publish_digest(&ns.client, n, "wg-1", vec![], &keys(0, 10)).await?;
    }
    // The "bad" node's agent runs with another key (a wrong Secret): every other digest in
    // this cluster uses the development key, so that is the one accepted.
    let other_key = "0123456789abcdef";
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    digests
        .patch_status(
            &bad,
            &PatchParams::default(),
            &Patch::Merge(serde_json::json!({"status": {"keyId": other_key}})),
        )
        .await?;
    let condition = |node: String| {
        let digests = digests.clone();
        async move {
            let d = digests.get(&node).await.ok()?;
            d.status?
                .conditions
                .into_iter()
                .find(|c| c.r#type == KEY_CONDITION)
        }
    };
    let refused = until("KeyAccepted=False on the bad node's digest", T, || {
        let c = condition(bad.clone());
        async move { c.await.filter(|c| c.status == "False") }
    })
    .await
    .map_err(|e| anyhow::anyhow!("{e:#}\ncontroller log:\n{}", common::controller_log()))?;
    assert_eq!(refused.reason, "KeyNotAccepted");
    assert!(refused.message.contains(other_key), "{}", refused.message);
    let accepted = until("KeyAccepted=True on the good node's digest", T, || {
        let c = condition(good.clone());
        async move { c.await.filter(|c| c.status == "True") }
    })
    .await?;
    assert!(!accepted.message.contains(other_key));
    let events: Api<Event> = Api::all(ns.client.clone());
    until("a KeyNotAccepted Event about the bad digest", T, || {
        let events = events.clone();
        let bad = bad.clone();
        async move {
            let list = events.list(&ListParams::default()).await.ok()?;
            list.items.into_iter().find(|e| {
                e.reason.as_deref() == Some("KeyNotAccepted")
                    && e.involved_object.name.as_deref() == Some(bad.as_str())
            })
        }
    })
    .await?;
    // The agent publishes again under the accepted key: accepted again.
    publish_digest(&ns.client, &bad, "wg-1", vec![], &keys(0, 10)).await?;
    until("KeyAccepted=True again once the key is right", T, || {
        let c = condition(bad.clone());
        async move { c.await.filter(|c| c.status == "True") }
    })
    .await?;
    for n in [&good, &bad] {
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }
    Ok(())
}
