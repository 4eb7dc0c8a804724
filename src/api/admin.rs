//! Admin calls: `POST /api/v1/admin/savepoint {"to": DIR}` takes a checkpoint and exports it as
//! a savepoint (`passflow savepoint create` is its client); `POST
//! /api/v1/admin/webhooks/redrive {"endpoint": NAME}` sends dead-lettered webhook deliveries
//! again, those of one endpoint or (`{}`) of all.

use super::AppState;
use axum::extract::State;
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use serde::Deserialize;
use std::path::{Path, PathBuf};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::sync::oneshot;

/// A request for the pipeline task.
pub enum AdminCommand {
    Savepoint { to: PathBuf, reply: oneshot::Sender<Result<u64, String>> },
}

#[derive(Deserialize)]
pub struct SavepointRequest {
    to: PathBuf,
}

pub async fn savepoint(State(state): State<AppState>, Json(request): Json<SavepointRequest>) -> impl IntoResponse {
    if !request.to.is_absolute() {
        return (
            StatusCode::BAD_REQUEST,
            Json(serde_json::json!({ "error": "bad_request", "message": "`to` must be an absolute path" })),
        );
    }
    let (reply, answer) = oneshot::channel();
    if state.admin.send(AdminCommand::Savepoint { to: request.to.clone(), reply }).await.is_err() {
        return (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "unavailable", "message": "the pipeline is not running" })),
        );
    }
    match answer.await {
        Ok(Ok(id)) => (StatusCode::OK, Json(serde_json::json!({ "checkpoint_id": id, "to": request.to }))),
        Ok(Err(message)) => (
            StatusCode::INTERNAL_SERVER_ERROR,
            Json(serde_json::json!({ "error": "savepoint_failed", "message": message })),
        ),
        Err(_) => (
            StatusCode::SERVICE_UNAVAILABLE,
            Json(serde_json::json!({ "error": "unavailable", "message": "the pipeline stopped" })),
        ),
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RedriveRequest {
    #[serde(default)]
    endpoint: Option<String>,
}

pub async fn redrive_webhooks(State(state): State<AppState>, Json(request): Json<RedriveRequest>) -> impl IntoResponse {
    let error =
        |status, code: &str, message: String| (status, Json(serde_json::json!({ "error": code, "message": message })));
    let Some(webhooks) = &state.webhooks else {
        return error(StatusCode::NOT_FOUND, "not_found", "no webhook endpoint is configured".into());
    };
    if let Some(name) = request.endpoint.as_deref().filter(|name| !webhooks.has_endpoint(name)) {
        return error(StatusCode::NOT_FOUND, "not_found", format!("no webhook endpoint `{name}` is configured"));
    }
    match webhooks.redrive(request.endpoint.as_deref(), chrono::Utc::now().timestamp_millis()).await {
        Ok(n) => (StatusCode::OK, Json(serde_json::json!({ "redriven": n }))),
        Err(e) => error(StatusCode::SERVICE_UNAVAILABLE, "unavailable", format!("the webhook queue failed: {e:#}")),
    }
}

#[derive(Debug)]
pub enum SavepointRequestError {
    /// No service answers at that address.
    Unreachable,
    Failed(String),
}

/// Asks the service at `listen` for a savepoint in `to`; returns the checkpoint id.
pub async fn request_savepoint(listen: &str, to: &Path) -> Result<u64, SavepointRequestError> {
    let mut stream = tokio::net::TcpStream::connect(listen).await.map_err(|_| SavepointRequestError::Unreachable)?;
    let body = serde_json::json!({ "to": to }).to_string();
    let request = format!("POST /api/v1/admin/savepoint HTTP/1.1\r\nHost: {listen}\r\nContent-Type: application/json\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
    let failed = |e: std::io::Error| SavepointRequestError::Failed(e.to_string());
    stream.write_all(request.as_bytes()).await.map_err(failed)?;
    let mut response = String::new();
    stream.read_to_string(&mut response).await.map_err(failed)?;
    let (head, body) = response.split_once("\r\n\r\n").unwrap_or((&response, ""));
    let json: serde_json::Value = serde_json::from_str(body).unwrap_or_default();
    match json.get("checkpoint_id").and_then(serde_json::Value::as_u64) {
        Some(id) if head.starts_with("HTTP/1.1 200") => Ok(id),
        _ => {
            Err(SavepointRequestError::Failed(json.get("message").and_then(|m| m.as_str()).unwrap_or(head).to_owned()))
        }
    }
}
