//! Tests of the planner's numbered rules (issue 10), all through [`Planner::plan`].
//!
//! Snapshots are built by hand with sketches at threshold `KEY_SPACE` (every region sampled),
//! so the estimated regions in common are exact and every expectation below is a number.

use std::collections::BTreeMap;

use super::*;
use crate::plan::cluster::{NodeFacts, NodeRegionSummary, Resources};
use crate::plan::hardware::KUBEVIRT_SCHEDULABLE_LABEL;
use crate::plan::region::RegionGeometry;
use crate::plan::sketch::KEY_SPACE;
use crate::plan::workgroups::DistanceMatrix;

const GIB: u64 = 1 << 30;

fn region_bytes() -> u64 {
    RegionGeometry::default().region_bytes()
}

fn node(name: &str, group: &str, load: f64) -> NodeFacts {
    NodeFacts {
        name: name.into(),
        labels: [(KUBEVIRT_SCHEDULABLE_LABEL.to_string(), "true".to_string())].into(),
        taints: vec![],
        unschedulable: false,
        ready: true,
        allocatable: Resources {
            cpu_millis: 64_000,
            memory_bytes: 256 * GIB,
        },
        requested: Resources::default(),
        work_group: group.into(),
        load: Some(load),
        scalar_allocatable: Default::default(),
        scalar_requested: Default::default(),
    }
}

/// A VM summary whose non-zero regions are exactly `keys`, plus `zero` zero regions.
fn vm(name: &str, keys: impl IntoIterator<Item = u64>, zero: u64) -> VmRegionSummary {
    let sketch = RegionSketch::from_keys(KEY_SPACE, keys);
    let regions = sketch.len() as u64 + zero;
    VmRegionSummary {
        vm: VmKey::new("ns", name),
        memory_bytes: regions * region_bytes(),
        regions,
        zero_regions: zero,
        sketch,
        dirty_rate: 0.0,
        working_set_bytes: 0,
        load: 0.1,
    }
}

/// A node digest holding `keys` (one resident VM named after the node holds them).
fn digest(node: &NodeFacts, keys: impl IntoIterator<Item = u64>) -> NodeRegionSummary {
    let resident = vm(&format!("resident-{}", node.name), keys, 0);
    NodeRegionSummary {
        node: node.name.clone(),
        work_group: node.work_group.clone(),
        geometry: RegionGeometry::default(),
        key_id: "test".into(),
        sketch: resident.sketch.clone(),
        vms: vec![resident],
    }
}

fn request(summary: &VmRegionSummary, source: &str) -> VmRequest {
    VmRequest {
        vm: summary.vm.clone(),
        source_node: source.into(),
        requests: Resources {
            cpu_millis: 2_000,
            memory_bytes: summary.memory_bytes,
        },
        node_selector: BTreeMap::new(),
        affinity_terms: vec![],
        tolerations: vec![],
        cpu_model: None,
        cpu_features: vec![],
        summary: Some(summary.clone()),
        memory_bytes: summary.memory_bytes,
        fit: Default::default(),
    }
}

/// The migrating VM has regions 0..100; `common` says how many of them each node holds
/// (node keys beyond the VM's are private to the node).
fn cluster(nodes: &[(&str, &str, f64, u64)], distances: DistanceMatrix) -> (Planner, VmRequest) {
    let (snap, req) = snapshot_of(nodes, distances);
    (Planner::new(snap), req)
}

/// As [`cluster`], the snapshot before the planner is built.
fn snapshot_of(
    nodes: &[(&str, &str, f64, u64)],
    distances: DistanceMatrix,
) -> (ClusterSnapshot, VmRequest) {
    let the_vm = vm("mover", 0..100, 0);
    let mut snap = ClusterSnapshot {
        geometry: RegionGeometry::default(),
        distances,
        ..Default::default()
    };
    for (i, &(name, group, load, common)) in nodes.iter().enumerate() {
        let n = node(name, group, load);
        let private = 1_000_000 * (i as u64 + 1);
        snap.digests
            .push(digest(&n, (0..common).chain(private..private + 50)));
        snap.nodes.push(n);
    }
    let req = request(&the_vm, nodes[0].0);
    (snap, req)
}

/// The plan for `vm` on node `src`, every work group considered.
fn plan_cluster_wide(snap: ClusterSnapshot, vm: &VmRegionSummary) -> Plan {
    let opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    Planner::new(snap).plan(&request(vm, "src"), &opts).unwrap()
}

fn verdict_of<'a>(plan: &'a Plan, node: &str) -> &'a Verdict {
    &plan
        .candidates
        .iter()
        .find(|c| c.node == node)
        .unwrap_or_else(|| panic!("{node} missing from the plan"))
        .verdict
}

fn chosen(plan: &Plan) -> &str {
    plan.target_node.as_deref().expect("a target was chosen")
}

#[test]
fn rule4_chosen_node_has_at_least_as_many_common_regions_as_every_candidate() {
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("n1", "a", 0.0, 20),
            ("n2", "a", 0.9, 70),
            ("n3", "a", 0.5, 45),
            ("n4", "a", 0.2, 0),
        ],
        DistanceMatrix::default(),
    );
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(
        chosen(&plan),
        "n2",
        "most in common wins despite the highest load"
    );
    let target = plan.target().unwrap();
    assert_eq!(target.common_regions, 70.0);
    assert_eq!(target.common_bytes, 70 * region_bytes());
    assert_eq!(target.score, 10);
    for c in plan
        .candidates
        .iter()
        .filter(|c| !matches!(c.verdict, Verdict::Filtered(_)))
    {
        assert!(target.common_regions >= c.common_regions, "{c:?}");
    }
    assert!(
        matches!(verdict_of(&plan, "n3"), Verdict::Lost(r) if r.contains("fewer regions in common"))
    );
    // Scores never rise down the ranking.
    let passing: Vec<u8> = plan
        .candidates
        .iter()
        .filter(|c| !matches!(c.verdict, Verdict::Filtered(_)))
        .map(|c| c.score)
        .collect();
    assert!(passing.windows(2).all(|w| w[0] >= w[1]), "{passing:?}");
}

#[test]
fn rule4_ties_go_to_lower_load_then_name() {
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("n-c", "a", 0.4, 30),
            ("n-b", "a", 0.2, 30),
            ("n-a", "a", 0.7, 30),
        ],
        DistanceMatrix::default(),
    );
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(
        chosen(&plan),
        "n-b",
        "equal common regions: lower load wins"
    );
    assert!(matches!(verdict_of(&plan, "n-c"), Verdict::Lost(r) if r.contains("higher load")));

    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("n-c", "a", 0.3, 30),
            ("n-b", "a", 0.3, 30),
        ],
        DistanceMatrix::default(),
    );
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(
        chosen(&plan),
        "n-b",
        "equal regions and load: name breaks the tie"
    );
    assert!(
        matches!(verdict_of(&plan, "n-c"), Verdict::Lost(r) if r.contains("tie broken by name"))
    );
}

fn three_groups() -> DistanceMatrix {
    DistanceMatrix::parse("a:b=20,a:c=10,b:c=5").unwrap()
}

/// A cluster over [`three_groups`]: each node's name, work group, the keys it holds and its load.
fn three_group_cluster(nodes: &[(&str, &str, std::ops::Range<u64>, f64)]) -> ClusterSnapshot {
    let mut snap = ClusterSnapshot {
        distances: three_groups(),
        ..Default::default()
    };
    for (name, group, keys, load) in nodes {
        let n = node(name, group, *load);
        snap.digests.push(digest(&n, keys.clone()));
        snap.nodes.push(n);
    }
    snap
}

#[test]
fn rule5_cluster_scope_highest_work_group_score_wins_even_when_far() {
    // Group b holds 60 of the VM's regions (spread over two nodes: 0..40 and 20..60 →
    // union 60), group c 50 on one node; b wins although c is nearer.
    let the_vm = vm("mover", 0..100, 0);
    let snap = three_group_cluster(&[
        ("src", "a", 0..100, 0.3),
        ("a1", "a", 0..10, 0.3),
        ("b1", "b", 0..40, 0.3),
        ("b2", "b", 20..60, 0.3),
        ("c1", "c", 0..50, 0.3),
    ]);
    let planner = Planner::new(snap);
    let req = request(&the_vm, "src");
    let opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    let groups: Vec<(&str, f64, bool)> = plan
        .work_groups
        .iter()
        .map(|w| (w.work_group.as_str(), w.regions_available, w.chosen))
        .collect();
    assert_eq!(
        groups,
        [("b", 60.0, true), ("c", 50.0, false), ("a", 10.0, false)]
    );
    assert_eq!(plan.target_work_group.as_deref(), Some("b"));
    // Inside b, rule 4: both nodes hold 40, equal load, so the name decides.
    assert_eq!(chosen(&plan), "b1");
    assert!(
        matches!(verdict_of(&plan, "c1"), Verdict::Lost(r) if r.contains("work group b was chosen"))
    );
}

/// Region keys spread over the key space, so a sampling threshold keeps a fair share.
fn spread(range: std::ops::Range<u64>) -> Vec<u64> {
    range
        .map(|i| (i.wrapping_mul(0x9E37_79B9_7F4A_7C15) >> 24) % KEY_SPACE)
        .collect()
}

/// A VM and nodes sketched at one region in 16, as agents publish them.
fn sampled_cluster(b_holds: u64, c_holds: u64) -> (Planner, VmRegionSummary) {
    let sampled = |name: &str, keys: Vec<u64>| {
        let mut v = vm(name, [], 0);
        v.sketch = RegionSketch::from_keys(KEY_SPACE / 16, keys);
        v.regions = 32_000;
        v.memory_bytes = v.regions * region_bytes();
        v
    };
    let the_vm = sampled("mover", spread(0..32_000));
    let mut snap = ClusterSnapshot {
        distances: three_groups(),
        ..Default::default()
    };
    for (name, group, held) in [
        ("src", "a", 32_000),
        ("b1", "b", b_holds),
        ("c1", "c", c_holds),
    ] {
        let n = node(name, group, 0.3);
        let resident = sampled(&format!("resident-{name}"), spread(0..held));
        snap.digests.push(NodeRegionSummary {
            node: name.into(),
            work_group: group.into(),
            geometry: RegionGeometry::default(),
            key_id: "test".into(),
            sketch: resident.sketch.clone(),
            vms: vec![resident],
        });
        snap.nodes.push(n);
    }
    (Planner::new(snap), the_vm)
}

#[test]
fn rule5_cluster_scope_near_tie_within_the_sampling_error_goes_to_the_nearest_work_group() {
    // b holds 90% of the VM, c (nearer: 10 against 20) 88.75%: about 25 of some 2,000 sampled
    // regions apart, well inside the sampling error, so c wins.
    let opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    let (planner, the_vm) = sampled_cluster(28_800, 28_400);
    let plan = planner.plan(&request(&the_vm, "src"), &opts).unwrap();
    let (b, c) = (
        plan.work_groups
            .iter()
            .find(|w| w.work_group == "b")
            .unwrap(),
        plan.work_groups
            .iter()
            .find(|w| w.work_group == "c")
            .unwrap(),
    );
    assert!(b.regions_available > c.regions_available, "{b:?} {c:?}");
    assert!(b.regions_error > 0.0 && c.regions_error > 0.0);
    assert!(
        b.regions_available - c.regions_available
            < TIE_STANDARD_ERRORS * b.regions_error.hypot(c.regions_error)
    );
    assert_eq!(plan.work_groups[0].work_group, "c");
    assert!(plan.work_groups[0].chosen && !plan.work_groups[1].chosen);
    assert_eq!(chosen(&plan), "c1");
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("within the sampling error")),
        "{:?}",
        plan.notes
    );

    // Far apart (c holds 62%): the estimate decides, whatever the distance.
    let (planner, the_vm) = sampled_cluster(28_800, 20_000);
    let plan = planner.plan(&request(&the_vm, "src"), &opts).unwrap();
    assert_eq!(chosen(&plan), "b1");
    assert!(!plan.notes.iter().any(|n| n.contains("sampling error")));
}

#[test]
fn rule5_without_sampling_only_an_exact_tie_is_a_tie() {
    // Every region sampled: the estimates are exact, their error 0, and one region more wins.
    let the_vm = vm("mover", 0..100, 0);
    let snap = three_group_cluster(&[
        ("src", "a", 0..100, 0.3),
        ("b1", "b", 0..51, 0.3),
        ("c1", "c", 0..50, 0.3),
    ]);
    let plan = plan_cluster_wide(snap, &the_vm);
    assert!(plan.work_groups.iter().all(|w| w.regions_error == 0.0));
    assert_eq!(chosen(&plan), "b1");
}

#[test]
fn rule5_cluster_scope_tie_goes_to_the_nearest_work_group() {
    // Seed 002: b and c both score 50; c is at distance 10 from the source's group a, b at 20.
    let the_vm = vm("mover", 0..100, 0);
    let snap = three_group_cluster(&[
        ("src", "a", 0..100, 0.8),
        ("b1", "b", 0..50, 0.0),
        ("c1", "c", 50..100, 0.8),
        ("a1", "a", 0..5, 0.8),
    ]);
    let planner = Planner::new(snap);
    let req = request(&the_vm, "src");
    let opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    let first = &plan.work_groups[0];
    assert_eq!((first.work_group.as_str(), first.distance), ("c", 10.0));
    assert_eq!(plan.work_groups[1].work_group, "b");
    assert_eq!(
        plan.work_groups[1].regions_available,
        first.regions_available
    );
    assert_eq!(
        chosen(&plan),
        "c1",
        "tie on score goes to the nearer group, not the idler node"
    );

    // The same cluster with the distances swapped picks b.
    let mut snap = planner.snapshot().clone();
    snap.distances = DistanceMatrix::parse("a:b=10,a:c=20,b:c=5").unwrap();
    let plan = Planner::new(snap).plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "b1");
}

#[test]
fn rule5_work_group_scope_stays_home_and_falls_back_with_a_note() {
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("a1", "a", 0.1, 10),
            ("b1", "b", 0.1, 90),
        ],
        DistanceMatrix::default(),
    );
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(
        chosen(&plan),
        "a1",
        "default scope keeps the source's work group"
    );
    assert!(plan.notes.is_empty(), "{:?}", plan.notes);
    assert!(
        matches!(verdict_of(&plan, "b1"), Verdict::Lost(r) if r.contains("work group a was chosen"))
    );

    // a1 is full: no candidate at home, so the planner goes across work groups and says so.
    let mut snap = planner.snapshot().clone();
    snap.nodes[1].requested.memory_bytes = snap.nodes[1].allocatable.memory_bytes;
    let plan = Planner::new(snap)
        .plan(&req, &PlanOptions::default())
        .unwrap();
    assert_eq!(chosen(&plan), "b1");
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("no candidate in work group a")),
        "{:?}",
        plan.notes
    );
}

#[test]
fn rule3_every_left_out_node_has_a_reason() {
    let (planner, mut req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("ok", "a", 0.1, 10),
            ("cordoned", "a", 0.1, 90),
            ("full", "a", 0.1, 90),
            ("notready", "a", 0.1, 90),
            ("wrongdisk", "a", 0.1, 90),
        ],
        DistanceMatrix::default(),
    );
    let mut snap = planner.snapshot().clone();
    snap.nodes[2].unschedulable = true;
    snap.nodes[3].requested.memory_bytes = snap.nodes[3].allocatable.memory_bytes - 1;
    snap.nodes[4].ready = false;
    for n in &mut snap.nodes {
        if n.name != "wrongdisk" {
            n.labels.insert("disk".into(), "ssd".into());
        }
    }
    req.node_selector.insert("disk".into(), "ssd".into());
    let plan = Planner::new(snap.clone())
        .plan(&req, &PlanOptions::default())
        .unwrap();
    assert_eq!(chosen(&plan), "ok");
    assert_eq!(
        plan.candidates.len(),
        snap.nodes.len(),
        "every node appears once"
    );
    let reason = |n: &str| match verdict_of(&plan, n) {
        Verdict::Filtered(r) => r.clone(),
        v => panic!("{n} should be filtered, got {v:?}"),
    };
    assert_eq!(reason("src"), "source node of the migration");
    assert!(reason("cordoned").contains("cordoned"));
    assert!(reason("full").starts_with("insufficient memory"));
    assert!(reason("notready").contains("not Ready"));
    assert!(reason("wrongdisk").contains("disk=ssd"));
    for c in &plan.candidates {
        if let Verdict::Filtered(r) = &c.verdict {
            assert!(!r.is_empty());
            assert_eq!(c.score, 0);
        }
    }
}

#[test]
fn rule6_zero_regions_are_excluded_from_bytes_to_move() {
    // 100 non-zero regions and 40 zero regions; the target holds 30 of the non-zero ones.
    let the_vm = vm("mover", 0..100, 40);
    let mut snap = ClusterSnapshot::default();
    for (name, keys) in [
        ("src", (0..100).collect::<Vec<u64>>()),
        ("t", (70..100).collect()),
    ] {
        let n = node(name, "a", 0.2);
        snap.digests.push(digest(&n, keys));
        snap.nodes.push(n);
    }
    let plan = Planner::new(snap)
        .plan(&request(&the_vm, "src"), &PlanOptions::default())
        .unwrap();
    let rb = region_bytes();
    assert_eq!(chosen(&plan), "t");
    assert_eq!(plan.bytes.total, 140 * rb);
    assert_eq!(plan.bytes.zero, 40 * rb);
    assert_eq!(plan.bytes.common, 30 * rb);
    assert_eq!(plan.bytes.to_move, 70 * rb, "memory - common - zero");
    assert_eq!(
        plan.bytes.to_move,
        plan.bytes.total - plan.bytes.common - plan.bytes.zero
    );
}

#[test]
fn pinned_node_and_pinned_work_group_are_obeyed() {
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("a1", "a", 0.1, 80),
            ("a2", "a", 0.1, 10),
            ("b1", "b", 0.1, 50),
            ("b2", "b", 0.1, 20),
        ],
        DistanceMatrix::default(),
    );
    let pin = PlanOptions {
        pinned_node: Some("a2".into()),
        ..Default::default()
    };
    let plan = planner.plan(&req, &pin).unwrap();
    assert_eq!(chosen(&plan), "a2");
    assert!(
        matches!(verdict_of(&plan, "a1"), Verdict::Filtered(r) if r.contains("pinned to node a2"))
    );
    assert_eq!(plan.bytes.common, 10 * region_bytes());

    let group = PlanOptions {
        pinned_work_group: Some("b".into()),
        ..Default::default()
    };
    let plan = planner.plan(&req, &group).unwrap();
    assert_eq!(chosen(&plan), "b1");
    assert!(matches!(verdict_of(&plan, "a1"), Verdict::Filtered(r) if r.contains("asks for b")));
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("no candidate in work group a")),
        "{:?}",
        plan.notes
    );

    let unknown = PlanOptions {
        pinned_node: Some("nope".into()),
        ..Default::default()
    };
    assert_eq!(
        planner.plan(&req, &unknown).unwrap_err(),
        PlanError::UnknownPinnedNode("nope".into())
    );
}

#[test]
fn an_excluded_node_is_filtered_with_its_reason_and_the_next_best_is_chosen() {
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("a1", "a", 0.1, 80),
            ("a2", "a", 0.1, 10),
        ],
        DistanceMatrix::default(),
    );
    assert_eq!(
        chosen(&planner.plan(&req, &PlanOptions::default()).unwrap()),
        "a1"
    );
    let opts = PlanOptions {
        excluded_nodes: vec![("a1".into(), "target pod never scheduled".into())],
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "a2");
    assert!(matches!(verdict_of(&plan, "a1"),
        Verdict::Filtered(r) if r == "an earlier attempt to migrate here failed: target pod never scheduled"));
    // Excluding the pinned node leaves no target.
    let pinned = PlanOptions {
        pinned_node: Some("a1".into()),
        ..opts
    };
    assert_eq!(planner.plan(&req, &pinned).unwrap().target_node, None);
}

#[test]
fn no_summary_ranks_by_load_with_a_note() {
    let (planner, mut req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("busy", "a", 0.9, 90),
            ("idle", "a", 0.1, 0),
        ],
        DistanceMatrix::default(),
    );
    req.summary = None;
    req.vm = VmKey::new("ns", "unknown-vm");
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(chosen(&plan), "idle");
    assert!(plan.notes.iter().any(|n| n.contains("no memory summary")));
    assert_eq!(plan.bytes.to_move, req.memory_bytes);
}

#[test]
fn bad_input_empty_cluster_is_a_clear_error() {
    let planner = Planner::new(ClusterSnapshot::default());
    let the_vm = vm("mover", 0..10, 0);
    let err = planner
        .plan(&request(&the_vm, "src"), &PlanOptions::default())
        .unwrap_err();
    assert_eq!(err, PlanError::UnknownSourceNode("src".into()));
    assert!(err.to_string().contains("\"src\""));
}

#[test]
fn bad_input_unknown_source_node_is_a_clear_error() {
    let (planner, mut req) = cluster(
        &[("src", "a", 0.1, 100), ("n1", "a", 0.1, 1)],
        DistanceMatrix::default(),
    );
    req.source_node = "gone".into();
    assert_eq!(
        planner.plan(&req, &PlanOptions::default()).unwrap_err(),
        PlanError::UnknownSourceNode("gone".into())
    );
}

#[test]
fn bad_input_vm_larger_than_every_node_gives_an_empty_candidate_list_with_reasons() {
    let (planner, mut req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("n1", "a", 0.1, 50),
            ("n2", "b", 0.1, 50),
        ],
        DistanceMatrix::default(),
    );
    req.requests.memory_bytes = 4096 * GIB;
    for opts in [
        PlanOptions::default(),
        PlanOptions {
            scope: Scope::Cluster,
            ..Default::default()
        },
    ] {
        let plan = planner.plan(&req, &opts).unwrap();
        assert_eq!(plan.target_node, None);
        assert!(plan.target().is_none());
        assert!(plan.work_groups.is_empty());
        assert_eq!(plan.candidates.len(), 3);
        for c in &plan.candidates {
            assert!(matches!(&c.verdict, Verdict::Filtered(_)), "{c:?}");
        }
        assert!(
            matches!(verdict_of(&plan, "n1"), Verdict::Filtered(r) if r.contains("insufficient memory"))
        );
        assert!(plan.notes.iter().any(|n| n.contains("no node passes")));
        assert_eq!(plan.bytes.common, 0);
        assert_eq!(plan.bytes.to_move, plan.bytes.total - plan.bytes.zero);
    }
}

#[test]
fn bad_input_unknown_work_group_in_the_distance_matrix_is_a_clear_error() {
    // The matrix knows a and b, but node c1 sits in work group c.
    let (planner, req) = cluster(
        &[
            ("src", "a", 0.1, 100),
            ("b1", "b", 0.1, 10),
            ("c1", "c", 0.1, 50),
        ],
        DistanceMatrix::parse("a:b=10").unwrap(),
    );
    let opts = PlanOptions {
        scope: Scope::Cluster,
        ..Default::default()
    };
    let err = planner.plan(&req, &opts).unwrap_err();
    assert_eq!(
        err,
        PlanError::Distance(crate::plan::workgroups::DistanceError::UnknownWorkGroup(
            "c".into()
        ))
    );
    assert!(err.to_string().contains("\"c\""), "{err}");
}

fn snapshot(nodes: Vec<NodeFacts>, digests: Vec<NodeRegionSummary>) -> ClusterSnapshot {
    ClusterSnapshot {
        geometry: RegionGeometry::default(),
        nodes,
        digests,
        distances: DistanceMatrix::default(),
    }
}

#[test]
fn together_group_ranks_by_the_union_of_member_regions() {
    // a holds member 1's regions, b member 2's; c holds some of both, more in total.
    let src = node("src", "g", 0.5);
    let (a, b, c) = (
        node("a", "g", 0.1),
        node("b", "g", 0.1),
        node("c", "g", 0.1),
    );
    let m1 = vm("m1", 0..100, 0);
    let m2 = vm("m2", 1000..1100, 0);
    let digests = vec![
        digest(&a, 0..100),
        digest(&b, 1000..1100),
        digest(&c, (0..70).chain(1000..1070)),
    ];
    let planner = Planner::new(snapshot(vec![src, a, b, c], digests));
    let plan = planner
        .plan_group(
            &[request(&m1, "src"), request(&m2, "src")],
            &PlanOptions::default(),
        )
        .unwrap();
    assert_eq!(plan.target_node.as_deref(), Some("c"), "{plan:#?}");
    assert_eq!(plan.bytes.common, 140 * region_bytes());
    assert_eq!(plan.bytes.total, 200 * region_bytes());
    // Alone, member 1 would go to a.
    let alone = planner
        .plan(&request(&m1, "src"), &PlanOptions::default())
        .unwrap();
    assert_eq!(alone.target_node.as_deref(), Some("a"));
}

#[test]
fn together_group_needs_room_for_every_member() {
    let src = node("src", "g", 0.5);
    let mut small = node("small", "g", 0.0);
    let big = node("big", "g", 0.9);
    let m1 = vm("m1", 0..100, 0);
    let m2 = vm("m2", 200..300, 0);
    let mut r1 = request(&m1, "src");
    let mut r2 = request(&m2, "src");
    r1.requests.memory_bytes = 100 * GIB;
    r2.requests.memory_bytes = 100 * GIB;
    small.allocatable.memory_bytes = 150 * GIB; // fits one member, not both
    let planner = Planner::new(snapshot(vec![src, small, big], vec![]));
    let plan = planner
        .plan_group(&[r1.clone(), r2], &PlanOptions::default())
        .unwrap();
    assert_eq!(plan.target_node.as_deref(), Some("big"));
    let small_verdict = plan.candidates.iter().find(|c| c.node == "small").unwrap();
    assert!(
        matches!(&small_verdict.verdict, Verdict::Filtered(r) if r.contains("insufficient memory"))
    );
    assert_eq!(
        planner
            .plan(&r1, &PlanOptions::default())
            .unwrap()
            .target_node
            .as_deref(),
        Some("small")
    );
}

#[test]
fn together_group_members_must_share_a_node() {
    let planner = Planner::new(snapshot(
        vec![node("x", "g", 0.0), node("y", "g", 0.0)],
        vec![],
    ));
    let m1 = vm("m1", 0..10, 0);
    let err = planner
        .plan_group(
            &[request(&m1, "x"), request(&m1, "y")],
            &PlanOptions::default(),
        )
        .unwrap_err();
    assert!(matches!(err, PlanError::GroupSplit(..)));
    assert_eq!(
        planner
            .plan_group(&[], &PlanOptions::default())
            .unwrap_err(),
        PlanError::EmptyGroup
    );
}

#[test]
fn a_digest_made_under_another_cluster_key_counts_nothing_in_common_and_says_so() {
    let (mut snap, req) = snapshot_of(
        &[
            ("src", "a", 0.1, 100),
            ("n1", "a", 0.5, 30),
            ("n2", "a", 0.5, 90),
        ],
        DistanceMatrix::default(),
    );
    // n2's agent runs with another key: its identities cannot match the VM's.
    snap.digests
        .iter_mut()
        .find(|d| d.node == "n2")
        .unwrap()
        .key_id = "rotated".into();
    let plan = Planner::new(snap)
        .plan(&req, &PlanOptions::default())
        .unwrap();
    assert_eq!(chosen(&plan), "n1", "n2's 90 regions are not counted");
    let n2 = plan.candidates.iter().find(|c| c.node == "n2").unwrap();
    assert_eq!(n2.common_regions, 0.0);
    let note = plan
        .notes
        .iter()
        .find(|n| n.contains("another cluster key"))
        .expect("a note names the node");
    assert!(
        note.contains("n2 (key id rotated)") && note.contains("key id test"),
        "{note}"
    );

    // With one key everywhere nothing is excluded and no note is written.
    let (planner, req) = cluster(
        &[("src", "a", 0.1, 100), ("n2", "a", 0.5, 90)],
        DistanceMatrix::default(),
    );
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(chosen(&plan), "n2");
    assert!(!plan.notes.iter().any(|n| n.contains("cluster key")));
}

/// The migrating VM's 100 regions: `src` holds none, `x` 99 (no KSM), `k` 98 with KSM
/// (`kubevirt.io/ksm-enabled=true`, as virt-handler labels it), `far` 60 with KSM.
fn ksm_cluster(k_common: u64) -> (ClusterSnapshot, VmRequest) {
    let (mut snap, req) = snapshot_of(
        &[
            ("src", "g", 0.1, 0),
            ("x", "g", 0.1, 99),
            ("k", "g", 0.5, k_common),
            ("far", "g", 0.0, 60),
        ],
        DistanceMatrix::default(),
    );
    for n in snap
        .nodes
        .iter_mut()
        .filter(|n| n.name == "k" || n.name == "far")
    {
        n.labels
            .insert(crate::plan::ksm::KSM_ENABLED_LABEL.into(), "true".into());
    }
    (snap, req)
}

#[test]
fn with_similar_memory_in_common_the_node_where_ksm_runs_wins() {
    let (snap, req) = ksm_cluster(98);
    let planner = Planner::new(snap);
    let plan = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(chosen(&plan), "k", "{plan:#?}");
    let rb = region_bytes();
    let k = plan.target().unwrap();
    assert!(k.ksm);
    assert_eq!(k.ksm_mergeable_bytes, 98 * rb);
    assert_eq!(plan.bytes.common, 98 * rb);
    assert_eq!(plan.bytes.ksm_mergeable, 98 * rb);
    let Verdict::Lost(why) = verdict_of(&plan, "x") else {
        panic!("x should lose: {plan:#?}")
    };
    assert!(why.contains("where KSM runs"), "{why}");
    let x = plan.candidates.iter().find(|c| c.node == "x").unwrap();
    assert!(!x.ksm);
    assert_eq!(
        x.ksm_mergeable_bytes, 0,
        "nothing merges where KSM does not run"
    );
    assert!(
        plan.notes.iter().any(|n| n.contains("KSM runs on k")),
        "{:?}",
        plan.notes
    );
    // The extender's order agrees: k scores 10.
    assert_eq!(plan.candidates[0].score, 10);
}

#[test]
fn clearly_more_memory_in_common_wins_over_ksm_and_without_labels_nothing_changes() {
    // 99 against 90 regions of 100: beyond 2% and, fully sampled, beyond any error.
    let (snap, req) = ksm_cluster(90);
    let plan = Planner::new(snap)
        .plan(&req, &PlanOptions::default())
        .unwrap();
    assert_eq!(chosen(&plan), "x", "{plan:#?}");
    assert_eq!(plan.bytes.ksm_mergeable, 0);
    assert!(
        plan.notes.iter().all(|n| !n.contains("KSM")),
        "{:?}",
        plan.notes
    );

    let (mut snap, req) = ksm_cluster(98);
    for n in &mut snap.nodes {
        n.labels.remove(crate::plan::ksm::KSM_ENABLED_LABEL);
    }
    let plan = Planner::new(snap)
        .plan(&req, &PlanOptions::default())
        .unwrap();
    assert_eq!(
        chosen(&plan),
        "x",
        "the ordinary ranking without KSM anywhere"
    );
}

/// Links from `src`: 100 kB/s with the relay skipping what the node holds (so that the VM's
/// 64 KiB regions take whole seconds), except `slow` nodes (a quarter of that) and `stock`
/// nodes (no relay in path: everything is sent).
fn links_for(
    req: &VmRequest,
    slow: &'static [&'static str],
    stock: &'static [&'static str],
) -> crate::plan::move_time::MoveLinks {
    use crate::plan::estimate::{EstimateInput, Transport};
    use crate::plan::move_time::{Link, MoveLinks};
    let summary = req.summary.as_ref().unwrap();
    let mut base = EstimateInput::new(summary.memory_bytes, 0.0, 1e5);
    base.zero_bytes = summary.zero_regions * region_bytes();
    MoveLinks {
        base,
        link_of: std::sync::Arc::new(move |node| Link {
            bytes_per_second: if slow.contains(&node) { 2.5e4 } else { 1e5 },
            transport: if stock.contains(&node) {
                Transport::Stock
            } else {
                Transport::SkipCommon
            },
        }),
    }
}

#[test]
fn with_similar_memory_in_common_the_clearly_shorter_move_wins() {
    // x holds 99 of the VM's 100 regions over a slow link, y 98 over a fast one: similar
    // memory, y's move takes half the time (2.6 s against 1.3 s).
    let (snap, req) = snapshot_of(
        &[
            ("src", "g", 0.1, 0),
            ("x", "g", 0.1, 99),
            ("y", "g", 0.5, 98),
            ("z", "g", 0.0, 10),
        ],
        DistanceMatrix::default(),
    );
    let planner = Planner::new(snap);
    let opts = PlanOptions {
        move_links: Some(links_for(&req, &["x"], &[])),
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "y", "{plan:#?}");
    let Verdict::Lost(why) = verdict_of(&plan, "x") else {
        panic!("x should lose: {plan:#?}")
    };
    assert!(why.contains("estimated shorter"), "{why}");
    assert!(
        plan.notes
            .iter()
            .any(|n| n.contains("the move to y is estimated clearly shorter")),
        "{:?}",
        plan.notes
    );
    // Without links the memory decides, as before.
    let plain = planner.plan(&req, &PlanOptions::default()).unwrap();
    assert_eq!(chosen(&plain), "x");
    // Clearly more in common keeps the lead on a slower link: z (10 regions) over a fast
    // link is not similar to x.
    let (snap, req) = snapshot_of(
        &[
            ("src", "g", 0.1, 0),
            ("x", "g", 0.1, 99),
            ("z", "g", 0.0, 10),
        ],
        DistanceMatrix::default(),
    );
    let opts = PlanOptions {
        move_links: Some(links_for(&req, &["x"], &[])),
        ..Default::default()
    };
    let plan = Planner::new(snap).plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "x", "{plan:#?}");
}

#[test]
fn a_node_without_the_relay_in_path_loses_to_a_similar_one_with_it() {
    // Without the relay x's 99 regions in common are sent anyway; y's 98 are skipped.
    let (snap, req) = snapshot_of(
        &[
            ("src", "g", 0.1, 0),
            ("x", "g", 0.1, 99),
            ("y", "g", 0.5, 98),
        ],
        DistanceMatrix::default(),
    );
    let opts = PlanOptions {
        move_links: Some(links_for(&req, &[], &["x"])),
        ..Default::default()
    };
    let plan = Planner::new(snap).plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "y", "{plan:#?}");
}

#[test]
fn ksm_does_not_make_up_for_a_clearly_longer_move() {
    // k (98, KSM) would win on KSM, but its link is slow and x's is not.
    let (snap, req) = ksm_cluster(98);
    let planner = Planner::new(snap);
    let opts = PlanOptions {
        move_links: Some(links_for(&req, &["k"], &[])),
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "x", "{plan:#?}");
    assert!(
        plan.notes.iter().all(|n| !n.contains("KSM")),
        "{:?}",
        plan.notes
    );
    // With equal links KSM still decides between similar nodes: k's move is 0.66 s longer,
    // less than a clear saving.
    let opts = PlanOptions {
        move_links: Some(links_for(&req, &[], &[])),
        ..Default::default()
    };
    let plan = planner.plan(&req, &opts).unwrap();
    assert_eq!(chosen(&plan), "k", "{plan:#?}");
}

#[test]
fn a_large_vm_is_ranked_from_its_first_samples_and_keeps_an_exact_consistent_sample() {
    let big = vm("big", spread(0..3 * RANKING_SAMPLES as u64), 0);
    let cut = ranking_sample(&big);
    assert_eq!(cut.sketch.len(), RANKING_SAMPLES);
    let threshold = cut.sketch.threshold();
    assert_eq!(threshold, big.sketch.keys()[RANKING_SAMPLES]);
    assert!(cut.sketch.keys().iter().all(|&k| k < threshold));
    assert_eq!(cut.regions, big.regions, "only the sample is cut");
    let small = vm("small", 0..100, 0);
    assert!(matches!(
        ranking_sample(&small),
        std::borrow::Cow::Borrowed(_)
    ));
}

#[test]
fn a_large_vm_cut_to_its_ranking_sample_still_goes_where_most_of_it_is() {
    // 48k regions; b holds 60% of them, c (nearer) 50%. The cut sample estimates each
    // within a few hundred regions, so b, clearly ahead, still wins, with a close estimate.
    let n = 3 * RANKING_SAMPLES as u64;
    let keys = spread(0..n);
    let the_vm = vm("mover", keys.clone(), 0);
    let mut snap = ClusterSnapshot {
        distances: three_groups(),
        ..Default::default()
    };
    for (name, group, held) in [("src", "a", n), ("b1", "b", n * 6 / 10), ("c1", "c", n / 2)] {
        let node = node(name, group, 0.3);
        snap.digests
            .push(digest(&node, keys[..held as usize].iter().copied()));
        snap.nodes.push(node);
    }
    let plan = plan_cluster_wide(snap, &the_vm);
    assert_eq!(chosen(&plan), "b1");
    let b = plan.candidates.iter().find(|c| c.node == "b1").unwrap();
    let truth = (n * 6 / 10) as f64;
    assert!(
        (b.common_regions - truth).abs() < 0.03 * n as f64,
        "estimated {} regions in common, truly {truth}",
        b.common_regions
    );
}
