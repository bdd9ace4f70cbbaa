//! Interception: how the relay gets into KubeVirt's migration path without changing KubeVirt.
//!
//! The source virt-handler copies a migration from the launcher's unix socket to TCP
//! connections towards the target virt-handler, at the address and ports the target publishes
//! in the VMI's `status.migrationState`. The agent enters the source virt-handler's network
//! namespace and there:
//! - opens the relay's listening socket ([`netns`]);
//! - holds an nftables table that redirects new connections to the published target ports to
//!   that socket ([`ruleset`], the rules as text; [`owned_table`], the `nft` process that owns
//!   them);
//! - learns, for each redirected connection, where it was going ([`original_dst`]), which the
//!   target relay delivers to.
//!
//! Only the port that carries QEMU's memory stream is redirected ([`migration_ports`]); libvirt's
//! connection and block migration go direct.
//!
//! Fail open, by construction: the table belongs to the agent's `nft` process and vanishes with
//! it, each destination expires on its own, and a destination is only added for a migration
//! that is starting. A connection that is not redirected goes direct, as it would without
//! commonground.

pub mod migration_ports;
pub mod netns;
pub mod original_dst;
pub mod owned_table;
pub mod ruleset;

use std::path::PathBuf;

pub use migration_ports::memory_stream_targets;
pub use netns::NetNs;
pub use original_dst::original_destination;
pub use owned_table::OwnedTable;

#[derive(Debug, thiserror::Error)]
pub enum InterceptError {
    #[error("network namespace {}: {what}", path.display())]
    Namespace { path: PathBuf, what: String },
    #[error("nft: {0}")]
    Nft(String),
    #[error("nft refused the interception rules: {0}")]
    Refused(String),
}
