//! Scanning benchmarks (numbers, not assertions): first-scan throughput per core, the sampled
//! fallback's cost per interval against a full scan, its dirty-rate error against a writer at a
//! known rate, and the per-VM state the agent keeps. The process scans its own memory through
//! the same `process_vm_readv` path the agent uses on QEMU.
//!
//! `cargo bench --bench scan` (set `SCAN_BENCH_MIB` to change the 1 GiB guest size).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

use commonground::agent::dirty_sampler::{DirtySampler, DEFAULT_PROBES};
use commonground::agent::memory_reader::ProcessMemory;
use commonground::agent::scan::{MemoryScan, RegionState};
use commonground::plan::region::{RegionGeometry, PAGE_SIZE};

struct Guest {
    ptr: *mut u8,
    len: usize,
}

// SAFETY: the mapping is plain memory; the writer thread only does volatile byte writes.
unsafe impl Send for Guest {}
unsafe impl Sync for Guest {}

fn guest(len: usize) -> Guest {
    // SAFETY: anonymous private mapping, checked.
    let ptr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    assert_ne!(ptr, libc::MAP_FAILED);
    // SAFETY: fresh mapping of len bytes.
    let mem = unsafe { std::slice::from_raw_parts_mut(ptr as *mut u8, len) };
    // A guest-like mix: 1/4 zero regions, the rest pseudo-random (xorshift per word).
    let mut x = 0x2545_F491_4F6C_DD1Du64;
    for (i, region) in mem.chunks_mut(65536).enumerate() {
        if i % 4 == 0 {
            continue;
        }
        for w in region.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            w.copy_from_slice(&x.to_le_bytes()[..w.len()]);
        }
    }
    Guest {
        ptr: ptr as *mut u8,
        len,
    }
}

fn main() {
    let mib: usize = std::env::var("SCAN_BENCH_MIB")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1024);
    let len = mib << 20;
    let g = Arc::new(guest(len));
    let mem = ProcessMemory::open(std::process::id() as i32).unwrap();
    let ranges = [(g.ptr as u64, len as u64)];
    let geometry = RegionGeometry::default();

    // First scan, single thread = one core.
    let mut best = f64::MAX;
    let mut scan = None;
    for _ in 0..3 {
        let t = Instant::now();
        let s = MemoryScan::full(&mem, &ranges, geometry, &mut |_| {}).unwrap();
        best = best.min(t.elapsed().as_secs_f64());
        scan = Some(s);
    }
    let scan = scan.unwrap();
    let gib = len as f64 / (1u64 << 30) as f64;
    println!(
        "first scan: {mib} MiB in {:.1} ms = {:.2} GiB/s per core ({} regions, {} zero)",
        best * 1e3,
        gib / best,
        scan.counts().regions,
        scan.counts().zero_regions
    );
    let state = scan.region_slots() * std::mem::size_of::<RegionState>();
    println!(
        "per-VM region state: {:.1} MiB per {mib} MiB of guest ({} bytes per region)",
        state as f64 / (1 << 20) as f64,
        std::mem::size_of::<RegionState>()
    );

    // Sampled fallback: cost of one interval.
    let mut sampler = DirtySampler::new(DEFAULT_PROBES, 1);
    sampler.observe(&mem, &ranges).unwrap();
    let t = Instant::now();
    let rounds = 20;
    for _ in 0..rounds {
        sampler.observe(&mem, &ranges).unwrap();
    }
    let per = t.elapsed().as_secs_f64() / rounds as f64;
    println!(
        "sampled fallback: {:.2} ms per interval with {} probes = {:.2}% of a full scan",
        per * 1e3,
        DEFAULT_PROBES,
        100.0 * per / best
    );

    // Dirty-rate error against a writer at a known rate: sequential pages, one byte each,
    // paced to `rate` bytes per second, never wrapping within the measurement.
    for rate_mib in [8u64, 64] {
        let rate = rate_mib << 20;
        let interval = Duration::from_secs(1);
        let intervals = 3;
        let stop = Arc::new(AtomicBool::new(false));
        let writer = {
            let g = g.clone();
            let stop = stop.clone();
            std::thread::spawn(move || {
                let start = Instant::now();
                let mut page = 0usize;
                let pages = g.len / PAGE_SIZE;
                while !stop.load(Ordering::Relaxed) {
                    let due = (start.elapsed().as_secs_f64() * rate as f64) as usize / PAGE_SIZE;
                    while page < due.min(pages) {
                        // SAFETY: page < pages, inside the mapping.
                        unsafe {
                            let p = g.ptr.add(page * PAGE_SIZE);
                            std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
                        }
                        page += 1;
                    }
                    std::thread::sleep(Duration::from_millis(1));
                }
            })
        };
        let mut s = DirtySampler::new(DEFAULT_PROBES, 7);
        s.observe(&mem, &ranges).unwrap();
        let mut last = Instant::now();
        let mut errors = Vec::new();
        for _ in 0..intervals {
            std::thread::sleep(interval);
            let est = s.observe(&mem, &ranges).unwrap().unwrap();
            let now = Instant::now();
            let measured = est.dirty_bytes as f64 / now.duration_since(last).as_secs_f64();
            last = now;
            errors.push((measured - rate as f64) / rate as f64);
        }
        stop.store(true, Ordering::Relaxed);
        writer.join().unwrap();
        let rms = (errors.iter().map(|e| e * e).sum::<f64>() / errors.len() as f64).sqrt();
        println!(
            "sampled dirty rate vs writer at {rate_mib} MiB/s on {mib} MiB: errors {} (rms {:.1}%)",
            errors
                .iter()
                .map(|e| format!("{:+.1}%", e * 100.0))
                .collect::<Vec<_>>()
                .join(" "),
            rms * 100.0
        );
    }
    let rss = std::fs::read_to_string("/proc/self/status")
        .unwrap_or_default()
        .lines()
        .find(|l| l.starts_with("VmRSS"))
        .unwrap_or("")
        .to_string();
    println!("bench process {rss} (includes the {mib} MiB guest it scans)");
}
