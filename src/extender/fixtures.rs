//! Hand-built clusters for the extender's tests and benchmark (not used by the binary).
//!
//! Sketches sample every region (threshold `KEY_SPACE`), so regions in common are exact.
//! The VM `ns/vm1` (UID `uid-vm1`) runs on `n00000` with regions `0..1000`:
//! - `n00001` holds 900 of them, `n00002` holds 500, `n00003` has no digest,
//!   `n00004` is cordoned, every other node holds `i % 50` of them.

use std::collections::BTreeMap;
use std::sync::Arc;

use serde_json::json;

use super::state::ClusterState;
use crate::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL,
    MIGRATION_JOB_NAME_ANNOTATION, MIGRATION_JOB_UID_LABEL,
};
use crate::api::VirtualMachineMigration;
use crate::plan::hardware::KUBEVIRT_SCHEDULABLE_LABEL;
use crate::plan::region::RegionGeometry;
use crate::plan::sketch::{RegionSketch, KEY_SPACE};
use crate::plan::{
    ClusterSnapshot, NodeFacts, NodeRegionSummary, Planner, Resources, VmKey, VmRegionSummary,
};

pub const GIB: u64 = 1 << 30;
pub const VM_REGIONS: u64 = 1000;

pub fn node_name(i: usize) -> String {
    format!("n{i:05}")
}

pub fn vm_summary(ns: &str, name: &str, keys: impl IntoIterator<Item = u64>) -> VmRegionSummary {
    let sketch = RegionSketch::from_keys(KEY_SPACE, keys);
    let regions = sketch.len() as u64;
    VmRegionSummary {
        vm: VmKey::new(ns, name),
        memory_bytes: regions * RegionGeometry::default().region_bytes(),
        regions,
        zero_regions: 0,
        sketch,
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.1,
    }
}

fn digest(node: &NodeFacts, vms: Vec<VmRegionSummary>) -> NodeRegionSummary {
    NodeRegionSummary {
        node: node.name.clone(),
        work_group: node.work_group.clone(),
        geometry: RegionGeometry::default(),
        key_id: "test".into(),
        sketch: RegionSketch::union_all(vms.iter().map(|v| &v.sketch)),
        vms,
    }
}

/// Regions of the migrating VM that node `i` holds.
pub fn regions_on(i: usize) -> u64 {
    match i {
        0 => VM_REGIONS,
        1 => 900,
        2 => 500,
        3 => 0,
        _ => (i % 50) as u64,
    }
}

/// A cluster of `nodes` nodes (at least 5) in one work group.
pub fn snapshot(nodes: usize) -> ClusterSnapshot {
    assert!(nodes >= 5, "the fixture needs at least 5 nodes");
    let mut facts = Vec::with_capacity(nodes);
    let mut digests = Vec::with_capacity(nodes);
    for i in 0..nodes {
        let n = NodeFacts {
            name: node_name(i),
            labels: [(KUBEVIRT_SCHEDULABLE_LABEL.to_string(), "true".to_string())].into(),
            taints: vec![],
            unschedulable: i == 4,
            ready: true,
            allocatable: Resources {
                cpu_millis: 64_000,
                memory_bytes: 256 * GIB,
            },
            requested: Resources::default(),
            work_group: "wg-a".to_string(),
            load: Some(0.2 + (i % 7) as f64 * 0.05),
            scalar_allocatable: Default::default(),
            scalar_requested: Default::default(),
        };
        if i != 3 {
            let vms = if i == 0 {
                vec![vm_summary("ns", "vm1", 0..VM_REGIONS)]
            } else {
                // A resident VM sharing `regions_on(i)` regions with vm1, plus its own.
                let own = 1_000_000 + i as u64 * 100;
                vec![vm_summary(
                    "ns",
                    &format!("resident-{i}"),
                    (0..regions_on(i)).chain(own..own + 50),
                )]
            };
            digests.push(digest(&n, vms));
        }
        facts.push(n);
    }
    ClusterSnapshot {
        geometry: RegionGeometry::default(),
        nodes: facts,
        digests,
        distances: Default::default(),
    }
}

pub fn vmi() -> VirtualMachineInstance {
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm1", "namespace": "ns", "uid": "uid-vm1"},
        "spec": {"domain": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}},
        "status": {"nodeName": node_name(0)}
    }))
    .expect("fixture VMI")
}

pub fn vmim() -> VirtualMachineInstanceMigration {
    serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
        "metadata": {"name": "vm1-drain", "namespace": "ns", "uid": "job-1"},
        "spec": {"vmiName": "vm1"},
        "status": {"phase": "Scheduling"}
    }))
    .expect("fixture VMIM")
}

/// A `VirtualMachineMigration` for vm1 in `phase` with `target` chosen.
pub fn vmm(phase: &str, target: &str) -> VirtualMachineMigration {
    serde_json::from_value(json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": "move-vm1", "namespace": "ns"},
        "spec": {"vmiName": "vm1"},
        "status": {"phase": phase, "targetNode": target}
    }))
    .expect("fixture VMM")
}

/// The state over `snapshot(nodes)` with vm1 and its VMIM, plus `vmms`.
pub fn state(nodes: usize, vmms: &[VirtualMachineMigration]) -> ClusterState {
    ClusterState::new(
        Arc::new(Planner::new(snapshot(nodes))),
        [&vmi()],
        [&vmim()],
        vmms.iter(),
    )
}

/// Metadata of vm1's migration target pod; `created_by` false leaves only the VMIM name.
pub fn migration_pod(created_by: bool) -> serde_json::Value {
    let mut labels = BTreeMap::from([(MIGRATION_JOB_UID_LABEL, "job-1")]);
    if created_by {
        labels.insert(CREATED_BY_LABEL, "uid-vm1");
    }
    json!({"metadata": {
        "name": "virt-launcher-vm1-target", "namespace": "ns",
        "labels": labels,
        "annotations": {MIGRATION_JOB_NAME_ANNOTATION: "vm1-drain"}
    }})
}

pub fn ordinary_pod() -> serde_json::Value {
    json!({"metadata": {"name": "web-0", "namespace": "ns", "labels": {"app": "web"}}})
}

/// An `ExtenderArgs` body with node names.
pub fn body_with_names(pod: &serde_json::Value, names: &[String]) -> Vec<u8> {
    serde_json::to_vec(&json!({"Pod": pod, "NodeNames": names})).expect("body")
}

/// Every node name of `snapshot(nodes)`.
pub fn names(nodes: usize) -> Vec<String> {
    (0..nodes).map(node_name).collect()
}
