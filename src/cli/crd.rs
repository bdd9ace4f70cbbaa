//! `commonground crd`: prints the CRD YAML that `crds/` must equal.

use std::path::PathBuf;

#[derive(clap::Args, Debug)]
pub struct CrdArgs {
    /// Write to this file instead of standard output.
    #[arg(long)]
    pub output: Option<PathBuf>,
}

pub fn run(args: CrdArgs) -> std::io::Result<()> {
    let yaml = crate::api::crds_yaml();
    match args.output {
        Some(path) => std::fs::write(path, yaml),
        None => {
            use std::io::Write;
            std::io::stdout().write_all(yaml.as_bytes())
        }
    }
}

#[cfg(test)]
mod tests {
    /// `crds/commonground.yaml` is what `commonground crd` prints; regenerate with
    /// `cargo run -- crd --output crds/commonground.yaml`.
    #[test]
    fn committed_crds_are_not_stale() {
        let path = concat!(env!("CARGO_MANIFEST_DIR"), "/crds/commonground.yaml");
        let committed = std::fs::read_to_string(path).unwrap_or_default();
        assert!(
            committed == crate::api::crds_yaml(),
            "crds/commonground.yaml is stale: run `cargo run -- crd --output crds/commonground.yaml`"
        );
    }
}
