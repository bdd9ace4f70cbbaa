//! Label values and object names derived from other objects.
//!
//! Object names may be 253 characters long, label values at most 63. A label that points at
//! an object therefore carries [`owner_id`] (from the object's UID), and the object's full
//! `namespace/name` goes into an annotation under the same key ([`owner_annotation`]), for
//! people reading it. Every place that writes such a label and every place that selects by it
//! uses [`owner_id`], so they agree.

use std::collections::BTreeMap;

use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;

/// Longest object name the API accepts (a DNS subdomain).
pub const MAX_NAME: usize = 253;
/// Longest label value the API accepts.
pub const MAX_LABEL_VALUE: usize = 63;

/// A short, stable label value identifying the object: `cg-` and 16 hex digits of its UID
/// (19 characters). A re-created object (new UID) gets a new one. Without a UID (an object not
/// read from the API) it is a hash of namespace/name instead.
pub fn owner_id(meta: &ObjectMeta) -> String {
    let uid: String = meta
        .uid
        .as_deref()
        .unwrap_or_default()
        .chars()
        .filter(char::is_ascii_alphanumeric)
        .map(|c| c.to_ascii_lowercase())
        .take(16)
        .collect();
    if uid.is_empty() {
        format!("cg-{:016x}", short_hash(&owner_annotation(meta)))
    } else {
        format!("cg-{uid}")
    }
}

/// The object's `namespace/name` (`name` when cluster-scoped), for the annotation beside the
/// [`owner_id`] label.
pub fn owner_annotation(meta: &ObjectMeta) -> String {
    let name = meta.name.as_deref().unwrap_or_default();
    match meta.namespace.as_deref() {
        Some(ns) => format!("{ns}/{name}"),
        None => name.to_string(),
    }
}

/// The label `key` = [`owner_id`] and the annotation `key` = [`owner_annotation`] of `owner`.
pub fn owner_marks(
    key: &str,
    owner: &ObjectMeta,
) -> (BTreeMap<String, String>, BTreeMap<String, String>) {
    (
        [(key.to_string(), owner_id(owner))].into(),
        [(key.to_string(), owner_annotation(owner))].into(),
    )
}

/// Whether `labels` point at `owner` under `key`.
pub fn is_owned_by(labels: &BTreeMap<String, String>, key: &str, owner: &ObjectMeta) -> bool {
    labels.get(key).is_some_and(|v| *v == owner_id(owner))
}

/// The label selector `key=<owner_id>`.
pub fn owner_selector(key: &str, owner: &ObjectMeta) -> String {
    format!("{key}={}", owner_id(owner))
}

/// `name` made into a valid object name: unchanged when it fits; otherwise cut and ended with
/// a hash of the whole, so two long names that share a prefix stay distinct. Never ends in `-`
/// or `.` (each part of a DNS subdomain ends with a letter or digit).
pub fn bounded_name(name: &str) -> String {
    if name.len() <= MAX_NAME {
        return name.trim_end_matches(['-', '.']).to_string();
    }
    let hash = format!("{:016x}", short_hash(name));
    // Names here are ASCII (derived from DNS names), so byte positions are characters.
    let mut cut: String = name.chars().take(MAX_NAME - hash.len() - 1).collect();
    while cut.ends_with(['-', '.']) {
        cut.pop();
    }
    format!("{cut}-{hash}")
}

fn short_hash(text: &str) -> u64 {
    xxhash_rust::xxh3::xxh3_64(text.as_bytes())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn meta(ns: Option<&str>, name: &str, uid: Option<&str>) -> ObjectMeta {
        ObjectMeta {
            namespace: ns.map(str::to_string),
            name: Some(name.to_string()),
            uid: uid.map(str::to_string),
            ..Default::default()
        }
    }

    fn valid_label_value(v: &str) -> bool {
        v.len() <= MAX_LABEL_VALUE
            && v.starts_with(|c: char| c.is_ascii_alphanumeric())
            && v.ends_with(|c: char| c.is_ascii_alphanumeric())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || "-_.".contains(c))
    }

    fn valid_subdomain(v: &str) -> bool {
        v.len() <= MAX_NAME
            && v.split('.').all(|part| {
                !part.is_empty()
                    && part.starts_with(|c: char| c.is_ascii_alphanumeric())
                    && part.ends_with(|c: char| c.is_ascii_alphanumeric())
                    && part.chars().all(|c| c.is_ascii_alphanumeric() || c == '-')
            })
    }

    #[test]
    fn a_name_at_the_253_character_limit_gives_a_valid_label_value() {
        let name = "a".repeat(MAX_NAME);
        let with_uid = meta(
            Some("ns"),
            &name,
            Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789"),
        );
        assert_eq!(owner_id(&with_uid), "cg-0a1b2c3d4e5f6789");
        let without_uid = meta(Some("ns"), &name, None);
        let id = owner_id(&without_uid);
        assert!(valid_label_value(&id), "{id}");
        assert_eq!(id, owner_id(&without_uid.clone()), "stable");
        assert_ne!(
            id,
            owner_id(&meta(Some("other"), &name, None)),
            "the namespace takes part"
        );
        // The full name is kept beside it.
        let (labels, annotations) = owner_marks("commonground.dev/x", &with_uid);
        assert!(is_owned_by(&labels, "commonground.dev/x", &with_uid));
        assert!(!is_owned_by(&labels, "commonground.dev/x", &without_uid));
        assert_eq!(annotations["commonground.dev/x"], format!("ns/{name}"));
        assert_eq!(
            owner_selector("commonground.dev/x", &with_uid),
            "commonground.dev/x=cg-0a1b2c3d4e5f6789"
        );
    }

    #[test]
    fn long_derived_names_are_cut_valid_and_distinct() {
        let long = format!("rb-{}-{}-1", "p".repeat(253), "v".repeat(253));
        let other = format!("rb-{}-{}-2", "p".repeat(253), "v".repeat(253));
        let (a, b) = (bounded_name(&long), bounded_name(&other));
        assert!(valid_subdomain(&a), "{a}");
        assert!(valid_subdomain(&b), "{b}");
        assert_eq!(a.len(), MAX_NAME);
        assert_ne!(a, b, "the hash keeps a shared prefix apart");
        // A cut that lands on a dot or dash does not leave it at the end of a part.
        let dotted = format!("{}.{}", "x".repeat(235), "y".repeat(40));
        assert!(valid_subdomain(&bounded_name(&dotted)));
        let dashed = format!("{}-{}", "x".repeat(235), "y".repeat(40));
        assert!(valid_subdomain(&bounded_name(&dashed)));
        assert_eq!(bounded_name("short-name"), "short-name");
    }
}
