//! Message formats: the JSON contract (flat or wrapped bodies, the envelope, correlation headers)
//! and Avro through a Schema Registry. Both read into the same JSON object, so every check and the
//! state machine see one shape whatever the topic's format.

pub mod avro;
pub mod compat;
pub mod json;
pub mod registry;
pub mod schemas;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

use crate::saga::topology::{Format, SagaDefinition};
use json::{BadInput, BadInputKind};

/// Why a record value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The record can never be read: dead-letter it.
    Bad(BadInput),
    /// Something it depends on (the registry) cannot be reached: retry later, do not dead-letter.
    Unavailable(String),
}

impl From<BadInput> for DecodeError {
    fn from(bad: BadInput) -> Self {
        DecodeError::Bad(bad)
    }
}

/// How long a registry call may take before it counts as unavailable.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads and writes the values of a topology's topics, each in its configured format.
#[derive(Debug)]
pub struct Codec {
    formats: std::collections::BTreeMap<String, Format>,
    avro: Option<avro::AvroCodec>,
}

impl Codec {
    /// A codec for topologies whose topics are all JSON.
    pub fn json() -> Codec {
        Codec {
            formats: Default::default(),
            avro: None,
        }
    }

    /// The codec of `def`. When a topic is Avro this needs the registry (`registry_url`) and the
    /// local schemas (`def.schemas_dir`); every subject of the topics in `writes` must hold its
    /// local schema already.
    pub fn new(
        def: &SagaDefinition,
        registry_url: Option<&str>,
        writes: &[String],
    ) -> Result<Codec, String> {
        if !def.uses_avro() {
            return Ok(Codec {
                formats: def.all_formats(),
                avro: None,
            });
        }
        let list = |problems: Vec<String>| format!("avro topics:\n  - {}", problems.join("\n  - "));
        let dir = def.schemas_dir.as_ref().ok_or_else(|| {
            "the topology has avro topics but no `schemas:` directory (or --schemas)".to_string()
        })?;
        let url = registry_url.ok_or_else(|| {
            "the topology has avro topics: give the Schema Registry with --schema-registry-url or SCHEMA_REGISTRY_URL".to_string()
        })?;
        let catalogue = schemas::Catalogue::load(dir).map_err(list)?;
        let registry = Arc::new(registry::Registry::new(url, REGISTRY_TIMEOUT)?);
        let avro = avro::AvroCodec::new(def, &catalogue, registry, writes).map_err(list)?;
        Ok(Codec {
            formats: def.all_formats(),
            avro: Some(avro),
        })
    }

    /// The format of a topic.
    pub fn format_of(&self, topic: &str) -> Format {
        self.formats.get(topic).copied().unwrap_or(Format::Json)
    }

    /// Reads a record value into the event's JSON object (unwrapped from `{"event": ...}`).
    pub fn read(
        &self,
        topic: &str,
        value: Option<&[u8]>,
    ) -> Result<Map<String, Value>, DecodeError> {
        let bytes = match value {
            Some(b) if !b.is_empty() => b,
            _ => {
                return Err(DecodeError::Bad(BadInput::new(
                    BadInputKind::MissingValue,
                    "the record has no value",
                )))
            }
        };
        match (self.format_of(topic), &self.avro) {
            (Format::Avro(_), Some(avro)) => {
                let (name, mut map) = avro.decode(bytes)?;
                match map.get("event_type") {
                    None | Some(Value::Null) => {
                        map.insert("event_type".into(), Value::String(name));
                    }
                    Some(Value::String(t)) if *t == name => {}
                    Some(other) => {
                        return Err(DecodeError::Bad(BadInput::new(
                            BadInputKind::InvalidField,
                            format!(
                                "event_type {other} differs from the Avro record name '{name}'"
                            ),
                        )))
                    }
                }
                Ok(map)
            }
            _ => json::read_body(bytes).map_err(DecodeError::Bad),
        }
    }

    /// Writes a message for `topic`: Avro when the topic is, else JSON (wrapped as
    /// `{"event": ...}` when `wrap`).
    pub fn write(
        &self,
        topic: &str,
        event_type: &str,
        map: Map<String, Value>,
        wrap: bool,
    ) -> Result<Vec<u8>, String> {
        match (self.format_of(topic), &self.avro) {
            (Format::Avro(_), Some(avro)) => avro.encode(topic, event_type, map),
            (Format::Avro(_), None) => {
                Err(format!("{topic} is avro but no registry is configured"))
            }
            (Format::Json, _) => Ok(json::encode_body(map, wrap)),
        }
    }
}
