//! Start-up checks of the topics a topology needs: input topics exist and are co-partitioned,
//! output topics exist,
//! changelog topics exist (created when missing: compacted, same partition count) and fit.

use std::time::Duration;

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, ResourceSpecifier, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::error::RDKafkaErrorCode;

use super::config::RuntimeConfig;
use super::error::RuntimeError;

const TIMEOUT: Duration = Duration::from_secs(30);

/// Checks the inputs, creates or checks the changelogs, and returns the partition count (= the
/// number of tasks).
pub fn prepare_topics(config: &RuntimeConfig) -> Result<i32, RuntimeError> {
    let mut client = ClientConfig::new();
    client.set("bootstrap.servers", &config.bootstrap);
    for (key, value) in &config.kafka {
        client.set(key, value);
    }
    let admin: AdminClient<DefaultClientContext> = client
        .create()
        .map_err(RuntimeError::kafka("create admin client"))?;
    let metadata = admin
        .inner()
        .fetch_metadata(None, TIMEOUT)
        .map_err(RuntimeError::kafka("fetch metadata"))?;
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
                "repartition topic '{topic}' has {n} partitions, the inputs have {partitions}"
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
    if !missing_internal.is_empty() {
        let new_topics: Vec<NewTopic> = missing_internal
            .iter()
            .map(|name| {
                // Records are read once, soon after they are written: a week is plenty.
                NewTopic::new(name, partitions, TopicReplication::Fixed(-1))
                    .set("cleanup.policy", "delete")
                    .set("retention.ms", "604800000")
            })
            .collect();
        let results = futures::executor::block_on(admin.create_topics(&new_topics, &options))
            .map_err(RuntimeError::kafka("create repartition topics"))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(%topic, partitions, "created repartition topic"),
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => problems.push(format!(
                    "creating repartition topic '{topic}' failed: {code}"
                )),
            }
        }
        if !problems.is_empty() {
            return Err(RuntimeError::Topics(problems));
        }
    }
    if !missing.is_empty() {
        let new_topics: Vec<NewTopic> = missing
            .iter()
            .map(|name| {
                // -1: the broker's default replication factor (KIP-464).
                NewTopic::new(name, partitions, TopicReplication::Fixed(-1))
                    .set("cleanup.policy", "compact")
            })
            .collect();
        let results = futures::executor::block_on(admin.create_topics(&new_topics, &options))
            .map_err(RuntimeError::kafka("create changelog topics"))?;
        for result in results {
            match result {
                Ok(topic) => tracing::info!(%topic, partitions, "created changelog topic"),
                // Another instance created it at the same moment: fine, it is checked below.
                Err((_, RDKafkaErrorCode::TopicAlreadyExists)) => {}
                Err((topic, code)) => {
                    problems.push(format!("creating changelog topic '{topic}' failed: {code}"))
                }
            }
        }
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
    Ok(partitions)
}
