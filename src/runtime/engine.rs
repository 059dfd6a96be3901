//! The engine of one stream thread: the running tasks, the producer and the commit cycle.
//!
//! It is shared between the poll loop and the consumer's rebalance callbacks (which run inside
//! `poll`, on the same thread) through a mutex that the loop never holds while polling.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::config::RDKafkaLogLevel;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::{ClientContext, Message};

use super::config::{Guarantee, RuntimeConfig};
use super::error::{on_commit_error, CommitDecision, ErrorClass, RuntimeError};
use super::input_ends::InputEndsTracker;
use super::processor::{InputRecord, OutputRecord, ProcessorSupplier};
use super::restore::{Restoration, Restorer};
use super::standby::Standbys;
use super::stream_thread::Shutdown;
use super::task::Task;
use super::watchdog::Watchdog;
use crate::state::rocks::{RocksBackend, RocksResources};
use crate::telemetry::metrics as m;

/// Commit latency samples kept for the shutdown summary (hours of commits at 10 per second).
const MAX_COMMIT_SAMPLES: usize = 100_000;

/// Delivery bookkeeping: the last offset written to each changelog partition, and failures
/// (drained by every commit and abort, so it stays bounded). Reports belong to a cycle epoch:
/// an abort purges the producer's queue, and the purge reports that arrive afterwards belong to
/// the dropped cycle, not to the next one.
#[derive(Default)]
pub struct Deliveries {
    /// The epoch of the open cycle; bumped by every abort.
    epoch: AtomicUsize,
    /// (store index, partition) -> highest delivered offset in the open cycle
    changelog: Mutex<HashMap<(usize, i32), i64>>,
    failures: Mutex<Vec<String>>,
    /// An output topic the cluster refused to let the producer write (Write ACL missing while
    /// Describe is granted): no retry can fix that.
    write_refused: Mutex<Option<String>>,
}

/// Bits of a delivery opaque that hold the store index + 1 (0 for outputs); the rest hold the
/// cycle epoch.
const OPAQUE_STORE_BITS: u32 = 16;

impl Deliveries {
    fn opaque(&self, store: usize) -> usize {
        (self.epoch.load(Ordering::Relaxed) << OPAQUE_STORE_BITS) | store
    }
}

/// Producer context: records changelog delivery offsets and failures of the open cycle.
pub struct EngineProducerContext {
    pub deliveries: Arc<Deliveries>,
}

impl ClientContext for EngineProducerContext {
    /// librdkafka's log, as rdkafka forwards it by default, watching for one thing it reports
    /// nowhere else: a partition the transaction coordinator refused to add because the topic
    /// may not be written (the delivery reports then only say "purged").
    fn log(&self, level: RDKafkaLogLevel, fac: &str, message: &str) {
        if fac == "ADDPARTS" && message.contains("Topic authorization failed") {
            let topic = message.split('"').nth(1).unwrap_or("an output topic");
            if let Ok(mut refused) = self.deliveries.write_refused.lock() {
                refused.get_or_insert_with(|| topic.to_string());
            }
        }
        match level {
            RDKafkaLogLevel::Emerg
            | RDKafkaLogLevel::Alert
            | RDKafkaLogLevel::Critical
            | RDKafkaLogLevel::Error => {
                tracing::error!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Warning => {
                tracing::warn!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Notice | RDKafkaLogLevel::Info => {
                tracing::info!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
            RDKafkaLogLevel::Debug => {
                tracing::debug!(target: "librdkafka", "librdkafka: {fac} {message}")
            }
        }
    }
}

impl ProducerContext for EngineProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        let epoch = opaque >> OPAQUE_STORE_BITS;
        if epoch
            != self.deliveries.epoch.load(Ordering::Relaxed) & (usize::MAX >> OPAQUE_STORE_BITS)
        {
            // A report of a cycle that was aborted (its messages purged).
            return;
        }
        let store = opaque & ((1 << OPAQUE_STORE_BITS) - 1);
        match result {
            Ok(message) if store > 0 => {
                if let Ok(mut map) = self.deliveries.changelog.lock() {
                    let entry = map.entry((store - 1, message.partition())).or_insert(-1);
                    *entry = (*entry).max(message.offset());
                }
            }
            Ok(_) => {}
            Err((error, message)) => {
                // Without transactions the report itself says the topic may not be written.
                if error.rdkafka_error_code() == Some(RDKafkaErrorCode::TopicAuthorizationFailed) {
                    if let Ok(mut refused) = self.deliveries.write_refused.lock() {
                        refused.get_or_insert_with(|| message.topic().to_string());
                    }
                }
                if let Ok(mut failures) = self.deliveries.failures.lock() {
                    failures.push(format!(
                        "{} [{}]: {error}",
                        message.topic(),
                        message.partition()
                    ));
                }
            }
        }
    }
}

pub type EngineProducer = ThreadedProducer<EngineProducerContext>;

/// Where the producer's transaction stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Txn {
    /// No transaction open.
    Idle,
    /// A transaction is open and may hold writes of this cycle.
    Open,
    /// The cycle was dropped but its transaction is not aborted yet (the abort failed or has not
    /// been tried): nothing may be produced until it is.
    NeedsAbort,
}

/// Timeout of each transactional call; calls that time out are retried (librdkafka resumes
/// them), so shutdown is seen between attempts.
const TXN_CALL_TIMEOUT: Duration = Duration::from_secs(5);
/// How long a commit whose outcome is unknown is retried before the thread gives up on it and
/// rebuilds (Kafka Streams' `max.block.ms`).
const COMMIT_RETRY_FOR: Duration = Duration::from_secs(60);
/// How long a transactional call may take, its own timeout included, before the client counts
/// as stuck (see [`Watchdog`]).
const CALL_LIMIT: Duration = Duration::from_secs(30);
/// Timeout of the consumer calls a task start and a rewind make.
const CONSUMER_CALL_TIMEOUT: Duration = Duration::from_secs(10);
/// Failed rewinds in a row after which the consumer and producer are rebuilt.
const REWIND_ATTEMPTS: u32 = 3;
/// Failed task starts in a row (over about half a minute of growing pauses) after which the
/// consumers and producer are rebuilt.
const START_FAILURES_BEFORE_REBUILD: u32 = 8;
/// Time given to restoration per loop turn, between polls of the group consumer.
const RESTORE_SLICE: Duration = Duration::from_millis(200);

/// The tasks of one stream thread and what they have produced in the open cycle.
pub struct Engine {
    pub config: Arc<RuntimeConfig>,
    supplier: ProcessorSupplier,
    resources: RocksResources,
    /// Shared with the watchdog's worker, which makes the blocking transactional calls.
    producer: Arc<EngineProducer>,
    watchdog: Watchdog,
    deliveries: Arc<Deliveries>,
    restorer: Restorer,
    shutdown: Shutdown,
    pub tasks: BTreeMap<i32, Task>,
    /// Input partitions assigned to this instance, by partition number.
    pub assigned: BTreeMap<i32, BTreeSet<String>>,
    /// When each partition number was assigned (ms since the epoch): while its task is not
    /// running yet (restoring), its input waits at least since then (the lag in time).
    pub assigned_at: BTreeMap<i32, i64>,
    /// Assigned input partitions not resumed since their assignment: their fetcher may not
    /// have started, so a seek on them may fail harmlessly (they start at the committed offset).
    fresh: BTreeSet<(String, i32)>,
    /// Input partitions paused because their task's queue is full (back-pressure).
    backpressured: BTreeSet<(String, i32)>,
    /// Tasks being restored, a slice per loop turn.
    restoring: Option<Restoration<RocksBackend>>,
    txn: Txn,
    /// Set by an abort: the inputs must be sought back to the committed positions before any
    /// record is processed (DESIGN.md 12.1).
    rewind_pending: bool,
    /// Rewinds that failed in a row.
    rewind_failures: u32,
    /// Since when the open transaction's abort keeps failing.
    abort_failing_since: Option<Instant>,
    /// Since when `send_offsets_to_transaction` has failed without a success in between.
    send_offsets_failing_since: Option<Instant>,
    /// Task starts (restorations) that failed in a row, and when to try again.
    start_failures: u32,
    start_retry_at: Option<Instant>,
    cycle_started: Instant,
    records_in_cycle: usize,
    outputs: Vec<OutputRecord>,
    /// A failure met inside a rebalance callback, for the loop to act on after `poll`.
    pub failure: Option<RuntimeError>,
    /// Set once the producer is fenced or fatally broken: no more commits from this engine.
    pub broken: bool,
    /// Durations of the commits that carried work (bounded), summarised in the log at shutdown.
    commit_latencies: Vec<Duration>,
    /// Metric handles by topic, so the hot path does not build labels per record.
    consumed: HashMap<String, metrics::Counter>,
    produced: HashMap<String, metrics::Counter>,
    process_latency: metrics::Histogram,
    /// How far the tasks have consumed their inputs, in time (for timers in input time).
    input_ends: InputEndsTracker,
    /// Standby stores this instance keeps; a task assigned here takes its standby's store.
    standbys: Standbys,
}

fn topic_counter<'a>(
    cache: &'a mut HashMap<String, metrics::Counter>,
    name: &'static str,
    topic: &str,
) -> &'a metrics::Counter {
    if !cache.contains_key(topic) {
        let counter = metrics::counter!(name, "topic" => topic.to_string());
        cache.insert(topic.to_string(), counter);
    }
    // Inserted just above when missing.
    &cache[topic]
}

/// Sleeps up to `pause`, in short steps; returns false (early) when shutdown is requested.
pub fn sleep_unless_shutdown(shutdown: &Shutdown, pause: Duration) -> bool {
    let until = Instant::now() + pause;
    loop {
        if shutdown.requested() {
            return false;
        }
        let left = until.saturating_duration_since(Instant::now());
        if left.is_zero() {
            return true;
        }
        std::thread::sleep(left.min(Duration::from_millis(20)));
    }
}

impl Engine {
    pub fn new(
        config: Arc<RuntimeConfig>,
        supplier: ProcessorSupplier,
        resources: RocksResources,
        standbys: Standbys,
        shutdown: Shutdown,
    ) -> Result<Self, RuntimeError> {
        let deliveries = Arc::new(Deliveries::default());
        let mut client = ClientConfig::new();
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        client
            .set("bootstrap.servers", &config.bootstrap)
            .set("enable.idempotence", "true")
            .set("linger.ms", "5")
            .set("queue.buffering.max.messages", "1000000")
            .set("partitioner", &config.partitioner);
        if config.guarantee == Guarantee::ExactlyOnce {
            client
                .set("transactional.id", config.transactional_id())
                .set(
                    "transaction.timeout.ms",
                    config.transaction_timeout.as_millis().to_string(),
                );
        }
        let producer: Arc<EngineProducer> = Arc::new(
            client
                .create_with_context(EngineProducerContext {
                    deliveries: deliveries.clone(),
                })
                .map_err(RuntimeError::kafka("create producer"))?,
        );
        let watchdog = Watchdog::new("txn-calls")?;
        if config.guarantee == Guarantee::ExactlyOnce {
            // Fences any older incarnation with the same transactional id and aborts its open
            // transaction. Called again while the coordinator does not answer (a broker
            // restarting): librdkafka resumes the same initialisation.
            let deadline = Instant::now() + COMMIT_RETRY_FOR;
            loop {
                let call = producer.clone();
                let Err(error) = watchdog
                    .run("init transactions", CALL_LIMIT, &shutdown, move || {
                        call.init_transactions(TXN_CALL_TIMEOUT)
                    })?
                    .map_err(RuntimeError::kafka("init transactions"))
                else {
                    break;
                };
                if error.class() == ErrorClass::Fatal || Instant::now() >= deadline {
                    return Err(error);
                }
                tracing::warn!(error = %error, "transaction coordinator not answering yet; retrying");
                if !sleep_unless_shutdown(&shutdown, Duration::from_millis(500)) {
                    return Err(RuntimeError::Interrupted("initialising transactions"));
                }
            }
        }
        let restorer = Restorer::new(&config)?;
        let input_ends = InputEndsTracker::start(&config, &shutdown)?;
        Ok(Self {
            config,
            supplier,
            resources,
            producer,
            watchdog,
            deliveries,
            restorer,
            shutdown,
            tasks: BTreeMap::new(),
            assigned: BTreeMap::new(),
            assigned_at: BTreeMap::new(),
            fresh: BTreeSet::new(),
            backpressured: BTreeSet::new(),
            restoring: None,
            txn: Txn::Idle,
            rewind_pending: false,
            rewind_failures: 0,
            abort_failing_since: None,
            send_offsets_failing_since: None,
            start_failures: 0,
            start_retry_at: None,
            cycle_started: Instant::now(),
            records_in_cycle: 0,
            outputs: Vec::new(),
            failure: None,
            broken: false,
            commit_latencies: Vec::new(),
            consumed: HashMap::new(),
            produced: HashMap::new(),
            process_latency: metrics::histogram!(m::PROCESS_LATENCY),
            input_ends,
            standbys,
        })
    }

    fn exactly_once(&self) -> bool {
        self.config.guarantee == Guarantee::ExactlyOnce
    }

    fn ensure_transaction(&mut self) -> Result<(), RuntimeError> {
        if !self.exactly_once() {
            return Ok(());
        }
        match self.txn {
            Txn::Open => Ok(()),
            Txn::NeedsAbort => Err(RuntimeError::Group(
                "the previous transaction is not aborted yet".to_string(),
            )),
            Txn::Idle => {
                self.producer
                    .begin_transaction()
                    .map_err(RuntimeError::kafka("begin transaction"))?;
                self.txn = Txn::Open;
                Ok(())
            }
        }
    }

    fn send(&mut self, record: &OutputRecord, opaque: usize) -> Result<(), RuntimeError> {
        self.ensure_transaction()?;
        send_record(
            &self.producer,
            record,
            self.deliveries.opaque(opaque),
            self.config.transaction_timeout,
            &self.shutdown,
        )?;
        if opaque == 0 {
            topic_counter(&mut self.produced, m::RECORDS_PRODUCED, &record.topic).increment(1);
        }
        Ok(())
    }

    fn flush_outputs(&mut self) -> Result<(), RuntimeError> {
        if self.outputs.is_empty() {
            return Ok(());
        }
        let outputs = std::mem::take(&mut self.outputs);
        for record in &outputs {
            self.send(record, 0)?;
        }
        self.outputs = outputs;
        self.outputs.clear();
        Ok(())
    }

    /// The newest high watermark of input `topic` [`partition`] the brokers answered.
    pub fn input_end(&self, topic: &str, partition: i32) -> Option<i64> {
        self.input_ends
            .latest_end(topic, partition)
            .map(|e| e.offset)
    }

    /// Whether input `topic` [`partition`] is paused because its task's queue is full.
    pub fn is_backpressured(&self, topic: &str, partition: i32) -> bool {
        self.backpressured
            .iter()
            .any(|(t, p)| t == topic && *p == partition)
    }

    /// True while an aborted cycle still has to be cleaned up (its transaction aborted, its
    /// inputs rewound): no record is processed and nothing committed until [`Engine::recover`]
    /// succeeds.
    pub fn recovery_pending(&self) -> bool {
        self.txn == Txn::NeedsAbort || self.rewind_pending
    }

    /// Hands a polled record to its task, pausing the record's partition once the task holds
    /// `max_buffered_bytes` of it. A record of a partition without a running task is dropped:
    /// it is fetched again from the committed offset when the task starts. Records polled while
    /// a rewind is pending are dropped too: the rewind fetches them again.
    pub fn enqueue<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        record: InputRecord,
    ) -> Result<(), RuntimeError> {
        if self.rewind_pending {
            return Ok(());
        }
        let Some(task) = self.tasks.get_mut(&record.partition) else {
            tracing::debug!(topic = %record.topic, partition = record.partition, "record for a task not running");
            return Ok(());
        };
        let (topic, partition) = (record.topic.clone(), record.partition);
        let queued = task.enqueue(record);
        if queued >= self.config.max_buffered_bytes
            && self.backpressured.insert((topic.clone(), partition))
        {
            let mut list = TopicPartitionList::new();
            list.add_partition(&topic, partition);
            consumer
                .pause(&list)
                .map_err(RuntimeError::kafka("pause a full input"))?;
            tracing::debug!(topic = %topic, partition, queued, "input paused: its task's queue is full");
        }
        Ok(())
    }

    /// Resumes paused inputs whose task has worked its queue down to half the bound.
    pub fn relieve_backpressure<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        if self.backpressured.is_empty() || self.rewind_pending {
            return Ok(());
        }
        let limit = self.config.max_buffered_bytes / 2;
        let relieved: Vec<(String, i32)> = self
            .backpressured
            .iter()
            .filter(|(topic, partition)| {
                self.tasks
                    .get(partition)
                    .is_none_or(|t| t.queued_bytes(topic) <= limit)
            })
            .cloned()
            .collect();
        self.resume_partitions(consumer, &relieved)
    }

    fn resume_partitions<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &[(String, i32)],
    ) -> Result<(), RuntimeError> {
        let mut list = TopicPartitionList::new();
        for (topic, partition) in partitions {
            if self.tasks.contains_key(partition) {
                list.add_partition(topic, *partition);
            }
        }
        if list.count() > 0 {
            consumer
                .resume(&list)
                .map_err(RuntimeError::kafka("resume inputs"))?;
        }
        for key in partitions {
            self.backpressured.remove(key);
        }
        Ok(())
    }

    /// Whether some task can process a record right now (the loop then polls without waiting).
    pub fn has_processable_records(&self) -> bool {
        let now = Instant::now();
        !self.recovery_pending()
            && self
                .tasks
                .values()
                .any(|t| t.can_process(now, self.config.max_task_idle))
    }

    /// Whether a restoration is under way (the loop then polls without waiting).
    pub fn restoring(&self) -> bool {
        self.restoring.is_some()
    }

    /// Moves the tasks' input times forward from the latest input ends (see
    /// [`super::input_ends`]). Call after the polled records were enqueued.
    pub fn observe_input_ends<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        if self.recovery_pending() || self.broken {
            return;
        }
        self.input_ends.observe(consumer, &mut self.tasks);
    }

    /// Processes buffered records of every task in turn (up to 1,000 per task, and no more than
    /// the cycle may still take), then fires due punctuations. Returns the records processed.
    pub fn process_buffered(&mut self) -> Result<usize, RuntimeError> {
        if self.recovery_pending() || self.broken {
            return Ok(0);
        }
        let now = Instant::now();
        let max_idle = self.config.max_task_idle;
        let mut processed = 0;
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        for partition in partitions {
            let room = self
                .config
                .commit_max_records
                .saturating_sub(self.records_in_cycle + processed);
            for _ in 0..room.min(1_000) {
                let Some(task) = self.tasks.get_mut(&partition) else {
                    break;
                };
                let Some(record) = task.next_record(now, max_idle) else {
                    break;
                };
                let span = tracing::debug_span!("record", topic = %record.topic, partition, offset = record.offset);
                let _entered = span.enter();
                let started = Instant::now();
                task.process(&record, &mut self.outputs)
                    .map_err(|e| RuntimeError::Processor(format!("task {partition}: {e}")))?;
                self.process_latency.record(started.elapsed().as_secs_f64());
                topic_counter(&mut self.consumed, m::RECORDS_CONSUMED, &record.topic).increment(1);
                processed += 1;
                self.flush_outputs()?;
            }
            if let Some(task) = self.tasks.get_mut(&partition) {
                task.maybe_punctuate(now, &mut self.outputs).map_err(|e| {
                    RuntimeError::Processor(format!("task {partition} punctuation: {e}"))
                })?;
            }
            self.flush_outputs()?;
        }
        self.records_in_cycle += processed;
        Ok(processed)
    }

    pub fn commit_due(&self) -> bool {
        self.records_in_cycle >= self.config.commit_max_records
            || self.cycle_started.elapsed() >= self.config.commit_interval
    }

    fn take_delivery_failures(&self) -> Vec<String> {
        std::mem::take(
            &mut *self
                .deliveries
                .failures
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        )
    }

    fn check_deliveries(&self) -> Result<(), RuntimeError> {
        let failures = self.take_delivery_failures();
        let Some(first) = failures.first() else {
            return Ok(());
        };
        // The cycle cannot commit what was not delivered: it is aborted and its inputs
        // processed again.
        tracing::warn!(failed = failures.len(), first = %first, "deliveries failed");
        let refused = self
            .deliveries
            .write_refused
            .lock()
            .ok()
            .and_then(|r| r.clone());
        if let Some(topic) = refused {
            return Err(self.config.refused(
                RDKafkaErrorCode::TopicAuthorizationFailed,
                &format!("may not write {topic}: it needs Write on outputs"),
            ));
        }
        Err(RuntimeError::Kafka {
            operation: "deliver",
            source: KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
        })
    }

    /// Ends the commit cycle: changelog records, the input offsets of every running task (also
    /// when only timers wrote: that is what fences a zombie), the transaction commit, then the
    /// tasks' writes go to RocksDB. Nothing to do when the cycle did no work.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        self.cycle_started = Instant::now();
        if self.broken || self.recovery_pending() {
            return Ok(());
        }
        let has_work = self.txn == Txn::Open || self.tasks.values().any(Task::has_work_in_cycle);
        if !has_work {
            return Ok(());
        }
        let started = Instant::now();
        self.check_deliveries()?;
        // Changelog: the last value of each changed key, in the task's partition.
        let mut changelog_records = Vec::new();
        for task in self.tasks.values() {
            for (store, pending) in task.pending_changes() {
                let index = self
                    .config
                    .stores
                    .iter()
                    .position(|s| s == store)
                    .unwrap_or(0);
                let topic = self.config.changelog_topic(store);
                for (key, change) in pending.iter() {
                    changelog_records.push((
                        OutputRecord {
                            topic: topic.clone(),
                            partition: Some(task.partition),
                            key: Some(key.clone()),
                            value: change.clone(),
                            headers: Vec::new(),
                            timestamp_ms: None,
                        },
                        index + 1,
                    ));
                }
            }
        }
        for (record, opaque) in &changelog_records {
            self.send(record, *opaque)?;
        }
        let mut offsets = TopicPartitionList::new();
        for task in self.tasks.values() {
            for (topic, offset) in task.offsets_to_commit() {
                offsets
                    .add_partition_offset(topic, task.partition, Offset::Offset(offset))
                    .map_err(RuntimeError::kafka("offsets list"))?;
            }
        }
        if self.exactly_once() {
            self.ensure_transaction()?;
            if offsets.count() > 0 {
                let metadata = consumer.group_metadata().ok_or_else(|| {
                    RuntimeError::Group("no consumer group metadata yet".to_string())
                })?;
                if let Err(e) = self.send_offsets(&offsets, metadata) {
                    // librdkafka can keep a request to the transaction coordinator in its
                    // out-queue after a broker restart: every AddOffsetsToTxn then times out,
                    // while the aborts in between succeed. New clients are the way out.
                    let since = *self
                        .send_offsets_failing_since
                        .get_or_insert_with(Instant::now);
                    if e.class() != ErrorClass::Fatal && since.elapsed() >= COMMIT_RETRY_FOR {
                        self.broken = true;
                        return Err(RuntimeError::ClientStuck(format!(
                            "{e} (failing for {} s)",
                            since.elapsed().as_secs()
                        )));
                    }
                    return Err(e);
                }
                self.send_offsets_failing_since = None;
            }
            self.wait_for_deliveries();
            self.check_deliveries()?;
            self.commit_transaction()?;
            self.txn = Txn::Idle;
        } else {
            self.wait_for_deliveries();
            self.producer
                .flush(self.config.transaction_timeout)
                .map_err(RuntimeError::kafka("flush"))?;
            // The offsets stay uncommitted when a delivery failed: the cycle is processed again.
            self.check_deliveries()?;
            // The changelog has the cycle's writes now, committed or not: the stores follow
            // before the offsets are committed, so a failed offset commit leaves no running
            // task behind its changelog (its records are then processed again, which
            // at-least-once allows).
            self.apply_cycle(consumer);
            if offsets.count() > 0 {
                fail::fail_point!("commit-offsets", |kind| Err(
                    super::failpoints::kafka_error("commit offsets", kind)
                ));
                consumer
                    .commit(&offsets, CommitMode::Sync)
                    .map_err(RuntimeError::kafka("commit offsets"))?;
            }
        }
        if self.exactly_once() {
            // Kafka has the cycle: now (and only now) local state may follow.
            self.apply_cycle(consumer);
        }
        metrics::histogram!(m::COMMIT_LATENCY).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::TRANSACTIONS, "result" => "committed").increment(1);
        if self.commit_latencies.len() < MAX_COMMIT_SAMPLES {
            self.commit_latencies.push(started.elapsed());
        }
        Ok(())
    }

    /// Writes every task's overlay and new checkpoints to its store; a task whose write fails is
    /// closed, to be restored from its changelog.
    fn apply_cycle<C: ConsumerContext>(&mut self, consumer: &BaseConsumer<C>) {
        let delivered = std::mem::take(
            &mut *self
                .deliveries
                .changelog
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        let mut failed = BTreeSet::new();
        for task in self.tasks.values_mut() {
            let mut checkpoints = BTreeMap::new();
            for (index, store) in self.config.stores.iter().enumerate() {
                if let Some(offset) = delivered.get(&(index, task.partition)) {
                    checkpoints.insert(store.clone(), offset + 1);
                }
            }
            if let Err(e) = task.apply_committed(checkpoints) {
                // The store kept its previous data and checkpoint (the batch is atomic): it is
                // behind the changelog now, so the task must not run on it (DESIGN.md 12.2).
                tracing::error!(task = task.partition, error = %e, "state write after commit failed; closing the task to restore it from the changelog");
                failed.insert(task.partition);
            }
        }
        self.records_in_cycle = 0;
        if !failed.is_empty() {
            self.close_failed_tasks(consumer, &failed);
        }
    }

    fn send_offsets(
        &self,
        offsets: &TopicPartitionList,
        metadata: rdkafka::consumer::ConsumerGroupMetadata,
    ) -> Result<(), RuntimeError> {
        fail::fail_point!("send-offsets", |kind| Err(super::failpoints::kafka_error(
            "send offsets to transaction",
            kind
        )));
        let (producer, offsets) = (self.producer.clone(), offsets.clone());
        self.watchdog
            .run(
                "send offsets to transaction",
                CALL_LIMIT,
                &self.shutdown,
                move || {
                    producer.send_offsets_to_transaction(&offsets, &metadata, CONSUMER_CALL_TIMEOUT)
                },
            )?
            .map_err(RuntimeError::kafka("send offsets to transaction"))
    }

    fn try_commit_transaction(&self) -> Result<(), RuntimeError> {
        fail::fail_point!("commit-transaction", |kind| Err(
            super::failpoints::kafka_error("commit transaction", kind)
        ));
        let producer = self.producer.clone();
        self.watchdog
            .run(
                "commit transaction",
                CALL_LIMIT,
                &self.shutdown,
                move || producer.commit_transaction(TXN_CALL_TIMEOUT),
            )?
            .map_err(RuntimeError::kafka("commit transaction"))
    }

    /// Commits the open transaction, calling again while librdkafka says the commit goes on
    /// (a coordinator restarting or moving). Gives up, with the outcome unknown, after
    /// [`COMMIT_RETRY_FOR`] or on shutdown.
    fn commit_transaction(&mut self) -> Result<(), RuntimeError> {
        let deadline = Instant::now() + COMMIT_RETRY_FOR;
        let mut attempt = 0u32;
        loop {
            let Err(error) = self.try_commit_transaction() else {
                return Ok(());
            };
            let decision = error
                .facts()
                .map_or(CommitDecision::Rebuild, on_commit_error);
            match decision {
                CommitDecision::Abort => return Err(error),
                CommitDecision::Rebuild if error.class() == ErrorClass::Fatal => {
                    self.broken = true;
                    return Err(error);
                }
                CommitDecision::Rebuild => {
                    self.broken = true;
                    return Err(RuntimeError::CommitOutcomeUnknown(error.to_string()));
                }
                CommitDecision::Retry => {
                    attempt += 1;
                    tracing::warn!(error = %error, attempt, "commit not confirmed yet; calling it again");
                    let pause = Duration::from_millis(100 * u64::from(attempt.min(10)));
                    if Instant::now() + pause >= deadline
                        || !sleep_unless_shutdown(&self.shutdown, pause)
                    {
                        self.broken = true;
                        return Err(RuntimeError::CommitOutcomeUnknown(format!(
                            "{error} (gave up after {attempt} attempts)"
                        )));
                    }
                }
            }
        }
    }

    /// Waits, in short sleeps, until every produced record has its delivery report (bounded by
    /// the transaction timeout and by shutdown). rdkafka's flush polls the event queue in steps
    /// of up to 100 ms, and with the ThreadedProducer's own thread serving that queue those
    /// steps often run out in full: measured, commits took ~100 ms. Once nothing is in flight,
    /// the flush inside `commit_transaction` returns at once.
    fn wait_for_deliveries(&self) {
        let deadline = Instant::now() + self.config.transaction_timeout;
        while self.producer.in_flight_count() > 0
            && Instant::now() < deadline
            && !self.shutdown.grace_over()
        {
            std::thread::sleep(Duration::from_micros(200));
        }
    }

    /// Logs the number of commits and their latency percentiles ("commit summary").
    pub fn log_commit_summary(&self) {
        let mut sorted = self.commit_latencies.clone();
        sorted.sort();
        let percentile = |q: f64| {
            sorted
                .get(((sorted.len() as f64 - 1.0) * q).round() as usize)
                .map_or(0.0, |d| d.as_secs_f64() * 1000.0)
        };
        tracing::info!(
            commits = sorted.len(),
            p50_ms = percentile(0.5),
            p99_ms = percentile(0.99),
            max_ms = percentile(1.0),
            "commit summary"
        );
    }

    /// Drops the open cycle (outputs, overlays, buffered records, delivery bookkeeping) and
    /// schedules its clean-up: the transaction's abort and the rewind of every running task's
    /// inputs to the positions of the last commit. Until [`Engine::recover`] has done both,
    /// nothing is processed or committed.
    pub fn abort(&mut self) {
        metrics::counter!(m::TRANSACTIONS, "result" => "aborted").increment(1);
        self.outputs.clear();
        for task in self.tasks.values_mut() {
            task.discard_cycle();
        }
        self.records_in_cycle = 0;
        self.cycle_started = Instant::now();
        // Reports still to come for this cycle's messages (purged by the abort) are ignored.
        self.deliveries.epoch.fetch_add(1, Ordering::Relaxed);
        if let Ok(mut map) = self.deliveries.changelog.lock() {
            map.clear();
        }
        self.take_delivery_failures();
        if self.txn == Txn::Open {
            self.txn = Txn::NeedsAbort;
        }
        if !self.tasks.is_empty() {
            self.rewind_pending = true;
        }
    }

    fn try_abort_transaction(&self) -> Result<(), RuntimeError> {
        fail::fail_point!("abort-transaction", |kind| Err(
            super::failpoints::kafka_error("abort transaction", kind)
        ));
        let producer = self.producer.clone();
        self.watchdog
            .run("abort transaction", CALL_LIMIT, &self.shutdown, move || {
                producer.abort_transaction(TXN_CALL_TIMEOUT)
            })?
            .map_err(RuntimeError::kafka("abort transaction"))
    }

    /// Carries out a scheduled clean-up: aborts the transaction, then seeks every running task's
    /// inputs back to its committed positions and lifts back-pressure. An error leaves what is
    /// not done scheduled; the caller retries after a pause. A rewind that failed
    /// [`REWIND_ATTEMPTS`] times in a row comes back as [`RuntimeError::RewindFailed`] (fatal:
    /// rebuild), as does a fatal abort.
    pub fn recover<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        if self.txn == Txn::NeedsAbort {
            if !self.broken && self.exactly_once() {
                if let Err(e) = self.try_abort_transaction() {
                    let failing_since = *self.abort_failing_since.get_or_insert_with(Instant::now);
                    if e.class() == ErrorClass::Fatal {
                        self.broken = true;
                        return Err(e);
                    }
                    if failing_since.elapsed() >= COMMIT_RETRY_FOR {
                        // librdkafka can stay unable to reach the transaction coordinator after
                        // a broker restart; a new producer's init_transactions aborts the
                        // transaction for us.
                        self.broken = true;
                        return Err(RuntimeError::AbortFailed(format!(
                            "{e} (failing for {} s)",
                            failing_since.elapsed().as_secs()
                        )));
                    }
                    return Err(e);
                }
            }
            self.abort_failing_since = None;
            self.txn = Txn::Idle;
        }
        if self.rewind_pending {
            let mut targets = TopicPartitionList::new();
            for task in self.tasks.values() {
                for (topic, offset) in task.committed_positions() {
                    targets
                        .add_partition_offset(topic, task.partition, Offset::Offset(offset))
                        .map_err(RuntimeError::kafka("rewind list"))?;
                }
            }
            if let Err(e) = self.seek(consumer, targets) {
                self.rewind_failures += 1;
                if self.rewind_failures >= REWIND_ATTEMPTS {
                    return Err(RuntimeError::RewindFailed(format!(
                        "{e} ({} attempts)",
                        self.rewind_failures
                    )));
                }
                return Err(e);
            }
            self.rewind_failures = 0;
            self.rewind_pending = false;
            // Queues are empty again: every input paused for back-pressure may fetch.
            let paused: Vec<(String, i32)> = self.backpressured.iter().cloned().collect();
            self.resume_partitions(consumer, &paused)?;
            tracing::info!("inputs rewound to the last commit");
        }
        Ok(())
    }

    /// Seeks to `targets`; every partition must take the seek, except fresh ones (not resumed
    /// since their assignment), which start at the committed offset anyway.
    fn seek<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        targets: TopicPartitionList,
    ) -> Result<(), RuntimeError> {
        if targets.count() == 0 {
            return Ok(());
        }
        fail::fail_point!("seek", |kind| Err(super::failpoints::kafka_error(
            "seek", kind
        )));
        let result = consumer
            .seek_partitions(targets, CONSUMER_CALL_TIMEOUT)
            .map_err(RuntimeError::kafka("seek inputs"))?;
        for element in result.elements() {
            if let Err(e) = element.error() {
                if self
                    .fresh
                    .contains(&(element.topic().to_string(), element.partition()))
                {
                    tracing::debug!(topic = element.topic(), partition = element.partition(), error = %e, "seek skipped on a partition not fetched yet");
                } else {
                    return Err(RuntimeError::kafka("seek inputs")(e));
                }
            }
        }
        Ok(())
    }

    /// The committed input offsets of tasks `partitions`: where they start. A partition without
    /// a committed offset starts at its log start (`auto.offset.reset=earliest`), resolved to an
    /// offset so that every transaction of the task can carry it. A lookup error fails the start
    /// (it is retried), never silently becomes "from the beginning".
    ///
    /// Two requests for all the tasks together: the broker answers a connection's requests in
    /// order, so each request waits behind the consumer's pending fetch (up to
    /// `fetch.wait.max.ms`); asked per partition, tasks with fresh inputs would start seconds
    /// apart.
    fn committed_positions<C: ConsumerContext>(
        &self,
        consumer: &BaseConsumer<C>,
        partitions: &[i32],
    ) -> Result<BTreeMap<i32, BTreeMap<String, i64>>, RuntimeError> {
        let mut inputs = TopicPartitionList::new();
        for partition in partitions {
            for topic in &self.config.input_topics {
                inputs.add_partition(topic, *partition);
            }
        }
        let committed = lookup_committed(consumer, inputs)?;
        let mut positions: BTreeMap<i32, BTreeMap<String, i64>> = BTreeMap::new();
        let mut unset = TopicPartitionList::new();
        for element in committed.elements() {
            if let Err(e) = element.error() {
                return Err(RuntimeError::kafka("fetch committed offsets")(e));
            }
            match element.offset() {
                Offset::Offset(o) if o >= 0 => {
                    positions
                        .entry(element.partition())
                        .or_default()
                        .insert(element.topic().to_string(), o);
                }
                _ => unset
                    .add_partition_offset(element.topic(), element.partition(), Offset::Beginning)
                    .map_err(RuntimeError::kafka("log start list"))?,
            }
        }
        if unset.count() > 0 {
            // ListOffsets with the "earliest" timestamp: each partition's log start.
            let starts = consumer
                .offsets_for_times(unset, CONSUMER_CALL_TIMEOUT)
                .map_err(RuntimeError::kafka("input log starts"))?;
            for element in starts.elements() {
                if let Err(e) = element.error() {
                    return Err(RuntimeError::kafka("input log starts")(e));
                }
                let Offset::Offset(o) = element.offset() else {
                    return Err(RuntimeError::Kafka {
                        operation: "input log starts",
                        source: rdkafka::error::KafkaError::OffsetFetch(
                            rdkafka::types::RDKafkaErrorCode::OffsetNotAvailable,
                        ),
                    });
                };
                positions
                    .entry(element.partition())
                    .or_default()
                    .insert(element.topic().to_string(), o);
            }
        }
        Ok(positions)
    }

    /// Starts the tasks whose every input partition is assigned: open their stores, restore
    /// them (a slice per call, so the loop keeps polling, committing and watching for shutdown
    /// between slices), then start each one.
    ///
    /// A task that cannot be restored or started (a store that does not open, a full disk, a
    /// changelog without a leader) does not stop the running tasks: it is tried again after a
    /// growing pause, and the instance reports why it is not ready. Only a failure after a task's
    /// init outputs entered the open transaction fails the cycle (it must not commit them).
    pub fn start_ready_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        if self.recovery_pending() || self.broken {
            return Ok(());
        }
        if self.start_retry_at.is_some_and(|at| Instant::now() < at) {
            return Ok(());
        }
        // Starting and restoring make blocking broker calls (10 s each at worst): never with a
        // transaction open, which could outlive its timeout meanwhile. The cycle commits within
        // the commit interval; the next loop turn starts the tasks.
        if self.txn == Txn::Open {
            return Ok(());
        }
        match self.try_start_ready_tasks(consumer) {
            Ok(()) => {
                if self.start_failures > 0 && self.restoring.is_none() {
                    self.start_failures = 0;
                    self.start_retry_at = None;
                    self.config.status.set_stalled(None);
                }
                Ok(())
            }
            Err(StartError::Cycle(e)) => Err(e),
            Err(StartError::Task(e))
                if self.start_failures + 1 >= START_FAILURES_BEFORE_REBUILD =>
            {
                // Failing for long: the clients themselves may be stuck (a restore consumer
                // whose metadata never recovers); new ones are the way out.
                Err(RuntimeError::ClientStuck(format!(
                    "tasks could not be started {} times in a row: {e}",
                    self.start_failures + 1
                )))
            }
            Err(StartError::Task(e)) => {
                self.start_failures += 1;
                let pause = (Duration::from_millis(200) * 2u32.pow(self.start_failures.min(6)))
                    .min(Duration::from_secs(10));
                self.start_retry_at = Some(Instant::now() + pause);
                tracing::warn!(error = %e, failures = self.start_failures, retry_in_ms = pause.as_millis() as u64, "tasks could not be started; the running ones go on");
                self.config
                    .status
                    .set_stalled(Some(format!("tasks cannot start: {e}")));
                Ok(())
            }
        }
    }

    fn try_start_ready_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), StartError> {
        if self.restoring.is_none() {
            let ready: Vec<i32> = self
                .assigned
                .iter()
                .filter(|(p, topics)| {
                    !self.tasks.contains_key(p) && topics.len() == self.config.input_topics.len()
                })
                .map(|(p, _)| *p)
                .collect();
            if ready.is_empty() {
                return Ok(());
            }
            let mut backends = Vec::with_capacity(ready.len());
            for partition in &ready {
                let backend = match self.standbys.take(*partition) {
                    Some(warm) => warm,
                    None => RocksBackend::open(
                        &self.config.task_dir(*partition),
                        &self.config.stores,
                        &self.resources,
                    )
                    .map_err(|e| StartError::Task(e.into()))?,
                };
                backends.push((*partition, backend));
            }
            // All ready tasks restore together; each store logs what it replayed.
            self.restoring = Some(
                self.restorer
                    .begin(&self.config, backends)
                    .map_err(StartError::Task)?,
            );
        }
        let Some(mut restoration) = self.restoring.take() else {
            return Ok(());
        };
        match self.restorer.step(&mut restoration, RESTORE_SLICE) {
            Ok(false) => {
                self.restoring = Some(restoration);
                return Ok(());
            }
            Ok(true) => {}
            Err(e) => {
                self.restorer.cancel(restoration);
                // A stuck restore consumer is not a task's failure to retry: rebuild at once.
                if matches!(e, RuntimeError::ClientStuck(_)) {
                    return Err(StartError::Cycle(e));
                }
                return Err(StartError::Task(e));
            }
        }
        let starting: Vec<(i32, RocksBackend)> = restoration
            .tasks
            .into_iter()
            .filter(|(partition, _)| {
                let still_assigned = self
                    .assigned
                    .get(partition)
                    .is_some_and(|topics| topics.len() == self.config.input_topics.len());
                still_assigned && !self.tasks.contains_key(partition)
            })
            .collect();
        if starting.is_empty() {
            return Ok(());
        }
        let partitions: Vec<i32> = starting.iter().map(|(p, _)| *p).collect();
        let mut positions = self
            .committed_positions(consumer, &partitions)
            .map_err(StartError::Task)?;
        for (partition, backend) in starting {
            let at = positions.remove(&partition).unwrap_or_default();
            if let Some(topic) = self
                .config
                .input_topics
                .iter()
                .find(|topic| !at.contains_key(*topic))
            {
                // A task must never start without a position on one of its inputs: its
                // transactions would not carry it, and a rewind would skip it.
                tracing::warn!(task = partition, %topic, "no start position came back for an input");
                return Err(StartError::Task(RuntimeError::Kafka {
                    operation: "fetch committed offsets",
                    source: rdkafka::error::KafkaError::OffsetFetch(
                        rdkafka::types::RDKafkaErrorCode::OffsetNotAvailable,
                    ),
                }));
            }
            self.start_task(consumer, partition, backend, at)?;
        }
        Ok(())
    }

    /// Starts one restored task at its committed `positions`: a seek there, the processor's
    /// init, then its inputs resume. Any failure leaves the task not started (it is tried again).
    fn start_task<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partition: i32,
        backend: RocksBackend,
        positions: BTreeMap<String, i64>,
    ) -> Result<(), StartError> {
        self.prepare_task(consumer, partition, backend, positions)
            .map_err(StartError::Task)?;
        let inputs = self.inputs_of(partition);
        let started = self.flush_outputs().and_then(|()| {
            // `skip`: the inputs stay paused (as a consumer that stopped fetching would).
            fail::fail_point!("resume-inputs", |_| Ok(()));
            consumer
                .resume(&inputs)
                .map_err(RuntimeError::kafka("resume inputs"))
        });
        if let Err(e) = started {
            // Not running after all: closed again, so the next attempt starts it from scratch;
            // its init outputs may be in the open transaction, so the cycle must abort.
            if let Some(task) = self.tasks.remove(&partition) {
                task.close();
            }
            let _ = consumer.pause(&inputs);
            return Err(StartError::Cycle(e));
        }
        for topic in &self.config.input_topics {
            self.fresh.remove(&(topic.clone(), partition));
        }
        if let Some(task) = self.tasks.get(&partition) {
            self.config.status.task_started(partition, task.reader());
        }
        tracing::info!(task = partition, "task running");
        self.report_status();
        Ok(())
    }

    fn inputs_of(&self, partition: i32) -> TopicPartitionList {
        let mut inputs = TopicPartitionList::new();
        for topic in &self.config.input_topics {
            inputs.add_partition(topic, partition);
        }
        inputs
    }

    /// Everything of a task start that touches nothing shared: positions, seek, the processor's
    /// init (its outputs are kept only when it succeeds). Inserts the task, not yet resumed.
    fn prepare_task<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partition: i32,
        backend: RocksBackend,
        positions: BTreeMap<String, i64>,
    ) -> Result<(), RuntimeError> {
        let mut targets = TopicPartitionList::new();
        for (topic, offset) in &positions {
            targets
                .add_partition_offset(topic, partition, Offset::Offset(*offset))
                .map_err(RuntimeError::kafka("seek list"))?;
        }
        self.seek(consumer, targets)?;
        let processor = (self.supplier)(partition);
        let before = self.outputs.len();
        let task = Task::start(
            partition,
            positions,
            &self.config.input_topics,
            &self.config.stores,
            Box::new(backend),
            processor,
            &mut self.outputs,
        );
        match task {
            Ok(task) => {
                self.tasks.insert(partition, task);
                Ok(())
            }
            Err(e) => {
                self.outputs.truncate(before);
                Err(RuntimeError::Processor(format!(
                    "task {partition} init: {e}"
                )))
            }
        }
    }

    /// Closes tasks whose state write failed after a commit and pauses their inputs: they are
    /// started again (restored from the changelog, sought to the committed offsets) by
    /// `start_ready_tasks`.
    fn close_failed_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        partitions: &BTreeSet<i32>,
    ) {
        let mut inputs = TopicPartitionList::new();
        for partition in partitions {
            for topic in &self.config.input_topics {
                inputs.add_partition(topic, *partition);
            }
        }
        if let Err(e) = consumer.pause(&inputs) {
            tracing::warn!(error = %e, "pausing the inputs of failed tasks");
        }
        metrics::counter!(m::TASKS_CLOSED_AFTER_FAILURE).increment(partitions.len() as u64);
        self.close_tasks(partitions);
    }

    /// Closes the tasks of the given partition numbers (state stays on disk).
    pub fn close_tasks(&mut self, partitions: &BTreeSet<i32>) {
        for partition in partitions {
            if let Some(task) = self.tasks.remove(partition) {
                self.config.status.task_closed(*partition);
                task.close();
                tracing::info!(task = partition, "task closed");
            }
        }
        self.backpressured
            .retain(|(_, partition)| !partitions.contains(partition));
        self.report_status();
    }

    fn report_status(&self) {
        self.config
            .status
            .set(self.assigned.len(), self.tasks.len());
        self.config
            .status
            .set_assigned_partitions(self.assigned.keys().copied().collect());
    }

    /// Closes everything without committing (the open transaction is left to abort or time out;
    /// the stores are behind at worst, and restoration catches them up).
    /// Closes every task at the end of the engine's life, and stops its input-ends thread.
    pub fn close_all(&mut self) {
        self.input_ends.stop();
        if let Some(restoration) = self.restoring.take() {
            self.restorer.cancel(restoration);
        }
        let all: BTreeSet<i32> = self.tasks.keys().copied().collect();
        // Nothing is assigned any more: the next generation's assignment says what is.
        self.assigned.clear();
        self.assigned_at.clear();
        self.close_tasks(&all);
        self.standbys.release_all();
        // A revoke served later by this engine's consumer (closed in the background after a
        // stuck client) must not release what the next generation claimed.
        self.standbys = Standbys::default();
    }

    /// The pre-rebalance duty on revoke: finish the cycle, close the revoked tasks.
    pub fn on_revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        revoked: &TopicPartitionList,
        lost: bool,
    ) {
        let partitions: BTreeSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        if self
            .restoring
            .as_ref()
            .is_some_and(|r| r.partitions().any(|p| partitions.contains(&p)))
        {
            if let Some(restoration) = self.restoring.take() {
                self.restorer.cancel(restoration);
            }
        }
        if lost || self.broken {
            // Another member owns these partitions already: whatever this cycle did must not
            // commit. The tasks that stay are rewound before they process again.
            self.abort();
        } else if let Err(e) = self.commit(consumer) {
            tracing::warn!(error = %e, "commit before revoke failed; aborting the cycle");
            let class = e.class();
            self.record_failure(e);
            if class != ErrorClass::Fatal {
                // The tasks that stay must not go on after records whose effects were dropped.
                self.abort();
            }
        }
        for element in revoked.elements() {
            self.fresh
                .remove(&(element.topic().to_string(), element.partition()));
            if let Some(topics) = self.assigned.get_mut(&element.partition()) {
                topics.remove(element.topic());
                if topics.is_empty() {
                    self.assigned.remove(&element.partition());
                    self.assigned_at.remove(&element.partition());
                }
            }
        }
        self.close_tasks(&partitions);
        // Closed (and any restoration of them dropped): their stores may serve as standbys now.
        let gone: Vec<i32> = partitions
            .iter()
            .copied()
            .filter(|p| !self.assigned.contains_key(p))
            .collect();
        self.standbys.release(gone);
    }

    /// Records processed in the open cycle.
    pub fn records_in_cycle(&self) -> usize {
        self.records_in_cycle
    }

    /// Keeps the first failure of a rebalance for the loop, unless a later one is fatal: a fatal
    /// one must reach the loop (which rebuilds), or a broken engine would idle forever.
    fn record_failure(&mut self, error: RuntimeError) {
        let fatal = error.class() == ErrorClass::Fatal;
        if fatal {
            self.broken = true;
        }
        let kept_fatal = self
            .failure
            .as_ref()
            .is_some_and(|f| f.class() == ErrorClass::Fatal);
        if self.failure.is_none() || (fatal && !kept_fatal) {
            self.failure = Some(error);
        }
    }

    /// The post-rebalance duty on assign: note the partitions and pause them until their task is
    /// restored.
    pub fn on_assign<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        assigned: &TopicPartitionList,
    ) {
        self.standbys
            .claim(assigned.elements().iter().map(|e| e.partition()));
        for element in assigned.elements() {
            self.assigned
                .entry(element.partition())
                .or_default()
                .insert(element.topic().to_string());
            self.assigned_at
                .entry(element.partition())
                .or_insert_with(super::input_ends::now_ms);
            self.fresh
                .insert((element.topic().to_string(), element.partition()));
        }
        if let Err(e) = consumer.pause(assigned) {
            self.record_failure(RuntimeError::kafka("pause new partitions")(e));
        }
        self.report_status();
    }
}

/// Why tasks did not start: a failure of the tasks alone (retried later, the running tasks go on),
/// or one that left the open transaction with outputs it must not commit.
enum StartError {
    Task(RuntimeError),
    Cycle(RuntimeError),
}

/// The committed offsets of `inputs`, from the group coordinator.
fn lookup_committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    inputs: TopicPartitionList,
) -> Result<TopicPartitionList, RuntimeError> {
    fail::fail_point!("committed-offsets", |kind| Err(
        super::failpoints::kafka_error("fetch committed offsets", kind)
    ));
    consumer
        .committed_offsets(inputs, CONSUMER_CALL_TIMEOUT)
        .map_err(RuntimeError::kafka("fetch committed offsets"))
}

/// Produces one record, waiting while the local queue is full (a broker away), up to `limit` or
/// shutdown.
fn send_record(
    producer: &EngineProducer,
    record: &OutputRecord,
    opaque: usize,
    limit: Duration,
    shutdown: &Shutdown,
) -> Result<(), RuntimeError> {
    let deadline = Instant::now() + limit;
    let mut headers = OwnedHeaders::new_with_capacity(record.headers.len());
    for (name, value) in &record.headers {
        headers = headers.insert(Header {
            key: name,
            value: Some(value.as_slice()),
        });
    }
    let mut base: BaseRecord<'_, [u8], [u8], usize> =
        BaseRecord::with_opaque_to(&record.topic, opaque).headers(headers);
    if let Some(key) = &record.key {
        base = base.key(key.as_slice());
    }
    if let Some(value) = &record.value {
        base = base.payload(value.as_slice());
    }
    if let Some(partition) = record.partition {
        base = base.partition(partition);
    }
    if let Some(timestamp) = record.timestamp_ms {
        base = base.timestamp(timestamp);
    }
    loop {
        match producer.send(base) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                if Instant::now() >= deadline || shutdown.requested() {
                    return Err(RuntimeError::kafka("produce")(
                        KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull),
                    ));
                }
                base = returned;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((error, _)) => return Err(RuntimeError::kafka("produce")(error)),
        }
    }
}
