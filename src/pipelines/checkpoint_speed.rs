//! Spot speeds per checkpoint: the passes that carry a radar speed (`speed_kmh` > 0) and their
//! mean, per checkpoint in 1 min and 5 min windows. Speeds are summed in whole thousandths of a
//! km/h, so the mean does not depend on the order passes arrive in.

use crate::core::window::{is_complete, is_late, tumbling_start, window_runs};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::City;
use crate::results::CheckpointSpeedRow;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const SPEED_WINDOWS_S: [u32; 2] = [60, 300];
const LATE_LABELS: [&str; 2] = ["checkpoint_speed/1m", "checkpoint_speed/5m"];
const STATE_VERSION: u32 = 1;

/// A speed in thousandths of a km/h.
fn milli(kmh: f32) -> i64 {
    (f64::from(kmh) * 1000.0).round() as i64
}

/// The mean of `samples` speeds summing to `sum_milli`, km/h rounded to 2 decimals.
pub fn mean_kmh(sum_milli: i64, samples: u32) -> f64 {
    (sum_milli as f64 / f64::from(samples.max(1)) / 10.0).round() / 100.0
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Window {
    /// Per checkpoint: (samples, sum of speeds in thousandths of km/h).
    sums: BTreeMap<u32, (u32, i64)>,
    dirty: Vec<u32>,
    emitted: bool,
}

pub struct CheckpointSpeed {
    city: Arc<City>,
    /// Per window size: windows by start.
    sets: Vec<BTreeMap<i64, Window>>,
    /// A run's (samples, sum) per checkpoint before they go into its window, and the
    /// checkpoints it holds: a window's map is then looked up once a checkpoint and run.
    run_sums: Vec<(u32, i64)>,
    run_checkpoints: Vec<u32>,
}

impl CheckpointSpeed {
    pub fn new(city: &Arc<City>) -> CheckpointSpeed {
        CheckpointSpeed {
            city: city.clone(),
            sets: vec![BTreeMap::new(); SPEED_WINDOWS_S.len()],
            run_sums: vec![(0, 0); city.checkpoints.len()],
            run_checkpoints: Vec::new(),
        }
    }

    fn row(&self, window_s: u32, start: i64, cp: u32, (samples, sum): (u32, i64)) -> CheckpointSpeedRow {
        CheckpointSpeedRow {
            checkpoint_id: self.city.checkpoints[cp as usize].id.clone(),
            window_s,
            window_start: start,
            samples,
            mean_speed_kmh: mean_kmh(sum, samples),
            speed_sum_milli: sum,
            revision: samples.saturating_sub(1),
        }
    }
}

impl Operator for CheckpointSpeed {
    fn name(&self) -> &'static str {
        "checkpoint_speed"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let CheckpointSpeed { sets, run_sums, run_checkpoints, .. } = self;
        for (set, (size_s, label)) in sets.iter_mut().zip(SPEED_WINDOWS_S.iter().zip(LATE_LABELS)) {
            let size_ms = i64::from(*size_s) * 1000;
            for (at, start, run) in window_runs(passes, size_ms) {
                let speeds = run.iter().enumerate().filter_map(|(j, p)| Some((at + j, p.checkpoint.0, p.speed_kmh?)));
                if is_late(start + size_ms, ctx.watermark, ctx.allowed_lateness_ms) {
                    ctx.late.extend(speeds.map(|(i, _, _)| (i, label)));
                    continue;
                }
                let mut speeds = speeds.peekable();
                if speeds.peek().is_none() {
                    continue;
                }
                for (_, cp, speed) in speeds {
                    let s = &mut run_sums[cp as usize];
                    if s.0 == 0 {
                        run_checkpoints.push(cp);
                    }
                    s.0 += 1;
                    s.1 += milli(speed);
                }
                let w = set.entry(start).or_default();
                for cp in run_checkpoints.drain(..) {
                    let (samples, sum) = std::mem::take(&mut run_sums[cp as usize]);
                    let s = w.sums.entry(cp).or_default();
                    s.0 += samples;
                    s.1 += sum;
                    if w.emitted && !w.dirty.contains(&cp) {
                        w.dirty.push(cp);
                    }
                }
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let mut sets = std::mem::take(&mut self.sets);
        for (set, size_s) in sets.iter_mut().zip(SPEED_WINDOWS_S) {
            let size_ms = i64::from(size_s) * 1000;
            for (&start, w) in set.iter_mut() {
                if !is_complete(start + size_ms, ctx.watermark) {
                    break;
                }
                let slots: Vec<u32> =
                    if w.emitted { std::mem::take(&mut w.dirty) } else { w.sums.keys().copied().collect() };
                w.emitted = true;
                for cp in slots {
                    ctx.out.checkpoint_speed.push(self.row(size_s, start, cp, w.sums[&cp]));
                }
            }
            set.retain(|start, _| !is_late(start + size_ms, ctx.watermark, ctx.allowed_lateness_ms));
        }
        self.sets = sets;
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&self.sets)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let sets: Vec<BTreeMap<i64, Window>> = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(sets.len() == SPEED_WINDOWS_S.len(), "checkpoint_speed state has {} window sizes", sets.len());
        let n = self.city.checkpoints.len() as u32;
        anyhow::ensure!(
            sets.iter().flat_map(|s| s.values()).flat_map(|w| w.sums.keys()).all(|cp| *cp < n),
            "checkpoint_speed state names a checkpoint this city does not have"
        );
        self.sets = sets;
        Ok(())
    }
}

/// The batch computation: (checkpoint, window_s, window_start) → (samples, mean km/h).
pub fn batch_checkpoint_speed(city: &City, passes: &[Pass]) -> BTreeMap<(String, u32, i64), (u32, f64)> {
    let mut sums: BTreeMap<(String, u32, i64), (u32, i64)> = BTreeMap::new();
    for p in passes {
        let Some(speed) = p.speed_kmh else { continue };
        for size_s in SPEED_WINDOWS_S {
            let start = tumbling_start(p.ts.ms(), i64::from(size_s) * 1000);
            let e = sums.entry((city.checkpoint(p.checkpoint).id.to_string(), size_s, start)).or_default();
            e.0 += 1;
            e.1 += milli(speed);
        }
    }
    sums.into_iter().map(|(k, (n, s))| (k, (n, mean_kmh(s, n)))).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn means_are_exact_and_rounded_to_two_decimals() {
        assert_eq!(mean_kmh(milli(40.1) + milli(40.2) + milli(40.2), 3), 40.17);
        assert_eq!(mean_kmh(0, 0), 0.0);
        assert_eq!(milli(33.3), 33_300);
    }
}
