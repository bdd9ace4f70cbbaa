//! The decision both verbs share: pass the pod through, answer neutrally because data is
//! missing, or plan it with the planning core exactly as the controller would.
//!
//! A member of a memory group (seed 001) is never placed apart from its group: while the whole
//! group is on the source it is ranked as one unit (room for all, union of their memory), and
//! once a member has gone (or is going) elsewhere the rest are pinned to that node.

use std::borrow::Cow;
use std::collections::BTreeMap;

use super::migration_pod::{migration_target, Unresolved};
use super::state::ClusterState;
use super::wire::WirePod;
use crate::plan::hardware::FilterReason;
use crate::plan::planner::Ranking;
use crate::plan::{PlanError, PlanOptions, Planner, VmRequest};

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
    /// The node a `VirtualMachineMigration` chose, or where the VM's memory group went.
    pub pinned: Option<String>,
    /// Members of the VM's memory group, itself included (0 when not planned).
    pub group_size: usize,
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
    pub ranking: Ranking,
    /// `namespace/name` of the VMI.
    pub vm: String,
    /// The VMI's source node.
    pub source: &'s str,
    /// Members of the VM's memory group, itself included (1: no group).
    pub group_size: usize,
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
    GroupMemberExcluded,
}

static GROUP_MEMBER_EXCLUDED: FilterReason = FilterReason::GroupMemberExcluded;

/// The memory group of the VM a target pod receives (seed 001): members never end up split.
struct MemoryGroup {
    /// Members in the group, this VM included (1: no group).
    size: usize,
    /// Where the other members went: the node most of those that left the source run on or
    /// are migrating to (ties by name). The VM follows them there.
    gone_to: Option<String>,
    /// Every member's request, this VM first, while all are still on the source.
    on_source: Option<Vec<VmRequest>>,
}

impl MemoryGroup {
    fn of(state: &ClusterState, req: &VmRequest) -> Self {
        let members = state.group_members(&req.vm);
        let mut gone: BTreeMap<&str, usize> = BTreeMap::new();
        for m in &members {
            if let Some(d) = m.destination().filter(|d| *d != req.source_node) {
                *gone.entry(d).or_default() += 1;
            }
        }
        // Most members first; among equals the first name (BTreeMap order, `max_by` keeps the
        // last maximum, so iterate in reverse).
        let gone_to = gone
            .iter()
            .rev()
            .max_by_key(|(_, n)| **n)
            .map(|(node, _)| node.to_string());
        let on_source = (gone_to.is_none() && !members.is_empty()).then(|| {
            std::iter::once(req.clone())
                .chain(
                    members
                        .iter()
                        .filter_map(|m| m.request.clone())
                        .filter(|r| r.source_node == req.source_node),
                )
                .collect()
        });
        MemoryGroup {
            size: members.len() + 1,
            gone_to,
            on_source,
        }
    }
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
            group_size: self.group_size,
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
            Slot::GroupMemberExcluded => NodeAnswer::Filtered(&GROUP_MEMBER_EXCLUDED),
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
    let group = MemoryGroup::of(state, req);
    // A VirtualMachineMigration's choice first, else where the rest of the group went.
    let pin = state
        .pinned_target(&req.vm)
        .map(str::to_string)
        .or_else(|| group.gone_to.clone());
    let opts = PlanOptions {
        // A pin to a node the view does not know yet is applied by name in the filter.
        pinned_node: pin.clone().filter(|p| planner.node_position(p).is_some()),
        scope: state.scope,
        ..PlanOptions::default()
    };
    let positions: Vec<Option<usize>> = names.iter().map(|n| planner.node_position(n)).collect();
    let mut considered: Vec<usize> = positions.iter().flatten().copied().collect();
    // A group still together is planned as one unit: room for all, ranked by the union.
    let together = match &group.on_source {
        Some(members) if pin.is_none() => match planner.group_request(members) {
            Ok(g) => Some(g),
            Err(e) => {
                tracing::warn!(vmi = %req.vm, error = %e, "memory group cannot be planned as one; planning the VM alone");
                None
            }
        },
        _ => None,
    };
    let mut excluded = Vec::new();
    if let Some(g) = &together {
        considered.retain(|&i| {
            g.allowed[i] || {
                excluded.push(i);
                false
            }
        });
    }
    let request = together.as_ref().map_or(req, |g| &g.request);
    match planner.rank_nodes(request, &opts, Some(&considered)) {
        Ok(ranking) => {
            let node_count = planner.snapshot().nodes.len();
            let mut slot = vec![Slot::NotConsidered; node_count];
            for (r, n) in ranking.ranked.iter().enumerate() {
                slot[n.node] = Slot::Ranked(r);
            }
            for (f, (n, _)) in ranking.filtered.iter().enumerate() {
                slot[*n] = Slot::Filtered(f);
            }
            for i in excluded {
                slot[i] = Slot::GroupMemberExcluded;
            }
            Placement::Planned(Box::new(Planned {
                vm_summary: ranking.has_summary,
                vm: req.vm.to_string(),
                source: &req.source_node,
                group_size: group.size,
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
