//! `saga-streams contract`: the exported JSON Schemas accept every message a real run writes (the
//! demo on the local stack: orchestrator, simulated participants, order generator) and refuse a
//! changed one, checked by Python's `jsonschema`; the AsyncAPI document passes the official
//! AsyncAPI 3.0 JSON Schema; the README's example of every message passes its schema.

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use saga_streams::saga::SagaDefinition;
use saga_streams::sim;
use serde_json::{json, Value};

fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn cache(path: &str) -> PathBuf {
    std::env::var("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from(std::env::var("HOME").unwrap()).join(".cache"))
        .join("saga-streams")
        .join(path)
}

fn python() -> PathBuf {
    std::env::var("SAGA_STREAMS_INTEROP_PYTHON")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache("venv/bin/python"))
}

/// The official AsyncAPI 3.0 JSON Schema (`scripts/deps` installs it from npm).
fn asyncapi_spec() -> PathBuf {
    let spec = std::env::var("SAGA_STREAMS_ASYNCAPI_SPEC")
        .map(PathBuf::from)
        .unwrap_or_else(|_| cache("npm/node_modules/@asyncapi/specs/schemas/3.0.0.json"));
    assert!(
        spec.exists(),
        "{} missing: run scripts/deps",
        spec.display()
    );
    spec
}

/// `saga-streams contract TOPOLOGY --out DIR`.
fn export(topology: &str) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args(["contract", topology, "--out"])
        .arg(dir.path())
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    dir
}

/// Runs the independent validator over `(topic, value)` messages: (passed, its report).
fn validate(schemas: &Path, messages: &[(String, String)], asyncapi: bool) -> (bool, Value) {
    let file = schemas.join("messages.jsonl");
    let lines: Vec<String> = messages
        .iter()
        .map(|(topic, value)| json!({"topic": topic, "value": value}).to_string())
        .collect();
    std::fs::write(&file, lines.join("\n")).unwrap();
    let mut cmd = Command::new(python());
    cmd.arg(repo("tests/fixtures/validate_contract.py"))
        .arg(schemas)
        .arg(&file);
    if asyncapi {
        cmd.arg(asyncapi_spec());
    }
    let out = cmd.output().unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    let report: Value = serde_json::from_str(stdout.trim()).unwrap_or_else(|_| {
        panic!(
            "validator output: {stdout}\n{}",
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), report)
}

#[test]
fn every_message_of_a_real_demo_run_matches_the_exported_schemas() {
    let bootstrap = common::kafka_bootstrap();
    let prefix = format!("{}.", common::unique("contract"));
    let topology = repo("topologies/order_saga.yaml");
    let out = Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args(["demo", "--bootstrap", &bootstrap, "--topology"])
        .arg(&topology)
        .args([
            "--orders",
            "400",
            "--rate",
            "0",
            "--partitions",
            "2",
            "--step-timeout",
            "2s",
            "--topic-prefix",
            &prefix,
        ])
        .env("RUST_LOG", "warn")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "demo failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let def = SagaDefinition::load(&topology).unwrap();
    let mut topics: Vec<String> = def.input_topics();
    topics.extend(
        def.output_topics()
            .into_iter()
            .filter(|t| !t.ends_with(".dlq")),
    );
    let prefixed: Vec<String> = topics.iter().map(|t| format!("{prefix}{t}")).collect();
    let records = sim::read_to_end(&bootstrap, &prefixed, Duration::from_secs(120)).unwrap();
    let messages: Vec<(String, String)> = records
        .iter()
        .map(|r| {
            (
                r.topic
                    .strip_prefix(&prefix)
                    .unwrap_or(&r.topic)
                    .to_string(),
                String::from_utf8_lossy(r.value.as_deref().unwrap_or_default()).into_owned(),
            )
        })
        .collect();
    assert!(messages.len() > 1_000, "{} messages", messages.len());
    let schemas = export(topology.to_str().unwrap());
    let (ok, report) = validate(schemas.path(), &messages, true);
    assert!(ok, "{report:#}");
    // The demo's declines, failed reservations and silent participants produce these.
    for event_type in [
        "OrderCreated",
        "ProcessPayment",
        "PaymentSucceeded",
        "PaymentFailed",
        "ReserveInventory",
        "InventoryReserved",
        "InventoryReservationFailed",
        "RefundPayment",
        "PaymentRefunded",
        "OrderCompleted",
        "OrderCancelled",
    ] {
        assert!(
            report["valid"][event_type].as_u64().unwrap_or(0) > 0,
            "no valid {event_type} seen: {report:#}"
        );
    }

    // The validator refuses what breaks the contract: a command whose amount is a boolean, an
    // outcome with a field the saga never writes, an event on a topic the contract does not
    // put it on.
    let find = |event_type: &str| {
        messages
            .iter()
            .find(|(_, v)| v.contains(&format!("\"event_type\":\"{event_type}\"")))
            .cloned()
            .unwrap()
    };
    let (topic, value) = find("ProcessPayment");
    let mut bad: Value = serde_json::from_str(&value).unwrap();
    bad["event"]["amount"] = json!(true);
    let (topic2, value2) = find("OrderCompleted");
    let mut extra: Value = serde_json::from_str(&value2).unwrap();
    extra["event"]["discount"] = json!(5);
    let (topic3, value3) = find("PaymentSucceeded");
    let reply: Value = serde_json::from_str(&value3).unwrap();
    let with_event = |change: &dyn Fn(&mut serde_json::Map<String, Value>)| {
        let mut v = reply.clone();
        let event = match v.get_mut("event") {
            Some(Value::Object(inner)) => inner,
            _ => v.as_object_mut().unwrap(),
        };
        change(event);
        v.to_string()
    };
    let no_payment_id = with_event(&|e| {
        e.remove("payment_id");
    });
    let bad_time = with_event(&|e| {
        e.insert("occurred_at".into(), json!("yesterday"));
    });
    let broken = vec![
        (topic, bad.to_string()),
        (topic2, extra.to_string()),
        (topic3.clone(), no_payment_id),
        (topic3.clone(), bad_time),
    ];
    let (ok, report) = validate(schemas.path(), &broken, false);
    assert!(!ok, "{report:#}");
    assert_eq!(report["invalid"].as_array().unwrap().len(), 4, "{report:#}");
    // What the saga accepts, the schema accepts: a time in a service's own zone, and Laravel's
    // toDateTimeString().
    let accepted = vec![
        (
            topic3.clone(),
            with_event(&|e| {
                e.insert("occurred_at".into(), json!("2026-11-30T10:00:00+02:00"));
            }),
        ),
        (
            topic3,
            with_event(&|e| {
                e.insert("occurred_at".into(), json!("2026-11-30 10:00:00"));
            }),
        ),
    ];
    let (ok, report) = validate(schemas.path(), &accepted, false);
    assert!(ok, "{report:#}");
}

#[test]
fn the_asyncapi_documents_pass_the_asyncapi_3_schema_and_a_broken_one_does_not() {
    for topology in ["order_saga", "order_with_shipping"] {
        let dir = export(
            repo(&format!("topologies/{topology}.yaml"))
                .to_str()
                .unwrap(),
        );
        let (ok, report) = validate(dir.path(), &[], true);
        assert!(ok, "{topology}: {report:#}");
        let path = dir.path().join("asyncapi.json");
        let mut doc: Value =
            serde_json::from_str(&std::fs::read_to_string(&path).unwrap()).unwrap();
        let channels = doc["channels"].as_object_mut().unwrap();
        let first = channels.keys().next().unwrap().clone();
        channels[&first]["address"] = json!(5);
        std::fs::write(&path, doc.to_string()).unwrap();
        let (ok, report) = validate(dir.path(), &[], true);
        assert!(!ok, "{topology}: {report:#}");
    }
}

#[test]
fn the_readme_shows_a_valid_example_of_every_message() {
    let readme = std::fs::read_to_string(repo("README.md")).unwrap();
    let section = readme
        .split("#### Every message, by example")
        .nth(1)
        .expect("README has the examples section");
    let section = section.split("</details>").next().unwrap();
    // "`topic`, written by ...: **Type**" then a ```json block.
    let mut examples = Vec::new();
    let mut lines = section.lines();
    while let Some(line) = lines.next() {
        let Some(topic) = line
            .strip_prefix('`')
            .and_then(|l| l.split('`').next())
            .filter(|_| line.contains("written by"))
        else {
            continue;
        };
        let mut body = String::new();
        let mut inside = false;
        for l in lines.by_ref() {
            match (inside, l.trim()) {
                (false, "```json") => inside = true,
                (true, "```") => break,
                (true, _) => body.push_str(l),
                _ => {}
            }
        }
        examples.push((topic.to_string(), body));
    }
    let dir = export(repo("topologies/order_saga.yaml").to_str().unwrap());
    let (ok, report) = validate(dir.path(), &examples, false);
    assert!(ok, "{report:#}");
    let def = SagaDefinition::load(&repo("topologies/order_saga.yaml")).unwrap();
    let messages = saga_streams::saga::contract_export::messages(&def);
    for m in &messages {
        assert_eq!(
            report["valid"][&m.event_type].as_u64(),
            Some(1),
            "README example of {}: {report:#}",
            m.event_type
        );
    }
    assert_eq!(examples.len(), messages.len());
}
