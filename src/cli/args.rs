//! Arguments shared by several subcommands.

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

use crate::saga::SagaDefinition;

/// The broker.
#[derive(Debug, Clone, clap::Args)]
pub struct KafkaArgs {
    /// Kafka bootstrap servers.
    #[arg(long, env = "KAFKA_BOOTSTRAP")]
    pub bootstrap: String,
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
        let mut def = SagaDefinition::load(&self.topology)?.with_topic_prefix(&self.topic_prefix);
        let mut problems = Vec::new();
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
