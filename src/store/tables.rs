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
    Null,
}

fn opt_text(v: Option<&str>) -> Val<'_> {
    v.map_or(Val::Null, Val::Text)
}

/// A result table.
pub(super) struct Table {
    pub name: &'static str,
    pub keys: &'static [&'static str],
    pub values: &'static [&'static str],
    /// What orders a key's rows: a stored row is replaced only by one that comes no earlier.
    /// `None`: the first row stands.
    pub guard: Option<Guard>,
}

/// The order of a key's rows.
#[derive(Clone, Copy)]
pub(super) enum Guard {
    /// By this column (a revision, or a count that only grows); an equal row replaces the
    /// stored one (a replay writes the same again).
    Highest(&'static str),
    /// By these columns compared as a tuple, the earliest standing; an equal row replaces the
    /// stored one. A vehicle's first entry is its earliest pass whatever revision a row
    /// carries: a first-entry store that lost records offers later passes as first entries
    /// again, at revision 0. `revision` numbers the rows for readers.
    Earliest { by: &'static [&'static str], revision: &'static str },
}

impl Table {
    /// The column that numbers a key's rows, if any.
    pub fn revision(&self) -> Option<&'static str> {
        match self.guard? {
            Guard::Highest(column) => Some(column),
            Guard::Earliest { revision, .. } => Some(revision),
        }
    }

    pub fn columns(&self) -> String {
        self.keys.iter().chain(self.values).map(|c| format!("`{c}`")).collect::<Vec<_>>().join(", ")
    }
}

const FLOW_COUNTS: Table = Table {
    name: "flow_counts",
    keys: &["level", "key_id", "window_s", "window_start"],
    values: &["passes", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const ORIGIN_COUNTS: Table = Table {
    name: "origin_counts",
    keys: &["region_id", "window_s", "window_start", "origin_province", "origin_city"],
    values: &["scope", "vehicles", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const HIGH_FREQUENCY: Table = Table {
    name: "high_frequency",
    keys: &["day", "checkpoint_id", "plate", "plate_color"],
    values: &["first_ts", "last_ts", "passes"],
    guard: Some(Guard::Highest("passes")),
};
const CHECKPOINT_SPEED: Table = Table {
    name: "checkpoint_speed",
    keys: &["checkpoint_id", "window_s", "window_start"],
    values: &["samples", "mean_speed_kmh", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const SEGMENT_CONGESTION: Table = Table {
    name: "segment_congestion",
    keys: &["segment_id", "window_s", "window_start"],
    values: &["traversals", "mean_speed_kmh", "travel_time_index", "congestion_level", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const AREA_CONGESTION: Table = Table {
    name: "area_congestion",
    keys: &["level", "key_id", "window_s", "window_start"],
    values: &["mean_speed_kmh", "travel_time_index", "congestion_level", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const ALERTS: Table = Table {
    name: "alerts",
    keys: &["alert_id"],
    values: &[
        "kind",
        "ts",
        "plate",
        "plate_color",
        "checkpoint_id",
        "segment_id",
        "severity",
        "details",
        "status",
        "revision",
    ],
    guard: Some(Guard::Highest("revision")),
};
const TRAJECTORIES: Table = Table {
    name: "trajectories",
    keys: &["plate", "plate_color", "day"],
    values: &["passes", "times", "checkpoints", "intervals_s", "revision"],
    guard: Some(Guard::Highest("revision")),
};
const RESTRICTION_VIOLATIONS: Table = Table {
    name: "restriction_violations",
    keys: &["pass_id", "rule_id"],
    values: &["plate", "plate_color", "checkpoint_id", "ts", "day"],
    guard: None,
};
const RESTRICTION_SUMMARY: Table = Table {
    name: "restriction_summary",
    keys: &["day", "checkpoint_id", "rule_id"],
    values: &["vehicles", "violations"],
    guard: Some(Guard::Highest("violations")),
};
const FIRST_ENTRY: Table = Table {
    name: "first_entry",
    keys: &["plate", "plate_color"],
    values: &["ts", "checkpoint_id", "pass_id", "revision"],
    guard: Some(Guard::Earliest { by: &["ts", "pass_id"], revision: "revision" }),
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
            &SEGMENT_CONGESTION,
            batch
                .segment_congestion
                .iter()
                .filter(|r| !r.is_retraction())
                .map(|r| {
                    vec![
                        Text(&r.segment_id),
                        int(r.window_s),
                        Int(r.window_start),
                        int(r.traversals),
                        Real(r.mean_speed_kmh),
                        Real(r.travel_time_index),
                        Int(i64::from(r.congestion_level)),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &AREA_CONGESTION,
            batch
                .area_congestion
                .iter()
                .filter(|r| !r.is_retraction())
                .map(|r| {
                    vec![
                        Text(r.level),
                        Text(&r.key_id),
                        int(r.window_s),
                        Int(r.window_start),
                        Real(r.mean_speed_kmh),
                        Real(r.travel_time_index),
                        Int(i64::from(r.congestion_level)),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &ALERTS,
            batch
                .alerts
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.alert_id),
                        Text(r.kind),
                        Int(r.ts),
                        opt_text(r.plate.as_deref()),
                        r.plate_color.map_or(Null, |c| Int(i64::from(c))),
                        opt_text(r.checkpoint_id.as_deref()),
                        opt_text(r.segment_id.as_deref()),
                        Text(r.severity),
                        Text(&r.details),
                        Text(r.status),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &TRAJECTORIES,
            batch
                .trajectories
                .iter()
                .map(|r| {
                    let json = |v: serde_json::Value| Owned(v.to_string());
                    vec![
                        Text(&r.plate),
                        Int(i64::from(r.plate_color)),
                        Text(&r.day),
                        Int(r.times.len() as i64),
                        json(serde_json::json!(r.times)),
                        json(serde_json::json!(r.checkpoints.iter().map(|c| &**c).collect::<Vec<_>>())),
                        json(serde_json::json!(r.intervals_s())),
                        int(r.revision),
                    ]
                })
                .collect(),
        ),
        (
            &RESTRICTION_VIOLATIONS,
            batch
                .restriction_violations
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.pass_id),
                        Text(&r.rule_id),
                        Text(&r.plate),
                        Int(i64::from(r.plate_color)),
                        Text(&r.checkpoint_id),
                        Int(r.ts),
                        Text(&r.day),
                    ]
                })
                .collect(),
        ),
        (
            &RESTRICTION_SUMMARY,
            batch
                .restriction_summary
                .iter()
                .map(|r| {
                    vec![Text(&r.day), Text(&r.checkpoint_id), Text(&r.rule_id), int(r.vehicles), int(r.violations)]
                })
                .collect(),
        ),
        (
            &FIRST_ENTRY,
            batch
                .first_entry
                .iter()
                .map(|r| {
                    vec![
                        Text(&r.plate),
                        Int(i64::from(r.plate_color)),
                        Int(r.ts),
                        Text(&r.checkpoint_id),
                        Text(&r.pass_id),
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

/// Retracted rows of a batch: per table, each row's key values and then its revision. A stored
/// row is deleted unless it has a higher revision.
pub(super) fn retractions(batch: &ResultBatch) -> Vec<(&'static Table, Vec<Vec<Val<'_>>>)> {
    use Val::*;
    let int = |v: u32| Int(i64::from(v));
    vec![
        (
            &SEGMENT_CONGESTION,
            batch
                .segment_congestion
                .iter()
                .filter(|r| r.is_retraction())
                .map(|r| vec![Text(&r.segment_id), int(r.window_s), Int(r.window_start), int(r.revision)])
                .collect(),
        ),
        (
            &AREA_CONGESTION,
            batch
                .area_congestion
                .iter()
                .filter(|r| r.is_retraction())
                .map(|r| vec![Text(r.level), Text(&r.key_id), int(r.window_s), Int(r.window_start), int(r.revision)])
                .collect(),
        ),
    ]
}

/// `DELETE FROM t WHERE k1 = ? AND … AND guard <= ?` for one retracted row.
pub(super) fn delete_retracted<'q, DB>(table: &Table, row: &'q [Val<'q>]) -> QueryBuilder<'q, DB>
where
    DB: Database,
    DB::Arguments<'q>: Default,
    i64: Encode<'q, DB> + Type<DB>,
    f64: Encode<'q, DB> + Type<DB>,
    &'q str: Encode<'q, DB> + Type<DB>,
    String: Encode<'q, DB> + Type<DB>,
    Option<i64>: Encode<'q, DB> + Type<DB>,
{
    let guard = table.revision().unwrap_or("revision");
    let mut q = QueryBuilder::new(format!("DELETE FROM {} WHERE ", table.name));
    let mut conditions = q.separated(" AND ");
    for (column, v) in table.keys.iter().zip(row).chain(std::iter::once((&guard, &row[row.len() - 1]))) {
        conditions.push(format!("`{column}` {} ", if *column == guard { "<=" } else { "=" }));
        match v {
            Val::Text(t) => conditions.push_bind_unseparated(*t),
            Val::Owned(t) => conditions.push_bind_unseparated(t.clone()),
            Val::Int(i) => conditions.push_bind_unseparated(*i),
            Val::Real(r) => conditions.push_bind_unseparated(*r),
            Val::Null => conditions.push_bind_unseparated(None::<i64>),
        };
    }
    q
}

/// The key columns of a Top-N window (the table's key without `rank`): a window is replaced
/// whole by these.
pub(super) const TOP_N_WINDOW_KEYS: &[&str] = TOP_N.keys.split_at(4).0;

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

/// The Top-N windows of a batch as their keys ([`TOP_N_WINDOW_KEYS`]).
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
    Option<i64>: Encode<'q, DB> + Type<DB>,
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
    Option<i64>: Encode<'q, DB> + Type<DB>,
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
    Option<i64>: Encode<'q, DB> + Type<DB>,
{
    for v in row {
        match v {
            Val::Text(t) => b.push_bind(*t),
            Val::Owned(t) => b.push_bind(t.clone()),
            Val::Int(i) => b.push_bind(*i),
            Val::Real(r) => b.push_bind(*r),
            Val::Null => b.push_bind(None::<i64>),
        };
    }
}

/// A result row as JSON (see [`for_each_json_row`]).
pub struct JsonRow<'a> {
    pub table: &'static str,
    /// The key column values, comma-separated JSON (the elements of an array).
    pub key: &'a str,
    /// Every column by name, a JSON object; `None` for a retracted row.
    pub row: Option<&'a str>,
    /// The value of the column that orders updates (`None` when the table has none).
    pub revision: Option<i64>,
}

/// Rows in key order: both stores keep each table in a B-tree by its key, and rows written in
/// that order touch each page once per batch instead of all over the tree.
pub(super) fn sort_by_key(table: &Table, rows: &mut [Vec<Val<'_>>]) {
    let keys = table.keys.len();
    rows.sort_unstable_by(|a, b| {
        let columns = a[..keys].iter().zip(&b[..keys]);
        columns.map(|(x, y)| x.order(y)).find(|o| o.is_ne()).unwrap_or(std::cmp::Ordering::Equal)
    });
}

impl Val<'_> {
    /// Orders values of one column (key columns are never real or null).
    fn order(&self, other: &Val) -> std::cmp::Ordering {
        match (self, other) {
            (Val::Int(a), Val::Int(b)) => a.cmp(b),
            (a, b) => a.text().cmp(b.text()),
        }
    }

    fn text(&self) -> &str {
        match self {
            Val::Text(t) => t,
            Val::Owned(t) => t,
            _ => "",
        }
    }

    /// Appends the value as JSON.
    fn write_json(&self, out: &mut Vec<u8>) {
        // Writing into a Vec<u8> cannot fail.
        let _ = match self {
            Val::Text(t) => serde_json::to_writer(out, t),
            Val::Owned(t) => serde_json::to_writer(out, t),
            Val::Int(i) => serde_json::to_writer(out, i),
            Val::Real(r) => serde_json::to_writer(out, r),
            Val::Null => serde_json::to_writer(out, &()),
        };
    }
}

/// Appends values as the elements of a JSON array (without the brackets).
fn write_json_list<'v>(out: &mut Vec<u8>, values: impl Iterator<Item = &'v Val<'v>>) {
    for (i, v) in values.enumerate() {
        if i > 0 {
            out.push(b',');
        }
        v.write_json(out);
    }
}

/// Appends a row as a JSON object of `columns`.
fn write_json_object(out: &mut Vec<u8>, columns: &[&str], row: &[Val]) {
    out.push(b'{');
    for (i, (column, v)) in columns.iter().zip(row).enumerate() {
        if i > 0 {
            out.push(b',');
        }
        let _ = serde_json::to_writer(&mut *out, column);
        out.push(b':');
        v.write_json(out);
    }
    out.push(b'}');
}

/// Every row of a batch as JSON, handed to `each` in turn (the text is reused between rows):
/// the upserted tables, retractions and one row per Top-N window.
pub fn for_each_json_row(batch: &ResultBatch, mut each: impl FnMut(JsonRow<'_>)) {
    let (mut key, mut row) = (Vec::new(), Vec::new());
    fn utf8(bytes: &[u8]) -> &str {
        std::str::from_utf8(bytes).expect("JSON is UTF-8")
    }
    for (table, rows) in upserts(batch) {
        let columns: Vec<&str> = table.keys.iter().chain(table.values).copied().collect();
        let guard = table.revision().and_then(|g| columns.iter().position(|c| *c == g));
        for values in rows {
            let revision = guard.map(|i| if let Val::Int(v) = values[i] { v } else { 0 });
            key.clear();
            write_json_list(&mut key, values[..table.keys.len()].iter());
            row.clear();
            write_json_object(&mut row, &columns, &values);
            each(JsonRow { table: table.name, key: utf8(&key), row: Some(utf8(&row)), revision });
        }
    }
    for (table, rows) in retractions(batch) {
        for values in rows {
            let revision = if let Some(Val::Int(v)) = values.last() { Some(*v) } else { None };
            key.clear();
            write_json_list(&mut key, values[..table.keys.len()].iter());
            each(JsonRow { table: table.name, key: utf8(&key), row: None, revision });
        }
    }
    for (w, window_key) in batch.top_n.iter().zip(top_n_windows(batch)) {
        let entries: Vec<serde_json::Value> = w
            .entries
            .iter()
            .enumerate()
            .map(|(i, (key, value))| serde_json::json!({ "rank": i + 1, "key_id": &**key, "value": value }))
            .collect();
        let value = serde_json::json!({
            "metric": w.metric, "window_s": w.window_s, "slide_s": w.slide_s, "window_end": w.window_end,
            "entries": entries,
        });
        key.clear();
        write_json_list(&mut key, window_key.iter());
        row.clear();
        let _ = serde_json::to_writer(&mut row, &value);
        each(JsonRow { table: TOP_N.name, key: utf8(&key), row: Some(utf8(&row)), revision: None });
    }
}
