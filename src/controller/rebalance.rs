//! Reconciling a `RebalancePolicy`: every interval, one round of pairwise load balancing over the
//! loads the agents publish, acting through `VirtualMachineMigration` objects owned by the
//! policy. Cooldowns and in-flight counts are derived from those objects, so a restarted
//! controller knows them without any memory of its own.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;
use std::time::Duration;

use kube::runtime::controller::Action;
use kube::runtime::reflector::ObjectRef;
use kube::{Api, Resource, ResourceExt};

use super::error::Result;
use super::guard::Marked;
use super::labels;
use super::validate;
use super::Context;
use crate::api::conditions::{set_condition, Condition};
use crate::api::digest::VmDigest;
use crate::api::migration::{MigrationTarget, VirtualMachineMigrationSpec};
use crate::api::rebalance::{
    RebalanceDecision, RebalanceMode, RebalancePolicySpec, RebalancePolicyStatus,
};
use crate::api::time::{self, Timestamp};
use crate::api::write;
use crate::api::{RebalancePolicy, VirtualMachineMigration, FIELD_MANAGER};
use crate::plan::rebalance::{
    admits, cooldown_seconds, rank_by_common_memory, round, BalancingNode, BalancingVm,
    LoadFactors, Mode, Move, RoundConfig, Weights,
};
use crate::plan::VmKey;
use crate::view::ClusterView;

/// Node annotation overriding the policy's load weights: `cpu=2,io=0.5,memory=0.2`.
pub const WEIGHTS_ANNOTATION: &str = "commonground.dev/load-weights";
/// VMI annotation: never move this VM for rebalancing.
pub const DO_NOT_MOVE_ANNOTATION: &str = "commonground.dev/do-not-move";
/// VMI annotation: an administrator-set load for the VM; when movable VMs carry it, the VM
/// whose value is nearest half the load difference of the pair is the one moved.
pub const TARGET_LOAD_ANNOTATION: &str = "commonground.dev/target-load";
/// Label on the VirtualMachineMigrations a policy creates.
pub const POLICY_LABEL: &str = "commonground.dev/rebalance-policy";

fn matches(selector: &BTreeMap<String, String>, labels: &BTreeMap<String, String>) -> bool {
    selector.iter().all(|(k, v)| labels.get(k) == Some(v))
}

/// One round per interval, whatever wakes the reconciler: the reconcile is level-triggered
/// but paced by `status.lastRoundTime`.
pub async fn reconcile(policy: Arc<RebalancePolicy>, ctx: Arc<Context>) -> Result<Action> {
    let spec = &policy.spec;
    let (interval, cooldown) = match validate::rebalance_spec(spec) {
        Ok(t) => (t.interval, t.cooldown),
        Err(e) => {
            // Not retried: the next try is when the policy changes.
            let mut status = policy.status.clone().unwrap_or_default();
            set_ready(&mut status, false, validate::INVALID_SPEC, e.to_string());
            write_status(&ctx, &policy, &status).await?;
            return Ok(Action::await_change());
        }
    };
    let now = Timestamp::now();
    if let Some(wait) = until_next_round(policy.status.as_ref(), interval, now) {
        return Ok(Action::requeue(wait));
    }
    let view = &ctx.view;
    let owned: Vec<Arc<VirtualMachineMigration>> = view
        .vmms
        .state()
        .into_iter()
        .filter(|m| labels::is_owned_by(m.labels(), POLICY_LABEL, &policy.metadata))
        .collect();
    let history = History::of(&owned, |ns, name| {
        view.vmi(ns, name)
            .and_then(|v| v.node_name().map(str::to_string))
    });
    let (nodes, loads) = balancing_nodes(view, spec, &history, cooldown, now);
    let planner = view.planner(true);
    // Several receivers: the one already holding most of the VM's memory first.
    let mut prefer = |vm: &VmKey, names: &[&str]| rank_by_common_memory(&planner, vm, names);
    // A receiver must pass the planner's filter for the VM (room, selectors, taints), or the
    // migration would only fail at planning.
    let mut admits_vm = |vm: &VmKey, node: &str| {
        view.vm_request(vm)
            .is_some_and(|req| admits(&planner, &req, node))
    };
    let config = round_config(spec, history.in_flight, now);
    let moves = round(&nodes, &config, &mut admits_vm, &mut prefer);

    let round_time = time::format_rfc3339(now);
    let mut decisions = Vec::new();
    for m in moves {
        let migration = if spec.dry_run {
            None
        } else {
            Some(start_move(&ctx, &policy, &m, history.moves_of(&m.vm)).await?)
        };
        decisions.push(RebalanceDecision {
            vm: m.vm.to_string(),
            from: m.from,
            to: m.to,
            reason: m.reason,
            migration,
            round_time: Some(round_time.clone()),
        });
    }
    let status = round_status(&policy, round_time, loads, decisions);
    write_status(&ctx, &policy, &status).await?;
    Ok(Action::requeue(interval.max(Duration::from_secs(1))))
}

/// How long until the next round is due; `None` when it is due now.
fn until_next_round(
    status: Option<&RebalancePolicyStatus>,
    interval: Duration,
    now: Timestamp,
) -> Option<Duration> {
    let last = status
        .and_then(|s| s.last_round_time.as_deref())
        .and_then(time::parse_rfc3339)?;
    let since = time::elapsed(last, now);
    (since < interval).then(|| interval - since)
}

/// What the policy's own migrations tell about the past: how often each VM moved and when
/// its last move ended, which nodes have moves in flight, and when a move last ended on each
/// node. Derived from the objects every round, so a restarted controller knows it too.
#[derive(Debug, Default, PartialEq)]
struct History {
    /// Per VM: number of moves and when the last finished one ended.
    per_vm: HashMap<VmKey, (u32, Option<Timestamp>)>,
    /// VMs with a move that has not finished.
    busy: HashSet<VmKey>,
    /// Moves in flight per node (as source or target).
    in_flight_nodes: HashMap<String, u32>,
    /// When a move last ended on each node it touched.
    last_end_on_node: HashMap<String, Timestamp>,
    /// Moves in flight in total.
    in_flight: u32,
}

impl History {
    /// `vmi_node(namespace, name)` is where the VMI runs now: a migration the migration
    /// controller has not written a status for yet still touches its requested target and the
    /// node the VMI runs on.
    fn of(
        owned: &[Arc<VirtualMachineMigration>],
        vmi_node: impl Fn(&str, &str) -> Option<String>,
    ) -> Self {
        let mut h = History::default();
        for m in owned {
            let key = VmKey::new(m.namespace().unwrap_or_default(), &m.spec.vmi_name);
            let status = m.status.clone().unwrap_or_default();
            let source = status
                .source_node
                .clone()
                .or_else(|| vmi_node(&key.namespace, &key.name));
            let target = status
                .target_node
                .clone()
                .or_else(|| m.spec.target.as_ref().and_then(|t| t.node_name.clone()));
            let entry = h.per_vm.entry(key.clone()).or_default();
            entry.0 += 1;
            if status.phase.is_final() {
                let end = status.end_time.as_deref().and_then(time::parse_rfc3339);
                entry.1 = entry.1.max(end);
                if let Some(end) = end {
                    for n in [source, target].into_iter().flatten() {
                        let e = h.last_end_on_node.entry(n).or_insert(end);
                        *e = (*e).max(end);
                    }
                }
            } else {
                h.in_flight += 1;
                h.busy.insert(key);
                for n in [source, target].into_iter().flatten() {
                    *h.in_flight_nodes.entry(n).or_default() += 1;
                }
            }
        }
        h
    }

    fn moves_of(&self, vm: &VmKey) -> u32 {
        self.per_vm.get(vm).map_or(0, |h| h.0)
    }

    /// The VM moved recently enough that its cooldown (growing with its number of moves)
    /// has not passed.
    fn cooling(&self, vm: &VmKey, cooldown: Duration, now: Timestamp) -> bool {
        let (moves, last_end) = self.per_vm.get(vm).copied().unwrap_or((0, None));
        last_end.is_some_and(|end| {
            time::seconds_between(end, now) < cooldown_seconds(cooldown.as_secs_f64(), moves)
        })
    }
}

/// Every node that takes part in the round, with its VMs and their loads, and the load of
/// each (rounded, for the status).
fn balancing_nodes(
    view: &ClusterView,
    spec: &RebalancePolicySpec,
    history: &History,
    cooldown: Duration,
    now: Timestamp,
) -> (Vec<BalancingNode>, BTreeMap<String, f64>) {
    let mut nodes = Vec::new();
    let mut loads = BTreeMap::new();
    let default_weights = Weights {
        cpu: spec.weights.cpu,
        io: spec.weights.io,
        memory: spec.weights.memory,
    };
    for node in view.nodes.state() {
        let name = node.name_any();
        // A cordoned node can receive nothing (the migration would fail at the planner) and
        // is being emptied by someone else: it takes no part.
        if !matches(&spec.node_selector, node.labels())
            || node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true)
        {
            continue;
        }
        // No measurements yet: the node does not take part.
        let Some(digest) = view.digests.get(&ObjectRef::new(&name)) else {
            continue;
        };
        let Some(status) = digest.status.as_ref() else {
            continue;
        };
        let weights = match node.annotations().get(WEIGHTS_ANNOTATION) {
            Some(text) => Weights::parse(text, default_weights).unwrap_or_else(|e| {
                tracing::warn!(node = %name, error = %e, "ignoring bad load weights annotation");
                default_weights
            }),
            None => default_weights,
        };
        let vms = status
            .vms
            .iter()
            .map(|v| balancing_vm(view, spec, history, v, cooldown, now))
            .collect();
        // After a rebalancing migration ended on this node, its digest is rewritten by the
        // controller (the VM moves, but its measured load factors do not come along) until
        // the agent scans again: until then the node's load is not known, so it neither sends
        // nor receives, rather than a second VM chasing a load that already moved.
        let measured = time::parse_rfc3339(&status.scan_time);
        let settling = history
            .last_end_on_node
            .get(&name)
            .is_some_and(|end| measured.is_none_or(|scan| scan < *end));
        let in_flight_here = history.in_flight_nodes.get(&name).copied().unwrap_or(0);
        let n = BalancingNode {
            name: name.clone(),
            weights,
            vms,
            in_flight: if settling {
                in_flight_here.max(spec.max_concurrent_per_node)
            } else {
                in_flight_here
            },
            base_load: 0.0,
        };
        // The host's measured share (when the policy counts it) and an administrator's override.
        let measured = spec.include_host_load.then_some(LoadFactors {
            cpu_cores: status.load.cpu_cores,
            io_bytes_per_second: status.load.io_bytes_per_second,
            memory_bytes: status.load.memory_bytes as f64,
        });
        let n = n.with_base_load(
            measured.as_ref(),
            node.annotations()
                .get(crate::plan::rebalance::LOAD_OVERRIDE_ANNOTATION)
                .map(String::as_str),
        );
        loads.insert(name, (n.load() * 1000.0).round() / 1000.0);
        nodes.push(n);
    }
    (nodes, loads)
}

/// One VM as the round sees it: its measured load, an administrator's target load, and
/// whether it may move (not migrating, not opted out, selected, not cooling down, no move of
/// this policy in flight).
fn balancing_vm(
    view: &ClusterView,
    spec: &RebalancePolicySpec,
    history: &History,
    v: &VmDigest,
    cooldown: Duration,
    now: Timestamp,
) -> BalancingVm {
    let key = VmKey::new(&v.namespace, &v.name);
    let vmi = view.vmi(&v.namespace, &v.name);
    let annotations = vmi
        .as_ref()
        .map(|x| x.annotations().clone())
        .unwrap_or_default();
    let labels = vmi.as_ref().map(|x| x.labels().clone()).unwrap_or_default();
    let movable = vmi.as_ref().is_some_and(|x| !x.is_migrating())
        && annotations.get(DO_NOT_MOVE_ANNOTATION).map(String::as_str) != Some("true")
        && matches(&spec.vm_selector, &labels)
        && !history.cooling(&key, cooldown, now)
        && !history.busy.contains(&key);
    BalancingVm {
        vm: key,
        factors: LoadFactors {
            cpu_cores: v.load.cpu_cores,
            io_bytes_per_second: v.load.io_bytes_per_second,
            memory_bytes: v.load.memory_bytes as f64,
        },
        target_load: annotations
            .get(TARGET_LOAD_ANNOTATION)
            .and_then(|t| t.parse::<f64>().ok())
            .filter(|t| t.is_finite()),
        movable,
    }
}

fn round_config(spec: &RebalancePolicySpec, in_flight: u32, now: Timestamp) -> RoundConfig {
    RoundConfig {
        mode: match spec.mode {
            RebalanceMode::Random => Mode::Random,
            RebalanceMode::SenderInitiated => Mode::SenderInitiated,
            RebalanceMode::ReceiverInitiated => Mode::ReceiverInitiated,
            RebalanceMode::Symmetric => Mode::Symmetric,
        },
        threshold_factor: spec.threshold_factor,
        high_threshold: spec.high_threshold,
        low_threshold: spec.low_threshold,
        max_concurrent: spec.max_concurrent,
        max_concurrent_per_node: spec.max_concurrent_per_node,
        in_flight,
        seed: now.as_second() as u64,
    }
}

/// The VirtualMachineMigration that carries out one move, owned by the policy; its name
/// counts the VM's moves, so a reconcile repeated after a restart makes the same object.
fn move_request(policy: &RebalancePolicy, m: &Move, moves_so_far: u32) -> VirtualMachineMigration {
    let name = labels::bounded_name(&format!(
        "rb-{}-{}-{}",
        policy.name_any(),
        m.vm.name,
        moves_so_far + 1
    ));
    let mut vmm = VirtualMachineMigration::new(
        &name,
        VirtualMachineMigrationSpec {
            vmi_name: m.vm.name.clone(),
            target: Some(MigrationTarget {
                node_name: Some(m.to.clone()),
                ..Default::default()
            }),
            max_duration: None,
            path_setup_budget: None,
            follow_deadline: None,
            group: None,
            dry_run: false,
            max_attempts: None,
            unschedulable_timeout: None,
        },
    );
    vmm.metadata.namespace = Some(m.vm.namespace.clone());
    let (owner_labels, owner_annotations) = labels::owner_marks(POLICY_LABEL, &policy.metadata);
    vmm.metadata.labels = Some(owner_labels);
    vmm.metadata.annotations = Some(owner_annotations);
    vmm.metadata.owner_references = policy.controller_owner_ref(&()).map(|o| vec![o]);
    vmm
}

/// Creates the move's request (already made before a restart counts as made); its name.
async fn start_move(
    ctx: &Context,
    policy: &RebalancePolicy,
    m: &Move,
    moves_so_far: u32,
) -> Result<String> {
    let vmm = move_request(policy, m, moves_so_far);
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &m.vm.namespace);
    write::create_or_exists(&api, &vmm).await?;
    Ok(vmm.name_any())
}

/// The status after a round. A round without moves keeps the last decisions on record.
fn round_status(
    policy: &RebalancePolicy,
    round_time: String,
    loads: BTreeMap<String, f64>,
    mut decisions: Vec<RebalanceDecision>,
) -> RebalancePolicyStatus {
    let spec = &policy.spec;
    let previous = policy.status.clone().unwrap_or_default();
    if decisions.is_empty() {
        decisions = previous.decisions;
    }
    let mut status = RebalancePolicyStatus {
        last_round_time: Some(round_time),
        loads,
        decisions,
        conditions: previous.conditions,
    };
    if validate::all_weights_zero(spec) {
        set_ready(
            &mut status,
            false,
            "AllWeightsZero",
            "every weight in spec.weights is 0, so every node's load is 0 and nothing moves \
             (except between nodes whose load-weights annotation sets a weight above 0)"
                .into(),
        );
    } else {
        set_ready(
            &mut status,
            true,
            "RoundsRunning",
            format!("a round every {}", spec.interval),
        );
    }
    status
}

/// Sets the policy's `Ready` condition.
fn set_ready(status: &mut RebalancePolicyStatus, ok: bool, reason: &str, message: String) {
    set_condition(
        &mut status.conditions,
        Condition {
            r#type: "Ready".into(),
            status: if ok { "True" } else { "False" }.into(),
            reason: reason.into(),
            message,
            last_transition_time: None,
        },
        &time::now_rfc3339(),
    );
}

/// Writes the policy's status by server-side apply; nothing when it is unchanged.
async fn write_status(
    ctx: &Context,
    policy: &RebalancePolicy,
    status: &RebalancePolicyStatus,
) -> Result<()> {
    if policy.status.as_ref() == Some(status) {
        return Ok(());
    }
    let api: Api<RebalancePolicy> = Api::all(ctx.client.clone());
    write::apply_status(&api, FIELD_MANAGER, &policy.name_any(), status).await?;
    Ok(())
}

impl Marked for RebalancePolicy {
    async fn mark(ctx: &Context, policy: &Self, reason: &str, message: &str) -> Result<()> {
        let mut status = policy.status.clone().unwrap_or_default();
        set_ready(&mut status, false, reason, message.to_string());
        write_status(ctx, policy, &status).await
    }
}
