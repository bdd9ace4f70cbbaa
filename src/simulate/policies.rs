//! The placement policies `simulate` compares, and the loop that replays migrations through
//! them.
//!
//! - `commonground`: [`Planner::plan`] with default options, exactly what the controller runs.
//! - `commonground_cluster`: the same with scope `Cluster` (work groups ranked by distance across the cluster), to
//!   show what staying in the source's work group costs.
//! - `least_allocated`: the passing candidate with the most free CPU and memory after placing
//!   the VM (kube-scheduler's default `NodeResourcesFit` LeastAllocated score).
//! - `random`: a uniformly random passing candidate.
//! - `oracle`: the passing candidate with the most bytes in common, computed exactly.
//!
//! Every policy sees the same candidates (the minimum hardware filter), and every choice is
//! charged the bytes that would really move: VM memory minus the EXACT bytes in common on the
//! chosen node minus zero bytes. Without exact data (a recorded snapshot without its exact
//! section) the planner's estimate is charged instead and the oracle is skipped.

use std::time::Instant;

use indicatif::{ProgressBar, ProgressStyle};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use crate::plan::cluster::{NodeFacts, VmRequest};
use crate::plan::hardware::check_node;
use crate::plan::ksm;
use crate::plan::{PlanOptions, Planner, Scope};

/// Exact knowledge of the content: regions of VM `vm` (index into the workload's requests)
/// present on node `node` (index into the snapshot's nodes).
pub trait ExactOverlap: Sync {
    fn common_regions(&self, vm: usize, node: usize) -> u64;
}

impl ExactOverlap for super::synthetic::ExactLayers {
    fn common_regions(&self, vm: usize, node: usize) -> u64 {
        super::synthetic::ExactLayers::common_regions(self, vm, node)
    }
}

/// What to replay.
pub struct Workload<'a> {
    pub planner: &'a Planner,
    pub requests: &'a [VmRequest],
    pub exact: Option<&'a dyn ExactOverlap>,
}

pub const POLICIES: [&str; 5] = [
    "commonground",
    "commonground_cluster",
    "least_allocated",
    "random",
    "oracle",
];

/// Per-policy raw results.
#[derive(Clone, Debug, Default)]
pub struct PolicyRun {
    pub name: &'static str,
    pub bytes_to_transfer: Vec<u64>,
    pub common_bytes: Vec<u64>,
    /// Of `common_bytes`, what KSM could merge on the chosen node (0 where it does not run).
    pub ksm_merged_bytes: Vec<u64>,
    pub decision_ns: Vec<u64>,
    /// Migrations for which the policy found no target.
    pub no_target: usize,
}

#[derive(Clone, Debug, Default)]
pub struct Replay {
    pub migrations: usize,
    pub exact: bool,
    pub policies: Vec<PolicyRun>,
    /// |estimated - exact| overlap fraction in percentage points, over (VM, candidate) pairs
    /// where either is non-zero.
    pub estimate_error_pp: Vec<f64>,
    /// The same, only for the node the oracle chose (where the estimate matters most).
    pub estimate_error_pp_at_oracle: Vec<f64>,
    /// `estimate_error_pp` split by VM memory size (GiB, rounded up to a power of two).
    pub estimate_error_pp_by_vm_gib: std::collections::BTreeMap<u64, Vec<f64>>,
    /// Memory, zero bytes and all VM bytes of the sampled migrations.
    pub vm_bytes: Vec<u64>,
}

fn least_allocated_score(node: &NodeFacts, req: &VmRequest) -> f64 {
    let after = |alloc: u64, requested: u64, want: u64| {
        if alloc == 0 {
            0.0
        } else {
            alloc.saturating_sub(requested + want) as f64 / alloc as f64
        }
    };
    (after(
        node.allocatable.cpu_millis,
        node.requested.cpu_millis,
        req.requests.cpu_millis,
    ) + after(
        node.allocatable.memory_bytes,
        node.requested.memory_bytes,
        req.requests.memory_bytes,
    )) / 2.0
}

fn passing(planner: &Planner, req: &VmRequest) -> Vec<usize> {
    planner
        .snapshot()
        .nodes
        .iter()
        .enumerate()
        .filter(|(_, n)| check_node(req, n).is_none())
        .map(|(i, _)| i)
        .collect()
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template("{msg} [{bar:40}] {pos}/{len} {eta}")
            .expect("valid template")
            .progress_chars("=> "),
    );
    bar.set_message(what.to_string());
    bar
}

/// Replays `migrations` random migrations (random VM, source = its node) through every policy.
pub fn replay(w: &Workload, migrations: usize, seed: u64, bar: &ProgressBar) -> Replay {
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EED_0F4E_914A);
    let nodes = &w.planner.snapshot().nodes;
    let rb = w.planner.snapshot().geometry.region_bytes();
    let mut runs: Vec<PolicyRun> = POLICIES
        .iter()
        .filter(|p| **p != "oracle" || w.exact.is_some())
        .map(|p| PolicyRun {
            name: p,
            ..Default::default()
        })
        .collect();
    let mut out = Replay {
        migrations: 0,
        exact: w.exact.is_some(),
        ..Default::default()
    };
    if w.requests.is_empty() {
        return out;
    }
    let opts = PlanOptions::default();
    let cluster_opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    let mut hits = Vec::new();
    for _ in 0..migrations {
        bar.inc(1);
        let v = rng.random_range(0..w.requests.len());
        let req = &w.requests[v];
        let Some(summary) = req
            .summary
            .as_ref()
            .or_else(|| w.planner.vm_summary(&req.vm))
        else {
            continue;
        };
        out.migrations += 1;
        let total = summary.memory_bytes;
        let zero = (summary.zero_regions * rb).min(total);
        let nonzero = summary.nonzero_regions();
        out.vm_bytes.push(total);
        let estimated = w.planner.common_regions(summary, &mut hits);
        let common_of = |node: usize| -> u64 {
            let regions = match w.exact {
                Some(e) => e.common_regions(v, node),
                None => estimated[node].round() as u64,
            };
            (regions * rb).min(total - zero)
        };

        // Decisions, each timed on its own, filter included.
        let mut choices: Vec<(Option<usize>, u64)> = Vec::with_capacity(runs.len());
        for run in &runs {
            let t = Instant::now();
            let choice = match run.name {
                "commonground" => w
                    .planner
                    .plan(req, &opts)
                    .ok()
                    .and_then(|p| p.target_node)
                    .and_then(|n| w.planner.node_position(&n)),
                "commonground_cluster" => w
                    .planner
                    .plan(req, &cluster_opts)
                    .ok()
                    .and_then(|p| p.target_node)
                    .and_then(|n| w.planner.node_position(&n)),
                "least_allocated" => passing(w.planner, req).into_iter().max_by(|&a, &b| {
                    least_allocated_score(&nodes[a], req)
                        .total_cmp(&least_allocated_score(&nodes[b], req))
                        .then_with(|| nodes[b].name.cmp(&nodes[a].name))
                }),
                "random" => {
                    let p = passing(w.planner, req);
                    (!p.is_empty()).then(|| p[rng.random_range(0..p.len())])
                }
                "oracle" => {
                    let exact = w.exact.expect("oracle runs only with exact data");
                    passing(w.planner, req)
                        .into_iter()
                        .map(|n| (n, exact.common_regions(v, n)))
                        .max_by(|&(a, ca), &(b, cb)| {
                            ca.cmp(&cb)
                                .then(
                                    nodes[b]
                                        .effective_load()
                                        .total_cmp(&nodes[a].effective_load()),
                                )
                                .then_with(|| nodes[b].name.cmp(&nodes[a].name))
                        })
                        .map(|(n, _)| n)
                }
                other => unreachable!("unknown policy {other}"),
            };
            choices.push((choice, t.elapsed().as_nanos() as u64));
        }
        for (run, (choice, ns)) in runs.iter_mut().zip(choices) {
            run.decision_ns.push(ns);
            match choice {
                Some(n) => {
                    let common = common_of(n);
                    run.common_bytes.push(common);
                    run.ksm_merged_bytes
                        .push(ksm::mergeable_bytes(common, ksm::ksm_runs(&nodes[n])));
                    run.bytes_to_transfer.push(total - zero - common);
                }
                None => {
                    run.no_target += 1;
                    run.common_bytes.push(0);
                    run.ksm_merged_bytes.push(0);
                    run.bytes_to_transfer.push(total - zero);
                }
            }
        }

        // Estimate error over the candidates.
        if let (Some(exact), true) = (w.exact, nonzero > 0) {
            let cands = passing(w.planner, req);
            let mut best: Option<(usize, u64)> = None;
            for &n in &cands {
                let ex = exact.common_regions(v, n);
                let est = estimated[n] / nonzero as f64;
                let exf = ex as f64 / nonzero as f64;
                if ex > 0 || est > 0.0 {
                    let err = (est - exf).abs() * 100.0;
                    out.estimate_error_pp.push(err);
                    out.estimate_error_pp_by_vm_gib
                        .entry(total.div_ceil(1 << 30).next_power_of_two())
                        .or_default()
                        .push(err);
                }
                if best.is_none_or(|(_, b)| ex > b) {
                    best = Some((n, ex));
                }
            }
            if let Some((n, ex)) = best {
                let err = (estimated[n] / nonzero as f64 - ex as f64 / nonzero as f64).abs();
                out.estimate_error_pp_at_oracle.push(err * 100.0);
            }
        }
    }
    out.policies = runs;
    out
}
