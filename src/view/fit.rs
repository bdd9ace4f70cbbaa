//! The fit facts of a VM that depend on other objects than its VMI: its persistent volumes'
//! node affinity and zones (PVC → bound PV), the topology domains its required pod
//! anti-affinity rules out (the pods of the cluster and their nodes' labels), the device-plugin
//! resources its current launcher pod holds (SR-IOV functions and any other device a network
//! or a plugin adds), and the KubeVirt CR's launcher settings.
//!
//! A [`FitContext`] is built once from the view's stores and then completes any number of
//! VM requests.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    Affinity, Node, PersistentVolume, PersistentVolumeClaim, Pod, PodAffinityTerm as K8sTerm,
};

use super::convert::{self, LauncherConfig};
use crate::api::kubevirt::{VirtualMachineInstance, CREATED_BY_LABEL};
use crate::plan::affinity::{
    excluded_domains, LabelSelector, PodAffinityTerm, PodOnNode, TermNamespaces,
};
use crate::plan::hardware::VOLUME_TOPOLOGY_LABELS;
use crate::plan::{SelectorOperator, SelectorRequirement, VmRequest, VolumeConstraint};

/// Everything needed to complete VM requests, taken from the stores at one moment.
pub struct FitContext {
    pub launcher: LauncherConfig,
    pvcs: HashMap<(String, String), Arc<PersistentVolumeClaim>>,
    pvs: HashMap<String, Arc<PersistentVolume>>,
    pods: Vec<Arc<Pod>>,
    node_labels: HashMap<String, BTreeMap<String, String>>,
    /// Namespace labels, for terms with a namespace selector (empty when not watched).
    namespace_labels: HashMap<String, BTreeMap<String, String>>,
    /// VMI UID → device-plugin resources its running launcher pod requests.
    launcher_devices: HashMap<String, BTreeMap<String, u64>>,
}

impl FitContext {
    pub fn new(
        launcher: LauncherConfig,
        pvcs: Vec<Arc<PersistentVolumeClaim>>,
        pvs: Vec<Arc<PersistentVolume>>,
        pods: Vec<Arc<Pod>>,
        nodes: &[Arc<Node>],
    ) -> Self {
        let pvcs = pvcs
            .into_iter()
            .filter_map(|c| {
                let key = (c.metadata.namespace.clone()?, c.metadata.name.clone()?);
                Some((key, c))
            })
            .collect();
        let pvs = pvs
            .into_iter()
            .filter_map(|v| Some((v.metadata.name.clone()?, v)))
            .collect();
        let node_labels = nodes
            .iter()
            .filter_map(|n| {
                Some((
                    n.metadata.name.clone()?,
                    n.metadata.labels.clone().unwrap_or_default(),
                ))
            })
            .collect();
        let mut launcher_devices: HashMap<String, BTreeMap<String, u64>> = HashMap::new();
        for pod in &pods {
            let Some(uid) = pod
                .metadata
                .labels
                .as_ref()
                .and_then(|l| l.get(CREATED_BY_LABEL))
            else {
                continue;
            };
            let Some(r) = convert::pod_requests_full(pod) else {
                continue;
            };
            // Hugepages come from the VMI itself; the rest is what plugins added.
            let devices: BTreeMap<String, u64> = r
                .scalar
                .into_iter()
                .filter(|(k, _)| !k.starts_with(crate::plan::hardware::HUGEPAGES_PREFIX))
                .collect();
            if !devices.is_empty() {
                let e = launcher_devices.entry(uid.clone()).or_default();
                for (k, v) in devices {
                    let slot = e.entry(k).or_default();
                    *slot = (*slot).max(v);
                }
            }
        }
        Self {
            launcher,
            pvcs,
            pvs,
            pods,
            node_labels,
            namespace_labels: HashMap::new(),
            launcher_devices,
        }
    }

    /// The VM's request with every fit fact filled in.
    pub fn vm_request(&self, vmi: &VirtualMachineInstance) -> Option<VmRequest> {
        let mut req = convert::vm_request_with(vmi, &self.launcher)?;
        self.complete(vmi, &mut req);
        Some(req)
    }

    /// Adds the volumes, the excluded domains and the launcher pod's devices to `req`.
    pub fn complete(&self, vmi: &VirtualMachineInstance, req: &mut VmRequest) {
        let namespace = req.vm.namespace.clone();
        req.fit.volumes = self.volume_constraints(&namespace, vmi);
        let terms = anti_affinity_terms(vmi.spec.affinity.as_ref(), &self.namespace_labels);
        if !terms.is_empty() {
            let pods = self.pods.iter().filter_map(|p| {
                let spec = p.spec.as_ref()?;
                let phase = p.status.as_ref().and_then(|s| s.phase.as_deref());
                if matches!(phase, Some("Succeeded" | "Failed")) {
                    return None;
                }
                Some(PodOnNode {
                    namespace: p.metadata.namespace.as_deref()?,
                    name: p.metadata.name.as_deref()?,
                    labels: p.metadata.labels.as_ref()?,
                    node: spec.node_name.as_deref()?,
                })
            });
            req.fit.excluded_domains =
                excluded_domains(&terms, &namespace, pods, |node: &str, key: &str| {
                    self.node_labels
                        .get(node)
                        .and_then(|l| l.get(key))
                        .map(String::as_str)
                });
        }
        if let Some(devices) = vmi
            .metadata
            .uid
            .as_ref()
            .and_then(|u| self.launcher_devices.get(u))
        {
            for (k, v) in devices {
                let slot = req.fit.scalar_requests.entry(k.clone()).or_default();
                *slot = (*slot).max(*v);
            }
        }
    }

    /// The VMI's bound persistent volumes that say where they can be used. A claim that is
    /// not bound yet or a volume the view lacks adds nothing (missing data never blocks).
    fn volume_constraints(
        &self,
        namespace: &str,
        vmi: &VirtualMachineInstance,
    ) -> Vec<VolumeConstraint> {
        let mut out = Vec::new();
        let mut seen = BTreeSet::new();
        for v in vmi.spec.volumes.iter().flatten() {
            let claim = v
                .pointer("/persistentVolumeClaim/claimName")
                .or_else(|| v.pointer("/dataVolume/name"))
                .and_then(|c| c.as_str());
            let Some(claim) = claim.filter(|c| seen.insert(c.to_string())) else {
                continue;
            };
            let Some(pvc) = self.pvcs.get(&(namespace.to_string(), claim.to_string())) else {
                continue;
            };
            let Some(pv_name) = pvc.spec.as_ref().and_then(|s| s.volume_name.as_deref()) else {
                continue;
            };
            let Some(pv) = self.pvs.get(pv_name) else {
                continue;
            };
            let c = volume_constraint(claim, pv);
            if !c.node_terms.is_empty() || !c.topology_labels.is_empty() {
                out.push(c);
            }
        }
        out
    }
}

/// Where a persistent volume can be used: its required node affinity and zone labels.
pub fn volume_constraint(claim: &str, pv: &PersistentVolume) -> VolumeConstraint {
    let node_terms = pv
        .spec
        .as_ref()
        .and_then(|s| s.node_affinity.as_ref())
        .and_then(|a| a.required.as_ref())
        .map(convert::node_selector_terms)
        .unwrap_or_default();
    let labels = pv.metadata.labels.clone().unwrap_or_default();
    let topology_labels = VOLUME_TOPOLOGY_LABELS
        .iter()
        .filter_map(|k| labels.get(*k).map(|v| (k.to_string(), v.clone())))
        .collect();
    VolumeConstraint {
        volume: pv.metadata.name.clone().unwrap_or_default(),
        claim: claim.to_string(),
        node_terms,
        topology_labels,
    }
}

fn label_selector(
    s: &k8s_openapi::apimachinery::pkg::apis::meta::v1::LabelSelector,
) -> LabelSelector {
    LabelSelector {
        match_labels: s.match_labels.clone().unwrap_or_default(),
        match_expressions: s
            .match_expressions
            .iter()
            .flatten()
            .map(|e| SelectorRequirement {
                key: e.key.clone(),
                operator: match e.operator.as_str() {
                    "In" => SelectorOperator::In,
                    "NotIn" => SelectorOperator::NotIn,
                    "Exists" => SelectorOperator::Exists,
                    "DoesNotExist" => SelectorOperator::DoesNotExist,
                    // Invalid for a label selector: matches nothing.
                    _ => SelectorOperator::Gt,
                },
                values: e.values.clone().unwrap_or_default(),
            })
            .collect(),
    }
}

fn term(
    t: &K8sTerm,
    namespace_labels: &HashMap<String, BTreeMap<String, String>>,
) -> PodAffinityTerm {
    let listed: BTreeSet<String> = t.namespaces.iter().flatten().cloned().collect();
    let namespaces = match &t.namespace_selector {
        None if listed.is_empty() => TermNamespaces::Own,
        None => TermNamespaces::Listed(listed),
        Some(sel)
            if sel.match_labels.as_ref().is_none_or(|m| m.is_empty())
                && sel.match_expressions.as_ref().is_none_or(|e| e.is_empty()) =>
        {
            TermNamespaces::All
        }
        Some(sel) => {
            let sel = label_selector(sel);
            let mut set = listed;
            set.extend(
                namespace_labels
                    .iter()
                    .filter(|(_, l)| sel.matches(l))
                    .map(|(n, _)| n.clone()),
            );
            TermNamespaces::Listed(set)
        }
    };
    PodAffinityTerm {
        selector: t.label_selector.as_ref().map(label_selector),
        namespaces,
        topology_key: t.topology_key.clone(),
    }
}

/// The required pod anti-affinity terms of a VMI (copied by KubeVirt onto its launcher pods).
pub fn anti_affinity_terms(
    affinity: Option<&Affinity>,
    namespace_labels: &HashMap<String, BTreeMap<String, String>>,
) -> Vec<PodAffinityTerm> {
    affinity
        .and_then(|a| a.pod_anti_affinity.as_ref())
        .and_then(|p| {
            p.required_during_scheduling_ignored_during_execution
                .as_ref()
        })
        .map(|terms| terms.iter().map(|t| term(t, namespace_labels)).collect())
        .unwrap_or_default()
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn vmi(extra: serde_json::Value) -> VirtualMachineInstance {
        let mut v = json!({
            "apiVersion": "kubevirt.io/v1", "kind": "VirtualMachineInstance",
            "metadata": {"name": "vm1", "namespace": "ns", "uid": "uid-1"},
            "spec": {"domain": {"resources": {"requests": {"memory": "1Gi"}}}},
            "status": {"nodeName": "src"}
        });
        for (k, val) in extra.as_object().unwrap() {
            v["spec"][k] = val.clone();
        }
        serde_json::from_value(v).unwrap()
    }

    fn pod(
        name: &str,
        node: &str,
        labels: serde_json::Value,
        requests: serde_json::Value,
    ) -> Arc<Pod> {
        Arc::new(
            serde_json::from_value(json!({
                "metadata": {"name": name, "namespace": "ns", "labels": labels},
                "spec": {"nodeName": node, "containers": [{"name": "c", "resources": {"requests": requests}}]},
                "status": {"phase": "Running"}
            }))
            .unwrap(),
        )
    }

    fn node(name: &str, zone: &str) -> Arc<Node> {
        Arc::new(
            serde_json::from_value(json!({"metadata": {"name": name,
                "labels": {"topology.kubernetes.io/zone": zone, "kubernetes.io/hostname": name}}}))
            .unwrap(),
        )
    }

    #[test]
    fn bound_claims_bring_their_volumes_node_affinity_and_zone() {
        let pvc: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "disk", "namespace": "ns"},
            "spec": {"volumeName": "pv-local"}
        }))
        .unwrap();
        let unbound: PersistentVolumeClaim = serde_json::from_value(json!({
            "metadata": {"name": "later", "namespace": "ns"}, "spec": {}
        }))
        .unwrap();
        let pv: PersistentVolume = serde_json::from_value(json!({
            "metadata": {"name": "pv-local", "labels": {"topology.kubernetes.io/zone": "z1"}},
            "spec": {"nodeAffinity": {"required": {"nodeSelectorTerms": [{"matchExpressions": [
                {"key": "kubernetes.io/hostname", "operator": "In", "values": ["n1"]}]}]}}}
        }))
        .unwrap();
        let ctx = FitContext::new(
            LauncherConfig::default(),
            vec![Arc::new(pvc), Arc::new(unbound)],
            vec![Arc::new(pv)],
            vec![],
            &[],
        );
        let r = ctx
            .vm_request(&vmi(json!({"volumes": [
                {"name": "a", "persistentVolumeClaim": {"claimName": "disk"}},
                {"name": "b", "dataVolume": {"name": "later"}},
                {"name": "c", "containerDisk": {"image": "x"}}
            ]})))
            .unwrap();
        assert_eq!(r.fit.volumes.len(), 1, "only the bound claim counts");
        let v = &r.fit.volumes[0];
        assert_eq!((v.volume.as_str(), v.claim.as_str()), ("pv-local", "disk"));
        assert_eq!(v.node_terms[0].match_expressions[0].values, vec!["n1"]);
        assert_eq!(v.topology_labels["topology.kubernetes.io/zone"], "z1");
    }

    #[test]
    fn anti_affinity_becomes_the_zones_of_matching_pods() {
        let pods = vec![
            pod("db-0", "a1", json!({"app": "db"}), json!({})),
            pod("web-0", "b1", json!({"app": "web"}), json!({})),
        ];
        let nodes = [node("a1", "za"), node("b1", "zb")];
        let ctx = FitContext::new(LauncherConfig::default(), vec![], vec![], pods, &nodes);
        let r = ctx
            .vm_request(&vmi(json!({"affinity": {"podAntiAffinity": {
                "requiredDuringSchedulingIgnoredDuringExecution": [{
                    "labelSelector": {"matchLabels": {"app": "db"}},
                    "topologyKey": "topology.kubernetes.io/zone"}]}}})))
            .unwrap();
        assert_eq!(r.fit.excluded_domains.len(), 1);
        let d = &r.fit.excluded_domains[0];
        assert_eq!(d.pod, "ns/db-0");
        assert_eq!(d.values, ["za".to_string()].into());
    }

    #[test]
    fn devices_of_the_running_launcher_pod_are_required_on_the_target() {
        let launcher = pod(
            "virt-launcher-vm1-x",
            "src",
            json!({CREATED_BY_LABEL: "uid-1"}),
            json!({"memory": "1Gi", "intel.com/sriov_netdevice": "1", "hugepages-2Mi": "1Gi"}),
        );
        let ctx = FitContext::new(
            LauncherConfig::default(),
            vec![],
            vec![],
            vec![launcher],
            &[],
        );
        let r = ctx.vm_request(&vmi(json!({}))).unwrap();
        assert_eq!(r.fit.scalar_requests["intel.com/sriov_netdevice"], 1);
        assert!(
            !r.fit.scalar_requests.contains_key("hugepages-2Mi"),
            "hugepages come from the VMI's own spec"
        );
    }
}
