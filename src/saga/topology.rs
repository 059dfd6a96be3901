//! Topology files: the YAML that declares a saga (`topologies/*.yaml`), and the validated
//! [`SagaDefinition`] the state machine and the processor run on.
//!
//! Loading happens in two passes. The YAML is first read into the raw file structs, each value
//! carrying its line (`marked_yaml::Spanned`); a structural error (a wrong type, an unknown key)
//! stops there with its line. Then every semantic rule is checked and all problems are reported at
//! once, each as `file:line: message`.

use crate::codec::signing::SignatureMode;
use std::collections::{BTreeMap, BTreeSet};
use std::path::Path;
use std::time::Duration;

use marked_yaml::Spanned;
use serde::Deserialize;

/// Statuses the machine itself uses; a step may not take one of these names as its own.
pub const PENDING: &str = "PENDING";
pub const COMPENSATING: &str = "COMPENSATING";
pub const COMPLETED: &str = "COMPLETED";
pub const FAILED: &str = "FAILED";
/// A cancelled saga with a compensation that was never confirmed after all its attempts.
pub const COMPENSATION_STUCK: &str = "COMPENSATION_STUCK";

/// A topology that cannot be used, with every problem found.
#[derive(Debug, thiserror::Error)]
#[error("invalid topology:\n  {}", .problems.join("\n  "))]
pub struct TopologyError {
    pub problems: Vec<String>,
}

// ---- the file as written -------------------------------------------------------------------

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopology {
    name: Spanned<String>,
    #[serde(default)]
    version: Option<Spanned<u64>>,
    #[serde(default)]
    previous_versions: Vec<Spanned<String>>,
    #[serde(default)]
    key: Option<Spanned<String>>,
    #[serde(default)]
    retention: Option<Spanned<String>>,
    #[serde(default)]
    dedupe_retention: Option<Spanned<String>>,
    #[serde(default)]
    keys: Option<Spanned<String>>,
    #[serde(default)]
    compensated_state: Option<Spanned<String>>,
    #[serde(default)]
    wrap_outputs: Option<Spanned<bool>>,
    #[serde(default)]
    max_input_bytes: Option<Spanned<u64>>,
    #[serde(default)]
    schemas: Option<Spanned<String>>,
    topics: BTreeMap<String, RawTopic>,
    start: RawStart,
    events: BTreeMap<String, BTreeMap<String, Spanned<String>>>,
    steps: Vec<RawStep>,
    outcomes: RawOutcomes,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawTopic {
    #[serde(default)]
    format: Option<Spanned<String>>,
    #[serde(default)]
    subject: Option<Spanned<String>>,
    #[serde(default)]
    signatures: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStart {
    event: Spanned<String>,
    topic: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawStep {
    name: Spanned<String>,
    state: Spanned<String>,
    command: RawCommand,
    replies: RawReplies,
    #[serde(default)]
    compensation: Option<RawCompensation>,
    timeout: Spanned<String>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawRetry {
    attempts: Spanned<u64>,
    #[serde(default)]
    backoff: Option<Spanned<String>>,
    #[serde(default)]
    max_backoff: Option<Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCommand {
    topic: Spanned<String>,
    #[serde(rename = "type")]
    event_type: Spanned<String>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<String>>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawReplies {
    topic: Spanned<String>,
    success: Spanned<String>,
    failure: Spanned<String>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawCompensation {
    topic: Spanned<String>,
    #[serde(rename = "type")]
    event_type: Spanned<String>,
    #[serde(default)]
    fields: BTreeMap<String, Spanned<String>>,
    #[serde(default)]
    confirmed_by: Option<Spanned<String>>,
    #[serde(default)]
    retry: Option<RawRetry>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawOutcomes {
    completed: RawCommand,
    cancelled: RawCommand,
}

// ---- the validated definition -----------------------------------------------------------------

pub use crate::codec::{Format, SubjectStrategy};

/// Type of a payload field an event must carry.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FieldKind {
    String,
    Number,
    Integer,
    Boolean,
    List,
    Object,
    /// An identifier: a non-empty string or an integer (Eloquent keys and `auth()->id()` are
    /// integers; UUIDs are strings).
    Id,
    /// An amount: a number, or a string holding a decimal number (`"500.00"`, as Eloquent's
    /// decimal casts write it).
    Decimal,
}

impl FieldKind {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "string" => Self::String,
            "number" => Self::Number,
            "integer" => Self::Integer,
            "boolean" => Self::Boolean,
            "list" => Self::List,
            "object" => Self::Object,
            "id" => Self::Id,
            "decimal" => Self::Decimal,
            _ => return None,
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Self::String => "string",
            Self::Number => "number",
            Self::Integer => "integer",
            Self::Boolean => "boolean",
            Self::List => "list",
            Self::Object => "object",
            Self::Id => "id",
            Self::Decimal => "decimal",
        }
    }

    /// Whether `value` has this type.
    pub fn accepts(self, value: &serde_json::Value) -> bool {
        use serde_json::Value as V;
        match self {
            Self::String => matches!(value, V::String(_)),
            Self::Number => matches!(value, V::Number(_)),
            Self::Integer => value.as_i64().is_some() || value.as_u64().is_some(),
            Self::Boolean => matches!(value, V::Bool(_)),
            Self::List => matches!(value, V::Array(_)),
            Self::Object => matches!(value, V::Object(_)),
            Self::Id => match value {
                V::String(s) => !s.trim().is_empty(),
                v => v.as_i64().is_some() || v.as_u64().is_some(),
            },
            Self::Decimal => match value {
                V::Number(_) => true,
                V::String(s) => is_decimal_text(s),
                _ => false,
            },
        }
    }
}

/// `"500"`, `"-12.50"`, `"0.5"`: digits with an optional sign and at most one decimal point with
/// digits on both sides; no exponent, no `NaN` or `inf`, no surrounding blanks.
fn is_decimal_text(s: &str) -> bool {
    let digits = s.strip_prefix(['-', '+']).unwrap_or(s);
    let all_digits = |p: &str| !p.is_empty() && p.bytes().all(|b| b.is_ascii_digit());
    match digits.split_once('.') {
        Some((whole, fraction)) => all_digits(whole) && all_digits(fraction),
        None => all_digits(digits),
    }
}

/// One payload field of an event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct FieldSpec {
    pub name: String,
    /// The types the field may have (`string|integer` gives two); at least one.
    pub kinds: Vec<FieldKind>,
    pub optional: bool,
}

impl FieldSpec {
    pub fn accepts(&self, value: &serde_json::Value) -> bool {
        self.kinds.iter().any(|k| k.accepts(value))
    }

    /// The type as written in the topology: `id`, `string|integer`.
    pub fn type_name(&self) -> String {
        let names: Vec<&str> = self.kinds.iter().map(|k| k.name()).collect();
        names.join("|")
    }
}

/// A message the saga emits: its topic, type, and payload fields taken from the saga's context
/// (`payload field -> context field`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MessageSpec {
    pub topic: String,
    pub event_type: String,
    pub fields: Vec<(String, String)>,
}

/// One step: a command, the replies that end it, and the compensation that undoes it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct StepSpec {
    pub name: String,
    /// The saga's status once this step succeeded (e.g. PAYMENT_COMPLETED).
    pub state: String,
    pub command: MessageSpec,
    pub reply_topic: String,
    pub success: String,
    pub failure: String,
    pub compensation: MessageSpec,
    /// The reply that confirms the compensation.
    pub confirmed_by: String,
    /// How long the step (or its compensation) may wait for a reply.
    pub timeout: Duration,
    /// How often the command is sent before the step counts as timed out (default once).
    pub retry: RetryPolicy,
    /// How often the compensation is sent before it is given up as stuck (default
    /// [`RetryPolicy::COMPENSATION_DEFAULT`]).
    pub compensation_retry: RetryPolicy,
}

/// What happens to an input record whose key is missing or is not the saga id in its body.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KeyPolicy {
    /// Re-keyed by the saga id through the application's repartition topic, in the same
    /// transaction (the default: outbox jobs often publish without keys).
    Rekey,
    /// Dead-lettered (`missing_key`, `key_mismatch`).
    Strict,
}

/// The application's repartition topic: inputs whose key is not their saga id go through it,
/// re-keyed, to the task that owns the saga.
pub fn repartition_topic(application_id: &str) -> String {
    format!("{application_id}-rekey-repartition")
}

/// The application's control topic: operators' actions on sagas (`sagas retry|cancel|resume`),
/// keyed by saga id and co-partitioned with the inputs, so the task that owns a saga applies
/// them in its transaction, in order with the saga's events.
pub fn control_topic(application_id: &str) -> String {
    format!("{application_id}-control")
}

/// Re-sending a message whose reply did not come within the step's timeout: the same message
/// with the same event id (participants deduplicate it), `attempts` sends in all, the n-th re-send
/// after a pause of `backoff` x 2^(n-1), at most `max_backoff`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Sends in all, the first included (at least 1).
    pub attempts: u32,
    pub backoff: Duration,
    pub max_backoff: Duration,
}

impl RetryPolicy {
    /// A command is sent once unless its step says otherwise.
    pub const ONCE: RetryPolicy = RetryPolicy {
        attempts: 1,
        backoff: Duration::from_secs(1),
        max_backoff: Duration::from_secs(300),
    };
    /// A compensation is sent up to 5 times, 5 s after the first timeout, doubling to 5 min.
    pub const COMPENSATION_DEFAULT: RetryPolicy = RetryPolicy {
        attempts: 5,
        backoff: Duration::from_secs(5),
        max_backoff: Duration::from_secs(300),
    };

    /// The pause before re-send number `resend` (1 for the first re-send).
    pub fn pause_before(&self, resend: u32) -> Duration {
        let factor = 2u32.saturating_pow(resend.saturating_sub(1).min(30));
        self.backoff.saturating_mul(factor).min(self.max_backoff)
    }
}

/// What an incoming event type means to the saga.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum EventRole {
    /// Starts a saga.
    Start,
    /// Step `n` succeeded.
    Success(usize),
    /// Step `n` failed.
    Failure(usize),
    /// Step `n`'s compensation was carried out.
    Compensated(usize),
}

/// The default input size limit: 1 MiB.
pub const DEFAULT_MAX_INPUT_BYTES: usize = 1 << 20;

/// A validated saga definition.
#[derive(Debug, Clone, PartialEq)]
pub struct SagaDefinition {
    pub name: String,
    /// This definition's version (`version:`, default 1). A saga records the version and the
    /// [`fingerprint`](Self::fingerprint) it started under and runs under that definition for
    /// its whole life.
    pub version: u32,
    /// What a saga record's step numbers depend on: the start event and each step's name, state
    /// and event types, in order (not topics, fields, timeouts or retries, which may change under
    /// the same version). A short stable hash.
    pub fingerprint: String,
    /// Earlier versions kept loaded (`previous_versions:`, files beside this one) so that sagas
    /// started under them finish under them; newest first. Each has none of its own.
    pub previous: Vec<SagaDefinition>,
    /// The `previous_versions:` entries as written, before [`SagaDefinition::load`] reads them.
    previous_files: Vec<(usize, String)>,
    /// The envelope field that identifies a saga and keys every message (default `order_id`).
    pub key_field: String,
    /// How long a finished saga stays in the store: queryable, and deduplicating late replies.
    pub retention: Duration,
    /// How long a small tombstone of a finished saga stays after `retention` (counted from the
    /// outcome, default 30 days): a start event re-delivered until then starts nothing, and a
    /// late success is still compensated.
    pub dedupe_retention: Duration,
    /// Status of a cancelled saga whose compensations ran (default REFUNDED).
    pub compensated_state: String,
    /// Outputs are written as `{"event": {...}}` (the Laravel shape; default) or flat.
    pub wrap_outputs: bool,
    /// What happens to an input whose record key is missing or is not its saga id.
    pub keys: KeyPolicy,
    /// Input values larger than this are dead-lettered (`record_too_large`) with a bounded
    /// prefix of their value, never decoded. Default [`DEFAULT_MAX_INPUT_BYTES`].
    pub max_input_bytes: usize,
    /// The directory of the Avro schemas (`<record full name>.v<N>.avsc`), needed when a topic is
    /// Avro; relative paths in the file are taken from the topology file's directory.
    pub schemas_dir: Option<std::path::PathBuf>,
    pub topics: BTreeMap<String, Format>,
    /// Topics whose records are signed (`signatures: required | optional`); others are off.
    pub signatures: BTreeMap<String, SignatureMode>,
    pub start_event: String,
    pub start_topic: String,
    pub events: BTreeMap<String, Vec<FieldSpec>>,
    pub steps: Vec<StepSpec>,
    pub completed: MessageSpec,
    pub cancelled: MessageSpec,
}

impl SagaDefinition {
    /// Loads and validates a topology file, with the earlier versions it lists.
    pub fn load(path: &Path) -> Result<Self, TopologyError> {
        let file = path.display().to_string();
        let mut def = Self::load_one(path)?;
        let base = path.parent().unwrap_or(Path::new(""));
        let mut problems = Vec::new();
        for (at, name) in std::mem::take(&mut def.previous_files) {
            // Never followed further: an earlier file's own list is refused below, so a file
            // that lists itself (or a cycle) is an error, not an endless recursion.
            let earlier = match Self::load_one(&base.join(&name)) {
                Ok(earlier) => earlier,
                Err(e) => {
                    problems.push(format!(
                        "{file}:{at}: previous version '{name}' cannot be loaded:"
                    ));
                    problems.extend(e.problems.into_iter().map(|p| format!("  {p}")));
                    continue;
                }
            };
            if !earlier.previous_files.is_empty() {
                problems.push(format!("{file}:{at}: '{name}' lists previous versions of its own: list every earlier version in the newest file"));
            }
            def.previous.push(earlier);
        }
        def.previous.sort_by_key(|d| std::cmp::Reverse(d.version));
        problems.extend(def.check_previous(&file));
        if !problems.is_empty() {
            return Err(TopologyError { problems });
        }
        Ok(def)
    }

    /// One file, its schema directory resolved against the file's, its earlier versions not read.
    fn load_one(path: &Path) -> Result<Self, TopologyError> {
        let text = std::fs::read_to_string(path).map_err(|e| TopologyError {
            problems: vec![format!("{}: cannot read: {e}", path.display())],
        })?;
        let mut def = Self::parse(&path.display().to_string(), &text)?;
        if let (Some(dir), Some(base)) = (&def.schemas_dir, path.parent()) {
            if dir.is_relative() {
                def.schemas_dir = Some(base.join(dir));
            }
        }
        Ok(def)
    }

    /// Checks that the earlier versions can run beside this one: same saga, older, and topics
    /// every version reads the same way.
    fn check_previous(&self, file: &str) -> Vec<String> {
        let mut problems = Vec::new();
        let mut seen = vec![self.version];
        for earlier in &self.previous {
            let v = earlier.version;
            if earlier.name != self.name || earlier.key_field != self.key_field {
                problems.push(format!(
                    "{file}: previous version {v} is saga '{}' keyed by '{}', not '{}' keyed by '{}'",
                    earlier.name, earlier.key_field, self.name, self.key_field
                ));
            }
            if v >= self.version {
                problems.push(format!(
                    "{file}: previous version {v} is not older than this file's version {} (give the changed topology a higher `version:`)",
                    self.version
                ));
            } else if seen.contains(&v) {
                problems.push(format!("{file}: version {v} is listed twice"));
            }
            seen.push(v);
            for (topic, format) in &earlier.topics {
                if let Some(ours) = self.topics.get(topic) {
                    if ours != format {
                        problems.push(format!(
                            "{file}: topic '{topic}' is {} here but {} in previous version {v}: every version must read a topic the same way",
                            ours.name(),
                            format.name()
                        ));
                        continue;
                    }
                }
                // An Avro topic both versions use: its subject holds this version's types, which
                // must include the earlier version's.
                if matches!(format, Format::Avro(_)) && self.topics.contains_key(topic) {
                    let ours = self.types_of_version(topic);
                    let missing: Vec<String> = earlier
                        .types_of_version(topic)
                        .into_iter()
                        .filter(|t| !ours.contains(t))
                        .collect();
                    if !missing.is_empty() {
                        problems.push(format!(
                            "{file}: avro topic '{topic}' carries {} in previous version {v} but not here: keep those types on it in this version",
                            missing.join(", ")
                        ));
                    }
                }
            }
        }
        // Over all versions together, as the runtime consumes and writes them.
        let outputs = self.output_topics();
        for topic in self.input_topics() {
            if outputs.contains(&topic) {
                problems.push(format!(
                    "{file}: topic '{topic}' is read by one version and written by another: the saga would consume its own outputs"
                ));
            }
        }
        problems
    }

    /// The definition a saga started under version `version` with `fingerprint` runs on, or why
    /// there is none (`None` fingerprint: a record written before fingerprints, trusted).
    pub fn for_saga(
        &self,
        version: u32,
        fingerprint: Option<&str>,
    ) -> Result<&SagaDefinition, String> {
        let def = std::iter::once(self)
            .chain(&self.previous)
            .find(|d| d.version == version)
            .ok_or_else(|| {
                let loaded: Vec<String> = std::iter::once(self)
                    .chain(&self.previous)
                    .map(|d| d.version.to_string())
                    .collect();
                format!(
                    "the saga started under version {version} of topology '{}', which is not loaded (loaded: {}); add its file to previous_versions",
                    self.name,
                    loaded.join(", ")
                )
            })?;
        match fingerprint {
            Some(f) if f != def.fingerprint => Err(format!(
                "the saga started under a version {version} of topology '{}' with other steps (fingerprint {f}, loaded {}): a topology whose steps change needs a new version, with the old file in previous_versions",
                self.name, def.fingerprint
            )),
            _ => Ok(def),
        }
    }

    /// This definition and the earlier versions it keeps loaded, newest first.
    pub fn versions(&self) -> impl Iterator<Item = &SagaDefinition> {
        std::iter::once(self).chain(&self.previous)
    }

    /// The event types a topic carries (consumed or written) in any loaded version, in the
    /// topology's order.
    pub fn types_on(&self, topic: &str) -> Vec<String> {
        let mut types = self.types_of_version(topic);
        for earlier in &self.previous {
            for t in earlier.types_of_version(topic) {
                if !types.contains(&t) {
                    types.push(t);
                }
            }
        }
        types
    }

    /// The event types a topic carries in this version alone.
    fn types_of_version(&self, topic: &str) -> Vec<String> {
        let mut types: Vec<String> = Vec::new();
        let mut add = |t: &str| {
            if !types.iter().any(|x| x == t) {
                types.push(t.to_string());
            }
        };
        if self.start_topic == topic {
            add(&self.start_event);
        }
        for step in &self.steps {
            if step.reply_topic == topic {
                add(&step.success);
                add(&step.failure);
                add(&step.confirmed_by);
            }
            if step.command.topic == topic {
                add(&step.command.event_type);
            }
            if step.compensation.topic == topic {
                add(&step.compensation.event_type);
            }
        }
        for outcome in [&self.completed, &self.cancelled] {
            if outcome.topic == topic {
                add(&outcome.event_type);
            }
        }
        types
    }

    /// The format of a topic (JSON when no loaded version names it).
    pub fn format_of(&self, topic: &str) -> Format {
        self.versions()
            .find_map(|d| d.topics.get(topic).copied())
            .unwrap_or(Format::Json)
    }

    /// Every signed topic's mode, over all loaded versions (the current version's first).
    pub fn signature_modes(&self) -> BTreeMap<String, SignatureMode> {
        let mut modes = BTreeMap::new();
        for d in self.versions() {
            for (topic, mode) in &d.signatures {
                modes.entry(topic.clone()).or_insert(*mode);
            }
        }
        modes
    }

    /// Every topic's format, over all loaded versions.
    pub fn all_formats(&self) -> BTreeMap<String, Format> {
        let mut formats = BTreeMap::new();
        for d in self.versions() {
            for (topic, format) in &d.topics {
                formats.entry(topic.clone()).or_insert(*format);
            }
        }
        formats
    }

    /// Every topic of every loaded version as the codec sees it: its format and event types.
    pub fn topic_set(&self) -> crate::codec::TopicSet {
        let mut names: BTreeSet<String> = self.all_formats().into_keys().collect();
        names.extend(self.input_topics());
        names.extend(self.output_topics());
        crate::codec::TopicSet {
            topics: self.all_formats(),
            types: names
                .into_iter()
                .map(|t| {
                    let types = self.types_on(&t);
                    (t, types)
                })
                .collect(),
            schemas_dir: self.schemas_dir.clone(),
        }
    }

    /// True when any topic is Avro.
    pub fn uses_avro(&self) -> bool {
        self.all_formats()
            .values()
            .any(|f| matches!(f, Format::Avro(_)))
    }

    /// Overrides a topic's format (`topic` as named in the topology, before any prefix).
    pub fn set_topic_format(&mut self, topic: &str, format: Format) -> Result<(), String> {
        for earlier in &mut self.previous {
            if let Some(f) = earlier.topics.get_mut(topic) {
                *f = format;
            }
        }
        match self.topics.get_mut(topic) {
            Some(f) => {
                *f = format;
                Ok(())
            }
            None => Err(format!(
                "no topic named '{topic}' (topics: {})",
                self.topics.keys().cloned().collect::<Vec<_>>().join(", ")
            )),
        }
    }

    /// Parses and validates topology text; `file` names it in problems.
    pub fn parse(file: &str, text: &str) -> Result<Self, TopologyError> {
        let raw: RawTopology = marked_yaml::from_yaml(0, text).map_err(|e| {
            let problem = match &e {
                marked_yaml::FromYamlError::FromNode(inner) => {
                    let line = inner.start_mark().map(|m| m.line()).or_else(|| {
                        // Unknown keys come without a position: find the key in the text.
                        match &**inner {
                            marked_yaml::Error::UnknownFieldError(key, _, _) => text
                                .lines()
                                .position(|l| {
                                    let l = l.trim_start().trim_start_matches(['-', '{', ' ']);
                                    l.starts_with(&format!("{key}:"))
                                })
                                .map(|i| i + 1),
                            _ => None,
                        }
                    });
                    match line {
                        Some(line) => format!("{file}:{line}: {inner}"),
                        None => format!("{file}: {inner}"),
                    }
                }
                marked_yaml::FromYamlError::ParseYaml(inner) => format!("{file}: {inner}"),
            };
            TopologyError {
                problems: vec![problem],
            }
        })?;
        Validator {
            file,
            problems: Vec::new(),
        }
        .validate(raw)
    }

    /// Topics the saga consumes: the start topic and every step's reply topic, in every loaded
    /// version (sagas of an earlier one still wait for its replies), without repeats.
    pub fn input_topics(&self) -> Vec<String> {
        let mut topics = vec![self.start_topic.clone()];
        for step in self.versions().flat_map(|d| &d.steps) {
            if !topics.contains(&step.reply_topic) {
                topics.push(step.reply_topic.clone());
            }
        }
        topics
    }

    /// Topics the saga writes in any loaded version: commands, compensations, outcomes and each
    /// input's DLQ.
    pub fn output_topics(&self) -> Vec<String> {
        let mut topics: Vec<String> = Vec::new();
        let mut add = |t: &str| {
            if !topics.iter().any(|x| x == t) {
                topics.push(t.to_string());
            }
        };
        for d in self.versions() {
            for step in &d.steps {
                add(&step.command.topic);
                add(&step.compensation.topic);
            }
            add(&d.completed.topic);
            add(&d.cancelled.topic);
        }
        for input in self.input_topics() {
            add(&dlq_topic(&input));
        }
        topics
    }

    /// The context fields some compensation reads: what a tombstone keeps so that a late
    /// success can still be compensated.
    pub fn compensation_fields(&self) -> BTreeSet<&str> {
        self.steps
            .iter()
            .flat_map(|s| s.compensation.fields.iter().map(|(_, from)| from.as_str()))
            .collect()
    }

    /// What `event_type` means when it arrives on `topic`; `None` when it has no business there.
    pub fn role_of(&self, topic: &str, event_type: &str) -> Option<EventRole> {
        if topic == self.start_topic && event_type == self.start_event {
            return Some(EventRole::Start);
        }
        self.steps.iter().enumerate().find_map(|(i, s)| {
            if s.reply_topic != topic {
                return None;
            }
            if s.success == event_type {
                Some(EventRole::Success(i))
            } else if s.failure == event_type {
                Some(EventRole::Failure(i))
            } else if s.confirmed_by == event_type {
                Some(EventRole::Compensated(i))
            } else {
                None
            }
        })
    }

    /// Renames every topic to `<prefix><topic>` (an environment or test namespace).
    pub fn with_topic_prefix(mut self, prefix: &str) -> Self {
        if prefix.is_empty() {
            return self;
        }
        self.previous = std::mem::take(&mut self.previous)
            .into_iter()
            .map(|d| d.with_topic_prefix(prefix))
            .collect();
        let p = |t: &mut String| *t = format!("{prefix}{t}");
        self.topics = std::mem::take(&mut self.topics)
            .into_iter()
            .map(|(t, f)| (format!("{prefix}{t}"), f))
            .collect();
        self.signatures = std::mem::take(&mut self.signatures)
            .into_iter()
            .map(|(t, m)| (format!("{prefix}{t}"), m))
            .collect();
        p(&mut self.start_topic);
        for step in &mut self.steps {
            p(&mut step.command.topic);
            p(&mut step.compensation.topic);
            p(&mut step.reply_topic);
        }
        p(&mut self.completed.topic);
        p(&mut self.cancelled.topic);
        self
    }

    /// Overrides the timeout of the named step.
    pub fn set_step_timeout(&mut self, step: &str, timeout: Duration) -> Result<(), String> {
        if timeout.is_zero() {
            return Err(format!("step '{step}': the timeout must be greater than 0"));
        }
        for earlier in &mut self.previous {
            if let Some(s) = earlier.steps.iter_mut().find(|s| s.name == step) {
                s.timeout = timeout;
            }
        }
        match self.steps.iter_mut().find(|s| s.name == step) {
            Some(s) => {
                s.timeout = timeout;
                Ok(())
            }
            None => Err(format!(
                "no step named '{step}' (steps: {})",
                self.steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )),
        }
    }
}

/// The dead-letter topic of an input topic.
pub fn dlq_topic(input: &str) -> String {
    format!("{input}.dlq")
}

struct Validator<'a> {
    file: &'a str,
    problems: Vec<String>,
}

fn line<T>(s: &Spanned<T>) -> usize {
    s.span().start().map(|m| m.line()).unwrap_or(0)
}

impl Validator<'_> {
    fn problem<T>(&mut self, at: &Spanned<T>, message: impl std::fmt::Display) {
        self.problems
            .push(format!("{}:{}: {message}", self.file, line(at)));
    }

    fn retry(&mut self, raw: Option<&RawRetry>, default: RetryPolicy, what: &str) -> RetryPolicy {
        let Some(raw) = raw else {
            return default;
        };
        let attempts = match u32::try_from(*raw.attempts) {
            Ok(0) | Err(_) => {
                self.problem(
                    &raw.attempts,
                    format!("{what}: attempts must be between 1 and {}", u32::MAX),
                );
                1
            }
            Ok(n) => n,
        };
        let backoff = raw
            .backoff
            .as_ref()
            .map(|b| self.duration(b, &format!("{what}: backoff")))
            .unwrap_or(default.backoff);
        let max_backoff = raw
            .max_backoff
            .as_ref()
            .map(|b| self.duration(b, &format!("{what}: max_backoff")))
            .unwrap_or(default.max_backoff.max(backoff));
        if max_backoff < backoff {
            if let Some(at) = &raw.max_backoff {
                self.problem(at, format!("{what}: max_backoff is shorter than backoff"));
            }
        }
        RetryPolicy {
            attempts,
            backoff,
            max_backoff,
        }
    }

    fn duration(&mut self, at: &Spanned<String>, what: &str) -> Duration {
        match humantime::parse_duration(at.trim()) {
            Ok(d) if !d.is_zero() => d,
            Ok(_) => {
                self.problem(at, format!("{what} must be greater than 0"));
                Duration::from_secs(1)
            }
            Err(e) => {
                self.problem(
                    at,
                    format!("{what} '{}' is not a duration like 30s or 5m: {e}", **at),
                );
                Duration::from_secs(1)
            }
        }
    }

    fn topic(&mut self, topics: &BTreeMap<String, RawTopic>, at: &Spanned<String>) -> String {
        if !topics.contains_key(at.as_str()) {
            self.problem(
                at,
                format!("unknown topic '{}' (declare it under `topics:`)", **at),
            );
        }
        at.to_string()
    }

    fn event<'e>(
        &mut self,
        events: &'e BTreeMap<String, Vec<FieldSpec>>,
        at: &Spanned<String>,
    ) -> Option<&'e Vec<FieldSpec>> {
        let found = events.get(at.as_str());
        if found.is_none() {
            self.problem(
                at,
                format!(
                    "unknown event type '{}' (declare its fields under `events:`)",
                    **at
                ),
            );
        }
        found
    }

    /// Checks that every field of a message is taken from a context field known at that point.
    fn message(
        &mut self,
        topics: &BTreeMap<String, RawTopic>,
        raw: &RawCommand,
        context: &BTreeSet<String>,
        reserved: &[&str],
    ) -> MessageSpec {
        let topic = self.topic(topics, &raw.topic);
        let mut fields = Vec::new();
        for (name, source) in &raw.fields {
            if reserved.contains(&name.as_str()) || ENVELOPE.contains(&name.as_str()) {
                self.problem(
                    source,
                    format!(
                        "field '{name}' of {} is set by saga-streams itself",
                        *raw.event_type
                    ),
                );
            }
            if !context.contains(source.as_str()) {
                self.problem(
                    source,
                    format!(
                        "field '{name}' of {} takes '{}', which no earlier event provides (known: {})",
                        *raw.event_type,
                        **source,
                        context.iter().cloned().collect::<Vec<_>>().join(", ")
                    ),
                );
            }
            fields.push((name.clone(), source.to_string()));
        }
        MessageSpec {
            topic,
            event_type: raw.event_type.to_string(),
            fields,
        }
    }

    fn validate(mut self, raw: RawTopology) -> Result<SagaDefinition, TopologyError> {
        let file = self.file;
        let name = raw.name.to_string();
        if name.trim().is_empty() {
            self.problem(&raw.name, "the saga needs a name");
        }
        let key_field = raw
            .key
            .as_ref()
            .map(|k| k.to_string())
            .unwrap_or_else(|| "order_id".into());
        let retention = match &raw.retention {
            Some(r) => self.duration(r, "retention"),
            None => Duration::from_secs(7 * 24 * 3600),
        };
        let dedupe_retention = match &raw.dedupe_retention {
            Some(r) => {
                let d = self.duration(r, "dedupe_retention");
                if d < retention {
                    self.problem(
                        r,
                        "dedupe_retention is shorter than retention: the tombstone would go before the saga",
                    );
                }
                d
            }
            None => retention.max(Duration::from_secs(30 * 24 * 3600)),
        };
        let keys = match raw.keys.as_ref().map(|k| (k, k.as_str())) {
            None | Some((_, "rekey")) => KeyPolicy::Rekey,
            Some((_, "strict")) => KeyPolicy::Strict,
            Some((at, other)) => {
                self.problem(at, format!("keys: '{other}' is neither rekey nor strict"));
                KeyPolicy::Rekey
            }
        };
        let max_input_bytes = match &raw.max_input_bytes {
            Some(n) if **n == 0 => {
                self.problem(n, "max_input_bytes must be more than 0");
                DEFAULT_MAX_INPUT_BYTES
            }
            Some(n) => usize::try_from(**n).unwrap_or(usize::MAX),
            None => DEFAULT_MAX_INPUT_BYTES,
        };
        let compensated_state = raw
            .compensated_state
            .as_ref()
            .map(|s| s.to_string())
            .unwrap_or_else(|| "REFUNDED".into());

        let mut topics = BTreeMap::new();
        let mut signatures = BTreeMap::new();
        for (topic, spec) in &raw.topics {
            if let Some(mode) = &spec.signatures {
                match SignatureMode::parse(mode.as_str()) {
                    Ok(SignatureMode::Off) => {}
                    Ok(mode) => {
                        signatures.insert(topic.clone(), mode);
                    }
                    Err(e) => self.problem(mode, format!("topic '{topic}': {e}")),
                }
            }
            let mut format = match &spec.format {
                None => Format::Json,
                Some(f) => match Format::parse(f.as_str()) {
                    Ok(format) => format,
                    Err(e) => {
                        self.problem(f, format!("topic '{topic}': {e}"));
                        Format::Json
                    }
                },
            };
            if let Some(s) = &spec.subject {
                match (&mut format, SubjectStrategy::parse(s.as_str())) {
                    (Format::Avro(strategy), Ok(parsed)) => *strategy = parsed,
                    (_, Err(e)) => self.problem(s, format!("topic '{topic}': {e}")),
                    (Format::Json, Ok(_)) => self.problem(
                        s,
                        format!("topic '{topic}': `subject` applies to avro topics only"),
                    ),
                }
            }
            topics.insert(topic.clone(), format);
        }

        let mut events = BTreeMap::new();
        for (event, fields) in &raw.events {
            let mut specs = Vec::new();
            for (field, kind) in fields {
                let (kind_name, optional) = match kind.strip_suffix('?') {
                    Some(k) => (k, true),
                    None => (kind.as_str(), false),
                };
                if ENVELOPE.contains(&field.as_str()) || *field == key_field {
                    self.problem(
                        kind,
                        format!("event {event}: '{field}' is an envelope field, always present"),
                    );
                }
                let kinds: Option<Vec<FieldKind>> = kind_name
                    .split('|')
                    .map(|k| FieldKind::parse(k.trim()))
                    .collect();
                match kinds {
                    Some(kinds) if !kinds.is_empty() => specs.push(FieldSpec {
                        name: field.clone(),
                        kinds,
                        optional,
                    }),
                    _ => self.problem(
                        kind,
                        format!(
                            "event {event}: field '{field}' has unknown type '{}' (string, number, integer, boolean, list, object, id, decimal, or a union such as string|integer; `?` for optional)",
                            **kind
                        ),
                    ),
                }
            }
            events.insert(event.clone(), specs);
        }

        let start_topic = self.topic(&raw.topics, &raw.start.topic);
        let mut context: BTreeSet<String> = BTreeSet::new();
        if let Some(fields) = self.event(&events, &raw.start.event) {
            context.extend(fields.iter().map(|f| f.name.clone()));
        }
        context.insert(key_field.clone());

        if raw.steps.is_empty() {
            self.problems
                .push(format!("{file}: a saga needs at least one step"));
        }
        let reserved_states = [PENDING, COMPENSATING, COMPLETED, FAILED, COMPENSATION_STUCK];
        if reserved_states.contains(&compensated_state.as_str()) {
            if let Some(at) = &raw.compensated_state {
                self.problem(at, format!("'{compensated_state}' is a status of its own"));
            }
        }
        // Every event type the saga consumes, with where it was first named: each may play
        // one role only, or a reply could not be told apart.
        let mut replies_seen: BTreeMap<String, usize> = BTreeMap::new();
        replies_seen.insert(raw.start.event.to_string(), line(&raw.start.event));
        let mut outputs_seen: BTreeMap<String, usize> = BTreeMap::new();
        let mut names = BTreeSet::new();
        let mut states: BTreeSet<String> = BTreeSet::new();
        let mut steps = Vec::new();
        let mut output_topics = BTreeSet::new();

        for raw_step in &raw.steps {
            let step_name = raw_step.name.to_string();
            if !names.insert(step_name.clone()) {
                self.problem(
                    &raw_step.name,
                    format!("step name '{step_name}' is used twice"),
                );
            }
            let state = raw_step.state.to_string();
            if reserved_states.contains(&state.as_str()) || state == compensated_state {
                self.problem(
                    &raw_step.state,
                    format!("step '{step_name}': state '{state}' is a status of its own"),
                );
            } else if !states.insert(state.clone()) {
                self.problem(
                    &raw_step.state,
                    format!("state '{state}' is used by two steps: the second is unreachable"),
                );
            }
            let timeout = self.duration(&raw_step.timeout, &format!("step '{step_name}': timeout"));
            let retry = self.retry(
                raw_step.retry.as_ref(),
                RetryPolicy::ONCE,
                &format!("step '{step_name}': retry"),
            );
            let compensation_retry = self.retry(
                raw_step
                    .compensation
                    .as_ref()
                    .and_then(|c| c.retry.as_ref()),
                RetryPolicy::COMPENSATION_DEFAULT,
                &format!("step '{step_name}': compensation retry"),
            );
            let command = self.message(&raw.topics, &raw_step.command, &context, &[]);
            output_topics.insert(command.topic.clone());
            let reply_topic = self.topic(&raw.topics, &raw_step.replies.topic);
            for reply in [&raw_step.replies.success, &raw_step.replies.failure] {
                self.event(&events, reply);
            }
            let mut success_fields = Vec::new();
            if let Some(fields) = events.get(raw_step.replies.success.as_str()) {
                success_fields = fields.iter().map(|f| f.name.clone()).collect();
            }
            let mut with_success = context.clone();
            with_success.extend(success_fields.iter().cloned());

            let (compensation, confirmed_by) = match &raw_step.compensation {
                None => {
                    self.problem(
                        &raw_step.name,
                        format!(
                            "step '{step_name}' has no compensation: a later failure, or its own success after a timeout, could not be undone"
                        ),
                    );
                    (
                        MessageSpec {
                            topic: String::new(),
                            event_type: String::new(),
                            fields: Vec::new(),
                        },
                        String::new(),
                    )
                }
                Some(c) => {
                    let raw_message = RawCommand {
                        topic: c.topic.clone(),
                        event_type: c.event_type.clone(),
                        fields: c.fields.clone(),
                    };
                    let message = self.message(&raw.topics, &raw_message, &with_success, &[]);
                    output_topics.insert(message.topic.clone());
                    let confirmed = match &c.confirmed_by {
                        Some(confirmed) => {
                            self.event(&events, confirmed);
                            Some(confirmed.clone())
                        }
                        None => {
                            self.problem(
                                &c.event_type,
                                format!(
                                    "compensation {} of step '{step_name}' needs `confirmed_by`: the reply that says it was carried out",
                                    *c.event_type
                                ),
                            );
                            None
                        }
                    };
                    (
                        message,
                        confirmed.map(|c| c.to_string()).unwrap_or_default(),
                    )
                }
            };

            let mut consumed = vec![&raw_step.replies.success, &raw_step.replies.failure];
            if let Some(confirmed) = raw_step
                .compensation
                .as_ref()
                .and_then(|c| c.confirmed_by.as_ref())
            {
                consumed.push(confirmed);
            }
            for reply in consumed {
                if let Some(first) = replies_seen.get(reply.as_str()) {
                    self.problem(
                        reply,
                        format!(
                            "reply type '{}' is used twice (first at line {first}): the saga could not tell which step it answers",
                            **reply
                        ),
                    );
                } else {
                    replies_seen.insert(reply.to_string(), line(reply));
                }
            }
            for out in [&raw_step.command.event_type]
                .into_iter()
                .chain(raw_step.compensation.as_ref().map(|c| &c.event_type))
            {
                if let Some(first) = outputs_seen.get(out.as_str()) {
                    self.problem(
                        out,
                        format!(
                            "command type '{}' is used twice (first at line {first})",
                            **out
                        ),
                    );
                } else {
                    outputs_seen.insert(out.to_string(), line(out));
                }
            }

            context = with_success;
            steps.push(StepSpec {
                name: step_name,
                state,
                command,
                reply_topic,
                success: raw_step.replies.success.to_string(),
                failure: raw_step.replies.failure.to_string(),
                compensation,
                confirmed_by,
                timeout,
                retry,
                compensation_retry,
            });
        }

        let completed = self.message(&raw.topics, &raw.outcomes.completed, &context, &["reason"]);
        let cancelled = self.message(&raw.topics, &raw.outcomes.cancelled, &context, &["reason"]);
        output_topics.insert(completed.topic.clone());
        output_topics.insert(cancelled.topic.clone());

        let mut input_topics = BTreeSet::from([start_topic.clone()]);
        input_topics.extend(steps.iter().map(|s| s.reply_topic.clone()));
        for topic in input_topics.intersection(&output_topics) {
            self.problems.push(format!(
                "{file}: topic '{topic}' is both read and written by the saga: it would consume its own outputs"
            ));
        }
        for topic in raw.topics.keys() {
            if !input_topics.contains(topic) && !output_topics.contains(topic) {
                self.problems.push(format!(
                    "{file}: topic '{topic}' is declared but never used"
                ));
            }
        }
        for (event, fields) in &raw.events {
            if !replies_seen.contains_key(event) && !outputs_seen.contains_key(event) {
                let at = fields.values().next().map(line).unwrap_or(0);
                self.problems.push(format!(
                    "{file}:{at}: event {event} is declared but no step consumes it"
                ));
            }
        }

        let version = match &raw.version {
            Some(v) => match u32::try_from(**v) {
                Ok(0) | Err(_) => {
                    self.problem(v, format!("version must be between 1 and {}", u32::MAX));
                    1
                }
                Ok(n) => n,
            },
            None => 1,
        };
        let previous_files = raw
            .previous_versions
            .iter()
            .map(|f| (line(f), f.to_string()))
            .collect();

        if !self.problems.is_empty() {
            return Err(TopologyError {
                problems: self.problems,
            });
        }
        let start_event = raw.start.event.to_string();
        Ok(SagaDefinition {
            fingerprint: fingerprint(&start_event, &steps),
            version,
            previous: Vec::new(),
            previous_files,
            name,
            key_field,
            retention,
            dedupe_retention,
            compensated_state,
            wrap_outputs: raw.wrap_outputs.map(|w| *w).unwrap_or(true),
            keys,
            max_input_bytes,
            schemas_dir: raw.schemas.map(|s| std::path::PathBuf::from(s.as_str())),
            topics,
            signatures,
            start_event,
            start_topic,
            events,
            steps,
            completed,
            cancelled,
        })
    }
}

/// The [`SagaDefinition::fingerprint`] of a start event and steps: a UUID (v5, so stable across
/// builds) of what they are called, cut to 16 hex digits.
fn fingerprint(start_event: &str, steps: &[StepSpec]) -> String {
    let mut text = format!("start={start_event}");
    for s in steps {
        text.push_str(&format!(
            ";{}|{}|{}|{}|{}|{}|{}",
            s.name,
            s.state,
            s.command.event_type,
            s.success,
            s.failure,
            s.compensation.event_type,
            s.confirmed_by
        ));
    }
    let id = uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, text.as_bytes());
    id.simple().to_string()[..16].to_string()
}

/// Fields every message carries; the saga writes them itself.
pub const ENVELOPE: &[&str] = &[
    "event_id",
    "event_type",
    "event_version",
    "correlation_id",
    "occurred_at",
];

#[cfg(test)]
mod tests {
    use super::*;

    fn order_saga() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_saga.yaml"
        ))
        .unwrap()
    }

    #[test]
    fn the_shipped_topologies_load() {
        let def = SagaDefinition::parse("order_saga.yaml", &order_saga()).unwrap();
        assert_eq!(def.steps.len(), 2);
        assert_eq!(def.steps[0].command.event_type, "ProcessPayment");
        assert_eq!(
            def.input_topics(),
            vec!["orders.created", "payments.events", "inventory.events"]
        );
        assert_eq!(
            def.role_of("payments.events", "PaymentRefunded"),
            Some(EventRole::Compensated(0))
        );
        assert_eq!(def.role_of("inventory.events", "PaymentRefunded"), None);
        let shipping = SagaDefinition::load(Path::new(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_with_shipping.yaml"
        )))
        .unwrap();
        assert_eq!(shipping.steps.len(), 3);
    }

    #[test]
    fn every_semantic_problem_is_reported_at_once_with_its_line() {
        let text = order_saga()
            .replace(
                "topic: inventory.commands, type: ReserveInventory",
                "topic: inventory.cmds, type: ReserveInventory",
            )
            .replace(
                "failure: InventoryReservationFailed",
                "failure: PaymentFailed",
            )
            .replace(
                "timeout: 30s\n    compensation",
                "timeout: soon\n    compensation",
            );
        let err = SagaDefinition::parse("t.yaml", &text).unwrap_err();
        let all = err.problems.join("\n");
        assert!(all.contains("unknown topic 'inventory.cmds'"), "{all}");
        assert!(
            all.contains("reply type 'PaymentFailed' is used twice"),
            "{all}"
        );
        for p in &err.problems {
            let line: usize = p.split(':').nth(1).unwrap().parse().unwrap_or(0);
            assert!(line > 0 || p.contains("declared but"), "no line in: {p}");
        }
        let line_of = |needle: &str| text.lines().position(|l| l.contains(needle)).unwrap() + 1;
        assert!(
            all.contains(&format!(
                "t.yaml:{}: unknown topic",
                line_of("inventory.cmds")
            )),
            "{all}"
        );
    }

    #[test]
    fn a_step_without_compensation_and_a_structural_error_are_refused() {
        let text = order_saga();
        let mut lines: Vec<&str> = text.lines().collect::<Vec<_>>();
        let cut = text.find("    compensation:").unwrap();
        let end = cut + text[cut..].find("confirmed_by").unwrap();
        let end = end + text[end..].find('\n').unwrap() + 1;
        let without = format!("{}{}", &text[..cut], &text[end..]);
        let err = SagaDefinition::parse("t.yaml", &without).unwrap_err();
        assert!(
            err.problems
                .iter()
                .any(|p| p.contains("has no compensation")),
            "{err}"
        );

        lines.insert(1, "bogus_key: 1");
        let err = SagaDefinition::parse("t.yaml", &lines.join("\n")).unwrap_err();
        assert!(err.problems[0].starts_with("t.yaml:2:"), "{err}");
    }

    #[test]
    fn ids_decimals_and_unions_accept_what_php_services_write() {
        use serde_json::json;
        let id = FieldSpec {
            name: "user_id".into(),
            kinds: vec![FieldKind::Id],
            optional: false,
        };
        for ok in [json!(42), json!("u-42"), json!(7u64)] {
            assert!(id.accepts(&ok), "{ok}");
        }
        for bad in [json!(""), json!(1.5), json!(null), json!([1])] {
            assert!(!id.accepts(&bad), "{bad}");
        }
        let amount = FieldSpec {
            name: "total".into(),
            kinds: vec![FieldKind::Decimal],
            optional: false,
        };
        for ok in [
            json!("500.00"),
            json!("-12.5"),
            json!("7"),
            json!(500),
            json!(12.25),
        ] {
            assert!(amount.accepts(&ok), "{ok}");
        }
        for bad in [
            json!("1e5"),
            json!("NaN"),
            json!(" 5"),
            json!("5."),
            json!(".5"),
            json!("1.2.3"),
            json!(""),
            json!(true),
        ] {
            assert!(!amount.accepts(&bad), "{bad}");
        }
        let text = order_saga().replace("user_id: id,", "user_id: string|integer,");
        let def = SagaDefinition::parse("t.yaml", &text).unwrap();
        let spec = def.events["OrderCreated"]
            .iter()
            .find(|f| f.name == "user_id")
            .unwrap();
        assert_eq!(spec.type_name(), "string|integer");
        assert!(spec.accepts(&json!(3)) && spec.accepts(&json!("x")) && !spec.accepts(&json!(1.5)));
        let bad = order_saga().replace("user_id: id,", "user_id: string|money,");
        let err = SagaDefinition::parse("t.yaml", &bad)
            .unwrap_err()
            .to_string();
        assert!(err.contains("unknown type 'string|money'"), "{err}");
    }

    #[test]
    fn prefix_and_timeout_overrides() {
        let mut def = SagaDefinition::parse("t", &order_saga())
            .unwrap()
            .with_topic_prefix("x.");
        assert!(def.input_topics().iter().all(|t| t.starts_with("x.")));
        assert!(def
            .output_topics()
            .contains(&"x.orders.created.dlq".to_string()));
        def.set_step_timeout("payment", Duration::from_secs(5))
            .unwrap();
        assert_eq!(def.steps[0].timeout, Duration::from_secs(5));
        assert!(def
            .set_step_timeout("shipping", Duration::from_secs(5))
            .is_err());
    }

    #[test]
    fn the_input_size_limit_defaults_to_a_mebibyte_and_must_be_positive() {
        let def = SagaDefinition::parse("t", &order_saga()).unwrap();
        assert_eq!(def.max_input_bytes, DEFAULT_MAX_INPUT_BYTES);
        let text = order_saga().replacen("name:", "max_input_bytes: 4096\nname:", 1);
        assert_eq!(
            SagaDefinition::parse("t", &text).unwrap().max_input_bytes,
            4096
        );
        let text = order_saga().replacen("name:", "max_input_bytes: 0\nname:", 1);
        let err = SagaDefinition::parse("t", &text).unwrap_err();
        assert!(err.to_string().contains("max_input_bytes"), "{err}");
    }

    fn with_shipping() -> String {
        std::fs::read_to_string(concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/topologies/order_with_shipping.yaml"
        ))
        .unwrap()
    }

    /// Version 2 of the shipping saga: the order saga's two steps, under the shipping saga's
    /// name, with `header` added at the top.
    fn without_shipping(header: &str) -> String {
        let text = order_saga()
            .replacen("name: order_saga", "name: order_with_shipping", 1)
            .replacen("schemas: ../schemas", "", 1);
        format!("{header}\n{text}")
    }

    fn write(dir: &Path, name: &str, text: &str) -> std::path::PathBuf {
        let path = dir.join(name);
        std::fs::write(&path, text).unwrap();
        path
    }

    #[test]
    fn earlier_versions_stay_loaded_for_the_sagas_that_started_under_them() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "v1.yaml", &with_shipping());
        let path = write(
            dir.path(),
            "v2.yaml",
            &without_shipping("version: 2\nprevious_versions: [v1.yaml]"),
        );
        let def = SagaDefinition::load(&path).unwrap();
        assert_eq!(def.version, 2);
        assert_eq!(def.steps.len(), 2);
        let v1 = &def.previous[0];
        assert_eq!((v1.version, v1.steps.len()), (1, 3));
        assert_ne!(v1.fingerprint, def.fingerprint);
        // Sagas of version 1 still wait for shipping replies and write shipping commands.
        assert!(def.input_topics().contains(&"shipping.events".to_string()));
        assert!(def
            .output_topics()
            .contains(&"shipping.commands".to_string()));
        assert_eq!(
            def.for_saga(1, Some(&v1.fingerprint)).unwrap().steps.len(),
            3
        );
        assert_eq!(def.for_saga(2, None).unwrap().steps.len(), 2);
        // A version not loaded, or a version 1 with other steps than the loaded one.
        assert!(def.for_saga(3, None).unwrap_err().contains("not loaded"));
        let err = def.for_saga(1, Some(&def.fingerprint)).unwrap_err();
        assert!(err.contains("other steps"), "{err}");
        // Prefixes and step timeouts reach every version.
        let mut def = def.with_topic_prefix("x.");
        def.set_step_timeout("payment", Duration::from_secs(3))
            .unwrap();
        assert_eq!(def.previous[0].start_topic, "x.orders.created");
        assert_eq!(def.previous[0].steps[0].timeout, Duration::from_secs(3));
    }

    #[test]
    fn the_fingerprint_changes_with_the_steps_not_with_timeouts_or_fields() {
        let base = SagaDefinition::parse("t", &order_saga()).unwrap();
        let slower =
            SagaDefinition::parse("t", &order_saga().replace("timeout: 30s", "timeout: 90s"))
                .unwrap();
        assert_eq!(base.fingerprint, slower.fingerprint);
        let renamed =
            SagaDefinition::parse("t", &order_saga().replace("name: inventory", "name: stock"))
                .unwrap();
        assert_ne!(base.fingerprint, renamed.fingerprint);
        let shipping = SagaDefinition::parse("t", &with_shipping()).unwrap();
        assert_ne!(base.fingerprint, shipping.fingerprint);
    }

    #[test]
    fn earlier_versions_that_cannot_run_beside_this_one_are_refused() {
        let dir = tempfile::tempdir().unwrap();
        write(dir.path(), "v1.yaml", &with_shipping());
        write(dir.path(), "other.yaml", &order_saga());
        for (header, expected) in [
            ("previous_versions: [v1.yaml]", "not older than"),
            (
                "version: 2\nprevious_versions: [missing.yaml]",
                "cannot be loaded",
            ),
            (
                "version: 2\nprevious_versions: [other.yaml]",
                "is saga 'order_saga'",
            ),
            ("version: 0", "version must be"),
            ("version: 2\nprevious_versions: [v2.yaml]", "of its own"),
        ] {
            let path = write(dir.path(), "v2.yaml", &without_shipping(header));
            let err = SagaDefinition::load(&path).unwrap_err().to_string();
            assert!(err.contains(expected), "{header}: {err}");
        }
        // A topic read in two ways by two versions.
        let path = write(
            dir.path(),
            "v2.yaml",
            &without_shipping("version: 2\nprevious_versions: [v1.yaml]").replace(
                "payments.events: { format: json }",
                "payments.events: { format: avro }",
            ),
        );
        let err = SagaDefinition::load(&path).unwrap_err().to_string();
        assert!(
            err.contains("every version must read a topic the same way"),
            "{err}"
        );
    }

    mod schemas {
        use super::*;
        use crate::codec::schemas::{subjects, Catalogue};
        use apache_avro::Schema;
        use std::path::PathBuf;

        fn repo(path: &str) -> PathBuf {
            Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
        }

        fn avro_def(strategy: SubjectStrategy) -> crate::codec::TopicSet {
            let mut def = SagaDefinition::load(&repo("topologies/order_saga.yaml")).unwrap();
            for topic in def.topics.clone().keys() {
                def.set_topic_format(topic, Format::Avro(strategy)).unwrap();
            }
            def.topic_set()
        }

        #[test]
        fn every_event_and_command_of_the_order_saga_has_a_schema() {
            let catalogue = Catalogue::load(&repo("schemas")).unwrap();
            let def = avro_def(SubjectStrategy::TopicName);
            let subjects = subjects(&def, &catalogue).unwrap();
            let names: Vec<&str> = subjects.iter().map(|s| s.name.as_str()).collect();
            assert_eq!(
                names,
                [
                    "inventory.commands-value",
                    "inventory.events-value",
                    "orders.cancelled-value",
                    "orders.completed-value",
                    "orders.created-value",
                    "payments.commands-value",
                    "payments.events-value",
                ]
            );
            let payments = &subjects[6];
            assert_eq!(
                payments.types,
                ["PaymentSucceeded", "PaymentFailed", "PaymentRefunded"]
            );
            assert!(matches!(payments.schema, Schema::Union(_)));
            // OrderItem is defined by both inventory commands: once in the union, then referenced.
            let inventory = &subjects[0];
            assert_eq!(inventory.text.matches("\"OrderItem\"").count(), 1);
            assert_eq!(catalogue.latest("OrderCreated").unwrap().version, 2);
            assert_eq!(catalogue.versions("PaymentSucceeded").len(), 2);
        }

        #[test]
        fn record_name_subjects_are_the_full_names() {
            let catalogue = Catalogue::load(&repo("schemas")).unwrap();
            let def = avro_def(SubjectStrategy::RecordName);
            let subjects = subjects(&def, &catalogue).unwrap();
            assert_eq!(subjects.len(), 15 - 2);
            assert!(subjects
                .iter()
                .any(|s| s.name == "io.sagastreams.payment.PaymentSucceeded"
                    && matches!(s.schema, Schema::Record(_))));
        }
    }
}
