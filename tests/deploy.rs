//! Deployment artefacts checked by the real tools: the alert rules by `promtool` (syntax and unit
//! tests), the Helm chart by `helm lint --strict` and `helm template` for several value sets, the
//! rendered manifests by an independent Kubernetes schema validator (`kubernetes-validate`), and
//! the settings the chart gives the container by the binary itself (`config show`).
//! No cluster runs here: what a cluster would add (scheduling, volumes, probes answering) is not
//! verified.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

const CHART: &str = "deploy/helm/saga-streams";

/// A tool from the cache `scripts/deps` installs into, or from PATH.
fn tool(name: &str, env: &str, cached: PathBuf) -> PathBuf {
    if let Ok(path) = std::env::var(env) {
        return PathBuf::from(path);
    }
    if cached.exists() {
        return cached;
    }
    PathBuf::from(name)
}

fn cache() -> PathBuf {
    std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
        .join("saga-streams")
}

fn helm() -> PathBuf {
    tool("helm", "SAGA_STREAMS_HELM", cache().join("bin/helm"))
}

fn validator() -> PathBuf {
    let venv_bin = std::env::var("SAGA_STREAMS_INTEROP_PYTHON")
        .map(|p| PathBuf::from(p).with_file_name("kubernetes-validate"))
        .unwrap_or_else(|_| cache().join("venv/bin/kubernetes-validate"));
    tool(
        "kubernetes-validate",
        "SAGA_STREAMS_KUBE_VALIDATE",
        venv_bin,
    )
}

fn run(program: &Path, args: &[&str], dir: &Path) -> (Output, String) {
    let out = Command::new(program)
        .args(args)
        .current_dir(dir)
        .output()
        .unwrap_or_else(|e| {
            panic!(
                "running {} failed ({e}); scripts/deps installs it",
                program.display()
            )
        });
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    (out, text)
}

#[test]
fn alert_rules_pass_promtool_and_their_unit_tests() {
    let dir = repo("deploy/prometheus");
    let promtool = PathBuf::from("promtool");
    let (out, text) = run(&promtool, &["check", "rules", "alerts.yml"], &dir);
    assert!(out.status.success(), "{text}");
    let (out, text) = run(&promtool, &["test", "rules", "alerts.test.yml"], &dir);
    assert!(out.status.success(), "{text}");
    // The chart ships the same rules.
    assert_eq!(
        std::fs::read_to_string(dir.join("alerts.yml")).unwrap(),
        std::fs::read_to_string(repo(&format!("{CHART}/files/alerts.yml"))).unwrap(),
        "deploy/helm/saga-streams/files/alerts.yml differs from deploy/prometheus/alerts.yml: copy it"
    );
}

/// `helm template` with `values` (a file of the chart's `ci/`, or none): the manifests.
fn render(values: Option<&str>) -> String {
    let mut args = vec!["template", "saga", "."];
    if let Some(v) = values {
        args.extend(["-f", v]);
    }
    let (out, text) = run(&helm(), &args, &repo(CHART));
    assert!(out.status.success(), "helm template {values:?}:\n{text}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[test]
fn the_chart_lints_renders_and_its_manifests_validate() {
    let dir = tempfile::tempdir().unwrap();
    for values in [
        None,
        Some("ci/secured-values.yaml"),
        Some("ci/demo-values.yaml"),
    ] {
        let mut lint = vec!["lint", "--strict", "."];
        if let Some(v) = values {
            lint.extend(["-f", v]);
        }
        let (out, text) = run(&helm(), &lint, &repo(CHART));
        assert!(out.status.success(), "helm lint {values:?}:\n{text}");

        let manifests = render(values);
        let file = dir.path().join("manifests.yaml");
        std::fs::write(&file, &manifests).unwrap();
        let (out, text) = run(
            &validator(),
            &["--strict", &file.display().to_string()],
            dir.path(),
        );
        assert!(
            out.status.success() && !text.contains("ERROR"),
            "{values:?} does not validate:\n{text}"
        );
        for kind in ["StatefulSet", "Service"] {
            assert!(
                text.contains(&format!("passed for resource {}/", kind.to_lowercase())),
                "{values:?}: no {kind} validated:\n{text}"
            );
        }
    }

    // The secured values: secrets as files, probes over HTTPS, the pod name as instance id.
    let secured = render(Some("ci/secured-values.yaml"));
    for expected in [
        "SAGA_STREAMS_KAFKA_SASL_PASSWORD_FILE",
        "/run/secrets/saga/kafka-password",
        "secretName: saga-streams-secrets",
        "scheme: HTTPS",
        "fieldPath: metadata.name",
        "path: /ready",
        "kind: PodDisruptionBudget",
        "volumeClaimTemplates",
    ] {
        assert!(secured.contains(expected), "no {expected}:\n{secured}");
    }
    // The demo values: simulators, a ServiceMonitor, and every alert rule as a PrometheusRule.
    let demo = render(Some("ci/demo-values.yaml"));
    assert!(demo.contains("kind: ServiceMonitor") && demo.contains("kind: PrometheusRule"));
    assert!(demo.contains("sim-payment") && demo.contains("sim-inventory"));
    let rules = std::fs::read_to_string(repo("deploy/prometheus/alerts.yml")).unwrap();
    for alert in rules
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert: "))
    {
        assert!(
            demo.contains(&format!("alert: {alert}")),
            "{alert} not in the PrometheusRule"
        );
    }
}

/// The environment the chart gives the orchestrator container: (name, value) pairs of its
/// StatefulSet's `env` with literal values.
fn orchestrator_env(manifests: &str) -> Vec<(String, String)> {
    let doc = manifests
        .split("\n---")
        .find(|d| d.contains("kind: StatefulSet") && d.contains("args: [\"run\"]"))
        .expect("the orchestrator's StatefulSet");
    let lines: Vec<&str> = doc.lines().map(str::trim).collect();
    let mut env = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        let Some(name) = line.strip_prefix("- name: SAGA_STREAMS_") else {
            continue;
        };
        if let Some(value) = lines.get(i + 1).and_then(|l| l.strip_prefix("value: ")) {
            env.push((
                format!("SAGA_STREAMS_{name}"),
                value.trim_matches('"').to_string(),
            ));
        }
    }
    env
}

#[test]
fn the_settings_the_chart_renders_are_the_ones_the_binary_reads() {
    let secrets = tempfile::tempdir().unwrap();
    let env = orchestrator_env(&render(Some("ci/secured-values.yaml")));
    assert!(env.len() > 10, "{env:?}");
    let mut command = Command::new(env!("CARGO_BIN_EXE_saga-streams"));
    command.args(["config", "show"]).env_clear();
    command.env("PATH", std::env::var("PATH").unwrap_or_default());
    for (name, value) in &env {
        // The secret mount, as files of a temporary directory.
        let value = match value.strip_prefix("/run/secrets/saga/") {
            Some(key) => {
                let path = secrets.path().join(key);
                std::fs::write(&path, format!("secret-of-{key}\n")).unwrap();
                path.display().to_string()
            }
            // Kubernetes expands $(VAR) from the variables before it.
            None => value
                .replace("$(SAGA_STREAMS_INSTANCE_ID)", "saga-0")
                .replace("$(POD_NAMESPACE)", "orders"),
        };
        command.env(name, value);
    }
    let out = command.output().unwrap();
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{text}");
    let ca = secrets.path().join("ca.pem").display().to_string();
    for expected in [
        "security.protocol: SASL_SSL".to_string(),
        "sasl.mechanism: SCRAM-SHA-512".to_string(),
        "sasl.username: orders".to_string(),
        "sasl.password: *** (from".to_string(),
        format!("ssl.ca.location: {ca}"),
        "bootstrap: broker-1.kafka:9094".to_string(),
        "SAGA_STREAMS_APPLICATION_ID: orders".to_string(),
        "SAGA_STREAMS_TOPIC_PREFIX: prod.".to_string(),
        "SAGA_STREAMS_STANDBY_REPLICAS: 2".to_string(),
        "SAGA_STREAMS_STATIC_MEMBERSHIP: true".to_string(),
        "SAGA_STREAMS_SESSION_TIMEOUT: 15s".to_string(),
        "SAGA_STREAMS_HEARTBEAT_INTERVAL: 2s".to_string(),
        "SAGA_STREAMS_WARM_UP_TIMEOUT: 5m".to_string(),
        // Each pod advertises its stable name under the headless Service.
        "SAGA_STREAMS_ADVERTISED_HTTP: saga-0.".to_string(),
        "-headless.orders.svc:9464".to_string(),
    ] {
        assert!(text.contains(&expected), "no '{expected}' in:\n{text}");
    }
    assert!(!text.contains("secret-of-"), "a secret is shown:\n{text}");
}

#[test]
fn the_dockerfile_ships_the_schemas_runs_as_non_root_and_checks_health() {
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    let runtime_stage = dockerfile
        .rsplit("\nFROM ")
        .next()
        .expect("a multi-stage Dockerfile");
    for expected in [
        "COPY topologies /app/topologies",
        "COPY schemas /app/schemas",
        "HEALTHCHECK",
        "/health",
    ] {
        assert!(
            runtime_stage.contains(expected),
            "no {expected} in the runtime stage"
        );
    }
    let user = runtime_stage
        .lines()
        .rev()
        .find_map(|l| l.strip_prefix("USER "))
        .expect("a USER");
    assert_ne!(user.trim(), "root");
    // Every topology's schema directory is in the image, where the topology looks for it.
    for entry in std::fs::read_dir(repo("topologies")).unwrap() {
        let path = entry.unwrap().path();
        if !path.is_file() {
            continue;
        }
        let text = std::fs::read_to_string(&path).unwrap();
        if let Some(dir) = text
            .lines()
            .find_map(|l| l.strip_prefix("schemas: "))
            .map(str::trim)
        {
            let resolved = Path::new("/app/topologies").join(dir);
            let shipped = resolved.components().fold(PathBuf::new(), |mut p, c| {
                match c {
                    std::path::Component::ParentDir => {
                        p.pop();
                    }
                    other => p.push(other),
                }
                p
            });
            assert!(
                runtime_stage.contains(&format!(" {}", shipped.display())),
                "{} names {dir} ({}), which the image does not copy",
                path.display(),
                shipped.display()
            );
        }
    }
}
