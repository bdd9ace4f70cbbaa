//! Memory groups with the real agent (`group: Follow`). Two VMIs share memory on a
//! source node: their stand-in guest processes map one /dev/shm file. The source node's
//! `commonground agent` finds the group in /proc. The requested VM migrates first. Once it has
//! left, the agent watches the member left behind and reports it in `recentlyAccessedBy` as
//! soon as it touches the shared memory, also after the agent itself restarted in between.
//! The controller then moves it to the same node.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{ensure_controller, start_agent, Component};
use commonground::api::digest::MemoryGroupStatus;
use commonground::api::kubevirt::VirtualMachineInstance;
use commonground::api::migration::{GroupMode, MigrationPhase, VirtualMachineMigrationSpec};
use commonground::api::{NodeRegionDigest, VirtualMachineMigration};
use commonground_e2e::memory;
use commonground_e2e::standin::ANN_SHARED_MEMORY;
use commonground_e2e::{wait_for, wait_for_object, FakeNode, TestCluster, TestNamespace};
use kube::api::{DeleteParams, PostParams};
use kube::Api;

const T: Duration = Duration::from_secs(120);
/// Agent intervals (1 s each) during which an idle member must not be reported.
const IDLE_INTERVALS: u64 = 4;

/// Removes the test's shared memory files and touch triggers, also when the test fails.
struct SharedMemoryFiles {
    name: String,
    triggers: Vec<std::path::PathBuf>,
}

impl Drop for SharedMemoryFiles {
    fn drop(&mut self) {
        for t in &self.triggers {
            let _ = std::fs::remove_file(t);
        }
        memory::remove_shared_memory(&self.name);
    }
}

/// A VMI whose guest maps shared memory `shared`.
fn sharing_vmi(ns: &TestNamespace, name: &str, shared: &str) -> VirtualMachineInstance {
    let mut v = ns.vmi(name, "1Gi", "500m");
    v.metadata.annotations = Some(BTreeMap::from([(
        ANN_SHARED_MEMORY.to_string(),
        shared.to_string(),
    )]));
    v
}

/// The memory groups of `node`'s digest once `cond` holds for its status, printing the agents'
/// logs if it never does.
async fn digest_when(
    digests: &Api<NodeRegionDigest>,
    node: &str,
    what: &str,
    agents: &[&Component],
    cond: impl Fn(&commonground::api::digest::NodeRegionDigestStatus) -> bool,
) -> anyhow::Result<Vec<MemoryGroupStatus>> {
    let r = wait_for(&format!("{node}: {what}"), T, || async {
        let Some(d) = digests.get_opt(node).await? else {
            return Ok(None);
        };
        Ok(d.status.filter(|s| cond(s)).map(|s| s.memory_groups))
    })
    .await;
    if r.is_err() {
        for a in agents {
            eprintln!("agent log {}:\n{}", a.log.display(), a.log_tail());
        }
    }
    r
}

fn vm_names(s: &commonground::api::digest::NodeRegionDigestStatus) -> Vec<&str> {
    let mut names: Vec<&str> = s.vms.iter().map(|v| v.name.as_str()).collect();
    names.sort();
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn follow_member_that_touches_the_shared_memory_after_the_first_moved_joins_it(
) -> anyhow::Result<()> {
    ensure_controller();
    let ns = TestCluster::get().fresh_namespace("agent-groups").await?;
    let mut cfg = ns.standin_config();
    cfg.memory = Some(TestNamespace::memory_config(env!(
        "CARGO_BIN_EXE_vm-memory"
    )));
    let _standin = ns.start_standin(cfg);
    // Named after the namespace: unique to this run.
    let shared = ns.name.clone();
    let trigger = memory::shared_touch_trigger(&ns.name, "vm2");
    let _files = SharedMemoryFiles {
        name: shared.clone(),
        triggers: vec![trigger.clone()],
    };
    let (src, dst) = (ns.node_name("src"), ns.node_name("dst"));
    // A work group of its own: no other test's node is ever a candidate.
    let wg = format!("wg-{}", ns.name);
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    for n in [&src, &dst] {
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }

    // Both VMs start on the source; the target node is added afterwards.
    ns.create_fake_node(FakeNode::new(&src, &wg).capacity("8", "32Gi"))
        .await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for name in ["vm1", "vm2"] {
        ns.create_vmi(sharing_vmi(&ns, name, &shared)).await?;
    }
    for name in ["vm1", "vm2"] {
        let v = wait_for_object(&vmis, name, T, "VMI running", |v| {
            v.condition_true("LiveMigratable")
        })
        .await?;
        assert_eq!(v.node_name(), Some(src.as_str()));
    }
    ns.create_fake_node(FakeNode::new(&dst, &wg).capacity("8", "32Gi"))
        .await?;
    let src_agent = start_agent(&src);
    let dst_agent = start_agent(&dst);
    let agents = [&src_agent, &dst_agent];
    let (vm1, vm2) = (format!("{}/vm1", ns.name), format!("{}/vm2", ns.name));
    let pair = vec![vm1.clone(), vm2.clone()];

    // The source's agent finds the group in /proc: two processes mapping one shared file.
    let groups = digest_when(&digests, &src, "agent reports the group", &agents, |s| {
        vm_names(s) == ["vm1", "vm2"] && s.memory_groups.iter().any(|g| g.members == pair)
    })
    .await?;
    assert_eq!(groups.len(), 1, "{groups:?}");
    assert!(groups[0].shared_bytes >= memory::MIB as u64, "{groups:?}");
    assert!(groups[0].recently_accessed_by.is_empty(), "{groups:?}");
    digest_when(&digests, &dst, "target's agent published", &agents, |s| {
        s.vms.is_empty()
    })
    .await?;

    // vm1 migrates first.
    let vmms: Api<VirtualMachineMigration> = ns.api();
    vmms.create(
        &PostParams::default(),
        &VirtualMachineMigration::new(
            "follow-vm1",
            VirtualMachineMigrationSpec {
                vmi_name: "vm1".into(),
                target: None,
                max_duration: None,
                path_setup_budget: None,
                follow_deadline: None,
                group: Some(GroupMode::Follow),
                dry_run: false,
                max_attempts: None,
                unschedulable_timeout: None,
            },
        ),
    )
    .await?;
    let first = wait_for_object(&vmms, "follow-vm1", T, "first VM migrated", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| matches!(s.phase, MigrationPhase::Succeeded | MigrationPhase::Failed))
    })
    .await;
    let first = match first {
        Ok(m) => m.status.unwrap_or_default(),
        Err(e) => {
            eprintln!("controller log:\n{}", common::controller_log());
            eprintln!("{}", ns.dump().await);
            return Err(e);
        }
    };
    assert_eq!(first.phase, MigrationPhase::Succeeded, "{first:#?}");
    assert_eq!(first.target_node.as_deref(), Some(dst.as_str()));
    assert_eq!(first.members.len(), 1, "{first:#?}");
    assert_eq!(first.members[0].name, "vm2");
    assert!(first.members[0].kubevirt_migration.is_none());
    let moved = chrono::Utc::now() - chrono::Duration::seconds(1);

    // The source's agent saw vm1 leave and keeps the group for vm2, which shares the file with
    // nobody on the node any more.
    digest_when(
        &digests,
        &src,
        "agent's own scan after vm1 left keeps the group",
        &agents,
        |s| {
            let scanned =
                chrono::DateTime::parse_from_rfc3339(&s.scan_time).is_ok_and(|t| t >= moved);
            scanned && vm_names(s) == ["vm2"] && s.memory_groups.iter().any(|g| g.members == pair)
        },
    )
    .await?;
    // vm2 does not touch the shared memory yet: not reported, and it stays on the source.
    tokio::time::sleep(Duration::from_secs(IDLE_INTERVALS)).await;
    let d = digests.get(&src).await?;
    let st = d.status.expect("status");
    assert_eq!(vm_names(&st), ["vm2"]);
    assert!(
        st.memory_groups
            .iter()
            .all(|g| g.recently_accessed_by.is_empty()),
        "an idle member is reported: {:?}",
        st.memory_groups
    );
    let waiting = vmms.get("follow-vm1").await?.status.unwrap_or_default();
    assert!(
        waiting.members[0].kubevirt_migration.is_none(),
        "{waiting:#?}"
    );
    assert!(
        waiting
            .conditions
            .iter()
            .any(|c| c.r#type == "SharedTransferComplete" && c.status == "False"),
        "{waiting:#?}"
    );
    assert_eq!(
        vmis.get("vm2").await?.node_name(),
        Some(src.as_str()),
        "vm2 stays until it touches the shared memory"
    );

    // The source's agent restarts. It takes the group back from its digest, with the time vm1
    // left, and goes on watching vm2 (before, a restart forgot the group).
    let departed = |s: &commonground::api::digest::NodeRegionDigestStatus| {
        s.memory_groups
            .iter()
            .find(|g| g.members == pair)
            .and_then(|g| g.departed_at.clone())
    };
    let departed_before = departed(&st).expect("a kept group carries its departure time");
    drop(src_agent);
    let restarted = chrono::Utc::now() - chrono::Duration::seconds(1);
    let src_agent = start_agent(&src);
    let agents = [&src_agent, &dst_agent];
    let st = digest_when(
        &digests,
        &src,
        "restarted agent publishes the group it kept",
        &agents,
        |s| {
            let scanned =
                chrono::DateTime::parse_from_rfc3339(&s.scan_time).is_ok_and(|t| t >= restarted);
            scanned && vm_names(s) == ["vm2"] && departed(s).is_some()
        },
    )
    .await?;
    let kept = st.iter().find(|g| g.members == pair).expect("group kept");
    assert_eq!(
        kept.departed_at.as_deref(),
        Some(departed_before.as_str()),
        "the departure time survives the restart: {st:?}"
    );
    assert!(kept.recently_accessed_by.is_empty(), "{st:?}");
    assert!(!kept.shared_objects.is_empty(), "{st:?}");
    tokio::time::sleep(Duration::from_secs(IDLE_INTERVALS)).await;
    let d = digests.get(&src).await?.status.expect("status");
    assert!(
        d.memory_groups
            .iter()
            .all(|g| g.recently_accessed_by.is_empty()),
        "an idle member is reported after the restart: {:?}",
        d.memory_groups
    );

    // vm2 touches the shared memory: the (restarted) agent reports it...
    std::fs::write(&trigger, b"")?;
    let touched = Instant::now();
    digest_when(
        &digests,
        &src,
        "agent reports vm2 touching the shared memory",
        &agents,
        |s| {
            s.memory_groups
                .iter()
                .any(|g| g.members == pair && g.recently_accessed_by == [vm2.clone()])
        },
    )
    .await?;
    let reported = touched.elapsed();
    // ... and vm2 follows vm1 to the same node.
    let done = wait_for_object(
        &vmms,
        "follow-vm1",
        T,
        "vm2 followed and the shared transfer completed",
        |m| {
            m.status.as_ref().is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.r#type == "SharedTransferComplete" && c.status == "True")
            })
        },
    )
    .await;
    let done = match done {
        Ok(m) => m.status.unwrap_or_default(),
        Err(e) => {
            eprintln!("controller log:\n{}", common::controller_log());
            eprintln!("{}", ns.dump().await);
            return Err(e);
        }
    };
    let followed = touched.elapsed();
    assert!(
        done.members[0].reason.contains("touched the shared memory"),
        "{done:#?}"
    );
    assert_eq!(vmis.get("vm2").await?.node_name(), Some(dst.as_str()));
    // On the target the two share memory again, and its agent sees the group whole.
    let groups = digest_when(&digests, &dst, "group whole on the target", &agents, |s| {
        vm_names(s) == ["vm1", "vm2"] && s.memory_groups.iter().any(|g| g.members == pair)
    })
    .await?;
    assert!(groups.iter().all(|g| g.recently_accessed_by.is_empty()));
    eprintln!(
        "vm2 touched the shared memory: reported after {reported:?}, migrated after {followed:?}"
    );

    drop((src_agent, dst_agent));
    for n in [&src, &dst] {
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }
    Ok(())
}
