//! Top-N hot checkpoints: the N checkpoints with the most passes in a sliding window (1 min,
//! every 5 s by default). Ties go to the smaller id, ranks are unique, checkpoints without a
//! pass are left out, and a corrected window is replaced whole (its `window_end` rewritten).
//! Passes are counted per checkpoint in 5 s buckets; a window is the sum of its buckets.

use crate::core::window::{is_late, tumbling_start, window_runs};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::City;
use crate::results::{TopNBucketRow, TopNWindow};
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

/// Counts per key in 5 s buckets, and the rankings of the 1 min windows sliding over them:
/// each window is emitted when the watermark passes its end, and re-emitted whole when a
/// change reaches it within the allowed lateness. Top-N checkpoints and Top-N segments both
/// rank with it.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct SlidingRanking {
    /// Count per key in each 5 s bucket (by bucket start).
    buckets: BTreeMap<i64, Vec<u32>>,
    /// The next window end to emit (none before the first count).
    next_end: Option<i64>,
    /// Emitted window ends whose buckets changed since.
    dirty: BTreeSet<i64>,
}

impl SlidingRanking {
    /// Adds `delta` to key `idx` (of `width` keys) at `ts`. Returns false when the first window
    /// holding `ts` is already past the allowed lateness (the change misses that window).
    pub fn add(&mut self, ts: i64, idx: usize, delta: i32, width: usize, watermark: i64, lateness_ms: i64) -> bool {
        self.add_each(ts, std::iter::once(idx), delta, width, watermark, lateness_ms)
    }

    /// As [`SlidingRanking::add`] for each key of `keys` (a run of passes of the bucket of
    /// `ts`), with one look-up of the bucket.
    pub fn add_each(
        &mut self,
        ts: i64,
        keys: impl Iterator<Item = usize>,
        delta: i32,
        width: usize,
        watermark: i64,
        lateness_ms: i64,
    ) -> bool {
        let bucket = tumbling_start(ts, SLIDE_MS);
        let (first_end, last_end) = (bucket + SLIDE_MS, bucket + WINDOW_MS);
        let on_time = !is_late(first_end, watermark, lateness_ms);
        if is_late(last_end, watermark, lateness_ms) {
            return on_time;
        }
        let counts = self.buckets.entry(bucket).or_insert_with(|| vec![0; width]);
        for idx in keys {
            counts[idx] = counts[idx].saturating_add_signed(delta);
        }
        let next_end = *self.next_end.get_or_insert(first_end);
        // Windows already emitted that hold this bucket and are still open are re-emitted.
        let mut end = first_end;
        while end <= last_end && end < next_end {
            if !is_late(end, watermark, lateness_ms) {
                self.dirty.insert(end);
            }
            end += SLIDE_MS;
        }
        on_time
    }

    /// As [`SlidingRanking::add`] for each of `items`, in order, `change` giving an item's
    /// (ts, key, delta): a run of items in one bucket with one delta is added with one look-up
    /// of the bucket. `late` is called with each item whose first window it missed.
    pub fn add_all<T>(
        &mut self,
        items: &[T],
        change: impl Fn(&T) -> (i64, usize, i32),
        width: usize,
        (watermark, lateness_ms): (i64, i64),
        mut late: impl FnMut(&T),
    ) {
        let mut rest = items;
        while let Some(first) = rest.first() {
            let (ts, _, delta) = change(first);
            let bucket = tumbling_start(ts, SLIDE_MS);
            let len = rest
                .iter()
                .take_while(|item| {
                    let (at, _, d) = change(item);
                    d == delta && (bucket..bucket + SLIDE_MS).contains(&at)
                })
                .count();
            let (run, after) = rest.split_at(len);
            if !self.add_each(ts, run.iter().map(|item| change(item).1), delta, width, watermark, lateness_ms) {
                run.iter().for_each(&mut late);
            }
            rest = after;
        }
    }

    /// Emits the windows the watermark completes and the corrected ones, then forgets buckets
    /// no open window holds. `names` names the keys.
    pub fn emit(
        &mut self,
        metric: &'static str,
        keys: &RankedKeys,
        n: usize,
        watermark: i64,
        lateness_ms: i64,
        out: &mut Vec<TopNWindow>,
    ) {
        // A corrected window goes out even when it became empty: it replaces the stored one.
        // One the watermark has not passed yet (a bucket before the first one counted, arrived
        // later) waits for it.
        let later = self.dirty.split_off(&watermark.saturating_add(1));
        for end in std::mem::replace(&mut self.dirty, later) {
            out.push(self.window(metric, keys, n, end));
        }
        let Some(mut end) = self.next_end else { return };
        // After the last bucket every window is empty: stop there.
        let last = self.buckets.keys().next_back().map_or(end, |b| b + WINDOW_MS);
        // The sums of the window being emitted: made once, then moved on a bucket at a time.
        let mut sums = None;
        while end <= watermark && end <= last {
            let sums = sums.get_or_insert_with(|| self.sums(keys.names.len(), end));
            // An empty window goes out only when something was counted in it and taken back
            // (a row written before a crash may hold it).
            let touched = self.buckets.range(end - WINDOW_MS..end).next().is_some();
            out.extend(Some(ranked(metric, keys, n, end, sums)).filter(|w| touched || !w.entries.is_empty()));
            end += SLIDE_MS;
            // The next window gains the bucket this one ended with and loses its first.
            for (bucket, sign) in [(end - SLIDE_MS, 1), (end - WINDOW_MS - SLIDE_MS, -1)] {
                for (s, c) in sums.iter_mut().zip(self.buckets.get(&bucket).into_iter().flatten()) {
                    *s = s.wrapping_add_signed(sign * i64::from(*c));
                }
            }
        }
        self.next_end = Some(end);
        let keep_from = watermark.saturating_sub(lateness_ms).saturating_sub(WINDOW_MS);
        self.buckets.retain(|b, _| *b >= keep_from);
    }

    /// The ranking of the window that ends at `end`.
    fn window(&self, metric: &'static str, keys: &RankedKeys, n: usize, end: i64) -> TopNWindow {
        ranked(metric, keys, n, end, &self.sums(keys.names.len(), end))
    }

    /// Each of the `width` keys' count in the window that ends at `end`.
    fn sums(&self, width: usize, end: i64) -> Vec<u64> {
        let mut sums = vec![0u64; width];
        for (_, counts) in self.buckets.range(end - WINDOW_MS..end) {
            for (s, c) in sums.iter_mut().zip(counts) {
                *s += u64::from(*c);
            }
        }
        sums
    }

    /// Whether every bucket holds exactly `width` keys (a restored state fits the city).
    pub fn fits(&self, width: usize) -> bool {
        self.buckets.values().all(|b| b.len() == width)
    }
}

/// The window that ends at `end`, ranked from its keys' counts.
fn ranked(metric: &'static str, keys: &RankedKeys, n: usize, end: i64, sums: &[u64]) -> TopNWindow {
    let entries = keys.rank(sums, n);
    TopNWindow { metric, window_s: TOP_N_WINDOW_S, slide_s: TOP_N_SLIDE_S, window_end: end, entries }
}

/// The keys a ranking ranks, by index, with each one's place in the order of their names
/// (ties go to the smaller name).
#[derive(Clone, Debug)]
pub struct RankedKeys {
    pub names: Vec<Arc<str>>,
    order: Vec<u32>,
    /// The key at each place in name order (the inverse of `order`).
    by_name: Vec<u32>,
}

/// Rankings of at most this many keys keep their leaders in a sorted list as they go; larger
/// ones select them from all the candidates.
const LEADERS_KEPT: usize = 32;

impl RankedKeys {
    pub fn new(names: Vec<Arc<str>>) -> RankedKeys {
        let mut by_name: Vec<u32> = (0..names.len() as u32).collect();
        by_name.sort_by(|a, b| names[*a as usize].as_bytes().cmp(names[*b as usize].as_bytes()));
        let mut order = vec![0; names.len()];
        for (place, idx) in by_name.iter().enumerate() {
            order[*idx as usize] = place as u32;
        }
        RankedKeys { names, order, by_name }
    }

    /// The `n` largest non-zero `values` (one per key), larger first, ties to the smaller name:
    /// as [`rank`], without ordering the keys that do not make it.
    ///
    /// Each candidate is one word, its value above the complement of its name's place, so that
    /// a larger word ranks first and no two are equal: a top ten of a city's segments, ranked
    /// every 5 s, is then one compare with the tenth for most keys.
    pub fn rank(&self, values: &[u64], n: usize) -> Vec<(Arc<str>, u64)> {
        if n == 0 {
            return Vec::new();
        }
        let mut top: Vec<u64> = Vec::with_capacity(n.min(values.len()) + 1);
        let kept = n <= LEADERS_KEPT;
        for (i, &value) in values.iter().enumerate() {
            if value == 0 {
                continue;
            }
            if value > u64::from(u32::MAX) {
                return self.rank_wide(values, n);
            }
            let word = value << 32 | u64::from(u32::MAX - self.order[i]);
            if !kept {
                top.push(word);
            } else if top.len() < n || word > top[n - 1] {
                let at = top.partition_point(|t| *t > word);
                top.insert(at, word);
                top.truncate(n);
            }
        }
        if !kept {
            if top.len() > n {
                top.select_nth_unstable_by(n - 1, |a, b| b.cmp(a));
                top.truncate(n);
            }
            top.sort_unstable_by(|a, b| b.cmp(a));
        }
        top.into_iter()
            .map(|w| {
                let i = self.by_name[(u32::MAX - w as u32) as usize] as usize;
                (self.names[i].clone(), values[i])
            })
            .collect()
    }

    /// [`RankedKeys::rank`] for values too large for its words.
    fn rank_wide(&self, values: &[u64], n: usize) -> Vec<(Arc<str>, u64)> {
        let mut top: Vec<u32> = (0..values.len() as u32).filter(|i| values[*i as usize] > 0).collect();
        let before = |a: &u32, b: &u32| {
            let (a, b) = (*a as usize, *b as usize);
            values[b].cmp(&values[a]).then(self.order[a].cmp(&self.order[b]))
        };
        if top.len() > n {
            top.select_nth_unstable_by(n - 1, before);
            top.truncate(n);
        }
        top.sort_unstable_by(before);
        top.into_iter().map(|i| (self.names[i as usize].clone(), values[i as usize])).collect()
    }
}

pub struct TopN {
    keys: RankedKeys,
    n: usize,
    state: SlidingRanking,
}

impl TopN {
    pub fn new(city: &Arc<City>, n: usize) -> TopN {
        let keys = RankedKeys::new(city.checkpoints.iter().map(|c| c.id.clone()).collect());
        TopN { keys, n, state: SlidingRanking::default() }
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
        let width = self.keys.names.len();
        for (first, bucket, run) in window_runs(passes, SLIDE_MS) {
            let keys = run.iter().map(|p| p.checkpoint.0 as usize);
            if !self.state.add_each(bucket, keys, 1, width, ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.extend((first..first + run.len()).map(|i| (i, LATE_LABEL)));
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        self.state.emit(CHECKPOINT_METRIC, &self.keys, self.n, watermark, lateness, &mut ctx.out.top_n);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&self.state)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let state: SlidingRanking = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(state.fits(self.keys.names.len()), "top_n state was taken with another number of checkpoints");
        self.state = state;
        Ok(())
    }
}

/// Counts per key in the 5 s buckets of one input partition, for scale-out's merge to rank
/// ([`SlidingRanking`] over the partitions' sums): a bucket's counts go out once the watermark
/// has passed its end, and a key's again whenever it changes. A change is taken while the last
/// window holding it is within the allowed lateness, and is on time (as in
/// [`SlidingRanking::add`]) while the first one is.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct BucketCounts {
    buckets: BTreeMap<i64, Bucket>,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Bucket {
    /// Per key: (count, changes taken).
    counts: BTreeMap<u32, (u64, u64)>,
    emitted: bool,
    dirty: BTreeSet<u32>,
}

impl BucketCounts {
    /// Adds `delta` to key `idx` at `ts`. Returns false when the change is late for the first
    /// window holding `ts`.
    pub fn add(&mut self, ts: i64, idx: u32, delta: i32, watermark: i64, lateness_ms: i64) -> bool {
        let bucket = tumbling_start(ts, SLIDE_MS);
        let on_time = !is_late(bucket + SLIDE_MS, watermark, lateness_ms);
        if is_late(bucket + WINDOW_MS, watermark, lateness_ms) {
            return on_time;
        }
        let b = self.buckets.entry(bucket).or_default();
        let (count, updates) = b.counts.entry(idx).or_default();
        *count = count.saturating_add_signed(i64::from(delta));
        *updates += 1;
        if b.emitted {
            b.dirty.insert(idx);
        }
        on_time
    }

    /// Emits the buckets the watermark completes and the changed counts of those emitted
    /// (`names` names the keys), then forgets the buckets no open window holds.
    pub fn emit(
        &mut self,
        metric: &'static str,
        names: &[Arc<str>],
        watermark: i64,
        lateness_ms: i64,
        out: &mut Vec<TopNBucketRow>,
    ) {
        for (&start, b) in self.buckets.iter_mut() {
            if start + SLIDE_MS > watermark {
                break;
            }
            let changed: Vec<u32> = if b.emitted {
                std::mem::take(&mut b.dirty).into_iter().collect()
            } else {
                b.counts.keys().copied().collect()
            };
            b.emitted = true;
            for idx in changed {
                let (count, updates) = b.counts[&idx];
                let key_id = names[idx as usize].clone();
                out.push(TopNBucketRow { metric, key_id, bucket_start: start, count, updates });
            }
        }
        self.buckets.retain(|start, _| !is_late(start + WINDOW_MS, watermark, lateness_ms));
    }

    /// Whether every key is one of `width`.
    pub fn fits(&self, width: usize) -> bool {
        self.buckets.values().flat_map(|b| b.counts.keys()).all(|k| (*k as usize) < width)
    }
}

/// Top-N's part in scale-out's per-vehicle stage: one input partition's passes per checkpoint
/// in 5 s buckets ([`BucketCounts`]).
pub struct TopNBuckets {
    keys: Vec<Arc<str>>,
    buckets: BucketCounts,
}

impl TopNBuckets {
    pub fn new(city: &Arc<City>) -> TopNBuckets {
        TopNBuckets { keys: city.checkpoints.iter().map(|c| c.id.clone()).collect(), buckets: BucketCounts::default() }
    }
}

impl Operator for TopNBuckets {
    fn name(&self) -> &'static str {
        "top_n"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        for (i, pass) in passes.iter().enumerate() {
            if !self.buckets.add(pass.ts.ms(), pass.checkpoint.0, 1, watermark, lateness) {
                ctx.late.push((i, LATE_LABEL));
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        self.buckets.emit(CHECKPOINT_METRIC, &self.keys, watermark, lateness, &mut ctx.out.top_n_buckets);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&self.buckets)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let buckets: BucketCounts = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(buckets.fits(self.keys.len()), "top_n state names a checkpoint this city does not have");
        self.buckets = buckets;
        Ok(())
    }
}

/// The batch computation: for every window end with a pass, the ranking over all passes.
pub fn batch_top_n(city: &City, passes: &[Pass], n: usize) -> BTreeMap<i64, Vec<(Arc<str>, u64)>> {
    batch_ranking(passes.iter().map(|p| (p.ts.ms(), city.checkpoint(p.checkpoint).id.clone())), n)
}

/// The batch ranking of counted events (time, key): every window end holding one, ranked.
pub fn batch_ranking(events: impl Iterator<Item = (i64, Arc<str>)>, n: usize) -> BTreeMap<i64, Vec<(Arc<str>, u64)>> {
    let mut buckets: BTreeMap<i64, BTreeMap<Arc<str>, u64>> = BTreeMap::new();
    for (ts, key) in events {
        *buckets.entry(tumbling_start(ts, SLIDE_MS)).or_default().entry(key).or_default() += 1;
    }
    let ends: BTreeSet<i64> =
        buckets.keys().flat_map(|b| (1..=WINDOW_MS / SLIDE_MS).map(move |k| b + k * SLIDE_MS)).collect();
    ends.into_iter()
        .map(|end| {
            let mut sums: BTreeMap<Arc<str>, u64> = BTreeMap::new();
            for (_, counts) in buckets.range(end - WINDOW_MS..end) {
                for (key, c) in counts {
                    *sums.entry(key.clone()).or_default() += c;
                }
            }
            (end, rank(sums.into_iter(), n))
        })
        .collect()
}

#[cfg(test)]
#[path = "top_n_tests.rs"]
mod tests;
