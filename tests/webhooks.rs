//! Alert webhooks against a local HTTP receiver that fails, goes away and comes back.

use axum::http::{HeaderMap, StatusCode};
use passflow::metrics::Metrics;
use passflow::results::AlertRow;
use passflow::webhooks::{signature, EndpointConfig, QueueCounts, WebhookConfig, Webhooks};
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

const SECRET: &str = "s3cret";

#[derive(Clone, Default)]
struct Receiver {
    healthy: Arc<AtomicBool>,
    /// (alert id, revision, signature verified, body)
    received: Arc<Mutex<Vec<(String, String, bool, serde_json::Value)>>>,
}

async fn receive(
    axum::extract::State(r): axum::extract::State<Receiver>,
    headers: HeaderMap,
    body: String,
) -> StatusCode {
    if !r.healthy.load(Ordering::SeqCst) {
        return StatusCode::SERVICE_UNAVAILABLE;
    }
    let header = |name: &str| headers.get(name).and_then(|v| v.to_str().ok()).unwrap_or("").to_owned();
    let ts: i64 = header("x-passflow-timestamp").parse().unwrap_or(0);
    let verified = header("x-passflow-signature") == signature(SECRET, ts, &body);
    let json = serde_json::from_str(&body).unwrap_or(serde_json::Value::Null);
    r.received.lock().unwrap().push((header("x-passflow-alert-id"), header("idempotency-key"), verified, json));
    StatusCode::OK
}

/// Serves the receiver on `addr` until the returned handle is aborted.
async fn serve(receiver: Receiver, addr: SocketAddr) -> (SocketAddr, tokio::task::JoinHandle<()>) {
    let listener = tokio::net::TcpListener::bind(addr).await.unwrap();
    let addr = listener.local_addr().unwrap();
    let app = axum::Router::new().route("/hook", axum::routing::post(receive)).with_state(receiver);
    (addr, tokio::spawn(async move { axum::serve(listener, app).await.unwrap() }))
}

/// A folder for the queue and a receiver that answers every request, served.
async fn healthy_receiver() -> (tempfile::TempDir, Receiver, SocketAddr, tokio::task::JoinHandle<()>) {
    let receiver = Receiver { healthy: Arc::new(AtomicBool::new(true)), ..Receiver::default() };
    let (addr, server) = serve(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    (tempfile::tempdir().unwrap(), receiver, addr, server)
}

fn alert(id: &str, kind: &'static str, plate: &str, ts: i64) -> AlertRow {
    AlertRow {
        alert_id: id.into(),
        kind,
        ts,
        plate: Some(plate.into()),
        plate_color: Some(2),
        checkpoint_id: Some("KK0001".into()),
        segment_id: None,
        severity: "high",
        details: r#"{"n":1}"#.into(),
        status: "active",
        revision: 0,
    }
}

fn config_for(dir: &std::path::Path, addr: SocketAddr, give_up_s: u64) -> WebhookConfig {
    WebhookConfig {
        queue: dir.join("webhooks.db"),
        give_up_after: passflow::config::HumanDuration::from_secs(give_up_s),
        keep_delivered: passflow::config::HumanDuration::from_secs(3600),
        keep_dead: passflow::config::HumanDuration::from_secs(2 * 3600),
        endpoints: vec![EndpointConfig {
            name: "desk".into(),
            url: format!("http://{addr}/hook"),
            secret: SECRET.into(),
            kinds: vec!["cloned_plate".into(), "traffic_surge".into()],
            per_minute: 0,
        }],
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn every_alert_reaches_a_receiver_that_fails_goes_away_and_recovers_across_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let (addr, server) = serve(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let metrics = Metrics::new();
    let hooks = Webhooks::open(&config_for(dir.path(), addr, 3600), &metrics).await.unwrap();
    let t0 = chrono::Utc::now().timestamp_millis();
    let alerts = vec![
        alert("traffic_surge-1", "traffic_surge", "", t0),
        alert("traffic_surge-2", "traffic_surge", "", t0),
        // Two pairs of one vehicle in one hour: one notification listing both.
        alert("cloned_plate-a", "cloned_plate", "赣A12345", 3_600_000 * 100 + 10),
        alert("cloned_plate-b", "cloned_plate", "赣A12345", 3_600_000 * 100 + 20),
        // Not a kind this endpoint takes.
        alert("watchlist-1", "watchlist", "赣A1", t0),
    ];
    hooks.enqueue(&alerts, t0).await.unwrap();
    hooks.enqueue(&alerts, t0).await.unwrap(); // a replay queues nothing twice
    assert_eq!(hooks.counts().await.unwrap(), QueueCounts { pending: 3, delivered: 0, dead: 0 });
    // The receiver fails: every delivery is retried later.
    let mut sent = vec![Vec::new()];
    assert!(hooks.deliver_due(&mut sent, t0).await.unwrap());
    assert!(receiver.received.lock().unwrap().is_empty());
    assert!(!hooks.deliver_due(&mut sent, t0 + 1).await.unwrap(), "nothing is due before its back-off");
    // The receiver goes away; passflow restarts: the queue is still there.
    server.abort();
    let _ = server.await;
    drop(hooks);
    let hooks = Webhooks::open(&config_for(dir.path(), addr, 3600), &metrics).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap().pending, 3);
    assert!(hooks.deliver_due(&mut sent, t0 + 60_000).await.unwrap());
    assert_eq!(hooks.counts().await.unwrap().pending, 3, "connection refused: still pending");
    // It comes back healthy on the same address.
    receiver.healthy.store(true, Ordering::SeqCst);
    let (_, _server) = serve(receiver.clone(), addr).await;
    let mut now = t0 + 120_000;
    while hooks.counts().await.unwrap().pending > 0 {
        hooks.deliver_due(&mut sent, now).await.unwrap();
        now += 60_000;
        assert!(now < t0 + 3_600_000, "deliveries never completed");
    }
    let received = receiver.received.lock().unwrap().clone();
    let mut ids: Vec<&str> = received.iter().map(|r| r.0.as_str()).collect();
    ids.sort();
    ids.dedup();
    assert_eq!(ids.len(), 3, "{ids:?}");
    assert!(ids.contains(&"traffic_surge-1") && ids.contains(&"traffic_surge-2"));
    assert!(received.iter().all(|r| r.2), "every signature verifies");
    assert!(received.iter().all(|r| r.1 == format!("{}/0", r.0)), "idempotency keys are the alert ids");
    let notice = received.iter().find(|r| r.3["kind"] == "cloned_plate").unwrap();
    assert_eq!(notice.3["pairs"].as_array().unwrap().len(), 2, "one notification per vehicle and hour");
    assert_eq!(hooks.counts().await.unwrap(), QueueCounts { pending: 0, delivered: 3, dead: 0 });
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retracted_pair_of_a_sent_notification_goes_out_as_its_next_revision() {
    let (dir, receiver, addr, _server) = healthy_receiver().await;
    let hooks = Webhooks::open(&config_for(dir.path(), addr, 3600), &Metrics::new()).await.unwrap();
    let hour = 3_600_000 * 100;
    let now = 1_000_000;
    let mut sent = vec![Vec::new()];
    let deliver_all = |hooks: &Arc<Webhooks>, sent: &mut Vec<Vec<i64>>| {
        let (hooks, mut taken) = (hooks.clone(), std::mem::take(sent));
        async move {
            while hooks.deliver_due(&mut taken, now).await.unwrap() {}
            taken
        }
    };
    let retracted =
        |id: &str| AlertRow { status: "retracted", revision: 1, ..alert(id, "cloned_plate", "赣A12345", hour + 10) };
    hooks.enqueue(&[alert("cloned_plate-a", "cloned_plate", "赣A12345", hour + 10)], now).await.unwrap();
    sent = deliver_all(&hooks, &mut sent).await;
    // A new pair of the hour after the notification went out: no second notification.
    hooks.enqueue(&[alert("cloned_plate-b", "cloned_plate", "赣A12345", hour + 20)], now).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap().pending, 0);
    // The pair it listed is retracted: the notification's next revision says so, once.
    hooks.enqueue(&[retracted("cloned_plate-a")], now).await.unwrap();
    hooks.enqueue(&[retracted("cloned_plate-a")], now).await.unwrap();
    sent = deliver_all(&hooks, &mut sent).await;
    {
        let received = receiver.received.lock().unwrap();
        assert_eq!(received.len(), 2, "{received:?}");
        let (first, second) = (&received[0], &received[1]);
        assert_eq!(first.0, second.0, "one notification id");
        assert_eq!((first.1.ends_with("/0"), second.1.ends_with("/1")), (true, true), "idempotency keys");
        assert_eq!(second.3["revision"], 1);
        assert_eq!(second.3["status"], "retracted");
        let pairs = second.3["pairs"].as_array().unwrap();
        assert_eq!(pairs.len(), 1);
        assert_eq!(
            (pairs[0]["alert_id"].as_str(), pairs[0]["status"].as_str()),
            (Some("cloned_plate-a"), Some("retracted"))
        );
    }
    // A notification not yet sent takes the change where it waits: one request, its last state.
    hooks.enqueue(&[alert("cloned_plate-c", "cloned_plate", "赣A7", hour + 30)], now).await.unwrap();
    hooks.enqueue(&[AlertRow { plate: Some("赣A7".into()), ..retracted("cloned_plate-c") }], now).await.unwrap();
    deliver_all(&hooks, &mut sent).await;
    let received = receiver.received.lock().unwrap();
    assert_eq!(received.len(), 3);
    assert_eq!(
        (received[2].1.ends_with("/0"), &received[2].3["pairs"][0]["status"]),
        (true, &serde_json::json!("retracted"))
    );
    assert_eq!(received[2].3["status"], "retracted");
}

#[tokio::test(flavor = "multi_thread")]
async fn a_queue_of_an_earlier_version_is_taken_up_and_delivered() {
    let (dir, receiver, addr, _server) = healthy_receiver().await;
    let config = config_for(dir.path(), addr, 60);
    // The table as the first version made it, with one delivery waiting.
    let url = format!("sqlite://{}?mode=rwc", config.queue.display());
    let pool = sqlx::SqlitePool::connect(&url).await.unwrap();
    sqlx::raw_sql(
        "CREATE TABLE deliveries (endpoint TEXT NOT NULL, alert_id TEXT NOT NULL, revision INTEGER NOT NULL, \
         body TEXT NOT NULL, created_at INTEGER NOT NULL, attempts INTEGER NOT NULL DEFAULT 0, \
         next_at INTEGER NOT NULL, state TEXT NOT NULL DEFAULT 'pending', last_error TEXT, \
         PRIMARY KEY (endpoint, alert_id, revision)); \
         INSERT INTO deliveries (endpoint, alert_id, revision, body, created_at, next_at) \
         VALUES ('desk', 'traffic_surge-7', 0, '{}', 1000, 1000);",
    )
    .execute(&pool)
    .await
    .unwrap();
    pool.close().await;
    let hooks = Webhooks::open(&config, &Metrics::new()).await.unwrap();
    hooks.deliver_due(&mut [Vec::new()], 2_000).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap(), QueueCounts { pending: 0, delivered: 1, dead: 0 });
    assert_eq!(receiver.received.lock().unwrap()[0].0, "traffic_surge-7");
}

#[tokio::test(flavor = "multi_thread")]
async fn an_endpoint_at_its_rate_limit_with_a_backlog_holds_up_no_other() {
    let (dir, receiver, addr, _server) = healthy_receiver().await;
    let mut config = config_for(dir.path(), addr, 3600);
    config.endpoints[0].per_minute = 1;
    config.endpoints.push(EndpointConfig {
        name: "police".into(),
        kinds: vec!["watchlist".into()],
        per_minute: 0,
        ..config.endpoints[0].clone()
    });
    let hooks = Webhooks::open(&config, &Metrics::new()).await.unwrap();
    // A backlog for the rate-limited desk, queued before the police's one alert.
    let backlog: Vec<AlertRow> =
        (0..300).map(|i| alert(&format!("traffic_surge-{i}"), "traffic_surge", "", 1_000)).collect();
    hooks.enqueue(&backlog, 1_000).await.unwrap();
    hooks.enqueue(&[alert("watchlist-1", "watchlist", "赣A1", 2_000)], 2_000).await.unwrap();
    let mut sent = vec![Vec::new(), Vec::new()];
    assert!(hooks.deliver_due(&mut sent, 3_000).await.unwrap());
    let received = receiver.received.lock().unwrap();
    let ids: Vec<&str> = received.iter().map(|r| r.0.as_str()).collect();
    assert!(ids.contains(&"watchlist-1"), "the police's alert waited behind the desk's backlog: {ids:?}");
    assert_eq!(ids.iter().filter(|id| id.starts_with("traffic_surge")).count(), 1, "the desk gets one a minute");
}

#[tokio::test(flavor = "multi_thread")]
async fn deliveries_for_an_endpoint_taken_out_of_the_configuration_are_dead_lettered() {
    let (dir, receiver, addr, _server) = healthy_receiver().await;
    let mut config = config_for(dir.path(), addr, 3600);
    let hooks = Webhooks::open(&config, &Metrics::new()).await.unwrap();
    hooks.enqueue(&[alert("traffic_surge-1", "traffic_surge", "", 1_000)], 1_000).await.unwrap();
    drop(hooks);
    config.endpoints[0].name = "desk-2".into();
    let hooks = Webhooks::open(&config, &Metrics::new()).await.unwrap();
    assert!(!hooks.deliver_due(&mut [Vec::new()], 2_000).await.unwrap());
    assert_eq!(hooks.counts().await.unwrap(), QueueCounts { pending: 0, delivered: 0, dead: 1 });
    assert!(receiver.received.lock().unwrap().is_empty());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_delivery_failing_past_the_give_up_time_is_dead_lettered() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver::default();
    let (addr, _server) = serve(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let metrics = Metrics::new();
    let hooks = Webhooks::open(&config_for(dir.path(), addr, 60), &metrics).await.unwrap();
    // Queued two hours before its first attempt (the service was down): the give-up time counts
    // from the first failure.
    hooks.enqueue(&[alert("traffic_surge-9", "traffic_surge", "", 1_000_000)], 1_000_000).await.unwrap();
    let t0 = 1_000_000 + 7_200_000;
    let mut sent = vec![Vec::new()];
    hooks.deliver_due(&mut sent, t0).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap().pending, 1);
    hooks.deliver_due(&mut sent, t0 + 61_000).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap(), QueueCounts { pending: 0, delivered: 0, dead: 1 });
    assert!(metrics.render().contains("passflow_webhook_deliveries_total{outcome=\"dead\"} 1"));
}

#[tokio::test(flavor = "multi_thread")]
async fn a_plate_put_on_the_watch_list_through_the_api_raises_a_watchlist_webhook() {
    let dir = tempfile::tempdir().unwrap();
    let receiver = Receiver { healthy: Arc::new(AtomicBool::new(true)), ..Receiver::default() };
    let (hook_addr, _server) = serve(receiver.clone(), "127.0.0.1:0".parse().unwrap()).await;
    let store_url = format!("sqlite://{}", dir.path().join("passflow.db").display());
    let mut config = passflow::config::Config::default();
    config.city.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/city").into();
    config.api.listen = "127.0.0.1:0".into();
    config.store.url = store_url.clone();
    config.state.dir = dir.path().join("state");
    config.archive.dir = dir.path().join("archive");
    config.api.audit_log = dir.path().join("audit.log");
    config.source.simulator.vehicles = 2_000;
    config.source.simulator.speed = 600.0;
    config.pipelines.watchlist_file = dir.path().join("watchlist.csv");
    let mut hooks = config_for(dir.path(), hook_addr, 3600);
    hooks.endpoints[0].kinds = vec!["watchlist".into()];
    config.webhooks = hooks;
    let handle = passflow::app::run(config, None).await.unwrap();
    // Watch the vehicles on the road (any of them passing again will do, whatever the time of
    // day the simulated clock shows).
    let store = passflow::store::Store::open(&store_url).await.unwrap();
    let plates: Vec<String> = loop {
        tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        // One plate may have trajectories of two days (the simulated clock passes midnight).
        let distinct: std::collections::BTreeSet<String> =
            store.trajectories().await.unwrap().into_iter().map(|t| t.0).collect();
        let seen: Vec<String> = distinct.into_iter().take(200).collect();
        if seen.len() >= 50 {
            break seen;
        }
    };
    let api = format!("http://{}/api/v1/admin/watchlist", handle.api_addr);
    let client = reqwest::Client::new();
    let bad = client
        .post(&api)
        .body(r#"{"plate":"nope","reason":"x","severity":"high"}"#)
        .header("content-type", "application/json")
        .send()
        .await
        .unwrap();
    assert_eq!(bad.status().as_u16(), 400);
    // The live alert stream, watch-list alerts only.
    let mut stream =
        client.get(format!("http://{}/api/v1/alerts/stream?kind=watchlist", handle.api_addr)).send().await.unwrap();
    assert_eq!(stream.status().as_u16(), 200);
    let added = std::time::Instant::now();
    for plate in &plates {
        let body = serde_json::json!({ "plate": plate, "reason": "stolen vehicle", "severity": "high" });
        let put = client.post(&api).json(&body).send().await.unwrap();
        assert_eq!(put.status().as_u16(), 201);
    }
    let (plate, latency) = loop {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        let hit = receiver
            .received
            .lock()
            .unwrap()
            .iter()
            .find(|r| r.3["kind"] == "watchlist" && plates.iter().any(|p| r.3["plate"] == p.as_str()))
            .map(|r| r.3["plate"].as_str().unwrap_or_default().to_owned());
        if let Some(plate) = hit {
            break (plate, added.elapsed());
        }
        assert!(
            added.elapsed() < std::time::Duration::from_secs(120),
            "no watchlist alert for any of {} plates",
            plates.len()
        );
    };
    println!("watch-list alert for {plate} delivered {latency:?} after the plates were added");
    let mut streamed = String::new();
    while !streamed.contains("event: alert") {
        let chunk = tokio::time::timeout(std::time::Duration::from_secs(30), stream.chunk())
            .await
            .expect("an event")
            .unwrap()
            .unwrap();
        streamed.push_str(&String::from_utf8_lossy(&chunk));
    }
    assert!(streamed.contains(r#""kind":"watchlist""#), "{streamed}");
    let listed = client.get(&api).send().await.unwrap().text().await.unwrap();
    assert!(listed.contains(&plate));
    let removed = client.delete(format!("{api}/{plate}")).send().await.unwrap();
    assert_eq!(removed.status().as_u16(), 200);
    let missing = client.delete(format!("{api}/{plate}")).send().await.unwrap();
    assert_eq!(missing.status().as_u16(), 404);
    let file = std::fs::read_to_string(dir.path().join("watchlist.csv")).unwrap();
    assert!(!file.contains(&plate) && file.lines().count() == plates.len(), "the file keeps the other entries");
    // Dead-lettered deliveries are sent again on request (none are dead here).
    let redrive = format!("http://{}/api/v1/admin/webhooks/redrive", handle.api_addr);
    let unknown = client.post(&redrive).json(&serde_json::json!({ "endpoint": "nope" })).send().await.unwrap();
    assert_eq!(unknown.status().as_u16(), 404);
    let all = client.post(&redrive).json(&serde_json::json!({})).send().await.unwrap();
    assert_eq!(all.status().as_u16(), 200);
    assert_eq!(all.json::<serde_json::Value>().await.unwrap(), serde_json::json!({ "redriven": 0 }));
    handle.stop();
    tokio::time::timeout(std::time::Duration::from_secs(10), handle.wait()).await.expect("stops promptly").unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn dead_deliveries_are_sent_again_on_request_and_ended_ones_pruned_once_kept_long_enough() {
    let (dir, receiver, addr, _server) = healthy_receiver().await;
    // Give up after a minute; delivered ones are kept an hour, dead ones two.
    let hooks = Webhooks::open(&config_for(dir.path(), addr, 60), &Metrics::new()).await.unwrap();
    let surge = |n: u32, revision: u32| AlertRow {
        revision,
        ..alert(&format!("traffic_surge-{n}"), "traffic_surge", "", 1_000)
    };
    let counts = |pending, delivered, dead| QueueCounts { pending, delivered, dead };
    let (t0, mut sent) = (10_000_000, vec![Vec::new()]);
    hooks.enqueue(&[surge(1, 0)], t0).await.unwrap();
    hooks.deliver_due(&mut sent, t0).await.unwrap();
    receiver.healthy.store(false, Ordering::SeqCst);
    // Two revisions of one alert, both given up.
    hooks.enqueue(&[surge(2, 0), surge(2, 1)], t0).await.unwrap();
    hooks.deliver_due(&mut sent, t0 + 1_000).await.unwrap();
    hooks.deliver_due(&mut sent, t0 + 62_000).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap(), counts(0, 1, 2));
    // Sent again once the receiver is back, its latest revision only, and its give-up time
    // counts afresh.
    receiver.healthy.store(true, Ordering::SeqCst);
    assert_eq!(hooks.redrive(Some("nope"), t0 + 100_000).await.unwrap(), 0);
    assert_eq!(hooks.redrive(Some("desk"), t0 + 100_000).await.unwrap(), 1);
    assert!(hooks.deliver_due(&mut sent, t0 + 100_000).await.unwrap());
    assert_eq!(hooks.counts().await.unwrap(), counts(0, 2, 0));
    let keys: Vec<String> = receiver.received.lock().unwrap().iter().map(|r| r.1.clone()).collect();
    assert_eq!(keys, ["traffic_surge-1/0", "traffic_surge-2/1"]);
    // One more, dead at t0 + 261 s.
    receiver.healthy.store(false, Ordering::SeqCst);
    hooks.enqueue(&[surge(3, 0)], t0 + 200_000).await.unwrap();
    hooks.deliver_due(&mut sent, t0 + 200_000).await.unwrap();
    hooks.deliver_due(&mut sent, t0 + 261_000).await.unwrap();
    assert_eq!(hooks.counts().await.unwrap(), counts(0, 2, 1));
    assert_eq!(hooks.prune(t0 + 3_600_000).await.unwrap(), 0, "nothing kept an hour yet");
    assert_eq!(hooks.prune(t0 + 3_600_001).await.unwrap(), 1, "the first delivered");
    assert_eq!(hooks.counts().await.unwrap(), counts(0, 1, 1));
    let two_hours_after_the_dead = t0 + 261_000 + 7_200_000;
    assert_eq!(
        hooks.prune(two_hours_after_the_dead).await.unwrap(),
        2,
        "the second delivered and its superseded revision"
    );
    assert_eq!(hooks.prune(two_hours_after_the_dead + 1).await.unwrap(), 1, "the dead, two hours on");
    assert_eq!(hooks.counts().await.unwrap(), counts(0, 0, 0));
}
