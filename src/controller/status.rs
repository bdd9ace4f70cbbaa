//! From a plan to the `VirtualMachineMigration` status a person reads.

use crate::api::digest::{NodeRegionDigestStatus, RelayEndpoint};
use crate::api::migration::{CandidateStatus, EstimateStatus, WorkGroupStatus};
use crate::plan::estimate::{
    estimate, BandwidthCap, BandwidthChoice, BandwidthSource, EstimateInput, MeasuredRate,
    MeasurementUse, Transport,
};
use crate::plan::hardware::human_bytes;
use crate::plan::{Plan, Verdict};

/// Candidates shown in status: the best `top` passing ones, then up to `top` filtered.
pub fn candidates(plan: &Plan, top: usize) -> Vec<CandidateStatus> {
    let passing = plan
        .candidates
        .iter()
        .filter(|c| !matches!(c.verdict, Verdict::Filtered(_)))
        .take(top);
    let filtered = plan
        .candidates
        .iter()
        .filter(|c| matches!(c.verdict, Verdict::Filtered(_)))
        .take(top);
    passing
        .chain(filtered)
        .map(|c| {
            let (verdict, reason) = match &c.verdict {
                Verdict::Chosen => ("Chosen", chosen_reason(plan, c)),
                Verdict::Lost(r) => ("Lost", r.clone()),
                Verdict::Filtered(r) => ("Filtered", r.clone()),
            };
            CandidateStatus {
                node: c.node.clone(),
                work_group: c.work_group.clone(),
                common_bytes: c.common_bytes,
                ksm: c.ksm,
                ksm_mergeable_bytes: c.ksm_mergeable_bytes,
                distance: if c.distance.is_finite() {
                    c.distance
                } else {
                    -1.0
                },
                load: (c.load * 1000.0).round() / 1000.0,
                score: c.score,
                estimated_seconds: None,
                verdict: verdict.into(),
                reason,
            }
        })
        .collect()
}

fn chosen_reason(plan: &Plan, c: &crate::plan::planner::Candidate) -> String {
    // Work groups are chosen first: the most in common is the chosen work group's.
    let most = plan
        .candidates
        .iter()
        .filter(|x| !matches!(x.verdict, Verdict::Filtered(_)) && x.work_group == c.work_group)
        .map(|x| x.common_bytes)
        .max()
        .unwrap_or(0);
    if plan.passing == 1 {
        "the only node that passes the minimum hardware filter".into()
    } else if c.common_bytes > 0 && most > c.common_bytes {
        // Only the similarity rules put a node with less in common first.
        let why = if c.ksm {
            "KSM runs here to merge it after arrival"
        } else {
            "the move here is estimated clearly shorter"
        };
        format!(
            "memory in common ({}) similar to the most any candidate of its work group holds \
             ({}), and {why}",
            human_bytes(c.common_bytes),
            human_bytes(most)
        )
    } else if c.common_bytes > 0 && c.ksm {
        format!(
            "most memory in common ({}), which KSM can merge here after arrival",
            human_bytes(c.common_bytes)
        )
    } else if c.common_bytes > 0 {
        format!("most memory in common ({})", human_bytes(c.common_bytes))
    } else {
        "no candidate holds any of the VM's memory: lowest load".into()
    }
}

pub fn work_groups(plan: &Plan, region_bytes: u64) -> Vec<WorkGroupStatus> {
    plan.work_groups
        .iter()
        .map(|w| WorkGroupStatus {
            work_group: w.work_group.clone(),
            available_bytes: (w.regions_available * region_bytes as f64) as u64,
            distance: w.distance,
            candidates: w.candidates as u32,
            chosen: w.chosen,
        })
        .collect()
}

/// Transfer parameters the estimate needs beyond the plan.
#[derive(Clone, Copy, Debug)]
pub struct TransferModel {
    /// Bytes per second of the default migration network.
    pub bandwidth: f64,
    pub downtime_limit_ms: f64,
    /// CPU cores a target needs per Gbit/s of extra migration stream.
    pub cores_per_gbps: f64,
    /// A measured node-to-node rate older than this is not used (`--measured-rate-max-age`).
    pub measured_rate_max_age: std::time::Duration,
}

/// The estimate input for a plan over the default network, stock transport.
pub fn estimate_input(
    plan: &Plan,
    dirty_rate: f64,
    working_set: u64,
    model: TransferModel,
) -> EstimateInput {
    let b = plan.bytes;
    let mut input = EstimateInput::new(b.total, dirty_rate, model.bandwidth);
    input.zero_bytes = b.zero;
    input.common_bytes = b.common;
    input.working_set_bytes = working_set;
    input.downtime_limit_ms = model.downtime_limit_ms;
    input.transport = Transport::Stock;
    input
}

/// The estimate input for a move to another candidate: `base` (the chosen target's) with
/// that node's memory in common, transport and bandwidth.
pub fn candidate_input(
    base: &EstimateInput,
    common_bytes: u64,
    transport: Transport,
    bandwidth: f64,
) -> EstimateInput {
    let mut input = *base;
    input.common_bytes = common_bytes.min(input.memory_bytes.saturating_sub(input.zero_bytes));
    input.transport = transport;
    input.bandwidth = bandwidth;
    input
}

/// Seconds to the tenth, for status.
pub fn seconds_for_status(input: &EstimateInput) -> Option<f64> {
    estimate(input)
        .ok()
        .map(|e| (e.seconds * 10.0).round() / 10.0)
        .filter(|s| s.is_finite())
}

/// The rate the source's relay measured on its last completed migration to the target's
/// relay, its age as of `now` and its end time as published: the target relay's advertised
/// address as the source end named it, or the same host (the path mode reaches the relay on
/// virt-handler's address, with its own port).
pub fn measured_bandwidth(
    source: Option<&NodeRegionDigestStatus>,
    target: Option<&NodeRegionDigestStatus>,
    now: crate::api::time::Timestamp,
) -> Option<(MeasuredRate, String)> {
    let address = &target?.relay.as_ref()?.address;
    let host = |a: &str| {
        a.rsplit_once(':')
            .map_or(a.to_string(), |(h, _)| h.to_string())
    };
    let transfers = &source?.transfers;
    transfers
        .iter()
        .find(|t| &t.peer_relay == address)
        .or_else(|| {
            transfers
                .iter()
                .find(|t| host(&t.peer_relay) == host(address))
        })
        .filter(|t| t.bytes_per_second.is_finite() && t.bytes_per_second > 0.0)
        .map(|t| {
            let age = crate::api::time::parse_rfc3339(&t.time)
                .map(|end| crate::api::time::elapsed(end, now));
            (
                MeasuredRate {
                    bytes_per_second: t.bytes_per_second,
                    age,
                },
                t.time.clone(),
            )
        })
}

/// Why the estimate runs at the rate `choice` chose, in words for status: the measurement
/// (with the migration to `target` it came from, ended at `measured_at`) or the configured
/// rate, a measurement passed over for its age, and KubeVirt's cap where it is lower.
pub fn bandwidth_reason(
    choice: &BandwidthChoice,
    configured: f64,
    max_age: std::time::Duration,
    target: &str,
    measured_at: Option<&str>,
    cap: Option<&BandwidthCap>,
) -> String {
    let rate = |r: f64| format!("{}/s", human_bytes(r as u64));
    let at = measured_at.unwrap_or("an unknown time");
    let mut why =
        match choice.measurement {
            MeasurementUse::Used(m) => format!(
                "{} measured by the relay on the migration to {target} that ended {at}",
                rate(m.bytes_per_second)
            ),
            MeasurementUse::TooOld(m) => format!(
            "{} configured (--migration-bandwidth); the {} measured on the migration to {target} \
             that ended {at} is {}, older than the maximum age of {}s",
            rate(configured),
            rate(m.bytes_per_second),
            m.age
                .map_or("of unknown age".to_string(), |a| format!("{}s old", a.as_secs())),
            max_age.as_secs()
        ),
            MeasurementUse::Absent => format!(
                "{} configured (--migration-bandwidth); no rate measured to {target}",
                rate(configured)
            ),
        };
    if choice.source == BandwidthSource::BandwidthPerMigration {
        if let Some(c) = cap {
            why.push_str(&format!(
                "; capped at {} by the bandwidthPerMigration of {}",
                rate(c.bytes_per_second as f64),
                c.source
            ));
        }
    }
    why
}

/// The transport a migration from `source` to `target` gets, and why: the skipping transport
/// only when both nodes run the migration relay in KubeVirt's migration path, with the same
/// cluster key and region size; otherwise stock (every non-zero page is sent).
pub fn transport<'a>(
    source: (&str, Option<&'a NodeRegionDigestStatus>),
    target: (&str, Option<&'a NodeRegionDigestStatus>),
    kubevirt_blocks: Option<&str>,
) -> (Transport, String) {
    let relay_of = |(name, d): (&str, Option<&'a NodeRegionDigestStatus>)| -> Result<(&'a NodeRegionDigestStatus, &'a RelayEndpoint), String> {
        match d {
            None => Err(format!("node {name} publishes no digest")),
            Some(d) => match &d.relay {
                None => Err(format!("node {name} does not run the migration relay")),
                Some(r) if !r.in_migration_path => Err(match kubevirt_blocks {
                    Some(cause) => format!(
                        "the relay on node {name} is not in KubeVirt's migration path ({cause})"
                    ),
                    None => format!("the relay on node {name} is not in KubeVirt's migration path"),
                }),
                Some(r) => Ok((d, r)),
            },
        }
    };
    let (s, t) = match (relay_of(source), relay_of(target)) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(why), _) | (_, Err(why)) => {
            return (
                Transport::Stock,
                format!("{why}: every non-zero page is sent"),
            )
        }
    };
    // Both agents said they relay, but the KubeVirt CR now encrypts (the agents close their
    // paths within a moment): the stream cannot be read, so nothing is skipped.
    if let Some(cause) = kubevirt_blocks {
        return (
            Transport::Stock,
            format!("{cause}: every non-zero page is sent"),
        );
    }
    if s.0.key_id != t.0.key_id {
        return (
            Transport::Stock,
            format!(
                "nodes {} and {} use different cluster keys: every non-zero page is sent",
                source.0, target.0
            ),
        );
    }
    if s.1.region_pages != t.1.region_pages || s.1.protocol_version != t.1.protocol_version {
        return (
            Transport::Stock,
            format!(
                "the relays on {} and {} differ in region size or protocol: every non-zero page is sent",
                source.0, target.0
            ),
        );
    }
    (
        Transport::SkipCommon,
        format!(
            "both nodes relay migrations: regions {} holds are sent as references",
            target.0
        ),
    )
}

/// The estimate in status: both byte figures, and the time for the transport in use.
pub fn estimate_status(plan: &Plan, input: &EstimateInput, paths: Vec<String>) -> EstimateStatus {
    let b = plan.bytes;
    let time = estimate(input).ok();
    EstimateStatus {
        total_bytes: b.total,
        zero_bytes: b.zero,
        common_bytes: b.common,
        to_move_bytes: b.to_move,
        stock_bytes: b.total - b.zero,
        ksm_mergeable_bytes: b.ksm_mergeable,
        common_human: human_bytes(b.common),
        to_move_human: human_bytes(b.to_move),
        duration_seconds: time.as_ref().map(|t| (t.seconds * 10.0).round() / 10.0),
        duration_human: time.as_ref().map(|t| format!("{:.0}s", t.seconds.ceil())),
        converges: time.as_ref().map(|t| t.converges),
        paths,
        transport: format!("{:?}", input.transport),
        transport_reason: String::new(),
        bandwidth_bytes_per_second: None,
        bandwidth_source: String::new(),
        bandwidth_reason: String::new(),
    }
}

#[cfg(test)]
mod transport_tests {
    use super::*;

    fn node(relay: Option<(bool, u32)>, key: &str) -> NodeRegionDigestStatus {
        NodeRegionDigestStatus {
            key_id: key.into(),
            relay: relay.map(|(in_path, pages)| RelayEndpoint {
                address: "10.0.0.1:4443".into(),
                protocol_version: 1,
                region_pages: pages,
                in_migration_path: in_path,
            }),
            ..Default::default()
        }
    }

    #[test]
    fn the_rate_measured_to_the_targets_relay_is_found_by_address_or_host() {
        let now = crate::api::time::parse_rfc3339("2026-01-01T01:00:00Z").unwrap();
        let rate = |s: &NodeRegionDigestStatus, t: Option<&NodeRegionDigestStatus>| {
            measured_bandwidth(Some(s), t, now).map(|m| m.0.bytes_per_second)
        };
        let target = node(Some((true, 16)), "k"); // relay at 10.0.0.1:4443
        let mut source = node(Some((true, 16)), "k");
        assert_eq!(rate(&source, Some(&target)), None);
        let transfer = |peer: &str, rate: f64| crate::api::digest::TransferStatus {
            peer_relay: peer.into(),
            bytes: 1 << 30,
            seconds: 1.0,
            bytes_per_second: rate,
            time: "2026-01-01T00:00:00Z".into(),
        };
        source.transfers = vec![transfer("10.0.0.9:4443", 1e9)];
        assert_eq!(rate(&source, Some(&target)), None, "another node's relay");
        source.transfers.push(transfer("10.0.0.1:4480", 2e8));
        assert_eq!(
            rate(&source, Some(&target)),
            Some(2e8),
            "same host, the path's own port"
        );
        source.transfers.push(transfer("10.0.0.1:4443", 3e8));
        assert_eq!(
            rate(&source, Some(&target)),
            Some(3e8),
            "the exact address first"
        );
        assert_eq!(rate(&source, None), None);
        let no_relay = node(None, "k");
        assert_eq!(rate(&source, Some(&no_relay)), None);
    }

    #[test]
    fn a_measured_rate_carries_its_age_from_the_published_end_time() {
        let target = node(Some((true, 16)), "k");
        let mut source = node(Some((true, 16)), "k");
        let transfer = |time: &str| crate::api::digest::TransferStatus {
            peer_relay: "10.0.0.1:4443".into(),
            bytes: 1 << 30,
            seconds: 1.0,
            bytes_per_second: 3e8,
            time: time.into(),
        };
        let now = crate::api::time::parse_rfc3339("2026-01-01T01:00:00Z").unwrap();
        source.transfers = vec![transfer("2026-01-01T00:30:00Z")];
        let (m, at) = measured_bandwidth(Some(&source), Some(&target), now).unwrap();
        assert_eq!(m.age, Some(std::time::Duration::from_secs(1800)));
        assert_eq!(at, "2026-01-01T00:30:00Z");
        source.transfers = vec![transfer("not a time")];
        let (m, _) = measured_bandwidth(Some(&source), Some(&target), now).unwrap();
        assert_eq!(m.age, None, "an unreadable end time leaves the age unknown");
        // A clock ahead of the controller's: not in the past, so no age to hold against it.
        source.transfers = vec![transfer("2026-01-01T01:05:00Z")];
        let (m, _) = measured_bandwidth(Some(&source), Some(&target), now).unwrap();
        assert_eq!(m.age, Some(std::time::Duration::ZERO));
    }

    #[test]
    fn the_bandwidth_reason_names_the_source_and_a_measurement_passed_over() {
        use crate::plan::estimate::choose_bandwidth;
        let hour = std::time::Duration::from_secs(3600);
        let m = |age: u64| MeasuredRate {
            bytes_per_second: 3e8,
            age: Some(std::time::Duration::from_secs(age)),
        };
        let fresh = choose_bandwidth(1.25e9, Some(m(60)), hour, None);
        let why = bandwidth_reason(&fresh, 1.25e9, hour, "n2", Some("T1"), None);
        assert!(
            why.contains("measured") && why.contains("n2") && why.contains("T1"),
            "{why}"
        );
        let stale = choose_bandwidth(1.25e9, Some(m(7200)), hour, None);
        let why = bandwidth_reason(&stale, 1.25e9, hour, "n2", Some("T1"), None);
        assert!(
            why.contains("configured") && why.contains("7200s old") && why.contains("3600s"),
            "{why}"
        );
        let cap = BandwidthCap {
            bytes_per_second: 1 << 20,
            source: "MigrationPolicy slow".into(),
        };
        let capped = choose_bandwidth(1.25e9, None, hour, Some(&cap));
        let why = bandwidth_reason(&capped, 1.25e9, hour, "n2", None, Some(&cap));
        assert!(
            why.contains("no rate measured") && why.contains("MigrationPolicy slow"),
            "{why}"
        );
    }

    #[test]
    fn skipping_transport_only_when_both_relays_carry_kubevirt_migrations() {
        let both = node(Some((true, 16)), "k");
        let (t, why) = transport(("a", Some(&both)), ("b", Some(&both)), None);
        assert_eq!(t, Transport::SkipCommon, "{why}");

        let off_path = node(Some((false, 16)), "k");
        let (t, why) = transport(("a", Some(&both)), ("b", Some(&off_path)), None);
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("not in KubeVirt's migration path"), "{why}");

        let none = node(None, "k");
        let (t, why) = transport(("a", Some(&none)), ("b", Some(&both)), None);
        assert_eq!(t, Transport::Stock);
        assert!(
            why.contains("node a does not run the migration relay"),
            "{why}"
        );

        let (t, why) = transport(("a", Some(&both)), ("b", None), None);
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("node b publishes no digest"), "{why}");
    }

    #[test]
    fn different_keys_or_geometry_mean_stock_transport() {
        let (t, why) = transport(
            ("a", Some(&node(Some((true, 16)), "k1"))),
            ("b", Some(&node(Some((true, 16)), "k2"))),
            None,
        );
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("different cluster keys"), "{why}");
        let (t, _) = transport(
            ("a", Some(&node(Some((true, 16)), "k"))),
            ("b", Some(&node(Some((true, 32)), "k"))),
            None,
        );
        assert_eq!(t, Transport::Stock);
    }

    #[test]
    fn a_candidate_holding_more_is_faster_only_where_regions_are_skipped() {
        let mut base = EstimateInput::new(8 << 30, 0.0, 125e6);
        base.zero_bytes = 2 << 30;
        let time = |common: u64, transport: Transport| {
            seconds_for_status(&candidate_input(&base, common, transport, 125e6)).unwrap()
        };
        assert!(time(4 << 30, Transport::SkipCommon) < time(1 << 30, Transport::SkipCommon));
        assert_eq!(
            time(4 << 30, Transport::Stock),
            time(1 << 30, Transport::Stock)
        );
        // More in common than the non-zero memory is capped at it: nothing left to send.
        assert!(time(100 << 30, Transport::SkipCommon) <= time(6 << 30, Transport::SkipCommon));
        let slower = seconds_for_status(&candidate_input(&base, 0, Transport::Stock, 62.5e6));
        assert!(slower.unwrap() > time(0, Transport::Stock));
    }

    #[test]
    fn kubevirt_tls_on_means_stock_transport_and_says_why() {
        let tls = "KubeVirt encrypts migrations between its handlers";
        let both = node(Some((true, 16)), "k");
        let (t, why) = transport(("a", Some(&both)), ("b", Some(&both)), Some(tls));
        assert_eq!(t, Transport::Stock);
        assert!(why.starts_with(tls), "{why}");
        let off_path = node(Some((false, 16)), "k");
        let (t, why) = transport(("a", Some(&off_path)), ("b", Some(&both)), Some(tls));
        assert_eq!(t, Transport::Stock);
        assert!(
            why.contains("not in KubeVirt's migration path") && why.contains(tls),
            "{why}"
        );
        // Without a relay on a node the missing relay is the reason, whatever KubeVirt does.
        let none = node(None, "k");
        let (_, why) = transport(("a", Some(&none)), ("b", Some(&both)), Some(tls));
        assert!(why.contains("does not run the migration relay"), "{why}");
    }
}
