//! The relay pair as processes on loopback, with this test process as the target node's
//! memory and plain sockets playing the two QEMUs: exact delivery, references for held
//! regions, resends when the memory changed, connection order, pass-through, refusal of a
//! foreign certificate, and a relay that dies.

#[path = "relay/common.rs"]
mod common;

use std::io::{Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::Duration;

use common::{certs, guest, source_relay, target_relay, Memory};
use commonground::relay::stream::fixtures::multifd_stream;

/// A target relay on loopback whose store is this process's memory.
fn local_target(dir: &std::path::Path, c: &common::Certs, extra: &[&str]) -> common::Relay {
    target_relay(dir, None, "127.0.0.1", c, &[std::process::id()], extra)
}

/// The target QEMU of consecutive migrations: accepts connections one after the other and
/// passes on what each delivered.
fn fake_target(connections: usize) -> (String, mpsc::Receiver<Vec<u8>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    (addr, common::collect_deliveries(listener, connections))
}

/// The source QEMU: sends a stream, closes its side, waits for the other side to close.
fn send(addr: std::net::SocketAddr, bytes: &[u8]) -> TcpStream {
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(bytes).unwrap();
    s
}

fn finish(mut s: TcpStream) {
    s.shutdown(Shutdown::Write).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(60))).unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
}

fn num(v: &serde_json::Value, k: &str) -> u64 {
    v[k].as_u64().unwrap_or_else(|| panic!("{k} in {v}"))
}

#[test]
fn held_regions_cross_as_references_and_the_target_receives_the_exact_stream() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let (stream, contents) = guest(64, 1);
    let held: Vec<_> = contents.iter().step_by(2).cloned().collect();
    let _memory = Memory::new(&held);
    let target = local_target(dir.path(), &c, &[]);
    let (deliver, delivered) = fake_target(1);
    let source = source_relay(dir.path(), None, &c, target.addr, &deliver, &[]);

    finish(send(source.addr, &stream));
    let got = delivered.recv_timeout(Duration::from_secs(60)).unwrap();
    assert_eq!(got.len(), stream.len());
    assert!(got == stream, "delivered bytes differ from the stream");

    let s = source.wait_stats(1);
    let t = target.wait_stats(1);
    assert_eq!(num(&s, "regions_referenced"), 32, "{s}");
    assert_eq!(num(&t, "regions_referenced"), 32, "{t}");
    assert_eq!(num(&t, "regions_resent"), 0, "{t}");
    assert_eq!(num(&s, "bytes_from_qemu"), stream.len() as u64);
    assert_eq!(num(&t, "bytes_from_qemu"), stream.len() as u64);
    // Half the pages stay home; the wire carries the other half, the filter and TLS.
    let wire = num(&s, "bytes_on_wire");
    println!(
        "stream {} B, on the wire {} B ({:.1}%)",
        stream.len(),
        wire,
        100.0 * wire as f64 / stream.len() as f64
    );
    assert!(wire < stream.len() as u64 * 55 / 100, "{s}");
    assert!(wire > stream.len() as u64 * 45 / 100, "{s}");
}

#[test]
fn memory_changed_since_the_index_is_resent_and_delivery_stays_exact() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let (stream, contents) = guest(16, 1000);
    let mut memory = Memory::new(&contents);
    // The index lives for the whole test: the second migration uses the first one's.
    let target = local_target(dir.path(), &c, &["--store-max-age", "3600"]);
    let (deliver, delivered) = fake_target(2);
    let source = source_relay(dir.path(), None, &c, target.addr, &deliver, &[]);
    finish(send(source.addr, &stream));
    assert!(delivered.recv_timeout(Duration::from_secs(60)).unwrap() == stream);
    assert_eq!(num(&target.wait_stats(1), "regions_resent"), 0);

    // Rewrite a quarter of the regions after they were indexed.
    for i in (0..16).step_by(4) {
        memory.region_mut(i)[123] ^= 0x5a;
    }
    finish(send(source.addr, &stream));
    let got = common::next_delivery(&delivered, 60, &[&source, &target]);
    assert!(got == stream);
    let t = target.wait_stats(2);
    assert_eq!(num(&t, "regions_referenced"), 16, "{t}");
    assert_eq!(num(&t, "regions_resent"), 4, "{t}");
    assert_eq!(num(&source.wait_stats(2), "regions_resent"), 4);
}

/// QEMU's main channel and three multifd channels, with the memory of the target node.
fn four_channels() -> ([Vec<u8>; 4], Memory) {
    let (main, contents) = guest(8, 50_000);
    let memory = Memory::new(&contents);
    let channels = [
        main,
        multifd_stream(&[(0, 128)], 0),
        multifd_stream(&[(128, 64)], 0),
        multifd_stream(&[(192, 64)], 0),
    ];
    (channels, memory)
}

/// Opens the channels through the source relay one after the other, as QEMU does, and checks
/// that the target QEMU (`listener`) accepts them in that order, each with its own stream.
fn migrate_channels(source: std::net::SocketAddr, listener: &TcpListener, channels: &[Vec<u8>]) {
    let mut open = Vec::new();
    for ch in channels {
        open.push(send(source, &ch[..64]));
        std::thread::sleep(Duration::from_millis(50));
    }
    let mut accepted = Vec::new();
    for _ in 0..channels.len() {
        accepted.push(listener.accept().unwrap().0);
    }
    for (s, ch) in open.iter_mut().zip(channels) {
        s.write_all(&ch[64..]).unwrap();
    }
    for s in open {
        s.shutdown(Shutdown::Write).unwrap();
    }
    for (mut a, ch) in accepted.into_iter().zip(channels) {
        let mut got = Vec::new();
        a.read_to_end(&mut got).unwrap();
        assert!(
            got == *ch,
            "a channel was delivered on another connection or altered"
        );
    }
}

#[test]
fn connections_reach_the_target_in_the_order_the_source_accepted_them() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let (channels, _memory) = four_channels();
    let target = local_target(dir.path(), &c, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let deliver = listener.local_addr().unwrap().to_string();
    let source = source_relay(dir.path(), None, &c, target.addr, &deliver, &[]);
    migrate_channels(source.addr, &listener, &channels);
    let s = source.wait_stats(1);
    assert_eq!(num(&s, "connections"), 4, "{s}");
    assert!(num(&s, "regions_referenced") > 0, "{s}");
}

/// A second network path to the target relay: a TCP forwarder on a port of its own, counting
/// the connections it carries and the bytes it carries towards the target.
fn second_path(target: std::net::SocketAddr) -> (String, Arc<AtomicU64>, Arc<AtomicU64>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (connections, bytes) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let (conns, sent) = (connections.clone(), bytes.clone());
    std::thread::spawn(move || {
        for inbound in listener.incoming() {
            let Ok(mut inbound) = inbound else { return };
            conns.fetch_add(1, Ordering::SeqCst);
            let mut outbound = TcpStream::connect(target).unwrap();
            let (mut back_in, mut back_out) =
                (inbound.try_clone().unwrap(), outbound.try_clone().unwrap());
            let sent = sent.clone();
            std::thread::spawn(move || {
                let mut buf = [0u8; 65536];
                while let Ok(n) = inbound.read(&mut buf) {
                    if n == 0 || outbound.write_all(&buf[..n]).is_err() {
                        break;
                    }
                    sent.fetch_add(n as u64, Ordering::SeqCst);
                }
                let _ = outbound.shutdown(Shutdown::Write);
            });
            std::thread::spawn(move || {
                let _ = std::io::copy(&mut back_out, &mut back_in);
                let _ = back_in.shutdown(Shutdown::Write);
            });
        }
    });
    (addr, connections, bytes)
}

/// A migration of four channels through a source relay whose `--extra-path` is made from
/// the target relay's address: the temporary directory (the relays' files), the target relay,
/// the extra path and the source's statistics.
fn migrate_with_extra_path(
    extra: impl FnOnce(std::net::SocketAddr) -> String,
) -> (tempfile::TempDir, common::Relay, String, serde_json::Value) {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let (channels, _memory) = four_channels();
    let target = local_target(dir.path(), &c, &[]);
    let path = extra(target.addr);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let deliver = listener.local_addr().unwrap().to_string();
    let source = source_relay(
        dir.path(),
        None,
        &c,
        target.addr,
        &deliver,
        &["--extra-path", &path],
    );
    migrate_channels(source.addr, &listener, &channels);
    let stats = source.wait_stats(1);
    (dir, target, path, stats)
}

#[test]
fn a_migration_spread_over_two_paths_arrives_exact_and_in_order_with_each_paths_bytes_counted() {
    let mut counters = None;
    let (_dir, target, path, s) = migrate_with_extra_path(|target| {
        let (path, connections, bytes) = second_path(target);
        counters = Some((connections, bytes));
        path
    });
    let (connections, bytes) = counters.unwrap();
    assert_eq!(num(&s, "connections"), 4, "{s}");
    // Connections 1 and 3 (two multifd channels) took the second path, 0 and 2 the first.
    assert_eq!(connections.load(Ordering::SeqCst), 2, "{s}");
    let per_path = s["path_bytes"].as_object().expect("path_bytes");
    assert_eq!(per_path.len(), 2, "{s}");
    let on_second = per_path[&path].as_u64().unwrap();
    let on_first = per_path[&target.addr.to_string()].as_u64().unwrap();
    assert_eq!(on_first + on_second, num(&s, "bytes_on_wire"), "{s}");
    // The path's own count (towards the target only) is within what the relay counted both ways.
    let forwarded = bytes.load(Ordering::SeqCst);
    assert!(
        forwarded > 0 && forwarded <= on_second,
        "{forwarded} vs {s}"
    );
    assert!(s.get("path_fallbacks").is_none(), "{s}");
    assert_eq!(num(&target.wait_stats(1), "connections"), 4);
}

#[test]
fn an_extra_path_that_cannot_be_reached_sends_its_connections_over_the_first() {
    // A port nobody listens on: the path is down.
    let (_dir, target, _, s) = migrate_with_extra_path(|_| {
        TcpListener::bind("127.0.0.1:0")
            .unwrap()
            .local_addr()
            .unwrap()
            .to_string()
    });
    assert_eq!(num(&s, "path_fallbacks"), 2, "{s}");
    assert!(s["errors"].as_array().unwrap().is_empty(), "{s}");
    let per_path = s["path_bytes"].as_object().unwrap();
    assert_eq!(
        per_path.keys().collect::<Vec<_>>(),
        vec![&target.addr.to_string()],
        "{s}"
    );
    assert!(num(&s, "regions_referenced") > 0, "{s}");
}

#[test]
fn a_stream_that_is_not_qemus_passes_through_byte_for_byte() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let target = local_target(dir.path(), &c, &[]);
    let (deliver, delivered) = fake_target(1);
    let source = source_relay(dir.path(), None, &c, target.addr, &deliver, &[]);
    let junk: Vec<u8> = (0..3_000_000u32)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    finish(send(source.addr, &junk));
    assert!(delivered.recv_timeout(Duration::from_secs(60)).unwrap() == junk);
    let s = source.wait_stats(1);
    let reasons = s["passthrough"].as_array().unwrap();
    assert!(
        reasons[0]
            .as_str()
            .unwrap()
            .contains("not a QEMU migration stream"),
        "{s}"
    );
}

#[test]
fn a_certificate_from_another_ca_is_refused_and_the_source_connection_closed() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let other = certs(dir.path(), "other");
    let target = local_target(dir.path(), &c, &[]);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    listener.set_nonblocking(true).unwrap();
    let deliver = listener.local_addr().unwrap().to_string();
    let source = source_relay(dir.path(), None, &other, target.addr, &deliver, &[]);
    let (stream, _) = guest(4, 7);
    let mut s = TcpStream::connect(source.addr).unwrap();
    let _ = s.write_all(&stream);
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    let mut buf = [0u8; 16];
    // The source relay closes QEMU's connection: QEMU would fail the migration.
    let closed = matches!(s.read(&mut buf), Ok(0) | Err(_));
    assert!(closed);
    assert!(
        listener.accept().is_err(),
        "nothing reached the target QEMU"
    );
    let st = source.wait_stats(1);
    assert!(st["errors"][0].as_str().unwrap().contains("TLS"), "{st}");
}

#[test]
fn a_target_relay_that_dies_mid_stream_closes_the_source_connection() {
    let dir = tempfile::tempdir().unwrap();
    let c = certs(dir.path(), "ca");
    let mut target = local_target(dir.path(), &c, &[]);
    let (deliver, delivered) = fake_target(1);
    let source = source_relay(dir.path(), None, &c, target.addr, &deliver, &[]);
    let (stream, _) = guest(64, 9);
    let mut s = send(source.addr, &stream[..stream.len() / 2]);
    std::thread::sleep(Duration::from_millis(300));
    target.child.kill().unwrap();
    target.child.wait().unwrap();
    s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
    // Writing more and reading: the connection is closed under QEMU's feet, not left hanging.
    let _ = s.write_all(&stream[stream.len() / 2..]);
    let mut buf = [0u8; 16];
    assert!(matches!(s.read(&mut buf), Ok(0) | Err(_)));
    // The target QEMU got a cut stream, never a complete one.
    let got = delivered.recv_timeout(Duration::from_secs(30)).unwrap();
    assert!(got.len() < stream.len());
    assert!(stream.starts_with(&got));
}
