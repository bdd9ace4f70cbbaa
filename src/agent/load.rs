//! Load per VM and per node over the last interval (the rebalancer's inputs): CPU time from
//! `/proc/<pid>/stat` (utime + stime), I/O bytes from `/proc/<pid>/io` (read_bytes + write_bytes,
//! or rchar + wchar when the block counters are unavailable), resident memory; for the node
//! `/proc/stat`, `/proc/meminfo` and `/proc/vmstat`.

use std::time::Instant;

use crate::plan::region::PAGE_SIZE;

use super::AgentError;

/// Cumulative counters of one process at one instant.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct ProcessCounters {
    /// utime + stime, in clock ticks.
    pub cpu_ticks: u64,
    pub io_bytes: u64,
    pub rss_bytes: u64,
    pub at: Instant,
}

/// Rates between two samples.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct LoadRates {
    pub cpu_cores: f64,
    pub io_bytes_per_second: f64,
    pub memory_bytes: u64,
}

fn clock_ticks() -> f64 {
    // SAFETY: sysconf has no memory-safety preconditions.
    let t = unsafe { libc::sysconf(libc::_SC_CLK_TCK) };
    if t > 0 {
        t as f64
    } else {
        100.0
    }
}

/// Parses `/proc/<pid>/stat`: (utime + stime ticks, rss pages). The command name is in
/// parentheses and may itself contain spaces and parentheses, so fields are counted from the
/// last `)`.
pub fn parse_stat(pid: i32, text: &str) -> Result<(u64, u64), AgentError> {
    let bad = |what: &str| AgentError::Proc {
        pid,
        file: "stat",
        what: what.to_string(),
    };
    let (_, rest) = text
        .rsplit_once(')')
        .ok_or_else(|| bad("no command name"))?;
    // After ")": state(3) ppid(4) ... utime(14) stime(15) ... rss(24); index 0 here is field 3.
    let f: Vec<&str> = rest.split_whitespace().collect();
    let field = |n: usize| -> Result<u64, AgentError> {
        f.get(n - 3)
            .and_then(|v| v.parse::<i64>().ok())
            .map(|v| v.max(0) as u64)
            .ok_or_else(|| bad(&format!("field {n} missing or not a number")))
    };
    Ok((field(14)? + field(15)?, field(24)?))
}

/// Parses `/proc/<pid>/io`: block-device bytes if present, else bytes through read/write.
pub fn parse_io(text: &str) -> Option<u64> {
    let get = |key: &str| {
        text.lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
    };
    match (get("read_bytes:"), get("write_bytes:")) {
        (Some(r), Some(w)) => Some(r + w),
        _ => Some(get("rchar:")? + get("wchar:")?),
    }
}

pub fn sample_process(pid: i32) -> Result<ProcessCounters, AgentError> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map_err(|e| AgentError::io(pid, "stat", e))?;
    let (cpu_ticks, rss_pages) = parse_stat(pid, &stat)?;
    // /proc/<pid>/io needs ptrace-read access; without it I/O is reported as unknown (0).
    let io_bytes = std::fs::read_to_string(format!("/proc/{pid}/io"))
        .ok()
        .and_then(|t| parse_io(&t))
        .unwrap_or(0);
    Ok(ProcessCounters {
        cpu_ticks,
        io_bytes,
        rss_bytes: rss_pages * PAGE_SIZE as u64,
        at: Instant::now(),
    })
}

/// Rates between an earlier and a later sample of the same process.
pub fn rates(earlier: &ProcessCounters, later: &ProcessCounters) -> LoadRates {
    let secs = later.at.duration_since(earlier.at).as_secs_f64();
    if secs <= 0.0 {
        return LoadRates {
            memory_bytes: later.rss_bytes,
            ..Default::default()
        };
    }
    LoadRates {
        cpu_cores: later.cpu_ticks.saturating_sub(earlier.cpu_ticks) as f64 / clock_ticks() / secs,
        io_bytes_per_second: later.io_bytes.saturating_sub(earlier.io_bytes) as f64 / secs,
        memory_bytes: later.rss_bytes,
    }
}

/// Whole-node counters.
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct NodeCounters {
    pub busy_ticks: u64,
    pub io_bytes: u64,
    pub used_memory_bytes: u64,
    pub total_memory_bytes: u64,
    pub cpus: u64,
    pub at: Instant,
}

pub fn sample_node() -> Result<NodeCounters, AgentError> {
    let stat = std::fs::read_to_string("/proc/stat").map_err(|e| AgentError::io(0, "stat", e))?;
    let cpu: Vec<u64> = stat
        .lines()
        .find(|l| l.starts_with("cpu "))
        .map(|l| {
            l.split_whitespace()
                .skip(1)
                .filter_map(|v| v.parse().ok())
                .collect()
        })
        .unwrap_or_default();
    // user nice system idle iowait irq softirq steal: busy is everything but idle and iowait.
    let busy_ticks = cpu.iter().sum::<u64>()
        - cpu.get(3).copied().unwrap_or(0)
        - cpu.get(4).copied().unwrap_or(0);
    let cpus = stat
        .lines()
        .filter(|l| l.starts_with("cpu") && !l.starts_with("cpu "))
        .count() as u64;
    let meminfo =
        std::fs::read_to_string("/proc/meminfo").map_err(|e| AgentError::io(0, "meminfo", e))?;
    let kib = |key: &str| {
        meminfo
            .lines()
            .find_map(|l| {
                l.strip_prefix(key)?
                    .split_whitespace()
                    .next()?
                    .parse::<u64>()
                    .ok()
            })
            .unwrap_or(0)
            * 1024
    };
    let total = kib("MemTotal:");
    let available = kib("MemAvailable:");
    let vmstat = std::fs::read_to_string("/proc/vmstat").unwrap_or_default();
    let vm = |key: &str| {
        vmstat
            .lines()
            .find_map(|l| l.strip_prefix(key)?.trim().parse::<u64>().ok())
            .unwrap_or(0)
    };
    // pgpgin/pgpgout count KiB transferred to and from block devices.
    let io_bytes = (vm("pgpgin ") + vm("pgpgout ")) * 1024;
    Ok(NodeCounters {
        busy_ticks,
        io_bytes,
        used_memory_bytes: total.saturating_sub(available),
        total_memory_bytes: total,
        cpus: cpus.max(1),
        at: Instant::now(),
    })
}

pub fn node_rates(earlier: &NodeCounters, later: &NodeCounters) -> LoadRates {
    let secs = later.at.duration_since(earlier.at).as_secs_f64().max(1e-9);
    LoadRates {
        cpu_cores: later.busy_ticks.saturating_sub(earlier.busy_ticks) as f64
            / clock_ticks()
            / secs,
        io_bytes_per_second: later.io_bytes.saturating_sub(earlier.io_bytes) as f64 / secs,
        memory_bytes: later.used_memory_bytes,
    }
}

/// Counters of every process of a node that shares its host with other (fake) nodes, by pid,
/// at one instant: where several nodes share one host, the host's `/proc/stat` is every
/// node's, and only the processes that belong to a node tell its load apart.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProcessSetCounters {
    pub processes: std::collections::BTreeMap<i32, ProcessCounters>,
}

/// The counters of `pids`, skipping those that exit while they are read.
pub fn sample_processes(pids: &[i32]) -> ProcessSetCounters {
    ProcessSetCounters {
        processes: pids
            .iter()
            .filter_map(|&pid| sample_process(pid).ok().map(|c| (pid, c)))
            .collect(),
    }
}

/// The load of a set of processes between two samples: the CPU and I/O each process present
/// in both used in between, over that process's own interval, summed; the resident memory of
/// those in the later sample. A process that started in between is counted from the next
/// interval on, one that ended in between is no longer counted.
pub fn process_set_rates(earlier: &ProcessSetCounters, later: &ProcessSetCounters) -> LoadRates {
    let mut sum = LoadRates::default();
    for (pid, after) in &later.processes {
        sum.memory_bytes += after.rss_bytes;
        if let Some(before) = earlier.processes.get(pid) {
            let r = rates(before, after);
            sum.cpu_cores += r.cpu_cores;
            sum.io_bytes_per_second += r.io_bytes_per_second;
        }
    }
    sum
}

/// CPU cores idle on a node of `cpus` CPUs while `busy_cores` of them were busy (never
/// negative: readings of one interval can round past the total).
pub fn idle_cores(cpus: u64, busy_cores: f64) -> f64 {
    (cpus as f64 - busy_cores).max(0.0)
}

/// I/O rate treated as a fully loaded node in the composite (a local NVMe disk's order).
pub const NOMINAL_IO_BYTES_PER_SECOND: f64 = 1e9;

/// The weighted load sum, normalised to the node's capacity: 1.0 is a fully loaded node.
pub fn composite(rates: &LoadRates, cpus: u64, memory_bytes: u64) -> f64 {
    let cpu = rates.cpu_cores / cpus.max(1) as f64;
    let mem = if memory_bytes > 0 {
        rates.memory_bytes as f64 / memory_bytes as f64
    } else {
        0.0
    };
    let io = rates.io_bytes_per_second / NOMINAL_IO_BYTES_PER_SECOND;
    0.5 * cpu + 0.3 * mem + 0.2 * io.min(1.0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_with_parentheses_in_the_name() {
        let text = "1234 (qemu (x) y) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 4 0 100 123456 789 18446744073709551615";
        assert_eq!(parse_stat(1234, text).unwrap(), (300, 789));
        let err = parse_stat(9, "9 (x) S 1").unwrap_err().to_string();
        assert!(err.contains("/proc/9/stat"), "{err}");
    }

    #[test]
    fn idle_cores_are_the_cpus_not_busy_and_never_negative() {
        assert_eq!(idle_cores(8, 2.5), 5.5);
        assert_eq!(idle_cores(4, 4.01), 0.0);
        assert_eq!(idle_cores(1, 0.0), 1.0);
    }

    #[test]
    fn a_process_sets_load_sums_the_processes_present_in_both_samples() {
        let t0 = Instant::now();
        let t1 = t0 + std::time::Duration::from_secs(2);
        let ticks = clock_ticks() as u64;
        let c = |cpu_ticks: u64, io_bytes: u64, rss_bytes: u64, at: Instant| ProcessCounters {
            cpu_ticks,
            io_bytes,
            rss_bytes,
            at,
        };
        let earlier = ProcessSetCounters {
            processes: [
                (10, c(0, 0, 100, t0)),
                (11, c(ticks, 1000, 100, t0)),
                // Ends before the later sample.
                (12, c(0, 0, 100, t0)),
            ]
            .into_iter()
            .collect(),
        };
        let later = ProcessSetCounters {
            processes: [
                // One core for 2 s.
                (10, c(2 * ticks, 0, 4096, t1)),
                // Half a core, 500 bytes/s.
                (11, c(2 * ticks, 2000, 4096, t1)),
                // Started in between: its memory counts now, its CPU from the next interval.
                (13, c(50 * ticks, 0, 4096, t1)),
            ]
            .into_iter()
            .collect(),
        };
        let r = process_set_rates(&earlier, &later);
        assert!((r.cpu_cores - 1.5).abs() < 1e-9, "{r:?}");
        assert!((r.io_bytes_per_second - 500.0).abs() < 1e-9, "{r:?}");
        assert_eq!(r.memory_bytes, 3 * 4096);
        assert_eq!(
            process_set_rates(&ProcessSetCounters::default(), &later).cpu_cores,
            0.0,
            "nothing to compare with yet"
        );
    }

    #[test]
    fn io_prefers_block_bytes_then_chars() {
        assert_eq!(
            parse_io("rchar: 10\nwchar: 5\nread_bytes: 4096\nwrite_bytes: 8192\n"),
            Some(12288)
        );
        assert_eq!(parse_io("rchar: 10\nwchar: 5\n"), Some(15));
        assert_eq!(parse_io("nothing"), None);
    }

    #[test]
    fn own_process_uses_cpu_when_busy() {
        let pid = std::process::id() as i32;
        let a = sample_process(pid).unwrap();
        let deadline = Instant::now() + std::time::Duration::from_millis(300);
        let mut x = 0u64;
        while Instant::now() < deadline {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1);
        }
        std::hint::black_box(x);
        let b = sample_process(pid).unwrap();
        let r = rates(&a, &b);
        assert!(r.cpu_cores > 0.3, "{r:?}");
        assert!(r.memory_bytes > 0);
        let n = sample_node().unwrap();
        assert!(n.total_memory_bytes > 0 && n.cpus >= 1);
    }
}
