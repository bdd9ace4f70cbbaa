//! The target pod's required pod anti-affinity, as kube-scheduler's InterPodAffinity filter
//! applies it: a node is ruled out when a pod matching one of the terms runs on any node that
//! shares the node's value of the term's topology key (the same host, the same zone, ...).
//!
//! The cluster's pods are looked at once per VM, when its request is built: each term becomes
//! the set of topology values it excludes ([`ExcludedDomain`]), and the filter then only looks
//! up a node's label in those sets.

use std::collections::{BTreeMap, BTreeSet};

use serde::{Deserialize, Serialize};

use super::cluster::{SelectorOperator, SelectorRequirement};

/// A Kubernetes label selector: every `match_labels` pair and every expression must hold.
/// An empty selector matches every pod.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct LabelSelector {
    #[serde(default)]
    pub match_labels: BTreeMap<String, String>,
    /// Only `In`, `NotIn`, `Exists` and `DoesNotExist` are valid for pods.
    #[serde(default)]
    pub match_expressions: Vec<SelectorRequirement>,
}

impl LabelSelector {
    pub fn matches(&self, labels: &BTreeMap<String, String>) -> bool {
        self.match_labels
            .iter()
            .all(|(k, v)| labels.get(k) == Some(v))
            && self.match_expressions.iter().all(|r| {
                let value = labels.get(&r.key);
                match r.operator {
                    SelectorOperator::In => value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::NotIn => !value.is_some_and(|v| r.values.contains(v)),
                    SelectorOperator::Exists => value.is_some(),
                    SelectorOperator::DoesNotExist => value.is_none(),
                    // Not valid in a label selector: the API server refuses it.
                    SelectorOperator::Gt | SelectorOperator::Lt => false,
                }
            })
    }
}

/// Which namespaces a term looks at.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub enum TermNamespaces {
    /// No `namespaces` and no `namespaceSelector`: the pod's own namespace.
    #[default]
    Own,
    /// `namespaceSelector: {}`: every namespace.
    All,
    /// The listed namespaces (and, where a non-empty namespace selector is given, those
    /// it selected when the view was built).
    Listed(BTreeSet<String>),
}

/// One `requiredDuringSchedulingIgnoredDuringExecution` term of a pod anti-affinity.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct PodAffinityTerm {
    /// `None`: the term matches no pod (a nil selector in Kubernetes).
    pub selector: Option<LabelSelector>,
    #[serde(default)]
    pub namespaces: TermNamespaces,
    pub topology_key: String,
}

/// A pod somewhere in the cluster, as far as anti-affinity cares.
#[derive(Clone, Copy, Debug)]
pub struct PodOnNode<'a> {
    pub namespace: &'a str,
    pub name: &'a str,
    pub labels: &'a BTreeMap<String, String>,
    pub node: &'a str,
}

/// Nodes whose `topology_key` label has one of `values` are ruled out, because `pod` (the
/// first matching pod found, for the reason) runs in that domain.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ExcludedDomain {
    pub topology_key: String,
    pub values: BTreeSet<String>,
    /// `namespace/name` of a pod in the domain that the term matches.
    pub pod: String,
}

impl ExcludedDomain {
    /// Whether a node with these labels is in one of the excluded domains (a node without the
    /// topology key is in none, as in kube-scheduler).
    pub fn excludes(&self, node_labels: &BTreeMap<String, String>) -> bool {
        node_labels
            .get(&self.topology_key)
            .is_some_and(|v| self.values.contains(v))
    }
}

/// The domains each term rules out, given where the cluster's pods run. `node_label(node,
/// key)` is the label `key` of the node a pod runs on. The VM's own source pod counts like any
/// other, as it does for kube-scheduler.
pub fn excluded_domains<'a, 'b>(
    terms: &[PodAffinityTerm],
    own_namespace: &str,
    pods: impl IntoIterator<Item = PodOnNode<'a>>,
    node_label: impl Fn(&str, &str) -> Option<&'b str>,
) -> Vec<ExcludedDomain> {
    if terms.is_empty() {
        return Vec::new();
    }
    let mut out: Vec<Option<ExcludedDomain>> = vec![None; terms.len()];
    for pod in pods {
        for (term, slot) in terms.iter().zip(out.iter_mut()) {
            let Some(selector) = &term.selector else {
                continue;
            };
            let in_namespace = match &term.namespaces {
                TermNamespaces::Own => pod.namespace == own_namespace,
                TermNamespaces::All => true,
                TermNamespaces::Listed(set) => set.contains(pod.namespace),
            };
            if !in_namespace || !selector.matches(pod.labels) {
                continue;
            }
            let Some(value) = node_label(pod.node, &term.topology_key) else {
                continue;
            };
            let d = slot.get_or_insert_with(|| ExcludedDomain {
                topology_key: term.topology_key.clone(),
                values: BTreeSet::new(),
                pod: format!("{}/{}", pod.namespace, pod.name),
            });
            d.values.insert(value.to_string());
        }
    }
    out.into_iter().flatten().collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn selector_needs_every_label_and_expression() {
        let s = LabelSelector {
            match_labels: labels(&[("app", "db")]),
            match_expressions: vec![SelectorRequirement {
                key: "tier".into(),
                operator: SelectorOperator::NotIn,
                values: vec!["test".into()],
            }],
        };
        assert!(s.matches(&labels(&[("app", "db")])));
        assert!(!s.matches(&labels(&[("app", "db"), ("tier", "test")])));
        assert!(!s.matches(&labels(&[("app", "web")])));
        assert!(LabelSelector::default().matches(&labels(&[])));
    }

    #[test]
    fn a_matching_pod_excludes_every_node_of_its_zone() {
        let db = labels(&[("app", "db")]);
        let web = labels(&[("app", "web")]);
        let pods = [
            PodOnNode {
                namespace: "ns",
                name: "db-0",
                labels: &db,
                node: "a1",
            },
            PodOnNode {
                namespace: "ns",
                name: "web-0",
                labels: &web,
                node: "b1",
            },
            PodOnNode {
                namespace: "other",
                name: "db-x",
                labels: &db,
                node: "c1",
            },
        ];
        fn zone(node: &str, key: &str) -> Option<&'static str> {
            (key == "zone").then_some(match node {
                "a1" | "a2" => "a",
                "b1" => "b",
                _ => "c",
            })
        }
        let term = PodAffinityTerm {
            selector: Some(LabelSelector {
                match_labels: labels(&[("app", "db")]),
                ..Default::default()
            }),
            namespaces: TermNamespaces::Own,
            topology_key: "zone".into(),
        };
        let d = excluded_domains(std::slice::from_ref(&term), "ns", pods, zone);
        assert_eq!(d.len(), 1);
        assert_eq!(d[0].pod, "ns/db-0");
        assert!(d[0].excludes(&labels(&[("zone", "a")])));
        assert!(!d[0].excludes(&labels(&[("zone", "b")])));
        assert!(
            !d[0].excludes(&labels(&[])),
            "a node without the key is in no domain"
        );
        // Every namespace: the pod in `other` rules out zone c as well.
        let all = PodAffinityTerm {
            namespaces: TermNamespaces::All,
            ..term.clone()
        };
        let d = excluded_domains(&[all], "ns", pods, zone);
        assert_eq!(d[0].values, ["a", "c"].map(String::from).into());
        // A nil selector matches nothing.
        let none = PodAffinityTerm {
            selector: None,
            ..term
        };
        assert!(excluded_domains(&[none], "ns", pods, zone).is_empty());
    }
}
