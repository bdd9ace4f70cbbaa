//! Handler behaviour over hand-built clusters, and the router against bad input.

use std::collections::HashMap;
use std::sync::Arc;

use axum::body::Body;
use axum::http::{Request as HttpRequest, StatusCode};
use proptest::prelude::*;
use serde_json::json;
use tower::ServiceExt;

use super::*;
use crate::extender::fixtures::{
    self, body_with_names, migration_pod, names, node_name, ordinary_pod,
};
use crate::extender::placement::Cause;
use crate::extender::state::FixedState;
use crate::extender::wire::ExtenderFilterResult;
use crate::plan::PlanOptions;

const NODES: usize = 40;

fn filter_with<'a>(
    state: Option<&ClusterState>,
    body: &'a [u8],
) -> (ExtenderFilterResult<'a>, Report) {
    let args = decode(body).unwrap();
    super::filter(state, &args).unwrap()
}

fn prioritize_with(state: Option<&ClusterState>, body: &[u8]) -> (Vec<(String, i64)>, Report) {
    let args = decode(body).unwrap();
    let (list, report) = super::prioritize(state, &args).unwrap();
    let owned = list.iter().map(|h| (h.host.to_string(), h.score)).collect();
    (owned, report)
}

fn scores(list: &[(String, i64)]) -> HashMap<String, i64> {
    list.iter().cloned().collect()
}

#[test]
fn ordinary_pod_passes_every_node_with_neutral_scores() {
    let state = fixtures::state(NODES, &[]);
    let body = body_with_names(&ordinary_pod(), &names(NODES));
    let (f, report) = filter_with(Some(&state), &body);
    assert_eq!(f.node_names.unwrap(), names(NODES));
    assert!(f.failed_nodes.is_empty() && f.failed_and_unresolvable_nodes.is_empty());
    assert!(report.pass_through);
    let (p, report) = prioritize_with(Some(&state), &body);
    assert_eq!(p.len(), NODES);
    assert!(p.iter().all(|(_, score)| *score == 0));
    assert!(report.pass_through);
}

#[test]
fn migration_pod_fails_source_and_cordoned_nodes_with_reasons() {
    let state = fixtures::state(NODES, &[]);
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, report) = filter_with(Some(&state), &body);
    let passed = f.node_names.unwrap();
    assert!(
        !passed.iter().any(|n| *n == node_name(0)),
        "source node passed"
    );
    assert!(
        !passed.iter().any(|n| *n == node_name(4)),
        "cordoned node passed"
    );
    assert_eq!(passed.len(), NODES - 2);
    assert_eq!(
        f.failed_and_unresolvable_nodes[&node_name(0)],
        "source node of the migration"
    );
    assert!(f.failed_nodes[&node_name(4)].contains("cordoned"));
    assert!(!report.pass_through);
    assert_eq!(report.pod_degraded, None);
    // What the log line says about the decision.
    let d = report.decision.expect("a migration target pod is logged");
    assert_eq!(d.pod, "ns/virt-launcher-vm1-target");
    assert_eq!(d.vm.as_deref(), Some("ns/vm1"));
    assert_eq!(d.source.as_deref(), Some(node_name(0).as_str()));
    assert_eq!(d.best.as_deref(), Some(node_name(1).as_str()));
    assert_eq!((d.passed, d.failed), (NODES - 2, 2));
}

#[test]
fn migration_pod_scores_are_the_planners_scores() {
    let state = fixtures::state(NODES, &[]);
    let all = names(NODES);
    let body = body_with_names(&migration_pod(true), &all);
    let (p, _) = prioritize_with(Some(&state), &body);
    let got = scores(&p);
    // Most memory in common wins.
    assert_eq!(got[&node_name(1)], 10);
    assert!(got[&node_name(2)] < 10 && got[&node_name(2)] > got[&node_name(5)]);
    // Same numbers the controller gets from the planner for the same candidates.
    let req = state
        .vmi_by_uid("ns", "uid-vm1")
        .unwrap()
        .request
        .clone()
        .unwrap();
    let plan = state
        .planner
        .plan(
            &req,
            &PlanOptions {
                only_nodes: Some(all.clone()),
                ..Default::default()
            },
        )
        .unwrap();
    for c in plan.candidates.iter().filter(|c| c.has_digest) {
        assert_eq!(got[&c.node], i64::from(c.score), "node {}", c.node);
    }
    // Source and cordoned nodes score 0.
    assert_eq!(got[&node_name(0)], 0);
    assert_eq!(got[&node_name(4)], 0);
}

#[test]
fn vmi_is_found_by_migration_name_without_created_by_label() {
    let state = fixtures::state(NODES, &[]);
    let body = body_with_names(&migration_pod(false), &names(NODES));
    let (p, report) = prioritize_with(Some(&state), &body);
    assert_eq!(report.pod_degraded, None);
    assert_eq!(scores(&p)[&node_name(1)], 10);
}

#[test]
fn target_chosen_by_a_virtual_machine_migration_is_the_only_node_passing() {
    let state = fixtures::state(NODES, &[fixtures::vmm("Migrating", &node_name(2))]);
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, _) = filter_with(Some(&state), &body);
    assert_eq!(f.node_names.unwrap(), vec![node_name(2)]);
    assert_eq!(
        f.failed_and_unresolvable_nodes[&node_name(1)],
        format!("migration is pinned to node {}", node_name(2))
    );
    let (p, _) = prioritize_with(Some(&state), &body);
    assert_eq!(scores(&p)[&node_name(2)], 10);
}

#[test]
fn finished_virtual_machine_migration_does_not_pin() {
    let state = fixtures::state(NODES, &[fixtures::vmm("Succeeded", &node_name(2))]);
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, _) = filter_with(Some(&state), &body);
    assert_eq!(f.node_names.unwrap().len(), NODES - 2);
}

#[test]
fn pin_to_a_node_the_view_does_not_know_still_applies_by_name() {
    let state = fixtures::state(NODES, &[fixtures::vmm("Migrating", "new-node")]);
    let mut all = names(NODES);
    all.push("new-node".into());
    let body = body_with_names(&migration_pod(true), &all);
    let (f, _) = filter_with(Some(&state), &body);
    assert_eq!(f.node_names.unwrap(), vec!["new-node".to_string()]);
}

#[test]
fn unknown_node_names_pass_with_neutral_score_and_are_counted() {
    let state = fixtures::state(NODES, &[]);
    let mut all = names(NODES);
    all.push("brand-new".into());
    let body = body_with_names(&migration_pod(true), &all);
    let (f, report) = filter_with(Some(&state), &body);
    assert!(f.node_names.unwrap().iter().any(|n| n == "brand-new"));
    assert_eq!(report.nodes_degraded, vec![(Cause::NodeUnknown, 1)]);
    let (p, report) = prioritize_with(Some(&state), &body);
    assert_eq!(scores(&p)["brand-new"], 0);
    assert!(report.nodes_degraded.contains(&(Cause::NodeUnknown, 1)));
}

#[test]
fn node_without_digest_passes_and_gets_a_neutral_score() {
    let state = fixtures::state(NODES, &[]);
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, _) = filter_with(Some(&state), &body);
    assert!(f.node_names.unwrap().iter().any(|n| *n == node_name(3)));
    let (p, report) = prioritize_with(Some(&state), &body);
    assert_eq!(scores(&p)[&node_name(3)], 0);
    assert_eq!(report.nodes_degraded, vec![(Cause::NodeWithoutDigest, 1)]);
}

#[test]
fn view_not_ready_passes_every_node_with_neutral_scores() {
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, report) = filter_with(None, &body);
    assert_eq!(f.node_names.unwrap().len(), NODES);
    assert_eq!(report.pod_degraded, Some(Cause::ViewNotReady));
    let (p, _) = prioritize_with(None, &body);
    assert!(p.iter().all(|(_, score)| *score == 0));
}

#[test]
fn unknown_vmi_passes_every_node_with_neutral_scores() {
    let state = fixtures::state(NODES, &[]);
    let mut pod = migration_pod(true);
    pod["metadata"]["labels"][crate::api::kubevirt::CREATED_BY_LABEL] = json!("other-uid");
    pod["metadata"]["annotations"][crate::api::kubevirt::MIGRATION_JOB_NAME_ANNOTATION] =
        json!("other-migration");
    let body = body_with_names(&pod, &names(NODES));
    let (f, report) = filter_with(Some(&state), &body);
    assert_eq!(f.node_names.unwrap().len(), NODES);
    assert_eq!(report.pod_degraded, Some(Cause::VmiUnknown));
    let (p, _) = prioritize_with(Some(&state), &body);
    assert!(p.iter().all(|(_, score)| *score == 0));
}

#[test]
fn vm_without_published_summary_gets_neutral_scores_but_is_still_filtered() {
    let mut snapshot = fixtures::snapshot(NODES);
    snapshot.digests.retain(|d| d.node != node_name(0));
    let state = ClusterState::new(
        Arc::new(crate::plan::Planner::new(snapshot)),
        [&fixtures::vmi()],
        [&fixtures::vmim()],
        [],
    );
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (p, report) = prioritize_with(Some(&state), &body);
    assert!(p.iter().all(|(_, score)| *score == 0));
    assert_eq!(report.pod_degraded, Some(Cause::VmSummaryMissing));
    let (f, _) = filter_with(Some(&state), &body);
    assert!(f.failed_and_unresolvable_nodes.contains_key(&node_name(0)));
}

#[test]
fn whole_node_objects_are_echoed_when_not_node_cache_capable() {
    let state = fixtures::state(NODES, &[]);
    let items: Vec<_> = (0..6)
        .map(|i| json!({"metadata": {"name": node_name(i), "labels": {"i": i.to_string()}}, "status": {}}))
        .collect();
    let body = serde_json::to_vec(&json!({
        "Pod": migration_pod(true),
        "Nodes": {"metadata": {"resourceVersion": "7"}, "items": items}
    }))
    .unwrap();
    let (f, _) = filter_with(Some(&state), &body);
    assert!(f.node_names.is_none());
    let list = f.nodes.unwrap();
    assert_eq!(list.metadata.unwrap().get(), r#"{"resourceVersion":"7"}"#);
    let parsed: Vec<serde_json::Value> = list
        .items
        .iter()
        .map(|n| serde_json::from_str(n.get()).unwrap())
        .collect();
    let kept: Vec<_> = parsed
        .iter()
        .map(|n| n["metadata"]["name"].clone())
        .collect();
    assert_eq!(
        kept,
        vec![
            json!(node_name(1)),
            json!(node_name(2)),
            json!(node_name(3)),
            json!(node_name(5))
        ]
    );
    assert_eq!(
        list.items[0].get(),
        items[1].to_string(),
        "node objects are echoed untouched"
    );
    let (p, _) = prioritize_with(Some(&state), &body);
    assert_eq!(scores(&p)[&node_name(1)], 10);
}

#[test]
fn missing_pod_is_a_bad_request() {
    let args = decode(br#"{"NodeNames": ["a"]}"#).unwrap();
    assert!(super::filter(None, &args).is_err());
    assert!(super::prioritize(None, &args).is_err());
}

// ---- the router ----

fn app(state: Option<ClusterState>, max_body: usize) -> Router {
    let metrics = Arc::new(ExtenderMetrics::new().unwrap());
    router(
        Arc::new(FixedState(state.map(Arc::new))),
        metrics,
        &ServerConfig {
            max_body_bytes: max_body,
            ..ServerConfig::default()
        },
        Readiness::default(),
    )
}

async fn post(router: Router, path: &str, body: Vec<u8>) -> (StatusCode, String) {
    let response = router
        .oneshot(
            HttpRequest::post(path)
                .header("content-type", "application/json")
                .body(Body::from(body))
                .unwrap(),
        )
        .await
        .unwrap();
    let status = response.status();
    let bytes = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .unwrap();
    (status, String::from_utf8_lossy(&bytes).into_owned())
}

#[tokio::test]
async fn router_answers_both_verbs_in_pascal_case() {
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (status, text) = post(
        app(Some(fixtures::state(NODES, &[])), 1 << 20),
        "/filter",
        body.clone(),
    )
    .await;
    assert_eq!(status, StatusCode::OK, "{text}");
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v["NodeNames"].is_array() && v["FailedAndUnresolvableNodes"].is_object());
    let (status, text) = post(
        app(Some(fixtures::state(NODES, &[])), 1 << 20),
        "/prioritize",
        body,
    )
    .await;
    assert_eq!(status, StatusCode::OK);
    let v: serde_json::Value = serde_json::from_str(&text).unwrap();
    assert!(v
        .as_array()
        .unwrap()
        .iter()
        .any(|h| h["Host"] == node_name(1) && h["Score"] == 10));
}

#[tokio::test]
async fn configured_verbs_are_the_paths() {
    let metrics = Arc::new(ExtenderMetrics::new().unwrap());
    let r = router(
        Arc::new(FixedState(None)),
        metrics,
        &ServerConfig {
            filter_verb: "cg/filter".into(),
            ..ServerConfig::default()
        },
        Readiness::default(),
    );
    let body = body_with_names(&ordinary_pod(), &names(5));
    assert_eq!(
        post(r.clone(), "/cg/filter", body.clone()).await.0,
        StatusCode::OK
    );
    assert_eq!(post(r, "/filter", body).await.0, StatusCode::NOT_FOUND);
}

#[tokio::test]
async fn malformed_empty_and_mistyped_bodies_get_400_with_a_message() {
    for (body, says) in [
        (&b""[..], "empty request body"),
        (b"   ", "empty request body"),
        (b"{", "invalid ExtenderArgs"),
        (b"[1,2]", "invalid ExtenderArgs"),
        (br#"{"Pod": {}, "NodeNames": "n1"}"#, "invalid ExtenderArgs"),
        (br#"{"NodeNames": ["n1"]}"#, "Pod is missing"),
        (
            br#"{"Pod": {}, "Nodes": {"items": [{"metadata": {}}]}}"#,
            "Nodes.items[0] has no metadata.name",
        ),
    ] {
        let (status, text) = post(app(None, 1 << 20), "/filter", body.to_vec()).await;
        assert_eq!(
            status,
            StatusCode::BAD_REQUEST,
            "{}",
            String::from_utf8_lossy(body)
        );
        assert!(text.contains(says), "{text:?} should say {says:?}");
    }
}

#[tokio::test]
async fn body_over_the_limit_gets_413() {
    let body = body_with_names(&ordinary_pod(), &names(2000));
    assert!(body.len() > 4096);
    let (status, _) = post(app(None, 4096), "/prioritize", body).await;
    assert_eq!(status, StatusCode::PAYLOAD_TOO_LARGE);
}

#[tokio::test]
async fn degraded_answers_are_counted_in_metrics() {
    let r = app(None, 1 << 20);
    let body = body_with_names(&migration_pod(true), &names(5));
    assert_eq!(post(r.clone(), "/prioritize", body).await.0, StatusCode::OK);
    let response = r
        .oneshot(HttpRequest::get("/metrics").body(Body::empty()).unwrap())
        .await
        .unwrap();
    let text = String::from_utf8(
        axum::body::to_bytes(response.into_body(), usize::MAX)
            .await
            .unwrap()
            .to_vec(),
    )
    .unwrap();
    assert!(
        text.contains(r#"commonground_extender_degraded_pods_total{cause="view_not_ready",verb="prioritize"} 1"#),
        "{text}"
    );
    assert!(
        text.contains(r#"commonground_extender_requests_total{outcome="ok",verb="prioritize"} 1"#)
    );
}

#[tokio::test]
async fn a_client_that_never_finishes_its_headers_is_disconnected() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        app(None, 1 << 20),
        listener,
        None,
        std::time::Duration::from_millis(300),
        async move {
            let _ = stopped.await;
        },
    ));
    let mut conn = tokio::net::TcpStream::connect(addr).await.unwrap();
    conn.write_all(b"POST /filter HTTP/1.1\r\nHost: x\r\n")
        .await
        .unwrap();
    let mut buf = Vec::new();
    let read = tokio::time::timeout(
        std::time::Duration::from_secs(5),
        conn.read_to_end(&mut buf),
    )
    .await;
    assert!(
        read.is_ok(),
        "connection still open after the header timeout"
    );
    let _ = stop.send(());
    server.await.unwrap().unwrap();
}

fn seed_bodies() -> Vec<Vec<u8>> {
    vec![
        body_with_names(&migration_pod(true), &names(8)),
        body_with_names(&ordinary_pod(), &names(8)),
        serde_json::to_vec(&json!({"pod": migration_pod(false), "nodes": {"items": [
            {"metadata": {"name": node_name(1)}}, {"metadata": {"name": node_name(2)}}]}}))
        .unwrap(),
    ]
}

fn mutated_body() -> impl Strategy<Value = Vec<u8>> {
    let seeds = seed_bodies();
    (
        0..seeds.len(),
        proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>(), 0u8..3), 0..8),
    )
        .prop_map(move |(i, edits)| {
            let mut b = seeds[i].clone();
            for (at, byte, op) in edits {
                if b.is_empty() {
                    b.push(byte);
                    continue;
                }
                let at = at.index(b.len());
                match op {
                    0 => b[at] = byte,
                    1 => b.insert(at, byte),
                    _ => b.truncate(at),
                }
            }
            b
        })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, ..ProptestConfig::default() })]

    /// Random and mutated bodies get a 200 or a 400 (413 above the limit), never a panic.
    #[test]
    fn any_body_gets_200_or_400_never_a_panic(
        body in prop_oneof![proptest::collection::vec(any::<u8>(), 0..512), mutated_body()],
        prioritize in any::<bool>(),
    ) {
        let rt = tokio::runtime::Builder::new_current_thread().enable_time().build().unwrap();
        let path = if prioritize { "/prioritize" } else { "/filter" };
        let (status, text) = rt.block_on(post(app(Some(fixtures::state(8, &[])), 2048), path, body));
        prop_assert!(
            [StatusCode::OK, StatusCode::BAD_REQUEST, StatusCode::PAYLOAD_TOO_LARGE].contains(&status),
            "status {} body {}", status, text
        );
        if status == StatusCode::OK {
            prop_assert!(serde_json::from_str::<serde_json::Value>(&text).is_ok());
        } else {
            prop_assert!(!text.is_empty());
        }
    }
}

// ---- HTTPS ----

/// A self-signed certificate for `localhost`, written as PEM files.
fn self_signed(dir: &std::path::Path) -> (std::path::PathBuf, std::path::PathBuf, Vec<u8>) {
    let cert = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    let (cert_path, key_path) = (dir.join("tls.crt"), dir.join("tls.key"));
    std::fs::write(&cert_path, cert.cert.pem()).unwrap();
    std::fs::write(&key_path, cert.signing_key.serialize_pem()).unwrap();
    (cert_path, key_path, cert.cert.der().to_vec())
}

/// One HTTP/1.1 request over TLS, trusting only `ca`; the response as text.
async fn https_post(port: u16, ca: &[u8], path: &str, body: &[u8]) -> std::io::Result<String> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut roots = rustls::RootCertStore::empty();
    roots
        .add(rustls::pki_types::CertificateDer::from(ca.to_vec()))
        .unwrap();
    let config = rustls::ClientConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_root_certificates(roots)
    .with_no_client_auth();
    let connector = tokio_rustls::TlsConnector::from(Arc::new(config));
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await?;
    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut tls = connector.connect(name, tcp).await?;
    let head = format!(
        "POST {path} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n\
         Content-Length: {}\r\nConnection: close\r\n\r\n",
        body.len()
    );
    tls.write_all(head.as_bytes()).await?;
    tls.write_all(body).await?;
    let mut out = Vec::new();
    tls.read_to_end(&mut out).await?;
    Ok(String::from_utf8_lossy(&out).into_owned())
}

#[tokio::test]
async fn https_serves_the_verbs_with_the_given_certificate() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, ca) = self_signed(dir.path());
    let tls = tls_config(&cert, &key).unwrap();
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
    let server = tokio::spawn(serve(
        app(Some(fixtures::state(NODES, &[])), 1 << 20),
        listener,
        Some(tls),
        std::time::Duration::from_secs(5),
        async {
            let _ = stopped.await;
        },
    ));
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let answer = https_post(port, &ca, "/prioritize", &body).await.unwrap();
    assert!(answer.starts_with("HTTP/1.1 200"), "{answer}");
    let json = &answer[answer.find("\r\n\r\n").unwrap() + 4..];
    let list: serde_json::Value = serde_json::from_str(json).unwrap();
    let best = list
        .as_array()
        .unwrap()
        .iter()
        .find(|h| h["Score"] == 10)
        .unwrap();
    assert_eq!(best["Host"], node_name(1));
    // A client that does not trust the certificate gets no answer.
    let other = rcgen::generate_simple_self_signed(vec!["localhost".to_string()]).unwrap();
    assert!(https_post(port, other.cert.der(), "/filter", &body)
        .await
        .is_err());
    // Plain HTTP on the TLS port is not answered as HTTP.
    let plain = {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let mut tcp = tokio::net::TcpStream::connect(("127.0.0.1", port))
            .await
            .unwrap();
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
            .await
            .unwrap();
        let mut out = Vec::new();
        let _ = tcp.read_to_end(&mut out).await;
        out
    };
    assert!(!plain.starts_with(b"HTTP/1.1 200"));
    stop.send(()).unwrap();
    server.await.unwrap().unwrap();
}

#[test]
fn tls_files_that_do_not_fit_are_clear_errors() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key, _) = self_signed(dir.path());
    let missing = dir.path().join("missing.crt");
    let e = tls_config(&missing, &key).unwrap_err().to_string();
    assert!(e.contains("missing.crt"), "{e}");
    let other = tempfile::tempdir().unwrap();
    let (_, other_key, _) = self_signed(other.path());
    let e = tls_config(&cert, &other_key).unwrap_err().to_string();
    assert!(e.contains("do not match"), "{e}");
    std::fs::write(&missing, "not a certificate").unwrap();
    let e = tls_config(&missing, &key).unwrap_err().to_string();
    assert!(e.contains("no certificate"), "{e}");
}

// ---- memory groups (seed 001): a group is never split ----

/// vm1 (the fixture's VMI) and vm2 labelled into one memory group; `vm2_status` is vm2's
/// status, `tweak` edits the snapshot.
fn group_state(
    vm2_status: serde_json::Value,
    tweak: impl FnOnce(&mut crate::plan::ClusterSnapshot),
) -> ClusterState {
    use crate::api::migration::MEMORY_GROUP_LABEL;
    let mut snapshot = fixtures::snapshot(NODES);
    // vm2's content is on no other node: the union ranks like vm1 alone.
    snapshot.digests[0]
        .vms
        .push(fixtures::vm_summary("ns", "vm2", 5_000_000..5_000_100));
    tweak(&mut snapshot);
    let mut vm1 = fixtures::vmi();
    vm1.metadata.labels = Some([(MEMORY_GROUP_LABEL.to_string(), "g".to_string())].into());
    let vm2: crate::api::kubevirt::VirtualMachineInstance = serde_json::from_value(json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": "vm2", "namespace": "ns", "uid": "uid-vm2",
                     "labels": {MEMORY_GROUP_LABEL: "g"}},
        "spec": {"nodeSelector": {"tier": "gold"},
                 "domain": {"resources": {"requests": {"cpu": "1", "memory": "4Gi"}}}},
        "status": vm2_status
    }))
    .unwrap();
    ClusterState::new(
        Arc::new(crate::plan::Planner::new(snapshot)),
        [&vm1, &vm2],
        [&fixtures::vmim()],
        [],
    )
}

fn gold_everywhere_but(node: usize) -> impl FnOnce(&mut crate::plan::ClusterSnapshot) {
    move |s| {
        for (i, n) in s.nodes.iter_mut().enumerate() {
            if i != node {
                n.labels.insert("tier".into(), "gold".into());
            }
        }
    }
}

#[test]
fn a_group_still_together_is_placed_as_one_unit() {
    let state = group_state(json!({"nodeName": node_name(0)}), |s| {
        gold_everywhere_but(2)(s);
        // Room for vm1 (4 GiB) but not for vm1 and vm2 together (8 GiB).
        s.nodes[1].requested.memory_bytes = s.nodes[1].allocatable.memory_bytes - 6 * (1 << 30);
    });
    let body = body_with_names(&migration_pod(true), &names(NODES));
    let (f, report) = filter_with(Some(&state), &body);
    assert!(
        f.failed_nodes[&node_name(1)].contains("memory"),
        "{:?}",
        f.failed_nodes
    );
    assert!(
        f.failed_nodes[&node_name(2)].contains("memory group"),
        "{:?}",
        f.failed_nodes
    );
    let d = report.decision.unwrap();
    assert_eq!(d.group_size, 2);
    assert_eq!(d.pinned, None);
    // Nodes 1 and 2 hold the most of vm1 but cannot take the group: the next best wins.
    let best = node_name(NODES - 1);
    assert_eq!(d.best.as_deref(), Some(best.as_str()));
    let (p, _) = prioritize_with(Some(&state), &body);
    assert_eq!(scores(&p)[&best], 10);
    assert_eq!(scores(&p)[&node_name(1)], 0);
}

#[test]
fn a_member_follows_the_group_to_where_it_went_or_is_going() {
    let body = body_with_names(&migration_pod(true), &names(NODES));
    for (status, there) in [
        (json!({"nodeName": node_name(7)}), 7),
        (
            json!({"nodeName": node_name(0),
                   "migrationState": {"targetNode": node_name(9), "completed": false}}),
            9,
        ),
    ] {
        let state = group_state(status, gold_everywhere_but(usize::MAX));
        let (f, report) = filter_with(Some(&state), &body);
        assert_eq!(f.node_names.as_ref().unwrap(), &vec![node_name(there)]);
        assert!(f.failed_and_unresolvable_nodes[&node_name(1)].contains("pinned"));
        assert_eq!(report.decision.unwrap().pinned, Some(node_name(there)));
    }
    // A migration of vm2 that completed or failed no longer draws vm1 anywhere.
    let state = group_state(
        json!({"nodeName": node_name(0),
               "migrationState": {"targetNode": node_name(9), "failed": true}}),
        gold_everywhere_but(usize::MAX),
    );
    let (_, report) = filter_with(Some(&state), &body);
    assert_eq!(report.decision.unwrap().pinned, None);
}
