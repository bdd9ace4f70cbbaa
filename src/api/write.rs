//! How every component writes to the API server: status by server-side apply with the
//! object's own group, version and kind; a create that treats "already exists" as done (a
//! reconcile after a restart or a lost watch event makes the same object again); a delete that
//! treats "not found" as done. One copy of each, so the controller, the agent and the
//! republisher cannot drift apart.

use std::fmt::Debug;

use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::{Api, Resource};
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The API server answered with this HTTP status code.
pub fn is_status(error: &kube::Error, code: u16) -> bool {
    matches!(error, kube::Error::Api(e) if e.code == code)
}

/// Writes `status` to the status subresource of `name` by server-side apply under
/// `manager`, forcing ownership of the fields it sets. Fields the manager set before and
/// leaves out now are removed; fields other managers own are kept.
pub async fn apply_status<K, S>(
    api: &Api<K>,
    manager: &str,
    name: &str,
    status: &S,
) -> kube::Result<K>
where
    K: Resource<DynamicType = ()> + Clone + DeserializeOwned + Debug,
    S: Serialize,
{
    let patch = serde_json::json!({
        "apiVersion": K::api_version(&()),
        "kind": K::kind(&()),
        "metadata": { "name": name },
        "status": status,
    });
    api.patch_status(
        name,
        &PatchParams::apply(manager).force(),
        &Patch::Apply(&patch),
    )
    .await
}

/// Creates `object`; `Ok(true)` when this call made it, `Ok(false)` when it already existed.
pub async fn create_or_exists<K>(api: &Api<K>, object: &K) -> kube::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + Serialize + Debug,
{
    match api.create(&PostParams::default(), object).await {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, 409) => Ok(false),
        Err(e) => Err(e),
    }
}

/// Deletes `name`; `Ok(true)` when this call deleted it (or started to), `Ok(false)` when it
/// did not exist.
pub async fn delete_ignore_missing<K>(
    api: &Api<K>,
    name: &str,
    params: &DeleteParams,
) -> kube::Result<bool>
where
    K: Resource + Clone + DeserializeOwned + Debug,
{
    match api.delete(name, params).await {
        Ok(_) => Ok(true),
        Err(e) if is_status(&e, 404) => Ok(false),
        Err(e) => Err(e),
    }
}
