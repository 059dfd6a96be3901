//! The saga state machine: a pure function `(SagaRecord, SagaInput) -> (SagaRecord, outputs)`.
//!
//! No I/O and no clock: the caller passes `now_ms`. The processor persists the record, turns the
//! outputs into Kafka records and keeps the timer index in step with `next_timer_ms`, all in the
//! same commit cycle.
//!
//! Rules (DESIGN.md section 4):
//! - a step's success starts the next step, or completes the saga after the last one;
//! - a step's failure, or its timeout, compensates the steps that succeeded, one at a time in
//!   reverse order, each waiting for its confirmation (or its own timeout), then cancels;
//! - a duplicate event (same `event_id`) or a reply the saga does not wait for changes nothing;
//! - a success that arrives after its step timed out gets that step's compensation and nothing
//!   else (money taken late is refunded);
//! - a finished saga stays until its retention passes, then expires.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use super::topology::{
    EventRole, MessageSpec, SagaDefinition, COMPENSATING, COMPLETED, FAILED, PENDING,
};

/// The encoding version of [`SagaRecord`] as stored in RocksDB and the changelog.
pub const RECORD_VERSION: u32 = 1;
/// How many applied event ids a saga remembers for deduplication.
pub const RECENT_EVENT_IDS: usize = 32;
/// Transitions kept in the history (a saga has far fewer; this bounds a misbehaving producer).
pub const MAX_HISTORY: usize = 64;

/// Where the saga is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Waiting for the reply of step `step`.
    Running { step: usize },
    /// Waiting for the confirmation of step `step`'s compensation; `pending` are still to be
    /// compensated after it, in this order.
    Compensating {
        step: usize,
        pending: Vec<usize>,
        reason: String,
    },
    /// An outcome was emitted.
    Finished,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum OutcomeKind {
    Completed,
    Cancelled,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Outcome {
    pub kind: OutcomeKind,
    pub reason: Option<String>,
    pub at_ms: i64,
}

/// One entry of a saga's history.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Transition {
    pub at_ms: i64,
    /// The event type that caused it, or `timeout`.
    pub cause: String,
    pub event_id: Option<String>,
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
}

/// One saga as stored (JSON, versioned by `record_version`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    pub record_version: u32,
    pub saga_id: String,
    /// PENDING, a step's state, COMPENSATING, COMPLETED, FAILED or the compensated state.
    pub status: String,
    pub phase: Phase,
    /// The step whose reply (or compensation confirmation) the saga waits for.
    pub step_awaited: Option<String>,
    /// When the awaited reply times out (ms since the epoch).
    pub deadline_ms: Option<i64>,
    /// When a finished saga is removed.
    pub expires_at_ms: Option<i64>,
    /// The start event's payload plus each successful step's reply payload.
    pub context: Map<String, Value>,
    pub correlation_id: String,
    pub traceparent: Option<String>,
    /// Steps that succeeded, in order.
    pub completed_steps: Vec<usize>,
    /// The step that timed out, if any: its late success must be compensated.
    pub timed_out_step: Option<usize>,
    /// The late success of `timed_out_step` was compensated already.
    pub late_compensated: bool,
    pub outcome: Option<Outcome>,
    pub recent_event_ids: VecDeque<String>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// Messages emitted so far; numbers them for deterministic event ids.
    pub messages_sent: u32,
    pub history: Vec<Transition>,
}

/// An input event as the machine sees it: decoded, validated, its role known.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaEvent {
    pub event_id: String,
    pub event_type: String,
    pub role: EventRole,
    pub payload: Map<String, Value>,
    pub traceparent: Option<String>,
}

/// What caused a call to [`apply`].
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum SagaInput<'a> {
    Event(&'a SagaEvent),
    /// The saga's next timer may be due: the task has consumed every input up to
    /// `input_time_ms` (see `ProcessorContext::input_time_ms`), so a deadline at or before it
    /// passed with no reply written in time.
    Timer {
        input_time_ms: i64,
    },
}

/// What an output is, for metrics and audit.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    Command { step: usize },
    Compensation { step: usize, late: bool },
    Completed,
    Cancelled { reason: String },
}

/// A message to emit.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaOutput {
    pub kind: OutputKind,
    pub topic: String,
    pub event_type: String,
    pub event_id: String,
    pub payload: Map<String, Value>,
}

/// Why an input changed nothing.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Ignored {
    /// The event was applied before, or the saga already exists.
    Duplicate,
    /// A reply the saga does not wait for in its current phase.
    Unexpected,
    /// A timer that is not due (yet).
    NotDue,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::Unexpected => "unexpected",
            Self::NotDue => "not_due",
        }
    }
}

/// The result of [`apply`].
#[derive(Debug, Clone, PartialEq)]
pub enum Applied {
    Changed {
        record: Box<SagaRecord>,
        outputs: Vec<SagaOutput>,
    },
    Ignored(Ignored),
    /// The retention of a finished saga passed: remove it.
    Expired,
}

impl SagaRecord {
    /// The time at which [`apply`] with [`SagaInput::Timer`] has something to do: a step's
    /// deadline (its command's timestamp plus the step timeout) or the end of the retention.
    pub fn next_timer_ms(&self) -> Option<i64> {
        self.deadline_ms.or(self.expires_at_ms)
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }
}

/// Starts a saga from its start event. `correlation_id` comes from the event, its header, or is
/// generated by the caller.
pub fn start(
    def: &SagaDefinition,
    saga_id: &str,
    event: &SagaEvent,
    correlation_id: String,
    now_ms: i64,
) -> (SagaRecord, Vec<SagaOutput>) {
    let mut context = event.payload.clone();
    context.insert(def.key_field.clone(), Value::String(saga_id.to_string()));
    let mut record = SagaRecord {
        record_version: RECORD_VERSION,
        saga_id: saga_id.to_string(),
        status: PENDING.to_string(),
        phase: Phase::Finished,
        step_awaited: None,
        deadline_ms: None,
        expires_at_ms: None,
        context,
        correlation_id,
        traceparent: event.traceparent.clone(),
        completed_steps: Vec::new(),
        timed_out_step: None,
        late_compensated: false,
        outcome: None,
        recent_event_ids: VecDeque::new(),
        started_at_ms: now_ms,
        updated_at_ms: now_ms,
        messages_sent: 0,
        history: Vec::new(),
    };
    let mut outputs = Vec::new();
    run_step(def, &mut record, 0, now_ms, &mut outputs);
    record.recent_event_ids.push_back(event.event_id.clone());
    push_history(
        &mut record,
        now_ms,
        &event.event_type,
        Some(&event.event_id),
        "",
        None,
    );
    (record, outputs)
}

/// Applies an event or a timer to a saga.
pub fn apply(
    def: &SagaDefinition,
    current: &SagaRecord,
    input: SagaInput<'_>,
    now_ms: i64,
) -> Applied {
    let mut record = current.clone();
    let mut from = current.status.clone();
    let mut outputs = Vec::new();
    let (cause, event_id, note) = match input {
        SagaInput::Event(event) => {
            if current
                .recent_event_ids
                .iter()
                .any(|id| *id == event.event_id)
            {
                return Applied::Ignored(Ignored::Duplicate);
            }
            let note = match (&current.phase, event.role) {
                (_, EventRole::Start) => return Applied::Ignored(Ignored::Duplicate),
                (Phase::Running { step }, EventRole::Success(s)) if *step == s => {
                    merge(&mut record.context, &event.payload);
                    record.completed_steps.push(s);
                    record.status = def.steps[s].state.clone();
                    if s + 1 < def.steps.len() {
                        run_step(def, &mut record, s + 1, now_ms, &mut outputs);
                    } else {
                        // The last step's state is passed through on the way to COMPLETED; the
                        // history shows both.
                        push_history(
                            &mut record,
                            now_ms,
                            &event.event_type,
                            Some(&event.event_id),
                            &from,
                            None,
                        );
                        from = record.status.clone();
                        finish(
                            def,
                            &mut record,
                            OutcomeKind::Completed,
                            None,
                            now_ms,
                            &mut outputs,
                        );
                    }
                    None
                }
                (Phase::Running { step }, EventRole::Failure(s)) if *step == s => {
                    let reason = format!("{}_failed", def.steps[s].name);
                    begin_compensation(def, &mut record, reason, now_ms, &mut outputs);
                    None
                }
                (Phase::Compensating { step, .. }, EventRole::Compensated(s)) if *step == s => {
                    next_compensation(def, &mut record, now_ms, &mut outputs);
                    None
                }
                (_, EventRole::Success(s))
                    if current.timed_out_step == Some(s) && !current.late_compensated =>
                {
                    merge(&mut record.context, &event.payload);
                    record.late_compensated = true;
                    let compensation = &def.steps[s].compensation;
                    let kind = OutputKind::Compensation {
                        step: s,
                        late: true,
                    };
                    outputs.push(message(&mut record, compensation, kind, None));
                    Some(format!(
                        "step '{}' succeeded after its timeout: compensated",
                        def.steps[s].name
                    ))
                }
                _ => return Applied::Ignored(Ignored::Unexpected),
            };
            record.recent_event_ids.push_back(event.event_id.clone());
            while record.recent_event_ids.len() > RECENT_EVENT_IDS {
                record.recent_event_ids.pop_front();
            }
            (event.event_type.clone(), Some(event.event_id.clone()), note)
        }
        SagaInput::Timer { input_time_ms } => {
            let due = |at: Option<i64>| at.is_some_and(|t| t <= input_time_ms);
            match current.phase.clone() {
                Phase::Running { step } if due(current.deadline_ms) => {
                    record.timed_out_step = Some(step);
                    let reason = format!("timeout:{}", def.steps[step].name);
                    begin_compensation(def, &mut record, reason, now_ms, &mut outputs);
                    ("timeout".to_string(), None, None)
                }
                Phase::Compensating { step, .. } if due(current.deadline_ms) => {
                    next_compensation(def, &mut record, now_ms, &mut outputs);
                    (
                        "timeout".to_string(),
                        None,
                        Some(format!(
                            "compensation of step '{}' was not confirmed in time",
                            def.steps[step].name
                        )),
                    )
                }
                Phase::Finished if due(current.expires_at_ms) => return Applied::Expired,
                _ => return Applied::Ignored(Ignored::NotDue),
            }
        }
    };
    if let SagaInput::Event(event) = input {
        if event.traceparent.is_some() {
            record.traceparent = event.traceparent.clone();
        }
    }
    record.updated_at_ms = now_ms;
    push_history(
        &mut record,
        now_ms,
        &cause,
        event_id.as_deref(),
        &from,
        note,
    );
    Applied::Changed {
        record: Box::new(record),
        outputs,
    }
}

fn merge(context: &mut Map<String, Value>, payload: &Map<String, Value>) {
    for (k, v) in payload {
        context.insert(k.clone(), v.clone());
    }
}

fn push_history(
    record: &mut SagaRecord,
    now_ms: i64,
    cause: &str,
    event_id: Option<&str>,
    from: &str,
    note: Option<String>,
) {
    if record.history.len() >= MAX_HISTORY {
        record.history.remove(0);
    }
    record.history.push(Transition {
        at_ms: now_ms,
        cause: cause.to_string(),
        event_id: event_id.map(str::to_string),
        from: from.to_string(),
        to: record.status.clone(),
        note,
    });
}

/// A deterministic event id: the same saga emitting its n-th message always gets the same id, so
/// a cycle processed again after an abort produces identical records.
fn output_event_id(saga_id: &str, sequence: u32, event_type: &str) -> String {
    let name = format!("{saga_id}/{sequence}/{event_type}");
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

fn message(
    record: &mut SagaRecord,
    spec: &MessageSpec,
    kind: OutputKind,
    reason: Option<&str>,
) -> SagaOutput {
    let mut payload = Map::new();
    for (field, source) in &spec.fields {
        payload.insert(
            field.clone(),
            record.context.get(source).cloned().unwrap_or(Value::Null),
        );
    }
    if let Some(reason) = reason {
        payload.insert("reason".into(), Value::String(reason.to_string()));
    }
    let event_id = output_event_id(&record.saga_id, record.messages_sent, &spec.event_type);
    record.messages_sent += 1;
    SagaOutput {
        kind,
        topic: spec.topic.clone(),
        event_type: spec.event_type.clone(),
        event_id,
        payload,
    }
}

fn run_step(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    step: usize,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) {
    let spec = &def.steps[step];
    record.phase = Phase::Running { step };
    record.step_awaited = Some(spec.name.clone());
    record.deadline_ms = Some(now_ms.saturating_add(spec.timeout.as_millis() as i64));
    outputs.push(message(
        record,
        &spec.command,
        OutputKind::Command { step },
        None,
    ));
}

fn begin_compensation(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    reason: String,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) {
    let pending: Vec<usize> = record.completed_steps.iter().rev().copied().collect();
    record.phase = Phase::Compensating {
        step: usize::MAX,
        pending,
        reason,
    };
    next_compensation(def, record, now_ms, outputs);
}

/// Sends the next pending compensation, or cancels the saga when none is left.
fn next_compensation(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) {
    let Phase::Compensating {
        pending, reason, ..
    } = record.phase.clone()
    else {
        return;
    };
    match pending.split_first() {
        Some((&step, rest)) => {
            let spec = &def.steps[step];
            record.phase = Phase::Compensating {
                step,
                pending: rest.to_vec(),
                reason,
            };
            record.status = COMPENSATING.to_string();
            record.step_awaited = Some(spec.name.clone());
            record.deadline_ms = Some(now_ms.saturating_add(spec.timeout.as_millis() as i64));
            let kind = OutputKind::Compensation { step, late: false };
            outputs.push(message(record, &spec.compensation, kind, None));
        }
        None => finish(
            def,
            record,
            OutcomeKind::Cancelled,
            Some(reason),
            now_ms,
            outputs,
        ),
    }
}

fn finish(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    kind: OutcomeKind,
    reason: Option<String>,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) {
    let output = match kind {
        OutcomeKind::Completed => {
            record.status = COMPLETED.to_string();
            message(record, &def.completed, OutputKind::Completed, None)
        }
        OutcomeKind::Cancelled => {
            let reason = reason.clone().unwrap_or_default();
            record.status = if record.completed_steps.is_empty() {
                FAILED.to_string()
            } else {
                def.compensated_state.clone()
            };
            message(
                record,
                &def.cancelled,
                OutputKind::Cancelled {
                    reason: reason.clone(),
                },
                Some(&reason),
            )
        }
    };
    outputs.push(output);
    record.phase = Phase::Finished;
    record.step_awaited = None;
    record.deadline_ms = None;
    record.expires_at_ms = Some(now_ms.saturating_add(def.retention.as_millis() as i64));
    record.outcome = Some(Outcome {
        kind,
        reason,
        at_ms: now_ms,
    });
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn def(file: &str) -> SagaDefinition {
        SagaDefinition::load(std::path::Path::new(&format!(
            "{}/topologies/{file}",
            env!("CARGO_MANIFEST_DIR")
        )))
        .unwrap()
    }

    fn event(id: &str, def: &SagaDefinition, role: EventRole) -> SagaEvent {
        let event_type = match role {
            EventRole::Start => def.start_event.clone(),
            EventRole::Success(s) => def.steps[s].success.clone(),
            EventRole::Failure(s) => def.steps[s].failure.clone(),
            EventRole::Compensated(s) => def.steps[s].confirmed_by.clone(),
        };
        let mut payload = Map::new();
        if let EventRole::Success(0) = role {
            payload.insert("payment_id".into(), Value::String(format!("pay-{id}")));
        }
        if let EventRole::Start = role {
            payload.insert("total".into(), serde_json::json!(12.5));
            payload.insert("currency".into(), serde_json::json!("EUR"));
        }
        SagaEvent {
            event_id: id.to_string(),
            event_type,
            role,
            payload,
            traceparent: None,
        }
    }

    fn started(def: &SagaDefinition) -> (SagaRecord, Vec<SagaOutput>) {
        start(
            def,
            "o-1",
            &event("e0", def, EventRole::Start),
            "c-1".into(),
            1_000,
        )
    }

    fn changed(applied: Applied) -> (SagaRecord, Vec<SagaOutput>) {
        match applied {
            Applied::Changed { record, outputs } => (*record, outputs),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    fn types(outputs: &[SagaOutput]) -> Vec<&str> {
        outputs.iter().map(|o| o.event_type.as_str()).collect()
    }

    #[test]
    fn the_success_flow_completes() {
        let d = def("order_saga.yaml");
        let (r, out) = started(&d);
        assert_eq!(types(&out), ["ProcessPayment"]);
        assert_eq!(out[0].payload["amount"], serde_json::json!(12.5));
        assert_eq!(r.status, "PENDING");
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e1", &d, EventRole::Success(0))),
            2_000,
        ));
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("PAYMENT_COMPLETED", vec!["ReserveInventory"])
        );
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e2", &d, EventRole::Success(1))),
            3_000,
        ));
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("COMPLETED", vec!["OrderCompleted"])
        );
        let path: Vec<&str> = r.history.iter().map(|t| t.to.as_str()).collect();
        assert_eq!(
            path,
            [
                "PENDING",
                "PAYMENT_COMPLETED",
                "INVENTORY_RESERVED",
                "COMPLETED"
            ]
        );
        assert_eq!(r.deadline_ms, None);
        assert_eq!(
            r.expires_at_ms,
            Some(3_000 + d.retention.as_millis() as i64)
        );
    }

    #[test]
    fn inventory_failure_refunds_then_cancels() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, _) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e1", &d, EventRole::Success(0))),
            2_000,
        ));
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e2", &d, EventRole::Failure(1))),
            3_000,
        ));
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("COMPENSATING", vec!["RefundPayment"])
        );
        assert_eq!(out[0].payload["payment_id"], serde_json::json!("pay-e1"));
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e3", &d, EventRole::Compensated(0))),
            4_000,
        ));
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("REFUNDED", vec!["OrderCancelled"])
        );
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("inventory_failed")
        );
    }

    #[test]
    fn a_payment_timeout_cancels_and_a_late_success_is_refunded_once() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        assert_eq!(
            apply(
                &d,
                &r,
                SagaInput::Timer {
                    input_time_ms: 1_000
                },
                1_000
            ),
            Applied::Ignored(Ignored::NotDue)
        );
        let deadline = r.deadline_ms.unwrap();
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Timer {
                input_time_ms: deadline,
            },
            deadline,
        ));
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("FAILED", vec!["OrderCancelled"])
        );
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("timeout:payment")
        );
        let late = event("late", &d, EventRole::Success(0));
        let (r2, out) = changed(apply(&d, &r, SagaInput::Event(&late), deadline + 5));
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(r2.status, "FAILED");
        assert_eq!(r2.outcome, r.outcome);
        // The same late success again, or another one: nothing more.
        assert_eq!(
            apply(&d, &r2, SagaInput::Event(&late), deadline + 6),
            Applied::Ignored(Ignored::Duplicate)
        );
        let other = event("late2", &d, EventRole::Success(0));
        assert_eq!(
            apply(&d, &r2, SagaInput::Event(&other), deadline + 6),
            Applied::Ignored(Ignored::Unexpected)
        );
    }

    #[test]
    fn three_steps_compensate_in_reverse_order() {
        let d = def("order_with_shipping.yaml");
        let (r, _) = started(&d);
        let (r, _) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e1", &d, EventRole::Success(0))),
            2,
        ));
        let (r, _) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e2", &d, EventRole::Success(1))),
            3,
        ));
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e3", &d, EventRole::Failure(2))),
            4,
        ));
        assert_eq!(types(&out), ["ReleaseInventory"]);
        // The refund's confirmation before the release's is not what the saga waits for.
        assert_eq!(
            apply(
                &d,
                &r,
                SagaInput::Event(&event("x", &d, EventRole::Compensated(0))),
                5
            ),
            Applied::Ignored(Ignored::Unexpected)
        );
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e4", &d, EventRole::Compensated(1))),
            5,
        ));
        assert_eq!(types(&out), ["RefundPayment"]);
        let (r, out) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e5", &d, EventRole::Compensated(0))),
            6,
        ));
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("shipping_failed")
        );
        assert_eq!(r.status, "REFUNDED");
    }

    #[test]
    fn output_ids_are_deterministic_and_distinct() {
        let d = def("order_saga.yaml");
        let (_, a) = started(&d);
        let (_, b) = started(&d);
        assert_eq!(a[0].event_id, b[0].event_id);
        let (r, _) = started(&d);
        let (_, c) = changed(apply(
            &d,
            &r,
            SagaInput::Event(&event("e1", &d, EventRole::Success(0))),
            2,
        ));
        assert_ne!(a[0].event_id, c[0].event_id);
    }

    /// One scripted input: an event of some role (possibly a replay of an earlier one) or a timer
    /// firing some time later.
    #[derive(Debug, Clone)]
    enum Script {
        Reply { role: u8, step: usize },
        Replay(usize),
        Timer { after_ms: i64 },
    }

    fn script() -> impl Strategy<Value = Vec<Script>> {
        let one = prop_oneof![
            4 => (0u8..3, 0usize..3).prop_map(|(role, step)| Script::Reply { role, step }),
            1 => (0usize..20).prop_map(Script::Replay),
            2 => (0i64..60_000).prop_map(|after_ms| Script::Timer { after_ms }),
        ];
        proptest::collection::vec(one, 0..25)
    }

    /// Runs a script, then lets every timer fire until the saga finishes.
    fn run_script(d: &SagaDefinition, script: &[Script]) -> (SagaRecord, Vec<SagaOutput>) {
        let (mut record, mut all) = started(d);
        let mut now = 1_000;
        let mut applied: Vec<SagaEvent> = Vec::new();
        for (i, s) in script.iter().enumerate() {
            let input_event = match s {
                Script::Reply { role, step } => {
                    let step = step % d.steps.len();
                    let role = match role {
                        0 => EventRole::Success(step),
                        1 => EventRole::Failure(step),
                        _ => EventRole::Compensated(step),
                    };
                    Some(event(&format!("s{i}"), d, role))
                }
                Script::Replay(n) if !applied.is_empty() => {
                    Some(applied[n % applied.len()].clone())
                }
                Script::Replay(_) => None,
                Script::Timer { after_ms } => {
                    now += after_ms;
                    None
                }
            };
            now += 1;
            let result = match &input_event {
                Some(e) => apply(d, &record, SagaInput::Event(e), now),
                None => apply(d, &record, SagaInput::Timer { input_time_ms: now }, now),
            };
            match result {
                Applied::Changed { record: r, outputs } => {
                    if let Some(e) = input_event {
                        applied.push(e);
                    }
                    record = *r;
                    all.extend(outputs);
                }
                Applied::Ignored(_) | Applied::Expired => {}
            }
        }
        while !record.is_finished() {
            now = record
                .deadline_ms
                .expect("an unfinished saga has a deadline");
            let (r, outputs) = changed(apply(
                d,
                &record,
                SagaInput::Timer { input_time_ms: now },
                now,
            ));
            record = r;
            all.extend(outputs);
        }
        (record, all)
    }

    proptest! {
        #[test]
        fn every_saga_ends_in_exactly_one_outcome(script in script(), shipping in any::<bool>()) {
            let d = def(if shipping { "order_with_shipping.yaml" } else { "order_saga.yaml" });
            let (record, outputs) = run_script(&d, &script);
            let outcomes: Vec<&SagaOutput> = outputs.iter()
                .filter(|o| matches!(o.kind, OutputKind::Completed | OutputKind::Cancelled { .. }))
                .collect();
            prop_assert_eq!(outcomes.len(), 1);
            prop_assert!(record.outcome.is_some());
            // Nothing but a late compensation follows the outcome.
            let at = outputs.iter().position(|o| matches!(o.kind, OutputKind::Completed | OutputKind::Cancelled { .. })).unwrap();
            for o in &outputs[at + 1..] {
                prop_assert!(matches!(o.kind, OutputKind::Compensation { late: true, .. }), "{:?} after the outcome", o.kind);
            }
        }

        #[test]
        fn compensations_undo_completed_steps_in_reverse_order(script in script(), shipping in any::<bool>()) {
            let d = def(if shipping { "order_with_shipping.yaml" } else { "order_saga.yaml" });
            let (record, outputs) = run_script(&d, &script);
            let compensated: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Compensation { step, late: false } => Some(step),
                _ => None,
            }).collect();
            let late: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Compensation { step, late: true } => Some(step),
                _ => None,
            }).collect();
            let commanded: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Command { step } => Some(step),
                _ => None,
            }).collect();
            // Each step is commanded at most once, in order.
            prop_assert_eq!(commanded.clone(), (0..commanded.len()).collect::<Vec<_>>());
            match record.outcome.as_ref().unwrap().kind {
                OutcomeKind::Completed => {
                    prop_assert!(compensated.is_empty() && late.is_empty());
                    prop_assert_eq!(record.completed_steps.len(), d.steps.len());
                }
                OutcomeKind::Cancelled => {
                    let mut expected = record.completed_steps.clone();
                    expected.reverse();
                    prop_assert_eq!(compensated, expected);
                    // A late compensation only ever for the step that timed out, at most once.
                    prop_assert!(late.len() <= 1);
                    if let Some(step) = late.first() {
                        prop_assert_eq!(Some(*step), record.timed_out_step);
                    }
                }
            }
        }

        #[test]
        fn a_duplicate_changes_nothing(script in script()) {
            let d = def("order_saga.yaml");
            let (record, _) = run_script(&d, &script);
            // Replaying every event the finished saga has applied is ignored.
            for id in record.recent_event_ids.iter() {
                let mut e = event(id, &d, EventRole::Success(0));
                e.event_id = id.clone();
                prop_assert_eq!(apply(&d, &record, SagaInput::Event(&e), i64::MAX / 2), Applied::Ignored(Ignored::Duplicate));
            }
        }

        #[test]
        fn a_timeout_compensates_exactly_what_was_done(done in 0usize..3, shipping in any::<bool>()) {
            let d = def(if shipping { "order_with_shipping.yaml" } else { "order_saga.yaml" });
            let done = done % d.steps.len();
            let (mut r, _) = started(&d);
            for s in 0..done {
                r = changed(apply(&d, &r, SagaInput::Event(&event(&format!("ok{s}"), &d, EventRole::Success(s))), 2_000)).0;
            }
            let (mut r, mut out) = changed(apply(&d, &r, SagaInput::Timer { input_time_ms: r.deadline_ms.unwrap() }, r.deadline_ms.unwrap()));
            let mut refunds = Vec::new();
            while !r.is_finished() {
                for o in &out {
                    if let OutputKind::Compensation { step, .. } = o.kind { refunds.push(step); }
                }
                let Phase::Compensating { step, .. } = r.phase.clone() else { unreachable!() };
                (r, out) = changed(apply(&d, &r, SagaInput::Event(&event(&format!("c{step}"), &d, EventRole::Compensated(step))), 3_000));
            }
            prop_assert_eq!(refunds, (0..done).rev().collect::<Vec<_>>());
            let reason = format!("timeout:{}", d.steps[done].name);
            prop_assert_eq!(r.outcome.unwrap().reason, Some(reason));
        }
    }
}
