//! The MySQL store; its tables come from the migrations under `migrations/`, applied on open.

use super::tables::{
    delete_keys, delete_retracted, retractions, sort_by_key, statement, top_n_rows, top_n_windows, upserts, Table,
    TOP_N,
};
use super::CHUNK_ROWS;
use crate::results::ResultBatch;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{MySql, MySqlPool};

pub struct MySqlStore {
    pub(super) pool: MySqlPool,
}

impl MySqlStore {
    pub async fn open(url: &str) -> anyhow::Result<MySqlStore> {
        let pool = MySqlPoolOptions::new()
            .max_connections(4)
            .acquire_timeout(std::time::Duration::from_secs(10))
            .connect(url)
            .await?;
        sqlx::migrate!("./migrations").run(&pool).await?;
        Ok(MySqlStore { pool })
    }

    /// Writes a batch in one transaction: rows upserted by key, a stored higher revision kept.
    pub async fn write(&self, batch: &ResultBatch) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        write_rows(&mut tx, batch).await?;
        tx.commit().await?;
        Ok(())
    }
}

pub(super) async fn write_rows(tx: &mut sqlx::Transaction<'_, MySql>, batch: &ResultBatch) -> anyhow::Result<()> {
    for (table, mut rows) in upserts(batch) {
        sort_by_key(table, &mut rows);
        let (head, tail) = (insert_head(table), upsert_tail(table));
        for chunk in rows.chunks(CHUNK_ROWS) {
            statement::<MySql>(&head, chunk, &tail).build().execute(&mut **tx).await?;
        }
    }
    for (table, rows) in retractions(batch) {
        for row in &rows {
            delete_retracted::<MySql>(table, row).build().execute(&mut **tx).await?;
        }
    }
    let windows = top_n_windows(batch);
    for chunk in windows.chunks(CHUNK_ROWS) {
        delete_keys::<MySql>(&TOP_N, &TOP_N.keys[..4], chunk).build().execute(&mut **tx).await?;
    }
    let ranked = top_n_rows(batch);
    for chunk in ranked.chunks(CHUNK_ROWS) {
        statement::<MySql>(&insert_head(&TOP_N), chunk, "").build().execute(&mut **tx).await?;
    }
    Ok(())
}

fn insert_head(table: &Table) -> String {
    format!("INSERT INTO {} ({}) ", table.name, table.columns())
}

/// `ON DUPLICATE KEY UPDATE c = IF(VALUES(guard) >= guard, VALUES(c), c), …, guard =
/// GREATEST(…)`: the guard goes last, the others compare against the stored guard before it
/// changes. Without a guard the first row stands.
fn upsert_tail(table: &Table) -> String {
    let Some(guard) = table.guard else {
        return format!(" ON DUPLICATE KEY UPDATE `{0}` = `{0}`", table.keys[0]);
    };
    let mut set: Vec<String> = table
        .values
        .iter()
        .filter(|c| **c != guard)
        .map(|c| format!("`{c}` = IF(VALUES(`{guard}`) >= `{guard}`, VALUES(`{c}`), `{c}`)"))
        .collect();
    set.push(format!("`{guard}` = GREATEST(`{guard}`, VALUES(`{guard}`))"));
    format!(" ON DUPLICATE KEY UPDATE {}", set.join(", "))
}
