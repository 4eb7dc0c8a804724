//! `passflow run` on embedded defaults: serves /healthz and /metrics and counts simulated passes.

use crate::support::http_get;
use passflow::app::run;
use passflow::config::Config;
use std::time::Duration;

#[tokio::test(flavor = "multi_thread")]
async fn the_service_serves_health_and_counts_simulated_passes() {
    let dir = tempfile::tempdir().unwrap();
    let mut config = Config::default();
    config.city.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/city").into();
    config.api.listen = "127.0.0.1:0".into();
    config.store.url = format!("sqlite://{}", dir.path().join("passflow.db").display());
    config.state.dir = dir.path().join("state");
    config.archive.dir = dir.path().join("archive");
    config.api.audit_log = dir.path().join("audit.log");
    config.pipelines.watchlist_file = dir.path().join("watchlist.csv");
    config.source.simulator.vehicles = 2_000;
    config.source.simulator.speed = 600.0;
    let handle = run(config, None).await.unwrap();
    let (status, body) = http_get(handle.api_addr, "/healthz").await;
    assert_eq!(status, 200);
    assert!(body.contains("ok"));
    let mut received = 0;
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let (_, metrics) = http_get(handle.api_addr, "/metrics").await;
        received = metrics
            .lines()
            .find_map(|l| l.strip_prefix("passflow_passes_received_total "))
            .and_then(|v| v.trim().parse::<u64>().ok())
            .unwrap_or(0);
        if received > 0 {
            assert!(metrics.contains("passflow_passes_valid_total"));
            break;
        }
    }
    assert!(received > 0, "no simulated pass counted within 10 s");
    let (status, body) = http_get(handle.api_addr, "/readyz").await;
    assert_eq!(status, 200, "{body}");
    assert!(body.contains(r#""store":"ok""#) && body.contains(r#""pipeline":"ok""#), "{body}");
    assert!(body.contains(r#""source":"ok""#), "{body}");
    let (_, metrics) = http_get(handle.api_addr, "/metrics").await;
    let partition_lag =
        metrics.lines().find_map(|l| l.strip_prefix(r#"passflow_partition_watermark_lag_seconds{partition="0"} "#));
    let partition_lag: f64 =
        partition_lag.expect("the simulator's partition has a watermark lag").trim().parse().unwrap();
    assert!((0.0..3600.0).contains(&partition_lag), "{partition_lag}");
    let (status, _) = http_get(handle.api_addr, "/nope").await;
    assert_eq!(status, 404);
    handle.stop();
    tokio::time::timeout(Duration::from_secs(10), handle.wait()).await.expect("stops promptly").unwrap();
}
