//! Minimum hardware configuration: which nodes can host the VM's migration target pod at all.
//! Every node left out carries a reason a person can read in `kubectl describe`.
//!
//! Each rule mirrors a kube-scheduler filter, so that a node the filter accepts is one where
//! the target pod can really be scheduled:
//! - CPU, memory (the guest plus KubeVirt's launcher overhead, see [`super::launcher`]),
//!   hugepages and device-plugin resources: NodeResourcesFit, allocatable minus what the
//!   pods bound to the node request;
//! - node selector and required node affinity: NodeAffinity; taints: TaintToleration;
//! - the VM's bound persistent volumes: VolumeBinding (the volume's node affinity) and
//!   VolumeZone (its zone and region labels);
//! - the pod's required pod anti-affinity: InterPodAffinity.
//!
//! Readiness, cordons, KubeVirt's schedulable label and CPU model and feature labels are
//! KubeVirt's own conditions on a target.

use std::collections::BTreeMap;

use super::cluster::{
    NodeFacts, NodeSelectorTerm, SelectorOperator, SelectorRequirement, TaintEffect, Toleration,
    TolerationOperator, VmRequest, VolumeConstraint,
};

pub const KUBEVIRT_SCHEDULABLE_LABEL: &str = "kubevirt.io/schedulable";
pub const CPU_MODEL_LABEL_PREFIX: &str = "cpu-model.node.kubevirt.io/";
pub const CPU_MODEL_MIGRATION_LABEL_PREFIX: &str = "cpu-model-migration.node.kubevirt.io/";
pub const CPU_FEATURE_LABEL_PREFIX: &str = "cpu-feature.node.kubevirt.io/";

/// Why a node cannot take the VM.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FilterReason {
    SourceNode,
    NotReady,
    Unschedulable,
    NotKubevirtSchedulable,
    InsufficientCpu {
        free_millis: u64,
        needed_millis: u64,
    },
    InsufficientMemory {
        free_bytes: u64,
        needed_bytes: u64,
        /// The part of `needed_bytes` that is KubeVirt's launcher overhead.
        overhead_bytes: u64,
    },
    /// Too few free `hugepages-<size>` (bytes).
    InsufficientHugepages {
        resource: String,
        free_bytes: u64,
        needed_bytes: u64,
    },
    /// Too few free units of a device-plugin resource (GPU, host device, SR-IOV function...).
    InsufficientDevice {
        resource: String,
        free: u64,
        needed: u64,
    },
    /// The node does not meet a bound persistent volume's node affinity.
    VolumeNodeAffinity {
        volume: String,
        claim: String,
    },
    /// The node is outside a persistent volume's zone or region.
    VolumeTopology {
        volume: String,
        key: String,
        want: String,
    },
    /// A pod the VM's required anti-affinity matches runs in the node's topology domain.
    PodAntiAffinity {
        pod: String,
        topology_key: String,
        value: String,
    },
    NodeSelectorMismatch {
        key: String,
        want: String,
    },
    AffinityMismatch,
    UntoleratedTaint {
        key: String,
        effect: TaintEffect,
    },
    MissingCpuModel(String),
    MissingCpuFeature(String),
    NotPinnedTarget(String),
    /// Another member of the VM's memory group cannot run on the node (its own selectors,
    /// affinity, taints or CPU model), and the group moves as one.
    GroupMemberExcluded,
    OutsideWorkGroup {
        node_group: String,
        wanted: String,
    },
    /// An earlier attempt of this migration to the node failed, for this reason.
    EarlierAttemptFailed(String),
}

impl std::fmt::Display for FilterReason {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Self::SourceNode => write!(f, "source node of the migration"),
            Self::NotReady => write!(f, "node is not Ready"),
            Self::Unschedulable => write!(f, "node is cordoned (spec.unschedulable)"),
            Self::NotKubevirtSchedulable => {
                write!(f, "node lacks label {KUBEVIRT_SCHEDULABLE_LABEL}=true")
            }
            Self::InsufficientCpu {
                free_millis,
                needed_millis,
            } => write!(
                f,
                "insufficient cpu: {free_millis}m free, {needed_millis}m needed"
            ),
            Self::InsufficientMemory {
                free_bytes,
                needed_bytes,
                overhead_bytes: 0,
            } => write!(
                f,
                "insufficient memory: {} free, {} needed",
                human_bytes(*free_bytes),
                human_bytes(*needed_bytes)
            ),
            Self::InsufficientMemory {
                free_bytes,
                needed_bytes,
                overhead_bytes,
            } => write!(
                f,
                "insufficient memory: {} free, {} needed (with {} virt-launcher overhead)",
                human_bytes(*free_bytes),
                human_bytes(*needed_bytes),
                human_bytes(*overhead_bytes)
            ),
            Self::InsufficientHugepages {
                resource,
                free_bytes,
                needed_bytes,
            } => write!(
                f,
                "insufficient {resource}: {} free, {} needed for the guest's memory",
                human_bytes(*free_bytes),
                human_bytes(*needed_bytes)
            ),
            Self::InsufficientDevice {
                resource,
                free,
                needed,
            } => write!(f, "insufficient {resource}: {free} free, {needed} needed"),
            Self::VolumeNodeAffinity { volume, claim } => write!(
                f,
                "node does not match the node affinity of persistent volume {volume} (claim {claim})"
            ),
            Self::VolumeTopology { volume, key, want } => write!(
                f,
                "persistent volume {volume} is in {key}={want}, the node is not"
            ),
            Self::PodAntiAffinity {
                pod,
                topology_key,
                value,
            } => write!(
                f,
                "pod anti-affinity: {pod} runs in {topology_key}={value}"
            ),
            Self::NodeSelectorMismatch { key, want } => {
                write!(f, "node selector {key}={want} does not match")
            }
            Self::AffinityMismatch => write!(f, "required node affinity does not match"),
            Self::UntoleratedTaint { key, effect } => {
                write!(f, "untolerated taint {key}:{effect:?}")
            }
            Self::MissingCpuModel(m) => write!(f, "CPU model {m} not supported"),
            Self::MissingCpuFeature(x) => write!(f, "CPU feature {x} not supported"),
            Self::NotPinnedTarget(t) => write!(f, "migration is pinned to node {t}"),
            Self::GroupMemberExcluded => write!(
                f,
                "another member of the VM's memory group cannot run here, and the group moves as one"
            ),
            Self::OutsideWorkGroup { node_group, wanted } => {
                write!(f, "in work group {node_group}, migration asks for {wanted}")
            }
            Self::EarlierAttemptFailed(why) => {
                write!(f, "an earlier attempt to migrate here failed: {why}")
            }
        }
    }
}

/// 1.5 GiB style sizes for messages.
pub fn human_bytes(b: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = b as f64;
    let mut unit = 0;
    while v >= 1024.0 && unit < UNITS.len() - 1 {
        v /= 1024.0;
        unit += 1;
    }
    if unit == 0 {
        format!("{b} B")
    } else {
        format!("{v:.1} {}", UNITS[unit])
    }
}

/// The first reason `node` cannot host `vm`, or `None` when it can.
pub fn check_node(vm: &VmRequest, node: &NodeFacts) -> Option<FilterReason> {
    if node.name == vm.source_node {
        return Some(FilterReason::SourceNode);
    }
    if !node.ready {
        return Some(FilterReason::NotReady);
    }
    if node.unschedulable {
        return Some(FilterReason::Unschedulable);
    }
    if node
        .labels
        .get(KUBEVIRT_SCHEDULABLE_LABEL)
        .map(String::as_str)
        != Some("true")
    {
        return Some(FilterReason::NotKubevirtSchedulable);
    }
    let free = node.free();
    if vm.requests.cpu_millis > free.cpu_millis {
        return Some(FilterReason::InsufficientCpu {
            free_millis: free.cpu_millis,
            needed_millis: vm.requests.cpu_millis,
        });
    }
    if vm.requests.memory_bytes > free.memory_bytes {
        return Some(FilterReason::InsufficientMemory {
            free_bytes: free.memory_bytes,
            needed_bytes: vm.requests.memory_bytes,
            overhead_bytes: vm.fit.memory_overhead_bytes,
        });
    }
    if let Some(reason) = scalar_shortage(&vm.fit.scalar_requests, node) {
        return Some(reason);
    }
    if let Some(reason) = selector_mismatch(&vm.node_selector, &node.labels) {
        return Some(reason);
    }
    if !vm.affinity_terms.is_empty()
        && !vm
            .affinity_terms
            .iter()
            .any(|t| term_matches(t, &node.name, &node.labels))
    {
        return Some(FilterReason::AffinityMismatch);
    }
    for taint in &node.taints {
        if taint.effect != TaintEffect::PreferNoSchedule
            && !vm
                .tolerations
                .iter()
                .any(|t| tolerates(t, &taint.key, taint.value.as_deref(), taint.effect))
        {
            return Some(FilterReason::UntoleratedTaint {
                key: taint.key.clone(),
                effect: taint.effect,
            });
        }
    }
    if let Some(model) = &vm.cpu_model {
        let has = |prefix: &str| {
            node.labels
                .get(&format!("{prefix}{model}"))
                .map(String::as_str)
                == Some("true")
        };
        if !has(CPU_MODEL_LABEL_PREFIX) && !has(CPU_MODEL_MIGRATION_LABEL_PREFIX) {
            return Some(FilterReason::MissingCpuModel(model.clone()));
        }
    }
    for feature in &vm.cpu_features {
        let label = format!("{CPU_FEATURE_LABEL_PREFIX}{feature}");
        if node.labels.get(&label).map(String::as_str) != Some("true") {
            return Some(FilterReason::MissingCpuFeature(feature.clone()));
        }
    }
    for v in &vm.fit.volumes {
        if let Some(reason) = volume_mismatch(v, node) {
            return Some(reason);
        }
    }
    for d in &vm.fit.excluded_domains {
        if d.excludes(&node.labels) {
            return Some(FilterReason::PodAntiAffinity {
                pod: d.pod.clone(),
                topology_key: d.topology_key.clone(),
                value: node.labels[&d.topology_key].clone(),
            });
        }
    }
    None
}

/// The first hugepages or device-plugin resource the node has too little of. A resource the
/// node does not list at all has none free, as for kube-scheduler.
fn scalar_shortage(requests: &BTreeMap<String, u64>, node: &NodeFacts) -> Option<FilterReason> {
    requests
        .iter()
        .filter(|(_, &n)| n > 0)
        .find_map(|(name, &needed)| {
            let alloc = node.scalar_allocatable.get(name).copied().unwrap_or(0);
            let used = node.scalar_requested.get(name).copied().unwrap_or(0);
            let free = alloc.saturating_sub(used);
            (needed > free).then(|| {
                if name.starts_with(HUGEPAGES_PREFIX) {
                    FilterReason::InsufficientHugepages {
                        resource: name.clone(),
                        free_bytes: free,
                        needed_bytes: needed,
                    }
                } else {
                    FilterReason::InsufficientDevice {
                        resource: name.clone(),
                        free,
                        needed,
                    }
                }
            })
        })
}

pub const HUGEPAGES_PREFIX: &str = "hugepages-";

/// Zone and region labels of a volume that kube-scheduler's VolumeZone filter compares.
pub const VOLUME_TOPOLOGY_LABELS: [&str; 4] = [
    "topology.kubernetes.io/zone",
    "topology.kubernetes.io/region",
    "failure-domain.beta.kubernetes.io/zone",
    "failure-domain.beta.kubernetes.io/region",
];

fn volume_mismatch(v: &VolumeConstraint, node: &NodeFacts) -> Option<FilterReason> {
    if !v.node_terms.is_empty()
        && !v
            .node_terms
            .iter()
            .any(|t| term_matches(t, &node.name, &node.labels))
    {
        return Some(FilterReason::VolumeNodeAffinity {
            volume: v.volume.clone(),
            claim: v.claim.clone(),
        });
    }
    // A node with no zone or region label at all passes (a single-zone cluster).
    if !VOLUME_TOPOLOGY_LABELS
        .iter()
        .any(|k| node.labels.contains_key(*k))
    {
        return None;
    }
    for (key, want) in &v.topology_labels {
        // A volume may name several zones joined by `__`; the node must be in one of them.
        // An old `failure-domain.beta` key is also matched by the node's current label.
        let have = node.labels.get(key).or_else(|| {
            key.strip_prefix("failure-domain.beta.kubernetes.io/")
                .and_then(|k| node.labels.get(&format!("topology.kubernetes.io/{k}")))
        });
        let ok = have.is_some_and(|have| want.split("__").any(|w| w == have));
        if !ok {
            return Some(FilterReason::VolumeTopology {
                volume: v.volume.clone(),
                key: key.clone(),
                want: want.clone(),
            });
        }
    }
    None
}

fn selector_mismatch(
    selector: &BTreeMap<String, String>,
    labels: &BTreeMap<String, String>,
) -> Option<FilterReason> {
    selector
        .iter()
        .find(|(k, v)| labels.get(*k) != Some(*v))
        .map(|(k, v)| FilterReason::NodeSelectorMismatch {
            key: k.clone(),
            want: v.clone(),
        })
}

fn term_matches(term: &NodeSelectorTerm, name: &str, labels: &BTreeMap<String, String>) -> bool {
    // An empty term matches nothing, as in Kubernetes.
    if term.match_expressions.is_empty() && term.match_fields.is_empty() {
        return false;
    }
    term.match_expressions
        .iter()
        .all(|r| requirement_matches(r, labels.get(&r.key).map(String::as_str)))
        && term
            .match_fields
            .iter()
            .all(|r| r.key == "metadata.name" && requirement_matches(r, Some(name)))
}

fn requirement_matches(r: &SelectorRequirement, value: Option<&str>) -> bool {
    let number = |s: &str| s.parse::<i64>().ok();
    match r.operator {
        SelectorOperator::In => value.is_some_and(|v| r.values.iter().any(|x| x == v)),
        SelectorOperator::NotIn => !value.is_some_and(|v| r.values.iter().any(|x| x == v)),
        SelectorOperator::Exists => value.is_some(),
        SelectorOperator::DoesNotExist => value.is_none(),
        SelectorOperator::Gt | SelectorOperator::Lt => {
            let (Some(v), Some(bound)) = (
                value.and_then(number),
                r.values.first().and_then(|s| number(s)),
            ) else {
                return false;
            };
            if r.operator == SelectorOperator::Gt {
                v > bound
            } else {
                v < bound
            }
        }
    }
}

fn tolerates(t: &Toleration, key: &str, value: Option<&str>, effect: TaintEffect) -> bool {
    if t.effect.is_some_and(|e| e != effect) {
        return false;
    }
    match t.operator {
        TolerationOperator::Exists => t.key.as_deref().is_none_or(|k| k.is_empty() || k == key),
        TolerationOperator::Equal => {
            t.key.as_deref() == Some(key) && t.value.as_deref().unwrap_or("") == value.unwrap_or("")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::cluster::{Resources, Taint, VmKey};

    const GIB: u64 = 1 << 30;

    fn node(name: &str) -> NodeFacts {
        NodeFacts {
            name: name.into(),
            labels: [(KUBEVIRT_SCHEDULABLE_LABEL.to_string(), "true".to_string())].into(),
            taints: vec![],
            unschedulable: false,
            ready: true,
            allocatable: Resources {
                cpu_millis: 8000,
                memory_bytes: 32 * GIB,
            },
            requested: Resources::default(),
            work_group: "a".into(),
            load: None,
            scalar_allocatable: BTreeMap::new(),
            scalar_requested: BTreeMap::new(),
        }
    }

    fn vm() -> VmRequest {
        VmRequest {
            vm: VmKey::new("ns", "vm"),
            source_node: "src".into(),
            requests: Resources {
                cpu_millis: 2000,
                memory_bytes: 8 * GIB,
            },
            node_selector: BTreeMap::new(),
            affinity_terms: vec![],
            tolerations: vec![],
            cpu_model: None,
            cpu_features: vec![],
            summary: None,
            memory_bytes: 8 * GIB,
            fit: Default::default(),
        }
    }

    #[test]
    fn source_node_always_fails() {
        assert_eq!(
            check_node(&vm(), &node("src")),
            Some(FilterReason::SourceNode)
        );
    }

    #[test]
    fn capacity_is_checked_with_a_readable_reason() {
        let mut n = node("n");
        n.requested = Resources {
            cpu_millis: 0,
            memory_bytes: 30 * GIB,
        };
        let r = check_node(&vm(), &n).unwrap();
        assert_eq!(
            r.to_string(),
            "insufficient memory: 2.0 GiB free, 8.0 GiB needed"
        );
        n.requested = Resources {
            cpu_millis: 7000,
            memory_bytes: 0,
        };
        assert!(matches!(
            check_node(&vm(), &n),
            Some(FilterReason::InsufficientCpu { .. })
        ));
    }

    #[test]
    fn cordoned_unready_and_non_kubevirt_nodes_fail() {
        let mut n = node("n");
        n.unschedulable = true;
        assert_eq!(check_node(&vm(), &n), Some(FilterReason::Unschedulable));
        let mut n = node("n");
        n.ready = false;
        assert_eq!(check_node(&vm(), &n), Some(FilterReason::NotReady));
        let mut n = node("n");
        n.labels.clear();
        assert_eq!(
            check_node(&vm(), &n),
            Some(FilterReason::NotKubevirtSchedulable)
        );
    }

    #[test]
    fn taints_need_tolerations_but_prefer_no_schedule_does_not() {
        let mut n = node("n");
        n.taints.push(Taint {
            key: "gpu".into(),
            value: Some("yes".into()),
            effect: TaintEffect::NoSchedule,
        });
        assert!(matches!(
            check_node(&vm(), &n),
            Some(FilterReason::UntoleratedTaint { .. })
        ));
        let mut v = vm();
        v.tolerations.push(Toleration {
            key: Some("gpu".into()),
            operator: TolerationOperator::Equal,
            value: Some("yes".into()),
            effect: None,
        });
        assert_eq!(check_node(&v, &n), None);
        let mut n = node("n");
        n.taints.push(Taint {
            key: "x".into(),
            value: None,
            effect: TaintEffect::PreferNoSchedule,
        });
        assert_eq!(check_node(&vm(), &n), None);
        let mut v = vm();
        v.tolerations.push(Toleration {
            operator: TolerationOperator::Exists,
            ..Default::default()
        });
        let mut n = node("n");
        n.taints.push(Taint {
            key: "any".into(),
            value: None,
            effect: TaintEffect::NoExecute,
        });
        assert_eq!(
            check_node(&v, &n),
            None,
            "empty key with Exists tolerates everything"
        );
    }

    #[test]
    fn selectors_affinity_and_cpu_labels() {
        let mut v = vm();
        v.node_selector.insert("disk".into(), "ssd".into());
        assert!(matches!(
            check_node(&v, &node("n")),
            Some(FilterReason::NodeSelectorMismatch { .. })
        ));
        let mut v = vm();
        v.affinity_terms.push(NodeSelectorTerm {
            match_expressions: vec![SelectorRequirement {
                key: "rack".into(),
                operator: SelectorOperator::Gt,
                values: vec!["3".into()],
            }],
            match_fields: vec![],
        });
        let mut n = node("n");
        n.labels.insert("rack".into(), "2".into());
        assert_eq!(check_node(&v, &n), Some(FilterReason::AffinityMismatch));
        n.labels.insert("rack".into(), "4".into());
        assert_eq!(check_node(&v, &n), None);
        let mut v = vm();
        v.cpu_model = Some("Skylake".into());
        v.cpu_features = vec!["avx2".into()];
        let mut n = node("n");
        assert_eq!(
            check_node(&v, &n),
            Some(FilterReason::MissingCpuModel("Skylake".into()))
        );
        n.labels
            .insert(format!("{CPU_MODEL_LABEL_PREFIX}Skylake"), "true".into());
        assert_eq!(
            check_node(&v, &n),
            Some(FilterReason::MissingCpuFeature("avx2".into()))
        );
        n.labels
            .insert(format!("{CPU_FEATURE_LABEL_PREFIX}avx2"), "true".into());
        assert_eq!(check_node(&v, &n), None);
    }

    #[test]
    fn match_fields_can_pin_by_name() {
        let mut v = vm();
        v.affinity_terms.push(NodeSelectorTerm {
            match_expressions: vec![],
            match_fields: vec![SelectorRequirement {
                key: "metadata.name".into(),
                operator: SelectorOperator::In,
                values: vec!["b".into()],
            }],
        });
        assert_eq!(
            check_node(&v, &node("a")),
            Some(FilterReason::AffinityMismatch)
        );
        assert_eq!(check_node(&v, &node("b")), None);
    }

    #[test]
    fn memory_reason_names_the_launcher_overhead() {
        let mut v = vm();
        v.fit.memory_overhead_bytes = 300 << 20;
        v.requests.memory_bytes = 8 * GIB + (300 << 20);
        let mut n = node("n");
        n.allocatable.memory_bytes = 8 * GIB + (100 << 20);
        assert_eq!(
            check_node(&v, &n).unwrap().to_string(),
            "insufficient memory: 8.1 GiB free, 8.3 GiB needed (with 300.0 MiB virt-launcher overhead)"
        );
        n.allocatable.memory_bytes = 9 * GIB;
        assert_eq!(check_node(&v, &n), None);
    }

    #[test]
    fn hugepages_need_free_pages_of_the_guest_page_size() {
        let mut v = vm();
        v.fit
            .scalar_requests
            .insert("hugepages-1Gi".into(), 8 * GIB);
        let mut n = node("n");
        assert_eq!(
            check_node(&v, &n).unwrap().to_string(),
            "insufficient hugepages-1Gi: 0 B free, 8.0 GiB needed for the guest's memory"
        );
        n.scalar_allocatable
            .insert("hugepages-2Mi".into(), 16 * GIB);
        assert!(
            check_node(&v, &n).is_some(),
            "pages of another size do not help"
        );
        n.scalar_allocatable
            .insert("hugepages-1Gi".into(), 16 * GIB);
        n.scalar_requested.insert("hugepages-1Gi".into(), 10 * GIB);
        assert!(matches!(
            check_node(&v, &n),
            Some(FilterReason::InsufficientHugepages { free_bytes, .. }) if free_bytes == 6 * GIB
        ));
        n.scalar_requested.insert("hugepages-1Gi".into(), 8 * GIB);
        assert_eq!(check_node(&v, &n), None);
    }

    #[test]
    fn devices_need_free_units_of_the_plugin_resource() {
        let mut v = vm();
        v.fit.scalar_requests.insert("nvidia.com/A100".into(), 2);
        let mut n = node("n");
        n.scalar_allocatable.insert("nvidia.com/A100".into(), 4);
        n.scalar_requested.insert("nvidia.com/A100".into(), 3);
        assert_eq!(
            check_node(&v, &n).unwrap().to_string(),
            "insufficient nvidia.com/A100: 1 free, 2 needed"
        );
        n.scalar_requested.clear();
        assert_eq!(check_node(&v, &n), None);
        assert!(
            matches!(
                check_node(&v, &node("m")),
                Some(FilterReason::InsufficientDevice { free: 0, .. })
            ),
            "a node without the resource has none"
        );
    }

    fn local_volume(node_name: &str) -> VolumeConstraint {
        VolumeConstraint {
            volume: "pv-1".into(),
            claim: "disk".into(),
            node_terms: vec![NodeSelectorTerm {
                match_expressions: vec![SelectorRequirement {
                    key: "kubernetes.io/hostname".into(),
                    operator: SelectorOperator::In,
                    values: vec![node_name.into()],
                }],
                match_fields: vec![],
            }],
            topology_labels: BTreeMap::new(),
        }
    }

    #[test]
    fn a_local_volume_keeps_the_vm_on_the_volumes_node() {
        let mut v = vm();
        v.fit.volumes.push(local_volume("b"));
        let mut a = node("a");
        a.labels.insert("kubernetes.io/hostname".into(), "a".into());
        let mut b = node("b");
        b.labels.insert("kubernetes.io/hostname".into(), "b".into());
        assert_eq!(
            check_node(&v, &a).unwrap().to_string(),
            "node does not match the node affinity of persistent volume pv-1 (claim disk)"
        );
        assert_eq!(check_node(&v, &b), None);
    }

    #[test]
    fn a_zonal_volume_keeps_the_vm_in_its_zones() {
        let mut v = vm();
        v.fit.volumes.push(VolumeConstraint {
            volume: "pv-z".into(),
            claim: "disk".into(),
            node_terms: vec![],
            topology_labels: [(
                "failure-domain.beta.kubernetes.io/zone".to_string(),
                "z1__z2".to_string(),
            )]
            .into(),
        });
        let zoned = |z: &str| {
            let mut n = node("n");
            n.labels
                .insert("topology.kubernetes.io/zone".into(), z.into());
            n
        };
        assert_eq!(
            check_node(&v, &zoned("z2")),
            None,
            "the GA label answers the beta key"
        );
        assert_eq!(
            check_node(&v, &zoned("z3")).unwrap().to_string(),
            "persistent volume pv-z is in failure-domain.beta.kubernetes.io/zone=z1__z2, the node is not"
        );
        assert_eq!(
            check_node(&v, &node("n")),
            None,
            "a node with no zone or region label passes"
        );
    }

    #[test]
    fn anti_affinity_rules_out_the_domains_of_matching_pods() {
        let mut v = vm();
        v.fit
            .excluded_domains
            .push(crate::plan::affinity::ExcludedDomain {
                topology_key: "topology.kubernetes.io/zone".into(),
                values: ["z1".to_string()].into(),
                pod: "ns/db-0".into(),
            });
        let mut n = node("n");
        n.labels
            .insert("topology.kubernetes.io/zone".into(), "z1".into());
        assert_eq!(
            check_node(&v, &n).unwrap().to_string(),
            "pod anti-affinity: ns/db-0 runs in topology.kubernetes.io/zone=z1"
        );
        n.labels
            .insert("topology.kubernetes.io/zone".into(), "z2".into());
        assert_eq!(check_node(&v, &n), None);
    }
}
