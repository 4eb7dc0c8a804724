//! The built-in status page, rendered for real in headless Chromium against the running
//! service: the checkpoint map, the city flow, Top-N and the alert feed fill with data; the
//! interactive API page lists every documented call.

use std::time::Duration;

fn chromium() -> String {
    let path = std::env::var("PASSFLOW_TEST_CHROMIUM").unwrap_or_else(|_| "/usr/bin/chromium".into());
    assert!(std::path::Path::new(&path).exists(), "Chromium is required at {path}: scripts/test installs it");
    path
}

/// The page at `url` after its scripts ran, as Chromium's DOM dump.
async fn dump_dom(browser: &str, url: String) -> std::process::Output {
    let profile = tempfile::tempdir().unwrap();
    let user_dir = format!("--user-data-dir={}", profile.path().display());
    let browser = browser.to_owned();
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new(browser)
            .args([
                "--headless",
                "--no-sandbox",
                "--disable-gpu",
                "--disable-dev-shm-usage",
                "--virtual-time-budget=5000",
            ])
            .arg(user_dir)
            .args(["--dump-dom", &url])
            .output()
    });
    tokio::time::timeout(Duration::from_secs(90), out).await.expect("Chromium finishes").unwrap().unwrap()
}

#[tokio::test(flavor = "multi_thread")]
async fn the_status_page_renders_the_map_flow_top_n_and_alerts_in_chromium() {
    let browser = chromium();
    let dir = tempfile::tempdir().unwrap();
    let mut config = passflow::config::Config::default();
    config.city.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/city").into();
    config.api.listen = "127.0.0.1:0".into();
    config.store.url = format!("sqlite://{}", dir.path().join("passflow.db").display());
    config.state.dir = dir.path().join("state");
    config.archive.dir = dir.path().join("archive");
    config.api.audit_log = dir.path().join("audit.log");
    config.pipelines.watchlist_file = dir.path().join("watchlist.csv");
    config.source.simulator.vehicles = 5_000;
    config.source.simulator.speed = 600.0;
    let handle = passflow::app::run(config, None).await.unwrap();
    let base = format!("http://{}", handle.api_addr);
    // Wait until the city has flows and a Top-N window.
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        let top: serde_json::Value = reqwest::get(format!("{base}/api/v1/top-n")).await.unwrap().json().await.unwrap();
        if top["rows"].as_array().is_some_and(|r| !r.is_empty()) {
            break;
        }
    }
    let out = dump_dom(&browser, format!("{base}/")).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert!(
        dom.contains(r#"data-ready="true""#),
        "the page did not finish loading: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let dots = dom.matches("<circle").count();
    assert_eq!(dots, 108, "one dot per checkpoint");
    assert!(dom.matches("<rect").count() > 0, "the city flow has bars");
    assert!(dom.contains("passes in the last"), "the flow total is shown");
    assert!(dom.contains("<td>1</td>"), "Top-N has a first row");
    assert!(!dom.contains(r#"<span id="error">Error"#), "the page reports an error");

    // The interactive API page lists every call of the OpenAPI document, with a form each.
    let doc: serde_json::Value =
        reqwest::get(format!("{base}/api/v1/openapi.json")).await.unwrap().json().await.unwrap();
    let operations: usize = doc["paths"].as_object().unwrap().values().map(|m| m.as_object().unwrap().len()).sum();
    let out = dump_dom(&browser, format!("{base}/api/v1/docs")).await;
    let dom = String::from_utf8_lossy(&out.stdout);
    assert_eq!(dom.matches(r#"<details class="call""#).count(), operations, "one entry per call:\n{dom}");
    assert!(dom.contains(r#"data-path="/api/v1/trajectories/{plate}""#));
    assert!(dom.contains("role: analyst"));
    handle.stop();
    tokio::time::timeout(Duration::from_secs(10), handle.wait()).await.expect("stops promptly").unwrap();
}
