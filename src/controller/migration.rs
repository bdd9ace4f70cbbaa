//! Reconciling a `VirtualMachineMigration`: validate, plan, create the KubeVirt migration,
//! follow it to the end. Level-triggered: every step is recomputed from what the API holds,
//! and the KubeVirt migration has a deterministic name, so a restart at any point continues
//! without a second one.

use std::sync::Arc;
use std::time::{Duration, Instant};

use kube::api::DeleteParams;
use kube::runtime::controller::Action;
use kube::runtime::events::{Event, EventType};
use kube::runtime::finalizer::{finalizer, Event as FinalizerEvent};
use kube::{Api, Resource, ResourceExt};

use super::decide::{self, Facts, Progress, Step, VmiFacts};
use super::error::{ControllerError, Result};
use super::groups;
use super::guard::Marked;
use super::kubevirt::{attempt_vmim_name, create_kubevirt_migration};
use super::links::SourceLinks;
use super::paths;
use super::republish::republish_after_migration;
use super::status;
use super::validate::MigrationBudget;
use super::Context;
use crate::api::conditions::{set_condition, Condition};
use crate::api::digest::NodeRegionDigestStatus;
use crate::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, LIVE_MIGRATABLE,
};
use crate::api::migration::{
    AttemptOutcome, GroupMode, MemberStatus, MigrationPhase, VirtualMachineMigrationStatus,
};
use crate::api::{time, write};
use crate::api::{NodeRegionDigest, VirtualMachineMigration, FIELD_MANAGER};
use crate::plan::paths::PathDecision;
use crate::plan::{Plan, VmKey, VmRegionSummary};

pub const FINALIZER: &str = "commonground.dev/migration-cleanup";
/// Candidates kept in status.
const TOP_CANDIDATES: usize = 5;

pub async fn reconcile(vmm: Arc<VirtualMachineMigration>, ctx: Arc<Context>) -> Result<Action> {
    ctx.metrics.reconciles.inc();
    let ns = vmm
        .namespace()
        .ok_or_else(|| ControllerError::MalformedObject(vmm.name_any()))?;
    let api: Api<VirtualMachineMigration> = Api::namespaced(ctx.client.clone(), &ns);
    update_queue_depth(&ctx);
    if !needs_finalizer(&vmm) {
        // A dry run makes nothing in the cluster, so deleting it has nothing to clean up:
        // no finalizer, one write fewer per request (1,000 dry runs plan measurably faster).
        if vmm.meta().deletion_timestamp.is_some() {
            return Ok(Action::await_change());
        }
        return apply(vmm, &ctx).await;
    }
    finalizer(&api, FINALIZER, vmm, |event| async {
        match event {
            FinalizerEvent::Apply(vmm) => apply(vmm, &ctx).await,
            FinalizerEvent::Cleanup(vmm) => cleanup(vmm, &ctx).await,
        }
    })
    .await
    .map_err(|e| match e {
        kube::runtime::finalizer::Error::ApplyFailed(e)
        | kube::runtime::finalizer::Error::CleanupFailed(e) => e,
        other => ControllerError::Finalizer(other.to_string()),
    })
}

/// Whether a request goes through the cleanup finalizer: every request that can make
/// something (a KubeVirt migration, a path), and any request that already carries it (a dry
/// run turned into a real one keeps it until its cleanup has run).
pub fn needs_finalizer(vmm: &VirtualMachineMigration) -> bool {
    !vmm.spec.dry_run || vmm.finalizers().iter().any(|f| f == FINALIZER)
}

impl Marked for VirtualMachineMigration {
    async fn mark(ctx: &Context, vmm: &Self, reason: &str, message: &str) -> Result<()> {
        let mut status = vmm.status.clone().unwrap_or_default();
        set_condition(
            &mut status.conditions,
            condition("ReconcileError", true, reason, message),
            &time::now_rfc3339(),
        );
        write_status(ctx, vmm, &status).await
    }
}

fn update_queue_depth(ctx: &Context) {
    let open = ctx
        .view
        .vmms
        .state()
        .iter()
        .filter(|m| !m.status.as_ref().is_some_and(|s| s.phase.is_final()))
        .count();
    ctx.metrics.queue_depth.set(open as i64);
}

async fn write_status(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    status: &VirtualMachineMigrationStatus,
) -> Result<()> {
    if vmm.status.as_ref() == Some(status) {
        return Ok(()); // nothing changed: no write, no loop
    }
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &vmm.namespace().unwrap_or_default());
    write::apply_status(&api, FIELD_MANAGER, &vmm.name_any(), status).await?;
    Ok(())
}

async fn event(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    warning: bool,
    reason: &str,
    note: String,
) {
    let ev = Event {
        type_: if warning {
            EventType::Warning
        } else {
            EventType::Normal
        },
        reason: reason.into(),
        note: Some(note.chars().take(1000).collect()),
        action: reason.into(),
        secondary: None,
    };
    if let Err(e) = ctx.recorder.publish(&ev, &vmm.object_ref(&())).await {
        tracing::warn!(error = %e, "could not publish event");
    }
}

fn condition(kind: &str, ok: bool, reason: &str, message: impl Into<String>) -> Condition {
    Condition {
        r#type: kind.into(),
        status: if ok { "True" } else { "False" }.into(),
        reason: reason.into(),
        message: message.into(),
        last_transition_time: None,
    }
}

async fn fail(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    mut status: VirtualMachineMigrationStatus,
    reason: &str,
    message: String,
) -> Result<Action> {
    if let Err(e) = paths::cleanup(ctx, vmm, &mut status).await {
        tracing::warn!(error = %e, "path cleanup failed; will retry");
        return Err(e);
    }
    status.phase = MigrationPhase::Failed;
    status.reason = Some(message.clone());
    status.end_time.get_or_insert_with(time::now_rfc3339);
    set_condition(
        &mut status.conditions,
        condition("Failed", true, reason, &message),
        &time::now_rfc3339(),
    );
    write_status(ctx, vmm, &status).await?;
    ctx.metrics.migrations.with_label_values(&["failed"]).inc();
    event(ctx, vmm, true, reason, message).await;
    Ok(Action::await_change())
}

/// What [`gather`] read from the cluster: the facts for the decision, and the objects the
/// chosen step works on.
struct Gathered {
    facts: Facts,
    kubevirt_migration: Option<VirtualMachineInstanceMigration>,
    vmi: Option<Arc<VirtualMachineInstance>>,
}

/// Reads what the decision needs: nothing for a final request; the KubeVirt migration; when
/// there is none, the VMI (from the watch, or the API when the watch lags a fresh VMI).
async fn gather(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    status: &VirtualMachineMigrationStatus,
) -> Result<Gathered> {
    let mut g = Gathered {
        facts: Facts {
            kubevirt_migration: attempt_vmim_name(vmm, decide::current_attempt(status)),
            ..Default::default()
        },
        kubevirt_migration: None,
        vmi: None,
    };
    if status.phase.is_final() {
        return Ok(g);
    }
    let ns = vmm.namespace().unwrap_or_default();
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(ctx.client.clone(), &ns);
    g.kubevirt_migration = vmims.get_opt(&g.facts.kubevirt_migration).await?;
    g.facts.kubevirt_migration_exists = g.kubevirt_migration.is_some();
    if g.facts.kubevirt_migration_exists {
        return Ok(g);
    }
    g.vmi = match ctx.view.vmi(&ns, &vmm.spec.vmi_name) {
        Some(v) => Some(v),
        None => {
            let api: Api<VirtualMachineInstance> = Api::namespaced(ctx.client.clone(), &ns);
            api.get_opt(&vmm.spec.vmi_name).await?.map(Arc::new)
        }
    };
    g.facts.vmi = g.vmi.as_deref().map(|v| VmiFacts {
        phase: v
            .status
            .as_ref()
            .and_then(|s| s.phase.clone())
            .unwrap_or_default(),
        live_migratable: v.condition_true(LIVE_MIGRATABLE),
        migrating: v.is_migrating(),
        on_node: crate::view::convert::vm_request(v).is_some(),
    });
    Ok(g)
}

/// Gathers the facts, decides the next step, takes it.
async fn apply(vmm: Arc<VirtualMachineMigration>, ctx: &Context) -> Result<Action> {
    let mut status = vmm.status.clone().unwrap_or_default();
    if decide::rejected_spec_changed(vmm.metadata.generation, &status) {
        // The spec that could not be used was edited: start over with the new one.
        status = VirtualMachineMigrationStatus::default();
    }
    // This reconcile runs again: a failure it meets is marked anew.
    status.conditions.retain(|c| c.r#type != "ReconcileError");
    if !status.phase.is_final() {
        status.observed_generation = vmm.metadata.generation;
    }
    let ns = vmm.namespace().unwrap_or_default();
    let vm = VmKey::new(&ns, &vmm.spec.vmi_name);
    let gathered = gather(ctx, &vmm, &status).await?;
    match decide::next_step(&vmm.spec, &status, &vm.to_string(), &gathered.facts) {
        Step::Done | Step::StayPlanned => Ok(Action::await_change()),
        Step::Wait(reason) => {
            status.phase = MigrationPhase::Pending;
            status.reason = Some(reason);
            write_status(ctx, &vmm, &status).await?;
            Ok(Action::requeue(Duration::from_secs(5)))
        }
        Step::FinishCleanup => {
            paths::cleanup(ctx, &vmm, &mut status).await?;
            write_status(ctx, &vmm, &status).await?;
            Ok(Action::await_change())
        }
        Step::FollowMembers => follow_group(&vmm, ctx, status).await,
        Step::FollowKubevirt => match gathered.kubevirt_migration {
            Some(vmim) => follow_existing(&vmm, ctx, &vmim).await,
            None => Ok(Action::requeue(Duration::from_secs(1))),
        },
        Step::Fail { reason, message } => fail(ctx, &vmm, status, reason, message).await,
        Step::Plan(budget) => {
            let request = gathered
                .vmi
                .as_deref()
                .and_then(crate::view::convert::vm_request);
            match (gathered.vmi, request) {
                (Some(vmi), Some(request)) => {
                    plan_and_start(vmm, ctx, status, budget, &vmi, request).await
                }
                _ => Ok(Action::requeue(Duration::from_secs(1))),
            }
        }
    }
}

/// Follows a KubeVirt migration made for this request (possibly before a restart).
async fn follow_existing(
    vmm: &VirtualMachineMigration,
    ctx: &Context,
    vmim: &VirtualMachineInstanceMigration,
) -> Result<Action> {
    // The watch may not have delivered our own last status write yet; following from a stale
    // copy would drop fields (source, candidates, estimate) from the applied status.
    let api: Api<VirtualMachineMigration> =
        Api::namespaced(ctx.client.clone(), &vmm.namespace().unwrap_or_default());
    let fresh = api.get(&vmm.name_any()).await?;
    let mut status = fresh.status.clone().unwrap_or_default();
    if vmim.metadata.name.as_deref()
        != Some(attempt_vmim_name(&fresh, decide::current_attempt(&status)).as_str())
    {
        // The copy this reconcile started from was older than the request: that attempt has
        // been dealt with already. Start again from the fresh one.
        return Ok(Action::requeue(Duration::from_secs(1)));
    }
    status.observed_generation = fresh.metadata.generation;
    status.conditions.retain(|c| c.r#type != "ReconcileError");
    if status.source_node.is_none() {
        status.source_node = vmim
            .status
            .as_ref()
            .and_then(|s| s.migration_state.as_ref())
            .and_then(|m| m.source_node.clone());
    }
    follow(&fresh, ctx, status, vmim).await
}

/// Plans the request and, unless it is a dry run, starts it.
async fn plan_and_start(
    vmm: Arc<VirtualMachineMigration>,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
    budget: MigrationBudget,
    vmi: &VirtualMachineInstance,
    request: crate::plan::VmRequest,
) -> Result<Action> {
    let ns = vmm.namespace().unwrap_or_default();
    let vm = VmKey::new(&ns, &vmm.spec.vmi_name);
    let started = Instant::now();
    let planner = ctx.view.planner(true);
    let planned = run_planner(ctx, &planner, &vmm.spec, &mut status, vmi, request);
    let plan = match planned {
        Ok(p) => p,
        Err(e) => {
            return fail(
                ctx,
                &vmm,
                status,
                "PlanError",
                format!("planning {vm}: {e}"),
            )
            .await;
        }
    };
    ctx.metrics
        .plan_seconds
        .observe(started.elapsed().as_secs_f64());
    let summary = planner.vm_summary(&vm).cloned();
    status.source_node = Some(plan.source_node.clone());
    status.candidates = status::candidates(&plan, TOP_CANDIDATES);
    status.work_groups = status::work_groups(&plan, planner.snapshot().geometry.region_bytes());
    status.notes = plan.notes.clone();
    let decision = match estimate(ctx, &vmm, &budget, &plan, summary.as_ref(), &mut status) {
        Ok(d) => d,
        Err(e) => {
            return fail(
                ctx,
                &vmm,
                status,
                "InvalidTimeBudget",
                format!("time budget: {e}"),
            )
            .await;
        }
    };
    let Some(target_node) = plan.target_node.clone() else {
        if let Some((reason, message)) = decide::no_target_left(&status) {
            return fail(ctx, &vmm, status, reason, message).await;
        }
        status.phase = MigrationPhase::Pending;
        status.reason = Some("no node passes the minimum hardware configuration; retrying".into());
        set_condition(
            &mut status.conditions,
            condition(
                "Planned",
                false,
                "NoCandidate",
                status.reason.clone().unwrap_or_default(),
            ),
            &time::now_rfc3339(),
        );
        write_status(ctx, &vmm, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(30)));
    };
    status.target_node = Some(target_node.clone());
    status.target_work_group = plan.target_work_group.clone();
    let why = why_chosen(&plan);
    set_condition(
        &mut status.conditions,
        condition("Planned", true, "TargetChosen", &why),
        &time::now_rfc3339(),
    );

    // 3. Dry run stops here.
    if vmm.spec.dry_run {
        status.phase = MigrationPhase::Planned;
        status.reason = Some("dry run".into());
        write_status(ctx, &vmm, &status).await?;
        event(ctx, &vmm, false, "Planned", why).await;
        return Ok(Action::await_change());
    }

    let chosen = Chosen {
        source: plan.source_node.clone(),
        target: target_node,
        why,
    };
    start(&vmm, ctx, status, &budget, decision.as_ref(), chosen).await
}

/// The status of a cached digest, if it has one.
fn status_of(digest: &Option<Arc<NodeRegionDigest>>) -> Option<&NodeRegionDigestStatus> {
    digest.as_deref().and_then(|d| d.status.as_ref())
}

/// Each candidate's estimated time in status, as the chosen target's is made: its memory in
/// common, the transport the two relays allow, the rate from the source to it.
fn candidate_times(
    links: &SourceLinks,
    base: &crate::plan::estimate::EstimateInput,
    status: &mut VirtualMachineMigrationStatus,
) {
    for c in &mut status.candidates {
        if c.verdict == "Filtered" {
            continue;
        }
        let link = links.link(&c.node);
        let input =
            status::candidate_input(base, c.common_bytes, link.transport, link.bytes_per_second);
        c.estimated_seconds = status::seconds_for_status(&input);
    }
}

/// The time estimate of the planned move, with the network paths added while it exceeds the
/// request's time budget and the transport the two nodes' relays allow; written into
/// `status`. The path decision, or why the time budget cannot be used.
fn estimate(
    ctx: &Context,
    vmm: &VirtualMachineMigration,
    budget: &MigrationBudget,
    plan: &Plan,
    summary: Option<&VmRegionSummary>,
    status: &mut VirtualMachineMigrationStatus,
) -> std::result::Result<Option<PathDecision>, String> {
    let mut base = status::estimate_input(
        plan,
        summary.map_or(0.0, |s| s.dirty_rate),
        summary.map_or(0, |s| s.working_set_bytes),
        ctx.transfer,
    );
    let source = ctx.view.digest(&plan.source_node);
    let target = plan.target_node.as_deref().and_then(|t| ctx.view.digest(t));
    let (source_digest, target_digest) = (status_of(&source), status_of(&target));
    // What the source's relay measured on its last migration to the target's relay, over the
    // configured figure while it is recent enough; KubeVirt throttles the migration to its
    // bandwidthPerMigration, where one is set.
    let measured = status::measured_bandwidth(source_digest, target_digest, time::Timestamp::now());
    let vm = VmKey::new(vmm.namespace().unwrap_or_default(), &vmm.spec.vmi_name);
    let cap = ctx.view.bandwidth_cap(&vm);
    let choice = crate::plan::estimate::choose_bandwidth(
        ctx.transfer.bandwidth,
        measured.as_ref().map(|m| m.0),
        ctx.transfer.measured_rate_max_age,
        cap.as_ref(),
    );
    let bandwidth_reason = status::bandwidth_reason(
        &choice,
        ctx.transfer.bandwidth,
        ctx.transfer.measured_rate_max_age,
        plan.target_node.as_deref().unwrap_or_default(),
        measured.as_ref().map(|m| m.1.as_str()),
        cap.as_ref(),
    );
    status.notes.push(format!("estimate at {bandwidth_reason}"));
    base.bandwidth = choice.bytes_per_second;
    let (transport, transport_reason) = match plan.target_node.as_deref() {
        Some(target) => status::transport(
            (&plan.source_node, source_digest),
            (target, target_digest),
            ctx.view.kubevirt_blocks_relay(),
        ),
        None => (base.transport, "no target yet".to_string()),
    };
    base.transport = transport;
    let links = SourceLinks::new(&ctx.view, ctx.transfer, cap, &plan.source_node);
    candidate_times(&links, &base, status);
    // Add network paths while the estimate exceeds the time budget.
    let (decided, ignored_networks) =
        paths::decide(ctx, vmm, budget, plan, &base, ctx.transfer.cores_per_gbps);
    status.notes.extend(ignored_networks);
    let decision = decided.transpose()?;
    let mut with_paths = base;
    if let Some(d) = &decision {
        with_paths.bandwidth = d.bandwidth;
        let (ok, reason, message) = decide::time_budget(d);
        set_condition(
            &mut status.conditions,
            condition("TimeBudget", ok, reason, message),
            &time::now_rfc3339(),
        );
    }
    let mut estimate = status::estimate_status(
        plan,
        &with_paths,
        decision
            .as_ref()
            .map(|d| d.added.clone())
            .unwrap_or_default(),
    );
    estimate.transport_reason = transport_reason;
    estimate.bandwidth_bytes_per_second = Some(choice.bytes_per_second.round() as u64);
    estimate.bandwidth_source = format!("{:?}", choice.source);
    estimate.bandwidth_reason = bandwidth_reason;
    status.estimate = Some(estimate);
    Ok(decision)
}

/// Plans the request, with its memory group when the spec asks for it (`Together` plans the
/// whole group onto one node). Fills in the group's members on the first plan.
fn run_planner(
    ctx: &Context,
    planner: &crate::plan::Planner,
    spec: &crate::api::migration::VirtualMachineMigrationSpec,
    status: &mut VirtualMachineMigrationStatus,
    vmi: &VirtualMachineInstance,
    request: crate::plan::VmRequest,
) -> Result<crate::plan::Plan, crate::plan::PlanError> {
    let mut opts = decide::plan_options(spec, status);
    let group_mode = spec.group.unwrap_or_default();
    let group: Vec<Arc<VirtualMachineInstance>> = match group_mode {
        GroupMode::None => Vec::new(),
        GroupMode::Together | GroupMode::Follow => groups::members(ctx, vmi),
    };
    if status.members.is_empty() {
        status.members = group
            .iter()
            .map(|m| MemberStatus {
                name: m.name_any(),
                phase: "Waiting".into(),
                ..Default::default()
            })
            .collect();
    }
    if group_mode == GroupMode::Together && !group.is_empty() {
        let mut requests = vec![request];
        requests.extend(
            group
                .iter()
                .filter_map(|m| crate::view::convert::vm_request(m)),
        );
        planner.plan_group(&requests, &opts)
    } else {
        // Between candidates with similar memory in common, the shorter move goes first. A
        // group moving together is ranked on memory, KSM and load only: its members' links
        // and activity are not one VM's.
        let cap = ctx.view.bandwidth_cap(&request.vm);
        let summary = request
            .summary
            .as_ref()
            .or_else(|| planner.vm_summary(&request.vm));
        opts.move_links = Some(
            SourceLinks::new(&ctx.view, ctx.transfer, cap, &request.source_node).move_links(
                &request,
                summary,
                planner.snapshot().geometry.region_bytes(),
            ),
        );
        planner.plan(&request, &opts)
    }
}

/// The chosen target in words: the node, its work group and the bytes already there.
fn why_chosen(plan: &crate::plan::Plan) -> String {
    use crate::plan::hardware::human_bytes;
    plan.target()
        .map(|c| {
            format!(
                "target {} in work group {}: {} of {} already there, {} to move",
                c.node,
                c.work_group,
                human_bytes(plan.bytes.common),
                human_bytes(plan.bytes.total),
                human_bytes(plan.bytes.to_move)
            )
        })
        .unwrap_or_default()
}

/// Where the planner sends the VM, and why, in words.
struct Chosen {
    source: String,
    target: String,
    why: String,
}

/// Brings the extra paths up, waits for KubeVirt's parallel limits, then creates the KubeVirt
/// migration (and, for `group: Together`, the members').
async fn start(
    vmm: &VirtualMachineMigration,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
    budget: &MigrationBudget,
    decision: Option<&PathDecision>,
    chosen: Chosen,
) -> Result<Action> {
    let Chosen {
        source,
        target,
        why,
    } = chosen;
    let attempt = decide::current_attempt(&status);
    let name = attempt_vmim_name(vmm, attempt);
    if let Some(d) = decision {
        let ready = paths::activate(ctx, vmm, &mut status, d).await?;
        if !ready {
            let waited = status
                .paths
                .iter()
                .filter_map(|p| p.added_time.as_deref())
                .filter_map(time::parse_rfc3339)
                .map(|t| time::elapsed(t, time::Timestamp::now()).as_secs() as i64)
                .max()
                .unwrap_or(0);
            if decide::keep_waiting_for_paths(waited, budget) {
                status.phase = MigrationPhase::PreparingPaths;
                status.reason = Some(format!(
                    "waiting for paths {} to be ready",
                    d.added.join(", ")
                ));
                write_status(ctx, vmm, &status).await?;
                return Ok(Action::requeue(Duration::from_secs(2)));
            }
            status.notes.push(format!(
                "paths not ready after {waited}s; migrating without them"
            ));
            paths::cleanup(ctx, vmm, &mut status).await?;
        }
    }
    let mut admitted = ctx.admission.lock().await;
    let limits = ctx.view.migration_limits();
    let (running, per_node) = ctx.view.running_migrations();
    // Migrations created by us that the watch has not reported yet.
    admitted.retain(|(n, _)| {
        !ctx.view
            .vmims
            .state()
            .iter()
            .any(|m| m.metadata.name.as_deref() == Some(n.as_str()))
    });
    let waiting = must_wait(limits, running, &per_node, &admitted, &source);
    if let Some(reason) = waiting {
        drop(admitted);
        status.phase = MigrationPhase::Pending;
        status.reason = Some(reason);
        write_status(ctx, vmm, &status).await?;
        return Ok(Action::requeue(Duration::from_secs(5)));
    }
    if create_kubevirt_migration(ctx, vmm, &name, &vmm.spec.vmi_name, &target).await? {
        admitted.push((name.clone(), source.clone()));
    }
    drop(admitted);
    if vmm.spec.group == Some(GroupMode::Together) {
        // The whole group goes to the same node now (KubeVirt's limits apply per VMI; the
        // group is one decision).
        for m in &mut status.members {
            m.kubevirt_migration =
                Some(groups::start_member(ctx, vmm, &m.name, &target, attempt).await?);
            m.start_time.get_or_insert_with(time::now_rfc3339);
            m.reason = "moves together with the requested VM".into();
        }
    }
    status.phase = MigrationPhase::Migrating;
    status.reason = None;
    status.kubevirt_migration = Some(name.clone());
    status.kubevirt_phase = None;
    status.failure_reason = None;
    status.start_time.get_or_insert_with(time::now_rfc3339);
    decide::record_start(&mut status, &name, &target, &time::now_rfc3339());
    if let Some(e) = &status.estimate {
        ctx.metrics.planned_bytes_to_move.inc_by(e.to_move_bytes);
        ctx.metrics.planned_bytes_saved.inc_by(e.common_bytes);
    }
    write_status(ctx, vmm, &status).await?;
    event(
        ctx,
        vmm,
        false,
        "MigrationCreated",
        format!("created KubeVirt migration {name}; {why}"),
    )
    .await;
    Ok(Action::requeue(Duration::from_secs(30)))
}

/// Why a new KubeVirt migration leaving `source` must wait for KubeVirt's parallel limits, if
/// it must. `running`/`per_node` are what the watch shows; `admitted` (name, source) are the
/// migrations created since that the watch has not shown yet, counted against both limits.
pub fn must_wait(
    limits: crate::view::MigrationLimits,
    running: u32,
    per_node: &std::collections::HashMap<String, u32>,
    admitted: &[(String, String)],
    source: &str,
) -> Option<String> {
    let running = running + admitted.len() as u32;
    let outbound = per_node.get(source).copied().unwrap_or(0)
        + admitted.iter().filter(|(_, s)| s == source).count() as u32;
    if running >= limits.per_cluster {
        Some(format!("waiting: {running} migrations running, KubeVirt allows parallelMigrationsPerCluster={}", limits.per_cluster))
    } else if outbound >= limits.outbound_per_node {
        Some(format!("waiting: {outbound} migrations leaving {source}, KubeVirt allows parallelOutboundMigrationsPerNode={}", limits.outbound_per_node))
    } else {
        None
    }
}

/// Mirrors the KubeVirt migration's progress into our status.
async fn follow(
    vmm: &VirtualMachineMigration,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
    vmim: &VirtualMachineInstanceMigration,
) -> Result<Action> {
    let ns = vmm.namespace().unwrap_or_default();
    let state = vmim
        .status
        .as_ref()
        .and_then(|s| s.migration_state.clone())
        .or_else(|| {
            // The VMI's state, when it is this migration's (an earlier migration's state
            // would name another target).
            ctx.view
                .vmi(&ns, &vmm.spec.vmi_name)
                .and_then(|v| v.status.as_ref().and_then(|s| s.migration_state.clone()))
                .filter(|m| m.migration_uid.is_none() || m.migration_uid == vmim.metadata.uid)
        })
        .unwrap_or_default();
    status.kubevirt_migration = vmim.metadata.name.clone();
    status.kubevirt_phase = vmim.phase().map(str::to_string);
    let name = vmim.metadata.name.clone().unwrap_or_default();
    // The node this attempt was pinned to (a restart between the create and the status write
    // leaves no record yet: the migration's own selector names it).
    let pinned = status
        .attempts
        .iter()
        .find(|a| a.kubevirt_migration == name)
        .map(|a| a.node.clone())
        .or_else(|| {
            vmim.spec
                .added_node_selector
                .as_ref()
                .and_then(|s| s.get(crate::api::kubevirt::HOSTNAME_LABEL).cloned())
        })
        .or_else(|| status.target_node.clone())
        .unwrap_or_default();
    let started = state
        .start_timestamp
        .clone()
        .unwrap_or_else(time::now_rfc3339);
    decide::record_start(&mut status, &name, &pinned, &started);
    if let Some(t) = &state.start_timestamp {
        status.start_time = Some(t.clone());
    }
    if let Some(t) = &state.target_node {
        status.target_node = Some(t.clone());
    }
    // Together: the request ends when every member's migration has ended.
    let members = (vmm.spec.group == Some(GroupMode::Together) && !status.members.is_empty())
        .then(|| groups::refresh_members(ctx, &ns, &mut status.members));
    match decide::progress(vmim.phase(), members) {
        Progress::Succeeded => {
            paths::cleanup(ctx, vmm, &mut status).await?;
            status.phase = MigrationPhase::Succeeded;
            status.reason = None;
            status.end_time = state
                .end_timestamp
                .clone()
                .or_else(|| Some(time::now_rfc3339()));
            let ended = status.end_time.clone().unwrap_or_default();
            decide::record_end(
                &mut status,
                &name,
                &pinned,
                AttemptOutcome::Succeeded,
                String::new(),
                &ended,
            );
            let vm = VmKey::new(&ns, &vmm.spec.vmi_name);
            let (source, target) = (
                status.source_node.clone().unwrap_or_default(),
                status.target_node.clone().unwrap_or_default(),
            );
            let digests: Api<NodeRegionDigest> = Api::all(ctx.client.clone());
            match republish_after_migration(&digests, &ctx.view, &vm, &source, &target).await {
                Ok(true) => ctx.metrics.digests_republished.inc(),
                Ok(false) => {}
                Err(e) => tracing::warn!(error = %e, "could not republish digests after migration"),
            }
            set_condition(
                &mut status.conditions,
                condition(
                    "Succeeded",
                    true,
                    "MigrationSucceeded",
                    format!("{vm} now runs on {target}"),
                ),
                &time::now_rfc3339(),
            );
            if let (Some(s), Some(e)) = (&status.start_time, &status.end_time) {
                if let (Some(s), Some(e)) = (time::parse_rfc3339(s), time::parse_rfc3339(e)) {
                    ctx.metrics
                        .migration_seconds
                        .observe(time::elapsed(s, e).as_secs_f64());
                }
            }
            write_status(ctx, vmm, &status).await?;
            ctx.metrics
                .migrations
                .with_label_values(&["succeeded"])
                .inc();
            event(
                ctx,
                vmm,
                false,
                "MigrationSucceeded",
                format!("{vm} migrated from {source} to {target}"),
            )
            .await;
            Ok(Action::await_change())
        }
        Progress::Failed if vmim.phase() != Some("Failed") => {
            // Together: the requested VM moved, a member's migration failed.
            status.failure_reason = Some("a group member's migration failed".to_string());
            status.end_time = state.end_timestamp.clone();
            let msg = "KubeVirt migration failed: a group member's migration failed".to_string();
            fail(ctx, vmm, status, "KubevirtMigrationFailed", msg).await
        }
        Progress::Failed => {
            let end = decide::AttemptEnd {
                phases: vmim
                    .status
                    .as_ref()
                    .map(|s| {
                        s.phase_transition_timestamps
                            .iter()
                            .map(|p| p.phase.clone())
                            .collect()
                    })
                    .unwrap_or_default(),
                target_node: state.target_node.clone(),
                failure_reason: state.failure_reason.clone(),
                abort_requested: state.abort_requested.unwrap_or(false),
            };
            // Together: the group moves again only as a whole, once every member's migration
            // of this attempt has ended, and only while every member is still on the source.
            let split = if vmm.spec.group == Some(GroupMode::Together) && !status.members.is_empty()
            {
                let source = status.source_node.clone().unwrap_or_default();
                let members = groups::member_attempts(ctx, &ns, &source, &status.members);
                match decide::group_after_failure(&members) {
                    decide::GroupAfterFailure::Wait(why) => {
                        status.phase = MigrationPhase::Migrating;
                        status.reason = Some(why);
                        write_status(ctx, vmm, &status).await?;
                        return Ok(Action::requeue(Duration::from_secs(2)));
                    }
                    decide::GroupAfterFailure::Intact => None,
                    decide::GroupAfterFailure::Split(why) => Some(why),
                }
            } else {
                None
            };
            let verdict =
                decide::failed_attempt(&vmm.spec, &status, &pinned, &end, split.as_deref());
            status.failure_reason = state.failure_reason.clone();
            let ended = state
                .end_timestamp
                .clone()
                .unwrap_or_else(time::now_rfc3339);
            decide::record_end(
                &mut status,
                &name,
                &pinned,
                AttemptOutcome::Failed,
                verdict.why.clone(),
                &ended,
            );
            if !verdict.replan {
                status.end_time = state.end_timestamp.clone();
                return fail(ctx, vmm, status, "KubevirtMigrationFailed", verdict.message).await;
            }
            replan(vmm, ctx, status, verdict.message).await
        }
        Progress::Running(phase) => {
            status.phase = MigrationPhase::Migrating;
            status.reason = phase.map(|p| format!("KubeVirt phase {p}"));
            write_status(ctx, vmm, &status).await?;
            Ok(Action::requeue(Duration::from_secs(30)))
        }
    }
}

/// A failed attempt to be tried again elsewhere: its paths come down, the request goes back to
/// `Pending` with the attempt recorded, and the next reconcile plans without the node (the
/// next attempt's KubeVirt migration has a name of its own, made only now that this one is
/// final).
async fn replan(
    vmm: &VirtualMachineMigration,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
    message: String,
) -> Result<Action> {
    paths::cleanup(ctx, vmm, &mut status).await?;
    // The next attempt sets up the paths its own target needs.
    status.paths.retain(|p| p.removed_time.is_none());
    // Together: the members move again with the requested VM, by migrations of the next
    // attempt's own names.
    if vmm.spec.group == Some(GroupMode::Together) {
        for m in &mut status.members {
            m.kubevirt_migration = None;
            m.phase = "Waiting".into();
            m.start_time = None;
            m.reason = String::new();
        }
    }
    status.phase = MigrationPhase::Pending;
    status.reason = Some(message.clone());
    set_condition(
        &mut status.conditions,
        condition("Planned", false, "AttemptFailed", &message),
        &time::now_rfc3339(),
    );
    write_status(ctx, vmm, &status).await?;
    ctx.metrics.migrations.with_label_values(&["retried"]).inc();
    event(ctx, vmm, true, "AttemptFailed", message).await;
    Ok(Action::requeue(Duration::from_secs(1)))
}

/// Follow: after the requested VM moved, members that touch the shared memory
/// follow it to the same node; the shared transfer completes when the members left on the
/// source fall to the threshold.
async fn follow_group(
    vmm: &VirtualMachineMigration,
    ctx: &Context,
    mut status: VirtualMachineMigrationStatus,
) -> Result<Action> {
    let ns = vmm.namespace().unwrap_or_default();
    let (Some(source), Some(target)) = (status.source_node.clone(), status.target_node.clone())
    else {
        return Ok(Action::await_change());
    };
    let waiting: Vec<String> = status
        .members
        .iter()
        .filter(|m| m.kubevirt_migration.is_none())
        .map(|m| m.name.clone())
        .collect();
    for name in groups::touched_shared_memory(ctx, &source, &ns, &waiting) {
        let vmim = groups::start_member(ctx, vmm, &name, &target, 1).await?;
        if let Some(m) = status.members.iter_mut().find(|m| m.name == name) {
            m.kubevirt_migration = Some(vmim);
            m.start_time = Some(time::now_rfc3339());
            m.reason = format!("touched the shared memory on {source} after the first VM moved");
        }
        event(
            ctx,
            vmm,
            false,
            "MemberFollows",
            format!("{name} touched the shared memory; migrating it to {target}"),
        )
        .await;
    }
    groups::refresh_members(ctx, &ns, &mut status.members);
    let still_on_source = status
        .members
        .iter()
        .filter(|m| {
            ctx.view
                .vmi(&ns, &m.name)
                .and_then(|v| v.node_name().map(str::to_string))
                .as_deref()
                == Some(source.as_str())
        })
        .count();
    let complete = groups::follow_complete(still_on_source, groups::FOLLOW_REMAINING_THRESHOLD);
    let deadline = super::validate::follow_deadline(&vmm.spec)
        .unwrap_or(super::validate::DEFAULT_FOLLOW_DEADLINE);
    if !complete
        && decide::follow_deadline_passed(
            status.end_time.as_deref(),
            deadline,
            time::Timestamp::now(),
        )
    {
        let left: Vec<&str> = status
            .members
            .iter()
            .filter(|m| m.kubevirt_migration.is_none())
            .map(|m| m.name.as_str())
            .collect();
        let message = format!(
            "stopped following after {}s: {} stayed on {source} ({})",
            deadline.as_secs(),
            left.len(),
            left.join(", ")
        );
        set_condition(
            &mut status.conditions,
            condition(
                decide::FOLLOW_DEADLINE_PASSED,
                true,
                "DeadlinePassed",
                &message,
            ),
            &time::now_rfc3339(),
        );
        write_status(ctx, vmm, &status).await?;
        event(ctx, vmm, true, "FollowDeadlinePassed", message).await;
        return Ok(Action::await_change());
    }
    set_condition(
        &mut status.conditions,
        condition(
            "SharedTransferComplete",
            complete,
            if complete {
                "MembersMoved"
            } else {
                "MembersOnSource"
            },
            format!("{still_on_source} group member(s) still on {source}"),
        ),
        &time::now_rfc3339(),
    );
    write_status(ctx, vmm, &status).await?;
    Ok(if complete {
        Action::await_change()
    } else {
        Action::requeue(Duration::from_secs(5))
    })
}

/// Deleting a request whose migration is not final deletes the KubeVirt migration, which makes
/// KubeVirt abort it.
async fn cleanup(vmm: Arc<VirtualMachineMigration>, ctx: &Context) -> Result<Action> {
    let ns = vmm.namespace().unwrap_or_default();
    let vmims: Api<VirtualMachineInstanceMigration> = Api::namespaced(ctx.client.clone(), &ns);
    let mut status = vmm.status.clone().unwrap_or_default();
    paths::cleanup(ctx, &vmm, &mut status).await?;
    // The current attempt's, and any earlier one a stale status may not show as ended.
    let mut names: Vec<String> = status
        .attempts
        .iter()
        .map(|a| a.kubevirt_migration.clone())
        .collect();
    names.push(attempt_vmim_name(&vmm, decide::current_attempt(&status)));
    names.dedup();
    for name in names {
        let Some(vmim) = vmims.get_opt(&name).await? else {
            continue;
        };
        if !vmim.is_final() && vmim.metadata.deletion_timestamp.is_none() {
            vmims.delete(&name, &DeleteParams::background()).await?;
            ctx.metrics
                .migrations
                .with_label_values(&["cancelled"])
                .inc();
            event(
                ctx,
                &vmm,
                false,
                "MigrationAborted",
                format!("deleted unfinished KubeVirt migration {name}; KubeVirt aborts it"),
            )
            .await;
        }
    }
    Ok(Action::await_change())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::migration::VirtualMachineMigrationSpec;
    use crate::controller::kubevirt::vmim_name;

    #[test]
    fn migrations_created_but_not_yet_watched_count_against_both_limits() {
        let limits = crate::view::MigrationLimits {
            per_cluster: 5,
            outbound_per_node: 2,
        };
        let none = std::collections::HashMap::new();
        let created = |sources: &[&str]| -> Vec<(String, String)> {
            sources
                .iter()
                .enumerate()
                .map(|(i, s)| (format!("m{i}"), s.to_string()))
                .collect()
        };
        // Two just created from src, the watch shows neither: a third from src waits.
        let why = must_wait(limits, 0, &none, &created(&["src", "src"]), "src").unwrap();
        assert!(why.contains("2 migrations leaving src"), "{why}");
        // Another source is not held by src's migrations.
        assert_eq!(
            must_wait(limits, 0, &none, &created(&["src", "src"]), "other"),
            None
        );
        // Watched and unwatched add up, per node and in the cluster.
        let watched = std::collections::HashMap::from([("src".to_string(), 1)]);
        assert!(must_wait(limits, 1, &watched, &created(&["src"]), "src").is_some());
        let why = must_wait(limits, 3, &none, &created(&["a", "b"]), "c").unwrap();
        assert!(why.contains("5 migrations running"), "{why}");
    }

    fn vmm(name: &str, uid: &str) -> VirtualMachineMigration {
        let mut v = VirtualMachineMigration::new(
            name,
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
        v.metadata.uid = Some(uid.into());
        v
    }

    #[test]
    fn kubevirt_migration_name_is_deterministic_per_request() {
        let a = vmm("move-db", "0a1b2c3d-4e5f-6789-abcd-ef0123456789");
        assert_eq!(vmim_name(&a), "cg-move-db-0a1b2c3d");
        assert_eq!(vmim_name(&a), vmim_name(&a.clone()));
        let b = vmm("move-db", "ffffffff-4e5f-6789-abcd-ef0123456789");
        assert_ne!(
            vmim_name(&a),
            vmim_name(&b),
            "a re-created request gets a new migration"
        );
        let long = vmm(&"x".repeat(253), "0a1b2c3d");
        assert!(vmim_name(&long).len() <= 253);
    }
}
