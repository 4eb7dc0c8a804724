//! The HTTP API: health, Prometheus metrics, the read API over the result tables and the
//! reference data (`query.rs`), its OpenAPI description (`openapi.rs`), and the admin calls
//! (savepoint, watch list).

mod admin;
mod auth;
mod limits;
mod openapi;
mod query;
mod stream;
mod watchlist;

pub use admin::{request_savepoint, AdminCommand, SavepointRequestError};
pub use auth::{required_role, Auth};
pub use limits::Limits;
pub use openapi::openapi;

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::{header, StatusCode};
use axum::response::IntoResponse;
use axum::routing::{delete, get, post};
use axum::{Json, Router};
use std::sync::Arc;
use tokio::net::TcpListener;
use tokio::sync::mpsc;

#[derive(Clone)]
pub struct AppState {
    pub metrics: Arc<Metrics>,
    /// Commands for the pipeline task.
    pub admin: mpsc::Sender<AdminCommand>,
    pub watchlist: Arc<crate::pipelines::WatchList>,
    /// The result store the read API queries.
    pub store: Arc<crate::store::Store>,
    pub city: Arc<crate::reference::City>,
    pub auth: Arc<Auth>,
    /// Alerts as they are written (JSON), for `/api/v1/alerts/stream`.
    pub live_alerts: tokio::sync::broadcast::Sender<Arc<str>>,
    pub limits: Arc<limits::Limits>,
    /// The webhook queue, when endpoints are configured.
    pub webhooks: Option<Arc<crate::webhooks::Webhooks>>,
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/", get(status_page))
        .route("/healthz", get(healthz))
        .route("/readyz", get(readyz))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/savepoint", post(admin::savepoint))
        .route("/api/v1/admin/webhooks/redrive", post(admin::redrive_webhooks))
        .route("/api/v1/admin/watchlist", get(watchlist::list).post(watchlist::put))
        .route("/api/v1/admin/watchlist/{plate}", delete(watchlist::remove))
        .route("/api/v1/openapi.json", get(openapi::document))
        .route("/api/v1/docs", get(openapi::docs_page))
        .route("/api/v1/flows", get(query::flows))
        .route("/api/v1/congestion/{level}", get(query::congestion))
        .route("/api/v1/top-n", get(query::top_n))
        .route("/api/v1/origins", get(query::origins))
        .route("/api/v1/high-frequency", get(query::high_frequency))
        .route("/api/v1/alerts", get(query::alerts))
        .route("/api/v1/alerts/stream", get(stream::alerts))
        .route("/api/v1/alerts/{id}/ack", post(query::acknowledge))
        .route("/api/v1/trajectories/{plate}", get(query::trajectory))
        .route("/api/v1/first-entry/{plate}", get(query::first_entry))
        .route("/api/v1/restrictions/{what}", get(query::restrictions))
        .route("/api/v1/reference/{what}", get(query::reference))
        .layer(axum::middleware::from_fn_with_state(state.clone(), auth::check))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limits::check))
        .layer(axum::extract::DefaultBodyLimit::max(limits::MAX_BODY_BYTES))
        .with_state(state)
}

/// The built-in status page: one self-contained HTML file (no CDN), reading the API.
async fn status_page() -> impl IntoResponse {
    axum::response::Html(include_str!("status.html"))
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
}

/// Ready when the result store answers (and its last write went through), the pipeline loop
/// turned within the last 30 s, and every part that reports on itself (the source, the Kafka
/// sink) works; otherwise 503, naming what is not.
async fn readyz(State(state): State<AppState>) -> impl IntoResponse {
    let store = tokio::time::timeout(
        std::time::Duration::from_secs(2),
        state.store.query("SELECT 1", Vec::new(), &[crate::store::Column::Int("one")]),
    )
    .await;
    let beat = state.metrics.pipeline_heartbeat_ms.get();
    let mut checks = vec![
        ("store".to_owned(), matches!(store, Ok(Ok(_)))),
        ("pipeline".to_owned(), beat > 0 && chrono::Utc::now().timestamp_millis() - beat < 30_000),
    ];
    for (part, ok) in state.metrics.components() {
        match checks.iter_mut().find(|(name, _)| *name == part) {
            Some((_, known)) => *known &= ok,
            None => checks.push((part, ok)),
        }
    }
    let ready = checks.iter().all(|(_, ok)| *ok);
    let status = if ready { StatusCode::OK } else { StatusCode::SERVICE_UNAVAILABLE };
    let checks: serde_json::Map<String, serde_json::Value> =
        checks.into_iter().map(|(name, ok)| (name, (if ok { "ok" } else { "not ready" }).into())).collect();
    (status, Json(serde_json::json!({ "ready": ready, "checks": checks })))
}

async fn metrics(State(state): State<AppState>) -> impl IntoResponse {
    ([(header::CONTENT_TYPE, "text/plain; version=0.0.4")], state.metrics.render())
}

/// Binds the API's listener (port 0 picks a free port).
pub async fn bind(listen: &str) -> anyhow::Result<TcpListener> {
    TcpListener::bind(listen).await.map_err(|e| anyhow::anyhow!("api.listen {listen}: {e}"))
}

/// Serves the API until the process stops.
pub async fn serve(listener: TcpListener, state: AppState) -> anyhow::Result<()> {
    // Client addresses for the per-client rate limit.
    axum::serve(listener, router(state).into_make_service_with_connect_info::<std::net::SocketAddr>()).await?;
    Ok(())
}
