//! `saga-streams demo`: the whole story on one broker. It creates fresh topics, runs the
//! orchestrator and both participants in this process, produces the orders, shows the progress,
//! and ends with the audit's summary and verdict.

use std::collections::HashSet;
use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use anyhow::{anyhow, bail};
use indicatif::MultiProgress;

use super::args::{parse_duration, parse_share};
use super::audit::print_report;
use super::load::progress_bar;
use super::run::{run_saga, saga_runtime_config};
use super::simulate::{participant, step_index};
use crate::codec::Codec;
use crate::runtime::{self, RuntimeConfig, RuntimeError, RuntimeStatus, Shutdown};
use crate::saga::SagaDefinition;
use crate::sim::load::LoadSpec;
use crate::sim::participant::Behaviour;
use crate::sim::{self, TopicScanner};

#[derive(Debug, clap::Args)]
#[command(
    after_help = "Examples:\n  saga-streams demo\n  saga-streams demo --orders 50000 --rate 5000 --step-timeout 2s"
)]
pub struct DemoArgs {
    /// Kafka bootstrap servers (the local stack's by default).
    #[arg(long, env = "KAFKA_BOOTSTRAP", default_value = "127.0.0.1:19092")]
    pub bootstrap: String,
    /// The topology file.
    #[arg(long, default_value = "topologies/order_saga.yaml")]
    pub topology: PathBuf,
    /// How many orders.
    #[arg(long, default_value_t = 10_000)]
    pub orders: u64,
    /// Orders per second; 0: as fast as possible.
    #[arg(long, default_value_t = 2_000.0)]
    pub rate: f64,
    /// Partitions of each topic (= tasks).
    #[arg(long, default_value_t = 4)]
    pub partitions: i32,
    /// Share of payments declined.
    #[arg(long, default_value = "0.05", value_parser = parse_share)]
    pub payment_failure_share: f64,
    /// Share of reservations that fail.
    #[arg(long, default_value = "0.05", value_parser = parse_share)]
    pub inventory_failure_share: f64,
    /// Share of commands each participant never answers (their steps time out).
    #[arg(long, default_value = "0.01", value_parser = parse_share)]
    pub no_reply_share: f64,
    /// Timeout of every step (the topology's are 30 s; shorter keeps the demo short).
    #[arg(long, default_value = "5s", value_parser = parse_duration)]
    pub step_timeout: Duration,
    /// Topic prefix of this run. Default: `demo-<unix time>.`, fresh topics each run.
    #[arg(long)]
    pub topic_prefix: Option<String>,
}

struct Component {
    name: String,
    shutdown: Shutdown,
    status: RuntimeStatus,
    handle: JoinHandle<Result<(), RuntimeError>>,
}

fn spawn(
    name: &str,
    config: RuntimeConfig,
    supplier: runtime::ProcessorSupplier,
) -> anyhow::Result<Component> {
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    let status = config.status.clone();
    let handle = std::thread::Builder::new()
        .name(name.to_string())
        .spawn(move || runtime::run(config, supplier, stop))?;
    Ok(Component {
        name: name.to_string(),
        shutdown,
        status,
        handle,
    })
}

pub fn run(args: DemoArgs) -> anyhow::Result<ExitCode> {
    let prefix = args.topic_prefix.clone().unwrap_or_else(|| {
        let secs = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs())
            .unwrap_or(0);
        format!("demo-{secs}.")
    });
    let mut def = SagaDefinition::load(&args.topology)?.with_topic_prefix(&prefix);
    let step_names: Vec<String> = def.steps.iter().map(|s| s.name.clone()).collect();
    for name in &step_names {
        def.set_step_timeout(name, args.step_timeout)
            .map_err(anyhow::Error::msg)?;
    }
    let def = Arc::new(def);
    println!(
        "saga-streams demo: {} orders through saga '{}' on {}, topics prefixed '{prefix}'",
        args.orders, def.name, args.bootstrap
    );
    sim::create_topics(&args.bootstrap, &def, args.partitions)?;

    let state_dir = std::env::temp_dir().join(format!("saga-streams-demo-{}", std::process::id()));
    let mut components = Vec::new();
    let config = saga_runtime_config(
        &def,
        &format!("{prefix}{}", def.name),
        "demo",
        &args.bootstrap,
        state_dir.join("orchestrator"),
    );
    let orchestrator_def = def.clone();
    let shutdown = Shutdown::new();
    let stop = shutdown.clone();
    components.push(Component {
        name: "orchestrator".into(),
        shutdown,
        status: config.status.clone(),
        handle: std::thread::Builder::new()
            .name("orchestrator".into())
            .spawn(move || {
                run_saga(
                    orchestrator_def,
                    Arc::new(Codec::json()),
                    config,
                    crate::saga::machine::RECORD_VERSION,
                    stop,
                )
            })?,
    });
    for (i, name) in step_names.iter().enumerate() {
        let failure_share = match i {
            0 => args.payment_failure_share,
            1 => args.inventory_failure_share,
            _ => 0.0,
        };
        let behaviour = Behaviour {
            failure_share,
            no_reply_share: args.no_reply_share,
            ..Behaviour::default()
        };
        let config = RuntimeConfig::new(
            format!("{prefix}sim-{name}"),
            "demo",
            args.bootstrap.clone(),
            state_dir.join(name),
        );
        let step = step_index(&def, name)?;
        let (config, supplier) = participant(
            def.clone(),
            Arc::new(Codec::json()),
            step,
            behaviour,
            config,
        );
        components.push(spawn(&format!("participant {name}"), config, supplier)?);
    }

    let result = drive(&args, &def, &prefix, &components);
    for c in &components {
        c.shutdown.request();
    }
    let mut failures = Vec::new();
    for c in components {
        match c.handle.join() {
            Ok(Ok(())) => {}
            Ok(Err(e)) => failures.push(format!("{}: {e}", c.name)),
            Err(_) => failures.push(format!("{}: the thread panicked", c.name)),
        }
    }
    let _ = std::fs::remove_dir_all(&state_dir);
    let started = result?;
    if !failures.is_empty() {
        bail!("{}", failures.join("\n"));
    }

    println!("auditing the outputs (read_committed)...");
    let report = sim::audit::audit(
        &args.bootstrap,
        &def,
        &Codec::json(),
        Duration::from_secs(120),
    )?;
    print_report(&report);
    println!(
        "demo took {:.1} s; run it again for fresh topics, or look at them with the prefix '{prefix}'",
        started.elapsed().as_secs_f64()
    );
    Ok(if report.is_clean() {
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

/// Produces the orders and waits until each has an outcome; returns when the demo started.
fn drive(
    args: &DemoArgs,
    def: &Arc<SagaDefinition>,
    prefix: &str,
    components: &[Component],
) -> anyhow::Result<Instant> {
    // Start the clock once every component runs all its tasks: group joins are not saga time.
    let ready_by = Instant::now() + Duration::from_secs(120);
    while !components.iter().all(|c| c.status.ready()) {
        if let Some(c) = components.iter().find(|c| c.handle.is_finished()) {
            bail!("{} stopped while starting", c.name);
        }
        if Instant::now() > ready_by {
            bail!("the components did not start within 2 minutes");
        }
        std::thread::sleep(Duration::from_millis(50));
    }
    let started = Instant::now();
    let bars = MultiProgress::new();
    let produced = bars.add(progress_bar(args.orders, "orders produced"));
    let finished = bars.add(progress_bar(args.orders, "sagas finished "));
    let spec = LoadSpec {
        orders: args.orders,
        rate: args.rate,
        id_prefix: format!("{prefix}order-"),
        transaction_size: 0,
        deliver_within: std::time::Duration::from_secs(30),
    };
    let load_def = def.clone();
    let bootstrap = args.bootstrap.clone();
    let produced_bar = produced.clone();
    let loader = std::thread::spawn(move || {
        sim::load::run(&bootstrap, &load_def, &Codec::json(), &spec, &|n| {
            produced_bar.set_position(n)
        })
    });

    let outcomes = TopicScanner::new(
        &args.bootstrap,
        &[def.completed.topic.clone(), def.cancelled.topic.clone()],
    )?;
    let mut seen = HashSet::new();
    let mut batch = Vec::new();
    let mut last_progress = Instant::now();
    // Long enough for every step to time out and every compensation to follow.
    let patience = args.step_timeout * (2 * def.steps.len() as u32 + 2) + Duration::from_secs(30);
    let mut loader = Some(loader);
    while (seen.len() as u64) < args.orders {
        if let Some(c) = components.iter().find(|c| c.handle.is_finished()) {
            bail!("{} stopped early", c.name);
        }
        if loader.as_ref().is_some_and(JoinHandle::is_finished) {
            if let Some(handle) = loader.take() {
                handle
                    .join()
                    .map_err(|_| anyhow!("the load generator panicked"))??;
                produced.finish();
            }
        }
        batch.clear();
        outcomes.poll_batch(Duration::from_millis(200), &mut batch)?;
        for r in &batch {
            if let Some(key) = &r.key {
                if seen.insert(key.clone()) {
                    last_progress = Instant::now();
                }
            }
        }
        finished.set_position(seen.len() as u64);
        if last_progress.elapsed() > patience {
            bail!(
                "no saga finished for {patience:?}; {} of {} have an outcome",
                seen.len(),
                args.orders
            );
        }
    }
    if let Some(handle) = loader.take() {
        handle
            .join()
            .map_err(|_| anyhow!("the load generator panicked"))??;
    }
    produced.finish();
    finished.finish();
    Ok(started)
}
