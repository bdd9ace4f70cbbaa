//! Keeping a node's published digest within its size bound.
//!
//! A digest carries the node's sketch (base64 of the Rice-coded form, about 2.3 bytes per entry
//! before base64) and the sketch of every VM on it, written as positions in the node sketch
//! (`RegionSketch::encode_subset_of`: about `log2(N/m) + 2` bits per entry for a VM holding `m`
//! of the node's `N` sampled keys), as the agent publishes it. When they do not fit, the node
//! raises its sampling bar for all of them at once: the node sketch and the VM sketches stay
//! consistent samples at one threshold, so every overlap computed from them is still unbiased;
//! only the number of samples (and so the variance) drops.

use crate::plan::cluster::VmRegionSummary;
use crate::plan::replicated::rebuild_node_sketch;
use crate::plan::sketch::RegionSketch;

/// The design's bound on a published `NodeRegionDigest`.
pub const DIGEST_LIMIT_BYTES: usize = 256 * 1024;
/// Room for everything in a digest that is not a sketch: object metadata, load, paths.
pub const DIGEST_FIXED_OVERHEAD: usize = 4096;
/// JSON per VM besides its sketch (names, sizes, rates).
pub const DIGEST_PER_VM_OVERHEAD: usize = 192;

fn base64_len(bytes: usize) -> usize {
    bytes.div_ceil(3) * 4
}

/// Serialized size of a VM's sketch in a digest next to `node`: node-indexed when it is a
/// subset of the node sketch, else standalone (what `summary_into_status` writes).
pub fn vm_sketch_bytes(vm: &RegionSketch, node: &RegionSketch) -> usize {
    let raw = match vm.encode_subset_of(node) {
        Ok(b) => b.len(),
        Err(_) => vm.encode().len(),
    };
    base64_len(raw)
}

/// Serialized size of the sketch part of a digest plus the fixed overheads.
pub fn digest_bytes(node: &RegionSketch, vms: &[VmRegionSummary]) -> usize {
    DIGEST_FIXED_OVERHEAD
        + base64_len(node.encode().len())
        + vms
            .iter()
            .map(|v| DIGEST_PER_VM_OVERHEAD + vm_sketch_bytes(&v.sketch, node))
            .sum::<usize>()
}

/// Builds the node sketch from `vms` (coarsening them in place when needed) so the digest fits
/// in `limit` bytes. Returns the node sketch and the digest size.
pub fn fit_digest(
    vms: &mut [VmRegionSummary],
    threshold: u64,
    limit: usize,
) -> (RegionSketch, usize) {
    let mut node = rebuild_node_sketch(threshold, vms);
    loop {
        let size = digest_bytes(&node, vms);
        let entries = node.len() + vms.iter().map(|v| v.sketch.len()).sum::<usize>();
        let fixed = DIGEST_FIXED_OVERHEAD + vms.len() * DIGEST_PER_VM_OVERHEAD;
        if size <= limit || entries == 0 || limit <= fixed {
            return (node, size);
        }
        // Keep the share of entries the bound allows (2% margin), by cutting the combined
        // multiset of keys at that rank: the new threshold is the first key dropped.
        let keep =
            ((entries as f64) * (limit - fixed) as f64 / (size - fixed) as f64 * 0.98) as usize;
        let mut all: Vec<u64> = node.keys().to_vec();
        for v in vms.iter() {
            all.extend_from_slice(v.sketch.keys());
        }
        let keep = keep.min(all.len() - 1);
        let (_, &mut cut, _) = all.select_nth_unstable(keep);
        let cut = cut.min(node.threshold().saturating_sub(1)).max(1);
        for v in vms.iter_mut() {
            v.sketch.coarsen(cut);
        }
        node.coarsen(cut);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cluster::VmKey;
    use crate::plan::sketch::KEY_SPACE;
    use rand::{Rng, SeedableRng};

    fn vm(rng: &mut impl Rng, n: usize) -> VmRegionSummary {
        VmRegionSummary {
            vm: VmKey::new("ns", format!("vm{}", rng.random::<u32>())),
            memory_bytes: n as u64 * 65536,
            regions: n as u64,
            zero_regions: 0,
            sketch: RegionSketch::from_keys(KEY_SPACE, (0..n).map(|_| rng.random::<u64>() >> 24)),
            dirty_rate: 0.0,
            working_set_bytes: 0,
            load: 0.0,
        }
    }

    #[test]
    fn oversized_digests_are_coarsened_consistently_to_fit() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(3);
        let mut vms: Vec<VmRegionSummary> = (0..20).map(|_| vm(&mut rng, 20_000)).collect();
        let before = rebuild_node_sketch(KEY_SPACE, &vms);
        let (node, size) = fit_digest(&mut vms, KEY_SPACE, DIGEST_LIMIT_BYTES);
        assert!(size <= DIGEST_LIMIT_BYTES, "{size}");
        // The size counted is what the agent writes: the VM sketches node-indexed.
        let mut status = crate::api::digest::NodeRegionDigestStatus::default();
        crate::api::digest::summary_into_status(
            &crate::plan::cluster::NodeRegionSummary {
                node: "n".into(),
                work_group: "a".into(),
                geometry: Default::default(),
                key_id: String::new(),
                sketch: node.clone(),
                vms: vms.clone(),
            },
            &mut status,
        );
        let written = base64_len(node.encode().len())
            + status.vms.iter().map(|v| v.sketch.len()).sum::<usize>();
        let counted = size - DIGEST_FIXED_OVERHEAD - vms.len() * DIGEST_PER_VM_OVERHEAD;
        assert_eq!(written, counted);
        // Twenty disjoint VMs: each holds 1 in 20 of the node's keys, log2(20) + 2 bits each
        // indexed against about 23 bits standalone at this threshold, so the digest costs about
        // 1.3 copies of the node sketch where standalone VM sketches cost 2.
        let standalone = base64_len(node.encode().len())
            + vms
                .iter()
                .map(|v| base64_len(v.sketch.encode().len()))
                .sum::<usize>();
        assert!(
            (counted as f64) < 0.7 * standalone as f64,
            "{counted} vs {standalone}"
        );
        assert!(node.threshold() < KEY_SPACE);
        for v in &vms {
            assert_eq!(v.sketch.threshold(), node.threshold());
        }
        // Still the exact consistent sample of the same set at the new threshold.
        let mut expect = before.clone();
        expect.coarsen(node.threshold());
        assert_eq!(node, expect);
    }

    #[test]
    fn small_digests_are_left_alone() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(4);
        let mut vms: Vec<VmRegionSummary> = (0..3).map(|_| vm(&mut rng, 1000)).collect();
        let copy = vms.clone();
        let (node, _) = fit_digest(&mut vms, KEY_SPACE, DIGEST_LIMIT_BYTES);
        assert_eq!(vms, copy);
        assert_eq!(node.len(), 3000);
    }
}
