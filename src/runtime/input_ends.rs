//! How far the input partitions reach, and since when: the facts that let a task know it has
//! consumed an input "up to time T" even when no record arrives on it.
//!
//! A thread of its own asks the brokers (ListOffsets, `read_committed`, so the answer is the last
//! stable offset) for the end of every input partition of the running tasks, every
//! [`QUERY_EVERY`]. Each answer is stored with the wall-clock time taken *before* the request:
//! every record appended before that time lies below the answered end (a partition's end only
//! grows), so a task whose position reached the end has consumed the partition up to that time.
//! While the brokers do not answer, the facts stop moving forward and time-based decisions wait:
//! nothing is concluded from silence.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::engine::sleep_unless_shutdown;
use super::stream_thread::Shutdown;
use super::task::Task;
use super::{RuntimeConfig, RuntimeError};

/// How often the ends are asked for.
pub const QUERY_EVERY: Duration = Duration::from_millis(250);
/// How long one request may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);

/// The end of one input partition (its last stable offset) and the wall-clock time, in ms since
/// the epoch, before which every record of the partition lies below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub offset: i64,
    pub as_of_ms: i64,
}

#[derive(Default)]
struct Inner {
    watched: BTreeSet<(String, i32)>,
    ends: BTreeMap<(String, i32), End>,
    /// Moves on every new answer, so readers skip work when nothing changed.
    generation: u64,
}

/// The shared table of input ends; see the module documentation.
#[derive(Default)]
pub struct InputEnds {
    inner: Mutex<Inner>,
}

pub fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

impl InputEnds {
    /// Sets the partitions to watch (the inputs of the running tasks); forgets the others.
    pub fn watch(&self, partitions: BTreeSet<(String, i32)>) {
        if let Ok(mut inner) = self.inner.lock() {
            inner.ends.retain(|tp, _| partitions.contains(tp));
            inner.watched = partitions;
        }
    }

    /// The latest end known for a partition.
    pub fn end(&self, topic: &str, partition: i32) -> Option<End> {
        let inner = self.inner.lock().ok()?;
        inner.ends.get(&(topic.to_string(), partition)).copied()
    }

    pub fn generation(&self) -> u64 {
        self.inner.lock().map_or(0, |inner| inner.generation)
    }

    fn watched(&self) -> BTreeSet<(String, i32)> {
        self.inner
            .lock()
            .map(|inner| inner.watched.clone())
            .unwrap_or_default()
    }

    /// Records answers taken at `as_of_ms`; an older answer never replaces a newer one.
    pub fn record(&self, answers: &[((String, i32), i64)], as_of_ms: i64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let mut changed = false;
        for (tp, offset) in answers {
            if !inner.watched.contains(tp) {
                continue;
            }
            let newer = inner.ends.get(tp).is_none_or(|e| e.as_of_ms < as_of_ms);
            if newer {
                inner.ends.insert(
                    tp.clone(),
                    End {
                        offset: *offset,
                        as_of_ms,
                    },
                );
                changed = true;
            }
        }
        if changed {
            inner.generation += 1;
        }
    }

    /// Starts the thread that keeps the table current until `shutdown` (or until `stop` is set
    /// by the generation that owns it). `client` carries the connection settings.
    pub fn spawn(
        self: &Arc<Self>,
        mut client: ClientConfig,
        shutdown: Shutdown,
        stop: Arc<AtomicBool>,
    ) -> std::io::Result<JoinHandle<()>> {
        let ends = self.clone();
        client
            .set("isolation.level", "read_committed")
            .set("enable.auto.commit", "false");
        std::thread::Builder::new()
            .name("input-ends".into())
            .spawn(move || {
                let consumer: BaseConsumer = match client.create() {
                    Ok(c) => c,
                    Err(e) => {
                        tracing::error!(error = %e, "cannot create the client that reads input ends; step timeouts will not fire");
                        return;
                    }
                };
                let stopped =
                    || shutdown.requested() || stop.load(Ordering::Relaxed);
                let mut failing = false;
                while !stopped() {
                    let watched = ends.watched();
                    if !watched.is_empty() {
                        match query(&consumer, &watched) {
                            Ok((answers, as_of_ms)) => {
                                if failing {
                                    tracing::info!("input ends answered again");
                                    failing = false;
                                }
                                ends.record(&answers, as_of_ms);
                            }
                            Err(e) => {
                                if !failing {
                                    tracing::warn!(error = %e, "cannot read the ends of the inputs; time-based decisions wait until they answer");
                                    failing = true;
                                }
                            }
                        }
                    }
                    if !sleep_unless_shutdown(&shutdown, QUERY_EVERY) {
                        return;
                    }
                }
            })
    }
}

/// The engine's side: keeps the watched set equal to the running tasks' inputs and tells each
/// task which of its inputs it has consumed to the end, and as of when.
pub struct InputEndsTracker {
    ends: Arc<InputEnds>,
    /// Tells the thread to stop when the engine (one generation of the clients) goes away.
    stop: Arc<AtomicBool>,
    watched: BTreeSet<(String, i32)>,
    seen: u64,
}

impl InputEndsTracker {
    /// Starts the thread that reads the ends, with the runtime's connection settings.
    pub fn start(config: &RuntimeConfig, shutdown: &Shutdown) -> Result<Self, RuntimeError> {
        let mut client = ClientConfig::new();
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        client.set("bootstrap.servers", &config.bootstrap);
        let ends = Arc::new(InputEnds::default());
        let stop = Arc::new(AtomicBool::new(false));
        ends.spawn(client, shutdown.clone(), stop.clone())
            .map_err(|e| {
                RuntimeError::ClientStuck(format!("cannot start the input-ends thread: {e}"))
            })?;
        Ok(Self {
            ends,
            stop,
            watched: BTreeSet::new(),
            seen: 0,
        })
    }

    /// Brings the tasks' input times forward: an input whose queue is empty and whose position
    /// (the task's, or the consumer's, which also steps over transaction markers) has reached an
    /// end read at time T was consumed up to T. Call it after the polled records were handed to
    /// the tasks, never while a rewind is pending (positions are not the tasks' then).
    pub fn observe<C: ConsumerContext>(
        &mut self,
        consumer: &BaseConsumer<C>,
        tasks: &mut BTreeMap<i32, Task>,
    ) {
        let watched: BTreeSet<(String, i32)> = tasks
            .iter()
            .flat_map(|(p, task)| task.input_topics().map(move |t| (t.clone(), *p)))
            .collect();
        if watched != self.watched {
            self.ends.watch(watched.clone());
            self.watched = watched;
        }
        let generation = self.ends.generation();
        if generation == self.seen || tasks.is_empty() {
            return;
        }
        self.seen = generation;
        let positions = consumer.position().ok();
        for (&partition, task) in tasks.iter_mut() {
            let topics: Vec<String> = task.input_topics().cloned().collect();
            for topic in topics {
                if task.queued(&topic) > 0 {
                    continue;
                }
                let Some(end) = self.ends.end(&topic, partition) else {
                    continue;
                };
                let fetched = positions
                    .as_ref()
                    .and_then(|list| list.find_partition(&topic, partition))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                let position = task.position(&topic).into_iter().chain(fetched).max();
                if position.is_some_and(|p| p >= end.offset) {
                    task.caught_up(&topic, end.as_of_ms);
                }
            }
        }
    }
}

impl Drop for InputEndsTracker {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

type Answers = (Vec<((String, i32), i64)>, i64);

/// One ListOffsets round for `partitions`: their last stable offsets, and the time taken before
/// the request was sent.
fn query(
    consumer: &BaseConsumer,
    partitions: &BTreeSet<(String, i32)>,
) -> Result<Answers, rdkafka::error::KafkaError> {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in partitions {
        list.add_partition_offset(topic, *partition, Offset::End)?;
    }
    let as_of_ms = now_ms();
    let answered = consumer.offsets_for_times(list, QUERY_TIMEOUT)?;
    let answers = answered
        .elements()
        .iter()
        .filter(|e| e.error().is_ok())
        .filter_map(|e| match e.offset() {
            Offset::Offset(offset) => Some(((e.topic().to_string(), e.partition()), offset)),
            _ => None,
        })
        .collect();
    Ok((answers, as_of_ms))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_for_watched_partitions_only_and_never_older() {
        let ends = InputEnds::default();
        let a = ("a".to_string(), 0);
        ends.watch(BTreeSet::from([a.clone()]));
        ends.record(&[(a.clone(), 10), (("b".into(), 0), 5)], 100);
        assert_eq!(
            ends.end("a", 0),
            Some(End {
                offset: 10,
                as_of_ms: 100
            })
        );
        assert_eq!(ends.end("b", 0), None);
        let generation = ends.generation();
        ends.record(&[(a.clone(), 7)], 90);
        assert_eq!(ends.end("a", 0).map(|e| e.offset), Some(10));
        assert_eq!(ends.generation(), generation);
        ends.watch(BTreeSet::new());
        assert_eq!(ends.end("a", 0), None);
    }
}
