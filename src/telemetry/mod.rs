//! Telemetry: structured logs through `tracing`, and the Prometheus exporter.
//!
//! The level filter comes from `RUST_LOG` (default `info`); the format is chosen on the command
//! line (`--log-format pretty|json`), JSON being what log shippers want in production. Spans can
//! also go to an OpenTelemetry collector (`--otlp-endpoint`). [`metrics`] is the metrics catalogue
//! and its Prometheus recorder; [`http`] serves `/metrics`, `/health`, `/ready` and `/sagas/{id}`.

pub mod http;
pub mod lag;
pub mod metrics;

use tracing_subscriber::EnvFilter;

/// How log lines are written to stderr.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum LogFormat {
    /// Human-readable, one event per line.
    Pretty,
    /// One JSON object per line, with the span fields flattened in.
    Json,
}

/// Installs the global `tracing` subscriber. Calling it twice is harmless: the second call
/// leaves the first subscriber in place.
pub fn init_logging(format: LogFormat) {
    let _ = init_tracing(format, "info", None);
}

/// Like [`init_logging`], with `default_filter` applied when `RUST_LOG` is not set.
pub fn init_logging_with_default(format: LogFormat, default_filter: &str) {
    let _ = init_tracing(format, default_filter, None);
}

static TRACER_PROVIDER: std::sync::OnceLock<opentelemetry_sdk::trace::SdkTracerProvider> =
    std::sync::OnceLock::new();

/// Installs the global subscriber: log lines on stderr (pretty or JSON, filtered by `RUST_LOG`,
/// else `default_filter`) and, when `otlp_endpoint` is set, the same spans exported over
/// OTLP/HTTP (protobuf) to that URL, e.g. `http://127.0.0.1:4318/v1/traces`.
pub fn init_tracing(
    format: LogFormat,
    default_filter: &str,
    otlp_endpoint: Option<&str>,
) -> Result<(), String> {
    use tracing_subscriber::layer::SubscriberExt;
    use tracing_subscriber::util::SubscriberInitExt;
    use tracing_subscriber::Layer;

    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let fmt = tracing_subscriber::fmt::layer().with_writer(std::io::stderr);
    let fmt = match format {
        LogFormat::Pretty => fmt.boxed(),
        LogFormat::Json => fmt.json().flatten_event(true).boxed(),
    };
    let otel = match otlp_endpoint {
        Some(endpoint) => {
            use opentelemetry::trace::TracerProvider as _;
            use opentelemetry_otlp::WithExportConfig;
            let exporter = opentelemetry_otlp::SpanExporter::builder()
                .with_http()
                .with_endpoint(endpoint)
                .build()
                .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
            let provider = opentelemetry_sdk::trace::SdkTracerProvider::builder()
                .with_batch_exporter(exporter)
                .with_resource(
                    opentelemetry_sdk::Resource::builder()
                        .with_service_name("saga-streams")
                        .build(),
                )
                .build();
            let tracer = provider.tracer("saga-streams");
            let _ = TRACER_PROVIDER.set(provider);
            Some(tracing_opentelemetry::layer().with_tracer(tracer))
        }
        None => None,
    };
    tracing_subscriber::registry()
        .with(filter)
        .with(fmt)
        .with(otel)
        .try_init()
        .map_err(|e| format!("installing the log subscriber: {e}"))
}

/// Sends the spans still buffered for OTLP export (call before the process exits).
pub fn shutdown_tracing() {
    if let Some(provider) = TRACER_PROVIDER.get() {
        let _ = provider.shutdown();
    }
}
