//! Synthetic clusters: VMs built from a handful of OS images, placed on nodes in work groups.
//!
//! Content model (no region of any VM is ever materialised):
//! - An image is a stack of shared *layers*: the base layer of its OS family (shared by every
//!   image of the family) and a layer of its own. A layer is a numbered list of regions whose
//!   identity is a hash of `(layer, index)`, so the same content has the same key in every VM
//!   and on every node.
//! - Each region of a layer has a popularity class (hot / warm / cold). A VM holds a region
//!   of its image's layers with a probability set by the class and the VM's activity; the
//!   decision is a hash of `(VM, region)`, so it is the same whether the generator asks about
//!   one sampled region (for the sketch) or about every region (for the exact bitsets).
//! - The rest of a VM's non-zero memory is private: its sampled keys are drawn directly as
//!   `Binomial(n, rate)` uniform keys below the threshold, statistically identical to hashing
//!   `n` unique regions.
//! - Zero regions are counted and left out of every sketch, as the agent does.
//!
//! Exact overlaps come from bitsets over layer regions: the regions of a VM present on a node
//! are the VM's layer bits AND the union of the node's VMs' layer bits (private content is
//! never shared).

use std::collections::BTreeMap;

use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use serde::Serialize;

use crate::plan::cluster::{
    ClusterSnapshot, NodeFacts, NodeRegionSummary, Resources, VmKey, VmRegionSummary, VmRequest,
};
use crate::plan::hardware::KUBEVIRT_SCHEDULABLE_LABEL;
use crate::plan::region::{ClusterKey, RegionGeometry};
use crate::plan::sketch::{RegionSketch, DEFAULT_THRESHOLD};
use crate::plan::workgroups::{DistanceMatrix, DEFAULT_WORK_GROUP_LABEL};

use super::digest_budget::{fit_digest, DIGEST_LIMIT_BYTES};
use super::SimulateError;

pub const GIB: u64 = 1 << 30;

/// How alike the fleet is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Mix {
    /// Virtual desktops: a few images, small VMs, sharing (zero pages excluded) over 30%.
    Desktop,
    /// Between the two: the default.
    Middle,
    /// Many unrelated images, large VMs, sharing under 15%.
    Diverse,
}

impl std::fmt::Display for Mix {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Mix::Desktop => "desktop",
            Mix::Middle => "middle",
            Mix::Diverse => "diverse",
        })
    }
}

/// VM sizes in GiB and their weights per mix.
const VM_SIZES_GIB: [u64; 6] = [2, 4, 8, 16, 32, 64];

struct MixParams {
    /// Images per OS family (images of one family share the base layer).
    images_per_family: usize,
    size_weights: [f64; 6],
    zero_fraction: (f64, f64),
    base_layer_gib: (f64, f64),
    image_layer_gib: (f64, f64),
    activity: (f64, f64),
    /// Probability that a VM is placed on a node that prefers its image (tenants, pools).
    affinity: f64,
}

impl Mix {
    fn params(self) -> MixParams {
        match self {
            Mix::Desktop => MixParams {
                images_per_family: 4,
                size_weights: [0.1, 0.5, 0.4, 0.0, 0.0, 0.0],
                zero_fraction: (0.15, 0.35),
                base_layer_gib: (1.5, 2.5),
                image_layer_gib: (1.0, 2.0),
                activity: (0.8, 1.2),
                affinity: 0.6,
            },
            Mix::Middle => MixParams {
                images_per_family: 3,
                size_weights: [0.15, 0.3, 0.3, 0.15, 0.07, 0.03],
                zero_fraction: (0.1, 0.4),
                base_layer_gib: (1.5, 3.0),
                image_layer_gib: (1.0, 3.0),
                activity: (0.5, 1.0),
                affinity: 0.5,
            },
            Mix::Diverse => MixParams {
                images_per_family: 1,
                size_weights: [0.05, 0.15, 0.3, 0.3, 0.15, 0.05],
                zero_fraction: (0.05, 0.3),
                base_layer_gib: (1.0, 2.0),
                image_layer_gib: (0.5, 1.5),
                activity: (0.3, 0.8),
                affinity: 0.3,
            },
        }
    }
}

/// What to generate.
#[derive(Clone, Debug)]
pub struct SyntheticConfig {
    pub nodes: usize,
    pub vms: usize,
    pub images: usize,
    pub work_groups: usize,
    pub seed: u64,
    pub region_pages: u32,
    pub mix: Mix,
    /// Sampling threshold of the VM sketches before the per-node digest budget applies.
    pub base_threshold: u64,
    /// Serialized digest bound per node (node sketch plus every VM sketch, base64).
    pub digest_limit_bytes: usize,
    /// Keep the per-VM layer bitsets for exact overlaps (memory and time: skip for benches).
    pub exact: bool,
    /// Share of the nodes on which KSM runs (labelled `kubevirt.io/ksm-enabled=true`), chosen
    /// by the seed apart from every other choice, so the rest of the cluster is the same
    /// whatever the share.
    pub ksm_fraction: f64,
}

impl Default for SyntheticConfig {
    fn default() -> Self {
        Self {
            nodes: 100,
            vms: 2000,
            images: 8,
            work_groups: 4,
            seed: 1,
            region_pages: crate::plan::region::DEFAULT_REGION_PAGES,
            mix: Mix::Middle,
            base_threshold: DEFAULT_THRESHOLD,
            digest_limit_bytes: DIGEST_LIMIT_BYTES,
            exact: true,
            ksm_fraction: 0.5,
        }
    }
}

/// One shared layer of image content.
struct Layer {
    regions: u32,
    /// Region hashes by index (key = top 40 bits of the 64-bit hash, class = low byte).
    hashes: Vec<u64>,
    /// `(key, index)` of the regions below the base threshold, by key.
    sampled: Vec<(u64, u32)>,
}

/// A VM's share of one layer: which regions it holds (bitset, exact mode only).
struct LayerUse {
    layer: usize,
    bits: Vec<u64>,
}

/// Exact layer content of every VM and the union per node, for the oracle and error checks.
pub struct ExactLayers {
    layer_regions: Vec<u32>,
    vm_layers: Vec<Vec<LayerUse>>,
    /// Per node: layer -> union of the node's VMs' bits.
    node_layers: Vec<BTreeMap<usize, Vec<u64>>>,
    vm_node: Vec<usize>,
}

impl ExactLayers {
    /// Exact non-zero regions of VM `vm` present on node `node` (the VM itself left out when it
    /// runs there).
    pub fn common_regions(&self, vm: usize, node: usize) -> u64 {
        if self.vm_node[vm] == node {
            // Only the source holds the VM; candidates never include it. Count what the
            // other VMs there hold by rebuilding the union without this VM.
            return self.common_without_self(vm, node);
        }
        let n = &self.node_layers[node];
        self.vm_layers[vm]
            .iter()
            .filter_map(|u| n.get(&u.layer).map(|nb| and_count(&u.bits, nb)))
            .sum()
    }

    fn common_without_self(&self, vm: usize, node: usize) -> u64 {
        let others: Vec<usize> = (0..self.vm_node.len())
            .filter(|&v| v != vm && self.vm_node[v] == node)
            .collect();
        self.vm_layers[vm]
            .iter()
            .map(|u| {
                let mut union = vec![0u64; u.bits.len()];
                for &o in &others {
                    for w in self.vm_layers[o].iter().filter(|w| w.layer == u.layer) {
                        union.iter_mut().zip(&w.bits).for_each(|(a, b)| *a |= b);
                    }
                }
                and_count(&u.bits, &union)
            })
            .sum()
    }

    /// Fraction of all non-zero VM regions that duplicate another region somewhere in the
    /// fleet (the dedup potential published measurements report), given the private counts.
    fn fleet_sharing(&self, private_total: u64, nonzero_total: u64) -> f64 {
        let mut distinct = private_total;
        for (l, &regions) in self.layer_regions.iter().enumerate() {
            let mut union = vec![0u64; words(regions)];
            for uses in &self.vm_layers {
                for u in uses.iter().filter(|u| u.layer == l) {
                    union.iter_mut().zip(&u.bits).for_each(|(a, b)| *a |= b);
                }
            }
            distinct += union.iter().map(|w| w.count_ones() as u64).sum::<u64>();
        }
        if nonzero_total == 0 {
            0.0
        } else {
            1.0 - distinct as f64 / nonzero_total as f64
        }
    }
}

fn and_count(a: &[u64], b: &[u64]) -> u64 {
    a.iter()
        .zip(b)
        .map(|(x, y)| (x & y).count_ones() as u64)
        .sum()
}

fn words(bits: u32) -> usize {
    (bits as usize).div_ceil(64)
}

/// A generated cluster.
pub struct SyntheticCluster {
    pub snapshot: ClusterSnapshot,
    /// One request per VM (summary left to the digests), in VM order.
    pub requests: Vec<VmRequest>,
    /// Index of each VM's node.
    pub vm_node: Vec<usize>,
    pub exact: Option<ExactLayers>,
    pub stats: SyntheticStats,
}

/// Facts about a generated cluster, for the report.
#[derive(Clone, Debug, Default, Serialize)]
pub struct SyntheticStats {
    pub mix: String,
    pub nodes: usize,
    pub vms: usize,
    pub images: usize,
    pub work_groups: usize,
    pub region_bytes: u64,
    pub vm_memory_bytes: u64,
    pub zero_fraction: f64,
    /// Fraction of non-zero VM memory duplicated elsewhere in the fleet (exact mode only).
    pub sharing: Option<f64>,
    /// Fraction of non-zero VM memory that is image content.
    pub image_fraction: f64,
    pub memory_allocated_fraction: f64,
    pub digest_bytes_max: usize,
    pub digest_bytes_mean: f64,
    /// Median sampling rate of the published node sketches (1 in N).
    pub sample_one_in_median: f64,
    pub vm_samples_median: f64,
}

/// 64-bit mixer (SplitMix64 finaliser).
pub fn mix64(mut z: u64) -> u64 {
    z = z.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Probability that a VM with `activity` holds a region of popularity `class` (0..=255).
fn hold_probability(class: u8, activity: f64) -> f64 {
    // 30% hot (kernel, libc, init), 40% warm, 30% cold.
    let base = match class {
        0..=76 => 1.0,
        77..=178 => 0.6,
        _ => 0.15,
    };
    (base * activity).min(1.0)
}

fn mean_hold(activity: f64) -> f64 {
    0.3 * hold_probability(0, activity)
        + 0.4 * hold_probability(100, activity)
        + 0.3 * hold_probability(200, activity)
}

fn holds(vm_salt: u64, region_hash: u64, activity: f64) -> bool {
    let p = hold_probability(region_hash as u8, activity);
    (mix64(vm_salt ^ region_hash) >> 11) as f64 * (1.0 / (1u64 << 53) as f64) < p
}

/// Number of successes in `n` trials of probability `p`: exact geometric skipping when few
/// are expected, the normal approximation (error far below the sampling noise) otherwise.
pub fn binomial(rng: &mut impl Rng, n: u64, p: f64) -> u64 {
    if n == 0 || p <= 0.0 {
        return 0;
    }
    if p >= 1.0 {
        return n;
    }
    let mean = n as f64 * p;
    if mean < 64.0 {
        let ln_q = (1.0 - p).ln();
        let (mut pos, mut k) = (0u64, 0u64);
        loop {
            let u: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
            pos += (u.ln() / ln_q).floor() as u64 + 1;
            if pos > n {
                return k;
            }
            k += 1;
        }
    }
    let sd = (mean * (1.0 - p)).sqrt();
    let u1: f64 = rng.random::<f64>().max(f64::MIN_POSITIVE);
    let u2: f64 = rng.random();
    let z = (-2.0 * u1.ln()).sqrt() * (std::f64::consts::TAU * u2).cos();
    (mean + sd * z).round().clamp(0.0, n as f64) as u64
}

fn pick_weighted(rng: &mut impl Rng, weights: &[f64]) -> usize {
    let total: f64 = weights.iter().sum();
    let mut x = rng.random::<f64>() * total;
    for (i, w) in weights.iter().enumerate() {
        if x < *w {
            return i;
        }
        x -= w;
    }
    weights.len() - 1
}

fn uniform(rng: &mut impl Rng, (lo, hi): (f64, f64)) -> f64 {
    lo + (hi - lo) * rng.random::<f64>()
}

struct VmPlan {
    image: usize,
    memory_bytes: u64,
    regions: u64,
    zero_regions: u64,
    activity: f64,
    salt: u64,
    cpu_millis: u64,
    load: f64,
}

pub fn generate(cfg: &SyntheticConfig) -> Result<SyntheticCluster, SimulateError> {
    if cfg.nodes == 0 || cfg.images == 0 || cfg.work_groups == 0 {
        return Err(SimulateError::Input(
            "--nodes, --images and --work-groups must be at least 1".into(),
        ));
    }
    let geometry =
        RegionGeometry::new(cfg.region_pages).map_err(|e| SimulateError::Input(e.to_string()))?;
    let rb = geometry.region_bytes();
    let p = cfg.mix.params();
    let mut rng = StdRng::seed_from_u64(cfg.seed);

    // Layers: one base layer per family, one layer per image.
    let families = cfg.images.div_ceil(p.images_per_family);
    let mut layer_sizes = Vec::new();
    for _ in 0..families {
        layer_sizes.push(uniform(&mut rng, p.base_layer_gib));
    }
    for _ in 0..cfg.images {
        layer_sizes.push(uniform(&mut rng, p.image_layer_gib));
    }
    let layers: Vec<Layer> = layer_sizes
        .iter()
        .enumerate()
        .map(|(l, gib)| {
            let regions = ((gib * GIB as f64) / rb as f64).round().max(1.0) as u32;
            let salt = mix64(cfg.seed ^ mix64(0x1A7E_0000 + l as u64));
            let hashes: Vec<u64> = (0..regions as u64)
                .map(|i| mix64(salt ^ mix64(i)))
                .collect();
            let mut sampled: Vec<(u64, u32)> = hashes
                .iter()
                .enumerate()
                .map(|(i, h)| (h >> 24, i as u32))
                .filter(|(k, _)| *k < cfg.base_threshold)
                .collect();
            sampled.sort_unstable();
            Layer {
                regions,
                hashes,
                sampled,
            }
        })
        .collect();
    let image_layers =
        |image: usize| -> [usize; 2] { [image / p.images_per_family, families + image] };

    // Nodes.
    let capacities_gib = [256u64, 384, 512, 768];
    let mut nodes: Vec<NodeFacts> = (0..cfg.nodes)
        .map(|i| {
            let gib = capacities_gib[rng.random_range(0..capacities_gib.len())];
            let group = format!("wg-{}", i % cfg.work_groups);
            let mut labels: BTreeMap<String, String> = BTreeMap::new();
            labels.insert(KUBEVIRT_SCHEDULABLE_LABEL.into(), "true".into());
            labels.insert(DEFAULT_WORK_GROUP_LABEL.into(), group.clone());
            let ksm_draw =
                mix64(cfg.seed ^ mix64(0x4B53_4D00_0000 + i as u64)) as f64 / u64::MAX as f64;
            if ksm_draw < cfg.ksm_fraction {
                labels.insert(crate::plan::ksm::KSM_ENABLED_LABEL.into(), "true".into());
            }
            NodeFacts {
                name: format!("node-{i:04}"),
                labels,
                taints: vec![],
                // A few cordoned nodes, as in any real cluster.
                unschedulable: rng.random_bool(0.02),
                ready: true,
                allocatable: Resources {
                    cpu_millis: gib / 4 * 1000,
                    memory_bytes: gib * GIB,
                },
                requested: Resources::default(),
                work_group: group,
                load: None,
                scalar_allocatable: Default::default(),
                scalar_requested: Default::default(),
            }
        })
        .collect();
    let preferred: Vec<usize> = (0..cfg.nodes)
        .map(|_| rng.random_range(0..cfg.images))
        .collect();

    // VMs: image popularity is Zipf-like.
    let image_weights: Vec<f64> = (0..cfg.images).map(|i| 1.0 / (i + 1) as f64).collect();
    let mut vm_plans = Vec::with_capacity(cfg.vms);
    let mut vm_node = Vec::with_capacity(cfg.vms);
    for v in 0..cfg.vms {
        let image = pick_weighted(&mut rng, &image_weights);
        let gib = VM_SIZES_GIB[pick_weighted(&mut rng, &p.size_weights)];
        let memory_bytes = gib * GIB;
        let regions = geometry.regions_in(memory_bytes);
        let zero_regions = (regions as f64 * uniform(&mut rng, p.zero_fraction)).round() as u64;
        let nonzero = regions - zero_regions;
        let layer_regions: u64 = image_layers(image)
            .iter()
            .map(|&l| layers[l].regions as u64)
            .sum();
        // Image content never exceeds 80% of the VM's non-zero memory.
        let mut activity = uniform(&mut rng, p.activity);
        while layer_regions as f64 * mean_hold(activity) > 0.8 * nonzero as f64 {
            activity *= 0.9;
        }
        let cpu_millis = (gib * 1000 / 4).max(1000);
        let need = Resources {
            cpu_millis,
            memory_bytes,
        };
        // Placement: often on a node that prefers the image, else anywhere it fits, keeping
        // 10% of every node free.
        let fits = |n: &NodeFacts| {
            let limit = Resources {
                cpu_millis: n.allocatable.cpu_millis * 9 / 10,
                memory_bytes: n.allocatable.memory_bytes * 9 / 10,
            };
            (n.requested + need).fits_in(limit)
        };
        let mut choice: Vec<usize> = Vec::new();
        if rng.random_bool(p.affinity) {
            choice = (0..cfg.nodes)
                .filter(|&i| preferred[i] == image && fits(&nodes[i]))
                .collect();
        }
        if choice.is_empty() {
            choice = (0..cfg.nodes).filter(|&i| fits(&nodes[i])).collect();
        }
        if choice.is_empty() {
            return Err(SimulateError::Input(format!(
                "{} VMs do not fit on {} nodes (placed {v}); use more nodes or fewer VMs",
                cfg.vms, cfg.nodes
            )));
        }
        let node = choice[rng.random_range(0..choice.len())];
        nodes[node].requested = nodes[node].requested + need;
        vm_node.push(node);
        vm_plans.push(VmPlan {
            image,
            memory_bytes,
            regions,
            zero_regions,
            activity,
            salt: mix64(cfg.seed ^ mix64(0x0000_7000_0000 + v as u64)),
            cpu_millis,
            load: rng.random_range(0.05..0.9),
        });
    }
    for n in &mut nodes {
        let mem = n.requested.memory_bytes as f64 / n.allocatable.memory_bytes as f64;
        n.load = Some(0.7 * mem + 0.3 * rng.random::<f64>());
    }

    // Exact layer bitsets (optional) and the resident layer region count of every VM.
    let mut vm_layers: Vec<Vec<LayerUse>> = Vec::new();
    let mut resident: Vec<u64> = Vec::with_capacity(cfg.vms);
    for vp in &vm_plans {
        let mut uses = Vec::new();
        let mut count = 0u64;
        for l in image_layers(vp.image) {
            let layer = &layers[l];
            if cfg.exact {
                let mut bits = vec![0u64; words(layer.regions)];
                for (i, &h) in layer.hashes.iter().enumerate() {
                    if holds(vp.salt, h, vp.activity) {
                        bits[i / 64] |= 1 << (i % 64);
                    }
                }
                count += bits.iter().map(|w| w.count_ones() as u64).sum::<u64>();
                uses.push(LayerUse { layer: l, bits });
            } else {
                count += (layer.regions as f64 * mean_hold(vp.activity)).round() as u64;
            }
        }
        resident.push(count.min(vp.regions - vp.zero_regions));
        vm_layers.push(uses);
    }

    // VM sketches at the base threshold: sampled layer regions the VM holds plus sampled
    // private regions.
    let rate = cfg.base_threshold as f64 / crate::plan::sketch::KEY_SPACE as f64;
    let mut summaries: Vec<VmRegionSummary> = vm_plans
        .iter()
        .enumerate()
        .map(|(v, vp)| {
            let mut keys: Vec<u64> = Vec::new();
            for l in image_layers(vp.image) {
                keys.extend(
                    layers[l]
                        .sampled
                        .iter()
                        .filter(|(_, i)| holds(vp.salt, layers[l].hashes[*i as usize], vp.activity))
                        .map(|(k, _)| *k),
                );
            }
            let private = vp.regions - vp.zero_regions - resident[v];
            let k = binomial(&mut rng, private, rate);
            keys.extend((0..k).map(|_| rng.random_range(0..cfg.base_threshold)));
            VmRegionSummary {
                vm: VmKey::new("default", format!("vm-{v:05}")),
                memory_bytes: vp.memory_bytes,
                regions: vp.regions,
                zero_regions: vp.zero_regions,
                sketch: RegionSketch::from_keys(cfg.base_threshold, keys),
                dirty_rate: 0.0,
                working_set_bytes: 0,
                load: vp.load,
            }
        })
        .collect();

    // Node digests: union of the node's VMs, fitted to the digest bound.
    let key_id = ClusterKey::development().key_id;
    let mut per_node: Vec<Vec<VmRegionSummary>> = vec![Vec::new(); cfg.nodes];
    for (v, s) in summaries.drain(..).enumerate() {
        per_node[vm_node[v]].push(s);
    }
    let mut digests = Vec::with_capacity(cfg.nodes);
    let mut digest_sizes = Vec::with_capacity(cfg.nodes);
    for (i, mut vms) in per_node.into_iter().enumerate() {
        let (sketch, bytes) = fit_digest(&mut vms, cfg.base_threshold, cfg.digest_limit_bytes);
        digest_sizes.push(bytes);
        digests.push(NodeRegionSummary {
            node: nodes[i].name.clone(),
            work_group: nodes[i].work_group.clone(),
            geometry,
            key_id: key_id.clone(),
            sketch,
            vms,
        });
    }

    let requests: Vec<VmRequest> = vm_plans
        .iter()
        .enumerate()
        .map(|(v, vp)| VmRequest {
            vm: VmKey::new("default", format!("vm-{v:05}")),
            source_node: nodes[vm_node[v]].name.clone(),
            requests: Resources {
                cpu_millis: vp.cpu_millis,
                memory_bytes: vp.memory_bytes,
            },
            node_selector: BTreeMap::new(),
            affinity_terms: vec![],
            tolerations: vec![],
            cpu_model: None,
            cpu_features: vec![],
            summary: None,
            memory_bytes: vp.memory_bytes,
            fit: Default::default(),
        })
        .collect();

    // Exact node unions.
    let exact = cfg.exact.then(|| {
        let mut node_layers: Vec<BTreeMap<usize, Vec<u64>>> = vec![BTreeMap::new(); cfg.nodes];
        for (v, uses) in vm_layers.iter().enumerate() {
            for u in uses {
                let union = node_layers[vm_node[v]]
                    .entry(u.layer)
                    .or_insert_with(|| vec![0u64; u.bits.len()]);
                union.iter_mut().zip(&u.bits).for_each(|(a, b)| *a |= b);
            }
        }
        ExactLayers {
            layer_regions: layers.iter().map(|l| l.regions).collect(),
            vm_layers,
            node_layers,
            vm_node: vm_node.clone(),
        }
    });

    // Statistics.
    let total_regions: u64 = vm_plans.iter().map(|v| v.regions).sum();
    let zero_total: u64 = vm_plans.iter().map(|v| v.zero_regions).sum();
    let nonzero_total = total_regions - zero_total;
    let resident_total: u64 = resident.iter().sum();
    let sharing = exact
        .as_ref()
        .map(|e| e.fleet_sharing(nonzero_total - resident_total, nonzero_total));
    let mut one_in: Vec<f64> = digests
        .iter()
        .map(|d| 1.0 / d.sketch.sample_rate())
        .collect();
    one_in.sort_by(f64::total_cmp);
    let mut vm_samples: Vec<f64> = digests
        .iter()
        .flat_map(|d| d.vms.iter().map(|v| v.sketch.len() as f64))
        .collect();
    vm_samples.sort_by(f64::total_cmp);
    let alloc: u64 = nodes.iter().map(|n| n.allocatable.memory_bytes).sum();
    let used: u64 = nodes.iter().map(|n| n.requested.memory_bytes).sum();
    let stats = SyntheticStats {
        mix: cfg.mix.to_string(),
        nodes: cfg.nodes,
        vms: cfg.vms,
        images: cfg.images,
        work_groups: cfg.work_groups,
        region_bytes: rb,
        vm_memory_bytes: vm_plans.iter().map(|v| v.memory_bytes).sum(),
        zero_fraction: zero_total as f64 / total_regions.max(1) as f64,
        sharing,
        image_fraction: resident_total as f64 / nonzero_total.max(1) as f64,
        memory_allocated_fraction: used as f64 / alloc.max(1) as f64,
        digest_bytes_max: digest_sizes.iter().copied().max().unwrap_or(0),
        digest_bytes_mean: digest_sizes.iter().sum::<usize>() as f64
            / digest_sizes.len().max(1) as f64,
        sample_one_in_median: one_in.get(one_in.len() / 2).copied().unwrap_or(0.0),
        vm_samples_median: vm_samples.get(vm_samples.len() / 2).copied().unwrap_or(0.0),
    };

    let snapshot = ClusterSnapshot {
        geometry,
        nodes,
        digests,
        distances: work_group_distances(cfg.work_groups),
    };
    Ok(SyntheticCluster {
        snapshot,
        requests,
        vm_node,
        exact,
        stats,
    })
}

/// Work groups on a line: distance 10 per step.
fn work_group_distances(groups: usize) -> DistanceMatrix {
    let mut m = DistanceMatrix::default();
    for a in 0..groups {
        for b in a + 1..groups {
            m.set(
                &format!("wg-{a}"),
                &format!("wg-{b}"),
                10.0 * (b - a) as f64,
            )
            .expect("finite distance");
        }
    }
    m
}
