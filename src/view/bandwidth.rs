//! KubeVirt's per-migration bandwidth limit for a VMI: the `bandwidthPerMigration` of the
//! MigrationPolicy that applies to it, else the KubeVirt CR's
//! `spec.configuration.migrations.bandwidthPerMigration`. A limit of 0 means none.
//!
//! A policy applies when every label of its VMI selector is on the VMI (and, for a namespace
//! selector, on the VMI's namespace); among those that apply, KubeVirt takes the one with the
//! most selector labels, and among equals the first by name. Policies commonground creates
//! itself to raise the limit for added migration paths are left out: their bandwidth is that
//! of the paths, which the path decision accounts for.

use std::collections::BTreeMap;

use super::quantity;
use crate::api::kubevirt::{KubeVirt, MigrationPolicy};
use crate::plan::estimate::BandwidthCap;

/// Label that marks a MigrationPolicy commonground created for added paths.
pub const OWN_POLICY_LABEL: &str = "commonground.dev/migration-paths";

fn parse(v: &serde_json::Value) -> Option<u64> {
    match v {
        serde_json::Value::String(s) => quantity::bytes(s).ok(),
        serde_json::Value::Number(n) => n.as_u64(),
        _ => None,
    }
}

/// The administrator's MigrationPolicy KubeVirt applies to a VMI with `vmi_labels` in a
/// namespace with `namespace_labels` (`None` when the namespace's labels are not known:
/// policies that select namespaces are then left out), commonground's own left out.
pub fn applicable_policy<'a>(
    vmi_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    policies: impl IntoIterator<Item = &'a MigrationPolicy>,
) -> Option<&'a MigrationPolicy> {
    let mut best: Option<(usize, &str, &MigrationPolicy)> = None;
    for p in policies {
        if p.metadata
            .labels
            .as_ref()
            .is_some_and(|l| l.contains_key(OWN_POLICY_LABEL))
        {
            continue;
        }
        let Some(weight) = selector_weight(p, vmi_labels, namespace_labels) else {
            continue;
        };
        let name = p.metadata.name.as_deref().unwrap_or("");
        let better = match best {
            None => true,
            Some((w, n, _)) => weight > w || (weight == w && name < n),
        };
        if better {
            best = Some((weight, name, p));
        }
    }
    best.map(|(_, _, p)| p)
}

/// The number of selector labels by which the policy applies, or `None` when it does not.
pub fn selector_weight(
    policy: &MigrationPolicy,
    vmi_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
) -> Option<usize> {
    let sel = &policy.spec.selectors;
    let empty = BTreeMap::new();
    let vmi_sel = sel
        .virtual_machine_instance_selector
        .as_ref()
        .unwrap_or(&empty);
    let ns_sel = sel.namespace_selector.as_ref().unwrap_or(&empty);
    let all_in = |want: &BTreeMap<String, String>, have: Option<&BTreeMap<String, String>>| {
        want.is_empty() || have.is_some_and(|h| want.iter().all(|(k, v)| h.get(k) == Some(v)))
    };
    (all_in(vmi_sel, Some(vmi_labels)) && all_in(ns_sel, namespace_labels))
        .then(|| vmi_sel.len() + ns_sel.len())
}

/// The cap for a VMI: the applicable policy's `bandwidthPerMigration` where it sets one (a
/// policy overrides only the settings it has), else the KubeVirt CR's.
pub fn bandwidth_cap<'a>(
    vmi_labels: &BTreeMap<String, String>,
    namespace_labels: Option<&BTreeMap<String, String>>,
    policies: impl IntoIterator<Item = &'a MigrationPolicy>,
    kubevirt: Option<&KubeVirt>,
) -> Option<BandwidthCap> {
    let policy = applicable_policy(vmi_labels, namespace_labels, policies);
    if let Some((p, bw)) = policy.and_then(|p| {
        let bw = quantity::bytes(p.spec.bandwidth_per_migration.as_deref()?).ok()?;
        Some((p, bw))
    }) {
        return Some(BandwidthCap {
            bytes_per_second: bw,
            source: format!(
                "MigrationPolicy {}",
                p.metadata.name.as_deref().unwrap_or("")
            ),
        });
    }
    let bw = kubevirt?
        .spec
        .configuration
        .migrations
        .as_ref()?
        .bandwidth_per_migration
        .as_ref()
        .and_then(parse)?;
    Some(BandwidthCap {
        bytes_per_second: bw,
        source: "the KubeVirt CR".into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn policy(name: &str, selector: serde_json::Value, bw: &str) -> MigrationPolicy {
        serde_json::from_value(json!({
            "metadata": {"name": name},
            "spec": {"selectors": {"virtualMachineInstanceSelector": selector},
                     "bandwidthPerMigration": bw}
        }))
        .unwrap()
    }

    fn kubevirt(bw: serde_json::Value) -> KubeVirt {
        serde_json::from_value(json!({
            "metadata": {"name": "kubevirt", "namespace": "kubevirt"},
            "spec": {"configuration": {"migrations": {"bandwidthPerMigration": bw}}}
        }))
        .unwrap()
    }

    fn labels(pairs: &[(&str, &str)]) -> BTreeMap<String, String> {
        pairs
            .iter()
            .map(|(k, v)| (k.to_string(), v.to_string()))
            .collect()
    }

    #[test]
    fn the_most_specific_matching_policy_sets_the_cap() {
        let policies = [
            policy("broad", json!({"tier": "db"}), "64Mi"),
            policy("narrow", json!({"tier": "db", "size": "big"}), "128Mi"),
            policy("other", json!({"tier": "web"}), "1Mi"),
        ];
        let kv = kubevirt(json!("32Mi"));
        let vmi = labels(&[("tier", "db"), ("size", "big")]);
        let cap = bandwidth_cap(&vmi, None, &policies, Some(&kv)).unwrap();
        assert_eq!(cap.bytes_per_second, 128 << 20);
        assert_eq!(cap.source, "MigrationPolicy narrow");
        let vmi = labels(&[("tier", "db")]);
        let cap = bandwidth_cap(&vmi, None, &policies, Some(&kv)).unwrap();
        assert_eq!(cap.source, "MigrationPolicy broad");
    }

    #[test]
    fn a_matching_policy_without_a_bandwidth_leaves_the_kubevirt_cr_cap() {
        let mut narrow = policy("narrow", json!({"tier": "db", "size": "big"}), "1Mi");
        narrow.spec.bandwidth_per_migration = None;
        let policies = [policy("broad", json!({"tier": "db"}), "64Mi"), narrow];
        let kv = kubevirt(json!("32Mi"));
        let vmi = labels(&[("tier", "db"), ("size", "big")]);
        let cap = bandwidth_cap(&vmi, None, &policies, Some(&kv)).unwrap();
        assert_eq!(cap.source, "the KubeVirt CR");
        assert_eq!(cap.bytes_per_second, 32 << 20);
    }

    #[test]
    fn the_own_policy_label_is_the_one_the_controller_sets() {
        assert_eq!(OWN_POLICY_LABEL, crate::controller::paths::PATH_OWNER_LABEL);
    }

    #[test]
    fn without_a_policy_the_kubevirt_cr_sets_the_cap() {
        let kv = kubevirt(json!("32Mi"));
        let cap = bandwidth_cap(&labels(&[]), None, &[], Some(&kv)).unwrap();
        assert_eq!(cap.bytes_per_second, 32 << 20);
        assert_eq!(cap.source, "the KubeVirt CR");
        assert_eq!(bandwidth_cap(&labels(&[]), None, &[], None), None);
    }

    #[test]
    fn commonground_own_path_policies_and_unknown_namespaces_are_left_out() {
        let mut own = policy("own", json!({}), "10Gi");
        own.metadata.labels = Some(labels(&[(OWN_POLICY_LABEL, "x")]));
        let mut by_ns = policy("by-ns", json!({}), "1Mi");
        by_ns.spec.selectors.namespace_selector = Some(labels(&[("team", "a")]));
        assert_eq!(
            bandwidth_cap(&labels(&[]), None, [&own, &by_ns], None),
            None
        );
        let ns = labels(&[("team", "a")]);
        assert_eq!(
            bandwidth_cap(&labels(&[]), Some(&ns), [&own, &by_ns], None)
                .unwrap()
                .source,
            "MigrationPolicy by-ns"
        );
    }
}
