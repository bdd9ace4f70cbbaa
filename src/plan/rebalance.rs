//! Load balancing by live migration (seed 003).
//!
//! A VM's load is a weighted sum of its CPU time, I/O activity and memory; a node's load is the
//! sum over its VMs. Weights may differ per node (an expensive node can be made to look more
//! loaded), so a VM's load is computed on both sides of a move. Nodes pair up by one of four
//! schemes; a load "exceeds" another only by the threshold factor (no churn between near-equal
//! nodes); the VM moved is the one whose move comes closest to evening the pair, which with
//! equal weights is the VM whose load is nearest half the difference (fig. 6), or the one
//! whose target load is nearest it (fig. 7). When several receivers qualify, the caller's
//! ranking (common memory) picks among them.

use std::collections::HashMap;

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use serde::{Deserialize, Serialize};

use super::cluster::{VmKey, VmRequest};
use super::hardware::check_node;
use super::Planner;

/// Units of the load sum: CPU in cores, I/O in 100 MiB/s, memory in 4 GiB, so that a
/// moderately busy VM scores around 1 on each factor.
pub const IO_UNIT: f64 = 100.0 * 1048576.0;
pub const MEMORY_UNIT: f64 = 4.0 * 1073741824.0;

#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct LoadFactors {
    pub cpu_cores: f64,
    pub io_bytes_per_second: f64,
    pub memory_bytes: f64,
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct Weights {
    pub cpu: f64,
    pub io: f64,
    pub memory: f64,
}

impl Default for Weights {
    fn default() -> Self {
        Self {
            cpu: 1.0,
            io: 0.2,
            memory: 0.5,
        }
    }
}

impl Weights {
    /// Seed 003, fig. 4.
    pub fn load(&self, f: &LoadFactors) -> f64 {
        self.cpu * f.cpu_cores
            + self.io * f.io_bytes_per_second / IO_UNIT
            + self.memory * f.memory_bytes / MEMORY_UNIT
    }

    /// Parses `cpu=1,io=0.5,memory=0.2` (missing keys keep `defaults`).
    pub fn parse(text: &str, defaults: Weights) -> Result<Weights, String> {
        let mut w = defaults;
        for part in text.split(',').map(str::trim).filter(|p| !p.is_empty()) {
            let (k, v) = part
                .split_once('=')
                .ok_or_else(|| format!("weight {part:?} is not key=value"))?;
            let v: f64 = v
                .trim()
                .parse()
                .ok()
                .filter(|v: &f64| v.is_finite() && *v >= 0.0)
                .ok_or_else(|| format!("weight {part:?} is not a number >= 0"))?;
            match k.trim() {
                "cpu" => w.cpu = v,
                "io" => w.io = v,
                "memory" => w.memory = v,
                other => return Err(format!("unknown weight {other:?}")),
            }
        }
        Ok(w)
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum Mode {
    Random,
    SenderInitiated,
    ReceiverInitiated,
    #[default]
    Symmetric,
}

impl Mode {
    pub const ALL: [Mode; 4] = [
        Mode::Random,
        Mode::SenderInitiated,
        Mode::ReceiverInitiated,
        Mode::Symmetric,
    ];

    pub fn name(self) -> &'static str {
        match self {
            Mode::Random => "Random",
            Mode::SenderInitiated => "SenderInitiated",
            Mode::ReceiverInitiated => "ReceiverInitiated",
            Mode::Symmetric => "Symmetric",
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalancingVm {
    pub vm: VmKey,
    pub factors: LoadFactors,
    /// Fig. 7: an administrator-set target load.
    pub target_load: Option<f64>,
    /// False when annotated not-to-move, cooling down, already migrating, or outside the
    /// policy's VM selector.
    pub movable: bool,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct BalancingNode {
    pub name: String,
    pub weights: Weights,
    pub vms: Vec<BalancingVm>,
    /// Rebalancing migrations already touching this node.
    pub in_flight: u32,
    /// Load on the node that is not its VMs' (other pods, the host's own work, an
    /// administrator's addition): it stays when VMs move.
    #[serde(default)]
    pub base_load: f64,
}

impl BalancingNode {
    pub fn load(&self) -> f64 {
        self.base_load
            + self
                .vms
                .iter()
                .map(|v| self.weights.load(&v.factors))
                .sum::<f64>()
    }

    /// The load of the VMs alone.
    pub fn vm_load(&self) -> f64 {
        self.load() - self.base_load
    }

    /// Adds what is not the VMs' load: the host's share of the node's measured load
    /// (`node_measured`, when the policy counts it) and then an administrator's override
    /// annotation value (ignored when it is not a number).
    pub fn with_base_load(
        mut self,
        node_measured: Option<&LoadFactors>,
        over: Option<&str>,
    ) -> Self {
        if let Some(m) = node_measured {
            let vms: Vec<LoadFactors> = self.vms.iter().map(|v| v.factors).collect();
            self.base_load += self.weights.load(&host_factors(m, &vms));
        }
        if let Some(o) = over.and_then(LoadOverride::parse) {
            self.apply_override(o);
        }
        self
    }

    /// Applies an administrator's override: `Set` makes the node's load that value now (the
    /// non-VM part absorbs the difference, so moving a VM off still lowers it), `Add` adds to it.
    pub fn apply_override(&mut self, o: LoadOverride) {
        match o {
            LoadOverride::Set(x) => self.base_load = x - self.vm_load(),
            LoadOverride::Add(x) => self.base_load += x,
        }
    }
}

/// Node annotation with which an administrator sets (`"40"`) or adds to (`"+15"`, `"-5"`) a
/// node's load, in the policy's load units, for example to push VMs off a node.
pub const LOAD_OVERRIDE_ANNOTATION: &str = "commonground.dev/load-override";

#[derive(Clone, Copy, Debug, PartialEq)]
pub enum LoadOverride {
    Set(f64),
    Add(f64),
}

impl LoadOverride {
    /// Parses an annotation value; `None` for anything that is not a finite number.
    pub fn parse(text: &str) -> Option<LoadOverride> {
        let t = text.trim();
        let number = |s: &str| s.trim().parse::<f64>().ok().filter(|x| x.is_finite());
        if let Some(rest) = t.strip_prefix('+') {
            number(rest).map(LoadOverride::Add)
        } else if t.starts_with('-') {
            number(t).map(LoadOverride::Add)
        } else {
            number(t).map(LoadOverride::Set)
        }
    }
}

/// What a node's whole measured load holds beyond its VMs (other pods, the host's own work):
/// the node's measured factors minus the sum of its VMs', never below zero.
pub fn host_factors(node: &LoadFactors, vms: &[LoadFactors]) -> LoadFactors {
    let sum = |f: fn(&LoadFactors) -> f64| vms.iter().map(f).sum::<f64>();
    LoadFactors {
        cpu_cores: (node.cpu_cores - sum(|v| v.cpu_cores)).max(0.0),
        io_bytes_per_second: (node.io_bytes_per_second - sum(|v| v.io_bytes_per_second)).max(0.0),
        memory_bytes: (node.memory_bytes - sum(|v| v.memory_bytes)).max(0.0),
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
pub struct RoundConfig {
    pub mode: Mode,
    /// One load exceeds another only when `a > factor * b`.
    pub threshold_factor: f64,
    /// Sender-initiated trigger; `None`: 1.2 x the mean load.
    pub high_threshold: Option<f64>,
    /// Receiver-initiated trigger; `None`: 0.8 x the mean load.
    pub low_threshold: Option<f64>,
    pub max_concurrent: u32,
    pub max_concurrent_per_node: u32,
    /// Migrations already running cluster-wide.
    pub in_flight: u32,
    pub seed: u64,
}

impl Default for RoundConfig {
    fn default() -> Self {
        Self {
            mode: Mode::Symmetric,
            threshold_factor: 1.25,
            high_threshold: None,
            low_threshold: None,
            max_concurrent: 2,
            max_concurrent_per_node: 1,
            in_flight: 0,
            seed: 0,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct Move {
    pub vm: VmKey,
    pub from: String,
    pub to: String,
    pub reason: String,
    pub from_load_before: f64,
    pub to_load_before: f64,
    pub from_load_after: f64,
    pub to_load_after: f64,
}

/// Does load `a` exceed load `b` by the threshold factor?
pub fn exceeds(a: f64, b: f64, factor: f64) -> bool {
    a > b * factor.max(1.0) && a > b
}

/// The VM to move from `src` to `dst` (index in `src.vms`) and the loads afterwards, or `None`
/// when no move narrows the gap (the net-gain rule).
pub fn choose_vm(src: &BalancingNode, dst: &BalancingNode) -> Option<(usize, f64, f64)> {
    let (ls, ld) = (src.load(), dst.load());
    let gap = (ls - ld).abs();
    let search = (ls - ld) / 2.0;
    let uses_targets = src.vms.iter().any(|v| v.movable && v.target_load.is_some());
    src.vms
        .iter()
        .enumerate()
        .filter(|(_, v)| v.movable)
        .filter_map(|(i, v)| {
            let on_src = src.weights.load(&v.factors);
            let on_dst = dst.weights.load(&v.factors);
            let (after_s, after_d) = (ls - on_src, ld + on_dst);
            let new_gap = (after_s - after_d).abs();
            // Net gain: the pair must end more even than it started.
            if new_gap >= gap {
                return None;
            }
            let key = match (uses_targets, v.target_load) {
                (true, Some(t)) => (t - search).abs(),
                (true, None) => return None,
                // With different weights "nearest half the difference" generalises to the
                // move that leaves the pair most even.
                (false, _) => new_gap,
            };
            Some((i, key, after_s, after_d))
        })
        .min_by(|a, b| {
            a.1.total_cmp(&b.1)
                .then_with(|| src.vms[a.0].vm.cmp(&src.vms[b.0].vm))
        })
        .map(|(i, _, s, d)| (i, s, d))
}

/// One rebalancing round. `admits` says whether a node can take a VM at all (capacity,
/// selectors, taints: the planner's minimum-hardware filter); a VM no receiver admits is
/// passed over for the next best. `prefer` orders several qualifying receivers for a VM (best
/// first), e.g. by the VM's memory in common with each; it gets the VM and candidate names.
pub fn round(
    nodes: &[BalancingNode],
    config: &RoundConfig,
    admits: &mut dyn FnMut(&VmKey, &str) -> bool,
    prefer: &mut dyn FnMut(&VmKey, &[&str]) -> Vec<String>,
) -> Vec<Move> {
    let mut nodes: Vec<BalancingNode> = nodes.to_vec();
    let mut rng = rand::rngs::StdRng::seed_from_u64(config.seed);
    let mut moves = Vec::new();
    if nodes.len() < 2 {
        return moves;
    }
    let mean = nodes.iter().map(|n| n.load()).sum::<f64>() / nodes.len() as f64;
    let high = config.high_threshold.unwrap_or(mean * 1.2);
    let low = config.low_threshold.unwrap_or(mean * 0.8);
    let factor = config.threshold_factor;
    let mut budget = config.max_concurrent.saturating_sub(config.in_flight);
    let busy: HashMap<String, u32> = nodes
        .iter()
        .map(|n| (n.name.clone(), n.in_flight))
        .collect();
    let mut busy = busy;
    let per_node = config.max_concurrent_per_node;

    let mut order: Vec<usize> = (0..nodes.len()).collect();
    order.shuffle(&mut rng);

    // Each step pairs a sender with a receiver; `initiator` is who started it.
    let mut try_move = |nodes: &mut Vec<BalancingNode>,
                        src: usize,
                        receivers: Vec<usize>,
                        why: &str,
                        moves: &mut Vec<Move>,
                        busy: &mut HashMap<String, u32>,
                        budget: &mut u32| {
        if *budget == 0 || busy[&nodes[src].name] >= per_node {
            return;
        }
        let receivers: Vec<usize> = receivers
            .into_iter()
            .filter(|&d| d != src && busy[&nodes[d].name] < per_node)
            .filter(|&d| exceeds(nodes[src].load(), nodes[d].load(), factor))
            .collect();
        if receivers.is_empty() {
            return;
        }
        // The VM first (against the least loaded receiver), then where it goes. A VM that no
        // receiver admits is set aside (for this pair only) and the next best one is tried.
        let least = *receivers
            .iter()
            .min_by(|a, b| nodes[**a].load().total_cmp(&nodes[**b].load()))
            .expect("not empty");
        let mut set_aside: Vec<VmKey> = Vec::new();
        let chosen = loop {
            let Some((vm_idx, _, _)) = choose_vm(&nodes[src], &nodes[least]) else {
                break None;
            };
            let vm = nodes[src].vms[vm_idx].clone();
            // Every admitting receiver for which this VM still narrows the gap qualifies.
            let qualifying: Vec<usize> = receivers
                .iter()
                .copied()
                .filter(|&d| {
                    let (ls, ld) = (nodes[src].load(), nodes[d].load());
                    let after = (ls - nodes[src].weights.load(&vm.factors))
                        - (ld + nodes[d].weights.load(&vm.factors));
                    after.abs() < (ls - ld).abs()
                })
                .filter(|&d| admits(&vm.vm, &nodes[d].name))
                .collect();
            if qualifying.is_empty() {
                nodes[src].vms[vm_idx].movable = false;
                set_aside.push(vm.vm);
                continue;
            }
            break Some((vm_idx, vm, qualifying));
        };
        for v in nodes[src].vms.iter_mut() {
            if set_aside.contains(&v.vm) {
                v.movable = true;
            }
        }
        let Some((vm_idx, vm, qualifying)) = chosen else {
            return;
        };
        let dst = if qualifying.len() > 1 {
            let names: Vec<&str> = qualifying.iter().map(|&d| nodes[d].name.as_str()).collect();
            let ranked = prefer(&vm.vm, &names);
            ranked
                .iter()
                .find_map(|n| qualifying.iter().copied().find(|&d| &nodes[d].name == n))
                .unwrap_or(qualifying[0])
        } else {
            qualifying[0]
        };
        let (before_s, before_d) = (nodes[src].load(), nodes[dst].load());
        let moved = nodes[src].vms.remove(vm_idx);
        let mut placed = moved.clone();
        placed.movable = false; // one move per VM per round
        nodes[dst].vms.push(placed);
        *busy.get_mut(&nodes[src].name).expect("known") += 1;
        *busy.get_mut(&nodes[dst].name).expect("known") += 1;
        *budget -= 1;
        moves.push(Move {
            vm: moved.vm,
            from: nodes[src].name.clone(),
            to: nodes[dst].name.clone(),
            reason: format!(
                "{why}: load {before_s:.2} exceeds {before_d:.2} by more than x{factor}; moving load {:.2} (half the difference is {:.2})",
                nodes[src].weights.load(&moved.factors),
                (before_s - before_d) / 2.0
            ),
            from_load_before: before_s,
            to_load_before: before_d,
            from_load_after: nodes[src].load(),
            to_load_after: nodes[dst].load(),
        });
    };

    for &i in &order {
        let load = nodes[i].load();
        let all: Vec<usize> = (0..nodes.len()).filter(|&j| j != i).collect();
        match config.mode {
            Mode::Random => {
                let peer = all[rng.random_range(0..all.len())];
                if exceeds(load, nodes[peer].load(), factor) {
                    try_move(
                        &mut nodes,
                        i,
                        vec![peer],
                        "random pairing",
                        &mut moves,
                        &mut busy,
                        &mut budget,
                    );
                } else if exceeds(nodes[peer].load(), load, factor) {
                    try_move(
                        &mut nodes,
                        peer,
                        vec![i],
                        "random pairing",
                        &mut moves,
                        &mut busy,
                        &mut budget,
                    );
                }
            }
            Mode::SenderInitiated | Mode::Symmetric if load > high => {
                try_move(
                    &mut nodes,
                    i,
                    all,
                    "sender-initiated (above the high threshold)",
                    &mut moves,
                    &mut busy,
                    &mut budget,
                );
            }
            Mode::ReceiverInitiated | Mode::Symmetric if load < low => {
                // Pull from the most loaded peer.
                if let Some(&peer) = all
                    .iter()
                    .max_by(|a, b| nodes[**a].load().total_cmp(&nodes[**b].load()))
                {
                    try_move(
                        &mut nodes,
                        peer,
                        vec![i],
                        "receiver-initiated (below the low threshold)",
                        &mut moves,
                        &mut busy,
                        &mut budget,
                    );
                }
            }
            _ => {}
        }
    }
    moves
}

/// Several receivers qualify for a VM: the one already holding most of its memory first (ties
/// by name), as the planner estimates it from the digests. A VM the planner has no summary for
/// keeps the names in alphabetical order. Shared by the controller and `simulate --rebalance`.
pub fn rank_by_common_memory(planner: &Planner, vm: &VmKey, names: &[&str]) -> Vec<String> {
    let mut ranked: Vec<(f64, String)> = names.iter().map(|n| (0.0, n.to_string())).collect();
    if let Some(summary) = planner.vm_summary(vm) {
        let mut hits = Vec::new();
        let common = planner.common_regions(summary, &mut hits);
        for (c, name) in &mut ranked {
            if let Some(i) = planner.node_position(name) {
                *c = common[i];
            }
        }
    }
    ranked.sort_by(|a, b| b.0.total_cmp(&a.0).then_with(|| a.1.cmp(&b.1)));
    ranked.into_iter().map(|(_, n)| n).collect()
}

/// Could `node` take the VM now, by the planner's minimum-hardware filter (readiness,
/// capacity, selectors, affinity, taints) over the snapshot? A node the planner does not know
/// is not admitted; shared by the controller and `simulate --rebalance`.
pub fn admits(planner: &Planner, vm: &VmRequest, node: &str) -> bool {
    planner
        .node_position(node)
        .is_some_and(|i| check_node(vm, &planner.snapshot().nodes[i]).is_none())
}

/// Coefficient of variation of node loads (0 = perfectly even).
pub fn coefficient_of_variation(loads: &[f64]) -> f64 {
    if loads.is_empty() {
        return 0.0;
    }
    let n = loads.len() as f64;
    let mean = loads.iter().sum::<f64>() / n;
    if mean <= 0.0 {
        return 0.0;
    }
    let var = loads.iter().map(|l| (l - mean).powi(2)).sum::<f64>() / n;
    var.sqrt() / mean
}

/// Cooldown before a VM may move again: `base * 2^(moves - 1)`, capped at a day, so a VM that
/// keeps being picked backs off instead of flapping.
pub fn cooldown_seconds(base_seconds: f64, previous_moves: u32) -> f64 {
    if previous_moves == 0 {
        return 0.0;
    }
    (base_seconds * 2f64.powi(previous_moves.min(20) as i32 - 1)).min(86_400.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vm(name: &str, cpu: f64) -> BalancingVm {
        BalancingVm {
            vm: VmKey::new("ns", name),
            factors: LoadFactors {
                cpu_cores: cpu,
                ..Default::default()
            },
            target_load: None,
            movable: true,
        }
    }

    fn cpu_only() -> Weights {
        Weights {
            cpu: 1.0,
            io: 0.0,
            memory: 0.0,
        }
    }

    fn node(name: &str, vms: Vec<BalancingVm>) -> BalancingNode {
        BalancingNode {
            name: name.into(),
            weights: cpu_only(),
            vms,
            in_flight: 0,
            base_load: 0.0,
        }
    }

    fn admit_all() -> impl FnMut(&VmKey, &str) -> bool {
        |_, _| true
    }

    fn no_preference() -> impl FnMut(&VmKey, &[&str]) -> Vec<String> {
        |_, names| names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn seed_example_moves_the_vm_nearest_half_the_difference() {
        // Loads 120 and 80: the VM with load nearest 20 moves, leaving 100 and 100.
        let a = node(
            "a",
            vec![
                vm("v50", 50.0),
                vm("v22", 22.0),
                vm("v31", 31.0),
                vm("v17", 17.0),
            ],
        );
        let b = node("b", vec![vm("w80", 80.0)]);
        let (i, after_a, after_b) = choose_vm(&a, &b).unwrap();
        assert_eq!(a.vms[i].vm.name, "v22");
        assert!((after_a - 98.0).abs() < 1e-9 && (after_b - 102.0).abs() < 1e-9);
        let exact = node("a", vec![vm("v20", 20.0), vm("v100", 100.0)]);
        let (i, after_a, after_b) = choose_vm(&exact, &b).unwrap();
        assert_eq!(exact.vms[i].vm.name, "v20");
        assert_eq!((after_a, after_b), (100.0, 100.0));
    }

    #[test]
    fn target_loads_pick_the_nearest_target() {
        let mut a = node("a", vec![vm("x", 20.0), vm("y", 5.0)]);
        a.vms[0].target_load = Some(40.0);
        a.vms[1].target_load = Some(21.0);
        a.vms.push(vm("z", 95.0));
        let b = node("b", vec![vm("w", 80.0)]);
        // loads 120 vs 80: search 20, "y" has target 21.
        let (i, _, _) = choose_vm(&a, &b).unwrap();
        assert_eq!(a.vms[i].vm.name, "y");
    }

    #[test]
    fn threshold_factor_prevents_churn_between_near_equal_nodes() {
        assert!(!exceeds(105.0, 100.0, 1.1));
        assert!(exceeds(115.0, 100.0, 1.1));
        let nodes = vec![
            node("a", vec![vm("x", 55.0), vm("y", 50.0)]),
            node("b", vec![vm("z", 100.0)]),
        ];
        let cfg = RoundConfig {
            mode: Mode::Random,
            threshold_factor: 1.1,
            ..Default::default()
        };
        assert!(round(&nodes, &cfg, &mut admit_all(), &mut no_preference()).is_empty());
    }

    #[test]
    fn net_gain_rule_with_different_weights() {
        // The VM costs 30 on a (cheap CPU) but 90 on b (b's CPU weight is 3): moving it
        // would make the pair less even, so nothing moves.
        let a = node("a", vec![vm("x", 30.0), vm("y", 70.0)]);
        let mut b = node("b", vec![vm("z", 20.0)]);
        b.weights.cpu = 3.0; // b's load 60
        let pick = choose_vm(&a, &b);
        // gap 40; x: 70 vs 150 -> gap 80 (worse); y: 30 vs 270 (worse)
        assert_eq!(pick, None);
        b.weights.cpu = 1.0;
        let (i, _, _) = choose_vm(&a, &b).unwrap();
        assert_eq!(a.vms[i].vm.name, "x");
    }

    #[test]
    fn each_mode_triggers_only_on_its_condition() {
        let nodes = || {
            vec![
                node("hot", vec![vm("a", 40.0), vm("b", 30.0), vm("c", 20.0)]),
                node("mid1", vec![vm("d", 45.0)]),
                node("mid2", vec![vm("e", 45.0)]),
                node("cold", vec![vm("f", 10.0)]),
            ]
        };
        for mode in Mode::ALL {
            let cfg = RoundConfig {
                mode,
                max_concurrent: 1,
                ..Default::default()
            };
            let moves = round(&nodes(), &cfg, &mut admit_all(), &mut no_preference());
            assert_eq!(moves.len(), 1, "{mode:?}: {moves:?}");
            let m = &moves[0];
            assert!(m.from_load_after < m.from_load_before);
            match mode {
                Mode::SenderInitiated => assert!(m.reason.contains("sender")),
                Mode::ReceiverInitiated => assert!(m.reason.contains("receiver") && m.to == "cold"),
                _ => {}
            }
        }
        // With an explicit high threshold nobody reaches, sender-initiated does nothing.
        let cfg = RoundConfig {
            mode: Mode::SenderInitiated,
            high_threshold: Some(1000.0),
            ..Default::default()
        };
        assert!(round(&nodes(), &cfg, &mut admit_all(), &mut no_preference()).is_empty());
    }

    #[test]
    fn concurrency_limits_and_immovable_vms_are_respected() {
        let mut hot = node("hot", vec![vm("a", 40.0), vm("b", 30.0), vm("c", 30.0)]);
        let nodes = vec![hot.clone(), node("c1", vec![]), node("c2", vec![])];
        let cfg = RoundConfig {
            mode: Mode::SenderInitiated,
            max_concurrent: 5,
            max_concurrent_per_node: 1,
            ..Default::default()
        };
        assert_eq!(
            round(&nodes, &cfg, &mut admit_all(), &mut no_preference()).len(),
            1,
            "one per node"
        );
        let cfg = RoundConfig {
            in_flight: 2,
            ..cfg
        };
        let cfg2 = RoundConfig {
            max_concurrent: 2,
            ..cfg
        };
        assert!(
            round(&nodes, &cfg2, &mut admit_all(), &mut no_preference()).is_empty(),
            "cluster limit reached"
        );
        for v in &mut hot.vms {
            v.movable = false;
        }
        let nodes = vec![hot, node("c1", vec![])];
        let cfg = RoundConfig {
            mode: Mode::SenderInitiated,
            ..Default::default()
        };
        assert!(round(&nodes, &cfg, &mut admit_all(), &mut no_preference()).is_empty());
    }

    #[test]
    fn several_receivers_are_ranked_by_the_preference() {
        let nodes = vec![
            node("hot", vec![vm("a", 30.0), vm("b", 30.0), vm("c", 30.0)]),
            node("c1", vec![vm("x", 10.0)]),
            node("c2", vec![vm("y", 10.0)]),
        ];
        let cfg = RoundConfig {
            mode: Mode::SenderInitiated,
            ..Default::default()
        };
        let mut prefer_c2 = |_: &VmKey, names: &[&str]| {
            let mut v: Vec<String> = names.iter().map(|s| s.to_string()).collect();
            v.sort_by_key(|n| n != "c2");
            v
        };
        let moves = round(&nodes, &cfg, &mut admit_all(), &mut prefer_c2);
        assert_eq!(moves[0].to, "c2");
    }

    #[test]
    fn a_receiver_without_room_is_passed_over_and_then_the_vm() {
        // Loads 120 and 80 (+ a third node at 80): the VM of load 20 is the best move.
        let nodes = vec![
            node(
                "hot",
                vec![vm("v20", 20.0), vm("v15", 15.0), vm("v85", 85.0)],
            ),
            node("c1", vec![vm("x", 80.0)]),
            node("c2", vec![vm("y", 80.0)]),
        ];
        let cfg = RoundConfig {
            mode: Mode::SenderInitiated,
            high_threshold: Some(100.0),
            max_concurrent: 1,
            ..RoundConfig::default()
        };
        // c1 has no room for v20: it goes to c2.
        let mut not_c1 = |_: &VmKey, n: &str| n != "c1";
        let moves = round(&nodes, &cfg, &mut not_c1, &mut no_preference());
        assert_eq!(moves.len(), 1);
        assert_eq!(
            (moves[0].vm.name.as_str(), moves[0].to.as_str()),
            ("v20", "c2")
        );
        // Nobody has room for v20: the next best VM (v15) moves instead.
        let mut not_v20 = |v: &VmKey, _: &str| v.name != "v20";
        let moves = round(&nodes, &cfg, &mut not_v20, &mut no_preference());
        assert_eq!(moves.len(), 1);
        assert_eq!(moves[0].vm.name, "v15");
        // Nobody has room for anything: no move.
        let mut none = |_: &VmKey, _: &str| false;
        assert!(round(&nodes, &cfg, &mut none, &mut no_preference()).is_empty());
    }

    #[test]
    fn cooldown_backs_off_exponentially() {
        assert_eq!(cooldown_seconds(600.0, 0), 0.0);
        assert_eq!(cooldown_seconds(600.0, 1), 600.0);
        assert_eq!(cooldown_seconds(600.0, 3), 2400.0);
        assert_eq!(cooldown_seconds(600.0, 40), 86_400.0);
    }

    #[test]
    fn weights_parse_from_an_annotation() {
        let w = Weights::parse("cpu=2, io=0", Weights::default()).unwrap();
        assert_eq!((w.cpu, w.io, w.memory), (2.0, 0.0, 0.5));
        assert!(Weights::parse("gpu=1", Weights::default()).is_err());
        assert!(Weights::parse("cpu=-1", Weights::default()).is_err());
    }

    #[test]
    fn cv_is_zero_when_even() {
        assert_eq!(coefficient_of_variation(&[5.0, 5.0]), 0.0);
        assert!(coefficient_of_variation(&[10.0, 0.0]) > 0.9);
    }

    /// A movable VM whose load is CPU only.
    fn cpu_vm(name: &str, cpu: f64) -> BalancingVm {
        BalancingVm {
            vm: VmKey::new("ns", name),
            factors: LoadFactors {
                cpu_cores: cpu,
                io_bytes_per_second: 0.0,
                memory_bytes: 0.0,
            },
            target_load: None,
            movable: true,
        }
    }

    #[test]
    fn load_override_sets_or_adds_and_moving_a_vm_still_lowers_the_load() {
        let vm = cpu_vm;
        assert_eq!(LoadOverride::parse("40"), Some(LoadOverride::Set(40.0)));
        assert_eq!(LoadOverride::parse(" +15 "), Some(LoadOverride::Add(15.0)));
        assert_eq!(LoadOverride::parse("-5"), Some(LoadOverride::Add(-5.0)));
        assert_eq!(LoadOverride::parse("lots"), None);
        assert_eq!(LoadOverride::parse("inf"), None);
        let mut n = node("a", vec![vm("x", 10.0), vm("y", 5.0)]);
        n.apply_override(LoadOverride::Set(40.0));
        assert_eq!(n.load(), 40.0);
        n.vms.pop();
        assert_eq!(n.load(), 35.0, "the VM's share leaves with it");
        n.apply_override(LoadOverride::Add(5.0));
        assert_eq!(n.load(), 40.0);
    }

    #[test]
    fn an_overridden_node_sends_its_vms_away() {
        let vm = cpu_vm;
        let mut a = node("a", vec![vm("a1", 10.0), vm("a2", 10.0)]);
        let b = node("b", vec![vm("b1", 10.0), vm("b2", 10.0)]);
        assert_eq!(a.load(), b.load());
        a.apply_override(LoadOverride::Add(30.0));
        assert!(a.load() > 2.0 * b.load());
    }

    #[test]
    fn host_factors_are_the_node_minus_its_vms_never_negative() {
        let f = |c: f64, io: f64, m: f64| LoadFactors {
            cpu_cores: c,
            io_bytes_per_second: io,
            memory_bytes: m,
        };
        let h = host_factors(
            &f(8.0, 100.0, 1000.0),
            &[f(3.0, 20.0, 400.0), f(1.0, 90.0, 100.0)],
        );
        assert_eq!(h, f(4.0, 0.0, 500.0));
    }

    #[test]
    fn the_hosts_measured_share_counts_and_the_override_comes_last() {
        let vm = BalancingVm {
            vm: VmKey::new("ns", "x"),
            factors: LoadFactors {
                cpu_cores: 3.0,
                io_bytes_per_second: 0.0,
                memory_bytes: 0.0,
            },
            target_load: None,
            movable: true,
        };
        let measured = LoadFactors {
            cpu_cores: 7.0,
            io_bytes_per_second: 0.0,
            memory_bytes: 0.0,
        };
        let n = node("a", vec![vm.clone()]).with_base_load(Some(&measured), None);
        assert_eq!((n.base_load, n.load()), (4.0, 7.0));
        let n = node("a", vec![vm.clone()]).with_base_load(Some(&measured), Some("+1"));
        assert_eq!(n.load(), 8.0);
        let n = node("a", vec![vm.clone()]).with_base_load(None, Some("20"));
        assert_eq!(n.load(), 20.0);
        let n = node("a", vec![vm]).with_base_load(None, Some("junk"));
        assert_eq!(n.load(), 3.0);
    }
}
