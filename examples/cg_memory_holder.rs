//! Test helper for the agent's integration tests: a process that holds memory of known content
//! and waits for commands, standing in for a QEMU guest. Arguments it does not know (such as
//! `-name guest=<namespace>_<name>`) are ignored, so tests can give it a KubeVirt-like command
//! line.
//!
//! `--image-seed S --image-mib N` fills the first N MiB from seed S (the "image" two guests
//! share), `--private-seed P --private-mib M` the next M MiB (content of its own),
//! `--backing anon|memfd|shm:NAME` chooses the mapping. Prints `ready <addr hex> <len>` and then
//! reads commands from stdin, answering each with a line:
//! - `fill <offset> <len> <seed>`: overwrite with content from a seed;
//! - `touch <offset> <len> <stride>`: increment one byte every `stride` bytes;
//! - `exit` (or end of input): exit.

use std::io::{BufRead, Write};

fn fill(buf: &mut [u8], seed: u64) {
    // splitmix64 per 8-byte word: distinct seeds give unrelated, never-zero-region content.
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ 0xD1B5_4A32_D192_ED03;
    for word in buf.chunks_mut(8) {
        x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = x;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^= z >> 31;
        let bytes = z.to_le_bytes();
        word.copy_from_slice(&bytes[..word.len()]);
    }
}

fn arg<T: std::str::FromStr>(args: &[String], name: &str, default: T) -> T {
    args.iter()
        .position(|a| a == name)
        .and_then(|i| args.get(i + 1))
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

fn map(len: usize, backing: &str) -> *mut u8 {
    // SAFETY: plain mmap/memfd/open calls with checked results; the mapping lives until exit.
    unsafe {
        let (fd, flags) = if backing == "memfd" {
            let fd = libc::memfd_create(c"guest-ram".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create failed");
            (fd, libc::MAP_SHARED)
        } else if let Some(name) = backing.strip_prefix("shm:") {
            let path = std::ffi::CString::new(format!("/dev/shm/{name}")).unwrap();
            let fd = libc::open(path.as_ptr(), libc::O_RDWR | libc::O_CREAT, 0o600);
            assert!(fd >= 0, "open /dev/shm/{name} failed");
            (fd, libc::MAP_SHARED)
        } else {
            (-1, libc::MAP_PRIVATE | libc::MAP_ANONYMOUS)
        };
        if fd >= 0 {
            assert_eq!(
                libc::ftruncate(fd, len as libc::off_t),
                0,
                "ftruncate failed"
            );
        }
        let p = libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            flags,
            fd,
            0,
        );
        assert_ne!(p, libc::MAP_FAILED, "mmap failed");
        p.cast()
    }
}

fn main() {
    let args: Vec<String> = std::env::args().collect();
    let image_mib: usize = arg(&args, "--image-mib", 0);
    let private_mib: usize = arg(&args, "--private-mib", 0);
    let image_seed: u64 = arg(&args, "--image-seed", 1);
    let private_seed: u64 = arg(&args, "--private-seed", 2);
    let backing: String = arg(&args, "--backing", "anon".to_string());
    let len = (image_mib + private_mib).max(1) << 20;
    let ptr = map(len, &backing);
    // SAFETY: `ptr` is a fresh read-write mapping of `len` bytes owned by this process.
    let mem = unsafe { std::slice::from_raw_parts_mut(ptr, len) };
    fill(&mut mem[..image_mib << 20], image_seed);
    fill(&mut mem[image_mib << 20..], private_seed);
    let mut out = std::io::stdout().lock();
    writeln!(out, "ready {:x} {len}", ptr as usize).unwrap();
    out.flush().unwrap();
    for line in std::io::stdin().lock().lines() {
        let Ok(line) = line else { break };
        let w: Vec<u64> = line
            .split_whitespace()
            .skip(1)
            .filter_map(|v| v.parse().ok())
            .collect();
        match (line.split_whitespace().next(), w.as_slice()) {
            (Some("fill"), [off, n, seed]) => {
                fill(&mut mem[*off as usize..(*off + *n) as usize], *seed);
                writeln!(out, "ok").unwrap();
            }
            (Some("touch"), [off, n, stride]) => {
                let mut touched = 0u64;
                let mut at = *off as usize;
                while at < (*off + *n) as usize {
                    mem[at] = mem[at].wrapping_add(1);
                    touched += 1;
                    at += *stride as usize;
                }
                writeln!(out, "ok {touched}").unwrap();
            }
            (Some("exit"), _) => break,
            _ => writeln!(out, "error: unknown command {line:?}").unwrap(),
        }
        out.flush().unwrap();
    }
}
