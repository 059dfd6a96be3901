//! `saga-streams describe`: a topology's state machine.

use std::path::PathBuf;
use std::process::ExitCode;

use crate::saga::{describe, SagaDefinition};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams describe topologies/order_with_shipping.yaml\n  saga-streams describe topologies/order_saga.yaml --format mermaid"
)]
pub struct DescribeArgs {
    /// The topology file.
    pub file: PathBuf,
    /// What to print.
    #[arg(long, value_enum, default_value = "both")]
    pub format: DescribeFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum DescribeFormat {
    Text,
    Mermaid,
    Both,
}

pub fn run(args: DescribeArgs) -> anyhow::Result<ExitCode> {
    let def = SagaDefinition::load(&args.file)?;
    if args.format != DescribeFormat::Mermaid {
        print!("{}", describe::text(&def));
    }
    if args.format == DescribeFormat::Both {
        println!();
    }
    if args.format != DescribeFormat::Text {
        println!("```mermaid");
        print!("{}", describe::mermaid(&def));
        println!("```");
    }
    Ok(ExitCode::SUCCESS)
}
