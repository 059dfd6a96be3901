//! `saga-streams config show`: the effective configuration, every secret masked.

use std::process::ExitCode;

use super::config::{self, file, shown, ENV_PREFIX};

#[derive(Debug, clap::Args)]
#[command(after_help = "Example:\n  saga-streams --config saga.toml config show")]
pub struct ConfigArgs {
    #[command(subcommand)]
    pub action: ConfigAction,
}

#[derive(Debug, clap::Subcommand)]
pub enum ConfigAction {
    /// Print the configuration file, the settings from it and from the environment, and the
    /// librdkafka properties every client gets.
    Show(ShowArgs),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams --config saga.toml config show\n  SAGA_STREAMS_KAFKA_SECURITY_PROTOCOL=SASL_SSL saga-streams config show --kafka-config sasl.mechanism=SCRAM-SHA-512"
)]
pub struct ShowArgs {
    /// Kafka bootstrap servers.
    #[arg(long)]
    pub bootstrap: Option<String>,
    /// librdkafka properties, as for every other command.
    #[arg(long = "kafka-config", value_parser = config::parse_property)]
    pub kafka_config: Vec<(String, String)>,
}

pub fn run(args: ConfigArgs) -> anyhow::Result<ExitCode> {
    let ConfigAction::Show(args) = args.action;
    println!("{}", render(&args)?);
    Ok(ExitCode::SUCCESS)
}

fn render(args: &ShowArgs) -> anyhow::Result<String> {
    let mut out = Vec::new();
    let file = file();
    out.push(format!(
        "configuration file: {}",
        file.path
            .as_ref()
            .map_or("none".into(), |p| p.display().to_string())
    ));
    let bootstrap = args.bootstrap.clone().unwrap_or_default();
    out.push(format!("bootstrap: {}", shown("bootstrap", &bootstrap)));
    let kafka =
        config::kafka_settings(&bootstrap, &args.kafka_config).map_err(anyhow::Error::msg)?;
    out.push("kafka (every client):".into());
    for (name, value) in kafka.masked() {
        out.push(format!("  {name}: {value}"));
    }
    out.push("settings:".into());
    let mut vars: Vec<(String, String)> = std::env::vars()
        .filter(|(name, _)| {
            name.starts_with(ENV_PREFIX) && !name.starts_with(config::KAFKA_ENV_PREFIX)
        })
        .collect();
    vars.sort();
    for (name, value) in vars {
        let source = if file.applied.contains(&name) {
            "configuration file"
        } else {
            "environment"
        };
        out.push(format!("  {name}: {} ({source})", shown(&name, &value)));
    }
    Ok(out.join("\n"))
}
