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
use kube::api::PostParams;
use kube::Api;
use serde_json::Value;

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
    let cluster_scoped: Vec<String> = applied
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
    let _ = Command::new(kubectl()?)
        .arg("--kubeconfig")
        .arg(&cluster.kubeconfig)
        .args(["delete", "--ignore-not-found"])
        .args(&cluster_scoped)
        .output();
    // The directory holds ServiceAccount tokens; keep it only when the test failed.
    if result.is_ok() {
        let _ = std::fs::remove_dir_all(tempfile_dir(&ns.name)?);
    }
    result
}

async fn run_components(ns: &TestNamespace, applied: &[Value]) -> anyhow::Result<()> {
    let find = |kind: &str, component: &str| -> anyhow::Result<&Value> {
        applied
            .iter()
            .find(|o| {
                o["kind"] == kind
                    && o["metadata"]["labels"]["app.kubernetes.io/component"] == component
            })
            .ok_or_else(|| anyhow!("the chart rendered no {kind} for the {component}"))
    };
    let sa_of = |o: &Value| {
        o["spec"]["template"]["spec"]["serviceAccountName"]
            .as_str()
            .unwrap_or_default()
            .to_string()
    };
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
        let obj = find(kind, component)?;
        let pod_name = format!("{component}-0");
        let (args, env) = container(
            obj,
            &[
                ("metadata.name", pod_name.as_str()),
                ("spec.nodeName", node.as_str()),
            ],
        );
        let port = free_port();
        let (args, probe) = match component {
            "extender" => (
                override_flags(args, &[("--listen", format!("127.0.0.1:{port}"))]),
                format!("http://127.0.0.1:{port}/readyz"),
            ),
            "agent" => (
                override_flags(
                    args,
                    &[
                        ("--health-addr", format!("127.0.0.1:{port}")),
                        ("--key-file", key_file.display().to_string()),
                        ("--interval", "1".into()),
                    ],
                ),
                format!("http://127.0.0.1:{port}/readyz"),
            ),
            _ => (
                override_flags(args, &[("--health-addr", format!("127.0.0.1:{port}"))]),
                format!("http://127.0.0.1:{port}/readyz"),
            ),
        };
        let kubeconfig = kubeconfig_for(ns, &sa_of(obj), &dir).await?;
        let log = dir.join(format!("{component}.log"));
        let child = Command::new(&bin)
            .args(&args)
            .envs(env)
            .env("KUBECONFIG", &kubeconfig)
            .env_remove("HTTPS_PROXY")
            .env_remove("https_proxy")
            .stdout(std::fs::File::create(&log)?)
            .stderr(std::fs::File::create(dir.join(format!("{component}.err")))?)
            .spawn()
            .with_context(|| format!("starting {} {args:?}", bin.display()))?;
        started.push((
            Component {
                name: component.to_string(),
                child,
                log: dir.join(format!("{component}.err")),
            },
            probe,
            args,
        ));
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
