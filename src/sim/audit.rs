//! The auditor (`saga-streams audit`): reads every topic of a saga `read_committed` and checks the
//! invariants of DESIGN.md section 11:
//! - each started saga has exactly one outcome, and no outcome belongs to an unknown saga;
//! - each step's command is sent at most once, the first step's exactly once (a retry re-sends
//!   the same message with the same event id: it counts as the same command);
//! - a step's compensation is sent exactly once (same rule for re-sends) when the step succeeded
//!   and the saga was cancelled, never otherwise;
//! - nothing is sent after the outcome except the compensation of a step whose success came after
//!   that step failed or timed out.
//!
//! Input records that were dead-lettered (found through the DLQ's source headers) are left out: a
//! dead-lettered start event is not a saga, a dead-lettered reply was never applied.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::time::Duration;

use comfy_table::Table;
use serde_json::Value;

use super::{for_each_to_end, ReadRecord, SimError};
use crate::codec::Codec;
use crate::runtime::client::KafkaClients;
use crate::saga::processor::dlq_headers;
use crate::saga::topology::SagaDefinition;

#[derive(Debug, Default)]
struct Trail {
    created_at: Option<i64>,
    /// Commands and compensations: type, event id, timestamp.
    commands: Vec<(String, String, i64)>,
    success: HashSet<usize>,
    outcomes: Vec<(String, Option<String>, i64)>,
}

/// What the audit found.
#[derive(Debug, Default)]
pub struct AuditReport {
    pub sagas: u64,
    pub completed: u64,
    pub cancelled_by_reason: BTreeMap<String, u64>,
    pub without_outcome: u64,
    pub messages_by_type: BTreeMap<String, u64>,
    pub dead_letters_by_reason: BTreeMap<String, u64>,
    pub late_compensations: u64,
    pub violations: Vec<String>,
    /// Start event timestamp to outcome timestamp, per saga with an outcome, sorted.
    pub durations_ms: Vec<i64>,
    pub first_start_ms: Option<i64>,
    pub last_outcome_ms: Option<i64>,
}

impl AuditReport {
    pub fn is_clean(&self) -> bool {
        self.violations.is_empty()
    }

    /// The `q` quantile (0..=1) of saga durations, in ms.
    pub fn duration_quantile(&self, q: f64) -> Option<i64> {
        if self.durations_ms.is_empty() {
            return None;
        }
        let at = ((self.durations_ms.len() - 1) as f64 * q).round() as usize;
        self.durations_ms.get(at).copied()
    }

    /// Sagas finished per second, from the first start event to the last outcome.
    pub fn sagas_per_second(&self) -> Option<f64> {
        let (first, last) = (self.first_start_ms?, self.last_outcome_ms?);
        let finished = self.durations_ms.len() as f64;
        (last > first).then(|| finished * 1000.0 / (last - first) as f64)
    }

    /// The summary as a table.
    pub fn table(&self) -> String {
        let mut t = Table::new();
        t.set_header(vec!["", "count"]);
        t.add_row(vec!["sagas started".to_string(), self.sagas.to_string()]);
        t.add_row(vec!["completed".to_string(), self.completed.to_string()]);
        for (reason, n) in &self.cancelled_by_reason {
            t.add_row(vec![format!("cancelled: {reason}"), n.to_string()]);
        }
        t.add_row(vec![
            "without outcome".to_string(),
            self.without_outcome.to_string(),
        ]);
        for (kind, n) in &self.messages_by_type {
            t.add_row(vec![format!("sent: {kind}"), n.to_string()]);
        }
        t.add_row(vec![
            "late compensations (success after timeout)".to_string(),
            self.late_compensations.to_string(),
        ]);
        for (reason, n) in &self.dead_letters_by_reason {
            t.add_row(vec![format!("dead-lettered: {reason}"), n.to_string()]);
        }
        if let Some(rate) = self.sagas_per_second() {
            t.add_row(vec!["sagas/s".to_string(), format!("{rate:.0}")]);
        }
        for (name, q) in [("p50", 0.5), ("p99", 0.99)] {
            if let Some(ms) = self.duration_quantile(q) {
                t.add_row(vec![format!("saga duration {name}"), format!("{ms} ms")]);
            }
        }
        t.add_row(vec![
            "violations".to_string(),
            self.violations.len().to_string(),
        ]);
        t.to_string()
    }
}

fn parse(
    def: &SagaDefinition,
    codec: &Codec,
    r: &ReadRecord,
) -> Option<(String, String, serde_json::Map<String, Value>)> {
    let map = codec.read(&r.topic, r.value.as_deref()).ok()?;
    let event_type = map.get("event_type")?.as_str()?.to_string();
    let saga_id = match map.get(&def.key_field) {
        Some(Value::String(s)) if !s.is_empty() => s.clone(),
        Some(Value::Number(n)) => n.to_string(),
        _ => return None,
    };
    Some((saga_id, event_type, map))
}

/// Reads the saga's topics and checks them, streaming: dead letters first (they say which inputs
/// to leave out), then every other topic, one record at a time. What is kept is a small trail per
/// saga, never the records.
pub fn audit(
    kafka: &(impl KafkaClients + ?Sized),
    def: &SagaDefinition,
    codec: &Codec,
    timeout: Duration,
) -> Result<AuditReport, SimError> {
    let deadline = std::time::Instant::now() + timeout;
    let mut topics = def.input_topics();
    for t in def.output_topics() {
        if !topics.contains(&t) {
            topics.push(t);
        }
    }
    let (letters, others): (Vec<String>, Vec<String>) =
        topics.into_iter().partition(|t| t.ends_with(".dlq"));
    let mut auditor = Auditor::new(def, codec);
    for_each_to_end(kafka, &letters, timeout, &mut |r| auditor.dead_letter(&r))?;
    let left = deadline.saturating_duration_since(std::time::Instant::now());
    for_each_to_end(kafka, &others, left, &mut |r| auditor.record(&r))?;
    Ok(auditor.finish())
}

/// Checks records already read (all of the saga's topics).
pub fn check(def: &SagaDefinition, codec: &Codec, records: &[ReadRecord]) -> AuditReport {
    let mut auditor = Auditor::new(def, codec);
    let (letters, others): (Vec<&ReadRecord>, Vec<&ReadRecord>) =
        records.iter().partition(|r| r.topic.ends_with(".dlq"));
    for r in letters {
        auditor.dead_letter(r);
    }
    for r in others {
        auditor.record(r);
    }
    auditor.finish()
}

/// The audit's state while records stream through it.
pub struct Auditor<'a> {
    def: &'a SagaDefinition,
    codec: &'a Codec,
    report: AuditReport,
    /// Inputs that were dead-lettered: (topic, partition, offset).
    dead: HashSet<(String, i32, i64)>,
    command_kind: HashMap<(&'a str, &'a str), (usize, bool)>,
    trails: BTreeMap<String, Trail>,
}

impl<'a> Auditor<'a> {
    pub fn new(def: &'a SagaDefinition, codec: &'a Codec) -> Self {
        let mut command_kind = HashMap::new();
        for (i, s) in def.steps.iter().enumerate() {
            command_kind.insert(
                (s.command.topic.as_str(), s.command.event_type.as_str()),
                (i, false),
            );
            command_kind.insert(
                (
                    s.compensation.topic.as_str(),
                    s.compensation.event_type.as_str(),
                ),
                (i, true),
            );
        }
        Self {
            def,
            codec,
            report: AuditReport::default(),
            dead: HashSet::new(),
            command_kind,
            trails: BTreeMap::new(),
        }
    }

    /// A record of a DLQ topic; all of them come before any other record.
    pub fn dead_letter(&mut self, r: &ReadRecord) {
        let reason = r
            .header(dlq_headers::KIND)
            .unwrap_or_else(|| "unknown".into());
        *self
            .report
            .dead_letters_by_reason
            .entry(reason)
            .or_default() += 1;
        let topic = r.header(dlq_headers::TOPIC);
        let partition = r
            .header(dlq_headers::PARTITION)
            .and_then(|p| p.parse().ok());
        let offset = r.header(dlq_headers::OFFSET).and_then(|o| o.parse().ok());
        if let (Some(t), Some(p), Some(o)) = (topic, partition, offset) {
            self.dead.insert((t, p, o));
        }
    }

    /// A record of any other topic of the saga.
    pub fn record(&mut self, r: &ReadRecord) {
        let (def, report, trails) = (self.def, &mut self.report, &mut self.trails);
        if self
            .dead
            .contains(&(r.topic.clone(), r.partition, r.offset))
        {
            return;
        }
        let Some((saga_id, event_type, body)) = parse(def, self.codec, r) else {
            // Every record the orchestrator cannot read is dead-lettered, and everything it
            // writes is readable: anything else unreadable is a fault, not noise to skip.
            report.violations.push(format!(
                "{} partition {} offset {}: unreadable and not dead-lettered",
                r.topic, r.partition, r.offset
            ));
            return;
        };
        if r.topic == def.start_topic {
            if event_type == def.start_event {
                let trail = trails.entry(saga_id).or_default();
                trail.created_at = Some(
                    trail
                        .created_at
                        .map_or(r.timestamp_ms, |t| t.min(r.timestamp_ms)),
                );
            }
        } else if self
            .command_kind
            .contains_key(&(r.topic.as_str(), event_type.as_str()))
        {
            *report
                .messages_by_type
                .entry(event_type.clone())
                .or_default() += 1;
            trails.entry(saga_id).or_default().commands.push((
                event_type,
                event_id(&body),
                r.timestamp_ms,
            ));
        } else if r.topic == def.completed.topic && event_type == def.completed.event_type
            || r.topic == def.cancelled.topic && event_type == def.cancelled.event_type
        {
            let reason = body
                .get("reason")
                .and_then(Value::as_str)
                .map(str::to_string);
            trails
                .entry(saga_id)
                .or_default()
                .outcomes
                .push((event_type, reason, r.timestamp_ms));
        } else if let Some(step) = def
            .steps
            .iter()
            .position(|s| s.reply_topic == r.topic && s.success == event_type)
        {
            trails.entry(saga_id).or_default().success.insert(step);
        }
    }

    /// The report, once every record went through.
    pub fn finish(self) -> AuditReport {
        let (def, mut report, trails) = (self.def, self.report, self.trails);
        for (id, trail) in &trails {
            let mut violation = |v: String| {
                if report.violations.len() < 10_000 {
                    report.violations.push(format!("{id}: {v}"));
                }
            };
            let Some(created_at) = trail.created_at else {
                if !trail.outcomes.is_empty() || !trail.commands.is_empty() {
                    violation("messages for a saga that was never started".into());
                }
                continue;
            };
            report.sagas += 1;
            report.first_start_ms = Some(
                report
                    .first_start_ms
                    .map_or(created_at, |t| t.min(created_at)),
            );
            let outcome = match trail.outcomes.as_slice() {
                [] => {
                    report.without_outcome += 1;
                    violation("no outcome".into());
                    None
                }
                [one] => Some(one),
                many => {
                    violation(format!("{} outcomes", many.len()));
                    many.first()
                }
            };
            let cancelled = outcome.is_some_and(|(t, _, _)| *t == def.cancelled.event_type);
            if let Some((event_type, reason, at)) = outcome {
                if *event_type == def.completed.event_type {
                    report.completed += 1;
                } else {
                    *report
                        .cancelled_by_reason
                        .entry(reason.clone().unwrap_or_default())
                        .or_default() += 1;
                }
                report.durations_ms.push(at - created_at);
                report.last_outcome_ms = Some(report.last_outcome_ms.map_or(*at, |t| t.max(*at)));
            }
            // Distinct event ids per type: a re-send is the same message again.
            let distinct = |event_type: &str| {
                trail
                    .commands
                    .iter()
                    .filter(|(t, _, _)| t == event_type)
                    .map(|(_, id, _)| id.as_str())
                    .collect::<HashSet<&str>>()
                    .len()
            };
            for (i, step) in def.steps.iter().enumerate() {
                let sent = distinct(&step.command.event_type);
                let expected_max = 1;
                if sent > expected_max || (i == 0 && sent == 0) {
                    violation(format!("{} sent {sent} times", step.command.event_type));
                }
                let compensations = distinct(&step.compensation.event_type);
                let expected = usize::from(cancelled && trail.success.contains(&i));
                if compensations != expected {
                    violation(format!(
                        "{} sent {compensations} times, expected {expected} ({} {}, saga {})",
                        step.compensation.event_type,
                        step.success,
                        if trail.success.contains(&i) {
                            "seen"
                        } else {
                            "not seen"
                        },
                        if cancelled {
                            "cancelled"
                        } else {
                            "not cancelled"
                        }
                    ));
                }
            }
            if let Some((_, reason, outcome_at)) = outcome {
                for (event_type, _, at) in &trail.commands {
                    if at <= outcome_at {
                        continue;
                    }
                    // The step the saga stopped at (the reason names it) succeeded late.
                    let stopped_by = reason
                        .as_deref()
                        .unwrap_or_default()
                        .split(';')
                        .next()
                        .unwrap_or_default();
                    let late = def.steps.iter().any(|s| {
                        s.compensation.event_type == *event_type
                            && (stopped_by == format!("timeout:{}", s.name)
                                || stopped_by == format!("{}_failed", s.name))
                    });
                    if late {
                        report.late_compensations += 1;
                    } else {
                        violation(format!("{event_type} sent after the outcome"));
                    }
                }
            }
        }
        report.durations_ms.sort_unstable();
        report
    }
}

fn event_id(body: &serde_json::Map<String, Value>) -> String {
    body.get("event_id")
        .and_then(Value::as_str)
        .unwrap_or_default()
        .to_string()
}
