//! `commonground simulate`: the planner on a synthetic or recorded cluster, against the
//! baselines kube-scheduler and chance would give, and against an exact oracle.
//!
//! - [`synthetic`]: the generator (images made of shared layers, private content, zero
//!   regions, nodes in work groups, digests within their size bound).
//! - [`policies`]: `commonground`, `least_allocated`, `random`, `oracle`, and the replay loop.
//! - [`report`]: the table and the `--json` object.
//! - [`snapshot`]: `--snapshot FILE` (format documented there) and `--write-snapshot FILE`.
//! - [`sweep`]: `--region-sweep`, match rate against region size on a page-level model.

pub mod digest_budget;
pub mod policies;
pub mod rebalance;
pub mod report;
pub mod snapshot;
pub mod sweep;
pub mod synthetic;

use std::path::PathBuf;

use serde_json::json;

use crate::plan::Planner;

use policies::{progress_bar, replay, Workload, POLICIES};
use synthetic::{Mix, SyntheticConfig};

#[derive(Debug, thiserror::Error)]
pub enum SimulateError {
    #[error("invalid simulation input: {0}")]
    Input(String),
    #[error("cannot use the snapshot: {0}")]
    Snapshot(String),
    #[error("cannot write {0}: {1}")]
    Write(String, String),
}

#[derive(clap::Args, Debug, Clone)]
pub struct SimulateArgs {
    /// Nodes in the synthetic cluster.
    #[arg(long, default_value_t = 100)]
    pub nodes: usize,
    /// VMs in the synthetic cluster.
    #[arg(long, default_value_t = 2000)]
    pub vms: usize,
    /// OS images the VMs are built from.
    #[arg(long, default_value_t = 8)]
    pub images: usize,
    /// Work groups (nodes are spread over them round-robin, on a line 10 apart).
    #[arg(long, default_value_t = 4)]
    pub work_groups: usize,
    /// Seed of every random choice: the same seed gives the same cluster and the same report.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Region size in 4 KiB pages.
    #[arg(long, default_value_t = crate::plan::region::DEFAULT_REGION_PAGES)]
    pub region_size: u32,
    /// How alike the VMs are.
    #[arg(long, value_enum, default_value_t = Mix::Middle)]
    pub mix: Mix,
    /// Migrations to replay.
    #[arg(long, default_value_t = 500)]
    pub migrations: usize,
    /// Share of the synthetic nodes on which KSM runs (0 to 1): the report counts the memory
    /// KSM could merge after each policy's migrations.
    #[arg(long, default_value_t = 0.5, value_parser = parse_fraction)]
    pub ksm_nodes: f64,
    /// Print one JSON object instead of the table.
    #[arg(long)]
    pub json: bool,
    /// Replay a recorded cluster instead of generating one.
    #[arg(long, value_name = "FILE")]
    pub snapshot: Option<PathBuf>,
    /// Save the generated cluster (with its exact overlaps) as a snapshot file.
    #[arg(long, value_name = "FILE")]
    pub write_snapshot: Option<PathBuf>,
    /// Measure match rate and summary size against region size (page-level model) instead.
    #[arg(long)]
    pub region_sweep: bool,
    /// Rounds of load balancing by live migration (every mode, and a descheduler baseline)
    /// on the synthetic cluster with a tenth of the nodes hot, instead.
    #[arg(long)]
    pub rebalance: bool,
    /// `--rebalance`: rounds per mode.
    #[arg(long, default_value_t = 30)]
    pub rounds: usize,
    /// `--rebalance`: one load exceeds another only when larger by this factor.
    #[arg(long, default_value_t = 1.25)]
    pub threshold_factor: f64,
    /// `--rebalance`: rebalancing migrations per round in the cluster (one per node).
    #[arg(long, default_value_t = 10)]
    pub max_concurrent: u32,
}

impl Default for SimulateArgs {
    fn default() -> Self {
        Self {
            nodes: 100,
            vms: 2000,
            images: 8,
            work_groups: 4,
            seed: 1,
            region_size: crate::plan::region::DEFAULT_REGION_PAGES,
            mix: Mix::Middle,
            migrations: 500,
            ksm_nodes: 0.5,
            json: false,
            snapshot: None,
            write_snapshot: None,
            region_sweep: false,
            rebalance: false,
            rounds: 30,
            threshold_factor: 1.25,
            max_concurrent: 10,
        }
    }
}

/// Runs the simulation and returns what `run` prints (the table or the JSON text).
pub fn simulate(args: &SimulateArgs) -> Result<String, SimulateError> {
    if args.region_sweep {
        let sweep = sweep::run(args.seed, !args.json);
        return Ok(if args.json {
            serde_json::to_string_pretty(&sweep).expect("plain data")
        } else {
            sweep::table(&sweep)
        });
    }
    if args.rebalance {
        let cfg = rebalance::RebalanceConfig {
            cluster: SyntheticConfig {
                exact: false,
                ..synthetic_config(args)
            },
            rounds: args.rounds,
            threshold_factor: args.threshold_factor,
            max_concurrent: args.max_concurrent,
            ..Default::default()
        };
        let r = rebalance::run(&cfg)?;
        return Ok(if args.json {
            serde_json::to_string_pretty(&r).expect("plain data")
        } else {
            rebalance::table(&r)
        });
    }
    let show = !args.json;
    if let Some(path) = &args.snapshot {
        let recorded = snapshot::load(path)?;
        let planner = Planner::new(recorded.snapshot);
        let summary = replay_summary(
            &planner,
            &recorded.requests,
            recorded.exact.as_ref(),
            args,
            show,
        );
        let context = json!({
            "snapshot": path.display().to_string(),
            "nodes": planner.snapshot().nodes.len(),
            "vms": recorded.requests.len(),
        });
        return Ok(if args.json {
            serde_json::to_string_pretty(&report::to_json(&summary, context)).expect("plain data")
        } else {
            format!(
                "recorded cluster {}: {} nodes, {} VMs\n{}",
                path.display(),
                planner.snapshot().nodes.len(),
                recorded.requests.len(),
                report::table(&summary)
            )
        });
    }

    let cluster = synthetic::generate(&synthetic_config(args))?;
    if let Some(path) = &args.write_snapshot {
        let file = snapshot::record(&cluster)?;
        let text = serde_json::to_string(&file).expect("plain data");
        std::fs::write(path, text)
            .map_err(|e| SimulateError::Write(path.display().to_string(), e.to_string()))?;
    }
    let planner = Planner::new(cluster.snapshot.clone());
    let summary = replay_summary(
        &planner,
        &cluster.requests,
        cluster.exact.as_ref(),
        args,
        show,
    );
    Ok(if args.json {
        let context = serde_json::to_value(&cluster.stats).expect("plain data");
        serde_json::to_string_pretty(&report::to_json(&summary, context)).expect("plain data")
    } else {
        let s = &cluster.stats;
        format!(
            "mix {}: {} nodes in {} work groups, {} VMs from {} images, region {} KiB\n\
             sharing (zero excluded) {}, image content {:.1}%, zero {:.1}%, memory allocated {:.1}%\n\
             digests: max {} KiB, mean {:.0} KiB; node sampling 1 in {:.0} (median), {:.0} samples per VM (median)\n{}",
            s.mix,
            s.nodes,
            s.work_groups,
            s.vms,
            s.images,
            s.region_bytes / 1024,
            s.sharing.map_or("-".into(), |x| format!("{:.1}%", x * 100.0)),
            s.image_fraction * 100.0,
            s.zero_fraction * 100.0,
            s.memory_allocated_fraction * 100.0,
            s.digest_bytes_max / 1024,
            s.digest_bytes_mean / 1024.0,
            s.sample_one_in_median,
            s.vm_samples_median,
            report::table(&summary)
        )
    })
}

/// The synthetic cluster the flags describe.
/// A share between 0 and 1.
fn parse_fraction(text: &str) -> Result<f64, String> {
    match text.parse::<f64>() {
        Ok(x) if (0.0..=1.0).contains(&x) => Ok(x),
        _ => Err(format!("{text:?} is not a share between 0 and 1")),
    }
}

fn synthetic_config(args: &SimulateArgs) -> SyntheticConfig {
    SyntheticConfig {
        nodes: args.nodes,
        vms: args.vms,
        images: args.images,
        work_groups: args.work_groups,
        seed: args.seed,
        region_pages: args.region_size,
        mix: args.mix,
        ksm_fraction: args.ksm_nodes,
        ..Default::default()
    }
}

/// Replays `args.migrations` requests against every policy and summarises them; the same for
/// a recorded and a synthetic cluster.
fn replay_summary<E: policies::ExactOverlap>(
    planner: &Planner,
    requests: &[crate::plan::VmRequest],
    exact: Option<&E>,
    args: &SimulateArgs,
    show: bool,
) -> report::Summary {
    let workload = Workload {
        planner,
        requests,
        exact: exact.map(|e| e as &dyn policies::ExactOverlap),
    };
    let bar = bar_for(args.migrations, "replaying", show);
    let r = replay(&workload, args.migrations, args.seed, &bar);
    bar.finish_and_clear();
    report::summarize(&r)
}

fn bar_for(len: usize, what: &str, show: bool) -> indicatif::ProgressBar {
    if show {
        progress_bar(len as u64, what)
    } else {
        indicatif::ProgressBar::hidden()
    }
}

pub fn run(args: SimulateArgs) -> Result<(), SimulateError> {
    let text = simulate(&args)?;
    println!("{text}");
    Ok(())
}

/// The policy names every report carries (the oracle only with exact data).
pub fn policy_names() -> &'static [&'static str] {
    &POLICIES
}

#[cfg(test)]
mod tests;
