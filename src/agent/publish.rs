//! Publishing the node's digest (the last step of a scan: send it to the other nodes' readers): the `NodeRegionDigest`
//! named after the node, status written by server-side apply. VM sketches are written as
//! positions in the node sketch (`vmSketchEncoding: NodeIndexed`, a few bits per key instead of
//! about 19). Bounded to [`MAX_DIGEST_BYTES`] by coarsening sketch thresholds; written only when the content changed
//! beyond a threshold and at most once per minute at steady state, at once when a VM arrived or
//! left, when the memory groups changed (above all, when a member touched the shared memory
//! after another left: a `Follow` migration waits on that), or when the digest carries a new
//! [`REFRESH_ANNOTATION`] (set after a migration).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use kube::api::{Patch, PatchParams};
use kube::Api;

use crate::api::digest::{
    summary_into_status, LoadStatus, MemoryGroupStatus, NodeCapacity, NodeRegionDigest,
    NodeRegionDigestStatus, ReplicatedStatus,
};
use crate::api::FIELD_MANAGER;
use crate::plan::replicated::{rebuild_node_sketch, ReplicatedEntry};
use crate::plan::{NodeRegionSummary, VmKey};

use super::shared_memory::MemoryGroup;
use super::AgentError;

/// The relay's observed transfers as the digest publishes them.
pub fn transfer_statuses(
    observed: &[crate::relay::stats::ObservedTransfer],
) -> Vec<crate::api::digest::TransferStatus> {
    observed
        .iter()
        .map(|t| crate::api::digest::TransferStatus {
            peer_relay: t.peer.clone(),
            bytes: t.bytes,
            seconds: (t.seconds * 1000.0).round() / 1000.0,
            bytes_per_second: t.bytes_per_second.round(),
            time: t.time.clone(),
        })
        .collect()
}

/// The memory groups a digest holds, read back as the agent keeps them (the inverse of what
/// [`build_bounded_status`] writes), for an agent taking up its node again after a restart. A
/// group with a member, object or time that does not read is left out with a warning.
pub fn groups_from_status(groups: &[MemoryGroupStatus]) -> Vec<MemoryGroup> {
    fn vm(text: &str) -> Option<VmKey> {
        let (namespace, name) = text.split_once('/')?;
        (!namespace.is_empty() && !name.is_empty()).then(|| VmKey::new(namespace, name))
    }
    fn read(g: &MemoryGroupStatus) -> Option<MemoryGroup> {
        Some(MemoryGroup {
            name: g.name.clone(),
            members: g.members.iter().map(|m| vm(m)).collect::<Option<_>>()?,
            shared_bytes: g.shared_bytes,
            objects: g
                .shared_objects
                .iter()
                .map(|o| MemoryGroupStatus::parse_object(o))
                .collect::<Option<_>>()?,
            recently_accessed_by: g
                .recently_accessed_by
                .iter()
                .map(|m| vm(m))
                .collect::<Option<_>>()?,
            departed_at: match &g.departed_at {
                Some(t) => Some(crate::api::time::parse_rfc3339(t)?),
                None => None,
            },
        })
    }
    groups
        .iter()
        .filter_map(|g| {
            let read = read(g);
            if read.is_none() {
                tracing::warn!(group = %g.name, "memory group in the digest does not read; not taken back");
            }
            read
        })
        .collect()
}

/// Largest serialized digest object the agent writes.
pub const MAX_DIGEST_BYTES: usize = 256 * 1024;
/// Room left for metadata (managed fields, labels) the API server adds around the status.
const METADATA_ALLOWANCE: usize = 16 * 1024;
/// Annotation whose new value makes the agent publish at once.
pub const REFRESH_ANNOTATION: &str = "commonground.dev/refresh";

/// Everything one digest is built from.
#[derive(Clone, Debug)]
pub struct DigestInputs {
    pub summary: NodeRegionSummary,
    pub vm_loads: BTreeMap<VmKey, LoadStatus>,
    pub node_load: LoadStatus,
    /// Idle CPU cores measured over the last interval, once there are two readings.
    pub idle_cpu_cores: Option<f64>,
    pub capacity: NodeCapacity,
    pub replicated: Vec<ReplicatedEntry>,
    pub replication_threshold: u32,
    pub groups: Vec<MemoryGroup>,
    pub scan_mode: String,
    pub scan_time: crate::api::time::Timestamp,
}

fn status_of(inputs: &DigestInputs) -> NodeRegionDigestStatus {
    let mut status = NodeRegionDigestStatus {
        vms: inputs
            .summary
            .vms
            .iter()
            .map(|v| crate::api::digest::VmDigest {
                namespace: v.vm.namespace.clone(),
                name: v.vm.name.clone(),
                load: inputs.vm_loads.get(&v.vm).cloned().unwrap_or_default(),
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    };
    summary_into_status(&inputs.summary, &mut status);
    status.capacity = inputs.capacity.clone();
    status.load = inputs.node_load.clone();
    status.idle_cpu_cores = inputs.idle_cpu_cores;
    status.replicated = inputs
        .replicated
        .iter()
        .map(|e| ReplicatedStatus {
            huge_pages: e.huge_pages,
            pages: e.pages,
            identity: format!("{:016x}", e.identity.0),
            replicas: e.replicas,
        })
        .collect();
    status.replication_threshold = inputs.replication_threshold;
    status.memory_groups = inputs
        .groups
        .iter()
        .map(|g| MemoryGroupStatus {
            name: g.name.clone(),
            members: g.members.iter().map(|m| m.to_string()).collect(),
            shared_bytes: g.shared_bytes,
            recently_accessed_by: g
                .recently_accessed_by
                .iter()
                .map(|m| m.to_string())
                .collect(),
            departed_at: g.departed_at.map(crate::api::time::format_rfc3339),
            // Only a kept group needs them (to be taken back after a restart).
            shared_objects: match g.departed_at {
                Some(_) => g
                    .objects
                    .iter()
                    .map(|o| MemoryGroupStatus::object_text(*o))
                    .collect(),
                None => Vec::new(),
            },
        })
        .collect();
    status.scan_time = crate::api::time::format_rfc3339(inputs.scan_time);
    status.scan_mode = inputs.scan_mode.clone();
    status
}

/// Size of the object the status would be written in.
pub fn serialized_size(node: &str, status: &NodeRegionDigestStatus) -> usize {
    let mut d = NodeRegionDigest::new(
        node,
        crate::api::digest::NodeRegionDigestSpec {
            node_name: node.to_string(),
        },
    );
    d.status = Some(status.clone());
    serde_json::to_vec(&d)
        .map(|v| v.len())
        .unwrap_or(usize::MAX)
}

/// Builds the status and coarsens every sketch (lowering the sampling threshold for all of them
/// at once, which keeps each an exact consistent sample and every VM sketch a subset of the
/// node's) and the replicated sample until the object fits. The threshold is scaled by the
/// share of the sketch bytes the bound leaves room for (sketch sizes are close to linear in the
/// threshold), so the result lands just under the bound rather than up to half below it.
pub fn build_bounded_status(inputs: &DigestInputs) -> NodeRegionDigestStatus {
    let mut inputs = inputs.clone();
    let budget = MAX_DIGEST_BYTES - METADATA_ALLOWANCE;
    loop {
        let status = status_of(&inputs);
        let size = serialized_size(&inputs.summary.node, &status);
        let threshold = inputs.summary.sketch.threshold();
        if size <= budget || threshold <= 1 {
            if size > budget {
                tracing::warn!(size, "digest still over its bound at the coarsest sketches");
            }
            return status;
        }
        let sketch_bytes =
            status.sketch.len() + status.vms.iter().map(|v| v.sketch.len()).sum::<usize>();
        let rest = size - sketch_bytes;
        // Share of the sketches (and of the replicated sample) to keep, with a 2% margin for
        // the Rice parameters and the base64 padding not scaling exactly; halve when the rest
        // alone is over the bound.
        let share = if rest < budget && sketch_bytes > 0 {
            ((budget - rest) as f64 / sketch_bytes as f64 * 0.98).min(0.99)
        } else {
            0.5
        };
        let t = ((threshold as f64 * share) as u64).clamp(1, threshold - 1);
        for v in &mut inputs.summary.vms {
            v.sketch.coarsen(t);
        }
        inputs.summary.sketch = rebuild_node_sketch(t, &inputs.summary.vms);
        inputs.summary.sketch.coarsen(t);
        let keep = (inputs.replicated.len() as f64 * share) as usize;
        inputs.replicated.truncate(keep);
    }
}

/// Why a digest is (or is not) written now.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PublishDecision {
    /// Never published, a VM arrived or left, the memory groups changed, or a refresh was asked
    /// for.
    Immediate(&'static str),
    /// Changed beyond the threshold and the minimum interval has passed.
    Changed,
    /// Unchanged for `max_quiet`: republish so `scanTime` stays fresh.
    Heartbeat,
    Skip,
}

/// Rate limiting and change detection for digest writes.
#[derive(Debug)]
pub struct PublishGate {
    pub min_interval: Duration,
    pub max_quiet: Duration,
    /// Fraction of a VM's sampled regions that must differ, or absolute composite load change.
    pub change_threshold: f64,
    last: Option<(NodeRegionSummary, f64, Instant)>,
    last_groups: Vec<MemoryGroupStatus>,
    last_refresh: Option<String>,
}

impl Default for PublishGate {
    fn default() -> Self {
        Self {
            min_interval: Duration::from_secs(60),
            max_quiet: Duration::from_secs(600),
            change_threshold: 0.02,
            last: None,
            last_groups: Vec::new(),
            last_refresh: None,
        }
    }
}

impl PublishGate {
    /// How much the new summary differs from the last published one: the largest fraction of a
    /// VM's sample not found in its previous sample, or its relative region count change.
    fn change(old: &NodeRegionSummary, new: &NodeRegionSummary) -> f64 {
        let mut worst: f64 = 0.0;
        for v in &new.vms {
            let Some(o) = old.vms.iter().find(|o| o.vm == v.vm) else {
                return 1.0;
            };
            let moved = v
                .sketch
                .overlap(&o.sketch)
                .fraction()
                .map(|f| 1.0 - f)
                .unwrap_or(0.0);
            let size = (v.regions as f64 - o.regions as f64).abs() / (o.regions.max(1) as f64);
            worst = worst.max(moved).max(size);
        }
        worst
    }

    /// Whether `groups` name a member touching shared memory that the last published groups
    /// did not.
    fn new_access(&self, groups: &[MemoryGroupStatus]) -> bool {
        groups.iter().any(|g| {
            let before = self.last_groups.iter().find(|o| o.name == g.name);
            g.recently_accessed_by
                .iter()
                .any(|m| before.is_none_or(|o| !o.recently_accessed_by.contains(m)))
        })
    }

    pub fn decide(
        &self,
        summary: &NodeRegionSummary,
        load: f64,
        groups: &[MemoryGroupStatus],
        refresh: Option<&str>,
        now: Instant,
    ) -> PublishDecision {
        let Some((old, old_load, at)) = &self.last else {
            return PublishDecision::Immediate("first digest");
        };
        if refresh.is_some() && refresh != self.last_refresh.as_deref() {
            return PublishDecision::Immediate("refresh requested");
        }
        let mut old_vms: Vec<&VmKey> = old.vms.iter().map(|v| &v.vm).collect();
        let mut new_vms: Vec<&VmKey> = summary.vms.iter().map(|v| &v.vm).collect();
        old_vms.sort();
        new_vms.sort();
        if old_vms != new_vms {
            return PublishDecision::Immediate("VMs changed");
        }
        // Group changes are rare and a Follow migration waits on them: no rate limit.
        if self.new_access(groups) {
            return PublishDecision::Immediate("shared memory accessed");
        }
        if groups != self.last_groups.as_slice() {
            return PublishDecision::Immediate("memory groups changed");
        }
        let since = now.duration_since(*at);
        if since < self.min_interval {
            return PublishDecision::Skip;
        }
        if Self::change(old, summary) > self.change_threshold
            || (load - old_load).abs() > self.change_threshold.max(0.05)
        {
            return PublishDecision::Changed;
        }
        if since >= self.max_quiet {
            return PublishDecision::Heartbeat;
        }
        PublishDecision::Skip
    }

    pub fn published(
        &mut self,
        summary: NodeRegionSummary,
        load: f64,
        groups: Vec<MemoryGroupStatus>,
        refresh: Option<String>,
        now: Instant,
    ) {
        self.last = Some((summary, load, now));
        self.last_groups = groups;
        if refresh.is_some() {
            self.last_refresh = refresh;
        }
    }
}

/// The digest object as the agent applies it to the main resource: its spec, and an owner
/// reference to its Node when the Node's uid is known, so that deleting the Node deletes the
/// digest too (the garbage collector). Not a controller reference, and it does not block the
/// Node's deletion.
pub fn digest_object(node: &str, node_uid: Option<&str>) -> serde_json::Value {
    let mut metadata = serde_json::json!({ "name": node });
    if let Some(uid) = node_uid {
        metadata["ownerReferences"] = serde_json::json!([{
            "apiVersion": "v1",
            "kind": "Node",
            "name": node,
            "uid": uid,
            "blockOwnerDeletion": false,
        }]);
    }
    serde_json::json!({
        "apiVersion": "commonground.dev/v1alpha1",
        "kind": "NodeRegionDigest",
        "metadata": metadata,
        "spec": { "nodeName": node },
    })
}

/// Creates the digest object if needed and writes its status, both by server-side apply with
/// one field manager: metadata and spec on the main resource ([`digest_object`]), status on the
/// status subresource, which ignores everything but the status. An apply without `node_uid`
/// drops an owner reference this manager set before; the agent passes the uid whenever it
/// has read it.
pub async fn apply(
    api: &Api<NodeRegionDigest>,
    node: &str,
    node_uid: Option<&str>,
    status: &NodeRegionDigestStatus,
) -> Result<(), AgentError> {
    let params = PatchParams::apply(FIELD_MANAGER).force();
    api.patch(node, &params, &Patch::Apply(&digest_object(node, node_uid)))
        .await
        .map_err(|e| AgentError::Kube {
            what: format!("apply NodeRegionDigest {node}"),
            source: Box::new(e),
        })?;
    crate::api::write::apply_status(api, FIELD_MANAGER, node, status)
        .await
        .map_err(|e| AgentError::Kube {
            what: format!("apply NodeRegionDigest {node} status"),
            source: Box::new(e),
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::plan::region::{RegionGeometry, RegionId};
    use crate::plan::sketch::{RegionSketch, KEY_SPACE};
    use crate::plan::VmRegionSummary;
    use rand::{Rng, SeedableRng};

    fn inputs(vms: usize, regions_per_vm: usize) -> DigestInputs {
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let vms: Vec<VmRegionSummary> = (0..vms)
            .map(|i| VmRegionSummary {
                vm: VmKey::new("ns", format!("vm{i}")),
                memory_bytes: regions_per_vm as u64 * 65536,
                regions: regions_per_vm as u64,
                zero_regions: 0,
                sketch: RegionSketch::from_ids(
                    KEY_SPACE,
                    (0..regions_per_vm).map(|_| RegionId(rng.random())),
                ),
                dirty_rate: 0.0,
                working_set_bytes: 0,
                load: 0.0,
            })
            .collect();
        DigestInputs {
            summary: NodeRegionSummary {
                node: "n1".into(),
                work_group: "a".into(),
                geometry: RegionGeometry::default(),
                key_id: "k".into(),
                sketch: rebuild_node_sketch(KEY_SPACE, &vms),
                vms,
            },
            vm_loads: BTreeMap::new(),
            node_load: LoadStatus::default(),
            idle_cpu_cores: None,
            capacity: NodeCapacity::default(),
            replicated: Vec::new(),
            replication_threshold: 2,
            groups: Vec::new(),
            scan_mode: "Sampled".into(),
            scan_time: crate::api::time::Timestamp::now(),
        }
    }

    #[test]
    fn measured_idle_cpu_is_published_and_absent_without_a_reading() {
        let mut i = inputs(1, 10);
        assert_eq!(build_bounded_status(&i).idle_cpu_cores, None);
        i.idle_cpu_cores = Some(5.5);
        assert_eq!(build_bounded_status(&i).idle_cpu_cores, Some(5.5));
    }

    #[test]
    fn large_digest_is_coarsened_under_the_bound() {
        let i = inputs(20, 20_000);
        let unbounded = status_of(&i);
        assert!(serialized_size("n1", &unbounded) > MAX_DIGEST_BYTES);
        let status = build_bounded_status(&i);
        let size = serialized_size("n1", &status);
        assert!(size <= MAX_DIGEST_BYTES - METADATA_ALLOWANCE, "{size}");
        assert!(
            size > (MAX_DIGEST_BYTES - METADATA_ALLOWANCE) * 9 / 10,
            "does not throw away more than needed: {size}"
        );
        assert_eq!(
            status.vm_sketch_encoding,
            crate::api::digest::VmSketchEncoding::NodeIndexed
        );
        let node = RegionSketch::from_base64(&status.sketch).unwrap();
        assert!(node.threshold() < KEY_SPACE);
        assert!(node.len() > 1000, "coarsened, not emptied");
        assert_eq!(status.vm_count, 20);
        // Every VM sketch reads back against the node sketch, at the node's threshold.
        let mut d = NodeRegionDigest::new(
            "n1",
            crate::api::digest::NodeRegionDigestSpec {
                node_name: "n1".into(),
            },
        );
        d.status = Some(status.clone());
        let summary = d.to_summary().unwrap();
        for v in &summary.vms {
            assert_eq!(v.sketch.threshold(), node.threshold());
            assert!(v.sketch.keys().iter().all(|k| node.contains(*k)));
        }
        // Twenty disjoint VMs: about 1.3 node sketches of bytes instead of 2, so the node keeps
        // clearly more samples than standalone VM sketches would leave room for.
        let standalone: usize = status.sketch.len()
            + summary
                .vms
                .iter()
                .map(|v| v.sketch.to_base64().len())
                .sum::<usize>();
        let indexed: usize =
            status.sketch.len() + status.vms.iter().map(|v| v.sketch.len()).sum::<usize>();
        assert!(indexed * 10 < standalone * 7, "{indexed} vs {standalone}");
    }

    #[test]
    fn small_digest_is_left_exact() {
        let i = inputs(2, 100);
        let status = build_bounded_status(&i);
        assert_eq!(status, status_of(&i));
    }

    #[test]
    fn gate_limits_steady_state_writes_and_publishes_changes() {
        let i = inputs(2, 1000);
        let mut gate = PublishGate::default();
        let t0 = Instant::now();
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[], None, t0),
            PublishDecision::Immediate("first digest")
        );
        gate.published(i.summary.clone(), 0.1, Vec::new(), None, t0);
        let same_later = t0 + Duration::from_secs(120);
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[], None, same_later),
            PublishDecision::Skip
        );
        let mut changed = i.summary.clone();
        changed.vms[0].sketch = RegionSketch::from_keys(KEY_SPACE, 0..1000u64);
        assert_eq!(
            gate.decide(&changed, 0.1, &[], None, t0 + Duration::from_secs(30)),
            PublishDecision::Skip,
            "at most once per minute"
        );
        assert_eq!(
            gate.decide(&changed, 0.1, &[], None, same_later),
            PublishDecision::Changed
        );
        let mut fewer = i.summary.clone();
        fewer.vms.pop();
        assert_eq!(
            gate.decide(&fewer, 0.1, &[], None, t0 + Duration::from_secs(1)),
            PublishDecision::Immediate("VMs changed")
        );
        assert_eq!(
            gate.decide(
                &i.summary,
                0.1,
                &[],
                Some("after-migration-1"),
                t0 + Duration::from_secs(1)
            ),
            PublishDecision::Immediate("refresh requested")
        );
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[], None, t0 + Duration::from_secs(601)),
            PublishDecision::Heartbeat
        );
    }

    #[test]
    fn a_kept_group_reads_back_from_the_status_as_it_was_published() {
        let mut i = inputs(2, 10);
        let departed = crate::api::time::parse_rfc3339("2026-12-02T10:00:00Z").unwrap();
        let kept = MemoryGroup {
            name: "shm-common".into(),
            members: vec![VmKey::new("ns", "vm0"), VmKey::new("ns", "vm1")],
            shared_bytes: 1 << 20,
            objects: vec![(0, 26, 77), (0, 26, 78)],
            recently_accessed_by: vec![VmKey::new("ns", "vm1")],
            departed_at: Some(departed),
        };
        let whole = MemoryGroup {
            name: "shm-other".into(),
            objects: vec![(0, 26, 90)],
            recently_accessed_by: Vec::new(),
            departed_at: None,
            ..kept.clone()
        };
        i.groups = vec![kept.clone(), whole];
        let status = build_bounded_status(&i);
        let g = &status.memory_groups;
        assert_eq!(g[0].departed_at.as_deref(), Some("2026-12-02T10:00:00Z"));
        assert_eq!(g[0].shared_objects, ["0:26:77", "0:26:78"]);
        assert_eq!(g[1].departed_at, None);
        assert!(
            g[1].shared_objects.is_empty(),
            "only a kept group needs its objects"
        );
        let back = groups_from_status(g);
        assert_eq!(back[0], kept);
        assert_eq!(back[1].departed_at, None);

        // What does not read is left out, not half read.
        let mut bad = g.clone();
        bad[0].shared_objects.push("0:26".into());
        bad[1].members.push("no-namespace".into());
        assert!(groups_from_status(&bad).is_empty());
        let mut bad_time = g.clone();
        bad_time[0].departed_at = Some("yesterday".into());
        assert_eq!(groups_from_status(&bad_time).len(), 1);
    }

    #[test]
    fn gate_publishes_group_changes_at_once_and_names_new_accesses() {
        let i = inputs(2, 100);
        let mut gate = PublishGate::default();
        let t0 = Instant::now();
        let group = |accessed: &[&str]| MemoryGroupStatus {
            name: "shm-common".into(),
            members: vec!["ns/vm0".into(), "ns/vm1".into()],
            shared_bytes: 1 << 20,
            recently_accessed_by: accessed.iter().map(|a| a.to_string()).collect(),
            ..Default::default()
        };
        gate.published(i.summary.clone(), 0.1, vec![group(&[])], None, t0);
        let soon = t0 + Duration::from_secs(1);
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[group(&[])], None, soon),
            PublishDecision::Skip
        );
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[group(&["ns/vm1"])], None, soon),
            PublishDecision::Immediate("shared memory accessed"),
            "within the minimum interval"
        );
        gate.published(i.summary.clone(), 0.1, vec![group(&["ns/vm1"])], None, soon);
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[group(&["ns/vm1"])], None, soon),
            PublishDecision::Skip
        );
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[group(&[])], None, soon),
            PublishDecision::Immediate("memory groups changed")
        );
        assert_eq!(
            gate.decide(&i.summary, 0.1, &[], None, soon),
            PublishDecision::Immediate("memory groups changed")
        );
    }

    #[test]
    fn digest_object_is_owned_by_its_node_once_the_uid_is_known() {
        let owned = digest_object("n1", Some("6a1c-uid"));
        let refs = owned["metadata"]["ownerReferences"].as_array().unwrap();
        assert_eq!(refs.len(), 1);
        assert_eq!(
            refs[0],
            serde_json::json!({
                "apiVersion": "v1",
                "kind": "Node",
                "name": "n1",
                "uid": "6a1c-uid",
                "blockOwnerDeletion": false,
            })
        );
        assert!(refs[0].get("controller").is_none());
        assert_eq!(owned["spec"]["nodeName"], "n1");
        // It deserializes as the API type, owner reference included.
        let typed: NodeRegionDigest = serde_json::from_value(owned).unwrap();
        let typed_refs = typed.metadata.owner_references.unwrap();
        assert_eq!(typed_refs[0].uid, "6a1c-uid");
        assert_eq!(typed_refs[0].block_owner_deletion, Some(false));

        let unowned = digest_object("n1", None);
        assert!(unowned["metadata"].get("ownerReferences").is_none());
        assert_eq!(unowned["metadata"]["name"], "n1");
    }
}
