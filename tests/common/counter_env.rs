//! The `counter` example as a test subject: topics, inputs, a slow feeder, and the exactly-once
//! checks of its outputs and changelog (shared by the runtime and fault tests).

use std::collections::{BTreeMap, BTreeSet};
use std::time::{Duration, Instant};

use super::{
    create_topic, kafka_bootstrap, produce_all, producer, unique, CounterArgs, CounterProcess,
    TopicReader,
};

pub const PARTITIONS: i32 = 3;

pub struct Setup {
    pub args: CounterArgs,
    pub _dir: tempfile::TempDir,
}

pub async fn setup(name: &str, extra: &[&str]) -> Setup {
    let bootstrap = kafka_bootstrap();
    let dir = tempfile::tempdir().unwrap();
    let inputs = vec![
        unique(&format!("{name}-in-a")),
        unique(&format!("{name}-in-b")),
    ];
    let output = unique(&format!("{name}-out"));
    for topic in inputs.iter().chain([&output]) {
        create_topic(&bootstrap, topic, PARTITIONS).await;
    }
    Setup {
        args: CounterArgs {
            bootstrap,
            application_id: unique(name),
            instance_id: "i1".to_string(),
            state_dir: dir.path().join("state"),
            inputs,
            output,
            extra: extra.iter().map(|s| s.to_string()).collect(),
            env: Vec::new(),
        },
        _dir: dir,
    }
}

/// Inputs: `n` records spread over both input topics and `keys` keys; values are unique.
pub fn inputs(
    args: &CounterArgs,
    range: std::ops::Range<usize>,
    keys: usize,
) -> Vec<(String, String, String)> {
    range
        .map(|i| {
            let topic = args.inputs[i % 2].clone();
            (topic, format!("k{}", i % keys), format!("v{i}"))
        })
        .collect()
}

/// Produces `sent` in chunks of 100 with a pause between them, on a thread of its own, so that
/// input keeps flowing while the test kills, starts and stops instances.
pub fn feed_slowly(
    args: &CounterArgs,
    sent: &[(String, String, String)],
    pause: Duration,
) -> std::thread::JoinHandle<()> {
    let sent = sent.to_vec();
    let bootstrap = args.bootstrap.clone();
    std::thread::spawn(move || {
        let producer = producer(&bootstrap);
        for chunk in sent.chunks(100) {
            produce_all(&producer, chunk);
            std::thread::sleep(pause);
        }
    })
}

/// Reads the output read_committed until `expected` records arrived (or the deadline), then a
/// little more to catch duplicates.
pub fn read_outputs(
    args: &CounterArgs,
    expected: usize,
    limit: Duration,
) -> Vec<(String, i32, String, String)> {
    let reader = TopicReader::new(&args.bootstrap, &[&args.output], "read_committed");
    let mut records = Vec::new();
    let deadline = Instant::now() + limit;
    while records.len() < expected && Instant::now() < deadline {
        reader.drain(&mut records, Duration::from_millis(500));
    }
    reader.drain(&mut records, Duration::from_secs(2));
    records
}

/// Checks that each input value was counted exactly once and that, per key, the counts are
/// exactly 1..=n in partition order. Returns the count per key.
pub fn check_exactly_once(
    outputs: &[(String, i32, String, String)],
    sent: &[(String, String, String)],
) -> BTreeMap<String, u64> {
    check_counted(outputs, sent, false)
}

/// At-least-once: each input value counted at least once (repeats allowed), and per key the
/// counts are still 1..=n in partition order (a repeat is counted on top of the state, never
/// on a store that fell behind). Returns the count per key.
pub fn check_at_least_once(
    outputs: &[(String, i32, String, String)],
    sent: &[(String, String, String)],
) -> BTreeMap<String, u64> {
    check_counted(outputs, sent, true)
}

fn check_counted(
    outputs: &[(String, i32, String, String)],
    sent: &[(String, String, String)],
    repeats_allowed: bool,
) -> BTreeMap<String, u64> {
    let mut seen_values = BTreeMap::new();
    let mut counts_per_key: BTreeMap<String, Vec<u64>> = BTreeMap::new();
    for (_, _, key, value) in outputs {
        let (input_value, count) = value.rsplit_once(':').expect("value:count");
        *seen_values.entry(input_value.to_string()).or_insert(0) += 1;
        counts_per_key
            .entry(key.clone())
            .or_default()
            .push(count.parse().expect("count"));
    }
    let duplicates: Vec<_> = seen_values.iter().filter(|(_, n)| **n > 1).collect();
    assert!(
        repeats_allowed || duplicates.is_empty(),
        "inputs counted more than once: {duplicates:?}"
    );
    let expected: BTreeSet<String> = sent.iter().map(|(_, _, v)| v.clone()).collect();
    let got: BTreeSet<String> = seen_values.keys().cloned().collect();
    let missing: Vec<_> = expected.difference(&got).take(10).collect();
    assert!(
        missing.is_empty(),
        "inputs never counted (first 10): {missing:?}"
    );
    let mut finals = BTreeMap::new();
    for (key, counts) in counts_per_key {
        let expected: Vec<u64> = (1..=counts.len() as u64).collect();
        assert_eq!(counts, expected, "counts of {key} are not 1..=n in order");
        finals.insert(key, *expected.last().unwrap());
    }
    finals
}

/// The last committed value per key of the counts changelog: the state Kafka holds.
pub fn changelog_state(args: &CounterArgs) -> BTreeMap<String, u64> {
    let topic = format!("{}-counts-changelog", args.application_id);
    let reader = TopicReader::new(&args.bootstrap, &[&topic], "read_committed");
    let mut records = Vec::new();
    reader.drain(&mut records, Duration::from_secs(3));
    records
        .into_iter()
        .map(|(_, _, k, v)| (k, v.parse().unwrap()))
        .collect()
}

pub fn restored_records(process: &CounterProcess, store: &str) -> Vec<(Option<i64>, u64)> {
    process
        .log_lines()
        .iter()
        .filter(|l| l["message"] == "restore finished" && l["store"] == store)
        .map(|l| {
            let from = l["from_checkpoint"].as_str().and_then(|s| {
                s.strip_prefix("Some(")
                    .and_then(|s| s.strip_suffix(')'))
                    .and_then(|s| s.parse().ok())
            });
            (from, l["records"].as_u64().unwrap_or(0))
        })
        .collect()
}

pub fn wait_running(process: &CounterProcess, tasks: usize, limit: Duration) {
    let ok = super::poll_until(limit, || {
        process
            .log_lines()
            .iter()
            .filter(|l| l["message"] == "task running")
            .count()
            >= tasks
    });
    assert!(
        ok,
        "instance did not start {tasks} tasks; log:\n{}",
        process.log_text()
    );
}

pub fn instance(args: &CounterArgs, instance_id: &str) -> CounterArgs {
    let mut other = args.clone();
    other.instance_id = instance_id.to_string();
    other.state_dir = args
        .state_dir
        .with_file_name(format!("state-{instance_id}"));
    other
}
