//! commonground: KubeVirt live-migration placement by memory in common, work-group distance and
//! load. See README.md for the architecture.

pub mod agent;
pub mod api;
pub mod cli;
pub mod controller;
pub mod extender;
pub mod plan;
pub mod relay;
pub mod simulate;
pub mod telemetry;
pub mod view;
