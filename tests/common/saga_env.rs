//! A saga under test: its own topics (a unique prefix), the `saga-streams` binary as child
//! processes, a producer playing the participant services, and a `read_committed` reader of
//! everything the saga writes.

use std::path::PathBuf;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use saga_streams::codec::json::unwrap_body;
use saga_streams::saga::SagaDefinition;
use saga_streams::sim::{self, ReadRecord, TopicScanner};
use serde_json::{json, Map, Value};

use super::{kafka_bootstrap, unique, BinProcess};

pub const LIMIT: Duration = Duration::from_secs(90);

/// Which reply of a step.
#[derive(Clone, Copy)]
pub enum Reply {
    Success,
    Failure,
    Compensated,
}

/// One test's saga: its own topics (a unique prefix), the orchestrator, a producer and a reader
/// of everything the saga writes.
pub struct SagaEnv {
    pub bootstrap: String,
    pub prefix: String,
    pub topology: String,
    pub def: SagaDefinition,
    pub dir: tempfile::TempDir,
    pub producer: BaseProducer,
    pub scanner: TopicScanner,
    pub seen: Vec<ReadRecord>,
}

impl SagaEnv {
    pub fn new(topology: &str, partitions: i32) -> Self {
        let bootstrap = kafka_bootstrap();
        let prefix = format!("{}.", unique("saga"));
        let path = format!("topologies/{topology}");
        let def = SagaDefinition::load(&PathBuf::from(env!("CARGO_MANIFEST_DIR")).join(&path))
            .unwrap()
            .with_topic_prefix(&prefix);
        sim::create_topics(&bootstrap, &def, partitions).unwrap();
        let scanner = TopicScanner::new(&bootstrap, &def.output_topics()).unwrap();
        let producer = ClientConfig::new()
            .set("bootstrap.servers", &bootstrap)
            .create()
            .unwrap();
        Self {
            bootstrap,
            prefix,
            topology: path,
            def,
            dir: tempfile::tempdir().unwrap(),
            producer,
            scanner,
            seen: Vec::new(),
        }
    }

    pub fn args(&self, command: &[&str], extra: &[&str]) -> Vec<String> {
        let mut args: Vec<String> = command.iter().map(|s| s.to_string()).collect();
        for (k, v) in [
            ("--bootstrap", self.bootstrap.as_str()),
            ("--topology", self.topology.as_str()),
            ("--topic-prefix", self.prefix.as_str()),
        ] {
            args.push(k.into());
            args.push(v.into());
        }
        args.extend(extra.iter().map(|s| s.to_string()));
        args
    }

    pub fn orchestrator(&self, instance: &str, extra: &[&str]) -> BinProcess {
        self.orchestrator_logging(instance, extra, "info,librdkafka=warn,rdkafka=warn")
    }

    /// The state directory of an orchestrator instance.
    pub fn state_dir(&self, instance: &str) -> PathBuf {
        self.dir.path().join(format!("state-{instance}"))
    }

    /// An orchestrator with `env` added to its environment.
    pub fn orchestrator_with_env(
        &self,
        instance: &str,
        extra: &[&str],
        env: &[(&str, &str)],
    ) -> BinProcess {
        self.orchestrator_spawn(instance, extra, "info,librdkafka=warn,rdkafka=warn", env)
    }

    /// An orchestrator with `RUST_LOG` set to `filter`.
    pub fn orchestrator_logging(&self, instance: &str, extra: &[&str], filter: &str) -> BinProcess {
        self.orchestrator_spawn(instance, extra, filter, &[])
    }

    fn orchestrator_spawn(
        &self,
        instance: &str,
        extra: &[&str],
        filter: &str,
        env: &[(&str, &str)],
    ) -> BinProcess {
        let state = self.state_dir(instance);
        let mut args = self.args(
            &["run"],
            &["--instance-id", instance, "--metrics-addr", "127.0.0.1:0"],
        );
        args.push("--state-dir".into());
        args.push(state.display().to_string());
        args.extend(extra.iter().map(|s| s.to_string()));
        BinProcess::spawn_with_env(
            &args,
            self.dir.path().join(format!("{instance}.log")),
            filter,
            env,
        )
    }

    pub fn send_raw(&self, topic: &str, key: Option<&str>, value: &[u8], headers: &[(&str, &str)]) {
        let mut h = OwnedHeaders::new();
        for (k, v) in headers {
            h = h.insert(Header {
                key: k,
                value: Some(*v),
            });
        }
        let mut record = BaseRecord::<str, [u8]>::to(topic).payload(value).headers(h);
        if let Some(key) = key {
            record = record.key(key);
        }
        self.producer.send(record).map_err(|(e, _)| e).unwrap();
        self.producer.flush(Duration::from_secs(10)).unwrap();
    }

    pub fn send(&self, topic: &str, order: &str, body: Value, headers: &[(&str, &str)]) {
        let value = serde_json::to_vec(&json!({ "event": body })).unwrap();
        self.send_raw(topic, Some(order), &value, headers);
    }

    /// Sends an OrderCreated for `order` without correlation id (it comes from a header or is
    /// generated).
    pub fn create(&self, order: &str, headers: &[(&str, &str)]) {
        let mut body = sim::load::order_created(&self.def, order);
        body.as_object_mut().unwrap().remove("correlation_id");
        self.send(&self.def.start_topic, order, body, headers);
    }

    /// Sends a reply of step `step` for `order`; returns its event id.
    pub fn reply(&self, step: usize, which: Reply, order: &str) -> String {
        let id = uuid::Uuid::new_v4().to_string();
        self.reply_with_id(step, which, order, &id);
        id
    }

    pub fn reply_with_id(&self, step: usize, which: Reply, order: &str, id: &str) {
        let (topic, value) = self.reply_record(step, which, order, id);
        self.send_raw(&topic, Some(order), value.as_bytes(), &[]);
    }

    /// A reply of step `step` for `order` as (topic, wrapped JSON body), not sent.
    pub fn reply_record(
        &self,
        step: usize,
        which: Reply,
        order: &str,
        id: &str,
    ) -> (String, String) {
        let s = &self.def.steps[step];
        let event_type = match which {
            Reply::Success => &s.success,
            Reply::Failure => &s.failure,
            Reply::Compensated => &s.confirmed_by,
        };
        let mut body = json!({
            "event_id": id,
            "event_type": event_type,
            "event_version": 1,
            "order_id": order,
            "occurred_at": "2026-11-26T10:00:00Z",
        });
        for field in &self.def.events[event_type] {
            body[field.name.as_str()] = json!(format!("{}-{order}", field.name));
        }
        (s.reply_topic.clone(), json!({ "event": body }).to_string())
    }

    /// Reads what the saga wrote until `done` holds; fails with everything seen otherwise.
    pub fn wait(&mut self, what: &str, done: impl Fn(&SagaEnv) -> bool) {
        let deadline = Instant::now() + LIMIT;
        loop {
            if done(self) {
                return;
            }
            if Instant::now() > deadline {
                let dump: Vec<String> = self.seen.iter().map(describe).collect();
                panic!("timed out waiting for {what}; seen:\n{}", dump.join("\n"));
            }
            let mut batch = Vec::new();
            self.scanner
                .poll_batch(Duration::from_millis(200), &mut batch)
                .unwrap();
            self.seen.extend(batch);
        }
    }

    /// The messages of `event_type` the saga wrote for `order`.
    pub fn of(&self, order: &str, event_type: &str) -> Vec<&ReadRecord> {
        self.seen
            .iter()
            .filter(|r| r.key.as_deref() == Some(order.as_bytes()))
            .filter(|r| !r.topic.ends_with(".dlq"))
            .filter(|r| body(r).get("event_type").and_then(Value::as_str) == Some(event_type))
            .collect()
    }

    pub fn count(&self, order: &str, event_type: &str) -> usize {
        self.of(order, event_type).len()
    }

    /// Waits for one message of `event_type` for `order` and returns its body.
    pub fn expect(&mut self, order: &str, event_type: &str) -> Map<String, Value> {
        let (o, t) = (order.to_string(), event_type.to_string());
        self.wait(&format!("{event_type} for {order}"), move |env| {
            env.count(&o, &t) > 0
        });
        body(self.of(order, event_type)[0])
    }

    /// Every message written for `order`, in the order read, as event types.
    pub fn trail(&self, order: &str) -> Vec<String> {
        self.seen
            .iter()
            .filter(|r| r.key.as_deref() == Some(order.as_bytes()) && !r.topic.ends_with(".dlq"))
            // A record that is not JSON (an Avro topic) shows as "?".
            .map(|r| {
                body(r)
                    .get("event_type")
                    .and_then(Value::as_str)
                    .unwrap_or("?")
                    .to_string()
            })
            .collect()
    }

    /// Runs a whole success flow for `order` as a barrier: when its OrderCompleted is visible,
    /// everything sent before it on the same topics was processed.
    pub fn complete(&mut self, order: &str) {
        self.create(order, &[]);
        for step in 0..self.def.steps.len() {
            self.expect(order, &self.def.steps[step].command.event_type.clone());
            self.reply(step, Reply::Success, order);
        }
        self.expect(order, &self.def.completed.event_type.clone());
    }
}

pub fn body(r: &ReadRecord) -> Map<String, Value> {
    r.value
        .as_deref()
        .and_then(|v| serde_json::from_slice(v).ok())
        .and_then(unwrap_body)
        .unwrap_or_default()
}

pub fn describe(r: &ReadRecord) -> String {
    format!(
        "{} key={} {}",
        r.topic,
        String::from_utf8_lossy(r.key.as_deref().unwrap_or_default()),
        String::from_utf8_lossy(r.value.as_deref().unwrap_or_default())
    )
}
