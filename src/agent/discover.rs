//! Finding the QEMU processes of KubeVirt VMs on this node. virt-launcher starts QEMU through
//! libvirt with `-name guest=<namespace>_<name>[,debug-threads=on]`, so the domain name gives the
//! VMI; namespaces are DNS labels and never contain `_`, so the first `_` separates the two.
//!
//! The command line also says how much guest RAM QEMU maps, and in how many blocks
//! ([`guest_ram_blocks`]): `-m`, memory backend objects, `-machine memory-backend=` and
//! `-numa node,memdev=`. [`super::proc_maps`] finds the mappings of those sizes.

use serde_json::Value;

use crate::plan::VmKey;

/// QEMU's guest RAM without `-m`.
pub const QEMU_DEFAULT_RAM_BYTES: u64 = 128 << 20;

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
    vm_from_argv(argv).is_some() || looks_like_qemu(argv)
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

/// The sizes of the guest RAM blocks a QEMU command line declares, `None` when it declares
/// none we can size (not QEMU, or a malformed size).
///
/// One block per memory backend object (`-object memory-backend-{ram,memfd,file},size=..`,
/// keyval or JSON). The base RAM (`-m`, in MiB without a suffix; 128 MiB by default) is one
/// more block unless backends hold it: the one `-machine memory-backend=` names (its size may
/// be left to `-m`), or those of the NUMA cells (`-numa node,memdev=`, which sum to `-m`).
pub fn guest_ram_blocks<S: AsRef<str>>(argv: &[S]) -> Option<Vec<u64>> {
    let mut base: Option<Option<u64>> = None;
    let mut backends: Vec<MemoryBackend> = Vec::new();
    let mut machine_backend: Option<String> = None;
    let mut numa_backed = false;
    let mut args = argv.iter().map(AsRef::as_ref);
    while let Some(arg) = args.next() {
        // QEMU takes `-opt` and `--opt`, always with the value as the next argument.
        let Some(opt) = arg.strip_prefix("--").or_else(|| arg.strip_prefix('-')) else {
            continue;
        };
        match opt {
            "m" => base = Some(args.next().and_then(ram_size_option)),
            "object" => backends.extend(args.next().and_then(memory_backend)),
            "machine" | "M" => {
                if let Some(id) = args.next().and_then(|v| option_value(v, "memory-backend")) {
                    machine_backend = Some(id);
                }
            }
            "numa" => {
                numa_backed |= args
                    .next()
                    .is_some_and(|v| option_value(v, "memdev").is_some());
            }
            _ => {}
        }
    }
    let base_size = match base {
        Some(size) => size,
        None if looks_like_qemu(argv) => Some(QEMU_DEFAULT_RAM_BYTES),
        None => None,
    };
    let mut blocks = Vec::new();
    if machine_backend.is_none() && !numa_backed {
        blocks.extend(base_size);
    }
    for backend in backends {
        // The machine's backend must be as large as `-m`, which may size it instead.
        let size = backend.size.or_else(|| {
            (machine_backend.as_deref() == Some(backend.id.as_str()))
                .then_some(base_size)
                .flatten()
        });
        blocks.extend(size);
    }
    (!blocks.is_empty()).then_some(blocks)
}

/// A memory backend object from the command line; `size` is `None` when the file sizes it.
struct MemoryBackend {
    id: String,
    size: Option<u64>,
}

/// `-object` value: a memory backend, in QEMU's keyval (`memory-backend-ram,id=x,size=1G`) or
/// JSON (`{"qom-type":"memory-backend-memfd","id":"x","size":1073741824}`) form.
fn memory_backend(value: &str) -> Option<MemoryBackend> {
    let (qom_type, id, size) = if value.trim_start().starts_with('{') {
        let json: Value = serde_json::from_str(value).ok()?;
        let size = match &json["size"] {
            Value::Number(n) => Some(n.as_u64()?),
            Value::String(s) => Some(parse_size(s, 1)?),
            _ => None,
        };
        (
            json["qom-type"].as_str()?.to_string(),
            json["id"].as_str()?.to_string(),
            size,
        )
    } else {
        let fields = keyval(value);
        let qom_type = fields.iter().find_map(|(k, v)| match (k.as_str(), v) {
            ("qom-type", Some(t)) => Some(t.clone()),
            (t, None) => Some(t.to_string()),
            _ => None,
        })?;
        let id = option_value(value, "id")?;
        let size = match option_value(value, "size") {
            Some(s) => Some(parse_size(&s, 1)?),
            None => None,
        };
        (qom_type, id, size)
    };
    qom_type
        .starts_with("memory-backend-")
        .then_some(MemoryBackend { id, size })
}

/// `-m` value: `2048` (MiB), `2G`, `size=2048M,slots=4,maxmem=8G`; `None` if malformed.
fn ram_size_option(value: &str) -> Option<u64> {
    let size = keyval(value).into_iter().find_map(|(k, v)| match v {
        Some(v) if k == "size" => Some(v),
        None => Some(k),
        _ => None,
    })?;
    parse_size(&size, 1 << 20)
}

/// The value of `key` in a keyval option string (`a,key=value,b=c`) or in a JSON object.
fn option_value(value: &str, key: &str) -> Option<String> {
    if value.trim_start().starts_with('{') {
        let json: Value = serde_json::from_str(value).ok()?;
        return json[key].as_str().map(str::to_string);
    }
    keyval(value)
        .into_iter()
        .find_map(|(k, v)| (k == key).then_some(v).flatten())
}

/// Splits QEMU's keyval syntax: `,`-separated `key=value` items, `,,` for a literal comma; an
/// item without `=` has no value (the implied first key, such as a type or `-m`'s size).
fn keyval(value: &str) -> Vec<(String, Option<String>)> {
    let mut items = Vec::new();
    let mut item = String::new();
    let mut chars = value.chars().peekable();
    loop {
        let c = chars.next();
        if c == Some(',') && chars.peek() == Some(&',') {
            chars.next();
            item.push(',');
        } else if let Some(c) = c.filter(|c| *c != ',') {
            item.push(c);
        } else {
            if !item.is_empty() {
                items.push(match item.split_once('=') {
                    Some((k, v)) => (k.to_string(), Some(v.to_string())),
                    None => (item.clone(), None),
                });
            }
            item.clear();
            if c.is_none() {
                return items;
            }
        }
    }
}

/// A QEMU size: a number with an optional suffix (`B`, `K`, `M`, `G`, `T`, any case), in
/// `default_unit` bytes without one; fractions such as `1.5G` are allowed. `None` if malformed
/// or beyond `u64`.
fn parse_size(text: &str, default_unit: u64) -> Option<u64> {
    let text = text.trim();
    let (number, unit) = match text.chars().last()?.to_ascii_uppercase() {
        'B' => (&text[..text.len() - 1], 1u64),
        'K' => (&text[..text.len() - 1], 1 << 10),
        'M' => (&text[..text.len() - 1], 1 << 20),
        'G' => (&text[..text.len() - 1], 1 << 30),
        'T' => (&text[..text.len() - 1], 1 << 40),
        c if c.is_ascii_digit() => (text, default_unit),
        _ => return None,
    };
    if let Ok(n) = number.parse::<u64>() {
        return n.checked_mul(unit);
    }
    let n: f64 = number.parse().ok()?;
    let bytes = n * unit as f64;
    (n.is_finite() && n >= 0.0 && bytes < u64::MAX as f64).then_some(bytes as u64)
}

/// Whether the program run is QEMU, by its file name.
fn looks_like_qemu<S: AsRef<str>>(argv: &[S]) -> bool {
    argv.first()
        .map(|a| {
            let a = a.as_ref();
            a.rsplit('/').next().unwrap_or(a).starts_with("qemu")
        })
        .unwrap_or(false)
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
    for_each_process(|pid, argv| {
        if node_arg.is_some_and(|(arg, value)| !argv_has(argv, arg, value)) {
            return;
        }
        if let Some(vm) = vm_from_argv(argv) {
            out.push(QemuProcess { pid, vm });
        }
    })?;
    out.sort_by_key(|p| p.pid);
    Ok(out)
}

/// Every process on the host whose command line has `node_arg.0` followed by `node_arg.1`,
/// QEMU or not: where several (fake) nodes share one host, the processes that make up one
/// node, whose sum is its load.
pub fn processes_with(node_arg: (&str, &str)) -> std::io::Result<Vec<i32>> {
    let mut out = Vec::new();
    for_each_process(|pid, argv| {
        if argv_has(argv, node_arg.0, node_arg.1) {
            out.push(pid);
        }
    })?;
    out.sort_unstable();
    Ok(out)
}

/// Calls `visit(pid, argv)` for every process in /proc whose command line can be read (those
/// that exit while we look are skipped).
fn for_each_process(mut visit: impl FnMut(i32, &[String])) -> std::io::Result<()> {
    for entry in std::fs::read_dir("/proc")? {
        let Ok(entry) = entry else { continue };
        let Some(pid) = entry
            .file_name()
            .to_str()
            .and_then(|s| s.parse::<i32>().ok())
        else {
            continue;
        };
        if let Ok(argv) = read_argv(pid) {
            visit(pid, &argv);
        }
    }
    Ok(())
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

    const GIB: u64 = 1 << 30;
    const MIB: u64 = 1 << 20;

    fn argv(line: &str) -> Vec<String> {
        line.split_whitespace().map(str::to_string).collect()
    }

    #[test]
    fn ram_of_virt_launcher_command_lines() {
        // libvirt 9/10 under KubeVirt: the RAM in a JSON memory backend the machine names.
        let kubevirt = argv(
            r#"/usr/libexec/qemu-kvm -name guest=default_vm-a,debug-threads=on -S
            -object {"qom-type":"secret","id":"masterKey0","format":"raw","file":"/var/run/kubevirt-private/libvirt/qemu/lib/domain-1-default_vm-a/master-key.aes"}
            -machine pc-q35-rhel9.4.0,usb=off,dump-guest-core=off,memory-backend=pc.ram,hpet=off,acpi=on
            -accel kvm -cpu host,migratable=on -m size=2097152k
            -object {"qom-type":"memory-backend-ram","id":"pc.ram","size":2147483648}
            -overcommit mem-lock=off -smp 1,sockets=1,dies=1,cores=1,threads=1
            -object {"qom-type":"iothread","id":"iothread1"} -uuid 5f1c1d36-9f5b-4d47-a0b4-5e3ad0d6e1c1
            -no-user-config -nodefaults"#,
        );
        assert_eq!(guest_ram_blocks(&kubevirt), Some(vec![2 * GIB]));
        // Huge pages: a file backend on hugetlbfs.
        let hugepages = argv(
            r#"/usr/libexec/qemu-kvm -name guest=ns_vm -machine pc-q35-rhel9.4.0,memory-backend=pc.ram
            -m size=4194304k
            -object {"qom-type":"memory-backend-file","id":"pc.ram","mem-path":"/dev/hugepages/libvirt/qemu/1-ns_vm","prealloc":true,"size":4294967296}"#,
        );
        assert_eq!(guest_ram_blocks(&hugepages), Some(vec![4 * GIB]));
        // Older libvirt: plain `-m` in MiB, anonymous RAM.
        let plain = argv("/usr/bin/qemu-system-x86_64 -name guest=ns_vm,debug-threads=on -machine pc-i440fx-6.2,accel=kvm,usb=off,dump-guest-core=off -m 2048 -realtime mlock=off");
        assert_eq!(guest_ram_blocks(&plain), Some(vec![2048 * MIB]));
    }

    #[test]
    fn ram_split_over_numa_cells_and_dimms() {
        // Two NUMA cells: their backends hold the RAM, `-m` is their sum and no block of its own.
        let numa = argv(
            r#"qemu-kvm -name guest=ns_vm -m size=4194304k
            -object {"qom-type":"memory-backend-memfd","id":"ram-node0","share":true,"size":2147483648}
            -numa node,nodeid=0,cpus=0,memdev=ram-node0
            -object {"qom-type":"memory-backend-memfd","id":"ram-node1","share":true,"size":2147483648}
            -numa node,nodeid=1,cpus=1,memdev=ram-node1"#,
        );
        assert_eq!(guest_ram_blocks(&numa), Some(vec![2 * GIB, 2 * GIB]));
        // Base RAM from `-m` with hot-plug room, plus a DIMM's backend (keyval form).
        let dimm = argv(
            "qemu-system-x86_64 -m size=1048576k,slots=16,maxmem=4194304k \
             -object memory-backend-ram,id=memdimm0,size=536870912 \
             -device pc-dimm,node=0,memdev=memdimm0,id=dimm0,slot=0",
        );
        assert_eq!(guest_ram_blocks(&dimm), Some(vec![GIB, 512 * MIB]));
        // The machine's backend without a size takes `-m`'s.
        let sized_by_m = argv(
            "qemu-system-x86_64 -machine pc,memory-backend=ram0 -m 384M \
             -object memory-backend-file,id=ram0,mem-path=/tmp/ram,share=on",
        );
        assert_eq!(guest_ram_blocks(&sized_by_m), Some(vec![384 * MIB]));
    }

    #[test]
    fn ram_size_forms() {
        for (m, bytes) in [
            ("2048", 2048 * MIB),
            ("2G", 2 * GIB),
            ("2g", 2 * GIB),
            ("size=2097152k", 2 * GIB),
            ("size=2048M,slots=4,maxmem=8G", 2 * GIB),
            ("slots=4,size=1G", GIB),
            ("1.5G", 3 * GIB / 2),
            ("256M", 256 * MIB),
        ] {
            assert_eq!(
                guest_ram_blocks(&["qemu-system-x86_64", "-m", m]),
                Some(vec![bytes]),
                "-m {m}"
            );
        }
        assert_eq!(
            guest_ram_blocks(&[
                "qemu",
                "-object",
                "memory-backend-ram,id=a,size=1G",
                "-machine",
                "q35,memory-backend=a"
            ]),
            Some(vec![GIB]),
        );
        assert_eq!(
            guest_ram_blocks(&[
                "qemu",
                "-object",
                r#"{"qom-type":"memory-backend-ram","id":"a","size":"512M"}"#,
                "-machine",
                "memory-backend=a"
            ]),
            Some(vec![512 * MIB]),
        );
    }

    #[test]
    fn ram_default_and_unknown() {
        // QEMU without -m has 128 MiB.
        assert_eq!(
            guest_ram_blocks(&["/usr/bin/qemu-system-x86_64", "-name", "guest=ns_vm"]),
            Some(vec![QEMU_DEFAULT_RAM_BYTES])
        );
        // Not QEMU and no memory options (the e2e stand-in, any process): unknown.
        assert_eq!(
            guest_ram_blocks(&["vm-memory", "-name", "guest=ns_vm"]),
            None
        );
        assert_eq!(guest_ram_blocks::<&str>(&[]), None);
        // Malformed sizes are unknown, never a panic.
        for m in [
            "",
            "G",
            "-1",
            "lots",
            "99999999999999999999",
            "18446744073709551615G",
            "1é",
            "size=",
        ] {
            assert_eq!(guest_ram_blocks(&["qemu", "-m", m]), None, "-m {m:?}");
        }
        assert_eq!(guest_ram_blocks(&["qemu", "-m"]), None);
        assert_eq!(
            guest_ram_blocks(&["qemu", "-object", "{not json", "-object", "iothread,id=io1"]),
            Some(vec![QEMU_DEFAULT_RAM_BYTES])
        );
        // A backend with a malformed size is left out; the base RAM still counts.
        assert_eq!(
            guest_ram_blocks(&[
                "qemu",
                "-m",
                "1G",
                "-object",
                "memory-backend-ram,id=d,size=x"
            ]),
            Some(vec![GIB])
        );
    }

    #[test]
    fn keyval_commas() {
        assert_eq!(
            keyval("file,mem-path=/a,,b,size=1"),
            vec![
                ("file".to_string(), None),
                ("mem-path".to_string(), Some("/a,b".to_string())),
                ("size".to_string(), Some("1".to_string())),
            ]
        );
        assert_eq!(keyval(""), vec![]);
        assert_eq!(keyval(",,"), vec![(",".to_string(), None)]);
    }
}
