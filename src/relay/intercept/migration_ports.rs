//! Which of a migration's published target ports carry QEMU's memory stream, the only ones the
//! relay can rebuild.
//!
//! The target virt-handler listens on one node port per launcher socket and publishes them in
//! the VMI's `status.migrationState.targetDirectMigrationNodePorts`, a map from node port to
//! the launcher-side port it stands for: 49152 is QEMU's live migration stream (its main
//! channel and, with parallel migration, every multifd channel too), 49153 the block
//! migration of local disks, and 0 libvirt's own connection. Only the first is redirected: the
//! others go direct, as they would without commonground.

use std::collections::BTreeMap;
use std::net::{IpAddr, SocketAddr};

/// The launcher-side port of QEMU's live migration stream.
pub const QEMU_MIGRATION_PORT: i64 = 49152;

/// The destinations to redirect for a migration whose target published `address` and
/// `node_ports` (node port as text -> launcher-side port). An address that is not an IP, or a
/// port that is not a port, is skipped: the connection then goes direct.
pub fn memory_stream_targets(address: &str, node_ports: &BTreeMap<String, i64>) -> Vec<SocketAddr> {
    let Ok(ip) = address
        .trim_start_matches('[')
        .trim_end_matches(']')
        .parse::<IpAddr>()
    else {
        return Vec::new();
    };
    node_ports
        .iter()
        .filter(|(_, inner)| **inner == QEMU_MIGRATION_PORT)
        .filter_map(|(port, _)| port.parse::<u16>().ok().filter(|p| *p != 0))
        .map(|p| SocketAddr::new(ip, p))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ports(p: &[(&str, i64)]) -> BTreeMap<String, i64> {
        p.iter().map(|(k, v)| (k.to_string(), *v)).collect()
    }

    #[test]
    fn only_the_memory_stream_port_is_redirected() {
        let published = ports(&[("38139", 0), ("43061", 49152), ("42425", 49153)]);
        assert_eq!(
            memory_stream_targets("10.244.1.7", &published),
            vec!["10.244.1.7:43061".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            memory_stream_targets("fd00::7", &published),
            vec!["[fd00::7]:43061".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(
            memory_stream_targets("[fd00::7]", &published),
            vec!["[fd00::7]:43061".parse::<SocketAddr>().unwrap()]
        );
    }

    #[test]
    fn what_cannot_be_read_goes_direct() {
        let published = ports(&[
            ("43061", 49152),
            ("not-a-port", 49152),
            ("0", 49152),
            ("70000", 49152),
        ]);
        assert_eq!(memory_stream_targets("node-a.example", &published), vec![]);
        assert_eq!(memory_stream_targets("", &published), vec![]);
        assert_eq!(
            memory_stream_targets("10.0.0.1", &published),
            vec!["10.0.0.1:43061".parse::<SocketAddr>().unwrap()]
        );
        assert_eq!(memory_stream_targets("10.0.0.1", &BTreeMap::new()), vec![]);
    }
}
