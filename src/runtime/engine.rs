//! The engine of one stream thread: the running tasks, the producer and the commit cycle.
//!
//! It is shared between the poll loop and the consumer's rebalance callbacks (which run inside
//! `poll`, on the same thread) through a mutex that the loop never holds while polling.

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};
use rdkafka::util::Timeout;
use rdkafka::{ClientContext, Message};

use super::config::{Guarantee, RuntimeConfig};
use super::error::{ErrorClass, RuntimeError};
use super::processor::{OutputRecord, ProcessorSupplier};
use super::restore::Restorer;
use super::task::Task;
use crate::state::rocks::{RocksBackend, RocksResources};
use crate::state::StoreBackend;
use crate::telemetry::metrics as m;

/// Commit latency samples kept for the shutdown summary (hours of commits at 10 per second).
const MAX_COMMIT_SAMPLES: usize = 100_000;

/// Delivery bookkeeping: the last offset written to each changelog partition, and failures.
#[derive(Default)]
pub struct Deliveries {
    /// (store index, partition) -> highest delivered offset in the open cycle
    changelog: Mutex<HashMap<(usize, i32), i64>>,
    failures: Mutex<Vec<String>>,
}

/// Producer context: records changelog delivery offsets (opaque = store index + 1; 0 for outputs).
pub struct EngineProducerContext {
    pub deliveries: Arc<Deliveries>,
}

impl ClientContext for EngineProducerContext {}

impl ProducerContext for EngineProducerContext {
    type DeliveryOpaque = usize;

    fn delivery(&self, result: &DeliveryResult<'_>, opaque: usize) {
        match result {
            Ok(message) if opaque > 0 => {
                if let Ok(mut map) = self.deliveries.changelog.lock() {
                    let entry = map.entry((opaque - 1, message.partition())).or_insert(-1);
                    *entry = (*entry).max(message.offset());
                }
            }
            Ok(_) => {}
            Err((error, message)) => {
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

/// The tasks of one stream thread and what they have produced in the open cycle.
pub struct Engine {
    pub config: Arc<RuntimeConfig>,
    supplier: ProcessorSupplier,
    resources: RocksResources,
    producer: EngineProducer,
    deliveries: Arc<Deliveries>,
    restorer: Restorer,
    pub tasks: BTreeMap<i32, Task>,
    /// Input partitions assigned to this instance, by partition number.
    pub assigned: BTreeMap<i32, BTreeSet<String>>,
    in_transaction: bool,
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

impl Engine {
    pub fn new(
        config: Arc<RuntimeConfig>,
        supplier: ProcessorSupplier,
        resources: RocksResources,
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
        let producer: EngineProducer = client
            .create_with_context(EngineProducerContext {
                deliveries: deliveries.clone(),
            })
            .map_err(RuntimeError::kafka("create producer"))?;
        if config.guarantee == Guarantee::ExactlyOnce {
            // Fences any older incarnation with the same transactional id and aborts its open transaction.
            producer
                .init_transactions(Duration::from_secs(60))
                .map_err(RuntimeError::kafka("init transactions"))?;
        }
        let restorer = Restorer::new(&config)?;
        Ok(Self {
            config,
            supplier,
            resources,
            producer,
            deliveries,
            restorer,
            tasks: BTreeMap::new(),
            assigned: BTreeMap::new(),
            in_transaction: false,
            cycle_started: Instant::now(),
            records_in_cycle: 0,
            outputs: Vec::new(),
            failure: None,
            broken: false,
            commit_latencies: Vec::new(),
            consumed: HashMap::new(),
            produced: HashMap::new(),
            process_latency: metrics::histogram!(m::PROCESS_LATENCY),
        })
    }

    fn exactly_once(&self) -> bool {
        self.config.guarantee == Guarantee::ExactlyOnce
    }

    fn ensure_transaction(&mut self) -> Result<(), RuntimeError> {
        if self.exactly_once() && !self.in_transaction {
            self.producer
                .begin_transaction()
                .map_err(RuntimeError::kafka("begin transaction"))?;
            self.in_transaction = true;
        }
        Ok(())
    }

    fn send(&mut self, record: &OutputRecord, opaque: usize) -> Result<(), RuntimeError> {
        self.ensure_transaction()?;
        send_record(&self.producer, record, opaque)?;
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

    /// Processes buffered records of every task (up to `budget` per task), then fires due
    /// punctuations. Returns the number of records processed.
    pub fn process_buffered(&mut self, budget: usize) -> Result<usize, RuntimeError> {
        let now = Instant::now();
        let max_idle = self.config.max_task_idle;
        let mut processed = 0;
        let partitions: Vec<i32> = self.tasks.keys().copied().collect();
        for partition in partitions {
            for _ in 0..budget {
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

    /// Ends the commit cycle: changelog records, input offsets and the transaction commit, then
    /// the tasks' writes go to RocksDB. Nothing to do when the cycle did no work.
    pub fn commit<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        self.cycle_started = Instant::now();
        if self.broken {
            return Ok(());
        }
        let has_work = self.in_transaction || self.tasks.values().any(Task::has_work_in_cycle);
        if !has_work {
            return Ok(());
        }
        let started = Instant::now();
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
            if offsets.count() > 0 {
                self.ensure_transaction()?;
                let metadata = consumer.group_metadata().ok_or_else(|| {
                    RuntimeError::Group("no consumer group metadata yet".to_string())
                })?;
                self.producer
                    .send_offsets_to_transaction(&offsets, &metadata, Duration::from_secs(30))
                    .map_err(RuntimeError::kafka("send offsets to transaction"))?;
            }
            self.wait_for_deliveries();
            self.producer
                .commit_transaction(Timeout::Never)
                .map_err(RuntimeError::kafka("commit transaction"))?;
            self.in_transaction = false;
        } else {
            self.wait_for_deliveries();
            self.producer
                .flush(Timeout::Never)
                .map_err(RuntimeError::kafka("flush"))?;
            let failures = std::mem::take(
                &mut *self
                    .deliveries
                    .failures
                    .lock()
                    .unwrap_or_else(|p| p.into_inner()),
            );
            if !failures.is_empty() {
                // The offsets stay uncommitted: the cycle is aborted and its inputs processed again.
                tracing::warn!(?failures, "deliveries failed");
                return Err(RuntimeError::Kafka {
                    operation: "deliver",
                    source: KafkaError::MessageProduction(RDKafkaErrorCode::Fail),
                });
            }
            if offsets.count() > 0 {
                consumer
                    .commit(&offsets, CommitMode::Sync)
                    .map_err(RuntimeError::kafka("commit offsets"))?;
            }
        }
        // Kafka has the cycle: now (and only now) local state may follow.
        let delivered = std::mem::take(
            &mut *self
                .deliveries
                .changelog
                .lock()
                .unwrap_or_else(|p| p.into_inner()),
        );
        for task in self.tasks.values_mut() {
            let mut checkpoints = BTreeMap::new();
            for (index, store) in self.config.stores.iter().enumerate() {
                if let Some(offset) = delivered.get(&(index, task.partition)) {
                    checkpoints.insert(store.clone(), offset + 1);
                }
            }
            task.apply_committed(checkpoints)?;
        }
        self.records_in_cycle = 0;
        metrics::histogram!(m::COMMIT_LATENCY).record(started.elapsed().as_secs_f64());
        metrics::counter!(m::TRANSACTIONS, "result" => "committed").increment(1);
        if self.commit_latencies.len() < MAX_COMMIT_SAMPLES {
            self.commit_latencies.push(started.elapsed());
        }
        Ok(())
    }

    /// Waits, in short sleeps, until every produced record has its delivery report (bounded by
    /// the transaction timeout). rdkafka's flush polls the event queue in steps of up to 100 ms,
    /// and with the ThreadedProducer's own thread serving that queue those steps often run out in
    /// full: measured, commits took ~100 ms. Once nothing is in flight, the flush inside
    /// `commit_transaction` returns at once.
    fn wait_for_deliveries(&self) {
        let deadline = Instant::now() + self.config.transaction_timeout;
        while self.producer.in_flight_count() > 0 && Instant::now() < deadline {
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

    /// Aborts the open cycle: the transaction, the tasks' writes and buffered records; inputs are
    /// rewound to their committed offsets.
    pub fn abort<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
        self.abort_without_rewind()?;
        self.rewind(consumer)
    }

    /// Seeks the inputs of every running task back to the committed offsets.
    fn rewind<C: ConsumerContext>(&self, consumer: &BaseConsumer<C>) -> Result<(), RuntimeError> {
        let mut partitions = TopicPartitionList::new();
        for task in self.tasks.values() {
            for topic in &self.config.input_topics {
                partitions.add_partition(topic, task.partition);
            }
        }
        seek_to_committed(consumer, &partitions)
    }

    /// Starts the tasks whose every input partition is assigned: open the store, restore it from
    /// its checkpoint, init the processor, resume the inputs.
    pub fn start_ready_tasks<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
    ) -> Result<(), RuntimeError> {
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
            let path = self.config.task_dir(*partition);
            backends.push((
                *partition,
                RocksBackend::open(&path, &self.config.stores, &self.resources)?,
            ));
        }
        {
            // All ready tasks restore together; each store logs what it replayed.
            let mut tasks: Vec<(i32, &mut dyn StoreBackend)> = backends
                .iter_mut()
                .map(|(p, b)| (*p, b as &mut dyn StoreBackend))
                .collect();
            self.restorer.restore_tasks(&self.config, &mut tasks)?;
        }
        for (partition, backend) in backends {
            let reader = backend.reader();
            let processor = (self.supplier)(partition);
            let task = Task::start(
                partition,
                &self.config.input_topics,
                &self.config.stores,
                Box::new(backend),
                processor,
                &mut self.outputs,
            )
            .map_err(|e| RuntimeError::Processor(format!("task {partition} init: {e}")))?;
            self.tasks.insert(partition, task);
            self.config.status.task_started(partition, reader);
            self.flush_outputs()?;
            let mut inputs = TopicPartitionList::new();
            for topic in &self.config.input_topics {
                inputs.add_partition(topic, partition);
            }
            seek_to_committed(consumer, &inputs)?;
            consumer
                .resume(&inputs)
                .map_err(RuntimeError::kafka("resume inputs"))?;
            tracing::info!(task = partition, "task running");
            self.report_status();
        }
        Ok(())
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
        self.report_status();
    }

    fn report_status(&self) {
        self.config
            .status
            .set(self.assigned.len(), self.tasks.len());
    }

    /// Closes everything without committing (the open transaction is left to abort or time out).
    pub fn close_all(&mut self) {
        let all: BTreeSet<i32> = self.tasks.keys().copied().collect();
        self.close_tasks(&all);
    }

    /// The pre-rebalance duty on revoke: finish the cycle, close the revoked tasks.
    pub fn on_revoke<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        revoked: &TopicPartitionList,
        lost: bool,
    ) {
        let partitions: BTreeSet<i32> = revoked.elements().iter().map(|e| e.partition()).collect();
        if lost || self.broken {
            // Another member owns these partitions already: whatever this cycle did must not commit.
            if let Err(e) = self.abort_without_rewind() {
                self.record_failure(e);
            }
        } else if let Err(e) = self.commit(consumer) {
            tracing::warn!(error = %e, "commit before revoke failed; aborting the cycle");
            let class = e.class();
            self.record_failure(e);
            if class != ErrorClass::Fatal {
                if let Err(e) = self.abort_without_rewind() {
                    self.record_failure(e);
                }
            }
        }
        for element in revoked.elements() {
            if let Some(topics) = self.assigned.get_mut(&element.partition()) {
                topics.remove(element.topic());
                if topics.is_empty() {
                    self.assigned.remove(&element.partition());
                }
            }
        }
        self.close_tasks(&partitions);
    }

    /// Records processed in the open cycle.
    pub fn records_in_cycle(&self) -> usize {
        self.records_in_cycle
    }

    /// Drops the open cycle (outputs, overlays, buffered records, delivery bookkeeping) and aborts
    /// its transaction; the inputs are left where they are.
    fn abort_without_rewind(&mut self) -> Result<(), RuntimeError> {
        metrics::counter!(m::TRANSACTIONS, "result" => "aborted").increment(1);
        self.outputs.clear();
        for task in self.tasks.values_mut() {
            task.discard_cycle();
        }
        self.records_in_cycle = 0;
        self.cycle_started = Instant::now();
        if let Ok(mut map) = self.deliveries.changelog.lock() {
            map.clear();
        }
        if self.exactly_once() && self.in_transaction && !self.broken {
            self.producer
                .abort_transaction(Timeout::Never)
                .map_err(RuntimeError::kafka("abort transaction"))?;
            self.in_transaction = false;
        }
        Ok(())
    }

    fn record_failure(&mut self, error: RuntimeError) {
        if error.class() == ErrorClass::Fatal {
            self.broken = true;
        }
        if self.failure.is_none() {
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
        for element in assigned.elements() {
            self.assigned
                .entry(element.partition())
                .or_default()
                .insert(element.topic().to_string());
        }
        if let Err(e) = consumer.pause(assigned) {
            self.record_failure(RuntimeError::kafka("pause new partitions")(e));
        }
        self.report_status();
    }
}

/// Seeks `partitions` to their committed offsets (the earliest offset where none is committed).
pub fn seek_to_committed<C: ConsumerContext>(
    consumer: &BaseConsumer<C>,
    partitions: &TopicPartitionList,
) -> Result<(), RuntimeError> {
    if partitions.count() == 0 {
        return Ok(());
    }
    let committed = consumer
        .committed_offsets(partitions.clone(), Duration::from_secs(30))
        .map_err(RuntimeError::kafka("fetch committed offsets"))?;
    let mut targets = TopicPartitionList::new();
    for element in committed.elements() {
        let offset = match element.offset() {
            Offset::Offset(o) => Offset::Offset(o),
            _ => Offset::Beginning,
        };
        targets
            .add_partition_offset(element.topic(), element.partition(), offset)
            .map_err(RuntimeError::kafka("seek list"))?;
    }
    let result = consumer
        .seek_partitions(targets, Duration::from_secs(30))
        .map_err(RuntimeError::kafka("seek to committed offsets"))?;
    for element in result.elements() {
        if let Err(e) = element.error() {
            // A partition whose fetcher has not started yet cannot be sought; it starts at the
            // committed offset anyway.
            tracing::debug!(topic = element.topic(), partition = element.partition(), error = %e, "seek skipped");
        }
    }
    Ok(())
}

/// Produces one record, waiting while the local queue is full.
fn send_record(
    producer: &EngineProducer,
    record: &OutputRecord,
    opaque: usize,
) -> Result<(), RuntimeError> {
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
    loop {
        match producer.send(base) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), returned)) => {
                base = returned;
                std::thread::sleep(Duration::from_millis(1));
            }
            Err((error, _)) => return Err(RuntimeError::kafka("produce")(error)),
        }
    }
}
