//! The target node's content store: the guest memory of the VMs already on the node, indexed
//! by region identity, read on demand.
//!
//! The index keeps, per distinct region content, its identity and where one copy lives (which
//! process, which address): 8 + 4 + 8 bytes of entry plus the hash table's control byte and
//! slack, about 24–32 bytes per indexed 64 KiB region (0.05% of the memory indexed; the
//! bound is 0.1%). Memory content itself is never kept: a reference is rebuilt by reading
//! the region again from the process (`process_vm_readv`), and the rebuilder checks what it
//! read against the source's verifier, so a region that changed since it was indexed, or a
//! process that exited, only costs a resend.
//!
//! Regions are cut at addresses that are multiples of the region size. QEMU maps guest RAM at
//! 2 MiB-aligned addresses, so these are the same regions as a RAM block's offsets in the
//! migration stream.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::sync::Arc;
use std::time::Instant;

use crate::agent::memory_reader::{ProcessMemory, ReadOutcome};
use crate::agent::proc_maps::{self, MemorySelection};
use crate::agent::scan::{MemoryScan, RegionState};
use crate::agent::{discover, AgentError};
use crate::plan::region::{RegionGeometry, PAGE_SIZE};
use crate::relay::rebuild::RegionReader;
use crate::relay::stream::RegionNamer;

/// Identities are already uniformly random: the table hashes them as they are.
#[derive(Default)]
pub struct IdHasher(u64);

impl Hasher for IdHasher {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for b in bytes {
            self.0 = self.0.rotate_left(8) ^ *b as u64;
        }
    }
    fn write_u64(&mut self, v: u64) {
        self.0 = v;
    }
}

pub type IdMap<V> = HashMap<u64, V, BuildHasherDefault<IdHasher>>;
pub type IdSet = std::collections::HashSet<u64, BuildHasherDefault<IdHasher>>;

#[derive(Clone, Copy, Debug)]
struct Location {
    process: u32,
    addr: u64,
}

/// What the index covers.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize)]
pub struct StoreCounts {
    pub processes: usize,
    pub bytes_indexed: u64,
    pub regions: u64,
    pub distinct_regions: u64,
    /// Bytes the index itself takes (entries and table slack).
    pub index_bytes: u64,
}

pub struct ContentStore {
    namer: Arc<RegionNamer>,
    processes: Vec<ProcessMemory>,
    index: IdMap<Location>,
    counts: StoreCounts,
    built: Instant,
}

impl ContentStore {
    pub fn empty(namer: Arc<RegionNamer>) -> Self {
        Self {
            namer,
            processes: Vec::new(),
            index: IdMap::default(),
            counts: StoreCounts::default(),
            built: Instant::now(),
        }
    }

    /// Indexes the guest RAM of these QEMU processes (found as the agent finds it). A process
    /// that cannot be read is skipped with a warning: the store is an optimisation.
    pub fn build(namer: Arc<RegionNamer>, pids: &[i32]) -> Self {
        let mut store = Self::empty(namer);
        for &pid in pids {
            if let Err(e) = store.add_process(pid) {
                tracing::warn!(pid, error = %e, "relay store: process not indexed");
            }
        }
        store.counts.distinct_regions = store.index.len() as u64;
        store.counts.index_bytes = index_bytes(&store.index);
        store.counts.processes = store.processes.len();
        store
    }

    /// The KubeVirt QEMU processes of this host (the agent's discovery).
    pub fn node_pids() -> Vec<i32> {
        discover::find_qemu_processes_with(None)
            .map(|ps| ps.into_iter().map(|p| p.pid).collect())
            .unwrap_or_default()
    }

    pub fn counts(&self) -> StoreCounts {
        self.counts
    }

    pub fn age(&self) -> std::time::Duration {
        self.built.elapsed()
    }

    /// The identities held, for the source relay.
    pub fn ids(&self) -> Vec<u64> {
        self.index.keys().copied().collect()
    }

    fn add_process(&mut self, pid: i32) -> Result<(), AgentError> {
        let mem = ProcessMemory::open(pid)?;
        let argv = discover::read_argv(pid).map_err(|e| AgentError::io(pid, "cmdline", e))?;
        let blocks = discover::guest_ram_blocks(&argv);
        let maps = proc_maps::read_maps(pid)?;
        let rb = self.namer.region_bytes() as u64;
        let ranges: Vec<(u64, u64)> = proc_maps::select(&maps, &MemorySelection::GuestRam(blocks))
            .iter()
            .filter_map(|m| {
                let start = m.start.div_ceil(rb) * rb;
                let end = m.end / rb * rb;
                (end > start).then_some((start, end - start))
            })
            .collect();
        let geometry = RegionGeometry::new(self.namer.pages_per_region() as u32)
            .map_err(|e| AgentError::Argument(e.to_string()))?;
        let scan = MemoryScan::full(&mem, &ranges, geometry, &mut |_| {})?;
        let process = self.processes.len() as u32;
        self.processes.push(mem);
        for range in &scan.ranges {
            self.counts.bytes_indexed += range.regions.len() as u64 * rb;
            for (i, state) in range.regions.iter().enumerate() {
                if let RegionState::Data(d) = state {
                    self.counts.regions += 1;
                    let id = self.namer.identify_digest(*d);
                    self.index.entry(id).or_insert(Location {
                        process,
                        addr: range.start + i as u64 * rb,
                    });
                }
            }
        }
        tracing::info!(
            pid,
            bytes = scan.ranges.iter().map(|r| r.len).sum::<u64>(),
            "relay store: process indexed"
        );
        Ok(())
    }

    pub fn reader(&self) -> StoreReader<'_> {
        StoreReader {
            store: self,
            buf: vec![0; self.namer.region_bytes()],
        }
    }
}

/// Bytes a table of this many entries takes: buckets of key and value, one control byte each,
/// at the table's capacity.
fn index_bytes(index: &IdMap<Location>) -> u64 {
    let entry = std::mem::size_of::<(u64, Location)>() as u64 + 1;
    index.capacity() as u64 * entry
}

pub struct StoreReader<'a> {
    store: &'a ContentStore,
    buf: Vec<u8>,
}

impl RegionReader for StoreReader<'_> {
    fn read(&mut self, id: u64) -> Option<&[u8]> {
        let loc = self.store.index.get(&id)?;
        let mem = self.store.processes.get(loc.process as usize)?;
        match mem.read(loc.addr, &mut self.buf) {
            Ok(ReadOutcome::Complete) => Some(&self.buf),
            _ => None,
        }
    }
}

const _: () = assert!(PAGE_SIZE == 4096);
