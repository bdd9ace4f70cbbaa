//! Finding the QEMU processes of KubeVirt VMs on this node. virt-launcher starts QEMU through
//! libvirt with `-name guest=<namespace>_<name>[,debug-threads=on]`, so the domain name gives the
//! VMI; namespaces are DNS labels and never contain `_`, so the first `_` separates the two.

use crate::plan::VmKey;

/// A QEMU process and the VMI it runs.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct QemuProcess {
    pub pid: i32,
    pub vm: VmKey,
}

/// The VMI named by a QEMU command line, if it has a KubeVirt domain name.
pub fn vm_from_argv<S: AsRef<str>>(argv: &[S]) -> Option<VmKey> {
    let mut args = argv.iter().map(AsRef::as_ref);
    while let Some(arg) = args.next() {
        let value = if arg == "-name" || arg == "--name" {
            args.next()?
        } else if let Some(v) = arg.strip_prefix("-name=") {
            v
        } else {
            continue;
        };
        // `guest=ns_name,debug-threads=on`, or the legacy bare form `ns_name`.
        let domain = value
            .split(',')
            .find_map(|opt| opt.strip_prefix("guest="))
            .or_else(|| value.split(',').next().filter(|v| !v.contains('=')))?;
        let (ns, name) = domain.split_once('_')?;
        if ns.is_empty() || name.is_empty() {
            return None;
        }
        return Some(VmKey::new(ns, name));
    }
    None
}

/// The NUL-separated `/proc/<pid>/cmdline` as arguments.
pub fn read_argv(pid: i32) -> std::io::Result<Vec<String>> {
    let raw = std::fs::read(format!("/proc/{pid}/cmdline"))?;
    Ok(raw
        .split(|b| *b == 0)
        .filter(|a| !a.is_empty())
        .map(|a| String::from_utf8_lossy(a).into_owned())
        .collect())
}

/// Whether a process looks like QEMU (for `digest --pid`: guest RAM rather than private memory).
pub fn is_qemu(argv: &[String]) -> bool {
    vm_from_argv(argv).is_some()
        || argv
            .first()
            .map(|a| a.rsplit('/').next().unwrap_or(a).starts_with("qemu"))
            .unwrap_or(false)
}

/// Whether `argv` has `arg` followed by `value` (`arg value` or `arg=value`).
pub fn argv_has<S: AsRef<str>>(argv: &[S], arg: &str, value: &str) -> bool {
    let mut args = argv.iter().map(AsRef::as_ref);
    while let Some(a) = args.next() {
        if a == arg {
            if args.next() == Some(value) {
                return true;
            }
        } else if a.strip_prefix(arg).and_then(|r| r.strip_prefix('=')) == Some(value) {
            return true;
        }
    }
    false
}

/// Every process on the host whose command line names a KubeVirt guest. Processes that vanish
/// or cannot be read while we look are skipped.
pub fn find_qemu_processes() -> std::io::Result<Vec<QemuProcess>> {
    find_qemu_processes_with(None)
}

/// Like [`find_qemu_processes`], keeping only processes whose command line has
/// `node_arg.0` followed by `node_arg.1`: where several (fake) nodes share one host, as in the
/// e2e suite and the local demo, that argument tells whose process it is.
pub fn find_qemu_processes_with(
    node_arg: Option<(&str, &str)>,
) -> std::io::Result<Vec<QemuProcess>> {
    let mut out = Vec::new();
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        let Ok(argv) = read_argv(pid) else { continue };
        if let Some((arg, value)) = node_arg {
            if !argv_has(&argv, arg, value) {
                continue;
            }
        }
        if let Some(vm) = vm_from_argv(&argv) {
            out.push(QemuProcess { pid, vm });
        }
    }
    out.sort_by_key(|p| p.pid);
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn kubevirt_domain_names_map_to_vmis() {
        let argv = [
            "/usr/bin/qemu-system-x86_64",
            "-name",
            "guest=default_my_vm,debug-threads=on",
            "-S",
        ];
        assert_eq!(vm_from_argv(&argv), Some(VmKey::new("default", "my_vm")));
        assert_eq!(
            vm_from_argv(&["qemu", "-name", "guest=ns1_vm1"]),
            Some(VmKey::new("ns1", "vm1"))
        );
        assert_eq!(
            vm_from_argv(&["qemu", "-name", "ns_vm"]),
            Some(VmKey::new("ns", "vm"))
        );
    }

    #[test]
    fn other_command_lines_are_not_vms() {
        assert_eq!(vm_from_argv(&["bash", "-c", "sleep 1"]), None);
        assert_eq!(vm_from_argv(&["qemu", "-name"]), None);
        assert_eq!(vm_from_argv(&["qemu", "-name", "guest=novm"]), None);
        assert_eq!(vm_from_argv(&["qemu", "-name", "guest=_x"]), None);
    }

    #[test]
    fn node_argument_selects_processes_of_one_fake_node() {
        let argv = ["vm-memory", "-name", "guest=ns_a", "--e2e-node", "n1"];
        assert!(argv_has(&argv, "--e2e-node", "n1"));
        assert!(!argv_has(&argv, "--e2e-node", "n2"));
        assert!(argv_has(&["x", "--e2e-node=n2"], "--e2e-node", "n2"));
        assert!(!argv_has(&["x", "--e2e-node-x=n2"], "--e2e-node", "n2"));
        assert!(!argv_has(&["x", "--e2e-node"], "--e2e-node", "n1"));
        assert!(!argv_has(&["x", "n1", "--e2e-node"], "--e2e-node", "n1"));
    }
}
