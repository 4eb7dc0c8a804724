//! The watch-list admin calls: `GET /api/v1/admin/watchlist` lists it, `POST` with a
//! `{plate, plate_color?, reason, severity}` body adds or replaces an entry, and
//! `DELETE /api/v1/admin/watchlist/{plate}[?plate_color=N]` removes one. Changes are written to
//! the watch-list file and apply to the next pass.

use super::AppState;
use crate::pipelines::WatchEntry;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Response {
    (status, Json(serde_json::json!({ "error": code, "message": message.into() }))).into_response()
}

pub async fn list(State(state): State<AppState>) -> Response {
    Json(serde_json::json!({ "entries": state.watchlist.entries() })).into_response()
}

pub async fn put(
    State(state): State<AppState>,
    body: Result<Json<WatchEntry>, axum::extract::rejection::JsonRejection>,
) -> Response {
    let Json(entry) = match body {
        Ok(b) => b,
        Err(e) if e.status() == StatusCode::PAYLOAD_TOO_LARGE => {
            return error(e.status(), "body_too_large", e.body_text());
        }
        Err(e) => return error(StatusCode::BAD_REQUEST, "bad_request", e.body_text()),
    };
    if let Err(message) = entry.validate() {
        return error(StatusCode::BAD_REQUEST, "invalid_entry", message);
    }
    match state.watchlist.put(entry.clone()) {
        Ok(()) => (StatusCode::CREATED, Json(entry)).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "watchlist_write_failed", format!("{e:#}")),
    }
}

#[derive(Deserialize)]
pub struct RemoveQuery {
    plate_color: Option<u8>,
}

pub async fn remove(
    State(state): State<AppState>,
    Path(plate): Path<String>,
    query: Result<Query<RemoveQuery>, axum::extract::rejection::QueryRejection>,
) -> Response {
    let Ok(Query(query)) = query else {
        return error(StatusCode::BAD_REQUEST, "bad_request", "plate_color must be a colour code (0-255)");
    };
    match state.watchlist.remove(&plate, query.plate_color) {
        Ok(0) => error(StatusCode::NOT_FOUND, "not_found", format!("`{plate}` is not on the watch list")),
        Ok(n) => Json(serde_json::json!({ "removed": n })).into_response(),
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, "watchlist_write_failed", format!("{e:#}")),
    }
}
