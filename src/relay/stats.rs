//! What one migration through a relay did: appended as one JSON line per migration to
//! `--stats-json`, and counted in Prometheus metrics.

use std::collections::BTreeMap;
use std::io::Write;
use std::path::Path;

use prometheus::{IntCounterVec, Opts, Registry};
use serde::Serialize;

/// One migration (every connection of it) on one side.
#[derive(Clone, Debug, Default, Serialize, PartialEq)]
pub struct MigrationStats {
    pub side: &'static str,
    pub session: String,
    /// Source: the target relay (HOST:PORT) the migration went to.
    #[serde(skip_serializing_if = "String::is_empty")]
    pub peer: String,
    pub connections: u64,
    /// Source: bytes read from QEMU. Target: bytes delivered to QEMU (what it would have
    /// received directly).
    pub bytes_from_qemu: u64,
    /// Bytes of the relay-to-relay TCP connections, both directions, TLS included.
    pub bytes_on_wire: u64,
    /// Source: of `bytes_on_wire`, what each path (target relay address) carried.
    #[serde(skip_serializing_if = "BTreeMap::is_empty")]
    pub path_bytes: BTreeMap<String, u64>,
    /// Source: connections whose extra path could not be reached and that took the first.
    #[serde(skip_serializing_if = "is_zero")]
    pub path_fallbacks: u64,
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

fn is_zero(n: &u64) -> bool {
    *n == 0
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

/// Transfers shorter than this say little about the path (connection setup dominates).
pub const MIN_MEASURED_BYTES: u64 = 16 << 20;
pub const MIN_MEASURED_SECONDS: f64 = 0.5;

/// The rate of one completed transfer, in bytes per second, when it is long enough to say
/// something about the path; `None` otherwise.
pub fn transfer_rate(bytes: u64, seconds: f64) -> Option<f64> {
    (bytes >= MIN_MEASURED_BYTES && seconds.is_finite() && seconds >= MIN_MEASURED_SECONDS)
        .then(|| bytes as f64 / seconds)
}

/// The last completed transfer to one peer relay.
#[derive(Clone, Debug, PartialEq)]
pub struct ObservedTransfer {
    /// The target relay, HOST:PORT.
    pub peer: String,
    pub bytes: u64,
    pub seconds: f64,
    pub bytes_per_second: f64,
    /// RFC 3339 time it ended.
    pub time: String,
}

/// The source end's observed rates, by peer relay: what its node's agent publishes. Only
/// migrations that went through without a failed connection count.
#[derive(Clone, Debug, Default)]
pub struct PeerRates(
    std::sync::Arc<std::sync::Mutex<std::collections::BTreeMap<String, ObservedTransfer>>>,
);

impl PeerRates {
    /// Keeps the migration's rate for its peer, if it was a clean and long enough transfer;
    /// spread over several paths, each path's own rate (what it carried over the migration's
    /// time), by the target relay address it reached.
    pub fn record(&self, stats: &MigrationStats, time: &str) {
        if stats.peer.is_empty() || !stats.errors.is_empty() {
            return;
        }
        let single = [(stats.peer.clone(), stats.bytes_on_wire)];
        let paths: Vec<(String, u64)> = if stats.path_bytes.is_empty() {
            single.to_vec()
        } else {
            stats.path_bytes.clone().into_iter().collect()
        };
        let mut rates = self.0.lock().expect("peer rates lock");
        for (peer, bytes) in paths {
            let Some(rate) = transfer_rate(bytes, stats.seconds) else {
                continue;
            };
            let t = ObservedTransfer {
                peer: peer.clone(),
                bytes,
                seconds: stats.seconds,
                bytes_per_second: rate,
                time: time.to_string(),
            };
            rates.insert(peer, t);
        }
    }

    /// Every peer's last transfer, by peer.
    pub fn snapshot(&self) -> Vec<ObservedTransfer> {
        self.0
            .lock()
            .expect("peer rates lock")
            .values()
            .cloned()
            .collect()
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

#[cfg(test)]
mod tests {
    use super::*;

    fn migration(peer: &str, bytes: u64, seconds: f64) -> MigrationStats {
        MigrationStats {
            side: "source",
            peer: peer.into(),
            bytes_on_wire: bytes,
            seconds,
            ..Default::default()
        }
    }

    #[test]
    fn short_transfers_say_nothing_about_the_path() {
        assert_eq!(transfer_rate(64 << 20, 2.0), Some(32.0 * 1048576.0));
        assert_eq!(transfer_rate(1 << 20, 2.0), None, "too few bytes");
        assert_eq!(transfer_rate(64 << 20, 0.1), None, "too short");
        assert_eq!(transfer_rate(64 << 20, f64::NAN), None);
    }

    #[test]
    fn the_last_clean_transfer_per_peer_is_kept() {
        let rates = PeerRates::default();
        rates.record(&migration("10.0.0.2:4480", 100 << 20, 1.0), "t1");
        rates.record(&migration("10.0.0.2:4480", 50 << 20, 1.0), "t2");
        rates.record(&migration("10.0.0.3:4480", 1 << 10, 1.0), "t3");
        let mut failed = migration("10.0.0.3:4480", 100 << 20, 1.0);
        failed.errors.push("connection 0: reset".into());
        rates.record(&failed, "t4");
        rates.record(&migration("", 100 << 20, 1.0), "t5");
        let seen = rates.snapshot();
        assert_eq!(seen.len(), 1, "{seen:?}");
        assert_eq!(seen[0].peer, "10.0.0.2:4480");
        assert_eq!(seen[0].bytes_per_second, 50.0 * 1048576.0);
        assert_eq!(seen[0].time, "t2");
    }

    #[test]
    fn a_migration_over_several_paths_gives_each_path_its_own_rate() {
        let rates = PeerRates::default();
        let mut m = migration("10.0.0.2:7443", 300 << 20, 2.0);
        m.path_bytes = [
            ("10.0.0.2:7443".to_string(), 200 << 20),
            ("10.1.0.2:7443".to_string(), 100 << 20),
        ]
        .into();
        rates.record(&m, "t1");
        let seen = rates.snapshot();
        assert_eq!(seen.len(), 2, "{seen:?}");
        assert_eq!(seen[0].peer, "10.0.0.2:7443");
        assert_eq!(seen[0].bytes_per_second, 100.0 * 1048576.0);
        assert_eq!(seen[1].peer, "10.1.0.2:7443");
        assert_eq!(seen[1].bytes_per_second, 50.0 * 1048576.0);
    }
}
