//! Which instance owns which partition, and where its HTTP endpoints are.
//!
//! KIP-848's group protocol carries no user data, so the instances tell each other through the
//! application's members topic (`<application id>-members`: one partition, compacted, keyed by
//! instance id): each publishes its assigned partitions and `--advertised-http` address when they
//! change (and every [`REPUBLISH`]), a tombstone when it stops, and reads everyone's. A
//! partition's owner is the last instance, in the topic's order, to have listed it: one
//! partition gives a total order, so no clock is compared. A crashed instance's record stays until
//! the instance that takes its partitions publishes; meanwhile queries for them are sent to the
//! dead address and answer that it does not respond.
//!
//! Nothing here is on the processing path: publishing or reading failures are logged, retried,
//! and only make queries from other instances answer 503. Clients that cannot be built are tried
//! again every 5 s; after a SIGHUP that changed a secret file they read, they are built again.

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Arc, RwLock};
use std::time::{Duration, Instant};

use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message;
use rdkafka::producer::{BaseProducer, BaseRecord, Producer};
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};

use super::client::{KafkaClients, KafkaSettings};
use super::secrets;
use super::{RuntimeStatus, Shutdown};

/// A member's record is published again this often even when nothing changed.
const REPUBLISH: Duration = Duration::from_secs(30);
/// How often the assignment is compared with what was published.
const TICK: Duration = Duration::from_millis(200);

/// The members topic of an application.
pub fn members_topic(application_id: &str) -> String {
    format!("{application_id}-members")
}

/// What an instance publishes about itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Member {
    pub instance_id: String,
    pub advertised_http: Option<String>,
    pub partitions: Vec<i32>,
    /// The record's offset in the members topic (set when read): later means newer.
    #[serde(skip)]
    pub offset: i64,
    /// The record's timestamp (ms since the epoch, set when read): a member that has not
    /// published for [`LIVE_FOR`] is taken for gone when standbys are placed.
    #[serde(skip)]
    pub published_ms: i64,
}

/// A member whose last record is older than this is not counted among the live ones (it
/// publishes every [`REPUBLISH`]).
pub const LIVE_FOR: Duration = Duration::from_secs(75);

/// The members as last read from the topic, and whether the reader has reached the end the topic
/// had when it started reading.
#[derive(Debug, Clone, Default)]
pub struct Members(
    Arc<RwLock<BTreeMap<String, Member>>>,
    Arc<std::sync::atomic::AtomicBool>,
);

impl Members {
    /// Every record written before the reader started has been read.
    pub fn caught_up(&self) -> bool {
        self.1.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// The instance that most recently listed `partition`.
    pub fn owner(&self, partition: i32) -> Option<Member> {
        let members = self.0.read().unwrap_or_else(|p| p.into_inner());
        members
            .values()
            .filter(|m| m.partitions.contains(&partition))
            .max_by_key(|m| m.offset)
            .cloned()
    }

    /// The live members' instance ids, and each listed partition's owner: what standbys are
    /// placed by.
    pub fn ring(&self) -> (Vec<String>, BTreeMap<i32, String>) {
        let members = self.0.read().unwrap_or_else(|p| p.into_inner());
        let now = super::input_ends::now_ms();
        let mut owners: BTreeMap<i32, (i64, String)> = BTreeMap::new();
        for m in members.values() {
            for p in &m.partitions {
                let entry = owners
                    .entry(*p)
                    .or_insert((m.offset, m.instance_id.clone()));
                if m.offset > entry.0 {
                    *entry = (m.offset, m.instance_id.clone());
                }
            }
        }
        // Live: published lately, and not a member whose every listed partition others have
        // taken since (a crashed instance, once the survivors published their takeover).
        let live = members
            .values()
            .filter(|m| now - m.published_ms < LIVE_FOR.as_millis() as i64)
            .filter(|m| {
                m.partitions.is_empty()
                    || m.partitions
                        .iter()
                        .any(|p| owners.get(p).is_some_and(|(_, id)| *id == m.instance_id))
            })
            .map(|m| m.instance_id.clone())
            .collect();
        (
            live,
            owners.into_iter().map(|(p, (_, id))| (p, id)).collect(),
        )
    }

    /// Applies one record of the members topic (`None`: a tombstone), written at `published_ms`.
    pub fn apply(&self, instance_id: &str, value: Option<&[u8]>, offset: i64, published_ms: i64) {
        let mut members = self.0.write().unwrap_or_else(|p| p.into_inner());
        match value.map(serde_json::from_slice::<Member>) {
            None => {
                members.remove(instance_id);
            }
            Some(Ok(mut member)) => {
                // The key says whose record it is.
                member.instance_id = instance_id.to_string();
                member.offset = offset;
                member.published_ms = published_ms;
                members.insert(instance_id.to_string(), member);
            }
            Some(Err(e)) => {
                tracing::warn!(instance_id, offset, error = %e, "an unreadable record in the members topic is ignored");
            }
        }
    }
}

/// Publishes this instance's membership and reads everyone's, on a thread of its own, until
/// `shutdown`; then publishes a tombstone.
pub fn spawn(
    settings: KafkaSettings,
    topic: String,
    instance_id: String,
    status: RuntimeStatus,
    members: Members,
    shutdown: Shutdown,
) -> std::io::Result<std::thread::JoinHandle<()>> {
    std::thread::Builder::new()
        .name("members".into())
        .spawn(move || run(settings, &topic, &instance_id, &status, &members, &shutdown))
}

/// How long to wait before building clients again after they could not be built.
const REBUILD_PAUSE: Duration = Duration::from_secs(5);

/// The members topic's producer and reader, built from the settings of one secrets generation.
struct Clients {
    producer: BaseProducer,
    consumer: BaseConsumer,
}

fn clients(settings: &KafkaSettings, topic: &str) -> Result<Clients, String> {
    let client = settings.client_config();
    let mut producer_config = client.clone();
    // Idempotent: a retried older record never lands after a newer one.
    producer_config
        .set("acks", "all")
        .set("enable.idempotence", "true")
        .set("linger.ms", "0");
    // librdkafka's message may quote a setting's value: a secret's too.
    let producer = producer_config
        .create()
        .map_err(|_| "no producer: the Kafka settings were refused".to_string())?;
    let mut consumer_config = client;
    consumer_config
        .set("group.id", format!("{topic}-reader"))
        .set("enable.auto.commit", "false")
        .set("enable.partition.eof", "false")
        .set("isolation.level", "read_committed");
    let consumer = consumer_config
        .create()
        .map_err(|_| "no consumer: the Kafka settings were refused".to_string())?;
    Ok(Clients { producer, consumer })
}

/// Publishes and reads until shutdown. The clients are built again after a secrets rotation
/// (SIGHUP) that changed what they read, and after they could not be built, every
/// [`REBUILD_PAUSE`].
fn run(
    mut settings: KafkaSettings,
    topic: &str,
    instance_id: &str,
    status: &RuntimeStatus,
    members: &Members,
    shutdown: &Shutdown,
) {
    let mut last_error: Option<Instant> = None;
    let mut warn = |what: &str, error: &dyn std::fmt::Display| {
        // At most one warning a minute: the topic may not exist yet at start-up.
        if last_error.is_none_or(|at| at.elapsed() >= Duration::from_secs(60)) {
            tracing::warn!(error = %error, "members: {what} (retried)");
            last_error = Some(Instant::now());
        }
    };
    let mut current: Option<Clients> = None;
    while !shutdown.requested() {
        let generation = secrets::generation();
        let built = match current.take() {
            Some(built) => built,
            None => match clients(&settings, topic) {
                Ok(built) => built,
                Err(e) => {
                    warn("the members topic's clients cannot be built; other instances cannot find this one's sagas", &e);
                    let until = Instant::now() + REBUILD_PAUSE;
                    while Instant::now() < until && !shutdown.requested() {
                        std::thread::sleep(TICK);
                    }
                    continue;
                }
            },
        };
        let rotated = serve(
            &built,
            topic,
            instance_id,
            status,
            members,
            shutdown,
            generation,
            &mut warn,
        );
        current = Some(built);
        if rotated {
            let before = settings.clone();
            match settings.reread_files() {
                Ok(()) if settings != before => {
                    tracing::info!(
                        "members: the Kafka secrets changed; the clients are built again"
                    );
                    current = None;
                }
                Ok(()) => {}
                Err(e) => warn(
                    "the rotated Kafka secrets cannot be read; the previous ones stay",
                    &e,
                ),
            }
        }
    }
    // Stopping: the partitions are no longer here.
    if let Some(Clients { producer, .. }) = current {
        let tombstone: BaseRecord<'_, str, [u8]> = BaseRecord::to(topic).key(instance_id);
        if producer.send(tombstone).is_ok() {
            let _ = producer.flush(Duration::from_secs(2));
        }
    }
}

/// Reads everyone's records and publishes this instance's until shutdown (`false`) or a secrets
/// rotation after `generation` (`true`).
#[allow(clippy::too_many_arguments)]
fn serve(
    clients: &Clients,
    topic: &str,
    instance_id: &str,
    status: &RuntimeStatus,
    members: &Members,
    shutdown: &Shutdown,
    generation: u64,
    warn: &mut dyn FnMut(&str, &dyn std::fmt::Display),
) -> bool {
    let Clients { producer, consumer } = clients;
    let mut assigned = false;
    // The topic's end when reading started, and the last offset read.
    let mut end: Option<i64> = None;
    let mut read_to: i64 = -1;
    let mut published: Option<(BTreeSet<i32>, Option<String>)> = None;
    let mut published_at = Instant::now();
    while !shutdown.requested() {
        if secrets::generation() != generation {
            return true;
        }
        if !assigned {
            let mut tpl = TopicPartitionList::new();
            let ready = tpl
                .add_partition_offset(topic, 0, Offset::Beginning)
                .and_then(|_| consumer.assign(&tpl));
            match ready {
                Ok(()) => assigned = true,
                Err(e) => warn("cannot read the members topic", &e),
            }
        }
        if assigned && end.is_none() {
            match consumer.fetch_watermarks(topic, 0, Duration::from_secs(5)) {
                Ok((_, high)) => end = Some(high),
                Err(e) => warn("cannot read the members topic's end", &e),
            }
        }
        // Everyone's records.
        let until = Instant::now() + TICK;
        while let Some(polled) = consumer.poll(until.saturating_duration_since(Instant::now())) {
            match polled {
                Ok(m) => {
                    if let Some(key) = m.key().map(String::from_utf8_lossy) {
                        let at = m
                            .timestamp()
                            .to_millis()
                            .unwrap_or_else(super::input_ends::now_ms);
                        members.apply(&key, m.payload(), m.offset(), at);
                    }
                    read_to = read_to.max(m.offset());
                }
                Err(e) => warn("reading the members topic", &e),
            }
            if Instant::now() >= until {
                break;
            }
        }
        if end.is_some_and(|e| read_to + 1 >= e) {
            members.1.store(true, std::sync::atomic::Ordering::Relaxed);
        }
        // This instance's record, when it changed or is due again.
        let now = (status.assigned_partitions(), status.advertised_http());
        let due = published.as_ref() != Some(&now) || published_at.elapsed() >= REPUBLISH;
        if due && status.partitions() > 0 {
            let member = Member {
                instance_id: instance_id.to_string(),
                advertised_http: now.1.clone(),
                partitions: now.0.iter().copied().collect(),
                offset: -1,
                published_ms: 0,
            };
            let value = serde_json::to_vec(&member).unwrap_or_default();
            match producer.send(BaseRecord::to(topic).key(instance_id).payload(&value)) {
                Ok(()) => {
                    published = Some(now);
                    published_at = Instant::now();
                }
                Err((e, _)) => warn("cannot publish this instance's partitions", &e),
            }
        }
        producer.poll(Duration::ZERO);
    }
    false
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record(id: &str, partitions: &[i32]) -> Vec<u8> {
        serde_json::to_vec(&Member {
            instance_id: id.into(),
            advertised_http: Some(format!("{id}:9464")),
            partitions: partitions.to_vec(),
            offset: 0,
            published_ms: 0,
        })
        .unwrap()
    }

    #[test]
    fn the_owner_is_the_last_to_have_listed_the_partition() {
        let members = Members::default();
        members.apply("a", Some(&record("a", &[0, 1])), 0, 0);
        members.apply("b", Some(&record("b", &[])), 1, 0);
        assert_eq!(members.owner(1).unwrap().instance_id, "a");
        // b takes partition 1 before a has published that it gave it up.
        members.apply("b", Some(&record("b", &[1])), 2, 0);
        assert_eq!(members.owner(1).unwrap().instance_id, "b");
        assert_eq!(members.owner(0).unwrap().instance_id, "a");
        members.apply("a", None, 3, 0);
        assert!(members.owner(0).is_none());
        members.apply("c", Some(b"not json"), 4, 0);
        assert!(members.owner(2).is_none());
    }

    #[test]
    fn the_ring_leaves_out_silent_members_and_those_whose_partitions_were_all_taken() {
        let members = Members::default();
        let now = crate::runtime::input_ends::now_ms();
        let stale = now - LIVE_FOR.as_millis() as i64 - 1;
        members.apply("a", Some(&record("a", &[0, 1])), 0, now);
        members.apply("b", Some(&record("b", &[2])), 1, now);
        members.apply("spare", Some(&record("spare", &[])), 2, now);
        members.apply("old", Some(&record("old", &[])), 3, stale);
        let (live, owners) = members.ring();
        assert_eq!(live, ["a", "b", "spare"]);
        assert_eq!(owners[&1], "a");
        // b takes a's partitions: a (crashed, silent since) is no longer on the ring.
        members.apply("b", Some(&record("b", &[0, 1, 2])), 4, now);
        let (live, owners) = members.ring();
        assert_eq!(live, ["b", "spare"]);
        assert_eq!(owners[&0], "b");
    }
}
