//! Controller metrics (Prometheus).

use prometheus::{
    exponential_buckets, Histogram, HistogramOpts, IntCounter, IntCounterVec, IntGauge, Opts,
    Registry,
};

#[derive(Clone)]
pub struct ControllerMetrics {
    pub registry: Registry,
    pub migrations: IntCounterVec,
    pub planned_bytes_to_move: IntCounter,
    pub planned_bytes_saved: IntCounter,
    pub plan_seconds: Histogram,
    pub migration_seconds: Histogram,
    pub reconcile_errors: IntCounterVec,
    pub reconciles: IntCounter,
    pub queue_depth: IntGauge,
    pub digests_republished: IntCounter,
    pub digests_key_not_accepted: IntGauge,
}

impl ControllerMetrics {
    pub fn new() -> Self {
        let registry = Registry::new_custom(Some("commonground_controller".into()), None)
            .expect("valid registry prefix");
        let migrations = IntCounterVec::new(
            Opts::new(
                "migrations_total",
                "VirtualMachineMigrations reaching a final phase, by result, and failed attempts tried again on another node (retried)",
            ),
            &["result"],
        )
        .expect("metric");
        let planned_bytes_to_move = IntCounter::new(
            "planned_bytes_to_move_total",
            "Bytes the chosen targets still need (memory minus common minus zero)",
        )
        .expect("metric");
        let planned_bytes_saved = IntCounter::new(
            "planned_bytes_saved_total",
            "Bytes of VM memory the chosen targets already hold",
        )
        .expect("metric");
        let plan_seconds = Histogram::with_opts(
            HistogramOpts::new("plan_duration_seconds", "Time to plan one migration")
                .buckets(exponential_buckets(0.0001, 2.0, 18).expect("buckets")),
        )
        .expect("metric");
        let migration_seconds = Histogram::with_opts(
            HistogramOpts::new(
                "migration_duration_seconds",
                "KubeVirt migration start to end",
            )
            .buckets(exponential_buckets(0.5, 2.0, 14).expect("buckets")),
        )
        .expect("metric");
        let reconcile_errors = IntCounterVec::new(
            Opts::new("reconcile_errors_total", "Reconcile failures by error kind"),
            &["kind"],
        )
        .expect("metric");
        let reconciles = IntCounter::new("reconciles_total", "Reconcile calls").expect("metric");
        let queue_depth = IntGauge::new(
            "queue_depth",
            "VirtualMachineMigrations not yet in a final phase",
        )
        .expect("metric");
        let digests_republished = IntCounter::new(
            "digests_republished_total",
            "Node digests updated right after a migration (before the agents' next scan)",
        )
        .expect("metric");
        let digests_key_not_accepted = IntGauge::new(
            "digests_key_not_accepted",
            "NodeRegionDigests made under a cluster key the controller does not accept",
        )
        .expect("metric");
        for c in [
            Box::new(migrations.clone()) as Box<dyn prometheus::core::Collector>,
            Box::new(digests_key_not_accepted.clone()),
            Box::new(planned_bytes_to_move.clone()),
            Box::new(planned_bytes_saved.clone()),
            Box::new(plan_seconds.clone()),
            Box::new(migration_seconds.clone()),
            Box::new(reconcile_errors.clone()),
            Box::new(reconciles.clone()),
            Box::new(queue_depth.clone()),
            Box::new(digests_republished.clone()),
        ] {
            registry.register(c).expect("unique metric");
        }
        Self {
            registry,
            migrations,
            planned_bytes_to_move,
            planned_bytes_saved,
            plan_seconds,
            migration_seconds,
            reconcile_errors,
            reconciles,
            queue_depth,
            digests_republished,
            digests_key_not_accepted,
        }
    }
}

impl Default for ControllerMetrics {
    fn default() -> Self {
        Self::new()
    }
}
