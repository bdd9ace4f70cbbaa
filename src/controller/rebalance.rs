//! Reconciling a `RebalancePolicy`: every interval, one round of pairwise load balancing over the
//! loads the agents publish, acting through `VirtualMachineMigration` objects owned by the
//! policy. Cooldowns and in-flight counts are derived from those objects, so a restarted
//! controller knows them without any memory of its own.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use kube::api::{Patch, PatchParams, PostParams};
use kube::runtime::controller::Action;
use kube::{Api, Resource, ResourceExt};

use super::error::Result;
use super::guard::Marked;
use super::labels;
use super::validate;
use super::Context;
use crate::api::conditions::{set_condition, Condition};
use crate::api::migration::{MigrationTarget, VirtualMachineMigrationSpec};
use crate::api::rebalance::{RebalanceDecision, RebalanceMode, RebalancePolicyStatus};
use crate::api::{RebalancePolicy, VirtualMachineMigration, FIELD_MANAGER};
use crate::plan::rebalance::{
    admits, cooldown_seconds, rank_by_common_memory, round, BalancingNode, BalancingVm,
    LoadFactors, Mode, RoundConfig, Weights,
};
use crate::plan::VmKey;

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

fn now() -> chrono::DateTime<chrono::Utc> {
    chrono::Utc::now()
}

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
    // Level-triggered but paced: one round per interval whatever wakes us.
    if let Some(last) = policy
        .status
        .as_ref()
        .and_then(|s| s.last_round_time.as_deref())
        .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
    {
        let since = (now() - last.with_timezone(&chrono::Utc))
            .to_std()
            .unwrap_or_default();
        if since < interval {
            return Ok(Action::requeue(interval - since));
        }
    }

    let view = &ctx.view;
    let planner = view.planner(true);
    let owned: Vec<Arc<VirtualMachineMigration>> = view
        .vmms
        .state()
        .into_iter()
        .filter(|m| labels::is_owned_by(m.labels(), POLICY_LABEL, &policy.metadata))
        .collect();
    // History per VM: number of moves and when the last one ended; in-flight per node.
    let mut history: HashMap<VmKey, (u32, Option<chrono::DateTime<chrono::Utc>>)> = HashMap::new();
    let mut in_flight_nodes: HashMap<String, u32> = HashMap::new();
    // When a rebalancing migration last ended on each node it touched.
    let mut last_end_on_node: HashMap<String, chrono::DateTime<chrono::Utc>> = HashMap::new();
    let mut in_flight = 0;
    for m in &owned {
        let key = VmKey::new(m.namespace().unwrap_or_default(), &m.spec.vmi_name);
        let status = m.status.clone().unwrap_or_default();
        // A migration the migration controller has not written a status for yet still
        // touches its requested target and the node the VMI runs on.
        let source = status.source_node.clone().or_else(|| {
            view.vmi(&key.namespace, &key.name)
                .and_then(|v| v.node_name().map(str::to_string))
        });
        let target = status
            .target_node
            .clone()
            .or_else(|| m.spec.target.as_ref().and_then(|t| t.node_name.clone()));
        let entry = history.entry(key).or_default();
        entry.0 += 1;
        if status.phase.is_final() {
            let end = status
                .end_time
                .as_deref()
                .and_then(|t| chrono::DateTime::parse_from_rfc3339(t).ok())
                .map(|t| t.with_timezone(&chrono::Utc));
            entry.1 = entry.1.max(end);
            if let Some(end) = end {
                for n in [source, target].into_iter().flatten() {
                    let e = last_end_on_node.entry(n).or_insert(end);
                    *e = (*e).max(end);
                }
            }
        } else {
            in_flight += 1;
            for n in [source, target].into_iter().flatten() {
                *in_flight_nodes.entry(n).or_default() += 1;
            }
        }
    }

    let mut nodes = Vec::new();
    let mut loads = BTreeMap::new();
    let default_weights = Weights {
        cpu: spec.weights.cpu,
        io: spec.weights.io,
        memory: spec.weights.memory,
    };
    for node in view.nodes.state() {
        let name = node.name_any();
        if !matches(&spec.node_selector, node.labels()) {
            continue;
        }
        // A cordoned node can receive nothing (the migration would fail at the planner) and is
        // being emptied by someone else: it takes no part.
        if node.spec.as_ref().and_then(|s| s.unschedulable) == Some(true) {
            continue;
        }
        let weights = match node.annotations().get(WEIGHTS_ANNOTATION) {
            Some(text) => Weights::parse(text, default_weights).unwrap_or_else(|e| {
                tracing::warn!(node = %name, error = %e, "ignoring bad load weights annotation");
                default_weights
            }),
            None => default_weights,
        };
        let Some(digest) = view
            .digests
            .get(&kube::runtime::reflector::ObjectRef::new(&name))
        else {
            continue; // no measurements yet: the node does not take part
        };
        let Some(status) = digest.status.as_ref() else {
            continue;
        };
        let mut vms = Vec::new();
        for v in &status.vms {
            let key = VmKey::new(&v.namespace, &v.name);
            let vmi = view.vmi(&v.namespace, &v.name);
            let annotations = vmi
                .as_ref()
                .map(|x| x.annotations().clone())
                .unwrap_or_default();
            let labels = vmi.as_ref().map(|x| x.labels().clone()).unwrap_or_default();
            let (moves, last_end) = history.get(&key).copied().unwrap_or((0, None));
            let cooling = last_end.is_some_and(|end| {
                let wait = cooldown_seconds(cooldown.as_secs_f64(), moves);
                (now() - end).num_milliseconds() as f64 / 1000.0 < wait
            });
            let busy = history.get(&key).is_some_and(|_| {
                owned.iter().any(|m| {
                    m.spec.vmi_name == v.name
                        && m.namespace().as_deref() == Some(v.namespace.as_str())
                        && !m.status.as_ref().is_some_and(|s| s.phase.is_final())
                })
            });
            let movable = vmi.as_ref().is_some_and(|x| !x.is_migrating())
                && annotations.get(DO_NOT_MOVE_ANNOTATION).map(String::as_str) != Some("true")
                && matches(&spec.vm_selector, &labels)
                && !cooling
                && !busy;
            vms.push(BalancingVm {
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
            });
        }
        // After a rebalancing migration ended on this node, its digest is rewritten by the
        // controller (the VM moves, but its measured load factors do not come along) until the
        // agent scans again: until then the node's load is not known, so it neither sends nor
        // receives, rather than a second VM chasing a load that already moved.
        let measured = chrono::DateTime::parse_from_rfc3339(&status.scan_time)
            .ok()
            .map(|t| t.with_timezone(&chrono::Utc));
        let settling = last_end_on_node
            .get(&name)
            .is_some_and(|end| measured.is_none_or(|scan| scan < *end));
        let in_flight_here = in_flight_nodes.get(&name).copied().unwrap_or(0);
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

    let config = RoundConfig {
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
        seed: now().timestamp() as u64,
    };
    // Several receivers: the one already holding most of the VM's memory first.
    let mut prefer = |vm: &VmKey, names: &[&str]| rank_by_common_memory(&planner, vm, names);
    // A receiver must pass the planner's filter for the VM (room, selectors, taints), or the
    // migration would only fail at planning.
    let mut admits_vm = |vm: &VmKey, node: &str| {
        view.vm_request(vm)
            .is_some_and(|req| admits(&planner, &req, node))
    };
    let moves = round(&nodes, &config, &mut admits_vm, &mut prefer);

    let round_time = now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true);
    let mut decisions = Vec::new();
    for m in moves {
        let moves_so_far = history.get(&m.vm).map_or(0, |h| h.0);
        let name = format!(
            "rb-{}-{}-{}",
            policy.name_any(),
            m.vm.name,
            moves_so_far + 1
        );
        let name = labels::bounded_name(&name);
        let migration = if spec.dry_run {
            None
        } else {
            let api: Api<VirtualMachineMigration> =
                Api::namespaced(ctx.client.clone(), &m.vm.namespace);
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
                    group: None,
                    dry_run: false,
                },
            );
            vmm.metadata.namespace = Some(m.vm.namespace.clone());
            let (owner_labels, owner_annotations) =
                labels::owner_marks(POLICY_LABEL, &policy.metadata);
            vmm.metadata.labels = Some(owner_labels);
            vmm.metadata.annotations = Some(owner_annotations);
            vmm.metadata.owner_references = policy.controller_owner_ref(&()).map(|o| vec![o]);
            match api.create(&PostParams::default(), &vmm).await {
                Ok(_) => {}
                Err(kube::Error::Api(e)) if e.code == 409 => {} // made before a restart
                Err(e) => return Err(e.into()),
            }
            Some(name)
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
    if decisions.is_empty() {
        // Nothing to do this round: the last decisions stay on record.
        decisions = policy
            .status
            .as_ref()
            .map(|s| s.decisions.clone())
            .unwrap_or_default();
    }
    let mut status = RebalancePolicyStatus {
        last_round_time: Some(round_time),
        loads,
        decisions,
        conditions: policy.status.clone().unwrap_or_default().conditions,
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
    write_status(&ctx, &policy, &status).await?;
    Ok(Action::requeue(interval.max(Duration::from_secs(1))))
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
        &now().to_rfc3339_opts(chrono::SecondsFormat::Secs, true),
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
    let patch = serde_json::json!({
        "apiVersion": "commonground.dev/v1alpha1", "kind": "RebalancePolicy", "status": status,
    });
    api.patch_status(
        &policy.name_any(),
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&patch),
    )
    .await?;
    Ok(())
}

impl Marked for RebalancePolicy {
    async fn mark(ctx: &Context, policy: &Self, reason: &str, message: &str) -> Result<()> {
        let mut status = policy.status.clone().unwrap_or_default();
        set_ready(&mut status, false, reason, message.to_string());
        write_status(ctx, policy, &status).await
    }
}
