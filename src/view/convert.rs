//! Kubernetes objects → the planner's plain facts. The only place that knows both worlds.

use std::collections::BTreeMap;

use k8s_openapi::api::core::v1::{Node, NodeSelectorRequirement, Pod};

use super::quantity;
use crate::api::kubevirt::VirtualMachineInstance;
use crate::plan::{
    NodeFacts, NodeSelectorTerm, Resources, SelectorOperator, SelectorRequirement, Taint,
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
    }
}

/// Requests of a pod that holds resources on its node (bound, not finished).
pub fn pod_requests(pod: &Pod) -> Option<(String, Resources)> {
    let node = pod.spec.as_ref()?.node_name.clone()?;
    let phase = pod.status.as_ref().and_then(|s| s.phase.as_deref());
    if matches!(phase, Some("Succeeded" | "Failed")) {
        return None;
    }
    let mut total = Resources::default();
    for c in &pod.spec.as_ref()?.containers {
        if let Some(req) = c.resources.as_ref().and_then(|r| r.requests.as_ref()) {
            total.cpu_millis += req
                .get("cpu")
                .and_then(|q| quantity::cpu_millis(&q.0).ok())
                .unwrap_or(0);
            total.memory_bytes += req
                .get("memory")
                .and_then(|q| quantity::bytes(&q.0).ok())
                .unwrap_or(0);
        }
    }
    Some((node, total))
}

fn requirement(r: &NodeSelectorRequirement) -> Option<SelectorRequirement> {
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
        .map(|sel| {
            sel.node_selector_terms
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
        })
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

/// Reads a VMI's requests, guest memory and CPU model from `spec.domain`.
pub fn vm_request(vmi: &VirtualMachineInstance) -> Option<VmRequest> {
    let namespace = vmi.metadata.namespace.clone()?;
    let name = vmi.metadata.name.clone()?;
    let source_node = vmi.node_name()?.to_string();
    let domain = &vmi.spec.domain;
    let req = |key: &str| {
        domain
            .pointer(&format!("/resources/requests/{key}"))
            .and_then(|v| {
                v.as_str()
                    .map(str::to_string)
                    .or_else(|| v.as_f64().map(|f| f.to_string()))
            })
    };
    let memory_request = req("memory").and_then(|q| quantity::bytes(&q).ok());
    let guest = domain
        .pointer("/memory/guest")
        .and_then(|v| v.as_str())
        .and_then(|q| quantity::bytes(q).ok());
    let cpu_millis = req("cpu")
        .and_then(|q| quantity::cpu_millis(&q).ok())
        .or_else(|| {
            domain
                .pointer("/cpu/cores")
                .and_then(|v| v.as_u64())
                .map(|c| c * 1000)
        })
        .unwrap_or(0);
    let memory_bytes = guest.or(memory_request).unwrap_or(0);
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
            cpu_millis,
            memory_bytes: memory_request.unwrap_or(memory_bytes),
        },
        node_selector: p.node_selector,
        affinity_terms: p.affinity_terms,
        tolerations: p.tolerations,
        cpu_model,
        cpu_features,
        summary: None,
        memory_bytes,
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
        assert_eq!(r.requests.cpu_millis, 2000);
        assert_eq!(r.memory_bytes, 4 << 30);
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
}
