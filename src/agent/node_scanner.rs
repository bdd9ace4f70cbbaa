//! The node's scan cycle: scan every VM on the node, update the replicated-region
//! table, and produce what is published. Blocking work; the agent runs it off the async runtime.

use std::collections::{BTreeMap, BTreeSet};
use std::time::Instant;

use crate::api::digest::{LoadStatus, NodeCapacity};
use crate::plan::region::{ClusterKey, RegionGeometry};
use crate::plan::replicated::{rebuild_node_sketch, RegionTable};
use crate::plan::sketch::DEFAULT_THRESHOLD;
use crate::plan::{NodeRegionSummary, VmKey, VmRegionSummary};

use super::discover::{self, QemuProcess};
use super::load;
use super::publish::DigestInputs;
use super::shared_access::SharedAccessMonitor;
use super::shared_memory;
use super::vm_tracker::{RescanMode, RescanPolicy, TrackedVm};
use super::AgentError;

/// Regions held at least this many times on a node are listed as replicated.
pub const REPLICATION_THRESHOLD: u32 = 2;
/// At most this many replicated entries are published.
const MAX_REPLICATED: usize = 2000;

pub struct NodeScanner {
    pub node: String,
    pub work_group: String,
    pub geometry: RegionGeometry,
    pub key: ClusterKey,
    pub mode: RescanMode,
    pub policy: RescanPolicy,
    pub vms: BTreeMap<VmKey, TrackedVm>,
    table: RegionTable,
    node_counters: Option<load::NodeCounters>,
    node_rates: load::LoadRates,
    /// `node_rates` come from two readings (not the defaults before the second one).
    node_measured: bool,
    /// Where several (fake) nodes share one host: the argument that, followed by the node
    /// name, marks this node's processes; the node's load is then theirs, not the host's.
    process_scope: Option<String>,
    process_counters: Option<load::ProcessSetCounters>,
    /// Memory groups over time, and accesses to shared memory after a member left.
    pub shared: SharedAccessMonitor,
}

impl NodeScanner {
    pub fn new(
        node: String,
        work_group: String,
        geometry: RegionGeometry,
        key: ClusterKey,
        mode: RescanMode,
        policy: RescanPolicy,
    ) -> Self {
        Self {
            node,
            work_group,
            geometry,
            key,
            mode,
            policy,
            vms: BTreeMap::new(),
            table: RegionTable::default(),
            node_counters: load::sample_node().ok(),
            node_rates: load::LoadRates::default(),
            node_measured: false,
            process_scope: None,
            process_counters: None,
            shared: SharedAccessMonitor::default(),
        }
    }

    /// With `node_arg`, the node's whole load is measured over the processes whose command
    /// line has that argument followed by the node name (the VMs and any other work of this
    /// node), each from its `/proc/<pid>/stat` and `/proc/<pid>/io`, instead of over the
    /// host's `/proc/stat`, which every node sharing the host would report alike. The node's
    /// CPU count and memory size stay the host's.
    pub fn scoped_to_processes(mut self, node_arg: Option<String>) -> Self {
        self.process_scope = node_arg;
        self
    }

    /// One interval: start tracking new VMs among `processes` that are in `on_node`, refresh
    /// the others, forget those gone. A VM whose process cannot be read is logged and skipped.
    /// Memory groups are updated from the VMs' mappings, and the members left behind by a
    /// member that moved away are watched for accesses to the memory they shared with it.
    pub fn tick(&mut self, processes: &[QemuProcess], on_node: &BTreeSet<VmKey>) {
        let wanted: BTreeMap<&VmKey, i32> = processes
            .iter()
            .filter(|p| on_node.contains(&p.vm))
            .map(|p| (&p.vm, p.pid))
            .collect();
        // After a restart that took groups back from the digest: the processes of departed
        // members that still run are waited for, as after a departure seen.
        self.shared.adopt_departed(
            processes
                .iter()
                .filter(|p| !on_node.contains(&p.vm))
                .map(|p| (&p.vm, p.pid)),
            Instant::now(),
        );
        // Shared memory accesses are read before any scan: reading guest memory marks the
        // pages it reads accessed, for every process that maps them.
        self.shared.probe(
            self.vms
                .values()
                .filter(|t| wanted.get(&t.vm) == Some(&t.pid))
                .map(|t| (&t.vm, t.pid, t.maps.as_slice())),
            self.mode,
            Instant::now(),
        );
        let gone: Vec<VmKey> = self
            .vms
            .iter()
            .filter(|(vm, t)| wanted.get(vm) != Some(&t.pid))
            .map(|(vm, _)| vm.clone())
            .collect();
        let now = Instant::now();
        for vm in gone {
            tracing::info!(namespace = %vm.namespace, name = %vm.name, "VM left the node or its process changed");
            if let Some(t) = self.vms.get(&vm) {
                self.shared.member_left(&vm, t.pid, now);
            }
            self.vms.remove(&vm);
            self.table.release(&vm);
        }
        // VMs whose process went away during this interval: they have left the node too.
        let mut vanished: BTreeSet<VmKey> = BTreeSet::new();
        for (&vm, &pid) in &wanted {
            let result = match self.vms.get_mut(vm) {
                Some(t) => t.refresh(self.mode, &self.policy).map(|o| o.exited),
                None => {
                    match TrackedVm::start(vm.clone(), pid, self.geometry, self.mode, &self.policy)
                    {
                        Ok(t) => {
                            let exited = t.scan.exited;
                            tracing::info!(namespace = %vm.namespace, name = %vm.name, pid, bytes = t.scan.counts().bytes, "first scan done");
                            self.vms.insert(vm.clone(), t);
                            Ok(exited)
                        }
                        Err(e) => Err(e),
                    }
                }
            };
            match result {
                Ok(false) => {
                    let ids = self.vms[vm].scan.identities(&self.key);
                    self.table.admit(vm.clone(), ids);
                }
                Ok(true) => {
                    tracing::info!(namespace = %vm.namespace, name = %vm.name, pid, "QEMU process exited during the scan");
                    self.vms.remove(vm);
                    self.table.release(vm);
                    vanished.insert(vm.clone());
                }
                Err(e) => {
                    if matches!(e, AgentError::NoProcess(_)) {
                        vanished.insert(vm.clone());
                    }
                    tracing::warn!(namespace = %vm.namespace, name = %vm.name, pid, error = %e, "cannot scan VM");
                    self.vms.remove(vm);
                    self.table.release(vm);
                }
            }
        }
        let groups = shared_memory::memory_groups(
            &self
                .vms
                .values()
                .map(|t| (t.vm.clone(), t.maps.clone()))
                .collect::<Vec<_>>(),
        );
        let present: BTreeSet<VmKey> = wanted
            .keys()
            .map(|vm| (*vm).clone())
            .filter(|vm| !vanished.contains(vm))
            .collect();
        self.shared.update(groups, &present, Instant::now());
        // After the scans, so the next interval's reading holds the VMs' own accesses only.
        let pids: BTreeMap<VmKey, i32> = wanted
            .iter()
            .map(|(vm, pid)| ((*vm).clone(), *pid))
            .collect();
        self.shared.arm(&pids, self.mode, Instant::now());
        self.measure_node();
    }

    /// The node's whole load over the last interval: the host's, or its processes' (see
    /// [`NodeScanner::scoped_to_processes`]).
    fn measure_node(&mut self) {
        let Ok(c) = load::sample_node() else {
            return;
        };
        match &self.process_scope {
            None => {
                if let Some(prev) = &self.node_counters {
                    self.node_rates = load::node_rates(prev, &c);
                    self.node_measured = true;
                }
            }
            Some(arg) => {
                let pids = discover::processes_with((arg, &self.node)).unwrap_or_else(|e| {
                    tracing::warn!(error = %e, "cannot list /proc");
                    Vec::new()
                });
                let now = load::sample_processes(&pids);
                if let Some(prev) = &self.process_counters {
                    self.node_rates = load::process_set_rates(prev, &now);
                    self.node_measured = true;
                }
                self.process_counters = Some(now);
            }
        }
        self.node_counters = Some(c);
    }

    /// What would be published now.
    pub fn inputs(&self) -> DigestInputs {
        let (cpus, total_mem) = self
            .node_counters
            .map(|c| (c.cpus, c.total_memory_bytes))
            .unwrap_or((1, 0));
        // Rounded: more digits are noise, and `kubectl get nrd` shows the composite as is.
        let load_status = |r: &load::LoadRates| LoadStatus {
            cpu_cores: round3(r.cpu_cores),
            io_bytes_per_second: r.io_bytes_per_second.round(),
            memory_bytes: r.memory_bytes,
            composite: round3(load::composite(r, cpus, total_mem)),
        };
        let mut vm_loads = BTreeMap::new();
        let vms: Vec<VmRegionSummary> = self
            .vms
            .values()
            .map(|t| {
                let c = t.scan.counts();
                let l = load_status(&t.load);
                let composite = l.composite;
                vm_loads.insert(t.vm.clone(), l);
                VmRegionSummary {
                    vm: t.vm.clone(),
                    memory_bytes: c.bytes,
                    regions: c.regions,
                    zero_regions: c.zero_regions,
                    sketch: t.scan.sketch(&self.key, DEFAULT_THRESHOLD),
                    dirty_rate: t.dirty_rate,
                    working_set_bytes: t.working_set_bytes,
                    load: composite,
                }
            })
            .collect();
        let groups = self.shared.groups(Instant::now());
        DigestInputs {
            summary: NodeRegionSummary {
                node: self.node.clone(),
                work_group: self.work_group.clone(),
                geometry: self.geometry,
                key_id: self.key.key_id.clone(),
                sketch: rebuild_node_sketch(DEFAULT_THRESHOLD, &vms),
                vms,
            },
            vm_loads,
            node_load: load_status(&self.node_rates),
            idle_cpu_cores: self
                .node_measured
                .then(|| round3(load::idle_cores(cpus, self.node_rates.cpu_cores))),
            capacity: NodeCapacity {
                cpu_millis: cpus * 1000,
                memory_bytes: total_mem,
            },
            replicated: self.table.replicated(
                &self.node,
                self.geometry.pages_per_region,
                REPLICATION_THRESHOLD,
                DEFAULT_THRESHOLD,
                MAX_REPLICATED,
            ),
            replication_threshold: REPLICATION_THRESHOLD,
            groups,
            scan_mode: self.mode.as_str().to_string(),
            scan_time: crate::api::time::Timestamp::now(),
        }
    }
}

/// `x` to three decimals.
fn round3(x: f64) -> f64 {
    (x * 1000.0).round() / 1000.0
}

/// Every KubeVirt QEMU process on the host (an empty list if /proc cannot be listed); with
/// `node_arg`, only those whose command line has that argument followed by the node name.
pub fn discover(node_arg: Option<(&str, &str)>) -> Vec<QemuProcess> {
    discover::find_qemu_processes_with(node_arg).unwrap_or_else(|e| {
        tracing::warn!(error = %e, "cannot list /proc");
        Vec::new()
    })
}
