//! The MySQL store against the real MariaDB on this machine.

use crate::support::{labels, small_day, TestDatabase};
use passflow::app::{replay, ReplayInput, ReplayOptions};
use passflow::config::Config;
use passflow::store::Store;

#[tokio::test(flavor = "multi_thread")]
async fn a_replay_into_mysql_stores_each_dead_letter_once_even_when_replayed_again() {
    let db = TestDatabase::create("deadletters").await;
    let dir = small_day();
    let mut config = Config::default();
    config.city.dir = dir.to_path_buf();
    for _ in 0..2 {
        let options = ReplayOptions {
            config: config.clone(),
            input: ReplayInput::File(dir.join("passes.jsonl")),
            store_url: db.url.clone(),
            now_ms: None,
        };
        replay(options).await.unwrap();
    }
    let store = Store::open(&db.url).await.unwrap();
    let counts: Vec<(String, i64)> = store.dead_letter_counts().await.unwrap();
    let expected: Vec<(String, i64)> = labels(dir).dead_letters.into_iter().map(|(k, v)| (k, v as i64)).collect();
    assert_eq!(counts, expected);
    db.drop_now().await;
}
