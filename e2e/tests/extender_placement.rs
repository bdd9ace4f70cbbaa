//! The real kube-scheduler calls `commonground extender` for a KubeVirt migration's target pod:
//! the pod lands on the node holding most of the VM's memory (or on the node a
//! VirtualMachineMigration chose), never on the source.
//!
//! The extender runs as a child process (`commonground extender`, built with cargo) on a free
//! loopback port, watching the test control plane. Because kube-scheduler's extender is a
//! cluster-wide setting, these tests bring up a control plane of their own (state dir under
//! `target/`), so other e2e suites sharing the default cluster never depend on this process.

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::OnceLock;
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use commonground::api::digest::{summary_into_status, NodeRegionDigest, NodeRegionDigestSpec};
use commonground::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL,
    MIGRATION_JOB_NAME_ANNOTATION, MIGRATION_JOB_UID_LABEL,
};
use commonground::api::VirtualMachineMigration;
use commonground::plan::region::RegionGeometry;
use commonground::plan::sketch::{RegionSketch, KEY_SPACE};
use commonground::plan::{NodeRegionSummary, VmKey, VmRegionSummary};
use commonground_e2e::{wait_for, wait_for_object, FakeNode, TestCluster, TestNamespace};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, ResourceExt};
use serde_json::json;

mod common;

const T: Duration = Duration::from_secs(60);

/// The work groups of the long-distance test: wg-near is nearer the source's wg-src than wg-far.
const DISTANCES: &str = "wg-src:wg-near=10,wg-src:wg-far=20,wg-near:wg-far=10";

/// The extender's address, started once per test process (with the cluster that calls it).
fn extender() -> SocketAddr {
    static ADDR: OnceLock<SocketAddr> = OnceLock::new();
    *ADDR
        .get_or_init(|| start_extender().unwrap_or_else(|e| panic!("starting the extender: {e:#}")))
}

fn repo_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the repository")
        .to_path_buf()
}

/// Builds `commonground` and returns the executable cargo reports.
fn build_binary() -> anyhow::Result<PathBuf> {
    let cargo = std::env::var("CARGO").unwrap_or_else(|_| "cargo".into());
    let out = Command::new(cargo)
        .current_dir(repo_dir())
        .args([
            "build",
            "-p",
            "commonground",
            "--bin",
            "commonground",
            "--message-format=json-render-diagnostics",
        ])
        .stderr(Stdio::inherit())
        .output()
        .context("running cargo build")?;
    if !out.status.success() {
        bail!("cargo build --bin commonground failed");
    }
    String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
        .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "commonground")
        .find_map(|m| m["executable"].as_str().map(PathBuf::from))
        .ok_or_else(|| anyhow!("cargo reported no commonground executable"))
}

fn start_extender() -> anyhow::Result<SocketAddr> {
    let binary = build_binary()?;
    let addr = TcpListener::bind("127.0.0.1:0")?.local_addr()?;
    // A control plane of our own (see the module comment).
    let state = repo_dir().join("target").join("e2e-extender-cluster");
    std::env::set_var("COMMONGROUND_CLUSTER_STATE", &state);
    let cluster = TestCluster::get_with_extender(Some(&format!("http://{addr}")));
    let log = state.join("extender.log");
    let log_file = std::fs::File::create(&log)?;
    let kubeconfig = cluster.kubeconfig.clone();
    let (tx, rx) = std::sync::mpsc::channel();
    // The child gets SIGKILL when the thread that started it exits; this thread lives until
    // the test process ends.
    std::thread::spawn(move || {
        use std::os::unix::process::CommandExt;
        let mut cmd = Command::new(&binary);
        cmd.args(["extender", "--listen", &addr.to_string()])
            // The long-distance rule for the migrations the extender places, with distances
            // for the work-group test (the other tests' nodes are all in wg-1).
            .args(["--default-scope", "cluster", "--distances", DISTANCES])
            .env("KUBECONFIG", &kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(log_file);
        for v in [
            "HTTP_PROXY",
            "HTTPS_PROXY",
            "ALL_PROXY",
            "http_proxy",
            "https_proxy",
            "all_proxy",
        ] {
            cmd.env_remove(v);
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let r = cmd.spawn();
        let ok = r.is_ok();
        let _ = tx.send(r.map(|_| ()));
        if ok {
            loop {
                std::thread::park();
            }
        }
    });
    rx.recv()?.context("spawning commonground extender")?;
    // Ready once its watches have delivered the first full lists.
    let deadline = std::time::Instant::now() + T;
    loop {
        if let Ok((200, _)) = common::http(addr, "GET", "/readyz", b"") {
            eprintln!("extender ready on {addr} (log: {})", log.display());
            return Ok(addr);
        }
        if std::time::Instant::now() > deadline {
            bail!(
                "extender not ready after {T:?}; log:\n{}",
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn vm_summary(vm: VmKey, keys: std::ops::Range<u64>) -> VmRegionSummary {
    let sketch = RegionSketch::from_keys(KEY_SPACE, keys);
    let regions = sketch.len() as u64;
    VmRegionSummary {
        vm,
        memory_bytes: regions * RegionGeometry::default().region_bytes(),
        regions,
        zero_regions: 0,
        sketch,
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.1,
    }
}

/// Publishes `node`'s NodeRegionDigest holding `vms` (status written through the API, as the
/// agent does).
async fn publish_digest(
    ns: &TestNamespace,
    node: &str,
    vms: Vec<VmRegionSummary>,
) -> anyhow::Result<()> {
    let summary = NodeRegionSummary {
        node: node.into(),
        work_group: "wg-1".into(),
        geometry: RegionGeometry::default(),
        key_id: "e2e".into(),
        sketch: RegionSketch::union_all(vms.iter().map(|v| &v.sketch)),
        vms,
    };
    let mut status = Default::default();
    summary_into_status(&summary, &mut status);
    status.scan_time = commonground_e2e::standin::now_rfc3339();
    status.scan_mode = "Full".into();
    let api: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    let mut d = NodeRegionDigest::new(
        node,
        NodeRegionDigestSpec {
            node_name: node.into(),
        },
    );
    d.metadata.labels =
        Some([(commonground_e2e::E2E_LABEL.to_string(), "true".to_string())].into());
    api.create(&PostParams::default(), &d)
        .await
        .with_context(|| format!("creating NodeRegionDigest {node}"))?;
    api.patch_status(
        node,
        &PatchParams::default(),
        &Patch::Merge(json!({ "status": status })),
    )
    .await
    .with_context(|| format!("writing NodeRegionDigest {node} status"))?;
    Ok(())
}

/// Binds a pod that takes half of `node` (no kubelet: it stays Pending, but counts).
async fn fill_half(ns: &TestNamespace, node: &str) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": format!("filler-{node}")},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "registry.invalid/filler",
                 "resources": {"requests": {"cpu": "8", "memory": "32Gi"}}}]}
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    Ok(())
}

struct Setup {
    ns: TestNamespace,
    _standin: commonground_e2e::cluster::StandinHandle,
    source: String,
    /// Holds 90% of the VM's regions but is half full.
    rich: String,
    /// Empty, holds 5% of the VM's regions.
    poor: String,
    vmi: VirtualMachineInstance,
}

/// Three nodes; the VM runs on one; the other two get digests and load as described.
async fn setup(prefix: &str) -> anyhow::Result<Setup> {
    let ext = extender();
    let ns = TestCluster::get_with_extender(Some(&format!("http://{ext}")))
        .fresh_namespace(prefix)
        .await?;
    let standin = ns.start_standin(ns.standin_config());
    let mut names = Vec::new();
    for s in ["a", "b", "c"] {
        let n = ns.node_name(s);
        ns.create_fake_node(FakeNode::new(&n, "wg-1")).await?;
        names.push(n);
    }
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    let vmi = wait_for_object(&vmis, "vm", T, "VMI Running", |v| {
        v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await?;
    let source = vmi
        .status
        .as_ref()
        .and_then(|s| s.node_name.clone())
        .unwrap();
    let others: Vec<String> = names.into_iter().filter(|n| *n != source).collect();
    let (rich, poor) = (others[0].clone(), others[1].clone());
    let key = VmKey::new(ns.name.clone(), "vm");
    publish_digest(&ns, &source, vec![vm_summary(key, 0..2000)]).await?;
    publish_digest(
        &ns,
        &rich,
        vec![vm_summary(VmKey::new(ns.name.clone(), "twin"), 0..1800)],
    )
    .await?;
    publish_digest(
        &ns,
        &poor,
        vec![vm_summary(VmKey::new(ns.name.clone(), "other"), 1900..6000)],
    )
    .await?;
    // Without the extender, kube-scheduler's own scoring would prefer the empty node.
    fill_half(&ns, &rich).await?;
    Ok(Setup {
        ns,
        _standin: standin,
        source,
        rich,
        poor,
        vmi,
    })
}

/// Asks the extender directly, as kube-scheduler will, until its view has caught up with the
/// objects the test wrote (`ok` judges its answer).
async fn until_extender_sees(
    s: &Setup,
    verb: &str,
    what: &str,
    ok: impl Fn(&serde_json::Value) -> bool,
) -> anyhow::Result<()> {
    let uid = s.vmi.uid().unwrap_or_default();
    let body = serde_json::to_vec(&json!({
        "Pod": {"metadata": {"name": "probe", "namespace": s.ns.name,
            "labels": {MIGRATION_JOB_UID_LABEL: "probe", CREATED_BY_LABEL: uid}}},
        "NodeNames": [s.source, s.rich, s.poor]
    }))?;
    let addr = extender();
    wait_for(what, T, || {
        let body = body.clone();
        let ok = &ok;
        async move {
            let (status, text) = common::http(addr, "POST", &format!("/{verb}"), &body)?;
            let v: serde_json::Value = serde_json::from_str(&text).unwrap_or_default();
            Ok((status == 200 && ok(&v)).then_some(()))
        }
    })
    .await
}

/// Migrates like a node drain does (a VMIM created directly) and returns the target pod's node.
async fn drain_and_target_node(s: &Setup) -> anyhow::Result<String> {
    s.ns.create_vmim("drain-vm", "vm", &[]).await?;
    let vmims: Api<VirtualMachineInstanceMigration> = s.ns.api();
    let done = wait_for_object(&vmims, "drain-vm", T, "VMIM final", |m| m.is_final()).await?;
    assert_eq!(done.phase(), Some("Succeeded"), "{}", s.ns.dump().await);
    let pods: Api<Pod> = s.ns.api();
    let targets = pods
        .list(&ListParams::default().labels(MIGRATION_JOB_UID_LABEL))
        .await?
        .items;
    let target = targets
        .iter()
        .find(|p| {
            p.annotations()
                .get(MIGRATION_JOB_NAME_ANNOTATION)
                .map(String::as_str)
                == Some("drain-vm")
        })
        .ok_or_else(|| anyhow!("no target pod for drain-vm"))?;
    target
        .spec
        .as_ref()
        .and_then(|sp| sp.node_name.clone())
        .ok_or_else(|| anyhow!("target pod not bound"))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_migration_lands_on_the_node_holding_most_of_the_vms_memory() -> anyhow::Result<()> {
    let s = setup("ext-mem").await?;
    let rich = s.rich.clone();
    until_extender_sees(
        &s,
        "prioritize",
        "the extender to rank the rich node first",
        |v| {
            v.as_array().is_some_and(|l| {
                l.iter()
                    .any(|h| h["Host"] == rich.as_str() && h["Score"] == 10)
            })
        },
    )
    .await?;
    let target = drain_and_target_node(&s).await?;
    assert_ne!(target, s.source, "target pod placed on the source node");
    assert_eq!(target, s.rich, "{}", s.ns.dump().await);
    let vmis: Api<VirtualMachineInstance> = s.ns.api();
    let vmi = vmis.get("vm").await?;
    assert_eq!(vmi.status.and_then(|st| st.node_name), Some(s.rich.clone()));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_chosen_by_a_virtual_machine_migration_wins_over_memory() -> anyhow::Result<()> {
    let s = setup("ext-pin").await?;
    let vmm: VirtualMachineMigration = serde_json::from_value(json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": "move-vm", "namespace": s.ns.name},
        "spec": {"vmiName": "vm"}
    }))?;
    let vmms: Api<VirtualMachineMigration> = s.ns.api();
    vmms.create(&PostParams::default(), &vmm).await?;
    vmms.patch_status(
        "move-vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"status": {"phase": "Migrating", "targetNode": s.poor}})),
    )
    .await?;
    let poor = s.poor.clone();
    until_extender_sees(&s, "filter", "the extender to pin the VMM's target", |v| {
        v["NodeNames"] == json!([poor.as_str()])
    })
    .await?;
    let target = drain_and_target_node(&s).await?;
    assert_eq!(target, s.poor, "{}", s.ns.dump().await);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_memory_group_member_follows_its_group_rather_than_the_memory() -> anyhow::Result<()> {
    use commonground::api::migration::MEMORY_GROUP_LABEL;
    let s = setup("ext-group").await?;
    // vm shares memory with "mate", which already runs on the poor node: the drain must not
    // split the group, although the rich node holds more of vm's memory.
    let vmis: Api<VirtualMachineInstance> = s.ns.api();
    vmis.patch(
        "vm",
        &PatchParams::default(),
        &Patch::Merge(json!({"metadata": {"labels": {MEMORY_GROUP_LABEL: "g"}}})),
    )
    .await?;
    let mut mate = s.ns.vmi("mate", "1Gi", "1");
    mate.metadata.labels = Some([(MEMORY_GROUP_LABEL.to_string(), "g".to_string())].into());
    mate.spec
        .node_selector
        .get_or_insert_with(Default::default)
        .insert("kubernetes.io/hostname".into(), s.poor.clone());
    s.ns.create_vmi(mate).await?;
    wait_for_object(&vmis, "mate", T, "mate Running on the poor node", |v| {
        v.node_name() == Some(s.poor.as_str())
            && v.status.as_ref().and_then(|st| st.phase.as_deref()) == Some("Running")
    })
    .await?;
    let poor = s.poor.clone();
    until_extender_sees(&s, "filter", "the extender to pin vm to its group", |v| {
        v["NodeNames"] == json!([poor.as_str()])
    })
    .await?;
    let target = drain_and_target_node(&s).await?;
    assert_eq!(target, s.poor, "{}", s.ns.dump().await);
    Ok(())
}

/// A VM summary sketched at one region in 16, as agents publish them (`held` of the
/// `regions` the VM has, by index; the same index is the same content on every node).
fn sampled_summary(ns: &str, name: &str, regions: u64, held: u64) -> VmRegionSummary {
    let keys = common::keys(0, held);
    VmRegionSummary {
        vm: VmKey::new(ns, name),
        memory_bytes: regions * RegionGeometry::default().region_bytes(),
        regions,
        zero_regions: 0,
        sketch: RegionSketch::from_keys(KEY_SPACE / 16, keys),
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.1,
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drain_migration_goes_to_the_nearer_of_two_work_groups_within_the_sampling_error(
) -> anyhow::Result<()> {
    let ext = extender();
    let ns = TestCluster::get_with_extender(Some(&format!("http://{ext}")))
        .fresh_namespace("ext-near")
        .await?;
    let _standin = ns.start_standin(ns.standin_config());
    // The VM starts on the only node, then two work groups appear: wg-far holds 90% of its
    // memory, wg-near (nearer the source's wg-src) 88.75%. About 25 of the ~2,000 sampled
    // regions apart, well within the sampling error: a tie, and the nearer work group wins.
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-src"))
        .await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    let vmi = wait_for_object(&vmis, "vm", T, "VMI Running", |v| {
        v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await?;
    assert_eq!(vmi.node_name(), Some(source.as_str()));
    let (near, far) = (ns.node_name("near"), ns.node_name("far"));
    ns.create_fake_node(FakeNode::new(&near, "wg-near")).await?;
    ns.create_fake_node(FakeNode::new(&far, "wg-far")).await?;
    let regions = 32_000;
    for (node, group, name, held) in [
        (&source, "wg-src", "vm", regions),
        (&far, "wg-far", "twin-far", 28_800),
        (&near, "wg-near", "twin-near", 28_400),
    ] {
        common::publish_digest(
            &ns.client,
            node,
            group,
            vec![sampled_summary(&ns.name, name, regions, held)],
            &[],
        )
        .await?;
    }
    // (Here `rich` and `poor` are just the two candidates, in the order the probe lists them.)
    let s = Setup {
        source: source.clone(),
        rich: near.clone(),
        poor: far.clone(),
        vmi,
        ns,
        _standin,
    };
    let near_first = near.clone();
    until_extender_sees(
        &s,
        "prioritize",
        "the extender to rank the nearer work group first",
        |v| {
            v.as_array().is_some_and(|l| {
                l.iter()
                    .any(|h| h["Host"] == near_first.as_str() && h["Score"] == 10)
            })
        },
    )
    .await?;
    let target = drain_and_target_node(&s).await?;
    assert_eq!(target, near, "{}", s.ns.dump().await);
    Ok(())
}
