//! The target relay: accepts the source relay's mutual-TLS connections, opens one connection
//! to the target QEMU's incoming address for each, in the order the source accepted them
//! (QEMU takes the first as the main channel), and delivers exactly the stream QEMU would have
//! received directly, rebuilding referenced regions from this node's memory.
//!
//! On the first connection of a migration it indexes the node's memory (if the last index is
//! older than `store_max_age`) and sends the source the identities it holds.

use std::collections::HashMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::sync::{mpsc, watch, Notify};
use tokio_rustls::TlsAcceptor;

use super::net::{ByteCounter, Conn, Counted, Endpoint, Listener};
use super::protocol::{Frame, FILTER_CHUNK};
use super::rebuild::{Action, Rebuilder};
use super::stats::{MigrationStats, RelayMetrics};
use super::store::ContentStore;
use super::stream::RegionNamer;
use super::{write_frames, FrameReader, RelayError};

const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a connection waits for the one before it to reach QEMU before it goes anyway.
const ORDER_WAIT: Duration = Duration::from_secs(10);
const STORE_WAIT: Duration = Duration::from_secs(60);
/// How long, after both sides' QEMUs are done writing, the return path may still drain.
const LINGER: Duration = Duration::from_secs(30);

/// Which memory the store indexes.
#[derive(Clone, Debug)]
pub enum StoreSource {
    Pids(Vec<i32>),
    /// Every KubeVirt QEMU process of this node: on this host, or (several fake nodes on one
    /// host, as in the e2e suite) those whose command line has `process_node_arg` followed by
    /// the node name.
    Node {
        node: String,
        process_node_arg: Option<String>,
    },
}

pub struct TargetConfig {
    pub acceptor: TlsAcceptor,
    pub namer: Arc<RegionNamer>,
    pub store_source: StoreSource,
    pub store_max_age: Duration,
    pub stats_json: Option<std::path::PathBuf>,
    pub metrics: RelayMetrics,
    /// Deliver from inside this network namespace (the target virt-handler's, when the relay
    /// is in KubeVirt's path) instead of the relay's own.
    pub deliver_netns: Option<super::intercept::NetNs>,
}

struct Session {
    started: Instant,
    /// Connections of this migration that reached QEMU, counted in order.
    connected: AtomicU32,
    turn: Notify,
    active: AtomicUsize,
    store: watch::Sender<Option<Arc<ContentStore>>>,
    stats: Mutex<MigrationStats>,
}

#[derive(Default)]
struct Shared {
    sessions: Mutex<HashMap<u64, Arc<Session>>>,
    store: tokio::sync::Mutex<Option<Arc<ContentStore>>>,
}

pub async fn serve(listener: Listener, config: Arc<TargetConfig>) -> Result<(), RelayError> {
    let shared = Arc::new(Shared::default());
    loop {
        let conn = listener.accept().await.map_err(RelayError::Accept)?;
        let config = config.clone();
        let shared = shared.clone();
        tokio::spawn(async move {
            if let Err(e) = accept_connection(conn, &shared, &config).await {
                tracing::warn!(error = %e, "relay connection refused or failed");
            }
        });
    }
}

async fn accept_connection(
    conn: Box<dyn Conn>,
    shared: &Arc<Shared>,
    config: &Arc<TargetConfig>,
) -> Result<(), RelayError> {
    let counter = ByteCounter::default();
    let tls = match tokio::time::timeout(
        HANDSHAKE_TIMEOUT,
        config.acceptor.accept(Counted::new(conn, counter.clone())),
    )
    .await
    {
        Ok(Ok(tls)) => tls,
        Ok(Err(e)) => {
            config
                .metrics
                .connections
                .with_label_values(&["target", "refused"])
                .inc();
            return Err(RelayError::Peer(format!("TLS handshake: {e}")));
        }
        Err(_) => return Err(RelayError::Peer("TLS handshake timed out".into())),
    };
    let (tls_r, tls_w) = tokio::io::split(tls);
    let mut frames = FrameReader::new(tls_r);
    let hello = tokio::time::timeout(HANDSHAKE_TIMEOUT, frames.next())
        .await
        .map_err(|_| RelayError::Peer("no hello".into()))??;
    let Some(Frame::Hello {
        session: session_id,
        index,
        deliver_to,
        ..
    }) = hello
    else {
        return Err(RelayError::Peer("the first frame was not a hello".into()));
    };
    let session = {
        let mut sessions = shared.sessions.lock().expect("sessions lock");
        let s = sessions.entry(session_id).or_insert_with(|| {
            Arc::new(Session {
                started: Instant::now(),
                connected: AtomicU32::new(0),
                turn: Notify::new(),
                active: AtomicUsize::new(0),
                store: watch::channel(None).0,
                stats: Mutex::new(MigrationStats {
                    side: "target",
                    session: format!("{session_id:016x}"),
                    ..Default::default()
                }),
            })
        });
        s.active.fetch_add(1, Ordering::SeqCst);
        s.clone()
    };
    let outcome = deliver(frames, tls_w, &session, index, &deliver_to, shared, config).await;
    let wire = counter.total();
    config
        .metrics
        .bytes_on_wire
        .with_label_values(&["target"])
        .inc_by(wire);
    config
        .metrics
        .connections
        .with_label_values(&["target", if outcome.is_ok() { "ok" } else { "failed" }])
        .inc();
    {
        let mut stats = session.stats.lock().expect("stats lock");
        stats.connections += 1;
        stats.bytes_on_wire += wire;
        if let Err(e) = &outcome {
            stats.errors.push(format!("connection {index}: {e}"));
        }
    }
    if session.active.fetch_sub(1, Ordering::SeqCst) == 1 {
        shared
            .sessions
            .lock()
            .expect("sessions lock")
            .remove(&session_id);
        finish_session(&session, config);
    }
    outcome
}

fn finish_session(session: &Session, config: &TargetConfig) {
    let mut stats = session.stats.lock().expect("stats lock").clone();
    stats.seconds = session.started.elapsed().as_secs_f64();
    stats.store = session.store.borrow().as_ref().map(|s| s.counts());
    stats.record(config.stats_json.as_deref());
}

/// Waits for the connections before this one to reach QEMU, then connects.
async fn connect_in_order(
    session: &Session,
    index: u32,
    to: &Endpoint,
    netns: Option<&super::intercept::NetNs>,
) -> std::io::Result<Box<dyn Conn>> {
    let deadline = tokio::time::Instant::now() + ORDER_WAIT;
    loop {
        let notified = session.turn.notified();
        if session.connected.load(Ordering::SeqCst) >= index {
            break;
        }
        if tokio::time::timeout_at(deadline, notified).await.is_err() {
            tracing::warn!(
                index,
                "earlier connections never reached QEMU; connecting anyway"
            );
            break;
        }
    }
    let conn = match (netns, to) {
        (Some(ns), Endpoint::Tcp(addr)) => connect_in(ns, addr).await,
        _ => to.connect().await,
    };
    session
        .connected
        .fetch_max(index.saturating_add(1), Ordering::SeqCst);
    session.turn.notify_waiters();
    conn
}

/// Connects to `addr` from inside `ns`, which must be one of that namespace's own addresses:
/// in KubeVirt's path the target relay delivers only to its own virt-handler, whatever a peer
/// names.
async fn connect_in(ns: &super::intercept::NetNs, addr: &str) -> std::io::Result<Box<dyn Conn>> {
    let to: std::net::SocketAddr = addr.parse().map_err(|_| {
        std::io::Error::new(
            std::io::ErrorKind::InvalidInput,
            format!("{addr:?} is not HOST:PORT"),
        )
    })?;
    let check = ns.clone();
    let local = tokio::task::spawn_blocking(move || check.is_local(to.ip()))
        .await
        .map_err(std::io::Error::other)?
        .map_err(std::io::Error::other)?;
    if !local {
        return Err(std::io::Error::new(
            std::io::ErrorKind::PermissionDenied,
            format!("{to} is not an address of virt-handler's namespace"),
        ));
    }
    let mark = super::intercept::ruleset::BYPASS_MARK;
    let s = ns
        .connect_async(to, mark, Duration::from_secs(10))
        .await
        .map_err(std::io::Error::other)?;
    Ok(Box::new(s))
}

async fn current_store(shared: &Shared, config: &TargetConfig) -> Arc<ContentStore> {
    let mut guard = shared.store.lock().await;
    if let Some(store) = guard.as_ref() {
        if store.age() < config.store_max_age {
            return store.clone();
        }
    }
    let namer = config.namer.clone();
    let source = config.store_source.clone();
    let built = tokio::task::spawn_blocking(move || {
        let pids = match &source {
            StoreSource::Pids(p) => p.clone(),
            StoreSource::Node {
                node,
                process_node_arg,
            } => ContentStore::node_pids(process_node_arg.as_deref().map(|a| (a, node.as_str()))),
        };
        ContentStore::build(namer.clone(), &pids)
    })
    .await
    .unwrap_or_else(|_| ContentStore::empty(config.namer.clone()));
    let counts = built.counts();
    tracing::info!(
        processes = counts.processes,
        bytes_indexed = counts.bytes_indexed,
        distinct_regions = counts.distinct_regions,
        index_bytes = counts.index_bytes,
        "relay store indexed"
    );
    let store = Arc::new(built);
    *guard = Some(store.clone());
    store
}

async fn deliver<R: AsyncRead + Unpin + Send + 'static, W: AsyncWrite + Unpin + Send + 'static>(
    mut frames: FrameReader<R>,
    mut tls_w: W,
    session: &Arc<Session>,
    index: u32,
    deliver_to: &str,
    shared: &Arc<Shared>,
    config: &Arc<TargetConfig>,
) -> Result<(), RelayError> {
    let to = Endpoint::parse(deliver_to)?;
    let qemu = match connect_in_order(session, index, &to, config.deliver_netns.as_ref()).await {
        Ok(q) => q,
        Err(e) => {
            let why = format!("cannot reach QEMU at {to}: {e}");
            let mut f = Vec::new();
            Frame::Refused(why.clone()).encode(&mut f);
            let _ = tls_w.write_all(&f).await;
            let _ = tls_w.shutdown().await;
            return Err(RelayError::Peer(why));
        }
    };
    let store = if index == 0 {
        let store = current_store(shared, config).await;
        session.store.send_replace(Some(store.clone()));
        let ids = store.ids();
        let mut buf = Vec::new();
        let mut chunks = ids.chunks(FILTER_CHUNK).peekable();
        if chunks.peek().is_none() {
            Frame::Filter {
                ids: Vec::new(),
                last: true,
            }
            .encode(&mut buf);
        }
        while let Some(chunk) = chunks.next() {
            Frame::Filter {
                ids: chunk.to_vec(),
                last: chunks.peek().is_none(),
            }
            .encode(&mut buf);
        }
        tls_w.write_all(&buf).await.map_err(RelayError::peer_io)?;
        tls_w.flush().await.map_err(RelayError::peer_io)?;
        store
    } else {
        let mut rx = session.store.subscribe();
        let got = match tokio::time::timeout(STORE_WAIT, rx.wait_for(|s| s.is_some())).await {
            Ok(Ok(s)) => s.clone(),
            _ => None,
        };
        got.unwrap_or_else(|| Arc::new(ContentStore::empty(config.namer.clone())))
    };

    let (qemu_r, mut qemu_w) = tokio::io::split(qemu);
    let (tx, rx) = mpsc::channel::<super::Outgoing>(64);
    let writer = tokio::spawn(write_frames(rx, tls_w));
    let back = tokio::spawn(return_path(qemu_r, tx.clone()));

    let mut rebuilder = Rebuilder::new(config.namer.clone());
    let mut reader = store.reader();
    let mut actions = Vec::new();
    let mut acked = 0u64;
    let mut to_ack = 0u64;
    let mut closed = false;
    let result: Result<(), RelayError> = loop {
        if to_ack > acked && !frames.has_frame() {
            let mut f = Vec::new();
            Frame::Ack { upto: to_ack }.encode(&mut f);
            if tx.send((f, Vec::new())).await.is_err() {
                break Err(RelayError::Peer(
                    "the connection to the source relay broke".into(),
                ));
            }
            acked = to_ack;
        }
        let frame = match frames.next().await {
            Ok(Some(f)) => f,
            Ok(None) => {
                break Err(RelayError::Peer(
                    "the source relay went away mid-stream".into(),
                ))
            }
            Err(e) => break Err(e),
        };
        if let Err(e) = rebuilder.push(frame, &mut reader, &mut actions) {
            break Err(RelayError::Protocol(e.to_string()));
        }
        let mut failed = None;
        for action in actions.drain(..) {
            match action {
                Action::Write(bytes) => {
                    if let Err(e) = qemu_w.write_all(&bytes).await {
                        failed = Some(RelayError::Qemu(e));
                        break;
                    }
                }
                Action::Resend(seq) => {
                    let mut f = Vec::new();
                    Frame::Resend { seq }.encode(&mut f);
                    let _ = tx.send((f, Vec::new())).await;
                }
                Action::Ack(upto) => to_ack = upto,
                Action::Close => {
                    let _ = qemu_w.flush().await;
                    let _ = qemu_w.shutdown().await;
                    closed = true;
                }
            }
        }
        if let Some(e) = failed {
            break Err(e);
        }
        if closed && !rebuilder.waiting() {
            break Ok(());
        }
    };
    let stats = rebuilder.stats;
    config
        .metrics
        .bytes_from_qemu
        .with_label_values(&["target"])
        .inc_by(stats.bytes_out);
    config
        .metrics
        .regions
        .with_label_values(&["target", "rebuilt"])
        .inc_by(stats.rebuilt);
    config
        .metrics
        .regions
        .with_label_values(&["target", "resent"])
        .inc_by(stats.resent);
    {
        let mut s = session.stats.lock().expect("stats lock");
        s.bytes_from_qemu += stats.bytes_out;
        s.regions_referenced += stats.references;
        s.regions_resent += stats.resent;
    }
    if result.is_err() {
        // The source is gone or broke the protocol: drop QEMU's connection so the incoming
        // migration fails instead of waiting.
        back.abort();
        writer.abort();
        return result;
    }
    if to_ack > acked {
        let mut f = Vec::new();
        Frame::Ack { upto: to_ack }.encode(&mut f);
        let _ = tx.send((f, Vec::new())).await;
    }
    drop(tx);
    let _ = tokio::time::timeout(LINGER, back).await;
    let _ = writer.await;
    Ok(())
}

/// What the target QEMU sends back on the connection, until it closes its side.
async fn return_path(mut qemu_r: impl AsyncRead + Unpin, tx: mpsc::Sender<super::Outgoing>) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        match qemu_r.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => {
                let mut f = Vec::new();
                Frame::Reverse(buf[..n].to_vec()).encode(&mut f);
                if tx.send((f, Vec::new())).await.is_err() {
                    return;
                }
            }
        }
    }
    let mut f = Vec::new();
    Frame::End.encode(&mut f);
    let _ = tx.send((f, Vec::new())).await;
}
