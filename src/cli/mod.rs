//! The command line. Each subcommand lives in a file of its own here and is listed only once it
//! works end to end.

use std::process::ExitCode;

use clap::Parser;

use crate::telemetry::{init_logging, LogFormat};

/// saga-streams: a Kafka Streams-style saga orchestrator with exactly-once state and outputs.
#[derive(Debug, Parser)]
#[command(name = "saga-streams", version, about)]
pub struct Cli {
    /// Log line format on stderr; the level comes from RUST_LOG (default info).
    #[arg(
        long,
        global = true,
        value_enum,
        default_value = "pretty",
        env = "SAGA_STREAMS_LOG_FORMAT"
    )]
    pub log_format: LogFormat,
}

/// Parses the command line, runs the command and maps its result to the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    init_logging(cli.log_format);
    ExitCode::SUCCESS
}
