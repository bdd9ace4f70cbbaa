//! The fit filter and the real kube-scheduler agree on the migration target pod.
//!
//! Each test makes one node the filter rejects and one it accepts, for one rule, then
//! creates the target pod as KubeVirt renders it for the VMI (the launcher's requests as
//! `commonground::plan::launcher` works them out, the VMI's volumes and affinity) pinned to
//! each node in turn. The scheduler must leave the pod Pending (Unschedulable) on the node the
//! filter rejects and bind it to the node the filter accepts.
//!
//! | rule | kube-scheduler plugin |
//! | --- | --- |
//! | launcher memory overhead | NodeResourcesFit (memory) |
//! | hugepages | NodeResourcesFit (`hugepages-2Mi`) |
//! | device-plugin resources | NodeResourcesFit (extended resource) |
//! | a local volume's node affinity | VolumeBinding |
//! | a zonal volume's labels | VolumeZone |
//! | required pod anti-affinity | InterPodAffinity |

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use anyhow::Context;
use commonground::api::kubevirt::{VirtualMachineInstance, VmiSpec, VmiStatus};
use commonground::plan::hardware::{check_node, FilterReason};
use commonground::plan::NodeFacts;
use commonground::view::convert::{self, LauncherConfig};
use commonground::view::fit::FitContext;
use commonground_e2e::{wait_for, FakeNode, TestCluster, TestNamespace, POOL_LABEL};
use k8s_openapi::api::core::v1::{Node, PersistentVolume, PersistentVolumeClaim, Pod};
use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::{json, Value};

const T: Duration = Duration::from_secs(60);

/// A VMI of this test (its pool selected), running on a node that does not exist.
fn vmi(ns: &TestNamespace, name: &str, domain: Value, extra: Value) -> VirtualMachineInstance {
    let mut spec = json!({
        "nodeSelector": {POOL_LABEL: ns.name},
        "domain": domain,
    });
    for (k, v) in extra.as_object().cloned().unwrap_or_default() {
        spec[k] = v;
    }
    let mut v = VirtualMachineInstance::new(name, serde_json::from_value::<VmiSpec>(spec).unwrap());
    v.metadata.namespace = Some(ns.name.clone());
    v.metadata.uid = Some(format!("uid-{name}"));
    v.status = Some(VmiStatus {
        node_name: Some("elsewhere".into()),
        ..Default::default()
    });
    v
}

/// Adds hugepages or extended resources to a fake node's capacity and allocatable.
async fn add_allocatable(ns: &TestNamespace, node: &str, extra: Value) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ns.client.clone());
    let n = nodes.get(node).await?;
    let mut res =
        serde_json::to_value(n.status.unwrap_or_default().allocatable.unwrap_or_default())?;
    for (k, v) in extra.as_object().unwrap() {
        res[k] = v.clone();
    }
    nodes
        .patch_status(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"status": {"capacity": res, "allocatable": res}})),
        )
        .await?;
    Ok(())
}

/// The fit filter's verdict on each of `nodes` for the VMI, from the objects in the API now.
async fn filter(
    ns: &TestNamespace,
    vmi: &VirtualMachineInstance,
    nodes: &[&str],
) -> anyhow::Result<Vec<Option<FilterReason>>> {
    let c = &ns.client;
    let all_nodes: Vec<Arc<Node>> = Api::<Node>::all(c.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let pods: Vec<Arc<Pod>> = Api::<Pod>::all(c.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let pvcs = Api::<PersistentVolumeClaim>::all(c.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let pvs = Api::<PersistentVolume>::all(c.clone())
        .list(&ListParams::default())
        .await?
        .items
        .into_iter()
        .map(Arc::new)
        .collect();
    let ctx = FitContext::new(
        LauncherConfig::default(),
        pvcs,
        pvs,
        pods.clone(),
        &all_nodes,
    );
    let req = ctx.vm_request(vmi).context("VMI has no request")?;
    let mut out = Vec::new();
    for name in nodes {
        let n = all_nodes
            .iter()
            .find(|n| n.metadata.name.as_deref() == Some(name))
            .context("node missing")?;
        let mut f: NodeFacts = convert::node_facts(n, "topology.kubernetes.io/zone");
        for p in &pods {
            if let Some(r) = convert::pod_requests_full(p).filter(|r| r.node == *name) {
                f.requested = f.requested + r.resources;
                for (k, v) in r.scalar {
                    *f.scalar_requested.entry(k).or_default() += v;
                }
            }
        }
        out.push(check_node(&req, &f));
    }
    Ok(out)
}

/// The target pod KubeVirt would create for `vmi`, pinned to `node` by name.
fn target_pod(vmi: &VirtualMachineInstance, name: &str, node: &str) -> anyhow::Result<Pod> {
    let launcher = convert::launcher_spec(vmi, &LauncherConfig::default()).requests();
    let mut requests = json!({
        "cpu": format!("{}m", launcher.cpu_millis),
        "memory": launcher.memory_bytes.to_string(),
    });
    let mut limits = json!({});
    for (k, v) in &launcher.scalar {
        // Hugepages and extended resources must have limits equal to requests.
        requests[k] = json!(v.to_string());
        limits[k] = json!(v.to_string());
    }
    let volumes: Vec<Value> = vmi
        .spec
        .volumes
        .iter()
        .flatten()
        .filter_map(|v| {
            let claim = v.pointer("/persistentVolumeClaim/claimName")?;
            Some(json!({"name": v["name"], "persistentVolumeClaim": {"claimName": claim}}))
        })
        .collect();
    let mut affinity = serde_json::to_value(vmi.spec.affinity.clone().unwrap_or_default())?;
    affinity["nodeAffinity"] = json!({"requiredDuringSchedulingIgnoredDuringExecution": {
        "nodeSelectorTerms": [{"matchFields": [
            {"key": "metadata.name", "operator": "In", "values": [node]}]}]}});
    Ok(serde_json::from_value(json!({
        "metadata": {"name": name, "labels": {"kubevirt.io": "virt-launcher"}},
        "spec": {
            "nodeSelector": vmi.spec.node_selector,
            "affinity": affinity,
            "volumes": volumes,
            "containers": [{"name": "compute", "image": "virt-launcher",
                "resources": {"requests": requests, "limits": limits}}],
        }
    }))?)
}

/// Where kube-scheduler puts the pod: `Some(node)` once bound, `None` once it reports the
/// pod Unschedulable.
async fn schedule(ns: &TestNamespace, pod: Pod) -> anyhow::Result<Option<String>> {
    let pods: Api<Pod> = ns.api();
    let name = pod.metadata.name.clone().unwrap();
    pods.create(&PostParams::default(), &pod).await?;
    wait_for(
        &format!("kube-scheduler's answer for pod {name}"),
        T,
        || {
            let pods = pods.clone();
            let name = name.clone();
            async move {
                let p = pods.get(&name).await?;
                if let Some(node) = p.spec.as_ref().and_then(|s| s.node_name.clone()) {
                    return Ok(Some(Some(node)));
                }
                let unschedulable = p
                    .status
                    .iter()
                    .flat_map(|s| s.conditions.iter().flatten())
                    .any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    });
                Ok(unschedulable.then_some(None))
            }
        },
    )
    .await
}

/// The filter rejects `bad` with a reason `reason_ok` accepts and accepts `good`; the
/// scheduler leaves the target pod Pending on `bad` and binds it to `good`.
async fn agree(
    ns: &TestNamespace,
    vmi: &VirtualMachineInstance,
    bad: &str,
    good: &str,
    reason_ok: impl Fn(&FilterReason) -> bool,
) -> anyhow::Result<()> {
    let verdicts = filter(ns, vmi, &[bad, good]).await?;
    let rejected = verdicts[0]
        .as_ref()
        .context("the filter accepts the bad node")?;
    assert!(reason_ok(rejected), "unexpected reason: {rejected}");
    assert_eq!(verdicts[1], None, "the filter rejects the good node");
    let vm = vmi.metadata.name.clone().unwrap();
    assert_eq!(
        schedule(ns, target_pod(vmi, &format!("{vm}-target-bad"), bad)?).await?,
        None,
        "kube-scheduler bound the pod to {bad}, which the filter rejects ({rejected})"
    );
    assert_eq!(
        schedule(ns, target_pod(vmi, &format!("{vm}-target-good"), good)?).await?,
        Some(good.to_string()),
        "kube-scheduler did not bind the pod to {good}, which the filter accepts"
    );
    Ok(())
}

/// A pod bound straight to `node` (no scheduler), holding `requests` there.
async fn bound_pod(
    ns: &TestNamespace,
    name: &str,
    node: &str,
    labels: Value,
    requests: Value,
) -> anyhow::Result<()> {
    let pod: Pod = serde_json::from_value(json!({
        "metadata": {"name": name, "labels": labels},
        "spec": {"nodeName": node, "containers": [{"name": "c", "image": "x",
            "resources": {"requests": requests, "limits": requests}}]}
    }))?;
    ns.api::<Pod>().create(&PostParams::default(), &pod).await?;
    Ok(())
}

fn domain(memory: &str) -> Value {
    json!({
        "cpu": {"cores": 1},
        "memory": {"guest": memory},
        "resources": {"requests": {"memory": memory}},
        "devices": {},
    })
}

#[tokio::test]
async fn launcher_memory_overhead_agrees_with_node_resources_fit() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-overhead").await?;
    let (bad, good) = (ns.node_name("bad"), ns.node_name("good"));
    // 2 GiB of guest fits in 2 GiB + 100 MiB, the launcher's ~300 MiB overhead does not.
    ns.create_fake_node(FakeNode::new(&bad, "wg-1").capacity("4", "2148Mi"))
        .await?;
    ns.create_fake_node(FakeNode::new(&good, "wg-1").capacity("4", "4Gi"))
        .await?;
    let v = vmi(&ns, "vm-overhead", domain("2Gi"), json!({}));
    agree(&ns, &v, &bad, &good, |r| {
        matches!(r, FilterReason::InsufficientMemory { overhead_bytes, .. } if *overhead_bytes > 0)
    })
    .await
}

#[tokio::test]
async fn hugepages_agree_with_node_resources_fit() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-hugepages").await?;
    let (bad, good) = (ns.node_name("bad"), ns.node_name("good"));
    ns.create_fake_node(FakeNode::new(&bad, "wg-1")).await?;
    ns.create_fake_node(FakeNode::new(&good, "wg-1")).await?;
    add_allocatable(&ns, &bad, json!({"hugepages-2Mi": "512Mi"})).await?;
    add_allocatable(&ns, &good, json!({"hugepages-2Mi": "2Gi"})).await?;
    let mut d = domain("1Gi");
    d["memory"]["hugepages"] = json!({"pageSize": "2Mi"});
    let v = vmi(&ns, "vm-hugepages", d, json!({}));
    agree(&ns, &v, &bad, &good, |r| {
        matches!(r, FilterReason::InsufficientHugepages { resource, .. } if resource == "hugepages-2Mi")
    })
    .await
}

#[tokio::test]
async fn device_plugin_resources_agree_with_node_resources_fit() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-devices").await?;
    let (bad, good) = (ns.node_name("bad"), ns.node_name("good"));
    ns.create_fake_node(FakeNode::new(&bad, "wg-1")).await?;
    ns.create_fake_node(FakeNode::new(&good, "wg-1")).await?;
    add_allocatable(&ns, &bad, json!({"example.com/gpu": "1"})).await?;
    add_allocatable(&ns, &good, json!({"example.com/gpu": "1"})).await?;
    // The bad node's only GPU is taken by a pod already there.
    bound_pod(
        &ns,
        "gpu-user",
        &bad,
        json!({}),
        json!({"example.com/gpu": "1"}),
    )
    .await?;
    let mut d = domain("1Gi");
    d["devices"]["gpus"] = json!([{"name": "gpu1", "deviceName": "example.com/gpu"}]);
    let v = vmi(&ns, "vm-gpu", d, json!({}));
    agree(&ns, &v, &bad, &good, |r| {
        matches!(r, FilterReason::InsufficientDevice { resource, free: 0, needed: 1 } if resource == "example.com/gpu")
    })
    .await
}

/// A PersistentVolume and a claim bound to it (by kube-controller-manager's PV controller).
async fn bound_volume(ns: &TestNamespace, pv: Value, claim: &str) -> anyhow::Result<String> {
    let pvs: Api<PersistentVolume> = Api::all(ns.client.clone());
    let pv_name = format!("{}-{claim}", ns.name);
    let mut pv = pv;
    pv["metadata"]["name"] = json!(pv_name);
    pv["spec"]["capacity"] = json!({"storage": "10Gi"});
    pv["spec"]["accessModes"] = json!(["ReadWriteOnce"]);
    pv["spec"]["storageClassName"] = json!("");
    pv["spec"]["claimRef"] = json!({"namespace": ns.name, "name": claim});
    pvs.create(&PostParams::default(), &serde_json::from_value(pv)?)
        .await?;
    let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
        "metadata": {"name": claim},
        "spec": {"accessModes": ["ReadWriteOnce"], "storageClassName": "", "volumeName": pv_name,
                 "resources": {"requests": {"storage": "10Gi"}}}
    }))?;
    let claims: Api<PersistentVolumeClaim> = ns.api();
    claims.create(&PostParams::default(), &pvc).await?;
    wait_for(&format!("claim {claim} Bound"), T, || {
        let claims = claims.clone();
        async move {
            let c = claims.get(claim).await?;
            Ok((c.status.and_then(|s| s.phase).as_deref() == Some("Bound")).then_some(()))
        }
    })
    .await?;
    Ok(pv_name)
}

async fn delete_pv(ns: &TestNamespace, name: &str) {
    let pvs: Api<PersistentVolume> = Api::all(ns.client.clone());
    let _ = pvs.delete(name, &DeleteParams::default()).await;
}

fn with_claim(claim: &str) -> Value {
    json!({"volumes": [{"name": "disk", "persistentVolumeClaim": {"claimName": claim}}]})
}

#[tokio::test]
async fn local_volume_node_affinity_agrees_with_volume_binding() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-localpv").await?;
    let (bad, good) = (ns.node_name("bad"), ns.node_name("good"));
    ns.create_fake_node(FakeNode::new(&bad, "wg-1")).await?;
    ns.create_fake_node(FakeNode::new(&good, "wg-1")).await?;
    let pv = bound_volume(
        &ns,
        json!({"metadata": {}, "spec": {
            "local": {"path": "/mnt/disk"},
            "nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": [good]}]}]}}}}),
        "disk",
    )
    .await?;
    let v = vmi(&ns, "vm-localpv", domain("1Gi"), with_claim("disk"));
    let r = agree(&ns, &v, &bad, &good, |r| {
        matches!(r, FilterReason::VolumeNodeAffinity { .. })
    })
    .await;
    delete_pv(&ns, &pv).await;
    r
}

#[tokio::test]
async fn zonal_volume_labels_agree_with_volume_zone() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-zonepv").await?;
    let (bad, good) = (ns.node_name("bad"), ns.node_name("good"));
    ns.create_fake_node(FakeNode::new(&bad, "zone-a")).await?;
    ns.create_fake_node(FakeNode::new(&good, "zone-b")).await?;
    let pv = bound_volume(
        &ns,
        json!({"metadata": {"labels": {"topology.kubernetes.io/zone": "zone-b"}},
               "spec": {"hostPath": {"path": "/mnt/zonal"}}}),
        "zdisk",
    )
    .await?;
    let v = vmi(&ns, "vm-zonepv", domain("1Gi"), with_claim("zdisk"));
    let r = agree(
        &ns,
        &v,
        &bad,
        &good,
        |r| matches!(r, FilterReason::VolumeTopology { want, .. } if want == "zone-b"),
    )
    .await;
    delete_pv(&ns, &pv).await;
    r
}

#[tokio::test]
async fn pod_anti_affinity_agrees_with_inter_pod_affinity() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("fit-antiaff").await?;
    let zone_a = format!("{}-a", ns.name);
    let zone_b = format!("{}-b", ns.name);
    let (db_node, bad, good) = (
        ns.node_name("db"),
        ns.node_name("bad"),
        ns.node_name("good"),
    );
    ns.create_fake_node(FakeNode::new(&db_node, zone_a.as_str()))
        .await?;
    ns.create_fake_node(FakeNode::new(&bad, zone_a.as_str()))
        .await?;
    ns.create_fake_node(FakeNode::new(&good, zone_b.as_str()))
        .await?;
    // A database pod runs in zone a (on another node than `bad`).
    bound_pod(
        &ns,
        "db-0",
        &db_node,
        json!({"app": "db"}),
        json!({"cpu": "100m"}),
    )
    .await?;
    let v = vmi(
        &ns,
        "vm-antiaff",
        domain("1Gi"),
        json!({"affinity": {"podAntiAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": [{
            "labelSelector": {"matchLabels": {"app": "db"}},
            "topologyKey": "topology.kubernetes.io/zone"}]}}}),
    );
    let pods_db = BTreeMap::from([("pod", format!("{}/db-0", ns.name))]);
    agree(
        &ns,
        &v,
        &bad,
        &good,
        |r| matches!(r, FilterReason::PodAntiAffinity { pod, .. } if *pod == pods_db["pod"]),
    )
    .await
}
