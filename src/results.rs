//! Result rows, one type per result table of ARCHITECTURE.md, and the batch that carries them
//! from the operators to the stores.

use crate::ingest::DeadLetter;
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
    pub revision: u32,
}

/// `late_passes`(pass_id, pipelines, checkpoint_id, ts, arrived_at, record).
#[derive(Clone, Debug, PartialEq)]
pub struct LatePassRow {
    pub pass_id: Arc<str>,
    /// What the pass missed, e.g. `["flow_counts/30s"]`.
    pub pipelines: Vec<&'static str>,
    pub checkpoint_id: Arc<str>,
    pub ts: i64,
    pub arrived_at: i64,
    pub record: String,
}

/// Everything emitted between two hand-overs to the stores.
#[derive(Clone, Debug, Default)]
pub struct ResultBatch {
    pub flow_counts: Vec<FlowCountRow>,
    pub origin_counts: Vec<OriginCountRow>,
    pub top_n: Vec<TopNWindow>,
    pub high_frequency: Vec<HighFrequencyRow>,
    pub checkpoint_speed: Vec<CheckpointSpeedRow>,
    pub late_passes: Vec<LatePassRow>,
    pub dead_letters: Vec<DeadLetter>,
}

impl ResultBatch {
    pub fn len(&self) -> usize {
        // Destructured, so that a new table cannot be left out of the count (an "empty" batch
        // is not sent to the store).
        let ResultBatch {
            flow_counts,
            origin_counts,
            top_n,
            high_frequency,
            checkpoint_speed,
            late_passes,
            dead_letters,
        } = self;
        flow_counts.len()
            + origin_counts.len()
            + top_n.len()
            + high_frequency.len()
            + checkpoint_speed.len()
            + late_passes.len()
            + dead_letters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&mut self, other: &mut ResultBatch) {
        let ResultBatch {
            flow_counts,
            origin_counts,
            top_n,
            high_frequency,
            checkpoint_speed,
            late_passes,
            dead_letters,
        } = other;
        self.flow_counts.append(flow_counts);
        self.origin_counts.append(origin_counts);
        self.top_n.append(top_n);
        self.high_frequency.append(high_frequency);
        self.checkpoint_speed.append(checkpoint_speed);
        self.late_passes.append(late_passes);
        self.dead_letters.append(dead_letters);
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
}
