//! Benchmark: what installing commonground's extender costs kube-scheduler, on the real
//! scheduler and API server, with 5,000 fake nodes.
//!
//! Four runs, one kube-scheduler process each, all with `deploy/scheduler`'s recommended
//! configuration (the extender stanza with `nodeCacheCapable`, weight 5 and `managedResources`)
//! or the same configuration without the extender:
//! - ordinary pods (cpu and memory requests only), without and with the extender;
//! - virt-launcher pods that are not migration targets (KubeVirt's labels, the device
//!   resources every launcher pod requests), without and with the extender.
//!
//! Each run's pods are created first, with a scheduler name no running scheduler serves; then
//! the run's scheduler starts, and the pods' bindings are timed from the watch (first binding to
//! last, so the scheduler's start and informer sync are not counted). The extender's own
//! counters show which pods reached it: ordinary pods never do, launcher pods always do.
//!
//! Not part of `make test` (it takes a few minutes): run it with
//! `e2e/run-tests --ignored bench_scheduler_throughput --nocapture`. It brings up a control plane of
//! its own under `target/`, so the 5,000 nodes never reach the shared test cluster. Environment:
//! `BENCH_NODES` (5000) and `BENCH_PODS` (pods per run, 1500).

mod common;

use std::collections::{BTreeMap, HashMap};
use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use common::{env_usize, free_port, repo_dir, Component};
use futures::{StreamExt, TryStreamExt};
use k8s_openapi::api::core::v1::{Namespace, Pod};
use kube::api::PostParams;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use commonground_e2e::{create_bench_nodes, TestCluster};

const WORK_GROUPS: usize = 8;
/// Concurrent requests while creating nodes and pods (the API server, not the client, limits).
const CREATE_CONCURRENCY: usize = 16;

/// What kind of pod a run schedules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PodKind {
    Ordinary,
    Launcher,
}

impl PodKind {
    fn name(self) -> &'static str {
        match self {
            PodKind::Ordinary => "ordinary",
            PodKind::Launcher => "launcher",
        }
    }
}

/// A pod of `kind` for `scheduler`. Launcher pods look like the ones KubeVirt's virt-controller
/// makes for a running VM (not a migration target): its labels and the device resources.
fn pod(kind: PodKind, name: &str, scheduler: &str) -> Pod {
    let (labels, resources) = match kind {
        PodKind::Ordinary => (
            json!({"app": "bench"}),
            json!({"requests": {"cpu": "100m", "memory": "128Mi"}}),
        ),
        PodKind::Launcher => (
            json!({"kubevirt.io": "virt-launcher", "kubevirt.io/created-by": format!("uid-{name}"),
                   "vm.kubevirt.io/name": name}),
            json!({
                "requests": {"cpu": "100m", "memory": "1294Mi", "ephemeral-storage": "50M"},
                "limits": {"devices.kubevirt.io/kvm": "1", "devices.kubevirt.io/tun": "1",
                           "devices.kubevirt.io/vhost-net": "1"},
            }),
        ),
    };
    serde_json::from_value(json!({
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "schedulerName": scheduler,
            // Fake nodes have no kubelet: nothing runs, the binding is what is measured.
            "containers": [{"name": "compute", "image": "bench.invalid/none", "resources": resources}],
            "tolerations": [{"operator": "Exists"}],
        },
    }))
    .expect("a valid pod")
}

/// kube-scheduler's configuration for one run: `deploy/scheduler/kube-scheduler-config.yaml`
/// with this cluster's kubeconfig, one profile named `scheduler`, no leader election, and the
/// extender stanza pointed at `extender` (or removed).
fn scheduler_config(
    kubeconfig: &Path,
    scheduler: &str,
    extender: Option<SocketAddr>,
) -> anyhow::Result<String> {
    let path = repo_dir().join("deploy/scheduler/kube-scheduler-config.yaml");
    let text = std::fs::read_to_string(&path)?;
    let mut cfg: serde_json::Value =
        serde_yaml_ng::from_str(&text).with_context(|| format!("parsing {}", path.display()))?;
    cfg["clientConnection"]["kubeconfig"] = json!(kubeconfig);
    // The client's default rate limit (50 QPS) would cap the scheduler's bindings: the bench
    // measures the scheduler, not its rate limiter.
    cfg["clientConnection"]["qps"] = json!(5000);
    cfg["clientConnection"]["burst"] = json!(5000);
    cfg["leaderElection"] = json!({"leaderElect": false});
    cfg["profiles"] = json!([{"schedulerName": scheduler}]);
    match extender {
        Some(addr) => {
            let ext = cfg["extenders"]
                .get_mut(0)
                .ok_or_else(|| anyhow!("no extender in {}", path.display()))?;
            ext["urlPrefix"] = json!(format!("http://{addr}"));
        }
        None => {
            cfg.as_object_mut().expect("a mapping").remove("extenders");
        }
    }
    Ok(serde_yaml_ng::to_string(&cfg)?)
}

/// A fresh namespace holding `n` unscheduled pods of `kind` for `scheduler`.
async fn create_pods(
    client: &Client,
    ns: &str,
    kind: PodKind,
    scheduler: &str,
    n: usize,
) -> anyhow::Result<()> {
    let nss: Api<Namespace> = Api::all(client.clone());
    nss.create(
        &PostParams::default(),
        &serde_json::from_value(json!({"metadata": {"name": ns}}))?,
    )
    .await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    futures::stream::iter(0..n)
        .map(|i| {
            let pods = pods.clone();
            async move {
                let p = pod(kind, &format!("{}-{i:05}", kind.name()), scheduler);
                pods.create(&PostParams::default(), &p).await
            }
        })
        .buffer_unordered(CREATE_CONCURRENCY)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(())
}

struct Run {
    kind: PodKind,
    with_extender: bool,
    pods: usize,
    /// Pods bound per second, first binding to last.
    rate: f64,
    /// Filter calls the extender answered during the run.
    extender_filters: u64,
}

/// Starts a kube-scheduler for `ns`'s pods and times their bindings.
async fn run(
    cluster: &TestCluster,
    client: &Client,
    ns: &str,
    kind: PodKind,
    extender: Option<SocketAddr>,
    n: usize,
) -> anyhow::Result<Run> {
    let scheduler = format!("bench-{ns}");
    create_pods(client, ns, kind, &scheduler, n).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    // The watch is up before the scheduler starts: every binding is seen as it happens.
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let (synced_tx, synced_rx) = tokio::sync::oneshot::channel::<()>();
    let watch = tokio::spawn(async move {
        let mut synced = Some(synced_tx);
        let mut stream = watcher(pods, watcher::Config::default()).boxed();
        while let Some(ev) = stream.next().await {
            match ev {
                Ok(watcher::Event::InitDone) => {
                    if let Some(s) = synced.take() {
                        let _ = s.send(());
                    }
                }
                Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p))
                    if p.spec.as_ref().is_some_and(|s| s.node_name.is_some()) =>
                {
                    let _ = tx.send((p.name_any(), Instant::now()));
                }
                _ => {}
            }
        }
    });
    synced_rx
        .await
        .context("pod watch ended before its first list")?;

    let filters_before = match extender {
        Some(a) => common::extender_filter_calls(a)?,
        None => 0,
    };
    let config_path = std::env::temp_dir().join(format!("commonground-bench-{scheduler}.yaml"));
    std::fs::write(
        &config_path,
        scheduler_config(&cluster.kubeconfig, &scheduler, extender)?,
    )?;
    let port = free_port()?.to_string();
    let cert_dir = std::env::temp_dir().join(format!("commonground-bench-{scheduler}-certs"));
    let binary = cluster.bin_dir()?.join("kube-scheduler");
    let args = [
        format!("--config={}", config_path.display()),
        "--bind-address=127.0.0.1".into(),
        format!("--secure-port={port}"),
        format!("--cert-dir={}", cert_dir.display()),
        "--profiling=false".into(),
        "--v=1".into(),
    ];
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut sched = Component::start_program(&binary, &args, &scheduler);

    let mut bound: HashMap<String, Instant> = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while bound.len() < n {
        let left = deadline.saturating_duration_since(Instant::now());
        match tokio::time::timeout(left, rx.recv()).await {
            Ok(Some((name, at))) => {
                bound.entry(name).or_insert(at);
            }
            Ok(None) => bail!("pod watch ended"),
            Err(_) => bail!(
                "{} of {n} pods bound after 300 s; scheduler log:\n{}",
                bound.len(),
                sched.log_tail()
            ),
        }
    }
    sched.kill();
    watch.abort();
    let first = bound.values().min().copied().expect("pods");
    let last = bound.values().max().copied().expect("pods");
    let span = last.duration_since(first).as_secs_f64().max(1e-3);
    let extender_filters = match extender {
        Some(a) => common::extender_filter_calls(a)? - filters_before,
        None => 0,
    };
    Ok(Run {
        kind,
        with_extender: extender.is_some(),
        pods: n,
        rate: (n - 1) as f64 / span,
        extender_filters,
    })
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "a benchmark of a few minutes: e2e/run-tests --ignored bench_scheduler_throughput"]
async fn bench_scheduler_throughput_with_and_without_the_extender() -> anyhow::Result<()> {
    let nodes = env_usize("BENCH_NODES", 5000);
    let per_run = env_usize("BENCH_PODS", 1500);
    // A control plane of its own (see the module comment).
    let state = repo_dir().join("target").join("bench-scheduler-cluster");
    std::env::set_var("COMMONGROUND_CLUSTER_STATE", &state);
    let cluster = TestCluster::get_with_extender(None);
    let client = cluster.client().await?;

    let t = Instant::now();
    create_bench_nodes(&client, nodes, WORK_GROUPS, CREATE_CONCURRENCY).await?;
    println!(
        "BENCH scheduler: {nodes} fake nodes ready in {:.1} s",
        t.elapsed().as_secs_f64()
    );

    let addr = SocketAddr::from(([127, 0, 0, 1], free_port()?));
    let ext = Component::start(
        &["extender", "--listen", &addr.to_string()],
        "bench-extender",
    );
    let ready_by = Instant::now() + Duration::from_secs(120);
    while !matches!(common::http(addr, "GET", "/readyz", b""), Ok((200, _))) {
        if Instant::now() > ready_by {
            bail!("extender not ready after 120 s:\n{}", ext.log_tail());
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }

    // A fresh suffix per invocation: the cluster (and its bound pods) may be reused.
    let suffix = format!("{:x}", chrono::Utc::now().timestamp() & 0xffffff);
    let mut runs = Vec::new();
    for (kind, with) in [
        (PodKind::Ordinary, false),
        (PodKind::Ordinary, true),
        (PodKind::Launcher, false),
        (PodKind::Launcher, true),
    ] {
        let ns = format!(
            "{}-{}-{suffix}",
            kind.name(),
            if with { "ext" } else { "plain" }
        );
        let r = run(cluster, &client, &ns, kind, with.then_some(addr), per_run).await?;
        println!(
            "BENCH scheduler: {} pods, {} the extender: {} pods bound at {:.1} pods/s ({} extender filter calls)",
            r.kind.name(),
            if r.with_extender { "with" } else { "without" },
            r.pods,
            r.rate,
            r.extender_filters
        );
        runs.push(r);
    }

    let by: BTreeMap<(&str, bool), &Run> = runs
        .iter()
        .map(|r| ((r.kind.name(), r.with_extender), r))
        .collect();
    for kind in [PodKind::Ordinary, PodKind::Launcher] {
        let (plain, ext) = (by[&(kind.name(), false)], by[&(kind.name(), true)]);
        let loss = 100.0 * (1.0 - ext.rate / plain.rate);
        let goal = if kind == PodKind::Ordinary { 5.0 } else { 25.0 };
        println!(
            "BENCH scheduler: {nodes} nodes, {} pods lose {loss:.1}% of the scheduler's throughput with the extender ({:.1} -> {:.1} pods/s; goal at most {goal}%: {})",
            kind.name(),
            plain.rate,
            ext.rate,
            if loss <= goal { "met" } else { "not met" }
        );
    }
    // What the configuration promises, checked: ordinary pods never reach the extender
    // (managedResources), launcher pods always do.
    assert_eq!(
        by[&("ordinary", true)].extender_filters,
        0,
        "ordinary pods reached the extender"
    );
    assert!(
        by[&("launcher", true)].extender_filters >= per_run as u64,
        "launcher pods did not all reach the extender: {} filter calls for {per_run} pods",
        by[&("launcher", true)].extender_filters
    );
    drop(ext);
    Ok(())
}
