//! The saga's business outcomes when the orchestrator is slow, down or frozen (issue: saga
//! outcomes), through the binary against the real broker.

mod common;

use std::time::{Duration, Instant};

use common::saga_env::{Reply, SagaEnv};

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
