//! The migration relay pair (`commonground relay source|target`, issue 15) against real QEMU
//! live migrations between two "nodes": network namespaces `a` and `b` joined by a veth pair
//! (`qemu::Nodes`), every byte between them counted on the veth.
//!
//! Per scenario: a source guest in `a`, a destination QEMU in `b` (`-incoming defer`, `-S` so
//! it stays paused after the migration and its RAM can be compared with the source's), and a
//! "store" guest in `b` booted from the same kernel and initramfs, whose memory is the target
//! relay's store (`--store-pid`). The source guest allocates memory filled with content no
//! other guest has (`seed=1`); the store guest allocates its own (`seed=2`): what the target
//! already holds is what the two guests have in common, mostly the guest kernel. Guest RAM is
//! a memory-backend-file in tmpfs, so the test reads every guest's RAM as a file: after the
//! migration the source (paused) and the destination (paused) must be byte-identical, and the
//! non-zero bytes the target lacked are counted from the source's and the store's RAM at the
//! relay's geometry (aligned 64 KiB regions).
//!
//! Scenarios: the direct migration (baseline), through the relays (plain and 8 multifd
//! channels, QEMU 7.2 and, where prepare.sh provides it, 10.0), a guest dirtying memory during
//! the migration, a stream that is not QEMU's, either relay killed mid-migration, a client
//! certificate from another CA, and the store's memory rewritten after the target relay
//! started. One scenario runs at a time (TCG on two host CPUs).
//!
//! Skips with a message when `tests/qemu/prepare.sh` cannot provide QEMU (exit code 77),
//! `COMMONGROUND_SKIP_QEMU=1`, network namespaces cannot be made, or (for the relayed
//! scenarios) the binary has no `relay` subcommand yet. `COMMONGROUND_RELAY_BIN` runs another
//! build's binary as the relay. Numbers: tests/qemu/README.md.

#[path = "qemu/common.rs"]
mod qemu;

use std::collections::{BTreeMap, HashSet};
use std::fs::File;
use std::io::{Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

use qemu::{Env, Guest, GuestConfig, Nodes};
use serde_json::{json, Value};

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;
/// The relay's default region: 16 aligned 4 KiB pages.
const REGION: usize = 64 << 10;
const GUEST_MIB: u64 = 256;
/// Memory only the source guest has (`seed=1`), and the store guest's own (`seed=2`).
const SRC_ALLOC_MIB: u64 = 8;
const STORE_ALLOC_MIB: u64 = 1;
/// Memory whose content is a function of the guest-physical frame (dirtier's `shared_mib`):
/// the store's covers more frames than the source's, so most of the source's is held.
const SRC_SHARED_MIB: u64 = 96;
const STORE_SHARED_MIB: u64 = 176;

/// The source relay listens on loopback in `a` (QEMU migrates to it there).
const SRC_RELAY_PORT: u16 = 7000;
/// The target relay listens on `b`'s veth address.
const DST_RELAY_PORT: u16 = 7001;
/// The destination QEMU's `-incoming` port: on loopback in `b` behind the relays, on `b`'s
/// veth address for the direct migration.
const QEMU_PORT: u16 = 7002;
const SERVER_NAME: &str = "commonground-relay";

/// Beyond the bytes the target lacked: QEMU's own framing (page headers, zero pages, device
/// state), the relays' references and TLS, TCP/IP headers and ACKs both ways.
const OVERHEAD_FIXED: u64 = 4 * MIB;
const OVERHEAD_SHARE: f64 = 0.06;

/// One migration at a time: TCG guests on two host CPUs shared with builds.
static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(|e| e.into_inner())
}

fn mib(b: u64) -> f64 {
    b as f64 / MIB as f64
}

// ---- what the test needs, or why it skips ------------------------------------------------

fn relay_bin() -> PathBuf {
    std::env::var_os("COMMONGROUND_RELAY_BIN")
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_BIN_EXE_commonground")))
}

/// QEMU, kernel and initramfs, and namespaces; `None` after printing SKIP.
fn prepare(test: &str) -> Option<Env> {
    let env = qemu::prepare(test)?;
    if let Err(why) = qemu::netns_available() {
        println!("SKIP {test}: cannot make network namespaces here: {why}");
        return None;
    }
    Some(env)
}

/// Also the relay; `None` after printing SKIP when the binary has no `relay` subcommand.
fn prepare_relay(test: &str) -> Option<Env> {
    let bin = relay_bin();
    let ok = Command::new(&bin)
        .args(["relay", "--help"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success());
    if !ok {
        println!(
            "SKIP {test}: {} has no `relay` subcommand yet (`relay --help` fails)",
            bin.display()
        );
        return None;
    }
    prepare(test)
}

/// A QEMU to run both ends with: the system's (7.2 on Debian 12) or 10.0 from backports.
#[derive(Clone)]
struct Qemu {
    label: &'static str,
    path: PathBuf,
}

fn qemu_7(env: &Env) -> Qemu {
    Qemu {
        label: "7.2",
        path: env.qemu.clone(),
    }
}

fn qemu_10(env: &Env, test: &str) -> Option<Qemu> {
    match &env.qemu10 {
        Some(p) => Some(Qemu {
            label: "10.0",
            path: p.clone(),
        }),
        None => {
            println!("SKIP {test}: prepare.sh provides no QEMU 10.0 here (see its message)");
            None
        }
    }
}

// ---- certificates ------------------------------------------------------------------------

/// PEM files: a CA, a certificate and key per relay signed by it (SAN `commonground-relay`,
/// server and client use), and a "rogue" certificate and key from another CA.
struct Pki {
    dir: tempfile::TempDir,
}

impl Pki {
    fn new() -> Pki {
        use rcgen::{
            BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer,
            KeyPair, KeyUsagePurpose,
        };
        let dir = tempfile::Builder::new()
            .prefix("cg-relay-pki-")
            .tempdir()
            .unwrap();
        let write = |name: &str, text: &str| std::fs::write(dir.path().join(name), text).unwrap();
        for (ca_name, leaves) in [
            ("ca", &["source", "target"][..]),
            ("rogue-ca", &["rogue"][..]),
        ] {
            let mut p = CertificateParams::new(Vec::<String>::new()).unwrap();
            p.distinguished_name
                .push(DnType::CommonName, format!("commonground test {ca_name}"));
            p.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
            p.key_usages = vec![
                KeyUsagePurpose::KeyCertSign,
                KeyUsagePurpose::CrlSign,
                KeyUsagePurpose::DigitalSignature,
            ];
            let key = KeyPair::generate().unwrap();
            write(
                &format!("{ca_name}.pem"),
                &p.self_signed(&key).unwrap().pem(),
            );
            let issuer = Issuer::new(p, key);
            for leaf in leaves {
                let mut lp = CertificateParams::new(vec![SERVER_NAME.to_string()]).unwrap();
                lp.distinguished_name
                    .push(DnType::CommonName, format!("relay {leaf}"));
                lp.extended_key_usages = vec![
                    ExtendedKeyUsagePurpose::ServerAuth,
                    ExtendedKeyUsagePurpose::ClientAuth,
                ];
                lp.key_usages = vec![
                    KeyUsagePurpose::DigitalSignature,
                    KeyUsagePurpose::KeyEncipherment,
                ];
                let lk = KeyPair::generate().unwrap();
                write(
                    &format!("{leaf}.pem"),
                    &lp.signed_by(&lk, &issuer).unwrap().pem(),
                );
                write(&format!("{leaf}.key"), &lk.serialize_pem());
            }
        }
        Pki { dir }
    }

    /// `--tls-cert F --tls-key F --tls-ca F` for a relay presenting `leaf`'s certificate and
    /// trusting the test CA.
    fn args(&self, leaf: &str) -> Vec<String> {
        let f = |n: String| self.dir.path().join(n).display().to_string();
        vec![
            "--tls-cert".into(),
            f(format!("{leaf}.pem")),
            "--tls-key".into(),
            f(format!("{leaf}.key")),
            "--tls-ca".into(),
            f("ca.pem".into()),
        ]
    }
}

// ---- relay processes -------------------------------------------------------------------

/// One relay process in a namespace; killed when dropped.
struct Relay {
    child: Child,
    log: PathBuf,
    stats: PathBuf,
    what: String,
}

impl Relay {
    fn spawn(ns: &str, dir: &Path, role: &str, args: Vec<String>, port: u16) -> Relay {
        let log = dir.join(format!("relay-{role}.log"));
        let stats = dir.join(format!("relay-{role}.stats.jsonl"));
        let mut cmd = Nodes::command(ns, relay_bin());
        cmd.args(["relay", role])
            .args(&args)
            .arg("--stats-json")
            .arg(&stats)
            .env(
                "RUST_LOG",
                std::env::var("RUST_LOG").unwrap_or_else(|_| "info".into()),
            )
            .stdin(Stdio::null());
        let f = File::create(&log).unwrap();
        cmd.stdout(f.try_clone().unwrap()).stderr(f);
        let what = format!("relay {role} {}", args.join(" "));
        let child = cmd.spawn().expect("spawn the relay");
        let mut r = Relay {
            child,
            log,
            stats,
            what,
        };
        let deadline = Instant::now() + Duration::from_secs(60);
        while !qemu::listening(r.child.id(), port) {
            if let Ok(Some(st)) = r.child.try_wait() {
                panic!("{} exited ({st}) before listening:\n{}", r.what, r.log());
            }
            assert!(
                Instant::now() < deadline,
                "{} not listening on port {port} after 60 s:\n{}",
                r.what,
                r.log()
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        r
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// The last JSON object the relay appended to `--stats-json`, waiting up to `wait` for
    /// one to appear.
    fn stats(&self, wait: Duration) -> Option<Value> {
        let deadline = Instant::now() + wait;
        loop {
            let text = std::fs::read_to_string(&self.stats).unwrap_or_default();
            if let Some(line) = text.lines().rev().find(|l| !l.trim().is_empty()) {
                return Some(serde_json::from_str(line).unwrap_or_else(|e| {
                    panic!("{}: --stats-json line {line:?} is not JSON: {e}", self.what)
                }));
            }
            if Instant::now() >= deadline {
                return None;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Relay {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A counter of a relay's stats object (0 when missing).
fn stat(v: &Value, key: &str) -> u64 {
    v[key].as_u64().unwrap_or(0)
}

// ---- guest memory ------------------------------------------------------------------------

/// What the target lacked: the source's RAM at the relay's geometry against the store's.
#[derive(Clone, Copy, Debug, Default)]
struct Content {
    /// Non-zero 4 KiB pages of the source's RAM, in bytes.
    nonzero: u64,
    /// Non-zero bytes in regions the store holds (every page non-zero, the same 64 KiB
    /// somewhere in the store at a 64 KiB boundary).
    held: u64,
    /// The other non-zero bytes: what the target did not hold.
    lacked: u64,
}

fn read_regions(path: &Path, mut f: impl FnMut(&[u8])) {
    let mut file = File::open(path).unwrap_or_else(|e| panic!("{path:?}: {e}"));
    let mut buf = vec![0u8; 256 * REGION];
    loop {
        let mut n = 0;
        while n < buf.len() {
            let k = file.read(&mut buf[n..]).unwrap();
            if k == 0 {
                break;
            }
            n += k;
        }
        if n == 0 {
            break;
        }
        buf[..n].chunks(REGION).for_each(&mut f);
        if n < buf.len() {
            break;
        }
    }
}

fn is_zero(p: &[u8]) -> bool {
    p.iter().all(|&b| b == 0)
}

fn content(source_ram: &Path, store_ram: &Path) -> Content {
    let mut store = HashSet::new();
    read_regions(store_ram, |r| {
        if !is_zero(r) {
            store.insert(xxhash_rust::xxh3::xxh3_128(r));
        }
    });
    let mut c = Content::default();
    read_regions(source_ram, |r| {
        let nz = r.chunks(PAGE).filter(|p| !is_zero(p)).count() as u64 * PAGE as u64;
        c.nonzero += nz;
        if nz == r.len() as u64 && store.contains(&xxhash_rust::xxh3::xxh3_128(r)) {
            c.held += nz;
        } else {
            c.lacked += nz;
        }
    });
    c
}

/// `Ok` when the two RAM files are byte-identical; otherwise how many 4 KiB pages differ and
/// the first one.
fn compare_ram(a: &Path, b: &Path) -> Result<u64, String> {
    let (mut fa, mut fb) = (File::open(a).unwrap(), File::open(b).unwrap());
    let (la, lb) = (fa.metadata().unwrap().len(), fb.metadata().unwrap().len());
    if la != lb {
        return Err(format!("sizes differ: {la} vs {lb}"));
    }
    let mut ba = vec![0u8; 4 << 20];
    let mut bb = vec![0u8; 4 << 20];
    let (mut off, mut differ, mut first) = (0u64, 0u64, None);
    let mut detail = String::new();
    while off < la {
        let n = ((la - off) as usize).min(ba.len());
        fa.read_exact(&mut ba[..n]).unwrap();
        fb.read_exact(&mut bb[..n]).unwrap();
        for (i, (pa, pb)) in ba[..n].chunks(PAGE).zip(bb[..n].chunks(PAGE)).enumerate() {
            if pa != pb {
                differ += 1;
                let at = off + (i * PAGE) as u64;
                first.get_or_insert(at);
                if differ <= 4 {
                    let bytes: Vec<usize> = (0..PAGE).filter(|&k| pa[k] != pb[k]).collect();
                    detail += &format!(
                        "\n  page 0x{at:x}: {} bytes differ, first at +{}: {:02x?} vs {:02x?}",
                        bytes.len(),
                        bytes[0],
                        &pa[bytes[0]..(bytes[0] + 8).min(PAGE)],
                        &pb[bytes[0]..(bytes[0] + 8).min(PAGE)]
                    );
                }
            }
        }
        off += n as u64;
    }
    match first {
        None => Ok(la),
        Some(f) => Err(format!(
            "{differ} of {} pages differ, the first at guest physical 0x{f:x}{detail}",
            la / PAGE as u64
        )),
    }
}

// ---- one migration -----------------------------------------------------------------------

#[derive(Clone)]
struct Scenario {
    name: String,
    qemu: Qemu,
    relayed: bool,
    multifd: bool,
    /// The source guest dirties this many MiB/s within its first `wss` MiB.
    dirty_mib_s: u64,
    wss_mib: u64,
    /// `max-bandwidth` on the source (MiB/s), so a migration lasts long enough to disturb.
    max_bandwidth_mib_s: Option<u64>,
    /// The source relay presents the rogue CA's certificate.
    rogue_source_cert: bool,
    /// With a dirtying guest: `downtime-limit` 1 ms, so QEMU keeps iterating while the guest
    /// dirties, and QMP `stop` on the source once QEMU synced its dirty bitmap this often
    /// (1 at setup, 2 after the bulk pass, ...); QEMU then sends what is left and completes.
    /// So the guest dirties through several passes, deterministically, and the migration
    /// still ends.
    stop_after_syncs: Option<u64>,
    /// The store guest's RAM mapped at a 2 MiB boundary (`align=2M`, where QEMU puts
    /// anonymous RAM) instead of QEMU's 4 KiB for a file backend (as for memfd): regions of
    /// the RAM block are then also 64 KiB-aligned in the store process's address space.
    store_aligned: bool,
}

impl Scenario {
    fn new(name: &str, qemu: Qemu) -> Scenario {
        Scenario {
            name: format!("{name} (QEMU {})", qemu.label),
            qemu,
            relayed: true,
            multifd: false,
            dirty_mib_s: 0,
            wss_mib: 0,
            max_bandwidth_mib_s: None,
            rogue_source_cert: false,
            stop_after_syncs: None,
            store_aligned: false,
        }
    }
}

/// The namespaces, guests and relays of one scenario. Fields drop in order: relays and
/// guests before the namespaces they run in.
struct World {
    src_relay: Option<Relay>,
    dst_relay: Option<Relay>,
    src: Guest,
    dst: Guest,
    store: Guest,
    pki: Pki,
    dir: tempfile::TempDir,
    nodes: Nodes,
    s: Scenario,
}

/// How a migration ended, and what was counted.
struct Migration {
    /// The source's last query-migrate.
    info: Value,
    status: String,
    veth_bytes: u64,
    /// nftables' count of the bytes to and from the target relay's port and the
    /// destination QEMU's port on the veth (`None` without nft).
    relay_port_bytes: Option<u64>,
    qemu_port_bytes: Option<u64>,
}

fn guest_config(s: &Scenario, ns: &str, append: String, incoming: bool) -> GuestConfig {
    GuestConfig {
        mem_mib: GUEST_MIB,
        append: format!("console=ttyS0 quiet panic=-1 {append}"),
        name: None,
        ram_file: true,
        incoming,
        qemu: Some(s.qemu.path.clone()),
        netns: Some(ns.to_string()),
        // the destination stays paused after the migration: its RAM is what arrived
        extra_args: if incoming { vec!["-S".into()] } else { vec![] },
        ram_align: None,
    }
}

fn multifd(q: &mut qemu::Qmp) {
    q.cmd(
        "migrate-set-capabilities",
        json!({ "capabilities": [{ "capability": "multifd", "state": true }] }),
    )
    .unwrap();
    q.cmd("migrate-set-parameters", json!({ "multifd-channels": 8 }))
        .unwrap();
}

impl World {
    fn new(env: &Env, s: &Scenario) -> World {
        let nodes = Nodes::new();
        let dir = tempfile::Builder::new()
            .prefix("cg-relay-test-")
            .tempdir()
            .unwrap();
        let pki = Pki::new();
        let src_args = format!(
            "alloc_mib={SRC_ALLOC_MIB} seed=1 shared_mib={SRC_SHARED_MIB} dirty_mib_s={} wss_mib={}",
            s.dirty_mib_s, s.wss_mib
        );
        let mut src = Guest::start(env, &guest_config(s, &nodes.a, src_args, false));
        let dst = Guest::start(env, &guest_config(s, &nodes.b, String::new(), true));
        // the store is always the system's QEMU: the agent finds its RAM as on any node
        let mut store_cfg = guest_config(
            s,
            &nodes.b,
            format!(
                "alloc_mib={STORE_ALLOC_MIB} seed=2 shared_mib={STORE_SHARED_MIB} dirty_mib_s=0"
            ),
            false,
        );
        store_cfg.qemu = None;
        if s.store_aligned {
            store_cfg.ram_align = Some("2M".into());
        }
        let mut store = Guest::start(env, &store_cfg);
        let deadline = Instant::now() + Duration::from_secs(180);
        src.wait_serial("cg-dirtier: ready", deadline);
        store.wait_serial("cg-dirtier: ready", deadline);
        World {
            src_relay: None,
            dst_relay: None,
            src,
            dst,
            store,
            pki,
            dir,
            nodes,
            s: s.clone(),
        }
    }

    /// Starts the target relay in `b` (store: the store guest) and the source relay in `a`.
    fn start_relays(&mut self) {
        let mut targs = vec![
            "--listen".to_string(),
            format!("{}:{DST_RELAY_PORT}", Nodes::ADDR_B),
        ];
        targs.extend(self.pki.args("target"));
        targs.extend(["--store-pid".to_string(), self.store.pid().to_string()]);
        self.dst_relay = Some(Relay::spawn(
            &self.nodes.b,
            self.dir.path(),
            "target",
            targs,
            DST_RELAY_PORT,
        ));
        let mut sargs = vec![
            "--listen".to_string(),
            format!("127.0.0.1:{SRC_RELAY_PORT}"),
            "--target-relay".to_string(),
            format!("{}:{DST_RELAY_PORT}", Nodes::ADDR_B),
            "--deliver-to".to_string(),
            format!("127.0.0.1:{QEMU_PORT}"),
        ];
        if self.s.rogue_source_cert {
            // the rogue CA's certificate and key, the right CA to check the target with
            let mut a = self.pki.args("rogue");
            a[5] = self.pki.dir.path().join("ca.pem").display().to_string();
            sargs.extend(a);
        } else {
            sargs.extend(self.pki.args("source"));
        }
        self.src_relay = Some(Relay::spawn(
            &self.nodes.a,
            self.dir.path(),
            "source",
            sargs,
            SRC_RELAY_PORT,
        ));
    }

    /// Starts the migration and polls the source until it completed, failed or was
    /// cancelled; `hook` sees every query-migrate while it runs. Panics after `limit`.
    fn migrate(&mut self, limit: Duration, mut hook: impl FnMut(&mut World, &Value)) -> Migration {
        if self.s.relayed && self.src_relay.is_none() {
            self.start_relays();
        }
        let incoming = if self.s.relayed {
            format!("tcp:127.0.0.1:{QEMU_PORT}")
        } else {
            format!("tcp:{}:{QEMU_PORT}", Nodes::ADDR_B)
        };
        if self.s.multifd {
            multifd(self.dst.qmp());
            multifd(self.src.qmp());
        }
        self.dst
            .qmp()
            .cmd("migrate-incoming", json!({ "uri": incoming }))
            .unwrap();
        if let Some(bw) = self.s.max_bandwidth_mib_s {
            self.src
                .qmp()
                .cmd(
                    "migrate-set-parameters",
                    json!({ "max-bandwidth": bw * MIB }),
                )
                .unwrap();
        }
        let uri = if self.s.relayed {
            format!("tcp:127.0.0.1:{SRC_RELAY_PORT}")
        } else {
            incoming
        };
        if self.s.stop_after_syncs.is_some() {
            self.src
                .qmp()
                .cmd("migrate-set-parameters", json!({ "downtime-limit": 1 }))
                .unwrap();
        }
        let mut stopped = false;
        let counting = self.nodes.count_ports(&[DST_RELAY_PORT, QEMU_PORT]);
        let before = self.nodes.veth_bytes();
        let started = Instant::now();
        self.src
            .qmp()
            .cmd("migrate", json!({ "uri": uri }))
            .unwrap();
        let info = loop {
            std::thread::sleep(Duration::from_millis(50));
            let info = self.src.qmp().cmd("query-migrate", json!({})).unwrap();
            let status = info["status"].as_str().unwrap_or("").to_string();
            if matches!(status.as_str(), "completed" | "failed" | "cancelled") {
                break info;
            }
            hook(self, &info);
            let syncs = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
            if !stopped && self.s.stop_after_syncs.is_some_and(|n| syncs >= n) {
                self.src.qmp().cmd("stop", json!({})).unwrap();
                stopped = true;
            }
            if started.elapsed() > limit {
                let _ = self.src.qmp().cmd("migrate_cancel", json!({}));
                panic!(
                    "{}: migration still {status} after {limit:?}: {info}\n{}",
                    self.s.name,
                    self.relay_logs()
                );
            }
        };
        let status = info["status"].as_str().unwrap().to_string();
        if status == "completed" {
            // the destination has loaded everything once it says so itself
            let deadline = Instant::now() + Duration::from_secs(60);
            loop {
                let d = self.dst.qmp().cmd("query-migrate", json!({})).unwrap();
                match d["status"].as_str().unwrap_or("") {
                    "completed" => break,
                    "failed" => panic!(
                        "{}: source completed, destination failed: {d}\n{}\n{}",
                        self.s.name,
                        self.dst.stderr(),
                        self.relay_logs()
                    ),
                    _ => {}
                }
                assert!(
                    Instant::now() < deadline,
                    "{}: destination not completed 60 s after the source: {d}",
                    self.s.name
                );
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        let veth_bytes = self.nodes.veth_bytes() - before;
        let port = |p| counting.then(|| self.nodes.port_bytes(p)).flatten();
        let m = Migration {
            info,
            status,
            veth_bytes,
            relay_port_bytes: port(DST_RELAY_PORT),
            qemu_port_bytes: port(QEMU_PORT),
        };
        // What crossed is the migration's: through the relays' connection, or QEMU's own.
        if let (Some(relay), Some(qemu)) = (m.relay_port_bytes, m.qemu_port_bytes) {
            let (ours, other) = if self.s.relayed {
                (relay, qemu)
            } else {
                (qemu, relay)
            };
            assert_eq!(
                other,
                0,
                "{}: {other} bytes crossed the veth on the {} port",
                self.s.name,
                if self.s.relayed {
                    "destination QEMU's"
                } else {
                    "target relay's"
                }
            );
            if m.status == "completed" {
                assert!(
                    ours as f64 >= 0.9 * m.veth_bytes as f64,
                    "{}: only {ours} of the {} bytes on the veth were the migration's \
                     connections",
                    self.s.name,
                    m.veth_bytes
                );
            }
        }
        m
    }

    fn relay_logs(&self) -> String {
        let mut out = String::new();
        for r in [&self.src_relay, &self.dst_relay].into_iter().flatten() {
            out += &format!("--- {} ---\n{}\n", r.what, r.log());
        }
        out
    }

    /// Asserts the migration completed and the destination's RAM is the source's.
    fn assert_completed_identical(&self, m: &Migration) {
        assert_eq!(
            m.status,
            "completed",
            "{}: migration did not complete: {}\nsource QEMU: {}\ndestination QEMU: {}\n{}",
            self.s.name,
            m.info,
            self.src.stderr(),
            self.dst.stderr(),
            self.relay_logs()
        );
        if let Err(e) = compare_ram(&self.src.ram_path(), &self.dst.ram_path()) {
            panic!(
                "{}: destination RAM is not the source's: {e}\n{}",
                self.s.name,
                self.relay_logs()
            );
        }
    }

    fn content(&self) -> Content {
        content(&self.src.ram_path(), &self.store.ram_path())
    }

    /// The relays' stats objects for the migration.
    fn stats(&self) -> (Value, Value) {
        let get = |r: &Option<Relay>| {
            let r = r.as_ref().expect("relays started");
            r.stats(Duration::from_secs(20)).unwrap_or_else(|| {
                panic!(
                    "{}: {} wrote nothing to --stats-json\n{}",
                    self.s.name,
                    r.what,
                    self.relay_logs()
                )
            })
        };
        (get(&self.src_relay), get(&self.dst_relay))
    }

    /// Waits until the source guest runs again after a failed migration (QEMU resumes it).
    fn assert_source_runs(&mut self) {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let st = self.src.qmp().cmd("query-status", json!({})).unwrap();
            if st["status"] == "running" {
                break;
            }
            assert!(
                Instant::now() < deadline,
                "{}: source not running 30 s after the failed migration: {st}",
                self.s.name
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        assert!(self.src.alive(), "{}: source QEMU exited", self.s.name);
    }
}

/// Bytes QEMU sent as normal pages beyond one per non-zero page: pages it sent again because
/// the guest dirtied them.
fn resent_page_bytes(info: &Value, c: &Content) -> u64 {
    let page = info["ram"]["page-size"].as_u64().unwrap_or(PAGE as u64);
    let normal = info["ram"]["normal"].as_u64().unwrap_or(0) * page;
    normal.saturating_sub(c.nonzero)
}

// ---- the direct migration (baseline) -------------------------------------------------

#[derive(Clone, Copy)]
struct Baseline {
    veth_bytes: u64,
    transferred: u64,
}

/// The direct migration's numbers per QEMU version, measured once per test process.
static BASELINES: Mutex<BTreeMap<&'static str, Baseline>> = Mutex::new(BTreeMap::new());

fn baseline(env: &Env, q: &Qemu) -> Baseline {
    if let Some(b) = BASELINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(q.label)
    {
        return *b;
    }
    let mut s = Scenario::new("direct", q.clone());
    s.relayed = false;
    let mut w = World::new(env, &s);
    let m = w.migrate(Duration::from_secs(240), |_, _| {});
    w.assert_completed_identical(&m);
    let c = w.content();
    let b = Baseline {
        veth_bytes: m.veth_bytes,
        transferred: m.info["ram"]["transferred"].as_u64().unwrap_or(0),
    };
    println!(
        "{}: veth {:.1} MiB (nft: {:.1} MiB on QEMU's port), QEMU ram.transferred {:.1} MiB; \
         source RAM non-zero {:.1} MiB, of which the store holds {:.1} MiB, lacks {:.1} MiB",
        s.name,
        mib(b.veth_bytes),
        mib(m.qemu_port_bytes.unwrap_or(0)),
        mib(b.transferred),
        mib(c.nonzero),
        mib(c.held),
        mib(c.lacked)
    );
    assert!(
        b.veth_bytes >= c.nonzero / 2,
        "{}: only {} bytes crossed the veth for {} non-zero bytes: not measured where the \
         migration went",
        s.name,
        b.veth_bytes,
        c.nonzero
    );
    BASELINES
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .insert(q.label, b);
    b
}

// ---- through the relays --------------------------------------------------------------

/// Runs `s` through the relays and checks: completed, identical RAM, veth bytes at least
/// 50% below the direct migration (plus what a dirtying guest made QEMU resend) and at most
/// what the target lacked plus a small overhead; the relays' stats agree.
fn relayed(env: &Env, s: Scenario) {
    let base = baseline(env, &s.qemu);
    let mut w = World::new(env, &s);
    let m = w.migrate(Duration::from_secs(240), |_, _| {});
    w.assert_completed_identical(&m);
    let c = w.content();
    let resent = resent_page_bytes(&m.info, &c);
    let (src_stats, dst_stats) = w.stats();
    let lacked = c.lacked + resent;
    // QEMU 7.2 keeps zero pages out of multifd packets, so a packet's 128 pages rarely end on
    // a region boundary, and the next packet goes to another channel: the region cut there
    // reaches the source relay in two halves on two connections and goes as bytes. At most
    // one region (16 pages) per packet of 128 pages: an eighth of the bytes.
    let split = if s.multifd && s.qemu.label == "7.2" {
        c.nonzero / 8
    } else {
        0
    };
    let bound = lacked + split + OVERHEAD_FIXED + (OVERHEAD_SHARE * lacked as f64) as u64;
    let direct = base.veth_bytes + resent;
    println!(
        "{}: veth {:.1} MiB relayed vs {:.1} MiB direct ({:.0}% less); non-zero {:.1} MiB, \
         held {:.1} MiB, lacked {:.1} MiB + {:.1} MiB QEMU sent again (bound {:.1} MiB); \
         QEMU ram.transferred {:.1} MiB",
        s.name,
        mib(m.veth_bytes),
        mib(direct),
        100.0 * (1.0 - m.veth_bytes as f64 / direct as f64),
        mib(c.nonzero),
        mib(c.held),
        mib(c.lacked),
        mib(resent),
        mib(bound),
        mib(m.info["ram"]["transferred"].as_u64().unwrap_or(0))
    );
    println!("    source relay stats: {src_stats}");
    println!("    target relay stats: {dst_stats}");
    if s.dirty_mib_s > 0 {
        assert!(
            resent >= MIB,
            "{}: QEMU sent only {resent} bytes again: the guest dirtied nothing during the \
             migration",
            s.name
        );
    }
    let channels = if s.multifd { 9 } else { 1 };
    for (side, st) in [("source", &src_stats), ("target", &dst_stats)] {
        assert_eq!(
            stat(st, "connections"),
            channels,
            "{}: {side} relay counted other connections than QEMU's {channels}: {st}",
            s.name
        );
        assert!(
            st["passthrough"].as_array().is_some_and(|a| a.is_empty()),
            "{}: {side} relay passed QEMU's stream through unparsed: {st}",
            s.name
        );
    }
    assert!(
        stat(&src_stats, "regions_referenced") > 0,
        "{}: the source relay referenced no region although the store holds {:.1} MiB",
        s.name,
        mib(c.held)
    );
    assert!(
        stat(&src_stats, "bytes_on_wire") < stat(&src_stats, "bytes_from_qemu"),
        "{}: the source relay sent no less than QEMU gave it: {src_stats}",
        s.name
    );
    // The 50% goal is for a target holding two thirds of the content; where the store's
    // guest happened to hold less (its allocation lands on other frames from run to run), the
    // bound below (what the target lacked, plus overhead) is the check that applies.
    if c.held * 3 >= c.nonzero * 2 {
        assert!(
            m.veth_bytes <= direct / 2,
            "{}: {} bytes on the veth, not at least 50% below the direct migration's {}",
            s.name,
            m.veth_bytes,
            direct
        );
    } else {
        println!(
            "{}: the store held {:.0}% of the non-zero content (< two thirds): 50% check skipped, \
             lacked-bytes bound checked",
            s.name,
            100.0 * c.held as f64 / c.nonzero as f64
        );
    }
    assert!(
        m.veth_bytes <= bound,
        "{}: {} bytes on the veth, more than the {} non-zero bytes the target lacked \
         (+{} sent again) plus overhead ({bound})",
        s.name,
        m.veth_bytes,
        c.lacked,
        resent
    );
}

// ---- the tests ---------------------------------------------------------------------------

#[test]
fn direct_migration_7_2() {
    let Some(env) = prepare("qemu_relay direct 7.2") else {
        return;
    };
    let _one = serial();
    baseline(&env, &qemu_7(&env));
}

#[test]
fn direct_migration_10_0() {
    let Some(env) = prepare("qemu_relay direct 10.0") else {
        return;
    };
    let Some(q) = qemu_10(&env, "qemu_relay direct 10.0") else {
        return;
    };
    let _one = serial();
    baseline(&env, &q);
}

#[test]
fn relayed_7_2() {
    let Some(env) = prepare_relay("qemu_relay relayed 7.2") else {
        return;
    };
    let _one = serial();
    relayed(&env, Scenario::new("relayed", qemu_7(&env)));
}

/// As `relayed_7_2`, the store's RAM mapped 2 MiB-aligned: apart from where regions fall in
/// the store process's address space, the same migration.
#[test]
fn relayed_store_aligned_7_2() {
    let Some(env) = prepare_relay("qemu_relay relayed, store aligned") else {
        return;
    };
    let _one = serial();
    let mut s = Scenario::new("relayed, store RAM 2 MiB-aligned", qemu_7(&env));
    s.store_aligned = true;
    relayed(&env, s);
}

#[test]
fn relayed_10_0() {
    let Some(env) = prepare_relay("qemu_relay relayed 10.0") else {
        return;
    };
    let Some(q) = qemu_10(&env, "qemu_relay relayed 10.0") else {
        return;
    };
    let _one = serial();
    relayed(&env, Scenario::new("relayed", q));
}

#[test]
fn relayed_multifd_7_2() {
    let Some(env) = prepare_relay("qemu_relay relayed multifd 7.2") else {
        return;
    };
    let _one = serial();
    let mut s = Scenario::new("relayed, 8 multifd channels", qemu_7(&env));
    s.multifd = true;
    relayed(&env, s);
}

#[test]
fn relayed_multifd_10_0() {
    let Some(env) = prepare_relay("qemu_relay relayed multifd 10.0") else {
        return;
    };
    let Some(q) = qemu_10(&env, "qemu_relay relayed multifd 10.0") else {
        return;
    };
    let _one = serial();
    let mut s = Scenario::new("relayed, 8 multifd channels", q);
    s.multifd = true;
    relayed(&env, s);
}

/// A guest dirtying memory during the migration. On QEMU 10.0 where prepare.sh provides it:
/// QEMU 7.2 under TCG loses some of a dirtying guest's kernel writes even in a direct
/// migration (10-20 of 65536 pages differ afterwards; 10.0 gives identical RAM; see
/// README), so there it runs only under KVM.
#[test]
fn relayed_guest_dirtying() {
    let test = "qemu_relay relayed dirtying";
    let Some(env) = prepare_relay(test) else {
        return;
    };
    let q = match (&env.qemu10, env.accel.as_str()) {
        (Some(_), _) => qemu_10(&env, test).unwrap(),
        (None, "kvm") => qemu_7(&env),
        (None, _) => {
            println!(
                "SKIP {test}: no QEMU 10.0, and QEMU 7.2 under TCG does not migrate a dirtying \
                 guest's RAM exactly even without relays"
            );
            return;
        }
    };
    let _one = serial();
    let mut s = Scenario::new("relayed, guest dirtying 4 MiB/s of 8 MiB", q);
    s.dirty_mib_s = 4;
    s.wss_mib = 8;
    // two passes after the bulk pass with the guest dirtying, then stopped
    s.stop_after_syncs = Some(4);
    relayed(&env, s);
}

/// Random bytes into the source relay come out of the target relay byte for byte, and the
/// relays say they passed them through.
#[test]
fn not_qemu_passes_through() {
    let Some(env) = prepare_relay("qemu_relay not-qemu") else {
        return;
    };
    let _one = serial();
    let s = Scenario::new("not a QEMU stream", qemu_7(&env));
    let nodes = Nodes::new();
    let dir = tempfile::tempdir().unwrap();
    let pki = Pki::new();
    // a store, so the target relay runs as it would
    let mut store_cfg = guest_config(
        &s,
        &nodes.b,
        format!("alloc_mib={STORE_ALLOC_MIB} seed=2 shared_mib={STORE_SHARED_MIB}"),
        false,
    );
    store_cfg.qemu = None;
    let mut store = Guest::start(&env, &store_cfg);
    store.wait_serial(
        "cg-dirtier: ready",
        Instant::now() + Duration::from_secs(180),
    );

    // the plain listener in b, where the target QEMU would be
    let (tx, rx) = std::sync::mpsc::channel();
    let receiver = Nodes::in_ns(&nodes.b, move || {
        let l = std::net::TcpListener::bind(("127.0.0.1", QEMU_PORT)).unwrap();
        tx.send(()).unwrap();
        let (mut c, _) = l.accept().unwrap();
        c.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut got = Vec::new();
        c.read_to_end(&mut got).map(|_| got)
    });
    rx.recv().unwrap();
    let mut targs = vec![
        "--listen".to_string(),
        format!("{}:{DST_RELAY_PORT}", Nodes::ADDR_B),
    ];
    targs.extend(pki.args("target"));
    targs.extend(["--store-pid".to_string(), store.pid().to_string()]);
    let dst_relay = Relay::spawn(&nodes.b, dir.path(), "target", targs, DST_RELAY_PORT);
    let mut sargs = vec![
        "--listen".to_string(),
        format!("127.0.0.1:{SRC_RELAY_PORT}"),
        "--target-relay".to_string(),
        format!("{}:{DST_RELAY_PORT}", Nodes::ADDR_B),
        "--deliver-to".to_string(),
        format!("127.0.0.1:{QEMU_PORT}"),
    ];
    sargs.extend(pki.args("source"));
    let src_relay = Relay::spawn(&nodes.a, dir.path(), "source", sargs, SRC_RELAY_PORT);

    let mut data = vec![0u8; 8 << 20];
    rand::Rng::fill(&mut rand::rng(), &mut data[..]);
    let sent = data.clone();
    let before = nodes.veth_bytes();
    let sender = Nodes::in_ns(&nodes.a, move || {
        let mut c = std::net::TcpStream::connect(("127.0.0.1", SRC_RELAY_PORT)).unwrap();
        c.write_all(&data).unwrap();
        c.shutdown(std::net::Shutdown::Write).unwrap();
        // wait for the relay to close its side
        let mut rest = Vec::new();
        let _ = c.read_to_end(&mut rest);
    });
    sender.join().unwrap();
    let got = receiver
        .join()
        .unwrap()
        .unwrap_or_else(|e| panic!("the listener behind the target relay: {e}"));
    let veth = nodes.veth_bytes() - before;
    let logs = format!(
        "--- source ---\n{}\n--- target ---\n{}",
        src_relay.log(),
        dst_relay.log()
    );
    println!(
        "{}: {} random bytes sent, {} delivered, {:.1} MiB on the veth",
        s.name,
        sent.len(),
        got.len(),
        mib(veth)
    );
    assert_eq!(got.len(), sent.len(), "delivered length\n{logs}");
    assert!(
        got == sent,
        "delivered bytes differ from the sent ones\n{logs}"
    );
    assert!(
        veth >= sent.len() as u64,
        "only {veth} bytes on the veth for {} random bytes",
        sent.len()
    );
    for (side, r) in [("source", &src_relay), ("target", &dst_relay)] {
        let st = r
            .stats(Duration::from_secs(20))
            .unwrap_or_else(|| panic!("{side} relay wrote no stats\n{logs}"));
        println!("    {side} relay stats: {st}");
        // the source parses, so the source says why it passed the stream through
        if side == "source" {
            assert!(
                st["passthrough"].as_array().is_some_and(|a| !a.is_empty()),
                "the source relay records no pass-through reason for a stream that is not \
                 QEMU's: {st}"
            );
        }
        assert_eq!(stat(&st, "regions_referenced"), 0, "{side}: {st}");
        assert_eq!(
            stat(&st, "bytes_from_qemu"),
            sent.len() as u64,
            "{side} relay: bytes_from_qemu"
        );
    }
}

/// Kills one relay once the migration is under way: QEMU reports the migration failed and
/// the source guest runs on.
fn relay_killed(env: &Env, which: &'static str) {
    let mut s = Scenario::new(&format!("{which} relay killed"), qemu_7(env));
    // a few seconds long, so there is a middle to kill it in; the guest prints its rate
    // every second, which shows it runs afterwards
    s.max_bandwidth_mib_s = Some(16);
    s.dirty_mib_s = 1;
    s.wss_mib = 4;
    let mut w = World::new(env, &s);
    let mut killed_at = None;
    let m = w.migrate(Duration::from_secs(60), |w, info| {
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        if killed_at.is_none() && sent >= 8 * MIB {
            let r = if which == "target" {
                w.dst_relay.as_mut()
            } else {
                w.src_relay.as_mut()
            };
            r.unwrap().kill();
            killed_at = Some(sent);
        }
    });
    println!(
        "{}: killed after {:.1} MiB; QEMU: {} ({})",
        s.name,
        mib(killed_at.unwrap_or(0)),
        m.status,
        m.info["error-desc"].as_str().unwrap_or("")
    );
    assert!(
        killed_at.is_some(),
        "{}: the migration ended ({}) before 8 MiB were sent: nothing was killed",
        s.name,
        m.status
    );
    assert_eq!(
        m.status,
        "failed",
        "{}: {}\n{}",
        s.name,
        m.info,
        w.relay_logs()
    );
    w.assert_source_runs();
    let lines = |g: &Guest| g.serial().matches("rate_mib_s=").count();
    let n = lines(&w.src);
    let deadline = Instant::now() + Duration::from_secs(30);
    while lines(&w.src) <= n + 1 {
        assert!(
            Instant::now() < deadline,
            "{}: the source guest printed nothing new for 30 s after the failed migration",
            s.name
        );
        std::thread::sleep(Duration::from_millis(200));
    }
}

#[test]
fn target_relay_killed_mid_migration() {
    let Some(env) = prepare_relay("qemu_relay target relay killed") else {
        return;
    };
    let _one = serial();
    relay_killed(&env, "target");
}

#[test]
fn source_relay_killed_mid_migration() {
    let Some(env) = prepare_relay("qemu_relay source relay killed") else {
        return;
    };
    let _one = serial();
    relay_killed(&env, "source");
}

/// The source relay presents a certificate from another CA: the target relay refuses it,
/// the migration fails, nothing reaches the destination QEMU, the source runs on.
#[test]
fn wrong_certificate_is_refused() {
    let Some(env) = prepare_relay("qemu_relay wrong certificate") else {
        return;
    };
    let _one = serial();
    let mut s = Scenario::new("client certificate from another CA", qemu_7(&env));
    s.rogue_source_cert = true;
    let mut w = World::new(&env, &s);
    let m = w.migrate(Duration::from_secs(30), |_, _| {});
    let d = w.dst.qmp().cmd("query-migrate", json!({})).unwrap();
    println!(
        "{}: QEMU: {} ({}); destination: {}; veth {:.2} MiB",
        s.name,
        m.status,
        m.info["error-desc"].as_str().unwrap_or(""),
        d["status"],
        mib(m.veth_bytes)
    );
    assert_eq!(
        m.status,
        "failed",
        "{}: {}\n{}",
        s.name,
        m.info,
        w.relay_logs()
    );
    assert_ne!(
        d["status"], "completed",
        "{}: the destination completed a migration",
        s.name
    );
    // nothing of the guest crossed: a refused handshake is a few KiB
    assert!(
        m.veth_bytes < MIB,
        "{}: {} bytes crossed the veth although the handshake was refused",
        s.name,
        m.veth_bytes
    );
    w.assert_source_runs();
}

/// The store guest's memory is rewritten (every page) after the migration started, so
/// regions the target relay indexed no longer hold what they did: the target must notice
/// and get them from the source; RAM ends identical.
#[test]
fn store_rewritten_during_migration() {
    let Some(env) = prepare_relay("qemu_relay store rewritten") else {
        return;
    };
    let _one = serial();
    let mut s = Scenario::new("store rewritten after the scan", qemu_7(&env));
    // a few seconds long: the rewrite happens before most regions are rebuilt
    s.max_bandwidth_mib_s = Some(16);
    let mut w = World::new(&env, &s);
    // the store guest stands still, so only the test changes its memory
    w.store.qmp().cmd("stop", json!({})).unwrap();
    let before = w.content();
    let mut rewritten_at = None;
    let m = w.migrate(Duration::from_secs(180), |w, info| {
        let sent = info["ram"]["transferred"].as_u64().unwrap_or(0);
        if rewritten_at.is_none() && info["status"] == "active" && sent >= 256 << 10 {
            rewrite(&w.store.ram_path());
            rewritten_at = Some(sent);
        }
    });
    w.assert_completed_identical(&m);
    let (src_stats, dst_stats) = w.stats();
    let after = w.content();
    println!(
        "{}: rewritten after {:.2} MiB; the store held {:.1} MiB before, {:.1} MiB after; \
         veth {:.1} MiB",
        s.name,
        mib(rewritten_at.unwrap_or(0)),
        mib(before.held),
        mib(after.held),
        mib(m.veth_bytes)
    );
    println!("    source relay stats: {src_stats}");
    println!("    target relay stats: {dst_stats}");
    assert!(rewritten_at.is_some(), "{}: never rewritten", s.name);
    assert!(
        after.held < before.held / 10,
        "{}: the rewrite left {:.1} MiB held",
        s.name,
        mib(after.held)
    );
    // Referenced regions were indexed before the rewrite (the store guest was stopped, its
    // memory unchanged until then) and rebuilt after it (16 MiB/s, rewritten at 256 KiB):
    // each must have been resent. A relay that re-indexes in between may reference none.
    let referenced = stat(&src_stats, "regions_referenced");
    let resent = stat(&dst_stats, "regions_resent").max(stat(&src_stats, "regions_resent"));
    assert!(
        referenced == 0 || resent > 0,
        "{}: {referenced} regions referenced from a store rewritten before they were rebuilt, \
         none resent: source {src_stats}, target {dst_stats}",
        s.name
    );
}

/// Changes one byte in every 4 KiB page of a RAM file (through the file: the guest's shared
/// mapping sees it).
fn rewrite(path: &Path) {
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let len = f.metadata().unwrap().len();
    let mut b = [0u8; 1];
    let mut off = 0u64;
    while off < len {
        f.read_exact_at(&mut b, off + 100).unwrap();
        b[0] ^= 0x5a;
        f.write_all_at(&b, off + 100).unwrap();
        off += PAGE as u64;
    }
}
