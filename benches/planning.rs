//! Planning benchmarks (issue 10): ranking 5,000 nodes for a 16 GiB VM, sketch build, merge,
//! encode/decode throughput and size, and the sketch estimate error on the simulate workload.
//! Run with `cargo bench --bench planning`; the set-up numbers are printed before criterion's.

use std::hint::black_box;
use std::time::Instant;

use criterion::{criterion_group, criterion_main, Criterion, Throughput};
use rand::{Rng, SeedableRng};

use commonground::plan::region::{RegionGeometry, RegionId};
use commonground::plan::sketch::{RegionSketch, DEFAULT_THRESHOLD};
use commonground::plan::{PlanOptions, Planner, Scope};
use commonground::simulate::synthetic::{generate, Mix, SyntheticConfig, GIB};

fn random_ids(seed: u64, n: usize) -> Vec<RegionId> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    (0..n).map(|_| RegionId(rng.random())).collect()
}

fn plan_5000_nodes(c: &mut Criterion) {
    let t = Instant::now();
    // 5,000 nodes with 8 VMs each (the middle mix), sketches only: no exact bitsets.
    let cluster = generate(&SyntheticConfig {
        nodes: 5000,
        vms: 40_000,
        images: 8,
        work_groups: 8,
        seed: 42,
        mix: Mix::Middle,
        exact: false,
        ..Default::default()
    })
    .expect("cluster");
    let postings: usize = cluster
        .snapshot
        .digests
        .iter()
        .map(|d| d.sketch.len())
        .sum();
    let planner = Planner::new(cluster.snapshot.clone());
    println!(
        "set-up: 5,000 nodes / 40,000 VMs generated and indexed in {:.1} s; {} node-sketch entries; OverlapIndex {:.1} MiB ({:.2} bytes per entry); digests max {} KiB",
        t.elapsed().as_secs_f64(),
        postings,
        planner.index().memory_bytes() as f64 / (1 << 20) as f64,
        planner.index().memory_bytes() as f64 / postings.max(1) as f64,
        cluster.stats.digest_bytes_max / 1024
    );
    let req = cluster
        .requests
        .iter()
        .find(|r| r.memory_bytes == 16 * GIB)
        .expect("a 16 GiB VM")
        .clone();
    let samples = planner.vm_summary(&req.vm).map_or(0, |s| s.sketch.len());
    println!("the 16 GiB VM publishes {samples} sampled regions");
    let mut g = c.benchmark_group("rank");
    g.sample_size(30);
    g.bench_function("plan_5000_nodes_16GiB_vm_scope_workgroup", |b| {
        b.iter(|| {
            black_box(
                planner
                    .plan(black_box(&req), &PlanOptions::default())
                    .unwrap(),
            )
        })
    });
    let cluster_scope = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    g.bench_function("plan_5000_nodes_16GiB_vm_scope_cluster", |b| {
        b.iter(|| black_box(planner.plan(black_box(&req), &cluster_scope).unwrap()))
    });
    g.finish();
}

fn sketch_build_and_merge(c: &mut Criterion) {
    // A 16 GiB VM at the default region size.
    let n = RegionGeometry::default().regions_in(16 * GIB) as usize;
    let ids = random_ids(1, n);
    let mut g = c.benchmark_group("sketch");
    g.sample_size(20);
    g.throughput(Throughput::Elements(n as u64));
    g.bench_function("build_from_ids_16GiB_vm", |b| {
        b.iter(|| {
            black_box(RegionSketch::from_ids(
                DEFAULT_THRESHOLD,
                ids.iter().copied(),
            ))
        })
    });
    // A node of 20 such VMs.
    let vms: Vec<RegionSketch> = (0..20)
        .map(|s| RegionSketch::from_ids(DEFAULT_THRESHOLD, random_ids(100 + s, n)))
        .collect();
    let entries: usize = vms.iter().map(|v| v.len()).sum();
    g.throughput(Throughput::Elements(entries as u64));
    g.bench_function("merge_20_vm_sketches", |b| {
        b.iter(|| black_box(RegionSketch::union_all(vms.iter())))
    });
    let node = RegionSketch::union_all(vms.iter());
    let encoded = node.encode();
    println!(
        "node sketch of 20 x 16 GiB at 1/64: {} entries, {} bytes encoded ({:.3} bytes per entry), {} bytes base64",
        node.len(),
        encoded.len(),
        encoded.len() as f64 / node.len() as f64,
        node.to_base64().len()
    );
    g.throughput(Throughput::Bytes(encoded.len() as u64));
    g.bench_function("encode_node_sketch", |b| {
        b.iter(|| black_box(node.encode()))
    });
    g.bench_function("decode_node_sketch", |b| {
        b.iter(|| black_box(RegionSketch::decode(black_box(&encoded)).unwrap()))
    });
    g.finish();
}

/// Not a timing: the estimate error on the default simulate workload, printed once.
fn estimate_error(_c: &mut Criterion) {
    let args = commonground::simulate::SimulateArgs {
        migrations: 200,
        json: true,
        ..Default::default()
    };
    let text = commonground::simulate::simulate(&args).expect("simulate");
    let v: serde_json::Value = serde_json::from_str(&text).expect("json");
    println!(
        "estimate error vs exact (simulate, middle mix, 200 migrations): all candidates {} ; oracle's choice {} ; by VM GiB {}",
        v["estimate_error_pp"], v["estimate_error_pp_at_oracle_choice"], v["estimate_error_pp_by_vm_gib"]
    );
}

criterion_group!(
    benches,
    plan_5000_nodes,
    sketch_build_and_merge,
    estimate_error
);
criterion_main!(benches);
