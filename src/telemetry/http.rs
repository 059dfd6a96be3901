//! The HTTP endpoints beside the metrics: `/metrics`, `/health` (the process is alive), `/ready`
//! (every assigned task is restored and running) and `/sagas/{id}` (a saga's state and history).
//!
//! They run on a small tokio runtime of their own thread, so nothing here ever waits on the stream
//! thread: readiness comes from [`RuntimeStatus`], saga state from the running tasks' committed
//! stores through a [`SagaLookup`].

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::{Json, Router};
use metrics_exporter_prometheus::PrometheusHandle;
use serde_json::json;

use crate::runtime::RuntimeStatus;

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
    status: RuntimeStatus,
    sagas: Option<Arc<dyn SagaLookup>>,
}

/// Binds `addr` and serves the endpoints from a background thread; returns the bound address
/// (useful with port 0). Binding errors come back at once.
pub fn serve(
    addr: SocketAddr,
    metrics: Option<PrometheusHandle>,
    status: RuntimeStatus,
    sagas: Option<Arc<dyn SagaLookup>>,
) -> Result<SocketAddr, String> {
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
    let state = AppState {
        metrics,
        status,
        sagas,
    };
    let app = Router::new()
        .route("/metrics", get(metrics_text))
        .route("/health", get(health))
        .route("/ready", get(ready))
        .route("/sagas/{id}", get(saga))
        .route("/quarantine", get(quarantine))
        .with_state(state);
    std::thread::Builder::new()
        .name("http".into())
        .spawn(move || {
            runtime.block_on(async move {
                match tokio::net::TcpListener::from_std(listener) {
                    Ok(listener) => {
                        if let Err(e) = axum::serve(listener, app).await {
                            tracing::error!(error = %e, "HTTP server stopped");
                        }
                    }
                    Err(e) => tracing::error!(error = %e, "HTTP listener unusable"),
                }
            })
        })
        .map_err(|e| format!("starting the HTTP thread: {e}"))?;
    tracing::info!(addr = %bound, "http endpoints listening (/metrics, /health, /ready, /sagas/{{id}}, /quarantine)");
    Ok(bound)
}

async fn metrics_text(State(state): State<AppState>) -> Response {
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

async fn saga(State(state): State<AppState>, Path(id): Path<String>) -> Response {
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
