//! Watch-fed in-memory indexes of the cluster, shared by the controller and the extender.
//! No API call happens on a planning path: everything is read from these stores, and the
//! planner is rebuilt from them (at most every `rebuild_interval`) when something changed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use futures::{Stream, StreamExt};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::runtime::reflector::{self, Store};
use kube::runtime::{watcher, WatchStreamExt};
use kube::{Api, Client, Resource};
use serde::de::DeserializeOwned;

use super::convert;
use super::fit::FitContext;
use crate::api::kubevirt::{
    KubeVirt, MigrationPolicy, VirtualMachineInstance, VirtualMachineInstanceMigration,
    DEFAULT_PARALLEL_MIGRATIONS_PER_CLUSTER, DEFAULT_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE,
};
use crate::api::{MigrationNetwork, NodeRegionDigest, VirtualMachineMigration};
use crate::plan::region::RegionGeometry;
use crate::plan::workgroups::DistanceMatrix;
use crate::plan::{ClusterSnapshot, Planner, VmKey, VmRequest};

#[derive(Clone, Debug)]
pub struct ViewConfig {
    pub work_group_label: String,
    pub distances: DistanceMatrix,
    pub geometry: RegionGeometry,
    /// Minimum time between two planner rebuilds (large clusters rebuild in the background
    /// of requests; small ones effectively at once).
    pub rebuild_interval: Duration,
}

impl Default for ViewConfig {
    fn default() -> Self {
        Self {
            work_group_label: crate::plan::workgroups::DEFAULT_WORK_GROUP_LABEL.into(),
            distances: DistanceMatrix::default(),
            geometry: RegionGeometry::default(),
            rebuild_interval: Duration::from_millis(250),
        }
    }
}

/// KubeVirt's migration limits (from the KubeVirt CR, or KubeVirt's defaults).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct MigrationLimits {
    pub per_cluster: u32,
    pub outbound_per_node: u32,
}

#[derive(Clone)]
pub struct ClusterView {
    pub nodes: Store<Node>,
    pub pods: Store<Pod>,
    pub digests: Store<NodeRegionDigest>,
    pub vmis: Store<VirtualMachineInstance>,
    pub vmims: Store<VirtualMachineInstanceMigration>,
    pub vmms: Store<VirtualMachineMigration>,
    pub kubevirts: Store<KubeVirt>,
    pub networks: Store<MigrationNetwork>,
    /// Claims and volumes: where a VM's local or zonal storage lets it run.
    pub pvcs: Store<PersistentVolumeClaim>,
    pub pvs: Store<PersistentVolume>,
    /// KubeVirt's MigrationPolicies (their bandwidth limit). Not waited for: a cluster
    /// without the CRD still plans, with the KubeVirt CR's limit.
    pub policies: Store<MigrationPolicy>,
    /// The controllers following the migration requests, KubeVirt's migrations and the VMIs:
    /// they reconcile on the view's watches instead of opening their own.
    followers: Followers,
    config: ViewConfig,
    version: Arc<AtomicU64>,
    cache: Arc<Mutex<Option<Cached>>>,
}

#[derive(Clone, Default)]
struct Followers {
    vmms: Arc<Fanout<VirtualMachineMigration>>,
    vmims: Arc<Fanout<VirtualMachineInstanceMigration>>,
    vmis: Arc<Fanout<VirtualMachineInstance>>,
}

struct Cached {
    version: u64,
    built: Instant,
    /// How long building it took: rebuilds are spaced by a multiple of it.
    took: Duration,
    planner: Arc<Planner>,
}

/// A rebuild waits at least this many times as long as the last build took, even when
/// asked for a fresh planner: a large cluster whose pods and nodes change all the time spends
/// at most about a fifth of a core rebuilding, and a small one rebuilds at once.
const REBUILD_SPACING: u32 = 4;

/// What a watch can cache: a typed Kubernetes object.
pub trait Watchable:
    Resource<DynamicType = ()> + Clone + DeserializeOwned + std::fmt::Debug + Send + Sync + 'static
{
}

impl<K> Watchable for K where
    K: Resource<DynamicType = ()>
        + Clone
        + DeserializeOwned
        + std::fmt::Debug
        + Send
        + Sync
        + 'static
{
}

/// A reflector fed by a watch of `api` with `config` (the agent scopes its watches to its own
/// node), and the stream that drives it: each event applied bumps `version`, each error is
/// logged and retried with backoff. Cached objects carry no managedFields.
pub fn watch<K>(
    api: Api<K>,
    config: watcher::Config,
    version: Arc<AtomicU64>,
) -> (Store<K>, impl Stream<Item = ()> + Send + 'static)
where
    K: Watchable,
{
    let (store, _, stream) = watch_shared(api, config, version);
    (store, stream)
}

/// As [`watch`], with a [`Fanout`] that hands every object the watch changes to the
/// controllers that reconcile on this kind: one watch of the API server, however many of
/// them follow it.
pub fn watch_shared<K>(
    api: Api<K>,
    config: watcher::Config,
    version: Arc<AtomicU64>,
) -> (
    Store<K>,
    Arc<Fanout<K>>,
    impl Stream<Item = ()> + Send + 'static,
)
where
    K: Watchable,
{
    let (reader, writer) = reflector::store();
    let fanout = Arc::new(Fanout::default());
    let kind = K::kind(&()).to_string();
    let (cached, followers) = (reader.clone(), fanout.clone());
    let stream = watcher(api, config)
        .default_backoff()
        // Nothing reads managedFields, and they are often the larger part of a Pod, Node or
        // VMI: dropped before the object is cached.
        .modify(|o: &mut K| o.meta_mut().managed_fields = None)
        .reflect(writer)
        .map(move |event| {
            match event {
                Ok(event) => {
                    version.fetch_add(1, Ordering::Relaxed);
                    followers.applied(&cached, event);
                }
                // The watcher retries with backoff; say what is failing.
                Err(e) => tracing::warn!(kind = %kind, error = %e, "watch error"),
            }
        });
    (reader, fanout, stream)
}

/// The controllers following one watch. Each gets every object the watch applies or deletes
/// (the cached copy, not a new one) and, when the watch lists afresh, every object it holds;
/// a controller that subscribes late first gets everything already cached. Controllers
/// deduplicate what they are given, so an object handed over twice costs one reconcile.
pub struct Fanout<K> {
    followers: Mutex<Vec<futures::channel::mpsc::UnboundedSender<Arc<K>>>>,
}

impl<K> Default for Fanout<K> {
    fn default() -> Self {
        Self {
            followers: Mutex::new(Vec::new()),
        }
    }
}

impl<K> Fanout<K>
where
    K: Resource<DynamicType = ()> + Clone + Send + Sync + 'static,
{
    /// A stream of the objects the watch changes from now on, after those cached now.
    pub fn subscribe(&self, cached: &Store<K>) -> impl Stream<Item = Arc<K>> + Send + 'static {
        let (tx, rx) = futures::channel::mpsc::unbounded();
        // Under the lock, so no change is handed out between the copy and the registration.
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        for object in cached.state() {
            let _ = tx.unbounded_send(object);
        }
        followers.push(tx);
        rx
    }

    /// Hands an event the reflector has just applied to the followers; those gone are
    /// forgotten.
    fn applied(&self, cached: &Store<K>, event: watcher::Event<K>) {
        let mut followers = self.followers.lock().unwrap_or_else(|p| p.into_inner());
        if followers.is_empty() {
            return;
        }
        let objects: Vec<Arc<K>> = match event {
            watcher::Event::Apply(o) => vec![cached
                .get(&reflector::ObjectRef::from_obj(&o))
                .unwrap_or_else(|| Arc::new(o))],
            watcher::Event::Delete(o) => vec![Arc::new(o)],
            watcher::Event::InitDone => cached.state(),
            watcher::Event::Init | watcher::Event::InitApply(_) => return,
        };
        followers.retain(|tx| objects.iter().all(|o| tx.unbounded_send(o.clone()).is_ok()));
    }
}

/// Objects for a view that no watch feeds (unit tests of the reconcilers).
#[cfg(test)]
#[derive(Default)]
pub struct Fixed {
    pub nodes: Vec<Node>,
    pub pods: Vec<Pod>,
    pub digests: Vec<NodeRegionDigest>,
    pub vmis: Vec<VirtualMachineInstance>,
    pub vmims: Vec<VirtualMachineInstanceMigration>,
    pub vmms: Vec<VirtualMachineMigration>,
    pub kubevirts: Vec<KubeVirt>,
    pub networks: Vec<MigrationNetwork>,
    pub pvcs: Vec<PersistentVolumeClaim>,
    pub pvs: Vec<PersistentVolume>,
    pub policies: Vec<MigrationPolicy>,
}

#[cfg(test)]
fn fixed_store<K>(objects: Vec<K>) -> Store<K>
where
    K: Resource<DynamicType = ()> + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let (reader, mut writer) = reflector::store();
    writer.apply_watcher_event(&watcher::Event::Init);
    for o in objects {
        writer.apply_watcher_event(&watcher::Event::InitApply(o));
    }
    writer.apply_watcher_event(&watcher::Event::InitDone);
    reader
}

impl ClusterView {
    /// Starts every watch as a background task and returns the view at once; use
    /// [`ClusterView::wait_ready`] before trusting it.
    pub fn start(client: Client, config: ViewConfig) -> Self {
        // Only the planner's inputs (nodes, pods, digests) count as a change that rebuilds it:
        // a request's status write or a VMI's heartbeat leaves the planner as it is.
        let version = Arc::new(AtomicU64::new(0));
        let elsewhere = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        macro_rules! watched {
            ($api:expr, $counter:expr) => {{
                let config = watcher::Config::default().any_semantic();
                let (store, stream) = watch($api, config, $counter.clone());
                tasks.push(stream.boxed());
                store
            }};
        }
        macro_rules! followed {
            ($api:expr) => {{
                let config = watcher::Config::default().any_semantic();
                let (store, fanout, stream) = watch_shared($api, config, elsewhere.clone());
                tasks.push(stream.boxed());
                (store, fanout)
            }};
        }
        let (vmis, vmi_followers) = followed!(Api::<VirtualMachineInstance>::all(client.clone()));
        let (vmims, vmim_followers) =
            followed!(Api::<VirtualMachineInstanceMigration>::all(client.clone()));
        let (vmms, vmm_followers) = followed!(Api::<VirtualMachineMigration>::all(client.clone()));
        let view = ClusterView {
            nodes: watched!(Api::<Node>::all(client.clone()), version),
            pods: watched!(Api::<Pod>::all(client.clone()), version),
            digests: watched!(Api::<NodeRegionDigest>::all(client.clone()), version),
            vmis,
            vmims,
            vmms,
            followers: Followers {
                vmms: vmm_followers,
                vmims: vmim_followers,
                vmis: vmi_followers,
            },
            kubevirts: watched!(Api::<KubeVirt>::all(client.clone()), elsewhere),
            networks: watched!(Api::<MigrationNetwork>::all(client.clone()), elsewhere),
            pvcs: watched!(Api::<PersistentVolumeClaim>::all(client.clone()), elsewhere),
            pvs: watched!(Api::<PersistentVolume>::all(client.clone()), elsewhere),
            policies: watched!(Api::<MigrationPolicy>::all(client), elsewhere),
            config,
            version,
            cache: Arc::new(Mutex::new(None)),
        };
        for task in tasks {
            tokio::spawn(task.for_each(|_| async {}));
        }
        view
    }

    /// A view of exactly these objects, never updated.
    #[cfg(test)]
    pub fn fixed(config: ViewConfig, objects: Fixed) -> Self {
        ClusterView {
            nodes: fixed_store(objects.nodes),
            pods: fixed_store(objects.pods),
            digests: fixed_store(objects.digests),
            vmis: fixed_store(objects.vmis),
            vmims: fixed_store(objects.vmims),
            vmms: fixed_store(objects.vmms),
            kubevirts: fixed_store(objects.kubevirts),
            networks: fixed_store(objects.networks),
            pvcs: fixed_store(objects.pvcs),
            pvs: fixed_store(objects.pvs),
            policies: fixed_store(objects.policies),
            followers: Followers::default(),
            config,
            version: Arc::new(AtomicU64::new(1)),
            cache: Arc::new(Mutex::new(None)),
        }
    }

    /// Waits until every store has seen its first full list.
    pub async fn wait_ready(&self) {
        let _ = tokio::join!(
            self.nodes.wait_until_ready(),
            self.pods.wait_until_ready(),
            self.digests.wait_until_ready(),
            self.vmis.wait_until_ready(),
            self.vmims.wait_until_ready(),
            self.vmms.wait_until_ready(),
            self.kubevirts.wait_until_ready(),
            self.networks.wait_until_ready(),
            self.pvcs.wait_until_ready(),
            self.pvs.wait_until_ready(),
        );
    }

    /// The migration requests as they change (those cached first), for a controller that
    /// reconciles on them without a watch of its own.
    pub fn vmm_changes(&self) -> impl Stream<Item = Arc<VirtualMachineMigration>> + Send + 'static {
        self.followers.vmms.subscribe(&self.vmms)
    }

    /// KubeVirt's migrations as they change (those cached first).
    pub fn vmim_changes(
        &self,
    ) -> impl Stream<Item = Arc<VirtualMachineInstanceMigration>> + Send + 'static {
        self.followers.vmims.subscribe(&self.vmims)
    }

    /// The VMIs as they change (those cached first).
    pub fn vmi_changes(&self) -> impl Stream<Item = Arc<VirtualMachineInstance>> + Send + 'static {
        self.followers.vmis.subscribe(&self.vmis)
    }

    pub fn config(&self) -> &ViewConfig {
        &self.config
    }

    /// The planner's input, built from the stores.
    pub fn snapshot(&self) -> ClusterSnapshot {
        let mut digests = Vec::new();
        let mut loads = std::collections::HashMap::new();
        for d in self.digests.state() {
            match d.to_summary() {
                Ok(s) => {
                    if let Some(status) = &d.status {
                        loads.insert(s.node.clone(), status.load.composite);
                    }
                    digests.push(s);
                }
                // One bad digest is skipped, the others still plan.
                Err(e) => tracing::warn!(error = %e, "skipping unusable digest"),
            }
        }
        let mut requested = std::collections::HashMap::<String, crate::plan::Resources>::new();
        let mut scalar = std::collections::HashMap::<String, BTreeMap<String, u64>>::new();
        for pod in self.pods.state() {
            if let Some(r) = convert::pod_requests_full(&pod) {
                if !r.scalar.is_empty() {
                    let s = scalar.entry(r.node.clone()).or_default();
                    for (k, v) in r.scalar {
                        *s.entry(k).or_default() += v;
                    }
                }
                let e = requested.entry(r.node).or_default();
                *e = *e + r.resources;
            }
        }
        let mut nodes: Vec<_> = self
            .nodes
            .state()
            .iter()
            .map(|n| {
                let mut f = convert::node_facts(n, &self.config.work_group_label);
                f.requested = requested.get(&f.name).copied().unwrap_or_default();
                f.scalar_requested = scalar.remove(&f.name).unwrap_or_default();
                f.load = loads.get(&f.name).copied();
                f
            })
            .collect();
        nodes.sort_by(|a, b| a.name.cmp(&b.name));
        ClusterSnapshot {
            geometry: self.config.geometry,
            nodes,
            digests,
            distances: self.config.distances.clone(),
        }
    }

    /// The current planner; rebuilt when the planner's inputs changed and the last build is
    /// older than the rebuild interval (`fresh`: whatever the interval), and always at most
    /// every [`REBUILD_SPACING`] times the last build's duration.
    pub fn planner(&self, fresh: bool) -> Arc<Planner> {
        let version = self.version.load(Ordering::Relaxed);
        // A panic while the lock was held (caught at the reconcile boundary) leaves a whole
        // value behind: the cache is replaced, never edited in place.
        let mut cache = self.cache.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = cache.as_ref() {
            let age = c.built.elapsed();
            let unchanged = c.version == version;
            let recent = age < self.config.rebuild_interval;
            let costly = age < c.took * REBUILD_SPACING;
            if unchanged || costly || (recent && !fresh) {
                return c.planner.clone();
            }
        }
        let started = Instant::now();
        let planner = Arc::new(Planner::new(self.snapshot()));
        *cache = Some(Cached {
            version,
            built: Instant::now(),
            took: started.elapsed(),
            planner: planner.clone(),
        });
        planner
    }

    /// The node's digest as cached (shared, not copied: a digest carries every VM's sketch).
    pub fn digest(&self, node: &str) -> Option<Arc<NodeRegionDigest>> {
        self.digests.get(&reflector::ObjectRef::new(node))
    }

    /// The idle CPU cores the node's agent measured, when its digest has a reading.
    pub fn measured_idle_cores(&self, node: &str) -> Option<f64> {
        self.digests
            .get(&reflector::ObjectRef::new(node))
            .and_then(|d| d.status.as_ref().and_then(|s| s.idle_cpu_cores))
    }

    pub fn vmi(&self, namespace: &str, name: &str) -> Option<Arc<VirtualMachineInstance>> {
        self.vmis
            .get(&reflector::ObjectRef::new(name).within(namespace))
    }

    /// The VM's request as the fit filter needs it: its launcher pod's resources under the
    /// KubeVirt CR's settings, its volumes' constraints and its anti-affinity's domains.
    pub fn vm_request(&self, vm: &VmKey) -> Option<VmRequest> {
        self.fit_context()
            .vm_request(&*self.vmi(&vm.namespace, &vm.name)?)
    }

    /// Why KubeVirt's migrations cannot be relayed now (its TLS between handlers on, or no
    /// KubeVirt CR), if they cannot.
    pub fn kubevirt_blocks_relay(&self) -> Option<&'static str> {
        let kubevirts = self.kubevirts.state();
        crate::api::kubevirt::kubevirt_blocks_relay(
            &kubevirts.iter().map(|k| &**k).collect::<Vec<_>>(),
        )
    }

    /// KubeVirt's bandwidth limit for the VM's migrations, where one is set.
    pub fn bandwidth_cap(&self, vm: &VmKey) -> Option<crate::plan::estimate::BandwidthCap> {
        let vmi = self.vmi(&vm.namespace, &vm.name)?;
        let policies = self.policies.state();
        super::bandwidth::bandwidth_cap(
            vmi.metadata.labels.as_ref().unwrap_or(&BTreeMap::new()),
            None,
            policies.iter().map(|p| &**p),
            self.kubevirts.state().first().map(|k| &**k),
        )
    }

    /// The CPU the VM's launcher pod requests (it lands on the target with the migration).
    pub fn launcher_cpu_millis(&self, vm: &VmKey) -> Option<u64> {
        let vmi = self.vmi(&vm.namespace, &vm.name)?;
        let config = convert::launcher_config(self.kubevirts.state().first().map(|k| &**k));
        Some(convert::launcher_spec(&vmi, &config).requests().cpu_millis)
    }

    /// What completing VM requests needs, from the stores as they are now.
    pub fn fit_context(&self) -> FitContext {
        FitContext::new(
            convert::launcher_config(self.kubevirts.state().first().map(|k| &**k)),
            self.pvcs.state(),
            self.pvs.state(),
            self.pods.state(),
            &self.nodes.state(),
        )
    }

    pub fn migration_limits(&self) -> MigrationLimits {
        let m = self
            .kubevirts
            .state()
            .first()
            .and_then(|kv| kv.spec.configuration.migrations.clone());
        MigrationLimits {
            per_cluster: m
                .as_ref()
                .and_then(|m| m.parallel_migrations_per_cluster)
                .unwrap_or(DEFAULT_PARALLEL_MIGRATIONS_PER_CLUSTER),
            outbound_per_node: m
                .as_ref()
                .and_then(|m| m.parallel_outbound_migrations_per_node)
                .unwrap_or(DEFAULT_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE),
        }
    }

    /// KubeVirt migrations not yet final: total, and per source node.
    pub fn running_migrations(&self) -> (u32, std::collections::HashMap<String, u32>) {
        let mut total = 0;
        let mut per_node = std::collections::HashMap::new();
        for m in self.vmims.state() {
            if m.is_final() {
                continue;
            }
            total += 1;
            let ns = m.metadata.namespace.as_deref().unwrap_or_default();
            let source = m
                .status
                .as_ref()
                .and_then(|s| s.migration_state.as_ref())
                .and_then(|s| s.source_node.clone())
                .or_else(|| {
                    self.vmi(ns, &m.spec.vmi_name)
                        .and_then(|v| v.node_name().map(str::to_string))
                });
            if let Some(source) = source {
                *per_node.entry(source).or_insert(0) += 1;
            }
        }
        (total, per_node)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use futures::FutureExt;
    use k8s_openapi::api::core::v1::ConfigMap;

    fn cm(name: &str, value: &str) -> ConfigMap {
        let mut c = ConfigMap::default();
        c.metadata.name = Some(name.into());
        c.metadata.namespace = Some("ns".into());
        c.data = Some([("v".to_string(), value.to_string())].into());
        c
    }

    fn value(c: &ConfigMap) -> String {
        format!(
            "{}={}",
            c.metadata.name.as_deref().unwrap(),
            c.data.as_ref().unwrap()["v"]
        )
    }

    /// What the stream holds now, without waiting.
    fn pending(rx: &mut (impl Stream<Item = Arc<ConfigMap>> + Unpin)) -> Vec<String> {
        let mut out = Vec::new();
        while let Some(Some(c)) = rx.next().now_or_never() {
            out.push(value(&c));
        }
        out.sort();
        out
    }

    /// Applies the event to the store, then hands it on, as the view's watch does.
    fn apply(
        writer: &mut reflector::store::Writer<ConfigMap>,
        reader: &Store<ConfigMap>,
        fanout: &Fanout<ConfigMap>,
        event: watcher::Event<ConfigMap>,
    ) {
        writer.apply_watcher_event(&event);
        fanout.applied(reader, event);
    }

    #[test]
    fn followers_get_the_cached_objects_then_every_change_and_the_gone_are_forgotten() {
        let (reader, mut writer) = reflector::store::<ConfigMap>();
        let fanout = Fanout::default();
        let mut early = Box::pin(fanout.subscribe(&reader));
        apply(&mut writer, &reader, &fanout, watcher::Event::Init);
        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::InitApply(cm("a", "1")),
        );
        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::InitApply(cm("b", "1")),
        );
        assert!(
            pending(&mut early).is_empty(),
            "nothing before the list is complete"
        );
        apply(&mut writer, &reader, &fanout, watcher::Event::InitDone);
        assert_eq!(pending(&mut early), ["a=1", "b=1"]);

        // A late follower starts from what is cached.
        let mut late = Box::pin(fanout.subscribe(&reader));
        assert_eq!(pending(&mut late), ["a=1", "b=1"]);

        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::Apply(cm("a", "2")),
        );
        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::Delete(cm("b", "1")),
        );
        assert_eq!(pending(&mut early), ["a=2", "b=1"]);
        assert_eq!(pending(&mut late), ["a=2", "b=1"]);

        // The object handed on is the cached one, not a copy.
        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::Apply(cm("c", "1")),
        );
        let handed = early.next().now_or_never().flatten().unwrap();
        let cached = reader
            .get(&reflector::ObjectRef::new("c").within("ns"))
            .unwrap();
        assert!(Arc::ptr_eq(&handed, &cached));

        drop(late);
        apply(
            &mut writer,
            &reader,
            &fanout,
            watcher::Event::Apply(cm("d", "1")),
        );
        assert_eq!(
            fanout.followers.lock().unwrap().len(),
            1,
            "the dropped follower is gone"
        );
        assert_eq!(pending(&mut early), ["d=1"]);
    }
}
