//! Once a VM has moved, the destination's digest is updated and
//! republished at once (and the source's), so the next plan sees the VM where it now is,
//! without waiting for the agents' next scan.

use kube::Api;

use super::error::Result;
use crate::api::digest::summary_into_status;
use crate::api::digest::NodeRegionDigestStatus;
use crate::api::{write, NodeRegionDigest};
use crate::plan::replicated::apply_migration;
use crate::plan::VmKey;
use crate::view::ClusterView;

/// Field manager distinct from the agents', so their next full publish takes the fields back.
pub const REPUBLISH_MANAGER: &str = "commonground-controller";

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
