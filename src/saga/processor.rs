//! The saga processor: the state machine on the streams runtime.
//!
//! Per task it keeps one store, `sagas`, holding two kinds of keys:
//! - `s/<saga id>`: the [`SagaRecord`] ([`super::record`]: binary, versioned);
//! - `t/<deadline ms, 8 bytes big-endian><saga id>`: an index of each saga's next timer, so a
//!   punctuation finds the due ones with one range scan, even when no input arrives.
//!
//! Decoding, dedupe, the state change, the timer index, the outputs and any dead letter all belong
//! to the record's commit cycle: they become visible together or not at all.

use std::sync::Arc;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::codec::signing::{SignatureProblem, Signing, SIGNATURE_HEADER};
use crate::codec::{Codec, DecodeError};
use crate::runtime::secrets::AUDIT_TARGET;
use crate::runtime::{
    InputRecord, OutputRecord, Processor, ProcessorContext, ProcessorError, Store,
};
use crate::saga::actions::ActionRequest;
use crate::saga::contract::{
    self, BadInput, BadInputKind, DecodedEvent, CORRELATION_HEADER, TRACEPARENT_HEADER,
};
use crate::saga::machine::{
    self, Applied, OutputKind, SagaEvent, SagaInput, SagaOutput, SagaRecord,
};
use crate::saga::topology::{dlq_topic, EventRole, SagaDefinition};
use crate::telemetry::metrics as m;
use crate::telemetry::SAGA_SPAN_TARGET;
use std::collections::{BTreeMap, BTreeSet};

/// The store of saga records and timers.
pub const SAGA_STORE: &str = "sagas";
const SAGA_PREFIX: &[u8] = b"s/";
/// Keys of the timer index: `t/<deadline ms, 8 bytes big-endian><saga id>`.
pub const TIMER_PREFIX: &[u8] = b"t/";
/// Sagas put into the status index per punctuation while a store of an earlier build is
/// brought up to it.
const BACKFILL_BATCH: usize = 2_000;
/// The next saga key the status index backfill reads.
const BACKFILL_CURSOR: &[u8] = b"x/backfill";
/// Timers fired per punctuation at most, so one cycle stays bounded after a long outage.
const TIMERS_PER_PUNCTUATION: usize = 5_000;
/// Saga statuses counted in the store, at most (a topology has a few dozen at most).
const MAX_STATUSES: usize = 1_000;

/// Header names on dead letters.
pub mod dlq_headers {
    pub const TOPIC: &str = "dlq.source.topic";
    pub const PARTITION: &str = "dlq.source.partition";
    pub const OFFSET: &str = "dlq.source.offset";
    pub const KIND: &str = "dlq.error.kind";
    pub const MESSAGE: &str = "dlq.error.message";
    /// On a dead letter whose value was cut (a record over `max_input_bytes` keeps its first
    /// [`super::DLQ_VALUE_PREFIX`] bytes; any other letter what fits its size budget): the size
    /// of the original value.
    pub const ORIGINAL_SIZE: &str = "dlq.original.size";
    /// On a dead letter whose original headers alone were too large to keep: how many there
    /// were (none is kept).
    pub const HEADERS_DROPPED: &str = "dlq.original.headers.dropped";
}

/// Headers of a record re-keyed through the repartition topic: where it was first read.
pub mod rekey_headers {
    pub const TOPIC: &str = "saga.source.topic";
    pub const PARTITION: &str = "saga.source.partition";
    pub const OFFSET: &str = "saga.source.offset";
}

/// How much of a too-large value its dead letter keeps.
pub const DLQ_VALUE_PREFIX: usize = 64 << 10;
/// The most a dead letter (key, headers and value) may hold: below the producer's message size
/// limit (librdkafka's `message.max.bytes`, 1,000,000 by default), so that writing it can never
/// fail for its size. A value cut to fit has its full size in `dlq.original.size`.
const DLQ_RECORD_BUDGET: usize = 900_000;
/// The most an output record (key, headers and value) may hold, for the same reason: a larger
/// one would be refused by the producer or the broker and fail its cycle again after every
/// rewind. The input that causes it is dead-lettered instead (`record_too_large`).
pub const OUTPUT_RECORD_BUDGET: usize = 900_000;
/// The most a saga record may hold: its changelog record must stay writable (see
/// [`OUTPUT_RECORD_BUDGET`]). An input that would make it larger is dead-lettered.
pub const SAGA_RECORD_BUDGET: usize = 900_000;
/// When the outputs of a due timer cannot be written, the timer is tried again this much later.
const UNWRITABLE_TIMER_RETRY_MS: i64 = 60_000;

pub fn saga_key(saga_id: &str) -> Vec<u8> {
    [SAGA_PREFIX, saga_id.as_bytes()].concat()
}

fn timer_key(at_ms: i64, saga_id: &str) -> Vec<u8> {
    [
        TIMER_PREFIX,
        &(at_ms.max(0) as u64).to_be_bytes(),
        saga_id.as_bytes(),
    ]
    .concat()
}

/// Makes `span` a child of the trace context in the headers `header` reads (`traceparent`,
/// `tracestate`, through OpenTelemetry's W3C propagator); without one, it starts a trace.
fn continue_trace(span: &tracing::Span, header: &mut dyn FnMut(&str) -> Option<String>) {
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let carrier: std::collections::HashMap<String, String> = [TRACEPARENT_HEADER, "tracestate"]
        .into_iter()
        .filter_map(|name| header(name).map(|v| (name.to_string(), v)))
        .collect();
    if carrier.is_empty() {
        return;
    }
    let parent = opentelemetry::global::get_text_map_propagator(|p| p.extract(&carrier));
    let _ = span.set_parent(parent);
}

/// Whether `text` is a W3C `traceparent` of version 00: `00-<32 hex>-<16 hex>-<2 hex>`.
fn valid_traceparent(text: &str) -> bool {
    let parts: Vec<&str> = text.split('-').collect();
    let hex = |s: &str, n: usize| s.len() == n && s.bytes().all(|b| b.is_ascii_hexdigit());
    parts.len() == 4
        && parts[0] == "00"
        && hex(parts[1], 32)
        && hex(parts[2], 16)
        && hex(parts[3], 2)
        && parts[1] != "00000000000000000000000000000000"
        && parts[2] != "0000000000000000"
}

/// The headers (`traceparent`, `tracestate`) that carry the current span's context to what it
/// writes; none when no span is recorded (the subscriber is not installed).
fn trace_headers() -> Vec<(String, String)> {
    use opentelemetry::trace::TraceContextExt;
    use tracing_opentelemetry::OpenTelemetrySpanExt;
    let cx = tracing::Span::current().context();
    if !cx.span().span_context().is_valid() {
        return Vec::new();
    }
    let mut carrier = std::collections::HashMap::new();
    opentelemetry::global::get_text_map_propagator(|p| p.inject_context(&cx, &mut carrier));
    let mut headers: Vec<(String, String)> = carrier.into_iter().collect();
    headers.sort();
    headers
}

/// The deadline (ms) of a timer index key.
pub fn timer_deadline(key: &[u8]) -> Option<i64> {
    let bytes: [u8; 8] = key.strip_prefix(TIMER_PREFIX)?.get(..8)?.try_into().ok()?;
    Some(u64::from_be_bytes(bytes) as i64)
}

fn now_ms(now: SystemTime) -> i64 {
    now.duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0)
}

/// Sagas per status: `c/<status>` -> a JSON number.
pub const COUNT_PREFIX: &[u8] = b"c/";
/// The status index: `i/<status>\0<saga id>` for every saga in `s/`, so listing the sagas of
/// one status reads only those.
const INDEX_PREFIX: &[u8] = b"i/";
/// Present when every saga of the store is in the status index (a store started by a build that
/// keeps it; an older store is listed by a scan of its sagas instead).
pub const INDEXED_MARKER: &[u8] = b"x/indexed";

/// The first key of `status` in the status index.
pub fn status_index_prefix(status: &str) -> Vec<u8> {
    [INDEX_PREFIX, status.as_bytes(), b"\0"].concat()
}

fn status_index_key(status: &str, saga_id: &str) -> Vec<u8> {
    [status_index_prefix(status).as_slice(), saga_id.as_bytes()].concat()
}

/// The prefix of every saga record key (`s/<saga id>`).
pub fn saga_prefix() -> &'static [u8] {
    SAGA_PREFIX
}
const VERSION_COUNT_PREFIX: &[u8] = b"v/";
const QUARANTINE_PREFIX: &[u8] = b"q/";
/// The status under which quarantined records are counted.
pub const QUARANTINED: &str = "QUARANTINED";

/// The quarantined record's bytes, exactly as they were stored (so the entry is never larger
/// than the changelog record it came from).
pub fn quarantine_key(saga_id: &str) -> Vec<u8> {
    [QUARANTINE_PREFIX, saga_id.as_bytes()].concat()
}

/// Why and when a record was quarantined ([`QuarantineNote`]).
pub fn quarantine_note_key(saga_id: &str) -> Vec<u8> {
    [b"qe/".as_slice(), saga_id.as_bytes()].concat()
}

/// Numbers kept in the store beside the sagas (`<prefix><label value>`, so they survive restarts
/// and moves) and mirrored into a gauge that sums the tasks of the instance: sagas per status
/// (`c/`), and unfinished sagas per topology version (`v/`).
struct Counts {
    prefix: &'static [u8],
    gauge: &'static str,
    label: &'static str,
    local: BTreeMap<String, i64>,
    /// Set when a cycle aborted: the in-memory counts may include its changes.
    stale: bool,
}

impl Counts {
    fn new(prefix: &'static [u8], gauge: &'static str, label: &'static str) -> Self {
        Self {
            prefix,
            gauge,
            label,
            local: BTreeMap::new(),
            stale: false,
        }
    }

    fn key(&self, value: &str) -> Vec<u8> {
        [self.prefix, value.as_bytes()].concat()
    }

    /// Reads the committed counts and moves the gauge by the difference from what it had.
    fn load(&mut self, store: &Store<'_>) -> Result<(), ProcessorError> {
        let mut fresh: BTreeMap<String, i64> = BTreeMap::new();
        // One entry per status or version: a handful.
        for (key, value) in store.prefix(self.prefix, MAX_STATUSES)? {
            let name = String::from_utf8_lossy(&key[self.prefix.len()..]).into_owned();
            let n: i64 = serde_json::from_slice(&value)
                .map_err(|e| ProcessorError(format!("saga store: undecodable count: {e}")))?;
            fresh.insert(name, n);
        }
        let names: BTreeSet<String> = fresh.keys().chain(self.local.keys()).cloned().collect();
        for name in names {
            let delta = fresh.get(&name).copied().unwrap_or(0)
                - self.local.get(&name).copied().unwrap_or(0);
            if delta != 0 {
                metrics::gauge!(self.gauge, self.label => name).increment(delta as f64);
            }
        }
        self.local = fresh;
        self.stale = false;
        Ok(())
    }

    fn change(
        &mut self,
        store: &mut Store<'_>,
        name: &str,
        delta: i64,
    ) -> Result<(), ProcessorError> {
        let key = self.key(name);
        let n: i64 = store.get_json(&key)?.unwrap_or(0);
        store.put_json(&key, &(n + delta))?;
        *self.local.entry(name.to_string()).or_default() += delta;
        metrics::gauge!(self.gauge, self.label => name.to_string()).increment(delta as f64);
        Ok(())
    }

    /// The task leaves this instance: its numbers leave the gauge.
    fn release(&mut self) {
        for (name, n) in std::mem::take(&mut self.local) {
            metrics::gauge!(self.gauge, self.label => name).decrement(n as f64);
        }
    }
}

/// Sagas per status and unfinished sagas per topology version, and the status index.
struct StatusCounts {
    status: Counts,
    versions: Counts,
    /// The store holds no saga and no [`INDEXED_MARKER`] yet: the next write sets it.
    marker_due: bool,
    /// The store has the [`INDEXED_MARKER`].
    indexed: bool,
}

impl Default for StatusCounts {
    fn default() -> Self {
        Self {
            marker_due: false,
            indexed: false,
            status: Counts::new(COUNT_PREFIX, m::SAGAS, "status"),
            versions: Counts::new(
                VERSION_COUNT_PREFIX,
                m::LIVE_SAGAS_BY_VERSION,
                "topology_version",
            ),
        }
    }
}

impl StatusCounts {
    fn load(&mut self, store: &Store<'_>) -> Result<(), ProcessorError> {
        self.status.load(store)?;
        self.versions.load(store)?;
        // No saga record at all (counts are not trusted for this: a store may lack them).
        let empty = store.prefix(SAGA_PREFIX, 1)?.is_empty();
        self.indexed = store.get(INDEXED_MARKER)?.is_some();
        self.marker_due = empty && !self.indexed;
        Ok(())
    }

    /// Sagas written before the status index existed are not in it yet (a store from an earlier
    /// build): [`SagaProcessor::backfill_index`] adds them.
    fn unindexed(&self) -> bool {
        !self.indexed && !self.marker_due
    }

    fn stale(&self) -> bool {
        self.status.stale || self.versions.stale
    }

    fn mark_stale(&mut self) {
        self.status.stale = true;
        self.versions.stale = true;
    }

    fn change(
        &mut self,
        store: &mut Store<'_>,
        status: &str,
        delta: i64,
    ) -> Result<(), ProcessorError> {
        self.status.change(store, status, delta)
    }

    /// Writes a saga (`bytes`: its encoding, from [`encode_record`]), moves its timer entry and
    /// counts its status change. Records written before versions (no fingerprint) are not
    /// counted by version.
    fn save(
        &mut self,
        store: &mut Store<'_>,
        before: Option<&SagaRecord>,
        after: &SagaRecord,
        bytes: &[u8],
    ) -> Result<(), ProcessorError> {
        save(store, before, after, bytes)?;
        let old = before.map(|b| b.status.as_str());
        if old != Some(after.status.as_str()) {
            if let Some(old) = old {
                self.status.change(store, old, -1)?;
                store.delete(&status_index_key(old, &after.saga_id));
            }
            self.status.change(store, &after.status, 1)?;
            store.put(&status_index_key(&after.status, &after.saga_id), b"");
        }
        if self.marker_due {
            store.put(INDEXED_MARKER, b"1");
            self.marker_due = false;
            self.indexed = true;
        }
        if !after.topology_fingerprint.is_empty() {
            let was_live = before.is_some_and(|b| !b.is_finished());
            if was_live == after.is_finished() {
                let delta = if was_live { -1 } else { 1 };
                self.versions
                    .change(store, &after.topology_version.to_string(), delta)?;
            }
        }
        Ok(())
    }

    /// A record leaves the store (expired, or moved to the quarantine).
    fn removed(
        &mut self,
        store: &mut Store<'_>,
        saga_id: &str,
        record: &RecordSummary,
    ) -> Result<(), ProcessorError> {
        if let Some(status) = &record.status {
            self.status.change(store, status, -1)?;
            store.delete(&status_index_key(status, saga_id));
        }
        if let (Some(version), false) = (record.topology_version, record.finished) {
            self.versions.change(store, &version.to_string(), -1)?;
        }
        Ok(())
    }

    fn release(&mut self) {
        self.status.release();
        self.versions.release();
    }
}

/// What the counts need to know of a record that leaves the store; read leniently, so that it
/// works for records that do not decode as a whole.
#[derive(Default)]
struct RecordSummary {
    status: Option<String>,
    /// Only for records counted by version (with a fingerprint).
    topology_version: Option<u32>,
    finished: bool,
}

impl RecordSummary {
    fn of(record: &SagaRecord) -> Self {
        Self {
            status: Some(record.status.clone()),
            topology_version: (!record.topology_fingerprint.is_empty())
                .then_some(record.topology_version),
            finished: record.is_finished(),
        }
    }

    /// As much as can be read of stored bytes that do not decode as a record.
    fn of_bytes(bytes: &[u8]) -> Self {
        #[derive(serde::Deserialize)]
        struct Lenient {
            #[serde(default)]
            status: Option<String>,
            /// Left out of records when it is 1.
            #[serde(default = "first_record_topology_version")]
            topology_version: u32,
            #[serde(default)]
            topology_fingerprint: Option<String>,
            #[serde(default)]
            phase: Option<PhaseTag>,
        }
        #[derive(serde::Deserialize)]
        struct PhaseTag {
            phase: String,
        }
        fn first_record_topology_version() -> u32 {
            1
        }
        // Of any version, later ones included: their field names are kept.
        let Ok(read) = super::record::decode_fields::<Lenient>(bytes) else {
            return Self::default();
        };
        let counted = read.topology_fingerprint.is_some_and(|f| !f.is_empty());
        Self {
            status: read.status,
            topology_version: Some(read.topology_version).filter(|_| counted),
            finished: read.phase.is_some_and(|p| p.phase == "finished"),
        }
    }
}

/// A saga record that could not be read is moved aside: its bytes under `q/<saga id>`, this note
/// under `qe/<saga id>`. Listed at `/quarantine`; its events are dead-lettered
/// (`quarantined_saga`); put back when a build of saga-streams that reads it meets it again (an
/// event, or its timer, tried every minute).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct QuarantineNote {
    pub error: String,
    pub at_ms: i64,
}

/// How often a quarantined record is tried again.
const QUARANTINE_RETRY_MS: i64 = 60_000;

/// A saga looked up by id.
enum Loaded {
    Found(Box<SagaRecord>),
    Missing,
    /// Its record is in the quarantine (moved there now, or earlier), for this reason.
    Quarantined(String),
}

/// Encodes a saga record for the store, or says why it cannot be kept: larger than
/// [`SAGA_RECORD_BUDGET`].
fn encode_record(
    record: &SagaRecord,
    version: u32,
) -> Result<Result<Vec<u8>, BadInput>, ProcessorError> {
    let bytes = super::record::encode_as(record, version)
        .map_err(|e| ProcessorError(format!("saga store: {e}")))?;
    let size = bytes.len() + SAGA_PREFIX.len() + record.saga_id.len();
    if size > SAGA_RECORD_BUDGET {
        return Ok(Err(BadInput::new(
            BadInputKind::RecordTooLarge,
            format!(
                "the record of saga '{}' would have {size} bytes, more than a saga may hold ({SAGA_RECORD_BUDGET})",
                record.saga_id
            ),
        )));
    }
    Ok(Ok(bytes))
}

/// Decodes a stored saga record ([`super::record::decode`]); a record of a later encoding
/// version than this build reads (written by a newer saga-streams) is refused, never half-read.
pub fn decode_record(bytes: &[u8]) -> Result<SagaRecord, ProcessorError> {
    super::record::decode(bytes).map_err(|e| ProcessorError(e.0))
}

/// Runs one saga definition; one instance per task.
pub struct SagaProcessor {
    def: Arc<SagaDefinition>,
    codec: Arc<Codec>,
    /// How often due timers are looked for.
    tick: Duration,
    /// Timers before this time (ms) were all fired by committed-or-open punctuations, so scans
    /// start here instead of at the beginning of the index, skipping the deleted entries of past
    /// timers. New timers always lie in the future. Forgotten when a cycle aborts (the fired
    /// timers come back) and at start-up.
    scanned_to: Option<i64>,
    counts: StatusCounts,
    /// The repartition topic inputs are re-keyed through (`keys: rekey`); `None`: dead-letter
    /// them as with `keys: strict`.
    repartition: Option<String>,
    /// Which inputs must carry a valid signature, which outputs are signed, and the keys (the
    /// codec's).
    signing: Arc<Signing>,
    /// A virtual clock (ms since the epoch) read instead of the wall clock while processing
    /// records: scenarios run in virtual time.
    clock: Option<Arc<std::sync::atomic::AtomicI64>>,
    /// The control topic operators' actions arrive on.
    control: Option<String>,
    /// Where the status index backfill of an earlier build's store goes on (the next saga key);
    /// forgotten when a cycle aborts (started again: entries are written idempotently).
    backfill_from: Option<Vec<u8>>,
    /// The record version saga records are written as ([`super::record::WRITABLE_VERSIONS`]).
    write_version: u32,
}

impl SagaProcessor {
    pub fn new(def: Arc<SagaDefinition>, codec: Arc<Codec>, tick: Duration) -> Self {
        Self {
            def,
            tick,
            scanned_to: None,
            counts: StatusCounts::default(),
            repartition: None,
            control: None,
            backfill_from: None,
            write_version: machine::RECORD_VERSION,
            signing: codec.signing().clone(),
            codec,
            clock: None,
        }
    }

    /// Reads the time from `clock` (ms since the epoch) instead of the wall clock.
    pub fn with_virtual_clock(mut self, clock: Arc<std::sync::atomic::AtomicI64>) -> Self {
        self.clock = Some(clock);
        self
    }

    /// Checks an input's signature (before anything else reads it); dead-letters it when the
    /// topic wants one and it is missing or does not verify. `false`: dead-lettered.
    fn signature_accepted(&self, ctx: &mut ProcessorContext<'_>, record: &InputRecord) -> bool {
        // Named exactly, as the saga reads the correlation id: the signed value is the one used.
        let header = |name: &str| record.header(name);
        let problem = match self.signing.check(
            &record.topic,
            header(SIGNATURE_HEADER),
            record.key.as_deref(),
            record.value.as_deref(),
            header(CORRELATION_HEADER),
        ) {
            Ok(()) => return true,
            Err(problem) => problem,
        };
        let bad = match problem {
            SignatureProblem::Missing => BadInput::new(
                BadInputKind::MissingSignature,
                format!(
                    "{} requires signed records and this one has no {SIGNATURE_HEADER} header",
                    record.topic
                ),
            ),
            SignatureProblem::Bad(why) => BadInput::new(BadInputKind::BadSignature, why),
        };
        metrics::counter!(m::SIGNATURE_FAILURES, "topic" => record.topic.clone(), "reason" => bad.kind.as_str())
            .increment(1);
        tracing::warn!(
            target: AUDIT_TARGET,
            event = "signature_refused",
            reason = bad.kind.as_str(),
            topic = %record.topic,
            partition = record.partition,
            offset = record.offset,
            detail = %bad.message,
            "an input record's signature was refused; the record is dead-lettered"
        );
        self.dead_letter(ctx, record, &bad);
        false
    }

    /// Puts up to [`BACKFILL_BATCH`] sagas of a store written before the status index into it,
    /// one punctuation at a time; once all are in, sets the [`INDEXED_MARKER`]. Sagas that change
    /// meanwhile move their own entries ([`StatusCounts::save`]), so the two never disagree.
    fn backfill_index(&mut self, store: &mut Store<'_>) -> Result<(), ProcessorError> {
        #[derive(serde::Deserialize)]
        struct StatusOnly {
            status: String,
        }
        // Where the last committed batch stopped (kept in the store, so a restart, a move or an
        // aborted cycle goes on from there).
        let from = match self.backfill_from.clone() {
            Some(from) => from,
            None => store
                .get(BACKFILL_CURSOR)?
                .unwrap_or_else(|| SAGA_PREFIX.to_vec()),
        };
        let end = crate::state::prefix_end(SAGA_PREFIX);
        let batch = store.range(&from, end.as_deref(), BACKFILL_BATCH)?;
        let done = batch.len() < BACKFILL_BATCH;
        for (key, value) in &batch {
            let id = String::from_utf8_lossy(&key[SAGA_PREFIX.len()..]);
            // A record that does not decode is not indexed: it goes to the quarantine when
            // next touched.
            if let Ok(saga) = super::record::decode_as::<StatusOnly>(value) {
                store.put(&status_index_key(&saga.status, &id), b"");
            }
        }
        match (done, batch.last()) {
            (false, Some((last, _))) => {
                let next = [last.as_slice(), b"\0"].concat();
                store.put(BACKFILL_CURSOR, &next);
                self.backfill_from = Some(next);
            }
            _ => {
                store.delete(BACKFILL_CURSOR);
                store.put(INDEXED_MARKER, b"1");
                self.counts.indexed = true;
                self.backfill_from = None;
                tracing::info!("the status index of this task's sagas is complete");
            }
        }
        Ok(())
    }

    /// Writes saga records as `version` (one of [`super::record::WRITABLE_VERSIONS`]; the
    /// command line refuses others, and here any other is logged and the current one written).
    pub fn with_record_version(mut self, version: u32) -> Self {
        if super::record::WRITABLE_VERSIONS.contains(&version) {
            self.write_version = version;
        } else {
            tracing::error!(
                version,
                "saga records cannot be written as this version; writing the current one"
            );
        }
        self
    }

    /// Takes operators' actions from `topic` (the application's control topic, consumed by the
    /// same tasks).
    pub fn with_control(mut self, topic: Option<String>) -> Self {
        self.control = topic;
        self
    }

    /// Applies an operator's action from the control topic to its saga, in this cycle. An action
    /// that cannot apply (no such saga here, or not in a state it applies to) changes nothing but
    /// is logged as an audit event and, when the saga exists, entered in its history.
    fn handle_action(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
        now: i64,
    ) -> Result<(), ProcessorError> {
        let request = match record
            .value
            .as_deref()
            .map(serde_json::from_slice::<ActionRequest>)
        {
            Some(Ok(request)) => request,
            other => {
                let why = match other {
                    Some(Err(e)) => e.to_string(),
                    _ => "no value".to_string(),
                };
                tracing::error!(
                    target: AUDIT_TARGET, event = "saga_action_unreadable", topic = %record.topic,
                    partition = record.partition, offset = record.offset, error = %why,
                    "a record of the control topic is not an action; it is skipped"
                );
                metrics::counter!(m::SAGA_ACTIONS, "action" => "unknown", "result" => "unreadable")
                    .increment(1);
                return Ok(());
            }
        };
        let name = request.action.name();
        let refuse = |why: &str| {
            tracing::warn!(
                target: AUDIT_TARGET, event = "saga_action", action = name,
                saga_id = %request.saga_id, action_id = %request.action_id,
                requested_by = %request.requested_by, result = "refused", why,
                "an operator's action was refused"
            );
            metrics::counter!(m::SAGA_ACTIONS, "action" => name, "result" => "refused")
                .increment(1);
        };
        if let Err(why) = request.validate() {
            refuse(&why);
            return Ok(());
        }
        if record.key.as_deref() != Some(request.saga_id.as_bytes()) {
            refuse("the control record is not keyed by its saga id");
            return Ok(());
        }
        let mut store = ctx.store(SAGA_STORE)?;
        let mut current = match self.load_saga(&mut store, &request.saga_id, now)? {
            Loaded::Found(found) => *found,
            Loaded::Missing => {
                refuse(&format!(
                    "no saga '{}' on partition {}",
                    request.saga_id, record.partition
                ));
                return Ok(());
            }
            Loaded::Quarantined(why) => {
                refuse(&format!("the saga's record is in the quarantine: {why}"));
                return Ok(());
            }
        };
        let root = self.def.clone();
        let def = match Self::def_of(&root, &current) {
            Ok(def) => def,
            Err(why) => {
                refuse(&why);
                return Ok(());
            }
        };
        current.rebuild_in_flight(def);
        let (after, outputs, refused) = match machine::act(
            def,
            &current,
            &request.action,
            &request.action_id,
            &request.requested_by,
            now,
        ) {
            machine::Acted::Duplicate => {
                tracing::debug!(action_id = %request.action_id, "an action applied before is ignored");
                return Ok(());
            }
            machine::Acted::Applied { record, outputs } => (*record, outputs, None),
            machine::Acted::Refused { record, why } => (*record, Vec::new(), Some(why)),
        };
        let mut after = after;
        annotate(
            &mut after,
            Some(format!(
                "{}/{}/{}",
                record.topic, record.partition, record.offset
            )),
            &outputs,
        );
        let written = self.encode(def, &after, &outputs, now).and_then(|records| {
            encode_record(&after, self.write_version)
                .map(|bytes| bytes.map(|b| (records, b)))
                .unwrap_or_else(|e| Err(BadInput::new(BadInputKind::UnencodableOutput, e.0)))
        });
        let (records, bytes) = match written {
            Ok(written) => written,
            Err(bad) => {
                refuse(&format!("its outputs cannot be written: {}", bad.message));
                return Ok(());
            }
        };
        self.counts
            .save(&mut store, Some(&current), &after, &bytes)?;
        drop(store);
        self.timer_written(&after);
        match &refused {
            Some(why) => refuse(why),
            None => {
                let reason = match &request.action {
                    machine::Action::Cancel { reason } => reason.as_str(),
                    _ => "",
                };
                tracing::info!(
                    target: AUDIT_TARGET, event = "saga_action", action = name,
                    saga_id = %request.saga_id, action_id = %request.action_id,
                    requested_by = %request.requested_by, reason, result = "applied",
                    from = %current.status, to = %after.status, outputs = outputs.len(),
                    "an operator's action was applied"
                );
                metrics::counter!(m::SAGA_ACTIONS, "action" => name, "result" => "applied")
                    .increment(1);
            }
        }
        self.send(ctx, def, &after, &outputs, records, now);
        Ok(())
    }

    /// Re-keys inputs whose key is not their saga id through `topic` (the application's
    /// repartition topic, consumed by the same tasks).
    pub fn with_repartition(mut self, topic: Option<String>) -> Self {
        self.repartition = topic;
        self
    }

    /// Sends `record` on to the repartition topic keyed by its saga id, unchanged otherwise (its
    /// timestamp too, so its step deadlines are judged as if it came keyed), in this cycle's
    /// transaction.
    fn forward(
        &self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
        topic: &str,
        saga_id: &str,
    ) {
        let mut headers = record.headers.clone();
        headers.retain(|(n, _)| !n.starts_with("saga.source."));
        headers.push((
            rekey_headers::TOPIC.to_string(),
            record.topic.clone().into_bytes(),
        ));
        headers.push((
            rekey_headers::PARTITION.to_string(),
            record.partition.to_string().into_bytes(),
        ));
        headers.push((
            rekey_headers::OFFSET.to_string(),
            record.offset.to_string().into_bytes(),
        ));
        metrics::counter!(m::RECORDS_REKEYED, "topic" => record.topic.clone()).increment(1);
        ctx.send(OutputRecord {
            topic: topic.to_string(),
            partition: None,
            key: Some(saga_id.as_bytes().to_vec()),
            value: record.value.clone(),
            headers,
            timestamp_ms: Some(record.timestamp_ms),
        });
    }

    /// Keeps a timer written before the point scans start from findable: a wall clock that
    /// stepped back gives deadlines earlier than timers already fired.
    fn timer_written(&mut self, record: &SagaRecord) {
        if let (Some(at), Some(from)) = (record.next_timer_ms(), self.scanned_to) {
            if at < from {
                self.scanned_to = Some(at);
            }
        }
    }

    /// How often timers are checked: a tenth of the shortest step timeout, within 20 ms..1 s.
    pub fn default_tick(def: &SagaDefinition) -> Duration {
        let shortest = def
            .steps
            .iter()
            .map(|s| s.timeout)
            .min()
            .unwrap_or(Duration::from_secs(1));
        (shortest / 10).clamp(Duration::from_millis(20), Duration::from_secs(1))
    }

    fn dead_letter(&self, ctx: &mut ProcessorContext<'_>, record: &InputRecord, bad: &BadInput) {
        tracing::warn!(
            topic = %record.topic, partition = record.partition, offset = record.offset,
            kind = bad.kind.as_str(), error = %bad.message, "dead-lettered a record"
        );
        metrics::counter!(m::DLQ_RECORDS, "topic" => record.topic.clone(), "reason" => bad.kind.as_str())
            .increment(1);
        let ours = [
            (dlq_headers::TOPIC, record.topic.clone().into_bytes()),
            (
                dlq_headers::PARTITION,
                record.partition.to_string().into_bytes(),
            ),
            (dlq_headers::OFFSET, record.offset.to_string().into_bytes()),
            (dlq_headers::KIND, bad.kind.as_str().as_bytes().to_vec()),
            (dlq_headers::MESSAGE, bad.message.clone().into_bytes()),
        ];
        let header_bytes = |headers: &[(String, Vec<u8>)]| -> usize {
            headers.iter().map(|(n, v)| n.len() + v.len()).sum()
        };
        let key_bytes = record.key.as_ref().map_or(0, Vec::len);
        // The original headers go along unless they alone would make the letter too large.
        let mut headers = if key_bytes + header_bytes(&record.headers) <= DLQ_RECORD_BUDGET / 2
            || record.headers.is_empty()
        {
            record.headers.clone()
        } else {
            vec![(
                dlq_headers::HEADERS_DROPPED.to_string(),
                record.headers.len().to_string().into_bytes(),
            )]
        };
        headers.extend(ours.into_iter().map(|(n, v)| (n.to_string(), v)));
        // The value is cut to what fits: a prefix for a too-large record, else what the budget
        // leaves; the full size is then named in a header.
        let room = DLQ_RECORD_BUDGET.saturating_sub(key_bytes + header_bytes(&headers) + 64);
        let keep = if bad.kind == BadInputKind::RecordTooLarge {
            DLQ_VALUE_PREFIX.min(room)
        } else {
            room
        };
        let value = record.value.as_ref().map(|v| {
            if v.len() > keep {
                headers.push((
                    dlq_headers::ORIGINAL_SIZE.to_string(),
                    v.len().to_string().into_bytes(),
                ));
                v[..keep].to_vec()
            } else {
                v.clone()
            }
        });
        ctx.send(OutputRecord {
            topic: dlq_topic(&record.topic),
            partition: None,
            key: record.key.clone(),
            value,
            headers,
            timestamp_ms: None,
        });
    }

    /// Looks a saga up. A record that does not decode is moved to the quarantine in this cycle
    /// (the partition goes on); a quarantined one that decodes now (a newer saga-streams, or a
    /// fix) is put back.
    fn load_saga(
        &mut self,
        store: &mut Store<'_>,
        saga_id: &str,
        now: i64,
    ) -> Result<Loaded, ProcessorError> {
        let key = saga_key(saga_id);
        if let Some(bytes) = store.get(&key)? {
            return match decode_record(&bytes) {
                Ok(record) => Ok(Loaded::Found(Box::new(record))),
                Err(e) => {
                    tracing::error!(saga_id, error = %e.0, "a stored saga record cannot be read; it is moved to the quarantine (GET /quarantine) and its events are dead-lettered");
                    metrics::counter!(m::SAGAS_QUARANTINED).increment(1);
                    store.delete(&key);
                    store.put(&quarantine_key(saga_id), &bytes);
                    store.put_json(
                        &quarantine_note_key(saga_id),
                        &QuarantineNote {
                            error: e.0.clone(),
                            at_ms: now,
                        },
                    )?;
                    self.counts
                        .removed(store, saga_id, &RecordSummary::of_bytes(&bytes))?;
                    self.counts.change(store, QUARANTINED, 1)?;
                    Ok(Loaded::Quarantined(e.0))
                }
            };
        }
        let Some(bytes) = store.get(&quarantine_key(saga_id))? else {
            return Ok(Loaded::Missing);
        };
        match decode_record(&bytes) {
            Ok(record) => {
                tracing::warn!(
                    saga_id,
                    "a quarantined saga record is readable again; it is put back"
                );
                store.delete(&quarantine_key(saga_id));
                store.delete(&quarantine_note_key(saga_id));
                self.counts.change(store, QUARANTINED, -1)?;
                // A build that could not read even the status of the record (an older one, or
                // bytes damaged past it) left it counted and indexed when it moved it aside:
                // take that out before counting it again.
                if store
                    .get(&status_index_key(&record.status, saga_id))?
                    .is_some()
                {
                    self.counts
                        .removed(store, saga_id, &RecordSummary::of(&record))?;
                }
                self.counts.save(store, None, &record, &bytes)?;
                Ok(Loaded::Found(Box::new(record)))
            }
            Err(e) => Ok(Loaded::Quarantined(e.0)),
        }
    }

    /// The definition `record` runs under: the version it started under, if loaded and if every
    /// step it names exists there.
    fn def_of<'d>(
        root: &'d SagaDefinition,
        record: &SagaRecord,
    ) -> Result<&'d SagaDefinition, String> {
        let fingerprint = Some(record.topology_fingerprint.as_str()).filter(|f| !f.is_empty());
        let def = root.for_saga(record.topology_version, fingerprint)?;
        record.fits(def)?;
        Ok(def)
    }

    /// Checks an input against the definition of its saga's version, when earlier versions are
    /// loaded and the saga is on this partition, else the current one. A reply for a saga that is
    /// not here (keyless, on its way to its partition) is accepted if any loaded version accepts
    /// it; its saga's own version decides its role once it is there.
    fn check_input(
        &self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
        map: serde_json::Map<String, serde_json::Value>,
    ) -> Result<Result<DecodedEvent, BadInput>, ProcessorError> {
        if self.def.previous.is_empty() {
            return Ok(contract::check(&self.def, record, map));
        }
        let Ok(saga_id) = contract::saga_id(&map, &self.def.key_field) else {
            return Ok(contract::check(&self.def, record, map));
        };
        let store = ctx.store(SAGA_STORE)?;
        let here = store
            .get(&saga_key(&saga_id))?
            .and_then(|bytes| decode_record(&bytes).ok());
        if let Some(saga) = here {
            let def = Self::def_of(&self.def, &saga).unwrap_or(&self.def);
            return Ok(contract::check(def, record, map));
        }
        Ok(match contract::check(&self.def, record, map.clone()) {
            Ok(event) => Ok(event),
            Err(bad) => self
                .def
                .previous
                .iter()
                .find_map(|d| {
                    contract::check(d, record, map.clone())
                        .ok()
                        .filter(|e| e.role != EventRole::Start)
                })
                .ok_or(bad),
        })
    }

    fn handle(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
        event: DecodedEvent,
        now: i64,
    ) -> Result<(), ProcessorError> {
        // Only a well-formed context is kept with the saga (for its timers' spans).
        let traceparent = record
            .header(TRACEPARENT_HEADER)
            .map(|v| String::from_utf8_lossy(v).into_owned())
            .filter(|tp| valid_traceparent(tp));
        let mut store = ctx.store(SAGA_STORE)?;
        let existing = match self.load_saga(&mut store, &event.saga_id, now)? {
            Loaded::Found(record) => Some(*record),
            Loaded::Missing => None,
            Loaded::Quarantined(why) => {
                drop(store);
                let bad = BadInput::new(
                    BadInputKind::QuarantinedSaga,
                    format!(
                        "the record of {} '{}' is in the quarantine: {why}",
                        self.def.key_field, event.saga_id
                    ),
                );
                self.dead_letter(ctx, record, &bad);
                return Ok(());
            }
        };
        let span = tracing::info_span!(
            target: SAGA_SPAN_TARGET, "saga", saga_id = %event.saga_id,
            correlation_id = tracing::field::Empty, event_type = %event.event_type,
            topic = %record.topic, partition = record.partition, offset = record.offset
        );
        // A child of the producer's span (W3C trace context in the headers); for a record
        // without one (a service that does not trace), of the saga's last traced input, so a saga
        // stays one trace; else the start of a new trace.
        let own = traceparent.is_some();
        continue_trace(&span, &mut |name| match own {
            true => record
                .header(name)
                .map(|v| String::from_utf8_lossy(v).into_owned()),
            false => (name == TRACEPARENT_HEADER)
                .then(|| existing.as_ref().and_then(|s| s.traceparent.clone()))
                .flatten(),
        });
        let _entered = span.enter();
        // A saga without any traced input keeps its own first span's context, so its timers'
        // spans join its trace too.
        let traceparent = traceparent.or_else(|| {
            let stored = existing.as_ref().and_then(|s| s.traceparent.as_ref());
            match stored {
                Some(_) => None,
                None => trace_headers()
                    .into_iter()
                    .find(|(name, _)| name == TRACEPARENT_HEADER)
                    .map(|(_, value)| value),
            }
        });
        // A saga runs under the topology version it started under.
        let root = self.def.clone();
        let def = match &existing {
            None => &*root,
            Some(current) => match Self::def_of(&root, current) {
                Ok(def) => def,
                // A second start for a finished saga changes nothing, whatever its version.
                Err(_) if current.is_finished() && event.role == EventRole::Start => {
                    metrics::counter!(m::EVENTS_IGNORED, "reason" => machine::Ignored::AlreadyStarted.as_str()).increment(1);
                    return Ok(());
                }
                Err(why) => {
                    // Applying the event could only go wrong. It waits in the DLQ (replayable
                    // once that version is loaded again); the saga is left as it is.
                    drop(store);
                    tracing::error!(error = %why, "a saga does not fit the loaded topology");
                    metrics::counter!(m::SAGAS_INCOMPATIBLE).increment(1);
                    let bad = BadInput::new(BadInputKind::IncompatibleSaga, why);
                    self.dead_letter(ctx, record, &bad);
                    return Ok(());
                }
            },
        };
        let existing = existing.map(|mut current| {
            current.rebuild_in_flight(def);
            current
        });
        // The event's role (its step number) as the saga's own version defines it.
        let role = match (&existing, event.role) {
            (Some(_), EventRole::Start) | (None, _) => event.role,
            (Some(_), _) => match def.role_of(&record.topic, &event.event_type) {
                Some(role) => role,
                None => {
                    drop(store);
                    let bad = BadInput::new(
                        BadInputKind::UnknownEventType,
                        format!(
                            "event type '{}' is not expected on topic '{}' by version {} of the topology, which {} '{}' started under",
                            event.event_type, record.topic, def.version, def.key_field, event.saga_id
                        ),
                    );
                    self.dead_letter(ctx, record, &bad);
                    return Ok(());
                }
            },
        };
        let saga_event = SagaEvent {
            event_id: event.event_id.clone(),
            event_type: event.event_type.clone(),
            role,
            payload: event.payload,
            traceparent,
        };
        let (before, mut record_after, outputs) = match (existing, role) {
            (None, EventRole::Start) => {
                let correlation_id = event
                    .correlation_id
                    .or_else(|| {
                        record
                            .header(CORRELATION_HEADER)
                            .map(|v| String::from_utf8_lossy(v).into_owned())
                            .filter(|s| !s.is_empty())
                    })
                    // Derived from the event id, so a cycle processed again gets the same one.
                    .unwrap_or_else(|| {
                        uuid::Uuid::new_v5(&uuid::Uuid::NAMESPACE_OID, event.event_id.as_bytes())
                            .to_string()
                    });
                let (started, outputs) =
                    machine::start(def, &event.saga_id, &saga_event, correlation_id, now);
                (None, started, outputs)
            }
            (None, _) => {
                drop(store);
                let bad = BadInput::new(
                    BadInputKind::UnknownSaga,
                    format!(
                        "{} for {} '{}', which has no saga (never started, or expired)",
                        event.event_type, self.def.key_field, event.saga_id
                    ),
                );
                self.dead_letter(ctx, record, &bad);
                return Ok(());
            }
            (Some(current), _) => {
                span.record("correlation_id", current.correlation_id.as_str());
                match machine::apply(def, &current, SagaInput::Event(&saga_event), now) {
                    Applied::Changed { record, outputs } => (Some(current), *record, outputs),
                    Applied::Ignored(why) => {
                        tracing::debug!(reason = why.as_str(), event_id = %saga_event.event_id, "ignored an event");
                        metrics::counter!(m::EVENTS_IGNORED, "reason" => why.as_str()).increment(1);
                        return Ok(());
                    }
                    Applied::Expired => return Ok(()),
                }
            }
        };
        let source = Some(format!(
            "{}/{}/{}",
            record.topic, record.partition, record.offset
        ));
        annotate(&mut record_after, source.clone(), &outputs);
        // Every output and the saga record are encoded and checked before anything is written:
        // what cannot be written dead-letters the input, and the saga stays as it was before it.
        let written = self
            .encode(def, &record_after, &outputs, now)
            .and_then(|records| {
                encode_record(&record_after, self.write_version)
                    .map(|bytes| bytes.map(|b| (records, b)))
                    .unwrap_or_else(|e| Err(BadInput::new(BadInputKind::UnencodableOutput, e.0)))
            });
        let (record_after, outputs, records, bytes) = match written {
            Ok((records, bytes)) => (record_after, outputs, records, bytes),
            Err(bad) => {
                metrics::counter!(m::OUTPUT_ERRORS, "reason" => bad.kind.as_str()).increment(1);
                // A success must not be dropped: whatever the step did (money taken) would be
                // kept. The saga takes the success and compensates instead, if that can be
                // written.
                let instead = match saga_event.role {
                    EventRole::Success(_) => {
                        machine::cancel_unwritable(def, &record_after, now, &bad.message).and_then(
                            |(mut r, outs)| {
                                // Its entries sent the compensations, not the unwritable output.
                                for entry in r.history.fresh_mut() {
                                    entry.sent.clear();
                                }
                                annotate(&mut r, source.clone(), &outs);
                                let records = self.encode(def, &r, &outs, now).ok()?;
                                let bytes = encode_record(&r, self.write_version).ok()?.ok()?;
                                Some((r, outs, records, bytes))
                            },
                        )
                    }
                    _ => None,
                };
                match instead {
                    Some(cancelled) => {
                        tracing::error!(kind = bad.kind.as_str(), error = %bad.message, "an output of a success cannot be written; the saga compensates instead");
                        cancelled
                    }
                    None => {
                        drop(store);
                        self.dead_letter(ctx, record, &bad);
                        return Ok(());
                    }
                }
            }
        };
        if before.is_none() {
            metrics::counter!(m::SAGAS_STARTED).increment(1);
        }
        self.counts
            .save(&mut store, before.as_ref(), &record_after, &bytes)?;
        drop(store);
        self.timer_written(&record_after);
        span.record("correlation_id", record_after.correlation_id.as_str());
        tracing::debug!(
            status = %record_after.status, step_awaited = ?record_after.step_awaited,
            outputs = outputs.len(), "saga transition"
        );
        self.send(ctx, def, &record_after, &outputs, records, now);
        Ok(())
    }

    /// The Kafka records of a saga's outputs, or why one cannot be written (it cannot be
    /// encoded, or it is larger than [`OUTPUT_RECORD_BUDGET`]).
    fn encode(
        &self,
        def: &SagaDefinition,
        saga: &SagaRecord,
        outputs: &[SagaOutput],
        now: i64,
    ) -> Result<Vec<OutputRecord>, BadInput> {
        let mut records = Vec::with_capacity(outputs.len());
        for output in outputs {
            let body =
                contract::message_body(def, &saga.saga_id, &saga.correlation_id, output, now);
            let value = self
                .codec
                .write(&output.topic, &output.event_type, body, def.wrap_outputs)
                .map_err(|e| {
                    BadInput::new(
                        BadInputKind::UnencodableOutput,
                        format!(
                            "{} for {} '{}' cannot be written to {}: {e}",
                            output.event_type, def.key_field, saga.saga_id, output.topic
                        ),
                    )
                })?;
            // Stamped with the time its deadline counts from (the command's timestamp plus the
            // step timeout).
            let mut record =
                OutputRecord::new(output.topic.clone(), saga.saga_id.as_bytes(), value)
                    .with_header(CORRELATION_HEADER, saga.correlation_id.as_bytes())
                    .with_timestamp(now);
            for (name, value) in trace_headers() {
                record = record.with_header(name, value.into_bytes());
            }
            let signature = self
                .signing
                .sign(
                    &output.topic,
                    record.key.as_deref(),
                    record.value.as_deref(),
                    Some(saga.correlation_id.as_bytes()),
                )
                .map_err(|e| BadInput::new(BadInputKind::UnencodableOutput, e))?;
            if let Some(signature) = signature {
                record = record.with_header(SIGNATURE_HEADER, signature.as_bytes());
            }
            let size = record.key.as_ref().map_or(0, Vec::len)
                + record.value.as_ref().map_or(0, Vec::len)
                + record
                    .headers
                    .iter()
                    .map(|(n, v)| n.len() + v.len())
                    .sum::<usize>();
            if size > OUTPUT_RECORD_BUDGET {
                return Err(BadInput::new(
                    BadInputKind::RecordTooLarge,
                    format!(
                        "{} for {} '{}' would have {size} bytes, more than an output may have ({OUTPUT_RECORD_BUDGET})",
                        output.event_type, def.key_field, saga.saga_id
                    ),
                ));
            }
            records.push(record);
        }
        Ok(records)
    }

    fn send(
        &self,
        ctx: &mut ProcessorContext<'_>,
        def: &SagaDefinition,
        saga: &SagaRecord,
        outputs: &[SagaOutput],
        records: Vec<OutputRecord>,
        now: i64,
    ) {
        for (output, record) in outputs.iter().zip(records) {
            count_output(def, saga, output, now);
            ctx.send(record);
        }
    }
}

/// Exports at 0 every series whose labels the topology fixes (dead letters per input topic and
/// reason, outcomes, timeouts, compensations and retries per step, sagas per status), so a
/// `rate()` or an alert has a series before the first event: an absent series is not 0.
pub fn export_known_series(def: &SagaDefinition) {
    for topic in def.input_topics() {
        for kind in BadInputKind::ALL {
            metrics::counter!(m::DLQ_RECORDS, "topic" => topic.clone(), "reason" => kind.as_str())
                .increment(0);
        }
    }
    metrics::counter!(m::SAGA_OUTCOMES, "outcome" => "completed", "reason" => "").increment(0);
    let mut statuses: BTreeSet<String> = [
        crate::saga::topology::PENDING,
        crate::saga::topology::COMPENSATING,
        crate::saga::topology::COMPLETED,
        crate::saga::topology::FAILED,
        crate::saga::topology::COMPENSATION_STUCK,
        QUARANTINED,
    ]
    .iter()
    .map(|s| s.to_string())
    .collect();
    for d in def.versions() {
        statuses.insert(d.compensated_state.clone());
        for step in &d.steps {
            let name = step.name.clone();
            statuses.insert(step.state.clone());
            for reason in [format!("{name}_failed"), format!("timeout:{name}")] {
                metrics::counter!(m::SAGA_OUTCOMES, "outcome" => "cancelled", "reason" => reason)
                    .increment(0);
            }
            metrics::counter!(m::TIMEOUTS, "step" => name.clone()).increment(0);
            metrics::counter!(m::COMPENSATIONS_STUCK, "step" => name.clone()).increment(0);
            for late in ["true", "false"] {
                metrics::counter!(m::COMPENSATIONS, "step" => name.clone(), "late" => late)
                    .increment(0);
            }
            for kind in ["command", "compensation"] {
                metrics::counter!(m::RETRIES, "step" => name.clone(), "kind" => kind).increment(0);
            }
        }
    }
    for status in statuses {
        metrics::gauge!(m::SAGAS, "status" => status).set(0.0);
    }
}

fn count_output(def: &SagaDefinition, saga: &SagaRecord, output: &SagaOutput, now: i64) {
    let duration = || (now - saga.started_at_ms).max(0) as f64 / 1000.0;
    match &output.kind {
        OutputKind::Command { step, attempt } => {
            if *attempt > 1 {
                metrics::counter!(m::RETRIES, "step" => def.steps[*step].name.clone(), "kind" => "command")
                    .increment(1);
            }
        }
        OutputKind::Compensation {
            step,
            late,
            attempt,
        } => {
            if *attempt > 1 {
                metrics::counter!(m::RETRIES, "step" => def.steps[*step].name.clone(), "kind" => "compensation")
                    .increment(1);
            } else {
                metrics::counter!(m::COMPENSATIONS, "step" => def.steps[*step].name.clone(), "late" => late.to_string())
                    .increment(1);
            }
        }
        OutputKind::Completed => {
            metrics::counter!(m::SAGA_OUTCOMES, "outcome" => "completed", "reason" => "")
                .increment(1);
            metrics::histogram!(m::SAGA_DURATION, "outcome" => "completed").record(duration());
        }
        OutputKind::Cancelled { reason } => {
            metrics::counter!(m::SAGA_OUTCOMES, "outcome" => "cancelled", "reason" => reason.clone())
                .increment(1);
            metrics::histogram!(m::SAGA_DURATION, "outcome" => "cancelled").record(duration());
        }
    }
}

/// Marks the history entries one input or timer added to `after` (those not yet written) with
/// where the input was read and the messages it sent (on the last of them).
fn annotate(after: &mut SagaRecord, source: Option<String>, outputs: &[SagaOutput]) {
    let added = after.history.fresh_mut();
    for entry in added.iter_mut() {
        entry.source.clone_from(&source);
    }
    if let Some(last) = added.last_mut() {
        last.sent = outputs.iter().map(|o| o.event_type.clone()).collect();
    }
}

/// Writes a saga record and moves its entry in the timer index.
fn save(
    store: &mut Store<'_>,
    before: Option<&SagaRecord>,
    after: &SagaRecord,
    bytes: &[u8],
) -> Result<(), ProcessorError> {
    store.put(&saga_key(&after.saga_id), bytes);
    let old = before.and_then(SagaRecord::next_timer_ms);
    let new = after.next_timer_ms();
    if old != new {
        if let Some(at) = old {
            store.delete(&timer_key(at, &after.saga_id));
        }
        if let Some(at) = new {
            store.put(&timer_key(at, &after.saga_id), b"");
        }
    }
    Ok(())
}

impl Processor for SagaProcessor {
    fn init(&mut self, ctx: &mut ProcessorContext<'_>) -> Result<(), ProcessorError> {
        ctx.schedule_punctuation(self.tick);
        self.counts.load(&ctx.store(SAGA_STORE)?)?;
        // Sagas that started under a version no longer loaded cannot go on: say so at once.
        for (version, n) in &self.counts.versions.local {
            let loaded = self
                .def
                .versions()
                .any(|d| d.version.to_string() == *version);
            if *n > 0 && !loaded {
                tracing::error!(
                    partition = ctx.partition(), topology_version = %version, live_sagas = n,
                    "unfinished sagas started under a topology version that is not loaded: their events are dead-lettered (incompatible_saga) and their timers held until its file is listed in previous_versions"
                );
            }
        }
        if let Some(n) = self
            .counts
            .status
            .local
            .get(QUARANTINED)
            .filter(|n| **n > 0)
        {
            tracing::warn!(
                partition = ctx.partition(),
                records = n,
                "saga records in the quarantine (GET /quarantine)"
            );
        }
        Ok(())
    }

    fn cycle_aborted(&mut self) {
        self.scanned_to = None;
        self.backfill_from = None;
        self.counts.mark_stale();
    }

    fn close(&mut self) {
        self.counts.release();
    }

    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
    ) -> Result<(), ProcessorError> {
        let now = match &self.clock {
            Some(clock) => clock.load(std::sync::atomic::Ordering::Relaxed),
            None => now_ms(SystemTime::now()),
        };
        if self.counts.stale() {
            self.counts.load(&ctx.store(SAGA_STORE)?)?;
        }
        if self.control.as_deref() == Some(record.topic.as_str()) {
            return self.handle_action(ctx, record, now);
        }
        let size = record.value.as_ref().map_or(0, Vec::len);
        if size > self.def.max_input_bytes {
            let bad = BadInput::new(
                BadInputKind::RecordTooLarge,
                format!(
                    "the value has {size} bytes, more than max_input_bytes ({}); its first {} bytes are kept",
                    self.def.max_input_bytes,
                    DLQ_VALUE_PREFIX.min(size)
                ),
            );
            self.dead_letter(ctx, record, &bad);
            return Ok(());
        }
        // A record re-keyed through the repartition topic is read as the record it was, where it
        // was first read (its topic says what it is and how it is encoded).
        let rekeyed;
        let (record, from_repartition) = match &self.repartition {
            Some(topic) if *topic == record.topic => {
                let source = |name: &str| {
                    record
                        .header(name)
                        .map(|v| String::from_utf8_lossy(v).into_owned())
                };
                let Some(topic) = source(rekey_headers::TOPIC) else {
                    let bad = BadInput::new(
                        BadInputKind::MissingValue,
                        "a record on the repartition topic without its source topic header",
                    );
                    self.dead_letter(ctx, record, &bad);
                    return Ok(());
                };
                rekeyed = InputRecord {
                    topic,
                    partition: source(rekey_headers::PARTITION)
                        .and_then(|p| p.parse().ok())
                        .unwrap_or(record.partition),
                    offset: source(rekey_headers::OFFSET)
                        .and_then(|o| o.parse().ok())
                        .unwrap_or(record.offset),
                    ..record.clone()
                };
                (&rekeyed, true)
            }
            _ => (record, false),
        };
        // A re-keyed record was verified before it was forwarded.
        if !from_repartition && !self.signature_accepted(ctx, record) {
            return Ok(());
        }
        // Err(Ok(bad)): dead-letter it; Err(Err(why)): the registry cannot be reached.
        let decoded = match self.codec.read(&record.topic, record.value.as_deref()) {
            Ok(map) => self.check_input(ctx, record, map)?.map_err(Ok),
            Err(DecodeError::Bad(bad)) => Err(Ok(BadInput::from(bad))),
            Err(DecodeError::Unavailable(why)) => Err(Err(why)),
        };
        match decoded {
            Ok(event) => {
                if !from_repartition && record.key.as_deref() != Some(event.saga_id.as_bytes()) {
                    // Keyed by something else, or not at all: the saga lives on the partition
                    // of its id.
                    match (&self.repartition, &record.key) {
                        (Some(topic), _) => {
                            let topic = topic.clone();
                            self.forward(ctx, record, &topic, &event.saga_id);
                        }
                        (None, None) => {
                            let bad = BadInput::new(
                                BadInputKind::MissingKey,
                                format!(
                                    "the record has no key; the topology wants it keyed by {} ('{}')",
                                    self.def.key_field, event.saga_id
                                ),
                            );
                            self.dead_letter(ctx, record, &bad);
                        }
                        (None, Some(key)) => {
                            let bad = BadInput::new(
                                BadInputKind::KeyMismatch,
                                format!(
                                    "the record key '{}' differs from {} '{}': the saga lives on the partition of its key",
                                    String::from_utf8_lossy(key),
                                    self.def.key_field,
                                    event.saga_id
                                ),
                            );
                            self.dead_letter(ctx, record, &bad);
                        }
                    }
                    return Ok(());
                }
                self.handle(ctx, record, event, now)
            }
            Err(Ok(bad)) => {
                self.dead_letter(ctx, record, &bad);
                Ok(())
            }
            // Not the record's fault: fail the cycle, so it is retried (with backoff) from the
            // last commit once the registry answers again.
            Err(Err(why)) => Err(ProcessorError(format!(
                "{} partition {} offset {}: {why}",
                record.topic, record.partition, record.offset
            ))),
        }
    }

    fn punctuate(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        now: SystemTime,
    ) -> Result<(), ProcessorError> {
        let now = now_ms(now);
        // A deadline has passed only once every input was consumed up to it: a reply written
        // in time may still be waiting, unread, behind an outage or a backlog.
        let Some(input_time) = ctx.input_time_ms() else {
            return Ok(());
        };
        let cutoff = input_time.min(now);
        let mut store = ctx.store(SAGA_STORE)?;
        if self.counts.stale() {
            self.counts.load(&store)?;
        }
        let end = timer_key(cutoff.saturating_add(1), "");
        let start = match self.scanned_to {
            Some(at) => timer_key(at, ""),
            None => TIMER_PREFIX.to_vec(),
        };
        // One more than a punctuation takes, to know whether more are due.
        let due = store.range(&start, Some(&end), TIMERS_PER_PUNCTUATION + 1)?;
        // All due timers are handled, unless there are more than one punctuation takes.
        let mut complete = due.len() <= TIMERS_PER_PUNCTUATION;
        let root = self.def.clone();
        let mut fired = Vec::new();
        for (key, _) in due.into_iter().take(TIMERS_PER_PUNCTUATION) {
            let Some(id) = key.get(TIMER_PREFIX.len() + 8..) else {
                // Not an entry this processor wrote: drop it rather than fail the task forever.
                store.delete(&key);
                continue;
            };
            let saga_id = String::from_utf8_lossy(id).into_owned();
            let mut current = match self.load_saga(&mut store, &saga_id, now)? {
                Loaded::Found(record) => *record,
                // Gone, or moved to the quarantine (with its timer no longer indexed).
                Loaded::Missing => {
                    store.delete(&key);
                    continue;
                }
                // Tried again every minute: a build that reads it puts it back, timers and all.
                Loaded::Quarantined(_) => {
                    store.delete(&key);
                    let again = now.max(cutoff).saturating_add(QUARANTINE_RETRY_MS);
                    store.put(&timer_key(again, &saga_id), b"");
                    continue;
                }
            };
            let timer = SagaInput::Timer {
                input_time_ms: cutoff,
            };
            let (def, applied) = match Self::def_of(&root, &current) {
                Ok(def) => {
                    current.rebuild_in_flight(def);
                    (def, machine::apply(def, &current, timer, now))
                }
                // A finished saga's timer only shrinks or removes it: no step involved.
                Err(_) if current.is_finished() => {
                    (&*root, machine::apply(&root, &current, timer, now))
                }
                Err(why) => {
                    tracing::error!(saga_id = %saga_id, error = %why, "a saga does not fit the loaded topology; its timer is held");
                    metrics::counter!(m::SAGAS_INCOMPATIBLE).increment(1);
                    let held = machine::hold_for_retry(
                        &current,
                        now.max(cutoff).saturating_add(UNWRITABLE_TIMER_RETRY_MS),
                        now,
                        &why,
                    );
                    let bytes = match encode_record(&held, self.write_version)? {
                        Ok(bytes) => bytes,
                        Err(_) => continue,
                    };
                    self.counts
                        .save(&mut store, Some(&current), &held, &bytes)?;
                    fired.push((&*root, held, Vec::new(), Vec::new()));
                    continue;
                }
            };
            match applied {
                Applied::Changed {
                    mut record,
                    outputs,
                } => {
                    annotate(&mut record, None, &outputs);
                    // Outputs of a timer continue the trace of the saga's last traced input.
                    let span = tracing::info_span!(
                        target: SAGA_SPAN_TARGET, "saga_timer", saga_id = %record.saga_id,
                        status = %record.status
                    );
                    continue_trace(&span, &mut |name| {
                        (name == TRACEPARENT_HEADER)
                            .then(|| record.traceparent.clone())
                            .flatten()
                    });
                    let _entered = span.enter();
                    let written = self
                        .encode(def, &record, &outputs, now)
                        .and_then(|records| {
                            encode_record(&record, self.write_version)
                                .map(|bytes| bytes.map(|b| (records, b)))
                                .unwrap_or_else(|e| {
                                    Err(BadInput::new(BadInputKind::UnencodableOutput, e.0))
                                })
                        });
                    let (records, record_bytes) = match written {
                        Ok(written) => written,
                        Err(bad) => {
                            // No input to dead-letter: the saga stays as it was and its timer
                            // comes back later (a schema fixed meanwhile lets it through).
                            tracing::error!(saga_id = %saga_id, kind = bad.kind.as_str(), error = %bad.message, "the outputs of a due timer cannot be written; the saga is held and tried again in 60 s");
                            metrics::counter!(m::OUTPUT_ERRORS, "reason" => bad.kind.as_str())
                                .increment(1);
                            let held = machine::hold_for_retry(
                                &current,
                                now.max(cutoff).saturating_add(UNWRITABLE_TIMER_RETRY_MS),
                                now,
                                &bad.message,
                            );
                            let Ok(bytes) = encode_record(&held, self.write_version)? else {
                                continue;
                            };
                            self.counts
                                .save(&mut store, Some(&current), &held, &bytes)?;
                            fired.push((&*root, held, Vec::new(), Vec::new()));
                            continue;
                        }
                    };
                    let timed_out = record
                        .history
                        .fresh()
                        .last()
                        .is_some_and(|t| t.cause == "timeout");
                    if let (true, Some(step)) = (timed_out, current.step_awaited.as_ref()) {
                        metrics::counter!(m::TIMEOUTS, "step" => step.clone()).increment(1);
                    }
                    for stuck in &record.stuck_steps {
                        if !current.stuck_steps.contains(stuck) {
                            let step = def.steps.get(*stuck).map_or("", |s| s.name.as_str());
                            tracing::warn!(saga_id = %saga_id, step, "compensation given up unconfirmed: the saga is COMPENSATION_STUCK");
                            metrics::counter!(m::COMPENSATIONS_STUCK, "step" => step.to_string())
                                .increment(1);
                        }
                    }
                    tracing::debug!(saga_id = %saga_id, status = %record.status, "timer fired");
                    self.counts
                        .save(&mut store, Some(&current), &record, &record_bytes)?;
                    fired.push((def, *record, outputs, records));
                }
                Applied::Expired => {
                    store.delete(&key);
                    store.delete(&saga_key(&saga_id));
                    self.counts
                        .removed(&mut store, &saga_id, &RecordSummary::of(&current))?;
                }
                Applied::Ignored(_) => {
                    // An index entry that does not match the record (it cannot happen through
                    // `save`): drop it and index the record's real timer.
                    store.delete(&key);
                    if let Some(at) = current.next_timer_ms() {
                        store.put(&timer_key(at, &saga_id), b"");
                        complete = false;
                    }
                }
            }
        }
        self.scanned_to = complete.then(|| cutoff.saturating_add(1));
        if self.counts.unindexed() {
            self.backfill_index(&mut store)?;
        }
        drop(store);
        for (_, record, _, _) in &fired {
            self.timer_written(record);
        }
        for (def, record, outputs, records) in fired {
            self.send(ctx, def, &record, &outputs, records, now);
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fixture(name: &str) -> Vec<u8> {
        std::fs::read(format!(
            "{}/tests/fixtures/{name}",
            env!("CARGO_MANIFEST_DIR")
        ))
        .unwrap()
    }

    /// State written by an earlier version must stay readable by every later one. The version 2
    /// fixture holds record bytes as saga-streams wrote them before the binary record (JSON); the
    /// version 3 one, the bytes of the same saga as this encoder writes them. A change that cannot
    /// read them breaks old stores and changelogs: bump `RECORD_VERSION` and read both instead.
    #[test]
    fn saga_records_written_by_version_2_stay_readable() {
        let record = decode_record(&fixture("saga-record-v2.json")).unwrap();
        assert_eq!(record.record_version, machine::RECORD_VERSION);
        assert_eq!(record.status, "REFUNDED");
        assert_eq!(record.completed_steps, vec![0]);
        assert_eq!(record.abandoned_steps, vec![1]);
        assert_eq!(record.compensated_steps, vec![0]);
        assert_eq!(record.history.len(), 4);
        assert_eq!(record.history.entries()[3].to, "REFUNDED");
        assert_eq!(record.context["payment_id"], "pay-9");
        assert_eq!(
            record.outcome.as_ref().and_then(|o| o.reason.as_deref()),
            Some("inventory_failed")
        );
        // Written back as version 3, it reads as the same saga.
        let written = encode_record(&record, machine::RECORD_VERSION)
            .unwrap()
            .unwrap();
        assert_eq!(&written[..2], &[0, 3]);
        assert_eq!(decode_record(&written).unwrap(), record);
    }

    #[test]
    fn saga_records_written_by_version_3_stay_readable() {
        let bytes = fixture("saga-record-v3.bin");
        let record = decode_record(&bytes).unwrap();
        let v2 = decode_record(&fixture("saga-record-v2.json")).unwrap();
        assert_eq!(record, v2);
        // The current encoder still writes exactly these bytes.
        assert_eq!(
            encode_record(&record, machine::RECORD_VERSION)
                .unwrap()
                .unwrap(),
            bytes
        );
        // A list reads its fields without decoding the rest.
        let summary = RecordSummary::of_bytes(&bytes);
        assert_eq!(summary.status.as_deref(), Some("REFUNDED"));
        assert!(summary.finished);
    }

    /// A live saga (compensating, a message in flight, one given up, a later topology
    /// version), as this encoder writes it: pins the parts the finished fixture lacks.
    #[test]
    fn live_saga_records_written_by_version_3_stay_readable() {
        let bytes = fixture("saga-record-v3-live.bin");
        let record = decode_record(&bytes).unwrap();
        assert_eq!(
            record.phase,
            machine::Phase::Compensating {
                step: 1,
                pending: vec![0],
                reason: "shipping_failed".into(),
                after_outcome: false,
            }
        );
        let flight = record.in_flight.as_ref().unwrap();
        assert_eq!((flight.step, flight.attempt), (1, 2));
        assert_eq!(flight.payload["reservation_id"], "res-4");
        assert_eq!(flight.resend_at_ms, Some(1_795_728_009_000));
        assert_eq!(record.given_up.len(), 1);
        assert_eq!(record.topology_version, 2);
        assert_eq!(record.topology_fingerprint, "fp-2");
        assert_eq!(record.id_seed, "seed-1");
        assert_eq!(record.history.len(), 4);
        assert_eq!(
            encode_record(&record, machine::RECORD_VERSION)
                .unwrap()
                .unwrap(),
            bytes
        );
        let summary = RecordSummary::of_bytes(&bytes);
        assert_eq!(summary.status.as_deref(), Some("COMPENSATING"));
        assert_eq!(summary.topology_version, Some(2));
        assert!(!summary.finished);
    }

    /// A record of a later version is refused, but what the counts need of it is still read
    /// (its field names are kept), so moving it to the quarantine takes it out of the counts.
    #[test]
    fn a_later_binary_version_is_refused_but_still_counted() {
        let live = fixture("saga-record-v3-live.bin");
        let mut later = live.clone();
        later[1] = 4;
        assert!(decode_record(&later)
            .unwrap_err()
            .0
            .contains("newer saga-streams"));
        let summary = RecordSummary::of_bytes(&later);
        assert_eq!(summary.status.as_deref(), Some("COMPENSATING"));
        assert_eq!(summary.topology_version, Some(2));
    }

    /// Version 1 records (before retries and tombstones) are read and upgraded: a cancelled
    /// saga's completed steps count as compensated, so nothing is compensated twice, and the
    /// step that failed counts as abandoned.
    #[test]
    fn saga_records_written_by_version_1_are_upgraded() {
        let record = decode_record(&fixture("saga-record-v1.json")).unwrap();
        assert_eq!(record.record_version, machine::RECORD_VERSION);
        assert_eq!(record.status, "REFUNDED");
        assert_eq!(record.compensated_steps, vec![0]);
        // Cancelled because inventory failed: a success of it arriving later is compensated.
        assert_eq!(record.abandoned_steps, vec![1]);
        assert_eq!(record.history.len(), 4);
    }

    #[test]
    fn timer_keys_sort_by_time_then_saga() {
        let a = timer_key(5, "zz");
        let b = timer_key(6, "aa");
        let c = timer_key(256, "aa");
        assert!(a < b && b < c);
        assert!(timer_key(7, "x") < timer_key(8, ""));
        assert_eq!(&a[TIMER_PREFIX.len() + 8..], b"zz");
    }
}
