//! `commonground controller`: reconciles `VirtualMachineMigration` objects into KubeVirt live
//! migrations. Leader-elected; only the leader reconciles and writes status.

pub mod backoff;
pub mod context;
pub mod decide;
pub mod error;
#[cfg(test)]
pub mod fake_api;
pub mod groups;
pub mod guard;
pub mod keys;
pub mod kubevirt;
pub mod labels;
pub mod leader;
pub mod links;
pub mod metrics;
pub mod migration;
pub mod paths;
pub mod rebalance;
#[cfg(test)]
mod reconcile_tests;
pub mod republish;
pub mod status;
pub mod validate;

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use futures::StreamExt;
use kube::runtime::controller::Controller;
use kube::runtime::reflector::ObjectRef;
use kube::runtime::watcher;
use kube::{Api, Client, ResourceExt};

pub use self::context::Context;
use self::error::{ControllerError, Result};
use self::leader::{LeaderElector, LeaseConfig};
use self::metrics::ControllerMetrics;
use self::status::TransferModel;
use crate::api::kubevirt::VirtualMachineInstance;
use crate::api::VirtualMachineMigration;
use crate::telemetry::{self, LogFormat, Readiness};
use crate::view::{ClusterView, ViewArgs};

#[derive(clap::Args, Debug, Clone)]
pub struct ControllerArgs {
    /// Address of /healthz, /readyz and /metrics.
    #[arg(long, env = "COMMONGROUND_HEALTH_ADDR", default_value = "0.0.0.0:8080")]
    pub health_addr: SocketAddr,
    #[command(flatten)]
    pub view: ViewArgs,
    /// Bytes per second of the default migration network, for time estimates.
    #[arg(
        long,
        env = "COMMONGROUND_MIGRATION_BANDWIDTH",
        default_value_t = 1.25e9
    )]
    pub migration_bandwidth: f64,
    /// How long a node-to-node rate measured by the relays stands in for
    /// `--migration-bandwidth` after the migration it was measured on (a Go duration such as
    /// `1h` or `30m`; above zero). An older measurement may describe a network that has
    /// changed since, so the configured rate is used again.
    #[arg(
        long,
        env = "COMMONGROUND_MEASURED_RATE_MAX_AGE",
        default_value = "1h",
        value_parser = positive_duration
    )]
    pub measured_rate_max_age: Duration,
    /// Downtime limit of the stop-and-copy phase, for time estimates.
    #[arg(long, env = "COMMONGROUND_DOWNTIME_LIMIT_MS", default_value_t = 300.0)]
    pub downtime_limit_ms: f64,
    /// CPU cores a target needs per Gbit/s of an extra migration path.
    #[arg(long, env = "COMMONGROUND_CORES_PER_GBPS", default_value_t = 0.25)]
    pub cores_per_gbps: f64,
    /// Namespace of the leader-election Lease.
    #[arg(long, env = "COMMONGROUND_LEASE_NAMESPACE", default_value = "default")]
    pub lease_namespace: String,
    #[arg(
        long,
        env = "COMMONGROUND_LEASE_NAME",
        default_value = "commonground-controller"
    )]
    pub lease_name: String,
    /// This replica's identity in the Lease (the pod name from the downward API).
    #[arg(long, env = "POD_NAME")]
    pub identity: Option<String>,
    /// Run without leader election (a single replica).
    #[arg(long, env = "COMMONGROUND_NO_LEADER_ELECTION")]
    pub no_leader_election: bool,
    /// Directory of the accepted cluster keys (the chart mounts the cluster key Secret here):
    /// `key`, and during a rotation `previous`. NodeRegionDigests made under any other key
    /// get `KeyAccepted=False`, a Warning Event and a metric. Without it, the key most
    /// digests use is the accepted one.
    #[arg(long, env = "COMMONGROUND_CLUSTER_KEY_DIR")]
    pub cluster_key_dir: Option<std::path::PathBuf>,
    #[arg(
        long,
        env = "COMMONGROUND_LOG_FORMAT",
        value_enum,
        default_value = "plain"
    )]
    pub log_format: LogFormat,
}

/// A flag's Go duration (`90s`, `1h30m`), refused when zero.
fn positive_duration(text: &str) -> std::result::Result<Duration, String> {
    match crate::view::quantity::duration(text) {
        Ok(d) if d.is_zero() => Err(format!("{text:?} is zero; give a duration above zero")),
        Ok(d) => Ok(d),
        Err(e) => Err(e.to_string()),
    }
}

pub async fn run(args: ControllerArgs) -> Result<()> {
    telemetry::init_logging(args.log_format);
    let view_config = args
        .view
        .config()
        .map_err(|e| ControllerError::Config(e.to_string()))?;
    let client = crate::api::client::connect("controller", None).await?;

    // A clear exit with an install hint when the CRDs are missing.
    let vmms: Api<VirtualMachineMigration> = Api::all(client.clone());
    if let Err(e) = vmms.list(&kube::api::ListParams::default().limit(1)).await {
        return Err(ControllerError::CrdsMissing(e.to_string()));
    }

    let metrics = ControllerMetrics::new();
    let ready = Readiness::default();
    {
        let (registry, ready) = (metrics.registry.clone(), ready.clone());
        let addr = args.health_addr;
        tokio::spawn(async move {
            if let Err(e) = telemetry::serve_health(addr, registry, ready).await {
                tracing::error!(error = %e, "health server failed");
            }
        });
    }

    let identity = args
        .identity
        .clone()
        .unwrap_or_else(|| format!("{}-{}", hostname(), std::process::id()));
    let elector = (!args.no_leader_election).then(|| {
        LeaderElector::new(
            client.clone(),
            LeaseConfig {
                namespace: args.lease_namespace.clone(),
                name: args.lease_name.clone(),
                identity: identity.clone(),
                duration: Duration::from_secs(15),
                renew_deadline: Duration::from_secs(10),
                renew_every: Duration::from_secs(2),
            },
        )
    });
    if let Some(e) = &elector {
        tokio::select! {
            r = e.acquire() => r?,
            _ = telemetry::shutdown_signal() => return Ok(()),
        }
    }

    let view = ClusterView::start(client.clone(), view_config);
    view.wait_ready().await;
    ready.set(true);
    tracing::info!("caches synced; reconciling");

    let ctx = Arc::new(Context::new(
        client.clone(),
        view.clone(),
        metrics,
        identity,
        TransferModel {
            bandwidth: args.migration_bandwidth,
            downtime_limit_ms: args.downtime_limit_ms,
            cores_per_gbps: args.cores_per_gbps,
            measured_rate_max_age: args.measured_rate_max_age,
        },
    ));

    let controller = reconcilers(client, view, ctx, args.cluster_key_dir.clone());

    match &elector {
        Some(e) => {
            tokio::select! {
                _ = controller => { e.release().await; Ok(()) }
                err = e.keep() => Err(err),
            }
        }
        None => {
            controller.await;
            Ok(())
        }
    }
}

/// The reconcilers, run together until shutdown: RebalancePolicies; VirtualMachineMigrations,
/// woken also by their KubeVirt migrations and by changes of the VMIs they name; and KubeVirt
/// migrations, whose success republishes the two nodes' digests; and the digests' key check.
async fn reconcilers(
    client: Client,
    view: ClusterView,
    ctx: Arc<Context>,
    cluster_key_dir: Option<std::path::PathBuf>,
) {
    let key_check = keys::run(ctx.clone(), cluster_key_dir);
    let rebalancer = Controller::new(
        Api::<crate::api::RebalancePolicy>::all(client.clone()),
        watcher::Config::default().any_semantic(),
    )
    .graceful_shutdown_on(telemetry::shutdown_signal())
    .run(
        |policy, ctx| guard::guarded(policy, ctx, rebalance::reconcile),
        guard::error_policy,
        ctx.clone(),
    )
    .for_each(|_| async {});
    // The requests, their KubeVirt migrations and the VMIs are followed through the view's
    // own watches: each kind is watched once, whoever reconciles on it.
    let vmm_store = view.vmms.clone();
    let controller = Controller::for_shared_stream(view.vmm_changes(), view.vmms.clone())
        .owns_shared_stream(view.vmim_changes())
        .watches_shared_stream(
            view.vmi_changes(),
            move |vmi: Arc<VirtualMachineInstance>| {
                // A VMI change wakes the requests that name it.
                let ns = vmi.namespace().unwrap_or_default();
                let name = vmi.name_any();
                vmm_store
                    .state()
                    .into_iter()
                    .filter(|m| m.namespace().as_deref() == Some(&ns) && m.spec.vmi_name == name)
                    .map(|m| ObjectRef::from_obj(&*m))
                    .collect::<Vec<_>>()
            },
        )
        .graceful_shutdown_on(telemetry::shutdown_signal())
        .run(
            |vmm, ctx| guard::guarded(vmm, ctx, migration::reconcile),
            guard::error_policy,
            ctx.clone(),
        )
        .for_each(|result| async move {
            if let Err(e) = result {
                tracing::debug!(error = %e, "reconcile");
            }
        });
    // Every KubeVirt migration that succeeds, whoever started it, republishes the digests.
    let republisher = Controller::for_shared_stream(view.vmim_changes(), view.vmims.clone())
        .graceful_shutdown_on(telemetry::shutdown_signal())
        .run(
            |vmim, ctx| guard::guarded(vmim, ctx, republish::reconcile_kubevirt_migration),
            guard::error_policy,
            ctx,
        )
        .for_each(|_| async {});
    tokio::join!(controller, rebalancer, republisher, key_check);
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "commonground".into())
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        controller: ControllerArgs,
    }

    #[test]
    fn measured_rates_are_used_for_an_hour_unless_told_otherwise() {
        let cli = Cli::try_parse_from(["x"]).unwrap();
        assert_eq!(
            cli.controller.measured_rate_max_age,
            Duration::from_secs(3600)
        );
        let cli = Cli::try_parse_from(["x", "--measured-rate-max-age=1h30m"]).unwrap();
        assert_eq!(
            cli.controller.measured_rate_max_age,
            Duration::from_secs(5400)
        );
    }

    #[test]
    fn a_zero_or_malformed_maximum_age_is_refused() {
        for bad in ["0s", "0", "an hour", "-1h", ""] {
            let err = Cli::try_parse_from(["x", &format!("--measured-rate-max-age={bad}")])
                .err()
                .unwrap_or_else(|| panic!("{bad:?} accepted"));
            assert!(
                err.to_string().contains("--measured-rate-max-age"),
                "{bad:?}: {err}"
            );
        }
    }
}
