//! Leader election on a `coordination.k8s.io/v1` Lease: one replica reconciles, the others
//! wait. Optimistic concurrency (resourceVersion) makes the take-over safe.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::error::{ControllerError, Result};
use crate::api::write;

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    /// How long a lease stays valid after its last renewal; another replica takes over
    /// after that.
    pub duration: Duration,
    /// How long the holder keeps reconciling without a successful renewal. Shorter than
    /// `duration`, so the holder stops before anyone else may start (as client-go's
    /// `renewDeadline`).
    pub renew_deadline: Duration,
    pub renew_every: Duration,
}

pub struct LeaderElector {
    api: Api<Lease>,
    config: LeaseConfig,
}

fn now() -> MicroTime {
    MicroTime(Timestamp::now())
}

impl LeaderElector {
    pub fn new(client: Client, config: LeaseConfig) -> Self {
        Self {
            api: Api::namespaced(client, &config.namespace),
            config,
        }
    }

    fn expired(&self, spec: &LeaseSpec) -> bool {
        let Some(renew) = spec.renew_time.as_ref() else {
            return true;
        };
        let secs = spec
            .lease_duration_seconds
            .unwrap_or(self.config.duration.as_secs() as i32) as i64;
        Timestamp::now().as_second() > renew.0.as_second() + secs
    }

    /// One attempt to take or keep the lease; true when we hold it afterwards.
    pub async fn try_acquire(&self) -> Result<bool> {
        let me = &self.config.identity;
        let duration = self.config.duration.as_secs() as i32;
        match self.api.get_opt(&self.config.name).await? {
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.config.name.clone()),
                        ..Default::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(me.clone()),
                        lease_duration_seconds: Some(duration),
                        acquire_time: Some(now()),
                        renew_time: Some(now()),
                        lease_transitions: Some(0),
                        ..Default::default()
                    }),
                };
                // Another replica creating it first makes ours "already exists": not ours.
                Ok(write::create_or_exists(&self.api, &lease).await?)
            }
            Some(mut lease) => {
                let spec = lease.spec.get_or_insert_with(Default::default);
                let holder = spec.holder_identity.clone().unwrap_or_default();
                if holder != *me && !self.expired(spec) {
                    return Ok(false);
                }
                if holder != *me {
                    spec.acquire_time = Some(now());
                    spec.lease_transitions = Some(spec.lease_transitions.unwrap_or(0) + 1);
                    spec.holder_identity = Some(me.clone());
                }
                spec.renew_time = Some(now());
                spec.lease_duration_seconds = Some(duration);
                // replace() carries the resourceVersion we read: a concurrent writer makes it 409.
                match self
                    .api
                    .replace(&self.config.name, &PostParams::default(), &lease)
                    .await
                {
                    Ok(_) => Ok(true),
                    Err(e) if write::is_status(&e, 409) => Ok(false),
                    Err(e) => Err(e.into()),
                }
            }
        }
    }

    /// Waits until this replica holds the lease.
    pub async fn acquire(&self) -> Result<()> {
        let mut logged = false;
        loop {
            match self.try_acquire().await {
                Ok(true) => {
                    tracing::info!(identity = %self.config.identity, lease = %self.config.name, "became leader");
                    return Ok(());
                }
                Ok(false) if !logged => {
                    tracing::info!(lease = %self.config.name, "another replica leads; waiting");
                    logged = true;
                }
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "leader election attempt failed"),
            }
            tokio::time::sleep(self.config.renew_every).await;
        }
    }

    /// Renews the lease until it cannot be renewed within the renew deadline; then returns an
    /// error so the process exits and stops reconciling before the lease expires for the
    /// others (another replica takes over).
    pub async fn keep(&self) -> ControllerError {
        let mut last_ok = std::time::Instant::now();
        loop {
            tokio::time::sleep(self.config.renew_every).await;
            match self.try_acquire().await {
                Ok(true) => last_ok = std::time::Instant::now(),
                Ok(false) => {
                    return ControllerError::Leader("lease taken by another replica".into())
                }
                Err(e) => tracing::warn!(error = %e, "lease renewal failed"),
            }
            if last_ok.elapsed() > self.config.renew_deadline {
                return ControllerError::Leader("could not renew the lease in time".into());
            }
        }
    }

    /// Gives the lease up on graceful shutdown so a successor need not wait for expiry.
    pub async fn release(&self) {
        if let Ok(Some(mut lease)) = self.api.get_opt(&self.config.name).await {
            if let Some(spec) = lease.spec.as_mut() {
                if spec.holder_identity.as_deref() == Some(&self.config.identity) {
                    spec.holder_identity = None;
                    spec.renew_time = None;
                    let _ = self
                        .api
                        .replace(&self.config.name, &PostParams::default(), &lease)
                        .await;
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::controller::fake_api::FakeApi;
    use axum::http::Method;
    use serde_json::json;

    const LEASE: &str = "/apis/coordination.k8s.io/v1/namespaces/cg/leases/commonground-controller";

    fn elector(fake: &FakeApi, identity: &str) -> LeaderElector {
        LeaderElector::new(
            fake.client(),
            LeaseConfig {
                namespace: "cg".into(),
                name: "commonground-controller".into(),
                identity: identity.into(),
                duration: Duration::from_secs(15),
                renew_deadline: Duration::from_millis(300),
                renew_every: Duration::from_millis(20),
            },
        )
    }

    fn holder(fake: &FakeApi) -> Option<String> {
        fake.get(LEASE).unwrap()["spec"]["holderIdentity"]
            .as_str()
            .map(str::to_string)
    }

    fn held_by(fake: &FakeApi, who: &str, renewed: &str, transitions: u32) {
        fake.insert(
            LEASE,
            json!({"apiVersion": "coordination.k8s.io/v1", "kind": "Lease",
                   "metadata": {"name": "commonground-controller", "namespace": "cg"},
                   "spec": {"holderIdentity": who, "leaseDurationSeconds": 15,
                            "renewTime": renewed, "leaseTransitions": transitions}}),
        );
    }

    #[tokio::test]
    async fn the_first_replica_creates_the_lease_and_renews_it() {
        let fake = FakeApi::new();
        let a = elector(&fake, "a");
        assert!(a.try_acquire().await.unwrap());
        assert_eq!(holder(&fake).as_deref(), Some("a"));
        let first = fake.get(LEASE).unwrap();
        tokio::time::sleep(Duration::from_millis(5)).await;
        assert!(a.try_acquire().await.unwrap(), "the holder renews");
        let renewed = fake.get(LEASE).unwrap();
        assert_ne!(first["spec"]["renewTime"], renewed["spec"]["renewTime"]);
        assert_eq!(
            renewed["spec"]["leaseTransitions"], 0,
            "a renewal is no transition"
        );
    }

    #[tokio::test]
    async fn a_live_lease_of_another_replica_is_left_alone() {
        let fake = FakeApi::new();
        held_by(&fake, "b", &now().0.to_string(), 3);
        assert!(!elector(&fake, "a").try_acquire().await.unwrap());
        assert_eq!(holder(&fake).as_deref(), Some("b"));
        assert!(fake.writes().is_empty(), "{:?}", fake.writes());
    }

    #[tokio::test]
    async fn an_expired_lease_is_taken_over_and_counted_as_a_transition() {
        let fake = FakeApi::new();
        held_by(&fake, "b", "2026-01-01T00:00:00.000000Z", 3);
        assert!(elector(&fake, "a").try_acquire().await.unwrap());
        let lease = fake.get(LEASE).unwrap();
        assert_eq!(lease["spec"]["holderIdentity"], "a");
        assert_eq!(lease["spec"]["leaseTransitions"], 4);
    }

    #[tokio::test]
    async fn losing_a_race_for_the_lease_is_not_leading() {
        let fake = FakeApi::new();
        held_by(&fake, "b", "2026-01-01T00:00:00.000000Z", 0);
        fake.fail_next(Method::PUT, LEASE, 409);
        assert!(!elector(&fake, "a").try_acquire().await.unwrap());
        let fresh = FakeApi::new();
        fresh.fail_next(
            Method::POST,
            "/apis/coordination.k8s.io/v1/namespaces/cg/leases",
            409,
        );
        assert!(!elector(&fresh, "a").try_acquire().await.unwrap());
    }

    #[tokio::test]
    async fn a_released_lease_is_taken_at_once_by_the_next_replica() {
        let fake = FakeApi::new();
        let a = elector(&fake, "a");
        assert!(a.try_acquire().await.unwrap());
        a.release().await;
        assert_eq!(holder(&fake), None);
        assert!(elector(&fake, "b").try_acquire().await.unwrap());
        assert_eq!(holder(&fake).as_deref(), Some("b"));
        a.release().await;
        assert_eq!(
            holder(&fake).as_deref(),
            Some("b"),
            "only the holder releases"
        );
    }

    #[tokio::test]
    async fn the_holder_stops_when_another_replica_holds_the_lease() {
        let fake = FakeApi::new();
        let a = elector(&fake, "a");
        assert!(a.try_acquire().await.unwrap());
        held_by(&fake, "b", &now().0.to_string(), 1);
        let e = tokio::time::timeout(Duration::from_secs(5), a.keep())
            .await
            .expect("keep returns");
        assert!(e.to_string().contains("taken"), "{e}");
    }

    #[tokio::test]
    async fn the_holder_stops_when_renewals_fail_past_the_deadline() {
        let fake = FakeApi::new();
        let a = elector(&fake, "a");
        assert!(a.try_acquire().await.unwrap());
        for _ in 0..1000 {
            fake.fail_next(Method::GET, LEASE, 500);
        }
        let started = std::time::Instant::now();
        let e = tokio::time::timeout(Duration::from_secs(5), a.keep())
            .await
            .expect("keep returns");
        assert!(e.to_string().contains("in time"), "{e}");
        assert!(started.elapsed() >= Duration::from_millis(300));
    }
}
