//! `filter`: which of kube-scheduler's candidate nodes may take the pod.
//!
//! A migration target pod gets the planning core's minimum-hardware filter, with the reason
//! of every failed node; the source node and, when a `VirtualMachineMigration` chose a target,
//! every other node fail as unresolvable (preemption cannot change them). Every other pod, and
//! every pod or node we lack data for, passes: missing data never blocks scheduling.

use std::collections::BTreeMap;

use super::placement::{place, Cause, NodeAnswer, Placement, Report};
use super::state::ClusterState;
use super::wire::{Candidates, ExtenderArgs, ExtenderFilterResult, NodeList};
use super::BadRequest;
use crate::plan::hardware::FilterReason;

/// Why a node failed.
enum Failed {
    Resolvable(String),
    Unresolvable(String),
}

pub fn filter<'a>(
    state: Option<&ClusterState>,
    args: &ExtenderArgs<'a>,
) -> Result<(ExtenderFilterResult<'a>, Report), BadRequest> {
    let pod = args
        .pod
        .as_ref()
        .ok_or_else(|| BadRequest("ExtenderArgs.Pod is missing".into()))?;
    let names = args.node_names().map_err(BadRequest)?;
    let mut report = Report::default();
    // One verdict per candidate, in request order; `None` passes.
    let verdicts: Vec<Option<Failed>> = match place(state, Some(pod), &names) {
        Placement::PassThrough => {
            report.pass_through = true;
            Vec::new()
        }
        Placement::Neutral(cause) => {
            report.degraded(pod, cause);
            Vec::new()
        }
        Placement::Planned(planned) => {
            report.decision = Some(planned.decision(pod));
            names
                .iter()
                .enumerate()
                .map(|(i, name)| {
                    // A pin applies by name, even to a node the view does not know yet.
                    let not_pinned = planned.pin.as_deref().filter(|p| p != name);
                    match (planned.answer(i), not_pinned) {
                        (NodeAnswer::Filtered(reason), _)
                            if name == planned.source || not_pinned.is_some() =>
                        {
                            Some(Failed::Unresolvable(reason.to_string()))
                        }
                        (NodeAnswer::Filtered(reason), None) => {
                            Some(Failed::Resolvable(reason.to_string()))
                        }
                        (_, Some(p)) => Some(Failed::Unresolvable(
                            FilterReason::NotPinnedTarget(p.to_string()).to_string(),
                        )),
                        (NodeAnswer::Passed { .. }, None) => None,
                        (NodeAnswer::Unknown, None) => {
                            report.count_node(Cause::NodeUnknown);
                            None
                        }
                    }
                })
                .collect()
        }
    };
    let passes = |i: usize| verdicts.get(i).is_none_or(Option::is_none);
    let mut result = ExtenderFilterResult::default();
    match args.candidates() {
        Candidates::Names(all) => {
            result.node_names = Some(
                all.iter()
                    .enumerate()
                    .filter(|(i, _)| passes(*i))
                    .map(|(_, n)| n.clone())
                    .collect(),
            );
        }
        Candidates::Objects(items) => {
            result.nodes = Some(NodeList {
                metadata: args.nodes.as_ref().and_then(|l| l.metadata),
                items: items
                    .iter()
                    .enumerate()
                    .filter(|(i, _)| passes(*i))
                    .map(|(_, n)| *n)
                    .collect(),
            });
        }
    }
    let mut failed = BTreeMap::new();
    let mut unresolvable = BTreeMap::new();
    for (name, verdict) in names.iter().zip(verdicts) {
        match verdict {
            Some(Failed::Resolvable(r)) => {
                failed.insert(name.to_string(), r);
            }
            Some(Failed::Unresolvable(r)) => {
                unresolvable.insert(name.to_string(), r);
            }
            None => {}
        }
    }
    result.failed_nodes = failed;
    result.failed_and_unresolvable_nodes = unresolvable;
    Ok((result, report))
}
