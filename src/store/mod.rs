//! Result stores: where result rows go, upserted by key so that a replay or a corrected
//! re-emission never duplicates a row. One interface, three places: SQLite (the embedded
//! default), MySQL (migrations under `migrations/`), and `null://`, which discards everything.

mod mysql;
mod sqlite;

use crate::ingest::DeadLetter;
use anyhow::Context;

/// Rows per multi-row INSERT.
const CHUNK_ROWS: usize = 1_000;

pub enum Store {
    Sqlite(sqlite::SqliteStore),
    MySql(mysql::MySqlStore),
    Null,
}

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

    /// Writes dead letters; a row whose id is already stored is left as it is.
    pub async fn write_dead_letters(&self, rows: &[DeadLetter]) -> anyhow::Result<()> {
        match self {
            Store::Sqlite(s) => s.write_dead_letters(rows).await,
            Store::MySql(s) => s.write_dead_letters(rows).await,
            Store::Null => Ok(()),
        }
    }

    /// Dead letters stored, by reason (for summaries and tests).
    pub async fn dead_letter_counts(&self) -> anyhow::Result<Vec<(String, i64)>> {
        // CAST: sqlx reads utf8mb4_bin columns as binary.
        let sql = "SELECT CAST(reason AS CHAR), COUNT(*) FROM dead_letters GROUP BY reason ORDER BY reason";
        match self {
            Store::Sqlite(s) => Ok(sqlx::query_as(sql).fetch_all(&s.pool).await?),
            Store::MySql(s) => Ok(sqlx::query_as(sql).fetch_all(&s.pool).await?),
            Store::Null => Ok(Vec::new()),
        }
    }
}
