//! `commonground digest`: scans processes (a QEMU guest's RAM; any other process's private
//! writable memory) or raw memory image files, and prints per source its regions, zero regions
//! and bytes, and for every pair the exact regions in common and the estimate the planner would
//! make from the sketches.
//!
//! Common regions of a pair (a, b): a's non-zero regions whose content b also holds, counted
//! with repeats in a (what a migration from a to b would not have to send); common bytes sums
//! their lengths. The estimate is a's sampled fraction found in b's sample times a's non-zero
//! regions.

use std::collections::HashSet;
use std::path::PathBuf;

use serde::Serialize;

use crate::agent::discover::{guest_ram_blocks, is_qemu, read_argv};
use crate::agent::memory_reader::ProcessMemory;
use crate::agent::proc_maps::{self, MemorySelection};
use crate::agent::scan::MemoryScan;
use crate::agent::AgentError;
use crate::plan::region::{ClusterKey, ContentDigest, RegionGeometry, PAGE_SIZE};
use crate::plan::sketch::{RegionSketch, KEY_SPACE};

#[derive(clap::Args, Debug)]
pub struct DigestArgs {
    /// A process to scan (repeatable).
    #[arg(long = "pid")]
    pub pids: Vec<i32>,
    /// A raw memory image file to scan (repeatable).
    #[arg(long = "file")]
    pub files: Vec<PathBuf>,
    /// Region size in bytes (a multiple of 4096, at most 2 MiB).
    #[arg(long, default_value_t = 65536)]
    pub region_size: u64,
    /// Print JSON instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, thiserror::Error)]
pub enum DigestError {
    #[error("give at least one --pid or --file")]
    NoSources,
    #[error("--region-size {0}: must be a multiple of 4096 between 4096 and 2097152")]
    RegionSize(u64),
    #[error("pid {pid}: {source}")]
    Pid { pid: i32, source: AgentError },
    #[error("file {path}: {source}")]
    File { path: String, source: AgentError },
    #[error("process {0} exited before its scan finished")]
    Exited(i32),
    #[error("writing output: {0}")]
    Output(#[from] std::io::Error),
}

#[derive(Debug, Serialize, PartialEq, Eq)]
pub struct SourceReport {
    pub name: String,
    pub bytes: u64,
    pub regions: u64,
    pub zero_regions: u64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct PairReport {
    pub a: String,
    pub b: String,
    pub common_regions: u64,
    pub common_bytes: u64,
    pub estimated_common_regions: f64,
}

#[derive(Debug, Serialize, PartialEq)]
pub struct DigestReport {
    pub sources: Vec<SourceReport>,
    pub pairs: Vec<PairReport>,
}

/// Samples a sketch aims for per source: fine enough that the estimate is within a fraction of
/// a percentage point, yet bounded for huge sources.
const TARGET_SAMPLES: u64 = 65_536;

struct Scanned {
    name: String,
    scan: MemoryScan,
}

/// Scans one process: guest RAM for QEMU, private writable memory otherwise.
pub fn scan_pid(pid: i32, geometry: RegionGeometry) -> Result<MemoryScan, AgentError> {
    let mem = ProcessMemory::open(pid)?;
    let argv = read_argv(pid).map_err(|e| AgentError::io(pid, "cmdline", e))?;
    let selection = if is_qemu(&argv) {
        MemorySelection::GuestRam(guest_ram_blocks(&argv))
    } else {
        MemorySelection::PrivateWritable
    };
    let maps = proc_maps::read_maps(pid)?;
    let ranges: Vec<(u64, u64)> = proc_maps::select(&maps, &selection)
        .iter()
        .map(|m| (m.start, m.len()))
        .collect();
    MemoryScan::full(&mem, &ranges, geometry, &mut |_| {})
}

fn compare(a: &Scanned, b: &Scanned, key: &ClusterKey) -> PairReport {
    let in_b: HashSet<ContentDigest> = b.scan.data_regions().map(|(d, _)| d).collect();
    let (mut common_regions, mut common_bytes) = (0u64, 0u64);
    for (d, len) in a.scan.data_regions() {
        if in_b.contains(&d) {
            common_regions += 1;
            common_bytes += len;
        }
    }
    let nonzero = |s: &MemoryScan| {
        let c = s.counts();
        c.regions - c.zero_regions
    };
    let threshold = |n: u64| {
        if n <= TARGET_SAMPLES {
            KEY_SPACE
        } else {
            ((KEY_SPACE as u128 * TARGET_SAMPLES as u128 / n as u128) as u64).max(1)
        }
    };
    let (na, nb) = (nonzero(&a.scan), nonzero(&b.scan));
    let sa: RegionSketch = a.scan.sketch(key, threshold(na));
    let sb: RegionSketch = b.scan.sketch(key, threshold(nb));
    let estimated_common_regions = sa.overlap(&sb).fraction().unwrap_or(0.0) * na as f64;
    PairReport {
        a: a.name.clone(),
        b: b.name.clone(),
        common_regions,
        common_bytes,
        estimated_common_regions,
    }
}

/// Scans every source and compares every pair.
pub fn digest(args: &DigestArgs) -> Result<DigestReport, DigestError> {
    if args.pids.is_empty() && args.files.is_empty() {
        return Err(DigestError::NoSources);
    }
    let rs = args.region_size;
    if rs == 0 || !rs.is_multiple_of(PAGE_SIZE as u64) || rs > 512 * PAGE_SIZE as u64 {
        return Err(DigestError::RegionSize(rs));
    }
    let geometry = RegionGeometry::new((rs / PAGE_SIZE as u64) as u32)
        .map_err(|_| DigestError::RegionSize(rs))?;
    let key = ClusterKey::development();
    let mut scanned = Vec::new();
    for &pid in &args.pids {
        let scan = scan_pid(pid, geometry).map_err(|source| DigestError::Pid { pid, source })?;
        if scan.exited {
            return Err(DigestError::Exited(pid));
        }
        scanned.push(Scanned {
            name: format!("pid:{pid}"),
            scan,
        });
    }
    for path in &args.files {
        let scan = MemoryScan::file(path, geometry).map_err(|source| DigestError::File {
            path: path.display().to_string(),
            source,
        })?;
        scanned.push(Scanned {
            name: format!("file:{}", path.display()),
            scan,
        });
    }
    let sources = scanned
        .iter()
        .map(|s| {
            let c = s.scan.counts();
            SourceReport {
                name: s.name.clone(),
                bytes: c.bytes,
                regions: c.regions,
                zero_regions: c.zero_regions,
            }
        })
        .collect();
    let mut pairs = Vec::new();
    for i in 0..scanned.len() {
        for j in i + 1..scanned.len() {
            pairs.push(compare(&scanned[i], &scanned[j], &key));
        }
    }
    Ok(DigestReport { sources, pairs })
}

pub fn run(args: DigestArgs) -> Result<(), DigestError> {
    let report = digest(&args)?;
    let mut out = std::io::stdout().lock();
    use std::io::Write;
    if args.json {
        serde_json::to_writer(&mut out, &report).map_err(std::io::Error::other)?;
        writeln!(out)?;
        return Ok(());
    }
    writeln!(
        out,
        "{:<40} {:>16} {:>10} {:>12}",
        "SOURCE", "BYTES", "REGIONS", "ZERO"
    )?;
    for s in &report.sources {
        writeln!(
            out,
            "{:<40} {:>16} {:>10} {:>12}",
            s.name, s.bytes, s.regions, s.zero_regions
        )?;
    }
    if !report.pairs.is_empty() {
        writeln!(out)?;
        writeln!(
            out,
            "{:<30} {:<30} {:>10} {:>16} {:>12}",
            "A", "B", "COMMON", "COMMON BYTES", "ESTIMATE"
        )?;
        for p in &report.pairs {
            writeln!(
                out,
                "{:<30} {:<30} {:>10} {:>16} {:>12.1}",
                p.a, p.b, p.common_regions, p.common_bytes, p.estimated_common_regions
            )?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn files_with_a_shared_prefix_overlap_exactly() {
        let dir = tempfile::tempdir().unwrap();
        let rb = 65536usize;
        let shared: Vec<u8> = (0..rb * 8)
            .map(|i| (i * 7 % 251) as u8 ^ (i / rb) as u8)
            .collect();
        let mut a = shared.clone();
        a.extend((0..rb * 2).map(|i| (i % 13) as u8 + 1));
        a.extend(vec![0u8; rb * 3]);
        let mut b = shared;
        b.extend((0..rb * 4).map(|i| (i % 17) as u8 + 100));
        let (pa, pb) = (dir.path().join("a.img"), dir.path().join("b.img"));
        std::fs::write(&pa, &a).unwrap();
        std::fs::write(&pb, &b).unwrap();
        let report = digest(&DigestArgs {
            pids: vec![],
            files: vec![pa, pb],
            region_size: rb as u64,
            json: true,
        })
        .unwrap();
        assert_eq!(report.sources[0].regions, 13);
        assert_eq!(report.sources[0].zero_regions, 3);
        assert_eq!(report.sources[1].bytes, (rb * 12) as u64);
        let p = &report.pairs[0];
        assert_eq!((p.common_regions, p.common_bytes), (8, (rb * 8) as u64));
        // Sources this small are sampled completely, so the estimate is exact too.
        assert_eq!(p.estimated_common_regions, 8.0);
    }

    #[test]
    fn bad_region_size_and_missing_file_are_named() {
        let bad = DigestArgs {
            pids: vec![],
            files: vec![PathBuf::from("/nonexistent/image")],
            region_size: 1000,
            json: false,
        };
        assert!(matches!(digest(&bad), Err(DigestError::RegionSize(1000))));
        let missing = DigestArgs {
            region_size: 65536,
            ..bad
        };
        let err = digest(&missing).unwrap_err().to_string();
        assert!(err.contains("/nonexistent/image"), "{err}");
    }
}
