//! Leader election on a `coordination.k8s.io/v1` Lease: one replica reconciles, the others
//! wait. Optimistic concurrency (resourceVersion) makes the take-over safe.

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime;
use k8s_openapi::jiff::Timestamp;
use kube::api::{ObjectMeta, PostParams};
use kube::{Api, Client};

use super::error::{ControllerError, Result};

#[derive(Clone, Debug)]
pub struct LeaseConfig {
    pub namespace: String,
    pub name: String,
    pub identity: String,
    pub duration: Duration,
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
                match self.api.create(&PostParams::default(), &lease).await {
                    Ok(_) => Ok(true),
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
                    Err(e) => Err(e.into()),
                }
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
                    Err(kube::Error::Api(e)) if e.code == 409 => Ok(false),
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

    /// Renews the lease until it cannot be renewed for a whole lease duration; then returns an
    /// error so the process exits and stops reconciling (another replica takes over).
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
            if last_ok.elapsed() > self.config.duration {
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
