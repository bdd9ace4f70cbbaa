//! Extender request path with 5,000 candidate nodes, server side (decode, plan, encode):
//! prioritize and filter for a migration target pod, pass-through for any other pod, and the
//! memory the extender's state holds for 5,000 nodes.
//!
//! Prints p50/p99 from 2,000 timed calls per case, then criterion's own estimates.

use std::alloc::{GlobalAlloc, Layout, System};
use std::hint::black_box;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use commonground::extender::fixtures;
use commonground::extender::server::{respond, Verb};
use commonground::extender::state::ClusterState;
use criterion::{criterion_group, Criterion};

/// Counts live heap bytes, to measure what the state holds.
struct Counting;

static LIVE: AtomicUsize = AtomicUsize::new(0);

unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, layout: Layout) -> *mut u8 {
        LIVE.fetch_add(layout.size(), Ordering::Relaxed);
        unsafe { System.alloc(layout) }
    }
    unsafe fn dealloc(&self, ptr: *mut u8, layout: Layout) {
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.dealloc(ptr, layout) }
    }
    unsafe fn realloc(&self, ptr: *mut u8, layout: Layout, new_size: usize) -> *mut u8 {
        LIVE.fetch_add(new_size, Ordering::Relaxed);
        LIVE.fetch_sub(layout.size(), Ordering::Relaxed);
        unsafe { System.realloc(ptr, layout, new_size) }
    }
}

#[global_allocator]
static ALLOC: Counting = Counting;

const NODES: usize = 5_000;

struct Case {
    name: &'static str,
    verb: Verb,
    body: Vec<u8>,
}

fn cases() -> Vec<Case> {
    let names = fixtures::names(NODES);
    let migration = fixtures::body_with_names(&fixtures::migration_pod(true), &names);
    let ordinary = fixtures::body_with_names(&fixtures::ordinary_pod(), &names);
    vec![
        Case {
            name: "prioritize/migration-target/5000",
            verb: Verb::Prioritize,
            body: migration.clone(),
        },
        Case {
            name: "filter/migration-target/5000",
            verb: Verb::Filter,
            body: migration,
        },
        Case {
            name: "prioritize/pass-through/5000",
            verb: Verb::Prioritize,
            body: ordinary.clone(),
        },
        Case {
            name: "filter/pass-through/5000",
            verb: Verb::Filter,
            body: ordinary,
        },
    ]
}

fn percentile(sorted: &[Duration], p: f64) -> Duration {
    sorted[((sorted.len() - 1) as f64 * p).round() as usize]
}

fn print_numbers(state: &ClusterState) {
    println!("extender, {NODES} candidate nodes, server side (decode + decide + encode):");
    for case in cases() {
        let mut times = Vec::with_capacity(2_000);
        for _ in 0..2_000 {
            let t = Instant::now();
            let out = respond(Some(state), case.verb, black_box(&case.body)).expect("valid body");
            black_box(out);
            times.push(t.elapsed());
        }
        times.sort();
        println!(
            "  {:<34} p50 {:>9.3?}  p99 {:>9.3?}  max {:>9.3?}  (body {} KiB)",
            case.name,
            percentile(&times, 0.50),
            percentile(&times, 0.99),
            times[times.len() - 1],
            case.body.len() / 1024
        );
    }
}

/// Where a migration-target request's time goes: decoding alone, and the planner alone.
fn print_breakdown(state: &ClusterState) {
    let names = fixtures::names(NODES);
    let body = fixtures::body_with_names(&fixtures::migration_pod(true), &names);
    let req = state
        .vmi_by_uid("ns", "uid-vm1")
        .and_then(|v| v.request.clone())
        .expect("fixture VMI");
    let opts = commonground::plan::PlanOptions {
        only_nodes: Some(names.clone()),
        ..Default::default()
    };
    let time = |f: &mut dyn FnMut()| {
        let mut times: Vec<Duration> = (0..500)
            .map(|_| {
                let t = Instant::now();
                f();
                t.elapsed()
            })
            .collect();
        times.sort();
        (percentile(&times, 0.5), percentile(&times, 0.99))
    };
    let (p50, p99) = time(&mut || {
        black_box(commonground::extender::server::decode(black_box(&body)).expect("body"));
    });
    println!("  breakdown: decode ExtenderArgs           p50 {p50:>9.3?}  p99 {p99:>9.3?}");
    let (p50, p99) = time(&mut || {
        black_box(state.planner.plan(&req, &opts).expect("plan"));
    });
    println!("  breakdown: Planner::plan (5000 only_nodes) p50 {p50:>9.3?}  p99 {p99:>9.3?}");
    let positions: Vec<usize> = names
        .iter()
        .filter_map(|n| state.planner.node_position(n))
        .collect();
    let (p50, p99) = time(&mut || {
        black_box(
            state
                .planner
                .rank_nodes(&req, &Default::default(), Some(&positions))
                .expect("rank"),
        );
    });
    println!("  breakdown: Planner::rank_nodes (5000)     p50 {p50:>9.3?}  p99 {p99:>9.3?}");
}

fn memory_held() -> ClusterState {
    let before = LIVE.load(Ordering::Relaxed);
    let state = fixtures::state(NODES, &[]);
    let held = LIVE.load(Ordering::Relaxed).saturating_sub(before);
    println!(
        "memory held by the extender state (planner + lookups) for {NODES} nodes with digests: {:.1} MiB ({} bytes/node)",
        held as f64 / (1 << 20) as f64,
        held / NODES
    );
    state
}

fn bench(c: &mut Criterion) {
    let state = memory_held();
    print_numbers(&state);
    print_breakdown(&state);
    let mut group = c.benchmark_group("extender");
    for case in cases() {
        group.bench_function(case.name, |b| {
            b.iter(|| respond(Some(&state), case.verb, black_box(&case.body)).expect("valid body"))
        });
    }
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().sample_size(50).measurement_time(Duration::from_secs(3));
    targets = bench
}

fn main() {
    benches();
    Criterion::default().configure_from_args().final_summary();
}
