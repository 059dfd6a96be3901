//! Avro in the Confluent wire format: a zero magic byte, the writer schema's registry id
//! (big-endian u32), then the Avro datum.
//!
//! Reading fetches the writer schema by id once (cached for the life of the process), decodes the
//! datum with it, and resolves the record into the reader schema saga-streams runs with (the newest
//! local version of that event type), so producers of different versions share a topic. The
//! result is the same JSON object the JSON path produces, and goes through the same checks.
//!
//! Writing resolves the message into the output subject's record and prefixes the id the registry
//! gave that exact schema, looked up once at start-up.

use std::collections::HashMap;
use std::io::Read;
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use apache_avro::reader::datum::GenericDatumReader;
use apache_avro::types::Value as AvroValue;
use apache_avro::writer::datum::GenericDatumWriter;
use apache_avro::Schema;
use serde_json::{Map, Value};

use super::registry::{Registry, RegistryError};
use super::schemas::{subjects, Catalogue};
use super::DecodeError;
use super::TopicSet;
use super::{BadValue, BadValueKind};

/// How one event type is written to one topic.
struct Output {
    subject: String,
    id: u32,
    /// The encoder of the subject's schema (a record, or a union of records), built once.
    encoder: Arc<GenericDatumWriter<'static>>,
    /// The record's position when the subject's schema is a union.
    branch: Option<usize>,
    /// The record on its own, to resolve messages into.
    record: Schema,
}

/// A writer schema and its decoder, built once per registry id. The cache never evicts, so the
/// schema lives as long as the process anyway: it is leaked, which lets the decoder (resolved
/// once, not per record) borrow it.
struct WriterSchema {
    schema: &'static Schema,
    decoder: GenericDatumReader<'static>,
}

/// The Avro side of the codec.
pub struct AvroCodec {
    registry: Arc<Registry>,
    /// Reader schema (the newest local record) per event type.
    readers: HashMap<String, Schema>,
    /// Per (topic, event type) written by this process.
    outputs: HashMap<(String, String), Output>,
    /// Writer schemas by registry id.
    writers: RwLock<HashMap<u32, Arc<WriterSchema>>>,
    /// Ids the registry said it does not have, and when: a burst of records with bogus ids is
    /// dead-lettered without asking the registry record by record.
    unknown_ids: RwLock<HashMap<u32, Instant>>,
}

/// How long an id the registry does not have is taken as unknown without asking again.
const UNKNOWN_ID_MEMORY: Duration = Duration::from_secs(60);
/// Unknown ids remembered at most (then the memory starts afresh).
const UNKNOWN_IDS_KEPT: usize = 10_000;

impl std::fmt::Debug for AvroCodec {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("AvroCodec")
            .field("registry", &self.registry)
            .field("readers", &self.readers.keys().collect::<Vec<_>>())
            .field("outputs", &self.outputs.keys().collect::<Vec<_>>())
            .finish()
    }
}

impl AvroCodec {
    /// Builds the codec of `def`'s Avro topics. For each topic in `writes` that is Avro, the
    /// subject must hold the local schema already (`saga-streams schemas register`).
    pub fn new(
        def: &TopicSet,
        catalogue: &Catalogue,
        registry: Arc<Registry>,
        writes: &[String],
    ) -> Result<AvroCodec, Vec<String>> {
        let subjects = subjects(def, catalogue)?;
        let mut readers = HashMap::new();
        for subject in &subjects {
            for event_type in &subject.types {
                if let Some(file) = catalogue.latest(event_type) {
                    readers.insert(event_type.clone(), file.schema.clone());
                }
            }
        }
        let mut problems = Vec::new();
        let mut outputs = HashMap::new();
        for subject in subjects
            .iter()
            .filter(|s| s.topics.iter().any(|t| writes.contains(t)))
        {
            let id = match registry.lookup(&subject.name, &subject.text) {
                Ok(Some(registered)) => registered.id,
                Ok(None) => {
                    problems.push(format!(
                        "subject {} does not hold the schema of {} yet; register it with `saga-streams schemas register`",
                        subject.name,
                        subject.types.join(", ")
                    ));
                    continue;
                }
                Err(e) => {
                    problems.push(format!("subject {}: {e}", subject.name));
                    continue;
                }
            };
            // One per subject for the life of the process (see `WriterSchema`).
            let schema: &'static Schema = Box::leak(Box::new(subject.schema.clone()));
            let encoder = match GenericDatumWriter::builder(schema).build() {
                Ok(encoder) => Arc::new(encoder),
                Err(e) => {
                    problems.push(format!("subject {}: {e}", subject.name));
                    continue;
                }
            };
            for (i, event_type) in subject.types.iter().enumerate() {
                let Some(record) = readers.get(event_type) else {
                    continue;
                };
                for topic in subject.topics.iter().filter(|t| writes.contains(t)) {
                    if !def.types_on(topic).contains(event_type) {
                        continue;
                    }
                    outputs.insert(
                        (topic.clone(), event_type.clone()),
                        Output {
                            subject: subject.name.clone(),
                            id,
                            encoder: encoder.clone(),
                            branch: matches!(schema, Schema::Union(_)).then_some(i),
                            record: record.clone(),
                        },
                    );
                }
            }
        }
        if !problems.is_empty() {
            return Err(problems);
        }
        Ok(AvroCodec {
            registry,
            readers,
            outputs,
            writers: RwLock::new(HashMap::new()),
            unknown_ids: RwLock::new(HashMap::new()),
        })
    }

    /// The writer schema of `id`, from the cache or the registry.
    fn writer(&self, id: u32) -> Result<Arc<WriterSchema>, DecodeError> {
        if let Some(writer) = self.writers.read().ok().and_then(|c| c.get(&id).cloned()) {
            return Ok(writer);
        }
        let unknown = || {
            DecodeError::Bad(BadValue::new(
                BadValueKind::UnknownSchemaId,
                format!("schema id {id} is not in the registry"),
            ))
        };
        let known_unknown = self
            .unknown_ids
            .read()
            .ok()
            .and_then(|m| m.get(&id).copied())
            .is_some_and(|at| at.elapsed() < UNKNOWN_ID_MEMORY);
        if known_unknown {
            return Err(unknown());
        }
        let answer = self.registry.schema_by_id(id);
        let result = match &answer {
            Ok(_) => "found",
            Err(RegistryError::NotFound(_)) => "not_found",
            Err(RegistryError::Unauthorized(_)) => "unauthorized",
            Err(RegistryError::Refused(_)) => "refused",
            Err(RegistryError::Unavailable(_)) => "unavailable",
        };
        metrics::counter!(crate::telemetry::metrics::REGISTRY_LOOKUPS, "result" => result)
            .increment(1);
        let text = answer.map_err(|e| match e {
            RegistryError::NotFound(_) => {
                if let Ok(mut ids) = self.unknown_ids.write() {
                    if ids.len() >= UNKNOWN_IDS_KEPT {
                        ids.clear();
                    }
                    ids.insert(id, Instant::now());
                }
                unknown()
            }
            // Not the record's fault: the instance stalls (and says why) until it is fixed.
            e @ RegistryError::Unauthorized(_) => DecodeError::Unavailable(format!(
                "fetching writer schema {id}: {e}; check the registry credentials"
            )),
            RegistryError::Refused(m) | RegistryError::Unavailable(m) => {
                DecodeError::Unavailable(format!("fetching writer schema {id}: {m}"))
            }
        })?;
        let schema = Schema::parse_str(&text).map_err(|e| {
            DecodeError::Bad(BadValue::new(
                BadValueKind::UnknownSchemaId,
                format!("schema id {id} is not an Avro schema: {e}"),
            ))
        })?;
        let schema: &'static Schema = Box::leak(Box::new(schema));
        let decoder = GenericDatumReader::builder(schema).build().map_err(|e| {
            DecodeError::Bad(BadValue::new(
                BadValueKind::UnknownSchemaId,
                format!("schema id {id} cannot be read: {e}"),
            ))
        })?;
        let writer = Arc::new(WriterSchema { schema, decoder });
        if let Ok(mut cache) = self.writers.write() {
            // Another thread may have fetched it meanwhile: keep the first (a racing copy stays
            // leaked; at most one per stream thread).
            return Ok(cache.entry(id).or_insert(writer).clone());
        }
        Ok(writer)
    }

    /// Decodes one record value into its event type and its fields as a JSON object.
    pub fn decode(&self, bytes: &[u8]) -> Result<(String, Map<String, Value>), DecodeError> {
        let bad = |kind, message: String| DecodeError::Bad(BadValue::new(kind, message));
        let (id, mut datum) = match bytes {
            [0, a, b, c, d, rest @ ..] => (u32::from_be_bytes([*a, *b, *c, *d]), rest),
            _ => {
                return Err(bad(
                    BadValueKind::InvalidAvro,
                    format!(
                        "not in the Confluent Avro wire format (a zero byte and a 4-byte schema id; got {} bytes starting {:#04x})",
                        bytes.len(),
                        bytes.first().copied().unwrap_or_default()
                    ),
                ))
            }
        };
        let writer = self.writer(id)?;
        let value = writer.decoder.read_value(&mut datum).map_err(|e| {
            bad(
                BadValueKind::InvalidAvro,
                format!("does not decode with writer schema {id}: {e}"),
            )
        })?;
        // A truncated datum can decode with its last fields read as null: reject anything that
        // does not fill the writer schema exactly.
        let mut rest = Vec::new();
        let _ = datum.read_to_end(&mut rest);
        if !rest.is_empty() {
            return Err(bad(
                BadValueKind::InvalidAvro,
                format!(
                    "{} bytes left over after the datum of schema {id}",
                    rest.len()
                ),
            ));
        }
        if !value.validate(writer.schema) {
            return Err(bad(
                BadValueKind::InvalidAvro,
                format!("the datum does not match writer schema {id} (truncated?)"),
            ));
        }
        let (name, record) = match (writer.schema, value) {
            (Schema::Record(r), value) => (r.name.name().to_string(), value),
            (Schema::Union(u), AvroValue::Union(i, inner)) => {
                let name = match u.variants().get(i as usize) {
                    Some(Schema::Record(r)) => r.name.name().to_string(),
                    Some(Schema::Ref { name }) => name.name().to_string(),
                    _ => String::new(),
                };
                (name, *inner)
            }
            _ => {
                return Err(bad(
                    BadValueKind::InvalidAvro,
                    format!("writer schema {id} is neither a record nor a union of records"),
                ))
            }
        };
        let reader = self.readers.get(&name).ok_or_else(|| {
            bad(
                BadValueKind::UnknownEventType,
                format!(
                    "writer schema {id} holds a '{name}', an event type this topology does not use"
                ),
            )
        })?;
        let resolved = record.resolve(reader).map_err(|e| {
            bad(
                BadValueKind::IncompatibleSchema,
                format!("writer schema {id} cannot be read as the local {name}: {e}"),
            )
        })?;
        match Value::try_from(resolved) {
            Ok(Value::Object(map)) => Ok((name, map)),
            Ok(_) => Err(bad(
                BadValueKind::InvalidAvro,
                format!("{name} is not a record"),
            )),
            Err(e) => Err(bad(
                BadValueKind::InvalidField,
                format!("{name}: a value has no JSON form: {e}"),
            )),
        }
    }

    /// True when this codec writes `event_type` to `topic`.
    pub fn writes(&self, topic: &str, event_type: &str) -> bool {
        self.outputs
            .contains_key(&(topic.to_string(), event_type.to_string()))
    }

    /// Encodes a message (its envelope and payload as a JSON object) for `topic`.
    pub fn encode(
        &self,
        topic: &str,
        event_type: &str,
        map: Map<String, Value>,
    ) -> Result<Vec<u8>, String> {
        let output = self
            .outputs
            .get(&(topic.to_string(), event_type.to_string()))
            .ok_or_else(|| format!("no Avro schema to write {event_type} to {topic}"))?;
        let mut map = map;
        coerce_to_schema(&mut map, &output.record);
        let value = AvroValue::try_from(Value::Object(map))
            .and_then(|v| v.resolve(&output.record))
            .map_err(|e| {
                format!(
                    "{event_type} does not fit its schema in subject {}: {e}",
                    output.subject
                )
            })?;
        let value = match output.branch {
            Some(i) => AvroValue::Union(i as u32, Box::new(value)),
            None => value,
        };
        let datum = output.encoder.write_value_to_vec(value).map_err(|e| {
            format!(
                "{event_type} does not encode with subject {}: {e}",
                output.subject
            )
        })?;
        let mut bytes = Vec::with_capacity(5 + datum.len());
        bytes.push(0);
        bytes.extend_from_slice(&output.id.to_be_bytes());
        bytes.extend_from_slice(&datum);
        Ok(bytes)
    }
}

/// Brings the loose forms PHP services write (topology types `id`, `decimal`) to what a field of
/// an Avro schema wants: a numeric string for a `double`, `float`, `int` or `long` field becomes
/// that number, an integer for a `string` field becomes its decimal text. Anything else is left
/// for the schema to accept or refuse. JSON outputs are never changed.
fn coerce_to_schema(map: &mut Map<String, Value>, record: &apache_avro::Schema) {
    let apache_avro::Schema::Record(record) = record else {
        return;
    };
    for field in &record.fields {
        if let Some(value) = map.get_mut(&field.name) {
            coerce_value(value, &field.schema);
        }
    }
}

fn coerce_value(value: &mut Value, schema: &apache_avro::Schema) {
    use apache_avro::Schema as S;
    match (schema, &*value) {
        (S::Union(union), v) if !v.is_null() => {
            // ["null", T]: coerce towards the one non-null branch.
            let mut branches = union.variants().iter().filter(|s| !matches!(s, S::Null));
            if let (Some(only), None) = (branches.next(), branches.next()) {
                coerce_value(value, only);
            }
        }
        (S::Double | S::Float, Value::String(s)) => {
            if let Some(n) = s
                .trim()
                .parse::<f64>()
                .ok()
                .filter(|n| n.is_finite())
                .and_then(serde_json::Number::from_f64)
            {
                *value = Value::Number(n);
            }
        }
        (S::Long | S::Int, Value::String(s)) => {
            if let Ok(n) = s.trim().parse::<i64>() {
                *value = Value::from(n);
            }
        }
        (S::String, Value::Number(n)) if n.is_i64() || n.is_u64() => {
            *value = Value::String(n.to_string());
        }
        _ => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    #[test]
    fn php_forms_become_the_schema_types_in_avro_outputs() {
        let schema = apache_avro::Schema::parse_str(
            r#"{"type": "record", "name": "R", "fields": [
                {"name": "amount", "type": "double"},
                {"name": "user_id", "type": "string"},
                {"name": "qty", "type": "long"},
                {"name": "note", "type": ["null", "double"]},
                {"name": "label", "type": "string"}]}"#,
        )
        .unwrap();
        let mut map =
            json!({"amount": "500.00", "user_id": 42, "qty": "3", "note": "1.5", "label": "keep"})
                .as_object()
                .unwrap()
                .clone();
        coerce_to_schema(&mut map, &schema);
        assert_eq!(
            Value::Object(map),
            json!({"amount": 500.0, "user_id": "42", "qty": 3, "note": 1.5, "label": "keep"})
        );
        // Not a number: left for the schema to refuse.
        let mut bad = json!({"amount": "lots", "note": null})
            .as_object()
            .unwrap()
            .clone();
        coerce_to_schema(&mut bad, &schema);
        assert_eq!(Value::Object(bad), json!({"amount": "lots", "note": null}));
    }
}
