//! The decision both verbs share: pass the pod through, answer neutrally because data is
//! missing, or plan it with the planning core exactly as the controller would.

use std::borrow::Cow;

use super::migration_pod::{migration_target, Unresolved};
use super::state::ClusterState;
use super::wire::WirePod;
use crate::plan::hardware::FilterReason;
use crate::plan::planner::Ranking;
use crate::plan::{PlanError, PlanOptions, Planner};

/// Why an answer was neutral (a metric label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Cause {
    /// The watches have not delivered their first full lists yet.
    ViewNotReady,
    /// No VMI matches the pod's created-by UID or migration name.
    VmiUnknown,
    /// The VMI has no node, so there is no source to plan from.
    NoSource,
    /// The VMI's node is not among the nodes the view knows.
    SourceNodeUnknown,
    /// The planner refused (for example a work group missing from the distance matrix).
    PlanFailed,
    /// No digest holds the VM's memory summary yet: nothing to rank memory by.
    VmSummaryMissing,
    /// kube-scheduler named a node the view has not seen (yet).
    NodeUnknown,
    /// The node has not published a `NodeRegionDigest` yet.
    NodeWithoutDigest,
}

impl Cause {
    pub fn as_str(self) -> &'static str {
        match self {
            Cause::ViewNotReady => "view_not_ready",
            Cause::VmiUnknown => "vmi_unknown",
            Cause::NoSource => "vmi_without_node",
            Cause::SourceNodeUnknown => "source_node_unknown",
            Cause::PlanFailed => "plan_failed",
            Cause::VmSummaryMissing => "vm_summary_missing",
            Cause::NodeUnknown => "node_unknown",
            Cause::NodeWithoutDigest => "node_without_digest",
        }
    }
}

/// What a handler did, for metrics and logs (and for tests to check).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Report {
    /// The pod is not a migration target: everything passed, neutral scores.
    pub pass_through: bool,
    /// The whole pod got a neutral answer, and why.
    pub pod_degraded: Option<Cause>,
    /// Nodes that got a neutral answer, by cause.
    pub nodes_degraded: Vec<(Cause, usize)>,
    /// For a migration target pod: what was decided, for the log.
    pub decision: Option<Decision>,
}

/// One migration target pod's answer, as the extender logs it.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Decision {
    /// `namespace/name` of the target pod.
    pub pod: String,
    /// `namespace/name` of the VMI, when it was found.
    pub vm: Option<String>,
    pub source: Option<String>,
    /// The node the planner ranks first among the candidates.
    pub best: Option<String>,
    /// Candidates that pass the filter, and those that fail it.
    pub passed: usize,
    pub failed: usize,
    /// The node a `VirtualMachineMigration` chose.
    pub pinned: Option<String>,
}

impl Report {
    /// A migration target pod answered neutrally: the pod and the cause.
    pub(crate) fn degraded(&mut self, pod: &WirePod, cause: Cause) {
        self.pod_degraded = Some(cause);
        self.decision = Some(Decision {
            pod: format!("{}/{}", pod.namespace(), pod.name()),
            ..Decision::default()
        });
    }

    pub(crate) fn count_node(&mut self, cause: Cause) {
        match self.nodes_degraded.iter_mut().find(|(c, _)| *c == cause) {
            Some((_, n)) => *n += 1,
            None => self.nodes_degraded.push((cause, 1)),
        }
    }
}

/// How one candidate node fared in a [`Planned`] answer.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeAnswer<'r> {
    /// kube-scheduler named a node the view has not seen (yet).
    Unknown,
    /// The node passed the filter; its extender score, and whether it has a digest.
    Passed { score: u8, has_digest: bool },
    /// The node failed the minimum-hardware filter (or the pin), and why.
    Filtered(&'r FilterReason),
}

/// A migration target pod planned by the planning core, over the request's candidates.
pub struct Planned<'s> {
    pub ranking: Ranking<'s>,
    /// `namespace/name` of the VMI.
    pub vm: String,
    /// The VMI's source node.
    pub source: &'s str,
    /// The node a `VirtualMachineMigration` chose for this VMI.
    pub pin: Option<String>,
    /// False when no digest holds the VM's memory summary.
    pub vm_summary: bool,
    /// Per candidate (request order): its node position, `None` when the view lacks it.
    positions: Vec<Option<usize>>,
    /// Per node position: where it is in `ranking` (passing rank, or `!filtered index`).
    slot: Vec<Slot>,
    planner: &'s Planner,
}

#[derive(Clone, Copy)]
enum Slot {
    NotConsidered,
    Ranked(usize),
    Filtered(usize),
}

impl<'s> Planned<'s> {
    /// What was decided for `pod`, for the log.
    pub fn decision(&self, pod: &WirePod) -> Decision {
        Decision {
            pod: format!("{}/{}", pod.namespace(), pod.name()),
            vm: Some(self.vm.clone()),
            source: Some(self.source.to_string()),
            best: self
                .ranking
                .ranked
                .first()
                .map(|r| self.planner.snapshot().nodes[r.node].name.clone()),
            passed: self.ranking.ranked.len(),
            failed: self.ranking.filtered.len(),
            pinned: self.pin.clone(),
        }
    }

    /// How the `i`-th candidate of the request fared.
    pub fn answer(&self, i: usize) -> NodeAnswer<'_> {
        let Some(pos) = self.positions.get(i).copied().flatten() else {
            return NodeAnswer::Unknown;
        };
        match self.slot[pos] {
            Slot::NotConsidered => NodeAnswer::Unknown,
            Slot::Ranked(r) => NodeAnswer::Passed {
                score: self.ranking.ranked[r].score,
                has_digest: self.planner.index().has_digest(pos),
            },
            Slot::Filtered(f) => NodeAnswer::Filtered(&self.ranking.filtered[f].1),
        }
    }
}

pub enum Placement<'s> {
    PassThrough,
    Neutral(Cause),
    Planned(Box<Planned<'s>>),
}

/// Decides how to treat `pod` over the candidate `names`. Never fails: what cannot be
/// planned is answered neutrally.
pub fn place<'s>(
    state: Option<&'s ClusterState>,
    pod: Option<&WirePod>,
    names: &[Cow<'_, str>],
) -> Placement<'s> {
    let Some(target) = pod.and_then(migration_target) else {
        return Placement::PassThrough;
    };
    let Some(state) = state else {
        return Placement::Neutral(Cause::ViewNotReady);
    };
    let req = match target.request(state) {
        Ok(r) => r,
        Err(Unresolved::VmiUnknown) => return Placement::Neutral(Cause::VmiUnknown),
        Err(Unresolved::NoSource) => return Placement::Neutral(Cause::NoSource),
    };
    let planner = &state.planner;
    let pin = state.pinned_target(&req.vm).map(str::to_string);
    let opts = PlanOptions {
        // A pin to a node the view does not know yet is applied by name in the filter.
        pinned_node: pin.clone().filter(|p| planner.node_position(p).is_some()),
        ..PlanOptions::default()
    };
    let positions: Vec<Option<usize>> = names.iter().map(|n| planner.node_position(n)).collect();
    let considered: Vec<usize> = positions.iter().flatten().copied().collect();
    match planner.rank_nodes(req, &opts, Some(&considered)) {
        Ok(ranking) => {
            let node_count = planner.snapshot().nodes.len();
            let mut slot = vec![Slot::NotConsidered; node_count];
            for (r, n) in ranking.ranked.iter().enumerate() {
                slot[n.node] = Slot::Ranked(r);
            }
            for (f, (n, _)) in ranking.filtered.iter().enumerate() {
                slot[*n] = Slot::Filtered(f);
            }
            Placement::Planned(Box::new(Planned {
                vm_summary: ranking.summary.is_some(),
                vm: req.vm.to_string(),
                source: &req.source_node,
                ranking,
                pin,
                positions,
                slot,
                planner,
            }))
        }
        Err(PlanError::UnknownSourceNode(_)) => Placement::Neutral(Cause::SourceNodeUnknown),
        Err(e) => {
            tracing::warn!(
                namespace = target.namespace, pod = target.pod, vmi = %req.vm, error = %e,
                "planning a migration target pod failed; answering neutrally"
            );
            Placement::Neutral(Cause::PlanFailed)
        }
    }
}
