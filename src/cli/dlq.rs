//! `saga-streams dlq list|show|replay`: the dead-letter topics of a topology, read
//! `read_committed` from the beginning to their end, filtered; and replay, which writes a dead
//! letter's original key, value and headers back to the partition it was read from, marked as a
//! replay, with the loop guard of [`crate::ops::dlq`].

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::Duration;

use anyhow::{anyhow, bail};
use comfy_table::Table;

use super::args::{parse_duration, KafkaArgs, TopologyArgs};
use crate::ops::dlq::{self as ops, Filter, Letter, Outcome};
use crate::saga::contract::rfc3339;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams dlq list --bootstrap 127.0.0.1:19092 --reason unknown_saga --since 1h\n  saga-streams dlq show --bootstrap 127.0.0.1:19092 --topic payments.events.dlq --partition 0 --offset 12\n  saga-streams dlq replay --bootstrap 127.0.0.1:19092 --reason invalid_field --dry-run"
)]
pub struct DlqArgs {
    #[command(subcommand)]
    pub command: DlqCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum DlqCommand {
    /// Dead letters with their reason, time, source and saga, filtered.
    #[command(
        after_help = "Example:\n  saga-streams dlq list --bootstrap 127.0.0.1:19092 --topic payments.events --reason unknown_saga"
    )]
    List(ListArgs),
    /// One dead letter whole: headers, key and value (a bounded preview).
    #[command(
        after_help = "Example:\n  saga-streams dlq show --bootstrap 127.0.0.1:19092 --topic orders.created.dlq --partition 0 --offset 3"
    )]
    Show(ShowArgs),
    /// Write dead letters back to where they were read from (same key, value, headers and
    /// partition), marked as replays.
    #[command(
        after_help = "Example:\n  saga-streams dlq replay --bootstrap 127.0.0.1:19092 --reason unknown_saga --saga-id o-42 --dry-run"
    )]
    Replay(ReplayArgs),
}

/// Which dead letters.
#[derive(Debug, clap::Args)]
pub struct Select {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// A dead-letter topic, or the input topic it belongs to (repeatable); default: all of the
    /// topology's.
    #[arg(long)]
    pub topic: Vec<String>,
    /// Only dead letters of this reason (`unknown_saga`, `invalid_field`, ...; repeatable).
    #[arg(long)]
    pub reason: Vec<String>,
    /// Only dead letters written at or after this time: RFC 3339, or a duration ago (`2h`).
    #[arg(long)]
    pub since: Option<String>,
    /// Only dead letters written before this time: RFC 3339, or a duration ago.
    #[arg(long)]
    pub until: Option<String>,
    /// Only records read at these offsets of their source partition: `FROM-TO` (inclusive), or
    /// one offset.
    #[arg(long)]
    pub source_offsets: Option<String>,
    /// Only records of this saga (their key, or the topology's key field in their JSON body).
    #[arg(long)]
    pub saga_id: Option<String>,
    /// How long reading the topics to their end may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ListArgs {
    #[command(flatten)]
    pub select: Select,
    /// Show at most this many (the newest are cut).
    #[arg(long, default_value_t = 200)]
    pub limit: usize,
    /// One JSON object per dead letter instead of a table.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, clap::Args)]
pub struct ShowArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// The dead-letter topic (or its input topic).
    #[arg(long)]
    pub topic: String,
    #[arg(long)]
    /// The dead letter's partition.
    pub partition: i32,
    /// The dead letter's offset.
    #[arg(long)]
    pub offset: i64,
    /// The most of the value shown.
    #[arg(long, default_value_t = 65_536)]
    pub max_bytes: usize,
    /// Write the whole value to this file instead.
    #[arg(long)]
    pub value_to: Option<PathBuf>,
    /// How long reading may take.
    #[arg(long, default_value = "60s", value_parser = parse_duration)]
    pub timeout: Duration,
}

#[derive(Debug, clap::Args)]
pub struct ReplayArgs {
    #[command(flatten)]
    pub select: Select,
    /// Show what would be replayed, write nothing.
    #[arg(long)]
    pub dry_run: bool,
    /// Also replay records whose replay failed before (the latest failure, once more).
    #[arg(long)]
    pub again: bool,
}

/// The selection's dead letters and filter.
fn read_letters(
    select: &Select,
) -> anyhow::Result<(Vec<Letter>, Filter, crate::runtime::client::KafkaSettings)> {
    let kafka = select.kafka.settings()?;
    let def = select.topology.load()?;
    let topics = ops::dlq_topics(&def, &select.topology.topic_prefix, &select.topic)
        .map_err(anyhow::Error::msg)?;
    let filter = Filter {
        reasons: select.reason.clone(),
        since: select
            .since
            .as_deref()
            .map(ops::parse_time)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        until: select
            .until
            .as_deref()
            .map(ops::parse_time)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        offsets: select
            .source_offsets
            .as_deref()
            .map(ops::parse_offsets)
            .transpose()
            .map_err(anyhow::Error::msg)?,
        saga_id: select.saga_id.clone(),
        positions: Vec::new(),
        key_field: def.key_field.clone(),
    };
    // What the command shows, and what the replay guard reads: nothing else is kept.
    let mut letters = Vec::new();
    ops::for_each_letter(&kafka, &topics, select.timeout, &mut |l| {
        if filter.matches(&l) || l.replay_of.is_some() || l.marker.is_some() {
            letters.push(l);
        }
    })
    .map_err(anyhow::Error::msg)?;
    Ok((letters, filter, kafka))
}

pub fn run(args: DlqArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        DlqCommand::List(args) => list(args),
        DlqCommand::Show(args) => show(args),
        DlqCommand::Replay(args) => replay(args),
    }
}

fn short(text: &str, n: usize) -> String {
    if text.chars().count() <= n {
        return text.to_string();
    }
    format!("{}…", text.chars().take(n).collect::<String>())
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (letters, filter, _) = read_letters(&args.select)?;
    let matching: Vec<&Letter> = letters.iter().filter(|l| filter.matches(l)).collect();
    let mut by_reason: BTreeMap<(&str, &str), usize> = BTreeMap::new();
    for l in &matching {
        *by_reason
            .entry((l.record.topic.as_str(), l.reason.as_str()))
            .or_default() += 1;
    }
    let shown = &matching[..matching.len().min(args.limit)];
    if args.json {
        for l in shown {
            println!("{}", l.json(&filter.key_field, 1_000));
        }
        return Ok(ExitCode::SUCCESS);
    }
    let mut table = Table::new();
    table.set_header([
        "dead letter",
        "at",
        "reason",
        "source (topic/partition/offset)",
        "saga",
        "replay of",
        "message",
    ]);
    for l in shown {
        table.add_row([
            l.position.clone(),
            rfc3339(l.record.timestamp_ms),
            l.reason.clone(),
            l.source
                .as_ref()
                .map_or("-".into(), |(t, p, o)| format!("{t}/{p}/{o}")),
            l.saga_id(&filter.key_field).unwrap_or_else(|| "-".into()),
            l.replay_of
                .as_ref()
                .map_or("-".into(), |(from, n)| format!("{from} (#{n})")),
            short(&l.message(), 80),
        ]);
    }
    if shown.is_empty() {
        println!("no dead letter matches");
    } else {
        println!("{table}");
    }
    for ((topic, reason), n) in &by_reason {
        println!("{topic}: {n} {reason}");
    }
    if matching.len() > shown.len() {
        println!(
            "{} more not shown (--limit {})",
            matching.len() - shown.len(),
            args.limit
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn show(args: ShowArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let def = args.topology.load()?;
    let topic = ops::dlq_topics(
        &def,
        &args.topology.topic_prefix,
        std::slice::from_ref(&args.topic),
    )
    .map_err(anyhow::Error::msg)?
    .remove(0);
    let mut found = None;
    ops::for_each_letter(
        &kafka,
        std::slice::from_ref(&topic),
        args.timeout,
        &mut |l| {
            if l.record.partition == args.partition && l.record.offset == args.offset {
                found = Some(l);
            }
        },
    )
    .map_err(anyhow::Error::msg)?;
    let Some(letter) = found else {
        bail!(
            "no dead letter at {topic} partition {} offset {} (deleted by retention, or not written)",
            args.partition,
            args.offset
        );
    };
    println!("dead letter: {}", letter.position);
    println!("at: {}", rfc3339(letter.record.timestamp_ms));
    println!("reason: {}", letter.reason);
    println!("message: {}", letter.message());
    println!(
        "key: {}",
        letter
            .record
            .key
            .as_deref()
            .map_or("(none)".into(), |k| String::from_utf8_lossy(k).into_owned())
    );
    println!("headers:");
    for (name, value) in &letter.record.headers {
        println!("  {name}: {}", short(&String::from_utf8_lossy(value), 500));
    }
    let value = letter.record.value.as_deref().unwrap_or_default();
    match &args.value_to {
        Some(path) => {
            std::fs::write(path, value).map_err(|e| anyhow!("writing {}: {e}", path.display()))?;
            println!("value: {} bytes written to {}", value.len(), path.display());
        }
        None => {
            let shown = &value[..value.len().min(args.max_bytes)];
            match std::str::from_utf8(shown) {
                Ok(text) => println!("value ({} bytes):\n{text}", value.len()),
                Err(_) => println!(
                    "value ({} bytes, hex):\n{}",
                    value.len(),
                    hex::encode(shown)
                ),
            }
            if value.len() > shown.len() {
                println!(
                    "… {} more bytes (--max-bytes, --value-to)",
                    value.len() - shown.len()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn replay(args: ReplayArgs) -> anyhow::Result<ExitCode> {
    let (letters, filter, kafka) = read_letters(&args.select)?;
    let plan = ops::plan(&letters, &filter, args.again);
    let outcomes = ops::replay(&kafka, &plan, args.dry_run).map_err(anyhow::Error::msg)?;
    let mut table = Table::new();
    table.set_header(["dead letter", "reason", "to", "saga", "outcome"]);
    let (mut replayed, mut skipped, mut failed) = (0, 0, 0);
    for ((letter, _), outcome) in plan.iter().zip(&outcomes) {
        let text = match outcome {
            Outcome::Replayed { offset } => {
                replayed += 1;
                format!("replayed (offset {offset})")
            }
            Outcome::ReplayedUnmarked { offset, why } => {
                replayed += 1;
                format!("replayed (offset {offset}), but not marked as replayed ({why}): a later replay would send it again")
            }
            Outcome::WouldBeReplayed => {
                replayed += 1;
                "would be replayed".to_string()
            }
            Outcome::Skipped(why) => {
                skipped += 1;
                format!("skipped: {why}")
            }
            Outcome::Failed(why) => {
                failed += 1;
                format!("not replayed: {why}")
            }
        };
        table.add_row([
            letter.position.clone(),
            letter.reason.clone(),
            letter
                .source
                .as_ref()
                .map_or("-".into(), |(t, p, _)| format!("{t}/{p}")),
            letter
                .saga_id(&filter.key_field)
                .unwrap_or_else(|| "-".into()),
            text,
        ]);
    }
    if plan.is_empty() {
        println!("no dead letter matches");
    } else {
        println!("{table}");
    }
    let verb = if args.dry_run {
        "would be replayed"
    } else {
        "replayed"
    };
    println!("{replayed} {verb}, {skipped} skipped, {failed} failed");
    if failed > 0 {
        bail!("{failed} dead letter(s) could not be replayed");
    }
    Ok(ExitCode::SUCCESS)
}
