//! Segment traversals and congestion. A traversal of segment A→B is two passes of one vehicle,
//! adjacent in its time order, at A then B, with 0 < Δt ≤ 6 × the segment's free-flow time.
//! Per segment and 1 min / 5 min window (by the time at B): traversals, space-mean speed
//! n·L / ΣΔt, travel-time index (mean Δt / free-flow time) and the congestion level by road
//! class; per region and for the city, the same over their segments. Top-N segments rank
//! traversals in the sliding 1 min window.
//!
//! Each vehicle's recent passes are kept in time order, so a late pass that falls between two
//! paired passes retracts their traversal and adds the two new ones. Sums are whole
//! milliseconds, so results do not depend on arrival order; a row's `revision` counts the
//! traversal updates (additions and retractions) its window has taken, so it only grows.

use super::top_n::{batch_ranking, BucketCounts, RankedKeys, SlidingRanking};
use crate::core::window::{is_complete, is_late, tumbling_start, Every};
use crate::core::{Context, Operator, SeqOf, StateBlob, VehicleTable};
use crate::model::{fnv1a64, Pass, VehicleKey, VehicleRef};
use crate::reference::{City, RoadClass, Segment};
use crate::results::ResultBatch;
use crate::results::{AlertRow, AreaCongestionRow, SegmentCongestionRow, SegmentSumsRow};
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

pub const CONGESTION_WINDOWS_S: [u32; 2] = [60, 300];
const LATE_LABELS: [&str; 2] = ["segment_congestion/1m", "segment_congestion/5m"];
const RANKING_LATE_LABEL: &str = "top_n_segments/1m";
pub const SEGMENT_METRIC: &str = "segment_flow";
pub const SUDDEN_CONGESTION: &str = "sudden_congestion";
const SUDDEN_WINDOW_MS: i64 = 300_000;
/// A 5 min window is let go this many windows after its start, plus the allowed lateness: a
/// change to either of the two windows after it judges a sudden-congestion pattern that reads it.
const SUDDEN_KEPT_WINDOWS: i64 = 3;
/// A traversal takes at most this many free-flow times.
const FREE_FLOW_FACTOR: f64 = 6.0;
/// How often (event time) tracks of vehicles gone quiet are swept out. A vehicle's passes
/// before the horizon are cut whenever it passes again, so a sweep only frees memory; each one
/// visits every vehicle, so it runs hourly, not every few minutes.
const SWEEP_EVERY_MS: i64 = 60 * 60_000;
const STATE_VERSION: u32 = 2;
/// States written before the binary encoding, as JSON.
const JSON_STATE_VERSION: u32 = 1;

/// The speeds (km/h) between levels 1|2, 2|3, 3|4 and 4|5: level 1 is above the first.
fn level_bounds(class: RoadClass) -> [f64; 4] {
    match class {
        RoadClass::Expressway => [65.0, 50.0, 35.0, 20.0],
        RoadClass::Arterial => [40.0, 30.0, 20.0, 15.0],
        RoadClass::Secondary => [35.0, 25.0, 15.0, 10.0],
    }
}

/// Congestion level 1 (畅通) to 5 (严重拥堵) of a space-mean speed; each level is an interval
/// (lower, upper].
pub fn congestion_level(class: RoadClass, speed_kmh: f64) -> u8 {
    level_bounds(class).iter().position(|b| speed_kmh > *b).map_or(5, |i| i as u8 + 1)
}

fn round2(x: f64) -> f64 {
    (x * 100.0).round() / 100.0
}

/// One pass in a vehicle's time order: ties on `ts` are ordered by a hash of the pass id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Point {
    ts: i64,
    tie: u64,
    cp: u32,
}

impl Point {
    fn of(pass: &Pass) -> Point {
        Point::tied(pass, fnv1a64(pass.pass_id.as_bytes()))
    }

    /// The point of `pass`, `tie` being the hash of its id.
    fn tied(pass: &Pass, tie: u64) -> Point {
        Point { ts: pass.ts.ms(), tie, cp: pass.checkpoint.0 }
    }

    fn order(&self) -> (i64, u64) {
        (self.ts, self.tie)
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
struct Traversal {
    segment: u32,
    /// The time at B: the traversal's windows.
    at: i64,
    dt_ms: i64,
}

/// The segments as the traversal rule needs them.
struct Roads {
    /// Per checkpoint (from), its segments as (to, segment): a checkpoint starts a handful, so
    /// a short scan finds one faster than a hash look-up.
    from: Vec<Vec<(u32, u32)>>,
    /// 6 × free-flow time per segment, ms.
    bound_ms: Vec<f64>,
    longest_ms: i64,
}

impl Roads {
    fn new(city: &City) -> Roads {
        let mut from = vec![Vec::new(); city.checkpoints.len()];
        for (i, s) in city.segments.iter().enumerate() {
            let starts = &mut from[s.from.0 as usize];
            // The first segment of a pair of ends is the one.
            if !starts.iter().any(|(to, _)| *to == s.to.0) {
                starts.push((s.to.0, i as u32));
            }
        }
        let bound_ms: Vec<f64> = city.segments.iter().map(|s| FREE_FLOW_FACTOR * s.free_flow_ms()).collect();
        let longest_ms = bound_ms.iter().fold(0.0f64, |a, b| a.max(*b)).ceil() as i64;
        Roads { from, bound_ms, longest_ms }
    }

    /// The traversal two adjacent passes make, if they make one.
    fn traversal(&self, a: Point, b: Point) -> Option<Traversal> {
        let (_, segment) = *self.from.get(a.cp as usize)?.iter().find(|(to, _)| *to == b.cp)?;
        let dt_ms = b.ts - a.ts;
        (dt_ms > 0 && dt_ms as f64 <= self.bound_ms[segment as usize]).then_some(Traversal { segment, at: b.ts, dt_ms })
    }
}

/// Traversals of one segment in one window.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SegmentSums {
    pub traversals: u32,
    pub dt_ms: i64,
    /// Additions and retractions applied (the row's revision + 1).
    pub updates: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Window {
    segments: BTreeMap<u32, SegmentSums>,
    dirty: BTreeSet<u32>,
    emitted: bool,
}

/// Each vehicle's recent passes in time order, and the traversals a new pass makes and takes
/// back: the per-vehicle half of congestion.
struct Tracks {
    roads: Roads,
    tracks: VehicleTable<Track>,
    sweeps: Every,
}

/// A vehicle's passes in time order, and the newest one's time: a sweep finds the vehicles
/// gone quiet without reading every vehicle's passes.
struct Track {
    newest: i64,
    /// A vehicle holds a few points at once (the horizon is minutes long): they lie in the
    /// table's entry, where growing a list from nothing cost an allocation and two copies.
    points: SmallVec<[Point; 4]>,
}

impl Default for Track {
    fn default() -> Track {
        Track::of(Vec::new())
    }
}

impl Track {
    fn of(points: Vec<Point>) -> Track {
        Track { newest: points.last().map_or(i64::MIN, |p| p.ts), points: SmallVec::from_vec(points) }
    }
}

impl Tracks {
    fn new(city: &City) -> Tracks {
        Tracks { roads: Roads::new(city), tracks: VehicleTable::default(), sweeps: Every::new(SWEEP_EVERY_MS) }
    }

    /// Passes before this can no longer pair with a pass that is on time.
    fn horizon(&self, watermark: i64, lateness_ms: i64) -> i64 {
        watermark.saturating_sub(lateness_ms).saturating_sub(60_000).saturating_sub(self.roads.longest_ms)
    }

    /// Takes the point of a pass into the track at `at`: the traversal it splits (retracted,
    /// -1) and the ones it makes (1). `None` when the track holds it already.
    fn take(&mut self, at: u32, x: Point, horizon: i64) -> Option<[(Option<Traversal>, i32); 3]> {
        let Track { newest, points: track } = self.tracks.value_mut(at);
        // Passes mostly come in time order: a pass after the newest one is not searched for.
        let at = match track.last() {
            Some(last) if last.order() < x.order() => track.len(),
            _ => match track.binary_search_by(|p| p.order().cmp(&x.order())) {
                Ok(_) => return None,
                Err(at) => at,
            },
        };
        track.insert(at, x);
        *newest = (*newest).max(x.ts);
        let prev = at.checked_sub(1).map(|j| track[j]);
        let next = track.get(at + 1).copied();
        if track[0].ts < horizon {
            let old = track.partition_point(|p| p.ts < horizon);
            track.drain(..old);
        }
        let roads = &self.roads;
        Some([
            (prev.zip(next).and_then(|(p, q)| roads.traversal(p, q)), -1),
            (prev.and_then(|p| roads.traversal(p, x)), 1),
            (next.and_then(|q| roads.traversal(x, q)), 1),
        ])
    }

    /// Takes a batch of passes: the traversals they make (`delta` 1) or split (-1), in order,
    /// each with its pass's index in the batch. A pass late for every window it could change
    /// is recorded as such instead.
    fn take_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) -> Vec<(usize, Traversal, i32)> {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        let horizon = self.horizon(watermark, lateness);
        let (mut taken, mut vehicles): (Vec<usize>, Vec<VehicleRef<'_>>) =
            (Vec::with_capacity(passes.len()), Vec::with_capacity(passes.len()));
        for (i, pass) in passes.iter().enumerate() {
            let Some(vehicle) = pass.vehicle_ref() else { continue };
            // Every window a pass can change is at or after its own 1 min window.
            if is_late(tumbling_start(pass.ts.ms(), 60_000) + 60_000, watermark, lateness) {
                ctx.late.extend(LATE_LABELS.map(|l| (i, l)));
                continue;
            }
            taken.push(i);
            vehicles.push(vehicle);
        }
        let places = self.tracks.resolve(&vehicles, Track::default);
        let ties = ctx.batch.id_digests(passes);
        let mut changes = Vec::with_capacity(passes.len() + passes.len() / 4);
        for (j, (&i, &at)) in taken.iter().zip(&places).enumerate() {
            // A pass goes after the newest point, and the points behind the horizon are cut from the start.
            self.tracks.prefetch_ahead_with(&places, j, |t| t.points.first());
            self.tracks.prefetch_ahead_with(&places, j, |t| t.points.last());
            let Some(made) = self.take(at, Point::tied(&passes[i], ties[i]), horizon) else { continue };
            changes.extend(made.into_iter().filter_map(|(t, delta)| Some((i, t?, delta))));
        }
        changes
    }

    /// Forgets, from time to time, the vehicles whose passes are all before the horizon (the
    /// others lose theirs as they pass again).
    fn sweep(&mut self, watermark: i64, lateness_ms: i64) {
        let horizon = self.horizon(watermark, lateness_ms);
        if self.sweeps.due(horizon) {
            self.tracks.retain(|_, track| track.newest >= horizon);
        }
    }

    /// Whether every track names checkpoints of a city of `checkpoints`.
    fn fit(stored: &[(String, u8, Vec<Point>)], checkpoints: usize) -> bool {
        stored.iter().flat_map(|t| &t.2).all(|p| (p.cp as usize) < checkpoints)
    }

    fn restore(&mut self, stored: Vec<(String, u8, Vec<Point>)>) {
        self.tracks.clear();
        for (plate, color, track) in stored {
            if let Some(vehicle) = VehicleKey::from_stored(&plate, color) {
                self.tracks.insert(vehicle, Track::of(track));
            }
        }
    }
}

/// Adds (`delta` = 1) or retracts (-1) each traversal of a batch, (pass, traversal, delta), in
/// every window of `sets` (one per size).
fn add_to_windows(sets: &mut [BTreeMap<i64, Window>], changes: &[(usize, Traversal, i32)]) {
    for (set, size_s) in sets.iter_mut().zip(CONGESTION_WINDOWS_S) {
        let size_ms = i64::from(size_s) * 1000;
        // A batch's traversals fall in a few windows of a few hundred segments: they are summed
        // per window and segment first, and each sum is added to its window's tree once.
        let mut sums: FxHashMap<(i64, u32), (i64, i64, u32)> = FxHashMap::default();
        for &(_, t, delta) in changes {
            let (traversals, dt_ms, updates) = sums.entry((tumbling_start(t.at, size_ms), t.segment)).or_default();
            *traversals += i64::from(delta);
            *dt_ms += i64::from(delta) * t.dt_ms;
            *updates += 1;
        }
        let mut sums: Vec<_> = sums.into_iter().collect();
        sums.sort_unstable_by_key(|(key, _)| *key);
        // Sums come in runs of one window: each run looks its window up once.
        let mut current: Option<(i64, &mut Window)> = None;
        for ((start, segment), (traversals, dt_ms, updates)) in sums {
            let w = match current.take() {
                Some((s, w)) if s == start => w,
                _ => set.entry(start).or_default(),
            };
            let s = w.segments.entry(segment).or_default();
            // A retraction follows the addition it takes back: a window's count never goes
            // below zero along the way, so the batch's net change is added at once.
            s.traversals = (i64::from(s.traversals) + traversals).clamp(0, i64::from(u32::MAX)) as u32;
            s.dt_ms += dt_ms;
            s.updates += updates;
            if w.emitted {
                w.dirty.insert(segment);
            }
            current = Some((start, w));
        }
    }
}

/// What the windows' half of congestion reads of the city.
#[derive(Clone, Debug)]
pub struct CongestionEnv {
    city: Arc<City>,
    names: RankedKeys,
    index: FxHashMap<Arc<str>, u32>,
    top_n: usize,
}

impl CongestionEnv {
    pub fn new(city: &Arc<City>, top_n: usize) -> CongestionEnv {
        let names = RankedKeys::new(city.segments.iter().map(|s| s.id.clone()).collect());
        let index = city.segments.iter().enumerate().map(|(i, s)| (s.id.clone(), i as u32)).collect();
        CongestionEnv { city: city.clone(), names, index, top_n }
    }

    /// The index of segment `id`.
    pub fn segment(&self, id: &str) -> Option<u32> {
        self.index.get(id).copied()
    }

    /// How many segments the city has.
    pub fn segments(&self) -> usize {
        self.names.names.len()
    }
}

/// The windows' half of congestion: per segment and window the traversal sums and their rows,
/// the areas', Top-N segments and sudden congestion. One instance feeds it every traversal;
/// scale-out's merge feeds it every input partition's summed windows.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CongestionWindows {
    /// Per window size: windows by start.
    sets: Vec<BTreeMap<i64, Window>>,
    ranking: SlidingRanking,
    /// Sudden-congestion alerts raised: (segment, first congested window) → (active, revision).
    sudden: BTreeMap<(u32, i64), (bool, u32)>,
    /// Sudden-congestion alerts adopted after a restore, to judge again once their windows are
    /// complete (not checkpointed: a restore adopts them again from the store).
    #[serde(skip)]
    rejudge: BTreeSet<(u32, i64)>,
}

impl Default for CongestionWindows {
    fn default() -> Self {
        CongestionWindows {
            sets: vec![BTreeMap::new(); CONGESTION_WINDOWS_S.len()],
            ranking: SlidingRanking::default(),
            sudden: BTreeMap::new(),
            rejudge: BTreeSet::new(),
        }
    }
}

impl CongestionWindows {
    /// Adds (`delta` = 1) or retracts (-1) each traversal of a batch, (pass, traversal,
    /// delta), in every window and the ranking; a pass whose traversal the ranking could no
    /// longer take goes to `late`.
    fn apply(&mut self, env: &CongestionEnv, changes: &[(usize, Traversal, i32)], ctx: &mut Context<'_>) {
        add_to_windows(&mut self.sets, changes);
        let width = env.names.names.len();
        let change = |&(_, t, delta): &(usize, Traversal, i32)| (t.at, t.segment as usize, delta);
        let late = &mut *ctx.late;
        self.ranking.add_all(changes, change, width, (ctx.watermark, ctx.allowed_lateness_ms), |&(i, _, _)| {
            late.push((i, RANKING_LATE_LABEL))
        });
    }

    /// Sets segment `segment`'s sums in the window of `window_s` starting at `start` (scale-out:
    /// the sum of every input partition's).
    pub fn set(&mut self, segment: u32, window_s: u32, start: i64, sums: SegmentSums) {
        let Some(set) = CONGESTION_WINDOWS_S.iter().position(|s| *s == window_s) else { return };
        let w = self.sets[set].entry(start).or_default();
        if w.segments.insert(segment, sums) != Some(sums) && w.emitted {
            w.dirty.insert(segment);
        }
    }

    /// Adds `delta` traversals of `segment` at `ts` to the Top-N segments ranking (scale-out).
    pub fn rank(&mut self, env: &CongestionEnv, segment: u32, ts: i64, delta: i32, watermark: i64, lateness_ms: i64) {
        let width = env.names.names.len();
        self.ranking.add(ts, segment as usize, delta, width, watermark, lateness_ms);
    }

    /// Emits a completed window's new or changed rows; returns the segments it emitted.
    fn emit_window(env: &CongestionEnv, size_s: u32, start: i64, w: &mut Window, out: &mut ResultBatch) -> Vec<u32> {
        // On first emission every segment the window saw goes out, a segment whose traversals
        // were all retracted as a retraction: after a restart the rows written before the
        // crash may hold it.
        let changed: Vec<u32> = if w.emitted {
            std::mem::take(&mut w.dirty).into_iter().collect()
        } else {
            w.segments.keys().copied().collect()
        };
        if changed.is_empty() {
            w.emitted = true;
            return changed;
        }
        for &i in &changed {
            let segment = &env.city.segments[i as usize];
            out.segment_congestion.push(segment_row(segment, size_s, start, w.segments[&i]));
        }
        // The areas the changed segments lie in, and the city.
        let regions: BTreeSet<&str> = changed.iter().map(|i| &*env.city.segments[*i as usize].region_id).collect();
        for row in area_rows(&env.city, size_s, start, &w.segments) {
            if row.level == "city" || regions.contains(&*row.key_id) {
                out.area_congestion.push(row);
            }
        }
        w.emitted = true;
        changed
    }

    /// Re-judges the sudden-congestion patterns a change of segment `segment` in the 5 min
    /// window `start` can touch: those whose first congested window is one before, at or after.
    fn judge_sudden(
        &mut self,
        env: &CongestionEnv,
        five: &BTreeMap<i64, Window>,
        segment: u32,
        start: i64,
        watermark: i64,
        out: &mut Vec<AlertRow>,
    ) {
        // The level of each window from two before `start` to two after, `None` for one not
        // complete or not kept: each pattern reads three neighbours of them.
        let levels = [-2, -1, 0, 1, 2].map(|k| {
            let w = start + k * SUDDEN_WINDOW_MS;
            if !is_complete(w + SUDDEN_WINDOW_MS, watermark) {
                return None;
            }
            let s = five.get(&w)?.segments.get(&segment).copied().unwrap_or_default();
            Some(segment_level(&env.city.segments[segment as usize], s))
        });
        for (k, first) in [start - SUDDEN_WINDOW_MS, start, start + SUDDEN_WINDOW_MS].into_iter().enumerate() {
            let [Some(before), Some(at), Some(after)] = [levels[k], levels[k + 1], levels[k + 2]] else {
                continue;
            };
            let holds =
                matches!((before, at, after), (Some((b, _)), Some((x, _)), Some((y, _))) if b <= 2 && x >= 4 && y >= 4);
            let raised = self.sudden.get(&(segment, first)).copied();
            let revision = match (holds, raised) {
                (true, Some((true, _))) | (false, None) | (false, Some((false, _))) => continue,
                (_, None) => 0,
                (_, Some((_, r))) => r + 1,
            };
            self.sudden.insert((segment, first), (holds, revision));
            let id = &env.city.segments[segment as usize].id;
            out.push(sudden_alert(id, first, [before, at, after], holds, revision));
        }
    }

    /// Emits the windows the watermark completes and the changed ones, judges sudden
    /// congestion where they changed, lets go of the windows past the allowed lateness and
    /// emits the ranking.
    pub fn emit(&mut self, env: &CongestionEnv, watermark: i64, lateness_ms: i64, out: &mut ResultBatch) {
        let mut sets = std::mem::take(&mut self.sets);
        let mut changed_five = Vec::new();
        for (set, size_s) in sets.iter_mut().zip(CONGESTION_WINDOWS_S) {
            let size_ms = i64::from(size_s) * 1000;
            for (&start, w) in set.iter_mut() {
                if !is_complete(start + size_ms, watermark) {
                    break;
                }
                if !w.emitted || !w.dirty.is_empty() {
                    let changed = Self::emit_window(env, size_s, start, w, out);
                    if size_ms == SUDDEN_WINDOW_MS {
                        changed_five.extend(changed.into_iter().map(|segment| (segment, start)));
                    }
                }
            }
        }
        let five =
            CONGESTION_WINDOWS_S.iter().position(|s| i64::from(*s) * 1000 == SUDDEN_WINDOW_MS).expect("a 5 min size");
        for (segment, start) in changed_five {
            self.judge_sudden(env, &sets[five], segment, start, watermark, &mut out.alerts);
        }
        let due: Vec<(u32, i64)> = self
            .rejudge
            .iter()
            .filter(|(_, first)| is_complete(first + 2 * SUDDEN_WINDOW_MS, watermark))
            .copied()
            .collect();
        for (segment, first) in due {
            self.rejudge.remove(&(segment, first));
            self.judge_sudden(env, &sets[five], segment, first, watermark, &mut out.alerts);
        }
        // A 5 min window is kept, unchanged, two windows past its lateness: sudden congestion
        // judges a change by the two windows before it, as the batch does.
        let let_go = |start: i64, size_ms: i64| {
            let kept_ms = if size_ms == SUDDEN_WINDOW_MS { SUDDEN_KEPT_WINDOWS * size_ms } else { size_ms };
            is_late(start + kept_ms, watermark, lateness_ms)
        };
        for (set, size_s) in sets.iter_mut().zip(CONGESTION_WINDOWS_S) {
            let size_ms = i64::from(size_s) * 1000;
            set.retain(|start, _| !let_go(*start, size_ms));
        }
        // A pattern is forgotten once its last window is let go: by the watermark, not by the
        // oldest window held (a restored state may hold none yet, and the alerts it adopted
        // would be forgotten before their windows come again).
        let last_let_go = |first: i64| let_go(first + SUDDEN_WINDOW_MS, SUDDEN_WINDOW_MS);
        self.sudden.retain(|(_, first), _| !last_let_go(*first));
        self.rejudge.retain(|(_, first)| !last_let_go(*first));
        self.sets = sets;
        self.ranking.emit(SEGMENT_METRIC, &env.names, env.top_n, watermark, lateness_ms, &mut out.top_n);
    }

    /// A sudden congestion raised or retracted after the restored state is taken as such (with
    /// its revision) and judged again once its windows are complete.
    pub fn adopt_alerts(&mut self, env: &CongestionEnv, alerts: &[AlertRow]) {
        for alert in alerts.iter().filter(|a| a.kind == SUDDEN_CONGESTION) {
            let Some(id) = alert.segment_id.as_deref() else { continue };
            let Some(segment) = env.segment(id) else { continue };
            let key = (segment, alert.ts - 2 * SUDDEN_WINDOW_MS);
            if self.sudden.get(&key).is_none_or(|(_, revision)| *revision < alert.revision) {
                self.sudden.insert(key, (alert.status == "active", alert.revision));
            }
            self.rejudge.insert(key);
        }
    }

    /// Whether the state fits a city of `segments` segments.
    pub fn fits(&self, segments: usize) -> bool {
        self.sets.len() == CONGESTION_WINDOWS_S.len()
            && self.sets.iter().flat_map(|s| s.values()).all(|w| w.segments.keys().all(|i| (*i as usize) < segments))
            && self.ranking.fits(segments)
    }
}

/// Congestion on one instance: the vehicles' tracks feeding the windows.
pub struct Congestion {
    env: CongestionEnv,
    tracks: Tracks,
    windows: CongestionWindows,
    /// The length of the last snapshot (see [`StateBlob::encode`]).
    snapshot_len: AtomicUsize,
}

impl Congestion {
    pub fn new(city: &Arc<City>, top_n: usize) -> Congestion {
        Congestion {
            env: CongestionEnv::new(city, top_n),
            tracks: Tracks::new(city),
            windows: CongestionWindows::default(),
            snapshot_len: AtomicUsize::new(0),
        }
    }
}

/// A sudden-congestion alert: the segment's levels and speeds in the window before and the two
/// congested windows.
fn sudden_alert(
    segment_id: &Arc<str>,
    first: i64,
    levels: [Option<(u8, f64)>; 3],
    active: bool,
    revision: u32,
) -> AlertRow {
    let windows: Vec<serde_json::Value> = levels
        .iter()
        .zip([first - SUDDEN_WINDOW_MS, first, first + SUDDEN_WINDOW_MS])
        .map(|(l, w)| {
            serde_json::json!({
                "window_start": w,
                "congestion_level": l.map(|(level, _)| level),
                "mean_speed_kmh": l.map(|(_, speed)| speed),
            })
        })
        .collect();
    let details = serde_json::json!({
        "segment_id": &**segment_id,
        "window_s": SUDDEN_WINDOW_MS / 1000,
        "windows": windows,
        "rule": "level >= 4 for 2 consecutive 5 min windows right after a window at level <= 2",
    });
    AlertRow {
        alert_id: sudden_id(segment_id, first),
        kind: SUDDEN_CONGESTION,
        ts: first + 2 * SUDDEN_WINDOW_MS,
        plate: None,
        plate_color: None,
        checkpoint_id: None,
        segment_id: Some(segment_id.clone()),
        severity: "medium",
        details: details.to_string(),
        status: if active { "active" } else { "retracted" },
        revision,
    }
}

/// The id of the sudden congestion on `segment_id` whose first congested window starts at `first`.
pub fn sudden_id(segment_id: &str, first: i64) -> String {
    crate::model::stable_id(SUDDEN_CONGESTION, &[segment_id.as_bytes(), first.to_string().as_bytes()])
}

/// The row of one segment's window.
fn segment_row(segment: &Segment, window_s: u32, start: i64, s: SegmentSums) -> SegmentCongestionRow {
    let (level, speed) = segment_level(segment, s).unwrap_or((0, 0.0));
    let tti = if s.traversals == 0 { 0.0 } else { s.dt_ms as f64 / f64::from(s.traversals) / segment.free_flow_ms() };
    SegmentCongestionRow {
        segment_id: segment.id.clone(),
        window_s,
        window_start: start,
        traversals: s.traversals,
        mean_speed_kmh: speed,
        travel_time_index: round2(tti),
        congestion_level: level,
        revision: s.updates.saturating_sub(1),
    }
}

/// A segment's level and mean speed (rounded as its row holds it) in a window of sums `s`;
/// `None` without traversals. Sudden congestion judges by it without making the row.
fn segment_level(segment: &Segment, s: SegmentSums) -> Option<(u8, f64)> {
    (s.traversals > 0).then(|| {
        let speed = segment.length_m * 3600.0 / (s.dt_ms as f64 / f64::from(s.traversals));
        (congestion_level(segment.road_class, speed), round2(speed))
    })
}

#[derive(Default)]
struct AreaSums {
    length_m: f64,
    /// Σ L / v: the mean traversal times, ms.
    time_ms: f64,
    free_ms: f64,
    length_levels: f64,
    updates: u32,
}

impl AreaSums {
    /// Adds one segment of the area with its sums in the window.
    fn add(&mut self, segment: &Segment, s: &SegmentSums) {
        self.updates += s.updates;
        if s.traversals > 0 {
            let mean_dt = s.dt_ms as f64 / f64::from(s.traversals);
            let level = congestion_level(segment.road_class, segment.length_m * 3600.0 / mean_dt);
            self.length_m += segment.length_m;
            self.time_ms += mean_dt;
            self.free_ms += segment.free_flow_ms();
            self.length_levels += segment.length_m * f64::from(level);
        }
    }

    fn row(self, level: &'static str, key_id: Arc<str>, window_s: u32, start: i64) -> AreaCongestionRow {
        let retracted = self.length_m == 0.0;
        let (speed, tti, congestion) = if retracted {
            (0.0, 0.0, 0)
        } else {
            let mean_level = (self.length_levels / self.length_m + 0.5).floor() as u8;
            (self.length_m * 3600.0 / self.time_ms, self.time_ms / self.free_ms, mean_level)
        };
        AreaCongestionRow {
            level,
            key_id,
            window_s,
            window_start: start,
            mean_speed_kmh: round2(speed),
            travel_time_index: round2(tti),
            congestion_level: congestion,
            revision: self.updates.saturating_sub(1),
            retracted,
        }
    }
}

/// The rows of the city and of every region with any segment in the window (in that order,
/// the regions by id), from the window's segments in index order. An area whose segments all
/// lost their traversals is a retraction.
fn area_rows(city: &City, window_s: u32, start: i64, segments: &BTreeMap<u32, SegmentSums>) -> Vec<AreaCongestionRow> {
    if segments.is_empty() {
        return Vec::new();
    }
    // A city has a handful of regions: a segment's is found by a walk through those seen.
    let mut whole = AreaSums::default();
    let mut regions: Vec<(&Arc<str>, AreaSums)> = Vec::new();
    for (i, s) in segments {
        let segment = &city.segments[*i as usize];
        let at = match regions.iter().position(|(id, _)| **id == segment.region_id) {
            Some(at) => at,
            None => {
                regions.push((&segment.region_id, AreaSums::default()));
                regions.len() - 1
            }
        };
        regions[at].1.add(segment, s);
        whole.add(segment, s);
    }
    regions.sort_by(|a, b| a.0.cmp(b.0));
    let mut rows = Vec::with_capacity(regions.len() + 1);
    rows.push(whole.row("city", Arc::from("all"), window_s, start));
    rows.extend(regions.into_iter().map(|(id, a)| a.row("region", id.clone(), window_s, start)));
    rows
}

impl Operator for Congestion {
    fn name(&self) -> &'static str {
        "segment_congestion"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let changes = self.tracks.take_batch(passes, ctx);
        self.windows.apply(&self.env, &changes, ctx);
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        self.windows.emit(&self.env, watermark, lateness, ctx.out);
        self.tracks.sweep(watermark, lateness);
    }

    /// A sudden congestion raised or retracted after the restored checkpoint is taken as such
    /// (with its revision) and judged again once its windows are complete.
    fn adopt_alerts(&mut self, alerts: &[AlertRow]) {
        self.windows.adopt_alerts(&self.env, alerts);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        // Written straight from the maps, in the shape of `Stored`.
        let stored = StoredRef {
            tracks: SeqOf::new(
                self.tracks.tracks.iter().map(|(v, t)| (v.plate.as_str(), v.color.code(), &t.points[..])),
            ),
            sets: &self.windows.sets,
            ranking: &self.windows.ranking,
            sudden: SeqOf::new(self.windows.sudden.iter()),
        };
        StateBlob::encode(STATE_VERSION, &stored, &self.snapshot_len)
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        let stored: Stored = blob.decode(self.name(), STATE_VERSION, JSON_STATE_VERSION)?;
        let (checkpoints, segments) = (self.env.city.checkpoints.len(), self.env.city.segments.len());
        let windows = CongestionWindows {
            sets: stored.sets,
            ranking: stored.ranking,
            sudden: stored.sudden.into_iter().collect(),
            rejudge: BTreeSet::new(),
        };
        anyhow::ensure!(
            windows.fits(segments) && Tracks::fit(&stored.tracks, checkpoints),
            "segment_congestion state was taken with another city (checkpoints or segments differ)"
        );
        self.tracks.restore(stored.tracks);
        self.windows = windows;
        Ok(())
    }
}

/// Congestion's part in scale-out's per-vehicle stage: the traversals of one input partition's
/// vehicles, summed per segment and window — a window's sums emitted once the partition's
/// watermark has passed it and a segment's again whenever they change ([`SegmentSumsRow`]) —
/// and counted in Top-N's 5 s buckets. Scale-out's merge (`crate::kafka::Merge`) adds every
/// partition's up and runs [`CongestionWindows`] over the sums.
pub struct CongestionPartial {
    segments: Vec<Arc<str>>,
    tracks: Tracks,
    /// Per window size: windows by start.
    sets: Vec<BTreeMap<i64, Window>>,
    buckets: BucketCounts,
}

#[derive(Serialize, Deserialize)]
struct PartialStored {
    tracks: Vec<(String, u8, Vec<Point>)>,
    sets: Vec<BTreeMap<i64, Window>>,
    buckets: BucketCounts,
}

impl CongestionPartial {
    pub fn new(city: &Arc<City>) -> CongestionPartial {
        CongestionPartial {
            segments: city.segments.iter().map(|s| s.id.clone()).collect(),
            tracks: Tracks::new(city),
            sets: vec![BTreeMap::new(); CONGESTION_WINDOWS_S.len()],
            buckets: BucketCounts::default(),
        }
    }
}

impl Operator for CongestionPartial {
    fn name(&self) -> &'static str {
        "segment_congestion"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        let changes = self.tracks.take_batch(passes, ctx);
        add_to_windows(&mut self.sets, &changes);
        for (i, t, delta) in changes {
            if !self.buckets.add(t.at, t.segment, delta, watermark, lateness) {
                ctx.late.push((i, RANKING_LATE_LABEL));
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        for (set, size_s) in self.sets.iter_mut().zip(CONGESTION_WINDOWS_S) {
            let size_ms = i64::from(size_s) * 1000;
            for (&start, w) in set.iter_mut() {
                if !is_complete(start + size_ms, watermark) {
                    break;
                }
                let changed: Vec<u32> = if w.emitted {
                    std::mem::take(&mut w.dirty).into_iter().collect()
                } else {
                    w.segments.keys().copied().collect()
                };
                w.emitted = true;
                for segment in changed {
                    let SegmentSums { traversals, dt_ms, updates } = w.segments[&segment];
                    ctx.out.segment_sums.push(SegmentSumsRow {
                        segment_id: self.segments[segment as usize].clone(),
                        window_s: size_s,
                        window_start: start,
                        traversals,
                        dt_ms,
                        updates,
                    });
                }
            }
            set.retain(|start, _| !is_late(start + size_ms, watermark, lateness));
        }
        self.buckets.emit(SEGMENT_METRIC, &self.segments, watermark, lateness, &mut ctx.out.top_n_buckets);
        self.tracks.sweep(watermark, lateness);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let tracks =
            self.tracks.tracks.iter().map(|(v, t)| (v.plate.as_str().to_owned(), v.color.code(), t.points.to_vec()));
        let stored = PartialStored { tracks: tracks.collect(), sets: self.sets.clone(), buckets: self.buckets.clone() };
        StateBlob::encode(STATE_VERSION, &stored, &AtomicUsize::new(0))
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        let stored: PartialStored = blob.decode(self.name(), STATE_VERSION, STATE_VERSION)?;
        let segments = self.segments.len();
        anyhow::ensure!(
            stored.sets.len() == CONGESTION_WINDOWS_S.len()
                && stored
                    .sets
                    .iter()
                    .flat_map(|s| s.values())
                    .all(|w| w.segments.keys().all(|i| (*i as usize) < segments))
                && stored.buckets.fits(segments),
            "segment_congestion state was taken with another city (segments differ)"
        );
        self.tracks.restore(stored.tracks);
        self.sets = stored.sets;
        self.buckets = stored.buckets;
        Ok(())
    }
}

#[derive(Serialize)]
#[serde(bound(serialize = "SeqOf<T>: Serialize, SeqOf<S>: Serialize"))]
struct StoredRef<'a, T, S> {
    tracks: SeqOf<T>,
    sets: &'a [BTreeMap<i64, Window>],
    ranking: &'a SlidingRanking,
    sudden: SeqOf<S>,
}

#[derive(Deserialize)]
struct Stored {
    /// (plate, colour, passes in time order)
    tracks: Vec<(String, u8, Vec<Point>)>,
    sets: Vec<BTreeMap<i64, Window>>,
    ranking: SlidingRanking,
    sudden: Vec<((u32, i64), (bool, u32))>,
}

/// Segment rows of the batch computation: (segment, window_s, window_start) → (traversals, speed,
/// travel-time index, level).
pub type SegmentTable = BTreeMap<(String, u32, i64), (u32, f64, f64, u8)>;
/// Area rows of the batch computation: (level, key, window_s, window_start) → (speed, index, level).
pub type AreaTable = BTreeMap<(String, String, u32, i64), (f64, f64, u8)>;

/// The batch computation over deduplicated passes: segment rows, area rows and the Top-N
/// segment ranking by window end.
pub fn batch_congestion(
    city: &City,
    passes: &[Pass],
    n: usize,
) -> (SegmentTable, AreaTable, BTreeMap<i64, Vec<(Arc<str>, u64)>>) {
    let roads = Roads::new(city);
    let mut tracks: FxHashMap<VehicleKey, Vec<Point>> = FxHashMap::default();
    for p in passes {
        if let Some(v) = p.vehicle() {
            tracks.entry(v).or_default().push(Point::of(p));
        }
    }
    let mut traversals = Vec::new();
    for track in tracks.values_mut() {
        track.sort_by_key(Point::order);
        traversals.extend(track.windows(2).filter_map(|w| roads.traversal(w[0], w[1])));
    }
    let mut windows: BTreeMap<(u32, i64), BTreeMap<u32, SegmentSums>> = BTreeMap::new();
    for t in &traversals {
        for size_s in CONGESTION_WINDOWS_S {
            let s = windows
                .entry((size_s, tumbling_start(t.at, i64::from(size_s) * 1000)))
                .or_default()
                .entry(t.segment)
                .or_default();
            s.traversals += 1;
            s.dt_ms += t.dt_ms;
        }
    }
    let (mut segment_table, mut area_table) = (SegmentTable::new(), AreaTable::new());
    for ((size_s, start), segments) in &windows {
        for (i, s) in segments {
            let r = segment_row(&city.segments[*i as usize], *size_s, *start, *s);
            segment_table.insert(
                (r.segment_id.to_string(), *size_s, *start),
                (r.traversals, r.mean_speed_kmh, r.travel_time_index, r.congestion_level),
            );
        }
        for r in area_rows(city, *size_s, *start, segments) {
            area_table.insert(
                (r.level.to_owned(), r.key_id.to_string(), *size_s, *start),
                (r.mean_speed_kmh, r.travel_time_index, r.congestion_level),
            );
        }
    }
    let ranking = batch_ranking(traversals.iter().map(|t| (t.at, city.segments[t.segment as usize].id.clone())), n);
    (segment_table, area_table, ranking)
}

/// The batch computation of sudden congestion: the ids of every pattern in the segment table.
pub fn batch_sudden_congestion(segments: &SegmentTable) -> Vec<String> {
    let level = |id: &str, w: i64| segments.get(&(id.to_owned(), 300, w)).map(|r| r.3);
    let mut ids: Vec<String> = segments
        .keys()
        .filter(|(_, size, _)| *size == 300)
        .filter(|(id, _, w)| {
            level(id, *w).is_some_and(|l| l >= 4)
                && level(id, w + SUDDEN_WINDOW_MS).is_some_and(|l| l >= 4)
                && level(id, w - SUDDEN_WINDOW_MS).is_some_and(|l| l <= 2)
        })
        .map(|(id, _, w)| sudden_id(id, *w))
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
#[path = "congestion_tests.rs"]
mod tests;
