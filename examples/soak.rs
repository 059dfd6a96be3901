//! The soak: the order saga (several orchestrator instances and both participants, each a
//! `saga-streams` process) under a steady load for a given time, with random real faults:
//! instance SIGKILLs (restarted at once), instance freezes (SIGSTOP) longer than the step timeouts
//! or than the group session timeout, broker restarts (SIGKILL, same data) and broker freezes.
//! At the end it waits for every order's outcome, audits every topic `read_committed` and prints
//! the counts of each fault and of violations. Exit code 0 only when every order has exactly one
//! outcome and the audit found no violation.
//!
//!     scripts/soak --duration 30m          # the long run recorded in RELIABILITY.md
//!     scripts/soak --duration 2m           # a short one (CI runs tests/soak.rs)
//!
//! The broker faults use `scripts/stack` (restart kafka --kill, pause/resume kafka): run it on the
//! local stack, never against a shared broker.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use clap::Parser;
use saga_streams::codec::Codec;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::{self, audit, load};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    /// How long orders are produced (and faults injected).
    #[arg(long, default_value = "2m", value_parser = humantime::parse_duration)]
    duration: Duration,
    /// Orders per second.
    #[arg(long, default_value_t = 20.0)]
    rate: f64,
    /// Orchestrator instances.
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Partitions of every topic.
    #[arg(long, default_value_t = 6)]
    partitions: i32,
    /// Time between two faults.
    #[arg(long, default_value = "15s", value_parser = humantime::parse_duration)]
    fault_every: Duration,
    /// The faults to draw from (comma separated): kill, freeze, broker-restart, broker-freeze.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "kill,freeze,broker-restart,broker-freeze"
    )]
    faults: Vec<String>,
    /// Inject each kind of fault of `--faults` once, in order, before drawing at random (a short
    /// run then still meets every kind).
    #[arg(long)]
    cover: bool,
    /// The step timeout of both steps.
    #[arg(long, default_value = "5s", value_parser = humantime::parse_duration)]
    step_timeout: Duration,
    /// A freeze of an instance lasts past the group session timeout (45 s) every other time
    /// (the first one included),
    /// else past the step timeout.
    #[arg(long, default_value = "50s", value_parser = humantime::parse_duration)]
    long_freeze: Duration,
    /// How long the broker stays frozen (past the 10 s transaction timeout).
    #[arg(long, default_value = "12s", value_parser = humantime::parse_duration)]
    broker_freeze: Duration,
    /// How long to wait, after the load, for every order's outcome.
    #[arg(long, default_value = "6m", value_parser = humantime::parse_duration)]
    drain: Duration,
    /// Seed of the fault schedule (default: from the clock); printed so a run can be repeated.
    #[arg(long)]
    seed: Option<u64>,
    /// The `saga-streams` binary (default: the one built beside this example).
    #[arg(long)]
    bin: Option<PathBuf>,
    /// Where state and logs go (default: a fresh directory under the system temp dir).
    #[arg(long)]
    work_dir: Option<PathBuf>,
}

/// xorshift64*: a reproducible fault schedule from one seed.
struct Rng(u64);

impl Rng {
    fn below(&mut self, bound: usize) -> usize {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        (self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 33) as usize % bound.max(1)
    }
}

/// One `saga-streams` child process and how to start it again.
struct Member {
    name: String,
    args: Vec<String>,
    log: PathBuf,
    child: Child,
    frozen_until: Option<Instant>,
}

impl Member {
    fn spawn(bin: &Path, name: &str, args: Vec<String>, dir: &Path) -> Result<Self, String> {
        let log = dir.join(format!("{name}.log"));
        let child = start(bin, &args, &log)?;
        Ok(Self {
            name: name.to_string(),
            args,
            log,
            child,
            frozen_until: None,
        })
    }

    fn signal(&self, signal: &str) {
        let _ = Command::new("kill")
            .args([signal, &self.child.id().to_string()])
            .status();
    }

    fn kill_and_restart(&mut self, bin: &Path) -> Result<(), String> {
        let _ = self.child.kill();
        let _ = self.child.wait();
        self.frozen_until = None;
        self.child = start(bin, &self.args, &self.log)?;
        Ok(())
    }
}

fn start(bin: &Path, args: &[String], log: &Path) -> Result<Child, String> {
    let file = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .map_err(|e| format!("{}: {e}", log.display()))?;
    Command::new(bin)
        .args(args)
        .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
        .stdout(Stdio::null())
        .stderr(file)
        .spawn()
        .map_err(|e| format!("starting {}: {e}", bin.display()))
}

/// Produces `orders` OrderCreated events at `rate` per second, a second's worth at a time. The
/// load is a client of the broker like any service: after a broker restart or freeze librdkafka's
/// producer can stay stuck with undelivered messages, so a chunk that is not delivered within a
/// minute is sent again through a new producer (the same orders: the orchestrator ignores a start
/// event for a saga that exists, and the audit counts each order once).
fn produce_orders(
    bootstrap: &str,
    def: &SagaDefinition,
    codec: &Codec,
    orders: u64,
    rate: f64,
    id_prefix: &str,
) -> Result<u64, String> {
    use rdkafka::config::ClientConfig;
    use rdkafka::message::{Header, OwnedHeaders};
    use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
    let new_producer = || -> Result<BaseProducer, String> {
        ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("message.timeout.ms", "300000")
            .create()
            .map_err(|e| format!("load producer: {e}"))
    };
    let mut producer = new_producer()?;
    let chunk = rate.ceil().max(1.0) as u64;
    let started = Instant::now();
    let mut n = 0;
    while n < orders {
        let upto = (n + chunk).min(orders);
        let mut records = Vec::new();
        for i in n..upto {
            let saga_id = format!("{id_prefix}{i}");
            let serde_json::Value::Object(map) = load::order_created(def, &saga_id) else {
                continue;
            };
            let correlation = map
                .get("correlation_id")
                .and_then(serde_json::Value::as_str)
                .unwrap_or_default()
                .to_string();
            let body = codec.write(&def.start_topic, &def.start_event, map, true)?;
            records.push((saga_id, body, correlation));
        }
        for attempt in 0.. {
            for (saga_id, body, correlation) in &records {
                let headers = OwnedHeaders::new().insert(Header {
                    key: "X-Correlation-ID",
                    value: Some(correlation.as_str()),
                });
                let mut record = BaseRecord::to(&def.start_topic)
                    .key(saga_id.as_str())
                    .payload(body.as_slice())
                    .headers(headers);
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
            if producer.flush(Duration::from_secs(60)).is_ok() {
                break;
            }
            if attempt >= 5 {
                return Err(format!(
                    "orders {n}..{upto} not delivered after {attempt} producers"
                ));
            }
            println!("soak: load: orders {n}..{upto} stuck for a minute; sending them again through a new producer");
            producer = new_producer()?;
        }
        n = upto;
        let due = started + Duration::from_secs_f64(n as f64 / rate);
        if let Some(wait) = due.checked_duration_since(Instant::now()) {
            std::thread::sleep(wait);
        }
    }
    Ok(orders)
}

/// The checkout whose scripts and topology the soak uses: the working directory when it is one
/// (`scripts/soak` runs from it; a build may come from a cache shared with another checkout),
/// else the one the example was built from.
fn project_dir() -> PathBuf {
    std::env::current_dir()
        .ok()
        .filter(|dir| dir.join("topologies/order_saga.yaml").is_file())
        .unwrap_or_else(|| PathBuf::from(env!("CARGO_MANIFEST_DIR")))
}

fn stack(args: &[&str]) -> Result<(), String> {
    let script = project_dir().join("scripts/stack");
    let status = Command::new(&script)
        .args(args)
        .stderr(Stdio::null())
        .status()
        .map_err(|e| format!("{}: {e}", script.display()))?;
    if status.success() {
        Ok(())
    } else {
        Err(format!("scripts/stack {} failed: {status}", args.join(" ")))
    }
}

fn main() -> std::process::ExitCode {
    let args = Args::parse();
    match soak(&args) {
        Ok(true) => std::process::ExitCode::SUCCESS,
        Ok(false) => std::process::ExitCode::FAILURE,
        Err(e) => {
            eprintln!("soak: error: {e}");
            std::process::ExitCode::FAILURE
        }
    }
}

fn soak(args: &Args) -> Result<bool, String> {
    let seed = args.seed.unwrap_or_else(|| {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(1, |d| d.as_nanos() as u64)
            | 1
    });
    let mut rng = Rng(seed);
    let bin = match &args.bin {
        Some(bin) => bin.clone(),
        None => std::env::current_exe()
            .map_err(|e| e.to_string())?
            .parent()
            .and_then(Path::parent)
            .map(|dir| dir.join("saga-streams"))
            .ok_or("cannot find the saga-streams binary; pass --bin")?,
    };
    let run_id = uuid::Uuid::new_v4().simple().to_string()[..8].to_string();
    let dir = match &args.work_dir {
        Some(dir) => dir.clone(),
        None => std::env::temp_dir().join(format!("saga-streams-soak-{run_id}")),
    };
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let topology = project_dir().join("topologies/order_saga.yaml");
    let prefix = format!("soak-{run_id}.");
    let def = SagaDefinition::load(&topology)
        .map_err(|e| e.to_string())?
        .with_topic_prefix(&prefix);
    sim::create_topics(&args.bootstrap, &def, args.partitions).map_err(|e| e.to_string())?;
    let codec = Arc::new(
        Codec::new(
            &def.topic_set(),
            None,
            std::slice::from_ref(&def.start_topic),
        )
        .map_err(|e| e.to_string())?,
    );
    println!(
        "soak: seed {seed}, {} instances, {} orders/s for {}, a fault every {}, topics {prefix}*, logs in {}",
        args.instances,
        args.rate,
        humantime::format_duration(args.duration),
        humantime::format_duration(args.fault_every),
        dir.display()
    );

    let timeout = humantime::format_duration(args.step_timeout).to_string();
    let common = |command: &[&str]| -> Vec<String> {
        let mut v: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        for (k, val) in [
            ("--bootstrap", args.bootstrap.as_str()),
            ("--topology", topology.to_str().unwrap_or_default()),
            ("--topic-prefix", prefix.as_str()),
            ("--step-timeout", &format!("payment={timeout}")),
            ("--step-timeout", &format!("inventory={timeout}")),
        ] {
            v.push(k.to_string());
            v.push(val.to_string());
        }
        v
    };
    let mut participants = Vec::new();
    for step in ["payments", "inventory"] {
        let mut a = common(&["simulate", step]);
        a.extend(
            [
                "--failure-share",
                "0.05",
                "--no-reply-share",
                "0.01",
                "--instance-id",
                "sim",
                "--state-dir",
            ]
            .map(String::from),
        );
        a.push(dir.join(format!("sim-{step}")).display().to_string());
        participants.push(Member::spawn(&bin, &format!("sim-{step}"), a, &dir)?);
    }
    let mut instances = Vec::new();
    for i in 0..args.instances {
        let name = format!("orchestrator-{i}");
        let mut a = common(&["run"]);
        a.extend(
            [
                "--instance-id",
                &name,
                "--metrics-addr",
                "127.0.0.1:0",
                "--state-dir",
            ]
            .map(String::from),
        );
        a.push(dir.join(format!("state-{name}")).display().to_string());
        instances.push(Member::spawn(&bin, &name, a, &dir)?);
    }

    let orders = (args.rate * args.duration.as_secs_f64()).ceil() as u64;
    let load = {
        let (bootstrap, def, codec) = (args.bootstrap.clone(), def.clone(), codec.clone());
        let (rate, id_prefix) = (args.rate, format!("soak-{run_id}-"));
        std::thread::spawn(move || {
            produce_orders(&bootstrap, &def, &codec, orders, rate, &id_prefix)
        })
    };

    let started = Instant::now();
    let mut faults: BTreeMap<&'static str, u64> = BTreeMap::new();
    let mut freezes = 0u64;
    let mut broker_frozen_until: Option<Instant> = None;
    let mut drawn = 0usize;
    let mut next_fault = Instant::now() + args.fault_every;
    // Faults stop a little before the load ends, so the last one is over when it does.
    let faults_until = started + args.duration.saturating_sub(args.fault_every);
    while !load.is_finished() {
        std::thread::sleep(Duration::from_millis(200));
        let now = Instant::now();
        for member in &mut instances {
            if member.frozen_until.is_some_and(|at| now >= at) {
                member.signal("-CONT");
                member.frozen_until = None;
                println!(
                    "soak: {:>5.0}s thawed {}",
                    started.elapsed().as_secs_f64(),
                    member.name
                );
            }
        }
        if broker_frozen_until.is_some_and(|at| now >= at) {
            stack(&["resume", "kafka"])?;
            broker_frozen_until = None;
            next_fault = next_fault.max(now + args.fault_every);
            println!(
                "soak: {:>5.0}s thawed the broker",
                started.elapsed().as_secs_f64()
            );
        }
        if now < next_fault || now >= faults_until || broker_frozen_until.is_some() {
            continue;
        }
        next_fault = now + args.fault_every;
        let fault = match args.faults.get(drawn) {
            Some(fault) if args.cover => fault.as_str(),
            _ => args.faults[rng.below(args.faults.len())].as_str(),
        };
        drawn += 1;
        let live: Vec<usize> = (0..instances.len())
            .filter(|i| instances[*i].frozen_until.is_none())
            .collect();
        let elapsed = started.elapsed().as_secs_f64();
        match fault {
            "kill" if !live.is_empty() => {
                let member = &mut instances[live[rng.below(live.len())]];
                member.kill_and_restart(&bin)?;
                *faults.entry("instance kills").or_default() += 1;
                println!("soak: {elapsed:>5.0}s SIGKILL {} (restarted)", member.name);
            }
            // Always leave one instance unfrozen, so the group has someone to move tasks to.
            "freeze" if live.len() > 1 => {
                freezes += 1;
                let length = if freezes % 2 == 1 {
                    args.long_freeze
                } else {
                    args.step_timeout + Duration::from_secs(3)
                };
                let member = &mut instances[live[rng.below(live.len())]];
                member.signal("-STOP");
                member.frozen_until = Some(now + length);
                *faults.entry("instance freezes").or_default() += 1;
                println!(
                    "soak: {elapsed:>5.0}s SIGSTOP {} for {}",
                    member.name,
                    humantime::format_duration(length)
                );
            }
            "broker-restart" => {
                stack(&["restart", "kafka", "--kill"])?;
                *faults.entry("broker restarts").or_default() += 1;
                println!("soak: {elapsed:>5.0}s broker SIGKILLed and restarted");
            }
            "broker-freeze" => {
                stack(&["pause", "kafka"])?;
                broker_frozen_until = Some(now + args.broker_freeze);
                *faults.entry("broker freezes").or_default() += 1;
                println!(
                    "soak: {elapsed:>5.0}s broker frozen for {}",
                    humantime::format_duration(args.broker_freeze)
                );
            }
            _ => {}
        }
    }
    for member in &mut instances {
        if member.frozen_until.take().is_some() {
            member.signal("-CONT");
        }
    }
    if broker_frozen_until.is_some() {
        stack(&["resume", "kafka"])?;
    }
    let sent = load
        .join()
        .map_err(|_| "the load thread panicked".to_string())??;
    println!(
        "soak: {sent} orders produced; waiting up to {} for their outcomes",
        humantime::format_duration(args.drain)
    );

    let deadline = Instant::now() + args.drain;
    let report = loop {
        let report = audit::audit(&args.bootstrap, &def, &codec, Duration::from_secs(120))
            .map_err(|e| e.to_string())?;
        // A compensation can follow its saga's outcome (a payment confirmed after its step
        // timed out is refunded then): a refund still owed while an instance catches up is not
        // a violation yet. Judged when every saga has its outcome and the audit is clean, or at
        // the deadline.
        let settled = report.without_outcome == 0 && report.sagas >= sent;
        if settled && report.is_clean() || Instant::now() >= deadline {
            break report;
        }
        if settled {
            println!(
                "soak: every saga has its outcome; {} findings so far, waiting for late compensations",
                report.violations.len()
            );
        } else {
            println!(
                "soak: {} of {} sagas without an outcome yet",
                report.without_outcome, report.sagas
            );
        }
        std::thread::sleep(Duration::from_secs(10));
    };
    for member in instances.iter_mut().chain(participants.iter_mut()) {
        member.signal("-TERM");
    }
    // SIGTERM must end every process within seconds, whatever state its clients are in.
    let mut hung = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(30);
    for member in instances.iter_mut().chain(participants.iter_mut()) {
        loop {
            match member.child.try_wait() {
                Ok(Some(_)) | Err(_) => break,
                Ok(None) if Instant::now() >= deadline => {
                    hung.push(member.name.clone());
                    let _ = member.child.kill();
                    let _ = member.child.wait();
                    break;
                }
                Ok(None) => std::thread::sleep(Duration::from_millis(100)),
            }
        }
    }

    println!("{}", report.table());
    for v in report.violations.iter().take(20) {
        println!("violation: {v}");
    }
    println!("soak: faults:");
    for (fault, count) in &faults {
        println!("soak:   {fault:<17} {count}");
    }
    let missing = (sent).saturating_sub(report.sagas) + report.without_outcome;
    println!(
        "soak: {} orders, {} without an outcome, {} violations",
        sent,
        missing,
        report.violations.len()
    );
    if !hung.is_empty() {
        println!(
            "soak: still running 30 s after SIGTERM: {}",
            hung.join(", ")
        );
    }
    let passed = missing == 0 && report.is_clean() && hung.is_empty();
    if passed {
        println!("soak: PASSED (seed {seed})");
    } else {
        println!("soak: FAILED (seed {seed}; logs in {})", dir.display());
    }
    Ok(passed)
}
