//! The decisions of the VirtualMachineMigration reconciler, as pure functions of the request,
//! its status and the facts gathered from the cluster. The reconciler in `migration.rs`
//! gathers the facts, asks these functions what to do, and carries out that one step; every
//! phase transition is therefore tested here without an API server.

use crate::api::migration::{
    GroupMode, MigrationPhase, TargetScope, VirtualMachineMigrationSpec,
    VirtualMachineMigrationStatus,
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
}
