//! `/proc/<pid>/maps`: which address ranges of a process hold the memory we scan.
//!
//! For a QEMU process that is the guest RAM, found by its size: QEMU maps each RAM block as one
//! mapping, and the command line gives the blocks' sizes ([`super::discover::guest_ram_blocks`]).
//! Each block is the smallest readable, writable, non-executable mapping at least as large and
//! at most [`block_slack`] larger. That leaves out what QEMU maps for itself, which a rule by
//! kind alone takes too: thread stacks (8 MiB each), malloc arenas, the copy of the `-kernel`
//! file kept for fw_cfg (13.5 MiB for a Debian kernel, identical in every QEMU booted from it).
//!
//! When the sizes are unknown or no mapping fits them, the fallback is that rule by kind: every
//! large (at least 1 MiB) writable mapping that is anonymous or backed by a memfd, POSIX/SysV
//! shared memory or hugetlbfs. For any other process (`commonground digest --pid`) what is
//! scanned is its private writable memory.

use std::path::PathBuf;

use super::AgentError;

/// Guest RAM blocks smaller than this are QEMU's own buffers, not RAM.
pub const MIN_GUEST_RAM_BYTES: u64 = 1 << 20;

/// One line of `/proc/<pid>/maps`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Mapping {
    pub start: u64,
    pub end: u64,
    pub readable: bool,
    pub writable: bool,
    pub executable: bool,
    /// `s` in the permissions: writes are visible to every process mapping the object.
    pub shared: bool,
    pub offset: u64,
    /// Device `major:minor` as printed (hex), and inode: together they name the object mapped.
    pub dev_major: u32,
    pub dev_minor: u32,
    pub inode: u64,
    /// Path or pseudo-name (`[heap]`, `/memfd:ram (deleted)`, ...), `None` for anonymous memory.
    pub path: Option<String>,
}

impl Mapping {
    pub fn len(&self) -> u64 {
        self.end - self.start
    }

    pub fn is_empty(&self) -> bool {
        self.end == self.start
    }

    /// Anonymous memory: no backing object (a name set with `PR_SET_VMA_ANON_NAME` counts).
    pub fn is_anonymous(&self) -> bool {
        match &self.path {
            None => self.inode == 0,
            Some(p) => p.starts_with("[anon:"),
        }
    }

    /// Backed by a memory-only object: memfd, POSIX or SysV shared memory, hugetlbfs.
    pub fn is_memory_object(&self) -> bool {
        match &self.path {
            Some(p) => {
                p.starts_with("/memfd:")
                    || p.starts_with("/dev/shm/")
                    || p.starts_with("/SYSV")
                    || p.starts_with("/anon_hugepage")
                    || p.starts_with("/dev/hugepages")
                    || p.contains("/hugepages")
            }
            None => false,
        }
    }

    /// Kernel pseudo-mappings we never read.
    pub fn is_special(&self) -> bool {
        matches!(
            self.path.as_deref(),
            Some("[vvar]") | Some("[vdso]") | Some("[vsyscall]") | Some("[vvar_vclock]")
        )
    }

    /// Readable, writable, not executable: where a RAM block of any backing can be.
    fn may_hold_guest_ram(&self) -> bool {
        self.readable && self.writable && !self.executable && !self.is_special()
    }

    /// A QEMU guest RAM block by the fallback rule (kind and size only), see the module
    /// documentation.
    pub fn is_guest_ram(&self) -> bool {
        self.may_hold_guest_ram()
            && self.len() >= MIN_GUEST_RAM_BYTES
            && (self.is_anonymous() || self.is_memory_object())
    }

    /// Private writable memory of an ordinary process (heap, stack, data, anonymous).
    pub fn is_private_writable(&self) -> bool {
        self.readable && self.writable && !self.shared && !self.is_special()
    }
}

/// Parses one line; `None` for a line that is not a mapping.
pub fn parse_line(line: &str) -> Option<Mapping> {
    let mut fields = line.splitn(6, ' ');
    let range = fields.next()?;
    let perms = fields.next()?.as_bytes();
    let offset = fields.next()?;
    let dev = fields.next()?;
    let inode = fields.next()?;
    let path = fields.next().map(str::trim).filter(|p| !p.is_empty());
    let (start, end) = range.split_once('-')?;
    let start = u64::from_str_radix(start, 16).ok()?;
    let end = u64::from_str_radix(end, 16).ok()?;
    if perms.len() != 4 || end < start {
        return None;
    }
    let (major, minor) = dev.split_once(':')?;
    Some(Mapping {
        start,
        end,
        readable: perms[0] == b'r',
        writable: perms[1] == b'w',
        executable: perms[2] == b'x',
        shared: perms[3] == b's',
        offset: u64::from_str_radix(offset, 16).ok()?,
        dev_major: u32::from_str_radix(major, 16).ok()?,
        dev_minor: u32::from_str_radix(minor, 16).ok()?,
        inode: inode.parse().ok()?,
        path: path.map(str::to_string),
    })
}

/// Parses a whole maps file; a malformed line is an error naming it.
pub fn parse_maps(pid: i32, text: &str) -> Result<Vec<Mapping>, AgentError> {
    text.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| {
            parse_line(l).ok_or_else(|| AgentError::Proc {
                pid,
                file: "maps",
                what: format!("malformed line {l:?}"),
            })
        })
        .collect()
}

/// Reads and parses `/proc/<pid>/maps`.
pub fn read_maps(pid: i32) -> Result<Vec<Mapping>, AgentError> {
    let path = PathBuf::from(format!("/proc/{pid}/maps"));
    let text = std::fs::read_to_string(&path).map_err(|e| AgentError::io(pid, "maps", e))?;
    parse_maps(pid, &text)
}

/// Which memory of a process to scan.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum MemorySelection {
    /// QEMU guest RAM; the sizes of its blocks when the command line gives them.
    GuestRam(Option<Vec<u64>>),
    PrivateWritable,
}

/// How the guest RAM mappings were chosen.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum GuestRamRule {
    /// Every mapping holds a RAM block of a size the command line gives.
    BlockSize,
    /// The fallback rule: the command line gives no sizes.
    KindUnknownSize,
    /// The fallback rule: no mapping fits the sizes the command line gives.
    KindNoFit,
}

impl GuestRamRule {
    pub fn as_str(&self) -> &'static str {
        match self {
            GuestRamRule::BlockSize => "RAM block sizes from the command line",
            GuestRamRule::KindUnknownSize => {
                "large anonymous or shared-memory mappings (RAM size unknown)"
            }
            GuestRamRule::KindNoFit => {
                "large anonymous or shared-memory mappings (no mapping fits the RAM size)"
            }
        }
    }
}

/// How much larger than its RAM block a mapping may be: QEMU aligns a block to its backend's
/// page size (2 MiB for huge pages), and a neighbouring mapping with the same flags may have
/// merged into it. A sixteenth is far below anything else of that size QEMU maps.
pub fn block_slack(block: u64) -> u64 {
    block / 16 + (2 << 20)
}

/// The guest RAM mappings, in address order, and the rule that chose them: for each block size
/// (largest first) the smallest mapping not yet taken that fits it; the mappings that fit
/// some block, if any did, else the fallback rule.
pub fn select_guest_ram(maps: &[Mapping], blocks: Option<&[u64]>) -> (Vec<Mapping>, GuestRamRule) {
    let by_kind = || maps.iter().filter(|m| m.is_guest_ram()).cloned().collect();
    let Some(blocks) = blocks.filter(|b| !b.is_empty()) else {
        return (by_kind(), GuestRamRule::KindUnknownSize);
    };
    let mut sizes = blocks.to_vec();
    sizes.sort_unstable_by(|a, b| b.cmp(a));
    let mut taken = vec![false; maps.len()];
    for size in sizes {
        let fit = maps
            .iter()
            .enumerate()
            .filter(|(i, m)| {
                !taken[*i]
                    && m.may_hold_guest_ram()
                    && m.len() >= size
                    && m.len() - size <= block_slack(size)
            })
            .min_by_key(|(_, m)| m.len());
        if let Some((i, _)) = fit {
            taken[i] = true;
        }
    }
    if !taken.contains(&true) {
        return (by_kind(), GuestRamRule::KindNoFit);
    }
    let chosen = maps
        .iter()
        .zip(&taken)
        .filter(|(_, t)| **t)
        .map(|(m, _)| m.clone())
        .collect();
    (chosen, GuestRamRule::BlockSize)
}

/// The address ranges to scan, in address order; for guest RAM the rule used is logged (debug).
pub fn select(maps: &[Mapping], selection: &MemorySelection) -> Vec<Mapping> {
    match selection {
        MemorySelection::GuestRam(blocks) => {
            let (chosen, rule) = select_guest_ram(maps, blocks.as_deref());
            tracing::debug!(rule = rule.as_str(), blocks = ?blocks, mappings = chosen.len(), "guest RAM selected");
            chosen
        }
        MemorySelection::PrivateWritable => maps
            .iter()
            .filter(|m| m.is_private_writable())
            .cloned()
            .collect(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const SAMPLE: &str = "\
55d0c0a00000-55d0c0a02000 r--p 00000000 fd:01 1234                       /usr/bin/qemu-system-x86_64
55d0c2a00000-55d0c2c21000 rw-p 00000000 00:00 0                          [heap]
7f1000000000-7f1040000000 rw-s 00000000 00:01 5678                       /memfd:pc.ram (deleted)
7f2000000000-7f2000800000 rw-p 00000000 00:00 0 
7f2000800000-7f2000801000 rw-p 00000000 00:00 0 
7f3000000000-7f3000200000 rw-s 00000000 00:1a 99                         /dev/shm/shared-ram
7f4000000000-7f4000400000 rw-p 00000000 00:00 0                          [anon:guest]
7ffd00000000-7ffd00021000 rw-p 00000000 00:00 0                          [stack]
7ffd00100000-7ffd00104000 r--p 00000000 00:00 0                          [vvar]
";

    #[test]
    fn parses_every_field() {
        let maps = parse_maps(1, SAMPLE).unwrap();
        assert_eq!(maps.len(), 9);
        let ram = &maps[2];
        assert_eq!((ram.start, ram.len()), (0x7f1000000000, 1 << 30));
        assert!(ram.shared && ram.writable && ram.readable && !ram.executable);
        assert_eq!((ram.dev_major, ram.dev_minor, ram.inode), (0, 1, 5678));
        assert_eq!(ram.path.as_deref(), Some("/memfd:pc.ram (deleted)"));
        assert_eq!(maps[3].path, None, "trailing space is not a path");
    }

    #[test]
    fn guest_ram_is_large_writable_anonymous_or_memory_objects() {
        let maps = parse_maps(1, SAMPLE).unwrap();
        let ram: Vec<u64> = select(&maps, &MemorySelection::GuestRam(None))
            .iter()
            .map(|m| m.start)
            .collect();
        assert_eq!(
            ram,
            vec![
                0x7f1000000000,
                0x7f2000000000,
                0x7f3000000000,
                0x7f4000000000
            ],
            "heap, stack, small anonymous and the binary are not guest RAM"
        );
    }

    #[test]
    fn private_writable_excludes_shared_and_pseudo_mappings() {
        let maps = parse_maps(1, SAMPLE).unwrap();
        let private: Vec<u64> = select(&maps, &MemorySelection::PrivateWritable)
            .iter()
            .map(|m| m.start)
            .collect();
        assert_eq!(
            private,
            vec![
                0x55d0c2a00000,
                0x7f2000000000,
                0x7f2000800000,
                0x7f4000000000,
                0x7ffd00000000
            ]
        );
    }

    #[test]
    fn malformed_line_is_a_named_error() {
        let err = parse_maps(42, "not a mapping\n").unwrap_err().to_string();
        assert!(err.contains("/proc/42/maps"), "{err}");
    }

    /// A QEMU 7.2 process with `-m 256M` under TCG, as it maps itself (abridged): the 256 MiB
    /// RAM block, thread stacks, malloc arenas, the copy of the `-kernel` file, the translation
    /// buffer (rwx) and small buffers.
    const QEMU_MAPS: &str = "\
5581b0c00000-5581b0e00000 r--p 00000000 fd:01 3345                       /usr/bin/qemu-system-x86_64
5581b2000000-5581b2a00000 rw-p 00000000 00:00 0                          [heap]
7f0a40000000-7f0a80000000 rwxp 00000000 00:00 0 
7f0a80000000-7f0a80001000 ---p 00000000 00:00 0 
7f0a80001000-7f0a90001000 rw-p 00000000 00:00 0 
7f0a90001000-7f0a90002000 ---p 00000000 00:00 0 
7f0a98000000-7f0a98d80000 rw-p 00000000 00:00 0 
7f0aa0000000-7f0aa4000000 rw-p 00000000 00:00 0 
7f0aa8000000-7f0aa8800000 rw-p 00000000 00:00 0 
7f0aa8800000-7f0aa8801000 ---p 00000000 00:00 0 
7f0aa9000000-7f0aa9800000 rw-p 00000000 00:00 0 
7f0aaa000000-7f0aaa100000 rw-p 00000000 00:00 0 
7ffc10000000-7ffc10021000 rw-p 00000000 00:00 0                          [stack]
";
    const MIB: u64 = 1 << 20;

    fn starts(maps: &[Mapping]) -> Vec<u64> {
        maps.iter().map(|m| m.start).collect()
    }

    #[test]
    fn guest_ram_by_block_size_leaves_qemus_own_memory_out() {
        let maps = parse_maps(1, QEMU_MAPS).unwrap();
        let (ram, rule) = select_guest_ram(&maps, Some(&[256 * MIB]));
        assert_eq!(rule, GuestRamRule::BlockSize);
        assert_eq!(starts(&ram), vec![0x7f0a80001000]);
        assert_eq!(ram[0].len(), 256 * MIB);
        // The rule by kind alone also takes the kernel copy (13.5 MiB), the 64 MiB arena, two
        // thread stacks and a 1 MiB buffer: 94.5 MiB too much.
        let by_kind = select(&maps, &MemorySelection::GuestRam(None));
        let extra: u64 = by_kind.iter().map(Mapping::len).sum::<u64>() - 256 * MIB;
        assert_eq!(extra, 94 * MIB + MIB / 2);
        assert_eq!(
            select(&maps, &MemorySelection::GuestRam(Some(vec![256 * MIB]))),
            ram
        );
    }

    #[test]
    fn guest_ram_blocks_take_the_smallest_fitting_mappings() {
        // Two NUMA cells of 1 GiB (memfd), a 2 MiB-aligned block a little larger than its size,
        // and a 1 GiB anonymous mapping that must not be taken for the 768 MiB block.
        let text = "\
7f0000000000-7f0040000000 rw-s 00000000 00:01 11                         /memfd:ram-node0 (deleted)
7f0040000000-7f0080000000 rw-s 00000000 00:01 12                         /memfd:ram-node1 (deleted)
7f1000000000-7f1040000000 rw-p 00000000 00:00 0 
7f2000000000-7f2030200000 rw-p 00000000 00:00 0 
7f3000000000-7f3000800000 rw-p 00000000 00:00 0 
";
        let maps = parse_maps(1, text).unwrap();
        let gib = 1 << 30;
        let (ram, rule) = select_guest_ram(&maps, Some(&[gib, gib]));
        assert_eq!(rule, GuestRamRule::BlockSize);
        assert_eq!(
            starts(&ram),
            vec![0x7f0000000000, 0x7f0040000000],
            "both cells, not the anonymous GiB"
        );
        let (ram, _) = select_guest_ram(&maps, Some(&[768 * MIB]));
        assert_eq!(
            starts(&ram),
            vec![0x7f2000000000],
            "770 MiB fits 768 MiB best"
        );
        // A block that fits nothing is skipped when another fits.
        let (ram, rule) = select_guest_ram(&maps, Some(&[768 * MIB, 5 * gib]));
        assert_eq!(
            (starts(&ram), rule),
            (vec![0x7f2000000000], GuestRamRule::BlockSize)
        );
    }

    #[test]
    fn guest_ram_falls_back_to_the_rule_by_kind() {
        let maps = parse_maps(1, QEMU_MAPS).unwrap();
        let by_kind: Vec<Mapping> = maps.iter().filter(|m| m.is_guest_ram()).cloned().collect();
        assert_eq!(
            select_guest_ram(&maps, None),
            (by_kind.clone(), GuestRamRule::KindUnknownSize)
        );
        assert_eq!(
            select_guest_ram(&maps, Some(&[])),
            (by_kind.clone(), GuestRamRule::KindUnknownSize)
        );
        // 4 GiB declared, nothing that large mapped (yet): by kind.
        assert_eq!(
            select_guest_ram(&maps, Some(&[4 << 30])),
            (by_kind, GuestRamRule::KindNoFit)
        );
        // Far larger than the block is not a fit either (the rwx buffer is 1 GiB and excluded).
        let (_, rule) = select_guest_ram(&maps, Some(&[128 * MIB]));
        assert_eq!(
            rule,
            GuestRamRule::KindNoFit,
            "a 256 MiB mapping is no 128 MiB block"
        );
    }
}
