//! Restoration: brings a task's stores up to the end of their changelogs, starting from each
//! store's checkpoint (so after a crash only the tail is replayed), with a consumer that has no
//! group and reads `read_committed` (aborted writes are never restored).

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::ClientContext;

use super::config::RuntimeConfig;
use super::error::RuntimeError;
use crate::state::{CommitBatch, StoreBackend};
use crate::telemetry::metrics as m;

/// Records per RocksDB write batch during restoration.
const RESTORE_BATCH: usize = 20_000;
/// How often progress is logged for long restores.
const PROGRESS_EVERY: Duration = Duration::from_secs(2);

/// What one store's restoration did.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RestoreOutcome {
    pub store: String,
    /// The checkpoint restoration started from (`None`: no local state, from the beginning).
    pub from_checkpoint: Option<i64>,
    /// Changelog records applied.
    pub records: u64,
    /// The new checkpoint.
    pub to_offset: i64,
}

/// Context of consumers that read to the end of partitions (restoration, audits, lag checks):
/// end-of-partition is how they know they are done, not an error worth a log line.
pub struct EofContext;

impl ClientContext for EofContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error {
            KafkaError::PartitionEOF(_) => tracing::trace!(reason, "end of partition reached"),
            other => tracing::warn!(error = %other, reason, "consumer error"),
        }
    }
}

impl ConsumerContext for EofContext {}

pub struct Restorer {
    consumer: BaseConsumer<EofContext>,
}

impl Restorer {
    pub fn new(config: &RuntimeConfig) -> Result<Self, RuntimeError> {
        let mut client = ClientConfig::new();
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        client
            .set("bootstrap.servers", &config.bootstrap)
            .set("group.id", format!("{}-restore", config.application_id))
            .set("enable.auto.commit", "false")
            .set("enable.auto.offset.store", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .set("auto.offset.reset", "earliest");
        let consumer = client
            .create_with_context(EofContext)
            .map_err(RuntimeError::kafka("create restore consumer"))?;
        Ok(Self { consumer })
    }

    /// Restores every store of one task into `backend`.
    pub fn restore_task(
        &self,
        config: &RuntimeConfig,
        partition: i32,
        backend: &mut dyn StoreBackend,
    ) -> Result<Vec<RestoreOutcome>, RuntimeError> {
        let mut outcomes = Vec::new();
        for store in &config.stores {
            outcomes.push(self.restore_store(config, store, partition, backend)?);
        }
        Ok(outcomes)
    }

    fn restore_store(
        &self,
        config: &RuntimeConfig,
        store: &str,
        partition: i32,
        backend: &mut dyn StoreBackend,
    ) -> Result<RestoreOutcome, RuntimeError> {
        let topic = config.changelog_topic(store);
        let checkpoint = backend.checkpoint(store)?;
        let start = checkpoint.map_or(Offset::Beginning, Offset::Offset);
        let mut assignment = TopicPartitionList::new();
        assignment
            .add_partition_offset(&topic, partition, start)
            .map_err(RuntimeError::kafka("restore assignment"))?;
        let (_, high) = self
            .consumer
            .fetch_watermarks(&topic, partition, Duration::from_secs(30))
            .map_err(RuntimeError::kafka("changelog watermarks"))?;
        let remaining_gauge = metrics::gauge!(m::RESTORE_REMAINING, "store" => store.to_string(), "partition" => partition.to_string());
        let restored_counter = metrics::counter!(m::RESTORED_RECORDS, "store" => store.to_string());
        if high <= checkpoint.unwrap_or(0) {
            remaining_gauge.set(0.0);
            // Nothing after the checkpoint, or an empty changelog: no need to wait for the
            // consumer to report the end (an offset lookup and a fetch round, ~2 s per task).
            let to_offset = checkpoint.unwrap_or(0);
            if checkpoint != Some(to_offset) {
                let mut batch = CommitBatch::default();
                batch.changes.insert(store.to_string(), BTreeMap::new());
                batch.checkpoints.insert(store.to_string(), to_offset);
                backend.apply(batch)?;
            }
            tracing::info!(
                store, partition, from_checkpoint = ?checkpoint, records = 0, to_offset,
                seconds = 0.0, "restore finished"
            );
            return Ok(RestoreOutcome {
                store: store.to_string(),
                from_checkpoint: checkpoint,
                records: 0,
                to_offset,
            });
        }
        self.consumer
            .assign(&assignment)
            .map_err(RuntimeError::kafka("assign changelog"))?;
        remaining_gauge.set((high - checkpoint.unwrap_or(0)).max(0) as f64);

        let started = Instant::now();
        let mut last_report = started;
        let mut records = 0u64;
        let mut next_offset = checkpoint.unwrap_or(0);
        let mut changes: BTreeMap<Vec<u8>, Option<Vec<u8>>> = BTreeMap::new();
        let flush = |changes: &mut BTreeMap<Vec<u8>, Option<Vec<u8>>>,
                     next_offset: i64,
                     backend: &mut dyn StoreBackend|
         -> Result<(), RuntimeError> {
            let mut batch = CommitBatch::default();
            batch
                .changes
                .insert(store.to_string(), std::mem::take(changes));
            batch.checkpoints.insert(store.to_string(), next_offset);
            backend.apply(batch)?;
            Ok(())
        };
        loop {
            match self.consumer.poll(Duration::from_millis(500)) {
                Some(Ok(message)) => {
                    if let Some(key) = message.key() {
                        changes.insert(key.to_vec(), message.payload().map(<[u8]>::to_vec));
                    }
                    records += 1;
                    restored_counter.increment(1);
                    next_offset = message.offset() + 1;
                    if changes.len() >= RESTORE_BATCH {
                        flush(&mut changes, next_offset, backend)?;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(_))) => break,
                Some(Err(e)) => {
                    tracing::warn!(%topic, partition, error = %e, "changelog read error; retrying");
                }
                None => {}
            }
            if records.is_multiple_of(1024) {
                remaining_gauge.set((high - next_offset).max(0) as f64);
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                last_report = Instant::now();
                let rate = records as f64 / started.elapsed().as_secs_f64();
                tracing::info!(
                    store,
                    partition,
                    restored = records,
                    remaining = (high - next_offset).max(0),
                    rate = rate as u64,
                    "restoring"
                );
            }
        }
        // The position is past any transaction markers at the end: the next restore starts there.
        if let Ok(position) = self.consumer.position() {
            if let Some(Offset::Offset(at)) = position
                .find_partition(&topic, partition)
                .map(|p| p.offset())
            {
                next_offset = next_offset.max(at);
            }
        }
        if records > 0 || checkpoint != Some(next_offset) {
            flush(&mut changes, next_offset, backend)?;
        }
        remaining_gauge.set(0.0);
        self.consumer
            .unassign()
            .map_err(RuntimeError::kafka("unassign changelog"))?;
        tracing::info!(
            store, partition, from_checkpoint = ?checkpoint, records, to_offset = next_offset,
            seconds = started.elapsed().as_secs_f64(), "restore finished"
        );
        Ok(RestoreOutcome {
            store: store.to_string(),
            from_checkpoint: checkpoint,
            records,
            to_offset: next_offset,
        })
    }
}
