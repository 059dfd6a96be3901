//! Wire formats: JSON bodies (flat or wrapped) and Avro through a Schema Registry. Both read into
//! the same JSON object, so the message contract (`saga::contract`) and the state machine see one
//! shape whatever the topic's format. This module knows topics, formats and event type names, not
//! sagas: the saga side describes its topics as a [`TopicSet`].

pub mod avro;
pub mod compat;
pub mod json;
pub mod registry;
pub mod schemas;
pub mod signing;

use std::sync::Arc;
use std::time::Duration;

use serde_json::{Map, Value};

/// Why a record value can never be read.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BadValueKind {
    /// A tombstone or empty value.
    MissingValue,
    /// The bytes are not a JSON object.
    InvalidJson,
    /// A field contradicts the wire format (an Avro record's `event_type` not its name).
    InvalidField,
    /// An Avro record of a type the topic does not carry.
    UnknownEventType,
    /// Avro: the schema id is not in the registry.
    UnknownSchemaId,
    /// Avro: not in the wire format, or the bytes do not decode with the writer schema.
    InvalidAvro,
    /// Avro: the writer schema cannot be resolved into the reader schema.
    IncompatibleSchema,
}

/// A record value that can never be read, and why.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BadValue {
    pub kind: BadValueKind,
    pub message: String,
}

impl BadValue {
    pub fn new(kind: BadValueKind, message: impl Into<String>) -> Self {
        Self {
            kind,
            message: message.into(),
        }
    }
}

/// The topics a codec reads and writes: each one's format and the event types it carries, and
/// where the local Avro schemas are.
#[derive(Debug, Clone, Default, PartialEq)]
pub struct TopicSet {
    pub topics: std::collections::BTreeMap<String, Format>,
    pub types: std::collections::BTreeMap<String, Vec<String>>,
    pub schemas_dir: Option<std::path::PathBuf>,
}

impl TopicSet {
    /// The event types `topic` carries.
    pub fn types_on(&self, topic: &str) -> Vec<String> {
        self.types.get(topic).cloned().unwrap_or_default()
    }

    /// True when any topic is Avro.
    pub fn uses_avro(&self) -> bool {
        self.topics.values().any(|f| matches!(f, Format::Avro(_)))
    }
}

/// Why a record value could not be read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum DecodeError {
    /// The record can never be read: dead-letter it.
    Bad(BadValue),
    /// Something it depends on (the registry) cannot be reached: retry later, do not dead-letter.
    Unavailable(String),
}

impl From<BadValue> for DecodeError {
    fn from(bad: BadValue) -> Self {
        DecodeError::Bad(bad)
    }
}

/// Wire format of a topic.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Format {
    Json,
    /// Avro in the Confluent wire format, its schemas in a Schema Registry.
    Avro(SubjectStrategy),
}

/// How a topic's Avro schemas are named in the registry.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SubjectStrategy {
    /// `<topic>-value`; a topic carrying several event types has a union schema.
    TopicName,
    /// The record's full name; each event type evolves on its own.
    RecordName,
}

impl Format {
    /// Parses `json`, `avro`, or `avro:<strategy>` (`topic_name`, `record_name`).
    pub fn parse(text: &str) -> Result<Format, String> {
        let (format, strategy) = match text.split_once(':') {
            Some((f, s)) => (f, Some(s)),
            None => (text, None),
        };
        match (format, strategy) {
            ("json", None) => Ok(Format::Json),
            ("json", Some(_)) => Err("a subject strategy applies to avro only".into()),
            ("avro", s) => Ok(Format::Avro(SubjectStrategy::parse(
                s.unwrap_or("topic_name"),
            )?)),
            (other, _) => Err(format!("unknown format '{other}' (json, avro)")),
        }
    }

    pub fn name(self) -> &'static str {
        match self {
            Format::Json => "json",
            Format::Avro(SubjectStrategy::TopicName) => "avro",
            Format::Avro(SubjectStrategy::RecordName) => "avro:record_name",
        }
    }
}

impl SubjectStrategy {
    pub fn parse(text: &str) -> Result<SubjectStrategy, String> {
        match text {
            "topic_name" => Ok(SubjectStrategy::TopicName),
            "record_name" => Ok(SubjectStrategy::RecordName),
            other => Err(format!(
                "unknown subject strategy '{other}' (topic_name, record_name)"
            )),
        }
    }
}

/// How long a registry call may take before it counts as unavailable.
pub const REGISTRY_TIMEOUT: Duration = Duration::from_secs(5);

/// Reads and writes the values of a topology's topics, each in its configured format.
#[derive(Debug)]
pub struct Codec {
    formats: std::collections::BTreeMap<String, Format>,
    avro: Option<avro::AvroCodec>,
    /// Which topics' records are signed, and the keys (see [`signing`]).
    signing: Arc<signing::Signing>,
}

impl Codec {
    /// A codec for topologies whose topics are all JSON.
    pub fn json() -> Codec {
        Codec {
            formats: Default::default(),
            avro: None,
            signing: Default::default(),
        }
    }

    /// The codec of `topics`. When a topic is Avro this needs the registry (`registry_url`) and the
    /// local schemas (`topics.schemas_dir`); every subject of the topics in `writes` must hold its
    /// local schema already.
    pub fn new(
        topics: &TopicSet,
        registry_url: Option<&str>,
        writes: &[String],
    ) -> Result<Codec, String> {
        Self::with_access(
            topics,
            registry_url,
            &registry::RegistryAccess::default(),
            writes,
        )
    }

    /// [`Codec::new`] for a registry that wants credentials or TLS settings.
    pub fn with_access(
        topics: &TopicSet,
        registry_url: Option<&str>,
        access: &registry::RegistryAccess,
        writes: &[String],
    ) -> Result<Codec, String> {
        if !topics.uses_avro() {
            return Ok(Codec {
                formats: topics.topics.clone(),
                avro: None,
                signing: Default::default(),
            });
        }
        let list = |problems: Vec<String>| format!("avro topics:\n  - {}", problems.join("\n  - "));
        let dir = topics.schemas_dir.as_ref().ok_or_else(|| {
            "the topology has avro topics but no `schemas:` directory (or --schemas)".to_string()
        })?;
        let url = registry_url.ok_or_else(|| {
            "the topology has avro topics: give the Schema Registry with --schema-registry-url or SCHEMA_REGISTRY_URL".to_string()
        })?;
        let catalogue = schemas::Catalogue::load(dir).map_err(list)?;
        let registry = Arc::new(registry::Registry::connect(url, access, REGISTRY_TIMEOUT)?);
        let avro = avro::AvroCodec::new(topics, &catalogue, registry, writes).map_err(list)?;
        Ok(Codec {
            formats: topics.topics.clone(),
            avro: Some(avro),
            signing: Default::default(),
        })
    }

    /// The codec, signing and verifying the records of the topics `signing` names.
    pub fn with_signing(mut self, signing: signing::Signing) -> Self {
        self.signing = Arc::new(signing);
        self
    }

    /// Which topics' records are signed, and the keys.
    pub fn signing(&self) -> &Arc<signing::Signing> {
        &self.signing
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
                return Err(DecodeError::Bad(BadValue::new(
                    BadValueKind::MissingValue,
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
                        return Err(DecodeError::Bad(BadValue::new(
                            BadValueKind::InvalidField,
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
