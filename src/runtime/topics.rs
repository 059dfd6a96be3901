//! Start-up checks of the topics a topology needs: input topics exist and are co-partitioned,
//! output topics exist,
//! changelog topics exist (created when missing: compacted, same partition count) and fit.

use std::time::Duration;

use std::sync::Mutex;
use std::time::Instant;

use rdkafka::admin::{
    AdminClient, AdminOptions, AlterConfig, NewTopic, ResourceSpecifier, TopicReplication,
};
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::ClientContext;

use super::config::RuntimeConfig;
use super::error::{refusal, RuntimeError};

/// Remembers the first refusal (credentials, ACLs) librdkafka reports, so that start-up fails at
/// once with it instead of waiting for a broker that will never accept this client.
#[derive(Default)]
struct RefusalContext {
    refused: Mutex<Option<(RDKafkaErrorCode, String)>>,
}

impl ConsumerContext for RefusalContext {}

impl ClientContext for RefusalContext {
    fn error(&self, error: KafkaError, reason: &str) {
        match error.rdkafka_error_code().filter(|c| refusal(*c).is_some()) {
            Some(code) => {
                if let Ok(mut refused) = self.refused.lock() {
                    refused.get_or_insert((code, reason.to_string()));
                }
            }
            None => tracing::warn!(error = %error, reason, "admin client error"),
        }
    }
}

const TIMEOUT: Duration = Duration::from_secs(30);

/// Checks the inputs, creates or checks the changelogs, and returns the partition count (= the
/// number of tasks).
pub fn prepare_topics(config: &RuntimeConfig) -> Result<i32, RuntimeError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap);
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let admin: AdminClient<RefusalContext> = client
        .create_with_context(RefusalContext::default())
        .map_err(RuntimeError::kafka("create admin client"))?;
    // Metadata through a consumer that never subscribes: polling it serves librdkafka's error
    // events, so a refusal is seen. In short attempts, so that one ends the wait at once.
    let probe: BaseConsumer<RefusalContext> = client
        .clone()
        // Asking for a missing topic by name must not create it.
        .set("allow.auto.create.topics", "false")
        .create_with_context(RefusalContext::default())
        .map_err(RuntimeError::kafka("create consumer"))?;
    let deadline = Instant::now() + TIMEOUT;
    let metadata = loop {
        let attempt = probe.fetch_metadata(None, Duration::from_secs(1));
        let _ = probe.poll(Duration::ZERO);
        let refused = probe.context().refused.lock().ok().and_then(|r| r.clone());
        if let Some((code, reason)) = refused {
            return Err(config.refused(code, &reason));
        }
        match attempt {
            Ok(metadata) => break metadata,
            Err(e) if Instant::now() >= deadline => {
                return Err(RuntimeError::kafka("fetch metadata")(e))
            }
            Err(_) => {}
        }
    };
    // A topic the principal may not describe is left out of the cluster's metadata: asked for by
    // name, it answers whether it is missing or refused.
    let listed = |topic: &str| metadata.topics().iter().any(|t| t.name() == topic);
    let mut unauthorized = Vec::new();
    for topic in config
        .input_topics
        .iter()
        .chain(&config.output_topics)
        .filter(|t| !config.internal_topics.contains(t) && !listed(t))
    {
        let refused = probe
            .fetch_metadata(Some(topic), Duration::from_secs(5))
            .ok()
            .is_some_and(|m| {
                m.topics().iter().any(|t| {
                    t.error().is_some_and(|e| {
                        RDKafkaErrorCode::from(e) == RDKafkaErrorCode::TopicAuthorizationFailed
                    })
                })
            });
        if refused {
            unauthorized.push(topic.clone());
        }
    }
    if !unauthorized.is_empty() {
        return Err(config.refused(
            RDKafkaErrorCode::TopicAuthorizationFailed,
            &format!(
                "may not describe {}: it needs Read on inputs, Write on outputs",
                unauthorized.join(", ")
            ),
        ));
    }
    let partitions_of = |topic: &str| {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };

    let mut problems = Vec::new();
    let mut counts = Vec::new();
    for topic in config
        .input_topics
        .iter()
        .filter(|t| !config.internal_topics.contains(t))
    {
        match partitions_of(topic) {
            Some(n) => counts.push((topic.clone(), n)),
            None => problems.push(format!("input topic '{topic}' does not exist")),
        }
    }
    for topic in &config.output_topics {
        if partitions_of(topic).is_none() {
            problems.push(format!("output topic '{topic}' does not exist"));
        }
    }
    let partitions = counts.first().map(|(_, n)| *n).unwrap_or(0);
    if counts.iter().any(|(_, n)| *n != partitions) {
        let listing: Vec<String> = counts.iter().map(|(t, n)| format!("{t}: {n}")).collect();
        problems.push(format!(
            "input topics must have the same partition count (they are co-partitioned by key): {}",
            listing.join(", ")
        ));
    }
    if !problems.is_empty() {
        return Err(RuntimeError::Topics(problems));
    }

    let mut missing_internal = Vec::new();
    for topic in &config.internal_topics {
        match partitions_of(topic) {
            Some(n) if n != partitions => problems.push(format!(
                "internal topic '{topic}' has {n} partitions, the inputs have {partitions}"
            )),
            Some(_) => {}
            None => missing_internal.push(topic.clone()),
        }
    }
    let mut missing = Vec::new();
    for store in &config.stores {
        let changelog = config.changelog_topic(store);
        match partitions_of(&changelog) {
            Some(n) if n != partitions => problems.push(format!(
                "changelog topic '{changelog}' has {n} partitions, the inputs have {partitions}"
            )),
            Some(_) => {}
            None => missing.push(changelog),
        }
    }
    if !problems.is_empty() {
        return Err(RuntimeError::Topics(problems));
    }

    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    // Records (re-keyed inputs, operators' actions) are read once, soon after they are
    // written: a week is plenty.
    let repartition = [("cleanup.policy", "delete"), ("retention.ms", "604800000")];
    create_missing(
        &admin,
        &options,
        &missing_internal,
        partitions,
        &repartition,
        "internal",
        &mut problems,
    )?;
    if !problems.is_empty() {
        return Err(RuntimeError::Topics(problems));
    }
    create_missing(
        &admin,
        &options,
        &missing,
        partitions,
        &[("cleanup.policy", "compact")],
        "changelog",
        &mut problems,
    )?;
    if let Some(members) = config
        .members_topic
        .as_ref()
        .filter(|t| partitions_of(t).is_none())
    {
        create_missing(
            &admin,
            &options,
            std::slice::from_ref(members),
            1,
            &[("cleanup.policy", "compact")],
            "members",
            &mut problems,
        )?;
    }

    // Topics created just now are compacted by construction (and the broker may not serve their
    // configuration yet): only the ones that already existed are checked.
    let changelogs: Vec<String> = config
        .stores
        .iter()
        .map(|s| config.changelog_topic(s))
        .filter(|t| !missing.contains(t))
        .collect();
    let specifiers: Vec<ResourceSpecifier> = changelogs
        .iter()
        .map(|t| ResourceSpecifier::Topic(t))
        .collect();
    if !specifiers.is_empty() {
        let described = futures::executor::block_on(admin.describe_configs(&specifiers, &options))
            .map_err(RuntimeError::kafka("describe changelog topics"))?;
        for (topic, result) in changelogs.iter().zip(described) {
            match result {
                Ok(resource) => {
                    let policy = resource
                        .get("cleanup.policy")
                        .and_then(|e| e.value.clone())
                        .unwrap_or_default();
                    if !policy.split(',').any(|p| p.trim() == "compact") {
                        problems.push(format!(
                            "changelog topic '{topic}' has cleanup.policy={policy}; it must include compact, or old state is deleted"
                        ));
                    }
                }
                Err(code) => problems.push(format!(
                    "describing changelog topic '{topic}' failed: {code}"
                )),
            }
        }
    }
    if !problems.is_empty() {
        return Err(RuntimeError::Topics(problems));
    }
    configure_group(config, &admin, &options)?;
    Ok(partitions)
}

/// Under the `consumer` protocol the broker owns failure detection: a session timeout or
/// heartbeat interval asked for is set on the group (KIP-848's group configurations), within the
/// broker's `group.consumer.min/max.*` bounds. A value outside them is a configuration error.
/// The request (AlterConfigs; rdkafka has no incremental one) replaces the group's settings: one
/// not given returns to the broker's default.
fn configure_group(
    config: &RuntimeConfig,
    admin: &AdminClient<RefusalContext>,
    options: &AdminOptions,
) -> Result<(), RuntimeError> {
    if config.group_protocol != "consumer" {
        return Ok(());
    }
    let session = config.session_timeout.map(|d| d.as_millis().to_string());
    let heartbeat = config.heartbeat_interval.map(|d| d.as_millis().to_string());
    if session.is_none() && heartbeat.is_none() {
        return Ok(());
    }
    let mut alter = AlterConfig::new(ResourceSpecifier::Group(&config.application_id));
    if let Some(ms) = &session {
        alter = alter.set("consumer.session.timeout.ms", ms);
    }
    if let Some(ms) = &heartbeat {
        alter = alter.set("consumer.heartbeat.interval.ms", ms);
    }
    let results = futures::executor::block_on(admin.alter_configs([&alter], options))
        .map_err(RuntimeError::kafka("set the group's session timeout"))?;
    for result in results {
        if let Err((_, code)) = result {
            if refusal(code).is_some() {
                return Err(config.refused(
                    code,
                    "may not set the group's session timeout: it needs AlterConfigs on the group",
                ));
            }
            if matches!(
                code,
                RDKafkaErrorCode::InvalidConfig
                    | RDKafkaErrorCode::PolicyViolation
                    | RDKafkaErrorCode::InvalidRequest
            ) {
                return Err(RuntimeError::Config(vec![format!(
                    "the broker refused the group's session timeout / heartbeat interval ({code}): they must lie within its group.consumer.min/max.session.timeout.ms and group.consumer.min/max.heartbeat.interval.ms"
                )]));
            }
            // Anything else (a coordinator moving, a timeout) is tried again by the start-up loop.
            return Err(RuntimeError::kafka("set the group's session timeout")(
                KafkaError::AdminOp(code),
            ));
        }
    }
    tracing::info!(session_timeout_ms = ?session, heartbeat_interval_ms = ?heartbeat, "group failure detection set");
    Ok(())
}

/// Creates the `kind` topics (changelog, repartition) named in `missing` with the inputs'
/// partition count and `configs`; a failure is added to `problems`. A topic another instance
/// created at the same moment is fine: it is checked afterwards like any other.
fn create_missing(
    admin: &AdminClient<RefusalContext>,
    options: &AdminOptions,
    missing: &[String],
    partitions: i32,
    configs: &[(&str, &str)],
    kind: &str,
    problems: &mut Vec<String>,
) -> Result<(), RuntimeError> {
    if missing.is_empty() {
        return Ok(());
    }
    let new_topics: Vec<NewTopic> = missing
        .iter()
        .map(|name| {
            // -1: the broker's default replication factor (KIP-464).
            configs.iter().fold(
                NewTopic::new(name, partitions, TopicReplication::Fixed(-1)),
                |topic, (key, value)| topic.set(key, value),
            )
        })
        .collect();
    let results = futures::executor::block_on(admin.create_topics(&new_topics, options))
        .map_err(RuntimeError::kafka("create topics"))?;
    for result in results {
        match result {
            Ok(topic) => tracing::info!(%topic, partitions, kind, "created {kind} topic"),
            Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
            Err((topic, code)) => {
                problems.push(format!("creating {kind} topic '{topic}' failed: {code}"))
            }
        }
    }
    Ok(())
}
