//! The install artifacts against the real API server of the harness:
//! - every object in `deploy/` is accepted by a server-side dry-run apply;
//! - every object the chart renders with all of its options on is accepted too (kinds whose
//!   API the harness does not serve, e.g. cert-manager's Certificate, are named and skipped);
//! - the controller, extender and agent come up as local processes from the arguments and
//!   environment of the rendered Deployments and DaemonSet, each authenticated as its own
//!   ServiceAccount with the chart's RBAC, so a missing permission fails here: the agent
//!   publishes its digest, the controller finalizes, fails (no such VMI) and releases a
//!   VirtualMachineMigration and records an Event about it.
//!
//! kubectl (built by the harness next to the control plane) applies the YAML; this crate has
//! no YAML parser, and `kubectl apply -o json` hands the applied objects back as JSON.

use std::io::Write;
use std::net::TcpListener;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use anyhow::{anyhow, bail, Context};
use commonground_e2e::{wait_for, FakeNode, TestCluster, TestNamespace};
use k8s_openapi::api::authentication::v1::{TokenRequest, TokenRequestSpec};
use k8s_openapi::api::core::v1::ServiceAccount;
use kube::api::{ListParams, PostParams};
use kube::Api;
use serde_json::Value;

mod common;

fn repo_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .unwrap()
        .to_path_buf()
}

/// The harness's kubectl (same version as the API server), else one on PATH.
fn kubectl() -> anyhow::Result<PathBuf> {
    let out = Command::new(repo_root().join("e2e/controlplane/build.sh"))
        .arg("--print-bin-dir")
        .stderr(Stdio::inherit())
        .output()
        .context("running e2e/controlplane/build.sh --print-bin-dir")?;
    let dir = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let k = PathBuf::from(dir).join("kubectl");
    if out.status.success() && k.is_file() {
        return Ok(k);
    }
    Ok(PathBuf::from("kubectl"))
}

fn helm() -> anyhow::Result<PathBuf> {
    let out = Command::new(repo_root().join("scripts/helm.sh"))
        .stderr(Stdio::inherit())
        .output()
        .context("running scripts/helm.sh")?;
    if !out.status.success() {
        bail!("scripts/helm.sh failed: {}", out.status);
    }
    Ok(PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()))
}

/// `kubectl apply --server-side [--dry-run=server] -o json -f -` with `yaml` on stdin; the
/// applied objects (a List's items, or the single object).
fn kubectl_apply(cluster: &TestCluster, yaml: &str, dry_run: bool) -> anyhow::Result<Vec<Value>> {
    let mut cmd = Command::new(kubectl()?);
    cmd.arg("--kubeconfig").arg(&cluster.kubeconfig).args([
        "apply",
        "--server-side",
        "--force-conflicts",
        "--field-manager=commonground-e2e-manifests",
    ]);
    if dry_run {
        cmd.arg("--dry-run=server");
    }
    cmd.args(["-o", "json", "-f", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let mut child = cmd.spawn().context("starting kubectl")?;
    child.stdin.take().unwrap().write_all(yaml.as_bytes())?;
    let out = child.wait_with_output()?;
    if !out.status.success() {
        bail!(
            "the API server rejected objects (kubectl exit {}):\n{}",
            out.status,
            String::from_utf8_lossy(&out.stderr)
        );
    }
    let v: Value = serde_json::from_slice(&out.stdout).context("kubectl -o json output")?;
    Ok(match v.get("items") {
        Some(Value::Array(items)) if v["kind"] == "List" => items.clone(),
        _ => vec![v],
    })
}

/// Kind and name of every document in a multi-document YAML stream, from its top-level
/// `kind:` and `metadata.name` lines (rendered YAML: two-space indentation).
fn documents(yaml: &str) -> Vec<(String, String)> {
    yaml.split("\n---")
        .filter_map(|doc| {
            let kind = doc.lines().find_map(|l| l.strip_prefix("kind: "))?;
            let mut in_meta = false;
            let name = doc.lines().find_map(|l| {
                if l == "metadata:" {
                    in_meta = true;
                } else if in_meta && l.starts_with("  name: ") {
                    return Some(l["  name: ".len()..].trim_matches('"').to_string());
                } else if !l.starts_with(' ') && !l.is_empty() && !l.starts_with('#') {
                    in_meta = false;
                }
                None
            })?;
            Some((kind.trim().to_string(), name))
        })
        .collect()
}

fn applied_names(objects: &[Value]) -> Vec<(String, String)> {
    let mut v: Vec<_> = objects
        .iter()
        .map(|o| {
            (
                o["kind"].as_str().unwrap_or_default().to_string(),
                o["metadata"]["name"]
                    .as_str()
                    .unwrap_or_default()
                    .to_string(),
            )
        })
        .collect();
    v.sort();
    v
}

/// deploy/ targets namespace "commonground"; the test moves its namespaced objects into its
/// fresh namespace (the cluster-scoped ones are only dry-run, so their names do not clash).
fn into_namespace(yaml: &str, ns: &str) -> String {
    yaml.replace("namespace: commonground\n", &format!("namespace: {ns}\n"))
}

#[tokio::test(flavor = "multi_thread")]
async fn every_object_in_deploy_is_accepted_by_a_server_side_dry_run() -> anyhow::Result<()> {
    let cluster = TestCluster::get();
    let ns = cluster.fresh_namespace("manifests").await?;
    for file in ["deploy/crds.yaml", "deploy/commonground.yaml"] {
        let text =
            std::fs::read_to_string(repo_root().join(file)).with_context(|| file.to_string())?;
        let yaml = into_namespace(&text, &ns.name);
        let mut expected = documents(&yaml);
        expected.sort();
        assert!(!expected.is_empty(), "{file} holds no objects");
        let applied = kubectl_apply(cluster, &yaml, true).with_context(|| file.to_string())?;
        assert_eq!(
            applied_names(&applied),
            expected,
            "{file}: objects the server returned"
        );
    }
    Ok(())
}

fn render_chart(release: &str, namespace: &str, set: &[&str]) -> anyhow::Result<String> {
    let mut cmd = Command::new(helm()?);
    cmd.args(["template", release])
        .arg(repo_root().join("charts/commonground"))
        .args([
            "--namespace",
            namespace,
            "--skip-crds",
            "--kube-version",
            "1.37.0",
        ]);
    for s in set {
        cmd.args(["--set", s]);
    }
    let out = cmd
        .stderr(Stdio::inherit())
        .output()
        .context("helm template")?;
    if !out.status.success() {
        bail!("helm template failed: {}", out.status);
    }
    Ok(String::from_utf8(out.stdout)?)
}

/// Splits off the documents of kinds the harness does not serve (their CRDs belong to other
/// projects); returns (kept YAML, skipped kinds).
fn without_kinds(yaml: &str, kinds: &[&str]) -> (String, Vec<String>) {
    let mut kept = String::new();
    let mut skipped = Vec::new();
    for doc in format!("\n{yaml}").split("\n---") {
        match doc.lines().find_map(|l| l.strip_prefix("kind: ")) {
            Some(k) if kinds.contains(&k.trim()) => skipped.push(k.trim().to_string()),
            _ if doc.trim().is_empty() => {}
            _ => {
                kept.push_str("\n---");
                kept.push_str(doc);
            }
        }
    }
    (kept, skipped)
}

#[tokio::test(flavor = "multi_thread")]
async fn the_chart_with_every_option_on_renders_objects_the_api_server_accepts(
) -> anyhow::Result<()> {
    let cluster = TestCluster::get();
    let ns = cluster.fresh_namespace("chart-all").await?;
    let yaml = render_chart(
        &ns.name,
        &ns.name,
        &[
            "serviceMonitor.enabled=true",
            "networkPolicy.enabled=true",
            "networkPolicy.metricsFrom[0].namespaceSelector.matchLabels.name=monitoring",
            "networkPolicy.extenderFrom[0].ipBlock.cidr=10.0.0.0/8",
            "grafanaDashboard.enabled=true",
            "extender.tls.enabled=true",
            "extender.tls.certManager.enabled=true",
            "extender.tls.certManager.issuerRef.name=selfsigned",
            "extender.scheduler.caData=not-a-real-ca",
            "global.distances.a:b=10",
        ],
    )?;
    let (yaml, skipped) = without_kinds(&yaml, &["ServiceMonitor", "Certificate"]);
    eprintln!("not served by the harness, skipped: {skipped:?}");
    assert!(
        skipped.iter().any(|k| k == "ServiceMonitor") && skipped.iter().any(|k| k == "Certificate")
    );
    let mut expected = documents(&yaml);
    expected.sort();
    for kind in [
        "Secret",
        "NetworkPolicy",
        "ConfigMap",
        "DaemonSet",
        "Deployment",
    ] {
        assert!(
            expected.iter().any(|(k, _)| k == kind),
            "the chart rendered no {kind}"
        );
    }
    let applied = kubectl_apply(cluster, &yaml, true)?;
    assert_eq!(applied_names(&applied), expected);
    Ok(())
}

// --- components from the rendered manifests -------------------------------------------

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The `commonground` binary of this workspace, built if needed.
fn commonground_binary() -> anyhow::Result<PathBuf> {
    let root = repo_root();
    let status = Command::new(env!("CARGO"))
        .args(["build", "-q", "--bin", "commonground"])
        .current_dir(&root)
        .status()
        .context("cargo build --bin commonground")?;
    if !status.success() {
        bail!("cargo build --bin commonground failed");
    }
    let target = std::env::var_os("CARGO_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| root.join("target"));
    Ok(target.join("debug/commonground"))
}

/// A kubeconfig for `sa` in `ns`: the harness's server and CA with a fresh token.
async fn kubeconfig_for(ns: &TestNamespace, sa: &str, dir: &Path) -> anyhow::Result<PathBuf> {
    let sas: Api<ServiceAccount> = Api::namespaced(ns.client.clone(), &ns.name);
    let tr = sas
        .create_token_request(
            sa,
            &PostParams::default(),
            &TokenRequest {
                spec: Some(TokenRequestSpec {
                    expiration_seconds: Some(3600),
                    ..Default::default()
                }),
                ..Default::default()
            },
        )
        .await
        .with_context(|| format!("token for ServiceAccount {}/{sa}", ns.name))?;
    let token = tr
        .status
        .and_then(|s| s.token)
        .context("TokenRequest answered without a token")?;
    let admin = std::fs::read_to_string(&ns.cluster.kubeconfig)?;
    let pick = |key: &str| -> anyhow::Result<String> {
        admin
            .lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix(key)
                    .map(|v| v.trim().trim_matches('"').to_string())
            })
            .ok_or_else(|| anyhow!("no {key} in the harness kubeconfig"))
    };
    let server = pick("server:")?;
    let ca = pick("certificate-authority-data:")?;
    let path = dir.join(format!("{sa}.kubeconfig"));
    std::fs::write(
        &path,
        format!(
            "apiVersion: v1\nkind: Config\nclusters:\n- name: e2e\n  cluster:\n    server: {server}\n    certificate-authority-data: {ca}\nusers:\n- name: {sa}\n  user:\n    token: {token}\ncontexts:\n- name: e2e\n  context:\n    cluster: e2e\n    user: {sa}\n    namespace: {}\ncurrent-context: e2e\n",
            ns.name
        ),
    )?;
    Ok(path)
}

struct Component {
    name: String,
    child: Child,
    log: PathBuf,
}

impl Drop for Component {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Component {
    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(30)..].join("\n")
    }
}

/// The first container of a rendered workload: its args and its plain `value:` env entries;
/// downward-API entries are filled in from `downward` (fieldPath -> value).
fn container(obj: &Value, downward: &[(&str, &str)]) -> (Vec<String>, Vec<(String, String)>) {
    let c = &obj["spec"]["template"]["spec"]["containers"][0];
    let args = c["args"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|v| v.as_str().map(String::from))
                .collect()
        })
        .unwrap_or_default();
    let env = c["env"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter_map(|e| {
                    let name = e["name"].as_str()?.to_string();
                    if let Some(v) = e["value"].as_str() {
                        return Some((name, v.to_string()));
                    }
                    let path = e["valueFrom"]["fieldRef"]["fieldPath"].as_str()?;
                    let v = downward.iter().find(|(p, _)| *p == path)?.1;
                    Some((name, v.to_string()))
                })
                .collect()
        })
        .unwrap_or_default();
    (args, env)
}

/// Replaces `--flag=...` in `args` (the manifests' container paths and ports do not exist on
/// this machine); every replaced flag must have been there.
fn override_flags(mut args: Vec<String>, with: &[(&str, String)]) -> Vec<String> {
    for (flag, value) in with {
        let prefix = format!("{flag}=");
        let i = args
            .iter()
            .position(|a| a.starts_with(&prefix))
            .unwrap_or_else(|| panic!("the manifest passes no {flag}: {args:?}"));
        args[i] = format!("{prefix}{value}");
    }
    args
}

async fn ready(component: &mut Component, url: &str) -> anyhow::Result<()> {
    let what = format!("{} {url}", component.name);
    let r = wait_for(&what, Duration::from_secs(60), || {
        let exited = component.child.try_wait().ok().flatten();
        let url = url.to_string();
        async move {
            if let Some(status) = exited {
                bail!("exited with {status}");
            }
            Ok(http_get_ok(&url).then_some(()))
        }
    })
    .await;
    r.with_context(|| format!("{} log:\n{}", component.name, component.log_tail()))
}

/// A plain HTTP GET on loopback answering 200.
fn http_get_ok(url: &str) -> bool {
    use std::io::Read;
    let rest = url.strip_prefix("http://").unwrap_or(url);
    let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
    let Ok(mut s) = std::net::TcpStream::connect(host) else {
        return false;
    };
    let _ = s.set_read_timeout(Some(Duration::from_secs(2)));
    if write!(s, "GET /{path} HTTP/1.0\r\nHost: {host}\r\n\r\n").is_err() {
        return false;
    }
    let mut buf = String::new();
    let _ = s.read_to_string(&mut buf);
    buf.starts_with("HTTP/1.1 200") || buf.starts_with("HTTP/1.0 200")
}

#[tokio::test(flavor = "multi_thread")]
async fn components_come_up_from_the_manifests_as_their_service_accounts() -> anyhow::Result<()> {
    let cluster = TestCluster::get();
    let ns = cluster.fresh_namespace("chart-run").await?;
    // The release is named after the namespace, so its cluster-scoped RBAC objects do not
    // clash with other runs; they are deleted at the end.
    let yaml = render_chart(&ns.name, &ns.name, &["controller.replicas=1"])?;
    let applied = kubectl_apply(cluster, &yaml, false).context("applying the rendered chart")?;
    let result = run_components(&ns, &applied).await;
    delete_outside_namespace(cluster, &applied);
    // The directory holds ServiceAccount tokens; keep it only when the test failed.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(tempfile_dir(&ns.name)?);
    }
    result
}

/// The rendered object of `kind` for `component` (its `app.kubernetes.io/component` label).
fn find_component<'a>(
    applied: &'a [Value],
    kind: &str,
    component: &str,
) -> anyhow::Result<&'a Value> {
    applied
        .iter()
        .find(|o| {
            o["kind"] == kind && o["metadata"]["labels"]["app.kubernetes.io/component"] == component
        })
        .ok_or_else(|| anyhow!("the chart rendered no {kind} for the {component}"))
}

fn service_account_of(obj: &Value) -> String {
    obj["spec"]["template"]["spec"]["serviceAccountName"]
        .as_str()
        .unwrap_or_default()
        .to_string()
}

/// Starts one of our components (controller, extender or agent) as a local process from its
/// rendered workload `obj`, authenticated as the workload's ServiceAccount, on a free loopback
/// port; returns it with its readiness URL and its arguments. `key_file` stands in for the
/// agent's mounted cluster key.
async fn start_component(
    ns: &TestNamespace,
    bin: &Path,
    dir: &Path,
    obj: &Value,
    component: &str,
    node: &str,
    key_file: Option<&Path>,
) -> anyhow::Result<(Component, String, Vec<String>)> {
    let pod_name = format!("{component}-0");
    let (args, env) = container(
        obj,
        &[
            ("metadata.name", pod_name.as_str()),
            ("spec.nodeName", node),
        ],
    );
    let port = free_port();
    let args = match component {
        "extender" => override_flags(args, &[("--listen", format!("127.0.0.1:{port}"))]),
        "agent" => override_flags(
            args,
            &[
                ("--health-addr", format!("127.0.0.1:{port}")),
                (
                    "--key-file",
                    key_file
                        .context("the agent needs the cluster key file")?
                        .display()
                        .to_string(),
                ),
                ("--interval", "1".into()),
            ],
        ),
        // The controller reads the accepted cluster keys where the agent's is ("key").
        "controller" => override_flags(
            args,
            &[
                ("--health-addr", format!("127.0.0.1:{port}")),
                (
                    "--cluster-key-dir",
                    key_file
                        .and_then(Path::parent)
                        .context("the controller needs the cluster key's directory")?
                        .display()
                        .to_string(),
                ),
            ],
        ),
        _ => override_flags(args, &[("--health-addr", format!("127.0.0.1:{port}"))]),
    };
    let probe = format!("http://127.0.0.1:{port}/readyz");
    let kubeconfig = kubeconfig_for(ns, &service_account_of(obj), dir).await?;
    let log = dir.join(format!("{component}.log"));
    let err = dir.join(format!("{component}.err"));
    let child = Command::new(bin)
        .args(&args)
        .envs(env)
        .env("KUBECONFIG", &kubeconfig)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .stdout(std::fs::File::create(&log)?)
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("starting {} {args:?}", bin.display()))?;
    Ok((
        Component {
            name: component.to_string(),
            child,
            log: err,
        },
        probe,
        args,
    ))
}

async fn run_components(ns: &TestNamespace, applied: &[Value]) -> anyhow::Result<()> {
    let bin = commonground_binary()?;
    let dir = tempfile_dir(&ns.name)?;
    let node = ns.node_name("agent");
    ns.create_fake_node(FakeNode::new(&node, "wg-a")).await?;

    // The cluster key Secret the chart generated, as the kubelet would mount it.
    let secrets: Api<k8s_openapi::api::core::v1::Secret> = ns.api();
    let key_secret = secrets
        .get(&format!("{}-commonground-cluster-key", ns.name))
        .await?;
    let key = key_secret
        .data
        .unwrap_or_default()
        .remove("key")
        .context("no key in the cluster key Secret")?;
    let key_file = dir.join("key");
    std::fs::write(&key_file, &key.0)?;
    assert_eq!(key.0.len(), 32, "the generated key is 32 hex characters");

    let mut started = Vec::new();
    for (kind, component) in [
        ("Deployment", "controller"),
        ("Deployment", "extender"),
        ("DaemonSet", "agent"),
    ] {
        let obj = find_component(applied, kind, component)?;
        started
            .push(start_component(ns, &bin, &dir, obj, component, &node, Some(&key_file)).await?);
    }
    for (c, probe, args) in &mut started {
        ready(c, probe)
            .await
            .with_context(|| format!("{} did not become ready with {args:?}", c.name))?;
    }
    // The agent published its node's digest with its own ServiceAccount's rights.
    let digests: Api<commonground::api::NodeRegionDigest> = Api::all(ns.client.clone());
    digests
        .get(&node)
        .await
        .with_context(|| format!("NodeRegionDigest {node}"))?;
    // The controller, reading the same Secret's key, accepts it, and says so on the digest
    // with its own ServiceAccount's rights.
    wait_for(
        "KeyAccepted=True on the agent's digest",
        Duration::from_secs(60),
        || async {
            let d = digests.get(&node).await?;
            Ok(d.status.and_then(|s| {
                s.conditions
                    .into_iter()
                    .find(|c| c.r#type == "KeyAccepted" && c.status == "True")
            }))
        },
    )
    .await
    .with_context(|| {
        let controller = started.iter().find(|(c, _, _)| c.name == "controller");
        format!(
            "controller log:\n{}",
            controller.map(|(c, _, _)| c.log_tail()).unwrap_or_default()
        )
    })?;
    let _ = digests.delete(&node, &Default::default()).await;

    // The controller writes with its ServiceAccount's rights: it adds its finalizer, writes the
    // status of a VirtualMachineMigration (here one whose VMI does not exist) and records an
    // Event. A missing verb leaves the object untouched and "forbidden" in its log.
    use commonground::api::migration::{MigrationPhase, VirtualMachineMigrationSpec};
    use commonground::api::VirtualMachineMigration;
    let vmms: Api<VirtualMachineMigration> = ns.api();
    vmms.create(
        &PostParams::default(),
        &VirtualMachineMigration::new(
            "rbac-probe",
            VirtualMachineMigrationSpec {
                vmi_name: "absent".into(),
                target: None,
                max_duration: None,
                path_setup_budget: None,
                follow_deadline: None,
                group: None,
                // Not a dry run: a dry run needs no cleanup and gets no finalizer. Its VMI
                // does not exist, so it fails before anything is made.
                dry_run: false,
                max_attempts: None,
                unschedulable_timeout: None,
            },
        ),
    )
    .await?;
    let controller = &started
        .iter()
        .find(|(c, _, _)| c.name == "controller")
        .expect("started above")
        .0;
    let failed = wait_for(
        "rbac-probe finalized and failed",
        Duration::from_secs(60),
        || async {
            let m = vmms.get("rbac-probe").await?;
            let finalized = m
                .metadata
                .finalizers
                .as_ref()
                .is_some_and(|f| f.iter().any(|f| f == "commonground.dev/migration-cleanup"));
            Ok(m.status
                .filter(|s| finalized && s.phase == MigrationPhase::Failed))
        },
    )
    .await
    .with_context(|| {
        format!(
            "the controller, as its ServiceAccount, did not finalize and fail rbac-probe:\n{}",
            controller.log_tail()
        )
    })?;
    assert!(
        failed.conditions.iter().any(|c| c.reason == "VmiNotFound"),
        "{:?}",
        failed.conditions
    );
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    wait_for(
        "an Event about rbac-probe",
        Duration::from_secs(30),
        || async {
            let list = events.list(&Default::default()).await?;
            Ok(list
                .items
                .iter()
                .any(|e| e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some("rbac-probe"))
                .then_some(()))
        },
    )
    .await
    .with_context(|| format!("no Event about rbac-probe:\n{}", controller.log_tail()))?;
    // Deleting runs the finalizer's cleanup, again as the ServiceAccount.
    vmms.delete("rbac-probe", &Default::default()).await?;
    wait_for("rbac-probe released", Duration::from_secs(60), || async {
        Ok(vmms.get_opt("rbac-probe").await?.is_none().then_some(()))
    })
    .await
    .with_context(|| format!("rbac-probe was not released:\n{}", controller.log_tail()))?;
    let log = std::fs::read_to_string(&controller.log)?;
    assert!(!log.contains("forbidden"), "{log}");
    Ok(())
}

fn tempfile_dir(name: &str) -> anyhow::Result<PathBuf> {
    let dir = std::env::temp_dir().join(format!("commonground-e2e-{name}"));
    std::fs::create_dir_all(&dir)?;
    Ok(dir)
}

// --- the second scheduler (scheduler.deploy) -------------------------------------------

/// Deletes what a rendered release put outside its namespace: its cluster-scoped RBAC and the
/// scheduler's RoleBinding in kube-system.
fn delete_outside_namespace(cluster: &TestCluster, applied: &[Value]) {
    let mut args: Vec<String> = applied
        .iter()
        .filter(|o| o["metadata"]["namespace"].is_null())
        .map(|o| {
            format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default().to_lowercase(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            )
        })
        .filter(|r| r.starts_with("clusterrole"))
        .collect();
    if args.is_empty() {
        return;
    }
    let Ok(kubectl) = kubectl() else { return };
    let _ = Command::new(&kubectl)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["delete", "--ignore-not-found"])
        .args(&args)
        .output();
    args.clear();
    for o in applied {
        if o["metadata"]["namespace"] == "kube-system" {
            args.push(format!(
                "{}/{}",
                o["kind"].as_str().unwrap_or_default().to_lowercase(),
                o["metadata"]["name"].as_str().unwrap_or_default()
            ));
        }
    }
    if !args.is_empty() {
        let _ = Command::new(&kubectl)
            .arg("--kubeconfig")
            .arg(&cluster.kubeconfig)
            .args(["delete", "--ignore-not-found", "-n", "kube-system"])
            .args(&args)
            .output();
    }
}

/// Starts the chart's second kube-scheduler as a local process: the harness's kube-scheduler
/// binary with the rendered Deployment's command line and the rendered ConfigMap's
/// configuration, authenticated as the chart's scheduler ServiceAccount (so its RBAC is what
/// is tested). Only what cannot hold outside a pod changes: the configuration file's path,
/// the kubeconfig (in a pod: the ServiceAccount's in-cluster configuration), the extender's
/// address (in a pod: the extender Service) and the port.
async fn start_chart_scheduler(
    ns: &TestNamespace,
    dir: &Path,
    applied: &[Value],
    extender_url: &str,
) -> anyhow::Result<Component> {
    let deployment = find_component(applied, "Deployment", "scheduler")?;
    let config_map = find_component(applied, "ConfigMap", "scheduler")?;
    let kubeconfig = kubeconfig_for(ns, &service_account_of(deployment), dir).await?;
    let text = config_map["data"]["config.yaml"]
        .as_str()
        .context("the scheduler ConfigMap has no config.yaml")?;
    let mut config: serde_yaml_ng::Value =
        serde_yaml_ng::from_str(text).context("the scheduler configuration is not YAML")?;
    config["clientConnection"] = serde_yaml_ng::from_str(&format!(
        "{{kubeconfig: {:?}}}",
        kubeconfig.display().to_string()
    ))?;
    let extenders = config["extenders"]
        .as_sequence_mut()
        .context("the scheduler configuration calls no extender")?;
    assert_eq!(extenders.len(), 1, "one extender: commonground's");
    extenders[0]["urlPrefix"] = extender_url.into();
    let config_file = dir.join("scheduler-config.yaml");
    std::fs::write(&config_file, serde_yaml_ng::to_string(&config)?)?;

    let command: Vec<String> = deployment["spec"]["template"]["spec"]["containers"][0]["command"]
        .as_array()
        .context("the scheduler Deployment has no command")?
        .iter()
        .filter_map(|v| v.as_str().map(String::from))
        .collect();
    assert_eq!(command.first().map(String::as_str), Some("kube-scheduler"));
    let mut args = override_flags(
        command[1..].to_vec(),
        &[
            ("--config", config_file.display().to_string()),
            ("--secure-port", free_port().to_string()),
        ],
    );
    // In a pod these come from the in-cluster configuration too.
    for flag in ["--authentication-kubeconfig", "--authorization-kubeconfig"] {
        args.push(format!("{flag}={}", kubeconfig.display()));
    }
    args.push("--bind-address=127.0.0.1".into());
    let binary = ns.cluster.bin_dir()?.join("kube-scheduler");
    let err = dir.join("scheduler.err");
    let child = Command::new(&binary)
        .args(&args)
        .env_remove("HTTPS_PROXY")
        .env_remove("https_proxy")
        .stdout(Stdio::null())
        .stderr(std::fs::File::create(&err)?)
        .spawn()
        .with_context(|| format!("starting {} {args:?}", binary.display()))?;
    Ok(Component {
        name: "scheduler".into(),
        child,
        log: err,
    })
}

/// The reporting controller of the `Scheduled` Event about `pod`: the scheduler that bound it.
async fn bound_by(ns: &TestNamespace, pod: &str) -> anyhow::Result<String> {
    let events: Api<k8s_openapi::api::events::v1::Event> = ns.api();
    wait_for(
        &format!("the Scheduled Event of pod {pod}"),
        Duration::from_secs(60),
        || async {
            let list = events.list(&Default::default()).await?;
            Ok(list.items.into_iter().find_map(|e| {
                (e.reason.as_deref() == Some("Scheduled")
                    && e.regarding.as_ref().and_then(|r| r.name.as_deref()) == Some(pod))
                .then(|| e.reporting_controller.unwrap_or_default())
            }))
        },
    )
    .await
}

#[tokio::test(flavor = "multi_thread")]
async fn the_charts_second_scheduler_places_migration_targets_through_the_extender(
) -> anyhow::Result<()> {
    let cluster = TestCluster::get();
    let ns = cluster.fresh_namespace("chart-sched").await?;
    let yaml = render_chart(
        &ns.name,
        &ns.name,
        &["scheduler.deploy=true", "controller.enabled=false"],
    )?;
    let applied = kubectl_apply(cluster, &yaml, false).context("applying the rendered chart")?;
    let result = run_second_scheduler(&ns, &applied).await;
    delete_outside_namespace(cluster, &applied);
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(tempfile_dir(&ns.name)?);
    }
    result
}

async fn run_second_scheduler(ns: &TestNamespace, applied: &[Value]) -> anyhow::Result<()> {
    use commonground::api::kubevirt::{
        VirtualMachineInstance, VirtualMachineInstanceMigration, CREATED_BY_LABEL,
        MIGRATION_JOB_UID_LABEL,
    };
    use commonground_e2e::wait_for_object;
    use k8s_openapi::api::coordination::v1::Lease;
    use k8s_openapi::api::core::v1::Pod;
    use kube::ResourceExt;
    const SCHEDULER: &str = "commonground-scheduler";
    const T: Duration = Duration::from_secs(90);

    let dir = tempfile_dir(&ns.name)?;
    let bin = commonground_binary()?;
    let (mut extender, probe, args) = start_component(
        ns,
        &bin,
        &dir,
        find_component(applied, "Deployment", "extender")?,
        "extender",
        "",
        None,
    )
    .await?;
    ready(&mut extender, &probe)
        .await
        .with_context(|| format!("the extender did not become ready with {args:?}"))?;
    let extender_url = probe.trim_end_matches("/readyz").to_string();
    let scheduler = start_chart_scheduler(ns, &dir, applied, &extender_url).await?;
    // It schedules once it leads: its own Lease, in the release namespace (the chart's Role).
    let leases: Api<Lease> = ns.api();
    wait_for_object(
        &leases,
        SCHEDULER,
        T,
        "the second scheduler's Lease held",
        |l| {
            l.spec
                .as_ref()
                .and_then(|s| s.holder_identity.as_ref())
                .is_some()
        },
    )
    .await
    .with_context(|| format!("kube-scheduler log:\n{}", scheduler.log_tail()))?;

    let _standin = ns.start_standin(ns.standin_config());
    let mut nodes = Vec::new();
    for s in ["a", "b", "c"] {
        let n = ns.node_name(s);
        ns.create_fake_node(FakeNode::new(&n, "wg-1")).await?;
        nodes.push(n);
    }
    // The VM opts in; virt-controller copies the name to its launcher and target pods.
    let mut vmi = ns.vmi("vm", "1Gi", "1");
    vmi.spec.scheduler_name = Some(SCHEDULER.into());
    ns.create_vmi(vmi).await?;
    let vmis: Api<VirtualMachineInstance> = ns.api();
    let vmi = wait_for_object(&vmis, "vm", T, "VMI Running", |v| {
        v.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
    })
    .await
    .with_context(|| format!("kube-scheduler log:\n{}", scheduler.log_tail()))?;
    let source = vmi.node_name().context("the VMI runs nowhere")?.to_string();
    let pods: Api<Pod> = ns.api();
    let launcher = pods
        .list(&ListParams::default().labels(&format!(
            "{CREATED_BY_LABEL}={}",
            vmi.uid().unwrap_or_default()
        )))
        .await?
        .items
        .into_iter()
        .next()
        .context("no launcher pod")?;
    assert_eq!(
        launcher
            .spec
            .as_ref()
            .and_then(|s| s.scheduler_name.as_deref()),
        Some(SCHEDULER)
    );
    assert_eq!(bound_by(ns, &launcher.name_any()).await?, SCHEDULER);

    // Memory in common: "rich" holds 90% of the VM's regions but is half full, "poor" is
    // empty and holds 5%. kube-scheduler's own scoring prefers the empty node; only the
    // extender makes the rich one win.
    let others: Vec<&String> = nodes.iter().filter(|n| **n != source).collect();
    let (rich, poor) = (others[0].clone(), others[1].clone());
    let regions = 2000;
    let memory = regions * commonground::plan::region::RegionGeometry::default().region_bytes();
    let content = common::keys(0, regions);
    common::publish_digest(
        &ns.client,
        &source,
        "wg-1",
        vec![common::vm_summary(&ns.name, "vm", memory, &content)],
        &[],
    )
    .await?;
    common::publish_digest(
        &ns.client,
        &rich,
        "wg-1",
        vec![common::vm_summary(
            &ns.name,
            "twin",
            memory,
            &content[..1800],
        )],
        &[],
    )
    .await?;
    let poor_content = [&content[1900..], &common::keys(10_000, 4000)[..]].concat();
    common::publish_digest(
        &ns.client,
        &poor,
        "wg-1",
        vec![common::vm_summary(&ns.name, "other", memory, &poor_content)],
        &[],
    )
    .await?;
    let filler: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "filler"},
        "spec": {"nodeName": rich, "containers": [{"name": "c", "image": "registry.invalid/filler",
                 "resources": {"requests": {"cpu": "8", "memory": "32Gi"}}}]}
    }))?;
    pods.create(&PostParams::default(), &filler).await?;

    // An ordinary pod on the same nodes stays with the default scheduler, which has no
    // extender in this cluster.
    let ordinary: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ordinary"},
        "spec": {"nodeSelector": {commonground_e2e::POOL_LABEL: ns.name},
                 "containers": [{"name": "c", "image": "registry.invalid/ordinary",
                 "resources": {"requests": {"cpu": "100m", "memory": "64Mi"}}}]}
    }))?;
    pods.create(&PostParams::default(), &ordinary).await?;
    assert_eq!(bound_by(ns, "ordinary").await?, "default-scheduler");

    // Let the extender's view catch up with the digests before migrating (it is fed by
    // watches): ask it as kube-scheduler will.
    let body = serde_json::to_vec(&serde_json::json!({
        "Pod": {"metadata": {"name": "probe", "namespace": ns.name,
            "labels": {MIGRATION_JOB_UID_LABEL: "probe", CREATED_BY_LABEL: vmi.uid()}}},
        "NodeNames": [source, rich, poor]
    }))?;
    let addr: std::net::SocketAddr = extender_url.trim_start_matches("http://").parse()?;
    wait_for("the extender to rank the rich node first", T, || {
        let body = body.clone();
        let rich = rich.clone();
        async move {
            let (_, text) = common::http(addr, "POST", "/prioritize", &body)?;
            let answer: Value = serde_json::from_str(&text).unwrap_or_default();
            Ok(answer
                .as_array()
                .is_some_and(|l| {
                    l.iter()
                        .any(|h| h["Host"] == rich.as_str() && h["Score"] == 10)
                })
                .then_some(()))
        }
    })
    .await
    .with_context(|| format!("extender log:\n{}", extender.log_tail()))?;

    // A migration as a drain makes it: KubeVirt's target pod carries the VM's schedulerName,
    // so the second scheduler places it, through the extender.
    ns.create_vmim("drain-vm", "vm", &[]).await?;
    let vmims: Api<VirtualMachineInstanceMigration> = ns.api();
    let done = wait_for_object(&vmims, "drain-vm", T, "VMIM final", |m| m.is_final())
        .await
        .with_context(|| format!("kube-scheduler log:\n{}", scheduler.log_tail()))?;
    assert_eq!(done.phase(), Some("Succeeded"), "{}", ns.dump().await);
    let target = pods
        .list(&ListParams::default().labels(MIGRATION_JOB_UID_LABEL))
        .await?
        .items
        .into_iter()
        .next()
        .context("no migration target pod")?;
    let spec = target.spec.as_ref().context("target pod without spec")?;
    assert_eq!(spec.scheduler_name.as_deref(), Some(SCHEDULER));
    assert_eq!(bound_by(ns, &target.name_any()).await?, SCHEDULER);
    let target_node = spec.node_name.clone().context("target pod not bound")?;
    // KubeVirt's required anti-affinity to the source holds, and the extender's choice won.
    assert_ne!(target_node, source, "target pod placed on the source node");
    assert_eq!(target_node, rich, "{}", ns.dump().await);
    let filters = common::extender_filter_calls(addr)?;
    assert!(
        filters >= 2,
        "the extender answered {filters} filter calls (launcher and target expected)"
    );
    let log = std::fs::read_to_string(&scheduler.log)?;
    assert!(
        !log.contains("forbidden"),
        "kube-scheduler was refused:\n{log}"
    );
    Ok(())
}
