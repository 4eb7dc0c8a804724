//! The streaming core end to end: a replay equals the batch computation, a replay killed with
//! SIGKILL and restarted from its checkpoints ends with the same tables, and savepoints round
//! trip across a restart.

use crate::support::{http_get, labels, passflow, small_day};
use passflow::core::checkpoint::{read_savepoint, CheckpointStore};
use passflow::ingest::{Deduplicator, Ingest, Outcome, Validator};
use passflow::model::PlateColorScheme;
use passflow::pipelines::{
    batch_checkpoint_speed, batch_congestion, batch_flow_counts, batch_high_frequency, batch_origin_counts, batch_top_n,
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
    let (want_segments, want_areas, segment_ranking) = batch_congestion(&city, &all, 10);
    let want_top: Vec<(String, i64, i64, String, i64)> =
        [("checkpoint_flow", batch_top_n(&city, &all, 10)), ("segment_flow", segment_ranking)]
            .into_iter()
            .flat_map(|(metric, windows)| windows.into_iter().map(move |w| (metric, w)))
            .flat_map(|(metric, (end, entries))| {
                entries
                    .into_iter()
                    .enumerate()
                    .map(move |(i, (k, v))| (metric.to_string(), end, i as i64 + 1, k.to_string(), v as i64))
            })
            .collect();
    let segments: Vec<(String, u32, i64, (u32, f64, f64, u8))> = store
        .segment_congestion()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.0, r.1 as u32, r.2, (r.3 as u32, r.4, r.5, r.6 as u8)))
        .collect();
    let want_segments: Vec<(String, u32, i64, (u32, f64, f64, u8))> =
        want_segments.into_iter().map(|((s, w, t), v)| (s, w, t, v)).collect();
    assert!(
        want_segments.len() > 1_000 && segments == want_segments,
        "segment_congestion differs ({} vs {} rows)",
        segments.len(),
        want_segments.len()
    );
    let areas: Vec<(String, String, u32, i64, (f64, f64, u8))> = store
        .area_congestion()
        .await
        .unwrap()
        .into_iter()
        .map(|r| (r.0, r.1, r.2 as u32, r.3, (r.4, r.5, r.6 as u8)))
        .collect();
    let want_areas: Vec<(String, String, u32, i64, (f64, f64, u8))> =
        want_areas.into_iter().map(|((l, k, w, t), v)| (l, k, w, t, v)).collect();
    assert!(
        want_areas.len() > 100 && areas == want_areas,
        "area_congestion differs ({} vs {} rows)",
        areas.len(),
        want_areas.len()
    );
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
    // Every vehicle-day's trajectory equals the batch one.
    let want_trajectories: Vec<(String, i64, String, String, String)> =
        passflow::pipelines::batch_trajectories(&city, TZ, &all)
            .into_iter()
            .map(|((plate, color, day), (times, cps))| {
                let cps: Vec<&str> = cps.iter().map(|c| &**c).collect();
                (plate, i64::from(color), day, serde_json::json!(times).to_string(), serde_json::json!(cps).to_string())
            })
            .collect();
    let trajectories: Vec<(String, i64, String, String, String)> =
        store.trajectories().await.unwrap().into_iter().map(|t| (t.0, t.1, t.2, t.3, t.4)).collect();
    assert!(
        want_trajectories.len() > 1_000 && trajectories == want_trajectories,
        "trajectories differ from the batch computation ({} vs {} rows)",
        trajectories.len(),
        want_trajectories.len()
    );
    // Restriction violations and summaries equal the batch ones, and hold every planted violator.
    let locals = ["赣A".to_string(), "赣M".to_string()];
    let (want_violations, want_summaries) = passflow::pipelines::batch_restrictions(&city, TZ, &locals, &all);
    let (violations, summaries) = store.restrictions().await.unwrap();
    assert!(!want_violations.is_empty());
    assert_eq!(violations, want_violations.iter().cloned().collect::<Vec<_>>());
    let want_summaries: Vec<(String, String, String, i64, i64)> =
        want_summaries.into_iter().map(|((d, c, r), (n, v))| (d, c, r, i64::from(n), i64::from(v))).collect();
    assert_eq!(summaries, want_summaries);
    for violator in labels(dir).restriction_violators {
        for id in &violator.pass_ids {
            assert!(
                want_violations.contains(&(id.clone(), violator.rule_id.clone())),
                "{id} of {} not found",
                violator.plate
            );
        }
    }
    // Device health: the checkpoint whose uplink was down is reported silent and the camera
    // whose clock is skewed is found; no other checkpoint is reported.
    let reported = |alerts: Vec<passflow::store::StoredAlert>| -> std::collections::BTreeSet<String> {
        alerts.into_iter().filter_map(|a| a.3).collect()
    };
    let day_labels = labels(dir);
    let outage = day_labels.outage.as_ref().map(|o| o.checkpoint_id.clone()).into_iter().collect();
    assert_eq!(reported(store.alerts("device_silent").await.unwrap()), outage);
    let skewed = day_labels.clock_skew.as_ref().map(|s| s.checkpoint_id.clone()).into_iter().collect();
    assert_eq!(reported(store.alerts("clock_skew").await.unwrap()), skewed);
    assert!(store.alerts("unreadable_plates").await.unwrap().is_empty());
    // Every planted clone is found, pair by pair, and nothing else is flagged.
    let want_clones: Vec<String> = {
        let mut ids: Vec<String> = labels(dir)
            .cloned_plates
            .iter()
            .flat_map(|c| c.conflicting_pairs.iter().map(|[a, b]| passflow::pipelines::pair_id(a, b)))
            .collect();
        ids.sort();
        ids
    };
    // Cameras found skewed have their passes' times corrected, and alerts only their clock made
    // are taken back; an alert beyond the planted ones can only be a vehicle behind the skewed
    // camera before the skew was found.
    let stored = store.alerts("cloned_plate").await.unwrap();
    assert!(!want_clones.is_empty());
    for id in &want_clones {
        assert!(stored.iter().any(|a| &a.0 == id && a.4 == "active"), "planted pair {id} not flagged");
    }
    let skewed: Vec<String> =
        labels(dir).clock_skew.map(|s| s.affected_vehicles.into_iter().map(|v| v.plate).collect()).unwrap_or_default();
    for a in stored.iter().filter(|a| !want_clones.contains(&a.0) && a.4 == "active") {
        assert!(skewed.contains(a.2.as_ref().unwrap()), "{a:?} flagged, neither planted nor behind the skewed clock");
    }
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
    // The batches of the killed runs below: the batch size decides what is late.
    let batch = ("PASSFLOW__CORE__REPLAY_BATCH", "2048");
    assert!(replay_cmd(day.path(), &clean).env(batch.0, batch.1).status().unwrap().success());

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
            // Many batches, so that kills land between many checkpoints.
            .env(batch.0, batch.1)
            .env("RUST_LOG", "info,passflow::core::driver=debug")
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::piped())
            .spawn()
            .unwrap();
        // The log is read as it comes: each kill lands a random time after the run's first
        // checkpoint (how soon that is depends on how fast the store writes).
        let (checkpointed, stderr) = std::sync::mpsc::channel();
        let log = child.stderr.take().unwrap();
        let reader = std::thread::spawn(move || {
            let mut all = String::new();
            for line in std::io::BufRead::lines(std::io::BufReader::new(log)).map_while(Result::ok) {
                if line.contains("checkpoint complete") {
                    let _ = checkpointed.send(());
                }
                all.push_str(&line);
                all.push('\n');
            }
            all
        });
        rng_state = rng_state.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let finished = if attempt < 11 {
            let _ = stderr.recv_timeout(Duration::from_secs(30));
            std::thread::sleep(Duration::from_millis((rng_state >> 33) % 400));
            child.try_wait().unwrap().is_some()
        } else {
            true
        };
        if !finished {
            child.kill().unwrap();
            kills += 1;
        }
        let status = child.wait().unwrap();
        let log = reader.join().unwrap();
        resumed |= log.contains("resumed from checkpoint");
        if finished {
            assert!(status.success(), "{log}");
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

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_runs_only_the_named_pipelines_and_one_enabled_later_starts_empty() {
    let dir = small_day();
    let work = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", work.path().join("some.db").display());
    let checkpoints = work.path().join("checkpoints");
    let out = replay_cmd(dir, &url)
        .args(["--pipelines", "flow_counts,high_frequency", "--checkpoint-dir"])
        .arg(&checkpoints)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let store = Store::open(&url).await.unwrap();
    assert_eq!(table(&url).await, oracle(dir), "flow counts as the batch computation");
    let (city, all) = passes(dir);
    assert_eq!(store.high_frequency().await.unwrap().len(), batch_high_frequency(&city, TZ, &all, 8).len());
    assert!(!store.high_frequency().await.unwrap().is_empty());
    assert!(store.origin_counts().await.unwrap().is_empty(), "origin counts did not run");
    assert!(store.top_n().await.unwrap().is_empty(), "Top-N did not run");
    assert!(store.segment_congestion().await.unwrap().is_empty(), "congestion did not run");
    assert!(store.trajectories().await.unwrap().is_empty(), "trajectories did not run");

    // Every pipeline on the same checkpoints: the two restore their state, the rest start empty.
    let out = replay_cmd(dir, &url).arg("--checkpoint-dir").arg(&checkpoints).output().unwrap();
    let log = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "{log}");
    assert!(log.contains("it starts empty") && log.contains("trajectories"), "restored from the checkpoint: {log}");
    let started_empty =
        |name: &str| log.lines().any(|l| l.contains("it starts empty") && l.contains(&format!("\"{name}\"")));
    assert!(started_empty("trajectories"), "{log}");
    assert!(!started_empty("flow_counts") && !started_empty("high_frequency"), "{log}");
    assert_eq!(table(&url).await, oracle(dir), "flow counts unchanged");

    let out = replay_cmd(dir, &url).args(["--pipelines", "flow_counts,flows"]).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("unknown pipeline `flows`") && err.contains("segment_congestion"), "{err}");
}

fn service_config(state: &Path) -> passflow::config::Config {
    let mut config = crate::support::service_config(state);
    config.source.simulator.vehicles = 2_000;
    config.source.simulator.speed = 600.0;
    config
}

#[tokio::test(flavor = "multi_thread")]
async fn a_savepoint_restores_into_a_new_service_and_a_wrong_state_version_is_refused() {
    let (first, second, savepoint) =
        (tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap(), tempfile::tempdir().unwrap());
    let mut config = service_config(first.path());
    // Fast enough that boundary checkpoints see inbound passes within seconds.
    config.source.simulator.speed = 6000.0;
    let handle = passflow::app::run(config, None).await.unwrap();
    // Until a first entry is in the embedded first-entry store (outside the checkpoints).
    let first_entries = || handle.metrics.result_rows.with_label_values(&["first_entry"]).get();
    for _ in 0..300 {
        tokio::time::sleep(Duration::from_millis(100)).await;
        if handle.metrics.passes_valid.get() > 0 && first_entries() > 0 {
            break;
        }
    }
    assert!(handle.metrics.passes_valid.get() > 0 && first_entries() > 0, "no first entry within 30 s");
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
    // The savepoint carries the first entries, and the new state folder's store has them: a
    // later pass of the same vehicle is not its first entry there.
    let part = &saved.engine.parts.iter().find(|(n, _)| n == "first_entry").unwrap().1;
    let saved_entries: std::collections::BTreeMap<String, (i64, String, String, u32)> =
        serde_json::from_slice(&part.bytes).unwrap();
    let (vehicle, (ts, pass_id, checkpoint_id, revision)) = saved_entries.into_iter().next().expect("a first entry");
    let mut store = passflow::pipelines::RocksFirstEntries::open(&second.path().join("state/first_entry")).unwrap();
    let offer = |ts: i64, pass_id: &str| passflow::pipelines::Candidate {
        vehicle: vehicle.clone(),
        ts,
        pass_id: pass_id.to_owned(),
        checkpoint_id: checkpoint_id.clone(),
    };
    use passflow::pipelines::FirstEntryStore as _;
    assert_eq!(store.offer(&[offer(ts + 1, "a-later-pass")]).unwrap(), vec![None], "{vehicle} was restored");
    assert_eq!(store.offer(&[offer(ts, &pass_id)]).unwrap(), vec![Some(revision)]);
    drop(store);

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

/// The Redis server URL for tests; CI fails loudly when it is unreachable.
fn redis_url() -> String {
    let url = std::env::var("PASSFLOW_TEST_REDIS_URL").unwrap_or_else(|_| "redis://127.0.0.1:6379".into());
    let client = redis::Client::open(url.as_str()).unwrap();
    client
        .get_connection_with_timeout(Duration::from_secs(5))
        .unwrap_or_else(|e| panic!("Redis at {url} is unreachable ({e}): scripts/test starts it"));
    url
}

/// Feeds passes to a first-entry operator in chunks; returns the rows it emitted.
fn offer_all(
    op: &mut passflow::pipelines::FirstEntry,
    passes: &[passflow::model::Pass],
) -> Vec<passflow::results::FirstEntryRow> {
    use passflow::core::{Context, Operator, NO_BATCH};
    let mut rows = Vec::new();
    for chunk in passes.chunks(97) {
        let (mut out, mut late) = (passflow::results::ResultBatch::default(), Vec::new());
        let mut ctx = Context {
            watermark: i64::MAX,
            allowed_lateness_ms: 0,
            processing_now: 0,
            out: &mut out,
            late: &mut late,
            batch: &NO_BATCH,
        };
        op.process_batch(chunk, &mut ctx);
        assert!(late.is_empty(), "first entry is exempt from lateness");
        rows.extend(out.first_entry);
    }
    rows
}

#[test]
fn first_entries_in_redis_are_the_earliest_inbound_pass_once_whatever_the_order_and_replays() {
    use passflow::pipelines::{batch_first_entry, FirstEntry, RedisFirstEntries};
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let url = redis_url();
    let prefix = format!("passflow-test:{}:{}:", std::process::id(), chrono::Utc::now().timestamp_millis());
    let (city, mut all) = passes(small_day());
    let city = Arc::new(city);
    let want = batch_first_entry(&city, &all);
    assert!(want.len() > 100, "{} vehicles entered", want.len());
    all.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(9));
    let open = || FirstEntry::new(&city, Box::new(RedisFirstEntries::open(&url, &prefix).unwrap()));
    // Upserted as a store does: the highest revision per vehicle stands.
    let mut table: std::collections::BTreeMap<String, (u32, i64, String, String)> = Default::default();
    let upsert = |table: &mut std::collections::BTreeMap<String, (u32, i64, String, String)>,
                  rows: Vec<passflow::results::FirstEntryRow>| {
        for r in rows {
            let key = format!("{}:{}", r.plate, r.plate_color);
            let e = table.entry(key).or_insert((r.revision, r.ts, r.pass_id.to_string(), r.checkpoint_id.to_string()));
            assert!(
                r.revision != e.0 || (r.ts, &*r.pass_id) == (e.1, e.2.as_str()),
                "one revision, two contents: {r:?}"
            );
            if r.revision >= e.0 {
                *e = (r.revision, r.ts, r.pass_id.to_string(), r.checkpoint_id.to_string());
            }
        }
    };
    upsert(&mut table, offer_all(&mut open(), &all));
    let after_first_run = table.clone();
    // A replay (a new operator over the same Redis, as after a restart) emits no second first.
    let replayed = offer_all(&mut open(), &all);
    assert_eq!(replayed.len(), want.len(), "a replay re-emits each stored first entry once, unchanged");
    upsert(&mut table, replayed);
    assert_eq!(table, after_first_run);
    let got: std::collections::BTreeMap<String, (i64, String, String)> =
        table.into_iter().map(|(k, (_, ts, id, cp))| (k, (ts, id, cp))).collect();
    assert_eq!(got, want);
    let mut connection = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut connection).unwrap();
    assert_eq!(keys.len(), want.len());
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut connection).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_redis_that_stops_answering_holds_first_entries_back_until_it_answers_again() {
    use passflow::pipelines::{Candidate, FirstEntryStore, RedisFirstEntries};
    let url = redis_url();
    let proxy = crate::support::Proxy::start(url.trim_start_matches("redis://").split('/').next().unwrap()).await;
    let prefix = format!("passflow-test-stall:{}:{}:", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut store = RedisFirstEntries::open(&format!("redis://{}", proxy.addr), &prefix)
        .unwrap()
        .with_reply_timeout(Duration::from_millis(300));
    let candidate = |vehicle: &str, ts: i64| Candidate {
        vehicle: vehicle.into(),
        ts,
        pass_id: format!("{vehicle}-{ts}"),
        checkpoint_id: "KK0001".into(),
    };
    assert_eq!(store.offer(&[candidate("赣A1:2", 100)]).unwrap(), [Some(0)]);
    // The server takes connections and never answers: the offer waits, and goes through once
    // it answers again.
    proxy.stall();
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(store.offer(&[candidate("赣A1:2", 50), candidate("赣A2:2", 70)]).map_err(|e| e.to_string()));
    });
    assert!(result.recv_timeout(Duration::from_secs(2)).is_err(), "answered while stalled");
    proxy.restore();
    let revisions = result.recv_timeout(Duration::from_secs(30)).expect("the offer went through once Redis answered");
    assert_eq!(revisions.unwrap(), [Some(1), Some(0)], "the earlier pass replaced the first; the new vehicle's first");
    let mut connection = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut connection).unwrap();
    assert_eq!(keys.len(), 2);
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut connection).unwrap();
}

/// A Redis that refuses the offer (a key of another type under the prefix) holds the pipeline
/// back, without losing the offer, until the key is put right.
#[test]
fn a_redis_that_refuses_first_entries_holds_them_back_until_put_right() {
    use passflow::pipelines::{Candidate, FirstEntryStore, RedisFirstEntries};
    let url = redis_url();
    let prefix = format!("passflow-test-refused:{}:{}:", std::process::id(), chrono::Utc::now().timestamp_millis());
    let mut connection = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let key = format!("{prefix}first_entry:赣A9:2");
    let _: () = redis::cmd("SET").arg(&key).arg("not a hash").query(&mut connection).unwrap();
    let mut store = RedisFirstEntries::open(&url, &prefix).unwrap();
    let candidate =
        Candidate { vehicle: "赣A9:2".into(), ts: 100, pass_id: "a".into(), checkpoint_id: "KK0001".into() };
    let (done, result) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        let _ = done.send(store.offer(&[candidate]).map_err(|e| e.to_string()));
    });
    assert!(result.recv_timeout(Duration::from_secs(1)).is_err(), "answered while refused");
    let _: () = redis::cmd("DEL").arg(&key).query(&mut connection).unwrap();
    let revisions = result.recv_timeout(Duration::from_secs(30)).expect("the offer went through once put right");
    assert_eq!(revisions.unwrap(), [Some(0)]);
    let _: () = redis::cmd("DEL").arg(&key).query(&mut connection).unwrap();
}

/// Switching from the embedded first-entry store to Redis through a savepoint: its records are
/// merged into Redis, the earlier pass winning, above the revision of a record it replaces.
#[test]
fn a_savepoints_first_entries_are_merged_into_redis_the_earlier_pass_winning() {
    use passflow::pipelines::{Candidate, EmbeddedFirstEntries, FirstEntryStore, RedisFirstEntries};
    let url = redis_url();
    let prefix = format!("passflow-test-merge:{}:{}:", std::process::id(), chrono::Utc::now().timestamp_millis());
    let candidate = |vehicle: &str, ts: i64, pass_id: &str| Candidate {
        vehicle: vehicle.into(),
        ts,
        pass_id: pass_id.into(),
        checkpoint_id: "KK0001".into(),
    };
    let mut redis = RedisFirstEntries::open(&url, &prefix).unwrap();
    redis.offer(&[candidate("赣A1:2", 300, "c"), candidate("赣A3:2", 100, "z")]).unwrap();
    assert_eq!(redis.offer(&[candidate("赣A1:2", 200, "b")]).unwrap(), [Some(1)], "stored at revision 1");
    let mut embedded = EmbeddedFirstEntries::default();
    embedded
        .offer(&[candidate("赣A1:2", 100, "a"), candidate("赣A2:2", 500, "y"), candidate("赣A3:2", 400, "w")])
        .unwrap();
    redis.restore(&embedded.export().unwrap()).unwrap();
    assert_eq!(redis.offer(&[candidate("赣A1:2", 100, "a")]).unwrap(), [Some(2)], "above the row written for `b`");
    assert_eq!(redis.offer(&[candidate("赣A1:2", 200, "b")]).unwrap(), [None], "no longer the first");
    assert_eq!(redis.offer(&[candidate("赣A2:2", 500, "y")]).unwrap(), [Some(0)], "a vehicle new to Redis");
    assert_eq!(redis.offer(&[candidate("赣A3:2", 100, "z")]).unwrap(), [Some(0)], "the savepoint's later pass lost");
    let mut connection = redis::Client::open(url.as_str()).unwrap().get_connection().unwrap();
    let keys: Vec<String> = redis::cmd("KEYS").arg(format!("{prefix}*")).query(&mut connection).unwrap();
    assert_eq!(keys.len(), 3);
    let _: () = redis::cmd("DEL").arg(&keys).query(&mut connection).unwrap();
}

#[tokio::test(flavor = "multi_thread")]
async fn a_backfill_of_a_day_whose_passes_came_after_the_lateness_gives_the_on_time_tables() {
    use passflow::app::{backfill, replay, BackfillOptions, ReplayInput, ReplayOptions};
    use passflow::config::{Config, HumanDuration};
    use passflow::core::{Context, Operator, NO_BATCH};
    let dir = small_day();
    let out = tempfile::tempdir().unwrap();
    let (late_url, on_time_url) = (
        format!("sqlite://{}", out.path().join("late.db").display()),
        format!("sqlite://{}", out.path().join("on_time.db").display()),
    );
    let options = |url: &str, lateness_s: u64| {
        let mut config = Config::default();
        config.city.dir = dir.to_path_buf();
        config.core.allowed_lateness = HumanDuration::from_secs(lateness_s);
        // Batches of minutes of this small city's traffic, so that the watermark moves through
        // the day (one batch of the whole file would take every pass on time).
        config.core.replay_batch = std::num::NonZeroUsize::new(2048).unwrap();
        ReplayOptions {
            config,
            input: ReplayInput::File(dir.join("passes.jsonl")),
            store_url: url.to_owned(),
            now_ms: None,
            checkpoint_dir: None,
        }
    };
    // With one minute of lateness the outage's passes (hours late) miss their windows.
    replay(options(&late_url, 60)).await.unwrap();
    replay(options(&on_time_url, 6 * 3600)).await.unwrap();
    let (late, on_time) = (Store::open(&late_url).await.unwrap(), Store::open(&on_time_url).await.unwrap());
    let late_ids: std::collections::HashSet<String> =
        late.late_passes().await.unwrap().into_iter().map(|(id, _)| id).collect();
    assert!(!late_ids.is_empty());

    // The archive holds what arrived in time; the late passes are in the store.
    let (city, all) = passes(dir);
    let city = Arc::new(city);
    let archive = out.path().join("archive");
    let mut op = passflow::pipelines::Archive::new(&city, TZ, &archive);
    let in_time: Vec<passflow::model::Pass> = all.iter().filter(|p| !late_ids.contains(&*p.pass_id)).cloned().collect();
    let (mut sink, mut missed) = (passflow::results::ResultBatch::default(), Vec::new());
    let mut ctx = Context {
        watermark: 0,
        allowed_lateness_ms: 0,
        processing_now: 0,
        out: &mut sink,
        late: &mut missed,
        batch: &NO_BATCH,
    };
    op.process_batch(&in_time, &mut ctx);
    op.on_checkpoint(1, &mut ctx);

    let day = chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap();
    let start = passflow::simulator::day_start_ms(day, TZ);
    let end = start + 86_400_000;
    let in_day = |t: i64| (start..end).contains(&t);
    let flows = |rows: Vec<passflow::store::StoredFlowCount>| -> Vec<_> {
        rows.into_iter().filter(|r| in_day(r.3)).map(|r| (r.0, r.1, r.2, r.3, r.4)).collect()
    };
    let before = flows(late.flow_counts().await.unwrap());
    assert!(before != flows(on_time.flow_counts().await.unwrap()), "the late replay misses passes");
    let mut config = Config::default();
    config.city.dir = dir.to_path_buf();
    let summary =
        backfill(BackfillOptions { config, day, store_url: late_url.clone(), archive_dir: archive }).await.unwrap();
    assert_eq!(summary.late_passes, late_ids.len());
    assert!(summary.rows_written > 10_000, "{summary:?}");

    assert!(
        flows(late.flow_counts().await.unwrap()) == flows(on_time.flow_counts().await.unwrap()),
        "flow_counts differ"
    );
    let origins = |rows: Vec<(String, i64, String, String, String, i64)>| -> Vec<_> {
        rows.into_iter().filter(|r| in_day(r.1)).collect()
    };
    assert!(
        origins(late.origin_counts().await.unwrap()) == origins(on_time.origin_counts().await.unwrap()),
        "origin_counts differ"
    );
    let top = |rows: Vec<(String, i64, i64, String, i64)>| -> Vec<_> {
        rows.into_iter().filter(|r| r.1 > start && r.1 <= end).collect()
    };
    assert!(top(late.top_n().await.unwrap()) == top(on_time.top_n().await.unwrap()), "top_n differs");
    let segments = |rows: Vec<(String, i64, i64, i64, f64, f64, i64)>| -> Vec<_> {
        rows.into_iter().filter(|r| in_day(r.2)).collect()
    };
    assert!(
        segments(late.segment_congestion().await.unwrap()) == segments(on_time.segment_congestion().await.unwrap()),
        "segment_congestion differs"
    );
    let areas = |rows: Vec<(String, String, i64, i64, f64, f64, i64)>| -> Vec<_> {
        rows.into_iter().filter(|r| in_day(r.3)).collect()
    };
    assert!(
        areas(late.area_congestion().await.unwrap()) == areas(on_time.area_congestion().await.unwrap()),
        "area_congestion differs"
    );
    let speeds =
        |rows: Vec<(String, i64, i64, i64, f64)>| -> Vec<_> { rows.into_iter().filter(|r| in_day(r.2)).collect() };
    assert!(
        speeds(late.checkpoint_speed().await.unwrap()) == speeds(on_time.checkpoint_speed().await.unwrap()),
        "checkpoint_speed differs"
    );
    let the_day = |rows: Vec<(String, i64, String, String, String, String)>| -> Vec<_> {
        rows.into_iter().filter(|r| r.2 == "2026-03-02").collect()
    };
    assert!(
        the_day(late.trajectories().await.unwrap()) == the_day(on_time.trajectories().await.unwrap()),
        "trajectories differ"
    );
    let hf = |rows: Vec<(String, String, String, i64, i64, i64, i64)>| -> Vec<_> {
        rows.into_iter().filter(|r| r.0 == "2026-03-02").collect()
    };
    assert!(
        hf(late.high_frequency().await.unwrap()) == hf(on_time.high_frequency().await.unwrap()),
        "high_frequency differs"
    );
    assert_eq!(late.restrictions().await.unwrap(), on_time.restrictions().await.unwrap());
}
