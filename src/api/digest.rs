//! `NodeRegionDigest`: what one node's agent publishes about the memory it holds.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use crate::plan::region::{RegionGeometry, PAGE_SIZE};
use crate::plan::sketch::RegionSketch;
use crate::plan::{NodeRegionSummary, VmKey, VmRegionSummary};

/// The memory summary of one node, published by the commonground agent running on it.
/// Cluster-scoped, named after the node.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[kube(
    group = "commonground.dev",
    version = "v1alpha1",
    kind = "NodeRegionDigest",
    shortname = "nrd",
    category = "commonground",
    status = "NodeRegionDigestStatus",
    derive = "PartialEq",
    derive = "Default",
    doc = "The memory summary of one node (region sketches of its VMs, load, migration paths), published by the node's commonground agent.",
    validation = Rule::new("self.metadata.name == self.spec.nodeName").message("a NodeRegionDigest is named after its node"),
    printcolumn(name = "WorkGroup", type_ = "string", json_path = ".status.workGroup"),
    printcolumn(name = "VMs", type_ = "integer", json_path = ".status.vmCount"),
    printcolumn(name = "Load", type_ = "number", json_path = ".status.load.composite"),
    printcolumn(name = "Scanned", type_ = "date", json_path = ".status.scanTime"),
    printcolumn(name = "Mode", type_ = "string", json_path = ".status.scanMode", priority = "1"),
    printcolumn(name = "Age", type_ = "date", json_path = ".metadata.creationTimestamp")
)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegionDigestSpec {
    /// The node this digest describes (equal to metadata.name).
    #[schemars(length(min = 1, max = 253))]
    pub node_name: String,
}

/// What the agent measured.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegionDigestStatus {
    pub work_group: String,
    /// Base page size in bytes (4096).
    pub page_size: u32,
    /// Region size in base pages; digests with different sizes are never compared.
    pub region_pages: u32,
    /// Public id of the cluster key the identities were made with.
    pub key_id: String,
    pub capacity: NodeCapacity,
    pub load: LoadStatus,
    pub vm_count: u32,
    pub vms: Vec<VmDigest>,
    /// Sketch of every region on the node (base64, Rice-coded threshold sample).
    pub sketch: String,
    /// Seed 000 table: regions held at least `replicationThreshold` times (a bounded sample).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicated: Vec<ReplicatedStatus>,
    #[serde(default)]
    pub replication_threshold: u32,
    /// Migration paths this node can use, with measured bandwidth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathStatus>,
    /// VMs on this node that share a memory space (seed 001).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_groups: Vec<MemoryGroupStatus>,
    /// RFC 3339 time of the scan.
    pub scan_time: String,
    /// `SoftDirty` (incremental rescans), `Sampled` (dirty rate from re-hashed samples) or
    /// `Full` (every scan reads everything).
    pub scan_mode: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// Seed 003 load: a weighted sum of CPU time, I/O and memory.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct LoadStatus {
    /// CPU cores busy over the last interval.
    pub cpu_cores: f64,
    /// I/O bytes per second over the last interval.
    pub io_bytes_per_second: f64,
    /// Resident memory bytes.
    pub memory_bytes: u64,
    /// Weighted sum normalised to the node's capacity (1.0 = fully loaded).
    pub composite: f64,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VmDigest {
    pub namespace: String,
    pub name: String,
    pub memory_bytes: u64,
    pub regions: u64,
    pub zero_regions: u64,
    /// base64 sketch of the VM's regions.
    pub sketch: String,
    /// Bytes per second the guest dirties.
    #[serde(default)]
    pub dirty_rate: f64,
    /// Bytes the guest keeps rewriting (bounds one pre-copy round).
    #[serde(default)]
    pub working_set_bytes: u64,
    #[serde(default)]
    pub load: LoadStatus,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedStatus {
    pub huge_pages: bool,
    pub pages: u32,
    /// Keyed content identity, hex.
    pub identity: String,
    pub replicas: u32,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathStatus {
    /// MigrationNetwork name.
    pub network: String,
    pub bandwidth_bytes_per_second: f64,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemoryGroupStatus {
    /// Group name: the label value, or derived from the shared object.
    pub name: String,
    /// Members as namespace/name.
    pub members: Vec<String>,
    pub shared_bytes: u64,
    /// Members that touched the shared range since the last scan.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recently_accessed_by: Vec<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("digest {node}: {what}")]
    Invalid { node: String, what: String },
}

impl NodeRegionDigest {
    /// The planner's view of this digest. A malformed sketch makes the whole digest unusable
    /// (an error naming it) rather than half-read.
    pub fn to_summary(&self) -> Result<NodeRegionSummary, DigestError> {
        let node = self.spec.node_name.clone();
        let invalid = |what: String| DigestError::Invalid {
            node: node.clone(),
            what,
        };
        let status = self
            .status
            .as_ref()
            .ok_or_else(|| invalid("no status yet".into()))?;
        if status.page_size as usize != PAGE_SIZE {
            return Err(invalid(format!(
                "page size {} unsupported",
                status.page_size
            )));
        }
        let geometry =
            RegionGeometry::new(status.region_pages).map_err(|e| invalid(e.to_string()))?;
        let sketch =
            RegionSketch::from_base64(&status.sketch).map_err(|e| invalid(e.to_string()))?;
        let mut vms = Vec::with_capacity(status.vms.len());
        for v in &status.vms {
            vms.push(VmRegionSummary {
                vm: VmKey::new(&v.namespace, &v.name),
                memory_bytes: v.memory_bytes,
                regions: v.regions,
                zero_regions: v.zero_regions.min(v.regions),
                sketch: RegionSketch::from_base64(&v.sketch)
                    .map_err(|e| invalid(format!("vm {}/{}: {e}", v.namespace, v.name)))?,
                dirty_rate: v.dirty_rate.max(0.0),
                working_set_bytes: v.working_set_bytes,
                load: v.load.composite,
            });
        }
        Ok(NodeRegionSummary {
            node,
            work_group: status.work_group.clone(),
            geometry,
            key_id: status.key_id.clone(),
            sketch,
            vms,
        })
    }
}

/// Writes a planner summary back into a digest status (used after a migration, seed 000
/// claim 3, and by the agent).
pub fn summary_into_status(summary: &NodeRegionSummary, status: &mut NodeRegionDigestStatus) {
    status.work_group = summary.work_group.clone();
    status.page_size = PAGE_SIZE as u32;
    status.region_pages = summary.geometry.pages_per_region;
    status.key_id = summary.key_id.clone();
    status.sketch = summary.sketch.to_base64();
    let old: std::collections::HashMap<(String, String), LoadStatus> = status
        .vms
        .drain(..)
        .map(|v| ((v.namespace, v.name), v.load))
        .collect();
    status.vms = summary
        .vms
        .iter()
        .map(|v| VmDigest {
            namespace: v.vm.namespace.clone(),
            name: v.vm.name.clone(),
            memory_bytes: v.memory_bytes,
            regions: v.regions,
            zero_regions: v.zero_regions,
            sketch: v.sketch.to_base64(),
            dirty_rate: v.dirty_rate,
            working_set_bytes: v.working_set_bytes,
            load: old
                .get(&(v.vm.namespace.clone(), v.vm.name.clone()))
                .cloned()
                .unwrap_or(LoadStatus {
                    composite: v.load,
                    ..Default::default()
                }),
        })
        .collect();
    status.vm_count = status.vms.len() as u32;
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sketch::KEY_SPACE;

    #[test]
    fn digest_round_trips_through_the_planner_summary() {
        let summary = NodeRegionSummary {
            node: "n1".into(),
            work_group: "zone-a".into(),
            geometry: RegionGeometry::default(),
            key_id: "abc".into(),
            sketch: RegionSketch::from_keys(KEY_SPACE, [1, 5, 9]),
            vms: vec![VmRegionSummary {
                vm: VmKey::new("ns", "vm"),
                memory_bytes: 1 << 30,
                regions: 16384,
                zero_regions: 100,
                sketch: RegionSketch::from_keys(KEY_SPACE, [1, 5]),
                dirty_rate: 1e6,
                working_set_bytes: 1 << 20,
                load: 0.3,
            }],
        };
        let mut d = NodeRegionDigest::new(
            "n1",
            NodeRegionDigestSpec {
                node_name: "n1".into(),
            },
        );
        let mut status = NodeRegionDigestStatus::default();
        summary_into_status(&summary, &mut status);
        d.status = Some(status);
        assert_eq!(d.to_summary().unwrap(), summary);
    }

    #[test]
    fn malformed_sketch_is_a_named_error() {
        let mut d = NodeRegionDigest::new(
            "n1",
            NodeRegionDigestSpec {
                node_name: "n1".into(),
            },
        );
        d.status = Some(NodeRegionDigestStatus {
            page_size: 4096,
            region_pages: 16,
            sketch: "not base64!".into(),
            ..Default::default()
        });
        let err = d.to_summary().unwrap_err().to_string();
        assert!(err.starts_with("digest n1:"), "{err}");
    }
}
