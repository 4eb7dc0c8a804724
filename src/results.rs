//! Result rows, one type per result table of ARCHITECTURE.md, and the batch that carries them
//! from the operators to the stores.

use crate::ingest::DeadLetter;
use crate::model::Text;
use std::sync::Arc;

/// `flow_counts`(level, key_id, window_s, window_start, passes, revision).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct FlowCountRow {
    pub level: &'static str,
    pub key_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub passes: u64,
    pub revision: u32,
}

/// `origin_counts`(region_id, window_s, window_start, origin_province, origin_city, scope,
/// vehicles, revision).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct OriginCountRow {
    pub region_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub origin_province: Arc<str>,
    pub origin_city: Arc<str>,
    pub scope: &'static str,
    pub vehicles: u64,
    pub revision: u32,
}

/// One window of `top_n`(metric, window_s, slide_s, window_end, rank, key_id, value): its
/// entries, best first (rank = position + 1). A window is always written whole.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopNWindow {
    pub metric: &'static str,
    pub window_s: u32,
    pub slide_s: u32,
    pub window_end: i64,
    pub entries: Vec<(Arc<str>, u64)>,
}

/// One 5 s bucket's count for a key of a Top-N metric in one input partition (passes at a
/// checkpoint, traversals of a segment): scale-out's partial result for Top-N, not a table (the
/// merge ranks the sums). `updates`: the changes the count has taken, which only grow.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TopNBucketRow {
    pub metric: &'static str,
    pub key_id: Arc<str>,
    pub bucket_start: i64,
    pub count: u64,
    pub updates: u64,
}

/// One segment's traversal sums in one window of one input partition: scale-out's partial
/// result for congestion, not a table. `updates`: the additions and retractions taken.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SegmentSumsRow {
    pub segment_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub traversals: u32,
    pub dt_ms: i64,
    pub updates: u32,
}

/// `high_frequency`(day, checkpoint_id, plate, plate_color, passes, first_ts, last_ts).
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct HighFrequencyRow {
    pub day: String,
    pub checkpoint_id: Arc<str>,
    pub plate: Arc<str>,
    pub plate_color: u8,
    pub passes: u32,
    pub first_ts: i64,
    pub last_ts: i64,
}

/// `checkpoint_speed`(checkpoint_id, window_s, window_start, samples, mean_speed_kmh, revision).
#[derive(Clone, Debug, PartialEq)]
pub struct CheckpointSpeedRow {
    pub checkpoint_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub samples: u32,
    pub mean_speed_kmh: f64,
    /// The sum of the speeds in thousandths of a km/h (not stored: scale-out merges partial
    /// means with it).
    pub speed_sum_milli: i64,
    pub revision: u32,
}

/// `segment_congestion`(segment_id, window_s, window_start, traversals, mean_speed_kmh,
/// travel_time_index, congestion_level, revision). A row with no traversals is a retraction:
/// the stored row is deleted (a late pass took the window's only traversal away).
#[derive(Clone, Debug, PartialEq)]
pub struct SegmentCongestionRow {
    pub segment_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub traversals: u32,
    pub mean_speed_kmh: f64,
    pub travel_time_index: f64,
    pub congestion_level: u8,
    pub revision: u32,
}

impl SegmentCongestionRow {
    pub fn is_retraction(&self) -> bool {
        self.traversals == 0
    }
}

/// `area_congestion`(level, key_id, window_s, window_start, mean_speed_kmh, travel_time_index,
/// congestion_level, revision), level `region` or `city`. A retraction deletes the stored row
/// (no segment of the area has a traversal in the window any more).
#[derive(Clone, Debug, PartialEq)]
pub struct AreaCongestionRow {
    pub level: &'static str,
    pub key_id: Arc<str>,
    pub window_s: u32,
    pub window_start: i64,
    pub mean_speed_kmh: f64,
    pub travel_time_index: f64,
    pub congestion_level: u8,
    pub revision: u32,
    pub retracted: bool,
}

impl AreaCongestionRow {
    pub fn is_retraction(&self) -> bool {
        self.retracted
    }
}

/// `alerts`(alert_id, kind, ts, plate, plate_color, checkpoint_id, segment_id, severity,
/// details, status, revision). The id is derived from what caused the alert, so a replay
/// upserts the same row; `status` is `active`, or `retracted` when a correction removed the
/// condition (the row is never deleted).
#[derive(Clone, Debug, PartialEq)]
pub struct AlertRow {
    pub alert_id: String,
    pub kind: &'static str,
    pub ts: i64,
    pub plate: Option<Arc<str>>,
    pub plate_color: Option<u8>,
    pub checkpoint_id: Option<Arc<str>>,
    pub segment_id: Option<Arc<str>>,
    pub severity: &'static str,
    /// A compact JSON object explaining the alert's numbers.
    pub details: String,
    pub status: &'static str,
    pub revision: u32,
}

/// `trajectories`(plate, plate_color, day, passes, times, checkpoints, intervals_s, revision):
/// a vehicle's passes of one local day in time order.
#[derive(Clone, Debug, PartialEq)]
pub struct TrajectoryRow {
    pub plate: Text,
    pub plate_color: u8,
    pub day: Text,
    pub times: Vec<i64>,
    pub checkpoints: Vec<Text>,
    pub revision: u32,
}

impl TrajectoryRow {
    /// Seconds between consecutive passes (ms precision, so three decimals at most).
    pub fn intervals_s(&self) -> Vec<f64> {
        self.times.windows(2).map(|w| (w[1] - w[0]) as f64 / 1000.0).collect()
    }
}

/// `restriction_violations`(pass_id, rule_id, plate, plate_color, checkpoint_id, ts, day).
#[derive(Clone, Debug, PartialEq)]
pub struct RestrictionViolationRow {
    pub pass_id: Text,
    pub rule_id: Arc<str>,
    pub plate: Arc<str>,
    pub plate_color: u8,
    pub checkpoint_id: Arc<str>,
    pub ts: i64,
    pub day: String,
}

/// `restriction_summary`(day, checkpoint_id, rule_id, violations, vehicles).
#[derive(Clone, Debug, PartialEq)]
pub struct RestrictionSummaryRow {
    pub day: String,
    pub checkpoint_id: Arc<str>,
    pub rule_id: Arc<str>,
    pub violations: u32,
    pub vehicles: u32,
}

/// `first_entry`(plate, plate_color, ts, checkpoint_id, pass_id, revision): a vehicle's
/// earliest inbound pass at a boundary checkpoint; also the `first_entry` event.
#[derive(Clone, Debug, PartialEq)]
pub struct FirstEntryRow {
    pub plate: Arc<str>,
    pub plate_color: u8,
    pub ts: i64,
    pub checkpoint_id: Arc<str>,
    pub pass_id: Text,
    pub revision: u32,
}

/// `late_passes`(pass_id, pipelines, checkpoint_id, ts, arrived_at, record).
#[derive(Clone, Debug, PartialEq)]
pub struct LatePassRow {
    pub pass_id: Text,
    /// What the pass missed, e.g. `["flow_counts/30s"]`.
    pub pipelines: Vec<&'static str>,
    pub checkpoint_id: Arc<str>,
    pub ts: i64,
    pub arrived_at: i64,
    pub record: String,
}

/// A valid, deduplicated pass in canonical JSON (the clean-pass topic).
#[derive(Clone, Debug, PartialEq)]
pub struct CleanPassRow {
    pub pass_id: Text,
    pub line: String,
}

/// Everything emitted between two hand-overs to the stores.
#[derive(Clone, Debug, Default)]
pub struct ResultBatch {
    pub flow_counts: Vec<FlowCountRow>,
    pub origin_counts: Vec<OriginCountRow>,
    pub top_n: Vec<TopNWindow>,
    pub high_frequency: Vec<HighFrequencyRow>,
    pub checkpoint_speed: Vec<CheckpointSpeedRow>,
    pub segment_congestion: Vec<SegmentCongestionRow>,
    pub area_congestion: Vec<AreaCongestionRow>,
    pub alerts: Vec<AlertRow>,
    pub trajectories: Vec<TrajectoryRow>,
    pub restriction_violations: Vec<RestrictionViolationRow>,
    pub restriction_summary: Vec<RestrictionSummaryRow>,
    pub first_entry: Vec<FirstEntryRow>,
    pub late_passes: Vec<LatePassRow>,
    pub dead_letters: Vec<DeadLetter>,
    /// For the clean-pass topic (not a table).
    pub clean_passes: Vec<CleanPassRow>,
    /// Scale-out's partial results for Top-N and congestion (not tables; taken out before the
    /// stores).
    pub top_n_buckets: Vec<TopNBucketRow>,
    pub segment_sums: Vec<SegmentSumsRow>,
}

impl ResultBatch {
    pub fn len(&self) -> usize {
        self.counts().iter().map(|(_, n)| n).sum()
    }

    /// Rows per table. Destructured, so that a new table cannot be left out of the count (an
    /// "empty" batch is not sent to the store).
    pub fn counts(&self) -> [(&'static str, usize); 17] {
        let ResultBatch {
            flow_counts,
            origin_counts,
            top_n,
            high_frequency,
            checkpoint_speed,
            segment_congestion,
            area_congestion,
            alerts,
            trajectories,
            restriction_violations,
            restriction_summary,
            first_entry,
            late_passes,
            dead_letters,
            clean_passes,
            top_n_buckets,
            segment_sums,
        } = self;
        [
            ("flow_counts", flow_counts.len()),
            ("origin_counts", origin_counts.len()),
            ("top_n", top_n.len()),
            ("high_frequency", high_frequency.len()),
            ("checkpoint_speed", checkpoint_speed.len()),
            ("segment_congestion", segment_congestion.len()),
            ("area_congestion", area_congestion.len()),
            ("alerts", alerts.len()),
            ("trajectories", trajectories.len()),
            ("restriction_violations", restriction_violations.len()),
            ("restriction_summary", restriction_summary.len()),
            ("first_entry", first_entry.len()),
            ("late_passes", late_passes.len()),
            ("dead_letters", dead_letters.len()),
            ("clean_passes", clean_passes.len()),
            ("top_n_buckets", top_n_buckets.len()),
            ("segment_sums", segment_sums.len()),
        ]
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Moves `other`'s rows to the end of this batch's (a table this batch has no rows of
    /// takes `other`'s list whole, without copying its rows).
    pub fn append(&mut self, other: &mut ResultBatch) {
        let ResultBatch {
            flow_counts,
            origin_counts,
            top_n,
            high_frequency,
            checkpoint_speed,
            segment_congestion,
            area_congestion,
            alerts,
            trajectories,
            restriction_violations,
            restriction_summary,
            first_entry,
            late_passes,
            dead_letters,
            clean_passes,
            top_n_buckets,
            segment_sums,
        } = other;
        move_rows(&mut self.flow_counts, flow_counts);
        move_rows(&mut self.origin_counts, origin_counts);
        move_rows(&mut self.top_n, top_n);
        move_rows(&mut self.high_frequency, high_frequency);
        move_rows(&mut self.checkpoint_speed, checkpoint_speed);
        move_rows(&mut self.segment_congestion, segment_congestion);
        move_rows(&mut self.area_congestion, area_congestion);
        move_rows(&mut self.alerts, alerts);
        move_rows(&mut self.trajectories, trajectories);
        move_rows(&mut self.restriction_violations, restriction_violations);
        move_rows(&mut self.restriction_summary, restriction_summary);
        move_rows(&mut self.first_entry, first_entry);
        move_rows(&mut self.late_passes, late_passes);
        move_rows(&mut self.dead_letters, dead_letters);
        move_rows(&mut self.clean_passes, clean_passes);
        move_rows(&mut self.top_n_buckets, top_n_buckets);
        move_rows(&mut self.segment_sums, segment_sums);
    }
}

/// `from`'s rows moved to the end of `into`'s, `from` left empty.
fn move_rows<T>(into: &mut Vec<T>, from: &mut Vec<T>) {
    if into.is_empty() {
        std::mem::swap(into, from);
    } else {
        into.append(from);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_batch_with_rows_of_any_one_table_is_not_empty() {
        let mut b = ResultBatch::default();
        assert!(b.is_empty());
        b.checkpoint_speed.push(CheckpointSpeedRow {
            checkpoint_id: "A".into(),
            window_s: 60,
            window_start: 0,
            samples: 1,
            mean_speed_kmh: 1.0,
            speed_sum_milli: 1000,
            revision: 0,
        });
        assert_eq!(b.len(), 1);
        let mut c = ResultBatch::default();
        c.high_frequency.push(HighFrequencyRow {
            day: "2026-03-02".into(),
            checkpoint_id: "A".into(),
            plate: "赣A1".into(),
            plate_color: 2,
            passes: 8,
            first_ts: 0,
            last_ts: 1,
        });
        b.append(&mut c);
        assert_eq!((b.len(), c.len()), (2, 0));
    }

    #[test]
    fn appended_rows_follow_the_rows_held_whether_their_table_had_any_or_not() {
        let bucket = |key: &str| TopNBucketRow {
            metric: "checkpoint_flow",
            key_id: key.into(),
            bucket_start: 0,
            count: 1,
            updates: 1,
        };
        let keys = |b: &ResultBatch| b.top_n_buckets.iter().map(|r| r.key_id.to_string()).collect::<Vec<_>>();
        let (mut held, mut more) = (ResultBatch::default(), ResultBatch::default());
        more.top_n_buckets.extend([bucket("A"), bucket("B")]);
        held.append(&mut more);
        assert_eq!((keys(&held), more.len()), (vec!["A".to_owned(), "B".to_owned()], 0));
        more.top_n_buckets.push(bucket("C"));
        held.append(&mut more);
        assert_eq!((keys(&held), more.len()), (vec!["A".to_owned(), "B".to_owned(), "C".to_owned()], 0));
    }
}
