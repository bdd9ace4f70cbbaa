//! The shared control plane (`e2e/cluster up`, once per test process) and per-test namespaces.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::{Mutex, OnceLock};

use anyhow::{anyhow, bail, Context};
use commonground::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, VmiSpec, VmimSpec,
};
use k8s_openapi::api::core::v1::{Event, Namespace, Node, Pod};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::config::{KubeConfigOptions, Kubeconfig};
use kube::{Api, Client, ResourceExt};
use serde_json::json;

use crate::nodes::FakeNode;
use crate::standin::{self, MemoryConfig, StandinConfig};
use crate::{E2E_LABEL, POOL_LABEL};

/// Environment variable naming the scheduler extender URL to pass to `e2e/cluster up`.
pub const EXTENDER_ENV: &str = "COMMONGROUND_E2E_EXTENDER_URL";

/// The control plane, brought up (idempotently) by the first `get` in a test process.
#[derive(Debug)]
pub struct TestCluster {
    pub kubeconfig: PathBuf,
    pub extender_url: Option<String>,
    /// Whether KubeVirt's own virt-controller runs (`e2e/cluster` default); when it does not
    /// (`COMMONGROUND_VIRT_CONTROLLER=standin`), the stand-in plays it too.
    pub real_virt_controller: bool,
    script: PathBuf,
}

static CLUSTER: OnceLock<TestCluster> = OnceLock::new();

fn e2e_dir() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

impl TestCluster {
    /// Brings the cluster up once per process (`e2e/cluster up`, passing
    /// `--extender-url $COMMONGROUND_E2E_EXTENDER_URL` when set). Panics if it cannot.
    pub fn get() -> &'static TestCluster {
        let ext = std::env::var(EXTENDER_ENV).ok().filter(|s| !s.is_empty());
        Self::get_with_extender(ext.as_deref())
    }

    /// Like [`get`](Self::get) with an explicit extender URL. Every call in one process must
    /// agree (the first one starts the cluster).
    pub fn get_with_extender(extender_url: Option<&str>) -> &'static TestCluster {
        let c = CLUSTER.get_or_init(|| {
            Self::up(extender_url).unwrap_or_else(|e| panic!("e2e cluster: {e:#}"))
        });
        assert_eq!(
            c.extender_url.as_deref(),
            extender_url,
            "TestCluster already started with another extender URL in this process"
        );
        c
    }

    fn up(extender_url: Option<&str>) -> anyhow::Result<TestCluster> {
        let script = e2e_dir().join("cluster");
        let mut cmd = Command::new(&script);
        cmd.arg("up");
        if let Some(url) = extender_url {
            cmd.args(["--extender-url", url]);
        }
        let out = cmd
            .stderr(std::process::Stdio::inherit())
            .output()
            .with_context(|| format!("running {} up", script.display()))?;
        let stdout = String::from_utf8_lossy(&out.stdout);
        if !out.status.success() {
            bail!("{} up failed ({}): {stdout}", script.display(), out.status);
        }
        let kubeconfig = stdout
            .lines()
            .find_map(|l| l.strip_prefix("KUBECONFIG="))
            .ok_or_else(|| anyhow!("no KUBECONFIG= line in `e2e/cluster up` output: {stdout}"))?;
        let kubeconfig = PathBuf::from(kubeconfig.trim());
        // `e2e/cluster` records which KubeVirt controller it runs in state.json beside the
        // kubeconfig.
        let state = kubeconfig.with_file_name("state.json");
        let mode = std::fs::read_to_string(&state)
            .ok()
            .and_then(|t| serde_json::from_str::<serde_json::Value>(&t).ok())
            .and_then(|v| v["virt-controller-mode"].as_str().map(String::from))
            .unwrap_or_else(|| "standin".into());
        Ok(TestCluster {
            kubeconfig,
            extender_url: extender_url.map(String::from),
            real_virt_controller: mode == "real",
            script,
        })
    }

    /// A new client. Make one per test: a client is tied to the tokio runtime that made it.
    pub async fn client(&self) -> anyhow::Result<Client> {
        client_from(&self.kubeconfig).await
    }

    /// The directory of the control plane's binaries (kube-scheduler, kubectl, ...), as
    /// `e2e/cluster` records it in state.json beside the kubeconfig.
    pub fn bin_dir(&self) -> anyhow::Result<PathBuf> {
        let state = self.kubeconfig.with_file_name("state.json");
        let text = std::fs::read_to_string(&state)
            .with_context(|| format!("reading {}", state.display()))?;
        let v: serde_json::Value = serde_json::from_str(&text)?;
        v["bindir"]
            .as_str()
            .map(PathBuf::from)
            .ok_or_else(|| anyhow!("no bindir in {}", state.display()))
    }

    /// The API server's audit log (JSON lines, one per request stage): metadata of the
    /// requests on nodes, VMIs and commonground's objects (`e2e/cluster`'s audit policy).
    pub fn audit_log(&self) -> PathBuf {
        self.kubeconfig.with_file_name("audit").join("audit.log")
    }

    /// The tail of every component's log (`e2e/cluster logs`).
    pub fn logs(&self, lines: usize) -> String {
        match Command::new(&self.script)
            .args(["logs", "--lines", &lines.to_string()])
            .output()
        {
            Ok(o) => String::from_utf8_lossy(&o.stdout).into_owned(),
            Err(e) => format!("(cannot run e2e/cluster logs: {e})"),
        }
    }

    /// A new namespace `<prefix>-<random>`, labelled for the e2e suite, with a client.
    pub async fn fresh_namespace(&'static self, prefix: &str) -> anyhow::Result<TestNamespace> {
        crate::init_tracing();
        let client = self.client().await?;
        let suffix = format!(
            "{:06x}",
            xxhash_rust::xxh3::xxh3_64(
                format!("{:?}{}", std::time::SystemTime::now(), std::process::id()).as_bytes()
            ) & 0xff_ffff
        );
        let name = format!("{prefix}-{suffix}");
        let nss: Api<Namespace> = Api::all(client.clone());
        let ns = Namespace {
            metadata: ObjectMeta {
                name: Some(name.clone()),
                labels: Some(BTreeMap::from([(
                    E2E_LABEL.to_string(),
                    "true".to_string(),
                )])),
                ..Default::default()
            },
            ..Default::default()
        };
        nss.create(&PostParams::default(), &ns)
            .await
            .with_context(|| format!("creating namespace {name}"))?;
        Ok(TestNamespace {
            name,
            client,
            cluster: self,
            nodes: Mutex::new(Vec::new()),
        })
    }
}

async fn client_from(kubeconfig: &Path) -> anyhow::Result<Client> {
    let kc = Kubeconfig::read_from(kubeconfig)
        .with_context(|| format!("reading {}", kubeconfig.display()))?;
    let mut config =
        kube::Config::from_custom_kubeconfig(kc, &KubeConfigOptions::default()).await?;
    // Everything is on loopback; never go through a proxy from the environment.
    config.proxy_url = None;
    Ok(Client::try_from(config)?)
}

/// One test's namespace. Its fake nodes carry `e2e.commonground.dev/pool=<namespace>`; on drop
/// it deletes them and the namespace (after printing the namespace's objects, events and the
/// component logs when the test is panicking).
pub struct TestNamespace {
    pub name: String,
    pub client: Client,
    pub cluster: &'static TestCluster,
    nodes: Mutex<Vec<String>>,
}

/// A running in-process stand-in; stopped when dropped.
pub struct StandinHandle {
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl StandinHandle {
    /// Stops it (as a crash would: no cleanup).
    pub fn stop(self) {}

    pub fn is_running(&self) -> bool {
        !self.task.is_finished()
    }
}

impl Drop for StandinHandle {
    fn drop(&mut self) {
        self.task.abort();
    }
}

impl TestNamespace {
    pub fn api<K>(&self) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), &self.name)
    }

    /// A node name unique to this test: `<namespace>-<suffix>`.
    pub fn node_name(&self, suffix: &str) -> String {
        format!("{}-{suffix}", self.name)
    }

    /// Creates a fake node in this test's pool (deleted with the namespace).
    pub async fn create_fake_node(&self, node: FakeNode) -> anyhow::Result<Node> {
        let node = node.label(POOL_LABEL, &self.name);
        self.nodes.lock().unwrap().push(node.name.clone());
        node.create(&self.client).await
    }

    /// A stand-in config for this namespace: fast transfers (a 1 GiB VMI takes ~10 ms), a 30 s
    /// unschedulable timeout, no memory helpers.
    pub fn standin_config(&self) -> StandinConfig {
        StandinConfig {
            role: self.standin_role(),
            namespace: Some(self.name.clone()),
            unschedulable_timeout: std::time::Duration::from_secs(30),
            resync: std::time::Duration::from_secs(5),
            ..Default::default()
        }
    }

    /// Memory helper settings using the `vm-memory` binary at `helper` (in tests:
    /// `env!("CARGO_BIN_EXE_vm-memory")`): small images so tests stay light.
    pub fn memory_config(helper: &str) -> MemoryConfig {
        MemoryConfig {
            helper: helper.into(),
            default_image: "debian-12".into(),
            default_image_mib: 8,
            default_private_mib: 2,
            die_with_parent: true,
        }
    }

    /// What the stand-in plays on this cluster: only virt-handler and kubelet when KubeVirt's
    /// virt-controller runs.
    pub fn standin_role(&self) -> standin::Role {
        if self.cluster.real_virt_controller {
            standin::Role::Handler
        } else {
            standin::Role::Full
        }
    }

    /// Starts the KubeVirt stand-in in-process, scoped to this namespace, in the role the
    /// cluster needs ([`standin_role`](Self::standin_role)).
    pub fn start_standin(&self, mut cfg: StandinConfig) -> StandinHandle {
        cfg.namespace = Some(self.name.clone());
        cfg.role = self.standin_role();
        let client = self.client.clone();
        StandinHandle {
            task: tokio::spawn(async move {
                let r = standin::run(client, cfg).await;
                if let Err(e) = &r {
                    tracing::error!(error = %e, "stand-in stopped");
                }
                r
            }),
        }
    }

    /// A VMI in this namespace selecting this test's node pool.
    pub fn vmi(&self, name: &str, memory: &str, cpu: &str) -> VirtualMachineInstance {
        let mut v = VirtualMachineInstance::new(
            name,
            VmiSpec {
                node_selector: Some(BTreeMap::from([(
                    POOL_LABEL.to_string(),
                    self.name.clone(),
                )])),
                domain: json!({
                    "cpu": {"cores": 1},
                    "memory": {"guest": memory},
                    "resources": {"requests": {"memory": memory, "cpu": cpu}},
                    "devices": {},
                }),
                ..Default::default()
            },
        );
        v.metadata.namespace = Some(self.name.clone());
        v
    }

    pub async fn create_vmi(
        &self,
        vmi: VirtualMachineInstance,
    ) -> anyhow::Result<VirtualMachineInstance> {
        Ok(self
            .api::<VirtualMachineInstance>()
            .create(&PostParams::default(), &vmi)
            .await?)
    }

    /// Creates a VirtualMachineInstanceMigration for `vmi_name`.
    pub async fn create_vmim(
        &self,
        name: &str,
        vmi_name: &str,
        annotations: &[(&str, &str)],
    ) -> anyhow::Result<VirtualMachineInstanceMigration> {
        let mut m = VirtualMachineInstanceMigration::new(
            name,
            VmimSpec {
                vmi_name: vmi_name.into(),
                added_node_selector: None,
            },
        );
        m.metadata.annotations = Some(
            annotations
                .iter()
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect(),
        );
        Ok(self
            .api::<VirtualMachineInstanceMigration>()
            .create(&PostParams::default(), &m)
            .await?)
    }

    /// VMIs, VMIMs, pods and events of this namespace, for failure reports.
    pub async fn dump(&self) -> String {
        dump_namespace(&self.client, &self.name).await
    }
}

async fn dump_namespace(client: &Client, ns: &str) -> String {
    let mut out = format!("===== namespace {ns} =====\n");
    let lp = ListParams::default();
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
    if let Ok(l) = vmis.list(&lp).await {
        for v in l {
            out += &format!(
                "VMI {}: spec.nodeSelector={:?} status={}\n",
                v.name_any(),
                v.spec.node_selector,
                serde_json::to_string(&v.status).unwrap_or_default()
            );
        }
    }
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(client.clone(), ns);
    if let Ok(l) = vmims.list(&lp).await {
        for m in l {
            out += &format!(
                "VMIM {} (vmi {}): status={}\n",
                m.name_any(),
                m.spec.vmi_name,
                serde_json::to_string(&m.status).unwrap_or_default()
            );
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    if let Ok(l) = pods.list(&lp).await {
        for p in l {
            let st = p.status.clone().unwrap_or_default();
            out += &format!(
                "Pod {}: node={:?} phase={:?} conditions={}\n",
                p.name_any(),
                p.spec.as_ref().and_then(|s| s.node_name.clone()),
                st.phase,
                serde_json::to_string(&st.conditions).unwrap_or_default()
            );
        }
    }
    let events: Api<Event> = Api::namespaced(client.clone(), ns);
    if let Ok(l) = events.list(&lp).await {
        for e in l {
            out += &format!(
                "Event {} {}: {} {}\n",
                e.involved_object.name.unwrap_or_default(),
                e.type_.unwrap_or_default(),
                e.reason.unwrap_or_default(),
                e.message.unwrap_or_default()
            );
        }
    }
    out
}

/// Removes what a test left: VMIM and VMI finalizers (no stand-in is left to remove them, and
/// virt-controller waits for a virt-handler to shut a VMI down), pods (no kubelet finishes a
/// graceful delete), its fake nodes, its memory helpers and the namespace.
async fn cleanup(client: &Client, ns: &str, nodes: &[String]) -> anyhow::Result<()> {
    let vmis: Api<VirtualMachineInstance> = Api::namespaced(client.clone(), ns);
    for v in vmis.list(&ListParams::default()).await? {
        if !v.finalizers().is_empty() {
            let _ = vmis
                .patch(
                    &v.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    let pods: Api<Pod> = Api::namespaced(client.clone(), ns);
    let grace0 = DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    };
    let _ = pods
        .delete_collection(&grace0, &ListParams::default())
        .await;
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(client.clone(), ns);
    for m in vmims.list(&ListParams::default()).await? {
        if !m.finalizers().is_empty() {
            let _ = vmims
                .patch(
                    &m.name_any(),
                    &PatchParams::default(),
                    &Patch::Merge(json!({"metadata": {"finalizers": null}})),
                )
                .await;
        }
    }
    let node_api: Api<Node> = Api::all(client.clone());
    for n in nodes {
        let _ = node_api.delete(n, &DeleteParams::default()).await;
    }
    let prefix = format!("{ns}_");
    for p in crate::memory::scan_processes() {
        if p.guest.starts_with(&prefix) {
            p.kill();
        }
    }
    let nss: Api<Namespace> = Api::all(client.clone());
    let _ = nss.delete(ns, &DeleteParams::default()).await;
    Ok(())
}

impl Drop for TestNamespace {
    fn drop(&mut self) {
        let panicking = std::thread::panicking();
        let ns = self.name.clone();
        let nodes = std::mem::take(&mut *self.nodes.lock().unwrap());
        let kubeconfig = self.cluster.kubeconfig.clone();
        let cluster = self.cluster;
        // Async cleanup on a runtime of its own: the test's runtime may be single-threaded and
        // blocked in this drop.
        let r = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()?;
            rt.block_on(async move {
                let client = client_from(&kubeconfig).await?;
                if panicking {
                    eprintln!("{}", dump_namespace(&client, &ns).await);
                    eprintln!("===== control plane logs =====\n{}", cluster.logs(40));
                }
                cleanup(&client, &ns, &nodes).await
            })
        })
        .join();
        match r {
            Ok(Ok(())) => {}
            Ok(Err(e)) => eprintln!("cleanup of namespace {}: {e:#}", self.name),
            Err(_) => eprintln!("cleanup of namespace {} panicked", self.name),
        }
    }
}
