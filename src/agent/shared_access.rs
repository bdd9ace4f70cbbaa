//! Following a memory group (`group: Follow`): once a member of a memory group has left the node,
//! which of the members still here touch the memory they shared with it. A member that does is
//! the next to migrate, to where the first one went; the agent reports it in the group's
//! `recentlyAccessedBy` and the controller starts that migration.
//!
//! # The signal
//! The CPU sets the accessed ("young") bit of a page table entry on every read or write through
//! it, and `Referenced:` in `/proc/<pid>/smaps` is how much of a mapping is marked accessed.
//! Writing `3` to `/proc/<pid>/clear_refs` clears those marks for the process's file-backed
//! mappings only. Shared memory is always file-backed (shm, memfd, a file), so the process's
//! anonymous memory is left alone. The agent clears, waits one interval, then reads
//! `Referenced:` for the mappings of the shared objects. Anything above 0 kB means the process
//! touched them.
//!
//! The clear does not flush the TLB, and a CPU that still holds a translation does not set the
//! accessed bit again. Measured here: right after clearing, 90% of accesses to recently used
//! pages went unseen. So the clear is followed by `4`. On a kernel without soft-dirty tracking,
//! `4` clears nothing, but it still flushes the process's TLB and invalidates secondary MMUs
//! (KVM's), so the next access walks the page tables and is seen; with the flush none was
//! missed. Where the kernel does track soft-dirty bits, `4` would disturb the scanner's dirty
//! tracking. There, pages of the shared mappings written since the last rescan (the scanner
//! clears the bits every interval and so flushes anyway) count as accesses, and reads are
//! seen where the TLB no longer holds the page.
//!
//! Checked on a kernel without soft-dirty (6.18): after the clear, `Referenced:` of a MAP_SHARED
//! /dev/shm mapping reads 0 kB. It rises by exactly 4 kB for each page the process then reads or
//! writes, and stays 0 in a second process that maps the same file and touches nothing. See the
//! tests here and in tests/agent_groups.rs.
//!
//! # What can blur it
//! - Part of the accessed state is kept per page rather than per mapping (`PG_referenced`,
//!   `PG_young`), and counts for every process that maps the page. The agent's own reads of
//!   guest memory (process_vm_readv) set it. So the node scanner reads `Referenced:` before it
//!   scans and clears after. Kernel page walkers (reclaim, DAMON) can move one process's
//!   accessed bit into those page flags. With several members left, a page touched by one of
//!   them may then count for the others too: they may follow sooner, never later.
//! - A process that unmaps the shared memory, above all by exiting, moves its own accessed bits
//!   into the page flags as it goes, so the others read as if they had touched those pages.
//!   Checked here (6.18) and tested below. That happens right after every migration: KubeVirt
//!   moves the VMI to its new node first, and the source QEMU exits moments later. So the agent
//!   starts watching a group only once the processes of the members that left have exited (at
//!   most [`EXIT_WAIT`]), and discards an interval in which another member's process exited.
//!   That costs one interval of delay, and never reports a member that stayed idle.
//! - hugetlbfs mappings have no `Referenced:` accounting, so a group that shares huge pages
//!   reports no accesses.
//! - The state lives in the agent's memory, and in the node's digest: a group kept after a
//!   departure is published with the time the first member left and the objects its members
//!   share. A restarted agent reads them back ([`SharedAccessMonitor::restore`]) and goes on
//!   watching the members left behind for what remains of the retention. What it cannot know
//!   is the pid of a departed member whose process had not exited yet; it waits for every
//!   such process it finds among the node's QEMU processes, as after a departure it saw.
//!
//! # When accesses are reported
//! Accesses are reported only after a member has left for any reason, and only for members
//! still on the node. The mechanism has the hypervisor watch the others once the first VM has moved.
//! Before that, every member touches the shared memory as a matter of course, and reporting it
//! would only invite needless migrations. A group that lost a member is kept (name, every member
//! including the ones that left, shared bytes) for [`DEPARTED_RETENTION`] after the departure,
//! or until none of its members is left here. The members left behind no longer share the object
//! with anyone on this node, so without this the group would vanish. A member that touched the
//! memory stays in `recentlyAccessedBy` for [`ACCESS_HOLD`] after its last access. A failed
//! publish or a slow reader then still sees it.

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use crate::api::time::{self, Timestamp};
use crate::plan::region::PAGE_SIZE;
use crate::plan::VmKey;

use super::proc_maps::{parse_line, Mapping};
use super::shared_memory::{MemoryGroup, ObjectId};
use super::vm_tracker::RescanMode;
use super::{soft_dirty, AgentError};

/// How long a group is kept after its first member left.
pub const DEPARTED_RETENTION: Duration = Duration::from_secs(600);
/// How long a member stays in `recentlyAccessedBy` after its last access.
pub const ACCESS_HOLD: Duration = Duration::from_secs(60);
/// How long the watch of a group waits for the process of a member that left to exit. A process
/// still running after that is taken to stay (a failed exit cannot mark pages any more than a
/// live process does).
pub const EXIT_WAIT: Duration = Duration::from_secs(120);

/// `clear_refs` value that clears the accessed bits of file-backed mappings only (`1` would
/// clear the anonymous memory's as well, which only serves the kernel's reclaim).
const CLEAR_FILE_BACKED_REFS: &[u8] = b"3";
/// `clear_refs` value that clears soft-dirty bits and then flushes the TLB.
const CLEAR_SOFT_DIRTY: &[u8] = b"4";

/// Starts an interval for `pid`: clears the accessed bits of every file-backed mapping and,
/// without soft-dirty tracking ([`RescanMode::Sampled`]), flushes its cached translations (see
/// the module documentation).
pub fn clear_accessed(pid: i32, mode: RescanMode) -> Result<(), AgentError> {
    let clear_refs = format!("/proc/{pid}/clear_refs");
    std::fs::write(&clear_refs, CLEAR_FILE_BACKED_REFS)
        .map_err(|e| AgentError::io(pid, "clear_refs", e))?;
    if mode == RescanMode::Sampled {
        std::fs::write(&clear_refs, CLEAR_SOFT_DIRTY)
            .map_err(|e| AgentError::io(pid, "clear_refs", e))?;
    }
    Ok(())
}

/// Bytes marked accessed (`Referenced:`) in the mappings of `objects`, from the text of
/// `/proc/<pid>/smaps`.
pub fn parse_referenced(
    pid: i32,
    smaps: &str,
    objects: &BTreeSet<ObjectId>,
) -> Result<u64, AgentError> {
    let mut in_object = false;
    let mut bytes = 0u64;
    for line in smaps.lines() {
        // A mapping's header is a maps line; the fields that follow are `Name: value [kB]`,
        // which never parse as one (no address range).
        if let Some(m) = parse_line(line) {
            in_object = objects.contains(&(m.dev_major, m.dev_minor, m.inode));
            continue;
        }
        let Some(value) = line.strip_prefix("Referenced:") else {
            continue;
        };
        if !in_object {
            continue;
        }
        let kib: u64 = value
            .trim()
            .strip_suffix("kB")
            .and_then(|v| v.trim().parse().ok())
            .ok_or_else(|| AgentError::Proc {
                pid,
                file: "smaps",
                what: format!("malformed line {line:?}"),
            })?;
        bytes += kib * 1024;
    }
    Ok(bytes)
}

/// Bytes of the mappings of `objects` that `pid` touched since its last [`clear_accessed`].
pub fn read_referenced(pid: i32, objects: &BTreeSet<ObjectId>) -> Result<u64, AgentError> {
    let text = std::fs::read_to_string(format!("/proc/{pid}/smaps"))
        .map_err(|e| AgentError::io(pid, "smaps", e))?;
    parse_referenced(pid, &text, objects)
}

/// Bytes of the mappings of `objects` (in `maps`) written since the soft-dirty bits were last
/// cleared. Only meaningful where the kernel tracks them ([`RescanMode::SoftDirty`]).
pub fn written_bytes(
    pid: i32,
    maps: &[Mapping],
    objects: &BTreeSet<ObjectId>,
) -> Result<u64, AgentError> {
    let mut pages = 0u64;
    for m in maps
        .iter()
        .filter(|m| objects.contains(&(m.dev_major, m.dev_minor, m.inode)))
    {
        let dirty = soft_dirty::dirty_pages(pid, m.start, m.len())?;
        pages += dirty.iter().filter(|d| **d).count() as u64;
    }
    Ok(pages * PAGE_SIZE as u64)
}

/// A memory group the agent has seen on this node.
#[derive(Clone, Debug)]
struct KnownGroup {
    name: String,
    objects: BTreeSet<ObjectId>,
    /// Every member seen, including those that left since.
    members: BTreeSet<VmKey>,
    shared_bytes: u64,
    /// Members with a process on the node at the last update.
    present: BTreeSet<VmKey>,
    /// When a member was first missed; `None` while all are here.
    departed_at: Option<Instant>,
    /// The same moment on the wall clock, as published (fixed once taken, so a publish does
    /// not see the group change every interval).
    departed_wall: Option<Timestamp>,
    /// Last access seen per member still here, since the departure.
    last_access: BTreeMap<VmKey, Instant>,
}

impl KnownGroup {
    fn from_current(g: MemoryGroup) -> Self {
        Self {
            name: g.name,
            objects: g.objects.into_iter().collect(),
            members: g.members.into_iter().collect(),
            shared_bytes: g.shared_bytes,
            present: BTreeSet::new(),
            departed_at: None,
            departed_wall: None,
            last_access: BTreeMap::new(),
        }
    }

    fn expired(&self, retention: Duration, now: Instant) -> bool {
        self.departed_at
            .is_some_and(|at| now.saturating_duration_since(at) >= retention)
    }
}

/// The node's memory groups over time, and which members touched the shared memory after a
/// member left. Driven by the node scanner each interval: [`Self::probe`] before the scans,
/// [`Self::update`] and [`Self::arm`] after them.
#[derive(Debug)]
pub struct SharedAccessMonitor {
    pub retention: Duration,
    pub access_hold: Duration,
    groups: Vec<KnownGroup>,
    /// Processes whose accessed bits were cleared at the end of the last interval: only these
    /// have a reading that covers exactly one interval.
    armed: BTreeMap<VmKey, Armed>,
    /// Processes of members that left the node (pid -> the member, when it was seen leaving)
    /// that had not exited yet when last looked at: their exit will blur the others' readings.
    exiting: BTreeMap<i32, (VmKey, Instant)>,
    /// Groups were restored and the next interval has yet to look for the processes of their
    /// departed members ([`Self::adopt_departed`]).
    restored: bool,
}

/// One armed process: its pid, the objects its group shares, and the pids of the other members
/// whose processes map them too (one of them exiting blurs the reading).
#[derive(Debug, Clone, PartialEq, Eq)]
struct Armed {
    pid: i32,
    objects: BTreeSet<ObjectId>,
    companions: BTreeSet<i32>,
}

/// The earlier of two optional moments.
fn earliest<T: Ord>(a: Option<T>, b: Option<T>) -> Option<T> {
    match (a, b) {
        (Some(a), Some(b)) => Some(a.min(b)),
        (a, b) => a.or(b),
    }
}

/// Whether process `pid` still exists (a zombie counts: it is about to be reaped).
fn process_alive(pid: i32) -> bool {
    std::path::Path::new(&format!("/proc/{pid}")).exists()
}

impl Default for SharedAccessMonitor {
    fn default() -> Self {
        Self {
            retention: DEPARTED_RETENTION,
            access_hold: ACCESS_HOLD,
            groups: Vec::new(),
            armed: BTreeMap::new(),
            exiting: BTreeMap::new(),
            restored: false,
        }
    }
}

/// The wall-clock time of `at`, a moment in the past (or now).
fn wall_clock(at: Instant) -> Timestamp {
    let now = Timestamp::now();
    let ago = Instant::now().saturating_duration_since(at);
    now.checked_sub(ago).unwrap_or(now)
}

impl SharedAccessMonitor {
    /// Takes back the groups that an earlier run of the agent kept after a departure (read
    /// from the node's digest), so that a restart does not forget the members left behind.
    /// Only groups with a departure time, their shared objects and at least two members are
    /// taken, and only within the retention counted from that departure (`wall_now` is the
    /// wall clock at `now`). A member published as touching the shared memory is held as if
    /// it had touched it at `now`. Returns how many groups were taken.
    pub fn restore(
        &mut self,
        groups: Vec<MemoryGroup>,
        wall_now: Timestamp,
        now: Instant,
    ) -> usize {
        let mut taken = 0;
        for g in groups {
            let Some(departed) = g.departed_at else {
                continue;
            };
            let ago = time::elapsed(departed, wall_now);
            if g.objects.is_empty() || g.members.len() < 2 || ago >= self.retention {
                continue;
            }
            let objects: BTreeSet<ObjectId> = g.objects.iter().copied().collect();
            if self.groups.iter().any(|k| !k.objects.is_disjoint(&objects)) {
                continue;
            }
            let accessed = g.recently_accessed_by.clone();
            let mut k = KnownGroup::from_current(g);
            k.departed_at = Some(now.checked_sub(ago).unwrap_or(now));
            k.departed_wall = Some(departed);
            k.last_access = accessed
                .into_iter()
                .filter(|vm| k.members.contains(vm))
                .map(|vm| (vm, now))
                .collect();
            tracing::info!(group = %k.name, members = k.members.len(), departed = %departed, "memory group kept after a departure taken back from the digest");
            self.groups.push(k);
            taken += 1;
        }
        self.restored |= taken > 0;
        taken
    }

    /// Once, in the first interval after [`Self::restore`]: `processes` are the node's QEMU
    /// processes of VMs no longer on the node. Those of a restored group's members are waited
    /// for as after a departure seen ([`Self::member_left`]), since their exit would blur the
    /// readings of the members left behind.
    pub fn adopt_departed<'a>(
        &mut self,
        processes: impl IntoIterator<Item = (&'a VmKey, i32)>,
        now: Instant,
    ) {
        if !std::mem::take(&mut self.restored) {
            return;
        }
        for (vm, pid) in processes {
            self.member_left(vm, pid, now);
        }
    }

    /// The members whose accesses are watched now (those still here of groups that lost a
    /// member), with the objects their group shares.
    pub fn watched(&self) -> BTreeMap<VmKey, BTreeSet<ObjectId>> {
        let mut out: BTreeMap<VmKey, BTreeSet<ObjectId>> = BTreeMap::new();
        for g in self.groups.iter().filter(|g| g.departed_at.is_some()) {
            for vm in &g.present {
                out.entry(vm.clone())
                    .or_default()
                    .extend(g.objects.iter().copied());
            }
        }
        out
    }

    /// Before the interval's scans (which mark what they read accessed): records which watched
    /// processes, armed at the end of the last interval, touched their shared objects since.
    /// `processes` are (VM, pid, its mappings); an unreadable or vanished process counts as no
    /// access.
    pub fn probe<'a>(
        &mut self,
        processes: impl IntoIterator<Item = (&'a VmKey, i32, &'a [Mapping])>,
        mode: RescanMode,
        now: Instant,
    ) {
        self.probe_with(processes, mode, now, &process_alive)
    }

    fn probe_with<'a>(
        &mut self,
        processes: impl IntoIterator<Item = (&'a VmKey, i32, &'a [Mapping])>,
        mode: RescanMode,
        now: Instant,
        alive: &dyn Fn(i32) -> bool,
    ) {
        let watched = self.watched();
        let armed = std::mem::take(&mut self.armed);
        for (vm, pid, maps) in processes {
            if !watched.contains_key(vm) {
                continue;
            }
            let Some(a) = armed.get(vm).filter(|a| a.pid == pid) else {
                continue;
            };
            if let Some(gone) = a.companions.iter().find(|p| !alive(**p)) {
                tracing::debug!(namespace = %vm.namespace, name = %vm.name, pid, exited = gone, "another member's process exited during the interval; its reading is discarded");
                continue;
            }
            let objects = &a.objects;
            let touched = read_referenced(pid, objects).and_then(|referenced| {
                if referenced > 0 || mode != RescanMode::SoftDirty {
                    return Ok(referenced);
                }
                written_bytes(pid, maps, objects)
            });
            match touched {
                Ok(0) => {}
                Ok(bytes) => {
                    tracing::info!(namespace = %vm.namespace, name = %vm.name, pid, bytes, "member touched the shared memory after a member left");
                    self.record_access(vm, now);
                }
                // The process exited since the last interval: it has left the node.
                Err(e @ AgentError::NoProcess(_)) => {
                    tracing::debug!(namespace = %vm.namespace, name = %vm.name, pid, error = %e, "cannot read shared memory accesses")
                }
                Err(e) => {
                    tracing::warn!(namespace = %vm.namespace, name = %vm.name, pid, error = %e, "cannot read shared memory accesses")
                }
            }
        }
    }

    /// Records that `vm` touched its group's shared memory at `now` (in every group that lost
    /// a member and still has it here).
    pub fn record_access(&mut self, vm: &VmKey, now: Instant) {
        for g in self
            .groups
            .iter_mut()
            .filter(|g| g.departed_at.is_some() && g.present.contains(vm))
        {
            g.last_access.insert(vm.clone(), now);
        }
    }

    /// After the scans: the groups found now (`current`, from the VMs scanned) and the VMs with
    /// a process on the node (`present`). A known group sharing an object with a current one is
    /// the same group (several merge into one). A known group that is no longer current is kept
    /// only while it has lost a member and some remain, within the retention.
    pub fn update(&mut self, current: Vec<MemoryGroup>, present: &BTreeSet<VmKey>, now: Instant) {
        let mut old = std::mem::take(&mut self.groups);
        old.retain(|g| !g.expired(self.retention, now));
        let mut next: Vec<(KnownGroup, bool)> = Vec::new();
        for g in current {
            let mut group = KnownGroup::from_current(g);
            let (same, rest): (Vec<KnownGroup>, Vec<KnownGroup>) = old
                .into_iter()
                .partition(|k| !k.objects.is_disjoint(&group.objects));
            old = rest;
            for k in same {
                group.members.extend(k.members);
                group.objects.extend(k.objects);
                group.last_access.extend(k.last_access);
                group.departed_at = earliest(group.departed_at, k.departed_at);
                group.departed_wall = earliest(group.departed_wall, k.departed_wall);
            }
            next.push((group, true));
        }
        next.extend(old.into_iter().map(|k| (k, false)));
        for (g, _) in &mut next {
            g.present = g.members.intersection(present).cloned().collect();
            if g.present.len() < g.members.len() {
                if g.departed_at.is_none() && !g.present.is_empty() {
                    let left: Vec<String> = g
                        .members
                        .difference(&g.present)
                        .map(|m| m.to_string())
                        .collect();
                    tracing::info!(group = %g.name, ?left, "memory group member left the node; watching the members still here");
                }
                g.departed_at.get_or_insert(now);
                g.departed_wall.get_or_insert_with(|| wall_clock(now));
            } else {
                g.departed_at = None;
                g.departed_wall = None;
            }
            let here = &g.present;
            g.last_access.retain(|vm, _| here.contains(vm));
            if g.departed_at.is_none() {
                g.last_access.clear();
            }
        }
        self.groups = next
            .into_iter()
            .filter(|(g, is_current)| {
                !g.present.is_empty() && (*is_current || g.departed_at.is_some())
            })
            .map(|(g, _)| g)
            .collect();
    }

    /// After the scans: clears the accessed bits of every watched process, so the next
    /// [`Self::probe`] sees one interval's accesses. `pids`: VM -> its process on the node.
    /// Groups still waiting for a departed member's process to exit are not armed (see the
    /// module documentation).
    pub fn arm(&mut self, pids: &BTreeMap<VmKey, i32>, mode: RescanMode, now: Instant) {
        self.armed.clear();
        for (vm, armed) in self.armable(pids, now, &process_alive) {
            match clear_accessed(armed.pid, mode) {
                Ok(()) => {
                    self.armed.insert(vm, armed);
                }
                Err(e) => {
                    tracing::warn!(namespace = %vm.namespace, name = %vm.name, pid = armed.pid, error = %e, "cannot clear accessed bits; shared memory accesses not seen")
                }
            }
        }
    }

    /// Records that `vm`, a member of a known group, left the node while its process `pid` may
    /// still be running: the group is not watched until that process has exited.
    pub fn member_left(&mut self, vm: &VmKey, pid: i32, now: Instant) {
        if self.groups.iter().any(|g| g.members.contains(vm)) {
            self.exiting.insert(pid, (vm.clone(), now));
        }
    }

    /// What [`Self::arm`] clears: each watched member with a process here, unless a member of
    /// one of its groups left and its process (`alive`) has not exited yet, within
    /// [`EXIT_WAIT`].
    fn armable(
        &mut self,
        pids: &BTreeMap<VmKey, i32>,
        now: Instant,
        alive: &dyn Fn(i32) -> bool,
    ) -> BTreeMap<VmKey, Armed> {
        self.exiting.retain(|pid, (_, since)| {
            now.saturating_duration_since(*since) < EXIT_WAIT && alive(*pid)
        });
        let mut out: BTreeMap<VmKey, Armed> = BTreeMap::new();
        for g in self.groups.iter().filter(|g| g.departed_at.is_some()) {
            if let Some((pid, (left, _))) = self
                .exiting
                .iter()
                .find(|(_, (vm, _))| g.members.contains(vm))
            {
                tracing::debug!(group = %g.name, member = %left, pid, "waiting for the process of a member that left to exit before watching the others");
                continue;
            }
            let group_pids: BTreeSet<i32> = g
                .present
                .iter()
                .filter_map(|vm| pids.get(vm).copied())
                .collect();
            for vm in &g.present {
                let Some(&pid) = pids.get(vm) else {
                    continue;
                };
                let a = out.entry(vm.clone()).or_insert_with(|| Armed {
                    pid,
                    objects: BTreeSet::new(),
                    companions: BTreeSet::new(),
                });
                a.objects.extend(g.objects.iter().copied());
                a.companions
                    .extend(group_pids.iter().copied().filter(|p| *p != pid));
            }
        }
        out
    }

    /// The groups to publish: those found now and those kept after a departure, each with the
    /// members still here that touched the shared memory within the hold.
    pub fn groups(&self, now: Instant) -> Vec<MemoryGroup> {
        let mut out: Vec<MemoryGroup> = self
            .groups
            .iter()
            .map(|g| MemoryGroup {
                name: g.name.clone(),
                members: g.members.iter().cloned().collect(),
                shared_bytes: g.shared_bytes,
                objects: g.objects.iter().copied().collect(),
                recently_accessed_by: g
                    .last_access
                    .iter()
                    .filter(|(_, at)| now.saturating_duration_since(**at) <= self.access_hold)
                    .map(|(vm, _)| vm.clone())
                    .collect(),
                departed_at: g.departed_wall,
            })
            .collect();
        out.sort_by(|a, b| a.members.cmp(&b.members));
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OBJ: ObjectId = (0, 0x1a, 77);

    fn vm(name: &str) -> VmKey {
        VmKey::new("ns", name)
    }

    fn group(members: &[&str], objects: &[ObjectId]) -> MemoryGroup {
        MemoryGroup {
            name: "shm-common".into(),
            members: members.iter().map(|m| vm(m)).collect(),
            shared_bytes: 4 << 20,
            objects: objects.to_vec(),
            recently_accessed_by: Vec::new(),
            departed_at: None,
        }
    }

    fn here(names: &[&str]) -> BTreeSet<VmKey> {
        names.iter().map(|n| vm(n)).collect()
    }

    #[test]
    fn referenced_bytes_are_summed_over_the_mappings_of_the_objects_only() {
        let smaps = "\
7f0000000000-7f0000400000 rw-s 00000000 00:1a 77 /dev/shm/common
Size:               4096 kB
Rss:                4096 kB
Referenced:            8 kB
VmFlags: rd wr sh mr mw me ms sd
7f0000400000-7f0000600000 rw-s 00400000 00:1a 77 /dev/shm/common
Referenced:            4 kB
7f1000000000-7f1000400000 rw-p 00000000 00:00 0 
Referenced:          512 kB
7f2000000000-7f2000400000 rw-s 00000000 00:1a 88 /dev/shm/other
Referenced:           16 kB
";
        let objects = BTreeSet::from([OBJ]);
        assert_eq!(parse_referenced(1, smaps, &objects).unwrap(), 12 * 1024);
        assert_eq!(parse_referenced(1, smaps, &BTreeSet::new()).unwrap(), 0);
        let err = parse_referenced(
            7,
            "7f0000000000-7f0000400000 rw-s 00000000 00:1a 77 /x\nReferenced: lots\n",
            &objects,
        )
        .unwrap_err()
        .to_string();
        assert!(err.contains("/proc/7/smaps"), "{err}");
    }

    #[test]
    fn a_vanished_process_is_an_error_not_a_panic() {
        // Pid numbers this high are beyond pid_max (at most 2^22).
        let gone = 1 << 30;
        assert!(matches!(
            read_referenced(gone, &BTreeSet::from([OBJ])),
            Err(AgentError::NoProcess(_))
        ));
        assert!(matches!(
            clear_accessed(gone, RescanMode::Sampled),
            Err(AgentError::NoProcess(_))
        ));
    }

    #[test]
    fn accesses_count_only_after_a_member_left_and_only_for_members_still_here() {
        let mut m = SharedAccessMonitor::default();
        let t0 = Instant::now();
        m.update(
            vec![group(&["a", "b", "c"], &[OBJ])],
            &here(&["a", "b", "c"]),
            t0,
        );
        assert!(
            m.watched().is_empty(),
            "nothing is watched before a departure"
        );
        m.record_access(&vm("b"), t0);
        assert!(m.groups(t0)[0].recently_accessed_by.is_empty());

        // a migrated: b and c still share the object, and are watched.
        let t1 = t0 + Duration::from_secs(5);
        m.update(vec![group(&["b", "c"], &[OBJ])], &here(&["b", "c"]), t1);
        assert_eq!(
            m.watched().into_keys().collect::<Vec<_>>(),
            vec![vm("b"), vm("c")]
        );
        m.record_access(&vm("b"), t1);
        m.record_access(&vm("a"), t1);
        let g = &m.groups(t1)[0];
        assert_eq!(g.members, vec![vm("a"), vm("b"), vm("c")], "a still listed");
        assert_eq!(g.recently_accessed_by, vec![vm("b")]);

        // c left as well: b alone no longer shares the object, the group is kept.
        let t2 = t1 + Duration::from_secs(5);
        m.update(Vec::new(), &here(&["b"]), t2);
        let g = &m.groups(t2)[0];
        assert_eq!(g.members, vec![vm("a"), vm("b"), vm("c")]);
        assert_eq!(g.shared_bytes, 4 << 20);
        assert_eq!(g.recently_accessed_by, vec![vm("b")]);
        assert!(
            m.groups(t1 + ACCESS_HOLD + Duration::from_secs(1))[0]
                .recently_accessed_by
                .is_empty(),
            "an access is reported for the hold only"
        );

        // b left too: nothing of the group is on the node any more.
        m.update(Vec::new(), &here(&[]), t2 + Duration::from_secs(1));
        assert!(m.groups(t2).is_empty());
    }

    #[test]
    fn a_restarted_monitor_takes_back_a_kept_group_and_watches_the_member_left_behind() {
        let t0 = Instant::now();
        let mut before = SharedAccessMonitor::default();
        before.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        before.update(Vec::new(), &here(&["b"]), t0 + Duration::from_secs(1));
        before.record_access(&vm("b"), t0 + Duration::from_secs(2));
        let published = before.groups(t0 + Duration::from_secs(2));
        let departed = published[0]
            .departed_at
            .expect("a kept group has its departure time");
        // A current group (no departure) carries no time.
        let mut whole = SharedAccessMonitor::default();
        whole.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        assert_eq!(whole.groups(t0)[0].departed_at, None);

        // The agent restarts 100 s after the departure, and b alone remains (no current group).
        let wall = departed.checked_add(Duration::from_secs(100)).unwrap();
        let now = Instant::now() + Duration::from_secs(1000);
        let mut after = SharedAccessMonitor::default();
        assert_eq!(after.restore(published.clone(), wall, now), 1);
        // Taking back twice, or a group overlapping a known one, adds nothing.
        assert_eq!(after.restore(published.clone(), wall, now), 0);
        after.update(Vec::new(), &here(&["b"]), now);
        assert_eq!(
            after.watched().into_keys().collect::<Vec<_>>(),
            vec![vm("b")],
            "the member left behind is watched again"
        );
        let g = &after.groups(now)[0];
        assert_eq!(g.members, vec![vm("a"), vm("b")]);
        assert_eq!(
            g.departed_at,
            Some(departed),
            "the departure time is kept as it was"
        );
        assert_eq!(
            g.recently_accessed_by,
            vec![vm("b")],
            "a reported access stays reported"
        );
        // The retention counts from the departure, not from the restart.
        let end = now + DEPARTED_RETENTION - Duration::from_secs(100);
        after.update(Vec::new(), &here(&["b"]), end);
        assert!(
            after.groups(end).is_empty(),
            "forgotten when the retention ends"
        );

        // A group past its retention, without objects, or of one member is not taken back.
        let late = departed.checked_add(DEPARTED_RETENTION).unwrap();
        assert_eq!(
            SharedAccessMonitor::default().restore(published.clone(), late, now),
            0
        );
        let mut no_objects = published.clone();
        no_objects[0].objects.clear();
        assert_eq!(
            SharedAccessMonitor::default().restore(no_objects, wall, now),
            0
        );
        let mut alone = published.clone();
        alone[0].members.truncate(1);
        assert_eq!(SharedAccessMonitor::default().restore(alone, wall, now), 0);
        // Nor is a group that never lost a member.
        let mut current = published;
        current[0].departed_at = None;
        assert_eq!(
            SharedAccessMonitor::default().restore(current, wall, now),
            0
        );
    }

    #[test]
    fn after_a_restore_the_watch_waits_for_a_departed_members_process_still_running() {
        let t0 = Instant::now();
        let mut before = SharedAccessMonitor::default();
        before.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        before.update(Vec::new(), &here(&["b"]), t0);
        let published = before.groups(t0);
        let wall = published[0].departed_at.unwrap();

        let mut m = SharedAccessMonitor::default();
        m.restore(published, wall, t0);
        // a's process (pid 41) still runs on the node; c is no member.
        let (a, c) = (vm("a"), vm("c"));
        m.adopt_departed([(&a, 41), (&c, 43)], t0);
        m.update(Vec::new(), &here(&["b"]), t0);
        let pids = BTreeMap::from([(vm("b"), 42)]);
        assert!(
            m.armable(&pids, t0, &|pid| pid == 41).is_empty(),
            "not watched while a's process may still exit"
        );
        assert_eq!(
            m.armable(&pids, t0, &|_| false)
                .into_keys()
                .collect::<Vec<_>>(),
            vec![vm("b")],
            "watched once it has exited"
        );
        // Only the first interval after a restore adopts processes.
        m.adopt_departed([(&a, 41)], t0);
        assert!(!m.armable(&pids, t0, &|pid| pid == 41).is_empty());
    }

    #[test]
    fn a_departed_group_is_kept_for_the_retention_only() {
        let mut m = SharedAccessMonitor {
            retention: Duration::from_secs(60),
            ..Default::default()
        };
        let t0 = Instant::now();
        m.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        m.update(Vec::new(), &here(&["b"]), t0 + Duration::from_secs(1));
        m.update(Vec::new(), &here(&["b"]), t0 + Duration::from_secs(60));
        assert_eq!(m.groups(t0).len(), 1);
        m.update(Vec::new(), &here(&["b"]), t0 + Duration::from_secs(62));
        assert!(m.groups(t0).is_empty(), "forgotten after the retention");
        assert!(m.watched().is_empty());
    }

    #[test]
    fn a_group_that_dissolves_without_a_departure_is_dropped_and_a_returning_member_ends_the_watch()
    {
        let t0 = Instant::now();
        let mut m = SharedAccessMonitor::default();
        m.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        // Both still here, but they no longer share anything (a unmapped it).
        m.update(Vec::new(), &here(&["a", "b"]), t0);
        assert!(m.groups(t0).is_empty());

        m.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        m.update(Vec::new(), &here(&["b"]), t0);
        m.record_access(&vm("b"), t0);
        // a came back (its migration was undone): no departure, no accesses reported.
        m.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        assert!(m.watched().is_empty());
        let g = &m.groups(t0)[0];
        assert_eq!(g.members, vec![vm("a"), vm("b")]);
        assert!(g.recently_accessed_by.is_empty());
    }

    #[test]
    fn groups_sharing_an_object_merge() {
        let t0 = Instant::now();
        let mut m = SharedAccessMonitor::default();
        let other: ObjectId = (0, 0x1a, 88);
        m.update(
            vec![group(&["a", "b"], &[OBJ]), group(&["c", "d"], &[other])],
            &here(&["a", "b", "c", "d"]),
            t0,
        );
        assert_eq!(m.groups(t0).len(), 2);
        m.update(
            vec![group(&["a", "b", "c", "d"], &[OBJ, other])],
            &here(&["a", "b", "c", "d"]),
            t0,
        );
        let g = m.groups(t0);
        assert_eq!(g.len(), 1);
        assert_eq!(g[0].objects, vec![OBJ, other]);
    }

    /// A file of `len` bytes to map: in /dev/shm (shared memory) where there is one.
    fn shared_file(prefix: &str, len: usize) -> tempfile::NamedTempFile {
        let file = tempfile::Builder::new()
            .prefix(prefix)
            .tempfile_in("/dev/shm")
            .or_else(|_| tempfile::NamedTempFile::new())
            .expect("a file to map");
        file.as_file().set_len(len as u64).unwrap();
        file
    }

    /// The memory object of this process's mapping that starts at `addr`.
    fn object_at(pid: i32, addr: *mut libc::c_void) -> ObjectId {
        super::super::proc_maps::read_maps(pid)
            .unwrap()
            .into_iter()
            .find(|m| m.start == addr as u64)
            .map(|m| (m.dev_major, m.dev_minor, m.inode))
            .expect("the mapping is listed")
    }

    /// A MAP_SHARED, writable mapping of `len` bytes of `file` (unmapped by the caller).
    fn map_shared(file: &std::fs::File, len: usize) -> *mut libc::c_void {
        use std::os::fd::AsRawFd;
        // SAFETY: maps a file the test owns for its duration; the caller unmaps it.
        let addr = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                file.as_raw_fd(),
                0,
            )
        };
        assert_ne!(addr, libc::MAP_FAILED);
        addr
    }

    /// The kernel behaviour the signal rests on, on this process's own MAP_SHARED mapping of a
    /// /dev/shm file: after the clear nothing reads as accessed, then exactly the pages read or
    /// written do, although every page was just used (its translation cached). Sampled mode's
    /// clear, as on kernels without soft-dirty tracking.
    #[test]
    fn clear_refs_then_referenced_counts_exactly_the_pages_touched() {
        const PAGES: usize = 16;
        let len = PAGES * PAGE_SIZE;
        let file = shared_file("cg-shared-access-", len);
        let addr = map_shared(file.as_file(), len);
        let page = |i: usize| (addr as *mut u8).wrapping_add(i * PAGE_SIZE);
        let touch_all = || {
            for i in 0..PAGES {
                // SAFETY: inside the mapping.
                unsafe { std::ptr::write_volatile(page(i), i as u8) };
            }
        };
        touch_all();
        let pid = std::process::id() as i32;
        let objects = BTreeSet::from([object_at(pid, addr)]);
        // Several rounds: a translation left in the TLB would make some of them miss.
        for round in 0..20 {
            touch_all();
            assert_eq!(read_referenced(pid, &objects).unwrap(), len as u64);
            clear_accessed(pid, RescanMode::Sampled).unwrap();
            assert_eq!(read_referenced(pid, &objects).unwrap(), 0, "round {round}");
            // SAFETY: inside the mapping.
            let _ = unsafe { std::ptr::read_volatile(page(3)) };
            assert_eq!(
                read_referenced(pid, &objects).unwrap(),
                PAGE_SIZE as u64,
                "a read, round {round}"
            );
            // SAFETY: inside the mapping.
            unsafe { std::ptr::write_volatile(page(9), 2) };
            assert_eq!(
                read_referenced(pid, &objects).unwrap(),
                2 * PAGE_SIZE as u64,
                "a write, round {round}"
            );
        }
        // SAFETY: mapped above with this length.
        unsafe { libc::munmap(addr, len) };
    }

    /// Why the watch waits for a departed member's process to exit: unmapping shared memory
    /// (as an exiting process does) moves the accessed bits of the unmapped page table entries
    /// into the pages, and another mapping of the same pages, untouched since its clear, then
    /// reads as accessed. Two mappings in one process stand for two processes here.
    #[test]
    fn unmapping_touched_shared_pages_marks_them_accessed_for_the_other_mappings() {
        const PAGES: usize = 8;
        let len = PAGES * PAGE_SIZE;
        let file = shared_file("cg-shared-exit-", len);
        let (leaving, staying) = (
            map_shared(file.as_file(), len),
            map_shared(file.as_file(), len),
        );
        let touch = |addr: *mut libc::c_void| {
            for i in 0..PAGES {
                // SAFETY: inside the mapping.
                unsafe {
                    std::ptr::write_volatile((addr as *mut u8).wrapping_add(i * PAGE_SIZE), 1)
                };
            }
        };
        touch(staying);
        let pid = std::process::id() as i32;
        let objects = BTreeSet::from([object_at(pid, staying)]);
        clear_accessed(pid, RescanMode::Sampled).unwrap();
        assert_eq!(read_referenced(pid, &objects).unwrap(), 0);
        // The leaving mapping touches every page, then goes away.
        touch(leaving);
        // SAFETY: mapped above with this length.
        unsafe { libc::munmap(leaving, len) };
        let blurred = read_referenced(pid, &objects).unwrap();
        assert_eq!(
            blurred, len as u64,
            "the untouched mapping reads as accessed after the other one went"
        );
        // The next clear removes the marks for good.
        clear_accessed(pid, RescanMode::Sampled).unwrap();
        assert_eq!(read_referenced(pid, &objects).unwrap(), 0);
        // SAFETY: mapped above with this length.
        unsafe { libc::munmap(staying, len) };
    }

    #[test]
    fn the_watch_starts_once_the_departed_members_process_has_exited() {
        let mut m = SharedAccessMonitor::default();
        let t0 = Instant::now();
        m.update(
            vec![group(&["a", "b", "c"], &[OBJ])],
            &here(&["a", "b", "c"]),
            t0,
        );
        // a's VMI moved away; its process (pid 10) is still running for a moment.
        m.member_left(&vm("a"), 10, t0);
        m.update(vec![group(&["b", "c"], &[OBJ])], &here(&["b", "c"]), t0);
        let pids = BTreeMap::from([(vm("b"), 20), (vm("c"), 30)]);
        let running = |pid: i32| pid != 99;
        assert!(
            m.armable(&pids, t0, &running).is_empty(),
            "a's exit would blur b and c"
        );
        // a's process exited: b and c are armed, each with the other as a companion.
        let exited = |pid: i32| pid != 10;
        let armed = m.armable(&pids, t0 + Duration::from_secs(2), &exited);
        assert_eq!(
            armed.keys().cloned().collect::<Vec<_>>(),
            vec![vm("b"), vm("c")]
        );
        assert_eq!(armed[&vm("b")].pid, 20);
        assert_eq!(armed[&vm("b")].companions, BTreeSet::from([30]));
        assert_eq!(armed[&vm("b")].objects, BTreeSet::from([OBJ]));
        // Not waited for again.
        assert_eq!(
            m.armable(&pids, t0 + Duration::from_secs(3), &running)
                .len(),
            2
        );
    }

    #[test]
    fn a_departed_process_that_never_exits_holds_the_watch_for_the_exit_wait_only() {
        let mut m = SharedAccessMonitor::default();
        let t0 = Instant::now();
        m.update(vec![group(&["a", "b"], &[OBJ])], &here(&["a", "b"]), t0);
        m.member_left(&vm("a"), 10, t0);
        m.update(Vec::new(), &here(&["b"]), t0);
        let pids = BTreeMap::from([(vm("b"), 20)]);
        let always = |_: i32| true;
        assert!(m
            .armable(&pids, t0 + EXIT_WAIT - Duration::from_secs(1), &always)
            .is_empty());
        let armed = m.armable(&pids, t0 + EXIT_WAIT, &always);
        assert_eq!(armed.keys().cloned().collect::<Vec<_>>(), vec![vm("b")]);
        assert!(armed[&vm("b")].companions.is_empty());
        // A VM that was in no known group leaving waits for nothing.
        m.member_left(&vm("z"), 50, t0 + EXIT_WAIT);
        assert_eq!(m.armable(&pids, t0 + EXIT_WAIT, &always).len(), 1);
    }
}
