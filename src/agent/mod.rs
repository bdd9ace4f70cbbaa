//! The node agent (`commonground agent`, a DaemonSet): finds the QEMU processes of the VMs on
//! its node, scans their memory through `/proc`, measures load and dirty rates, and publishes
//! the node's `NodeRegionDigest` (scan, update the replicated-region table, publish).
//!
//! Where the agent reads /proc: [`discover`] (cmdline), [`proc_maps`] (maps),
//! [`memory_reader`] (process_vm_readv), [`soft_dirty`] (clear_refs, pagemap), [`load`]
//! (stat, io, meminfo, vmstat). It never publishes memory content, only keyed identities.

pub mod dirty_sampler;
pub mod discover;
pub mod load;
pub mod memory_reader;
pub mod migration_path;
pub mod node_scanner;
pub mod node_watch;
pub mod proc_maps;
pub mod publish;
pub mod relay_path;
pub mod scan;
pub mod shared_access;
pub mod shared_memory;
pub mod soft_dirty;
pub mod vm_tracker;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::ListParams;
use kube::Api;

use crate::api::NodeRegionDigest;
use crate::plan::region::{ClusterKey, RegionGeometry, DEFAULT_REGION_PAGES};
use crate::telemetry::{self, LogFormat, Readiness};

use node_scanner::NodeScanner;
use node_watch::{NodeWatches, OwnDigest};
use publish::{PublishDecision, PublishGate};
use vm_tracker::{RescanMode, RescanPolicy};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("process {0}: no such process")]
    NoProcess(i32),
    #[error("process {pid}: permission denied to {what}")]
    PermissionDenied { pid: i32, what: &'static str },
    #[error("/proc/{pid}/{file}: {what}")]
    Proc {
        pid: i32,
        file: &'static str,
        what: String,
    },
    #[error("/proc/{pid}/{file}: {source}")]
    Io {
        pid: i32,
        file: &'static str,
        source: std::io::Error,
    },
    #[error("{path}: {source}")]
    File {
        path: String,
        source: std::io::Error,
    },
    #[error("cluster key {path}: {what}")]
    Key { path: String, what: String },
    #[error("bad argument: {0}")]
    Argument(String),
    #[error("{what}: {source}")]
    Kube {
        what: String,
        source: Box<kube::Error>,
    },
    #[error(
        "the NodeRegionDigest CRD (noderegiondigests.commonground.dev) is not installed ({0}); \
         install it with `kubectl apply -f deploy/crds.yaml` or the Helm chart (charts/commonground)"
    )]
    CrdMissing(String),
    #[error("health server on {addr}: {source}")]
    Health {
        addr: SocketAddr,
        source: std::io::Error,
    },
}

impl AgentError {
    /// An I/O error on a /proc file, with "no such process" and "permission denied" named.
    pub fn io(pid: i32, file: &'static str, source: std::io::Error) -> Self {
        match source.kind() {
            std::io::ErrorKind::NotFound if pid > 0 => AgentError::NoProcess(pid),
            std::io::ErrorKind::PermissionDenied => AgentError::PermissionDenied {
                pid,
                what: match file {
                    "maps" => "read /proc/<pid>/maps",
                    "clear_refs" => "write /proc/<pid>/clear_refs",
                    "pagemap" => "read /proc/<pid>/pagemap",
                    _ => "read its /proc files",
                },
            },
            _ => AgentError::Io { pid, file, source },
        }
    }
}

/// Every setting can also come from a `COMMONGROUND_*` environment variable, except the node
/// name: `NODE_NAME` is what a DaemonSet's downward API sets by convention.
#[derive(clap::Args, Debug, Clone)]
pub struct AgentArgs {
    /// The node this agent runs on (from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node_name: String,
    /// Node label whose value is the node's work group.
    #[arg(
        long,
        env = "COMMONGROUND_WORK_GROUP_LABEL",
        default_value = "topology.kubernetes.io/zone"
    )]
    pub work_group_label: String,
    /// Region size in base pages; must equal the cluster's.
    #[arg(long, env = "COMMONGROUND_REGION_PAGES", default_value_t = DEFAULT_REGION_PAGES)]
    pub region_pages: u32,
    /// File holding the cluster key (32 hex characters), mounted from a Secret. Without it a
    /// development key is used and digests are only comparable with other development agents.
    #[arg(long, env = "COMMONGROUND_CLUSTER_KEY_FILE")]
    pub key_file: Option<PathBuf>,
    /// Seconds between scans.
    #[arg(long, env = "COMMONGROUND_SCAN_INTERVAL", default_value_t = 10)]
    pub interval: u64,
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "COMMONGROUND_HEALTH_ADDR", default_value = "0.0.0.0:8081")]
    pub health_addr: SocketAddr,
    #[arg(long, env = "COMMONGROUND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Only processes whose command line has this argument followed by the node name. For
    /// several fake nodes on one host (the e2e suite and the local demo pass `--e2e-node`, which
    /// the stand-in's memory helpers carry); a real node has its own /proc and needs none.
    /// The node's whole load is then measured over those processes (VMs and other work) from
    /// their /proc/<pid>/stat, since the host's /proc/stat is every fake node's.
    #[arg(long, hide = true, allow_hyphen_values = true)]
    pub process_node_arg: Option<String>,
    /// Run this node's end of the migration relay, listening here (chart `relay.enabled`).
    #[arg(long, env = "COMMONGROUND_RELAY_LISTEN", requires_all = ["relay_advertise", "relay_tls_cert", "relay_tls_key", "relay_tls_ca"])]
    pub relay_listen: Option<String>,
    /// `HOST:PORT` other nodes' relays reach this relay at (the pod IP and the relay port).
    #[arg(long, env = "COMMONGROUND_RELAY_ADVERTISE")]
    pub relay_advertise: Option<String>,
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_CERT")]
    pub relay_tls_cert: Option<PathBuf>,
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_KEY")]
    pub relay_tls_key: Option<PathBuf>,
    #[arg(long, env = "COMMONGROUND_RELAY_TLS_CA")]
    pub relay_tls_ca: Option<PathBuf>,
    /// Put the relay in KubeVirt's migration path (chart `relay.inMigrationPath`): open both
    /// relay ends in this node's virt-handler network namespace and redirect its outgoing
    /// migrations' memory streams through them. Needs KubeVirt's migration TLS off
    /// (`disableTLS: true`), hostPID, and CAP_NET_ADMIN and CAP_SYS_ADMIN.
    #[arg(long, env = "COMMONGROUND_RELAY_IN_PATH", requires = "relay_listen")]
    pub relay_in_path: bool,
    /// The target end's port in virt-handler's namespace (on every address).
    #[arg(long, env = "COMMONGROUND_RELAY_PATH_PORT", default_value_t = 7443, value_parser = clap::value_parser!(u16).range(1..))]
    pub relay_path_port: u16,
    /// The source end's port in virt-handler's namespace (on 127.0.0.1), where the redirected
    /// connections arrive.
    #[arg(
        long,
        env = "COMMONGROUND_RELAY_INTERCEPT_PORT",
        default_value_t = 7444
    )]
    pub relay_intercept_port: u16,
    /// Seconds a redirect lasts unless renewed (renewed at half of it while the agent lives).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(2..=86400))]
    pub relay_redirect_timeout: u64,
    /// The nft program that holds the interception rules.
    #[arg(long, env = "COMMONGROUND_NFT", default_value = "nft")]
    pub nft: String,
}

/// Background tasks aborted when this is dropped.
struct AbortOnDrop(Vec<tokio::task::JoinHandle<()>>);

impl Drop for AbortOnDrop {
    fn drop(&mut self) {
        for t in &self.0 {
            t.abort();
        }
    }
}

/// The cluster key from `path`, or the development key with a loud warning.
pub fn load_key(path: Option<&std::path::Path>) -> Result<ClusterKey, AgentError> {
    match path {
        Some(p) => {
            let text = std::fs::read_to_string(p).map_err(|e| AgentError::Key {
                path: p.display().to_string(),
                what: e.to_string(),
            })?;
            ClusterKey::from_hex(&text).map_err(|e| AgentError::Key {
                path: p.display().to_string(),
                what: e.to_string(),
            })
        }
        None => {
            tracing::warn!(
                "NO CLUSTER KEY: using the public development key; anyone can confirm guesses of \
                 memory content from the published identities. Mount the cluster key Secret and \
                 pass --key-file."
            );
            Ok(ClusterKey::development())
        }
    }
}

fn kube_err(what: String) -> impl FnOnce(kube::Error) -> AgentError {
    move |e| AgentError::Kube {
        what,
        source: Box::new(e),
    }
}

/// Checks once at start that the API server serves NodeRegionDigests: without the CRD every
/// publish would fail, interval after interval, with a bare "404 page not found".
async fn check_crd(digests: &Api<NodeRegionDigest>) -> Result<(), AgentError> {
    match digests.list(&ListParams::default().limit(1)).await {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(status)) if status.code == 404 => {
            Err(AgentError::CrdMissing(status.message))
        }
        Err(e) => Err(kube_err("list NodeRegionDigests".into())(e)),
    }
}

/// Waits until the node's watches have their first lists (a scan before that would publish
/// an empty node), saying every 30 s what is still missing. False when shut down first.
async fn wait_for_watches(
    watches: &NodeWatches,
    node: &str,
    shutdown: &mut std::pin::Pin<&mut impl std::future::Future<Output = ()>>,
) -> bool {
    let started = Instant::now();
    let mut said = Instant::now();
    while !watches.ready() {
        if said.elapsed() >= Duration::from_secs(30) {
            tracing::warn!(
                node,
                waited_seconds = started.elapsed().as_secs(),
                "still waiting for the first lists of this node's VMIs, Node and NodeRegionDigest"
            );
            said = Instant::now();
        }
        tokio::select! {
            _ = tokio::time::sleep(Duration::from_millis(100)) => {}
            _ = shutdown.as_mut() => return false,
        }
    }
    true
}

/// Takes back the memory groups that the node's digest shows kept after a departure, so the
/// members left behind are still watched after the agent restarts. A digest that cannot be
/// read only means those groups start over (logged).
async fn resume_memory_groups(
    digests: &Api<NodeRegionDigest>,
    node: &str,
    scanner: &mut NodeScanner,
) {
    let groups = match digests.get_opt(node).await {
        Ok(Some(d)) => d.status.map(|s| s.memory_groups).unwrap_or_default(),
        Ok(None) => return,
        Err(e) => {
            tracing::warn!(node, error = %e, "cannot read the node's digest; memory groups kept after a departure are not taken back");
            return;
        }
    };
    let taken = scanner.shared.restore(
        publish::groups_from_status(&groups),
        crate::api::time::Timestamp::now(),
        Instant::now(),
    );
    if taken > 0 {
        tracing::info!(
            node,
            groups = taken,
            "watching the members left behind in memory groups kept before the restart"
        );
    }
}

/// Runs the agent until SIGTERM.
pub async fn run(args: AgentArgs) -> Result<(), AgentError> {
    telemetry::init_logging(args.log_format);
    if args.node_name.is_empty() {
        return Err(AgentError::Argument(
            "--node-name (NODE_NAME) is empty".into(),
        ));
    }
    if args.interval == 0 {
        return Err(AgentError::Argument(
            "--interval must be at least 1 second".into(),
        ));
    }
    let geometry =
        RegionGeometry::new(args.region_pages).map_err(|e| AgentError::Argument(e.to_string()))?;
    let key = load_key(args.key_file.as_deref())?;
    let interval = Duration::from_secs(args.interval);
    let mode = RescanMode::detect();
    if mode == RescanMode::Sampled {
        tracing::info!("kernel has no soft-dirty tracking: dirty rates from sampled pages, periodic full rescans");
    }
    let client = crate::api::client::connect("agent", Some(&format!("node {}", args.node_name)))
        .await
        .map_err(kube_err("connect to the Kubernetes API".into()))?;
    let digests: Api<NodeRegionDigest> = Api::all(client.clone());
    check_crd(&digests).await?;
    let ready = Readiness::default();
    let registry = prometheus::Registry::new();
    let publishes = prometheus::IntCounterVec::new(
        prometheus::Opts::new(
            "commonground_agent_digest_writes_total",
            "NodeRegionDigest writes by reason",
        ),
        &["reason"],
    )
    .expect("valid metric");
    let scan_seconds = prometheus::Histogram::with_opts(prometheus::HistogramOpts::new(
        "commonground_agent_scan_seconds",
        "Time for one scan interval over every VM on the node",
    ))
    .expect("valid metric");
    registry
        .register(Box::new(publishes.clone()))
        .expect("unique metric");
    registry
        .register(Box::new(scan_seconds.clone()))
        .expect("unique metric");
    let health = {
        let listener = tokio::net::TcpListener::bind(args.health_addr)
            .await
            .map_err(|source| AgentError::Health {
                addr: args.health_addr,
                source,
            })?;
        let router = telemetry::health_routes(registry.clone(), ready.clone());
        tokio::spawn(async move { axum::serve(listener, router).await })
    };

    let node = args.node_name.clone();
    let relay = match (&args.relay_listen, &args.relay_advertise) {
        (Some(listen), Some(advertise)) => {
            let tls = crate::relay::tls::TlsArgs {
                tls_cert: args.relay_tls_cert.clone().unwrap_or_default(),
                tls_key: args.relay_tls_key.clone().unwrap_or_default(),
                tls_ca: args.relay_tls_ca.clone().unwrap_or_default(),
            };
            let endpoint = crate::relay::start_node_target(
                crate::relay::NodeRelay {
                    listen: listen.clone(),
                    advertise: advertise.clone(),
                    tls,
                    region_pages: args.region_pages,
                    node: node.clone(),
                    process_node_arg: args.process_node_arg.clone(),
                },
                key.clone(),
                &registry,
            )
            .await
            .map_err(|e| AgentError::Argument(format!("relay: {e}")))?;
            Some(endpoint)
        }
        _ => None,
    };
    if args.relay_in_path && args.relay_path_port == args.relay_intercept_port {
        return Err(AgentError::Argument(format!(
            "--relay-path-port and --relay-intercept-port are both {}: give two ports",
            args.relay_path_port
        )));
    }
    let (mut relay, relay_parts) = match relay {
        Some((endpoint, parts)) => (Some(endpoint), Some(parts)),
        None => (None, None),
    };
    let shutdown = telemetry::shutdown_signal();
    tokio::pin!(shutdown);
    let watches = NodeWatches::start(&client, &node);
    if !wait_for_watches(&watches, &node, &mut shutdown).await {
        health.abort();
        tracing::info!("agent stopped before its first scan");
        return Ok(());
    }
    // The relay in KubeVirt's path: its own loop, dropped (and the path with it) on exit.
    let in_path = Arc::new(AtomicBool::new(false));
    let _path_task = match (&relay_parts, args.relay_in_path) {
        (Some(parts), true) => {
            let (kubevirts, s) = crate::view::store::watch(
                Api::<crate::api::kubevirt::KubeVirt>::all(client.clone()),
                kube::runtime::watcher::Config::default(),
                Arc::new(std::sync::atomic::AtomicU64::new(0)),
            );
            let kv_task = tokio::spawn(futures::StreamExt::for_each(s, |_| async {}));
            let path_task = tokio::spawn(relay_path::run(
                node.clone(),
                watches.vmi_store(),
                kubevirts,
                crate::relay::path::PathConfig {
                    relay_port: args.relay_path_port,
                    intercept_port: args.relay_intercept_port,
                    nft: args.nft.clone(),
                    redirect_timeout: Duration::from_secs(args.relay_redirect_timeout),
                },
                parts.clone(),
                in_path.clone(),
            ));
            Some(AbortOnDrop(vec![kv_task, path_task]))
        }
        _ => None,
    };
    let facts = watches.node_facts(&args.work_group_label);
    if facts.uid.is_none() {
        tracing::warn!(
            node,
            "node object not found; work group left empty and the digest unowned until it appears"
        );
    }
    let mut node_uid = facts.uid;
    let mut scanner = Some(
        NodeScanner::new(
            node.clone(),
            facts.work_group,
            geometry,
            key,
            mode,
            RescanPolicy::for_interval(interval),
        )
        .scoped_to_processes(args.process_node_arg.clone()),
    );
    if let Some(s) = scanner.as_mut() {
        resume_memory_groups(&digests, &node, s).await;
    }
    let mut gate = PublishGate::default();
    let node_arg = args.process_node_arg.clone();
    // Publish at once next time, whatever the gate says (the work group appeared).
    let mut force: Option<&'static str> = None;
    let mut published_once = false;
    loop {
        let started = Instant::now();
        // The Node may have been created (or labelled) after the agent started; the watch
        // brings it without a request.
        let facts = watches.node_facts(&args.work_group_label);
        if node_uid.is_none() && facts.uid.is_some() {
            tracing::info!(node, "node found: the digest is owned by it from now on");
            force = Some("node found");
        }
        // A deleted Node leaves the digest unowned (an owner that is gone would have the
        // garbage collector delete every digest published); a new one owns it again.
        node_uid = facts.uid;
        if let Some(s) = scanner.as_mut() {
            if !facts.work_group.is_empty() && s.work_group.is_empty() {
                tracing::info!(node, work_group = %facts.work_group, "work group found");
                force = Some("work group found");
            }
            s.work_group = facts.work_group;
        }
        let on_node = watches.vms();
        let mut s = scanner.take().expect("scanner is put back after each tick");
        let node_arg = node_arg.clone();
        let node_name = node.clone();
        let s_back = tokio::task::spawn_blocking(move || {
            let procs =
                node_scanner::discover(node_arg.as_deref().map(|a| (a, node_name.as_str())));
            s.tick(&procs, &on_node);
            s
        })
        .await
        .expect("scan task does not panic");
        scan_seconds.observe(started.elapsed().as_secs_f64());
        let inputs = s_back.inputs();
        scanner = Some(s_back);
        let refresh = match watches.own_digest() {
            OwnDigest::Missing if published_once => {
                // Deleted: by the garbage collector if the Node was (a Node back with a
                // new uid is in `node_uid` already, from its watch).
                force = Some("digest deleted");
                None
            }
            OwnDigest::Present { refresh } => refresh,
            OwnDigest::Missing | OwnDigest::Unknown => None,
        };
        if let Some(r) = relay.as_mut() {
            let now_in_path = in_path.load(Ordering::SeqCst);
            if r.in_migration_path != now_in_path {
                r.in_migration_path = now_in_path;
                force.get_or_insert("relay path changed");
            }
        }
        let mut status = publish::build_bounded_status(&inputs);
        status.relay = relay.clone();
        if let Some(parts) = &relay_parts {
            status.transfers = publish::transfer_statuses(&parts.source.observed.snapshot());
        }
        let now = Instant::now();
        let decision = match force {
            Some(why) => PublishDecision::Immediate(why),
            None => gate.decide(
                &inputs.summary,
                status.load.composite,
                &status.memory_groups,
                refresh.as_deref(),
                now,
            ),
        };
        let reason = match decision {
            PublishDecision::Immediate(why) => Some(why),
            PublishDecision::Changed => Some("changed"),
            PublishDecision::Heartbeat => Some("heartbeat"),
            PublishDecision::Skip => None,
        };
        if let Some(reason) = reason {
            match publish::apply(&digests, &node, node_uid.as_deref(), &status).await {
                Ok(()) => {
                    published_once = true;
                    tracing::info!(
                        node,
                        reason,
                        vms = status.vm_count,
                        "published NodeRegionDigest"
                    );
                    publishes.with_label_values(&[reason]).inc();
                    force = None;
                    gate.published(
                        inputs.summary,
                        status.load.composite,
                        status.memory_groups.clone(),
                        refresh,
                        now,
                    );
                    ready.set(true);
                }
                Err(e) => {
                    tracing::warn!(node, error = %e, "cannot publish NodeRegionDigest")
                }
            }
        }
        let next = started + interval;
        tokio::select! {
            _ = tokio::time::sleep_until(next.into()) => {}
            _ = &mut shutdown => break,
        }
    }
    health.abort();
    tracing::info!("agent stopped");
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use axum::http::{Request, Response, StatusCode};
    use kube::client::Body;

    /// A client whose API server answers every request with `status` and `body`.
    fn answering(status: StatusCode, body: &'static str) -> kube::Client {
        let service = tower::service_fn(move |_req: Request<Body>| async move {
            Response::builder()
                .status(status)
                .header("content-type", "application/json")
                .body(Body::from(body.as_bytes().to_vec()))
        });
        kube::Client::new(service, "default")
    }

    #[tokio::test]
    async fn missing_crd_is_a_clear_error_with_the_install_hint() {
        let client = answering(
            StatusCode::NOT_FOUND,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"the server could not find the requested resource","reason":"NotFound","code":404}"#,
        );
        let err = check_crd(&Api::all(client)).await.unwrap_err();
        assert!(matches!(err, AgentError::CrdMissing(_)), "{err:?}");
        let text = err.to_string();
        for needed in [
            "noderegiondigests.commonground.dev",
            "kubectl apply -f deploy/crds.yaml",
            "Helm chart",
            "could not find the requested resource",
        ] {
            assert!(text.contains(needed), "{text}");
        }
    }

    #[tokio::test]
    async fn other_failures_are_not_taken_for_a_missing_crd() {
        let client = answering(
            StatusCode::FORBIDDEN,
            r#"{"kind":"Status","apiVersion":"v1","status":"Failure","message":"noderegiondigests.commonground.dev is forbidden","reason":"Forbidden","code":403}"#,
        );
        let err = check_crd(&Api::all(client)).await.unwrap_err();
        assert!(matches!(err, AgentError::Kube { .. }), "{err:?}");
    }

    #[tokio::test]
    async fn installed_crd_passes() {
        let client = answering(
            StatusCode::OK,
            r#"{"apiVersion":"commonground.dev/v1alpha1","kind":"NodeRegionDigestList","metadata":{"resourceVersion":"7"},"items":[]}"#,
        );
        check_crd(&Api::all(client)).await.unwrap();
    }
}
