//! Result stores: where result rows go, upserted by key so that a replay or a corrected
//! re-emission never duplicates a row, and a stored higher revision is never overwritten. One
//! interface, three places: SQLite (the embedded default), MySQL (migrations under
//! `migrations/`), and `null://`, which discards everything.

mod mysql;
mod sqlite;
mod tables;

use crate::results::ResultBatch;
use anyhow::Context;

/// Rows per multi-row INSERT.
const CHUNK_ROWS: usize = 1_000;

pub enum Store {
    Sqlite(sqlite::SqliteStore),
    MySql(mysql::MySqlStore),
    Null,
}

/// A stored flow count: (level, key_id, window_s, window_start, passes, revision).
pub type StoredFlowCount = (String, String, i64, i64, i64, i64);

impl Store {
    /// Opens a store from its URL (`sqlite://PATH`, `mysql://…`, `null://`), creating the
    /// tables when they are missing.
    pub async fn open(url: &str) -> anyhow::Result<Store> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(
                sqlite::SqliteStore::open(path).await.with_context(|| format!("opening SQLite store {path}"))?,
            ));
        }
        if url.starts_with("mysql://") {
            return Ok(Store::MySql(mysql::MySqlStore::open(url).await.context("opening MySQL store")?));
        }
        if url == "null://" || url == "null:" {
            return Ok(Store::Null);
        }
        anyhow::bail!("store URL `{url}`: expected sqlite://PATH, mysql://USER@HOST:PORT/DB or null://")
    }

    pub fn kind(&self) -> &'static str {
        match self {
            Store::Sqlite(_) => "sqlite",
            Store::MySql(_) => "mysql",
            Store::Null => "null",
        }
    }

    /// Writes a batch of results in one transaction.
    pub async fn write(&self, batch: &ResultBatch) -> anyhow::Result<()> {
        match self {
            Store::Sqlite(s) => s.write(batch).await,
            Store::MySql(s) => s.write(batch).await,
            Store::Null => Ok(()),
        }
    }

    /// Deletes the rows of `table` older than `before_ms` (by the table's time column);
    /// returns how many went.
    pub async fn purge(&self, table: &str, before_ms: i64) -> anyhow::Result<u64> {
        let column = match table {
            "flow_counts" | "origin_counts" | "checkpoint_speed" => "window_start",
            "top_n" => "window_end",
            "late_passes" => "arrived_at",
            "dead_letters" => "received_at",
            "high_frequency" => {
                // Days are `YYYY-MM-DD` strings, which sort as dates.
                let day = chrono::DateTime::from_timestamp_millis(before_ms)
                    .map_or_else(String::new, |t| t.format("%Y-%m-%d").to_string());
                return self.delete_before("DELETE FROM high_frequency WHERE day < ?", day).await;
            }
            _ => anyhow::bail!("no retention for table `{table}`"),
        };
        self.delete_before(&format!("DELETE FROM {table} WHERE {column} < ?"), before_ms).await
    }

    async fn delete_before<T>(&self, sql: &str, bound: T) -> anyhow::Result<u64>
    where
        T: Send + 'static,
        T: for<'q> sqlx::Encode<'q, sqlx::Sqlite> + sqlx::Type<sqlx::Sqlite>,
        T: for<'q> sqlx::Encode<'q, sqlx::MySql> + sqlx::Type<sqlx::MySql>,
    {
        Ok(match self {
            Store::Sqlite(s) => sqlx::query(sql).bind(bound).execute(&s.pool).await?.rows_affected(),
            Store::MySql(s) => sqlx::query(sql).bind(bound).execute(&s.pool).await?.rows_affected(),
            Store::Null => 0,
        })
    }

    /// Dead letters stored, by reason (for summaries and tests).
    pub async fn dead_letter_counts(&self) -> anyhow::Result<Vec<(String, i64)>> {
        // CAST: sqlx reads utf8mb4_bin columns as binary.
        self.fetch("SELECT CAST(reason AS CHAR), COUNT(*) FROM dead_letters GROUP BY reason ORDER BY reason").await
    }

    /// Every stored flow count, in key order.
    pub async fn flow_counts(&self) -> anyhow::Result<Vec<StoredFlowCount>> {
        self.fetch(
            "SELECT CAST(level AS CHAR), CAST(key_id AS CHAR), window_s, window_start, passes, revision FROM flow_counts \
             ORDER BY level, key_id, window_s, window_start",
        )
        .await
    }

    /// Every stored origin count: (region_id, window_start, province, city, scope, vehicles).
    pub async fn origin_counts(&self) -> anyhow::Result<Vec<(String, i64, String, String, String, i64)>> {
        self.fetch(
            "SELECT CAST(region_id AS CHAR), window_start, CAST(origin_province AS CHAR), CAST(origin_city AS CHAR), \
             CAST(scope AS CHAR), vehicles FROM origin_counts ORDER BY region_id, window_start, origin_province, origin_city",
        )
        .await
    }

    /// Every stored Top-N row: (metric, window_end, rank, key_id, value).
    pub async fn top_n(&self) -> anyhow::Result<Vec<(String, i64, i64, String, i64)>> {
        self.fetch(
            "SELECT CAST(metric AS CHAR), window_end, `rank`, CAST(key_id AS CHAR), value FROM top_n \
             ORDER BY metric, window_end, `rank`",
        )
        .await
    }

    /// Every stored high-frequency row: (day, checkpoint, plate, colour, passes, first, last).
    pub async fn high_frequency(&self) -> anyhow::Result<Vec<(String, String, String, i64, i64, i64, i64)>> {
        self.fetch(
            "SELECT CAST(day AS CHAR), CAST(checkpoint_id AS CHAR), CAST(plate AS CHAR), plate_color, passes, first_ts, last_ts \
             FROM high_frequency ORDER BY day, checkpoint_id, plate, plate_color",
        )
        .await
    }

    /// Every stored spot-speed row: (checkpoint, window_s, window_start, samples, mean km/h).
    pub async fn checkpoint_speed(&self) -> anyhow::Result<Vec<(String, i64, i64, i64, f64)>> {
        self.fetch(
            "SELECT CAST(checkpoint_id AS CHAR), window_s, window_start, samples, mean_speed_kmh FROM checkpoint_speed \
             ORDER BY checkpoint_id, window_s, window_start",
        )
        .await
    }

    /// Pass ids in `late_passes` with the pipelines they missed (a JSON array).
    pub async fn late_passes(&self) -> anyhow::Result<Vec<(String, String)>> {
        self.fetch("SELECT CAST(pass_id AS CHAR), CAST(pipelines AS CHAR) FROM late_passes ORDER BY pass_id").await
    }

    async fn fetch<T>(&self, sql: &str) -> anyhow::Result<Vec<T>>
    where
        T: Send
            + Unpin
            + for<'r> sqlx::FromRow<'r, sqlx::sqlite::SqliteRow>
            + for<'r> sqlx::FromRow<'r, sqlx::mysql::MySqlRow>,
    {
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_as(sql).fetch_all(&s.pool).await?,
            Store::MySql(s) => sqlx::query_as(sql).fetch_all(&s.pool).await?,
            Store::Null => Vec::new(),
        })
    }
}

fn pipelines_json(pipelines: &[&str]) -> String {
    serde_json::to_string(pipelines).unwrap_or_else(|_| "[]".into())
}
