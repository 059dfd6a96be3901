//! The message contract of a topology as machine-readable documents: one JSON Schema per message
//! (every event the saga consumes and every command, compensation and outcome it writes, with the
//! envelope), and an AsyncAPI 3.0 document of the topics.
//!
//! Consumed messages are described as the checks in [`super::contract::check`] accept them (flat
//! or wrapped, `event_id` and `occurred_at` optional, an integer saga id allowed, other fields
//! let through); written messages exactly as [`super::contract::message_body`] writes them (every
//! field present, nothing else). The keywords used are common to JSON Schema draft-07 and 2020-12,
//! so the same schemas serve AsyncAPI's schema format.

use serde_json::{json, Map, Value};

use super::contract::{CORRELATION_HEADER, OCCURRED_AT_PATTERN, TRACEPARENT_HEADER};
use super::topology::{FieldKind, FieldSpec, MessageSpec, SagaDefinition};
use crate::codec::signing::SIGNATURE_HEADER;
use crate::codec::Format;

/// Who writes a message.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Direction {
    /// Written by a service, read by the saga.
    Consumed,
    /// Written by the saga.
    Emitted,
}

impl Direction {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Consumed => "consumed",
            Self::Emitted => "emitted",
        }
    }
}

/// One message of the contract.
#[derive(Debug, Clone)]
pub struct ContractMessage {
    pub event_type: String,
    pub topic: String,
    pub direction: Direction,
    /// What the message is in the saga (`start`, `command of step payment`, ...).
    pub role: String,
    /// The JSON Schema of its value (without `$schema` and `$id`).
    pub schema: Value,
}

/// Every message of the topology (the loaded version), consumed ones first, in the topology's
/// order.
pub fn messages(def: &SagaDefinition) -> Vec<ContractMessage> {
    let mut out = Vec::new();
    let mut consumed = |event: &str, topic: &str, role: String| {
        out.push(ContractMessage {
            event_type: event.to_string(),
            topic: topic.to_string(),
            direction: Direction::Consumed,
            role,
            schema: consumed_schema(def, event, topic),
        });
    };
    consumed(&def.start_event, &def.start_topic, "starts the saga".into());
    for step in &def.steps {
        let s = &step.name;
        consumed(
            &step.success,
            &step.reply_topic,
            format!("step {s} succeeded"),
        );
        consumed(&step.failure, &step.reply_topic, format!("step {s} failed"));
        consumed(
            &step.confirmed_by,
            &step.reply_topic,
            format!("the compensation of step {s} is done"),
        );
    }
    for step in &def.steps {
        let s = &step.name;
        out.push(emitted(
            def,
            &step.command,
            format!("the command of step {s}"),
            false,
        ));
        out.push(emitted(
            def,
            &step.compensation,
            format!("undoes step {s}"),
            false,
        ));
    }
    out.push(emitted(
        def,
        &def.completed,
        "the saga completed".into(),
        false,
    ));
    out.push(emitted(
        def,
        &def.cancelled,
        "the saga was cancelled; `reason` says why".into(),
        true,
    ));
    out
}

/// The schema of one field type.
fn kind_schema(kind: FieldKind) -> Value {
    match kind {
        FieldKind::String => json!({"type": "string"}),
        FieldKind::Number => json!({"type": "number"}),
        FieldKind::Integer => json!({"type": "integer"}),
        FieldKind::Boolean => json!({"type": "boolean"}),
        FieldKind::List => json!({"type": "array"}),
        FieldKind::Object => json!({"type": "object"}),
        FieldKind::Id => json!({"anyOf": [
            {"type": "string", "pattern": "\\S"},
            {"type": "integer"}
        ]}),
        FieldKind::Decimal => json!({"anyOf": [
            {"type": "number"},
            {"type": "string", "pattern": "^[-+]?[0-9]+(\\.[0-9]+)?$"}
        ]}),
    }
}

/// The schema of a field with its types, `null` allowed when it may be missing.
fn field_schema(kinds: &[FieldKind], nullable: bool, description: Option<String>) -> Value {
    let mut options: Vec<Value> = kinds.iter().map(|k| kind_schema(*k)).collect();
    if nullable {
        options.push(json!({"type": "null"}));
    }
    let mut schema = match options.len() {
        1 => options.remove(0),
        _ => json!({ "anyOf": options }),
    };
    if let (Some(text), Value::Object(map)) = (description, &mut schema) {
        map.insert("description".into(), Value::String(text));
    }
    schema
}

fn consumed_schema(def: &SagaDefinition, event: &str, topic: &str) -> Value {
    let fields = def.events.get(event).cloned().unwrap_or_default();
    let mut properties = Map::new();
    properties.insert(
        "event_id".into(),
        json!({"type": ["string", "null"], "description": "unique per event; when missing, one is derived from the topic and content, so an identical re-send is a duplicate"}),
    );
    properties.insert("event_type".into(), json!({"const": event}));
    properties.insert(
        "event_version".into(),
        json!({"type": ["integer", "null"], "description": "1 when missing"}),
    );
    properties.insert(
        def.key_field.clone(),
        json!({"anyOf": [{"type": "string", "pattern": "\\S"}, {"type": "integer"}], "description": "the saga id; the record key should be the same"}),
    );
    properties.insert(
        "correlation_id".into(),
        json!({"type": ["string", "null"], "description": format!("when missing: the {CORRELATION_HEADER} header, else generated")}),
    );
    properties.insert(
        "occurred_at".into(),
        json!({"type": ["string", "null"], "pattern": OCCURRED_AT_PATTERN, "description": "RFC 3339 (Z or an offset), or `YYYY-MM-DD hh:mm:ss` (UTC); when missing, the record's timestamp"}),
    );
    let mut required = vec![json!("event_type"), json!(def.key_field)];
    for field in &fields {
        properties.insert(
            field.name.clone(),
            field_schema(&field.kinds, field.optional, None),
        );
        if !field.optional {
            required.push(json!(field.name));
        }
    }
    let event_schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
    });
    let mut schema = json!({
        "title": event,
        "description": match def.format_of(topic) {
            Format::Json => format!(
                "{event} on {topic}, read by the saga {}: a flat object, or wrapped as {{\"event\": {{...}}}}. Fields beyond these are accepted and not kept.",
                def.name
            ),
            Format::Avro(_) => format!(
                "{event} on {topic}, read by the saga {} as a record of the topic's Avro schema: the fields it checks.",
                def.name
            ),
        },
        "anyOf": [
            event_schema,
            {
                "type": "object",
                "properties": { "event": event_schema },
                "required": ["event"]
            }
        ]
    });
    add_wire_note(def, topic, &mut schema);
    schema
}

/// The types a context field can have: from the start event and the steps' success replies
/// (what the context holds). `None` when no event declares it.
fn context_field(def: &SagaDefinition, name: &str) -> Option<(Vec<FieldKind>, bool)> {
    let sources = std::iter::once(&def.start_event).chain(def.steps.iter().map(|s| &s.success));
    let mut kinds = Vec::new();
    let mut optional = false;
    let mut found = false;
    for event in sources {
        if let Some(field) = def
            .events
            .get(event)
            .and_then(|fields| fields.iter().find(|f: &&FieldSpec| f.name == name))
        {
            found = true;
            optional |= field.optional;
            for kind in &field.kinds {
                if !kinds.contains(kind) {
                    kinds.push(*kind);
                }
            }
        }
    }
    found.then_some((kinds, optional))
}

fn emitted(
    def: &SagaDefinition,
    spec: &MessageSpec,
    role: String,
    with_reason: bool,
) -> ContractMessage {
    let mut properties = Map::new();
    properties.insert(
        "event_id".into(),
        json!({"type": "string", "format": "uuid", "description": "the same when the message is sent again (a retry)"}),
    );
    properties.insert("event_type".into(), json!({"const": spec.event_type}));
    properties.insert("event_version".into(), json!({"const": 1}));
    properties.insert(
        def.key_field.clone(),
        json!({"type": "string", "description": "the saga id, also the record key"}),
    );
    properties.insert("correlation_id".into(), json!({"type": "string"}));
    properties.insert(
        "occurred_at".into(),
        json!({"type": "string", "format": "date-time"}),
    );
    for (field, source) in &spec.fields {
        let description = Some(format!("the saga's {source}, as received"));
        let schema = match context_field(def, source) {
            // A value the saga did not receive is written as null.
            Some((kinds, optional)) => field_schema(&kinds, optional, description),
            None => json!({ "description": description }),
        };
        properties.insert(field.clone(), schema);
    }
    if with_reason {
        properties.insert(
            "reason".into(),
            json!({"type": "string", "description": "<step>_failed, timeout:<step>, manual: <text>, or <step>_unwritable; `; compensation_stuck:<step>` added when a compensation was given up"}),
        );
    }
    let required: Vec<Value> = properties.keys().map(|k| json!(k)).collect();
    let event_schema = json!({
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": false,
    });
    // Avro values are records of their schema, never wrapped.
    let wrapped = def.wrap_outputs && def.format_of(&spec.topic) == Format::Json;
    let mut schema = if wrapped {
        json!({
            "title": spec.event_type,
            "type": "object",
            "properties": { "event": event_schema },
            "required": ["event"],
            "additionalProperties": false,
        })
    } else {
        let mut flat = event_schema;
        flat["title"] = json!(spec.event_type);
        flat
    };
    schema["description"] = json!(format!(
        "{} on {}, written by the saga {}: {role}{}.",
        spec.event_type,
        spec.topic,
        def.name,
        if wrapped {
            ", wrapped as {\"event\": {...}}"
        } else {
            ""
        }
    ));
    add_wire_note(def, &spec.topic, &mut schema);
    ContractMessage {
        event_type: spec.event_type.clone(),
        topic: spec.topic.clone(),
        direction: Direction::Emitted,
        role,
        schema,
    }
}

/// For an Avro topic, says that the Avro schema is the wire contract.
fn add_wire_note(def: &SagaDefinition, topic: &str, schema: &mut Value) {
    if matches!(def.format_of(topic), Format::Avro(_)) {
        schema["x-wire-format"] = json!(
            "avro: the Avro schema registered for the topic is the wire contract; this JSON Schema describes the same fields as JSON"
        );
    }
}

/// A standalone JSON Schema (draft 2020-12) of one message.
pub fn standalone(def: &SagaDefinition, message: &ContractMessage) -> Value {
    let mut schema = json!({
        "$schema": "https://json-schema.org/draft/2020-12/schema",
        "$id": format!("urn:saga-streams:{}:{}", def.name, message.event_type),
    });
    if let (Value::Object(out), Value::Object(body)) = (&mut schema, &message.schema) {
        for (k, v) in body {
            out.insert(k.clone(), v.clone());
        }
        out.insert(
            "x-saga-streams".into(),
            json!({
                "topic": message.topic,
                "direction": message.direction.as_str(),
                "role": message.role,
                "key": def.key_field,
            }),
        );
    }
    schema
}

/// The AsyncAPI 3.0 document: a channel per topic with its messages, an operation per topic
/// (the saga receives from input topics and sends to output topics), the headers, and the
/// record key as a Kafka message binding.
pub fn asyncapi(def: &SagaDefinition) -> Value {
    let messages = messages(def);
    let mut channels = Map::new();
    let mut operations = Map::new();
    let mut components = Map::new();
    let headers = json!({
        "type": "object",
        "properties": {
            CORRELATION_HEADER: {"type": "string", "description": "the saga's correlation id; on every message the saga writes"},
            TRACEPARENT_HEADER: {"type": "string", "description": "W3C trace context"},
            SIGNATURE_HEADER: {"type": "string", "description": "v1;kid=<key id>;hmac-sha256=<hex>, on topics with signatures"},
        }
    });
    for message in &messages {
        let channel = channels
            .entry(message.topic.clone())
            .or_insert_with(|| json!({"address": message.topic, "messages": {}}));
        channel["messages"][&message.event_type] =
            json!({"$ref": format!("#/components/messages/{}", message.event_type)});
        let mut payload = message.schema.clone();
        if let Value::Object(map) = &mut payload {
            map.remove("x-wire-format");
        }
        let content_type = match def.format_of(&message.topic) {
            Format::Avro(_) => "application/vnd.apache.avro+binary",
            Format::Json => "application/json",
        };
        components.insert(
            message.event_type.clone(),
            json!({
                "name": message.event_type,
                "title": message.event_type,
                "summary": message.role,
                "contentType": content_type,
                "headers": headers,
                "payload": payload,
                "bindings": {"kafka": {
                    "key": {"type": "string", "description": format!("the saga id ({})", def.key_field)},
                    "bindingVersion": "0.5.0"
                }},
            }),
        );
    }
    for (topic, channel) in &channels {
        let Some(first) = messages.iter().find(|m| &m.topic == topic) else {
            continue;
        };
        let action = match first.direction {
            Direction::Consumed => "receive",
            Direction::Emitted => "send",
        };
        let refs: Vec<Value> = channel["messages"]
            .as_object()
            .into_iter()
            .flatten()
            .map(|(name, _)| {
                json!({"$ref": format!("#/channels/{}/messages/{name}", escape_pointer(topic))})
            })
            .collect();
        operations.insert(
            format!("{action}-{topic}"),
            json!({
                "action": action,
                "channel": {"$ref": format!("#/channels/{}", escape_pointer(topic))},
                "messages": refs,
            }),
        );
    }
    json!({
        "asyncapi": "3.0.0",
        "info": {
            "title": def.name,
            "version": def.version.to_string(),
            "description": format!(
                "The messages of the saga {}, keyed by {}. Written by saga-streams contract.",
                def.name, def.key_field
            ),
        },
        "defaultContentType": "application/json",
        "channels": channels,
        "operations": operations,
        "components": {"messages": components},
    })
}

/// A JSON Pointer token (`/` and `~` escaped).
fn escape_pointer(token: &str) -> String {
    token.replace('~', "~0").replace('/', "~1")
}

#[cfg(test)]
mod tests {
    use super::*;

    fn def() -> SagaDefinition {
        SagaDefinition::load(std::path::Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_saga.yaml"
        )))
        .unwrap()
    }

    #[test]
    fn every_message_of_the_topology_has_a_schema_once() {
        let d = def();
        let names: Vec<String> = messages(&d).into_iter().map(|m| m.event_type).collect();
        for expected in [
            "OrderCreated",
            "PaymentSucceeded",
            "PaymentFailed",
            "PaymentRefunded",
            "InventoryReserved",
            "InventoryReservationFailed",
            "InventoryReleased",
            "ProcessPayment",
            "RefundPayment",
            "ReserveInventory",
            "ReleaseInventory",
            "OrderCompleted",
            "OrderCancelled",
        ] {
            assert_eq!(
                names.iter().filter(|n| *n == expected).count(),
                1,
                "{names:?}"
            );
        }
        assert_eq!(names.len(), 13);
    }

    #[test]
    fn an_emitted_field_has_the_type_of_the_context_field_it_copies() {
        let d = def();
        let refund = messages(&d)
            .into_iter()
            .find(|m| m.event_type == "RefundPayment")
            .unwrap();
        let event = &refund.schema["properties"]["event"];
        // amount <- total (decimal), payment_id <- payment_id (id).
        assert_eq!(
            event["properties"]["amount"]["anyOf"][1]["type"],
            json!("string")
        );
        assert_eq!(
            event["properties"]["payment_id"]["anyOf"][1]["type"],
            json!("integer")
        );
        assert_eq!(event["additionalProperties"], json!(false));
    }
}
