//! Telemetry: structured logs through `tracing`, and the Prometheus exporter.
//!
//! The level filter comes from `RUST_LOG` (default `info`); the format is chosen on the command
//! line (`--log-format pretty|json`), JSON being what log shippers want in production.

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
    init_logging_with_default(format, "info");
}

/// Like [`init_logging`], with `default_filter` applied when `RUST_LOG` is not set.
pub fn init_logging_with_default(format: LogFormat, default_filter: &str) {
    let filter =
        EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(default_filter));
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    let _already_installed = match format {
        LogFormat::Pretty => builder.try_init(),
        LogFormat::Json => builder.json().flatten_event(true).try_init(),
    };
}

/// Installs the Prometheus recorder and serves `/metrics` on `addr`.
pub fn install_metrics(addr: std::net::SocketAddr) -> Result<(), String> {
    metrics_exporter_prometheus::PrometheusBuilder::new()
        .with_http_listener(addr)
        .install()
        .map_err(|e| format!("serving metrics on {addr}: {e}"))
}
