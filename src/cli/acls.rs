//! `saga-streams acls`: the ACLs an application's principal needs on a cluster with an authorizer,
//! derived from the topology: one per line (`<principal> <operation> <resource type> <pattern
//! type> <name>`, what `scripts/lib/KafkaAcls.java` reads), or as `kafka-acls` commands.

use std::process::ExitCode;

use super::args::TopologyArgs;
use super::simulate::step_index;
use crate::saga::topology::repartition_topic;
use crate::saga::topology::KeyPolicy;
use crate::saga::SagaDefinition;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams acls --principal User:saga\n  saga-streams acls --participant payments --principal User:payments"
)]
pub struct AclsArgs {
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// The principal the application authenticates as: `User:<SCRAM user>`, or with client
    /// certificates `User:<certificate CN>` (when the broker maps certificates to their CN).
    #[arg(long)]
    pub principal: String,
    /// The ACLs of the participant simulator of this step (`saga-streams simulate STEP`) instead
    /// of the orchestrator's.
    #[arg(long)]
    pub participant: Option<String>,
    /// The application id (default as for `run`, or `simulate` with `--participant`).
    #[arg(long)]
    pub application_id: Option<String>,
    /// Add what `run --session-timeout` / `--heartbeat-interval` need: AlterConfigs on the
    /// application's group (they are set on the group at start-up).
    #[arg(long)]
    pub group_configs: bool,
    /// `lines` for `scripts/lib/KafkaAcls.java`, or `kafka-acls` commands.
    #[arg(long, value_enum, default_value = "lines")]
    pub format: AclFormat,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum AclFormat {
    Lines,
    KafkaAcls,
}

/// One ACL that allows `operation` on a resource to the principal, from any host.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Acl {
    pub resource_type: &'static str,
    pub pattern: &'static str,
    pub name: String,
    pub operation: &'static str,
}

fn acl(
    resource_type: &'static str,
    pattern: &'static str,
    name: &str,
    operation: &'static str,
) -> Acl {
    Acl {
        resource_type,
        pattern,
        name: name.to_string(),
        operation,
    }
}

/// What an application with id `app` needs: read its inputs and its group, write its outputs,
/// create, read and write its internal topics (`<app>-...`: changelogs, repartition), and use its
/// transactional ids (`<app>-<instance id>`).
pub fn application_acls(app: &str, inputs: &[String], outputs: &[String]) -> Vec<Acl> {
    let mut acls = vec![acl("GROUP", "LITERAL", app, "READ")];
    for topic in inputs {
        acls.push(acl("TOPIC", "LITERAL", topic, "READ"));
    }
    for topic in outputs {
        acls.push(acl("TOPIC", "LITERAL", topic, "WRITE"));
    }
    let internal = format!("{app}-");
    for operation in ["CREATE", "READ", "WRITE", "DESCRIBE_CONFIGS"] {
        acls.push(acl("TOPIC", "PREFIXED", &internal, operation));
    }
    for operation in ["WRITE", "DESCRIBE"] {
        acls.push(acl("TRANSACTIONAL_ID", "PREFIXED", &internal, operation));
    }
    // The restore consumer's group (`<app>-restore`): it only looks up its coordinator.
    acls.push(acl("GROUP", "PREFIXED", &internal, "DESCRIBE"));
    acls.sort();
    acls.dedup();
    acls
}

/// The orchestrator's ACLs (its internal topics are `<app>-...` and not listed by name).
pub fn orchestrator_acls(def: &SagaDefinition, app: &str) -> Vec<Acl> {
    let internal = |t: &String| t.starts_with(&format!("{app}-"));
    let inputs: Vec<String> = def
        .input_topics()
        .into_iter()
        .filter(|t| !internal(t))
        .collect();
    let mut outputs: Vec<String> = def.output_topics();
    if def.keys == KeyPolicy::Rekey {
        outputs.retain(|t| *t != repartition_topic(app));
    }
    application_acls(app, &inputs, &outputs)
}

pub fn run(args: AclsArgs) -> anyhow::Result<ExitCode> {
    let def = args.topology.load()?;
    let acls = match &args.participant {
        None => {
            let app = args
                .application_id
                .clone()
                .unwrap_or_else(|| format!("{}{}", args.topology.topic_prefix, def.name));
            let mut acls = orchestrator_acls(&def, &app);
            if args.group_configs {
                acls.push(acl("GROUP", "LITERAL", &app, "ALTER_CONFIGS"));
            }
            acls
        }
        Some(step) => {
            let step = &def.steps[step_index(&def, step)?];
            let app = args
                .application_id
                .clone()
                .unwrap_or_else(|| format!("{}sim-{}", args.topology.topic_prefix, step.name));
            let mut inputs = vec![step.command.topic.clone()];
            inputs.push(step.compensation.topic.clone());
            inputs.dedup();
            application_acls(&app, &inputs, std::slice::from_ref(&step.reply_topic))
        }
    };
    for a in &acls {
        match args.format {
            AclFormat::Lines => println!(
                "{} {} {} {} {}",
                args.principal, a.operation, a.resource_type, a.pattern, a.name
            ),
            AclFormat::KafkaAcls => println!(
                "kafka-acls --bootstrap-server $BOOTSTRAP --command-config admin.properties --add --allow-principal {} --operation {} --{} {} --resource-pattern-type {}",
                args.principal,
                kafka_acls_operation(a.operation),
                match a.resource_type {
                    "TOPIC" => "topic",
                    "GROUP" => "group",
                    _ => "transactional-id",
                },
                a.name,
                a.pattern.to_ascii_lowercase()
            ),
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// `DESCRIBE_CONFIGS` as kafka-acls spells it (`DescribeConfigs`).
fn kafka_acls_operation(operation: &str) -> String {
    operation
        .split('_')
        .map(|w| {
            let lower = w.to_ascii_lowercase();
            let mut chars = lower.chars();
            chars
                .next()
                .map(|c| c.to_ascii_uppercase().to_string() + chars.as_str())
                .unwrap_or_default()
        })
        .collect()
}
