//! Guest memory stand-ins: deterministic "OS image" content plus private data, held by one
//! `vm-memory` process per running VMI whose argv looks like QEMU's (`-name guest=<ns>_<name>,…`),
//! so that the commonground agent's `/proc` scanning finds and reads real process memory.
//!
//! Content model (what tests rely on to know overlaps exactly):
//! - the guest memory is `image-mib` MiB of image pages followed by `private-mib` MiB of private
//!   pages, 4 KiB each;
//! - image page `i` of image `X` depends only on (`X`, `i`): two VMIs booted from the same image
//!   share `min(image_mib_a, image_mib_b)` MiB of identical pages, VMIs from different images share
//!   none;
//! - private page `i` depends only on (the private seed, `i`); the stand-in uses the VMI's UID as
//!   seed, so a VMI's memory is identical before and after a migration and unique to it.
//!
//! Optionally a guest also maps shared memory, as QEMU does with a `share=on` memory backend:
//! every guest naming the same shared memory on the same node maps one /dev/shm file
//! ([`shared_memory_path`]), which makes them a memory group for the agent. Memory shared
//! between VMs is local to a host, and the fake nodes share this machine, so each node has its
//! own file. A guest touches nothing of it after filling it at start, except while its trigger
//! file ([`shared_touch_trigger`]) exists. The test thus decides when a member "uses" the
//! shared memory.

use std::fs;
use std::io;
use std::path::{Path, PathBuf};

use xxhash_rust::xxh3::xxh3_64;

pub const PAGE_SIZE: usize = 4096;
pub const MIB: usize = 1 << 20;

/// argv marker naming the (fake) node a `vm-memory` process belongs to.
pub const NODE_ARG: &str = "--e2e-node";
pub const IMAGE_ARG: &str = "--image";
pub const IMAGE_MIB_ARG: &str = "--image-mib";
pub const PRIVATE_MIB_ARG: &str = "--private-mib";
pub const PRIVATE_SEED_ARG: &str = "--private-seed";
pub const DIE_WITH_PARENT_ARG: &str = "--die-with-parent";
pub const SHARED_ARG: &str = "--shared-memory";
pub const SHARED_MIB_ARG: &str = "--shared-mib";
/// How often a guest whose trigger exists writes to its shared memory.
pub const SHARED_TOUCH_PERIOD: std::time::Duration = std::time::Duration::from_millis(100);

/// Where `vm-memory` processes announce that their memory is filled: one file per process,
/// named `<pid>-<start time in clock ticks>` (so a recycled pid never looks ready), holding
/// `addr=<hex> len=<bytes>` of the guest memory mapping.
pub fn ready_dir() -> PathBuf {
    std::env::temp_dir().join("commonground-e2e-vm-memory")
}

fn splitmix64(state: &mut u64) -> u64 {
    *state = state.wrapping_add(0x9E37_79B9_7F4A_7C15);
    let mut z = *state;
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Fills one page from a 64-bit stream seed.
fn fill_page(stream_seed: u64, page: &mut [u8]) {
    let mut state = stream_seed;
    for chunk in page.chunks_exact_mut(8) {
        chunk.copy_from_slice(&splitmix64(&mut state).to_le_bytes());
    }
}

fn page_seed(domain: &str, key: &str, index: u64) -> u64 {
    let mut buf = Vec::with_capacity(domain.len() + key.len() + 9);
    buf.extend_from_slice(domain.as_bytes());
    buf.push(0);
    buf.extend_from_slice(key.as_bytes());
    buf.extend_from_slice(&index.to_le_bytes());
    xxh3_64(&buf)
}

/// Page `index` of OS image `image`.
pub fn image_page(image: &str, index: u64, out: &mut [u8]) {
    fill_page(page_seed("image", image, index), out);
}

/// Private page `index` for `seed`.
pub fn private_page(seed: &str, index: u64, out: &mut [u8]) {
    fill_page(page_seed("private", seed, index), out);
}

/// Shared memory a guest maps besides its own.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SharedMemorySpec {
    /// Guests naming the same shared memory on one node share one file.
    pub name: String,
    pub mib: usize,
}

/// What one guest's memory holds.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemorySpec {
    pub image: String,
    pub image_mib: usize,
    pub private_mib: usize,
    pub private_seed: String,
    pub shared: Option<SharedMemorySpec>,
}

/// The file holding shared memory `name` on (fake) node `node`.
pub fn shared_memory_path(name: &str, node: &str) -> PathBuf {
    PathBuf::from(format!("/dev/shm/commonground-e2e-{name}-{node}"))
}

/// While this file exists, guest `<namespace>_<name>` writes to its shared memory every
/// [`SHARED_TOUCH_PERIOD`], on whichever node it runs.
pub fn shared_touch_trigger(namespace: &str, name: &str) -> PathBuf {
    ready_dir().join(format!("touch-shared-{namespace}_{name}"))
}

/// Removes the files of shared memory `name` on every node (best effort; the memory itself
/// lives until its last mapper exits).
pub fn remove_shared_memory(name: &str) {
    let prefix = format!("commonground-e2e-{name}-");
    let Ok(dir) = fs::read_dir("/dev/shm") else {
        return;
    };
    for entry in dir.flatten() {
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// Content of page `index` of shared memory `name` (the same for every guest that fills it).
pub fn shared_page(name: &str, index: u64, out: &mut [u8]) {
    fill_page(page_seed("shared", name, index), out);
}

impl MemorySpec {
    pub fn bytes(&self) -> usize {
        (self.image_mib + self.private_mib) * MIB
    }

    /// Fills `mem` (exactly `self.bytes()` long) with the guest content.
    pub fn fill(&self, mem: &mut [u8]) {
        assert_eq!(mem.len(), self.bytes());
        let image_pages = self.image_mib * MIB / PAGE_SIZE;
        for (i, page) in mem.chunks_exact_mut(PAGE_SIZE).enumerate() {
            if i < image_pages {
                image_page(&self.image, i as u64, page);
            } else {
                private_page(&self.private_seed, (i - image_pages) as u64, page);
            }
        }
    }

    /// The expected content of page `index` of the guest memory.
    pub fn expected_page(&self, index: usize) -> Vec<u8> {
        let mut page = vec![0u8; PAGE_SIZE];
        let image_pages = self.image_mib * MIB / PAGE_SIZE;
        if index < image_pages {
            image_page(&self.image, index as u64, &mut page);
        } else {
            private_page(&self.private_seed, (index - image_pages) as u64, &mut page);
        }
        page
    }

    /// argv (after the program name) of the `vm-memory` process for guest `<ns>_<name>` on `node`.
    pub fn argv(&self, namespace: &str, name: &str, uuid: &str, node: &str) -> Vec<String> {
        let mut argv = vec![
            "-name".into(),
            format!("guest={namespace}_{name},debug-threads=on"),
            "-uuid".into(),
            uuid.into(),
            NODE_ARG.into(),
            node.into(),
            IMAGE_ARG.into(),
            self.image.clone(),
            IMAGE_MIB_ARG.into(),
            self.image_mib.to_string(),
            PRIVATE_MIB_ARG.into(),
            self.private_mib.to_string(),
            PRIVATE_SEED_ARG.into(),
            self.private_seed.clone(),
        ];
        if let Some(shared) = &self.shared {
            argv.extend([
                SHARED_ARG.into(),
                shared.name.clone(),
                SHARED_MIB_ARG.into(),
                shared.mib.to_string(),
            ]);
        }
        argv
    }
}

/// A running `vm-memory` process found in `/proc`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct MemoryProcess {
    pub pid: i32,
    /// `<namespace>_<name>`, as in QEMU's `-name guest=`.
    pub guest: String,
    pub node: String,
    pub spec: MemorySpec,
    start_ticks: u64,
}

impl MemoryProcess {
    fn ready_file(&self) -> PathBuf {
        ready_dir().join(format!("{}-{}", self.pid, self.start_ticks))
    }

    /// The guest memory mapping `(address, length)` once the process has filled it.
    pub fn ready(&self) -> Option<(u64, usize)> {
        let text = fs::read_to_string(self.ready_file()).ok()?;
        let mut addr = None;
        let mut len = None;
        for field in text.split_whitespace() {
            if let Some(v) = field.strip_prefix("addr=") {
                addr = u64::from_str_radix(v.trim_start_matches("0x"), 16).ok();
            } else if let Some(v) = field.strip_prefix("len=") {
                len = v.parse().ok();
            }
        }
        Some((addr?, len?))
    }

    /// Reads `len` bytes at `offset` of the guest memory through `/proc/<pid>/mem`.
    pub fn read(&self, offset: usize, len: usize) -> io::Result<Vec<u8>> {
        use std::os::unix::fs::FileExt;
        let (addr, size) = self
            .ready()
            .ok_or_else(|| io::Error::other("memory not ready"))?;
        if offset + len > size {
            return Err(io::Error::other("read past the guest memory"));
        }
        let f = fs::File::open(format!("/proc/{}/mem", self.pid))?;
        let mut buf = vec![0u8; len];
        f.read_exact_at(&mut buf, addr + offset as u64)?;
        Ok(buf)
    }

    /// Sends SIGKILL if the pid still is this process.
    pub fn kill(&self) {
        if process_start_ticks(self.pid) == Some(self.start_ticks) {
            // SAFETY: plain kill(2) on a pid we just verified.
            unsafe {
                libc::kill(self.pid, libc::SIGKILL);
            }
        }
        let _ = fs::remove_file(self.ready_file());
    }
}

/// Start time of a process in clock ticks since boot (field 22 of `/proc/<pid>/stat`).
pub fn process_start_ticks(pid: i32) -> Option<u64> {
    let stat = fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let after = stat.rsplit_once(')')?.1;
    let fields: Vec<&str> = after.split_whitespace().collect();
    // fields[0] is the state (field 3); field 22 is fields[19]
    if fields.first() == Some(&"Z") {
        return None;
    }
    fields.get(19)?.parse().ok()
}

/// Parses a `vm-memory` argv; `None` for any other process.
pub fn parse_argv(pid: i32, argv: &[String]) -> Option<MemoryProcess> {
    if !argv.iter().any(|a| a == NODE_ARG) {
        return None;
    }
    let value = |key: &str| {
        argv.iter()
            .position(|a| a == key)
            .and_then(|i| argv.get(i + 1))
            .cloned()
    };
    let guest = value("-name")?
        .strip_prefix("guest=")?
        .split(',')
        .next()?
        .to_string();
    let shared = match value(SHARED_ARG) {
        Some(name) => Some(SharedMemorySpec {
            name,
            mib: value(SHARED_MIB_ARG)?.parse().ok()?,
        }),
        None => None,
    };
    Some(MemoryProcess {
        pid,
        guest,
        node: value(NODE_ARG)?,
        spec: MemorySpec {
            image: value(IMAGE_ARG)?,
            image_mib: value(IMAGE_MIB_ARG)?.parse().ok()?,
            private_mib: value(PRIVATE_MIB_ARG)?.parse().ok()?,
            private_seed: value(PRIVATE_SEED_ARG)?,
            shared,
        },
        start_ticks: process_start_ticks(pid)?,
    })
}

/// Every live `vm-memory` process on this machine.
pub fn scan_processes() -> Vec<MemoryProcess> {
    let Ok(dir) = fs::read_dir("/proc") else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for entry in dir.flatten() {
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(raw) = fs::read(entry.path().join("cmdline")) else {
            continue;
        };
        let argv: Vec<String> = raw
            .split(|b| *b == 0)
            .filter(|a| !a.is_empty())
            .map(|a| String::from_utf8_lossy(a).into_owned())
            .collect();
        if let Some(p) = parse_argv(pid, &argv) {
            out.push(p);
        }
    }
    out.sort_by_key(|p| p.pid);
    out
}

/// The `vm-memory` processes of guest `<namespace>_<name>`.
pub fn processes_of(namespace: &str, name: &str) -> Vec<MemoryProcess> {
    let guest = format!("{namespace}_{name}");
    scan_processes()
        .into_iter()
        .filter(|p| p.guest == guest)
        .collect()
}

/// Writes the ready file for the calling process.
pub fn announce_ready(addr: u64, len: usize) -> io::Result<()> {
    let pid = std::process::id() as i32;
    let ticks = process_start_ticks(pid).ok_or_else(|| io::Error::other("no /proc/self/stat"))?;
    let dir = ready_dir();
    fs::create_dir_all(&dir)?;
    let path = dir.join(format!("{pid}-{ticks}"));
    let tmp = dir.join(format!(".{pid}-{ticks}.tmp"));
    fs::write(&tmp, format!("addr={addr:#x} len={len}\n"))?;
    fs::rename(tmp, path)
}

/// Removes ready files whose process is gone (best effort).
pub fn sweep_ready_files() {
    let Ok(dir) = fs::read_dir(ready_dir()) else {
        return;
    };
    for entry in dir.flatten() {
        let name = entry.file_name();
        let Some((pid, ticks)) = name.to_str().and_then(|n| n.split_once('-')) else {
            continue;
        };
        let (Ok(pid), Ok(ticks)) = (pid.parse::<i32>(), ticks.parse::<u64>()) else {
            continue;
        };
        if process_start_ticks(pid) != Some(ticks) {
            let _ = fs::remove_file(entry.path());
        }
    }
}

/// The `vm-memory` binary next to the running executable (for the stand-in binary).
pub fn helper_next_to_current_exe() -> Option<PathBuf> {
    let exe = std::env::current_exe().ok()?;
    let dir: &Path = exe.parent()?;
    let candidate = dir.join("vm-memory");
    candidate.exists().then_some(candidate)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn same_image_pages_match_and_private_pages_differ() {
        let a = MemorySpec {
            image: "debian-12".into(),
            image_mib: 1,
            private_mib: 1,
            private_seed: "uid-a".into(),
            shared: None,
        };
        let b = MemorySpec {
            private_seed: "uid-b".into(),
            ..a.clone()
        };
        let mut ma = vec![0u8; a.bytes()];
        let mut mb = vec![0u8; b.bytes()];
        a.fill(&mut ma);
        b.fill(&mut mb);
        assert_eq!(ma[..MIB], mb[..MIB]);
        assert_ne!(ma[MIB..MIB + PAGE_SIZE], mb[MIB..MIB + PAGE_SIZE]);
        assert_eq!(a.expected_page(300), ma[300 * PAGE_SIZE..301 * PAGE_SIZE]);
        assert_ne!(ma[..PAGE_SIZE], ma[PAGE_SIZE..2 * PAGE_SIZE]);
    }

    #[test]
    fn argv_round_trips() {
        let spec = MemorySpec {
            image: "debian-12".into(),
            image_mib: 8,
            private_mib: 2,
            private_seed: "u".into(),
            shared: None,
        };
        let pid = std::process::id() as i32;
        let with_shared = MemorySpec {
            shared: Some(SharedMemorySpec {
                name: "grp".into(),
                mib: 4,
            }),
            ..spec.clone()
        };
        for spec in [spec, with_shared] {
            let mut argv = vec!["vm-memory".to_string()];
            argv.extend(spec.argv("ns", "vm", "u", "node-a"));
            let p = parse_argv(pid, &argv).expect("parses");
            assert_eq!(p.guest, "ns_vm");
            assert_eq!(p.node, "node-a");
            assert_eq!(p.spec, spec);
        }
        assert!(parse_argv(pid, &["qemu".to_string()]).is_none());
    }

    #[test]
    fn shared_memory_is_one_file_per_name_and_node() {
        assert_eq!(
            shared_memory_path("g", "n1"),
            PathBuf::from("/dev/shm/commonground-e2e-g-n1")
        );
        assert_ne!(shared_memory_path("g", "n1"), shared_memory_path("g", "n2"));
        assert_ne!(
            shared_touch_trigger("ns", "a"),
            shared_touch_trigger("ns", "b")
        );
    }
}
