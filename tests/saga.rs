//! The order saga end to end on the real broker: the `saga-streams run` binary as a child process,
//! the test playing the participant services (or the `simulate` binaries for the crash test), and
//! every check made on what a `read_committed` reader sees.
//!
//! Flow tests use single-partition topics, so the order in which the test produces is the order
//! in which the saga processes, and a later record's visible effect proves the earlier records
//! were handled (a barrier, instead of sleeping).

mod common;

use std::path::PathBuf;
use std::time::Duration;

use common::saga_env::{body, describe, Reply, SagaEnv, LIMIT};
use common::{poll_until, BinProcess};
use saga_streams::saga::processor::dlq_headers;
use saga_streams::sim::{self, ReadRecord, TopicScanner};
use serde_json::json;

#[test]
fn success_flow_completes_with_correlation_and_trace_headers() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    let traceparent = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01";
    env.create(
        "o-1",
        &[
            ("X-Correlation-ID", "corr-o-1"),
            ("traceparent", traceparent),
        ],
    );
    let pay = env.expect("o-1", "ProcessPayment");
    assert_eq!(pay["correlation_id"], "corr-o-1");
    assert_eq!(pay["currency"], "EUR");
    assert!(pay["amount"].is_number());
    env.reply(0, Reply::Success, "o-1");
    let reserve = env.expect("o-1", "ReserveInventory");
    assert!(reserve["items"].as_array().is_some_and(|i| !i.is_empty()));
    env.reply(1, Reply::Success, "o-1");
    env.expect("o-1", "OrderCompleted");
    for r in env.seen.iter().filter(|r| r.key.as_deref() == Some(b"o-1")) {
        assert_eq!(
            r.header("X-Correlation-ID").as_deref(),
            Some("corr-o-1"),
            "{}",
            describe(r)
        );
        // A child of the caller's span: the same trace, the saga's own span.
        let tp = r.header("traceparent").unwrap_or_default();
        assert!(
            tp.starts_with("00-0af7651916cd43dd8448eb211c80319c-")
                && !tp.contains("b7ad6b7169203331"),
            "{}",
            describe(r)
        );
        let b = body(r);
        for field in [
            "event_id",
            "event_type",
            "event_version",
            "order_id",
            "correlation_id",
            "occurred_at",
        ] {
            assert!(b.contains_key(field), "{field} missing in {}", describe(r));
        }
    }
    assert_eq!(
        env.trail("o-1"),
        ["ProcessPayment", "ReserveInventory", "OrderCompleted"]
    );

    // Without a header the correlation id is generated, and the same on every output.
    env.create("o-2", &[]);
    env.expect("o-2", "ProcessPayment");
    env.reply(0, Reply::Failure, "o-2");
    env.expect("o-2", "OrderCancelled");
    let ids: Vec<String> = env
        .seen
        .iter()
        .filter(|r| r.key.as_deref() == Some(b"o-2"))
        .map(|r| r.header("X-Correlation-ID").unwrap_or_default())
        .collect();
    assert!(
        ids.len() == 2 && !ids[0].is_empty() && ids[0] == ids[1],
        "{ids:?}"
    );
}

#[test]
fn payment_failure_cancels_and_inventory_failure_refunds_first() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);

    env.create("pf", &[]);
    env.expect("pf", "ProcessPayment");
    env.reply(0, Reply::Failure, "pf");
    let cancelled = env.expect("pf", "OrderCancelled");
    assert_eq!(cancelled["reason"], "payment_failed");
    assert_eq!(env.trail("pf"), ["ProcessPayment", "OrderCancelled"]);

    env.create("if", &[]);
    env.expect("if", "ProcessPayment");
    env.reply(0, Reply::Success, "if");
    env.expect("if", "ReserveInventory");
    env.reply(1, Reply::Failure, "if");
    let refund = env.expect("if", "RefundPayment");
    assert_eq!(refund["payment_id"], "payment_id-if");
    assert!(refund["amount"].is_number());
    // The outcome waits for the refund's confirmation: a barrier order on the same partitions
    // completes first, and "if" still has no outcome.
    env.complete("barrier");
    assert_eq!(env.count("if", "OrderCancelled"), 0);
    env.reply(0, Reply::Compensated, "if");
    let cancelled = env.expect("if", "OrderCancelled");
    assert_eq!(cancelled["reason"], "inventory_failed");
    assert_eq!(
        env.trail("if"),
        [
            "ProcessPayment",
            "ReserveInventory",
            "RefundPayment",
            "OrderCancelled"
        ]
    );
}

#[test]
fn a_timeout_at_each_step_compensates_what_was_done() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator(
        "a",
        &[
            "--step-timeout",
            "payment=2s",
            "--step-timeout",
            "inventory=2s",
        ],
    );
    env.create("t-pay", &[]);
    env.create("t-inv", &[]);
    env.expect("t-inv", "ProcessPayment");
    env.reply(0, Reply::Success, "t-inv");
    // No input arrives from here on for t-pay: its timer fires on wall-clock time.
    let cancelled = env.expect("t-pay", "OrderCancelled");
    assert_eq!(cancelled["reason"], "timeout:payment");
    assert_eq!(env.trail("t-pay"), ["ProcessPayment", "OrderCancelled"]);

    env.expect("t-inv", "RefundPayment");
    env.reply(0, Reply::Compensated, "t-inv");
    let cancelled = env.expect("t-inv", "OrderCancelled");
    assert_eq!(cancelled["reason"], "timeout:inventory");
    assert_eq!(
        env.trail("t-inv"),
        [
            "ProcessPayment",
            "ReserveInventory",
            "RefundPayment",
            "OrderCancelled"
        ]
    );
}

#[test]
fn a_late_payment_success_is_refunded_and_the_order_stays_cancelled() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &["--step-timeout", "payment=2s"]);
    env.create("late", &[]);
    let cancelled = env.expect("late", "OrderCancelled");
    assert_eq!(cancelled["reason"], "timeout:payment");
    let id = env.reply(0, Reply::Success, "late");
    let refund = env.expect("late", "RefundPayment");
    assert_eq!(refund["payment_id"], "payment_id-late");
    // The same success again, and a second one: nothing more.
    env.reply_with_id(0, Reply::Success, "late", &id);
    env.reply(0, Reply::Success, "late");
    env.complete("barrier");
    assert_eq!(
        env.trail("late"),
        ["ProcessPayment", "OrderCancelled", "RefundPayment"]
    );
}

#[test]
fn duplicate_and_unexpected_replies_change_nothing() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    env.create("dup", &[]);
    env.create("dup", &[]);
    env.expect("dup", "ProcessPayment");
    let id = env.reply(0, Reply::Success, "dup");
    env.reply_with_id(0, Reply::Success, "dup", &id);
    env.reply(0, Reply::Success, "dup");
    env.reply(0, Reply::Failure, "dup");
    env.reply(0, Reply::Compensated, "dup");
    env.expect("dup", "ReserveInventory");
    env.reply(1, Reply::Success, "dup");
    env.expect("dup", "OrderCompleted");
    env.reply(1, Reply::Failure, "dup");
    env.complete("barrier");
    assert_eq!(
        env.trail("dup"),
        ["ProcessPayment", "ReserveInventory", "OrderCompleted"]
    );
    assert!(env.seen.iter().all(|r| !r.topic.ends_with(".dlq")));
}

#[test]
fn every_kind_of_bad_input_is_dead_lettered_and_the_saga_goes_on() {
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    let created = env.def.start_topic.clone();
    let payments = env.def.steps[0].reply_topic.clone();
    let valid = |order: &str| {
        let mut b = sim::load::order_created(&env.def, order);
        b["event_id"] = json!(format!("e-{order}"));
        b
    };
    let mut wrong_type = valid("p-type");
    wrong_type["total"] = json!("a lot");
    let mut no_order = valid("p-noorder");
    no_order.as_object_mut().unwrap().remove("order_id");
    let mut unknown = valid("p-unknown");
    unknown["event_type"] = json!("OrderShipped");
    let cases: Vec<(&str, &str, Option<&str>, Vec<u8>)> = vec![
        ("invalid_json", &created, Some("p-json"), b"{\"event\": {oops".to_vec()),
        ("missing_saga_id", &created, Some("p-noorder"), serde_json::to_vec(&no_order).unwrap()),
        ("unknown_event_type", &created, Some("p-unknown"), serde_json::to_vec(&unknown).unwrap()),
        ("invalid_field", &created, Some("p-type"), serde_json::to_vec(&json!({ "event": wrong_type })).unwrap()),
        (
            "unknown_saga",
            &payments,
            Some("ghost"),
            serde_json::to_vec(&json!({"event": {"event_id": "g1", "event_type": "PaymentSucceeded", "order_id": "ghost", "payment_id": "p"}})).unwrap(),
        ),
        ("missing_value", &created, Some("p-empty"), Vec::new()),
    ];
    for (_, topic, key, value) in &cases {
        env.send_raw(topic, *key, value, &[("X-Correlation-ID", "poison")]);
    }
    env.complete("after-poison");

    let dead: Vec<&ReadRecord> = env
        .seen
        .iter()
        .filter(|r| r.topic.ends_with(".dlq"))
        .collect();
    assert_eq!(
        dead.len(),
        cases.len(),
        "{:#?}",
        dead.iter().map(|r| describe(r)).collect::<Vec<_>>()
    );
    for (kind, topic, key, value) in &cases {
        let r = dead
            .iter()
            .find(|r| r.header(dlq_headers::KIND).as_deref() == Some(*kind))
            .unwrap_or_else(|| panic!("no dead letter of kind {kind}"));
        assert_eq!(r.topic, format!("{topic}.dlq"));
        assert_eq!(r.header(dlq_headers::TOPIC).as_deref(), Some(*topic));
        assert_eq!(r.header(dlq_headers::PARTITION).as_deref(), Some("0"));
        assert!(r
            .header(dlq_headers::OFFSET)
            .is_some_and(|o| o.parse::<i64>().is_ok()));
        assert!(r
            .header(dlq_headers::MESSAGE)
            .is_some_and(|m| !m.is_empty()));
        // The original bytes, key and headers are kept.
        assert_eq!(
            r.value.as_deref().unwrap_or_default(),
            value.as_slice(),
            "{kind}"
        );
        assert_eq!(r.key.as_deref(), key.map(str::as_bytes), "{kind}");
        assert_eq!(r.header("X-Correlation-ID").as_deref(), Some("poison"));
    }
    // Offsets are distinct: each bad record is its own dead letter.
    let mut offsets: Vec<String> = dead
        .iter()
        .filter_map(|r| r.header(dlq_headers::OFFSET))
        .collect();
    offsets.sort();
    offsets.dedup();
    assert_eq!(
        offsets.len(),
        cases.len() - 1,
        "one case is on another topic"
    );
}

#[test]
fn the_three_step_topology_compensates_in_reverse_order() {
    let mut env = SagaEnv::new("order_with_shipping.yaml", 1);
    let _orchestrator = env.orchestrator("a", &[]);
    env.create("s-1", &[]);
    env.expect("s-1", "ProcessPayment");
    env.reply(0, Reply::Success, "s-1");
    env.expect("s-1", "ReserveInventory");
    env.reply(1, Reply::Success, "s-1");
    env.expect("s-1", "ScheduleShipment");
    env.reply(2, Reply::Failure, "s-1");
    env.expect("s-1", "ReleaseInventory");
    env.complete("barrier");
    assert_eq!(
        env.count("s-1", "RefundPayment"),
        0,
        "the refund waits for the release"
    );
    env.reply(1, Reply::Compensated, "s-1");
    env.expect("s-1", "RefundPayment");
    env.reply(0, Reply::Compensated, "s-1");
    let cancelled = env.expect("s-1", "OrderCancelled");
    assert_eq!(cancelled["reason"], "shipping_failed");
    assert_eq!(
        env.trail("s-1"),
        [
            "ProcessPayment",
            "ReserveInventory",
            "ScheduleShipment",
            "ReleaseInventory",
            "RefundPayment",
            "OrderCancelled"
        ]
    );
}

/// Thousands of orders while the orchestrator is killed with SIGKILL and restarted several
/// times; the participants are the `simulate` binaries with failures and silent commands. In the
/// end every order has exactly one outcome and the audit finds nothing wrong.
#[test]
fn sigkilled_orchestrator_under_load_loses_and_duplicates_nothing() {
    let env = SagaEnv::new("order_saga.yaml", 4);
    let orders: u64 = 3_000;
    let timeouts = [
        "--step-timeout",
        "payment=3s",
        "--step-timeout",
        "inventory=3s",
    ];
    let mut participants = Vec::new();
    for (step, failure) in [("payments", "0.1"), ("inventory", "0.1")] {
        let mut args = env.args(
            &["simulate", step],
            &[
                "--failure-share",
                failure,
                "--no-reply-share",
                "0.02",
                "--instance-id",
                "sim",
            ],
        );
        args.push("--state-dir".into());
        args.push(
            env.dir
                .path()
                .join(format!("sim-{step}"))
                .display()
                .to_string(),
        );
        participants.push(BinProcess::spawn(
            &args,
            env.dir.path().join(format!("sim-{step}.log")),
        ));
    }
    let mut orchestrator = env.orchestrator("a", &timeouts);
    let mut load = BinProcess::spawn(
        &env.args(
            &["load"],
            &[
                "--orders",
                &orders.to_string(),
                "--rate",
                "300",
                "--id-prefix",
                "crash-",
            ],
        ),
        env.dir.path().join("load.log"),
    );

    let outcomes = TopicScanner::new(
        &env.bootstrap,
        &[
            env.def.completed.topic.clone(),
            env.def.cancelled.topic.clone(),
        ],
    )
    .unwrap();
    let finished = std::cell::Cell::new(0u64);
    let count = |limit: Duration| {
        let mut batch = Vec::new();
        outcomes.poll_batch(limit, &mut batch).unwrap();
        finished.set(finished.get() + batch.len() as u64);
        finished.get()
    };
    for kill in 1..=4u64 {
        // Let some sagas finish between kills, then kill without warning.
        assert!(
            poll_until(LIMIT, || count(Duration::from_millis(100))
                >= kill * orders / 8),
            "only {} outcomes before kill {kill}",
            finished.get()
        );
        orchestrator.assert_alive();
        orchestrator.sigkill();
        orchestrator = env.orchestrator("a", &timeouts);
    }
    let status = load.child.wait().unwrap();
    assert!(status.success(), "load failed:\n{}", load.log_text());
    assert!(
        poll_until(Duration::from_secs(240), || count(Duration::from_millis(
            200
        )) >= orders),
        "only {} of {orders} outcomes",
        finished.get()
    );
    orchestrator.assert_alive();
    for p in &mut participants {
        p.assert_alive();
    }

    let report = sim::audit::audit(
        &env.bootstrap,
        &env.def,
        &saga_streams::codec::Codec::json(),
        LIMIT,
    )
    .unwrap();
    assert_eq!(report.sagas, orders, "{}", report.table());
    assert_eq!(report.without_outcome, 0, "{}", report.table());
    assert!(
        report.is_clean(),
        "{}\n{:#?}",
        report.table(),
        &report.violations[..report.violations.len().min(20)]
    );
    // The run met every path: failures, timeouts and refunds.
    let reasons = &report.cancelled_by_reason;
    for reason in [
        "payment_failed",
        "inventory_failed",
        "timeout:payment",
        "timeout:inventory",
    ] {
        assert!(
            reasons.get(reason).copied().unwrap_or(0) > 0,
            "no {reason}: {}",
            report.table()
        );
    }
    assert!(
        report
            .messages_by_type
            .get("RefundPayment")
            .copied()
            .unwrap_or(0)
            > 0
    );
    assert_eq!(
        finished.get(),
        orders,
        "an outcome was read twice: duplicates are visible"
    );
}

/// `describe` prints the machine; a broken topology is refused with every problem and its line.
#[test]
fn describe_prints_the_machine_and_refuses_a_broken_topology() {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .args(["describe", "topologies/order_with_shipping.yaml"])
        .current_dir(env!("CARGO_MANIFEST_DIR"))
        .output()
        .unwrap();
    assert!(out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("stateDiagram-v2"), "{text}");
    assert!(
        text.contains(
            "INVENTORY_RESERVED --> COMPENSATING_INVENTORY: ShipmentFailed / ReleaseInventory"
        ),
        "{text}"
    );

    let dir = tempfile::tempdir().unwrap();
    let broken = std::fs::read_to_string(
        PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("topologies/order_saga.yaml"),
    )
    .unwrap()
    .replace("topic: inventory.events,", "topic: inventory.replies,")
    .replace(
        "confirmed_by: PaymentRefunded",
        "confirmed_by: PaymentRefundd",
    );
    let file = dir.path().join("broken.yaml");
    std::fs::write(&file, &broken).unwrap();
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
        .arg("describe")
        .arg(&file)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    let line_of = |needle: &str| broken.lines().position(|l| l.contains(needle)).unwrap() + 1;
    assert!(
        err.contains(&format!(
            "broken.yaml:{}: unknown topic 'inventory.replies'",
            line_of("inventory.replies")
        )),
        "{err}"
    );
    assert!(
        err.contains(&format!(
            "broken.yaml:{}: unknown event type 'PaymentRefundd'",
            line_of("PaymentRefundd")
        )),
        "{err}"
    );
}

#[test]
fn the_audit_reads_past_a_transaction_left_open_to_the_records_committed_after_it() {
    use rdkafka::config::ClientConfig;
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let mut env = SagaEnv::new("order_saga.yaml", 1);
    let topic = env.def.completed.topic.clone();
    // A producer that froze with its transaction open: the last stable offset stays behind it.
    let stuck: BaseProducer = ClientConfig::new()
        .set("bootstrap.servers", &env.bootstrap)
        .set("transactional.id", common::unique("audit-stuck"))
        .set("transaction.timeout.ms", "60000")
        .create()
        .unwrap();
    stuck.init_transactions(Duration::from_secs(30)).unwrap();
    stuck.begin_transaction().unwrap();
    stuck
        .send(BaseRecord::to(&topic).key("open").payload("{}"))
        .map_err(|(e, _)| e)
        .unwrap();
    stuck.flush(Duration::from_secs(10)).unwrap();
    // Committed after it (a plain producer's records count as committed at once).
    env.send_raw(&topic, Some("after-open"), b"{\"event\": {}}", &[]);
    let reader = {
        let (bootstrap, topic) = (env.bootstrap.clone(), topic.clone());
        std::thread::spawn(move || sim::read_to_end(&bootstrap, &[topic], Duration::from_secs(60)))
    };
    // The reader must wait: give it time to reach the early end, then end the transaction.
    let waiting = poll_until(Duration::from_secs(3), || reader.is_finished());
    assert!(
        !waiting,
        "read_to_end returned while a transaction held the end back"
    );
    stuck.abort_transaction(Duration::from_secs(30)).unwrap();
    let records = reader.join().unwrap().unwrap();
    let keys: Vec<Option<&[u8]>> = records.iter().map(|r| r.key.as_deref()).collect();
    assert_eq!(keys, vec![Some(b"after-open".as_slice())]);
    env.seen.clear();
}

#[test]
fn a_participant_answers_a_re_sent_command_again_then_forgets_it_after_remember_commands() {
    let env = SagaEnv::new("order_saga.yaml", 1);
    let mut args = env.args(
        &["simulate", "payment"],
        &["--remember-commands", "3s", "--instance-id", "sim"],
    );
    args.push("--state-dir".into());
    args.push(env.dir.path().join("sim").display().to_string());
    let mut participant = BinProcess::spawn(&args, env.dir.path().join("sim.log"));
    let step = &env.def.steps[0];
    let command = json!({ "event": {
        "event_id": "cmd-1",
        "event_type": step.command.event_type,
        "event_version": 1,
        "order_id": "o-1",
        "amount": 12.5,
        "currency": "EUR",
    }});
    let value = serde_json::to_vec(&command).unwrap();
    let changelog = format!("{}sim-payment-participant-changelog", env.prefix);
    let read = |scanner: &TopicScanner,
                seen: &mut Vec<ReadRecord>,
                what: &str,
                done: &dyn Fn(&[ReadRecord]) -> bool| {
        let ok = poll_until(Duration::from_secs(60), || {
            let mut batch = Vec::new();
            scanner
                .poll_batch(Duration::from_millis(200), &mut batch)
                .unwrap();
            seen.extend(batch);
            done(seen)
        });
        assert!(ok, "no {what}:\n{}", participant_log(seen));
    };
    let replies = |seen: &[ReadRecord]| {
        seen.iter()
            .filter(|r| r.topic == step.reply_topic && r.key.as_deref() == Some(b"o-1".as_slice()))
            .count()
    };

    env.send_raw(&step.command.topic, Some("o-1"), &value, &[]);
    let scanner =
        TopicScanner::new(&env.bootstrap, std::slice::from_ref(&step.reply_topic)).unwrap();
    let mut seen = Vec::new();
    read(&scanner, &mut seen, "reply", &|s| replies(s) >= 1);
    // Sent again while remembered: answered again with the same reply (same event id).
    env.send_raw(&step.command.topic, Some("o-1"), &value, &[]);
    read(&scanner, &mut seen, "second reply", &|s| replies(s) >= 2);
    let ids: Vec<String> = seen
        .iter()
        .map(|r| body(r)["event_id"].to_string())
        .collect();
    assert_eq!(ids[0], ids[1]);

    // After --remember-commands the id is forgotten: its entry is deleted (a changelog
    // tombstone), so the store does not grow with every command ever answered.
    let changelog_scanner = TopicScanner::new(&env.bootstrap, &[changelog]).unwrap();
    let mut log = Vec::new();
    read(&changelog_scanner, &mut log, "tombstone of c/cmd-1", &|s| {
        s.iter()
            .any(|r| r.key.as_deref() == Some(b"c/cmd-1".as_slice()) && r.value.is_none())
    });
    participant.assert_alive();
}

fn participant_log(seen: &[ReadRecord]) -> String {
    seen.iter().map(describe).collect::<Vec<_>>().join("\n")
}
