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

    /// Where `partition` is served: the owner's instance id and address, or why it cannot be
    /// asked (and the owner, when known).
    fn owner_of(
        &self,
        partition: i32,
        headers: &axum::http::HeaderMap,
    ) -> Result<(String, String), (String, Option<String>)> {
        let Some(owner) = self.members.owner(partition) else {
            return Err((
                format!("no instance is known to own partition {partition} yet (a rebalance is under way, or its owner has not published its address)"),
                None,
            ));
        };
        let who = owner.instance_id.clone();
        if owner.instance_id == self.instance_id {
            return Err((
                format!("this instance owns partition {partition} and is restoring it: ask again shortly"),
                Some(who),
            ));
        }
        let Some(address) = owner.advertised_http.clone() else {
            return Err((
                format!("instance {who} owns partition {partition} and advertises no address (--advertised-http)"),
                Some(who),
            ));
        };
        if headers.contains_key(FORWARDED_HEADER) {
            return Err((
                format!("sent here by another instance, but partition {partition} is not served here: its ownership is moving"),
                Some(who),
            ));
        }
        Ok((who, address))
    }

    /// The instance that owns `partition`, as last published.
    fn owner_name(&self, partition: i32) -> Option<String> {
        self.members.owner(partition).map(|m| m.instance_id)
    }

    /// GETs `path` (its segments) with `query` from the owner of `partition`, with the caller's
    /// credentials: the status and body, or why there is no answer.
    async fn fetch(
        &self,
        partition: i32,
        path: &[&str],
        query: &[(&str, String)],
        headers: &axum::http::HeaderMap,
    ) -> Result<(StatusCode, bytes::Bytes, String), (String, Option<String>)> {
        let (who, address) = self.owner_of(partition, headers)?;
        let url = reqwest::Url::parse(&format!("{}://{address}/", self.scheme))
            .map_err(|e| e.to_string())
            .and_then(|mut url| {
                url.path_segments_mut()
                    .map_err(|_| "not a base URL".to_string())?
                    .extend(path);
                if !query.is_empty() {
                    url.query_pairs_mut().extend_pairs(query);
                }
                Ok(url)
            })
            .map_err(|e| {
                (
                    format!("instance {who} advertises '{address}', not a usable address: {e}"),
                    Some(who.clone()),
                )
            })?;
        let mut request = self
            .client
            .get(url)
            .header(FORWARDED_HEADER, self.instance_id.as_str());
        if let Some(auth) = headers.get(header::AUTHORIZATION) {
            request = request.header(header::AUTHORIZATION, auth.as_bytes());
        }
        let response = request.send().await.map_err(|e| {
            (
                format!("instance {who} at {address}, the owner of partition {partition}, did not answer: {e}"),
                Some(who.clone()),
            )
        })?;
        let status =
            StatusCode::from_u16(response.status().as_u16()).unwrap_or(StatusCode::BAD_GATEWAY);
        // A saga is under a megabyte; anything far larger is not an answer of ours.
        if response
            .content_length()
            .is_some_and(|n| n > MAX_FORWARDED_BYTES)
        {
            return Err((
                format!("instance {who} at {address} answered with more than {MAX_FORWARDED_BYTES} bytes"),
                Some(who),
            ));
        }
        match response.bytes().await {
            Ok(body) => Ok((status, body, who)),
            Err(e) => Err((
                format!("instance {who} at {address} broke off its answer: {e}"),
                Some(who),
            )),
        }
    }

    /// The answer for saga `id` of `partition`, which this instance does not serve.
    async fn answer(&self, id: &str, partition: i32, headers: &axum::http::HeaderMap) -> Response {
        match self.fetch(partition, &["sagas", id], &[], headers).await {
            Ok((status, body, who)) => (
                status,
                [
                    (header::CONTENT_TYPE, "application/json".to_string()),
                    (
                        header::HeaderName::from_static("x-saga-streams-served-by"),
                        who,
                    ),
                ],
                body,
            )
                .into_response(),
            Err((error, owner)) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({
                    "error": error,
                    "partition": partition,
                    "owner": owner,
                    "owned_here": false,
                })),
            )
                .into_response(),
        }
    }

    /// One page of partition `partition`'s sagas from its owner.
    async fn list_page(
        &self,
        partition: i32,
        query: &[(&str, String)],
        headers: &axum::http::HeaderMap,
    ) -> Result<ListPage, String> {
        let mut query = query.to_vec();
        query.push(("partition", partition.to_string()));
        let (status, body, who) = self
            .fetch(partition, &["sagas"], &query, headers)
            .await
            .map_err(|(e, _)| e)?;
        if status != StatusCode::OK {
            let error = serde_json::from_slice::<serde_json::Value>(&body)
                .ok()
                .and_then(|v| v.get("error").and_then(|e| e.as_str()).map(String::from))
                .unwrap_or_else(|| status.to_string());
            return Err(format!("instance {who}: {error}"));
        }
        serde_json::from_slice(&body)
            .map_err(|e| format!("instance {who} answered something else than a list: {e}"))
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

/// Which sagas a list shows: all of these that are given.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct ListFilter {
    pub status: Option<String>,
    /// The step awaited.
    pub step: Option<String>,
    pub correlation_id: Option<String>,
    /// Sagas unchanged since this time (ms since the epoch): `older_than` resolved once by the
    /// instance that took the request, so every partition is judged against the same time.
    pub updated_before_ms: Option<i64>,
    /// Sagas changed at or after this time: `newer_than`, resolved the same way.
    pub updated_after_ms: Option<i64>,
}

/// One partition's part of a list.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct ListPage {
    pub sagas: Vec<serde_json::Value>,
    /// The last saga id read, when the partition may hold more (the page is full, or its
    /// read budget is spent): the next page starts after it.
    pub next_after: Option<String>,
    /// Records read for this page.
    pub examined: usize,
    /// Whether the status index served it (else a scan of the partition's sagas).
    pub indexed: bool,
}

/// Finds sagas by id in the state this instance holds.
pub trait SagaLookup: Send + Sync {
    fn lookup(&self, saga_id: &str) -> Result<Lookup, String>;
    /// The topology: steps, statuses, transitions.
    fn topology(&self) -> serde_json::Value;
    /// Sagas per status in `partition`'s store; `None` when this instance does not serve it.
    fn counts(
        &self,
        partition: i32,
    ) -> Result<Option<std::collections::BTreeMap<String, i64>>, String>;
    /// Up to `limit` sagas of `partition` matching `filter`, in saga id order after `after`,
    /// reading at most `budget` records; `None` when this instance does not serve the
    /// partition.
    fn list(
        &self,
        partition: i32,
        filter: &ListFilter,
        after: Option<&str>,
        limit: usize,
        budget: usize,
    ) -> Result<Option<ListPage>, String>;
    /// Saga records of this instance's tasks moved to the quarantine (they could not be read),
    /// at most `limit`.
    fn quarantine(&self, limit: usize) -> Result<Vec<serde_json::Value>, String>;
}

/// Which dead letters a DLQ request is about.
#[derive(Debug, Clone, Default, serde::Deserialize)]
pub struct DlqQuery {
    pub reason: Option<String>,
    pub saga_id: Option<String>,
    /// `FROM-TO` offsets of the source partition.
    pub source_offsets: Option<String>,
    /// RFC 3339, or a duration ago.
    pub since: Option<String>,
    pub until: Option<String>,
    /// Exactly these dead letters (`topic/partition/offset`), comma-separated.
    pub positions: Option<String>,
    pub limit: Option<usize>,
}

/// The dead-letter topics, for the inspector: read, and replayed.
pub trait DeadLetters: Send + Sync {
    /// Per dead-letter topic, how many records per reason.
    fn summary(&self) -> Result<serde_json::Value, String>;
    /// The dead letters of `topic` matching `query`, newest first.
    fn list(&self, topic: &str, query: &DlqQuery) -> Result<serde_json::Value, String>;
    /// Replays the dead letters of `topic` matching `query` (see `ops::dlq`).
    fn replay(
        &self,
        topic: &str,
        query: &DlqQuery,
        again: bool,
        dry_run: bool,
    ) -> Result<serde_json::Value, String>;
}

/// Where operators' actions go: the application's control topic.
pub trait ActionSink: Send + Sync {
    /// Writes `value` keyed by `saga_id` to the control topic and waits until the brokers have
    /// it: its partition and offset.
    fn submit(&self, saga_id: &str, value: &[u8]) -> Result<(i32, i64), String>;
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
    actions: Option<Arc<dyn ActionSink>>,
    dead_letters: Option<Arc<dyn DeadLetters>>,
}

/// What the endpoints serve besides the metrics and readiness: sagas, actions, dead letters.
#[derive(Clone, Default)]
pub struct Services {
    pub sagas: Option<Arc<dyn SagaLookup>>,
    pub forwarding: Option<Forwarding>,
    pub actions: Option<Arc<dyn ActionSink>>,
    pub dead_letters: Option<Arc<dyn DeadLetters>>,
}

/// Binds `addr` and serves the endpoints from a background thread; returns the bound address
/// (useful with port 0). Binding errors come back at once.
pub fn serve(
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    status: RuntimeStatus,
    services: Services,
    security: HttpSecurity,
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
        sagas: services.sagas,
        token: security.token,
        forwarding: services.forwarding,
        actions: services.actions,
        dead_letters: services.dead_letters,
    };
    let guarded = Router::new()
        .route("/sagas", get(list_sagas))
        .route("/sagas/{id}", get(saga))
        .route("/sagas/{id}/{action}", axum::routing::post(saga_action))
        .route("/overview", get(overview))
        .route("/topology", get(topology))
        .route("/dlq", get(dlq_summary))
        .route("/dlq/{topic}", get(dlq_list))
        .route("/dlq/{topic}/replay", axum::routing::post(dlq_replay))
        .route("/quarantine", get(quarantine))
        .route_layer(middleware::from_fn_with_state(state.clone(), require_token));
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/ready", get(ready))
        // The inspector's page and code: no data in them; every request they make for data
        // carries the token the operator enters.
        .route("/ui", get(super::ui::page))
        .route("/ui/", get(super::ui::page))
        .route("/ui/app.js", get(super::ui::script))
        .route("/ui/style.css", get(super::ui::style))
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
    tracing::info!(addr = %bound, scheme, token_required = protected, "http endpoints listening (/metrics, /health, /ready, /sagas, /sagas/{{id}}, /overview, /dlq, /quarantine, /ui)");
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
        "assigned_partitions": s.assigned_partitions(),
        "stalled": s.stalled(),
        "joined": s.joined(),
        "advertised_http": s.advertised_http(),
        // Partition -> changelog records behind; shown, never gating readiness.
        "standby_lag": s.standby_lag(),
        "warming_up": s.warming_up(),
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

/// Sagas per list page unless asked otherwise, and at most.
const DEFAULT_LIST_LIMIT: usize = 50;
const MAX_LIST_LIMIT: usize = 1_000;

#[derive(Debug, Default, serde::Deserialize)]
struct ListParams {
    status: Option<String>,
    step: Option<String>,
    correlation_id: Option<String>,
    /// A duration (`10m`, `2h`): sagas unchanged for at least that long.
    older_than: Option<String>,
    /// A duration: sagas changed within it.
    newer_than: Option<String>,
    limit: Option<usize>,
    /// Where the previous page ended (its `next_cursor`).
    cursor: Option<String>,
    /// Between instances: one partition's page, after `after`, judged at `updated_before`.
    partition: Option<i32>,
    after: Option<String>,
    updated_before: Option<i64>,
    updated_after: Option<i64>,
    /// Between instances: the records the page may still read.
    budget: Option<usize>,
}

/// Records one list request may read in all.
const LIST_BUDGET: usize = 20_000;

/// `now - age` for an age like `10m`, in ms since the epoch.
fn time_ago(name: &str, text: &str) -> Result<i64, String> {
    let age = humantime::parse_duration(text).map_err(|e| format!("{name} '{text}': {e}"))?;
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.as_millis() as i64)
        .unwrap_or(0);
    Ok(now.saturating_sub(age.as_millis() as i64))
}

/// A list cursor: the partition to go on with and the last saga id read there (hex).
fn encode_cursor(partition: i32, after: Option<&str>) -> String {
    match after {
        Some(after) => format!("{partition}.{}", hex::encode(after)),
        None => partition.to_string(),
    }
}

fn decode_cursor(cursor: &str) -> Option<(i32, Option<String>)> {
    let (partition, after) = match cursor.split_once('.') {
        Some((p, a)) => (p, Some(a)),
        None => (cursor, None),
    };
    let partition = partition.parse().ok().filter(|p: &i32| *p >= 0)?;
    let after = match after {
        Some(a) => Some(String::from_utf8(hex::decode(a).ok()?).ok()?),
        None => None,
    };
    Some((partition, after))
}

fn bad_request(error: String) -> Response {
    (StatusCode::BAD_REQUEST, Json(json!({ "error": error }))).into_response()
}

/// `GET /sagas`: the sagas of every partition matching the filters, in partition then saga id
/// order, a page at a time; each partition from this instance's store or its owner's.
async fn list_sagas(
    State(state): State<AppState>,
    axum::extract::Query(params): axum::extract::Query<ListParams>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(sagas) = state.sagas.as_ref() else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "this process runs no saga" })),
        )
            .into_response();
    };
    let limit = params.limit.unwrap_or(DEFAULT_LIST_LIMIT);
    if limit == 0 || limit > MAX_LIST_LIMIT {
        return bad_request(format!("limit must be 1 to {MAX_LIST_LIMIT}"));
    }
    let updated_before = match (&params.older_than, params.updated_before) {
        (_, Some(at)) => Some(at),
        (Some(text), None) => match time_ago("older_than", text) {
            Ok(at) => Some(at),
            Err(e) => return bad_request(e),
        },
        (None, None) => None,
    };
    let updated_after = match (&params.newer_than, params.updated_after) {
        (_, Some(at)) => Some(at),
        (Some(text), None) => match time_ago("newer_than", text) {
            Ok(at) => Some(at),
            Err(e) => return bad_request(e),
        },
        (None, None) => None,
    };
    let filter = ListFilter {
        status: params.status.clone().filter(|s| !s.is_empty()),
        step: params.step.clone().filter(|s| !s.is_empty()),
        correlation_id: params.correlation_id.clone().filter(|s| !s.is_empty()),
        updated_before_ms: updated_before,
        updated_after_ms: updated_after,
    };
    // Another instance asks for one partition of this one's.
    if let Some(partition) = params.partition {
        let budget = params.budget.unwrap_or(LIST_BUDGET).min(LIST_BUDGET);
        let (lookup, after, filter) = (sagas.clone(), params.after.clone(), filter.clone());
        let listed = tokio::task::spawn_blocking(move || {
            lookup.list(partition, &filter, after.as_deref(), limit, budget)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        return match listed {
            Ok(Some(page)) => Json(page).into_response(),
            Ok(None) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("partition {partition} is not served by this instance (now)") })),
            )
                .into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e }))).into_response(),
        };
    }
    let partitions = state.status.partitions();
    if partitions <= 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "not started yet" })),
        )
            .into_response();
    }
    let (mut partition, mut after) = match params.cursor.as_deref().map(decode_cursor) {
        None => (0, None),
        Some(Some(at)) => at,
        Some(None) => return bad_request("the cursor is not one this API gave".into()),
    };
    // What a forwarded page request carries besides its partition.
    let mut forwarded: Vec<(&str, String)> = Vec::new();
    for (name, value) in [
        ("status", &filter.status),
        ("step", &filter.step),
        ("correlation_id", &filter.correlation_id),
    ] {
        if let Some(value) = value {
            forwarded.push((name, value.clone()));
        }
    }
    if let Some(at) = updated_before {
        forwarded.push(("updated_before", at.to_string()));
    }
    if let Some(at) = updated_after {
        forwarded.push(("updated_after", at.to_string()));
    }
    let mut listed = Vec::new();
    let mut unavailable = Vec::new();
    let mut examined = 0;
    let mut by_index = true;
    while partition < partitions && listed.len() < limit && examined < LIST_BUDGET {
        let want = limit - listed.len();
        let budget = LIST_BUDGET - examined;
        // Store reads block: off the event loop, so /health and /ready answer meanwhile.
        let (lookup, from, f) = (sagas.clone(), after.clone(), filter.clone());
        let local = tokio::task::spawn_blocking(move || {
            lookup.list(partition, &f, from.as_deref(), want, budget)
        })
        .await
        .unwrap_or_else(|e| Err(e.to_string()));
        let page = match local {
            Ok(Some(page)) => Ok(page),
            Ok(None) => match &state.forwarding {
                Some(forwarding) => {
                    let mut query = forwarded.clone();
                    query.push(("limit", want.to_string()));
                    query.push(("budget", budget.to_string()));
                    if let Some(after) = &after {
                        query.push(("after", after.clone()));
                    }
                    forwarding.list_page(partition, &query, &headers).await
                }
                None => Err(format!(
                    "partition {partition} is served by another instance"
                )),
            },
            Err(e) => Err(e),
        };
        match page {
            Ok(page) => {
                examined += page.examined;
                by_index &= page.indexed;
                listed.extend(page.sagas);
                match page.next_after {
                    // Full, or the partition's read budget is spent: the next page goes on here.
                    Some(next) => {
                        after = Some(next);
                        break;
                    }
                    None => {
                        partition += 1;
                        after = None;
                    }
                }
            }
            // The page ends here and the cursor stays on the partition: going on past it would
            // leave its sagas out of every later page.
            Err(reason) => {
                unavailable.push(json!({ "partition": partition, "reason": reason }));
                break;
            }
        }
    }
    let next = (partition < partitions).then(|| encode_cursor(partition, after.as_deref()));
    Json(json!({
        "sagas": listed,
        "next_cursor": next,
        "partitions": partitions,
        "examined": examined,
        "by_index": by_index,
        "unavailable": unavailable,
    }))
    .into_response()
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ActionBody {
    reason: Option<String>,
    /// Who asks (a name, for the history and the audit log).
    by: Option<String>,
    /// Chosen by the caller to make a repeated request apply once; a new UUID otherwise.
    action_id: Option<String>,
}

/// `POST /sagas/{id}/{retry|cancel|resume}`: writes the action to the control topic; the task
/// that owns the saga applies it (`202 Accepted`: the saga's history shows the outcome, under
/// the action id).
async fn saga_action(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path((id, action)): Path<(String, String)>,
    headers: axum::http::HeaderMap,
    body: bytes::Bytes,
) -> Response {
    if state.token.is_none() {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "actions on sagas need the HTTP endpoints protected by a token: start the instances with --http-token-file" })),
        )
            .into_response();
    }
    let (Some(sagas), Some(sink)) = (state.sagas.as_ref(), state.actions.clone()) else {
        return (
            StatusCode::NOT_FOUND,
            Json(json!({ "error": "this process runs no saga" })),
        )
            .into_response();
    };
    let body: ActionBody = if body.iter().all(u8::is_ascii_whitespace) {
        ActionBody::default()
    } else {
        match serde_json::from_slice(&body) {
            Ok(body) => body,
            Err(e) => {
                return bad_request(format!(
                    "the body is not an action's JSON (reason, by, action_id): {e}"
                ))
            }
        }
    };
    let action = match crate::saga::actions::parse_action(&action, body.reason.clone()) {
        Ok(action) => action,
        Err(e) => return (StatusCode::NOT_FOUND, Json(json!({ "error": e }))).into_response(),
    };
    let action_id = body
        .action_id
        .clone()
        .unwrap_or_else(|| uuid::Uuid::new_v4().to_string());
    if action_id.len() > 100 {
        return bad_request("action_id is longer than 100 bytes".into());
    }
    let by = body.by.clone().unwrap_or_else(|| "unnamed".to_string());
    let request = crate::saga::actions::ActionRequest {
        action_id: action_id.clone(),
        saga_id: id.clone(),
        action,
        requested_by: format!("{by} (from {})", peer.ip()),
        requested_at_ms: std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_millis() as i64)
            .unwrap_or(0),
    };
    if let Err(e) = request.validate() {
        return bad_request(e);
    }
    // The saga must exist: where it is served, ask.
    let status = match sagas.lookup(&id) {
        Ok(Lookup::Found(saga)) => saga.get("status").cloned(),
        Ok(Lookup::Missing { .. }) => {
            return (
                StatusCode::NOT_FOUND,
                Json(json!({ "error": format!("no saga '{id}'") })),
            )
                .into_response()
        }
        Ok(Lookup::Elsewhere { partition }) => {
            let Some(forwarding) = &state.forwarding else {
                return StatusCode::INTERNAL_SERVER_ERROR.into_response();
            };
            match forwarding.fetch(partition, &["sagas", &id], &[], &headers).await {
                Ok((StatusCode::OK, body, _)) => serde_json::from_slice::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v.get("status").cloned()),
                Ok((StatusCode::NOT_FOUND, _, _)) => {
                    return (StatusCode::NOT_FOUND, Json(json!({ "error": format!("no saga '{id}'") })))
                        .into_response()
                }
                Ok((code, _, who)) => {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({ "error": format!("instance {who}, the saga's owner, answered {code}"), "partition": partition })),
                    )
                        .into_response()
                }
                Err((error, owner)) => {
                    return (
                        StatusCode::SERVICE_UNAVAILABLE,
                        Json(json!({ "error": error, "partition": partition, "owner": owner })),
                    )
                        .into_response()
                }
            }
        }
        Ok(Lookup::NotStarted) => {
            return (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": "not started yet" })),
            )
                .into_response()
        }
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": e })),
            )
                .into_response()
        }
    };
    let value = match serde_json::to_vec(&request) {
        Ok(value) => value,
        Err(e) => {
            return (
                StatusCode::INTERNAL_SERVER_ERROR,
                Json(json!({ "error": e.to_string() })),
            )
                .into_response()
        }
    };
    let name = request.action.name();
    let saga_id = id.clone();
    let written = tokio::task::spawn_blocking(move || sink.submit(&saga_id, &value)).await;
    match written {
        Ok(Ok((partition, offset))) => {
            tracing::info!(
                target: AUDIT_TARGET, event = "saga_action_requested", action = name,
                saga_id = %id, action_id = %action_id, requested_by = %by, %peer,
                partition, offset, "an operator's action was written to the control topic"
            );
            (
                StatusCode::ACCEPTED,
                Json(json!({
                    "action_id": action_id,
                    "action": name,
                    "saga_id": id,
                    "status": status,
                    "control_partition": partition,
                    "control_offset": offset,
                })),
            )
                .into_response()
        }
        // It may have reached the brokers all the same (a timeout): sent again with the same
        // action id, it applies at most once.
        Ok(Err(e)) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({
                "error": format!("the action was not confirmed by the control topic ({e}): it may or may not have been written; send it again with the same action_id ({action_id}) to apply it at most once"),
                "action_id": action_id,
            })),
        )
            .into_response(),
        Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e.to_string() }))).into_response(),
    }
}

fn no_saga() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "this process runs no saga" })),
    )
        .into_response()
}

async fn topology(State(state): State<AppState>) -> Response {
    match &state.sagas {
        Some(sagas) => Json(sagas.topology()).into_response(),
        None => no_saga(),
    }
}

#[derive(Debug, Default, serde::Deserialize)]
struct OverviewParams {
    /// Between instances: one partition's counts.
    partition: Option<i32>,
}

/// `GET /overview`: sagas per status over every partition (this instance's counted from its
/// stores, the others' asked of their owners).
async fn overview(
    State(state): State<AppState>,
    axum::extract::Query(params): axum::extract::Query<OverviewParams>,
    headers: axum::http::HeaderMap,
) -> Response {
    let Some(sagas) = state.sagas.as_ref() else {
        return no_saga();
    };
    if let Some(partition) = params.partition {
        return match sagas.counts(partition) {
            Ok(Some(counts)) => Json(json!({ "counts": counts })).into_response(),
            Ok(None) => (
                StatusCode::SERVICE_UNAVAILABLE,
                Json(json!({ "error": format!("partition {partition} is not served by this instance (now)") })),
            )
                .into_response(),
            Err(e) => (StatusCode::INTERNAL_SERVER_ERROR, Json(json!({ "error": e }))).into_response(),
        };
    }
    let partitions = state.status.partitions();
    if partitions <= 0 {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(json!({ "error": "not started yet" })),
        )
            .into_response();
    }
    let mut total: std::collections::BTreeMap<String, i64> = std::collections::BTreeMap::new();
    let mut unavailable = Vec::new();
    // An owner that did not answer is not asked again for its other partitions.
    let mut failed_owners: std::collections::BTreeMap<String, String> =
        std::collections::BTreeMap::new();
    for partition in 0..partitions {
        let lookup = sagas.clone();
        let local = tokio::task::spawn_blocking(move || lookup.counts(partition))
            .await
            .unwrap_or_else(|e| Err(e.to_string()));
        let counts = match local {
            Ok(Some(counts)) => Ok(counts),
            Ok(None) => match &state.forwarding {
                Some(forwarding)
                    if forwarding
                        .owner_name(partition)
                        .is_some_and(|o| failed_owners.contains_key(&o)) =>
                {
                    let owner = forwarding.owner_name(partition).unwrap_or_default();
                    Err(failed_owners.get(&owner).cloned().unwrap_or_default())
                }
                Some(forwarding) => {
                    let query = [("partition", partition.to_string())];
                    match forwarding
                        .fetch(partition, &["overview"], &query, &headers)
                        .await
                    {
                        Ok((StatusCode::OK, body, _)) => {
                            serde_json::from_slice::<serde_json::Value>(&body)
                                .ok()
                                .and_then(|v| serde_json::from_value(v["counts"].clone()).ok())
                                .ok_or_else(|| "an answer that is not counts".to_string())
                        }
                        Ok((code, _, who)) => Err(format!("instance {who} answered {code}")),
                        Err((e, owner)) => {
                            if let Some(owner) = owner {
                                failed_owners.insert(owner, e.clone());
                            }
                            Err(e)
                        }
                    }
                }
                None => Err(format!(
                    "partition {partition} is served by another instance"
                )),
            },
            Err(e) => Err(e),
        };
        match counts {
            Ok(counts) => {
                for (status, n) in counts {
                    *total.entry(status).or_default() += n;
                }
            }
            Err(reason) => unavailable.push(json!({ "partition": partition, "reason": reason })),
        }
    }
    Json(json!({
        "counts": total,
        "partitions": partitions,
        "unavailable": unavailable,
    }))
    .into_response()
}

fn no_dead_letters() -> Response {
    (
        StatusCode::NOT_FOUND,
        Json(json!({ "error": "this process serves no dead-letter topics" })),
    )
        .into_response()
}

/// Runs a blocking dead-letter call off the HTTP thread's event loop.
async fn blocking_json(
    call: impl FnOnce() -> Result<serde_json::Value, String> + Send + 'static,
) -> Response {
    match tokio::task::spawn_blocking(call).await {
        Ok(Ok(value)) => Json(value).into_response(),
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e }))).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

async fn dlq_summary(State(state): State<AppState>) -> Response {
    let Some(dlq) = state.dead_letters.clone() else {
        return no_dead_letters();
    };
    blocking_json(move || dlq.summary()).await
}

async fn dlq_list(
    State(state): State<AppState>,
    Path(topic): Path<String>,
    axum::extract::Query(query): axum::extract::Query<DlqQuery>,
) -> Response {
    let Some(dlq) = state.dead_letters.clone() else {
        return no_dead_letters();
    };
    blocking_json(move || dlq.list(&topic, &query)).await
}

#[derive(Debug, Default, serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct ReplayBody {
    #[serde(flatten)]
    query: DlqQuery,
    #[serde(default)]
    dry_run: bool,
    #[serde(default)]
    again: bool,
    by: Option<String>,
}

/// `POST /dlq/{topic}/replay`: like `saga-streams dlq replay`; needs the token, as actions do.
async fn dlq_replay(
    State(state): State<AppState>,
    ConnectInfo(peer): ConnectInfo<SocketAddr>,
    Path(topic): Path<String>,
    body: bytes::Bytes,
) -> Response {
    if state.token.is_none() {
        return (
            StatusCode::FORBIDDEN,
            Json(json!({ "error": "replaying dead letters needs the HTTP endpoints protected by a token: start the instances with --http-token-file" })),
        )
            .into_response();
    }
    let Some(dlq) = state.dead_letters.clone() else {
        return no_dead_letters();
    };
    let body: ReplayBody = match serde_json::from_slice(&body) {
        Ok(body) => body,
        Err(e) => return bad_request(format!("the body is not a replay request: {e}")),
    };
    let by = body.by.clone().unwrap_or_else(|| "unnamed".into());
    let (dry_run, again) = (body.dry_run, body.again);
    let logged_topic = topic.clone();
    let result =
        tokio::task::spawn_blocking(move || dlq.replay(&topic, &body.query, again, dry_run)).await;
    match result {
        Ok(Ok(value)) => {
            tracing::info!(
                target: AUDIT_TARGET, event = "dlq_replay", topic = %logged_topic,
                requested_by = %by, %peer, dry_run, again,
                replayed = value["replayed"].as_u64().unwrap_or(0),
                skipped = value["skipped"].as_u64().unwrap_or(0),
                failed = value["failed"].as_u64().unwrap_or(0),
                "dead letters replayed"
            );
            Json(value).into_response()
        }
        Ok(Err(e)) => {
            (StatusCode::SERVICE_UNAVAILABLE, Json(json!({ "error": e }))).into_response()
        }
        Err(e) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(json!({ "error": e.to_string() })),
        )
            .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::token_matches;

    #[test]
    fn a_cursor_reads_back_and_a_forged_one_is_refused() {
        use super::{decode_cursor, encode_cursor};
        assert_eq!(decode_cursor(&encode_cursor(3, None)), Some((3, None)));
        assert_eq!(
            decode_cursor(&encode_cursor(0, Some("o-1.x"))),
            Some((0, Some("o-1.x".to_string())))
        );
        for bad in ["", "-1", "x", "2.zz", "2.ff"] {
            assert_eq!(decode_cursor(bad), None, "{bad}");
        }
    }

    #[test]
    fn only_the_exact_token_matches() {
        assert!(token_matches(b"s3cret", b"s3cret"));
        for other in [&b""[..], b"s3cre", b"s3cret ", b"S3cret", b"s3cret\n"] {
            assert!(!token_matches(other, b"s3cret"), "{other:?}");
        }
    }
}
