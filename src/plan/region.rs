//! Memory regions: how guest memory is cut up and how a region's content is named.
//!
//! Two names per region (seed 000, table entry field C):
//! - a fast local [`ContentDigest`] (xxh3-128), never published;
//! - a published [`RegionId`]: SipHash-2-4 of the digest under the cluster key. SipHash is a
//!   PRF designed for short inputs, so someone without the key cannot confirm a guess of
//!   memory content from a published identity.
//!
//! All-zero regions are recognised and counted apart: they cost nothing to migrate
//! (QEMU skips zero pages) and would otherwise dominate every overlap.

use serde::{Deserialize, Serialize};
use siphasher::sip::SipHasher24;
use std::hash::Hasher;
use xxhash_rust::xxh3::xxh3_128;

/// Size of a base page.
pub const PAGE_SIZE: usize = 4096;

/// Default region size in base pages (16 pages = 64 KiB); see `simulate --region-sweep`
/// for the measurement behind it.
pub const DEFAULT_REGION_PAGES: u32 = 16;

/// The geometry every node in a cluster must share for their identities to be comparable.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegionGeometry {
    pub pages_per_region: u32,
}

impl Default for RegionGeometry {
    fn default() -> Self {
        Self {
            pages_per_region: DEFAULT_REGION_PAGES,
        }
    }
}

impl RegionGeometry {
    pub fn new(pages_per_region: u32) -> Result<Self, RegionError> {
        if pages_per_region == 0 || pages_per_region > 512 {
            return Err(RegionError::BadGeometry(pages_per_region));
        }
        Ok(Self { pages_per_region })
    }

    pub fn region_bytes(&self) -> u64 {
        self.pages_per_region as u64 * PAGE_SIZE as u64
    }

    /// Number of regions (the last one possibly partial) covering `bytes`.
    pub fn regions_in(&self, bytes: u64) -> u64 {
        bytes.div_ceil(self.region_bytes())
    }
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RegionError {
    #[error("region size must be 1..=512 pages, got {0}")]
    BadGeometry(u32),
    #[error("cluster key must be 32 hex characters (16 bytes), got {0} characters")]
    BadKey(usize),
}

/// Fast local 128-bit content digest of one region. Never leaves the node.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct ContentDigest(pub u128);

/// Published identity of a region's content: keyed PRF of its [`ContentDigest`].
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct RegionId(pub u64);

/// The cluster-wide secret that keys published identities, with a short public id so that
/// digests made under different keys are never compared.
#[derive(Clone)]
pub struct ClusterKey {
    key: [u8; 16],
    pub key_id: String,
}

impl std::fmt::Debug for ClusterKey {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never print the key material.
        f.debug_struct("ClusterKey")
            .field("key_id", &self.key_id)
            .finish()
    }
}

impl ClusterKey {
    pub fn new(key: [u8; 16]) -> Self {
        // The key id is itself a PRF output of a fixed label, so it reveals nothing of the key.
        let mut h = SipHasher24::new_with_key(&key);
        h.write(b"commonground key id");
        let key_id = format!("{:016x}", h.finish());
        Self { key, key_id }
    }

    /// Parses 32 hex characters (whitespace around them is ignored).
    pub fn from_hex(text: &str) -> Result<Self, RegionError> {
        let text = text.trim();
        if text.len() != 32 || !text.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err(RegionError::BadKey(text.len()));
        }
        let mut key = [0u8; 16];
        for (i, byte) in key.iter_mut().enumerate() {
            *byte = u8::from_str_radix(&text[2 * i..2 * i + 2], 16)
                .map_err(|_| RegionError::BadKey(text.len()))?;
        }
        Ok(Self::new(key))
    }

    /// A fixed key for local tools and tests. Digests made with it are only comparable with
    /// each other; a cluster uses a key from its Secret.
    pub fn development() -> Self {
        Self::new(*b"commonground-dev")
    }

    /// A 32-byte key for another purpose, derived from the cluster key and a context string
    /// (BLAKE3's key derivation), so no two uses ever share key material.
    pub fn derive_key(&self, context: &str) -> [u8; 32] {
        blake3::derive_key(context, &self.key)
    }

    pub fn identify(&self, digest: ContentDigest) -> RegionId {
        let mut h = SipHasher24::new_with_key(&self.key);
        h.write_u128(digest.0);
        RegionId(h.finish())
    }
}

/// What one region of memory turned out to be.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionContent {
    Zero,
    Data(ContentDigest),
}

/// Digest of `len` zero bytes, computed once per length and cached per thread.
fn zero_digest(len: usize) -> ContentDigest {
    thread_local! {
        static CACHE: std::cell::RefCell<Vec<(usize, u128)>> = const { std::cell::RefCell::new(Vec::new()) };
    }
    CACHE.with(|cache| {
        let mut cache = cache.borrow_mut();
        if let Some((_, d)) = cache.iter().find(|(l, _)| *l == len) {
            return ContentDigest(*d);
        }
        let d = xxh3_128(&vec![0u8; len]);
        cache.push((len, d));
        ContentDigest(d)
    })
}

/// Digest of one region's bytes; zero regions are recognised by comparing with the digest of
/// an all-zero region of the same length, so the bytes are read only once.
pub fn digest_region(bytes: &[u8]) -> RegionContent {
    let d = ContentDigest(xxh3_128(bytes));
    if d == zero_digest(bytes.len()) {
        RegionContent::Zero
    } else {
        RegionContent::Data(d)
    }
}

/// Cuts `bytes` (which start on a region boundary) into regions and digests each.
pub fn digest_regions(
    bytes: &[u8],
    geometry: RegionGeometry,
) -> impl Iterator<Item = RegionContent> + '_ {
    bytes
        .chunks(geometry.region_bytes() as usize)
        .map(digest_region)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn zero_regions_are_recognised_at_any_length() {
        let g = RegionGeometry::new(4).unwrap();
        let mut mem = vec![0u8; 4 * PAGE_SIZE * 3 + PAGE_SIZE];
        mem[4 * PAGE_SIZE + 17] = 1;
        let kinds: Vec<_> = digest_regions(&mem, g).collect();
        assert_eq!(kinds.len(), 4);
        assert_eq!(kinds[0], RegionContent::Zero);
        assert!(matches!(kinds[1], RegionContent::Data(_)));
        assert_eq!(kinds[2], RegionContent::Zero);
        assert_eq!(
            kinds[3],
            RegionContent::Zero,
            "partial trailing region of zeros"
        );
    }

    #[test]
    fn same_content_same_identity_and_key_changes_identity() {
        let a = vec![7u8; PAGE_SIZE * 16];
        let RegionContent::Data(d) = digest_region(&a) else {
            panic!("non-zero content must not be a zero region")
        };
        let k1 = ClusterKey::development();
        let k2 = ClusterKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
        assert_eq!(k1.identify(d), k1.identify(d));
        assert_ne!(k1.identify(d), k2.identify(d));
        assert_ne!(k1.key_id, k2.key_id);
    }

    #[test]
    fn bad_keys_and_geometries_are_rejected() {
        assert_eq!(
            ClusterKey::from_hex("xyz").unwrap_err(),
            RegionError::BadKey(3)
        );
        assert!(ClusterKey::from_hex("zz112233445566778899aabbccddeeff").is_err());
        assert_eq!(RegionGeometry::new(0), Err(RegionError::BadGeometry(0)));
        assert_eq!(RegionGeometry::new(16).unwrap().region_bytes(), 65536);
        assert_eq!(RegionGeometry::new(16).unwrap().regions_in(65537), 2);
    }

    #[test]
    fn debug_output_never_shows_the_key() {
        let k = ClusterKey::from_hex("00112233445566778899aabbccddeeff").unwrap();
        assert!(!format!("{k:?}").contains("0011"));
    }
}
