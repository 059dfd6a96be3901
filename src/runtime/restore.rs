//! Restoration: brings a task's stores up to the end of their changelogs, starting from each
//! store's checkpoint (so after a crash only the tail is replayed), with a consumer that has no
//! group and reads `read_committed` (aborted writes are never restored).

use std::collections::{BTreeMap, HashMap};
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

/// Records per RocksDB write batch during restoration, at most.
const RESTORE_BATCH: usize = 20_000;
/// Bytes buffered per changelog partition before they are written, at most: memory stays bounded
/// however many partitions restore at once.
const RESTORE_BATCH_BYTES: usize = 4 << 20;
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
            KafkaError::PartitionEOF(_)
            | KafkaError::Global(rdkafka::types::RDKafkaErrorCode::PartitionEOF) => {
                tracing::trace!(reason, "end of partition reached")
            }
            other => tracing::warn!(error = %other, reason, "consumer error"),
        }
    }
}

impl ConsumerContext for EofContext {}

pub struct Restorer {
    consumer: BaseConsumer<EofContext>,
}

/// Bound on each watermark lookup while a restoration starts.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(10);
/// A restoration that reads no record and reaches no end for this long counts as stuck. Longer
/// than a transaction left open on a changelog by a crashed instance can hold its end back.
const RESTORE_STALL_LIMIT: Duration = Duration::from_secs(120);

/// A restoration in progress: the stores of some tasks being brought up to the end of their
/// changelogs, a slice at a time ([`Restorer::step`]), so the stream thread keeps polling its
/// consumer, processing its running tasks and committing between slices, and sees SIGTERM.
/// Each written batch carries its checkpoint, so a restoration dropped half-way (revoke,
/// shutdown, failure) loses nothing: the next one starts where it ended.
pub struct Restoration<B> {
    /// The tasks being restored: partition number and backend.
    pub tasks: Vec<(i32, B)>,
    pending: Vec<Pending>,
    index: HashMap<(String, i32), usize>,
    started: Instant,
    last_report: Instant,
    /// When a record was last read or a partition finished.
    last_progress: Instant,
    /// What finished restorations did, for the log and tests.
    pub outcomes: Vec<RestoreOutcome>,
}

impl<B> Restoration<B> {
    /// Partition numbers of the tasks being restored.
    pub fn partitions(&self) -> impl Iterator<Item = i32> + '_ {
        self.tasks.iter().map(|(p, _)| *p)
    }

    pub fn is_done(&self) -> bool {
        self.pending.iter().all(|p| p.done)
    }
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
            .set("auto.offset.reset", "earliest")
            // The end of a partition is known after an empty fetch: do not let the broker hold
            // it for the default 500 ms.
            .set("fetch.wait.max.ms", "50")
            // Prefetch at most 32 MiB (the default, 64 MiB, is per consumer plus what RocksDB
            // batches hold).
            .set("queued.max.messages.kbytes", "32768");
        let consumer = client
            .create_with_context(EofContext)
            .map_err(RuntimeError::kafka("create restore consumer"))?;
        Ok(Self { consumer })
    }

    /// Starts restoring every store of the given tasks, all changelog partitions at once (one
    /// assignment, so the fetches and the end-of-partition waits overlap instead of adding up).
    /// A store whose checkpoint lies beyond the end of its changelog (the topic was deleted and
    /// created again) belongs to another history: its task's stores are wiped and restored from
    /// the beginning, as Kafka Streams does.
    pub fn begin<B: StoreBackend>(
        &self,
        config: &RuntimeConfig,
        mut tasks: Vec<(i32, B)>,
    ) -> Result<Restoration<B>, RuntimeError> {
        let mut outcomes = Vec::new();
        let mut pending: Vec<Pending> = Vec::new();
        let mut assignment = TopicPartitionList::new();
        for (index, (partition, backend)) in tasks.iter_mut().enumerate() {
            let mut ends = Vec::with_capacity(config.stores.len());
            for store in &config.stores {
                let topic = config.changelog_topic(store);
                let (low, high) = self
                    .consumer
                    .fetch_watermarks(&topic, *partition, WATERMARKS_TIMEOUT)
                    .map_err(RuntimeError::kafka("changelog watermarks"))?;
                ends.push((store, topic, low, high, backend.checkpoint(store)?));
            }
            // A checkpoint outside the changelog's records: beyond its end (the topic was
            // recreated), or before its start (retention deleted records after the checkpoint,
            // tombstones included, so replaying from the start onto the old state could bring
            // deleted keys back). Either way the store belongs to another history.
            if let Some((store, topic, low, high, Some(checkpoint))) =
                ends.iter().find(|(_, _, low, high, checkpoint)| {
                    checkpoint.is_some_and(|c| c > *high || (c < *low && *low > 0))
                })
            {
                tracing::warn!(
                    store = %store, partition = *partition, checkpoint, changelog_start = low,
                    changelog_end = high, changelog = %topic,
                    "checkpoint outside the changelog (topic recreated, or records deleted by retention); wiping the task's state and restoring it from the beginning"
                );
                backend.wipe()?;
                for end in &mut ends {
                    end.4 = None;
                }
            }
            for (store, topic, low, high, checkpoint) in ends {
                let gauge = metrics::gauge!(m::RESTORE_REMAINING, "store" => store.to_string(), "partition" => partition.to_string());
                // Registered even when nothing is restored, so the series exists from the start.
                let counter = metrics::counter!(m::RESTORED_RECORDS, "store" => store.to_string());
                if high <= checkpoint.unwrap_or(0).max(low) {
                    // Nothing after the checkpoint, or no record left in the changelog (empty,
                    // or all deleted): no need to wait for the consumer to report the end (it
                    // has no position to report when it read nothing).
                    gauge.set(0.0);
                    let to_offset = checkpoint.unwrap_or(0).max(high);
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
                    outcomes.push(RestoreOutcome {
                        store: store.to_string(),
                        from_checkpoint: checkpoint,
                        records: 0,
                        to_offset,
                    });
                    continue;
                }
                gauge.set((high - checkpoint.unwrap_or(0)).max(0) as f64);
                assignment
                    .add_partition_offset(
                        &topic,
                        *partition,
                        checkpoint.map_or(Offset::Beginning, Offset::Offset),
                    )
                    .map_err(RuntimeError::kafka("restore assignment"))?;
                pending.push(Pending {
                    task: index,
                    store: store.clone(),
                    topic,
                    partition: *partition,
                    checkpoint,
                    high,
                    next_offset: checkpoint.unwrap_or(0),
                    records: 0,
                    changes: BTreeMap::new(),
                    bytes: 0,
                    done: false,
                    gauge,
                    counter,
                });
            }
        }
        if !pending.is_empty() {
            self.consumer
                .assign(&assignment)
                .map_err(RuntimeError::kafka("assign changelogs"))?;
        }
        let index = pending
            .iter()
            .enumerate()
            .map(|(i, p)| ((p.topic.clone(), p.partition), i))
            .collect();
        Ok(Restoration {
            tasks,
            pending,
            index,
            started: Instant::now(),
            last_report: Instant::now(),
            last_progress: Instant::now(),
            outcomes,
        })
    }

    /// Restores for up to `slice`; returns whether every store has reached its end (then the
    /// restoration is finished: buffers written, changelogs unassigned).
    pub fn step<B: StoreBackend>(
        &self,
        restoration: &mut Restoration<B>,
        slice: Duration,
    ) -> Result<bool, RuntimeError> {
        let until = Instant::now() + slice;
        let Restoration {
            tasks,
            pending,
            index,
            started,
            last_report,
            last_progress,
            outcomes,
        } = restoration;
        let mut now = Instant::now();
        while pending.iter().any(|p| !p.done) && now < until {
            let wait = until
                .saturating_duration_since(now)
                .min(Duration::from_millis(100));
            let polled = self.consumer.poll(wait);
            // One clock read per record: it showed in the restore profile.
            now = Instant::now();
            match polled {
                Some(Ok(message)) => {
                    let Some(&i) = index.get(&(message.topic().to_string(), message.partition()))
                    else {
                        continue;
                    };
                    let p = &mut pending[i];
                    if let Some(key) = message.key() {
                        let value = message.payload().map(<[u8]>::to_vec);
                        p.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                        p.changes.insert(key.to_vec(), value);
                    }
                    *last_progress = now;
                    p.records += 1;
                    p.counter.increment(1);
                    p.next_offset = message.offset() + 1;
                    if p.records.is_multiple_of(1024) {
                        p.gauge.set((p.high - p.next_offset).max(0) as f64);
                    }
                    if p.changes.len() >= RESTORE_BATCH || p.bytes >= RESTORE_BATCH_BYTES {
                        p.flush(&mut tasks[p.task].1)?;
                    }
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // The error names the partition, not the topic: a changelog partition is
                    // done once the position reached the end seen at the start.
                    let position = self
                        .consumer
                        .position()
                        .map_err(RuntimeError::kafka("restore position"))?;
                    for p in pending
                        .iter_mut()
                        .filter(|p| p.partition == partition && !p.done)
                    {
                        let at = position
                            .find_partition(&p.topic, p.partition)
                            .map(|e| e.offset());
                        if !matches!(at, Some(Offset::Offset(_))) && p.records == 0 {
                            // Nothing read, so no position: the records may all be gone
                            // (deleted by retention since the start). Then there is nothing to
                            // wait for.
                            if let Ok((low, _)) = self.consumer.fetch_watermarks(
                                &p.topic,
                                p.partition,
                                WATERMARKS_TIMEOUT,
                            ) {
                                if low >= p.high {
                                    p.next_offset = p.next_offset.max(p.high);
                                    p.done = true;
                                    *last_progress = Instant::now();
                                }
                            }
                        }
                        if let Some(Offset::Offset(at)) = at {
                            if at < p.high {
                                // Short of the end seen at the start: an open transaction that
                                // has yet to end (wait for it), or a changelog truncated since
                                // (its end moved back: take the new end, or this never ends).
                                if let Ok((_, high)) = self.consumer.fetch_watermarks(
                                    &p.topic,
                                    p.partition,
                                    WATERMARKS_TIMEOUT,
                                ) {
                                    if high < p.high {
                                        tracing::warn!(changelog = %p.topic, partition = p.partition, was = p.high, now = high, "changelog end moved back during restoration");
                                        p.high = high;
                                    }
                                }
                            }
                            if at >= p.high {
                                // Past any transaction markers at the end: the next restore
                                // starts there.
                                p.next_offset = p.next_offset.max(at);
                                p.done = true;
                                *last_progress = Instant::now();
                            }
                        }
                    }
                }
                Some(Err(e)) => {
                    tracing::warn!(error = %e, "changelog read error; retrying");
                }
                None => {}
            }
            if last_progress.elapsed() >= RESTORE_STALL_LIMIT {
                // No record and no end for this long: the restore consumer may be stuck (a
                // changelog partition whose leader it never learns again); new clients are the
                // way out, and the tasks must not wait paused forever meanwhile.
                return Err(RuntimeError::ClientStuck(format!(
                    "restoration read nothing for {} s",
                    RESTORE_STALL_LIMIT.as_secs()
                )));
            }
            if last_report.elapsed() >= PROGRESS_EVERY {
                *last_report = Instant::now();
                let restored: u64 = pending.iter().map(|p| p.records).sum();
                let remaining: i64 = pending
                    .iter()
                    .map(|p| (p.high - p.next_offset).max(0))
                    .sum();
                tracing::info!(
                    restored,
                    remaining,
                    rate = (restored as f64 / started.elapsed().as_secs_f64()) as u64,
                    "restoring"
                );
            }
        }
        if pending.iter().any(|p| !p.done) {
            return Ok(false);
        }
        if !pending.is_empty() {
            self.consumer
                .unassign()
                .map_err(RuntimeError::kafka("unassign changelogs"))?;
        }
        for p in pending.iter_mut() {
            if p.records > 0 || p.checkpoint != Some(p.next_offset) {
                p.flush(&mut tasks[p.task].1)?;
            }
        }
        // Restored batches skipped the WAL: on disk before the tasks write through it again.
        for (_, backend) in tasks.iter_mut() {
            backend.persist()?;
        }
        for p in pending.drain(..) {
            p.gauge.set(0.0);
            tracing::info!(
                store = %p.store, partition = p.partition, from_checkpoint = ?p.checkpoint,
                records = p.records, to_offset = p.next_offset,
                seconds = started.elapsed().as_secs_f64(), "restore finished"
            );
            outcomes.push(RestoreOutcome {
                store: p.store,
                from_checkpoint: p.checkpoint,
                records: p.records,
                to_offset: p.next_offset,
            });
        }
        Ok(true)
    }

    /// Drops a restoration before its end (its tasks were revoked, or it failed). What it wrote
    /// stays, with its checkpoints (flushed here; if that fails, the next restore reads again
    /// what was lost, as after a crash).
    pub fn cancel<B: StoreBackend>(&self, mut restoration: Restoration<B>) {
        for (partition, backend) in restoration.tasks.iter_mut() {
            if let Err(e) = backend.persist() {
                tracing::warn!(task = *partition, error = %e, "flushing a cancelled restoration failed; its next restore reads from the last flushed checkpoint");
            }
        }
        if restoration.pending.iter().any(|p| !p.done) {
            if let Err(e) = self.consumer.unassign() {
                tracing::warn!(error = %e, "unassigning changelogs after a cancelled restoration failed");
            }
        }
        for p in &restoration.pending {
            p.gauge.set(0.0);
        }
        tracing::info!(
            tasks = restoration.tasks.len(),
            "restoration stopped before its end; it resumes from the last written checkpoint"
        );
    }
}

/// One changelog partition being restored.
struct Pending {
    /// Index of its task in the call's task list.
    task: usize,
    store: String,
    topic: String,
    partition: i32,
    checkpoint: Option<i64>,
    /// The end offset when restoration started.
    high: i64,
    next_offset: i64,
    records: u64,
    changes: BTreeMap<Vec<u8>, Option<Vec<u8>>>,
    /// Bytes held in `changes`.
    bytes: usize,
    done: bool,
    gauge: metrics::Gauge,
    counter: metrics::Counter,
}

impl Pending {
    /// Writes the buffered changes with the checkpoint after them, in one batch.
    fn flush<B: StoreBackend>(&mut self, backend: &mut B) -> Result<(), RuntimeError> {
        fail::fail_point!("restore-batch", |_| Err(RuntimeError::State(
            super::failpoints::disk_full(&format!("restore of {}", self.topic))
        )));
        let mut batch = CommitBatch::default();
        batch
            .changes
            .insert(self.store.clone(), std::mem::take(&mut self.changes));
        self.bytes = 0;
        batch
            .checkpoints
            .insert(self.store.clone(), self.next_offset);
        backend.apply_restored(batch)?;
        Ok(())
    }
}
