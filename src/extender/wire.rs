//! The wire format of `k8s.io/kube-scheduler/extender/v1`.
//!
//! The Go types carry no JSON tags, so their keys are the Go field names: `Pod`, `Nodes`,
//! `NodeNames`, `FailedNodes`, `FailedAndUnresolvableNodes`, `Error`, `Host`, `Score`. We
//! answer in exactly that spelling. On input we match keys the way Go's `encoding/json` does:
//! an exact match or one that differs only in ASCII case (`pod`, `nodeNames`, `NODENAMES`);
//! unknown keys are ignored, and a repeated key keeps its last value.
//!
//! Only what the extender reads is decoded: the pod's metadata, the node names. With
//! `nodeCacheCapable: false` kube-scheduler sends whole Node objects and expects the passing
//! ones back, so those are kept as JSON values and echoed untouched.

use std::collections::BTreeMap;
use std::fmt;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize};

/// Scores kube-scheduler accepts from an extender (`extenderv1.MaxExtenderPriority`).
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// Implements `Deserialize` for a struct with `Default`, matching keys case-insensitively as
/// Go does. Each field lists the key it answers to.
macro_rules! go_struct {
    ($ty:ident { $($field:ident : $key:literal),* $(,)? }) => {
        impl<'de> Deserialize<'de> for $ty {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $ty;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a JSON object ({})", stringify!($ty))
                    }
                    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<$ty, A::Error> {
                        let mut out = <$ty>::default();
                        while let Some(key) = map.next_key::<KeyName>()? {
                            $(
                                if key.0.eq_ignore_ascii_case($key) {
                                    out.$field = map.next_value()?;
                                    continue;
                                }
                            )*
                            map.next_value::<IgnoredAny>()?;
                        }
                        Ok(out)
                    }
                }
                d.deserialize_map(V)
            }
        }
    };
}

/// An object key (keys are few and short; one small allocation each).
struct KeyName(String);

impl<'de> Deserialize<'de> for KeyName {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl Visitor<'_> for V {
            type Value = KeyName;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("an object key")
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<KeyName, E> {
                Ok(KeyName(v.to_string()))
            }
        }
        d.deserialize_str(V)
    }
}

/// `extenderv1.ExtenderArgs`: what kube-scheduler posts to `filter` and `prioritize`.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExtenderArgs {
    #[serde(rename = "Pod")]
    pub pod: Option<WirePod>,
    /// Whole Node objects, sent when `nodeCacheCapable` is false.
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList>,
    /// Node names, sent when `nodeCacheCapable` is true.
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<String>>,
}
go_struct!(ExtenderArgs {
    pod: "Pod",
    nodes: "Nodes",
    node_names: "NodeNames"
});

/// The candidate nodes of a request, in the form they arrived.
#[derive(Clone, Copy, Debug)]
pub enum Candidates<'a> {
    Names(&'a [String]),
    Objects(&'a [serde_json::Value]),
}

impl ExtenderArgs {
    /// The candidate nodes; `NodeNames` wins when both are present (kube-scheduler sends one).
    pub fn candidates(&self) -> Candidates<'_> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => Candidates::Names(names),
            (None, Some(list)) => Candidates::Objects(&list.items),
            (None, None) => Candidates::Names(&[]),
        }
    }

    /// Node names in request order; an error names the first Node object without a name.
    pub fn node_names(&self) -> Result<Vec<&str>, String> {
        match self.candidates() {
            Candidates::Names(names) => Ok(names.iter().map(String::as_str).collect()),
            Candidates::Objects(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    node_object_name(n)
                        .ok_or_else(|| format!("Nodes.items[{i}] has no metadata.name"))
                })
                .collect(),
        }
    }
}

/// `metadata.name` of a Node object given as JSON (keys matched as Go does).
pub fn node_object_name(node: &serde_json::Value) -> Option<&str> {
    get_ci(get_ci(node, "metadata")?, "name")?
        .as_str()
        .filter(|n| !n.is_empty())
}

fn get_ci<'a>(v: &'a serde_json::Value, key: &str) -> Option<&'a serde_json::Value> {
    let obj = v.as_object()?;
    obj.get(key).or_else(|| {
        obj.iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(key))
            .map(|(_, v)| v)
    })
}

/// A `v1.NodeList`; its items are echoed back untouched.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct NodeList {
    #[serde(rename = "metadata")]
    pub metadata: serde_json::Map<String, serde_json::Value>,
    #[serde(rename = "items")]
    pub items: Vec<serde_json::Value>,
}
go_struct!(NodeList {
    metadata: "metadata",
    items: "items"
});

/// The part of a `v1.Pod` the extender reads.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct WirePod {
    #[serde(rename = "metadata")]
    pub metadata: PodMeta,
}
go_struct!(WirePod {
    metadata: "metadata"
});

#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct PodMeta {
    #[serde(rename = "name")]
    pub name: Option<String>,
    #[serde(rename = "namespace")]
    pub namespace: Option<String>,
    #[serde(rename = "uid")]
    pub uid: Option<String>,
    #[serde(rename = "labels")]
    pub labels: Option<BTreeMap<String, String>>,
    #[serde(rename = "annotations")]
    pub annotations: Option<BTreeMap<String, String>>,
}
go_struct!(PodMeta {
    name: "name",
    namespace: "namespace",
    uid: "uid",
    labels: "labels",
    annotations: "annotations",
});

impl WirePod {
    pub fn label(&self, key: &str) -> Option<&str> {
        self.metadata.labels.as_ref()?.get(key).map(String::as_str)
    }
    pub fn annotation(&self, key: &str) -> Option<&str> {
        self.metadata
            .annotations
            .as_ref()?
            .get(key)
            .map(String::as_str)
    }
    pub fn namespace(&self) -> &str {
        self.metadata.namespace.as_deref().unwrap_or("default")
    }
    pub fn name(&self) -> &str {
        self.metadata.name.as_deref().unwrap_or("")
    }
}

/// `extenderv1.ExtenderFilterResult`. kube-scheduler reads `NodeNames` when the extender is
/// node-cache capable and `Nodes` otherwise; a result with neither filters every node out, so
/// the handler always fills the one matching the request.
#[derive(Clone, Debug, Default, PartialEq, Serialize)]
pub struct ExtenderFilterResult {
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeList>,
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<String>>,
    /// Nodes that failed, with the reason kube-scheduler shows in the pod's events.
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes that failed and that preemption cannot fix.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}
go_struct!(ExtenderFilterResult {
    nodes: "Nodes",
    node_names: "NodeNames",
    failed_nodes: "FailedNodes",
    failed_and_unresolvable_nodes: "FailedAndUnresolvableNodes",
    error: "Error",
});

/// One entry of `extenderv1.HostPriorityList`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostPriority {
    #[serde(rename = "Host")]
    pub host: String,
    #[serde(rename = "Score")]
    pub score: i64,
}
go_struct!(HostPriority {
    host: "Host",
    score: "Score"
});

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn pascal_case_args_with_node_names_decode() {
        let a: ExtenderArgs = serde_json::from_value(json!({
            "Pod": {"metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}}},
            "NodeNames": ["n1", "n2"]
        }))
        .unwrap();
        assert_eq!(a.pod.as_ref().unwrap().name(), "p");
        assert_eq!(a.pod.as_ref().unwrap().label("a"), Some("b"));
        assert_eq!(a.node_names().unwrap(), vec!["n1", "n2"]);
        assert!(matches!(a.candidates(), Candidates::Names(_)));
    }

    #[test]
    fn lowercase_and_camel_case_keys_decode_like_go() {
        let a: ExtenderArgs = serde_json::from_value(json!({
            "pod": {"METADATA": {"Namespace": "ns"}},
            "nodeNames": ["n1"],
            "unknownKey": {"ignored": [1, 2, 3]}
        }))
        .unwrap();
        assert_eq!(a.pod.as_ref().unwrap().namespace(), "ns");
        assert_eq!(a.node_names().unwrap(), vec!["n1"]);
    }

    #[test]
    fn repeated_key_keeps_the_last_value_as_go_does() {
        let a: ExtenderArgs =
            serde_json::from_str(r#"{"NodeNames":["a"],"nodenames":["b"]}"#).unwrap();
        assert_eq!(a.node_names().unwrap(), vec!["b"]);
    }

    #[test]
    fn full_node_list_decodes_and_names_are_read_from_metadata() {
        let a: ExtenderArgs = serde_json::from_value(json!({
            "Pod": {"metadata": {"name": "p"}},
            "Nodes": {"metadata": {}, "items": [
                {"metadata": {"name": "n1", "labels": {"x": "y"}}, "status": {}},
                {"Metadata": {"Name": "n2"}}
            ]}
        }))
        .unwrap();
        assert!(matches!(a.candidates(), Candidates::Objects(items) if items.len() == 2));
        assert_eq!(a.node_names().unwrap(), vec!["n1", "n2"]);
    }

    #[test]
    fn node_object_without_name_is_reported_by_index() {
        let a: ExtenderArgs =
            serde_json::from_value(json!({"Nodes": {"items": [{"metadata": {"name": "a"}}, {}]}}))
                .unwrap();
        assert_eq!(
            a.node_names().unwrap_err(),
            "Nodes.items[1] has no metadata.name"
        );
    }

    #[test]
    fn wrong_types_are_errors_not_defaults() {
        assert!(serde_json::from_str::<ExtenderArgs>(r#"{"NodeNames": "n1"}"#).is_err());
        assert!(serde_json::from_str::<ExtenderArgs>(r#"{"NodeNames": [1]}"#).is_err());
        assert!(serde_json::from_str::<ExtenderArgs>(r#"{"Pod": 5}"#).is_err());
        assert!(serde_json::from_str::<ExtenderArgs>(r#"[]"#).is_err());
        assert!(serde_json::from_str::<ExtenderArgs>(
            r#"{"Pod": {"metadata": {"labels": {"a": 1}}}}"#
        )
        .is_err());
    }

    #[test]
    fn results_are_pascal_case_on_the_wire() {
        let r = ExtenderFilterResult {
            node_names: Some(vec!["n1".into()]),
            failed_nodes: [("n2".to_string(), "why".to_string())].into(),
            ..Default::default()
        };
        let v = serde_json::to_value(&r).unwrap();
        assert_eq!(
            v,
            json!({"Nodes": null, "NodeNames": ["n1"], "FailedNodes": {"n2": "why"},
                   "FailedAndUnresolvableNodes": {}, "Error": ""})
        );
        let p = serde_json::to_value(vec![HostPriority {
            host: "n1".into(),
            score: 7,
        }])
        .unwrap();
        assert_eq!(p, json!([{"Host": "n1", "Score": 7}]));
        // And they read back, in either spelling.
        let back: ExtenderFilterResult = serde_json::from_value(v).unwrap();
        assert_eq!(back, r);
        let lower: HostPriority = serde_json::from_value(json!({"host": "a", "score": 3})).unwrap();
        assert_eq!(lower.score, 3);
    }
}
