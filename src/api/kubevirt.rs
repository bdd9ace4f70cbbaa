//! The KubeVirt and Multus types commonground reads or writes: only the fields it uses,
//! everything else preserved by the API server. Their CRDs belong to those projects.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Affinity, Toleration};
use kube::CustomResource;
use serde::{Deserialize, Serialize};

/// Label on the migration target pod naming the migration's UID.
pub const MIGRATION_JOB_UID_LABEL: &str = "kubevirt.io/migrationJobUID";
/// Annotation on the migration target pod naming the migration.
pub const MIGRATION_JOB_NAME_ANNOTATION: &str = "kubevirt.io/migrationJobName";
/// Annotation on a migration: seconds virt-controller lets its target pod stay unschedulable
/// before it deletes the pod and fails the migration (KubeVirt's default: 300).
pub const UNSCHEDULABLE_TIMEOUT_ANNOTATION: &str =
    "kubevirt.io/migrationUnschedulablePodTimeoutSeconds";
/// Label on virt-launcher pods holding the VMI's UID.
pub const CREATED_BY_LABEL: &str = "kubevirt.io/created-by";
pub const HOSTNAME_LABEL: &str = "kubernetes.io/hostname";
/// VMI condition KubeVirt sets when the VMI can be live-migrated.
pub const LIVE_MIGRATABLE: &str = "LiveMigratable";
/// KubeVirt defaults when the KubeVirt CR says nothing.
pub const DEFAULT_PARALLEL_MIGRATIONS_PER_CLUSTER: u32 = 5;
pub const DEFAULT_PARALLEL_OUTBOUND_MIGRATIONS_PER_NODE: u32 = 2;

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstance",
    plural = "virtualmachineinstances",
    namespaced,
    status = "VmiStatus",
    schema = "disabled",
    derive = "Default",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VmiSpec {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub affinity: Option<Affinity>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerations: Option<Vec<Toleration>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub scheduler_name: Option<String>,
    #[serde(default)]
    pub domain: serde_json::Value,
    /// The VMI's volumes (persistent volume claims, data volumes, downward metrics...).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub volumes: Option<Vec<serde_json::Value>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub liveness_probe: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub readiness_probe: Option<serde_json::Value>,
    /// `amd64`, `arm64`, ...; the cluster's architecture when empty.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub architecture: Option<String>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiStatus {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub node_name: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub conditions: Vec<VmiCondition>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmiCondition {
    pub r#type: String,
    pub status: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub message: Option<String>,
}

/// VMI `status.migrationState` (also mirrored in VMIM status).
#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationState {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_pod: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub start_timestamp: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_timestamp: Option<String>,
    #[serde(default)]
    pub completed: bool,
    #[serde(default)]
    pub failed: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failure_reason: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_uid: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub abort_requested: Option<bool>,
    /// The address the target virt-handler listens on for this migration.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_node_address: Option<String>,
    /// The target virt-handler's ports for this migration: node port (as text) -> the
    /// launcher-side port it forwards to.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub target_direct_migration_node_ports: Option<std::collections::BTreeMap<String, i64>>,
}

/// The label KubeVirt keeps on a VMI naming the node it runs on (virt-controller sets it when
/// the launcher pod is scheduled and moves it after a migration); virt-handler watches its own
/// node's VMIs by it, and so does the agent.
pub const NODE_NAME_LABEL: &str = "kubevirt.io/nodeName";

impl VirtualMachineInstance {
    pub fn condition_true(&self, kind: &str) -> bool {
        self.status.as_ref().is_some_and(|s| {
            s.conditions
                .iter()
                .any(|c| c.r#type == kind && c.status == "True")
        })
    }

    pub fn node_name(&self) -> Option<&str> {
        self.status.as_ref()?.node_name.as_deref()
    }

    /// A migration has started and not finished.
    pub fn is_migrating(&self) -> bool {
        self.status
            .as_ref()
            .and_then(|s| s.migration_state.as_ref())
            .is_some_and(|m| m.start_timestamp.is_some() && !m.completed && !m.failed)
    }
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "VirtualMachineInstanceMigration",
    plural = "virtualmachineinstancemigrations",
    namespaced,
    status = "VmimStatus",
    schema = "disabled",
    derive = "Default",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct VmimSpec {
    pub vmi_name: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub added_node_selector: Option<BTreeMap<String, String>>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct VmimStatus {
    /// Pending, Scheduling, Scheduled, PreparingTarget, TargetReady, Running, Succeeded, Failed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migration_state: Option<MigrationState>,
    /// Every phase the migration went through, with when.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub phase_transition_timestamps: Vec<PhaseTransition>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct PhaseTransition {
    #[serde(default)]
    pub phase: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub phase_transition_timestamp: Option<String>,
}

impl VirtualMachineInstanceMigration {
    pub fn phase(&self) -> Option<&str> {
        self.status.as_ref()?.phase.as_deref()
    }

    pub fn is_final(&self) -> bool {
        matches!(self.phase(), Some("Succeeded" | "Failed"))
    }
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "kubevirt.io",
    version = "v1",
    kind = "KubeVirt",
    plural = "kubevirts",
    namespaced,
    schema = "disabled",
    derive = "Default",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct KubeVirtSpec {
    #[serde(default)]
    pub configuration: KubeVirtConfiguration,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct KubeVirtConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub migrations: Option<MigrationConfiguration>,
    /// A decimal such as `"1.5"`: the launcher's memory overhead is multiplied by it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub additional_guest_memory_overhead_ratio: Option<String>,
    /// `memoryOvercommit`, `cpuAllocationRatio` and the rest, read where needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub developer_configuration: Option<serde_json::Value>,
    /// `disableSerialConsoleLog` and the rest, read where needed.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_options: Option<serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationConfiguration {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_migrations_per_cluster: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub parallel_outbound_migrations_per_node: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<serde_json::Value>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub network: Option<String>,
    /// Plain TCP between the virt-handlers instead of KubeVirt's TLS (the relay needs it).
    #[serde(
        default,
        rename = "disableTLS",
        skip_serializing_if = "Option::is_none"
    )]
    pub disable_tls: Option<bool>,
}

#[derive(CustomResource, Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[kube(
    group = "migrations.kubevirt.io",
    version = "v1alpha1",
    kind = "MigrationPolicy",
    plural = "migrationpolicies",
    schema = "disabled",
    derive = "Default",
    derive = "PartialEq"
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicySpec {
    #[serde(default)]
    pub selectors: MigrationPolicySelectors,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bandwidth_per_migration: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub completion_timeout_per_gi_b: Option<i64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_auto_converge: Option<bool>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub allow_post_copy: Option<bool>,
    /// Settings not named above (`allowWorkloadDisruption`, newer releases' fields), kept so a
    /// copy of an administrator's policy loses none of them.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

#[derive(Serialize, Deserialize, Clone, Debug, Default, PartialEq)]
#[serde(rename_all = "camelCase")]
pub struct MigrationPolicySelectors {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub virtual_machine_instance_selector: Option<BTreeMap<String, String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub namespace_selector: Option<BTreeMap<String, String>>,
}

/// Why KubeVirt's migrations cannot be relayed, if they cannot: the relay reads QEMU's stream,
/// so KubeVirt's TLS between the handlers must be off in the KubeVirt CR.
pub fn kubevirt_blocks_relay(kubevirts: &[&KubeVirt]) -> Option<&'static str> {
    if kubevirts.is_empty() {
        return Some("no KubeVirt CR found");
    }
    let tls_off = kubevirts.iter().all(|kv| {
        kv.spec
            .configuration
            .migrations
            .as_ref()
            .and_then(|m| m.disable_tls)
            == Some(true)
    });
    (!tls_off).then_some(
        "KubeVirt encrypts migrations between its handlers (spec.configuration.migrations.disableTLS is not true): the relay cannot read the stream",
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_kubevirt_with_migration_tls_off_can_be_relayed() {
        let kv = |migrations: serde_json::Value| -> KubeVirt {
            serde_json::from_value(serde_json::json!({
                "apiVersion": "kubevirt.io/v1", "kind": "KubeVirt",
                "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
                "spec": {"configuration": {"migrations": migrations}},
            }))
            .unwrap()
        };
        let off = kv(serde_json::json!({"disableTLS": true}));
        let on = kv(serde_json::json!({"disableTLS": false}));
        let unset = kv(serde_json::json!({}));
        assert_eq!(kubevirt_blocks_relay(&[&off]), None);
        assert!(kubevirt_blocks_relay(&[&on])
            .unwrap()
            .contains("disableTLS"));
        assert!(kubevirt_blocks_relay(&[&unset]).is_some());
        assert!(kubevirt_blocks_relay(&[]).unwrap().contains("no KubeVirt"));
    }
}
