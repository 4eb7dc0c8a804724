//! The embedded SQLite store (one file, WAL mode).

use super::CHUNK_ROWS;
use crate::ingest::DeadLetter;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::{QueryBuilder, Sqlite, SqlitePool};
use std::path::Path;
use std::str::FromStr;

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS dead_letters (
    id TEXT PRIMARY KEY,
    reason TEXT NOT NULL,
    record TEXT NOT NULL,
    received_at INTEGER NOT NULL
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
            .synchronous(SqliteSynchronous::Normal);
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        Ok(SqliteStore { pool })
    }

    pub async fn write_dead_letters(&self, rows: &[DeadLetter]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<Sqlite> =
                QueryBuilder::new("INSERT INTO dead_letters (id, reason, record, received_at) ");
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.id).push_bind(r.reason.code()).push_bind(&r.record).push_bind(r.received_at);
            });
            q.push(" ON CONFLICT (id) DO NOTHING");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
