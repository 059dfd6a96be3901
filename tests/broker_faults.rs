//! The broker itself fails under load: killed (SIGKILL) and restarted with its data, and frozen
//! (SIGSTOP) for longer than the transaction timeout and than the group session timeout. The
//! counter runs through it; afterwards a `read_committed` check finds every input counted
//! exactly once, in order, and the changelog agrees with the outputs.
//!
//! A binary of its own: it stops the broker every other test uses (`scripts/stack restart kafka`,
//! `scripts/stack pause kafka`), and cargo runs test binaries one after another.

mod common;

use std::process::Command;
use std::time::{Duration, Instant};

use common::counter_env::*;
use common::{CounterArgs, CounterProcess};
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

fn stack(args: &[&str]) {
    let script = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("scripts/stack");
    let status = Command::new(script)
        .args(args)
        .status()
        .expect("running scripts/stack");
    assert!(status.success(), "scripts/stack {args:?} failed: {status}");
}

/// Feeds `sent` in chunks of 100 on a thread of its own through an idempotent producer (so
/// its own retries across a broker restart duplicate nothing), waiting out broker outages.
fn feed_through_outages(
    args: &CounterArgs,
    sent: &[(String, String, String)],
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let sent = sent.to_vec();
    let bootstrap = args.bootstrap.clone();
    std::thread::spawn(move || {
        let producer: BaseProducer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .expect("creating a producer");
        for chunk in sent.chunks(100) {
            for (topic, key, value) in chunk {
                let mut record = BaseRecord::to(topic).key(key).payload(value);
                loop {
                    match producer.send(record) {
                        Ok(()) => break,
                        Err((_, returned)) => {
                            record = returned;
                            producer.poll(Duration::from_millis(10));
                        }
                    }
                }
            }
            let deadline = Instant::now() + Duration::from_secs(240);
            while producer.flush(Duration::from_secs(5)).is_err() {
                assert!(
                    Instant::now() < deadline,
                    "inputs not delivered within 240 s"
                );
            }
            std::thread::sleep(pause);
        }
    })
}

fn check(args: &CounterArgs, sent: &[(String, String, String)], process: &CounterProcess) {
    let outputs = read_outputs(args, sent.len(), Duration::from_secs(300));
    let finals = check_exactly_once(&outputs, sent);
    assert_eq!(
        finals.values().sum::<u64>(),
        sent.len() as u64,
        "log:\n{}",
        process.log_text()
    );
    let committed = common::poll_until(Duration::from_secs(60), || changelog_state(args) == finals);
    assert!(
        committed,
        "changelog state differs from the counted outputs"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_killed_and_restarted_under_load_loses_and_duplicates_nothing() {
    let setup = setup("broker-kill", &[]).await;
    let args = setup.args.clone();
    let sent = inputs(&args, 0..3_000, 30);
    let process = CounterProcess::spawn(&args, "broker-kill");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    let feeder = feed_through_outages(&args, &sent, Duration::from_millis(200));
    for _ in 0..2 {
        std::thread::sleep(Duration::from_secs(2));
        stack(&["restart", "kafka", "--kill"]);
    }
    feeder.join().unwrap();
    check(&args, &sent, &process);
}

#[tokio::test(flavor = "multi_thread")]
async fn broker_frozen_past_the_transaction_and_session_timeouts_loses_and_duplicates_nothing() {
    let setup = setup("broker-freeze", &[]).await;
    let args = setup.args.clone();
    let sent = inputs(&args, 0..2_000, 30);
    let process = CounterProcess::spawn(&args, "broker-freeze");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    let feeder = feed_through_outages(&args, &sent, Duration::from_millis(200));
    // Longer than the transaction timeout (10 s): the open transaction is aborted by the
    // coordinator once it runs again.
    std::thread::sleep(Duration::from_secs(2));
    stack(&["pause", "kafka"]);
    std::thread::sleep(Duration::from_secs(15));
    stack(&["resume", "kafka"]);
    // Longer than the group session timeout (45 s): the member is expired when it thaws.
    std::thread::sleep(Duration::from_secs(3));
    stack(&["pause", "kafka"]);
    std::thread::sleep(Duration::from_secs(50));
    stack(&["resume", "kafka"]);
    feeder.join().unwrap();
    check(&args, &sent, &process);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_instance_started_while_the_broker_is_down_waits_for_it() {
    let setup = setup("broker-late", &[]).await;
    let args = setup.args.clone();
    let sent = inputs(&args, 0..600, 12);
    stack(&["stop", "kafka"]);
    let mut process = CounterProcess::spawn(&args, "broker-late");
    let waiting = common::poll_until(Duration::from_secs(60), || {
        process
            .log_text()
            .contains("cannot reach the Kafka cluster yet")
    });
    // It says why it waits, and it waits: it has not exited.
    let exited = process.child.try_wait().ok().flatten();
    stack(&["start", "kafka"]);
    assert!(waiting, "no line about waiting:\n{}", process.log_text());
    assert!(
        exited.is_none(),
        "exited ({exited:?}):\n{}",
        process.log_text()
    );
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(180));
    let feeder = feed_through_outages(&args, &sent, Duration::from_millis(100));
    feeder.join().unwrap();
    check(&args, &sent, &process);
}
