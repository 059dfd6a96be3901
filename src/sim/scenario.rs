//! `saga-streams test`: saga scenarios without a broker.
//!
//! A scenario (YAML) sends input events, moves a virtual clock and states what the saga must have
//! written by then. The runner drives the real [`SagaProcessor`] (decoding, the contract checks,
//! the state machine, timers, dead letters, re-keying) over an in-memory store, one commit cycle
//! per input as the runtime does, and compares. The wire format is not exercised: every topic is
//! read and written as JSON (`saga-streams schemas check` covers Avro), and signatures are off.
//!
//! ```yaml
//! name: a declined payment cancels the order
//! saga: order-1                 # the saga the steps talk about unless they name another
//! steps:
//!   - send: { event: OrderCreated, data: { total: 12.5 } }
//!   - expect: { emitted: [ProcessPayment], status: PAYMENT_PENDING }
//!   - send: { event: PaymentFailed }
//!   - expect:
//!       emitted: [{ event: OrderCancelled, fields: { reason: payment_failed } }]
//!   - advance: 30s
//!   - expect: { emitted: [] }
//! ```

use std::collections::{BTreeMap, VecDeque};
use std::path::Path;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;
use std::time::{Duration, UNIX_EPOCH};

use marked_yaml::Node;
use serde::Deserialize;
use serde_json::{json, Map, Number, Value};

use crate::codec::Codec;
use crate::runtime::processor::TaskStores;
use crate::runtime::{InputRecord, OutputRecord, Processor, ProcessorContext};
use crate::saga::contract::rfc3339;
use crate::saga::processor::{
    decode_record, dlq_headers, saga_key, timer_deadline, SagaProcessor, SAGA_STORE, TIMER_PREFIX,
};
use crate::saga::topology::{repartition_topic, KeyPolicy, SagaDefinition};
use crate::state::memory::MemoryBackend;
use crate::state::{CommitBatch, PendingWrites, StoreBackend};

/// Where the virtual clock starts unless a scenario says otherwise.
const DEFAULT_START: &str = "2026-01-01T00:00:00Z";
/// Timer firings one `advance` may cause, at most (a saga re-arming its timer for ever).
const MAX_FIRINGS: usize = 100_000;

/// A scenario file.
#[derive(Debug, Clone)]
pub struct Scenario {
    pub name: String,
    /// The saga steps talk about unless they name another.
    pub saga: Option<String>,
    /// Virtual time at the start (ms since the epoch).
    pub start_ms: i64,
    pub steps: Vec<(usize, Step)>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawScenario {
    name: String,
    #[serde(default)]
    description: Option<String>,
    #[serde(default)]
    saga: Option<String>,
    /// RFC 3339.
    #[serde(default)]
    start: Option<String>,
    steps: Vec<Value>,
}

/// One step of a scenario.
#[derive(Debug, Clone, Deserialize)]
#[serde(rename_all = "snake_case", deny_unknown_fields)]
pub enum Step {
    /// An input record.
    Send(Send),
    /// Moves the virtual clock (`30s`, `1m 30s`), firing the timers that fall due on the way at
    /// their own times.
    Advance(String),
    /// What the saga wrote since the previous `expect`, and where sagas stand now.
    Expect(Expect),
}

/// An input record. The body is made up for `event` (the envelope, then each field the topology
/// declares: from the saga's last command when it carries one of that name, else a value of the
/// field's type), then `data` is laid over it (`null` removes a field).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Send {
    /// The event type; may be left out with `raw`.
    #[serde(default)]
    pub event: Option<String>,
    #[serde(default)]
    pub saga: Option<String>,
    /// Default: the topic that carries `event` in the topology.
    #[serde(default)]
    pub topic: Option<String>,
    /// The record key; default the saga id, `null` for none (as outbox jobs often send).
    #[serde(default, deserialize_with = "present")]
    pub key: Option<Option<String>>,
    /// Default: derived from the scenario and the step, so each send is a new event; give the
    /// same id twice to send a duplicate.
    #[serde(default)]
    pub event_id: Option<String>,
    #[serde(default)]
    pub data: Map<String, Value>,
    /// The record value exactly as given (nothing made up), for malformed input.
    #[serde(default)]
    pub raw: Option<String>,
    #[serde(default)]
    pub headers: BTreeMap<String, String>,
}

/// Tells a field given as `null` from one left out.
fn present<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<Option<String>>, D::Error> {
    Option::<String>::deserialize(d).map(Some)
}

/// What must hold at this point. Each list is the whole of what was written since the previous
/// `expect`, in order; a list left out is not checked.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Expect {
    /// Commands, compensations and outcomes.
    #[serde(default)]
    pub emitted: Option<Vec<ExpectedMessage>>,
    /// Records sent to dead-letter topics.
    #[serde(default)]
    pub dead_letters: Option<Vec<ExpectedDeadLetter>>,
    /// The status of the scenario's saga, or of several: `{ order-1: COMPLETED }`; `none` for a
    /// saga that does not exist.
    #[serde(default)]
    pub status: Option<StatusSpec>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum ExpectedMessage {
    /// Just the event type, for the scenario's saga.
    Type(String),
    Full(ExpectedFull),
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedFull {
    pub event: String,
    /// Default: the scenario's saga.
    #[serde(default)]
    pub saga: Option<String>,
    #[serde(default)]
    pub topic: Option<String>,
    /// Fields the body must carry with these values (others may be there too).
    #[serde(default)]
    pub fields: Map<String, Value>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ExpectedDeadLetter {
    /// The `dlq.error.kind` reason (`invalid_field`, `unknown_saga`, ...).
    pub reason: String,
    /// The topic the record came from.
    #[serde(default)]
    pub topic: Option<String>,
    /// The dead letter's key; left out: not checked.
    #[serde(default)]
    pub key: Option<String>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(untagged)]
pub enum StatusSpec {
    One(String),
    Many(BTreeMap<String, String>),
}

/// Reads a scenario file; the error names the file and, for a step, its line.
pub fn load(path: &Path) -> Result<Scenario, String> {
    let file = path.display();
    let text = std::fs::read_to_string(path).map_err(|e| format!("{file}: cannot read: {e}"))?;
    parse(&file.to_string(), &text)
}

/// Parses a scenario from YAML text (`file` names it in errors).
pub fn parse(file: &str, text: &str) -> Result<Scenario, String> {
    let node = yaml(text).map_err(|e| format!("{file}: {e}"))?;
    let lines: Vec<usize> = node
        .as_mapping()
        .and_then(|m| m.get_sequence("steps"))
        .map(|steps| steps.iter().map(line_of).collect())
        .unwrap_or_default();
    let raw: RawScenario =
        serde_json::from_value(to_json(&node)).map_err(|e| format!("{file}: {e}"))?;
    let _ = raw.description;
    let start = raw.start.as_deref().unwrap_or(DEFAULT_START);
    let start_ms = humantime::parse_rfc3339_weak(start)
        .map_err(|e| format!("{file}: start '{start}': {e}"))?
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .map_err(|_| format!("{file}: start '{start}' is before 1970"))?;
    if raw.steps.is_empty() {
        return Err(format!("{file}: a scenario needs at least one step"));
    }
    let mut steps = Vec::new();
    for (i, value) in raw.steps.into_iter().enumerate() {
        let line = lines.get(i).copied().unwrap_or(0);
        let step: Step = serde_json::from_value(value).map_err(|e| {
            format!(
                "{file}:{line}: step {}: {e} (a step is one of send, advance, expect)",
                i + 1
            )
        })?;
        if let Step::Advance(by) = &step {
            humantime::parse_duration(by.trim())
                .map_err(|e| format!("{file}:{line}: advance '{by}': {e}"))?;
        }
        steps.push((line, step));
    }
    Ok(Scenario {
        name: raw.name,
        saga: raw.saga,
        start_ms,
        steps,
    })
}

/// Quoted scalars stay strings (`"150.00"` is not a number); a key given twice is an error.
fn yaml(text: &str) -> Result<Node, marked_yaml::LoadError> {
    let options = marked_yaml::LoaderOptions::default()
        .prevent_coercion(true)
        .error_on_duplicate_keys(true);
    marked_yaml::parse_yaml_with_options(0, text, options)
}

fn line_of(node: &Node) -> usize {
    node.span().start().map_or(0, |m| m.line())
}

/// YAML as JSON: plain scalars are typed as YAML 1.2's core schema types them (null, booleans,
/// numbers); quoted ones stay strings.
fn to_json(node: &Node) -> Value {
    match node {
        Node::Scalar(s) => {
            let text = s.as_str();
            if !s.may_coerce() {
                return Value::String(text.to_string());
            }
            match text {
                "" | "~" | "null" | "Null" | "NULL" => Value::Null,
                "true" | "True" | "TRUE" => Value::Bool(true),
                "false" | "False" | "FALSE" => Value::Bool(false),
                _ => {
                    if let Ok(i) = text.parse::<i64>() {
                        Value::from(i)
                    } else if let Some(n) = text
                        .parse::<f64>()
                        .ok()
                        .filter(|f| f.is_finite())
                        .and_then(Number::from_f64)
                    {
                        Value::Number(n)
                    } else {
                        Value::String(text.to_string())
                    }
                }
            }
        }
        Node::Sequence(items) => Value::Array(items.iter().map(to_json).collect()),
        Node::Mapping(map) => Value::Object(
            map.iter()
                .map(|(k, v)| (k.as_str().to_string(), to_json(v)))
                .collect(),
        ),
    }
}

/// One record the saga wrote, as a scenario compares it.
#[derive(Debug, Clone)]
struct Written {
    topic: String,
    key: Option<String>,
    /// The event (unwrapped), when the value is a JSON object.
    body: Option<Map<String, Value>>,
    /// The value as written.
    value: Option<Vec<u8>>,
    /// For a dead letter: its reason and source topic.
    dead_letter: Option<(String, String)>,
}

impl Written {
    fn event_type(&self) -> &str {
        self.body
            .as_ref()
            .and_then(|b| b.get("event_type"))
            .and_then(Value::as_str)
            .unwrap_or("?")
    }

    fn describe(&self, key_field: &str) -> String {
        if let Some((reason, source)) = &self.dead_letter {
            return format!(
                "dead letter reason={reason} from {source} key={}",
                self.key.as_deref().unwrap_or("(none)")
            );
        }
        let payload: Map<String, Value> = self
            .body
            .iter()
            .flatten()
            .filter(|(k, _)| !ENVELOPE_SHOWN.contains(&k.as_str()) && k.as_str() != key_field)
            .map(|(k, v)| (k.clone(), v.clone()))
            .collect();
        format!(
            "{} saga={} on {} {}",
            self.event_type(),
            self.key.as_deref().unwrap_or("(none)"),
            self.topic,
            Value::Object(payload)
        )
    }
}

/// Envelope fields left out when a written message is shown (they vary, or say nothing new).
const ENVELOPE_SHOWN: &[&str] = &[
    "event_id",
    "event_type",
    "event_version",
    "occurred_at",
    "correlation_id",
];

/// The processor of one task over an in-memory store, in virtual time.
struct Driver {
    def: Arc<SagaDefinition>,
    codec: Arc<Codec>,
    processor: SagaProcessor,
    backend: MemoryBackend,
    clock: Arc<AtomicI64>,
    repartition: Option<String>,
    offsets: BTreeMap<String, i64>,
    /// What the saga wrote since the previous `expect`.
    unchecked: Vec<Written>,
    /// The last command or compensation written for each saga: what replies are filled from.
    last_command: BTreeMap<String, Map<String, Value>>,
}

impl Driver {
    fn new(def: Arc<SagaDefinition>, start_ms: i64) -> Result<Self, String> {
        let codec = Arc::new(Codec::json());
        let clock = Arc::new(AtomicI64::new(start_ms));
        let repartition = (def.keys == KeyPolicy::Rekey).then(|| repartition_topic(&def.name));
        let processor = SagaProcessor::new(
            def.clone(),
            codec.clone(),
            SagaProcessor::default_tick(&def),
        )
        .with_repartition(repartition.clone())
        .with_virtual_clock(clock.clone());
        let mut driver = Self {
            def,
            codec,
            processor,
            backend: MemoryBackend::new(),
            clock,
            repartition,
            offsets: BTreeMap::new(),
            unchecked: Vec::new(),
            last_command: BTreeMap::new(),
        };
        driver.cycle(Cycle::Init)?;
        Ok(driver)
    }

    fn now(&self) -> i64 {
        self.clock.load(Ordering::Relaxed)
    }

    /// One commit cycle: the processor's work on an in-memory overlay, then committed.
    fn cycle(&mut self, what: Cycle<'_>) -> Result<Vec<OutputRecord>, String> {
        let mut pending = BTreeMap::from([(SAGA_STORE.to_string(), PendingWrites::default())]);
        let mut outputs = Vec::new();
        let mut punctuation = None;
        let now = self.now();
        let mut ctx = ProcessorContext {
            partition: 0,
            stores: TaskStores {
                backend: &self.backend,
                pending: &mut pending,
            },
            outputs: &mut outputs,
            punctuation: &mut punctuation,
            // Every input is consumed up to now: nothing written earlier is still on its way.
            input_time_ms: Some(now),
        };
        let result = match what {
            Cycle::Init => self.processor.init(&mut ctx),
            Cycle::Record(record) => self.processor.process(&mut ctx, record),
            Cycle::Punctuate => self.processor.punctuate(
                &mut ctx,
                UNIX_EPOCH + Duration::from_millis(now.max(0) as u64),
            ),
        };
        if let Err(e) = result {
            self.processor.cycle_aborted();
            return Err(format!("the processor failed its commit cycle: {e}"));
        }
        let mut batch = CommitBatch::default();
        for (store, mut writes) in pending {
            batch.changes.insert(store, writes.take());
        }
        self.backend
            .apply(batch)
            .map_err(|e| format!("the in-memory store refused a commit: {e}"))?;
        Ok(outputs)
    }

    /// Processes `record`, then what it was re-keyed into, as the runtime would.
    fn input(&mut self, record: InputRecord) -> Result<(), String> {
        let mut queue = VecDeque::from([record]);
        while let Some(record) = queue.pop_front() {
            for output in self.cycle(Cycle::Record(&record))? {
                if Some(&output.topic) == self.repartition.as_ref() {
                    queue.push_back(self.record(
                        &output.topic,
                        output.key.clone(),
                        output.value.clone(),
                        output.headers.clone(),
                    ));
                } else {
                    self.written(output);
                }
            }
        }
        Ok(())
    }

    fn punctuate(&mut self) -> Result<(), String> {
        for output in self.cycle(Cycle::Punctuate)? {
            self.written(output);
        }
        Ok(())
    }

    /// An input record at the current virtual time, at the topic's next offset.
    fn record(
        &mut self,
        topic: &str,
        key: Option<Vec<u8>>,
        value: Option<Vec<u8>>,
        headers: Vec<(String, Vec<u8>)>,
    ) -> InputRecord {
        let offset = self.offsets.entry(topic.to_string()).or_insert(0);
        *offset += 1;
        InputRecord {
            topic: topic.to_string(),
            partition: 0,
            offset: *offset - 1,
            timestamp_ms: self.now(),
            key,
            value,
            headers,
        }
    }

    fn written(&mut self, output: OutputRecord) {
        let key = output
            .key
            .as_deref()
            .map(|k| String::from_utf8_lossy(k).into_owned());
        let header = |name: &str| {
            output
                .headers
                .iter()
                .find(|(n, _)| n == name)
                .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
        };
        let dead_letter = header(dlq_headers::KIND).map(|reason| {
            (
                reason,
                header(dlq_headers::TOPIC).unwrap_or_else(|| "?".into()),
            )
        });
        let body = match &dead_letter {
            Some(_) => None,
            None => self.codec.read(&output.topic, output.value.as_deref()).ok(),
        };
        let written = Written {
            topic: output.topic,
            key,
            body,
            value: output.value,
            dead_letter,
        };
        if let (Some(key), Some(body)) = (&written.key, &written.body) {
            let is_command =
                self.def.versions().flat_map(|d| &d.steps).any(|s| {
                    s.command.topic == written.topic || s.compensation.topic == written.topic
                });
            if is_command {
                self.last_command.insert(key.clone(), body.clone());
            }
        }
        self.unchecked.push(written);
    }

    /// The earliest timer in the store.
    fn next_timer(&self) -> Result<Option<i64>, String> {
        let end = crate::state::prefix_end(TIMER_PREFIX);
        let first = self
            .backend
            .scan(SAGA_STORE, TIMER_PREFIX, end.as_deref(), 1)
            .map_err(|e| e.to_string())?;
        Ok(first.first().and_then(|(k, _)| timer_deadline(k)))
    }

    /// Moves the clock by `by`, firing each timer that falls due on the way at its deadline.
    fn advance(&mut self, by: Duration) -> Result<(), String> {
        let by = i64::try_from(by.as_millis())
            .map_err(|_| format!("advance by {}: too far", humantime::format_duration(by)))?;
        let target = self.now().saturating_add(by);
        let mut firings = 0;
        while let Some(at) = self.next_timer()?.filter(|at| *at <= target) {
            firings += 1;
            if firings > MAX_FIRINGS {
                return Err(format!(
                    "timers fired more than {MAX_FIRINGS} times within one advance"
                ));
            }
            if at > self.now() {
                self.clock.store(at, Ordering::Relaxed);
            }
            let before = self.next_timer()?;
            self.punctuate()?;
            // A timer the processor holds (an incompatible saga) stays where it is: move on.
            if self.next_timer()? == before && before.is_some_and(|b| b <= self.now()) {
                break;
            }
        }
        self.clock.store(target.max(self.now()), Ordering::Relaxed);
        self.punctuate()
    }

    /// The status of a saga, `none` when there is none.
    fn status(&self, saga: &str) -> Result<String, String> {
        match self
            .backend
            .get(SAGA_STORE, &saga_key(saga))
            .map_err(|e| e.to_string())?
        {
            Some(bytes) => decode_record(&bytes)
                .map(|r| r.status)
                .map_err(|e| e.to_string()),
            None => Ok("none".into()),
        }
    }

    /// The topic that carries `event` as an input in any loaded version.
    fn topic_of(&self, event: &str) -> Option<String> {
        self.def.versions().find_map(|d| {
            if d.start_event == event {
                return Some(d.start_topic.clone());
            }
            d.steps
                .iter()
                .find(|s| s.success == event || s.failure == event || s.confirmed_by == event)
                .map(|s| s.reply_topic.clone())
        })
    }
}

enum Cycle<'a> {
    Init,
    Record(&'a InputRecord),
    Punctuate,
}

/// What running a scenario found.
#[derive(Debug)]
pub struct Outcome {
    pub name: String,
    /// `None`: every expectation held. Otherwise where and how it failed, as a diff.
    pub failure: Option<String>,
}

/// Runs one scenario against a topology.
pub fn run(def: Arc<SagaDefinition>, scenario: &Scenario) -> Outcome {
    let failure = run_steps(def, scenario).err();
    Outcome {
        name: scenario.name.clone(),
        failure,
    }
}

fn run_steps(def: Arc<SagaDefinition>, scenario: &Scenario) -> Result<(), String> {
    let mut driver = Driver::new(def, scenario.start_ms)?;
    let started = scenario.start_ms;
    // An expectation that does not hold is reported and the scenario goes on (expectations
    // change nothing), so one run shows every difference; a step that cannot run ends it.
    let mut failed = Vec::new();
    for (i, (line, step)) in scenario.steps.iter().enumerate() {
        let at = |d: &Driver| {
            format!(
                "step {} (line {line}) at +{}",
                i + 1,
                humantime::format_duration(
                    Duration::from_millis((d.now() - started).max(0) as u64)
                )
            )
        };
        let result = match step {
            Step::Send(send) => send_record(&mut driver, scenario, i, send),
            Step::Advance(by) => humantime::parse_duration(by.trim())
                .map_err(|e| e.to_string())
                .and_then(|by| driver.advance(by)),
            Step::Expect(expect) => {
                if let Err(diff) = check(&mut driver, scenario, expect) {
                    failed.push(format!("{}: {diff}", at(&driver)));
                }
                Ok(())
            }
        };
        if let Err(e) = result {
            failed.push(format!("{}: {e}", at(&driver)));
            break;
        }
    }
    if failed.is_empty() {
        Ok(())
    } else {
        Err(failed.join("\n"))
    }
}

fn send_record(
    driver: &mut Driver,
    scenario: &Scenario,
    index: usize,
    send: &Send,
) -> Result<(), String> {
    let saga = send.saga.as_ref().or(scenario.saga.as_ref());
    let topic = match (&send.topic, &send.event) {
        (Some(topic), _) => topic.clone(),
        (None, Some(event)) => driver.topic_of(event).ok_or_else(|| {
            format!("no topic of the topology carries {event} as an input; give `topic:`")
        })?,
        (None, None) => return Err("send: give `event`, or `raw` with `topic`".into()),
    };
    let value = match (&send.raw, &send.event) {
        (Some(raw), _) => raw.clone().into_bytes(),
        (None, Some(event)) => {
            let saga = saga.ok_or("send: which saga? give `saga:` here or in the scenario")?;
            let event_id = send.event_id.clone().unwrap_or_else(|| {
                uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("{}/{index}", scenario.name).as_bytes(),
                )
                .to_string()
            });
            let body = event_body(driver, event, saga, &event_id, &send.data);
            serde_json::to_vec(&body).map_err(|e| e.to_string())?
        }
        (None, None) => return Err("send: give `event` or `raw`".into()),
    };
    let key = match &send.key {
        Some(key) => key.clone(),
        None => saga.cloned(),
    };
    let headers = send
        .headers
        .iter()
        .map(|(k, v)| (k.clone(), v.clone().into_bytes()))
        .collect();
    let record = driver.record(&topic, key.map(String::into_bytes), Some(value), headers);
    driver.input(record)
}

/// The body of an input event: the envelope, each declared field (from the saga's last command,
/// else a value of its type; the start event's from the demo's order generator), then `data`.
fn event_body(
    driver: &Driver,
    event: &str,
    saga: &str,
    event_id: &str,
    data: &Map<String, Value>,
) -> Value {
    let def = &driver.def;
    let mut body = Map::new();
    if event == def.start_event {
        if let Value::Object(generated) = super::load::order_created(def, saga) {
            let declared = def.events.get(event).into_iter().flatten();
            for field in declared {
                let value = generated
                    .get(&field.name)
                    .filter(|v| field.accepts(v))
                    .cloned()
                    .unwrap_or_else(|| super::participant::placeholder(field, saga));
                body.insert(field.name.clone(), value);
            }
        }
    } else {
        let empty = Map::new();
        let command = driver.last_command.get(saga).unwrap_or(&empty);
        body = super::participant::reply_payload(def, event, command, saga, None);
    }
    let mut event_body = json!({
        "event_id": event_id,
        "event_type": event,
        "event_version": 1,
        "occurred_at": rfc3339(driver.now()),
    });
    event_body[def.key_field.as_str()] = Value::String(saga.to_string());
    let Value::Object(mut envelope) = event_body else {
        return Value::Null;
    };
    envelope.append(&mut body);
    for (k, v) in data {
        match v {
            Value::Null => envelope.remove(k),
            v => envelope.insert(k.clone(), v.clone()),
        };
    }
    Value::Object(envelope)
}

fn check(driver: &mut Driver, scenario: &Scenario, expect: &Expect) -> Result<(), String> {
    let default_saga = scenario.saga.as_deref();
    let key_field = driver.def.key_field.clone();
    let written = std::mem::take(&mut driver.unchecked);
    let (dead, messages): (Vec<&Written>, Vec<&Written>) =
        written.iter().partition(|w| w.dead_letter.is_some());
    let mut problems = Vec::new();
    if let Some(expected) = &expect.emitted {
        let expected_full: Vec<ExpectedFull> = expected.iter().map(to_full).collect();
        if let Some(diff) = diff(
            "emitted",
            &expected_full,
            &messages,
            |e, w| message_matches(e, w, default_saga),
            describe_expected,
            |w| w.describe(&key_field),
        ) {
            problems.push(diff);
        }
    }
    if let Some(expected) = &expect.dead_letters {
        if let Some(diff) = diff(
            "dead_letters",
            expected,
            &dead,
            dead_letter_matches,
            |e| {
                format!(
                    "dead letter reason={}{}{}",
                    e.reason,
                    e.topic
                        .as_ref()
                        .map(|t| format!(" from {t}"))
                        .unwrap_or_default(),
                    e.key
                        .as_ref()
                        .map(|k| format!(" key={k}"))
                        .unwrap_or_default()
                )
            },
            |w| w.describe(&key_field),
        ) {
            problems.push(diff);
        }
    }
    if let Some(spec) = &expect.status {
        let wanted: Vec<(String, String)> = match spec {
            StatusSpec::One(status) => {
                let saga = default_saga.ok_or(
                    "`status: STATUS` needs the scenario's `saga:`; or give { saga: STATUS }",
                )?;
                vec![(saga.to_string(), status.clone())]
            }
            StatusSpec::Many(map) => map.iter().map(|(k, v)| (k.clone(), v.clone())).collect(),
        };
        for (saga, status) in wanted {
            let actual = driver.status(&saga)?;
            if actual != status {
                problems.push(format!(
                    "status of {saga}:\n  - expected: {status}\n  + actual:   {actual}"
                ));
            }
        }
    }
    if problems.is_empty() {
        Ok(())
    } else {
        Err(format!("expect did not hold\n{}", problems.join("\n")))
    }
}

fn to_full(e: &ExpectedMessage) -> ExpectedFull {
    match e {
        ExpectedMessage::Type(t) => ExpectedFull {
            event: t.clone(),
            saga: None,
            topic: None,
            fields: Map::new(),
        },
        ExpectedMessage::Full(f) => f.clone(),
    }
}

fn describe_expected(e: &ExpectedFull) -> String {
    let mut text = e.event.clone();
    if let Some(saga) = &e.saga {
        text.push_str(&format!(" saga={saga}"));
    }
    if let Some(topic) = &e.topic {
        text.push_str(&format!(" on {topic}"));
    }
    if !e.fields.is_empty() {
        text.push_str(&format!(" {}", Value::Object(e.fields.clone())));
    }
    text
}

fn message_matches(e: &ExpectedFull, w: &Written, default_saga: Option<&str>) -> bool {
    let saga = e.saga.as_deref().or(default_saga);
    w.event_type() == e.event
        && saga.is_none_or(|s| w.key.as_deref() == Some(s))
        && e.topic.as_ref().is_none_or(|t| *t == w.topic)
        && e.fields.iter().all(|(k, v)| {
            w.body
                .as_ref()
                .and_then(|b| b.get(k))
                .is_some_and(|actual| loose_eq(v, actual))
        })
}

fn dead_letter_matches(e: &ExpectedDeadLetter, w: &Written) -> bool {
    let Some((reason, source)) = &w.dead_letter else {
        return false;
    };
    *reason == e.reason
        && e.topic.as_ref().is_none_or(|t| t == source)
        && e.key.as_ref().is_none_or(|k| w.key.as_ref() == Some(k))
}

/// JSON equality where numbers compare by value (`10` equals `10.0`).
fn loose_eq(expected: &Value, actual: &Value) -> bool {
    match (expected, actual) {
        (Value::Number(a), Value::Number(b)) => a.as_f64() == b.as_f64(),
        (Value::Array(a), Value::Array(b)) => {
            a.len() == b.len() && a.iter().zip(b).all(|(x, y)| loose_eq(x, y))
        }
        (Value::Object(a), Value::Object(b)) => {
            a.len() == b.len()
                && a.iter()
                    .all(|(k, x)| b.get(k).is_some_and(|y| loose_eq(x, y)))
        }
        (a, b) => a == b,
    }
}

/// The expected list against what was written, position by position: `None` when they agree,
/// else the lines of a diff (`  ` agreed, `- ` expected, `+ ` written).
fn diff<E>(
    what: &str,
    expected: &[E],
    written: &[&Written],
    matches: impl Fn(&E, &Written) -> bool,
    show_expected: impl Fn(&E) -> String,
    show_written: impl Fn(&Written) -> String,
) -> Option<String> {
    let agree =
        expected.len() == written.len() && expected.iter().zip(written).all(|(e, w)| matches(e, w));
    if agree {
        return None;
    }
    let mut lines = vec![format!(
        "{what}: expected {}, written {}:",
        expected.len(),
        written.len()
    )];
    for i in 0..expected.len().max(written.len()) {
        match (expected.get(i), written.get(i)) {
            (Some(e), Some(w)) if matches(e, w) => lines.push(format!("    {}", show_written(w))),
            (e, w) => {
                if let Some(e) = e {
                    lines.push(format!("  - {}", show_expected(e)));
                }
                if let Some(w) = w {
                    lines.push(format!("  + {}", show_written(w)));
                }
            }
        }
    }
    Some(lines.join("\n"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_scalars_are_typed_and_quoted_ones_stay_strings() {
        let node = yaml("a: 10\nb: '10'\nc: 2.5\nd: ~\ne: true\nf: x\n").unwrap();
        assert_eq!(
            to_json(&node),
            json!({"a": 10, "b": "10", "c": 2.5, "d": null, "e": true, "f": "x"})
        );
    }

    #[test]
    fn a_bad_step_is_named_with_its_line() {
        let text = "name: n\nsaga: s\nsteps:\n  - send: { event: OrderCreated }\n  - sned: {}\n";
        let e = parse("f.yaml", text).unwrap_err();
        assert!(e.starts_with("f.yaml:5: step 2:"), "{e}");
        let e = parse("f.yaml", "name: n\nsteps:\n  - advance: soon\n").unwrap_err();
        assert!(e.contains("advance 'soon'"), "{e}");
        let e = parse("f.yaml", "name: n\nname: m\nsteps:\n  - advance: 1s\n").unwrap_err();
        assert!(e.contains("uplicate"), "{e}");
    }

    #[test]
    fn numbers_compare_by_value() {
        assert!(loose_eq(&json!(10), &json!(10.0)));
        assert!(!loose_eq(&json!("10"), &json!(10)));
        assert!(loose_eq(&json!({"a": [1]}), &json!({"a": [1.0]})));
    }
}

/// One message of [`examples`].
#[derive(Debug, Clone)]
pub struct Example {
    pub topic: String,
    pub event_type: String,
    /// The record value (JSON) as sent to the saga or as the saga wrote it.
    pub value: Value,
}

/// An example of every message of the topology, made by running sagas through the real processor:
/// one that completes, one failing at each step (its compensations confirmed), and one whose last
/// step succeeds after its timeout (so the last compensation is written too). The first of each
/// event type, inputs and outputs, in the order they occurred.
pub fn examples(def: Arc<SagaDefinition>) -> Result<Vec<Example>, String> {
    let start_ms = humantime::parse_rfc3339_weak(DEFAULT_START)
        .map_err(|e| e.to_string())?
        .duration_since(UNIX_EPOCH)
        .map_err(|e| e.to_string())?
        .as_millis() as i64;
    let mut driver = Driver::new(def.clone(), start_ms)?;
    let mut found: Vec<Example> = Vec::new();
    let steps = def.steps.len();
    // (saga, the step that fails, whether its success comes late instead)
    let mut plans = vec![("order-1".to_string(), None, false)];
    for i in 0..steps {
        plans.push((format!("order-{}", i + 2), Some(i), false));
    }
    plans.push((format!("order-{}", steps + 2), Some(steps - 1), true));
    let mut n = 0;
    for (saga, failing, late) in plans {
        let mut send = |driver: &mut Driver, event: &str, found: &mut Vec<Example>| {
            n += 1;
            let event_id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("example/{n}").as_bytes(),
            )
            .to_string();
            let body = event_body(driver, event, &saga, &event_id, &Map::new());
            let topic = driver.topic_of(event).unwrap_or_default();
            note(found, &topic, event, &body);
            let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            let record =
                driver.record(&topic, Some(saga.clone().into_bytes()), Some(bytes), vec![]);
            driver.input(record)?;
            confirm_compensations(driver, found)
        };
        send(&mut driver, &def.start_event, &mut found)?;
        for (i, step) in def.steps.iter().enumerate() {
            match failing {
                Some(f) if f == i && late => {
                    // Until the step is given up (its retries, if any, run out first).
                    let waiting = driver.status(&saga)?;
                    for _ in 0..100 {
                        driver.advance(step.timeout)?;
                        confirm_compensations(&mut driver, &mut found)?;
                        if driver.status(&saga)? != waiting {
                            break;
                        }
                    }
                    send(&mut driver, &step.success, &mut found)?;
                    break;
                }
                Some(f) if f == i => {
                    send(&mut driver, &step.failure, &mut found)?;
                    break;
                }
                _ => send(&mut driver, &step.success, &mut found)?,
            }
        }
    }
    Ok(found)
}

/// Records the first example of `event_type`.
fn note(found: &mut Vec<Example>, topic: &str, event_type: &str, value: &Value) {
    if !found.iter().any(|e| e.event_type == event_type) {
        found.push(Example {
            topic: topic.to_string(),
            event_type: event_type.to_string(),
            value: value.clone(),
        });
    }
}

/// Notes what the saga wrote since the last call and confirms each compensation it sent, as the
/// participants would, until none is left.
fn confirm_compensations(driver: &mut Driver, found: &mut Vec<Example>) -> Result<(), String> {
    loop {
        let written = std::mem::take(&mut driver.unchecked);
        let mut confirmations = Vec::new();
        for w in &written {
            let value = w
                .value
                .as_deref()
                .and_then(|v| serde_json::from_slice::<Value>(v).ok())
                .unwrap_or(Value::Null);
            note(found, &w.topic, w.event_type(), &value);
            let step = driver.def.steps.iter().find(|s| {
                s.compensation.event_type == w.event_type() && s.compensation.topic == w.topic
            });
            if let (Some(step), Some(key)) = (step, &w.key) {
                confirmations.push((step.confirmed_by.clone(), key.clone()));
            }
        }
        if confirmations.is_empty() {
            return Ok(());
        }
        for (event, saga) in confirmations {
            let event_id = uuid::Uuid::new_v5(
                &uuid::Uuid::NAMESPACE_OID,
                format!("example/{saga}/{event}").as_bytes(),
            )
            .to_string();
            let body = event_body(driver, &event, &saga, &event_id, &Map::new());
            let topic = driver.topic_of(&event).unwrap_or_default();
            note(found, &topic, &event, &body);
            let bytes = serde_json::to_vec(&body).map_err(|e| e.to_string())?;
            let record = driver.record(&topic, Some(saga.into_bytes()), Some(bytes), vec![]);
            driver.input(record)?;
        }
    }
}
