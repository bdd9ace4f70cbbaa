//! Kubernetes objects → the planner's plain facts. The only place that knows both worlds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod};

use super::quantity;
use crate::api::kubevirt::VirtualMachineInstance;
use crate::plan::launcher::LauncherSpec;
use crate::plan::{
    FitNeeds, NodeFacts, NodeSelectorTerm, Resources, SelectorOperator, SelectorRequirement, Taint,
    TaintEffect, Toleration, TolerationOperator, VmKey, VmRequest,
};

/// A node's facts; `requested` is filled from the pods bound to it separately.
pub fn node_facts(node: &Node, work_group_label: &str) -> NodeFacts {
    let name = node.metadata.name.clone().unwrap_or_default();
    let labels: BTreeMap<String, String> = node.metadata.labels.clone().unwrap_or_default();
    let spec = node.spec.clone().unwrap_or_default();
    let status = node.status.clone().unwrap_or_default();
    let ready = status
        .conditions
        .unwrap_or_default()
        .iter()
        .any(|c| c.type_ == "Ready" && c.status == "True");
    let alloc = status.allocatable.or(status.capacity).unwrap_or_default();
    let allocatable = Resources {
        cpu_millis: alloc
            .get("cpu")
            .and_then(|q| quantity::cpu_millis(&q.0).ok())
            .unwrap_or(0),
        memory_bytes: alloc
            .get("memory")
            .and_then(|q| quantity::bytes(&q.0).ok())
            .unwrap_or(0),
    };
    let scalar_allocatable = alloc
        .iter()
        .filter(|(name, _)| is_scalar_resource(name))
        .filter_map(|(name, q)| Some((name.clone(), quantity::bytes(&q.0).ok()?)))
        .collect();
    let taints = spec
        .taints
        .unwrap_or_default()
        .into_iter()
        .filter_map(|t| {
            let effect = match t.effect.as_str() {
                "NoSchedule" => TaintEffect::NoSchedule,
                "PreferNoSchedule" => TaintEffect::PreferNoSchedule,
                "NoExecute" => TaintEffect::NoExecute,
                _ => return None,
            };
            Some(Taint {
                key: t.key,
                value: t.value,
                effect,
            })
        })
        .collect();
    NodeFacts {
        work_group: labels
            .get(work_group_label)
            .cloned()
            .unwrap_or_else(|| crate::plan::workgroups::UNLABELLED_WORK_GROUP.to_string()),
        name,
        labels,
        taints,
        unschedulable: spec.unschedulable.unwrap_or(false),
        ready,
        allocatable,
        requested: Resources::default(),
        load: None,
        scalar_allocatable,
        scalar_requested: BTreeMap::new(),
    }
}

/// Hugepages and extended (device-plugin) resources: the countable resources other than CPU,
/// memory and storage that kube-scheduler's NodeResourcesFit compares. An extended resource
/// has a domain-qualified name outside `kubernetes.io` (`nvidia.com/gpu`,
/// `intel.com/sriov_netdevice`, `devices.kubevirt.io/kvm`).
pub fn is_scalar_resource(name: &str) -> bool {
    if name.starts_with(crate::plan::hardware::HUGEPAGES_PREFIX) {
        return true;
    }
    match name.split_once('/') {
        Some((domain, _)) => {
            !(domain == "kubernetes.io"
                || domain.ends_with(".kubernetes.io")
                || name.starts_with("requests."))
        }
        None => false,
    }
}

/// What a bound, unfinished pod requests of its node.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct PodRequests {
    pub node: String,
    pub resources: Resources,
    /// Hugepages and extended resources.
    pub scalar: BTreeMap<String, u64>,
}

/// Requests of a pod that holds resources on its node (bound, not finished), as kube-scheduler
/// counts them: per resource the larger of the containers' sum and the largest init
/// container, plus the pod's runtime overhead.
pub fn pod_requests(pod: &Pod) -> Option<(String, Resources)> {
    pod_requests_full(pod).map(|r| (r.node, r.resources))
}

/// As [`pod_requests`], with hugepages and extended resources.
pub fn pod_requests_full(pod: &Pod) -> Option<PodRequests> {
    let spec = pod.spec.as_ref()?;
    let node = spec.node_name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut total: BTreeMap<&str, u64> = BTreeMap::new();
    let value = |name: &str, q: &k8s_openapi::apimachinery::pkg::api::resource::Quantity| {
        if name == "cpu" {
            quantity::cpu_millis(&q.0).ok()
        } else {
            quantity::bytes(&q.0).ok()
        }
    };
    let wanted = |name: &str| name == "cpu" || name == "memory" || is_scalar_resource(name);
    for c in &spec.containers {
        for (name, q) in c.resources.iter().flat_map(|r| r.requests.iter().flatten()) {
            if wanted(name) {
                *total.entry(name.as_str()).or_default() += value(name, q).unwrap_or(0);
            }
        }
    }
    for c in spec.init_containers.iter().flatten() {
        for (name, q) in c.resources.iter().flat_map(|r| r.requests.iter().flatten()) {
            if wanted(name) {
                let v = value(name, q).unwrap_or(0);
                let e = total.entry(name.as_str()).or_default();
                *e = (*e).max(v);
            }
        }
    }
    for (name, q) in spec.overhead.iter().flatten() {
        if wanted(name) {
            *total.entry(name.as_str()).or_default() += value(name, q).unwrap_or(0);
        }
    }
    let resources = Resources {
        cpu_millis: total.remove("cpu").unwrap_or(0),
        memory_bytes: total.remove("memory").unwrap_or(0),
    };
    let scalar = total
        .into_iter()
        .filter(|(_, v)| *v > 0)
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    Some(PodRequests {
        node,
        resources,
        scalar,
    })
}

pub fn requirement(r: &NodeSelectorRequirement) -> Option<SelectorRequirement> {
    let operator = match r.operator.as_str() {
        "In" => SelectorOperator::In,
        "NotIn" => SelectorOperator::NotIn,
        "Exists" => SelectorOperator::Exists,
        "DoesNotExist" => SelectorOperator::DoesNotExist,
        "Gt" => SelectorOperator::Gt,
        "Lt" => SelectorOperator::Lt,
        _ => return None,
    };
    Some(SelectorRequirement {
        key: r.key.clone(),
        operator,
        values: r.values.clone().unwrap_or_default(),
    })
}

/// Placement facts shared by VMIs and pods: node selector, required affinity, tolerations.
pub struct Placement {
    pub node_selector: BTreeMap<String, String>,
    pub affinity_terms: Vec<NodeSelectorTerm>,
    pub tolerations: Vec<Toleration>,
}

/// The planner's form of a Kubernetes node selector (a pod's required node affinity, a
/// persistent volume's node affinity): its terms, of which a node must match one.
pub fn node_selector_terms(
    selector: &k8s_openapi::api::core::v1::NodeSelector,
) -> Vec<NodeSelectorTerm> {
    selector
        .node_selector_terms
        .iter()
        .map(|t| NodeSelectorTerm {
            match_expressions: t
                .match_expressions
                .iter()
                .flatten()
                .filter_map(requirement)
                .collect(),
            match_fields: t
                .match_fields
                .iter()
                .flatten()
                .filter_map(requirement)
                .collect(),
        })
        .collect()
}

pub fn placement(
    node_selector: Option<&BTreeMap<String, String>>,
    affinity: Option<&k8s_openapi::api::core::v1::Affinity>,
    tolerations: Option<&Vec<k8s_openapi::api::core::v1::Toleration>>,
) -> Placement {
    let affinity_terms = affinity
        .and_then(|a| a.node_affinity.as_ref())
        .and_then(|n| {
            n.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(node_selector_terms)
        .unwrap_or_default();
    let tolerations = tolerations
        .into_iter()
        .flatten()
        .map(|t| Toleration {
            key: t.key.clone(),
            operator: if t.operator.as_deref() == Some("Exists") {
                TolerationOperator::Exists
            } else {
                TolerationOperator::Equal
            },
            value: t.value.clone(),
            effect: match t.effect.as_deref() {
                Some("NoSchedule") => Some(TaintEffect::NoSchedule),
                Some("PreferNoSchedule") => Some(TaintEffect::PreferNoSchedule),
                Some("NoExecute") => Some(TaintEffect::NoExecute),
                _ => None,
            },
        })
        .collect();
    Placement {
        node_selector: node_selector.cloned().unwrap_or_default(),
        affinity_terms,
        tolerations,
    }
}

/// What the KubeVirt CR says about the launcher pods it renders.
#[derive(Clone, Debug, PartialEq)]
pub struct LauncherConfig {
    pub overhead_ratio: Option<f64>,
    pub memory_overcommit_percent: u64,
    pub cpu_allocation_ratio: u64,
    pub console_log_disabled: bool,
    /// The cluster's architecture, for VMIs that do not name one.
    pub arch: String,
}

impl Default for LauncherConfig {
    fn default() -> Self {
        Self {
            overhead_ratio: None,
            memory_overcommit_percent: 100,
            cpu_allocation_ratio: 10,
            console_log_disabled: false,
            arch: "amd64".into(),
        }
    }
}

/// The launcher settings of a KubeVirt CR.
pub fn launcher_config(kv: Option<&crate::api::kubevirt::KubeVirt>) -> LauncherConfig {
    let mut c = LauncherConfig::default();
    let Some(kv) = kv else { return c };
    let conf = &kv.spec.configuration;
    c.overhead_ratio = conf
        .additional_guest_memory_overhead_ratio
        .as_deref()
        .and_then(|r| r.trim().parse::<f64>().ok());
    if let Some(dev) = &conf.developer_configuration {
        if let Some(m) = dev
            .get("memoryOvercommit")
            .and_then(|v| v.as_u64())
            .filter(|&m| m > 0)
        {
            c.memory_overcommit_percent = m;
        }
        if let Some(r) = dev
            .get("cpuAllocationRatio")
            .and_then(|v| v.as_u64())
            .filter(|&r| r > 0)
        {
            c.cpu_allocation_ratio = r;
        }
    }
    c.console_log_disabled = conf
        .virtual_machine_options
        .as_ref()
        .and_then(|o| o.get("disableSerialConsoleLog"))
        .is_some_and(|v| !v.is_null());
    c
}

/// The inputs of KubeVirt's launcher pod rendering, from a VMI.
pub fn launcher_spec(vmi: &VirtualMachineInstance, config: &LauncherConfig) -> LauncherSpec {
    let domain = &vmi.spec.domain;
    let text = |path: &str| {
        domain.pointer(path).and_then(|v| {
            v.as_str()
                .map(str::to_string)
                .or_else(|| v.as_f64().map(|f| f.to_string()))
        })
    };
    let bytes = |path: &str| text(path).and_then(|q| quantity::bytes(&q).ok());
    let millis = |path: &str| text(path).and_then(|q| quantity::cpu_millis(&q).ok());
    let flag = |path: &str| domain.pointer(path).and_then(|v| v.as_bool());
    let count = |path: &str| domain.pointer(path).and_then(|v| v.as_u64()).unwrap_or(0);
    let (cores, sockets, threads) = (
        count("/cpu/cores"),
        count("/cpu/sockets"),
        count("/cpu/threads"),
    );
    // Sockets × cores × threads, a missing one left out.
    let topology_vcpus = [cores, sockets, threads]
        .iter()
        .filter(|&&n| n > 0)
        .product::<u64>()
        * u64::from(cores + sockets + threads > 0);
    let list = |path: &str| {
        domain
            .pointer(path)
            .and_then(|v| v.as_array())
            .cloned()
            .unwrap_or_default()
    };
    let gpus = list("/devices/gpus");
    let host_devices = list("/devices/hostDevices");
    let sriov = list("/devices/interfaces")
        .iter()
        .any(|i| i.get("sriov").is_some());
    let devices = gpus
        .iter()
        .chain(&host_devices)
        .filter(|d| d.get("claimRequest").is_none())
        .filter_map(|d| d.get("deviceName").and_then(|n| n.as_str()))
        .filter(|n| !n.is_empty())
        .map(str::to_string)
        .collect();
    let hugepage_size =
        text("/memory/hugepages/pageSize").and_then(|s| quantity::bytes(&s).ok().map(|b| (s, b)));
    let exec = |p: &Option<serde_json::Value>| {
        u64::from(p.as_ref().is_some_and(|p| p.get("exec").is_some()))
    };
    let supplemental =
        domain.pointer("/ioThreadsPolicy").and_then(|v| v.as_str()) == Some("supplementalPool");
    let console_logger = if flag("/devices/autoattachSerialConsole") == Some(false) {
        false
    } else {
        flag("/devices/logSerialConsole").unwrap_or(!config.console_log_disabled)
    };
    LauncherSpec {
        memory_request: bytes("/resources/requests/memory"),
        memory_limit: bytes("/resources/limits/memory"),
        guest_memory: bytes("/memory/guest"),
        hugepage_size,
        cpu_request_millis: millis("/resources/requests/cpu"),
        cpu_limit_millis: millis("/resources/limits/cpu"),
        topology_vcpus,
        dedicated_cpus: flag("/cpu/dedicatedCpuPlacement").unwrap_or(false),
        isolate_emulator_thread: flag("/cpu/isolateEmulatorThread").unwrap_or(false),
        io_pool_threads: if supplemental {
            count("/ioThreads/supplementalPoolThreadCount")
        } else {
            0
        },
        graphics: flag("/devices/autoattachGraphicsDevice").unwrap_or(true),
        arch: vmi
            .spec
            .architecture
            .clone()
            .filter(|a| !a.is_empty())
            .unwrap_or_else(|| config.arch.clone()),
        vfio: !gpus.is_empty() || !host_devices.is_empty() || sriov,
        downward_metrics: vmi
            .spec
            .volumes
            .iter()
            .flatten()
            .any(|v| v.get("downwardMetrics").is_some()),
        exec_probes: exec(&vmi.spec.liveness_probe) + exec(&vmi.spec.readiness_probe),
        sev: domain.pointer("/launchSecurity/sev").is_some()
            || domain.pointer("/launchSecurity/snp").is_some(),
        tpm: domain.pointer("/devices/tpm").is_some_and(|t| {
            t.is_object() && t.get("enabled").and_then(|e| e.as_bool()) != Some(false)
        }),
        overcommit_guest_overhead: flag("/resources/overcommitGuestOverhead").unwrap_or(false),
        console_logger,
        devices,
        overhead_ratio: config.overhead_ratio,
        memory_overcommit_percent: config.memory_overcommit_percent,
        cpu_allocation_ratio: config.cpu_allocation_ratio,
    }
}

/// Reads a VMI's requests, guest memory and CPU model from `spec.domain`, under KubeVirt's
/// default settings.
pub fn vm_request(vmi: &VirtualMachineInstance) -> Option<VmRequest> {
    vm_request_with(vmi, &LauncherConfig::default())
}

/// As [`vm_request`]: the requests are those of the launcher pod KubeVirt renders for the VMI
/// (guest memory plus overhead, hugepages, devices), under the KubeVirt CR's settings.
pub fn vm_request_with(vmi: &VirtualMachineInstance, config: &LauncherConfig) -> Option<VmRequest> {
    let namespace = vmi.metadata.namespace.clone()?;
    let name = vmi.metadata.name.clone()?;
    let source_node = vmi.node_name()?.to_string();
    let domain = &vmi.spec.domain;
    let launcher = launcher_spec(vmi, config);
    let pod = launcher.requests();
    let memory_bytes = launcher
        .guest_memory
        .or(launcher.memory_request)
        .unwrap_or(0);
    let cpu_model = domain
        .pointer("/cpu/model")
        .and_then(|v| v.as_str())
        .filter(|m| !matches!(*m, "host-model" | "host-passthrough" | ""))
        .map(str::to_string);
    let cpu_features = domain
        .pointer("/cpu/features")
        .and_then(|v| v.as_array())
        .map(|fs| {
            fs.iter()
                .filter(|f| {
                    f.get("policy")
                        .and_then(|p| p.as_str())
                        .is_none_or(|p| p == "require")
                })
                .filter_map(|f| f.get("name").and_then(|n| n.as_str()).map(str::to_string))
                .collect()
        })
        .unwrap_or_default();
    let p = placement(
        vmi.spec.node_selector.as_ref(),
        vmi.spec.affinity.as_ref(),
        vmi.spec.tolerations.as_ref(),
    );
    Some(VmRequest {
        vm: VmKey::new(namespace, name),
        source_node,
        requests: Resources {
            cpu_millis: pod.cpu_millis,
            memory_bytes: pod.memory_bytes,
        },
        node_selector: p.node_selector,
        affinity_terms: p.affinity_terms,
        tolerations: p.tolerations,
        cpu_model,
        cpu_features,
        summary: None,
        memory_bytes,
        fit: FitNeeds {
            memory_overhead_bytes: pod.overhead_bytes,
            scalar_requests: pod.scalar,
            ..FitNeeds::default()
        },
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn vmi_requests_and_cpu_model_are_read_from_the_domain() {
        let vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm1", "namespace": "ns"},
            "spec": {
                "nodeSelector": {"disk": "ssd"},
                "tolerations": [{"key": "k", "operator": "Exists", "effect": "NoSchedule"}],
                "domain": {
                    "cpu": {"model": "Skylake", "features": [{"name": "avx2"}, {"name": "x", "policy": "disable"}]},
                    "resources": {"requests": {"cpu": "2", "memory": "4Gi"}},
                    "memory": {"guest": "4Gi"}
                }
            },
            "status": {"nodeName": "n1"}
        }))
        .unwrap();
        let r = vm_request(&vmi).unwrap();
        assert_eq!(r.source_node, "n1");
        // The VMI's CPU plus the console logger's; guest memory plus the launcher overhead.
        assert_eq!(
            r.requests.cpu_millis,
            2000 + crate::plan::launcher::CONSOLE_LOGGER_CPU_MILLIS
        );
        assert_eq!(r.memory_bytes, 4 << 30);
        assert_eq!(
            r.requests.memory_bytes,
            (4 << 30) + r.fit.memory_overhead_bytes + crate::plan::launcher::CONSOLE_LOGGER_MEMORY
        );
        assert!(r.fit.memory_overhead_bytes > 200 << 20);
        assert_eq!(r.cpu_model.as_deref(), Some("Skylake"));
        assert_eq!(r.cpu_features, vec!["avx2".to_string()]);
        assert_eq!(r.tolerations[0].operator, TolerationOperator::Exists);
        assert_eq!(r.node_selector["disk"], "ssd");
    }

    #[test]
    fn node_facts_read_readiness_capacity_and_work_group() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": {"taints": [{"key": "a", "effect": "NoSchedule"}]},
            "status": {"allocatable": {"cpu": "8", "memory": "32Gi"},
                       "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .unwrap();
        let f = node_facts(&node, "topology.kubernetes.io/zone");
        assert!(f.ready);
        assert_eq!(f.work_group, "z1");
        assert_eq!(f.allocatable.cpu_millis, 8000);
        assert_eq!(f.taints.len(), 1);
    }

    #[test]
    fn launcher_spec_reads_hugepages_devices_topology_and_kubevirt_settings() {
        let vmi: VirtualMachineInstance = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "vm1", "namespace": "ns"},
            "spec": {
                "domain": {
                    "cpu": {"sockets": 2, "cores": 2, "threads": 1, "dedicatedCpuPlacement": true},
                    "memory": {"guest": "8Gi", "hugepages": {"pageSize": "1Gi"}},
                    "resources": {"requests": {"memory": "8Gi"}},
                    "devices": {
                        "gpus": [{"name": "g", "deviceName": "nvidia.com/A100"}],
                        "hostDevices": [{"name": "h", "deviceName": "intel.com/qat"}],
                        "autoattachGraphicsDevice": false,
                        "tpm": {}
                    }
                },
                "volumes": [{"name": "m", "downwardMetrics": {}}],
                "readinessProbe": {"exec": {"command": ["true"]}}
            },
            "status": {"nodeName": "n1"}
        }))
        .unwrap();
        let kv: crate::api::kubevirt::KubeVirt = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
            "spec": {"configuration": {
                "additionalGuestMemoryOverheadRatio": "1.2",
                "developerConfiguration": {"cpuAllocationRatio": 4},
                "virtualMachineOptions": {"disableSerialConsoleLog": {}}
            }}
        }))
        .unwrap();
        let config = launcher_config(Some(&kv));
        assert_eq!(config.overhead_ratio, Some(1.2));
        assert_eq!(config.cpu_allocation_ratio, 4);
        assert!(config.console_log_disabled);
        let l = launcher_spec(&vmi, &config);
        assert_eq!(l.topology_vcpus, 4);
        assert!(l.dedicated_cpus && l.vfio && l.tpm && l.downward_metrics);
        assert!(!l.graphics && !l.console_logger);
        assert_eq!(l.exec_probes, 1);
        assert_eq!(l.hugepage_size, Some(("1Gi".to_string(), 1 << 30)));
        let r = vm_request_with(&vmi, &config).unwrap();
        assert_eq!(r.fit.scalar_requests["hugepages-1Gi"], 8 << 30);
        assert_eq!(r.fit.scalar_requests["nvidia.com/A100"], 1);
        assert_eq!(r.fit.scalar_requests["intel.com/qat"], 1);
        assert_eq!(r.requests.cpu_millis, 4000, "dedicated: whole cores");
        assert_eq!(r.requests.memory_bytes, r.fit.memory_overhead_bytes);
    }

    #[test]
    fn node_scalars_and_pod_requests_count_hugepages_and_extended_resources() {
        let node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1"},
            "status": {"allocatable": {"cpu": "8", "memory": "32Gi", "hugepages-2Mi": "1Gi",
                "nvidia.com/gpu": "2", "ephemeral-storage": "100Gi", "pods": "110"}}
        }))
        .unwrap();
        let f = node_facts(&node, "zone");
        assert_eq!(f.scalar_allocatable.len(), 2);
        assert_eq!(f.scalar_allocatable["hugepages-2Mi"], 1 << 30);
        assert_eq!(f.scalar_allocatable["nvidia.com/gpu"], 2);
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "p"},
            "spec": {"nodeName": "n1",
                "containers": [
                    {"name": "a", "resources": {"requests": {"cpu": "1", "nvidia.com/gpu": "1"}}},
                    {"name": "b", "resources": {"requests": {"cpu": "500m", "memory": "1Gi"}}}],
                "initContainers": [{"name": "i", "resources": {"requests": {"cpu": "2"}}}],
                "overhead": {"memory": "100Mi"}}
        }))
        .unwrap();
        let r = pod_requests_full(&pod).unwrap();
        assert_eq!(r.resources.cpu_millis, 2000, "the init container is larger");
        assert_eq!(r.resources.memory_bytes, (1 << 30) + (100 << 20));
        assert_eq!(r.scalar["nvidia.com/gpu"], 1);
        assert!(!is_scalar_resource("ephemeral-storage"));
        assert!(!is_scalar_resource("kubernetes.io/batch"));
        assert!(is_scalar_resource("devices.kubevirt.io/kvm"));
    }
}
