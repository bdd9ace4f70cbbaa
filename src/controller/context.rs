//! What every reconciler shares: the API client, the watch-fed view, the Event recorder,
//! metrics, the transfer model, the admission lock and the per-object retry backoff.

use kube::runtime::events::{Recorder, Reporter};
use kube::Client;
use tokio::sync::Mutex;

use super::backoff::Backoff;
use super::metrics::ControllerMetrics;
use super::status::TransferModel;
use crate::view::ClusterView;

pub struct Context {
    pub client: Client,
    pub view: ClusterView,
    pub recorder: Recorder,
    pub metrics: ControllerMetrics,
    pub transfer: TransferModel,
    /// Serialises "check the parallel limits, then create" so concurrent reconciles cannot
    /// exceed KubeVirt's limits between a create and the watch reporting it: the KubeVirt
    /// migrations created (name, source node) that the watch has not reported yet.
    pub admission: Mutex<Vec<(String, String)>>,
    /// Consecutive failures per object, for the retry delay.
    pub backoff: Backoff,
}

impl Context {
    pub fn new(
        client: Client,
        view: ClusterView,
        metrics: ControllerMetrics,
        identity: String,
        transfer: TransferModel,
    ) -> Self {
        Context {
            recorder: Recorder::new(
                client.clone(),
                Reporter {
                    controller: "commonground-controller".into(),
                    instance: Some(identity),
                },
            ),
            client,
            view,
            metrics,
            transfer,
            admission: Mutex::new(Vec::new()),
            backoff: Backoff::default(),
        }
    }
}
