//! Standby replicas: warm copies of tasks this instance does not run, kept by consuming their
//! changelogs (`read_committed`) into the same local stores a task would open, with checkpoints
//! of their own. When such a task is assigned here, the engine takes the open store from the
//! keeper and its restoration replays only the changelog written since the standby's checkpoint.
//!
//! A standby never processes an input and has no producer: it cannot write to a changelog or an
//! output. It runs on a thread of its own; its failures (a changelog without a leader, a full
//! disk) are logged and retried and never stop processing or change readiness. Its store writes
//! hold the lock the stream thread takes when tasks are assigned or revoked, so a stalled disk
//! can delay a rebalance by as long as one write (at most 4 MiB) takes.
//!
//! Placement. KIP-848's assignor runs in the broker and knows nothing of standbys, so where they
//! live is this runtime's decision ([`standby_partitions`]): the live members (from the members
//! topic) sorted by instance id form a ring; partition `p`'s standbys are members that follow its
//! active owner on the ring (or, when the owner is unknown, the member at `p mod n`). With static
//! membership the broker's range assignment is known ([`range_of`]), so the first standby is the
//! member `p` goes to if its owner leaves, and a starting member warms its own share before it
//! joins ([`Standbys::warm_up`]). Every instance computes the same placement from the same members
//! topic, so each partition has at most `N` standbys and never one on its active's instance.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::message::Message;
use rdkafka::topic_partition_list::{Offset, TopicPartitionList};

use super::config::RuntimeConfig;
use super::error::RuntimeError;
use super::members::Members;
use super::restore::EofContext;
use super::secrets;
use super::Shutdown;
use crate::state::rocks::{RocksBackend, RocksResources};
use crate::state::{CommitBatch, StoreBackend};
use crate::telemetry::metrics as m;

/// How often the placement is computed again and the lag measured.
const PLACEMENT_EVERY: Duration = Duration::from_secs(1);
/// Buffered changes of one standby are written at least this often (with their checkpoint).
const FLUSH_EVERY: Duration = Duration::from_millis(200);
/// ... or once they hold this many bytes.
const FLUSH_BYTES: usize = 4 << 20;
/// Bound on each watermark lookup.
const WATERMARKS_TIMEOUT: Duration = Duration::from_secs(5);
/// The pause before a standby that failed (its store, its changelog) is tried again.
const RETRY_PAUSE: Duration = Duration::from_secs(5);
/// How long warm-up waits for this instance's record in the members topic.
const MEMBERS_WAIT: Duration = Duration::from_secs(10);

/// The partitions the broker's `range` assignor (Kafka 4.1, KIP-848) gives the member at
/// `index` of `members`: members sorted (static ones by instance id), each a contiguous range,
/// the first `partitions % members` one partition longer.
pub fn range_of(index: usize, members: usize, partitions: i32) -> std::ops::Range<i32> {
    if members == 0 || index >= members {
        return 0..0;
    }
    let (n, i) = (members as i32, index as i32);
    let (quota, extra) = (partitions / n, partitions % n);
    let start = i * quota + i.min(extra);
    start..start + quota + i32::from(i < extra)
}

/// The member of `sorted` (static members, sorted by instance id) the range assignor gives `p`.
fn range_owner<'a>(p: i32, sorted: &[&'a str], partitions: i32) -> Option<&'a str> {
    (0..sorted.len())
        .find(|i| range_of(*i, sorted.len(), partitions).contains(&p))
        .map(|i| sorted[i])
}

/// The partitions `me` keeps standbys of, given the live members (any order), the owners the
/// members topic names, the partition count, the standby count and the partitions `me` runs.
///
/// The live members sorted by instance id form a ring; a task's standbys are the members after
/// its owner on it. With static membership (`predictable`) the broker's assignment is known: the
/// first standby is the member the task would go to if its owner left (the range assignor over
/// the others), so a single failure always finds its tasks warm.
pub fn standby_partitions(
    me: &str,
    live: &[String],
    owners: &BTreeMap<i32, String>,
    partitions: i32,
    replicas: usize,
    active: &BTreeSet<i32>,
    predictable: bool,
) -> BTreeSet<i32> {
    let mut ring: Vec<&str> = live.iter().map(String::as_str).collect();
    ring.sort_unstable();
    ring.dedup();
    let n = ring.len();
    if replicas == 0 || n < 2 || !ring.contains(&me) {
        return BTreeSet::new();
    }
    (0..partitions)
        .filter(|p| !active.contains(p))
        .filter(|p| {
            let anchor = owners
                .get(p)
                .and_then(|owner| ring.iter().position(|m| m == owner))
                .unwrap_or(*p as usize % n);
            let mut chain: Vec<&str> = Vec::with_capacity(n);
            if predictable {
                let others: Vec<&str> = ring
                    .iter()
                    .copied()
                    .filter(|m| *m != ring[anchor])
                    .collect();
                chain.extend(range_owner(*p, &others, partitions));
            }
            for step in 1..n {
                let next = ring[(anchor + step) % n];
                if !chain.contains(&next) {
                    chain.push(next);
                }
            }
            chain.iter().take(replicas).any(|m| *m == me)
        })
        .collect()
}

/// The partitions a starting member `me` will be given when it joins, when that can be known:
/// with static membership (`predictable`) the range assignor's share of `me` among the live
/// members and itself, sorted by instance id; nothing while no member runs a task (a first
/// start) or without static membership (members are then sorted by ids the broker makes up).
pub fn takeover_candidates(
    me: &str,
    live: &[String],
    owners: &BTreeMap<i32, String>,
    partitions: i32,
    predictable: bool,
) -> BTreeSet<i32> {
    let running = owners.values().any(|o| o != me && live.contains(o));
    if !predictable || !running {
        return BTreeSet::new();
    }
    let mut members: Vec<&str> = live.iter().map(String::as_str).collect();
    members.push(me);
    members.sort_unstable();
    members.dedup();
    members
        .iter()
        .position(|m| *m == me)
        .map(|i| range_of(i, members.len(), partitions).collect())
        .unwrap_or_default()
}

/// Warm-up ends once the candidates are this many changelog records behind, at most: the rest
/// is restored in a moment after the join.
const WARM_LAG: i64 = 10_000;

/// What the stream thread and the keeper share.
#[derive(Default)]
struct Shared {
    /// Partitions the engine has claimed (assigned to this instance): no standby opens them.
    claimed: BTreeSet<i32>,
    /// Open standby stores, by partition.
    held: BTreeMap<i32, RocksBackend>,
    /// Before joining the group: the partitions this instance will be given
    /// ([`takeover_candidates`]), which the keeper warms too.
    warming: Option<BTreeSet<i32>>,
    /// The warm-up's candidates are followed and caught up (within [`WARM_LAG`]).
    warm: bool,
}

/// The handle the engine and the HTTP endpoints use; the keeper thread holds the other end.
#[derive(Clone, Default)]
pub struct Standbys(Arc<Mutex<Shared>>);

impl Standbys {
    fn lock(&self) -> MutexGuard<'_, Shared> {
        self.0.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The engine was assigned `partitions`: no standby opens them from now on.
    pub fn claim(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut shared = self.lock();
        shared.claimed.extend(partitions);
    }

    /// Takes the open standby store of a claimed partition, if there is one.
    pub fn take(&self, partition: i32) -> Option<RocksBackend> {
        let mut shared = self.lock();
        shared.claimed.insert(partition);
        let taken = shared.held.remove(&partition);
        if taken.is_some() {
            tracing::info!(
                task = partition,
                "the standby's store is handed to the task; only the changelog since its checkpoint is restored"
            );
        }
        taken
    }

    /// The engine closed these tasks (revoked, or the engine ends): they may become standbys.
    pub fn release(&self, partitions: impl IntoIterator<Item = i32>) {
        let mut shared = self.lock();
        for p in partitions {
            shared.claimed.remove(&p);
        }
    }

    /// Warms the partitions this instance is likely to be given before it joins the group, so
    /// a scale-out or a restart does not move tasks to a cold store: waits until they are
    /// followed and caught up, for at most `limit` (or until shutdown).
    pub fn warm_up(
        &self,
        config: &RuntimeConfig,
        members: &Members,
        limit: Duration,
        shutdown: &Shutdown,
    ) {
        let started = Instant::now();
        // Who runs what, as the members topic said when this instance started reading it.
        while !members.caught_up() {
            if shutdown.requested() {
                return;
            }
            if started.elapsed() >= MEMBERS_WAIT {
                tracing::warn!(
                    "the members topic could not be read to its end; joining without a warm-up"
                );
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        let (live, owners) = members.ring();
        let candidates = takeover_candidates(
            &config.instance_id,
            &live,
            &owners,
            config.status.partitions(),
            config.static_membership,
        );
        if candidates.is_empty() {
            return;
        }
        tracing::info!(?candidates, "warming up the partitions this instance is likely to be given before joining the group");
        config.status.set_warming_up(true);
        {
            let mut shared = self.lock();
            shared.warming = Some(candidates);
            shared.warm = false;
        }
        while !shutdown.requested() && !self.lock().warm {
            if started.elapsed() >= limit {
                tracing::warn!(
                    limit_s = limit.as_secs(),
                    "warm-up not finished within its limit; joining the group anyway"
                );
                break;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        if self.lock().warm {
            tracing::info!(
                seconds = started.elapsed().as_secs_f64(),
                "warm-up finished; joining the group"
            );
        }
        self.lock().warming = None;
        config.status.set_warming_up(false);
    }

    /// The engine closed every task.
    pub fn release_all(&self) {
        self.lock().claimed.clear();
    }
}

/// Starts the keeper thread; it runs until `shutdown`.
pub fn spawn(
    config: Arc<RuntimeConfig>,
    members: Members,
    standbys: Standbys,
    resources: RocksResources,
    shutdown: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("standbys".into())
        .spawn(move || {
            let mut keeper = Keeper {
                config,
                members,
                standbys,
                resources,
                consumer: None,
                following: BTreeMap::new(),
                retry_at: BTreeMap::new(),
                candidates: BTreeSet::new(),
                shutdown: shutdown.clone(),
            };
            keeper.run(&shutdown);
            keeper.stop_all();
        })
}

/// One standby partition being followed: its buffered changes and next offsets per store.
struct Followed {
    changes: BTreeMap<String, BTreeMap<Vec<u8>, Option<Vec<u8>>>>,
    next: BTreeMap<String, i64>,
    bytes: usize,
    last_flush: Instant,
    /// A write failed: what it held is lost, so nothing of it is written again.
    poisoned: bool,
}

struct Keeper {
    config: Arc<RuntimeConfig>,
    members: Members,
    standbys: Standbys,
    resources: RocksResources,
    consumer: Option<BaseConsumer<EofContext>>,
    following: BTreeMap<i32, Followed>,
    /// Standbys that failed, and when to try them again.
    retry_at: BTreeMap<i32, Instant>,
    /// While warming up: the partitions this instance is likely to be given.
    candidates: BTreeSet<i32>,
    shutdown: Shutdown,
}

impl Keeper {
    fn run(&mut self, shutdown: &Shutdown) {
        let mut placed_at: Option<Instant> = None;
        let mut generation = secrets::generation();
        while !shutdown.requested() {
            if secrets::generation() != generation {
                generation = secrets::generation();
                // The consumer reads the rotated secrets when it is built again.
                match self.config.with_secrets_reread() {
                    Ok(Some(fresh)) => {
                        self.stop_all();
                        self.consumer = None;
                        self.config = Arc::new(fresh);
                    }
                    Ok(None) => {}
                    Err(e) => {
                        tracing::warn!(error = %e, "the standbys keep the previous Kafka secrets")
                    }
                }
            }
            if placed_at.is_none_or(|at| at.elapsed() >= PLACEMENT_EVERY) {
                placed_at = Some(Instant::now());
                if let Err(e) = self.place() {
                    tracing::warn!(error = %e, "standby placement failed; trying again");
                    self.consumer = None;
                }
                self.measure_lag();
            }
            if self.following.is_empty() {
                std::thread::sleep(Duration::from_millis(100));
                continue;
            }
            if let Err(e) = self.follow(Duration::from_millis(100)) {
                tracing::warn!(error = %e, "following the standbys' changelogs failed; starting them again");
                self.stop_all();
                self.consumer = None;
            }
        }
    }

    fn consumer(&mut self) -> Result<&BaseConsumer<EofContext>, RuntimeError> {
        if self.consumer.is_none() {
            let mut client = ClientConfig::new();
            for (key, value) in &self.config.kafka {
                client.set(key, value);
            }
            client
                .set("bootstrap.servers", &self.config.bootstrap)
                .set(
                    "group.id",
                    format!("{}-standby", self.config.application_id),
                )
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                .set("isolation.level", "read_committed")
                .set("enable.partition.eof", "true")
                // A position outside the changelog (recreated, truncated) must be noticed, not
                // silently moved to the start over the old state.
                .set("auto.offset.reset", "error")
                .set("fetch.wait.max.ms", "100")
                .set("queued.max.messages.kbytes", "16384");
            self.consumer = Some(client.create_with_context(EofContext).map_err(|_| {
                RuntimeError::Config(vec![
                    "the standby consumer could not be built from the Kafka settings".into(),
                ])
            })?);
        }
        // Built just above when missing.
        self.consumer
            .as_ref()
            .ok_or_else(|| RuntimeError::ClientStuck("no standby consumer".into()))
    }

    /// Computes the placement and starts or stops standbys to match it.
    fn place(&mut self) -> Result<(), RuntimeError> {
        let (claimed, warming) = {
            let shared = self.standbys.lock();
            (shared.claimed.clone(), shared.warming.clone())
        };
        let (live, owners) = self.members.ring();
        let mut wanted = standby_partitions(
            &self.config.instance_id,
            &live,
            &owners,
            self.config.status.partitions(),
            self.config.standby_replicas,
            &claimed,
            self.config.static_membership,
        );
        self.candidates = warming.unwrap_or_default();
        wanted.extend(self.candidates.difference(&claimed));
        let held: BTreeSet<i32> = self.standbys.lock().held.keys().copied().collect();
        // Stop what is no longer wanted, or was taken by the engine.
        let stop: Vec<i32> = self
            .following
            .keys()
            .copied()
            .filter(|p| !wanted.contains(p) || !held.contains(p))
            .collect();
        for p in stop {
            self.stop(p);
        }
        let now = Instant::now();
        self.retry_at.retain(|_, at| *at > now);
        for p in wanted {
            if self.following.contains_key(&p) || self.retry_at.contains_key(&p) {
                continue;
            }
            if self.shutdown.requested() {
                break;
            }
            if let Err(e) = self.start(p) {
                // Whatever the failed start left open is closed: the next one opens it again.
                self.standbys.lock().held.remove(&p);
                tracing::warn!(partition = p, error = %e, "standby could not start; trying again later");
                self.retry_at.insert(p, Instant::now() + RETRY_PAUSE);
            }
        }
        Ok(())
    }

    /// Opens a standby's store (unless the engine claimed it meanwhile), checks its checkpoints
    /// against the changelogs (a checkpoint outside them wipes the store: another history), and
    /// assigns the changelogs from there.
    fn start(&mut self, partition: i32) -> Result<(), RuntimeError> {
        let config = self.config.clone();
        // The store is opened under the lock, so the engine never opens it at the same time;
        // once in `held`, the engine takes it from there instead.
        let checkpoints = {
            let mut shared = self.standbys.lock();
            if shared.claimed.contains(&partition) {
                return Ok(());
            }
            let backend =
                RocksBackend::open(&config.task_dir(partition), &config.stores, &self.resources)?;
            let checkpoints = config
                .stores
                .iter()
                .map(|store| Ok((store.clone(), backend.checkpoint(store)?)))
                .collect::<Result<Vec<_>, RuntimeError>>()?;
            shared.held.insert(partition, backend);
            checkpoints
        };
        // The ends, read after the checkpoints: nothing can have been written to the store since.
        let mut positions = Vec::with_capacity(checkpoints.len());
        for (store, checkpoint) in checkpoints {
            let topic = config.changelog_topic(&store);
            let ends = self.consumer().and_then(|c| {
                c.fetch_watermarks(&topic, partition, WATERMARKS_TIMEOUT)
                    .map_err(RuntimeError::kafka("standby changelog watermarks"))
            });
            let (low, high) = match ends {
                Ok(ends) => ends,
                Err(e) => {
                    self.standbys.lock().held.remove(&partition);
                    return Err(e);
                }
            };
            positions.push((store, topic, low, high, checkpoint));
        }
        if let Some((store, _, low, high, checkpoint)) = positions
            .iter()
            .find(|(_, _, low, high, c)| c.is_some_and(|c| c > *high || (c < *low && *low > 0)))
        {
            tracing::warn!(
                partition, store = %store, checkpoint, changelog_start = low, changelog_end = high,
                "standby checkpoint outside the changelog (topic recreated, or records deleted by retention); wiping the standby's state and rebuilding it from the beginning"
            );
            let mut shared = self.standbys.lock();
            let Some(backend) = shared.held.get_mut(&partition) else {
                // Taken by the engine meanwhile: its restoration makes the same check.
                return Ok(());
            };
            backend.wipe()?;
            for position in &mut positions {
                position.4 = None;
            }
        }
        let mut assignment = TopicPartitionList::new();
        let mut next = BTreeMap::new();
        for (store, topic, low, _, checkpoint) in &positions {
            let from = checkpoint.unwrap_or(*low);
            next.insert(store.clone(), from);
            assignment
                .add_partition_offset(topic, partition, Offset::Offset(from))
                .map_err(RuntimeError::kafka("standby assignment"))?;
        }
        if !self.standbys.lock().held.contains_key(&partition) {
            return Ok(());
        }
        if let Err(e) = self.consumer()?.incremental_assign(&assignment) {
            self.standbys.lock().held.remove(&partition);
            return Err(RuntimeError::kafka("assign standby changelogs")(e));
        }
        tracing::info!(partition, from = ?next, "standby started");
        self.following.insert(
            partition,
            Followed {
                changes: BTreeMap::new(),
                next,
                bytes: 0,
                last_flush: Instant::now(),
                poisoned: false,
            },
        );
        metrics::gauge!(m::STANDBY_TASKS).set(self.following.len() as f64);
        Ok(())
    }

    /// Stops following a partition: its buffered changes are written if its store is still
    /// here, the changelogs unassigned, the store closed (or already with the engine).
    fn stop(&mut self, partition: i32) {
        if let Some(mut followed) = self.following.remove(&partition) {
            {
                // Written and closed under the lock: the engine may open the store right after.
                let mut shared = self.standbys.lock();
                if let Some(mut backend) = shared.held.remove(&partition) {
                    if !followed.poisoned {
                        if let Err(e) = flush(&mut followed, &mut backend) {
                            tracing::warn!(partition, error = %e, "writing a stopped standby's last changes failed; it restarts from its last checkpoint");
                        }
                    }
                    drop(backend);
                }
            }
            let mut list = TopicPartitionList::new();
            for store in &self.config.stores {
                list.add_partition(&self.config.changelog_topic(store), partition);
            }
            if let Some(consumer) = &self.consumer {
                if let Err(e) = consumer.incremental_unassign(&list) {
                    tracing::warn!(partition, error = %e, "unassigning a standby's changelogs failed; the consumer is built again");
                    self.consumer = None;
                }
            }
            metrics::gauge!(m::STANDBY_LAG, "partition" => partition.to_string()).set(0.0);
            metrics::gauge!(m::STANDBY_TASKS).set(self.following.len() as f64);
            tracing::info!(partition, "standby stopped");
        }
    }

    fn stop_all(&mut self) {
        let all: Vec<i32> = self.following.keys().copied().collect();
        for p in all {
            self.stop(p);
        }
    }

    /// Reads the followed changelogs for up to `slice`, writing each standby's changes with
    /// its checkpoint when due.
    fn follow(&mut self, slice: Duration) -> Result<(), RuntimeError> {
        let until = Instant::now() + slice;
        let mut reset = false;
        while Instant::now() < until {
            let Some(consumer) = &self.consumer else {
                return Ok(());
            };
            match consumer.poll(Duration::from_millis(50)) {
                Some(Ok(message)) => {
                    let partition = message.partition();
                    let Some(store) = self
                        .config
                        .stores
                        .iter()
                        .find(|s| self.config.changelog_topic(s) == message.topic())
                    else {
                        continue;
                    };
                    let Some(followed) = self.following.get_mut(&partition) else {
                        continue;
                    };
                    if let Some(key) = message.key() {
                        let value = message.payload().map(<[u8]>::to_vec);
                        followed.bytes += key.len() + value.as_ref().map_or(0, Vec::len);
                        followed
                            .changes
                            .entry(store.clone())
                            .or_default()
                            .insert(key.to_vec(), value);
                    }
                    followed.next.insert(store.clone(), message.offset() + 1);
                }
                Some(Err(KafkaError::PartitionEOF(partition))) => {
                    // Past the transaction markers at the end: the checkpoint may move there.
                    if let Ok(position) = consumer.position() {
                        if let Some(followed) = self.following.get_mut(&partition) {
                            for store in &self.config.stores {
                                let topic = self.config.changelog_topic(store);
                                if let Some(Offset::Offset(at)) = position
                                    .find_partition(&topic, partition)
                                    .map(|e| e.offset())
                                {
                                    let next = followed.next.entry(store.clone()).or_insert(at);
                                    *next = (*next).max(at);
                                }
                            }
                            followed.last_flush = Instant::now() - FLUSH_EVERY;
                        }
                    }
                }
                Some(Err(e)) => {
                    // `auto.offset.reset=error`: a position outside its changelog. Which
                    // partition is not said; every standby is checked again when it restarts.
                    tracing::warn!(error = %e, "standby changelog read error");
                    if matches!(
                        e.rdkafka_error_code(),
                        Some(
                            rdkafka::types::RDKafkaErrorCode::AutoOffsetReset
                                | rdkafka::types::RDKafkaErrorCode::OffsetOutOfRange
                        )
                    ) {
                        reset = true;
                        break;
                    }
                }
                None => {}
            }
        }
        self.flush_due()?;
        if reset {
            tracing::warn!("a standby's position lies outside its changelog; every standby starts again from its checkpoint, checked against its changelog");
            self.stop_all();
        }
        Ok(())
    }

    fn flush_due(&mut self) -> Result<(), RuntimeError> {
        let mut failed = Vec::new();
        {
            let mut shared = self.standbys.lock();
            for (partition, followed) in &mut self.following {
                let due =
                    followed.bytes >= FLUSH_BYTES || followed.last_flush.elapsed() >= FLUSH_EVERY;
                if !due {
                    continue;
                }
                let Some(backend) = shared.held.get_mut(partition) else {
                    continue;
                };
                if let Err(e) = flush(followed, backend) {
                    tracing::warn!(partition, error = %e, "writing a standby's changes failed; it stops and is tried again later");
                    failed.push(*partition);
                }
            }
        }
        for p in failed {
            self.stop(p);
            self.retry_at.insert(p, Instant::now() + RETRY_PAUSE);
        }
        Ok(())
    }

    /// Lag per standby: the changelogs' ends (as the consumer last saw them) minus the
    /// positions written.
    fn measure_lag(&mut self) {
        let mut lag = BTreeMap::new();
        let previous = self.config.status.standby_lag();
        // One request per changelog partition: a slow broker must not hold the keeper for long;
        // what is not measured within the budget keeps its last figure.
        let budget = Instant::now() + Duration::from_secs(2);
        if let Some(consumer) = &self.consumer {
            'partitions: for (partition, followed) in &self.following {
                if Instant::now() >= budget {
                    if let Some(last) = previous.get(partition) {
                        lag.insert(*partition, *last);
                    }
                    continue;
                }
                let mut behind = 0;
                for store in &self.config.stores {
                    let topic = self.config.changelog_topic(store);
                    let Ok((_, high)) =
                        consumer.fetch_watermarks(&topic, *partition, Duration::from_millis(500))
                    else {
                        // Unknown this time: not shown, and not counted as caught up.
                        continue 'partitions;
                    };
                    let at = followed.next.get(store).copied().unwrap_or(0);
                    behind += (high - at).max(0);
                }
                metrics::gauge!(m::STANDBY_LAG, "partition" => partition.to_string())
                    .set(behind as f64);
                lag.insert(*partition, behind);
            }
        }
        // Warm: every candidate followed, its lag known and small in total. Computed for the
        // set the warm-up asked for now (it may have changed since the placement).
        let asked = self.standbys.lock().warming.clone().unwrap_or_default();
        let lags: Option<Vec<i64>> = asked
            .iter()
            .map(|p| {
                self.following
                    .contains_key(p)
                    .then(|| lag.get(p).copied())
                    .flatten()
            })
            .collect();
        let warm = !asked.is_empty()
            && lags.is_some_and(|l| l.iter().fold(0i64, |a, b| a.saturating_add(*b)) <= WARM_LAG);
        // A candidate whose copy cannot be kept (a full disk, a changelog without a leader):
        // waiting longer would not help, the task is restored after the join as without a
        // warm-up.
        let failing = asked.iter().any(|p| self.retry_at.contains_key(p));
        if failing && !warm {
            tracing::warn!("a partition being warmed up cannot be kept warm; joining the group without waiting for it");
        }
        self.standbys.lock().warm = warm || failing;
        self.config.status.set_standby_lag(lag);
    }
}

/// Writes a standby's buffered changes with the checkpoints after them, in one batch.
/// A failure poisons `followed`: its buffered changes may be gone while its positions moved on,
/// so it must never be written again (the standby starts over from the store's checkpoint).
fn flush(followed: &mut Followed, backend: &mut RocksBackend) -> Result<(), RuntimeError> {
    if followed.poisoned {
        return Err(RuntimeError::Processor(
            "a standby whose write failed is not written again".into(),
        ));
    }
    let mut due = Vec::with_capacity(followed.next.len());
    for (store, next) in &followed.next {
        let checkpoint = backend
            .checkpoint(store)
            .inspect_err(|_| followed.poisoned = true)?;
        if checkpoint != Some(*next) || followed.changes.contains_key(store) {
            due.push((store.clone(), *next));
        }
    }
    let mut batch = CommitBatch::default();
    for (store, next) in due {
        batch.checkpoints.insert(store.clone(), next);
        let changes = followed.changes.remove(&store).unwrap_or_default();
        batch.changes.insert(store, changes);
    }
    followed.changes.clear();
    followed.bytes = 0;
    followed.last_flush = Instant::now();
    if batch.checkpoints.is_empty() {
        return Ok(());
    }
    // The changes are out of `followed` now: a failure from here on poisons it.
    followed.poisoned = true;
    fail::fail_point!("standby-write", |_| Err(RuntimeError::State(
        super::failpoints::disk_full("standby write")
    )));
    backend.apply(batch)?;
    followed.poisoned = false;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ids(names: &[&str]) -> Vec<String> {
        names.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn the_range_assignor_gives_contiguous_ranges_the_first_ones_longer() {
        let ranges: Vec<_> = (0..3).map(|i| range_of(i, 3, 12)).collect();
        assert_eq!(ranges, [0..4, 4..8, 8..12]);
        let ranges: Vec<_> = (0..5).map(|i| range_of(i, 5, 12)).collect();
        assert_eq!(ranges, [0..3, 3..6, 6..8, 8..10, 10..12]);
        assert_eq!(range_of(1, 2, 1), 1..1);
        assert_eq!(range_of(0, 0, 4), 0..0);
    }

    #[test]
    fn standbys_follow_the_owner_on_the_ring_and_never_sit_with_it() {
        let live = ids(&["c", "a", "b"]);
        let owners: BTreeMap<i32, String> = [
            (0, "a".to_string()),
            (1, "b".to_string()),
            (2, "c".to_string()),
        ]
        .into();
        let none = BTreeSet::new();
        let place = |me: &str, replicas: usize, active: &BTreeSet<i32>| {
            standby_partitions(me, &live, &owners, 3, replicas, active, false)
        };
        // One standby: the next member after the owner.
        assert_eq!(place("b", 1, &none), [0].into());
        assert_eq!(place("c", 1, &none), [1].into());
        assert_eq!(place("a", 1, &none), [2].into());
        // Two standbys: everyone else.
        assert_eq!(place("a", 2, &none), [1, 2].into());
        // Never more than the other members, never one's own tasks.
        assert_eq!(place("a", 5, &[1].into()), [2].into());
        // Each partition has exactly min(N, n-1) standbys, none on its owner.
        for predictable in [false, true] {
            for replicas in 0..4 {
                for p in 0..3 {
                    let holders: Vec<&String> = live
                        .iter()
                        .filter(|m| {
                            standby_partitions(m, &live, &owners, 3, replicas, &none, predictable)
                                .contains(&p)
                        })
                        .collect();
                    assert_eq!(holders.len(), replicas.min(2), "p{p} N={replicas}");
                    assert!(!holders.contains(&&owners[&p]));
                }
            }
        }
    }

    #[test]
    fn with_static_members_the_standby_is_where_the_task_goes_if_its_owner_leaves() {
        let live = ids(&["o0", "o1", "o2"]);
        let owners: BTreeMap<i32, String> = (0..12).map(|p| (p, format!("o{}", p / 4))).collect();
        let none = BTreeSet::new();
        for (leaving, _) in live.iter().enumerate() {
            let others: Vec<&str> = live
                .iter()
                .enumerate()
                .filter(|(i, _)| *i != leaving)
                .map(|(_, m)| m.as_str())
                .collect();
            for p in range_of(leaving, 3, 12) {
                let goes_to = range_owner(p, &others, 12).unwrap();
                assert!(
                    standby_partitions(goes_to, &live, &owners, 12, 1, &none, true).contains(&p),
                    "p{p} goes to {goes_to} when o{leaving} leaves"
                );
            }
        }
    }

    #[test]
    fn a_static_newcomer_warms_its_share_of_the_range_assignment() {
        let live = ids(&["o0", "o1"]);
        let owners: BTreeMap<i32, String> = (0..12).map(|p| (p, format!("o{}", p / 6))).collect();
        assert_eq!(
            takeover_candidates("o2", &live, &owners, 12, true),
            (8..12).collect()
        );
        assert_eq!(
            takeover_candidates("a", &live, &owners, 12, true),
            (0..4).collect()
        );
        // Unknowable without static membership; nothing to take before anyone runs.
        assert!(takeover_candidates("o2", &live, &owners, 12, false).is_empty());
        assert!(takeover_candidates("o2", &live, &BTreeMap::new(), 12, true).is_empty());
    }

    #[test]
    fn without_a_known_owner_the_ring_position_comes_from_the_partition() {
        let live = ids(&["a", "b"]);
        let owners = BTreeMap::new();
        let none = BTreeSet::new();
        let place =
            |me: &str, live: &[String]| standby_partitions(me, live, &owners, 4, 1, &none, false);
        assert_eq!(place("b", &live), [0, 2].into());
        assert_eq!(place("a", &live), [1, 3].into());
        // Alone, or not on the ring: no standby.
        assert!(place("a", &ids(&["a"])).is_empty());
        assert!(place("z", &live).is_empty());
    }
}
