//! What can go wrong in the controller; each kind becomes a condition reason, an Event reason
//! and a metric label, and decides whether retrying can help.

#[derive(Debug, thiserror::Error)]
pub enum ControllerError {
    #[error("Kubernetes API: {0}")]
    Kube(#[from] kube::Error),
    #[error("finalizer: {0}")]
    Finalizer(String),
    #[error("object {0} has no namespace or name")]
    MalformedObject(String),
    #[error("the commonground CRDs are not installed ({0}); install them with `kubectl apply -f crds/` or the Helm chart")]
    CrdsMissing(String),
    #[error("leader election: {0}")]
    Leader(String),
    #[error("invalid flag: {0}")]
    Config(String),
    #[error("{0}")]
    InvalidSpec(#[from] super::validate::SpecError),
    #[error("reconcile panicked: {0}")]
    Panicked(String),
}

impl ControllerError {
    /// Short CamelCase kind for metrics, condition and Event reasons.
    pub fn kind(&self) -> &'static str {
        match self {
            Self::Kube(kube::Error::Api(s)) => match s.code {
                404 if missing_resource_type(s) => "ResourceTypeMissing",
                404 => "NotFound",
                409 => "Conflict",
                429 => "TooManyRequests",
                400 | 422 => "Rejected",
                401 | 403 => "Forbidden",
                408 | 504 => "Timeout",
                500..=599 => "ServerError",
                _ => "KubeApi",
            },
            Self::Kube(_) => "Transport",
            Self::Finalizer(_) => "Finalizer",
            Self::MalformedObject(_) => "MalformedObject",
            Self::CrdsMissing(_) => "CrdsMissing",
            Self::Leader(_) => "LeaderElection",
            Self::Config(_) => "Config",
            Self::InvalidSpec(_) => "InvalidSpec",
            Self::Panicked(_) => "Panicked",
        }
    }

    /// Whether trying the same reconcile again later can succeed. API conflicts, throttling,
    /// timeouts, server errors, lost connections and missing permissions (RBAC can be fixed
    /// while we wait) can; a spec the API server accepted but we cannot use, a request the
    /// API server rejects as invalid, or a resource type that is not installed cannot, until
    /// the object (or the cluster) changes.
    pub fn retriable(&self) -> bool {
        match self {
            Self::Kube(kube::Error::Api(s)) => match s.code {
                404 => !missing_resource_type(s),
                400 | 422 => false,
                _ => true,
            },
            Self::Kube(_) | Self::Finalizer(_) | Self::Leader(_) | Self::Panicked(_) => true,
            Self::MalformedObject(_)
            | Self::CrdsMissing(_)
            | Self::Config(_)
            | Self::InvalidSpec(_) => false,
        }
    }
}

/// A 404 for the resource type itself (its CRD is not installed), not for one object of it.
fn missing_resource_type(status: &kube::core::Status) -> bool {
    status
        .message
        .contains("could not find the requested resource")
}

pub type Result<T, E = ControllerError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    fn api(code: u16, message: &str) -> ControllerError {
        ControllerError::Kube(kube::Error::Api(
            kube::core::Status::failure(message, "")
                .with_code(code)
                .boxed(),
        ))
    }

    #[test]
    fn conflicts_timeouts_and_server_errors_are_retried() {
        for (code, kind) in [
            (409, "Conflict"),
            (429, "TooManyRequests"),
            (504, "Timeout"),
            (500, "ServerError"),
            (503, "ServerError"),
            (403, "Forbidden"),
            (404, "NotFound"),
        ] {
            let e = api(code, "virtualmachinemigrations \"x\" not found");
            assert_eq!(e.kind(), kind, "{code}");
            assert!(e.retriable(), "{code}");
        }
    }

    #[test]
    fn what_retrying_cannot_fix_is_not_retried() {
        let missing = api(404, "the server could not find the requested resource");
        assert_eq!(missing.kind(), "ResourceTypeMissing");
        assert!(!missing.retriable());
        let invalid = api(422, "metadata.labels: Invalid value");
        assert_eq!(invalid.kind(), "Rejected");
        assert!(!invalid.retriable());
        let spec = ControllerError::InvalidSpec(crate::controller::validate::SpecError {
            field: "spec.maxDuration",
            error: crate::view::quantity::QuantityError::DurationTooLong("1e9h".into()),
        });
        assert_eq!(spec.kind(), "InvalidSpec");
        assert!(!spec.retriable());
        assert!(ControllerError::Panicked("boom".into()).retriable());
    }
}
