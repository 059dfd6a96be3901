//! `/sagas/{id}` and `/quarantine`: find sagas in the committed state of this instance's tasks.
//!
//! The saga lives in the task of the partition its key maps to on the start topic, by the input
//! producers' partitioner ([`Partitioner`]), so the answer matches the producers.

use std::collections::BTreeMap;

use serde_json::{json, Value};

use super::machine::Outcome;
use super::machine::SagaRecord;
use super::processor::{
    decode_record, quarantine_key, quarantine_note_key, saga_key, saga_prefix, status_index_prefix,
    QuarantineNote, COUNT_PREFIX, INDEXED_MARKER, QUARANTINED, SAGA_STORE,
};
pub use crate::runtime::partitioner::Partitioner;
use crate::runtime::RuntimeStatus;
use crate::saga::contract::rfc3339;
use crate::state::prefix_end;
use crate::telemetry::http::{ListFilter, ListPage, Lookup, SagaLookup};

/// Looks sagas up in the running tasks of one instance.
pub struct SagaQuery {
    pub status: RuntimeStatus,
    pub partitioner: Partitioner,
    /// The topology, for `/topology` (the inspector draws its state machine).
    pub def: std::sync::Arc<super::SagaDefinition>,
}

/// The topology as the inspector shows it: steps, statuses and the state machine's transitions.
pub fn topology_json(def: &super::SagaDefinition) -> Value {
    let steps: Vec<Value> = def
        .steps
        .iter()
        .map(|s| {
            json!({
                "name": s.name,
                "state": s.state,
                "command": { "topic": s.command.topic, "event_type": s.command.event_type },
                "replies": { "topic": s.reply_topic, "success": s.success, "failure": s.failure },
                "compensation": {
                    "topic": s.compensation.topic,
                    "event_type": s.compensation.event_type,
                    "confirmed_by": s.confirmed_by,
                },
                "timeout": humantime::format_duration(s.timeout).to_string(),
            })
        })
        .collect();
    let dlqs: Vec<String> = def
        .input_topics()
        .iter()
        .map(|t| super::topology::dlq_topic(t))
        .collect();
    json!({
        "name": def.name,
        "version": def.version,
        "key_field": def.key_field,
        "start": { "topic": def.start_topic, "event_type": def.start_event },
        "steps": steps,
        "compensated_state": def.compensated_state,
        "dlq_topics": dlqs,
        "edges": super::describe::edges(def),
    })
}

/// The saga as the query endpoint shows it: times in RFC 3339 besides the raw milliseconds.
pub fn saga_json(record: &SagaRecord, partition: i32) -> Value {
    let time = |ms: Option<i64>| ms.map(rfc3339);
    let history: Vec<Value> = record
        .history
        .entries()
        .iter()
        .map(|t| {
            json!({
                "at": rfc3339(t.at_ms),
                "cause": t.cause,
                "event_id": t.event_id,
                "from": t.from,
                "to": t.to,
                "note": t.note,
                "source": t.source,
                "sent": t.sent,
                "refused": t.refused,
            })
        })
        .collect();
    json!({
        "saga_id": record.saga_id,
        "partition": partition,
        "status": record.status,
        "topology_version": record.topology_version,
        "step_awaited": record.step_awaited,
        "deadline": time(record.deadline_ms),
        "expires_at": time(record.expires_at_ms),
        "correlation_id": record.correlation_id,
        "context": record.context,
        "completed_steps": record.completed_steps,
        "abandoned_steps": record.abandoned_steps,
        "compensated_steps": record.compensated_steps,
        "stuck_steps": record.stuck_steps,
        "awaiting": record.in_flight.as_ref().map(|f| json!({
            "event_type": f.event_type,
            "event_id": f.event_id,
            "attempt": f.attempt,
            "resend_at": time(f.resend_at_ms),
        })),
        "tombstone": record.tombstone,
        "outcome": record.outcome,
        "started_at": rfc3339(record.started_at_ms),
        "updated_at": rfc3339(record.updated_at_ms),
        "history": history,
    })
}

/// The fields of a saga record a list shows; the rest (context, history) is skipped unread.
#[derive(serde::Deserialize)]
struct Listed {
    saga_id: String,
    status: String,
    step_awaited: Option<String>,
    deadline_ms: Option<i64>,
    correlation_id: String,
    outcome: Option<Outcome>,
    started_at_ms: i64,
    updated_at_ms: i64,
    #[serde(default = "first_version")]
    topology_version: u32,
    #[serde(default)]
    tombstone: bool,
}

fn first_version() -> u32 {
    1
}

impl Listed {
    fn matches(&self, filter: &ListFilter) -> bool {
        filter.status.as_ref().is_none_or(|s| *s == self.status)
            && filter
                .step
                .as_ref()
                .is_none_or(|s| self.step_awaited.as_ref() == Some(s))
            && filter
                .correlation_id
                .as_ref()
                .is_none_or(|c| *c == self.correlation_id)
            && filter
                .updated_before_ms
                .is_none_or(|t| self.updated_at_ms <= t)
            && filter
                .updated_after_ms
                .is_none_or(|t| self.updated_at_ms >= t)
    }

    fn json(&self, partition: i32) -> Value {
        json!({
            "saga_id": self.saga_id,
            "partition": partition,
            "status": self.status,
            "step_awaited": self.step_awaited,
            "deadline": self.deadline_ms.map(rfc3339),
            "correlation_id": self.correlation_id,
            "outcome": self.outcome,
            "topology_version": self.topology_version,
            "tombstone": self.tombstone,
            "started_at": rfc3339(self.started_at_ms),
            "updated_at": rfc3339(self.updated_at_ms),
        })
    }
}

/// A list request reads at most this many records in all (over every partition it reads);
/// past it, the page ends early with a cursor, so one request stays short however rare the
/// matches are.
pub const MAX_EXAMINED: usize = 20_000;
/// Keys read from the store per step of a list.
const LIST_CHUNK: usize = 500;

impl SagaLookup for SagaQuery {
    fn topology(&self) -> Value {
        topology_json(&self.def)
    }

    fn counts(&self, partition: i32) -> Result<Option<BTreeMap<String, i64>>, String> {
        let Some(reader) = self.status.reader(partition) else {
            return Ok(None);
        };
        let mut counts = BTreeMap::new();
        for (key, value) in reader
            .prefix(SAGA_STORE, COUNT_PREFIX, 1_000)
            .map_err(|e| e.to_string())?
        {
            let status = String::from_utf8_lossy(&key[COUNT_PREFIX.len()..]).into_owned();
            let n: i64 = serde_json::from_slice(&value).unwrap_or(0);
            if n != 0 {
                counts.insert(status, n);
            }
        }
        Ok(Some(counts))
    }

    fn list(
        &self,
        partition: i32,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<Option<ListPage>, String> {
        let budget = budget.clamp(1, MAX_EXAMINED);
        let Some(reader) = self.status.reader(partition) else {
            return Ok(None);
        };
        let err = |e: crate::state::StateError| e.to_string();
        let indexed = reader
            .get(SAGA_STORE, INDEXED_MARKER)
            .map_err(err)?
            .is_some();
        // With a status asked for and the index complete, only that status's entries are read.
        let (prefix, by_index) = match (&filter.status, indexed) {
            (Some(status), true) => (status_index_prefix(status), true),
            _ => (saga_prefix().to_vec(), false),
        };
        let end = prefix_end(&prefix);
        let mut from = match after {
            // The key right after `after`'s.
            Some(after) => [prefix.as_slice(), after.as_bytes(), b"\0"].concat(),
            None => prefix.clone(),
        };
        let mut sagas = Vec::new();
        let mut examined = 0;
        loop {
            let chunk = reader
                .range(SAGA_STORE, &from, end.as_deref(), LIST_CHUNK)
                .map_err(err)?;
            let exhausted = chunk.len() < LIST_CHUNK;
            for (key, value) in chunk {
                let id = String::from_utf8_lossy(&key[prefix.len()..]).into_owned();
                examined += 1;
                let bytes = if by_index {
                    reader.get(SAGA_STORE, &saga_key(&id)).map_err(err)?
                } else {
                    Some(value)
                };
                // An index entry ahead of its record, or a record that does not decode (it is
                // moved to the quarantine when next touched): not listed.
                let listed = bytes.and_then(|b| super::record::decode_as::<Listed>(&b).ok());
                if let Some(listed) = listed.filter(|l| l.matches(filter)) {
                    sagas.push(listed.json(partition));
                }
                from = [key.as_slice(), b"\0"].concat();
                if sagas.len() >= limit || examined >= budget {
                    return Ok(Some(ListPage {
                        sagas,
                        // Whether more follow is only known by reading on: the next page may
                        // be empty.
                        next_after: Some(id),
                        examined,
                        indexed: by_index,
                    }));
                }
            }
            if exhausted {
                return Ok(Some(ListPage {
                    sagas,
                    next_after: None,
                    examined,
                    indexed: by_index,
                }));
            }
        }
    }

    fn lookup(&self, saga_id: &str) -> Result<Lookup, String> {
        let partitions = self.status.partitions();
        if partitions <= 0 {
            return Ok(Lookup::NotStarted);
        }
        let partition = self.partitioner.partition(saga_id.as_bytes(), partitions);
        let Some(reader) = self.status.reader(partition) else {
            return Ok(Lookup::Elsewhere { partition });
        };
        let get = |key: &[u8]| reader.get(SAGA_STORE, key).map_err(|e| e.to_string());
        if let Some(bytes) = get(&saga_key(saga_id))? {
            return Ok(Lookup::Found(match decode_record(&bytes) {
                Ok(record) => saga_json(&record, partition),
                // Moved to the quarantine by the next event or timer that reads it.
                Err(e) => json!({
                    "saga_id": saga_id,
                    "partition": partition,
                    "status": "UNREADABLE",
                    "error": e.0,
                }),
            }));
        }
        match get(&quarantine_key(saga_id))? {
            Some(bytes) => {
                let note = get(&quarantine_note_key(saga_id))?;
                Ok(Lookup::Found(quarantine_json(
                    saga_id,
                    &bytes,
                    note.as_deref(),
                    partition,
                    usize::MAX,
                )))
            }
            None => Ok(Lookup::Missing { partition }),
        }
    }

    fn quarantine(&self, limit: usize) -> Result<Vec<Value>, String> {
        let mut entries = Vec::new();
        for (partition, reader) in self.status.readers() {
            let left = limit.saturating_sub(entries.len());
            if left == 0 {
                break;
            }
            for (key, bytes) in reader
                .prefix(SAGA_STORE, &quarantine_key(""), left)
                .map_err(|e| e.to_string())?
            {
                let saga_id =
                    String::from_utf8_lossy(&key[quarantine_key("").len()..]).into_owned();
                let note = reader
                    .get(SAGA_STORE, &quarantine_note_key(&saga_id))
                    .map_err(|e| e.to_string())?;
                entries.push(quarantine_json(
                    &saga_id,
                    &bytes,
                    note.as_deref(),
                    partition,
                    LISTED_RECORD_BYTES,
                ));
            }
        }
        Ok(entries)
    }
}

/// How much of each record the quarantine list shows (`/sagas/{id}` shows all of it).
const LISTED_RECORD_BYTES: usize = 1_000;

/// A quarantine entry as the endpoints show it: the record as text (hex when it is not UTF-8),
/// its first `show` bytes.
fn quarantine_json(
    saga_id: &str,
    bytes: &[u8],
    note: Option<&[u8]>,
    partition: i32,
    show: usize,
) -> Value {
    let note = note.and_then(|n| serde_json::from_slice::<QuarantineNote>(n).ok());
    let (record, hex) = match std::str::from_utf8(bytes) {
        Ok(text) => {
            let mut end = text.len().min(show);
            while !text.is_char_boundary(end) {
                end -= 1;
            }
            (text[..end].to_string(), false)
        }
        Err(_) => (
            bytes[..bytes.len().min(show)]
                .iter()
                .map(|b| format!("{b:02x}"))
                .collect(),
            true,
        ),
    };
    json!({
        "saga_id": saga_id,
        "partition": partition,
        "status": QUARANTINED,
        "error": note.as_ref().map(|n| n.error.clone()),
        "quarantined_at": note.as_ref().map(|n| rfc3339(n.at_ms)),
        "record": record,
        "record_is_hex": hex,
        "record_bytes": bytes.len(),
    })
}
