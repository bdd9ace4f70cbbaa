//! The planning core: plain Rust, no Kubernetes types. The controller, the extender and
//! `simulate` all call these functions, so what is measured offline is what runs in a cluster.

pub mod affinity;
pub mod cluster;
pub mod estimate;
pub mod hardware;
pub mod ksm;
pub mod launcher;
pub mod move_time;
pub mod overlap_index;
pub mod paths;
pub mod planner;
pub mod rank;
pub mod rebalance;
pub mod region;
pub mod replicated;
pub mod sketch;
pub mod workgroups;

pub use cluster::*;
pub use planner::{Plan, PlanError, PlanOptions, Planner, Scope, Verdict};
