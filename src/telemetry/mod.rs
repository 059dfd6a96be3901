//! Telemetry: structured logs through `tracing`, and the Prometheus exporter.
//!
//! The level filter comes from `RUST_LOG` (default `info`); the format is chosen on the command
//! line (`--log-format pretty|json`), JSON being what log shippers want in production. Spans can
//! also go to an OpenTelemetry collector (`--otlp-endpoint`, TLS with `--otlp-ca`, `--otlp-cert`,
//! `--otlp-key`); saga spans continue the `traceparent` of the records they handle. [`metrics`] is the metrics catalogue
//! and its Prometheus recorder; [`http`] serves `/metrics`, `/health`, `/ready` and `/sagas/{id}`.

pub mod http;
pub mod lag;
pub mod metrics;
pub mod ui;

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

/// Where spans are exported: an OTLP/HTTP (protobuf) URL, with the TLS settings for an `https`
/// one.
#[derive(Debug, Clone, Default)]
pub struct OtlpSettings {
    pub endpoint: String,
    /// CA bundle (PEM) the collector's certificate is checked against, besides the system's.
    pub ca: Option<std::path::PathBuf>,
    /// Client certificate and PKCS#8 key (PEM), for a collector that wants mutual TLS.
    pub cert: Option<std::path::PathBuf>,
    pub key: Option<std::path::PathBuf>,
}

/// The OTLP exporter's HTTP client: the same blocking reqwest (OpenSSL) client, CA and identity
/// handling as the registry's. The batch span processor calls it on its own thread.
#[derive(Debug)]
struct OtlpHttp(reqwest::blocking::Client);

#[async_trait::async_trait]
impl opentelemetry_http::HttpClient for OtlpHttp {
    async fn send_bytes(
        &self,
        request: ::http::Request<bytes::Bytes>,
    ) -> Result<::http::Response<bytes::Bytes>, opentelemetry_http::HttpError> {
        let (parts, body) = request.into_parts();
        let response = self
            .0
            .request(parts.method, parts.uri.to_string())
            .headers(parts.headers)
            .body(body.to_vec())
            .send()?
            .error_for_status()?;
        let status = response.status();
        let headers = response.headers().clone();
        let mut out = ::http::Response::builder()
            .status(status)
            .body(response.bytes()?)?;
        *out.headers_mut() = headers;
        Ok(out)
    }
}

/// The target of the spans that carry a saga's trace context (see
/// [`crate::saga::processor`]): recorded as OpenTelemetry spans whatever the log level, so that
/// outputs always carry a child context of their input's.
pub const SAGA_SPAN_TARGET: &str = "saga_streams::saga";

/// Installs the global subscriber: log lines on stderr (pretty or JSON, filtered by `RUST_LOG`,
/// else `default_filter`), and OpenTelemetry spans: the saga spans always (their context is what
/// outputs carry in `traceparent`), exported with the other spans at `info` and above when
/// `otlp` is set, over
/// OTLP/HTTP (protobuf), e.g. to `https://collector:4318/v1/traces`. W3C trace context is the
/// propagation format.
pub fn init_tracing(
    format: LogFormat,
    default_filter: &str,
    otlp: Option<&OtlpSettings>,
) -> Result<(), String> {
    use opentelemetry::trace::TracerProvider as _;
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
    let mut provider = opentelemetry_sdk::trace::SdkTracerProvider::builder().with_resource(
        opentelemetry_sdk::Resource::builder()
            .with_service_name("saga-streams")
            .build(),
    );
    if let Some(otlp) = otlp {
        use opentelemetry_otlp::{WithExportConfig, WithHttpConfig};
        let endpoint = &otlp.endpoint;
        let client = crate::runtime::secrets::https_client(
            "the OTLP collector",
            "--otlp",
            otlp.ca.as_deref(),
            otlp.cert.as_deref(),
            otlp.key.as_deref(),
        )?
        .timeout(std::time::Duration::from_secs(10))
        .build()
        .map_err(|e| format!("OTLP client: {e}"))?;
        let exporter = opentelemetry_otlp::SpanExporter::builder()
            .with_http()
            .with_http_client(OtlpHttp(client))
            .with_endpoint(endpoint)
            .build()
            .map_err(|e| format!("OTLP exporter for {endpoint}: {e}"))?;
        provider = provider.with_batch_exporter(exporter);
    }
    let provider = provider.build();
    let tracer = provider.tracer("saga-streams");
    let _ = TRACER_PROVIDER.set(provider);
    opentelemetry::global::set_text_map_propagator(
        opentelemetry_sdk::propagation::TraceContextPropagator::new(),
    );
    let exported = otlp.is_some();
    let otel = tracing_opentelemetry::layer()
        .with_tracer(tracer)
        .with_filter(tracing_subscriber::filter::filter_fn(move |meta| {
            meta.is_span()
                && (meta.target() == SAGA_SPAN_TARGET
                    || (exported && *meta.level() <= tracing::Level::INFO))
        }));
    tracing_subscriber::registry()
        .with(fmt.with_filter(filter))
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
