//! The streaming core end to end: a replay equals the batch computation, a replay killed with
//! SIGKILL and restarted from its checkpoints ends with the same tables, and savepoints round
//! trip across a restart.

use crate::support::{http_get, labels, passflow, small_day};
use passflow::core::checkpoint::{read_savepoint, CheckpointStore};
use passflow::ingest::{Deduplicator, Ingest, Outcome, Validator};
use passflow::model::PlateColorScheme;
use passflow::pipelines::{
    batch_checkpoint_speed, batch_flow_counts, batch_high_frequency, batch_origin_counts, batch_top_n,
};
use passflow::reference::City;
use passflow::store::Store;
use std::path::Path;
use std::sync::Arc;
use std::time::Duration;

const TZ: chrono_tz::Tz = chrono_tz::Asia::Shanghai;

/// The deduplicated valid passes of a pass file, and its city.
fn passes(dir: &Path) -> (City, Vec<passflow::model::Pass>) {
    let city = Arc::new(City::load(dir).unwrap());
    let validator = Validator::new(city.clone(), TZ, PlateColorScheme::Police, 300_000);
    let mut ingest = Ingest::new(validator, Deduplicator::new(i64::MAX / 4));
    let text = std::fs::read_to_string(dir.join("passes.jsonl")).unwrap();
    let valid = |l: &str| if let Outcome::Valid(p) = ingest.accept(l.as_bytes(), None) { Some(p) } else { None };
    let passes = text.lines().filter_map(valid).collect();
    ((*city).clone(), passes)
}

/// The batch computation of the flow counts over a pass file.
fn oracle(dir: &Path) -> Vec<(String, String, i64, i64, i64)> {
    let (city, passes) = passes(dir);
    batch_flow_counts(&city, &passes).into_iter().map(|((l, k, w, s), n)| (l, k, i64::from(w), s, n as i64)).collect()
}

fn replay_cmd(dir: &Path, store: &str) -> std::process::Command {
    let mut cmd = passflow();
    cmd.args(["replay", "--city"]).arg(dir).arg("--input").arg(dir.join("passes.jsonl")).args(["--store", store]);
    cmd
}

async fn table(url: &str) -> Vec<(String, String, i64, i64, i64)> {
    let store = Store::open(url).await.unwrap();
    store.flow_counts().await.unwrap().into_iter().map(|r| (r.0, r.1, r.2, r.3, r.4)).collect()
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replayed_day_gives_exactly_the_batch_flow_counts_and_no_late_pass() {
    let dir = small_day();
    let out = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", out.path().join("r.db").display());
    let status = replay_cmd(dir, &url).status().unwrap();
    assert!(status.success());
    let got = table(&url).await;
    let want = oracle(dir);
    assert!(want.len() > 10_000, "{} rows", want.len());
    assert_eq!(got.len(), want.len());
    assert!(got == want, "flow_counts differ from the batch computation");
    let store = Store::open(&url).await.unwrap();
    assert!(store.late_passes().await.unwrap().is_empty(), "the outage is within the allowed lateness");
    let (city, all) = passes(dir);
    let want: Vec<(String, i64, String, String, String, i64)> =
        batch_origin_counts(&city, &["赣A".to_string(), "赣M".to_string()], &all)
            .into_iter()
            .map(|((r, s, p, c, scope), n)| (r, s, p, c, scope, n as i64))
            .collect();
    let want_top: Vec<(String, i64, i64, String, i64)> = batch_top_n(&city, &all, 10)
        .into_iter()
        .flat_map(|(end, entries)| {
            entries
                .into_iter()
                .enumerate()
                .map(move |(i, (k, v))| ("checkpoint_flow".to_string(), end, i as i64 + 1, k.to_string(), v as i64))
        })
        .collect();
    let top = store.top_n().await.unwrap();
    assert!(
        want_top.len() > 1_000 && top == want_top,
        "top_n differs from the batch ranking ({} vs {} rows)",
        top.len(),
        want_top.len()
    );
    let want_hf: Vec<(String, String, String, i64, i64, i64, i64)> = batch_high_frequency(&city, TZ, &all, 8)
        .into_iter()
        .map(|((d, c, p, col), (n, f, l))| (d, c, p, i64::from(col), i64::from(n), f, l))
        .collect();
    let hf = store.high_frequency().await.unwrap();
    assert!(
        hf == want_hf,
        "high_frequency differs from the batch computation ({} vs {} rows)",
        hf.len(),
        want_hf.len()
    );
    for planted in labels(dir).high_frequency {
        assert!(
            hf.iter().any(|r| r.1 == planted.checkpoint_id && r.2 == planted.plate && r.4 >= 8),
            "{planted:?} not found"
        );
    }
    let want_speed: Vec<(String, i64, i64, i64, f64)> = batch_checkpoint_speed(&city, &all)
        .into_iter()
        .map(|((c, w, s), (n, v))| (c, i64::from(w), s, i64::from(n), v))
        .collect();
    let speed = store.checkpoint_speed().await.unwrap();
    assert!(
        speed.len() > 1_000 && speed == want_speed,
        "checkpoint_speed differs ({} vs {} rows)",
        speed.len(),
        want_speed.len()
    );
    let got = store.origin_counts().await.unwrap();
    assert!(
        want.len() > 1_000 && got == want,
        "origin_counts differ from the batch computation ({} vs {} rows)",
        got.len(),
        want.len()
    );
    let dead: i64 = store.dead_letter_counts().await.unwrap().iter().map(|(_, n)| n).sum();
    assert_eq!(dead as u64, labels(dir).dead_letters.values().sum::<u64>());
}

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_killed_at_random_points_and_resumed_ends_with_the_uninterrupted_tables() {
    let day = tempfile::tempdir().unwrap();
    let made = passflow()
        .args(["simulate", "--out"])
        .arg(day.path())
        .args(["--vehicles", "6000", "--seed", "3"])
        .status()
        .unwrap();
    assert!(made.success());
    let work = tempfile::tempdir().unwrap();
    let clean = format!("sqlite://{}", work.path().join("clean.db").display());
    assert!(replay_cmd(day.path(), &clean).status().unwrap().success());

    let crashed = format!("sqlite://{}", work.path().join("crashed.db").display());
    let checkpoints = work.path().join("checkpoints");
    let mut kills = 0;
    let mut resumed = false;
    let mut rng_state = 0x5eed_u64;
    for attempt in 0..12 {
        let mut child = replay_cmd(day.path(), &crashed)
            .arg("--checkpoint-dir")
            .arg(&checkpoints)
            .env("PASSFLOW__CORE__CHECKPOINT_INTERVAL", "25ms")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let finished = if attempt < 11 {
            std::thread::sleep(Duration::from_millis(150 + (rng_state >> 33) % 500));
            child.try_wait().unwrap().is_some()
        } else {
            true
        };
        if !finished {
            child.kill().unwrap();
            kills += 1;
        }
        let out = child.wait_with_output().unwrap();
        resumed |= String::from_utf8_lossy(&out.stderr).contains("resumed from checkpoint");
        if finished {
            assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
            break;
        }
    }
    assert!(kills >= 2, "only {kills} kills landed mid-replay");
    assert!(resumed, "no run resumed from a checkpoint");
    let (a, b) = (table(&clean).await, table(&crashed).await);
    assert_eq!(a.len(), b.len());
    assert!(a == b, "tables differ after {kills} kills");
    let (sa, sb) = (Store::open(&clean).await.unwrap(), Store::open(&crashed).await.unwrap());
    assert_eq!(sa.dead_letter_counts().await.unwrap(), sb.dead_letter_counts().await.unwrap());
    assert_eq!(sa.late_passes().await.unwrap(), sb.late_passes().await.unwrap());
}

fn service_config(state: &Path) -> passflow::config::Config {
    let mut config = passflow::config::Config::default();
    config.city.dir = concat!(env!("CARGO_MANIFEST_DIR"), "/config/city").into();
    config.api.listen = "127.0.0.1:0".into();
    config.store.url = format!("sqlite://{}", state.join("passflow.db").display());
    config.state.dir = state.join("state");
    config.source.simulator.vehicles = 2_000;
    config.source.simulator.speed = 600.0;
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_savepoint_restores_into_a_new_service_and_a_wrong_state_version_is_refused() {
    let (first, second, savepoint) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let handle = passflow::app::run(service_config(first.path()), None).await.unwrap();
    for _ in 0..100 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handle.metrics.passes_valid.get() > 0 {
            break;
        }
    }
    assert!(handle.metrics.passes_valid.get() > 0);
    let to = savepoint.path().join("sp");
    let id = passflow::api::request_savepoint(&handle.api_addr.to_string(), &to).await.unwrap();
    let (status, _) = http_get(handle.api_addr, "/healthz").await;
    assert_eq!(status, 200);
    handle.stop();
    handle.wait().await.unwrap();
    let saved = read_savepoint(&to).unwrap();
    assert_eq!(saved.id, id);

    let handle = passflow::app::run(service_config(second.path()), Some(to.clone())).await.unwrap();
    handle.stop();
    handle.wait().await.unwrap();
    let restored = CheckpointStore::open(&second.path().join("state")).unwrap().latest().unwrap().unwrap();
    let records = |c: &passflow::core::checkpoint::Checkpoint| {
        let core = &c.engine.parts.iter().find(|(n, _)| n == "core").unwrap().1;
        serde_json::from_slice::<serde_json::Value>(&core.bytes).unwrap()["stats"]["records"].as_u64().unwrap()
    };
    assert!(records(&restored) >= records(&saved), "the new service went on from the savepoint's counts");

    let manifest = to.join("manifest.json");
    let text = std::fs::read_to_string(&manifest).unwrap();
    let mut json: serde_json::Value = serde_json::from_str(&text).unwrap();
    for part in json["parts"].as_array_mut().unwrap() {
        if part["name"] == "flow_counts" {
            part["version"] = 99.into();
        }
    }
    std::fs::write(&manifest, json.to_string()).unwrap();
    let third = tempfile::tempdir().unwrap();
    let err = match passflow::app::run(service_config(third.path()), Some(to)).await {
        Ok(_) => panic!("a savepoint of state version 99 was accepted"),
        Err(e) => format!("{e:#}"),
    };
    assert!(err.contains("version 99") && err.contains("flow_counts"), "{err}");
}
