//! The runtime's configuration. Every field says what it does and its default; [`RuntimeConfig::validate`]
//! reports every problem at once.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::time::Duration;

use super::error::RuntimeError;

/// Processing guarantee.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Guarantee {
    /// EOS v2: outputs, changelog records and input offsets commit in one Kafka transaction per
    /// commit cycle; a crash or a fenced zombie leaves nothing half-done visible to
    /// `read_committed` readers. The default.
    ExactlyOnce,
    /// No transactions: outputs and changelog records are flushed, then the input offsets are
    /// committed. After a crash, the records since the last commit are processed again, so outputs
    /// may be duplicated (never lost), and the store is rebuilt from a changelog that may hold the
    /// repeated writes. Cheaper per commit; use when consumers are idempotent.
    AtLeastOnce,
}

/// Everything the stream thread needs to know. `Debug` masks secrets.
#[derive(Clone)]
pub struct RuntimeConfig {
    /// Consumer group id, prefix of changelog topics and of the transactional id.
    pub application_id: String,
    /// Stable identity of this instance: `transactional.id = <application_id>-<instance_id>`, so a
    /// restarted instance fences its previous incarnation. Must differ between live instances.
    pub instance_id: String,
    /// `bootstrap.servers`.
    pub bootstrap: String,
    /// Root of the local state: stores live in `<state_dir>/<application_id>/<partition>/`.
    pub state_dir: PathBuf,
    /// Co-partitioned input topics (same partition count, checked at start-up).
    pub input_topics: Vec<String>,
    /// Topics the processor writes to. They must exist at start-up (checked with the inputs, every
    /// missing one listed): a send to a missing topic would fail every transaction.
    pub output_topics: Vec<String>,
    /// Named state stores of every task; each gets `<application_id>-<store>-changelog`.
    pub stores: Vec<String>,
    /// How often a commit cycle ends (Kafka Streams' `commit.interval.ms` under EOS: 100 ms).
    pub commit_interval: Duration,
    /// A cycle also ends once this many records were processed in it, so buffers stay bounded.
    pub commit_max_records: usize,
    /// How long a task waits for an empty input partition before processing the others
    /// (Kafka Streams' `max.task.idle.ms`; default 0: process what is buffered, in timestamp order).
    pub max_task_idle: Duration,
    /// Bytes of fetched records a task may hold per input partition before that partition is
    /// paused (back-pressure); it resumes once the task has worked the queue down to half.
    /// Default 2 MiB. With librdkafka's prefetch (`queued.max.messages.kbytes`, 16 MiB here
    /// unless set) this bounds the memory held by input records.
    pub max_buffered_bytes: usize,
    /// Exactly-once (default) or at-least-once.
    pub guarantee: Guarantee,
    /// `transaction.timeout.ms` (Kafka Streams uses 10 s under EOS).
    pub transaction_timeout: Duration,
    /// Consumer group protocol: `consumer` (KIP-848, incremental, server-side range assignor that
    /// keeps co-partitioned partitions together; the default) or `classic`.
    pub group_protocol: String,
    /// Extra librdkafka settings for both clients; settings the runtime owns are refused.
    pub kafka: BTreeMap<String, String>,
    /// Properties of `kafka` whose value comes from a file (`sasl.password`), and the file: on a
    /// secret rotation (SIGHUP) they are read again and the clients rebuilt.
    pub kafka_files: BTreeMap<String, PathBuf>,
    /// librdkafka `partitioner` of the producer: how output keys map to partitions
    /// (`consistent_random`, librdkafka's default, or `murmur2_random`, the Java client's).
    pub partitioner: String,
    /// Where the instance reports its assigned and running tasks (clone it before `run`).
    pub status: super::RuntimeStatus,
    /// Input topics the application owns (repartition topics): created at start-up when missing,
    /// with the inputs' partition count, like the changelogs. Each is also in `input_topics`.
    pub internal_topics: Vec<String>,
    /// The members topic (see [`super::members`]): created at start-up when missing, one
    /// partition, compacted. `None`: the application publishes no membership.
    pub members_topic: Option<String>,
    /// The members as read from the members topic (by [`super::members::spawn`]): where the
    /// standbys are placed from.
    pub members: Option<super::members::Members>,
    /// Standby replicas per task (default 0): other instances keep warm copies of a task's stores
    /// from its changelogs, so a task that moves there restores only the changelog's tail. Needs
    /// `members`.
    pub standby_replicas: usize,
    /// Static membership (default off): `group.instance.id = <instance_id>`. A member that leaves
    /// on shutdown keeps its partitions, unassigned, until the session timeout: an instance
    /// started again with the same id within that time gets them back with its local state, and
    /// no other member moves. An instance that stops for good leaves its partitions idle for the
    /// session timeout. Off: shutdown leaves the group and the others take the partitions at once.
    pub static_membership: bool,
    /// How long the group waits for a silent member (a crash, a freeze) before moving its
    /// partitions. `None`: the broker's default (`group.consumer.session.timeout.ms`, 45 s).
    /// With the `consumer` protocol it is set on the group (`consumer.session.timeout.ms`),
    /// within the broker's `group.consumer.min/max.session.timeout.ms`; with `classic`, on the
    /// consumer (`session.timeout.ms`).
    pub session_timeout: Option<Duration>,
    /// With standby replicas and static membership: before joining the group, an instance warms
    /// the partitions the range assignor will give it until they are caught up, for at most this
    /// long (default 5 min; zero: join at once).
    pub warm_up_timeout: Duration,
    /// How often members heartbeat. `None`: the broker's default (5 s). Set like the session
    /// timeout (`consumer.heartbeat.interval.ms` / `heartbeat.interval.ms`).
    pub heartbeat_interval: Option<Duration>,
}

/// librdkafka settings the runtime sets itself; overriding them would break its guarantees.
const OWNED_SETTINGS: &[&str] = &[
    "bootstrap.servers",
    "group.id",
    "transactional.id",
    "enable.auto.commit",
    "isolation.level",
    "enable.idempotence",
    "group.protocol",
    "partition.assignment.strategy",
    "transaction.timeout.ms",
    "partitioner",
    "group.instance.id",
    "session.timeout.ms",
    "heartbeat.interval.ms",
];

impl std::fmt::Debug for RuntimeConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let kafka: BTreeMap<&String, &str> = self
            .kafka
            .iter()
            .map(|(k, v)| {
                let shown = if super::client::is_secret(k) {
                    "***"
                } else {
                    v.as_str()
                };
                (k, shown)
            })
            .collect();
        f.debug_struct("RuntimeConfig")
            .field("application_id", &self.application_id)
            .field("instance_id", &self.instance_id)
            .field("bootstrap", &self.bootstrap)
            .field("state_dir", &self.state_dir)
            .field("input_topics", &self.input_topics)
            .field("output_topics", &self.output_topics)
            .field("stores", &self.stores)
            .field("guarantee", &self.guarantee)
            .field("kafka", &kafka)
            .field("kafka_files", &self.kafka_files)
            .finish_non_exhaustive()
    }
}

impl RuntimeConfig {
    /// A configuration with the defaults for everything but the identity and the topology.
    pub fn new(
        application_id: impl Into<String>,
        instance_id: impl Into<String>,
        bootstrap: impl Into<String>,
        state_dir: impl Into<PathBuf>,
    ) -> Self {
        Self {
            application_id: application_id.into(),
            instance_id: instance_id.into(),
            bootstrap: bootstrap.into(),
            state_dir: state_dir.into(),
            input_topics: Vec::new(),
            output_topics: Vec::new(),
            stores: Vec::new(),
            commit_interval: Duration::from_millis(100),
            commit_max_records: 10_000,
            max_task_idle: Duration::ZERO,
            max_buffered_bytes: 2 << 20,
            guarantee: Guarantee::ExactlyOnce,
            transaction_timeout: Duration::from_secs(10),
            group_protocol: "consumer".to_string(),
            kafka: BTreeMap::new(),
            kafka_files: BTreeMap::new(),
            partitioner: "consistent_random".to_string(),
            status: super::RuntimeStatus::default(),
            internal_topics: Vec::new(),
            members_topic: None,
            members: None,
            standby_replicas: 0,
            static_membership: false,
            session_timeout: None,
            heartbeat_interval: None,
            warm_up_timeout: Duration::from_secs(300),
        }
    }

    /// Whether the clients read a secret from a file: a `*_file` property, or a certificate, key
    /// or CA that librdkafka loads when a client is built (`ssl.*.location`). A secret rotation
    /// rebuilds the clients then, so a renewed certificate is picked up too.
    pub fn reads_secret_files(&self) -> bool {
        !self.kafka_files.is_empty() || self.kafka.keys().any(|k| k.ends_with(".location"))
    }

    /// A digest of every file the clients read a secret or certificate from (a missing file
    /// counts as empty): a rotation rebuilds the clients only when it changed.
    pub fn secret_files_fingerprint(&self) -> Vec<u8> {
        use sha2::{Digest, Sha256};
        let mut digest = Sha256::new();
        let locations = self
            .kafka
            .iter()
            .filter(|(k, _)| k.ends_with(".location"))
            .map(|(k, v)| (k, PathBuf::from(v)));
        for (name, path) in self
            .kafka_files
            .iter()
            .map(|(k, p)| (k, p.clone()))
            .chain(locations)
        {
            digest.update(name.as_bytes());
            digest.update(std::fs::read(&path).unwrap_or_default());
            digest.update([0]);
        }
        digest.finalize().to_vec()
    }

    /// This configuration with the secret files of `kafka_files` read again; `Ok(None)` when
    /// the clients read no secret file. An unreadable or empty file fails it, naming the file only.
    pub fn with_secrets_reread(&self) -> Result<Option<RuntimeConfig>, String> {
        if !self.reads_secret_files() {
            return Ok(None);
        }
        let mut fresh = self.clone();
        for (property, path) in &self.kafka_files {
            let value = super::secrets::read_secret(property, path)?;
            fresh.kafka.insert(property.clone(), value);
        }
        Ok(Some(fresh))
    }

    /// Who this client is to the cluster, for error messages: the SASL user or the client
    /// certificate, the security protocol and the bootstrap servers. Never a secret.
    pub fn identity(&self) -> String {
        let protocol = self
            .kafka
            .get("security.protocol")
            .map_or("PLAINTEXT", String::as_str);
        let who = match (
            self.kafka.get("sasl.username"),
            self.kafka.get("ssl.certificate.location"),
        ) {
            (Some(user), _) => format!(
                "as '{user}' ({})",
                self.kafka
                    .get("sasl.mechanism")
                    .map_or("GSSAPI", String::as_str)
            ),
            (None, Some(cert)) => format!("with the client certificate {cert}"),
            (None, None) => "without credentials".to_string(),
        };
        format!("{who} on the {protocol} listener {}", self.bootstrap)
    }

    /// The error for a refusal (`code`, see [`super::error::refusal`]): what was refused, to whom,
    /// and what to grant.
    pub fn refused(&self, code: rdkafka::types::RDKafkaErrorCode, detail: &str) -> RuntimeError {
        use rdkafka::types::RDKafkaErrorCode::*;
        let what = match code {
            GroupAuthorizationFailed => {
                format!(
                    "not authorized to Read consumer group '{}'",
                    self.application_id
                )
            }
            TransactionalIdAuthorizationFailed => format!(
                "not authorized to Write transactional id '{}'",
                self.transactional_id()
            ),
            TopicAuthorizationFailed => format!("not authorized on a topic ({detail})"),
            ClusterAuthorizationFailed => format!("not authorized on the cluster ({detail})"),
            _ => {
                return RuntimeError::Denied(format!(
                    "authentication {} failed: {detail}",
                    self.identity()
                ))
            }
        };
        RuntimeError::Denied(format!(
            "{what}, {}; grant the ACLs `saga-streams acls` lists",
            self.identity()
        ))
    }

    pub fn transactional_id(&self) -> String {
        format!("{}-{}", self.application_id, self.instance_id)
    }

    pub fn changelog_topic(&self, store: &str) -> String {
        format!("{}-{}-changelog", self.application_id, store)
    }

    pub fn task_dir(&self, partition: i32) -> PathBuf {
        self.state_dir
            .join(&self.application_id)
            .join(partition.to_string())
    }

    /// Every problem with the configuration, or `Ok`.
    pub fn validate(&self) -> Result<(), RuntimeError> {
        let mut problems = Vec::new();
        let legal = |s: &str| {
            !s.is_empty()
                && s.chars()
                    .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'))
        };
        if !legal(&self.application_id) {
            problems.push(format!(
                "application id '{}' must be non-empty and use only letters, digits, '.', '_', '-' (it prefixes topic names)",
                self.application_id
            ));
        }
        if !legal(&self.instance_id) {
            problems.push(format!(
                "instance id '{}' must be non-empty and use only letters, digits, '.', '_', '-'",
                self.instance_id
            ));
        }
        if self.bootstrap.trim().is_empty() {
            problems.push("no bootstrap servers (set --bootstrap or KAFKA_BOOTSTRAP)".to_string());
        }
        if self.input_topics.is_empty() {
            problems.push("no input topics".to_string());
        }
        for store in &self.stores {
            if !legal(store) {
                problems.push(format!(
                    "store name '{store}' must use only letters, digits, '.', '_', '-'"
                ));
            }
        }
        let mut seen = std::collections::BTreeSet::new();
        for store in &self.stores {
            if !seen.insert(store) {
                problems.push(format!("store '{store}' is declared twice"));
            }
        }
        if self.commit_interval.is_zero() {
            problems.push("commit interval must be above zero".to_string());
        }
        if self.max_buffered_bytes == 0 {
            problems.push("max buffered bytes must be above zero".to_string());
        }
        if self.commit_max_records == 0 {
            problems.push("commit max records must be above zero".to_string());
        }
        if !matches!(self.group_protocol.as_str(), "consumer" | "classic") {
            problems.push(format!(
                "group protocol '{}' must be 'consumer' or 'classic'",
                self.group_protocol
            ));
        }
        if self.standby_replicas > 0 && self.members.is_none() {
            problems.push(
                "standby replicas are placed from the members topic, which this application does not publish".to_string(),
            );
        }
        if let (Some(session), Some(heartbeat)) = (self.session_timeout, self.heartbeat_interval) {
            if heartbeat >= session {
                problems.push(format!(
                    "heartbeat interval ({} ms) must be shorter than the session timeout ({} ms)",
                    heartbeat.as_millis(),
                    session.as_millis()
                ));
            }
        }
        for key in self.kafka.keys() {
            if OWNED_SETTINGS.contains(&key.as_str()) {
                problems.push(format!(
                    "librdkafka setting '{key}' is set by the runtime and cannot be overridden"
                ));
            }
        }
        if problems.is_empty() {
            Ok(())
        } else {
            Err(RuntimeError::Config(problems))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn validation_lists_every_problem() {
        let mut config = RuntimeConfig::new("bad id", "", "", "/tmp");
        config.stores = vec!["a".into(), "a".into()];
        config
            .kafka
            .insert("isolation.level".into(), "read_uncommitted".into());
        let RuntimeError::Config(problems) = config.validate().unwrap_err() else {
            panic!("expected a config error")
        };
        let text = problems.join("\n");
        for expected in [
            "application id",
            "instance id",
            "bootstrap",
            "no input topics",
            "declared twice",
            "isolation.level",
        ] {
            assert!(text.contains(expected), "missing '{expected}' in:\n{text}");
        }
    }

    #[test]
    fn the_secret_files_fingerprint_follows_their_content() {
        let dir = tempfile::tempdir().unwrap();
        let (password, ca) = (dir.path().join("password"), dir.path().join("ca.pem"));
        std::fs::write(&password, "one").unwrap();
        std::fs::write(&ca, "ca-1").unwrap();
        let mut config = RuntimeConfig::new("app", "a", "b:9092", dir.path());
        assert!(!config.reads_secret_files());
        config.kafka.insert("sasl.password".into(), "one".into());
        config
            .kafka_files
            .insert("sasl.password".into(), password.clone());
        config
            .kafka
            .insert("ssl.ca.location".into(), ca.display().to_string());
        assert!(config.reads_secret_files());
        let first = config.secret_files_fingerprint();
        assert_eq!(first, config.secret_files_fingerprint());
        std::fs::write(&ca, "ca-2").unwrap();
        let second = config.secret_files_fingerprint();
        assert_ne!(first, second, "a renewed CA file");
        std::fs::write(&password, "two\n").unwrap();
        assert_ne!(second, config.secret_files_fingerprint(), "a new password");
        let fresh = config.with_secrets_reread().unwrap().unwrap();
        assert_eq!(fresh.kafka["sasl.password"], "two");
        std::fs::write(&password, "").unwrap();
        assert!(
            config.with_secrets_reread().is_err(),
            "an empty secret file"
        );
    }

    #[test]
    fn debug_output_masks_secrets() {
        let mut config = RuntimeConfig::new("app", "a", "b:9092", "state");
        config
            .kafka
            .insert("sasl.password".into(), "pw-5b1e".into());
        config.kafka.insert("sasl.username".into(), "saga".into());
        let shown = format!("{config:?}");
        assert!(
            !shown.contains("pw-5b1e") && shown.contains("saga"),
            "{shown}"
        );
    }

    #[test]
    fn names_derive_from_the_application_id() {
        let config = RuntimeConfig::new("app", "i1", "127.0.0.1:1", "/s");
        assert_eq!(config.transactional_id(), "app-i1");
        assert_eq!(config.changelog_topic("counts"), "app-counts-changelog");
        assert_eq!(config.task_dir(3), PathBuf::from("/s/app/3"));
    }
}
