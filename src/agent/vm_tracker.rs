//! One VM's memory over time: the first full scan, then each interval either a soft-dirty
//! incremental rescan or, without soft-dirty, a sampled dirty-rate estimate with full rescans on
//! a slower cadence (sooner when the estimate says much has changed).

use std::collections::VecDeque;
use std::time::{Duration, Instant};

use crate::plan::region::{RegionGeometry, PAGE_SIZE};
use crate::plan::VmKey;

use super::dirty_sampler::{DirtySampler, DEFAULT_PROBES};
use super::discover;
use super::load::{self, LoadRates, ProcessCounters};
use super::memory_reader::ProcessMemory;
use super::proc_maps::{self, GuestRamRule, Mapping};
use super::scan::MemoryScan;
use super::{soft_dirty, AgentError};

/// How rescans find what changed.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RescanMode {
    /// Kernel soft-dirty bits: only dirtied regions are re-hashed.
    SoftDirty,
    /// Sampled pages estimate the dirty rate; full rescans on a slower cadence.
    Sampled,
}

impl RescanMode {
    pub fn detect() -> Self {
        if soft_dirty::supported() {
            RescanMode::SoftDirty
        } else {
            RescanMode::Sampled
        }
    }

    /// The name published in `status.scanMode`.
    pub fn as_str(&self) -> &'static str {
        match self {
            RescanMode::SoftDirty => "SoftDirty",
            RescanMode::Sampled => "Sampled",
        }
    }
}

/// When the sampled mode rescans everything.
#[derive(Clone, Copy, Debug)]
pub struct RescanPolicy {
    /// Full rescan at least this often.
    pub full_every: Duration,
    /// Full rescan sooner once this fraction of the guest is estimated to have changed since
    /// the last one, but not more often than `min_full_gap`.
    pub changed_fraction: f64,
    pub min_full_gap: Duration,
    pub probes: usize,
}

impl RescanPolicy {
    pub fn for_interval(interval: Duration) -> Self {
        Self {
            full_every: interval * 30,
            changed_fraction: 0.10,
            min_full_gap: interval * 3,
            probes: DEFAULT_PROBES,
        }
    }
}

/// What one refresh did.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RefreshOutcome {
    pub exited: bool,
    pub full_scan: bool,
    pub rehashed_regions: usize,
    pub changed_regions: usize,
}

#[derive(Debug)]
pub struct TrackedVm {
    pub vm: VmKey,
    pub pid: i32,
    pub scan: MemoryScan,
    pub maps: Vec<Mapping>,
    /// Sizes of the guest RAM blocks from the QEMU command line (`None`: unknown).
    ram_blocks: Option<Vec<u64>>,
    ranges: Vec<(u64, u64)>,
    mem: ProcessMemory,
    sampler: DirtySampler,
    last_full: Instant,
    last_refresh: Instant,
    /// Estimated fraction of the guest changed since the last full scan.
    changed_since_full: f64,
    recent_dirty: VecDeque<u64>,
    /// Bytes per second dirtied over the last interval.
    pub dirty_rate: f64,
    /// Largest amount dirtied in one of the last few intervals (sampled mode: probes written in
    /// any of the last few intervals).
    pub working_set_bytes: u64,
    counters: Option<ProcessCounters>,
    pub load: LoadRates,
}

fn guest_ranges(maps: &[Mapping], ram_blocks: Option<&[u64]>) -> (Vec<(u64, u64)>, GuestRamRule) {
    let (chosen, rule) = proc_maps::select_guest_ram(maps, ram_blocks);
    (chosen.iter().map(|m| (m.start, m.len())).collect(), rule)
}

fn log_guest_ranges(
    vm: &VmKey,
    pid: i32,
    ram_blocks: Option<&[u64]>,
    ranges: &[(u64, u64)],
    rule: GuestRamRule,
) {
    tracing::debug!(
        namespace = %vm.namespace,
        name = %vm.name,
        pid,
        ram_blocks = ?ram_blocks,
        mappings = ranges.len(),
        bytes = ranges.iter().map(|r| r.1).sum::<u64>(),
        rule = rule.as_str(),
        "guest RAM selected"
    );
}

impl TrackedVm {
    /// Opens the process and scans all of its guest RAM.
    pub fn start(
        vm: VmKey,
        pid: i32,
        geometry: RegionGeometry,
        mode: RescanMode,
        policy: &RescanPolicy,
    ) -> Result<Self, AgentError> {
        let mem = ProcessMemory::open(pid)?;
        let argv = discover::read_argv(pid).map_err(|e| AgentError::io(pid, "cmdline", e))?;
        let ram_blocks = discover::guest_ram_blocks(&argv);
        let maps = proc_maps::read_maps(pid)?;
        let (ranges, rule) = guest_ranges(&maps, ram_blocks.as_deref());
        log_guest_ranges(&vm, pid, ram_blocks.as_deref(), &ranges, rule);
        if mode == RescanMode::SoftDirty {
            soft_dirty::clear(pid)?;
        }
        let scan = MemoryScan::full(&mem, &ranges, geometry, &mut |_| {})?;
        let mut sampler = DirtySampler::new(policy.probes, pid as u64 ^ 0x636f6d6d6f6e);
        if mode == RescanMode::Sampled {
            sampler.observe(&mem, &ranges)?;
        }
        let now = Instant::now();
        Ok(Self {
            vm,
            pid,
            scan,
            maps,
            ram_blocks,
            ranges,
            mem,
            sampler,
            last_full: now,
            last_refresh: now,
            changed_since_full: 0.0,
            recent_dirty: VecDeque::new(),
            dirty_rate: 0.0,
            working_set_bytes: 0,
            counters: load::sample_process(pid).ok(),
            load: LoadRates::default(),
        })
    }

    fn full_rescan(&mut self, mode: RescanMode) -> Result<(), AgentError> {
        if mode == RescanMode::SoftDirty {
            soft_dirty::clear(self.pid)?;
        }
        self.scan = MemoryScan::full(&self.mem, &self.ranges, self.scan.geometry, &mut |_| {})?;
        self.last_full = Instant::now();
        self.changed_since_full = 0.0;
        Ok(())
    }

    fn record_dirty(&mut self, bytes: u64, secs: f64) {
        self.dirty_rate = if secs > 0.0 { bytes as f64 / secs } else { 0.0 };
        self.recent_dirty.push_back(bytes);
        while self.recent_dirty.len() > 4 {
            self.recent_dirty.pop_front();
        }
    }

    /// One interval's work for this VM.
    pub fn refresh(
        &mut self,
        mode: RescanMode,
        policy: &RescanPolicy,
    ) -> Result<RefreshOutcome, AgentError> {
        let mut out = RefreshOutcome::default();
        let now = Instant::now();
        let secs = now.duration_since(self.last_refresh).as_secs_f64();
        self.last_refresh = now;
        if !self.mem.alive() {
            out.exited = true;
            return Ok(out);
        }
        if let Ok(c) = load::sample_process(self.pid) {
            if let Some(prev) = &self.counters {
                self.load = load::rates(prev, &c);
            }
            self.counters = Some(c);
        }
        let maps = match proc_maps::read_maps(self.pid) {
            Ok(m) => m,
            Err(_) if !self.mem.alive() => {
                out.exited = true;
                return Ok(out);
            }
            Err(e) => return Err(e),
        };
        let (ranges, rule) = guest_ranges(&maps, self.ram_blocks.as_deref());
        self.maps = maps;
        if ranges != self.ranges {
            log_guest_ranges(
                &self.vm,
                self.pid,
                self.ram_blocks.as_deref(),
                &ranges,
                rule,
            );
            // Memory was hot-plugged or remapped: start over.
            self.ranges = ranges;
            self.full_rescan(mode)?;
            out.full_scan = true;
            out.exited = self.scan.exited;
            return Ok(out);
        }
        match mode {
            RescanMode::SoftDirty => {
                let rb = self.scan.geometry.region_bytes() as usize;
                let pages_per_region = rb / PAGE_SIZE;
                let mut dirty_regions = Vec::new();
                let mut dirty_page_count = 0u64;
                for (ri, &(start, len)) in self.ranges.iter().enumerate() {
                    let pages = soft_dirty::dirty_pages(self.pid, start, len)?;
                    dirty_page_count += pages.iter().filter(|d| **d).count() as u64;
                    for (i, chunk) in pages.chunks(pages_per_region).enumerate() {
                        if chunk.iter().any(|d| *d) {
                            dirty_regions.push((ri, i));
                        }
                    }
                }
                // Clear before re-reading so writes during the rehash show up next time.
                soft_dirty::clear(self.pid)?;
                out.rehashed_regions = dirty_regions.len();
                match self.scan.rehash(&self.mem, &dirty_regions)? {
                    Some(changed) => out.changed_regions = changed,
                    None => out.exited = true,
                }
                self.record_dirty(dirty_page_count * PAGE_SIZE as u64, secs);
                self.working_set_bytes = self.recent_dirty.iter().copied().max().unwrap_or(0);
                if now.duration_since(self.last_full) >= policy.full_every {
                    self.full_rescan(mode)?;
                    out.full_scan = true;
                }
            }
            RescanMode::Sampled => {
                let Some(est) = self.sampler.observe(&self.mem, &self.ranges)? else {
                    out.exited = true;
                    return Ok(out);
                };
                self.record_dirty(est.dirty_bytes, secs);
                self.working_set_bytes = est.working_set_bytes;
                self.changed_since_full =
                    1.0 - (1.0 - self.changed_since_full) * (1.0 - est.dirty_fraction);
                let since_full = now.duration_since(self.last_full);
                if since_full >= policy.full_every
                    || (self.changed_since_full >= policy.changed_fraction
                        && since_full >= policy.min_full_gap)
                {
                    self.full_rescan(mode)?;
                    out.full_scan = true;
                } else {
                    // Regions holding a probe that changed are stale: re-hash them now.
                    let mut which: Vec<(usize, usize)> = est
                        .changed_addrs
                        .iter()
                        .filter_map(|a| self.region_of(*a))
                        .collect();
                    which.sort_unstable();
                    which.dedup();
                    out.rehashed_regions = which.len();
                    match self.scan.rehash(&self.mem, &which)? {
                        Some(changed) => out.changed_regions = changed,
                        None => out.exited = true,
                    }
                }
            }
        }
        out.exited |= self.scan.exited;
        Ok(out)
    }

    fn region_of(&self, addr: u64) -> Option<(usize, usize)> {
        let rb = self.scan.geometry.region_bytes();
        self.ranges
            .iter()
            .position(|&(s, l)| addr >= s && addr < s + l)
            .map(|ri| (ri, ((addr - self.ranges[ri].0) / rb) as usize))
    }

    pub fn ranges(&self) -> &[(u64, u64)] {
        &self.ranges
    }
}
