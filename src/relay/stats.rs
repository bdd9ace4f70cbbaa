//! What one migration through a relay did: appended as one JSON line per migration to
//! `--stats-json`, and counted in Prometheus metrics.

use std::io::Write;
use std::path::Path;

use prometheus::{IntCounterVec, Opts, Registry};
use serde::Serialize;

/// One migration (every connection of it) on one side.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MigrationStats {
    pub side: &'static str,
    pub session: String,
    pub connections: u64,
    /// Source: bytes read from QEMU. Target: bytes delivered to QEMU (what it would have
    /// received directly).
    pub bytes_from_qemu: u64,
    /// Bytes of the relay-to-relay TCP connections, both directions, TLS included.
    pub bytes_on_wire: u64,
    pub regions_referenced: u64,
    pub regions_resent: u64,
    /// Why connections (or their tails) went byte for byte, one entry per connection that did.
    pub passthrough: Vec<String>,
    /// Connections that failed, and why.
    pub errors: Vec<String>,
    /// Target: what its content store indexed for this migration.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub store: Option<super::store::StoreCounts>,
    pub seconds: f64,
}

impl MigrationStats {
    /// Logs the migration and appends it to `stats_json`, if given.
    pub fn record(&self, stats_json: Option<&Path>) {
        tracing::info!(
            side = self.side,
            session = %self.session,
            connections = self.connections,
            bytes_from_qemu = self.bytes_from_qemu,
            bytes_on_wire = self.bytes_on_wire,
            regions_referenced = self.regions_referenced,
            regions_resent = self.regions_resent,
            "migration relayed"
        );
        if let Some(path) = stats_json {
            if let Err(e) = self.append_to(path) {
                tracing::warn!(path = %path.display(), error = %e, "cannot append relay statistics");
            }
        }
    }

    pub fn append_to(&self, path: &Path) -> std::io::Result<()> {
        let mut line = serde_json::to_vec(self).map_err(std::io::Error::other)?;
        line.push(b'\n');
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?
            .write_all(&line)
    }
}

/// A short, bounded label for a pass-through reason.
pub fn reason_kind(reason: &str) -> &'static str {
    let r = reason.to_ascii_lowercase();
    if r.contains("not a qemu") {
        "not-qemu"
    } else if r.contains("version") {
        "version"
    } else if r.contains("compress") {
        "compression"
    } else if r.contains("xbzrle") {
        "xbzrle"
    } else if r.contains("rdma") {
        "rdma"
    } else if r.contains("configuration") {
        "configuration"
    } else if r.contains("multifd") {
        "multifd"
    } else {
        "other"
    }
}

#[derive(Clone)]
pub struct RelayMetrics {
    pub bytes_from_qemu: IntCounterVec,
    pub bytes_on_wire: IntCounterVec,
    pub regions: IntCounterVec,
    pub passthrough: IntCounterVec,
    pub connections: IntCounterVec,
}

impl RelayMetrics {
    pub fn new(registry: &Registry) -> Self {
        let register = |c: IntCounterVec| {
            registry
                .register(Box::new(c.clone()))
                .expect("unique metric");
            c
        };
        Self {
            bytes_from_qemu: register(
                IntCounterVec::new(
                    Opts::new(
                        "commonground_relay_qemu_bytes_total",
                        "Bytes of QEMU's migration stream: read from QEMU (source), delivered to QEMU (target)",
                    ),
                    &["side"],
                )
                .expect("valid metric"),
            ),
            bytes_on_wire: register(
                IntCounterVec::new(
                    Opts::new(
                        "commonground_relay_wire_bytes_total",
                        "Bytes on the relay-to-relay connections, TLS included",
                    ),
                    &["side"],
                )
                .expect("valid metric"),
            ),
            regions: register(
                IntCounterVec::new(
                    Opts::new(
                        "commonground_relay_regions_total",
                        "Regions sent as references, by outcome (referenced, rebuilt, resent)",
                    ),
                    &["side", "outcome"],
                )
                .expect("valid metric"),
            ),
            passthrough: register(
                IntCounterVec::new(
                    Opts::new(
                        "commonground_relay_passthrough_total",
                        "Connections (or their tails) forwarded byte for byte, by reason",
                    ),
                    &["reason"],
                )
                .expect("valid metric"),
            ),
            connections: register(
                IntCounterVec::new(
                    Opts::new(
                        "commonground_relay_connections_total",
                        "Relayed connections, by side and outcome",
                    ),
                    &["side", "outcome"],
                )
                .expect("valid metric"),
            ),
        }
    }
}
