//! What goes on the output topics. Every message has a key a consumer can compact on (the
//! table and the row's key columns, as a JSON array) and a JSON value:
//!
//! ```json
//! {"schema": 1, "table": "flow_counts", "epoch": 3, "revision": 2, "row": {"level": "checkpoint", …}}
//! ```
//!
//! `epoch` grows with every start of the service. A restart re-processes what came after the
//! last checkpoint, so a (key, revision) written before a crash can be written again with
//! different content; under a new epoch, though. `revision` is the row's own where its table
//! has one, else (Top-N windows, late and dead-lettered records, violations) the message's
//! sequence number in its epoch. The newest message of a key (the highest `(epoch, revision)`,
//! which is also the last on its partition) is the current result. A retracted row (congestion
//! taken back by a late pass) is a tombstone: the key with no value.

use crate::results::ResultBatch;
use crate::store::json_rows;

pub const SCHEMA_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum Topic {
    Results,
    Alerts,
    FirstEntries,
    Restrictions,
    CleanPasses,
    LatePasses,
    DeadLetters,
}

impl Topic {
    fn of_table(table: &str) -> Topic {
        match table {
            "alerts" => Topic::Alerts,
            "first_entry" => Topic::FirstEntries,
            "restriction_violations" | "restriction_summary" => Topic::Restrictions,
            "late_passes" => Topic::LatePasses,
            "dead_letters" => Topic::DeadLetters,
            _ => Topic::Results,
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Message {
    pub topic: Topic,
    pub key: String,
    /// `None`: a tombstone.
    pub value: Option<String>,
}

/// The messages for a batch (coalesced: one row per key) under `epoch`; `seq` numbers the
/// messages of rows without a revision of their own.
pub fn messages(batch: &ResultBatch, epoch: u64, seq: &mut i64) -> Vec<Message> {
    let mut out: Vec<Message> = json_rows(batch)
        .into_iter()
        .map(|r| {
            let mut key = vec![serde_json::Value::from(r.table)];
            key.extend(r.key);
            let revision = r.revision.unwrap_or_else(|| {
                *seq += 1;
                *seq
            });
            let value = r.row.map(|row| {
                serde_json::json!({
                    "schema": SCHEMA_VERSION, "table": r.table, "epoch": epoch, "revision": revision, "row": row,
                })
                .to_string()
            });
            Message { topic: Topic::of_table(r.table), key: serde_json::Value::from(key).to_string(), value }
        })
        .collect();
    out.extend(batch.clean_passes.iter().map(|p| Message {
        topic: Topic::CleanPasses,
        key: serde_json::json!([&*p.pass_id]).to_string(),
        value: Some(format!(r#"{{"schema":{SCHEMA_VERSION},"epoch":{epoch},"pass":{}}}"#, p.line)),
    }));
    out
}
