//! The Grafana dashboards and the Docker files: every SQL query of a dashboard runs against the
//! real MariaDB schema (over a replayed day), every metric a dashboard names is exported, and
//! the Docker files hold together (no Docker engine runs here to build them).

use crate::support::{small_day, TestDatabase};
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::Config;
use std::path::Path;

fn repo(path: &str) -> std::path::PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(path)
}

fn dashboard(name: &str) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(repo(&format!("dashboards/{name}"))).unwrap()).unwrap()
}

fn targets(d: &serde_json::Value, field: &str) -> Vec<(String, String)> {
    d["panels"]
        .as_array()
        .unwrap()
        .iter()
        .flat_map(|p| {
            let title = p["title"].as_str().unwrap_or("").to_owned();
            p["targets"]
                .as_array()
                .unwrap()
                .iter()
                .filter_map(move |t| t[field].as_str().map(|q| (title.clone(), q.to_owned())))
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn every_dashboard_query_runs_on_the_mysql_schema_and_returns_the_day() {
    use sqlx::{Connection, Row};
    let db = TestDatabase::create("dashboards").await;
    let mut config = Config::default();
    config.city.dir = small_day().to_path_buf();
    let input = ReplayInput::File(small_day().join("passes.jsonl"));
    replay(ReplayOptions { config, input, store_url: db.url.clone(), now_ms: None, checkpoint_dir: None })
        .await
        .unwrap();
    let mut conn = sqlx::MySqlConnection::connect(&db.url).await.unwrap();
    let queries = targets(&dashboard("city-overview.json"), "rawSql");
    assert!(queries.len() >= 8);
    // Grafana's macros, for the simulated day (2026-03-02 in Shanghai).
    let (from_s, to_s) = (1_772_380_800_i64, 1_772_467_200_i64);
    for (title, sql) in queries {
        let sql = sql.replace("$__unixEpochFrom()", &from_s.to_string()).replace("$__unixEpochTo()", &to_s.to_string());
        assert!(!sql.contains('$'), "{title}: a macro the test does not know");
        let rows = sqlx::query(&sql).fetch_all(&mut conn).await.unwrap_or_else(|e| panic!("{title}: {e}\n{sql}"));
        assert!(!rows.is_empty(), "{title} shows nothing for a replayed day");
        assert!(rows[0].len() >= 2, "{title}");
    }
    drop(conn);
    db.drop_now().await;
}

#[test]
fn every_metric_a_dashboard_names_is_exported() {
    let metrics = passflow::metrics::Metrics::new();
    // Latency series exist per route once a route has served a request.
    metrics.http_seconds.with_label_values(&["/api/v1/flows"]).observe(0.001);
    // Per-partition and per-part series exist once a source partition or a part reports.
    metrics.partition_watermark_lag_seconds.with_label_values(&["0"]).set(1.0);
    metrics.set_ready("source", true);
    let exported = metrics.render();
    let names: std::collections::BTreeSet<String> = exported
        .lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| l.split(['{', ' ']).next())
        .map(str::to_owned)
        .collect();
    let exprs = targets(&dashboard("pipeline-health.json"), "expr");
    assert!(exprs.len() >= 8);
    for (title, expr) in exprs {
        let mut rest = expr.as_str();
        while let Some(at) = rest.find("passflow_") {
            let name: String = rest[at..].chars().take_while(|c| c.is_ascii_alphanumeric() || *c == '_').collect();
            assert!(names.contains(&name), "{title}: `{name}` is not on /metrics");
            rest = &rest[at + name.len()..];
        }
    }
}

#[test]
fn the_docker_files_hold_together() {
    let dockerfile = std::fs::read_to_string(repo("docker/Dockerfile")).unwrap();
    let stages: Vec<&str> = dockerfile.lines().filter(|l| l.starts_with("FROM ")).collect();
    assert!(stages.len() >= 2 && stages[0].contains(" AS builder"), "a multi-stage build: {stages:?}");
    assert!(dockerfile.contains("COPY --from=builder /src/target/release/passflow"));
    assert!(dockerfile.contains("libclang-dev"), "the RocksDB bindings need libclang");
    for copied in dockerfile.lines().filter_map(|l| l.strip_prefix("COPY ")).filter(|l| !l.starts_with("--from")) {
        for source in copied.split_whitespace().rev().skip(1) {
            assert!(repo(source).exists(), "the Dockerfile copies `{source}`, which is not in the repository");
        }
    }
    let compose = std::fs::read_to_string(repo("docker/compose.yaml")).unwrap();
    for service in ["passflow", "kafka", "mysql", "redis", "prometheus", "grafana"] {
        assert!(compose.contains(&format!("\n  {service}:\n")), "compose has no `{service}` service");
    }
    assert!(compose.contains("KAFKA_PROCESS_ROLES: broker,controller"), "Kafka runs in KRaft mode");
    assert!(compose.contains("dockerfile: docker/Dockerfile"));
    // Every mounted file exists, and every PASSFLOW__ variable names a configuration key.
    for mount in
        compose.lines().filter_map(|l| l.trim().strip_prefix("- ../").or_else(|| l.trim().strip_prefix("- ./")))
    {
        let local = mount.split(':').next().unwrap();
        let path =
            if compose.contains(&format!("- ../{local}")) { repo(local) } else { repo(&format!("docker/{local}")) };
        assert!(path.exists(), "compose mounts `{local}`, which does not exist");
    }
    let defaults = serde_json::to_value(Config::default()).unwrap();
    for var in compose.lines().filter_map(|l| l.trim().strip_prefix("PASSFLOW__")) {
        let key = var.split(':').next().unwrap().to_lowercase();
        let mut at = &defaults;
        for part in key.split("__") {
            at = &at[part];
        }
        assert!(!at.is_null(), "compose sets PASSFLOW__{} which is no configuration key", key.to_uppercase());
    }
    let prometheus = std::fs::read_to_string(repo("docker/prometheus.yml")).unwrap();
    assert!(prometheus.contains("passflow:8080") && prometheus.contains("/metrics"));
    let provisioning = std::fs::read_to_string(repo("dashboards/provisioning/dashboards/passflow.yaml")).unwrap();
    assert!(
        provisioning.contains("/var/lib/grafana/dashboards")
            && compose.contains("../dashboards:/var/lib/grafana/dashboards")
    );
    let sources = std::fs::read_to_string(repo("dashboards/provisioning/datasources/passflow.yaml")).unwrap();
    for uid in ["passflow-mysql", "passflow-prometheus"] {
        assert!(sources.contains(&format!("uid: {uid}")), "datasource {uid} is not provisioned");
    }
}

/// `scripts/build-pgo` gives its profile flags to passflow's own crate alone: a dependency
/// given them would be compiled again (RocksDB's C++ with it).
#[test]
fn the_pgo_build_gives_its_flags_to_passflow_alone() {
    let rustc_args = |crate_name: &str| {
        let out = std::process::Command::new(repo("scripts/pgo-rustc"))
            .args(["echo", "--crate-name", crate_name, "src/lib.rs"])
            .env("PASSFLOW_PGO_FLAGS", "-Cprofile-use=/tmp/p.profdata")
            .output()
            .unwrap();
        assert!(out.status.success(), "{out:?}");
        String::from_utf8(out.stdout).unwrap()
    };
    assert_eq!(rustc_args("passflow"), "--crate-name passflow src/lib.rs -Cprofile-use=/tmp/p.profdata\n");
    assert_eq!(rustc_args("passflow_helper"), "--crate-name passflow_helper src/lib.rs\n");
    assert_eq!(rustc_args("rocksdb"), "--crate-name rocksdb src/lib.rs\n");
}
