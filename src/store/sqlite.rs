//! The embedded SQLite store (one file, WAL mode).

use super::tables::{
    delete_keys, delete_retracted, retractions, statement, top_n_rows, top_n_windows, upserts, Table, TOP_N,
};
use super::CHUNK_ROWS;
use crate::results::ResultBatch;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{Sqlite, SqlitePool, Transaction};
use std::path::Path;
use std::str::FromStr;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    record TEXT NOT NULL,
    received_at INTEGER NOT NULL
);
CREATE TABLE IF NOT EXISTS flow_counts (
    level TEXT NOT NULL,
    key_id TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    passes INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (level, key_id, window_s, window_start)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS flow_counts_by_time ON flow_counts (level, window_s, window_start);
CREATE TABLE IF NOT EXISTS origin_counts (
    region_id TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    origin_province TEXT NOT NULL,
    origin_city TEXT NOT NULL,
    scope TEXT NOT NULL,
    vehicles INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (region_id, window_s, window_start, origin_province, origin_city)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS top_n (
    metric TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    slide_s INTEGER NOT NULL,
    window_end INTEGER NOT NULL,
    rank INTEGER NOT NULL,
    key_id TEXT NOT NULL,
    value INTEGER NOT NULL,
    PRIMARY KEY (metric, window_s, slide_s, window_end, rank)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS high_frequency (
    day TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    plate TEXT NOT NULL,
    plate_color INTEGER NOT NULL,
    passes INTEGER NOT NULL,
    first_ts INTEGER NOT NULL,
    last_ts INTEGER NOT NULL,
    PRIMARY KEY (day, checkpoint_id, plate, plate_color)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS checkpoint_speed (
    checkpoint_id TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    samples INTEGER NOT NULL,
    mean_speed_kmh REAL NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (checkpoint_id, window_s, window_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS segment_congestion (
    segment_id TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    traversals INTEGER NOT NULL,
    mean_speed_kmh REAL NOT NULL,
    travel_time_index REAL NOT NULL,
    congestion_level INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (segment_id, window_s, window_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS area_congestion (
    level TEXT NOT NULL,
    key_id TEXT NOT NULL,
    window_s INTEGER NOT NULL,
    window_start INTEGER NOT NULL,
    mean_speed_kmh REAL NOT NULL,
    travel_time_index REAL NOT NULL,
    congestion_level INTEGER NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (level, key_id, window_s, window_start)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS alerts (
    alert_id TEXT PRIMARY KEY,
    kind TEXT NOT NULL,
    ts INTEGER NOT NULL,
    plate TEXT,
    plate_color INTEGER,
    checkpoint_id TEXT,
    segment_id TEXT,
    severity TEXT NOT NULL,
    details TEXT NOT NULL,
    status TEXT NOT NULL,
    revision INTEGER NOT NULL,
    acknowledged_by TEXT,
    acknowledged_at INTEGER
);
CREATE INDEX IF NOT EXISTS alerts_by_time ON alerts (kind, ts);
CREATE INDEX IF NOT EXISTS alerts_by_plate ON alerts (plate, plate_color, ts);
CREATE TABLE IF NOT EXISTS trajectories (
    plate TEXT NOT NULL,
    plate_color INTEGER NOT NULL,
    day TEXT NOT NULL,
    passes INTEGER NOT NULL,
    times TEXT NOT NULL,
    checkpoints TEXT NOT NULL,
    intervals_s TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (plate, plate_color, day)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS restriction_violations (
    pass_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    plate TEXT NOT NULL,
    plate_color INTEGER NOT NULL,
    checkpoint_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    day TEXT NOT NULL,
    PRIMARY KEY (pass_id, rule_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS restriction_summary (
    day TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    rule_id TEXT NOT NULL,
    violations INTEGER NOT NULL,
    vehicles INTEGER NOT NULL,
    PRIMARY KEY (day, checkpoint_id, rule_id)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS first_entry (
    plate TEXT NOT NULL,
    plate_color INTEGER NOT NULL,
    ts INTEGER NOT NULL,
    checkpoint_id TEXT NOT NULL,
    pass_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    PRIMARY KEY (plate, plate_color)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS late_passes (
    pass_id TEXT PRIMARY KEY,
    pipelines TEXT NOT NULL,
    checkpoint_id TEXT NOT NULL,
    ts INTEGER NOT NULL,
    arrived_at INTEGER NOT NULL,
    record TEXT NOT NULL
);
";

pub struct SqliteStore {
    pub(super) pool: SqlitePool,
}

impl SqliteStore {
    /// Opens (or creates) the store. Processes opening one file at once (instances of one
    /// machine) may find it locked while another sets it up: opening is tried again then.
    pub async fn open(path: &str) -> anyhow::Result<SqliteStore> {
        let started = std::time::Instant::now();
        loop {
            match Self::try_open(path).await {
                Err(e) if is_locked(&e) && started.elapsed() < std::time::Duration::from_secs(60) => {
                    tokio::time::sleep(std::time::Duration::from_millis(200)).await;
                }
                result => return result,
            }
        }
    }

    async fn try_open(path: &str) -> anyhow::Result<SqliteStore> {
        if let Some(dir) = Path::new(path).parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{path}"))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal)
            .synchronous(SqliteSynchronous::Normal)
            // Upserts land all over the key space: a large page cache keeps them from
            // rewriting the same pages again and again.
            .pragma("cache_size", "-262144")
            .pragma("temp_store", "memory");
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(SqliteStore { pool })
    }

    /// Writes a batch in one transaction: rows upserted by key, a stored higher revision kept.
    pub async fn write(&self, batch: &ResultBatch) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        write_rows(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(())
    }
}

/// SQLite's "database is locked" or "busy".
fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<sqlx::Error>().is_some_and(
            |e| matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5") | Some("6"))),
        )
    })
}

pub(super) async fn write_rows(tx: &mut Transaction<'_, Sqlite>, batch: &ResultBatch) -> anyhow::Result<()> {
    for (table, rows) in upserts(batch) {
        let (head, tail) = (insert_head(table), upsert_tail(table));
        for chunk in rows.chunks(CHUNK_ROWS) {
            statement::<Sqlite>(&head, chunk, &tail).build().execute(&mut **tx).await?;
        }
    }
    for (table, rows) in retractions(batch) {
        for row in &rows {
            delete_retracted::<Sqlite>(table, row).build().execute(&mut **tx).await?;
        }
    }
    let windows = top_n_windows(batch);
    for chunk in windows.chunks(CHUNK_ROWS) {
        delete_keys::<Sqlite>(&TOP_N, &TOP_N.keys[..4], chunk).build().execute(&mut **tx).await?;
    }
    let ranked = top_n_rows(batch);
    for chunk in ranked.chunks(CHUNK_ROWS) {
        statement::<Sqlite>(&insert_head(&TOP_N), chunk, "").build().execute(&mut **tx).await?;
    }
    Ok(())
}

fn insert_head(table: &Table) -> String {
    format!("INSERT INTO {} ({}) ", table.name, table.columns())
}

/// `ON CONFLICT (keys) DO UPDATE SET … WHERE excluded.guard >= table.guard`, or `DO NOTHING`.
fn upsert_tail(table: &Table) -> String {
    let keys = table.keys.join(", ");
    match table.guard {
        None => format!(" ON CONFLICT ({keys}) DO NOTHING"),
        Some(guard) => {
            let set: Vec<String> = table.values.iter().map(|c| format!("{c} = excluded.{c}")).collect();
            format!(
                " ON CONFLICT ({keys}) DO UPDATE SET {} WHERE excluded.{guard} >= {}.{guard}",
                set.join(", "),
                table.name
            )
        }
    }
}
