//! A simulated participant service (`saga-streams simulate <step>`): it consumes one step's
//! commands and compensations and replies the way the topology expects, with configurable
//! outcomes.
//!
//! It runs on the streams runtime like the orchestrator, so it is exactly-once too: each command
//! `event_id` is answered once, even across crashes and redeliveries. Outcomes are decided from a
//! hash of the saga id, so a run is reproducible and a redelivered command gets the same answer.
//!
//! Store `participant`:
//! - `c/<command event_id>`: answered already (the answer, sent again for a re-sent command);
//! - `x/<expires ms, 8 bytes big-endian><command event_id>`: when `c/` is forgotten
//!   (`--remember-commands`), so the store stays bounded;
//! - `d/<due ms, 8 bytes big-endian><command event_id>`: a reply held back by `--latency`;
//! - `k/<sku>`: the remaining stock of a SKU in this task (stock is per partition, since orders are
//!   spread over partitions by id).

use std::collections::BTreeMap;
use std::hash::{Hash, Hasher};
use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serde::{Deserialize, Serialize};
use serde_json::{Map, Value};

use crate::codec::signing::{SignatureProblem, Signing, SIGNATURE_HEADER, SIGNED_HEADER};
use crate::codec::{Codec, DecodeError};
use crate::runtime::{InputRecord, OutputRecord, Processor, ProcessorContext, ProcessorError};
use crate::saga::contract::{self, CORRELATION_HEADER, TRACEPARENT_HEADER};
use crate::saga::topology::{FieldKind, FieldSpec, SagaDefinition, StepSpec};

/// Held replies sent, and remembered command ids forgotten, by one punctuation, at most.
const HELD_REPLIES_PER_PUNCTUATION: usize = 10_000;
/// How long answered command ids are kept by default.
pub const REMEMBER_COMMANDS: Duration = Duration::from_secs(7 * 24 * 3600);

/// The participant's store.
pub const PARTICIPANT_STORE: &str = "participant";

/// How a participant answers.
#[derive(Debug, Clone)]
pub struct Behaviour {
    /// Share of commands (0..=1) answered with the failure reply.
    pub failure_share: f64,
    /// Commands whose `amount` is above this are answered with the failure reply.
    pub decline_above: Option<f64>,
    /// Stock per SKU (per task); a command whose `items` ask for more than is left fails.
    /// SKUs not listed are unlimited.
    pub stock: BTreeMap<String, i64>,
    /// Delay before each reply.
    pub latency: Duration,
    /// Share of commands (0..=1) never answered (compensations are always answered).
    pub no_reply_share: f64,
    /// How long an answered command id is remembered (default [`REMEMBER_COMMANDS`]).
    pub remember_commands: Duration,
}

impl Default for Behaviour {
    fn default() -> Self {
        Self {
            failure_share: 0.0,
            decline_above: None,
            stock: BTreeMap::new(),
            latency: Duration::ZERO,
            no_reply_share: 0.0,
            remember_commands: REMEMBER_COMMANDS,
        }
    }
}

fn timed_key(prefix: &[u8], at_ms: u64, id: &str) -> Vec<u8> {
    [prefix, &at_ms.to_be_bytes(), id.as_bytes()].concat()
}

/// A value in `[0, 1)` derived from `text` and `salt`: the same inputs always give the same value.
pub fn share_of(text: &str, salt: &str) -> f64 {
    let mut hasher = std::collections::hash_map::DefaultHasher::new();
    salt.hash(&mut hasher);
    text.hash(&mut hasher);
    (hasher.finish() >> 11) as f64 / (1u64 << 53) as f64
}

#[derive(Debug, Serialize, Deserialize)]
struct HeldReply {
    topic: String,
    key: String,
    value: Vec<u8>,
    headers: Vec<(String, Vec<u8>)>,
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// A reply's event type and payload.
type ReplyContent = (String, Map<String, Value>);

/// Answers one step's commands.
pub struct Participant {
    def: Arc<SagaDefinition>,
    codec: Arc<Codec>,
    step: usize,
    behaviour: Arc<Behaviour>,
}

impl Participant {
    pub fn new(
        def: Arc<SagaDefinition>,
        codec: Arc<Codec>,
        step: usize,
        behaviour: Arc<Behaviour>,
    ) -> Self {
        Self {
            def,
            codec,
            step,
            behaviour,
        }
    }

    fn spec(&self) -> &StepSpec {
        &self.def.steps[self.step]
    }

    /// The reply's event type and payload for a command, or `None` to stay silent.
    fn decide(
        &self,
        ctx: &mut ProcessorContext<'_>,
        command_type: &str,
        saga_id: &str,
        body: &Map<String, Value>,
    ) -> Result<Option<ReplyContent>, ProcessorError> {
        let spec = self.spec().clone();
        let b = &self.behaviour;
        if command_type == spec.compensation.event_type {
            let mut store = ctx.store(PARTICIPANT_STORE)?;
            for (sku, quantity) in items(body) {
                if b.stock.contains_key(&sku) {
                    let key = format!("k/{sku}");
                    let left: i64 = store.get_json(key.as_bytes())?.unwrap_or(b.stock[&sku]);
                    store.put_json(key.as_bytes(), &(left + quantity))?;
                }
            }
            let payload = self.fill(&spec.confirmed_by, body, saga_id, None);
            return Ok(Some((spec.confirmed_by.clone(), payload)));
        }
        if command_type != spec.command.event_type {
            return Ok(None);
        }
        if share_of(saga_id, &format!("{}/no-reply", spec.name)) < b.no_reply_share {
            tracing::debug!(%saga_id, "staying silent");
            return Ok(None);
        }
        let mut failure = None;
        if let (Some(limit), Some(amount)) =
            (b.decline_above, body.get("amount").and_then(amount_of))
        {
            if amount > limit {
                failure = Some(format!("amount {amount} above the limit {limit}"));
            }
        }
        if failure.is_none() && share_of(saga_id, &format!("{}/fail", spec.name)) < b.failure_share
        {
            failure = Some("declined".to_string());
        }
        if failure.is_none() && !b.stock.is_empty() {
            let mut store = ctx.store(PARTICIPANT_STORE)?;
            let wanted: Vec<(String, i64)> = items(body)
                .into_iter()
                .filter(|(sku, _)| b.stock.contains_key(sku))
                .collect();
            let mut left = Vec::new();
            for (sku, quantity) in &wanted {
                let key = format!("k/{sku}");
                let have: i64 = store.get_json(key.as_bytes())?.unwrap_or(b.stock[sku]);
                if have < *quantity {
                    failure = Some(format!("out of stock: {sku}"));
                    break;
                }
                left.push((key, have - quantity));
            }
            if failure.is_none() {
                for (key, rest) in left {
                    store.put_json(key.as_bytes(), &rest)?;
                }
            }
        }
        Ok(Some(match failure {
            Some(reason) => (
                spec.failure.clone(),
                self.fill(&spec.failure, body, saga_id, Some(reason)),
            ),
            None => (
                spec.success.clone(),
                self.fill(&spec.success, body, saga_id, None),
            ),
        }))
    }

    fn fill(
        &self,
        event_type: &str,
        command: &Map<String, Value>,
        saga_id: &str,
        reason: Option<String>,
    ) -> Map<String, Value> {
        reply_payload(&self.def, event_type, command, saga_id, reason)
    }
}

/// The payload of a reply: each field the topology declares for it, taken from the command
/// when it carries one of that name, else made up from its type (`reason` is `reason`, or
/// "simulated").
pub fn reply_payload(
    def: &SagaDefinition,
    event_type: &str,
    command: &Map<String, Value>,
    saga_id: &str,
    reason: Option<String>,
) -> Map<String, Value> {
    let mut payload = Map::new();
    for field in def.events.get(event_type).into_iter().flatten() {
        let value = if field.name == "reason" {
            Value::String(reason.clone().unwrap_or_else(|| "simulated".into()))
        } else if let Some(v) = command.get(&field.name).filter(|v| !v.is_null()) {
            v.clone()
        } else {
            placeholder(field, saga_id)
        };
        payload.insert(field.name.clone(), value);
    }
    payload
}

/// A value of a field's (first) type, the same for the same saga.
pub fn placeholder(field: &FieldSpec, saga_id: &str) -> Value {
    match field.kinds.first().copied().unwrap_or(FieldKind::String) {
        FieldKind::String | FieldKind::Id => Value::String(format!(
            "{}-{}",
            field.name.trim_end_matches("_id"),
            uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, saga_id.as_bytes())
        )),
        FieldKind::Number | FieldKind::Integer | FieldKind::Decimal => Value::from(0),
        FieldKind::Boolean => Value::Bool(true),
        FieldKind::List => Value::Array(vec![]),
        FieldKind::Object => Value::Object(Map::new()),
    }
}

/// `items: [{sku, quantity}]` of a command.
fn items(body: &Map<String, Value>) -> Vec<(String, i64)> {
    body.get("items")
        .and_then(Value::as_array)
        .map(|list| {
            list.iter()
                .filter_map(|item| {
                    Some((
                        item.get("sku")?.as_str()?.to_string(),
                        item.get("quantity").and_then(Value::as_i64).unwrap_or(1),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

impl Processor for Participant {
    fn init(&mut self, ctx: &mut ProcessorContext<'_>) -> Result<(), ProcessorError> {
        // Held replies are sent, and remembered ids forgotten, from the punctuation.
        let tick = match self.behaviour.latency {
            Duration::ZERO => Duration::from_secs(1),
            latency => (latency / 4).clamp(Duration::from_millis(10), Duration::from_secs(1)),
        };
        ctx.schedule_punctuation(tick);
        Ok(())
    }

    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
    ) -> Result<(), ProcessorError> {
        // Named exactly, as the saga reads the correlation id: the signed value is the one used.
        let header = |name: &str| record.header(name);
        if let Err(problem) = self.codec.signing().check(
            &record.topic,
            header(SIGNATURE_HEADER),
            record.key.as_deref(),
            record.value.as_deref(),
            header(SIGNED_HEADER),
        ) {
            let reason = match problem {
                SignatureProblem::Missing => "missing_signature".to_string(),
                SignatureProblem::Bad(why) => why,
            };
            tracing::warn!(target: crate::runtime::secrets::AUDIT_TARGET, event = "signature_refused", topic = %record.topic, offset = record.offset, detail = %reason, "ignoring a command whose signature was refused");
            metrics::counter!(crate::telemetry::metrics::SIGNATURE_FAILURES, "topic" => record.topic.clone(), "reason" => "command")
                .increment(1);
            return Ok(());
        }
        let body = match self.codec.read(&record.topic, record.value.as_deref()) {
            Ok(body) => body,
            Err(DecodeError::Bad(bad)) => {
                tracing::warn!(topic = %record.topic, offset = record.offset, error = %bad.message, "ignoring a command that cannot be read");
                metrics::counter!(crate::telemetry::metrics::EVENTS_IGNORED, "reason" => "invalid_command")
                    .increment(1);
                return Ok(());
            }
            Err(DecodeError::Unavailable(why)) => return Err(ProcessorError(why)),
        };
        let field = |name: &str| body.get(name).and_then(Value::as_str).map(str::to_string);
        let (Some(command_id), Some(command_type)) = (field("event_id"), field("event_type"))
        else {
            tracing::warn!(topic = %record.topic, offset = record.offset, "ignoring a command without event_id or event_type");
            metrics::counter!(crate::telemetry::metrics::EVENTS_IGNORED, "reason" => "invalid_command")
                .increment(1);
            return Ok(());
        };
        let saga_id = match body.get(&self.def.key_field) {
            Some(Value::String(s)) => s.clone(),
            Some(Value::Number(n)) => n.to_string(),
            _ => String::from_utf8_lossy(record.key.as_deref().unwrap_or_default()).into_owned(),
        };
        let seen_key = format!("c/{command_id}");
        {
            let mut store = ctx.store(PARTICIPANT_STORE)?;
            if let Some(answer) = store.get(seen_key.as_bytes())? {
                // A command sent again (the orchestrator's retry): the effect is not repeated,
                // the answer is, with its event id, so the orchestrator can dedupe it.
                drop(store);
                match serde_json::from_slice::<HeldReply>(&answer) {
                    Ok(reply) => {
                        tracing::debug!(%command_id, "command answered already; answering again");
                        send(ctx, self.codec.signing(), reply);
                    }
                    Err(_) => {
                        tracing::debug!(%command_id, "command seen already, without an answer")
                    }
                }
                return Ok(());
            }
            store.put(seen_key.as_bytes(), b"");
            let forget_at = (now_ms() as u64)
                .saturating_add(self.behaviour.remember_commands.as_millis() as u64);
            store.put(&timed_key(b"x/", forget_at, &command_id), b"");
        }
        let Some((reply_type, payload)) = self.decide(ctx, &command_type, &saga_id, &body)? else {
            return Ok(());
        };
        let now = now_ms();
        let correlation_id = field("correlation_id").unwrap_or_default();
        let mut reply_body = payload;
        reply_body.insert(
            "event_id".into(),
            Value::String(
                uuid::Uuid::new_v5(
                    &uuid::Uuid::NAMESPACE_OID,
                    format!("reply/{command_id}").as_bytes(),
                )
                .to_string(),
            ),
        );
        reply_body.insert("event_type".into(), Value::String(reply_type.clone()));
        reply_body.insert("event_version".into(), Value::from(1));
        reply_body.insert(self.def.key_field.clone(), Value::String(saga_id.clone()));
        reply_body.insert("correlation_id".into(), Value::String(correlation_id));
        reply_body.insert("occurred_at".into(), Value::String(contract::rfc3339(now)));
        let mut headers = Vec::new();
        for name in [CORRELATION_HEADER, TRACEPARENT_HEADER] {
            if let Some(v) = record.header(name) {
                headers.push((name.to_string(), v.to_vec()));
            }
        }
        let reply_topic = self.spec().reply_topic.clone();
        let value = self
            .codec
            .write(&reply_topic, &reply_type, reply_body, true)
            .map_err(ProcessorError)?;
        let reply = HeldReply {
            topic: reply_topic,
            key: saga_id,
            value,
            headers,
        };
        ctx.store(PARTICIPANT_STORE)?
            .put_json(seen_key.as_bytes(), &reply)?;
        if self.behaviour.latency.is_zero() {
            send(ctx, self.codec.signing(), reply);
        } else {
            let due = now + self.behaviour.latency.as_millis() as i64;
            let key = timed_key(b"d/", due as u64, &command_id);
            ctx.store(PARTICIPANT_STORE)?.put_json(&key, &reply)?;
        }
        Ok(())
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        now: SystemTime,
    ) -> Result<(), ProcessorError> {
        let now = now
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0);
        let end = [b"d/".as_slice(), &(now + 1).to_be_bytes()].concat();
        let mut due = Vec::new();
        {
            let mut store = ctx.store(PARTICIPANT_STORE)?;
            // A bounded batch per punctuation; the rest are due next time.
            for (key, value) in store.range(b"d/", Some(&end), HELD_REPLIES_PER_PUNCTUATION)? {
                store.delete(&key);
                match serde_json::from_slice::<HeldReply>(&value) {
                    Ok(reply) => due.push(reply),
                    Err(e) => return Err(ProcessorError(format!("undecodable held reply: {e}"))),
                }
            }
        }
        for reply in due {
            send(ctx, self.codec.signing(), reply);
        }
        // Command ids remembered long enough are forgotten, a bounded batch at a time.
        let end = [b"x/".as_slice(), &(now + 1).to_be_bytes()].concat();
        let mut store = ctx.store(PARTICIPANT_STORE)?;
        for (key, _) in store.range(b"x/", Some(&end), HELD_REPLIES_PER_PUNCTUATION)? {
            store.delete(&key);
            if let Some(id) = key.get(2 + 8..) {
                store.delete(&[b"c/".as_slice(), id].concat());
            }
        }
        Ok(())
    }
}

/// An amount as a number, or as the decimal text PHP services write (`"500.00"`).
fn amount_of(value: &Value) -> Option<f64> {
    match value {
        Value::String(s) => s.trim().parse().ok(),
        v => v.as_f64(),
    }
}

/// Sends a reply, signed when its topic is (with the key that signs now, not when it was held).
fn send(ctx: &mut ProcessorContext<'_>, signing: &Signing, reply: HeldReply) {
    let mut headers = reply.headers;
    headers.retain(|(n, _)| n != SIGNATURE_HEADER);
    let correlation = headers
        .iter()
        .find(|(n, _)| n == SIGNED_HEADER)
        .map(|(_, v)| v.clone());
    match signing.sign(
        &reply.topic,
        Some(reply.key.as_bytes()),
        Some(&reply.value),
        correlation.as_deref(),
    ) {
        Ok(Some(signature)) => headers.push((SIGNATURE_HEADER.to_string(), signature.into_bytes())),
        Ok(None) => {}
        Err(e) => tracing::error!(error = %e, topic = %reply.topic, "the reply is sent unsigned"),
    }
    let mut record = OutputRecord::new(reply.topic, reply.key.into_bytes(), reply.value);
    record.headers = headers;
    ctx.send(record);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shares_are_stable_and_spread() {
        assert_eq!(share_of("o-1", "x"), share_of("o-1", "x"));
        let below = (0..10_000)
            .filter(|i| share_of(&format!("o-{i}"), "payment/fail") < 0.1)
            .count();
        assert!((800..1200).contains(&below), "{below}");
    }
}
