//! The flags that shape the cluster view, shared by `controller` and `extender` so both plan
//! over the same work groups, distances and region size.

use crate::plan::region::{RegionGeometry, DEFAULT_REGION_PAGES};
use crate::plan::workgroups::{DistanceMatrix, DEFAULT_WORK_GROUP_LABEL};

use super::ViewConfig;

#[derive(clap::Args, Debug, Clone)]
pub struct ViewArgs {
    /// Node label whose value is the node's work group.
    #[arg(long, env = "COMMONGROUND_WORK_GROUP_LABEL", default_value = DEFAULT_WORK_GROUP_LABEL)]
    pub work_group_label: String,
    /// Distances between work groups: `a:b=10,a:c=20` (empty: all equally far).
    #[arg(long, env = "COMMONGROUND_DISTANCES", default_value = "")]
    pub distances: String,
    /// Region size in 4 KiB pages; must equal the agents' (digests of another size are not
    /// compared).
    #[arg(long, env = "COMMONGROUND_REGION_PAGES", default_value_t = DEFAULT_REGION_PAGES)]
    pub region_pages: u32,
}

/// A flag value the view cannot use.
#[derive(Debug, thiserror::Error)]
pub enum ViewArgsError {
    #[error("invalid --distances: {0}")]
    Distances(#[from] crate::plan::workgroups::DistanceError),
    #[error("invalid --region-pages: {0}")]
    RegionPages(String),
}

impl ViewArgs {
    pub fn config(&self) -> Result<ViewConfig, ViewArgsError> {
        Ok(ViewConfig {
            work_group_label: self.work_group_label.clone(),
            distances: DistanceMatrix::parse(&self.distances)?,
            geometry: RegionGeometry::new(self.region_pages)
                .map_err(|e| ViewArgsError::RegionPages(e.to_string()))?,
            ..ViewConfig::default()
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Cli {
        #[command(flatten)]
        view: ViewArgs,
    }

    #[test]
    fn flags_become_the_view_config() {
        let cli = Cli::parse_from([
            "x",
            "--work-group-label=rack",
            "--distances=a:b=10",
            "--region-pages=8",
        ]);
        let c = cli.view.config().unwrap();
        assert_eq!(c.work_group_label, "rack");
        assert_eq!(c.geometry, RegionGeometry::new(8).unwrap());
        assert_eq!(c.distances.distance("a", "b").unwrap(), 10.0);
    }

    #[test]
    fn bad_values_are_clear_errors() {
        let bad = Cli::parse_from(["x", "--region-pages=0"]).view.config();
        assert!(bad.unwrap_err().to_string().contains("--region-pages"));
        let bad = Cli::parse_from(["x", "--distances=a:b"]).view.config();
        assert!(bad.unwrap_err().to_string().contains("--distances"));
    }
}
