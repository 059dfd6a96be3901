//! saga-streams against the same order saga written with Kafka Streams
//! (`benches/kafka-streams-baseline`), side by side on one broker. Run through `scripts/bench`,
//! which builds both and starts the stack.
//!
//! Every run gets fresh topics with `--partitions` partitions. Modes (`--modes`):
//! - heap: Kafka Streams alone on the isolated workload at each `--heaps` size; the smallest heap
//!   within 5 % of the best throughput is used for Kafka Streams in the other modes;
//! - isolated: the orchestrator alone. For each saga, its OrderCreated and the replies the
//!   participants would send (the same failure shares) are written beforehand, in phases (every
//!   saga's first input, then every saga's second, ...; the engine frozen while a phase is
//!   written), so that no reply is read before the event it answers; no participant runs, so both
//!   engines consume the same input and nothing else competes for the cores;
//! - throughput: the full pipeline (both participants running) on a backlog of `--orders` orders;
//! - sweep: the full pipeline at each of `--rates` orders/s for `--sweep-seconds`; per rate the
//!   engine's CPU per saga, p50/p99 latency (OrderCreated to outcome, record timestamps), and
//!   whether the engine kept up (see [`kept_up`]); a rate an engine did not sustain ends its sweep
//!   in that repetition;
//! - echo: the pipeline's ceiling: a stateless exactly-once echo orchestrator and two echo
//!   participants (`examples/counter.rs --mode passthrough --route`) on the same topics, hops and
//!   transactions, on the same backlog as `throughput`;
//! - restore: `--restore-sagas` finished sagas in the engine's changelog in its own format (for
//!   saga-streams with their status index entries, counts and index marker, as a running
//!   orchestrator writes them); seconds from process start to assignment (group join) and from
//!   assignment to running;
//! - ceiling: the runtime's exactly-once pass-through of the saga's three inputs per saga, one
//!   process.
//!
//! Backlog runs (heap, isolated, throughput, echo) measure a window: from the outcome that ends
//! the warm-up share (`--warm-up-share` of the sagas, dropped the same way on both sides) to the
//! last outcome, by record timestamps. CPU seconds are the engine process's /proc delta over that
//! window (sampled every 100 ms); peak RSS is the process's VmHWM. Every run except restore and
//! ceiling is audited `read_committed`; a run with a violation is reported invalid. Results:
//! medians of `--repeat` runs with their spread, runs of the two engines interleaved, as Markdown
//! on stdout (`--record-into FILE` also replaces the block between the file's bench markers).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use clap::Parser;

#[path = "common/bench_kit.rs"]
mod bench_kit;

use bench_kit::{
    bar, bulk_produce, bulk_produce_many, create_changelog, free_port, fresh_saga, now_ms,
    release_dir, saga_streams_template, stored_bytes, Bulk, Process,
};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use saga_streams::codec::Codec;
use saga_streams::saga::contract::CORRELATION_HEADER;
use saga_streams::saga::processor::{saga_key, status_index_prefix, COUNT_PREFIX, INDEXED_MARKER};
use saga_streams::saga::query::Partitioner;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::load::{self, LoadSpec};
use saga_streams::sim::participant::{reply_payload, share_of};
use saga_streams::sim::{self, TopicScanner};
use serde_json::{json, Map, Value};

#[derive(Debug, Clone, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// Orders per full-pipeline backlog run (throughput, echo, ceiling).
    #[arg(long, default_value_t = 100_000)]
    orders: u64,
    /// Sagas per isolated run (and per heap sweep run).
    #[arg(long, default_value_t = 200_000)]
    isolated_sagas: u64,
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Repetitions per engine and mode; tables show medians and the spread.
    #[arg(long, default_value_t = 3)]
    repeat: usize,
    /// Orders per second in the sweep, in increasing order.
    #[arg(long, default_value = "1000,2000,4000,8000", value_delimiter = ',')]
    rates: Vec<f64>,
    /// Length of each sweep run.
    #[arg(long, default_value_t = 20)]
    sweep_seconds: u64,
    /// Finished sagas in each restore run's changelog.
    #[arg(long, default_value_t = 1_000_000)]
    restore_sagas: u64,
    /// Modes to run, comma separated: heap, isolated, throughput, sweep, echo, restore, ceiling.
    #[arg(
        long,
        default_value = "heap,isolated,throughput,sweep,echo,restore",
        value_delimiter = ','
    )]
    modes: Vec<String>,
    /// Engines to run: saga-streams, kafka-streams (both by default; ratios need both).
    #[arg(
        long,
        default_value = "saga-streams,kafka-streams",
        value_delimiter = ','
    )]
    engines: Vec<String>,
    /// A short run of every mode: 20,000 sagas, 100,000 restored, rates 1000 and 2000 for 10 s,
    /// heaps 256m and 1g, one repetition (checks the harness, not the engines).
    #[arg(long)]
    quick: bool,
    /// Share of each backlog run's sagas (the first to finish) left out of its window.
    #[arg(long, default_value_t = 0.1)]
    warm_up_share: f64,
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
    /// Java heaps tried by the heap mode, smallest first.
    #[arg(
        long,
        default_value = "128m,192m,256m,384m,512m,1g",
        value_delimiter = ','
    )]
    heaps: Vec<String>,
    /// Java heap for Kafka Streams when the heap mode does not run (or finds none that works).
    #[arg(long, default_value = "1g")]
    java_heap: String,
    /// Kafka Streams' record cache (`statestore.cache.max.bytes`); 0 turns caching off.
    #[arg(long, default_value_t = 10 << 20)]
    ks_cache_bytes: u64,
    /// Kafka Streams' RocksDB budget for all stores together (shared block cache, memtables
    /// charged to it): saga-streams' own budget (64 MiB); 0: Kafka Streams' defaults.
    #[arg(long, default_value_t = 64 << 20)]
    ks_rocksdb_budget_bytes: u64,
    /// Replace the block between `<!-- bench-saga:begin -->` and `<!-- bench-saga:end -->` in
    /// this file with the results, the command and the date.
    #[arg(long)]
    record_into: Option<PathBuf>,
}

impl Args {
    fn quick(mut self) -> Args {
        if self.quick {
            self.orders = 20_000;
            self.isolated_sagas = 20_000;
            self.restore_sagas = 100_000;
            self.rates = vec![1000.0, 2000.0];
            self.sweep_seconds = 10;
            self.heaps = vec!["256m".into(), "1g".into()];
            self.repeat = 1;
        }
        self
    }

    fn wants(&self, mode: &str) -> bool {
        self.modes.iter().any(|m| m == mode)
    }
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
    records_per_s: f64,
    cpu_s: f64,
    cpu_per_1000: f64,
    peak_rss_mib: f64,
    p50_ms: f64,
    p99_ms: f64,
    /// Orders/s the load generator reached (sweep).
    produced_per_s: f64,
    /// Whether the engine kept up with the rate (sweep).
    kept_up: bool,
    join_s: f64,
    restore_s: f64,
    total_s: f64,
    violations: usize,
}

/// One run's topics, participants and engine.
struct Run<'a> {
    args: &'a Args,
    java_heap: &'a str,
    prefix: String,
    def: SagaDefinition,
    dir: tempfile::TempDir,
    participants: Vec<Process>,
}

impl<'a> Run<'a> {
    fn new(args: &'a Args, java_heap: &'a str, tag: &str) -> Run<'a> {
        let (prefix, def) = fresh_saga(&args.topology, &args.bootstrap, args.partitions, tag);
        Run {
            args,
            java_heap,
            prefix,
            def,
            dir: tempfile::tempdir().expect("temp dir"),
            participants: Vec::new(),
        }
    }

    fn saga_streams(&self, command: &[&str], log: &str) -> Command {
        let mut c = Command::new(release_dir().join("saga-streams"));
        c.args(command)
            .args(["--bootstrap", &self.args.bootstrap])
            .arg("--topology")
            .arg(&self.args.topology)
            .args(["--topic-prefix", &self.prefix])
            .env(
                "RUST_LOG",
                std::env::var("BENCH_LOG").unwrap_or_else(|_| log.into()),
            )
            .env("SAGA_STREAMS_LOG_FORMAT", "json");
        c
    }

    fn start_participants(&mut self) {
        for (step, share) in [
            ("payment", self.args.payment_failure_share),
            ("inventory", self.args.inventory_failure_share),
        ] {
            let mut c = self.saga_streams(&["simulate", step], "warn");
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
                // The stream thread's info lines say when partitions are assigned (restore).
                let mut c =
                    self.saga_streams(&["run"], "warn,saga_streams::runtime::stream_thread=info");
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
                c.arg(format!("-Xmx{}", self.java_heap))
                    .arg("-jar")
                    .arg(&self.args.jar)
                    .args(["--bootstrap", &self.args.bootstrap])
                    .args(["--application-id", &self.application_id(engine)])
                    .args(["--topic-prefix", &self.prefix])
                    .arg("--state-dir")
                    .arg(&state)
                    .args(["--step-timeout-ms", &(STEP_TIMEOUT_S * 1000).to_string()])
                    .args(["--caching", &(self.args.ks_cache_bytes > 0).to_string()])
                    .args(["--cache-max-bytes", &self.args.ks_cache_bytes.to_string()])
                    .args([
                        "--rocksdb-budget-bytes",
                        &self.args.ks_rocksdb_budget_bytes.to_string(),
                    ]);
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
        // Dropped: participants stopped, topics deleted.
    }
}

impl Drop for Run<'_> {
    fn drop(&mut self) {
        for p in std::mem::take(&mut self.participants) {
            p.stop();
        }
        bench_kit::delete_topics_with_prefix(&self.args.bootstrap, &self.prefix);
    }
}

/// Produces `orders` OrderCreated at `rate` per second (0: as fast as possible); returns the rate
/// reached.
fn produce_orders(run: &Run<'_>, orders: u64, rate: f64, id_prefix: &str) -> f64 {
    let progress = bar(orders, "orders produced");
    let started = Instant::now();
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
    orders as f64 / started.elapsed().as_secs_f64().max(0.001)
}

/// Reads outcomes until every order with `id_prefix` has one, or `limit` passes (then returns
/// those that came); the record timestamp of each order's outcome.
fn collect_outcomes(
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
    while (outcomes.len() as u64) < expected && Instant::now() < deadline {
        engine.check_alive("the engine");
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

/// [`collect_outcomes`], failing the run when some never came.
fn wait_for_outcomes(
    run: &Run<'_>,
    engine: &mut Process,
    expected: u64,
    id_prefix: &str,
    limit: Duration,
) -> HashMap<String, i64> {
    let outcomes = collect_outcomes(run, engine, expected, id_prefix, limit);
    assert_eq!(
        outcomes.len() as u64,
        expected,
        "only {} of {expected} outcomes within {limit:?}",
        outcomes.len()
    );
    outcomes
}

/// The measured window of a backlog run: (from, to, sagas finished in it), from the outcome that
/// ends the warm-up share to the last.
fn window(outcomes: &HashMap<String, i64>, warm_up_share: f64) -> (i64, i64, u64) {
    let mut at: Vec<i64> = outcomes.values().copied().collect();
    at.sort_unstable();
    let skip = ((at.len() as f64 * warm_up_share) as usize).min(at.len().saturating_sub(2));
    let (from, to) = (
        at.get(skip).copied().unwrap_or(0),
        at.last().copied().unwrap_or(0),
    );
    (from, to, (at.len() - skip - 1) as u64)
}

/// Figures of a backlog run's window for `process`.
fn backlog_figures(
    args: &Args,
    process: &Process,
    outcomes: &HashMap<String, i64>,
    inputs_per_saga: f64,
) -> Figures {
    let (from, to, sagas) = window(outcomes, args.warm_up_share);
    let seconds = (to - from).max(1) as f64 / 1000.0;
    let (cpu_s, _) = process.window(from, to);
    let (_, peak_rss_mib) = process.usage();
    Figures {
        sagas_per_s: sagas as f64 / seconds,
        records_per_s: sagas as f64 * inputs_per_saga / seconds,
        cpu_s,
        cpu_per_1000: cpu_s / sagas.max(1) as f64 * 1000.0,
        peak_rss_mib,
        ..Default::default()
    }
}

/// A saga's inputs as the orchestrator would read them, in the order the participants would send
/// them (`saga-streams simulate`, the same failure shares): its OrderCreated, the payment reply,
/// then the inventory reply and, after a failed reservation, the refund's confirmation. Each
/// causes exactly one output. Envelopes as the participants write them.
fn isolated_inputs(def: &SagaDefinition, args: &Args, id: &str) -> Vec<Bulk> {
    let codec = Codec::json();
    let order = match load::order_created(def, id) {
        Value::Object(map) => map,
        _ => Map::new(),
    };
    let correlation = order["correlation_id"]
        .as_str()
        .unwrap_or_default()
        .to_string();
    let mut out = Vec::new();
    let mut push = |topic: &str, event_type: &str, body: Map<String, Value>| {
        out.push(Bulk {
            topic: topic.to_string(),
            key: id.as_bytes().to_vec(),
            value: codec.write(topic, event_type, body, true).expect("json"),
            partition: None,
            timestamp_ms: None,
            headers: vec![(CORRELATION_HEADER, correlation.clone())],
        });
    };
    let reply = |event_type: &str, n: usize, reason: Option<&str>| {
        let mut body = reply_payload(def, event_type, &order, id, reason.map(str::to_string));
        body.insert("event_id".into(), json!(format!("{id}-reply-{n}")));
        body.insert("event_type".into(), json!(event_type));
        body.insert("event_version".into(), json!(1));
        body.insert(def.key_field.clone(), json!(id));
        body.insert("correlation_id".into(), json!(correlation));
        body.insert("occurred_at".into(), order["occurred_at"].clone());
        body
    };
    push(&def.start_topic, &def.start_event, order.clone());
    let (payment, inventory) = (&def.steps[0], &def.steps[1]);
    if share_of(id, &format!("{}/fail", payment.name)) < args.payment_failure_share {
        push(
            &payment.reply_topic,
            &payment.failure,
            reply(&payment.failure, 1, Some("declined")),
        );
        return out;
    }
    push(
        &payment.reply_topic,
        &payment.success,
        reply(&payment.success, 1, None),
    );
    if share_of(id, &format!("{}/fail", inventory.name)) < args.inventory_failure_share {
        push(
            &inventory.reply_topic,
            &inventory.failure,
            reply(&inventory.failure, 2, Some("declined")),
        );
        push(
            &payment.reply_topic,
            &payment.confirmed_by,
            reply(&payment.confirmed_by, 3, None),
        );
    } else {
        push(
            &inventory.reply_topic,
            &inventory.success,
            reply(&inventory.success, 2, None),
        );
    }
    out
}

/// `kill -<signal>` (STOP and CONT freeze and thaw the engine while a phase is written).
fn signal(process: &Process, signal: &str) {
    let _ = Command::new("kill")
        .args([&format!("-{signal}"), &process.child.id().to_string()])
        .status();
}

/// One isolated run: the sagas' inputs go in phases, the n-th input of every saga in phase n
/// (so no reply can be read before the event it answers, whatever order an engine reads its
/// inputs in). While a phase is written the engine is frozen (SIGSTOP); then it works the
/// phase's backlog alone. First a warm-up share of sagas (unmeasured, so that JIT compilation
/// and caches are warm), then the measured ones; the figures add up the measured phases'
/// windows (first to last output of the phase) and the engine's CPU in them.
fn isolated(args: &Args, java_heap: &str, engine: Engine) -> Figures {
    let run = Run::new(args, java_heap, "iso");
    let warm_up = ((args.isolated_sagas as f64 * args.warm_up_share) as u64).max(100);
    let def = &run.def;
    let outputs = vec![
        def.steps[0].command.topic.clone(),
        def.steps[1].command.topic.clone(),
        def.completed.topic.clone(),
        def.cancelled.topic.clone(),
    ];
    let scanner = TopicScanner::new(&args.bootstrap, &outputs).expect("scanner");
    let mut process: Option<Process> = None;
    let mut seen = 0u64;
    let (mut seconds, mut cpu_s, mut records) = (0.0, 0.0, 0u64);
    for (ids, sagas, measured) in [("w-", warm_up, false), ("o-", args.isolated_sagas, true)] {
        let mut phases: Vec<Vec<Bulk>> = vec![Vec::new(), Vec::new(), Vec::new(), Vec::new()];
        for n in 0..sagas {
            for (i, input) in isolated_inputs(def, args, &format!("{ids}{n}"))
                .into_iter()
                .enumerate()
            {
                phases[i].push(input);
            }
        }
        for phase in phases {
            let expected = phase.len() as u64;
            if let Some(p) = &process {
                signal(p, "STOP");
            }
            let mut phase = phase.into_iter();
            bulk_produce_many(
                &args.bootstrap,
                &[("linger.ms", "20")],
                expected,
                "inputs produced",
                |_| phase.next().into_iter().collect(),
            );
            let engine_process = match &mut process {
                Some(p) => {
                    signal(p, "CONT");
                    p
                }
                None => process.insert(run.start_engine(engine, free_port())),
            };
            let (mut first, mut last) = (i64::MAX, i64::MIN);
            let deadline = Instant::now() + Duration::from_secs(1800);
            let target = seen + expected;
            let mut batch = Vec::new();
            while seen < target {
                engine_process.check_alive("the engine");
                assert!(
                    Instant::now() < deadline,
                    "{seen} of {target} outputs after 30 minutes"
                );
                batch.clear();
                scanner
                    .poll_batch(Duration::from_millis(200), &mut batch)
                    .expect("reading outputs");
                for r in &batch {
                    first = first.min(r.timestamp_ms);
                    last = last.max(r.timestamp_ms);
                }
                seen += batch.len() as u64;
            }
            assert_eq!(seen, target, "more outputs than inputs: a duplicate");
            if measured {
                seconds += (last - first).max(1) as f64 / 1000.0;
                cpu_s += engine_process.window(first, last).0;
                records += expected;
            }
        }
    }
    let process = process.expect("started");
    let (_, peak_rss_mib) = process.usage();
    process.stop();
    let sagas = args.isolated_sagas as f64;
    Figures {
        sagas_per_s: sagas / seconds,
        records_per_s: records as f64 / seconds,
        cpu_s,
        cpu_per_1000: cpu_s / sagas * 1000.0,
        peak_rss_mib,
        violations: run.audit(),
        ..Default::default()
    }
}

/// Waits for the outcome of every one of the run's `--orders` orders (ids `o-<n>`), then stops
/// `process`; the figures of its window (three inputs per saga).
fn backlog_run(run: &Run<'_>, mut process: Process) -> Figures {
    let outcomes = wait_for_outcomes(
        run,
        &mut process,
        run.args.orders,
        "o-",
        Duration::from_secs(3600),
    );
    let figures = backlog_figures(run.args, &process, &outcomes, 3.0);
    process.stop();
    figures
}

fn throughput(args: &Args, java_heap: &str, engine: Engine) -> Figures {
    let mut run = Run::new(args, java_heap, "tp");
    produce_orders(&run, args.orders, 0.0, "o-");
    run.start_participants();
    let figures = backlog_run(&run, run.start_engine(engine, free_port()));
    let violations = run.audit();
    run.stop();
    Figures {
        violations,
        ..figures
    }
}

fn percentile(sorted: &[i64], q: f64) -> f64 {
    sorted
        .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
        .map_or(f64::NAN, |v| *v as f64)
}

/// Whether an engine kept up with a rate: the load generator reached 95 % of it, every saga
/// finished within the drain allowance, and outcomes came at 90 % of the rate orders did or more,
/// counted from the first order to the last outcome (a run's tail of at most a tenth of its
/// length; an engine that falls behind ends the run with a backlog and misses it). A first
/// criterion, latency of the last fifth of the orders within a second of the first fifth's, let
/// through an engine whose latency was already high in the first fifth.
fn kept_up(rate: f64, produced_per_s: f64, all_finished: bool, delivered_per_s: f64) -> bool {
    produced_per_s >= 0.95 * rate && all_finished && delivered_per_s >= 0.9 * produced_per_s
}

fn at_rate(args: &Args, java_heap: &str, engine: Engine, rate: f64) -> Figures {
    let mut run = Run::new(args, java_heap, "rate");
    run.start_participants();
    let mut process = run.start_engine(engine, free_port());
    // Warm up until the engine answers, so start-up and group join are not measured.
    produce_orders(&run, 20, 0.0, "warm-");
    wait_for_outcomes(&run, &mut process, 20, "warm-", Duration::from_secs(300));
    let orders = (rate * args.sweep_seconds as f64) as u64;
    let produced_per_s = produce_orders(&run, orders, rate, "o-");
    let drain = Duration::from_secs(args.sweep_seconds + 30);
    let outcomes = collect_outcomes(&run, &mut process, orders, "o-", drain);
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
    .filter(|(id, _)| id.starts_with("o-"))
    .collect();
    let mut latencies: Vec<i64> = outcomes
        .iter()
        .filter_map(|(id, done)| created.get(id).map(|c| done - c))
        .collect();
    latencies.sort_unstable();
    let from = created.values().copied().min().unwrap_or(0);
    let to = outcomes.values().copied().max().unwrap_or(from);
    let (cpu_s, peak_rss_mib) = process.window(from, to);
    process.stop();
    let violations = run.audit();
    run.stop();
    let delivered_per_s = outcomes.len() as f64 / ((to - from).max(1) as f64 / 1000.0);
    Figures {
        sagas_per_s: delivered_per_s,
        p50_ms: percentile(&latencies, 0.5),
        p99_ms: percentile(&latencies, 0.99),
        cpu_s,
        cpu_per_1000: cpu_s / outcomes.len().max(1) as f64 * 1000.0,
        peak_rss_mib,
        produced_per_s,
        kept_up: kept_up(
            rate,
            produced_per_s,
            outcomes.len() as u64 == orders,
            delivered_per_s,
        ),
        violations,
        ..Default::default()
    }
}

/// The stateless echo pipeline on the saga's topics: an orchestrator that forwards OrderCreated
/// as the payment command, the payment reply as the inventory command and the inventory reply as
/// the outcome, and two participants that forward each command as its reply; each an
/// exactly-once runtime process with the saga-streams defaults.
fn echo(args: &Args) -> Figures {
    let run = Run::new(args, "", "echo");
    produce_orders(&run, args.orders, 0.0, "o-");
    let def = &run.def;
    let (payment, inventory) = (&def.steps[0], &def.steps[1]);
    let spawn = |name: &str, routes: &[(&str, &str)]| {
        let mut c = Command::new(release_dir().join("examples").join("counter"));
        let inputs: Vec<&str> = routes.iter().map(|(i, _)| *i).collect();
        c.args(["--bootstrap", &args.bootstrap, "--mode", "passthrough"])
            .args(["--input", &inputs.join(",")])
            .args(["--output", routes[0].1])
            .args(["--application-id", &format!("{}{name}", run.prefix)])
            .args(["--instance-id", "bench"])
            .arg("--state-dir")
            .arg(run.dir.path().join(name))
            .env("RUST_LOG", "warn");
        for (input, output) in routes {
            c.args(["--route", &format!("{input}={output}")]);
        }
        Process::spawn(c, run.dir.path().join(format!("{name}.log")))
    };
    let orchestrator = spawn(
        "echo-orchestrator",
        &[
            (&def.start_topic, &payment.command.topic),
            (&payment.reply_topic, &inventory.command.topic),
            (&inventory.reply_topic, &def.completed.topic),
        ],
    );
    let participants = [
        spawn(
            "echo-payment",
            &[(&payment.command.topic, &payment.reply_topic)],
        ),
        spawn(
            "echo-inventory",
            &[(&inventory.command.topic, &inventory.reply_topic)],
        ),
    ];
    let figures = backlog_run(&run, orchestrator);
    for p in participants {
        p.stop();
    }
    figures
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

/// When the engine's log says its partitions were assigned (wall-clock ms).
fn assigned_at(engine: Engine, log: &str) -> Option<i64> {
    match engine {
        Engine::SagaStreams => log
            .lines()
            .filter(|l| l.contains("partitions assigned"))
            .find_map(|l| {
                let line: Value = serde_json::from_str(l).ok()?;
                let at = humantime::parse_rfc3339_weak(line["timestamp"].as_str()?).ok()?;
                Some(at.duration_since(std::time::UNIX_EPOCH).ok()?.as_millis() as i64)
            }),
        Engine::KafkaStreams => log
            .lines()
            .filter(|l| l.starts_with("RESTORING "))
            .find_map(|l| l.rsplit(' ').next()?.parse().ok()),
    }
}

fn restore(args: &Args, java_heap: &str, engine: Engine) -> Figures {
    let run = Run::new(args, java_heap, "restore");
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
    let value_of = |id: &str| match engine {
        Engine::SagaStreams => stored_bytes(&template, id),
        Engine::KafkaStreams => template.replace("{ID}", id).into_bytes(),
    };
    create_changelog(&args.bootstrap, &topic, args.partitions);
    let settings = [("linger.ms", "20"), ("compression.type", "lz4")];
    let to = |partition: i32, key: Vec<u8>, value: Vec<u8>| Bulk {
        topic: topic.clone(),
        key,
        value,
        partition: Some(partition),
        timestamp_ms: None,
        headers: Vec::new(),
    };
    let mut per_partition = vec![0u64; args.partitions as usize];
    bulk_produce_many(
        &args.bootstrap,
        &settings,
        args.restore_sagas + 1,
        "changelog records written",
        |n| {
            if n == args.restore_sagas {
                // saga-streams' per-task records: the count per status and the marker saying
                // every saga is in the status index.
                return match engine {
                    Engine::SagaStreams => per_partition
                        .iter()
                        .enumerate()
                        .flat_map(|(p, count)| {
                            [
                                to(
                                    p as i32,
                                    [COUNT_PREFIX, b"COMPLETED"].concat(),
                                    count.to_string().into_bytes(),
                                ),
                                to(p as i32, INDEXED_MARKER.to_vec(), b"1".to_vec()),
                            ]
                        })
                        .collect(),
                    Engine::KafkaStreams => Vec::new(),
                };
            }
            let id = format!("r-{n}");
            // The task of a saga is the input partition of its id (producers' default partitioner).
            let partition = Partitioner::ConsistentRandom.partition(id.as_bytes(), args.partitions);
            per_partition[partition as usize] += 1;
            let mut records = vec![to(partition, key_of(&id), value_of(&id))];
            if engine == Engine::SagaStreams {
                // Its entry in the status index.
                records.push(to(
                    partition,
                    [status_index_prefix("COMPLETED"), id.into_bytes()].concat(),
                    Vec::new(),
                ));
            }
            records
        },
    );

    let port = free_port();
    let mut process = run.start_engine(engine, port);
    let started = Instant::now();
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
    let running_ms = now_ms();
    let total_s = (running_ms - process.started_ms) as f64 / 1000.0;
    let log = process.log_text();
    if std::env::var("BENCH_LOG").is_ok() {
        eprintln!("{log}");
    }
    let assigned = assigned_at(engine, &log).unwrap_or(process.started_ms);
    let join_s = (assigned - process.started_ms) as f64 / 1000.0;
    let (cpu_s, peak_rss_mib) = process.usage();
    process.stop();
    run.stop();
    Figures {
        total_s,
        join_s,
        restore_s: (running_ms - assigned) as f64 / 1000.0,
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
    let mut at = Vec::with_capacity(records as usize);
    let mut batch = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(1800);
    while (at.len() as u64) < records {
        process.check_alive("the pass-through");
        assert!(Instant::now() < deadline, "pass-through too slow");
        batch.clear();
        scanner
            .poll_batch(Duration::from_millis(200), &mut batch)
            .expect("reading outputs");
        at.extend(batch.iter().map(|r| r.timestamp_ms));
        progress.set_position(at.len() as u64);
    }
    progress.finish_and_clear();
    // A window like the sagas' runs: each third record stands for a saga.
    let outcomes: HashMap<String, i64> = at
        .iter()
        .step_by(3)
        .enumerate()
        .map(|(i, t)| (i.to_string(), *t))
        .collect();
    let figures = backlog_figures(args, &process, &outcomes, 3.0);
    process.stop();
    bench_kit::delete_topics_with_prefix(&args.bootstrap, &tag);
    figures
}

fn median(values: impl Iterator<Item = f64>) -> f64 {
    let mut v: Vec<f64> = values.filter(|x| x.is_finite()).collect();
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

/// `median (min to max)`, or the single value.
fn spread(values: &[f64]) -> String {
    let m = median(values.iter().copied());
    let finite: Vec<f64> = values.iter().copied().filter(|x| x.is_finite()).collect();
    let fmt = |x: f64| {
        if x.abs() >= 100.0 {
            format!("{x:.0}")
        } else if x.abs() >= 1.0 {
            format!("{x:.2}")
        } else {
            format!("{x:.3}")
        }
    };
    if finite.len() < 2 {
        return fmt(m);
    }
    let (lo, hi) = finite
        .iter()
        .fold((f64::MAX, f64::MIN), |(lo, hi), x| (lo.min(*x), hi.max(*x)));
    format!("{} ({} to {})", fmt(m), fmt(lo), fmt(hi))
}

type Metric = fn(&Figures) -> f64;

fn invalid(runs: &[Figures]) -> String {
    format!(
        "{} of {}",
        runs.iter().filter(|f| f.violations > 0).count(),
        runs.len()
    )
}

/// A side-by-side table of one mode.
fn table(
    out: &mut String,
    title: &str,
    runs: &BTreeMap<Engine, Vec<Figures>>,
    rows: &[(&str, Metric)],
) {
    let (Some(ours), Some(theirs)) = (
        runs.get(&Engine::SagaStreams),
        runs.get(&Engine::KafkaStreams),
    ) else {
        return;
    };
    out.push_str(&format!(
        "\n| {title} | saga-streams | Kafka Streams | saga-streams / Kafka Streams |\n|---|---|---|---|\n"
    ));
    for (name, f) in rows {
        let (a, b): (Vec<f64>, Vec<f64>) =
            (ours.iter().map(f).collect(), theirs.iter().map(f).collect());
        let ratio = median(a.iter().copied()) / median(b.iter().copied());
        out.push_str(&format!(
            "| {name} | {} | {} | {ratio:.2} |\n",
            spread(&a),
            spread(&b)
        ));
    }
    out.push_str(&format!(
        "| runs with audit violations (invalid) | {} | {} | |\n",
        invalid(ours),
        invalid(theirs)
    ));
}

fn log_step(started: Instant, what: &str) {
    eprintln!("[{:>5.0}s] {what}", started.elapsed().as_secs_f64());
}

/// The heap sweep: Kafka Streams alone on the isolated workload at each heap; returns the table
/// and the heap chosen.
fn heap_sweep(args: &Args, started: Instant) -> (String, Option<String>) {
    let mut rows = Vec::new();
    for heap in &args.heaps {
        log_step(started, &format!("heap sweep: Kafka Streams -Xmx{heap}"));
        let result = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
            isolated(args, heap, Engine::KafkaStreams)
        }));
        eprintln!("  {result:?}");
        rows.push((heap.clone(), result.ok()));
    }
    let best = rows
        .iter()
        .filter_map(|(_, f)| f.as_ref().map(|f| f.sagas_per_s))
        .fold(0.0, f64::max);
    let chosen = rows
        .iter()
        .find(|(_, f)| {
            f.as_ref()
                .is_some_and(|f| f.violations == 0 && f.sagas_per_s >= 0.95 * best)
        })
        .map(|(heap, _)| heap.clone());
    let mut out = format!(
        "\n| Kafka Streams heap (isolated, {} sagas, one run each) | sagas/s | CPU s per 1,000 sagas | peak RSS (MiB) | audit violations |\n|---|---|---|---|---|\n",
        args.isolated_sagas
    );
    for (heap, f) in &rows {
        match f {
            Some(f) => out.push_str(&format!(
                "| -Xmx{heap}{} | {:.0} | {:.3} | {:.0} | {} |\n",
                if chosen.as_ref() == Some(heap) {
                    " (chosen)"
                } else {
                    ""
                },
                f.sagas_per_s,
                f.cpu_per_1000,
                f.peak_rss_mib,
                f.violations
            )),
            None => out.push_str(&format!("| -Xmx{heap} | failed | | | |\n")),
        }
    }
    (out, chosen)
}

fn main() {
    let args = Args::parse().quick();
    let engines: Vec<Engine> = [Engine::SagaStreams, Engine::KafkaStreams]
        .into_iter()
        .filter(|e| {
            args.engines
                .iter()
                .any(|n| n.eq_ignore_ascii_case(&e.name().replace(' ', "-")))
        })
        .collect();
    let started = Instant::now();
    let mut out = String::new();
    let java_heap = if args.wants("heap") {
        let (table, chosen) = heap_sweep(&args, started);
        out.push_str(&table);
        chosen.unwrap_or_else(|| args.java_heap.clone())
    } else {
        args.java_heap.clone()
    };
    let mut results: BTreeMap<&str, BTreeMap<Engine, Vec<Figures>>> = BTreeMap::new();
    let mut sweep: BTreeMap<(u64, Engine), Vec<Figures>> = BTreeMap::new();
    let mut echoes = Vec::new();
    let mut ceilings = Vec::new();
    for repetition in 1..=args.repeat {
        // Interleaved, so drift on a noisy machine hits both engines alike.
        let each = format!("run {repetition}/{}", args.repeat);
        for &engine in &engines {
            for (mode, f) in [
                ("isolated", isolated as fn(&Args, &str, Engine) -> Figures),
                ("throughput", throughput),
                ("restore", restore),
            ] {
                if !args.wants(mode) {
                    continue;
                }
                log_step(started, &format!("{each}: {} {mode}", engine.name()));
                let figures = f(&args, &java_heap, engine);
                eprintln!("  {figures:?}");
                results
                    .entry(mode)
                    .or_default()
                    .entry(engine)
                    .or_default()
                    .push(figures);
            }
        }
        if args.wants("sweep") {
            let mut going = engines.clone();
            for rate in &args.rates {
                for engine in going.clone() {
                    log_step(started, &format!("{each}: {} at {rate}/s", engine.name()));
                    let figures = at_rate(&args, &java_heap, engine, *rate);
                    eprintln!("  {figures:?}");
                    if !figures.kept_up {
                        going.retain(|e| *e != engine);
                    }
                    sweep
                        .entry((*rate as u64, engine))
                        .or_default()
                        .push(figures);
                }
            }
        }
        for (mode, into, f) in [
            ("echo", &mut echoes, echo as fn(&Args) -> Figures),
            ("ceiling", &mut ceilings, ceiling),
        ] {
            if args.wants(mode) {
                log_step(started, &format!("{each}: {mode}"));
                let figures = f(&args);
                eprintln!("  {figures:?}");
                into.push(figures);
            }
        }
    }
    out.push_str(&format!(
        "\nMedians of {} runs (spread: lowest to highest); {} partitions; isolated {} sagas; throughput and echo {} orders; sweep {} s per rate; restore {} sagas; failure shares {}/{}; Kafka Streams: -Xmx{java_heap}, record cache {} bytes, RocksDB budget {} bytes.\n",
        args.repeat, args.partitions, args.isolated_sagas, args.orders, args.sweep_seconds,
        args.restore_sagas, args.payment_failure_share, args.inventory_failure_share,
        args.ks_cache_bytes, args.ks_rocksdb_budget_bytes
    ));
    let empty = BTreeMap::new();
    let backlog_rows: &[(&str, Metric)] = &[
        ("sagas/s", |f| f.sagas_per_s),
        ("input records/s", |f| f.records_per_s),
        ("CPU s per 1,000 sagas (window)", |f| f.cpu_per_1000),
        ("peak RSS (MiB)", |f| f.peak_rss_mib),
    ];
    table(
        &mut out,
        "isolated orchestrator",
        results.get("isolated").unwrap_or(&empty),
        backlog_rows,
    );
    table(
        &mut out,
        "full pipeline, backlog",
        results.get("throughput").unwrap_or(&empty),
        backlog_rows,
    );
    table(
        &mut out,
        "restore",
        results.get("restore").unwrap_or(&empty),
        &[
            ("seconds from start to running", |f| f.total_s),
            ("of which start and group join", |f| f.join_s),
            ("of which restoration", |f| f.restore_s),
            ("CPU s", |f| f.cpu_s),
            ("peak RSS (MiB)", |f| f.peak_rss_mib),
        ],
    );
    if !sweep.is_empty() {
        out.push_str("\n| full pipeline at a fixed rate | engine | kept up | orders/s produced | sagas/s | p50 (ms) | p99 (ms) | CPU s per 1,000 sagas | RSS (MiB) | invalid |\n|---|---|---|---|---|---|---|---|---|---|\n");
        for ((rate, engine), runs) in &sweep {
            let col = |f: Metric| spread(&runs.iter().map(f).collect::<Vec<_>>());
            out.push_str(&format!(
                "| {rate}/s | {} | {} of {} | {} | {} | {} | {} | {} | {} | {} |\n",
                engine.name(),
                runs.iter().filter(|f| f.kept_up).count(),
                runs.len(),
                col(|f| f.produced_per_s),
                col(|f| f.sagas_per_s),
                col(|f| f.p50_ms),
                col(|f| f.p99_ms),
                col(|f| f.cpu_per_1000),
                col(|f| f.peak_rss_mib),
                invalid(runs)
            ));
        }
        for &engine in &engines {
            // Sustained: kept up in most repetitions.
            let best = sweep
                .iter()
                .filter(|((_, e), runs)| {
                    *e == engine && runs.iter().filter(|f| f.kept_up).count() * 2 > args.repeat
                })
                .map(|((rate, _), _)| *rate)
                .max();
            out.push_str(&format!(
                "\nHighest rate sustained by {}: {}.",
                engine.name(),
                best.map_or("none of those tried".into(), |r| format!("{r}/s"))
            ));
        }
        out.push('\n');
    }
    let ours = results
        .get("throughput")
        .and_then(|r| r.get(&Engine::SagaStreams))
        .map(|runs| median(runs.iter().map(|f| f.sagas_per_s)));
    for (name, runs) in [
        (
            "echo pipeline (stateless, exactly-once, same hops)",
            &echoes,
        ),
        ("exactly-once pass-through, one process", &ceilings),
    ] {
        if runs.is_empty() {
            continue;
        }
        let col = |f: Metric| spread(&runs.iter().map(f).collect::<Vec<_>>());
        out.push_str(&format!(
            "\n| {name} | |\n|---|---|\n| sagas/s | {} |\n| CPU s per 1,000 sagas (orchestrator) | {} |\n| peak RSS (MiB) | {} |\n",
            col(|f| f.sagas_per_s),
            col(|f| f.cpu_per_1000),
            col(|f| f.peak_rss_mib)
        ));
        if let Some(ours) = ours {
            out.push_str(&format!(
                "| saga-streams full pipeline / this | {:.2} |\n",
                ours / median(runs.iter().map(|f| f.sagas_per_s))
            ));
        }
    }
    print!("{out}");
    if let Some(path) = &args.record_into {
        record_into(path, &out);
    }
}

/// Replaces the block between the bench markers of `path` with `table`, the command and the date.
fn record_into(path: &PathBuf, table: &str) {
    let (begin, end) = ("<!-- bench-saga:begin -->", "<!-- bench-saga:end -->");
    let text = std::fs::read_to_string(path).expect("reading the results file");
    let (Some(b), Some(e)) = (text.find(begin), text.find(end)) else {
        eprintln!(
            "{} has no {begin} ... {end} block; not written",
            path.display()
        );
        return;
    };
    // scripts/bench names the command as it was typed.
    let command = std::env::var("BENCH_COMMAND").unwrap_or_else(|_| {
        let args: Vec<String> = std::env::args().collect();
        args.join(" ")
    });
    let date = humantime::format_rfc3339_seconds(std::time::SystemTime::now()).to_string();
    let block = format!(
        "{begin}\nCommand ({}):\n\n    {command}\n{table}\n",
        &date[..10]
    );
    let text = format!("{}{block}{}", &text[..b], &text[e..]);
    std::fs::write(path, text).expect("writing the results file");
}
