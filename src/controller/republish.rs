//! Seed 000, claim 3: once a VM has moved, the destination's digest is updated and
//! republished at once (and the source's), so the next plan sees the VM where it now is,
//! without waiting for the agents' next scan.

use kube::api::{Patch, PatchParams};
use kube::Api;

use super::error::Result;
use crate::api::digest::summary_into_status;
use crate::api::NodeRegionDigest;
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
    let (Ok(mut src_sum), Ok(mut dst_sum)) = (src.to_summary(), dst.to_summary()) else {
        return Ok(false);
    };
    if !apply_migration(&mut src_sum, &mut dst_sum, vm) {
        return Ok(false);
    }
    for (obj, summary) in [(&*src, &src_sum), (&*dst, &dst_sum)] {
        let mut status = obj.status.clone().unwrap_or_default();
        summary_into_status(summary, &mut status);
        let patch = serde_json::json!({
            "apiVersion": "commonground.dev/v1alpha1",
            "kind": "NodeRegionDigest",
            "status": status,
        });
        api.patch_status(
            &summary.node,
            &PatchParams::apply(REPUBLISH_MANAGER).force(),
            &Patch::Apply(&patch),
        )
        .await?;
    }
    Ok(true)
}
