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
    /// CPU cores idle over the last scan interval, measured from /proc/stat (the node's CPUs
    /// minus the busy ones). Absent until the agent has two readings; where present the
    /// controller counts the target's spare CPU from it instead of from pod requests.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub idle_cpu_cores: Option<f64>,
    pub vm_count: u32,
    pub vms: Vec<VmDigest>,
    /// Sketch of every region on the node (base64, Rice-coded threshold sample).
    pub sketch: String,
    /// How the VMs' `sketch` strings are written. Absent (digests from older agents) means
    /// `Standalone`.
    #[serde(default)]
    pub vm_sketch_encoding: VmSketchEncoding,
    /// The replicated-region table: regions held at least `replicationThreshold` times (a bounded sample).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub replicated: Vec<ReplicatedStatus>,
    #[serde(default)]
    pub replication_threshold: u32,
    /// Migration paths this node can use, with measured bandwidth.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathStatus>,
    /// VMs on this node that share a memory space (memory groups).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub memory_groups: Vec<MemoryGroupStatus>,
    /// The node's end of the migration relay, when the agent runs it (chart `relay.enabled`).
    /// A migration between two nodes that both advertise it, with the same key, can send
    /// references for the regions the target holds instead of their bytes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub relay: Option<RelayEndpoint>,
    /// Migrations this node's relay sent, the last long-enough clean one per target relay:
    /// the rate the path really carried. The controller estimates a migration from this node
    /// to that relay's node at this rate instead of `--migration-bandwidth`.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub transfers: Vec<TransferStatus>,
    /// RFC 3339 time of the scan.
    pub scan_time: String,
    /// `SoftDirty` (incremental rescans), `Sampled` (dirty rate from re-hashed samples) or
    /// `Full` (every scan reads everything).
    pub scan_mode: String,
    /// Written by the controller, never by the agent: `KeyAccepted` says whether this digest
    /// was made under a cluster key the controller accepts (one that does not is compared
    /// with no other node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<crate::api::conditions::Condition>,
}

/// One completed migration through the relay, as its source end saw it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct TransferStatus {
    /// The target relay it went to (HOST:PORT).
    pub peer_relay: String,
    /// Bytes on the relay-to-relay connections.
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    /// RFC 3339 time it ended.
    pub time: String,
}

/// Where other nodes' relays reach this node's target relay.
#[derive(schemars::JsonSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Eq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RelayEndpoint {
    /// `HOST:PORT` of the target relay (mutual TLS).
    pub address: String,
    /// Relay protocol version spoken.
    pub protocol_version: u32,
    /// Region size in pages the relay names regions with.
    pub region_pages: u32,
    /// KubeVirt's migration connections leaving this node are carried through the relay. Until
    /// they are, the relay only serves migrations driven through it directly
    /// (`commonground relay source`), and estimates stay with stock transport.
    #[serde(default)]
    pub in_migration_path: bool,
}

/// Form of the per-VM sketches in a digest.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum VmSketchEncoding {
    /// Every VM sketch is a standalone Rice-coded sample (format byte 1).
    #[default]
    Standalone,
    /// A VM sketch is the positions of the VM's keys in the node `sketch`, Rice-coded (format
    /// byte 2), decoded against the node sketch; one whose keys are not all in the node sketch
    /// stays standalone (format byte 1).
    NodeIndexed,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct NodeCapacity {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

/// The node's load: a weighted sum of CPU time, I/O and memory.
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
    /// base64 sketch of the VM's regions, in the form `vmSketchEncoding` names.
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
    /// Members still on the node that touched the group's shared memory within the last 60 s
    /// (namespace/name). Watched only once a member has left the node: until then it stays
    /// empty, as every member touches it as a matter of course.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub recently_accessed_by: Vec<String>,
    /// When the first member left the node (RFC 3339), for a group the agent keeps for the
    /// members left behind. A restarted agent reads it back from here, with `sharedObjects`,
    /// and goes on watching those members until the group's retention ends.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub departed_at: Option<String>,
    /// The objects the members share, as `major:minor:inode` of the file they map on this
    /// node (only meaningful on this node).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub shared_objects: Vec<String>,
}

impl MemoryGroupStatus {
    /// `major:minor:inode` of a shared object, as in `sharedObjects`.
    pub fn object_text((major, minor, inode): (u32, u32, u64)) -> String {
        format!("{major}:{minor}:{inode}")
    }

    /// Reads one `sharedObjects` entry; `None` when malformed.
    pub fn parse_object(text: &str) -> Option<(u32, u32, u64)> {
        let mut parts = text.split(':');
        let major = parts.next()?.parse().ok()?;
        let minor = parts.next()?.parse().ok()?;
        let inode = parts.next()?.parse().ok()?;
        parts.next().is_none().then_some((major, minor, inode))
    }
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
        let sketch = RegionSketch::from_base64(&status.sketch)
            .map_err(|e| invalid(format!("node sketch: {e}")))?;
        let mut vms = Vec::with_capacity(status.vms.len());
        for v in &status.vms {
            let vm_sketch = match status.vm_sketch_encoding {
                VmSketchEncoding::Standalone => RegionSketch::from_base64(&v.sketch),
                VmSketchEncoding::NodeIndexed => {
                    RegionSketch::from_base64_for_node(&sketch, &v.sketch)
                }
            }
            .map_err(|e| {
                invalid(format!(
                    "vm {}/{}: sketch ({:?} encoding): {e}",
                    v.namespace, v.name, status.vm_sketch_encoding
                ))
            })?;
            vms.push(VmRegionSummary {
                vm: VmKey::new(&v.namespace, &v.name),
                memory_bytes: v.memory_bytes,
                regions: v.regions,
                zero_regions: v.zero_regions.min(v.regions),
                sketch: vm_sketch,
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

/// A VM sketch as written in a digest: positions in the node sketch when it is a subset of it
/// (true of every VM whose sketch the node sketch was built from at one threshold), else
/// standalone. Returns the text and whether it is node-indexed.
pub fn vm_sketch_text(vm: &RegionSketch, node: &RegionSketch) -> (String, bool) {
    match vm.to_base64_subset_of(node) {
        Ok(text) => (text, true),
        Err(_) => (vm.to_base64(), false),
    }
}

/// Writes a planner summary back into a digest status (used right after a migration, so
/// the destination lists the VM before its agent scans again, and by the agent). VM sketches are written node-indexed where they can be (see
/// [`vm_sketch_text`]); a VM left with a finer threshold than the node (after a migration from
/// a finer-sampled node) stays standalone.
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
    let mut indexed = false;
    status.vms = summary
        .vms
        .iter()
        .map(|v| VmDigest {
            namespace: v.vm.namespace.clone(),
            name: v.vm.name.clone(),
            memory_bytes: v.memory_bytes,
            regions: v.regions,
            zero_regions: v.zero_regions,
            sketch: {
                let (text, is_indexed) = vm_sketch_text(&v.sketch, &summary.sketch);
                indexed |= is_indexed;
                text
            },
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
    // Standalone when nothing is indexed, so such a digest stays readable without the node
    // sketch (and by readers that predate the indexed form).
    status.vm_sketch_encoding = if indexed {
        VmSketchEncoding::NodeIndexed
    } else {
        VmSketchEncoding::Standalone
    };
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

    fn digest_of(summary: &NodeRegionSummary) -> NodeRegionDigest {
        let mut d = NodeRegionDigest::new(
            &summary.node,
            NodeRegionDigestSpec {
                node_name: summary.node.clone(),
            },
        );
        let mut status = NodeRegionDigestStatus::default();
        summary_into_status(summary, &mut status);
        d.status = Some(status);
        d
    }

    fn vm(name: &str, sketch: RegionSketch) -> VmRegionSummary {
        VmRegionSummary {
            vm: VmKey::new("ns", name),
            memory_bytes: 1 << 30,
            regions: 16384,
            zero_regions: 0,
            sketch,
            dirty_rate: 0.0,
            working_set_bytes: 0,
            load: 0.0,
        }
    }

    fn summary_of(node: RegionSketch, vms: Vec<VmRegionSummary>) -> NodeRegionSummary {
        NodeRegionSummary {
            node: "n1".into(),
            work_group: "zone-a".into(),
            geometry: RegionGeometry::default(),
            key_id: "abc".into(),
            sketch: node,
            vms,
        }
    }

    #[test]
    fn vm_sketches_are_node_indexed_and_much_smaller() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let t = KEY_SPACE >> 6;
        let vms: Vec<VmRegionSummary> = (0..20)
            .map(|i| {
                let keys: Vec<u64> = (0..2000).map(|_| rng.random_range(0..t)).collect();
                vm(&format!("vm{i}"), RegionSketch::from_keys(t, keys))
            })
            .collect();
        let node = RegionSketch::union_all(vms.iter().map(|v| &v.sketch));
        let summary = summary_of(node, vms);
        let d = digest_of(&summary);
        let status = d.status.as_ref().unwrap();
        assert_eq!(status.vm_sketch_encoding, VmSketchEncoding::NodeIndexed);
        assert_eq!(d.to_summary().unwrap(), summary);
        let indexed: usize = status.vms.iter().map(|v| v.sketch.len()).sum();
        let standalone: usize = summary.vms.iter().map(|v| v.sketch.to_base64().len()).sum();
        // log2(20) + 2 = 6.3 bits against about 19 bits per key.
        assert!(indexed * 5 < standalone * 2, "{indexed} vs {standalone}");
    }

    #[test]
    fn a_vm_finer_than_its_node_stays_standalone() {
        // After a migration from a finer-sampled node the destination's sketch is coarser
        // than the VMs it already held.
        let node = RegionSketch::from_keys(KEY_SPACE / 4, [1, 5, 9, 100]);
        let summary = summary_of(
            node,
            vec![
                vm(
                    "fine",
                    RegionSketch::from_keys(KEY_SPACE, [5, 9, KEY_SPACE / 2]),
                ),
                vm("same", RegionSketch::from_keys(KEY_SPACE / 4, [1, 100])),
                vm("coarser", RegionSketch::from_keys(8, [1, 5])),
            ],
        );
        let d = digest_of(&summary);
        let status = d.status.as_ref().unwrap();
        assert_eq!(status.vm_sketch_encoding, VmSketchEncoding::NodeIndexed);
        let formats: Vec<String> = status.vms.iter().map(|v| v.sketch.clone()).collect();
        assert_eq!(formats[0], summary.vms[0].sketch.to_base64(), "standalone");
        assert_ne!(formats[1], summary.vms[1].sketch.to_base64(), "indexed");
        assert_eq!(d.to_summary().unwrap(), summary);
    }

    #[test]
    fn digests_without_the_field_or_without_vms_are_standalone() {
        let summary = summary_of(RegionSketch::from_keys(KEY_SPACE, [3]), vec![]);
        let d = digest_of(&summary);
        assert_eq!(
            d.status.as_ref().unwrap().vm_sketch_encoding,
            VmSketchEncoding::Standalone
        );
        // An older agent's digest: no vmSketchEncoding, standalone VM sketches.
        let old = summary_of(
            RegionSketch::from_keys(KEY_SPACE, [3, 4]),
            vec![vm("a", RegionSketch::from_keys(KEY_SPACE, [4]))],
        );
        let mut json = serde_json::to_value(digest_of(&old)).unwrap();
        let status = json["status"].as_object_mut().unwrap();
        status.remove("vmSketchEncoding");
        status["vms"][0]["sketch"] = old.vms[0].sketch.to_base64().into();
        let back: NodeRegionDigest = serde_json::from_value(json).unwrap();
        assert_eq!(back.to_summary().unwrap(), old);
    }

    #[test]
    fn a_vm_sketch_that_does_not_fit_its_node_is_a_named_error() {
        let node = RegionSketch::from_keys(KEY_SPACE, 0..1000u64);
        let summary = summary_of(
            node,
            vec![vm("a", RegionSketch::from_keys(KEY_SPACE, 900..1000u64))],
        );
        // The node sketch replaced by a smaller one: the VM's positions run past it.
        let mut d = digest_of(&summary);
        d.status.as_mut().unwrap().sketch =
            RegionSketch::from_keys(KEY_SPACE, 0..10u64).to_base64();
        let err = d.to_summary().unwrap_err().to_string();
        assert!(
            err.starts_with("digest n1: vm ns/a: sketch (NodeIndexed encoding):"),
            "{err}"
        );
        // An indexed sketch in a digest that says standalone.
        let mut d = digest_of(&summary);
        d.status.as_mut().unwrap().vm_sketch_encoding = VmSketchEncoding::Standalone;
        let err = d.to_summary().unwrap_err().to_string();
        assert!(err.contains("Standalone encoding"), "{err}");
        assert!(err.contains("unknown format version 2"), "{err}");
        // Garbage.
        let mut d = digest_of(&summary);
        d.status.as_mut().unwrap().vms[0].sketch = "AgAA!".into();
        assert!(d.to_summary().is_err());
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
