//! Keeping a migration inside its time budget by adding network paths (seed 004, claim 1):
//! while the estimate exceeds the budget, add a path that both nodes have, that nobody else
//! is using, that can be set up within the second budget, and whose extra stream the target
//! has the CPU to reassemble; re-estimate; stop when it fits or no path is left, and migrate
//! either way.

use serde::{Deserialize, Serialize};

use super::estimate::{estimate, Estimate, EstimateError, EstimateInput};

/// A candidate extra path, as the controller sees it for one source/target pair.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathOption {
    pub name: String,
    /// Nominal bytes per second.
    pub bandwidth: f64,
    pub setup_seconds: f64,
    pub on_source: bool,
    pub on_target: bool,
    /// Another migration holds it.
    pub in_use: bool,
}

/// Idle cores the target has left for extra migration streams once the VM itself is there:
/// the idle CPU the target's agent measured where there is a measurement, else its free CPU
/// (allocatable minus what the pods on it request), minus the migrating VM's own launcher
/// request, which lands on the target with the migration. Never negative.
pub fn target_spare_cores(
    free_millis: u64,
    measured_idle_cores: Option<f64>,
    vm_cpu_millis: u64,
) -> f64 {
    let vm = vm_cpu_millis as f64 / 1000.0;
    match measured_idle_cores.filter(|c| c.is_finite()) {
        Some(idle) => (idle - vm).max(0.0),
        None => free_millis.saturating_sub(vm_cpu_millis) as f64 / 1000.0,
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathBudget {
    /// The time threshold (`spec.maxDuration`).
    pub max_seconds: f64,
    /// The second threshold (`spec.pathSetupBudget`): setup time allowed per path.
    pub setup_seconds: f64,
    /// Idle CPU cores on the target.
    pub target_spare_cores: f64,
    /// Cores needed to reassemble one Gbit/s of extra stream.
    pub cores_per_gbps: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum PathOutcome {
    /// The estimate fit the budget without extra paths.
    FitsAsIs,
    /// It fits after adding the paths listed.
    FitsWithPaths,
    /// No (further) path could be added; migrating anyway over the budget.
    OverBudget,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct PathDecision {
    pub added: Vec<String>,
    /// Paths not used and why.
    pub skipped: Vec<(String, String)>,
    pub bandwidth: f64,
    pub estimate: Estimate,
    pub outcome: PathOutcome,
}

const BYTES_PER_GBIT: f64 = 1e9 / 8.0;

fn unusable(
    p: &PathOption,
    budget: &PathBudget,
    spare_cores: f64,
    cores_per_gbps: f64,
) -> Option<String> {
    if !(p.on_source && p.on_target) {
        return Some("not available on both nodes".into());
    }
    if p.in_use {
        return Some("in use by another migration".into());
    }
    if p.setup_seconds > budget.setup_seconds {
        return Some(format!(
            "setup {:.1}s exceeds the path setup budget {:.1}s",
            p.setup_seconds, budget.setup_seconds
        ));
    }
    let cores = p.bandwidth / BYTES_PER_GBIT * cores_per_gbps;
    if cores > spare_cores {
        return Some(format!(
            "target lacks CPU to reassemble it ({cores:.1} cores needed, {spare_cores:.1} spare)"
        ));
    }
    None
}

/// The seed's loop. Paths are tried fastest first so the fewest paths meet the budget.
pub fn choose_paths(
    base: &EstimateInput,
    paths: &[PathOption],
    budget: &PathBudget,
) -> Result<PathDecision, EstimateError> {
    let mut input = *base;
    let mut est = estimate(&input)?;
    if est.seconds <= budget.max_seconds {
        return Ok(PathDecision {
            added: vec![],
            skipped: vec![],
            bandwidth: input.bandwidth,
            estimate: est,
            outcome: PathOutcome::FitsAsIs,
        });
    }
    let mut order: Vec<&PathOption> = paths.iter().collect();
    order.sort_by(|a, b| {
        b.bandwidth
            .total_cmp(&a.bandwidth)
            .then_with(|| a.name.cmp(&b.name))
    });
    let mut spare = budget.target_spare_cores;
    let mut added = Vec::new();
    let mut skipped = Vec::new();
    let mut fits = false;
    for p in order {
        if est.seconds <= budget.max_seconds {
            fits = true;
            skipped.push((p.name.clone(), "not needed".into()));
            continue;
        }
        if let Some(reason) = unusable(p, budget, spare, budget.cores_per_gbps) {
            skipped.push((p.name.clone(), reason));
            continue;
        }
        spare -= p.bandwidth / BYTES_PER_GBIT * budget.cores_per_gbps;
        input.bandwidth += p.bandwidth;
        est = estimate(&input)?;
        added.push(p.name.clone());
    }
    fits |= est.seconds <= budget.max_seconds;
    Ok(PathDecision {
        outcome: if fits {
            PathOutcome::FitsWithPaths
        } else {
            PathOutcome::OverBudget
        },
        added,
        skipped,
        bandwidth: input.bandwidth,
        estimate: est,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const GBIT: f64 = BYTES_PER_GBIT;

    fn path(name: &str, gbit: f64) -> PathOption {
        PathOption {
            name: name.into(),
            bandwidth: gbit * GBIT,
            setup_seconds: 2.0,
            on_source: true,
            on_target: true,
            in_use: false,
        }
    }

    fn budget(max_seconds: f64) -> PathBudget {
        PathBudget {
            max_seconds,
            setup_seconds: 5.0,
            target_spare_cores: 8.0,
            cores_per_gbps: 0.25,
        }
    }

    /// 16 GiB idle guest over 10 Gbit/s: about 13.7 s.
    fn base() -> EstimateInput {
        EstimateInput::new(16 * GIB, 0.0, 10.0 * GBIT)
    }

    #[test]
    fn fits_without_paths() {
        let d = choose_paths(&base(), &[path("a", 10.0)], &budget(20.0)).unwrap();
        assert_eq!(d.outcome, PathOutcome::FitsAsIs);
        assert!(d.added.is_empty());
    }

    #[test]
    fn fits_after_one_path() {
        let d = choose_paths(&base(), &[path("a", 10.0)], &budget(10.0)).unwrap();
        assert_eq!(d.outcome, PathOutcome::FitsWithPaths);
        assert_eq!(d.added, vec!["a"]);
        assert!(d.estimate.seconds <= 10.0);
    }

    #[test]
    fn fits_after_two_paths_fastest_first() {
        let paths = [path("slow", 5.0), path("fast", 10.0), path("spare", 10.0)];
        let d = choose_paths(&base(), &paths, &budget(6.0)).unwrap();
        assert_eq!(d.outcome, PathOutcome::FitsWithPaths);
        assert_eq!(d.added, vec!["fast", "spare"]);
        assert!(d
            .skipped
            .iter()
            .any(|(n, r)| n == "slow" && r == "not needed"));
    }

    #[test]
    fn never_fits_migrates_anyway_over_budget() {
        let d = choose_paths(&base(), &[path("a", 1.0)], &budget(1.0)).unwrap();
        assert_eq!(d.outcome, PathOutcome::OverBudget);
        assert_eq!(d.added, vec!["a"]);
    }

    #[test]
    fn no_path_available() {
        let mut p = path("a", 10.0);
        p.on_target = false;
        let mut q = path("b", 10.0);
        q.in_use = true;
        let d = choose_paths(&base(), &[p, q], &budget(10.0)).unwrap();
        assert_eq!(d.outcome, PathOutcome::OverBudget);
        assert!(d.added.is_empty());
        assert_eq!(d.skipped.len(), 2);
    }

    #[test]
    fn setup_too_slow() {
        let mut p = path("a", 10.0);
        p.setup_seconds = 30.0;
        let d = choose_paths(&base(), &[p], &budget(10.0)).unwrap();
        assert!(d.added.is_empty());
        assert!(d.skipped[0].1.contains("setup"));
    }

    #[test]
    fn target_without_cpu_headroom() {
        let mut b = budget(10.0);
        b.target_spare_cores = 1.0; // 10 Gbit/s needs 2.5 cores
        let d = choose_paths(&base(), &[path("a", 10.0)], &b).unwrap();
        assert!(d.added.is_empty());
        assert!(d.skipped[0].1.contains("CPU"));
    }

    #[test]
    fn spare_cores_leave_out_the_migrating_vms_own_cpu() {
        assert_eq!(target_spare_cores(6000, None, 4000), 2.0);
        assert_eq!(target_spare_cores(2000, None, 4000), 0.0, "never negative");
    }

    #[test]
    fn measured_idle_cpu_is_preferred_to_what_requests_leave() {
        // Requests leave 6 cores, but the host is busier than its pods ask for: 3 idle.
        assert_eq!(target_spare_cores(6000, Some(3.0), 1000), 2.0);
        // Or idler: requests over-reserve, 10 cores idle.
        assert_eq!(target_spare_cores(6000, Some(10.0), 1000), 9.0);
        assert_eq!(
            target_spare_cores(6000, Some(0.5), 1000),
            0.0,
            "never negative"
        );
        assert_eq!(
            target_spare_cores(6000, Some(f64::NAN), 1000),
            5.0,
            "an unusable reading is no reading"
        );
    }
}
