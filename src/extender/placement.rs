//! The decision both verbs share: pass the pod through, answer neutrally because data is
//! missing, or plan it with the planning core exactly as the controller would.

use std::collections::HashMap;

use super::migration_pod::{migration_target, Unresolved};
use super::state::ClusterState;
use super::wire::WirePod;
use crate::plan::planner::Candidate;
use crate::plan::{Plan, PlanError, PlanOptions};

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
}

impl Report {
    pub(crate) fn count_node(&mut self, cause: Cause) {
        match self.nodes_degraded.iter_mut().find(|(c, _)| *c == cause) {
            Some((_, n)) => *n += 1,
            None => self.nodes_degraded.push((cause, 1)),
        }
    }
}

/// A migration target pod planned by the planning core.
pub struct Planned {
    pub plan: Plan,
    /// The node a `VirtualMachineMigration` chose for this VMI.
    pub pin: Option<String>,
    /// False when no digest holds the VM's memory summary.
    pub vm_summary: bool,
}

impl Planned {
    /// Candidates by node name.
    pub fn by_node(&self) -> HashMap<&str, &Candidate> {
        self.plan
            .candidates
            .iter()
            .map(|c| (c.node.as_str(), c))
            .collect()
    }
}

pub enum Placement {
    PassThrough,
    Neutral(Cause),
    Planned(Box<Planned>),
}

/// Decides how to treat `pod` over the candidate `names`. Never fails: what cannot be
/// planned is answered neutrally.
pub fn place(state: Option<&ClusterState>, pod: Option<&WirePod>, names: &[&str]) -> Placement {
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
        only_nodes: Some(names.iter().map(|n| n.to_string()).collect()),
        // Scores and filter reasons only: nobody reads why 5,000 nodes lost.
        explain_top: Some(0),
        ..PlanOptions::default()
    };
    match planner.plan(req, &opts) {
        Ok(plan) => Placement::Planned(Box::new(Planned {
            vm_summary: req.summary.is_some() || planner.vm_summary(&req.vm).is_some(),
            plan,
            pin,
        })),
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
