//! The controller killed (SIGKILL) in the middle of a migration and started again: the
//! migration completes and exactly one KubeVirt migration exists. Its own test binary, so the
//! kill does not disturb other tests' controller.

mod common;

use std::time::Duration;

use common::{controller_args, keys, publish_digest, vm_summary, Component};
use commonground::api::kubevirt::{VirtualMachineInstance, VirtualMachineInstanceMigration};
use commonground::api::migration::{MigrationPhase, VirtualMachineMigrationSpec};
use commonground::api::VirtualMachineMigration;
use commonground_e2e::{wait_for_object, FakeNode, TestCluster};
use kube::api::{ListParams, PostParams};
use kube::Api;

const T: Duration = Duration::from_secs(120);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn controller_killed_mid_migration_finishes_with_exactly_one_kubevirt_migration(
) -> anyhow::Result<()> {
    let ns = TestCluster::get().fresh_namespace("vmm-restart").await?;
    let mut cfg = ns.standin_config();
    cfg.bandwidth_bytes_per_sec = 1e6; // ~10 s per migration: time to kill and restart
    let _standin = ns.start_standin(cfg);
    let source = ns.node_name("src");
    ns.create_fake_node(FakeNode::new(&source, "wg-1")).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for name in ["vm1", "vm2"] {
        ns.create_vmi(ns.vmi(name, "1Gi", "500m")).await?;
    }
    for name in ["vm1", "vm2"] {
        wait_for_object(&vmis, name, T, "VMI running", |v| {
            v.condition_true("LiveMigratable")
        })
        .await?;
    }
    let target = ns.node_name("b");
    ns.create_fake_node(FakeNode::new(&target, "wg-1")).await?;
    let content = keys(7_000_000, 1000);
    publish_digest(
        &ns.client,
        &source,
        "wg-1",
        vec![
            vm_summary(&ns.name, "vm1", 1 << 30, &content),
            vm_summary(&ns.name, "vm2", 1 << 30, &content),
        ],
        &[],
    )
    .await?;
    publish_digest(&ns.client, &target, "wg-1", vec![], &content[..500]).await?;

    let mut controller = Component::start(&controller_args(), "controller-restart");
    let api: Api<VirtualMachineMigration> = ns.api();
    let spec = |vmi: &str| VirtualMachineMigrationSpec {
        vmi_name: vmi.into(),
        target: None,
        max_duration: None,
        path_setup_budget: None,
        follow_deadline: None,
        group: None,
        dry_run: false,
        max_attempts: None,
        unschedulable_timeout: None,
    };
    // vm1: killed while KubeVirt migrates it.
    api.create(
        &PostParams::default(),
        &VirtualMachineMigration::new("move-vm1", spec("vm1")),
    )
    .await?;
    wait_for_object(&api, "move-vm1", T, "Migrating", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| s.phase == MigrationPhase::Migrating)
    })
    .await?;
    controller.kill();
    // vm2: requested while no controller runs, then the controller starts and is killed again
    // right away, possibly between creating the KubeVirt migration and writing status.
    api.create(
        &PostParams::default(),
        &VirtualMachineMigration::new("move-vm2", spec("vm2")),
    )
    .await?;
    let mut controller = Component::start(&controller_args(), "controller-restart-2");
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    commonground_e2e::wait_for("vm2's KubeVirt migration exists", T, || async {
        let list = vmims.list(&ListParams::default()).await?;
        Ok(list
            .items
            .iter()
            .any(|m| m.spec.vmi_name == "vm2")
            .then_some(()))
    })
    .await?;
    controller.kill();
    let controller = Component::start(&controller_args(), "controller-restart-3");

    for name in ["move-vm1", "move-vm2"] {
        let done = wait_for_object(&api, name, T, "final", |m| {
            m.status.as_ref().is_some_and(|s| s.phase.is_final())
        })
        .await;
        if done.is_err() {
            eprintln!("controller log:\n{}", controller.log_tail());
            eprintln!("{}", ns.dump().await);
        }
        assert_eq!(
            done?.status.unwrap().phase,
            MigrationPhase::Succeeded,
            "{name}"
        );
    }
    let list = vmims.list(&ListParams::default()).await?.items;
    for vmi in ["vm1", "vm2"] {
        let n = list.iter().filter(|m| m.spec.vmi_name == vmi).count();
        assert_eq!(n, 1, "exactly one KubeVirt migration for {vmi}: {list:?}");
        let v: VirtualMachineInstance = vmis.get(vmi).await?;
        assert_eq!(v.node_name(), Some(target.as_str()));
    }
    Ok(())
}
