//! The order saga with every topic in Avro: its own topics (a unique prefix), its subjects in the
//! real registry, the orchestrator and both simulated participants as child processes, a producer
//! encoding with apache-avro the way any Avro producer would, and a `read_committed` reader of
//! everything the saga writes.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use rdkafka::config::ClientConfig;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use saga_streams::codec::registry::Registry;
use saga_streams::codec::Codec;
use saga_streams::saga::topology::{Format, SubjectStrategy};
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::{self, ReadRecord, TopicScanner};
use serde_json::{json, Map, Value};

use super::{kafka_bootstrap, schema_registry_url, unique, BinProcess};

pub const LIMIT: Duration = Duration::from_secs(120);
const TOPOLOGY: &str = "topologies/order_saga.yaml";

pub const ORDER_V1: &str = "io.sagastreams.order.OrderCreated.v1.avsc";
pub const ORDER_V2: &str = "io.sagastreams.order.OrderCreated.v2.avsc";

pub fn repo(path: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

pub struct AvroEnv {
    pub bootstrap: String,
    pub registry_url: String,
    pub registry: Registry,
    pub prefix: String,
    /// The topology with every topic Avro and the prefix applied.
    pub def: SagaDefinition,
    pub topics: Vec<String>,
    pub dir: tempfile::TempDir,
    pub producer: BaseProducer,
    pub scanner: TopicScanner,
    pub seen: Vec<ReadRecord>,
    /// Reads what the saga writes (Avro, through the registry).
    pub codec: Codec,
    pub processes: Vec<BinProcess>,
    pub strategy: SubjectStrategy,
    /// How the commands reach the registry (`--schema-registry-url` and its access flags); the
    /// plain registry URL when empty.
    pub registry_args: Vec<String>,
}

impl AvroEnv {
    /// Topics created, nothing registered yet; subjects named after the topics.
    pub fn new(partitions: i32) -> Self {
        Self::with_strategy(partitions, SubjectStrategy::TopicName)
    }

    /// Topics created, nothing registered yet; subjects named by `strategy`.
    pub fn with_strategy(partitions: i32, strategy: SubjectStrategy) -> Self {
        let bootstrap = kafka_bootstrap();
        let registry_url = schema_registry_url();
        let prefix = format!("{}.", unique("avro"));
        let mut def = SagaDefinition::load(&repo(TOPOLOGY)).unwrap();
        let topics: Vec<String> = def.topics.keys().cloned().collect();
        for t in &topics {
            def.set_topic_format(t, Format::Avro(strategy)).unwrap();
        }
        def.schemas_dir = Some(repo("schemas"));
        let def = def.with_topic_prefix(&prefix);
        sim::create_topics(&bootstrap, &def, partitions).unwrap();
        let mut watched = def.output_topics();
        watched.extend(def.input_topics());
        let scanner = TopicScanner::new(&bootstrap, &watched).unwrap();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        let codec = Codec::new(&def.topic_set(), Some(&registry_url), &[]).unwrap();
        Self {
            registry: Registry::new(&registry_url, Duration::from_secs(10)).unwrap(),
            bootstrap,
            registry_url,
            prefix,
            def,
            topics,
            dir: tempfile::tempdir().unwrap(),
            producer,
            scanner,
            seen: Vec::new(),
            codec,
            processes: Vec::new(),
            strategy,
            registry_args: Vec::new(),
        }
    }

    /// `command` with the broker, the topology (every topic Avro), the prefix and the registry.
    pub fn args(&self, command: &[&str], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        for (k, v) in [
            ("--bootstrap", self.bootstrap.as_str()),
            ("--topology", TOPOLOGY),
            ("--topic-prefix", self.prefix.as_str()),
        ] {
            args.push(k.into());
            args.push(v.into());
        }
        if self.registry_args.is_empty() {
            args.push("--schema-registry-url".into());
            args.push(self.registry_url.clone());
        } else {
            args.extend(self.registry_args.iter().cloned());
        }
        let format = Format::Avro(self.strategy).name();
        for t in &self.topics {
            args.push("--topic-format".into());
            args.push(format!("{t}={format}"));
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    /// Runs `saga-streams schemas <command>` with the schemas of `dir`; returns (success, stdout).
    pub fn schemas(&self, command: &str, dir: &Path) -> (bool, String) {
        let args = self.args(
            &["schemas", command],
            &["--schemas", &dir.display().to_string()],
        );
        let mut args = args;
        // `schemas` takes no --bootstrap.
        let at = args.iter().position(|a| a == "--bootstrap").unwrap();
        args.drain(at..at + 2);
        let out = std::process::Command::new(env!("CARGO_BIN_EXE_saga-streams"))
            .args(&args)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .output()
            .expect("running saga-streams schemas");
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        (out.status.success(), text)
    }

    /// Registers the shipped schemas (`schemas/`), failing the test when refused.
    pub fn register(&self) {
        let (ok, out) = self.schemas("register", &repo("schemas"));
        assert!(ok, "schemas register failed:\n{out}");
    }

    /// Starts the orchestrator and one participant per step, all replying successfully.
    pub fn start(&mut self, orchestrator_extra: &[&str]) {
        let state = self
            .dir
            .path()
            .join("state-orchestrator")
            .display()
            .to_string();
        let mut extra = vec![
            "--instance-id",
            "a",
            "--metrics-addr",
            "127.0.0.1:0",
            "--state-dir",
            &state,
        ];
        extra.extend_from_slice(orchestrator_extra);
        let args = self.args(&["run"], &extra);
        self.processes.push(BinProcess::spawn(
            &args,
            self.dir.path().join("orchestrator.log"),
        ));
        for step in self.def.steps.clone() {
            let state = self.dir.path().join(format!("state-{}", step.name));
            let args = self.args(
                &["simulate", &step.name],
                &[
                    "--instance-id",
                    "a",
                    "--state-dir",
                    &state.display().to_string(),
                ],
            );
            self.processes.push(BinProcess::spawn(
                &args,
                self.dir.path().join(format!("{}.log", step.name)),
            ));
        }
    }

    /// The orchestrator (the first process started).
    pub fn orchestrator(&mut self) -> &mut BinProcess {
        &mut self.processes[0]
    }

    /// Fails the test when a started process exited.
    pub fn assert_alive(&mut self) {
        for p in &mut self.processes {
            p.assert_alive();
        }
    }

    /// The id the registry gave a schema file's schema under the start event's subject.
    pub fn start_subject_id(&self, file: &str) -> u32 {
        let subject = match self.strategy {
            SubjectStrategy::TopicName => format!("{}-value", self.def.start_topic),
            SubjectStrategy::RecordName => file.rsplitn(3, '.').nth(2).unwrap().to_string(),
        };
        let text = std::fs::read_to_string(repo(&format!("schemas/{file}"))).unwrap();
        self.registry
            .lookup(&subject, &text)
            .unwrap()
            .unwrap_or_else(|| panic!("{file} is not registered under {subject}"))
            .id
    }

    /// The fields of an OrderCreated for `order` (version 1 fields; `extra` adds more).
    pub fn order_fields(&self, order: &str, extra: &[(&str, Value)]) -> Map<String, Value> {
        let mut map = json!({
            "event_id": uuid::Uuid::new_v4().to_string(),
            "event_type": "OrderCreated",
            "event_version": 1,
            "order_id": order,
            "correlation_id": format!("corr-{order}"),
            "occurred_at": "2026-11-27T10:00:00.000Z",
            "user_id": format!("user-{order}"),
            "total": 42.5,
            "currency": "EUR",
            "items": [{"sku": "sku-1", "quantity": 2}],
        });
        for (k, v) in extra {
            map[*k] = v.clone();
        }
        match map {
            Value::Object(m) => m,
            _ => unreachable!(),
        }
    }

    /// Encodes `fields` with the schema of a file in the Confluent wire format under `id`.
    pub fn encode(&self, schema: &Schema, id: u32, fields: Map<String, Value>) -> Vec<u8> {
        let value = AvroValue::try_from(Value::Object(fields))
            .unwrap()
            .resolve(schema)
            .unwrap();
        let datum = GenericDatumWriter::builder(schema)
            .build()
            .unwrap()
            .write_value_to_vec(value)
            .unwrap();
        let mut bytes = vec![0];
        bytes.extend_from_slice(&id.to_be_bytes());
        bytes.extend_from_slice(&datum);
        bytes
    }

    pub fn send_raw(&self, topic: &str, key: &str, value: &[u8]) {
        self.producer
            .send(BaseRecord::<str, [u8]>::to(topic).key(key).payload(value))
            .map_err(|(e, _)| e)
            .unwrap();
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    /// Reads what the saga wrote until `done` holds; fails with what was seen otherwise.
    pub fn wait(&mut self, what: &str, limit: Duration, done: impl Fn(&AvroEnv) -> bool) {
        let deadline = Instant::now() + limit;
        loop {
            if done(self) {
                return;
            }
            self.assert_alive();
            if Instant::now() > deadline {
                let dump: Vec<String> = self.seen.iter().map(|r| self.describe(r)).collect();
                panic!("timed out waiting for {what}; seen:\n{}", dump.join("\n"));
            }
            self.poll();
        }
    }

    /// Reads for a while without waiting for anything.
    pub fn poll(&mut self) {
        let mut batch = Vec::new();
        self.scanner
            .poll_batch(Duration::from_millis(200), &mut batch)
            .unwrap();
        self.seen.extend(batch);
    }

    /// A record's event object, decoded the way saga-streams reads it.
    pub fn body(&self, r: &ReadRecord) -> Option<Map<String, Value>> {
        self.codec.read(&r.topic, r.value.as_deref()).ok()
    }

    pub fn describe(&self, r: &ReadRecord) -> String {
        format!(
            "{} key={} {:?}",
            r.topic,
            String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
            self.body(r)
        )
    }

    /// The saga's outcome messages (OrderCompleted / OrderCancelled) for `order`.
    pub fn outcomes(&self, order: &str) -> Vec<Map<String, Value>> {
        self.seen
            .iter()
            .filter(|r| r.topic == self.def.completed.topic || r.topic == self.def.cancelled.topic)
            .filter(|r| r.key.as_deref() == Some(order.as_bytes()))
            .filter_map(|r| self.body(r))
            .collect()
    }

    /// The records dead-lettered from `input`.
    pub fn dead_letters(&self, input: &str) -> Vec<&ReadRecord> {
        let dlq = format!("{input}.dlq");
        self.seen.iter().filter(|r| r.topic == dlq).collect()
    }

    /// Every input's dead letters.
    pub fn all_dead_letters(&self) -> Vec<&ReadRecord> {
        self.seen
            .iter()
            .filter(|r| r.topic.ends_with(".dlq"))
            .collect()
    }
}

pub fn schema_file(name: &str) -> Schema {
    Schema::parse_str(&std::fs::read_to_string(repo(&format!("schemas/{name}"))).unwrap()).unwrap()
}

/// A copy of `schemas/` without the files `skip` names, plus the `extra` files.
pub fn schema_dir(skip: &[&str], extra: &[(&str, Value)]) -> tempfile::TempDir {
    let dir = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(repo("schemas")).unwrap() {
        let path = entry.unwrap().path();
        let name = path.file_name().unwrap().to_string_lossy().into_owned();
        if !skip.contains(&name.as_str()) {
            std::fs::copy(&path, dir.path().join(&name)).unwrap();
        }
    }
    for (name, json) in extra {
        std::fs::write(dir.path().join(name), json.to_string()).unwrap();
    }
    dir
}

/// The shipped schemas without any second version: what the first producers registered.
pub fn first_versions() -> tempfile::TempDir {
    schema_dir(
        &[ORDER_V2, "io.sagastreams.payment.PaymentSucceeded.v2.avsc"],
        &[],
    )
}
