//! `RebalancePolicy`: automatic load balancing by live migration (pairwise, by a weighted load).

use std::collections::BTreeMap;

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::conditions::Condition;

/// Evens node load by live-migrating VMs, placed by common memory.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "commonground.dev",
    version = "v1alpha1",
    kind = "RebalancePolicy",
    shortname = "rbp",
    category = "commonground",
    status = "RebalancePolicyStatus",
    derive = "PartialEq",
    doc = "Automatic load balancing of VMs across nodes by live migration.",
    printcolumn(name = "Mode", type_ = "string", json_path = ".spec.mode"),
    printcolumn(name = "DryRun", type_ = "boolean", json_path = ".spec.dryRun"),
    printcolumn(
        name = "LastRound",
        type_ = "date",
        json_path = ".status.lastRoundTime"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("!has(self.lowThreshold) || !has(self.highThreshold) || self.lowThreshold < self.highThreshold").message("lowThreshold must be below highThreshold"))]
#[serde(rename_all = "camelCase")]
pub struct RebalancePolicySpec {
    /// How nodes pair up: `Random`, `SenderInitiated`, `ReceiverInitiated` or `Symmetric`.
    #[serde(default)]
    pub mode: RebalanceMode,
    /// Time between rounds (Go duration).
    #[serde(default = "default_interval")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub interval: String,
    /// One load exceeds another only when larger by at least this factor (avoids churn).
    #[serde(default = "default_factor")]
    #[schemars(range(min = 1.0, max = 10.0))]
    pub threshold_factor: f64,
    /// Sender-initiated: nodes above this load look for a peer. Loads are the weighted sums
    /// shown in `status.loads` (CPU in cores, I/O in 100 MiB/s, memory in 4 GiB, times the
    /// weights); unset: 1.2 x the mean load of the round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub high_threshold: Option<f64>,
    /// Receiver-initiated: nodes below this load (as `highThreshold`) pull from a peer;
    /// unset: 0.8 x the mean load of the round.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 0.0, max = 10.0))]
    pub low_threshold: Option<f64>,
    /// Default weights of the load sum; a node may override them with the annotation
    /// `commonground.dev/load-weights: "cpu=1,io=0.5,memory=0.2"`.
    #[serde(default)]
    pub weights: LoadWeights,
    /// Nodes taking part (matchLabels); empty: all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub node_selector: BTreeMap<String, String>,
    /// VMIs that may move (matchLabels); empty: all.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub vm_selector: BTreeMap<String, String>,
    /// Concurrent rebalancing migrations in the cluster.
    #[serde(default = "default_cluster_concurrency")]
    #[schemars(range(min = 1, max = 100))]
    pub max_concurrent: u32,
    /// Concurrent rebalancing migrations touching one node.
    #[serde(default = "default_node_concurrency")]
    #[schemars(range(min = 1, max = 10))]
    pub max_concurrent_per_node: u32,
    /// Minimum time before a VM moves again; doubles for every further move.
    #[serde(default = "default_cooldown")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub cooldown: String,
    /// Record decisions only.
    #[serde(default)]
    pub dry_run: bool,
    /// Count each node's non-VM load too: what its agent measures for the whole node from
    /// /proc minus its VMs' loads (other pods, the host's own work). Off by default: nodes
    /// then weigh only their VMs. A node's `commonground.dev/load-override` annotation
    /// (`"40"` sets its load, `"+15"` adds to it) applies either way.
    #[serde(default)]
    pub include_host_load: bool,
}

fn default_interval() -> String {
    "5m".into()
}
fn default_factor() -> f64 {
    1.25
}
fn default_cluster_concurrency() -> u32 {
    2
}
fn default_node_concurrency() -> u32 {
    1
}
fn default_cooldown() -> String {
    "30m".into()
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum RebalanceMode {
    Random,
    SenderInitiated,
    ReceiverInitiated,
    #[default]
    Symmetric,
}

/// Weights of the seed-003 load sum.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct LoadWeights {
    #[schemars(range(min = 0.0))]
    pub cpu: f64,
    #[schemars(range(min = 0.0))]
    pub io: f64,
    #[schemars(range(min = 0.0))]
    pub memory: f64,
}

impl Default for LoadWeights {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            io: 0.2,
            memory: 0.5,
        }
    }
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RebalancePolicyStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub last_round_time: Option<String>,
    /// Load per node seen in the last round: the weighted sum over its VMs of CPU cores, I/O
    /// in 100 MiB/s and memory in 4 GiB.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub loads: BTreeMap<String, f64>,
    /// Decisions of the last round that decided anything, and why (a round that finds the
    /// nodes even keeps them, so the record of the last moves stays).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub decisions: Vec<RebalanceDecision>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct RebalanceDecision {
    /// namespace/name of the VMI.
    pub vm: String,
    pub from: String,
    pub to: String,
    pub reason: String,
    /// The VirtualMachineMigration created (empty in dry run).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration: Option<String>,
    /// When the round that decided this ran (RFC 3339).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub round_time: Option<String>,
}
