//! Tests of the simulator: generator invariants, exact overlaps, JSON shape, determinism,
//! recorded snapshots and the region sweep.

use super::policies::ExactOverlap;
use super::synthetic::{generate, Mix, SyntheticConfig};
use super::*;
use crate::plan::sketch::KEY_SPACE;

fn small(mix: Mix, seed: u64) -> SyntheticConfig {
    SyntheticConfig {
        nodes: 24,
        vms: 240,
        images: 6,
        work_groups: 3,
        seed,
        // 256 KiB regions keep the exact bitsets small in debug builds.
        region_pages: 64,
        mix,
        ..Default::default()
    }
}

#[test]
fn sharing_per_mix_is_in_its_range() {
    for (mix, lo, hi) in [
        (Mix::Desktop, 0.30, 1.0),
        (Mix::Middle, 0.15, 0.30),
        (Mix::Diverse, 0.0, 0.15),
    ] {
        let c = generate(&small(mix, 7)).unwrap();
        let sharing = c.stats.sharing.expect("exact mode computes sharing");
        assert!(
            sharing > lo && sharing < hi,
            "{mix}: sharing {sharing} not in ({lo}, {hi})"
        );
        assert!(c.stats.zero_fraction > 0.05 && c.stats.zero_fraction < 0.4);
        assert!(c.stats.digest_bytes_max <= digest_budget::DIGEST_LIMIT_BYTES);
    }
}

#[test]
fn generated_cluster_is_consistent() {
    let c = generate(&small(Mix::Middle, 3)).unwrap();
    let snap = &c.snapshot;
    assert_eq!(snap.nodes.len(), 24);
    assert_eq!(c.requests.len(), 240);
    let listed: usize = snap.digests.iter().map(|d| d.vms.len()).sum();
    assert_eq!(listed, 240, "every VM is in exactly one digest");
    for (v, r) in c.requests.iter().enumerate() {
        let node = &snap.nodes[c.vm_node[v]];
        assert_eq!(r.source_node, node.name);
        assert!(snap.digests[c.vm_node[v]].vms.iter().any(|s| s.vm == r.vm));
    }
    for (n, d) in snap.nodes.iter().zip(&snap.digests) {
        assert!(n.requested.memory_bytes <= n.allocatable.memory_bytes);
        // The node sketch is the union of its VMs' sketches at one threshold.
        let union = crate::plan::replicated::rebuild_node_sketch(d.sketch.threshold(), &d.vms);
        assert_eq!(union, d.sketch);
        for vm in &d.vms {
            assert_eq!(vm.sketch.threshold(), d.sketch.threshold());
            assert!(vm.zero_regions < vm.regions);
            let gib = vm.memory_bytes >> 30;
            assert!((2..=64).contains(&gib), "{gib} GiB");
        }
    }
}

/// With every region sampled (threshold KEY_SPACE) the planner's estimate is a count, so it
/// must equal the exact overlap the bitsets give, for every VM and every other node.
#[test]
fn exact_overlap_matches_fully_sampled_sketches() {
    let cfg = SyntheticConfig {
        nodes: 6,
        vms: 30,
        images: 3,
        work_groups: 2,
        region_pages: 64,
        base_threshold: KEY_SPACE,
        digest_limit_bytes: usize::MAX,
        ..Default::default()
    };
    let c = generate(&cfg).unwrap();
    let exact = c.exact.as_ref().unwrap();
    let planner = Planner::new(c.snapshot.clone());
    let mut hits = Vec::new();
    let mut some_overlap = false;
    for (v, r) in c.requests.iter().enumerate() {
        let summary = planner.vm_summary(&r.vm).unwrap();
        assert_eq!(summary.sketch.len() as u64, summary.nonzero_regions());
        let est = planner.common_regions(summary, &mut hits);
        for n in (0..cfg.nodes).filter(|&n| n != c.vm_node[v]) {
            let e = ExactOverlap::common_regions(exact, v, n);
            assert_eq!(est[n].round() as u64, e, "vm {v} node {n}");
            some_overlap |= e > 0;
        }
    }
    assert!(some_overlap, "the case must exercise shared content");
}

fn run_json(args: &SimulateArgs) -> serde_json::Value {
    serde_json::from_str(&simulate(args).unwrap()).unwrap()
}

fn tiny_args(seed: u64) -> SimulateArgs {
    SimulateArgs {
        nodes: 16,
        vms: 160,
        images: 4,
        work_groups: 2,
        seed,
        region_size: 64,
        migrations: 40,
        json: true,
        ..Default::default()
    }
}

#[test]
fn json_has_every_policy_with_the_required_fields() {
    let v = run_json(&tiny_args(5));
    let policies = v["policies"].as_object().expect("policies object");
    for name in ["commonground", "least_allocated", "random", "oracle"] {
        let p = &policies[name];
        for field in [
            "bytes_to_transfer_mean",
            "bytes_to_transfer_p95",
            "oracle_share",
            "decision_ms_p50",
            "decision_ms_p99",
        ] {
            assert!(p[field].is_number(), "{name}.{field} = {}", p[field]);
        }
    }
    assert_eq!(policies["oracle"]["oracle_share"].as_f64(), Some(1.0));
    assert_eq!(policies["random"]["oracle_share"].as_f64(), Some(0.0));
    assert!(policies["commonground"]["estimate_error_pp"]["p95"].is_number());
    // The oracle never moves more than any other policy on average.
    let oracle = policies["oracle"]["bytes_to_transfer_mean"]
        .as_f64()
        .unwrap();
    for (name, p) in policies {
        assert!(
            oracle <= p["bytes_to_transfer_mean"].as_f64().unwrap() + 1.0,
            "{name}"
        );
    }
    assert_eq!(v["migrations"].as_u64(), Some(40));
}

fn without_timings(mut v: serde_json::Value) -> serde_json::Value {
    for p in v["policies"].as_object_mut().unwrap().values_mut() {
        let o = p.as_object_mut().unwrap();
        o.remove("decision_ms_p50");
        o.remove("decision_ms_p99");
    }
    v
}

#[test]
fn same_seed_same_report_other_seed_other_report() {
    let a = without_timings(run_json(&tiny_args(11)));
    let b = without_timings(run_json(&tiny_args(11)));
    assert_eq!(a, b);
    let c = without_timings(run_json(&tiny_args(12)));
    assert_ne!(a["policies"], c["policies"]);
}

#[test]
fn recorded_snapshot_round_trips_and_replays() {
    let cfg = small(Mix::Desktop, 9);
    let c = generate(&cfg).unwrap();
    let file = snapshot::record(&c).unwrap();
    let text = serde_json::to_string(&file).unwrap();
    let recorded = snapshot::prepare(snapshot::parse(&text).unwrap()).unwrap();
    // Loads are floats (JSON may round their last bit); everything else must be identical.
    assert_eq!(recorded.snapshot.geometry, c.snapshot.geometry);
    assert_eq!(recorded.snapshot.distances, c.snapshot.distances);
    for (a, b) in recorded.snapshot.nodes.iter().zip(&c.snapshot.nodes) {
        assert_eq!(
            (&a.name, a.allocatable, a.requested),
            (&b.name, b.allocatable, b.requested)
        );
    }
    for (a, b) in recorded.snapshot.digests.iter().zip(&c.snapshot.digests) {
        assert_eq!(a.sketch, b.sketch);
        let vms = |d: &crate::plan::cluster::NodeRegionSummary| {
            d.vms
                .iter()
                .map(|v| (v.vm.clone(), v.regions, v.zero_regions, v.sketch.clone()))
                .collect::<Vec<_>>()
        };
        assert_eq!(vms(a), vms(b));
    }
    assert_eq!(recorded.requests.len(), c.requests.len());
    let exact = recorded.exact.as_ref().unwrap();
    let orig = c.exact.as_ref().unwrap();
    for (i, r) in recorded.requests.iter().enumerate() {
        let v = c.requests.iter().position(|x| x.vm == r.vm).unwrap();
        assert_eq!(r.requests, c.requests[v].requests);
        for n in (0..cfg.nodes).filter(|&n| n != c.vm_node[v]) {
            assert_eq!(
                exact.common_regions(i, n),
                ExactOverlap::common_regions(orig, v, n)
            );
        }
    }

    // Through the command, with and without the exact section.
    let dir = tempfile::tempdir().unwrap();
    let with = dir.path().join("with.json");
    std::fs::write(&with, &text).unwrap();
    let args = SimulateArgs {
        snapshot: Some(with),
        migrations: 30,
        json: true,
        ..Default::default()
    };
    let v = run_json(&args);
    assert!(v["policies"]["oracle"]["oracle_share"].is_number());
    let bare = dir.path().join("bare.json");
    std::fs::write(&bare, serde_json::to_string(&c.snapshot).unwrap()).unwrap();
    let v = run_json(&SimulateArgs {
        snapshot: Some(bare),
        ..args
    });
    assert!(
        v["policies"].get("oracle").is_none(),
        "no oracle without exact data"
    );
    assert!(v["policies"]["commonground"]["oracle_share"].is_null());
    assert_eq!(v["exact"], false);
}

#[test]
fn bad_snapshots_are_clear_errors() {
    assert!(matches!(
        snapshot::parse("{"),
        Err(SimulateError::Snapshot(_))
    ));
    let empty = snapshot::parse(r#"{"geometry": {"pages_per_region": 16}, "nodes": []}"#).unwrap();
    let err = snapshot::prepare(empty).err().unwrap();
    assert!(err.to_string().contains("no nodes"), "{err}");
    let err = simulate(&SimulateArgs {
        snapshot: Some("/nonexistent/file.json".into()),
        ..Default::default()
    })
    .unwrap_err();
    assert!(err.to_string().contains("/nonexistent/file.json"), "{err}");
}

#[test]
fn too_many_vms_for_the_nodes_is_an_error() {
    let err = generate(&SyntheticConfig {
        nodes: 1,
        vms: 500,
        ..small(Mix::Diverse, 1)
    })
    .err()
    .unwrap();
    assert!(err.to_string().contains("do not fit"), "{err}");
}

#[test]
fn region_sweep_finds_everything_at_one_page_and_never_more_with_larger_regions() {
    let s = sweep::run(3, false);
    assert_eq!(s.rows[0].region_pages, 1);
    assert!(
        (s.rows[0].match_rate - 1.0).abs() < 1e-12,
        "{}",
        s.rows[0].match_rate
    );
    // A region that matches at 2R pages matches as two regions at R pages.
    for w in s.rows.windows(2) {
        assert!(w[1].match_rate <= w[0].match_rate + 1e-12);
        assert!(w[1].node_regions < w[0].node_regions);
    }
    assert!(sweep::REGION_SIZES.contains(&s.recommended_region_pages));
}

#[test]
fn ksm_merged_memory_follows_the_share_of_nodes_running_ksm() {
    let total = |v: &serde_json::Value, name: &str| {
        v["policies"][name]["ksm_merged_bytes_total"]
            .as_u64()
            .unwrap()
    };
    let none = run_json(&SimulateArgs {
        ksm_nodes: 0.0,
        ..tiny_args(5)
    });
    for name in ["commonground", "least_allocated", "random", "oracle"] {
        assert_eq!(total(&none, name), 0, "{name}: no node runs KSM");
    }
    // KSM everywhere: what it merges is exactly the memory in common at the chosen nodes.
    let all = run_json(&SimulateArgs {
        ksm_nodes: 1.0,
        ..tiny_args(5)
    });
    let migrations = all["migrations"].as_f64().unwrap();
    for name in ["commonground", "least_allocated"] {
        let common = all["policies"][name]["common_bytes_mean"].as_f64().unwrap() * migrations;
        let merged = total(&all, name) as f64;
        assert!(
            (merged - common).abs() <= 1.0 + common * 1e-9,
            "{name}: {merged} vs {common}"
        );
    }
    let gain = all["policies"]["commonground"]["ksm_gain_vs_least_allocated_bytes"]
        .as_i64()
        .unwrap();
    assert!(
        gain > 0,
        "placing by memory in common merges more than least-allocated: {gain}"
    );
    assert_eq!(
        all["policies"]["least_allocated"]["ksm_gain_vs_least_allocated_bytes"].as_i64(),
        Some(0)
    );
}
