//! `saga-streams load`: start events at a steady rate.

use std::process::ExitCode;

use indicatif::{ProgressBar, ProgressStyle};

use super::args::{KafkaArgs, TopologyArgs};
use crate::sim::load::{self, LoadSpec};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams load --bootstrap 127.0.0.1:19092 --orders 10000 --rate 1000"
)]
pub struct LoadArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// How many start events.
    #[arg(long, default_value_t = 1000)]
    pub orders: u64,
    /// Events per second; 0: as fast as possible.
    #[arg(long, default_value_t = 1000.0)]
    pub rate: f64,
    /// Saga ids are `<id-prefix><n>`. Default: `order-<random>-`.
    #[arg(long)]
    pub id_prefix: Option<String>,
    /// Produce in transactions of this many events; 0: a plain idempotent producer.
    #[arg(long, default_value_t = 0)]
    pub transaction_size: usize,
    /// How long each order may take to be delivered (a broker restarting) before the load fails.
    #[arg(long, default_value = "30s", value_parser = super::args::parse_duration)]
    pub deliver_within: std::time::Duration,
}

pub fn progress_bar(len: u64, what: &str) -> ProgressBar {
    let bar = ProgressBar::new(len);
    bar.set_style(
        ProgressStyle::with_template(&format!(
            "{{elapsed_precise}} {{bar:40}} {{pos:>7}}/{{len:7}} {what} ({{per_sec}})"
        ))
        .unwrap_or_else(|_| ProgressStyle::default_bar()),
    );
    bar
}

pub fn run(args: LoadArgs) -> anyhow::Result<ExitCode> {
    let def = args.topology.load()?;
    let codec = args
        .topology
        .codec(&def, std::slice::from_ref(&def.start_topic))?;
    let spec = LoadSpec {
        orders: args.orders,
        rate: args.rate,
        id_prefix: args.id_prefix.unwrap_or_else(|| {
            format!("order-{}-", &uuid::Uuid::new_v4().simple().to_string()[..8])
        }),
        transaction_size: args.transaction_size,
        deliver_within: args.deliver_within,
    };
    let bar = progress_bar(spec.orders, "produced");
    load::run(&args.kafka.settings()?, &def, &codec, &spec, &|n| {
        bar.set_position(n)
    })?;
    bar.finish();
    Ok(ExitCode::SUCCESS)
}
