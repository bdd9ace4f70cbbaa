//! Glue for the admin subcommands that are not long-running services.

pub mod crd;
pub mod digest;
pub mod estimate;
