//! `saga-streams simulate <step>`: a participant service that answers one step's commands.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use anyhow::anyhow;

use super::args::{
    default_instance_id, parse_duration, parse_share, parse_stock, KafkaArgs, TopologyArgs,
};
use crate::codec::Codec;
use crate::runtime::{self, RuntimeConfig, Shutdown};
use crate::saga::SagaDefinition;
use crate::sim::participant::{Behaviour, Participant, PARTICIPANT_STORE};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams simulate payments --bootstrap 127.0.0.1:19092 --failure-share 0.05 --decline-above 400 --latency 20ms\n  saga-streams simulate inventory --bootstrap 127.0.0.1:19092 --stock sku-1=100,sku-2=5"
)]
pub struct SimulateArgs {
    /// The step to play: its name in the topology (`payment`, `inventory`); a plural works too.
    pub step: String,
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    #[command(flatten)]
    pub behaviour: BehaviourArgs,
    /// Consumer group id. Default: `<topic prefix>sim-<step>`.
    #[arg(long)]
    pub application_id: Option<String>,
    /// Stable identity of this simulator (transactional id suffix). Default: the host name.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Where the simulator's RocksDB state (stock, answered commands) lives.
    #[arg(long, default_value = "state")]
    pub state_dir: PathBuf,
    /// Serve /metrics, /health and /ready here; off when unset.
    #[arg(long)]
    pub metrics_addr: Option<std::net::SocketAddr>,
}

#[derive(Debug, Clone, clap::Args)]
pub struct BehaviourArgs {
    /// Share of commands answered with the failure reply.
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub failure_share: f64,
    /// Fail commands whose `amount` is above this.
    #[arg(long)]
    pub decline_above: Option<f64>,
    /// Stock per SKU (per partition), e.g. `sku-1=100,sku-2=5`; other SKUs are unlimited.
    #[arg(long, value_parser = parse_stock)]
    pub stock: Option<Vec<(String, i64)>>,
    /// Delay before each reply.
    #[arg(long, default_value = "0ms", value_parser = parse_duration)]
    pub latency: Duration,
    /// Share of commands never answered (compensations are always answered).
    #[arg(long, default_value = "0", value_parser = parse_share)]
    pub no_reply_share: f64,
    /// How long an answered command's id (and its answer, sent again for a re-sent command) is
    /// kept; then it is forgotten, so the store stays bounded.
    #[arg(long, default_value = "7d", value_parser = parse_duration)]
    pub remember_commands: Duration,
}

impl BehaviourArgs {
    pub fn behaviour(&self) -> Behaviour {
        Behaviour {
            failure_share: self.failure_share,
            decline_above: self.decline_above,
            stock: self.stock.clone().unwrap_or_default().into_iter().collect(),
            latency: self.latency,
            no_reply_share: self.no_reply_share,
            remember_commands: self.remember_commands,
        }
    }
}

/// The index of a step named `name` (or its plural).
pub fn step_index(def: &SagaDefinition, name: &str) -> anyhow::Result<usize> {
    def.steps
        .iter()
        .position(|s| s.name == name || format!("{}s", s.name) == name)
        .ok_or_else(|| {
            anyhow!(
                "no step named '{name}' in saga {} (steps: {})",
                def.name,
                def.steps
                    .iter()
                    .map(|s| s.name.as_str())
                    .collect::<Vec<_>>()
                    .join(", ")
            )
        })
}

/// The runtime configuration and processor supplier of a participant.
pub fn participant(
    def: Arc<SagaDefinition>,
    codec: Arc<Codec>,
    step: usize,
    behaviour: Behaviour,
    mut config: RuntimeConfig,
) -> (RuntimeConfig, runtime::ProcessorSupplier) {
    let spec = &def.steps[step];
    config.input_topics = vec![spec.command.topic.clone()];
    if spec.compensation.topic != spec.command.topic {
        config.input_topics.push(spec.compensation.topic.clone());
    }
    config.output_topics = vec![spec.reply_topic.clone()];
    config.stores = vec![PARTICIPANT_STORE.to_string()];
    let behaviour = Arc::new(behaviour);
    let supplier: runtime::ProcessorSupplier = Arc::new(move |_| {
        Box::new(Participant::new(
            def.clone(),
            codec.clone(),
            step,
            behaviour.clone(),
        ))
    });
    (config, supplier)
}

pub fn run(args: SimulateArgs) -> anyhow::Result<ExitCode> {
    if args.behaviour.remember_commands <= args.behaviour.latency {
        // A command re-sent while its reply is still held would be carried out again.
        anyhow::bail!(
            "--remember-commands ({:?}) must be longer than --latency ({:?})",
            args.behaviour.remember_commands,
            args.behaviour.latency
        );
    }
    let kafka = args.kafka.settings()?;
    let def = args.topology.load()?;
    let step = step_index(&def, &args.step)?;
    let codec = args
        .topology
        .codec(&def, std::slice::from_ref(&def.steps[step].reply_topic))?;
    let application_id = args
        .application_id
        .unwrap_or_else(|| format!("{}sim-{}", args.topology.topic_prefix, def.steps[step].name));
    let mut config = RuntimeConfig::new(
        application_id,
        args.instance_id.unwrap_or_else(default_instance_id),
        args.kafka.bootstrap,
        args.state_dir,
    );
    config.kafka = kafka.properties().clone();
    config.kafka_files = kafka.files().clone();
    let (config, supplier) = participant(def, codec, step, args.behaviour.behaviour(), config);
    if let Some(addr) = args.metrics_addr {
        let metrics = crate::telemetry::metrics::install_recorder(&config.application_id)
            .map_err(anyhow::Error::msg)?;
        crate::telemetry::http::serve(
            addr,
            Some(metrics),
            config.status.clone(),
            Default::default(),
            Default::default(),
        )
        .map_err(anyhow::Error::msg)?;
    }
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    runtime::run(config, supplier, shutdown).map_err(super::topics::name_the_fix)?;
    Ok(ExitCode::SUCCESS)
}
