//! An in-memory API server for the reconcilers' unit tests: a `kube::Client` whose requests
//! are answered from a map of JSON objects, so a reconcile runs its real API calls with no
//! cluster. It keeps what a reconciler relies on: create answers 409 when the name exists,
//! get/patch/delete answer 404 when it does not, a replace with a stale resourceVersion
//! answers 409, status patches touch only the status, deleting an object with finalizers only
//! marks it, lists filter by `key=value` label selectors. Every request is recorded, and a
//! test can make the next request to a path fail with a chosen code.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use axum::http::{Method, Request, Response, StatusCode};
use kube::client::Body;
use serde_json::{json, Value};

/// One request as the server saw it.
#[derive(Clone, Debug)]
pub struct Seen {
    pub method: Method,
    /// Path without the query, e.g. `/apis/kubevirt.io/v1/namespaces/ns/virtualmachineinstancemigrations`.
    pub path: String,
    pub body: Value,
}

#[derive(Default)]
struct State {
    /// Objects by their path (`.../namespaces/ns/plural/name`).
    objects: BTreeMap<String, Value>,
    seen: Vec<Seen>,
    /// (method, path prefix, code): the next matching request fails with `code`.
    failures: Vec<(Method, String, u16)>,
    version: u64,
}

#[derive(Clone, Default)]
pub struct FakeApi {
    state: Arc<Mutex<State>>,
}

fn status_body(code: u16, reason: &str, message: &str) -> Value {
    json!({"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
           "reason": reason, "message": message, "code": code})
}

/// The collection path of `path` and the object's name, when `path` names an object.
/// `/api/v1/namespaces` itself is a collection, `/api/v1/namespaces/x` an object.
fn split_object(path: &str) -> Option<(&str, &str)> {
    let (collection, name) = path.rsplit_once('/')?;
    let segments = collection.split('/').filter(|s| !s.is_empty()).count();
    // /api/v1/<plural> has 3 segments, /apis/<g>/<v>/<plural> 4; namespaced ones two more.
    let core = path.starts_with("/api/");
    let cluster_collection = if core { 3 } else { 4 };
    let is_collection = |n: usize| {
        n == cluster_collection
            || (n == cluster_collection + 2 && collection.contains("/namespaces/"))
    };
    is_collection(segments).then_some((collection, name))
}

/// Whether the object at `object` is listed by a GET of `collection`: directly in it, or, for
/// a cluster-wide list of a namespaced kind, in that kind's collection of any namespace.
fn in_collection(object: &str, collection: &str) -> bool {
    let Some((parent, _)) = object.rsplit_once('/') else {
        return false;
    };
    if parent == collection {
        return true;
    }
    let Some((base, plural)) = collection.rsplit_once('/') else {
        return false;
    };
    parent
        .strip_prefix(base)
        .and_then(|rest| rest.strip_prefix("/namespaces/"))
        .and_then(|rest| rest.split_once('/'))
        .is_some_and(|(_, p)| p == plural)
}

fn label_selector(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter_map(|kv| kv.strip_prefix("labelSelector="))
        .flat_map(|s| {
            let s = s
                .replace("%3D", "=")
                .replace("%2C", ",")
                .replace("%2F", "/");
            s.split(',')
                .filter_map(|t| t.split_once('='))
                .map(|(k, v)| (k.to_string(), v.to_string()))
                .collect::<Vec<_>>()
        })
        .collect()
}

/// RFC 7386 merge of `patch` into `target`.
fn merge(target: &mut Value, patch: &Value) {
    match (target, patch) {
        (Value::Object(t), Value::Object(p)) => {
            for (k, v) in p {
                if v.is_null() {
                    t.remove(k);
                } else {
                    merge(t.entry(k.clone()).or_insert(Value::Null), v);
                }
            }
        }
        (t, p) => *t = p.clone(),
    }
}

impl FakeApi {
    pub fn new() -> Self {
        Self::default()
    }

    /// A client whose every request this server answers.
    pub fn client(&self) -> kube::Client {
        let api = self.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let api = api.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let body: Value = serde_json::from_slice(&bytes).unwrap_or(Value::Null);
                let content_type = parts
                    .headers
                    .get("content-type")
                    .and_then(|v| v.to_str().ok())
                    .unwrap_or_default()
                    .to_string();
                let (code, reply) = api.answer(
                    &parts.method,
                    parts.uri.path(),
                    parts.uri.query().unwrap_or_default(),
                    &content_type,
                    body,
                );
                Response::builder()
                    .status(StatusCode::from_u16(code).unwrap_or(StatusCode::OK))
                    .header("content-type", "application/json")
                    .body(Body::from(serde_json::to_vec(&reply).unwrap_or_default()))
            }
        });
        kube::Client::new(service, "default")
    }

    /// Puts `object` at `path` (the object's own path), as if it had been created.
    pub fn insert(&self, path: &str, mut object: Value) {
        let mut st = self.state.lock().unwrap();
        st.version += 1;
        object["metadata"]["resourceVersion"] = json!(st.version.to_string());
        st.objects.insert(path.to_string(), object);
    }

    pub fn get(&self, path: &str) -> Option<Value> {
        self.state.lock().unwrap().objects.get(path).cloned()
    }

    /// Paths of the stored objects under `prefix`.
    pub fn paths(&self, prefix: &str) -> Vec<String> {
        let st = self.state.lock().unwrap();
        st.objects
            .keys()
            .filter(|k| k.starts_with(prefix))
            .cloned()
            .collect()
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.state.lock().unwrap().seen.clone()
    }

    /// The requests that change something (everything but GET), as `METHOD path`.
    pub fn writes(&self) -> Vec<String> {
        self.seen()
            .into_iter()
            .filter(|s| s.method != Method::GET)
            .map(|s| format!("{} {}", s.method, s.path))
            .collect()
    }

    pub fn forget_requests(&self) {
        self.state.lock().unwrap().seen.clear();
    }

    /// The next `method` request to a path starting with `prefix` fails with `code`.
    pub fn fail_next(&self, method: Method, prefix: &str, code: u16) {
        self.state
            .lock()
            .unwrap()
            .failures
            .push((method, prefix.to_string(), code));
    }

    fn answer(
        &self,
        method: &Method,
        path: &str,
        query: &str,
        content_type: &str,
        body: Value,
    ) -> (u16, Value) {
        let mut st = self.state.lock().unwrap();
        st.seen.push(Seen {
            method: method.clone(),
            path: path.to_string(),
            body: body.clone(),
        });
        if let Some(i) = st
            .failures
            .iter()
            .position(|(m, p, _)| m == method && path.starts_with(p.as_str()))
        {
            let (_, _, code) = st.failures.remove(i);
            let reason = match code {
                409 => "Conflict",
                404 => "NotFound",
                _ => "InternalError",
            };
            return (code, status_body(code, reason, "injected by the test"));
        }
        let (key, subresource) = match path.strip_suffix("/status") {
            Some(p) if split_object(p).is_some() => (p, Some("status")),
            _ => (path, None),
        };
        st.version += 1;
        let version = st.version.to_string();
        let not_found = || {
            (
                404,
                status_body(404, "NotFound", &format!("{key} not found")),
            )
        };
        match *method {
            Method::GET => match split_object(key).and(st.objects.get(key)) {
                Some(o) => (200, o.clone()),
                None if split_object(key).is_some() => not_found(),
                None => {
                    let selector = label_selector(query);
                    let items: Vec<Value> = st
                        .objects
                        .iter()
                        .filter(|(k, _)| in_collection(k, key))
                        .map(|(_, v)| v)
                        .filter(|v| {
                            selector.iter().all(|(lk, lv)| {
                                v["metadata"]["labels"][lk].as_str() == Some(lv.as_str())
                            })
                        })
                        .cloned()
                        .collect();
                    (
                        200,
                        json!({"kind": "List", "apiVersion": "v1",
                               "metadata": {"resourceVersion": version}, "items": items}),
                    )
                }
            },
            Method::POST => {
                let name = body["metadata"]["name"].as_str().unwrap_or_default();
                let object_path = format!("{key}/{name}");
                if st.objects.contains_key(&object_path) {
                    return (409, status_body(409, "AlreadyExists", "already exists"));
                }
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(version);
                object["metadata"]["uid"] = json!(format!("uid-{version}"));
                st.objects.insert(object_path, object.clone());
                (201, object)
            }
            Method::PUT => {
                let Some(existing) = st.objects.get(key) else {
                    return not_found();
                };
                let sent = body["metadata"]["resourceVersion"].as_str();
                if sent.is_some() && sent != existing["metadata"]["resourceVersion"].as_str() {
                    return (
                        409,
                        status_body(409, "Conflict", "the object has been modified"),
                    );
                }
                let mut object = body.clone();
                object["metadata"]["resourceVersion"] = json!(version);
                st.objects.insert(key.to_string(), object.clone());
                (200, object)
            }
            Method::PATCH => patch(&mut st, key, subresource, content_type, body, &version),
            Method::DELETE => {
                let Some(object) = st.objects.get_mut(key) else {
                    return not_found();
                };
                let has_finalizers = object["metadata"]["finalizers"]
                    .as_array()
                    .is_some_and(|f| !f.is_empty());
                if has_finalizers {
                    object["metadata"]["deletionTimestamp"] = json!("2026-01-01T00:00:00Z");
                    return (200, object.clone());
                }
                let object = st.objects.remove(key).unwrap_or(Value::Null);
                (200, object)
            }
            _ => (405, status_body(405, "MethodNotAllowed", "not supported")),
        }
    }
}

/// A PATCH of the object at `key` (its status when `subresource` is `status`): JSON patch,
/// server-side apply (which may create the object) or merge patch, by content type.
fn patch(
    st: &mut State,
    key: &str,
    subresource: Option<&str>,
    content_type: &str,
    body: Value,
    version: &str,
) -> (u16, Value) {
    let exists = st.objects.contains_key(key);
    let apply = content_type.contains("apply-patch");
    let creates_by_apply = apply && subresource.is_none();
    if !exists && !creates_by_apply {
        return (
            404,
            status_body(404, "NotFound", &format!("{key} not found")),
        );
    }
    let object = st
        .objects
        .entry(key.to_string())
        .or_insert_with(|| json!({"metadata": {}}));
    if content_type.contains("json-patch") {
        let Ok(p) = serde_json::from_value::<json_patch::Patch>(body) else {
            return (422, status_body(422, "Invalid", "not a JSON patch"));
        };
        if let Err(e) = json_patch::patch(object, &p) {
            return (422, status_body(422, "Invalid", &e.to_string()));
        }
    } else if subresource == Some("status") {
        if apply {
            object["status"] = body["status"].clone();
        } else {
            merge(&mut object["status"], &body["status"]);
        }
    } else {
        let mut b = body;
        if let Some(m) = b.as_object_mut() {
            m.remove("status");
        }
        merge(object, &b);
    }
    object["metadata"]["resourceVersion"] = json!(version);
    // A finalizer removed from an object being deleted completes the delete.
    let gone = object["metadata"]["deletionTimestamp"].is_string()
        && object["metadata"]["finalizers"]
            .as_array()
            .is_none_or(|f| f.is_empty());
    let reply = object.clone();
    if gone {
        st.objects.remove(key);
    }
    (200, reply)
}

#[cfg(test)]
mod tests {
    use super::*;
    use k8s_openapi::api::core::v1::ConfigMap;
    use kube::api::{DeleteParams, ListParams, Patch, PatchParams, PostParams};
    use kube::Api;

    fn config_map(name: &str, label: &str) -> ConfigMap {
        serde_json::from_value(json!({
            "apiVersion": "v1", "kind": "ConfigMap",
            "metadata": {"name": name, "namespace": "ns", "labels": {"app": label}},
        }))
        .unwrap()
    }

    #[tokio::test]
    async fn the_server_keeps_what_reconcilers_rely_on() {
        let fake = FakeApi::new();
        let api: Api<ConfigMap> = Api::namespaced(fake.client(), "ns");
        api.create(&PostParams::default(), &config_map("a", "x"))
            .await
            .unwrap();
        api.create(&PostParams::default(), &config_map("b", "y"))
            .await
            .unwrap();
        let again = api
            .create(&PostParams::default(), &config_map("a", "x"))
            .await;
        assert!(crate::api::write::is_status(&again.unwrap_err(), 409));
        let listed = api
            .list(&ListParams::default().labels("app=x"))
            .await
            .unwrap();
        assert_eq!(listed.items.len(), 1);
        let all: Api<ConfigMap> = Api::all(fake.client());
        assert_eq!(
            all.list(&ListParams::default()).await.unwrap().items.len(),
            2
        );
        assert!(api.get_opt("missing").await.unwrap().is_none());
        api.patch(
            "a",
            &PatchParams::default(),
            &Patch::Merge(json!({"metadata": {"labels": {"app": null, "k": "v"}}})),
        )
        .await
        .unwrap();
        let a = api.get("a").await.unwrap();
        assert_eq!(
            a.metadata.labels.unwrap().get("k").map(String::as_str),
            Some("v")
        );
        api.delete("a", &DeleteParams::default()).await.unwrap();
        let gone = api.delete("a", &DeleteParams::default()).await;
        assert!(crate::api::write::is_status(&gone.unwrap_err(), 404));
        fake.fail_next(Method::GET, "/api/v1/namespaces/ns/configmaps/b", 500);
        assert!(api.get("b").await.is_err());
        assert!(api.get("b").await.is_ok(), "one failure only");
    }
}
