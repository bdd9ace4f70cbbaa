//! `/proc/<pid>/maps`: which address ranges of a process hold the memory we scan.
//!
//! For a QEMU process that is the guest RAM: its large (at least 1 MiB) writable mappings that
//! are anonymous or backed by a memfd, POSIX/SysV shared memory or hugetlbfs. For any other
//! process (`commonground digest --pid`) it is its private writable memory.

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

    /// A QEMU guest RAM block, by the rule in the module documentation.
    pub fn is_guest_ram(&self) -> bool {
        self.readable
            && self.writable
            && !self.executable
            && self.len() >= MIN_GUEST_RAM_BYTES
            && !self.is_special()
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
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum MemorySelection {
    GuestRam,
    PrivateWritable,
}

/// The address ranges to scan, in address order.
pub fn select(maps: &[Mapping], selection: MemorySelection) -> Vec<Mapping> {
    maps.iter()
        .filter(|m| match selection {
            MemorySelection::GuestRam => m.is_guest_ram(),
            MemorySelection::PrivateWritable => m.is_private_writable(),
        })
        .cloned()
        .collect()
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
        let ram: Vec<u64> = select(&maps, MemorySelection::GuestRam)
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
        let private: Vec<u64> = select(&maps, MemorySelection::PrivateWritable)
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
}
