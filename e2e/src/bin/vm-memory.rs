//! `vm-memory`: holds one guest's memory the way a QEMU process would, for the e2e suite.
//!
//! ```text
//! vm-memory -name guest=<namespace>_<name>,debug-threads=on -uuid <uid> --e2e-node <node>
//!           --image <image> --image-mib <MiB> --private-mib <MiB> --private-seed <seed>
//!           [--die-with-parent]
//! ```
//!
//! Maps anonymous memory, fills it (see `commonground_e2e::memory`), writes its ready file and
//! then sleeps until killed. The argv is parsed by hand: QEMU's `-name` style is not clap's.

use std::process::ExitCode;

use commonground_e2e::memory::{self, MemorySpec, DIE_WITH_PARENT_ARG};

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
    loop {
        // SAFETY: pause(2) just waits for a signal.
        unsafe {
            libc::pause();
        }
    }
}
