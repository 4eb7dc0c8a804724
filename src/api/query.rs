//! The read API under `/api/v1`: result tables and reference data as JSON.
//!
//! Every query is bounded: time ranges (`from`, `to`, epoch ms or RFC 3339) at most 7 days,
//! `limit` at most 1,000 rows (default 100), `offset` for paging. Bad input is a 400 with a
//! stable `error` code and a `message`; an unknown plate, id or day is a 404.

use super::AppState;
use crate::model::{PlateRead, DAY_MS};
use crate::store::{Bind, Column};
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;
use serde::Deserialize;
use std::collections::HashMap;

const MAX_RANGE_MS: i64 = 7 * DAY_MS;
pub(super) const MAX_LIMIT: i64 = 1_000;
pub(super) const DEFAULT_LIMIT: i64 = 100;

/// A client error: status, stable code, message.
pub struct ApiError(StatusCode, &'static str, String);

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        (self.0, Json(serde_json::json!({ "error": self.1, "message": self.2 }))).into_response()
    }
}

fn bad(code: &'static str, message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::BAD_REQUEST, code, message.into())
}

fn not_found(message: impl Into<String>) -> ApiError {
    ApiError(StatusCode::NOT_FOUND, "not_found", message.into())
}

fn internal(e: anyhow::Error) -> ApiError {
    tracing::error!(error = %format!("{e:#}"), "API query failed");
    ApiError(StatusCode::SERVICE_UNAVAILABLE, "store_unavailable", "the result store did not answer".into())
}

type Params = Result<Query<HashMap<String, String>>, axum::extract::rejection::QueryRejection>;

/// Query parameters, checked.
struct Q(HashMap<String, String>);

impl Q {
    fn of(params: Params) -> Result<Q, ApiError> {
        params.map(|Query(p)| Q(p)).map_err(|e| bad("bad_query", e.body_text()))
    }

    fn text(&self, name: &str) -> Option<&str> {
        self.0.get(name).map(String::as_str).filter(|v| !v.is_empty())
    }

    fn int(&self, name: &str) -> Result<Option<i64>, ApiError> {
        self.text(name)
            .map(|v| v.parse::<i64>().map_err(|_| bad("bad_parameter", format!("`{name}` must be an integer"))))
            .transpose()
    }

    fn time(&self, name: &str) -> Result<Option<i64>, ApiError> {
        let Some(v) = self.text(name) else { return Ok(None) };
        if let Ok(ms) = v.parse::<i64>() {
            return Ok(Some(ms));
        }
        chrono::DateTime::parse_from_rfc3339(v)
            .map(|t| Some(t.timestamp_millis()))
            .map_err(|_| bad("bad_parameter", format!("`{name}` must be epoch milliseconds or RFC 3339")))
    }

    /// `from`/`to` (default: the last hour before `to`, `to` default now), at most 7 days.
    fn range(&self) -> Result<(i64, i64), ApiError> {
        let to = self.time("to")?.unwrap_or_else(|| chrono::Utc::now().timestamp_millis());
        let from = self.time("from")?.unwrap_or(to - 3_600_000);
        if from > to {
            return Err(bad("bad_range", "`from` is after `to`"));
        }
        if to - from > MAX_RANGE_MS {
            return Err(bad("range_too_large", "a time range is at most 7 days"));
        }
        Ok((from, to))
    }

    /// `limit` (1–1000, default 100) and `offset` (≥ 0).
    fn page(&self) -> Result<(i64, i64), ApiError> {
        let limit = self.int("limit")?.unwrap_or(DEFAULT_LIMIT);
        let offset = self.int("offset")?.unwrap_or(0);
        if !(1..=MAX_LIMIT).contains(&limit) {
            return Err(bad("bad_limit", "`limit` is 1 to 1000"));
        }
        if offset < 0 {
            return Err(bad("bad_offset", "`offset` is not negative"));
        }
        Ok((limit, offset))
    }

    fn one_of(
        &self,
        name: &str,
        allowed: &[&'static str],
        default: Option<&'static str>,
    ) -> Result<Option<&'static str>, ApiError> {
        match self.text(name) {
            None => Ok(default),
            Some(v) => allowed
                .iter()
                .find(|a| **a == v)
                .copied()
                .map(Some)
                .ok_or_else(|| bad("bad_parameter", format!("`{name}` is one of {}", allowed.join(", ")))),
        }
    }

    fn window_s(&self, allowed: &[i64]) -> Result<i64, ApiError> {
        let w = self.int("window_s")?.unwrap_or(allowed[0]);
        if allowed.contains(&w) {
            Ok(w)
        } else {
            Err(bad("bad_parameter", format!("`window_s` is one of {allowed:?}")))
        }
    }
}

/// A plate from the path: it must read as a plate.
fn plate(raw: &str) -> Result<String, ApiError> {
    match PlateRead::parse(raw) {
        PlateRead::Readable(p) if p.as_str() == raw => Ok(raw.to_owned()),
        _ => Err(bad("bad_plate", format!("`{raw}` is not a plate"))),
    }
}

async fn rows(
    state: &AppState,
    sql: &str,
    binds: Vec<Bind>,
    columns: &[Column],
) -> Result<Json<serde_json::Value>, ApiError> {
    let rows = state.store.query(sql, binds, columns).await.map_err(internal)?;
    Ok(Json(serde_json::json!({ "rows": rows })))
}

use Column::{Int, Json as JsonCol, Real, Text};

// What each call answers and takes; `openapi.rs` documents the API from the same constants.
pub(super) const FLOW_LEVELS: &[&str] =
    &["checkpoint", "checkpoint_direction", "region", "city", "boundary", "bus_lane"];
pub(super) const FLOW_WINDOWS: &[i64] = &[300, 30, 60];
pub(super) const CONGESTION_WINDOWS: &[i64] = &[300, 60];
pub(super) const TOP_N_METRICS: &[&str] = &["checkpoint_flow", "segment_flow"];
pub(super) const ALERT_KINDS: &[&str] = &[
    "cloned_plate",
    "traffic_surge",
    "sudden_congestion",
    "watchlist",
    "device_silent",
    "clock_skew",
    "unreadable_plates",
];
pub(super) const FLOWS: &[Column] =
    &[Text("level"), Text("key_id"), Int("window_s"), Int("window_start"), Int("passes"), Int("revision")];
pub(super) const SEGMENT_CONGESTION: &[Column] = &[
    Text("segment_id"),
    Int("window_s"),
    Int("window_start"),
    Int("traversals"),
    Real("mean_speed_kmh"),
    Real("travel_time_index"),
    Int("congestion_level"),
    Int("revision"),
];
pub(super) const AREA_CONGESTION: &[Column] = &[
    Text("level"),
    Text("key_id"),
    Int("window_s"),
    Int("window_start"),
    Real("mean_speed_kmh"),
    Real("travel_time_index"),
    Int("congestion_level"),
    Int("revision"),
];
pub(super) const TOP_N: &[Column] = &[Int("rank"), Text("key_id"), Int("value")];
pub(super) const ORIGINS: &[Column] = &[
    Text("region_id"),
    Int("window_start"),
    Text("origin_province"),
    Text("origin_city"),
    Text("scope"),
    Int("vehicles"),
];
pub(super) const HIGH_FREQUENCY: &[Column] = &[
    Text("day"),
    Text("checkpoint_id"),
    Text("plate"),
    Int("plate_color"),
    Int("passes"),
    Int("first_ts"),
    Int("last_ts"),
];
pub(super) const ALERTS: &[Column] = &[
    Text("alert_id"),
    Text("kind"),
    Int("ts"),
    Text("plate"),
    Int("plate_color"),
    Text("checkpoint_id"),
    Text("segment_id"),
    Text("severity"),
    JsonCol("details"),
    Text("status"),
    Int("revision"),
    Text("acknowledged_by"),
    Int("acknowledged_at"),
];
/// Alert columns that are null for some alerts (or until acknowledged).
pub(super) const ALERTS_NULLABLE: &[&str] =
    &["plate", "plate_color", "checkpoint_id", "segment_id", "acknowledged_by", "acknowledged_at"];
pub(super) const TRAJECTORIES: &[Column] = &[
    Text("plate"),
    Int("plate_color"),
    Text("day"),
    Int("passes"),
    JsonCol("times"),
    JsonCol("checkpoints"),
    JsonCol("intervals_s"),
];
pub(super) const FIRST_ENTRY: &[Column] =
    &[Text("plate"), Int("plate_color"), Int("ts"), Text("checkpoint_id"), Text("pass_id"), Int("revision")];
pub(super) const VIOLATIONS: &[Column] =
    &[Text("pass_id"), Text("rule_id"), Text("plate"), Int("plate_color"), Text("checkpoint_id"), Int("ts")];
pub(super) const SUMMARY: &[Column] = &[Text("checkpoint_id"), Text("rule_id"), Int("violations"), Int("vehicles")];

pub async fn flows(State(state): State<AppState>, params: Params) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let level = q.one_of("level", FLOW_LEVELS, Some("city"))?.unwrap_or("city");
    let window_s = q.window_s(FLOW_WINDOWS)?;
    let (from, to) = q.range()?;
    let (limit, offset) = q.page()?;
    let mut sql =
        "SELECT CAST(level AS CHAR), CAST(key_id AS CHAR), window_s, window_start, passes, revision FROM flow_counts \
                   WHERE level = ? AND window_s = ? AND window_start >= ? AND window_start < ?"
            .to_owned();
    let mut binds = vec![Bind::Text(level.into()), Bind::Int(window_s), Bind::Int(from), Bind::Int(to)];
    if let Some(key) = q.text("key") {
        sql.push_str(" AND key_id = ?");
        binds.push(Bind::Text(key.into()));
    }
    sql.push_str(" ORDER BY window_start, key_id LIMIT ? OFFSET ?");
    binds.extend([Bind::Int(limit), Bind::Int(offset)]);
    rows(&state, &sql, binds, FLOWS).await
}

pub async fn congestion(
    State(state): State<AppState>,
    Path(level): Path<String>,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let window_s = q.window_s(CONGESTION_WINDOWS)?;
    let (from, to) = q.range()?;
    let (limit, offset) = q.page()?;
    let key = q.text("key").map(str::to_owned);
    let (sql, mut binds, cols): (String, Vec<Bind>, &[Column]) = match level.as_str() {
        "segment" => (
            "SELECT CAST(segment_id AS CHAR), window_s, window_start, traversals, mean_speed_kmh, travel_time_index, \
             congestion_level, revision FROM segment_congestion WHERE window_s = ? AND window_start >= ? AND window_start < ?"
                .into(),
            vec![Bind::Int(window_s), Bind::Int(from), Bind::Int(to)],
            SEGMENT_CONGESTION,
        ),
        "region" | "city" => (
            "SELECT CAST(level AS CHAR), CAST(key_id AS CHAR), window_s, window_start, mean_speed_kmh, travel_time_index, \
             congestion_level, revision FROM area_congestion WHERE level = ? AND window_s = ? AND window_start >= ? AND window_start < ?"
                .into(),
            vec![Bind::Text(level.clone()), Bind::Int(window_s), Bind::Int(from), Bind::Int(to)],
            AREA_CONGESTION,
        ),
        other => return Err(not_found(format!("no congestion level `{other}` (segment, region, city)"))),
    };
    let mut sql = sql;
    if let Some(key) = key {
        sql.push_str(if level == "segment" { " AND segment_id = ?" } else { " AND key_id = ?" });
        binds.push(Bind::Text(key));
    }
    sql.push_str(" ORDER BY window_start LIMIT ? OFFSET ?");
    binds.extend([Bind::Int(limit), Bind::Int(offset)]);
    rows(&state, &sql, binds, cols).await
}

pub async fn top_n(State(state): State<AppState>, params: Params) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let metric = q.one_of("metric", TOP_N_METRICS, Some("checkpoint_flow"))?.unwrap_or("checkpoint_flow");
    let at = q.time("at")?;
    // The window ending at or before `at`, or the latest.
    let end_sql = "SELECT MAX(window_end) FROM top_n WHERE metric = ? AND window_end <= ?";
    let ends = state
        .store
        .query(end_sql, vec![Bind::Text(metric.into()), Bind::Int(at.unwrap_or(i64::MAX))], &[Int("window_end")])
        .await
        .map_err(internal)?;
    let Some(end) = ends.first().and_then(|r| r["window_end"].as_i64()) else {
        return Ok(Json(serde_json::json!({ "metric": metric, "window_end": null, "rows": [] })));
    };
    let sql =
        "SELECT `rank`, CAST(key_id AS CHAR), value FROM top_n WHERE metric = ? AND window_end = ? ORDER BY `rank`";
    let ranked =
        state.store.query(sql, vec![Bind::Text(metric.into()), Bind::Int(end)], TOP_N).await.map_err(internal)?;
    Ok(Json(serde_json::json!({ "metric": metric, "window_end": end, "rows": ranked })))
}

pub async fn origins(State(state): State<AppState>, params: Params) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let (from, to) = q.range()?;
    let (limit, offset) = q.page()?;
    let mut sql =
        "SELECT CAST(region_id AS CHAR), window_start, CAST(origin_province AS CHAR), CAST(origin_city AS CHAR), \
                   CAST(scope AS CHAR), vehicles FROM origin_counts WHERE window_start >= ? AND window_start < ?"
            .to_owned();
    let mut binds = vec![Bind::Int(from), Bind::Int(to)];
    if let Some(region) = q.text("region") {
        sql.push_str(" AND region_id = ?");
        binds.push(Bind::Text(region.into()));
    }
    sql.push_str(" ORDER BY window_start, region_id, vehicles DESC LIMIT ? OFFSET ?");
    binds.extend([Bind::Int(limit), Bind::Int(offset)]);
    rows(&state, &sql, binds, ORIGINS).await
}

fn day(q: &Q) -> Result<String, ApiError> {
    let d = q.text("day").ok_or_else(|| bad("missing_parameter", "`day` (YYYY-MM-DD) is required"))?;
    chrono::NaiveDate::parse_from_str(d, "%Y-%m-%d")
        .map(|d| d.to_string())
        .map_err(|_| bad("bad_parameter", "`day` must be YYYY-MM-DD"))
}

pub async fn high_frequency(
    State(state): State<AppState>,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let day = day(&q)?;
    let (limit, offset) = q.page()?;
    let mut sql = "SELECT CAST(day AS CHAR), CAST(checkpoint_id AS CHAR), CAST(plate AS CHAR), plate_color, passes, first_ts, last_ts \
                   FROM high_frequency WHERE day = ?"
        .to_owned();
    let mut binds = vec![Bind::Text(day)];
    if let Some(cp) = q.text("checkpoint") {
        sql.push_str(" AND checkpoint_id = ?");
        binds.push(Bind::Text(cp.into()));
    }
    sql.push_str(" ORDER BY passes DESC, checkpoint_id, plate LIMIT ? OFFSET ?");
    binds.extend([Bind::Int(limit), Bind::Int(offset)]);
    rows(&state, &sql, binds, HIGH_FREQUENCY).await
}

pub async fn alerts(State(state): State<AppState>, params: Params) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let (from, to) = q.range()?;
    let (limit, offset) = q.page()?;
    let mut sql = "SELECT CAST(alert_id AS CHAR), CAST(kind AS CHAR), ts, CAST(plate AS CHAR), plate_color, CAST(checkpoint_id AS CHAR), \
                   CAST(segment_id AS CHAR), CAST(severity AS CHAR), CAST(details AS CHAR), CAST(status AS CHAR), revision, \
                   CAST(acknowledged_by AS CHAR), acknowledged_at FROM alerts WHERE ts >= ? AND ts < ?"
        .to_owned();
    let mut binds = vec![Bind::Int(from), Bind::Int(to)];
    if let Some(kind) = q.one_of("kind", ALERT_KINDS, None)? {
        sql.push_str(" AND kind = ?");
        binds.push(Bind::Text(kind.into()));
    }
    if let Some(p) = q.text("plate") {
        sql.push_str(" AND plate = ?");
        binds.push(Bind::Text(plate(p)?));
    }
    sql.push_str(" ORDER BY ts DESC, alert_id LIMIT ? OFFSET ?");
    binds.extend([Bind::Int(limit), Bind::Int(offset)]);
    rows(&state, &sql, binds, ALERTS).await
}

#[derive(Deserialize)]
pub struct Acknowledge {
    by: String,
}

pub async fn acknowledge(
    State(state): State<AppState>,
    Path(id): Path<String>,
    body: Result<Json<Acknowledge>, axum::extract::rejection::JsonRejection>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let Json(ack) = body.map_err(|e| match e.status() {
        StatusCode::PAYLOAD_TOO_LARGE => ApiError(e.status(), "body_too_large", e.body_text()),
        _ => bad("bad_request", e.body_text()),
    })?;
    if ack.by.trim().is_empty() || ack.by.chars().count() > 64 {
        return Err(bad("bad_parameter", "`by` is 1 to 64 characters"));
    }
    let now = chrono::Utc::now().timestamp_millis();
    let changed = state
        .store
        .execute(
            "UPDATE alerts SET acknowledged_by = ?, acknowledged_at = ? WHERE alert_id = ?",
            vec![Bind::Text(ack.by.clone()), Bind::Int(now), Bind::Text(id.clone())],
        )
        .await
        .map_err(internal)?;
    if changed == 0 {
        return Err(not_found(format!("no alert `{id}`")));
    }
    Ok(Json(serde_json::json!({ "alert_id": id, "acknowledged_by": ack.by, "acknowledged_at": now })))
}

pub async fn trajectory(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let plate = plate(&raw)?;
    let day = day(&q)?;
    let mut sql = "SELECT CAST(plate AS CHAR), plate_color, CAST(day AS CHAR), passes, CAST(times AS CHAR), \
                   CAST(checkpoints AS CHAR), CAST(intervals_s AS CHAR) FROM trajectories WHERE plate = ? AND day = ?"
        .to_owned();
    let mut binds = vec![Bind::Text(plate.clone()), Bind::Text(day.clone())];
    if let Some(color) = q.int("plate_color")? {
        sql.push_str(" AND plate_color = ?");
        binds.push(Bind::Int(color));
    }
    sql.push_str(" ORDER BY plate_color");
    let found = state.store.query(&sql, binds, TRAJECTORIES).await.map_err(internal)?;
    if found.is_empty() {
        return Err(not_found(format!("no trajectory of `{plate}` on {day}")));
    }
    Ok(Json(serde_json::json!({ "rows": found })))
}

pub async fn first_entry(
    State(state): State<AppState>,
    Path(raw): Path<String>,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let plate = plate(&raw)?;
    let mut sql =
        "SELECT CAST(plate AS CHAR), plate_color, ts, CAST(checkpoint_id AS CHAR), CAST(pass_id AS CHAR), revision \
                   FROM first_entry WHERE plate = ?"
            .to_owned();
    let mut binds = vec![Bind::Text(plate.clone())];
    if let Some(color) = q.int("plate_color")? {
        sql.push_str(" AND plate_color = ?");
        binds.push(Bind::Int(color));
    }
    let found = state.store.query(&sql, binds, FIRST_ENTRY).await.map_err(internal)?;
    if found.is_empty() {
        return Err(not_found(format!("`{plate}` has not entered the city")));
    }
    Ok(Json(serde_json::json!({ "rows": found })))
}

pub async fn restrictions(
    State(state): State<AppState>,
    Path(what): Path<String>,
    params: Params,
) -> Result<Json<serde_json::Value>, ApiError> {
    let q = Q::of(params)?;
    let day = day(&q)?;
    let (limit, offset) = q.page()?;
    let (sql, cols): (&str, &[Column]) = match what.as_str() {
        "violations" => (
            "SELECT CAST(pass_id AS CHAR), CAST(rule_id AS CHAR), CAST(plate AS CHAR), plate_color, CAST(checkpoint_id AS CHAR), ts \
             FROM restriction_violations WHERE day = ? ORDER BY ts, pass_id LIMIT ? OFFSET ?",
            VIOLATIONS,
        ),
        "summary" => (
            "SELECT CAST(checkpoint_id AS CHAR), CAST(rule_id AS CHAR), violations, vehicles FROM restriction_summary \
             WHERE day = ? ORDER BY violations DESC, checkpoint_id LIMIT ? OFFSET ?",
            SUMMARY,
        ),
        other => return Err(not_found(format!("no restriction listing `{other}` (violations, summary)"))),
    };
    rows(&state, sql, vec![Bind::Text(day), Bind::Int(limit), Bind::Int(offset)], cols).await
}

pub async fn reference(
    State(state): State<AppState>,
    Path(what): Path<String>,
) -> Result<Json<serde_json::Value>, ApiError> {
    let city = &state.city;
    let rows: Vec<serde_json::Value> = match what.as_str() {
        "checkpoints" => city
            .checkpoints
            .iter()
            .map(|c| {
                serde_json::json!({
                    "checkpoint_id": &*c.id, "name": &*c.name, "lon": c.lon, "lat": c.lat, "region_id": &*c.region_id,
                    "road_class": c.road_class.as_str(), "boundary": c.boundary,
                    "inbound_direction": c.inbound_direction.map(|d| d.code()), "speed_limit_kmh": c.speed_limit_kmh,
                })
            })
            .collect(),
        "segments" => city
            .segments
            .iter()
            .map(|s| {
                serde_json::json!({
                    "segment_id": &*s.id, "from_checkpoint": &*city.checkpoint(s.from).id, "to_checkpoint": &*city.checkpoint(s.to).id,
                    "length_m": s.length_m, "free_flow_kmh": s.free_flow_kmh, "road_class": s.road_class.as_str(), "region_id": &*s.region_id,
                })
            })
            .collect(),
        "regions" => city.regions.iter().map(|r| serde_json::json!({ "region_id": &*r.id, "name": &*r.name })).collect(),
        other => return Err(not_found(format!("no reference table `{other}` (checkpoints, segments, regions)"))),
    };
    Ok(Json(serde_json::json!({ "rows": rows })))
}
