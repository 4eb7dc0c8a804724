//! Request limits and cross-origin access: a body larger than 64 KiB is refused (413), each
//! client address gets `api.requests_per_second` requests per second with bursts of twice that
//! (429 beyond), the origins in `api.cors_origins` may call the API from a browser, and every
//! request's latency is observed by route.

use super::AppState;
use axum::extract::{ConnectInfo, MatchedPath, Request, State};
use axum::http::{header, HeaderValue, Method, StatusCode};
use axum::middleware::Next;
use axum::response::{IntoResponse, Response};
use axum::Json;
use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::Mutex;
use std::time::Instant;

pub const MAX_BODY_BYTES: usize = 64 * 1024;

pub struct Limits {
    per_second: f64,
    cors_origins: Vec<String>,
    /// Per client address: (tokens left, when last refilled).
    buckets: Mutex<HashMap<IpAddr, (f64, Instant)>>,
}

impl Limits {
    pub fn new(per_second: u32, cors_origins: Vec<String>) -> Limits {
        Limits { per_second: f64::from(per_second), cors_origins, buckets: Mutex::new(HashMap::new()) }
    }

    /// Takes one request from the client's bucket; false when it is empty.
    fn admit(&self, client: IpAddr) -> bool {
        if self.per_second <= 0.0 {
            return true;
        }
        let burst = 2.0 * self.per_second;
        let now = Instant::now();
        let mut buckets = self.buckets.lock().expect("rate limit lock");
        if buckets.len() > 100_000 {
            // Forget idle clients rather than grow without bound.
            buckets.retain(|_, (_, at)| now.duration_since(*at).as_secs() < 60);
        }
        let (tokens, at) = buckets.entry(client).or_insert((burst, now));
        *tokens = (*tokens + now.duration_since(*at).as_secs_f64() * self.per_second).min(burst);
        *at = now;
        if *tokens >= 1.0 {
            *tokens -= 1.0;
            true
        } else {
            false
        }
    }

    fn allowed_origin(&self, origin: &str) -> bool {
        self.cors_origins.iter().any(|o| o == "*" || o == origin)
    }
}

pub async fn check(State(state): State<AppState>, request: Request, next: Next) -> Response {
    let started = Instant::now();
    let route = request.extensions().get::<MatchedPath>().map_or("unmatched", |p| p.as_str()).to_owned();
    let origin = request.headers().get(header::ORIGIN).and_then(|o| o.to_str().ok()).map(str::to_owned);
    let cors = origin.filter(|o| state.limits.allowed_origin(o));
    let client = request.extensions().get::<ConnectInfo<SocketAddr>>().map(|c| c.0.ip());
    let mut response = if request.method() == Method::OPTIONS && cors.is_some() {
        StatusCode::NO_CONTENT.into_response()
    } else if client.is_some_and(|ip| !state.limits.admit(ip)) {
        (
            StatusCode::TOO_MANY_REQUESTS,
            Json(serde_json::json!({ "error": "rate_limited", "message": "too many requests from this address" })),
        )
            .into_response()
    } else {
        next.run(request).await
    };
    if let Some(origin) = cors.and_then(|o| HeaderValue::from_str(&o).ok()) {
        let h = response.headers_mut();
        h.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        h.insert(header::ACCESS_CONTROL_ALLOW_HEADERS, HeaderValue::from_static("authorization, content-type"));
        h.insert(header::ACCESS_CONTROL_ALLOW_METHODS, HeaderValue::from_static("GET, POST, DELETE, OPTIONS"));
        h.insert(header::VARY, HeaderValue::from_static("origin"));
    }
    state.metrics.http_seconds.with_label_values(&[&route]).observe(started.elapsed().as_secs_f64());
    response
}
