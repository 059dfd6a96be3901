//! A keyed counter on the streams runtime, used by the runtime's integration tests and
//! benchmarks. It exercises the whole processor API: state get/put/delete/prefix scan, outputs
//! with headers, and wall-clock punctuation.
//!
//! For each input record with key K and value V it increments `counts[K]` and sends
//! `K -> "V:<count>"` to the output topic. A record whose value starts with `fail-once:` makes
//! `process` fail, after its state write and output, the first time this process sees it (the
//! cycle aborts and the record is processed again), which is how tests inject an abort. Every
//! `--punctuate-ms` it writes the number of distinct keys to `meta["keys"]` (a prefix scan) and,
//! when it changed and a topic is named with `--stats`, sends it there keyed
//! `task-<partition>@<instance-id>` (tests tell which instance wrote it).
//!
//!     cargo run --example counter -- --bootstrap 127.0.0.1:19092 --application-id app \
//!         --instance-id a --state-dir /tmp/state --input in1,in2 --output out

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use clap::Parser;
use saga_streams::runtime::{
    run, Guarantee, InputRecord, OutputRecord, Processor, ProcessorContext, ProcessorError,
    RuntimeConfig, Shutdown,
};
use saga_streams::telemetry::{init_logging, LogFormat};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    #[arg(long)]
    application_id: String,
    #[arg(long)]
    instance_id: String,
    #[arg(long)]
    state_dir: PathBuf,
    /// Comma-separated input topics (co-partitioned).
    #[arg(long, value_delimiter = ',')]
    input: Vec<String>,
    #[arg(long)]
    output: String,
    /// `IN=OUT`: in pass-through, records of input topic IN go to OUT instead of `--output`
    /// (repeatable; the benchmark's echo pipeline routes each saga topic to the next).
    #[arg(long = "route", value_parser = parse_route)]
    routes: Vec<(String, String)>,
    #[arg(long)]
    stats: Option<String>,
    #[arg(long, default_value_t = 100)]
    commit_interval_ms: u64,
    #[arg(long, default_value_t = 500)]
    punctuate_ms: u64,
    #[arg(long, value_enum, default_value = "exactly-once")]
    guarantee: Guarantee,
    #[arg(long, default_value = "consumer")]
    group_protocol: String,
    /// `count` (the keyed counter) or `passthrough` (forward each record unchanged, no state):
    /// the stateless transactional ceiling the benchmark compares against.
    #[arg(long, value_enum, default_value = "count")]
    mode: Mode,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum Mode {
    Count,
    Passthrough,
}

fn parse_route(text: &str) -> Result<(String, String), String> {
    text.split_once('=')
        .map(|(i, o)| (i.to_string(), o.to_string()))
        .ok_or_else(|| format!("expected IN=OUT, got '{text}'"))
}

/// Forwards each record to its input topic's route or else the output topic, same key, value,
/// headers and partition.
struct PassThrough {
    output: String,
    routes: Arc<HashMap<String, String>>,
}

impl Processor for PassThrough {
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
    ) -> Result<(), ProcessorError> {
        ctx.send(OutputRecord {
            topic: self
                .routes
                .get(&record.topic)
                .unwrap_or(&self.output)
                .clone(),
            partition: Some(record.partition),
            key: record.key.clone(),
            value: record.value.clone(),
            headers: record.headers.clone(),
            timestamp_ms: None,
        });
        Ok(())
    }
}

struct Counter {
    instance_id: String,
    output: String,
    stats: Option<String>,
    punctuate: Duration,
    failed_once: HashSet<Vec<u8>>,
}

impl Processor for Counter {
    fn init(&mut self, ctx: &mut ProcessorContext<'_>) -> Result<(), ProcessorError> {
        ctx.schedule_punctuation(self.punctuate);
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
    ) -> Result<(), ProcessorError> {
        let key = record.key.clone().unwrap_or_default();
        let value = record.value.clone().unwrap_or_default();
        let mut counts = ctx.store("counts")?;
        let count = counts
            .get(&key)?
            .map(|b| String::from_utf8_lossy(&b).parse::<u64>().unwrap_or(0))
            .unwrap_or(0)
            + 1;
        counts.put(&key, count.to_string().as_bytes());
        let mut payload = value.clone();
        payload.extend_from_slice(format!(":{count}").as_bytes());
        let mut out =
            OutputRecord::new(self.output.clone(), key, payload).with_partition(record.partition);
        if let Some(correlation) = record.header("X-Correlation-ID") {
            out = out.with_header("X-Correlation-ID", correlation.to_vec());
        }
        ctx.send(out);
        // The injected failure comes after a state write and an output, so the abort has both to
        // take back.
        if value.starts_with(b"fail-once:") && self.failed_once.insert(value) {
            return Err(ProcessorError(format!(
                "injected failure at {}[{}]@{}",
                record.topic, record.partition, record.offset
            )));
        }
        Ok(())
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        _now: SystemTime,
    ) -> Result<(), ProcessorError> {
        // Counts distinct keys up to a million (a test subject, not a production pattern).
        let keys = ctx.store("counts")?.prefix(b"", 1_000_000)?.len();
        let mut meta = ctx.store("meta")?;
        let previous = meta.get(b"keys")?;
        let current = keys.to_string().into_bytes();
        if previous.as_deref() == Some(current.as_slice()) {
            return Ok(());
        }
        if keys == 0 {
            meta.delete(b"keys");
        } else {
            meta.put(b"keys", &current);
        }
        if let Some(stats) = &self.stats {
            let partition = ctx.partition();
            ctx.send(
                OutputRecord::new(
                    stats.clone(),
                    format!("task-{partition}@{}", self.instance_id),
                    current,
                )
                .with_partition(partition),
            );
        }
        Ok(())
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    let json = std::env::var("SAGA_STREAMS_LOG_FORMAT").is_ok_and(|f| f == "json");
    init_logging(if json {
        LogFormat::Json
    } else {
        LogFormat::Pretty
    });
    if let Err(e) = saga_streams::runtime::failpoints::setup_from_env() {
        eprintln!("counter: {e}");
        return std::process::ExitCode::FAILURE;
    }
    let mut config = RuntimeConfig::new(
        &args.application_id,
        &args.instance_id,
        &args.bootstrap,
        &args.state_dir,
    );
    config.input_topics = args.input.clone();
    config.stores = match args.mode {
        Mode::Count => vec!["counts".to_string(), "meta".to_string()],
        Mode::Passthrough => Vec::new(),
    };
    config.commit_interval = Duration::from_millis(args.commit_interval_ms);
    config.guarantee = args.guarantee;
    config.group_protocol = args.group_protocol.clone();
    let output = args.output.clone();
    let stats = args.stats.clone();
    let punctuate = Duration::from_millis(args.punctuate_ms);
    let mode = args.mode;
    let instance_id = args.instance_id.clone();
    let routes: Arc<HashMap<String, String>> = Arc::new(args.routes.iter().cloned().collect());
    let supplier = Arc::new(move |_partition: i32| match mode {
        Mode::Count => Box::new(Counter {
            instance_id: instance_id.clone(),
            output: output.clone(),
            stats: stats.clone(),
            punctuate,
            failed_once: HashSet::new(),
        }) as Box<dyn Processor>,
        Mode::Passthrough => Box::new(PassThrough {
            output: output.clone(),
            routes: routes.clone(),
        }),
    });
    let shutdown = Shutdown::new();
    if let Err(e) = shutdown.on_signals() {
        eprintln!("counter: cannot install signal handlers: {e}");
        return std::process::ExitCode::FAILURE;
    }
    match run(config, supplier, shutdown) {
        Ok(()) => {
            tracing::info!("stopped cleanly");
            std::process::ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("counter: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}
