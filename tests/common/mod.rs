//! Shared helpers for the integration tests: where the real broker and registry are, and unique
//! names so tests never see each other's topics, groups or transactional ids.
//!
//! A test that needs the broker or the registry fails with a message saying how to start them;
//! it never skips.

#![allow(dead_code)]

use std::time::{Duration, Instant};

use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::{BaseConsumer, Consumer};

const HOW_TO_START: &str =
    "start the local stack and export its addresses: scripts/stack up && eval \"$(scripts/stack env)\"";

/// The broker's bootstrap address from `KAFKA_BOOTSTRAP`, after checking that it answers a
/// metadata request.
pub fn kafka_bootstrap() -> String {
    let bootstrap = std::env::var("KAFKA_BOOTSTRAP")
        .unwrap_or_else(|_| panic!("KAFKA_BOOTSTRAP is not set; {HOW_TO_START}"));
    let consumer: BaseConsumer = ClientConfig::new()
        .set("bootstrap.servers", &bootstrap)
        .create()
        .expect("creating a metadata client");
    if let Err(e) = consumer.fetch_metadata(None, Duration::from_secs(10)) {
        panic!("the Kafka broker at {bootstrap} does not answer a metadata request ({e}); {HOW_TO_START}");
    }
    bootstrap
}

/// The Confluent-compatible registry URL from `SCHEMA_REGISTRY_URL`, after checking that it
/// lists its subjects.
pub fn schema_registry_url() -> String {
    let url = std::env::var("SCHEMA_REGISTRY_URL")
        .unwrap_or_else(|_| panic!("SCHEMA_REGISTRY_URL is not set; {HOW_TO_START}"));
    let probe = std::process::Command::new("curl")
        .args(["-fsS", "--max-time", "5", &format!("{url}/subjects")])
        .output()
        .expect("running curl");
    if !probe.status.success() {
        panic!(
            "the Schema Registry at {url} does not answer ({}); {HOW_TO_START}",
            String::from_utf8_lossy(&probe.stderr).trim()
        );
    }
    url
}

/// A name no other test or run uses.
pub fn unique(prefix: &str) -> String {
    format!("{prefix}-{}", uuid::Uuid::new_v4().simple())
}

pub fn admin(bootstrap: &str) -> AdminClient<DefaultClientContext> {
    ClientConfig::new()
        .set("bootstrap.servers", bootstrap)
        .create()
        .expect("creating an admin client")
}

/// Creates a topic and fails the test on any error, including "already exists".
pub async fn create_topic(bootstrap: &str, name: &str, partitions: i32) {
    let results = admin(bootstrap)
        .create_topics(
            &[NewTopic::new(name, partitions, TopicReplication::Fixed(1))],
            &AdminOptions::new().operation_timeout(Some(Duration::from_secs(30))),
        )
        .await
        .expect("create_topics request");
    for result in results {
        if let Err((topic, code)) = result {
            panic!("creating topic {topic} failed: {code}");
        }
    }
}

/// Polls `condition` until it holds or `limit` passes; returns whether it held.
pub fn poll_until(limit: Duration, mut condition: impl FnMut() -> bool) -> bool {
    let deadline = Instant::now() + limit;
    while Instant::now() < deadline {
        if condition() {
            return true;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    condition()
}

