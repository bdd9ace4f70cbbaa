//! The shorter move among similar candidates: between nodes holding similar memory in common
//! with the VM, the one the migration reaches soonest goes first.
//!
//! Memory in common decides first: with the migration relay, content the target already holds
//! is not sent. But the time a move takes also depends on the link to the node: the rate from
//! the source to it (what the relays measured on earlier migrations between the two nodes,
//! within KubeVirt's `bandwidthPerMigration` cap) and whether the relays on both ends are in
//! KubeVirt's path, so that what the node holds is skipped at all. Two candidates within the
//! sampling error of each other (or [`super::ksm::SIMILAR_FRACTION`] of the VM's memory, the
//! same rule as for KSM) are as good on memory, and then the one whose estimated move is
//! clearly shorter ([`CLEARLY_SHORTER`]) goes first. A candidate with clearly more in common
//! keeps the first place even on a slower link: the estimate of the link can be stale, the
//! memory in common is measured now.
//!
//! The planner asks for each candidate's link only where the rule can change the order (the
//! similar candidates right after the leader, at most [`TIMED_CANDIDATES`] of them), so a
//! cluster of 5,000 nodes costs a handful of estimates per decision.

use std::sync::Arc;

use super::estimate::{estimate, EstimateInput, Transport};

/// How a target is reached from the VM's source node.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Link {
    /// Bytes per second the migration can use to the node.
    pub bytes_per_second: f64,
    /// What the first round sends there: every non-zero page, or only what the node lacks.
    pub transport: Transport,
}

/// The link to a node, by name.
pub type LinkOf = Arc<dyn Fn(&str) -> Link + Send + Sync>;

/// What the planner needs to estimate each candidate's move: the parts of the estimate that
/// do not depend on the target (memory, zero bytes, dirty rate, working set, downtime limit)
/// and, per target, its link.
#[derive(Clone)]
pub struct MoveLinks {
    pub base: EstimateInput,
    pub link_of: LinkOf,
}

impl std::fmt::Debug for MoveLinks {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("MoveLinks")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

/// A move is clearly shorter than another when it saves more than this share of its time:
/// a measured rate varies by a few percent between migrations, so a smaller gain would only
/// make the choice flip between equal nodes.
pub const CLEARLY_SHORTER: f64 = 0.05;

/// ... and at least this many seconds: less is within what setting up a migration and the
/// estimate's own error amount to. Without it the slightly smaller memory in common that
/// "similar" allows would count against a node wherever the relay skips what it holds.
pub const MIN_SAVING_SECONDS: f64 = 1.0;

/// The similar candidates after the leader whose move is estimated, at most.
pub const TIMED_CANDIDATES: usize = 64;

impl MoveLinks {
    /// Estimated seconds of the move to a node holding `common_bytes` of the VM over `link`;
    /// `None` when the estimate cannot be made (no bandwidth).
    pub fn seconds(&self, link: Link, common_bytes: u64) -> Option<f64> {
        let mut input = self.base;
        input.common_bytes = common_bytes.min(input.memory_bytes.saturating_sub(input.zero_bytes));
        input.bandwidth = link.bytes_per_second;
        input.transport = link.transport;
        estimate(&input)
            .ok()
            .map(|e| e.seconds)
            .filter(|s| s.is_finite())
    }
}

/// Whether a move of `seconds` is clearly shorter than one of `than`.
pub fn clearly_shorter(seconds: f64, than: f64) -> bool {
    let saving = than - seconds;
    saving > than * CLEARLY_SHORTER && saving >= MIN_SAVING_SECONDS
}

/// Of estimated moves in ranking order (`None`: no estimate), the position of the one that
/// should go first instead of the leader (position 0): the shortest, when it is clearly
/// shorter than the leader's. A leader without an estimate keeps its place.
pub fn promoted(seconds: &[Option<f64>]) -> Option<usize> {
    let leader = (*seconds.first()?)?;
    let (pos, best) = seconds
        .iter()
        .enumerate()
        .skip(1)
        .filter_map(|(i, s)| s.map(|s| (i, s)))
        .min_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(&b.0)))?;
    clearly_shorter(best, leader).then_some(pos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn links() -> MoveLinks {
        let mut base = EstimateInput::new(8 * GIB, 0.0, 1.0);
        base.zero_bytes = 2 * GIB;
        MoveLinks {
            base,
            link_of: Arc::new(|_| Link {
                bytes_per_second: 1e9,
                transport: Transport::SkipCommon,
            }),
        }
    }

    #[test]
    fn the_estimate_uses_the_link_and_the_memory_in_common() {
        let l = links();
        let fast = Link {
            bytes_per_second: 1e9,
            transport: Transport::SkipCommon,
        };
        let slow = Link {
            bytes_per_second: 5e8,
            ..fast
        };
        let stock = Link {
            transport: Transport::Stock,
            ..fast
        };
        let t = |link, common| l.seconds(link, common).unwrap();
        // 6 GiB non-zero, 4 GiB of it on the node: 2 GiB to send.
        assert!((t(fast, 4 * GIB) - 2.0 * GIB as f64 / 1e9).abs() < 0.01);
        assert!((t(slow, 4 * GIB) - 2.0 * t(fast, 4 * GIB)).abs() < 0.01);
        // Without the relay the memory in common is sent anyway.
        assert!((t(stock, 4 * GIB) - t(fast, 0)).abs() < 0.01);
        // More in common than the non-zero memory is capped, never negative.
        assert!(t(fast, 100 * GIB) >= 0.0);
        let none = Link {
            bytes_per_second: 0.0,
            ..fast
        };
        assert_eq!(l.seconds(none, 0), None);
    }

    #[test]
    fn only_a_clearly_shorter_move_takes_the_lead() {
        assert_eq!(promoted(&[Some(10.0), Some(9.0), Some(12.0)]), Some(1));
        // 3% shorter is within what a measured rate varies by.
        assert_eq!(promoted(&[Some(10.0), Some(9.7)]), None);
        // Half as long, but half a second saved: not worth a change.
        assert_eq!(promoted(&[Some(1.0), Some(0.5)]), None);
        // The shortest wins, the first of equals.
        assert_eq!(
            promoted(&[Some(10.0), Some(8.0), Some(5.0), Some(5.0)]),
            Some(2)
        );
        // No estimate for the leader, or for anyone else: the order stays.
        assert_eq!(promoted(&[None, Some(1.0)]), None);
        assert_eq!(promoted(&[Some(10.0), None]), None);
        assert_eq!(promoted(&[]), None);
    }
}
