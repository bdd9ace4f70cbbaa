//! The boundary around every reconcile: what retrying cannot fix becomes a status condition
//! and waits for the object to change; what it can fix is retried with a per-object backoff
//! (1 s doubling to 5 min); a panic is caught, logged with the object, marked on it and
//! retried like any other failure, so one object cannot take the process down.

use std::future::Future;
use std::panic::AssertUnwindSafe;
use std::sync::Arc;

use futures::FutureExt;
use kube::runtime::controller::Action;
use kube::{Resource, ResourceExt};

use super::error::{ControllerError, Result};
use super::Context;

pub use super::backoff::{Backoff, FIRST_RETRY, MAX_RETRY};

/// `Kind/namespace/name` of an object, the key of its backoff and of its log lines.
pub fn object_key<K: Resource<DynamicType = ()>>(obj: &K) -> String {
    format!(
        "{}/{}/{}",
        K::kind(&()),
        obj.namespace().unwrap_or_default(),
        obj.name_any()
    )
}

/// Runs `fut`, turning a panic inside it into an error carrying the panic's message.
pub async fn catch_panic<T>(fut: impl Future<Output = T>) -> std::result::Result<T, String> {
    AssertUnwindSafe(fut)
        .catch_unwind()
        .await
        .map_err(|payload| {
            payload
                .downcast_ref::<&str>()
                .map(|s| s.to_string())
                .or_else(|| payload.downcast_ref::<String>().cloned())
                .unwrap_or_else(|| "a panic without a message".into())
        })
}

/// A reconciled kind that can show a failure on the object itself.
pub trait Marked: Resource<DynamicType = ()> + Send + Sync + 'static {
    /// Sets a condition (reason, message) saying why reconciling failed; writes nothing when
    /// the object already says so, so a failure does not wake itself in a loop.
    fn mark(
        ctx: &Context,
        obj: &Self,
        reason: &str,
        message: &str,
    ) -> impl Future<Output = Result<()>> + Send;
}

/// The reconcile boundary: runs `reconcile` and sorts its outcome (see the module comment).
pub async fn guarded<K, F, Fut>(obj: Arc<K>, ctx: Arc<Context>, reconcile: F) -> Result<Action>
where
    K: Marked,
    F: FnOnce(Arc<K>, Arc<Context>) -> Fut,
    Fut: Future<Output = Result<Action>> + Send,
{
    let key = object_key(&*obj);
    match catch_panic(reconcile(obj.clone(), ctx.clone())).await {
        Ok(Ok(action)) => {
            ctx.backoff.reset(&key);
            Ok(action)
        }
        Ok(Err(e)) if !e.retriable() => {
            ctx.metrics
                .reconcile_errors
                .with_label_values(&[e.kind()])
                .inc();
            tracing::warn!(
                namespace = obj.namespace().unwrap_or_default(),
                name = obj.name_any(),
                kind = e.kind(),
                error = %e,
                "reconcile failed in a way retrying cannot fix; waiting for the object to change"
            );
            if let Err(m) = K::mark(&ctx, &obj, e.kind(), &e.to_string()).await {
                tracing::warn!(object = %key, error = %m, "could not record the failure in status");
            }
            ctx.backoff.reset(&key);
            Ok(Action::await_change())
        }
        Ok(Err(e)) => Err(e),
        Err(panic) => {
            let e = ControllerError::Panicked(panic);
            tracing::error!(
                namespace = obj.namespace().unwrap_or_default(),
                name = obj.name_any(),
                error = %e,
                "reconcile panicked; the object is retried with backoff"
            );
            if let Err(m) = K::mark(&ctx, &obj, e.kind(), &e.to_string()).await {
                tracing::warn!(object = %key, error = %m, "could not record the panic in status");
            }
            Err(e)
        }
    }
}

/// Counts a retriable failure by kind and retries the object after its backoff delay.
pub fn error_policy<K: Resource<DynamicType = ()>>(
    obj: Arc<K>,
    error: &ControllerError,
    ctx: Arc<Context>,
) -> Action {
    ctx.metrics
        .reconcile_errors
        .with_label_values(&[error.kind()])
        .inc();
    let delay = ctx.backoff.next_delay(&object_key(&*obj));
    tracing::warn!(
        namespace = obj.namespace().unwrap_or_default(),
        name = obj.name_any(),
        kind = error.kind(),
        error = %error,
        retry_in_seconds = delay.as_secs(),
        "reconcile failed; retrying"
    );
    Action::requeue(delay)
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[tokio::test]
    async fn a_panic_becomes_an_error_with_its_message() {
        let r: std::result::Result<u32, String> = catch_panic(async {
            let v: Vec<u32> = Vec::new();
            v[3]
        })
        .await;
        let message = r.unwrap_err();
        assert!(message.contains("index out of bounds"), "{message}");
        let r = catch_panic(async { panic!("boom {}", 7) }).await;
        assert_eq!(r, Err::<(), _>("boom 7".to_string()));
        assert_eq!(catch_panic(async { 5 }).await, Ok(5));
    }

    use crate::api::migration::VirtualMachineMigrationSpec;
    use crate::api::VirtualMachineMigration;
    use crate::controller::metrics::ControllerMetrics;
    use crate::controller::status::TransferModel;
    use crate::view::{ClusterView, ViewConfig};
    use axum::http::{Method, Request, Response, StatusCode};
    use kube::client::Body;

    type Seen = Arc<Mutex<Vec<(Method, String, String)>>>;

    /// A context whose API server records every request; status patches succeed, everything
    /// else (the view's watches) is answered 404.
    fn recording_context() -> (Arc<Context>, Seen) {
        let seen: Seen = Arc::default();
        let log = seen.clone();
        let service = tower::service_fn(move |req: Request<Body>| {
            let log = log.clone();
            async move {
                let (parts, body) = req.into_parts();
                let bytes = body.collect_bytes().await.unwrap_or_default();
                let path = parts.uri.path().to_string();
                let text = String::from_utf8_lossy(&bytes).to_string();
                log.lock()
                    .unwrap()
                    .push((parts.method.clone(), path.clone(), text));
                let (status, body) = if parts.method == Method::PATCH && path.ends_with("/status") {
                    (StatusCode::OK, serde_json::to_vec(&vmm()).unwrap())
                } else {
                    (
                        StatusCode::NOT_FOUND,
                        br#"{"kind":"Status","apiVersion":"v1","status":"Failure","reason":"NotFound","code":404}"#
                            .to_vec(),
                    )
                };
                Response::builder()
                    .status(status)
                    .header("content-type", "application/json")
                    .body(Body::from(body))
            }
        });
        let client = kube::Client::new(service, "default");
        let view = ClusterView::start(client.clone(), ViewConfig::default());
        let transfer = TransferModel {
            bandwidth: 1.25e9,
            downtime_limit_ms: 300.0,
            cores_per_gbps: 0.25,
            measured_rate_max_age: std::time::Duration::from_secs(3600),
        };
        let ctx = Context::new(
            client,
            view,
            ControllerMetrics::new(),
            "test".into(),
            transfer,
        );
        (Arc::new(ctx), seen)
    }

    fn vmm() -> VirtualMachineMigration {
        let mut v = VirtualMachineMigration::new(
            &"n".repeat(253),
            VirtualMachineMigrationSpec {
                vmi_name: "vm".into(),
                target: None,
                max_duration: None,
                path_setup_budget: None,
                follow_deadline: None,
                group: None,
                dry_run: false,
                max_attempts: None,
                unschedulable_timeout: None,
            },
        );
        v.metadata.namespace = Some("ns".into());
        v.metadata.uid = Some("0a1b2c3d-4e5f-6789-abcd-ef0123456789".into());
        v
    }

    fn status_patches(seen: &Seen) -> Vec<String> {
        seen.lock()
            .unwrap()
            .iter()
            .filter(|(m, p, _)| *m == Method::PATCH && p.ends_with("/status"))
            .map(|(_, p, body)| format!("{p} {body}"))
            .collect()
    }

    async fn explodes(_: Arc<VirtualMachineMigration>, _: Arc<Context>) -> Result<Action> {
        panic!("boom in reconcile")
    }

    async fn invalid(_: Arc<VirtualMachineMigration>, _: Arc<Context>) -> Result<Action> {
        Err(crate::controller::validate::SpecError {
            field: "spec.maxDuration",
            error: crate::view::quantity::QuantityError::DurationTooLong("1e9h".into()),
        }
        .into())
    }

    async fn succeeds(_: Arc<VirtualMachineMigration>, _: Arc<Context>) -> Result<Action> {
        Ok(Action::await_change())
    }

    #[tokio::test]
    async fn a_panicking_reconcile_is_an_error_marked_on_the_object_not_an_abort() {
        let (ctx, seen) = recording_context();
        let obj = Arc::new(vmm());
        let r = guarded(obj.clone(), ctx.clone(), explodes).await;
        match r {
            Err(ControllerError::Panicked(m)) => assert_eq!(m, "boom in reconcile"),
            other => panic!("expected a caught panic, got {other:?}"),
        }
        let patches = status_patches(&seen);
        assert_eq!(patches.len(), 1, "{patches:?}");
        assert!(
            patches[0].contains(&format!(
                "/namespaces/ns/virtualmachinemigrations/{}/status",
                "n".repeat(253)
            )),
            "{}",
            patches[0]
        );
        assert!(
            patches[0].contains(r#""reason":"Panicked""#),
            "{}",
            patches[0]
        );
        assert!(patches[0].contains("boom in reconcile"), "{}", patches[0]);
        // The failure is retried with backoff, and the object reconciles again afterwards.
        let err = ControllerError::Panicked("boom".into());
        assert_eq!(
            error_policy(obj.clone(), &err, ctx.clone()),
            Action::requeue(FIRST_RETRY)
        );
        assert_eq!(
            error_policy(obj.clone(), &err, ctx.clone()),
            Action::requeue(FIRST_RETRY * 2)
        );
        assert_eq!(
            guarded(obj.clone(), ctx.clone(), succeeds).await.unwrap(),
            Action::await_change()
        );
        assert_eq!(
            error_policy(obj, &err, ctx.clone()),
            Action::requeue(FIRST_RETRY),
            "a success resets the backoff"
        );
        assert_eq!(
            ctx.metrics
                .reconcile_errors
                .with_label_values(&["Panicked"])
                .get(),
            3
        );
    }

    #[tokio::test]
    async fn an_error_retrying_cannot_fix_becomes_a_condition_and_waits_for_a_change() {
        let (ctx, seen) = recording_context();
        let action = guarded(Arc::new(vmm()), ctx.clone(), invalid)
            .await
            .unwrap();
        assert_eq!(action, Action::await_change());
        let patches = status_patches(&seen);
        assert_eq!(patches.len(), 1, "{patches:?}");
        assert!(
            patches[0].contains(r#""reason":"InvalidSpec""#),
            "{}",
            patches[0]
        );
        assert!(patches[0].contains("spec.maxDuration"), "{}", patches[0]);
        assert_eq!(
            ctx.metrics
                .reconcile_errors
                .with_label_values(&["InvalidSpec"])
                .get(),
            1
        );
    }
}
