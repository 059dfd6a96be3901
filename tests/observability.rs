//! Observability against the real broker and a real Prometheus: every dashboard query returns
//! data, lag reads transactions right, correlation ids reach commands, outcomes and log lines,
//! `/ready` follows restoration, `/sagas/{id}` shows a saga's history, and the compose file holds
//! together.

mod common;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv, LIMIT};
use common::{free_port, http_get, poll_until, BinProcess};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use saga_streams::saga::query::Partitioner;
use saga_streams::sim::TopicScanner;
use serde_json::Value;

fn repo(path: &str) -> PathBuf {
    PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(path)
}

/// The metric names `docs/METRICS.md` lists.
fn catalogue() -> BTreeSet<String> {
    let text = std::fs::read_to_string(repo("docs/METRICS.md")).unwrap();
    text.lines()
        .filter_map(|l| l.strip_prefix("| `"))
        .filter_map(|l| l.split('`').next())
        .filter(|n| n.starts_with("saga_streams_"))
        .map(str::to_string)
        .collect()
}

/// Every PromQL expression of the Grafana dashboard.
fn dashboard_queries() -> Vec<String> {
    let dashboard: Value = serde_json::from_str(
        &std::fs::read_to_string(repo("deploy/grafana/dashboards/saga-streams.json")).unwrap(),
    )
    .unwrap();
    let mut exprs = Vec::new();
    for panel in dashboard["panels"].as_array().unwrap() {
        for target in panel["targets"].as_array().into_iter().flatten() {
            if let Some(e) = target["expr"].as_str() {
                // The dashboard's variables as Grafana fills them with "All".
                exprs.push(e.replace("$application", ".*").replace("$instance", ".*"));
            }
        }
    }
    exprs
}

/// Metric names an expression mentions, without the histogram suffixes.
fn metric_names(expr: &str) -> Vec<String> {
    let mut names = Vec::new();
    let mut rest = expr;
    while let Some(at) = rest.find("saga_streams_") {
        let name: String = rest[at..]
            .chars()
            .take_while(|c| c.is_ascii_alphanumeric() || *c == '_')
            .collect();
        rest = &rest[at + name.len()..];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| name.strip_suffix(s).filter(|b| b.ends_with("_seconds")))
            .unwrap_or(&name)
            .to_string();
        names.push(base);
    }
    names
}

#[test]
fn every_dashboard_query_names_catalogued_metrics() {
    let catalogue = catalogue();
    assert!(catalogue.len() >= 19, "{catalogue:?}");
    let code = std::fs::read_to_string(repo("src/telemetry/metrics.rs")).unwrap();
    for name in &catalogue {
        assert!(
            code.contains(&format!("\"{name}\"")),
            "{name} is catalogued but not in the code"
        );
    }
    let queries = dashboard_queries();
    assert!(queries.len() >= 15);
    for q in &queries {
        let names = metric_names(q);
        assert!(!names.is_empty(), "no metric in {q}");
        for n in names {
            assert!(
                catalogue.contains(&n),
                "dashboard query names {n}, missing from docs/METRICS.md: {q}"
            );
        }
    }
}

/// A real Prometheus (the Debian package) scraping one process, on a free port.
struct Prometheus {
    child: std::process::Child,
    url: String,
    _dir: tempfile::TempDir,
}

impl Prometheus {
    fn start(target: &str) -> Self {
        let dir = tempfile::tempdir().unwrap();
        let config = dir.path().join("prometheus.yml");
        std::fs::write(
            &config,
            format!(
                "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: saga-streams\n    static_configs:\n      - targets: [\"{target}\"]\n"
            ),
        )
        .unwrap();
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!("--config.file={}", config.display()))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.path().join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::fs::File::create(dir.path().join("prometheus.log")).unwrap())
            .spawn()
            .expect("running prometheus (scripts/deps installs it)");
        let url = format!("http://127.0.0.1:{port}");
        assert!(
            poll_until(Duration::from_secs(60), || http_get(&format!(
                "{url}/-/ready"
            ))
            .0 == 200),
            "prometheus did not become ready"
        );
        Self {
            child,
            url,
            _dir: dir,
        }
    }

    /// The result vector of an instant query.
    fn query(&self, expr: &str) -> Vec<Value> {
        let out = std::process::Command::new("curl")
            .args([
                "-sS",
                "--max-time",
                "5",
                "-G",
                &format!("{}/api/v1/query", self.url),
            ])
            .arg("--data-urlencode")
            .arg(format!("query={expr}"))
            .output()
            .unwrap();
        let body: Value = serde_json::from_slice(&out.stdout).unwrap_or(Value::Null);
        assert_ne!(body["status"], "error", "query failed: {expr}: {body}");
        body["data"]["result"]
            .as_array()
            .cloned()
            .unwrap_or_default()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn participants(env: &SagaEnv, extra: &[&str]) -> Vec<BinProcess> {
    ["payments", "inventory"]
        .iter()
        .map(|step| {
            let mut args = env.args(&["simulate", step], &["--instance-id", "sim"]);
            args.extend(extra.iter().map(|s| s.to_string()));
            args.push("--state-dir".into());
            args.push(
                env.dir
                    .path()
                    .join(format!("sim-{step}"))
                    .display()
                    .to_string(),
            );
            BinProcess::spawn(&args, env.dir.path().join(format!("sim-{step}.log")))
        })
        .collect()
}

fn wait_for_outcomes(env: &SagaEnv, count: usize) {
    let scanner = TopicScanner::new(
        &env.bootstrap,
        &[
            env.def.completed.topic.clone(),
            env.def.cancelled.topic.clone(),
        ],
    )
    .unwrap();
    let mut seen = Vec::new();
    assert!(
        poll_until(LIMIT * 2, || {
            scanner
                .poll_batch(Duration::from_millis(100), &mut seen)
                .unwrap();
            seen.len() >= count
        }),
        "only {} of {count} outcomes",
        seen.len()
    );
}

#[test]
fn prometheus_evaluates_every_dashboard_query_with_data() {
    let env = SagaEnv::new("order_saga.yaml", 2);
    let mut orchestrator = env.orchestrator(
        "a",
        &[
            "--step-timeout",
            "payment=2s",
            "--step-timeout",
            "inventory=2s",
        ],
    );
    let _sims = participants(&env, &["--failure-share", "0.2", "--no-reply-share", "0.1"]);
    let addr = orchestrator.http_addr(LIMIT);
    let prometheus = Prometheus::start(&addr);
    // A duplicate start event and a poison record, so those series exist too.
    env.create("dup-1", &[]);
    env.create("dup-1", &[]);
    env.send_raw(&env.def.start_topic.clone(), Some("bad"), b"not json", &[]);
    let mut load = BinProcess::spawn(
        &env.args(
            &["load"],
            &["--orders", "300", "--rate", "100", "--id-prefix", "obs-"],
        ),
        env.dir.path().join("load.log"),
    );
    assert!(load.child.wait().unwrap().success(), "{}", load.log_text());
    wait_for_outcomes(&env, 301);
    env.reply(0, Reply::Success, "never-started");

    let queries = dashboard_queries();
    let mut missing: Vec<String> = queries.clone();
    let deadline = Instant::now() + LIMIT;
    while !missing.is_empty() && Instant::now() < deadline {
        missing.retain(|q| prometheus.query(q).is_empty());
        std::thread::sleep(Duration::from_millis(500));
    }
    orchestrator.assert_alive();
    assert!(
        missing.is_empty(),
        "dashboard queries without data: {missing:#?}"
    );
    // The figures are the saga's: 301 sagas started and held, two dead letters.
    for (expr, expected) in [
        ("sum(saga_streams_sagas_started_total)", "301"),
        ("sum(saga_streams_sagas)", "301"),
        ("sum(saga_streams_dlq_records_total)", "2"),
    ] {
        let mut last = Vec::new();
        let ok = poll_until(Duration::from_secs(30), || {
            last = prometheus.query(expr);
            last.first().is_some_and(|v| v["value"][1] == expected)
        });
        assert!(ok, "{expr}: expected {expected}, got {last:?}");
    }
}

#[test]
fn lag_is_exactly_zero_after_transactional_inputs_are_processed() {
    let env = SagaEnv::new("order_saga.yaml", 3);
    let mut orchestrator = env.orchestrator("a", &[]);
    let _sims = participants(&env, &["--failure-share", "0.1"]);
    let addr = orchestrator.http_addr(LIMIT);
    let mut load = BinProcess::spawn(
        &env.args(
            &["load"],
            &[
                "--orders",
                "400",
                "--rate",
                "0",
                "--transaction-size",
                "25",
                "--id-prefix",
                "lag-",
            ],
        ),
        env.dir.path().join("load.log"),
    );
    assert!(load.child.wait().unwrap().success(), "{}", load.log_text());
    wait_for_outcomes(&env, 400);

    let group = format!("{}{}", env.prefix, env.def.name);
    let inputs = env.def.input_topics();
    let lag_table = || {
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
            .args([
                "lag",
                "--bootstrap",
                &env.bootstrap,
                "--group",
                &group,
                "--topics",
                &inputs.join(","),
            ])
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    // The last transactions commit within a cycle or two after the last outcome.
    let mut table = String::new();
    let zero = poll_until(Duration::from_secs(30), || {
        table = lag_table();
        rows(&table).iter().all(|r| r[4] == "0") && !rows(&table).is_empty()
    });
    assert!(zero, "lag never reached 0:\n{table}");

    // The committed offsets printed are the broker's.
    let reader: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("group.id", &group)
        .create()
        .unwrap();
    let mut tpl = TopicPartitionList::new();
    for t in &inputs {
        for p in 0..3 {
            tpl.add_partition(t, p);
        }
    }
    let committed = reader
        .committed_offsets(tpl, Duration::from_secs(10))
        .unwrap();
    let rows = rows(&table);
    assert_eq!(rows.len(), 9, "{table}");
    let mut behind_a_marker = 0;
    for e in committed.elements() {
        let Offset::Offset(offset) = e.offset() else {
            panic!("no committed offset for {}/{}", e.topic(), e.partition())
        };
        let row = rows
            .iter()
            .find(|r| r[0] == e.topic() && r[1] == e.partition().to_string())
            .unwrap_or_else(|| panic!("{}/{} missing:\n{table}", e.topic(), e.partition()));
        assert_eq!(row[2], offset.to_string(), "{table}");
        let end: i64 = row[3].parse().unwrap();
        behind_a_marker += usize::from(end > offset);
    }
    // The inputs were written in transactions: some committed offsets stop before a commit
    // marker, and that gap is not counted as lag.
    assert!(
        behind_a_marker > 0,
        "no partition ends with a marker:\n{table}"
    );

    // The gauge agrees: every input partition at 0, the repartition and control topics' (inputs
    // of the application too) included.
    let gauge_zero = poll_until(Duration::from_secs(30), || {
        let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
        let lines: Vec<&str> = metrics
            .lines()
            .filter(|l| l.starts_with("saga_streams_consumer_lag{"))
            .collect();
        lines.len() == 15 && lines.iter().all(|l| l.ends_with(" 0"))
    });
    let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
    assert!(
        gauge_zero,
        "lag gauge not 0: {:?}",
        metrics
            .lines()
            .filter(|l| l.contains("consumer_lag"))
            .collect::<Vec<_>>()
    );
}

/// Rows of the lag table: topic, partition, committed, end, lag.
fn rows(table: &str) -> Vec<Vec<String>> {
    table
        .lines()
        .filter(|l| l.starts_with('|'))
        .map(|l| {
            l.split('|')
                .map(|c| c.trim().to_string())
                .filter(|c| !c.is_empty())
                .collect::<Vec<_>>()
        })
        .filter(|r: &Vec<String>| r.len() == 5 && r[1].parse::<i32>().is_ok() && r[0] != "total")
        .collect()
}

#[test]
fn a_correlation_id_reaches_every_command_the_outcome_and_the_log_lines() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut orchestrator = env.orchestrator_logging(
        "a",
        &[],
        "info,saga_streams::saga=debug,librdkafka=warn,rdkafka=warn",
    );
    env.create("c-1", &[("X-Correlation-ID", "corr-trace-42")]);
    env.expect("c-1", "ProcessPayment");
    env.reply(0, Reply::Success, "c-1");
    env.expect("c-1", "ReserveInventory");
    env.reply(1, Reply::Failure, "c-1");
    env.expect("c-1", "RefundPayment");
    env.reply(0, Reply::Compensated, "c-1");
    env.expect("c-1", "OrderCancelled");
    let outputs: Vec<_> = env
        .seen
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"c-1"))
        .collect();
    assert_eq!(outputs.len(), 4);
    for r in &outputs {
        assert_eq!(
            r.header("X-Correlation-ID").as_deref(),
            Some("corr-trace-42")
        );
        assert_eq!(common::saga_env::body(r)["correlation_id"], "corr-trace-42");
    }
    // Each of the four inputs of that saga was processed inside a span carrying its ids.
    let lines_with_id = || {
        orchestrator
            .log_lines()
            .into_iter()
            .filter(|l| {
                l["span"]["correlation_id"] == "corr-trace-42" && l["span"]["saga_id"] == "c-1"
            })
            .collect::<Vec<_>>()
    };
    assert!(
        poll_until(Duration::from_secs(10), || lines_with_id().len() >= 4),
        "log lines:\n{}",
        orchestrator.log_text()
    );
    let types: BTreeSet<String> = lines_with_id()
        .iter()
        .filter_map(|l| l["span"]["event_type"].as_str().map(str::to_string))
        .collect();
    for t in [
        "OrderCreated",
        "PaymentSucceeded",
        "InventoryReservationFailed",
        "PaymentRefunded",
    ] {
        assert!(types.contains(t), "no log line for {t}: {types:?}");
    }
    orchestrator.assert_alive();
}

#[test]
fn ready_follows_a_full_restore_and_sagas_show_their_history() {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let key_in = |partition: i32, prefix: &str| {
        (0..)
            .map(|i| format!("{prefix}-{i}"))
            .find(|k| Partitioner::ConsistentRandom.partition(k.as_bytes(), 2) == partition)
            .unwrap()
    };
    let (done, undone) = (key_in(0, "done"), key_in(0, "undone"));
    let mut a = env.orchestrator("a", &[]);
    env.create(&done, &[]);
    env.create(&undone, &[]);
    env.expect(&done, "ProcessPayment");
    env.expect(&undone, "ProcessPayment");
    env.reply(0, Reply::Success, &done);
    env.reply(0, Reply::Success, &undone);
    env.expect(&done, "ReserveInventory");
    env.expect(&undone, "ReserveInventory");
    env.reply(1, Reply::Success, &done);
    env.reply(1, Reply::Failure, &undone);
    env.expect(&undone, "RefundPayment");
    env.reply(0, Reply::Compensated, &undone);
    env.expect(&done, "OrderCompleted");
    env.expect(&undone, "OrderCancelled");
    a.sigterm(Duration::from_secs(30))
        .expect("instance a stops on SIGTERM");

    // Grow the changelog so a full restore takes a while: records under a key prefix the saga
    // never reads.
    let changelog = format!("{}{}-sagas-changelog", env.prefix, env.def.name);
    let producer: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("linger.ms", "20")
        .create()
        .unwrap();
    for i in 0..150_000 {
        let key = format!("x/filler-{i}");
        loop {
            match producer.send(
                BaseRecord::to(&changelog)
                    .partition(0)
                    .key(&key)
                    .payload("{}"),
            ) {
                Ok(()) => break,
                Err((_, _)) => producer.poll(Duration::from_millis(10)),
            };
        }
    }
    producer.flush(Duration::from_secs(60)).unwrap();

    // Another instance, with no local state: a full restore of the changelog.
    let mut b = env.orchestrator("b", &[]);
    let addr = b.http_addr(LIMIT);
    let mut saw_not_ready = false;
    let ready = poll_until(LIMIT * 2, || {
        let (code, body) = http_get(&format!("http://{addr}/ready"));
        if code == 503 {
            saw_not_ready = true;
        }
        code == 200 && body.contains("\"ready\":true")
    });
    assert!(ready, "never ready:\n{}", b.log_text());
    assert!(saw_not_ready, "/ready was never false");
    let restored: u64 = b
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "restore finished")
        .filter_map(|l| l["records"].as_u64())
        .sum();
    assert!(
        restored >= 150_000,
        "not a full restore: {restored} records"
    );

    let saga = |id: &str| {
        let (code, body) = http_get(&format!("http://{addr}/sagas/{id}"));
        (
            code,
            serde_json::from_str::<Value>(&body).unwrap_or(Value::Null),
        )
    };
    let (code, completed) = saga(&done);
    assert_eq!(code, 200, "{completed}");
    assert_eq!(completed["status"], "COMPLETED");
    let path: Vec<&str> = completed["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect();
    assert_eq!(
        path,
        [
            "PENDING",
            "PAYMENT_COMPLETED",
            "INVENTORY_RESERVED",
            "COMPLETED"
        ]
    );
    assert!(completed["context"]["total"].is_number());
    let (code, compensated) = saga(&undone);
    assert_eq!(code, 200, "{compensated}");
    assert_eq!(compensated["status"], "REFUNDED");
    assert_eq!(compensated["outcome"]["reason"], "inventory_failed");
    let path: Vec<&str> = compensated["history"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|t| t["to"].as_str())
        .collect();
    assert_eq!(
        path,
        ["PENDING", "PAYMENT_COMPLETED", "COMPENSATING", "REFUNDED"]
    );
    let (code, _) = saga(&key_in(0, "nobody"));
    assert_eq!(code, 404);

    // With a second instance, one partition moves there: this one asks it, and says so.
    let mut c = env.orchestrator("c", &[]);
    let served_by = |id: &str| {
        let response = reqwest::blocking::get(format!("http://{addr}/sagas/{id}")).unwrap();
        let by = response
            .headers()
            .get("x-saga-streams-served-by")
            .and_then(|v| v.to_str().ok())
            .map(str::to_string);
        (response.status().as_u16(), by)
    };
    let mut moved_to = None;
    let moved = poll_until(LIMIT, || {
        moved_to = (0..2).find_map(|p| match served_by(&key_in(p, "elsewhere")) {
            (404, Some(by)) => Some((p, by)),
            _ => None,
        });
        moved_to.is_some()
    });
    c.assert_alive();
    assert!(moved, "no partition moved to the second instance");
    let (partition, by) = moved_to.unwrap_or_default();
    assert_eq!(by, "c");
    let (_, answer) = saga(&key_in(partition, "elsewhere"));
    assert_eq!(answer["partition"], partition, "{answer}");
    assert_eq!(
        answer["owned_here"], true,
        "the owner's own answer: {answer}"
    );
    assert_eq!(http_get(&format!("http://{addr}/health")).0, 200);
}

#[test]
fn docker_compose_holds_together() {
    let text = std::fs::read_to_string(repo("docker-compose.yml")).unwrap();
    let root = marked_yaml::parse_yaml(0, &text).unwrap();
    let services = root
        .as_mapping()
        .and_then(|m| m.get_mapping("services"))
        .expect("a services mapping");
    let names: BTreeSet<String> = services.keys().map(|k| k.as_str().to_string()).collect();
    for wanted in [
        "kafka",
        "schema-registry",
        "prometheus",
        "grafana",
        "orchestrator-1",
        "orchestrator-2",
        "orchestrator-3",
        "sim-payments",
        "sim-inventory",
        "load",
    ] {
        assert!(
            names.contains(wanted),
            "service {wanted} missing: {names:?}"
        );
    }
    let mut built = false;
    for (name, service) in services.iter() {
        let name = name.as_str();
        let service = service
            .as_mapping()
            .unwrap_or_else(|| panic!("{name} is not a mapping"));
        assert!(
            service.get("image").is_some() || service.get("build").is_some(),
            "{name} has neither image nor build"
        );
        built |= service.get("build").is_some();
        for port in service
            .get_sequence("ports")
            .into_iter()
            .flat_map(|s| s.iter())
        {
            let port = port.as_scalar().unwrap().as_str();
            assert!(
                port.starts_with("127.0.0.1:"),
                "{name} publishes {port} beyond loopback"
            );
        }
        if let Some(deps) = service.get("depends_on") {
            let deps: Vec<String> = match (deps.as_sequence(), deps.as_mapping()) {
                (Some(seq), _) => seq
                    .iter()
                    .filter_map(|d| d.as_scalar().map(|s| s.as_str().to_string()))
                    .collect(),
                (_, Some(map)) => map.keys().map(|k| k.as_str().to_string()).collect(),
                _ => panic!("{name}: depends_on is neither a list nor a mapping"),
            };
            for dep in deps {
                assert!(
                    names.contains(&dep),
                    "{name} depends on unknown service {dep}"
                );
            }
        }
        for volume in service
            .get_sequence("volumes")
            .into_iter()
            .flat_map(|s| s.iter())
        {
            let volume = volume.as_scalar().unwrap().as_str();
            if let Some(source) = volume.split(':').next().filter(|s| s.starts_with("./")) {
                assert!(
                    repo(source).exists(),
                    "{name} mounts {source}, which is not in the repository"
                );
            }
        }
    }
    assert!(built, "no service builds the saga-streams image");
    let dockerfile = std::fs::read_to_string(repo("Dockerfile")).unwrap();
    assert!(
        dockerfile
            .lines()
            .filter(|l| l.starts_with("FROM "))
            .count()
            >= 2,
        "not multi-stage"
    );
    assert!(Path::new(&repo("deploy/grafana/dashboards/saga-streams.json")).exists());
    let prometheus = std::fs::read_to_string(repo("deploy/prometheus/prometheus.yml")).unwrap();
    for orchestrator in [
        "orchestrator-1:9464",
        "orchestrator-2:9464",
        "orchestrator-3:9464",
    ] {
        assert!(
            prometheus.contains(orchestrator),
            "prometheus does not scrape {orchestrator}"
        );
    }
}

#[test]
fn metrics_carry_the_application_id_and_known_series_start_at_zero() {
    let env = SagaEnv::new("order_saga.yaml", 1);
    let mut orchestrator = env.orchestrator("a", &[]);
    let addr = orchestrator.http_addr(LIMIT);
    let application = format!("{}{}", env.prefix, env.def.name);
    let (code, metrics) = http_get(&format!("http://{addr}/metrics"));
    assert_eq!(code, 200);
    // Before any record: dead letters per input topic and reason, outcomes, per-step series and
    // sagas per status exist, at 0.
    let has = |name: &str, labels: &[(&str, &str)]| {
        metrics.lines().any(|l| {
            l.starts_with(&format!("{name}{{"))
                && l.ends_with(" 0")
                && l.contains(&format!("application_id=\"{application}\""))
                && labels
                    .iter()
                    .all(|(k, v)| l.contains(&format!("{k}=\"{v}\"")))
        })
    };
    let start = env.def.start_topic.clone();
    for (name, labels) in [
        (
            "saga_streams_dlq_records_total",
            vec![("topic", start.as_str()), ("reason", "missing_key")],
        ),
        (
            "saga_streams_dlq_records_total",
            vec![("topic", start.as_str()), ("reason", "bad_signature")],
        ),
        (
            "saga_streams_saga_outcomes_total",
            vec![("outcome", "completed")],
        ),
        (
            "saga_streams_saga_outcomes_total",
            vec![("outcome", "cancelled"), ("reason", "timeout:payment")],
        ),
        ("saga_streams_timeouts_total", vec![("step", "inventory")]),
        (
            "saga_streams_compensations_total",
            vec![("step", "payment"), ("late", "true")],
        ),
        ("saga_streams_sagas", vec![("status", "COMPENSATION_STUCK")]),
    ] {
        assert!(has(name, &labels), "no {name} {labels:?} at 0:\n{metrics}");
    }
    // The standard process metrics, with the application id too.
    for name in [
        "process_cpu_seconds_total",
        "process_resident_memory_bytes",
        "process_open_fds",
    ] {
        assert!(
            metrics
                .lines()
                .any(|l| l.starts_with(name)
                    && l.contains(&format!("application_id=\"{application}\""))),
            "no {name}:\n{metrics}"
        );
    }
    // Readiness as a gauge, with the application id.
    assert!(
        poll_until(LIMIT, || {
            let (_, m) = http_get(&format!("http://{addr}/metrics"));
            m.lines().any(|l| {
                l.starts_with("saga_streams_ready{")
                    && l.contains(&format!("application_id=\"{application}\""))
                    && l.ends_with(" 1")
            })
        }),
        "never ready in the metrics"
    );
    orchestrator.assert_alive();
}

#[test]
fn an_instance_without_tasks_is_ready_once_it_joined() {
    // One partition, two instances: the second has nothing to do, and must not hold up a
    // rolling update.
    let env = SagaEnv::new("order_saga.yaml", 1);
    let mut a = env.orchestrator("a", &[]);
    let a_addr = a.http_addr(LIMIT);
    assert!(poll_until(LIMIT, || http_get(&format!(
        "http://{a_addr}/ready"
    ))
    .0 == 200));
    let mut b = env.orchestrator(
        "b",
        &["--advertised-http", "saga-b.saga-headless.orders.svc:9464"],
    );
    let b_addr = b.http_addr(LIMIT);
    let mut last = (0, String::new());
    assert!(
        poll_until(LIMIT, || {
            last = http_get(&format!("http://{b_addr}/ready"));
            last.0 == 200
        }),
        "the spare instance never became ready: {last:?}\n{}",
        b.log_text()
    );
    let body: Value = serde_json::from_str(&last.1).unwrap();
    assert_eq!(body["joined"], true, "{body}");
    assert_eq!(body["assigned_tasks"], 0, "{body}");
    assert_eq!(
        body["advertised_http"], "saga-b.saga-headless.orders.svc:9464",
        "{body}"
    );
    // The first still holds the task and is ready too.
    assert_eq!(http_get(&format!("http://{a_addr}/ready")).0, 200);
    a.assert_alive();
    b.assert_alive();
}

/// The value of `saga_streams_consumer_lag_seconds` for `topic` (partition 0) in a scrape.
fn lag_seconds(metrics: &str, topic: &str) -> Option<f64> {
    metrics
        .lines()
        .filter(|l| l.starts_with("saga_streams_consumer_lag_seconds{"))
        .filter(|l| l.contains(&format!("topic=\"{topic}\"")) && l.contains("partition=\"0\""))
        .find_map(|l| l.rsplit(' ').next()?.parse().ok())
}

#[test]
fn lag_in_time_is_the_age_of_the_oldest_input_not_yet_committed() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let orders = env.def.start_topic.clone();
    // Every commit fails: what the orchestrator reads stays uncommitted, and is tried again.
    let mut stuck = env.orchestrator_with_env(
        "a",
        &[],
        &[(
            "SAGA_STREAMS_FAILPOINTS",
            "commit-transaction=return(abortable)",
        )],
    );
    let addr = stuck.http_addr(Duration::from_secs(30));
    // An order created ten minutes ago (its record timestamp), as a producer that was down
    // writes its backlog.
    let created_ms = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_millis() as i64
        - 600_000;
    let mut body = saga_streams::sim::load::order_created(&env.def, "o-old");
    body["occurred_at"] = Value::Null;
    let value = serde_json::json!({ "event": body }).to_string();
    env.producer
        .send(
            BaseRecord::to(&orders)
                .key("o-old")
                .payload(&value)
                .timestamp(created_ms),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    env.producer.flush(Duration::from_secs(10)).unwrap();
    let mut seen = None;
    let behind = poll_until(Duration::from_secs(60), || {
        let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
        seen = lag_seconds(&metrics, &orders);
        seen.is_some_and(|s| (595.0..900.0).contains(&s))
    });
    assert!(
        behind,
        "lag in time never showed the ten-minute-old order: {seen:?}"
    );
    // It stays behind while the commits fail: the gauge does not fall back between retries
    // (each retry re-reads the record). Watched over several retries (they back off from 0.5 s).
    let watch_until = Instant::now() + Duration::from_secs(5);
    while Instant::now() < watch_until {
        let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
        let now = lag_seconds(&metrics, &orders);
        assert!(now.is_some_and(|s| s >= 595.0), "fell back to {now:?}");
        std::thread::sleep(Duration::from_millis(100));
    }
    assert!(stuck.sigterm(Duration::from_secs(30)).is_some());

    // An instance that processes and commits it is caught up: 0.
    let mut working = env.orchestrator("b", &[]);
    env.expect("o-old", "ProcessPayment");
    let addr = working.http_addr(Duration::from_secs(30));
    let caught_up = poll_until(Duration::from_secs(60), || {
        let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
        seen = lag_seconds(&metrics, &orders);
        seen == Some(0.0)
    });
    assert!(caught_up, "lag in time not 0 once caught up: {seen:?}");
}
