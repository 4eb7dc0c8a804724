//! The HTTP API: health, Prometheus metrics and the admin savepoint call; the REST API under
//! `/api/v1` grows here.

mod admin;
mod watchlist;

pub use admin::{request_savepoint, AdminCommand, SavepointRequestError};

use crate::metrics::Metrics;
use axum::extract::State;
use axum::http::header;
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
}

pub fn router(state: AppState) -> Router {
    Router::new()
        .route("/healthz", get(healthz))
        .route("/metrics", get(metrics))
        .route("/api/v1/admin/savepoint", post(admin::savepoint))
        .route("/api/v1/admin/watchlist", get(watchlist::list).post(watchlist::put))
        .route("/api/v1/admin/watchlist/{plate}", delete(watchlist::remove))
        .with_state(state)
}

async fn healthz() -> impl IntoResponse {
    Json(serde_json::json!({ "status": "ok" }))
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
    axum::serve(listener, router(state)).await?;
    Ok(())
}
