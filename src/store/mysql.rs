//! The MySQL store; its tables come from the migrations under `migrations/`, applied on open.

use super::tables::{
    delete_keys, delete_retracted, retractions, sort_by_key, statement, top_n_rows, top_n_windows, upserts, Guard,
    Table, Val, TOP_N, TOP_N_WINDOW_KEYS,
};
use crate::results::ResultBatch;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{MySql, MySqlPool};

pub struct MySqlStore {
    pub(super) pool: MySqlPool,
}

/// How long one attempt to reach the server may take.
const REACH_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);
/// The first pause before the server is tried again, when opening waits for it.
const FIRST_WAIT: std::time::Duration = std::time::Duration::from_millis(500);
/// The longest pause before the server is tried again.
const LONGEST_WAIT: std::time::Duration = std::time::Duration::from_secs(30);

impl MySqlStore {
    /// Connects to the server once and lets go: when it cannot, the error says why (refused,
    /// denied, no such database). A pool that cannot connect only says it timed out waiting.
    async fn reach(url: &str) -> anyhow::Result<()> {
        use sqlx::Connection;
        let connecting = sqlx::MySqlConnection::connect(url);
        let connection = tokio::time::timeout(REACH_TIMEOUT, connecting)
            .await
            .map_err(|_| anyhow::anyhow!("no answer within {} s", REACH_TIMEOUT.as_secs()))?
            // sqlx's message already ends with its cause's.
            .map_err(|e| anyhow::anyhow!("{e}"))?;
        connection.close().await?;
        Ok(())
    }

    /// Opens the store once the server can be reached; `wait`: while it cannot, each attempt
    /// is logged with its cause and made again after a pause that doubles up to
    /// [`LONGEST_WAIT`] (else the first failure is returned).
    pub async fn open(url: &str, wait: bool) -> anyhow::Result<MySqlStore> {
        let mut pause = FIRST_WAIT;
        while let Err(e) = MySqlStore::reach(url).await {
            if !wait {
                return Err(e);
            }
            tracing::warn!(
                error = format!("{e:#}"),
                retry_in_s = pause.as_secs_f64(),
                "the MySQL store cannot be reached; waiting for it"
            );
            tokio::time::sleep(pause).await;
            pause = (pause * 2).min(LONGEST_WAIT);
        }
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(MySqlStore { pool })
    }

    /// Writes a batch: rows upserted by key, a stored higher revision kept. The tables are
    /// shared out over `LANES` connections, each writing its tables in one transaction, so the
    /// server works on several at once. A batch is therefore not one transaction across tables;
    /// it needs none: every write is an idempotent upsert (or a whole Top-N window replaced in
    /// one transaction), a failed batch is written again whole, and a checkpoint completes only
    /// after every lane has committed.
    pub async fn write(&self, batch: &ResultBatch) -> anyhow::Result<()> {
        let mut lanes: Vec<(usize, Vec<Part>)> = (0..LANES).map(|_| (0, Vec::new())).collect();
        let mut parts = parts(batch);
        parts.sort_by_key(|p| std::cmp::Reverse(p.rows()));
        for part in parts {
            let lightest = lanes.iter_mut().min_by_key(|(rows, _)| *rows).expect("at least one lane");
            lightest.0 += part.rows();
            lightest.1.push(part);
        }
        futures::future::try_join_all(lanes.into_iter().filter(|(rows, _)| *rows > 0).map(|(_, parts)| async move {
            let mut tx = self.pool.begin().await?;
            for part in &parts {
                part.write(&mut tx).await?;
            }
            tx.commit().await?;
            anyhow::Ok(())
        }))
        .await?;
        Ok(())
    }
}

/// Rows per multi-row statement, at most: fewer, larger statements cost the server less per row.
const CHUNK_ROWS: usize = 4_000;
/// Placeholders one prepared statement may hold (MySQL's protocol limit).
const MAX_PLACEHOLDERS: usize = 65_535;

/// Rows per statement for rows of `columns` values.
fn chunk_rows(columns: usize) -> usize {
    (MAX_PLACEHOLDERS / columns.max(1)).min(CHUNK_ROWS)
}

/// Connections one batch is written over.
const LANES: usize = 2;

/// What one transaction writes of a batch: a table's upserts or retractions, or the Top-N
/// windows (deleted and inserted whole).
enum Part<'a> {
    Upserts(&'static Table, Vec<Vec<Val<'a>>>),
    Retractions(&'static Table, Vec<Vec<Val<'a>>>),
    TopN { windows: Vec<Vec<Val<'a>>>, ranked: Vec<Vec<Val<'a>>> },
}

fn parts(batch: &ResultBatch) -> Vec<Part<'_>> {
    let mut parts: Vec<Part> = upserts(batch)
        .into_iter()
        .map(|(table, mut rows)| {
            sort_by_key(table, &mut rows);
            Part::Upserts(table, rows)
        })
        .collect();
    parts.extend(retractions(batch).into_iter().map(|(table, rows)| Part::Retractions(table, rows)));
    parts.push(Part::TopN { windows: top_n_windows(batch), ranked: top_n_rows(batch) });
    parts.retain(|p| p.rows() > 0);
    parts
}

impl Part<'_> {
    fn rows(&self) -> usize {
        match self {
            Part::Upserts(_, rows) | Part::Retractions(_, rows) => rows.len(),
            Part::TopN { windows, ranked } => windows.len() + ranked.len(),
        }
    }

    async fn write(&self, tx: &mut sqlx::Transaction<'_, MySql>) -> anyhow::Result<()> {
        match self {
            Part::Upserts(table, rows) => {
                let (head, tail) = (insert_head(table), upsert_tail(table));
                for chunk in rows.chunks(chunk_rows(table.keys.len() + table.values.len())) {
                    statement::<MySql>(&head, chunk, &tail).build().execute(&mut **tx).await?;
                }
            }
            Part::Retractions(table, rows) => {
                for row in rows {
                    delete_retracted::<MySql>(table, row).build().execute(&mut **tx).await?;
                }
            }
            Part::TopN { windows, ranked } => {
                for chunk in windows.chunks(chunk_rows(TOP_N_WINDOW_KEYS.len())) {
                    delete_keys::<MySql>(&TOP_N, TOP_N_WINDOW_KEYS, chunk).build().execute(&mut **tx).await?;
                }
                for chunk in ranked.chunks(chunk_rows(TOP_N.keys.len() + TOP_N.values.len())) {
                    statement::<MySql>(&insert_head(&TOP_N), chunk, "").build().execute(&mut **tx).await?;
                }
            }
        }
        Ok(())
    }
}

/// Every row of a batch in one transaction (a day replaced by a backfill).
pub(super) async fn write_rows(tx: &mut sqlx::Transaction<'_, MySql>, batch: &ResultBatch) -> anyhow::Result<()> {
    for part in parts(batch) {
        part.write(tx).await?;
    }
    Ok(())
}

fn insert_head(table: &Table) -> String {
    format!("INSERT INTO {} ({}) ", table.name, table.columns())
}

/// `ON DUPLICATE KEY UPDATE c = IF(VALUES(guard) >= guard, VALUES(c), c), …`, or for an
/// earliest-first guard `c = IF((VALUES(a), VALUES(b)) <= (a, b), VALUES(c), c)`. MySQL assigns
/// in order, each seeing the ones before: the guard's columns go last, the least significant
/// first, so every condition still compares the stored row (once `b` is set,
/// `(VALUES(a), VALUES(b)) <= (a, b)` holds just when it held before). Without a guard the
/// first row stands.
fn upsert_tail(table: &Table) -> String {
    let (condition, last): (String, Vec<&str>) = match table.guard {
        None => return format!(" ON DUPLICATE KEY UPDATE `{0}` = `{0}`", table.keys[0]),
        Some(Guard::Highest(guard)) => (format!("VALUES(`{guard}`) >= `{guard}`"), vec![guard]),
        Some(Guard::Earliest { by, .. }) => {
            let new: Vec<String> = by.iter().map(|c| format!("VALUES(`{c}`)")).collect();
            let stored: Vec<String> = by.iter().map(|c| format!("`{c}`")).collect();
            (format!("({}) <= ({})", new.join(", "), stored.join(", ")), by.iter().rev().copied().collect())
        }
    };
    let set: Vec<String> = table
        .values
        .iter()
        .filter(|c| !last.contains(c))
        .chain(&last)
        .map(|c| format!("`{c}` = IF({condition}, VALUES(`{c}`), `{c}`)"))
        .collect();
    format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
}
