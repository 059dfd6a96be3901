//! The message contract, whatever the wire format: the envelope every event carries, the checks an
//! event passes before it reaches the state machine, the dead-letter reasons, the headers, and the
//! body of every message the saga writes.
//!
//! Checking reports the first problem as [`BadInput`], which the processor dead-letters: a record
//! is either fully valid or never reaches the state machine.

use serde_json::{Map, Value};

use crate::codec::{BadValue, BadValueKind, Format};
use crate::runtime::InputRecord;
use crate::saga::machine::SagaOutput;
use crate::saga::topology::{EventRole, SagaDefinition, ENVELOPE};

/// Header carrying the saga's correlation id on every message.
pub const CORRELATION_HEADER: &str = "X-Correlation-ID";
/// W3C trace context header, carried from inputs to the outputs they cause.
pub const TRACEPARENT_HEADER: &str = "traceparent";

/// An event that passed every check.
#[derive(Debug, Clone, PartialEq)]
pub struct DecodedEvent {
    pub event_id: String,
    pub event_type: String,
    pub event_version: i64,
    pub role: EventRole,
    /// The saga key (`order_id` by default).
    pub saga_id: String,
    pub correlation_id: Option<String>,
    pub occurred_at: Option<String>,
    /// Every field that is not part of the envelope.
    pub payload: Map<String, Value>,
}

/// Why a record can never be processed. The `as_str` names are the DLQ `reason` values.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum BadInputKind {
    /// A tombstone or empty value.
    MissingValue,
    /// The bytes are not a JSON object.
    InvalidJson,
    /// The saga key field is missing or empty.
    MissingSagaId,
    /// The record has no key, and the topology has `keys: strict`.
    MissingKey,
    /// An event type the topology does not expect on this topic.
    UnknownEventType,
    /// A field has the wrong type, or a required one is missing.
    InvalidField,
    /// The record's key differs from the saga id in its body.
    KeyMismatch,
    /// A reply for a saga that does not exist (never started, or expired).
    UnknownSaga,
    /// Avro: the schema id is not in the registry.
    UnknownSchemaId,
    /// Avro: not in the wire format, or the bytes do not decode with the writer schema.
    InvalidAvro,
    /// Avro: the writer schema cannot be resolved into the reader schema.
    IncompatibleSchema,
    /// The value is larger than the topology's `max_input_bytes`, or an output it causes would
    /// be larger than a record may be.
    RecordTooLarge,
    /// An output the record causes cannot be encoded (a context field of the wrong type or
    /// missing for an Avro command, say); the record's effects were not applied.
    UnencodableOutput,
    /// The saga the record belongs to names steps the loaded topology does not have (it started
    /// under another version).
    IncompatibleSaga,
    /// The saga's stored record cannot be read and was moved to the quarantine.
    QuarantinedSaga,
    /// The topic's records must be signed (`signatures: required`) and this one is not.
    MissingSignature,
    /// The record's signature does not verify (wrong key, unknown key id, changed record).
    BadSignature,
}

impl BadInputKind {
    /// Every kind: the reasons a dead letter can carry.
    pub const ALL: &'static [BadInputKind] = &[
        Self::MissingValue,
        Self::InvalidJson,
        Self::MissingSagaId,
        Self::MissingKey,
        Self::UnknownEventType,
        Self::InvalidField,
        Self::KeyMismatch,
        Self::UnknownSaga,
        Self::UnknownSchemaId,
        Self::InvalidAvro,
        Self::IncompatibleSchema,
        Self::RecordTooLarge,
        Self::UnencodableOutput,
        Self::IncompatibleSaga,
        Self::QuarantinedSaga,
        Self::MissingSignature,
        Self::BadSignature,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            Self::MissingValue => "missing_value",
            Self::InvalidJson => "invalid_json",
            Self::MissingSagaId => "missing_saga_id",
            Self::MissingKey => "missing_key",
            Self::UnknownEventType => "unknown_event_type",
            Self::InvalidField => "invalid_field",
            Self::KeyMismatch => "key_mismatch",
            Self::UnknownSaga => "unknown_saga",
            Self::UnknownSchemaId => "unknown_schema_id",
            Self::InvalidAvro => "invalid_avro",
            Self::IncompatibleSchema => "incompatible_schema",
            Self::UnencodableOutput => "unencodable_output",
            Self::IncompatibleSaga => "incompatible_saga",
            Self::QuarantinedSaga => "quarantined_saga",
            Self::RecordTooLarge => "record_too_large",
            Self::MissingSignature => "missing_signature",
            Self::BadSignature => "bad_signature",
        }
    }
}

/// A record that cannot be processed, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadInput {
    pub kind: BadInputKind,
    pub message: String,
}

impl BadInput {
    pub fn new(kind: BadInputKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

impl From<BadValue> for BadInput {
    fn from(bad: BadValue) -> Self {
        let kind = match bad.kind {
            BadValueKind::MissingValue => BadInputKind::MissingValue,
            BadValueKind::InvalidJson => BadInputKind::InvalidJson,
            BadValueKind::InvalidField => BadInputKind::InvalidField,
            BadValueKind::UnknownEventType => BadInputKind::UnknownEventType,
            BadValueKind::UnknownSchemaId => BadInputKind::UnknownSchemaId,
            BadValueKind::InvalidAvro => BadInputKind::InvalidAvro,
            BadValueKind::IncompatibleSchema => BadInputKind::IncompatibleSchema,
        };
        BadInput::new(kind, bad.message)
    }
}

fn string_field(
    map: &Map<String, Value>,
    name: &str,
    missing: BadInputKind,
) -> Result<String, BadInput> {
    match map.get(name) {
        None | Some(Value::Null) => Err(BadInput::new(missing, format!("'{name}' is missing"))),
        Some(Value::String(s)) if s.trim().is_empty() => {
            Err(BadInput::new(missing, format!("'{name}' is empty")))
        }
        Some(Value::String(s)) => Ok(s.clone()),
        Some(other) => Err(BadInput::new(
            BadInputKind::InvalidField,
            format!("'{name}' must be a string, got {}", type_name(other)),
        )),
    }
}

fn type_name(v: &Value) -> &'static str {
    match v {
        Value::Null => "null",
        Value::Bool(_) => "a boolean",
        Value::Number(_) => "a number",
        Value::String(_) => "a string",
        Value::Array(_) => "a list",
        Value::Object(_) => "an object",
    }
}

/// The saga id of an event object: its `key_field`, a string or an integer (integer ids are
/// common in PHP services: taken as their decimal string).
pub fn saga_id(map: &Map<String, Value>, key_field: &str) -> Result<String, BadInput> {
    match map.get(key_field) {
        Some(Value::Number(n)) if n.is_i64() || n.is_u64() => Ok(n.to_string()),
        _ => string_field(map, key_field, BadInputKind::MissingSagaId),
    }
}

/// Checks an event object read from `record` against the topology.
pub fn check(
    def: &SagaDefinition,
    record: &InputRecord,
    mut map: Map<String, Value>,
) -> Result<DecodedEvent, BadInput> {
    let event_type = string_field(&map, "event_type", BadInputKind::InvalidField)?;
    // Without an event id (outbox jobs often send none), one is derived from the content: an
    // identical re-send is still the same event, so it is still a duplicate.
    let event_id = match map.get("event_id") {
        None | Some(Value::Null) => derived_event_id(&record.topic, &map),
        Some(Value::String(s)) if s.trim().is_empty() => derived_event_id(&record.topic, &map),
        _ => string_field(&map, "event_id", BadInputKind::InvalidField)?,
    };
    let saga_id = saga_id(&map, &def.key_field)?;
    let event_version = match map.get("event_version") {
        None | Some(Value::Null) => 1,
        Some(v) => v.as_i64().ok_or_else(|| {
            BadInput::new(
                BadInputKind::InvalidField,
                format!("'event_version' must be an integer, got {}", type_name(v)),
            )
        })?,
    };
    let correlation_id = match map.get("correlation_id") {
        None | Some(Value::Null) => None,
        Some(Value::String(s)) if s.is_empty() => None,
        Some(Value::String(s)) => Some(s.clone()),
        Some(v) => {
            return Err(BadInput::new(
                BadInputKind::InvalidField,
                format!("'correlation_id' must be a string, got {}", type_name(v)),
            ))
        }
    };
    let occurred_at = match map.get("occurred_at") {
        // The record's timestamp stands in.
        None | Some(Value::Null) => Some(rfc3339(record.timestamp_ms)),
        Some(Value::String(s)) => {
            check_time(s).map_err(|e| {
                BadInput::new(
                    BadInputKind::InvalidField,
                    format!("'occurred_at' is not an RFC 3339 time: {e}"),
                )
            })?;
            Some(s.clone())
        }
        Some(v) => {
            return Err(BadInput::new(
                BadInputKind::InvalidField,
                format!("'occurred_at' must be a string, got {}", type_name(v)),
            ))
        }
    };
    let role = def.role_of(&record.topic, &event_type).ok_or_else(|| {
        BadInput::new(
            BadInputKind::UnknownEventType,
            format!(
                "event type '{event_type}' is not expected on topic '{}'",
                record.topic
            ),
        )
    })?;
    for field in def.events.get(&event_type).into_iter().flatten() {
        match map.get(&field.name) {
            None | Some(Value::Null) if field.optional => {}
            None | Some(Value::Null) => {
                return Err(BadInput::new(
                    BadInputKind::InvalidField,
                    format!("{event_type}: required field '{}' is missing", field.name),
                ))
            }
            Some(v) if !field.accepts(v) => {
                return Err(BadInput::new(
                    BadInputKind::InvalidField,
                    format!(
                        "{event_type}: field '{}' must be {}, got {}",
                        field.name,
                        field.type_name(),
                        type_name(v)
                    ),
                ))
            }
            Some(_) => {}
        }
    }
    // The context keeps what the topology declares, not whatever a producer sent: saga records
    // stay bounded. An Avro record is bounded by its reader schema already, and keeps its fields
    // (a field added by a newer schema version, resolved to its default, stays queryable).
    if def.format_of(&record.topic) == Format::Json {
        let declared: Vec<&str> = def
            .events
            .get(&event_type)
            .into_iter()
            .flatten()
            .map(|f| f.name.as_str())
            .collect();
        map.retain(|name, _| declared.contains(&name.as_str()));
    } else {
        for name in ENVELOPE {
            map.remove(*name);
        }
        map.remove(&def.key_field);
    }
    Ok(DecodedEvent {
        event_id,
        event_type,
        event_version,
        role,
        saga_id,
        correlation_id,
        occurred_at,
        payload: map,
    })
}

/// Checks an event time: RFC 3339 with `Z` or any offset (`+02:00`, as Carbon's
/// `toIso8601String()` writes in a service's own time zone), or without one and with a space
/// (`2026-01-01 10:00:00`, Laravel's `toDateTimeString()`). [`OCCURRED_AT_PATTERN`] says the same.
pub fn check_time(text: &str) -> Result<(), String> {
    // humantime reads UTC times only: an offset is checked here and read as UTC.
    let utc = match text
        .len()
        .checked_sub(6)
        .and_then(|at| text.get(at..).map(|o| (at, o)))
    {
        Some((at, offset))
            if matches!(offset.as_bytes()[0], b'+' | b'-')
                && offset.as_bytes()[3] == b':'
                && offset[1..3].bytes().all(|b| b.is_ascii_digit())
                && offset[4..].bytes().all(|b| b.is_ascii_digit())
                && offset[1..3] <= *"23"
                && offset[4..] <= *"59" =>
        {
            format!("{}Z", &text[..at])
        }
        _ => text.to_string(),
    };
    humantime::parse_rfc3339_weak(&utc)
        .map(|_| ())
        .map_err(|e| e.to_string())
}

/// What [`check_time`] accepts, as a regular expression (for the exported JSON Schemas).
pub const OCCURRED_AT_PATTERN: &str =
    "^[0-9]{4}-[0-9]{2}-[0-9]{2}[Tt ][0-9]{2}:[0-9]{2}:[0-9]{2}(\\.[0-9]+)?([Zz]|[+-][0-9]{2}:[0-9]{2})?$";

/// The id of an event that came without one: a UUID (v5) of its topic and content, fields in
/// name order, so the same content always gets the same id.
fn derived_event_id(topic: &str, map: &Map<String, Value>) -> String {
    let mut content: Vec<(&String, &Value)> = map
        .iter()
        .filter(|(name, _)| name.as_str() != "event_id")
        .collect();
    content.sort_by(|a, b| a.0.cmp(b.0));
    let text = serde_json::to_string(&content).unwrap_or_default();
    uuid::Uuid::new_v5(
        &uuid::Uuid::NAMESPACE_OID,
        format!("derived/{topic}/{text}").as_bytes(),
    )
    .to_string()
}

/// RFC 3339 with milliseconds, UTC.
pub fn rfc3339(ms: i64) -> String {
    let time = std::time::UNIX_EPOCH + std::time::Duration::from_millis(ms.max(0) as u64);
    humantime::format_rfc3339_millis(time).to_string()
}

/// The envelope and payload of a message the saga emits, as a JSON object.
pub fn message_body(
    def: &SagaDefinition,
    saga_id: &str,
    correlation_id: &str,
    output: &SagaOutput,
    now_ms: i64,
) -> Map<String, Value> {
    let mut map = output.payload.clone();
    map.insert("event_id".into(), Value::String(output.event_id.clone()));
    map.insert(
        "event_type".into(),
        Value::String(output.event_type.clone()),
    );
    map.insert("event_version".into(), Value::from(1));
    map.insert(def.key_field.clone(), Value::String(saga_id.to_string()));
    map.insert(
        "correlation_id".into(),
        Value::String(correlation_id.to_string()),
    );
    map.insert("occurred_at".into(), Value::String(rfc3339(now_ms)));
    map
}

#[cfg(test)]
mod tests {
    use super::*;

    fn decode(def: &SagaDefinition, record: &InputRecord) -> Result<DecodedEvent, BadInput> {
        let map = crate::codec::Codec::json()
            .read(&record.topic, record.value.as_deref())
            .map_err(|e| match e {
                crate::codec::DecodeError::Bad(bad) => BadInput::from(bad),
                crate::codec::DecodeError::Unavailable(m) => {
                    panic!("JSON is never unavailable: {m}")
                }
            })?;
        check(def, record, map)
    }

    fn def() -> SagaDefinition {
        SagaDefinition::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_saga.yaml"
        )))
        .unwrap()
    }

    fn record(topic: &str, key: Option<&str>, value: &str) -> InputRecord {
        InputRecord {
            topic: topic.into(),
            partition: 0,
            offset: 0,
            timestamp_ms: 0,
            key: key.map(|k| k.as_bytes().to_vec()),
            value: Some(value.as_bytes().to_vec()),
            headers: vec![],
        }
    }

    const CREATED: &str = r#"{"event_id":"e1","event_type":"OrderCreated","event_version":1,"order_id":"o1","occurred_at":"2026-11-26T10:00:00Z","user_id":"u1","total":12.5,"currency":"EUR","items":[{"sku":"a","quantity":1}]}"#;

    #[test]
    fn event_times_with_offsets_and_without_are_accepted() {
        for ok in [
            "2026-01-01T10:00:00Z",
            "2026-01-01T10:00:00.123Z",
            "2026-01-01T10:00:00+02:00",
            "2026-01-01T10:00:00.5-05:30",
            "2026-01-01 10:00:00",
        ] {
            assert_eq!(check_time(ok), Ok(()), "{ok}");
        }
        for bad in [
            "yesterday",
            "2026-13-01T10:00:00Z",
            "2026-01-01T10:00:00+25:00",
            "2026-01-01T10:00:00+0200",
            "",
        ] {
            assert!(check_time(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn wrapped_and_flat_bodies_decode_alike() {
        let d = def();
        let flat = decode(&d, &record("orders.created", Some("o1"), CREATED)).unwrap();
        let wrapped = decode(
            &d,
            &record(
                "orders.created",
                Some("o1"),
                &format!(r#"{{"event":{CREATED}}}"#),
            ),
        )
        .unwrap();
        assert_eq!(flat, wrapped);
        assert_eq!(flat.role, EventRole::Start);
        assert_eq!(flat.saga_id, "o1");
        assert!(flat.payload.contains_key("total") && !flat.payload.contains_key("event_id"));
        // What the topology does not declare stays out of the saga's context.
        let padded = CREATED.replace(r#""user_id":"u1""#, r#""user_id":"u1","blob":"xxxxxxxx""#);
        let read = decode(&d, &record("orders.created", Some("o1"), &padded)).unwrap();
        assert!(!read.payload.contains_key("blob"), "{:?}", read.payload);
        assert_eq!(read.payload, flat.payload);
        let numeric = CREATED.replace(r#""order_id":"o1""#, r#""order_id":42"#);
        assert_eq!(
            decode(&d, &record("orders.created", None, &numeric))
                .unwrap()
                .saga_id,
            "42"
        );
    }

    #[test]
    fn each_kind_of_bad_input_is_named() {
        let d = def();
        let kind = |topic: &str, key: Option<&str>, v: &str| {
            decode(&d, &record(topic, key, v)).unwrap_err().kind
        };
        use BadInputKind::*;
        assert_eq!(kind("orders.created", None, "{not json"), InvalidJson);
        assert_eq!(kind("orders.created", None, "[1,2]"), InvalidJson);
        assert_eq!(
            kind(
                "orders.created",
                None,
                &CREATED.replace(r#""order_id":"o1""#, r#""order_id":"""#)
            ),
            MissingSagaId
        );
        // No event id: one derived from the content, the same for the same content.
        let no_id = CREATED.replace(r#""event_id":"e1","#, "");
        let a = decode(&d, &record("orders.created", None, &no_id)).unwrap();
        let b = decode(&d, &record("orders.created", None, &no_id)).unwrap();
        assert_eq!(a.event_id, b.event_id);
        let other = no_id.replace("12.5", "13.5");
        assert_ne!(
            decode(&d, &record("orders.created", None, &other))
                .unwrap()
                .event_id,
            a.event_id
        );
        assert_eq!(
            kind(
                "orders.created",
                None,
                &CREATED.replace("OrderCreated", "OrderShipped")
            ),
            UnknownEventType
        );
        assert_eq!(kind("payments.events", None, CREATED), UnknownEventType);
        assert_eq!(
            kind(
                "orders.created",
                None,
                &CREATED.replace("12.5", r#""twelve""#)
            ),
            InvalidField
        );
        assert_eq!(
            kind(
                "orders.created",
                None,
                &CREATED.replace(r#""currency":"EUR","#, "")
            ),
            InvalidField
        );
        assert_eq!(
            kind(
                "orders.created",
                None,
                &CREATED.replace("2026-11-26T10:00:00Z", "yesterday")
            ),
            InvalidField
        );
        let mut empty = record("orders.created", None, "");
        empty.value = None;
        assert_eq!(decode(&d, &empty).unwrap_err().kind, MissingValue);
    }
}
