//! Benchmark of the streams runtime on the real broker: the keyed counter (stateful: RocksDB +
//! changelog) against a stateless pass-through, both exactly-once, side by side in one run.
//! Run through `scripts/bench-runtime`, which builds the release binaries and starts the stack.
//!
//! For each engine and repetition, on fresh topics:
//! - throughput: `--records` inputs produced beforehand; records/s from the first committed
//!   output to the last (group join excluded), CPU seconds and peak RSS of the engine process
//!   (from /proc), and the engine's own commit latency summary;
//! - latency: inputs at a fixed `--rate` for `--seconds`; end-to-end latency = when the committed
//!   output is read minus when the input was produced (carried in the value).
//!
//! Results: medians over `--repeat` runs, printed as a Markdown table with the ratios.
//!
//! With `--backlog N` it measures memory under a backlog instead: N inputs on one partition (one
//! task) produced before the engine starts, then a quarter of that, for both engines; peak RSS of
//! the engine process while it catches up. A bounded engine's peak does not grow with the backlog.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use clap::Parser;

#[path = "common/proc_usage.rs"]
mod proc_usage;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Inputs per throughput run.
    #[arg(long, default_value_t = 200_000)]
    records: usize,
    /// Distinct keys (the counter's store size).
    #[arg(long, default_value_t = 50_000)]
    keys: usize,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Repetitions per engine; the table shows medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Input rate of the latency runs, records per second.
    #[arg(long, default_value_t = 2_000)]
    rate: u64,
    /// Length of each latency run.
    #[arg(long, default_value_t = 10)]
    seconds: u64,
    /// Measure catching up a backlog of this many records on one task instead (and of a quarter
    /// of it, to show the peak does not grow with the backlog).
    #[arg(long)]
    backlog: Option<usize>,
    /// Size of each input value in the backlog runs, bytes.
    #[arg(long, default_value_t = 200)]
    value_bytes: usize,
}

#[derive(Debug, Default, Clone)]
struct Figures {
    records_per_s: f64,
    cpu_s: f64,
    peak_rss_mib: f64,
    commit_p50_ms: f64,
    commit_p99_ms: f64,
    latency_p50_ms: f64,
    latency_p99_ms: f64,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn unique(prefix: &str) -> String {
    format!("{prefix}-{}-{}", std::process::id(), now_ms())
}

fn create_topics(bootstrap: &str, names: &[&str], partitions: i32) {
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin client");
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(1)))
        .collect();
    let results = futures::executor::block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .expect("create topics");
    for r in results {
        r.expect("topic created");
    }
}

fn producer(bootstrap: &str) -> BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .set("queue.buffering.max.messages", "1000000")
        .create()
        .expect("producer")
}

fn send(producer: &BaseProducer, topic: &str, key: &str, value: &str) {
    let mut record = BaseRecord::to(topic).key(key).payload(value);
    loop {
        match producer.send(record) {
            Ok(()) => break,
            Err((_, returned)) => {
                record = returned;
                producer.poll(Duration::from_millis(5));
            }
        }
    }
    producer.poll(Duration::ZERO);
}

fn reader(bootstrap: &str, topic: &str) -> BaseConsumer {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("group.id", unique("bench-reader"))
        .set("enable.auto.commit", "false")
        .set("auto.offset.reset", "earliest")
        .set("isolation.level", "read_committed")
        .create()
        .expect("reader");
    consumer.subscribe(&[topic]).expect("subscribe");
    consumer
}

struct Engine {
    child: Child,
    log: PathBuf,
}

impl Engine {
    fn spawn(
        bootstrap: &str,
        mode: &str,
        input: &str,
        output: &str,
        dir: &Path,
        extra: &[&str],
    ) -> Self {
        let binary = std::env::current_exe()
            .expect("own path")
            .with_file_name("counter");
        let log = dir.join(format!("{mode}.log"));
        let child = Command::new(binary)
            .args([
                "--bootstrap",
                bootstrap,
                "--mode",
                mode,
                "--input",
                input,
                "--output",
                output,
            ])
            .args([
                "--application-id",
                &unique(&format!("bench-{mode}")),
                "--instance-id",
                "b1",
            ])
            .arg("--state-dir")
            .arg(dir.join("state"))
            .args(extra)
            .env("SAGA_STREAMS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,rdkafka=warn,librdkafka=warn")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("spawning the counter example (build it with --release)");
        Self { child, log }
    }

    /// (CPU seconds, peak RSS in MiB) of the running process.
    fn usage(&self) -> (f64, f64) {
        proc_usage::usage(self.child.id())
    }

    /// SIGTERM, wait, and return the commit summary the engine logged (p50, p99 in ms).
    fn stop(mut self) -> (f64, f64) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let _ = self.child.wait();
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        text.lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .find(|l| l["message"] == "commit summary")
            .map_or((f64::NAN, f64::NAN), |l| {
                (
                    l["p50_ms"].as_f64().unwrap_or(f64::NAN),
                    l["p99_ms"].as_f64().unwrap_or(f64::NAN),
                )
            })
    }
}

/// Reads committed outputs until `expected` arrived; returns (first, last) arrival and latencies.
fn read_until(
    consumer: &BaseConsumer,
    engine: &mut Engine,
    expected: usize,
    limit: Duration,
) -> (Instant, Instant, Vec<i64>) {
    let deadline = Instant::now() + limit;
    let mut seen = 0;
    let mut first = None;
    let mut last = Instant::now();
    let mut latencies = Vec::with_capacity(expected);
    let mut reported = Instant::now();
    while seen < expected {
        assert!(
            Instant::now() < deadline,
            "only {seen} of {expected} outputs within {limit:?}"
        );
        if let Ok(Some(status)) = engine.child.try_wait() {
            panic!(
                "the engine exited ({status}) after {seen} of {expected} outputs; log: {}",
                engine.log.display()
            );
        }
        if let Some(message) = consumer.poll(Duration::from_millis(100)) {
            let message = message.expect("reading outputs");
            let arrived = Instant::now();
            first.get_or_insert(arrived);
            last = arrived;
            seen += 1;
            // Values are "t<produced ms>" (pass-through) or "t<produced ms>:<count>" (counter).
            if let Some(produced) = message
                .payload()
                .and_then(|p| std::str::from_utf8(p).ok())
                .and_then(|v| v.strip_prefix('t'))
                .and_then(|v| v.split(':').next())
                .and_then(|v| v.parse::<i64>().ok())
            {
                latencies.push(now_ms() - produced);
            }
        }
        if reported.elapsed() > Duration::from_secs(5) {
            eprintln!("  {seen}/{expected} outputs");
            reported = Instant::now();
        }
    }
    (first.unwrap_or(last), last, latencies)
}

fn percentile(sorted: &[i64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .map_or(f64::NAN, |v| *v as f64)
}

fn throughput_run(args: &Args, mode: &str) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = (unique("bench-in"), unique("bench-out"));
    create_topics(&args.bootstrap, &[&input, &output], args.partitions);
    let p = producer(&args.bootstrap);
    for i in 0..args.records {
        send(
            &p,
            &input,
            &format!("k{}", i % args.keys),
            &format!("t{}", now_ms()),
        );
    }
    p.flush(Duration::from_secs(60)).expect("flush inputs");
    let consumer = reader(&args.bootstrap, &output);
    let mut engine = Engine::spawn(&args.bootstrap, mode, &input, &output, dir.path(), &[]);
    let (first, last, _) = read_until(
        &consumer,
        &mut engine,
        args.records,
        Duration::from_secs(600),
    );
    let (cpu_s, peak_rss_mib) = engine.usage();
    let (commit_p50_ms, commit_p99_ms) = engine.stop();
    Figures {
        records_per_s: args.records as f64 / last.duration_since(first).as_secs_f64().max(1e-3),
        cpu_s,
        peak_rss_mib,
        commit_p50_ms,
        commit_p99_ms,
        ..Default::default()
    }
}

fn latency_run(args: &Args, mode: &str) -> (f64, f64) {
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = (unique("bench-lat-in"), unique("bench-lat-out"));
    create_topics(&args.bootstrap, &[&input, &output], args.partitions);
    let consumer = reader(&args.bootstrap, &output);
    let mut engine = Engine::spawn(&args.bootstrap, mode, &input, &output, dir.path(), &[]);
    // Warm up until the engine answers, so the group join is not measured as latency.
    let p = producer(&args.bootstrap);
    send(&p, &input, "warm-up", &format!("t{}", now_ms()));
    p.flush(Duration::from_secs(10)).expect("flush");
    read_until(&consumer, &mut engine, 1, Duration::from_secs(120));
    let total = (args.rate * args.seconds) as usize;
    let bookkeeper = std::thread::spawn({
        let bootstrap = args.bootstrap.clone();
        let (rate, keys) = (args.rate, args.keys);
        move || {
            let p = producer(&bootstrap);
            let started = Instant::now();
            for i in 0..total {
                let due = started + Duration::from_secs_f64(i as f64 / rate as f64);
                if let Some(wait) = due.checked_duration_since(Instant::now()) {
                    std::thread::sleep(wait);
                }
                send(
                    &p,
                    &input,
                    &format!("k{}", i % keys),
                    &format!("t{}", now_ms()),
                );
            }
            p.flush(Duration::from_secs(30)).expect("flush");
        }
    });
    let (_, _, mut latencies) = read_until(
        &consumer,
        &mut engine,
        total,
        Duration::from_secs(args.seconds + 120),
    );
    bookkeeper.join().expect("input thread");
    engine.stop();
    latencies.sort_unstable();
    (percentile(&latencies, 0.5), percentile(&latencies, 0.99))
}

/// Reads one figure of a run.
type Metric = fn(&Figures) -> f64;

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// Catches up `records` inputs produced beforehand on one partition: (records/s, CPU s, peak RSS
/// MiB). The counter's store scan (a test subject's punctuation) is turned off, so what is
/// measured is the runtime's buffering.
fn backlog_run(args: &Args, mode: &str, records: usize) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let (input, output) = (unique("bench-backlog-in"), unique("bench-backlog-out"));
    create_topics(&args.bootstrap, &[&input, &output], 1);
    let p = producer(&args.bootstrap);
    let padding = "x".repeat(args.value_bytes.saturating_sub(16));
    for i in 0..records {
        send(
            &p,
            &input,
            &format!("k{}", i % args.keys),
            &format!("t{}:{padding}", now_ms()),
        );
    }
    p.flush(Duration::from_secs(120)).expect("flush inputs");
    let consumer = reader(&args.bootstrap, &output);
    let mut engine = Engine::spawn(
        &args.bootstrap,
        mode,
        &input,
        &output,
        dir.path(),
        &["--punctuate-ms", "86400000"],
    );
    let (first, last, _) = read_until(&consumer, &mut engine, records, Duration::from_secs(1800));
    let (cpu_s, peak_rss_mib) = engine.usage();
    engine.stop();
    Figures {
        records_per_s: records as f64 / last.duration_since(first).as_secs_f64().max(1e-3),
        cpu_s,
        peak_rss_mib,
        ..Default::default()
    }
}

fn backlog_main(args: &Args, backlog: usize) {
    let sizes = [backlog / 4, backlog];
    let modes = ["passthrough", "count"];
    let mut rows = Vec::new();
    for records in sizes {
        for mode in modes {
            eprintln!("backlog of {records} records: {mode}");
            let figures = backlog_run(args, mode, records);
            eprintln!("  {figures:?}");
            rows.push((records, mode, figures));
        }
    }
    println!(
        "| backlog on one task, {} keys, {}-byte values | records/s | CPU s | peak RSS (MiB) |",
        args.keys, args.value_bytes
    );
    println!("|---|---|---|---|");
    for (records, mode, f) in rows {
        println!(
            "| {records} records, {mode} | {:.0} | {:.1} | {:.1} |",
            f.records_per_s, f.cpu_s, f.peak_rss_mib
        );
    }
}

fn main() {
    let args = Args::parse();
    if let Some(backlog) = args.backlog {
        backlog_main(&args, backlog);
        return;
    }
    let modes = ["passthrough", "count"];
    let mut runs: BTreeMap<&str, Vec<Figures>> = BTreeMap::new();
    for repetition in 1..=args.repeat {
        // Interleaved, so drift on a noisy machine hits both engines alike.
        for mode in modes {
            eprintln!(
                "run {repetition}/{}: {mode}, throughput ({} records)",
                args.repeat, args.records
            );
            let mut figures = throughput_run(&args, mode);
            eprintln!(
                "run {repetition}/{}: {mode}, latency ({}/s for {} s)",
                args.repeat, args.rate, args.seconds
            );
            (figures.latency_p50_ms, figures.latency_p99_ms) = latency_run(&args, mode);
            eprintln!("  {figures:?}");
            runs.entry(mode).or_default().push(figures);
        }
    }
    let m = |mode: &str, f: Metric| median(runs[mode].iter().map(f));
    let rows: [(&str, Metric); 7] = [
        ("records/s", |f| f.records_per_s),
        ("CPU s per 100k records", |f| f.cpu_s),
        ("peak RSS (MiB)", |f| f.peak_rss_mib),
        ("commit latency p50 (ms)", |f| f.commit_p50_ms),
        ("commit latency p99 (ms)", |f| f.commit_p99_ms),
        ("end-to-end latency p50 (ms)", |f| f.latency_p50_ms),
        ("end-to-end latency p99 (ms)", |f| f.latency_p99_ms),
    ];
    println!(
        "| median of {} runs, {} records, {} keys, {} partitions, latency at {}/s | pass-through (ceiling) | keyed counter (RocksDB + changelog) | counter / pass-through |",
        args.repeat, args.records, args.keys, args.partitions, args.rate
    );
    println!("|---|---|---|---|");
    let per_100k = 100_000.0 / args.records as f64;
    for (name, f) in rows {
        let scale = if name.starts_with("CPU") {
            per_100k
        } else {
            1.0
        };
        let (a, b) = (m("passthrough", f) * scale, m("count", f) * scale);
        println!("| {name} | {a:.1} | {b:.1} | {:.2} |", b / a);
    }
}
