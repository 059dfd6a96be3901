//! The processor API: user logic with lifecycle hooks, and the context the runtime hands it.
//!
//! A processor instance belongs to one task (one partition number). The runtime calls
//! [`Processor::init`] once the task's stores are restored, [`Processor::process`] for each input
//! record in timestamp order, [`Processor::punctuate`] when a scheduled wall-clock punctuation is
//! due, and [`Processor::close`] when the task is revoked or the instance stops.
//!
//! Everything a processor does through the [`ProcessorContext`] (state writes, output records)
//! belongs to the open commit cycle: it becomes visible atomically when the cycle's Kafka
//! transaction commits, or vanishes when it aborts.

use std::time::{Duration, SystemTime};

use crate::state::{prefix_end, Entries, PendingWrites, StateError, StoreBackend};

/// One input record as the runtime hands it to a processor.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InputRecord {
    pub topic: String,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the Unix epoch (the record's create or log-append time).
    pub timestamp_ms: i64,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

impl InputRecord {
    /// Copies a consumed message.
    pub fn from_message<M: rdkafka::message::Message>(m: &M) -> Self {
        use rdkafka::message::Headers;
        let headers = m
            .headers()
            .map(|h| {
                h.iter()
                    .map(|h| (h.key.to_string(), h.value.unwrap_or_default().to_vec()))
                    .collect()
            })
            .unwrap_or_default();
        Self {
            topic: m.topic().to_string(),
            partition: m.partition(),
            offset: m.offset(),
            timestamp_ms: m.timestamp().to_millis().unwrap_or(0),
            key: m.key().map(<[u8]>::to_vec),
            value: m.payload().map(<[u8]>::to_vec),
            headers,
        }
    }

    /// Bytes this record holds (key, value, headers): what input buffers are bounded by.
    pub fn size(&self) -> usize {
        self.key.as_ref().map_or(0, Vec::len)
            + self.value.as_ref().map_or(0, Vec::len)
            + self
                .headers
                .iter()
                .map(|(n, v)| n.len() + v.len())
                .sum::<usize>()
            + 64
    }

    /// The value of the first header named `name`.
    pub fn header(&self, name: &str) -> Option<&[u8]> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_slice())
    }
}

/// A record the processor asks the runtime to produce inside the open transaction.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OutputRecord {
    pub topic: String,
    /// `None` lets the partitioner pick by key (murmur2, as the Java client does).
    pub partition: Option<i32>,
    pub key: Option<Vec<u8>>,
    pub value: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
    /// The record's timestamp (ms since the epoch); `None` lets the producer stamp it when it
    /// is sent.
    pub timestamp_ms: Option<i64>,
}

impl OutputRecord {
    pub fn new(
        topic: impl Into<String>,
        key: impl Into<Vec<u8>>,
        value: impl Into<Vec<u8>>,
    ) -> Self {
        Self {
            topic: topic.into(),
            partition: None,
            key: Some(key.into()),
            value: Some(value.into()),
            headers: Vec::new(),
            timestamp_ms: None,
        }
    }

    pub fn with_timestamp(mut self, timestamp_ms: i64) -> Self {
        self.timestamp_ms = Some(timestamp_ms);
        self
    }

    pub fn with_header(mut self, name: impl Into<String>, value: impl Into<Vec<u8>>) -> Self {
        self.headers.push((name.into(), value.into()));
        self
    }

    pub fn with_partition(mut self, partition: i32) -> Self {
        self.partition = Some(partition);
        self
    }
}

/// A processor failure. The runtime aborts the commit cycle and processes the same records again,
/// so return this only for conditions that can clear up (a dependency that is down); bad input is
/// the processor's to handle (for example by sending it to a dead-letter topic).
#[derive(Debug, thiserror::Error)]
#[error("{0}")]
pub struct ProcessorError(pub String);

impl From<StateError> for ProcessorError {
    fn from(e: StateError) -> Self {
        ProcessorError(e.to_string())
    }
}

/// User logic with lifecycle hooks. One instance per task.
pub trait Processor: Send {
    /// Called once the task's stores are restored, before the first record.
    fn init(&mut self, _ctx: &mut ProcessorContext<'_>) -> Result<(), ProcessorError> {
        Ok(())
    }

    /// Called for each input record of the task, in timestamp order across its input partitions.
    fn process(
        &mut self,
        ctx: &mut ProcessorContext<'_>,
        record: &InputRecord,
    ) -> Result<(), ProcessorError>;

    /// Called when the wall-clock punctuation scheduled with
    /// [`ProcessorContext::schedule_punctuation`] is due, even when no input arrives.
    fn punctuate(
        &mut self,
        _ctx: &mut ProcessorContext<'_>,
        _now: SystemTime,
    ) -> Result<(), ProcessorError> {
        Ok(())
    }

    /// Called when the open commit cycle was aborted: its state writes and outputs are gone, and
    /// the records since the last commit will be processed again. A processor that keeps anything
    /// in memory derived from this cycle's work drops it here.
    fn cycle_aborted(&mut self) {}

    /// Called when the task is closed (revoked, or the instance stops).
    fn close(&mut self) {}
}

/// Builds the processor of a task, given its partition number.
pub type ProcessorSupplier = std::sync::Arc<dyn Fn(i32) -> Box<dyn Processor> + Send + Sync>;

/// The task's stores as a processor sees them: committed data overlaid with this cycle's writes.
pub struct TaskStores<'a> {
    pub(crate) backend: &'a dyn StoreBackend,
    pub(crate) pending: &'a mut std::collections::BTreeMap<String, PendingWrites>,
}

/// What a processor may do while handling a record or a punctuation.
pub struct ProcessorContext<'a> {
    pub(crate) partition: i32,
    pub(crate) stores: TaskStores<'a>,
    pub(crate) outputs: &'a mut Vec<OutputRecord>,
    pub(crate) punctuation: &'a mut Option<Duration>,
    pub(crate) input_time_ms: Option<i64>,
}

impl<'a> ProcessorContext<'a> {
    /// The task's partition number.
    pub fn partition(&self) -> i32 {
        self.partition
    }

    /// The time (ms since the epoch) up to which the task has consumed every one of its input
    /// partitions: on each, it processed a record with a timestamp at or after it (none older
    /// still queued), or its position reached the partition's end (high watermark) as read at
    /// that time. A record appended before it cannot still be on its way. `None` until it is known for every input
    /// (for instance while the brokers do not answer). It only moves forward, except that an
    /// aborted cycle takes back what it consumed.
    ///
    /// Timers that must not fire while an answer may still be waiting unread in an input (a
    /// step timeout) compare their deadline with this, not with the wall clock.
    pub fn input_time_ms(&self) -> Option<i64> {
        self.input_time_ms
    }

    /// The named state store of this task.
    pub fn store(&mut self, name: &str) -> Result<Store<'_>, StateError> {
        let pending = self
            .stores
            .pending
            .get_mut(name)
            .ok_or_else(|| StateError::UnknownStore(name.to_string()))?;
        Ok(Store {
            name: name.to_string(),
            backend: self.stores.backend,
            pending,
        })
    }

    /// Produces `record` inside the open transaction.
    pub fn send(&mut self, record: OutputRecord) {
        self.outputs.push(record);
    }

    /// Asks for [`Processor::punctuate`] every `interval` of wall-clock time (replaces any earlier
    /// schedule of this task).
    pub fn schedule_punctuation(&mut self, interval: Duration) {
        *self.punctuation = Some(interval);
    }
}

/// One named store of a task: reads see this cycle's own writes.
pub struct Store<'a> {
    name: String,
    backend: &'a dyn StoreBackend,
    pending: &'a mut PendingWrites,
}

impl Store<'_> {
    pub fn get(&self, key: &[u8]) -> Result<Option<Vec<u8>>, StateError> {
        match self.pending.lookup(key) {
            Some(change) => Ok(change.clone()),
            None => self.backend.get(&self.name, key),
        }
    }

    pub fn put(&mut self, key: &[u8], value: &[u8]) {
        self.pending.put(key.to_vec(), value.to_vec());
    }

    pub fn delete(&mut self, key: &[u8]) {
        self.pending.delete(key.to_vec());
    }

    /// The first `limit` entries with `from <= key < to` (`to = None`: to the end), in key
    /// order. Only those (plus as many as this cycle deleted in the range) are read: a scan
    /// never loads more than it returns.
    pub fn range(
        &self,
        from: &[u8],
        to: Option<&[u8]>,
        limit: usize,
    ) -> Result<Entries, StateError> {
        let wanted = limit.saturating_add(self.pending.deletes_in(from, to));
        let committed = self.backend.scan(&self.name, from, to, wanted)?;
        Ok(self.pending.merge_scan(committed, from, to, limit))
    }

    /// The first `limit` entries whose key starts with `prefix`, in key order.
    pub fn prefix(&self, prefix: &[u8], limit: usize) -> Result<Entries, StateError> {
        let end = prefix_end(prefix);
        self.range(prefix, end.as_deref(), limit)
    }

    /// Typed read: the value decoded from JSON.
    pub fn get_json<T: serde::de::DeserializeOwned>(
        &self,
        key: &[u8],
    ) -> Result<Option<T>, ProcessorError> {
        match self.get(key)? {
            Some(bytes) => serde_json::from_slice(&bytes).map(Some).map_err(|e| {
                ProcessorError(format!("store '{}': undecodable value: {e}", self.name))
            }),
            None => Ok(None),
        }
    }

    /// Typed write: the value encoded as JSON.
    pub fn put_json<T: serde::Serialize>(
        &mut self,
        key: &[u8],
        value: &T,
    ) -> Result<(), ProcessorError> {
        let bytes = serde_json::to_vec(value).map_err(|e| {
            ProcessorError(format!("store '{}': unencodable value: {e}", self.name))
        })?;
        self.put(key, &bytes);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::MemoryBackend;
    use crate::state::{CommitBatch, StoreBackend};
    use std::collections::BTreeMap;

    #[test]
    fn reads_see_the_cycles_own_writes_over_committed_data() {
        let mut backend = MemoryBackend::new();
        let mut committed = CommitBatch::default();
        committed.changes.insert(
            "s".into(),
            BTreeMap::from([
                (b"k1".to_vec(), Some(b"old".to_vec())),
                (b"k2".to_vec(), Some(b"two".to_vec())),
                (b"x".to_vec(), Some(b"other".to_vec())),
            ]),
        );
        backend.apply(committed).unwrap();

        let mut pending = BTreeMap::from([("s".to_string(), PendingWrites::default())]);
        let mut outputs = Vec::new();
        let mut punctuation = None;
        let mut ctx = ProcessorContext {
            partition: 0,
            stores: TaskStores {
                backend: &backend,
                pending: &mut pending,
            },
            outputs: &mut outputs,
            punctuation: &mut punctuation,
            input_time_ms: None,
        };
        let mut store = ctx.store("s").unwrap();
        store.put(b"k1", b"new");
        store.delete(b"k2");
        store.put(b"k3", b"three");
        assert_eq!(store.get(b"k1").unwrap(), Some(b"new".to_vec()));
        assert_eq!(store.get(b"k2").unwrap(), None);
        let keys: Vec<Vec<u8>> = store
            .prefix(b"k", 10)
            .unwrap()
            .into_iter()
            .map(|(k, _)| k)
            .collect();
        assert_eq!(keys, vec![b"k1".to_vec(), b"k3".to_vec()]);
        assert!(ctx.store("missing").is_err());
        ctx.schedule_punctuation(Duration::from_millis(50));
        ctx.send(OutputRecord::new("t", "k", "v"));
        assert_eq!(punctuation, Some(Duration::from_millis(50)));
        assert_eq!(outputs.len(), 1);
        // Nothing reached the backend: the overlay waits for the commit.
        assert_eq!(backend.get("s", b"k1").unwrap(), Some(b"old".to_vec()));
    }
}
