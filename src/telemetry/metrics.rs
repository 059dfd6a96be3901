//! The metrics catalogue in code: every name `docs/METRICS.md` lists, with its description and
//! unit, and the Prometheus recorder that renders them.
//!
//! Histograms are exported with buckets (`_bucket`, `_sum`, `_count`), so dashboards can take
//! quantiles across instances with `histogram_quantile`.

use metrics::{describe_counter, describe_gauge, describe_histogram, Unit};
use metrics_exporter_prometheus::{Matcher, PrometheusBuilder, PrometheusHandle};

pub const CONSUMER_LAG: &str = "saga_streams_consumer_lag";
pub const CONSUMER_LAG_SECONDS: &str = "saga_streams_consumer_lag_seconds";
pub const RECORDS_CONSUMED: &str = "saga_streams_records_consumed_total";
pub const RECORDS_PRODUCED: &str = "saga_streams_records_produced_total";
pub const PROCESS_LATENCY: &str = "saga_streams_process_latency_seconds";
pub const COMMIT_LATENCY: &str = "saga_streams_commit_latency_seconds";
pub const TRANSACTIONS: &str = "saga_streams_transactions_total";
pub const SAGAS: &str = "saga_streams_sagas";
pub const SAGAS_STARTED: &str = "saga_streams_sagas_started_total";
pub const SAGA_OUTCOMES: &str = "saga_streams_saga_outcomes_total";
pub const SAGA_DURATION: &str = "saga_streams_saga_duration_seconds";
pub const COMPENSATIONS: &str = "saga_streams_compensations_total";
pub const TIMEOUTS: &str = "saga_streams_timeouts_total";
pub const RETRIES: &str = "saga_streams_retries_total";
pub const COMPENSATIONS_STUCK: &str = "saga_streams_compensations_stuck_total";
pub const DLQ_RECORDS: &str = "saga_streams_dlq_records_total";
pub const OUTPUT_ERRORS: &str = "saga_streams_output_errors_total";
pub const SAGAS_INCOMPATIBLE: &str = "saga_streams_sagas_incompatible_total";
pub const LIVE_SAGAS_BY_VERSION: &str = "saga_streams_live_sagas_by_topology_version";
pub const SAGAS_QUARANTINED: &str = "saga_streams_saga_records_quarantined_total";
pub const RECORDS_REKEYED: &str = "saga_streams_records_rekeyed_total";
pub const REGISTRY_LOOKUPS: &str = "saga_streams_registry_lookups_total";
pub const EVENTS_IGNORED: &str = "saga_streams_events_ignored_total";
pub const RESTORE_REMAINING: &str = "saga_streams_restore_remaining_records";
pub const RESTORED_RECORDS: &str = "saga_streams_restored_records_total";
pub const REBALANCES: &str = "saga_streams_rebalances_total";
pub const ASSIGNED_TASKS: &str = "saga_streams_assigned_tasks";
pub const RUNNING_TASKS: &str = "saga_streams_running_tasks";
pub const STALLED: &str = "saga_streams_stalled";
pub const READY: &str = "saga_streams_ready";
pub const STANDBY_TASKS: &str = "saga_streams_standby_tasks";
pub const STANDBY_LAG: &str = "saga_streams_standby_lag_records";
pub const TASKS_CLOSED_AFTER_FAILURE: &str = "saga_streams_tasks_closed_after_failure_total";
pub const REBUILDS: &str = "saga_streams_rebuilds_total";
pub const SIGNATURE_FAILURES: &str = "saga_streams_signature_failures_total";
pub const SAGA_ACTIONS: &str = "saga_streams_saga_actions_total";

/// Every metric name of the catalogue.
pub const CATALOGUE: &[&str] = &[
    CONSUMER_LAG,
    CONSUMER_LAG_SECONDS,
    RECORDS_CONSUMED,
    RECORDS_PRODUCED,
    PROCESS_LATENCY,
    COMMIT_LATENCY,
    TRANSACTIONS,
    SAGAS,
    SAGAS_STARTED,
    SAGA_OUTCOMES,
    SAGA_DURATION,
    COMPENSATIONS,
    TIMEOUTS,
    RETRIES,
    COMPENSATIONS_STUCK,
    DLQ_RECORDS,
    SIGNATURE_FAILURES,
    SAGA_ACTIONS,
    READY,
    OUTPUT_ERRORS,
    SAGAS_INCOMPATIBLE,
    LIVE_SAGAS_BY_VERSION,
    SAGAS_QUARANTINED,
    RECORDS_REKEYED,
    REGISTRY_LOOKUPS,
    EVENTS_IGNORED,
    RESTORE_REMAINING,
    RESTORED_RECORDS,
    REBALANCES,
    ASSIGNED_TASKS,
    RUNNING_TASKS,
    STALLED,
    STANDBY_TASKS,
    STANDBY_LAG,
    TASKS_CLOSED_AFTER_FAILURE,
    REBUILDS,
];

/// Latency buckets, 100 µs to 60 s.
const LATENCY_BUCKETS: &[f64] = &[
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5,
    5.0, 10.0, 30.0, 60.0,
];

fn describe() {
    describe_gauge!(
        CONSUMER_LAG,
        Unit::Count,
        "input records not yet processed, counted to the last stable offset"
    );
    describe_gauge!(
        CONSUMER_LAG_SECONDS,
        Unit::Seconds,
        "how far behind its input partition the task is in time: the age of its oldest record not yet processed (of the last one processed while the next is not fetched yet); 0 when caught up"
    );
    describe_counter!(RECORDS_CONSUMED, Unit::Count, "input records processed");
    describe_counter!(
        TASKS_CLOSED_AFTER_FAILURE,
        Unit::Count,
        "tasks closed because their state write after a commit failed (restored from the changelog)"
    );
    describe_counter!(
        REBUILDS,
        Unit::Count,
        "consumer and producer rebuilt after a fatal error, by reason"
    );
    describe_counter!(RECORDS_PRODUCED, Unit::Count, "output records sent");
    describe_histogram!(
        PROCESS_LATENCY,
        Unit::Seconds,
        "time to process one input record"
    );
    describe_histogram!(COMMIT_LATENCY, Unit::Seconds, "time to commit one cycle");
    describe_counter!(TRANSACTIONS, Unit::Count, "commit cycles by result");
    describe_gauge!(SAGAS, Unit::Count, "sagas held by this instance, by status");
    describe_counter!(SAGAS_STARTED, Unit::Count, "sagas started");
    describe_gauge!(
        LIVE_SAGAS_BY_VERSION,
        Unit::Count,
        "unfinished sagas held by this instance, by the topology version they started under"
    );
    describe_counter!(
        SAGAS_QUARANTINED,
        Unit::Count,
        "stored saga records that could not be read, moved aside to the quarantine"
    );
    describe_counter!(SAGA_OUTCOMES, Unit::Count, "outcomes emitted");
    describe_histogram!(
        SAGA_DURATION,
        Unit::Seconds,
        "start event processed to outcome emitted"
    );
    describe_counter!(COMPENSATIONS, Unit::Count, "compensation commands sent");
    describe_counter!(
        TIMEOUTS,
        Unit::Count,
        "steps and compensations whose last attempt timed out"
    );
    describe_counter!(
        RETRIES,
        Unit::Count,
        "commands and compensations sent again after their timeout"
    );
    describe_counter!(
        COMPENSATIONS_STUCK,
        Unit::Count,
        "compensations given up unconfirmed after all their attempts"
    );
    describe_counter!(DLQ_RECORDS, Unit::Count, "input records dead-lettered");
    describe_counter!(
        SIGNATURE_FAILURES,
        Unit::Count,
        "input records whose signature was missing or did not verify, per topic and reason"
    );
    describe_counter!(
        SAGA_ACTIONS,
        Unit::Count,
        "operators' actions on sagas (retry, cancel, resume) taken from the control topic, per action and result (applied, refused, unreadable)"
    );
    describe_counter!(
        REGISTRY_LOOKUPS,
        Unit::Count,
        "writer schemas asked of the Schema Registry by id, by answer (ids known to be missing are not asked again for 60 s)"
    );
    describe_counter!(
        RECORDS_REKEYED,
        Unit::Count,
        "inputs whose key was missing or not their saga id, sent on through the repartition topic"
    );
    describe_counter!(
        SAGAS_INCOMPATIBLE,
        Unit::Count,
        "events and timers of sagas that name steps the loaded topology does not have (held, their events dead-lettered)"
    );
    describe_counter!(
        OUTPUT_ERRORS,
        Unit::Count,
        "saga outputs that could not be written (unencodable or too large): the input was dead-lettered, or the due timer held for a retry"
    );
    describe_counter!(EVENTS_IGNORED, Unit::Count, "events that changed nothing");
    describe_gauge!(
        RESTORE_REMAINING,
        Unit::Count,
        "changelog records still to replay"
    );
    describe_counter!(RESTORED_RECORDS, Unit::Count, "changelog records replayed");
    describe_counter!(REBALANCES, Unit::Count, "rebalance callbacks served");
    describe_gauge!(
        ASSIGNED_TASKS,
        Unit::Count,
        "tasks assigned to this instance"
    );
    describe_gauge!(RUNNING_TASKS, Unit::Count, "tasks restored and processing");
    describe_gauge!(STALLED, "1 while commit cycles keep aborting, else 0");
    describe_gauge!(
        STANDBY_TASKS,
        Unit::Count,
        "standby tasks this instance keeps warm"
    );
    describe_gauge!(
        STANDBY_LAG,
        Unit::Count,
        "changelog records a standby task is behind"
    );
}

/// Installs the Prometheus recorder as the global one and returns the handle that renders the
/// exposition text. Installing twice in one process fails (one global recorder).
/// Installs the Prometheus recorder; every metric carries `application_id` (the consumer group
/// the instance belongs to), so several applications can share one Prometheus.
pub fn install_recorder(application_id: &str) -> Result<PrometheusHandle, String> {
    let handle = PrometheusBuilder::new()
        .add_global_label("application_id", application_id)
        .set_buckets_for_metric(Matcher::Suffix("_seconds".into()), LATENCY_BUCKETS)
        .map_err(|e| format!("metrics buckets: {e}"))?
        .install_recorder()
        .map_err(|e| format!("installing the metrics recorder: {e}"))?;
    describe();
    Ok(handle)
}
