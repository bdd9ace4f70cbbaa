//! The planner: from a VM to a target node, with every decision explained.
//!
//! 1. Minimum hardware filter (seed 000, claim 1) → candidates, each left-out node with a reason.
//! 2. Work group (seed 002): scope `WorkGroup` keeps the source's work group when it has a
//!    candidate; scope `Cluster` scores every work group by the VM regions available in it,
//!    the highest wins and a tie goes to the work group nearest the source. Estimates within
//!    the sketches' sampling error of the highest count as a tie ([`nearest_of_near_ties`]).
//! 3. Inside the work group, [`rank`](super::rank) (seed 000: most regions in common, then load).
//! 4. Bytes to move = memory - common - zero.

use std::collections::HashMap;

use serde::{Deserialize, Serialize};

use super::cluster::{ClusterSnapshot, VmKey, VmRegionSummary, VmRequest};
use super::hardware::{check_node, FilterReason};
use super::ksm;
use super::move_time::{self, MoveLinks};
use super::overlap_index::OverlapIndex;
use super::rank::{extender_scores_of, why_lost, Scored};
use super::sketch::{RegionSketch, KEY_SPACE};
use super::workgroups::DistanceError;

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Scope {
    /// Stay in the source's work group when it has a candidate.
    #[default]
    WorkGroup,
    /// Long-distance rule across all work groups.
    Cluster,
}

#[derive(Clone, Debug, Default)]
pub struct PlanOptions {
    pub scope: Scope,
    pub pinned_node: Option<String>,
    pub pinned_work_group: Option<String>,
    /// Only these nodes are considered (the extender's node list); `None` means all.
    pub only_nodes: Option<Vec<String>>,
    /// Passing candidates (best first) that get a written reason for losing; the rest get a
    /// short one. Writing 5,000 reasons would dominate a scheduler-extender request.
    pub explain_top: Option<usize>,
    /// Passing candidates a plan lists, best first, and filtered nodes it lists (default
    /// [`DEFAULT_LISTED`]); the rest are counted. Memory in common is counted only in the
    /// work groups that hold the listed candidates (see [`Planner::rank_nodes`]).
    pub listed: Option<usize>,
    /// Nodes left out whatever they offer, each with why (an earlier attempt to migrate
    /// there failed).
    pub excluded_nodes: Vec<(String, String)>,
    /// How each candidate is reached from the source, to estimate its move: between
    /// candidates with similar memory in common the clearly shorter move goes first (see
    /// [`super::move_time`]). `None`: memory in common, KSM and load decide alone.
    pub move_links: Option<MoveLinks>,
}

/// Sampled entries the overlap index holds at most (~400 MiB). A 100-node cluster of full
/// 256 KiB digests needs about 4.5 M; 5,000 such nodes would need 217 M.
pub const DEFAULT_INDEX_BUDGET: usize = 45_000_000;

/// Reasons are written for this many candidates unless the options say otherwise.
pub const DEFAULT_EXPLAINED: usize = 32;

/// Candidates a plan lists unless the options say otherwise (status shows the first five).
pub const DEFAULT_LISTED: usize = 64;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum PlanError {
    #[error("source node {0:?} of the VM is not a known node")]
    UnknownSourceNode(String),
    #[error("pinned target node {0:?} is not a known node")]
    UnknownPinnedNode(String),
    #[error(transparent)]
    Distance(#[from] DistanceError),
    #[error("a group needs at least one member")]
    EmptyGroup,
    #[error("group members run on different nodes ({0} and {1}); a memory group shares one node")]
    GroupSplit(String, String),
}

/// How a node fared.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase", tag = "verdict", content = "reason")]
pub enum Verdict {
    Chosen,
    Lost(String),
    Filtered(String),
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Candidate {
    pub node: String,
    pub work_group: String,
    pub common_regions: f64,
    pub common_bytes: u64,
    pub distance: f64,
    pub load: f64,
    pub has_digest: bool,
    /// KSM runs on the node (virt-handler's `kubevirt.io/ksm-enabled` label).
    pub ksm: bool,
    /// Bytes of the VM's memory KSM could merge there after arrival (see [`super::ksm`]).
    pub ksm_mergeable_bytes: u64,
    /// Scheduler-extender score 0..=10 (0 for filtered nodes).
    pub score: u8,
    pub verdict: Verdict,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WorkGroupScore {
    pub work_group: String,
    /// Estimated VM regions available somewhere in the work group (source node excluded).
    pub regions_available: f64,
    /// One standard error of `regions_available` from the sketches' sampling (0 when every
    /// region is sampled).
    pub regions_error: f64,
    pub distance: f64,
    pub candidates: usize,
    pub chosen: bool,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct ByteEstimate {
    pub total: u64,
    pub zero: u64,
    pub common: u64,
    pub to_move: u64,
    /// Of `common`, what KSM could merge on the chosen node after arrival (0 where KSM does
    /// not run).
    pub ksm_mergeable: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct Plan {
    pub vm: VmKey,
    pub source_node: String,
    pub source_work_group: String,
    pub target_node: Option<String>,
    pub target_work_group: Option<String>,
    /// Passing candidates best first, then filtered nodes, as many of each as
    /// [`PlanOptions::listed`] says.
    pub candidates: Vec<Candidate>,
    /// Nodes that pass the filter, listed or not.
    pub passing: usize,
    /// Nodes the filter left out, listed or not.
    pub filtered: usize,
    pub work_groups: Vec<WorkGroupScore>,
    /// Bytes for the chosen target (all zeros when there is none).
    pub bytes: ByteEstimate,
    /// Things a person should know (missing summary, fallbacks taken).
    pub notes: Vec<String>,
}

impl Plan {
    pub fn target(&self) -> Option<&Candidate> {
        self.candidates
            .iter()
            .find(|c| c.verdict == Verdict::Chosen)
    }
}

/// One passing node of a [`Ranking`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct RankedNode {
    /// Position in the snapshot's node list.
    pub node: usize,
    pub load: f64,
    /// Scheduler-extender score 0..=10.
    pub score: u8,
    /// Estimated seconds of the move there, where the time rule looked at the node.
    pub seconds: Option<f64>,
}

/// What [`Planner::rank_nodes`] decided, by node position.
#[derive(Debug)]
pub struct Ranking {
    pub source: usize,
    pub source_group: String,
    /// False when the VM has no memory summary: ranked by load only.
    pub has_summary: bool,
    /// Passing nodes, best first.
    pub ranked: Vec<RankedNode>,
    /// Nodes that failed the filter, with why.
    pub filtered: Vec<(usize, FilterReason)>,
    /// Estimated VM regions on every node, by position (0 outside the counted work groups).
    pub common: Vec<f64>,
    /// By work group index, whether the VM's memory in common was counted there; `None`:
    /// everywhere.
    pub counted_groups: Option<Vec<bool>>,
    /// Work groups with candidates, the chosen one first.
    pub work_groups: Vec<WorkGroupScore>,
    /// Distance from the source's work group, by work group index.
    group_distance: Vec<f64>,
    pub notes: Vec<String>,
}

/// A memory group as one request, from [`Planner::group_request`].
#[derive(Clone, Debug)]
pub struct GroupRequest {
    pub request: VmRequest,
    /// By node position: does the node meet every member's own constraints?
    pub allowed: Vec<bool>,
    /// Every member has a memory summary (else the group is ranked by load).
    pub every_summary: bool,
}

/// The sort key of one passing node.
struct RankKey {
    group_rank: usize,
    common: f64,
    load: f64,
    name_order: u32,
    node: usize,
    seconds: Option<f64>,
}

/// A cluster snapshot made ready for planning. Cheap to query, rebuilt when the view changes.
pub struct Planner {
    snapshot: ClusterSnapshot,
    node_pos: HashMap<String, usize>,
    /// Each node's place in name order: the last tie-break without comparing strings.
    name_order: Vec<u32>,
    group_of: Vec<usize>,
    groups: Vec<String>,
    vm_home: HashMap<VmKey, (usize, usize)>,
    index: OverlapIndex,
}

impl Planner {
    pub fn new(snapshot: ClusterSnapshot) -> Self {
        Self::with_index_budget(snapshot, DEFAULT_INDEX_BUDGET)
    }

    /// As [`Planner::new`], holding at most `index_budget` sampled entries in the overlap
    /// index (about 9 bytes each).
    pub fn with_index_budget(snapshot: ClusterSnapshot, index_budget: usize) -> Self {
        let node_pos: HashMap<String, usize> = snapshot
            .nodes
            .iter()
            .enumerate()
            .map(|(i, n)| (n.name.clone(), i))
            .collect();
        let mut by_name: Vec<usize> = (0..snapshot.nodes.len()).collect();
        by_name.sort_by(|&a, &b| snapshot.nodes[a].name.cmp(&snapshot.nodes[b].name));
        let mut name_order = vec![0u32; snapshot.nodes.len()];
        for (order, &i) in by_name.iter().enumerate() {
            name_order[i] = order as u32;
        }
        let mut groups: Vec<String> = snapshot
            .nodes
            .iter()
            .map(|n| n.work_group.clone())
            .collect();
        groups.sort();
        groups.dedup();
        let group_of: Vec<usize> = snapshot
            .nodes
            .iter()
            .map(|n| groups.binary_search(&n.work_group).unwrap_or(0))
            .collect();
        let mut node_sketch: Vec<Option<&RegionSketch>> = vec![None; snapshot.nodes.len()];
        let mut vm_home = HashMap::new();
        for (d, digest) in snapshot.digests.iter().enumerate() {
            if digest.geometry != snapshot.geometry {
                continue; // a digest with another region size cannot be compared
            }
            if let Some(&i) = node_pos.get(&digest.node) {
                node_sketch[i] = Some(&digest.sketch);
            }
            for (v, vm) in digest.vms.iter().enumerate() {
                vm_home.insert(vm.vm.clone(), (d, v));
            }
        }
        // Bound the index: past the budget every node's sketch is coarsened by the same factor
        // (still a consistent sample), trading estimate precision for time and memory only in
        // very large clusters.
        let total: usize = node_sketch.iter().flatten().map(|s| s.len()).sum();
        let index = if total > index_budget {
            let factor = index_budget as f64 / total as f64;
            let coarse: Vec<Option<RegionSketch>> = node_sketch
                .iter()
                .map(|s| {
                    s.map(|s| {
                        let mut c = s.clone();
                        c.coarsen(((s.threshold() as f64) * factor).max(1.0) as u64);
                        c
                    })
                })
                .collect();
            let refs: Vec<Option<&RegionSketch>> = coarse.iter().map(Option::as_ref).collect();
            OverlapIndex::build_grouped(&refs, &group_of)
        } else {
            OverlapIndex::build_grouped(&node_sketch, &group_of)
        };
        Self {
            node_pos,
            name_order,
            group_of,
            groups,
            vm_home,
            index,
            snapshot,
        }
    }

    pub fn snapshot(&self) -> &ClusterSnapshot {
        &self.snapshot
    }

    pub fn index(&self) -> &OverlapIndex {
        &self.index
    }

    /// The VM's published summary, wherever a digest holds it.
    pub fn vm_summary(&self, vm: &VmKey) -> Option<&VmRegionSummary> {
        self.vm_home
            .get(vm)
            .map(|&(d, v)| &self.snapshot.digests[d].vms[v])
    }

    pub fn node_position(&self, name: &str) -> Option<usize> {
        self.node_pos.get(name).copied()
    }

    /// Estimated regions of the VM on every node (index order), from the sampled overlap.
    pub fn common_regions(&self, summary: &VmRegionSummary, hits: &mut Vec<u32>) -> Vec<f64> {
        self.common_regions_in(summary, hits, None)
    }

    /// As [`Planner::common_regions`], counted only on the nodes of the work groups marked
    /// in `groups` (by work group index; `None`: every node). Elsewhere 0.
    fn common_regions_in(
        &self,
        summary: &VmRegionSummary,
        hits: &mut Vec<u32>,
        groups: Option<&[bool]>,
    ) -> Vec<f64> {
        match groups {
            None => self.index.count_hits(&summary.sketch, hits),
            Some(marked) => {
                let wanted: Vec<usize> = (0..marked.len()).filter(|&g| marked[g]).collect();
                self.index.count_hits_in(&summary.sketch, hits, &wanted);
            }
        }
        let nonzero = summary.nonzero_regions() as f64;
        // Nodes share few thresholds: the sampled count is looked up once per threshold.
        let mut last = (u64::MAX, 0u32);
        (0..self.index.node_count())
            .map(|i| {
                if hits[i] == 0 {
                    return 0.0;
                }
                let threshold = self.index.node_threshold(i);
                if last.0 != threshold {
                    last = (threshold, self.index.sampled_for(&summary.sketch, i));
                }
                hits[i] as f64 / last.1 as f64 * nonzero
            })
            .collect()
    }

    /// Estimated VM regions available in each work group, the source node left out.
    /// For each work group: the estimated VM regions available in it, and the estimate's
    /// standard error. The estimate is the fraction of the VM's sampled regions found in the
    /// group, times its nonzero regions; a sampled fraction `f` of `m` samples taken at rate
    /// `p` has the binomial error `sqrt(f(1-f)/m)`, shrunk by `sqrt(1-p)` because the sample
    /// is drawn from a finite set (at `p = 1` every region is looked at and nothing is left
    /// to chance).
    fn work_group_regions(&self, summary: &VmRegionSummary, source: usize) -> Vec<(f64, f64)> {
        let g = self.groups.len();
        let mut threshold = vec![u64::MAX; g];
        for i in 0..self.index.node_count() {
            if i != source && self.index.has_digest(i) {
                let t = &mut threshold[self.group_of[i]];
                *t = (*t).min(self.index.node_threshold(i));
            }
        }
        let mut hits = vec![0u32; g];
        let mut seen_at = vec![usize::MAX; g];
        for (k, &key) in summary.sketch.keys().iter().enumerate() {
            if let Some(holders) = self.index.holders_unchecked(key) {
                // Every group's threshold covers this key: only the per-key dedup remains,
                // and once every group has it the rest of a long posting list adds nothing.
                let mut seen = 0;
                for n in holders {
                    let grp = self.group_of[n];
                    if n != source && seen_at[grp] != k {
                        seen_at[grp] = k;
                        hits[grp] += 1;
                        seen += 1;
                        if seen == g {
                            break;
                        }
                    }
                }
                continue;
            }
            self.index.for_each_holder(key, |n| {
                let grp = self.group_of[n];
                if n != source && key < threshold[grp] && seen_at[grp] != k {
                    seen_at[grp] = k;
                    hits[grp] += 1;
                }
            });
        }
        let nonzero = summary.nonzero_regions() as f64;
        (0..g)
            .map(|grp| {
                let sampled = if threshold[grp] == u64::MAX {
                    0
                } else {
                    summary.sketch.count_below(threshold[grp])
                };
                if sampled == 0 {
                    return (0.0, 0.0);
                }
                let f = hits[grp] as f64 / sampled as f64;
                let threshold = threshold[grp].min(summary.sketch.threshold());
                (f * nonzero, sampling_error(f, sampled, threshold, nonzero))
            })
            .collect()
    }

    /// A memory group as one request (`Together`): the requests of every member summed, and
    /// their memory summaries united (only when every member has one). `allowed[i]` says
    /// whether node `i` meets each member's own constraints (selectors, affinity, taints, CPU).
    pub fn group_request(&self, members: &[VmRequest]) -> Result<GroupRequest, PlanError> {
        let (first, rest) = members.split_first().ok_or(PlanError::EmptyGroup)?;
        if let Some(other) = rest.iter().find(|m| m.source_node != first.source_node) {
            return Err(PlanError::GroupSplit(
                first.source_node.clone(),
                other.source_node.clone(),
            ));
        }
        let mut combined = first.clone();
        let summaries: Vec<VmRegionSummary> = members
            .iter()
            .filter_map(|m| {
                m.summary
                    .clone()
                    .or_else(|| self.vm_summary(&m.vm).cloned())
            })
            .collect();
        for m in rest {
            combined.requests = combined.requests + m.requests;
            combined.memory_bytes += m.memory_bytes;
            combined.fit.memory_overhead_bytes += m.fit.memory_overhead_bytes;
            for (k, v) in &m.fit.scalar_requests {
                *combined.fit.scalar_requests.entry(k.clone()).or_default() += v;
            }
            combined.fit.volumes.extend(m.fit.volumes.iter().cloned());
            combined
                .fit
                .excluded_domains
                .extend(m.fit.excluded_domains.iter().cloned());
        }
        let complete = summaries.len() == members.len();
        combined.summary = complete.then(|| VmRegionSummary {
            vm: first.vm.clone(),
            memory_bytes: summaries.iter().map(|s| s.memory_bytes).sum(),
            regions: summaries.iter().map(|s| s.regions).sum(),
            zero_regions: summaries.iter().map(|s| s.zero_regions).sum(),
            sketch: RegionSketch::union_all(summaries.iter().map(|s| &s.sketch)),
            dirty_rate: summaries.iter().map(|s| s.dirty_rate).sum(),
            working_set_bytes: summaries.iter().map(|s| s.working_set_bytes).sum(),
            load: summaries.iter().map(|s| s.load).sum(),
        });
        let allowed = self
            .snapshot
            .nodes
            .iter()
            .map(|n| {
                rest.iter().all(|m| {
                    let mut alone = m.clone();
                    alone.requests = Default::default();
                    alone.fit.scalar_requests.clear();
                    check_node(&alone, n).is_none()
                })
            })
            .collect();
        Ok(GroupRequest {
            request: combined,
            allowed,
            every_summary: complete,
        })
    }

    /// Plans a memory group as one unit (`Together`): the target must fit every member at
    /// once and satisfy each member's constraints, and candidates are ranked by the union of
    /// the members' regions. The plan names the first member.
    pub fn plan_group(&self, members: &[VmRequest], opts: &PlanOptions) -> Result<Plan, PlanError> {
        let group = self.group_request(members)?;
        let allowed: Vec<String> = self
            .snapshot
            .nodes
            .iter()
            .zip(&group.allowed)
            .filter(|(n, ok)| {
                **ok && opts
                    .only_nodes
                    .as_ref()
                    .is_none_or(|only| only.contains(&n.name))
            })
            .map(|(n, _)| n.name.clone())
            .collect();
        let mut opts = opts.clone();
        opts.only_nodes = Some(allowed);
        let mut plan = self.plan(&group.request, &opts)?;
        if !group.every_summary {
            plan.notes
                .push("not every member has a memory summary yet: ranked by load".into());
        }
        Ok(plan)
    }

    /// Ranks the `considered` node positions (every node when `None`) for `req`: steps 1-3
    /// of the module doc on positions only, so that 5,000 candidates cost no strings. `plan`
    /// explains the result; the extender answers straight from it.
    pub fn rank_nodes(
        &self,
        req: &VmRequest,
        opts: &PlanOptions,
        considered: Option<&[usize]>,
    ) -> Result<Ranking, PlanError> {
        let source = *self
            .node_pos
            .get(&req.source_node)
            .ok_or_else(|| PlanError::UnknownSourceNode(req.source_node.clone()))?;
        let pinned = match &opts.pinned_node {
            Some(p) => Some(
                self.node_position(p)
                    .ok_or_else(|| PlanError::UnknownPinnedNode(p.clone()))?,
            ),
            None => None,
        };
        // A work group nobody is in matches no node (`usize::MAX`).
        let pinned_group = opts
            .pinned_work_group
            .as_ref()
            .map(|g| self.groups.binary_search(g).unwrap_or(usize::MAX));
        let nodes = &self.snapshot.nodes;
        let source_group = nodes[source].work_group.clone();
        let mut notes = Vec::new();

        let full = req.summary.as_ref().or_else(|| self.vm_summary(&req.vm));
        if full.is_none() {
            notes.push(format!(
                "no memory summary for {} yet: ranked by load only",
                req.vm
            ));
        }
        let sample = full.map(ranking_sample);
        let summary = sample.as_deref();
        // 1. Minimum hardware configuration.
        let all: Vec<usize>;
        let considered = match considered {
            Some(c) => c,
            None => {
                all = (0..nodes.len()).collect();
                &all
            }
        };
        let mut passing = Vec::with_capacity(considered.len());
        let mut filtered = Vec::new();
        for &i in considered {
            let node = &nodes[i];
            let excluded = opts
                .excluded_nodes
                .iter()
                .find(|(n, _)| *n == node.name)
                .map(|(_, why)| FilterReason::EarlierAttemptFailed(why.clone()));
            let reason = excluded
                .or_else(|| check_node(req, node))
                .or_else(|| {
                    pinned
                        .filter(|&p| p != i)
                        .map(|p| FilterReason::NotPinnedTarget(nodes[p].name.clone()))
                })
                .or_else(|| {
                    pinned_group.filter(|&g| g != self.group_of[i]).map(|_| {
                        FilterReason::OutsideWorkGroup {
                            node_group: node.work_group.clone(),
                            wanted: opts.pinned_work_group.clone().unwrap_or_default(),
                        }
                    })
                });
            match reason {
                Some(r) => filtered.push((i, r)),
                None => passing.push(i),
            }
        }

        // 2. Work group.
        let distance_to = |g: &str| self.snapshot.distances.distance(&source_group, g);
        let mut group_candidates = vec![0usize; self.groups.len()];
        for &i in &passing {
            group_candidates[self.group_of[i]] += 1;
        }
        let source_gi = self.group_of[source];
        let use_cluster_rule = match opts.scope {
            Scope::Cluster => true,
            Scope::WorkGroup => {
                let stay = group_candidates[source_gi] > 0;
                if !stay && !passing.is_empty() {
                    notes.push(format!(
                        "no candidate in work group {source_group}: chose across work groups"
                    ));
                }
                !stay
            }
        };
        // The second pass over the posting lists is only needed when work groups compete.
        let group_regions = match summary {
            Some(s) if use_cluster_rule => self.work_group_regions(s, source),
            _ => vec![(0.0, 0.0); self.groups.len()],
        };
        // Distances once per work group (NaN where the matrix cannot say and no rule needs it).
        let mut group_distance = vec![f64::NAN; self.groups.len()];
        let mut work_groups = Vec::new();
        for (gi, name) in self.groups.iter().enumerate() {
            if group_candidates[gi] == 0 {
                group_distance[gi] = distance_to(name).unwrap_or(f64::NAN);
                continue;
            }
            group_distance[gi] = distance_to(name)?;
            work_groups.push(WorkGroupScore {
                work_group: name.clone(),
                regions_available: group_regions[gi].0,
                regions_error: group_regions[gi].1,
                distance: group_distance[gi],
                candidates: group_candidates[gi],
                chosen: false,
            });
        }
        // Highest score first; a tie goes to the shortest distance, then the name.
        work_groups.sort_by(|a, b| {
            b.regions_available
                .total_cmp(&a.regions_available)
                .then(a.distance.total_cmp(&b.distance))
                .then_with(|| a.work_group.cmp(&b.work_group))
        });
        if use_cluster_rule {
            if let Some(note) = nearest_of_near_ties(&mut work_groups) {
                notes.push(note);
            }
        } else {
            // Source work group first, the others in the long-distance order behind it.
            if let Some(pos) = work_groups
                .iter()
                .position(|w| w.work_group == source_group)
            {
                let w = work_groups.remove(pos);
                work_groups.insert(0, w);
            }
        }
        if let Some(first) = work_groups.first_mut() {
            first.chosen = true;
        }
        let mut group_rank = vec![usize::MAX; self.groups.len()];
        for (r, w) in work_groups.iter().enumerate() {
            if let Ok(gi) = self.groups.binary_search(&w.work_group) {
                group_rank[gi] = r;
            }
        }

        // Memory in common, counted where the ranking uses it: in the work groups, in their
        // order, that hold the listed candidates (all of them in a small cluster). A node of a
        // later work group ranks behind every one of those whatever it holds, so its memory in
        // common is not counted (0) and load orders it; in a 5,000-node cluster this skips
        // most of the posting lists.
        let listed = opts.listed.unwrap_or(DEFAULT_LISTED);
        let counted_groups = (passing.len() > listed).then(|| {
            let mut marked = vec![false; self.groups.len()];
            let mut covered = 0;
            for w in &work_groups {
                if covered >= listed {
                    break;
                }
                if let Ok(gi) = self.groups.binary_search(&w.work_group) {
                    marked[gi] = true;
                }
                covered += w.candidates;
            }
            marked
        });
        let mut hits = Vec::new();
        let mut common: Vec<f64> = match summary {
            Some(s) => self.common_regions_in(s, &mut hits, counted_groups.as_deref()),
            None => vec![0.0; nodes.len()],
        };
        if let Some(key) = self.vm_key_id(req) {
            self.exclude_other_keys(key, &mut common, &mut notes);
        }

        // 3. Rank: work groups in their order, inside each by regions in common and load
        // (`rank_order`), the name breaking the last tie through its precomputed order.
        let mut keyed: Vec<RankKey> = passing
            .iter()
            .map(|&i| RankKey {
                group_rank: group_rank[self.group_of[i]],
                common: common[i],
                load: nodes[i].effective_load(),
                name_order: self.name_order[i],
                node: i,
                seconds: None,
            })
            .collect();
        keyed.sort_unstable_by(|a, b| {
            a.group_rank
                .cmp(&b.group_rank)
                .then(b.common.total_cmp(&a.common))
                .then(a.load.total_cmp(&b.load))
                .then(a.name_order.cmp(&b.name_order))
        });
        if let (Some(s), Some(links)) = (summary, opts.move_links.as_ref()) {
            if let Some(note) = self.prefer_shorter_move(s, links, &mut keyed) {
                notes.push(note);
            }
        }
        if let Some(s) = summary {
            if let Some(note) = self.prefer_ksm_among_similar(s, &mut keyed) {
                notes.push(note);
            }
        }
        let scores = extender_scores_of(keyed.iter().map(|k| (k.common, k.load)));
        let ranked = keyed
            .iter()
            .zip(scores)
            .map(|(k, score)| RankedNode {
                node: k.node,
                load: k.load,
                score,
                seconds: k.seconds,
            })
            .collect();
        Ok(Ranking {
            source,
            source_group,
            has_summary: summary.is_some(),
            ranked,
            filtered,
            common,
            counted_groups,
            work_groups,
            group_distance,
            notes,
        })
    }

    fn scored(&self, ranking: &Ranking, r: &RankedNode) -> Scored {
        Scored {
            node: self.snapshot.nodes[r.node].name.clone(),
            common_regions: ranking.common[r.node],
            load: r.load,
            has_digest: self.index.has_digest(r.node),
            ksm: ksm::ksm_runs(&self.snapshot.nodes[r.node]),
            seconds: r.seconds,
        }
    }

    /// One standard error of node `node`'s estimate `common` of the VM's regions (see
    /// [`sampling_error`]).
    fn common_error(&self, summary: &VmRegionSummary, node: usize, common: f64) -> f64 {
        let sampled = self.index.sampled_for(&summary.sketch, node);
        let nonzero = summary.nonzero_regions() as f64;
        if sampled == 0 || nonzero == 0.0 {
            return 0.0;
        }
        let threshold = self
            .index
            .node_threshold(node)
            .min(summary.sketch.threshold());
        sampling_error(common / nonzero, sampled, threshold, nonzero)
    }

    /// One ranked candidate as the similarity rules (time, KSM) see it.
    fn similar_candidate(&self, summary: &VmRegionSummary, k: &RankKey) -> ksm::KsmCandidate {
        ksm::KsmCandidate {
            common: k.common,
            error: self.common_error(summary, k.node, k.common),
            ksm: ksm::ksm_runs(&self.snapshot.nodes[k.node]),
            clearly_slower: false,
        }
    }

    /// [`move_time::promoted`] on the leader and the candidates right after it in the leading
    /// work group that hold similar memory in common (at most
    /// [`move_time::TIMED_CANDIDATES`]): each one's move is estimated over its link, and a
    /// clearly shorter one goes first. Returns the plan note when it did.
    fn prefer_shorter_move(
        &self,
        summary: &VmRegionSummary,
        links: &MoveLinks,
        keyed: &mut [RankKey],
    ) -> Option<String> {
        let leader_group = keyed.first()?.group_rank;
        let nonzero = summary.nonzero_regions() as f64;
        let region_bytes = self.snapshot.geometry.region_bytes() as f64;
        let nodes = &self.snapshot.nodes;
        let leader = self.similar_candidate(summary, &keyed[0]);
        let timed = 1 + keyed[1..]
            .iter()
            .take(move_time::TIMED_CANDIDATES)
            .take_while(|k| {
                k.group_rank == leader_group
                    && ksm::similar(&leader, &self.similar_candidate(summary, k), nonzero)
            })
            .count();
        for k in &mut keyed[..timed] {
            let link = (links.link_of)(&nodes[k.node].name);
            k.seconds = links.seconds(link, (k.common * region_bytes) as u64);
        }
        let seconds: Vec<Option<f64>> = keyed[..timed].iter().map(|k| k.seconds).collect();
        let pos = move_time::promoted(&seconds)?;
        let (leader, faster) = (&keyed[0], &keyed[pos]);
        let note = format!(
            "{} ({:.0} regions in common) and {} ({:.0}) hold similar memory in common; the move \
             to {} is estimated clearly shorter ({:.1} s against {:.1} s): it goes first",
            nodes[leader.node].name,
            leader.common,
            nodes[faster.node].name,
            faster.common,
            nodes[faster.node].name,
            faster.seconds.unwrap_or_default(),
            leader.seconds.unwrap_or_default(),
        );
        keyed[..=pos].rotate_right(1);
        Some(note)
    }

    /// [`ksm::promoted`] on the ranked candidates of the leading work group: a node where
    /// KSM runs, with memory in common similar to the leader's, moves to the front, unless
    /// its move is estimated clearly longer than the shortest one the time rule found.
    /// Returns the plan note when it did.
    fn prefer_ksm_among_similar(
        &self,
        summary: &VmRegionSummary,
        keyed: &mut [RankKey],
    ) -> Option<String> {
        let leader_group = keyed.first()?.group_rank;
        let nodes = &self.snapshot.nodes;
        let nonzero = summary.nonzero_regions() as f64;
        let shortest = keyed
            .iter()
            .filter_map(|k| k.seconds)
            .min_by(f64::total_cmp);
        let pos = ksm::promoted(
            keyed
                .iter()
                .take_while(|k| k.group_rank == leader_group)
                .map(|k| ksm::KsmCandidate {
                    clearly_slower: matches!(
                        (shortest, k.seconds),
                        (Some(best), Some(own)) if move_time::clearly_shorter(best, own)
                    ),
                    ..self.similar_candidate(summary, k)
                }),
            nonzero,
        )?;
        let (leader, promoted) = (&keyed[0], &keyed[pos]);
        let note = format!(
            "{} ({:.0} regions in common) and {} ({:.0}) hold similar memory in common; KSM runs \
             on {}, which can merge it after arrival: it goes first",
            nodes[leader.node].name,
            leader.common,
            nodes[promoted.node].name,
            promoted.common,
            nodes[promoted.node].name
        );
        keyed[..=pos].rotate_right(1);
        Some(note)
    }

    /// The cluster key the VM's regions were identified under: that of the digest its
    /// summary comes from, else the source node's.
    fn vm_key_id(&self, req: &VmRequest) -> Option<&str> {
        let digests = &self.snapshot.digests;
        self.vm_home
            .get(&req.vm)
            .map(|&(d, _)| digests[d].key_id.as_str())
            .or_else(|| {
                digests
                    .iter()
                    .find(|d| d.node == req.source_node)
                    .map(|d| d.key_id.as_str())
            })
            .filter(|k| !k.is_empty())
    }

    /// Identities made with different cluster keys never match, so a node whose agent runs
    /// with another key (a rotation half done, a wrong Secret) would only look as if it held
    /// nothing in common. Its memory in common is not counted, and a note names it and both
    /// key ids, so the cause is visible rather than silent.
    fn exclude_other_keys(&self, key: &str, common: &mut [f64], notes: &mut Vec<String>) {
        let mut other: Vec<(&str, &str)> = Vec::new();
        for d in &self.snapshot.digests {
            if d.key_id.is_empty() || d.key_id == key {
                continue;
            }
            if let Some(&i) = self.node_pos.get(&d.node) {
                common[i] = 0.0;
                other.push((d.node.as_str(), d.key_id.as_str()));
            }
        }
        if other.is_empty() {
            return;
        }
        const LISTED: usize = 5;
        let listed: Vec<String> = other
            .iter()
            .take(LISTED)
            .map(|(n, k)| format!("{n} (key id {k})"))
            .collect();
        let more = other.len().saturating_sub(LISTED);
        notes.push(format!(
            "digests made under another cluster key than the VM's (key id {key}) are not \
             compared, so their memory in common is not counted: {}{}",
            listed.join(", "),
            if more > 0 {
                format!(" and {more} more")
            } else {
                String::new()
            }
        ));
    }

    /// Plans `req`: [`Planner::rank_nodes`] with every decision written out.
    pub fn plan(&self, req: &VmRequest, opts: &PlanOptions) -> Result<Plan, PlanError> {
        let only: Option<Vec<usize>> = opts
            .only_nodes
            .as_ref()
            .map(|names| names.iter().filter_map(|n| self.node_position(n)).collect());
        let ranking = self.rank_nodes(req, opts, only.as_deref())?;
        let nodes = &self.snapshot.nodes;
        let region_bytes = self.snapshot.geometry.region_bytes();
        let summary = req.summary.as_ref().or_else(|| self.vm_summary(&req.vm));
        let winner = ranking.ranked.first().map(|r| self.scored(&ranking, r));
        let chosen_group = ranking.work_groups.first().map(|w| w.work_group.as_str());
        let explain = opts.explain_top.unwrap_or(DEFAULT_EXPLAINED);
        let listed = opts.listed.unwrap_or(DEFAULT_LISTED);
        // Filtered nodes are listed from the work groups where memory in common was counted,
        // so each listed one shows what it holds.
        let counted = |i: usize| {
            ranking
                .counted_groups
                .as_ref()
                .is_none_or(|marked| marked[self.group_of[i]])
        };
        let mut candidates = Vec::with_capacity(2 * listed);
        for (pos, r) in ranking.ranked.iter().take(listed).enumerate() {
            let node = &nodes[r.node];
            let verdict = if pos == 0 {
                Verdict::Chosen
            } else if pos > explain {
                Verdict::Lost(String::from("ranked lower"))
            } else if Some(node.work_group.as_str()) != chosen_group {
                Verdict::Lost(format!(
                    "in work group {}, work group {} was chosen",
                    node.work_group,
                    chosen_group.unwrap_or("")
                ))
            } else {
                let winner = winner.as_ref().expect("ranked is not empty");
                Verdict::Lost(why_lost(&self.scored(&ranking, r), winner))
            };
            let common = ranking.common[r.node];
            let common_bytes = (common * region_bytes as f64) as u64;
            let ksm = ksm::ksm_runs(node);
            candidates.push(Candidate {
                node: node.name.clone(),
                work_group: node.work_group.clone(),
                common_regions: common,
                common_bytes,
                distance: ranking.group_distance[self.group_of[r.node]],
                load: r.load,
                has_digest: self.index.has_digest(r.node),
                ksm,
                ksm_mergeable_bytes: ksm::mergeable_bytes(common_bytes, ksm),
                score: r.score,
                verdict,
            });
        }
        for (i, reason) in ranking
            .filtered
            .iter()
            .filter(|(i, _)| counted(*i))
            .take(listed)
        {
            let node = &nodes[*i];
            let common = ranking.common[*i];
            let common_bytes = (common * region_bytes as f64) as u64;
            let ksm = ksm::ksm_runs(node);
            candidates.push(Candidate {
                node: node.name.clone(),
                work_group: node.work_group.clone(),
                common_regions: common,
                common_bytes,
                distance: ranking.group_distance[self.group_of[*i]],
                load: node.effective_load(),
                has_digest: self.index.has_digest(*i),
                ksm,
                ksm_mergeable_bytes: ksm::mergeable_bytes(common_bytes, ksm),
                score: 0,
                verdict: Verdict::Filtered(reason.to_string()),
            });
        }
        let (passing, filtered) = (ranking.ranked.len(), ranking.filtered.len());
        let Ranking {
            source_group,
            work_groups,
            mut notes,
            ..
        } = ranking;

        // 4. Bytes.
        let total = summary.map_or(req.memory_bytes, |s| s.memory_bytes);
        let zero = summary.map_or(0, |s| (s.zero_regions * region_bytes).min(total));
        let bytes = match candidates.first().filter(|c| c.verdict == Verdict::Chosen) {
            Some(c) => {
                let common = c.common_bytes.min(total - zero);
                ByteEstimate {
                    total,
                    zero,
                    common,
                    to_move: total - zero - common,
                    ksm_mergeable: ksm::mergeable_bytes(common, c.ksm),
                }
            }
            None => ByteEstimate {
                total,
                zero,
                common: 0,
                to_move: total - zero,
                ksm_mergeable: 0,
            },
        };
        let target = candidates
            .first()
            .filter(|c| c.verdict == Verdict::Chosen)
            .cloned();
        if target.is_none() {
            notes.push("no node passes the minimum hardware configuration".into());
        }
        Ok(Plan {
            vm: req.vm.clone(),
            source_node: req.source_node.clone(),
            source_work_group: source_group,
            target_node: target.as_ref().map(|c| c.node.clone()),
            target_work_group: target.map(|c| c.work_group),
            candidates,
            passing,
            filtered,
            work_groups,
            bytes,
            notes,
        })
    }
}

/// The VM's sampled regions the ranking looks at, at most: the cost of a decision is the
/// posting lists of these keys, about a microsecond each. At the usual 1 in 16 a 4 GiB VM's
/// summary holds about 4,096 samples and a 64 GiB VM's about 65,000; a larger VM is ranked
/// from its first 4,096, so its memory in common carries a 4 GiB VM's sampling error (within
/// about 1.5 percentage points, 19 times in 20). The near-tie rules read the error from the
/// cut summary, so they widen to match.
pub const RANKING_SAMPLES: usize = 4_096;

/// The VM's summary with its sketch cut to [`RANKING_SAMPLES`] keys (lowering its threshold
/// to the first key left out, so it stays an exact consistent sample), or the summary itself
/// when it holds fewer.
fn ranking_sample(summary: &VmRegionSummary) -> std::borrow::Cow<'_, VmRegionSummary> {
    use std::borrow::Cow;
    if summary.sketch.len() <= RANKING_SAMPLES {
        return Cow::Borrowed(summary);
    }
    let keys = summary.sketch.keys();
    Cow::Owned(VmRegionSummary {
        vm: summary.vm.clone(),
        sketch: RegionSketch::from_keys(
            keys[RANKING_SAMPLES],
            keys[..RANKING_SAMPLES].iter().copied(),
        ),
        ..*summary
    })
}

/// One standard error, in regions, of an estimate `f * nonzero` made from a fraction `f` of
/// `sampled` regions found, the sample taken below `threshold` of the key space: the binomial
/// error `sqrt(f(1-f)/m)`, shrunk by `sqrt(1-p)` at sampling rate `p` because the sample is
/// drawn from a finite set (at `p = 1` every region is looked at and nothing is left to chance).
fn sampling_error(f: f64, sampled: u32, threshold: u64, nonzero: f64) -> f64 {
    let m = sampled as f64;
    let rate = threshold as f64 / KEY_SPACE as f64;
    (f * (1.0 - f) / m * (1.0 - rate).max(0.0)).sqrt() * nonzero
}

/// How many standard errors apart two work groups' estimates may be and still count as a
/// tie (about 95% of sampling noise).
pub const TIE_STANDARD_ERRORS: f64 = 2.0;

/// The long-distance rule's tie: `groups` is sorted by estimated regions available, highest
/// first. Every group whose estimate is within the sampling error of the leader's (the
/// difference below [`TIE_STANDARD_ERRORS`] standard errors of the difference) is as good as
/// the leader, and the nearest of them to the source wins: it moves to the front. Exact
/// equality is the case of no sampling (error 0). Returns a note when the near-tie changed
/// the winner.
fn nearest_of_near_ties(groups: &mut [WorkGroupScore]) -> Option<String> {
    let leader = groups.first()?;
    let tied = |w: &WorkGroupScore| {
        let margin = TIE_STANDARD_ERRORS * leader.regions_error.hypot(w.regions_error);
        leader.regions_available - w.regions_available <= margin
    };
    // The sort already put exact ties in distance order; only a nearer near-tie moves.
    let (pos, nearest) = groups
        .iter()
        .enumerate()
        .filter(|(_, w)| tied(w))
        .min_by(|(_, a), (_, b)| a.distance.total_cmp(&b.distance))?;
    if pos == 0 || nearest.distance >= leader.distance {
        return None;
    }
    let note = format!(
        "work groups {} ({:.0} regions) and {} ({:.0}) are within the sampling error of each \
         other: the nearer, {}, wins",
        leader.work_group,
        leader.regions_available,
        nearest.work_group,
        nearest.regions_available,
        nearest.work_group
    );
    groups[..=pos].rotate_right(1);
    Some(note)
}

#[cfg(test)]
#[path = "planner_tests.rs"]
mod tests;
