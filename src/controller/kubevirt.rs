//! The KubeVirt migrations commonground creates: their names (stable across controller
//! restarts, new for a re-created request) and the create itself, pinned to the chosen node
//! with `addedNodeSelector` and owned by the request.

use kube::{Api, Resource, ResourceExt};

use super::error::{ControllerError, Result};
use super::labels;
use super::Context;
use crate::api::kubevirt::{
    VirtualMachineInstanceMigration, VmimSpec, HOSTNAME_LABEL, UNSCHEDULABLE_TIMEOUT_ANNOTATION,
};
use crate::api::write;
use crate::api::VirtualMachineMigration;

/// Label on the KubeVirt migrations we create, naming the request.
pub const OWNER_LABEL: &str = "commonground.dev/virtual-machine-migration";

/// Deterministic name of the KubeVirt migration for a request: a re-created request (new
/// UID) gets a new one, a restarted controller finds the old one.
pub fn vmim_name(vmm: &VirtualMachineMigration) -> String {
    let uid = vmm.metadata.uid.as_deref().unwrap_or("0");
    let short: String = uid.chars().filter(|c| *c != '-').take(8).collect();
    labels::bounded_name(&format!("cg-{}-{short}", vmm.name_any()))
}

/// Name of the KubeVirt migration of a request's `attempt` (1 for the first): the first keeps
/// [`vmim_name`], every later target tried gets its own.
pub fn attempt_vmim_name(vmm: &VirtualMachineMigration, attempt: u32) -> String {
    let base = vmim_name(vmm);
    if attempt <= 1 {
        base
    } else {
        labels::bounded_name(&format!("{base}-{attempt}"))
    }
}

/// Creates the KubeVirt migration `name` of `vmi` to `target`, owned and labelled by `vmm`.
/// Returns false when it already existed (made before a restart): creating is idempotent.
pub async fn create_kubevirt_migration(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    name: &str,
    vmi: &str,
    target: &str,
) -> Result<bool> {
    let ns = vmm
        .namespace()
        .ok_or_else(|| ControllerError::MalformedObject(vmm.name_any()))?;
    let owner = vmm
        .controller_owner_ref(&())
        .ok_or_else(|| ControllerError::MalformedObject(vmm.name_any()))?;
    let mut vmim = VirtualMachineInstanceMigration::new(
        name,
        VmimSpec {
            vmi_name: vmi.to_string(),
            added_node_selector: Some([(HOSTNAME_LABEL.to_string(), target.to_string())].into()),
        },
    );
    vmim.metadata.namespace = Some(ns.clone());
    vmim.metadata.owner_references = Some(vec![owner]);
    let (owner_labels, owner_annotations) = labels::owner_marks(OWNER_LABEL, &vmm.metadata);
    let mut annotations = owner_annotations;
    // The spec was validated before anything is created; an unusable value adds nothing.
    if let Ok(Some(timeout)) = super::validate::unschedulable_timeout(&vmm.spec) {
        annotations.insert(
            UNSCHEDULABLE_TIMEOUT_ANNOTATION.to_string(),
            timeout.as_secs().to_string(),
        );
    }
    vmim.metadata.labels = Some(owner_labels);
    vmim.metadata.annotations = Some(annotations);
    let api: Api<VirtualMachineInstanceMigration> = Api::namespaced(ctx.client.clone(), &ns);
    Ok(write::create_or_exists(&api, &vmim).await?)
}
