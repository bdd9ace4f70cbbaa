//! `simulate --region-sweep`: how region size trades match rate against summary size.
//!
//! Page-level content model of two VMs of one image (each 2 GiB, every page materialised as a
//! 64-bit content id, 0 for a zero page):
//! - the image's shared content is a pool of runs of identical pages; each VM holds each run
//!   with probability 0.7;
//! - 10% of the runs are 2 MiB huge-page runs (kernel image, THP-backed memory): a guest places
//!   them at 2 MiB-aligned guest-physical addresses, so their phase is the same in both VMs;
//! - the other runs (page-cache folios and readahead windows: mostly 1-16 pages, some
//!   16-256) and the private runs land wherever the guest allocator put them: page-aligned
//!   but not region-aligned, so two VMs rarely place them at the same offset modulo a region;
//! - zero runs fill the gaps (free memory).
//!
//! For each region size the sweep reports the match rate (non-zero bytes of VM A found in
//! regions identical to one of VM B's, over the non-zero bytes of A whose content B holds at
//! all) and what a node summary costs at that size: regions on a 512 GiB node of such VMs,
//! the sketch size at the default sampling rate, and the agent's exact region table.

use std::collections::HashSet;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::plan::sketch::{RegionSketch, DEFAULT_THRESHOLD};

use super::digest_budget::DIGEST_LIMIT_BYTES;
use super::synthetic::mix64;

const VM_PAGES: usize = 512 * 1024; // 2 GiB
const HUGE: usize = 512;
pub const REGION_SIZES: [usize; 7] = [1, 2, 4, 8, 16, 32, 64];
const NODE_BYTES: f64 = 512.0 * (1u64 << 30) as f64;
/// Bytes per entry of an agent's exact region table (identity, count, hash-map overhead).
const TABLE_BYTES_PER_REGION: f64 = 24.0;
/// What an agent may spend on its exact table for a 512 GiB node.
const TABLE_LIMIT_BYTES: f64 = 512.0 * (1u64 << 20) as f64;

#[derive(Clone, Debug, Serialize)]
pub struct SweepRow {
    pub region_pages: usize,
    pub match_rate: f64,
    /// Match rate relative to 1-page regions.
    pub relative_to_pages: f64,
    pub node_regions: f64,
    pub sketch_entries_default_rate: f64,
    pub sketch_bytes_default_rate: f64,
    /// Sampling needed for a node sketch and its VM sketches to fit the digest bound.
    pub sample_one_in_to_fit: f64,
    pub agent_table_bytes: f64,
}

#[derive(Clone, Debug, Serialize)]
pub struct Sweep {
    pub pairs: usize,
    pub shared_fraction: f64,
    pub rows: Vec<SweepRow>,
    pub recommended_region_pages: usize,
}

struct Run {
    id: u64,
    len: usize,
    aligned: bool,
}

fn geometric(rng: &mut impl Rng, mean: f64) -> usize {
    let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    ((u.ln() / (1.0 - 1.0 / mean).ln()).floor() as usize).max(1)
}

fn image_runs(rng: &mut impl Rng, shared_pages: usize) -> Vec<Run> {
    let mut runs = Vec::new();
    let mut total = 0;
    let mut id = 1u64;
    while total < shared_pages {
        let x: f64 = rng.random();
        let (len, aligned) = if x < 0.10 {
            (HUGE, true)
        } else if x < 0.75 {
            (rng.random_range(1..=16), false)
        } else {
            (rng.random_range(16..=256), false)
        };
        runs.push(Run { id, len, aligned });
        id += 1;
        total += len;
    }
    runs
}

/// Lays out one VM: chosen shared runs, private runs and zero runs in random order; aligned
/// runs start on a 2 MiB boundary (the gap before them is free, zero memory).
fn layout(rng: &mut impl Rng, runs: &[Run], salt: u64) -> Vec<u64> {
    enum Item<'a> {
        Shared(&'a Run),
        Private(usize),
        Zero(usize),
    }
    let mut items: Vec<Item> = runs
        .iter()
        .filter(|_| rng.random_bool(0.7))
        .map(Item::Shared)
        .collect();
    let shared: usize = items
        .iter()
        .map(|i| match i {
            Item::Shared(r) => r.len,
            _ => 0,
        })
        .sum();
    let mut private = VM_PAGES.saturating_sub(shared) * 3 / 4;
    while private > 0 {
        let n = geometric(rng, 32.0).min(private);
        items.push(Item::Private(n));
        private -= n;
    }
    for _ in 0..64 {
        items.push(Item::Zero(geometric(rng, 256.0)));
    }
    // Shuffle.
    for i in (1..items.len()).rev() {
        let j = rng.random_range(0..=i);
        items.swap(i, j);
    }
    let mut mem = Vec::with_capacity(VM_PAGES);
    for item in items {
        match item {
            Item::Shared(r) => {
                if r.aligned {
                    let pad = (HUGE - mem.len() % HUGE) % HUGE;
                    mem.extend(std::iter::repeat_n(0u64, pad));
                }
                mem.extend((0..r.len as u64).map(|j| mix64((r.id << 20) | j) | 1));
            }
            Item::Private(n) => mem.extend((0..n).map(|_| rng.random::<u64>() | 1 | salt)),
            Item::Zero(n) => mem.extend(std::iter::repeat_n(0u64, n)),
        }
        if mem.len() >= VM_PAGES {
            break;
        }
    }
    mem.resize(VM_PAGES, 0);
    mem
}

fn region_ids(mem: &[u64], pages: usize) -> Vec<Option<u64>> {
    mem.chunks(pages)
        .map(|c| {
            if c.iter().all(|p| *p == 0) {
                None
            } else {
                Some(c.iter().fold(0u64, |h, p| mix64(h ^ p)))
            }
        })
        .collect()
}

/// Encoded bytes per entry of a sketch with `entries` keys at the default threshold.
fn bytes_per_entry(rng: &mut impl Rng, entries: usize) -> f64 {
    let n = entries.clamp(1, 200_000);
    let scale = entries as f64 / n as f64;
    // A sample of n keys over a key range shrunk by the same factor has the same gaps.
    let range = ((DEFAULT_THRESHOLD as f64) / scale).max(n as f64 * 2.0) as u64;
    let s = RegionSketch::from_keys(range, (0..n).map(|_| rng.random_range(0..range)));
    s.encode().len() as f64 / s.len().max(1) as f64
}

pub fn run(seed: u64, show_progress: bool) -> Sweep {
    let pairs = 4;
    let bar = if show_progress {
        super::policies::progress_bar((pairs * REGION_SIZES.len()) as u64, "region sweep")
    } else {
        indicatif::ProgressBar::hidden()
    };
    let mut rng = StdRng::seed_from_u64(seed ^ 0x5EE9);
    let mut found = [0f64; REGION_SIZES.len()];
    let mut nonzero_regions = [0f64; REGION_SIZES.len()];
    let mut shared_total = 0f64;
    let mut nonzero_total = 0f64;
    for pair in 0..pairs {
        let runs = image_runs(&mut rng, VM_PAGES * 2 / 5);
        let a = layout(&mut rng, &runs, (pair as u64) << 63);
        let b = layout(&mut rng, &runs, (pair as u64) << 63);
        let b_pages: HashSet<u64> = b.iter().copied().filter(|p| *p != 0).collect();
        shared_total += a.iter().filter(|p| **p != 0 && b_pages.contains(p)).count() as f64;
        nonzero_total += a.iter().filter(|p| **p != 0).count() as f64;
        for (s, &pages) in REGION_SIZES.iter().enumerate() {
            let ra = region_ids(&a, pages);
            let rb: HashSet<u64> = region_ids(&b, pages).into_iter().flatten().collect();
            for (i, id) in ra.iter().enumerate() {
                if let Some(id) = id {
                    nonzero_regions[s] += 1.0;
                    if rb.contains(id) {
                        let chunk = &a[i * pages..((i + 1) * pages).min(a.len())];
                        found[s] += chunk.iter().filter(|p| **p != 0).count() as f64;
                    }
                }
            }
            bar.inc(1);
        }
    }
    bar.finish_and_clear();
    let base = found[0] / shared_total.max(1.0);
    let mut rows = Vec::new();
    for (s, &pages) in REGION_SIZES.iter().enumerate() {
        let match_rate = found[s] / shared_total.max(1.0);
        // A 512 GiB node of such VMs: its regions, with the content shared between its VMs
        // counted once (as a node sketch does).
        let vm_regions = nonzero_regions[s] / pairs as f64;
        let vms_per_node = NODE_BYTES / (VM_PAGES as f64 * 4096.0);
        let shared_regions = found[s] / pairs as f64 / pages as f64;
        let node_regions = vms_per_node * vm_regions - (vms_per_node - 1.0) * shared_regions;
        let rate = DEFAULT_THRESHOLD as f64 / crate::plan::sketch::KEY_SPACE as f64;
        let entries = node_regions * rate;
        let per_entry = bytes_per_entry(&mut rng, entries as usize);
        // Node sketch plus VM sketches, base64.
        let digest_entries = node_regions + vms_per_node * vm_regions;
        let fit_entries = DIGEST_LIMIT_BYTES as f64 / (per_entry * 4.0 / 3.0);
        rows.push(SweepRow {
            region_pages: pages,
            match_rate,
            relative_to_pages: if base > 0.0 { match_rate / base } else { 0.0 },
            node_regions,
            sketch_entries_default_rate: entries,
            sketch_bytes_default_rate: entries * per_entry,
            sample_one_in_to_fit: (digest_entries / fit_entries).max(1.0),
            agent_table_bytes: node_regions * TABLE_BYTES_PER_REGION,
        });
    }
    let recommended_region_pages = recommend(&rows);
    Sweep {
        pairs,
        shared_fraction: shared_total / nonzero_total.max(1.0),
        rows,
        recommended_region_pages,
    }
}

/// Among the sizes whose exact agent table for a 512 GiB node stays under 512 MiB, the best
/// match rate sets the bar; the recommendation is the largest size within 5% (relative) of it:
/// each doubling of the region halves the summary and the table, so a larger size is worth a
/// small loss of match rate but not a large one.
pub fn recommend(rows: &[SweepRow]) -> usize {
    let feasible: Vec<&SweepRow> = rows
        .iter()
        .filter(|r| r.agent_table_bytes <= TABLE_LIMIT_BYTES)
        .collect();
    let best = feasible.iter().map(|r| r.match_rate).fold(0.0, f64::max);
    feasible
        .iter()
        .filter(|r| r.match_rate >= 0.95 * best)
        .map(|r| r.region_pages)
        .max()
        .unwrap_or(crate::plan::region::DEFAULT_REGION_PAGES as usize)
}

pub fn table(s: &Sweep) -> String {
    let mut out = format!(
        "region-size sweep: {} VM pairs of 2 GiB, {:.1}% of non-zero memory shared between the pair\n",
        s.pairs,
        s.shared_fraction * 100.0
    );
    out.push_str(&format!(
        "{:>6} {:>8} {:>11} {:>10} {:>10} {:>11} {:>12} {:>12}\n",
        "pages",
        "region",
        "match rate",
        "vs 1 page",
        "node regs",
        "sketch@1/64",
        "fit: 1 in N",
        "agent table"
    ));
    for r in &s.rows {
        out.push_str(&format!(
            "{:>6} {:>6}KiB {:>10.1}% {:>9.1}% {:>9.2}M {:>9.0}KiB {:>12.0} {:>9.0}MiB\n",
            r.region_pages,
            r.region_pages * 4,
            r.match_rate * 100.0,
            r.relative_to_pages * 100.0,
            r.node_regions / 1e6,
            r.sketch_bytes_default_rate / 1024.0,
            r.sample_one_in_to_fit,
            r.agent_table_bytes / (1u64 << 20) as f64
        ));
    }
    out.push_str(&format!(
        "recommended region size: {} pages (largest size within 5% of the best match rate among sizes whose exact agent table for a 512 GiB node stays under 512 MiB)\n",
        s.recommended_region_pages
    ));
    out
}
