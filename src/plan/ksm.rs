//! KSM after arrival: where the ranking prefers a node on which KSM runs.
//!
//! Without the migration relay every non-zero page is sent wherever the VM goes, so the real
//! gain of placing it next to memory it has in common is what the kernel's same-page merging
//! (KSM) merges once the VM has arrived: the VM's copy of that content and the copy already on
//! the node become one page. KubeVirt's virt-handler turns KSM on for the nodes its
//! `ksmConfiguration` selects, while they are under memory pressure, and labels such a node
//! `kubevirt.io/ksm-enabled=true` (`false` when it has turned KSM off). On a node without KSM
//! the same content stays in two copies.
//!
//! So, for a candidate, the bytes KSM could merge are its memory in common with the VM where KSM
//! runs, and none elsewhere. Between candidates holding similar memory in common (within the
//! estimate's sampling error, or [`SIMILAR_FRACTION`] of the VM's non-zero memory, whichever
//! is larger), a node where KSM runs goes first; load decides only after that. A candidate with
//! clearly more in common keeps the first place: with the relay that content is not sent at
//! all, and KSM may start on that node later.

use super::cluster::NodeFacts;

/// The label virt-handler sets on a node where it turned KSM on.
pub const KSM_ENABLED_LABEL: &str = "kubevirt.io/ksm-enabled";

/// Share of the VM's non-zero memory within which two candidates' memory in common counts as
/// similar, however exactly it was sampled: 2% of a 16 GiB VM is about 330 MiB, below what
/// guest activity changes between two agent scans.
pub const SIMILAR_FRACTION: f64 = 0.02;

/// Whether KSM runs on `node`, from virt-handler's label.
pub fn ksm_runs(node: &NodeFacts) -> bool {
    node.labels.get(KSM_ENABLED_LABEL).map(String::as_str) == Some("true")
}

/// The bytes of the VM's memory KSM could merge on a node after arrival.
pub fn mergeable_bytes(common_bytes: u64, ksm: bool) -> u64 {
    if ksm {
        common_bytes
    } else {
        0
    }
}

/// One candidate as the KSM rule sees it, in ranking order.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct KsmCandidate {
    /// Estimated regions of the VM on the node.
    pub common: f64,
    /// One standard error of `common` (0 when every region was sampled).
    pub error: f64,
    pub ksm: bool,
    /// Its move is estimated clearly longer than the shortest among the similar candidates
    /// (see [`super::move_time`]): KSM does not make up for a slower move.
    pub clearly_slower: bool,
}

/// How many standard errors of the difference still count as similar.
const SIMILAR_STANDARD_ERRORS: f64 = 2.0;

/// Whether `other` holds memory in common similar to `leader`'s (`nonzero`: the VM's non-zero
/// regions).
pub fn similar(leader: &KsmCandidate, other: &KsmCandidate, nonzero: f64) -> bool {
    let margin =
        (SIMILAR_STANDARD_ERRORS * leader.error.hypot(other.error)).max(SIMILAR_FRACTION * nonzero);
    leader.common - other.common <= margin
}

/// The position of the candidate that should go first instead of the leader (position 0), if
/// any: the leader has no KSM, and among the candidates ranked right after it with similar
/// memory in common, the first where KSM runs and with something in common to merge.
/// A KSM node whose move is clearly slower is passed over.
/// `candidates` yields them in ranking order, leader first, and only as far as the leader's
/// work group goes; the scan stops at the first candidate that is not similar.
pub fn promoted(mut candidates: impl Iterator<Item = KsmCandidate>, nonzero: f64) -> Option<usize> {
    let leader = candidates.next()?;
    if leader.ksm {
        return None;
    }
    for (pos, c) in candidates.enumerate() {
        if !similar(&leader, &c, nonzero) {
            return None;
        }
        if c.ksm && c.common > 0.0 && !c.clearly_slower {
            return Some(pos + 1);
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn c(common: f64, error: f64, ksm: bool) -> KsmCandidate {
        KsmCandidate {
            common,
            error,
            ksm,
            clearly_slower: false,
        }
    }

    #[test]
    fn a_ksm_node_with_similar_memory_in_common_goes_first() {
        // 1,000 non-zero regions: 2% is 20 regions.
        let ranked = [
            c(500.0, 0.0, false),
            c(490.0, 0.0, false),
            c(485.0, 0.0, true),
        ];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), Some(2));
    }

    #[test]
    fn clearly_more_in_common_keeps_the_first_place() {
        let ranked = [c(500.0, 0.0, false), c(450.0, 0.0, true)];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), None);
        // ... unless the estimates are that uncertain: 2 standard errors of the difference
        // (hypot(20, 20) * 2 = 56.6) cover 50 regions.
        let ranked = [c(500.0, 20.0, false), c(450.0, 20.0, true)];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), Some(1));
    }

    #[test]
    fn the_leader_with_ksm_and_nodes_with_nothing_in_common_stay_as_ranked() {
        let ranked = [c(500.0, 0.0, true), c(500.0, 0.0, false)];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), None);
        // Nothing in common anywhere: KSM merges nothing of ours, load decides.
        let ranked = [c(0.0, 0.0, false), c(0.0, 0.0, true)];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), None);
        assert_eq!(promoted(std::iter::empty(), 1000.0), None);
    }

    #[test]
    fn the_scan_stops_at_the_first_dissimilar_candidate() {
        let ranked = [
            c(500.0, 0.0, false),
            c(400.0, 0.0, false),
            c(499.0, 0.0, true),
        ];
        assert_eq!(promoted(ranked.into_iter(), 1000.0), None);
    }

    #[test]
    fn the_label_and_the_mergeable_bytes() {
        let mut node = NodeFacts {
            name: "n".into(),
            labels: Default::default(),
            taints: Vec::new(),
            unschedulable: false,
            ready: true,
            allocatable: Default::default(),
            requested: Default::default(),
            work_group: String::new(),
            load: None,
            scalar_allocatable: Default::default(),
            scalar_requested: Default::default(),
        };
        assert!(!ksm_runs(&node));
        node.labels.insert(KSM_ENABLED_LABEL.into(), "false".into());
        assert!(!ksm_runs(&node));
        node.labels.insert(KSM_ENABLED_LABEL.into(), "true".into());
        assert!(ksm_runs(&node));
        assert_eq!(mergeable_bytes(1 << 30, true), 1 << 30);
        assert_eq!(mergeable_bytes(1 << 30, false), 0);
    }
}
