//! `kubevirt-standin`: the e2e suite's stand-in for KubeVirt's virt-controller and virt-handler.
//! See `commonground_e2e::standin` for what it does and the annotations it reads.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use commonground_e2e::standin::{self, MemoryConfig, StandinConfig};

#[derive(Parser, Debug)]
#[command(version, about = "KubeVirt stand-in for the commonground e2e suite")]
struct Args {
    /// kubeconfig (default: $KUBECONFIG or in-cluster)
    #[arg(long, env = "KUBECONFIG")]
    kubeconfig: Option<PathBuf>,
    /// Only handle this namespace (default: all)
    #[arg(long)]
    namespace: Option<String>,
    /// Nominal migration bandwidth in bytes per second
    #[arg(long, default_value_t = 1.25e9)]
    bandwidth_bytes_per_sec: f64,
    /// Wall-clock seconds per nominal second of transfer
    #[arg(long, default_value_t = 0.01)]
    time_scale: f64,
    /// Fail a migration whose target pod stays unschedulable this long (seconds)
    #[arg(long, default_value_t = 300.0)]
    unschedulable_timeout_secs: f64,
    /// Periodic resync (seconds)
    #[arg(long, default_value_t = 10.0)]
    resync_secs: f64,
    /// Start one vm-memory process per running VMI
    #[arg(long)]
    memory: bool,
    /// The vm-memory binary (default: next to this one)
    #[arg(long)]
    memory_helper: Option<PathBuf>,
    /// Default OS image of guest memory (VMI annotation e2e.commonground.dev/image)
    #[arg(long, default_value = "debian-12")]
    default_image: String,
    /// Default MiB of image content (annotation e2e.commonground.dev/image-mib)
    #[arg(long, default_value_t = 64)]
    default_image_mib: usize,
    /// Default MiB of private content (annotation e2e.commonground.dev/private-mib)
    #[arg(long, default_value_t = 16)]
    default_private_mib: usize,
    /// Kill vm-memory processes when the stand-in exits (default: leave them for a restart)
    #[arg(long)]
    memory_dies_with_standin: bool,
    /// Play only virt-handler and kubelet, for a cluster where KubeVirt's own virt-controller
    /// runs (`e2e/cluster` default); without it the stand-in plays virt-controller too
    #[arg(long, env = "COMMONGROUND_STANDIN_HANDLER_ONLY")]
    handler_only: bool,
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_default_env()
                .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn")),
        )
        .init();
    let args = Args::parse();
    let config = match &args.kubeconfig {
        Some(path) => {
            let kc = kube::config::Kubeconfig::read_from(path)?;
            kube::Config::from_custom_kubeconfig(kc, &Default::default()).await?
        }
        None => kube::Config::infer().await?,
    };
    let client = kube::Client::try_from(config)?;
    let memory = if args.memory {
        let helper = args
            .memory_helper
            .clone()
            .or_else(commonground_e2e::memory::helper_next_to_current_exe)
            .ok_or_else(|| {
                anyhow::anyhow!("--memory: no vm-memory next to this binary; pass --memory-helper")
            })?;
        Some(MemoryConfig {
            helper,
            default_image: args.default_image.clone(),
            default_image_mib: args.default_image_mib,
            default_private_mib: args.default_private_mib,
            die_with_parent: args.memory_dies_with_standin,
        })
    } else {
        None
    };
    let cfg = StandinConfig {
        role: if args.handler_only {
            standin::Role::Handler
        } else {
            standin::Role::Full
        },
        namespace: args.namespace.clone(),
        bandwidth_bytes_per_sec: args.bandwidth_bytes_per_sec,
        time_scale: args.time_scale,
        unschedulable_timeout: Duration::from_secs_f64(args.unschedulable_timeout_secs),
        resync: Duration::from_secs_f64(args.resync_secs),
        memory,
        ..Default::default()
    };
    tracing::info!(?cfg, "kubevirt-standin starting");
    tokio::select! {
        r = standin::run(client, cfg) => r,
        _ = tokio::signal::ctrl_c() => Ok(()),
    }
}
