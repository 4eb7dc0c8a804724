//! Bearer tokens with roles, and the audit log of plate look-ups.
//!
//! With no token configured the API is open (a local, single-user setup). Otherwise every
//! `/api/v1` call needs `Authorization: Bearer <token>` of a role at least the call's: viewer
//! for aggregates, analyst for anything that names a vehicle, admin for the watch list and
//! savepoints. `/healthz`, `/readyz`, `/metrics` and the API description
//! (`/api/v1/openapi.json`, `/api/v1/docs`) stay open. Every call that looks up or
//! lists vehicles is appended to the audit log (JSON lines: ts, who, role, method, path).

use super::AppState;
use crate::config::{ApiToken, Role};
use axum::extract::{Request, State};
use axum::http::StatusCode;
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::io::Write;
use std::path::PathBuf;
use std::sync::Mutex;

pub struct Auth {
    tokens: Vec<ApiToken>,
    audit_path: PathBuf,
    audit: Mutex<Option<std::fs::File>>,
}

impl Auth {
    pub fn new(tokens: Vec<ApiToken>, audit_path: PathBuf) -> Auth {
        Auth { tokens, audit_path, audit: Mutex::new(None) }
    }

    /// The client a bearer token belongs to (compared in constant time).
    fn client(&self, token: &str) -> Option<&ApiToken> {
        self.tokens.iter().find(|t| {
            t.token.len() == token.len()
                && t.token.bytes().zip(token.bytes()).fold(0u8, |acc, (a, b)| acc | (a ^ b)) == 0
        })
    }

    fn audit(&self, line: &serde_json::Value) -> std::io::Result<()> {
        let mut file = self.audit.lock().expect("audit lock");
        if file.is_none() {
            if let Some(dir) = self.audit_path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::create_dir_all(dir)?;
            }
            *file = Some(std::fs::OpenOptions::new().create(true).append(true).open(&self.audit_path)?);
        }
        let f = file.as_mut().expect("opened above");
        writeln!(f, "{line}")?;
        f.flush()
    }
}

/// The role a call needs; `None`: open.
pub fn required_role(path: &str) -> Option<Role> {
    let api = path.strip_prefix("/api/v1/")?;
    let first = api.split('/').next().unwrap_or("");
    Some(match first {
        // The API's own description is open, like `/healthz`.
        "openapi.json" | "docs" => return None,
        "admin" => Role::Admin,
        "trajectories" | "first-entry" | "alerts" | "high-frequency" => Role::Analyst,
        "restrictions" if api.starts_with("restrictions/violations") => Role::Analyst,
        _ => Role::Viewer,
    })
}

fn refuse(status: StatusCode, code: &str, message: &str) -> Response {
    (status, Json(serde_json::json!({ "error": code, "message": message }))).into_response()
}

pub async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let path = request.uri().path().to_owned();
    let Some(needed) = required_role(&path) else { return next.run(request).await };
    let (who, role) = if state.auth.tokens.is_empty() {
        ("anonymous".to_owned(), Role::Admin)
    } else {
        let token = request
            .headers()
            .get(axum::http::header::AUTHORIZATION)
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.strip_prefix("Bearer "));
        match token.and_then(|t| state.auth.client(t)) {
            Some(client) => (client.name.clone(), client.role),
            None => return refuse(StatusCode::UNAUTHORIZED, "unauthorized", "a valid bearer token is required"),
        }
    };
    if role < needed {
        return refuse(StatusCode::FORBIDDEN, "forbidden", &format!("this call needs the {needed:?} role"));
    }
    if needed >= Role::Analyst {
        let line = serde_json::json!({
            "ts": chrono::Utc::now().timestamp_millis(),
            "who": who,
            "role": role,
            "method": request.method().as_str(),
            "path": request.uri().to_string(),
        });
        if let Err(e) = state.auth.audit(&line) {
            // A look-up that cannot be audited is not served.
            tracing::error!(error = %e, "audit log not written");
            return refuse(StatusCode::SERVICE_UNAVAILABLE, "audit_unavailable", "the audit log cannot be written");
        }
    }
    next.run(request).await
}
