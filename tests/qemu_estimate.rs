//! Checks the pre-copy estimate (`src/plan/estimate.rs`) against real QEMU live migrations.
//!
//! For each scenario a source QEMU boots a small guest whose /init (`tests/qemu/dirtier.c`)
//! dirties memory at a set rate within a set working set; a destination QEMU waits with
//! `-incoming defer`; both are driven over QMP (unix sockets) and the source migrates over
//! loopback TCP with `max-bandwidth` and `downtime-limit` set. QEMU's own totals (total-time,
//! ram.transferred, ram.dirty-sync-count, downtime) are compared with `estimate()` for the same
//! inputs. The zero bytes the estimate is given are measured by scanning the guest's RAM (a
//! file-backed memory backend) just before the migration, as the agent would.
//!
//! Prints a table and the median and worst relative error; fails only when the estimate is
//! far (3x) off or disagrees about convergence. Skips with a message when
//! `tests/qemu/prepare.sh` cannot provide QEMU (exit code 77), or when
//! `COMMONGROUND_SKIP_QEMU=1`. See tests/qemu/README.md for the numbers observed.

#[path = "qemu/common.rs"]
mod qemu;

use std::fs::File;
use std::io::Read;
use std::time::{Duration, Instant};

use commonground::plan::estimate::{estimate, Estimate, EstimateInput, Transport};
use qemu::{Env, Guest, GuestConfig};
use serde_json::json;

const MIB: u64 = 1 << 20;
const PAGE: usize = 4096;

/// Far beyond the error observed (see README): a ratio above this fails the test.
const FAIL_RATIO: f64 = 3.0;

fn start_vm(env: &Env, s: &Scenario, incoming: bool) -> Guest {
    Guest::start(
        env,
        &GuestConfig {
            mem_mib: s.mem_mib,
            append: format!(
                "console=ttyS0 quiet panic=-1 alloc_mib={} wss_mib={} dirty_mib_s={}",
                s.alloc_mib, s.wss_mib, s.rate_mib_s
            ),
            name: None,
            // so the test can count the non-zero pages of guest RAM
            ram_file: true,
            incoming,
            ..Default::default()
        },
    )
}

/// Non-zero 4 KiB pages of guest RAM, in bytes.
fn nonzero_bytes(vm: &Guest) -> u64 {
    let mut f = File::open(vm.ram_path()).unwrap();
    let mut buf = vec![0u8; 1 << 20];
    let mut nonzero = 0u64;
    loop {
        let n = f.read(&mut buf).unwrap();
        if n == 0 {
            break;
        }
        nonzero += buf[..n]
            .chunks(PAGE)
            .filter(|p| p.iter().any(|&b| b != 0))
            .count() as u64;
    }
    nonzero * PAGE as u64
}

/// Achieved rates the dirtier printed (MiB/s), in order.
fn guest_rates(vm: &Guest) -> Vec<f64> {
    vm.serial()
        .lines()
        .filter_map(|l| l.split("rate_mib_s=").nth(1)?.trim().parse().ok())
        .collect()
}

#[derive(Clone, Copy)]
struct Scenario {
    name: &'static str,
    mem_mib: u64,
    alloc_mib: u64,
    wss_mib: u64,
    rate_mib_s: u64,
    bw_mib_s: u64,
    downtime_ms: u64,
}

struct Outcome {
    s: Scenario,
    est: Estimate,
    zero_bytes: u64,
    /// QEMU completed; otherwise it was still iterating at the deadline and was cancelled.
    completed: bool,
    seconds: f64,
    bytes: u64,
    /// dirty-sync-count - 1: QEMU syncs once before the bulk pass, then once per later pass
    /// and once for the stop-and-copy; the model counts the bulk pass and the stop-and-copy.
    rounds: u64,
    downtime_ms: f64,
    /// The highest ram.dirty-pages-rate QEMU reported while migrating.
    dirty_pages_rate_mib_s: f64,
    /// The lowest rate the dirtier reported in its last seconds (NaN when idle).
    guest_rate_mib_s: f64,
    /// (seconds since migrate, dirty-sync-count, MiB transferred) at each new sync.
    syncs: Vec<(f64, u64, f64)>,
}

fn run(env: &Env, s: Scenario) -> Outcome {
    let mut dst = start_vm(env, &s, true);
    let mut src = start_vm(env, &s, false);
    src.wait_serial(
        "cg-dirtier: ready",
        Instant::now() + Duration::from_secs(90),
    );
    // let the dirtier reach its pace
    std::thread::sleep(Duration::from_millis(500));

    let mem = s.mem_mib * MIB;
    let nonzero = nonzero_bytes(&src);
    let zero_bytes = mem.saturating_sub(nonzero);
    let input = EstimateInput {
        memory_bytes: mem,
        zero_bytes,
        common_bytes: 0,
        dirty_rate: (s.rate_mib_s * MIB) as f64,
        working_set_bytes: s.wss_mib * MIB,
        bandwidth: (s.bw_mib_s * MIB) as f64,
        downtime_limit_ms: s.downtime_ms as f64,
        max_rounds: 30,
        transport: Transport::Stock,
    };
    let est = estimate(&input).expect("estimate");

    dst.qmp()
        .cmd("migrate-incoming", json!({ "uri": "tcp:127.0.0.1:0" }))
        .unwrap();
    let info = dst.qmp().cmd("query-migrate", json!({})).unwrap();
    let port = info["socket-address"]
        .as_array()
        .and_then(|a| {
            a.iter()
                .find_map(|sa| sa["port"].as_str().map(str::to_string))
        })
        .unwrap_or_else(|| panic!("destination reports no listening port: {info}"));

    let q = src.qmp();
    q.cmd(
        "migrate-set-parameters",
        json!({ "max-bandwidth": s.bw_mib_s * MIB, "downtime-limit": s.downtime_ms }),
    )
    .unwrap();
    let started = Instant::now();
    q.cmd("migrate", json!({ "uri": format!("tcp:127.0.0.1:{port}") }))
        .unwrap();
    // Long enough for any migration the model expects to converge; a non-converging one is
    // given a few of its rounds past the bulk pass to prove it does not finish.
    let bulk_s = (nonzero as f64) / (s.bw_mib_s * MIB) as f64;
    let limit = if est.converges {
        3.0 * est.seconds + 20.0
    } else {
        bulk_s + 6.0
    };
    let mut syncs = Vec::new();
    let mut last_sync = 0;
    let mut max_dirty_pages_rate = 0.0f64;
    let info = loop {
        std::thread::sleep(Duration::from_millis(100));
        let info = q.cmd("query-migrate", json!({})).unwrap();
        let t = started.elapsed().as_secs_f64();
        let sync = info["ram"]["dirty-sync-count"].as_u64().unwrap_or(0);
        max_dirty_pages_rate =
            max_dirty_pages_rate.max(info["ram"]["dirty-pages-rate"].as_f64().unwrap_or(0.0));
        if sync != last_sync {
            let mib = info["ram"]["transferred"].as_f64().unwrap_or(0.0) / MIB as f64;
            syncs.push((t, sync, mib));
            last_sync = sync;
        }
        match info["status"].as_str().unwrap_or("") {
            "completed" => break info,
            "failed" | "cancelled" => panic!("{}: migration {}: {info}", s.name, info["status"]),
            _ => {}
        }
        if t > limit {
            q.cmd("migrate_cancel", json!({})).unwrap();
            break info;
        }
    };
    let completed = info["status"] == "completed";
    if completed {
        // the guest runs on at the destination
        let st = dst.qmp().cmd("query-status", json!({})).unwrap();
        assert_eq!(
            st["status"], "running",
            "{}: destination after migration: {st}",
            s.name
        );
    }
    let ram = &info["ram"];
    let seconds = if completed {
        info["total-time"].as_f64().unwrap() / 1000.0
    } else {
        started.elapsed().as_secs_f64()
    };
    let page_size = ram["page-size"].as_f64().unwrap_or(PAGE as f64);
    let rates = guest_rates(&src);
    Outcome {
        s,
        est,
        zero_bytes,
        completed,
        seconds,
        bytes: ram["transferred"].as_u64().unwrap(),
        rounds: ram["dirty-sync-count"].as_u64().unwrap().saturating_sub(1),
        downtime_ms: info["downtime"].as_f64().unwrap_or(f64::NAN),
        dirty_pages_rate_mib_s: max_dirty_pages_rate * page_size / MIB as f64,
        // the last seconds before the source stopped
        guest_rate_mib_s: rates
            .iter()
            .rev()
            .skip(1)
            .take(5)
            .copied()
            .fold(f64::NAN, f64::min),
        syncs,
    }
}

/// Relative error of an estimate against what QEMU did.
fn rel(est: f64, qemu: f64) -> f64 {
    (est - qemu).abs() / qemu.abs().max(1e-9)
}

fn ratio(est: f64, qemu: f64) -> f64 {
    let (a, b) = (est.abs().max(1e-9), qemu.abs().max(1e-9));
    (a / b).max(b / a)
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let n = v.len();
    if n == 0 {
        f64::NAN
    } else if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn scenarios() -> Vec<Scenario> {
    let base = Scenario {
        name: "",
        mem_mib: 384,
        alloc_mib: 256,
        wss_mib: 0,
        rate_mib_s: 0,
        bw_mib_s: 64,
        downtime_ms: 300,
    };
    vec![
        // Nothing dirtied: the bulk pass, then an almost empty stop-and-copy.
        Scenario {
            name: "idle",
            ..base
        },
        // λ = 0.5, working set (256 MiB) larger than a round dirties: plain geometric rounds.
        Scenario {
            name: "rate-bound λ=0.5",
            wss_mib: 256,
            rate_mib_s: 32,
            ..base
        },
        // λ = 0.75, working set 64 MiB: bounds the first rounds, the rate the later ones.
        Scenario {
            name: "mixed λ=0.75 ws=64M",
            wss_mib: 64,
            rate_mib_s: 48,
            ..base
        },
        // λ = 2 but only 16 MiB rewritten: fits the downtime after the bulk pass.
        Scenario {
            name: "ws-bound λ=2 ws=16M",
            wss_mib: 16,
            rate_mib_s: 128,
            ..base
        },
        // λ = 1.5, 48 MiB rewritten: each round resends 48 MiB (750 ms > 300 ms), forever.
        Scenario {
            name: "no-converge λ=1.5 ws=48M",
            wss_mib: 48,
            rate_mib_s: 96,
            ..base
        },
    ]
}

#[test]
fn estimate_matches_qemu_live_migration() {
    let Some(env) = qemu::prepare("qemu_estimate") else {
        return;
    };
    let t0 = Instant::now();
    println!(
        "qemu_estimate: {} with {}, guest kernel {}",
        env.qemu.display(),
        env.accel_description(),
        env.kernel.display()
    );
    let outcomes: Vec<Outcome> = scenarios().into_iter().map(|s| run(&env, s)).collect();

    println!();
    println!(
        "{:<26} {:>16} {:>18} {:>9} {:>15} {:>11} {:>9} {:>10}",
        "scenario",
        "seconds est/qemu",
        "MiB sent est/qemu",
        "rounds",
        "downtime ms",
        "converges",
        "zero MiB",
        "dirty MiB/s guest/QEMU"
    );
    let mut errs_s = Vec::new();
    let mut errs_b = Vec::new();
    let mut errs_r = Vec::new();
    let mut failures = Vec::new();
    for o in &outcomes {
        let e = &o.est;
        println!(
            "{:<26} {:>7.2} / {:<7.2} {:>8.1} / {:<8.1} {:>3} / {:<3} {:>6.0} / {:<6.0} {:>5} / {:<5} {:>9.0} {:>5.0}/{:<5.0}",
            o.s.name,
            e.seconds,
            o.seconds,
            e.bytes_sent as f64 / MIB as f64,
            o.bytes as f64 / MIB as f64,
            e.rounds,
            o.rounds,
            e.downtime_ms,
            o.downtime_ms,
            e.converges,
            o.completed,
            o.zero_bytes as f64 / MIB as f64,
            o.guest_rate_mib_s,
            o.dirty_pages_rate_mib_s,
        );
        let syncs: Vec<String> = o
            .syncs
            .iter()
            .map(|(t, n, mib)| format!("#{n}@{t:.1}s/{mib:.0}MiB"))
            .collect();
        println!("    QEMU syncs: {}", syncs.join(" "));
        if e.converges != o.completed {
            failures.push(format!(
                "{}: the estimate says converges={} but QEMU {}",
                o.s.name,
                e.converges,
                if o.completed {
                    "completed"
                } else {
                    "was still iterating"
                }
            ));
            continue;
        }
        if !o.completed {
            continue;
        }
        errs_s.push(rel(e.seconds, o.seconds));
        errs_b.push(rel(e.bytes_sent as f64, o.bytes as f64));
        errs_r.push(rel(e.rounds as f64, o.rounds as f64));
        for (what, est, qemu) in [
            ("seconds", e.seconds, o.seconds),
            ("bytes", e.bytes_sent as f64, o.bytes as f64),
            ("rounds", e.rounds as f64, o.rounds as f64),
        ] {
            if ratio(est, qemu) > FAIL_RATIO {
                failures.push(format!(
                    "{}: {what} estimated {est:.2}, QEMU {qemu:.2}",
                    o.s.name
                ));
            }
        }
    }
    let worst = |v: &[f64]| v.iter().copied().fold(0.0, f64::max);
    println!();
    println!(
        "relative error over the {} completed migrations:",
        errs_s.len()
    );
    println!(
        "  seconds: median {:5.1}%  worst {:5.1}%",
        100.0 * median(errs_s.clone()),
        100.0 * worst(&errs_s)
    );
    println!(
        "  bytes:   median {:5.1}%  worst {:5.1}%",
        100.0 * median(errs_b.clone()),
        100.0 * worst(&errs_b)
    );
    println!(
        "  rounds:  median {:5.1}%  worst {:5.1}%",
        100.0 * median(errs_r.clone()),
        100.0 * worst(&errs_r)
    );
    println!("  (downtime is not compared: QEMU lifts max-bandwidth for the stop-and-copy, loopback makes it fast)");
    println!("qemu_estimate took {:.0} s", t0.elapsed().as_secs_f64());
    assert!(
        failures.is_empty(),
        "the estimate is far off QEMU:\n{}",
        failures.join("\n")
    );
}
