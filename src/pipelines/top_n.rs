//! Top-N hot checkpoints: the N checkpoints with the most passes in a sliding window (1 min,
//! every 5 s by default). Ties go to the smaller id, ranks are unique, checkpoints without a
//! pass are left out, and a corrected window is replaced whole (its `window_end` rewritten).
//! Passes are counted per checkpoint in 5 s buckets; a window is the sum of its buckets.

use crate::core::window::{is_late, tumbling_start};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::City;
use crate::results::TopNWindow;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

pub const TOP_N_WINDOW_S: u32 = 60;
pub const TOP_N_SLIDE_S: u32 = 5;
const WINDOW_MS: i64 = TOP_N_WINDOW_S as i64 * 1000;
const SLIDE_MS: i64 = TOP_N_SLIDE_S as i64 * 1000;
const LATE_LABEL: &str = "top_n/1m";
const STATE_VERSION: u32 = 1;
pub const CHECKPOINT_METRIC: &str = "checkpoint_flow";

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    /// Passes per checkpoint in each 5 s bucket (by bucket start).
    buckets: BTreeMap<i64, Vec<u32>>,
    /// The next window end to emit (none before the first pass).
    next_end: Option<i64>,
    /// Emitted window ends whose buckets changed since.
    dirty: BTreeSet<i64>,
}

pub struct TopN {
    city: Arc<City>,
    n: usize,
    state: State,
}

impl TopN {
    pub fn new(city: &Arc<City>, n: usize) -> TopN {
        TopN { city: city.clone(), n, state: State::default() }
    }

    /// The ranking of the window that ends at `end`.
    fn window(&self, end: i64) -> Option<TopNWindow> {
        let mut sums = vec![0u64; self.city.checkpoints.len()];
        for (_, counts) in self.state.buckets.range(end - WINDOW_MS..end) {
            for (s, c) in sums.iter_mut().zip(counts) {
                *s += u64::from(*c);
            }
        }
        let entries = rank(sums.iter().enumerate().map(|(i, v)| (self.city.checkpoints[i].id.clone(), *v)), self.n);
        (!entries.is_empty()).then(|| TopNWindow {
            metric: CHECKPOINT_METRIC,
            window_s: TOP_N_WINDOW_S,
            slide_s: TOP_N_SLIDE_S,
            window_end: end,
            entries,
        })
    }
}

/// The `n` largest non-zero values, larger first, ties to the smaller key.
pub fn rank(values: impl Iterator<Item = (Arc<str>, u64)>, n: usize) -> Vec<(Arc<str>, u64)> {
    let mut all: Vec<(Arc<str>, u64)> = values.filter(|(_, v)| *v > 0).collect();
    all.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.as_bytes().cmp(b.0.as_bytes())));
    all.truncate(n);
    all
}

impl Operator for TopN {
    fn name(&self) -> &'static str {
        "top_n"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let width = self.city.checkpoints.len();
        for (i, pass) in passes.iter().enumerate() {
            let bucket = tumbling_start(pass.ts.ms(), SLIDE_MS);
            let (first_end, last_end) = (bucket + SLIDE_MS, bucket + WINDOW_MS);
            if is_late(first_end, ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.push((i, LATE_LABEL));
            }
            if is_late(last_end, ctx.watermark, ctx.allowed_lateness_ms) {
                continue;
            }
            self.state.buckets.entry(bucket).or_insert_with(|| vec![0; width])[pass.checkpoint.0 as usize] += 1;
            let next_end = *self.state.next_end.get_or_insert(first_end);
            // Windows already emitted that hold this bucket and are still open are re-emitted.
            let mut end = first_end;
            while end <= last_end && end < next_end {
                if !is_late(end, ctx.watermark, ctx.allowed_lateness_ms) {
                    self.state.dirty.insert(end);
                }
                end += SLIDE_MS;
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        for end in std::mem::take(&mut self.state.dirty) {
            if let Some(w) = self.window(end) {
                ctx.out.top_n.push(w);
            }
        }
        let Some(mut end) = self.state.next_end else { return };
        // After the last bucket every window is empty: stop there.
        let last = self.state.buckets.keys().next_back().map_or(end, |b| b + WINDOW_MS);
        while end <= ctx.watermark && end <= last {
            if let Some(w) = self.window(end) {
                ctx.out.top_n.push(w);
            }
            end += SLIDE_MS;
        }
        self.state.next_end = Some(end);
        let keep_from = ctx.watermark.saturating_sub(ctx.allowed_lateness_ms).saturating_sub(WINDOW_MS);
        self.state.buckets.retain(|b, _| *b >= keep_from);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&self.state)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let state: State = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(
            state.buckets.values().all(|b| b.len() == self.city.checkpoints.len()),
            "top_n state was taken with another number of checkpoints"
        );
        self.state = state;
        Ok(())
    }
}

/// The batch computation: for every window end with a pass, the ranking over all passes.
pub fn batch_top_n(city: &City, passes: &[Pass], n: usize) -> BTreeMap<i64, Vec<(Arc<str>, u64)>> {
    let mut buckets: BTreeMap<i64, BTreeMap<u32, u64>> = BTreeMap::new();
    for p in passes {
        *buckets.entry(tumbling_start(p.ts.ms(), SLIDE_MS)).or_default().entry(p.checkpoint.0).or_default() += 1;
    }
    let ends: BTreeSet<i64> =
        buckets.keys().flat_map(|b| (1..=WINDOW_MS / SLIDE_MS).map(move |k| b + k * SLIDE_MS)).collect();
    ends.into_iter()
        .map(|end| {
            let mut sums: BTreeMap<u32, u64> = BTreeMap::new();
            for (_, counts) in buckets.range(end - WINDOW_MS..end) {
                for (cp, c) in counts {
                    *sums.entry(*cp).or_default() += c;
                }
            }
            (end, rank(sums.into_iter().map(|(cp, v)| (city.checkpoints[cp as usize].id.clone(), v)), n))
        })
        .collect()
}

#[cfg(test)]
#[path = "top_n_tests.rs"]
mod tests;
