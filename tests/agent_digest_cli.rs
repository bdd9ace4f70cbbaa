//! `commonground digest` against real processes: exact overlap, clear errors.

mod helpers;

use helpers::{Holder, HolderSpec, MIB, REGION};
use std::process::Command;

fn digest(args: &[String]) -> std::process::Output {
    Command::new(env!("CARGO_BIN_EXE_commonground"))
        .arg("digest")
        .args(args)
        .output()
        .expect("run commonground digest")
}

#[test]
fn two_processes_holding_the_same_image_overlap_exactly() {
    let a = Holder::start(HolderSpec {
        vm: Some(("ns", "a")),
        image_seed: 11,
        image_mib: 24,
        private_seed: 100,
        private_mib: 8,
        ..Default::default()
    });
    let b = Holder::start(HolderSpec {
        vm: Some(("ns", "b")),
        image_seed: 11,
        image_mib: 24,
        private_seed: 200,
        private_mib: 16,
        backing: "memfd",
    });
    let out = digest(&[
        "--pid".into(),
        a.pid().to_string(),
        "--pid".into(),
        b.pid().to_string(),
        "--json".into(),
    ]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let sources = v["sources"].as_array().unwrap();
    assert_eq!(sources[0]["name"], format!("pid:{}", a.pid()));
    assert_eq!(
        sources[0]["bytes"],
        32 * MIB,
        "only the guest RAM mapping is scanned"
    );
    assert_eq!(sources[0]["regions"], 32 * MIB / REGION);
    assert_eq!(sources[0]["zero_regions"], 0);
    assert_eq!(sources[1]["bytes"], 40 * MIB);
    let pair = &v["pairs"][0];
    assert_eq!(pair["common_regions"], 24 * MIB / REGION);
    assert_eq!(pair["common_bytes"], 24 * MIB);
    let est = pair["estimated_common_regions"].as_f64().unwrap();
    assert!(
        (est - 384.0).abs() < 1e-9,
        "sampled completely at this size: {est}"
    );
}

#[test]
fn a_process_that_is_not_qemu_is_scanned_by_its_private_memory() {
    let a = Holder::start(HolderSpec {
        image_mib: 4,
        ..Default::default()
    });
    let out = digest(&["--pid".into(), a.pid().to_string(), "--json".into()]);
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout).unwrap();
    let bytes = v["sources"][0]["bytes"].as_u64().unwrap();
    assert!(
        bytes > 4 * MIB,
        "private memory includes heap, stack and data: {bytes}"
    );
    assert_eq!(v["pairs"].as_array().unwrap().len(), 0);
}

#[test]
fn a_pid_that_does_not_exist_is_named_in_the_error() {
    let mut gone = Command::new("true").spawn().unwrap();
    let pid = gone.id();
    gone.wait().unwrap();
    let out = digest(&["--pid".into(), pid.to_string()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {pid}")) && err.contains("no such process"),
        "{err}"
    );
}

#[test]
fn a_pid_we_may_not_read_is_named_in_the_error() {
    // SAFETY: getuid has no preconditions.
    if unsafe { libc::getuid() } != 0 {
        eprintln!("SKIPPED: needs root to run the digest as another user");
        return;
    }
    let a = Holder::start(HolderSpec {
        image_mib: 1,
        ..Default::default()
    });
    use std::os::unix::process::CommandExt;
    let out = Command::new(env!("CARGO_BIN_EXE_commonground"))
        .args(["digest", "--pid", &a.pid().to_string()])
        .uid(65534)
        .gid(65534)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        err.contains(&format!("pid {}", a.pid())) && err.contains("permission denied"),
        "{err}"
    );
}

#[test]
fn an_unreadable_file_is_named_in_the_error() {
    let out = digest(&["--file".into(), "/nonexistent/guest.img".into()]);
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("/nonexistent/guest.img"), "{err}");
}
