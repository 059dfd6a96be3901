//! The HTTP endpoints beside the metrics: `/metrics`, `/health` (the process is alive), `/ready`
//! (every assigned task is restored and running) and `/sagas/{id}` (a saga's state and history).
//!
//! They run on a small tokio runtime of their own thread, so nothing here ever waits on the stream
//! thread: readiness comes from [`RuntimeStatus`], saga state from the running tasks' committed
//! stores through a [`SagaLookup`].
//!
//! `/metrics`, `/health` and `/ready` are open (they hold no order data). `/sagas/...` and
//! `/quarantine` require `Authorization: Bearer <token>` when a token is configured
//! ([`HttpSecurity`]); the comparison takes the same time whatever the token sent. The server
//! speaks HTTPS when given a certificate and key.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;

use axum::extract::{ConnectInfo, Path, Request, State};
use axum::http::{header, StatusCode};
use axum::middleware::{self, Next};
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;
use sha2::{Digest, Sha256};
use subtle::ConstantTimeEq;

use crate::runtime::members::Members;
use crate::runtime::secrets::{Rotating, AUDIT_TARGET};
use crate::runtime::RuntimeStatus;

/// Marks a `/sagas/{id}` request one instance sent on to the owner: it is never sent on again.
pub const FORWARDED_HEADER: &str = "x-saga-streams-forwarded-by";
/// The largest answer sent on from another instance.
const MAX_FORWARDED_BYTES: u64 = 4 << 20;
/// How long the owner of a saga has to answer a forwarded query.
const FORWARD_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(5);

/// Answers queries for sagas of partitions another instance owns by asking that instance (its
/// address from the members topic), with the caller's credentials.
#[derive(Clone)]
pub struct Forwarding {
    members: Members,
    instance_id: String,
    client: reqwest::Client,
    scheme: &'static str,
}

impl Forwarding {
    /// `tls_cert`: this instance's HTTPS certificate (chain): the instances then talk HTTPS, and
    /// the certificates in that file are trusted besides the system's (include the CA in it).
    pub fn new(
        members: Members,
        instance_id: String,
        tls_cert: Option<&std::path::Path>,
    ) -> Result<Forwarding, String> {
        // Straight to the owner: no proxy from the environment, no redirect elsewhere.
        let mut builder = reqwest::Client::builder()
            .timeout(FORWARD_TIMEOUT)
            .no_proxy()
            .redirect(reqwest::redirect::Policy::none());
        if let Some(cert) = tls_cert {
            let pem = std::fs::read(cert)
                .map_err(|e| format!("the HTTP certificate {}: {e}", cert.display()))?;
            for c in reqwest::Certificate::from_pem_bundle(&pem)
                .map_err(|e| format!("the HTTP certificate {}: {e}", cert.display()))?
            {
                builder = builder.add_root_certificate(c);
            }
        }
        Ok(Forwarding {
            members,
            instance_id,
            client: builder
                .build()
                .map_err(|e| format!("the forwarding HTTP client: {e}"))?,
            scheme: if tls_cert.is_some() { "https" } else { "http" },
        })
    }

    /// The answer for saga `id` of `partition`, which this instance does not serve.
    async fn answer(&self, id: &str, partition: i32, headers: &axum::http::HeaderMap) -> Response {
        let unavailable = |error: String, owner: Option<&str>| {
            (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": error,
                    "partition": partition,
                    "owner": owner,
                    "owned_here": false,
                })),
            )
                .into_response()
        };
        let Some(owner) = self.members.owner(partition) else {
            return unavailable(
                format!("no instance is known to own partition {partition} yet (a rebalance is under way, or its owner has not published its address)"),
                None,
            );
        };
        let who = owner.instance_id.as_str();
        if owner.instance_id == self.instance_id {
            return unavailable(
                format!("this instance owns partition {partition} and is restoring it: ask again shortly"),
                Some(who),
            );
        }
        let Some(address) = owner.advertised_http.as_deref() else {
            return unavailable(
                format!("instance {who} owns partition {partition} and advertises no address (--advertised-http)"),
                Some(who),
            );
        };
        if headers.contains_key(FORWARDED_HEADER) {
            return unavailable(
                format!("sent here by another instance, but partition {partition} is not served here: its ownership is moving"),
                Some(who),
            );
        }
        let url = reqwest::Url::parse(&format!("{}://{address}/", self.scheme))
            .map_err(|e| e.to_string())
            .and_then(|mut url| {
                url.path_segments_mut()
                    .map_err(|_| "not a base URL".to_string())?
                    .push("sagas")
                    .push(id);
                Ok(url)
            });
        let url = match url {
            Ok(url) => url,
            Err(e) => {
                return unavailable(
                    format!("instance {who} advertises '{address}', not a usable address: {e}"),
                    Some(who),
                )
            }
        };
        let mut request = self
            .client
            .get(url)
            .header(FORWARDED_HEADER, self.instance_id.as_str());
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, auth.as_bytes());
        }
        let response = match request.send().await {
            Ok(r) => r,
            Err(e) => {
                return unavailable(
                    format!("instance {who} at {address}, the owner of partition {partition}, did not answer: {e}"),
                    Some(who),
                )
            }
        };
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        // A saga is under a megabyte; anything far larger is not an answer of ours.
        if response
            .content_length()
            .is_some_and(|n| n > MAX_FORWARDED_BYTES)
        {
            return unavailable(
                format!("instance {who} at {address} answered with more than {MAX_FORWARDED_BYTES} bytes"),
                Some(who),
            );
        }
        match response.bytes().await {
            Ok(body) => (
                status,
                [
                    (header::CONTENT_TYPE, "application/json"),
                    (
                        header::HeaderName::from_static("x-saga-streams-served-by"),
                        who,
                    ),
                ],
                body,
            )
                .into_response(),
            Err(e) => unavailable(
                format!("instance {who} at {address} broke off its answer: {e}"),
                Some(who),
            ),
        }
    }
}

/// Who may read saga data, and whether the server speaks TLS.
#[derive(Clone, Default)]
pub struct HttpSecurity {
    /// The bearer token `/sagas/...` and `/quarantine` require (read from its file, again on
    /// SIGHUP); `None`: they are open, as the metrics are.
    pub token: Option<Rotating<String>>,
    /// A PEM certificate (chain) and its PEM key: serve HTTPS instead of HTTP.
    pub tls: Option<(PathBuf, PathBuf)>,
}

/// Whether `given` is the token, in time that does not depend on where they differ: both are
/// hashed first, so neither their content nor the expected length shows in the timing.
fn token_matches(given: &[u8], expected: &[u8]) -> bool {
    Sha256::digest(given)
        .ct_eq(&Sha256::digest(expected))
        .into()
}

async fn require_token(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    request: Request,
    next: Next,
) -> Response {
    let Some(token) = &state.token else {
        return next.run(request).await;
    };
    // The scheme is case-insensitive (RFC 7235).
    let given = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(|v| v.as_bytes())
        .filter(|v| {
            v.get(..7)
                .is_some_and(|p| p.eq_ignore_ascii_case(b"bearer "))
        })
        .and_then(|v| v.get(7..));
    let refusal = match given {
        Some(given) if token_matches(given, token.get().as_bytes()) => None,
        Some(_) => Some("wrong_token"),
        None => Some("no_token"),
    };
    match refusal {
        None => next.run(request).await,
        Some(reason) => {
            tracing::warn!(
                target: AUDIT_TARGET,
                event = "http_token_refused",
                reason,
                %peer,
                path = %request.uri().path(),
                "an HTTP request without the right bearer token was refused"
            );
            (
                StatusCode::UNAUTHORIZED,
                [(header::WWW_AUTHENTICATE, "Bearer")],
                Json(json!({ "error": "this endpoint requires the bearer token (Authorization: Bearer <token>)" })),
            )
                .into_response()
        }
    }
}

/// The answer to "where is saga X".
#[derive(Debug, Clone, PartialEq)]
pub enum Lookup {
    /// The saga, as JSON.
    Found(serde_json::Value),
    /// This instance owns the saga's partition and has no such saga.
    Missing { partition: i32 },
    /// Another instance owns the saga's partition.
    Elsewhere { partition: i32 },
    /// The instance has not checked its topics yet.
    NotStarted,
}

/// Finds sagas by id in the state this instance holds.
pub trait SagaLookup: Send + Sync {
    fn lookup(&self, saga_id: &str) -> Result<Lookup, String>;
    /// Saga records of this instance's tasks moved to the quarantine (they could not be read),
    /// at most `limit`.
    fn quarantine(&self, limit: usize) -> Result<Vec<serde_json::Value>, String>;
}

#[derive(Clone)]
struct AppState {
    metrics: Option<PrometheusHandle>,
    /// The process's CPU, memory and file descriptors, read at each scrape.
    process: Arc<metrics_process::Collector>,
    status: RuntimeStatus,
    sagas: Option<Arc<dyn SagaLookup>>,
    token: Option<Rotating<String>>,
    forwarding: Option<Forwarding>,
}

/// Binds `addr` and serves the endpoints from a background thread; returns the bound address
/// (useful with port 0). Binding errors come back at once.
pub fn serve(
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    status: RuntimeStatus,
    sagas: Option<Arc<dyn SagaLookup>>,
    security: HttpSecurity,
    forwarding: Option<Forwarding>,
) -> Result<SocketAddr, String> {
    // A certificate that cannot be loaded stops the start, like a port that cannot be bound.
    let tls = match &security.tls {
        Some((cert, key)) => Some(
            axum_server::tls_openssl::OpenSSLConfig::from_pem_chain_file(cert, key).map_err(
                |e| {
                    format!(
                        "the HTTP certificate {} with the key {}: {e}",
                        cert.display(),
                        key.display()
                    )
                },
            )?,
        ),
        None => None,
    };
    let listener = std::net::TcpListener::bind(addr).map_err(|e| format!("binding {addr}: {e}"))?;
    listener
        .set_nonblocking(true)
        .map_err(|e| format!("binding {addr}: {e}"))?;
    let bound = listener
        .local_addr()
        .map_err(|e| format!("binding {addr}: {e}"))?;
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| format!("starting the HTTP runtime: {e}"))?;
    let protected = security.token.is_some();
    let process = Arc::new(metrics_process::Collector::default());
    process.describe();
    let state = AppState {
        metrics,
        process,
        status,
        sagas,
        token: security.token,
        forwarding,
    };
    let guarded = Router::new()
        .route("/sagas/{id}", get(saga))
        .route("/quarantine", get(quarantine))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .merge(guarded)
        .with_state(state)
        .into_make_service_with_connect_info::<SocketAddr>();
    let scheme = if tls.is_some() { "https" } else { "http" };
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                let served = match tls {
                    Some(tls) => match axum_server::from_tcp(listener) {
                        Ok(server) => server
                            .acceptor(axum_server::tls_openssl::OpenSSLAcceptor::new(tls))
                            .serve(app)
                            .await
                            .map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                    None => match tokio::net::TcpListener::from_std(listener) {
                        Ok(listener) => axum::serve(listener, app).await.map_err(|e| e.to_string()),
                        Err(e) => Err(e.to_string()),
                    },
                };
                if let Err(e) = served {
                    tracing::error!(error = %e, "HTTP server stopped");
                }
            })
        })
        .map_err(|e| format!("starting the HTTP thread: {e}"))?;
    tracing::info!(addr = %bound, scheme, token_required = protected, "http endpoints listening (/metrics, /health, /ready, /sagas/{{id}}, /quarantine)");
    Ok(bound)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
    state.process.collect();
    // Readiness as the probe sees it, at the moment of the scrape.
    metrics::gauge!(crate::telemetry::metrics::READY)
        .set(f64::from(u8::from(state.status.ready())));
    match &state.metrics {
        Some(handle) => (
            [("content-type", "text/plain; version=0.0.4")],
            handle.render(),
        )
            .into_response(),
        None => (StatusCode::NOT_FOUND, "metrics are not enabled").into_response(),
    }
}

async fn health() -> Json<serde_json::Value> {
    Json(json!({ "status": "alive" }))
}

async fn ready(State(state): State<AppState>) -> Response {
    let s = &state.status;
    let body = json!({
        "ready": s.ready(),
        "assigned_tasks": s.assigned_tasks(),
        "running_tasks": s.running_tasks(),
        "stalled": s.stalled(),
        "joined": s.joined(),
        "advertised_http": s.advertised_http(),
    });
    let code = if s.ready() {
        StatusCode::OK
    } else {
        StatusCode::SERVICE_UNAVAILABLE
    };
    (code, Json(body)).into_response()
}

/// At most this many quarantine entries per answer.
const QUARANTINE_LIMIT: usize = 1_000;

async fn quarantine(State(state): State<AppState>) -> Response {
    let Some(sagas) = state.sagas.as_ref() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "this process runs no saga" })),
        )
            .into_response();
    };
    match sagas.quarantine(QUARANTINE_LIMIT) {
        Ok(entries) => Json(json!({
            "partitions": state.status.readers().iter().map(|(p, _)| *p).collect::<Vec<_>>(),
            "truncated": entries.len() >= QUARANTINE_LIMIT,
            "records": entries,
        }))
        .into_response(),
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e })),
        )
            .into_response(),
    }
}

async fn saga(
    State(state): State<AppState>,
    Path(id): Path<String>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(sagas) = state.sagas.as_ref() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "this process runs no saga" })),
        )
            .into_response();
    };
    match sagas.lookup(&id) {
        Ok(Lookup::Found(saga)) => Json(saga).into_response(),
        Ok(Lookup::Missing { partition }) => (
            StatusCode::NOT_FOUND,
            Json(json!({
                "error": format!("no saga '{id}'"),
                "partition": partition,
                "owned_here": true,
            })),
        )
            .into_response(),
        Ok(Lookup::Elsewhere { partition }) if state.forwarding.is_some() => match &state.forwarding {
            Some(forwarding) => forwarding.answer(&id, partition, &headers).await,
            None => StatusCode::INTERNAL_SERVER_ERROR.into_response(),
        },
        Ok(Lookup::Elsewhere { partition }) => (
            StatusCode::MISDIRECTED_REQUEST,
            Json(json!({
                "error": format!("saga '{id}' belongs to partition {partition}, which another instance owns: ask it"),
                "partition": partition,
                "owned_here": false,
            })),
        )
            .into_response(),
        Ok(Lookup::NotStarted) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "not started yet" })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e }))).into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        for other in [&b""[..], b"s3cre", b"s3cret ", b"S3cret", b"s3cret\n"] {
            assert!(!token_matches(other, b"s3cret"), "{other:?}");
        }
    }
}
