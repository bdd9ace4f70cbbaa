//! What the QEMU tests share: running `prepare.sh`, starting a guest from its kernel and
//! initramfs (killed when dropped), a minimal QMP client, and two network namespaces joined
//! by a veth pair that act as two nodes ([`Nodes`]). Included with
//! `#[path = "qemu/common.rs"] mod qemu;` by each test that boots QEMU.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
use std::os::fd::AsRawFd;
use std::os::unix::net::UnixStream;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

/// What `prepare.sh` provides.
pub struct Env {
    pub qemu: PathBuf,
    pub kernel: PathBuf,
    pub initrd: PathBuf,
    /// `kvm` or `tcg`.
    pub accel: String,
    /// QEMU 10.0 from bookworm-backports beside the system's QEMU (`QEMU10=`), when
    /// prepare.sh could provide it.
    pub qemu10: Option<PathBuf>,
}

impl Env {
    pub fn accel_description(&self) -> &'static str {
        if self.accel == "kvm" {
            "KVM"
        } else {
            "TCG (no usable KVM)"
        }
    }
}

/// Runs prepare.sh; `None` (after printing `SKIP <test>: why`) when QEMU cannot be provided
/// here or `COMMONGROUND_SKIP_QEMU=1`.
pub fn prepare(test: &str) -> Option<Env> {
    if std::env::var("COMMONGROUND_SKIP_QEMU").is_ok_and(|v| v == "1") {
        println!("SKIP {test}: COMMONGROUND_SKIP_QEMU=1");
        return None;
    }
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/qemu/prepare.sh");
    let out = Command::new("bash")
        .arg(&script)
        .stderr(Stdio::inherit())
        .output()
        .expect("run tests/qemu/prepare.sh");
    match out.status.code() {
        Some(0) => {}
        Some(77) => {
            println!("SKIP {test}: prepare.sh cannot provide QEMU here (see its message above)");
            return None;
        }
        other => panic!("tests/qemu/prepare.sh failed ({other:?})"),
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let get = |k: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{k}=")))
            .unwrap_or_else(|| panic!("prepare.sh printed no {k}=: {text}"))
            .to_string()
    };
    Some(Env {
        qemu: get("QEMU").into(),
        kernel: get("KERNEL").into(),
        initrd: get("INITRD").into(),
        accel: get("ACCEL"),
        qemu10: text
            .lines()
            .find_map(|l| l.strip_prefix("QEMU10="))
            .map(PathBuf::from),
    })
}

/// A minimal QMP client: one JSON object per line, events skipped.
pub struct Qmp {
    reader: BufReader<UnixStream>,
    writer: UnixStream,
}

impl Qmp {
    fn connect(path: &Path, child: &mut Child, timeout: Duration) -> Qmp {
        let deadline = Instant::now() + timeout;
        let stream = loop {
            match UnixStream::connect(path) {
                Ok(s) => break s,
                Err(e) => {
                    if let Ok(Some(status)) = child.try_wait() {
                        panic!("QEMU exited ({status}) before its QMP socket {path:?} was up");
                    }
                    assert!(Instant::now() < deadline, "QMP socket {path:?}: {e}");
                    std::thread::sleep(Duration::from_millis(50));
                }
            }
        };
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .unwrap();
        let mut qmp = Qmp {
            reader: BufReader::new(stream.try_clone().unwrap()),
            writer: stream,
        };
        let greeting = qmp.read();
        assert!(
            greeting.get("QMP").is_some(),
            "not a QMP greeting: {greeting}"
        );
        qmp.cmd("qmp_capabilities", json!({})).unwrap();
        qmp
    }

    fn read(&mut self) -> Value {
        let mut line = String::new();
        let n = self.reader.read_line(&mut line).expect("read from QMP");
        assert!(n > 0, "QMP connection closed");
        serde_json::from_str(&line).unwrap_or_else(|e| panic!("QMP sent {line:?}: {e}"))
    }

    pub fn cmd(&mut self, execute: &str, arguments: Value) -> Result<Value, String> {
        let mut msg = json!({ "execute": execute });
        if arguments.as_object().is_some_and(|o| !o.is_empty()) {
            msg["arguments"] = arguments;
        }
        writeln!(self.writer, "{msg}").expect("write to QMP");
        loop {
            let v = self.read();
            if let Some(r) = v.get("return") {
                return Ok(r.clone());
            }
            if let Some(e) = v.get("error") {
                return Err(format!("{execute}: {e}"));
            }
            // an event: skip
        }
    }
}

/// How to start one guest.
#[derive(Default)]
pub struct GuestConfig {
    pub mem_mib: u64,
    /// The kernel command line.
    pub append: String,
    /// The `-name` value, e.g. `guest=<namespace>_<name>,debug-threads=on` as virt-launcher
    /// gives it; `None` for no `-name`.
    pub name: Option<String>,
    /// Guest RAM in a file in tmpfs (see [`Guest::ram_path`]) instead of anonymous memory.
    /// QEMU maps it at a 4 KiB-aligned address (as memfd-backed RAM), unless `ram_align`.
    pub ram_file: bool,
    /// The file backend's `align=` (e.g. `2M`, where QEMU puts anonymous RAM).
    pub ram_align: Option<String>,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
    /// Another QEMU binary than [`Env::qemu`] (e.g. [`Env::qemu10`]).
    pub qemu: Option<PathBuf>,
    /// Run QEMU in this network namespace (`ip netns exec NS`, which execs QEMU: the child's
    /// pid is QEMU's).
    pub netns: Option<String>,
    /// Appended to QEMU's command line (e.g. `-S`: an incoming guest stays paused after the
    /// migration, so its RAM can be compared with the source's).
    pub extra_args: Vec<String>,
}

/// One QEMU process and its files (serial console, stderr, QMP socket); killed and its files
/// removed when dropped, panic or not.
pub struct Guest {
    child: Child,
    qmp: Option<Qmp>,
    dir: tempfile::TempDir,
}

impl Drop for Guest {
    fn drop(&mut self) {
        self.qmp = None;
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Guest {
    /// Starts QEMU (no network, no display, serial console to a file) and connects to QMP.
    pub fn start(env: &Env, config: &GuestConfig) -> Guest {
        // In tmpfs when there is one: a RAM file there is memory, not disk.
        let base = if Path::new("/dev/shm").is_dir() {
            "/dev/shm"
        } else {
            "/tmp"
        };
        let dir = tempfile::Builder::new()
            .prefix("cg-qemu-")
            .tempdir_in(base)
            .unwrap();
        let d = dir.path();
        let qemu = config.qemu.as_ref().unwrap_or(&env.qemu);
        let mut cmd = match &config.netns {
            Some(ns) => {
                let mut c = Command::new("ip");
                c.args(["netns", "exec", ns]).arg(qemu);
                c
            }
            None => Command::new(qemu),
        };
        if let Some(name) = &config.name {
            cmd.args(["-name", name]);
        }
        cmd.args(["-accel", &env.accel, "-smp", "1"]);
        if config.ram_file {
            cmd.args(["-machine", "pc,memory-backend=ram0"])
                .arg("-object")
                .arg(format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share=on{}",
                    config.mem_mib,
                    d.join("ram").display(),
                    config
                        .ram_align
                        .as_ref()
                        .map(|a| format!(",align={a}"))
                        .unwrap_or_default()
                ));
        } else {
            cmd.args(["-machine", "pc"]);
        }
        cmd.args(["-m", &format!("{}M", config.mem_mib)])
            .args(["-nodefaults", "-no-user-config", "-display", "none"])
            .arg("-serial")
            .arg(format!("file:{}", d.join("serial.log").display()))
            .arg("-kernel")
            .arg(&env.kernel)
            .arg("-initrd")
            .arg(&env.initrd)
            .args(["-append", &config.append])
            .arg("-qmp")
            .arg(format!(
                "unix:{},server=on,wait=off",
                d.join("qmp.sock").display()
            ));
        if config.incoming {
            cmd.args(["-incoming", "defer"]);
        }
        cmd.args(&config.extra_args);
        cmd.stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(File::create(d.join("stderr.log")).unwrap());
        // Should the test process die without unwinding, QEMU goes with it.
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        let mut child = cmd.spawn().expect("spawn qemu-system-x86_64");
        let qmp = Qmp::connect(&d.join("qmp.sock"), &mut child, Duration::from_secs(30));
        Guest {
            child,
            qmp: Some(qmp),
            dir,
        }
    }

    pub fn pid(&self) -> i32 {
        self.child.id() as i32
    }

    pub fn qmp(&mut self) -> &mut Qmp {
        self.qmp.as_mut().unwrap()
    }

    /// The guest RAM file (with [`GuestConfig::ram_file`]).
    pub fn ram_path(&self) -> PathBuf {
        self.dir.path().join("ram")
    }

    /// Whether the QEMU process is still there.
    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    pub fn serial(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("serial.log")).unwrap_or_default()
    }

    pub fn stderr(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("stderr.log")).unwrap_or_default()
    }

    /// Waits until the serial console shows `needle`; panics with the console if it does not
    /// by `deadline` or QEMU exits.
    pub fn wait_serial(&mut self, needle: &str, deadline: Instant) {
        while !self.serial().contains(needle) {
            if let Ok(Some(status)) = self.child.try_wait() {
                panic!("QEMU exited ({status}): {}", self.stderr());
            }
            assert!(
                Instant::now() < deadline,
                "no {needle:?} on the guest console; it shows:\n{}",
                self.serial()
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

/// Two network namespaces joined by a veth pair: two "nodes", `a` at [`Nodes::ADDR_A`] and `b`
/// at [`Nodes::ADDR_B`] (a /24 only these namespaces have), each with its loopback up. Names
/// are unique per process and instance; both namespaces (and so the veth pair) are deleted
/// when dropped, panic or not. Namespaces a killed earlier run left behind (its pid gone)
/// are deleted on the way.
pub struct Nodes {
    pub a: String,
    pub b: String,
    /// The veth end in `a`, and in `b`.
    pub veth_a: String,
    pub veth_b: String,
}

static NODES_SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);

fn ip(args: &[&str]) {
    let out = Command::new("ip").args(args).output().expect("run ip");
    assert!(
        out.status.success(),
        "ip {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
}

/// Whether network namespaces can be made here (root, `ip` from iproute2).
pub fn netns_available() -> Result<(), String> {
    let n = NODES_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let probe = format!("cgq-{}-{n}-probe", std::process::id());
    match Command::new("ip").args(["netns", "add", &probe]).output() {
        Ok(o) if o.status.success() => {
            let _ = Command::new("ip").args(["netns", "del", &probe]).status();
            Ok(())
        }
        Ok(o) => Err(format!(
            "ip netns add failed: {}",
            String::from_utf8_lossy(&o.stderr).trim()
        )),
        Err(e) => Err(format!("cannot run ip: {e}")),
    }
}

impl Nodes {
    pub const ADDR_A: &'static str = "10.231.0.1";
    pub const ADDR_B: &'static str = "10.231.0.2";

    pub fn new() -> Nodes {
        Self::remove_stale();
        let pid = std::process::id();
        let n = NODES_SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let a = format!("cgq-{pid}-{n}-a");
        let b = format!("cgq-{pid}-{n}-b");
        // interface names: at most 15 bytes
        let tag = format!("{:x}", (pid as u64) << 8 | (n as u64 & 0xff));
        let veth_a = format!("cgva{}", &tag[tag.len().saturating_sub(10)..]);
        let veth_b = format!("cgvb{}", &tag[tag.len().saturating_sub(10)..]);
        ip(&["netns", "add", &a]);
        let nodes = Nodes {
            a,
            b: b.clone(),
            veth_a,
            veth_b,
        };
        ip(&["netns", "add", &b]);
        ip(&[
            "-n",
            &nodes.a,
            "link",
            "add",
            &nodes.veth_a,
            "type",
            "veth",
            "peer",
            "name",
            &nodes.veth_b,
            "netns",
            &nodes.b,
        ]);
        for (ns, dev, addr) in [
            (&nodes.a, &nodes.veth_a, Self::ADDR_A),
            (&nodes.b, &nodes.veth_b, Self::ADDR_B),
        ] {
            // no IPv6 chatter (router solicitations, DAD) in the byte counts
            for key in ["all", "default", dev.as_str()] {
                let _ = Command::new("ip")
                    .args(["netns", "exec", ns, "sysctl", "-qw"])
                    .arg(format!("net.ipv6.conf.{key}.disable_ipv6=1"))
                    .status();
            }
            ip(&["-n", ns, "addr", "add", &format!("{addr}/24"), "dev", dev]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        nodes
    }

    fn remove_stale() {
        let Ok(dir) = std::fs::read_dir("/run/netns") else {
            return;
        };
        for e in dir.flatten() {
            let name = e.file_name().to_string_lossy().to_string();
            let Some(pid) = name
                .strip_prefix("cgq-")
                .and_then(|r| r.split('-').next())
                .and_then(|p| p.parse::<u32>().ok())
            else {
                continue;
            };
            if !Path::new(&format!("/proc/{pid}")).exists() {
                let _ = Command::new("ip").args(["netns", "del", &name]).status();
            }
        }
    }

    /// A command run in namespace `ns` (`ip netns exec`, which execs the program: the child's
    /// pid is the program's); killed should the test process die without unwinding.
    pub fn command(ns: &str, program: impl AsRef<std::ffi::OsStr>) -> Command {
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns]).arg(program);
        unsafe {
            cmd.pre_exec(|| {
                libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
                Ok(())
            });
        }
        cmd
    }

    /// Bytes received plus sent on `a`'s end of the veth (read inside `a`, whose /sys
    /// `ip netns exec` mounts): everything that crossed between the nodes, both directions.
    pub fn veth_bytes(&self) -> u64 {
        ["rx_bytes", "tx_bytes"]
            .iter()
            .map(|f| {
                let out = Command::new("ip")
                    .args(["netns", "exec", &self.a, "cat"])
                    .arg(format!("/sys/class/net/{}/statistics/{f}", self.veth_a))
                    .output()
                    .expect("read veth statistics");
                assert!(out.status.success(), "veth statistics: {out:?}");
                String::from_utf8_lossy(&out.stdout)
                    .trim()
                    .parse::<u64>()
                    .expect("veth byte count")
            })
            .sum()
    }

    /// Counts, with nftables in `a`, the bytes of TCP segments crossing the veth to or from
    /// each of `ports` (IP packet bytes, both directions), in named counters `p<port>`.
    /// `false` when `nft` is not there (then [`Nodes::port_bytes`] gives `None`).
    pub fn count_ports(&self, ports: &[u16]) -> bool {
        let mut rules = String::from("table inet cgtest {\n");
        for p in ports {
            rules += &format!("  counter p{p} {{}}\n");
        }
        rules += "  chain out {\n    type filter hook output priority 0; policy accept;\n";
        for p in ports {
            rules += &format!(
                "    oifname \"{}\" tcp dport {p} counter name p{p}\n    oifname \"{}\" tcp sport {p} counter name p{p}\n",
                self.veth_a, self.veth_a
            );
        }
        rules += "  }\n  chain in {\n    type filter hook input priority 0; policy accept;\n";
        for p in ports {
            rules += &format!(
                "    iifname \"{}\" tcp dport {p} counter name p{p}\n    iifname \"{}\" tcp sport {p} counter name p{p}\n",
                self.veth_a, self.veth_a
            );
        }
        rules += "  }\n}\n";
        let child = Command::new("ip")
            .args(["netns", "exec", &self.a, "nft", "-f", "-"])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn();
        let Ok(mut child) = child else {
            return false;
        };
        child
            .stdin
            .take()
            .unwrap()
            .write_all(rules.as_bytes())
            .unwrap();
        let out = child.wait_with_output().unwrap();
        if !out.status.success() {
            let err = String::from_utf8_lossy(&out.stderr);
            assert!(
                err.contains("No such file") || err.contains("not found"),
                "nft rejected the counting rules: {err}\n{rules}"
            );
            return false;
        }
        true
    }

    /// The bytes counted for `port` since [`Nodes::count_ports`].
    pub fn port_bytes(&self, port: u16) -> Option<u64> {
        let out = Command::new("ip")
            .args(["netns", "exec", &self.a, "nft", "-j", "list", "counter"])
            .args(["inet", "cgtest", &format!("p{port}")])
            .output()
            .ok()?;
        if !out.status.success() {
            return None;
        }
        let v: Value = serde_json::from_slice(&out.stdout).ok()?;
        v["nftables"]
            .as_array()?
            .iter()
            .find_map(|o| o["counter"]["bytes"].as_u64())
    }

    /// Runs `f` on a thread that has joined network namespace `ns` (`setns` moves only the
    /// calling thread): sockets it opens are that node's.
    pub fn in_ns<T: Send + 'static>(
        ns: &str,
        f: impl FnOnce() -> T + Send + 'static,
    ) -> std::thread::JoinHandle<T> {
        let path = format!("/run/netns/{ns}");
        std::thread::spawn(move || {
            let fd = File::open(&path).unwrap_or_else(|e| panic!("{path}: {e}"));
            let rc = unsafe { libc::setns(fd.as_raw_fd(), libc::CLONE_NEWNET) };
            assert_eq!(rc, 0, "setns {path}: {}", std::io::Error::last_os_error());
            f()
        })
    }
}

impl Drop for Nodes {
    fn drop(&mut self) {
        for ns in [&self.a, &self.b] {
            let _ = Command::new("ip")
                .args(["netns", "del", ns])
                .stderr(Stdio::null())
                .status();
        }
    }
}

/// Whether process `pid` has a TCP socket listening on `port` in its network namespace
/// (`/proc/PID/net/tcp*` show the process's namespace).
pub fn listening(pid: u32, port: u16) -> bool {
    ["tcp", "tcp6"].iter().any(|f| {
        std::fs::read_to_string(format!("/proc/{pid}/net/{f}"))
            .unwrap_or_default()
            .lines()
            .skip(1)
            .any(|l| {
                let mut it = l.split_whitespace();
                let local = it.nth(1).unwrap_or("");
                let state = it.nth(1).unwrap_or("");
                state == "0A"
                    && local
                        .rsplit(':')
                        .next()
                        .and_then(|p| u16::from_str_radix(p, 16).ok())
                        == Some(port)
            })
    })
}
