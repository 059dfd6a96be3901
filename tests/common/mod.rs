//! Shared helpers for the integration tests: where the real broker and registry are, and unique
//! names so tests never see each other's topics, groups or transactional ids.
//!
//! A test that needs the broker or the registry fails with a message saying how to start them;
//! it never skips.

#![allow(dead_code)]

pub mod avro_env;
pub mod counter_env;
pub mod saga_env;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

const HOW_TO_START: &str =
    "start the local stack and export its addresses: scripts/stack up && eval \"$(scripts/stack env)\"";

/// The broker's bootstrap address from `KAFKA_BOOTSTRAP`, after checking that it answers a
/// metadata request.
pub fn kafka_bootstrap() -> String {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| panic!("KAFKA_BOOTSTRAP is not set; {HOW_TO_START}"));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("creating a metadata client");
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("the Kafka broker at {bootstrap} does not answer a metadata request ({e}); {HOW_TO_START}");
    }
    bootstrap
}

/// The Confluent-compatible registry URL from `SCHEMA_REGISTRY_URL`, after checking that it
/// lists its subjects.
pub fn schema_registry_url() -> String {
    let url = std::env::var("SCHEMA_REGISTRY_URL")
        .unwrap_or_else(|_| panic!("SCHEMA_REGISTRY_URL is not set; {HOW_TO_START}"));
    let probe = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "5", &format!("{url}/subjects")])
        .output()
        .expect("running curl");
    if !probe.status.success() {
        panic!(
            "the Schema Registry at {url} does not answer ({}); {HOW_TO_START}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
    }
    url
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("creating an admin client")
}

/// Creates a topic and fails the test on any error, including "already exists".
pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let results = admin(bootstrap)
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        if let Err((topic, code)) = result {
            panic!("creating topic {topic} failed: {code}");
        }
    }
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held.
pub fn poll_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

/// A child process running the `counter` example on the real broker, its stderr (JSON log lines)
/// captured to a file. Dropping it kills the process.
pub struct CounterProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

/// Arguments that identify one counter instance.
#[derive(Clone, Debug)]
pub struct CounterArgs {
    pub bootstrap: String,
    pub application_id: String,
    pub instance_id: String,
    pub state_dir: std::path::PathBuf,
    pub inputs: Vec<String>,
    pub output: String,
    pub extra: Vec<String>,
    /// Environment of the child (`SAGA_STREAMS_FAILPOINTS` arms fault injection points).
    pub env: Vec<(String, String)>,
}

fn example_binary(name: &str) -> std::path::PathBuf {
    // Integration tests run from target/<profile>/deps; cargo test builds examples beside them.
    let exe = std::env::current_exe().expect("test binary path");
    let profile_dir = exe
        .parent()
        .and_then(|deps| deps.parent())
        .expect("target profile dir");
    let path = profile_dir.join("examples").join(name);
    assert!(
        path.exists(),
        "example binary {} not built; run `cargo test` without --test filters, or `cargo build --examples` first",
        path.display()
    );
    // `cargo test --test X` does not rebuild examples: refuse to test a stale binary.
    let built = std::fs::metadata(&path).and_then(|m| m.modified()).unwrap();
    let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR"));
    let newest_source = newest_mtime(&root.join("src")).max(newest_mtime(&root.join("examples")));
    assert!(
        newest_source <= built,
        "example binary {} is older than the sources; run `cargo build --examples` (or `cargo test` unfiltered)",
        path.display()
    );
    path
}

fn newest_mtime(dir: &std::path::Path) -> std::time::SystemTime {
    let mut newest = std::time::SystemTime::UNIX_EPOCH;
    for entry in std::fs::read_dir(dir).into_iter().flatten().flatten() {
        let path = entry.path();
        let modified = if path.is_dir() {
            newest_mtime(&path)
        } else {
            entry
                .metadata()
                .and_then(|m| m.modified())
                .unwrap_or(std::time::SystemTime::UNIX_EPOCH)
        };
        newest = newest.max(modified);
    }
    newest
}

impl CounterProcess {
    pub fn spawn(args: &CounterArgs, log_name: &str) -> Self {
        let log = args.state_dir.join(format!("{log_name}.log"));
        std::fs::create_dir_all(&args.state_dir).unwrap();
        let stderr = std::fs::File::create(&log).unwrap();
        let child = std::process::Command::new(example_binary("counter"))
            .args(["--bootstrap", &args.bootstrap])
            .args(["--application-id", &args.application_id])
            .args(["--instance-id", &args.instance_id])
            .arg("--state-dir")
            .arg(&args.state_dir)
            .args(["--input", &args.inputs.join(",")])
            .args(["--output", &args.output])
            .args(&args.extra)
            .envs(args.env.iter().map(|(k, v)| (k.as_str(), v.as_str())))
            .env("SAGA_STREAMS_LOG_FORMAT", "json")
            .env("RUST_LOG", "info,librdkafka=warn,rdkafka=warn")
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning the counter example");
        Self { child, log }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; returns the exit status.
    pub fn sigterm(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        unsafe_free_sigterm(self.child.id());
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        std::fs::read_to_string(&self.log)
            .unwrap_or_default()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

fn unsafe_free_sigterm(pid: u32) {
    let _ = std::process::Command::new("kill")
        .args(["-TERM", &pid.to_string()])
        .status();
}

impl Drop for CounterProcess {
    fn drop(&mut self) {
        self.sigkill();
    }
}

/// A read_committed (or read_uncommitted) reader of whole topics.
pub struct TopicReader {
    consumer: BaseConsumer,
}

impl TopicReader {
    pub fn new(bootstrap: &str, topics: &[&str], isolation: &str) -> Self {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .set("group.id", unique("reader"))
            .set("enable.auto.commit", "false")
            .set("auto.offset.reset", "earliest")
            .set("isolation.level", isolation)
            .create()
            .expect("creating a reader");
        let metadata = consumer
            .fetch_metadata(None, Duration::from_secs(10))
            .expect("metadata");
        let mut assignment = rdkafka::TopicPartitionList::new();
        for topic in topics {
            let t = metadata
                .topics()
                .iter()
                .find(|t| t.name() == *topic)
                .unwrap_or_else(|| panic!("topic {topic} missing"));
            for p in t.partitions() {
                assignment
                    .add_partition_offset(topic, p.id(), rdkafka::Offset::Beginning)
                    .unwrap();
            }
        }
        consumer.assign(&assignment).unwrap();
        Self { consumer }
    }

    /// Appends (topic, partition, key, value) of every record available within `wait`.
    pub fn drain(&self, into: &mut Vec<(String, i32, String, String)>, wait: Duration) {
        use rdkafka::message::Message;
        let deadline = Instant::now() + wait;
        while Instant::now() < deadline {
            match self.consumer.poll(Duration::from_millis(100)) {
                Some(Ok(m)) => into.push((
                    m.topic().to_string(),
                    m.partition(),
                    String::from_utf8_lossy(m.key().unwrap_or_default()).into_owned(),
                    String::from_utf8_lossy(m.payload().unwrap_or_default()).into_owned(),
                )),
                Some(Err(e)) => panic!("reader error: {e}"),
                None => {}
            }
        }
    }
}

/// The names of the cluster's topics, or `None` when the metadata request fails.
pub fn topic_names(bootstrap: &str) -> Option<std::collections::BTreeSet<String>> {
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .ok()?;
    let metadata = consumer
        .fetch_metadata(None, Duration::from_secs(10))
        .ok()?;
    Some(
        metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .collect(),
    )
}

/// A plain (non-transactional) producer for test inputs.
pub fn producer(bootstrap: &str) -> rdkafka::producer::BaseProducer {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("linger.ms", "5")
        .create()
        .expect("creating a producer")
}

/// Produces and waits for delivery.
pub fn produce_all(
    producer: &rdkafka::producer::BaseProducer,
    records: &[(String, String, String)],
) {
    use rdkafka::producer::{BaseRecord, Producer};
    for (topic, key, value) in records {
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
        producer.poll(Duration::ZERO);
    }
    producer
        .flush(Duration::from_secs(30))
        .expect("flushing inputs");
}

/// Produces all records in one committed transaction.
pub fn produce_in_one_transaction(bootstrap: &str, records: &[(String, String, String)]) {
    use rdkafka::producer::{BaseRecord, DefaultProducerContext, Producer, ThreadedProducer};
    let producer: ThreadedProducer<DefaultProducerContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .set("transactional.id", unique("test-input"))
        .create()
        .expect("creating a transactional producer");
    producer
        .init_transactions(Duration::from_secs(30))
        .expect("init_transactions");
    producer.begin_transaction().expect("begin");
    for (topic, key, value) in records {
        producer
            .send(BaseRecord::to(topic).key(key).payload(value))
            .map_err(|(e, _)| e)
            .expect("enqueueing an input");
    }
    producer
        .commit_transaction(Duration::from_secs(30))
        .expect("committing the inputs");
}

/// A child process of the `saga-streams` binary, its stderr (JSON log lines) captured to a file.
/// Dropping it kills the process.
pub struct BinProcess {
    pub child: std::process::Child,
    pub log: std::path::PathBuf,
}

impl BinProcess {
    pub fn spawn(args: &[String], log: std::path::PathBuf) -> Self {
        Self::spawn_with_log_filter(args, log, "info,librdkafka=warn,rdkafka=warn")
    }

    /// Like [`BinProcess::spawn`], with `RUST_LOG` set to `filter`.
    pub fn spawn_with_log_filter(args: &[String], log: std::path::PathBuf, filter: &str) -> Self {
        Self::spawn_with_env(args, log, filter, &[])
    }

    /// Like [`BinProcess::spawn_with_log_filter`], with `env` added to the child's environment
    /// (`SAGA_STREAMS_FAILPOINTS` arms fault injection points).
    pub fn spawn_with_env(
        args: &[String],
        log: std::path::PathBuf,
        filter: &str,
        env: &[(&str, &str)],
    ) -> Self {
        if let Some(dir) = log.parent() {
            std::fs::create_dir_all(dir).unwrap();
        }
        let stderr = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .unwrap();
        let child = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
            .args(args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .env("SAGA_STREAMS_LOG_FORMAT", "json")
            .env("RUST_LOG", filter)
            .envs(env.iter().copied())
            .stdout(std::process::Stdio::null())
            .stderr(stderr)
            .spawn()
            .expect("spawning saga-streams");
        Self { child, log }
    }

    pub fn sigkill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// Sends SIGTERM and waits up to `limit` for the exit; returns the exit status.
    pub fn sigterm(&mut self, limit: Duration) -> Option<std::process::ExitStatus> {
        unsafe_free_sigterm(self.child.id());
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Ok(Some(status)) = self.child.try_wait() {
                return Some(status);
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        None
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    /// Sends `signal` (`STOP`, `CONT`, ...) to the process.
    pub fn signal(&self, signal: &str) {
        let status = std::process::Command::new("kill")
            .args([&format!("-{signal}"), &self.child.id().to_string()])
            .status()
            .expect("running kill");
        assert!(status.success(), "kill -{signal} failed");
    }

    /// Fails the test if the process exited (with its log in the message).
    pub fn assert_alive(&mut self) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!("saga-streams exited ({status}):\n{}", self.log_text());
        }
    }
}

impl Drop for BinProcess {
    fn drop(&mut self) {
        self.sigkill();
        // A failing test shows what the process said last, so that a failure seen only in CI
        // can be read from CI's output.
        if std::thread::panicking() {
            let text = self.log_text();
            let lines: Vec<&str> = text.lines().collect();
            let tail = &lines[lines.len().saturating_sub(60)..];
            eprintln!(
                "--- last {} lines of {} ---\n{}",
                tail.len(),
                self.log.display(),
                tail.join("\n")
            );
        }
    }
}

impl BinProcess {
    /// The JSON log lines written so far.
    pub fn log_lines(&self) -> Vec<serde_json::Value> {
        self.log_text()
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect()
    }

    /// The address of the HTTP endpoints, from the last "http endpoints listening" log line (a
    /// log file may hold earlier runs of the same instance).
    pub fn http_addr(&mut self, limit: Duration) -> String {
        let mut found = None;
        let ok = poll_until(limit, || {
            found = self
                .log_lines()
                .iter()
                .rev()
                .find(|l| {
                    l["message"]
                        .as_str()
                        .is_some_and(|m| m.starts_with("http endpoints listening"))
                })
                .and_then(|l| l["addr"].as_str().map(str::to_string));
            found.is_some()
        });
        self.assert_alive();
        assert!(ok, "no HTTP address in the log:\n{}", self.log_text());
        found.unwrap_or_default()
    }
}

/// A blocking HTTP GET on loopback: (status, body).
pub fn http_get(url: &str) -> (u16, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "5", "-w", "\n%{http_code}", url])
        .output()
        .expect("running curl");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A free TCP port on 127.0.0.1 (bound and released).
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A path under the build cache (`$XDG_CACHE_HOME/saga-streams`, by default
/// `~/.cache/saga-streams`), where `scripts/deps` installs the test tools.
pub fn cache_path(path: &str) -> std::path::PathBuf {
    std::env::var("XDG_CACHE_HOME")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| {
            std::path::PathBuf::from(std::env::var("HOME").unwrap_or_default()).join(".cache")
        })
        .join("saga-streams")
        .join(path)
}

/// The Python of the tests' virtualenv (`scripts/deps` creates it).
pub fn venv_python() -> std::path::PathBuf {
    std::env::var("SAGA_STREAMS_INTEROP_PYTHON")
        .map(std::path::PathBuf::from)
        .unwrap_or_else(|_| cache_path("venv/bin/python"))
}
