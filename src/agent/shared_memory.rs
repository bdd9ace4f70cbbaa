//! VMs that share memory (memory groups): processes that map the same file or shared-memory object
//! (same device and inode) writable and shared. Such VMs form a memory group, reported with the
//! size of what they share, so the planner can keep them together. What becomes of a group once
//! one of its members has left the node is [`super::shared_access`]'s business.

use std::collections::{BTreeMap, BTreeSet};

use crate::api::time::Timestamp;
use crate::plan::VmKey;

use super::proc_maps::Mapping;

/// A mapped object: device major, minor and inode.
pub type ObjectId = (u32, u32, u64);

/// One VM's shared writable mappings: object -> (path, bytes mapped).
pub fn shared_objects(maps: &[Mapping]) -> BTreeMap<ObjectId, (String, u64)> {
    let mut out: BTreeMap<ObjectId, (String, u64)> = BTreeMap::new();
    for m in maps
        .iter()
        .filter(|m| m.shared && m.writable && m.inode != 0)
    {
        let e = out
            .entry((m.dev_major, m.dev_minor, m.inode))
            .or_insert_with(|| (m.path.clone().unwrap_or_default(), 0));
        e.1 += m.len();
    }
    out
}

/// A set of VMs sharing memory.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryGroup {
    pub name: String,
    pub members: Vec<VmKey>,
    /// Per shared object, the bytes every member maps (the smallest mapping), summed.
    pub shared_bytes: u64,
    /// The shared objects that make the group.
    pub objects: Vec<ObjectId>,
    /// Members still on the node that touched the shared memory recently, after another member
    /// left (filled in by [`super::shared_access::SharedAccessMonitor`]).
    pub recently_accessed_by: Vec<VmKey>,
    /// When the first member left the node, for a group kept for the members left behind
    /// (filled in by [`super::shared_access::SharedAccessMonitor`]).
    pub departed_at: Option<Timestamp>,
}

/// Groups VMs by shared objects: connected components of "maps the same object".
pub fn memory_groups(vms: &[(VmKey, Vec<Mapping>)]) -> Vec<MemoryGroup> {
    // object -> (name, members with their mapped bytes)
    type Members = BTreeMap<VmKey, u64>;
    let mut objects: BTreeMap<ObjectId, (String, Members)> = BTreeMap::new();
    for (vm, maps) in vms {
        for (obj, (path, bytes)) in shared_objects(maps) {
            let e = objects
                .entry(obj)
                .or_insert_with(|| (path, BTreeMap::new()));
            *e.1.entry(vm.clone()).or_default() += bytes;
        }
    }
    objects.retain(|_, (_, members)| members.len() >= 2);
    // Union-find over VMs, joined by each object's members.
    let mut parent: BTreeMap<VmKey, VmKey> = BTreeMap::new();
    fn find(parent: &mut BTreeMap<VmKey, VmKey>, v: &VmKey) -> VmKey {
        let p = parent.get(v).cloned().unwrap_or_else(|| v.clone());
        if &p == v {
            return p;
        }
        let root = find(parent, &p);
        parent.insert(v.clone(), root.clone());
        root
    }
    for (_, members) in objects.values() {
        let mut it = members.keys();
        let first = it.next().cloned().expect("at least two members");
        for other in it {
            let (a, b) = (find(&mut parent, &first), find(&mut parent, other));
            if a != b {
                parent.insert(b, a);
            }
        }
    }
    let mut groups: BTreeMap<VmKey, (BTreeSet<VmKey>, u64, String, Vec<ObjectId>)> =
        BTreeMap::new();
    for ((major, minor, inode), (path, members)) in &objects {
        let root = find(&mut parent, members.keys().next().expect("non-empty"));
        let g = groups.entry(root).or_insert_with(|| {
            let base = path
                .rsplit('/')
                .next()
                .unwrap_or("")
                .trim_end_matches(" (deleted)");
            let name = if base.is_empty() {
                format!("shm-{major:x}-{minor:x}-{inode}")
            } else {
                format!(
                    "shm-{}",
                    base.replace(
                        |c: char| !c.is_ascii_alphanumeric() && c != '-' && c != '.',
                        "-"
                    )
                )
            };
            (BTreeSet::new(), 0, name, Vec::new())
        });
        g.0.extend(members.keys().cloned());
        g.1 += members.values().copied().min().unwrap_or(0);
        g.3.push((*major, *minor, *inode));
    }
    groups
        .into_values()
        .map(|(members, shared_bytes, name, objects)| MemoryGroup {
            name,
            members: members.into_iter().collect(),
            shared_bytes,
            objects,
            recently_accessed_by: Vec::new(),
            departed_at: None,
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::agent::proc_maps::parse_line;

    fn maps(lines: &[&str]) -> Vec<Mapping> {
        lines.iter().map(|l| parse_line(l).unwrap()).collect()
    }

    #[test]
    fn vms_mapping_the_same_object_form_a_group() {
        let a = maps(&[
            "7f0000000000-7f0000400000 rw-s 00000000 00:1a 77 /dev/shm/common",
            "7f1000000000-7f1000400000 rw-s 00000000 00:1a 88 /dev/shm/other",
            "7f2000000000-7f2000400000 r-xp 00000000 fd:01 5 /usr/lib/libc.so.6",
        ]);
        let b = maps(&[
            "7f0000000000-7f0000200000 rw-s 00000000 00:1a 77 /dev/shm/common",
            "7f2000000000-7f2000400000 r-xp 00000000 fd:01 5 /usr/lib/libc.so.6",
        ]);
        let c = maps(&["7f2000000000-7f2000400000 r-xp 00000000 fd:01 5 /usr/lib/libc.so.6"]);
        let groups = memory_groups(&[
            (VmKey::new("ns", "a"), a),
            (VmKey::new("ns", "b"), b),
            (VmKey::new("ns", "c"), c),
        ]);
        assert_eq!(groups.len(), 1, "read-only libraries do not group VMs");
        assert_eq!(
            groups[0].members,
            vec![VmKey::new("ns", "a"), VmKey::new("ns", "b")]
        );
        assert_eq!(groups[0].shared_bytes, 2 << 20);
        assert_eq!(groups[0].name, "shm-common");
        assert_eq!(groups[0].objects, vec![(0, 0x1a, 77)]);
    }
}
