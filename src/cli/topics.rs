//! `saga-streams topics create`: every topic a topology needs (its inputs, outputs and dead-letter
//! topics), with a partition count and replication factor; what exists already is shown and left
//! as it is. The application's internal topics (changelogs, repartition, control, members) are
//! created by `run` itself.

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
use rdkafka::client::DefaultClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::types::RDKafkaErrorCode;

use super::args::{KafkaArgs, TopologyArgs};
use crate::runtime::client::KafkaClients;
use crate::saga::topology::dlq_topic;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams topics create --bootstrap 127.0.0.1:19092 --partitions 6\n  saga-streams topics create --bootstrap 127.0.0.1:19092 --topology topologies/order_with_shipping.yaml --partitions 12 --replication-factor 3 --dry-run"
)]
pub struct TopicsArgs {
    #[command(subcommand)]
    pub command: TopicsCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum TopicsCommand {
    /// Create the topology's inputs, outputs and dead-letter topics that do not exist.
    #[command(
        after_help = "Example:\n  saga-streams topics create --bootstrap 127.0.0.1:19092 --partitions 6 --topic-config retention.ms=604800000"
    )]
    Create(CreateArgs),
}

#[derive(Debug, clap::Args)]
pub struct CreateArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Partitions of each new topic. The inputs must all have the same count (they are
    /// co-partitioned by saga id): default, that of the inputs that exist, else 6.
    #[arg(long)]
    pub partitions: Option<i32>,
    /// Replicas of each new topic; default: the brokers' `default.replication.factor`.
    #[arg(long)]
    pub replication_factor: Option<i32>,
    /// A topic setting for every new topic: `--topic-config retention.ms=604800000` (repeatable).
    #[arg(long = "topic-config", value_parser = super::config::parse_property)]
    pub configs: Vec<(String, String)>,
    /// Print what would be created, create nothing.
    #[arg(long)]
    pub dry_run: bool,
}

/// Partitions when neither the flag nor existing inputs say.
const DEFAULT_PARTITIONS: i32 = 6;
const TIMEOUT: Duration = Duration::from_secs(30);

pub fn run(args: TopicsArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        TopicsCommand::Create(args) => create(args),
    }
}

fn create(args: CreateArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let def = args.topology.load()?;
    if let Some(n) = args.partitions.filter(|n| *n < 1) {
        bail!("--partitions {n}: a topic needs at least one partition");
    }
    if let Some(n) = args.replication_factor.filter(|n| *n < 1) {
        bail!("--replication-factor {n}: a topic needs at least one replica");
    }
    let inputs = def.input_topics();
    let dlqs: Vec<String> = inputs.iter().map(|t| dlq_topic(t)).collect();
    let mut wanted: Vec<(String, &str)> = inputs.iter().map(|t| (t.clone(), "input")).collect();
    for topic in def.output_topics() {
        if wanted.iter().any(|(t, _)| *t == topic) {
            continue;
        }
        let role = if dlqs.contains(&topic) {
            "dead letters"
        } else {
            "output"
        };
        wanted.push((topic, role));
    }
    let consumer: BaseConsumer = kafka
        .client_config()
        .create()
        .map_err(|e| anyhow!("a Kafka client: {e}"))?;
    let metadata = consumer
        .fetch_metadata(None, TIMEOUT)
        .map_err(|e| anyhow!("reading the cluster's topics from {}: {e}", kafka.bootstrap))?;
    let existing: BTreeMap<String, (i32, usize)> = metadata
        .topics()
        .iter()
        .filter(|t| t.error().is_none())
        .map(|t| {
            let replicas = t.partitions().first().map_or(0, |p| p.replicas().len());
            (
                t.name().to_string(),
                (t.partitions().len() as i32, replicas),
            )
        })
        .collect();
    // The inputs are co-partitioned: new ones follow those that exist.
    let input_counts: BTreeMap<&String, i32> = inputs
        .iter()
        .filter_map(|t| existing.get(t).map(|(n, _)| (t, *n)))
        .collect();
    let mut counts: Vec<i32> = input_counts.values().copied().collect();
    counts.dedup();
    let partitions = match (args.partitions, counts.as_slice()) {
        (_, [a, b, ..]) if a != b => bail!(
            "the existing input topics have different partition counts ({}); they must be equal (co-partitioned by saga id): fix them first",
            listing(&input_counts)
        ),
        (Some(p), [n]) if p != *n && inputs.iter().any(|t| !existing.contains_key(t)) => bail!(
            "--partitions {p}, but the existing input topics have {n} ({}); new inputs must have the same count",
            listing(&input_counts)
        ),
        (Some(p), _) => p,
        (None, [n, ..]) => *n,
        (None, []) => DEFAULT_PARTITIONS,
    };
    let missing: Vec<&(String, &str)> = wanted
        .iter()
        .filter(|(t, _)| !existing.contains_key(t))
        .collect();
    // -1: the brokers' default (KIP-464).
    let replication = args.replication_factor.unwrap_or(-1);
    let mut created: BTreeMap<String, Result<(), String>> = BTreeMap::new();
    if !args.dry_run && !missing.is_empty() {
        let admin: AdminClient<DefaultClientContext> = kafka
            .client_config()
            .create()
            .map_err(|e| anyhow!("a Kafka admin client: {e}"))?;
        let new: Vec<NewTopic> = missing
            .iter()
            .map(|(name, _)| {
                args.configs.iter().fold(
                    NewTopic::new(name, partitions, TopicReplication::Fixed(replication)),
                    |topic, (k, v)| topic.set(k, v),
                )
            })
            .collect();
        let options = AdminOptions::new().operation_timeout(Some(TIMEOUT));
        let results = futures::executor::block_on(admin.create_topics(&new, &options))
            .map_err(|e| anyhow!("creating topics: {e}"))?;
        for result in results {
            match result {
                Ok(topic) => created.insert(topic, Ok(())),
                // Created by someone else meanwhile: it exists, which is what was asked.
                Err((topic, RDKafkaErrorCode::TopicAlreadyExists)) => created.insert(topic, Ok(())),
                Err((topic, code)) => created.insert(topic, Err(code.to_string())),
            };
        }
    }
    let replicas_text = args
        .replication_factor
        .map_or("the brokers' default".to_string(), |r| r.to_string());
    let mut table = comfy_table::Table::new();
    table.set_header(["topic", "role", "partitions", "replicas", "state"]);
    let mut failed = 0;
    for (topic, role) in &wanted {
        let (n, replicas, state) = match (existing.get(topic), created.get(topic)) {
            (Some((n, r)), _) => (n.to_string(), r.to_string(), "exists".to_string()),
            (None, _) if args.dry_run => (
                partitions.to_string(),
                replicas_text.clone(),
                "would be created".to_string(),
            ),
            (None, Some(Ok(()))) => (
                partitions.to_string(),
                replicas_text.clone(),
                "created".to_string(),
            ),
            (None, Some(Err(e))) => {
                failed += 1;
                ("-".into(), "-".into(), format!("not created: {e}"))
            }
            (None, None) => ("-".into(), "-".into(), "not created".into()),
        };
        table.add_row([topic.clone(), role.to_string(), n, replicas, state]);
    }
    println!("{table}");
    println!(
        "`run` creates the application's own topics (<application id>-sagas-changelog, -control, -members, -rekey-repartition) with the inputs' partition count."
    );
    if failed > 0 {
        bail!("{failed} topic(s) could not be created");
    }
    Ok(ExitCode::SUCCESS)
}

fn listing(counts: &BTreeMap<&String, i32>) -> String {
    counts
        .iter()
        .map(|(t, n)| format!("{t}: {n}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// A refusal to start for missing topics, with the command that creates them.
pub fn name_the_fix(error: crate::runtime::RuntimeError) -> crate::runtime::RuntimeError {
    match error {
        crate::runtime::RuntimeError::Topics(mut problems)
            if problems.iter().any(|p| p.ends_with("does not exist")) =>
        {
            problems.push(
                "create the topology's topics with `saga-streams topics create --partitions N` (with this command's --bootstrap, --topology and --topic-prefix)".into(),
            );
            crate::runtime::RuntimeError::Topics(problems)
        }
        other => other,
    }
}
