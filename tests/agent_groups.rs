//! Memory groups against real processes (`group: Follow`): VMs whose processes map
//! the same /dev/shm file form a group. Once a member has left the node, the group is kept for
//! the members still there, and those that touch the shared memory are reported, while those
//! that do not touch it are not.

mod helpers;

use std::collections::BTreeSet;

use commonground::agent::discover;
use commonground::agent::node_scanner::NodeScanner;
use commonground::agent::publish::build_bounded_status;
use commonground::plan::VmKey;
use helpers::{Holder, HolderSpec, MIB};

const SHARED_MIB: u64 = 4;

/// "VMs" whose whole guest memory is one shared /dev/shm file.
struct SharedVms {
    shm: String,
    keys: Vec<VmKey>,
    holders: Vec<Holder>,
}

impl SharedVms {
    fn start(tag: &str, members: &[&str]) -> SharedVms {
        let shm = format!("cg-groups-{tag}-{}", std::process::id());
        let backing = format!("shm:{shm}");
        let mut keys = Vec::new();
        let mut holders = Vec::new();
        for name in members {
            let vm = format!("{name}-{tag}-{}", std::process::id());
            holders.push(Holder::start(HolderSpec {
                vm: Some(("ns", &vm)),
                image_mib: SHARED_MIB,
                backing: &backing,
                ..Default::default()
            }));
            keys.push(VmKey::new("ns", vm));
        }
        SharedVms { shm, keys, holders }
    }

    /// Writes one byte in one page of member `i`'s shared memory.
    fn touch_one_page(&mut self, i: usize) {
        let answer = self.holders[i].command(&format!("touch {} 1 4096", 3 * 4096));
        assert_eq!(answer, "ok 1");
    }
}

impl Drop for SharedVms {
    fn drop(&mut self) {
        for h in &mut self.holders {
            h.kill();
        }
        let _ = std::fs::remove_file(format!("/dev/shm/{}", self.shm));
    }
}

fn scanner() -> NodeScanner {
    helpers::test_scanner()
}

/// One agent interval over the VMs of `on_node` that still have a process.
fn tick(scanner: &mut NodeScanner, on_node: &[&VmKey]) {
    let procs = discover::find_qemu_processes().expect("/proc lists");
    let on_node: BTreeSet<VmKey> = on_node.iter().map(|k| (*k).clone()).collect();
    scanner.tick(&procs, &on_node);
}

/// (members, recently accessed by) of the node's only memory group, as published.
fn published_group(scanner: &NodeScanner) -> Option<(Vec<String>, Vec<String>)> {
    let status = build_bounded_status(&scanner.inputs());
    assert!(
        status.memory_groups.len() <= 1,
        "{:?}",
        status.memory_groups
    );
    let g = status.memory_groups.first()?;
    Some((g.members.clone(), g.recently_accessed_by.clone()))
}

#[test]
fn members_left_behind_that_touch_the_shared_memory_are_reported_and_the_others_are_not() {
    let mut vms = SharedVms::start("follow", &["a", "b", "c"]);
    let [a, b, c] = [&vms.keys[0], &vms.keys[1], &vms.keys[2]].map(|k| k.clone());
    let all = vec![a.to_string(), b.to_string(), c.to_string()];
    let mut s = scanner();

    tick(&mut s, &[&a, &b, &c]);
    let inputs = s.inputs();
    assert_eq!(inputs.groups.len(), 1);
    assert_eq!(inputs.groups[0].shared_bytes, SHARED_MIB * MIB);
    assert_eq!(published_group(&s), Some((all.clone(), vec![])));
    // While the group is whole, touching the shared memory is normal: nothing is reported.
    vms.touch_one_page(1);
    tick(&mut s, &[&a, &b, &c]);
    vms.touch_one_page(1);
    tick(&mut s, &[&a, &b, &c]);
    assert_eq!(published_group(&s), Some((all.clone(), vec![])));

    // a migrated away: its process is gone, and b and c are watched from now on.
    vms.holders[0].kill();
    tick(&mut s, &[&b, &c]);
    assert_eq!(published_group(&s), Some((all.clone(), vec![])));
    // The agent's own scans of b and c (which read the shared pages) do not count.
    for _ in 0..3 {
        tick(&mut s, &[&b, &c]);
        assert_eq!(published_group(&s), Some((all.clone(), vec![])));
    }
    vms.touch_one_page(1);
    tick(&mut s, &[&b, &c]);
    assert_eq!(
        published_group(&s),
        Some((all.clone(), vec![b.to_string()])),
        "b touched the shared memory, c did not"
    );

    // b followed a: c alone no longer shares the file with anyone here, but the group stays.
    vms.holders[1].kill();
    tick(&mut s, &[&c]);
    assert_eq!(published_group(&s), Some((all.clone(), vec![])));
    tick(&mut s, &[&c]);
    assert_eq!(published_group(&s), Some((all.clone(), vec![])));
    vms.touch_one_page(2);
    tick(&mut s, &[&c]);
    assert_eq!(
        published_group(&s),
        Some((all.clone(), vec![c.to_string()]))
    );

    // The last member left: nothing of the group is on the node.
    vms.holders[2].kill();
    tick(&mut s, &[]);
    assert_eq!(published_group(&s), None);
}

#[test]
fn a_whole_group_is_not_watched_however_much_its_members_touch_the_shared_memory() {
    let mut vms = SharedVms::start("whole", &["a", "b", "c"]);
    let [a, b, c] = [&vms.keys[0], &vms.keys[1], &vms.keys[2]].map(|k| k.clone());
    let mut s = scanner();
    tick(&mut s, &[&a, &b, &c]);
    assert!(s.shared.watched().is_empty());
    // Every member touches the shared memory, interval after interval: no reports, nothing
    // watched, as long as all are here.
    for _ in 0..3 {
        for i in 0..3 {
            vms.touch_one_page(i);
        }
        tick(&mut s, &[&a, &b, &c]);
        assert!(s.shared.watched().is_empty());
        assert_eq!(
            published_group(&s).map(|g| g.1),
            Some(vec![]),
            "no departure, no reports"
        );
    }
}

#[test]
fn a_member_whose_process_exits_during_an_interval_has_left() {
    let mut pair = SharedVms::start("exit", &["a", "b"]);
    let [a, b] = [&pair.keys[0], &pair.keys[1]].map(|k| k.clone());
    let both = vec![a.to_string(), b.to_string()];
    let mut s = scanner();
    tick(&mut s, &[&a, &b]);
    assert_eq!(published_group(&s), Some((both.clone(), vec![])));
    // a's process exits after the agent listed the processes, while its VMI still names this
    // node: the race the agent meets when a migration ends. a has left all the same: the group
    // is kept for b, which no longer shares the file with anyone here, and b is watched.
    let procs = discover::find_qemu_processes().expect("/proc lists");
    pair.holders[0].kill();
    s.tick(&procs, &[a.clone(), b.clone()].into());
    assert_eq!(published_group(&s), Some((both.clone(), vec![])));
    assert_eq!(
        s.shared.watched().into_keys().collect::<Vec<_>>(),
        vec![b.clone()]
    );
    tick(&mut s, &[&b]);
    pair.touch_one_page(1);
    tick(&mut s, &[&b]);
    assert_eq!(published_group(&s), Some((both, vec![b.to_string()])));
}
