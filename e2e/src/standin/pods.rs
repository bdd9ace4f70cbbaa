//! virt-launcher pod templates, as virt-controller renders them (only what scheduling needs).

use std::collections::BTreeMap;

use commonground::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL, HOSTNAME_LABEL,
    MIGRATION_JOB_NAME_ANNOTATION, MIGRATION_JOB_UID_LABEL,
};
use k8s_openapi::api::core::v1::{
    Affinity, Container, Pod, PodAffinityTerm, PodAntiAffinity, PodSpec, ResourceRequirements,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{
    LabelSelector, LabelSelectorRequirement, ObjectMeta, OwnerReference,
};
use kube::{Resource, ResourceExt};
use xxhash_rust::xxh3::xxh3_64;

pub const APP_LABEL: &str = "kubevirt.io";
pub const LAUNCHER: &str = "virt-launcher";
pub const VM_NAME_LABEL: &str = "vm.kubevirt.io/name";
pub const DOMAIN_ANNOTATION: &str = "kubevirt.io/domain";
/// Node-selector key added to a migration target pod when the test asks it never to schedule.
pub const NEVER_SCHEDULE_KEY: &str = "e2e.commonground.dev/never-schedule";

/// `<prefix>-<5 hex digits of a hash of key>`: deterministic, so a restarted stand-in finds (or
/// re-creates under the same name) the pod it may already have created.
fn pod_name(vmi: &str, key: &str) -> String {
    let h = format!("{:016x}", xxh3_64(key.as_bytes()));
    format!("virt-launcher-{vmi}-{}", &h[..5])
}

pub fn launcher_pod_name(vmi: &VirtualMachineInstance) -> String {
    pod_name(
        &vmi.name_any(),
        &format!("launcher/{}", vmi.uid().unwrap_or_default()),
    )
}

pub fn target_pod_name(
    vmi: &VirtualMachineInstance,
    vmim: &VirtualMachineInstanceMigration,
) -> String {
    pod_name(
        &vmi.name_any(),
        &format!("target/{}", vmim.uid().unwrap_or_default()),
    )
}

/// Parses a Kubernetes quantity ("4Gi", "512M", "1.5", "250m", "1e9") to a number of base units.
pub fn parse_quantity(q: &str) -> Option<f64> {
    let q = q.trim();
    let suffixes: [(&str, f64); 13] = [
        ("Ki", 1024f64),
        ("Mi", 1024f64.powi(2)),
        ("Gi", 1024f64.powi(3)),
        ("Ti", 1024f64.powi(4)),
        ("Pi", 1024f64.powi(5)),
        ("Ei", 1024f64.powi(6)),
        ("m", 1e-3),
        ("k", 1e3),
        ("M", 1e6),
        ("G", 1e9),
        ("T", 1e12),
        ("P", 1e15),
        ("E", 1e18),
    ];
    for (s, mult) in suffixes {
        if let Some(num) = q.strip_suffix(s) {
            return num.parse::<f64>().ok().map(|n| n * mult);
        }
    }
    q.parse::<f64>().ok()
}

fn domain_str(vmi: &VirtualMachineInstance, path: &[&str]) -> Option<String> {
    let mut v = &vmi.spec.domain;
    for p in path {
        v = v.get(p)?;
    }
    match v {
        serde_json::Value::String(s) => Some(s.clone()),
        serde_json::Value::Number(n) => Some(n.to_string()),
        _ => None,
    }
}

/// The VMI's memory: `domain.resources.requests.memory`, else `domain.memory.guest`.
pub fn vmi_memory(vmi: &VirtualMachineInstance) -> Option<String> {
    domain_str(vmi, &["resources", "requests", "memory"])
        .or_else(|| domain_str(vmi, &["memory", "guest"]))
}

/// The VMI's memory in bytes (1 GiB when it states none).
pub fn vmi_memory_bytes(vmi: &VirtualMachineInstance) -> u64 {
    vmi_memory(vmi)
        .and_then(|q| parse_quantity(&q))
        .map(|b| b as u64)
        .unwrap_or(1 << 30)
}

/// The launcher pod's resource requests: the VMI's cpu and memory requests.
pub fn requests(vmi: &VirtualMachineInstance) -> BTreeMap<String, Quantity> {
    let mut r = BTreeMap::new();
    let cpu = domain_str(vmi, &["resources", "requests", "cpu"])
        .or_else(|| domain_str(vmi, &["cpu", "cores"]));
    if let Some(cpu) = cpu {
        r.insert("cpu".to_string(), Quantity(cpu));
    }
    if let Some(mem) = vmi_memory(vmi) {
        r.insert("memory".to_string(), Quantity(mem));
    }
    r
}

fn owner(vmi: &VirtualMachineInstance) -> OwnerReference {
    let mut o = vmi.controller_owner_ref(&()).expect("VMI has a UID");
    o.block_owner_deletion = Some(true);
    o
}

fn base_pod(vmi: &VirtualMachineInstance, name: String, image: &str) -> Pod {
    let uid = vmi.uid().unwrap_or_default();
    let labels = BTreeMap::from([
        (APP_LABEL.to_string(), LAUNCHER.to_string()),
        (CREATED_BY_LABEL.to_string(), uid),
        (VM_NAME_LABEL.to_string(), vmi.name_any()),
    ]);
    let annotations = BTreeMap::from([(DOMAIN_ANNOTATION.to_string(), vmi.name_any())]);
    let reqs = requests(vmi);
    Pod {
        metadata: ObjectMeta {
            name: Some(name),
            namespace: vmi.namespace(),
            labels: Some(labels),
            annotations: Some(annotations),
            owner_references: Some(vec![owner(vmi)]),
            ..Default::default()
        },
        spec: Some(PodSpec {
            containers: vec![Container {
                name: "compute".into(),
                image: Some(image.to_string()),
                resources: Some(ResourceRequirements {
                    requests: (!reqs.is_empty()).then_some(reqs),
                    ..Default::default()
                }),
                ..Default::default()
            }],
            node_selector: vmi.spec.node_selector.clone(),
            affinity: vmi.spec.affinity.clone(),
            tolerations: vmi.spec.tolerations.clone(),
            scheduler_name: vmi.spec.scheduler_name.clone(),
            termination_grace_period_seconds: Some(0),
            restart_policy: Some("Never".into()),
            ..Default::default()
        }),
        status: None,
    }
}

/// The virt-launcher pod of a new VMI.
pub fn launcher_pod(vmi: &VirtualMachineInstance, image: &str) -> Pod {
    base_pod(vmi, launcher_pod_name(vmi), image)
}

/// The migration target pod: the VMI's node selector merged with `spec.addedNodeSelector` (the
/// VMI's keys win), its affinity plus a required anti-affinity to the VMI's own launcher pods on
/// `kubernetes.io/hostname`, its tolerations and requests.
pub fn target_pod(
    vmi: &VirtualMachineInstance,
    vmim: &VirtualMachineInstanceMigration,
    image: &str,
    never_schedule: bool,
) -> Pod {
    let mut pod = base_pod(vmi, target_pod_name(vmi, vmim), image);
    let uid = vmi.uid().unwrap_or_default();
    let meta = &mut pod.metadata;
    meta.labels.get_or_insert_with(BTreeMap::new).insert(
        MIGRATION_JOB_UID_LABEL.to_string(),
        vmim.uid().unwrap_or_default(),
    );
    meta.annotations
        .get_or_insert_with(BTreeMap::new)
        .insert(MIGRATION_JOB_NAME_ANNOTATION.to_string(), vmim.name_any());
    let spec = pod.spec.as_mut().expect("base pod has a spec");

    let mut selector = vmim.spec.added_node_selector.clone().unwrap_or_default();
    for (k, v) in vmi.spec.node_selector.clone().unwrap_or_default() {
        selector.insert(k, v);
    }
    if never_schedule {
        selector.insert(NEVER_SCHEDULE_KEY.to_string(), "true".to_string());
    }
    spec.node_selector = (!selector.is_empty()).then_some(selector);

    let mut affinity: Affinity = vmi.spec.affinity.clone().unwrap_or_default();
    let anti = affinity
        .pod_anti_affinity
        .get_or_insert_with(PodAntiAffinity::default);
    anti.required_during_scheduling_ignored_during_execution
        .get_or_insert_with(Vec::new)
        .push(PodAffinityTerm {
            label_selector: Some(LabelSelector {
                match_expressions: Some(vec![LabelSelectorRequirement {
                    key: CREATED_BY_LABEL.to_string(),
                    operator: "In".into(),
                    values: Some(vec![uid]),
                }]),
                ..Default::default()
            }),
            topology_key: HOSTNAME_LABEL.to_string(),
            ..Default::default()
        });
    spec.affinity = Some(affinity);
    pod
}

#[cfg(test)]
mod tests {
    use super::*;
    use commonground::api::kubevirt::{VmiSpec, VmimSpec};

    fn vmi() -> VirtualMachineInstance {
        let mut v = VirtualMachineInstance::new(
            "vm1",
            VmiSpec {
                node_selector: Some(BTreeMap::from([
                    ("zone".to_string(), "a".to_string()),
                    ("pool".to_string(), "p".to_string()),
                ])),
                domain: serde_json::json!({"resources": {"requests": {"memory": "2Gi", "cpu": "2"}}}),
                ..Default::default()
            },
        );
        v.metadata.namespace = Some("ns".into());
        v.metadata.uid = Some("vmi-uid".into());
        v
    }

    #[test]
    fn quantities() {
        assert_eq!(parse_quantity("2Gi"), Some(2.0 * 1024.0 * 1024.0 * 1024.0));
        assert_eq!(parse_quantity("500M"), Some(5e8));
        assert_eq!(parse_quantity("250m"), Some(0.25));
        assert_eq!(parse_quantity("1e9"), Some(1e9));
        assert_eq!(parse_quantity("12"), Some(12.0));
        assert_eq!(parse_quantity("x"), None);
        assert_eq!(vmi_memory_bytes(&vmi()), 2 << 30);
    }

    #[test]
    fn target_pod_merges_selectors_vmi_keys_win_and_repels_source() {
        let v = vmi();
        let mut m = VirtualMachineInstanceMigration::new(
            "mig",
            VmimSpec {
                vmi_name: "vm1".into(),
                added_node_selector: Some(BTreeMap::from([
                    ("zone".to_string(), "b".to_string()),
                    (HOSTNAME_LABEL.to_string(), "n2".to_string()),
                ])),
            },
        );
        m.metadata.uid = Some("mig-uid".into());
        let p = target_pod(&v, &m, "img", false);
        let spec = p.spec.unwrap();
        let sel = spec.node_selector.unwrap();
        assert_eq!(sel["zone"], "a");
        assert_eq!(sel[HOSTNAME_LABEL], "n2");
        assert_eq!(sel["pool"], "p");
        let labels = p.metadata.labels.unwrap();
        assert_eq!(labels[MIGRATION_JOB_UID_LABEL], "mig-uid");
        assert_eq!(labels[CREATED_BY_LABEL], "vmi-uid");
        assert_eq!(
            p.metadata.annotations.unwrap()[MIGRATION_JOB_NAME_ANNOTATION],
            "mig"
        );
        let terms = spec
            .affinity
            .unwrap()
            .pod_anti_affinity
            .unwrap()
            .required_during_scheduling_ignored_during_execution
            .unwrap();
        assert_eq!(terms.len(), 1);
        assert_eq!(terms[0].topology_key, HOSTNAME_LABEL);
        assert_ne!(p.metadata.name, Some(launcher_pod_name(&v)));
        let req = spec.containers[0]
            .resources
            .clone()
            .unwrap()
            .requests
            .unwrap();
        assert_eq!(req["memory"].0, "2Gi");
        assert_eq!(req["cpu"].0, "2");
    }
}
