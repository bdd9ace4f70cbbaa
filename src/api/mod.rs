//! Kubernetes API types: commonground's own CRDs (group `commonground.dev`, `v1alpha1`) and the
//! KubeVirt and Multus types we read or write. Doc comments on CRD fields become the
//! schema descriptions that `kubectl explain` shows.

// kube-derive takes repeated `printcolumn`/`category` attributes by design.
#![allow(clippy::duplicated_attributes)]

pub mod client;
pub mod conditions;
pub mod digest;
pub mod kubevirt;
pub mod migration;
pub mod network;
pub mod rebalance;
pub mod time;
pub mod write;

pub use digest::NodeRegionDigest;
pub use migration::VirtualMachineMigration;
pub use network::MigrationNetwork;
pub use rebalance::RebalancePolicy;

pub const GROUP: &str = "commonground.dev";
/// Field manager for every server-side apply commonground makes.
pub const FIELD_MANAGER: &str = "commonground";

/// Every CRD commonground installs, in the order `commonground crd` prints them.
pub fn crds(
) -> Vec<k8s_openapi::apiextensions_apiserver::pkg::apis::apiextensions::v1::CustomResourceDefinition>
{
    use kube::CustomResourceExt;
    vec![
        VirtualMachineMigration::crd(),
        NodeRegionDigest::crd(),
        RebalancePolicy::crd(),
        MigrationNetwork::crd(),
    ]
}

/// The CRDs as one multi-document YAML stream (what `crds/` must equal).
pub fn crds_yaml() -> String {
    let mut out = String::new();
    for crd in crds() {
        out.push_str("---\n");
        out.push_str(&serde_yaml_ng::to_string(&crd).expect("CRDs serialize"));
    }
    out
}
