//! The command line. Each subcommand lives in a file of its own here.

mod acls;
mod args;
mod audit;
pub mod config;
mod config_show;
mod contract;
mod demo;
mod describe;
mod dlq;
mod docs;
mod lag;
mod load;
mod reset;
mod run;
mod sagas;
mod schemas;
mod simulate;
mod test_cmd;
mod topics;

use std::process::ExitCode;

use clap::{CommandFactory, FromArgMatches, Parser, Subcommand};

use crate::telemetry::{init_tracing, shutdown_tracing, LogFormat};

/// saga-streams: a Kafka Streams-style saga orchestrator with exactly-once state and outputs.
#[derive(Debug, Parser)]
#[command(
    name = "saga-streams",
    version,
    about,
    after_help = "Examples:\n  saga-streams demo                      # the saga end to end on the local stack\n  saga-streams run --config saga.toml    # the orchestrator\n  saga-streams test topologies/order_saga.yaml topologies/scenarios/order_saga/\n\nEvery flag also reads SAGA_STREAMS_<FLAG>; `saga-streams config show` prints the effective settings."
)]
pub struct Cli {
    /// Log line format on stderr; the level comes from RUST_LOG (default info; warn for `demo`).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "SAGA_STREAMS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
    /// Export spans over OTLP/HTTP to this URL (e.g. http://127.0.0.1:4318/v1/traces); off when
    /// unset.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")]
    pub otlp_endpoint: Option<String>,
    /// CA bundle (PEM) the OTLP collector's certificate is checked against (an https endpoint),
    /// besides the system's.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_CERTIFICATE")]
    pub otlp_ca: Option<std::path::PathBuf>,
    /// Client certificate (PEM) for a collector that wants mutual TLS; with --otlp-key.
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_CLIENT_CERTIFICATE")]
    pub otlp_cert: Option<std::path::PathBuf>,
    /// The client certificate's key (PKCS#8 PEM).
    #[arg(long, global = true, env = "OTEL_EXPORTER_OTLP_CLIENT_KEY")]
    pub otlp_key: Option<std::path::PathBuf>,
    /// A configuration file (TOML, or YAML): every flag's setting by its name (`application_id`),
    /// librdkafka properties under `kafka`. Flags and `SAGA_STREAMS_...` variables take precedence.
    #[arg(long, global = true, env = "SAGA_STREAMS_CONFIG")]
    pub config: Option<std::path::PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the saga orchestrator (one instance of a consumer group).
    Run(run::RunArgs),
    /// Print a topology's state machine as text and as a Mermaid diagram.
    Describe(describe::DescribeArgs),
    /// Run a simulated participant that answers one step's commands.
    Simulate(simulate::SimulateArgs),
    /// Produce start events (OrderCreated) at a steady rate.
    Load(load::LoadArgs),
    /// Check a saga's topics read_committed; exits 1 on any violation.
    Audit(audit::AuditArgs),
    /// Consumer lag of any consumer group, per partition, against the last stable offset.
    Lag(lag::LagArgs),
    /// The whole story on a local stack: topics, orchestrator, participants, load, audit.
    Demo(demo::DemoArgs),
    /// Avro schemas of the topology: list, check compatibility against the registry, register.
    Schemas(schemas::SchemasArgs),
    /// The effective configuration (file, environment, flags), every secret masked.
    Config(config_show::ConfigArgs),
    /// The ACLs the orchestrator (or a participant simulator) needs on a secured cluster.
    Acls(acls::AclsArgs),
    /// Run saga scenarios (YAML) against a topology without a broker, in virtual time.
    Test(test_cmd::TestArgs),
    /// The message contract: JSON Schema per message, AsyncAPI, or examples of every message.
    Contract(contract::ContractArgs),
    /// Dead letters: list, show, replay to where they were read from.
    Dlq(dlq::DlqArgs),
    /// Start an application over: input offsets, internal topics, local state (refused while
    /// instances run).
    Reset(reset::ResetArgs),
    /// Create the topics a topology needs (inputs, outputs, dead letters).
    Topics(topics::TopicsArgs),
    /// Sagas of a running deployment: list, get, retry, cancel, resume (through any instance).
    Sagas(sagas::SagasArgs),
    /// Shell completions (bash, zsh, fish, elvish, powershell) on stdout.
    Completions(docs::CompletionsArgs),
    /// Man pages generated from this command line.
    Man(docs::ManArgs),
}

/// Parses the command line, runs the command and maps its result to the process exit code.
pub fn main() -> ExitCode {
    let argv: Vec<std::ffi::OsString> = std::env::args_os().collect();
    if let Err(e) = config::prepare(&argv, &config::with_env_vars(Cli::command())) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    // Built again: clap reads a variable's value when the flag is given it, so only now are
    // the file's values (set as variables by `prepare`) seen.
    let matches = config::with_env_vars(Cli::command()).get_matches_from(argv);
    let cli = match Cli::from_arg_matches(&matches) {
        Ok(cli) => cli,
        Err(e) => e.exit(),
    };
    let default_filter = match cli.command {
        Command::Demo(_) => "warn",
        // The processor's own warnings (a dead letter) are what scenarios check, not noise.
        Command::Test(_) => "error",
        _ => "info",
    };
    // Commands that run no saga and talk to no broker export no spans.
    let offline = matches!(
        cli.command,
        Command::Test(_)
            | Command::Contract(_)
            | Command::Completions(_)
            | Command::Man(_)
            | Command::Describe(_)
    );
    let otlp = cli
        .otlp_endpoint
        .as_ref()
        .filter(|_| !offline)
        .map(|endpoint| crate::telemetry::OtlpSettings {
            endpoint: endpoint.clone(),
            ca: cli.otlp_ca.clone(),
            cert: cli.otlp_cert.clone(),
            key: cli.otlp_key.clone(),
        });
    if let Err(e) = init_tracing(cli.log_format, default_filter, otlp.as_ref()) {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    if let Err(e) = crate::runtime::failpoints::setup_from_env() {
        eprintln!("error: {e}");
        return ExitCode::FAILURE;
    }
    // Secret files are read again on SIGHUP (which would otherwise end the process).
    if let Err(e) = crate::runtime::secrets::rotate_on_sighup() {
        eprintln!("error: cannot handle SIGHUP: {e}");
        return ExitCode::FAILURE;
    }
    let result = match cli.command {
        Command::Run(args) => run::run(args),
        Command::Describe(args) => describe::run(args),
        Command::Simulate(args) => simulate::run(args),
        Command::Load(args) => load::run(args),
        Command::Audit(args) => audit::run(args),
        Command::Lag(args) => lag::run(args),
        Command::Demo(args) => demo::run(args),
        Command::Schemas(args) => schemas::run(args),
        Command::Config(args) => config_show::run(args),
        Command::Acls(args) => acls::run(args),
        Command::Test(args) => test_cmd::run(args),
        Command::Contract(args) => contract::run(args),
        Command::Sagas(args) => sagas::run(args),
        Command::Topics(args) => topics::run(args),
        Command::Dlq(args) => dlq::run(args),
        Command::Reset(args) => reset::run(args),
        Command::Completions(args) => docs::completions(args),
        Command::Man(args) => docs::man(args),
    };
    shutdown_tracing();
    match result {
        Ok(code) => code,
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every command, nested ones too, with its full name.
    fn commands(cmd: &clap::Command, name: String, out: &mut Vec<(String, clap::Command)>) {
        for sub in cmd.get_subcommands().filter(|s| s.get_name() != "help") {
            let full = format!("{name} {}", sub.get_name());
            out.push((full.clone(), sub.clone()));
            commands(sub, full, out);
        }
    }

    #[test]
    fn every_flag_has_help_and_every_command_shows_an_example() {
        let root = config::with_env_vars(Cli::command());
        let mut all = vec![("saga-streams".to_string(), root.clone())];
        commands(&root, "saga-streams".into(), &mut all);
        let mut problems = Vec::new();
        for (name, cmd) in &all {
            let after = cmd
                .get_after_help()
                .or(cmd.get_after_long_help())
                .map(|h| h.to_string())
                .unwrap_or_default();
            if !after.contains("Example") {
                problems.push(format!("{name}: no example in --help"));
            }
            for arg in cmd.get_arguments() {
                let id = arg.get_id().as_str();
                if matches!(id, "help" | "version") {
                    continue;
                }
                if arg.get_help().is_none() && arg.get_long_help().is_none() {
                    problems.push(format!("{name}: --{id} has no help"));
                }
            }
        }
        assert!(problems.is_empty(), "{}", problems.join("\n"));
    }

    #[test]
    fn every_example_in_the_help_parses() {
        let root = config::with_env_vars(Cli::command());
        let mut all = vec![("saga-streams".to_string(), root.clone())];
        commands(&root, "saga-streams".into(), &mut all);
        let mut checked = 0;
        for (name, cmd) in &all {
            let help = cmd
                .get_after_help()
                .map(|h| h.to_string())
                .unwrap_or_default();
            for line in help.lines() {
                // The command itself: no comment, no redirection or pipe, no variables before it.
                let line = line.split(" #").next().unwrap_or_default();
                let line = line.split(['>', '|']).next().unwrap_or_default();
                let words: Vec<&str> = line
                    .split_whitespace()
                    .skip_while(|w| w.contains('=') && !w.starts_with('-'))
                    .collect();
                if words.first() != Some(&"saga-streams") {
                    continue;
                }
                checked += 1;
                let parsed = config::with_env_vars(Cli::command()).try_get_matches_from(&words);
                // A configuration file supplies what an example with --config leaves out.
                let from_file = words.contains(&"--config");
                if let Err(e) = parsed.as_ref().map(|_| ()) {
                    if from_file && e.kind() == clap::error::ErrorKind::MissingRequiredArgument {
                        continue;
                    }
                    panic!("{name}: example '{}' does not parse: {e}", words.join(" "));
                }
            }
        }
        assert!(checked >= 20, "{checked} examples");
    }
}
