//! Staleness checks for what is derived from the code: the chart's and deploy/'s copies of the
//! CRDs, deploy/ itself (a fresh `helm template`), the Grafana dashboard's metric names, and
//! the generated reference in docs/reference/.
//!
//! The reference generator lives here, beside its check: `COMMONGROUND_BLESS=1 cargo test
//! --test manifests reference_docs` (what scripts/render-manifests.sh runs) rewrites the files.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::path::{Path, PathBuf};
use std::process::Command;

use serde_json::Value;

fn root() -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR"))
}

fn read(rel: &str) -> String {
    std::fs::read_to_string(root().join(rel)).unwrap_or_else(|e| panic!("reading {rel}: {e}"))
}

const RERENDER: &str = "run scripts/render-manifests.sh and commit the result";

#[test]
fn chart_and_deploy_crds_equal_the_generated_crds() {
    let crds = read("crds/commonground.yaml");
    for copy in [
        "charts/commonground/crds/commonground.yaml",
        "deploy/crds.yaml",
    ] {
        assert!(
            read(copy) == crds,
            "{copy} differs from crds/commonground.yaml: {RERENDER}"
        );
    }
}

#[test]
fn deploy_manifests_equal_a_fresh_helm_render() {
    // render-manifests.sh gets helm from scripts/helm.sh, which builds it once from the Go
    // module proxy; without Go and without a cached helm that fails with its own hint. This
    // test never passes without rendering.
    let out = Command::new(root().join("scripts/render-manifests.sh"))
        .args(["--deploy-only", "--check"])
        .output()
        .expect("running scripts/render-manifests.sh");
    assert!(
        out.status.success(),
        "deploy/ is stale or could not be rendered ({}):\n{}\n{RERENDER}",
        out.status,
        String::from_utf8_lossy(&out.stderr)
    );
}

// --- metrics ---------------------------------------------------------------------------

#[derive(Debug, Clone, PartialEq)]
struct Metric {
    name: String,
    kind: &'static str,
    help: String,
    labels: Vec<String>,
    source: String,
}

fn rust_files(dir: &Path, out: &mut Vec<PathBuf>) {
    let mut entries: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.path())
        .collect();
    entries.sort();
    for p in entries {
        if p.is_dir() {
            rust_files(&p, out);
        } else if p.extension().is_some_and(|e| e == "rs") {
            out.push(p);
        }
    }
}

/// The string literal starting at or after `from`: (content, index after the closing quote).
fn next_literal(s: &str, from: usize) -> Option<(String, usize)> {
    let start = from + s[from..].find('"')?;
    let mut out = String::new();
    let mut chars = s[start + 1..].char_indices();
    while let Some((i, c)) = chars.next() {
        match c {
            '\\' => {
                if let Some((_, n)) = chars.next() {
                    match n {
                        'n' => out.push('\n'),
                        '\n' => {
                            // line continuation: skip the next line's indentation
                            let rest = &s[start + 1 + i + 2..];
                            let skip = rest.len() - rest.trim_start().len();
                            for _ in 0..skip {
                                chars.next();
                            }
                        }
                        other => out.push(other),
                    }
                }
            }
            '"' => return Some((out, start + 1 + i + 1)),
            c => out.push(c),
        }
    }
    None
}

const CONSTRUCTORS: [(&str, &str); 10] = [
    ("IntCounterVec", "counter"),
    ("IntCounter", "counter"),
    ("CounterVec", "counter"),
    ("Counter", "counter"),
    ("IntGaugeVec", "gauge"),
    ("IntGauge", "gauge"),
    ("GaugeVec", "gauge"),
    ("Gauge", "gauge"),
    ("HistogramVec", "histogram"),
    ("Histogram", "histogram"),
];

/// Every Prometheus metric the code registers, found in its source: the name and help of each
/// `Opts::new` / `HistogramOpts::new` / `IntCounter::new`-style constructor, its label names,
/// and the prefix of a `Registry::new_custom(Some("prefix")..)` in the same file.
fn metrics_in_source() -> Vec<Metric> {
    let mut files = Vec::new();
    rust_files(&root().join("src"), &mut files);
    let mut found = BTreeMap::new();
    for file in files {
        let text = std::fs::read_to_string(&file).unwrap();
        let rel = file.strip_prefix(root()).unwrap().display().to_string();
        let prefix = text
            .find("Registry::new_custom(Some(")
            .and_then(|i| next_literal(&text, i))
            .map(|(p, _)| format!("{p}_"))
            .unwrap_or_default();
        let mut at = 0;
        while let Some(rel_i) = text[at..]
            .find("::new(")
            .or_else(|| text[at..].find("::with_opts("))
        {
            let i = at + rel_i;
            at = i + 1;
            let ident_start = text[..i]
                .rfind(|c: char| !(c.is_alphanumeric() || c == '_'))
                .map_or(0, |p| p + 1);
            let ident = &text[ident_start..i];
            let direct = CONSTRUCTORS.iter().find(|(c, _)| *c == ident);
            let kind = match ident {
                "Opts" | "HistogramOpts" => {
                    // the kind is the constructor this Opts is passed to
                    let before = &text[i.saturating_sub(200)..ident_start];
                    CONSTRUCTORS
                        .iter()
                        .filter_map(|(c, k)| {
                            [format!("{c}::new("), format!("{c}::with_opts(")]
                                .iter()
                                .filter_map(|p| before.rfind(p.as_str()))
                                .max()
                                .map(|pos| (pos, *k))
                        })
                        .max_by_key(|(pos, _)| *pos)
                        .map(|(_, k)| k)
                        .unwrap_or(if ident == "HistogramOpts" {
                            "histogram"
                        } else {
                            "counter"
                        })
                }
                _ => match direct {
                    Some((_, k)) => k,
                    None => continue,
                },
            };
            // `IntCounterVec::new(Opts::new(..))`: handled at the inner Opts.
            let after_paren = text[i..].find('(').map(|p| i + p + 1).unwrap();
            if text[after_paren..]
                .trim_start()
                .starts_with(|c: char| c.is_alphabetic())
            {
                continue;
            }
            let Some((name, after_name)) = next_literal(&text, after_paren) else {
                continue;
            };
            if !text[after_paren..].trim_start().starts_with('"') {
                continue;
            }
            let Some((help, after_help)) = next_literal(&text, after_name) else {
                continue;
            };
            let name = format!("{prefix}{name}");
            if !name.starts_with("commonground_") {
                continue;
            }
            let stmt_end = text[after_help..]
                .find(';')
                .map_or(text.len(), |p| after_help + p);
            let stmt = &text[after_help..stmt_end];
            let labels = stmt
                .find("&[")
                .map(|p| {
                    let end = stmt[p..].find(']').map_or(stmt.len(), |e| p + e);
                    stmt[p + 2..end]
                        .split(',')
                        .map(|l| l.trim().trim_matches('"').to_string())
                        .filter(|l| !l.is_empty())
                        .collect()
                })
                .unwrap_or_default();
            found.entry(name.clone()).or_insert(Metric {
                name,
                kind,
                help,
                labels,
                source: rel.clone(),
            });
        }
    }
    found.into_values().collect()
}

#[test]
fn dashboard_uses_only_metrics_the_code_registers() {
    let metrics = metrics_in_source();
    assert!(
        metrics.len() >= 10,
        "metric scan found too few metrics: {metrics:?}"
    );
    let dashboard: Value =
        serde_json::from_str(&read("charts/commonground/files/dashboard.json")).unwrap();
    let mut used = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for t in panel["targets"].as_array().into_iter().flatten() {
            let expr = t["expr"].as_str().unwrap();
            for (i, _) in expr.match_indices("commonground_") {
                let name: String = expr[i..]
                    .chars()
                    .take_while(|c| c.is_alphanumeric() || *c == '_')
                    .collect();
                used.push(name);
            }
        }
    }
    assert!(!used.is_empty());
    for name in used {
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s))
            .unwrap_or(&name);
        assert!(
            metrics
                .iter()
                .any(|m| m.name == name || (m.kind == "histogram" && m.name == base)),
            "the dashboard queries {name}, which no code registers; metrics: {:?}",
            metrics.iter().map(|m| &m.name).collect::<Vec<_>>()
        );
    }
}

// --- reference docs --------------------------------------------------------------------

const HEADER: &str =
    "<!-- Generated by tests/manifests.rs (scripts/render-manifests.sh); do not edit. -->\n\n";

fn cell(s: &str) -> String {
    s.split("\n\n")
        .map(|p| p.split_whitespace().collect::<Vec<_>>().join(" "))
        .collect::<Vec<_>>()
        .join("<br><br>")
        .replace('|', "\\|")
}

fn schema_type(s: &Value) -> String {
    let mut t = match s.get("type").and_then(Value::as_str) {
        Some("array") => format!("[]{}", s.get("items").map(schema_type).unwrap_or_default()),
        Some(t) => t.to_string(),
        None if s.get("x-kubernetes-int-or-string").is_some() => "int-or-string".into(),
        None if s.get("x-kubernetes-preserve-unknown-fields").is_some() => "object (any)".into(),
        None => "any".into(),
    };
    if let Some(f) = s.get("format").and_then(Value::as_str) {
        let _ = write!(t, " ({f})");
    }
    t
}

fn fields(schema: &Value, path: &str, required: bool, out: &mut String) {
    let mut notes = Vec::new();
    if required {
        notes.push("required".to_string());
    }
    if let Some(e) = schema.get("enum").and_then(Value::as_array) {
        let vals: Vec<String> = e
            .iter()
            .filter(|v| !v.is_null())
            .map(|v| format!("`{}`", v.as_str().map_or(v.to_string(), String::from)))
            .collect();
        notes.push(format!("one of {}", vals.join(", ")));
    }
    if let Some(d) = schema.get("default") {
        notes.push(format!("default `{d}`"));
    }
    for (k, label) in [
        ("minimum", "min"),
        ("maximum", "max"),
        ("maxItems", "max items"),
        ("maxLength", "max length"),
        ("pattern", "pattern"),
    ] {
        if let Some(v) = schema.get(k) {
            notes.push(format!(
                "{label} `{}`",
                v.as_str().map_or(v.to_string(), String::from)
            ));
        }
    }
    let desc = schema
        .get("description")
        .and_then(Value::as_str)
        .unwrap_or("");
    let _ = writeln!(
        out,
        "| `{path}` | {} | {} | {} |",
        schema_type(schema).replace('|', "\\|"),
        cell(desc),
        notes.join("; ").replace('|', "\\|")
    );
    let item = if schema.get("type").and_then(Value::as_str) == Some("array") {
        schema.get("items")
    } else {
        Some(schema)
    };
    let Some(item) = item else { return };
    let base = if schema.get("type").and_then(Value::as_str) == Some("array") {
        format!("{path}[]")
    } else {
        path.to_string()
    };
    if let Some(props) = item.get("properties").and_then(Value::as_object) {
        let req: Vec<&str> = item
            .get("required")
            .and_then(Value::as_array)
            .map(|r| r.iter().filter_map(Value::as_str).collect())
            .unwrap_or_default();
        for (name, sub) in props {
            fields(
                sub,
                &format!("{base}.{name}"),
                req.contains(&name.as_str()),
                out,
            );
        }
    } else if let Some(ap) = item.get("additionalProperties").filter(|v| v.is_object()) {
        fields(ap, &format!("{base}.<key>"), false, out);
    }
}

fn crd_reference() -> String {
    let mut out = String::from(HEADER);
    out.push_str("# Custom resources (`commonground.dev/v1alpha1`)\n\nEvery field of every commonground resource, from the schema descriptions in `crds/commonground.yaml` (also what `kubectl explain` shows).\n\n");
    let text = read("crds/commonground.yaml");
    let mut crds = Vec::new();
    for doc in serde_yaml_ng::Deserializer::from_str(&text) {
        let v: Value = serde::Deserialize::deserialize(doc).expect("CRD YAML");
        if !v.is_null() {
            crds.push(v);
        }
    }
    for crd in &crds {
        let names = &crd["spec"]["names"];
        let _ = writeln!(
            out,
            "- [{}](#{})",
            names["kind"].as_str().unwrap(),
            names["kind"].as_str().unwrap().to_lowercase()
        );
    }
    for crd in &crds {
        let spec = &crd["spec"];
        let names = &spec["names"];
        let kind = names["kind"].as_str().unwrap();
        let _ = writeln!(out, "\n## {kind}\n");
        let list = |v: &Value| {
            v.as_array()
                .map(|a| {
                    a.iter()
                        .filter_map(Value::as_str)
                        .map(|s| format!("`{s}`"))
                        .collect::<Vec<_>>()
                        .join(", ")
                })
                .unwrap_or_default()
        };
        let _ = writeln!(
            out,
            "- API: `{}/{}`, plural `{}`, scope `{}`",
            spec["group"].as_str().unwrap(),
            spec["versions"][0]["name"].as_str().unwrap(),
            names["plural"].as_str().unwrap(),
            spec["scope"].as_str().unwrap()
        );
        let _ = writeln!(
            out,
            "- Short names: {}; categories: {}",
            list(&names["shortNames"]),
            list(&names["categories"])
        );
        for version in spec["versions"].as_array().unwrap() {
            let schema = &version["schema"]["openAPIV3Schema"];
            if let Some(d) = schema.get("description").and_then(Value::as_str) {
                let _ = writeln!(out, "\n{d}");
            }
            if let Some(cols) = version
                .get("additionalPrinterColumns")
                .and_then(Value::as_array)
            {
                out.push_str("\n`kubectl get` columns:\n\n| column | JSON path | description |\n| --- | --- | --- |\n");
                for c in cols {
                    let _ = writeln!(
                        out,
                        "| {} | `{}` | {} |",
                        c["name"].as_str().unwrap_or(""),
                        c["jsonPath"].as_str().unwrap_or(""),
                        cell(c.get("description").and_then(Value::as_str).unwrap_or(""))
                    );
                }
            }
            out.push_str("\n| field | type | description | notes |\n| --- | --- | --- | --- |\n");
            let props = schema["properties"].as_object().unwrap();
            let req: Vec<&str> = schema
                .get("required")
                .and_then(Value::as_array)
                .map(|r| r.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            for (name, sub) in props {
                if ["apiVersion", "kind", "metadata"].contains(&name.as_str()) {
                    continue;
                }
                fields(sub, name, req.contains(&name.as_str()), &mut out);
            }
        }
    }
    out
}

fn metrics_reference() -> String {
    let mut out = String::from(HEADER);
    out.push_str("# Metrics\n\nEvery Prometheus metric, found in the source where it is registered. Each component serves `/metrics` on its health address: controller `:8080`, agent `:8081`, extender on its serving port (`:8888`). Histograms also expose `_bucket`, `_sum` and `_count`.\n\n| metric | type | labels | description | defined in |\n| --- | --- | --- | --- | --- |\n");
    for m in metrics_in_source() {
        let labels = m
            .labels
            .iter()
            .map(|l| format!("`{l}`"))
            .collect::<Vec<_>>()
            .join(", ");
        let _ = writeln!(
            out,
            "| `{}` | {} | {} | {} | `{}` |",
            m.name,
            m.kind,
            labels,
            cell(&m.help),
            m.source
        );
    }
    out
}

fn commands_reference() -> String {
    let mut out = String::from(HEADER);
    out.push_str("# Commands, flags and environment variables\n\nOne binary, `commonground`; the chart runs `controller`, `extender` and `agent`. Every flag of those three can also be set through the environment variable shown as `[env: ...]`. Below is each subcommand's `--help`.\n");
    let bin = env!("CARGO_BIN_EXE_commonground");
    let help = |args: &[&str]| {
        let o = Command::new(bin)
            .args(args)
            .env_clear()
            .env("PATH", std::env::var_os("PATH").unwrap_or_default())
            .output()
            .expect("running commonground --help");
        assert!(o.status.success(), "commonground {args:?} failed");
        String::from_utf8(o.stdout).unwrap()
    };
    let _ = write!(
        out,
        "\n```text\n$ commonground --help\n{}```\n",
        help(&["--help"])
    );
    for sub in [
        "controller",
        "extender",
        "agent",
        "relay source",
        "relay target",
        "crd",
        "digest",
        "simulate",
        "estimate",
    ] {
        let mut args: Vec<&str> = sub.split(' ').collect();
        args.push("--help");
        let _ = write!(
            out,
            "\n## `commonground {sub}`\n\n```text\n{}```\n",
            help(&args)
        );
    }
    out
}

#[test]
fn reference_docs_are_fresh() {
    let bless = std::env::var_os("COMMONGROUND_BLESS").is_some();
    let mut stale = Vec::new();
    for (file, text) in [
        ("docs/reference/crds.md", crd_reference()),
        ("docs/reference/metrics.md", metrics_reference()),
        ("docs/reference/commands.md", commands_reference()),
    ] {
        let path = root().join(file);
        if bless {
            std::fs::create_dir_all(path.parent().unwrap()).unwrap();
            std::fs::write(&path, &text).unwrap();
        } else if std::fs::read_to_string(&path).ok().as_deref() != Some(text.as_str()) {
            stale.push(file);
        }
    }
    assert!(stale.is_empty(), "stale: {stale:?}; {RERENDER}");
}

/// The agent gains NET_ADMIN and SYS_ADMIN, the path flags and the KubeVirt CR read only when
/// the relay is put in KubeVirt's path; by default it has SYS_PTRACE alone.
#[test]
fn the_relay_path_adds_its_capabilities_only_when_enabled() {
    let plain = rendered(&[]);
    let relay = rendered(&["relay.enabled=true"]);
    let path = rendered(&["relay.enabled=true", "relay.inMigrationPath=true"]);
    for text in [&plain, &relay] {
        assert!(text.contains("- SYS_PTRACE"));
        assert!(!text.contains("- NET_ADMIN"), "NET_ADMIN without the path");
        assert!(!text.contains("- SYS_ADMIN"));
        assert!(!text.contains("--relay-in-path"));
        assert!(!text.contains("migration TLS is off (KubeVirt CR)"));
    }
    for needle in [
        "- NET_ADMIN",
        "- SYS_ADMIN",
        "- --relay-in-path",
        "- --relay-path-port=7443",
        "- --relay-intercept-port=7444",
        "migration TLS is off (KubeVirt CR)",
    ] {
        assert!(
            path.contains(needle),
            "{needle} missing with the relay path"
        );
    }
    // The path without the relay itself does nothing.
    let alone = rendered(&["relay.inMigrationPath=true"]);
    assert!(!alone.contains("--relay-in-path") && !alone.contains("- NET_ADMIN"));
}

/// `helm template cg charts/commonground --namespace cg --set ...` (helm from scripts/helm.sh).
fn helm_template(sets: &[&str]) -> std::process::Output {
    let helm = Command::new(root().join("scripts/helm.sh"))
        .output()
        .expect("running scripts/helm.sh");
    assert!(
        helm.status.success(),
        "no helm: {}",
        String::from_utf8_lossy(&helm.stderr)
    );
    let helm = String::from_utf8(helm.stdout).unwrap().trim().to_string();
    let mut cmd = Command::new(&helm);
    cmd.args(["template", "cg", "charts/commonground", "--namespace", "cg"])
        .args(["--kube-version", "1.33.0"])
        .current_dir(root());
    for s in sets {
        cmd.args(["--set", s]);
    }
    cmd.output().expect("running helm")
}

/// [`helm_template`]'s output, which must succeed.
fn rendered(sets: &[&str]) -> String {
    let out = helm_template(sets);
    assert!(
        out.status.success(),
        "helm template {sets:?}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8(out.stdout).unwrap()
}

/// The documents of a rendered chart whose `kind:` is `kind` (top-level line).
fn documents_of_kind<'a>(rendered: &'a str, kind: &str) -> Vec<&'a str> {
    let line = format!("\nkind: {kind}\n");
    rendered
        .split("\n---")
        .filter(|d| d.contains(&line))
        .collect()
}

/// scheduler.deploy adds a second kube-scheduler (Deployment, configuration, ServiceAccount,
/// Kubernetes' scheduler roles, its own Lease) whose single profile calls the extender for
/// every pod it gets; nothing of it without the option, and it refuses to render without the
/// extender it exists for.
#[test]
fn the_second_scheduler_is_rendered_only_with_scheduler_deploy() {
    let plain = rendered(&[]);
    assert!(!plain.contains("component: scheduler"));
    assert!(!plain.contains("schedulerName: commonground-scheduler"));

    let with = rendered(&["scheduler.deploy=true"]);
    let scheduler = |kind: &str| -> Vec<&str> {
        documents_of_kind(&with, kind)
            .into_iter()
            .filter(|d| d.contains("app.kubernetes.io/component: scheduler"))
            .collect()
    };
    let deployment = scheduler("Deployment");
    assert_eq!(deployment.len(), 1);
    for needle in [
        "name: cg-commonground-scheduler\n",
        "serviceAccountName: cg-commonground-scheduler",
        "- kube-scheduler",
        "- --config=/etc/commonground-scheduler/config.yaml",
        "image: \"registry.k8s.io/kube-scheduler:",
        "checksum/config:",
    ] {
        assert!(
            deployment[0].contains(needle),
            "{needle} missing:\n{}",
            deployment[0]
        );
    }
    let config = scheduler("ConfigMap");
    assert_eq!(config.len(), 1);
    let config = config[0];
    for needle in [
        "- schedulerName: commonground-scheduler",
        "leaderElect: true",
        "resourceName: commonground-scheduler",
        "resourceNamespace: cg",
        "urlPrefix: \"http://cg-commonground-extender.cg.svc:8888\"",
        "nodeCacheCapable: true",
    ] {
        assert!(config.contains(needle), "{needle} missing:\n{config}");
    }
    // Every pod this scheduler gets opted in: none is kept from the extender.
    assert!(!config.contains("managedResources:"), "{config}");
    assert!(
        !config.contains("kubeconfig:"),
        "in-cluster configuration expected"
    );
    let bindings = scheduler("ClusterRoleBinding");
    for role in ["system:kube-scheduler", "system:volume-scheduler"] {
        assert!(
            bindings
                .iter()
                .any(|b| b.contains(&format!("name: {role}\n"))),
            "no binding to {role}"
        );
    }
    let role = scheduler("Role");
    assert!(role.len() == 1 && role[0].contains("resourceNames: [\"commonground-scheduler\"]"));
    let role_bindings = scheduler("RoleBinding");
    assert!(role_bindings
        .iter()
        .any(|b| b.contains("namespace: kube-system")
            && b.contains("name: extension-apiserver-authentication-reader")));
    assert_eq!(scheduler("ServiceAccount").len(), 1);

    let renamed = rendered(&["scheduler.deploy=true", "scheduler.name=vm-scheduler"]);
    assert!(renamed.contains("- schedulerName: vm-scheduler"));

    let refused = helm_template(&["scheduler.deploy=true", "extender.enabled=false"]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr)
        .contains("scheduler.deploy needs extender.enabled"));
}
