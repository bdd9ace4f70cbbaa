//! The agent's decisions for putting the relay in KubeVirt's migration path: which migrations
//! leave this node now, which destinations the relay takes for them, and what changes from
//! one look to the next. Pure functions over VMI status; `relay_path` acts on them.
//!
//! A migration is taken while it is under way: this node is its source, the target
//! virt-handler has published its address and ports, and it is neither completed, failed nor
//! asked to abort. Its memory stream's port (see `relay::intercept::migration_ports`) is routed
//! through the target relay, which listens on the same address as the target virt-handler at
//! the relay port, inside the target virt-handler's network namespace.

use std::collections::BTreeMap;
use std::net::SocketAddr;

use crate::api::kubevirt::VirtualMachineInstance;
use crate::relay::intercept::memory_stream_targets;

/// The route for one destination: the migration it belongs to and the target relay.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PathRoute {
    pub migration: String,
    pub target_relay: String,
}

/// The destinations to redirect now, from the VMIs on this node (`node`), with the target
/// relays at `relay_port`.
pub fn desired_routes(
    vmis: &[&VirtualMachineInstance],
    node: &str,
    relay_port: u16,
) -> BTreeMap<SocketAddr, PathRoute> {
    let mut out = BTreeMap::new();
    for vmi in vmis {
        let Some(ms) = vmi.status.as_ref().and_then(|s| s.migration_state.as_ref()) else {
            continue;
        };
        let under_way = ms.source_node.as_deref() == Some(node)
            && !ms.completed
            && !ms.failed
            && ms.abort_requested != Some(true);
        let (Some(address), Some(ports), Some(migration)) = (
            ms.target_node_address.as_deref(),
            ms.target_direct_migration_node_ports.as_ref(),
            ms.migration_uid.as_deref(),
        ) else {
            continue;
        };
        if !under_way {
            continue;
        }
        for dest in memory_stream_targets(address, ports) {
            out.insert(
                dest,
                PathRoute {
                    migration: migration.to_string(),
                    target_relay: SocketAddr::new(dest.ip(), relay_port).to_string(),
                },
            );
        }
    }
    out
}

/// What to change to go from `current` to `desired`: destinations to add (or whose route
/// changed), and destinations to remove.
pub fn changes(
    current: &BTreeMap<SocketAddr, PathRoute>,
    desired: &BTreeMap<SocketAddr, PathRoute>,
) -> (Vec<(SocketAddr, PathRoute)>, Vec<SocketAddr>) {
    let add = desired
        .iter()
        .filter(|(d, r)| current.get(d) != Some(r))
        .map(|(d, r)| (*d, r.clone()))
        .collect();
    let remove = current
        .keys()
        .filter(|d| !desired.contains_key(d))
        .copied()
        .collect();
    (add, remove)
}

/// The pid of the virt-handler process among `processes` (pid, command name), if exactly one
/// runs on this node.
pub fn virt_handler_pid<'a>(
    processes: impl IntoIterator<Item = (i32, &'a str)>,
) -> Result<Option<i32>, Vec<i32>> {
    let pids: Vec<i32> = processes
        .into_iter()
        .filter(|(_, comm)| comm.trim_end() == "virt-handler")
        .map(|(p, _)| p)
        .collect();
    match pids.as_slice() {
        [] => Ok(None),
        [one] => Ok(Some(*one)),
        _ => Err(pids),
    }
}

/// The host's processes as (pid, command name), from /proc.
pub fn host_processes() -> Vec<(i32, String)> {
    let Ok(dir) = std::fs::read_dir("/proc") else {
        return Vec::new();
    };
    dir.filter_map(|e| {
        let pid: i32 = e.ok()?.file_name().to_str()?.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).ok()?;
        Some((pid, comm.trim_end().to_string()))
    })
    .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmi(name: &str, state: serde_json::Value) -> VirtualMachineInstance {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1",
            "kind": "VirtualMachineInstance",
            "metadata": {"name": name, "namespace": "ns"},
            "spec": {"domain": {"devices": {}}},
            "status": {"nodeName": "a", "migrationState": state},
        }))
        .unwrap()
    }

    fn under_way(uid: &str, address: &str) -> serde_json::Value {
        serde_json::json!({
            "sourceNode": "a", "targetNode": "b", "migrationUid": uid,
            "targetNodeAddress": address,
            "targetDirectMigrationNodePorts": {"38139": 0, "43061": 49152, "42425": 49153},
        })
    }

    #[test]
    fn a_migration_under_way_from_this_node_routes_its_memory_port_through_the_target_relay() {
        let v = vmi("vm-1", under_way("m-1", "10.244.1.7"));
        let routes = desired_routes(&[&v], "a", 7443);
        assert_eq!(
            routes,
            BTreeMap::from([(
                "10.244.1.7:43061".parse().unwrap(),
                PathRoute {
                    migration: "m-1".into(),
                    target_relay: "10.244.1.7:7443".into()
                }
            )])
        );
        // The target node's agent, and any other node, takes nothing for it.
        assert!(desired_routes(&[&v], "b", 7443).is_empty());
    }

    #[test]
    fn finished_failed_aborted_or_unpublished_migrations_are_not_taken() {
        let mut done = under_way("m-1", "10.0.0.2");
        done["completed"] = true.into();
        let mut failed = under_way("m-2", "10.0.0.3");
        failed["failed"] = true.into();
        let mut aborted = under_way("m-3", "10.0.0.4");
        aborted["abortRequested"] = true.into();
        let unpublished = serde_json::json!({"sourceNode": "a", "migrationUid": "m-4"});
        let vmis: Vec<VirtualMachineInstance> = [done, failed, aborted, unpublished]
            .into_iter()
            .enumerate()
            .map(|(i, s)| vmi(&format!("vm-{i}"), s))
            .collect();
        let refs: Vec<&VirtualMachineInstance> = vmis.iter().collect();
        assert!(desired_routes(&refs, "a", 7443).is_empty());
    }

    #[test]
    fn changes_add_what_is_new_or_rerouted_and_remove_what_is_gone() {
        let r = |m: &str| PathRoute {
            migration: m.into(),
            target_relay: "10.0.0.2:7443".into(),
        };
        let (a, b, c): (SocketAddr, SocketAddr, SocketAddr) = (
            "10.0.0.2:1".parse().unwrap(),
            "10.0.0.2:2".parse().unwrap(),
            "10.0.0.2:3".parse().unwrap(),
        );
        let current = BTreeMap::from([(a, r("m-1")), (b, r("m-2"))]);
        let desired = BTreeMap::from([(a, r("m-1")), (b, r("m-5")), (c, r("m-3"))]);
        let (add, remove) = changes(&current, &desired);
        assert_eq!(add, vec![(b, r("m-5")), (c, r("m-3"))]);
        assert!(remove.is_empty());
        let (add, remove) = changes(&desired, &BTreeMap::new());
        assert!(add.is_empty());
        assert_eq!(remove, vec![a, b, c]);
    }

    #[test]
    fn exactly_one_virt_handler_is_found() {
        let procs = [
            (1, "systemd"),
            (40, "virt-handler\n"),
            (41, "virt-launcher"),
        ];
        assert_eq!(virt_handler_pid(procs), Ok(Some(40)));
        assert_eq!(virt_handler_pid([(1, "init")]), Ok(None));
        assert_eq!(
            virt_handler_pid([(40, "virt-handler"), (90, "virt-handler")]),
            Err(vec![40, 90])
        );
    }
}
