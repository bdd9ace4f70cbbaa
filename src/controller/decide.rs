//! The decisions of the VirtualMachineMigration reconciler, as pure functions of the request,
//! its status and the facts gathered from the cluster. The reconciler in `migration.rs`
//! gathers the facts, asks these functions what to do, and carries out that one step; every
//! phase transition is therefore tested here without an API server.

use crate::api::migration::{
    AttemptOutcome, AttemptStatus, GroupMode, MigrationPhase, TargetScope,
    VirtualMachineMigrationSpec, VirtualMachineMigrationStatus, DEFAULT_MAX_ATTEMPTS,
};
use crate::plan::paths::{PathDecision, PathOutcome};
use crate::plan::{PlanOptions, Scope};

use super::validate::{self, MigrationBudget};

/// What the reconciler knows about the VMI named by the request.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct VmiFacts {
    /// KubeVirt's phase (`Running`, `Scheduling`, ...).
    pub phase: String,
    pub live_migratable: bool,
    pub migrating: bool,
    /// It runs on a node (so it has something to migrate away from).
    pub on_node: bool,
}

/// What the cluster shows, gathered before deciding.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Facts {
    /// Name of the request's KubeVirt migration.
    pub kubevirt_migration: String,
    /// That KubeVirt migration exists.
    pub kubevirt_migration_exists: bool,
    /// The VMI; `None` when it does not exist. Only consulted when no KubeVirt migration
    /// exists (the reconciler need not look it up otherwise).
    pub vmi: Option<VmiFacts>,
}

/// The one step the reconciler takes next.
#[derive(Clone, Debug, PartialEq)]
pub enum Step {
    /// Final and clean: wait for a change.
    Done,
    /// Final, but extra paths are still in place (a restart between the end and the
    /// cleanup): remove them.
    FinishCleanup,
    /// Succeeded with `group: Follow`, shared transfer not complete: move the members that
    /// touched the shared memory.
    FollowMembers,
    /// Handed to KubeVirt (possibly before a restart): mirror its progress.
    FollowKubevirt,
    /// A dry run already planned: nothing more to do.
    StayPlanned,
    /// Between attempts, KubeVirt still shows the VMI migrating: wait, then plan.
    Wait(String),
    /// The request cannot be carried out.
    Fail {
        reason: &'static str,
        message: String,
    },
    /// Plan it with this time budget.
    Plan(MigrationBudget),
}

impl Step {
    fn fail(reason: &'static str, message: String) -> Self {
        Step::Fail { reason, message }
    }
}

/// A request failed for its spec, and the spec was edited since: it starts over.
pub fn rejected_spec_changed(
    generation: Option<i64>,
    status: &VirtualMachineMigrationStatus,
) -> bool {
    status.phase == MigrationPhase::Failed
        && status
            .conditions
            .iter()
            .any(|c| c.r#type == "Failed" && c.reason == validate::INVALID_SPEC)
        && status.observed_generation != generation
}

/// Condition set when a `Follow` request stopped waiting for members at its deadline.
pub const FOLLOW_DEADLINE_PASSED: &str = "FollowDeadlinePassed";

/// With `group: Follow`: whether the time members may still follow has passed. `moved` is
/// when the requested VM's migration ended (the request's `endTime`); without it the clock
/// has not started.
pub fn follow_deadline_passed(
    moved: Option<&str>,
    deadline: std::time::Duration,
    now: crate::api::time::Timestamp,
) -> bool {
    moved
        .and_then(crate::api::time::parse_rfc3339)
        .is_some_and(|t| crate::api::time::elapsed(t, now) >= deadline)
}

/// The next step for a request; `vm` is the VMI's `namespace/name` for messages.
pub fn next_step(
    spec: &VirtualMachineMigrationSpec,
    status: &VirtualMachineMigrationStatus,
    vm: &str,
    facts: &Facts,
) -> Step {
    if status.phase == MigrationPhase::Succeeded
        && spec.group == Some(GroupMode::Follow)
        && !status.conditions.iter().any(|c| {
            (c.r#type == "SharedTransferComplete" || c.r#type == FOLLOW_DEADLINE_PASSED)
                && c.status == "True"
        })
    {
        return Step::FollowMembers;
    }
    if status.phase.is_final() {
        return if status.paths.iter().any(|p| p.removed_time.is_none()) {
            Step::FinishCleanup
        } else {
            Step::Done
        };
    }
    if facts.kubevirt_migration_exists {
        return Step::FollowKubevirt;
    }
    if status.phase == MigrationPhase::Migrating {
        return Step::fail(
            "KubevirtMigrationDeleted",
            format!(
                "KubeVirt migration {} was deleted before it finished",
                facts.kubevirt_migration
            ),
        );
    }
    if status.phase == MigrationPhase::Planned && spec.dry_run {
        return Step::StayPlanned;
    }
    let budget = match validate::migration_spec(spec) {
        Ok(b) => b,
        Err(e) => return Step::fail(validate::INVALID_SPEC, e.to_string()),
    };
    let Some(vmi) = &facts.vmi else {
        return Step::fail(
            "VmiNotFound",
            format!("VirtualMachineInstance {vm} does not exist"),
        );
    };
    if vmi.phase != "Running" {
        return Step::fail(
            "VmiNotRunning",
            format!(
                "VirtualMachineInstance {vm} is not running (phase {:?})",
                vmi.phase
            ),
        );
    }
    if !vmi.live_migratable {
        return Step::fail(
            "VmiNotLiveMigratable",
            format!(
                "VirtualMachineInstance {vm} does not have condition {}=True",
                crate::api::kubevirt::LIVE_MIGRATABLE
            ),
        );
    }
    if vmi.migrating && current_attempt(status) > 1 {
        return Step::Wait(format!(
            "waiting for KubeVirt to finish the failed migration of {vm} before the next attempt"
        ));
    }
    if vmi.migrating {
        return Step::fail(
            "VmiAlreadyMigrating",
            format!("VirtualMachineInstance {vm} is already migrating"),
        );
    }
    if !vmi.on_node {
        return Step::fail(
            "VmiWithoutNode",
            format!("VirtualMachineInstance {vm} has no node yet"),
        );
    }
    Step::Plan(budget)
}

/// The planner's options for a request: its target constraints, and once paths are being
/// prepared for a target, that target (so a re-plan cannot move the VM elsewhere while paths
/// to the first target come up).
pub fn plan_options(
    spec: &VirtualMachineMigrationSpec,
    status: &VirtualMachineMigrationStatus,
) -> PlanOptions {
    let target = spec.target.clone().unwrap_or_default();
    PlanOptions {
        scope: match target.scope {
            Some(TargetScope::Cluster) => Scope::Cluster,
            _ => Scope::WorkGroup,
        },
        pinned_node: target.node_name.clone().or_else(|| {
            (status.phase == MigrationPhase::PreparingPaths)
                .then(|| status.target_node.clone())
                .flatten()
        }),
        pinned_work_group: target.work_group.clone(),
        only_nodes: None,
        explain_top: None,
        listed: None,
        excluded_nodes: excluded_nodes(status),
        move_links: None,
    }
}

/// The number of the request's current attempt, 1 for the first: one more than the attempts
/// that ended failed. The attempt's KubeVirt migration is named after it, so a restarted
/// controller finds the one it made.
pub fn current_attempt(status: &VirtualMachineMigrationStatus) -> u32 {
    let failed = status
        .attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Failed)
        .count();
    u32::try_from(failed).unwrap_or(u32::MAX).saturating_add(1)
}

/// How many attempts the request may make (`spec.maxAttempts`, at least one).
pub fn max_attempts(spec: &VirtualMachineMigrationSpec) -> u32 {
    spec.max_attempts.unwrap_or(DEFAULT_MAX_ATTEMPTS).max(1)
}

/// The nodes earlier attempts failed on, each with why: a new plan leaves them out.
pub fn excluded_nodes(status: &VirtualMachineMigrationStatus) -> Vec<(String, String)> {
    status
        .attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Failed)
        .map(|a| (a.node.clone(), a.reason.clone()))
        .collect()
}

/// What a failed KubeVirt migration showed, gathered when it ended.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct AttemptEnd {
    /// The phases KubeVirt recorded for it, in order.
    pub phases: Vec<String>,
    /// The target node KubeVirt names in its migration state, if any.
    pub target_node: Option<String>,
    pub failure_reason: Option<String>,
    /// Someone asked KubeVirt to abort it.
    pub abort_requested: bool,
}

/// Why an attempt failed, as far as the target node is concerned.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum FailureCause {
    /// The target pod never ran: it stayed unschedulable (or pending) until KubeVirt's
    /// timeout deleted it. Another node may take it.
    TargetPodNeverRan,
    /// The target pod ran on the node and the migration failed there.
    OnTargetNode,
    /// The migration was aborted on purpose: not the node's doing.
    Aborted,
}

/// Phases KubeVirt reaches only once the target pod runs.
const TARGET_RAN: [&str; 4] = ["Scheduled", "PreparingTarget", "TargetReady", "Running"];

pub fn failure_cause(end: &AttemptEnd) -> FailureCause {
    if end.abort_requested {
        FailureCause::Aborted
    } else if end.target_node.is_none()
        && !end.phases.iter().any(|p| TARGET_RAN.contains(&p.as_str()))
    {
        FailureCause::TargetPodNeverRan
    } else {
        FailureCause::OnTargetNode
    }
}

/// What to do about a failed attempt to `node`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct FailedAttempt {
    /// Why the attempt failed, in words (kept in the attempt's record and, when it is
    /// replanned, in the excluded node's candidate reason).
    pub why: String,
    /// Plan again without the node; otherwise the request fails.
    pub replan: bool,
    /// The request's reason: for a replan what happens next, for a failure the end.
    pub message: String,
}

/// A member of a `group: Together` request once the requested VM's migration of the current
/// attempt failed: what KubeVirt shows of the member's own migration and where it is.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct MemberAttempt {
    pub name: String,
    /// The member's KubeVirt migration of this attempt was made.
    pub migration_made: bool,
    /// KubeVirt's phase of it, when the watch shows it.
    pub kubevirt_phase: Option<String>,
    /// The member's VMI still exists and runs on the request's source node.
    pub on_source: bool,
    /// KubeVirt shows the member's VMI migrating.
    pub migrating: bool,
}

/// Where a `Together` group stands after a failed attempt.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum GroupAfterFailure {
    /// A member's migration of the attempt has not ended (or the watch does not show it yet):
    /// wait; nothing is started or recorded meanwhile, so no KubeVirt migration is duplicated.
    Wait(String),
    /// Every member is still on the source and none is migrating: the whole group can be
    /// planned again.
    Intact,
    /// A member left the source (its migration succeeded, or its VMI is gone): the group is
    /// split, and moving it again would start from two nodes. Not retried; says why.
    Split(String),
}

/// Decides, for a `Together` request whose current attempt failed, whether the group can be
/// tried again as a whole: only once every member's migration of the attempt has ended, and
/// only while every member is still on the source.
pub fn group_after_failure(members: &[MemberAttempt]) -> GroupAfterFailure {
    let running: Vec<String> = members
        .iter()
        .filter(|m| {
            m.migrating
                || (m.migration_made
                    && !matches!(m.kubevirt_phase.as_deref(), Some("Succeeded" | "Failed")))
        })
        .map(|m| m.name.clone())
        .collect();
    if !running.is_empty() {
        return GroupAfterFailure::Wait(format!(
            "waiting for the migrations of group members {} to end before the next attempt",
            running.join(", ")
        ));
    }
    let left: Vec<String> = members
        .iter()
        .filter(|m| !m.on_source)
        .map(|m| m.name.clone())
        .collect();
    if left.is_empty() {
        GroupAfterFailure::Intact
    } else {
        GroupAfterFailure::Split(format!(
            "group members {} are no longer on the source node, so the group cannot move \
             together again",
            left.join(", ")
        ))
    }
}

/// Decides on the current attempt, which KubeVirt reports failed: a failure of the target
/// node (its pod never ran, or failed there) is tried again on the next-best node while
/// attempts remain; an abort, a `Together` group that is split (`split`: why, from
/// [`group_after_failure`]), or the last attempt end the request.
pub fn failed_attempt(
    spec: &VirtualMachineMigrationSpec,
    status: &VirtualMachineMigrationStatus,
    node: &str,
    end: &AttemptEnd,
    split: Option<&str>,
) -> FailedAttempt {
    let given = end.failure_reason.as_deref().unwrap_or("no reason given");
    let cause = failure_cause(end);
    let why = match cause {
        FailureCause::TargetPodNeverRan => format!(
            "the migration target pod never ran on {node} (unschedulable or pending until \
             KubeVirt's timeout; {given})"
        ),
        FailureCause::OnTargetNode => format!(
            "the migration failed on target node {}: {given}",
            end.target_node.as_deref().unwrap_or(node)
        ),
        FailureCause::Aborted => format!("the migration to {node} was aborted: {given}"),
    };
    let attempt = current_attempt(status);
    let max = max_attempts(spec);
    let retriable = cause != FailureCause::Aborted;
    let replan = retriable && split.is_none() && attempt < max;
    let whole = if spec.group == Some(GroupMode::Together) {
        "the group "
    } else {
        ""
    };
    let message = if replan {
        format!("attempt {attempt} of {max} failed: {why}; planning {whole}again without {node}")
    } else if let (true, true, Some(split)) = (retriable, attempt < max, split) {
        format!("KubeVirt migration failed: {why}; not tried again: {split}")
    } else if max > 1 && retriable {
        format!("KubeVirt migration failed: {why}; {attempt} of {max} attempts made")
    } else {
        format!("KubeVirt migration failed: {why}")
    };
    FailedAttempt {
        why,
        replan,
        message,
    }
}

/// After failed attempts, a plan with no target left ends the request (instead of waiting
/// for a node as a first plan does): the reason and message.
pub fn no_target_left(status: &VirtualMachineMigrationStatus) -> Option<(&'static str, String)> {
    let failed: Vec<String> = status
        .attempts
        .iter()
        .filter(|a| a.outcome == AttemptOutcome::Failed)
        .map(|a| format!("{} ({})", a.node, a.reason))
        .collect();
    (!failed.is_empty()).then(|| {
        (
            "NoTargetLeft",
            format!(
                "no other node passes the minimum hardware configuration after {} failed \
                 attempt(s): {}",
                failed.len(),
                failed.join("; ")
            ),
        )
    })
}

/// Records that KubeVirt migration `name` to `node` started (once: a record with that name is
/// kept as it is).
pub fn record_start(status: &mut VirtualMachineMigrationStatus, name: &str, node: &str, now: &str) {
    if status.attempts.iter().any(|a| a.kubevirt_migration == name) {
        return;
    }
    status.attempts.push(AttemptStatus {
        node: node.to_string(),
        kubevirt_migration: name.to_string(),
        outcome: AttemptOutcome::Running,
        reason: String::new(),
        start_time: Some(now.to_string()),
        end_time: None,
    });
}

/// Records how KubeVirt migration `name` to `node` ended.
pub fn record_end(
    status: &mut VirtualMachineMigrationStatus,
    name: &str,
    node: &str,
    outcome: AttemptOutcome,
    reason: String,
    end_time: &str,
) {
    record_start(status, name, node, end_time);
    if let Some(a) = status
        .attempts
        .iter_mut()
        .find(|a| a.kubevirt_migration == name)
    {
        a.outcome = outcome;
        a.reason = reason;
        a.end_time.get_or_insert_with(|| end_time.to_string());
    }
}

/// The `TimeBudget` condition for a path decision: (holds, reason, message).
pub fn time_budget(d: &PathDecision) -> (bool, &'static str, String) {
    match d.outcome {
        PathOutcome::FitsAsIs => (
            true,
            "FitsAsIs",
            "the estimate fits maxDuration without extra paths".to_string(),
        ),
        PathOutcome::FitsWithPaths => (
            true,
            "FitsWithPaths",
            format!("fits maxDuration with paths {}", d.added.join(", ")),
        ),
        PathOutcome::OverBudget => (
            false,
            "OverBudget",
            format!(
                "no further path can be added ({}); migrating anyway, estimate {:.0}s",
                if d.skipped.is_empty() {
                    "none configured".to_string()
                } else {
                    d.skipped
                        .iter()
                        .map(|(n, r)| format!("{n}: {r}"))
                        .collect::<Vec<_>>()
                        .join("; ")
                },
                d.estimate.seconds
            ),
        ),
    }
}

/// Whether to keep waiting for extra paths that are not ready after `waited_seconds`: up to
/// twice the request's path setup budget plus 10 s, or 60 s without one. After that the
/// migration goes ahead without them.
pub fn keep_waiting_for_paths(waited_seconds: i64, budget: &MigrationBudget) -> bool {
    let limit = budget
        .path_setup_budget
        .map_or(60, |d| d.as_secs() as i64 * 2 + 10);
    waited_seconds <= limit
}

/// How a followed KubeVirt migration stands, for the request.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Progress {
    Succeeded,
    Failed,
    /// Still going, with KubeVirt's phase when it reports one.
    Running(Option<String>),
}

/// The request's progress from KubeVirt's phase of its migration and, for `group: Together`,
/// its members' (`members` = (all succeeded, any failed), `None` without members): the request
/// ends when every member's migration has ended.
pub fn progress(kubevirt_phase: Option<&str>, members: Option<(bool, bool)>) -> Progress {
    match (kubevirt_phase, members) {
        (Some("Succeeded"), Some((_, true))) => Progress::Failed,
        (Some("Succeeded"), Some((false, false))) => Progress::Running(Some("Running".into())),
        (Some("Succeeded"), _) => Progress::Succeeded,
        (Some("Failed"), _) => Progress::Failed,
        (phase, _) => Progress::Running(phase.map(str::to_string)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::conditions::Condition;
    use crate::api::migration::PathUseStatus;
    use std::time::Duration;

    fn spec() -> VirtualMachineMigrationSpec {
        VirtualMachineMigrationSpec {
            vmi_name: "vm".into(),
            target: None,
            max_duration: None,
            path_setup_budget: None,
            follow_deadline: None,
            group: None,
            dry_run: false,
            max_attempts: None,
            unschedulable_timeout: None,
        }
    }

    fn running() -> VmiFacts {
        VmiFacts {
            phase: "Running".into(),
            live_migratable: true,
            migrating: false,
            on_node: true,
        }
    }

    fn facts(vmi: Option<VmiFacts>) -> Facts {
        Facts {
            kubevirt_migration: "cg-x-0a1b2c3d".into(),
            kubevirt_migration_exists: false,
            vmi,
        }
    }

    fn in_phase(phase: MigrationPhase) -> VirtualMachineMigrationStatus {
        VirtualMachineMigrationStatus {
            phase,
            ..Default::default()
        }
    }

    fn reason(step: Step) -> &'static str {
        match step {
            Step::Fail { reason, .. } => reason,
            other => panic!("expected a failure, got {other:?}"),
        }
    }

    #[test]
    fn a_new_request_for_a_running_vmi_is_planned() {
        let step = next_step(
            &spec(),
            &Default::default(),
            "ns/vm",
            &facts(Some(running())),
        );
        assert_eq!(step, Step::Plan(MigrationBudget::default()));
    }

    #[test]
    fn a_request_waiting_or_preparing_paths_is_planned_again() {
        for phase in [MigrationPhase::Pending, MigrationPhase::PreparingPaths] {
            let step = next_step(&spec(), &in_phase(phase), "ns/vm", &facts(Some(running())));
            assert!(matches!(step, Step::Plan(_)), "{phase:?}: {step:?}");
        }
    }

    #[test]
    fn the_budget_is_parsed_into_the_plan_step() {
        let mut s = spec();
        s.max_duration = Some("90s".into());
        s.path_setup_budget = Some("0s".into());
        let step = next_step(&s, &Default::default(), "ns/vm", &facts(Some(running())));
        assert_eq!(
            step,
            Step::Plan(MigrationBudget {
                max_duration: Some(Duration::from_secs(90)),
                path_setup_budget: Some(Duration::ZERO),
            })
        );
    }

    #[test]
    fn an_unusable_spec_fails_naming_the_field_before_the_vmi_is_looked_at() {
        let mut s = spec();
        s.max_duration = Some("99999999999999999999h".into());
        match next_step(&s, &Default::default(), "ns/vm", &facts(None)) {
            Step::Fail { reason, message } => {
                assert_eq!(reason, "InvalidSpec");
                assert!(message.starts_with("spec.maxDuration: "), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_vmi_that_cannot_migrate_fails_with_the_reason() {
        let f = |v: Option<VmiFacts>| {
            reason(next_step(&spec(), &Default::default(), "ns/vm", &facts(v)))
        };
        assert_eq!(f(None), "VmiNotFound");
        let scheduling = VmiFacts {
            phase: "Scheduling".into(),
            ..running()
        };
        assert_eq!(f(Some(scheduling)), "VmiNotRunning");
        let pinned = VmiFacts {
            live_migratable: false,
            ..running()
        };
        assert_eq!(f(Some(pinned)), "VmiNotLiveMigratable");
        let busy = VmiFacts {
            migrating: true,
            ..running()
        };
        assert_eq!(f(Some(busy)), "VmiAlreadyMigrating");
        let nowhere = VmiFacts {
            on_node: false,
            ..running()
        };
        assert_eq!(f(Some(nowhere)), "VmiWithoutNode");
    }

    #[test]
    fn an_existing_kubevirt_migration_is_followed_whatever_the_phase_says() {
        let mut f = facts(None);
        f.kubevirt_migration_exists = true;
        for phase in [
            MigrationPhase::Pending,
            MigrationPhase::PreparingPaths,
            MigrationPhase::Migrating,
        ] {
            assert_eq!(
                next_step(&spec(), &in_phase(phase), "ns/vm", &f),
                Step::FollowKubevirt
            );
        }
    }

    #[test]
    fn a_kubevirt_migration_deleted_while_migrating_fails_the_request() {
        match next_step(
            &spec(),
            &in_phase(MigrationPhase::Migrating),
            "ns/vm",
            &facts(Some(running())),
        ) {
            Step::Fail { reason, message } => {
                assert_eq!(reason, "KubevirtMigrationDeleted");
                assert!(message.contains("cg-x-0a1b2c3d"), "{message}");
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_planned_dry_run_stays_planned() {
        let mut s = spec();
        s.dry_run = true;
        let step = next_step(
            &s,
            &in_phase(MigrationPhase::Planned),
            "ns/vm",
            &facts(Some(running())),
        );
        assert_eq!(step, Step::StayPlanned);
    }

    #[test]
    fn final_requests_only_finish_their_cleanup() {
        let mut s = in_phase(MigrationPhase::Failed);
        assert_eq!(next_step(&spec(), &s, "ns/vm", &facts(None)), Step::Done);
        s.paths.push(PathUseStatus {
            network: "fast".into(),
            ..Default::default()
        });
        assert_eq!(
            next_step(&spec(), &s, "ns/vm", &facts(None)),
            Step::FinishCleanup
        );
        s.paths[0].removed_time = Some("2026-01-01T00:00:00Z".into());
        assert_eq!(
            next_step(
                &spec(),
                &in_phase(MigrationPhase::Succeeded),
                "ns/vm",
                &facts(None)
            ),
            Step::Done
        );
    }

    #[test]
    fn a_succeeded_follow_request_moves_members_until_the_shared_transfer_completes() {
        let mut s = spec();
        s.group = Some(GroupMode::Follow);
        let mut status = in_phase(MigrationPhase::Succeeded);
        assert_eq!(
            next_step(&s, &status, "ns/vm", &facts(None)),
            Step::FollowMembers
        );
        status.conditions.push(Condition {
            r#type: "SharedTransferComplete".into(),
            status: "True".into(),
            reason: "MembersMoved".into(),
            message: String::new(),
            last_transition_time: None,
        });
        assert_eq!(next_step(&s, &status, "ns/vm", &facts(None)), Step::Done);
    }

    #[test]
    fn a_spec_rejected_then_edited_starts_over() {
        let mut status = in_phase(MigrationPhase::Failed);
        status.observed_generation = Some(1);
        status.conditions.push(Condition {
            r#type: "Failed".into(),
            status: "True".into(),
            reason: "InvalidSpec".into(),
            message: "spec.maxDuration: ...".into(),
            last_transition_time: None,
        });
        assert!(!rejected_spec_changed(Some(1), &status), "unchanged");
        assert!(rejected_spec_changed(Some(2), &status), "edited");
        status.conditions[0].reason = "VmiNotFound".into();
        assert!(
            !rejected_spec_changed(Some(2), &status),
            "other failures are final"
        );
    }

    #[test]
    fn paths_are_waited_for_up_to_twice_the_setup_budget_and_ten_seconds() {
        let none = MigrationBudget::default();
        assert!(keep_waiting_for_paths(60, &none));
        assert!(!keep_waiting_for_paths(61, &none));
        let budget = MigrationBudget {
            max_duration: None,
            path_setup_budget: Some(Duration::from_secs(5)),
        };
        assert!(keep_waiting_for_paths(20, &budget));
        assert!(!keep_waiting_for_paths(21, &budget));
        let zero = MigrationBudget {
            max_duration: None,
            path_setup_budget: Some(Duration::ZERO),
        };
        assert!(!keep_waiting_for_paths(11, &zero));
    }

    #[test]
    fn the_target_of_paths_being_prepared_is_kept_and_a_pinned_node_wins() {
        let mut status = in_phase(MigrationPhase::Pending);
        status.target_node = Some("b".into());
        assert_eq!(plan_options(&spec(), &status).pinned_node, None);
        status.phase = MigrationPhase::PreparingPaths;
        assert_eq!(
            plan_options(&spec(), &status).pinned_node.as_deref(),
            Some("b")
        );
        let mut s = spec();
        s.target = Some(crate::api::migration::MigrationTarget {
            node_name: Some("c".into()),
            work_group: Some("wg-2".into()),
            scope: Some(TargetScope::Cluster),
        });
        let opts = plan_options(&s, &status);
        assert_eq!(opts.pinned_node.as_deref(), Some("c"));
        assert_eq!(opts.pinned_work_group.as_deref(), Some("wg-2"));
        assert_eq!(opts.scope, Scope::Cluster);
        assert_eq!(plan_options(&spec(), &status).scope, Scope::WorkGroup);
    }

    #[test]
    fn kubevirt_progress_and_members_decide_the_end() {
        assert_eq!(progress(Some("Succeeded"), None), Progress::Succeeded);
        assert_eq!(progress(Some("Failed"), None), Progress::Failed);
        assert_eq!(
            progress(Some("Running"), None),
            Progress::Running(Some("Running".into()))
        );
        assert_eq!(progress(None, None), Progress::Running(None));
        // Together: the request ends with its last member.
        assert_eq!(
            progress(Some("Succeeded"), Some((true, false))),
            Progress::Succeeded
        );
        assert_eq!(
            progress(Some("Succeeded"), Some((false, false))),
            Progress::Running(Some("Running".into()))
        );
        assert_eq!(
            progress(Some("Succeeded"), Some((false, true))),
            Progress::Failed
        );
        assert_eq!(
            progress(Some("Running"), Some((false, true))),
            Progress::Running(Some("Running".into())),
            "a failed member does not end a request still migrating"
        );
    }

    #[test]
    fn the_time_budget_condition_says_which_paths_or_why_none() {
        let estimate = crate::plan::estimate::Estimate {
            seconds: 95.0,
            bytes_sent: 0,
            rounds: 1,
            downtime_ms: 0.0,
            converges: true,
            lambda: 0.0,
            advice: None,
        };
        let base = PathDecision {
            outcome: PathOutcome::FitsWithPaths,
            added: vec!["fast".into(), "faster".into()],
            skipped: vec![],
            bandwidth: 0.0,
            estimate,
        };
        let (ok, reason, message) = time_budget(&base);
        assert!(ok);
        assert_eq!(reason, "FitsWithPaths");
        assert!(message.contains("fast, faster"), "{message}");
        let over = PathDecision {
            outcome: PathOutcome::OverBudget,
            added: vec![],
            skipped: vec![("slow".into(), "setup too long".into())],
            ..base
        };
        let (ok, reason, message) = time_budget(&over);
        assert!(!ok);
        assert_eq!(reason, "OverBudget");
        assert!(message.contains("slow: setup too long"), "{message}");
        assert!(message.contains("estimate 95s"), "{message}");
    }

    #[test]
    fn a_follow_request_stops_at_its_deadline_and_not_before() {
        use crate::api::time::parse_rfc3339;
        let now = parse_rfc3339("2026-01-01T01:00:00Z").unwrap();
        let d = std::time::Duration::from_secs(30 * 60);
        assert!(follow_deadline_passed(Some("2026-01-01T00:30:00Z"), d, now));
        assert!(!follow_deadline_passed(
            Some("2026-01-01T00:30:01Z"),
            d,
            now
        ));
        assert!(
            !follow_deadline_passed(None, d, now),
            "no end time: not started"
        );
        assert!(!follow_deadline_passed(Some("garbage"), d, now));

        let mut s = spec();
        s.group = Some(GroupMode::Follow);
        let mut status = in_phase(MigrationPhase::Succeeded);
        status.conditions.push(Condition {
            r#type: FOLLOW_DEADLINE_PASSED.into(),
            status: "True".into(),
            reason: "DeadlinePassed".into(),
            message: "vm2 left behind".into(),
            last_transition_time: None,
        });
        assert_eq!(next_step(&s, &status, "ns/vm", &facts(None)), Step::Done);
        s.follow_deadline = Some("99999999999999999999h".into());
        assert!(
            validate::migration_spec(&s).is_err(),
            "an absurd deadline is invalid"
        );
    }

    fn attempt(node: &str, name: &str, outcome: AttemptOutcome) -> AttemptStatus {
        AttemptStatus {
            node: node.into(),
            kubevirt_migration: name.into(),
            outcome,
            reason: format!("why {node}"),
            start_time: None,
            end_time: None,
        }
    }

    fn never_scheduled() -> AttemptEnd {
        AttemptEnd {
            phases: vec!["Pending".into(), "Scheduling".into(), "Failed".into()],
            ..Default::default()
        }
    }

    #[test]
    fn the_current_attempt_is_one_more_than_the_failed_ones() {
        let mut status = in_phase(MigrationPhase::Migrating);
        assert_eq!(current_attempt(&status), 1);
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Running));
        assert_eq!(current_attempt(&status), 1, "a running attempt is current");
        status.attempts[0].outcome = AttemptOutcome::Failed;
        assert_eq!(current_attempt(&status), 2);
        status
            .attempts
            .push(attempt("c", "m-2", AttemptOutcome::Running));
        assert_eq!(current_attempt(&status), 2);
    }

    #[test]
    fn nodes_of_failed_attempts_are_excluded_from_the_next_plan_with_their_reason() {
        let mut status = in_phase(MigrationPhase::Pending);
        status.attempts = vec![
            attempt("b", "m", AttemptOutcome::Failed),
            attempt("c", "m-2", AttemptOutcome::Running),
        ];
        assert_eq!(
            plan_options(&spec(), &status).excluded_nodes,
            vec![("b".to_string(), "why b".to_string())]
        );
        assert!(plan_options(&spec(), &Default::default())
            .excluded_nodes
            .is_empty());
    }

    #[test]
    fn a_failure_is_the_target_nodes_unless_it_was_an_abort() {
        assert_eq!(
            failure_cause(&never_scheduled()),
            FailureCause::TargetPodNeverRan
        );
        assert_eq!(
            failure_cause(&AttemptEnd::default()),
            FailureCause::TargetPodNeverRan,
            "no phases recorded, no target node"
        );
        let ran = AttemptEnd {
            phases: vec!["Scheduling".into(), "Scheduled".into(), "Failed".into()],
            ..Default::default()
        };
        assert_eq!(failure_cause(&ran), FailureCause::OnTargetNode);
        let named = AttemptEnd {
            target_node: Some("b".into()),
            failure_reason: Some("target domain crashed".into()),
            ..Default::default()
        };
        assert_eq!(failure_cause(&named), FailureCause::OnTargetNode);
        let aborted = AttemptEnd {
            abort_requested: true,
            ..named
        };
        assert_eq!(failure_cause(&aborted), FailureCause::Aborted);
    }

    #[test]
    fn a_failed_target_is_replanned_while_attempts_remain_and_then_fails() {
        let mut status = in_phase(MigrationPhase::Migrating);
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Running));
        let first = failed_attempt(&spec(), &status, "b", &never_scheduled(), None);
        assert!(first.replan);
        assert!(first.why.contains("never ran on b"), "{}", first.why);
        assert!(
            first.message.starts_with("attempt 1 of 3 failed")
                && first.message.ends_with("planning again without b"),
            "{}",
            first.message
        );
        // The third attempt is the last of the default three.
        status.attempts[0].outcome = AttemptOutcome::Failed;
        status
            .attempts
            .push(attempt("c", "m-2", AttemptOutcome::Failed));
        status
            .attempts
            .push(attempt("d", "m-3", AttemptOutcome::Running));
        let on_node = AttemptEnd {
            target_node: Some("d".into()),
            failure_reason: Some("libvirt error".into()),
            ..Default::default()
        };
        let last = failed_attempt(&spec(), &status, "d", &on_node, None);
        assert!(!last.replan);
        assert_eq!(
            last.message,
            "KubeVirt migration failed: the migration failed on target node d: libvirt error; \
             3 of 3 attempts made"
        );
    }

    #[test]
    fn aborts_and_single_attempts_are_not_replanned() {
        let status = in_phase(MigrationPhase::Migrating);
        let aborted = AttemptEnd {
            abort_requested: true,
            ..Default::default()
        };
        let v = failed_attempt(&spec(), &status, "b", &aborted, None);
        assert!(!v.replan);
        assert!(v.message.contains("aborted"), "{}", v.message);
        let mut once = spec();
        once.max_attempts = Some(1);
        let v = failed_attempt(&once, &status, "b", &never_scheduled(), None);
        assert!(!v.replan);
        assert!(
            v.message
                .starts_with("KubeVirt migration failed: the migration target pod"),
            "{}",
            v.message
        );
        let mut zero = spec();
        zero.max_attempts = Some(0);
        assert_eq!(max_attempts(&zero), 1, "at least one attempt");
    }

    fn member(name: &str, phase: Option<&str>, on_source: bool) -> MemberAttempt {
        MemberAttempt {
            name: name.into(),
            migration_made: true,
            kubevirt_phase: phase.map(str::to_string),
            on_source,
            migrating: false,
        }
    }

    #[test]
    fn a_together_group_whose_members_all_stayed_is_replanned_as_a_whole() {
        let members = [
            member("m1", Some("Failed"), true),
            // Never made (the attempt failed before it): nothing of it runs.
            MemberAttempt {
                migration_made: false,
                ..member("m2", None, true)
            },
        ];
        assert_eq!(group_after_failure(&members), GroupAfterFailure::Intact);
        let mut together = spec();
        together.group = Some(GroupMode::Together);
        let mut status = in_phase(MigrationPhase::Migrating);
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Running));
        let v = failed_attempt(&together, &status, "b", &never_scheduled(), None);
        assert!(v.replan);
        assert!(
            v.message.ends_with("planning the group again without b"),
            "{}",
            v.message
        );
        assert_eq!(group_after_failure(&[]), GroupAfterFailure::Intact);
    }

    #[test]
    fn a_together_group_waits_for_every_member_migration_of_the_attempt_to_end() {
        for running in [
            member("m1", Some("Running"), true),
            member("m1", Some("Scheduling"), true),
            // Made, but the watch does not show it yet.
            member("m1", None, true),
            MemberAttempt {
                migrating: true,
                ..member("m1", Some("Failed"), true)
            },
        ] {
            let members = [member("m0", Some("Failed"), true), running.clone()];
            match group_after_failure(&members) {
                GroupAfterFailure::Wait(why) => {
                    assert!(why.contains("m1") && !why.contains("m0"), "{why}")
                }
                other => panic!("{running:?}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_split_together_group_is_not_replanned() {
        let members = [
            member("m1", Some("Failed"), true),
            member("m2", Some("Succeeded"), false),
        ];
        let GroupAfterFailure::Split(why) = group_after_failure(&members) else {
            panic!("a member moved: the group is split");
        };
        assert!(why.contains("m2") && !why.contains("m1"), "{why}");
        let mut together = spec();
        together.group = Some(GroupMode::Together);
        let mut status = in_phase(MigrationPhase::Migrating);
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Running));
        let v = failed_attempt(&together, &status, "b", &never_scheduled(), Some(&why));
        assert!(!v.replan);
        assert!(
            v.message.contains("not tried again") && v.message.contains("m2"),
            "{}",
            v.message
        );
        // A member whose VMI is gone also splits it.
        let gone = [member("m3", Some("Failed"), false)];
        assert!(matches!(
            group_after_failure(&gone),
            GroupAfterFailure::Split(_)
        ));
    }

    #[test]
    fn between_attempts_a_vmi_still_migrating_is_waited_for_not_failed() {
        let busy = VmiFacts {
            migrating: true,
            ..running()
        };
        let mut status = in_phase(MigrationPhase::Pending);
        assert_eq!(
            reason(next_step(
                &spec(),
                &status,
                "ns/vm",
                &facts(Some(busy.clone()))
            )),
            "VmiAlreadyMigrating",
            "a first attempt does not take someone else's migration for its own"
        );
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Failed));
        assert!(matches!(
            next_step(&spec(), &status, "ns/vm", &facts(Some(busy))),
            Step::Wait(_)
        ));
        assert!(matches!(
            next_step(&spec(), &status, "ns/vm", &facts(Some(running()))),
            Step::Plan(_)
        ));
    }

    #[test]
    fn no_target_after_failed_attempts_ends_the_request_naming_them() {
        let mut status = in_phase(MigrationPhase::Pending);
        assert_eq!(no_target_left(&status), None, "a first plan waits instead");
        status
            .attempts
            .push(attempt("b", "m", AttemptOutcome::Failed));
        let (reason, message) = no_target_left(&status).unwrap();
        assert_eq!(reason, "NoTargetLeft");
        assert!(
            message.contains("1 failed attempt(s): b (why b)"),
            "{message}"
        );
    }

    #[test]
    fn attempts_are_recorded_once_and_their_end_kept() {
        let mut status = in_phase(MigrationPhase::Migrating);
        record_start(&mut status, "m", "b", "2026-01-01T00:00:00Z");
        record_start(&mut status, "m", "x", "2026-01-01T00:00:05Z");
        assert_eq!(status.attempts.len(), 1, "a restart records nothing twice");
        assert_eq!(status.attempts[0].node, "b");
        record_end(
            &mut status,
            "m",
            "b",
            AttemptOutcome::Failed,
            "never ran".into(),
            "2026-01-01T00:05:00Z",
        );
        let a = &status.attempts[0];
        assert_eq!(a.outcome, AttemptOutcome::Failed);
        assert_eq!(a.reason, "never ran");
        assert_eq!(a.end_time.as_deref(), Some("2026-01-01T00:05:00Z"));
        // An end seen without its start (made before a restart) still gets its record.
        record_end(
            &mut status,
            "m-2",
            "c",
            AttemptOutcome::Succeeded,
            String::new(),
            "2026-01-01T00:06:00Z",
        );
        assert_eq!(status.attempts.len(), 2);
        assert_eq!(current_attempt(&status), 2);
    }
}
