//! What the benchmark harnesses share: child processes measured from /proc, bulk producing,
//! the stored bytes of a finished saga.

#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use indicatif::{ProgressBar, ProgressStyle};
use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use saga_streams::saga::machine::{self, Applied, SagaEvent, SagaInput};
use saga_streams::saga::topology::EventRole;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::load;
use serde_json::{json, Value};

#[path = "proc_usage.rs"]
mod proc_usage;

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

pub fn bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "  {{elapsed_precise}} {{bar:40}} {{pos:>8}}/{{len:8}} {what} ({{per_sec}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn release_dir() -> PathBuf {
    let exe = std::env::current_exe().expect("own path");
    // target/release/examples/bench_saga -> target/release
    exe.parent()
        .and_then(Path::parent)
        .expect("target dir")
        .to_path_buf()
}

/// A child process whose CPU time and peak RSS are read from /proc before it is stopped, sampled
/// all along (see [`Process::window`]); killed if dropped while running (a failed run leaves no
/// engine behind).
pub struct Process {
    pub child: Child,
    pub log: PathBuf,
    /// Wall-clock ms when it was started.
    pub started_ms: i64,
    sampler: proc_usage::Sampler,
}

impl Process {
    pub fn spawn(command: Command, log: PathBuf) -> Process {
        let file = std::fs::File::create(&log).expect("log file");
        Process::start(command, file, log)
    }

    /// [`Process::spawn`], its output appended to `log` (a restarted instance keeps its earlier
    /// lines).
    pub fn spawn_appending(command: Command, log: PathBuf) -> Process {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&log)
            .expect("log file");
        Process::start(command, file, log)
    }

    fn start(mut command: Command, file: std::fs::File, log: PathBuf) -> Process {
        let out = file.try_clone().expect("log file");
        let child = command
            .stdout(Stdio::from(out))
            .stderr(Stdio::from(file))
            .spawn()
            .expect("spawning a benchmarked process");
        let sampler = proc_usage::Sampler::start(child.id());
        Process {
            child,
            log,
            started_ms: now_ms(),
            sampler,
        }
    }

    /// (CPU seconds, peak RSS in MiB) over the whole life so far.
    pub fn usage(&self) -> (f64, f64) {
        proc_usage::usage(self.child.id())
    }

    /// (CPU seconds, largest RSS in MiB) between two wall-clock times (ms).
    pub fn window(&self, from_ms: i64, to_ms: i64) -> (f64, f64) {
        self.sampler.window(from_ms, to_ms)
    }

    /// Whether it has exited.
    pub fn exited(&mut self) -> bool {
        !matches!(self.child.try_wait(), Ok(None))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }

    pub fn check_alive(&mut self, what: &str) {
        if let Ok(Some(status)) = self.child.try_wait() {
            panic!(
                "{what} exited ({status}); log {}:\n{}",
                self.log.display(),
                self.log_text()
            );
        }
    }

    pub fn stop(mut self) {
        let _ = Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status();
        let deadline = Instant::now() + Duration::from_secs(40);
        while Instant::now() < deadline {
            if let Ok(Some(_)) = self.child.try_wait() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Process {
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("a free port")
}

/// A finished saga as JSON, with `{ID}` for its id: the record of a real run through the state
/// machine. [`stored_bytes`] makes one saga's stored bytes of it.
pub fn saga_streams_template(def: &SagaDefinition) -> String {
    let id = "{ID}";
    let event = |event_type: &str, role: EventRole, payload: Value| SagaEvent {
        event_id: uuid::Uuid::new_v4().to_string(),
        event_type: event_type.to_string(),
        role,
        payload: payload.as_object().cloned().unwrap_or_default(),
        traceparent: None,
    };
    let created = load::order_created(def, id);
    let mut payload = created.as_object().cloned().unwrap_or_default();
    for name in saga_streams::saga::topology::ENVELOPE {
        payload.remove(*name);
    }
    let start = event(&def.start_event, EventRole::Start, Value::Object(payload));
    let now = now_ms();
    let (mut record, _) = machine::start(def, id, &start, "corr-{ID}".into(), now);
    let replies = [
        event(
            &def.steps[0].success,
            EventRole::Success(0),
            json!({"payment_id": "payment-{ID}"}),
        ),
        event(
            &def.steps[1].success,
            EventRole::Success(1),
            json!({"reservation_id": "reservation-{ID}"}),
        ),
    ];
    for reply in &replies {
        if let Applied::Changed { record: next, .. } =
            machine::apply(def, &record, SagaInput::Event(reply), now)
        {
            record = *next;
        }
    }
    serde_json::to_string(&record).expect("saga record")
}

/// The bytes saga-streams stores for saga `id` of a [`saga_streams_template`].
pub fn stored_bytes(template: &str, id: &str) -> Vec<u8> {
    let record: machine::SagaRecord =
        serde_json::from_str(&template.replace("{ID}", id)).expect("a template saga record");
    saga_streams::saga::record::encode(&record).expect("an encodable saga record")
}

/// A record to produce: topic, key, value, and the partition when it is not the key's.
pub type Produced = (String, Vec<u8>, Vec<u8>, Option<i32>);

/// One record to produce, with what [`Produced`] leaves to the producer.
pub struct Bulk {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Vec<u8>,
    pub partition: Option<i32>,
    pub timestamp_ms: Option<i64>,
    pub headers: Vec<(&'static str, String)>,
}

impl From<Produced> for Bulk {
    fn from((topic, key, value, partition): Produced) -> Bulk {
        Bulk {
            topic,
            key,
            value,
            partition,
            timestamp_ms: None,
            headers: Vec::new(),
        }
    }
}

/// Produces `count` records made by `make(n)` as fast as the broker takes them, with the producer
/// `settings` given.
pub fn bulk_produce(
    bootstrap: &str,
    settings: &[(&str, &str)],
    count: u64,
    what: &str,
    make: impl Fn(u64) -> Produced,
) {
    bulk_produce_many(bootstrap, settings, count, what, |n| vec![make(n).into()]);
}

/// Like [`bulk_produce`], `make(n)` giving any number of records for each of `count` steps.
pub fn bulk_produce_many(
    bootstrap: &str,
    settings: &[(&str, &str)],
    count: u64,
    what: &str,
    mut make: impl FnMut(u64) -> Vec<Bulk>,
) {
    let mut config = ClientConfig::new();
    config
        .set("bootstrap.servers", bootstrap)
        .set("queue.buffering.max.messages", "1000000");
    for (k, v) in settings {
        config.set(*k, *v);
    }
    let producer: BaseProducer = config.create().expect("producer");
    let progress = bar(count, what);
    for n in 0..count {
        for bulk in make(n) {
            let mut record = BaseRecord::to(&bulk.topic)
                .key(&bulk.key)
                .payload(&bulk.value);
            if let Some(p) = bulk.partition {
                record = record.partition(p);
            }
            if let Some(t) = bulk.timestamp_ms {
                record = record.timestamp(t);
            }
            if !bulk.headers.is_empty() {
                let mut headers = OwnedHeaders::new();
                for (name, value) in &bulk.headers {
                    headers = headers.insert(Header {
                        key: name,
                        value: Some(value),
                    });
                }
                record = record.headers(headers);
            }
            while let Err((_, back)) = producer.send(record) {
                record = back;
                producer.poll(Duration::from_millis(5));
            }
        }
        if n % 10_000 == 0 {
            progress.set_position(n);
            producer.poll(Duration::ZERO);
        }
    }
    producer.flush(Duration::from_secs(120)).expect("flush");
    progress.finish_and_clear();
}

/// A fresh run's topic prefix (`bench-<tag>-<pid>-<ms>.`), the topology under it, its topics
/// created with `partitions` partitions.
pub fn fresh_saga(
    topology: &Path,
    bootstrap: &str,
    partitions: i32,
    tag: &str,
) -> (String, SagaDefinition) {
    let prefix = format!("bench-{tag}-{}-{}.", std::process::id(), now_ms());
    let def = SagaDefinition::load(topology)
        .expect("topology")
        .with_topic_prefix(&prefix);
    saga_streams::sim::create_topics(bootstrap, &def, partitions).expect("topics");
    (prefix, def)
}

/// Creates a compacted changelog topic to write an engine's state into before it starts.
pub fn create_changelog(bootstrap: &str, topic: &str, partitions: i32) {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("admin");
    let changelog = NewTopic::new(topic, partitions, TopicReplication::Fixed(1))
        .set("cleanup.policy", "compact");
    for r in futures::executor::block_on(admin.create_topics(&[changelog], &AdminOptions::new()))
        .expect("create changelog")
    {
        r.expect("changelog created");
    }
}

/// Deletes every topic whose name starts with `prefix` (a finished run's topics, so that repeated
/// runs do not fill the broker's disk); a failure is reported, not fatal.
pub fn delete_topics_with_prefix(bootstrap: &str, prefix: &str) {
    use rdkafka::admin::{AdminClient, AdminOptions};
    use rdkafka::consumer::{BaseConsumer, Consumer};
    let result = (|| -> Result<usize, rdkafka::error::KafkaError> {
        let consumer: BaseConsumer = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let metadata = consumer.fetch_metadata(None, Duration::from_secs(30))?;
        let names: Vec<String> = metadata
            .topics()
            .iter()
            .map(|t| t.name().to_string())
            .filter(|n| n.starts_with(prefix))
            .collect();
        if names.is_empty() {
            return Ok(0);
        }
        let admin: AdminClient<rdkafka::client::DefaultClientContext> = ClientConfig::new()
            .set("bootstrap.servers", bootstrap)
            .create()?;
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        futures::executor::block_on(admin.delete_topics(&refs, &AdminOptions::new()))?;
        Ok(names.len())
    })();
    if let Err(e) = result {
        eprintln!("  could not delete the topics of {prefix}*: {e}");
    }
}
