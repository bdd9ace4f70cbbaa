//! The agent's loop that keeps the relay in KubeVirt's migration path: it finds this node's
//! virt-handler, opens the path in its network namespace while KubeVirt's migration TLS is off,
//! and every quarter second takes the outgoing migrations under way (see [`super::migration_path`])
//! and lets go of the finished ones. Whether the path is open is what the node's digest
//! reports as `status.relay.inMigrationPath`.
//!
//! Fail open: any error closes the path (dropping it drops the interception table), and the
//! next look tries again. The agent's exit drops it too, however the agent exits.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::runtime::reflector::Store;

use super::migration_path::{changes, desired_routes, host_processes, virt_handler_pid, PathRoute};
use crate::api::kubevirt::{kubevirt_blocks_relay, KubeVirt, VirtualMachineInstance};
use crate::relay::path::{NodePath, PathConfig};
use crate::relay::NodeRelayParts;

const LOOK_EVERY: Duration = Duration::from_millis(250);
/// How often virt-handler's pid is looked up again, and a path that could not open is tried
/// again (it is also looked up as soon as its process is gone).
const HANDLER_RECHECK: Duration = Duration::from_secs(10);

/// Runs until the task is aborted. `open_flag` is set while the path is open.
pub async fn run(
    node: String,
    vmis: Store<VirtualMachineInstance>,
    kubevirts: Store<KubeVirt>,
    config: PathConfig,
    parts: NodeRelayParts,
    open_flag: Arc<AtomicBool>,
) {
    let mut path: Option<NodePath> = None;
    let mut last_reason = String::new();
    // When virt-handler is looked up (and the path opened) next: at once at start, then at
    // most every HANDLER_RECHECK, so a path that cannot open is not retried in a hot loop.
    let mut next_check = Instant::now();
    let mut renewed = Instant::now();
    let mut say = |reason: String, path_open: bool| {
        if reason != last_reason {
            if path_open {
                tracing::info!("{reason}");
            } else {
                tracing::warn!(reason = %reason, "relay not in KubeVirt's migration path");
            }
            last_reason = reason;
        }
    };
    loop {
        tokio::time::sleep(LOOK_EVERY).await;
        let kvs = kubevirts.state();
        let kv_refs: Vec<&KubeVirt> = kvs.iter().map(|k| k.as_ref()).collect();
        if let Some(why) = kubevirt_blocks_relay(&kv_refs) {
            path = None;
            open_flag.store(false, Ordering::SeqCst);
            say(why.to_string(), false);
            // Looked at again as soon as KubeVirt allows it.
            next_check = Instant::now();
            continue;
        }
        let gone = path
            .as_ref()
            .is_some_and(|p| !std::path::Path::new(&format!("/proc/{}", p.handler_pid())).exists());
        if gone || Instant::now() >= next_check {
            next_check = Instant::now() + HANDLER_RECHECK;
            let procs = host_processes();
            let pid = virt_handler_pid(procs.iter().map(|(p, c)| (*p, c.as_str())));
            match pid {
                Ok(Some(pid)) if path.as_ref().map(NodePath::handler_pid) == Some(pid) => {}
                Ok(Some(pid)) => {
                    path = None;
                    // Opening talks to `nft` and waits for it (at most seconds): off the
                    // runtime's other tasks.
                    let opened = tokio::task::block_in_place(|| {
                        NodePath::open(pid, config.clone(), parts.source.clone(), &parts.target)
                    });
                    match opened {
                        Ok(p) => {
                            path = Some(p);
                            say(
                                format!(
                                    "relay in KubeVirt's migration path (virt-handler pid {pid})"
                                ),
                                true,
                            );
                        }
                        Err(e) => say(
                            format!("cannot open the relay path in virt-handler's namespace: {e}"),
                            false,
                        ),
                    }
                }
                Ok(None) => {
                    path = None;
                    say("no virt-handler process on this node".into(), false);
                }
                Err(pids) => {
                    path = None;
                    say(
                        format!("several virt-handler processes ({pids:?}); not choosing one"),
                        false,
                    );
                }
            }
        }
        open_flag.store(path.is_some(), Ordering::SeqCst);
        let Some(p) = path.as_mut() else { continue };
        let state = vmis.state();
        let refs: Vec<&VirtualMachineInstance> = state.iter().map(|v| v.as_ref()).collect();
        let desired = desired_routes(&refs, &node, config.relay_port);
        let current: BTreeMap<SocketAddr, PathRoute> = p
            .current()
            .iter()
            .map(|(d, (m, r))| {
                (
                    *d,
                    PathRoute {
                        migration: m.clone(),
                        target_relay: r.clone(),
                    },
                )
            })
            .collect();
        let (add, remove) = changes(&current, &desired);
        let add: Vec<(SocketAddr, String, String)> = add
            .into_iter()
            .map(|(d, r)| (d, r.migration, r.target_relay))
            .collect();
        let mut result = Ok(());
        if !add.is_empty() || !remove.is_empty() {
            result = tokio::task::block_in_place(|| p.apply(&add, &remove));
        } else if renewed.elapsed() >= config.redirect_timeout / 2 {
            renewed = Instant::now();
            result = tokio::task::block_in_place(|| p.renew());
        }
        if let Err(e) = result {
            path = None;
            open_flag.store(false, Ordering::SeqCst);
            say(format!("relay path closed after an error: {e}"), false);
        }
    }
}
