//! The reconcilers against the in-memory API server (`fake_api`): what each one writes to the
//! API for a given cluster, with no control plane. The pure decisions are tested in
//! `decide.rs`; these tests check that the executors carry them out: the KubeVirt migration
//! made once and pinned to the chosen node, a create that meets "already exists", a restart
//! in every phase, no status write when nothing changed, path objects removed, the
//! rebalancer's requests.

use std::sync::Arc;
use std::time::Duration;

use axum::http::Method;
use serde_json::{json, Value};

use super::fake_api::FakeApi;
use super::metrics::ControllerMetrics;
use super::status::TransferModel;
use super::{migration, rebalance, Context};
use crate::api::migration::AttemptOutcome;
use crate::api::{RebalancePolicy, VirtualMachineMigration};
use crate::view::{ClusterView, Fixed, ViewConfig};

const VMMS: &str = "/apis/commonground.dev/v1alpha1/namespaces/ns/virtualmachinemigrations";
const VMIMS: &str = "/apis/kubevirt.io/v1/namespaces/ns/virtualmachineinstancemigrations";
const POLICIES: &str = "/apis/migrations.kubevirt.io/v1alpha1/migrationpolicies";
const REBALANCE: &str = "/apis/commonground.dev/v1alpha1/rebalancepolicies";

fn node(name: &str) -> Value {
    json!({
        "apiVersion": "v1", "kind": "Node",
        "metadata": {"name": name, "labels": {
            "kubernetes.io/hostname": name, "kubevirt.io/schedulable": "true"}},
        "status": {
            "allocatable": {"cpu": "16", "memory": "64Gi", "pods": "110"},
            "conditions": [{"type": "Ready", "status": "True"}]
        }
    })
}

fn vmi(name: &str, on: &str) -> Value {
    json!({
        "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
        "metadata": {"name": name, "namespace": "ns", "uid": format!("uid-{name}")},
        "spec": {"domain": {"resources": {"requests": {"cpu": "2", "memory": "4Gi"}}}},
        "status": {"nodeName": on, "phase": "Running",
                   "conditions": [{"type": "LiveMigratable", "status": "True"}]}
    })
}

/// A request for `vm1` as the API server holds it after the finalizer was added.
fn request(status: Value) -> Value {
    json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "VirtualMachineMigration",
        "metadata": {"name": "move", "namespace": "ns", "uid": "0a1b2c3d-4e5f-6789-abcd-ef0123456789",
                     "generation": 1, "finalizers": [migration::FINALIZER]},
        "spec": {"vmiName": "vm1"},
        "status": status
    })
}

fn vmim_path(vmm: &VirtualMachineMigration) -> String {
    format!("{VMIMS}/{}", super::kubevirt::vmim_name(vmm))
}

fn object<K: serde::de::DeserializeOwned>(v: &Value) -> K {
    serde_json::from_value(v.clone()).expect("fixture")
}

fn objects<K: serde::de::DeserializeOwned>(vs: &[Value]) -> Vec<K> {
    vs.iter().map(object).collect()
}

/// A context over `fake` whose view holds exactly `fixed`.
fn context(fake: &FakeApi, fixed: Fixed) -> Arc<Context> {
    let client = fake.client();
    let view = ClusterView::fixed(ViewConfig::default(), fixed);
    let transfer = TransferModel {
        bandwidth: 1.25e9,
        downtime_limit_ms: 300.0,
        cores_per_gbps: 0.25,
        measured_rate_max_age: Duration::from_secs(3600),
    };
    Arc::new(Context::new(
        client,
        view,
        ControllerMetrics::new(),
        "test".into(),
        transfer,
    ))
}

fn cluster(vmms: &[Value]) -> Fixed {
    Fixed {
        nodes: objects(&[node("a"), node("b")]),
        vmis: objects(&[vmi("vm1", "a")]),
        vmms: objects(vmms),
        ..Default::default()
    }
}

/// Stores `vmm` in the fake API and reconciles it once.
async fn reconcile_request(
    fake: &FakeApi,
    ctx: &Arc<Context>,
    vmm: &Value,
) -> VirtualMachineMigration {
    fake.insert(&format!("{VMMS}/move"), vmm.clone());
    let obj: VirtualMachineMigration = object(vmm);
    migration::reconcile(Arc::new(obj), ctx.clone())
        .await
        .expect("reconcile");
    object(&fake.get(&format!("{VMMS}/move")).expect("request kept"))
}

fn phase(vmm: &VirtualMachineMigration) -> String {
    serde_json::to_value(vmm.status.as_ref().expect("status").phase)
        .unwrap()
        .as_str()
        .unwrap()
        .to_string()
}

fn creates(fake: &FakeApi, collection: &str) -> usize {
    fake.writes()
        .iter()
        .filter(|w| *w == &format!("POST {collection}"))
        .count()
}

#[tokio::test]
async fn a_new_request_is_planned_and_handed_to_kubevirt_pinned_to_the_target() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    assert_eq!(phase(&after), "Migrating");
    let status = after.status.as_ref().unwrap();
    assert_eq!(status.source_node.as_deref(), Some("a"));
    assert_eq!(status.target_node.as_deref(), Some("b"));
    let vmim = fake
        .get(&vmim_path(&after))
        .expect("KubeVirt migration made");
    assert_eq!(vmim["spec"]["vmiName"], "vm1");
    assert_eq!(
        vmim["spec"]["addedNodeSelector"]["kubernetes.io/hostname"],
        "b"
    );
    assert_eq!(
        vmim["metadata"]["ownerReferences"][0]["kind"],
        "VirtualMachineMigration"
    );
    assert_eq!(creates(&fake, VMIMS), 1);
}

#[tokio::test]
async fn a_create_that_meets_an_existing_kubevirt_migration_is_not_an_error() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    fake.fail_next(Method::POST, VMIMS, 409);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    assert_eq!(
        phase(&after),
        "Migrating",
        "made before a restart counts as made"
    );
    assert!(after.status.unwrap().kubevirt_migration.is_some());
}

#[tokio::test]
async fn a_restart_while_migrating_follows_kubevirt_and_makes_no_second_migration() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let migrating = reconcile_request(&fake, &ctx, &vmm).await;
    // A new controller: its view shows the request as the API holds it now.
    let now = serde_json::to_value(&migrating).unwrap();
    let ctx = context(&fake, cluster(std::slice::from_ref(&now)));
    fake.forget_requests();
    let again = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&again), "Migrating");
    assert_eq!(creates(&fake, VMIMS), 0, "{:?}", fake.writes());
    assert!(
        !fake
            .writes()
            .iter()
            .any(|w| w.starts_with("PATCH") && w.ends_with("/status")),
        "nothing changed, so no status write: {:?}",
        fake.writes()
    );

    // KubeVirt reports success: the request ends Succeeded, its times recorded.
    let path = vmim_path(&again);
    let mut vmim = fake.get(&path).unwrap();
    vmim["status"] = json!({"phase": "Succeeded", "migrationState": {
        "sourceNode": "a", "targetNode": "b", "completed": true,
        "startTimestamp": "2026-01-01T00:00:00Z", "endTimestamp": "2026-01-01T00:00:09Z"}});
    fake.insert(&path, vmim);
    let now = serde_json::to_value(&again).unwrap();
    let done = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&done), "Succeeded");
    assert!(done.status.as_ref().unwrap().end_time.is_some());

    // A final request is left alone: no request at all beyond reading it.
    fake.forget_requests();
    let now = serde_json::to_value(&done).unwrap();
    reconcile_request(&fake, &ctx, &now).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_kubevirt_failure_on_the_last_attempt_ends_the_request_failed_with_kubevirts_reason() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["maxAttempts"] = json!(1);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let migrating = reconcile_request(&fake, &ctx, &vmm).await;
    let path = vmim_path(&migrating);
    let mut vmim = fake.get(&path).unwrap();
    vmim["status"] = json!({"phase": "Failed", "migrationState": {
        "sourceNode": "a", "targetNode": "b", "failed": true,
        "failureReason": "target domain crashed"}});
    fake.insert(&path, vmim);
    let after = reconcile_request(&fake, &ctx, &serde_json::to_value(&migrating).unwrap()).await;
    assert_eq!(phase(&after), "Failed");
    let status = after.status.unwrap();
    assert!(
        status
            .conditions
            .iter()
            .any(|c| c.r#type == "Failed" && c.status == "True"),
        "{:?}",
        status.conditions
    );
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("target domain crashed"),
        "{status:?}"
    );
    assert_eq!(status.attempts.len(), 1);
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Failed);
    assert_eq!(creates(&fake, VMIMS), 1);
}

/// KubeVirt's end of a migration whose target pod stayed unschedulable: virt-controller
/// deleted the pod at its timeout and failed the migration, naming no node and no reason.
fn never_scheduled() -> Value {
    json!({"phase": "Failed", "phaseTransitionTimestamps": [
        {"phase": "Pending", "phaseTransitionTimestamp": "2026-01-01T00:00:00Z"},
        {"phase": "Scheduling", "phaseTransitionTimestamp": "2026-01-01T00:00:01Z"},
        {"phase": "Failed", "phaseTransitionTimestamp": "2026-01-01T00:05:01Z"}]})
}

fn three_nodes(vmms: &[Value]) -> Fixed {
    Fixed {
        nodes: objects(&[node("a"), node("b"), node("c")]),
        ..cluster(vmms)
    }
}

#[tokio::test]
async fn a_target_pod_that_never_ran_is_replanned_on_the_next_node_once_kubevirt_gave_up() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["unschedulableTimeout"] = json!("30s");
    let ctx = context(&fake, three_nodes(std::slice::from_ref(&vmm)));
    let first = reconcile_request(&fake, &ctx, &vmm).await;
    let status = first.status.clone().unwrap();
    assert_eq!(status.target_node.as_deref(), Some("b"));
    assert_eq!(status.attempts.len(), 1);
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Running);
    let path = vmim_path(&first);
    let made = fake.get(&path).unwrap();
    assert_eq!(
        made["metadata"]["annotations"]["kubevirt.io/migrationUnschedulablePodTimeoutSeconds"],
        "30"
    );

    // While KubeVirt still schedules the target pod nothing new is made, however often the
    // request is reconciled.
    let mut vmim = made.clone();
    vmim["status"] = json!({"phase": "Scheduling"});
    fake.insert(&path, vmim.clone());
    fake.forget_requests();
    let mut now = serde_json::to_value(&first).unwrap();
    for _ in 0..3 {
        now = serde_json::to_value(reconcile_request(&fake, &ctx, &now).await).unwrap();
    }
    assert_eq!(creates(&fake, VMIMS), 0, "{:?}", fake.writes());

    // KubeVirt gives up on b: the attempt is recorded, the request plans again.
    vmim["status"] = never_scheduled();
    fake.insert(&path, vmim);
    let replanning = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&replanning), "Pending");
    let status = replanning.status.clone().unwrap();
    assert_eq!(status.attempts.len(), 1);
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Failed);
    assert!(
        status.attempts[0].reason.contains("never ran on b"),
        "{:?}",
        status.attempts[0]
    );
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("planning again without b"),
        "{status:?}"
    );
    assert_eq!(creates(&fake, VMIMS), 0, "not in the same step");

    // The next reconcile chooses c and makes a second KubeVirt migration, pinned there.
    let second = reconcile_request(&fake, &ctx, &serde_json::to_value(&replanning).unwrap()).await;
    assert_eq!(phase(&second), "Migrating");
    let status = second.status.clone().unwrap();
    assert_eq!(status.target_node.as_deref(), Some("c"));
    let b = status.candidates.iter().find(|c| c.node == "b").unwrap();
    assert_eq!(b.verdict, "Filtered");
    assert_eq!(b.estimated_seconds, None, "no time for a filtered node");
    let c = status.candidates.iter().find(|c| c.node == "c").unwrap();
    assert!(
        c.estimated_seconds.is_some_and(|s| s > 0.0),
        "every passing candidate has its time: {c:?}"
    );
    assert!(
        b.reason
            .starts_with("an earlier attempt to migrate here failed"),
        "{b:?}"
    );
    let name2 = format!("{}-2", super::kubevirt::vmim_name(&second));
    assert_eq!(status.kubevirt_migration.as_deref(), Some(name2.as_str()));
    assert_eq!(status.attempts.len(), 2);
    assert_eq!(
        (status.attempts[1].node.as_str(), status.attempts[1].outcome),
        ("c", AttemptOutcome::Running)
    );
    let path2 = format!("{VMIMS}/{name2}");
    let vmim2 = fake.get(&path2).expect("second KubeVirt migration");
    assert_eq!(
        vmim2["spec"]["addedNodeSelector"]["kubernetes.io/hostname"],
        "c"
    );
    assert_eq!(creates(&fake, VMIMS), 1);

    // It succeeds: the request ends Succeeded on c, both attempts in its status.
    let mut vmim2 = vmim2;
    vmim2["status"] = json!({"phase": "Succeeded", "migrationState": {
        "sourceNode": "a", "targetNode": "c", "completed": true,
        "startTimestamp": "2026-01-01T00:06:00Z", "endTimestamp": "2026-01-01T00:06:09Z"}});
    fake.insert(&path2, vmim2);
    let done = reconcile_request(&fake, &ctx, &serde_json::to_value(&second).unwrap()).await;
    assert_eq!(phase(&done), "Succeeded");
    let status = done.status.unwrap();
    assert_eq!(status.target_node.as_deref(), Some("c"));
    let outcomes: Vec<(&str, AttemptOutcome)> = status
        .attempts
        .iter()
        .map(|a| (a.node.as_str(), a.outcome))
        .collect();
    assert_eq!(
        outcomes,
        vec![
            ("b", AttemptOutcome::Failed),
            ("c", AttemptOutcome::Succeeded)
        ]
    );
}

#[tokio::test]
async fn a_stale_copy_of_a_replanned_request_records_nothing_twice_and_makes_nothing() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, three_nodes(std::slice::from_ref(&vmm)));
    let first = reconcile_request(&fake, &ctx, &vmm).await;
    let path = vmim_path(&first);
    let mut vmim = fake.get(&path).unwrap();
    vmim["status"] = never_scheduled();
    fake.insert(&path, vmim);
    let stale = serde_json::to_value(&first).unwrap();
    let replanning = reconcile_request(&fake, &ctx, &stale).await;
    assert_eq!(phase(&replanning), "Pending");
    // The watch delivers the old copy again: the API holds the newer status.
    let newer = fake.get(&format!("{VMMS}/move")).unwrap();
    fake.forget_requests();
    migration::reconcile(Arc::new(object(&stale)), ctx.clone())
        .await
        .expect("reconcile");
    assert_eq!(creates(&fake, VMIMS), 0, "{:?}", fake.writes());
    assert_eq!(fake.get(&format!("{VMMS}/move")).unwrap(), newer);
}

#[tokio::test]
async fn when_no_other_node_is_left_after_a_failed_attempt_the_request_fails() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let first = reconcile_request(&fake, &ctx, &vmm).await;
    let path = vmim_path(&first);
    let mut vmim = fake.get(&path).unwrap();
    vmim["status"] = never_scheduled();
    fake.insert(&path, vmim);
    let replanning = reconcile_request(&fake, &ctx, &serde_json::to_value(&first).unwrap()).await;
    assert_eq!(phase(&replanning), "Pending");
    let after = reconcile_request(&fake, &ctx, &serde_json::to_value(&replanning).unwrap()).await;
    assert_eq!(phase(&after), "Failed");
    let status = after.status.unwrap();
    let failed = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Failed")
        .unwrap();
    assert_eq!(failed.reason, "NoTargetLeft");
    assert!(failed.message.contains("b ("), "{}", failed.message);
    assert_eq!(creates(&fake, VMIMS), 1, "{:?}", fake.writes());
}

#[tokio::test]
async fn a_request_for_a_missing_vmi_fails_once_and_then_waits_for_a_change() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let mut fixed = cluster(std::slice::from_ref(&vmm));
    fixed.vmis.clear();
    let ctx = context(&fake, fixed);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    let status = after.status.clone().unwrap();
    assert_eq!(phase(&after), "Failed");
    assert!(
        status.reason.as_deref().unwrap_or_default().contains("vm1"),
        "{status:?}"
    );
    assert_eq!(creates(&fake, VMIMS), 0);
    fake.forget_requests();
    reconcile_request(&fake, &ctx, &serde_json::to_value(&after).unwrap()).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_dry_run_is_planned_and_nothing_is_made() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["dryRun"] = json!(true);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    assert_eq!(phase(&after), "Planned");
    assert_eq!(after.status.unwrap().target_node.as_deref(), Some("b"));
    assert_eq!(creates(&fake, VMIMS), 0);
}

#[tokio::test]
async fn a_new_dry_run_gets_no_finalizer_and_is_planned_in_one_write() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["dryRun"] = json!(true);
    vmm["metadata"]["finalizers"] = json!([]);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    assert_eq!(phase(&after), "Planned");
    assert!(after.metadata.finalizers.unwrap_or_default().is_empty());
    // One write to the request (its status) and its Event; no finalizer patch.
    let writes = fake.writes();
    let own: Vec<&String> = writes.iter().filter(|w| w.contains(VMMS)).collect();
    assert_eq!(
        own,
        vec![&format!("PATCH {VMMS}/move/status")],
        "{writes:?}"
    );
    // Turned into a real request, it gets the finalizer before anything is made.
    let mut real = object::<VirtualMachineMigration>(&vmm);
    assert!(!migration::needs_finalizer(&real));
    real.spec.dry_run = false;
    assert!(migration::needs_finalizer(&real));
}

#[tokio::test]
async fn a_failed_status_write_is_an_error_for_the_retry_and_loses_nothing() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    fake.insert(&format!("{VMMS}/move"), vmm.clone());
    fake.fail_next(Method::PATCH, &format!("{VMMS}/move/status"), 500);
    let result = migration::reconcile(Arc::new(object(&vmm)), ctx.clone()).await;
    assert!(result.is_err(), "the failure is reported for a retry");
    // The retry finds the KubeVirt migration made and completes the status.
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    assert_eq!(phase(&after), "Migrating");
    assert_eq!(creates(&fake, VMIMS), 1, "one KubeVirt migration only");
}

#[tokio::test]
async fn deleting_a_request_in_flight_aborts_kubevirt_removes_its_paths_and_lets_it_go() {
    let fake = FakeApi::new();
    let vmm = request(Value::Null);
    let ctx = context(&fake, cluster(std::slice::from_ref(&vmm)));
    let migrating = reconcile_request(&fake, &ctx, &vmm).await;
    let owner = super::labels::owner_id(&migrating.metadata);
    // Path objects as an earlier reconcile left them.
    fake.insert(
        &format!("{POLICIES}/{owner}"),
        json!({"apiVersion": "migrations.kubevirt.io/v1alpha1", "kind": "MigrationPolicy",
               "metadata": {"name": owner}, "spec": {"selectors": {}}}),
    );
    let mut deleting = serde_json::to_value(&migrating).unwrap();
    deleting["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
    deleting["status"]["paths"] = json!([{"network": "fast", "bandwidthBytesPerSecond": 1e9}]);
    fake.insert(&format!("{VMMS}/move"), deleting.clone());
    migration::reconcile(Arc::new(object(&deleting)), ctx.clone())
        .await
        .expect("cleanup");
    assert!(
        fake.get(&vmim_path(&migrating)).is_none(),
        "KubeVirt migration deleted"
    );
    assert!(
        fake.get(&format!("{POLICIES}/{owner}")).is_none(),
        "bandwidth policy removed"
    );
    assert!(
        fake.get(&format!("{VMMS}/move")).is_none(),
        "finalizer removed, the request is gone: {:?}",
        fake.writes()
    );
}

fn policy(spec: Value, status: Value) -> Value {
    json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "RebalancePolicy",
        "metadata": {"name": "even", "uid": "9f8e7d6c-5b4a-3210-fedc-ba9876543210", "generation": 1},
        "spec": spec, "status": status
    })
}

/// A digest whose VMs carry these CPU loads (no sketches: the rebalancer reads loads only).
fn digest(node: &str, vms: &[(&str, f64)]) -> Value {
    let vms: Vec<Value> = vms
        .iter()
        .map(|(name, cpu)| {
            json!({"namespace": "ns", "name": name, "memoryBytes": 1u64 << 30,
            "regions": 0, "zeroRegions": 0, "sketch": "", "load": {"cpuCores": cpu,
            "ioBytesPerSecond": 0.0, "memoryBytes": 0, "composite": 0.0}})
        })
        .collect();
    json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "NodeRegionDigest",
        "metadata": {"name": node}, "spec": {"nodeName": node},
        "status": {"workGroup": "", "pageSize": 4096, "regionPages": 16, "keyId": "k",
            "capacity": {"cpuMillis": 16000, "memoryBytes": 68719476736u64},
            "load": {"cpuCores": 0.0, "ioBytesPerSecond": 0.0, "memoryBytes": 0, "composite": 0.0},
            "vmCount": vms.len(), "vms": vms, "sketch": "", "scanTime": "2026-01-01T00:00:00Z",
            "scanMode": "Full"}
    })
}

/// Three busy VMs on node a, none on node b.
fn rebalance_cluster() -> Fixed {
    Fixed {
        nodes: objects(&[node("a"), node("b")]),
        vmis: objects(&[vmi("vm1", "a"), vmi("vm2", "a"), vmi("vm3", "a")]),
        digests: objects(&[
            digest("a", &[("vm1", 4.0), ("vm2", 4.0), ("vm3", 4.0)]),
            digest("b", &[]),
        ]),
        ..Default::default()
    }
}

async fn reconcile_policy(fake: &FakeApi, ctx: &Arc<Context>, p: &Value) -> RebalancePolicy {
    fake.insert(&format!("{REBALANCE}/even"), p.clone());
    rebalance::reconcile(Arc::new(object(p)), ctx.clone())
        .await
        .expect("reconcile");
    object(&fake.get(&format!("{REBALANCE}/even")).unwrap())
}

#[tokio::test]
async fn a_rebalancing_round_asks_for_a_move_off_the_loaded_node_then_waits_its_interval() {
    let fake = FakeApi::new();
    let ctx = context(&fake, rebalance_cluster());
    let p = policy(
        json!({"interval": "10m", "weights": {"cpu": 1.0, "io": 0.0, "memory": 0.0}}),
        Value::Null,
    );
    let after = reconcile_policy(&fake, &ctx, &p).await;
    let status = after.status.clone().unwrap();
    assert_eq!(status.decisions.len(), 1, "{status:?}");
    let d = &status.decisions[0];
    assert_eq!((d.from.as_str(), d.to.as_str()), ("a", "b"));
    let made = fake.paths(VMMS);
    assert_eq!(made.len(), 1, "{made:?}");
    let vmm = fake.get(&made[0]).unwrap();
    assert_eq!(vmm["spec"]["target"]["nodeName"], "b");
    assert_eq!(
        vmm["metadata"]["labels"][rebalance::POLICY_LABEL],
        super::labels::owner_id(&after.metadata)
    );
    assert!(status
        .conditions
        .iter()
        .any(|c| c.r#type == "Ready" && c.status == "True"));

    // Within the interval nothing happens, whatever woke the reconciler.
    fake.forget_requests();
    let again = reconcile_policy(&fake, &ctx, &serde_json::to_value(&after).unwrap()).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    assert_eq!(again.status, after.status);
}

#[tokio::test]
async fn a_move_request_made_before_a_restart_is_not_an_error() {
    let fake = FakeApi::new();
    let ctx = context(&fake, rebalance_cluster());
    let p = policy(json!({"interval": "10m"}), Value::Null);
    fake.fail_next(Method::POST, VMMS, 409);
    let after = reconcile_policy(&fake, &ctx, &p).await;
    let decisions = after.status.unwrap().decisions;
    assert_eq!(decisions.len(), 1);
    assert!(decisions[0].migration.is_some());
}

#[tokio::test]
async fn a_dry_run_policy_records_decisions_and_makes_no_request() {
    let fake = FakeApi::new();
    let ctx = context(&fake, rebalance_cluster());
    let p = policy(json!({"interval": "10m", "dryRun": true}), Value::Null);
    let after = reconcile_policy(&fake, &ctx, &p).await;
    let decisions = after.status.unwrap().decisions;
    assert_eq!(decisions.len(), 1);
    assert_eq!(decisions[0].migration, None);
    assert!(fake.paths(VMMS).is_empty());
}

#[tokio::test]
async fn an_invalid_policy_gets_a_condition_once_and_is_not_retried() {
    let fake = FakeApi::new();
    let ctx = context(&fake, rebalance_cluster());
    let p = policy(json!({"interval": "99999999999999999999h"}), Value::Null);
    let after = reconcile_policy(&fake, &ctx, &p).await;
    let status = after.status.clone().unwrap();
    let ready = status
        .conditions
        .iter()
        .find(|c| c.r#type == "Ready")
        .unwrap();
    assert_eq!(
        (ready.status.as_str(), ready.reason.as_str()),
        ("False", super::validate::INVALID_SPEC)
    );
    assert!(fake.paths(VMMS).is_empty());
    fake.forget_requests();
    reconcile_policy(&fake, &ctx, &serde_json::to_value(&after).unwrap()).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

/// A `Follow` request whose VM moved from a to b at `ended`, with member vm2 still on a.
fn following(ended: &str, deadline: Option<&str>) -> (Fixed, Value) {
    let mut vmm = request(json!({
        "phase": "Succeeded", "sourceNode": "a", "targetNode": "b",
        "startTime": ended, "endTime": ended,
        "members": [{"name": "vm2", "phase": "Waiting"}]
    }));
    vmm["spec"]["group"] = json!("Follow");
    if let Some(d) = deadline {
        vmm["spec"]["followDeadline"] = json!(d);
    }
    let fixed = Fixed {
        nodes: objects(&[node("a"), node("b")]),
        vmis: objects(&[vmi("vm1", "b"), vmi("vm2", "a")]),
        vmms: objects(std::slice::from_ref(&vmm)),
        ..Default::default()
    };
    (fixed, vmm)
}

#[tokio::test]
async fn a_follow_request_past_its_deadline_names_the_members_left_behind_and_stops() {
    let fake = FakeApi::new();
    let (fixed, vmm) = following("2026-01-01T00:00:00Z", None);
    let ctx = context(&fake, fixed);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    let status = after.status.clone().unwrap();
    let passed = status
        .conditions
        .iter()
        .find(|c| c.r#type == super::decide::FOLLOW_DEADLINE_PASSED)
        .expect("deadline condition");
    assert_eq!(passed.status, "True");
    assert!(passed.message.contains("vm2"), "{}", passed.message);
    // It no longer re-queues: the next reconcile writes nothing.
    fake.forget_requests();
    reconcile_request(&fake, &ctx, &serde_json::to_value(&after).unwrap()).await;
    assert!(fake.writes().is_empty(), "{:?}", fake.writes());
}

#[tokio::test]
async fn a_follow_request_within_its_deadline_keeps_waiting_for_members() {
    let fake = FakeApi::new();
    let (fixed, vmm) = following(&crate::api::time::now_rfc3339(), Some("1h"));
    let ctx = context(&fake, fixed);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    let status = after.status.unwrap();
    assert!(!status
        .conditions
        .iter()
        .any(|c| c.r#type == super::decide::FOLLOW_DEADLINE_PASSED));
    let shared = status
        .conditions
        .iter()
        .find(|c| c.r#type == "SharedTransferComplete")
        .expect("progress condition");
    assert_eq!(shared.status, "False");
}

/// A request for vm1 (4 GiB) from a to b, whose relay a measured at 100 MB/s on a migration
/// that ended at `measured_at`.
fn measured_to_b(measured_at: &str) -> (Fixed, Value) {
    let mut vmm = request(Value::Null);
    vmm["spec"]["dryRun"] = json!(true);
    let mut a = digest("a", &[("vm1", 1.0)]);
    a["status"]["transfers"] = json!([{"peerRelay": "10.0.0.2:4480", "bytes": 1u64 << 30,
        "seconds": 10.0, "bytesPerSecond": 1.0e8, "time": measured_at}]);
    let mut b = digest("b", &[]);
    b["status"]["relay"] = json!({"address": "10.0.0.2:4443", "protocolVersion": 1,
        "regionPages": 16});
    let fixed = Fixed {
        digests: objects(&[a, b]),
        ..cluster(std::slice::from_ref(&vmm))
    };
    (fixed, vmm)
}

#[tokio::test]
async fn the_estimate_uses_the_rate_the_sources_relay_measured_to_the_target() {
    let fake = FakeApi::new();
    let (fixed, vmm) = measured_to_b(&crate::api::time::now_rfc3339());
    let ctx = context(&fake, fixed);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    let status = after.status.unwrap();
    assert!(
        status
            .notes
            .iter()
            .any(|n| n.contains("measured by the relay on the migration to b")),
        "{:?}",
        status.notes
    );
    let estimate = status.estimate.unwrap();
    assert_eq!(estimate.bandwidth_source, "Measured");
    assert_eq!(estimate.bandwidth_bytes_per_second, Some(100_000_000));
    // 4 GiB at the measured 100 MB/s instead of the configured 1.25 GB/s.
    let seconds = estimate.duration_seconds.unwrap();
    assert!(seconds > 30.0, "{seconds}");
}

#[tokio::test]
async fn a_rate_measured_longer_ago_than_the_maximum_age_gives_way_to_the_configured_one() {
    let fake = FakeApi::new();
    let two_hours_ago = crate::api::time::format_rfc3339(
        crate::api::time::Timestamp::now() - Duration::from_secs(7200),
    );
    let (fixed, vmm) = measured_to_b(&two_hours_ago);
    let ctx = context(&fake, fixed);
    let after = reconcile_request(&fake, &ctx, &vmm).await;
    let estimate = after.status.unwrap().estimate.unwrap();
    assert_eq!(estimate.bandwidth_source, "Configured");
    assert_eq!(estimate.bandwidth_bytes_per_second, Some(1_250_000_000));
    assert!(
        estimate
            .bandwidth_reason
            .contains("older than the maximum age of 3600s")
            && estimate.bandwidth_reason.contains(&two_hours_ago),
        "{}",
        estimate.bandwidth_reason
    );
    // 4 GiB at the configured 1.25 GB/s.
    let seconds = estimate.duration_seconds.unwrap();
    assert!(seconds < 5.0, "{seconds}");
}

/// vm1 and vm2 labelled into one memory group on node a; nodes a, b and c; a `Together`
/// request for vm1 that may try two targets; `vmims` are what the view shows of KubeVirt's
/// migrations.
fn together_cluster(vmm: &Value, vmims: &[Value]) -> Fixed {
    let grouped = |name: &str| {
        let mut v = vmi(name, "a");
        v["metadata"]["labels"] = json!({(crate::api::migration::MEMORY_GROUP_LABEL): "g"});
        v
    };
    Fixed {
        vmis: objects(&[grouped("vm1"), grouped("vm2")]),
        vmims: objects(vmims),
        ..three_nodes(std::slice::from_ref(vmm))
    }
}

#[tokio::test]
async fn a_together_group_is_replanned_as_a_whole_only_once_every_member_migration_ended() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["group"] = json!("Together");
    vmm["spec"]["maxAttempts"] = json!(2);
    let ctx = context(&fake, together_cluster(&vmm, &[]));
    let first = reconcile_request(&fake, &ctx, &vmm).await;
    let status = first.status.clone().unwrap();
    assert_eq!(status.target_node.as_deref(), Some("b"));
    let member_name = format!("{}-m-vm2", super::kubevirt::vmim_name(&first));
    assert_eq!(
        status.members[0].kubevirt_migration.as_deref(),
        Some(member_name.as_str())
    );
    assert_eq!(creates(&fake, VMIMS), 2, "{:?}", fake.writes());

    // KubeVirt gives up on vm1's target pod on b while vm2's migration is still scheduling:
    // the request waits, records nothing and makes nothing.
    let path = vmim_path(&first);
    let mut main = fake.get(&path).unwrap();
    main["status"] = never_scheduled();
    fake.insert(&path, main);
    let member_path = format!("{VMIMS}/{member_name}");
    let mut member = fake.get(&member_path).unwrap();
    member["status"] = json!({"phase": "Scheduling"});
    let now = serde_json::to_value(&first).unwrap();
    let ctx = context(&fake, together_cluster(&now, std::slice::from_ref(&member)));
    fake.forget_requests();
    let waiting = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&waiting), "Migrating");
    let status = waiting.status.clone().unwrap();
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("group members vm2"),
        "{status:?}"
    );
    assert_eq!(status.attempts.len(), 1);
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Running);
    assert_eq!(creates(&fake, VMIMS), 0, "{:?}", fake.writes());

    // vm2's migration fails the same way; both VMs are still on a: the group plans again.
    member["status"] = never_scheduled();
    fake.insert(&member_path, member.clone());
    let now = serde_json::to_value(&waiting).unwrap();
    let ctx = context(&fake, together_cluster(&now, std::slice::from_ref(&member)));
    let replanning = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&replanning), "Pending");
    let status = replanning.status.clone().unwrap();
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Failed);
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("planning the group again without b"),
        "{status:?}"
    );
    assert_eq!(status.members[0].kubevirt_migration, None);
    assert_eq!(creates(&fake, VMIMS), 0, "not in the same step");

    // The next reconcile moves both to c, by migrations of the second attempt.
    let now = serde_json::to_value(&replanning).unwrap();
    let ctx = context(&fake, together_cluster(&now, std::slice::from_ref(&member)));
    let second = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&second), "Migrating");
    let status = second.status.clone().unwrap();
    assert_eq!(status.target_node.as_deref(), Some("c"));
    let name2 = format!("{}-2", super::kubevirt::vmim_name(&second));
    assert_eq!(status.kubevirt_migration.as_deref(), Some(name2.as_str()));
    let member2 = format!("{name2}-m-vm2");
    assert_eq!(
        status.members[0].kubevirt_migration.as_deref(),
        Some(member2.as_str())
    );
    for (path, vmi) in [
        (format!("{VMIMS}/{name2}"), "vm1"),
        (format!("{VMIMS}/{member2}"), "vm2"),
    ] {
        let made = fake.get(&path).unwrap_or_else(|| panic!("{path} made"));
        assert_eq!(made["spec"]["vmiName"], vmi);
        assert_eq!(
            made["spec"]["addedNodeSelector"]["kubernetes.io/hostname"],
            "c"
        );
    }
    assert_eq!(creates(&fake, VMIMS), 2, "{:?}", fake.writes());
}

#[tokio::test]
async fn a_together_group_split_by_a_member_that_moved_is_not_replanned() {
    let fake = FakeApi::new();
    let mut vmm = request(Value::Null);
    vmm["spec"]["group"] = json!("Together");
    vmm["spec"]["maxAttempts"] = json!(3);
    let ctx = context(&fake, together_cluster(&vmm, &[]));
    let first = reconcile_request(&fake, &ctx, &vmm).await;
    let path = vmim_path(&first);
    let mut main = fake.get(&path).unwrap();
    main["status"] = never_scheduled();
    fake.insert(&path, main);
    let member_name = format!("{}-m-vm2", super::kubevirt::vmim_name(&first));
    let mut member = fake.get(&format!("{VMIMS}/{member_name}")).unwrap();
    member["status"] = json!({"phase": "Succeeded"});
    let now = serde_json::to_value(&first).unwrap();
    // vm2 now runs on b.
    let mut fixed = together_cluster(&now, std::slice::from_ref(&member));
    fixed.vmis[1].status.as_mut().unwrap().node_name = Some("b".into());
    let ctx = context(&fake, fixed);
    fake.forget_requests();
    let done = reconcile_request(&fake, &ctx, &now).await;
    assert_eq!(phase(&done), "Failed");
    let status = done.status.unwrap();
    assert_eq!(status.attempts[0].outcome, AttemptOutcome::Failed);
    assert!(
        status
            .reason
            .as_deref()
            .unwrap_or_default()
            .contains("not tried again: group members vm2 are no longer on the source node"),
        "{status:?}"
    );
    assert_eq!(creates(&fake, VMIMS), 0, "{:?}", fake.writes());
}
