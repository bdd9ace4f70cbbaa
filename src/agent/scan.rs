//! Scanning memory into regions (the first step of a scan): each range is cut into regions of
//! the cluster's geometry from its start, each region digested with the planning core; zero
//! regions are counted apart, unreadable regions skipped. The per-region digests are kept so
//! that a rescan can re-hash only some regions (soft-dirty) and the table can be rebuilt.

use std::io::Read;

use crate::plan::region::{
    digest_region, ClusterKey, ContentDigest, RegionContent, RegionGeometry, RegionId,
};
use crate::plan::sketch::RegionSketch;

use super::memory_reader::{ProcessMemory, ReadOutcome};
use super::AgentError;

/// Bytes read per system call during a full scan (a multiple of every region size).
const CHUNK_BYTES: usize = 4 << 20;

/// What one region turned out to be at the last look.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RegionState {
    Zero,
    Data(ContentDigest),
    /// Could not be read (fault in the target); not counted anywhere.
    Unreadable,
}

impl From<RegionContent> for RegionState {
    fn from(c: RegionContent) -> Self {
        match c {
            RegionContent::Zero => RegionState::Zero,
            RegionContent::Data(d) => RegionState::Data(d),
        }
    }
}

/// One contiguous range (a mapping, or a file) and its regions.
#[derive(Clone, Debug)]
pub struct RangeState {
    pub start: u64,
    pub len: u64,
    /// Regions from `start`, in order; shorter than the range when the scan stopped early.
    pub regions: Vec<RegionState>,
}

impl RangeState {
    fn region_len(&self, geometry: RegionGeometry, index: usize) -> u64 {
        let rb = geometry.region_bytes();
        (self.len - index as u64 * rb).min(rb)
    }
}

/// The regions of one memory source.
#[derive(Clone, Debug)]
pub struct MemoryScan {
    pub geometry: RegionGeometry,
    pub ranges: Vec<RangeState>,
    /// The process exited before the scan finished; what was read is kept.
    pub exited: bool,
}

/// Counts over a scan.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct ScanCounts {
    /// Bytes in readable regions.
    pub bytes: u64,
    pub regions: u64,
    pub zero_regions: u64,
    pub unreadable_regions: u64,
}

impl MemoryScan {
    /// Reads every range of a process and digests its regions. `progress` is called with the
    /// bytes done after each chunk. A process that exits midway gives `exited` and the regions
    /// read so far.
    pub fn full(
        mem: &ProcessMemory,
        ranges: &[(u64, u64)],
        geometry: RegionGeometry,
        progress: &mut dyn FnMut(u64),
    ) -> Result<Self, AgentError> {
        let rb = geometry.region_bytes() as usize;
        let chunk_cap = (CHUNK_BYTES / rb).max(1) * rb;
        let mut buf = vec![0u8; chunk_cap];
        let mut out = MemoryScan {
            geometry,
            ranges: Vec::with_capacity(ranges.len()),
            exited: false,
        };
        let mut done = 0u64;
        'ranges: for &(start, len) in ranges {
            let mut state = RangeState {
                start,
                len,
                regions: Vec::with_capacity(geometry.regions_in(len) as usize),
            };
            let mut off = 0u64;
            while off < len {
                let n = ((len - off) as usize).min(chunk_cap);
                let chunk = &mut buf[..n];
                let good = match mem.read(start + off, chunk)? {
                    ReadOutcome::Complete => n,
                    ReadOutcome::Partial(k) => k / rb * rb,
                    ReadOutcome::Exited => {
                        out.exited = true;
                        out.ranges.push(state);
                        break 'ranges;
                    }
                };
                state.regions.extend(
                    chunk[..good]
                        .chunks(rb)
                        .map(|r| RegionState::from(digest_region(r))),
                );
                // The rest of a faulting chunk, region by region.
                let mut r_off = good;
                while r_off < n {
                    let r_len = rb.min(n - r_off);
                    let region = &mut chunk[r_off..r_off + r_len];
                    match mem.read(start + off + r_off as u64, region)? {
                        ReadOutcome::Complete => state.regions.push(digest_region(region).into()),
                        ReadOutcome::Partial(_) => state.regions.push(RegionState::Unreadable),
                        ReadOutcome::Exited => {
                            out.exited = true;
                            out.ranges.push(state);
                            break 'ranges;
                        }
                    }
                    r_off += r_len;
                }
                off += n as u64;
                done += n as u64;
                progress(done);
            }
            out.ranges.push(state);
        }
        Ok(out)
    }

    /// Digests a file (a raw memory image) as one range. `name` is used in errors.
    pub fn file(path: &std::path::Path, geometry: RegionGeometry) -> Result<Self, AgentError> {
        let named = |e: std::io::Error| AgentError::File {
            path: path.display().to_string(),
            source: e,
        };
        let mut f = std::fs::File::open(path).map_err(named)?;
        let rb = geometry.region_bytes() as usize;
        let chunk_cap = (CHUNK_BYTES / rb).max(1) * rb;
        let mut buf = vec![0u8; chunk_cap];
        let mut state = RangeState {
            start: 0,
            len: 0,
            regions: Vec::new(),
        };
        loop {
            // Fill the chunk completely unless the file ends, so regions stay aligned.
            let mut filled = 0;
            while filled < chunk_cap {
                let k = f.read(&mut buf[filled..]).map_err(named)?;
                if k == 0 {
                    break;
                }
                filled += k;
            }
            state.regions.extend(
                buf[..filled]
                    .chunks(rb)
                    .map(|r| RegionState::from(digest_region(r))),
            );
            state.len += filled as u64;
            if filled < chunk_cap {
                break;
            }
        }
        Ok(MemoryScan {
            geometry,
            ranges: vec![state],
            exited: false,
        })
    }

    pub fn counts(&self) -> ScanCounts {
        let mut c = ScanCounts::default();
        for range in &self.ranges {
            for (i, r) in range.regions.iter().enumerate() {
                match r {
                    RegionState::Unreadable => c.unreadable_regions += 1,
                    RegionState::Zero => {
                        c.regions += 1;
                        c.zero_regions += 1;
                        c.bytes += range.region_len(self.geometry, i);
                    }
                    RegionState::Data(_) => {
                        c.regions += 1;
                        c.bytes += range.region_len(self.geometry, i);
                    }
                }
            }
        }
        c
    }

    /// Non-zero regions: (content digest, length in bytes), in address order.
    pub fn data_regions(&self) -> impl Iterator<Item = (ContentDigest, u64)> + '_ {
        self.ranges.iter().flat_map(move |range| {
            range
                .regions
                .iter()
                .enumerate()
                .filter_map(move |(i, r)| match r {
                    RegionState::Data(d) => Some((*d, range.region_len(self.geometry, i))),
                    _ => None,
                })
        })
    }

    /// Published identities of the non-zero regions (duplicates kept).
    pub fn identities(&self, key: &ClusterKey) -> Vec<RegionId> {
        self.data_regions().map(|(d, _)| key.identify(d)).collect()
    }

    pub fn sketch(&self, key: &ClusterKey, threshold: u64) -> RegionSketch {
        RegionSketch::from_ids(threshold, self.data_regions().map(|(d, _)| key.identify(d)))
    }

    /// Address and length of region `index` of range `range`.
    pub fn region_span(&self, range: usize, index: usize) -> (u64, u64) {
        let r = &self.ranges[range];
        (
            r.start + index as u64 * self.geometry.region_bytes(),
            r.region_len(self.geometry, index),
        )
    }

    /// Re-reads and re-digests the given regions (range index, region index). Returns how many
    /// changed, or `None` if the process exited.
    pub fn rehash(
        &mut self,
        mem: &ProcessMemory,
        which: &[(usize, usize)],
    ) -> Result<Option<usize>, AgentError> {
        let rb = self.geometry.region_bytes() as usize;
        let mut changed = 0;
        for batch in which.chunks(64) {
            let mut bufs: Vec<Vec<u8>> = batch.iter().map(|_| vec![0u8; rb]).collect();
            let mut parts: Vec<(u64, &mut [u8])> = batch
                .iter()
                .zip(bufs.iter_mut())
                .map(|(&(ri, i), b)| {
                    let (addr, len) = self.region_span(ri, i);
                    (addr, &mut b[..len as usize])
                })
                .collect();
            let Some(ok) = mem.read_many(&mut parts)? else {
                self.exited = true;
                return Ok(None);
            };
            for ((&(ri, i), (_, buf)), ok) in batch.iter().zip(parts.iter()).zip(ok) {
                let new = if ok {
                    RegionState::from(digest_region(buf))
                } else {
                    RegionState::Unreadable
                };
                if let Some(slot) = self.ranges[ri].regions.get_mut(i) {
                    if *slot != new {
                        changed += 1;
                        *slot = new;
                    }
                }
            }
        }
        Ok(Some(changed))
    }

    /// Total regions covered (read or not) by the ranges.
    pub fn region_slots(&self) -> usize {
        self.ranges.iter().map(|r| r.regions.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::region::PAGE_SIZE;

    #[test]
    fn scans_own_buffer_with_zero_and_data_regions() {
        let g = RegionGeometry::new(4).unwrap();
        let rb = g.region_bytes() as usize;
        // Page-aligned buffer: regions are cut from its start.
        let layout = std::alloc::Layout::from_size_align(rb * 5, PAGE_SIZE).unwrap();
        // SAFETY: non-zero size layout; freed below with the same layout.
        let ptr = unsafe { std::alloc::alloc_zeroed(layout) };
        assert!(!ptr.is_null());
        // SAFETY: ptr is a live allocation of rb * 5 bytes.
        let buf = unsafe { std::slice::from_raw_parts_mut(ptr, rb * 5) };
        buf[rb + 5] = 1;
        buf[3 * rb..4 * rb].fill(9);
        let mem = ProcessMemory::open(std::process::id() as i32).unwrap();
        let mut calls = 0;
        let scan = MemoryScan::full(&mem, &[(ptr as u64, (rb * 5) as u64)], g, &mut |_| {
            calls += 1
        })
        .unwrap();
        let c = scan.counts();
        assert_eq!(
            (c.regions, c.zero_regions, c.bytes),
            (5, 3, (rb * 5) as u64)
        );
        assert_eq!(scan.data_regions().count(), 2);
        assert!(calls >= 1);
        buf[rb + 5] = 0;
        let changed = scan.clone().rehash(&mem, &[(0, 1), (0, 3)]).unwrap();
        assert_eq!(changed, Some(1));
        // SAFETY: allocated above with this layout.
        unsafe { std::alloc::dealloc(ptr, layout) };
    }
}
