//! What the QEMU tests share: running `prepare.sh`, starting a guest from its kernel and
//! initramfs (killed when dropped), and a minimal QMP client. Included with
//! `#[path = "qemu/common.rs"] mod qemu;` by each test that boots QEMU.
#![allow(dead_code)]

use std::fs::File;
use std::io::{BufRead, BufReader, Write};
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
pub struct GuestConfig {
    pub mem_mib: u64,
    /// The kernel command line.
    pub append: String,
    /// The `-name` value, e.g. `guest=<namespace>_<name>,debug-threads=on` as virt-launcher
    /// gives it; `None` for no `-name`.
    pub name: Option<String>,
    /// Guest RAM in a file in tmpfs (see [`Guest::ram_path`]) instead of anonymous memory.
    pub ram_file: bool,
    /// Wait for an incoming migration (`-incoming defer`).
    pub incoming: bool,
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
        let mut cmd = Command::new(&env.qemu);
        if let Some(name) = &config.name {
            cmd.args(["-name", name]);
        }
        cmd.args(["-accel", &env.accel, "-smp", "1"]);
        if config.ram_file {
            cmd.args(["-machine", "pc,memory-backend=ram0"])
                .arg("-object")
                .arg(format!(
                    "memory-backend-file,id=ram0,size={}M,mem-path={},share=on",
                    config.mem_mib,
                    d.join("ram").display()
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
