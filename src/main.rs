//! The `commonground` binary: parse the command line, hand over to one subcommand.

use clap::{Parser, Subcommand};

#[derive(Parser, Debug)]
#[command(
    name = "commonground",
    version,
    about = "KubeVirt live-migration placement by memory in common, work-group distance and load"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand, Debug)]
enum Command {
    /// Node agent (DaemonSet): scan the memory of this node's VMs and publish its NodeRegionDigest.
    Agent(commonground::agent::AgentArgs),
    /// Reconcile VirtualMachineMigration objects into KubeVirt live migrations.
    Controller(commonground::controller::ControllerArgs),
    /// Print the CustomResourceDefinitions (what crds/ must equal).
    Crd(commonground::cli::crd::CrdArgs),
    /// Scan processes or memory image files and print their regions and pairwise overlap.
    Digest(commonground::cli::digest::DigestArgs),
    /// kube-scheduler extender: filter and prioritize KubeVirt migration target pods.
    Extender(commonground::extender::ExtenderArgs),
    /// Estimate a live migration's time, bytes and downtime (the controller's model).
    Estimate(commonground::cli::estimate::EstimateArgs),
    /// Migration relay: send references for memory the target node already holds.
    Relay(commonground::relay::RelayArgs),
    /// Run the planner and the baselines over a synthetic or recorded cluster.
    Simulate(commonground::simulate::SimulateArgs),
}

fn main() -> std::process::ExitCode {
    let cli = Cli::parse();
    let result: Result<(), Box<dyn std::error::Error>> = match cli.command {
        Command::Controller(args) => runtime()
            .block_on(commonground::controller::run(args))
            .map_err(Into::into),
        Command::Agent(args) => runtime()
            .block_on(commonground::agent::run(args))
            .map_err(Into::into),
        Command::Digest(args) => commonground::cli::digest::run(args).map_err(Into::into),
        Command::Crd(args) => commonground::cli::crd::run(args).map_err(Into::into),
        Command::Extender(args) => runtime()
            .block_on(commonground::extender::run(args))
            .map_err(Into::into),
        Command::Estimate(args) => commonground::cli::estimate::run(args).map_err(Into::into),
        Command::Relay(args) => runtime()
            .block_on(commonground::relay::run(args))
            .map_err(Into::into),
        Command::Simulate(args) => commonground::simulate::run(args).map_err(Into::into),
    };
    match result {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()
        .expect("tokio runtime")
}
