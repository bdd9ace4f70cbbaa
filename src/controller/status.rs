//! From a plan to the `VirtualMachineMigration` status a person reads.

use crate::api::migration::{CandidateStatus, EstimateStatus, WorkGroupStatus};
use crate::plan::estimate::{estimate, EstimateInput, Transport};
use crate::plan::hardware::human_bytes;
use crate::plan::{Plan, Verdict};

/// Candidates shown in status: the best `top` passing ones, then up to `top` filtered.
pub fn candidates(plan: &Plan, top: usize) -> Vec<CandidateStatus> {
    let passing = plan
        .candidates
        .iter()
        .filter(|c| !matches!(c.verdict, Verdict::Filtered(_)))
        .take(top);
    let filtered = plan
        .candidates
        .iter()
        .filter(|c| matches!(c.verdict, Verdict::Filtered(_)))
        .take(top);
    passing
        .chain(filtered)
        .map(|c| {
            let (verdict, reason) = match &c.verdict {
                Verdict::Chosen => ("Chosen", chosen_reason(plan, c)),
                Verdict::Lost(r) => ("Lost", r.clone()),
                Verdict::Filtered(r) => ("Filtered", r.clone()),
            };
            CandidateStatus {
                node: c.node.clone(),
                work_group: c.work_group.clone(),
                common_bytes: c.common_bytes,
                distance: if c.distance.is_finite() {
                    c.distance
                } else {
                    -1.0
                },
                load: (c.load * 1000.0).round() / 1000.0,
                score: c.score,
                verdict: verdict.into(),
                reason,
            }
        })
        .collect()
}

fn chosen_reason(plan: &Plan, c: &crate::plan::planner::Candidate) -> String {
    let passing = plan
        .candidates
        .iter()
        .filter(|x| !matches!(x.verdict, Verdict::Filtered(_)))
        .count();
    if passing == 1 {
        "the only node that passes the minimum hardware filter".into()
    } else if c.common_bytes > 0 {
        format!("most memory in common ({})", human_bytes(c.common_bytes))
    } else {
        "no candidate holds any of the VM's memory: lowest load".into()
    }
}

pub fn work_groups(plan: &Plan, region_bytes: u64) -> Vec<WorkGroupStatus> {
    plan.work_groups
        .iter()
        .map(|w| WorkGroupStatus {
            work_group: w.work_group.clone(),
            available_bytes: (w.regions_available * region_bytes as f64) as u64,
            distance: w.distance,
            candidates: w.candidates as u32,
            chosen: w.chosen,
        })
        .collect()
}

/// Transfer parameters the estimate needs beyond the plan.
#[derive(Clone, Copy, Debug)]
pub struct TransferModel {
    /// Bytes per second of the default migration network.
    pub bandwidth: f64,
    pub downtime_limit_ms: f64,
    /// CPU cores a target needs per Gbit/s of extra migration stream (seed 004).
    pub cores_per_gbps: f64,
}

/// The estimate input for a plan over the default network, stock transport.
pub fn estimate_input(
    plan: &Plan,
    dirty_rate: f64,
    working_set: u64,
    model: TransferModel,
) -> EstimateInput {
    let b = plan.bytes;
    let mut input = EstimateInput::new(b.total, dirty_rate, model.bandwidth);
    input.zero_bytes = b.zero;
    input.common_bytes = b.common;
    input.working_set_bytes = working_set;
    input.downtime_limit_ms = model.downtime_limit_ms;
    input.transport = Transport::Stock;
    input
}

/// The estimate in status: both byte figures, and the time for the transport in use.
pub fn estimate_status(plan: &Plan, input: &EstimateInput, paths: Vec<String>) -> EstimateStatus {
    let b = plan.bytes;
    let time = estimate(input).ok();
    EstimateStatus {
        total_bytes: b.total,
        zero_bytes: b.zero,
        common_bytes: b.common,
        to_move_bytes: b.to_move,
        stock_bytes: b.total - b.zero,
        common_human: human_bytes(b.common),
        to_move_human: human_bytes(b.to_move),
        duration_seconds: time.as_ref().map(|t| (t.seconds * 10.0).round() / 10.0),
        duration_human: time.as_ref().map(|t| format!("{:.0}s", t.seconds.ceil())),
        converges: time.as_ref().map(|t| t.converges),
        paths,
    }
}
