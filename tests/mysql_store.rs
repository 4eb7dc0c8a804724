//! The MySQL store against the real MariaDB on this machine.

use crate::support::{labels, small_day, TestDatabase};
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::Config;
use passflow::store::Store;

fn options(store_url: &str) -> ReplayOptions {
    options_for(small_day(), store_url)
}

fn options_for(dir: &std::path::Path, store_url: &str) -> ReplayOptions {
    let mut config = Config::default();
    config.city.dir = dir.to_path_buf();
    // Batches of a few minutes of this small city's traffic: the store is written many times
    // during a replay, as a larger city's would be.
    config.core.replay_batch = std::num::NonZeroUsize::new(2048).unwrap();
    ReplayOptions {
        config,
        input: ReplayInput::File(dir.join("passes.jsonl")),
        store_url: store_url.to_owned(),
        now_ms: None,
        checkpoint_dir: None,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_and_sqlite_hold_the_same_tables_and_a_second_replay_adds_no_row() {
    let db = TestDatabase::create("replay").await;
    let sqlite_dir = tempfile::tempdir().unwrap();
    let sqlite_url = format!("sqlite://{}", sqlite_dir.path().join("r.db").display());
    replay(options(&db.url)).await.unwrap();
    replay(options(&db.url)).await.unwrap();
    replay(options(&sqlite_url)).await.unwrap();
    let mysql = Store::open(&db.url).await.unwrap();
    let sqlite = Store::open(&sqlite_url).await.unwrap();
    let (m, s) = (mysql.flow_counts().await.unwrap(), sqlite.flow_counts().await.unwrap());
    assert!(m.len() > 1_000, "{} flow rows", m.len());
    let without_revision = |rows: &[passflow::store::StoredFlowCount]| {
        rows.iter().map(|r| (r.0.clone(), r.1.clone(), r.2, r.3, r.4)).collect::<Vec<_>>()
    };
    assert_eq!(without_revision(&m), without_revision(&s));
    let segments = mysql.segment_congestion().await.unwrap();
    assert!(segments.len() > 1_000, "{} segment rows", segments.len());
    assert_eq!(segments, sqlite.segment_congestion().await.unwrap());
    assert_eq!(mysql.area_congestion().await.unwrap(), sqlite.area_congestion().await.unwrap());
    assert_eq!(mysql.high_frequency().await.unwrap(), sqlite.high_frequency().await.unwrap());
    assert_eq!(mysql.checkpoint_speed().await.unwrap(), sqlite.checkpoint_speed().await.unwrap());
    assert_eq!(mysql.top_n().await.unwrap(), sqlite.top_n().await.unwrap());
    let expected: Vec<(String, i64)> =
        labels(small_day()).dead_letters.into_iter().map(|(k, v)| (k, v as i64)).collect();
    assert_eq!(mysql.dead_letter_counts().await.unwrap(), expected);
    assert_eq!(sqlite.dead_letter_counts().await.unwrap(), expected);
    db.drop_now().await;
}

#[tokio::test(flavor = "multi_thread")]
async fn mysql_going_away_mid_replay_pauses_the_replay_and_loses_nothing() {
    let db = TestDatabase::create("outage").await;
    // Create the tables first, straight to the server.
    drop(Store::open(&db.url).await.unwrap());
    let (proxy, via_proxy) = proxied(&db).await;
    let day = tempfile::tempdir().unwrap();
    let made = crate::support::passflow()
        .args(["simulate", "--out"])
        .arg(day.path())
        .args(["--vehicles", "3000", "--seed", "4"])
        .status()
        .unwrap();
    assert!(made.success());
    let sqlite_url = format!("sqlite://{}", day.path().join("r.db").display());
    replay(options_for(day.path(), &sqlite_url)).await.unwrap();

    let direct = Store::open(&db.url).await.unwrap();
    let replaying = tokio::spawn(replay(options_for(day.path(), &via_proxy)));
    while direct.flow_counts().await.unwrap().is_empty() {
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    }
    proxy.cut();
    let summary = waits_for(&proxy, replaying, "the replay", 120).await.unwrap();
    assert_eq!(summary.stats.records, labels(day.path()).records);

    let (mysql, sqlite) = (Store::open(&db.url).await.unwrap(), Store::open(&sqlite_url).await.unwrap());
    let strip = |rows: Vec<passflow::store::StoredFlowCount>| {
        rows.into_iter().map(|r| (r.0, r.1, r.2, r.3, r.4)).collect::<Vec<_>>()
    };
    assert_eq!(strip(mysql.flow_counts().await.unwrap()), strip(sqlite.flow_counts().await.unwrap()));
    assert_eq!(mysql.origin_counts().await.unwrap(), sqlite.origin_counts().await.unwrap());
    assert_eq!(mysql.top_n().await.unwrap(), sqlite.top_n().await.unwrap());
    assert_eq!(mysql.dead_letter_counts().await.unwrap(), sqlite.dead_letter_counts().await.unwrap());
    db.drop_now().await;
}

/// What `task` gives: it must still be waiting 3 s into `proxy`'s cut, and end within
/// `within_s` of its being restored. `what` names the task in failures.
async fn waits_for<T>(proxy: &crate::support::Proxy, task: tokio::task::JoinHandle<T>, what: &str, within_s: u64) -> T {
    tokio::time::sleep(std::time::Duration::from_secs(3)).await;
    assert!(!task.is_finished(), "{what} waits while MySQL cannot be reached");
    proxy.restore();
    tokio::time::timeout(std::time::Duration::from_secs(within_s), task)
        .await
        .unwrap_or_else(|_| panic!("{what} ends once MySQL is back"))
        .unwrap()
}

/// The proxied URL of `db`'s database, through a proxy of its own.
async fn proxied(db: &TestDatabase) -> (crate::support::Proxy, String) {
    let server = db.url.trim_start_matches("mysql://").split_once('@').map(|(_, rest)| rest).unwrap();
    let (host_port, database) = server.split_once('/').unwrap();
    let proxy = crate::support::Proxy::start(host_port).await;
    let url = format!("mysql://root@{}/{database}", proxy.addr);
    (proxy, url)
}

#[tokio::test(flavor = "multi_thread")]
async fn a_mysql_store_that_cannot_be_reached_is_refused_with_its_cause() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap().local_addr().unwrap();
    let error = Store::open(&format!("mysql://root@{closed}/x")).await.err().expect("nothing listens there");
    let error = format!("{error:#}");
    assert!(error.contains("refused") && !error.contains("timed out"), "{error}");
}

#[tokio::test(flavor = "multi_thread")]
async fn the_service_waits_for_a_mysql_store_it_cannot_reach_yet_and_starts_when_it_can() {
    let db = TestDatabase::create("late_start").await;
    let (proxy, url) = proxied(&db).await;
    proxy.cut();
    let dir = tempfile::tempdir().unwrap();
    let mut config = crate::support::service_config(dir.path());
    config.store.url = url;
    config.source.simulator.vehicles = 2_000;
    config.source.simulator.speed = 600.0;
    let starting = tokio::spawn(passflow::app::run(config, None));
    let handle = waits_for(&proxy, starting, "the service's start", 60).await.unwrap();
    let direct = Store::open(&db.url).await.unwrap();
    let mut written = false;
    for _ in 0..300 {
        if !direct.flow_counts().await.unwrap().is_empty() {
            written = true;
            break;
        }
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
    }
    assert!(written, "no flow count reached MySQL within 30 s of its coming");
    handle.stop();
    tokio::time::timeout(std::time::Duration::from_secs(30), handle.wait()).await.expect("stops").unwrap();
    db.drop_now().await;
}

/// Rows at `old` and `new` times in every table with a retention.
fn rows_at(old: i64, new: i64) -> passflow::results::ResultBatch {
    use passflow::results::*;
    let mut b = ResultBatch::default();
    for t in [old, new] {
        b.flow_counts.push(FlowCountRow {
            level: "city",
            key_id: "all".into(),
            window_s: 30,
            window_start: t,
            passes: 1,
            revision: 0,
        });
        b.top_n.push(TopNWindow {
            metric: "checkpoint_flow",
            window_s: 60,
            slide_s: 5,
            window_end: t,
            entries: vec![("A".into(), 3)],
        });
        let day = chrono::DateTime::from_timestamp_millis(t).unwrap().format("%Y-%m-%d").to_string();
        b.high_frequency.push(HighFrequencyRow {
            day,
            checkpoint_id: "A".into(),
            plate: "赣A1".into(),
            plate_color: 2,
            passes: 8,
            first_ts: t,
            last_ts: t,
        });
        b.segment_congestion.push(segment_row(t, 1, 0));
        b.area_congestion.push(area_row(t, 0, false));
        b.dead_letters.push(passflow::ingest::DeadLetter {
            id: format!("f:{t}"),
            reason: passflow::model::RejectReason::MalformedJson,
            record: "{".into(),
            received_at: t,
        });
    }
    b
}

#[tokio::test(flavor = "multi_thread")]
async fn retention_purges_old_rows_and_keeps_new_ones_in_both_stores() {
    let db = TestDatabase::create("retention").await;
    let dir = tempfile::tempdir().unwrap();
    let (old, new) = (1_700_000_000_000_i64, 1_700_000_000_000_i64 + 10 * 86_400_000);
    for url in [db.url.clone(), format!("sqlite://{}", dir.path().join("r.db").display())] {
        let store = Store::open(&url).await.unwrap();
        store.write(rows_at(old, new)).await.unwrap();
        let cutoff = old + 5 * 86_400_000;
        for table in ["flow_counts", "top_n", "high_frequency", "segment_congestion", "area_congestion", "dead_letters"]
        {
            assert_eq!(store.purge(table, cutoff).await.unwrap(), 1, "{table} in {}", store.kind());
            assert_eq!(store.purge(table, cutoff).await.unwrap(), 0);
        }
        assert_eq!(store.flow_counts().await.unwrap().len(), 1);
        assert_eq!(store.top_n().await.unwrap()[0].1, new);
        assert_eq!(store.high_frequency().await.unwrap()[0].5, new);
        assert!(store.purge("passes", cutoff).await.is_err());
    }
    db.drop_now().await;
}

fn segment_row(window_start: i64, traversals: u32, revision: u32) -> passflow::results::SegmentCongestionRow {
    passflow::results::SegmentCongestionRow {
        segment_id: "SG1".into(),
        window_s: 60,
        window_start,
        traversals,
        mean_speed_kmh: 42.5,
        travel_time_index: 1.25,
        congestion_level: 1,
        revision,
    }
}

fn area_row(window_start: i64, revision: u32, retracted: bool) -> passflow::results::AreaCongestionRow {
    passflow::results::AreaCongestionRow {
        level: "region",
        key_id: "R1".into(),
        window_s: 60,
        window_start,
        mean_speed_kmh: 42.5,
        travel_time_index: 1.25,
        congestion_level: 1,
        revision,
        retracted,
    }
}

#[tokio::test(flavor = "multi_thread")]
async fn a_retraction_deletes_the_stored_row_unless_a_newer_one_is_stored_in_both_stores() {
    let db = TestDatabase::create("retraction").await;
    let dir = tempfile::tempdir().unwrap();
    for url in [db.url.clone(), format!("sqlite://{}", dir.path().join("r.db").display())] {
        let store = Store::open(&url).await.unwrap();
        let mut batch = passflow::results::ResultBatch::default();
        batch.segment_congestion = vec![segment_row(0, 2, 3), segment_row(60_000, 1, 0)];
        batch.area_congestion = vec![area_row(0, 3, false), area_row(60_000, 0, false)];
        store.write(batch.clone()).await.unwrap();
        // A stale retraction (revision 2 < 3) leaves the row; a current one deletes it.
        batch.segment_congestion = vec![segment_row(0, 0, 2), segment_row(60_000, 0, 1)];
        batch.area_congestion = vec![area_row(0, 2, true), area_row(60_000, 1, true)];
        store.write(batch.clone()).await.unwrap();
        let segments = store.segment_congestion().await.unwrap();
        assert_eq!(segments.iter().map(|r| (r.2, r.3)).collect::<Vec<_>>(), vec![(0, 2)], "{}", store.kind());
        let areas = store.area_congestion().await.unwrap();
        assert_eq!(areas.iter().map(|r| r.3).collect::<Vec<_>>(), vec![0], "{}", store.kind());
    }
    db.drop_now().await;
}

fn first_entry(ts: i64, pass_id: &str, revision: u32) -> passflow::results::FirstEntryRow {
    passflow::results::FirstEntryRow {
        plate: "赣A12345".into(),
        plate_color: 2,
        ts,
        checkpoint_id: format!("KK{pass_id}").into(),
        pass_id: pass_id.into(),
        revision,
    }
}

/// A vehicle's stored first entry is its earliest pass, whatever revision a row carries: a
/// first-entry store that lost its records (Redis without persistence, restarted) offers the
/// vehicle's next pass as a first entry again, at revision 0.
#[tokio::test(flavor = "multi_thread")]
async fn a_later_pass_never_replaces_a_stored_first_entry_in_both_stores() {
    let db = TestDatabase::create("first_entry").await;
    let dir = tempfile::tempdir().unwrap();
    for url in [db.url.clone(), format!("sqlite://{}", dir.path().join("f.db").display())] {
        let store = Store::open(&url).await.unwrap();
        let write = |rows: Vec<passflow::results::FirstEntryRow>| {
            let batch = passflow::results::ResultBatch { first_entry: rows, ..Default::default() };
            store.write(batch)
        };
        let stored =
            || async { store.first_entries().await.unwrap().into_iter().map(|r| (r.2, r.4, r.5)).collect::<Vec<_>>() };
        write(vec![first_entry(2_000, "p2", 0)]).await.unwrap();
        write(vec![first_entry(3_000, "p3", 0), first_entry(5_000, "p5", 7)]).await.unwrap();
        assert_eq!(stored().await, [(2_000, "p2".to_owned(), 0)], "{}", store.kind());
        // An earlier pass (a late one, or a tie on time broken by the pass id) replaces it.
        write(vec![first_entry(2_000, "p1", 1)]).await.unwrap();
        assert_eq!(stored().await, [(2_000, "p1".to_owned(), 1)], "{}", store.kind());
        // Earlier in time with a larger pass id wins whole (MySQL sets the columns in turn);
        // later in time with a smaller one loses.
        write(vec![first_entry(1_000, "p9", 2)]).await.unwrap();
        assert_eq!(stored().await, [(1_000, "p9".to_owned(), 2)], "{}", store.kind());
        write(vec![first_entry(1_500, "a", 3)]).await.unwrap();
        write(vec![first_entry(1_000, "p0", 3)]).await.unwrap();
        write(vec![first_entry(1_000, "p0", 3)]).await.unwrap();
        let rows = store.first_entries().await.unwrap();
        assert_eq!(rows.len(), 1);
        assert_eq!(
            (rows[0].2, rows[0].3.as_str(), rows[0].4.as_str(), rows[0].5),
            (1_000, "KKp0", "p0", 3),
            "{}",
            store.kind()
        );
    }
    db.drop_now().await;
}

/// SQLite takes result batches through its writer connection while the API's connections
/// write too (acknowledgements, watch list, purges): each waits for the other's lock, none
/// fails and nothing is lost.
#[tokio::test(flavor = "multi_thread")]
async fn sqlite_batches_and_api_changes_written_at_the_same_time_all_land() {
    use passflow::results::{FlowCountRow, ResultBatch};
    use passflow::store::Bind;
    let dir = tempfile::tempdir().unwrap();
    let url = format!("sqlite://{}", dir.path().join("r.db").display());
    let (pipeline, api) = (Store::open(&url).await.unwrap(), Store::open(&url).await.unwrap());
    const BATCHES: i64 = 30;
    const ROWS: i64 = 5_000;
    let writes = async {
        for b in 0..BATCHES {
            let mut batch = ResultBatch::default();
            batch.flow_counts = (0..ROWS)
                .map(|i| FlowCountRow {
                    level: "checkpoint",
                    key_id: format!("K{i}").into(),
                    window_s: 30,
                    window_start: b * 30_000,
                    passes: 1,
                    revision: 0,
                })
                .collect();
            pipeline.write(batch).await.unwrap();
        }
    };
    let changes = async {
        for i in 0..100 {
            let sql = "INSERT INTO dead_letters (id, reason, record, received_at) VALUES (?, 'malformed_json', '{', 0)";
            api.execute(sql, vec![Bind::Text(format!("api:{i}"))]).await.unwrap();
            tokio::time::sleep(std::time::Duration::from_millis(3)).await;
        }
    };
    tokio::join!(writes, changes);
    assert_eq!(api.flow_counts().await.unwrap().len() as i64, BATCHES * ROWS);
    assert_eq!(api.dead_letter_counts().await.unwrap(), vec![("malformed_json".to_owned(), 100)]);
}
