//! Waiting with deadlines: a watch for one object, a poll for anything else.

use std::fmt::Debug;
use std::future::Future;
use std::time::Duration;

use anyhow::{anyhow, Context};
use kube::runtime::wait::await_condition;
use kube::{Api, Resource};
use serde::de::DeserializeOwned;

/// Polls `f` every 50 ms until it returns `Some`, an error, or `timeout` passes.
pub async fn wait_for<T, F, Fut>(what: &str, timeout: Duration, mut f: F) -> anyhow::Result<T>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = anyhow::Result<Option<T>>>,
{
    let deadline = tokio::time::Instant::now() + timeout;
    loop {
        if let Some(v) = f().await.with_context(|| format!("waiting for {what}"))? {
            return Ok(v);
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(anyhow!("timed out after {timeout:?} waiting for {what}"));
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

/// Watches object `name` until `cond` holds for it (it may not exist yet), for at most
/// `timeout`; returns the object. On timeout the error shows the object as last seen.
pub async fn wait_for_object<K>(
    api: &Api<K>,
    name: &str,
    timeout: Duration,
    what: &str,
    cond: impl Fn(&K) -> bool,
) -> anyhow::Result<K>
where
    K: Resource + Clone + Debug + DeserializeOwned + Send + Sync + 'static,
{
    let watched = await_condition(api.clone(), name, |o: Option<&K>| o.is_some_and(&cond));
    match tokio::time::timeout(timeout, watched).await {
        Ok(Ok(Some(obj))) => Ok(obj),
        Ok(Ok(None)) => Err(anyhow!("{name} deleted while waiting for {what}")),
        Ok(Err(e)) => Err(anyhow!("watching {name} for {what}: {e}")),
        Err(_) => {
            let last = api.get_opt(name).await.ok().flatten();
            Err(anyhow!(
                "timed out after {timeout:?} waiting for {name}: {what}; last seen: {last:#?}"
            ))
        }
    }
}
