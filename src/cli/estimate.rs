//! `commonground estimate`: the migration time estimate the controller uses, from the shell.

use crate::plan::estimate::{estimate, EstimateError, EstimateInput, Transport};

#[derive(clap::Args, Debug)]
pub struct EstimateArgs {
    /// Guest memory in bytes.
    #[arg(long)]
    pub memory: u64,
    /// Bytes per second the guest dirties.
    #[arg(long)]
    pub dirty_rate: f64,
    /// Bytes per second of the migration paths.
    #[arg(long)]
    pub bandwidth: f64,
    /// Bytes the guest keeps rewriting (bounds what one round can dirty).
    #[arg(long, default_value_t = 0)]
    pub working_set: u64,
    /// Bytes the destination already holds (skipped by a region-aware transport).
    #[arg(long, default_value_t = 0)]
    pub common_bytes: u64,
    /// Zero bytes (never sent).
    #[arg(long, default_value_t = 0)]
    pub zero_bytes: u64,
    #[arg(long, default_value_t = 300.0)]
    pub downtime_limit_ms: f64,
    #[arg(long, default_value_t = 30)]
    pub max_rounds: u32,
    /// Print JSON (keys seconds, bytes_sent, rounds, downtime_ms, converges).
    #[arg(long)]
    pub json: bool,
}

pub fn run(args: EstimateArgs) -> Result<(), EstimateError> {
    let mut input = EstimateInput::new(args.memory, args.dirty_rate, args.bandwidth);
    input.working_set_bytes = args.working_set;
    input.common_bytes = args.common_bytes;
    input.zero_bytes = args.zero_bytes;
    input.downtime_limit_ms = args.downtime_limit_ms;
    input.max_rounds = args.max_rounds;
    let stock = estimate(&input)?;
    input.transport = Transport::SkipCommon;
    let skip = estimate(&input)?;
    if args.json {
        let mut v = serde_json::to_value(&stock).expect("estimate serializes");
        v["skip_common"] = serde_json::to_value(&skip).expect("estimate serializes");
        println!("{v}");
    } else {
        for (name, e) in [
            ("stock KubeVirt/QEMU", &stock),
            ("skipping common regions", &skip),
        ] {
            println!(
                "{name:>24}: {:.1} s, {} sent in {} rounds, downtime {:.0} ms, {}",
                e.seconds,
                crate::plan::hardware::human_bytes(e.bytes_sent),
                e.rounds,
                e.downtime_ms,
                if e.converges {
                    "converges"
                } else {
                    "does NOT converge"
                }
            );
        }
        if let Some(a) = &stock.advice {
            println!("advice: {a}");
        }
    }
    Ok(())
}
