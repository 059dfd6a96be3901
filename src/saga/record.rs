//! How a [`SagaRecord`] is stored: in RocksDB and, byte for byte, in the changelog.
//!
//! Version 3 (this build writes it) is binary: the bytes `0x00 0x03`, then the record as a
//! MessagePack map (field names kept, so fields can be added with defaults as in JSON). The
//! history is one opaque byte string inside it ([`History`]): a saga's earlier transitions are
//! carried from the stored bytes to the new ones without being decoded, and only the query
//! endpoint reads them. Versions 1 and 2 were JSON (a record starts with `{`); they are read,
//! upgraded, and written back as version 3 on their saga's next change.
//!
//! A record of a later version than this build knows is refused, never half-read (the processor
//! moves it to the quarantine until a build that reads it meets it again).

use std::fmt;

use serde::de::{self, DeserializeOwned, SeqAccess, Visitor};
use serde::{Deserialize, Deserializer, Serialize, Serializer};

use super::machine::{SagaRecord, Transition, MAX_HISTORY, RECORD_VERSION};

/// The first byte of a binary record (a JSON record starts with `{`).
const BINARY_MARK: u8 = 0x00;

/// Why stored bytes are not a record this build can read.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RecordError(pub String);

impl fmt::Display for RecordError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

/// The versions this build can write: 3, and 2 (JSON) for the first pass of a rolling upgrade
/// from a release that reads only JSON records (`run --record-version 2`).
pub const WRITABLE_VERSIONS: [u32; 2] = [2, 3];

/// Encodes a record as version `version` (one of [`WRITABLE_VERSIONS`]).
pub fn encode_as(record: &SagaRecord, version: u32) -> Result<Vec<u8>, RecordError> {
    match version {
        RECORD_VERSION => encode(record),
        2 => {
            // Version 2 is version 3's fields in JSON.
            let mut json = serde_json::to_value(record)
                .map_err(|e| RecordError(format!("unencodable saga record: {e}")))?;
            json["record_version"] = 2.into();
            serde_json::to_vec(&json)
                .map_err(|e| RecordError(format!("unencodable saga record: {e}")))
        }
        other => Err(RecordError(format!(
            "saga records cannot be written as version {other} (only {WRITABLE_VERSIONS:?})"
        ))),
    }
}

/// Encodes a record as the current version.
pub fn encode(record: &SagaRecord) -> Result<Vec<u8>, RecordError> {
    let mut bytes = Vec::with_capacity(512);
    bytes.extend_from_slice(&[BINARY_MARK, RECORD_VERSION as u8]);
    record
        .serialize(&mut rmp_serde::Serializer::new(&mut bytes).with_struct_map())
        .map_err(|e| RecordError(format!("unencodable saga record: {e}")))?;
    Ok(bytes)
}

/// Decodes a stored record of any version this build reads, upgraded to the current one.
pub fn decode(bytes: &[u8]) -> Result<SagaRecord, RecordError> {
    let record: SagaRecord = decode_as(bytes)?;
    if record.record_version > RECORD_VERSION {
        return Err(newer(record.record_version));
    }
    Ok(record.upgrade())
}

/// Decodes the fields of a stored record that `T` names (any version this build reads),
/// skipping the rest: for lists and counts that need a few fields of many records.
pub fn decode_as<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    match split(bytes)? {
        (version, _) if version > RECORD_VERSION => Err(newer(version)),
        (_, body) => decode_body(body),
    }
}

/// As [`decode_as`], also for versions later than this build reads: they keep the field names
/// of the earlier ones (for counting a record it moves to the quarantine).
pub fn decode_fields<T: DeserializeOwned>(bytes: &[u8]) -> Result<T, RecordError> {
    decode_body(split(bytes)?.1)
}

enum Body<'a> {
    Json(&'a [u8]),
    Binary(&'a [u8]),
}

/// The binary version and body of a record (JSON: version 2 or earlier, read from the record).
fn split(bytes: &[u8]) -> Result<(u32, Body<'_>), RecordError> {
    match bytes {
        [BINARY_MARK, version, body @ ..] if *version >= 3 => {
            Ok((u32::from(*version), Body::Binary(body)))
        }
        _ if bytes.trim_ascii_start().starts_with(b"{") => Ok((2, Body::Json(bytes))),
        _ => Err(RecordError(
            "undecodable saga record: neither JSON nor a known binary version".into(),
        )),
    }
}

fn decode_body<T: DeserializeOwned>(body: Body<'_>) -> Result<T, RecordError> {
    match body {
        Body::Json(bytes) => serde_json::from_slice(bytes)
            .map_err(|e| RecordError(format!("undecodable saga record: {e}"))),
        Body::Binary(bytes) => rmp_serde::from_slice(bytes)
            .map_err(|e| RecordError(format!("undecodable saga record: {e}"))),
    }
}

fn newer(version: u32) -> RecordError {
    RecordError(format!(
        "saga record version {version} was written by a newer saga-streams (this one reads up to {RECORD_VERSION})"
    ))
}

/// A saga's transitions, oldest first, at most [`MAX_HISTORY`].
///
/// The entries a record was read with stay encoded (`stored`); the entries added since are kept
/// as values (`fresh`) until the record is written, so the processor can still mark them with
/// the input that caused them and the messages they sent. In a binary record the history is
/// `stored` plus the fresh entries encoded; in JSON (and to the query endpoint) it is the list of
/// transitions.
#[derive(Debug, Clone, Default)]
pub struct History {
    /// Each entry: its length (u32, little-endian), then the transition as a MessagePack array.
    stored: Vec<u8>,
    stored_len: usize,
    fresh: Vec<Transition>,
}

impl History {
    pub fn len(&self) -> usize {
        self.stored_len + self.fresh.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Adds a transition, dropping the oldest once [`MAX_HISTORY`] are kept.
    pub fn push(&mut self, transition: Transition) {
        if self.len() >= MAX_HISTORY {
            self.drop_oldest();
        }
        self.fresh.push(transition);
    }

    pub fn clear(&mut self) {
        *self = Self::default();
    }

    /// The transitions added since the record was read.
    pub fn fresh(&self) -> &[Transition] {
        &self.fresh
    }

    pub fn fresh_mut(&mut self) -> &mut [Transition] {
        &mut self.fresh
    }

    /// The newest transition.
    pub fn last(&self) -> Option<Transition> {
        match self.fresh.last() {
            Some(t) => Some(t.clone()),
            None => self.entries().pop(),
        }
    }

    /// Every transition, oldest first. An entry that does not decode (stored bytes damaged
    /// outside saga-streams) shows as a transition saying so, instead of hiding the others.
    pub fn entries(&self) -> Vec<Transition> {
        let mut out = Vec::with_capacity(self.len());
        let mut rest = self.stored.as_slice();
        while let Some((entry, next)) = split_entry(rest) {
            out.push(decode_entry(entry).unwrap_or_else(|e| Transition {
                at_ms: 0,
                cause: "undecodable".into(),
                event_id: None,
                from: String::new(),
                to: String::new(),
                note: Some(e),
                source: None,
                sent: Vec::new(),
                refused: false,
            }));
            rest = next;
        }
        out.extend(self.fresh.iter().cloned());
        out
    }

    fn drop_oldest(&mut self) {
        match split_entry(&self.stored) {
            Some((entry, _)) => {
                let n = 4 + entry.len();
                self.stored.drain(..n);
                self.stored_len -= 1;
            }
            None if !self.fresh.is_empty() => {
                self.fresh.remove(0);
            }
            None => {}
        }
    }

    fn store(&mut self, transition: &Transition) -> Result<(), String> {
        append_entry(&mut self.stored, transition)?;
        self.stored_len += 1;
        Ok(())
    }

    /// Takes stored bytes, checking that they are whole entries.
    fn from_stored(bytes: Vec<u8>) -> Result<Self, String> {
        let mut count = 0;
        let mut rest = bytes.as_slice();
        while !rest.is_empty() {
            let (_, next) =
                split_entry(rest).ok_or_else(|| "a history entry is cut short".to_string())?;
            rest = next;
            count += 1;
        }
        Ok(Self {
            stored: bytes,
            stored_len: count,
            fresh: Vec::new(),
        })
    }
}

/// Two histories are equal when they hold the same transitions, however they are kept.
impl PartialEq for History {
    fn eq(&self, other: &Self) -> bool {
        self.len() == other.len() && self.entries() == other.entries()
    }
}

/// A transition in a history entry: a positional array (no field names).
type EntryRef<'a> = (
    i64,
    &'a str,
    &'a Option<String>,
    &'a str,
    &'a str,
    &'a Option<String>,
    &'a Option<String>,
    &'a [String],
    bool,
);
type EntryOwned = (
    i64,
    String,
    Option<String>,
    String,
    String,
    Option<String>,
    Option<String>,
    Vec<String>,
    bool,
);

fn append_entry(out: &mut Vec<u8>, t: &Transition) -> Result<(), String> {
    let at = out.len();
    out.extend_from_slice(&[0; 4]);
    let entry: EntryRef<'_> = (
        t.at_ms,
        &t.cause,
        &t.event_id,
        &t.from,
        &t.to,
        &t.note,
        &t.source,
        &t.sent,
        t.refused,
    );
    rmp_serde::encode::write(out, &entry).map_err(|e| e.to_string())?;
    let len = u32::try_from(out.len() - at - 4).map_err(|_| "a history entry is too large")?;
    out[at..at + 4].copy_from_slice(&len.to_le_bytes());
    Ok(())
}

fn split_entry(bytes: &[u8]) -> Option<(&[u8], &[u8])> {
    let (len, rest) = bytes.split_first_chunk::<4>()?;
    let len = usize::try_from(u32::from_le_bytes(*len)).ok()?;
    (rest.len() >= len).then(|| rest.split_at(len))
}

fn decode_entry(entry: &[u8]) -> Result<Transition, String> {
    let (at_ms, cause, event_id, from, to, note, source, sent, refused): EntryOwned =
        rmp_serde::from_slice(entry).map_err(|e| format!("undecodable history entry: {e}"))?;
    Ok(Transition {
        at_ms,
        cause,
        event_id,
        from,
        to,
        note,
        source,
        sent,
        refused,
    })
}

impl Serialize for History {
    fn serialize<S: Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        if serializer.is_human_readable() {
            return self.entries().serialize(serializer);
        }
        if self.fresh.is_empty() {
            return serializer.serialize_bytes(&self.stored);
        }
        let mut bytes = Vec::with_capacity(self.stored.len() + 128 * self.fresh.len());
        bytes.extend_from_slice(&self.stored);
        for t in &self.fresh {
            append_entry(&mut bytes, t).map_err(serde::ser::Error::custom)?;
        }
        serializer.serialize_bytes(&bytes)
    }
}

impl<'de> Deserialize<'de> for History {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        struct HistoryVisitor;

        impl<'de> Visitor<'de> for HistoryVisitor {
            type Value = History;

            fn expecting(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
                f.write_str("a list of transitions or the bytes of a binary history")
            }

            fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<History, A::Error> {
                let mut history = History::default();
                while let Some(t) = seq.next_element::<Transition>()? {
                    history.store(&t).map_err(de::Error::custom)?;
                }
                Ok(history)
            }

            fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<History, E> {
                History::from_stored(bytes.to_vec()).map_err(E::custom)
            }

            fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<History, E> {
                History::from_stored(bytes).map_err(E::custom)
            }
        }

        deserializer.deserialize_any(HistoryVisitor)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn transition(n: i64) -> Transition {
        Transition {
            at_ms: n,
            cause: format!("cause-{n}"),
            event_id: (n % 2 == 0).then(|| format!("event-{n}")),
            from: "PENDING".into(),
            to: "PAID".into(),
            note: (n % 3 == 0).then(|| "a note".into()),
            source: Some(format!("orders/0/{n}")),
            sent: vec!["ReserveInventory".into()],
            refused: n % 5 == 0,
        }
    }

    fn round_trip(history: &History) -> History {
        let bytes = rmp_serde::to_vec_named(history).unwrap();
        rmp_serde::from_slice(&bytes).unwrap()
    }

    #[test]
    fn a_history_keeps_its_entries_through_binary_and_json() {
        let mut history = History::default();
        for n in 0..5 {
            history.push(transition(n));
        }
        let back = round_trip(&history);
        assert_eq!(back.fresh().len(), 0, "read entries stay encoded");
        assert_eq!(back.entries(), (0..5).map(transition).collect::<Vec<_>>());
        let json = serde_json::to_vec(&back).unwrap();
        let from_json: History = serde_json::from_slice(&json).unwrap();
        assert_eq!(from_json, history);
    }

    #[test]
    fn a_history_keeps_the_newest_entries_across_stored_and_fresh() {
        let mut history = History::default();
        for n in 0..(MAX_HISTORY as i64 - 2) {
            history.push(transition(n));
        }
        let mut history = round_trip(&history);
        for n in (MAX_HISTORY as i64 - 2)..(MAX_HISTORY as i64 + 3) {
            history.push(transition(n));
        }
        assert_eq!(history.len(), MAX_HISTORY);
        let entries = round_trip(&history).entries();
        assert_eq!(entries.first().map(|t| t.at_ms), Some(3));
        assert_eq!(
            entries.last().map(|t| t.at_ms),
            Some(MAX_HISTORY as i64 + 2)
        );
    }

    #[test]
    fn cut_history_bytes_are_refused() {
        let mut bytes = Vec::new();
        append_entry(&mut bytes, &transition(1)).unwrap();
        bytes.pop();
        assert!(History::from_stored(bytes).is_err());
    }

    #[test]
    fn version_2_is_written_as_json_that_reads_back_the_same() {
        let mut record: SagaRecord = serde_json::from_slice(
            &std::fs::read(concat!(
                env!("CARGO_MANIFEST_DIR"),
                "/tests/fixtures/saga-record-v2.json"
            ))
            .unwrap(),
        )
        .unwrap();
        record.history.push(transition(7));
        let json = encode_as(&record, 2).unwrap();
        let value: serde_json::Value = serde_json::from_slice(&json).unwrap();
        assert_eq!(value["record_version"], 2);
        assert_eq!(value["history"].as_array().map(Vec::len), Some(5));
        assert_eq!(
            decode(&json).unwrap(),
            decode(&encode(&record).unwrap()).unwrap()
        );
        assert!(encode_as(&record, 1).is_err());
    }

    #[test]
    fn records_of_unknown_encodings_are_refused() {
        let newer = decode(&[BINARY_MARK, RECORD_VERSION as u8 + 1, 0x80]).unwrap_err();
        assert!(newer.0.contains("newer saga-streams"), "{newer}");
        assert!(decode(&[0x01, 0x02]).is_err());
        assert!(decode(&[]).is_err());
    }
}
