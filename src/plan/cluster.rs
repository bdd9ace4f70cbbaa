//! The planner's view of a cluster: nodes, VMs and their published region summaries.
//! Plain data, no Kubernetes types: the controller and the extender fill it from watches,
//! `simulate` from a synthetic generator or a recorded snapshot.

use std::collections::BTreeMap;

use serde::{Deserialize, Serialize};

use super::region::RegionGeometry;
use super::sketch::RegionSketch;

/// CPU in millicores and memory in bytes.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Resources {
    pub cpu_millis: u64,
    pub memory_bytes: u64,
}

impl Resources {
    pub fn saturating_sub(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis.saturating_sub(other.cpu_millis),
            memory_bytes: self.memory_bytes.saturating_sub(other.memory_bytes),
        }
    }
    pub fn fits_in(self, free: Resources) -> bool {
        self.cpu_millis <= free.cpu_millis && self.memory_bytes <= free.memory_bytes
    }
}

impl std::ops::Add for Resources {
    type Output = Resources;
    fn add(self, other: Resources) -> Resources {
        Resources {
            cpu_millis: self.cpu_millis + other.cpu_millis,
            memory_bytes: self.memory_bytes + other.memory_bytes,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum TaintEffect {
    NoSchedule,
    PreferNoSchedule,
    NoExecute,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Taint {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    pub effect: TaintEffect,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub enum TolerationOperator {
    #[default]
    Equal,
    Exists,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Toleration {
    #[serde(default)]
    pub key: Option<String>,
    #[serde(default)]
    pub operator: TolerationOperator,
    #[serde(default)]
    pub value: Option<String>,
    #[serde(default)]
    pub effect: Option<TaintEffect>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum SelectorOperator {
    In,
    NotIn,
    Exists,
    DoesNotExist,
    Gt,
    Lt,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct SelectorRequirement {
    pub key: String,
    pub operator: SelectorOperator,
    #[serde(default)]
    pub values: Vec<String>,
}

/// One term of a required node affinity: all expressions must hold. `match_fields` may only
/// name `metadata.name`, as in Kubernetes.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeSelectorTerm {
    #[serde(default)]
    pub match_expressions: Vec<SelectorRequirement>,
    #[serde(default)]
    pub match_fields: Vec<SelectorRequirement>,
}

/// What the planner knows of a node.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeFacts {
    pub name: String,
    #[serde(default)]
    pub labels: BTreeMap<String, String>,
    #[serde(default)]
    pub taints: Vec<Taint>,
    #[serde(default)]
    pub unschedulable: bool,
    #[serde(default = "yes")]
    pub ready: bool,
    pub allocatable: Resources,
    /// Resources already requested by pods bound to the node.
    #[serde(default)]
    pub requested: Resources,
    pub work_group: String,
    /// Composite load (seed 003 weighted sum), normalised so 1.0 is a fully loaded node.
    /// `None` when no agent has reported yet; the planner then uses requested/allocatable.
    #[serde(default)]
    pub load: Option<f64>,
    /// Countable resources other than CPU and memory: `hugepages-<size>` in bytes and
    /// device-plugin (extended) resources such as GPUs or SR-IOV functions in units, from the
    /// node's allocatable, and what the pods bound to it request of them.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scalar_allocatable: BTreeMap<String, u64>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub scalar_requested: BTreeMap<String, u64>,
}

fn yes() -> bool {
    true
}

impl NodeFacts {
    pub fn free(&self) -> Resources {
        self.allocatable.saturating_sub(self.requested)
    }

    /// Load used for tie-breaks: the agent's measurement, else memory allocation.
    pub fn effective_load(&self) -> f64 {
        match self.load {
            Some(l) if l.is_finite() => l.max(0.0),
            _ if self.allocatable.memory_bytes > 0 => {
                self.requested.memory_bytes as f64 / self.allocatable.memory_bytes as f64
            }
            _ => 1.0,
        }
    }
}

/// Namespace and name of a VMI.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VmKey {
    pub namespace: String,
    pub name: String,
}

impl VmKey {
    pub fn new(namespace: impl Into<String>, name: impl Into<String>) -> Self {
        Self {
            namespace: namespace.into(),
            name: name.into(),
        }
    }
}

impl std::fmt::Display for VmKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}/{}", self.namespace, self.name)
    }
}

/// A VM's published memory summary (one entry of a node digest).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRegionSummary {
    pub vm: VmKey,
    /// Guest memory scanned.
    pub memory_bytes: u64,
    pub regions: u64,
    pub zero_regions: u64,
    pub sketch: RegionSketch,
    /// Bytes per second the guest dirties (measured by the agent), 0 when unknown.
    #[serde(default)]
    pub dirty_rate: f64,
    /// Bytes the guest rewrites over and over (upper bound of what one pre-copy round can
    /// dirty), 0 when unknown.
    #[serde(default)]
    pub working_set_bytes: u64,
    /// The VM's composite load (seed 003).
    #[serde(default)]
    pub load: f64,
}

impl VmRegionSummary {
    pub fn nonzero_regions(&self) -> u64 {
        self.regions.saturating_sub(self.zero_regions)
    }
}

/// What a node publishes about its memory (the `NodeRegionDigest` status, without the
/// Kubernetes wrapping).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct NodeRegionSummary {
    pub node: String,
    pub work_group: String,
    pub geometry: RegionGeometry,
    pub key_id: String,
    /// The node's region set: the union of its VMs' sketches and the host's own.
    pub sketch: RegionSketch,
    #[serde(default)]
    pub vms: Vec<VmRegionSummary>,
}

/// What the planner knows of the VM to move.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VmRequest {
    pub vm: VmKey,
    pub source_node: String,
    /// What the virt-launcher pod requests.
    pub requests: Resources,
    #[serde(default)]
    pub node_selector: BTreeMap<String, String>,
    /// Required node affinity terms (ORed).
    #[serde(default)]
    pub affinity_terms: Vec<NodeSelectorTerm>,
    #[serde(default)]
    pub tolerations: Vec<Toleration>,
    /// A named KubeVirt CPU model (not host-model / host-passthrough).
    #[serde(default)]
    pub cpu_model: Option<String>,
    #[serde(default)]
    pub cpu_features: Vec<String>,
    /// The VM's memory summary from its node's digest, when there is one.
    #[serde(default)]
    pub summary: Option<VmRegionSummary>,
    /// Guest memory size, used when there is no summary.
    pub memory_bytes: u64,
    /// What else the target pod needs of a node: hugepages, devices, its volumes' nodes,
    /// the pods it must not share a topology domain with.
    #[serde(default)]
    pub fit: FitNeeds,
}

/// The target pod's needs beyond CPU, memory, selectors, affinity and taints.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct FitNeeds {
    /// The part of `requests.memory_bytes` KubeVirt adds for the launcher (for reasons).
    #[serde(default)]
    pub memory_overhead_bytes: u64,
    /// `hugepages-<size>` in bytes and device-plugin resources in units.
    #[serde(default)]
    pub scalar_requests: BTreeMap<String, u64>,
    /// The VM's bound persistent volumes that limit where it can run.
    #[serde(default)]
    pub volumes: Vec<VolumeConstraint>,
    /// Topology domains the pod's required anti-affinity rules out.
    #[serde(default)]
    pub excluded_domains: Vec<super::affinity::ExcludedDomain>,
}

/// Where a persistent volume can be used: its required node affinity (terms ORed) and its
/// zone and region labels.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct VolumeConstraint {
    pub volume: String,
    pub claim: String,
    #[serde(default)]
    pub node_terms: Vec<NodeSelectorTerm>,
    /// `topology.kubernetes.io/zone` / `region` (and their old `failure-domain.beta`
    /// names) of the volume; a node must carry the same value (one of the `__`-joined ones).
    #[serde(default)]
    pub topology_labels: BTreeMap<String, String>,
}

/// Everything the planner reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ClusterSnapshot {
    pub geometry: RegionGeometry,
    pub nodes: Vec<NodeFacts>,
    #[serde(default)]
    pub digests: Vec<NodeRegionSummary>,
    #[serde(default)]
    pub distances: super::workgroups::DistanceMatrix,
}
