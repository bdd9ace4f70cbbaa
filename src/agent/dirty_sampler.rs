//! Dirty-rate estimation without soft-dirty bits: keep a random sample of pages ("probes")
//! with a hash of each, re-read them every interval, and take the fraction that changed as the
//! fraction of the guest dirtied in that interval. With `p` probes the estimate's standard error
//! is `sqrt(f(1-f)/p)` of the guest size, independent of the guest size, and one interval costs
//! `p` page reads (16 MiB for the default 4,096 probes) instead of a full scan.
//!
//! Probes live a few intervals and are replaced at random, so over time the sample covers the
//! whole guest, and a probe seen over several intervals tells whether its page is part of the
//! writable working set (written again and again) or was written once.

use rand::{Rng, SeedableRng};
use xxhash_rust::xxh3::xxh3_64;

use crate::plan::region::PAGE_SIZE;

use super::memory_reader::ProcessMemory;
use super::AgentError;

/// Probes per VM by default.
pub const DEFAULT_PROBES: usize = 4096;
/// Intervals a probe lives before it is replaced.
const LIFETIME: u8 = 8;
/// Intervals over which the working set is measured.
const WORKING_SET_WINDOW: u8 = 4;

#[derive(Clone, Copy, Debug)]
struct Probe {
    addr: u64,
    hash: u64,
    /// Comparisons made so far.
    observations: u8,
    /// Bit i: the page changed in the comparison i intervals ago.
    history: u8,
    expires: u8,
}

/// The estimate from one interval.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct DirtyEstimate {
    /// Probes compared against an earlier hash (0 at the first interval).
    pub observed: usize,
    pub changed: usize,
    /// Estimated fraction of the guest written during the interval.
    pub dirty_fraction: f64,
    /// Estimated bytes written during the interval (distinct pages).
    pub dirty_bytes: u64,
    /// Estimated bytes written in any of the last few intervals.
    pub working_set_bytes: u64,
    /// Addresses of probes that changed (their regions are worth re-hashing).
    pub changed_addrs: Vec<u64>,
}

#[derive(Debug)]
pub struct DirtySampler {
    probes: Vec<Probe>,
    target: usize,
    rng: rand::rngs::StdRng,
}

impl DirtySampler {
    pub fn new(target: usize, seed: u64) -> Self {
        Self {
            probes: Vec::new(),
            target: target.max(1),
            rng: rand::rngs::StdRng::seed_from_u64(seed),
        }
    }

    fn random_page(&mut self, ranges: &[(u64, u64)], total_pages: u64) -> u64 {
        let mut k = self.rng.random_range(0..total_pages);
        for &(start, len) in ranges {
            let pages = len / PAGE_SIZE as u64;
            if k < pages {
                return start + k * PAGE_SIZE as u64;
            }
            k -= pages;
        }
        ranges[0].0
    }

    /// One interval: compares every probe with its last hash, retires old probes and adds
    /// fresh ones. `None` when the process exited. `ranges` are the guest's (start, length).
    pub fn observe(
        &mut self,
        mem: &ProcessMemory,
        ranges: &[(u64, u64)],
    ) -> Result<Option<DirtyEstimate>, AgentError> {
        let total_bytes: u64 = ranges.iter().map(|r| r.1).sum();
        let total_pages = total_bytes / PAGE_SIZE as u64;
        if total_pages == 0 {
            self.probes.clear();
            return Ok(Some(DirtyEstimate::default()));
        }
        // Probes outside the current ranges (memory unplugged) are dropped.
        self.probes.retain(|p| {
            ranges
                .iter()
                .any(|&(s, l)| p.addr >= s && p.addr + PAGE_SIZE as u64 <= s + l)
        });
        let first_cohort = self.probes.is_empty();
        let mut est = DirtyEstimate::default();
        let hashes = match read_hashes(mem, self.probes.iter().map(|p| p.addr))? {
            Some(h) => h,
            None => return Ok(None),
        };
        for (p, h) in self.probes.iter_mut().zip(hashes) {
            let Some(h) = h else { continue };
            let changed = h != p.hash;
            p.hash = h;
            p.observations = p.observations.saturating_add(1);
            p.history = (p.history << 1) | changed as u8;
            est.observed += 1;
            if changed {
                est.changed += 1;
                est.changed_addrs.push(p.addr);
            }
        }
        let window_mask = (1u8 << WORKING_SET_WINDOW) - 1;
        let (mut ws_seen, mut ws_hit) = (0usize, 0usize);
        for p in &self.probes {
            if p.observations >= WORKING_SET_WINDOW {
                ws_seen += 1;
                ws_hit += (p.history & window_mask != 0) as usize;
            }
        }
        if est.observed > 0 {
            est.dirty_fraction = est.changed as f64 / est.observed as f64;
            est.dirty_bytes = (est.dirty_fraction * total_bytes as f64) as u64;
            let ws_fraction = if ws_seen > 0 {
                ws_hit as f64 / ws_seen as f64
            } else {
                est.dirty_fraction
            };
            est.working_set_bytes = (ws_fraction * total_bytes as f64) as u64;
        }
        // Retire old probes, then top up with new ones (hashed now: their baseline).
        self.probes.retain(|p| p.observations < p.expires);
        let want = self.target.min(total_pages as usize);
        let mut fresh = Vec::with_capacity(want.saturating_sub(self.probes.len()));
        while self.probes.len() + fresh.len() < want {
            let addr = self.random_page(ranges, total_pages);
            // The first cohort expires at staggered ages so later replacements spread out.
            let expires = if first_cohort {
                self.rng.random_range(WORKING_SET_WINDOW..=LIFETIME)
            } else {
                LIFETIME
            };
            fresh.push(Probe {
                addr,
                hash: 0,
                observations: 0,
                history: 0,
                expires,
            });
        }
        match read_hashes(mem, fresh.iter().map(|p| p.addr))? {
            Some(hashes) => {
                for (mut p, h) in fresh.into_iter().zip(hashes) {
                    if let Some(h) = h {
                        p.hash = h;
                        self.probes.push(p);
                    }
                }
            }
            None => return Ok(None),
        }
        Ok(Some(est))
    }

    pub fn probes(&self) -> usize {
        self.probes.len()
    }
}

/// Hashes of the pages at `addrs`; `None` per page that could not be read, `None` overall if
/// the process exited.
fn read_hashes(
    mem: &ProcessMemory,
    addrs: impl Iterator<Item = u64>,
) -> Result<Option<Vec<Option<u64>>>, AgentError> {
    let addrs: Vec<u64> = addrs.collect();
    let mut out = Vec::with_capacity(addrs.len());
    let mut buf = vec![0u8; 256 * PAGE_SIZE];
    for batch in addrs.chunks(256) {
        let mut parts: Vec<(u64, &mut [u8])> = batch
            .iter()
            .zip(buf.chunks_mut(PAGE_SIZE))
            .map(|(a, b)| (*a, b))
            .collect();
        let Some(ok) = mem.read_many(&mut parts)? else {
            return Ok(None);
        };
        for ((_, page), ok) in parts.iter().zip(ok) {
            out.push(ok.then(|| xxh3_64(page)));
        }
    }
    Ok(Some(out))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn own_buffer_dirtied_by_a_known_fraction() {
        let pages = 2048;
        let layout = std::alloc::Layout::from_size_align(pages * PAGE_SIZE, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size; freed below with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: live allocation of pages * PAGE_SIZE bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, pages * PAGE_SIZE) };
        let mem = ProcessMemory::open(std::process::id() as i32).unwrap();
        let ranges = [(ptr as u64, (pages * PAGE_SIZE) as u64)];
        let mut s = DirtySampler::new(pages, 7);
        let first = s.observe(&mem, &ranges).unwrap().unwrap();
        assert_eq!(first.observed, 0, "no baseline at the first interval");
        // Dirty exactly one page in four.
        for p in (0..pages).step_by(4) {
            buf[p * PAGE_SIZE] = 1;
        }
        let est = s.observe(&mem, &ranges).unwrap().unwrap();
        assert!(est.observed > pages / 2);
        assert!((est.dirty_fraction - 0.25).abs() < 0.05, "{est:?}");
        let quiet = s.observe(&mem, &ranges).unwrap().unwrap();
        assert_eq!(quiet.changed, 0);
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
    }
}
