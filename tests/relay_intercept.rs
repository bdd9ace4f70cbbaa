//! Interception in real network namespaces: a "handler" namespace (where virt-handler would
//! run) and a "target" namespace joined by a veth pair, both made by this test (root, `ip` and
//! `nft` from iproute2 and nftables). A connection from the handler namespace to a redirected
//! target port reaches the relay's socket with its original destination; every other
//! connection, and every connection once the table's owner is gone or a destination expired,
//! goes direct. And the relay pair in that path: KubeVirt's connection crosses the relays with
//! references for what the target holds, and goes direct, byte for byte, when the source relay
//! is killed or the target relay cannot be reached.

#[path = "relay/common.rs"]
mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::process::Command;
use std::time::{Duration, Instant};

use commonground::relay::intercept::ruleset::BYPASS_MARK;
use commonground::relay::intercept::{original_destination, InterceptError, NetNs, OwnedTable};

const NFT: &str = "nft";
const TARGET_IP: &str = "10.234.0.2";
const RELAY_PORT: u16 = 7443;

fn ip(args: &[&str]) {
    let out = Command::new("ip")
        .args(args)
        .output()
        .expect("ip runs (iproute2)");
    assert!(
        out.status.success(),
        "ip {}: {} (these tests need root, iproute2 and nftables: scripts/setup.sh installs them)",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr).trim()
    );
}

/// Two namespaces and a veth pair between them, removed on drop.
struct Pair {
    id: String,
    handler: String,
    target: String,
}

impl Pair {
    fn new(tag: &str) -> Pair {
        let id = format!("{}{tag}", std::process::id() % 100_000);
        let p = Pair {
            handler: format!("cg-ix-h{id}"),
            target: format!("cg-ix-t{id}"),
            id,
        };
        ip(&["netns", "add", &p.handler]);
        ip(&["netns", "add", &p.target]);
        for ns in [&p.handler, &p.target] {
            ip(&["-n", ns, "link", "set", "lo", "up"]);
        }
        p.add_path(0);
        p
    }

    /// The handler namespace's end of path `n`.
    fn handler_dev(&self, n: u8) -> String {
        format!("cgh{}{n}", self.id)
    }

    /// A veth pair between the namespaces, like one more NIC on both nodes: path `n` is
    /// 10.234.n.0/30, the handler at .1, the target at .2.
    fn add_path(&self, n: u8) {
        let (vh, vt) = (self.handler_dev(n), format!("cgt{}{n}", self.id));
        ip(&[
            "link",
            "add",
            &vh,
            "netns",
            &self.handler,
            "type",
            "veth",
            "peer",
            "name",
            &vt,
            "netns",
            &self.target,
        ]);
        for (ns, dev, host) in [(&self.handler, &vh, 1), (&self.target, &vt, 2)] {
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("10.234.{n}.{host}/30"),
                "dev",
                dev,
            ]);
            ip(&["-n", ns, "link", "set", dev, "up"]);
        }
    }

    /// Shapes what the handler sends on path `n` to `rate` (tc's token bucket).
    fn shape(&self, n: u8, rate: &str) {
        let dev = self.handler_dev(n);
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                &self.handler,
                "tc",
                "qdisc",
                "add",
                "dev",
                &dev,
            ])
            .args([
                "root", "tbf", "rate", rate, "burst", "64kb", "latency", "200ms",
            ])
            .output()
            .expect("tc runs (iproute2)");
        assert!(
            out.status.success(),
            "tc on {dev}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }

    fn ns(name: &str) -> NetNs {
        NetNs(format!("/run/netns/{name}").into())
    }

    fn handler_ns(&self) -> NetNs {
        Self::ns(&self.handler)
    }
}

impl Drop for Pair {
    fn drop(&mut self) {
        for ns in [&self.handler, &self.target] {
            let _ = Command::new("ip").args(["netns", "del", ns]).status();
        }
    }
}

/// A server on `listener` that answers every connection with `<name> <original destination>`.
fn serve(listener: std::net::TcpListener, name: &'static str) {
    listener.set_nonblocking(false).unwrap();
    std::thread::spawn(move || {
        for conn in listener.incoming() {
            let Ok(mut c) = conn else { continue };
            let local = c.local_addr().unwrap();
            // A connection that was not redirected has no original destination (no NAT
            // entry): it was going where it arrived.
            let dst = match original_destination(&c, local) {
                Ok(a) => a.to_string(),
                Err(e) if e.kind() == std::io::ErrorKind::NotFound => local.to_string(),
                Err(e) => format!("error {e}"),
            };
            let _ = writeln!(c, "{name} {dst}");
        }
    });
}

/// Connects from the handler namespace to `to` and returns the first line the server sends.
fn ask(from: &NetNs, to: &str) -> String {
    let to: SocketAddr = to.parse().unwrap();
    from.run_in(move || {
        let s = TcpStream::connect_timeout(&to, Duration::from_secs(3))
            .unwrap_or_else(|e| panic!("connect {to}: {e}"));
        s.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
        let mut line = String::new();
        BufReader::new(s).read_line(&mut line).unwrap();
        line.trim().to_string()
    })
    .unwrap()
}

/// A pair with the target's servers on ports 4444 and 4445 and the relay's socket on
/// 127.0.0.1:7443 in the handler namespace.
fn set_up(tag: &str) -> Pair {
    let p = Pair::new(tag);
    let t = Pair::ns(&p.target);
    for port in [4444, 4445] {
        serve(
            t.listen(format!("{TARGET_IP}:{port}").parse().unwrap())
                .unwrap(),
            "direct",
        );
    }
    let relay = p
        .handler_ns()
        .listen(format!("127.0.0.1:{RELAY_PORT}").parse().unwrap())
        .unwrap();
    serve(relay, "relay");
    p
}

fn wait_until(what: &str, mut ok: impl FnMut() -> bool) {
    let deadline = Instant::now() + Duration::from_secs(10);
    while !ok() {
        assert!(Instant::now() < deadline, "{what}: not after 10 s");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn tables_in(ns: &str) -> String {
    let o = Command::new("ip")
        .args(["netns", "exec", ns, NFT, "list", "tables"])
        .output()
        .unwrap();
    String::from_utf8_lossy(&o.stdout).into_owned()
}

#[test]
fn redirected_connections_reach_the_relay_with_their_destination_and_fail_open_when_the_owner_dies()
{
    let p = set_up("a");
    let h = p.handler_ns();
    let direct = format!("direct {TARGET_IP}:4444");
    assert_eq!(ask(&h, "10.234.0.2:4444"), direct, "no table: direct");

    let mut table = OwnedTable::create(&h, NFT, RELAY_PORT).unwrap();
    assert_eq!(
        ask(&h, "10.234.0.2:4444"),
        direct,
        "a table with no destination redirects nothing"
    );
    let target: SocketAddr = "10.234.0.2:4444".parse().unwrap();
    table.redirect(&[target], Duration::from_secs(60)).unwrap();
    assert_eq!(
        table.targets().unwrap().into_iter().collect::<Vec<_>>(),
        vec![target]
    );
    assert_eq!(
        ask(&h, "10.234.0.2:4444"),
        "relay 10.234.0.2:4444",
        "redirected, and the relay learns where the connection was going"
    );
    assert_eq!(
        ask(&h, "10.234.0.2:4445"),
        format!("direct {TARGET_IP}:4445"),
        "other ports go direct"
    );
    // The relay's own connections from the namespace carry the bypass mark and go direct.
    let own = h
        .connect(target, BYPASS_MARK, Duration::from_secs(3))
        .unwrap();
    own.set_nonblocking(false).unwrap();
    own.set_read_timeout(Some(Duration::from_secs(3))).unwrap();
    let mut line = String::new();
    BufReader::new(own).read_line(&mut line).unwrap();
    assert_eq!(
        line.trim(),
        direct,
        "the relay's own connection is not redirected"
    );
    // Adding it again only refreshes its timeout.
    table.redirect(&[target], Duration::from_secs(90)).unwrap();
    table.release(&[target]).unwrap();
    assert_eq!(ask(&h, "10.234.0.2:4444"), direct, "released: direct");
    // Releasing what is not there is not an error.
    table.release(&[target]).unwrap();

    // The owner dies without a word (an agent killed by the kernel): the kernel drops the
    // table with it, and the next connection goes direct.
    table.redirect(&[target], Duration::from_secs(60)).unwrap();
    assert_eq!(ask(&h, "10.234.0.2:4444"), "relay 10.234.0.2:4444");
    // SAFETY: signals the nft process this test started.
    unsafe { libc::kill(table.owner_pid(), libc::SIGKILL) };
    wait_until("the table goes with its owner", || {
        !tables_in(&p.handler).contains("commonground_relay")
    });
    assert_eq!(ask(&h, "10.234.0.2:4444"), direct, "the owner died: direct");
    assert!(matches!(
        table.redirect(&[target], Duration::from_secs(60)),
        Err(InterceptError::Nft(_))
    ));
    drop(table);

    // A new agent starts clean.
    let mut again = OwnedTable::create(&h, NFT, RELAY_PORT).unwrap();
    again.redirect(&[target], Duration::from_secs(60)).unwrap();
    assert_eq!(ask(&h, "10.234.0.2:4444"), "relay 10.234.0.2:4444");
    drop(again);
    wait_until("a dropped table is removed", || {
        !tables_in(&p.handler).contains("commonground_relay")
    });
    assert_eq!(ask(&h, "10.234.0.2:4444"), direct);
}

#[test]
fn a_destination_expires_on_its_own_and_a_second_owner_is_refused() {
    let p = set_up("b");
    let h = p.handler_ns();
    let mut table = OwnedTable::create(&h, NFT, RELAY_PORT).unwrap();
    let target: SocketAddr = "10.234.0.2:4444".parse().unwrap();
    table.redirect(&[target], Duration::from_secs(1)).unwrap();
    assert_eq!(ask(&h, "10.234.0.2:4444"), "relay 10.234.0.2:4444");
    wait_until("the destination expires", || {
        table.targets().unwrap().is_empty()
    });
    assert_eq!(
        ask(&h, "10.234.0.2:4444"),
        format!("direct {TARGET_IP}:4444")
    );

    // Another agent serving the same namespace cannot take the table over.
    match OwnedTable::create(&h, NFT, RELAY_PORT) {
        Err(InterceptError::Refused(why)) => {
            assert!(why.contains("Operation not permitted"), "{why}")
        }
        other => panic!("a second owner: {other:?}"),
    }
    // The first one still works.
    table.redirect(&[target], Duration::from_secs(60)).unwrap();
    assert_eq!(ask(&h, "10.234.0.2:4444"), "relay 10.234.0.2:4444");
}

/// The target virt-handler's migration port in the target namespace: accepts connections one
/// after the other and passes on what each delivered.
fn fake_handler(ns: &NetNs, addr: &str, connections: usize) -> std::sync::mpsc::Receiver<Vec<u8>> {
    let listener = ns.listen(addr.parse().unwrap()).unwrap();
    listener.set_nonblocking(false).unwrap();
    common::collect_deliveries(listener, connections)
}

/// The source virt-handler: from its namespace, sends `bytes` to `to`, closes its side and
/// waits for the other side to close.
fn migrate(from: &NetNs, to: &str, bytes: Vec<u8>) {
    let to: SocketAddr = to.parse().unwrap();
    from.run_in(move || {
        let mut s = TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap();
        s.write_all(&bytes).unwrap();
        s.shutdown(std::net::Shutdown::Write).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    })
    .unwrap();
}

/// A target relay in the pair's target namespace listening on `ip`, its store this process.
fn target_relay_in(dir: &std::path::Path, p: &Pair, c: &common::Certs, ip: &str) -> common::Relay {
    common::target_relay(dir, Some(&p.target), ip, c, &[std::process::id()], &[])
}

/// `commonground relay source` intercepting in the pair's handler namespace, routing the
/// target's port 4444 through `target_relay`.
fn intercepting_source(
    dir: &std::path::Path,
    p: &Pair,
    c: &common::Certs,
    target_relay: &str,
) -> common::Relay {
    intercepting_source_via(dir, p, c, &[target_relay])
}

/// The same, spreading the migration over the target relay's addresses `paths`.
fn intercepting_source_via(
    dir: &std::path::Path,
    p: &Pair,
    c: &common::Certs,
    paths: &[&str],
) -> common::Relay {
    common::spawn_relay(
        dir,
        None,
        "source",
        format!("127.0.0.1:{RELAY_PORT}").parse().unwrap(),
        (&c.client_cert, &c.client_key, &c.ca),
        vec![
            "--intercept-netns".into(),
            format!("/run/netns/{}", p.handler),
            "--route".into(),
            format!("{TARGET_IP}:4444={}", paths.join(",")),
        ],
    )
}

#[test]
fn a_kubevirt_connection_crosses_the_relays_and_goes_direct_once_the_source_relay_is_killed() {
    let p = Pair::new("c");
    let (h, t) = (p.handler_ns(), Pair::ns(&p.target));
    let dir = tempfile::tempdir().unwrap();
    let c = common::certs(dir.path(), "ca");
    let (stream, contents) = common::guest(64, 7);
    let held: Vec<_> = contents.iter().step_by(2).cloned().collect();
    let _memory = common::Memory::new(&held);
    let target = target_relay_in(dir.path(), &p, &c, TARGET_IP);
    let delivered = fake_handler(&t, "10.234.0.2:4444", 2);
    let mut source = intercepting_source(dir.path(), &p, &c, &target.addr.to_string());

    migrate(&h, "10.234.0.2:4444", stream.clone());
    let got = common::next_delivery(&delivered, 60, &[&source, &target]);
    assert!(got == stream, "delivered bytes differ from the stream");
    let s = source.wait_stats(1);
    assert_eq!(
        s["regions_referenced"].as_u64(),
        Some(32),
        "half the regions cross as references: {s}"
    );
    let wire = s["bytes_on_wire"].as_u64().unwrap();
    println!(
        "intercepted stream {} B, on the wire {wire} B ({:.1}%)",
        stream.len(),
        100.0 * wire as f64 / stream.len() as f64
    );
    assert!(wire < stream.len() as u64 * 55 / 100, "{s}");

    // SIGKILL: no cleanup runs, the kernel drops the table with the relay's nft child.
    let _ = source.child.kill();
    let _ = source.child.wait();
    wait_until("the table goes with the relay", || {
        !tables_in(&p.handler).contains("commonground_relay")
    });
    migrate(&h, "10.234.0.2:4444", stream.clone());
    let got = delivered
        .recv_timeout(Duration::from_secs(30))
        .expect("delivered direct");
    assert!(got == stream, "the direct migration delivered other bytes");
}

#[test]
fn an_unreachable_target_relay_sends_the_migration_direct_byte_for_byte() {
    let p = Pair::new("d");
    let (h, t) = (p.handler_ns(), Pair::ns(&p.target));
    let dir = tempfile::tempdir().unwrap();
    let c = common::certs(dir.path(), "ca");
    let (stream, _) = common::guest(16, 3);
    let delivered = fake_handler(&t, "10.234.0.2:4444", 1);
    // Nothing listens on the target relay's port.
    let source = intercepting_source(dir.path(), &p, &c, "10.234.0.2:7999");
    migrate(&h, "10.234.0.2:4444", stream.clone());
    let got = delivered
        .recv_timeout(Duration::from_secs(30))
        .unwrap_or_else(|_| panic!("nothing delivered; source log:\n{}", source.log_text()));
    assert!(got == stream, "delivered bytes differ from the stream");
    assert!(
        source.log_text().contains("the migration goes direct"),
        "{}",
        source.log_text()
    );
}

/// A process standing for virt-handler inside `ns`: its network namespace is where the path
/// opens. Killed on drop.
struct FakeHandler(std::process::Child);

impl FakeHandler {
    fn start(ns: &str) -> FakeHandler {
        FakeHandler(
            Command::new("ip")
                .args(["netns", "exec", ns, "sleep", "600"])
                .spawn()
                .expect("sleep runs in the namespace"),
        )
    }

    fn pid(&self) -> i32 {
        self.0.id() as i32
    }
}

impl Drop for FakeHandler {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn counter(registry: &prometheus::Registry, name: &str, labels: &[(&str, &str)]) -> u64 {
    registry
        .gather()
        .iter()
        .filter(|f| f.name() == name)
        .flat_map(|f| f.get_metric().iter())
        .filter(|m| {
            labels.iter().all(|(k, v)| {
                m.get_label()
                    .iter()
                    .any(|l| l.name() == *k && l.value() == *v)
            })
        })
        .map(|m| m.get_counter().get_value() as u64)
        .sum()
}

/// The agent's relay path on two "nodes" (two virt-handler namespaces): the source's outgoing
/// migration, once taken, crosses both relay ends with references for what the target holds;
/// once let go, and after the path is closed, it goes direct.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_path_takes_a_migration_lets_it_go_and_closes_clean() {
    use commonground::relay::path::{NodePath, PathConfig};
    use commonground::relay::target::{StoreSource, TargetConfig};
    let p = Pair::new("e");
    let (h, t) = (p.handler_ns(), Pair::ns(&p.target));
    let (src_handler, dst_handler) = (
        FakeHandler::start(&p.handler),
        FakeHandler::start(&p.target),
    );
    // Both processes are in their namespaces once `ip netns exec` has exec'd sleep.
    wait_until("the fake handlers are in their namespaces", || {
        [src_handler.pid(), dst_handler.pid()].iter().all(|pid| {
            std::fs::read_to_string(format!("/proc/{pid}/comm")).is_ok_and(|c| c.trim() == "sleep")
        })
    });
    let dir = tempfile::tempdir().unwrap();
    let c = common::certs(dir.path(), "ca");
    let (stream, contents) = common::guest(64, 11);
    let held: Vec<_> = contents.iter().step_by(2).cloned().collect();
    let _memory = common::Memory::new(&held);

    let registry = prometheus::Registry::new();
    let tls = commonground::relay::tls::TlsArgs {
        tls_cert: c.server_cert.clone(),
        tls_key: c.server_key.clone(),
        tls_ca: c.ca.clone(),
    };
    let (_, parts) = commonground::relay::start_node_target(
        commonground::relay::NodeRelay {
            listen: "127.0.0.1:0".into(),
            advertise: "127.0.0.1:1".into(),
            tls,
            region_pages: 16,
            node: "unused".into(),
            process_node_arg: None,
        },
        commonground::plan::region::ClusterKey::development(),
        &registry,
    )
    .await
    .unwrap();
    // The target's store is this process's memory.
    let target = TargetConfig {
        acceptor: parts.target.acceptor.clone(),
        namer: parts.target.namer.clone(),
        store_source: StoreSource::Pids(vec![std::process::id() as i32]),
        store_max_age: Duration::from_secs(60),
        stats_json: None,
        metrics: parts.target.metrics.clone(),
        deliver_netns: None,
    };
    let config = PathConfig {
        relay_port: 7443,
        intercept_port: 7444,
        nft: NFT.into(),
        redirect_timeout: Duration::from_secs(60),
    };
    let mut src = NodePath::open(
        src_handler.pid(),
        config.clone(),
        parts.source.clone(),
        &target,
    )
    .unwrap();
    let _dst = NodePath::open(dst_handler.pid(), config, parts.source.clone(), &target).unwrap();
    let delivered = fake_handler(&t, "10.234.0.2:4444", 3);
    let dest: SocketAddr = "10.234.0.2:4444".parse().unwrap();
    let run = |stream: Vec<u8>| {
        let h = h.clone();
        tokio::task::spawn_blocking(move || migrate(&h, "10.234.0.2:4444", stream))
    };

    src.apply(&[(dest, "m-1".into(), "10.234.0.2:7443".into())], &[])
        .unwrap();
    run(stream.clone()).await.unwrap();
    let got = delivered
        .recv_timeout(Duration::from_secs(60))
        .expect("delivered through the relays");
    assert!(got == stream, "delivered bytes differ from the stream");
    let referenced_so_far = || {
        counter(
            &registry,
            "commonground_relay_regions_total",
            &[("side", "source"), ("outcome", "referenced")],
        )
    };
    let referenced = referenced_so_far();
    assert_eq!(referenced, 32, "half the regions crossed as references");

    // Let go: the next migration to the same port goes direct.
    src.apply(&[], &[dest]).unwrap();
    assert!(src.current().is_empty());
    run(stream.clone()).await.unwrap();
    assert!(delivered.recv_timeout(Duration::from_secs(30)).unwrap() == stream);
    assert_eq!(
        referenced_so_far(),
        referenced,
        "the direct migration did not cross the relays"
    );

    // The target end delivers only to its own namespace's addresses: a route that names
    // another (here the source's own address) is refused there, and the migration goes direct.
    assert!(t.is_local("10.234.0.2".parse().unwrap()).unwrap());
    assert!(!t.is_local("10.234.0.1".parse().unwrap()).unwrap());
    let foreign = fake_handler(&h, "10.234.0.1:5555", 1);
    let elsewhere: SocketAddr = "10.234.0.1:5555".parse().unwrap();
    src.apply(&[(elsewhere, "m-x".into(), "10.234.0.2:7443".into())], &[])
        .unwrap();
    {
        let h = h.clone();
        let stream = stream.clone();
        tokio::task::spawn_blocking(move || migrate(&h, "10.234.0.1:5555", stream))
            .await
            .unwrap();
    }
    assert!(foreign.recv_timeout(Duration::from_secs(30)).unwrap() == stream);
    assert_eq!(
        referenced_so_far(),
        referenced,
        "a refused delivery crossed no references"
    );
    src.apply(&[], &[elsewhere]).unwrap();

    // Taken again, then the path closes (the agent stops): the table goes, migrations go direct.
    src.apply(&[(dest, "m-2".into(), "10.234.0.2:7443".into())], &[])
        .unwrap();
    drop(src);
    wait_until("the table goes with the path", || {
        !tables_in(&p.handler).contains("commonground_relay")
    });
    run(stream.clone()).await.unwrap();
    assert!(delivered.recv_timeout(Duration::from_secs(30)).unwrap() == stream);
}

/// QEMU's main channel and four multifd channels of 4 MiB each, none of it held by the target.
fn five_channels() -> Vec<Vec<u8>> {
    let mut channels = vec![common::guest(8, 11).0];
    for _ in 0..4 {
        channels.push(commonground::relay::stream::fixtures::multifd_stream(
            &[(0, 128); 8],
            0,
        ));
    }
    channels
}

/// The source virt-handler of a multifd migration: opens the channels to `to` one after the
/// other (as QEMU does), sends them all at once, and returns when every one was answered.
fn migrate_channels(from: &NetNs, to: &str, channels: Vec<Vec<u8>>) -> Duration {
    let to: SocketAddr = to.parse().unwrap();
    from.run_in(move || {
        let start = Instant::now();
        let mut open = Vec::new();
        for _ in &channels {
            open.push(TcpStream::connect_timeout(&to, Duration::from_secs(5)).unwrap());
            std::thread::sleep(Duration::from_millis(30));
        }
        let senders: Vec<_> = open
            .into_iter()
            .zip(channels)
            .map(|(mut s, bytes)| {
                std::thread::spawn(move || {
                    s.write_all(&bytes).unwrap();
                    s.shutdown(std::net::Shutdown::Write).unwrap();
                    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
                    let mut rest = Vec::new();
                    let _ = s.read_to_end(&mut rest);
                })
            })
            .collect();
        for t in senders {
            t.join().unwrap();
        }
        start.elapsed()
    })
    .unwrap()
}

fn sorted(mut v: Vec<Vec<u8>>) -> Vec<Vec<u8>> {
    v.sort();
    v
}

#[test]
fn two_shaped_paths_carry_one_migration_each_its_share_at_its_rate() {
    // Each path is shaped to 6 MB/s from the handler's side.
    const RATE: f64 = 6e6;
    let p = Pair::new("p");
    p.add_path(1);
    p.shape(0, "48mbit");
    p.shape(1, "48mbit");
    let (h, t) = (p.handler_ns(), Pair::ns(&p.target));
    let dir = tempfile::tempdir().unwrap();
    let c = common::certs(dir.path(), "ca");
    // The target relay listens on both paths (every address of the target namespace).
    let target = target_relay_in(dir.path(), &p, &c, "0.0.0.0");
    let port = target.addr.port();
    let (first, second) = (format!("10.234.0.2:{port}"), format!("10.234.1.2:{port}"));
    let channels = five_channels();
    let delivered = fake_handler(&t, "10.234.0.2:4444", 2 * channels.len());
    let collect = |n: usize| -> Vec<Vec<u8>> {
        (0..n)
            .map(|_| {
                delivered
                    .recv_timeout(Duration::from_secs(60))
                    .expect("delivered")
            })
            .collect()
    };

    // One path.
    let mut one = intercepting_source_via(dir.path(), &p, &c, &[&first]);
    let one_wall = migrate_channels(&h, "10.234.0.2:4444", channels.clone());
    assert!(
        sorted(collect(channels.len())) == sorted(channels.clone()),
        "one path: bytes differ"
    );
    let s1 = one.wait_stats(1);
    let _ = one.child.kill();
    let _ = one.child.wait();
    wait_until("the first source's table is gone", || {
        !tables_in(&p.handler).contains("commonground_relay")
    });

    // Two paths.
    let two = intercepting_source_via(dir.path(), &p, &c, &[&first, &second]);
    let two_wall = migrate_channels(&h, "10.234.0.2:4444", channels.clone());
    assert!(
        sorted(collect(channels.len())) == sorted(channels.clone()),
        "two paths: bytes differ"
    );
    // Both sources listen on the same port, so they append to the same statistics file.
    let s2 = two.wait_stats(2);

    let rate = |s: &serde_json::Value, path: &str| -> f64 {
        s["path_bytes"][path].as_u64().unwrap_or(0) as f64 / s["seconds"].as_f64().unwrap()
    };
    let (r1, r2a, r2b) = (rate(&s1, &first), rate(&s2, &first), rate(&s2, &second));
    println!(
        "one path: {:.1} MB/s over {one_wall:?}; two paths: {:.1} + {:.1} MB/s over {two_wall:?} (each shaped to {:.1} MB/s)",
        r1 / 1e6,
        r2a / 1e6,
        r2b / 1e6,
        RATE / 1e6
    );
    // The shaping holds: no path carries more than its rate (the burst and the reverse
    // direction allowed for).
    for r in [r1, r2a, r2b] {
        assert!(
            r < RATE * 1.2,
            "a path ran above its shaped rate: {s1} {s2}"
        );
    }
    // Connections 0, 2 and 4 on the first path, 1 and 3 on the second: both carry a share.
    let (a, b) = (
        s2["path_bytes"][&first].as_u64().unwrap(),
        s2["path_bytes"][&second].as_u64().unwrap(),
    );
    assert!(a > (a + b) / 3 && b > (a + b) / 3, "{s2}");
    // And together they move the migration faster than one path can.
    assert!(
        r2a + r2b > 1.5 * r1,
        "two paths {r2a} + {r2b} against one {r1}: {s1} {s2}"
    );
    assert!(s2.get("path_fallbacks").is_none(), "{s2}");
}
