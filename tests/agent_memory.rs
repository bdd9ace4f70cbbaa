//! The agent's scanning against real processes: exits mid-scan, rescans (sampled fallback
//! everywhere, soft-dirty where the kernel has it), node scanning with VM discovery, memory
//! groups.

mod helpers;

use std::collections::BTreeSet;
use std::time::Duration;

use commonground::agent::discover;
use commonground::agent::memory_reader::ProcessMemory;
use commonground::agent::scan::MemoryScan;
use commonground::agent::soft_dirty;
use commonground::agent::vm_tracker::{RescanMode, TrackedVm};
use commonground::plan::region::RegionGeometry;
use commonground::plan::VmKey;
use helpers::{quiet_policy, Holder, HolderSpec, MIB, REGION};

#[test]
fn a_process_exiting_mid_scan_keeps_what_was_read() {
    let mut h = Holder::start(HolderSpec {
        image_mib: 64,
        ..Default::default()
    });
    let mem = ProcessMemory::open(h.pid()).unwrap();
    let mut killed = false;
    let scan = MemoryScan::full(
        &mem,
        &[(h.addr, h.len)],
        RegionGeometry::default(),
        &mut |done| {
            if !killed && done > 0 {
                h.kill();
                killed = true;
            }
        },
    )
    .expect("an exit is reported, not an error");
    assert!(scan.exited);
    let c = scan.counts();
    assert!(c.regions >= 64, "the first 4 MiB chunk was kept: {c:?}");
    assert!(c.regions < 64 * MIB / REGION, "{c:?}");
}

#[test]
fn sampled_fallback_estimates_the_dirtied_bytes_and_rescans_see_new_content() {
    let mut h = Holder::start(HolderSpec {
        vm: Some(("ns", "writer")),
        image_mib: 64,
        ..Default::default()
    });
    let vm = VmKey::new("ns", "writer");
    let mut policy = quiet_policy();
    let mut t = TrackedVm::start(
        vm,
        h.pid(),
        RegionGeometry::default(),
        RescanMode::Sampled,
        &policy,
    )
    .unwrap();
    let before: BTreeSet<_> = t.scan.data_regions().map(|(d, _)| d).collect();
    // Dirty 16 MiB of the 64 MiB: one byte in every page.
    h.command(&format!("touch 0 {} 4096", 16 * MIB));
    let o = t.refresh(RescanMode::Sampled, &policy).unwrap();
    assert!(!o.full_scan);
    assert!(t.dirty_rate > 0.0 && t.working_set_bytes > 0);
    assert!(
        o.changed_regions > 0,
        "regions holding a probe that changed are re-hashed at once: {o:?}"
    );
    // New content: the slower-cadence full rescan sees every new region.
    h.command(&format!("fill {} {} 999", 32 * MIB, 8 * MIB));
    policy.full_every = Duration::ZERO;
    let o = t.refresh(RescanMode::Sampled, &policy).unwrap();
    assert!(o.full_scan);
    let after: BTreeSet<_> = t.scan.data_regions().map(|(d, _)| d).collect();
    assert_eq!(
        after.difference(&before).count() as u64,
        (16 + 8) * MIB / REGION
    );
}

#[test]
fn sampled_dirty_fraction_matches_a_known_write_volume() {
    let mut h = Holder::start(HolderSpec {
        image_mib: 128,
        ..Default::default()
    });
    let mem = ProcessMemory::open(h.pid()).unwrap();
    let ranges = [(h.addr, h.len)];
    let mut s = commonground::agent::dirty_sampler::DirtySampler::new(4096, 42);
    s.observe(&mem, &ranges).unwrap().unwrap();
    // 24 MiB of 128 MiB, every second page of the first 48 MiB: 18.75% of the pages.
    h.command(&format!("touch 0 {} 8192", 48 * MIB));
    let est = s.observe(&mem, &ranges).unwrap().unwrap();
    let truth = 24.0 * MIB as f64;
    let err = (est.dirty_bytes as f64 - truth) / truth;
    eprintln!(
        "sampled dirty estimate: {} bytes vs {} written ({:+.1}% error, {} probes)",
        est.dirty_bytes,
        truth,
        err * 100.0,
        est.observed
    );
    // 4,096 probes: sigma of the fraction is 0.6 points, 3.3% of the truth; 5 sigma bound.
    assert!(err.abs() < 0.17, "error {err}");
    let quiet = s.observe(&mem, &ranges).unwrap().unwrap();
    assert_eq!(quiet.changed, 0, "nothing written since");
}

#[test]
fn soft_dirty_rescan_rehashes_exactly_the_written_regions() {
    if !soft_dirty::supported() {
        eprintln!("SKIPPED: this kernel has no soft-dirty tracking (CONFIG_MEM_SOFT_DIRTY); the sampled fallback is tested instead");
        return;
    }
    let mut h = Holder::start(HolderSpec {
        vm: Some(("ns", "sd")),
        image_mib: 32,
        ..Default::default()
    });
    let policy = quiet_policy();
    let mut t = TrackedVm::start(
        VmKey::new("ns", "sd"),
        h.pid(),
        RegionGeometry::default(),
        RescanMode::SoftDirty,
        &policy,
    )
    .unwrap();
    h.command(&format!("touch {} {} 65536", 4 * MIB, 2 * MIB));
    let o = t.refresh(RescanMode::SoftDirty, &policy).unwrap();
    assert_eq!(o.rehashed_regions as u64, 2 * MIB / REGION);
    assert_eq!(o.changed_regions as u64, 2 * MIB / REGION);
    let o = t.refresh(RescanMode::SoftDirty, &policy).unwrap();
    assert_eq!(o.rehashed_regions, 0, "idle guest: nothing to re-hash");
}

#[test]
fn node_scanner_reports_only_its_nodes_vms_and_their_memory_groups() {
    let tag = std::process::id();
    let shm = format!("shm:cg-test-{tag}");
    let a = Holder::start(HolderSpec {
        vm: Some(("ns", &format!("a{tag}"))),
        image_mib: 8,
        backing: &shm,
        ..Default::default()
    });
    let b = Holder::start(HolderSpec {
        vm: Some(("ns", &format!("b{tag}"))),
        image_mib: 8,
        backing: &shm,
        ..Default::default()
    });
    let c = Holder::start(HolderSpec {
        vm: Some(("ns", &format!("c{tag}"))),
        image_mib: 8,
        private_mib: 4,
        private_seed: 5,
        ..Default::default()
    });
    let (ka, kb, kc) = (
        VmKey::new("ns", format!("a{tag}")),
        VmKey::new("ns", format!("b{tag}")),
        VmKey::new("ns", format!("c{tag}")),
    );
    let procs = discover::find_qemu_processes().unwrap();
    for (k, h) in [(&ka, &a), (&kb, &b), (&kc, &c)] {
        assert!(
            procs.iter().any(|p| &p.vm == k && p.pid == h.pid()),
            "{k} not discovered"
        );
    }
    let mut scanner = helpers::test_scanner();
    // Only a and c run on this node; b's process is seen but belongs to another node.
    let on_node: BTreeSet<VmKey> = [ka.clone(), kc.clone()].into();
    scanner.tick(&procs, &on_node);
    let inputs = scanner.inputs();
    let names: Vec<&VmKey> = inputs.summary.vms.iter().map(|v| &v.vm).collect();
    assert_eq!(names, vec![&ka, &kc]);
    let va = &inputs.summary.vms[0];
    assert_eq!((va.regions, va.zero_regions), (8 * MIB / REGION, 0));
    // a and c hold the same 8 MiB image: every image region is replicated twice on the node.
    assert!(inputs.replicated.iter().all(|e| e.replicas == 2));
    assert!(
        inputs.groups.is_empty(),
        "b, a's memory partner, is not on this node"
    );

    let all: BTreeSet<VmKey> = [ka.clone(), kb.clone(), kc.clone()].into();
    scanner.tick(&procs, &all);
    let inputs = scanner.inputs();
    assert_eq!(inputs.summary.vms.len(), 3);
    assert_eq!(inputs.groups.len(), 1);
    assert_eq!(inputs.groups[0].members, vec![ka.clone(), kb.clone()]);
    assert_eq!(inputs.groups[0].shared_bytes, 8 * MIB);
    let status = commonground::agent::publish::build_bounded_status(&inputs);
    assert_eq!(status.vm_count, 3);
    assert_eq!(
        status.memory_groups[0].members,
        vec![ka.to_string(), kb.to_string()]
    );
    drop((a, b, c));
    let _ = std::fs::remove_file(format!("/dev/shm/cg-test-{tag}"));
}
