//! Benchmark: the controller and the extender at KubeVirt's own density-test scale, on the real
//! API server: 8,000 nodes, 8,000 running VMIs with their virt-launcher pods, and 8,000
//! NodeRegionDigests of realistic size (each node holds one 4 GiB VM, a quarter of it zero,
//! two fifths of the rest shared with the VMs of the same guest image; sketched at one region
//! in 16 as agents publish them).
//!
//! For each component it prints, and writes as JSON to `target/bench-scale.json`:
//! - resident memory once ready and after the decisions (and the peak), against the goals
//!   (controller at most 150 MiB, extender at most 200 MiB);
//! - time from start to ready (`/readyz`), every watch listed and the planner built;
//! - decision latency at that scale: the controller's `plan_duration_seconds` for dry-run
//!   VirtualMachineMigrations, the extender's prioritize answers for migration target pods
//!   (timed by the client, the whole node list in each request as kube-scheduler sends it with
//!   `nodeCacheCapable`, and by the extender's own histogram).
//!
//! Not part of `make test` (setting up 8,000 of each takes minutes): run it with
//! `e2e/run-tests bench-scale`. It brings up a control plane of its own under `target/`, and
//! no KubeVirt controller (the VMIs are written as running, and nothing acts on them); it
//! uses the release binary (built on demand unless `COMMONGROUND_BIN` names one).
//! Environment: `BENCH_SCALE_NODES` (8000; as many VMs), `BENCH_SCALE_DECISIONS` (200).

mod common;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use common::{env_usize, free_port, keys, repo_dir, Component};
use commonground::api::kubevirt::{
    VirtualMachineInstance, CREATED_BY_LABEL, MIGRATION_JOB_UID_LABEL,
};
use commonground::api::migration::{MigrationPhase, VirtualMachineMigration};
use commonground::plan::region::{ClusterKey, RegionGeometry};
use commonground::plan::sketch::{RegionSketch, KEY_SPACE};
use commonground::plan::VmKey;
use commonground::plan::{NodeRegionSummary, VmRegionSummary};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{ConfigMap, Namespace, Pod};
use kube::api::{ListParams, Patch, PatchParams, PostParams};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use commonground_e2e::{create_bench_nodes, TestCluster};

const WORK_GROUPS: usize = 8;
const IMAGES: u64 = 8;
const CREATE_CONCURRENCY: usize = 16;
const NAMESPACE: &str = "density";
const GIB: u64 = 1 << 30;
const MIB: f64 = (1 << 20) as f64;
/// Each VM's guest memory.
const VM_MEMORY: u64 = 4 * GIB;
/// The sampling agents publish at: one region in 16.
const SAMPLED_BELOW: u64 = KEY_SPACE / 16;
const PLAN_HISTOGRAM: &str = "commonground_controller_plan_duration_seconds";

fn vm_name(i: usize) -> String {
    format!("vm-{i:05}")
}

/// VM `i`'s memory: a quarter zero; of the rest, two fifths its guest image's (shared with the
/// other VMs of that image) and three fifths its own; sampled as agents sample.
fn vm_summary(i: usize) -> VmRegionSummary {
    let regions = RegionGeometry::default().regions_in(VM_MEMORY);
    let nonzero = regions * 3 / 4;
    let image = nonzero * 2 / 5;
    let content = keys(1_000_000_000 * (i as u64 % IMAGES + 1), image)
        .into_iter()
        .chain(keys(
            100_000_000_000 + 1_000_000 * i as u64,
            nonzero - image,
        ));
    VmRegionSummary {
        vm: VmKey::new(NAMESPACE, vm_name(i)),
        memory_bytes: VM_MEMORY,
        regions,
        zero_regions: regions - nonzero,
        sketch: RegionSketch::from_keys(SAMPLED_BELOW, content),
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.2,
    }
}

/// Creates the VMI running on `node`, its status, and its virt-launcher pod bound there.
async fn create_vm(client: &Client, i: usize, node: &str) -> anyhow::Result<()> {
    let name = vm_name(i);
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let vmi: VirtualMachineInstance = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": NAMESPACE},
        "spec": {"domain": {
            "cpu": {"cores": 2},
            "memory": {"guest": "4Gi"},
            "resources": {"requests": {"memory": "4Gi", "cpu": "2"}},
            "devices": {},
        }},
    }))?;
    let vmi = match vmis.create(&PostParams::default(), &vmi).await {
        Ok(v) => v,
        Err(kube::Error::Api(e)) if e.code == 409 => vmis.get(&name).await?,
        Err(e) => return Err(e.into()),
    };
    let uid = vmi.uid().ok_or_else(|| anyhow!("{name} has no uid"))?;
    vmis.patch_status(
        &name,
        &PatchParams::default(),
        &Patch::Merge(
            json!({"status": {"phase": "Running", "nodeName": node, "conditions": [
                {"type": "Ready", "status": "True"},
                {"type": "LiveMigratable", "status": "True"},
            ]}}),
        ),
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), NAMESPACE);
    let pod: Pod = serde_json::from_value(json!({
        "apiVersion": "v1", "kind": "Pod",
        "metadata": {"name": format!("virt-launcher-{name}"), "namespace": NAMESPACE,
            "labels": {"kubevirt.io": "virt-launcher", CREATED_BY_LABEL: uid,
                       "vm.kubevirt.io/name": name}},
        "spec": {
            "nodeName": node,
            "containers": [{"name": "compute", "image": "bench.invalid/none", "resources": {
                "requests": {"cpu": "2", "memory": "4390Mi", "ephemeral-storage": "50M"},
                "limits": {"devices.kubevirt.io/kvm": "1", "devices.kubevirt.io/tun": "1",
                           "devices.kubevirt.io/vhost-net": "1"}}}],
            "tolerations": [{"operator": "Exists"}],
        },
    }))?;
    match pods.create(&PostParams::default(), &pod).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    Ok(())
}

/// Publishes node `node`'s digest: its VM and 2,000 regions of its own (host memory).
async fn publish_digest(client: &Client, i: usize, node: &str) -> anyhow::Result<usize> {
    let vm = vm_summary(i);
    let host = keys(200_000_000_000 + 1_000_000 * i as u64, 2_000 * 16);
    let all = vm.sketch.keys().iter().copied().chain(host);
    let summary = NodeRegionSummary {
        node: node.into(),
        work_group: format!("wg-{}", i % WORK_GROUPS),
        geometry: RegionGeometry::default(),
        key_id: ClusterKey::development().key_id,
        sketch: RegionSketch::from_keys(SAMPLED_BELOW, all),
        vms: vec![vm],
    };
    common::publish_summary(client, &summary).await
}

/// Runs `f(i, node)` for every node, `CREATE_CONCURRENCY` at a time.
async fn for_each_node<F, Fut, T>(nodes: &[String], f: F) -> anyhow::Result<Vec<T>>
where
    F: Fn(usize, String) -> Fut,
    Fut: std::future::Future<Output = anyhow::Result<T>>,
{
    futures::stream::iter(nodes.iter().enumerate().map(|(i, n)| f(i, n.clone())))
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect()
        .await
}

/// Resident and peak resident memory of process `pid`, in MiB.
fn memory_mib(pid: u32) -> anyhow::Result<(f64, f64)> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let field = |name: &str| -> anyhow::Result<f64> {
        let line = status
            .lines()
            .find(|l| l.starts_with(name))
            .ok_or_else(|| anyhow!("no {name} for {pid}"))?;
        let kib: f64 = line
            .split_whitespace()
            .nth(1)
            .and_then(|v| v.parse().ok())
            .ok_or_else(|| anyhow!("bad {line}"))?;
        Ok(kib * 1024.0 / MIB)
    };
    Ok((field("VmRSS:")?, field("VmHWM:")?))
}

/// Starts `args` (its health server on `health`) and waits for `/readyz`: the component and
/// the seconds it took.
async fn start_until_ready(
    args: &[&str],
    name: &str,
    health: SocketAddr,
) -> anyhow::Result<(Component, f64)> {
    let t = Instant::now();
    let c = Component::start(args, name);
    while !matches!(common::http(health, "GET", "/readyz", b""), Ok((200, _))) {
        if t.elapsed() > Duration::from_secs(600) {
            bail!("{name} not ready after 600 s:\n{}", c.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    Ok((c, t.elapsed().as_secs_f64()))
}

/// The `q` quantile of a Prometheus histogram on `/metrics` (`name`, lines also containing
/// `filter`), linearly interpolated inside its bucket, in milliseconds; and the count.
fn histogram_quantile(text: &str, name: &str, filter: &str, q: f64) -> Option<(f64, u64)> {
    let mut buckets: Vec<(f64, f64)> = text
        .lines()
        .filter(|l| l.starts_with(&format!("{name}_bucket")) && l.contains(filter))
        .filter_map(|l| {
            let le = l.split("le=\"").nth(1)?.split('"').next()?;
            let le = if le == "+Inf" {
                f64::INFINITY
            } else {
                le.parse().ok()?
            };
            Some((le, l.rsplit(' ').next()?.parse().ok()?))
        })
        .collect();
    buckets.sort_by(|a, b| a.0.total_cmp(&b.0));
    let total = buckets.last()?.1;
    if total == 0.0 {
        return None;
    }
    let rank = q * total;
    let mut below = (0.0, 0.0);
    for &(le, count) in &buckets {
        if count >= rank {
            if le.is_infinite() {
                return Some((below.0 * 1e3, total as u64));
            }
            let share = (rank - below.1) / (count - below.1).max(1.0);
            return Some(((below.0 + share * (le - below.0)) * 1e3, total as u64));
        }
        below = (le, count);
    }
    None
}

fn quantile_ms(sorted: &[f64], q: f64) -> f64 {
    let i = ((sorted.len() as f64 * q).ceil() as usize).clamp(1, sorted.len()) - 1;
    sorted[i] * 1e3
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of several minutes: e2e/run-tests bench-scale"]
async fn bench_scale_controller_and_extender_at_density_test_scale() -> anyhow::Result<()> {
    let n = env_usize("BENCH_SCALE_NODES", 8000);
    let decisions = env_usize("BENCH_SCALE_DECISIONS", 200);
    if n == 0 || decisions == 0 {
        bail!("BENCH_SCALE_NODES and BENCH_SCALE_DECISIONS must be at least 1");
    }
    if std::env::var_os("COMMONGROUND_BIN").is_none() {
        let status = std::process::Command::new(env!("CARGO"))
            .args([
                "build",
                "--quiet",
                "--release",
                "-p",
                "commonground",
                "--bin",
                "commonground",
            ])
            .current_dir(repo_dir())
            .status()?;
        if !status.success() {
            bail!("building the release binary failed");
        }
        let target = std::env::var("CARGO_TARGET_DIR")
            .map(PathBuf::from)
            .unwrap_or_else(|_| repo_dir().join("target"));
        std::env::set_var("COMMONGROUND_BIN", target.join("release/commonground"));
    }
    let state = repo_dir().join("target").join("bench-scale-cluster");
    std::env::set_var("COMMONGROUND_CLUSTER_STATE", &state);
    // No KubeVirt controller: the VMIs are written as running, with their launcher pods, and
    // nothing else may act on them (KubeVirt's own would find pods it never made).
    std::env::set_var("COMMONGROUND_VIRT_CONTROLLER", "standin");
    let cluster = TestCluster::get_with_extender(None);
    let client = cluster.client().await?;

    let t = Instant::now();
    let nodes = create_bench_nodes(&client, n, WORK_GROUPS, CREATE_CONCURRENCY).await?;
    let nodes_s = t.elapsed().as_secs_f64();
    let nss: Api<Namespace> = Api::all(client.clone());
    match nss
        .create(
            &PostParams::default(),
            &serde_json::from_value(json!({"metadata": {"name": NAMESPACE}}))?,
        )
        .await
    {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    // A cluster kept from an earlier run holds its VMs and digests already (a ConfigMap
    // records the setup that completed).
    let marks: Api<ConfigMap> = Api::namespaced(client.clone(), NAMESPACE);
    let mark = format!("bench-scale-setup-{n}");
    let (mut vms_s, mut digests_s, mut digest_kib) = (0.0, 0.0, 0.0);
    if marks.get_opt(&mark).await?.is_none() {
        let t = Instant::now();
        for_each_node(&nodes, |i, node| {
            let client = client.clone();
            async move { create_vm(&client, i, &node).await }
        })
        .await?;
        vms_s = t.elapsed().as_secs_f64();
        let t = Instant::now();
        let sizes = for_each_node(&nodes, |i, node| {
            let client = client.clone();
            async move { publish_digest(&client, i, &node).await }
        })
        .await?;
        digests_s = t.elapsed().as_secs_f64();
        digest_kib = sizes.iter().sum::<usize>() as f64 / sizes.len() as f64 / 1024.0;
        let kib = format!("{digest_kib:.1}");
        marks
            .create(
                &PostParams::default(),
                &serde_json::from_value(json!({"metadata": {"name": mark},
                    "data": {"digestStatusKiB": kib}}))?,
            )
            .await?;
    } else if let Some(kib) = marks
        .get(&mark)
        .await?
        .data
        .and_then(|d| d.get("digestStatusKiB").and_then(|v| v.parse().ok()))
    {
        digest_kib = kib;
    }
    println!(
        "BENCH scale: {n} nodes in {nodes_s:.0} s, {n} VMIs with launcher pods in {vms_s:.0} s, {n} digests (status {digest_kib:.1} KiB each) in {digests_s:.0} s (0: kept from an earlier run)"
    );

    // The controller.
    let health = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let health_arg = health.to_string();
    let (controller, controller_ready_s) = start_until_ready(
        &[
            "controller",
            "--no-leader-election",
            "--health-addr",
            &health_arg,
            "--migration-bandwidth",
            "125000000",
        ],
        "bench-scale-controller",
        health,
    )
    .await?;
    let controller_pid = controller.child.id();
    let (controller_rss_ready, _) = memory_mib(controller_pid)?;
    let vmms: Api<VirtualMachineMigration> = Api::namespaced(client.clone(), NAMESPACE);
    let suffix = format!("{:x}", chrono::Utc::now().timestamp() & 0xffffff);
    let t = Instant::now();
    futures::stream::iter((0..decisions).map(|d| {
        let vmms = vmms.clone();
        let suffix = suffix.clone();
        async move {
            let vmm: VirtualMachineMigration = serde_json::from_value(json!({
                "apiVersion": "commonground.dev/v1alpha1", "kind": "VirtualMachineMigration",
                "metadata": {"name": format!("dry-{suffix}-{d}")},
                "spec": {"vmiName": vm_name(d * 37 % n), "dryRun": true},
            }))?;
            vmms.create(&PostParams::default(), &vmm).await?;
            anyhow::Ok(())
        }
    }))
    .buffer_unordered(CREATE_CONCURRENCY)
    .try_collect::<Vec<_>>()
    .await?;
    loop {
        let planned = vmms
            .list(&ListParams::default())
            .await?
            .items
            .iter()
            .filter(|m| m.name_any().contains(&suffix))
            .filter(|m| {
                m.status
                    .as_ref()
                    .is_some_and(|s| s.phase == MigrationPhase::Planned)
            })
            .count();
        if planned == decisions {
            break;
        }
        if t.elapsed() > Duration::from_secs(600) {
            bail!(
                "{planned} of {decisions} planned after 600 s:\n{}",
                controller.log_tail()
            );
        }
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    let planned_s = t.elapsed().as_secs_f64();
    let (_, metrics) = common::http(health, "GET", "/metrics", b"")?;
    let plan_p50 = histogram_quantile(&metrics, PLAN_HISTOGRAM, "", 0.5);
    let plan_p99 = histogram_quantile(&metrics, PLAN_HISTOGRAM, "", 0.99);
    let (controller_rss, controller_peak) = memory_mib(controller_pid)?;
    drop(controller);

    // The extender.
    let listen = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let listen_arg = listen.to_string();
    let (extender, extender_ready_s) = start_until_ready(
        &["extender", "--listen", &listen_arg],
        "bench-scale-extender",
        listen,
    )
    .await?;
    let extender_pid = extender.child.id();
    let (extender_rss_ready, _) = memory_mib(extender_pid)?;
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), NAMESPACE);
    let mut times = Vec::with_capacity(decisions);
    let mut scored = 0;
    for d in 0..decisions {
        let vmi = vmis.get(&vm_name(d * 37 % n)).await?;
        let body = serde_json::to_vec(&json!({
            "Pod": {"metadata": {"name": format!("virt-launcher-target-{d}"), "namespace": NAMESPACE,
                "labels": {"kubevirt.io": "virt-launcher", MIGRATION_JOB_UID_LABEL: format!("job-{d}"),
                           CREATED_BY_LABEL: vmi.uid().unwrap_or_default()}}},
            "NodeNames": nodes,
        }))?;
        let t = Instant::now();
        let (status, text) =
            tokio::task::spawn_blocking(move || common::http(listen, "POST", "/prioritize", &body))
                .await??;
        times.push(t.elapsed().as_secs_f64());
        if status != 200 {
            bail!("prioritize answered {status}: {text}");
        }
        let v: serde_json::Value = serde_json::from_str(&text).context("prioritize answer")?;
        if v.as_array()
            .is_some_and(|l| l.iter().any(|h| h["Score"].as_i64() > Some(0)))
        {
            scored += 1;
        }
    }
    times.sort_by(f64::total_cmp);
    let (_, metrics) = common::http(listen, "GET", "/metrics", b"")?;
    let server = |q| {
        histogram_quantile(
            &metrics,
            "commonground_extender_request_duration_seconds",
            "verb=\"prioritize\"",
            q,
        )
    };
    let (server_p50, server_p99) = (server(0.5), server(0.99));
    let (extender_rss, extender_peak) = memory_mib(extender_pid)?;
    drop(extender);

    let verdict = |ok: bool| if ok { "met" } else { "not met" };
    let report = json!({
        "nodes": n, "vmis": n, "digests": n,
        "digestStatusKiB": digest_kib,
        "setupSeconds": {"nodes": nodes_s, "vmis": vms_s, "digests": digests_s},
        "controller": {
            "startToReadySeconds": controller_ready_s,
            "residentMiBReady": controller_rss_ready,
            "residentMiB": controller_rss,
            "peakResidentMiB": controller_peak,
            "residentGoalMiB": 150,
            "residentGoal": verdict(controller_peak <= 150.0),
            "decisions": decisions,
            "allPlannedSeconds": planned_s,
            "planMsP50": plan_p50.map(|p| p.0),
            "planMsP99": plan_p99.map(|p| p.0),
        },
        "extender": {
            "startToReadySeconds": extender_ready_s,
            "residentMiBReady": extender_rss_ready,
            "residentMiB": extender_rss,
            "peakResidentMiB": extender_peak,
            "residentGoalMiB": 200,
            "residentGoal": verdict(extender_peak <= 200.0),
            "prioritizeRequests": decisions,
            "prioritizeScored": scored,
            "prioritizeClientMsP50": quantile_ms(&times, 0.5),
            "prioritizeClientMsP99": quantile_ms(&times, 0.99),
            "prioritizeServerMsP50": server_p50.map(|p| p.0),
            "prioritizeServerMsP99": server_p99.map(|p| p.0),
            "prioritizeServerGoal": verdict(server_p99.is_some_and(|p| p.0 < 5.0)),
        },
    });
    let text = serde_json::to_string_pretty(&report)?;
    println!("BENCH scale: {text}");
    std::fs::write(repo_dir().join("target/bench-scale.json"), &text)?;
    // What the numbers stand on, checked: every request was planned from the digests, and
    // the extender ranked every target pod by memory in common (not neutrally).
    assert_eq!(scored, decisions, "prioritize answers without a preference");
    Ok(())
}
