//! The embedded SQLite store (one file, WAL mode).

use super::tables::{
    retractions, sort_by_key, top_n_rows, top_n_windows, upserts, Guard, Table, Val, TOP_N, TOP_N_WINDOW_KEYS,
};
use crate::results::ResultBatch;
use rusqlite::types::{ToSqlOutput, Value, ValueRef};
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions, SqliteSynchronous};
use sqlx::SqlitePool;
use std::path::Path;
use std::str::FromStr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::mpsc::{sync_channel, SyncSender};
use std::sync::{Arc, Mutex};

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

/// The SQLite store. Reads (the API, tests) go through a sqlx pool; result batches are written
/// by one rusqlite connection on a blocking thread, each row bound to a prepared statement that
/// is compiled once per connection: the write path is the store's bottleneck in a replay, and
/// a per-row prepared upsert costs a few microseconds where a multi-row sqlx statement costs
/// several times that in argument conversion and hand-over to sqlx's worker. The write-ahead
/// log is copied back into the database by a thread of its own (see [`spawn_checkpointer`]),
/// not by the commits.
pub struct SqliteStore {
    pub(super) pool: SqlitePool,
    writer: Arc<Mutex<rusqlite::Connection>>,
    /// Wakes the checkpointer after a commit.
    checkpoints: SyncSender<()>,
    /// Set by the checkpointer when the log has reached its limit: the writer then copies it
    /// all after its next commit.
    log_full: Arc<AtomicBool>,
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
            .pragma("temp_store", "memory")
            // Commits of the API's changes leave the log to the checkpointer too.
            .pragma("wal_autocheckpoint", "0");
        let pool = SqlitePoolOptions::new().max_connections(4).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        let writer = open_writer(path)?;
        let log_full = Arc::new(AtomicBool::new(false));
        let checkpoints = spawn_checkpointer(path, Arc::clone(&log_full))?;
        Ok(SqliteStore { pool, writer: Arc::new(Mutex::new(writer)), checkpoints, log_full })
    }

    /// Writes a batch in one transaction: rows upserted by key, a stored higher revision kept.
    pub async fn write(&self, batch: Arc<ResultBatch>) -> anyhow::Result<()> {
        self.in_transaction(move |tx| write_rows(tx, &batch)).await
    }

    /// Runs `work` in one immediate transaction of the writer connection, on a blocking thread.
    pub(super) async fn in_transaction(
        &self,
        work: impl FnOnce(&rusqlite::Transaction) -> rusqlite::Result<()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let (writer, checkpoints, log_full) =
            (Arc::clone(&self.writer), self.checkpoints.clone(), Arc::clone(&self.log_full));
        tokio::task::spawn_blocking(move || {
            let mut conn = writer.lock().unwrap_or_else(|poisoned| poisoned.into_inner());
            let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
            work(&tx)?;
            tx.commit()?;
            if log_full.swap(false, Ordering::Relaxed) {
                // The log has reached its limit: it is copied all now, before the next commit
                // (which then starts it over).
                if let Err(e) = checkpoint_all(&conn) {
                    tracing::warn!(error = %e, "SQLite checkpoint failed");
                }
            }
            // A wake-up already pending covers this commit too.
            let _ = checkpoints.try_send(());
            Ok(())
        })
        .await?
    }

    /// Runs a change through the pool (the API's, retention's) and has the checkpointer look
    /// at the log; returns the rows it touched.
    pub(super) async fn change<'q>(
        &self,
        query: sqlx::query::Query<'q, sqlx::Sqlite, sqlx::sqlite::SqliteArguments<'q>>,
    ) -> anyhow::Result<u64> {
        let touched = query.execute(&self.pool).await?.rows_affected();
        let _ = self.checkpoints.try_send(());
        Ok(touched)
    }
}

/// The connection that writes result batches. Its commits leave the write-ahead log to the
/// checkpointer.
fn open_writer(path: &str) -> anyhow::Result<rusqlite::Connection> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    // Upserts land all over the key space: a large page cache keeps them from rewriting the
    // same pages again and again.
    conn.execute_batch(
        "PRAGMA synchronous = NORMAL; PRAGMA cache_size = -262144; PRAGMA temp_store = memory; \
         PRAGMA wal_autocheckpoint = 0; PRAGMA journal_size_limit = 67108864;",
    )?;
    conn.set_prepared_statement_cache_capacity(64);
    Ok(conn)
}

/// How long the writer and the checkpointer wait for a lock another connection holds.
const BUSY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Frames (pages) the write-ahead log may hold before the writer copies it all itself (64 MB
/// of 4 KB pages).
const WAL_LIMIT_FRAMES: i64 = 16_384;

/// Starts the thread that copies the write-ahead log back into the database after commits, on
/// a connection of its own: SQLite would otherwise do it inside the commit that fills the log
/// past a thousand pages, with the writer waiting. Its passive checkpoints never block the
/// writer, which starts the log over once one has copied all of it. A writer that commits again
/// before that lets the log grow; once it holds [`WAL_LIMIT_FRAMES`], `log_full` has the writer
/// copy it all after its next commit, so it stays bounded (and `journal_size_limit` cuts the
/// file back). A failed checkpoint leaves the log to the next round: nothing is lost. The thread
/// ends with the store.
fn spawn_checkpointer(path: &str, log_full: Arc<AtomicBool>) -> anyhow::Result<SyncSender<()>> {
    let conn = rusqlite::Connection::open(path)?;
    conn.busy_timeout(BUSY_TIMEOUT)?;
    let (wake, woken) = sync_channel::<()>(1);
    std::thread::Builder::new().name("passflow-sqlite-checkpoint".into()).spawn(move || {
        while woken.recv().is_ok() {
            match conn.query_row("PRAGMA wal_checkpoint(PASSIVE)", [], |row| row.get::<_, i64>(1)) {
                Ok(frames) if frames >= WAL_LIMIT_FRAMES => log_full.store(true, Ordering::Relaxed),
                Ok(_) => {}
                Err(e) => tracing::warn!(error = %e, "SQLite checkpoint failed"),
            }
        }
    })?;
    Ok(wake)
}

/// Copies the whole log into the database, waiting for readers of older snapshots; the next
/// write starts the log over.
fn checkpoint_all(conn: &rusqlite::Connection) -> anyhow::Result<()> {
    let busy: i64 = conn.query_row("PRAGMA wal_checkpoint(RESTART)", [], |row| row.get(0))?;
    anyhow::ensure!(busy == 0, "readers held the write-ahead log for {BUSY_TIMEOUT:?}; it is copied at a later commit");
    Ok(())
}

/// SQLite's "database is locked" or "busy".
fn is_locked(e: &anyhow::Error) -> bool {
    e.chain().any(|cause| {
        cause.downcast_ref::<sqlx::Error>().is_some_and(
            |e| matches!(e, sqlx::Error::Database(d) if matches!(d.code().as_deref(), Some("5") | Some("6"))),
        ) || cause.downcast_ref::<rusqlite::Error>().is_some_and(|e| {
            matches!(
                e.sqlite_error_code(),
                Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
            )
        })
    })
}

impl rusqlite::ToSql for Val<'_> {
    fn to_sql(&self) -> rusqlite::Result<ToSqlOutput<'_>> {
        Ok(match self {
            Val::Text(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Val::Owned(t) => ToSqlOutput::Borrowed(ValueRef::Text(t.as_bytes())),
            Val::Int(i) => ToSqlOutput::Owned(Value::Integer(*i)),
            Val::Real(r) => ToSqlOutput::Owned(Value::Real(*r)),
            Val::Null => ToSqlOutput::Owned(Value::Null),
        })
    }
}

/// Every row of a batch, one prepared statement per table: upserts, retractions, and each
/// Top-N window replaced whole.
pub(super) fn write_rows(tx: &rusqlite::Transaction, batch: &ResultBatch) -> rusqlite::Result<()> {
    fn each(tx: &rusqlite::Transaction, sql: &str, rows: &[Vec<Val>]) -> rusqlite::Result<()> {
        if rows.is_empty() {
            return Ok(());
        }
        let mut statement = tx.prepare_cached(sql)?;
        for row in rows {
            statement.execute(rusqlite::params_from_iter(row))?;
        }
        Ok(())
    }
    for (table, mut rows) in upserts(batch) {
        sort_by_key(table, &mut rows);
        each(tx, &format!("{}{}", insert_one(table), upsert_tail(table)), &rows)?;
    }
    for (table, rows) in retractions(batch) {
        each(tx, &delete_one(table, table.keys, table.revision()), &rows)?;
    }
    each(tx, &delete_one(&TOP_N, TOP_N_WINDOW_KEYS, None), &top_n_windows(batch))?;
    each(tx, &insert_one(&TOP_N), &top_n_rows(batch))
}

/// `INSERT INTO t (…) VALUES (?, …)`: one row.
fn insert_one(table: &Table) -> String {
    let marks = vec!["?"; table.keys.len() + table.values.len()].join(", ");
    format!("INSERT INTO {} ({}) VALUES ({marks})", table.name, table.columns())
}

/// `DELETE FROM t WHERE k1 = ? AND … [AND guard <= ?]`: one key (a retracted row is deleted
/// unless a higher revision is stored).
fn delete_one(table: &Table, keys: &[&str], guard: Option<&str>) -> String {
    let mut conditions: Vec<String> = keys.iter().map(|k| format!("`{k}` = ?")).collect();
    conditions.extend(guard.map(|g| format!("`{g}` <= ?")));
    format!("DELETE FROM {} WHERE {}", table.name, conditions.join(" AND "))
}

/// ` ON CONFLICT (keys) DO UPDATE SET … WHERE excluded.guard >= table.guard` (or
/// `(excluded.a, excluded.b) <= (table.a, table.b)` for an earliest-first guard), or
/// `DO NOTHING`.
fn upsert_tail(table: &Table) -> String {
    let keys = table.keys.join(", ");
    let condition = match table.guard {
        None => return format!(" ON CONFLICT ({keys}) DO NOTHING"),
        Some(Guard::Highest(guard)) => format!("excluded.{guard} >= {}.{guard}", table.name),
        Some(Guard::Earliest { by, .. }) => {
            let new: Vec<String> = by.iter().map(|c| format!("excluded.{c}")).collect();
            let stored: Vec<String> = by.iter().map(|c| format!("{}.{c}", table.name)).collect();
            format!("({}) <= ({})", new.join(", "), stored.join(", "))
        }
    };
    let set: Vec<String> = table.values.iter().map(|c| format!("{c} = excluded.{c}")).collect();
    format!(" ON CONFLICT ({keys}) DO UPDATE SET {} WHERE {condition}", set.join(", "))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::FlowCountRow;

    /// Rows the writer commits reach the database file without a later commit or the store's
    /// closing: the writer never checkpoints, so only the checkpointer can have copied them.
    #[tokio::test]
    async fn committed_rows_are_checkpointed_into_the_database_file_in_the_background() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("results.db");
        let store = SqliteStore::open(path.to_str().unwrap()).await.unwrap();
        // The schema may still be in the log: copy it first, so the file's size is the tables'.
        let admin = rusqlite::Connection::open(&path).unwrap();
        admin.query_row("PRAGMA wal_checkpoint(TRUNCATE)", [], |_| Ok(())).unwrap();
        let before = std::fs::metadata(&path).unwrap().len();
        let rows = (0..20_000)
            .map(|i| FlowCountRow {
                level: "checkpoint",
                key_id: format!("KK{i:05}").into(),
                window_s: 30,
                window_start: 1_772_409_600_000,
                passes: i,
                revision: 0,
            })
            .collect();
        store.write(Arc::new(ResultBatch { flow_counts: rows, ..ResultBatch::default() })).await.unwrap();
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        while std::fs::metadata(&path).unwrap().len() <= before {
            assert!(std::time::Instant::now() < deadline, "the database file stayed at {before} bytes");
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        let stored: i64 = admin.query_row("SELECT COUNT(*) FROM flow_counts", [], |r| r.get(0)).unwrap();
        assert_eq!(stored, 20_000);
    }
}
