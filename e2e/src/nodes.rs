//! Fake nodes: Node objects with capacity, KubeVirt labels, taints and a Ready condition. There
//! is no kubelet and no node-lifecycle controller, so they stay Ready until deleted.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSpec, Taint};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use kube::api::{Patch, PatchParams, PostParams};
use kube::{Api, Client};
use serde_json::json;

use crate::E2E_LABEL;

pub const ZONE_LABEL: &str = "topology.kubernetes.io/zone";
pub const SCHEDULABLE_LABEL: &str = "kubevirt.io/schedulable";
pub const CPU_MODEL_PREFIX: &str = "cpu-model.node.kubevirt.io/";
pub const HOST_MODEL_PREFIX: &str = "host-model-cpu.node.kubevirt.io/";
pub const CPU_FEATURE_PREFIX: &str = "cpu-feature.node.kubevirt.io/";
pub const CPU_VENDOR_PREFIX: &str = "cpu-vendor.node.kubevirt.io/";

/// A fake node to create. `FakeNode::new(name, work_group)` gives 16 CPUs, 64 GiB, 110 pods,
/// CPU model Skylake-Server-IBRS (with Haswell and Broadwell usable) and a few features.
#[derive(Clone, Debug)]
pub struct FakeNode {
    pub name: String,
    pub work_group: String,
    pub cpu: String,
    pub memory: String,
    pub pods: String,
    pub cpu_model: String,
    /// Further CPU models the node can run (KubeVirt labels each usable model).
    pub usable_models: Vec<String>,
    pub cpu_features: Vec<String>,
    pub labels: BTreeMap<String, String>,
    pub taints: Vec<Taint>,
}

impl FakeNode {
    pub fn new(name: impl Into<String>, work_group: impl Into<String>) -> Self {
        Self {
            name: name.into(),
            work_group: work_group.into(),
            cpu: "16".into(),
            memory: "64Gi".into(),
            pods: "110".into(),
            cpu_model: "Skylake-Server-IBRS".into(),
            usable_models: vec!["Haswell-noTSX".into(), "Broadwell-noTSX".into()],
            cpu_features: ["vmx", "avx2", "aes", "sse4.2", "x2apic"]
                .map(String::from)
                .to_vec(),
            labels: BTreeMap::new(),
            taints: Vec::new(),
        }
    }

    pub fn capacity(mut self, cpu: &str, memory: &str) -> Self {
        self.cpu = cpu.into();
        self.memory = memory.into();
        self
    }

    pub fn label(mut self, k: &str, v: &str) -> Self {
        self.labels.insert(k.into(), v.into());
        self
    }

    pub fn taint(mut self, key: &str, value: &str, effect: &str) -> Self {
        self.taints.push(Taint {
            key: key.into(),
            value: Some(value.into()),
            effect: effect.into(),
            ..Default::default()
        });
        self
    }

    /// Every label the node gets: KubeVirt's, the work group, hostname, then `labels` (which win).
    pub fn all_labels(&self) -> BTreeMap<String, String> {
        let t = || "true".to_string();
        let mut l = BTreeMap::from([
            (ZONE_LABEL.to_string(), self.work_group.clone()),
            ("kubernetes.io/hostname".to_string(), self.name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            ("kubernetes.io/arch".to_string(), "amd64".to_string()),
            (SCHEDULABLE_LABEL.to_string(), t()),
            (E2E_LABEL.to_string(), t()),
            (format!("{CPU_MODEL_PREFIX}{}", self.cpu_model), t()),
            (format!("{HOST_MODEL_PREFIX}{}", self.cpu_model), t()),
            (format!("{CPU_VENDOR_PREFIX}Intel"), t()),
        ]);
        for m in &self.usable_models {
            l.insert(format!("{CPU_MODEL_PREFIX}{m}"), t());
        }
        for f in &self.cpu_features {
            l.insert(format!("{CPU_FEATURE_PREFIX}{f}"), t());
        }
        l.extend(self.labels.clone());
        l
    }

    /// Creates the Node and sets its status (capacity, allocatable, Ready).
    pub async fn create(&self, client: &Client) -> anyhow::Result<Node> {
        let nodes: Api<Node> = Api::all(client.clone());
        let node = Node {
            metadata: ObjectMeta {
                name: Some(self.name.clone()),
                labels: Some(self.all_labels()),
                // virt-handler's heartbeat (the stand-in refreshes it).
                annotations: Some(BTreeMap::from([(
                    "kubevirt.io/heartbeat".to_string(),
                    chrono::Utc::now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
                )])),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: (!self.taints.is_empty()).then(|| self.taints.clone()),
                ..Default::default()
            }),
            status: None,
        };
        nodes.create(&PostParams::default(), &node).await?;
        let now = crate::standin::now_rfc3339();
        let cond = |t: &str, s: &str, reason: &str| {
            json!({"type": t, "status": s, "reason": reason, "lastHeartbeatTime": now,
                   "lastTransitionTime": now})
        };
        // Besides cpu/memory/pods: the device-plugin resources virt-handler registers and the
        // ephemeral storage a kubelet reports; virt-launcher pods request them.
        let res = json!({"cpu": self.cpu, "memory": self.memory, "pods": self.pods,
                         "ephemeral-storage": "100Gi",
                         "devices.kubevirt.io/kvm": "1k", "devices.kubevirt.io/tun": "1k",
                         "devices.kubevirt.io/vhost-net": "1k"});
        let status = json!({"status": {
            "capacity": res,
            "allocatable": res,
            "conditions": [
                cond("Ready", "True", "KubeletReady"),
                cond("MemoryPressure", "False", "KubeletHasSufficientMemory"),
                cond("DiskPressure", "False", "KubeletHasNoDiskPressure"),
                cond("PIDPressure", "False", "KubeletHasSufficientPID"),
            ],
            "addresses": [
                {"type": "InternalIP", "address": "127.0.0.1"},
                {"type": "Hostname", "address": self.name},
            ],
        }});
        Ok(nodes
            .patch_status(&self.name, &PatchParams::default(), &Patch::Merge(status))
            .await?)
    }
}

/// Creates a Ready fake node (see [`FakeNode`] for the labels it carries).
pub async fn create_fake_node(
    client: &Client,
    name: &str,
    work_group: &str,
    cpu: &str,
    memory: &str,
    labels: BTreeMap<String, String>,
    taints: Vec<Taint>,
) -> anyhow::Result<Node> {
    let mut n = FakeNode::new(name, work_group).capacity(cpu, memory);
    n.labels = labels;
    n.taints = taints;
    n.create(client).await
}

/// Creates fake nodes `bench-node-00000` .. for benchmarks (`n` of them, in `work_groups`
/// work groups `wg-<i mod work_groups>`, 64 CPUs and 512 GiB each, labelled
/// `bench.commonground.dev/node`), `concurrency` requests at a time; those that exist already
/// are kept. Returns the names, in order.
pub async fn create_bench_nodes(
    client: &Client,
    n: usize,
    work_groups: usize,
    concurrency: usize,
) -> anyhow::Result<Vec<String>> {
    use anyhow::Context;
    use futures::{StreamExt, TryStreamExt};
    let label = "bench.commonground.dev/node";
    let existing: Api<Node> = Api::all(client.clone());
    let have: std::collections::BTreeSet<String> = existing
        .list_metadata(&kube::api::ListParams::default().labels(label))
        .await?
        .items
        .into_iter()
        .filter_map(|n| n.metadata.name)
        .collect();
    let names: Vec<String> = (0..n).map(|i| format!("bench-node-{i:05}")).collect();
    futures::stream::iter(names.iter().enumerate())
        .filter(|(_, name)| futures::future::ready(!have.contains(*name)))
        .map(|(i, name)| async move {
            FakeNode::new(name, format!("wg-{}", i % work_groups))
                .capacity("64", "512Gi")
                .label(label, "true")
                .create(client)
                .await
                .with_context(|| format!("creating node {name}"))
        })
        .buffer_unordered(concurrency)
        .try_collect::<Vec<_>>()
        .await?;
    Ok(names)
}
