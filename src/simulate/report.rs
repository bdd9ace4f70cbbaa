//! Summaries of a replay: the human table and the `--json` object.

use serde::Serialize;
use serde_json::{json, Value};

use super::policies::Replay;

/// Nearest-rank percentile of unsorted values (`q` in 0..=1); 0 for no values.
pub fn percentile<T: Copy + Into<f64>>(values: &[T], q: f64) -> f64 {
    if values.is_empty() {
        return 0.0;
    }
    let mut v: Vec<f64> = values.iter().map(|x| (*x).into()).collect();
    v.sort_by(f64::total_cmp);
    let rank = ((q * v.len() as f64).ceil() as usize).clamp(1, v.len());
    v[rank - 1]
}

pub fn mean<T: Copy + Into<f64>>(values: &[T]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().map(|x| (*x).into()).sum::<f64>() / values.len() as f64
    }
}

fn mean_u64(values: &[u64]) -> f64 {
    if values.is_empty() {
        0.0
    } else {
        values.iter().map(|x| *x as f64).sum::<f64>() / values.len() as f64
    }
}

fn percentile_u64(values: &[u64], q: f64) -> f64 {
    let v: Vec<f64> = values.iter().map(|x| *x as f64).collect();
    percentile(&v, q)
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct PolicySummary {
    pub bytes_to_transfer_mean: f64,
    pub bytes_to_transfer_p95: f64,
    pub common_bytes_mean: f64,
    /// (random mean - policy mean) / (random mean - oracle mean); `null` without an oracle.
    pub oracle_share: Option<f64>,
    pub decision_ms_p50: f64,
    pub decision_ms_p99: f64,
    pub no_target: usize,
    /// Memory KSM could merge on the chosen nodes, summed over the migrations: what the fleet
    /// saves after them where KSM runs (each migration sampled from the same cluster state).
    pub ksm_merged_bytes_total: u64,
    /// `ksm_merged_bytes_total` minus least_allocated's (kube-scheduler's default).
    pub ksm_gain_vs_least_allocated_bytes: Option<i64>,
}

#[derive(Clone, Debug, Serialize, PartialEq)]
pub struct ErrorSummary {
    pub mean: f64,
    pub p95: f64,
    pub max: f64,
    pub pairs: usize,
}

impl ErrorSummary {
    fn of(values: &[f64]) -> Self {
        Self {
            mean: mean(values),
            p95: percentile(values, 0.95),
            max: values.iter().copied().fold(0.0, f64::max),
            pairs: values.len(),
        }
    }
}

#[derive(Clone, Debug, Serialize)]
pub struct Summary {
    pub migrations: usize,
    /// Whether bytes are charged from exact overlaps (else from the planner's estimates).
    pub exact: bool,
    pub vm_bytes_mean: f64,
    pub policies: Vec<(String, PolicySummary)>,
    pub estimate_error_pp: Option<ErrorSummary>,
    pub estimate_error_pp_at_oracle_choice: Option<ErrorSummary>,
    pub estimate_error_pp_by_vm_gib: Vec<(u64, ErrorSummary)>,
}

pub fn summarize(r: &Replay) -> Summary {
    let mean_of = |name: &str| {
        r.policies
            .iter()
            .find(|p| p.name == name)
            .map(|p| mean_u64(&p.bytes_to_transfer))
    };
    let ksm_total = |p: &super::policies::PolicyRun| p.ksm_merged_bytes.iter().sum::<u64>();
    let least_allocated_ksm = r
        .policies
        .iter()
        .find(|p| p.name == "least_allocated")
        .map(ksm_total);
    let random = mean_of("random");
    let oracle = mean_of("oracle");
    let policies = r
        .policies
        .iter()
        .map(|p| {
            let m = mean_u64(&p.bytes_to_transfer);
            let oracle_share = match (random, oracle) {
                (Some(rnd), Some(orc)) if rnd - orc > 0.0 => Some((rnd - m) / (rnd - orc)),
                // The oracle saves nothing over random: every policy is as good as it.
                (Some(_), Some(_)) => Some(1.0),
                _ => None,
            };
            let ms: Vec<f64> = p.decision_ns.iter().map(|n| *n as f64 / 1e6).collect();
            (
                p.name.to_string(),
                PolicySummary {
                    bytes_to_transfer_mean: m,
                    bytes_to_transfer_p95: percentile_u64(&p.bytes_to_transfer, 0.95),
                    common_bytes_mean: mean_u64(&p.common_bytes),
                    oracle_share,
                    decision_ms_p50: percentile(&ms, 0.5),
                    decision_ms_p99: percentile(&ms, 0.99),
                    no_target: p.no_target,
                    ksm_merged_bytes_total: ksm_total(p),
                    ksm_gain_vs_least_allocated_bytes: least_allocated_ksm
                        .map(|la| ksm_total(p) as i64 - la as i64),
                },
            )
        })
        .collect();
    Summary {
        migrations: r.migrations,
        exact: r.exact,
        vm_bytes_mean: mean_u64(&r.vm_bytes),
        policies,
        estimate_error_pp: r.exact.then(|| ErrorSummary::of(&r.estimate_error_pp)),
        estimate_error_pp_at_oracle_choice: r
            .exact
            .then(|| ErrorSummary::of(&r.estimate_error_pp_at_oracle)),
        estimate_error_pp_by_vm_gib: r
            .estimate_error_pp_by_vm_gib
            .iter()
            .map(|(g, v)| (*g, ErrorSummary::of(v)))
            .collect(),
    }
}

/// The `--json` object: `policies` keyed by policy name, plus the context.
pub fn to_json(s: &Summary, context: Value) -> Value {
    let policies: serde_json::Map<String, Value> = s
        .policies
        .iter()
        .map(|(name, p)| {
            let mut v = serde_json::to_value(p).expect("plain data");
            if let (Some(e), Value::Object(o)) = (&s.estimate_error_pp, &mut v) {
                if name == "commonground" {
                    o.insert("estimate_error_pp".into(), json!(e));
                }
            }
            (name.clone(), v)
        })
        .collect();
    json!({
        "context": context,
        "migrations": s.migrations,
        "exact": s.exact,
        "vm_bytes_mean": s.vm_bytes_mean,
        "policies": policies,
        "estimate_error_pp": s.estimate_error_pp,
        "estimate_error_pp_at_oracle_choice": s.estimate_error_pp_at_oracle_choice,
        "estimate_error_pp_by_vm_gib": s
            .estimate_error_pp_by_vm_gib
            .iter()
            .map(|(g, e)| (g.to_string(), json!(e)))
            .collect::<serde_json::Map<String, Value>>(),
    })
}

fn gib(b: f64) -> String {
    format!("{:.2}", b / (1u64 << 30) as f64)
}

/// The human table.
pub fn table(s: &Summary) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} migrations, mean VM {} GiB; bytes charged from {} overlaps\n",
        s.migrations,
        gib(s.vm_bytes_mean),
        if s.exact { "exact" } else { "estimated" }
    ));
    out.push_str(&format!(
        "{:<21} {:>12} {:>12} {:>12} {:>13} {:>10} {:>10} {:>9}\n",
        "policy",
        "move GiB",
        "move p95",
        "common GiB",
        "oracle_share",
        "ms p50",
        "ms p99",
        "no target"
    ));
    for (name, p) in &s.policies {
        out.push_str(&format!(
            "{:<21} {:>12} {:>12} {:>12} {:>13} {:>10.3} {:>10.3} {:>9}\n",
            name,
            gib(p.bytes_to_transfer_mean),
            gib(p.bytes_to_transfer_p95),
            gib(p.common_bytes_mean),
            p.oracle_share
                .map_or("-".to_string(), |x| format!("{x:.3}")),
            p.decision_ms_p50,
            p.decision_ms_p99,
            p.no_target
        ));
    }
    out.push_str(&format!(
        "memory KSM could merge on the chosen nodes after the {} migrations (GiB, in all):",
        s.migrations
    ));
    for (name, p) in &s.policies {
        out.push_str(&format!(
            " {name} {};",
            gib(p.ksm_merged_bytes_total as f64)
        ));
    }
    out.push('\n');
    for (label, e) in [
        ("all candidates", &s.estimate_error_pp),
        ("oracle's choice", &s.estimate_error_pp_at_oracle_choice),
    ] {
        if let Some(e) = e {
            out.push_str(&format!(
                "estimate error ({label}): mean {:.2} pp, p95 {:.2} pp, max {:.2} pp over {} pairs\n",
                e.mean, e.p95, e.max, e.pairs
            ));
        }
    }
    if !s.estimate_error_pp_by_vm_gib.is_empty() {
        out.push_str("estimate error by VM size (p95 pp):");
        for (g, e) in &s.estimate_error_pp_by_vm_gib {
            out.push_str(&format!(" {g} GiB {:.2};", e.p95));
        }
        out.push('\n');
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn percentiles_are_nearest_rank() {
        let v: Vec<f64> = (1..=100).map(f64::from).collect();
        assert_eq!(percentile(&v, 0.5), 50.0);
        assert_eq!(percentile(&v, 0.95), 95.0);
        assert_eq!(percentile(&v, 1.0), 100.0);
        assert_eq!(percentile::<f64>(&[], 0.5), 0.0);
        assert_eq!(mean(&[1.0, 2.0, 6.0]), 3.0);
    }
}
