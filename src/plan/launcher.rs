//! What a VM's virt-launcher pod asks kube-scheduler for, worked out from the VMI the way
//! KubeVirt's virt-controller renders the pod (KubeVirt v1.6 and v1.7), so that the fit filter
//! compares a node with the pod that will really be scheduled there, not with the guest alone.
//!
//! The memory request is the guest's memory plus an overhead for everything around the guest:
//! - the guest's page tables: one 512th of the VMI's memory request, the request first rounded
//!   up to whole (decimal) kilobytes;
//! - a fixed 220 MiB for the launcher's processes (its monitor 25 MiB, the launcher 100 MiB,
//!   virtlogd 25 MiB, virtqemud 40 MiB and QEMU's own 30 MiB);
//! - 8 MiB per vCPU (sockets × cores × threads; at least one), and 8 MiB for the I/O thread;
//! - 32 MiB of video RAM unless the graphics device is turned off;
//! - 128 MiB for the UEFI flash on arm64;
//! - 1 GiB when a device is passed through with VFIO (GPU, host device or SR-IOV interface),
//!   whose DMA needs the guest's RAM locked;
//! - 1 MiB for a downward-metrics volume; 10 MiB per exec probe and 100 MiB once if there is any;
//! - 256 MiB for an AMD SEV guest, 53 MiB for a TPM, 100 MiB for dedicated CPUs or a
//!   Guaranteed-QoS request;
//! - the sum is finally grown by the cluster's `additionalGuestMemoryOverheadRatio`.
//!
//! With hugepages the guest's memory is asked for as `hugepages-<size>` and only the overhead
//! (plus any request above the guest size) as memory. The guest console logger, a second
//! container KubeVirt adds unless it is turned off, asks for 5m CPU and 35 MB.
//!
//! The CPU request is the VMI's own; without one, every vCPU counts one tenth of a core (the
//! cluster's `cpuAllocationRatio`); dedicated CPUs ask for whole cores. Device-plugin resources
//! (GPUs and host devices by device name) are one per device.

use std::collections::BTreeMap;

const MIB: u64 = 1 << 20;

/// What the launcher's resources depend on, read from the VMI and the KubeVirt CR.
#[derive(Clone, Debug, PartialEq)]
pub struct LauncherSpec {
    /// `spec.domain.resources.requests.memory`.
    pub memory_request: Option<u64>,
    /// `spec.domain.resources.limits.memory`.
    pub memory_limit: Option<u64>,
    /// `spec.domain.memory.guest`.
    pub guest_memory: Option<u64>,
    /// `spec.domain.memory.hugepages.pageSize` as written (`2Mi`, `1Gi`) and in bytes.
    pub hugepage_size: Option<(String, u64)>,
    /// `spec.domain.resources.requests.cpu` / `limits.cpu`, in millicores.
    pub cpu_request_millis: Option<u64>,
    pub cpu_limit_millis: Option<u64>,
    /// Sockets × cores × threads of `spec.domain.cpu`, 0 when the topology is not given.
    pub topology_vcpus: u64,
    pub dedicated_cpus: bool,
    pub isolate_emulator_thread: bool,
    /// Threads of the supplemental I/O thread pool (they get CPU like vCPUs).
    pub io_pool_threads: u64,
    pub graphics: bool,
    /// `arm64`, `amd64`, ...
    pub arch: String,
    /// A GPU, host device or SR-IOV interface is passed through.
    pub vfio: bool,
    pub downward_metrics: bool,
    pub exec_probes: u64,
    pub sev: bool,
    pub tpm: bool,
    /// `spec.domain.resources.overcommitGuestOverhead`: the overhead is left out of the request.
    pub overcommit_guest_overhead: bool,
    /// The guest console logger container is added.
    pub console_logger: bool,
    /// Device-plugin resources named by the VMI's GPUs and host devices, one per device.
    pub devices: Vec<String>,
    /// From the KubeVirt CR: `additionalGuestMemoryOverheadRatio`.
    pub overhead_ratio: Option<f64>,
    /// `developerConfiguration.memoryOvercommit` in percent (100: none).
    pub memory_overcommit_percent: u64,
    /// `developerConfiguration.cpuAllocationRatio` (10 by default).
    pub cpu_allocation_ratio: u64,
}

impl Default for LauncherSpec {
    fn default() -> Self {
        Self {
            memory_request: None,
            memory_limit: None,
            guest_memory: None,
            hugepage_size: None,
            cpu_request_millis: None,
            cpu_limit_millis: None,
            topology_vcpus: 0,
            dedicated_cpus: false,
            isolate_emulator_thread: false,
            io_pool_threads: 0,
            graphics: true,
            arch: "amd64".into(),
            vfio: false,
            downward_metrics: false,
            exec_probes: 0,
            sev: false,
            tpm: false,
            overcommit_guest_overhead: false,
            console_logger: true,
            devices: Vec::new(),
            overhead_ratio: None,
            memory_overcommit_percent: 100,
            cpu_allocation_ratio: 10,
        }
    }
}

/// The launcher pod's requests.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct LauncherRequests {
    pub cpu_millis: u64,
    /// The pod's memory request: guest (unless in hugepages) + overhead + console logger.
    pub memory_bytes: u64,
    /// The overhead part of it (for reasons a person reads).
    pub overhead_bytes: u64,
    /// `hugepages-<size>` in bytes and device-plugin resources in units.
    pub scalar: BTreeMap<String, u64>,
}

/// Memory the console logger container asks for (35 MB, decimal), and CPU.
pub const CONSOLE_LOGGER_MEMORY: u64 = 35_000_000;
pub const CONSOLE_LOGGER_CPU_MILLIS: u64 = 5;
/// With dedicated CPUs or Guaranteed QoS the logger's requests equal its limits.
pub const CONSOLE_LOGGER_MEMORY_GUARANTEED: u64 = 60_000_000;
pub const CONSOLE_LOGGER_CPU_MILLIS_GUARANTEED: u64 = 15;

impl LauncherSpec {
    /// vCPUs as KubeVirt counts them for the overhead: the topology, else the whole cores
    /// of the CPU limit or request, at least one.
    pub fn vcpus(&self) -> u64 {
        let from_resources = || {
            self.cpu_limit_millis
                .or(self.cpu_request_millis)
                .map_or(0, |m| m / 1000)
        };
        let v = if self.topology_vcpus > 0 {
            self.topology_vcpus
        } else {
            from_resources()
        };
        v.max(1)
    }

    /// CPU and memory requests equal their limits: KubeVirt gives the pod Guaranteed QoS.
    pub fn wants_guaranteed_qos(&self) -> bool {
        let memory = match (self.memory_request.filter(|&r| r > 0), self.memory_limit) {
            (None, Some(l)) => l > 0,
            (Some(r), l) => Some(r) == l,
            (None, None) => false,
        };
        let cpu = self.cpu_request_millis.filter(|&r| r > 0).is_some()
            && self.cpu_request_millis == self.cpu_limit_millis;
        memory && cpu
    }

    /// The memory KubeVirt adds to the guest's for the launcher pod.
    pub fn memory_overhead(&self) -> u64 {
        let request = self.memory_request.unwrap_or(0);
        let mut o = request.div_ceil(1000) * 1000 / 512;
        o += (25 + 100 + 25 + 40 + 30) * MIB;
        o += 8 * MIB * self.vcpus();
        o += 8 * MIB;
        if self.graphics {
            o += 32 * MIB;
        }
        if self.arch == "arm64" {
            o += 128 * MIB;
        }
        if self.vfio {
            o += 1 << 30;
        }
        if self.downward_metrics {
            o += MIB;
        }
        if self.exec_probes > 0 {
            o += 10 * MIB * self.exec_probes + 100 * MIB;
        }
        if self.sev {
            o += 256 * MIB;
        }
        if self.tpm {
            o += 53 * MIB;
        }
        if self.dedicated_cpus || self.wants_guaranteed_qos() {
            o += 100 * MIB;
        }
        if let Some(ratio) = self.overhead_ratio.filter(|r| r.is_finite() && *r > 0.0) {
            // Grown in whole kilobytes: the overhead in kilobytes (rounded up) times the
            // ratio's excess over one, truncated.
            let extra_kb = (o.div_ceil(1000) as f64 * (ratio - 1.0)) as i64;
            o = (o as i64 + extra_kb * 1000).max(0) as u64;
        }
        o
    }

    /// The requests of the launcher pod KubeVirt renders for this VMI.
    pub fn requests(&self) -> LauncherRequests {
        let overhead = self.memory_overhead();
        let guaranteed = self.wants_guaranteed_qos();
        // The guest's share of the request: as asked, else the limit, else the guest size
        // (or one hugepage) under the cluster's memory overcommit.
        let asked = self
            .memory_request
            .filter(|&r| r > 0)
            .or(self.memory_limit.filter(|&l| l > 0))
            .or_else(|| {
                let m = self
                    .guest_memory
                    .or(self.hugepage_size.as_ref().map(|(_, b)| *b))?;
                let pct = self.memory_overcommit_percent.max(1);
                Some(if pct == 100 { m } else { m * 100 / pct })
            })
            .unwrap_or(0);
        let mut scalar = BTreeMap::new();
        let mut memory = match &self.hugepage_size {
            Some((size, _)) => {
                let guest = self.guest_memory.unwrap_or(u64::MAX);
                scalar.insert(format!("hugepages-{size}"), asked.min(guest));
                overhead + asked.saturating_sub(guest)
            }
            None if self.overcommit_guest_overhead => asked,
            None => asked + overhead,
        };
        let vcpus = self.topology_vcpus + self.io_pool_threads;
        let mut cpu = if self.dedicated_cpus && self.topology_vcpus > 0 {
            vcpus * 1000
        } else if self.dedicated_cpus {
            self.cpu_request_millis.unwrap_or(0) + self.io_pool_threads * 1000
        } else {
            match self.cpu_request_millis {
                Some(r) => r,
                None if vcpus > 0 => vcpus * 1000 / self.cpu_allocation_ratio.max(1),
                None => 0,
            }
        };
        if self.dedicated_cpus && self.isolate_emulator_thread {
            cpu += 1000;
        }
        if self.console_logger {
            if self.dedicated_cpus || guaranteed {
                memory += CONSOLE_LOGGER_MEMORY_GUARANTEED;
                cpu += CONSOLE_LOGGER_CPU_MILLIS_GUARANTEED;
            } else {
                memory += CONSOLE_LOGGER_MEMORY;
                cpu += CONSOLE_LOGGER_CPU_MILLIS;
            }
        }
        for d in &self.devices {
            *scalar.entry(d.clone()).or_insert(0) += 1;
        }
        LauncherRequests {
            cpu_millis: cpu,
            memory_bytes: memory,
            overhead_bytes: overhead,
            scalar,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const GIB: u64 = 1 << 30;

    fn plain(memory: u64, vcpus: u64) -> LauncherSpec {
        LauncherSpec {
            memory_request: Some(memory),
            guest_memory: Some(memory),
            topology_vcpus: vcpus,
            ..LauncherSpec::default()
        }
    }

    #[test]
    fn overhead_of_a_plain_vm_counts_page_tables_processes_vcpus_and_video() {
        // 4 GiB: page tables 4294968000 / 512 = 8388609 bytes; 220 MiB fixed; 2 × 8 MiB vCPUs;
        // 8 MiB I/O thread; 32 MiB video.
        let o = plain(4 * GIB, 2).memory_overhead();
        assert_eq!(o, 8_388_609 + (220 + 16 + 8 + 32) * MIB);
    }

    #[test]
    fn overhead_adds_vfio_probes_tpm_sev_and_dedicated_cpus() {
        let base = plain(GIB, 1).memory_overhead();
        let mut s = plain(GIB, 1);
        s.vfio = true;
        assert_eq!(s.memory_overhead() - base, GIB);
        let mut s = plain(GIB, 1);
        s.exec_probes = 2;
        assert_eq!(s.memory_overhead() - base, 120 * MIB);
        let mut s = plain(GIB, 1);
        s.tpm = true;
        s.sev = true;
        s.downward_metrics = true;
        assert_eq!(s.memory_overhead() - base, (53 + 256 + 1) * MIB);
        let mut s = plain(GIB, 1);
        s.dedicated_cpus = true;
        assert_eq!(s.memory_overhead() - base, 100 * MIB);
        let mut s = plain(GIB, 1);
        s.graphics = false;
        s.arch = "arm64".into();
        assert_eq!(s.memory_overhead() + 32 * MIB - 128 * MIB, base);
    }

    #[test]
    fn vcpus_fall_back_to_whole_cores_of_the_cpu_limit_then_one() {
        let mut s = plain(GIB, 0);
        assert_eq!(s.vcpus(), 1);
        s.cpu_request_millis = Some(2500);
        assert_eq!(s.vcpus(), 2);
        s.cpu_limit_millis = Some(4000);
        assert_eq!(s.vcpus(), 4);
    }

    #[test]
    fn overhead_ratio_grows_the_overhead_in_whole_kilobytes() {
        let base = plain(GIB, 1).memory_overhead();
        let mut s = plain(GIB, 1);
        s.overhead_ratio = Some(1.5);
        let grown = s.memory_overhead();
        assert_eq!(grown, base + (base.div_ceil(1000) / 2) * 1000);
    }

    #[test]
    fn pod_memory_request_is_guest_plus_overhead_plus_console_logger() {
        let s = plain(4 * GIB, 2);
        let r = s.requests();
        assert_eq!(r.overhead_bytes, s.memory_overhead());
        assert_eq!(
            r.memory_bytes,
            4 * GIB + r.overhead_bytes + CONSOLE_LOGGER_MEMORY
        );
        // No CPU request: a tenth of a core per vCPU, plus the logger's 5m.
        assert_eq!(r.cpu_millis, 200 + 5);
        assert!(r.scalar.is_empty());
        let mut s = plain(4 * GIB, 2);
        s.console_logger = false;
        s.overcommit_guest_overhead = true;
        assert_eq!(s.requests().memory_bytes, 4 * GIB);
    }

    #[test]
    fn hugepages_take_the_guest_and_memory_only_the_overhead() {
        let mut s = plain(8 * GIB, 4);
        s.hugepage_size = Some(("1Gi".into(), GIB));
        s.console_logger = false;
        let r = s.requests();
        assert_eq!(r.scalar["hugepages-1Gi"], 8 * GIB);
        assert_eq!(r.memory_bytes, r.overhead_bytes);
        // A request above the guest size: the excess goes to memory.
        s.memory_request = Some(9 * GIB);
        let r = s.requests();
        assert_eq!(r.scalar["hugepages-1Gi"], 8 * GIB);
        assert_eq!(r.memory_bytes, r.overhead_bytes + GIB);
    }

    #[test]
    fn dedicated_cpus_ask_whole_cores_and_devices_one_each() {
        let mut s = plain(GIB, 4);
        s.dedicated_cpus = true;
        s.isolate_emulator_thread = true;
        s.devices = vec!["nvidia.com/A100".into(), "nvidia.com/A100".into()];
        let r = s.requests();
        assert_eq!(
            r.cpu_millis,
            5000 + CONSOLE_LOGGER_CPU_MILLIS_GUARANTEED,
            "4 vCPUs, the emulator thread, the logger at its limit"
        );
        assert_eq!(r.scalar["nvidia.com/A100"], 2);
    }

    #[test]
    fn no_memory_request_uses_the_guest_under_overcommit() {
        let s = LauncherSpec {
            guest_memory: Some(2 * GIB),
            memory_overcommit_percent: 200,
            console_logger: false,
            ..LauncherSpec::default()
        };
        let r = s.requests();
        assert_eq!(r.memory_bytes, GIB + r.overhead_bytes);
    }
}
