//! The API client every component uses: the in-cluster or kubeconfig configuration, and a
//! User-Agent that names the component (and, for the agent, its node). An administrator
//! reading the API server's audit log or its `apiserver_request_total` by client sees which
//! commonground component, on which node, made a request.

use axum::http::{header::USER_AGENT, HeaderValue};

/// `commonground-<component>/<version>`, with `(<detail>)` when given (the agent's node).
pub fn user_agent(component: &str, detail: Option<&str>) -> String {
    let version = env!("CARGO_PKG_VERSION");
    match detail {
        Some(d) => format!("commonground-{component}/{version} ({d})"),
        None => format!("commonground-{component}/{version}"),
    }
}

/// A client from the inferred configuration (in-cluster, else `KUBECONFIG`), identified as
/// [`user_agent`].
pub async fn connect(component: &str, detail: Option<&str>) -> Result<kube::Client, kube::Error> {
    let mut config = kube::Config::infer()
        .await
        .map_err(kube::Error::InferConfig)?;
    // A node name is a DNS label, so the header is always valid; were it not, the client
    // goes without the detail rather than failing.
    let value = HeaderValue::from_str(&user_agent(component, detail))
        .or_else(|_| HeaderValue::from_str(&user_agent(component, None)))
        .expect("a component name is plain ASCII");
    config.headers.push((USER_AGENT, value));
    kube::Client::try_from(config)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_the_component_version_and_node() {
        let v = env!("CARGO_PKG_VERSION");
        assert_eq!(
            user_agent("agent", Some("node n1")),
            format!("commonground-agent/{v} (node n1)")
        );
        assert_eq!(
            user_agent("controller", None),
            format!("commonground-controller/{v}")
        );
    }
}
