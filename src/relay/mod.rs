//! The migration relay: a pair of relays between the source and the target of a QEMU live
//! migration that sends references instead of bytes for the memory regions the target node
//! already holds, and rebuilds on the target exactly the stream QEMU would have received.
//!
//! - [`stream`]: QEMU's migration stream (main channel, multifd channels), parsed and
//!   re-emitted byte for byte; where a region becomes a reference.
//! - [`protocol`]: the frames between the relays.
//! - [`rebuild`]: where the target rebuilds a region, verified, or asks for its bytes.
//! - [`store`]: the target node's index of region identities to process memory.
//! - [`source`], [`target`]: the two ends; [`tls`]: mutual TLS; [`net`]: sockets.
//! - [`intercept`]: how KubeVirt's migration connections reach the source relay (nftables in
//!   virt-handler's network namespace, owned by the agent so that it never outlives it).
//!
//! Everything but `source`, `target` and `net` is plain Rust without I/O. The relay knows no
//! Kubernetes types.

pub mod intercept;
pub mod net;
pub mod path;
pub mod protocol;
pub mod rebuild;
pub mod routes;
pub mod source;
pub mod stats;
pub mod store;
pub mod stream;
pub mod target;
pub mod tls;

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};

use crate::telemetry::{self, LogFormat, Readiness};
use protocol::{Frame, ProtocolError};

#[derive(Debug, thiserror::Error)]
pub enum RelayError {
    #[error("bad argument: {0}")]
    Argument(String),
    #[error("TLS: {0}")]
    Tls(String),
    #[error("listen on {addr}: {source}")]
    Listen {
        addr: String,
        source: std::io::Error,
    },
    #[error("accept: {0}")]
    Accept(std::io::Error),
    #[error("peer relay: {0}")]
    Peer(String),
    #[error("relay protocol: {0}")]
    Protocol(String),
    #[error("QEMU connection: {0}")]
    Qemu(std::io::Error),
    #[error(transparent)]
    Agent(#[from] crate::agent::AgentError),
    #[error(transparent)]
    Intercept(#[from] intercept::InterceptError),
}

impl RelayError {
    pub fn peer_io(e: std::io::Error) -> Self {
        RelayError::Peer(e.to_string())
    }
}

impl From<ProtocolError> for RelayError {
    fn from(e: ProtocolError) -> Self {
        RelayError::Protocol(e.to_string())
    }
}

/// Reads frames from a byte stream.
pub struct FrameReader<R> {
    inner: R,
    buf: Vec<u8>,
    start: usize,
}

impl<R: AsyncRead + Unpin> FrameReader<R> {
    pub fn new(inner: R) -> Self {
        Self {
            inner,
            buf: Vec::with_capacity(1 << 20),
            start: 0,
        }
    }

    /// Whether a whole frame is already buffered (so reading it will not wait).
    pub fn has_frame(&self) -> bool {
        matches!(Frame::decode(&self.buf[self.start..]), Ok(Some(_)))
    }

    /// The next frame, or `None` at a clean end of the stream.
    pub async fn next(&mut self) -> Result<Option<Frame>, RelayError> {
        loop {
            if let Some((frame, used)) = Frame::decode(&self.buf[self.start..])? {
                self.start += used;
                if self.start == self.buf.len() {
                    self.buf.clear();
                    self.start = 0;
                }
                return Ok(Some(frame));
            }
            if self.start > 0 {
                self.buf.drain(..self.start);
                self.start = 0;
            }
            let mut chunk = [0u8; 64 << 10];
            let n = self
                .inner
                .read(&mut chunk)
                .await
                .map_err(RelayError::peer_io)?;
            if n == 0 {
                if self.buf.is_empty() {
                    return Ok(None);
                }
                return Err(RelayError::Peer(
                    "the connection ended inside a frame".into(),
                ));
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// One frame for the writer: encoded bytes, then (for data) the bytes themselves, so a large
/// payload is never copied into its frame.
pub type Outgoing = (Vec<u8>, Vec<u8>);

/// Writes frames in order; flushes when no more are queued; closes the writing side when
/// every sender is gone.
pub async fn write_frames(
    mut rx: tokio::sync::mpsc::Receiver<Outgoing>,
    mut w: impl AsyncWrite + Unpin,
) -> Result<(), RelayError> {
    while let Some((head, body)) = rx.recv().await {
        w.write_all(&head).await.map_err(RelayError::peer_io)?;
        if !body.is_empty() {
            w.write_all(&body).await.map_err(RelayError::peer_io)?;
        }
        if rx.is_empty() {
            w.flush().await.map_err(RelayError::peer_io)?;
        }
    }
    w.flush().await.map_err(RelayError::peer_io)?;
    let _ = w.shutdown().await;
    Ok(())
}

#[derive(Debug, clap::Args)]
pub struct RelayArgs {
    #[command(subcommand)]
    pub side: Side,
}

#[derive(Debug, clap::Subcommand)]
pub enum Side {
    /// The source node's end: accepts QEMU's outgoing migration connections.
    Source(SourceArgs),
    /// The target node's end: rebuilds the stream and delivers it to the target QEMU.
    Target(TargetArgs),
}

#[derive(Debug, clap::Args)]
pub struct CommonArgs {
    #[command(flatten)]
    pub tls: tls::TlsArgs,
    /// Append one JSON object per migration to this file.
    #[arg(long, env = "COMMONGROUND_RELAY_STATS_JSON")]
    pub stats_json: Option<PathBuf>,
    /// The cluster key (32 hex characters) that keys region identities; both relays need the
    /// same. Without it the development key is used.
    #[arg(long, env = "COMMONGROUND_CLUSTER_KEY_FILE")]
    pub cluster_key_file: Option<PathBuf>,
    /// Region size in 4 KiB pages (the cluster's geometry; both relays need the same).
    #[arg(long, env = "COMMONGROUND_REGION_PAGES", default_value_t = crate::plan::region::DEFAULT_REGION_PAGES)]
    pub region_pages: u32,
    /// Serve /healthz, /readyz and /metrics here.
    #[arg(long, env = "COMMONGROUND_HEALTH_ADDR")]
    pub health_addr: Option<SocketAddr>,
    #[arg(long, env = "COMMONGROUND_LOG_FORMAT", value_enum, default_value_t = LogFormat::Plain)]
    pub log_format: LogFormat,
}

#[derive(Debug, clap::Args)]
pub struct SourceArgs {
    /// Where QEMU's migration connections arrive (HOST:PORT or unix:PATH).
    #[arg(long)]
    pub listen: String,
    /// The target relay (HOST:PORT).
    #[arg(
        long,
        required_unless_present = "intercept_netns",
        conflicts_with = "intercept_netns"
    )]
    pub target_relay: Option<String>,
    /// The target QEMU's incoming address, which the target relay connects to.
    #[arg(
        long,
        required_unless_present = "intercept_netns",
        conflicts_with = "intercept_netns"
    )]
    pub deliver_to: Option<String>,
    /// Another address of the target relay, on an extra network path (HOST:PORT): the
    /// migration's connections are spread over --target-relay and these. Repeatable.
    #[arg(long, conflicts_with = "intercept_netns")]
    pub extra_path: Vec<String>,
    /// Intercept instead: listen (on --listen, a local HOST:PORT) inside this network
    /// namespace (`/proc/PID/ns/net` of virt-handler, or `/run/netns/NAME`), and redirect there
    /// the connections to each --route destination, for as long as this process lives.
    #[arg(long, requires = "route")]
    pub intercept_netns: Option<PathBuf>,
    /// With --intercept-netns: DEST=RELAY[,RELAY...], connections to DEST (HOST:PORT, the
    /// target virt-handler's migration port) go through the target relay RELAY (IP:PORT) and
    /// are delivered to DEST. Further RELAYs are the same target relay's addresses on extra
    /// network paths: the migration's connections are spread over them. Repeatable.
    #[arg(long, requires = "intercept_netns")]
    pub route: Vec<String>,
    /// The nft program that holds the interception rules.
    #[arg(long, default_value = "nft")]
    pub nft: String,
    /// With --intercept-netns: each destination is redirected for at most this long unless
    /// renewed (seconds; renewed at half of it while this process lives).
    #[arg(long, default_value_t = 600, value_parser = clap::value_parser!(u64).range(2..=86400))]
    pub redirect_timeout: u64,
    /// The name the target relay's certificate must carry.
    #[arg(long, default_value = tls::DEFAULT_SERVER_NAME)]
    pub tls_server_name: String,
    /// MiB of referenced pages kept for resends before reading from QEMU pauses (1 to 16384;
    /// never less than two regions).
    #[arg(long, default_value_t = 64, value_parser = clap::value_parser!(u64).range(1..=16384))]
    pub window_mib: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

#[derive(Debug, clap::Args)]
pub struct TargetArgs {
    /// Where source relays connect (HOST:PORT).
    #[arg(long)]
    pub listen: String,
    /// QEMU processes whose guest memory is the store.
    #[arg(long = "store-pid", num_args = 1.., conflicts_with = "store_node")]
    pub store_pids: Vec<i32>,
    /// Index every KubeVirt QEMU process of this host (the node named here).
    #[arg(long, env = "NODE_NAME")]
    pub store_node: Option<String>,
    /// Re-index the store for a migration if the last index is older than this (seconds).
    #[arg(long, default_value_t = 10)]
    pub store_max_age: u64,
    #[command(flatten)]
    pub common: CommonArgs,
}

struct Started {
    namer: Arc<stream::RegionNamer>,
    metrics: stats::RelayMetrics,
    ready: Readiness,
}

async fn start(common: &CommonArgs) -> Result<Started, RelayError> {
    telemetry::init_logging(common.log_format);
    crate::plan::region::RegionGeometry::new(common.region_pages)
        .map_err(|e| RelayError::Argument(e.to_string()))?;
    let key = crate::agent::load_key(common.cluster_key_file.as_deref())?;
    let registry = prometheus::Registry::new();
    let metrics = stats::RelayMetrics::new(&registry);
    let ready = Readiness::default();
    if let Some(addr) = common.health_addr {
        let listener =
            tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| RelayError::Listen {
                    addr: addr.to_string(),
                    source: e,
                })?;
        let app = telemetry::health_routes(registry, ready.clone());
        tokio::spawn(async move {
            let _ = axum::serve(listener, app).await;
        });
    }
    Ok(Started {
        namer: Arc::new(stream::RegionNamer::new(key, common.region_pages)),
        metrics,
        ready,
    })
}

/// The agent's relay role: a target relay over this node's VMs, serving in the background.
/// Returns what the node advertises in its digest.
pub struct NodeRelay {
    pub listen: String,
    pub advertise: String,
    pub tls: tls::TlsArgs,
    pub region_pages: u32,
    pub node: String,
    pub process_node_arg: Option<String>,
}

/// What the agent needs to open the relay in KubeVirt's path later (see [`path`]).
#[derive(Clone)]
pub struct NodeRelayParts {
    pub target: Arc<target::TargetConfig>,
    pub source: path::SourceParts,
}

pub async fn start_node_target(
    relay: NodeRelay,
    key: crate::plan::region::ClusterKey,
    registry: &prometheus::Registry,
) -> Result<(crate::api::digest::RelayEndpoint, NodeRelayParts), RelayError> {
    let NodeRelay {
        listen,
        advertise,
        tls,
        region_pages,
        node,
        process_node_arg,
    } = relay;
    let endpoint = net::Endpoint::parse(&listen)?;
    net::Endpoint::parse(&advertise)?;
    let namer = Arc::new(stream::RegionNamer::new(key, region_pages));
    let metrics = stats::RelayMetrics::new(registry);
    let config = Arc::new(target::TargetConfig {
        acceptor: tokio_rustls::TlsAcceptor::from(tls::server_config(&tls)?),
        namer: namer.clone(),
        store_source: target::StoreSource::Node {
            node,
            process_node_arg,
        },
        store_max_age: Duration::from_secs(10),
        stats_json: None,
        metrics: metrics.clone(),
        deliver_netns: None,
    });
    let parts = NodeRelayParts {
        target: config.clone(),
        source: path::SourceParts {
            connector: tokio_rustls::TlsConnector::from(tls::client_config(&tls)?),
            server_name: tls::server_name(tls::DEFAULT_SERVER_NAME)?,
            window_kib: source::window_kib(64, namer.region_bytes()),
            namer,
            metrics,
            observed: stats::PeerRates::default(),
        },
    };
    let listener = net::Listener::bind(&endpoint).await?;
    tracing::info!(listen = %listener.local_addr(), advertise = %advertise, "relay target ready");
    tokio::spawn(async move {
        if let Err(e) = target::serve(listener, config).await {
            tracing::error!(error = %e, "relay target stopped");
        }
    });
    Ok((
        crate::api::digest::RelayEndpoint {
            address: advertise,
            protocol_version: protocol::PROTOCOL_VERSION as u32,
            region_pages,
            in_migration_path: false,
        },
        parts,
    ))
}

/// The interception set up from the command line: the listener inside the namespace, the
/// routes, and the table, renewed in the background while it lives.
fn intercept_from_args(
    a: &SourceArgs,
    ns: &std::path::Path,
) -> Result<
    (
        net::Listener,
        routes::Routes,
        Arc<std::sync::Mutex<intercept::OwnedTable>>,
    ),
    RelayError,
> {
    let netns = intercept::NetNs(ns.to_path_buf());
    let listen: SocketAddr = a
        .listen
        .parse()
        .map_err(|_| RelayError::Argument(format!("--listen {:?}: give HOST:PORT", a.listen)))?;
    let table_routes = routes::InterceptRoutes::new(netns.clone());
    let mut dests = Vec::new();
    for r in &a.route {
        let (dest, relay) = r.split_once('=').ok_or_else(|| {
            RelayError::Argument(format!("--route {r:?}: give DEST=RELAY[,RELAY...]"))
        })?;
        let dest: SocketAddr = dest
            .parse()
            .map_err(|_| RelayError::Argument(format!("--route {r:?}: DEST is not HOST:PORT")))?;
        let mut relays = Vec::new();
        for relay in relay.split(',') {
            let relay: SocketAddr = relay.parse().map_err(|_| {
                RelayError::Argument(format!("--route {r:?}: RELAY {relay:?} is not IP:PORT"))
            })?;
            relays.push(relay.to_string());
        }
        let first = relays.remove(0);
        table_routes.register(dest, &dest.to_string(), &first, &relays);
        dests.push(dest);
    }
    let std_listener = netns.listen(listen)?;
    let port = std_listener
        .local_addr()
        .map(|a| a.port())
        .unwrap_or(listen.port());
    let listener = net::Listener::Tcp(tokio::net::TcpListener::from_std(std_listener).map_err(
        |e| RelayError::Listen {
            addr: a.listen.clone(),
            source: e,
        },
    )?);
    let timeout = Duration::from_secs(a.redirect_timeout);
    let mut table = intercept::OwnedTable::create(&netns, &a.nft, port)?;
    table.redirect(&dests, timeout)?;
    let table = Arc::new(std::sync::Mutex::new(table));
    let renew = Arc::downgrade(&table);
    std::thread::spawn(move || loop {
        std::thread::sleep(timeout / 2);
        let Some(t) = renew.upgrade() else { return };
        let renewed = t.lock().expect("table lock").redirect(&dests, timeout);
        if let Err(e) = renewed {
            tracing::error!(error = %e, "cannot renew the redirects; connections go direct once they expire");
        }
    });
    Ok((listener, routes::Routes::Intercepted(table_routes), table))
}

pub async fn run(args: RelayArgs) -> Result<(), RelayError> {
    match args.side {
        Side::Source(a) => {
            let started = start(&a.common).await?;
            let (listener, routes, table) = match &a.intercept_netns {
                Some(ns) => {
                    let (listener, routes, table) = intercept_from_args(&a, ns)?;
                    (listener, routes, Some(table))
                }
                None => {
                    let endpoint = net::Endpoint::parse(&a.listen)?;
                    let (Some(target_relay), Some(deliver_to)) = (&a.target_relay, &a.deliver_to)
                    else {
                        return Err(RelayError::Argument(
                            "give --target-relay and --deliver-to, or --intercept-netns".into(),
                        ));
                    };
                    let route = routes::Route {
                        migration: String::new(),
                        target_relay: target_relay.clone(),
                        extra_paths: a.extra_path.clone(),
                        deliver_to: net::Endpoint::parse(deliver_to)?,
                    };
                    (
                        net::Listener::bind(&endpoint).await?,
                        routes::Routes::Fixed(route),
                        None,
                    )
                }
            };
            let config = Arc::new(source::SourceConfig {
                routes,
                server_name: tls::server_name(&a.tls_server_name)?,
                connector: tokio_rustls::TlsConnector::from(tls::client_config(&a.common.tls)?),
                window_kib: source::window_kib(a.window_mib, started.namer.region_bytes()),
                namer: started.namer,
                stats_json: a.common.stats_json.clone(),
                metrics: started.metrics,
                observed: stats::PeerRates::default(),
            });
            tracing::info!(listen = %listener.local_addr(), target_relay = ?a.target_relay, deliver_to = ?a.deliver_to, intercept_netns = ?a.intercept_netns, routes = a.route.len(), "relay source ready");
            started.ready.set(true);
            let result = tokio::select! {
                r = source::serve(listener, config) => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            };
            // The redirects end with the table (and, if this process is killed instead, with
            // its nft child).
            drop(table);
            result
        }
        Side::Target(a) => {
            let started = start(&a.common).await?;
            let store_source = match (&a.store_node, a.store_pids.is_empty()) {
                (_, false) => target::StoreSource::Pids(a.store_pids.clone()),
                (Some(node), true) => target::StoreSource::Node {
                    node: node.clone(),
                    process_node_arg: None,
                },
                (None, true) => {
                    return Err(RelayError::Argument(
                        "give --store-pid PID... or --store-node NODE".into(),
                    ))
                }
            };
            let endpoint = net::Endpoint::parse(&a.listen)?;
            let config = Arc::new(target::TargetConfig {
                acceptor: tokio_rustls::TlsAcceptor::from(tls::server_config(&a.common.tls)?),
                namer: started.namer,
                store_source,
                store_max_age: Duration::from_secs(a.store_max_age),
                stats_json: a.common.stats_json.clone(),
                metrics: started.metrics,
                deliver_netns: None,
            });
            let listener = net::Listener::bind(&endpoint).await?;
            tracing::info!(listen = %listener.local_addr(), "relay target ready");
            started.ready.set(true);
            tokio::select! {
                r = target::serve(listener, config) => r,
                _ = tokio::signal::ctrl_c() => Ok(()),
            }
        }
    }
}
