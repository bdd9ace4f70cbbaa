//! Shared helpers for the agent's integration tests: real processes holding known memory
//! (`examples/cg_memory_holder.rs`).
#![allow(dead_code)]

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Child, ChildStdin, ChildStdout, Command, Stdio};
use std::sync::OnceLock;

/// Path of the holder binary, built once per test process (cargo builds examples for
/// `cargo test`, but not when a single test target is selected).
pub fn holder_binary() -> PathBuf {
    static PATH: OnceLock<PathBuf> = OnceLock::new();
    PATH.get_or_init(|| {
        let status = Command::new(env!("CARGO"))
            .args(["build", "--quiet", "--example", "cg_memory_holder"])
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .status()
            .expect("run cargo build --example cg_memory_holder");
        assert!(status.success(), "building the memory holder failed");
        let exe = std::env::current_exe().unwrap();
        // target/<profile>/deps/<test> -> target/<profile>/examples/cg_memory_holder
        let profile_dir = exe.parent().unwrap().parent().unwrap();
        let candidate = profile_dir.join("examples/cg_memory_holder");
        if candidate.exists() {
            candidate
        } else {
            PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("target/debug/examples/cg_memory_holder")
        }
    })
    .clone()
}

/// A running holder; killed when dropped.
pub struct Holder {
    pub child: Child,
    stdin: ChildStdin,
    stdout: BufReader<ChildStdout>,
    pub addr: u64,
    pub len: u64,
}

pub struct HolderSpec<'a> {
    pub vm: Option<(&'a str, &'a str)>,
    pub image_seed: u64,
    pub image_mib: u64,
    pub private_seed: u64,
    pub private_mib: u64,
    pub backing: &'a str,
}

impl Default for HolderSpec<'_> {
    fn default() -> Self {
        Self {
            vm: None,
            image_seed: 1,
            image_mib: 0,
            private_seed: 2,
            private_mib: 0,
            backing: "anon",
        }
    }
}

impl Holder {
    pub fn start(spec: HolderSpec) -> Holder {
        let mut cmd = Command::new(holder_binary());
        if let Some((ns, name)) = spec.vm {
            cmd.args(["-name", &format!("guest={ns}_{name},debug-threads=on")]);
        }
        cmd.args([
            "--image-seed",
            &spec.image_seed.to_string(),
            "--image-mib",
            &spec.image_mib.to_string(),
            "--private-seed",
            &spec.private_seed.to_string(),
            "--private-mib",
            &spec.private_mib.to_string(),
            "--backing",
            spec.backing,
        ]);
        let mut child = cmd
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .spawn()
            .expect("start memory holder");
        let stdin = child.stdin.take().unwrap();
        let mut stdout = BufReader::new(child.stdout.take().unwrap());
        let mut line = String::new();
        stdout.read_line(&mut line).unwrap();
        let mut parts = line.split_whitespace();
        assert_eq!(parts.next(), Some("ready"), "holder said {line:?}");
        let addr = u64::from_str_radix(parts.next().unwrap(), 16).unwrap();
        let len = parts.next().unwrap().parse().unwrap();
        Holder {
            child,
            stdin,
            stdout,
            addr,
            len,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    /// Sends one command and returns the holder's answer once it has done it.
    pub fn command(&mut self, cmd: &str) -> String {
        writeln!(self.stdin, "{cmd}").unwrap();
        self.stdin.flush().unwrap();
        let mut line = String::new();
        self.stdout.read_line(&mut line).unwrap();
        assert!(
            line.starts_with("ok"),
            "holder answered {line:?} to {cmd:?}"
        );
        line.trim().to_string()
    }

    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Holder {
    fn drop(&mut self) {
        self.kill();
    }
}

pub const MIB: u64 = 1 << 20;

/// A node scanner for "node-1" in "zone-a" with the development key and a quiet policy.
pub fn test_scanner() -> commonground::agent::node_scanner::NodeScanner {
    commonground::agent::node_scanner::NodeScanner::new(
        "node-1".into(),
        "zone-a".into(),
        commonground::plan::region::RegionGeometry::default(),
        commonground::plan::region::ClusterKey::development(),
        commonground::agent::vm_tracker::RescanMode::detect(),
        quiet_policy(),
    )
}

/// A rescan policy that never forces a full rescan during a test: what a test sees comes from
/// what its holders did, not from the agent's timers.
pub fn quiet_policy() -> commonground::agent::vm_tracker::RescanPolicy {
    commonground::agent::vm_tracker::RescanPolicy {
        full_every: std::time::Duration::from_secs(3600),
        changed_fraction: 2.0,
        min_full_gap: std::time::Duration::from_secs(3600),
        probes: 4096,
    }
}
pub const REGION: u64 = 65536;
