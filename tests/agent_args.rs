//! `commonground agent` settings from the environment: `COMMONGROUND_*`, and `NODE_NAME` as
//! the downward API sets it. Only bad values are tried, which the agent rejects before it
//! connects to a cluster.

use std::process::{Command, Output};

fn agent(env: &[(&str, &str)], args: &[&str]) -> Output {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_commonground"));
    cmd.arg("agent").args(args);
    // Only the variables under test: none inherited from the shell running the tests.
    for var in [
        "NODE_NAME",
        "COMMONGROUND_SCAN_INTERVAL",
        "COMMONGROUND_REGION_PAGES",
    ] {
        cmd.env_remove(var);
    }
    cmd.envs(env.iter().copied())
        .output()
        .expect("run commonground agent")
}

#[test]
fn settings_come_from_commonground_variables() {
    let out = agent(
        &[("NODE_NAME", "n1"), ("COMMONGROUND_SCAN_INTERVAL", "0")],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(
        stderr.contains("--interval must be at least 1 second"),
        "{stderr}"
    );

    let out = agent(
        &[("NODE_NAME", "n1"), ("COMMONGROUND_REGION_PAGES", "0")],
        &[],
    );
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("bad argument"), "{stderr}");
}

#[test]
fn help_names_every_variable() {
    let out = agent(&[], &["--help"]);
    assert!(out.status.success());
    let help = String::from_utf8_lossy(&out.stdout);
    for var in [
        "NODE_NAME",
        "COMMONGROUND_WORK_GROUP_LABEL",
        "COMMONGROUND_REGION_PAGES",
        "COMMONGROUND_CLUSTER_KEY_FILE",
        "COMMONGROUND_SCAN_INTERVAL",
        "COMMONGROUND_HEALTH_ADDR",
        "COMMONGROUND_LOG_FORMAT",
    ] {
        assert!(help.contains(&format!("[env: {var}=")), "{var} in:\n{help}");
    }
    assert!(!help.contains("[env: SCAN_INTERVAL="), "{help}");
}
