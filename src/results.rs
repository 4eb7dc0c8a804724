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
        self.flow_counts.len()
            + self.origin_counts.len()
            + self.top_n.len()
            + self.late_passes.len()
            + self.dead_letters.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    pub fn append(&mut self, other: &mut ResultBatch) {
        self.flow_counts.append(&mut other.flow_counts);
        self.origin_counts.append(&mut other.origin_counts);
        self.top_n.append(&mut other.top_n);
        self.high_frequency.append(&mut other.high_frequency);
        self.checkpoint_speed.append(&mut other.checkpoint_speed);
        self.late_passes.append(&mut other.late_passes);
        self.dead_letters.append(&mut other.dead_letters);
    }
}
