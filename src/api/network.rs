//! `MigrationNetwork`: an extra network path a migration can use (more bandwidth when the estimate exceeds the time budget).

use kube::{CustomResource, KubeSchema};
use serde::{Deserialize, Serialize};

/// A network path for live migrations: a Multus NetworkAttachmentDefinition with its nominal
/// bandwidth, setup time, activation method and the nodes that have it.
#[derive(CustomResource, KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq)]
#[kube(
    group = "commonground.dev",
    version = "v1alpha1",
    kind = "MigrationNetwork",
    shortname = "mnet",
    category = "commonground",
    status = "MigrationNetworkStatus",
    derive = "PartialEq",
    doc = "A network path live migrations can add to meet their time budget.",
    printcolumn(
        name = "NAD",
        type_ = "string",
        json_path = ".spec.networkAttachmentDefinition.name"
    ),
    printcolumn(name = "Bandwidth", type_ = "string", json_path = ".spec.bandwidth"),
    printcolumn(name = "Activation", type_ = "string", json_path = ".spec.activation"),
    printcolumn(name = "InUseBy", type_ = "string", json_path = ".status.inUseBy"),
    printcolumn(
        name = "Age",
        type_ = "date",
        json_path = ".metadata.creationTimestamp"
    )
)]
#[serde(rename_all = "camelCase")]
pub struct MigrationNetworkSpec {
    /// The Multus NetworkAttachmentDefinition (k8s.cni.cncf.io/v1) carrying the path.
    pub network_attachment_definition: NadReference,
    /// Nominal bandwidth, as a Kubernetes quantity in bytes per second (e.g. `1250Mi` for 10 Gbit/s).
    #[schemars(regex(pattern = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|k|M|G|T)?$"))]
    pub bandwidth: String,
    /// Expected time to set the path up (Go duration).
    #[serde(default = "default_setup")]
    #[schemars(regex(pattern = r"^([0-9]+(\.[0-9]+)?(ms|s|m|h))+$"))]
    pub setup_time: String,
    /// `Preattached`: the network is already attached on the nodes that have it and usable as
    /// is. (commonground does not change a node's network configuration.)
    #[serde(default)]
    pub activation: Activation,
    /// Nodes that have this path: label selector (matchLabels).
    #[serde(default, skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub node_selector: std::collections::BTreeMap<String, String>,
}

fn default_setup() -> String {
    "5s".into()
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
pub struct NadReference {
    pub namespace: String,
    pub name: String,
}

/// How a path becomes usable.
#[derive(
    schemars::JsonSchema, Serialize, Deserialize, Clone, Copy, Debug, PartialEq, Eq, Default,
)]
pub enum Activation {
    /// Attached on the nodes already; nothing to do but use it.
    #[default]
    Preattached,
    /// Removed: commonground used to edit the node's bond through nmstate. The schema no
    /// longer admits it; an object stored before still reads, and the controller leaves such
    /// a path out with a reason instead of touching the node.
    #[schemars(skip)]
    Nmstate,
}

#[derive(KubeSchema, Serialize, Deserialize, Clone, Debug, PartialEq, Default)]
#[serde(rename_all = "camelCase")]
pub struct MigrationNetworkStatus {
    /// The VirtualMachineMigration (namespace/name) currently using the path.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_use_by: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub since: Option<String>,
}
