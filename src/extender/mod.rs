//! `commonground extender`: the kube-scheduler extender that places every KubeVirt migration
//! target pod (node drains, evictions, `virtctl migrate`, our own migrations) by memory in
//! common, work-group distance and load, with the same planning core the controller uses.
//!
//! - [`wire`]: the `k8s.io/kube-scheduler/extender/v1` JSON types.
//! - [`migration_pod`]: is a pod a migration target, and of which VMI.
//! - [`placement`]: pass through, neutral, or planned; shared by both verbs.
//! - [`filter`], [`prioritize`]: the two verbs.
//! - [`state`]: the planner and lookups the handlers read, rebuilt from the watch-fed view.
//! - [`server`]: HTTP(S), limits and timeouts; [`metrics`]: Prometheus counters.

pub mod filter;
#[doc(hidden)]
pub mod fixtures;
pub mod metrics;
pub mod migration_pod;
pub mod placement;
pub mod prioritize;
pub mod server;
pub mod state;
pub mod wire;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use crate::telemetry::{LogFormat, Readiness};
use crate::view::{ClusterView, ViewArgs};

/// A request the extender cannot answer; the message goes back with a 400.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BadRequest(pub String);

#[derive(Debug, thiserror::Error)]
pub enum ExtenderError {
    #[error(transparent)]
    View(#[from] crate::view::args::ViewArgsError),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("--tls-cert and --tls-key must be given together")]
    TlsPair,
    #[error("connecting to the Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("registering metrics: {0}")]
    Metrics(#[from] prometheus::Error),
    #[error("serving on {0}: {1}")]
    Serve(SocketAddr, std::io::Error),
}

/// Flags of `commonground extender`; each also reads an environment variable (set by the chart).
#[derive(clap::Args, Debug, Clone)]
pub struct ExtenderArgs {
    /// Address to serve on.
    #[arg(long, env = "COMMONGROUND_LISTEN", default_value = "0.0.0.0:8888")]
    pub listen: SocketAddr,
    /// Path of the filter verb (`filterVerb` in the KubeSchedulerConfiguration).
    #[arg(long, env = "COMMONGROUND_FILTER_VERB", default_value = "filter")]
    pub filter_verb: String,
    /// Path of the prioritize verb (`prioritizeVerb`).
    #[arg(
        long,
        env = "COMMONGROUND_PRIORITIZE_VERB",
        default_value = "prioritize"
    )]
    pub prioritize_verb: String,
    /// PEM certificate chain; serve HTTPS (with --tls-key).
    #[arg(long, env = "COMMONGROUND_TLS_CERT")]
    pub tls_cert: Option<PathBuf>,
    /// PEM private key for --tls-cert.
    #[arg(long, env = "COMMONGROUND_TLS_KEY")]
    pub tls_key: Option<PathBuf>,
    #[command(flatten)]
    pub view: ViewArgs,
    #[arg(long, env = "COMMONGROUND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
    /// Largest request body accepted (413 above). With `nodeCacheCapable: false` the body
    /// holds every candidate Node object, so large clusters need room.
    #[arg(long, env = "COMMONGROUND_MAX_BODY_BYTES", default_value_t = 64 << 20)]
    pub max_body_bytes: usize,
    /// Milliseconds to wait for a request body (408 after); keep below kube-scheduler's
    /// `httpTimeout`.
    #[arg(long, env = "COMMONGROUND_REQUEST_TIMEOUT_MS", default_value_t = 4000)]
    pub request_timeout_ms: u64,
    /// Where migrations the extender places (drains, evictions, `virtctl migrate`) may go:
    /// `work-group` stays in the source's work group when it has a candidate; `cluster`
    /// applies the long-distance rule (the work group holding most of the VM's memory wins,
    /// and work groups within the sampling error of each other go to the nearest).
    #[arg(long, env = "COMMONGROUND_DEFAULT_SCOPE", value_enum, default_value_t = ScopeArg::WorkGroup)]
    pub default_scope: ScopeArg,
}

/// Runs the extender until SIGTERM or Ctrl-C.
/// `--default-scope` values.
#[derive(clap::ValueEnum, Clone, Copy, Debug, PartialEq, Eq)]
pub enum ScopeArg {
    WorkGroup,
    Cluster,
}

impl From<ScopeArg> for crate::plan::planner::Scope {
    fn from(s: ScopeArg) -> Self {
        match s {
            ScopeArg::WorkGroup => Self::WorkGroup,
            ScopeArg::Cluster => Self::Cluster,
        }
    }
}

pub async fn run(args: ExtenderArgs) -> Result<(), ExtenderError> {
    crate::telemetry::init_logging(args.log_format);
    let view_config = args.view.config()?;
    let tls = match (&args.tls_cert, &args.tls_key) {
        (Some(cert), Some(key)) => Some(server::tls_config(cert, key)?),
        (None, None) => None,
        _ => return Err(ExtenderError::TlsPair),
    };
    let client = crate::api::client::connect("extender", None).await?;
    let view = ClusterView::start(client, view_config);
    let ready = Readiness::default();
    let live = state::LiveState::spawn(
        view,
        args.default_scope.into(),
        Duration::from_millis(100),
        ready.clone(),
    );
    let metrics = Arc::new(metrics::ExtenderMetrics::new()?);
    let config = server::ServerConfig {
        filter_verb: args.filter_verb,
        prioritize_verb: args.prioritize_verb,
        max_body_bytes: args.max_body_bytes,
        request_timeout: Duration::from_millis(args.request_timeout_ms),
        ..server::ServerConfig::default()
    };
    let router = server::router(Arc::new(live), metrics, &config, ready);
    let listener = std::net::TcpListener::bind(args.listen)
        .map_err(|e| ExtenderError::Serve(args.listen, e))?;
    server::serve(
        router,
        listener,
        tls,
        config.header_timeout,
        crate::telemetry::shutdown_signal(),
    )
    .await
}
