//! Is a pod the target virt-launcher pod of a KubeVirt live migration, and of which VMI?
//!
//! virt-controller labels the target pod `kubevirt.io/migrationJobUID=<VMIM UID>`, annotates
//! it `kubevirt.io/migrationJobName=<VMIM name>` and labels it, like every virt-launcher pod,
//! `kubevirt.io/created-by=<VMI UID>`. The VMI is found by that UID first and by the VMIM
//! second; its `status.nodeName` is the source node.

use super::state::{ClusterState, VmiEntry};
use super::wire::WirePod;
use crate::api::kubevirt::{
    CREATED_BY_LABEL, MIGRATION_JOB_NAME_ANNOTATION, MIGRATION_JOB_UID_LABEL,
};
use crate::plan::VmRequest;

/// What a migration target pod says about its migration.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MigrationTarget<'a> {
    pub namespace: &'a str,
    pub pod: &'a str,
    pub job_uid: &'a str,
    pub job_name: Option<&'a str>,
    pub vmi_uid: Option<&'a str>,
}

/// `Some` when the pod is a migration target (it carries the migration job label).
pub fn migration_target(pod: &WirePod) -> Option<MigrationTarget<'_>> {
    let job_uid = pod.label(MIGRATION_JOB_UID_LABEL)?;
    Some(MigrationTarget {
        namespace: pod.namespace(),
        pod: pod.name(),
        job_uid,
        job_name: pod
            .annotation(MIGRATION_JOB_NAME_ANNOTATION)
            .filter(|n| !n.is_empty()),
        vmi_uid: pod.label(CREATED_BY_LABEL).filter(|u| !u.is_empty()),
    })
}

/// Why a migration target pod cannot be planned (it then gets neutral answers).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Unresolved {
    /// Neither the created-by UID nor the migration name leads to a known VMI.
    VmiUnknown,
    /// The VMI is known but has no node (or unreadable spec), so there is no source.
    NoSource,
}

impl<'a> MigrationTarget<'a> {
    pub fn vmi<'s>(&self, state: &'s ClusterState) -> Option<&'s VmiEntry> {
        self.vmi_uid
            .and_then(|uid| state.vmi_by_uid(self.namespace, uid))
            .or_else(|| {
                self.job_name
                    .and_then(|name| state.vmi_by_migration(self.namespace, name))
            })
    }

    /// The planner's request for the VMI this pod would receive.
    pub fn request<'s>(&self, state: &'s ClusterState) -> Result<&'s VmRequest, Unresolved> {
        let vmi = self.vmi(state).ok_or(Unresolved::VmiUnknown)?;
        vmi.request.as_ref().ok_or(Unresolved::NoSource)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pod_with_migration_job_label_is_a_target() {
        let pod: WirePod = serde_json::from_value(json!({"metadata": {
            "name": "virt-launcher-vm1-abcde", "namespace": "ns",
            "labels": {MIGRATION_JOB_UID_LABEL: "job-1", CREATED_BY_LABEL: "vmi-uid"},
            "annotations": {MIGRATION_JOB_NAME_ANNOTATION: "vm1-migration"}
        }}))
        .unwrap();
        let t = migration_target(&pod).unwrap();
        assert_eq!(t.job_uid, "job-1");
        assert_eq!(t.vmi_uid, Some("vmi-uid"));
        assert_eq!(t.job_name, Some("vm1-migration"));
        assert_eq!(t.namespace, "ns");
    }

    #[test]
    fn ordinary_virt_launcher_pod_is_not_a_target() {
        let pod: WirePod = serde_json::from_value(json!({"metadata": {
            "name": "virt-launcher-vm1-abcde", "namespace": "ns",
            "labels": {CREATED_BY_LABEL: "vmi-uid"}
        }}))
        .unwrap();
        assert_eq!(migration_target(&pod), None);
    }
}
