//! `saga-streams schemas`: the registry subjects of a topology's Avro topics, checked against or
//! registered in a Schema Registry.

use std::process::ExitCode;

use anyhow::{anyhow, Context};

use super::args::TopologyArgs;
use crate::codec::compat::{self, Against, Level};
use crate::codec::registry::{Registry, RegistryError};
use crate::codec::schemas::{subjects, Catalogue, Subject};
use crate::codec::REGISTRY_TIMEOUT;
use crate::runtime::secrets::AUDIT_TARGET;
use crate::saga::SagaDefinition;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams schemas list --topology topologies/order_saga.yaml\n  saga-streams schemas check --schema-registry-url http://127.0.0.1:18081/apis/ccompat/v7\n  saga-streams schemas register --schema-registry-url http://127.0.0.1:18081/apis/ccompat/v7"
)]
pub struct SchemasArgs {
    #[command(subcommand)]
    pub command: SchemasCommand,
}

#[derive(Debug, clap::Subcommand)]
pub enum SchemasCommand {
    /// List the subjects of the topology's Avro topics and the local files they are made of.
    List(ListArgs),
    /// Compare each local schema with the registered versions of its subject under the subject's
    /// compatibility level; exits 1 when any is incompatible.
    Check(CheckArgs),
    /// Set each subject's compatibility level and register the local schema; exits 1 when the
    /// registry refuses one.
    Register(RegisterArgs),
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams schemas list --topology topologies/order_saga.yaml --topic-format payments.commands=avro"
)]
pub struct ListArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams schemas check --schema-registry-url http://127.0.0.1:18081/apis/ccompat/v7   # exit 1 when incompatible"
)]
pub struct CheckArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Level for subjects the registry has none for (Confluent's default).
    #[arg(long, default_value = "BACKWARD")]
    pub default_compatibility: String,
}

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Example:\n  saga-streams schemas register --schema-registry-url http://127.0.0.1:18081/apis/ccompat/v7 --compatibility BACKWARD"
)]
pub struct RegisterArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// The compatibility level set on every subject before registering (registries differ in
    /// their default, so it is always set explicitly).
    #[arg(long, default_value = "BACKWARD")]
    pub compatibility: String,
}

pub fn run(args: SchemasArgs) -> anyhow::Result<ExitCode> {
    match args.command {
        SchemasCommand::List(a) => list(a),
        SchemasCommand::Check(a) => check(a),
        SchemasCommand::Register(a) => register(a),
    }
}

fn load(topology: &TopologyArgs) -> anyhow::Result<(std::sync::Arc<SagaDefinition>, Vec<Subject>)> {
    let def = topology.load()?;
    let dir = def
        .schemas_dir
        .clone()
        .ok_or_else(|| anyhow!("the topology names no `schemas:` directory; give --schemas"))?;
    let catalogue = Catalogue::load(&dir).map_err(|p| anyhow!(p.join("\n")))?;
    let subjects = subjects(&def.topic_set(), &catalogue).map_err(|p| anyhow!(p.join("\n")))?;
    if subjects.is_empty() {
        return Err(anyhow!(
            "no topic of {} is avro (set `format: avro` in the topology or --topic-format)",
            topology.topology.display()
        ));
    }
    Ok((def, subjects))
}

fn registry(topology: &TopologyArgs) -> anyhow::Result<Registry> {
    let url = topology.schema_registry_url.as_deref().ok_or_else(|| {
        anyhow!("give the registry with --schema-registry-url or SCHEMA_REGISTRY_URL")
    })?;
    Registry::connect(url, &topology.registry_access(), REGISTRY_TIMEOUT).map_err(|e| anyhow!(e))
}

fn files(subject: &Subject) -> String {
    subject
        .files
        .iter()
        .map(|f| {
            f.file_name()
                .map(|n| n.to_string_lossy().into_owned())
                .unwrap_or_default()
        })
        .collect::<Vec<_>>()
        .join(", ")
}

fn list(args: ListArgs) -> anyhow::Result<ExitCode> {
    let (_, subjects) = load(&args.topology)?;
    for s in &subjects {
        println!(
            "{}  (topics: {}; {})",
            s.name,
            s.topics.join(", "),
            files(s)
        );
    }
    Ok(ExitCode::SUCCESS)
}

fn check(args: CheckArgs) -> anyhow::Result<ExitCode> {
    Level::parse(&args.default_compatibility).map_err(|e| anyhow!(e))?;
    let (_, subjects) = load(&args.topology)?;
    let registry = registry(&args.topology)?;
    let mut incompatible = 0;
    for subject in &subjects {
        let versions = registry
            .versions(&subject.name)
            .with_context(|| format!("subject {}", subject.name))?;
        if versions.is_empty() {
            println!(
                "{}: new subject, nothing registered to compare with: OK",
                subject.name
            );
            continue;
        }
        let (level_text, set) = match registry.compatibility(&subject.name) {
            Ok((level, true)) => (level, "the subject's"),
            Ok((level, false)) => (level, "the registry's global"),
            Err(RegistryError::NotFound(_)) => (args.default_compatibility.clone(), "the default"),
            Err(e) => return Err(anyhow!("subject {}: {e}", subject.name)),
        };
        let level =
            Level::parse(&level_text).map_err(|e| anyhow!("subject {}: {e}", subject.name))?;
        let mut registered = Vec::new();
        for v in &versions {
            registered.push(
                registry
                    .version(&subject.name, *v)
                    .with_context(|| format!("subject {} version {v}", subject.name))?,
            );
        }
        let against: Vec<Against<'_>> = registered
            .iter()
            .zip(&versions)
            .map(|(r, v)| Against {
                version: r.version.unwrap_or(*v),
                id: r.id,
                schema: &r.schema,
            })
            .collect();
        let compared = if level.transitive {
            format!(
                "versions {}",
                versions
                    .iter()
                    .map(u32::to_string)
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        } else {
            format!("version {}", versions.last().copied().unwrap_or_default())
        };
        let problems = compat::check(level, &subject.text, &against)
            .map_err(|e| anyhow!("subject {}: {e}", subject.name))?;
        if problems.is_empty() {
            println!(
                "{}: compatible ({level_text}, {set} level) with {compared} ({})",
                subject.name,
                files(subject)
            );
            continue;
        }
        incompatible += 1;
        println!(
            "{}: INCOMPATIBLE ({level_text}, {set} level) with {compared} ({})",
            subject.name,
            files(subject)
        );
        for p in problems {
            let why = match p.direction {
                "backward" => format!(
                    "the local schema cannot read data written with version {}",
                    p.version
                ),
                _ => format!(
                    "readers on version {} cannot read data written with the local schema",
                    p.version
                ),
            };
            println!("  - {}: {} ({why})", p.broken.path, p.broken.message);
        }
    }
    if incompatible > 0 {
        println!("schemas check: FAILED ({incompatible} incompatible subject(s))");
        Ok(ExitCode::FAILURE)
    } else {
        println!("schemas check: PASSED ({} subject(s))", subjects.len());
        Ok(ExitCode::SUCCESS)
    }
}

fn register(args: RegisterArgs) -> anyhow::Result<ExitCode> {
    let level = args.compatibility.to_ascii_uppercase();
    Level::parse(&level).map_err(|e| anyhow!(e))?;
    let (_, subjects) = load(&args.topology)?;
    let registry = registry(&args.topology)?;
    let mut refused = 0;
    for subject in &subjects {
        registry
            .set_compatibility(&subject.name, &level)
            .map_err(|e| {
                anyhow!(
                    "subject {}: setting compatibility {level}: {e}",
                    subject.name
                )
            })?;
        let registered = registry.register(&subject.name, &subject.text);
        let outcome = match &registered {
            Ok(_) => "registered",
            Err(RegistryError::Refused(_)) => "refused",
            Err(_) => "failed",
        };
        tracing::info!(
            target: AUDIT_TARGET,
            event = "schema_registration",
            subject = %subject.name,
            compatibility = %level,
            id = registered.as_ref().ok().map(|r| r.id),
            outcome,
            registry = %registry.url(),
            "schema registration"
        );
        match registered {
            Ok(r) => println!(
                "{}: registered ({level}) as {}id {} ({})",
                subject.name,
                r.version
                    .map(|v| format!("version {v}, "))
                    .unwrap_or_default(),
                r.id,
                files(subject)
            ),
            Err(RegistryError::Refused(reason)) => {
                refused += 1;
                println!(
                    "{}: REFUSED by the registry: {reason} ({})",
                    subject.name,
                    files(subject)
                );
            }
            Err(e) => return Err(anyhow!("subject {}: {e}", subject.name)),
        }
    }
    if refused > 0 {
        println!("schemas register: FAILED ({refused} subject(s) refused)");
        Ok(ExitCode::FAILURE)
    } else {
        println!("schemas register: done ({} subject(s))", subjects.len());
        Ok(ExitCode::SUCCESS)
    }
}
