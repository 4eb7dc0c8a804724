//! The embedded SQLite store (one file, WAL mode).

use super::CHUNK_ROWS;
use crate::results::{ResultBatch, TopNWindow};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool, Transaction};
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
    pub async fn open(path: &str) -> anyhow::Result<SqliteStore> {
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

async fn write_rows(tx: &mut Transaction<'_, Sqlite>, batch: &ResultBatch) -> anyhow::Result<()> {
    for chunk in batch.flow_counts.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO flow_counts (level, key_id, window_s, window_start, passes, revision) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(r.level)
                .push_bind(&*r.key_id)
                .push_bind(r.window_s)
                .push_bind(r.window_start)
                .push_bind(r.passes as i64)
                .push_bind(r.revision);
        });
        q.push(
            " ON CONFLICT (level, key_id, window_s, window_start) DO UPDATE SET passes = excluded.passes, revision = excluded.revision \
             WHERE excluded.revision >= flow_counts.revision",
        );
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.origin_counts.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO origin_counts (region_id, window_s, window_start, origin_province, origin_city, scope, vehicles, revision) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&*r.region_id)
                .push_bind(r.window_s)
                .push_bind(r.window_start)
                .push_bind(&*r.origin_province)
                .push_bind(&*r.origin_city)
                .push_bind(r.scope)
                .push_bind(r.vehicles as i64)
                .push_bind(r.revision);
        });
        q.push(
            " ON CONFLICT (region_id, window_s, window_start, origin_province, origin_city) DO UPDATE SET \
             scope = excluded.scope, vehicles = excluded.vehicles, revision = excluded.revision \
             WHERE excluded.revision >= origin_counts.revision",
        );
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.top_n.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("DELETE FROM top_n WHERE (metric, window_s, slide_s, window_end) IN (");
        let mut windows = q.separated(", ");
        for w in chunk {
            windows.push("(").push_bind_unseparated(w.metric).push_unseparated(", ").push_bind_unseparated(w.window_s);
            windows
                .push_unseparated(", ")
                .push_bind_unseparated(w.slide_s)
                .push_unseparated(", ")
                .push_bind_unseparated(w.window_end)
                .push_unseparated(")");
        }
        q.push(")");
        q.build().execute(&mut **tx).await?;
    }
    let ranked: Vec<(&TopNWindow, usize)> =
        batch.top_n.iter().flat_map(|w| (0..w.entries.len()).map(move |i| (w, i))).collect();
    for chunk in ranked.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO top_n (metric, window_s, slide_s, window_end, rank, key_id, value) ");
        q.push_values(chunk, |mut b, (w, i)| {
            let (key, value) = &w.entries[*i];
            b.push_bind(w.metric)
                .push_bind(w.window_s)
                .push_bind(w.slide_s)
                .push_bind(w.window_end)
                .push_bind(*i as i64 + 1)
                .push_bind(&**key)
                .push_bind(*value as i64);
        });
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.high_frequency.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO high_frequency (day, checkpoint_id, plate, plate_color, passes, first_ts, last_ts) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.day)
                .push_bind(&*r.checkpoint_id)
                .push_bind(&*r.plate)
                .push_bind(r.plate_color)
                .push_bind(r.passes)
                .push_bind(r.first_ts)
                .push_bind(r.last_ts);
        });
        q.push(
            " ON CONFLICT (day, checkpoint_id, plate, plate_color) DO UPDATE SET passes = excluded.passes, \
             first_ts = excluded.first_ts, last_ts = excluded.last_ts WHERE excluded.passes >= high_frequency.passes",
        );
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.checkpoint_speed.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> = QueryBuilder::new(
            "INSERT INTO checkpoint_speed (checkpoint_id, window_s, window_start, samples, mean_speed_kmh, revision) ",
        );
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&*r.checkpoint_id)
                .push_bind(r.window_s)
                .push_bind(r.window_start)
                .push_bind(r.samples)
                .push_bind(r.mean_speed_kmh)
                .push_bind(r.revision);
        });
        q.push(
            " ON CONFLICT (checkpoint_id, window_s, window_start) DO UPDATE SET samples = excluded.samples, \
             mean_speed_kmh = excluded.mean_speed_kmh, revision = excluded.revision WHERE excluded.revision >= checkpoint_speed.revision",
        );
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.late_passes.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO late_passes (pass_id, pipelines, checkpoint_id, ts, arrived_at, record) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&*r.pass_id)
                .push_bind(super::pipelines_json(&r.pipelines))
                .push_bind(&*r.checkpoint_id)
                .push_bind(r.ts)
                .push_bind(r.arrived_at)
                .push_bind(&r.record);
        });
        q.push(" ON CONFLICT (pass_id) DO NOTHING");
        q.build().execute(&mut **tx).await?;
    }
    for chunk in batch.dead_letters.chunks(CHUNK_ROWS) {
        let mut q: QueryBuilder<Sqlite> =
            QueryBuilder::new("INSERT INTO dead_letters (id, reason, record, received_at) ");
        q.push_values(chunk, |mut b, r| {
            b.push_bind(&r.id).push_bind(r.reason.code()).push_bind(&r.record).push_bind(r.received_at);
        });
        q.push(" ON CONFLICT (id) DO NOTHING");
        q.build().execute(&mut **tx).await?;
    }
    Ok(())
}
