//! Arguments shared by several subcommands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

use crate::codec::registry::RegistryAccess;
use crate::codec::signing::Signing;
use crate::codec::Codec;
use crate::saga::topology::Format;
use crate::saga::SagaDefinition;

/// The broker, and how every client of the command talks to it.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers (also `SAGA_STREAMS_BOOTSTRAP`, or `KAFKA_BOOTSTRAP`).
    #[arg(long)]
    pub bootstrap: String,
    /// A librdkafka property for every Kafka client of the command: `--kafka-config
    /// security.protocol=SASL_SSL` (repeatable); `NAME_file=PATH` reads the value from a file
    /// (`sasl.password_file=/run/secrets/kafka`). Also `SAGA_STREAMS_KAFKA_<NAME>` variables and
    /// the configuration file's `kafka:` table.
    #[arg(long = "kafka-config", value_parser = super::config::parse_property)]
    pub kafka_config: Vec<(String, String)>,
}

impl KafkaArgs {
    /// The command's Kafka settings: file, then environment, then flags; secrets read.
    pub fn settings(&self) -> anyhow::Result<crate::runtime::client::KafkaSettings> {
        super::config::kafka_settings(&self.bootstrap, &self.kafka_config).map_err(|e| anyhow!(e))
    }
}

/// Which saga, and how its topics are named.
#[derive(Debug, Clone, clap::Args)]
pub struct TopologyArgs {
    /// The topology file.
    #[arg(long, default_value = "topologies/order_saga.yaml")]
    pub topology: PathBuf,
    /// Prefix for every topic of the topology (a namespace per environment or test).
    #[arg(long, default_value = "")]
    pub topic_prefix: String,
    /// Override a step's timeout: `--step-timeout payment=5s` (repeatable).
    #[arg(long = "step-timeout", value_parser = parse_step_timeout)]
    pub step_timeouts: Vec<(String, Duration)>,
    /// Override a topic's format, the topic named as in the topology file (without prefix):
    /// `--topic-format orders.created=avro` (`json`, `avro`, `avro:record_name`; repeatable).
    #[arg(long = "topic-format", value_parser = parse_topic_format)]
    pub topic_formats: Vec<(String, Format)>,
    /// The directory of the Avro schemas (default: the topology's `schemas:`).
    #[arg(long)]
    pub schemas: Option<PathBuf>,
    /// The Schema Registry (Confluent REST API), needed when a topic is Avro (also
    /// `SCHEMA_REGISTRY_URL`).
    #[arg(long)]
    pub schema_registry_url: Option<String>,
    /// The registry's basic-auth user, or API key (its password or API secret in
    /// `--schema-registry-password-file`).
    #[arg(long)]
    pub schema_registry_user: Option<String>,
    /// A file holding the registry password or API secret (re-read on SIGHUP).
    #[arg(long)]
    pub schema_registry_password_file: Option<PathBuf>,
    /// A file holding a bearer token for the registry (re-read on SIGHUP).
    #[arg(long)]
    pub schema_registry_token_file: Option<PathBuf>,
    /// PEM bundle of CA certificates trusted for the registry's certificate, besides the system's.
    #[arg(long)]
    pub schema_registry_ca: Option<PathBuf>,
    /// PEM client certificate for a registry that asks for one (with `--schema-registry-key`).
    #[arg(long)]
    pub schema_registry_cert: Option<PathBuf>,
    /// PKCS#8 PEM key of `--schema-registry-cert`.
    #[arg(long)]
    pub schema_registry_key: Option<PathBuf>,
    /// The keys for topics with `signatures:` in the topology: lines of `<key id> <secret>`, the
    /// first signs, all verify (re-read on SIGHUP). See README, "Signed events".
    #[arg(long)]
    pub signing_keys: Option<PathBuf>,
}

fn parse_topic_format(s: &str) -> Result<(String, Format), String> {
    let (topic, format) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not TOPIC=FORMAT, e.g. orders.created=avro"))?;
    Ok((topic.to_string(), Format::parse(format)?))
}

fn parse_step_timeout(s: &str) -> Result<(String, Duration), String> {
    let (step, duration) = s
        .split_once('=')
        .ok_or_else(|| format!("'{s}' is not STEP=DURATION, e.g. payment=5s"))?;
    let duration = humantime::parse_duration(duration)
        .map_err(|e| format!("'{duration}' is not a duration like 5s: {e}"))?;
    Ok((step.to_string(), duration))
}

impl TopologyArgs {
    pub fn load(&self) -> anyhow::Result<Arc<SagaDefinition>> {
        let mut def = SagaDefinition::load(&self.topology)?;
        let mut problems = Vec::new();
        for (topic, format) in &self.topic_formats {
            if let Err(e) = def.set_topic_format(topic, *format) {
                problems.push(format!("--topic-format: {e}"));
            }
        }
        if let Some(dir) = &self.schemas {
            def.schemas_dir = Some(dir.clone());
        }
        let mut def = def.with_topic_prefix(&self.topic_prefix);
        for (step, timeout) in &self.step_timeouts {
            if let Err(e) = def.set_step_timeout(step, *timeout) {
                problems.push(format!("--step-timeout: {e}"));
            }
        }
        if !problems.is_empty() {
            return Err(anyhow!(problems.join("\n")));
        }
        Ok(Arc::new(def))
    }

    /// How to reach the registry beyond its URL.
    pub fn registry_access(&self) -> RegistryAccess {
        RegistryAccess {
            user: self.schema_registry_user.clone(),
            password_file: self.schema_registry_password_file.clone(),
            token_file: self.schema_registry_token_file.clone(),
            ca: self.schema_registry_ca.clone(),
            cert: self.schema_registry_cert.clone(),
            key: self.schema_registry_key.clone(),
        }
    }

    /// The codec of the topology's topics for a process writing to `writes`.
    pub fn codec(&self, def: &SagaDefinition, writes: &[String]) -> anyhow::Result<Arc<Codec>> {
        Codec::with_access(
            &def.topic_set(),
            self.schema_registry_url.as_deref(),
            &self.registry_access(),
            writes,
        )
        .and_then(|codec| {
            let topics: Vec<String> = def.topic_set().topics.into_keys().collect();
            Signing::new(def.signature_modes(), self.signing_keys.as_ref(), &topics)
                .map(|signing| codec.with_signing(signing))
        })
        .map(Arc::new)
        .map_err(|e| anyhow!(e))
    }
}

/// The default instance id: the host name (stable across restarts of a container or host, so a
/// restarted instance fences its previous incarnation).
pub fn default_instance_id() -> String {
    std::env::var("HOSTNAME")
        .ok()
        .filter(|h| !h.is_empty())
        .or_else(|| {
            std::fs::read_to_string("/etc/hostname")
                .ok()
                .map(|h| h.trim().to_string())
        })
        .filter(|h| !h.is_empty())
        .unwrap_or_else(|| "instance-0".into())
}

/// Parses `SKU=N[,SKU=N...]`.
pub fn parse_stock(s: &str) -> Result<Vec<(String, i64)>, String> {
    s.split(',')
        .filter(|p| !p.trim().is_empty())
        .map(|pair| {
            let (sku, n) = pair
                .split_once('=')
                .ok_or_else(|| format!("'{pair}' is not SKU=QUANTITY"))?;
            let n = n
                .trim()
                .parse()
                .map_err(|e| format!("'{n}' is not a quantity: {e}"))?;
            Ok((sku.trim().to_string(), n))
        })
        .collect()
}

/// A share between 0 and 1.
pub fn parse_share(s: &str) -> Result<f64, String> {
    let v: f64 = s
        .parse()
        .map_err(|e| format!("'{s}' is not a number: {e}"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

pub fn parse_duration(s: &str) -> Result<Duration, String> {
    humantime::parse_duration(s).map_err(|e| format!("'{s}' is not a duration like 100ms: {e}"))
}
