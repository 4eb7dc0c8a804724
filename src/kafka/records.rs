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
use crate::store::for_each_json_row;
use std::io::Write;
use std::ops::Range;

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

/// One message of [`Messages`].
#[derive(Clone, Copy, Debug, PartialEq)]
pub struct Message<'a> {
    pub topic: Topic,
    pub key: &'a [u8],
    /// `None`: a tombstone.
    pub value: Option<&'a [u8]>,
}

/// A batch's messages, their bytes in one buffer (a message is two slices of it rather than
/// two strings of its own).
#[derive(Default)]
pub struct Messages {
    bytes: Vec<u8>,
    spans: Vec<(Topic, Range<usize>, Option<Range<usize>>)>,
}

impl Messages {
    pub fn iter(&self) -> impl Iterator<Item = Message<'_>> {
        self.spans.iter().map(|(topic, key, value)| Message {
            topic: *topic,
            key: &self.bytes[key.clone()],
            value: value.clone().map(|v| &self.bytes[v]),
        })
    }
}

/// The messages for a batch (coalesced: one row per key) under `epoch`; `seq` numbers the
/// messages of rows without a revision of their own.
pub fn messages(batch: &ResultBatch, epoch: u64, seq: &mut i64) -> Messages {
    let mut out = Messages::default();
    let bytes = &mut out.bytes;
    // Writing to a Vec cannot fail.
    for_each_json_row(batch, |r| {
        let revision = r.revision.unwrap_or_else(|| {
            *seq += 1;
            *seq
        });
        // Table names are plain identifiers: they need no escaping.
        let table = r.table;
        let start = bytes.len();
        let _ = write!(bytes, r#"["{table}",{}]"#, r.key);
        let key = start..bytes.len();
        let value = r.row.map(|row| {
            let start = bytes.len();
            let _ = write!(
                bytes,
                r#"{{"schema":{SCHEMA_VERSION},"table":"{table}","epoch":{epoch},"revision":{revision},"row":{row}}}"#
            );
            start..bytes.len()
        });
        out.spans.push((Topic::of_table(table), key, value));
    });
    for p in &batch.clean_passes {
        let start = bytes.len();
        let _ = serde_json::to_writer(&mut *bytes, &[&*p.pass_id]);
        let key = start..bytes.len();
        let _ = write!(bytes, r#"{{"schema":{SCHEMA_VERSION},"epoch":{epoch},"pass":{}}}"#, p.line);
        out.spans.push((Topic::CleanPasses, key.clone(), Some(key.end..bytes.len())));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::results::{AreaCongestionRow, CheckpointSpeedRow, CleanPassRow, FlowCountRow, TopNWindow};
    use serde_json::{json, Value};

    fn parsed(m: Message) -> (Topic, Value, Option<Value>) {
        let value = m.value.map(|v| serde_json::from_slice(v).expect("the value is JSON"));
        (m.topic, serde_json::from_slice(m.key).expect("the key is JSON"), value)
    }

    #[test]
    fn each_row_is_a_message_of_json_with_its_key_revision_and_columns() {
        let odd = "K\"1\\中\n";
        let mut batch = ResultBatch::default();
        batch.flow_counts = vec![FlowCountRow {
            level: "checkpoint",
            key_id: odd.into(),
            window_s: 30,
            window_start: 60_000,
            passes: 7,
            revision: 2,
        }];
        batch.checkpoint_speed = vec![CheckpointSpeedRow {
            checkpoint_id: "KK1".into(),
            window_s: 60,
            window_start: 0,
            samples: 3,
            mean_speed_kmh: 41.25,
            speed_sum_milli: 123_750,
            revision: 0,
        }];
        batch.area_congestion = vec![AreaCongestionRow {
            level: "city",
            key_id: "all".into(),
            window_s: 60,
            window_start: 0,
            mean_speed_kmh: 0.0,
            travel_time_index: 0.0,
            congestion_level: 0,
            revision: 4,
            retracted: true,
        }];
        batch.top_n = vec![TopNWindow {
            metric: "checkpoint_flow",
            window_s: 60,
            slide_s: 5,
            window_end: 5_000,
            entries: vec![(odd.into(), 9)],
        }];
        batch.clean_passes = vec![CleanPassRow { pass_id: "P1".into(), line: r#"{"pass_id":"P1"}"#.into() }];
        let mut seq = 10;
        let got: Vec<_> = messages(&batch, 3, &mut seq).iter().map(parsed).collect();
        let want = vec![
            (
                Topic::Results,
                json!(["flow_counts", "checkpoint", odd, 30, 60_000]),
                Some(json!({"schema": 1, "table": "flow_counts", "epoch": 3, "revision": 2, "row": {
                    "level": "checkpoint", "key_id": odd, "window_s": 30, "window_start": 60_000, "passes": 7, "revision": 2,
                }})),
            ),
            (
                Topic::Results,
                json!(["checkpoint_speed", "KK1", 60, 0]),
                Some(json!({"schema": 1, "table": "checkpoint_speed", "epoch": 3, "revision": 0, "row": {
                    "checkpoint_id": "KK1", "window_s": 60, "window_start": 0, "samples": 3, "mean_speed_kmh": 41.25,
                    "revision": 0,
                }})),
            ),
            // A retraction is a tombstone.
            (Topic::Results, json!(["area_congestion", "city", "all", 60, 0]), None),
            (
                Topic::Results,
                json!(["top_n", "checkpoint_flow", 60, 5, 5_000]),
                Some(json!({"schema": 1, "table": "top_n", "epoch": 3, "revision": 11, "row": {
                    "metric": "checkpoint_flow", "window_s": 60, "slide_s": 5, "window_end": 5_000,
                    "entries": [{"rank": 1, "key_id": odd, "value": 9}],
                }})),
            ),
            (Topic::CleanPasses, json!(["P1"]), Some(json!({"schema": 1, "epoch": 3, "pass": {"pass_id": "P1"}}))),
        ];
        assert_eq!(got, want);
        assert_eq!(seq, 11, "only the row without a revision of its own took a sequence number");
    }
}
