//! Live-migration time estimate (seed 004): a pre-copy model.
//!
//! Round 0 sends the memory that must move; every later round sends what the guest dirtied
//! during the previous one. A real guest rewrites the same pages, so what one round can dirty
//! is bounded by the writable working set: `dirtied = min(rate * round_time, working_set)`.
//! With λ = dirty rate / bandwidth the rounds shrink geometrically while λ < 1. Migration
//! stops (stop-and-copy) once the remainder fits the downtime limit, or at the iteration cap.

use serde::{Deserialize, Serialize};

/// Which bytes the first round sends.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Transport {
    /// Stock KubeVirt/QEMU: every non-zero page.
    #[default]
    Stock,
    /// A transport that skips regions the destination already holds.
    SkipCommon,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct EstimateInput {
    /// Guest memory.
    pub memory_bytes: u64,
    /// Zero bytes (never sent).
    pub zero_bytes: u64,
    /// Bytes the destination already holds (skipped by `SkipCommon` only).
    pub common_bytes: u64,
    /// Bytes per second the guest dirties.
    pub dirty_rate: f64,
    /// Bytes the guest keeps rewriting; 0 means unknown (no bound).
    pub working_set_bytes: u64,
    /// Bytes per second of all active paths together.
    pub bandwidth: f64,
    pub downtime_limit_ms: f64,
    pub max_rounds: u32,
    pub transport: Transport,
}

impl EstimateInput {
    pub fn new(memory_bytes: u64, dirty_rate: f64, bandwidth: f64) -> Self {
        Self {
            memory_bytes,
            zero_bytes: 0,
            common_bytes: 0,
            dirty_rate,
            working_set_bytes: 0,
            bandwidth,
            // KubeVirt/QEMU default downtime limit.
            downtime_limit_ms: 300.0,
            max_rounds: 30,
            transport: Transport::Stock,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Estimate {
    pub seconds: f64,
    pub bytes_sent: u64,
    /// Pre-copy rounds, the stop-and-copy included.
    pub rounds: u32,
    pub downtime_ms: f64,
    /// The remainder fit the downtime limit before the iteration cap.
    pub converges: bool,
    /// Dirty rate / bandwidth.
    pub lambda: f64,
    /// What would help when it does not converge.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub advice: Option<String>,
}

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum EstimateError {
    #[error("bandwidth must be a positive number of bytes per second, got {0}")]
    Bandwidth(f64),
    #[error("dirty rate must be a finite number >= 0, got {0}")]
    DirtyRate(f64),
    #[error("zero and common bytes ({0}) exceed the memory ({1})")]
    Bytes(u64, u64),
}

/// KubeVirt's per-migration bandwidth limit (`bandwidthPerMigration`) where one applies to the
/// VM, and where it was set (for the status notes).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct BandwidthCap {
    pub bytes_per_second: u64,
    pub source: String,
}

/// The bandwidth a migration gets over a network of `network` bytes per second under `cap`:
/// KubeVirt throttles QEMU to the cap, so the slower of the two.
pub fn capped_bandwidth(network: f64, cap: Option<&BandwidthCap>) -> f64 {
    match cap {
        Some(c) if c.bytes_per_second > 0 => network.min(c.bytes_per_second as f64),
        _ => network,
    }
}

/// Where the bandwidth of an estimate came from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum BandwidthSource {
    /// The rate measured on an earlier migration between the same two nodes.
    Measured,
    /// The configured rate of the default migration network (`--migration-bandwidth`).
    Configured,
    /// KubeVirt's `bandwidthPerMigration`, lower than the measured or configured rate.
    BandwidthPerMigration,
}

/// A node-to-node rate measured on an earlier migration, and how long ago that migration
/// ended (`None` when its end time cannot be read).
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct MeasuredRate {
    pub bytes_per_second: f64,
    pub age: Option<std::time::Duration>,
}

/// What became of a measured rate.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum MeasurementUse {
    /// There is none (or none that is a positive finite rate).
    Absent,
    /// Used: no older than the maximum age.
    Used(MeasuredRate),
    /// Older than the maximum age (or of unknown age): the configured rate is used instead.
    TooOld(MeasuredRate),
}

/// The bandwidth an estimate uses, where it came from, and what became of a measurement.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct BandwidthChoice {
    pub bytes_per_second: f64,
    pub source: BandwidthSource,
    pub measurement: MeasurementUse,
}

/// The bandwidth of a migration's default network: a measured rate no older than `max_age`,
/// else the `configured` one; either way capped by KubeVirt's `bandwidthPerMigration`. A rate
/// measured long ago may describe a network that has changed since (other traffic, a new
/// link), so past `max_age` it no longer overrides the configuration. A measurement of
/// unknown age counts as too old.
pub fn choose_bandwidth(
    configured: f64,
    measured: Option<MeasuredRate>,
    max_age: std::time::Duration,
    cap: Option<&BandwidthCap>,
) -> BandwidthChoice {
    let measurement = match measured {
        Some(m) if m.bytes_per_second.is_finite() && m.bytes_per_second > 0.0 => match m.age {
            Some(age) if age <= max_age => MeasurementUse::Used(m),
            _ => MeasurementUse::TooOld(m),
        },
        _ => MeasurementUse::Absent,
    };
    let (network, source) = match measurement {
        MeasurementUse::Used(m) => (m.bytes_per_second, BandwidthSource::Measured),
        MeasurementUse::Absent | MeasurementUse::TooOld(_) => {
            (configured, BandwidthSource::Configured)
        }
    };
    let capped = capped_bandwidth(network, cap);
    BandwidthChoice {
        bytes_per_second: capped,
        source: if capped < network {
            BandwidthSource::BandwidthPerMigration
        } else {
            source
        },
        measurement,
    }
}

pub fn estimate(input: &EstimateInput) -> Result<Estimate, EstimateError> {
    if !(input.bandwidth.is_finite() && input.bandwidth > 0.0) {
        return Err(EstimateError::Bandwidth(input.bandwidth));
    }
    if !(input.dirty_rate.is_finite() && input.dirty_rate >= 0.0) {
        return Err(EstimateError::DirtyRate(input.dirty_rate));
    }
    let skipped = match input.transport {
        Transport::Stock => input.zero_bytes,
        Transport::SkipCommon => input.zero_bytes + input.common_bytes,
    };
    if skipped > input.memory_bytes {
        return Err(EstimateError::Bytes(skipped, input.memory_bytes));
    }
    let bw = input.bandwidth;
    let limit_s = input.downtime_limit_ms.max(0.0) / 1000.0;
    let ws_bound = if input.working_set_bytes > 0 {
        input.working_set_bytes as f64
    } else {
        f64::INFINITY
    };
    let nonzero = (input.memory_bytes - input.zero_bytes) as f64;
    let max_rounds = input.max_rounds.max(1);

    let mut to_send = (input.memory_bytes - skipped) as f64;
    let mut seconds = 0.0;
    let mut sent = 0.0;
    let mut rounds = 0;
    let converges;
    loop {
        rounds += 1;
        let t = to_send / bw;
        // A round that fits the downtime limit is the stop-and-copy (the first round too,
        // for a tiny VM); so is the last round allowed.
        if rounds > 1 && t <= limit_s {
            converges = true;
        } else if rounds >= max_rounds {
            converges = false;
        } else {
            seconds += t;
            sent += to_send;
            to_send = (input.dirty_rate * t).min(ws_bound).min(nonzero);
            continue;
        }
        seconds += t;
        sent += to_send;
        let lambda = input.dirty_rate / bw;
        let advice = (!converges).then(|| {
            let needed = input.dirty_rate.max(ws_bound.min(nonzero) / limit_s.max(1e-3));
            format!(
                "does not converge (dirty rate / bandwidth = {lambda:.2}): add bandwidth \
                 (about {:.0} MiB/s would do), or allow auto-converge or post-copy in a KubeVirt MigrationPolicy",
                needed / (1 << 20) as f64
            )
        });
        return Ok(Estimate {
            seconds,
            bytes_sent: sent as u64,
            rounds,
            downtime_ms: t * 1000.0,
            converges,
            lambda,
            advice,
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;
    const MIB: f64 = (1 << 20) as f64;

    #[test]
    fn idle_guest_is_one_round_plus_empty_stop() {
        let e = estimate(&EstimateInput::new(GIB, 0.0, 100.0 * MIB)).unwrap();
        assert!(e.converges);
        assert_eq!(e.rounds, 2);
        assert!((e.seconds - 10.24).abs() < 1e-6);
        assert_eq!(e.bytes_sent, GIB);
        assert_eq!(e.downtime_ms, 0.0);
    }

    #[test]
    fn rounds_shrink_geometrically_below_lambda_one() {
        // λ = 0.5: 1 GiB, then 512 MiB, 256 MiB, ... until it fits 300 ms at 100 MiB/s (30 MiB).
        let e = estimate(&EstimateInput::new(GIB, 50.0 * MIB, 100.0 * MIB)).unwrap();
        assert!(e.converges);
        assert_eq!(e.rounds, 7, "{e:?}"); // 1024, 512, 256, 128, 64, 32 MiB then 16 MiB stop-copy
        assert!((e.lambda - 0.5).abs() < 1e-9);
        assert!(e.downtime_ms <= 300.0);
        assert!(e.bytes_sent > GIB && e.bytes_sent < 2 * GIB);
    }

    #[test]
    fn lambda_above_one_does_not_converge_without_a_small_working_set() {
        let e = estimate(&EstimateInput::new(GIB, 200.0 * MIB, 100.0 * MIB)).unwrap();
        assert!(!e.converges);
        assert_eq!(e.rounds, 30);
        assert!(e.advice.unwrap().contains("MigrationPolicy"));
    }

    #[test]
    fn small_working_set_bounds_each_round() {
        // λ = 2 but the guest only ever rewrites 16 MiB: that fits the downtime.
        let mut input = EstimateInput::new(GIB, 200.0 * MIB, 100.0 * MIB);
        input.working_set_bytes = 16 << 20;
        let e = estimate(&input).unwrap();
        assert!(e.converges);
        assert_eq!(e.rounds, 2);
        assert!((e.downtime_ms - 160.0).abs() < 1e-6);
    }

    #[test]
    fn skip_common_sends_fewer_bytes_than_stock() {
        let mut input = EstimateInput::new(4 * GIB, 10.0 * MIB, 200.0 * MIB);
        input.zero_bytes = GIB;
        input.common_bytes = GIB;
        let stock = estimate(&input).unwrap();
        input.transport = Transport::SkipCommon;
        let skip = estimate(&input).unwrap();
        assert!(skip.bytes_sent + GIB / 2 < stock.bytes_sent);
        assert!(skip.seconds < stock.seconds);
    }

    #[test]
    fn bad_input_is_an_error() {
        assert!(estimate(&EstimateInput::new(GIB, 0.0, 0.0)).is_err());
        assert!(estimate(&EstimateInput::new(GIB, f64::NAN, 1.0)).is_err());
        let mut i = EstimateInput::new(GIB, 0.0, 1.0);
        i.zero_bytes = 2 * GIB;
        assert!(estimate(&i).is_err());
    }

    fn measured(rate: f64, age_secs: Option<u64>) -> MeasuredRate {
        MeasuredRate {
            bytes_per_second: rate,
            age: age_secs.map(std::time::Duration::from_secs),
        }
    }

    const HOUR: std::time::Duration = std::time::Duration::from_secs(3600);

    #[test]
    fn a_measured_rate_within_the_maximum_age_is_used() {
        let m = measured(3e8, Some(3599));
        let c = choose_bandwidth(1.25e9, Some(m), HOUR, None);
        assert_eq!(c.bytes_per_second, 3e8);
        assert_eq!(c.source, BandwidthSource::Measured);
        assert_eq!(c.measurement, MeasurementUse::Used(m));
        let at_the_limit = choose_bandwidth(1.25e9, Some(measured(3e8, Some(3600))), HOUR, None);
        assert_eq!(at_the_limit.source, BandwidthSource::Measured);
    }

    #[test]
    fn a_measured_rate_older_than_the_maximum_age_falls_back_to_the_configured_one() {
        let m = measured(3e8, Some(3601));
        let c = choose_bandwidth(1.25e9, Some(m), HOUR, None);
        assert_eq!(c.bytes_per_second, 1.25e9);
        assert_eq!(c.source, BandwidthSource::Configured);
        assert_eq!(c.measurement, MeasurementUse::TooOld(m));
    }

    #[test]
    fn a_measured_rate_of_unknown_age_counts_as_too_old() {
        let m = measured(3e8, None);
        let c = choose_bandwidth(1.25e9, Some(m), HOUR, None);
        assert_eq!(
            (c.bytes_per_second, c.source, c.measurement),
            (
                1.25e9,
                BandwidthSource::Configured,
                MeasurementUse::TooOld(m)
            )
        );
    }

    #[test]
    fn without_a_usable_measurement_the_configured_rate_is_used() {
        for m in [
            None,
            Some(measured(0.0, Some(1))),
            Some(measured(f64::NAN, Some(1))),
        ] {
            let c = choose_bandwidth(1.25e9, m, HOUR, None);
            assert_eq!(
                (c.bytes_per_second, c.source, c.measurement),
                (1.25e9, BandwidthSource::Configured, MeasurementUse::Absent),
                "{m:?}"
            );
        }
    }

    #[test]
    fn kubevirts_cap_below_either_rate_is_the_source() {
        let cap = BandwidthCap {
            bytes_per_second: 64 << 20,
            source: "KubeVirt CR".into(),
        };
        let fresh = choose_bandwidth(1.25e9, Some(measured(3e8, Some(10))), HOUR, Some(&cap));
        assert_eq!(fresh.bytes_per_second, (64u64 << 20) as f64);
        assert_eq!(fresh.source, BandwidthSource::BandwidthPerMigration);
        assert!(matches!(fresh.measurement, MeasurementUse::Used(_)));
        let stale = choose_bandwidth(1.25e9, Some(measured(3e8, Some(7200))), HOUR, Some(&cap));
        assert_eq!(stale.source, BandwidthSource::BandwidthPerMigration);
        assert!(matches!(stale.measurement, MeasurementUse::TooOld(_)));
        // A cap above the measured rate leaves the measurement in charge.
        let high = BandwidthCap {
            bytes_per_second: 1 << 40,
            ..cap
        };
        let c = choose_bandwidth(1.25e9, Some(measured(3e8, Some(10))), HOUR, Some(&high));
        assert_eq!(
            (c.bytes_per_second, c.source),
            (3e8, BandwidthSource::Measured)
        );
    }

    #[test]
    fn kubevirts_bandwidth_cap_slows_the_estimate_down() {
        let cap = BandwidthCap {
            bytes_per_second: 64 << 20,
            source: "MigrationPolicy p".into(),
        };
        assert_eq!(capped_bandwidth(1.25e9, Some(&cap)), (64u64 << 20) as f64);
        assert_eq!(
            capped_bandwidth(1e6, Some(&cap)),
            1e6,
            "a slower network stays"
        );
        assert_eq!(capped_bandwidth(1.25e9, None), 1.25e9);
        let unlimited = BandwidthCap {
            bytes_per_second: 0,
            ..cap.clone()
        };
        assert_eq!(capped_bandwidth(1.25e9, Some(&unlimited)), 1.25e9);
        let fast = estimate(&EstimateInput::new(1 << 30, 0.0, 1.25e9)).unwrap();
        let slow = estimate(&EstimateInput::new(
            1 << 30,
            0.0,
            capped_bandwidth(1.25e9, Some(&cap)),
        ))
        .unwrap();
        assert!(slow.seconds > 15.0 && fast.seconds < 1.0);
    }
}
