//! `saga-streams run`: the orchestrator.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::time::Duration;

use super::args::{default_instance_id, parse_duration, KafkaArgs, TopologyArgs};
use crate::codec::Codec;
use crate::ops::dlq::DlqService;
use crate::runtime::control::KeyedWriter;
use crate::runtime::members::{self, members_topic, Members};
use crate::runtime::secrets::{read_secret, Rotating};
use crate::runtime::{self, Guarantee, RuntimeConfig, Shutdown};
use crate::saga::query::{Partitioner, SagaQuery};
use crate::saga::topology::{control_topic, repartition_topic, KeyPolicy};
use crate::saga::{SagaDefinition, SagaProcessor, SAGA_STORE};
use crate::telemetry::http::{self, Forwarding};
use crate::telemetry::metrics::install_recorder;

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams run --bootstrap 127.0.0.1:19092 --instance-id a --state-dir /var/lib/saga/a\n  saga-streams run --config saga.toml --metrics-addr 0.0.0.0:9464 --step-timeout payment=5s"
)]
pub struct RunArgs {
    #[command(flatten)]
    pub kafka: KafkaArgs,
    #[command(flatten)]
    pub topology: TopologyArgs,
    /// Consumer group id, prefix of changelog topics and transactional ids. Instances with the same
    /// id share the work. Default: the topic prefix followed by the saga's name.
    #[arg(long)]
    pub application_id: Option<String>,
    /// Stable identity of this instance (transactional id suffix); must differ between live
    /// instances. Default: the host name.
    #[arg(long)]
    pub instance_id: Option<String>,
    /// Where the RocksDB state lives.
    #[arg(long, default_value = "state")]
    pub state_dir: PathBuf,
    /// Where Prometheus scrapes the metrics.
    #[arg(long, default_value = "127.0.0.1:9464")]
    pub metrics_addr: SocketAddr,
    /// The address (`host:port`) where other instances and clients reach this instance's HTTP
    /// endpoints, like Kafka Streams' `application.server` (in Kubernetes, the pod's stable DNS
    /// name); shown in /ready.
    #[arg(long, value_parser = parse_host_port)]
    pub advertised_http: Option<String>,
    /// Commit cycle length.
    #[arg(long, default_value = "100ms", value_parser = parse_duration)]
    pub commit_interval: Duration,
    /// exactly-once: inputs, state and outputs commit in one Kafka transaction; at-least-once:
    /// no transactions (faster; an input may be processed again after a crash).
    #[arg(long, value_enum, default_value = "exactly-once")]
    pub guarantee: Guarantee,
    /// How keys map to partitions, for the outputs and for finding a saga's task in
    /// `/sagas/{id}`. Every producer of the input topics must use the same one.
    #[arg(long, value_enum, default_value = "consistent-random")]
    pub partitioner: Partitioner,
    /// A file holding the bearer token `/sagas/...` and `/quarantine` require (re-read on
    /// SIGHUP). Without it they answer anyone who reaches `--metrics-addr`.
    #[arg(long)]
    pub http_token_file: Option<PathBuf>,
    /// PEM certificate (chain) for serving the HTTP endpoints over TLS (with `--http-tls-key`).
    #[arg(long, requires = "http_tls_key")]
    pub http_tls_cert: Option<PathBuf>,
    /// PEM private key of `--http-tls-cert`.
    #[arg(long, requires = "http_tls_cert")]
    pub http_tls_key: Option<PathBuf>,
    /// Warm copies each task keeps on other instances, from its changelog: a task that moves to
    /// an instance with a standby restores only the changelog written since. Each standby holds
    /// a full copy of its task's state on that instance's disk.
    #[arg(long, default_value_t = 0)]
    pub standby_replicas: usize,
    /// Join the group as a static member (`group.instance.id` = the instance id): an instance
    /// stopped and started again within the session timeout gets its tasks back, with its local
    /// state, and nothing else moves; while it is away its tasks wait. Without it, a stopping
    /// instance leaves the group and the others take its tasks at once.
    #[arg(long)]
    pub static_membership: bool,
    /// How long the group waits for a silent member (crash, freeze) before moving its tasks.
    /// Default: the broker's (45 s). Shorter moves work sooner after a crash, and also after a
    /// pause that only looked like one (a long GC-free stall, a slow disk, a network blip).
    #[arg(long, value_parser = parse_duration)]
    pub session_timeout: Option<Duration>,
    /// With standby replicas and static membership: how long a starting instance may warm the
    /// tasks it will be given (from their changelogs) before it joins the group; 0 joins at once.
    #[arg(long, default_value = "5m", value_parser = parse_duration)]
    pub warm_up_timeout: Duration,
    /// How often the member heartbeats. Default: the broker's (5 s). The two are set on the group
    /// together: one not given returns to the broker's default.
    #[arg(long, value_parser = parse_duration)]
    pub heartbeat_interval: Option<Duration>,
    /// How long a task waits for an input partition it has nothing buffered from before it
    /// processes its other inputs (Kafka Streams' `max.task.idle.ms`). Default 0: what is
    /// buffered, in timestamp order. Raise it when replies can be read before the events that
    /// caused them, e.g. when events and replies were all written beforehand (a replayed backlog).
    #[arg(long, default_value = "0s", value_parser = parse_duration)]
    pub max_task_idle: Duration,
    /// The version saga records are written as: 3 (binary, the default), or 2 (JSON) while a
    /// rolling upgrade from a release before 3 is under way, so that its instances can still read
    /// the records of tasks that move to them. Both are read either way.
    #[arg(long, default_value_t = crate::saga::machine::RECORD_VERSION, value_parser = parse_record_version)]
    pub record_version: u32,
}

fn parse_record_version(text: &str) -> Result<u32, String> {
    let writable = crate::saga::record::WRITABLE_VERSIONS;
    text.parse::<u32>()
        .ok()
        .filter(|v| writable.contains(v))
        .ok_or_else(|| {
            format!("'{text}' is not a record version this release writes ({writable:?})")
        })
}

/// The HTTP endpoints' token and TLS settings; a token file that cannot be read stops the start.
pub fn http_security(
    token_file: Option<&PathBuf>,
    tls: Option<(PathBuf, PathBuf)>,
) -> anyhow::Result<http::HttpSecurity> {
    let token = match token_file {
        Some(path) => {
            let file = path.clone();
            Some(
                Rotating::new("the HTTP token", move || {
                    read_secret("the HTTP token (--http-token-file)", &file)
                })
                .map_err(anyhow::Error::msg)?,
            )
        }
        None => None,
    };
    Ok(http::HttpSecurity { token, tls })
}

/// The runtime configuration of a saga.
pub fn saga_runtime_config(
    def: &SagaDefinition,
    application_id: &str,
    instance_id: &str,
    bootstrap: &str,
    state_dir: PathBuf,
) -> RuntimeConfig {
    let mut config = RuntimeConfig::new(application_id, instance_id, bootstrap, state_dir);
    config.input_topics = def.input_topics();
    config.output_topics = def.output_topics();
    config.stores = vec![SAGA_STORE.to_string()];
    if def.keys == KeyPolicy::Rekey {
        let topic = repartition_topic(application_id);
        config.input_topics.push(topic.clone());
        config.internal_topics.push(topic);
    }
    let control = control_topic(application_id);
    config.input_topics.push(control.clone());
    config.internal_topics.push(control);
    config
}

/// Operators' actions from the HTTP endpoints to the control topic, keyed by saga id.
struct ControlWriter(KeyedWriter);

impl http::ActionSink for ControlWriter {
    fn submit(&self, saga_id: &str, value: &[u8]) -> Result<(i32, i64), String> {
        self.0.write(saga_id.as_bytes(), value)
    }
}

/// `host:port` with a host name or address and a port number, for an address others dial.
fn parse_host_port(text: &str) -> Result<String, String> {
    let (host, port) = text
        .rsplit_once(':')
        .ok_or_else(|| format!("'{text}' is not host:port"))?;
    let host_ok = !host.is_empty()
        && host
            .trim_start_matches('[')
            .trim_end_matches(']')
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | ':'));
    if !host_ok {
        return Err(format!("'{host}' is not a host name or address"));
    }
    match port.parse::<u16>() {
        Ok(p) if p > 0 => Ok(text.to_string()),
        _ => Err(format!("'{port}' is not a port number (1-65535)")),
    }
}

/// Runs a saga until `shutdown` is requested.
pub fn run_saga(
    def: Arc<SagaDefinition>,
    codec: Arc<Codec>,
    config: RuntimeConfig,
    record_version: u32,
    shutdown: Shutdown,
) -> Result<(), runtime::RuntimeError> {
    let tick = SagaProcessor::default_tick(&def);
    let internal = |name: String| config.internal_topics.contains(&name).then_some(name);
    let repartition = internal(repartition_topic(&config.application_id));
    let control = internal(control_topic(&config.application_id));
    let supplier: runtime::ProcessorSupplier = Arc::new(move |_partition| {
        Box::new(
            SagaProcessor::new(def.clone(), codec.clone(), tick)
                .with_repartition(repartition.clone())
                .with_control(control.clone())
                .with_record_version(record_version),
        )
    });
    runtime::run(config, supplier, shutdown)
}

pub fn run(args: RunArgs) -> anyhow::Result<ExitCode> {
    let kafka = args.kafka.settings()?;
    let def = args.topology.load()?;
    let codec = args.topology.codec(&def, &def.output_topics())?;
    let application_id = args
        .application_id
        .unwrap_or_else(|| format!("{}{}", args.topology.topic_prefix, def.name));
    let instance_id = args.instance_id.unwrap_or_else(default_instance_id);
    let mut config = saga_runtime_config(
        &def,
        &application_id,
        &instance_id,
        &args.kafka.bootstrap,
        args.state_dir,
    );
    config.kafka = kafka.properties().clone();
    config.kafka_files = kafka.files().clone();
    config.commit_interval = args.commit_interval;
    config.standby_replicas = args.standby_replicas;
    config.static_membership = args.static_membership;
    config.session_timeout = args.session_timeout;
    config.heartbeat_interval = args.heartbeat_interval;
    config.warm_up_timeout = args.warm_up_timeout;
    config.max_task_idle = args.max_task_idle;
    config.guarantee = args.guarantee;
    config.partitioner = args.partitioner.setting().to_string();
    let metrics = install_recorder(&application_id).map_err(anyhow::Error::msg)?;
    crate::saga::processor::export_known_series(&def);
    let query = SagaQuery {
        status: config.status.clone(),
        partitioner: args.partitioner,
        def: def.clone(),
    };
    let tls = args.http_tls_cert.clone().zip(args.http_tls_key.clone());
    // Instances find each other's partitions and addresses through the members topic.
    let members = Members::default();
    config.members_topic = Some(members_topic(&application_id));
    config.members = Some(members.clone());
    let forwarding = Forwarding::new(
        members.clone(),
        instance_id.clone(),
        args.http_tls_cert.as_deref(),
    )
    .map_err(anyhow::Error::msg)?;
    let bound = http::serve(
        args.metrics_addr,
        Some(metrics),
        config.status.clone(),
        http::Services {
            sagas: Some(Arc::new(query)),
            forwarding: Some(forwarding),
            actions: Some(Arc::new(ControlWriter(KeyedWriter::new(
                kafka.clone(),
                control_topic(&application_id),
                config.partitioner.clone(),
            )))),
            dead_letters: Some(Arc::new(DlqService::new(kafka.clone(), def.clone()))),
        },
        http_security(args.http_token_file.as_ref(), tls)?,
    )
    .map_err(anyhow::Error::msg)?;
    // Without --advertised-http, the bound address when it names one (not 0.0.0.0).
    let advertised = args
        .advertised_http
        .clone()
        .or_else(|| (!bound.ip().is_unspecified()).then(|| bound.to_string()));
    config.status.set_advertised_http(advertised);
    let shutdown = Shutdown::new();
    shutdown.on_signals()?;
    let membership = members::spawn(
        kafka.clone(),
        members_topic(&application_id),
        instance_id.clone(),
        config.status.clone(),
        members,
        shutdown.clone(),
    )?;
    tracing::info!(saga = %def.name, topology = %args.topology.topology.display(), "running the saga");
    let result = run_saga(def, codec, config, args.record_version, shutdown.clone())
        .map_err(super::topics::name_the_fix);
    // The members thread publishes its tombstone on the way out: give it a moment.
    shutdown.request();
    let deadline = std::time::Instant::now() + Duration::from_secs(3);
    while !membership.is_finished() && std::time::Instant::now() < deadline {
        std::thread::sleep(Duration::from_millis(20));
    }
    result?;
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::parse_host_port;

    #[test]
    fn an_advertised_address_is_a_host_and_a_port() {
        for ok in [
            "saga-0.saga-headless.orders.svc:9464",
            "127.0.0.1:80",
            "[::1]:9464",
        ] {
            assert_eq!(parse_host_port(ok).as_deref(), Ok(ok));
        }
        for bad in [
            "saga-0",
            ":9464",
            "host:0",
            "host:http",
            "ho st:1",
            "host:70000",
        ] {
            assert!(parse_host_port(bad).is_err(), "{bad}");
        }
    }
}
