//! VMs that share memory move together.
//!
//! Members of a memory group are found by the label `commonground.dev/memory-group` (same
//! value, same namespace, same node) or by the agent (QEMU processes mapping the same shared
//! object, published in the node's digest). `Together` migrates all members to one target in
//! one step; `Follow` migrates the requested VM first and then every member the agent sees
//! touching the shared memory after that, to the same node, until the members left on the
//! source fall to the threshold.

use std::sync::Arc;

use kube::ResourceExt;

use super::error::Result;
use super::kubevirt::{attempt_vmim_name, create_kubevirt_migration};
use super::labels;
use super::Context;
use crate::api::kubevirt::VirtualMachineInstance;
use crate::api::migration::MemberStatus;
use crate::api::VirtualMachineMigration;

pub use crate::api::migration::MEMORY_GROUP_LABEL;
/// Follow: the shared transfer is complete when at most this many members remain on the source.
pub const FOLLOW_REMAINING_THRESHOLD: usize = 0;

/// The other members of `vmi`'s memory group on its node, by name.
pub fn members(ctx: &Context, vmi: &VirtualMachineInstance) -> Vec<Arc<VirtualMachineInstance>> {
    let ns = vmi.namespace().unwrap_or_default();
    let node = vmi.node_name().unwrap_or_default().to_string();
    let mut names: Vec<String> = Vec::new();
    if let Some(group) = vmi.labels().get(MEMORY_GROUP_LABEL) {
        for other in ctx.view.vmis.state() {
            if other.namespace().as_deref() == Some(ns.as_str())
                && other.labels().get(MEMORY_GROUP_LABEL) == Some(group)
                && other.name_any() != vmi.name_any()
            {
                names.push(other.name_any());
            }
        }
    }
    // Groups the agent detected (same shared object mapped by several QEMU processes).
    let me = format!("{ns}/{}", vmi.name_any());
    if let Some(digest) = ctx
        .view
        .digests
        .get(&kube::runtime::reflector::ObjectRef::new(&node))
    {
        for g in digest.status.iter().flat_map(|s| &s.memory_groups) {
            if g.members.contains(&me) {
                for m in &g.members {
                    if let Some((mns, mname)) = m.split_once('/') {
                        if mns == ns && m != &me {
                            names.push(mname.to_string());
                        }
                    }
                }
            }
        }
    }
    names.sort();
    names.dedup();
    names
        .iter()
        .filter_map(|n| ctx.view.vmi(&ns, n))
        .filter(|v| v.node_name() == Some(node.as_str()))
        .collect()
}

/// Deterministic name of a member's KubeVirt migration in the request's `attempt` (1 for the
/// first; `Together` groups tried again get one per attempt, as the requested VM does).
pub fn member_vmim_name(vmm: &VirtualMachineMigration, member: &str, attempt: u32) -> String {
    labels::bounded_name(&format!("{}-m-{member}", attempt_vmim_name(vmm, attempt)))
}

/// Creates (idempotently) a member's KubeVirt migration of `attempt` to `target`.
pub async fn start_member(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    member: &str,
    target: &str,
    attempt: u32,
) -> Result<String> {
    let name = member_vmim_name(vmm, member, attempt);
    create_kubevirt_migration(ctx, vmm, &name, member, target).await?;
    Ok(name)
}

/// Refreshes each member's phase from its KubeVirt migration. Returns (all succeeded, any failed).
pub fn refresh_members(ctx: &Context, ns: &str, members: &mut [MemberStatus]) -> (bool, bool) {
    let mut all_ok = true;
    let mut any_failed = false;
    for m in members.iter_mut() {
        let Some(vmim) = m.kubevirt_migration.as_deref() else {
            all_ok = false;
            continue;
        };
        let phase = ctx
            .view
            .vmims
            .get(&kube::runtime::reflector::ObjectRef::new(vmim).within(ns))
            .and_then(|v| v.phase().map(str::to_string))
            .unwrap_or_else(|| "Pending".into());
        all_ok &= phase == "Succeeded";
        any_failed |= phase == "Failed";
        m.phase = phase;
    }
    (all_ok, any_failed)
}

/// Together, after the requested VM's migration of an attempt failed: each member's own
/// migration as the watch shows it, and whether the member is still on `source`.
pub fn member_attempts(
    ctx: &Context,
    ns: &str,
    source: &str,
    members: &[MemberStatus],
) -> Vec<crate::controller::decide::MemberAttempt> {
    members
        .iter()
        .map(|m| {
            let vmim = m.kubevirt_migration.as_deref().and_then(|name| {
                ctx.view
                    .vmims
                    .get(&kube::runtime::reflector::ObjectRef::new(name).within(ns))
            });
            let vmi = ctx.view.vmi(ns, &m.name);
            crate::controller::decide::MemberAttempt {
                name: m.name.clone(),
                migration_made: m.kubevirt_migration.is_some(),
                kubevirt_phase: vmim.and_then(|v| v.phase().map(str::to_string)),
                on_source: vmi.as_ref().is_some_and(|v| v.node_name() == Some(source)),
                migrating: vmi.as_ref().is_some_and(|v| v.is_migrating()),
            }
        })
        .collect()
}

/// Follow: members on the source that touched the shared memory since the
/// first VM moved, as the source's agent reports them.
pub fn touched_shared_memory(
    ctx: &Context,
    source: &str,
    ns: &str,
    waiting: &[String],
) -> Vec<String> {
    let Some(digest) = ctx
        .view
        .digests
        .get(&kube::runtime::reflector::ObjectRef::new(source))
    else {
        return Vec::new();
    };
    let touched: Vec<String> = digest
        .status
        .iter()
        .flat_map(|s| &s.memory_groups)
        .flat_map(|g| g.recently_accessed_by.iter())
        .filter_map(|m| m.split_once('/'))
        .filter(|(mns, _)| *mns == ns)
        .map(|(_, name)| name.to_string())
        .collect();
    follow_trigger(waiting, &touched)
}

/// The members still waiting that touched the shared range.
pub fn follow_trigger(waiting: &[String], touched: &[String]) -> Vec<String> {
    waiting
        .iter()
        .filter(|w| touched.contains(w))
        .cloned()
        .collect()
}

/// Follow: is the group's shared transfer complete?
pub fn follow_complete(still_on_source: usize, threshold: usize) -> bool {
    still_on_source <= threshold
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_waiting_members_that_touched_the_shared_range_follow() {
        let waiting = vec!["b".to_string(), "c".to_string()];
        assert_eq!(
            follow_trigger(&waiting, &["c".into(), "a".into()]),
            vec!["c".to_string()]
        );
        assert!(follow_trigger(&waiting, &[]).is_empty());
        assert!(follow_trigger(&[], &["b".into()]).is_empty());
    }

    #[test]
    fn shared_transfer_completes_at_the_threshold() {
        assert!(!follow_complete(1, 0));
        assert!(follow_complete(0, 0));
        assert!(follow_complete(1, 1));
    }
}
