//! What the handlers read: the planner and the few lookups a migration target pod needs, as
//! one immutable [`ClusterState`]. In production it is rebuilt in the background from the
//! watch-fed [`ClusterView`] whenever the view changes, so a request never waits for a
//! rebuild and never calls the API; tests build it from a hand-made snapshot.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use crate::api::migration::MEMORY_GROUP_LABEL;
use crate::api::VirtualMachineMigration;
use crate::plan::planner::Scope;
use crate::plan::{Planner, VmKey, VmRequest};
use crate::telemetry::Readiness;
use crate::view::{convert, ClusterView};
use kube::ResourceExt;

/// A VMI as the extender knows it.
#[derive(Clone, Debug)]
pub struct VmiEntry {
    pub key: VmKey,
    /// `None` when the VMI has no node yet (nothing to migrate from).
    pub request: Option<VmRequest>,
    /// The target node of a migration in flight (KubeVirt's `status.migrationState`).
    pub heading_to: Option<String>,
}

impl VmiEntry {
    /// Where the VM runs, or is being moved to.
    pub fn destination(&self) -> Option<&str> {
        self.heading_to
            .as_deref()
            .or(self.request.as_ref().map(|r| r.source_node.as_str()))
    }
}

/// One consistent picture of the cluster for the handlers.
pub struct ClusterState {
    pub planner: Arc<Planner>,
    vmis: HashMap<VmKey, VmiEntry>,
    by_uid: HashMap<String, VmKey>,
    /// (namespace, VMIM name) → VMI name.
    migrations: HashMap<(String, String), String>,
    /// Target chosen by a non-final `VirtualMachineMigration` for a VMI.
    pins: HashMap<VmKey, String>,
    /// The other members of each VM's memory group (label or agent-detected).
    group_members: HashMap<VmKey, BTreeSet<VmKey>>,
    /// The scope of the migrations the extender places (`--default-scope`).
    pub scope: Scope,
}

impl ClusterState {
    pub fn new<'a>(
        planner: Arc<Planner>,
        vmis: impl IntoIterator<Item = &'a VirtualMachineInstance>,
        vmims: impl IntoIterator<Item = &'a VirtualMachineInstanceMigration>,
        vmms: impl IntoIterator<Item = &'a VirtualMachineMigration>,
    ) -> Self {
        let mut state = ClusterState {
            planner,
            vmis: HashMap::new(),
            by_uid: HashMap::new(),
            migrations: HashMap::new(),
            pins: HashMap::new(),
            group_members: HashMap::new(),
            scope: Scope::default(),
        };
        let mut labelled: BTreeMap<(String, String), Vec<VmKey>> = BTreeMap::new();
        for vmi in vmis {
            let (Some(ns), Some(name)) = (&vmi.metadata.namespace, &vmi.metadata.name) else {
                continue;
            };
            let key = VmKey::new(ns.clone(), name.clone());
            if let Some(uid) = &vmi.metadata.uid {
                state.by_uid.insert(uid.clone(), key.clone());
            }
            if let Some(group) = vmi.labels().get(MEMORY_GROUP_LABEL) {
                labelled
                    .entry((ns.clone(), group.clone()))
                    .or_default()
                    .push(key.clone());
            }
            let heading_to = vmi
                .status
                .as_ref()
                .and_then(|s| s.migration_state.as_ref())
                .filter(|m| !m.completed && !m.failed)
                .and_then(|m| m.target_node.clone())
                .filter(|t| !t.is_empty());
            state.vmis.insert(
                key.clone(),
                VmiEntry {
                    key,
                    request: convert::vm_request(vmi),
                    heading_to,
                },
            );
        }
        state.add_memory_groups(labelled.into_values());
        for m in vmims {
            if let (Some(ns), Some(name)) = (&m.metadata.namespace, &m.metadata.name) {
                state
                    .migrations
                    .insert((ns.clone(), name.clone()), m.spec.vmi_name.clone());
            }
        }
        for m in vmms {
            let Some(ns) = &m.metadata.namespace else {
                continue;
            };
            let Some(status) = &m.status else { continue };
            if status.phase.is_final() {
                continue;
            }
            if let Some(target) = status.target_node.as_ref().filter(|t| !t.is_empty()) {
                state.pins.insert(
                    VmKey::new(ns.clone(), m.spec.vmi_name.clone()),
                    target.clone(),
                );
            }
        }
        state
    }

    /// Records memory groups (each a list of members); a VM in several is joined with all.
    pub fn add_memory_groups(&mut self, groups: impl IntoIterator<Item = Vec<VmKey>>) {
        for members in groups {
            for m in &members {
                let others = self.group_members.entry(m.clone()).or_default();
                others.extend(members.iter().filter(|o| *o != m).cloned());
            }
        }
    }

    /// The other members of `vm`'s memory group that the view knows.
    pub fn group_members(&self, vm: &VmKey) -> Vec<&VmiEntry> {
        self.group_members
            .get(vm)
            .into_iter()
            .flatten()
            .filter_map(|m| self.vmis.get(m))
            .collect()
    }

    /// From the view's stores (and its cached planner).
    pub fn from_view(view: &ClusterView, planner: Arc<Planner>) -> Self {
        let vmis = view.vmis.state();
        let vmims = view.vmims.state();
        let vmms = view.vmms.state();
        let mut state = Self::new(
            planner,
            vmis.iter().map(|v| &**v),
            vmims.iter().map(|v| &**v),
            vmms.iter().map(|v| &**v),
        );
        // Groups the agents detected (QEMU processes mapping one shared object).
        let detected: Vec<Vec<VmKey>> = view
            .digests
            .state()
            .iter()
            .flat_map(|d| d.status.iter().flat_map(|s| s.memory_groups.clone()))
            .map(|g| {
                g.members
                    .iter()
                    .filter_map(|m| m.split_once('/'))
                    .map(|(ns, name)| VmKey::new(ns, name))
                    .collect()
            })
            .collect();
        state.add_memory_groups(detected);
        // Requests under the KubeVirt CR's settings, with volumes, anti-affinity and devices.
        let fit = view.fit_context();
        for vmi in &vmis {
            let (Some(ns), Some(name)) = (&vmi.metadata.namespace, &vmi.metadata.name) else {
                continue;
            };
            if let Some(entry) = state.vmis.get_mut(&VmKey::new(ns.clone(), name.clone())) {
                entry.request = fit.vm_request(vmi);
            }
        }
        state
    }

    /// The VMI whose UID a pod names in `kubevirt.io/created-by`, in the pod's namespace.
    pub fn vmi_by_uid(&self, namespace: &str, uid: &str) -> Option<&VmiEntry> {
        let key = self.by_uid.get(uid).filter(|k| k.namespace == namespace)?;
        self.vmis.get(key)
    }

    /// The VMI a `VirtualMachineInstanceMigration` moves.
    pub fn vmi_by_migration(&self, namespace: &str, vmim: &str) -> Option<&VmiEntry> {
        let vmi = self
            .migrations
            .get(&(namespace.to_string(), vmim.to_string()))?;
        self.vmis.get(&VmKey::new(namespace, vmi.as_str()))
    }

    /// The node a `VirtualMachineMigration` already chose for this VMI, if any.
    pub fn pinned_target(&self, vm: &VmKey) -> Option<&str> {
        self.pins.get(vm).map(String::as_str)
    }
}

/// Where handlers get the current state; `None` while the view is not ready yet.
pub trait StateSource: Send + Sync + 'static {
    fn current(&self) -> Option<Arc<ClusterState>>;
}

/// A fixed state (tests, benchmarks, `simulate`).
pub struct FixedState(pub Option<Arc<ClusterState>>);

impl StateSource for FixedState {
    fn current(&self) -> Option<Arc<ClusterState>> {
        self.0.clone()
    }
}

/// The production source: a state refreshed from a [`ClusterView`] by a background task.
#[derive(Clone, Default)]
pub struct LiveState {
    current: Arc<RwLock<Option<Arc<ClusterState>>>>,
}

impl StateSource for LiveState {
    fn current(&self) -> Option<Arc<ClusterState>> {
        self.current.read().ok()?.clone()
    }
}

impl LiveState {
    /// Waits for the view's first full lists in the background, then rebuilds the state
    /// every time the view's planner changes (checked every `tick`). Sets `ready` once the
    /// first state is in place.
    pub fn spawn(view: ClusterView, scope: Scope, tick: Duration, ready: Readiness) -> Self {
        let live = LiveState::default();
        let slot = live.current.clone();
        tokio::spawn(async move {
            view.wait_ready().await;
            tracing::info!("cluster view is ready; extender answers from it");
            let mut last: Option<Arc<Planner>> = None;
            let mut interval = tokio::time::interval(tick);
            interval.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                interval.tick().await;
                let view = view.clone();
                let prev = last.clone();
                // Building the planner and the maps is CPU work: keep it off the reactor.
                let built = tokio::task::spawn_blocking(move || {
                    let planner = view.planner(false);
                    if prev.as_ref().is_some_and(|p| Arc::ptr_eq(p, &planner)) {
                        return None;
                    }
                    let mut state = ClusterState::from_view(&view, planner.clone());
                    state.scope = scope;
                    Some((planner, state))
                })
                .await;
                match built {
                    Ok(Some((planner, state))) => {
                        last = Some(planner);
                        if let Ok(mut w) = slot.write() {
                            *w = Some(Arc::new(state));
                        }
                        ready.set(true);
                    }
                    Ok(None) => {}
                    Err(e) => tracing::error!(error = %e, "rebuilding the extender state failed"),
                }
            }
        });
        live
    }
}
