//! Ranking candidates inside a work group (seed 000): the chosen node has at least as many
//! regions in common with the VM as every other candidate; ties go to the lower load, then to
//! the node name so the same inputs always give the same answer. The same order yields the
//! extender's 0..10 scores, so kube-scheduler and the controller agree.

use std::cmp::Ordering;

/// One candidate as the ranking sees it.
#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub node: String,
    /// Estimated regions of the VM already on the node.
    pub common_regions: f64,
    pub load: f64,
    /// False when the node has not published a digest yet (its common regions count as 0).
    pub has_digest: bool,
    /// KSM runs on the node (see [`super::ksm`]).
    pub ksm: bool,
    /// Estimated seconds of the move there, where the time rule looked (see
    /// [`super::move_time`]).
    pub seconds: Option<f64>,
}

/// `Less` when `a` ranks before `b`.
pub fn rank_order(a: &Scored, b: &Scored) -> Ordering {
    b.common_regions
        .total_cmp(&a.common_regions)
        .then(a.load.total_cmp(&b.load))
        .then_with(|| a.node.cmp(&b.node))
}

/// Sorts best first.
pub fn rank(candidates: &mut [Scored]) {
    candidates.sort_by(rank_order);
}

/// Why `loser` ranked below `winner`, for status and Events.
pub fn why_lost(loser: &Scored, winner: &Scored) -> String {
    let shorter = match (winner.seconds, loser.seconds) {
        (Some(w), Some(l)) if super::move_time::clearly_shorter(w, l) => Some((w, l)),
        _ => None,
    };
    if let Some((w, l)) = shorter.filter(|_| loser.common_regions >= winner.common_regions) {
        // Only the time rule puts a node with less in common first on a shorter move.
        format!(
            "memory in common similar to {}'s ({:.0} vs {:.0} regions), and the move there is \
             estimated shorter ({w:.1} s vs {l:.1} s)",
            winner.node, loser.common_regions, winner.common_regions
        )
    } else if winner.ksm && !loser.ksm && loser.common_regions >= winner.common_regions {
        // Only the KSM rule puts a node with less in common first.
        format!(
            "memory in common similar to {}'s ({:.0} vs {:.0} regions), where KSM runs and can \
             merge it after arrival",
            winner.node, loser.common_regions, winner.common_regions
        )
    } else if loser.common_regions < winner.common_regions {
        let what = if loser.has_digest {
            "fewer regions in common"
        } else {
            "no digest published yet, counted as nothing in common"
        };
        format!(
            "{what} ({:.0} vs {:.0} on {})",
            loser.common_regions, winner.common_regions, winner.node
        )
    } else if loser.load > winner.load {
        format!(
            "as many regions in common as {}, higher load ({:.2} vs {:.2})",
            winner.node, loser.load, winner.load
        )
    } else {
        format!(
            "equal on regions and load with {}, tie broken by name",
            winner.node
        )
    }
}

/// Scheduler-extender scores (0..=10) for ranked candidates, best first. The best gets 10 and
/// every other at most 9, so kube-scheduler's weighted sum keeps our first choice first when
/// the other plugins are indifferent. Below the top: common memory (80%) and spare load (20%),
/// capped so the scores never rise down the ranking.
pub fn extender_scores(ranked: &[Scored]) -> Vec<u8> {
    extender_scores_of(ranked.iter().map(|s| (s.common_regions, s.load)))
}

/// [`extender_scores`] from (common regions, load) pairs, best first.
pub fn extender_scores_of(ranked: impl ExactSizeIterator<Item = (f64, f64)>) -> Vec<u8> {
    let mut out = Vec::with_capacity(ranked.len());
    let mut best_common = 0.0;
    let mut previous = 10u8;
    for (i, (common, load)) in ranked.enumerate() {
        if i == 0 {
            best_common = common;
            out.push(10);
            continue;
        }
        let common = if best_common > 0.0 {
            (common / best_common).clamp(0.0, 1.0)
        } else {
            0.0
        };
        let spare = (1.0 - load).clamp(0.0, 1.0);
        let raw = (9.0 * (0.8 * common + 0.2 * spare)).round().clamp(0.0, 9.0) as u8;
        // Never score a node above one the ranking put before it.
        previous = raw.min(previous);
        out.push(previous);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn s(node: &str, common: f64, load: f64) -> Scored {
        Scored {
            node: node.into(),
            common_regions: common,
            load,
            has_digest: true,
            ksm: false,
            seconds: None,
        }
    }

    #[test]
    fn most_regions_in_common_wins_even_when_more_loaded() {
        let mut v = vec![s("a", 10.0, 0.1), s("b", 30.0, 0.9), s("c", 20.0, 0.0)];
        rank(&mut v);
        assert_eq!(v[0].node, "b");
        // The >= rule: the winner has at least as many as every other candidate.
        assert!(v.iter().all(|c| v[0].common_regions >= c.common_regions));
    }

    #[test]
    fn equal_common_goes_to_lower_load_then_name() {
        let mut v = vec![s("b", 5.0, 0.5), s("c", 5.0, 0.2), s("a", 5.0, 0.2)];
        rank(&mut v);
        let order: Vec<_> = v.iter().map(|c| c.node.as_str()).collect();
        assert_eq!(order, ["a", "c", "b"]);
        assert!(why_lost(&v[1], &v[0]).contains("tie broken by name"));
        assert!(why_lost(&v[2], &v[0]).contains("higher load"));
        let ksm_winner = Scored {
            ksm: true,
            ..s("k", 4.9, 0.9)
        };
        assert!(why_lost(&v[0], &ksm_winner).contains("where KSM runs"));
        let faster = Scored {
            seconds: Some(10.0),
            ..s("f", 4.9, 0.9)
        };
        let slower = Scored {
            seconds: Some(20.0),
            ..v[0].clone()
        };
        assert!(why_lost(&slower, &faster).contains("estimated shorter (10.0 s vs 20.0 s)"));
        // Nearly as fast is no reason: the regions speak.
        let nearly = Scored {
            seconds: Some(10.2),
            ..slower.clone()
        };
        assert!(!why_lost(&nearly, &faster).contains("estimated shorter"));
    }

    #[test]
    fn scores_follow_the_ranking() {
        let mut v = vec![
            s("a", 100.0, 0.5),
            s("b", 50.0, 0.5),
            s("c", 0.0, 0.0),
            s("d", 100.0, 0.6),
        ];
        rank(&mut v);
        let scores = extender_scores(&v);
        assert_eq!(v[0].node, "a");
        assert_eq!(scores[0], 10);
        assert!(scores[1..].iter().all(|x| *x <= 9));
        assert!(scores.windows(2).all(|w| w[0] >= w[1]), "{scores:?}");
    }
}
