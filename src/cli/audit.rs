//! `saga-streams audit`: checks a saga's topics; exits 1 on any violation.

use std::process::ExitCode;
use std::time::Duration;

use super::args::{parse_duration, KafkaArgs, TopologyArgs};
use crate::sim::audit::{audit, AuditReport};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams audit --bootstrap 127.0.0.1:19092 --topic-prefix demo-1764500000.   # exit 1 on any violation"
)]
pub struct AuditArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// How long reading the topics may take.
    #[arg(long, default_value = "120s", value_parser = parse_duration)]
    pub timeout: Duration,
}

/// Prints the report's table, its first violations and the verdict.
pub fn print_report(report: &AuditReport) {
    println!("{}", report.table());
    for v in report.violations.iter().take(20) {
        println!("violation: {v}");
    }
    if report.violations.len() > 20 {
        println!("... and {} more violations", report.violations.len() - 20);
    }
    if report.is_clean() {
        println!("audit: PASSED ({} sagas, no violation)", report.sagas);
    } else {
        println!("audit: FAILED ({} violations)", report.violations.len());
    }
}

pub fn run(args: AuditArgs) -> anyhow::Result<ExitCode> {
    let def = args.topology.load()?;
    let codec = args.topology.codec(&def, &[])?;
    let report = audit(&args.kafka.settings()?, &def, &codec, args.timeout)?;
    print_report(&report);
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
