//! Result stores: where result rows go, upserted by key so that a replay or a corrected
//! re-emission never duplicates a row, and a stored higher revision is never overwritten. One
//! interface, three places: SQLite (the embedded default), MySQL (migrations under
//! `migrations/`), and `null://`, which discards everything.

mod mysql;
mod sqlite;
mod tables;

pub use tables::{for_each_json_row, JsonRow};

use crate::results::ResultBatch;
use anyhow::Context;
use std::sync::Arc;

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
        Store::open_with(url, false).await
    }

    /// Opens a store as [`Store::open`] does, but waits for a MySQL server that cannot be
    /// reached yet (one that starts after passflow, or is down for a while) instead of failing:
    /// each failed attempt is logged with its cause and made again after a pause that doubles
    /// up to 30 s. Any other failure (a bad URL, a migration refused, a SQLite file
    /// that cannot be made) ends it at once.
    pub async fn open_waiting(url: &str) -> anyhow::Result<Store> {
        Store::open_with(url, true).await
    }

    /// [`Store::open`], or [`Store::open_waiting`] when `wait`.
    async fn open_with(url: &str, wait: bool) -> anyhow::Result<Store> {
        if let Some(path) = url.strip_prefix("sqlite://") {
            return Ok(Store::Sqlite(
                sqlite::SqliteStore::open(path).await.with_context(|| format!("opening SQLite store {path}"))?,
            ));
        }
        if url.starts_with("mysql://") {
            return Ok(Store::MySql(mysql::MySqlStore::open(url, wait).await.context("opening MySQL store")?));
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

    /// Writes a batch of results: in one transaction (SQLite), or one per connection it is
    /// shared out over (MySQL).
    pub async fn write(&self, batch: impl Into<Arc<ResultBatch>>) -> anyhow::Result<()> {
        match self {
            Store::Sqlite(s) => s.write(batch.into()).await,
            Store::MySql(s) => s.write(&batch.into()).await,
            Store::Null => Ok(()),
        }
    }

    /// Replaces one local day's rows: every windowed row whose window starts in [start, end)
    /// (Top-N: ends in (start, end]) and every daily row of `day` is deleted, then `batch` is
    /// written — in one transaction. Alerts and first entries are only upserted.
    pub async fn replace_day(&self, day: &str, start: i64, end: i64, batch: ResultBatch) -> anyhow::Result<()> {
        const WINDOWED: [&str; 5] =
            ["flow_counts", "origin_counts", "checkpoint_speed", "segment_congestion", "area_congestion"];
        const DAILY: [&str; 4] = ["high_frequency", "trajectories", "restriction_violations", "restriction_summary"];
        // Every windowed delete binds (start, end); every daily one binds the day.
        let windowed: Vec<String> = WINDOWED
            .iter()
            .map(|t| format!("DELETE FROM {t} WHERE window_start >= ? AND window_start < ?"))
            .chain(["DELETE FROM top_n WHERE window_end > ? AND window_end <= ?".to_owned()])
            .collect();
        let daily: Vec<String> = DAILY.iter().map(|t| format!("DELETE FROM {t} WHERE day = ?")).collect();
        match self {
            Store::Sqlite(s) => {
                let day = day.to_owned();
                s.in_transaction(move |tx| {
                    for sql in &windowed {
                        tx.execute(sql, [start, end])?;
                    }
                    for sql in &daily {
                        tx.execute(sql, [&day])?;
                    }
                    sqlite::write_rows(tx, &batch)
                })
                .await?;
            }
            Store::MySql(s) => {
                let mut tx = s.pool.begin().await?;
                for sql in &windowed {
                    sqlx::query(sql).bind(start).bind(end).execute(&mut *tx).await?;
                }
                for sql in &daily {
                    sqlx::query(sql).bind(day).execute(&mut *tx).await?;
                }
                mysql::write_rows(&mut tx, &batch).await?;
                tx.commit().await?;
            }
            Store::Null => {}
        }
        Ok(())
    }

    /// Runs a read query for the API: `binds` in order, each row an object of `columns`.
    pub async fn query(
        &self,
        sql: &str,
        binds: Vec<Bind>,
        columns: &[Column],
    ) -> anyhow::Result<Vec<serde_json::Value>> {
        match self {
            Store::Sqlite(s) => {
                bound(sql, binds).fetch_all(&s.pool).await?.iter().map(|r| row_json(r, columns)).collect()
            }
            Store::MySql(s) => {
                bound(sql, binds).fetch_all(&s.pool).await?.iter().map(|r| row_json(r, columns)).collect()
            }
            Store::Null => Ok(Vec::new()),
        }
    }

    /// Runs a change for the API; returns the rows it touched.
    pub async fn execute(&self, sql: &str, binds: Vec<Bind>) -> anyhow::Result<u64> {
        Ok(match self {
            Store::Sqlite(s) => s.change(bound(sql, binds)).await?,
            Store::MySql(s) => bound(sql, binds).execute(&s.pool).await?.rows_affected(),
            Store::Null => 0,
        })
    }

    /// Raw records of late passes with `ts` in [from, to): (pass_id, record).
    pub async fn late_records(&self, from: i64, to: i64) -> anyhow::Result<Vec<(String, String)>> {
        let sql = "SELECT CAST(pass_id AS CHAR), CAST(record AS CHAR) FROM late_passes WHERE ts >= ? AND ts < ? ORDER BY pass_id";
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_as(sql).bind(from).bind(to).fetch_all(&s.pool).await?,
            Store::MySql(s) => sqlx::query_as(sql).bind(from).bind(to).fetch_all(&s.pool).await?,
            Store::Null => Vec::new(),
        })
    }

    /// Deletes the rows of `table` older than `before_ms` (by the table's time column);
    /// returns how many went.
    pub async fn purge(&self, table: &str, before_ms: i64) -> anyhow::Result<u64> {
        let column = match table {
            "flow_counts" | "origin_counts" | "checkpoint_speed" | "segment_congestion" | "area_congestion" => {
                "window_start"
            }
            "top_n" => "window_end",
            "late_passes" => "arrived_at",
            "alerts" => "ts",
            "dead_letters" => "received_at",
            "high_frequency" | "trajectories" | "restriction_violations" | "restriction_summary" => {
                // Days are `YYYY-MM-DD` strings, which sort as dates.
                let day = chrono::DateTime::from_timestamp_millis(before_ms)
                    .map_or_else(String::new, |t| t.format("%Y-%m-%d").to_string());
                return self.delete_before(&format!("DELETE FROM {table} WHERE day < ?"), day).await;
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
            Store::Sqlite(s) => s.change(sqlx::query(sql).bind(bound)).await?,
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

    /// Every stored segment row: (segment, window_s, window_start, traversals, km/h, index, level).
    pub async fn segment_congestion(&self) -> anyhow::Result<Vec<(String, i64, i64, i64, f64, f64, i64)>> {
        self.fetch(
            "SELECT CAST(segment_id AS CHAR), window_s, window_start, traversals, mean_speed_kmh, travel_time_index, \
             congestion_level FROM segment_congestion ORDER BY segment_id, window_s, window_start",
        )
        .await
    }

    /// Every stored area row: (level, key, window_s, window_start, km/h, index, level).
    pub async fn area_congestion(&self) -> anyhow::Result<Vec<(String, String, i64, i64, f64, f64, i64)>> {
        self.fetch(
            "SELECT CAST(level AS CHAR), CAST(key_id AS CHAR), window_s, window_start, mean_speed_kmh, \
             travel_time_index, congestion_level FROM area_congestion ORDER BY level, key_id, window_s, window_start",
        )
        .await
    }

    /// Every stored alert of `kind`: (alert_id, ts, plate, checkpoint, status, details).
    pub async fn alerts(&self, kind: &str) -> anyhow::Result<Vec<StoredAlert>> {
        let sql = "SELECT CAST(alert_id AS CHAR), ts, CAST(plate AS CHAR), CAST(checkpoint_id AS CHAR), \
                   CAST(status AS CHAR), CAST(details AS CHAR) FROM alerts WHERE kind = ? ORDER BY alert_id";
        Ok(match self {
            Store::Sqlite(s) => sqlx::query_as(sql).bind(kind).fetch_all(&s.pool).await?,
            Store::MySql(s) => sqlx::query_as(sql).bind(kind).fetch_all(&s.pool).await?,
            Store::Null => Vec::new(),
        })
    }

    /// Traffic-surge, sudden-congestion and cloned-plate alerts (active or retracted) with
    /// `ts >= since`: what a pipeline restored from a checkpoint adopts (see
    /// `Operator::adopt_alerts`).
    pub async fn alerts_to_adopt(&self, since: i64) -> anyhow::Result<Vec<crate::results::AlertRow>> {
        use crate::pipelines::{CLONED_PLATE, SUDDEN_CONGESTION, TRAFFIC_SURGE};
        #[derive(sqlx::FromRow)]
        struct Row {
            alert_id: String,
            kind: String,
            ts: i64,
            plate: Option<String>,
            plate_color: Option<i64>,
            checkpoint_id: Option<String>,
            segment_id: Option<String>,
            details: String,
            status: String,
            revision: i64,
        }
        let sql = "SELECT CAST(alert_id AS CHAR) AS alert_id, CAST(kind AS CHAR) AS kind, ts, \
                   CAST(plate AS CHAR) AS plate, CAST(plate_color AS SIGNED) AS plate_color, \
                   CAST(checkpoint_id AS CHAR) AS checkpoint_id, CAST(segment_id AS CHAR) AS segment_id, \
                   CAST(details AS CHAR) AS details, CAST(status AS CHAR) AS status, revision FROM alerts \
                   WHERE kind IN (?, ?, ?) AND ts >= ? ORDER BY alert_id";
        let kinds = [TRAFFIC_SURGE, SUDDEN_CONGESTION, CLONED_PLATE];
        let rows: Vec<Row> = match self {
            Store::Sqlite(s) => {
                sqlx::query_as(sql).bind(kinds[0]).bind(kinds[1]).bind(kinds[2]).bind(since).fetch_all(&s.pool).await?
            }
            Store::MySql(s) => {
                sqlx::query_as(sql).bind(kinds[0]).bind(kinds[1]).bind(kinds[2]).bind(since).fetch_all(&s.pool).await?
            }
            Store::Null => Vec::new(),
        };
        Ok(rows
            .into_iter()
            .filter_map(|r| {
                let kind = *kinds.iter().find(|k| **k == r.kind)?;
                Some(crate::results::AlertRow {
                    alert_id: r.alert_id,
                    kind,
                    ts: r.ts,
                    plate: r.plate.map(Into::into),
                    plate_color: r.plate_color.and_then(|c| u8::try_from(c).ok()),
                    checkpoint_id: r.checkpoint_id.map(Into::into),
                    segment_id: r.segment_id.map(Into::into),
                    severity: "medium",
                    details: r.details,
                    status: if r.status == "active" { "active" } else { "retracted" },
                    revision: u32::try_from(r.revision).unwrap_or(u32::MAX),
                })
            })
            .collect())
    }

    /// Every stored trajectory: (plate, colour, day, times, checkpoints, intervals_s), JSON lists.
    pub async fn trajectories(&self) -> anyhow::Result<Vec<(String, i64, String, String, String, String)>> {
        self.fetch(
            "SELECT CAST(plate AS CHAR), plate_color, CAST(day AS CHAR), CAST(times AS CHAR), \
             CAST(checkpoints AS CHAR), CAST(intervals_s AS CHAR) FROM trajectories ORDER BY plate, plate_color, day",
        )
        .await
    }

    /// Every stored violation as (pass_id, rule_id), and every summary as (day, checkpoint,
    /// rule, violations, vehicles).
    #[allow(clippy::type_complexity)]
    pub async fn restrictions(
        &self,
    ) -> anyhow::Result<(Vec<(String, String)>, Vec<(String, String, String, i64, i64)>)> {
        let violations = self
            .fetch("SELECT CAST(pass_id AS CHAR), CAST(rule_id AS CHAR) FROM restriction_violations ORDER BY pass_id, rule_id")
            .await?;
        let summaries = self
            .fetch(
                "SELECT CAST(day AS CHAR), CAST(checkpoint_id AS CHAR), CAST(rule_id AS CHAR), violations, vehicles \
                 FROM restriction_summary ORDER BY day, checkpoint_id, rule_id",
            )
            .await?;
        Ok((violations, summaries))
    }

    /// Every stored first entry: (plate, colour, ts, checkpoint, pass_id, revision).
    pub async fn first_entries(&self) -> anyhow::Result<Vec<(String, i64, i64, String, String, i64)>> {
        self.fetch(
            "SELECT CAST(plate AS CHAR), plate_color, ts, CAST(checkpoint_id AS CHAR), CAST(pass_id AS CHAR), revision \
             FROM first_entry ORDER BY plate, plate_color",
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

/// A value bound to an API query.
#[derive(Clone, Debug)]
pub enum Bind {
    Int(i64),
    Text(String),
}

/// A column an API query reads, with its JSON name.
#[derive(Clone, Copy, Debug)]
pub enum Column {
    Int(&'static str),
    Real(&'static str),
    Text(&'static str),
    /// Text holding JSON, returned as JSON.
    Json(&'static str),
}

/// `sql` with `binds` bound in order.
fn bound<'q, DB>(sql: &'q str, binds: Vec<Bind>) -> sqlx::query::Query<'q, DB, <DB as sqlx::Database>::Arguments<'q>>
where
    DB: sqlx::Database,
    i64: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
    String: sqlx::Encode<'q, DB> + sqlx::Type<DB>,
{
    binds.into_iter().fold(sqlx::query(sql), |q, b| match b {
        Bind::Int(i) => q.bind(i),
        Bind::Text(t) => q.bind(t),
    })
}

/// One row of an API query as a JSON object.
fn row_json<R: sqlx::Row>(row: &R, columns: &[Column]) -> anyhow::Result<serde_json::Value>
where
    usize: sqlx::ColumnIndex<R>,
    for<'r> Option<i64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<f64>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
    for<'r> Option<String>: sqlx::Decode<'r, R::Database> + sqlx::Type<R::Database>,
{
    let mut out = serde_json::Map::new();
    for (i, c) in columns.iter().enumerate() {
        let (name, value) = match c {
            Column::Int(n) => (n, serde_json::json!(row.try_get::<Option<i64>, _>(i)?)),
            Column::Real(n) => (n, serde_json::json!(row.try_get::<Option<f64>, _>(i)?)),
            Column::Text(n) => (n, serde_json::json!(row.try_get::<Option<String>, _>(i)?)),
            Column::Json(n) => {
                let text = row.try_get::<Option<String>, _>(i)?;
                (n, text.and_then(|t| serde_json::from_str(&t).ok()).unwrap_or(serde_json::Value::Null))
            }
        };
        out.insert((*name).to_owned(), value);
    }
    Ok(serde_json::Value::Object(out))
}

/// An alert as stored: (alert_id, ts, plate, checkpoint_id, status, details).
pub type StoredAlert = (String, i64, Option<String>, Option<String>, String, String);

fn pipelines_json(pipelines: &[&str]) -> String {
    serde_json::to_string(pipelines).unwrap_or_else(|_| "[]".into())
}
