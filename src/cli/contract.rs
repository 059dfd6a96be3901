//! `saga-streams contract`: the message contract of a topology as JSON Schema, AsyncAPI, or
//! examples made by the real state machine.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use anyhow::Context;
use serde_json::{json, Map, Value};

use crate::saga::contract_export;
use crate::saga::SagaDefinition;
use crate::sim::scenario;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams contract topologies/order_saga.yaml --out contract/\n  \
saga-streams contract topologies/order_saga.yaml --format asyncapi > asyncapi.json\n  \
saga-streams contract topologies/order_saga.yaml --format examples"
)]
pub struct ContractArgs {
    /// The topology file.
    pub topology: PathBuf,
    /// What to print: every message's JSON Schema (one object keyed by event type), the AsyncAPI
    /// 3.0 document, or an example of every message (made by running sagas through the real
    /// state machine).
    #[arg(long, value_enum, default_value = "json-schema")]
    pub format: ContractFormat,
    /// Write `<EventType>.schema.json` for every message, `asyncapi.json` and `examples.json`
    /// into this directory instead of printing.
    #[arg(long)]
    pub out: Option<PathBuf>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum ContractFormat {
    JsonSchema,
    Asyncapi,
    Examples,
}

fn schemas(def: &SagaDefinition) -> Map<String, Value> {
    contract_export::messages(def)
        .iter()
        .map(|m| (m.event_type.clone(), contract_export::standalone(def, m)))
        .collect()
}

fn examples(def: Arc<SagaDefinition>) -> anyhow::Result<Value> {
    let examples = scenario::examples(def.clone()).map_err(anyhow::Error::msg)?;
    for message in contract_export::messages(&def) {
        if !examples.iter().any(|e| e.event_type == message.event_type) {
            eprintln!(
                "warning: no example of {} ({}): the sagas run for examples never reach it",
                message.event_type, message.role
            );
        }
    }
    Ok(Value::Array(
        examples
            .into_iter()
            .map(|e| json!({"topic": e.topic, "event_type": e.event_type, "value": e.value}))
            .collect(),
    ))
}

fn pretty(value: &Value) -> String {
    serde_json::to_string_pretty(value).unwrap_or_default() + "\n"
}

pub fn run(args: ContractArgs) -> anyhow::Result<ExitCode> {
    let def = Arc::new(SagaDefinition::load(&args.topology)?);
    if let Some(dir) = &args.out {
        std::fs::create_dir_all(dir).with_context(|| format!("{}", dir.display()))?;
        let write = |name: String, value: &Value| {
            let path = dir.join(name);
            std::fs::write(&path, pretty(value))
                .with_context(|| format!("cannot write {}", path.display()))
        };
        let schemas = schemas(&def);
        for (event_type, schema) in &schemas {
            write(format!("{event_type}.schema.json"), schema)?;
        }
        write("asyncapi.json".into(), &contract_export::asyncapi(&def))?;
        write("examples.json".into(), &examples(def.clone())?)?;
        eprintln!(
            "wrote {} message schemas, asyncapi.json and examples.json to {}",
            schemas.len(),
            dir.display()
        );
        return Ok(ExitCode::SUCCESS);
    }
    let value = match args.format {
        ContractFormat::JsonSchema => Value::Object(schemas(&def)),
        ContractFormat::Asyncapi => contract_export::asyncapi(&def),
        ContractFormat::Examples => examples(def)?,
    };
    print!("{}", pretty(&value));
    Ok(ExitCode::SUCCESS)
}
