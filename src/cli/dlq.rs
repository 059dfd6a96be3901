//! `saga-streams dlq list|show|replay`: the dead-letter topics of a topology, read
//! `read_committed` from the beginning to their end, filtered; and replay, which writes a dead
//! letter's original key, value and headers back to the partition it was read from, marked as a
//! replay.
//!
//! The loop guard: a replayed record carries `saga-streams.replay.from` (the dead letter it came
//! from) and `saga-streams.replay.count`. Should it be dead-lettered again, its dead letter keeps
//! those headers, so the next `replay` knows the original was replayed and failed again and skips
//! both; `--again` replays the latest failure once more, up to [`MAX_REPLAYS`] times in all.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::process::ExitCode;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{anyhow, bail};
use comfy_table::Table;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use serde_json::{json, Value};

use super::args::{parse_duration, KafkaArgs, TopologyArgs};
use crate::runtime::client::KafkaClients;
use crate::saga::contract::rfc3339;
use crate::saga::processor::dlq_headers;
use crate::saga::topology::dlq_topic;
use crate::sim::{self, ReadRecord};

/// Headers a replay adds.
pub const REPLAY_FROM: &str = "saga-streams.replay.from";
pub const REPLAY_COUNT: &str = "saga-streams.replay.count";
pub const REPLAY_AT: &str = "saga-streams.replay.at";
/// No record is replayed more often than this, whatever `--again` says.
pub const MAX_REPLAYS: u32 = 5;

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

/// A dead letter as the commands see it.
struct Letter {
    record: ReadRecord,
    reason: String,
    source: Option<(String, i32, i64)>,
    /// `<topic>/<partition>/<offset>` of the dead letter.
    position: String,
    /// Set when this record was itself a replay: the dead letter it came from, and how often.
    replay_of: Option<(String, u32)>,
}

fn header_text(record: &ReadRecord, name: &str) -> Option<String> {
    record
        .headers
        .iter()
        .rev()
        .find(|(n, _)| n == name)
        .map(|(_, v)| String::from_utf8_lossy(v).into_owned())
}

impl Letter {
    fn of(record: ReadRecord) -> Letter {
        let reason = header_text(&record, dlq_headers::KIND).unwrap_or_else(|| "?".into());
        let source = header_text(&record, dlq_headers::TOPIC).map(|topic| {
            let number = |h| header_text(&record, h).and_then(|v| v.parse().ok());
            (
                topic,
                number(dlq_headers::PARTITION).unwrap_or(-1) as i32,
                number(dlq_headers::OFFSET).unwrap_or(-1),
            )
        });
        let replay_of = header_text(&record, REPLAY_FROM).map(|from| {
            let count = header_text(&record, REPLAY_COUNT)
                .and_then(|c| c.parse().ok())
                .unwrap_or(1);
            (from, count)
        });
        let position = format!("{}/{}/{}", record.topic, record.partition, record.offset);
        Letter {
            record,
            reason,
            source,
            position,
            replay_of,
        }
    }

    fn saga_id(&self, key_field: &str) -> Option<String> {
        if let Some(key) = &self.record.key {
            return Some(String::from_utf8_lossy(key).into_owned());
        }
        let body: Value = serde_json::from_slice(self.record.value.as_deref()?).ok()?;
        let body = body.get("event").filter(|e| e.is_object()).unwrap_or(&body);
        body.get(key_field)?.as_str().map(String::from)
    }

    fn message(&self) -> String {
        header_text(&self.record, dlq_headers::MESSAGE).unwrap_or_default()
    }
}

/// A time flag: RFC 3339, or a duration before now.
fn parse_time(text: &str) -> anyhow::Result<i64> {
    if let Ok(at) = humantime::parse_rfc3339_weak(text) {
        return Ok(at
            .duration_since(UNIX_EPOCH)
            .map_or(0, |d| d.as_millis() as i64));
    }
    let ago = humantime::parse_duration(text)
        .map_err(|_| anyhow!("'{text}' is neither an RFC 3339 time nor a duration ago (2h)"))?;
    Ok(now_ms().saturating_sub(ago.as_millis() as i64))
}

fn now_ms() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as i64)
}

fn parse_offsets(text: &str) -> anyhow::Result<(i64, i64)> {
    let bad = || anyhow!("--source-offsets '{text}': FROM-TO or one offset");
    let (from, to) = match text.split_once('-') {
        Some((a, b)) => (
            a.trim().parse().map_err(|_| bad())?,
            b.trim().parse().map_err(|_| bad())?,
        ),
        None => {
            let one = text.trim().parse().map_err(|_| bad())?;
            (one, one)
        }
    };
    if from > to {
        return Err(bad());
    }
    Ok((from, to))
}

/// The dead-letter topics named (an input topic stands for its DLQ), with the prefix, checked
/// against the topology's.
fn dlq_topics(
    def: &crate::saga::SagaDefinition,
    prefix: &str,
    named: &[String],
) -> anyhow::Result<Vec<String>> {
    let all: Vec<String> = def.input_topics().iter().map(|t| dlq_topic(t)).collect();
    if named.is_empty() {
        return Ok(all);
    }
    let mut chosen = Vec::new();
    for name in named {
        let candidates = [
            name.clone(),
            dlq_topic(name),
            format!("{prefix}{name}"),
            dlq_topic(&format!("{prefix}{name}")),
        ];
        match candidates.iter().find(|c| all.contains(c)) {
            Some(found) if !chosen.contains(found) => chosen.push(found.clone()),
            Some(_) => {}
            None => bail!(
                "'{name}' is not a dead-letter topic of the topology (they are: {})",
                all.join(", ")
            ),
        }
    }
    Ok(chosen)
}

struct Filter {
    reasons: Vec<String>,
    since: Option<i64>,
    until: Option<i64>,
    offsets: Option<(i64, i64)>,
    saga_id: Option<String>,
    key_field: String,
}

impl Filter {
    fn of(select: &Select, key_field: &str) -> anyhow::Result<Filter> {
        Ok(Filter {
            reasons: select.reason.clone(),
            since: select.since.as_deref().map(parse_time).transpose()?,
            until: select.until.as_deref().map(parse_time).transpose()?,
            offsets: select
                .source_offsets
                .as_deref()
                .map(parse_offsets)
                .transpose()?,
            saga_id: select.saga_id.clone(),
            key_field: key_field.to_string(),
        })
    }

    fn matches(&self, letter: &Letter) -> bool {
        let at = letter.record.timestamp_ms;
        (self.reasons.is_empty() || self.reasons.contains(&letter.reason))
            && self.since.is_none_or(|t| at >= t)
            && self.until.is_none_or(|t| at < t)
            && self.offsets.is_none_or(|(from, to)| {
                letter
                    .source
                    .as_ref()
                    .is_some_and(|(_, _, o)| (from..=to).contains(o))
            })
            && self
                .saga_id
                .as_ref()
                .is_none_or(|id| letter.saga_id(&self.key_field).as_ref() == Some(id))
    }
}

/// Every dead letter of the selection, in topic order then as read, and the settings.
fn read_letters(
    select: &Select,
) -> anyhow::Result<(Vec<Letter>, Filter, crate::runtime::client::KafkaSettings)> {
    let kafka = select.kafka.settings()?;
    let def = select.topology.load()?;
    let topics = dlq_topics(&def, &select.topology.topic_prefix, &select.topic)?;
    let filter = Filter::of(select, &def.key_field)?;
    let mut letters = Vec::new();
    sim::for_each_to_end(&kafka, &topics, select.timeout, &mut |record| {
        letters.push(Letter::of(record))
    })
    .map_err(|e| anyhow!("reading the dead-letter topics: {e}"))?;
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
            println!(
                "{}",
                json!({
                    "dlq_topic": l.record.topic,
                    "partition": l.record.partition,
                    "offset": l.record.offset,
                    "at": rfc3339(l.record.timestamp_ms),
                    "reason": l.reason,
                    "message": l.message(),
                    "source": l.source.as_ref().map(|(t, p, o)| json!({"topic": t, "partition": p, "offset": o})),
                    "saga_id": l.saga_id(&filter.key_field),
                    "replay_of": l.replay_of.as_ref().map(|(from, n)| json!({"from": from, "count": n})),
                })
            );
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
    let topic = dlq_topics(
        &def,
        &args.topology.topic_prefix,
        std::slice::from_ref(&args.topic),
    )?
    .remove(0);
    let mut found = None;
    sim::for_each_to_end(
        &kafka,
        std::slice::from_ref(&topic),
        args.timeout,
        &mut |r| {
            if r.partition == args.partition && r.offset == args.offset {
                found = Some(r);
            }
        },
    )
    .map_err(|e| anyhow!("reading {topic}: {e}"))?;
    let Some(record) = found else {
        bail!(
            "no dead letter at {topic} partition {} offset {} (deleted by retention, or not written)",
            args.partition,
            args.offset
        );
    };
    let letter = Letter::of(record);
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
    // Dead letters whose replay was dead-lettered again: the failure's position names them.
    let failed_again: BTreeMap<&str, &str> = letters
        .iter()
        .filter_map(|l| {
            l.replay_of
                .as_ref()
                .map(|(from, _)| (from.as_str(), l.position.as_str()))
        })
        .collect();
    let mut plan: Vec<(&Letter, Result<u32, String>)> = Vec::new();
    for letter in letters.iter().filter(|l| filter.matches(l)) {
        let count = letter.replay_of.as_ref().map_or(0, |(_, n)| *n);
        let verdict = if let Some(again) = failed_again.get(letter.position.as_str()) {
            Err(format!(
                "replayed before and dead-lettered again at {again}"
            ))
        } else if letter.source.is_none() {
            Err("no source topic header: not a dead letter of saga-streams".into())
        } else if count > 0 && !args.again {
            Err(format!(
                "a replay (#{count}) that failed again: replayed only with --again"
            ))
        } else if count >= MAX_REPLAYS {
            Err(format!(
                "replayed {count} times already (at most {MAX_REPLAYS})"
            ))
        } else {
            Ok(count + 1)
        };
        plan.push((letter, verdict));
    }
    let producer: Option<FutureProducer> = if args.dry_run {
        None
    } else {
        Some(
            kafka
                .client_config()
                .set("acks", "all")
                .set("enable.idempotence", "true")
                .create()
                .map_err(|e| anyhow!("a producer: {e}"))?,
        )
    };
    let at = rfc3339(now_ms());
    // Everything is sent first, then each delivery is waited for.
    let mut sent: Vec<Result<Option<DeliveryFuture>, String>> = Vec::new();
    for (letter, verdict) in &plan {
        let (Ok(count), Some(producer), Some((topic, partition, _))) =
            (verdict, &producer, &letter.source)
        else {
            sent.push(Ok(None));
            continue;
        };
        let mut headers = OwnedHeaders::new();
        for (name, value) in &letter.record.headers {
            let ours = name.starts_with("dlq.")
                || [REPLAY_FROM, REPLAY_COUNT, REPLAY_AT].contains(&name.as_str());
            if !ours {
                headers = headers.insert(Header {
                    key: name,
                    value: Some(value),
                });
            }
        }
        let count = count.to_string();
        for (name, value) in [
            (REPLAY_FROM, letter.position.as_str()),
            (REPLAY_COUNT, count.as_str()),
            (REPLAY_AT, at.as_str()),
        ] {
            headers = headers.insert(Header {
                key: name,
                value: Some(value),
            });
        }
        let mut record = FutureRecord::<[u8], [u8]>::to(topic).headers(headers);
        if *partition >= 0 {
            record = record.partition(*partition);
        }
        if let Some(key) = &letter.record.key {
            record = record.key(key);
        }
        if let Some(value) = &letter.record.value {
            record = record.payload(value);
        }
        sent.push(
            producer
                .send_result(record)
                .map(Some)
                .map_err(|(e, _)| e.to_string()),
        );
    }
    let mut table = Table::new();
    table.set_header(["dead letter", "reason", "to", "saga", "outcome"]);
    let (mut replayed, mut skipped, mut failed) = (0, 0, 0);
    for ((letter, verdict), sent) in plan.iter().zip(sent) {
        let outcome = match (verdict, sent) {
            (Err(why), _) => {
                skipped += 1;
                format!("skipped: {why}")
            }
            (Ok(_), Ok(None)) => {
                replayed += 1;
                "would be replayed".to_string()
            }
            (Ok(_), Ok(Some(delivery))) => match futures::executor::block_on(delivery) {
                Ok(Ok(d)) => {
                    replayed += 1;
                    format!("replayed (offset {})", d.offset)
                }
                Ok(Err((e, _))) => {
                    failed += 1;
                    format!("not replayed: {e}")
                }
                Err(_) => {
                    failed += 1;
                    "not replayed: the producer went away".to_string()
                }
            },
            (Ok(_), Err(e)) => {
                failed += 1;
                format!("not replayed: {e}")
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
            outcome,
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
