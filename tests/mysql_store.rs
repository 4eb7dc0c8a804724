//! The MySQL store against the real MariaDB on this machine.

use crate::support::{labels, small_day, TestDatabase};
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::Config;
use passflow::store::Store;

fn options(store_url: &str) -> ReplayOptions {
    let dir = small_day();
    let mut config = Config::default();
    config.city.dir = dir.to_path_buf();
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
    let expected: Vec<(String, i64)> =
        labels(small_day()).dead_letters.into_iter().map(|(k, v)| (k, v as i64)).collect();
    assert_eq!(mysql.dead_letter_counts().await.unwrap(), expected);
    assert_eq!(sqlite.dead_letter_counts().await.unwrap(), expected);
    db.drop_now().await;
}
