//! `prioritize`: scores 0..=10 for the nodes that passed filtering.
//!
//! A migration target pod gets the planning core's scores (`rank::extender_scores`, the same
//! function behind the controller's ranking): 10 for the node the controller would choose,
//! less for the others by memory in common and load. Every other pod gets 0 on every node, so
//! the extender never skews ordinary scheduling. Where data is missing the score is neutral,
//! which is also 0: the extender then adds nothing and kube-scheduler's own plugins decide.

use super::placement::{place, Cause, NodeAnswer, Placement, Report};
use super::state::ClusterState;
use super::wire::{ExtenderArgs, HostPriority, Text, MAX_EXTENDER_PRIORITY};
use super::BadRequest;

/// The score that expresses no opinion.
pub const NEUTRAL_SCORE: i64 = 0;

pub fn prioritize<'s, 'a>(
    state: Option<&ClusterState>,
    args: &'s ExtenderArgs<'a>,
) -> Result<(Vec<HostPriority<'s>>, Report), BadRequest> {
    let pod = args
        .pod
        .as_ref()
        .ok_or_else(|| BadRequest("ExtenderArgs.Pod is missing".into()))?;
    let names = args.node_names().map_err(BadRequest)?;
    let mut report = Report::default();
    let scores: Vec<i64> = match place(state, Some(pod), &names) {
        Placement::PassThrough => {
            report.pass_through = true;
            vec![NEUTRAL_SCORE; names.len()]
        }
        Placement::Neutral(cause) => {
            report.degraded(pod, cause);
            vec![NEUTRAL_SCORE; names.len()]
        }
        Placement::Planned(planned) if !planned.vm_summary => {
            report.pod_degraded = Some(Cause::VmSummaryMissing);
            report.decision = Some(planned.decision(pod));
            vec![NEUTRAL_SCORE; names.len()]
        }
        Placement::Planned(planned) => {
            report.decision = Some(planned.decision(pod));
            (0..names.len())
                .map(|i| match planned.answer(i) {
                    NodeAnswer::Unknown => {
                        report.count_node(Cause::NodeUnknown);
                        NEUTRAL_SCORE
                    }
                    NodeAnswer::Filtered(_) => 0,
                    NodeAnswer::Passed {
                        has_digest: false, ..
                    } => {
                        report.count_node(Cause::NodeWithoutDigest);
                        NEUTRAL_SCORE
                    }
                    NodeAnswer::Passed { score, .. } => {
                        i64::from(score).clamp(0, MAX_EXTENDER_PRIORITY)
                    }
                })
                .collect()
        }
    };
    let hosts = names
        .into_iter()
        .zip(scores)
        .map(|(host, score)| HostPriority {
            host: Text(host),
            score,
        });
    Ok((hosts.collect(), report))
}
