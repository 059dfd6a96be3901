//! Avro through the real Schema Registry and broker: schema evolution on one topic, compatibility
//! checks, dead letters for every kind of bad Avro input, and interop with Confluent's Python
//! client.

mod common;

use std::path::Path;

use apache_avro::Schema;
use common::avro_env::{
    first_versions, repo, schema_dir, schema_file, AvroEnv, LIMIT, ORDER_V1, ORDER_V2,
};
use common::http_get;
use saga_streams::codec::schemas::{subjects, Catalogue};
use saga_streams::saga::processor::dlq_headers;
use saga_streams::saga::topology::SubjectStrategy;
use serde_json::{json, Value};

#[test]
fn v1_and_v2_order_created_share_a_topic_and_both_complete() {
    let mut env = AvroEnv::new(3);
    // The first producers registered version 1 of every subject; version 2 came later.
    let (ok, out) = env.schemas("register", first_versions().path());
    assert!(ok, "registering the first versions:\n{out}");
    let (ok, out) = env.schemas("check", &repo("schemas"));
    assert!(ok && out.contains("compatible (BACKWARD"), "{out}");
    env.register();
    let (v1_id, v2_id) = (
        env.start_subject_id(ORDER_V1),
        env.start_subject_id(ORDER_V2),
    );
    assert_ne!(v1_id, v2_id);
    env.start(&[]);
    let http = env.orchestrator().http_addr(LIMIT);

    let (v1, v2) = (schema_file(ORDER_V1), schema_file(ORDER_V2));
    let mut orders = Vec::new();
    for i in 0..4 {
        let old = format!("v1-{i}");
        let fields = env.order_fields(&old, &[]);
        env.send_raw(&env.def.start_topic, &old, &env.encode(&v1, v1_id, fields));
        let new = format!("v2-{i}");
        let fields = env.order_fields(
            &new,
            &[("event_version", json!(2)), ("channel", json!("app"))],
        );
        env.send_raw(&env.def.start_topic, &new, &env.encode(&v2, v2_id, fields));
        orders.extend([old, new]);
    }
    let all = orders.clone();
    env.wait("an outcome for every order", LIMIT, move |e| {
        all.iter().all(|o| !e.outcomes(o).is_empty())
    });
    for order in &orders {
        let outcomes = env.outcomes(order);
        assert_eq!(outcomes.len(), 1, "{order}: {outcomes:?}");
        assert_eq!(
            outcomes[0]["event_type"], "OrderCompleted",
            "{order}: {outcomes:?}"
        );
        assert_eq!(outcomes[0]["user_id"], format!("user-{order}"));
        assert_eq!(outcomes[0]["total"], 42.5);
    }
    assert!(env.all_dead_letters().is_empty());

    // Version 1 records were resolved into version 2: the saga holds the default channel.
    for (order, channel) in [("v1-0", "web"), ("v2-0", "app")] {
        let (code, body) = http_get(&format!("http://{http}/sagas/{order}"));
        assert_eq!(code, 200, "{body}");
        let saga: Value = serde_json::from_str(&body).unwrap();
        assert_eq!(saga["context"]["channel"], channel, "{order}: {saga}");
    }

    // Every message saga-streams wrote is Avro under the id its subject has for the local schema.
    let catalogue = Catalogue::load(&repo("schemas")).unwrap();
    let outputs: Vec<String> = env
        .def
        .output_topics()
        .into_iter()
        .filter(|t| !t.ends_with(".dlq"))
        .collect();
    let mut checked = 0;
    for subject in subjects(&env.def.topic_set(), &catalogue).unwrap() {
        let Some(topic) = subject.topics.iter().find(|t| outputs.contains(t)) else {
            continue;
        };
        let id = env
            .registry
            .lookup(&subject.name, &subject.text)
            .unwrap()
            .unwrap()
            .id;
        for r in env.seen.iter().filter(|r| &r.topic == topic) {
            let value = r.value.as_deref().unwrap();
            assert_eq!(value[0], 0, "{topic}: no magic byte");
            assert_eq!(
                u32::from_be_bytes(value[1..5].try_into().unwrap()),
                id,
                "{topic}: written with another schema than the subject's"
            );
            checked += 1;
        }
    }
    // 8 payments, 8 reservations, 8 completions.
    assert_eq!(checked, 24);
}

#[test]
fn record_name_subjects_carry_the_saga_too() {
    let mut env = AvroEnv::with_strategy(2, SubjectStrategy::RecordName);
    let (ok, out) = env.schemas("register", &repo("schemas"));
    assert!(ok, "{out}");
    // One subject per record, named after it, whatever the topic.
    assert!(
        out.contains("io.sagastreams.payment.PaymentSucceeded: registered"),
        "{out}"
    );
    assert!(!out.contains("-value"), "{out}");
    let v2_id = env.start_subject_id(ORDER_V2);
    env.start(&[]);
    let v2 = schema_file(ORDER_V2);
    let fields = env.order_fields("rn-1", &[]);
    env.send_raw(
        &env.def.start_topic,
        "rn-1",
        &env.encode(&v2, v2_id, fields),
    );
    env.wait("the outcome", LIMIT, |e| !e.outcomes("rn-1").is_empty());
    assert_eq!(env.outcomes("rn-1")[0]["event_type"], "OrderCompleted");
    assert!(env.all_dead_letters().is_empty());
}

#[test]
fn an_incompatible_version_fails_the_check_naming_the_field_and_is_refused() {
    let env = AvroEnv::new(1);
    env.register();
    let mut v3: Value = serde_json::from_str(
        &std::fs::read_to_string(repo(&format!("schemas/{ORDER_V2}"))).unwrap(),
    )
    .unwrap();
    v3["fields"].as_array_mut().unwrap().push(
        json!({"name": "coupon_code", "type": "string", "doc": "no default: breaks old data"}),
    );
    let bad = schema_dir(&[], &[("io.sagastreams.order.OrderCreated.v3.avsc", v3)]);

    let (ok, out) = env.schemas("check", bad.path());
    assert!(!ok, "check passed an incompatible schema:\n{out}");
    let subject = format!("{}-value", env.def.start_topic);
    assert!(
        out.contains(&format!("{subject}: INCOMPATIBLE (BACKWARD")),
        "{out}"
    );
    assert!(out.contains("OrderCreated.coupon_code"), "{out}");
    assert!(out.contains("no default"), "{out}");
    // The other subjects did not change and stay compatible.
    assert_eq!(out.matches("INCOMPATIBLE").count(), 1, "{out}");

    let (ok, out) = env.schemas("register", bad.path());
    assert!(!ok, "register accepted an incompatible schema:\n{out}");
    assert!(
        out.contains(&format!("{subject}: REFUSED by the registry")),
        "{out}"
    );
    assert!(
        out.contains("coupon_code"),
        "the registry's reason names the field:\n{out}"
    );
    assert_eq!(env.registry.versions(&subject).unwrap(), vec![1]);

    // A compatible third version (the field has a default) passes both.
    let mut v3 = serde_json::from_str::<Value>(
        &std::fs::read_to_string(repo(&format!("schemas/{ORDER_V2}"))).unwrap(),
    )
    .unwrap();
    v3["fields"]
        .as_array_mut()
        .unwrap()
        .push(json!({"name": "coupon_code", "type": ["null", "string"], "default": null}));
    let good = schema_dir(&[], &[("io.sagastreams.order.OrderCreated.v3.avsc", v3)]);
    let (ok, out) = env.schemas("check", good.path());
    assert!(ok, "{out}");
    let (ok, out) = env.schemas("register", good.path());
    assert!(ok, "{out}");
    assert_eq!(env.registry.versions(&subject).unwrap(), vec![1, 2]);
}

#[test]
fn each_kind_of_bad_avro_input_is_dead_lettered_and_the_saga_after_it_completes() {
    let mut env = AvroEnv::new(1);
    env.register();
    let v2_id = env.start_subject_id(ORDER_V2);
    let v2 = schema_file(ORDER_V2);
    // A producer whose OrderCreated carries `total` as a string, under a subject of its own.
    let mut legacy: Value = serde_json::from_str(
        &std::fs::read_to_string(repo(&format!("schemas/{ORDER_V1}"))).unwrap(),
    )
    .unwrap();
    for field in legacy["fields"].as_array_mut().unwrap() {
        if field["name"] == "total" {
            field["type"] = json!("string");
        }
    }
    let legacy_id = env
        .registry
        .register(&format!("{}legacy-value", env.prefix), &legacy.to_string())
        .unwrap()
        .id;
    let legacy = Schema::parse(&legacy).unwrap();
    env.start(&[]);

    let valid = |env: &AvroEnv, order: &str| env.encode(&v2, v2_id, env.order_fields(order, &[]));
    let mut unknown_id = valid(&env, "bad-unknown-id");
    unknown_id[1..5].copy_from_slice(&0x7fff_fff0u32.to_be_bytes());
    let mut truncated = valid(&env, "bad-truncated");
    truncated.truncate(truncated.len() - 3);
    let mut trailing = valid(&env, "bad-trailing");
    trailing.extend_from_slice(&[2, 0x61]);
    let mut garbage = valid(&env, "bad-garbage")[..5].to_vec();
    garbage.extend_from_slice(&[0xff; 12]);
    let json = serde_json::to_vec(&env.order_fields("bad-json", &[])).unwrap();
    let mut fields = env.order_fields("bad-legacy", &[]);
    fields.insert("total".into(), json!("42.50"));
    let legacy_bytes = env.encode(&legacy, legacy_id, fields);
    let cases: Vec<(&str, Vec<u8>, &str)> = vec![
        ("bad-unknown-id", unknown_id, "unknown_schema_id"),
        ("bad-truncated", truncated, "invalid_avro"),
        ("bad-trailing", trailing, "invalid_avro"),
        ("bad-garbage", garbage, "invalid_avro"),
        ("bad-json", json, "invalid_avro"),
        ("bad-legacy", legacy_bytes, "incompatible_schema"),
    ];
    for (key, bytes, _) in &cases {
        env.send_raw(&env.def.start_topic, key, bytes);
    }
    let after = valid(&env, "after");
    env.send_raw(&env.def.start_topic, "after", &after);

    let start = env.def.start_topic.clone();
    let n = cases.len();
    env.wait(
        "every bad record dead-lettered and the next order done",
        LIMIT,
        move |e| e.dead_letters(&start).len() >= n && !e.outcomes("after").is_empty(),
    );
    let dead = env.dead_letters(&env.def.start_topic);
    assert_eq!(dead.len(), cases.len());
    for (key, bytes, reason) in &cases {
        let letter = dead
            .iter()
            .find(|r| r.key.as_deref() == Some(key.as_bytes()))
            .unwrap_or_else(|| panic!("{key} not dead-lettered"));
        assert_eq!(
            letter.header(dlq_headers::KIND).as_deref(),
            Some(*reason),
            "{key}"
        );
        assert_eq!(
            letter.value.as_deref(),
            Some(bytes.as_slice()),
            "{key}: bytes changed"
        );
        let message = letter.header(dlq_headers::MESSAGE).unwrap_or_default();
        assert!(!message.is_empty(), "{key}: no error message");
    }
    assert_eq!(env.outcomes("after")[0]["event_type"], "OrderCompleted");
    for key in cases.iter().map(|c| c.0) {
        assert!(env.outcomes(key).is_empty(), "{key} started a saga");
    }
}

fn python() -> String {
    let default = std::env::var("HOME")
        .map(|h| format!("{h}/.cache/saga-streams/venv/bin/python"))
        .unwrap_or_default();
    let python = std::env::var("SAGA_STREAMS_INTEROP_PYTHON").unwrap_or(default);
    assert!(
        Path::new(&python).exists(),
        "{python} not found: scripts/deps installs the Python client (confluent-kafka) into that venv"
    );
    python
}

#[test]
fn confluent_python_client_produces_orders_and_reads_commands_and_outcomes() {
    let mut env = AvroEnv::new(3);
    env.register();
    env.start(&[]);
    let script = repo("tests/interop/confluent_avro.py")
        .display()
        .to_string();
    let orders = ["py-0", "py-1", "py-2"];
    let out = std::process::Command::new("timeout")
        .args([
            "300",
            &python(),
            &script,
            "produce",
            "--bootstrap",
            &env.bootstrap,
            "--registry",
            &env.registry_url,
            "--topic",
            &env.def.start_topic,
            "--schema",
            &repo(&format!("schemas/{ORDER_V2}")).display().to_string(),
            "--orders",
            &orders.join(","),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "python produce failed:\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let sent: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    assert_eq!(sent.len(), orders.len());

    let payments = env.def.steps[0].command.topic.clone();
    let topics = format!("{payments},{}", env.def.completed.topic);
    let out = std::process::Command::new("timeout")
        .args([
            "300",
            &python(),
            &script,
            "consume",
            "--bootstrap",
            &env.bootstrap,
            "--registry",
            &env.registry_url,
            "--topics",
            &topics,
            "--count",
            &(2 * orders.len()).to_string(),
            "--timeout",
            &LIMIT.as_secs().to_string(),
        ])
        .output()
        .unwrap();
    env.assert_alive();
    assert!(
        out.status.success(),
        "python consume failed:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    let read: Vec<Value> = String::from_utf8_lossy(&out.stdout)
        .lines()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    for order in &sent {
        let id = order["order_id"].as_str().unwrap();
        let of = |topic: &str| -> Vec<&Value> {
            read.iter()
                .filter(|r| r["topic"] == topic && r["key"] == id)
                .map(|r| &r["value"])
                .collect()
        };
        let payment = of(&payments);
        assert_eq!(payment.len(), 1, "{id}: {read:?}");
        assert_eq!(payment[0]["event_type"], "ProcessPayment");
        assert_eq!(payment[0]["amount"], order["total"]);
        assert_eq!(payment[0]["correlation_id"], order["correlation_id"]);
        let done = of(&env.def.completed.topic);
        assert_eq!(done.len(), 1, "{id}: {read:?}");
        assert_eq!(done[0]["event_type"], "OrderCompleted");
        assert_eq!(done[0]["user_id"], order["user_id"]);
        assert_eq!(done[0]["total"], order["total"]);
    }
    // saga-streams' own reader sees the same outcomes, and nothing was dead-lettered.
    let ids: Vec<String> = orders.iter().map(|o| o.to_string()).collect();
    env.wait("the outcomes", LIMIT, move |e| {
        ids.iter().all(|o| !e.outcomes(o).is_empty())
    });
    assert!(env.all_dead_letters().is_empty());
}

#[test]
fn a_burst_of_records_with_one_bogus_schema_id_asks_the_registry_once() {
    let mut env = AvroEnv::new(1);
    env.register();
    let v2_id = env.start_subject_id(ORDER_V2);
    let v2 = schema_file(ORDER_V2);
    env.start(&[]);
    let n = 200;
    for i in 0..n {
        let order = format!("bogus-{i}");
        let mut bytes = env.encode(&v2, v2_id, env.order_fields(&order, &[]));
        bytes[1..5].copy_from_slice(&0x7fff_ff00u32.to_be_bytes());
        env.send_raw(&env.def.start_topic, &order, &bytes);
    }
    let after = env.encode(&v2, v2_id, env.order_fields("after-bogus", &[]));
    env.send_raw(&env.def.start_topic, "after-bogus", &after);
    let start = env.def.start_topic.clone();
    env.wait(
        "every bogus record dead-lettered and the next order done",
        LIMIT,
        move |e| e.dead_letters(&start).len() >= n && !e.outcomes("after-bogus").is_empty(),
    );
    let dead = env.dead_letters(&env.def.start_topic);
    assert!(dead
        .iter()
        .all(|r| r.header(dlq_headers::KIND).as_deref() == Some("unknown_schema_id")));
    let addr = env.orchestrator().http_addr(LIMIT);
    let (_, metrics) = http_get(&format!("http://{addr}/metrics"));
    let not_found: f64 = metrics
        .lines()
        .filter(|l| {
            l.starts_with("saga_streams_registry_lookups_total{")
                && l.contains("result=\"not_found\"")
        })
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum();
    assert_eq!(not_found, 1.0, "{metrics}");
}
