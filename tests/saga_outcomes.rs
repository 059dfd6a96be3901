//! The saga's business outcomes when the orchestrator is slow, down or frozen (issue: saga
//! outcomes), through the binary against the real broker.

mod common;

use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv};
use saga_streams::runtime::partitioner::Partitioner;
use saga_streams::saga::processor::dlq_headers;

const PAYMENT_TIMEOUT: &str = "payment=4s";
/// Longer than the payment timeout, so that by the orchestrator's clock every deadline passed.
const OUTAGE: Duration = Duration::from_secs(10);
/// Records written ahead of the replies during the outage.
const BACKLOG: usize = 30_000;

/// Orders whose payment command is out, then the orchestrator becomes unavailable (`outage`
/// starts it, `recover` ends it) while every payment reply is written in time, and stays away
/// past the timeout: each order must complete, none may be refunded or cancelled.
fn replies_in_time_survive(
    name: &str,
    outage: impl FnOnce(&mut common::BinProcess),
    recover: impl FnOnce(&SagaEnv, common::BinProcess) -> common::BinProcess,
) {
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let timeouts = ["--step-timeout", PAYMENT_TIMEOUT];
    let mut orchestrator = env.orchestrator("a", &timeouts);
    env.complete(&format!("{name}-warm-up"));
    let orders: Vec<String> = (0..6).map(|i| format!("{name}-{i}")).collect();
    for order in &orders {
        env.create(order, &[]);
    }
    let payment = env.def.steps[0].command.event_type.clone();
    for order in &orders {
        env.expect(order, &payment);
    }
    let sent = Instant::now();
    outage(&mut orchestrator);
    // A backlog in front of the replies (replies for orders this saga never saw, dead-lettered
    // when read), so that after the outage the orchestrator needs several rounds, and timer
    // checks, before it reaches them.
    let mut records: Vec<(String, String, String)> = (0..BACKLOG)
        .map(|i| {
            let order = format!("{name}-unknown-{i}");
            let (topic, value) = env.reply_record(0, Reply::Success, &order, &format!("junk-{i}"));
            (topic, order, value)
        })
        .collect();
    for order in &orders {
        let id = uuid::Uuid::new_v4().to_string();
        let (topic, value) = env.reply_record(0, Reply::Success, order, &id);
        records.push((topic, order.clone(), value));
    }
    common::produce_all(&common::producer(&env.bootstrap), &records);
    assert!(
        sent.elapsed() < Duration::from_secs(3),
        "the replies were not written in time for the test to mean anything"
    );
    // The outage itself: the orchestrator is away for longer than the step timeout.
    std::thread::sleep(OUTAGE);
    let _orchestrator = recover(&env, orchestrator);
    let inventory = env.def.steps[1].command.event_type.clone();
    for order in &orders {
        env.expect(order, &inventory);
        env.reply(1, Reply::Success, order);
    }
    let completed = env.def.completed.event_type.clone();
    for order in &orders {
        env.expect(order, &completed);
    }
    let refund = env.def.steps[0].compensation.event_type.clone();
    let cancelled = env.def.cancelled.event_type.clone();
    for order in &orders {
        assert_eq!(
            (env.count(order, &refund), env.count(order, &cancelled)),
            (0, 0),
            "{order} was refunded or cancelled although its payment reply came in time: {:?}",
            env.trail(order)
        );
    }
}

#[test]
fn a_frozen_orchestrator_processes_replies_that_came_in_time_before_timing_out() {
    replies_in_time_survive(
        "frozen",
        |orchestrator| orchestrator.signal("STOP"),
        |_, orchestrator| {
            orchestrator.signal("CONT");
            orchestrator
        },
    );
}

#[test]
fn a_stopped_orchestrator_processes_replies_that_came_in_time_before_timing_out() {
    replies_in_time_survive(
        "stopped",
        |orchestrator| {
            assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
        },
        |env, _| env.orchestrator("a", &["--step-timeout", PAYMENT_TIMEOUT]),
    );
}

#[test]
fn a_step_without_a_reply_still_times_out() {
    // The other side of the rule: input time moves on while nothing arrives, so a missing reply
    // is still noticed.
    let mut env = SagaEnv::new("order_saga.yaml", 2);
    let _orchestrator = env.orchestrator("a", &["--step-timeout", PAYMENT_TIMEOUT]);
    env.create("silent", &[]);
    let cancelled = env.expect("silent", &env.def.cancelled.event_type.clone());
    assert_eq!(cancelled["reason"], "timeout:payment");
}

#[test]
fn a_transaction_left_open_on_a_reply_topic_does_not_time_out_replies_behind_it() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &["--step-timeout", PAYMENT_TIMEOUT]);
    env.complete("open-txn-warm-up");
    let order = "open-txn";
    env.create(order, &[]);
    env.expect(order, &env.def.steps[0].command.event_type.clone());
    // Another service's transaction, opened on the reply topic and left open: the last stable
    // offset stays behind it, and so does every reply committed after it.
    let stuck: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("transactional.id", common::unique("stuck-service"))
        .set("transaction.timeout.ms", "60000")
        .create()
        .unwrap();
    stuck.init_transactions(Duration::from_secs(30)).unwrap();
    stuck.begin_transaction().unwrap();
    let reply_topic = env.def.steps[0].reply_topic.clone();
    stuck
        .send(BaseRecord::to(&reply_topic).key(order).payload("{}"))
        .map_err(|(e, _)| e)
        .unwrap();
    stuck.flush(Duration::from_secs(10)).unwrap();
    env.reply(0, Reply::Success, order);
    // Past the payment timeout, the reply is written but cannot be read yet.
    std::thread::sleep(OUTAGE);
    stuck.abort_transaction(Duration::from_secs(30)).unwrap();
    env.expect(order, &env.def.steps[1].command.event_type.clone());
    env.reply(1, Reply::Success, order);
    env.expect(order, &env.def.completed.event_type.clone());
    let refund = env.def.steps[0].compensation.event_type.clone();
    let cancelled = env.def.cancelled.event_type.clone();
    assert_eq!(
        (env.count(order, &refund), env.count(order, &cancelled)),
        (0, 0),
        "timed out behind an open transaction: {:?}",
        env.trail(order)
    );
}

#[test]
fn an_input_over_the_size_limit_is_dead_lettered_with_a_prefix_and_the_saga_goes_on() {
    use rdkafka::admin::{AdminOptions, AlterConfig, ResourceSpecifier};
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{FutureProducer, FutureRecord};
    use saga_streams::saga::processor::DLQ_VALUE_PREFIX;
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let topic = env.def.start_topic.clone();
    // A topic and a producer configured for large records, as a cluster that allows them would be.
    let admin = common::admin(&env.bootstrap);
    let change =
        AlterConfig::new(ResourceSpecifier::Topic(&topic)).set("max.message.bytes", "4194304");
    let altered =
        futures::executor::block_on(admin.alter_configs(&[change], &AdminOptions::new())).unwrap();
    for result in altered {
        result.unwrap();
    }
    let _orchestrator = env.orchestrator("a", &[]);
    let big: FutureProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("message.max.bytes", "4194304")
        .set("enable.idempotence", "true")
        .set("message.timeout.ms", "20000")
        .create()
        .unwrap();
    let size = 2 << 20;
    let mut value = br#"{"event": {"event_type": "OrderCreated", "padding": ""#.to_vec();
    value.resize(size - 3, b'x');
    value.extend_from_slice(br#""}}"#);
    // Sent again only when refused (the broker may take a moment to apply the new limit), so
    // exactly one copy is written.
    let delivered = common::poll_until(Duration::from_secs(30), || {
        big.send_result(FutureRecord::to(&topic).key("huge").payload(&value))
            .ok()
            .and_then(|delivery| futures::executor::block_on(delivery).ok())
            .is_some_and(|result| result.is_ok())
    });
    assert!(delivered, "the 2 MiB record was not accepted");
    env.complete("after-huge");
    env.wait("the dead letter of the large record", |env| {
        env.seen.iter().any(|r| r.topic.ends_with(".dlq"))
    });
    let dead: Vec<_> = env
        .seen
        .iter()
        .filter(|r| r.topic.ends_with(".dlq"))
        .collect();
    assert_eq!(dead.len(), 1);
    let letter = dead[0];
    assert_eq!(letter.topic, format!("{topic}.dlq"));
    assert_eq!(
        letter.header(dlq_headers::KIND).as_deref(),
        Some("record_too_large")
    );
    assert_eq!(
        letter.header(dlq_headers::ORIGINAL_SIZE).as_deref(),
        Some(size.to_string().as_str())
    );
    let kept = letter.value.as_deref().unwrap_or_default();
    assert_eq!(kept.len(), DLQ_VALUE_PREFIX);
    assert_eq!(kept, &value[..DLQ_VALUE_PREFIX]);
}

/// The order saga with retries (payment: 2 attempts; refunds: 4 attempts, 1 s backoff doubling to
/// 2 s), 4 s step timeouts and a 20 s retention.
const RETRIES: &str = "../tests/fixtures/order_saga_retries.yaml";

fn saga_json(orchestrator: &mut common::BinProcess, order: &str) -> serde_json::Value {
    let addr = orchestrator.http_addr(Duration::from_secs(30));
    let (status, body) = common::http_get(&format!("http://{addr}/sagas/{order}"));
    assert_eq!(status, 200, "{body}");
    serde_json::from_str(&body).unwrap()
}

/// Payment done, inventory refused: the refund goes out. Returns the refund's event id.
fn until_refund(env: &mut SagaEnv, order: &str) -> String {
    env.create(order, &[]);
    env.expect(order, &env.def.steps[0].command.event_type.clone());
    env.reply(0, Reply::Success, order);
    env.expect(order, &env.def.steps[1].command.event_type.clone());
    env.reply(1, Reply::Failure, order);
    let refund = env.expect(order, &env.def.steps[0].compensation.event_type.clone());
    refund["event_id"].as_str().unwrap().to_string()
}

fn event_ids(env: &SagaEnv, order: &str, event_type: &str) -> Vec<String> {
    env.of(order, event_type)
        .iter()
        .map(|r| {
            common::saga_env::body(r)["event_id"]
                .as_str()
                .unwrap_or("")
                .to_string()
        })
        .collect()
}

#[test]
fn an_unconfirmed_refund_is_sent_again_until_confirmed_or_given_up_as_stuck() {
    let mut env = SagaEnv::new(RETRIES, 1);
    let mut orchestrator = env.orchestrator("a", &[]);
    let refund = env.def.steps[0].compensation.event_type.clone();
    let cancelled = env.def.cancelled.event_type.clone();

    // Confirmed on the third attempt.
    let first = until_refund(&mut env, "third");
    env.wait("the third refund attempt", |env| {
        env.count("third", &refund) >= 3
    });
    env.reply(0, Reply::Compensated, "third");
    let outcome = env.expect("third", &cancelled);
    assert_eq!(outcome["reason"], "inventory_failed");
    assert_eq!(event_ids(&env, "third", &refund), vec![first.clone(); 3]);
    assert_eq!(saga_json(&mut orchestrator, "third")["status"], "REFUNDED");

    // Never confirmed: four attempts, then the saga is cancelled as stuck.
    let first = until_refund(&mut env, "never");
    let outcome = env.expect("never", &cancelled);
    assert_eq!(
        outcome["reason"],
        "inventory_failed; compensation_stuck:payment"
    );
    assert_eq!(event_ids(&env, "never", &refund), vec![first; 4]);
    let saga = saga_json(&mut orchestrator, "never");
    assert_eq!(saga["status"], "COMPENSATION_STUCK", "{saga}");
    assert_eq!(saga["stuck_steps"], serde_json::json!([0]));
    let addr = orchestrator.http_addr(Duration::from_secs(5));
    let (_, metrics) = common::http_get(&format!("http://{addr}/metrics"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("saga_streams_compensations_stuck_total{")
                && l.contains("step=\"payment\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
    // The refund is confirmed after all: no longer stuck, and no second outcome.
    env.reply(0, Reply::Compensated, "never");
    let ok = common::poll_until(Duration::from_secs(30), || {
        saga_json(&mut orchestrator, "never")["status"] == "REFUNDED"
    });
    assert!(ok, "{}", saga_json(&mut orchestrator, "never"));
    env.complete("never-barrier");
    assert_eq!(env.count("never", &cancelled), 1);
}

#[test]
fn a_payment_that_succeeds_after_failing_or_after_the_saga_shrank_is_refunded() {
    let mut env = SagaEnv::new(RETRIES, 1);
    let mut orchestrator = env.orchestrator("a", &[]);
    let payment = env.def.steps[0].command.event_type.clone();
    let refund = env.def.steps[0].compensation.event_type.clone();
    let cancelled = env.def.cancelled.event_type.clone();
    for order in ["late", "tomb"] {
        env.create(order, &[]);
        env.expect(order, &payment);
        env.reply(0, Reply::Failure, order);
        let outcome = env.expect(order, &cancelled);
        assert_eq!(outcome["reason"], "payment_failed");
    }
    // The payment service succeeds after all, having said it failed: the money goes back.
    env.reply(0, Reply::Success, "late");
    env.expect("late", &refund);
    env.reply(0, Reply::Compensated, "late");
    let ok = common::poll_until(Duration::from_secs(30), || {
        saga_json(&mut orchestrator, "late")["status"] == "REFUNDED"
    });
    assert!(ok, "{}", saga_json(&mut orchestrator, "late"));

    // Past the retention the saga shrinks to a tombstone; it still knows the order.
    let ok = common::poll_until(Duration::from_secs(90), || {
        saga_json(&mut orchestrator, "tomb")["tombstone"] == true
    });
    assert!(ok, "{}", saga_json(&mut orchestrator, "tomb"));
    // The start re-delivered (a new event id, as an outbox re-send makes): no second saga.
    env.create("tomb", &[]);
    env.complete("tomb-barrier");
    assert_eq!(env.count("tomb", &payment), 1, "{:?}", env.trail("tomb"));
    // A late success is still refunded, with the amount the order had.
    env.reply(0, Reply::Success, "tomb");
    let refunded = env.expect("tomb", &refund);
    let created = common::saga_env::body(env.of("tomb", &payment)[0]);
    assert_eq!(refunded["amount"], created["amount"]);
    assert_eq!(env.count("tomb", &cancelled), 1);
}

#[test]
fn a_step_with_a_retry_policy_succeeds_on_its_second_attempt() {
    let mut env = SagaEnv::new(RETRIES, 1);
    let _orchestrator = env.orchestrator("a", &[]);
    let payment = env.def.steps[0].command.event_type.clone();
    env.create("retried", &[]);
    env.wait("the payment command sent again", |env| {
        env.count("retried", &payment) >= 2
    });
    let ids = event_ids(&env, "retried", &payment);
    assert_eq!(
        ids[0], ids[1],
        "a retry must carry the first send's event id"
    );
    env.reply(0, Reply::Success, "retried");
    env.expect("retried", &env.def.steps[1].command.event_type.clone());
    env.reply(1, Reply::Success, "retried");
    env.expect("retried", &env.def.completed.event_type.clone());
    let refund = env.def.steps[0].compensation.event_type.clone();
    assert_eq!(
        env.count("retried", &refund),
        0,
        "{:?}",
        env.trail("retried")
    );
    assert_eq!(env.count("retried", &payment), 2);
}

/// Registers the Avro schemas of the env's topology.
fn register_schemas(env: &SagaEnv, registry: &str) {
    let register = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args([
            "schemas",
            "register",
            "--topology",
            &env.topology,
            "--topic-prefix",
            &env.prefix,
            "--schema-registry-url",
            registry,
            "--schemas",
            "schemas",
        ])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(
        register.status.success(),
        "{}",
        String::from_utf8_lossy(&register.stdout)
    );
}

#[test]
fn a_success_whose_next_command_cannot_be_written_is_compensated_not_dropped() {
    let mut env = SagaEnv::new("../tests/fixtures/order_saga_avro_inventory.yaml", 1);
    let registry = common::schema_registry_url();
    register_schemas(&env, &registry);
    let _orchestrator = env.orchestrator("a", &["--schema-registry-url", &registry]);
    let order = "bad-items";
    let mut body = saga_streams::sim::load::order_created(&env.def, order);
    body["items"] = serde_json::json!(["not-an-item"]);
    env.send(&env.def.start_topic.clone(), order, body, &[]);
    env.expect(order, &env.def.steps[0].command.event_type.clone());
    // The payment is taken; its ReserveInventory cannot be encoded (items are not records).
    env.reply(0, Reply::Success, order);
    let refund = env.expect(order, &env.def.steps[0].compensation.event_type.clone());
    assert_eq!(refund["payment_id"], format!("payment_id-{order}"));
    env.reply(0, Reply::Compensated, order);
    let cancelled = env.expect(order, &env.def.cancelled.event_type.clone());
    assert_eq!(cancelled["reason"], "inventory_unwritable");
    // The success was applied, not dead-lettered.
    assert!(!env.seen.iter().any(|r| r.topic.ends_with(".dlq")));
}

#[test]
fn an_output_that_cannot_be_encoded_dead_letters_its_input_and_every_other_order_completes() {
    let topology = "../tests/fixtures/order_saga_avro_payments.yaml";
    let mut env = SagaEnv::new(topology, 2);
    let registry = common::schema_registry_url();
    register_schemas(&env, &registry);
    let mut orchestrator = env.orchestrator("a", &["--schema-registry-url", &registry]);
    let addr = orchestrator.http_addr(Duration::from_secs(60));
    let saga_status = |order: &str| common::http_get(&format!("http://{addr}/sagas/{order}")).0;
    // No currency: the order passes the input checks (the field is optional there), but its
    // ProcessPayment cannot be written (the Avro field is required).
    let mut bad = saga_streams::sim::load::order_created(&env.def, "no-currency");
    bad.as_object_mut().unwrap().remove("currency");
    env.send(&env.def.start_topic.clone(), "no-currency", bad, &[]);
    let good: Vec<String> = (0..4).map(|i| format!("good-{i}")).collect();
    for order in &good {
        env.create(order, &[]);
    }
    for order in &good {
        // The payment command is Avro: the saga's existence says it was written.
        let started = common::poll_until(Duration::from_secs(60), || saga_status(order) == 200);
        assert!(started, "{order} never started");
        env.reply(0, Reply::Success, order);
        env.expect(order, &env.def.steps[1].command.event_type.clone());
        env.reply(1, Reply::Success, order);
        env.expect(order, &env.def.completed.event_type.clone());
    }
    env.wait("the dead letter of the order without currency", |env| {
        env.seen.iter().any(|r| r.topic.ends_with(".dlq"))
    });
    let letter = env.seen.iter().find(|r| r.topic.ends_with(".dlq")).unwrap();
    assert_eq!(letter.key.as_deref(), Some(b"no-currency".as_slice()));
    assert_eq!(
        letter.header(dlq_headers::KIND).as_deref(),
        Some("unencodable_output")
    );
    // Its effects were rolled back: no saga, no message.
    assert_eq!(saga_status("no-currency"), 404);
    assert!(
        env.trail("no-currency").is_empty(),
        "{:?}",
        env.trail("no-currency")
    );
    let (_, metrics) = common::http_get(&format!("http://{addr}/metrics"));
    assert!(
        metrics
            .lines()
            .any(|l| l.starts_with("saga_streams_output_errors_total{")
                && l.contains("reason=\"unencodable_output\"")
                && l.ends_with(" 1")),
        "{metrics}"
    );
}

#[test]
fn an_order_as_a_laravel_service_writes_it_completes_with_its_values_passed_on() {
    // Eloquent keys and auth()->id() are integers; decimal casts serialise amounts as strings.
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    let order = "laravel-1";
    let mut body = saga_streams::sim::load::order_created(&env.def, order);
    body["user_id"] = serde_json::json!(42);
    body["total"] = serde_json::json!("500.00");
    env.send(&env.def.start_topic.clone(), order, body, &[]);
    let payment = env.expect(order, &env.def.steps[0].command.event_type.clone());
    // A JSON command keeps the producer's form.
    assert_eq!(payment["amount"], "500.00");
    env.reply(0, Reply::Success, order);
    env.expect(order, &env.def.steps[1].command.event_type.clone());
    env.reply(1, Reply::Success, order);
    let completed = env.expect(order, &env.def.completed.event_type.clone());
    assert_eq!(completed["user_id"], 42);
    assert_eq!(completed["total"], "500.00");
    assert!(
        !env.seen.iter().any(|r| r.topic.ends_with(".dlq")),
        "dead-lettered: {:?}",
        env.seen
            .iter()
            .map(common::saga_env::describe)
            .collect::<Vec<_>>()
    );
}

fn metric_sum(addr: &str, name: &str, label: &str) -> f64 {
    let (_, metrics) = common::http_get(&format!("http://{addr}/metrics"));
    metrics
        .lines()
        .filter(|l| l.starts_with(&format!("{name}{{")) && l.contains(label))
        .filter_map(|l| l.rsplit_once(' ').and_then(|(_, v)| v.parse::<f64>().ok()))
        .sum()
}

#[test]
fn keyless_orders_sent_twice_with_and_without_event_ids_start_one_saga_and_one_payment() {
    // Outbox jobs publish without keys, and often without event ids; a re-send lands anywhere.
    let mut env = SagaEnv::new("order_saga.yaml", 3);
    let mut orchestrator = env.orchestrator("a", &[]);
    let addr = orchestrator.http_addr(Duration::from_secs(60));
    let created = env.def.start_topic.clone();
    let with_id = saga_streams::sim::load::order_created(&env.def, "keyless-a");
    let mut without_id = saga_streams::sim::load::order_created(&env.def, "keyless-b");
    without_id.as_object_mut().unwrap().remove("event_id");
    for body in [&with_id, &with_id, &without_id, &without_id] {
        let value = serde_json::to_vec(&serde_json::json!({ "event": body })).unwrap();
        env.send_raw(&created, None, &value, &[]);
    }
    let payment = env.def.steps[0].command.event_type.clone();
    for order in ["keyless-a", "keyless-b"] {
        env.expect(order, &payment);
        // The payment service replies without a key too.
        let (topic, value) = env.reply_record(0, Reply::Success, order, &format!("paid-{order}"));
        env.send_raw(&topic, None, value.as_bytes(), &[]);
        env.expect(order, &env.def.steps[1].command.event_type.clone());
        env.reply(1, Reply::Success, order);
        env.expect(order, &env.def.completed.event_type.clone());
    }
    // Both second copies were seen and taken for what they are.
    let seen_twice = common::poll_until(Duration::from_secs(60), || {
        metric_sum(
            &addr,
            "saga_streams_events_ignored_total",
            "reason=\"duplicate\"",
        ) >= 2.0
    });
    assert!(seen_twice, "the second copies were not processed");
    for order in ["keyless-a", "keyless-b"] {
        assert_eq!(
            env.count(order, &payment),
            1,
            "{order}: {:?}",
            env.trail(order)
        );
        assert_eq!(
            env.count(order, &env.def.completed.event_type.clone()),
            1,
            "{order}: {:?}",
            env.trail(order)
        );
    }
    assert!(metric_sum(&addr, "saga_streams_records_rekeyed_total", "topic=") >= 1.0);
    assert!(!env.seen.iter().any(|r| r.topic.ends_with(".dlq")));
}

#[test]
fn with_strict_keys_a_keyless_or_wrongly_keyed_input_is_dead_lettered() {
    let mut env = SagaEnv::new("../tests/fixtures/order_saga_strict_keys.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    let created = env.def.start_topic.clone();
    let body = |order: &str| {
        let event = saga_streams::sim::load::order_created(&env.def, order);
        serde_json::to_vec(&serde_json::json!({ "event": event })).unwrap()
    };
    env.send_raw(&created, None, &body("no-key"), &[]);
    env.send_raw(&created, Some("someone-else"), &body("wrong-key"), &[]);
    env.complete("strict-barrier");
    let kinds: Vec<String> = env
        .seen
        .iter()
        .filter(|r| r.topic.ends_with(".dlq"))
        .filter_map(|r| r.header(dlq_headers::KIND))
        .collect();
    assert_eq!(kinds, vec!["missing_key", "key_mismatch"]);
    let payment = env.def.steps[0].command.event_type.clone();
    assert_eq!(
        env.count("no-key", &payment) + env.count("wrong-key", &payment),
        0
    );
}

/// A dead letter the saga wrote for `order`, by its reason.
fn dead_letter(env: &SagaEnv, order: &str, kind: &str) -> bool {
    env.seen.iter().any(|r| {
        r.topic.ends_with(".dlq")
            && r.key.as_deref() == Some(order.as_bytes())
            && r.header(dlq_headers::KIND).as_deref() == Some(kind)
    })
}

/// Runs `order` through the steps of `env.def` from `from` on, replying success to each.
fn succeed_from(env: &mut SagaEnv, order: &str, from: usize, until: usize) {
    for step in from..until {
        env.expect(order, &env.def.steps[step].command.event_type.clone());
        env.reply(step, Reply::Success, order);
    }
}

#[test]
fn sagas_live_across_a_topology_change_finish_under_the_version_they_started_under() {
    // Version 1 is the shipping saga (payment, inventory, shipping); version 2 drops shipping.
    let mut env = SagaEnv::new("order_with_shipping.yaml", 2);
    let repo = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let v1 = std::fs::read_to_string(repo.join("topologies/order_with_shipping.yaml")).unwrap();
    let v2 = std::fs::read_to_string(repo.join("topologies/order_saga.yaml"))
        .unwrap()
        .replacen("name: order_saga", "name: order_with_shipping", 1)
        .replacen("schemas: ../schemas", "", 1);
    let file = |name: &str, text: &str| {
        let path = env.dir.path().join(name);
        std::fs::write(&path, text).unwrap();
        path.display().to_string()
    };
    let v1 = file("v1.yaml", &v1);
    let v2_with_v1 = file(
        "v2.yaml",
        &format!("version: 2\nprevious_versions: [v1.yaml]\n{v2}"),
    );
    let v2_alone = file("v2-alone.yaml", &format!("version: 2\n{v2}"));
    let ship = env.def.steps[2].command.event_type.clone();
    let completed = env.def.completed.event_type.clone();

    // Under version 1: A waits for its shipment, B and G for their payments.
    env.topology = v1;
    let mut orchestrator = env.orchestrator("a", &[]);
    env.create("A", &[]);
    succeed_from(&mut env, "A", 0, 2);
    env.expect("A", &ship);
    for order in ["B", "G"] {
        env.create(order, &[]);
        env.expect(order, &env.def.steps[0].command.event_type.clone());
    }
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());

    // Version 2 with version 1 kept: A and B finish with three steps, C starts with two.
    env.topology = v2_with_v1.clone();
    let mut orchestrator = env.orchestrator("a", &[]);
    env.reply(2, Reply::Success, "A");
    env.expect("A", &completed);
    env.create("C", &[]);
    succeed_from(&mut env, "C", 0, 2);
    env.expect("C", &completed);
    assert_eq!(env.count("C", &ship), 0, "{:?}", env.trail("C"));
    env.reply(0, Reply::Success, "B");
    succeed_from(&mut env, "B", 1, 2);
    env.expect("B", &ship);
    assert_eq!(saga_json(&mut orchestrator, "B")["topology_version"], 1);
    assert_eq!(saga_json(&mut orchestrator, "C")["topology_version"], 2);
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());

    // Version 2 alone: version 1 sagas cannot go on. Their events are dead-lettered (nothing is
    // applied under the wrong steps), it is said at start-up, and every other order goes on.
    env.topology = v2_alone;
    let mut orchestrator = env.orchestrator("a", &[]);
    env.reply(0, Reply::Success, "G");
    // B's shipment reply comes without a key, as an outbox job sends it, on the partition that
    // does not hold B.
    let (topic, value) = env.reply_record(2, Reply::Success, "B", "ship-b");
    let elsewhere = 1 - Partitioner::ConsistentRandom.partition(b"B", 2);
    env.producer
        .send(
            rdkafka::producer::BaseRecord::<(), [u8]>::to(&topic)
                .partition(elsewhere)
                .payload(value.as_bytes()),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    rdkafka::producer::Producer::flush(&env.producer, Duration::from_secs(10)).unwrap();
    env.create("D", &[]);
    succeed_from(&mut env, "D", 0, 2);
    env.expect("D", &completed);
    env.wait("G's payment dead-lettered as incompatible", |env| {
        dead_letter(env, "G", "incompatible_saga")
    });
    assert_eq!(
        env.count("G", &env.def.steps[1].command.event_type.clone()),
        0
    );
    orchestrator.assert_alive();
    let log = orchestrator.log_text();
    assert!(log.contains("topology version that is not loaded"), "{log}");
    let addr = orchestrator.http_addr(Duration::from_secs(5));
    let (_, metrics) = common::http_get(&format!("http://{addr}/metrics"));
    assert!(
        metrics.lines().any(
            |l| l.starts_with("saga_streams_live_sagas_by_topology_version{")
                && l.contains("topology_version=\"1\"")
                && !l.ends_with(" 0")
        ),
        "{metrics}"
    );
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());

    // Version 1 loaded again: B's shipment reply, written meanwhile without a key (a type only
    // version 1 knows), is re-keyed to B's partition and completes it.
    env.topology = v2_with_v1;
    let _orchestrator = env.orchestrator("a", &[]);
    env.expect("B", &completed);
    assert_eq!(env.count("B", &completed), 1);
}

/// Writes `value` as the stored record of `order` straight into the saga store's changelog, as
/// a broken or foreign writer would.
fn corrupt_record(env: &SagaEnv, order: &str, value: &[u8]) {
    let changelog = format!("{}order_saga-sagas-changelog", env.prefix);
    let producer = common::producer(&env.bootstrap);
    let key = [b"s/".as_slice(), order.as_bytes()].concat();
    producer
        .send(
            rdkafka::producer::BaseRecord::<[u8], [u8]>::to(&changelog)
                .partition(0)
                .key(&key)
                .payload(value),
        )
        .map_err(|(e, _)| e)
        .unwrap();
    rdkafka::producer::Producer::flush(&producer, Duration::from_secs(10)).unwrap();
}

/// The last value the saga store's changelog holds for `order` (read_committed).
fn stored_record(env: &SagaEnv, order: &str) -> Vec<u8> {
    use rdkafka::consumer::{BaseConsumer, Consumer};
    use rdkafka::Message;
    let changelog = format!("{}order_saga-sagas-changelog", env.prefix);
    let consumer: BaseConsumer = rdkafka::ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("group.id", common::unique("stored-record"))
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .create()
        .unwrap();
    let mut assignment = rdkafka::TopicPartitionList::new();
    assignment
        .add_partition_offset(&changelog, 0, rdkafka::Offset::Beginning)
        .unwrap();
    consumer.assign(&assignment).unwrap();
    let (_, high) = consumer
        .fetch_watermarks(&changelog, 0, Duration::from_secs(10))
        .unwrap();
    let key = [b"s/".as_slice(), order.as_bytes()].concat();
    let mut last = None;
    let deadline = Instant::now() + Duration::from_secs(30);
    // Up to the high watermark (a transaction marker may be its last offset).
    while consumer
        .position()
        .ok()
        .and_then(|p| p.find_partition(&changelog, 0)?.offset().to_raw())
        .is_none_or(|at| at < high - 1)
    {
        assert!(
            Instant::now() < deadline,
            "the changelog was not read to its end"
        );
        if let Some(Ok(m)) = consumer.poll(Duration::from_millis(200)) {
            if m.key() == Some(key.as_slice()) {
                last = m.payload().map(<[u8]>::to_vec);
            }
        }
    }
    last.unwrap_or_else(|| panic!("no stored record of {order} in {changelog}"))
}

/// A saga stored by an earlier build (JSON, record version 2) goes on under this one: its
/// record is restored from the changelog, read, moved on by the next reply, and written back in
/// the binary version 3, its history kept.
#[test]
fn a_saga_stored_by_an_earlier_build_goes_on_and_is_written_back_in_the_current_version() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut orchestrator = env.orchestrator("a", &[]);
    let payment = env.def.steps[0].command.event_type.clone();
    env.create("legacy", &[]);
    env.expect("legacy", &payment);
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
    let current = stored_record(&env, "legacy");
    assert_eq!(current[..2], [0, 3], "this build writes binary records");
    // The same saga as version 2 wrote it: the record as JSON.
    let record = saga_streams::saga::processor::decode_record(&current).unwrap();
    let mut v2 = serde_json::to_value(&record).unwrap();
    v2["record_version"] = 2.into();
    corrupt_record(&env, "legacy", &serde_json::to_vec(&v2).unwrap());
    std::fs::remove_dir_all(env.state_dir("a")).unwrap();

    let mut orchestrator = env.orchestrator("a", &[]);
    env.reply(0, Reply::Success, "legacy");
    env.expect("legacy", &env.def.steps[1].command.event_type.clone());
    env.reply(1, Reply::Success, "legacy");
    env.expect("legacy", &env.def.completed.event_type.clone());
    let saga = saga_json(&mut orchestrator, "legacy");
    assert_eq!(saga["status"], "COMPLETED", "{saga}");
    let history = saga["history"].as_array().unwrap();
    assert_eq!(
        history.first().and_then(|t| t["cause"].as_str()),
        Some(env.def.start_event.as_str()),
        "{saga}"
    );
    // Created, paid, reserved, completed (the last step passes through its state).
    assert_eq!(history.len(), 4, "{saga}");
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
    let written = stored_record(&env, "legacy");
    assert_eq!(written[..2], [0, 3]);
    let written = saga_streams::saga::processor::decode_record(&written).unwrap();
    assert_eq!(written.history.len(), 4);
    assert_eq!(written.status, "COMPLETED");
}

/// `run --record-version 2` (the first pass of a rolling upgrade) writes records as version 2
/// JSON, which a release before the binary record reads.
#[test]
fn records_are_written_as_json_version_2_when_asked() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut orchestrator = env.orchestrator("a", &["--record-version", "2"]);
    env.create("json", &[]);
    env.expect("json", &env.def.steps[0].command.event_type.clone());
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
    let stored = stored_record(&env, "json");
    let json: serde_json::Value = serde_json::from_slice(&stored)
        .unwrap_or_else(|e| panic!("not JSON ({e}): {:?}", &stored[..stored.len().min(16)]));
    assert_eq!(json["record_version"], 2, "{json}");
    assert_eq!(json["status"], "PENDING", "{json}");
    assert_eq!(json["history"].as_array().map(Vec::len), Some(1), "{json}");
}

#[test]
fn an_unreadable_saga_record_is_quarantined_and_its_partition_goes_on() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let mut orchestrator = env.orchestrator("a", &[]);
    let payment = env.def.steps[0].command.event_type.clone();
    for order in ["broken", "future"] {
        env.create(order, &[]);
        env.expect(order, &payment);
    }
    assert!(orchestrator.sigterm(Duration::from_secs(30)).is_some());
    // Damaged records, then a fresh state directory: the stores are restored from the changelog.
    corrupt_record(
        &env,
        "broken",
        b"{\"saga_id\": \"broken\", \"status\": \"PENDING\", \"pha",
    );
    let mut future = serde_json::to_value(
        serde_json::from_slice::<serde_json::Value>(
            &std::fs::read(
                std::path::Path::new(env!("CARGO_MANIFEST_DIR"))
                    .join("tests/fixtures/saga-record-v2.json"),
            )
            .unwrap(),
        )
        .unwrap(),
    )
    .unwrap();
    future["record_version"] = 99.into();
    future["saga_id"] = "future".into();
    corrupt_record(&env, "future", &serde_json::to_vec(&future).unwrap());
    std::fs::remove_dir_all(env.state_dir("a")).unwrap();

    let mut orchestrator = env.orchestrator("a", &[]);
    for order in ["broken", "future"] {
        env.reply(0, Reply::Success, order);
    }
    // The same partition goes on.
    env.complete("after");
    for order in ["broken", "future"] {
        env.wait(&format!("{order}'s reply dead-lettered"), |env| {
            dead_letter(env, order, "quarantined_saga")
        });
        assert_eq!(
            env.count(order, &env.def.steps[1].command.event_type.clone()),
            0
        );
    }
    let addr = orchestrator.http_addr(Duration::from_secs(5));
    let (status, body) = common::http_get(&format!("http://{addr}/quarantine"));
    assert_eq!(status, 200, "{body}");
    let listed: serde_json::Value = serde_json::from_str(&body).unwrap();
    let mut ids: Vec<&str> = listed["records"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|r| r["saga_id"].as_str())
        .collect();
    ids.sort();
    assert_eq!(ids, ["broken", "future"], "{body}");
    assert!(body.contains("newer saga-streams"), "{body}");
    assert_eq!(
        saga_json(&mut orchestrator, "broken")["status"],
        "QUARANTINED"
    );
    // A start re-sent for a quarantined order starts nothing (it could charge twice).
    env.create("broken", &[]);
    env.complete("after-2");
    assert_eq!(env.count("broken", &payment), 1);
    let (_, metrics) = common::http_get(&format!("http://{addr}/metrics"));
    assert!(
        metrics.lines().any(
            |l| l.starts_with("saga_streams_saga_records_quarantined_total") && l.ends_with(" 2")
        ),
        "{metrics}"
    );
    orchestrator.assert_alive();
}

#[test]
fn an_input_partition_the_consumer_stops_fetching_is_noticed_and_the_clients_rebuilt() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    // The first start leaves the task's inputs paused, as a consumer whose fetcher stopped.
    let orchestrator = env.orchestrator_with_env(
        "a",
        &[],
        &[("SAGA_STREAMS_FAILPOINTS", "resume-inputs=1*return")],
    );
    env.create("starved", &[]);
    env.expect("starved", &env.def.steps[0].command.event_type.clone());
    let log = orchestrator.log_text();
    assert!(
        log.contains("an input partition is not fetched: rebuilding the clients")
            && log.contains("delivered none"),
        "{log}"
    );
    assert_eq!(
        env.count("starved", &env.def.steps[0].command.event_type.clone()),
        1
    );
}
