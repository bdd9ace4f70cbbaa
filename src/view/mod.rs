//! The cluster as the controller and the extender see it: watch-fed stores and the conversion
//! of Kubernetes objects into the planner's plain facts.

pub mod args;
pub mod bandwidth;
pub mod convert;
pub mod fit;
pub mod quantity;
pub mod store;

pub use args::ViewArgs;
#[cfg(test)]
pub use store::Fixed;
pub use store::{ClusterView, MigrationLimits, ViewConfig};
