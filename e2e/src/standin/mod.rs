//! The KubeVirt stand-in: what virt-controller and virt-handler do with VMIs and
//! VirtualMachineInstanceMigrations, through the real API only.
//!
//! - A new VMI gets a virt-launcher pod; the real kube-scheduler binds it; the stand-in marks the
//!   pod Running (there is no kubelet) and the VMI Running on that node with conditions `Ready`
//!   and `LiveMigratable`.
//! - A VMIM gets a target pod (see [`pods::target_pod`]) that the real kube-scheduler places; the
//!   stand-in then walks Scheduling → Scheduled → PreparingTarget → TargetReady → Running →
//!   Succeeded, mirroring `migrationState` on the VMIM and the VMI, moves the VMI to the target
//!   node and deletes the source pod. The transfer takes `memory bytes / bandwidth × time scale`.
//! - With a memory helper configured, one `vm-memory` process per running VMI holds its memory;
//!   on migration the target process is started while preparing the target and the source one is
//!   killed when the migration ends. VMIs annotated with [`ANN_SHARED_MEMORY`] also map that
//!   shared memory, one file per node, so the VMIs naming it on one node form a memory group.
//!
//! Everything is level-triggered (watches plus periodic resync) and derived from what is in the
//! API, so the stand-in can be killed and restarted at any point.
//!
//! Failure injection, by annotation on the VMIM (or, as a default for all its migrations, the
//! VMI) — see the `ANN_*` constants.

mod handler;
pub mod pods;
mod vmi;
mod vmim;

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use commonground::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::runtime::controller::{Action, Controller};
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

use crate::memory::{self, MemorySpec, SharedMemorySpec, DIE_WITH_PARENT_ARG};

/// Prefix of every annotation the stand-in reads.
pub const ANN_PREFIX: &str = "e2e.commonground.dev/";
/// VMI: OS image the guest memory is "booted" from (default: [`MemoryConfig::default_image`]).
pub const ANN_IMAGE: &str = "e2e.commonground.dev/image";
/// VMI: MiB of image content in the guest memory.
pub const ANN_IMAGE_MIB: &str = "e2e.commonground.dev/image-mib";
/// VMI: MiB of private (VMI-unique) content in the guest memory.
pub const ANN_PRIVATE_MIB: &str = "e2e.commonground.dev/private-mib";
/// VMI: name of shared memory the guest maps (VMIs naming the same one share it per node; see
/// `memory::shared_memory_path`).
pub const ANN_SHARED_MEMORY: &str = "e2e.commonground.dev/shared-memory";
/// VMI: MiB of that shared memory (default [`DEFAULT_SHARED_MIB`]).
pub const ANN_SHARED_MIB: &str = "e2e.commonground.dev/shared-memory-mib";
pub const DEFAULT_SHARED_MIB: usize = 4;
/// VMI: `"true"` makes the VMI not live-migratable (condition LiveMigratable=False).
pub const ANN_NOT_MIGRATABLE: &str = "e2e.commonground.dev/not-migratable";
/// VMIM or VMI: `"true"` adds an impossible node selector to the target pod (never schedules).
pub const ANN_TARGET_UNSCHEDULABLE: &str = "e2e.commonground.dev/target-unschedulable";
/// VMIM or VMI: the migration fails once this percentage (0–100) of the transfer is done.
pub const ANN_FAIL_AT_PERCENT: &str = "e2e.commonground.dev/fail-at-percent";
/// VMIM or VMI: failure reason used with [`ANN_FAIL_AT_PERCENT`].
pub const ANN_FAILURE_REASON: &str = "e2e.commonground.dev/failure-reason";
/// VMIM or VMI: the transfer takes exactly this many (wall-clock, unscaled) seconds.
pub const ANN_TRANSFER_SECONDS: &str = "e2e.commonground.dev/transfer-seconds";

/// Failure reason written when an unfinished VMIM is deleted.
pub const ABORTED_REASON: &str = "aborted";
/// Finalizer virt-controller puts on VMIMs.
pub const VMIM_FINALIZER: &str = "kubevirt.io/migrationJobFinalize";
/// Label virt-controller keeps on VMIs naming their node.
pub const VMI_NODE_LABEL: &str = "kubevirt.io/nodeName";
pub const FIELD_MANAGER: &str = "kubevirt-standin";

#[derive(Clone, Debug)]
pub struct MemoryConfig {
    /// The `vm-memory` binary.
    pub helper: PathBuf,
    pub default_image: String,
    pub default_image_mib: usize,
    pub default_private_mib: usize,
    /// Helpers get SIGKILL when the thread that started them exits (good for tests; a
    /// standalone stand-in leaves them running so a restart adopts them).
    pub die_with_parent: bool,
}

/// What the stand-in plays.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum Role {
    /// virt-controller, virt-handler and kubelet: the cluster runs no virt-controller
    /// (`COMMONGROUND_VIRT_CONTROLLER=standin`).
    #[default]
    Full,
    /// Only virt-handler and kubelet: KubeVirt's own virt-controller runs (see `handler`).
    Handler,
}

#[derive(Clone, Debug)]
pub struct StandinConfig {
    /// What it plays (tests: from the cluster, see `TestNamespace::start_standin`).
    pub role: Role,
    /// Only this namespace (None: all namespaces).
    pub namespace: Option<String>,
    /// Nominal migration bandwidth, bytes per second.
    pub bandwidth_bytes_per_sec: f64,
    /// Wall-clock seconds per nominal second of transfer (0.01: a 10 s transfer takes 100 ms).
    pub time_scale: f64,
    /// A target pod unschedulable for this long fails the migration (KubeVirt: 5 minutes).
    pub unschedulable_timeout: Duration,
    /// Periodic resync of every object.
    pub resync: Duration,
    /// Image name of the virt-launcher pods (never pulled: there is no kubelet).
    pub launcher_image: String,
    pub memory: Option<MemoryConfig>,
}

impl Default for StandinConfig {
    fn default() -> Self {
        Self {
            role: Role::Full,
            namespace: None,
            bandwidth_bytes_per_sec: 1.25e9, // 10 Gbit/s
            time_scale: 0.01,
            unschedulable_timeout: Duration::from_secs(300),
            resync: Duration::from_secs(10),
            launcher_image: "quay.io/kubevirt/virt-launcher:v1.6.0".into(),
            memory: None,
        }
    }
}

/// Delete at once (there is no kubelet to wait for).
pub(crate) fn grace0() -> kube::api::DeleteParams {
    kube::api::DeleteParams {
        grace_period_seconds: Some(0),
        ..Default::default()
    }
}

/// Adds KubeVirt's VMIM finalizer (virt-api's in a real cluster), guarded by the VMIM's
/// resourceVersion so that a stale copy is refused with 409 rather than overwriting.
pub(crate) async fn add_vmim_finalizer(
    api: &Api<VirtualMachineInstanceMigration>,
    vmim: &VirtualMachineInstanceMigration,
) -> Result<VirtualMachineInstanceMigration, kube::Error> {
    let mut fins = vmim.finalizers().to_vec();
    fins.push(VMIM_FINALIZER.to_string());
    api.patch(
        &vmim.name_any(),
        &kube::api::PatchParams::default(),
        &kube::api::Patch::Merge(serde_json::json!({"metadata": {
            "finalizers": fins,
            "resourceVersion": vmim.resource_version(),
        }})),
    )
    .await
}

/// An object already gone counts as done.
pub(crate) fn ignore_404<T>(r: Result<T, kube::Error>) -> Result<(), Error> {
    match r {
        Ok(_) => Ok(()),
        Err(kube::Error::Api(e)) if e.code == 404 => Ok(()),
        Err(e) => Err(e.into()),
    }
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("memory helper: {0}")]
    Memory(String),
}

pub(crate) struct Ctx {
    pub client: Client,
    pub cfg: StandinConfig,
    /// Serializes starting and killing memory helpers (both reconcilers do it).
    pub memory_lock: tokio::sync::Mutex<BTreeMap<(String, String), u32>>,
}

impl Ctx {
    pub fn api<K>(&self, namespace: &str) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        Api::namespaced(self.client.clone(), namespace)
    }

    /// Makes the set of nodes holding a `vm-memory` process for `vmi` equal `wanted`. Returns
    /// whether every wanted process has filled its memory. No-op (true) without a helper.
    pub async fn sync_memory(
        &self,
        vmi: &VirtualMachineInstance,
        wanted: &BTreeSet<String>,
    ) -> Result<bool, Error> {
        let Some(mc) = &self.cfg.memory else {
            return Ok(true);
        };
        // Under the lock: helpers this stand-in spawned, by (guest, node). A helper that has
        // not exec'd yet is invisible in /proc, and a second pass must not start it twice.
        let mut spawned = self.memory_lock.lock().await;
        let ns = vmi.namespace().unwrap_or_default();
        let name = vmi.name_any();
        let uid = vmi.uid().unwrap_or_default();
        let running = memory::processes_of(&ns, &name);
        let mut ready = true;
        for p in &running {
            if !wanted.contains(&p.node) || p.spec.private_seed != uid {
                tracing::info!(pid = p.pid, guest = %p.guest, node = %p.node, "stopping vm-memory");
                p.kill();
            }
        }
        for node in wanted {
            if let Some(p) = running
                .iter()
                .find(|p| &p.node == node && p.spec.private_seed == uid)
            {
                ready &= p.ready().is_some();
                continue;
            }
            let key = (format!("{ns}_{name}_{uid}"), node.clone());
            if let Some(&pid) = spawned.get(&key) {
                // Started by us and still alive, just not visible under its argv yet.
                if unsafe { libc::kill(pid as i32, 0) } == 0 {
                    ready = false;
                    continue;
                }
            }
            let spec = memory_spec(vmi, mc);
            let mut cmd = tokio::process::Command::new(&mc.helper);
            cmd.args(spec.argv(&ns, &name, &uid, node))
                .stdin(std::process::Stdio::null())
                .stdout(std::process::Stdio::null());
            if mc.die_with_parent {
                cmd.arg(DIE_WITH_PARENT_ARG);
            }
            let child = cmd
                .spawn()
                .map_err(|e| Error::Memory(format!("starting {}: {e}", mc.helper.display())))?;
            tracing::info!(pid = ?child.id(), guest = %format!("{ns}_{name}"), %node, "started vm-memory");
            if let Some(pid) = child.id() {
                spawned.insert(key, pid);
            }
            // Dropping the handle leaves the process running; tokio reaps it when it exits.
            drop(child);
            ready = false;
        }
        Ok(ready)
    }
}

/// The guest memory a VMI's annotations ask for.
pub fn memory_spec(vmi: &VirtualMachineInstance, mc: &MemoryConfig) -> MemorySpec {
    let ann = vmi.annotations();
    let num = |k: &str, d: usize| ann.get(k).and_then(|v| v.parse().ok()).unwrap_or(d);
    MemorySpec {
        image: ann
            .get(ANN_IMAGE)
            .cloned()
            .unwrap_or_else(|| mc.default_image.clone()),
        image_mib: num(ANN_IMAGE_MIB, mc.default_image_mib),
        private_mib: num(ANN_PRIVATE_MIB, mc.default_private_mib),
        private_seed: vmi.uid().unwrap_or_default(),
        shared: ann.get(ANN_SHARED_MEMORY).map(|name| SharedMemorySpec {
            name: name.clone(),
            mib: num(ANN_SHARED_MIB, DEFAULT_SHARED_MIB),
        }),
    }
}

/// Annotation from the VMIM, else from the VMI.
pub(crate) fn injected<'a>(
    vmim: &'a VirtualMachineInstanceMigration,
    vmi: &'a VirtualMachineInstance,
    key: &str,
) -> Option<&'a str> {
    vmim.annotations()
        .get(key)
        .or_else(|| vmi.annotations().get(key))
        .map(String::as_str)
}

pub fn now_rfc3339() -> String {
    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Millis, true)
}

pub(crate) fn error_policy<K>(_obj: Arc<K>, err: &Error, _ctx: Arc<Ctx>) -> Action {
    tracing::warn!(error = %err, "reconcile failed; retrying");
    Action::requeue(Duration::from_millis(500))
}

/// Runs the stand-in until the future is dropped (or a watch fails for good).
pub async fn run(client: Client, cfg: StandinConfig) -> anyhow::Result<()> {
    let ns = cfg.namespace.clone();
    let ctx = Arc::new(Ctx {
        client: client.clone(),
        cfg,
        memory_lock: tokio::sync::Mutex::new(BTreeMap::new()),
    });
    fn scoped<K>(client: &Client, ns: &Option<String>) -> Api<K>
    where
        K: kube::Resource<Scope = k8s_openapi::NamespaceResourceScope>,
        <K as kube::Resource>::DynamicType: Default,
    {
        match ns {
            Some(ns) => Api::namespaced(client.clone(), ns),
            None => Api::all(client.clone()),
        }
    }
    let vmis: Api<VirtualMachineInstance> = scoped(&client, &ns);
    let vmims: Api<VirtualMachineInstanceMigration> = scoped(&client, &ns);
    let pods: Api<Pod> = scoped(&client, &ns);
    if ctx.cfg.role == Role::Handler {
        let pool = ns.clone().map(|ns| (crate::POOL_LABEL.to_string(), ns));
        let sweeper = sweep_memory(ctx.clone(), vmis.clone(), ns);
        return tokio::select! {
            r = handler::run(ctx.clone(), vmis, vmims, pods, pool) => r,
            r = sweeper => r,
        };
    }
    let launcher_pods = watcher::Config::default().labels("kubevirt.io=virt-launcher");

    let vmi_ctrl = Controller::new(vmis.clone(), watcher::Config::default())
        .owns(pods.clone(), launcher_pods.clone())
        .run(vmi::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "vmi controller");
            }
        });
    let vmim_ctrl = Controller::new(vmims, watcher::Config::default())
        .watches(
            pods,
            watcher::Config::default().labels(commonground::api::kubevirt::MIGRATION_JOB_UID_LABEL),
            |pod: Pod| {
                let ns = pod.namespace();
                pod.annotations()
                    .get(commonground::api::kubevirt::MIGRATION_JOB_NAME_ANNOTATION)
                    .map(|name| {
                        let r = ObjectRef::new(name);
                        match ns {
                            Some(ns) => r.within(&ns),
                            None => r,
                        }
                    })
            },
        )
        .run(vmim::reconcile, error_policy, ctx.clone())
        .for_each(|r| async move {
            if let Err(e) = r {
                tracing::debug!(error = %e, "vmim controller");
            }
        });
    let sweeper = sweep_memory(ctx.clone(), vmis, ns);
    tokio::select! {
        _ = vmi_ctrl => anyhow::bail!("VMI controller stopped"),
        _ = vmim_ctrl => anyhow::bail!("VMIM controller stopped"),
        r = sweeper => r,
    }
}

/// Kills `vm-memory` processes (of guests in the stand-in's scope) whose VMI no longer exists.
async fn sweep_memory(
    ctx: Arc<Ctx>,
    vmis: Api<VirtualMachineInstance>,
    ns: Option<String>,
) -> anyhow::Result<()> {
    if ctx.cfg.memory.is_none() {
        return std::future::pending().await;
    }
    let mut tick = tokio::time::interval(ctx.cfg.resync.min(Duration::from_secs(2)));
    loop {
        tick.tick().await;
        // Hold the lock across the list so no helper starts between the list and the kills.
        let _guard = ctx.memory_lock.lock().await;
        let Ok(list) = vmis.list(&Default::default()).await else {
            continue;
        };
        let live: BTreeSet<(String, String)> = list
            .items
            .iter()
            .filter(|v| v.metadata.deletion_timestamp.is_none())
            .map(|v| {
                (
                    format!("{}_{}", v.namespace().unwrap_or_default(), v.name_any()),
                    v.uid().unwrap_or_default(),
                )
            })
            .collect();
        for p in memory::scan_processes() {
            let Some((pns, _)) = p.guest.split_once('_') else {
                continue;
            };
            if ns.as_deref().is_some_and(|ns| ns != pns) {
                continue;
            }
            if !live.contains(&(p.guest.clone(), p.spec.private_seed.clone())) {
                tracing::info!(pid = p.pid, guest = %p.guest, "VMI gone; stopping vm-memory");
                p.kill();
            }
        }
        memory::sweep_ready_files();
    }
}
