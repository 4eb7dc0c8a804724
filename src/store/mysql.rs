//! The MySQL store; its tables come from the migrations under `migrations/`, applied on open.

use super::CHUNK_ROWS;
use crate::ingest::DeadLetter;
use sqlx::mysql::MySqlPoolOptions;
use sqlx::{MySql, MySqlPool, QueryBuilder};

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

    pub async fn write_dead_letters(&self, rows: &[DeadLetter]) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in rows.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> =
                QueryBuilder::new("INSERT INTO dead_letters (id, reason, record, received_at) ");
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&r.id).push_bind(r.reason.code()).push_bind(&r.record).push_bind(r.received_at);
            });
            q.push(" ON DUPLICATE KEY UPDATE id = id");
            q.build().execute(&mut *tx).await?;
        }
        tx.commit().await?;
        Ok(())
    }
}
