//! The source relay: accepts QEMU's outgoing migration connections, and carries each over its
//! own mutual-TLS connection to the target relay, with the regions the target holds sent as
//! references. The connections accepted while one is open belong to one migration; their
//! order is the order QEMU opened them, and the target opens its connections to QEMU in the
//! same order.
//!
//! Fail-safe: if the target relay cannot be reached, refuses us, or goes away, the QEMU
//! connection is closed, so QEMU reports a failed migration and the guest keeps running on
//! the source. Nothing is ever dropped silently: an unacknowledged reference is kept until the
//! target confirms it.
//!
//! Fail open, for connections intercepted from virt-handler ([`Routes::Intercepted`]): one with
//! no registered migration, or whose migration's first connection could not open the relay
//! path, is delivered straight to where it was going, from virt-handler's namespace, so the
//! migration goes as it would have without the relay. Every connection of a migration takes
//! the same way: the first one decides.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicU32, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, OnceLock};
use std::time::{Duration, Instant};

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::{mpsc, watch, OwnedSemaphorePermit, Semaphore};
use tokio_rustls::TlsConnector;

use super::intercept::{original_destination, ruleset::BYPASS_MARK};
use super::net::{ByteCounter, Conn, Counted, Listener};
use super::protocol::{Frame, PROTOCOL_VERSION};
use super::routes::{Decision, Route, Routes};
use super::stats::{reason_kind, MigrationStats, RelayMetrics};
use super::store::IdSet;
use super::stream::{Holds, Piece, RegionNamer, SourceStream};
use super::{write_frames, FrameReader, RelayError};

const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// How long a later channel waits for the first channel's filter before it sends everything.
const FILTER_WAIT: Duration = Duration::from_secs(30);
const READ_CHUNK: usize = 256 << 10;

pub struct SourceConfig {
    pub routes: Routes,
    pub server_name: rustls::pki_types::ServerName<'static>,
    pub connector: TlsConnector,
    pub namer: Arc<RegionNamer>,
    /// KiB of referenced pages kept for resends before reading from QEMU pauses.
    pub window_kib: u32,
    pub stats_json: Option<std::path::PathBuf>,
    pub metrics: RelayMetrics,
    /// Rates of completed migrations by target relay, for the node's digest.
    pub observed: super::stats::PeerRates,
}

struct FilterSet(IdSet);

impl Holds for FilterSet {
    fn holds(&self, id: u64) -> bool {
        self.0.contains(&id)
    }
}

/// How a migration's connections go, decided by its first one.
#[derive(Clone)]
enum Way {
    /// Through the relays, with the regions the target holds.
    Relay(Arc<FilterSet>),
    /// Straight to their destination (intercepted connections only).
    Direct,
}

/// One migration: the connections accepted while another of it was open.
struct Session {
    id: u64,
    started: Instant,
    next_index: AtomicU32,
    active: AtomicUsize,
    way: watch::Sender<Option<Way>>,
    stats: Mutex<MigrationStats>,
}

/// The open sessions, by migration.
#[derive(Default)]
struct Sessions {
    open: Mutex<BTreeMap<String, Arc<Session>>>,
}

impl Sessions {
    fn join(&self, migration: &str) -> (Arc<Session>, u32) {
        let mut open = self.open.lock().expect("sessions lock");
        open.retain(|_, s| s.active.load(Ordering::SeqCst) > 0);
        let session = open
            .entry(migration.to_string())
            .or_insert_with(|| {
                Arc::new(Session {
                    id: rand::random(),
                    started: Instant::now(),
                    next_index: AtomicU32::new(0),
                    active: AtomicUsize::new(0),
                    way: watch::channel(None).0,
                    stats: Mutex::new(MigrationStats {
                        side: "source",
                        ..Default::default()
                    }),
                })
            })
            .clone();
        session.active.fetch_add(1, Ordering::SeqCst);
        let index = session.next_index.fetch_add(1, Ordering::SeqCst);
        (session, index)
    }
}

pub async fn serve(listener: Listener, config: Arc<SourceConfig>) -> Result<(), RelayError> {
    let sessions = Arc::new(Sessions::default());
    loop {
        let (conn, original) = match (&listener, config.routes.intercepted()) {
            (Listener::Tcp(l), Some(_)) => {
                let (s, _) = l.accept().await.map_err(RelayError::Accept)?;
                s.set_nodelay(true).ok();
                let original = s
                    .local_addr()
                    .and_then(|local| original_destination(&s, local));
                (Box::new(s) as Box<dyn Conn>, Some(original))
            }
            _ => (listener.accept().await.map_err(RelayError::Accept)?, None),
        };
        let route = match config.routes.decide(original) {
            Decision::Relay(route) => route,
            Decision::Direct { to, why } => {
                tracing::info!(to = %to, why, "connection delivered direct");
                let config = config.clone();
                tokio::spawn(async move {
                    match deliver_direct(conn, to, &config).await {
                        Ok(()) => count(&config, "direct"),
                        Err(e) => {
                            tracing::warn!(to = %to, error = %e, "direct delivery failed");
                            count(&config, "failed");
                        }
                    }
                });
                continue;
            }
            Decision::Close { why } => {
                tracing::warn!(why = %why, "connection closed");
                count(&config, "failed");
                continue;
            }
        };
        let (session, index) = sessions.join(&route.migration);
        {
            let mut stats = session.stats.lock().expect("stats lock");
            if stats.peer.is_empty() {
                stats.peer = route.target_relay.clone();
            }
        }
        let config = config.clone();
        tokio::spawn(async move {
            let outcome = relay_connection(conn, &session, index, &route, &config).await;
            let label = match &outcome {
                Ok(Way::Relay(_)) => "ok",
                Ok(Way::Direct) => "direct",
                Err(_) => "failed",
            };
            config
                .metrics
                .connections
                .with_label_values(&["source", label])
                .inc();
            {
                let mut stats = session.stats.lock().expect("stats lock");
                stats.connections += 1;
                if let Err(e) = &outcome {
                    tracing::warn!(session = %format!("{:016x}", session.id), index, error = %e, "relayed connection failed");
                    stats.errors.push(format!("connection {index}: {e}"));
                }
            }
            if session.active.fetch_sub(1, Ordering::SeqCst) == 1 {
                finish_session(&session, &config);
            }
        });
    }
}

fn count(config: &SourceConfig, label: &str) {
    config
        .metrics
        .connections
        .with_label_values(&["source", label])
        .inc();
}

/// Delivers `conn` to `to` from the intercepted namespace, bytes untouched, with the mark the
/// interception rules let through.
async fn deliver_direct(
    mut conn: Box<dyn Conn>,
    to: std::net::SocketAddr,
    config: &SourceConfig,
) -> Result<(), RelayError> {
    let Some(routes) = config.routes.intercepted() else {
        return Err(RelayError::Peer(
            "direct delivery needs an intercepted namespace".into(),
        ));
    };
    let mut out = routes
        .netns
        .connect_async(to, BYPASS_MARK, CONNECT_TIMEOUT)
        .await
        .map_err(|e| RelayError::Peer(e.to_string()))?;
    tokio::io::copy_bidirectional(&mut conn, &mut out)
        .await
        .map_err(RelayError::peer_io)?;
    Ok(())
}

fn finish_session(session: &Session, config: &SourceConfig) {
    let mut stats = session.stats.lock().expect("stats lock").clone();
    stats.session = format!("{:016x}", session.id);
    stats.seconds = session.started.elapsed().as_secs_f64();
    stats.record(config.stats_json.as_deref());
    config
        .observed
        .record(&stats, &crate::api::time::now_rfc3339());
}

/// The window in KiB for `window_mib`: at least two regions, so one reference can never wait
/// for more room than the window has (it would wait forever and stall the migration).
pub fn window_kib(window_mib: u64, region_bytes: usize) -> u32 {
    let floor = 2 * (region_bytes as u64).div_ceil(1024);
    window_mib
        .saturating_mul(1024)
        .max(floor)
        .min(u32::MAX as u64) as u32
}

/// Most identities a target's filter may name (2 TiB of distinct 64 KiB regions, 256 MiB of
/// set); the rest are ignored, so those regions go as bytes.
const MAX_FILTER_IDS: usize = 1 << 25;

/// Pages of references not yet acknowledged, by sequence number.
type Retained = Arc<Mutex<BTreeMap<u64, (Vec<u8>, OwnedSemaphorePermit)>>>;

/// One accepted connection on its way through the relays: its migration's session, its place
/// in it, its route, the relay's settings, the bytes it put on the wire and the path it took.
struct Leg<'a> {
    session: &'a Arc<Session>,
    index: u32,
    route: &'a Route,
    config: &'a SourceConfig,
    counter: ByteCounter,
    path: OnceLock<String>,
}

async fn relay_connection(
    qemu: Box<dyn Conn>,
    session: &Arc<Session>,
    index: u32,
    route: &Route,
    config: &SourceConfig,
) -> Result<Way, RelayError> {
    let leg = Leg {
        session,
        index,
        route,
        config,
        counter: ByteCounter::default(),
        path: OnceLock::new(),
    };
    let result = relay_inner(qemu, &leg).await;
    let wire = leg.counter.total();
    config
        .metrics
        .bytes_on_wire
        .with_label_values(&["source"])
        .inc_by(wire);
    let mut stats = session.stats.lock().expect("stats lock");
    stats.bytes_on_wire += wire;
    if let Some(path) = leg.path.get() {
        *stats.path_bytes.entry(path.clone()).or_default() += wire;
    }
    drop(stats);
    result
}

type PeerReader =
    FrameReader<tokio::io::ReadHalf<tokio_rustls::client::TlsStream<Counted<TcpStream>>>>;
type PeerWriter = tokio::io::WriteHalf<tokio_rustls::client::TlsStream<Counted<TcpStream>>>;

/// Opens the connection to the target relay on the path this connection takes; when an extra
/// path cannot be reached, on the first path instead, so a path that fails never fails the
/// migration. The leg keeps the address the connection went to.
async fn connect_on_path(leg: &Leg<'_>) -> Result<(PeerReader, PeerWriter), RelayError> {
    let path = leg.route.relay_for(leg.index);
    let first = leg.route.target_relay.as_str();
    let opened = match connect_peer(leg, path).await {
        Err(e) if path != first => {
            tracing::warn!(path, error = %e, "extra path unavailable; this connection takes the first path");
            leg.session.stats.lock().expect("stats lock").path_fallbacks += 1;
            (first, connect_peer(leg, first).await)
        }
        r => (path, r),
    };
    let _ = leg.path.set(opened.0.to_string());
    opened.1
}

/// Opens the mutual-TLS connection to the target relay at `relay` and says which connection
/// this is.
async fn connect_peer(leg: &Leg<'_>, relay: &str) -> Result<(PeerReader, PeerWriter), RelayError> {
    let config = leg.config;
    let tcp = match config.routes.intercepted() {
        // From the intercepted namespace, over the network virt-handler itself uses.
        Some(r) => {
            let to: std::net::SocketAddr = relay.parse().map_err(|_| {
                RelayError::Peer(format!("target relay {relay:?} is not HOST:PORT"))
            })?;
            r.netns
                .connect_async(to, BYPASS_MARK, CONNECT_TIMEOUT)
                .await
                .map_err(|e| RelayError::Peer(e.to_string()))?
        }
        None => tokio::time::timeout(CONNECT_TIMEOUT, TcpStream::connect(relay))
            .await
            .map_err(|_| RelayError::Peer(format!("connecting to {relay} timed out")))?
            .map_err(|e| RelayError::Peer(format!("connecting to {relay}: {e}")))?,
    };
    tcp.set_nodelay(true).ok();
    let tls = tokio::time::timeout(
        CONNECT_TIMEOUT,
        config.connector.connect(
            config.server_name.clone(),
            Counted::new(tcp, leg.counter.clone()),
        ),
    )
    .await
    .map_err(|_| RelayError::Peer("TLS handshake timed out".into()))?
    .map_err(|e| RelayError::Peer(format!("TLS handshake with {relay}: {e}")))?;
    let (tls_r, mut tls_w) = tokio::io::split(tls);
    let mut hello = Vec::new();
    Frame::Hello {
        version: PROTOCOL_VERSION,
        session: leg.session.id,
        index: leg.index,
        deliver_to: leg.route.deliver_to.to_string(),
    }
    .encode(&mut hello);
    tls_w.write_all(&hello).await.map_err(RelayError::peer_io)?;
    tls_w.flush().await.map_err(RelayError::peer_io)?;
    Ok((FrameReader::new(tls_r), tls_w))
}

/// The first connection's filter: the regions the target holds.
async fn read_filter(frames: &mut PeerReader) -> Result<IdSet, RelayError> {
    let mut ids = IdSet::default();
    loop {
        match frames.next().await? {
            Some(Frame::Filter { ids: chunk, last }) => {
                let room = MAX_FILTER_IDS.saturating_sub(ids.len());
                if chunk.len() > room {
                    tracing::warn!(limit = MAX_FILTER_IDS, "target relay names more regions than the filter keeps; the rest go as bytes");
                }
                ids.extend(chunk.into_iter().take(room));
                if last {
                    return Ok(ids);
                }
            }
            Some(Frame::Refused(why)) => {
                return Err(RelayError::Peer(format!("target relay refused: {why}")));
            }
            other => {
                return Err(RelayError::Peer(format!(
                    "expected the target's filter, got {}",
                    frame_name(other.as_ref())
                )));
            }
        }
    }
}

/// The way this connection goes, and the open relay path if it goes through the relays. The
/// first connection decides for the whole migration.
async fn choose_way(leg: &Leg<'_>) -> Result<(Way, Option<(PeerReader, PeerWriter)>), RelayError> {
    let session = leg.session;
    let fails_open = leg.config.routes.intercepted().is_some();
    let peer = connect_on_path(leg).await;
    if leg.index == 0 {
        let opened = match peer {
            Ok((mut frames, w)) => read_filter(&mut frames).await.map(|ids| (ids, frames, w)),
            Err(e) => Err(e),
        };
        return match opened {
            Ok((ids, frames, w)) => {
                tracing::info!(session = %format!("{:016x}", session.id), regions = ids.len(), "target relay holds regions");
                let way = Way::Relay(Arc::new(FilterSet(ids)));
                session.way.send_replace(Some(way.clone()));
                Ok((way, Some((frames, w))))
            }
            Err(e) if fails_open => {
                tracing::warn!(session = %format!("{:016x}", session.id), error = %e, "relay path unavailable; the migration goes direct");
                session.way.send_replace(Some(Way::Direct));
                Ok((Way::Direct, None))
            }
            Err(e) => {
                session
                    .way
                    .send_replace(Some(Way::Relay(Arc::new(FilterSet(IdSet::default())))));
                Err(e)
            }
        };
    }
    let mut rx = session.way.subscribe();
    let decided = match tokio::time::timeout(FILTER_WAIT, rx.wait_for(|w| w.is_some())).await {
        Ok(Ok(w)) => w.clone(),
        _ => None,
    };
    match decided.unwrap_or_else(|| Way::Relay(Arc::new(FilterSet(IdSet::default())))) {
        Way::Direct => Ok((Way::Direct, None)),
        way => Ok((way, Some(peer?))),
    }
}

async fn relay_inner(qemu: Box<dyn Conn>, leg: &Leg<'_>) -> Result<Way, RelayError> {
    let (session, route, config) = (leg.session, leg.route, leg.config);
    let (way, peer) = choose_way(leg).await?;
    let (filter, (frames, tls_w)) = match (way, peer) {
        (Way::Relay(filter), Some(peer)) => (filter, peer),
        _ => {
            let to = route.deliver_to.to_string().parse().map_err(|_| {
                RelayError::Peer(format!("cannot deliver direct to {}", route.deliver_to))
            })?;
            deliver_direct(qemu, to, config).await?;
            return Ok(Way::Direct);
        }
    };

    let (qemu_r, qemu_w) = tokio::io::split(qemu);
    let (tx, rx) = mpsc::channel::<super::Outgoing>(64);
    let writer = tokio::spawn(write_frames(rx, tls_w));
    let window = Arc::new(Semaphore::new(config.window_kib as usize));
    let retained: Retained = Arc::default();
    let mut back = tokio::spawn(read_target(
        frames,
        qemu_w,
        tx.clone(),
        retained.clone(),
        session.clone(),
    ));

    let mut forward = Box::pin(forward_qemu(
        qemu_r, &tx, &filter, config, session, &window, &retained,
    ));
    let outcome = tokio::select! {
        r = &mut forward => r,
        r = &mut back => Err(match r {
            Ok(Ok(())) => RelayError::Peer("the target relay closed the connection mid-stream".into()),
            Ok(Err(e)) => e,
            Err(e) => RelayError::Peer(format!("target reader: {e}")),
        }),
    };
    drop(forward);
    if let Err(e) = outcome {
        back.abort();
        writer.abort();
        return Err(e);
    }
    drop(tx);
    let back_result = back
        .await
        .map_err(|e| RelayError::Peer(format!("target reader: {e}")))?;
    let _ = writer.await;
    back_result.map(|()| Way::Relay(filter))
}

/// Reads QEMU until it closes its side, sending what the stream parser makes of it.
async fn forward_qemu(
    mut qemu_r: impl AsyncRead + Unpin,
    tx: &mpsc::Sender<super::Outgoing>,
    filter: &Arc<FilterSet>,
    config: &SourceConfig,
    session: &Session,
    window: &Arc<Semaphore>,
    retained: &Retained,
) -> Result<(), RelayError> {
    let mut stream = SourceStream::new(config.namer.clone());
    let mut buf = vec![0u8; READ_CHUNK];
    let mut seq = 0u64;
    let mut from_qemu = 0u64;
    let sent = loop {
        let n = qemu_r.read(&mut buf).await.map_err(RelayError::Qemu)?;
        let pieces = if n == 0 {
            stream.finish()
        } else {
            from_qemu += n as u64;
            stream.push(&buf[..n], filter.as_ref())
        };
        for piece in pieces {
            let mut frame = Vec::new();
            let mut body = Vec::new();
            match piece {
                Piece::Literal(bytes) => {
                    frame = Frame::data_header(bytes.len());
                    body = bytes;
                }
                Piece::Ref(r) => {
                    let kib = (r.pages.len() >> 10).max(1) as u32;
                    let permit = window
                        .clone()
                        .acquire_many_owned(kib)
                        .await
                        .expect("window semaphore is never closed");
                    Frame::from_ref(&r).encode(&mut frame);
                    retained
                        .lock()
                        .expect("retained lock")
                        .insert(seq, (r.pages, permit));
                    seq += 1;
                }
            }
            if tx.send((frame, body)).await.is_err() {
                return Err(RelayError::Peer(
                    "the connection to the target relay broke".into(),
                ));
            }
        }
        if n == 0 {
            let mut end = Vec::new();
            Frame::End.encode(&mut end);
            let _ = tx.send((end, Vec::new())).await;
            break from_qemu;
        }
    };
    config
        .metrics
        .bytes_from_qemu
        .with_label_values(&["source"])
        .inc_by(sent);
    let report = stream.report();
    config
        .metrics
        .regions
        .with_label_values(&["source", "referenced"])
        .inc_by(report.regions_referenced);
    let mut stats = session.stats.lock().expect("stats lock");
    stats.bytes_from_qemu += sent;
    stats.regions_referenced += report.regions_referenced;
    if let Some(reason) = &report.passthrough {
        config
            .metrics
            .passthrough
            .with_label_values(&[reason_kind(reason)])
            .inc();
        stats.passthrough.push(reason.clone());
    }
    Ok(())
}

/// Frames from the target: acknowledgements free kept pages, resends are answered, the
/// return path goes to QEMU. Ends when the target closes.
async fn read_target<R: AsyncRead + Unpin>(
    mut frames: FrameReader<R>,
    mut qemu_w: impl AsyncWrite + Unpin,
    tx: mpsc::Sender<super::Outgoing>,
    retained: Retained,
    session: Arc<Session>,
) -> Result<(), RelayError> {
    loop {
        let Some(frame) = frames.next().await? else {
            return Ok(());
        };
        match frame {
            Frame::Ack { upto } => {
                let mut kept = retained.lock().expect("retained lock");
                let rest = kept.split_off(&upto);
                *kept = rest;
            }
            Frame::Resend { seq } => {
                let pages = retained
                    .lock()
                    .expect("retained lock")
                    .get(&seq)
                    .map(|(p, _)| p.clone())
                    .ok_or_else(|| {
                        RelayError::Peer(format!("the target asked again for reference {seq}"))
                    })?;
                session.stats.lock().expect("stats lock").regions_resent += 1;
                let mut frame = Vec::new();
                Frame::Resent { seq, pages }.encode(&mut frame);
                if tx.send((frame, Vec::new())).await.is_err() {
                    return Err(RelayError::Peer(
                        "the connection to the target relay broke".into(),
                    ));
                }
            }
            Frame::Reverse(bytes) => {
                // QEMU may already have closed: its return path is then of no use.
                let _ = qemu_w.write_all(&bytes).await;
            }
            Frame::End => {
                let _ = qemu_w.shutdown().await;
            }
            Frame::Refused(why) => {
                return Err(RelayError::Peer(format!("target relay: {why}")));
            }
            other => {
                return Err(RelayError::Peer(format!(
                    "unexpected {} from the target relay",
                    frame_name(Some(&other))
                )))
            }
        }
    }
}

pub fn frame_name(f: Option<&Frame>) -> &'static str {
    match f {
        None => "the end of the connection",
        Some(Frame::Hello { .. }) => "hello",
        Some(Frame::Data(_)) => "data",
        Some(Frame::Ref { .. }) => "a reference",
        Some(Frame::Resent { .. }) => "resent pages",
        Some(Frame::End) => "end",
        Some(Frame::Filter { .. }) => "a filter",
        Some(Frame::Ack { .. }) => "an acknowledgement",
        Some(Frame::Resend { .. }) => "a resend request",
        Some(Frame::Reverse(_)) => "return-path data",
        Some(Frame::Refused(_)) => "a refusal",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_window_always_holds_a_whole_reference() {
        let region = 16 * 4096;
        assert_eq!(window_kib(64, region), 64 * 1024);
        // A 1 MiB window with 2 MiB regions (512 pages) is raised to two regions.
        assert_eq!(window_kib(1, 512 * 4096), 4096);
        assert_eq!(window_kib(u64::MAX, region), u32::MAX);
    }
}
