//! `saga-streams lag`: per-partition lag of any consumer group.

use std::process::ExitCode;
use std::time::Duration;

use super::args::{parse_duration, KafkaArgs};
use crate::telemetry::lag::{group_lag, table};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams lag --bootstrap 127.0.0.1:19092 --group order_saga --timeout 10s"
)]
pub struct LagArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    /// The consumer group (for saga-streams: its application id).
    #[arg(long)]
    pub group: String,
    /// Only these topics (comma-separated); default: every topic the group committed offsets on.
    #[arg(long, value_delimiter = ',')]
    pub topics: Vec<String>,
    /// How long to wait for the broker's answers.
    #[arg(long, default_value = "30s", value_parser = parse_duration)]
    pub timeout: Duration,
}

pub fn run(args: LagArgs) -> anyhow::Result<ExitCode> {
    let lags = group_lag(
        &args.kafka.settings()?,
        &args.group,
        &args.topics,
        args.timeout,
    )
    .map_err(anyhow::Error::msg)?;
    if lags.is_empty() {
        println!("group '{}' has no committed offsets", args.group);
    } else {
        println!("{}", table(&lags));
    }
    Ok(ExitCode::SUCCESS)
}
