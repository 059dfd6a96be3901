//! A task: the unit of parallelism, one partition number across all input topics. It owns the
//! processor instance, the stores' backend and this cycle's pending writes, and a queue per input
//! partition from which records are taken in timestamp order.

use std::collections::{BTreeMap, VecDeque};
use std::time::{Duration, Instant, SystemTime};

use super::processor::{
    InputRecord, OutputRecord, Processor, ProcessorContext, ProcessorError, TaskStores,
};
use crate::state::{CommitBatch, PendingWrites, StateError, StoreBackend};

pub struct Task {
    pub partition: i32,
    processor: Box<dyn Processor>,
    backend: Box<dyn StoreBackend>,
    /// This cycle's writes per store; empty maps for stores untouched.
    pending: BTreeMap<String, PendingWrites>,
    /// Fetched but not yet processed records, per input topic.
    queues: BTreeMap<String, VecDeque<InputRecord>>,
    /// Bytes (keys, values, headers) held in each queue: the back-pressure bound.
    queued_bytes: BTreeMap<String, usize>,
    /// Next offset to process, per input topic: the offsets every transaction of this task sends
    /// (also when only timers fired, so a zombie is always fenced by the group epoch).
    positions: BTreeMap<String, i64>,
    /// The positions of the last commit: where the inputs are rewound to after an abort.
    committed: BTreeMap<String, i64>,
    /// Records processed in the open cycle.
    processed_in_cycle: usize,
    /// Wall-clock punctuation asked for by the processor, and when it is next due.
    punctuation: Option<Duration>,
    next_punctuation: Option<Instant>,
    /// Per input topic whose queue is empty while the task holds records: since when (each
    /// empty spell of each input gets its own wait, as in Kafka Streams).
    empty_since: BTreeMap<String, Instant>,
    /// Per input topic, the time (ms since the epoch) up to which the task has consumed it: the
    /// largest timestamp it processed, or a time at which its position had reached the end of
    /// the partition (see [`super::input_ends`]), whichever is later.
    input_times: BTreeMap<String, i64>,
    /// The same as of the last commit: an abort takes back what its cycle consumed.
    committed_input_times: BTreeMap<String, i64>,
    /// Per input topic, when the consumer last delivered one of its records to the task.
    delivered_at: BTreeMap<String, Instant>,
    /// Per input topic, the oldest timestamp among the records processed since the last commit
    /// (an aborted cycle's too: they are read again, still not committed), for the lag in time.
    uncommitted_oldest: BTreeMap<String, i64>,
}

impl Task {
    /// Builds the task and calls the processor's `init`. `backend` must already be restored;
    /// `positions` are the committed input offsets the task starts from.
    pub fn start(
        partition: i32,
        positions: BTreeMap<String, i64>,
        input_topics: &[String],
        stores: &[String],
        backend: Box<dyn StoreBackend>,
        mut processor: Box<dyn Processor>,
        outputs: &mut Vec<OutputRecord>,
    ) -> Result<Self, ProcessorError> {
        let mut pending: BTreeMap<String, PendingWrites> = stores
            .iter()
            .map(|s| (s.clone(), PendingWrites::default()))
            .collect();
        let mut punctuation = None;
        {
            let mut ctx = ProcessorContext {
                partition,
                stores: TaskStores {
                    backend: backend.as_ref(),
                    pending: &mut pending,
                },
                outputs,
                punctuation: &mut punctuation,
                input_time_ms: None,
            };
            processor.init(&mut ctx)?;
        }
        Ok(Self {
            partition,
            processor,
            backend,
            pending,
            queues: input_topics
                .iter()
                .map(|t| (t.clone(), VecDeque::new()))
                .collect(),
            queued_bytes: input_topics.iter().map(|t| (t.clone(), 0)).collect(),
            committed: positions.clone(),
            positions,
            processed_in_cycle: 0,
            next_punctuation: punctuation.map(|p| Instant::now() + p),
            punctuation,
            empty_since: BTreeMap::new(),
            input_times: BTreeMap::new(),
            committed_input_times: BTreeMap::new(),
            uncommitted_oldest: BTreeMap::new(),
            delivered_at: BTreeMap::new(),
        })
    }

    /// The time up to which every input partition of the task has been consumed: no record
    /// appended before it is still to come. `None` until every input has a known time.
    pub fn input_time(&self) -> Option<i64> {
        self.queues
            .iter()
            .map(|(topic, queue)| {
                let consumed = self.input_times.get(topic).copied()?;
                // Timestamps need not grow with offsets: a record still queued may be older
                // than one processed before it.
                Some(match queue.front() {
                    Some(next) => consumed.min(next.timestamp_ms.saturating_sub(1)),
                    None => consumed,
                })
            })
            .try_fold(i64::MAX, |min, t| t.map(|t| min.min(t)))
    }

    /// Notes that input `topic` was consumed up to `as_of_ms`: its position has reached an end
    /// of the partition read at that time, and nothing of it is left in the queue.
    pub fn caught_up(&mut self, topic: &str, as_of_ms: i64) {
        if let Some(t) = self.input_times.get_mut(topic) {
            *t = (*t).max(as_of_ms);
        } else if self.queues.contains_key(topic) {
            self.input_times.insert(topic.to_string(), as_of_ms);
        }
    }

    /// The next offset the task processes on input `topic`.
    pub fn position(&self, topic: &str) -> Option<i64> {
        self.positions.get(topic).copied()
    }

    /// The input topics of the task.
    pub fn input_topics(&self) -> impl Iterator<Item = &String> {
        self.queues.keys()
    }

    /// Buffers a fetched record; returns the bytes now queued for its input partition.
    pub fn enqueue(&mut self, record: InputRecord) -> usize {
        let size = record.size();
        match (
            self.queues.get_mut(&record.topic),
            self.queued_bytes.get_mut(&record.topic),
        ) {
            (Some(queue), Some(bytes)) => {
                *bytes += size;
                let now = Instant::now();
                match self.delivered_at.get_mut(&record.topic) {
                    Some(at) => *at = now,
                    None => {
                        self.delivered_at.insert(record.topic.clone(), now);
                    }
                }
                queue.push_back(record);
                *bytes
            }
            _ => 0,
        }
    }

    /// A reader of the task's committed stores for other threads (queries), when its backend
    /// offers one.
    pub fn reader(&self) -> Option<std::sync::Arc<dyn crate::state::ReadStore>> {
        self.backend.reader()
    }

    /// Bytes queued for input `topic`.
    pub fn queued_bytes(&self, topic: &str) -> usize {
        self.queued_bytes.get(topic).copied().unwrap_or(0)
    }

    /// Whether [`Task::next_record`] would hand out a record now (used to decide whether the
    /// loop may sleep in `poll`).
    pub fn can_process(&self, now: Instant, max_idle: Duration) -> bool {
        if self.buffered() == 0 {
            return false;
        }
        max_idle.is_zero()
            || self.queues.iter().all(|(topic, queue)| {
                !queue.is_empty()
                    || self
                        .empty_since
                        .get(topic)
                        .is_some_and(|since| now.duration_since(*since) >= max_idle)
            })
    }

    /// When the punctuation is next due.
    pub fn next_punctuation(&self) -> Option<Instant> {
        self.next_punctuation
    }

    pub fn buffered(&self) -> usize {
        self.queues.values().map(VecDeque::len).sum()
    }

    /// The timestamp (ms) of the oldest record of `topic` not committed yet: buffered, or
    /// processed since the last commit. `None` when there is none.
    pub fn oldest_pending_ms(&self, topic: &str) -> Option<i64> {
        let queued = self
            .queues
            .get(topic)
            .and_then(|q| q.iter().map(|r| r.timestamp_ms).min());
        match (queued, self.uncommitted_oldest.get(topic).copied()) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    /// When the consumer last delivered a record of `topic` to the task.
    pub fn delivered_at(&self, topic: &str) -> Option<Instant> {
        self.delivered_at.get(topic).copied()
    }

    /// The time (ms) up to which the task has consumed `topic` (see `input_times`).
    pub fn input_time_ms(&self, topic: &str) -> Option<i64> {
        self.input_times.get(topic).copied()
    }

    /// Records of `topic` buffered and not yet processed.
    pub fn queued(&self, topic: &str) -> usize {
        self.queues.get(topic).map_or(0, VecDeque::len)
    }

    /// Takes the next record in timestamp order (ties: the topic listed first). When an input
    /// queue is empty, waits up to `max_idle` from when it became empty for it to fill before
    /// going on without it; each empty spell of each input is waited for once.
    pub fn next_record(&mut self, now: Instant, max_idle: Duration) -> Option<InputRecord> {
        if self.buffered() == 0 {
            self.empty_since.clear();
            return None;
        }
        for (topic, queue) in &self.queues {
            if queue.is_empty() {
                self.empty_since.entry(topic.clone()).or_insert(now);
            } else {
                self.empty_since.remove(topic);
            }
        }
        if !max_idle.is_zero()
            && self
                .empty_since
                .values()
                .any(|since| now.duration_since(*since) < max_idle)
        {
            return None;
        }
        let topic = self
            .queues
            .iter()
            .filter_map(|(topic, queue)| queue.front().map(|r| (r.timestamp_ms, topic)))
            .min_by_key(|(ts, _)| *ts)
            .map(|(_, topic)| topic.clone())?;
        let record = self.queues.get_mut(&topic).and_then(VecDeque::pop_front)?;
        if let Some(bytes) = self.queued_bytes.get_mut(&topic) {
            *bytes = bytes.saturating_sub(record.size());
        }
        Some(record)
    }

    /// Calls the processor with a context over this task's stores and punctuation schedule.
    fn with_context<R>(
        &mut self,
        outputs: &mut Vec<OutputRecord>,
        call: impl FnOnce(&mut dyn Processor, &mut ProcessorContext<'_>) -> R,
    ) -> R {
        let input_time_ms = self.input_time();
        let mut ctx = ProcessorContext {
            partition: self.partition,
            stores: TaskStores {
                backend: self.backend.as_ref(),
                pending: &mut self.pending,
            },
            outputs,
            punctuation: &mut self.punctuation,
            input_time_ms,
        };
        call(self.processor.as_mut(), &mut ctx)
    }

    /// Runs the processor on one record; the record counts as processed for the offset commit.
    pub fn process(
        &mut self,
        record: &InputRecord,
        outputs: &mut Vec<OutputRecord>,
    ) -> Result<(), ProcessorError> {
        self.with_context(outputs, |processor, ctx| processor.process(ctx, record))?;
        // Updated in place: no allocation per record once the topic has been seen.
        match self.positions.get_mut(&record.topic) {
            Some(offset) => *offset = record.offset + 1,
            None => {
                self.positions
                    .insert(record.topic.clone(), record.offset + 1);
            }
        }
        // A producer whose clock runs ahead does not carry input time past the present.
        let consumed = record.timestamp_ms.min(super::input_ends::now_ms());
        match self.input_times.get_mut(&record.topic) {
            Some(t) => *t = (*t).max(consumed),
            None => {
                self.input_times.insert(record.topic.clone(), consumed);
            }
        }
        let oldest = self
            .uncommitted_oldest
            .entry(record.topic.clone())
            .or_insert(record.timestamp_ms);
        *oldest = (*oldest).min(record.timestamp_ms);
        self.processed_in_cycle += 1;
        Ok(())
    }

    /// Fires the punctuation when due.
    pub fn maybe_punctuate(
        &mut self,
        now: Instant,
        outputs: &mut Vec<OutputRecord>,
    ) -> Result<bool, ProcessorError> {
        let (Some(interval), Some(due)) = (self.punctuation, self.next_punctuation) else {
            return Ok(false);
        };
        if now < due {
            return Ok(false);
        }
        self.with_context(outputs, |processor, ctx| {
            processor.punctuate(ctx, SystemTime::now())
        })?;
        let interval = self.punctuation.unwrap_or(interval);
        self.next_punctuation = Some(now + interval);
        Ok(true)
    }

    /// Input offsets to commit (last processed + 1), for every input of the task, whether or not
    /// it moved in this cycle.
    pub fn offsets_to_commit(&self) -> impl Iterator<Item = (&String, i64)> {
        self.positions
            .iter()
            .map(|(topic, offset)| (topic, *offset))
    }

    /// The offsets of the last commit, per input topic: where an abort rewinds to.
    pub fn committed_positions(&self) -> impl Iterator<Item = (&String, i64)> {
        self.committed
            .iter()
            .map(|(topic, offset)| (topic, *offset))
    }

    /// This cycle's changed keys, per store (last value per key).
    pub fn pending_changes(&self) -> impl Iterator<Item = (&String, &PendingWrites)> {
        self.pending.iter().filter(|(_, p)| !p.is_empty())
    }

    pub fn has_work_in_cycle(&self) -> bool {
        self.processed_in_cycle > 0 || self.pending.values().any(|p| !p.is_empty())
    }

    /// After the transaction committed: the positions it carried are the new rewind point, and
    /// the overlays and checkpoints go to the backend. On an error the backend holds its previous
    /// state and checkpoint (the batch is atomic): the caller closes the task and restores it.
    pub fn apply_committed(
        &mut self,
        checkpoints: BTreeMap<String, i64>,
    ) -> Result<(), StateError> {
        self.committed.clone_from(&self.positions);
        self.committed_input_times.clone_from(&self.input_times);
        self.uncommitted_oldest.clear();
        self.processed_in_cycle = 0;
        let mut batch = CommitBatch {
            checkpoints,
            ..Default::default()
        };
        for (store, pending) in self.pending.iter_mut() {
            if !pending.is_empty() {
                batch.changes.insert(store.clone(), pending.take());
            }
        }
        if batch.changes.is_empty() && batch.checkpoints.is_empty() {
            return Ok(());
        }
        self.backend.apply(batch)
    }

    /// After an abort: forgets this cycle's writes and every buffered record (inputs are
    /// rewound to the committed offsets and fetched again).
    pub fn discard_cycle(&mut self) {
        for pending in self.pending.values_mut() {
            pending.clear();
        }
        for queue in self.queues.values_mut() {
            queue.clear();
        }
        for bytes in self.queued_bytes.values_mut() {
            *bytes = 0;
        }
        self.positions.clone_from(&self.committed);
        self.input_times.clone_from(&self.committed_input_times);
        self.processed_in_cycle = 0;
        self.empty_since.clear();
        self.processor.cycle_aborted();
    }

    pub fn close(mut self) {
        self.processor.close();
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::state::memory::MemoryBackend;

    struct Recorder;
    impl Processor for Recorder {
        fn process(
            &mut self,
            ctx: &mut ProcessorContext<'_>,
            record: &InputRecord,
        ) -> Result<(), ProcessorError> {
            let mut store = ctx.store("seen")?;
            store.put(
                record.key.as_deref().unwrap_or_default(),
                record.topic.as_bytes(),
            );
            Ok(())
        }
    }

    fn record(topic: &str, offset: i64, ts: i64) -> InputRecord {
        InputRecord {
            topic: topic.into(),
            partition: 0,
            offset,
            timestamp_ms: ts,
            key: Some(format!("{topic}-{offset}").into_bytes()),
            value: None,
            headers: vec![],
        }
    }

    fn task() -> Task {
        Task::start(
            0,
            BTreeMap::new(),
            &["a".into(), "b".into()],
            &["seen".into()],
            Box::new(MemoryBackend::new()),
            Box::new(Recorder),
            &mut Vec::new(),
        )
        .unwrap()
    }

    #[test]
    fn records_come_out_in_timestamp_order_across_inputs() {
        let mut t = task();
        t.enqueue(record("a", 0, 10));
        t.enqueue(record("a", 1, 30));
        t.enqueue(record("b", 0, 20));
        let now = Instant::now();
        let order: Vec<_> = std::iter::from_fn(|| t.next_record(now, Duration::ZERO))
            .map(|r| (r.topic, r.offset))
            .collect();
        assert_eq!(
            order,
            vec![("a".into(), 0), ("b".into(), 0), ("a".into(), 1)]
        );
    }

    #[test]
    fn an_empty_input_delays_the_task_at_most_max_idle() {
        let mut t = task();
        t.enqueue(record("a", 0, 10));
        let start = Instant::now();
        let idle = Duration::from_millis(50);
        assert!(t.next_record(start, idle).is_none());
        assert!(t
            .next_record(start + Duration::from_millis(10), idle)
            .is_none());
        assert!(t.next_record(start + idle, idle).is_some());
    }

    #[test]
    fn each_empty_spell_of_each_input_is_waited_for_once() {
        let mut t = task();
        for offset in 0..3 {
            t.enqueue(record("a", offset, 10 + offset));
        }
        let start = Instant::now();
        let idle = Duration::from_millis(50);
        // `b` is empty: wait, then go on without it, record after record.
        assert!(t.next_record(start, idle).is_none());
        let later = start + idle;
        assert!(t.next_record(later, idle).is_some());
        assert!(t.can_process(later, idle));
        assert!(t.next_record(later, idle).is_some());
        // `b` has a record, then `a` runs empty: a new wait, for `a`, although `b`'s is over.
        t.enqueue(record("b", 0, 20));
        assert_eq!(t.next_record(later, idle).map(|r| r.timestamp_ms), Some(12));
        assert!(t.next_record(later, idle).is_none());
        assert!(!t.can_process(later + idle / 2, idle));
        assert!(t.next_record(later + idle / 2, idle).is_none());
        assert_eq!(
            t.next_record(later + idle, idle).map(|r| r.topic),
            Some("b".to_string())
        );
    }

    #[test]
    fn a_task_waiting_for_an_empty_input_lets_the_loop_sleep() {
        // While one input is empty and `max_idle` has not passed, the task has nothing to hand
        // out, so the loop waits in `poll` instead of spinning.
        let mut t = task();
        t.enqueue(record("a", 0, 10));
        let start = Instant::now();
        let idle = Duration::from_millis(50);
        assert!(t.next_record(start, idle).is_none());
        assert!(!t.can_process(start + Duration::from_millis(10), idle));
        assert!(t.can_process(start + idle, idle));
        assert!(t.can_process(start, Duration::ZERO));
        t.enqueue(record("b", 0, 20));
        assert!(t.can_process(start, idle));
    }

    #[test]
    fn commit_applies_writes_and_offsets_abort_discards_them() {
        let mut t = task();
        let mut out = Vec::new();
        let r = record("a", 41, 1);
        t.process(&r, &mut out).unwrap();
        assert_eq!(
            t.offsets_to_commit().collect::<Vec<_>>(),
            vec![(&"a".to_string(), 42)]
        );
        t.discard_cycle();
        assert!(!t.has_work_in_cycle());
        // The abort rewinds the position to the last commit (none yet).
        assert_eq!(t.offsets_to_commit().count(), 0);

        t.process(&r, &mut out).unwrap();
        t.apply_committed(BTreeMap::from([("seen".to_string(), 5)]))
            .unwrap();
        assert_eq!(t.backend.get("seen", b"a-41").unwrap(), Some(b"a".to_vec()));
        assert_eq!(t.backend.checkpoint("seen").unwrap(), Some(5));
        assert!(!t.has_work_in_cycle());
        // Committed positions survive a later abort and are still sent by the next commit,
        // even when nothing moved.
        t.process(&record("a", 42, 2), &mut out).unwrap();
        t.discard_cycle();
        assert_eq!(
            t.offsets_to_commit().collect::<Vec<_>>(),
            vec![(&"a".to_string(), 42)]
        );
        assert_eq!(
            t.committed_positions().collect::<Vec<_>>(),
            vec![(&"a".to_string(), 42)]
        );
    }

    #[test]
    fn input_time_is_the_slowest_input_and_an_abort_takes_back_its_cycle() {
        let mut t = task();
        let mut out = Vec::new();
        assert_eq!(t.input_time(), None);
        t.process(&record("a", 0, 10), &mut out).unwrap();
        // Nothing is known of input b yet.
        assert_eq!(t.input_time(), None);
        t.caught_up("b", 5);
        assert_eq!(t.input_time(), Some(5));
        t.process(&record("b", 0, 20), &mut out).unwrap();
        assert_eq!(t.input_time(), Some(10));
        // An older end does not move it back.
        t.caught_up("a", 3);
        assert_eq!(t.input_time(), Some(10));
        t.apply_committed(BTreeMap::new()).unwrap();
        t.caught_up("a", 50);
        assert_eq!(t.input_time(), Some(20));
        t.discard_cycle();
        assert_eq!(t.input_time(), Some(10));
        // A queued record older than what was processed holds input time below it.
        t.enqueue(record("a", 1, 7));
        assert_eq!(t.input_time(), Some(6));
        t.next_record(Instant::now(), Duration::ZERO).unwrap();
        // A timestamp from a clock running ahead counts as the present, not the future.
        let future = super::super::input_ends::now_ms() + 3_600_000;
        t.process(&record("a", 2, future), &mut out).unwrap();
        t.process(&record("b", 1, future), &mut out).unwrap();
        assert!(t.input_time().is_some_and(|at| at < future));
    }

    #[test]
    fn queued_bytes_follow_enqueue_take_and_abort() {
        let mut t = task();
        let r = record("a", 0, 1);
        let size = r.size();
        assert_eq!(t.enqueue(r), size);
        assert_eq!(t.enqueue(record("a", 1, 2)), 2 * size);
        assert_eq!(t.queued_bytes("a"), 2 * size);
        t.next_record(Instant::now(), Duration::ZERO).unwrap();
        assert_eq!(t.queued_bytes("a"), size);
        t.discard_cycle();
        assert_eq!(t.queued_bytes("a"), 0);
    }
}
