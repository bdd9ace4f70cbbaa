//! commonground's end-to-end harness: the real control plane (`e2e/cluster`), per-test
//! namespaces and fake nodes, polling helpers, the KubeVirt stand-in and guest-memory helpers.
//!
//! ```no_run
//! # async fn t() -> anyhow::Result<()> {
//! use commonground_e2e::{cluster::TestCluster, nodes::FakeNode};
//! let ns = TestCluster::get().fresh_namespace("demo").await?;
//! let _standin = ns.start_standin(Default::default());
//! ns.create_fake_node(FakeNode::new(ns.node_name("a"), "wg-1")).await?;
//! ns.create_vmi(ns.vmi("vm", "1Gi", "1")).await?;
//! # Ok(()) }
//! ```

pub mod cluster;
pub mod memory;
pub mod nodes;
pub mod standin;
pub mod wait;

pub use cluster::{TestCluster, TestNamespace};
pub use nodes::{create_bench_nodes, create_fake_node, FakeNode};
pub use wait::{wait_for, wait_for_object};

/// Label on every namespace and node the harness creates.
pub const E2E_LABEL: &str = "e2e.commonground.dev/test";
/// Label tying fake nodes to the test namespace that owns them; VMIs built with
/// [`TestNamespace::vmi`] select it, so tests sharing one cluster never use each other's nodes.
pub const POOL_LABEL: &str = "e2e.commonground.dev/pool";

/// Installs a tracing subscriber once (test output capture friendly; `RUST_LOG` filters).
pub fn init_tracing() {
    use std::sync::Once;
    static ONCE: Once = Once::new();
    ONCE.call_once(|| {
        let filter = tracing_subscriber::EnvFilter::try_from_default_env()
            .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new("info,kube=warn"));
        let _ = tracing_subscriber::fmt()
            .with_env_filter(filter)
            .with_test_writer()
            .try_init();
    });
}
