//! The node agent against the real control plane: one `commonground agent` child process per
//! fake node scans the stand-in's guest-memory processes (real memory from known "OS images")
//! through /proc and publishes each node's NodeRegionDigest by server-side apply, owned by its
//! Node; the controller then plans a VirtualMachineMigration from those digests alone.

mod common;

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use common::{ensure_controller, start_agent, Component};
use commonground::api::kubevirt::VirtualMachineInstance;
use commonground::api::migration::{MigrationPhase, VirtualMachineMigrationSpec};
use commonground::api::{NodeRegionDigest, VirtualMachineMigration};
use commonground::plan::region::RegionGeometry;
use commonground::plan::NodeRegionSummary;
use commonground_e2e::{wait_for, wait_for_object, FakeNode, TestCluster, TestNamespace};
use k8s_openapi::api::core::v1::Node;
use kube::api::{DeleteParams, Patch, PatchParams, PostParams};
use kube::Api;
use serde_json::json;

const T: Duration = Duration::from_secs(120);
const MIB: u64 = 1 << 20;
/// Guest memory of every VM: this much from its image, then private pages.
const IMAGE_MIB: u64 = 128;
const PRIVATE_MIB: u64 = 32;
/// An agent's peak resident memory may be this much plus 2% of the guest memory it scans.
/// Measured: 38 MiB (debug build) for one 160 MiB VM, most of it the runtime, the Kubernetes
/// client and TLS, not the scan (2,560 regions). A copy of one guest would double it; 2% is
/// room for the per-region state of large guests (about 0.03% of their memory) many times over.
const AGENT_BASE_RESIDENT: u64 = 64 * MIB;

/// A VMI whose memory is `IMAGE_MIB` of `image` plus `PRIVATE_MIB` of its own.
fn vmi(ns: &TestNamespace, name: &str, image: &str) -> VirtualMachineInstance {
    let mut v = ns.vmi(name, "1Gi", "500m");
    v.metadata.annotations = Some(BTreeMap::from([
        ("e2e.commonground.dev/image".to_string(), image.to_string()),
        (
            "e2e.commonground.dev/image-mib".to_string(),
            IMAGE_MIB.to_string(),
        ),
        (
            "e2e.commonground.dev/private-mib".to_string(),
            PRIVATE_MIB.to_string(),
        ),
    ]));
    v
}

async fn cordon(ns: &TestNamespace, node: &str, unschedulable: bool) -> anyhow::Result<()> {
    let nodes: Api<Node> = Api::all(ns.client.clone());
    nodes
        .patch(
            node,
            &PatchParams::default(),
            &Patch::Merge(json!({"spec": {"unschedulable": unschedulable}})),
        )
        .await?;
    Ok(())
}

/// Prints each agent's peak and current resident memory with the guest memory its node's
/// digest says it scanned, and checks the peak against [`AGENT_BASE_RESIDENT`] plus 2% of that.
/// An agent keeps one 16-byte digest per 64 KiB region and reads guest memory in bounded
/// chunks: a leak, or guest memory kept around, would show here.
async fn agents_resident_memory(
    agents: &[Component],
    nodes: &[String],
    digests: &Api<NodeRegionDigest>,
    when: &str,
) -> anyhow::Result<()> {
    for (agent, node) in agents.iter().zip(nodes) {
        let pid = agent.child.id();
        let (hwm, rss) = (
            proc_status_bytes(pid, "VmHWM")?,
            proc_status_bytes(pid, "VmRSS")?,
        );
        let summary = digests.get(node).await?.to_summary()?;
        let scanned: u64 = summary.vms.iter().map(|v| v.memory_bytes).sum();
        eprintln!(
            "agent resident memory ({node}, {when}): VmHWM {} MiB, VmRSS {} MiB while scanning {} VMs / {} MiB",
            hwm / MIB,
            rss / MIB,
            summary.vms.len(),
            scanned / MIB
        );
        let bound = AGENT_BASE_RESIDENT + scanned / 50;
        assert!(
            hwm < bound,
            "agent of {node}: VmHWM {} MiB, more than {} MiB for {} MiB scanned",
            hwm / MIB,
            bound / MIB,
            scanned / MIB
        );
    }
    Ok(())
}

/// `field` (`VmHWM`, `VmRSS`, ...) of `/proc/<pid>/status`, in bytes.
fn proc_status_bytes(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    let kib = status
        .lines()
        .find_map(|l| l.strip_prefix(field)?.strip_prefix(':'))
        .and_then(|v| v.trim().strip_suffix("kB")?.trim().parse::<u64>().ok())
        .ok_or_else(|| anyhow::anyhow!("no {field} in /proc/{pid}/status"))?;
    Ok(kib * 1024)
}

/// The names of the VMs a digest lists, if it exists and has a status.
async fn digest_vms(api: &Api<NodeRegionDigest>, node: &str) -> Option<Vec<String>> {
    let d = api.get_opt(node).await.ok()??;
    Some(d.status?.vms.iter().map(|v| v.name.clone()).collect())
}

/// Waits until `node`'s digest lists exactly `vms` (by name) with every listed VM scanned.
async fn digest_with(
    api: &Api<NodeRegionDigest>,
    node: &str,
    vms: &[&str],
    agents: &[Component],
) -> anyhow::Result<NodeRegionDigest> {
    let r = wait_for(&format!("digest of {node} listing {vms:?}"), T, || async {
        let Some(d) = api.get_opt(node).await? else {
            return Ok(None);
        };
        let Some(st) = &d.status else { return Ok(None) };
        let mut names: Vec<&str> = st.vms.iter().map(|v| v.name.as_str()).collect();
        names.sort();
        let ok = names == vms && st.vms.iter().all(|v| v.regions > 0);
        Ok(ok.then_some(d))
    })
    .await;
    if r.is_err() {
        for a in agents {
            eprintln!("agent log {}:\n{}", a.log.display(), a.log_tail());
        }
    }
    r
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn agents_publish_real_memory_and_the_controller_plans_from_it() -> anyhow::Result<()> {
    let started = Instant::now();
    let ns = TestCluster::get().fresh_namespace("agent-pub").await?;
    let mut cfg = ns.standin_config();
    cfg.memory = Some(TestNamespace::memory_config(env!(
        "CARGO_BIN_EXE_vm-memory"
    )));
    let _standin = ns.start_standin(cfg);
    let nodes: Vec<String> = ["n1", "n2", "n3"].iter().map(|s| ns.node_name(s)).collect();
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    for n in &nodes {
        // Digests left over from an earlier run with the same names would confuse the waits.
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }

    // One VM per node, placed by cordoning the nodes already used: a node selector or affinity
    // would follow the VM into its migration and keep it off the target.
    let plan = [
        ("vm-a", "debian-12"),
        ("vm-b", "debian-12"),
        ("vm-c", "fedora-40"),
    ];
    let vmis: Api<VirtualMachineInstance> = ns.api();
    for (i, (name, image)) in plan.iter().enumerate() {
        ns.create_fake_node(FakeNode::new(&nodes[i], "wg-1").capacity("8", "32Gi"))
            .await?;
        ns.create_vmi(vmi(&ns, name, image)).await?;
        let v = wait_for_object(&vmis, name, T, "VMI running", |v| {
            v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
        })
        .await?;
        assert_eq!(v.node_name(), Some(nodes[i].as_str()));
        cordon(&ns, &nodes[i], true).await?;
    }
    for n in &nodes {
        cordon(&ns, n, false).await?;
    }
    let vms_up = started.elapsed();

    let nodes_api: Api<Node> = Api::all(ns.client.clone());
    let agents: Vec<Component> = nodes.iter().map(|n| start_agent(n)).collect();
    let mut summaries: Vec<NodeRegionSummary> = Vec::new();
    let geometry = RegionGeometry::default();
    let data_regions = geometry.regions_in((IMAGE_MIB + PRIVATE_MIB) * MIB);
    for (i, (name, _)) in plan.iter().enumerate() {
        let d = digest_with(&digests, &nodes[i], &[name], &agents).await?;
        let size = serde_json::to_vec(&d)?.len();
        assert!(size < 256 * 1024, "digest of {} is {size} bytes", nodes[i]);
        // Owned by its Node, so that deleting the Node deletes the digest.
        let node_uid = nodes_api.get(&nodes[i]).await?.metadata.uid;
        let owners = d.metadata.owner_references.clone().unwrap_or_default();
        assert_eq!(
            owners.len(),
            1,
            "owner references of {}: {owners:?}",
            nodes[i]
        );
        assert_eq!(
            (owners[0].kind.as_str(), owners[0].name.as_str()),
            ("Node", nodes[i].as_str())
        );
        assert_eq!(Some(&owners[0].uid), node_uid.as_ref());
        assert_eq!(owners[0].block_owner_deletion, Some(false));
        let st = d.status.as_ref().unwrap();
        assert_eq!(st.work_group, "wg-1");
        assert_eq!(st.vm_count, 1);
        assert!(!st.sketch.is_empty());
        let s = d.to_summary()?;
        assert!(!s.sketch.is_empty(), "node sketch of {} is empty", nodes[i]);
        let vm = &s.vms[0];
        assert_eq!(vm.vm.namespace, ns.name);
        // Every image and private page holds data; anything else the helper maps (allocator
        // arenas) is untouched, hence zero.
        let data = vm.regions - vm.zero_regions;
        assert!(
            data >= data_regions && data <= data_regions + data_regions / 20,
            "{name}: {data} data regions, expected about {data_regions} ({vm:?})"
        );
        assert!(vm.zero_regions <= vm.regions);
        assert_eq!(vm.memory_bytes, vm.regions * geometry.region_bytes());
        assert!(!vm.sketch.is_empty(), "{name}: empty sketch");
        summaries.push(s);
    }
    let published = started.elapsed();

    // Each agent's resident memory once it has scanned and published.
    agents_resident_memory(&agents, &nodes, &digests, "first publish").await?;

    // vm-a shares its image (IMAGE / (IMAGE + PRIVATE) = 80% of its data) with node 2's vm-b,
    // nothing with node 3's vm-c.
    let a = &summaries[0].vms[0].sketch;
    let with_b = a.overlap(&summaries[1].sketch);
    let with_c = a.overlap(&summaries[2].sketch);
    let expected = IMAGE_MIB as f64 / (IMAGE_MIB + PRIVATE_MIB) as f64;
    let fb = with_b.fraction().expect("samples");
    let fc = with_c.fraction().expect("samples");
    assert!(
        (fb - expected).abs() < 0.2,
        "overlap of vm-a with node 2: {fb:.2} from {with_b:?}, expected about {expected:.2}"
    );
    assert!(
        fc < 0.05,
        "overlap of vm-a with node 3: {fc:.2} from {with_c:?}"
    );

    // The controller plans vm-a's migration from these digests.
    ensure_controller();
    let vmms: Api<VirtualMachineMigration> = ns.api();
    vmms.create(
        &PostParams::default(),
        &VirtualMachineMigration::new(
            "move-vm-a",
            VirtualMachineMigrationSpec {
                vmi_name: "vm-a".into(),
                target: None,
                max_duration: None,
                path_setup_budget: None,
                follow_deadline: None,
                group: None,
                dry_run: false,
                max_attempts: None,
                unschedulable_timeout: None,
            },
        ),
    )
    .await?;
    let done = wait_for_object(&vmms, "move-vm-a", T, "migration finished", |m| {
        m.status
            .as_ref()
            .is_some_and(|s| matches!(s.phase, MigrationPhase::Succeeded | MigrationPhase::Failed))
    })
    .await;
    let done = match done {
        Ok(d) => d,
        Err(e) => {
            eprintln!("controller log:\n{}", common::controller_log());
            eprintln!("{}", ns.dump().await);
            return Err(e);
        }
    };
    let status = done.status.unwrap();
    assert_eq!(status.phase, MigrationPhase::Succeeded, "{status:#?}");
    assert_eq!(
        status.source_node.as_deref(),
        Some(nodes[0].as_str()),
        "{status:#?}"
    );
    assert_eq!(
        status.target_node.as_deref(),
        Some(nodes[1].as_str()),
        "{status:#?}"
    );
    let chosen: Vec<_> = status
        .candidates
        .iter()
        .filter(|c| c.verdict == "Chosen")
        .collect();
    assert_eq!(chosen.len(), 1, "{:#?}", status.candidates);
    assert_eq!(chosen[0].node, nodes[1]);
    let loser = status
        .candidates
        .iter()
        .find(|c| c.node == nodes[2])
        .expect("node 3 among the candidates");
    assert!(chosen[0].common_bytes > loser.common_bytes);
    let est = status.estimate.expect("estimate in status");
    let vm_bytes = summaries[0].vms[0].memory_bytes;
    assert!(
        est.common_bytes > vm_bytes / 2 && est.common_bytes < vm_bytes,
        "{est:?}"
    );
    assert!(
        est.to_move_bytes > 0 && est.to_move_bytes < vm_bytes / 2,
        "{est:?}"
    );
    let v = vmis.get("vm-a").await?;
    assert_eq!(v.node_name(), Some(nodes[1].as_str()));

    // Afterwards node 2's digest lists vm-a beside vm-b, and node 1's no longer lists it
    // (the controller republishes both at once)...
    let moved = chrono::Utc::now() - chrono::Duration::seconds(1);
    digest_with(&digests, &nodes[1], &["vm-a", "vm-b"], &agents).await?;
    digest_with(&digests, &nodes[0], &[], &agents).await?;
    // ... and the agents' own next scans, which replace the controller's writes, agree.
    for (n, want) in nodes[..2].iter().zip([&[][..], &["vm-a", "vm-b"][..]]) {
        wait_for(&format!("a scan of {n} after the migration"), T, || async {
            let Some(d) = digests.get_opt(n).await? else {
                return Ok(None);
            };
            let Some(st) = d.status else { return Ok(None) };
            let scanned =
                chrono::DateTime::parse_from_rfc3339(&st.scan_time).is_ok_and(|t| t >= moved);
            let mut names: Vec<&str> = st.vms.iter().map(|v| v.name.as_str()).collect();
            names.sort();
            Ok((scanned && names == want).then_some(()))
        })
        .await?;
    }
    assert_eq!(
        digest_vms(&digests, &nodes[2]).await,
        Some(vec!["vm-c".to_string()])
    );
    eprintln!(
        "VMs running after {vms_up:?}, digests published after {published:?}, all done after {:?}",
        started.elapsed()
    );

    // And after the migration (two VMs on node 2) and some thirty more scans.
    agents_resident_memory(&agents, &nodes, &digests, "end").await?;

    drop(agents);
    // With its agent stopped, deleting node 3 deletes its digest: the garbage collector follows
    // the owner reference.
    nodes_api
        .delete(&nodes[2], &DeleteParams::default())
        .await?;
    wait_for(
        &format!("the digest of deleted node {} garbage-collected", nodes[2]),
        T,
        || async { Ok(digests.get_opt(&nodes[2]).await?.is_none().then_some(())) },
    )
    .await?;
    for n in &nodes {
        let _ = digests.delete(n, &DeleteParams::default()).await;
    }
    Ok(())
}

/// How long the agent runs at steady state (1 s interval) while its requests are counted.
const STEADY_SECONDS: u64 = 15;

/// One request from the API server's audit log.
#[derive(Debug)]
struct AuditedRequest {
    verb: String,
    resource: String,
    /// Path and query, percent-decoded.
    uri: String,
    received: chrono::DateTime<chrono::Utc>,
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        let hex = |b: u8| (b as char).to_digit(16);
        match (bytes[i], bytes.get(i + 1), bytes.get(i + 2)) {
            (b'%', Some(&h), Some(&l)) if hex(h).is_some() && hex(l).is_some() => {
                out.push((hex(h).unwrap() * 16 + hex(l).unwrap()) as u8);
                i += 3;
            }
            (b, _, _) => {
                out.push(b);
                i += 1;
            }
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Every request in the audit log (and its rotated backup) whose User-Agent contains
/// `agent_of`, once each (a watch is logged when it starts and again when it ends).
fn audited_requests(cluster: &TestCluster, agent_of: &str) -> anyhow::Result<Vec<AuditedRequest>> {
    let dir = cluster.audit_log();
    let dir = dir.parent().expect("the audit log is in a directory");
    let mut seen = std::collections::HashSet::new();
    let mut out = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let path = entry?.path();
        let name = path.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if !(name.starts_with("audit") && name.ends_with(".log")) {
            continue;
        }
        for line in std::fs::read_to_string(&path)?.lines() {
            let Ok(e) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line cut by rotation
            };
            let ua = e["userAgent"].as_str().unwrap_or("");
            if !ua.contains(agent_of)
                || !seen.insert(e["auditID"].as_str().unwrap_or("").to_string())
            {
                continue;
            }
            out.push(AuditedRequest {
                verb: e["verb"].as_str().unwrap_or("").into(),
                resource: e["objectRef"]["resource"].as_str().unwrap_or("").into(),
                uri: percent_decode(e["requestURI"].as_str().unwrap_or("")),
                received: e["requestReceivedTimestamp"]
                    .as_str()
                    .unwrap_or("")
                    .parse()?,
            });
        }
    }
    out.sort_by_key(|r| r.received);
    Ok(out)
}

/// An agent costs the API server in proportion to its own node: from the API server's audit
/// log, every request it made names its node (a label selector on VMIs, a field selector or
/// the object's name on its Node and its NodeRegionDigest), nothing is listed cluster-wide,
/// and at steady state it makes no request at all (the watches bring every change) and at
/// most one write a minute.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_agent_asks_only_about_its_own_node_and_is_quiet_at_steady_state() -> anyhow::Result<()>
{
    let cluster = TestCluster::get();
    let ns = cluster.fresh_namespace("agent-req").await?;
    let node = ns.node_name("quiet");
    let digests: Api<NodeRegionDigest> = Api::all(ns.client.clone());
    let _ = digests.delete(&node, &DeleteParams::default()).await;
    ns.create_fake_node(FakeNode::new(&node, "wg-1").capacity("8", "32Gi"))
        .await?;
    let agent = start_agent(&node);
    let first = wait_for_object(&digests, &node, T, "the agent's first digest", |d| {
        d.status.is_some()
    })
    .await;
    if first.is_err() {
        eprintln!("agent log:\n{}", agent.log_tail());
    }
    first?;
    // The first publish and the watches' first lists are done; from here on is steady state.
    let steady_from = chrono::Utc::now() + chrono::Duration::seconds(2);
    tokio::time::sleep(Duration::from_secs(2 + STEADY_SECONDS)).await;
    let steady_to = chrono::Utc::now();
    drop(agent);

    let requests = audited_requests(cluster, &format!("(node {node})"))?;
    assert!(
        !requests.is_empty(),
        "no request of the agent in {} (is the User-Agent set?)",
        cluster.audit_log().display()
    );
    let own_label = format!("labelSelector=kubevirt.io/nodeName={node}");
    let own_field = format!("fieldSelector=metadata.name={node}");
    let own_path = format!("/noderegiondigests/{node}");
    for r in &requests {
        let scoped = match (r.resource.as_str(), r.verb.as_str()) {
            ("virtualmachineinstances", "list" | "watch") => r.uri.contains(&own_label),
            ("nodes", "list" | "watch") => r.uri.contains(&own_field),
            ("noderegiondigests", "list" | "watch") => {
                r.uri.contains(&own_field) || r.uri.contains("limit=1")
            }
            ("noderegiondigests", "get" | "create" | "patch") => {
                r.uri.split('?').next().unwrap_or("").contains(&own_path)
            }
            _ => false,
        };
        assert!(scoped, "a request not scoped to node {node}: {r:?}");
    }
    let crd_checks = requests
        .iter()
        .filter(|r| r.verb == "list" && r.uri.contains("limit=1"))
        .count();
    assert_eq!(crd_checks, 1, "one CRD check at start: {requests:#?}");

    let steady: Vec<&AuditedRequest> = requests
        .iter()
        .filter(|r| r.received >= steady_from && r.received <= steady_to)
        .collect();
    let reads = steady
        .iter()
        .filter(|r| matches!(r.verb.as_str(), "get" | "list"))
        .count();
    let writes = steady
        .iter()
        .filter(|r| matches!(r.verb.as_str(), "create" | "patch" | "update"))
        .count();
    let watches = requests.iter().filter(|r| r.verb == "watch").count();
    println!(
        "agent API requests: {} in all ({watches} watches); over {STEADY_SECONDS} s at steady \
         state (1 s interval): {reads} reads, {writes} writes",
        requests.len()
    );
    assert_eq!(reads, 0, "reads at steady state: {steady:#?}");
    // The publish gate writes at most once a minute unless the node's VMs change.
    assert!(writes <= 1, "writes at steady state: {steady:#?}");
    Ok(())
}
