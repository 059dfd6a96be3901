//! The saga's surroundings, for demos and for users testing their own services: participants that
//! answer commands ([`participant`]), an order generator ([`load`]), an auditor that checks the
//! outputs ([`audit`]), and the Kafka plumbing they share (topic creation, reading topics to their
//! end).

pub mod audit;
pub mod load;
pub mod participant;
pub mod scenario;

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::runtime::client::KafkaClients;
use crate::runtime::{EofContext, InputRecord};
use crate::saga::SagaDefinition;

/// A failure talking to Kafka from the tools in this module.
#[derive(Debug, thiserror::Error)]
pub enum SimError {
    #[error("{operation}: {source}")]
    Kafka {
        operation: &'static str,
        #[source]
        source: KafkaError,
    },
    #[error("{0}")]
    Other(String),
}

impl SimError {
    pub fn kafka(operation: &'static str) -> impl FnOnce(KafkaError) -> Self {
        move |source| Self::Kafka { operation, source }
    }
}

/// Creates every topic of a topology (inputs, outputs and DLQs) with `partitions` partitions;
/// topics that exist already are left as they are. Returns the names created.
pub fn create_topics(
    kafka: &(impl KafkaClients + ?Sized),
    def: &SagaDefinition,
    partitions: i32,
) -> Result<Vec<String>, SimError> {
    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config()
        .create()
        .map_err(SimError::kafka("create admin client"))?;
    let mut names = def.input_topics();
    names.extend(def.output_topics());
    let topics: Vec<NewTopic> = names
        .iter()
        .map(|n| NewTopic::new(n, partitions, TopicReplication::Fixed(-1)))
        .collect();
    let options = AdminOptions::new().operation_timeout(Some(Duration::from_secs(30)));
    let results = futures::executor::block_on(admin.create_topics(&topics, &options))
        .map_err(SimError::kafka("create topics"))?;
    let mut created = Vec::new();
    for result in results {
        match result {
            Ok(topic) => created.push(topic),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                return Err(SimError::Other(format!(
                    "creating topic '{topic}' failed: {code}"
                )))
            }
        }
    }
    Ok(created)
}

/// One record read back from Kafka: the runtime's [`InputRecord`], with headers read as text.
#[derive(Debug, Clone)]
pub struct ReadRecord(pub InputRecord);

impl std::ops::Deref for ReadRecord {
    type Target = InputRecord;

    fn deref(&self) -> &InputRecord {
        &self.0
    }
}

impl ReadRecord {
    /// The first header named `name`, as text.
    pub fn header(&self, name: &str) -> Option<String> {
        self.0
            .headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
    }
}

/// Reads topics from the beginning, `read_committed`: only what committed transactions wrote.
pub struct TopicScanner {
    consumer: BaseConsumer<EofContext>,
    partitions: usize,
    /// The client settings, for the watermark client of `read_topic_to_end`.
    base: ClientConfig,
}

impl TopicScanner {
    pub fn new(kafka: &(impl KafkaClients + ?Sized), topics: &[String]) -> Result<Self, SimError> {
        let base = kafka.client_config();
        let consumer: BaseConsumer<EofContext> = base
            .clone()
            .set(
                "group.id",
                format!("saga-streams-scan-{}", uuid::Uuid::new_v4()),
            )
            .set("enable.auto.commit", "false")
            .set("isolation.level", "read_committed")
            .set("enable.partition.eof", "true")
            .create_with_context(EofContext)
            .map_err(SimError::kafka("create consumer"))?;
        // Topics created a moment ago may not be in every broker's metadata yet: look again for a
        // few seconds before calling one missing.
        let deadline = std::time::Instant::now() + Duration::from_secs(10);
        let assignment = loop {
            let metadata = consumer
                .fetch_metadata(None, Duration::from_secs(10))
                .map_err(SimError::kafka("fetch metadata"))?;
            let mut assignment = TopicPartitionList::new();
            let mut missing = None;
            for topic in topics {
                let found = metadata.topics().iter().find(|t| {
                    t.name() == topic && t.error().is_none() && !t.partitions().is_empty()
                });
                let Some(found) = found else {
                    missing = Some(topic);
                    break;
                };
                for p in found.partitions() {
                    assignment
                        .add_partition_offset(topic, p.id(), Offset::Beginning)
                        .map_err(SimError::kafka("assign"))?;
                }
            }
            match missing {
                None => break assignment,
                Some(topic) if std::time::Instant::now() > deadline => {
                    return Err(SimError::Other(format!("topic '{topic}' does not exist")))
                }
                Some(_) => std::thread::sleep(Duration::from_millis(100)),
            }
        };
        consumer
            .assign(&assignment)
            .map_err(SimError::kafka("assign"))?;
        Ok(Self {
            consumer,
            partitions: assignment.count(),
            base,
        })
    }

    /// Appends the records that are available, waiting at most `wait` when there are none.
    pub fn poll_batch(&self, wait: Duration, into: &mut Vec<ReadRecord>) -> Result<(), SimError> {
        let mut timeout = wait;
        loop {
            match self.consumer.poll(timeout) {
                Some(Ok(m)) => into.push(read(&m)),
                Some(Err(KafkaError::PartitionEOF(_))) => {}
                Some(Err(e)) => {
                    return Err(SimError::Kafka {
                        operation: "read",
                        source: e,
                    })
                }
                None => return Ok(()),
            }
            timeout = Duration::ZERO;
        }
    }

    /// Reads every partition of one topic to its end: the high watermark as it stood when reading
    /// began. Under `read_committed` librdkafka reports end-of-partition at the last stable
    /// offset, which a transaction still open (a producer that crashed or froze, until the broker
    /// aborts it) holds back, with committed records beyond it: such an early end is waited
    /// past, or records written before the audit would be missed.
    fn read_topic_to_end(
        self,
        deadline: Instant,
        each: &mut dyn FnMut(ReadRecord),
    ) -> Result<(), SimError> {
        let assignment = self
            .consumer
            .assignment()
            .map_err(SimError::kafka("assignment"))?;
        // The high watermark as a read_uncommitted client sees it: a read_committed one is told
        // the last stable offset instead.
        let uncommitted: BaseConsumer = self
            .base
            .clone()
            .set("isolation.level", "read_uncommitted")
            .create()
            .map_err(SimError::kafka("create consumer"))?;
        // Per partition: topic, log start, end.
        let mut ends = std::collections::HashMap::new();
        for e in assignment.elements() {
            let (low, high) = uncommitted
                .fetch_watermarks(e.topic(), e.partition(), Duration::from_secs(10))
                .map_err(SimError::kafka("watermarks"))?;
            ends.insert(e.partition(), (e.topic().to_string(), low, high));
        }
        let mut done = std::collections::HashSet::new();
        // Partitions at their end with nothing read (no position to compare), and since when.
        let mut unread_since = std::collections::HashMap::new();
        while done.len() < self.partitions {
            if Instant::now() >= deadline {
                return Err(SimError::Other(format!(
                    "reading to the end timed out ({} of {} partitions done)",
                    done.len(),
                    self.partitions
                )));
            }
            match self.consumer.poll(Duration::from_millis(200)) {
                Some(Ok(m)) => {
                    unread_since.remove(&m.partition());
                    each(read(&m));
                }
                Some(Err(KafkaError::PartitionEOF(p))) => {
                    let Some((topic, low, high)) = ends.get(&p) else {
                        done.insert(p);
                        continue;
                    };
                    let position = self
                        .consumer
                        .position()
                        .ok()
                        .and_then(|all| all.find_partition(topic, p).map(|e| e.offset()));
                    match position {
                        Some(Offset::Offset(at)) if at >= *high => {
                            done.insert(p);
                        }
                        Some(Offset::Offset(_)) => {}
                        // Nothing read: an empty partition is done; else its records may all be
                        // aborted ones (then no position ever comes) or wait behind an open
                        // transaction: given a while below.
                        _ if low >= high => {
                            done.insert(p);
                        }
                        _ => {
                            unread_since.entry(p).or_insert_with(Instant::now);
                        }
                    }
                }
                Some(Err(e)) => {
                    return Err(SimError::Kafka {
                        operation: "read",
                        source: e,
                    })
                }
                None => {}
            }
            // Longer than a transaction may stay open in the local stack and the soak (the
            // broker aborts it after its timeout).
            for (p, since) in &unread_since {
                if since.elapsed() >= UNREAD_PARTITION_PATIENCE {
                    done.insert(*p);
                }
            }
        }
        Ok(())
    }
}

/// How long a partition at its end with nothing read is waited for (see `read_topic_to_end`).
const UNREAD_PARTITION_PATIENCE: Duration = Duration::from_secs(30);

/// Reads topics from the beginning to their current end, `read_committed`.
pub fn read_to_end(
    kafka: &(impl KafkaClients + ?Sized),
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<ReadRecord>, SimError> {
    let mut all = Vec::new();
    for_each_to_end(kafka, topics, timeout, &mut |r| all.push(r))?;
    Ok(all)
}

/// Like [`read_to_end`], handing each record to `each` as it is read instead of keeping them:
/// memory stays bounded whatever the size of the topics.
pub fn for_each_to_end(
    kafka: &(impl KafkaClients + ?Sized),
    topics: &[String],
    timeout: Duration,
    each: &mut dyn FnMut(ReadRecord),
) -> Result<(), SimError> {
    let deadline = Instant::now() + timeout;
    // One consumer per topic: end-of-partition events name the partition, not the topic.
    for topic in topics {
        let scanner = TopicScanner::new(kafka, std::slice::from_ref(topic))?;
        scanner.read_topic_to_end(deadline, each)?;
    }
    Ok(())
}

fn read<M: Message>(m: &M) -> ReadRecord {
    ReadRecord(InputRecord::from_message(m))
}
