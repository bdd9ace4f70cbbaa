//! What the agent reads from the API server, and how little: three watches scoped to its own
//! node, kept in memory, so that a scan interval costs the API server no request at all.
//!
//! - the VMIs on this node, selected by KubeVirt's `kubevirt.io/nodeName` label (the selector
//!   virt-handler uses for its own node), never a cluster-wide list;
//! - this node's Node object (`metadata.name` field selector): its work group label and uid;
//! - this node's own NodeRegionDigest (`metadata.name` field selector): whether it still
//!   exists and the refresh annotation the controller sets.
//!
//! At 5,000 nodes and a 10 s interval, listing every VMI on every interval was 500
//! cluster-wide lists per second; with these watches the API server sends each agent only
//! the changes to its own objects. Writes are the publish gate's business (`publish.rs`).

use std::collections::BTreeSet;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

use futures::{FutureExt, StreamExt};
use k8s_openapi::api::core::v1::Node;
use kube::runtime::reflector::{ObjectRef, Store};
use kube::runtime::watcher;
use kube::{Api, Client};

use super::publish::REFRESH_ANNOTATION;
use crate::api::kubevirt::{VirtualMachineInstance, NODE_NAME_LABEL};
use crate::api::NodeRegionDigest;
use crate::plan::VmKey;
use crate::view::store::watch;

/// What the agent needs of its Node object.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct NodeFacts {
    /// The work group label's value, "" when the label is missing.
    pub work_group: String,
    /// For the digest's owner reference.
    pub uid: Option<String>,
}

/// The agent's own digest as the watch last saw it.
#[derive(Debug, PartialEq, Eq)]
pub enum OwnDigest {
    /// The first list has not come back yet: nothing is known.
    Unknown,
    /// There is none (never published, or deleted: by the garbage collector when the Node
    /// was deleted, or by hand).
    Missing,
    /// It exists, with the controller's refresh annotation if set.
    Present { refresh: Option<String> },
}

/// The three scoped watches of one node.
pub struct NodeWatches {
    node: String,
    vmis: Store<VirtualMachineInstance>,
    nodes: Store<Node>,
    digests: Store<NodeRegionDigest>,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NodeWatches {
    /// Starts the watches as background tasks (stopped when this is dropped).
    pub fn start(client: &Client, node: &str) -> Self {
        let version = Arc::new(AtomicU64::new(0));
        let mut tasks = Vec::new();
        let by_label = watcher::Config::default().labels(&format!("{NODE_NAME_LABEL}={node}"));
        let by_name = watcher::Config::default().fields(&format!("metadata.name={node}"));
        let (vmis, s) = watch(
            Api::<VirtualMachineInstance>::all(client.clone()),
            by_label,
            version.clone(),
        );
        tasks.push(tokio::spawn(s.for_each(|_| async {})));
        let (nodes, s) = watch(
            Api::<Node>::all(client.clone()),
            by_name.clone(),
            version.clone(),
        );
        tasks.push(tokio::spawn(s.for_each(|_| async {})));
        let (digests, s) = watch(
            Api::<NodeRegionDigest>::all(client.clone()),
            by_name,
            version,
        );
        tasks.push(tokio::spawn(s.for_each(|_| async {})));
        NodeWatches {
            node: node.to_string(),
            vmis,
            nodes,
            digests,
            tasks,
        }
    }

    /// Every watch has seen its first full list.
    pub fn ready(&self) -> bool {
        let listed = |ready: Option<Result<(), _>>| matches!(ready, Some(Ok(())));
        listed(self.vmis.wait_until_ready().now_or_never())
            && listed(self.nodes.wait_until_ready().now_or_never())
            && listed(self.digests.wait_until_ready().now_or_never())
    }

    /// The store of this node's VMIs (shared with the relay path's loop).
    pub fn vmi_store(&self) -> Store<VirtualMachineInstance> {
        self.vmis.clone()
    }

    /// The VMs KubeVirt runs on this node.
    pub fn vms(&self) -> BTreeSet<VmKey> {
        vms_on_node(&self.vmis.state(), &self.node)
    }

    /// The node's work group and uid (empty while the Node does not exist).
    pub fn node_facts(&self, work_group_label: &str) -> NodeFacts {
        facts_of(
            self.nodes.get(&ObjectRef::new(&self.node)).as_deref(),
            work_group_label,
        )
    }

    pub fn own_digest(&self) -> OwnDigest {
        if self.digests.wait_until_ready().now_or_never().is_none() {
            return OwnDigest::Unknown;
        }
        match self.digests.get(&ObjectRef::new(&self.node)) {
            None => OwnDigest::Missing,
            Some(d) => OwnDigest::Present {
                refresh: d
                    .metadata
                    .annotations
                    .as_ref()
                    .and_then(|a| a.get(REFRESH_ANNOTATION).cloned()),
            },
        }
    }
}

impl Drop for NodeWatches {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// The VMs of `vmis` (already selected by label) whose status also puts them on `node`: a VMI
/// whose label was moved but whose status was not yet (or the reverse) is not counted twice
/// across two agents.
pub fn vms_on_node(vmis: &[Arc<VirtualMachineInstance>], node: &str) -> BTreeSet<VmKey> {
    vmis.iter()
        .filter(|v| v.node_name() == Some(node))
        .filter_map(|v| {
            Some(VmKey::new(
                v.metadata.namespace.clone()?,
                v.metadata.name.clone()?,
            ))
        })
        .collect()
}

/// The work group label's value and the uid of a Node, if there is one.
pub fn facts_of(node: Option<&Node>, work_group_label: &str) -> NodeFacts {
    let Some(n) = node else {
        return NodeFacts::default();
    };
    NodeFacts {
        work_group: n
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(work_group_label).cloned())
            .unwrap_or_default(),
        uid: n.metadata.uid.clone(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::api::kubevirt::VmiStatus;

    fn vmi(ns: &str, name: &str, node: Option<&str>) -> Arc<VirtualMachineInstance> {
        let mut v = VirtualMachineInstance::new(name, Default::default());
        v.metadata.namespace = Some(ns.into());
        v.status = Some(VmiStatus {
            node_name: node.map(String::from),
            ..Default::default()
        });
        Arc::new(v)
    }

    #[test]
    fn only_vmis_whose_status_is_on_this_node_count() {
        let vmis = [
            vmi("a", "here", Some("n1")),
            vmi("b", "moved-away", Some("n2")),
            vmi("c", "not-scheduled", None),
        ];
        let vms = vms_on_node(&vmis, "n1");
        assert_eq!(vms, BTreeSet::from([VmKey::new("a", "here")]));
    }

    #[test]
    fn node_facts_come_from_the_label_and_uid() {
        let mut n = Node::default();
        n.metadata.name = Some("n1".into());
        n.metadata.uid = Some("u-1".into());
        n.metadata.labels = Some([("wg".to_string(), "rack-3".to_string())].into());
        assert_eq!(
            facts_of(Some(&n), "wg"),
            NodeFacts {
                work_group: "rack-3".into(),
                uid: Some("u-1".into())
            }
        );
        assert_eq!(facts_of(Some(&n), "other").work_group, "");
        assert_eq!(facts_of(None, "wg"), NodeFacts::default());
    }
}
