//! Shared by the relay tests: certificates from a throwaway CA, the relay pair as processes,
//! and waiting for what they write.
#![allow(dead_code)]

use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use commonground::plan::region::PAGE_SIZE;
use commonground::relay::stream::fixtures::{page, region_content, MainWriter};
use rcgen::{BasicConstraints, CertificateParams, CertifiedIssuer, IsCa, KeyPair};

pub struct Certs {
    pub ca: PathBuf,
    pub server_cert: PathBuf,
    pub server_key: PathBuf,
    pub client_cert: PathBuf,
    pub client_key: PathBuf,
}

/// A CA and a server and a client certificate it signs, written under `dir/name`.
pub fn certs(dir: &Path, name: &str) -> Certs {
    let dir = dir.join(name);
    std::fs::create_dir_all(&dir).unwrap();
    let mut ca_params = CertificateParams::new(Vec::<String>::new()).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca = CertifiedIssuer::self_signed(ca_params, KeyPair::generate().unwrap()).unwrap();
    let leaf = |file: &str| {
        let key = KeyPair::generate().unwrap();
        let params = CertificateParams::new(vec!["commonground-relay".to_string()]).unwrap();
        let cert = params.signed_by(&key, &ca).unwrap();
        let (c, k) = (
            dir.join(format!("{file}.crt")),
            dir.join(format!("{file}.key")),
        );
        std::fs::write(&c, cert.pem()).unwrap();
        std::fs::write(&k, key.serialize_pem()).unwrap();
        (c, k)
    };
    let (server_cert, server_key) = leaf("server");
    let (client_cert, client_key) = leaf("client");
    let ca_path = dir.join("ca.crt");
    std::fs::write(&ca_path, ca.pem()).unwrap();
    Certs {
        ca: ca_path,
        server_cert,
        server_key,
        client_cert,
        client_key,
    }
}

pub fn free_addr(ip: &str) -> SocketAddr {
    TcpListener::bind((ip, 0)).unwrap().local_addr().unwrap()
}

/// Waits until the relay logged that it listens (connecting to find out would start a
/// migration).
pub fn wait_ready(log: &Path, child: &mut Child) {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(log).unwrap_or_default();
        if text.contains("ready") {
            return;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("relay exited before it was ready ({status}):\n{text}");
        }
        assert!(Instant::now() < deadline, "relay not ready:\n{text}");
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// A relay process, killed on drop.
pub struct Relay {
    pub child: Child,
    pub addr: SocketAddr,
    pub stats: PathBuf,
    pub log: PathBuf,
}

impl Drop for Relay {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Relay {
    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// The statistics lines written so far.
    pub fn stats_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.stats)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Waits for the `n`th statistics line.
    pub fn wait_stats(&self, n: usize) -> serde_json::Value {
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            let lines = self.stats_lines();
            if lines.len() >= n {
                return lines[n - 1].clone();
            }
            assert!(
                Instant::now() < deadline,
                "no statistics line {n}; log:\n{}",
                self.log_text()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }
}

/// Prefix for running a command inside a network namespace (empty: this one).
pub fn in_ns(ns: Option<&str>, program: &Path) -> Command {
    match ns {
        Some(ns) => {
            let mut c = Command::new("ip");
            c.args(["netns", "exec", ns]).arg(program);
            c
        }
        None => Command::new(program),
    }
}

/// Starts `commonground relay <side>` with the certificate pair given and the statistics
/// and log under `dir`, and waits until it is ready.
pub fn spawn_relay(
    dir: &Path,
    ns: Option<&str>,
    side: &str,
    addr: SocketAddr,
    (cert, key, ca): (&Path, &Path, &Path),
    args: Vec<String>,
) -> Relay {
    let stats = dir.join(format!("{side}-{}.jsonl", addr.port()));
    let log = dir.join(format!("{side}-{}.log", addr.port()));
    let mut cmd = in_ns(ns, Path::new(env!("CARGO_BIN_EXE_commonground")));
    cmd.args(["relay", side, "--listen", &addr.to_string()])
        .arg("--tls-cert")
        .arg(cert)
        .arg("--tls-key")
        .arg(key)
        .arg("--tls-ca")
        .arg(ca)
        .arg("--stats-json")
        .arg(&stats)
        .args(args);
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&log).unwrap())
        .spawn()
        .unwrap();
    wait_ready(&log, &mut child);
    Relay {
        child,
        addr,
        stats,
        log,
    }
}

pub fn target_relay(
    dir: &Path,
    ns: Option<&str>,
    ip: &str,
    certs: &Certs,
    store_pids: &[u32],
    extra: &[&str],
) -> Relay {
    let port = free_addr(if ns.is_some() { "127.0.0.1" } else { ip }).port();
    let addr: SocketAddr = format!("{ip}:{port}").parse().unwrap();
    let mut args: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
    for pid in store_pids {
        args.push("--store-pid".into());
        args.push(pid.to_string());
    }
    spawn_relay(
        dir,
        ns,
        "target",
        addr,
        (&certs.server_cert, &certs.server_key, &certs.ca),
        args,
    )
}

pub fn source_relay(
    dir: &Path,
    ns: Option<&str>,
    certs: &Certs,
    target: SocketAddr,
    deliver_to: &str,
    extra: &[&str],
) -> Relay {
    let addr = free_addr("127.0.0.1");
    let mut args = vec![
        "--target-relay".to_string(),
        target.to_string(),
        "--deliver-to".to_string(),
        deliver_to.to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    spawn_relay(
        dir,
        ns,
        "source",
        addr,
        (&certs.client_cert, &certs.client_key, &certs.ca),
        args,
    )
}

pub const REGION: usize = 16 * PAGE_SIZE;

/// Memory of this process holding some regions' content, in a memfd mapping of its own as
/// QEMU's guest RAM can be (a memory object the store's fallback rule takes for guest RAM;
/// regions are cut from the mapping's start).
pub struct Memory {
    ptr: *mut u8,
    len: usize,
}

impl Memory {
    pub fn new(regions: &[Vec<u8>]) -> Self {
        let len = (regions.len().max(16)) * REGION;
        // SAFETY: a fresh memfd of `len` bytes mapped shared and writable; the pointer is only
        // used within the mapping's bounds and unmapped on drop.
        let ptr = unsafe {
            let fd = libc::memfd_create(c"cg-relay-test-ram".as_ptr(), 0);
            assert!(fd >= 0, "memfd_create");
            assert_eq!(libc::ftruncate(fd, len as libc::off_t), 0);
            let p = libc::mmap(
                std::ptr::null_mut(),
                len,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_SHARED,
                fd,
                0,
            );
            libc::close(fd);
            assert_ne!(p, libc::MAP_FAILED);
            p as *mut u8
        };
        let mut m = Self { ptr, len };
        for (i, r) in regions.iter().enumerate() {
            m.region_mut(i).copy_from_slice(r);
        }
        m
    }

    pub fn region_mut(&mut self, i: usize) -> &mut [u8] {
        assert!((i + 1) * REGION <= self.len);
        // SAFETY: within the mapping, exclusively borrowed through `self`.
        unsafe { std::slice::from_raw_parts_mut(self.ptr.add(i * REGION), REGION) }
    }
}

impl Drop for Memory {
    fn drop(&mut self) {
        // SAFETY: the mapping made in `new`.
        unsafe { libc::munmap(self.ptr.cast(), self.len) };
    }
}

/// A guest of `regions` full regions; returns the stream and each region's content.
pub fn guest(regions: u64, seed: u64) -> (Vec<u8>, Vec<Vec<u8>>) {
    let mut w = MainWriter::new();
    w.ram_start(&[("pc.ram", regions * REGION as u64)]);
    w.ram_part();
    let mut contents = Vec::new();
    for r in 0..regions {
        let pages: Vec<_> = (0..16)
            .map(|i| (i, page(seed + r * 16 + i as u64)))
            .collect();
        for (i, p) in &pages {
            w.page("pc.ram", (r * 16 + *i as u64) * PAGE_SIZE as u64, p);
        }
        contents.push(region_content(&pages));
    }
    w.eos();
    w.ram_end();
    w.eos();
    w.devices_and_eof();
    (w.bytes, contents)
}

/// A target QEMU (or target virt-handler port) of consecutive migrations on `listener`: accepts
/// connections one after the other and passes on what each delivered.
pub fn collect_deliveries(
    listener: TcpListener,
    connections: usize,
) -> std::sync::mpsc::Receiver<Vec<u8>> {
    use std::io::Read;
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for _ in 0..connections {
            let Ok((mut s, _)) = listener.accept() else {
                return;
            };
            let mut got = Vec::new();
            let _ = s.read_to_end(&mut got);
            let _ = tx.send(got);
        }
    });
    rx
}

/// The next delivery on `rx` within `secs`, or a panic that shows the relays' logs.
pub fn next_delivery(
    rx: &std::sync::mpsc::Receiver<Vec<u8>>,
    secs: u64,
    relays: &[&Relay],
) -> Vec<u8> {
    rx.recv_timeout(Duration::from_secs(secs))
        .unwrap_or_else(|_| {
            let logs: Vec<String> = relays
                .iter()
                .map(|r| format!("{}:\n{}", r.log.display(), r.log_text()))
                .collect();
            panic!(
                "nothing delivered within {secs} s; relay logs:\n{}",
                logs.join("\n")
            )
        })
}
