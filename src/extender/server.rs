//! The HTTP(S) server: `POST /<filter-verb>`, `POST /<prioritize-verb>`, `/healthz`,
//! `/readyz`, `/metrics`.
//!
//! Bad input never panics and never hangs a connection: bodies over the limit get 413,
//! malformed or mistyped JSON and empty bodies get 400 with the decoder's message, a body that
//! does not arrive within the request timeout gets 408, and headers that do not arrive within
//! the header timeout close the connection.

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::time::{Duration, Instant};

use axum::body::Bytes;
use axum::extract::{DefaultBodyLimit, FromRequest, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::post;
use axum::Router;

use super::filter::filter;
use super::metrics::{ExtenderMetrics, Outcome};
use super::placement::Report;
use super::prioritize::prioritize;
use super::state::{ClusterState, StateSource};
use super::{wire, BadRequest, ExtenderError};
use crate::telemetry::Readiness;

#[derive(Clone, Debug)]
pub struct ServerConfig {
    pub filter_verb: String,
    pub prioritize_verb: String,
    pub max_body_bytes: usize,
    /// Deadline for reading a request body.
    pub request_timeout: Duration,
    /// Deadline for a client to send a request's headers (idle keep-alive connections too).
    pub header_timeout: Duration,
}

impl Default for ServerConfig {
    fn default() -> Self {
        Self {
            filter_verb: "filter".into(),
            prioritize_verb: "prioritize".into(),
            max_body_bytes: 64 << 20,
            request_timeout: Duration::from_secs(4),
            header_timeout: Duration::from_secs(30),
        }
    }
}

#[derive(Clone)]
struct App {
    source: Arc<dyn StateSource>,
    metrics: Arc<ExtenderMetrics>,
    request_timeout: Duration,
}

#[derive(Clone, Copy)]
pub enum Verb {
    Filter,
    Prioritize,
}

impl Verb {
    fn label(self) -> &'static str {
        match self {
            Verb::Filter => "filter",
            Verb::Prioritize => "prioritize",
        }
    }
}

fn route_path(verb: &str) -> String {
    format!("/{}", verb.trim_matches('/'))
}

/// The extender's routes merged with the health routes.
pub fn router(
    source: Arc<dyn StateSource>,
    metrics: Arc<ExtenderMetrics>,
    config: &ServerConfig,
    ready: Readiness,
) -> Router {
    let app = App {
        source,
        metrics: metrics.clone(),
        request_timeout: config.request_timeout,
    };
    Router::new()
        .route(
            &route_path(&config.filter_verb),
            post(|State(app): State<App>, req: Request| handle(app, Verb::Filter, req)),
        )
        .route(
            &route_path(&config.prioritize_verb),
            post(|State(app): State<App>, req: Request| handle(app, Verb::Prioritize, req)),
        )
        .with_state(app)
        .layer(DefaultBodyLimit::max(config.max_body_bytes))
        .merge(crate::telemetry::health_routes(
            metrics.registry.clone(),
            ready,
        ))
}

fn plain(status: StatusCode, message: String) -> Response {
    (
        status,
        [("content-type", "text/plain; charset=utf-8")],
        message,
    )
        .into_response()
}

async fn handle(app: App, verb: Verb, req: Request) -> Response {
    let started = Instant::now();
    let (outcome, response) = answer(&app, verb, req).await;
    app.metrics
        .request(verb.label(), outcome, started.elapsed());
    response
}

async fn answer(app: &App, verb: Verb, req: Request) -> (Outcome, Response) {
    let body = match tokio::time::timeout(app.request_timeout, Bytes::from_request(req, &())).await
    {
        Err(_) => {
            return (
                Outcome::Timeout,
                plain(
                    StatusCode::REQUEST_TIMEOUT,
                    format!("request body not received within {:?}", app.request_timeout),
                ),
            )
        }
        Ok(Err(rejection)) => {
            let status = rejection.status();
            let outcome = if status == StatusCode::PAYLOAD_TOO_LARGE {
                Outcome::TooLarge
            } else {
                Outcome::BadRequest
            };
            return (outcome, plain(status, rejection.body_text()));
        }
        Ok(Ok(body)) => body,
    };
    let state = app.source.current();
    match respond(state.as_deref(), verb, &body) {
        Ok((response, report)) => {
            app.metrics.report(verb.label(), &report);
            log_decision(verb, &report);
            (Outcome::Ok, response)
        }
        Err(BadRequest(message)) => (Outcome::BadRequest, plain(StatusCode::BAD_REQUEST, message)),
    }
}

/// One line per migration target pod and verb (pass-through pods are only counted: they are
/// every other pod the cluster schedules).
fn log_decision(verb: Verb, report: &Report) {
    let Some(d) = &report.decision else {
        return;
    };
    match report.pod_degraded {
        Some(cause) => tracing::info!(
            verb = verb.label(),
            pod = %d.pod,
            vmi = d.vm.as_deref().unwrap_or(""),
            cause = cause.as_str(),
            "migration target answered neutrally"
        ),
        None => tracing::info!(
            verb = verb.label(),
            pod = %d.pod,
            vmi = d.vm.as_deref().unwrap_or(""),
            source = d.source.as_deref().unwrap_or(""),
            best = d.best.as_deref().unwrap_or("none"),
            pinned = d.pinned.as_deref().unwrap_or(""),
            group_size = d.group_size,
            passed = d.passed,
            failed = d.failed,
            degraded_nodes = report
                .nodes_degraded
                .iter()
                .map(|(_, n)| n)
                .sum::<usize>(),
            "migration target placed"
        ),
    }
}

/// Decodes a body and answers it: the whole request path after the bytes are in, with no I/O.
pub fn respond(
    state: Option<&ClusterState>,
    verb: Verb,
    body: &[u8],
) -> Result<(Response, Report), BadRequest> {
    let args = decode(body)?;
    Ok(match verb {
        Verb::Filter => {
            let (result, report) = filter(state, &args)?;
            (json(wire::filter_result_to_json(&result)), report)
        }
        Verb::Prioritize => {
            let (result, report) = prioritize(state, &args)?;
            (json(wire::priorities_to_json(&result)), report)
        }
    })
}

fn json(body: Vec<u8>) -> Response {
    ([("content-type", "application/json")], body).into_response()
}

/// `ExtenderArgs` from a body, with a message a person can act on.
pub fn decode(body: &[u8]) -> Result<wire::ExtenderArgs<'_>, BadRequest> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Err(BadRequest(
            "empty request body: expected a JSON ExtenderArgs object".into(),
        ));
    }
    serde_json::from_slice(body).map_err(|e| BadRequest(format!("invalid ExtenderArgs: {e}")))
}

/// Loads a PEM certificate chain and private key into a rustls server config (ring provider,
/// so no process-wide default provider is needed).
pub fn tls_config(cert: &Path, key: &Path) -> Result<rustls::ServerConfig, ExtenderError> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let tls = |what: String| ExtenderError::Tls(what);
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| tls(format!("reading certificate {}: {e}", cert.display())))?
        .collect::<Result<_, _>>()
        .map_err(|e| tls(format!("parsing certificate {}: {e}", cert.display())))?;
    if certs.is_empty() {
        return Err(tls(format!("no certificate in {}", cert.display())));
    }
    let key = PrivateKeyDer::from_pem_file(key)
        .map_err(|e| tls(format!("reading private key {}: {e}", key.display())))?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .map_err(|e| tls(e.to_string()))?
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .map_err(|e| tls(format!("certificate and key do not match: {e}")))?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(config)
}

/// Serves `router` on `listener` (HTTPS when `tls` is given) until `shutdown` resolves.
pub async fn serve(
    router: Router,
    listener: std::net::TcpListener,
    tls: Option<rustls::ServerConfig>,
    header_timeout: Duration,
    shutdown: impl std::future::Future<Output = ()> + Send + 'static,
) -> Result<(), ExtenderError> {
    let addr = listener
        .local_addr()
        .map_err(|e| ExtenderError::Serve(SocketAddr::from(([0, 0, 0, 0], 0)), e))?;
    let failed = |e| ExtenderError::Serve(addr, e);
    listener.set_nonblocking(true).map_err(failed)?;
    let handle = axum_server::Handle::new();
    let h = handle.clone();
    tokio::spawn(async move {
        shutdown.await;
        h.graceful_shutdown(Some(Duration::from_secs(5)));
    });
    let scheme = if tls.is_some() { "https" } else { "http" };
    tracing::info!(address = %addr, scheme, "extender listening");
    let service = router.into_make_service();
    let result = match tls {
        Some(config) => {
            let config = axum_server::tls_rustls::RustlsConfig::from_config(Arc::new(config));
            let mut server = axum_server::tls_rustls::from_tcp_rustls(listener, config)
                .map_err(failed)?
                .handle(handle);
            limit_headers(server.http_builder(), header_timeout);
            server.serve(service).await
        }
        None => {
            let mut server = axum_server::from_tcp(listener)
                .map_err(failed)?
                .handle(handle);
            limit_headers(server.http_builder(), header_timeout);
            server.serve(service).await
        }
    };
    result.map_err(failed)
}

fn limit_headers(
    builder: &mut hyper_util::server::conn::auto::Builder<hyper_util::rt::TokioExecutor>,
    header_timeout: Duration,
) {
    builder
        .http1()
        .timer(hyper_util::rt::TokioTimer::new())
        .header_read_timeout(header_timeout);
}

#[cfg(test)]
#[path = "server_tests.rs"]
mod tests;
