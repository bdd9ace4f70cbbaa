//! From a plan to the `VirtualMachineMigration` status a person reads.

use crate::api::digest::{NodeRegionDigestStatus, RelayEndpoint};
use crate::api::migration::{CandidateStatus, EstimateStatus, WorkGroupStatus};
use crate::plan::estimate::{estimate, EstimateInput, Transport};
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
                verdict: verdict.into(),
                reason,
            }
        })
        .collect()
}

fn chosen_reason(plan: &Plan, c: &crate::plan::planner::Candidate) -> String {
    let passing = plan
        .candidates
        .iter()
        .filter(|x| !matches!(x.verdict, Verdict::Filtered(_)))
        .count();
    if passing == 1 {
        "the only node that passes the minimum hardware filter".into()
    } else if c.common_bytes > 0 && c.ksm {
        let most = plan
            .candidates
            .iter()
            .filter(|x| !matches!(x.verdict, Verdict::Filtered(_)))
            .map(|x| x.common_bytes)
            .max()
            .unwrap_or(0);
        if most > c.common_bytes {
            format!(
                "memory in common ({}) similar to the most any candidate holds ({}), and KSM \
                 runs here to merge it after arrival",
                human_bytes(c.common_bytes),
                human_bytes(most)
            )
        } else {
            format!(
                "most memory in common ({}), which KSM can merge here after arrival",
                human_bytes(c.common_bytes)
            )
        }
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

/// The rate the source's relay measured on its last completed migration to the target's
/// relay, with when: the target relay's advertised address as the source end named it, or the
/// same host (the path mode reaches the relay on virt-handler's address, with its own port).
pub fn measured_bandwidth(
    source: Option<&NodeRegionDigestStatus>,
    target: Option<&NodeRegionDigestStatus>,
) -> Option<(f64, String)> {
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
        .map(|t| (t.bytes_per_second, t.time.clone()))
}

/// The transport a migration from `source` to `target` gets, and why: the skipping transport
/// only when both nodes run the migration relay in KubeVirt's migration path, with the same
/// cluster key and region size; otherwise stock (every non-zero page is sent).
pub fn transport(
    source: (&str, Option<&NodeRegionDigestStatus>),
    target: (&str, Option<&NodeRegionDigestStatus>),
) -> (Transport, String) {
    fn relay_of<'a>(
        (name, d): (&str, Option<&'a NodeRegionDigestStatus>),
    ) -> Result<(&'a NodeRegionDigestStatus, &'a RelayEndpoint), String> {
        match d {
            None => Err(format!("node {name} publishes no digest")),
            Some(d) => match &d.relay {
                None => Err(format!("node {name} does not run the migration relay")),
                Some(r) if !r.in_migration_path => Err(format!(
                    "the relay on node {name} is not in KubeVirt's migration path"
                )),
                Some(r) => Ok((d, r)),
            },
        }
    }
    let (s, t) = match (relay_of(source), relay_of(target)) {
        (Ok(s), Ok(t)) => (s, t),
        (Err(why), _) | (_, Err(why)) => {
            return (
                Transport::Stock,
                format!("{why}: every non-zero page is sent"),
            )
        }
    };
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
        let target = node(Some((true, 16)), "k"); // relay at 10.0.0.1:4443
        let mut source = node(Some((true, 16)), "k");
        assert_eq!(measured_bandwidth(Some(&source), Some(&target)), None);
        let transfer = |peer: &str, rate: f64| crate::api::digest::TransferStatus {
            peer_relay: peer.into(),
            bytes: 1 << 30,
            seconds: 1.0,
            bytes_per_second: rate,
            time: "2026-01-01T00:00:00Z".into(),
        };
        source.transfers = vec![transfer("10.0.0.9:4443", 1e9)];
        assert_eq!(
            measured_bandwidth(Some(&source), Some(&target)),
            None,
            "another node's relay"
        );
        source.transfers.push(transfer("10.0.0.1:4480", 2e8));
        assert_eq!(
            measured_bandwidth(Some(&source), Some(&target)).map(|m| m.0),
            Some(2e8),
            "same host, the path's own port"
        );
        source.transfers.push(transfer("10.0.0.1:4443", 3e8));
        assert_eq!(
            measured_bandwidth(Some(&source), Some(&target)).map(|m| m.0),
            Some(3e8),
            "the exact address first"
        );
        assert_eq!(measured_bandwidth(Some(&source), None), None);
        let no_relay = node(None, "k");
        assert_eq!(measured_bandwidth(Some(&source), Some(&no_relay)), None);
    }

    #[test]
    fn skipping_transport_only_when_both_relays_carry_kubevirt_migrations() {
        let both = node(Some((true, 16)), "k");
        let (t, why) = transport(("a", Some(&both)), ("b", Some(&both)));
        assert_eq!(t, Transport::SkipCommon, "{why}");

        let off_path = node(Some((false, 16)), "k");
        let (t, why) = transport(("a", Some(&both)), ("b", Some(&off_path)));
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("not in KubeVirt's migration path"), "{why}");

        let none = node(None, "k");
        let (t, why) = transport(("a", Some(&none)), ("b", Some(&both)));
        assert_eq!(t, Transport::Stock);
        assert!(
            why.contains("node a does not run the migration relay"),
            "{why}"
        );

        let (t, why) = transport(("a", Some(&both)), ("b", None));
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("node b publishes no digest"), "{why}");
    }

    #[test]
    fn different_keys_or_geometry_mean_stock_transport() {
        let (t, why) = transport(
            ("a", Some(&node(Some((true, 16)), "k1"))),
            ("b", Some(&node(Some((true, 16)), "k2"))),
        );
        assert_eq!(t, Transport::Stock);
        assert!(why.contains("different cluster keys"), "{why}");
        let (t, _) = transport(
            ("a", Some(&node(Some((true, 16)), "k"))),
            ("b", Some(&node(Some((true, 32)), "k"))),
        );
        assert_eq!(t, Transport::Stock);
    }
}
