//! The extender's Prometheus metrics.

use std::time::Duration;

use prometheus::{HistogramOpts, HistogramVec, IntCounterVec, Opts, Registry};

use super::placement::Report;

/// Outcome label of a request.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    Ok,
    BadRequest,
    TooLarge,
    Timeout,
}

impl Outcome {
    pub fn as_str(self) -> &'static str {
        match self {
            Outcome::Ok => "ok",
            Outcome::BadRequest => "bad_request",
            Outcome::TooLarge => "too_large",
            Outcome::Timeout => "timeout",
        }
    }
}

pub struct ExtenderMetrics {
    pub registry: Registry,
    requests: IntCounterVec,
    latency: HistogramVec,
    degraded_pods: IntCounterVec,
    degraded_nodes: IntCounterVec,
    pass_through: IntCounterVec,
    migration_pods: IntCounterVec,
}

impl ExtenderMetrics {
    pub fn new() -> Result<Self, prometheus::Error> {
        let registry = Registry::new();
        let requests = IntCounterVec::new(
            Opts::new(
                "commonground_extender_requests_total",
                "Extender requests by verb and outcome",
            ),
            &["verb", "outcome"],
        )?;
        let latency = HistogramVec::new(
            HistogramOpts::new(
                "commonground_extender_request_duration_seconds",
                "Time to answer an extender request, body read included",
            )
            .buckets(vec![
                0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1.0,
                5.0,
            ]),
            &["verb"],
        )?;
        let degraded_pods = IntCounterVec::new(
            Opts::new(
                "commonground_extender_degraded_pods_total",
                "Migration target pods answered neutrally because data was missing, by cause",
            ),
            &["verb", "cause"],
        )?;
        let degraded_nodes = IntCounterVec::new(
            Opts::new(
                "commonground_extender_degraded_nodes_total",
                "Nodes given a neutral answer for a migration target pod because data was missing, by cause",
            ),
            &["verb", "cause"],
        )?;
        let pass_through = IntCounterVec::new(
            Opts::new(
                "commonground_extender_pass_through_total",
                "Requests for pods that are not migration targets (all nodes pass, neutral scores)",
            ),
            &["verb"],
        )?;
        let migration_pods = IntCounterVec::new(
            Opts::new(
                "commonground_extender_migration_pods_total",
                "Requests for migration target pods",
            ),
            &["verb"],
        )?;
        registry.register(Box::new(requests.clone()))?;
        registry.register(Box::new(latency.clone()))?;
        registry.register(Box::new(degraded_pods.clone()))?;
        registry.register(Box::new(degraded_nodes.clone()))?;
        registry.register(Box::new(pass_through.clone()))?;
        registry.register(Box::new(migration_pods.clone()))?;
        Ok(Self {
            registry,
            requests,
            latency,
            degraded_pods,
            degraded_nodes,
            pass_through,
            migration_pods,
        })
    }

    pub fn request(&self, verb: &str, outcome: Outcome, took: Duration) {
        self.requests
            .with_label_values(&[verb, outcome.as_str()])
            .inc();
        self.latency
            .with_label_values(&[verb])
            .observe(took.as_secs_f64());
    }

    pub fn report(&self, verb: &str, report: &Report) {
        if report.pass_through {
            self.pass_through.with_label_values(&[verb]).inc();
            return;
        }
        self.migration_pods.with_label_values(&[verb]).inc();
        if let Some(cause) = report.pod_degraded {
            self.degraded_pods
                .with_label_values(&[verb, cause.as_str()])
                .inc();
        }
        for (cause, n) in &report.nodes_degraded {
            self.degraded_nodes
                .with_label_values(&[verb, cause.as_str()])
                .inc_by(*n as u64);
        }
    }
}
