//! What a running instance reports about itself: its tasks, whether they are restored, and read
//! access to their committed stores. A cheap handle: clone it before handing the configuration to
//! [`crate::runtime::run`] and read it from any thread (the HTTP endpoints, the demo waiting for its
//! components).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, AtomicI32, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};

use crate::state::ReadStore;

#[derive(Clone, Default)]
pub struct RuntimeStatus(Arc<Inner>);

#[derive(Default)]
struct Inner {
    assigned: AtomicUsize,
    running: AtomicUsize,
    /// Partition count of the inputs (= number of tasks of the application); 0 before start-up.
    partitions: AtomicI32,
    /// Committed-data readers of the running tasks, by partition number.
    readers: RwLock<BTreeMap<i32, Arc<dyn ReadStore>>>,
    /// Why commit cycles keep failing (a dependency down), while they do.
    stalled: RwLock<Option<String>>,
    /// The consumer is a member of the group (it found the coordinator and has heartbeated
    /// since), whether or not it was given tasks.
    joined: AtomicBool,
    /// Where other instances and clients reach this instance's HTTP endpoints (`host:port`).
    advertised_http: RwLock<Option<String>>,
    /// The partition numbers assigned to this instance.
    assigned_partitions: RwLock<BTreeSet<i32>>,
    /// Standby tasks and how many changelog records each is behind.
    standby_lag: RwLock<BTreeMap<i32, i64>>,
    /// Warming up before joining the group.
    warming_up: AtomicBool,
}

impl std::fmt::Debug for RuntimeStatus {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("RuntimeStatus")
            .field("assigned", &self.assigned_tasks())
            .field("running", &self.running_tasks())
            .field("partitions", &self.partitions())
            .finish()
    }
}

impl RuntimeStatus {
    pub(crate) fn set(&self, assigned: usize, running: usize) {
        self.0.assigned.store(assigned, Ordering::Relaxed);
        self.0.running.store(running, Ordering::Relaxed);
        metrics::gauge!(crate::telemetry::metrics::ASSIGNED_TASKS).set(assigned as f64);
        metrics::gauge!(crate::telemetry::metrics::RUNNING_TASKS).set(running as f64);
    }

    pub(crate) fn set_partitions(&self, partitions: i32) {
        self.0.partitions.store(partitions, Ordering::Relaxed);
    }

    pub(crate) fn task_started(&self, partition: i32, reader: Option<Arc<dyn ReadStore>>) {
        if let (Some(reader), Ok(mut readers)) = (reader, self.0.readers.write()) {
            readers.insert(partition, reader);
        }
    }

    pub(crate) fn task_closed(&self, partition: i32) {
        if let Ok(mut readers) = self.0.readers.write() {
            readers.remove(&partition);
        }
    }

    pub(crate) fn set_warming_up(&self, warming: bool) {
        self.0.warming_up.store(warming, Ordering::Relaxed);
    }

    /// Warming up the partitions it is likely to be given, before joining the group (not
    /// ready meanwhile: it has not joined).
    pub fn warming_up(&self) -> bool {
        self.0.warming_up.load(Ordering::Relaxed)
    }

    pub(crate) fn set_standby_lag(&self, lag: BTreeMap<i32, i64>) {
        if let Ok(mut current) = self.0.standby_lag.write() {
            *current = lag;
        }
    }

    /// The standby tasks this instance keeps, and how many changelog records each is behind
    /// (measured about once a second). Standbys never gate readiness.
    pub fn standby_lag(&self) -> BTreeMap<i32, i64> {
        self.0
            .standby_lag
            .read()
            .map(|l| l.clone())
            .unwrap_or_default()
    }

    /// Tasks (partition numbers) assigned to this instance.
    pub fn assigned_tasks(&self) -> usize {
        self.0.assigned.load(Ordering::Relaxed)
    }

    /// Tasks restored and processing.
    pub fn running_tasks(&self) -> usize {
        self.0.running.load(Ordering::Relaxed)
    }

    /// The inputs' partition count, once start-up checked the topics.
    pub fn partitions(&self) -> i32 {
        self.0.partitions.load(Ordering::Relaxed)
    }

    /// Every assigned task is restored and running and commit cycles are not failing. An
    /// instance with no task (more instances than partitions) is ready once it joined the group:
    /// a spare replica must not hold up a rolling update.
    pub fn ready(&self) -> bool {
        let assigned = self.assigned_tasks();
        let tasks_ready = if assigned == 0 {
            self.joined()
        } else {
            self.running_tasks() >= assigned
        };
        tasks_ready && self.stalled().is_none()
    }

    /// Whether the consumer is a member of the group.
    pub fn joined(&self) -> bool {
        self.0.joined.load(Ordering::Relaxed)
    }

    pub(crate) fn set_joined(&self, joined: bool) {
        self.0.joined.store(joined, Ordering::Relaxed);
    }

    /// The partition numbers assigned to this instance (their tasks running or not).
    pub fn assigned_partitions(&self) -> BTreeSet<i32> {
        self.0
            .assigned_partitions
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub(crate) fn set_assigned_partitions(&self, partitions: BTreeSet<i32>) {
        match self.0.assigned_partitions.write() {
            Ok(mut a) => *a = partitions,
            Err(poisoned) => *poisoned.into_inner() = partitions,
        }
    }

    /// Where other instances and clients reach this instance's HTTP endpoints.
    pub fn advertised_http(&self) -> Option<String> {
        self.0
            .advertised_http
            .read()
            .map(|a| a.clone())
            .unwrap_or_else(|poisoned| poisoned.into_inner().clone())
    }

    pub fn set_advertised_http(&self, address: Option<String>) {
        match self.0.advertised_http.write() {
            Ok(mut a) => *a = address,
            Err(poisoned) => *poisoned.into_inner() = address,
        }
    }

    /// Marks processing as stalled (cycles abort and retry) with the reason, or clears it.
    pub(crate) fn set_stalled(&self, reason: Option<String>) {
        if let Ok(mut stalled) = self.0.stalled.write() {
            if stalled.is_some() != reason.is_some() {
                metrics::gauge!(crate::telemetry::metrics::STALLED)
                    .set(f64::from(u8::from(reason.is_some())));
            }
            *stalled = reason;
        }
    }

    /// Why processing is stalled, while it is.
    pub fn stalled(&self) -> Option<String> {
        self.0.stalled.read().ok().and_then(|s| s.clone())
    }

    /// Committed-data reader of the task of `partition`, when it runs here.
    pub fn reader(&self, partition: i32) -> Option<Arc<dyn ReadStore>> {
        self.0.readers.read().ok()?.get(&partition).cloned()
    }

    /// Committed-data readers of every task running here, by partition.
    pub fn readers(&self) -> Vec<(i32, Arc<dyn ReadStore>)> {
        self.0
            .readers
            .read()
            .map(|r| r.iter().map(|(p, r)| (*p, r.clone())).collect())
            .unwrap_or_default()
    }
}
