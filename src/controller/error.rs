//! What can go wrong in the controller; each kind becomes a condition reason, an Event reason
//! and a metric label.

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("planning {vm}: {source}")]
    Plan {
        vm: String,
        source: crate::plan::PlanError,
    },
    #[error("object {0} has no namespace or name")]
    MalformedObject(String),
    #[error("serializing status: {0}")]
    Serialize(#[from] serde_json::Error),
    #[error("the commonground CRDs are not installed ({0}); install them with `kubectl apply -f crds/` or the Helm chart")]
    CrdsMissing(String),
    #[error("leader election: {0}")]
    Leader(String),
    #[error("invalid flag: {0}")]
    Config(String),
    #[error("{0}")]
    Io(#[from] std::io::Error),
}

impl ControllerError {
    /// Short CamelCase kind for metrics and Event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(_) => "KubeApi",
            Self::Finalizer(_) => "Finalizer",
            Self::Plan { .. } => "Plan",
            Self::MalformedObject(_) => "MalformedObject",
            Self::Serialize(_) => "Serialize",
            Self::CrdsMissing(_) => "CrdsMissing",
            Self::Leader(_) => "LeaderElection",
            Self::Config(_) => "Config",
            Self::Io(_) => "Io",
        }
    }
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;
