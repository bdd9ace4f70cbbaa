//! Region sketches: bounded, mergeable summaries of a set of regions.
//!
//! Choice: consistent threshold sampling. A region is in a sketch when its identity's key
//! (the top 40 bits of the keyed [`RegionId`]) is below the sketch's threshold. Because the
//! identity is a PRF output, the decision is a uniform coin flip that every node makes the same
//! way for the same content, so `sample(A) ∩ sample(B) = sample(A ∩ B)` and the fraction of a
//! VM's sampled regions found in a node's sample estimates the fraction of the VM's regions the
//! node holds, with binomial error `sqrt(f(1-f)/m)` for `m` samples. Unlike a Bloom filter it
//! has no false positives to correct for, it merges by union, and it can be coarsened (raise the
//! bar) to fit a size bound. Serialized with Golomb-Rice coded gaps: about `log2(gap) + 2` bits
//! per entry, roughly 2.3 to 2.5 bytes for a node sketch (measured in the `planning` benchmark).

use serde::{Deserialize, Serialize};

use super::region::RegionId;

/// Bits of the identity a sketch keeps. 40 bits leave a false match rate of `m / 2^40` per
/// lookup after sampling, negligible at any realistic size.
pub const KEY_BITS: u32 = 40;
pub const KEY_SPACE: u64 = 1 << KEY_BITS;
/// Default sampling before a digest's size bound applies: one region in 16. Published digests
/// are then coarsened to fit their bound; with VM sketches node-indexed a 256 KiB digest holds
/// more than one in 64 on most nodes, so a coarser default would leave room unused (measured
/// with `commonground simulate`).
pub const DEFAULT_THRESHOLD: u64 = KEY_SPACE >> 4;
/// Entries a decoder accepts at most (far above any bounded digest).
const MAX_DECODED_ENTRIES: u64 = 4 << 20;

pub fn sketch_key(id: RegionId) -> u64 {
    id.0 >> (64 - KEY_BITS)
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SketchError {
    #[error("sketch is not valid base64: {0}")]
    Base64(String),
    #[error("sketch data is truncated")]
    Truncated,
    #[error("sketch has an unknown format version {0}")]
    Version(u8),
    #[error("sketch header is invalid: {0}")]
    Header(&'static str),
    #[error("sketch entries are not strictly increasing below the threshold")]
    Order,
    #[error("sketch is not a subset of the node sketch: {0}")]
    NotSubset(&'static str),
}

/// Format byte of a standalone sketch.
const FORMAT_STANDALONE: u8 = 1;
/// Format byte of a sketch written as positions in a node sketch.
const FORMAT_NODE_INDEXED: u8 = 2;

/// A consistent sample of region keys: every key below `threshold`, sorted, unique.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(try_from = "String", into = "String")]
pub struct RegionSketch {
    threshold: u64,
    keys: Vec<u64>,
}

/// What a VM's sample says about another set.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SampledOverlap {
    /// VM keys that both sketches could have sampled.
    pub sampled: u32,
    /// Of those, the ones present in the other set.
    pub hits: u32,
}

impl SampledOverlap {
    /// Estimated fraction of the VM's regions present in the other set; `None` without samples.
    pub fn fraction(&self) -> Option<f64> {
        (self.sampled > 0).then(|| self.hits as f64 / self.sampled as f64)
    }
}

impl Default for RegionSketch {
    fn default() -> Self {
        Self::empty(DEFAULT_THRESHOLD)
    }
}

impl RegionSketch {
    pub fn empty(threshold: u64) -> Self {
        Self {
            threshold: threshold.clamp(1, KEY_SPACE),
            keys: Vec::new(),
        }
    }

    /// Builds a sketch from identities (duplicates allowed) at `threshold`.
    pub fn from_ids(threshold: u64, ids: impl IntoIterator<Item = RegionId>) -> Self {
        Self::from_keys(threshold, ids.into_iter().map(sketch_key))
    }

    /// Builds a sketch from 40-bit keys (duplicates allowed; keys at or above the threshold
    /// are dropped).
    pub fn from_keys(threshold: u64, keys: impl IntoIterator<Item = u64>) -> Self {
        let threshold = threshold.clamp(1, KEY_SPACE);
        let mut keys: Vec<u64> = keys.into_iter().filter(|k| *k < threshold).collect();
        keys.sort_unstable();
        keys.dedup();
        Self { threshold, keys }
    }

    pub fn threshold(&self) -> u64 {
        self.threshold
    }

    pub fn keys(&self) -> &[u64] {
        &self.keys
    }

    pub fn len(&self) -> usize {
        self.keys.len()
    }

    pub fn is_empty(&self) -> bool {
        self.keys.is_empty()
    }

    /// Probability that a region is sampled.
    pub fn sample_rate(&self) -> f64 {
        self.threshold as f64 / KEY_SPACE as f64
    }

    /// Estimated number of distinct regions in the summarised set.
    pub fn estimated_distinct(&self) -> f64 {
        self.keys.len() as f64 / self.sample_rate()
    }

    pub fn contains(&self, key: u64) -> bool {
        key < self.threshold && self.keys.binary_search(&key).is_ok()
    }

    /// Raises the bar to `threshold` (never lowers it): what a coarser sketch would hold.
    pub fn coarsen(&mut self, threshold: u64) {
        if threshold < self.threshold {
            self.threshold = threshold.max(1);
            let keep = self.keys.partition_point(|k| *k < self.threshold);
            self.keys.truncate(keep);
        }
    }

    /// Keeps at most `max_entries` by lowering the threshold to the first dropped key, so the
    /// result is still an exact consistent sample.
    pub fn limit(&mut self, max_entries: usize) {
        if self.keys.len() > max_entries {
            self.threshold = self.keys[max_entries].max(1);
            self.keys.truncate(max_entries);
        }
    }

    /// Union of two sketches at the coarser of their thresholds.
    pub fn union(&self, other: &RegionSketch) -> RegionSketch {
        Self::union_all([self, other])
    }

    pub fn union_all<'a>(sketches: impl IntoIterator<Item = &'a RegionSketch>) -> RegionSketch {
        let sketches: Vec<&RegionSketch> = sketches.into_iter().collect();
        let threshold = sketches
            .iter()
            .map(|s| s.threshold)
            .min()
            .unwrap_or(DEFAULT_THRESHOLD);
        let mut keys: Vec<u64> = sketches
            .iter()
            .flat_map(|s| s.keys.iter().copied().take_while(|k| *k < threshold))
            .collect();
        keys.sort_unstable();
        keys.dedup();
        RegionSketch { threshold, keys }
    }

    /// How much of the set `self` summarises is found in `other`, at the coarser threshold.
    pub fn overlap(&self, other: &RegionSketch) -> SampledOverlap {
        let t = self.threshold.min(other.threshold);
        let a = &self.keys[..self.keys.partition_point(|k| *k < t)];
        let b = &other.keys[..other.keys.partition_point(|k| *k < t)];
        let (mut i, mut j, mut hits) = (0, 0, 0u32);
        while i < a.len() && j < b.len() {
            match a[i].cmp(&b[j]) {
                std::cmp::Ordering::Less => i += 1,
                std::cmp::Ordering::Greater => j += 1,
                std::cmp::Ordering::Equal => {
                    hits += 1;
                    i += 1;
                    j += 1;
                }
            }
        }
        SampledOverlap {
            sampled: a.len() as u32,
            hits,
        }
    }

    /// Number of keys below `t`.
    pub fn count_below(&self, t: u64) -> u32 {
        self.keys.partition_point(|k| *k < t) as u32
    }

    /// Serialized form: version byte, varint threshold, varint count, Rice parameter, then the
    /// Rice-coded gaps between consecutive keys.
    pub fn encode(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(12 + self.keys.len() * 3);
        out.push(FORMAT_STANDALONE);
        put_varint(&mut out, self.threshold);
        put_rice_increasing(out, &self.keys, self.threshold)
    }

    pub fn decode(data: &[u8]) -> Result<Self, SketchError> {
        let (&version, mut rest) = data.split_first().ok_or(SketchError::Truncated)?;
        if version != FORMAT_STANDALONE {
            return Err(SketchError::Version(version));
        }
        let threshold = get_varint(&mut rest)?;
        if threshold == 0 || threshold > KEY_SPACE {
            return Err(SketchError::Header("threshold out of range"));
        }
        let keys = get_rice_increasing(rest, threshold)?;
        Ok(Self { threshold, keys })
    }

    /// Writes this sketch relative to `node`, which must hold every key of it at a threshold at
    /// least as high (as a node sketch does for the VMs it was built from): version byte 2,
    /// varint threshold (this sketch's), varint count, Rice parameter, then the Rice-coded gaps
    /// between the positions of the keys in `node`'s sorted list.
    pub fn encode_subset_of(&self, node: &RegionSketch) -> Result<Vec<u8>, SketchError> {
        if self.threshold > node.threshold {
            return Err(SketchError::NotSubset(
                "threshold is above the node sketch's",
            ));
        }
        let mut positions = Vec::with_capacity(self.keys.len());
        let mut from = 0;
        for key in &self.keys {
            match node.keys[from..].binary_search(key) {
                Ok(i) => {
                    positions.push((from + i) as u64);
                    from += i + 1;
                }
                Err(_) => return Err(SketchError::NotSubset("a key is missing from the node")),
            }
        }
        let mut out = Vec::with_capacity(12 + positions.len());
        out.push(FORMAT_NODE_INDEXED);
        put_varint(&mut out, self.threshold);
        Ok(put_rice_increasing(
            out,
            &positions,
            node.count_below(self.threshold) as u64,
        ))
    }

    /// Reads what [`encode_subset_of`](Self::encode_subset_of) wrote against the same `node`.
    /// Positions past the node's keys below the threshold, or a threshold above the node's, are
    /// errors.
    pub fn decode_subset_of(node: &RegionSketch, data: &[u8]) -> Result<Self, SketchError> {
        let (&version, mut rest) = data.split_first().ok_or(SketchError::Truncated)?;
        if version != FORMAT_NODE_INDEXED {
            return Err(SketchError::Version(version));
        }
        let threshold = get_varint(&mut rest)?;
        if threshold == 0 || threshold > node.threshold {
            return Err(SketchError::Header(
                "threshold out of range for the node sketch",
            ));
        }
        let below = node.count_below(threshold) as u64;
        let positions = get_rice_increasing(rest, below)?;
        let keys = positions
            .into_iter()
            .map(|p| node.keys[p as usize])
            .collect();
        Ok(Self { threshold, keys })
    }

    /// Reads either form, by its version byte: standalone, or positions in `node`.
    pub fn decode_for_node(node: &RegionSketch, data: &[u8]) -> Result<Self, SketchError> {
        match data.first() {
            Some(&FORMAT_NODE_INDEXED) => Self::decode_subset_of(node, data),
            _ => Self::decode(data),
        }
    }

    /// base64 of [`encode_subset_of`](Self::encode_subset_of).
    pub fn to_base64_subset_of(&self, node: &RegionSketch) -> Result<String, SketchError> {
        use base64::Engine;
        Ok(base64::engine::general_purpose::STANDARD.encode(self.encode_subset_of(node)?))
    }

    /// base64 of either form, read with [`decode_for_node`](Self::decode_for_node).
    pub fn from_base64_for_node(node: &RegionSketch, text: &str) -> Result<Self, SketchError> {
        Self::decode_for_node(node, &base64_bytes(text)?)
    }

    pub fn to_base64(&self) -> String {
        use base64::Engine;
        base64::engine::general_purpose::STANDARD.encode(self.encode())
    }

    pub fn from_base64(text: &str) -> Result<Self, SketchError> {
        Self::decode(&base64_bytes(text)?)
    }
}

fn base64_bytes(text: &str) -> Result<Vec<u8>, SketchError> {
    use base64::Engine;
    base64::engine::general_purpose::STANDARD
        .decode(text.trim())
        .map_err(|e| SketchError::Base64(e.to_string()))
}

/// Appends varint count, Rice parameter and the Rice-coded gaps of `values` (strictly
/// increasing, all below `bound`); the parameter is `floor(log2(mean gap))`.
fn put_rice_increasing(mut out: Vec<u8>, values: &[u64], bound: u64) -> Vec<u8> {
    let n = values.len() as u64;
    let mean_gap = bound / (n + 1);
    let k = if mean_gap <= 1 {
        0
    } else {
        // Capped so an empty or nearly empty sketch over the full key space stays decodable.
        (63 - mean_gap.leading_zeros()).min(KEY_BITS - 1)
    };
    put_varint(&mut out, n);
    out.push(k as u8);
    out.reserve((values.len() * (k as usize + 2)).div_ceil(8));
    let mut bits = BitWriter::new(out);
    let mut prev = 0u64;
    for (i, &v) in values.iter().enumerate() {
        let gap = if i == 0 { v } else { v - prev - 1 };
        prev = v;
        for _ in 0..(gap >> k) {
            bits.push(1, 1);
        }
        bits.push(0, 1);
        if k > 0 {
            bits.push(gap & ((1u64 << k) - 1), k);
        }
    }
    bits.finish()
}

/// Reads what [`put_rice_increasing`] wrote; every value must be below `bound` (at most
/// [`KEY_SPACE`]) and strictly increasing.
fn get_rice_increasing(mut rest: &[u8], bound: u64) -> Result<Vec<u64>, SketchError> {
    let n = get_varint(&mut rest)?;
    if n > MAX_DECODED_ENTRIES || n > bound {
        return Err(SketchError::Header("too many entries"));
    }
    let (&k, rest) = rest.split_first().ok_or(SketchError::Truncated)?;
    if k as u32 >= KEY_BITS {
        return Err(SketchError::Header("Rice parameter out of range"));
    }
    // Each entry takes at least k + 1 bits; refuse counts the data cannot hold before
    // allocating for them.
    if (n as u128) * (k as u128 + 1) > rest.len() as u128 * 8 {
        return Err(SketchError::Truncated);
    }
    let mut bits = BitReader::new(rest);
    let mut values = Vec::with_capacity(n as usize);
    let mut prev: Option<u64> = None;
    for _ in 0..n {
        let mut q = 0u64;
        while bits.read(1)? == 1 {
            q += 1;
            if q > bound >> k {
                return Err(SketchError::Order);
            }
        }
        let r = if k > 0 { bits.read(k as u32)? } else { 0 };
        let gap = (q << k) | r;
        let v = match prev {
            None => gap,
            Some(p) => p
                .checked_add(gap)
                .and_then(|v| v.checked_add(1))
                .ok_or(SketchError::Order)?,
        };
        if v >= bound {
            return Err(SketchError::Order);
        }
        values.push(v);
        prev = Some(v);
    }
    Ok(values)
}

impl From<RegionSketch> for String {
    fn from(s: RegionSketch) -> String {
        s.to_base64()
    }
}

impl TryFrom<String> for RegionSketch {
    type Error = SketchError;
    fn try_from(s: String) -> Result<Self, SketchError> {
        RegionSketch::from_base64(&s)
    }
}

fn put_varint(out: &mut Vec<u8>, mut v: u64) {
    while v >= 0x80 {
        out.push((v as u8) | 0x80);
        v >>= 7;
    }
    out.push(v as u8);
}

fn get_varint(data: &mut &[u8]) -> Result<u64, SketchError> {
    let mut v = 0u64;
    for shift in (0..64).step_by(7) {
        let (&b, rest) = data.split_first().ok_or(SketchError::Truncated)?;
        *data = rest;
        v |= ((b & 0x7f) as u64) << shift;
        if b < 0x80 {
            return Ok(v);
        }
    }
    Err(SketchError::Header("varint too long"))
}

struct BitWriter {
    out: Vec<u8>,
    acc: u64,
    used: u32,
}

impl BitWriter {
    fn new(out: Vec<u8>) -> Self {
        Self {
            out,
            acc: 0,
            used: 0,
        }
    }

    /// Appends the low `n` bits of `value`, most significant first (n <= 56).
    fn push(&mut self, value: u64, n: u32) {
        self.acc = (self.acc << n) | value;
        self.used += n;
        while self.used >= 8 {
            self.used -= 8;
            self.out.push((self.acc >> self.used) as u8);
        }
        self.acc &= (1u64 << self.used) - 1;
    }

    fn finish(mut self) -> Vec<u8> {
        if self.used > 0 {
            self.out.push((self.acc << (8 - self.used)) as u8);
        }
        self.out
    }
}

struct BitReader<'a> {
    data: &'a [u8],
    pos: usize,
}

impl<'a> BitReader<'a> {
    fn new(data: &'a [u8]) -> Self {
        Self { data, pos: 0 }
    }

    fn read(&mut self, n: u32) -> Result<u64, SketchError> {
        let mut v = 0u64;
        for _ in 0..n {
            let byte = *self.data.get(self.pos / 8).ok_or(SketchError::Truncated)?;
            let bit = (byte >> (7 - (self.pos % 8))) & 1;
            v = (v << 1) | bit as u64;
            self.pos += 1;
        }
        Ok(v)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use rand::{Rng, SeedableRng};

    fn random_keys(seed: u64, n: usize) -> Vec<u64> {
        let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
        (0..n).map(|_| rng.random::<u64>() >> 24).collect()
    }

    #[test]
    fn encode_decode_round_trip_and_size() {
        let s = RegionSketch::from_keys(DEFAULT_THRESHOLD, random_keys(1, 4_000_000));
        assert!(s.len() > 50_000);
        let bytes = s.encode();
        let per_entry = bytes.len() as f64 / s.len() as f64;
        assert!(per_entry < 2.5, "{per_entry} bytes per entry");
        assert_eq!(RegionSketch::decode(&bytes).unwrap(), s);
        let json = serde_json::to_string(&s).unwrap();
        let back: RegionSketch = serde_json::from_str(&json).unwrap();
        assert_eq!(back, s);
    }

    #[test]
    fn empty_and_single_entry_sketches_round_trip_at_any_threshold() {
        for t in [1, 2, KEY_SPACE >> 16, KEY_SPACE / 2, KEY_SPACE] {
            let empty = RegionSketch::empty(t);
            assert_eq!(
                RegionSketch::decode(&empty.encode()).unwrap(),
                empty,
                "t={t}"
            );
            let one = RegionSketch::from_keys(t, [t - 1]);
            assert_eq!(RegionSketch::decode(&one.encode()).unwrap(), one, "t={t}");
        }
    }

    #[test]
    fn garbage_is_an_error_not_a_panic() {
        assert_eq!(RegionSketch::decode(&[]), Err(SketchError::Truncated));
        assert_eq!(RegionSketch::decode(&[9]), Err(SketchError::Version(9)));
        assert!(RegionSketch::decode(&[1, 0x80]).is_err());
        assert!(RegionSketch::decode(&[1, 0x80, 0x80, 0x80, 0x80, 0x80, 0x80, 1, 5, 3]).is_err());
        assert!(RegionSketch::from_base64("!!!").is_err());
        let mut bytes = RegionSketch::from_keys(KEY_SPACE, random_keys(2, 100)).encode();
        bytes.truncate(bytes.len() - 3);
        assert!(RegionSketch::decode(&bytes).is_err());
    }

    #[test]
    fn limit_keeps_a_consistent_sample() {
        let keys = random_keys(3, 10_000);
        let mut s = RegionSketch::from_keys(KEY_SPACE, keys.clone());
        s.limit(1000);
        assert_eq!(s.len(), 1000);
        let direct = RegionSketch::from_keys(s.threshold(), keys);
        assert_eq!(direct, s);
    }

    #[test]
    fn union_uses_the_coarser_threshold() {
        let a = RegionSketch::from_keys(KEY_SPACE / 2, random_keys(4, 1000));
        let b = RegionSketch::from_keys(KEY_SPACE / 4, random_keys(5, 1000));
        let u = a.union(&b);
        assert_eq!(u.threshold(), KEY_SPACE / 4);
        assert!(u.keys().iter().all(|k| *k < KEY_SPACE / 4));
        assert!(u.keys().windows(2).all(|w| w[0] < w[1]));
    }

    /// A node of `n` random keys at `threshold` and a VM holding every `one_in`-th of them.
    fn node_and_vm(seed: u64, n: usize, one_in: usize) -> (RegionSketch, RegionSketch) {
        let node = RegionSketch::from_keys(DEFAULT_THRESHOLD, random_keys(seed, n));
        let vm = RegionSketch::from_keys(
            node.threshold(),
            node.keys().iter().copied().step_by(one_in.max(1)),
        );
        (node, vm)
    }

    #[test]
    fn subset_encoding_round_trips_and_costs_log_share_bits() {
        let (node, vm) = node_and_vm(6, 6_000_000, 32);
        assert!(vm.len() > 2_500, "{}", vm.len());
        let bytes = vm.encode_subset_of(&node).unwrap();
        assert_eq!(bytes[0], 2);
        assert_eq!(RegionSketch::decode_subset_of(&node, &bytes).unwrap(), vm);
        assert_eq!(RegionSketch::decode_for_node(&node, &bytes).unwrap(), vm);
        // log2(32) + 2 = 7 bits per key (regular gaps here: the Rice remainder is exact), against
        // about 19 bits for the standalone form.
        let bits = (bytes.len() * 8) as f64 / vm.len() as f64;
        assert!(bits < 7.2, "{bits} bits per entry");
        let standalone = vm.encode().len();
        assert!(
            bytes.len() * 2 < standalone,
            "{} vs {standalone}",
            bytes.len()
        );
        let text = vm.to_base64_subset_of(&node).unwrap();
        assert_eq!(
            RegionSketch::from_base64_for_node(&node, &text).unwrap(),
            vm
        );
        // The standalone form still reads through the node-aware decoder.
        assert_eq!(
            RegionSketch::from_base64_for_node(&node, &vm.to_base64()).unwrap(),
            vm
        );
    }

    #[test]
    fn subset_encoding_of_a_random_share_is_near_log2_plus_two_bits() {
        let node = RegionSketch::from_keys(KEY_SPACE >> 4, random_keys(7, 3_000_000));
        let mut rng = rand::rngs::StdRng::seed_from_u64(8);
        let vm = RegionSketch::from_keys(
            node.threshold(),
            node.keys()
                .iter()
                .copied()
                .filter(|_| rng.random_ratio(1, 20)),
        );
        let bytes = vm.encode_subset_of(&node).unwrap();
        let bits = (bytes.len() * 8) as f64 / vm.len() as f64;
        let bound = (node.len() as f64 / vm.len() as f64).log2() + 2.0;
        assert!(bits < bound, "{bits} bits per entry, bound {bound}");
        assert_eq!(RegionSketch::decode_subset_of(&node, &bytes).unwrap(), vm);
    }

    #[test]
    fn subset_encoding_at_a_coarser_threshold_and_empty() {
        let (node, vm) = node_and_vm(9, 200_000, 3);
        let mut coarse = vm.clone();
        coarse.coarsen(node.threshold() / 3);
        assert!(!coarse.is_empty() && coarse.len() < vm.len());
        let bytes = coarse.encode_subset_of(&node).unwrap();
        let back = RegionSketch::decode_subset_of(&node, &bytes).unwrap();
        assert_eq!(back, coarse);
        assert_eq!(back.threshold(), node.threshold() / 3);
        let empty = RegionSketch::empty(node.threshold());
        let bytes = empty.encode_subset_of(&node).unwrap();
        assert_eq!(
            RegionSketch::decode_subset_of(&node, &bytes).unwrap(),
            empty
        );
        let empty_node = RegionSketch::empty(node.threshold());
        assert_eq!(
            RegionSketch::decode_subset_of(&empty_node, &bytes).unwrap(),
            empty
        );
    }

    #[test]
    fn subset_encoding_refuses_what_is_not_a_subset() {
        let (node, vm) = node_and_vm(10, 10_000, 4);
        let mut finer = RegionSketch::from_keys(node.threshold() * 2, vm.keys().to_vec());
        assert_eq!(
            finer.encode_subset_of(&node),
            Err(SketchError::NotSubset(
                "threshold is above the node sketch's"
            ))
        );
        finer.coarsen(node.threshold());
        assert!(finer.encode_subset_of(&node).is_ok());
        let missing = (0..node.threshold()).find(|k| !node.contains(*k)).unwrap();
        let mut keys = vm.keys().to_vec();
        keys.push(missing);
        let stray = RegionSketch::from_keys(node.threshold(), keys);
        assert_eq!(
            stray.encode_subset_of(&node),
            Err(SketchError::NotSubset("a key is missing from the node"))
        );
    }

    #[test]
    fn subset_garbage_is_an_error_not_a_panic() {
        let (node, vm) = node_and_vm(11, 50_000, 5);
        let bytes = vm.encode_subset_of(&node).unwrap();
        // Read against a smaller node: positions run past its keys.
        let small =
            RegionSketch::from_keys(node.threshold(), node.keys()[..node.len() / 2].to_vec());
        assert!(RegionSketch::decode_subset_of(&small, &bytes).is_err());
        // A node at a coarser threshold than the VM's.
        let mut coarse = node.clone();
        coarse.coarsen(node.threshold() / 2);
        assert_eq!(
            RegionSketch::decode_subset_of(&coarse, &bytes),
            Err(SketchError::Header(
                "threshold out of range for the node sketch"
            ))
        );
        let mut cut = bytes.clone();
        cut.truncate(cut.len() - 2);
        assert!(RegionSketch::decode_subset_of(&node, &cut).is_err());
        assert_eq!(
            RegionSketch::decode_subset_of(&node, &[]),
            Err(SketchError::Truncated)
        );
        assert_eq!(
            RegionSketch::decode_subset_of(&node, &vm.encode()),
            Err(SketchError::Version(1))
        );
        assert_eq!(
            RegionSketch::decode(&bytes),
            Err(SketchError::Version(2)),
            "a reader without the node refuses the indexed form"
        );
        // More entries than the node holds below the threshold.
        let mut many = vec![2u8];
        put_varint(&mut many, node.threshold());
        put_varint(&mut many, node.len() as u64 + 1);
        many.extend([0u8; 64]);
        assert_eq!(
            RegionSketch::decode_subset_of(&node, &many),
            Err(SketchError::Header("too many entries"))
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(12))]
        /// The overlap estimate stays within 2 percentage points of the exact fraction once a VM
        /// has about 16,000 samples (binomial sigma <= 0.4 points, so a failure is a 5-sigma event).
        #[test]
        fn overlap_estimate_within_two_points(seed in 0u64..10_000, frac in 0.0f64..1.0) {
            let vm_regions = 262_144usize; // 16 GiB of 64 KiB regions
            let common = (vm_regions as f64 * frac) as usize;
            let all = random_keys(seed, vm_regions + 300_000);
            let vm = &all[..vm_regions];
            let node: Vec<u64> = all[..common].iter().chain(&all[vm_regions..]).copied().collect();
            let t = KEY_SPACE >> 4;
            let est = RegionSketch::from_keys(t, vm.iter().copied())
                .overlap(&RegionSketch::from_keys(t, node))
                .fraction()
                .unwrap();
            let exact = common as f64 / vm_regions as f64;
            prop_assert!((est - exact).abs() < 0.02, "est {est} exact {exact}");
        }

        #[test]
        fn decode_never_panics(data in proptest::collection::vec(any::<u8>(), 0..64)) {
            let _ = RegionSketch::decode(&data);
        }

        #[test]
        fn subset_decode_never_panics(
            seed in 0u64..1000,
            n in 0usize..300,
            data in proptest::collection::vec(any::<u8>(), 0..64),
        ) {
            let node = RegionSketch::from_keys(KEY_SPACE >> 8, random_keys(seed, n));
            let mut framed = vec![2u8];
            framed.extend(&data);
            let _ = RegionSketch::decode_subset_of(&node, &data);
            let _ = RegionSketch::decode_for_node(&node, &data);
            if let Ok(s) = RegionSketch::decode_subset_of(&node, &framed) {
                prop_assert!(s.threshold() <= node.threshold());
                prop_assert!(s.keys().iter().all(|k| node.contains(*k) && *k < s.threshold()));
            }
        }

        #[test]
        fn subset_round_trip_any_share(
            seed in 0u64..1000,
            shift in 0u32..12,
            n in 0usize..5000,
            one_in in 1u32..64,
            coarser in 0u32..3,
        ) {
            let node = RegionSketch::from_keys(KEY_SPACE >> shift, random_keys(seed, n));
            let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ 0x5eed);
            let mut vm = RegionSketch::from_keys(
                node.threshold(),
                node.keys().iter().copied().filter(|_| rng.random_ratio(1, one_in)),
            );
            vm.coarsen(node.threshold() >> coarser);
            let bytes = vm.encode_subset_of(&node).unwrap();
            prop_assert_eq!(RegionSketch::decode_subset_of(&node, &bytes).unwrap(), vm);
        }

        #[test]
        fn round_trip_any_threshold(seed in 0u64..1000, shift in 0u32..20, n in 0usize..5000) {
            let s = RegionSketch::from_keys(KEY_SPACE >> shift, random_keys(seed, n));
            prop_assert_eq!(RegionSketch::decode(&s.encode()).unwrap(), s);
        }
    }
}
