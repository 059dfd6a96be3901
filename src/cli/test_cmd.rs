//! `saga-streams test`: runs saga scenarios against a topology, in process and in virtual time.

use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::Arc;

use crate::saga::SagaDefinition;
use crate::sim::scenario;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams test topologies/order_saga.yaml topologies/scenarios/order_saga/\n\n\
Exit status: 0 when every scenario holds, 1 when one does not (with a diff), 2 when a file cannot be read."
)]
pub struct TestArgs {
    /// The topology file.
    pub topology: PathBuf,
    /// Scenario files (YAML), or directories whose `*.yaml` files are all run.
    #[arg(required = true)]
    pub scenarios: Vec<PathBuf>,
}

/// The scenario files named, directories expanded to their `.yaml` files in name order.
fn scenario_files(paths: &[PathBuf]) -> Result<Vec<PathBuf>, String> {
    let mut files = Vec::new();
    for path in paths {
        if path.is_dir() {
            let mut found: Vec<PathBuf> = std::fs::read_dir(path)
                .map_err(|e| format!("{}: cannot list: {e}", path.display()))?
                .filter_map(|entry| entry.ok().map(|e| e.path()))
                .filter(|p| is_yaml(p))
                .collect();
            if found.is_empty() {
                return Err(format!("{}: no .yaml scenario in it", path.display()));
            }
            found.sort();
            files.extend(found);
        } else {
            files.push(path.clone());
        }
    }
    Ok(files)
}

fn is_yaml(path: &Path) -> bool {
    matches!(
        path.extension().and_then(|e| e.to_str()),
        Some("yaml" | "yml")
    )
}

pub fn run(args: TestArgs) -> anyhow::Result<ExitCode> {
    let def = match SagaDefinition::load(&args.topology) {
        Ok(def) => Arc::new(def),
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    let files = match scenario_files(&args.scenarios) {
        Ok(files) => files,
        Err(e) => {
            eprintln!("error: {e}");
            return Ok(ExitCode::from(2));
        }
    };
    // Every file is read first: a typo in one is reported before anything runs.
    let mut scenarios = Vec::new();
    let mut unreadable = false;
    for file in &files {
        match scenario::load(file) {
            Ok(s) => scenarios.push((file, s)),
            Err(e) => {
                eprintln!("error: {e}");
                unreadable = true;
            }
        }
    }
    if unreadable {
        return Ok(ExitCode::from(2));
    }
    if def.uses_avro() {
        println!(
            "note: {} has Avro topics; scenarios read and write them as JSON (the wire format is not exercised)",
            args.topology.display()
        );
    }
    let mut failed = 0;
    for (file, s) in &scenarios {
        let outcome = scenario::run(def.clone(), s);
        match &outcome.failure {
            None => println!("ok      {}: {}", file.display(), outcome.name),
            Some(why) => {
                failed += 1;
                println!("FAILED  {}: {}", file.display(), outcome.name);
                for line in why.lines() {
                    println!("    {line}");
                }
            }
        }
    }
    println!(
        "\n{} scenarios: {} passed, {failed} failed",
        scenarios.len(),
        scenarios.len() - failed
    );
    Ok(if failed == 0 {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}
