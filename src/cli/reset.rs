//! `saga-streams reset`: start an application over, like Kafka Streams' reset tool. It refuses
//! while the group has members: the broker does not delete a group that is not empty, and that
//! deletion comes first. Then the input offsets are set (to the earliest, to a time, or to an
//! offset), the application's own topics (changelogs, control, repartition, members) are deleted
//! (`run` creates them again), and the local state directories to remove are named. `--dry-run`
//! prints the plan and changes nothing.

use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Offset, TopicPartitionList};

use super::args::{KafkaArgs, TopologyArgs};
use crate::runtime::client::KafkaClients;
use crate::runtime::members::members_topic;
use crate::saga::topology::{control_topic, repartition_topic};
use crate::saga::SAGA_STORE;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams reset --bootstrap 127.0.0.1:19092 --application-id order_saga --dry-run\n  saga-streams reset --bootstrap 127.0.0.1:19092 --application-id order_saga --to-datetime 2026-11-30T08:00:00Z"
)]
pub struct ResetArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// The application to reset (as given to `run`; default the topic prefix and the saga's
    /// name).
    #[arg(long)]
    pub application_id: Option<String>,
    /// Start the inputs from the first record of a time (RFC 3339): each partition from its
    /// first record at or after it (its end when there is none).
    #[arg(long, conflicts_with = "to_offset")]
    pub to_datetime: Option<String>,
    /// Start every input partition at this offset (within the partition's range).
    #[arg(long)]
    pub to_offset: Option<i64>,
    /// The `--state-dir` of the instances, to name the directories to remove.
    #[arg(long, default_value = "state")]
    pub state_dir: PathBuf,
    /// Print what would be done and change nothing.
    #[arg(long)]
    pub dry_run: bool,
}

const TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(args: ResetArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let def = args.topology.load()?;
    let app = args
        .application_id
        .clone()
        .unwrap_or_else(|| format!("{}{}", args.topology.topic_prefix, def.name));
    let consumer: BaseConsumer = kafka
        .client_config()
        .set("group.id", &app)
        .set("enable.auto.commit", "false")
        .create()
        .map_err(|e| anyhow!("a Kafka client: {e}"))?;
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| anyhow!("reading the cluster's topics: {e}"))?;
    let partitions_of = |topic: &str| -> Option<i32> {
        metadata
            .topics()
            .iter()
            .find(|t| t.name() == topic && t.error().is_none())
            .map(|t| t.partitions().len() as i32)
    };
    let inputs: Vec<(String, i32)> = def
        .input_topics()
        .into_iter()
        .filter_map(|t| partitions_of(&t).map(|n| (t, n)))
        .collect();
    let internal: Vec<String> = [
        format!("{app}-{SAGA_STORE}-changelog"),
        control_topic(&app),
        repartition_topic(&app),
        members_topic(&app),
    ]
    .into_iter()
    .filter(|t| partitions_of(t).is_some())
    .collect();

    // Who is in the group now (the classic protocol's view; KIP-848 groups are refused by the
    // deletion below when they have members).
    let listed = consumer.fetch_group_list(Some(&app), TIMEOUT);
    let members = listed.as_ref().ok().and_then(|list| {
        list.groups()
            .iter()
            .find(|g| g.name() == app)
            .map(|g| (g.state().to_string(), g.members().len()))
    });
    if let Some((state, n)) = &members {
        if *n > 0 {
            bail!(
                "application '{app}' has {n} active member(s) (group state {state}): stop every instance first"
            );
        }
    }

    // Where the inputs start again.
    let target = match (&args.to_datetime, args.to_offset) {
        (Some(text), _) => {
            let at = humantime::parse_rfc3339_weak(text)
                .map_err(|e| anyhow!("--to-datetime '{text}': {e}"))?;
            let ms = at
                .duration_since(std::time::UNIX_EPOCH)
                .map_or(0, |d| d.as_millis() as i64);
            let mut query = TopicPartitionList::new();
            for (topic, n) in &inputs {
                for p in 0..*n {
                    query
                        .add_partition_offset(topic, p, Offset::Offset(ms))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
            let found = consumer
                .offsets_for_times(query, TIMEOUT)
                .map_err(|e| anyhow!("looking up offsets for {text}: {e}"))?;
            let mut resolved = TopicPartitionList::new();
            for e in found.elements() {
                // No record at or after the time: the partition's end.
                let offset = match e.offset() {
                    Offset::Offset(o) => o,
                    _ => {
                        consumer
                            .fetch_watermarks(e.topic(), e.partition(), TIMEOUT)
                            .map_err(|err| anyhow!("the end of {}: {err}", e.topic()))?
                            .1
                    }
                };
                resolved
                    .add_partition_offset(e.topic(), e.partition(), Offset::Offset(offset))
                    .map_err(|e| anyhow!("{e}"))?;
            }
            Some(resolved)
        }
        (None, Some(offset)) => {
            let mut resolved = TopicPartitionList::new();
            for (topic, n) in &inputs {
                for p in 0..*n {
                    let (low, high) = consumer
                        .fetch_watermarks(topic, p, TIMEOUT)
                        .map_err(|e| anyhow!("the range of {topic} partition {p}: {e}"))?;
                    if offset < low || offset > high {
                        bail!("--to-offset {offset} is outside {topic} partition {p} ({low} to {high})");
                    }
                    resolved
                        .add_partition_offset(topic, p, Offset::Offset(offset))
                        .map_err(|e| anyhow!("{e}"))?;
                }
            }
            Some(resolved)
        }
        (None, None) => None,
    };

    let state = args.state_dir.join(&app);
    println!("application {app}:");
    match (&members, &listed) {
        (Some((state, _)), _) => println!("  group state: {state}, no member listed"),
        (None, Ok(_)) => println!("  group: not found (never committed, or deleted)"),
        (None, Err(e)) => println!(
            "  group: could not be described ({e}); the reset itself is refused by the broker while the group has members"
        ),
    }
    match &target {
        None => println!(
            "  inputs: from the earliest record (the group's committed offsets are deleted): {}",
            inputs
                .iter()
                .map(|(t, _)| t.as_str())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        Some(tpl) => {
            println!("  inputs: the group's committed offsets are deleted, then set to:");
            for e in tpl.elements() {
                if let Offset::Offset(o) = e.offset() {
                    println!("    {} partition {}: {o}", e.topic(), e.partition());
                }
            }
        }
    }
    if internal.is_empty() {
        println!("  internal topics: none exist");
    } else {
        println!(
            "  internal topics deleted (run creates them again): {}",
            internal.join(", ")
        );
    }
    println!(
        "  local state: remove {} on every instance (its --state-dir) before starting it again",
        state.display()
    );
    if args.dry_run {
        println!("dry run: nothing changed");
        return Ok(ExitCode::SUCCESS);
    }

    let admin: AdminClient<DefaultClientContext> = kafka
        .client_config()
        .create()
        .map_err(|e| anyhow!("a Kafka admin client: {e}"))?;
    let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
    // The broker refuses to delete a group with members: the guard that matters.
    let deleted = futures::executor::block_on(admin.delete_groups(&[app.as_str()], &options))
        .map_err(|e| anyhow!("deleting the group's offsets: {e}"))?;
    for result in deleted {
        match result {
            Ok(_) | Err((_, RDKafkaErrorCode::GroupIdNotFound)) => {}
            Err((_, RDKafkaErrorCode::NonEmptyGroup)) => bail!(
                "application '{app}' has active members: stop every instance first (nothing was changed)"
            ),
            Err((_, code)) => bail!("deleting the group '{app}': {code} (nothing was changed)"),
        }
    }
    if let Some(tpl) = &target {
        consumer.commit(tpl, CommitMode::Sync).map_err(|e| {
            anyhow!("setting the input offsets: {e} (the group's committed offsets were deleted already: the inputs start from the earliest unless this command is run again)")
        })?;
    }
    let partial = "the input offsets were reset already; run the same command again to finish";
    if !internal.is_empty() {
        let names: Vec<&str> = internal.iter().map(String::as_str).collect();
        let results = futures::executor::block_on(admin.delete_topics(&names, &options))
            .map_err(|e| anyhow!("deleting the internal topics: {e} ({partial})"))?;
        for result in results {
            match result {
                Ok(_) | Err((_, RDKafkaErrorCode::UnknownTopicOrPartition)) => {}
                Err((topic, code)) => bail!("deleting {topic}: {code} ({partial})"),
            }
        }
        // Gone from the metadata before `run` may create them again.
        let deadline = Instant::now() + Duration::from_secs(60);
        loop {
            // Unknown while the metadata cannot be read: looked at again.
            let left: Vec<String> = consumer
                .fetch_metadata(None, TIMEOUT)
                .map(|m| {
                    m.topics()
                        .iter()
                        .filter(|t| internal.iter().any(|n| n == t.name()) && t.error().is_none())
                        .map(|t| t.name().to_string())
                        .collect()
                })
                .unwrap_or_else(|_| internal.clone());
            if left.is_empty() {
                break;
            }
            if Instant::now() > deadline {
                bail!(
                    "still being deleted after 60 s, or the cluster cannot be read: {} ({partial})",
                    left.join(", ")
                );
            }
            std::thread::sleep(Duration::from_millis(200));
        }
    }
    println!(
        "reset done: remove {} on every instance, then start them",
        state.display()
    );
    Ok(ExitCode::SUCCESS)
}
