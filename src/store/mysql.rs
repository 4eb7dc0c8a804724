//! The MySQL store; its tables come from the migrations under `migrations/`, applied on open.

use super::CHUNK_ROWS;
use crate::results::{ResultBatch, TopNWindow};
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

    /// Writes a batch in one transaction: rows upserted by key, a stored higher revision kept.
    pub async fn write(&self, batch: &ResultBatch) -> anyhow::Result<()> {
        let mut tx = self.pool.begin().await?;
        for chunk in batch.flow_counts.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> =
                QueryBuilder::new("INSERT INTO flow_counts (level, key_id, window_s, window_start, passes, revision) ");
            q.push_values(chunk, |mut b, r| {
                b.push_bind(r.level)
                    .push_bind(&*r.key_id)
                    .push_bind(r.window_s)
                    .push_bind(r.window_start)
                    .push_bind(r.passes)
                    .push_bind(r.revision);
            });
            // `passes` first: it must compare against the stored revision before that changes.
            q.push(
                " ON DUPLICATE KEY UPDATE passes = IF(VALUES(revision) >= revision, VALUES(passes), passes), \
                 revision = GREATEST(revision, VALUES(revision))",
            );
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.origin_counts.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> = QueryBuilder::new(
                "INSERT INTO origin_counts (region_id, window_s, window_start, origin_province, origin_city, scope, vehicles, revision) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&*r.region_id)
                    .push_bind(r.window_s)
                    .push_bind(r.window_start)
                    .push_bind(&*r.origin_province)
                    .push_bind(&*r.origin_city)
                    .push_bind(r.scope)
                    .push_bind(r.vehicles)
                    .push_bind(r.revision);
            });
            q.push(
                " ON DUPLICATE KEY UPDATE scope = IF(VALUES(revision) >= revision, VALUES(scope), scope), \
                 vehicles = IF(VALUES(revision) >= revision, VALUES(vehicles), vehicles), \
                 revision = GREATEST(revision, VALUES(revision))",
            );
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.top_n.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> =
                QueryBuilder::new("DELETE FROM top_n WHERE (metric, window_s, slide_s, window_end) IN (");
            let mut windows = q.separated(", ");
            for w in chunk {
                windows
                    .push("(")
                    .push_bind_unseparated(w.metric)
                    .push_unseparated(", ")
                    .push_bind_unseparated(w.window_s);
                windows
                    .push_unseparated(", ")
                    .push_bind_unseparated(w.slide_s)
                    .push_unseparated(", ")
                    .push_bind_unseparated(w.window_end)
                    .push_unseparated(")");
            }
            q.push(")");
            q.build().execute(&mut *tx).await?;
        }
        let ranked: Vec<(&TopNWindow, usize)> =
            batch.top_n.iter().flat_map(|w| (0..w.entries.len()).map(move |i| (w, i))).collect();
        for chunk in ranked.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> =
                QueryBuilder::new("INSERT INTO top_n (metric, window_s, slide_s, window_end, `rank`, key_id, value) ");
            q.push_values(chunk, |mut b, (w, i)| {
                let (key, value) = &w.entries[*i];
                b.push_bind(w.metric)
                    .push_bind(w.window_s)
                    .push_bind(w.slide_s)
                    .push_bind(w.window_end)
                    .push_bind(*i as i64 + 1)
                    .push_bind(&**key)
                    .push_bind(*value);
            });
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.high_frequency.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> = QueryBuilder::new(
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
            // `passes` last: the others compare against the stored count before it changes.
            q.push(
                " ON DUPLICATE KEY UPDATE first_ts = IF(VALUES(passes) >= passes, VALUES(first_ts), first_ts), \
                 last_ts = IF(VALUES(passes) >= passes, VALUES(last_ts), last_ts), passes = GREATEST(passes, VALUES(passes))",
            );
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.checkpoint_speed.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> =
                QueryBuilder::new("INSERT INTO checkpoint_speed (checkpoint_id, window_s, window_start, samples, mean_speed_kmh, revision) ");
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&*r.checkpoint_id)
                    .push_bind(r.window_s)
                    .push_bind(r.window_start)
                    .push_bind(r.samples)
                    .push_bind(r.mean_speed_kmh)
                    .push_bind(r.revision);
            });
            q.push(
                " ON DUPLICATE KEY UPDATE samples = IF(VALUES(revision) >= revision, VALUES(samples), samples), \
                 mean_speed_kmh = IF(VALUES(revision) >= revision, VALUES(mean_speed_kmh), mean_speed_kmh), \
                 revision = GREATEST(revision, VALUES(revision))",
            );
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.late_passes.chunks(CHUNK_ROWS) {
            let mut q: QueryBuilder<MySql> = QueryBuilder::new(
                "INSERT INTO late_passes (pass_id, pipelines, checkpoint_id, ts, arrived_at, record) ",
            );
            q.push_values(chunk, |mut b, r| {
                b.push_bind(&*r.pass_id)
                    .push_bind(super::pipelines_json(&r.pipelines))
                    .push_bind(&*r.checkpoint_id)
                    .push_bind(r.ts)
                    .push_bind(r.arrived_at)
                    .push_bind(&r.record);
            });
            q.push(" ON DUPLICATE KEY UPDATE pass_id = pass_id");
            q.build().execute(&mut *tx).await?;
        }
        for chunk in batch.dead_letters.chunks(CHUNK_ROWS) {
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
