//! saga-streams against the same order saga written with Kafka Streams
//! (`benches/kafka-streams-baseline`), side by side on one broker. Run through `scripts/bench`,
//! which builds both and starts the stack.
//!
//! Every run gets fresh topics with `--partitions` partitions and the same two participants
//! (`saga-streams simulate`, replying at once, fixed failure shares). Modes:
//! - throughput: `--orders` OrderCreated produced beforehand; sagas/s from the first command to the
//!   last outcome (record timestamps: start-up and group join are not counted);
//! - latency: orders at `--rate` for `--seconds` after a warm-up; OrderCreated timestamp to outcome
//!   timestamp, p50/p99/max;
//! - restore: `--restore-sagas` finished sagas written into the engine's changelog in its own
//!   format; time from start with no local state until it is running;
//! - ceiling: an exactly-once pass-through (consume, produce, commit, no state) of the saga's
//!   three inputs per saga through librdkafka; sagas/s = records/s / 3.
//!
//! Each run records CPU seconds and peak RSS of the engine's process (from /proc) and, for
//! throughput and latency, audits every topic `read_committed`: a run with a violation is
//! reported invalid. Results: medians of `--repeat` runs, as Markdown tables with the ratios.

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "common/bench_kit.rs"]
mod bench_kit;

use bench_kit::{
    bar, bulk_produce, create_changelog, free_port, fresh_saga, now_ms, release_dir,
    saga_streams_template, Process,
};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use saga_streams::codec::Codec;
use saga_streams::saga::processor::saga_key;
use saga_streams::saga::query::Partitioner;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::load::{self, LoadSpec};
use saga_streams::sim::{self, TopicScanner};
use serde_json::json;

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Orders per throughput run.
    #[arg(long, default_value_t = 200_000)]
    orders: u64,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Repetitions per engine and mode; tables show medians.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Orders per second in latency runs (below both engines' saturation).
    #[arg(long, default_value_t = 500.0)]
    rate: f64,
    /// Length of each latency run.
    #[arg(long, default_value_t = 30)]
    seconds: u64,
    /// Finished sagas in each restore run's changelog.
    #[arg(long, default_value_t = 1_000_000)]
    restore_sagas: u64,
    /// Modes to run, comma separated: throughput, latency, restore, ceiling.
    #[arg(
        long,
        default_value = "throughput,latency,restore,ceiling",
        value_delimiter = ','
    )]
    modes: Vec<String>,
    /// The Kafka Streams baseline jar.
    #[arg(
        long,
        default_value = "benches/kafka-streams-baseline/target/kafka-streams-baseline.jar"
    )]
    jar: PathBuf,
    #[arg(long, default_value = "topologies/order_saga.yaml")]
    topology: PathBuf,
    #[arg(long, default_value_t = 0.05)]
    payment_failure_share: f64,
    #[arg(long, default_value_t = 0.05)]
    inventory_failure_share: f64,
    /// Java heap for Kafka Streams (its default would take a quarter of the machine's memory).
    #[arg(long, default_value = "1g")]
    java_heap: String,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
enum Engine {
    SagaStreams,
    KafkaStreams,
}

impl Engine {
    fn name(self) -> &'static str {
        match self {
            Engine::SagaStreams => "saga-streams",
            Engine::KafkaStreams => "Kafka Streams",
        }
    }
}

/// Step timeouts long enough that a preloaded backlog never times out, for both engines.
const STEP_TIMEOUT_S: u64 = 900;

#[derive(Debug, Default, Clone)]
struct Figures {
    sagas_per_s: f64,
    cpu_s: f64,
    cpu_per_1000: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    max_ms: f64,
    restore_s: f64,
    violations: usize,
}

/// One run's topics, participants and engine.
struct Run<'a> {
    args: &'a Args,
    prefix: String,
    def: SagaDefinition,
    dir: tempfile::TempDir,
    participants: Vec<Process>,
}

impl<'a> Run<'a> {
    fn new(args: &'a Args, tag: &str) -> Run<'a> {
        let (prefix, def) = fresh_saga(&args.topology, &args.bootstrap, args.partitions, tag);
        Run {
            args,
            prefix,
            def,
            dir: tempfile::tempdir().expect("temp dir"),
            participants: Vec::new(),
        }
    }

    fn saga_streams(&self, command: &[&str]) -> Command {
        let mut c = Command::new(release_dir().join("saga-streams"));
        c.args(command)
            .args(["--bootstrap", &self.args.bootstrap])
            .arg("--topology")
            .arg(&self.args.topology)
            .args(["--topic-prefix", &self.prefix])
            .env(
                "RUST_LOG",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| "warn".into()),
            )
            .env("SAGA_STREAMS_LOG_FORMAT", "json");
        c
    }

    fn start_participants(&mut self) {
        for (step, share) in [
            ("payment", self.args.payment_failure_share),
            ("inventory", self.args.inventory_failure_share),
        ] {
            let mut c = self.saga_streams(&["simulate", step]);
            c.args(["--failure-share", &share.to_string()])
                .args(["--instance-id", "bench"])
                .arg("--state-dir")
                .arg(self.dir.path().join(format!("state-{step}")));
            self.participants.push(Process::spawn(
                c,
                self.dir.path().join(format!("{step}.log")),
            ));
        }
    }

    fn application_id(&self, engine: Engine) -> String {
        match engine {
            Engine::SagaStreams => format!("{}orchestrator", self.prefix),
            Engine::KafkaStreams => format!("{}ks-orchestrator", self.prefix),
        }
    }

    fn start_engine(&self, engine: Engine, metrics_port: u16) -> Process {
        let state = self.dir.path().join("state-engine");
        let command = match engine {
            Engine::SagaStreams => {
                let mut c = self.saga_streams(&["run"]);
                c.args(["--application-id", &self.application_id(engine)])
                    .args(["--instance-id", "bench"])
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--metrics-addr", &format!("127.0.0.1:{metrics_port}")]);
                for step in &self.def.steps {
                    c.args([
                        "--step-timeout",
                        &format!("{}={STEP_TIMEOUT_S}s", step.name),
                    ]);
                }
                c
            }
            Engine::KafkaStreams => {
                let mut c = Command::new("java");
                c.arg(format!("-Xmx{}", self.args.java_heap))
                    .arg("-jar")
                    .arg(&self.args.jar)
                    .args(["--bootstrap", &self.args.bootstrap])
                    .args(["--application-id", &self.application_id(engine)])
                    .args(["--topic-prefix", &self.prefix])
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--step-timeout-ms", &(STEP_TIMEOUT_S * 1000).to_string()]);
                c
            }
        };
        Process::spawn(command, self.dir.path().join("engine.log"))
    }

    fn outcome_topics(&self) -> Vec<String> {
        vec![
            self.def.completed.topic.clone(),
            self.def.cancelled.topic.clone(),
        ]
    }

    fn audit(&self) -> usize {
        let report = sim::audit::audit(
            &self.args.bootstrap,
            &self.def,
            &Codec::json(),
            Duration::from_secs(300),
        )
        .expect("audit");
        if !report.is_clean() {
            eprintln!(
                "  audit: {} violations, e.g. {:?}",
                report.violations.len(),
                report.violations.iter().take(3).collect::<Vec<_>>()
            );
        }
        report.violations.len()
    }

    fn stop(self) {
        for p in self.participants {
            p.stop();
        }
    }
}

fn produce_orders(run: &Run<'_>, orders: u64, rate: f64, id_prefix: &str) {
    let progress = bar(orders, "orders produced");
    load::run(
        &run.args.bootstrap,
        &run.def,
        &Codec::json(),
        &LoadSpec {
            orders,
            rate,
            id_prefix: id_prefix.to_string(),
            transaction_size: 0,
            deliver_within: std::time::Duration::from_secs(30),
        },
        &|n| progress.set_position(n),
    )
    .expect("producing orders");
    progress.finish_and_clear();
}

/// Reads outcomes until every order in `orders` (by prefix count) has one; returns the record
/// timestamps of each order's outcome.
fn wait_for_outcomes(
    run: &Run<'_>,
    engine: &mut Process,
    expected: u64,
    id_prefix: &str,
    limit: Duration,
) -> HashMap<String, i64> {
    let scanner = TopicScanner::new(&run.args.bootstrap, &run.outcome_topics()).expect("scanner");
    let progress = bar(expected, "sagas finished");
    let deadline = Instant::now() + limit;
    let mut outcomes = HashMap::new();
    let mut batch = Vec::new();
    while (outcomes.len() as u64) < expected {
        engine.check_alive("the engine");
        assert!(
            Instant::now() < deadline,
            "only {} of {expected} outcomes within {limit:?}",
            outcomes.len()
        );
        batch.clear();
        scanner
            .poll_batch(Duration::from_millis(200), &mut batch)
            .expect("reading outcomes");
        for r in &batch {
            let key = String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned();
            if key.starts_with(id_prefix) {
                outcomes.entry(key).or_insert(r.timestamp_ms);
            }
        }
        progress.set_position(outcomes.len() as u64);
    }
    progress.finish_and_clear();
    outcomes
}

/// The earliest record timestamp on `topic`.
fn first_timestamp(bootstrap: &str, topic: &str) -> i64 {
    let records =
        sim::read_to_end(bootstrap, &[topic.to_string()], Duration::from_secs(120)).expect("read");
    records
        .iter()
        .map(|r| r.timestamp_ms)
        .min()
        .unwrap_or(i64::MAX)
}

fn throughput(args: &Args, engine: Engine) -> Figures {
    let mut run = Run::new(args, "tp");
    let ids = "o-";
    produce_orders(&run, args.orders, 0.0, ids);
    run.start_participants();
    let mut process = run.start_engine(engine, free_port());
    let outcomes = wait_for_outcomes(
        &run,
        &mut process,
        args.orders,
        ids,
        Duration::from_secs(3600),
    );
    let (cpu_s, peak_rss_mib) = process.usage();
    process.stop();
    let last = outcomes.values().copied().max().unwrap_or(0);
    let first = first_timestamp(&args.bootstrap, &run.def.steps[0].command.topic);
    let violations = run.audit();
    run.stop();
    Figures {
        sagas_per_s: args.orders as f64 / ((last - first).max(1) as f64 / 1000.0),
        cpu_s,
        cpu_per_1000: cpu_s / args.orders as f64 * 1000.0,
        peak_rss_mib,
        violations,
        ..Default::default()
    }
}

fn percentile(sorted: &[i64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .map_or(f64::NAN, |v| *v as f64)
}

fn latency(args: &Args, engine: Engine) -> Figures {
    let mut run = Run::new(args, "lat");
    run.start_participants();
    let mut process = run.start_engine(engine, free_port());
    // Warm up until the engine answers, so start-up and group join are not measured.
    produce_orders(&run, 20, 0.0, "warm-");
    wait_for_outcomes(&run, &mut process, 20, "warm-", Duration::from_secs(300));
    let orders = (args.rate * args.seconds as f64) as u64;
    let ids = "o-";
    produce_orders(&run, orders, args.rate, ids);
    let outcomes = wait_for_outcomes(&run, &mut process, orders, ids, Duration::from_secs(600));
    let (cpu_s, peak_rss_mib) = process.usage();
    process.stop();
    let created: HashMap<String, i64> = sim::read_to_end(
        &args.bootstrap,
        std::slice::from_ref(&run.def.start_topic),
        Duration::from_secs(120),
    )
    .expect("reading orders")
    .iter()
    .map(|r| {
        (
            String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()).into_owned(),
            r.timestamp_ms,
        )
    })
    .collect();
    let mut latencies: Vec<i64> = outcomes
        .iter()
        .filter_map(|(id, done)| created.get(id).map(|c| done - c))
        .collect();
    latencies.sort_unstable();
    let violations = run.audit();
    run.stop();
    Figures {
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        max_ms: latencies.last().map_or(f64::NAN, |v| *v as f64),
        cpu_s,
        cpu_per_1000: cpu_s / orders as f64 * 1000.0,
        peak_rss_mib,
        violations,
        ..Default::default()
    }
}

/// The same finished saga as the Kafka Streams baseline stores it (its `SagaState` as JSON).
fn kafka_streams_template() -> String {
    json!({
        "status": "COMPLETED", "awaiting": -1, "compensating": false, "deadline": 0,
        "correlationId": "corr-{ID}", "userId": "user-1", "total": 245.5, "currency": "EUR",
        "items": [{"sku": "sku-3", "quantity": 2}, {"sku": "sku-7", "quantity": 1}],
        "paymentId": "payment-{ID}", "reservationId": "reservation-{ID}", "paid": true,
        "finished": true, "cancelReason": null, "messages": 3,
        "seen": ["{ID}-e1", "{ID}-e2", "{ID}-e3"]
    })
    .to_string()
}

/// How an engine keys a saga in its changelog.
type KeyOf = fn(&str) -> Vec<u8>;

fn restore(args: &Args, engine: Engine) -> Figures {
    let run = Run::new(args, "restore");
    let (topic, key_of, template): (String, KeyOf, String) = match engine {
        Engine::SagaStreams => (
            format!("{}-sagas-changelog", run.application_id(engine)),
            saga_key,
            saga_streams_template(&run.def),
        ),
        Engine::KafkaStreams => (
            format!("{}-saga-store-changelog", run.application_id(engine)),
            |id| id.as_bytes().to_vec(),
            kafka_streams_template(),
        ),
    };
    create_changelog(&args.bootstrap, &topic, args.partitions);
    let settings = [("linger.ms", "20"), ("compression.type", "lz4")];
    bulk_produce(
        &args.bootstrap,
        &settings,
        args.restore_sagas,
        "changelog records written",
        |n| {
            let id = format!("r-{n}");
            // The task of a saga is the input partition of its id (producers' default partitioner).
            let partition = Partitioner::ConsistentRandom.partition(id.as_bytes(), args.partitions);
            (
                topic.clone(),
                key_of(&id),
                template.replace("{ID}", &id).into_bytes(),
                Some(partition),
            )
        },
    );

    let port = free_port();
    let started = Instant::now();
    let mut process = run.start_engine(engine, port);
    let deadline = started + Duration::from_secs(1800);
    loop {
        process.check_alive("the engine");
        assert!(Instant::now() < deadline, "not running after 30 minutes");
        let running = match engine {
            Engine::SagaStreams => Command::new("curl")
                .args([
                    "-fsS",
                    "--max-time",
                    "2",
                    &format!("http://127.0.0.1:{port}/ready"),
                ])
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .status()
                .is_ok_and(|s| s.success()),
            Engine::KafkaStreams => {
                let log = process.log_text();
                log.contains("STATE RUNNING")
                    && log
                        .lines()
                        .filter(|l| l.starts_with("RESTORED saga-store "))
                        .count()
                        >= args.partitions as usize
            }
        };
        if running {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let restore_s = started.elapsed().as_secs_f64();
    if std::env::var("BENCH_LOG").is_ok() {
        eprintln!("{}", process.log_text());
    }
    let (cpu_s, peak_rss_mib) = process.usage();
    process.stop();
    run.stop();
    Figures {
        restore_s,
        cpu_s,
        peak_rss_mib,
        ..Default::default()
    }
}

/// The exactly-once pass-through of `3 x --orders` records (three inputs per saga).
fn ceiling(args: &Args) -> Figures {
    let dir = tempfile::tempdir().expect("temp dir");
    let tag = format!("bench-ceiling-{}-{}", std::process::id(), now_ms());
    let (input, output) = (format!("{tag}.in"), format!("{tag}.out"));
    let admin: AdminClient<DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", &args.bootstrap)
        .create()
        .expect("admin");
    let topics = [
        NewTopic::new(&input, args.partitions, TopicReplication::Fixed(1)),
        NewTopic::new(&output, args.partitions, TopicReplication::Fixed(1)),
    ];
    for r in futures::executor::block_on(admin.create_topics(&topics, &AdminOptions::new()))
        .expect("create topics")
    {
        r.expect("topic created");
    }
    let records = args.orders * 3;
    // Values the size of the saga's messages.
    let def = SagaDefinition::load(&args.topology).expect("topology");
    let body =
        serde_json::to_vec(&json!({"event": load::order_created(&def, "o-1")})).expect("json");
    bulk_produce(
        &args.bootstrap,
        &[("linger.ms", "5")],
        records,
        "records produced",
        |n| {
            (
                input.clone(),
                format!("o-{}", n / 3).into_bytes(),
                body.clone(),
                None,
            )
        },
    );
    let mut command = Command::new(release_dir().join("examples").join("counter"));
    command
        .args(["--bootstrap", &args.bootstrap, "--mode", "passthrough"])
        .args(["--input", &input, "--output", &output])
        .args(["--application-id", &tag, "--instance-id", "bench"])
        .arg("--state-dir")
        .arg(dir.path().join("state"))
        .env("RUST_LOG", "warn");
    let mut process = Process::spawn(command, dir.path().join("ceiling.log"));
    let scanner =
        TopicScanner::new(&args.bootstrap, std::slice::from_ref(&output)).expect("scanner");
    let progress = bar(records, "records passed through");
    let (mut seen, mut first, mut last) = (0u64, i64::MAX, 0i64);
    let mut batch = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while seen < records {
        process.check_alive("the pass-through");
        assert!(Instant::now() < deadline, "pass-through too slow");
        batch.clear();
        scanner
            .poll_batch(Duration::from_millis(200), &mut batch)
            .expect("reading outputs");
        for r in &batch {
            first = first.min(r.timestamp_ms);
            last = last.max(r.timestamp_ms);
        }
        seen += batch.len() as u64;
        progress.set_position(seen);
    }
    progress.finish_and_clear();
    let (cpu_s, peak_rss_mib) = process.usage();
    process.stop();
    let records_per_s = records as f64 / ((last - first).max(1) as f64 / 1000.0);
    Figures {
        sagas_per_s: records_per_s / 3.0,
        cpu_s,
        cpu_per_1000: cpu_s / args.orders as f64 * 1000.0,
        peak_rss_mib,
        ..Default::default()
    }
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

type Metric = fn(&Figures) -> f64;

fn table(title: &str, runs: &BTreeMap<Engine, Vec<Figures>>, rows: &[(&str, Metric)]) {
    let (Some(ours), Some(theirs)) = (
        runs.get(&Engine::SagaStreams),
        runs.get(&Engine::KafkaStreams),
    ) else {
        return;
    };
    println!("\n| {title} | saga-streams | Kafka Streams | saga-streams / Kafka Streams |");
    println!("|---|---|---|---|");
    for (name, f) in rows {
        let (a, b) = (median(ours.iter().map(f)), median(theirs.iter().map(f)));
        println!("| {name} | {a:.1} | {b:.1} | {:.2} |", a / b);
    }
    let invalid = |v: &Vec<Figures>| v.iter().filter(|f| f.violations > 0).count();
    println!(
        "| runs with audit violations (invalid) | {} of {} | {} of {} | |",
        invalid(ours),
        ours.len(),
        invalid(theirs),
        theirs.len()
    );
}

fn main() {
    let args = Args::parse();
    let engines = [Engine::SagaStreams, Engine::KafkaStreams];
    let wants = |m: &str| args.modes.iter().any(|x| x == m);
    let mut results: BTreeMap<&str, BTreeMap<Engine, Vec<Figures>>> = BTreeMap::new();
    let mut ceilings = Vec::new();
    let started = Instant::now();
    for repetition in 1..=args.repeat {
        // Interleaved, so drift on a noisy machine hits both engines alike.
        for engine in engines {
            for (mode, f) in [
                ("throughput", throughput as fn(&Args, Engine) -> Figures),
                ("latency", latency),
                ("restore", restore),
            ] {
                if !wants(mode) {
                    continue;
                }
                eprintln!(
                    "[{:>5.0}s] run {repetition}/{}: {} {mode}",
                    started.elapsed().as_secs_f64(),
                    args.repeat,
                    engine.name()
                );
                let figures = f(&args, engine);
                eprintln!("  {figures:?}");
                results
                    .entry(mode)
                    .or_default()
                    .entry(engine)
                    .or_default()
                    .push(figures);
            }
        }
        if wants("ceiling") {
            eprintln!(
                "[{:>5.0}s] run {repetition}/{}: pass-through ceiling",
                started.elapsed().as_secs_f64(),
                args.repeat
            );
            let figures = ceiling(&args);
            eprintln!("  {figures:?}");
            ceilings.push(figures);
        }
    }
    println!(
        "Medians of {} runs; {} partitions; throughput {} orders; latency {}/s for {} s; restore {} sagas; failure shares {}/{}.",
        args.repeat, args.partitions, args.orders, args.rate, args.seconds, args.restore_sagas,
        args.payment_failure_share, args.inventory_failure_share
    );
    let empty = BTreeMap::new();
    table(
        "throughput",
        results.get("throughput").unwrap_or(&empty),
        &[
            ("sagas/s", |f| f.sagas_per_s),
            ("CPU s per 1,000 sagas", |f| f.cpu_per_1000),
            ("peak RSS (MiB)", |f| f.peak_rss_mib),
        ],
    );
    table(
        "latency",
        results.get("latency").unwrap_or(&empty),
        &[
            ("p50 (ms)", |f| f.p50_ms),
            ("p99 (ms)", |f| f.p99_ms),
            ("max (ms)", |f| f.max_ms),
            ("CPU s per 1,000 sagas", |f| f.cpu_per_1000),
            ("peak RSS (MiB)", |f| f.peak_rss_mib),
        ],
    );
    table(
        "restore",
        results.get("restore").unwrap_or(&empty),
        &[
            ("seconds to running", |f| f.restore_s),
            ("CPU s", |f| f.cpu_s),
            ("peak RSS (MiB)", |f| f.peak_rss_mib),
        ],
    );
    if !ceilings.is_empty() {
        let ceiling = median(ceilings.iter().map(|f| f.sagas_per_s));
        println!("\n| exactly-once pass-through (librdkafka, no state) | |\n|---|---|");
        println!("| records/s | {:.0} |", ceiling * 3.0);
        println!("| sagas/s ceiling (3 inputs per saga) | {ceiling:.0} |");
        println!(
            "| CPU s per 1,000 sagas | {:.2} |",
            median(ceilings.iter().map(|f| f.cpu_per_1000))
        );
        if let Some(ours) = results
            .get("throughput")
            .and_then(|r| r.get(&Engine::SagaStreams))
        {
            println!(
                "| saga-streams throughput / ceiling | {:.2} |",
                median(ours.iter().map(|f| f.sagas_per_s)) / ceiling
            );
        }
    }
}
