//! `saga-streams lag`: the lag of any consumer group, per partition, counted to the last stable
//! offset (what `read_committed` consumers can reach).
//!
//! A transactional producer leaves a commit marker after its records, and a consumer's committed
//! offset stops before it (the marker is never delivered to the application). End minus committed
//! would then show a phantom lag of 1 behind each transaction. When the gap is small, the records
//! in it are read (`read_committed`) and only data records are counted, so the lag is exactly 0
//! once everything committed was processed.

use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::{Offset, TopicPartitionList};

use crate::runtime::client::KafkaClients;
use crate::runtime::EofContext;

/// Gaps up to this size are read to tell data records from transaction markers.
const VERIFY_GAP: i64 = 1_000;

/// One partition's lag.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PartitionLag {
    pub topic: String,
    pub partition: i32,
    /// The group's committed offset, as the broker holds it.
    pub committed: i64,
    /// The last stable offset.
    pub end: i64,
    /// Data records between the committed offset and the end.
    pub lag: i64,
}

fn consumer(
    kafka: &(impl KafkaClients + ?Sized),
    group: &str,
) -> Result<BaseConsumer<EofContext>, String> {
    kafka
        .client_config()
        .set("group.id", group)
        .set("enable.auto.commit", "false")
        .set("isolation.level", "read_committed")
        .set("enable.partition.eof", "true")
        .create_with_context(EofContext)
        .map_err(|e| format!("creating a consumer: {e}"))
}

/// The lag of `group` on `topics` (all topics it has committed offsets on when empty).
pub fn group_lag(
    kafka: &(impl KafkaClients + ?Sized),
    group: &str,
    topics: &[String],
    timeout: Duration,
) -> Result<Vec<PartitionLag>, String> {
    // A consumer with the group's id that never subscribes: it reads the group's committed
    // offsets without joining the group.
    let client = consumer(kafka, group)?;
    let metadata = client
        .fetch_metadata(None, timeout)
        .map_err(|e| format!("fetching metadata: {e}"))?;
    let mut partitions = TopicPartitionList::new();
    for t in metadata.topics() {
        let wanted = if topics.is_empty() {
            !t.name().starts_with("__")
        } else {
            topics.iter().any(|x| x == t.name())
        };
        if wanted && t.error().is_none() {
            for p in t.partitions() {
                partitions.add_partition(t.name(), p.id());
            }
        }
    }
    for topic in topics {
        if !metadata.topics().iter().any(|t| t.name() == topic) {
            return Err(format!("topic '{topic}' does not exist"));
        }
    }
    let committed = client
        .committed_offsets(partitions, timeout)
        .map_err(|e| format!("fetching the committed offsets of group '{group}': {e}"))?;
    let mut lags = Vec::new();
    for e in committed.elements() {
        let committed = match e.offset() {
            Offset::Offset(o) => o,
            // No offset committed: listed only when the topics were asked for.
            _ if topics.is_empty() => continue,
            _ => 0,
        };
        let (_, end) = client
            .fetch_watermarks(e.topic(), e.partition(), timeout)
            .map_err(|err| format!("end offset of {}/{}: {err}", e.topic(), e.partition()))?;
        let gap = end - committed;
        let lag = if gap > 0 && gap <= VERIFY_GAP {
            data_records(kafka, e.topic(), e.partition(), committed, end, timeout)?
        } else {
            gap.max(0)
        };
        lags.push(PartitionLag {
            topic: e.topic().to_string(),
            partition: e.partition(),
            committed,
            end,
            lag,
        });
    }
    lags.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
    Ok(lags)
}

/// Counts the records `read_committed` delivers in `[from, end)`.
fn data_records(
    kafka: &(impl KafkaClients + ?Sized),
    topic: &str,
    partition: i32,
    from: i64,
    end: i64,
    timeout: Duration,
) -> Result<i64, String> {
    let reader = consumer(kafka, &format!("saga-streams-lag-{}", uuid::Uuid::new_v4()))?;
    let mut tpl = TopicPartitionList::new();
    tpl.add_partition_offset(topic, partition, Offset::Offset(from))
        .map_err(|e| e.to_string())?;
    reader.assign(&tpl).map_err(|e| e.to_string())?;
    let deadline = Instant::now() + timeout;
    let mut count = 0;
    while Instant::now() < deadline {
        match reader.poll(Duration::from_millis(200)) {
            Some(Ok(m)) if m.offset() < end => count += 1,
            Some(Ok(_)) | Some(Err(KafkaError::PartitionEOF(_))) => return Ok(count),
            Some(Err(e)) => return Err(format!("reading {topic}/{partition}: {e}")),
            None => {}
        }
    }
    Err(format!(
        "reading {topic}/{partition} from {from} to {end} took longer than {timeout:?}"
    ))
}

/// The lag as a table with totals.
pub fn table(lags: &[PartitionLag]) -> String {
    let mut t = comfy_table::Table::new();
    t.set_header(vec![
        "topic",
        "partition",
        "committed offset",
        "end offset",
        "lag",
    ]);
    for l in lags {
        t.add_row(vec![
            l.topic.clone(),
            l.partition.to_string(),
            l.committed.to_string(),
            l.end.to_string(),
            l.lag.to_string(),
        ]);
    }
    t.add_row(vec![
        "total".to_string(),
        lags.len().to_string(),
        String::new(),
        String::new(),
        lags.iter().map(|l| l.lag).sum::<i64>().to_string(),
    ]);
    t.to_string()
}
