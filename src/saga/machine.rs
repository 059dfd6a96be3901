//! The saga state machine: a pure function `(SagaRecord, SagaInput) -> (SagaRecord, outputs)`.
//!
//! No I/O and no clock: the caller passes `now_ms`. The processor persists the record, turns the
//! outputs into Kafka records and keeps the timer index in step with `next_timer_ms`, all in the
//! same commit cycle.
//!
//! Rules (DESIGN.md section 4, README "Saga rules"):
//! - a step's success starts the next step, or completes the saga after the last one;
//! - a step whose reply does not come within its timeout is sent again (same message, same event
//!   id) while its `retry` policy allows, with a growing pause; then it has timed out;
//! - a step's failure, or its timeout, compensates the steps that succeeded, one at a time in
//!   reverse order, each waiting for its confirmation; an unconfirmed compensation is sent again
//!   (same event id) up to its `retry` attempts, then given up: the saga ends
//!   `COMPENSATION_STUCK`, never as cleanly compensated;
//! - a success that arrives after its step failed or timed out, even after the outcome, gets that
//!   step's compensation, queued with the others in reverse step order (money taken late is
//!   refunded); each step is compensated at most once;
//! - a duplicate event (same `event_id`), a second start, or a reply the saga does not wait for
//!   changes nothing;
//! - a finished saga stays until its retention passes, then shrinks to a tombstone until its
//!   dedupe retention passes: a start re-delivered meanwhile starts nothing, a late success is
//!   still compensated.

use std::collections::VecDeque;

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

pub use super::record::History;
use super::topology::{
    EventRole, MessageSpec, RetryPolicy, SagaDefinition, COMPENSATING, COMPENSATION_STUCK,
    COMPLETED, FAILED, PENDING,
};

/// The encoding version of [`SagaRecord`] as stored in RocksDB and the changelog (see
/// [`super::record`]): 3 is binary. Versions 1 (JSON, no retries, no tombstones) and 2 (JSON) are
/// read and upgraded by [`SagaRecord::upgrade`].
pub const RECORD_VERSION: u32 = 3;
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
    /// compensated after it, in this order. `after_outcome`: late compensations of a saga whose
    /// outcome was emitted already (it returns to `Finished` without a second outcome).
    Compensating {
        step: usize,
        pending: Vec<usize>,
        reason: String,
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        after_outcome: bool,
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
    /// The event type that caused it, `timeout`, `retry` or `retention`.
    pub cause: String,
    pub event_id: Option<String>,
    pub from: String,
    pub to: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub note: Option<String>,
    /// Where the input that caused it was read: `<topic>/<partition>/<offset>` (set by the
    /// processor; none for timers).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub source: Option<String>,
    /// The event types of the messages it sent (commands, compensations, the outcome).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub sent: Vec<String>,
    /// An operator's action that did not apply (the note says why).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub refused: bool,
}

/// The command or compensation a saga waits on, as sent: a retry sends exactly this again.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InFlight {
    pub step: usize,
    pub compensation: bool,
    pub topic: String,
    pub event_type: String,
    pub event_id: String,
    pub payload: Map<String, Value>,
    /// Sends so far.
    pub attempt: u32,
    /// Set while pausing before the next send (then `deadline_ms` is that time).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resend_at_ms: Option<i64>,
}

/// One saga as stored ([`super::record`], versioned by `record_version`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct SagaRecord {
    pub record_version: u32,
    pub saga_id: String,
    /// PENDING, a step's state, COMPENSATING, COMPLETED, FAILED, COMPENSATION_STUCK or the
    /// compensated state.
    pub status: String,
    pub phase: Phase,
    /// The step whose reply (or compensation confirmation) the saga waits for.
    pub step_awaited: Option<String>,
    /// When the awaited reply times out, or the next retry is due (ms since the epoch).
    pub deadline_ms: Option<i64>,
    /// When a finished saga shrinks to a tombstone, or a tombstone is removed.
    pub expires_at_ms: Option<i64>,
    /// The start event's payload plus each successful step's reply payload (a tombstone keeps
    /// only what compensations need).
    pub context: Map<String, Value>,
    pub correlation_id: String,
    pub traceparent: Option<String>,
    /// Steps that succeeded in their turn, in order.
    pub completed_steps: Vec<usize>,
    /// Steps that failed or timed out: a success of theirs arriving later is compensated.
    #[serde(default)]
    pub abandoned_steps: Vec<usize>,
    /// Steps whose compensation was sent: each at most once (a retry re-sends the same message).
    #[serde(default)]
    pub compensated_steps: Vec<usize>,
    /// Steps whose compensation was never confirmed after all its attempts.
    #[serde(default)]
    pub stuck_steps: Vec<usize>,
    /// The message awaited, kept for retries.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub in_flight: Option<InFlight>,
    /// The compensations given up unconfirmed (`stuck_steps`), as sent: `sagas resume` sends
    /// exactly these again, same event ids, so a participant that did act on one can tell.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub given_up: Vec<InFlight>,
    /// Version 1 only: the step that timed out (read into `abandoned_steps`).
    #[serde(default, skip_serializing)]
    pub timed_out_step: Option<usize>,
    /// Version 1 only: its late success was compensated (read into `compensated_steps`).
    #[serde(default, skip_serializing)]
    pub late_compensated: bool,
    pub outcome: Option<Outcome>,
    pub recent_event_ids: VecDeque<String>,
    pub started_at_ms: i64,
    pub updated_at_ms: i64,
    /// Messages emitted so far; numbers them for deterministic event ids.
    pub messages_sent: u32,
    pub history: History,
    /// The record shrank to what deduplication and late compensations need.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub tombstone: bool,
    /// The start event's id, mixed into the ids of the saga's messages: a saga id used again
    /// after its tombstone expired gets new message ids (participants would take the old ones
    /// for duplicates). Empty in records written before it existed.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub id_seed: String,
    /// The topology version the saga started under (1 in records written before versions).
    #[serde(default = "first_version", skip_serializing_if = "is_first_version")]
    pub topology_version: u32,
    /// That version's [`SagaDefinition::fingerprint`]; empty in records written before it.
    #[serde(default, skip_serializing_if = "String::is_empty")]
    pub topology_fingerprint: String,
}

fn first_version() -> u32 {
    1
}

fn is_first_version(v: &u32) -> bool {
    *v == 1
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

/// What an output is, for metrics and audit. `attempt` is 1 for a first send, more for a retry
/// (which carries the first send's event id).
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum OutputKind {
    Command {
        step: usize,
        attempt: u32,
    },
    /// `late`: the step's success came after it failed or timed out.
    Compensation {
        step: usize,
        late: bool,
        attempt: u32,
    },
    Completed,
    Cancelled {
        reason: String,
    },
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
    /// The event was applied before.
    Duplicate,
    /// A start event for a saga that exists (live, finished or a tombstone).
    AlreadyStarted,
    /// A reply the saga does not wait for in its current phase.
    Unexpected,
    /// A timer that is not due (yet).
    NotDue,
}

impl Ignored {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Duplicate => "duplicate",
            Self::AlreadyStarted => "already_started",
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
    /// The dedupe retention of a finished saga passed: remove it.
    Expired,
}

impl SagaRecord {
    /// The time at which [`apply`] with [`SagaInput::Timer`] has something to do: a step's
    /// deadline (its command's timestamp plus the step timeout), a retry, or the end of a
    /// retention.
    pub fn next_timer_ms(&self) -> Option<i64> {
        self.deadline_ms.or(self.expires_at_ms)
    }

    pub fn is_finished(&self) -> bool {
        matches!(self.phase, Phase::Finished)
    }

    /// Whether every step this record names exists in `def`; `Err` says which does not (a
    /// topology with fewer steps than the one the saga started under).
    pub fn fits(&self, def: &SagaDefinition) -> Result<(), String> {
        let mut named: Vec<usize> = Vec::new();
        match &self.phase {
            Phase::Running { step } => named.push(*step),
            Phase::Compensating { step, pending, .. } => {
                named.push(*step);
                named.extend(pending);
            }
            Phase::Finished => {}
        }
        named.extend(&self.completed_steps);
        named.extend(&self.abandoned_steps);
        named.extend(&self.compensated_steps);
        named.extend(&self.stuck_steps);
        named.extend(self.in_flight.as_ref().map(|f| f.step));
        // The step awaited must be the one of that name: a topology whose steps were renamed or
        // reordered under the same version has the index, but not the step.
        let awaited = match &self.phase {
            Phase::Running { step } | Phase::Compensating { step, .. } => Some(*step),
            Phase::Finished => None,
        };
        if let (Some(step), Some(name)) = (awaited, &self.step_awaited) {
            if let Some(spec) = def.steps.get(step).filter(|s| s.name != *name) {
                return Err(format!(
                    "saga '{}' waits on step '{name}' but step {} of topology '{}' is '{}'",
                    self.saga_id,
                    step + 1,
                    def.name,
                    spec.name
                ));
            }
        }
        match named.iter().find(|s| **s >= def.steps.len()) {
            Some(step) => Err(format!(
                "saga '{}' refers to step {} but topology '{}' has {} steps",
                self.saga_id,
                step + 1,
                def.name,
                def.steps.len()
            )),
            None => Ok(()),
        }
    }

    /// Brings a record of an earlier version to the current one (a no-op for current ones).
    pub fn upgrade(mut self) -> Self {
        if self.record_version >= RECORD_VERSION {
            return self;
        }
        // Version 2 is version 3 in JSON.
        if self.record_version >= 2 {
            self.record_version = RECORD_VERSION;
            return self;
        }
        // Version 1: one timed-out step and a flag for its late compensation; compensations
        // were sent for every completed step except those still pending.
        if let Some(step) = self.timed_out_step.take() {
            push_once(&mut self.abandoned_steps, step);
            if self.late_compensated {
                push_once(&mut self.compensated_steps, step);
            }
        }
        // A saga cancelled (or compensating) because a step failed: that step is the one after
        // the last that succeeded, and its success may still come.
        let reason = match (&self.phase, &self.outcome) {
            (Phase::Compensating { reason, .. }, _) => Some(reason.clone()),
            (Phase::Finished, Some(o)) if o.kind == OutcomeKind::Cancelled => o.reason.clone(),
            _ => None,
        };
        if reason.is_some_and(|r| r.ends_with("_failed")) {
            push_once(&mut self.abandoned_steps, self.completed_steps.len());
        }
        let not_yet: Vec<usize> = match &self.phase {
            Phase::Running { .. } => self.completed_steps.clone(),
            Phase::Compensating { pending, .. } => pending.clone(),
            Phase::Finished => match self.outcome.as_ref().map(|o| o.kind) {
                Some(OutcomeKind::Cancelled) => Vec::new(),
                _ => self.completed_steps.clone(),
            },
        };
        for step in self.completed_steps.clone() {
            if !not_yet.contains(&step) {
                push_once(&mut self.compensated_steps, step);
            }
        }
        self.late_compensated = false;
        self.record_version = RECORD_VERSION;
        self
    }

    /// A version 1 record waiting for a reply had no copy of the message it waits for: it is
    /// rebuilt (the last message the saga sent, same event id) so that it can be sent again.
    pub fn rebuild_in_flight(&mut self, def: &SagaDefinition) {
        if self.in_flight.is_some() || self.messages_sent == 0 || self.fits(def).is_err() {
            return;
        }
        let (step, compensation) = match &self.phase {
            Phase::Running { step } => (*step, false),
            Phase::Compensating { step, .. } => (*step, true),
            Phase::Finished => return,
        };
        let spec = &def.steps[step];
        let spec = if compensation {
            &spec.compensation
        } else {
            &spec.command
        };
        let mut payload = Map::new();
        for (field, source) in &spec.fields {
            payload.insert(
                field.clone(),
                self.context.get(source).cloned().unwrap_or(Value::Null),
            );
        }
        self.in_flight = Some(InFlight {
            step,
            compensation,
            topic: spec.topic.clone(),
            event_type: spec.event_type.clone(),
            event_id: output_event_id(
                &self.saga_id,
                &self.id_seed,
                self.messages_sent - 1,
                &spec.event_type,
            ),
            payload,
            attempt: 1,
            resend_at_ms: None,
        });
    }
}

/// The saga as it was, its timer moved to `retry_at_ms`: the outputs of its due timer could not
/// be written (`why`), so nothing changed and the timer is tried again later.
pub fn hold_for_retry(record: &SagaRecord, retry_at_ms: i64, now_ms: i64, why: &str) -> SagaRecord {
    let mut held = record.clone();
    held.deadline_ms = Some(retry_at_ms);
    let from = held.status.clone();
    push_history(
        &mut held,
        now_ms,
        "timeout",
        None,
        &from,
        Some(format!(
            "outputs could not be written, tried again later: {why}"
        )),
    );
    held
}

fn push_once(steps: &mut Vec<usize>, step: usize) {
    if !steps.contains(&step) {
        steps.push(step);
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
        abandoned_steps: Vec::new(),
        compensated_steps: Vec::new(),
        stuck_steps: Vec::new(),
        in_flight: None,
        given_up: Vec::new(),
        timed_out_step: None,
        late_compensated: false,
        outcome: None,
        recent_event_ids: VecDeque::new(),
        started_at_ms: now_ms,
        updated_at_ms: now_ms,
        messages_sent: 0,
        history: History::default(),
        tombstone: false,
        id_seed: event.event_id.clone(),
        topology_version: def.version,
        topology_fingerprint: def.fingerprint.clone(),
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
            let Some(note) = apply_event(def, &mut record, event, now_ms, &mut from, &mut outputs)
            else {
                return Applied::Ignored(match event.role {
                    EventRole::Start => Ignored::AlreadyStarted,
                    _ => Ignored::Unexpected,
                });
            };
            record.recent_event_ids.push_back(event.event_id.clone());
            while record.recent_event_ids.len() > RECENT_EVENT_IDS {
                record.recent_event_ids.pop_front();
            }
            if event.traceparent.is_some() {
                record.traceparent = event.traceparent.clone();
            }
            (event.event_type.clone(), Some(event.event_id.clone()), note)
        }
        SagaInput::Timer { input_time_ms } => {
            if current.next_timer_ms().is_none_or(|t| t > input_time_ms) {
                return Applied::Ignored(Ignored::NotDue);
            }
            match apply_timer(def, &mut record, input_time_ms, now_ms, &mut outputs) {
                TimerResult::Changed { cause, note } => (cause.to_string(), None, note),
                TimerResult::Expired => return Applied::Expired,
                TimerResult::NotDue => return Applied::Ignored(Ignored::NotDue),
            }
        }
    };
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

/// The effect of an event; `None` when it changes nothing. `Some(note)` otherwise.
fn apply_event(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    event: &SagaEvent,
    now_ms: i64,
    from: &mut String,
    outputs: &mut Vec<SagaOutput>,
) -> Option<Option<String>> {
    match (record.phase.clone(), event.role) {
        (_, EventRole::Start) => None,
        (Phase::Running { step }, EventRole::Success(s)) if step == s => {
            merge(&mut record.context, &event.payload);
            record.completed_steps.push(s);
            record.in_flight = None;
            record.status = def.steps[s].state.clone();
            if s + 1 < def.steps.len() {
                run_step(def, record, s + 1, now_ms, outputs);
            } else {
                // The last step's state is passed through on the way to COMPLETED; the history
                // shows both.
                push_history(
                    record,
                    now_ms,
                    &event.event_type,
                    Some(&event.event_id),
                    from,
                    None,
                );
                from.clone_from(&record.status);
                finish(def, record, OutcomeKind::Completed, None, now_ms, outputs);
            }
            Some(None)
        }
        (Phase::Running { step }, EventRole::Failure(s)) if step == s => {
            record.in_flight = None;
            push_once(&mut record.abandoned_steps, s);
            let reason = format!("{}_failed", def.steps[s].name);
            begin_compensation(def, record, reason, now_ms, outputs);
            Some(None)
        }
        (Phase::Compensating { step, .. }, EventRole::Compensated(s)) if step == s => {
            record.in_flight = None;
            next_compensation(def, record, now_ms, outputs);
            Some(None)
        }
        (_, EventRole::Compensated(s)) if record.stuck_steps.contains(&s) => {
            record.stuck_steps.retain(|x| *x != s);
            record.given_up.retain(|f| f.step != s);
            if record.is_finished() {
                record.status = final_status(def, record);
            }
            Some(Some(format!(
                "the compensation of step '{}' was confirmed after it was given up",
                def.steps[s].name
            )))
        }
        (phase, EventRole::Success(s))
            if record.abandoned_steps.contains(&s)
                && !record.compensated_steps.contains(&s)
                && !matches!(phase, Phase::Running { .. }) =>
        {
            merge(&mut record.context, &event.payload);
            let why = if record.is_finished() {
                "after the saga ended"
            } else {
                "after the step failed or timed out"
            };
            match phase {
                Phase::Compensating {
                    step,
                    mut pending,
                    reason,
                    after_outcome,
                } => {
                    if !pending.contains(&s) {
                        pending.push(s);
                        // Reverse step order, as the compensations of the steps done in their
                        // turn: a late one waits behind the one in flight.
                        pending.sort_unstable_by(|a, b| b.cmp(a));
                    }
                    record.phase = Phase::Compensating {
                        step,
                        pending,
                        reason,
                        after_outcome,
                    };
                }
                _ => {
                    let reason = record
                        .outcome
                        .as_ref()
                        .and_then(|o| o.reason.clone())
                        .unwrap_or_default();
                    record.phase = Phase::Compensating {
                        step: usize::MAX,
                        pending: vec![s],
                        reason,
                        after_outcome: true,
                    };
                    next_compensation(def, record, now_ms, outputs);
                }
            }
            Some(Some(format!(
                "step '{}' succeeded {why}: its compensation is queued",
                def.steps[s].name
            )))
        }
        _ => None,
    }
}

enum TimerResult {
    Changed {
        cause: &'static str,
        note: Option<String>,
    },
    Expired,
    NotDue,
}

fn apply_timer(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    input_time_ms: i64,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) -> TimerResult {
    match record.phase.clone() {
        Phase::Running { step } | Phase::Compensating { step, .. }
            if record.deadline_ms.is_some_and(|d| d <= input_time_ms) =>
        {
            let compensating = matches!(record.phase, Phase::Compensating { .. });
            let spec = &def.steps[step];
            let policy = if compensating {
                spec.compensation_retry
            } else {
                spec.retry
            };
            let what = if compensating {
                format!("the compensation of step '{}'", spec.name)
            } else {
                format!("step '{}'", spec.name)
            };
            if let Some(note) = retry(record, &policy, spec.timeout, &what, now_ms, outputs) {
                return TimerResult::Changed {
                    cause: "retry",
                    note: Some(note),
                };
            }
            let given_up = record.in_flight.take();
            if compensating {
                if let Some(flight) = given_up {
                    record.given_up.retain(|f| f.step != flight.step);
                    record.given_up.push(flight);
                }
                push_once(&mut record.stuck_steps, step);
                next_compensation(def, record, now_ms, outputs);
                TimerResult::Changed {
                    cause: "timeout",
                    note: Some(format!(
                        "{what} was not confirmed after {} attempts: given up (COMPENSATION_STUCK)",
                        policy.attempts
                    )),
                }
            } else {
                push_once(&mut record.abandoned_steps, step);
                let reason = format!("timeout:{}", spec.name);
                begin_compensation(def, record, reason, now_ms, outputs);
                TimerResult::Changed {
                    cause: "timeout",
                    note: None,
                }
            }
        }
        Phase::Finished if record.expires_at_ms.is_some_and(|t| t <= input_time_ms) => {
            let ended = record.outcome.as_ref().map_or(now_ms, |o| o.at_ms);
            let tombstone_until = ended.saturating_add(def.dedupe_retention.as_millis() as i64);
            if record.tombstone || tombstone_until <= input_time_ms {
                return TimerResult::Expired;
            }
            shrink_to_tombstone(def, record, tombstone_until);
            TimerResult::Changed {
                cause: "retention",
                note: Some("retention passed: kept as a tombstone for deduplication".into()),
            }
        }
        _ => TimerResult::NotDue,
    }
}

/// Re-sends the awaited message, or starts the pause before it, while the policy has attempts
/// left. Returns the history note, or `None` when the attempts are used up.
fn retry(
    record: &mut SagaRecord,
    policy: &RetryPolicy,
    timeout: std::time::Duration,
    what: &str,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) -> Option<String> {
    let flight = record.in_flight.as_mut()?;
    if flight.resend_at_ms.is_some() {
        outputs.push(send_again(flight, &record.abandoned_steps));
        let note = format!("{what}: sent again (attempt {})", flight.attempt);
        record.deadline_ms = Some(now_ms.saturating_add(timeout.as_millis() as i64));
        return Some(note);
    }
    if flight.attempt >= policy.attempts {
        return None;
    }
    let pause = policy.pause_before(flight.attempt);
    let at = now_ms.saturating_add(pause.as_millis() as i64);
    flight.resend_at_ms = Some(at);
    record.deadline_ms = Some(at);
    Some(format!(
        "{what}: no reply to attempt {}; sending again in {}",
        flight.attempt,
        humantime::format_duration(pause)
    ))
}

/// The awaited message once more, exactly as first sent (same event id), as the next attempt.
fn send_again(flight: &mut InFlight, abandoned_steps: &[usize]) -> SagaOutput {
    flight.resend_at_ms = None;
    flight.attempt += 1;
    let kind = if flight.compensation {
        OutputKind::Compensation {
            step: flight.step,
            late: abandoned_steps.contains(&flight.step),
            attempt: flight.attempt,
        }
    } else {
        OutputKind::Command {
            step: flight.step,
            attempt: flight.attempt,
        }
    };
    SagaOutput {
        kind,
        topic: flight.topic.clone(),
        event_type: flight.event_type.clone(),
        event_id: flight.event_id.clone(),
        payload: flight.payload.clone(),
    }
}

fn shrink_to_tombstone(def: &SagaDefinition, record: &mut SagaRecord, until_ms: i64) {
    let keep = def.compensation_fields();
    record
        .context
        .retain(|field, _| *field == def.key_field || keep.contains(field.as_str()));
    record.history.clear();
    record.recent_event_ids.clear();
    record.tombstone = true;
    record.expires_at_ms = Some(until_ms);
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
    record.history.push(Transition {
        at_ms: now_ms,
        cause: cause.to_string(),
        event_id: event_id.map(str::to_string),
        from: from.to_string(),
        to: record.status.clone(),
        note,
        source: None,
        sent: Vec::new(),
        refused: false,
    });
}

/// A deterministic event id: the same saga emitting its n-th message always gets the same id, so
/// a cycle processed again after an abort produces identical records. The seed (the start event's
/// id) tells apart two sagas that used the same saga id at different times.
fn output_event_id(saga_id: &str, seed: &str, sequence: u32, event_type: &str) -> String {
    let name = if seed.is_empty() {
        format!("{saga_id}/{sequence}/{event_type}")
    } else {
        format!("{saga_id}/{seed}/{sequence}/{event_type}")
    };
    uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, name.as_bytes()).to_string()
}

/// An operator's action on one saga (`saga-streams sagas retry|cancel|resume`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "action", rename_all = "snake_case")]
pub enum Action {
    /// Send the awaited command or compensation again now, same event id.
    Retry,
    /// Compensate what was done, in reverse order, and end with the cancellation, reason
    /// `manual: <reason>`.
    Cancel { reason: String },
    /// Send the compensations given up unconfirmed again (a `COMPENSATION_STUCK` saga).
    Resume,
}

impl Action {
    pub fn name(&self) -> &'static str {
        match self {
            Action::Retry => "retry",
            Action::Cancel { .. } => "cancel",
            Action::Resume => "resume",
        }
    }
}

/// What an action did.
#[derive(Debug, Clone, PartialEq)]
pub enum Acted {
    /// Applied: the saga changed, these are its outputs.
    Applied {
        record: Box<SagaRecord>,
        outputs: Vec<SagaOutput>,
    },
    /// It does not apply to the saga as it is (`why`); the record only gains the history entry
    /// that says so.
    Refused {
        record: Box<SagaRecord>,
        why: String,
    },
    /// Its id was applied before.
    Duplicate,
}

/// Applies an operator's action (id `action_id`, requested by `by`) to a saga. The history entry
/// (cause `manual_<action>`, the action id as event id) names who asked and why, applied or not.
pub fn act(
    def: &SagaDefinition,
    current: &SagaRecord,
    action: &Action,
    action_id: &str,
    by: &str,
    now_ms: i64,
) -> Acted {
    if current.recent_event_ids.iter().any(|id| id == action_id) {
        return Acted::Duplicate;
    }
    let mut record = current.clone();
    let from = current.status.clone();
    let mut outputs = Vec::new();
    let finished = record.is_finished();
    let status = record.status.clone();
    let result: Result<String, String> = match action {
        Action::Retry => match (record.phase.clone(), record.in_flight.as_mut()) {
            (Phase::Running { step } | Phase::Compensating { step, .. }, Some(flight)) => {
                outputs.push(send_again(flight, &record.abandoned_steps));
                let note = format!("{} sent again (attempt {})", flight.event_type, flight.attempt);
                let timeout = def.steps.get(step).map_or(0, |s| s.timeout.as_millis() as i64);
                record.deadline_ms = Some(now_ms.saturating_add(timeout));
                Ok(note)
            }
            _ if status == COMPENSATION_STUCK => Err(format!(
                "the saga is {COMPENSATION_STUCK}: its given-up compensations are sent again by resume"
            )),
            _ => Err(format!(
                "the saga waits for no command or compensation (status {status})"
            )),
        },
        Action::Cancel { reason } => match record.phase.clone() {
            Phase::Running { step } => {
                record.in_flight = None;
                // The command was sent: should its success still come, it is compensated.
                push_once(&mut record.abandoned_steps, step);
                begin_compensation(def, &mut record, format!("manual: {reason}"), now_ms, &mut outputs);
                Ok(format!("cancelled: {reason}"))
            }
            Phase::Compensating { .. } => Err("the saga is compensating already".to_string()),
            Phase::Finished => Err(format!("the saga has ended (status {status})")),
        },
        Action::Resume if finished && !record.stuck_steps.is_empty() => {
            let stuck = std::mem::take(&mut record.stuck_steps);
            record
                .compensated_steps
                .retain(|s| !stuck.contains(s));
            let reason = record
                .outcome
                .as_ref()
                .and_then(|o| o.reason.clone())
                .unwrap_or_default();
            record.phase = Phase::Compensating {
                step: usize::MAX,
                pending: stuck.clone(),
                reason,
                after_outcome: true,
            };
            next_compensation(def, &mut record, now_ms, &mut outputs);
            let names: Vec<&str> = stuck
                .iter()
                .filter_map(|s| def.steps.get(*s).map(|spec| spec.name.as_str()))
                .collect();
            Ok(format!("resumed the compensations of {}", names.join(", ")))
        }
        Action::Resume => Err(format!(
            "only a {COMPENSATION_STUCK} saga can be resumed (status {status})"
        )),
    };
    let cause = format!("manual_{}", action.name());
    record.recent_event_ids.push_back(action_id.to_string());
    while record.recent_event_ids.len() > RECENT_EVENT_IDS {
        record.recent_event_ids.pop_front();
    }
    record.updated_at_ms = now_ms;
    match result {
        Ok(note) => {
            push_history(
                &mut record,
                now_ms,
                &cause,
                Some(action_id),
                &from,
                Some(format!("by {by}: {note}")),
            );
            Acted::Applied {
                record: Box::new(record),
                outputs,
            }
        }
        Err(why) => {
            // Nothing but the history entry: the saga is as it was.
            let mut refused = current.clone();
            refused.recent_event_ids = record.recent_event_ids;
            push_history(
                &mut refused,
                now_ms,
                &cause,
                Some(action_id),
                &from,
                Some(format!("by {by}: refused: {why}")),
            );
            if let Some(entry) = refused.history.fresh_mut().last_mut() {
                entry.refused = true;
            }
            Acted::Refused {
                record: Box::new(refused),
                why,
            }
        }
    }
}

/// A success was applied but what it leads to (the next command, or the outcome) cannot be
/// written: rather than keep what the step did (money taken) the saga compensates the steps
/// done and is cancelled with reason `<step>_unwritable` (`outcome_unwritable` after the last
/// step). `None` when the saga is not in such a state.
pub fn cancel_unwritable(
    def: &SagaDefinition,
    record: &SagaRecord,
    now_ms: i64,
    why: &str,
) -> Option<(SagaRecord, Vec<SagaOutput>)> {
    let mut record = record.clone();
    let reason = match (&record.phase, record.outcome.as_ref().map(|o| o.kind)) {
        (Phase::Running { step }, _) => format!("{}_unwritable", def.steps.get(*step)?.name),
        (Phase::Finished, Some(OutcomeKind::Completed)) => "outcome_unwritable".to_string(),
        _ => return None,
    };
    record.in_flight = None;
    record.outcome = None;
    record.expires_at_ms = None;
    let from = record.status.clone();
    let mut outputs = Vec::new();
    begin_compensation(def, &mut record, reason, now_ms, &mut outputs);
    push_history(
        &mut record,
        now_ms,
        "unwritable",
        None,
        &from,
        Some(format!("an output could not be written: {why}")),
    );
    Some((record, outputs))
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
    let event_id = output_event_id(
        &record.saga_id,
        &record.id_seed,
        record.messages_sent,
        &spec.event_type,
    );
    record.messages_sent += 1;
    SagaOutput {
        kind,
        topic: spec.topic.clone(),
        event_type: spec.event_type.clone(),
        event_id,
        payload,
    }
}

/// Sends a command or compensation and remembers it for retries.
fn send_awaited(
    record: &mut SagaRecord,
    spec: &MessageSpec,
    kind: OutputKind,
    outputs: &mut Vec<SagaOutput>,
) {
    let output = message(record, spec, kind.clone(), None);
    let (step, compensation) = match kind {
        OutputKind::Compensation { step, .. } => (step, true),
        OutputKind::Command { step, .. } => (step, false),
        _ => (usize::MAX, false),
    };
    record.in_flight = Some(InFlight {
        step,
        compensation,
        topic: output.topic.clone(),
        event_type: output.event_type.clone(),
        event_id: output.event_id.clone(),
        payload: output.payload.clone(),
        attempt: 1,
        resend_at_ms: None,
    });
    outputs.push(output);
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
    let kind = OutputKind::Command { step, attempt: 1 };
    send_awaited(record, &spec.command, kind, outputs);
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
        after_outcome: false,
    };
    next_compensation(def, record, now_ms, outputs);
}

/// Sends the next pending compensation, or ends the compensating phase when none is left:
/// cancels the saga, or (late compensations after the outcome) returns it to `Finished`.
fn next_compensation(
    def: &SagaDefinition,
    record: &mut SagaRecord,
    now_ms: i64,
    outputs: &mut Vec<SagaOutput>,
) {
    let Phase::Compensating {
        mut pending,
        reason,
        after_outcome,
        ..
    } = record.phase.clone()
    else {
        return;
    };
    pending.retain(|s| !record.compensated_steps.contains(s));
    match pending.split_first() {
        Some((&step, rest)) => {
            let spec = &def.steps[step];
            record.phase = Phase::Compensating {
                step,
                pending: rest.to_vec(),
                reason,
                after_outcome,
            };
            record.status = COMPENSATING.to_string();
            record.step_awaited = Some(spec.name.clone());
            record.deadline_ms = Some(now_ms.saturating_add(spec.timeout.as_millis() as i64));
            record.compensated_steps.push(step);
            let kind = OutputKind::Compensation {
                step,
                late: record.abandoned_steps.contains(&step),
                attempt: 1,
            };
            // A compensation given up before and resumed goes out again as it was first sent.
            match record.given_up.iter().position(|f| f.step == step) {
                Some(at) => {
                    let mut flight = record.given_up.remove(at);
                    flight.attempt = 1;
                    flight.resend_at_ms = None;
                    outputs.push(SagaOutput {
                        kind,
                        topic: flight.topic.clone(),
                        event_type: flight.event_type.clone(),
                        event_id: flight.event_id.clone(),
                        payload: flight.payload.clone(),
                    });
                    record.in_flight = Some(flight);
                }
                None => send_awaited(record, &spec.compensation, kind, outputs),
            }
        }
        None if after_outcome => {
            record.phase = Phase::Finished;
            record.step_awaited = None;
            record.deadline_ms = None;
            record.status = final_status(def, record);
            if record.expires_at_ms.is_none() {
                record.expires_at_ms =
                    Some(now_ms.saturating_add(def.retention.as_millis() as i64));
            }
        }
        None => {
            let reason = if record.stuck_steps.is_empty() {
                reason
            } else {
                let names: Vec<&str> = record
                    .stuck_steps
                    .iter()
                    .map(|s| def.steps[*s].name.as_str())
                    .collect();
                format!("{reason}; compensation_stuck:{}", names.join(","))
            };
            finish(
                def,
                record,
                OutcomeKind::Cancelled,
                Some(reason),
                now_ms,
                outputs,
            )
        }
    }
}

/// The status of a finished saga: its outcome, or how its compensations ended.
fn final_status(def: &SagaDefinition, record: &SagaRecord) -> String {
    match record.outcome.as_ref().map(|o| o.kind) {
        Some(OutcomeKind::Completed) => COMPLETED.to_string(),
        _ if !record.stuck_steps.is_empty() => COMPENSATION_STUCK.to_string(),
        _ if record.compensated_steps.is_empty() => FAILED.to_string(),
        _ => def.compensated_state.clone(),
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
    record.outcome = Some(Outcome {
        kind,
        reason: reason.clone(),
        at_ms: now_ms,
    });
    record.status = final_status(def, record);
    let output = match kind {
        OutcomeKind::Completed => message(record, &def.completed, OutputKind::Completed, None),
        OutcomeKind::Cancelled => {
            let reason = reason.unwrap_or_default();
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
    record.in_flight = None;
    record.expires_at_ms = Some(now_ms.saturating_add(def.retention.as_millis() as i64));
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

    /// The shipped topologies, and one whose steps and compensations retry.
    fn pick(which: u8) -> SagaDefinition {
        def(match which {
            0 => "order_saga.yaml",
            1 => "order_with_shipping.yaml",
            _ => "../tests/fixtures/order_saga_retries.yaml",
        })
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

    fn stored(record: SagaRecord) -> SagaRecord {
        let back =
            crate::saga::record::decode(&crate::saga::record::encode(&record).unwrap()).unwrap();
        assert_eq!(back, record);
        back
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

    /// The changed record, as read back from its stored bytes (so every test also covers the
    /// encoding: what the machine sees next is what the store would give it).
    fn changed(applied: Applied) -> (SagaRecord, Vec<SagaOutput>) {
        match applied {
            Applied::Changed { record, outputs } => (stored(*record), outputs),
            other => panic!("expected a change, got {other:?}"),
        }
    }

    /// Applies a reply (a new event id) that must change the saga.
    fn on(
        d: &SagaDefinition,
        r: &SagaRecord,
        id: &str,
        role: EventRole,
        at: i64,
    ) -> (SagaRecord, Vec<SagaOutput>) {
        changed(apply(d, r, SagaInput::Event(&event(id, d, role)), at))
    }

    /// `r` as a version 1 record would have stored it: without the fields named in `removed`.
    fn as_version_1(r: &SagaRecord, removed: &[&str]) -> SagaRecord {
        let mut v1 = serde_json::to_value(r).unwrap();
        let obj = v1.as_object_mut().unwrap();
        obj.insert("record_version".into(), 1.into());
        for field in removed {
            obj.remove(*field);
        }
        serde_json::from_value(v1).unwrap()
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
        let (r, out) = on(&d, &r, "e1", EventRole::Success(0), 2_000);
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("PAYMENT_COMPLETED", vec!["ReserveInventory"])
        );
        let (r, out) = on(&d, &r, "e2", EventRole::Success(1), 3_000);
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("COMPLETED", vec!["OrderCompleted"])
        );
        let entries = r.history.entries();
        let path: Vec<&str> = entries.iter().map(|t| t.to.as_str()).collect();
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
        let (r, _) = on(&d, &r, "e1", EventRole::Success(0), 2_000);
        let (r, out) = on(&d, &r, "e2", EventRole::Failure(1), 3_000);
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("COMPENSATING", vec!["RefundPayment"])
        );
        assert_eq!(out[0].payload["payment_id"], serde_json::json!("pay-e1"));
        let (r, out) = on(&d, &r, "e3", EventRole::Compensated(0), 4_000);
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
        assert!(matches!(
            out[0].kind,
            OutputKind::Compensation {
                step: 0,
                late: true,
                attempt: 1
            }
        ));
        assert_eq!(r2.status, "COMPENSATING");
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
        // Confirmed: finished again, no second outcome, the money given back.
        let (r3, out) = changed(apply(
            &d,
            &r2,
            SagaInput::Event(&event("refunded", &d, EventRole::Compensated(0))),
            deadline + 7,
        ));
        assert!(out.is_empty() && r3.is_finished());
        assert_eq!(r3.status, "REFUNDED");
        assert_eq!(r3.outcome, r.outcome);
    }

    fn confirm(
        d: &SagaDefinition,
        r: &SagaRecord,
        step: usize,
        at: i64,
    ) -> (SagaRecord, Vec<SagaOutput>) {
        let e = event(
            &format!("confirm-{step}-{at}"),
            d,
            EventRole::Compensated(step),
        );
        changed(apply(d, r, SagaInput::Event(&e), at))
    }

    fn fire(d: &SagaDefinition, r: &SagaRecord) -> (SagaRecord, Vec<SagaOutput>) {
        let at = r.next_timer_ms().expect("a timer");
        changed(apply(d, r, SagaInput::Timer { input_time_ms: at }, at))
    }

    /// Payment done, inventory failed: the refund is in flight.
    fn refunding(d: &SagaDefinition) -> (SagaRecord, Vec<SagaOutput>) {
        let (r, _) = started(d);
        let (r, _) = changed(apply(
            d,
            &r,
            SagaInput::Event(&event("e1", d, EventRole::Success(0))),
            2_000,
        ));
        changed(apply(
            d,
            &r,
            SagaInput::Event(&event("e2", d, EventRole::Failure(1))),
            3_000,
        ))
    }

    #[test]
    fn an_unconfirmed_compensation_is_sent_again_with_its_id_then_given_up_as_stuck() {
        let d = def("order_saga.yaml");
        let (mut r, first) = refunding(&d);
        let policy = d.steps[0].compensation_retry;
        let mut sent = first.clone();
        let mut pauses = Vec::new();
        while !r.is_finished() {
            let before = r.deadline_ms.unwrap();
            let (next, out) = fire(&d, &r);
            if next
                .in_flight
                .as_ref()
                .is_some_and(|f| f.resend_at_ms.is_some())
            {
                pauses.push(next.deadline_ms.unwrap() - before);
            }
            sent.extend(out);
            r = next;
        }
        let refunds: Vec<&SagaOutput> = sent
            .iter()
            .filter(|o| o.event_type == "RefundPayment")
            .collect();
        assert_eq!(refunds.len() as u32, policy.attempts);
        assert!(refunds
            .iter()
            .all(|o| o.event_id == first[0].event_id && o.payload == first[0].payload));
        let attempts: Vec<u32> = refunds
            .iter()
            .map(|o| match o.kind {
                OutputKind::Compensation { attempt, .. } => attempt,
                _ => 0,
            })
            .collect();
        assert_eq!(attempts, (1..=policy.attempts).collect::<Vec<_>>());
        // The pauses grow: 5 s, 10 s, 20 s, 40 s by default.
        let expected: Vec<i64> = (1..policy.attempts)
            .map(|n| policy.pause_before(n).as_millis() as i64)
            .collect();
        assert_eq!(pauses, expected);
        assert!(pauses.windows(2).all(|w| w[0] < w[1]));
        // Given up: cancelled, but never as cleanly refunded.
        assert_eq!(r.status, COMPENSATION_STUCK);
        assert_eq!(r.stuck_steps, vec![0]);
        let outcome = sent.last().unwrap();
        assert_eq!(outcome.event_type, "OrderCancelled");
        assert_eq!(
            outcome.payload["reason"],
            serde_json::json!("inventory_failed; compensation_stuck:payment")
        );
        // A confirmation after all clears it.
        let (r, out) = confirm(&d, &r, 0, i64::MAX / 4);
        assert!(out.is_empty());
        assert_eq!((r.status.as_str(), r.stuck_steps.len()), ("REFUNDED", 0));
    }

    #[test]
    fn a_compensation_confirmed_on_its_third_attempt_ends_refunded() {
        let d = def("order_saga.yaml");
        let (mut r, first) = refunding(&d);
        let mut refunds = first.len();
        while r.in_flight.as_ref().map(|f| f.attempt) < Some(3) {
            let (next, out) = fire(&d, &r);
            refunds += out.len();
            r = next;
        }
        assert_eq!(refunds, 3);
        let (r, out) = confirm(&d, &r, 0, r.deadline_ms.unwrap() - 1);
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("inventory_failed")
        );
        assert_eq!(r.status, "REFUNDED");
    }

    #[test]
    fn a_payment_success_after_its_failure_is_refunded() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, out) = on(&d, &r, "f", EventRole::Failure(0), 2_000);
        assert_eq!(
            (r.status.as_str(), types(&out)),
            ("FAILED", vec!["OrderCancelled"])
        );
        let (r, out) = on(&d, &r, "s", EventRole::Success(0), 3_000);
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(out[0].payload["payment_id"], serde_json::json!("pay-s"));
        let (r, out) = confirm(&d, &r, 0, 4_000);
        assert!(out.is_empty());
        assert_eq!(r.status, "REFUNDED");
    }

    #[test]
    fn late_compensations_wait_their_turn_in_reverse_step_order() {
        let d = def("order_with_shipping.yaml");
        let (r, _) = started(&d);
        let (r, _) = on(&d, &r, "e1", EventRole::Success(0), 2);
        let (r, _) = on(&d, &r, "e2", EventRole::Success(1), 3);
        // Shipping times out: the release of the inventory is sent first.
        let (r, out) = fire(&d, &r);
        assert_eq!(types(&out), ["ReleaseInventory"]);
        // Shipping succeeds late, while the release waits: nothing is sent beside it.
        let (r, out) = on(&d, &r, "late", EventRole::Success(2), 5);
        assert!(out.is_empty(), "{out:?}");
        let (r, out) = confirm(&d, &r, 1, 6);
        assert_eq!(types(&out), [d.steps[2].compensation.event_type.as_str()]);
        assert!(matches!(
            out[0].kind,
            OutputKind::Compensation {
                step: 2,
                late: true,
                attempt: 1
            }
        ));
        let (r, out) = confirm(&d, &r, 2, 7);
        assert_eq!(types(&out), ["RefundPayment"]);
        let (r, out) = confirm(&d, &r, 0, 8);
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(r.compensated_steps, vec![1, 2, 0]);
    }

    #[test]
    fn a_step_with_a_retry_policy_is_sent_again_before_it_times_out() {
        let mut d = def("order_saga.yaml");
        d.steps[0].retry = RetryPolicy {
            attempts: 3,
            backoff: std::time::Duration::from_secs(2),
            max_backoff: std::time::Duration::from_secs(60),
        };
        let (r, first) = started(&d);
        // The timeout passes: a pause of 2 s, then the same command again.
        let (r, out) = fire(&d, &r);
        assert!(out.is_empty());
        assert_eq!(r.deadline_ms, Some(1_000 + 30_000 + 2_000));
        let (r, out) = fire(&d, &r);
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].event_id.as_str(), &out[0].payload),
            (first[0].event_id.as_str(), &first[0].payload)
        );
        assert!(matches!(
            out[0].kind,
            OutputKind::Command {
                step: 0,
                attempt: 2
            }
        ));
        assert_eq!(r.status, "PENDING");
        // The second attempt is answered.
        let (r, out) = on(
            &d,
            &r,
            "ok",
            EventRole::Success(0),
            r.deadline_ms.unwrap() - 1,
        );
        assert_eq!(types(&out), ["ReserveInventory"]);
        assert!(r.abandoned_steps.is_empty());
        // Without an answer, the third attempt's timeout compensates.
        let (r, _) = started(&d);
        let (r, _) = fire(&d, &r);
        let (r, _) = fire(&d, &r);
        let (r, _) = fire(&d, &r);
        let (r, out) = fire(&d, &r);
        assert_eq!(out.len(), 1, "{out:?}");
        let (r, out) = fire(&d, &r);
        assert_eq!(types(&out), ["OrderCancelled"], "{:?}", r.history);
        assert_eq!(r.in_flight, None);
    }

    #[test]
    fn a_finished_saga_becomes_a_tombstone_that_still_dedupes_and_compensates() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, _) = fire(&d, &r); // payment timed out: cancelled
        let outcome_at = r.outcome.as_ref().unwrap().at_ms;
        let (t, out) = fire(&d, &r);
        assert!(out.is_empty());
        assert!(t.tombstone && t.history.len() == 1 && t.recent_event_ids.is_empty());
        assert_eq!(
            t.expires_at_ms,
            Some(outcome_at + d.dedupe_retention.as_millis() as i64)
        );
        assert!(!t.context.contains_key("user_id"), "{:?}", t.context);
        assert!(t.context.contains_key("total"));
        // A start re-delivered, with a new event id: nothing.
        let again = event("restart", &d, EventRole::Start);
        assert_eq!(
            apply(&d, &t, SagaInput::Event(&again), outcome_at + 1),
            Applied::Ignored(Ignored::AlreadyStarted)
        );
        // The payment goes through after all: refunded.
        let (t2, out) = changed(apply(
            &d,
            &t,
            SagaInput::Event(&event("late", &d, EventRole::Success(0))),
            outcome_at + 2,
        ));
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(out[0].payload["amount"], serde_json::json!(12.5));
        let (t3, _) = confirm(&d, &t2, 0, outcome_at + 3);
        assert!(t3.tombstone && t3.is_finished());
        assert_eq!(t3.next_timer_ms(), t.expires_at_ms);
        let end = t3.expires_at_ms.unwrap();
        assert_eq!(
            apply(&d, &t3, SagaInput::Timer { input_time_ms: end }, end),
            Applied::Expired
        );
    }

    #[test]
    fn a_held_timer_keeps_the_saga_and_comes_back_later() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let held = hold_for_retry(&r, 99_000, 40_000, "no schema");
        assert_eq!(held.next_timer_ms(), Some(99_000));
        assert_eq!(
            (held.status.as_str(), &held.phase, &held.in_flight),
            (r.status.as_str(), &r.phase, &r.in_flight)
        );
        assert!(held
            .history
            .last()
            .unwrap()
            .note
            .as_deref()
            .unwrap()
            .contains("no schema"));
        // Then it times out as it would have.
        let (after, out) = fire(&d, &held);
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(
            after.outcome.unwrap().reason.as_deref(),
            Some("timeout:payment")
        );
    }

    #[test]
    fn a_record_naming_steps_the_topology_lacks_does_not_fit() {
        let d = def("order_saga.yaml");
        let (mut r, _) = started(&d);
        assert_eq!(r.fits(&d), Ok(()));
        r.phase = Phase::Running { step: 2 };
        let err = r.fits(&d).unwrap_err();
        assert!(err.contains("step 3") && err.contains("2 steps"), "{err}");
        // The same index under another name: a step renamed or moved under the same version.
        let (r, _) = started(&d);
        let mut renamed = d.clone();
        renamed.steps[0].name = "charge".into();
        let err = r.fits(&renamed).unwrap_err();
        assert!(err.contains("waits on step 'payment'"), "{err}");
    }

    #[test]
    fn a_success_whose_next_command_cannot_be_written_compensates_instead() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, out) = on(&d, &r, "ok", EventRole::Success(0), 2_000);
        assert_eq!(types(&out), ["ReserveInventory"]);
        let (r, out) = cancel_unwritable(&d, &r, 2_001, "no schema").unwrap();
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(r.status, COMPENSATING);
        let (r, out) = confirm(&d, &r, 0, 2_002);
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("inventory_unwritable")
        );
        assert_eq!(r.status, "REFUNDED");
        // Nothing to do for a saga waiting on a compensation.
        assert!(cancel_unwritable(&d, &refunding(&d).0, 5, "x").is_none());
    }

    #[test]
    fn message_ids_differ_between_two_sagas_that_used_the_same_id() {
        let d = def("order_saga.yaml");
        let (_, first) = start(
            &d,
            "o-1",
            &event("start-a", &d, EventRole::Start),
            "c".into(),
            1,
        );
        let (_, again) = start(
            &d,
            "o-1",
            &event("start-b", &d, EventRole::Start),
            "c".into(),
            1,
        );
        assert_ne!(first[0].event_id, again[0].event_id);
        let (_, replay) = start(
            &d,
            "o-1",
            &event("start-a", &d, EventRole::Start),
            "c".into(),
            9,
        );
        assert_eq!(first[0].event_id, replay[0].event_id);
    }

    #[test]
    fn a_version_1_saga_cancelled_by_a_failure_still_refunds_a_late_success() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, _) = on(&d, &r, "f", EventRole::Failure(0), 2);
        let back = as_version_1(
            &r,
            &[
                "abandoned_steps",
                "compensated_steps",
                "stuck_steps",
                "id_seed",
            ],
        )
        .upgrade();
        assert_eq!(back.abandoned_steps, vec![0]);
        let (_, out) = on(&d, &back, "late", EventRole::Success(0), 3);
        assert_eq!(types(&out), ["RefundPayment"]);
    }

    #[test]
    fn a_version_1_saga_waiting_on_a_refund_gets_its_message_back_for_retries() {
        let d = def("order_saga.yaml");
        let (r, first) = refunding(&d);
        let mut back = as_version_1(
            &r,
            &[
                "abandoned_steps",
                "compensated_steps",
                "stuck_steps",
                "in_flight",
                "id_seed",
            ],
        )
        .upgrade();
        assert_eq!(back.in_flight, None);
        back.rebuild_in_flight(&d);
        // Version 1 ids had no seed: the rebuilt id is the one a version 1 saga sent.
        let flight = back.in_flight.clone().unwrap();
        assert_eq!(
            flight.event_id,
            output_event_id(&r.saga_id, "", r.messages_sent - 1, "RefundPayment")
        );
        assert_eq!(flight.payload, first[0].payload);
        let (_, out) = fire(&d, &back);
        assert!(out.is_empty());
    }

    #[test]
    fn a_version_1_record_upgrades_its_late_compensation_state() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, _) = fire(&d, &r);
        let mut v1 = serde_json::to_value(&r).unwrap();
        let obj = v1.as_object_mut().unwrap();
        obj.insert("record_version".into(), 1.into());
        for f in ["abandoned_steps", "compensated_steps", "stuck_steps"] {
            obj.remove(f);
        }
        obj.insert("timed_out_step".into(), 0.into());
        obj.insert("late_compensated".into(), true.into());
        let back: SagaRecord = serde_json::from_value::<SagaRecord>(v1).unwrap().upgrade();
        assert_eq!(
            (back.abandoned_steps.clone(), back.compensated_steps.clone()),
            (vec![0], vec![0])
        );
        assert_eq!(back.record_version, RECORD_VERSION);
        // Its late success was refunded already: a second one is not refunded again.
        let late = event("late", &d, EventRole::Success(0));
        assert_eq!(
            apply(&d, &back, SagaInput::Event(&late), 99_000),
            Applied::Ignored(Ignored::Unexpected)
        );
    }

    #[test]
    fn three_steps_compensate_in_reverse_order() {
        let d = def("order_with_shipping.yaml");
        let (r, _) = started(&d);
        let (r, _) = on(&d, &r, "e1", EventRole::Success(0), 2);
        let (r, _) = on(&d, &r, "e2", EventRole::Success(1), 3);
        let (r, out) = on(&d, &r, "e3", EventRole::Failure(2), 4);
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
        let (r, out) = on(&d, &r, "e4", EventRole::Compensated(1), 5);
        assert_eq!(types(&out), ["RefundPayment"]);
        let (r, out) = on(&d, &r, "e5", EventRole::Compensated(0), 6);
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
        let (_, c) = on(&d, &r, "e1", EventRole::Success(0), 2);
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
        fn every_saga_ends_in_exactly_one_outcome(script in script(), which in 0u8..3) {
            let d = pick(which);
            let (record, outputs) = run_script(&d, &script);
            let outcomes: Vec<&SagaOutput> = outputs.iter()
                .filter(|o| matches!(o.kind, OutputKind::Completed | OutputKind::Cancelled { .. }))
                .collect();
            prop_assert_eq!(outcomes.len(), 1);
            prop_assert!(record.outcome.is_some());
            // Nothing but a late compensation (or its re-send) follows the outcome.
            let at = outputs.iter().position(|o| matches!(o.kind, OutputKind::Completed | OutputKind::Cancelled { .. })).unwrap();
            for o in &outputs[at + 1..] {
                prop_assert!(matches!(o.kind, OutputKind::Compensation { late: true, .. }), "{:?} after the outcome", o.kind);
            }
            prop_assert!(record.in_flight.is_none());
        }

        #[test]
        fn re_sends_repeat_the_first_send_exactly(script in script(), which in 0u8..3) {
            let d = pick(which);
            let (_, outputs) = run_script(&d, &script);
            let mut first: std::collections::BTreeMap<String, &SagaOutput> = Default::default();
            for o in &outputs {
                match o.kind {
                    OutputKind::Command { attempt: 1, .. } | OutputKind::Compensation { attempt: 1, .. } => {
                        prop_assert!(first.insert(o.event_id.clone(), o).is_none(), "an event id used twice by first sends");
                    }
                    OutputKind::Command { .. } | OutputKind::Compensation { .. } => {
                        let f = first.get(&o.event_id);
                        prop_assert!(f.is_some_and(|f| f.payload == o.payload && f.topic == o.topic && f.event_type == o.event_type), "a re-send differs from its first send: {:?}", o);
                    }
                    _ => {}
                }
            }
        }

        #[test]
        fn money_taken_for_a_cancelled_order_is_always_given_back(script in script(), which in 0u8..3) {
            let d = pick(which);
            let (record, outputs) = run_script(&d, &script);
            if record.outcome.as_ref().unwrap().kind == OutcomeKind::Cancelled {
                let commanded: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                    OutputKind::Command { step, .. } => Some(step),
                    _ => None,
                }).collect();
                // Every commanded step that replied a success in the script is compensated.
                for (i, s) in script.iter().enumerate() {
                    if let Script::Reply { role: 0, step } = s {
                        let step = step % d.steps.len();
                        let _ = i;
                        if commanded.contains(&step) && record.history.entries().iter().any(|t| t.cause == d.steps[step].success) {
                            prop_assert!(record.compensated_steps.contains(&step), "step {step} succeeded but was not compensated; history {:?}", record.history);
                        }
                    }
                }
                let stuck = !record.stuck_steps.is_empty();
                prop_assert_eq!(record.status == COMPENSATION_STUCK, stuck);
            }
        }

        #[test]
        fn compensations_undo_completed_steps_in_reverse_order(script in script(), which in 0u8..3) {
            let d = pick(which);
            let (record, outputs) = run_script(&d, &script);
            let compensated: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Compensation { step, late: false, attempt: 1 } => Some(step),
                _ => None,
            }).collect();
            let late: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Compensation { step, late: true, attempt: 1 } => Some(step),
                _ => None,
            }).collect();
            let commanded: Vec<usize> = outputs.iter().filter_map(|o| match o.kind {
                OutputKind::Command { step, attempt: 1 } => Some(step),
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
                    prop_assert_eq!(compensated.clone(), expected);
                    // A late compensation only ever for a step that failed or timed out (one per
                    // saga: the step it stopped at), at most once.
                    prop_assert!(late.len() <= 1);
                    for step in &late {
                        prop_assert!(record.abandoned_steps.contains(step));
                    }
                    // One at a time: no compensation is sent while another is in flight.
                    prop_assert_eq!(record.compensated_steps.len(), compensated.len() + late.len());
                }
            }
        }

        #[test]
        fn retries_stay_within_their_policy_and_number_their_attempts(script in script(), which in 0u8..3) {
            let d = pick(which);
            let (_, outputs) = run_script(&d, &script);
            // Per event id: the attempts seen, in order, and the most its policy allows.
            let mut sends: std::collections::BTreeMap<&str, (Vec<u32>, u32)> = Default::default();
            for o in &outputs {
                let (attempt, allowed) = match o.kind {
                    OutputKind::Command { step, attempt } => (attempt, d.steps[step].retry.attempts),
                    OutputKind::Compensation { step, attempt, .. } => (attempt, d.steps[step].compensation_retry.attempts),
                    _ => continue,
                };
                let entry = sends.entry(o.event_id.as_str()).or_insert((Vec::new(), allowed));
                entry.0.push(attempt);
            }
            for (id, (attempts, allowed)) in sends {
                prop_assert!(attempts.len() as u32 <= allowed, "{id}: {} sends, policy allows {allowed}", attempts.len());
                prop_assert_eq!(attempts.clone(), (1..=attempts.len() as u32).collect::<Vec<_>>());
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
        fn a_timeout_compensates_exactly_what_was_done(done in 0usize..3, which in 0u8..3) {
            let d = pick(which);
            let done = done % d.steps.len();
            let (mut r, _) = started(&d);
            for s in 0..done {
                r = on(&d, &r, &format!("ok{s}"), EventRole::Success(s), 2_000).0;
            }
            // Timers until the step's attempts are spent (a step with a retry policy re-sends first).
            let mut out;
            loop {
                let at = r.deadline_ms.unwrap();
                (r, out) = changed(apply(&d, &r, SagaInput::Timer { input_time_ms: at }, at));
                if !matches!(r.phase, Phase::Running { .. }) {
                    break;
                }
            }
            let mut refunds = Vec::new();
            while !r.is_finished() {
                for o in &out {
                    if let OutputKind::Compensation { step, .. } = o.kind { refunds.push(step); }
                }
                let Phase::Compensating { step, .. } = r.phase.clone() else { unreachable!() };
                (r, out) = on(&d, &r, &format!("c{step}"), EventRole::Compensated(step), 3_000);
            }
            prop_assert_eq!(refunds, (0..done).rev().collect::<Vec<_>>());
            let reason = format!("timeout:{}", d.steps[done].name);
            prop_assert_eq!(r.outcome.unwrap().reason, Some(reason));
        }
    }

    fn acted(a: Acted) -> (SagaRecord, Vec<SagaOutput>) {
        match a {
            Acted::Applied { record, outputs } => (*record, outputs),
            other => panic!("expected the action applied, got {other:?}"),
        }
    }

    #[test]
    fn a_manual_cancel_compensates_in_reverse_and_ends_cancelled_with_the_reason() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let (r, _) = on(&d, &r, "e1", EventRole::Success(0), 2_000);
        let cancel = Action::Cancel {
            reason: "inventory bug".into(),
        };
        let (r, out) = acted(act(&d, &r, &cancel, "a-1", "ops@example", 3_000));
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(r.status, COMPENSATING);
        // The inventory command was sent: its success, should it come, is compensated.
        assert_eq!(r.abandoned_steps, vec![1]);
        let last = r.history.last().unwrap();
        assert_eq!(
            (last.cause.as_str(), last.event_id.as_deref()),
            ("manual_cancel", Some("a-1"))
        );
        assert!(last.note.as_deref().unwrap().contains("ops@example"));
        // The same action again changes nothing.
        assert_eq!(
            act(&d, &r, &cancel, "a-1", "ops@example", 3_500),
            Acted::Duplicate
        );
        let (r, out) = confirm(&d, &r, 0, 4_000);
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(
            out[0].payload["reason"],
            serde_json::json!("manual: inventory bug")
        );
        assert_eq!(r.status, "REFUNDED");
        // An ended saga refuses a cancel, and says so in its history.
        match act(&d, &r, &cancel, "a-2", "ops", 5_000) {
            Acted::Refused { record, why } => {
                assert!(why.contains("ended"), "{why}");
                assert_eq!(record.status, r.status);
                assert_eq!(record.outcome, r.outcome);
                assert!(record
                    .history
                    .last()
                    .unwrap()
                    .note
                    .as_deref()
                    .unwrap()
                    .contains("refused"));
            }
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_manual_cancel_before_any_step_succeeded_cancels_at_once() {
        let d = def("order_saga.yaml");
        let (r, _) = started(&d);
        let cancel = Action::Cancel { reason: "x".into() };
        let (r, out) = acted(act(&d, &r, &cancel, "a-1", "ops", 2_000));
        assert_eq!(types(&out), ["OrderCancelled"]);
        assert_eq!(r.abandoned_steps, vec![0]);
        // The payment's success arriving now is refunded.
        let (_, out) = on(&d, &r, "late", EventRole::Success(0), 3_000);
        assert_eq!(types(&out), ["RefundPayment"]);
    }

    #[test]
    fn a_manual_retry_sends_the_awaited_message_again_with_its_id() {
        let d = def("order_saga.yaml");
        let (r, first) = started(&d);
        let (r, out) = acted(act(&d, &r, &Action::Retry, "a-1", "ops", 5_000));
        assert_eq!(out.len(), 1);
        assert_eq!(
            (out[0].event_id.as_str(), &out[0].payload),
            (first[0].event_id.as_str(), &first[0].payload)
        );
        assert_eq!(
            out[0].kind,
            OutputKind::Command {
                step: 0,
                attempt: 2
            }
        );
        // The step has its whole timeout again from the retry.
        assert_eq!(
            r.deadline_ms,
            Some(5_000 + d.steps[0].timeout.as_millis() as i64)
        );
        let (done, _) = on(&d, &r, "e1", EventRole::Success(0), 6_000);
        assert!(matches!(
            act(&d, &done, &Action::Resume, "a-2", "ops", 7_000),
            Acted::Refused { .. }
        ));
    }

    #[test]
    fn a_resumed_stuck_compensation_goes_out_again_with_its_first_id() {
        let d = def("order_saga.yaml");
        let (mut r, first) = refunding(&d);
        while !r.is_finished() {
            r = fire(&d, &r).0;
        }
        assert_eq!(r.status, COMPENSATION_STUCK);
        assert!(matches!(
            act(&d, &r, &Action::Retry, "a-0", "ops", i64::MAX / 8),
            Acted::Refused { .. }
        ));
        let (r, out) = acted(act(&d, &r, &Action::Resume, "a-1", "ops", i64::MAX / 8));
        assert_eq!(types(&out), ["RefundPayment"]);
        assert_eq!(out[0].event_id, first[0].event_id);
        assert_eq!(r.status, COMPENSATING);
        let (r, out) = confirm(&d, &r, 0, i64::MAX / 8 + 1);
        // The outcome was emitted before: no second one.
        assert!(out.is_empty(), "{out:?}");
        assert_eq!((r.status.as_str(), r.stuck_steps.len()), ("REFUNDED", 0));
        // Not stuck any more: nothing to resume.
        assert!(matches!(
            act(&d, &r, &Action::Resume, "a-2", "ops", i64::MAX / 8 + 2),
            Acted::Refused { .. }
        ));
    }
}
