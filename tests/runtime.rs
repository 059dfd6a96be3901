//! The streams runtime against the real broker, through the `counter` example run as a child
//! process: exactly-once across SIGKILLs, restoration from the checkpoint, injected aborts.

mod common;

use std::time::Duration;

use common::counter_env::*;
use common::{create_topic, produce_all, producer, unique, CounterProcess};

#[tokio::test(flavor = "multi_thread")]
async fn every_input_is_counted_exactly_once_across_sigkills() {
    let setup = setup("crash", &[]).await;
    let args = setup.args.clone();
    let total = 6_000;
    let sent = inputs(&args, 0..total, 40);

    let feeder = feed_slowly(&args, &sent, Duration::from_millis(60));

    let mut rng_state = 0x2545F4914F6CDD1Du64;
    let mut next_random = move |bound: u64| {
        rng_state ^= rng_state << 13;
        rng_state ^= rng_state >> 7;
        rng_state ^= rng_state << 17;
        rng_state % bound
    };
    for round in 0..10 {
        let mut process = CounterProcess::spawn(&args, &format!("run-{round}"));
        std::thread::sleep(Duration::from_millis(1_500 + next_random(2_000)));
        process.sigkill();
    }
    feeder.join().unwrap();
    let process = CounterProcess::spawn(&args, "final");
    let outputs = read_outputs(&args, total, Duration::from_secs(120));
    let finals = check_exactly_once(&outputs, &sent);
    assert_eq!(finals.values().sum::<u64>(), total as u64);
    // The state Kafka holds for the store agrees with what the outputs say.
    let committed =
        common::poll_until(Duration::from_secs(30), || changelog_state(&args) == finals);
    assert!(
        committed,
        "changelog state differs from the counted outputs"
    );
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restart_after_sigkill_replays_only_the_changelog_tail() {
    let setup = setup("tail", &[]).await;
    let args = setup.args.clone();
    let keys = 3_000;
    let sent = inputs(&args, 0..keys, keys);
    let mut process = CounterProcess::spawn(&args, "first");
    produce_all(&producer(&args.bootstrap), &sent);
    let outputs = read_outputs(&args, keys, Duration::from_secs(120));
    check_exactly_once(&outputs, &sent);
    // Let one more cycle commit state after the outputs, then crash.
    std::thread::sleep(Duration::from_millis(500));
    process.sigkill();

    let restarted = CounterProcess::spawn(&args, "second");
    wait_running(&restarted, PARTITIONS as usize, Duration::from_secs(120));
    let restores = restored_records(&restarted, "counts");
    assert_eq!(
        restores.len(),
        PARTITIONS as usize,
        "one restore per task: {restores:?}"
    );
    let replayed: u64 = restores.iter().map(|(_, n)| n).sum();
    assert!(
        restores.iter().all(|(from, _)| from.is_some()),
        "every task restarts from a checkpoint: {restores:?}"
    );
    assert!(
        replayed < keys as u64 / 10,
        "replayed {replayed} of {keys} records: not a tail"
    );
    drop(restarted);

    // Without local state, everything is restored, and the counts go on from the same state.
    std::fs::remove_dir_all(args.state_dir.join(&args.application_id)).unwrap();
    let rebuilt = CounterProcess::spawn(&args, "third");
    wait_running(&rebuilt, PARTITIONS as usize, Duration::from_secs(120));
    let restores = restored_records(&rebuilt, "counts");
    assert!(
        restores.iter().all(|(from, _)| from.is_none()),
        "full restore: {restores:?}"
    );
    let replayed: u64 = restores.iter().map(|(_, n)| n).sum();
    assert!(
        replayed >= keys as u64,
        "full restore replayed only {replayed} records"
    );
    let more = inputs(&args, keys..keys + 300, keys);
    produce_all(&producer(&args.bootstrap), &more);
    let outputs = read_outputs(&args, keys + 300, Duration::from_secs(120));
    let all: Vec<_> = sent.iter().chain(&more).cloned().collect();
    let finals = check_exactly_once(&outputs, &all);
    assert_eq!(finals.values().sum::<u64>(), (keys + 300) as u64);
    drop(rebuilt);
}

#[tokio::test(flavor = "multi_thread")]
async fn an_injected_abort_leaves_neither_outputs_nor_state_behind() {
    let setup = setup("abort", &[]).await;
    let args = setup.args.clone();
    let process = CounterProcess::spawn(&args, "abort");
    // The poison record sits in the middle of a stream on one key, so the aborted cycle had
    // produced outputs and state writes before it failed.
    let mut sent: Vec<(String, String, String)> = (0..200)
        .map(|i| (args.inputs[0].clone(), "hot".to_string(), format!("v{i}")))
        .collect();
    sent.insert(
        100,
        (
            args.inputs[0].clone(),
            "hot".to_string(),
            "fail-once:x".to_string(),
        ),
    );
    produce_all(&producer(&args.bootstrap), &sent);

    let outputs = read_outputs(&args, sent.len(), Duration::from_secs(120));
    let finals = check_exactly_once(&outputs, &sent);
    assert_eq!(finals["hot"], sent.len() as u64);
    let failures = process
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "aborting the commit cycle and rewinding inputs")
        .count();
    assert!(
        failures >= 1,
        "no abort happened; log:\n{}",
        process.log_text()
    );
    // Had the aborted cycle's state writes leaked, the counts after the retry would skip numbers
    // (check_exactly_once demands 1..=n in order) and the changelog would run ahead.
    assert_eq!(changelog_state(&args)["hot"], sent.len() as u64);
    drop(process);
}

#[tokio::test(flavor = "multi_thread")]
async fn instances_joining_and_leaving_under_load_lose_and_duplicate_nothing() {
    let setup = setup("rebalance", &[]).await;
    let args = setup.args.clone();
    let total = 6_000;
    let sent = inputs(&args, 0..total, 30);
    let feeder = feed_slowly(&args, &sent, Duration::from_millis(100));
    let (a, b, c) = (
        instance(&args, "a"),
        instance(&args, "b"),
        instance(&args, "c"),
    );
    let mut first = CounterProcess::spawn(&a, "a");
    let second = CounterProcess::spawn(&b, "b");
    std::thread::sleep(Duration::from_secs(2));
    let third = CounterProcess::spawn(&c, "c");
    std::thread::sleep(Duration::from_secs(2));
    let status = first
        .sigterm(Duration::from_secs(30))
        .expect("instance a stops within 30 s of SIGTERM");
    assert!(
        status.success(),
        "instance a exited with {status}; log:\n{}",
        first.log_text()
    );
    feeder.join().unwrap();

    let outputs = read_outputs(&args, total, Duration::from_secs(120));
    let finals = check_exactly_once(&outputs, &sent);
    assert_eq!(finals.values().sum::<u64>(), total as u64);
    // Tasks really moved: some task started on more than one instance, and every task the
    // leaving instance closed was started again, afterwards, by one of the instances that stayed.
    // (Which instance held what first depends on when each joined.)
    let lines = |p: &CounterProcess, message: &str| -> Vec<(String, i64)> {
        p.log_lines()
            .iter()
            .filter(|l| l["message"] == message)
            .filter_map(|l| Some((l["timestamp"].as_str()?.to_string(), l["task"].as_i64()?)))
            .collect()
    };
    let starts = lines(&first, "task running").len()
        + lines(&second, "task running").len()
        + lines(&third, "task running").len();
    assert!(
        starts > PARTITIONS as usize,
        "no task ever moved between instances"
    );
    let restarted: Vec<(String, i64)> = [
        lines(&second, "task running"),
        lines(&third, "task running"),
    ]
    .concat();
    for (closed_at, task) in lines(&first, "task closed") {
        assert!(
            restarted.iter().any(|(at, t)| *t == task && *at > closed_at),
            "task {task}, closed by the leaving instance at {closed_at}, never started elsewhere after that: {restarted:?}"
        );
    }
    drop((second, third));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_zombie_with_the_same_instance_id_is_fenced_and_adds_nothing() {
    let setup = setup("zombie", &[]).await;
    let args = setup.args.clone();
    let total = 3_000;
    let sent = inputs(&args, 0..total, 20);
    let feeder = feed_slowly(&args, &sent, Duration::from_millis(100));
    let old = instance(&args, "same");
    let mut new = instance(&args, "same");
    new.state_dir = args.state_dir.with_file_name("state-same-new");
    let mut zombie = CounterProcess::spawn(&old, "zombie");
    std::thread::sleep(Duration::from_secs(3));
    let successor = CounterProcess::spawn(&new, "successor");
    let fenced = common::poll_until(Duration::from_secs(120), || {
        zombie.log_text().contains("fenced")
    });
    assert!(
        fenced,
        "the older instance was never fenced; log:\n{}",
        zombie.log_text()
    );
    zombie.sigkill();
    feeder.join().unwrap();
    let outputs = read_outputs(&args, total, Duration::from_secs(120));
    let finals = check_exactly_once(&outputs, &sent);
    assert_eq!(finals.values().sum::<u64>(), total as u64);
    drop(successor);
}

/// Waits for a process that should refuse to start; returns its log.
fn refused(mut process: CounterProcess) -> String {
    let exited = common::poll_until(Duration::from_secs(60), || {
        matches!(process.child.try_wait(), Ok(Some(_)))
    });
    assert!(
        exited,
        "the instance did not refuse to start; log:\n{}",
        process.log_text()
    );
    let status = process.child.wait().unwrap();
    assert!(!status.success(), "refusing to start must exit non-zero");
    process.log_text()
}

#[tokio::test(flavor = "multi_thread")]
async fn start_up_refuses_topics_that_do_not_fit_and_creates_compacted_changelogs() {
    let setup = setup("topics", &[]).await;
    let args = setup.args.clone();

    let mut missing = args.clone();
    missing.inputs = vec![args.inputs[0].clone(), unique("no-such-topic")];
    let log = refused(CounterProcess::spawn(&missing, "missing"));
    assert!(
        log.contains(&format!(
            "input topic '{}' does not exist",
            missing.inputs[1]
        )),
        "{log}"
    );

    let narrow = unique("topics-narrow");
    create_topic(&args.bootstrap, &narrow, 2).await;
    let mut uneven = args.clone();
    uneven.inputs = vec![args.inputs[0].clone(), narrow.clone()];
    let log = refused(CounterProcess::spawn(&uneven, "uneven"));
    assert!(log.contains("same partition count"), "{log}");
    assert!(
        log.contains(&format!("{narrow}: 2")) && log.contains(&format!("{}: 3", args.inputs[0])),
        "{log}"
    );

    let mut wrong_changelog = args.clone();
    wrong_changelog.application_id = unique("topics-wrong");
    let counts_changelog = format!("{}-counts-changelog", wrong_changelog.application_id);
    create_topic(&args.bootstrap, &counts_changelog, 1).await;
    let log = refused(CounterProcess::spawn(&wrong_changelog, "wrong-changelog"));
    assert!(
        log.contains(&format!(
            "changelog topic '{counts_changelog}' has 1 partitions"
        )),
        "{log}"
    );

    // A fitting topology starts and creates its changelogs: compacted, one partition per task.
    let process = CounterProcess::spawn(&args, "fits");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    for store in ["counts", "meta"] {
        let topic = format!("{}-{store}-changelog", args.application_id);
        let admin = common::admin(&args.bootstrap);
        let described = admin
            .describe_configs(
                &[rdkafka::admin::ResourceSpecifier::Topic(&topic)],
                &rdkafka::admin::AdminOptions::new(),
            )
            .await
            .unwrap();
        let resource = described
            .into_iter()
            .next()
            .unwrap()
            .expect("changelog exists");
        let policy = resource.get("cleanup.policy").and_then(|e| e.value.clone());
        assert_eq!(policy.as_deref(), Some("compact"), "{topic}");
        let metadata = admin
            .inner()
            .fetch_metadata(Some(&topic), Duration::from_secs(10))
            .unwrap();
        assert_eq!(
            metadata.topics()[0].partitions().len(),
            PARTITIONS as usize,
            "{topic}"
        );
    }
    drop(process);
}
