//! Dead letters for operators: read a topology's DLQ topics `read_committed` to their end,
//! filter them, and replay them, a record written back to the partition it was read from with
//! its original key, value and headers, marked as a replay. `saga-streams dlq` and the
//! inspector's DLQ page both use this.
//!
//! The loop guard: a replayed record carries `saga-streams.replay.from` (the dead letter it came
//! from) and `saga-streams.replay.count`. Should it be dead-lettered again, its dead letter keeps
//! those headers, so the next replay knows the original was replayed and failed again and skips
//! both; `again` replays the latest failure once more, up to [`MAX_REPLAYS`] times in all.

use std::collections::BTreeMap;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::{json, Value};

use crate::runtime::client::KafkaClients;
use crate::saga::contract::rfc3339;
use crate::saga::processor::dlq_headers;
use crate::saga::topology::dlq_topic;
use crate::saga::SagaDefinition;
use crate::sim::{self, ReadRecord};

/// Headers a replay adds.
pub const REPLAY_FROM: &str = "saga-streams.replay.from";
pub const REPLAY_COUNT: &str = "saga-streams.replay.count";
pub const REPLAY_AT: &str = "saga-streams.replay.at";
/// On a marker record a replay writes to the dead-letter topic once a letter went through: the
/// letter (`topic/partition/offset`), and where its replay was written.
pub const REPLAYED: &str = "saga-streams.replayed";
pub const REPLAYED_TO: &str = "saga-streams.replayed.to";
/// No record is replayed more often than this, whatever `again` says.
pub const MAX_REPLAYS: u32 = 5;
/// Letters one replay writes at most (the others are reported, for the next run): a replay's
/// time and memory stay bounded.
pub const MAX_PER_REPLAY: usize = 1_000;

/// A dead letter.
pub struct Letter {
    pub record: ReadRecord,
    pub reason: String,
    /// Where it was read from: topic, partition, offset.
    pub source: Option<(String, i32, i64)>,
    /// `<topic>/<partition>/<offset>` of the dead letter itself.
    pub position: String,
    /// Set when this record was itself a replay: the dead letter it came from, and how often.
    pub replay_of: Option<(String, u32)>,
    /// Set on a replay's marker (not a dead letter): the letter that was replayed, and where to.
    pub marker: Option<(String, String)>,
}

fn header_text(record: &ReadRecord, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

impl Letter {
    pub fn of(record: ReadRecord) -> Letter {
        let reason = header_text(&record, dlq_headers::KIND).unwrap_or_else(|| "?".into());
        let source = header_text(&record, dlq_headers::TOPIC).map(|topic| {
            let number = |h| header_text(&record, h).and_then(|v| v.parse().ok());
            (
                topic,
                number(dlq_headers::PARTITION).unwrap_or(-1) as i32,
                number(dlq_headers::OFFSET).unwrap_or(-1),
            )
        });
        let replay_of = header_text(&record, REPLAY_FROM).map(|from| {
            let count = header_text(&record, REPLAY_COUNT)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            (from, count)
        });
        let marker = header_text(&record, REPLAYED)
            .map(|of| (of, header_text(&record, REPLAYED_TO).unwrap_or_default()));
        let position = format!("{}/{}/{}", record.topic, record.partition, record.offset);
        Letter {
            record,
            reason,
            source,
            position,
            replay_of,
            marker,
        }
    }

    /// Why it cannot be written back as it was read, when it kept only part of the record.
    pub fn incomplete(&self) -> Option<String> {
        if let Some(size) = header_text(&self.record, dlq_headers::ORIGINAL_SIZE) {
            return Some(format!(
                "the dead letter keeps only part of the value ({size} bytes in all): replay the record from its source offset"
            ));
        }
        header_text(&self.record, dlq_headers::HEADERS_DROPPED).map(|n| {
            format!("the dead letter lost the record's {n} headers (too large to keep): replay the record from its source offset")
        })
    }

    /// The record's key, or the key field of its JSON body.
    pub fn saga_id(&self, key_field: &str) -> Option<String> {
        if let Some(key) = &self.record.key {
            return Some(String::from_utf8_lossy(key).into_owned());
        }
        let body: Value = serde_json::from_slice(self.record.value.as_deref()?).ok()?;
        let body = body.get("event").filter(|e| e.is_object()).unwrap_or(&body);
        body.get(key_field)?.as_str().map(String::from)
    }

    pub fn message(&self) -> String {
        header_text(&self.record, dlq_headers::MESSAGE).unwrap_or_default()
    }

    /// The letter as JSON: its headers, and its value up to `preview` bytes (as text, or hex).
    pub fn json(&self, key_field: &str, preview: usize) -> Value {
        let value = self.record.value.as_deref().unwrap_or_default();
        let shown = &value[..value.len().min(preview)];
        let (text, is_hex) = match std::str::from_utf8(shown) {
            Ok(text) => (text.to_string(), false),
            // A cut inside a character: the longest valid prefix.
            Err(e) if e.valid_up_to() > 0 && e.error_len().is_none() => (
                String::from_utf8_lossy(&shown[..e.valid_up_to()]).into_owned(),
                false,
            ),
            Err(_) => (hex::encode(shown), true),
        };
        json!({
            "dlq_topic": self.record.topic,
            "partition": self.record.partition,
            "offset": self.record.offset,
            "position": self.position,
            "at": rfc3339(self.record.timestamp_ms),
            "reason": self.reason,
            "message": self.message(),
            "source": self.source.as_ref().map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o})),
            "saga_id": self.saga_id(key_field),
            "replay_of": self.replay_of.as_ref().map(|(from, n)| json!({"from": from, "count": n})),
            "key": self.record.key.as_deref().map(|k| String::from_utf8_lossy(k).into_owned()),
            "headers": self.record.headers.iter().map(|(n, v)| json!([n, String::from_utf8_lossy(v)])).collect::<Vec<_>>(),
            "value": text,
            "value_is_hex": is_hex,
            "value_bytes": value.len(),
        })
    }
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

/// The dead-letter topics named (an input topic stands for its DLQ; the prefix may be left
/// out), checked against the topology's; all of them when none is named.
pub fn dlq_topics(
    def: &SagaDefinition,
    prefix: &str,
    named: &[String],
) -> Result<Vec<String>, String> {
    let all: Vec<String> = def.input_topics().iter().map(|t| dlq_topic(t)).collect();
    if named.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in named {
        let candidates = [
            name.clone(),
            dlq_topic(name),
            format!("{prefix}{name}"),
            dlq_topic(&format!("{prefix}{name}")),
        ];
        match candidates.iter().find(|c| all.contains(c)) {
            Some(found) if !chosen.contains(found) => chosen.push(found.clone()),
            Some(_) => {}
            None => {
                return Err(format!(
                    "'{name}' is not a dead-letter topic of the topology (they are: {})",
                    all.join(", ")
                ))
            }
        }
    }
    Ok(chosen)
}

/// Which dead letters.
#[derive(Debug, Clone, Default)]
pub struct Filter {
    pub reasons: Vec<String>,
    /// Written at or after (ms since the epoch).
    pub since: Option<i64>,
    /// Written before.
    pub until: Option<i64>,
    /// Read at these offsets of their source partition (inclusive).
    pub offsets: Option<(i64, i64)>,
    pub saga_id: Option<String>,
    /// Exactly these dead letters (`topic/partition/offset`).
    pub positions: Vec<String>,
    pub key_field: String,
}

impl Filter {
    pub fn matches(&self, letter: &Letter) -> bool {
        let at = letter.record.timestamp_ms;
        letter.marker.is_none()
            && (self.reasons.is_empty() || self.reasons.contains(&letter.reason))
            && self.since.is_none_or(|t| at >= t)
            && self.until.is_none_or(|t| at < t)
            && self.offsets.is_none_or(|(from, to)| {
                letter
                    .source
                    .as_ref()
                    .is_some_and(|(_, _, o)| (from..=to).contains(o))
            })
            && self
                .saga_id
                .as_ref()
                .is_none_or(|id| letter.saga_id(&self.key_field).as_ref() == Some(id))
            && (self.positions.is_empty() || self.positions.contains(&letter.position))
    }
}

/// `FROM-TO` (inclusive) or one offset.
pub fn parse_offsets(text: &str) -> Result<(i64, i64), String> {
    let bad = || format!("source offsets '{text}': FROM-TO or one offset");
    let (from, to) = match text.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let one = text.trim().parse().map_err(|_| bad())?;
            (one, one)
        }
    };
    if from > to {
        return Err(bad());
    }
    Ok((from, to))
}

/// RFC 3339, or a duration before now (`2h`).
pub fn parse_time(text: &str) -> Result<i64, String> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| format!("'{text}' is neither an RFC 3339 time nor a duration ago (2h)"))?;
    Ok(now_ms().saturating_sub(ago.as_millis() as i64))
}

/// Hands every dead letter of `topics`, read to their end, to `each`.
pub fn for_each_letter(
    kafka: &(impl KafkaClients + ?Sized),
    topics: &[String],
    timeout: Duration,
    each: &mut dyn FnMut(Letter),
) -> Result<(), String> {
    sim::for_each_to_end(kafka, topics, timeout, &mut |record| {
        each(Letter::of(record))
    })
    .map_err(|e| format!("reading the dead-letter topics: {e}"))
}

/// What a replay would do with one letter: `Ok(n)`, replay it as the n-th replay; `Err(why)`,
/// skip it.
pub type Verdict = Result<u32, String>;

/// The verdict for each letter of `letters` that `filter` selects, in order. `letters` must
/// hold every record of the topics read (the markers and later failures decide).
pub fn plan<'a>(letters: &'a [Letter], filter: &Filter, again: bool) -> Vec<(&'a Letter, Verdict)> {
    // Letters whose replay was dead-lettered again: the failure's position names them.
    let failed_again: BTreeMap<&str, &str> = letters
        .iter()
        .filter_map(|l| {
            l.replay_of
                .as_ref()
                .map(|(from, _)| (from.as_str(), l.position.as_str()))
        })
        .collect();
    // Letters replayed before, and where to (the last time).
    let mut replayed: BTreeMap<&str, (&str, u32)> = BTreeMap::new();
    for (of, to) in letters.iter().filter_map(|l| l.marker.as_ref()) {
        let entry = replayed.entry(of.as_str()).or_insert((to.as_str(), 0));
        entry.0 = to.as_str();
        entry.1 += 1;
    }
    let mut planned = 0usize;
    letters
        .iter()
        .filter(|l| filter.matches(l))
        .map(|letter| {
            if planned >= MAX_PER_REPLAY {
                return (
                    letter,
                    Err(format!(
                        "more than {MAX_PER_REPLAY} letters in one replay: run it again for the rest"
                    )),
                );
            }
            let earlier = letter.replay_of.as_ref().map_or(0, |(_, n)| *n);
            let done = replayed.get(letter.position.as_str());
            let count = earlier + done.map_or(0, |(_, n)| *n);
            let verdict = if let Some(again) = failed_again.get(letter.position.as_str()) {
                Err(format!(
                    "replayed before and dead-lettered again at {again}"
                ))
            } else if let Some(why) = letter.incomplete() {
                Err(why)
            } else if letter.source.is_none() {
                Err("no source topic header: not a dead letter of saga-streams".into())
            } else if letter
                .source
                .as_ref()
                .is_some_and(|(topic, _, _)| dlq_topic(topic) != letter.record.topic)
            {
                // Written back only to the topic whose dead letters this topic holds: a header
                // naming another topic (the control topic...) is not followed.
                Err(format!(
                    "its source topic header names '{}', not the input of {}",
                    letter.source.as_ref().map_or("", |(t, _, _)| t.as_str()),
                    letter.record.topic
                ))
            } else if let (Some((to, _)), false) = (done, again) {
                Err(format!(
                    "replayed before, to {to}: replayed again only with --again"
                ))
            } else if earlier > 0 && !again {
                Err(format!(
                    "a replay (#{earlier}) that failed again: replayed only with --again"
                ))
            } else if count >= MAX_REPLAYS {
                Err(format!(
                    "replayed {count} times already (at most {MAX_REPLAYS})"
                ))
            } else {
                planned += 1;
                Ok(count + 1)
            };
            (letter, verdict)
        })
        .collect()
}

/// What happened to one letter of a replay.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case", tag = "outcome", content = "detail")]
pub enum Outcome {
    Replayed {
        offset: i64,
    },
    /// Replayed, but the marker saying so could not be written: a later replay would send it
    /// again.
    ReplayedUnmarked {
        offset: i64,
        why: String,
    },
    WouldBeReplayed,
    Skipped(String),
    Failed(String),
}

/// Carries out `plan` (writes nothing when `dry_run`): every write is sent, then each one's
/// acknowledgement awaited. The outcomes are in the plan's order.
pub fn replay(
    kafka: &(impl KafkaClients + ?Sized),
    plan: &[(&Letter, Verdict)],
    dry_run: bool,
) -> Result<Vec<Outcome>, String> {
    let producer: Option<FutureProducer> = if dry_run {
        None
    } else {
        Some(
            kafka
                .client_config()
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .set("message.timeout.ms", "30000")
                .create()
                // librdkafka's message may quote a setting's value: a secret's too.
                .map_err(|_| {
                    "the Kafka settings were refused when creating a producer".to_string()
                })?,
        )
    };
    let at = rfc3339(now_ms());
    let mut sent: Vec<Result<Option<DeliveryFuture>, String>> = Vec::new();
    for (letter, verdict) in plan {
        let (Ok(count), Some(producer), Some((topic, partition, _))) =
            (verdict, &producer, &letter.source)
        else {
            sent.push(Ok(None));
            continue;
        };
        let mut headers = OwnedHeaders::new();
        for (name, value) in &letter.record.headers {
            let ours = name.starts_with("dlq.")
                || [REPLAY_FROM, REPLAY_COUNT, REPLAY_AT].contains(&name.as_str());
            if !ours {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
        let count = count.to_string();
        for (name, value) in [
            (REPLAY_FROM, letter.position.as_str()),
            (REPLAY_COUNT, count.as_str()),
            (REPLAY_AT, at.as_str()),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if *partition >= 0 {
            record = record.partition(*partition);
        }
        if let Some(key) = &letter.record.key {
            record = record.key(key);
        }
        if let Some(value) = &letter.record.value {
            record = record.payload(value);
        }
        sent.push(
            producer
                .send_result(record)
                .map(Some)
                .map_err(|(e, _)| e.to_string()),
        );
    }
    let mut outcomes = Vec::with_capacity(plan.len());
    for ((letter, verdict), sent) in plan.iter().zip(sent) {
        outcomes.push(match (verdict, sent) {
            (Err(why), _) => Outcome::Skipped(why.clone()),
            (Ok(_), Ok(None)) => Outcome::WouldBeReplayed,
            // Bounded by message.timeout.ms: the future resolves with an error after it.
            (Ok(_), Ok(Some(delivery))) => match futures::executor::block_on(delivery) {
                Ok(Ok(d)) => match producer.as_ref().map(|p| mark(p, letter, &d)) {
                    Some(Err(e)) => Outcome::ReplayedUnmarked {
                        offset: d.offset,
                        why: e,
                    },
                    _ => Outcome::Replayed { offset: d.offset },
                },
                Ok(Err((e, _))) => Outcome::Failed(e.to_string()),
                Err(_) => Outcome::Failed("the producer went away".into()),
            },
            (Ok(_), Err(e)) => Outcome::Failed(e),
        });
    }
    Ok(outcomes)
}

/// Writes the marker that says `letter` went through (to `delivered`) into its own partition
/// of the dead-letter topic, and waits for it.
fn mark(
    producer: &FutureProducer,
    letter: &Letter,
    delivered: &rdkafka::producer::future_producer::Delivery,
) -> Result<(), String> {
    let topic = letter.source.as_ref().map_or("?", |(t, _, _)| t.as_str());
    let to = format!("{topic}/{}/{}", delivered.partition, delivered.offset);
    let headers = OwnedHeaders::new()
        .insert(Header {
            key: REPLAYED,
            value: Some(letter.position.as_str()),
        })
        .insert(Header {
            key: REPLAYED_TO,
            value: Some(to.as_str()),
        });
    // With a value: on a compacted dead-letter topic a null value would delete the letters of
    // the same key.
    let value =
        serde_json::to_vec(&json!({ "replayed": letter.position, "to": to })).unwrap_or_default();
    let mut record = FutureRecord::<[u8], [u8]>::to(&letter.record.topic)
        .partition(letter.record.partition)
        .headers(headers)
        .payload(&value);
    if let Some(key) = &letter.record.key {
        record = record.key(key);
    }
    let sent = producer
        .send_result(record)
        .map_err(|(e, _)| e.to_string())?;
    match futures::executor::block_on(sent) {
        Ok(Ok(_)) => Ok(()),
        Ok(Err((e, _))) => Err(e.to_string()),
        Err(_) => Err("the producer went away".into()),
    }
}

/// The most of a value a dead letter shows in the inspector.
const PREVIEW_BYTES: usize = 2_048;
/// Dead letters one inspector list shows at most.
const MAX_LISTED: usize = 500;
/// How long reading the dead-letter topics may take for one request.
const READ_TIMEOUT: Duration = Duration::from_secs(20);

/// The inspector's dead letters of one topology, read with the application's Kafka settings
/// (read again after a SIGHUP).
pub struct DlqService {
    settings: std::sync::Mutex<(u64, crate::runtime::client::KafkaSettings)>,
    def: std::sync::Arc<SagaDefinition>,
    /// One replay at a time in this instance: two at once would both miss the other's markers.
    replaying: std::sync::Mutex<()>,
    /// The last summary and when it was read: pages that ask often read the topics once.
    summary: std::sync::Mutex<Option<(std::time::Instant, Value)>>,
}

/// How long a summary of the dead-letter topics is served again before they are read anew.
const SUMMARY_FOR: Duration = Duration::from_secs(10);

impl DlqService {
    pub fn new(
        settings: crate::runtime::client::KafkaSettings,
        def: std::sync::Arc<SagaDefinition>,
    ) -> Self {
        Self {
            settings: std::sync::Mutex::new((crate::runtime::secrets::generation(), settings)),
            def,
            replaying: std::sync::Mutex::new(()),
            summary: std::sync::Mutex::new(None),
        }
    }

    fn kafka(&self) -> crate::runtime::client::KafkaSettings {
        let mut guard = self.settings.lock().unwrap_or_else(|p| p.into_inner());
        let now = crate::runtime::secrets::generation();
        if guard.0 != now {
            guard.0 = now;
            if let Err(e) = guard.1.reread_files() {
                tracing::warn!(error = %e, "dead letters: the rotated Kafka secrets cannot be read; the previous ones stay");
            }
        }
        guard.1.clone()
    }

    fn filter(&self, query: &crate::telemetry::http::DlqQuery) -> Result<Filter, String> {
        let text = |v: &Option<String>| v.clone().filter(|s| !s.trim().is_empty());
        Ok(Filter {
            reasons: text(&query.reason).into_iter().collect(),
            since: text(&query.since).as_deref().map(parse_time).transpose()?,
            until: text(&query.until).as_deref().map(parse_time).transpose()?,
            offsets: text(&query.source_offsets)
                .as_deref()
                .map(parse_offsets)
                .transpose()?,
            saga_id: text(&query.saga_id),
            positions: text(&query.positions)
                .map(|p| p.split(',').map(|s| s.trim().to_string()).collect())
                .unwrap_or_default(),
            key_field: self.def.key_field.clone(),
        })
    }

    fn read_summary(&self) -> Result<Value, String> {
        let kafka = self.kafka();
        let topics = dlq_topics(&self.def, "", &[])?;
        let mut counts: BTreeMap<String, BTreeMap<String, u64>> = topics
            .iter()
            .map(|t| (t.clone(), BTreeMap::new()))
            .collect();
        for_each_letter(&kafka, &topics, READ_TIMEOUT, &mut |l| {
            if l.marker.is_some() {
                return;
            }
            *counts
                .entry(l.record.topic.clone())
                .or_default()
                .entry(l.reason.clone())
                .or_default() += 1;
        })?;
        let topics: Vec<Value> = counts
            .into_iter()
            .map(|(topic, reasons)| {
                json!({ "topic": topic, "total": reasons.values().sum::<u64>(), "reasons": reasons })
            })
            .collect();
        Ok(json!({ "topics": topics }))
    }

    fn one_topic(&self, topic: &str) -> Result<Vec<String>, String> {
        dlq_topics(&self.def, "", std::slice::from_ref(&topic.to_string()))
    }
}

impl crate::telemetry::http::DeadLetters for DlqService {
    fn summary(&self) -> Result<Value, String> {
        // Held while reading: concurrent requests wait for one read instead of each reading.
        let mut cached = self.summary.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((at, value)) = cached.as_ref() {
            if at.elapsed() < SUMMARY_FOR {
                return Ok(value.clone());
            }
        }
        let value = self.read_summary()?;
        *cached = Some((std::time::Instant::now(), value.clone()));
        Ok(value)
    }

    fn list(&self, topic: &str, query: &crate::telemetry::http::DlqQuery) -> Result<Value, String> {
        let kafka = self.kafka();
        let topics = self.one_topic(topic)?;
        let filter = self.filter(query)?;
        let limit = query.limit.unwrap_or(100).clamp(1, MAX_LISTED);
        // The newest `limit` matches by time (partitions are read interleaved), in memory as
        // previews only.
        let mut newest: Vec<(i64, i32, i64, Value)> = Vec::new();
        let mut matching = 0usize;
        for_each_letter(&kafka, &topics, READ_TIMEOUT, &mut |l| {
            if filter.matches(&l) {
                matching += 1;
                let key = (l.record.timestamp_ms, l.record.partition, l.record.offset);
                if newest.len() < limit || newest.last().is_some_and(|n| (n.0, n.1, n.2) < key) {
                    let at = newest.partition_point(|n| (n.0, n.1, n.2) > key);
                    newest.insert(
                        at,
                        (
                            key.0,
                            key.1,
                            key.2,
                            l.json(&filter.key_field, PREVIEW_BYTES),
                        ),
                    );
                    newest.truncate(limit);
                }
            }
        })?;
        let records: Vec<Value> = newest.into_iter().map(|n| n.3).collect();
        Ok(json!({ "topic": topics[0], "matching": matching, "records": records }))
    }

    fn replay(
        &self,
        topic: &str,
        query: &crate::telemetry::http::DlqQuery,
        again: bool,
        dry_run: bool,
    ) -> Result<Value, String> {
        let _one_at_a_time = self.replaying.lock().unwrap_or_else(|p| p.into_inner());
        let kafka = self.kafka();
        let topics = self.one_topic(topic)?;
        let filter = self.filter(query)?;
        // Only the selected letters and those naming a replay are kept: the guard needs both.
        let mut letters = Vec::new();
        for_each_letter(&kafka, &topics, READ_TIMEOUT, &mut |l| {
            if filter.matches(&l) || l.replay_of.is_some() || l.marker.is_some() {
                letters.push(l);
            }
        })?;
        let plan = plan(&letters, &filter, again);
        let outcomes = replay(&kafka, &plan, dry_run)?;
        if !dry_run {
            *self.summary.lock().unwrap_or_else(|p| p.into_inner()) = None;
        }
        let mut counts = BTreeMap::from([("replayed", 0u64), ("skipped", 0), ("failed", 0)]);
        let results: Vec<Value> = plan
            .iter()
            .zip(&outcomes)
            .map(|((letter, _), outcome)| {
                let key = match outcome {
                    Outcome::Replayed { .. }
                    | Outcome::ReplayedUnmarked { .. }
                    | Outcome::WouldBeReplayed => "replayed",
                    Outcome::Skipped(_) => "skipped",
                    Outcome::Failed(_) => "failed",
                };
                *counts.entry(key).or_default() += 1;
                json!({ "position": letter.position, "reason": letter.reason, "result": outcome })
            })
            .collect();
        Ok(json!({
            "dry_run": dry_run,
            "replayed": counts["replayed"],
            "skipped": counts["skipped"],
            "failed": counts["failed"],
            "results": results,
        }))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::runtime::InputRecord;

    fn letter(offset: i64, source: &str, headers: &[(&str, &str)]) -> Letter {
        let mut all: Vec<(String, Vec<u8>)> = vec![
            (dlq_headers::TOPIC.into(), source.as_bytes().to_vec()),
            (dlq_headers::PARTITION.into(), b"0".to_vec()),
            (dlq_headers::OFFSET.into(), offset.to_string().into_bytes()),
            (dlq_headers::KIND.into(), b"unknown_saga".to_vec()),
        ];
        all.extend(
            headers
                .iter()
                .map(|(n, v)| (n.to_string(), v.as_bytes().to_vec())),
        );
        Letter::of(ReadRecord(InputRecord {
            topic: "payments.events.dlq".into(),
            partition: 0,
            offset,
            timestamp_ms: 1,
            key: Some(b"o-1".to_vec()),
            value: Some(b"{}".to_vec()),
            headers: all,
        }))
    }

    fn verdicts(letters: &[Letter], again: bool) -> Vec<Verdict> {
        plan(letters, &Filter::default(), again)
            .into_iter()
            .map(|(_, v)| v)
            .collect()
    }

    #[test]
    fn a_letter_goes_back_only_to_its_own_input_and_whole() {
        let letters = [
            letter(0, "payments.events", &[]),
            letter(1, "app-control", &[]),
            letter(
                2,
                "payments.events",
                &[(dlq_headers::ORIGINAL_SIZE, "2000000")],
            ),
            letter(3, "payments.events", &[(dlq_headers::HEADERS_DROPPED, "3")]),
        ];
        let v = verdicts(&letters, false);
        assert_eq!(v[0], Ok(1));
        assert!(
            v[1].as_ref().unwrap_err().contains("not the input"),
            "{v:?}"
        );
        assert!(v[2].is_err() && v[3].is_err(), "{v:?}");
    }

    #[test]
    fn a_replayed_letter_is_not_replayed_again_and_a_failed_replay_stops_the_loop() {
        let marker = letter(
            5,
            "payments.events",
            &[
                (REPLAYED, "payments.events.dlq/0/0"),
                (REPLAYED_TO, "payments.events/0/9"),
            ],
        );
        let failed = letter(
            6,
            "payments.events",
            &[
                (REPLAY_FROM, "payments.events.dlq/0/1"),
                (REPLAY_COUNT, "1"),
            ],
        );
        let letters = [
            letter(0, "payments.events", &[]),
            letter(1, "payments.events", &[]),
            marker,
            failed,
        ];
        // The marker is not a letter; the original of the failed replay is never replayed.
        let v = verdicts(&letters, false);
        assert_eq!(v.len(), 3, "{v:?}");
        assert!(
            v[0].as_ref().unwrap_err().contains("replayed before"),
            "{v:?}"
        );
        assert!(
            v[1].as_ref().unwrap_err().contains("dead-lettered again"),
            "{v:?}"
        );
        assert!(v[2].as_ref().unwrap_err().contains("--again"), "{v:?}");
        let v = verdicts(&letters, true);
        assert_eq!(v[0], Ok(2));
        assert!(v[1].is_err());
        assert_eq!(v[2], Ok(2));
    }

    #[test]
    fn one_replay_writes_a_bounded_number_of_letters() {
        let letters: Vec<Letter> = (0..MAX_PER_REPLAY as i64 + 3)
            .map(|o| letter(o, "payments.events", &[]))
            .collect();
        let v = verdicts(&letters, false);
        assert_eq!(v.iter().filter(|v| v.is_ok()).count(), MAX_PER_REPLAY);
        assert!(v
            .last()
            .unwrap()
            .as_ref()
            .unwrap_err()
            .contains("run it again"));
    }
}
