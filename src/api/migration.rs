//! `VirtualMachineMigration`: a request to live-migrate one VMI to the best node.

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

use super::conditions::Condition;

/// Label declaring a memory group: VMIs of one namespace with the same value share memory
/// (a memory group) and move together.
pub const MEMORY_GROUP_LABEL: &str = "commonground.dev/memory-group";

/// Ask commonground to live-migrate a VirtualMachineInstance to the node that already holds
/// the most of its memory, then the nearest work group, then the least load.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "commonground.dev",
    version = "v1alpha1",
    kind = "VirtualMachineMigration",
    namespaced,
    shortname = "vmm",
    category = "commonground",
    category = "all",
    status = "VirtualMachineMigrationStatus",
    derive = "PartialEq",
    doc = "A request to live-migrate one KubeVirt VirtualMachineInstance to the node that already holds the most of its memory.",
    printcolumn(name = "Phase", type_ = "string", json_path = ".status.phase"),
    printcolumn(name = "VMI", type_ = "string", json_path = ".spec.vmiName"),
    printcolumn(name = "Source", type_ = "string", json_path = ".status.sourceNode"),
    printcolumn(name = "Target", type_ = "string", json_path = ".status.targetNode"),
    printcolumn(
        name = "Common",
        type_ = "string",
        json_path = ".status.estimate.commonHuman"
    ),
    printcolumn(
        name = "ToMove",
        type_ = "string",
        json_path = ".status.estimate.toMoveHuman"
    ),
    printcolumn(
        name = "Estimate",
        type_ = "string",
        json_path = ".status.estimate.durationHuman",
        priority = "1"
    ),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[x_kube(validation = Rule::new("self.vmiName == oldSelf.vmiName").message("vmiName is immutable"))]
#[x_kube(validation = Rule::new("!has(self.target) || !has(oldSelf.target) || self.target == oldSelf.target").message("target is immutable"))]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationSpec {
    /// Name of the VirtualMachineInstance to migrate, in the same namespace.
    #[schemars(
        length(min = 1, max = 253),
        regex(pattern = r"^[a-z0-9]([-a-z0-9.]*[a-z0-9])?$")
    )]
    pub vmi_name: String,
    /// Where the VM may go. Empty: anywhere in the source's work group first.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target: Option<MigrationTarget>,
    /// Time budget for the migration (Go duration, e.g. `90s`, `5m`). When the estimate
    /// exceeds it, commonground adds migration network paths (see MigrationNetwork).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub max_duration: Option<String>,
    /// How long setting up one extra network path may take at most (Go duration).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub path_setup_budget: Option<String>,
    /// VMs that share memory with this one: `Follow` (members that touch the shared memory
    /// follow to the same node), `Together` (all move as one unit), `None` (default).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupMode>,
    /// With `group: Follow`: how long after the requested VM moved its members may still
    /// follow (Go duration; default `30m`). When it passes, the request stops watching and a
    /// `FollowDeadlinePassed` condition names the members left behind.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub follow_deadline: Option<String>,
    /// Plan only: stop at phase `Planned` and never create a KubeVirt migration.
    #[serde(default)]
    pub dry_run: bool,
    /// How many targets may be tried (default 3). When KubeVirt's migration fails because
    /// its target pod never ran on the chosen node (it stayed unschedulable until KubeVirt's
    /// timeout) or failed on that node, the request plans again without the node, until this
    /// many attempts have been made. Each attempt is listed in `status.attempts`. With
    /// `group: Together` the whole group is planned again, once every member's migration of
    /// the failed attempt has ended, and only while every member is still on the source (a
    /// member that already moved splits the group, which then is not tried again).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(range(min = 1, max = 10))]
    pub max_attempts: Option<u32>,
    /// How long KubeVirt waits for an attempt's target pod to be scheduled before it fails the
    /// attempt (Go duration, at least `1s`; KubeVirt's default is `5m`). Written onto each
    /// KubeVirt migration as `kubevirt.io/migrationUnschedulablePodTimeoutSeconds`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub unschedulable_timeout: Option<String>,
}

/// Attempts a request makes when `spec.maxAttempts` is not set.
pub const DEFAULT_MAX_ATTEMPTS: u32 = 3;

/// Target constraints.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[x_kube(validation = Rule::new("!(has(self.nodeName) && has(self.workGroup))").message("nodeName and workGroup are mutually exclusive"))]
#[serde(rename_all = "camelCase")]
pub struct MigrationTarget {
    /// Pin the target node (it must still pass the minimum hardware filter).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 253))]
    pub node_name: Option<String>,
    /// Restrict the target to one work group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    #[schemars(length(min = 1, max = 63))]
    pub work_group: Option<String>,
    /// `WorkGroup` (default): stay in the source's work group when it has a candidate.
    /// `Cluster`: every work group scores the VM's regions it holds; the highest wins and a
    /// tie goes to the nearest work group.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scope: Option<TargetScope>,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum TargetScope {
    #[default]
    WorkGroup,
    Cluster,
}

#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum GroupMode {
    Follow,
    Together,
    #[default]
    None,
}

/// Phase of a VirtualMachineMigration: `Pending` (not started: waiting for a candidate or for
/// KubeVirt's parallel limits), `Planned` (a dry run's end), `PreparingPaths`, `Migrating`,
/// then `Succeeded` or `Failed`. Deleting a request that has not ended aborts its KubeVirt
/// migration.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum MigrationPhase {
    #[default]
    Pending,
    Planned,
    PreparingPaths,
    Migrating,
    Succeeded,
    Failed,
}

impl MigrationPhase {
    pub fn is_final(self) -> bool {
        matches!(self, Self::Succeeded | Self::Failed)
    }
}

/// Observed state of a VirtualMachineMigration.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct VirtualMachineMigrationStatus {
    #[serde(default)]
    pub phase: MigrationPhase,
    /// Why the migration is in this phase (for Pending and Failed especially).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_work_group: Option<String>,
    /// The best candidates, and why each lost or was filtered.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub candidates: Vec<CandidateStatus>,
    /// Work-group scores (scope Cluster, or when the source's work group had no candidate).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub work_groups: Vec<WorkGroupStatus>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimate: Option<EstimateStatus>,
    /// Name of the KubeVirt VirtualMachineInstanceMigration created for this request.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt_migration: Option<String>,
    /// KubeVirt's phase of that migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt_phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
    /// KubeVirt's failure reason when the migration failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    /// The other members of the VM's memory group (spec.group Together or Follow), each with
    /// its own KubeVirt migration, phase, and when and why it started.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<MemberStatus>,
    /// Every KubeVirt migration made for this request, one per target tried, oldest first;
    /// the last one is the current attempt.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub attempts: Vec<AttemptStatus>,
    /// Extra network paths used to meet `maxDuration`, with when they were added
    /// and removed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<PathUseStatus>,
    /// Things to know about the plan (fallbacks taken, missing data).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub notes: Vec<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<Condition>,
    /// The generation of the spec this status describes.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub observed_generation: Option<i64>,
}

/// One member of a memory group moving with the requested VM.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MemberStatus {
    /// VMI name (same namespace).
    pub name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kubevirt_migration: Option<String>,
    /// KubeVirt's phase of the member's migration, or `Waiting` (Follow: not touched yet).
    #[serde(default)]
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    /// Why this member's migration started (Follow: it touched the shared memory).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

/// One target tried: the node, KubeVirt's migration to it and how it ended.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct AttemptStatus {
    /// The target node the KubeVirt migration was pinned to.
    pub node: String,
    /// Name of the KubeVirt VirtualMachineInstanceMigration.
    pub kubevirt_migration: String,
    pub outcome: AttemptOutcome,
    /// Why the attempt ended that way (for `Failed`: what failed, in words).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_time: Option<String>,
}

/// How an attempt stands: `Running` (KubeVirt has not finished it), `Succeeded`, `Failed`.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum AttemptOutcome {
    #[default]
    Running,
    Succeeded,
    Failed,
}

/// One extra migration path and its life cycle.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct PathUseStatus {
    /// MigrationNetwork name.
    pub network: String,
    pub bandwidth_bytes_per_second: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub ready_time: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub removed_time: Option<String>,
}

/// One node as the planner saw it.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct CandidateStatus {
    pub node: String,
    pub work_group: String,
    /// Estimated bytes of the VM's memory already on the node.
    pub common_bytes: u64,
    /// KSM runs on the node (virt-handler labelled it `kubevirt.io/ksm-enabled=true`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub ksm: bool,
    /// Of `commonBytes`, what KSM could merge on the node after arrival: all of it where KSM
    /// runs, none elsewhere.
    #[serde(default)]
    pub ksm_mergeable_bytes: u64,
    /// Distance of the node's work group from the source's.
    pub distance: f64,
    pub load: f64,
    /// Extender score 0..10.
    pub score: u8,
    /// Estimated migration time to this node in seconds, without added network paths: its
    /// memory in common, the transport its relay allows and the rate to it (measured or
    /// configured, within KubeVirt's cap). Absent for filtered nodes and when it cannot be
    /// estimated.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub estimated_seconds: Option<f64>,
    /// `Chosen`, `Lost` or `Filtered`.
    pub verdict: String,
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub reason: String,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct WorkGroupStatus {
    pub work_group: String,
    /// Estimated bytes of the VM's memory available in the work group.
    pub available_bytes: u64,
    pub distance: f64,
    pub candidates: u32,
    pub chosen: bool,
}

/// Bytes and time the migration is expected to take.
#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct EstimateStatus {
    pub total_bytes: u64,
    pub zero_bytes: u64,
    pub common_bytes: u64,
    /// Bytes a transport that skips regions the target holds would send.
    pub to_move_bytes: u64,
    /// Bytes stock KubeVirt/QEMU sends (every non-zero page).
    #[serde(default)]
    pub stock_bytes: u64,
    /// Of `commonBytes`, what KSM could merge on the target after arrival (0 when KSM does not
    /// run there): the memory the move saves on the target node, on any transport.
    #[serde(default)]
    pub ksm_mergeable_bytes: u64,
    pub common_human: String,
    pub to_move_human: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_seconds: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub duration_human: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub converges: Option<bool>,
    /// Network paths the estimate counts on.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub paths: Vec<String>,
    /// The transport the duration is estimated for: `SkipCommon` (the migration relay sends
    /// references for regions the target holds: `toMoveBytes` cross the wire) or `Stock`
    /// (every non-zero page: `stockBytes`).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport: String,
    /// Why that transport.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub transport_reason: String,
    /// Bytes per second of the default migration network the duration is estimated at
    /// (before any network path added for the time budget).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_bytes_per_second: Option<u64>,
    /// Where that rate came from: `Measured` (the source relay's rate on its last migration
    /// to the target's relay, no older than the controller's `--measured-rate-max-age`),
    /// `Configured` (`--migration-bandwidth`) or `BandwidthPerMigration` (KubeVirt's cap,
    /// lower than either).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bandwidth_source: String,
    /// Why that rate, in words (a measurement too old to use is named here).
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub bandwidth_reason: String,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn spec_round_trips_with_camel_case_keys() {
        let spec: VirtualMachineMigrationSpec = serde_json::from_value(serde_json::json!({
            "vmiName": "db-0", "target": {"scope": "Cluster"}, "dryRun": true, "group": "Together"
        }))
        .unwrap();
        assert_eq!(spec.vmi_name, "db-0");
        assert_eq!(spec.target.unwrap().scope, Some(TargetScope::Cluster));
        assert!(spec.dry_run);
        assert_eq!(spec.group, Some(GroupMode::Together));
    }
}
