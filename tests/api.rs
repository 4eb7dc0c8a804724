//! The read API on port 0 over a replayed day, in SQLite and in MySQL: every endpoint answers,
//! and bad input gets a clear 4xx, never a 5xx.

use crate::support::{small_day, TestDatabase};
use passflow::api::{self, AppState};
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::Config;
use passflow::store::Store;
use std::sync::Arc;

const DAY_START: i64 = 1_772_380_800_000; // 2026-03-02 00:00 in Shanghai

async fn serve(url: &str) -> (String, Store) {
    serve_with(url, Vec::new(), std::env::temp_dir().join("passflow-api-audit.log"), 0).await
}

async fn serve_with(
    url: &str,
    tokens: Vec<passflow::config::ApiToken>,
    audit: std::path::PathBuf,
    limit_per_second: u32,
) -> (String, Store) {
    let mut config = Config::default();
    config.city.dir = small_day().to_path_buf();
    let options = ReplayOptions {
        config: config.clone(),
        input: ReplayInput::File(small_day().join("passes.jsonl")),
        store_url: url.to_owned(),
        now_ms: None,
        checkpoint_dir: None,
    };
    replay(options).await.unwrap();
    let (admin, _commands) = tokio::sync::mpsc::channel(1);
    let state = AppState {
        metrics: Arc::new(passflow::metrics::Metrics::new()),
        admin,
        watchlist: passflow::pipelines::WatchList::in_memory(),
        store: Arc::new(Store::open(url).await.unwrap()),
        city: Arc::new(passflow::reference::City::load(small_day()).unwrap()),
        auth: Arc::new(passflow::api::Auth::new(tokens, audit)),
        live_alerts: tokio::sync::broadcast::channel(16).0,
        limits: Arc::new(passflow::api::Limits::new(limit_per_second, vec!["https://ops.example.org".into()])),
        webhooks: None,
    };
    let listener = api::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(api::serve(listener, state));
    // Keep the channel's receiver alive for the test's length.
    std::mem::forget(_commands);
    (format!("http://{addr}"), Store::open(url).await.unwrap())
}

/// A GET; every answer of a documented call is held against the OpenAPI document.
async fn get(base: &str, path: &str) -> (u16, serde_json::Value) {
    let r = reqwest::get(format!("{base}{path}")).await.unwrap();
    let status = r.status().as_u16();
    let body = r.json().await.unwrap_or(serde_json::Value::Null);
    let described = path.starts_with("/api/v1/openapi.json") || path.starts_with("/api/v1/docs");
    if path.starts_with("/api/v1/") && !described && status != 401 && status != 403 {
        let doc: serde_json::Value =
            reqwest::get(format!("{base}/api/v1/openapi.json")).await.unwrap().json().await.unwrap();
        conforms_to_document(&doc, "get", path, status, &body);
    }
    (status, body)
}

/// The response `body` with `status` of `method path` is what the document says it is.
fn conforms_to_document(doc: &serde_json::Value, method: &str, path: &str, status: u16, body: &serde_json::Value) {
    let bare = path.split('?').next().unwrap();
    let segments: Vec<&str> = bare.split('/').collect();
    let template = doc["paths"].as_object().unwrap().keys().find(|t| {
        let ts: Vec<&str> = t.split('/').collect();
        ts.len() == segments.len() && ts.iter().zip(&segments).all(|(t, s)| t.starts_with('{') || t == s)
    });
    let Some(template) = template else {
        assert_eq!(status, 404, "{path} is not in the OpenAPI document");
        return;
    };
    let response = &doc["paths"][template][method]["responses"][status.to_string()];
    assert!(response.is_object(), "{method} {template} answered {status}, which the document does not list: {body}");
    let schema = &response["content"]["application/json"]["schema"];
    if let Err(e) = matches_schema(doc, schema, body, "$") {
        panic!("{method} {path} ({status}) does not match the document: {e}\n{body}");
    }
}

/// A small JSON-schema check: type, enum, required, properties, additionalProperties, items,
/// oneOf, $ref.
fn matches_schema(
    doc: &serde_json::Value,
    schema: &serde_json::Value,
    v: &serde_json::Value,
    at: &str,
) -> Result<(), String> {
    use serde_json::Value;
    if let Some(r) = schema["$ref"].as_str() {
        let name = r.trim_start_matches("#/components/schemas/");
        return matches_schema(doc, &doc["components"]["schemas"][name], v, at);
    }
    if let Some(options) = schema["oneOf"].as_array() {
        let fits = options.iter().filter(|o| matches_schema(doc, o, v, at).is_ok()).count();
        return if fits == 1 { Ok(()) } else { Err(format!("{at}: fits {fits} of the oneOf shapes")) };
    }
    let types: Vec<&str> = match &schema["type"] {
        Value::String(t) => vec![t.as_str()],
        Value::Array(ts) => ts.iter().filter_map(Value::as_str).collect(),
        _ => vec![],
    };
    let type_ok = types.is_empty()
        || types.iter().any(|t| match *t {
            "null" => v.is_null(),
            "integer" => v.is_i64() || v.is_u64(),
            "number" => v.is_number(),
            "string" => v.is_string(),
            "boolean" => v.is_boolean(),
            "array" => v.is_array(),
            "object" => v.is_object(),
            _ => false,
        });
    if !type_ok {
        return Err(format!("{at}: {v} is not {types:?}"));
    }
    if let Some(allowed) = schema["enum"].as_array() {
        if !allowed.contains(v) {
            return Err(format!("{at}: {v} is not one of {allowed:?}"));
        }
    }
    if let Value::Object(o) = v {
        for name in schema["required"].as_array().into_iter().flatten() {
            if !o.contains_key(name.as_str().unwrap()) {
                return Err(format!("{at}: `{name}` is missing"));
            }
        }
        for (k, field) in o {
            match schema["properties"].get(k) {
                Some(s) => matches_schema(doc, s, field, &format!("{at}.{k}"))?,
                None if schema["additionalProperties"] == false => {
                    return Err(format!("{at}: `{k}` is not documented"))
                }
                None => {}
            }
        }
    }
    if let (Value::Array(items), Some(item)) = (v, schema.get("items")) {
        for (i, x) in items.iter().enumerate() {
            matches_schema(doc, item, x, &format!("{at}[{i}]"))?;
        }
    }
    Ok(())
}

async fn exercise(base: &str, store: &Store) {
    let day = format!("from={DAY_START}&to={}", DAY_START + 86_400_000);
    let rows = |v: &serde_json::Value| v["rows"].as_array().map_or(0, Vec::len);
    let (status, body) = get(base, &format!("/api/v1/flows?level=city&window_s=300&{day}&limit=1000")).await;
    assert_eq!(status, 200, "{body}");
    let stored = store
        .flow_counts()
        .await
        .unwrap()
        .into_iter()
        .filter(|r| r.0 == "city" && r.2 == 300 && (DAY_START..DAY_START + 86_400_000).contains(&r.3))
        .count();
    assert!(stored > 250);
    assert_eq!(rows(&body), stored, "every city row of the day");
    let (_, body) = get(base, &format!("/api/v1/flows?level=checkpoint&key=KK0001&window_s=60&{day}&limit=5")).await;
    assert_eq!(rows(&body), 5);
    assert_eq!(body["rows"][0]["key_id"], "KK0001");
    for (path, status) in [
        (format!("/api/v1/flows?level=galaxy&{day}"), 400),
        (format!("/api/v1/flows?window_s=abc&{day}"), 400),
        (format!("/api/v1/flows?window_s=7&{day}"), 400),
        (format!("/api/v1/flows?from={}&to={DAY_START}", DAY_START + 1), 400),
        (format!("/api/v1/flows?from=0&to={DAY_START}"), 400),
        (format!("/api/v1/flows?{day}&limit=5000"), 400),
        (format!("/api/v1/flows?{day}&offset=-1"), 400),
        ("/api/v1/flows?from=yesterday".to_owned(), 400),
        (format!("/api/v1/congestion/planet?{day}"), 404),
        ("/api/v1/high-frequency".to_owned(), 400),
        ("/api/v1/high-frequency?day=2026-13-40".to_owned(), 400),
        (format!("/api/v1/alerts?kind=ufo&{day}"), 400),
        (format!("/api/v1/alerts?plate=not-a-plate&{day}"), 400),
        ("/api/v1/trajectories/赣A12345".to_owned(), 400),
        ("/api/v1/trajectories/xyz?day=2026-03-02".to_owned(), 400),
        ("/api/v1/trajectories/赣Z99999?day=2026-03-02".to_owned(), 404),
        ("/api/v1/first-entry/%20".to_owned(), 400),
        ("/api/v1/restrictions/everything?day=2026-03-02".to_owned(), 404),
        ("/api/v1/reference/stars".to_owned(), 404),
        ("/api/v1/nothing".to_owned(), 404),
        // No pipeline runs beside this API: not ready, and it says why.
        ("/readyz".to_owned(), 503),
    ] {
        let (got, body) = get(base, &path).await;
        assert_eq!(got, status, "{path}: {body}");
        if path == "/readyz" {
            assert_eq!(body["checks"]["store"], "ok");
            assert_eq!(body["checks"]["pipeline"], "not ready");
        }
        if status == 400 {
            assert!(body["error"].is_string() && body["message"].is_string(), "{path}: {body}");
        }
    }
    for level in ["segment", "region", "city"] {
        let (status, body) = get(base, &format!("/api/v1/congestion/{level}?window_s=300&{day}&limit=1000")).await;
        assert_eq!(status, 200, "{level}: {body}");
        assert!(rows(&body) > 0, "{level}");
    }
    for metric in ["checkpoint_flow", "segment_flow"] {
        let (status, body) =
            get(base, &format!("/api/v1/top-n?metric={metric}&at={}", DAY_START + 12 * 3_600_000)).await;
        assert_eq!(status, 200);
        assert!(body["window_end"].as_i64().unwrap() <= DAY_START + 12 * 3_600_000);
        assert!((1..=10).contains(&rows(&body)), "{metric}: {body}");
    }
    let (_, body) = get(base, &format!("/api/v1/origins?{day}")).await;
    assert_eq!(rows(&body), 100, "a full default page");
    let (_, body) = get(base, "/api/v1/high-frequency?day=2026-03-02").await;
    assert!(rows(&body) > 0);
    let (_, body) = get(base, &format!("/api/v1/alerts?kind=cloned_plate&{day}")).await;
    assert!(rows(&body) > 0);
    let alert = body["rows"][0].clone();
    assert!(alert["details"]["passes"].is_array(), "details are JSON: {alert}");
    let client = reqwest::Client::new();
    let doc: serde_json::Value = get(base, "/api/v1/openapi.json").await.1;
    let ack = |id: String, body: &'static str| {
        let (client, doc) = (client.clone(), doc.clone());
        let path = format!("/api/v1/alerts/{id}/ack");
        let url = format!("{base}{path}");
        async move {
            let r = client.post(url).header("content-type", "application/json").body(body).send().await.unwrap();
            let status = r.status().as_u16();
            conforms_to_document(&doc, "post", &path, status, &r.json().await.unwrap());
            status
        }
    };
    assert_eq!(ack(alert["alert_id"].as_str().unwrap().to_owned(), r#"{"by":"desk-7"}"#).await, 200);
    assert_eq!(ack("nope".into(), r#"{"by":"desk-7"}"#).await, 404);
    assert_eq!(ack("nope".into(), r#"{"by":3}"#).await, 400);
    let plate = alert["plate"].as_str().unwrap().to_owned();
    let (_, body) = get(base, &format!("/api/v1/alerts?plate={plate}&{day}")).await;
    assert!(body["rows"].as_array().unwrap().iter().any(|a| a["acknowledged_by"] == "desk-7"));
    let (plate, _, _, times, _, _) = store.trajectories().await.unwrap().into_iter().next().unwrap();
    let (status, body) = get(base, &format!("/api/v1/trajectories/{plate}?day=2026-03-02")).await;
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["rows"][0]["times"], serde_json::from_str::<serde_json::Value>(&times).unwrap());
    let (entered, ..) = store.first_entries().await.unwrap().into_iter().next().unwrap();
    let (status, body) = get(base, &format!("/api/v1/first-entry/{entered}")).await;
    assert_eq!(status, 200, "{body}");
    for what in ["violations", "summary"] {
        let (status, body) = get(base, &format!("/api/v1/restrictions/{what}?day=2026-03-02")).await;
        assert_eq!(status, 200);
        assert!(rows(&body) > 0, "{what}");
    }
    let (_, body) = get(base, "/api/v1/reference/checkpoints").await;
    assert_eq!(rows(&body), 108);
    let (_, body) = get(base, "/api/v1/reference/segments").await;
    assert!(rows(&body) > 100);
}

#[tokio::test(flavor = "multi_thread")]
async fn the_openapi_document_lists_every_route_with_its_role_and_the_docs_page_is_served() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve(&format!("sqlite://{}", dir.path().join("api.db").display())).await;
    let (status, doc) = get(&base, "/api/v1/openapi.json").await;
    assert_eq!(status, 200);
    assert_eq!(doc["openapi"], "3.1.0");
    let paths = doc["paths"].as_object().unwrap();
    // Every route the router serves under /api/v1 (but the description itself) is documented.
    let routes = include_str!("../src/api/mod.rs")
        .lines()
        .filter_map(|l| l.trim().strip_prefix(".route(\"/api/v1/"))
        .map(|l| format!("/api/v1/{}", l.split('"').next().unwrap()))
        .filter(|r| r != "/api/v1/openapi.json" && r != "/api/v1/docs")
        .collect::<Vec<_>>();
    assert!(routes.len() >= 15, "{routes:?}");
    for route in &routes {
        assert!(paths.contains_key(route), "{route} is not documented");
    }
    assert_eq!(paths.len(), routes.len(), "documented paths that are not routes");
    assert_eq!(paths["/api/v1/trajectories/{plate}"]["get"]["x-passflow-role"], "analyst");
    assert_eq!(paths["/api/v1/flows"]["get"]["x-passflow-role"], "viewer");
    assert_eq!(paths["/api/v1/admin/watchlist"]["post"]["x-passflow-role"], "admin");
    let levels = &paths["/api/v1/flows"]["get"]["parameters"][0]["schema"]["enum"];
    assert!(levels.as_array().unwrap().contains(&"checkpoint_direction".into()), "{levels}");
    let page = reqwest::get(format!("{base}/api/v1/docs")).await.unwrap().text().await.unwrap();
    assert!(page.contains("/api/v1/openapi.json"));
}

#[tokio::test(flavor = "multi_thread")]
async fn the_read_api_over_sqlite_answers_every_endpoint_and_rejects_bad_input() {
    let dir = tempfile::tempdir().unwrap();
    let (base, store) = serve(&format!("sqlite://{}", dir.path().join("api.db").display())).await;
    exercise(&base, &store).await;
}

#[tokio::test(flavor = "multi_thread")]
async fn the_read_api_over_mysql_answers_every_endpoint_and_rejects_bad_input() {
    let db = TestDatabase::create("api").await;
    let (base, store) = serve(&db.url).await;
    exercise(&base, &store).await;
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn tokens_gate_each_call_by_role_and_every_plate_look_up_is_audited() {
    use passflow::config::{ApiToken, Role};
    let dir = tempfile::tempdir().unwrap();
    let token = |token: &str, role| ApiToken { token: token.into(), name: format!("{role:?}-client"), role };
    let tokens = vec![token("v-token", Role::Viewer), token("a-token", Role::Analyst), token("x-token", Role::Admin)];
    let audit = dir.path().join("audit.log");
    let (base, store) =
        serve_with(&format!("sqlite://{}", dir.path().join("api.db").display()), tokens, audit.clone(), 0).await;
    let (plate, ..) = store.trajectories().await.unwrap().into_iter().next().unwrap();
    let client = reqwest::Client::new();
    let call = |method: reqwest::Method, path: String, token: Option<&'static str>| {
        let mut r = client.request(method, format!("{base}{path}"));
        if let Some(t) = token {
            r = r.bearer_auth(t);
        }
        async move { r.send().await.unwrap().status().as_u16() }
    };
    use reqwest::Method;
    let flows = "/api/v1/flows".to_owned();
    let look_up = format!("/api/v1/trajectories/{plate}?day=2026-03-02");
    assert_eq!(call(Method::GET, flows.clone(), None).await, 401);
    assert_eq!(call(Method::GET, flows.clone(), Some("wrong")).await, 401);
    assert_eq!(call(Method::GET, flows.clone(), Some("v-token")).await, 200);
    assert_eq!(call(Method::GET, look_up.clone(), Some("v-token")).await, 403);
    assert_eq!(call(Method::GET, look_up.clone(), Some("a-token")).await, 200);
    assert_eq!(call(Method::GET, "/api/v1/admin/watchlist".into(), Some("a-token")).await, 403);
    assert_eq!(call(Method::GET, "/api/v1/admin/watchlist".into(), Some("x-token")).await, 200);
    assert_eq!(call(Method::GET, "/healthz".into(), None).await, 200);
    let lines: Vec<serde_json::Value> =
        std::fs::read_to_string(&audit).unwrap().lines().map(|l| serde_json::from_str(l).unwrap()).collect();
    assert_eq!(lines.len(), 2, "the analyst's look-up and the admin's listing: {lines:?}");
    assert_eq!(lines[0]["who"], "Analyst-client");
    assert!(lines[0]["path"].as_str().unwrap().contains("/api/v1/trajectories/"));
    assert!(lines[0]["ts"].as_i64().unwrap() > 0);
}

#[tokio::test(flavor = "multi_thread")]
async fn bodies_rates_and_origins_are_limited_and_latency_is_measured() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = serve_with(
        &format!("sqlite://{}", dir.path().join("api.db").display()),
        Vec::new(),
        dir.path().join("a.log"),
        20,
    )
    .await;
    let client = reqwest::Client::new();
    // A body over 64 KiB is refused.
    let huge = format!(r#"{{"by":"{}"}}"#, "x".repeat(70_000));
    let r = client
        .post(format!("{base}/api/v1/alerts/x/ack"))
        .header("content-type", "application/json")
        .body(huge)
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 413);
    // An allowed origin gets CORS headers (and a preflight answer); another does not.
    let r = client
        .get(format!("{base}/api/v1/reference/regions"))
        .header("origin", "https://ops.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(r.headers()["access-control-allow-origin"], "https://ops.example.org");
    let r = client
        .request(reqwest::Method::OPTIONS, format!("{base}/api/v1/flows"))
        .header("origin", "https://ops.example.org")
        .send()
        .await
        .unwrap();
    assert_eq!(r.status().as_u16(), 204);
    let r = client
        .get(format!("{base}/api/v1/reference/regions"))
        .header("origin", "https://evil.example")
        .send()
        .await
        .unwrap();
    assert!(r.headers().get("access-control-allow-origin").is_none());
    // 20 requests per second with bursts of 40: a quick run of 100 meets 429s.
    let mut limited = 0;
    for _ in 0..100 {
        if client.get(format!("{base}/healthz")).send().await.unwrap().status().as_u16() == 429 {
            limited += 1;
        }
    }
    assert!(limited >= 40, "{limited} of 100 limited");
    tokio::time::sleep(std::time::Duration::from_millis(500)).await;
    assert_eq!(
        client.get(format!("{base}/healthz")).send().await.unwrap().status().as_u16(),
        200,
        "the bucket refills"
    );
    let metrics = client.get(format!("{base}/metrics")).send().await.unwrap().text().await.unwrap();
    assert!(
        metrics.contains(r#"passflow_http_request_duration_seconds_count{route="/api/v1/reference/{what}"}"#),
        "{metrics}"
    );
}
