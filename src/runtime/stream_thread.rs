//! The stream thread: one consumer, one producer, the tasks, and the loop that ties them
//! together (DESIGN.md section 5):
//!
//! ```text
//! loop:
//!   poll records (read_committed) -> route to the task of their partition
//!   start tasks whose partitions were assigned (restore first, inputs paused meanwhile)
//!   process buffered records in timestamp order; fire due punctuations
//!   if the cycle is due: changelog records + input offsets + commit, then state to RocksDB
//!   on abortable error: abort, drop the cycle's writes, rewind inputs
//!   on fatal error (fenced...): close tasks, rebuild consumer and producer, rejoin
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext, Rebalance};
use rdkafka::error::KafkaError;
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{ClientContext, Statistics};

use super::config::RuntimeConfig;
use super::engine::{sleep_unless_shutdown, Engine};
use super::error::{refusal, ErrorClass, RuntimeError};
use super::processor::{InputRecord, ProcessorSupplier};
use super::secrets;
use super::standby::{self, Standbys};
use super::topics::prepare_topics;
use crate::state::rocks::RocksResources;
use crate::telemetry::metrics as m;

/// Set to ask the runtime to stop: it finishes the commit cycle, closes the tasks, leaves the
/// group and returns.
#[derive(Clone, Default)]
pub struct Shutdown(Arc<AtomicBool>, Arc<std::sync::OnceLock<Instant>>);

/// How long, from the moment shutdown is first noticed, the last commit's transactional calls and
/// delivery waits may still take: enough for a normal commit (about 100 ms), short enough for a
/// clean exit within seconds.
pub const SHUTDOWN_GRACE: Duration = Duration::from_secs(5);

impl Shutdown {
    pub fn new() -> Self {
        Self::default()
    }

    pub fn request(&self) {
        self.0.store(true, Ordering::SeqCst);
    }

    pub fn requested(&self) -> bool {
        let requested = self.0.load(Ordering::SeqCst);
        if requested {
            self.1.get_or_init(Instant::now);
        }
        requested
    }

    /// Shutdown was requested more than [`SHUTDOWN_GRACE`] ago: calls that finish the last
    /// commit give up now.
    pub fn grace_over(&self) -> bool {
        self.requested()
            && self
                .1
                .get()
                .is_some_and(|at| at.elapsed() >= SHUTDOWN_GRACE)
    }

    /// Requests shutdown on SIGTERM and SIGINT.
    pub fn on_signals(&self) -> std::io::Result<()> {
        for signal in [signal_hook::consts::SIGTERM, signal_hook::consts::SIGINT] {
            signal_hook::flag::register(signal, self.0.clone())?;
        }
        Ok(())
    }
}

/// How long the consumer must have had its group coordinator, heartbeating, before an instance
/// without tasks counts as a member of the group (`/ready`).
const JOINED_AFTER_MS: i64 = 3_000;

/// Records per poll round before the loop turns to processing.
const POLL_BATCH: usize = 5_000;

struct StreamsContext {
    engine: Arc<Mutex<Engine>>,
    /// A refusal librdkafka reported (credentials, ACLs): it ends the run.
    refused: Mutex<Option<(RDKafkaErrorCode, String)>>,
    /// Assigned input partitions the consumer knows no leader for, and since when.
    leaderless: Mutex<BTreeMap<(String, i32), Instant>>,
    /// Input partitions of running tasks that have records to read and deliver none, and since
    /// when (with the task's position then).
    starving: Mutex<BTreeMap<(String, i32), (i64, Instant)>>,
}

/// How long an input partition of a running task may have records to read (the last stable
/// offset is past the task's position) while the consumer delivers none of them, nothing of it is
/// queued or in process, and it is not paused for back-pressure, before the consumer is taken for
/// stuck and rebuilt. A healthy fetcher delivers within a fetch wait (500 ms).
const STARVING_REBUILD_AFTER: Duration = Duration::from_secs(20);

/// How long an assigned input partition may stay without a known leader before the consumer is
/// taken for stuck (librdkafka can keep a partition in that state forever after its broker was
/// fenced, while the cluster is back) and rebuilt.
const LEADERLESS_REBUILD_AFTER: Duration = Duration::from_secs(60);

impl ClientContext for StreamsContext {
    fn stats(&self, statistics: Statistics) {
        // A member with no partition gets no assignment callback: that it found the coordinator
        // and has been heartbeating for a few seconds is what says it joined.
        let joined = statistics.cgrp.as_ref().is_some_and(|g| {
            g.state == "up" && (g.assignment_size > 0 || g.stateage >= JOINED_AFTER_MS)
        });
        let status = lock(&self.engine).config.status.clone();
        status.set_joined(joined);
        self.report_lag(&statistics);
    }

    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code().filter(|c| refusal(*c).is_some()) {
            Some(code) => {
                tracing::error!(error = %error, reason, "the cluster refused the consumer");
                if let Ok(mut refused) = self.refused.lock() {
                    refused.get_or_insert((code, reason.to_string()));
                }
            }
            None => tracing::error!(error = %error, reason, "librdkafka error"),
        }
    }
}

fn lock(engine: &Mutex<Engine>) -> MutexGuard<'_, Engine> {
    engine
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl StreamsContext {
    /// Lag per assigned input partition, counted to the last stable offset: records the consumer
    /// has not delivered yet, plus records buffered in the task. Once the fetcher has reached the
    /// last stable offset and nothing waits in its queue, every committed record was delivered, so
    /// transaction markers before that offset count for nothing.
    fn report_lag(&self, statistics: &Statistics) {
        let now_ms = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64);
        let mut engine = lock(&self.engine);
        for (topic, stats) in &statistics.topics {
            if !engine.config.input_topics.contains(topic) {
                continue;
            }
            for (partition, p) in &stats.partitions {
                let assigned = engine
                    .assigned
                    .get(partition)
                    .is_some_and(|topics| topics.contains(topic));
                if *partition < 0 || !assigned || p.ls_offset < 0 {
                    continue;
                }
                let undelivered = if p.next_offset >= p.ls_offset && p.fetchq_cnt == 0 {
                    0
                } else if p.app_offset >= 0 {
                    p.ls_offset - p.app_offset
                } else {
                    p.ls_offset - p.next_offset + p.fetchq_cnt
                };
                let task = engine.tasks.get(partition);
                let buffered = task.map_or(0, |t| t.queued(topic)) as i64;
                let lag = undelivered.max(0) + buffered;
                metrics::gauge!(m::CONSUMER_LAG, "topic" => topic.clone(), "partition" => partition.to_string())
                    .set(lag as f64);
                // In time: the age of the oldest record not committed yet (buffered, or in the
                // open cycle); while the next one is not even fetched, the time since the task
                // had consumed the partition (the next record is at most that old).
                let pending = task.and_then(|t| t.oldest_pending_ms(topic));
                let behind_since = match (lag, pending) {
                    (_, Some(oldest)) => Some(oldest),
                    (0, None) => Some(now_ms),
                    // Restoring or starting: waiting at least since the assignment.
                    _ if task.is_none() => engine.assigned_at.get(partition).copied(),
                    _ => task.and_then(|t| t.input_time_ms(topic)),
                };
                if let Some(since) = behind_since {
                    metrics::gauge!(m::CONSUMER_LAG_SECONDS, "topic" => topic.clone(), "partition" => partition.to_string())
                        .set((now_ms - since).max(0) as f64 / 1000.0);
                }
            }
        }
        self.watch_leaders(&mut engine, statistics);
        self.watch_fetching(&mut engine, statistics);
    }

    /// Notes input partitions of running tasks that have records to read and get none; one
    /// that stays so for [`STARVING_REBUILD_AFTER`] fails the generation (new clients), with
    /// what librdkafka says of its fetcher.
    fn watch_fetching(&self, engine: &mut Engine, statistics: &Statistics) {
        let Ok(mut starving) = self.starving.lock() else {
            return;
        };
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        let recovering = engine.recovery_pending();
        for (topic, stats) in &statistics.topics {
            if !engine.config.input_topics.contains(topic) {
                continue;
            }
            for (partition, p) in &stats.partitions {
                let Some(task) = engine.tasks.get(partition) else {
                    continue;
                };
                let Some(position) = task.position(topic) else {
                    continue;
                };
                // The fetcher has records it has not delivered (transaction markers at the end of
                // a partition are not records: reaching the last stable offset delivers them
                // all), from a leader that is up: a broker away is not a stuck consumer.
                let leader_up = statistics
                    .brokers
                    .values()
                    .any(|b| b.nodeid == p.leader && b.state == "UP");
                // (Not librdkafka's `fetchq_cnt`: it counts the consumer's shared queue.)
                let undelivered = if p.ls_offset >= 0 {
                    p.ls_offset > position && p.next_offset < p.ls_offset
                } else {
                    // Never fetched (no last stable offset known): the brokers' answered end
                    // says whether there is anything to read.
                    engine
                        .input_end(topic, *partition)
                        .is_some_and(|end| end > position)
                };
                let idle = undelivered
                    && leader_up
                    && task.queued(topic) == 0
                    && task.oldest_pending_ms(topic).is_none()
                    && !engine.is_backpressured(topic, *partition)
                    && !recovering;
                if !idle {
                    continue;
                }
                let key = (topic.clone(), *partition);
                seen.insert(key.clone());
                let (at, since) = *starving.entry(key).or_insert((position, now));
                // Any progress, or any delivery (records read again after an aborted cycle:
                // a dependency down, not a stuck consumer), starts the wait again.
                let delivered = task.delivered_at(topic).is_some_and(|d| d > since);
                if at != position || delivered {
                    starving.insert((topic.clone(), *partition), (position, now));
                    continue;
                }
                if now.duration_since(since) >= STARVING_REBUILD_AFTER && engine.failure.is_none() {
                    let why = format!(
                        "{topic} [{partition}] has records from offset {position} to {} and the consumer delivered none for {} s (fetch state {}, next offset {}, queued in librdkafka {})",
                        p.ls_offset,
                        now.duration_since(since).as_secs(),
                        p.fetch_state,
                        p.next_offset,
                        p.fetchq_cnt
                    );
                    tracing::warn!(reason = %why, "an input partition is not fetched: rebuilding the clients");
                    engine.failure = Some(RuntimeError::ClientStuck(why));
                }
            }
        }
        starving.retain(|key, _| seen.contains(key));
    }

    /// Notes assigned input partitions without a known leader; one that stays so for
    /// [`LEADERLESS_REBUILD_AFTER`] fails the generation (new clients).
    fn watch_leaders(&self, engine: &mut Engine, statistics: &Statistics) {
        let Ok(mut leaderless) = self.leaderless.lock() else {
            return;
        };
        let now = Instant::now();
        let mut seen = BTreeSet::new();
        for (topic, stats) in &statistics.topics {
            for (partition, p) in &stats.partitions {
                let assigned = engine
                    .assigned
                    .get(partition)
                    .is_some_and(|topics| topics.contains(topic));
                if *partition >= 0 && assigned && p.leader < 0 {
                    seen.insert((topic.clone(), *partition));
                    let since = *leaderless.entry((topic.clone(), *partition)).or_insert(now);
                    if now.duration_since(since) >= LEADERLESS_REBUILD_AFTER
                        && engine.failure.is_none()
                    {
                        engine.failure = Some(RuntimeError::ClientStuck(format!(
                            "{topic} [{partition}] has had no known leader for {} s",
                            now.duration_since(since).as_secs()
                        )));
                    }
                }
            }
        }
        leaderless.retain(|key, _| seen.contains(key));
    }
}

impl ConsumerContext for StreamsContext {
    fn pre_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        if let Rebalance::Revoke(revoked) = rebalance {
            metrics::counter!(m::REBALANCES, "kind" => "revoke").increment(1);
            for e in revoked.elements() {
                metrics::gauge!(m::CONSUMER_LAG, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                    .set(0.0);
                metrics::gauge!(m::CONSUMER_LAG_SECONDS, "topic" => e.topic().to_string(), "partition" => e.partition().to_string())
                    .set(0.0);
            }
            tracing::info!(
                partitions = revoked.count(),
                lost = consumer.assignment_lost(),
                "partitions revoked"
            );
            lock(&self.engine).on_revoke(consumer, revoked, consumer.assignment_lost());
        }
    }

    fn post_rebalance(&self, consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        match rebalance {
            Rebalance::Assign(assigned) => {
                metrics::counter!(m::REBALANCES, "kind" => "assign").increment(1);
                tracing::info!(partitions = assigned.count(), "partitions assigned");
                lock(&self.engine).on_assign(consumer, assigned);
            }
            Rebalance::Error(e) => tracing::warn!(error = %e, "rebalance error"),
            Rebalance::Revoke(_) => {}
        }
    }
}

/// Runs the application until `shutdown` is requested. Returns an error only for problems a
/// restart cannot fix (configuration, topics); fenced or fatal Kafka errors rebuild the clients
/// and rejoin. A broker that cannot be reached at start-up is waited for (with a log line), not
/// a reason to exit.
pub fn run(
    config: RuntimeConfig,
    supplier: ProcessorSupplier,
    shutdown: Shutdown,
) -> Result<(), RuntimeError> {
    config.validate()?;
    let mut refusals = Refusals::default();
    let partitions = loop {
        match prepare_topics(&config) {
            Ok(partitions) => {
                break partitions;
            }
            Err(e @ (RuntimeError::Config(_) | RuntimeError::Topics(_))) => return Err(e),
            Err(e) if e.misconfigured().is_some() => {
                return Err(RuntimeError::Config(
                    e.misconfigured().into_iter().collect(),
                ))
            }
            Err(e) if refusals.stop(&config, &e)? => {
                if !sleep_unless_shutdown(&shutdown, Duration::from_secs(1)) {
                    return Ok(());
                }
            }
            Err(e) => {
                tracing::warn!(error = %e, bootstrap = %config.bootstrap, "cannot reach the Kafka cluster yet; waiting for it");
                if !sleep_unless_shutdown(&shutdown, Duration::from_secs(2)) {
                    return Ok(());
                }
            }
        }
    };
    config.status.set_partitions(partitions);
    tracing::info!(
        application_id = %config.application_id, instance_id = %config.instance_id, tasks = partitions,
        guarantee = ?config.guarantee, "starting"
    );
    let mut config = Arc::new(config);
    let resources = RocksResources::default();
    let standbys = Standbys::default();
    let keeper = match (&config.members, config.standby_replicas) {
        (Some(members), n) if n > 0 => Some(
            standby::spawn(
                config.clone(),
                members.clone(),
                standbys.clone(),
                resources.clone(),
                shutdown.clone(),
            )
            .map_err(|e| RuntimeError::Processor(format!("no thread for the standbys: {e}")))?,
        ),
        _ => None,
    };
    if let (Some(members), Some(_)) = (&config.members, &keeper) {
        if !config.warm_up_timeout.is_zero() {
            standbys.warm_up(&config, members, config.warm_up_timeout, &shutdown);
        }
    }
    // Stopped while warming up: nothing was joined, nothing to commit.
    let result = if shutdown.requested() {
        Ok(())
    } else {
        run_generations(&mut config, &supplier, &resources, &standbys, &shutdown)
    };
    // The standbys write what they read and close their stores on the way out.
    shutdown.request();
    if let Some(keeper) = keeper {
        let deadline = Instant::now() + Duration::from_secs(5);
        while !keeper.is_finished() && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(20));
        }
    }
    result
}

/// Builds the clients and runs them, again after every failure, until shutdown.
fn run_generations(
    config: &mut Arc<RuntimeConfig>,
    supplier: &ProcessorSupplier,
    resources: &RocksResources,
    standbys: &Standbys,
    shutdown: &Shutdown,
) -> Result<(), RuntimeError> {
    let mut refusals = Refusals::default();
    let mut backoff = RebuildBackoff::default();
    // The rotation the secrets in `config` were read at, and what the files held then.
    let mut loaded = secrets::generation();
    let mut fingerprint = config.secret_files_fingerprint();
    loop {
        // A rotation requested since the secrets were read (during a backoff or a recovery too):
        // read them again before building the clients.
        let now = secrets::generation();
        if now != loaded {
            loaded = now;
            let current = config.secret_files_fingerprint();
            if current != fingerprint {
                match config.with_secrets_reread() {
                    Ok(Some(fresh)) => {
                        tracing::info!(target: secrets::AUDIT_TARGET, event = "kafka_secrets_reloaded", identity = %fresh.identity(), "Kafka secret files read again; the clients are built with them");
                        *config = Arc::new(fresh);
                        fingerprint = current;
                    }
                    Ok(None) => {}
                    Err(error) => {
                        tracing::error!(target: secrets::AUDIT_TARGET, event = "secret_reload_failed", what = "Kafka client secrets", %error, "secret files not read again; the clients keep the previous secrets");
                    }
                }
            }
        }
        let started = Instant::now();
        let result = run_generation(
            config,
            &fingerprint,
            supplier,
            resources,
            standbys,
            shutdown,
        );
        // Only an unbroken run of refusals counts against the grace.
        if started.elapsed() >= HEALTHY_GENERATION {
            refusals = Refusals::default();
        }
        match result {
            Ok(Ended::Shutdown) => return Ok(()),
            // The last cycle committed and the clients closed: the loop's top reads the secret
            // files and builds the clients again.
            Ok(Ended::Rotation) if shutdown.requested() => return Ok(()),
            Ok(Ended::Rotation) => {}
            Err(e @ (RuntimeError::Config(_) | RuntimeError::Topics(_))) => return Err(e),
            // Clients were built from these settings at start-up: a later failure to build one
            // is transient (resources), not configuration, and is rebuilt as any other.
            Err(e) if refusals.stop(config, &e)? => {
                if !sleep_unless_shutdown(shutdown, Duration::from_secs(1)) {
                    return Ok(());
                }
            }
            Err(e) => {
                if shutdown.requested() {
                    tracing::info!(error = %e, "stopped while recovering from an error");
                    return Ok(());
                }
                metrics::counter!(m::REBUILDS, "reason" => rebuild_reason(&e)).increment(1);
                let backoff = backoff.after_failure(started.elapsed());
                tracing::error!(error = %e, backoff_ms = backoff.as_millis() as u64, "stream thread failed; rebuilding producer and consumer and rejoining");
                config
                    .status
                    .set_stalled(Some(format!("rebuilding after: {e}")));
                if !sleep_unless_shutdown(shutdown, backoff) {
                    return Ok(());
                }
            }
        }
    }
}

/// Refusals by the cluster (credentials, ACLs) are tried again for [`REFUSAL_GRACE`]: a user or
/// an ACL granted a moment ago takes a moment to reach every broker. Then the runtime stops.
#[derive(Default)]
struct Refusals {
    since: Option<Instant>,
}

/// How long the cluster may keep refusing this client before the runtime stops.
const REFUSAL_GRACE: Duration = Duration::from_secs(10);

impl Refusals {
    /// `Ok(true)`: `error` is a refusal, try again; `Ok(false)`: it is not one; `Err`: refused for
    /// longer than the grace, stop with the refusal.
    fn stop(&mut self, config: &RuntimeConfig, error: &RuntimeError) -> Result<bool, RuntimeError> {
        let denied = match (error, error.refusal_code()) {
            (RuntimeError::Denied(message), _) => RuntimeError::Denied(message.clone()),
            (_, Some(code)) => config.refused(code, &error.to_string()),
            _ => return Ok(false),
        };
        let since = *self.since.get_or_insert_with(Instant::now);
        if since.elapsed() >= REFUSAL_GRACE {
            return Err(denied);
        }
        tracing::warn!(target: secrets::AUDIT_TARGET, event = "kafka_refused", error = %denied, "refused by the cluster; trying again for a few seconds");
        config.status.set_stalled(Some(denied.to_string()));
        Ok(true)
    }
}

/// The pause before rebuilding the clients: doubling from [`MIN_REBUILD_BACKOFF`] to
/// [`MAX_REBUILD_BACKOFF`] while generations fail quickly, back to the minimum after one that
/// lived [`HEALTHY_GENERATION`] (its failure is a new one, not the same one again).
struct RebuildBackoff {
    next: Duration,
}

impl Default for RebuildBackoff {
    fn default() -> Self {
        Self {
            next: MIN_REBUILD_BACKOFF,
        }
    }
}

impl RebuildBackoff {
    /// The pause after a generation that lived `lived` failed.
    fn after_failure(&mut self, lived: Duration) -> Duration {
        if lived >= HEALTHY_GENERATION {
            self.next = MIN_REBUILD_BACKOFF;
        }
        let pause = self.next;
        self.next = (self.next * 2).min(MAX_REBUILD_BACKOFF);
        pause
    }
}

const MIN_REBUILD_BACKOFF: Duration = Duration::from_millis(500);
const MAX_REBUILD_BACKOFF: Duration = Duration::from_secs(10);
/// A generation that lived this long resets the rebuild backoff.
const HEALTHY_GENERATION: Duration = Duration::from_secs(60);

fn rebuild_reason(error: &RuntimeError) -> &'static str {
    match error {
        RuntimeError::CommitOutcomeUnknown(_) => "commit_outcome_unknown",
        RuntimeError::RewindFailed(_) => "rewind_failed",
        RuntimeError::AbortFailed(_) => "abort_failed",
        RuntimeError::ClientStuck(_) => "client_stuck",
        e => {
            use rdkafka::error::RDKafkaErrorCode::{Fenced, InvalidProducerEpoch, ProducerFenced};
            match e.facts().and_then(|f| f.code) {
                Some(ProducerFenced | InvalidProducerEpoch | Fenced) => "fenced",
                _ => "fatal",
            }
        }
    }
}

/// One life of the consumer and producer: from joining the group to shutdown or a fatal error.
/// Why a generation ended without an error.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Ended {
    /// Shutdown was requested.
    Shutdown,
    /// A secret rotation was requested: the clients are to be built again.
    Rotation,
}

/// `fingerprint`: what the secret files held when `config` read them.
fn run_generation(
    config: &Arc<RuntimeConfig>,
    fingerprint: &[u8],
    supplier: &ProcessorSupplier,
    resources: &RocksResources,
    standbys: &Standbys,
    shutdown: &Shutdown,
) -> Result<Ended, RuntimeError> {
    let engine = Arc::new(Mutex::new(Engine::new(
        config.clone(),
        supplier.clone(),
        resources.clone(),
        standbys.clone(),
        shutdown.clone(),
    )?));
    let consumer = build_consumer(config, engine.clone())?;
    let topics: Vec<&str> = config.input_topics.iter().map(String::as_str).collect();
    consumer
        .subscribe(&topics)
        .map_err(RuntimeError::kafka("subscribe"))?;

    let result = poll_loop(config, fingerprint, &consumer, &engine, shutdown);
    match &result {
        Ok(_) => {
            // Graceful: the last cycle commits, then closing the consumer leaves the group
            // (its revoke callback finds nothing left to commit).
            let mut guard = lock(&engine);
            // An aborted cycle whose clean-up is pending: abort its transaction now, so the next
            // owner does not wait for the transaction timeout.
            if guard.recovery_pending() {
                if let Err(e) = guard.recover(&consumer) {
                    tracing::warn!(error = %e, "aborting the open transaction at shutdown failed; the broker aborts it when it times out");
                }
            }
            if let Err(e) = guard.commit(&consumer) {
                tracing::warn!(error = %e, "final commit failed; the cycle is aborted");
                guard.abort();
                if let Err(e) = guard.recover(&consumer) {
                    tracing::warn!(error = %e, "final abort failed; the broker aborts the transaction when it times out");
                }
            }
            guard.close_all();
            guard.log_commit_summary();
        }
        Err(_) => {
            let mut guard = lock(&engine);
            guard.broken = true;
            guard.close_all();
        }
    }
    // The consumer leaves the group with this generation.
    config.status.set_joined(false);
    if matches!(result, Err(RuntimeError::ClientStuck(_))) {
        // Closing a stuck client can wait forever for its coordinator, so it is closed on a
        // thread of its own that nobody waits for. Not closing it at all would be worse: its
        // background threads keep the member alive in the group (heartbeats go on without
        // polls) until `max.poll.interval.ms`, and its partitions would wait that long for the
        // next generation. If the close hangs, the thread and the clients are left behind; the
        // transaction is fenced by the next producer's init_transactions either way.
        tracing::warn!("closing the stuck consumer and producer in the background");
        let closing = std::thread::Builder::new()
            .name("close-stuck-client".into())
            .spawn(move || {
                drop(consumer);
                drop(engine);
                tracing::info!("the stuck consumer and producer are closed");
            });
        if let Err(e) = closing {
            tracing::warn!(error = %e, "no thread to close the stuck clients on; they were closed on this one");
        }
    } else {
        drop(consumer);
    }
    result
}

fn build_consumer(
    config: &RuntimeConfig,
    engine: Arc<Mutex<Engine>>,
) -> Result<BaseConsumer<StreamsContext>, RuntimeError> {
    let mut client = ClientConfig::new();
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    client
        .set("bootstrap.servers", &config.bootstrap)
        .set("group.id", &config.application_id)
        .set("enable.auto.commit", "false")
        .set("enable.auto.offset.store", "false")
        .set("isolation.level", "read_committed")
        .set("auto.offset.reset", "earliest")
        .set("group.protocol", &config.group_protocol);
    if !config.kafka.contains_key("statistics.interval.ms") {
        // Statistics carry the last stable offsets the lag gauge is computed from.
        client.set("statistics.interval.ms", "1000");
    }
    if !config.kafka.contains_key("queued.max.messages.kbytes") {
        // librdkafka prefetches up to 64 MiB by default; the tasks' queues hold the rest.
        client.set("queued.max.messages.kbytes", "16384");
    }
    if config.group_protocol == "consumer" {
        // The server-side range assignor keeps partition N of every input on one member.
        client.set("group.remote.assignor", "range");
    } else {
        client.set("partition.assignment.strategy", "range");
        // The classic protocol's failure detection is the client's own.
        if let Some(session) = config.session_timeout {
            client.set("session.timeout.ms", session.as_millis().to_string());
        }
        if let Some(heartbeat) = config.heartbeat_interval {
            client.set("heartbeat.interval.ms", heartbeat.as_millis().to_string());
        }
    }
    if config.static_membership {
        client.set("group.instance.id", &config.instance_id);
    }
    client
        .create_with_context(StreamsContext {
            refused: Mutex::new(None),
            engine,
            leaderless: Mutex::new(BTreeMap::new()),
            starving: Mutex::new(BTreeMap::new()),
        })
        .map_err(RuntimeError::kafka("create consumer"))
}

/// Aborted cycles in a row after which the instance reports itself stalled (not ready).
const STALLED_AFTER: u32 = 2;
/// Quiet time after the last abort after which the failures count as over.
const RECOVERED_AFTER: Duration = Duration::from_secs(5);
/// Longest pause between retries of a failing cycle or clean-up.
const MAX_RETRY_PAUSE: Duration = Duration::from_secs(5);

/// Failures in a row and the reason the instance reports while they last.
#[derive(Default)]
struct Failures {
    consecutive: u32,
    last: Option<Instant>,
}

impl Failures {
    /// Counts a failure; returns how long to pause before trying again.
    fn failed(&mut self, config: &RuntimeConfig, error: &RuntimeError) -> Duration {
        self.consecutive += 1;
        self.last = Some(Instant::now());
        if self.consecutive >= STALLED_AFTER {
            config.status.set_stalled(Some(error.to_string()));
        }
        (Duration::from_millis(100) * self.consecutive.min(50)).min(MAX_RETRY_PAUSE)
    }

    /// Failures are over once a cycle with records commits, or nothing failed for a while (the
    /// inputs went quiet).
    fn succeeded(&mut self, config: &RuntimeConfig, committed_records: bool) {
        let recovered =
            committed_records || self.last.is_some_and(|at| at.elapsed() > RECOVERED_AFTER);
        if self.consecutive > 0 && recovered {
            if self.consecutive >= STALLED_AFTER {
                tracing::info!(failures = self.consecutive, "processing resumed");
            }
            config.status.set_stalled(None);
            self.consecutive = 0;
            self.last = None;
        }
    }
}

fn poll_loop(
    config: &RuntimeConfig,
    fingerprint: &[u8],
    consumer: &BaseConsumer<StreamsContext>,
    engine: &Mutex<Engine>,
    shutdown: &Shutdown,
) -> Result<Ended, RuntimeError> {
    let mut batch: Vec<InputRecord> = Vec::with_capacity(POLL_BATCH);
    let mut failures = Failures::default();
    // A rebuilt generation starts from a clean slate.
    config.status.set_stalled(None);
    // A rotation ends the generation only when a file the clients read changed.
    let mut secrets_generation = secrets::generation();
    while !shutdown.requested() {
        // Poll without holding the engine: rebalance callbacks run in here and take it.
        let wait = {
            let guard = lock(engine);
            if guard.has_processable_records() || guard.restoring() {
                Duration::ZERO
            } else {
                config.commit_interval.min(Duration::from_millis(50))
            }
        };
        if let Some(error) = poll_into(consumer, &mut batch, wait) {
            let code = error
                .rdkafka_error_code()
                .unwrap_or(RDKafkaErrorCode::Authentication);
            return Err(config.refused(code, &error.to_string()));
        }
        if let Some((code, reason)) = consumer.client().fatal_error() {
            // A consumer in a fatal state never recovers: new clients are the way on.
            if refusal(code).is_some() {
                return Err(config.refused(code, &reason));
            }
            if code == RDKafkaErrorCode::UnreleasedInstanceId {
                // Static membership: this instance id's previous incarnation did not leave (it
                // was killed) and its session has not expired yet.
                return Err(RuntimeError::ClientStuck(
                    "the group still holds a member with this instance id: its previous run, killed without leaving (joining again once its session times out), or another live instance with the same --instance-id".to_string(),
                ));
            }
            return Err(RuntimeError::ClientStuck(format!(
                "the consumer failed fatally: {reason}"
            )));
        }
        let refused = consumer
            .context()
            .refused
            .lock()
            .ok()
            .and_then(|r| r.clone());
        if let Some((code, reason)) = refused {
            return Err(config.refused(code, &reason));
        }

        let mut guard = lock(engine);
        if let Some(failure) = guard.failure.take() {
            if failure.class() == ErrorClass::Fatal {
                return Err(failure);
            }
            tracing::warn!(error = %failure, "cycle aborted during rebalance");
        }
        if guard.broken {
            // Nothing runs on a broken engine: a new generation is the way on.
            return Err(RuntimeError::ClientStuck(
                "the engine was marked broken by a fatal error".to_string(),
            ));
        }
        if secrets::generation() != secrets_generation {
            secrets_generation = secrets::generation();
            if config.reads_secret_files() && config.secret_files_fingerprint() != fingerprint {
                tracing::info!(
                    "secret rotation requested and a secret file changed: committing, then rebuilding the Kafka clients"
                );
                return Ok(Ended::Rotation);
            }
        }
        // An aborted cycle is cleaned up (transaction aborted, inputs rewound) before anything
        // else happens; records polled meanwhile are dropped and fetched again after the rewind.
        if guard.recovery_pending() {
            batch.clear();
            if let Err(e) = guard.recover(consumer) {
                if e.class() == ErrorClass::Fatal {
                    return Err(e);
                }
                let pause = failures.failed(config, &e);
                tracing::warn!(error = %e, pause_ms = pause.as_millis() as u64, "cleaning up the aborted cycle failed; retrying");
                drop(guard);
                sleep_unless_shutdown(shutdown, pause);
                continue;
            }
        }
        let mut step = Ok(());
        for record in batch.drain(..) {
            if step.is_ok() {
                step = guard.enqueue(consumer, record);
            }
        }
        let mut committed_records = false;
        let step = step
            .and_then(|()| guard.start_ready_tasks(consumer))
            .and_then(|()| {
                guard.observe_input_ends(consumer);
                guard.process_buffered()
            })
            .and_then(|_| guard.relieve_backpressure(consumer))
            .and_then(|()| {
                if guard.commit_due() {
                    committed_records = guard.records_in_cycle() > 0;
                    guard.commit(consumer)
                } else {
                    Ok(())
                }
            });
        match step {
            Ok(()) => failures.succeeded(config, committed_records),
            // Refused (an output topic not writable, say): no retry can fix it.
            Err(e) if e.class() == ErrorClass::Fatal || e.refusal_code().is_some() => {
                return Err(e)
            }
            Err(e) => {
                let pause = failures.failed(config, &e);
                tracing::warn!(error = %e, "aborting the commit cycle and rewinding inputs");
                guard.abort();
                if let Err(recover_error) = guard.recover(consumer) {
                    if recover_error.class() == ErrorClass::Fatal {
                        return Err(recover_error);
                    }
                    tracing::warn!(error = %recover_error, "cleaning up the aborted cycle failed; retrying");
                }
                drop(guard);
                // Back off on repeated failures (a dependency down, a broker restarting).
                sleep_unless_shutdown(shutdown, pause);
            }
        }
    }
    Ok(Ended::Shutdown)
}

/// Records (and bytes) one poll round takes at most before the loop turns to processing.
const POLL_BATCH_BYTES: usize = 8 << 20;

/// Polls up to [`POLL_BATCH`] records or [`POLL_BATCH_BYTES`]: waits up to `wait` for the
/// first, then takes what is ready. Returns a refusal (credentials, ACLs) the consumer reported.
fn poll_into(
    consumer: &BaseConsumer<StreamsContext>,
    batch: &mut Vec<InputRecord>,
    wait: Duration,
) -> Option<KafkaError> {
    let mut timeout = wait;
    let mut bytes = 0;
    while batch.len() < POLL_BATCH && bytes < POLL_BATCH_BYTES {
        match consumer.poll(timeout) {
            Some(Ok(message)) => {
                let record = InputRecord::from_message(&message);
                bytes += record.size();
                batch.push(record);
                timeout = Duration::ZERO;
            }
            Some(Err(e)) if e.rdkafka_error_code().and_then(refusal).is_some() => return Some(e),
            Some(Err(e)) => {
                tracing::warn!(error = %e, "consumer error");
                return None;
            }
            // Nothing ready, or a rebalance was just served.
            None => return None,
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_rebuild_backoff_grows_to_its_cap_and_resets_after_a_healthy_generation() {
        let mut backoff = RebuildBackoff::default();
        let quick = Duration::from_secs(1);
        let pauses: Vec<Duration> = (0..7).map(|_| backoff.after_failure(quick)).collect();
        assert_eq!(pauses[0], MIN_REBUILD_BACKOFF);
        assert_eq!(pauses[1], MIN_REBUILD_BACKOFF * 2);
        assert_eq!(pauses[6], MAX_REBUILD_BACKOFF);
        assert_eq!(
            backoff.after_failure(HEALTHY_GENERATION),
            MIN_REBUILD_BACKOFF
        );
        assert_eq!(backoff.after_failure(quick), MIN_REBUILD_BACKOFF * 2);
    }
}
