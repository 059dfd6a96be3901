//! Scale-out without pauses, measured: `--instances` orchestrators share `--partitions` tasks
//! holding `--sagas` sagas (finished sagas written into the changelog beforehand, restored at
//! start), under a steady load (`saga-streams load` at `--rate`, both participants simulated).
//! Run through `scripts/bench-failover`. For each standby count in `--standbys`:
//!
//! - kill: one instance is SIGKILLed; per moved task, the time from the kill to its first output,
//!   split into detection (kill to the survivors' assignment), restoration (assignment to
//!   `restore finished`) and the rest (to the first output); the longest gap in the outputs of
//!   the tasks that did not move (the survivors' own tasks must not pause);
//! - rolling: every instance in turn gets SIGTERM and is started again with its id and state;
//!   the longest gap in each task's outputs while it happens;
//! - scale-out: with one instance stopped and its state removed, it is started again (a new
//!   instance with no local state); the longest gap of each task it takes.
//!
//! Gaps are measured on the outputs' record timestamps (`read_committed`); at the load's rate a
//! task writes an output every few tens of milliseconds, so a gap well above that is a pause.
//! Every run is audited (`read_committed`); a violation makes the run invalid.

use std::collections::{BTreeMap, BTreeSet};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use clap::Parser;
use saga_streams::codec::Codec;
use saga_streams::saga::processor::saga_key;
use saga_streams::saga::query::Partitioner;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::{self, TopicScanner};
use serde_json::Value;

#[path = "common/bench_kit.rs"]
mod bench_kit;

use bench_kit::{
    bulk_produce, create_changelog, free_port, fresh_saga, now_ms, release_dir,
    saga_streams_template, stored_bytes, Process,
};

#[derive(Debug, Parser)]
struct Args {
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    bootstrap: String,
    #[arg(long, default_value = "topologies/order_saga.yaml")]
    topology: PathBuf,
    #[arg(long, default_value_t = 12)]
    partitions: i32,
    #[arg(long, default_value_t = 3)]
    instances: usize,
    /// Sagas in the stores before the load starts.
    #[arg(long, default_value_t = 1_000_000)]
    sagas: u64,
    /// Orders per second of the steady load.
    #[arg(long, default_value_t = 100.0)]
    rate: f64,
    /// Standby counts to measure, comma separated.
    #[arg(long, default_value = "0,1", value_delimiter = ',')]
    standbys: Vec<usize>,
    /// Modes, comma separated: kill, rolling, scale-out.
    #[arg(long, default_value = "kill,rolling,scale-out", value_delimiter = ',')]
    modes: Vec<String>,
    /// The group's session timeout (failure detection after a kill).
    #[arg(long, default_value = "10s")]
    session_timeout: String,
    #[arg(long, default_value = "1s")]
    heartbeat_interval: String,
    /// Run the orchestrators as static members (`--static-membership`).
    #[arg(long)]
    static_membership: bool,
}

/// A step waits this long for a reply: no saga times out because of a pause being measured.
const STEP_TIMEOUT: &str = "120s";
const SETTLE_LIMIT: Duration = Duration::from_secs(600);

struct Instance {
    id: String,
    port: u16,
    state: PathBuf,
    log: PathBuf,
    process: Option<Process>,
}

struct Cluster<'a> {
    args: &'a Args,
    standbys: usize,
    prefix: String,
    app: String,
    def: SagaDefinition,
    dir: tempfile::TempDir,
    instances: Vec<Instance>,
    participants: Vec<Process>,
    load: Option<Process>,
    outputs: Arc<Mutex<Vec<(i32, i64)>>>,
    watching: Arc<AtomicBool>,
    watcher: Option<std::thread::JoinHandle<()>>,
}

fn ready(port: u16) -> Option<Value> {
    let out = Command::new("curl")
        .args([
            "-sS",
            "--max-time",
            "2",
            &format!("http://127.0.0.1:{port}/ready"),
        ])
        .output()
        .ok()?;
    serde_json::from_slice(&out.stdout).ok()
}

/// JSON log lines of a file with their time in ms since the epoch.
fn log_lines(path: &PathBuf) -> Vec<(i64, Value)> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| serde_json::from_str::<Value>(l).ok())
        .filter_map(|v| {
            let at = v["timestamp"]
                .as_str()
                .and_then(|t| humantime::parse_rfc3339(t).ok())?
                .duration_since(std::time::UNIX_EPOCH)
                .ok()?
                .as_millis() as i64;
            Some((at, v))
        })
        .collect()
}

impl<'a> Cluster<'a> {
    fn new(args: &'a Args, standbys: usize) -> Cluster<'a> {
        let (prefix, def) =
            fresh_saga(&args.topology, &args.bootstrap, args.partitions, "failover");
        let app = format!("{prefix}orchestrator");
        let dir = tempfile::tempdir().expect("temp dir");
        let instances = (0..args.instances)
            .map(|i| Instance {
                id: format!("o{i}"),
                port: free_port(),
                state: dir.path().join(format!("state-o{i}")),
                log: dir.path().join(format!("o{i}.log")),
                process: None,
            })
            .collect();
        Cluster {
            args,
            standbys,
            prefix,
            app,
            def,
            dir,
            instances,
            participants: Vec::new(),
            load: None,
            outputs: Arc::new(Mutex::new(Vec::new())),
            watching: Arc::new(AtomicBool::new(true)),
            watcher: None,
        }
    }

    fn command(&self, sub: &[&str]) -> Command {
        let mut c = Command::new(release_dir().join("saga-streams"));
        c.args(sub)
            .args(["--bootstrap", &self.args.bootstrap])
            .arg("--topology")
            .arg(&self.args.topology)
            .args(["--topic-prefix", &self.prefix])
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .env("SAGA_STREAMS_LOG_FORMAT", "json");
        c
    }

    /// The sagas, written into the changelog in saga-streams' own format, each on its task's
    /// partition.
    fn seed(&self) {
        let topic = format!("{}-sagas-changelog", self.app);
        create_changelog(&self.args.bootstrap, &topic, self.args.partitions);
        let template = saga_streams_template(&self.def);
        let partitions = self.args.partitions;
        bulk_produce(
            &self.args.bootstrap,
            &[("linger.ms", "20"), ("compression.type", "lz4")],
            self.args.sagas,
            "sagas written",
            |n| {
                let id = format!("s-{n}");
                let partition = Partitioner::ConsistentRandom.partition(id.as_bytes(), partitions);
                (
                    topic.clone(),
                    saga_key(&id),
                    stored_bytes(&template, &id),
                    Some(partition),
                )
            },
        );
    }

    fn start_instance(&mut self, i: usize) {
        let instance = &self.instances[i];
        let mut c = self.command(&["run"]);
        c.args(["--application-id", &self.app])
            .args(["--instance-id", &instance.id])
            .arg("--state-dir")
            .arg(&instance.state)
            .args(["--metrics-addr", &format!("127.0.0.1:{}", instance.port)])
            .args(["--standby-replicas", &self.standbys.to_string()])
            .args(["--session-timeout", &self.args.session_timeout])
            .args(["--heartbeat-interval", &self.args.heartbeat_interval]);
        if self.args.static_membership {
            c.arg("--static-membership");
        }
        for step in &self.def.steps {
            c.args(["--step-timeout", &format!("{}={STEP_TIMEOUT}", step.name)]);
        }
        let log = instance.log.clone();
        self.instances[i].process = Some(Process::spawn_appending(c, log));
    }

    fn start(&mut self) {
        self.seed();
        for step in ["payment", "inventory"] {
            let mut c = self.command(&["simulate", step]);
            c.args(["--failure-share", "0.05"])
                .args(["--instance-id", "bench"])
                .arg("--state-dir")
                .arg(self.dir.path().join(format!("state-{step}")));
            self.participants.push(Process::spawn(
                c,
                self.dir.path().join(format!("{step}.log")),
            ));
        }
        let started = Instant::now();
        for i in 0..self.instances.len() {
            self.start_instance(i);
        }
        self.settle("start");
        eprintln!(
            "  {} instances running {} sagas after {:.1} s",
            self.instances.len(),
            self.args.sagas,
            started.elapsed().as_secs_f64()
        );
        // The outputs, read as they are committed.
        let scanner =
            TopicScanner::new(&self.args.bootstrap, &self.def.output_topics()).expect("scanner");
        let (outputs, watching) = (self.outputs.clone(), self.watching.clone());
        self.watcher = Some(std::thread::spawn(move || {
            let mut batch = Vec::new();
            while watching.load(Ordering::Relaxed) {
                batch.clear();
                if scanner
                    .poll_batch(Duration::from_millis(200), &mut batch)
                    .is_ok()
                {
                    let mut o = outputs.lock().unwrap_or_else(|p| p.into_inner());
                    o.extend(batch.iter().map(|r| (r.partition, r.timestamp_ms)));
                }
            }
        }));
        let mut load = self.command(&["load"]);
        load.args(["--orders", &((self.args.rate * 7200.0) as u64).to_string()])
            .args(["--rate", &self.args.rate.to_string()])
            .args(["--id-prefix", "live-"]);
        self.load = Some(Process::spawn(load, self.dir.path().join("load.log")));
        // Steady state before the first measurement.
        std::thread::sleep(Duration::from_secs(10));
    }

    /// Waits until every task runs on some instance, no instance is restoring, and (with
    /// standbys) every standby is caught up.
    fn settle(&mut self, what: &str) {
        let deadline = Instant::now() + SETTLE_LIMIT;
        loop {
            for instance in &mut self.instances {
                if let Some(p) = &mut instance.process {
                    p.check_alive(&instance.id);
                }
            }
            let states: Vec<Value> = self
                .instances
                .iter()
                .filter(|i| i.process.is_some())
                .filter_map(|i| ready(i.port))
                .collect();
            let running: u64 = states
                .iter()
                .map(|s| s["running_tasks"].as_u64().unwrap_or(0))
                .sum();
            let all_ready =
                states.len() == self.live() && states.iter().all(|s| s["ready"] == true);
            let standby_behind: i64 = states
                .iter()
                .filter_map(|s| s["standby_lag"].as_object())
                .flat_map(|o| o.values().filter_map(Value::as_i64))
                .sum();
            let standby_count: usize = states
                .iter()
                .filter_map(|s| s["standby_lag"].as_object())
                .map(|o| o.len())
                .sum();
            let standbys_ok = self.standbys == 0
                || (standby_count
                    >= self.args.partitions as usize * self.standbys.min(self.live() - 1)
                    && standby_behind < 1_000);
            if all_ready && running == self.args.partitions as u64 && standbys_ok {
                return;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not settled after {} s: {states:?}",
                SETTLE_LIMIT.as_secs()
            );
            std::thread::sleep(Duration::from_millis(250));
        }
    }

    fn live(&self) -> usize {
        self.instances
            .iter()
            .filter(|i| i.process.is_some())
            .count()
    }

    fn partitions_of(&self, i: usize) -> BTreeSet<i32> {
        ready(self.instances[i].port)
            .and_then(|s| {
                s["assigned_partitions"].as_array().map(|a| {
                    a.iter()
                        .filter_map(|p| p.as_i64().map(|p| p as i32))
                        .collect()
                })
            })
            .unwrap_or_default()
    }

    /// The longest gap between consecutive outputs of each partition within `[from, to]`
    /// (the window's edges count as outputs), in ms.
    fn gaps(&self, from: i64, to: i64) -> BTreeMap<i32, i64> {
        let outputs = self.outputs.lock().unwrap_or_else(|p| p.into_inner());
        let mut by_partition: BTreeMap<i32, Vec<i64>> = BTreeMap::new();
        for (p, at) in outputs.iter() {
            if (from..=to).contains(at) {
                by_partition.entry(*p).or_default().push(*at);
            }
        }
        (0..self.args.partitions)
            .map(|p| {
                let mut times = by_partition.remove(&p).unwrap_or_default();
                times.push(from);
                times.push(to);
                times.sort_unstable();
                let gap = times.windows(2).map(|w| w[1] - w[0]).max().unwrap_or(0);
                (p, gap)
            })
            .collect()
    }

    /// Waits until the outputs have been read up to `at` plus a second (the reader is behind
    /// by a commit interval or so).
    fn outputs_through(&self, at: i64) {
        let deadline = Instant::now() + Duration::from_secs(60);
        while Instant::now() < deadline {
            let newest = self
                .outputs
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .iter()
                .map(|(_, t)| *t)
                .max()
                .unwrap_or(0);
            if newest >= at + 1_000 {
                return;
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }

    fn kill(&mut self) -> Vec<(String, f64)> {
        let victim = 0;
        let moved = self.partitions_of(victim);
        let mut process = self.instances[victim].process.take().expect("running");
        let killed = now_ms();
        let _ = process.child.kill();
        let _ = process.child.wait();
        self.settle("after the kill");
        let settled = now_ms();
        self.outputs_through(settled);
        // Per moved task: first output after the kill; assignment and restore from the logs.
        let mut assigned_at = i64::MAX;
        let mut restored_at: BTreeMap<i32, i64> = BTreeMap::new();
        let mut restored_records: BTreeMap<i32, u64> = BTreeMap::new();
        for instance in self.instances.iter().filter(|i| i.process.is_some()) {
            for (at, line) in log_lines(&instance.log) {
                if at < killed {
                    continue;
                }
                match line["message"].as_str() {
                    Some("partitions assigned") => assigned_at = assigned_at.min(at),
                    Some("restore finished") => {
                        if let Some(p) = line["partition"].as_i64() {
                            if moved.contains(&(p as i32)) {
                                restored_at.insert(p as i32, at);
                                restored_records
                                    .insert(p as i32, line["records"].as_u64().unwrap_or(0));
                            }
                        }
                    }
                    _ => {}
                }
            }
        }
        let outputs = self
            .outputs
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone();
        let first_output = |p: i32| {
            outputs
                .iter()
                .filter(|(q, at)| *q == p && *at > killed)
                .map(|(_, at)| *at)
                .min()
        };
        let mut totals = Vec::new();
        let mut restores = Vec::new();
        for p in &moved {
            let first = first_output(*p).unwrap_or(settled);
            totals.push((first - killed) as f64 / 1000.0);
            let restored = restored_at.get(p).copied().unwrap_or(assigned_at);
            restores.push((restored - assigned_at).max(0) as f64 / 1000.0);
        }
        let detection = (assigned_at.min(settled) - killed) as f64 / 1000.0;
        let own = self.gaps(killed - 2_000, settled);
        let own_max = own
            .iter()
            .filter(|(p, _)| !moved.contains(p))
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        let records: u64 = restored_records.values().sum();
        eprintln!(
            "  kill: moved {moved:?}, detection {detection:.2} s, restore {restores:?} s ({records} records), kill to first output {totals:?} s, survivors' longest gap {own_max:.2} s"
        );
        // The instance comes back with its id and state.
        self.start_instance(victim);
        self.settle("after the restart");
        vec![
            ("tasks moved".into(), moved.len() as f64),
            ("detection s".into(), detection),
            ("restoration s per task (max)".into(), max(&restores)),
            (
                "records restored per task (mean)".into(),
                records as f64 / moved.len().max(1) as f64,
            ),
            ("kill to first output s (max)".into(), max(&totals)),
            ("survivors' own tasks, longest gap s".into(), own_max),
        ]
    }

    fn rolling(&mut self) -> Vec<(String, f64)> {
        let started = now_ms();
        let mut per_restart = Vec::new();
        for i in 0..self.instances.len() {
            let t0 = now_ms();
            let process = self.instances[i].process.take().expect("running");
            process.stop();
            self.start_instance(i);
            self.settle("rolling restart");
            let t1 = now_ms();
            self.outputs_through(t1);
            let gap = self.gaps(t0, t1).values().copied().max().unwrap_or(0);
            per_restart.push(gap as f64 / 1000.0);
        }
        let ended = now_ms();
        let gaps: Vec<f64> = self
            .gaps(started, ended)
            .values()
            .map(|g| *g as f64 / 1000.0)
            .collect();
        eprintln!("  rolling: longest gap per restart {per_restart:?} s, per task {gaps:?} s");
        vec![
            ("rolling: longest pause of a task s".into(), max(&gaps)),
            (
                "rolling: median of the tasks' longest pauses s".into(),
                median(&gaps),
            ),
            (
                "rolling: s for the whole restart".into(),
                (ended - started) as f64 / 1000.0,
            ),
        ]
    }

    fn scale_out(&mut self) -> Vec<(String, f64)> {
        let newcomer = self.instances.len() - 1;
        let process = self.instances[newcomer].process.take().expect("running");
        process.stop();
        self.settle("scaled in");
        // A new instance: no local state.
        let _ = std::fs::remove_dir_all(&self.instances[newcomer].state);
        let t0 = now_ms();
        self.start_instance(newcomer);
        self.settle("scale-out");
        let t1 = now_ms();
        self.outputs_through(t1);
        let taken = self.partitions_of(newcomer);
        let gaps = self.gaps(t0, t1);
        let moved: Vec<f64> = taken
            .iter()
            .map(|p| gaps.get(p).copied().unwrap_or(0) as f64 / 1000.0)
            .collect();
        let others = gaps
            .iter()
            .filter(|(p, _)| !taken.contains(p))
            .map(|(_, g)| *g)
            .max()
            .unwrap_or(0) as f64
            / 1000.0;
        eprintln!(
            "  scale-out: the new instance took {taken:?}, their pauses {moved:?} s, others' longest gap {others:.2} s, settled after {:.1} s",
            (t1 - t0) as f64 / 1000.0
        );
        vec![
            ("scale-out: tasks moved".into(), taken.len() as f64),
            (
                "scale-out: longest pause of a moved task s".into(),
                max(&moved),
            ),
            ("scale-out: longest gap of the other tasks s".into(), others),
            ("scale-out: s to settled".into(), (t1 - t0) as f64 / 1000.0),
        ]
    }

    fn finish(mut self) -> usize {
        if let Some(load) = self.load.take() {
            load.stop();
        }
        // Every saga started gets its outcome before the audit.
        let outcomes = TopicScanner::new(
            &self.args.bootstrap,
            &[
                self.def.completed.topic.clone(),
                self.def.cancelled.topic.clone(),
            ],
        )
        .expect("scanner");
        let mut quiet_since = Instant::now();
        let mut batch = Vec::new();
        while quiet_since.elapsed() < Duration::from_secs(15) {
            batch.clear();
            let _ = outcomes.poll_batch(Duration::from_millis(500), &mut batch);
            if !batch.is_empty() {
                quiet_since = Instant::now();
            }
        }
        self.watching.store(false, Ordering::Relaxed);
        if let Some(w) = self.watcher.take() {
            let _ = w.join();
        }
        let report = sim::audit::audit(
            &self.args.bootstrap,
            &self.def,
            &Codec::json(),
            Duration::from_secs(300),
        )
        .expect("audit");
        eprintln!(
            "  audit: {} sagas, {} without outcome, {} violations",
            report.sagas,
            report.without_outcome,
            report.violations.len()
        );
        for v in report.violations.iter().take(5) {
            eprintln!("    {v:?}");
        }
        for instance in &mut self.instances {
            if let Some(p) = instance.process.take() {
                p.stop();
            }
        }
        for p in self.participants.drain(..) {
            p.stop();
        }
        report.violations.len() + report.without_outcome as usize
    }
}

fn max(values: &[f64]) -> f64 {
    values.iter().copied().fold(0.0, f64::max)
}

fn median(values: &[f64]) -> f64 {
    let mut v = values.to_vec();
    v.sort_by(f64::total_cmp);
    v.get(v.len() / 2).copied().unwrap_or(0.0)
}

fn main() {
    let args = Args::parse();
    let mut table: BTreeMap<String, BTreeMap<usize, f64>> = BTreeMap::new();
    let mut order: Vec<String> = Vec::new();
    for &standbys in &args.standbys {
        eprintln!("standby replicas: {standbys}");
        let mut cluster = Cluster::new(&args, standbys);
        cluster.start();
        let mut rows = Vec::new();
        for mode in &args.modes {
            rows.extend(match mode.as_str() {
                "kill" => cluster.kill(),
                "rolling" => cluster.rolling(),
                "scale-out" => cluster.scale_out(),
                other => panic!("unknown mode {other}"),
            });
        }
        let violations = cluster.finish();
        rows.push(("audit violations".into(), violations as f64));
        for (name, value) in rows {
            if !order.contains(&name) {
                order.push(name.clone());
            }
            table.entry(name).or_default().insert(standbys, value);
        }
    }
    println!(
        "{} instances, {} partitions, {} sagas in the stores, {} orders/s, session timeout {}, heartbeat {}{}.\n",
        args.instances,
        args.partitions,
        args.sagas,
        args.rate,
        args.session_timeout,
        args.heartbeat_interval,
        if args.static_membership { ", static membership" } else { "" }
    );
    print!("| figure |");
    for s in &args.standbys {
        print!(" {s} standby |");
    }
    println!();
    print!("|---|");
    for _ in &args.standbys {
        print!("---|");
    }
    println!();
    for name in order {
        print!("| {name} |");
        for s in &args.standbys {
            match table[&name].get(s) {
                Some(v) => print!(" {v:.2} |"),
                None => print!(" - |"),
            }
        }
        println!();
    }
}
