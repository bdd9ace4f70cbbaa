//! Checks of what the CRD schemas cannot express: the size of durations and quantities. The
//! API server accepts `99999999999999999999h` (the pattern bounds the form only); here such a
//! value becomes a [`SpecError`] naming the field and the limit, which the reconcilers put in
//! a status condition instead of retrying.

use std::time::Duration;

use crate::api::migration::VirtualMachineMigrationSpec;
use crate::api::network::MigrationNetworkSpec;
use crate::api::rebalance::RebalancePolicySpec;
use crate::view::quantity::{self, QuantityError};

/// Condition reason of an object whose spec the controller cannot use.
pub const INVALID_SPEC: &str = "InvalidSpec";

/// A spec field the API server accepted that the controller cannot use.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("{field}: {error}")]
pub struct SpecError {
    /// The field's path, e.g. `spec.maxDuration`.
    pub field: &'static str,
    pub error: QuantityError,
}

fn duration(field: &'static str, text: &str) -> Result<Duration, SpecError> {
    quantity::duration(text).map_err(|error| SpecError { field, error })
}

/// The time budget of a VirtualMachineMigration.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct MigrationBudget {
    pub max_duration: Option<Duration>,
    pub path_setup_budget: Option<Duration>,
}

/// How long members of a `Follow` group may still follow when the spec does not say.
pub const DEFAULT_FOLLOW_DEADLINE: Duration = Duration::from_secs(30 * 60);

/// `spec.followDeadline`, or its default.
pub fn follow_deadline(spec: &VirtualMachineMigrationSpec) -> Result<Duration, SpecError> {
    spec.follow_deadline
        .as_deref()
        .map_or(Ok(DEFAULT_FOLLOW_DEADLINE), |t| {
            duration("spec.followDeadline", t)
        })
}

/// `spec.unschedulableTimeout` in whole seconds (rounded up), at least one second: KubeVirt
/// reads its annotation as a number of seconds.
pub fn unschedulable_timeout(
    spec: &VirtualMachineMigrationSpec,
) -> Result<Option<Duration>, SpecError> {
    const FIELD: &str = "spec.unschedulableTimeout";
    let Some(text) = spec.unschedulable_timeout.as_deref() else {
        return Ok(None);
    };
    let d = duration(FIELD, text)?;
    if d < Duration::from_secs(1) {
        return Err(SpecError {
            field: FIELD,
            error: QuantityError::DurationTooShort(text.to_string(), "1s"),
        });
    }
    let secs = d.as_secs() + u64::from(d.subsec_nanos() > 0);
    Ok(Some(Duration::from_secs(secs)))
}

pub fn migration_spec(spec: &VirtualMachineMigrationSpec) -> Result<MigrationBudget, SpecError> {
    follow_deadline(spec)?;
    unschedulable_timeout(spec)?;
    Ok(MigrationBudget {
        max_duration: spec
            .max_duration
            .as_deref()
            .map(|t| duration("spec.maxDuration", t))
            .transpose()?,
        path_setup_budget: spec
            .path_setup_budget
            .as_deref()
            .map(|t| duration("spec.pathSetupBudget", t))
            .transpose()?,
    })
}

/// The pacing of a RebalancePolicy.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RoundTiming {
    pub interval: Duration,
    pub cooldown: Duration,
}

pub fn rebalance_spec(spec: &RebalancePolicySpec) -> Result<RoundTiming, SpecError> {
    Ok(RoundTiming {
        interval: duration("spec.interval", &spec.interval)?,
        cooldown: duration("spec.cooldown", &spec.cooldown)?,
    })
}

/// Whether every default load weight is zero: then every node's load is zero and the policy
/// can never move anything (unless nodes override the weights).
pub fn all_weights_zero(spec: &RebalancePolicySpec) -> bool {
    let w = spec.weights;
    w.cpu == 0.0 && w.io == 0.0 && w.memory == 0.0
}

/// A MigrationNetwork's nominal bandwidth (bytes per second) and setup time.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NetworkFigures {
    pub bandwidth: u64,
    pub setup_time: Duration,
}

pub fn network_spec(spec: &MigrationNetworkSpec) -> Result<NetworkFigures, SpecError> {
    Ok(NetworkFigures {
        bandwidth: quantity::bytes(&spec.bandwidth).map_err(|error| SpecError {
            field: "spec.bandwidth",
            error,
        })?,
        setup_time: duration("spec.setupTime", &spec.setup_time)?,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vmm_spec(max: Option<&str>, setup: Option<&str>) -> VirtualMachineMigrationSpec {
        VirtualMachineMigrationSpec {
            vmi_name: "vm".into(),
            target: None,
            max_duration: max.map(str::to_string),
            path_setup_budget: setup.map(str::to_string),
            follow_deadline: None,
            group: None,
            dry_run: false,
            max_attempts: None,
            unschedulable_timeout: None,
        }
    }

    #[test]
    fn an_absurd_max_duration_names_the_field_and_the_limit() {
        let e = migration_spec(&vmm_spec(Some("99999999999999999999h"), None)).unwrap_err();
        assert_eq!(e.field, "spec.maxDuration");
        let text = e.to_string();
        assert!(text.starts_with("spec.maxDuration: "), "{text}");
        assert!(text.contains("10 years (87600h)"), "{text}");
        let e = migration_spec(&vmm_spec(Some("5m"), Some("100000h"))).unwrap_err();
        assert_eq!(e.field, "spec.pathSetupBudget");
    }

    #[test]
    fn usable_budgets_parse_and_zero_is_usable() {
        let b = migration_spec(&vmm_spec(Some("0s"), Some("1.5m"))).unwrap();
        assert_eq!(b.max_duration, Some(Duration::ZERO));
        assert_eq!(b.path_setup_budget, Some(Duration::from_secs(90)));
        assert_eq!(
            migration_spec(&vmm_spec(None, None)).unwrap(),
            MigrationBudget::default()
        );
    }

    #[test]
    fn the_unschedulable_timeout_is_whole_seconds_and_at_least_one() {
        let mut spec = vmm_spec(None, None);
        assert_eq!(unschedulable_timeout(&spec).unwrap(), None);
        spec.unschedulable_timeout = Some("1.5s".into());
        assert_eq!(
            unschedulable_timeout(&spec).unwrap(),
            Some(Duration::from_secs(2)),
            "rounded up"
        );
        spec.unschedulable_timeout = Some("2m".into());
        assert_eq!(
            migration_spec(&spec).map(|_| unschedulable_timeout(&spec).unwrap()),
            Ok(Some(Duration::from_secs(120)))
        );
        spec.unschedulable_timeout = Some("500ms".into());
        let e = migration_spec(&spec).unwrap_err();
        assert_eq!(e.field, "spec.unschedulableTimeout");
        assert!(e.to_string().contains("minimum of 1s"), "{e}");
        spec.unschedulable_timeout = Some("99999999999999999999h".into());
        assert_eq!(
            migration_spec(&spec).unwrap_err().field,
            "spec.unschedulableTimeout"
        );
    }

    #[test]
    fn rebalance_timing_errors_name_their_field() {
        let mut spec: RebalancePolicySpec =
            serde_json::from_value(serde_json::json!({})).expect("defaults");
        assert!(!all_weights_zero(&spec));
        assert_eq!(
            rebalance_spec(&spec).unwrap().interval,
            Duration::from_secs(300)
        );
        spec.cooldown = "99999999999999999999h".into();
        assert_eq!(rebalance_spec(&spec).unwrap_err().field, "spec.cooldown");
        spec.interval = "876000h".into();
        assert_eq!(rebalance_spec(&spec).unwrap_err().field, "spec.interval");
        spec.weights.cpu = 0.0;
        spec.weights.io = 0.0;
        spec.weights.memory = 0.0;
        assert!(all_weights_zero(&spec));
    }
}
