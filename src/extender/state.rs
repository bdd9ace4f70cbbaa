//! What the handlers read: the planner and the few lookups a migration target pod needs, as
//! one immutable [`ClusterState`]. In production it is rebuilt in the background from the
//! watch-fed [`ClusterView`] whenever the view changes, so a request never waits for a
//! rebuild and never calls the API; tests build it from a hand-made snapshot.

use std::collections::HashMap;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use crate::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use crate::api::VirtualMachineMigration;
use crate::plan::{Planner, VmKey, VmRequest};
use crate::telemetry::Readiness;
use crate::view::{convert, ClusterView};

/// A VMI as the extender knows it.
#[derive(Clone, Debug)]
pub struct VmiEntry {
    pub key: VmKey,
    /// `None` when the VMI has no node yet (nothing to migrate from).
    pub request: Option<VmRequest>,
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
        };
        for vmi in vmis {
            let (Some(ns), Some(name)) = (&vmi.metadata.namespace, &vmi.metadata.name) else {
                continue;
            };
            let key = VmKey::new(ns.clone(), name.clone());
            if let Some(uid) = &vmi.metadata.uid {
                state.by_uid.insert(uid.clone(), key.clone());
            }
            state.vmis.insert(
                key.clone(),
                VmiEntry {
                    key,
                    request: convert::vm_request(vmi),
                },
            );
        }
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

    /// From the view's stores (and its cached planner).
    pub fn from_view(view: &ClusterView, planner: Arc<Planner>) -> Self {
        let vmis = view.vmis.state();
        let vmims = view.vmims.state();
        let vmms = view.vmms.state();
        Self::new(
            planner,
            vmis.iter().map(|v| &**v),
            vmims.iter().map(|v| &**v),
            vmms.iter().map(|v| &**v),
        )
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
    pub fn spawn(view: ClusterView, tick: Duration, ready: Readiness) -> Self {
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
                    Some((planner.clone(), ClusterState::from_view(&view, planner)))
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
