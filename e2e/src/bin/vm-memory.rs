//! `vm-memory`: holds one guest's memory the way a QEMU process would, for the e2e suite.
//!
//! ```text
//! vm-memory -name guest=<namespace>_<name>,debug-threads=on -uuid <uid> --e2e-node <node>
//!           --image <image> --image-mib <MiB> --private-mib <MiB> --private-seed <seed>
//!           [--shared-memory <name> --shared-mib <MiB>] [--die-with-parent]
//! ```
//!
//! Maps anonymous memory, fills it (see `commonground_e2e::memory`), writes its ready file and
//! then sleeps until killed. With `--shared-memory`, it also maps the node's file of that shared
//! memory (MAP_SHARED, filled by whoever creates it). It then wakes every
//! `SHARED_TOUCH_PERIOD` and, while its trigger file exists, writes one byte of it. The argv is
//! parsed by hand: QEMU's `-name` style is not clap's.

use std::os::fd::AsRawFd;
use std::process::ExitCode;

use commonground_e2e::memory::{self, MemorySpec, SharedMemorySpec, DIE_WITH_PARENT_ARG};

/// Maps the node's file of `shared` read-write and shared; creates and fills it if it is new.
fn map_shared(shared: &SharedMemorySpec, node: &str) -> Result<&'static mut [u8], String> {
    let path = memory::shared_memory_path(&shared.name, node);
    let len = (shared.mib * memory::MIB).max(memory::PAGE_SIZE);
    let file = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(|e| format!("open {}: {e}", path.display()))?;
    let size = file.metadata().map_err(|e| e.to_string())?.len();
    let fresh = size < len as u64;
    if fresh {
        file.set_len(len as u64)
            .map_err(|e| format!("resize {}: {e}", path.display()))?;
    }
    // SAFETY: maps `len` bytes of a file at least that long; checked for MAP_FAILED below. The
    // mapping outlives the file handle and lives until the process exits.
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
    if addr == libc::MAP_FAILED {
        return Err(format!("mmap of {}", path.display()));
    }
    // SAFETY: the mapping is `len` bytes, readable and writable, and never unmapped.
    let mem = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    if fresh {
        for (i, page) in mem.chunks_exact_mut(memory::PAGE_SIZE).enumerate() {
            memory::shared_page(&shared.name, i as u64, page);
        }
    }
    Ok(mem)
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let die_with_parent = argv.iter().any(|a| a == DIE_WITH_PARENT_ARG);
    if die_with_parent {
        // SAFETY: prctl with integer arguments only.
        unsafe {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL as libc::c_ulong);
        }
    }
    let Some(parsed) = memory::parse_argv(std::process::id() as i32, &argv) else {
        eprintln!(
            "usage: vm-memory -name guest=<ns>_<name> -uuid <uid> --e2e-node <node> --image <image> \
             --image-mib <MiB> --private-mib <MiB> --private-seed <seed> [--die-with-parent]"
        );
        return ExitCode::from(2);
    };
    let spec: MemorySpec = parsed.spec;
    let shared = match &spec.shared {
        Some(shared) => match map_shared(shared, &parsed.node) {
            Ok(mem) => Some(mem),
            Err(e) => {
                eprintln!("vm-memory: shared memory: {e}");
                return ExitCode::from(1);
            }
        },
        None => None,
    };
    let len = spec.bytes().max(memory::PAGE_SIZE);
    // SAFETY: a fresh private anonymous mapping; checked for MAP_FAILED below.
    let addr = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
            -1,
            0,
        )
    };
    if addr == libc::MAP_FAILED {
        eprintln!("vm-memory: mmap of {len} bytes failed");
        return ExitCode::from(1);
    }
    // Like QEMU with mem-merge=on (the default): let KSM merge what it can. Failure is fine.
    // SAFETY: advising our own mapping.
    unsafe {
        libc::madvise(addr, len, libc::MADV_MERGEABLE);
    }
    // SAFETY: the mapping is `len` bytes, readable and writable, and owned by us alone.
    let mem = unsafe { std::slice::from_raw_parts_mut(addr as *mut u8, len) };
    spec.fill(&mut mem[..spec.bytes()]);
    if let Err(e) = memory::announce_ready(addr as u64, spec.bytes()) {
        eprintln!("vm-memory: cannot write the ready file: {e}");
        return ExitCode::from(1);
    }
    println!("ready guest={} bytes={}", parsed.guest, spec.bytes());
    let Some(shared) = shared else {
        loop {
            // SAFETY: pause(2) just waits for a signal.
            unsafe {
                libc::pause();
            }
        }
    };
    let (namespace, name) = parsed.guest.split_once('_').unwrap_or(("", &parsed.guest));
    let trigger = memory::shared_touch_trigger(namespace, name);
    loop {
        std::thread::sleep(memory::SHARED_TOUCH_PERIOD);
        // Checking the trigger (a stat) reads nothing of the shared memory.
        if trigger.exists() {
            // SAFETY: a byte inside the live mapping; volatile so the write is not elided.
            unsafe {
                let p = shared.as_mut_ptr();
                std::ptr::write_volatile(p, std::ptr::read_volatile(p).wrapping_add(1));
            }
        }
    }
}
