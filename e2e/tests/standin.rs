//! The KubeVirt stand-in against the real control plane: VMIs start through the real
//! kube-scheduler, VMIMs are placed by it and walk to Succeeded, injected failures end as
//! KubeVirt would end them, and a restarted stand-in finishes what it started.

use std::collections::BTreeMap;

use anyhow::Context;
use std::time::Duration;

use commonground::api::kubevirt::{
    VirtualMachineInstance, VirtualMachineInstanceMigration, VmimSpec, CREATED_BY_LABEL,
    HOSTNAME_LABEL, LIVE_MIGRATABLE, MIGRATION_JOB_NAME_ANNOTATION, MIGRATION_JOB_UID_LABEL,
};
use commonground_e2e::memory::{self, MIB, PAGE_SIZE};
use commonground_e2e::standin::{self, pods::NEVER_SCHEDULE_KEY};
use commonground_e2e::{wait_for, wait_for_object, FakeNode, TestCluster, TestNamespace};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::{Api, ResourceExt};

const T: Duration = Duration::from_secs(30);

async fn running_vmi(ns: &TestNamespace, name: &str) -> anyhow::Result<VirtualMachineInstance> {
    let vmis: Api<VirtualMachineInstance> = ns.api();
    wait_for_object(&vmis, name, T, "VMI Running", |v| {
        v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
}

async fn final_vmim(
    ns: &TestNamespace,
    name: &str,
) -> anyhow::Result<VirtualMachineInstanceMigration> {
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    // Final and its finalizer gone: virt-controller copies the VMI's migrationState into the
    // VMIM in the same pass that removes the finalizer, one pass after the phase went final.
    wait_for_object(&vmims, name, T, "VMIM Succeeded or Failed", |m| {
        m.is_final() && m.finalizers().is_empty()
    })
    .await
}

/// The migration's target pod, found by its label (virt-controller names it on the VMIM only
/// once the migration is final).
async fn target_pod_of(
    ns: &TestNamespace,
    vmim: &VirtualMachineInstanceMigration,
) -> anyhow::Result<String> {
    let uid = vmim.uid().unwrap_or_default();
    let pods: Api<Pod> = ns.api();
    pods.list(&ListParams::default().labels(&format!("{MIGRATION_JOB_UID_LABEL}={uid}")))
        .await?
        .items
        .first()
        .map(|p| p.name_any())
        .with_context(|| format!("target pod of {}", vmim.name_any()))
}

async fn vmim_phase(
    ns: &TestNamespace,
    name: &str,
    phase: &str,
) -> anyhow::Result<VirtualMachineInstanceMigration> {
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    wait_for_object(&vmims, name, T, phase, |m| m.phase() == Some(phase)).await
}

/// The VMI's live virt-launcher pods. Finished ones are left out: KubeVirt's virt-controller
/// leaves a launcher whose domain left (the source after a migration, the target of a failed
/// one) in place as `Succeeded`/`Failed`, where the stand-in deletes it.
async fn launcher_pods(
    ns: &TestNamespace,
    vmi: &VirtualMachineInstance,
) -> anyhow::Result<Vec<Pod>> {
    let pods: Api<Pod> = ns.api();
    let uid = vmi.uid().unwrap_or_default();
    Ok(pods
        .list(&ListParams::default().labels(&format!("{CREATED_BY_LABEL}={uid}")))
        .await?
        .items
        .into_iter()
        .filter(|p| !pod_finished(p))
        .collect())
}

fn pod_finished(p: &Pod) -> bool {
    matches!(
        p.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Succeeded" | "Failed")
    )
}

/// The pod was deleted, or (real virt-controller) its containers ended.
async fn pod_gone_or_finished(pods: &Api<Pod>, name: &str) -> anyhow::Result<bool> {
    Ok(pods.get_opt(name).await?.is_none_or(|p| pod_finished(&p)))
}

fn pod_node(p: &Pod) -> Option<&str> {
    p.spec.as_ref()?.node_name.as_deref()
}

/// Three nodes in two work groups.
async fn three_nodes(ns: &TestNamespace) -> anyhow::Result<Vec<String>> {
    let mut names = Vec::new();
    for (s, wg) in [("a", "wg-1"), ("b", "wg-1"), ("c", "wg-2")] {
        let n = ns.node_name(s);
        ns.create_fake_node(FakeNode::new(&n, wg)).await?;
        names.push(n);
    }
    Ok(names)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmi_starts_on_a_fitting_fake_node_via_the_real_scheduler() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmi-start").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let small = ns.node_name("small");
    let big = ns.node_name("big");
    ns.create_fake_node(FakeNode::new(&small, "wg-1").capacity("1", "2Gi"))
        .await?;
    ns.create_fake_node(FakeNode::new(&big, "wg-1").capacity("8", "32Gi"))
        .await?;

    // Requests 4 CPUs and 8 GiB: only `big` fits, so the real scheduler must pick it.
    ns.create_vmi(ns.vmi("vm", "8Gi", "4")).await?;
    let vmi = running_vmi(&ns, "vm").await?;
    let st = vmi.status.clone().unwrap();
    assert_eq!(st.node_name.as_deref(), Some(big.as_str()));
    assert!(vmi.condition_true("Ready"));
    assert!(vmi.condition_true(LIVE_MIGRATABLE));
    assert_eq!(vmi.labels().get("kubevirt.io/nodeName"), Some(&big));

    let pods = launcher_pods(&ns, &vmi).await?;
    assert_eq!(pods.len(), 1, "one virt-launcher pod");
    let pod = &pods[0];
    assert_eq!(
        pod.labels().get("kubevirt.io").map(String::as_str),
        Some("virt-launcher")
    );
    assert_eq!(pod_node(pod), Some(big.as_str()));
    assert_eq!(
        pod.status.as_ref().and_then(|s| s.phase.as_deref()),
        Some("Running")
    );
    let spec = pod.spec.as_ref().unwrap();
    let req = spec.containers[0]
        .resources
        .as_ref()
        .unwrap()
        .requests
        .as_ref()
        .unwrap();
    assert_eq!(req["cpu"].0, "4");
    if ns.cluster.real_virt_controller {
        // virt-controller adds the launcher's overhead to the guest memory, and its own
        // `kubevirt.io/schedulable` node selector to the VMI's.
        let mem = standin::pods::parse_quantity(&req["memory"].0).unwrap();
        assert!(mem > 8.0 * (1u64 << 30) as f64, "{:?}", req["memory"]);
        let sel = spec.node_selector.clone().unwrap();
        for (k, v) in vmi.spec.node_selector.clone().unwrap() {
            assert_eq!(sel.get(&k), Some(&v));
        }
        assert_eq!(
            sel.get("kubevirt.io/schedulable").map(String::as_str),
            Some("true")
        );
    } else {
        assert_eq!(req["memory"].0, "8Gi");
        assert_eq!(spec.node_selector, vmi.spec.node_selector);
    }
    // Bound by kube-scheduler, not by us: its PodScheduled condition says so.
    let scheduled = pod.status.as_ref().unwrap().conditions.as_ref().unwrap();
    assert!(scheduled
        .iter()
        .any(|c| c.type_ == "PodScheduled" && c.status == "True"));
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmi_that_fits_nowhere_stays_scheduling() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmi-nofit").await?;
    let _standin = ns.start_standin(ns.standin_config());
    ns.create_fake_node(FakeNode::new(ns.node_name("a"), "wg-1").capacity("2", "4Gi"))
        .await?;
    ns.create_vmi(ns.vmi("huge", "64Gi", "1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    let vmi = wait_for_object(&vmis, "huge", T, "PodScheduled=False on the VMI", |v| {
        v.status.as_ref().is_some_and(|s| {
            s.phase.as_deref() == Some("Scheduling")
                && s.conditions.iter().any(|c| {
                    c.r#type == "PodScheduled"
                        && c.status == "False"
                        && c.reason.as_deref() == Some("Unschedulable")
                })
        })
    })
    .await?;
    assert_eq!(vmi.node_name(), None);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmim_is_placed_off_the_source_and_walks_to_succeeded() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-ok").await?;
    // 4 GiB at 1 GiB/s, time scale 0.25: the transfer takes 1 s of wall clock.
    let mut cfg = ns.standin_config();
    cfg.bandwidth_bytes_per_sec = (1u64 << 30) as f64;
    cfg.time_scale = 0.25;
    let _standin = ns.start_standin(cfg);
    three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "4Gi", "1")).await?;
    let vmi = running_vmi(&ns, "vm").await?;
    let source = vmi.node_name().unwrap().to_string();
    let source_pod = launcher_pods(&ns, &vmi).await?.remove(0).name_any();

    let vmim = ns.create_vmim("mig", "vm", &[]).await?;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    let done = wait_for_object(&vmims, "mig", T, "final, finalizer removed", |m| {
        m.is_final() && m.finalizers().is_empty()
    })
    .await?;
    assert_eq!(done.phase(), Some("Succeeded"), "{:?}", done.status);
    let ms = done.status.clone().unwrap().migration_state.unwrap();
    let target = ms.target_node.clone().unwrap();
    assert_ne!(target, source, "never the source node");
    assert_eq!(ms.source_node.as_deref(), Some(source.as_str()));
    assert!(ms.completed && !ms.failed);
    assert_eq!(ms.migration_uid, vmim.uid());
    assert_eq!(ms.mode.as_deref(), Some("PreCopy"));

    // The phase walk, as recorded by the stand-in.
    let raw: Api<kube::api::DynamicObject> = Api::namespaced_with(
        ns.client.clone(),
        &ns.name,
        &kube::api::ApiResource::erase::<VirtualMachineInstanceMigration>(&()),
    );
    let obj = raw.get("mig").await?;
    let phases: Vec<&str> = obj.data["status"]["phaseTransitionTimestamps"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["phase"].as_str().unwrap())
        .collect();
    // virt-controller records Pending too; the stand-in starts at Scheduling.
    let phases: Vec<&str> = if ns.cluster.real_virt_controller {
        assert_eq!(phases.first(), Some(&"Pending"));
        phases[1..].to_vec()
    } else {
        phases
    };
    assert_eq!(
        phases,
        [
            "Scheduling",
            "Scheduled",
            "PreparingTarget",
            "TargetReady",
            "Running",
            "Succeeded"
        ]
    );

    // The VMI moved, its migrationState matches, the transfer took bytes / bandwidth.
    let vmis: Api<VirtualMachineInstance> = ns.api();
    let vmi = vmis.get("vm").await?;
    let st = vmi.status.clone().unwrap();
    assert_eq!(st.node_name.as_deref(), Some(target.as_str()));
    assert_eq!(vmi.labels().get("kubevirt.io/nodeName"), Some(&target));
    let vms = st.migration_state.unwrap();
    assert_eq!(vms.target_node.as_deref(), Some(target.as_str()));
    assert_eq!(vms.source_node.as_deref(), Some(source.as_str()));
    assert_eq!(vms.target_pod, ms.target_pod);
    assert_eq!(vms.migration_uid, vmim.uid());
    assert!(vms.completed && !vms.failed);
    let ts =
        |s: &Option<String>| chrono::DateTime::parse_from_rfc3339(s.as_deref().unwrap()).unwrap();
    let took = ts(&vms.end_timestamp) - ts(&vms.start_timestamp);
    assert!(
        took >= chrono::Duration::milliseconds(950),
        "transfer took {took}"
    );

    // The target pod is KubeVirt-shaped, bound to the target; the source pod is gone.
    let pods = launcher_pods(&ns, &vmi).await?;
    assert_eq!(
        pods.len(),
        1,
        "{:?}",
        pods.iter().map(|p| p.name_any()).collect::<Vec<_>>()
    );
    let tp = &pods[0];
    assert_ne!(tp.name_any(), source_pod);
    assert_eq!(Some(tp.name_any()), ms.target_pod);
    assert_eq!(pod_node(tp), Some(target.as_str()));
    assert_eq!(
        tp.labels().get(MIGRATION_JOB_UID_LABEL),
        vmim.uid().as_ref()
    );
    assert_eq!(
        tp.annotations()
            .get(MIGRATION_JOB_NAME_ANNOTATION)
            .map(String::as_str),
        Some("mig")
    );
    let anti = tp
        .spec
        .as_ref()
        .unwrap()
        .affinity
        .as_ref()
        .unwrap()
        .pod_anti_affinity
        .as_ref()
        .unwrap();
    let term = &anti
        .required_during_scheduling_ignored_during_execution
        .as_ref()
        .unwrap()[0];
    assert_eq!(term.topology_key, HOSTNAME_LABEL);
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn added_node_selector_pins_the_target_and_the_vmi_can_migrate_again() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-pin").await?;
    let _standin = ns.start_standin(ns.standin_config());
    let nodes = three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let vmi = running_vmi(&ns, "vm").await?;
    let source = vmi.node_name().unwrap().to_string();
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    let mut here = source.clone();
    // Two pinned migrations in a row: to a chosen node, then back to the first.
    for (i, pin) in [
        nodes.iter().find(|n| **n != source).unwrap().clone(),
        source.clone(),
    ]
    .into_iter()
    .enumerate()
    {
        let name = format!("pin-{i}");
        let m = VirtualMachineInstanceMigration::new(
            &name,
            VmimSpec {
                vmi_name: "vm".into(),
                added_node_selector: Some(BTreeMap::from([(
                    HOSTNAME_LABEL.to_string(),
                    pin.clone(),
                )])),
            },
        );
        vmims.create(&PostParams::default(), &m).await?;
        let done = final_vmim(&ns, &name).await?;
        assert_eq!(done.phase(), Some("Succeeded"), "{:?}", done.status);
        let ms = done.status.unwrap().migration_state.unwrap();
        assert_eq!(ms.source_node.as_deref(), Some(here.as_str()));
        assert_eq!(ms.target_node.as_deref(), Some(pin.as_str()));
        let vmi: VirtualMachineInstance = ns.api().get("vm").await?;
        assert_eq!(vmi.node_name(), Some(pin.as_str()));
        here = pin;
    }
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_that_never_schedules_fails_after_the_timeout() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-unsched").await?;
    let mut cfg = ns.standin_config();
    cfg.unschedulable_timeout = Duration::from_secs(3);
    let _standin = ns.start_standin(cfg);
    three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let source = running_vmi(&ns, "vm")
        .await?
        .node_name()
        .unwrap()
        .to_string();

    let real = ns.cluster.real_virt_controller;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    if real {
        // The target pod is virt-controller's: an impossible addedNodeSelector keeps it
        // unscheduled, and KubeVirt's own annotation shortens its 5-minute timeout.
        let mut m = VirtualMachineInstanceMigration::new(
            "mig",
            VmimSpec {
                vmi_name: "vm".into(),
                added_node_selector: Some(BTreeMap::from([(
                    NEVER_SCHEDULE_KEY.to_string(),
                    "true".to_string(),
                )])),
            },
        );
        m.metadata.annotations = Some(BTreeMap::from([(
            "kubevirt.io/migrationUnschedulablePodTimeoutSeconds".to_string(),
            "3".to_string(),
        )]));
        vmims.create(&PostParams::default(), &m).await?;
    } else {
        ns.create_vmim("mig", "vm", &[(standin::ANN_TARGET_UNSCHEDULABLE, "true")])
            .await?;
    }
    let scheduling = vmim_phase(&ns, "mig", "Scheduling").await?;
    let target_pod = if real {
        // virt-controller names the target pod on the VMIM only at hand-off; find it by label.
        let uid = scheduling.uid().unwrap_or_default();
        let pods: Api<Pod> = ns.api();
        pods.list(&ListParams::default().labels(&format!("{MIGRATION_JOB_UID_LABEL}={uid}")))
            .await?
            .items
            .first()
            .map(|p| p.name_any())
            .context("target pod of mig")?
    } else {
        scheduling
            .status
            .unwrap()
            .migration_state
            .unwrap()
            .target_pod
            .unwrap()
    };
    // kube-scheduler itself reports the target pod unschedulable.
    let pods: Api<Pod> = ns.api();
    let pod = wait_for_object(
        &pods,
        &target_pod,
        T,
        "PodScheduled=False/Unschedulable",
        |p| {
            p.status
                .as_ref()
                .and_then(|s| s.conditions.as_ref())
                .is_some_and(|cs| {
                    cs.iter().any(|c| {
                        c.type_ == "PodScheduled"
                            && c.status == "False"
                            && c.reason.as_deref() == Some("Unschedulable")
                    })
                })
        },
    )
    .await?;
    assert!(pod
        .spec
        .unwrap()
        .node_selector
        .unwrap()
        .contains_key(NEVER_SCHEDULE_KEY));

    let done = final_vmim(&ns, "mig").await?;
    assert_eq!(done.phase(), Some("Failed"));
    let vmi: VirtualMachineInstance = ns.api().get("vm").await?;
    assert_eq!(vmi.node_name(), Some(source.as_str()));
    if !real {
        // The stand-in records why on the VMIM and the VMI; virt-controller fails it before any
        // hand-off, so neither gets a migrationState for it (it says why in an Event).
        let ms = done.status.unwrap().migration_state.unwrap();
        assert!(ms.failed && !ms.completed);
        let reason = ms.failure_reason.unwrap();
        assert!(reason.contains("unschedulable"), "{reason}");
        assert_eq!(ms.target_node, None);
        let vms = vmi.status.unwrap().migration_state.unwrap();
        assert!(vms.failed);
    }
    assert!(
        pods.get_opt(&target_pod).await?.is_none(),
        "target pod deleted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn migration_failing_midway_leaves_the_vmi_on_its_source() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-fail").await?;
    let _standin = ns.start_standin(ns.standin_config());
    three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let vmi = running_vmi(&ns, "vm").await?;
    let source = vmi.node_name().unwrap().to_string();

    ns.create_vmim(
        "mig",
        "vm",
        &[
            (standin::ANN_TRANSFER_SECONDS, "1"),
            (standin::ANN_FAIL_AT_PERCENT, "50"),
            (
                standin::ANN_FAILURE_REASON,
                "injected: connection reset by peer",
            ),
        ],
    )
    .await?;
    let done = final_vmim(&ns, "mig").await?;
    assert_eq!(done.phase(), Some("Failed"));
    let ms = done.status.unwrap().migration_state.unwrap();
    assert!(ms.failed && !ms.completed);
    assert_eq!(
        ms.failure_reason.as_deref(),
        Some("injected: connection reset by peer")
    );
    assert!(ms.start_timestamp.is_some(), "it failed while Running");
    let target = ms.target_node.clone().unwrap();
    assert_ne!(target, source);

    let vmi: VirtualMachineInstance = ns.api().get("vm").await?;
    assert_eq!(vmi.node_name(), Some(source.as_str()));
    let vms = vmi.status.clone().unwrap().migration_state.unwrap();
    assert!(vms.failed && !vms.completed);
    assert_eq!(vms.failure_reason, ms.failure_reason);
    let pods = launcher_pods(&ns, &vmi).await?;
    assert_eq!(pods.len(), 1);
    assert_eq!(
        pod_node(&pods[0]),
        Some(source.as_str()),
        "source pod kept, target deleted"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleting_an_unfinished_vmim_aborts_the_migration() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-abort").await?;
    let _standin = ns.start_standin(ns.standin_config());
    three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let source = running_vmi(&ns, "vm")
        .await?
        .node_name()
        .unwrap()
        .to_string();

    ns.create_vmim("mig", "vm", &[(standin::ANN_TRANSFER_SECONDS, "120")])
        .await?;
    let running = vmim_phase(&ns, "mig", "Running").await?;
    assert!(running
        .finalizers()
        .iter()
        .any(|f| f == standin::VMIM_FINALIZER));
    let target_pod = target_pod_of(&ns, &running).await?;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    vmims.delete("mig", &DeleteParams::default()).await?;
    // The finalizer goes once the abort is done, so the VMIM disappears.
    wait_for("VMIM gone", T, || async {
        Ok(vmims.get_opt("mig").await?.is_none().then_some(()))
    })
    .await?;

    let vmi: VirtualMachineInstance = ns.api().get("vm").await?;
    assert_eq!(vmi.node_name(), Some(source.as_str()));
    let vms = vmi.status.unwrap().migration_state.unwrap();
    assert_eq!(vms.abort_requested, Some(true));
    assert!(vms.failed && !vms.completed);
    assert_eq!(vms.failure_reason.as_deref(), Some(standin::ABORTED_REASON));
    let pods: Api<Pod> = ns.api();
    assert!(
        pod_gone_or_finished(&pods, &target_pod).await?,
        "target pod deleted or ended"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn vmim_for_a_missing_or_non_migratable_vmi_fails_with_a_reason() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmim-reject").await?;
    let _standin = ns.start_standin(ns.standin_config());
    three_nodes(&ns).await?;
    let mut vmi = ns.vmi("pinned", "1Gi", "1");
    vmi.annotations_mut()
        .insert(standin::ANN_NOT_MIGRATABLE.into(), "true".into());
    ns.create_vmi(vmi).await?;
    let vmi = running_vmi(&ns, "pinned").await?;
    assert!(!vmi.condition_true(LIVE_MIGRATABLE));

    ns.create_vmim("mig-pinned", "pinned", &[]).await?;
    ns.create_vmim("mig-missing", "nope", &[]).await?;
    for (name, needle) in [
        ("mig-pinned", "live-migratable"),
        ("mig-missing", "does not exist"),
    ] {
        if ns.cluster.real_virt_controller && name == "mig-missing" {
            // virt-controller deletes a migration whose VMI does not exist ("Deleting migration
            // for deleted vmi"); virt-api would have refused it. (With the finalizer the
            // stand-in adds for virt-api, it stays Terminating.)
            let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
            wait_for("mig-missing deleted", T, || async {
                let m = vmims.get_opt("mig-missing").await?;
                Ok(m.is_none_or(|m| m.metadata.deletion_timestamp.is_some())
                    .then_some(()))
            })
            .await?;
            continue;
        }
        let done = final_vmim(&ns, name).await?;
        assert_eq!(done.phase(), Some("Failed"));
        let reason = if ns.cluster.real_virt_controller && name == "mig-missing" {
            // virt-controller says so only in an Event (virt-api would refuse the VMIM).
            wait_for("FailedMigration event", T, || async {
                let events: Api<k8s_openapi::api::core::v1::Event> = ns.api();
                Ok(events
                    .list(&ListParams::default())
                    .await?
                    .items
                    .into_iter()
                    .find(|e| e.involved_object.name.as_deref() == Some(name))
                    .and_then(|e| e.message))
            })
            .await?
        } else {
            done.status
                .unwrap()
                .migration_state
                .unwrap()
                .failure_reason
                .unwrap()
        };
        assert!(reason.contains(needle), "{name}: {reason}");
    }
    let vmi: VirtualMachineInstance = ns.api().get("pinned").await?;
    assert_eq!(
        launcher_pods(&ns, &vmi).await?.len(),
        1,
        "no target pod was made"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn restarted_standin_finishes_a_migration_exactly_once() -> anyhow::Result<()> {
    let ns = TestCluster::get()
        .fresh_namespace("standin-restart")
        .await?;
    let standin = ns.start_standin(ns.standin_config());
    three_nodes(&ns).await?;
    ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
    let source = running_vmi(&ns, "vm")
        .await?
        .node_name()
        .unwrap()
        .to_string();
    ns.create_vmim("mig", "vm", &[(standin::ANN_TRANSFER_SECONDS, "2")])
        .await?;
    vmim_phase(&ns, "mig", "Running").await?;
    assert!(standin.is_running());
    standin.stop();
    let _again = ns.start_standin(ns.standin_config());
    let done = final_vmim(&ns, "mig").await?;
    assert_eq!(done.phase(), Some("Succeeded"), "{:?}", done.status);
    let target = done
        .status
        .unwrap()
        .migration_state
        .unwrap()
        .target_node
        .unwrap();
    assert_ne!(target, source);
    let vmi: VirtualMachineInstance = ns.api().get("vm").await?;
    assert_eq!(vmi.node_name(), Some(target.as_str()));
    let pods = launcher_pods(&ns, &vmi).await?;
    assert_eq!(pods.len(), 1);
    assert_eq!(pod_node(&pods[0]), Some(target.as_str()));
    Ok(())
}

fn memory_vmi(ns: &TestNamespace, name: &str) -> VirtualMachineInstance {
    let mut v = ns.vmi(name, "1Gi", "1");
    let ann = v.annotations_mut();
    ann.insert(standin::ANN_IMAGE.into(), "debian-12".into());
    ann.insert(standin::ANN_IMAGE_MIB.into(), "4".into());
    ann.insert(standin::ANN_PRIVATE_MIB.into(), "1".into());
    v
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn guest_memory_processes_hold_known_content_and_follow_migrations() -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vm-memory").await?;
    let mut cfg = ns.standin_config();
    cfg.memory = Some(TestNamespace::memory_config(env!(
        "CARGO_BIN_EXE_vm-memory"
    )));
    let _standin = ns.start_standin(cfg);
    three_nodes(&ns).await?;
    ns.create_vmi(memory_vmi(&ns, "vm1")).await?;
    ns.create_vmi(memory_vmi(&ns, "vm2")).await?;
    let vm1 = running_vmi(&ns, "vm1").await?;
    running_vmi(&ns, "vm2").await?;
    let source = vm1.node_name().unwrap().to_string();

    // Running implies the memory is filled: one QEMU-like process per VMI, on its node.
    let p1 = memory::processes_of(&ns.name, "vm1");
    let p2 = memory::processes_of(&ns.name, "vm2");
    assert_eq!((p1.len(), p2.len()), (1, 1), "{p1:?} {p2:?}");
    let (p1, p2) = (&p1[0], &p2[0]);
    assert_eq!(p1.node, source);
    let cmdline = std::fs::read(format!("/proc/{}/cmdline", p1.pid))?;
    let want = format!("-name\0guest={}_vm1,", ns.name);
    assert!(
        cmdline.windows(want.len()).any(|w| w == want.as_bytes()),
        "QEMU-style argv"
    );
    // Same image: identical image pages; private pages differ and match their seed.
    let image_page = p1.read(7 * PAGE_SIZE, PAGE_SIZE).context("reading vm1")?;
    assert_eq!(
        image_page,
        p2.read(7 * PAGE_SIZE, PAGE_SIZE).context("reading vm2")?
    );
    assert_eq!(image_page, p1.spec.expected_page(7));
    let private = 4 * MIB;
    assert_ne!(p1.read(private, PAGE_SIZE)?, p2.read(private, PAGE_SIZE)?);
    assert_eq!(
        p1.read(private, PAGE_SIZE)?,
        p1.spec.expected_page(private / PAGE_SIZE)
    );
    let before = p1.read(0, 5 * MIB)?;

    ns.create_vmim("mig", "vm1", &[(standin::ANN_TRANSFER_SECONDS, "1")])
        .await?;
    // While the transfer runs both exist: the source, and the target started (and filled) while
    // preparing the target.
    vmim_phase(&ns, "mig", "Running").await?;
    // The VMI's migrationState names the target (virt-controller fills the VMIM's only at the
    // end).
    let vmi: VirtualMachineInstance = ns.api().get("vm1").await?;
    let target = vmi
        .status
        .unwrap()
        .migration_state
        .unwrap()
        .target_node
        .unwrap();
    let during = memory::processes_of(&ns.name, "vm1");
    assert_eq!(during.len(), 2, "{during:?}");
    let target_proc = during
        .iter()
        .find(|p| p.node == target)
        .expect("target process");
    assert!(
        target_proc.ready().is_some(),
        "target memory filled before Running"
    );
    let done = final_vmim(&ns, "mig").await?;
    assert_eq!(done.phase(), Some("Succeeded"), "{:?}", done.status);
    // The source process is killed at completion; exactly one remains, on the target.
    let moved = wait_for("one vm-memory process for vm1", T, || async {
        let ps = memory::processes_of(&ns.name, "vm1");
        Ok((ps.len() == 1).then(|| ps[0].clone()))
    })
    .await?;
    assert_eq!(moved.node, target);
    assert_eq!(
        moved.pid, target_proc.pid,
        "the target process is the one that runs on"
    );
    assert_eq!(
        moved.read(0, 5 * MIB).context("reading moved vm1")?,
        before,
        "memory content survives the move"
    );

    // Deleting the VMI stops its process.
    let vmis: Api<VirtualMachineInstance> = ns.api();
    vmis.delete("vm1", &DeleteParams::default()).await?;
    wait_for("vm1's vm-memory gone", T, || async {
        Ok(memory::processes_of(&ns.name, "vm1")
            .is_empty()
            .then_some(()))
    })
    .await?;
    assert_eq!(memory::processes_of(&ns.name, "vm2").len(), 1);
    Ok(())
}
