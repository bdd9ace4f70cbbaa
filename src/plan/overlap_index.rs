//! An inverted index from sampled region keys to the nodes that hold them, so ranking touches
//! only the migrating VM's keys (a few thousand) instead of every node's sketch: ranking 5,000
//! nodes costs the sum of the VM's posting lists, not 5,000 sketch intersections.
//!
//! Layout: postings sorted by key, split into `2^d` buckets by the key's high bits; a posting
//! stores the key's low bits and the node's slot. Slots number the nodes work group by work
//! group, so one key's postings of one work group are a contiguous run, and counting a VM's
//! memory in common inside chosen work groups ([`OverlapIndex::count_hits_in`]) touches only
//! their runs. Built once per view (the glue rebuilds it, debounced, when digests change) and
//! shared read-only.

use super::sketch::RegionSketch;

pub struct OverlapIndex {
    /// Keys below a node's threshold were sampled by it; above, the node says nothing.
    node_thresholds: Vec<u64>,
    /// The lowest threshold of any node with a digest: keys below it need no per-node check.
    min_threshold: u64,
    has_digest: Vec<bool>,
    low_bits: u32,
    directory: Vec<u32>,
    low_keys: Vec<u32>,
    /// The slot of each posting's node.
    slots: Vec<u32>,
    /// Node position of each slot.
    node_of_slot: Vec<u32>,
    /// Slots of each work group: `group_slots[g]..group_slots[g + 1]`.
    group_slots: Vec<u32>,
}

impl OverlapIndex {
    /// `sketches[i]` is node i's sketch (or `None` without a digest), all in one work group.
    pub fn build(sketches: &[Option<&RegionSketch>]) -> Self {
        Self::build_grouped(sketches, &vec![0; sketches.len()])
    }

    /// As [`OverlapIndex::build`], with node i in work group `group_of[i]` (work groups
    /// numbered from 0).
    pub fn build_grouped(sketches: &[Option<&RegionSketch>], group_of: &[usize]) -> Self {
        assert_eq!(sketches.len(), group_of.len(), "one work group per node");
        let groups = group_of.iter().max().map_or(0, |g| g + 1);
        let mut node_of_slot: Vec<u32> = (0..sketches.len() as u32).collect();
        node_of_slot.sort_by_key(|&n| group_of[n as usize]);
        let mut slot_of_node = vec![0u32; sketches.len()];
        for (slot, &n) in node_of_slot.iter().enumerate() {
            slot_of_node[n as usize] = slot as u32;
        }
        let mut group_slots = vec![0u32; groups + 1];
        for &g in group_of {
            group_slots[g + 1] += 1;
        }
        for g in 0..groups {
            group_slots[g + 1] += group_slots[g];
        }
        let node_thresholds: Vec<u64> = sketches
            .iter()
            .map(|s| s.map_or(0, |s| s.threshold()))
            .collect();
        let has_digest = sketches.iter().map(Option::is_some).collect();
        let max_threshold = node_thresholds.iter().copied().max().unwrap_or(1).max(1);
        let key_bits = 64 - (max_threshold - 1).leading_zeros().min(63);
        let total: usize = sketches.iter().flatten().map(|s| s.len()).sum();
        // About four postings per bucket; low bits must fit in u32.
        let wanted_dir_bits = (usize::BITS - total.max(1).leading_zeros()).saturating_sub(2);
        let dir_bits = wanted_dir_bits.clamp(key_bits.saturating_sub(32), key_bits.max(1));
        let low_bits = key_bits.saturating_sub(dir_bits);
        let buckets = 1usize << dir_bits;

        // Counting sort by bucket, then sort each bucket by (low key, node).
        let mut directory = vec![0u32; buckets + 1];
        for s in sketches.iter().flatten() {
            for &k in s.keys() {
                directory[(k >> low_bits) as usize + 1] += 1;
            }
        }
        for b in 0..buckets {
            directory[b + 1] += directory[b];
        }
        let mut fill: Vec<u32> = directory[..buckets].to_vec();
        let mut low_keys = vec![0u32; total];
        let mut slots = vec![0u32; total];
        let low_mask = if low_bits == 0 {
            0
        } else {
            (1u64 << low_bits) - 1
        };
        for (node, s) in sketches.iter().enumerate() {
            let Some(s) = s else { continue };
            for &k in s.keys() {
                let b = (k >> low_bits) as usize;
                let at = fill[b] as usize;
                fill[b] += 1;
                low_keys[at] = (k & low_mask) as u32;
                slots[at] = slot_of_node[node];
            }
        }
        let mut pairs: Vec<(u32, u32)> = Vec::new();
        for b in 0..buckets {
            let (lo, hi) = (directory[b] as usize, directory[b + 1] as usize);
            if hi - lo > 1 {
                pairs.clear();
                pairs.extend((lo..hi).map(|i| (low_keys[i], slots[i])));
                pairs.sort_unstable();
                for (i, (l, n)) in pairs.iter().enumerate() {
                    low_keys[lo + i] = *l;
                    slots[lo + i] = *n;
                }
            }
        }
        let min_threshold = sketches
            .iter()
            .flatten()
            .map(|s| s.threshold())
            .min()
            .unwrap_or(0);
        Self {
            node_thresholds,
            min_threshold,
            has_digest,
            low_bits,
            directory,
            low_keys,
            slots,
            node_of_slot,
            group_slots,
        }
    }

    pub fn node_count(&self) -> usize {
        self.node_thresholds.len()
    }

    pub fn has_digest(&self, node: usize) -> bool {
        self.has_digest[node]
    }

    pub fn node_threshold(&self, node: usize) -> u64 {
        self.node_thresholds[node]
    }

    /// Heap bytes held by the index.
    pub fn memory_bytes(&self) -> usize {
        self.directory.len() * 4
            + self.low_keys.len() * 4
            + self.slots.len() * 4
            + self.node_thresholds.len() * 9
            + self.node_of_slot.len() * 4
            + self.group_slots.len() * 4
    }

    /// Calls `visit(node)` for every node holding `key` (only nodes whose threshold covers it).
    #[inline]
    pub fn for_each_holder(&self, key: u64, mut visit: impl FnMut(usize)) {
        let b = (key >> self.low_bits) as usize;
        if b + 1 >= self.directory.len() {
            return;
        }
        let (lo, hi) = (self.directory[b] as usize, self.directory[b + 1] as usize);
        let low = (key & ((1u64 << self.low_bits) - 1)) as u32;
        let slice = &self.low_keys[lo..hi];
        let start = slice.partition_point(|l| *l < low);
        for i in lo + start..hi {
            if self.low_keys[i] != low {
                break;
            }
            let node = self.node_of_slot[self.slots[i] as usize] as usize;
            if key < self.node_thresholds[node] {
                visit(node);
            }
        }
    }

    /// For every node, how many of the VM's sampled keys it holds. `hits` is resized to the
    /// node count and overwritten.
    pub fn count_hits(&self, vm: &RegionSketch, hits: &mut Vec<u32>) {
        self.count_slots(vm, hits, &[(0, self.node_of_slot.len() as u32)]);
    }

    /// As [`OverlapIndex::count_hits`], for the nodes of the work groups `groups` only; every
    /// other node gets 0.
    pub fn count_hits_in(&self, vm: &RegionSketch, hits: &mut Vec<u32>, groups: &[usize]) {
        let ranges: Vec<(u32, u32)> = groups
            .iter()
            .filter(|&&g| g + 1 < self.group_slots.len())
            .map(|&g| (self.group_slots[g], self.group_slots[g + 1]))
            .filter(|(lo, hi)| lo < hi)
            .collect();
        self.count_slots(vm, hits, &ranges);
    }

    /// Counts, per node, the VM's keys held by the slots in `ranges`, into `hits` by node.
    fn count_slots(&self, vm: &RegionSketch, hits: &mut Vec<u32>, ranges: &[(u32, u32)]) {
        let everything = ranges == [(0, self.node_of_slot.len() as u32)];
        let mut by_slot = vec![0u32; self.node_of_slot.len()];
        let low_mask = (1u64 << self.low_bits) - 1;
        for &key in vm.keys() {
            let postings = self.postings(key, low_mask);
            for &(lo, hi) in ranges {
                let run = if everything {
                    postings
                } else {
                    let start = postings.partition_point(|&s| s < lo);
                    let len = postings[start..].partition_point(|&s| s < hi);
                    &postings[start..start + len]
                };
                if key < self.min_threshold {
                    // Hot path: every node sampled this key's range, so each posting is a
                    // hit. Shared image regions have thousands of postings; this loop is the
                    // ranking's cost.
                    for &s in run {
                        by_slot[s as usize] += 1;
                    }
                } else {
                    for &s in run {
                        let node = self.node_of_slot[s as usize] as usize;
                        if key < self.node_thresholds[node] {
                            by_slot[s as usize] += 1;
                        }
                    }
                }
            }
        }
        hits.clear();
        hits.resize(self.node_count(), 0);
        for (slot, &n) in self.node_of_slot.iter().enumerate() {
            hits[n as usize] = by_slot[slot];
        }
    }

    /// The nodes holding `key` when every node's threshold covers it (no per-node check
    /// needed), else `None`.
    #[inline]
    pub fn holders_unchecked(&self, key: u64) -> Option<impl Iterator<Item = usize> + '_> {
        (key < self.min_threshold).then(|| {
            self.postings(key, (1u64 << self.low_bits) - 1)
                .iter()
                .map(|&s| self.node_of_slot[s as usize] as usize)
        })
    }

    /// The slots holding `key`, in slot order.
    #[inline]
    fn postings(&self, key: u64, low_mask: u64) -> &[u32] {
        let b = (key >> self.low_bits) as usize;
        if b + 1 >= self.directory.len() {
            return &[];
        }
        let (lo, hi) = (self.directory[b] as usize, self.directory[b + 1] as usize);
        let low = (key & low_mask) as u32;
        let keys = &self.low_keys[lo..hi];
        let start = keys.partition_point(|l| *l < low);
        let end = start + keys[start..].partition_point(|l| *l == low);
        &self.slots[lo + start..lo + end]
    }

    /// The VM's keys a node could have sampled: the denominator of its overlap fraction.
    pub fn sampled_for(&self, vm: &RegionSketch, node: usize) -> u32 {
        vm.count_below(self.node_thresholds[node])
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::sketch::{RegionSketch, KEY_SPACE};

    #[test]
    fn index_counts_match_pairwise_overlap() {
        use rand::{Rng, SeedableRng};
        let mut rng = rand::rngs::StdRng::seed_from_u64(7);
        let pool: Vec<u64> = (0..20_000).map(|_| rng.random::<u64>() >> 24).collect();
        let mut sketches = Vec::new();
        for i in 0..20 {
            let keys: Vec<u64> = pool
                .iter()
                .copied()
                .filter(|_| rng.random_bool(0.3))
                .collect();
            let t = if i % 3 == 0 { KEY_SPACE / 2 } else { KEY_SPACE };
            sketches.push(RegionSketch::from_keys(t, keys));
        }
        let vm = RegionSketch::from_keys(KEY_SPACE, pool[..5000].iter().copied());
        let refs: Vec<Option<&RegionSketch>> = sketches.iter().map(Some).chain([None]).collect();
        let index = OverlapIndex::build(&refs);
        let mut hits = Vec::new();
        index.count_hits(&vm, &mut hits);
        for (i, s) in sketches.iter().enumerate() {
            let o = vm.overlap(s);
            assert_eq!(hits[i], o.hits, "node {i}");
            assert_eq!(index.sampled_for(&vm, i), o.sampled, "node {i}");
        }
        assert_eq!(hits[20], 0);
        assert!(!index.has_digest(20));

        // The same nodes in three work groups: counting inside some of them gives exactly
        // their nodes' counts, and 0 elsewhere.
        let group_of: Vec<usize> = (0..21).map(|i| (i * 7) % 3).collect();
        let grouped = OverlapIndex::build_grouped(&refs, &group_of);
        let mut all = Vec::new();
        grouped.count_hits(&vm, &mut all);
        assert_eq!(all, hits);
        let mut some = Vec::new();
        grouped.count_hits_in(&vm, &mut some, &[2, 0]);
        for i in 0..21 {
            let want = if group_of[i] == 1 { 0 } else { hits[i] };
            assert_eq!(some[i], want, "node {i} in group {}", group_of[i]);
        }
        grouped.count_hits_in(&vm, &mut some, &[]);
        assert!(some.iter().all(|&h| h == 0));
        grouped.count_hits_in(&vm, &mut some, &[9]);
        assert!(
            some.iter().all(|&h| h == 0),
            "an unknown work group holds nothing"
        );
    }

    #[test]
    fn empty_index_answers_nothing() {
        let index = OverlapIndex::build(&[]);
        let mut hits = vec![1, 2, 3];
        index.count_hits(&RegionSketch::from_keys(KEY_SPACE, [1, 2, 3]), &mut hits);
        assert!(hits.is_empty());
    }
}
