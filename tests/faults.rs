//! Injected failures in every call of the runtime that talks to the broker or the disk (the
//! `failpoints` feature, armed per child process through `SAGA_STREAMS_FAILPOINTS`), against the
//! real broker: after each, every input is counted exactly once, in order, and the changelog
//! holds the counts the outputs show (so no record was skipped, no state fell behind, no task
//! stayed paused).

mod common;

use std::collections::BTreeMap;
use std::time::Duration;

use common::counter_env::*;
use common::{create_topic, produce_all, producer, CounterArgs, CounterProcess, TopicReader};

/// Runs the counter with `failpoints` armed over 1,200 inputs fed in chunks (a record that fails
/// its cycle once sits in the middle when `poison` is set, to cause an abort), checks the
/// exactly-once results, and returns the instance's log.
async fn counted_exactly_once_with(name: &str, failpoints: &str, poison: bool) -> String {
    let setup = setup(name, &[]).await;
    let mut args = setup.args.clone();
    args.env
        .push(("SAGA_STREAMS_FAILPOINTS".into(), failpoints.into()));
    let mut sent = inputs(&args, 0..1_200, 24);
    if poison {
        // In the middle of a chunk of the feeder, behind records of its own partition fetched
        // with it: the poison's cycle has an open transaction for the abort to take back.
        sent.insert(
            650,
            (
                args.inputs[0].clone(),
                "k0".to_string(),
                "fail-once:x".to_string(),
            ),
        );
    }
    let process = CounterProcess::spawn(&args, name);
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    let feeder = feed_slowly(&args, &sent, Duration::from_millis(150));
    feeder.join().unwrap();
    let outputs = read_outputs(&args, sent.len(), Duration::from_secs(180));
    let log = process.log_text();
    let finals = check_exactly_once(&outputs, &sent);
    assert_eq!(
        finals.values().sum::<u64>(),
        sent.len() as u64,
        "log:\n{log}"
    );
    let committed =
        common::poll_until(Duration::from_secs(30), || changelog_state(&args) == finals);
    assert!(
        committed,
        "changelog state differs from the counted outputs; log:\n{log}"
    );
    assert!(
        log.contains("injected failure") || log.contains("(injected)"),
        "the failpoint never fired; log:\n{log}"
    );
    drop(process);
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn at_least_once_a_failing_offset_commit_skips_nothing_and_keeps_state_in_step() {
    let setup = setup("fp-alos", &["--guarantee", "at-least-once"]).await;
    let mut args = setup.args.clone();
    args.env.push((
        "SAGA_STREAMS_FAILPOINTS".into(),
        "commit-offsets=5*off->3*return(timeout)".into(),
    ));
    let sent = inputs(&args, 0..1_200, 24);
    let process = CounterProcess::spawn(&args, "fp-alos");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    feed_slowly(&args, &sent, Duration::from_millis(150))
        .join()
        .unwrap();
    let reader = common::TopicReader::new(&args.bootstrap, &[&args.output], "read_committed");
    let mut outputs = Vec::new();
    let wanted: std::collections::BTreeSet<&str> =
        sent.iter().map(|(_, _, v)| v.as_str()).collect();
    let all_seen = common::poll_until(Duration::from_secs(180), || {
        reader.drain(&mut outputs, Duration::from_millis(500));
        let seen: std::collections::BTreeSet<&str> = outputs
            .iter()
            .filter_map(|(_, _, _, v)| v.rsplit_once(':').map(|(input, _)| input))
            .collect();
        wanted.is_subset(&seen)
    });
    let log = process.log_text();
    assert!(all_seen, "not every input was counted; log:\n{log}");
    reader.drain(&mut outputs, Duration::from_secs(2));
    let finals = check_at_least_once(&outputs, &sent);
    let committed =
        common::poll_until(Duration::from_secs(30), || changelog_state(&args) == finals);
    assert!(
        committed,
        "changelog state differs from the counted outputs; log:\n{log}"
    );
    assert!(
        log.contains("injected failure"),
        "the failpoint never fired; log:\n{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn send_offsets_failing_aborts_and_retries_the_cycle() {
    let log =
        counted_exactly_once_with("fp-send-offsets", "send-offsets=5*off->2*return", false).await;
    assert!(log.contains("aborting the commit cycle"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn send_offsets_failing_for_a_minute_rebuilds_the_clients() {
    // Every failure aborts and retries the cycle with a growing pause; past 60 s of failures in a
    // row the producer counts as stuck (a coordinator request left in its out-queue).
    let log = counted_exactly_once_with(
        "fp-send-offsets-stuck",
        "send-offsets=5*off->45*return(timeout)",
        false,
    )
    .await;
    assert!(log.contains("failing for"), "{log}");
    assert!(log.contains("rebuilding producer and consumer"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_times_out_is_called_again_not_aborted() {
    let log = counted_exactly_once_with(
        "fp-commit-timeout",
        "commit-transaction=5*off->2*return(timeout)",
        false,
    )
    .await;
    assert!(log.contains("commit not confirmed yet"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_that_requires_an_abort_is_aborted_and_rewound() {
    let log = counted_exactly_once_with(
        "fp-commit-abort",
        "commit-transaction=5*off->1*return(abortable)",
        false,
    )
    .await;
    assert!(log.contains("inputs rewound to the last commit"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_commit_of_unknown_outcome_rebuilds_and_restores() {
    let log = counted_exactly_once_with(
        "fp-commit-unknown",
        "commit-transaction=5*off->1*return(unknown)",
        false,
    )
    .await;
    assert!(log.contains("commit outcome unknown"), "{log}");
    assert!(log.contains("rebuilding producer and consumer"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_abort_that_fails_is_retried_before_anything_is_processed() {
    let log =
        counted_exactly_once_with("fp-abort", "abort-transaction=2*return(timeout)", true).await;
    assert!(
        log.contains("cleaning up the aborted cycle failed"),
        "{log}"
    );
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewind_that_fails_is_retried() {
    // The first three seeks are the task starts; the two after them belong to the rewind.
    let log = counted_exactly_once_with("fp-seek", "seek=3*off->2*return", true).await;
    assert!(log.contains("inputs rewound to the last commit"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_rewind_that_keeps_failing_rebuilds_the_clients() {
    let log = counted_exactly_once_with("fp-seek-rebuild", "seek=3*off->3*return", true).await;
    assert!(log.contains("rewind failed"), "{log}");
    assert!(log.contains("rebuilding producer and consumer"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_committed_offsets_lookup_that_fails_delays_the_task_start() {
    counted_exactly_once_with("fp-committed", "committed-offsets=2*return", false).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn task_starts_failing_eight_times_rebuild_the_clients() {
    let log =
        counted_exactly_once_with("fp-start-stuck", "committed-offsets=8*return", false).await;
    assert!(
        log.contains("could not be started 8 times in a row"),
        "{log}"
    );
    assert!(log.contains("rebuilding producer and consumer"), "{log}");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_state_write_failing_after_commit_closes_and_restores_the_task() {
    // A fresh start writes one empty checkpoint per store and task (2 x 3) while restoring; the
    // eleventh write is one after a commit.
    let log =
        counted_exactly_once_with("fp-rocksdb", "rocksdb-write=10*off->1*return", false).await;
    assert!(log.contains("state write after commit failed"), "{log}");
}

/// Counts 600 records, then restores the whole changelog into an empty state directory with
/// `failpoints` armed, and counts on: every count must go on from the restored one.
async fn restored_after_a_failure(name: &str, failpoints: &str) -> String {
    let setup = setup(name, &[]).await;
    let mut args = setup.args.clone();
    let sent = inputs(&args, 0..600, 600);
    let mut first = CounterProcess::spawn(&args, "first");
    produce_all(&producer(&args.bootstrap), &sent);
    let outputs = read_outputs(&args, sent.len(), Duration::from_secs(120));
    check_exactly_once(&outputs, &sent);
    first.sigkill();
    // Without local state the whole changelog is restored.
    std::fs::remove_dir_all(args.state_dir.join(&args.application_id)).unwrap();
    args.env
        .push(("SAGA_STREAMS_FAILPOINTS".into(), failpoints.into()));
    let second = CounterProcess::spawn(&args, "second");
    wait_running(&second, PARTITIONS as usize, Duration::from_secs(120));
    let more = inputs(&args, 600..900, 600);
    produce_all(&producer(&args.bootstrap), &more);
    let all: Vec<_> = sent.iter().chain(&more).cloned().collect();
    let outputs = read_outputs(&args, all.len(), Duration::from_secs(120));
    let finals = check_exactly_once(&outputs, &all);
    assert_eq!(finals.values().sum::<u64>(), all.len() as u64);
    let log = second.log_text();
    assert!(log.contains("(injected)"), "{log}");
    log
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_write_that_fails_is_retried_from_the_checkpoint() {
    restored_after_a_failure("fp-restore", "restore-batch=1*return").await;
}

#[tokio::test(flavor = "multi_thread")]
async fn a_restore_whose_final_flush_fails_is_restored_again() {
    // The restored batches skipped the WAL; the flush that makes them durable fails once: the
    // tasks are not started on that restoration, but on the next one.
    let log = restored_after_a_failure("fp-restore-flush", "rocksdb-flush=1*return").await;
    let refused = log
        .lines()
        .any(|l| l.contains("tasks could not be started") && l.contains("injected"));
    assert!(
        refused,
        "the failed flush did not stop the start; log:\n{log}"
    );
}

/// `kill -SIG<signal> pid`.
fn signal(process: &CounterProcess, signal: &str) {
    let status = std::process::Command::new("kill")
        .args([&format!("-{signal}"), &process.child.id().to_string()])
        .status()
        .unwrap();
    assert!(status.success());
}

/// Stats records (`task-<partition>@<instance>`) visible to `read_committed` readers.
fn stats_by(args: &CounterArgs, stats: &str, instance: &str) -> usize {
    let reader = TopicReader::new(&args.bootstrap, &[stats], "read_committed");
    let mut records = Vec::new();
    reader.drain(&mut records, Duration::from_secs(3));
    records
        .iter()
        .filter(|(_, _, key, _)| key.ends_with(&format!("@{instance}")))
        .count()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_member_frozen_past_its_session_timeout_commits_nothing_when_it_thaws() {
    let stats = common::unique("zombie-timers-stats");
    create_topic(&common::kafka_bootstrap(), &stats, PARTITIONS).await;
    // Timers fire every 15 s: the frozen member's next one comes due while it is frozen.
    let setup = setup(
        "zombie-timers",
        &["--punctuate-ms", "15000", "--stats", &stats],
    )
    .await;
    let (a, b) = (instance(&setup.args, "a"), instance(&setup.args, "b"));
    let first = CounterProcess::spawn(&a, "a");
    wait_running(&first, PARTITIONS as usize, Duration::from_secs(120));
    // New keys, processed and committed: the key count the timer reports has changed.
    let sent = inputs(&a, 0..300, 30);
    produce_all(&producer(&a.bootstrap), &sent);
    let outputs = read_outputs(&a, sent.len(), Duration::from_secs(60));
    check_exactly_once(&outputs, &sent);
    signal(&first, "STOP");
    let before = stats_by(&a, &stats, "a");

    // Another member takes the tasks over once the frozen one's session expires, and its own
    // timers report.
    let second = CounterProcess::spawn(&b, "b");
    wait_running(&second, PARTITIONS as usize, Duration::from_secs(180));
    let reported = common::poll_until(Duration::from_secs(90), || {
        stats_by(&b, &stats, "b") >= PARTITIONS as usize
    });
    assert!(reported, "the new owner never fired its timers");

    signal(&first, "CONT");
    // The zombie runs again: its due timers fire before it learns it was fenced. Whatever it
    // writes must never become visible.
    let noticed = common::poll_until(Duration::from_secs(60), || {
        first.log_lines().iter().any(|l| {
            l["message"] == "partitions revoked"
                || l["message"]
                    == "stream thread failed; rebuilding producer and consumer and rejoining"
                || l["message"] == "aborting the commit cycle and rewinding inputs"
        })
    });
    assert!(
        noticed,
        "the thawed member never noticed; log:\n{}",
        first.log_text()
    );
    std::thread::sleep(Duration::from_secs(1));
    assert_eq!(
        stats_by(&a, &stats, "a"),
        before,
        "the fenced member's timer output became visible; log:\n{}",
        first.log_text()
    );
    drop((first, second));
}

/// Writes a counts changelog in which each of `keys` keys (`key-<n>`) was counted once, starts an
/// instance without local state and returns it once it logs that it is restoring (a long restore).
async fn restoring_a_long_changelog(args: &CounterArgs, keys: usize, name: &str) -> CounterProcess {
    use rdkafka::admin::{AdminOptions, NewTopic, TopicReplication};
    let changelog = format!("{}-counts-changelog", args.application_id);
    common::admin(&args.bootstrap)
        .create_topics(
            &[
                NewTopic::new(&changelog, PARTITIONS, TopicReplication::Fixed(1))
                    .set("cleanup.policy", "compact"),
            ],
            &AdminOptions::new(),
        )
        .await
        .unwrap();
    let records: Vec<(String, String, String)> = (0..keys)
        .map(|i| (changelog.clone(), format!("key-{i}"), "1".to_string()))
        .collect();
    produce_all(&producer(&args.bootstrap), &records);
    let process = CounterProcess::spawn(args, name);
    let restoring = common::poll_until(Duration::from_secs(120), || {
        process
            .log_lines()
            .iter()
            .any(|l| l["message"] == "restoring")
    });
    assert!(
        restoring,
        "no long restore happened; log:\n{}",
        process.log_text()
    );
    process
}

#[tokio::test(flavor = "multi_thread")]
async fn sigterm_during_a_long_restore_exits_cleanly_within_seconds() {
    let setup = setup("restore-sigterm", &[]).await;
    let args = setup.args.clone();
    let mut process = restoring_a_long_changelog(&args, 600_000, "restoring").await;
    let status = process.sigterm(Duration::from_secs(10)).unwrap_or_else(|| {
        panic!(
            "still running 10 s after SIGTERM; log:\n{}",
            process.log_text()
        )
    });
    assert!(
        status.success(),
        "exit {status}; log:\n{}",
        process.log_text()
    );
    assert!(
        !process
            .log_lines()
            .iter()
            .any(|l| l["message"] == "task running"),
        "the restore finished before SIGTERM: the test proves nothing"
    );
}

/// Produces one input per key and returns the count each was given (`<value>:<count>`).
fn probe_counts(
    args: &CounterArgs,
    keys: &[String],
    tag: &str,
    seen: usize,
) -> BTreeMap<String, u64> {
    let probes: Vec<(String, String, String)> = keys
        .iter()
        .map(|k| (args.inputs[0].clone(), k.clone(), format!("{tag}-{k}")))
        .collect();
    produce_all(&producer(&args.bootstrap), &probes);
    let outputs = read_outputs(args, seen + probes.len(), Duration::from_secs(120));
    outputs
        .iter()
        .filter_map(|(_, _, key, value)| {
            let (input, count) = value.rsplit_once(':')?;
            let count: u64 = count.parse().ok()?;
            (input == format!("{tag}-{key}")).then(|| (key.clone(), count))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn restores_written_without_the_wal_survive_sigkill_during_and_after_them() {
    let setup = setup("restore-sigkill", &[]).await;
    let args = setup.args.clone();
    let total = 600_000;
    // Killed while restoring: what reached disk must be data and checkpoints of the same batches.
    let mut first = restoring_a_long_changelog(&args, total, "killed-restoring").await;
    first.sigkill();
    assert!(
        !first
            .log_lines()
            .iter()
            .any(|l| l["message"] == "task running"),
        "the restore finished before SIGKILL: the test proves nothing"
    );

    // Restored to the end, then counting through the WAL, then killed: the restored data must
    // have been made durable before the logged writes that follow it.
    let mut second = CounterProcess::spawn(&args, "killed-after-restore");
    wait_running(&second, PARTITIONS as usize, Duration::from_secs(300));
    let touched: Vec<String> = (0..total)
        .step_by(1000)
        .map(|i| format!("key-{i}"))
        .collect();
    let counts = probe_counts(&args, &touched, "a", 0);
    assert_eq!(counts.len(), touched.len(), "{}", second.log_text());
    assert!(
        counts.values().all(|c| *c == 2),
        "counts after the restore: {counts:?}"
    );
    second.sigkill();

    let third = CounterProcess::spawn(&args, "after-the-kills");
    wait_running(&third, PARTITIONS as usize, Duration::from_secs(300));
    let untouched: Vec<String> = (500..total)
        .step_by(1000)
        .map(|i| format!("key-{i}"))
        .collect();
    let all: Vec<String> = touched.iter().chain(&untouched).cloned().collect();
    let counts = probe_counts(&args, &all, "b", touched.len());
    assert_eq!(counts.len(), all.len(), "{}", third.log_text());
    for key in &touched {
        assert_eq!(counts[key], 3, "{key}; log:\n{}", third.log_text());
    }
    for key in &untouched {
        assert_eq!(counts[key], 2, "{key}; log:\n{}", third.log_text());
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_ahead_of_a_recreated_changelog_is_wiped_not_kept() {
    let setup = setup("recreated-changelog", &[]).await;
    let args = setup.args.clone();
    let first = inputs(&args, 0..300, 6);
    let mut process = CounterProcess::spawn(&args, "recreated-1");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    produce_all(&producer(&args.bootstrap), &first);
    check_exactly_once(
        &read_outputs(&args, first.len(), Duration::from_secs(120)),
        &first,
    );
    assert!(process.sigterm(Duration::from_secs(30)).is_some());
    drop(process);

    // The changelogs are deleted; the next start creates them again, empty, so every local
    // checkpoint lies beyond their end.
    let changelogs: Vec<String> = ["counts", "meta"]
        .iter()
        .map(|store| format!("{}-{store}-changelog", args.application_id))
        .collect();
    let admin = common::admin(&args.bootstrap);
    let names: Vec<&str> = changelogs.iter().map(String::as_str).collect();
    for result in admin
        .delete_topics(&names, &rdkafka::admin::AdminOptions::new())
        .await
        .unwrap()
    {
        result.unwrap();
    }
    let gone = common::poll_until(Duration::from_secs(60), || {
        common::topic_names(&args.bootstrap)
            .is_some_and(|topics| changelogs.iter().all(|c| !topics.contains(c)))
    });
    assert!(gone, "the changelogs were not deleted");

    let process = CounterProcess::spawn(&args, "recreated-2");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    let after: Vec<(String, String, String)> = (0..6)
        .map(|k| {
            (
                args.inputs[0].clone(),
                format!("k{k}"),
                format!("after-{k}"),
            )
        })
        .collect();
    produce_all(&producer(&args.bootstrap), &after);
    let outputs = read_outputs(&args, first.len() + after.len(), Duration::from_secs(120));
    let log = process.log_text();
    assert!(log.contains("checkpoint outside the changelog"), "{log}");
    // Counted from the recreated (empty) changelog's state, not from the stale local store.
    for (_, key, value) in &after {
        let counted: Vec<&String> = outputs
            .iter()
            .filter(|(_, _, k, v)| k == key && v.starts_with(&format!("{value}:")))
            .map(|(_, _, _, v)| v)
            .collect();
        assert_eq!(counted, vec![&format!("{value}:1")], "{log}");
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_store_behind_the_start_of_its_changelog_is_wiped_not_replayed_onto() {
    let setup = setup("truncated-changelog", &[]).await;
    let args = setup.args.clone();
    let keys = 6;
    // The first instance counts, stops, and keeps its store (checkpoints at its end).
    let first = inputs(&args, 0..300, keys);
    let mut process = CounterProcess::spawn(&args, "truncated-1");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    produce_all(&producer(&args.bootstrap), &first);
    read_outputs(&args, first.len(), Duration::from_secs(120));
    assert!(process.sigterm(Duration::from_secs(30)).is_some());
    drop(process);
    // Another instance goes on, then stops; then retention deletes the changelogs' records up
    // to their ends: the first instance's checkpoints now lie before the changelogs' start.
    let other = instance(&args, "i2");
    let second = inputs(&args, 300..600, keys);
    let mut process = CounterProcess::spawn(&other, "truncated-2");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    produce_all(&producer(&args.bootstrap), &second);
    read_outputs(&args, first.len() + second.len(), Duration::from_secs(120));
    assert!(process.sigterm(Duration::from_secs(30)).is_some());
    drop(process);
    // Changelogs set to `compact,delete` (as an operator may, to bound them) can lose records
    // to retention.
    let admin = common::admin(&args.bootstrap);
    let mut ends = rdkafka::TopicPartitionList::new();
    for store in ["counts", "meta"] {
        let topic = format!("{}-{store}-changelog", args.application_id);
        let policy =
            rdkafka::admin::AlterConfig::new(rdkafka::admin::ResourceSpecifier::Topic(&topic))
                .set("cleanup.policy", "compact,delete");
        for result in admin
            .alter_configs(&[policy], &rdkafka::admin::AdminOptions::new())
            .await
            .unwrap()
        {
            result.unwrap();
        }
        for partition in 0..PARTITIONS {
            ends.add_partition_offset(&topic, partition, rdkafka::Offset::End)
                .unwrap();
        }
    }
    // The broker may take a moment to apply the new policy.
    let deleted = common::poll_until(Duration::from_secs(30), || {
        futures::executor::block_on(
            admin.delete_records(&ends, &rdkafka::admin::AdminOptions::new()),
        )
        .is_ok_and(|done| done.elements().iter().all(|e| e.error().is_ok()))
    });
    assert!(deleted, "the changelogs' records could not be deleted");

    let process = CounterProcess::spawn(&args, "truncated-3");
    wait_running(&process, PARTITIONS as usize, Duration::from_secs(120));
    let after: Vec<(String, String, String)> = (0..keys)
        .map(|k| {
            (
                args.inputs[0].clone(),
                format!("k{k}"),
                format!("after-{k}"),
            )
        })
        .collect();
    produce_all(&producer(&args.bootstrap), &after);
    let outputs = read_outputs(
        &args,
        first.len() + second.len() + after.len(),
        Duration::from_secs(120),
    );
    let log = process.log_text();
    assert!(log.contains("checkpoint outside the changelog"), "{log}");
    // Counted from the changelog's (now empty) state, not from the first instance's stale store.
    for (_, key, value) in &after {
        let counted: Vec<&String> = outputs
            .iter()
            .filter(|(_, _, k, v)| k == key && v.starts_with(&format!("{value}:")))
            .map(|(_, _, _, v)| v)
            .collect();
        assert_eq!(counted, vec![&format!("{value}:1")], "{log}");
    }
}
