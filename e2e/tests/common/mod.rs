//! Shared by the controller test binaries: the commonground binary as a real child process,
//! and NodeRegionDigests published through the API the way an agent would.
#![allow(dead_code)]

use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::Mutex;

use commonground::api::digest::{
    summary_into_status, NodeRegionDigestSpec, NodeRegionDigestStatus,
};
use commonground::api::NodeRegionDigest;
use commonground::plan::region::RegionGeometry;
use commonground::plan::sketch::{RegionSketch, KEY_SPACE};
use commonground::plan::{NodeRegionSummary, VmKey, VmRegionSummary};
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};

/// The `commonground` binary, built on demand (once per test process) so
/// `cargo test -p commonground-e2e` works alone.
pub fn commonground_bin() -> PathBuf {
    static BIN: std::sync::OnceLock<PathBuf> = std::sync::OnceLock::new();
    BIN.get_or_init(build_commonground).clone()
}

fn build_commonground() -> PathBuf {
    if let Ok(p) = std::env::var("COMMONGROUND_BIN") {
        return p.into();
    }
    let root = PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("..");
    let status = Command::new(env!("CARGO"))
        .args([
            "build",
            "--quiet",
            "-p",
            "commonground",
            "--bin",
            "commonground",
        ])
        .current_dir(&root)
        .status()
        .expect("cargo build runs");
    assert!(status.success(), "building the commonground binary failed");
    let target = std::env::var("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|_| root.join("target"));
    target.join("debug").join("commonground")
}

/// A component of ours running as a child process; killed (SIGKILL) when dropped, and by the
/// kernel if the test process dies first.
pub struct Component {
    pub child: Child,
    pub log: PathBuf,
}

impl Component {
    pub fn start(args: &[&str], log_name: &str) -> Component {
        Self::start_program(&commonground_bin(), args, log_name)
    }

    /// Any program (an upstream component such as kube-scheduler), with the test cluster's
    /// kubeconfig in `KUBECONFIG` and its stderr in the log.
    pub fn start_program(program: &std::path::Path, args: &[&str], log_name: &str) -> Component {
        let cluster = commonground_e2e::TestCluster::get();
        let log = std::env::temp_dir().join(format!(
            "commonground-e2e-{log_name}-{}.log",
            std::process::id()
        ));
        let file = std::fs::File::create(&log).expect("log file");
        let mut cmd = Command::new(program);
        cmd.args(args)
            .env("KUBECONFIG", &cluster.kubeconfig)
            .env("RUST_LOG", "info,kube=warn")
            .stdout(Stdio::null())
            .stderr(file);
        unsafe {
            use std::os::unix::process::CommandExt;
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let child = cmd
            .spawn()
            .unwrap_or_else(|e| panic!("starting {}: {e}", program.display()));
        Component { child, log }
    }

    /// SIGKILL, as a crash or an OOM kill would.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    pub fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Component {
    fn drop(&mut self) {
        self.kill();
    }
}

/// One controller per test binary (tests of one binary share it; binaries run one by one).
static CONTROLLER: Mutex<Option<Component>> = Mutex::new(None);

pub fn controller_args() -> Vec<&'static str> {
    vec![
        "controller",
        "--no-leader-election",
        "--health-addr",
        "127.0.0.1:0",
        "--migration-bandwidth",
        "125000000",
    ]
}

/// Starts the shared controller once per test process. It is started from a thread that lives
/// as long as the process: the child dies with the thread that spawned it (PR_SET_PDEATHSIG),
/// and test threads end with their test, which would kill it under the other tests' feet.
pub fn ensure_controller() {
    ensure_controller_for_process();
}

fn start_shared_controller() {
    let mut c = CONTROLLER.lock().unwrap();
    if c.is_none() {
        *c = Some(Component::start(&controller_args(), "controller"));
    }
}

/// Whether the shared controller process is still running (it has not exited or crashed).
pub fn controller_running() -> bool {
    CONTROLLER
        .lock()
        .unwrap()
        .as_mut()
        .is_some_and(|c| matches!(c.child.try_wait(), Ok(None)))
}

pub fn controller_log() -> String {
    CONTROLLER
        .lock()
        .unwrap()
        .as_ref()
        .map(|c| c.log_tail())
        .unwrap_or_default()
}

/// Keys 0..n as region identities of "content" `base`: two sketches share content when their
/// key ranges overlap.
pub fn keys(base: u64, n: u64) -> Vec<u64> {
    // Spread over the key space so any threshold samples them alike.
    (base..base + n)
        .map(|k| (k.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24) % KEY_SPACE)
        .collect()
}

pub fn vm_summary(ns: &str, name: &str, memory: u64, content: &[u64]) -> VmRegionSummary {
    let geometry = RegionGeometry::default();
    let regions = geometry.regions_in(memory);
    VmRegionSummary {
        vm: VmKey::new(ns, name),
        memory_bytes: memory,
        regions,
        zero_regions: regions.saturating_sub(content.len() as u64),
        sketch: RegionSketch::from_keys(KEY_SPACE, content.iter().copied()),
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.0,
    }
}

/// Publishes a node's digest (spec + status) as an agent would.
pub async fn publish_digest(
    client: &Client,
    node: &str,
    work_group: &str,
    vms: Vec<VmRegionSummary>,
    extra_content: &[u64],
) -> anyhow::Result<()> {
    let mut all: Vec<u64> = vms.iter().flat_map(|v| v.sketch.keys().to_vec()).collect();
    all.extend_from_slice(extra_content);
    let summary = NodeRegionSummary {
        node: node.into(),
        work_group: work_group.into(),
        geometry: RegionGeometry::default(),
        key_id: commonground::plan::region::ClusterKey::development().key_id,
        sketch: RegionSketch::from_keys(KEY_SPACE, all),
        vms,
    };
    publish_summary(client, &summary).await.map(|_| ())
}

/// Publishes `summary` as its node's digest (spec + status) as an agent would; the size of the
/// status written, in bytes.
pub async fn publish_summary(
    client: &Client,
    summary: &NodeRegionSummary,
) -> anyhow::Result<usize> {
    let node = summary.node.as_str();
    let api: Api<NodeRegionDigest> = Api::all(client.clone());
    let digest = NodeRegionDigest::new(
        node,
        NodeRegionDigestSpec {
            node_name: node.into(),
        },
    );
    match api.create(&PostParams::default(), &digest).await {
        Ok(_) => {}
        Err(kube::Error::Api(e)) if e.code == 409 => {}
        Err(e) => return Err(e.into()),
    }
    let mut status = NodeRegionDigestStatus::default();
    summary_into_status(summary, &mut status);
    status.page_size = 4096;
    status.scan_time = chrono::Utc::now().to_rfc3339();
    status.scan_mode = "Full".into();
    apply_digest_status(&api, node, &status).await
}

/// Reads an integer setting from the environment (benchmarks' sizes), else `default`.
pub fn env_usize(name: &str, default: usize) -> usize {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The repository's root directory.
pub fn repo_dir() -> PathBuf {
    std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("e2e/ lives in the repository")
        .to_path_buf()
}

/// A loopback port free now.
pub fn free_port() -> anyhow::Result<u16> {
    Ok(std::net::TcpListener::bind("127.0.0.1:0")?
        .local_addr()?
        .port())
}

/// Writes a digest's status as the agent would (server-side apply, the e2e agent's manager).
async fn apply_digest_status(
    api: &Api<NodeRegionDigest>,
    node: &str,
    status: &NodeRegionDigestStatus,
) -> anyhow::Result<usize> {
    let patch = serde_json::json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "NodeRegionDigest", "status": status
    });
    api.patch_status(
        node,
        &PatchParams::apply("e2e-agent").force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(serde_json::to_vec(&patch)?.len())
}

/// Arguments of a node agent for fake node `node`: scans every second, reads only the memory
/// helpers started for that node (`--e2e-node <node>`, since all fake nodes share this host's
/// /proc), development key.
pub fn agent_args(node: &str) -> Vec<String> {
    [
        "agent",
        "--node-name",
        node,
        "--interval",
        "1",
        "--health-addr",
        "127.0.0.1:0",
        "--process-node-arg=--e2e-node",
    ]
    .iter()
    .map(|s| s.to_string())
    .collect()
}

/// A node agent for fake node `node` as a child process (stopped when dropped).
pub fn start_agent(node: &str) -> Component {
    let args = agent_args(node);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    Component::start(&args, &format!("agent-{node}"))
}

/// Sets the measured load of VMs in a node's published digest (`status.vms[].load`), as the
/// agent does after a scan: `(vm name, cpu cores, I/O bytes per second, memory bytes)`.
pub async fn set_vm_loads(
    client: &Client,
    node: &str,
    loads: &[(&str, f64, f64, u64)],
) -> anyhow::Result<()> {
    let api: Api<NodeRegionDigest> = Api::all(client.clone());
    let mut status = api.get_status(node).await?.status.unwrap_or_default();
    for v in &mut status.vms {
        if let Some(&(_, cpu, io, mem)) = loads.iter().find(|l| l.0 == v.name) {
            v.load.cpu_cores = cpu;
            v.load.io_bytes_per_second = io;
            v.load.memory_bytes = mem;
        }
    }
    apply_digest_status(&api, node, &status).await.map(|_| ())
}

/// [`ensure_controller`] from a thread that lives as long as the test process.
/// `PR_SET_PDEATHSIG` fires when the *thread* that spawned the child exits, and libtest runs
/// each test on its own thread: a controller started from one test is SIGKILLed when that test
/// ends, under the feet of the binary's other tests still running.
pub fn ensure_controller_for_process() {
    static STARTED: std::sync::OnceLock<()> = std::sync::OnceLock::new();
    STARTED.get_or_init(|| {
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::Builder::new()
            .name("controller-parent".into())
            .spawn(move || {
                start_shared_controller();
                let _ = tx.send(());
                loop {
                    std::thread::park();
                }
            })
            .expect("thread starts");
        rx.recv().expect("controller started");
    });
}

/// A minimal HTTP/1.0 exchange with one of our components on loopback (the e2e crate has no
/// HTTP client): the status code and the body.
pub fn http(
    addr: std::net::SocketAddr,
    method: &str,
    path: &str,
    body: &[u8],
) -> anyhow::Result<(u16, String)> {
    use std::io::{Read, Write};
    let mut s = std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(2))?;
    s.set_read_timeout(Some(std::time::Duration::from_secs(5)))?;
    write!(
        s,
        "{method} {path} HTTP/1.0\r\nHost: {addr}\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    )?;
    s.write_all(body)?;
    let mut text = String::new();
    s.read_to_string(&mut text)?;
    let status = text
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| anyhow::anyhow!("no HTTP status in {text:?}"))?;
    let body = text
        .split_once("\r\n\r\n")
        .map(|(_, b)| b.to_string())
        .unwrap_or_default();
    Ok((status, body))
}

/// The filter requests the extender at `addr` answered so far
/// (`commonground_extender_requests_total`).
pub fn extender_filter_calls(addr: std::net::SocketAddr) -> anyhow::Result<u64> {
    let (_, text) = http(addr, "GET", "/metrics", b"")?;
    Ok(text
        .lines()
        .filter(|l| {
            l.starts_with("commonground_extender_requests_total{") && l.contains("verb=\"filter\"")
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum::<f64>() as u64)
}
