//! Recorded clusters for `simulate --snapshot FILE` (and `--write-snapshot FILE`).
//!
//! The file is JSON, either a bare [`ClusterSnapshot`] or this wrapper:
//!
//! ```json
//! {
//!   "cluster": { "geometry": {...}, "nodes": [...], "digests": [...], "distances": {...} },
//!   "vmRequests": { "ns/name": { "cpuMillis": 2000, "memoryBytes": 17179869184 } },
//!   "exact": { "ns/name": { "node-a": 123456, "node-b": 0 } }
//! }
//! ```
//!
//! - `cluster` is the planner's [`ClusterSnapshot`] (nodes with their facts, the published
//!   `NodeRegionSummary` digests with the VMs on each node and their sketches, the work-group
//!   distance matrix): exactly what the controller and the extender plan from.
//! - `vmRequests` (optional) gives a VM's virt-launcher requests; without it a VM requests
//!   1 CPU and its scanned memory.
//! - `exact` (optional) gives, per VM, the exact number of its non-zero regions present on
//!   each node (for instance from `commonground digest` over memory images). Nodes missing
//!   from a VM's map hold none of its regions. With it, bytes are charged exactly and the
//!   `oracle` policy runs; without it, bytes come from the planner's estimates and there is no
//!   oracle.
//!
//! Every VM listed in a digest is a migration candidate; its source is the digest's node.

use std::collections::{BTreeMap, HashMap};

use serde::{Deserialize, Serialize};

use crate::plan::cluster::{ClusterSnapshot, Resources, VmRequest};

use super::policies::ExactOverlap;
use super::SimulateError;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct RecordedFile {
    pub cluster: ClusterSnapshot,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_requests: BTreeMap<String, Resources>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub exact: Option<BTreeMap<String, BTreeMap<String, u64>>>,
}

/// Exact overlaps from the file, indexed like the requests and the snapshot's nodes.
pub struct ExactTable {
    per_vm: Vec<HashMap<usize, u64>>,
}

impl ExactOverlap for ExactTable {
    fn common_regions(&self, vm: usize, node: usize) -> u64 {
        self.per_vm[vm].get(&node).copied().unwrap_or(0)
    }
}

pub struct RecordedCluster {
    pub snapshot: ClusterSnapshot,
    pub requests: Vec<VmRequest>,
    pub exact: Option<ExactTable>,
}

pub fn parse(text: &str) -> Result<RecordedFile, SimulateError> {
    let value: serde_json::Value =
        serde_json::from_str(text).map_err(|e| SimulateError::Snapshot(e.to_string()))?;
    let file = if value.get("cluster").is_some() {
        serde_json::from_value(value)
    } else {
        serde_json::from_value(value).map(|cluster| RecordedFile {
            cluster,
            ..Default::default()
        })
    };
    file.map_err(|e| SimulateError::Snapshot(e.to_string()))
}

pub fn load(path: &std::path::Path) -> Result<RecordedCluster, SimulateError> {
    let text = std::fs::read_to_string(path)
        .map_err(|e| SimulateError::Snapshot(format!("{}: {e}", path.display())))?;
    prepare(parse(&text)?)
}

/// Turns a file into requests (one per VM in a digest) and the exact table.
pub fn prepare(file: RecordedFile) -> Result<RecordedCluster, SimulateError> {
    let snapshot = file.cluster;
    if snapshot.nodes.is_empty() {
        return Err(SimulateError::Snapshot("the snapshot has no nodes".into()));
    }
    let node_pos: HashMap<&str, usize> = snapshot
        .nodes
        .iter()
        .enumerate()
        .map(|(i, n)| (n.name.as_str(), i))
        .collect();
    let mut requests = Vec::new();
    for d in &snapshot.digests {
        if !node_pos.contains_key(d.node.as_str()) {
            return Err(SimulateError::Snapshot(format!(
                "digest for node {:?}, which is not in the node list",
                d.node
            )));
        }
        for vm in &d.vms {
            let requests_of =
                file.vm_requests
                    .get(&vm.vm.to_string())
                    .copied()
                    .unwrap_or(Resources {
                        cpu_millis: 1000,
                        memory_bytes: vm.memory_bytes,
                    });
            requests.push(VmRequest {
                vm: vm.vm.clone(),
                source_node: d.node.clone(),
                requests: requests_of,
                node_selector: BTreeMap::new(),
                affinity_terms: vec![],
                tolerations: vec![],
                cpu_model: None,
                cpu_features: vec![],
                summary: None,
                memory_bytes: vm.memory_bytes,
                fit: Default::default(),
            });
        }
    }
    let exact = match file.exact {
        None => None,
        Some(map) => {
            let mut per_vm = Vec::with_capacity(requests.len());
            for r in &requests {
                let mut row = HashMap::new();
                if let Some(nodes) = map.get(&r.vm.to_string()) {
                    for (node, regions) in nodes {
                        let &i = node_pos.get(node.as_str()).ok_or_else(|| {
                            SimulateError::Snapshot(format!(
                                "exact section names unknown node {node:?} for {}",
                                r.vm
                            ))
                        })?;
                        row.insert(i, *regions);
                    }
                }
                per_vm.push(row);
            }
            Some(ExactTable { per_vm })
        }
    };
    Ok(RecordedCluster {
        snapshot,
        requests,
        exact,
    })
}

/// A recorded file for a synthetic cluster, with its exact section, so it can be replayed
/// (and edited) later.
pub fn record(
    synthetic: &super::synthetic::SyntheticCluster,
) -> Result<RecordedFile, SimulateError> {
    let snap = &synthetic.snapshot;
    // Requests in the order `prepare` rebuilds them: digest by digest.
    let index: HashMap<String, usize> = synthetic
        .requests
        .iter()
        .enumerate()
        .map(|(i, r)| (r.vm.to_string(), i))
        .collect();
    let mut vm_requests = BTreeMap::new();
    let mut exact = BTreeMap::new();
    for d in &snap.digests {
        for vm in &d.vms {
            let name = vm.vm.to_string();
            let &v = index
                .get(&name)
                .ok_or_else(|| SimulateError::Snapshot(format!("no request for {name}")))?;
            vm_requests.insert(name.clone(), synthetic.requests[v].requests);
            if let Some(e) = &synthetic.exact {
                let row: BTreeMap<String, u64> = snap
                    .nodes
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| *i != synthetic.vm_node[v])
                    .map(|(i, n)| (n.name.clone(), e.common_regions(v, i)))
                    .filter(|(_, c)| *c > 0)
                    .collect();
                exact.insert(name, row);
            }
        }
    }
    Ok(RecordedFile {
        cluster: snap.clone(),
        vm_requests,
        exact: synthetic.exact.as_ref().map(|_| exact),
    })
}
