//! The relay pair in KubeVirt's migration path on one node: both ends opened inside the node's
//! virt-handler network namespace, and the interception table there. The agent decides which
//! destinations to take (`agent::migration_path`); this applies it.
//!
//! - The source end listens on `127.0.0.1:<intercept port>` in that namespace and receives the
//!   outgoing migration connections the table redirects to it.
//! - The target end listens on `<every address>:<relay port>` in that namespace, so a source
//!   relay reaches it at the target virt-handler's own address, over the network virt-handler
//!   uses, and delivers from there to the target virt-handler's port.
//!
//! Dropping the [`NodePath`] stops both ends and drops the table (see
//! [`super::intercept::owned_table`]): every connection after that goes direct.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use super::intercept::{NetNs, OwnedTable};
use super::net::Listener;
use super::routes::{InterceptRoutes, Routes};
use super::source::SourceConfig;
use super::target::TargetConfig;
use super::RelayError;

/// Ports and tools of the path.
#[derive(Clone, Debug)]
pub struct PathConfig {
    /// Where the target end listens in virt-handler's namespace, on every address.
    pub relay_port: u16,
    /// Where the source end listens, on 127.0.0.1 in virt-handler's namespace.
    pub intercept_port: u16,
    pub nft: String,
    /// How long a destination stays redirected unless renewed.
    pub redirect_timeout: Duration,
}

/// The pieces of the source end's configuration that do not depend on the namespace.
#[derive(Clone)]
pub struct SourceParts {
    pub connector: tokio_rustls::TlsConnector,
    pub server_name: rustls::pki_types::ServerName<'static>,
    pub namer: Arc<super::stream::RegionNamer>,
    pub window_kib: u32,
    pub metrics: super::stats::RelayMetrics,
    /// Where the source end keeps the rates it observes (shared with the agent).
    pub observed: super::stats::PeerRates,
}

/// The path, open in one virt-handler's namespace.
pub struct NodePath {
    handler_pid: i32,
    config: PathConfig,
    table: OwnedTable,
    source: Arc<SourceConfig>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
    /// Destination -> (migration, target relay), as applied.
    current: BTreeMap<SocketAddr, (String, String)>,
}

impl NodePath {
    /// Opens both ends and the table in the namespace of process `handler_pid`. Must run in a
    /// tokio runtime (the listeners are registered with it).
    pub fn open(
        handler_pid: i32,
        config: PathConfig,
        source: SourceParts,
        target: &TargetConfig,
    ) -> Result<Self, RelayError> {
        let netns = NetNs::of_process(handler_pid);
        let source_listener =
            netns.listen(SocketAddr::from(([127, 0, 0, 1], config.intercept_port)))?;
        let target_listener = netns.listen(SocketAddr::from(([0, 0, 0, 0], config.relay_port)))?;
        let table = OwnedTable::create(&netns, &config.nft, config.intercept_port)?;
        let to_tokio = |l: std::net::TcpListener, port: u16| {
            tokio::net::TcpListener::from_std(l)
                .map(Listener::Tcp)
                .map_err(|e| RelayError::Listen {
                    addr: format!("port {port} in {}", netns.path().display()),
                    source: e,
                })
        };
        let source_config = Arc::new(SourceConfig {
            routes: Routes::Intercepted(InterceptRoutes::new(netns.clone())),
            server_name: source.server_name,
            connector: source.connector,
            namer: source.namer,
            window_kib: source.window_kib,
            stats_json: None,
            metrics: source.metrics,
            observed: source.observed,
        });
        let target_config = Arc::new(TargetConfig {
            acceptor: target.acceptor.clone(),
            namer: target.namer.clone(),
            store_source: target.store_source.clone(),
            store_max_age: target.store_max_age,
            stats_json: None,
            metrics: target.metrics.clone(),
            deliver_netns: Some(netns.clone()),
        });
        let source_listener = to_tokio(source_listener, config.intercept_port)?;
        let target_listener = to_tokio(target_listener, config.relay_port)?;
        let s = source_config.clone();
        let tasks = vec![
            tokio::spawn(async move {
                if let Err(e) = super::source::serve(source_listener, s).await {
                    tracing::error!(error = %e, "relay source in virt-handler's namespace stopped");
                }
            }),
            tokio::spawn(async move {
                if let Err(e) = super::target::serve(target_listener, target_config).await {
                    tracing::error!(error = %e, "relay target in virt-handler's namespace stopped");
                }
            }),
        ];
        tracing::info!(
            handler_pid,
            relay_port = config.relay_port,
            intercept_port = config.intercept_port,
            "relay in KubeVirt's migration path"
        );
        Ok(NodePath {
            handler_pid,
            config,
            table,
            source: source_config,
            tasks,
            current: BTreeMap::new(),
        })
    }

    /// The virt-handler process whose namespace this path is in.
    pub fn handler_pid(&self) -> i32 {
        self.handler_pid
    }

    /// The destinations taken now: destination -> (migration, target relay).
    pub fn current(&self) -> &BTreeMap<SocketAddr, (String, String)> {
        &self.current
    }

    /// Takes `add` (destination, migration, target relay) and lets `remove` go. A route is
    /// registered before its redirect, and unregistered after it, so no redirected connection
    /// ever finds no route. Blocks for as long as `nft` takes (milliseconds).
    pub fn apply(
        &mut self,
        add: &[(SocketAddr, String, String)],
        remove: &[SocketAddr],
    ) -> Result<(), RelayError> {
        let routes = self
            .source
            .routes
            .intercepted()
            .expect("the path's source routes are intercepted");
        if !add.is_empty() {
            for (dest, migration, relay) in add {
                routes.register(*dest, migration, relay, &[]);
            }
            let dests: Vec<SocketAddr> = add.iter().map(|(d, _, _)| *d).collect();
            self.table.redirect(&dests, self.config.redirect_timeout)?;
            for (dest, migration, relay) in add {
                tracing::info!(%dest, migration, target_relay = relay, "migration taken into the relay path");
                self.current
                    .insert(*dest, (migration.clone(), relay.clone()));
            }
        }
        if !remove.is_empty() {
            self.table.release(remove)?;
            for dest in remove {
                routes.unregister(dest);
                self.current.remove(dest);
            }
        }
        Ok(())
    }

    /// Renews the redirects of every destination taken (they expire otherwise).
    pub fn renew(&mut self) -> Result<(), RelayError> {
        let dests: Vec<SocketAddr> = self.current.keys().copied().collect();
        if dests.is_empty() {
            return Ok(());
        }
        Ok(self.table.redirect(&dests, self.config.redirect_timeout)?)
    }
}

impl Drop for NodePath {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
        tracing::info!(
            handler_pid = self.handler_pid,
            "relay path closed; migrations go direct"
        );
    }
}
