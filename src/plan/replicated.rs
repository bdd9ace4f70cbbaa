//! The seed's replicated-region table (seed 000, fig. 5) and its update after a migration
//! (claim 3).
//!
//! A node counts how many times each region identity occurs in the memory it holds. An entry
//! `A-B-C-D-E` (page-size flag, size in pages, content identity, node, replication count) is
//! published for identities at or above the replication threshold.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::cluster::{NodeRegionSummary, VmKey, VmRegionSummary};
use super::region::RegionId;
use super::sketch::{sketch_key, RegionSketch};

/// One published table entry.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ReplicatedEntry {
    /// A: the region is backed by huge pages.
    pub huge_pages: bool,
    /// B: size in base pages.
    pub pages: u32,
    /// C: the content identity (keyed, never the content).
    pub identity: RegionId,
    /// D: the node holding the copies.
    pub node: String,
    /// E: how many copies the node holds.
    pub replicas: u32,
}

/// A node's exact region counts, kept by its agent.
#[derive(Clone, Debug, Default)]
pub struct RegionTable {
    counts: HashMap<RegionId, u32>,
    per_vm: HashMap<VmKey, Vec<RegionId>>,
}

impl RegionTable {
    /// Records (or replaces) a VM's regions.
    pub fn admit(&mut self, vm: VmKey, regions: Vec<RegionId>) {
        self.release(&vm);
        for id in &regions {
            *self.counts.entry(*id).or_default() += 1;
        }
        self.per_vm.insert(vm, regions);
    }

    /// Forgets a VM's regions (it left the node or stopped).
    pub fn release(&mut self, vm: &VmKey) {
        if let Some(old) = self.per_vm.remove(vm) {
            for id in old {
                if let Some(c) = self.counts.get_mut(&id) {
                    *c -= 1;
                    if *c == 0 {
                        self.counts.remove(&id);
                    }
                }
            }
        }
    }

    pub fn vms(&self) -> impl Iterator<Item = &VmKey> {
        self.per_vm.keys()
    }

    pub fn count(&self, id: RegionId) -> u32 {
        self.counts.get(&id).copied().unwrap_or(0)
    }

    pub fn distinct(&self) -> usize {
        self.counts.len()
    }

    /// Entries replicated at least `threshold` times, sampled at `sample_threshold` so the
    /// published list stays bounded, most replicated first, at most `max` of them.
    pub fn replicated(
        &self,
        node: &str,
        pages: u32,
        threshold: u32,
        sample_threshold: u64,
        max: usize,
    ) -> Vec<ReplicatedEntry> {
        let mut entries: Vec<ReplicatedEntry> = self
            .counts
            .iter()
            .filter(|(id, c)| **c >= threshold && sketch_key(**id) < sample_threshold)
            .map(|(id, c)| ReplicatedEntry {
                huge_pages: false,
                pages,
                identity: *id,
                node: node.to_string(),
                replicas: *c,
            })
            .collect();
        entries.sort_by(|a, b| {
            b.replicas
                .cmp(&a.replicas)
                .then(a.identity.cmp(&b.identity))
        });
        entries.truncate(max);
        entries
    }
}

/// Claim 3: after `vm` moved from `source` to `destination`, both published summaries are
/// updated from what is already known (no rescan), ready to republish: the VM's summary moves,
/// and each node's region set becomes the union of the VMs it now holds. A destination with a
/// coarser sampling threshold coarsens the VM's sketch to match.
///
/// Returns false (and changes nothing) when the source does not list the VM.
pub fn apply_migration(
    source: &mut NodeRegionSummary,
    destination: &mut NodeRegionSummary,
    vm: &VmKey,
) -> bool {
    let Some(pos) = source.vms.iter().position(|v| &v.vm == vm) else {
        return false;
    };
    let mut moved = source.vms.remove(pos);
    moved.sketch.coarsen(destination.sketch.threshold());
    destination.vms.retain(|v| &v.vm != vm);
    destination.sketch = destination.sketch.union(&moved.sketch);
    destination.vms.push(moved);
    source.sketch = rebuild_node_sketch(source.sketch.threshold(), &source.vms);
    true
}

/// A node's region set as the union of its VMs' sketches at the node's threshold.
pub fn rebuild_node_sketch(threshold: u64, vms: &[VmRegionSummary]) -> RegionSketch {
    let mut s = RegionSketch::union_all(vms.iter().map(|v| &v.sketch));
    if vms.is_empty() {
        s = RegionSketch::empty(threshold);
    }
    s.coarsen(threshold);
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::region::RegionGeometry;
    use crate::plan::sketch::KEY_SPACE;

    fn id(k: u64) -> RegionId {
        RegionId(k << 24)
    }

    fn vm_summary(name: &str, keys: &[u64]) -> VmRegionSummary {
        VmRegionSummary {
            vm: VmKey::new("ns", name),
            memory_bytes: keys.len() as u64 * 65536,
            regions: keys.len() as u64,
            zero_regions: 0,
            sketch: RegionSketch::from_keys(KEY_SPACE, keys.iter().copied()),
            dirty_rate: 0.0,
            working_set_bytes: 0,
            load: 0.0,
        }
    }

    fn node(name: &str, vms: Vec<VmRegionSummary>) -> NodeRegionSummary {
        NodeRegionSummary {
            node: name.into(),
            work_group: "a".into(),
            geometry: RegionGeometry::default(),
            key_id: "k".into(),
            sketch: rebuild_node_sketch(KEY_SPACE, &vms),
            vms,
        }
    }

    #[test]
    fn table_counts_replicas_and_releases() {
        let mut t = RegionTable::default();
        t.admit(VmKey::new("ns", "a"), vec![id(1), id(2), id(2)]);
        t.admit(VmKey::new("ns", "b"), vec![id(2), id(3)]);
        assert_eq!(t.count(id(2)), 3);
        let e = t.replicated("n1", 16, 2, KEY_SPACE, 10);
        assert_eq!(e.len(), 1);
        assert_eq!(
            (e[0].identity, e[0].replicas, e[0].node.as_str()),
            (id(2), 3, "n1")
        );
        t.release(&VmKey::new("ns", "a"));
        assert_eq!(t.count(id(2)), 1);
        assert_eq!(t.count(id(1)), 0);
        assert_eq!(t.distinct(), 2);
    }

    #[test]
    fn migration_moves_the_vm_and_its_regions() {
        let mut src = node(
            "s",
            vec![vm_summary("x", &[1, 2, 3]), vm_summary("y", &[3, 4])],
        );
        let mut dst = node("d", vec![vm_summary("z", &[9])]);
        assert!(apply_migration(&mut src, &mut dst, &VmKey::new("ns", "x")));
        assert_eq!(
            src.sketch.keys(),
            &[3, 4],
            "region 3 stays: y still holds it"
        );
        assert_eq!(dst.sketch.keys(), &[1, 2, 3, 9]);
        assert_eq!(dst.vms.len(), 2);
        assert!(
            !apply_migration(&mut src, &mut dst, &VmKey::new("ns", "x")),
            "already moved"
        );
    }
}
