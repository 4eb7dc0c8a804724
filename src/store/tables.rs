//! The result tables as data, shared by both stores: each table's key and value columns, how a
//! row binds, and which column orders updates. Each store turns a table into its own upsert
//! (`ON CONFLICT … WHERE` in SQLite, `ON DUPLICATE KEY UPDATE … IF` in MySQL).

use crate::results::ResultBatch;
use sqlx::query_builder::Separated;
use sqlx::{Database, Encode, QueryBuilder, Type};

/// One bound value of a row.
pub(super) enum Val<'a> {
    Text(&'a str),
    Owned(String),
    Int(i64),
    Real(f64),
}

/// A result table.
pub(super) struct Table {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    pub values: &'static [&'static str],
    /// The value column that orders updates: a stored row is replaced only by one with an
    /// equal or higher value. `None`: the first row stands.
    pub guard: Option<&'static str>,
}

impl Table {
    pub fn columns(&self) -> String {
        self.keys.iter().chain(self.values).map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
    }
}

const FLOW_COUNTS: Table = Table {
    name: "flow_counts",
    keys: &["level", "key_id", "window_s", "window_start"],
    values: &["passes", "revision"],
    guard: Some("revision"),
};
const ORIGIN_COUNTS: Table = Table {
    name: "origin_counts",
    keys: &["region_id", "window_s", "window_start", "origin_province", "origin_city"],
    values: &["scope", "vehicles", "revision"],
    guard: Some("revision"),
};
const HIGH_FREQUENCY: Table = Table {
    name: "high_frequency",
    keys: &["day", "checkpoint_id", "plate", "plate_color"],
    values: &["first_ts", "last_ts", "passes"],
    guard: Some("passes"),
};
const CHECKPOINT_SPEED: Table = Table {
    name: "checkpoint_speed",
    keys: &["checkpoint_id", "window_s", "window_start"],
    values: &["samples", "mean_speed_kmh", "revision"],
    guard: Some("revision"),
};
const LATE_PASSES: Table = Table {
    name: "late_passes",
    keys: &["pass_id"],
    values: &["pipelines", "checkpoint_id", "ts", "arrived_at", "record"],
    guard: None,
};
const DEAD_LETTERS: Table =
    Table { name: "dead_letters", keys: &["id"], values: &["reason", "record", "received_at"], guard: None };
/// Written whole per window (deleted, then inserted), never upserted.
pub(super) const TOP_N: Table = Table {
    name: "top_n",
    keys: &["metric", "window_s", "slide_s", "window_end", "rank"],
    values: &["key_id", "value"],
    guard: None,
};

/// Every upserted table of a batch with its rows, in key-then-value column order.
pub(super) fn upserts(batch: &ResultBatch) -> Vec<(&'static Table, Vec<Vec<Val<'_>>>)> {
    use Val::*;
    let int = |v: u32| Int(i64::from(v));
    vec![
        (
            &FLOW_COUNTS,
            batch
                .flow_counts
                .iter()
                .map(|r| {
                    vec![
                        Text(r.level),
                        Text(&r.key_id),
                        int(r.window_s),
                        Int(r.window_start),
                        Int(r.passes as i64),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &ORIGIN_COUNTS,
            batch
                .origin_counts
                .iter()
                .map(|r| {
                    let (region, province, city) = (&*r.region_id, &*r.origin_province, &*r.origin_city);
                    vec![
                        Text(region),
                        int(r.window_s),
                        Int(r.window_start),
                        Text(province),
                        Text(city),
                        Text(r.scope),
                        Int(r.vehicles as i64),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &HIGH_FREQUENCY,
            batch
                .high_frequency
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.day),
                        Text(&r.checkpoint_id),
                        Text(&r.plate),
                        Int(i64::from(r.plate_color)),
                        Int(r.first_ts),
                        Int(r.last_ts),
                        int(r.passes),
                    ]
                })
                .collect(),
        ),
        (
            &CHECKPOINT_SPEED,
            batch
                .checkpoint_speed
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.checkpoint_id),
                        int(r.window_s),
                        Int(r.window_start),
                        int(r.samples),
                        Real(r.mean_speed_kmh),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &LATE_PASSES,
            batch
                .late_passes
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.pass_id),
                        Owned(super::pipelines_json(&r.pipelines)),
                        Text(&r.checkpoint_id),
                        Int(r.ts),
                        Int(r.arrived_at),
                        Text(&r.record),
                    ]
                })
                .collect(),
        ),
        (
            &DEAD_LETTERS,
            batch
                .dead_letters
                .iter()
                .map(|r| vec![Text(&r.id), Owned(r.reason.code()), Text(&r.record), Int(r.received_at)])
                .collect(),
        ),
    ]
}

/// Top-N rows: (metric, window_s, slide_s, window_end, rank, key_id, value).
pub(super) fn top_n_rows(batch: &ResultBatch) -> Vec<Vec<Val<'_>>> {
    batch
        .top_n
        .iter()
        .flat_map(|w| {
            w.entries.iter().enumerate().map(move |(i, (key, value))| {
                vec![
                    Val::Text(w.metric),
                    Val::Int(i64::from(w.window_s)),
                    Val::Int(i64::from(w.slide_s)),
                    Val::Int(w.window_end),
                    Val::Int(i as i64 + 1),
                    Val::Text(key),
                    Val::Int(*value as i64),
                ]
            })
        })
        .collect()
}

/// The Top-N windows of a batch as (metric, window_s, slide_s, window_end) keys.
pub(super) fn top_n_windows(batch: &ResultBatch) -> Vec<Vec<Val<'_>>> {
    batch
        .top_n
        .iter()
        .map(|w| {
            vec![
                Val::Text(w.metric),
                Val::Int(i64::from(w.window_s)),
                Val::Int(i64::from(w.slide_s)),
                Val::Int(w.window_end),
            ]
        })
        .collect()
}

/// `head (v, v, …), (…) tail` with every value bound.
pub(super) fn statement<'q, DB>(head: &str, rows: &'q [Vec<Val<'q>>], tail: &str) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
{
    let mut q = QueryBuilder::new(head);
    q.push_values(rows, |mut b, row| {
        bind_row(&mut b, row);
    });
    q.push(tail);
    q
}

/// `DELETE FROM t WHERE (k1, k2, …) IN ((…), …)` for whole-window replacement.
pub(super) fn delete_keys<'q, DB>(table: &Table, keys: &[&str], rows: &'q [Vec<Val<'q>>]) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
{
    let head = format!("DELETE FROM {} WHERE ({}) IN ", table.name, keys.join(", "));
    let mut q = QueryBuilder::new(head);
    q.push_tuples(rows, |mut b, row| {
        bind_row(&mut b, row);
    });
    q
}

fn bind_row<'q, DB>(b: &mut Separated<'_, 'q, DB, &'static str>, row: &'q [Val<'q>])
where
    DB: Database,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
{
    for v in row {
        match v {
            Val::Text(t) => b.push_bind(*t),
            Val::Owned(t) => b.push_bind(t.clone()),
            Val::Int(i) => b.push_bind(*i),
            Val::Real(r) => b.push_bind(*r),
        };
    }
}
