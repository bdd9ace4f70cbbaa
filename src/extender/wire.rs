//! The wire format of `k8s.io/kube-scheduler/extender/v1`.
//!
//! The Go types carry no JSON tags, so their keys are the Go field names: `Pod`, `Nodes`,
//! `NodeNames`, `FailedNodes`, `FailedAndUnresolvableNodes`, `Error`, `Host`, `Score`. We
//! answer in exactly that spelling. On input we match keys the way Go's `encoding/json` does:
//! an exact match or one that differs only in ASCII case (`pod`, `nodeNames`, `NODENAMES`);
//! unknown keys are ignored, and a repeated key keeps its last value.
//!
//! Only what the extender reads is decoded: the pod's metadata, the node names. Requests are
//! decoded without copying: a node name is borrowed from the body (kube-scheduler sends
//! thousands per request), and with `nodeCacheCapable: false` the whole Node objects are kept
//! as raw JSON slices of the body and echoed untouched.

use std::borrow::Cow;
use std::collections::BTreeMap;
use std::fmt;
use std::ops::Deref;

use serde::de::{IgnoredAny, MapAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};
use serde_json::value::RawValue;

/// Scores kube-scheduler accepts from an extender (`extenderv1.MaxExtenderPriority`).
pub const MAX_EXTENDER_PRIORITY: i64 = 10;

/// Implements `Deserialize` for a struct with `Default`, matching keys case-insensitively as
/// Go does. Each field lists the key it answers to. A struct with a lifetime borrows from the
/// body it is decoded from.
macro_rules! go_struct {
    ($ty:ident { $($field:ident : $key:literal),* $(,)? }) => {
        go_struct!(@impl [$ty] [$ty] { $($field : $key),* });
    };
    ($ty:ident<'a> { $($field:ident : $key:literal),* $(,)? }) => {
        go_struct!(@impl [$ty] [$ty<'de>] { $($field : $key),* });
    };
    (@impl [$name:ident] [$($de_ty:tt)+] { $($field:ident : $key:literal),* }) => {
        impl<'de> Deserialize<'de> for $($de_ty)+ {
            fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
                struct V;
                impl<'de> Visitor<'de> for V {
                    type Value = $($de_ty)+;
                    fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                        write!(f, "a JSON object ({})", stringify!($name))
                    }
                    fn visit_map<A: MapAccess<'de>>(
                        self,
                        mut map: A,
                    ) -> Result<Self::Value, A::Error> {
                        let mut out = Self::Value::default();
                        while let Some(key) = map.next_key::<Text<'de>>()? {
                            $(
                                if key.eq_ignore_ascii_case($key) {
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

/// A string of the request: borrowed from the body when it has no escape sequences (every
/// real node name), owned when it had to be unescaped.
#[derive(Clone, Debug, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Text<'a>(pub Cow<'a, str>);

impl Deref for Text<'_> {
    type Target = str;
    fn deref(&self) -> &str {
        &self.0
    }
}

impl PartialEq<str> for Text<'_> {
    fn eq(&self, other: &str) -> bool {
        &*self.0 == other
    }
}

impl PartialEq<&str> for Text<'_> {
    fn eq(&self, other: &&str) -> bool {
        &*self.0 == *other
    }
}

impl PartialEq<String> for Text<'_> {
    fn eq(&self, other: &String) -> bool {
        *self.0 == **other
    }
}

impl<'a> From<&'a str> for Text<'a> {
    fn from(s: &'a str) -> Self {
        Text(Cow::Borrowed(s))
    }
}

impl From<String> for Text<'_> {
    fn from(s: String) -> Self {
        Text(Cow::Owned(s))
    }
}

impl fmt::Display for Text<'_> {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self)
    }
}

impl Serialize for Text<'_> {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self)
    }
}

impl<'de> Deserialize<'de> for Text<'de> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = Text<'de>;
            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a string")
            }
            fn visit_borrowed_str<E: serde::de::Error>(self, v: &'de str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Borrowed(v)))
            }
            fn visit_str<E: serde::de::Error>(self, v: &str) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v.to_string())))
            }
            fn visit_string<E: serde::de::Error>(self, v: String) -> Result<Text<'de>, E> {
                Ok(Text(Cow::Owned(v)))
            }
        }
        d.deserialize_str(V)
    }
}

/// `extenderv1.ExtenderArgs`: what kube-scheduler posts to `filter` and `prioritize`.
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtenderArgs<'a> {
    #[serde(rename = "Pod")]
    pub pod: Option<WirePod>,
    /// Whole Node objects, sent when `nodeCacheCapable` is false.
    #[serde(rename = "Nodes", skip_serializing_if = "Option::is_none")]
    pub nodes: Option<NodeList<'a>>,
    /// Node names, sent when `nodeCacheCapable` is true.
    #[serde(rename = "NodeNames", skip_serializing_if = "Option::is_none")]
    pub node_names: Option<Vec<Text<'a>>>,
}
go_struct!(ExtenderArgs<'a> {
    pod: "Pod",
    nodes: "Nodes",
    node_names: "NodeNames"
});

/// The candidate nodes of a request, in the form they arrived.
#[derive(Clone, Copy, Debug)]
pub enum Candidates<'s, 'a> {
    Names(&'s [Text<'a>]),
    Objects(&'s [&'a RawValue]),
}

impl<'a> ExtenderArgs<'a> {
    /// The candidate nodes; `NodeNames` wins when both are present (kube-scheduler sends one).
    pub fn candidates(&self) -> Candidates<'_, 'a> {
        match (&self.node_names, &self.nodes) {
            (Some(names), _) => Candidates::Names(names),
            (None, Some(list)) => Candidates::Objects(&list.items),
            (None, None) => Candidates::Names(&[]),
        }
    }

    /// Node names in request order; an error names the first Node object without a name.
    pub fn node_names(&self) -> Result<Vec<Cow<'_, str>>, String> {
        match self.candidates() {
            Candidates::Names(names) => Ok(names.iter().map(|n| Cow::Borrowed(&**n)).collect()),
            Candidates::Objects(items) => items
                .iter()
                .enumerate()
                .map(|(i, n)| {
                    node_object_name(n)
                        .map(|t| t.0)
                        .ok_or_else(|| format!("Nodes.items[{i}] has no metadata.name"))
                })
                .collect(),
        }
    }
}

/// `metadata.name` of a Node object given as raw JSON (keys matched as Go does).
pub fn node_object_name<'a>(node: &'a RawValue) -> Option<Text<'a>> {
    let object: NodeObject<'a> = serde_json::from_str(node.get()).ok()?;
    object.metadata.name.filter(|n| !n.is_empty())
}

/// The part of a `v1.Node` read for its name.
#[derive(Default)]
struct NodeObject<'a> {
    metadata: NameOnly<'a>,
}
go_struct!(NodeObject<'a> { metadata: "metadata" });

#[derive(Default)]
struct NameOnly<'a> {
    name: Option<Text<'a>>,
}
go_struct!(NameOnly<'a> { name: "name" });

/// A `v1.NodeList`; its metadata and items are echoed back untouched.
#[derive(Clone, Debug, Default, Serialize)]
pub struct NodeList<'a> {
    #[serde(rename = "metadata", skip_serializing_if = "Option::is_none")]
    pub metadata: Option<&'a RawValue>,
    #[serde(rename = "items")]
    pub items: Vec<&'a RawValue>,
}
go_struct!(NodeList<'a> {
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
#[derive(Clone, Debug, Default, Serialize)]
pub struct ExtenderFilterResult<'a> {
    #[serde(rename = "Nodes")]
    pub nodes: Option<NodeList<'a>>,
    #[serde(rename = "NodeNames")]
    pub node_names: Option<Vec<Text<'a>>>,
    /// Nodes that failed, with the reason kube-scheduler shows in the pod's events.
    #[serde(rename = "FailedNodes")]
    pub failed_nodes: BTreeMap<String, String>,
    /// Nodes that failed and that preemption cannot fix.
    #[serde(rename = "FailedAndUnresolvableNodes")]
    pub failed_and_unresolvable_nodes: BTreeMap<String, String>,
    #[serde(rename = "Error")]
    pub error: String,
}
go_struct!(ExtenderFilterResult<'a> {
    nodes: "Nodes",
    node_names: "NodeNames",
    failed_nodes: "FailedNodes",
    failed_and_unresolvable_nodes: "FailedAndUnresolvableNodes",
    error: "Error",
});

/// One entry of `extenderv1.HostPriorityList`.
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize)]
pub struct HostPriority<'a> {
    #[serde(rename = "Host")]
    pub host: Text<'a>,
    #[serde(rename = "Score")]
    pub score: i64,
}
go_struct!(HostPriority<'a> {
    host: "Host",
    score: "Score"
});

/// Writes `s` as a JSON string. Node names almost never need escaping, so the common case is
/// one scan and one copy; anything else goes through serde_json's escaping.
fn push_json_str(out: &mut Vec<u8>, s: &str) {
    if s.bytes().all(|b| b >= 0x20 && b != b'"' && b != b'\\') {
        out.push(b'"');
        out.extend_from_slice(s.as_bytes());
        out.push(b'"');
    } else {
        serde_json::to_writer(&mut *out, s).expect("a str always serialises into a Vec");
    }
}

fn push_int(out: &mut Vec<u8>, n: i64) {
    match n {
        0..=9 => out.push(b'0' + n as u8),
        _ => out.extend_from_slice(n.to_string().as_bytes()),
    }
}

/// A `HostPriorityList` as JSON, byte for byte what serde_json writes for the same list, in a
/// fraction of the time: with 5,000 candidates the answer is most of the request's cost.
pub fn priorities_to_json(list: &[HostPriority]) -> Vec<u8> {
    let names: usize = list.iter().map(|h| h.host.len()).sum();
    let mut out = Vec::with_capacity(names + list.len() * 24 + 2);
    out.push(b'[');
    for (i, h) in list.iter().enumerate() {
        if i > 0 {
            out.push(b',');
        }
        out.extend_from_slice(br#"{"Host":"#);
        push_json_str(&mut out, &h.host);
        out.extend_from_slice(br#","Score":"#);
        push_int(&mut out, h.score);
        out.push(b'}');
    }
    out.push(b']');
    out
}

/// An `ExtenderFilterResult` as JSON, byte for byte what serde_json writes, with the
/// (long) node name list written by [`push_json_str`].
pub fn filter_result_to_json(r: &ExtenderFilterResult) -> Vec<u8> {
    let names: usize = r.node_names.iter().flatten().map(|n| n.len() + 3).sum();
    let mut out = Vec::with_capacity(names + 128);
    out.extend_from_slice(br#"{"Nodes":"#);
    serde_json::to_writer(&mut out, &r.nodes).expect("raw node objects always serialise");
    out.extend_from_slice(br#","NodeNames":"#);
    match &r.node_names {
        None => out.extend_from_slice(b"null"),
        Some(names) => {
            out.push(b'[');
            for (i, n) in names.iter().enumerate() {
                if i > 0 {
                    out.push(b',');
                }
                push_json_str(&mut out, n);
            }
            out.push(b']');
        }
    }
    out.extend_from_slice(br#","FailedNodes":"#);
    serde_json::to_writer(&mut out, &r.failed_nodes).expect("a string map always serialises");
    out.extend_from_slice(br#","FailedAndUnresolvableNodes":"#);
    serde_json::to_writer(&mut out, &r.failed_and_unresolvable_nodes)
        .expect("a string map always serialises");
    out.extend_from_slice(br#","Error":"#);
    push_json_str(&mut out, &r.error);
    out.push(b'}');
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn text(v: &serde_json::Value) -> String {
        v.to_string()
    }

    #[test]
    fn pascal_case_args_with_node_names_decode() {
        let body = text(&json!({
            "Pod": {"metadata": {"name": "p", "namespace": "ns", "labels": {"a": "b"}}},
            "NodeNames": ["n1", "n2"]
        }));
        let a: ExtenderArgs = serde_json::from_str(&body).unwrap();
        assert_eq!(a.pod.as_ref().unwrap().name(), "p");
        assert_eq!(a.pod.as_ref().unwrap().label("a"), Some("b"));
        assert_eq!(a.node_names().unwrap(), vec!["n1", "n2"]);
        assert!(matches!(a.candidates(), Candidates::Names(_)));
    }

    #[test]
    fn node_names_are_borrowed_from_the_body_unless_escaped() {
        let body = r#"{"NodeNames":["plain-node","esc\u0061ped"]}"#;
        let a: ExtenderArgs = serde_json::from_str(body).unwrap();
        let names = a.node_names.as_ref().unwrap();
        assert!(matches!(names[0].0, Cow::Borrowed("plain-node")));
        assert!(matches!(&names[1].0, Cow::Owned(s) if s == "escaped"));
    }

    #[test]
    fn lowercase_and_camel_case_keys_decode_like_go() {
        let body = text(&json!({
            "pod": {"METADATA": {"Namespace": "ns"}},
            "nodeNames": ["n1"],
            "unknownKey": {"ignored": [1, 2, 3]}
        }));
        let a: ExtenderArgs = serde_json::from_str(&body).unwrap();
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
        let body = text(&json!({
            "Pod": {"metadata": {"name": "p"}},
            "Nodes": {"metadata": {}, "items": [
                {"metadata": {"name": "n1", "labels": {"x": "y"}}, "status": {}},
                {"Metadata": {"Name": "n2"}}
            ]}
        }));
        let a: ExtenderArgs = serde_json::from_str(&body).unwrap();
        assert!(matches!(a.candidates(), Candidates::Objects(items) if items.len() == 2));
        assert_eq!(a.node_names().unwrap(), vec!["n1", "n2"]);
    }

    #[test]
    fn node_objects_are_echoed_byte_for_byte() {
        let item = r#"{"metadata":{"name":"n1","labels":{"z":"1","a":"2"}},"spec":{"x":[1.50,2]}}"#;
        let body =
            format!(r#"{{"Nodes":{{"metadata":{{"resourceVersion":"7"}},"items":[{item}]}}}}"#);
        let a: ExtenderArgs = serde_json::from_str(&body).unwrap();
        let out = serde_json::to_string(a.nodes.as_ref().unwrap()).unwrap();
        assert_eq!(
            out,
            format!(r#"{{"metadata":{{"resourceVersion":"7"}},"items":[{item}]}}"#)
        );
    }

    #[test]
    fn node_object_without_name_is_reported_by_index() {
        let a: ExtenderArgs =
            serde_json::from_str(r#"{"Nodes": {"items": [{"metadata": {"name": "a"}}, {}]}}"#)
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
        assert!(serde_json::from_str::<ExtenderArgs>(r#"{"Nodes": {"items": 3}}"#).is_err());
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
        let wire = v.to_string();
        let back: ExtenderFilterResult = serde_json::from_str(&wire).unwrap();
        assert_eq!(back.node_names, r.node_names);
        assert_eq!(back.failed_nodes, r.failed_nodes);
        let lower: HostPriority = serde_json::from_str(r#"{"host": "a", "score": 3}"#).unwrap();
        assert_eq!(lower.score, 3);
    }

    proptest::proptest! {
        #[test]
        fn hand_written_encoders_match_serde_json(
            names in proptest::collection::vec(".{0,12}", 0..20),
            scores in proptest::collection::vec(-3i64..40, 20),
            failed in proptest::collection::btree_map(".{0,6}", ".{0,10}", 0..4),
            error in ".{0,10}",
        ) {
            let list: Vec<HostPriority> = names
                .iter()
                .zip(&scores)
                .map(|(n, s)| HostPriority { host: n.as_str().into(), score: *s })
                .collect();
            proptest::prop_assert_eq!(
                String::from_utf8(priorities_to_json(&list)).unwrap(),
                serde_json::to_string(&list).unwrap()
            );
            let raw = RawValue::from_string(r#"{"metadata":{"name":"n"}}"#.into()).unwrap();
            for (nodes, node_names) in [
                (None, Some(list.iter().map(|h| h.host.clone()).collect::<Vec<_>>())),
                (Some(NodeList { metadata: None, items: vec![&*raw] }), None),
            ] {
                let r = ExtenderFilterResult {
                    nodes,
                    node_names,
                    failed_nodes: failed.clone(),
                    failed_and_unresolvable_nodes: failed.clone(),
                    error: error.clone(),
                };
                proptest::prop_assert_eq!(
                    String::from_utf8(filter_result_to_json(&r)).unwrap(),
                    serde_json::to_string(&r).unwrap()
                );
            }
        }
    }
}
