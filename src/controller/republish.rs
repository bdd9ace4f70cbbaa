//! Once a VM has moved, the destination's digest is updated and
//! republished at once (and the source's), so the next plan sees the VM where it now is,
//! without waiting for the agents' next scan. This happens after every KubeVirt migration
//! that succeeds, whoever started it: a VirtualMachineMigration, a node drain, an eviction,
//! `virtctl migrate`.

use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::{Api, ResourceExt};

use super::error::Result;
use super::Context;
use crate::api::digest::summary_into_status;
use crate::api::digest::NodeRegionDigestStatus;
use crate::api::kubevirt::{MigrationState, VirtualMachineInstanceMigration};
use crate::api::time::{self, Timestamp};
use crate::api::{write, NodeRegionDigest};
use crate::plan::replicated::apply_migration;
use crate::plan::VmKey;
use crate::view::ClusterView;

/// Field manager distinct from the agents', so their next full publish takes the fields back.
pub const REPUBLISH_MANAGER: &str = "commonground-controller";

/// A migration that ended longer ago than this is not republished (a restarted controller
/// sees every old migration again; the agents have scanned since).
pub const REPUBLISH_WINDOW: Duration = Duration::from_secs(600);

/// The VM a succeeded KubeVirt migration moved, with its source and destination nodes, when
/// it ended within [`REPUBLISH_WINDOW`] of `now`. The migration's own `migrationState` is
/// read, else the VMI's when it describes this migration (`vmi_state`).
pub fn moved_vm(
    vmim: &VirtualMachineInstanceMigration,
    vmi_state: Option<&MigrationState>,
    now: Timestamp,
) -> Option<(VmKey, String, String)> {
    if vmim.phase() != Some("Succeeded") {
        return None;
    }
    let own = vmim
        .status
        .as_ref()
        .and_then(|s| s.migration_state.as_ref());
    let uid = vmim.metadata.uid.as_deref();
    let state = own.or(vmi_state.filter(|m| uid.is_some() && m.migration_uid.as_deref() == uid))?;
    let (source, target) = (state.source_node.clone()?, state.target_node.clone()?);
    if source == target {
        return None;
    }
    let ended = state
        .end_timestamp
        .as_deref()
        .and_then(time::parse_rfc3339)?;
    if time::elapsed(ended, now) > REPUBLISH_WINDOW {
        return None;
    }
    let vm = VmKey::new(vmim.namespace().unwrap_or_default(), &vmim.spec.vmi_name);
    Some((vm, source, target))
}

/// Reconciles one KubeVirt migration: once it has succeeded, both nodes' digests show the VM
/// where it now runs. Repeating it is harmless: once the source's digest no longer lists the
/// VM, nothing is written.
pub async fn reconcile_kubevirt_migration(
    vmim: Arc<VirtualMachineInstanceMigration>,
    ctx: Arc<Context>,
) -> Result<Action> {
    let ns = vmim.namespace().unwrap_or_default();
    let vmi = ctx.view.vmi(&ns, &vmim.spec.vmi_name);
    let vmi_state = vmi
        .as_ref()
        .and_then(|v| v.status.as_ref())
        .and_then(|s| s.migration_state.as_ref());
    let Some((vm, source, target)) = moved_vm(&vmim, vmi_state, Timestamp::now()) else {
        return Ok(Action::await_change());
    };
    let api: Api<NodeRegionDigest> = Api::all(ctx.client.clone());
    if republish_after_migration(&api, &ctx.view, &vm, &source, &target).await? {
        ctx.metrics.digests_republished.inc();
        tracing::info!(%vm, %source, %target, migration = %vmim.name_any(), "digests republished after migration");
    }
    Ok(Action::await_change())
}

impl super::guard::Marked for VirtualMachineInstanceMigration {
    /// KubeVirt's migrations are not ours to write: a failure to republish is logged and
    /// counted (by the guard) and retried with backoff, and the agents' next scan corrects
    /// the digests anyway.
    async fn mark(_: &Context, vmim: &Self, reason: &str, message: &str) -> Result<()> {
        tracing::warn!(migration = %vmim.name_any(), reason, message, "republish failed");
        Ok(())
    }
}

/// Returns whether both digests were rewritten.
pub async fn republish_after_migration(
    api: &Api<NodeRegionDigest>,
    view: &ClusterView,
    vm: &VmKey,
    source: &str,
    destination: &str,
) -> Result<bool> {
    let get = |name: &str| {
        view.digests
            .get(&kube::runtime::reflector::ObjectRef::new(name))
    };
    let (Some(src), Some(dst)) = (get(source), get(destination)) else {
        return Ok(false);
    };
    let Some(statuses) = statuses_after_migration(&src, &dst, vm) else {
        return Ok(false);
    };
    for (node, status) in [(source, statuses.0), (destination, statuses.1)] {
        write::apply_status(api, REPUBLISH_MANAGER, node, &status).await?;
    }
    Ok(true)
}

/// The source's and the destination's statuses once `vm` has moved: its summary and its
/// measured load (every factor, so the rebalancer sees it on the destination) go along.
/// `None` when a digest cannot be read or does not hold the VM.
pub fn statuses_after_migration(
    src: &NodeRegionDigest,
    dst: &NodeRegionDigest,
    vm: &VmKey,
) -> Option<(NodeRegionDigestStatus, NodeRegionDigestStatus)> {
    let (mut src_sum, mut dst_sum) = (src.to_summary().ok()?, dst.to_summary().ok()?);
    if !apply_migration(&mut src_sum, &mut dst_sum, vm) {
        return None;
    }
    let mut src_status = src.status.clone().unwrap_or_default();
    let mut dst_status = dst.status.clone().unwrap_or_default();
    let moved = src_status
        .vms
        .iter()
        .find(|v| v.namespace == vm.namespace && v.name == vm.name)
        .cloned();
    dst_status
        .vms
        .retain(|v| !(v.namespace == vm.namespace && v.name == vm.name));
    // `summary_into_status` keeps the loads of the entries it finds in the status.
    dst_status.vms.extend(moved);
    summary_into_status(&src_sum, &mut src_status);
    summary_into_status(&dst_sum, &mut dst_status);
    Some((src_status, dst_status))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::digest::{LoadStatus, NodeRegionDigestSpec};
    use crate::plan::region::RegionGeometry;
    use crate::plan::sketch::{RegionSketch, KEY_SPACE};
    use crate::plan::{NodeRegionSummary, VmRegionSummary};

    fn digest(node: &str, vms: &[(&str, f64)]) -> NodeRegionDigest {
        let sketches: Vec<RegionSketch> = (0..vms.len() as u64)
            .map(|i| RegionSketch::from_keys(KEY_SPACE, [i * 10 + 1, i * 10 + 2]))
            .collect();
        let summary = NodeRegionSummary {
            node: node.into(),
            work_group: "wg".into(),
            geometry: RegionGeometry::default(),
            key_id: "k".into(),
            sketch: RegionSketch::union_all(sketches.iter()),
            vms: vms
                .iter()
                .zip(&sketches)
                .map(|((name, load), sketch)| VmRegionSummary {
                    vm: VmKey::new("ns", *name),
                    memory_bytes: 1 << 30,
                    regions: 2,
                    zero_regions: 0,
                    sketch: sketch.clone(),
                    dirty_rate: 0.0,
                    working_set_bytes: 0,
                    load: *load,
                })
                .collect(),
        };
        let mut status = NodeRegionDigestStatus::default();
        summary_into_status(&summary, &mut status);
        for v in &mut status.vms {
            v.load.cpu_cores = v.load.composite * 8.0;
            v.load.io_bytes_per_second = 1e6;
            v.load.memory_bytes = 1 << 30;
        }
        let mut d = NodeRegionDigest::new(
            node,
            NodeRegionDigestSpec {
                node_name: node.into(),
            },
        );
        d.status = Some(status);
        d
    }

    fn vmim(phase: &str, state: serde_json::Value) -> VirtualMachineInstanceMigration {
        serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstanceMigration",
            "metadata": {"name": "drain-1", "namespace": "ns", "uid": "m-1"},
            "spec": {"vmiName": "vm1"},
            "status": {"phase": phase, "migrationState": state}
        }))
        .unwrap()
    }

    #[test]
    fn a_recent_success_names_the_moved_vm_whoever_started_it() {
        let now = time::parse_rfc3339("2026-01-01T00:05:00Z").unwrap();
        let state = serde_json::json!({"sourceNode": "a", "targetNode": "b",
            "endTimestamp": "2026-01-01T00:04:00Z", "completed": true});
        assert_eq!(
            moved_vm(&vmim("Succeeded", state.clone()), None, now),
            Some((VmKey::new("ns", "vm1"), "a".into(), "b".into()))
        );
        assert_eq!(moved_vm(&vmim("Running", state.clone()), None, now), None);
        assert_eq!(moved_vm(&vmim("Failed", state.clone()), None, now), None);
        let later = time::parse_rfc3339("2026-01-01T01:00:00Z").unwrap();
        assert_eq!(
            moved_vm(&vmim("Succeeded", state), None, later),
            None,
            "too old"
        );
        let same = serde_json::json!({"sourceNode": "a", "targetNode": "a",
            "endTimestamp": "2026-01-01T00:04:00Z"});
        assert_eq!(moved_vm(&vmim("Succeeded", same), None, now), None);
    }

    #[test]
    fn without_its_own_state_the_vmis_state_for_this_migration_is_read() {
        let now = time::parse_rfc3339("2026-01-01T00:05:00Z").unwrap();
        let mut m = vmim("Succeeded", serde_json::Value::Null);
        m.status.as_mut().unwrap().migration_state = None;
        let vmi_state = |uid: &str| MigrationState {
            source_node: Some("a".into()),
            target_node: Some("c".into()),
            end_timestamp: Some("2026-01-01T00:04:30Z".into()),
            migration_uid: Some(uid.into()),
            ..Default::default()
        };
        assert_eq!(
            moved_vm(&m, Some(&vmi_state("m-1")), now).map(|t| t.2),
            Some("c".to_string())
        );
        assert_eq!(moved_vm(&m, Some(&vmi_state("other")), now), None);
    }

    #[tokio::test]
    async fn a_drain_placed_vm_is_listed_on_its_new_node_at_once() {
        use crate::controller::fake_api::FakeApi;
        use crate::view::{ClusterView, Fixed, ViewConfig};
        const DIGESTS: &str = "/apis/commonground.dev/v1alpha1/noderegiondigests";
        let fake = FakeApi::new();
        let (a, b) = (digest("a", &[("vm1", 0.5)]), digest("b", &[]));
        for d in [&a, &b] {
            fake.insert(
                &format!("{DIGESTS}/{}", d.name_any()),
                serde_json::to_value(d).unwrap(),
            );
        }
        let ended = time::now_rfc3339();
        let m = vmim(
            "Succeeded",
            serde_json::json!({"sourceNode": "a", "targetNode": "b", "endTimestamp": ended}),
        );
        let view = ClusterView::fixed(
            ViewConfig::default(),
            Fixed {
                digests: vec![a, b],
                vmims: vec![m.clone()],
                ..Default::default()
            },
        );
        let ctx = Arc::new(Context::new(
            fake.client(),
            view,
            super::super::metrics::ControllerMetrics::new(),
            "test".into(),
            super::super::status::TransferModel {
                bandwidth: 1.25e9,
                downtime_limit_ms: 300.0,
                cores_per_gbps: 0.25,
                measured_rate_max_age: std::time::Duration::from_secs(3600),
            },
        ));
        reconcile_kubevirt_migration(Arc::new(m), ctx.clone())
            .await
            .unwrap();
        let names = |node: &str| -> Vec<String> {
            let d: NodeRegionDigest =
                serde_json::from_value(fake.get(&format!("{DIGESTS}/{node}")).unwrap()).unwrap();
            d.status.unwrap().vms.into_iter().map(|v| v.name).collect()
        };
        assert_eq!(names("b"), ["vm1"], "listed on its new node");
        assert!(names("a").is_empty(), "and no longer on the old one");
        assert_eq!(ctx.metrics.digests_republished.get(), 1);
    }

    #[test]
    fn the_moved_vm_keeps_every_load_factor_on_the_destination() {
        let src = digest("a", &[("vm1", 0.5), ("vm2", 0.25)]);
        let dst = digest("b", &[("vm3", 0.125)]);
        let vm = VmKey::new("ns", "vm1");
        let (s, d) = statuses_after_migration(&src, &dst, &vm).unwrap();
        let names =
            |st: &NodeRegionDigestStatus| st.vms.iter().map(|v| v.name.clone()).collect::<Vec<_>>();
        assert_eq!(names(&s), ["vm2"]);
        assert_eq!(names(&d).len(), 2);
        let moved = d.vms.iter().find(|v| v.name == "vm1").unwrap();
        assert_eq!(
            moved.load,
            LoadStatus {
                cpu_cores: 4.0,
                io_bytes_per_second: 1e6,
                memory_bytes: 1 << 30,
                composite: 0.5,
            }
        );
        // The VM that was there keeps its own measured load.
        let stayed = d.vms.iter().find(|v| v.name == "vm3").unwrap();
        assert_eq!(stayed.load.cpu_cores, 1.0);
        // A VM the source does not hold moves nothing.
        assert!(statuses_after_migration(&src, &dst, &VmKey::new("ns", "vm9")).is_none());
    }
}
