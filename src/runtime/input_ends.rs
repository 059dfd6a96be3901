//! How far the input partitions reach, and since when: the facts that let a task know it has
//! consumed an input "up to time T" even when no record arrives on it.
//!
//! A thread of its own asks the brokers (ListOffsets) for the high watermark of every input
//! partition of the running tasks, every [`QUERY_EVERY`], and keeps the last [`ENDS_KEPT`]
//! answers per partition, each with the wall-clock time taken *before* the request: every record
//! appended before that time lies below the answered offset. The high watermark, not the last
//! stable offset: a transaction still open below it holds back the last stable offset, and a
//! reply committed after it would lie above. A task's `read_committed` position can only pass an
//! answered watermark once every transaction below it is resolved, so a task whose position
//! reached it has consumed everything of the partition appended before that time. While the
//! brokers do not answer, the facts stop moving forward and time-based decisions wait: nothing is
//! concluded from silence.

use std::collections::{BTreeMap, BTreeSet, VecDeque};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::{Offset, TopicPartitionList};

use super::engine::sleep_unless_shutdown;
use super::stream_thread::Shutdown;
use super::task::Task;
use super::{RuntimeConfig, RuntimeError};

/// How often the ends are asked for.
pub const QUERY_EVERY: Duration = Duration::from_millis(250);
/// Answers kept per partition (about 16 s): a task a little behind a growing end still finds one
/// its position has reached.
pub const ENDS_KEPT: usize = 64;
/// How long one request may take.
const QUERY_TIMEOUT: Duration = Duration::from_secs(5);
/// How long one partition's request may take when they are asked one by one.
const PARTITION_QUERY_TIMEOUT: Duration = Duration::from_secs(2);
/// How often the tasks' positions are compared with the ends.
const OBSERVE_EVERY: Duration = Duration::from_millis(50);

/// An answered end of one input partition (its high watermark) and the wall-clock time, in ms
/// since the epoch, before which every record of the partition lies below it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct End {
    pub offset: i64,
    pub as_of_ms: i64,
}

#[derive(Default)]
struct Inner {
    watched: BTreeSet<(String, i32)>,
    /// Oldest first.
    ends: BTreeMap<(String, i32), VecDeque<End>>,
    /// Moves on every new answer.
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

    /// The newest answered end of a partition that `position` has reached.
    pub fn reached(&self, topic: &str, partition: i32, position: i64) -> Option<End> {
        let inner = self.inner.lock().ok()?;
        inner
            .ends
            .get(&(topic.to_string(), partition))?
            .iter()
            .rev()
            .find(|end| end.offset <= position)
            .copied()
    }

    /// The newest answered end of a partition.
    pub fn latest(&self, topic: &str, partition: i32) -> Option<End> {
        let inner = self.inner.lock().ok()?;
        inner
            .ends
            .get(&(topic.to_string(), partition))?
            .back()
            .copied()
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

    /// Records answers taken at `as_of_ms`; answers older than the newest kept are ignored.
    pub fn record(&self, answers: &[((String, i32), i64)], as_of_ms: i64) {
        let Ok(mut inner) = self.inner.lock() else {
            return;
        };
        let mut changed = false;
        for (tp, offset) in answers {
            if !inner.watched.contains(tp) {
                continue;
            }
            let kept = inner.ends.entry(tp.clone()).or_default();
            if kept.back().is_some_and(|e| e.as_of_ms >= as_of_ms) {
                continue;
            }
            kept.push_back(End {
                offset: *offset,
                as_of_ms,
            });
            while kept.len() > ENDS_KEPT {
                kept.pop_front();
            }
            changed = true;
        }
        if changed {
            inner.generation += 1;
        }
    }

    /// Keeps the table current on a thread of its own with `consumer` until `shutdown`, or
    /// until `stop` is set by the engine that owns it.
    fn run(self: Arc<Self>, consumer: BaseConsumer, shutdown: Shutdown, stop: Arc<AtomicBool>) {
        let stopped = || shutdown.requested() || stop.load(Ordering::Relaxed);
        let mut failing = false;
        while !stopped() {
            // Serves the client's own events (logs, errors) so they do not pile up.
            let _ = consumer.poll(Duration::ZERO);
            let watched = self.watched();
            if !watched.is_empty() {
                let as_of_ms = now_ms();
                let (answers, complete) = query(&consumer, &watched, &stopped);
                self.record(&answers, as_of_ms);
                match (complete, failing) {
                    (false, false) => {
                        tracing::warn!(
                            answered = answers.len(),
                            watched = watched.len(),
                            "cannot read the ends of some inputs; their step timeouts wait until they answer"
                        );
                        failing = true;
                    }
                    (true, true) => {
                        tracing::info!("the ends of every input answer again");
                        failing = false;
                    }
                    _ => {}
                }
            }
            if !sleep_unless_shutdown(&shutdown, QUERY_EVERY) {
                return;
            }
        }
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
    observed_at: Option<Instant>,
}

impl InputEndsTracker {
    /// Creates the client that reads the ends (with the runtime's connection settings) and
    /// starts its thread. A client that cannot be created fails the engine's start, like its
    /// other clients.
    pub fn start(config: &RuntimeConfig, shutdown: &Shutdown) -> Result<Self, RuntimeError> {
        let mut client = ClientConfig::new();
        for (key, value) in &config.kafka {
            client.set(key, value);
        }
        let consumer: BaseConsumer = client
            .set("bootstrap.servers", &config.bootstrap)
            .set("isolation.level", "read_uncommitted")
            .set("enable.auto.commit", "false")
            .set("statistics.interval.ms", "0")
            .create()
            .map_err(RuntimeError::kafka("create the input-ends client"))?;
        let ends = Arc::new(InputEnds::default());
        let stop = Arc::new(AtomicBool::new(false));
        let (table, thread_shutdown, thread_stop) = (ends.clone(), shutdown.clone(), stop.clone());
        std::thread::Builder::new()
            .name("input-ends".into())
            .spawn(move || table.run(consumer, thread_shutdown, thread_stop))
            .map_err(|e| {
                RuntimeError::ClientStuck(format!("cannot start the input-ends thread: {e}"))
            })?;
        Ok(Self {
            ends,
            stop,
            watched: BTreeSet::new(),
            seen: 0,
            observed_at: None,
        })
    }

    /// The newest answered end of input `topic` [`partition`] (its high watermark).
    pub fn latest_end(&self, topic: &str, partition: i32) -> Option<End> {
        self.ends.latest(topic, partition)
    }

    /// Stops the thread (also done on drop; an engine whose consumer is left behind is never
    /// dropped).
    pub fn stop(&self) {
        self.stop.store(true, Ordering::Relaxed);
    }

    /// Brings the tasks' input times forward: an input whose queue is empty and whose position
    /// (the task's, or the consumer's, which also steps over transaction markers) has reached an
    /// end answered at time T was consumed up to T. Call it after the polled records were handed
    /// to the tasks, never while a rewind is pending (positions are not the tasks' then).
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
        let recently = self
            .observed_at
            .is_some_and(|at| at.elapsed() < OBSERVE_EVERY);
        if tasks.is_empty() || (generation == self.seen && recently) {
            return;
        }
        self.seen = generation;
        self.observed_at = Some(Instant::now());
        let positions = consumer.position().ok();
        for (&partition, task) in tasks.iter_mut() {
            let topics: Vec<String> = task.input_topics().cloned().collect();
            for topic in topics {
                if task.queued(&topic) > 0 {
                    continue;
                }
                let fetched = positions
                    .as_ref()
                    .and_then(|list| list.find_partition(&topic, partition))
                    .and_then(|e| match e.offset() {
                        Offset::Offset(o) => Some(o),
                        _ => None,
                    });
                let Some(position) = task.position(&topic).into_iter().chain(fetched).max() else {
                    continue;
                };
                if let Some(end) = self.ends.reached(&topic, partition, position) {
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

/// Answered ends: (topic, partition) and offset.
type Answers = Vec<((String, i32), i64)>;

/// One round of requests for `partitions`' high watermarks: all in one request, or, when that
/// fails (one partition without a leader fails it all), one partition at a time, so the others
/// still move on. Returns the answers and whether every partition answered.
fn query(
    consumer: &BaseConsumer,
    partitions: &BTreeSet<(String, i32)>,
    stopped: &dyn Fn() -> bool,
) -> (Answers, bool) {
    let mut list = TopicPartitionList::new();
    for (topic, partition) in partitions {
        if list
            .add_partition_offset(topic, *partition, Offset::End)
            .is_err()
        {
            return (Vec::new(), false);
        }
    }
    if let Ok(answered) = consumer.offsets_for_times(list, QUERY_TIMEOUT) {
        let answers: Answers = answered
            .elements()
            .iter()
            .filter(|e| e.error().is_ok())
            .filter_map(|e| match e.offset() {
                Offset::Offset(offset) => Some(((e.topic().to_string(), e.partition()), offset)),
                _ => None,
            })
            .collect();
        let complete = answers.len() == partitions.len();
        return (answers, complete);
    }
    let mut answers = Vec::new();
    for (topic, partition) in partitions {
        if stopped() {
            break;
        }
        if let Ok((_, high)) = consumer.fetch_watermarks(topic, *partition, PARTITION_QUERY_TIMEOUT)
        {
            answers.push(((topic.clone(), *partition), high));
        }
    }
    let complete = answers.len() == partitions.len();
    (answers, complete)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_newest_end_a_position_reached_counts_for_watched_partitions_only() {
        let ends = InputEnds::default();
        let a = ("a".to_string(), 0);
        ends.watch(BTreeSet::from([a.clone()]));
        ends.record(&[(a.clone(), 10), (("b".into(), 0), 5)], 100);
        ends.record(&[(a.clone(), 20)], 200);
        assert_eq!(ends.reached("b", 0, 50), None);
        // Behind the newest end, the older one it reached still counts.
        assert_eq!(
            ends.reached("a", 0, 15),
            Some(End {
                offset: 10,
                as_of_ms: 100
            })
        );
        assert_eq!(ends.reached("a", 0, 20).map(|e| e.as_of_ms), Some(200));
        assert_eq!(ends.reached("a", 0, 9), None);
        // An answer older than the newest kept is ignored.
        let generation = ends.generation();
        ends.record(&[(a.clone(), 30)], 150);
        assert_eq!(ends.generation(), generation);
        for i in 0..ENDS_KEPT as i64 {
            ends.record(&[(a.clone(), 100 + i)], 300 + i);
        }
        assert_eq!(ends.reached("a", 0, 20), None, "old answers are dropped");
        ends.watch(BTreeSet::new());
        assert_eq!(ends.reached("a", 0, 1_000), None);
    }
}
