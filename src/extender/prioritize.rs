//! `prioritize`: scores 0..=10 for the nodes that passed filtering.
//!
//! A migration target pod gets the planning core's scores (`rank::extender_scores`, the same
//! function behind the controller's ranking): 10 for the node the controller would choose,
//! less for the others by memory in common and load. Every other pod gets 0 on every node, so
//! the extender never skews ordinary scheduling. Where data is missing the score is neutral,
//! which is also 0: the extender then adds nothing and kube-scheduler's own plugins decide.

use super::placement::{place, Cause, Placement, Report};
use super::state::ClusterState;
use super::wire::{ExtenderArgs, HostPriority, MAX_EXTENDER_PRIORITY};
use super::BadRequest;
use crate::plan::Verdict;

/// The score that expresses no opinion.
pub const NEUTRAL_SCORE: i64 = 0;

pub fn prioritize(
    state: Option<&ClusterState>,
    args: &ExtenderArgs,
) -> Result<(Vec<HostPriority>, Report), BadRequest> {
    let pod = args
        .pod
        .as_ref()
        .ok_or_else(|| BadRequest("ExtenderArgs.Pod is missing".into()))?;
    let names = args.node_names().map_err(BadRequest)?;
    let mut report = Report::default();
    let neutral = |names: &[&str]| {
        names
            .iter()
            .map(|n| HostPriority {
                host: n.to_string(),
                score: NEUTRAL_SCORE,
            })
            .collect::<Vec<_>>()
    };
    let scores = match place(state, Some(pod), &names) {
        Placement::PassThrough => {
            report.pass_through = true;
            neutral(&names)
        }
        Placement::Neutral(cause) => {
            report.pod_degraded = Some(cause);
            neutral(&names)
        }
        Placement::Planned(planned) if !planned.vm_summary => {
            report.pod_degraded = Some(Cause::VmSummaryMissing);
            neutral(&names)
        }
        Placement::Planned(planned) => {
            let by_node = planned.by_node();
            names
                .iter()
                .map(|name| {
                    let score = match by_node.get(name) {
                        None => {
                            report.count_node(Cause::NodeUnknown);
                            NEUTRAL_SCORE
                        }
                        Some(c) if matches!(c.verdict, Verdict::Filtered(_)) => 0,
                        Some(c) if !c.has_digest => {
                            report.count_node(Cause::NodeWithoutDigest);
                            NEUTRAL_SCORE
                        }
                        Some(c) => i64::from(c.score).clamp(0, MAX_EXTENDER_PRIORITY),
                    };
                    HostPriority {
                        host: name.to_string(),
                        score,
                    }
                })
                .collect()
        }
    };
    Ok((scores, report))
}
