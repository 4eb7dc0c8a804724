//! The OpenAPI 3.1 document at `/api/v1/openapi.json` and the interactive page at
//! `/api/v1/docs` (one self-contained HTML file that reads the document and sends requests).
//!
//! The document is built from the code that serves the calls: response rows from the same
//! column lists the queries read ([`super::query`]), allowed values from the same constants
//! the handlers check, roles from [`super::required_role`]. A test holds every real response
//! of the API against it.

use super::query::{self, DEFAULT_LIMIT, MAX_LIMIT};
use crate::store::Column;
use axum::response::{Html, IntoResponse};
use axum::Json;
use serde_json::{json, Map, Value};

pub async fn document() -> impl IntoResponse {
    Json(openapi())
}

pub async fn docs_page() -> impl IntoResponse {
    Html(include_str!("docs.html"))
}

/// One parameter of a call.
#[derive(Clone)]
struct Param {
    name: &'static str,
    path: bool,
    required: bool,
    schema: Value,
    doc: &'static str,
}

fn query(name: &'static str, schema: Value, doc: &'static str) -> Param {
    Param { name, path: false, required: false, schema, doc }
}

fn required(name: &'static str, schema: Value, doc: &'static str) -> Param {
    Param { name, path: false, required: true, schema, doc }
}

fn in_path(name: &'static str, schema: Value, doc: &'static str) -> Param {
    Param { name, path: true, required: true, schema, doc }
}

fn range() -> Vec<Param> {
    let time = json!({ "type": "string", "description": "epoch milliseconds or RFC 3339" });
    vec![
        query("from", time.clone(), "start of the range (default: an hour before `to`); ranges are at most 7 days"),
        query("to", time, "end of the range, exclusive (default: now)"),
    ]
}

fn page() -> Vec<Param> {
    vec![
        query(
            "limit",
            json!({ "type": "integer", "minimum": 1, "maximum": MAX_LIMIT, "default": DEFAULT_LIMIT }),
            "rows per page",
        ),
        query("offset", json!({ "type": "integer", "minimum": 0, "default": 0 }), "rows to skip"),
    ]
}

fn one_of(values: &[&str]) -> Value {
    json!({ "type": "string", "enum": values })
}

fn plate() -> Value {
    json!({ "type": "string", "description": "a readable plate, e.g. 赣A12345" })
}

fn day() -> Param {
    required("day", json!({ "type": "string", "format": "date" }), "local day, YYYY-MM-DD")
}

fn nullable(schema: Value, yes: bool) -> Value {
    match (yes, schema) {
        (true, Value::Object(mut o)) => {
            let t = o.remove("type").unwrap_or(Value::Null);
            o.insert("type".into(), json!([t, "null"]));
            Value::Object(o)
        }
        (_, s) => s,
    }
}

fn column(c: &Column, nullable_names: &[&str]) -> (String, Value) {
    let (name, schema) = match c {
        Column::Int(n) => (*n, json!({ "type": "integer" })),
        Column::Real(n) => (*n, json!({ "type": "number" })),
        Column::Text(n) => (*n, json!({ "type": "string" })),
        Column::Json(n) if *n == "details" => (*n, json!({ "type": "object" })),
        Column::Json(n) => (*n, json!({ "type": "array" })),
    };
    (name.to_owned(), nullable(schema, nullable_names.contains(&name)))
}

/// A closed object: every named property required, nothing else allowed.
fn object(properties: Vec<(String, Value)>) -> Value {
    let names: Vec<&String> = properties.iter().map(|(n, _)| n).collect();
    let required = json!(names);
    json!({
        "type": "object",
        "additionalProperties": false,
        "required": required,
        "properties": properties.into_iter().collect::<Map<String, Value>>(),
    })
}

fn fields(list: &[(&str, Value)]) -> Value {
    object(list.iter().map(|(n, s)| ((*n).to_owned(), s.clone())).collect())
}

fn row(columns: &[Column], nullable_names: &[&str]) -> Value {
    object(columns.iter().map(|c| column(c, nullable_names)).collect())
}

/// `{"rows": [row, …]}`; several row shapes are alternatives.
fn rows(shapes: Vec<Value>) -> Value {
    let items =
        if shapes.len() == 1 { shapes.into_iter().next().expect("one shape") } else { json!({ "oneOf": shapes }) };
    object(vec![("rows".into(), json!({ "type": "array", "items": items }))])
}

struct Call {
    method: &'static str,
    path: &'static str,
    summary: &'static str,
    params: Vec<Param>,
    body: Option<Value>,
    /// Status and schema of the success answer.
    ok: (u16, Value),
    /// Whether an unknown id or value in the path is a 404.
    not_found: bool,
}

fn get(path: &'static str, summary: &'static str, params: Vec<Param>, ok: Value) -> Call {
    Call { method: "get", path, summary, params, body: None, ok: (200, ok), not_found: false }
}

fn calls() -> Vec<Call> {
    let int = || json!({ "type": "integer" });
    let string = || json!({ "type": "string" });
    let number = || json!({ "type": "number" });
    let watch_entry = fields(&[
        ("plate", plate()),
        ("plate_color", json!({ "type": ["integer", "null"], "minimum": 0, "maximum": 255 })),
        ("reason", string()),
        ("severity", string()),
    ]);
    let level = query("level", one_of(query::FLOW_LEVELS), "aggregation level (default city)");
    let flow_window =
        query("window_s", json!({ "type": "integer", "enum": query::FLOW_WINDOWS }), "window size (default 300)");
    let congestion_window =
        query("window_s", json!({ "type": "integer", "enum": query::CONGESTION_WINDOWS }), "window size (default 300)");
    let plate_color = query("plate_color", int(), "plate colour code (default: every colour)");
    vec![
        get(
            "/api/v1/flows",
            "Flow counts per window",
            [vec![level, flow_window, query("key", string(), "one checkpoint, region, … id")], range(), page()]
                .concat(),
            rows(vec![row(query::FLOWS, &[])]),
        ),
        Call {
            not_found: true,
            ..get(
                "/api/v1/congestion/{level}",
                "Congestion per segment, region or the city",
                [
                    vec![
                        in_path("level", one_of(&["segment", "region", "city"]), "what is measured"),
                        congestion_window,
                        query("key", string(), "one segment or region id"),
                    ],
                    range(),
                    page(),
                ]
                .concat(),
                rows(vec![row(query::SEGMENT_CONGESTION, &[]), row(query::AREA_CONGESTION, &[])]),
            )
        },
        get(
            "/api/v1/top-n",
            "The Top-N ranking ending at or before a time (default: the latest)",
            vec![
                query("metric", one_of(query::TOP_N_METRICS), "what is ranked (default checkpoint_flow)"),
                query("at", string(), "epoch milliseconds or RFC 3339"),
            ],
            object(vec![
                ("metric".into(), string()),
                ("window_end".into(), json!({ "type": ["integer", "null"] })),
                ("rows".into(), json!({ "type": "array", "items": row(query::TOP_N, &[]) })),
            ]),
        ),
        get(
            "/api/v1/origins",
            "Where the vehicles on the road come from, per region and window",
            [vec![query("region", string(), "one region id")], range(), page()].concat(),
            rows(vec![row(query::ORIGINS, &[])]),
        ),
        get(
            "/api/v1/high-frequency",
            "High-frequency vehicles of a day",
            [vec![day(), query("checkpoint", string(), "one checkpoint id")], page()].concat(),
            rows(vec![row(query::HIGH_FREQUENCY, &[])]),
        ),
        get(
            "/api/v1/alerts",
            "Alerts, newest first",
            [
                vec![
                    query("kind", one_of(query::ALERT_KINDS), "one kind of alert"),
                    query("plate", plate(), "alerts naming this plate"),
                ],
                range(),
                page(),
            ]
            .concat(),
            rows(vec![row(query::ALERTS, query::ALERTS_NULLABLE)]),
        ),
        Call {
            method: "get",
            path: "/api/v1/alerts/stream",
            summary: "Alerts as they are raised (Server-Sent Events, one `alert` event each)",
            params: vec![query("kind", string(), "comma-separated kinds (default: every kind)")],
            body: None,
            ok: (200, json!({ "type": "string", "contentMediaType": "text/event-stream" })),
            not_found: false,
        },
        Call {
            method: "post",
            path: "/api/v1/alerts/{id}/ack",
            summary: "Acknowledge an alert",
            params: vec![in_path("id", string(), "the alert id")],
            body: Some(fields(&[("by", json!({ "type": "string", "minLength": 1, "maxLength": 64 }))])),
            ok: (200, fields(&[("alert_id", string()), ("acknowledged_by", string()), ("acknowledged_at", int())])),
            not_found: true,
        },
        Call {
            not_found: true,
            ..get(
                "/api/v1/trajectories/{plate}",
                "A vehicle's trajectory of a day",
                vec![in_path("plate", plate(), "the plate"), day(), plate_color],
                rows(vec![row(query::TRAJECTORIES, &[])]),
            )
        },
        Call {
            not_found: true,
            ..get(
                "/api/v1/first-entry/{plate}",
                "A vehicle's first entry into the city",
                vec![
                    in_path("plate", plate(), "the plate"),
                    query("plate_color", int(), "plate colour code (default: every colour)"),
                ],
                rows(vec![row(query::FIRST_ENTRY, &[])]),
            )
        },
        Call {
            not_found: true,
            ..get(
                "/api/v1/restrictions/{what}",
                "Restriction violations or daily summaries",
                [vec![in_path("what", one_of(&["violations", "summary"]), "which listing"), day()], page()].concat(),
                rows(vec![row(query::VIOLATIONS, &[]), row(query::SUMMARY, &[])]),
            )
        },
        Call {
            not_found: true,
            ..get(
                "/api/v1/reference/{what}",
                "The city's reference data",
                vec![in_path("what", one_of(&["checkpoints", "segments", "regions"]), "which table")],
                rows(vec![
                    fields(&[
                        ("checkpoint_id", string()),
                        ("name", string()),
                        ("lon", number()),
                        ("lat", number()),
                        ("region_id", string()),
                        ("road_class", string()),
                        ("boundary", json!({ "type": "boolean" })),
                        ("inbound_direction", json!({ "type": ["integer", "null"] })),
                        ("speed_limit_kmh", number()),
                    ]),
                    fields(&[
                        ("segment_id", string()),
                        ("from_checkpoint", string()),
                        ("to_checkpoint", string()),
                        ("length_m", number()),
                        ("free_flow_kmh", number()),
                        ("road_class", string()),
                        ("region_id", string()),
                    ]),
                    fields(&[("region_id", string()), ("name", string())]),
                ]),
            )
        },
        get(
            "/api/v1/admin/watchlist",
            "The watch list",
            vec![],
            object(vec![("entries".into(), json!({ "type": "array", "items": watch_entry.clone() }))]),
        ),
        Call {
            method: "post",
            path: "/api/v1/admin/watchlist",
            summary: "Add or replace a watch-list entry",
            params: vec![],
            body: Some(watch_entry.clone()),
            ok: (201, watch_entry),
            not_found: false,
        },
        Call {
            method: "delete",
            path: "/api/v1/admin/watchlist/{plate}",
            summary: "Remove a plate from the watch list",
            params: vec![in_path("plate", plate(), "the plate"), query("plate_color", int(), "only this colour")],
            body: None,
            ok: (200, fields(&[("removed", int())])),
            not_found: true,
        },
        Call {
            method: "post",
            path: "/api/v1/admin/savepoint",
            summary: "Take a checkpoint and export it as a savepoint",
            params: vec![],
            body: Some(fields(&[("to", json!({ "type": "string", "description": "an absolute directory" }))])),
            ok: (200, fields(&[("checkpoint_id", int()), ("to", string())])),
            not_found: false,
        },
        Call {
            method: "post",
            path: "/api/v1/admin/webhooks/redrive",
            summary: "Send dead-lettered webhook deliveries again, of one endpoint or of all",
            params: vec![],
            body: Some(json!({
                "type": "object",
                "additionalProperties": false,
                "properties": {
                    "endpoint": { "type": "string", "description": "the endpoint's name; left out: every endpoint" },
                },
            })),
            ok: (200, fields(&[("redriven", int())])),
            not_found: true,
        },
    ]
}

fn error_response(description: &str) -> Value {
    json!({
        "description": description,
        "content": { "application/json": { "schema": { "$ref": "#/components/schemas/Error" } } },
    })
}

/// The whole document.
pub fn openapi() -> Value {
    let mut paths = Map::new();
    for call in calls() {
        let params: Vec<Value> = call
            .params
            .iter()
            .map(|p| {
                json!({
                    "name": p.name, "in": if p.path { "path" } else { "query" }, "required": p.required,
                    "description": p.doc, "schema": p.schema,
                })
            })
            .collect();
        let media = if call.path.ends_with("/stream") { "text/event-stream" } else { "application/json" };
        let mut responses = Map::new();
        responses.insert(
            call.ok.0.to_string(),
            json!({ "description": "success", "content": { media: { "schema": call.ok.1 } } }),
        );
        responses.insert("400".into(), error_response("bad input: `error` is a stable code, `message` says why"));
        if call.not_found {
            responses.insert("404".into(), error_response("no such id, plate or listing"));
        }
        responses.insert("429".into(), error_response("too many requests from this client"));
        responses.insert("503".into(), error_response("the result store or the pipeline is unavailable"));
        let example_path = call.path.replace("{level}", "city").replace("{what}", "x").replace("{plate}", "x");
        let role = super::required_role(&example_path);
        let mut operation = json!({
            "summary": call.summary,
            "operationId": format!("{}{}", call.method, call.path.replace(['/', '{', '}', '-'], "_")),
            "parameters": params,
            "responses": responses,
        });
        if let Some(role) = role {
            operation["security"] = json!([{ "bearer": [] }]);
            operation["x-passflow-role"] = json!(format!("{role:?}").to_lowercase());
            operation["responses"]["401"] =
                error_response("a valid bearer token is required (when tokens are configured)");
            operation["responses"]["403"] = error_response(&format!("the token's role is below {role:?}"));
        }
        if let Some(body) = call.body {
            operation["requestBody"] =
                json!({ "required": true, "content": { "application/json": { "schema": body } } });
            operation["responses"]["413"] = error_response("the body is over 64 KiB");
        }
        let entry = paths.entry(call.path).or_insert_with(|| json!({}));
        entry[call.method] = operation;
    }
    json!({
        "openapi": "3.1.0",
        "info": {
            "title": "passflow",
            "version": env!("CARGO_PKG_VERSION"),
            "description": "Road-traffic checkpoint results: flows, congestion, Top-N, origins, high-frequency \
                            vehicles, alerts, trajectories, first entries, restriction violations and reference data.",
        },
        "paths": paths,
        "components": {
            "schemas": {
                "Error": fields(&[("error", json!({ "type": "string" })), ("message", json!({ "type": "string" }))]),
            },
            "securitySchemes": { "bearer": { "type": "http", "scheme": "bearer" } },
        },
    })
}
