//! Device-health alerts, judged as the data arrives (they describe the cameras and their
//! uplinks, so they depend on arrival, unlike the window results):
//!
//! - `device_silent`: a checkpoint has delivered no pass for at least 10 min while, at its share
//!   of the city's passes in the two hours before (at least 20 of its own), at least 20 of the
//!   city's passes since were expected there (the chance of such a gap by luck is below e⁻²⁰;
//!   scaling by the whole city's traffic keeps the evening decline from looking like silence).
//!   Judged when a pass ends the gap and, while it lasts, as the watermark moves. One alert per
//!   silence, keyed by the last pass before it.
//! - `clock_skew`: a camera whose clock runs ahead or behind. Travel times into a checkpoint
//!   grow by the skew and travel times out of it shrink by it, so for each neighbour the half
//!   difference of the median times there and back estimates it; a checkpoint whose estimates
//!   agree (at least 2 neighbours, each with 8 vehicles both ways, all beyond 45 s one way) is flagged,
//!   once per hour.
//! - `unreadable_plates`: a checkpoint's share of unreadable plates in a 1 h window at least
//!   max(20 %, 3 × the city's share in that window), over at least 50 passes.

use crate::core::window::{is_complete, tumbling_start, window_runs, Every};
use crate::core::{Context, Operator, StateBlob, VehicleTable};
use crate::model::{stable_id, Pass};
use crate::reference::City;
use crate::results::AlertRow;
use rustc_hash::FxHashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;

pub const DEVICE_SILENT: &str = "device_silent";
pub const CLOCK_SKEW: &str = "clock_skew";
pub const UNREADABLE_PLATES: &str = "unreadable_plates";
const MINUTE_MS: i64 = 60_000;
const HOUR_MS: i64 = 3_600_000;
const RATE_SPAN_MS: i64 = 2 * HOUR_MS;
const MIN_SILENCE_MS: i64 = 10 * MINUTE_MS;
const EXPECTED_PASSES: f64 = 20.0;
/// A share of the city's traffic rests on at least this many passes of the checkpoint.
const MIN_BASE_PASSES: u32 = 20;
/// Consecutive passes of a vehicle further apart than this are not a trip between neighbours.
const MAX_TRIP_MS: i64 = 30 * MINUTE_MS;
/// How far the watermark moves between sweeps of the vehicles' latest passes.
const SWEEP_EVERY_MS: i64 = 10 * MINUTE_MS;
const SAMPLES_PER_PAIR: usize = 200;
const MIN_SAMPLES: usize = 8;
const MIN_SKEW_MS: f64 = 45_000.0;

#[derive(Default)]
struct Checkpoint {
    /// Passes per minute (by event time) over the last two hours.
    minutes: BTreeMap<i64, u32>,
    last_ts: Option<i64>,
    /// The silence already reported, by the last pass before it.
    reported_silence: Option<i64>,
    skew_reported_hour: Option<i64>,
}

/// The thread group of the operators that share [`ClockSkews`]: they run in their listed order,
/// so which skews a batch is judged by does not depend on timing.
pub const SKEW_GROUP: &str = "clock_skews";

/// The camera clock skews found so far (checkpoint → ms its clock runs ahead), shared with the
/// cloned-plate rule, which corrects pass times by them.
#[derive(Debug, Default)]
pub struct ClockSkews {
    skews: std::sync::RwLock<BTreeMap<u32, i64>>,
    generation: std::sync::atomic::AtomicU64,
}

impl ClockSkews {
    /// Every skew known: checkpoint → ms.
    pub fn all(&self) -> BTreeMap<u32, i64> {
        self.skews.read().expect("skew lock").clone()
    }

    pub fn set(&self, checkpoint: u32, skew_ms: i64) {
        let mut skews = self.skews.write().expect("skew lock");
        if skews.insert(checkpoint, skew_ms) != Some(skew_ms) {
            self.generation.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        }
    }

    /// Changes with every new or changed skew.
    pub fn generation(&self) -> u64 {
        self.generation.load(std::sync::atomic::Ordering::SeqCst)
    }
}

pub struct DeviceHealth {
    city: Arc<City>,
    skews: Arc<ClockSkews>,
    checkpoints: Vec<Checkpoint>,
    /// Each vehicle's latest pass: (ts, checkpoint).
    last_pass: VehicleTable<Option<(i64, u32)>>,
    /// Sweeps of `last_pass` (entries too old to start a trip are ignored before they are
    /// swept).
    sweeps: Every,
    /// Recent travel times per directed checkpoint pair.
    trips: FxHashMap<(u32, u32), VecDeque<i64>>,
    /// Per 1 h window: per checkpoint (passes, unreadable).
    plates: BTreeMap<i64, Vec<(u32, u32)>>,
    /// The hour whose skew was last judged.
    skew_judged: Option<i64>,
    /// The whole city's passes per minute (by event time) over the last hours.
    city_minutes: BTreeMap<i64, u32>,
}

impl DeviceHealth {
    pub fn new(city: &Arc<City>, skews: Arc<ClockSkews>) -> DeviceHealth {
        DeviceHealth {
            city: city.clone(),
            skews,
            checkpoints: (0..city.checkpoints.len()).map(|_| Checkpoint::default()).collect(),
            last_pass: VehicleTable::default(),
            sweeps: Every::new(SWEEP_EVERY_MS),
            trips: FxHashMap::default(),
            plates: BTreeMap::new(),
            skew_judged: None,
            city_minutes: BTreeMap::new(),
        }
    }

    fn alert(&self, kind: &'static str, cp: u32, at: i64, key: i64, details: serde_json::Value) -> AlertRow {
        let id = &self.city.checkpoints[cp as usize].id;
        AlertRow {
            alert_id: stable_id(kind, &[id.as_bytes(), key.to_string().as_bytes()]),
            kind,
            ts: at,
            plate: None,
            plate_color: None,
            checkpoint_id: Some(id.clone()),
            segment_id: None,
            severity: "low",
            details: details.to_string(),
            status: "active",
            revision: 0,
        }
    }

    /// Judges the silence of `cp` after its pass at `last` up to `until` (the watermark, or
    /// the next pass that ended it).
    fn judge_silence(&mut self, cp: usize, last: i64, until: i64, at: i64, out: &mut Vec<AlertRow>) {
        let c = &self.checkpoints[cp];
        let gap = until.saturating_sub(last);
        if gap < MIN_SILENCE_MS || c.reported_silence == Some(last) {
            return;
        }
        let before: u32 = c.minutes.range(last.saturating_sub(RATE_SPAN_MS)..=last).map(|(_, n)| *n).sum();
        let city_before: u32 = self.city_minutes.range(last.saturating_sub(RATE_SPAN_MS)..=last).map(|(_, n)| *n).sum();
        let city_since: u32 = self
            .city_minutes
            .range(tumbling_start(last, MINUTE_MS) + MINUTE_MS..tumbling_start(until, MINUTE_MS))
            .map(|(_, n)| *n)
            .sum();
        if before < MIN_BASE_PASSES || city_before == 0 {
            return;
        }
        let share = f64::from(before) / f64::from(city_before);
        let expected = share * f64::from(city_since);
        if expected < EXPECTED_PASSES {
            return;
        }
        let details = serde_json::json!({
            "last_pass_ts": last,
            "silent_until_ts": until,
            "silent_minutes": gap / MINUTE_MS,
            "share_of_city_before": (share * 10_000.0).round() / 10_000.0,
            "city_passes_during": city_since,
            "expected_passes": expected.round(),
        });
        out.push(self.alert(DEVICE_SILENT, cp as u32, at, last, details));
        self.checkpoints[cp].reported_silence = Some(last);
    }

    /// The skew estimate of each checkpoint: the half differences of the median travel times
    /// from and to each neighbour with enough samples both ways.
    fn skew_estimates(&self) -> BTreeMap<u32, Vec<f64>> {
        let median = |v: &VecDeque<i64>| {
            let mut s: Vec<i64> = v.iter().copied().collect();
            s.sort_unstable();
            s[s.len() / 2] as f64
        };
        let mut estimates: BTreeMap<u32, Vec<f64>> = BTreeMap::new();
        for (&(a, b), into_b) in &self.trips {
            let Some(out_of_b) = self.trips.get(&(b, a)) else { continue };
            if into_b.len() < MIN_SAMPLES || out_of_b.len() < MIN_SAMPLES {
                continue;
            }
            estimates.entry(b).or_default().push((median(into_b) - median(out_of_b)) / 2.0);
        }
        estimates
    }

    fn judge_skew(&mut self, hour: i64, out: &mut Vec<AlertRow>) {
        for (cp, estimates) in self.skew_estimates() {
            let agree = estimates.len() >= 2
                && (estimates.iter().all(|s| *s > MIN_SKEW_MS) || estimates.iter().all(|s| *s < -MIN_SKEW_MS));
            let c = &self.checkpoints[cp as usize];
            if !agree || c.skew_reported_hour == Some(hour) {
                continue;
            }
            let mut sorted = estimates.clone();
            sorted.sort_by(f64::total_cmp);
            let skew_s = sorted[sorted.len() / 2] / 1000.0;
            let details = serde_json::json!({
                "estimated_skew_s": skew_s.round(),
                "neighbour_estimates_s": sorted.iter().map(|s| (s / 100.0).round() / 10.0).collect::<Vec<_>>(),
                "hour_start": hour,
            });
            out.push(self.alert(CLOCK_SKEW, cp, hour + HOUR_MS, hour, details));
            self.checkpoints[cp as usize].skew_reported_hour = Some(hour);
            self.skews.set(cp, (skew_s.round() * 1000.0) as i64);
        }
    }

    fn judge_unreadable(&self, hour: i64, counts: &[(u32, u32)], out: &mut Vec<AlertRow>) {
        let (total, unreadable) = counts.iter().fold((0u64, 0u64), |a, c| (a.0 + u64::from(c.0), a.1 + u64::from(c.1)));
        let city_share = if total == 0 { 0.0 } else { unreadable as f64 / total as f64 };
        for (cp, (n, bad)) in counts.iter().enumerate() {
            if *n < 50 {
                continue;
            }
            let share = f64::from(*bad) / f64::from(*n);
            if share >= (3.0 * city_share).max(0.2) {
                let details = serde_json::json!({
                    "hour_start": hour,
                    "passes": n,
                    "unreadable": bad,
                    "share": (share * 1000.0).round() / 1000.0,
                    "city_share": (city_share * 1000.0).round() / 1000.0,
                });
                out.push(self.alert(UNREADABLE_PLATES, cp as u32, hour + HOUR_MS, hour, details));
            }
        }
    }
}

impl Operator for DeviceHealth {
    fn name(&self) -> &'static str {
        "device_health"
    }

    fn thread_group(&self) -> &'static str {
        SKEW_GROUP
    }

    fn state_version(&self) -> u32 {
        1
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let width = self.checkpoints.len();
        // Gaps that a pass closed: (checkpoint, last pass before, the pass that ended it).
        let mut closed = Vec::new();
        // A pass before this starts no trip (whichever batch it came in).
        let trips_from = ctx.watermark.saturating_sub(MAX_TRIP_MS);
        // The passes of known vehicles, and their vehicles.
        let (mut known, mut vehicles) = (Vec::with_capacity(passes.len()), Vec::with_capacity(passes.len()));
        // The batch's passes per minute, of the city and of each checkpoint, are added to the
        // minutes kept once the batch is counted: passes come a little out of order, so a
        // batch's runs of one minute are short (a dozen passes), and a look-up in the trees
        // of minutes per run and checkpoint cost more than the counting.
        let (mut city_minutes, mut checkpoint_minutes) = (FxHashMap::default(), FxHashMap::default());
        // Runs of one minute (within one hour): the hour's counts looked up once a run.
        for (_, minute, run) in window_runs(passes, MINUTE_MS) {
            *city_minutes.entry(minute).or_insert(0u32) += run.len() as u32;
            let counts = self.plates.entry(tumbling_start(minute, HOUR_MS)).or_insert_with(|| vec![(0, 0); width]);
            for p in run {
                let (ts, cp) = (p.ts.ms(), p.checkpoint.0);
                *checkpoint_minutes.entry((cp, minute)).or_insert(0u32) += 1;
                let c = &mut self.checkpoints[cp as usize];
                if let Some(last) = c.last_ts.filter(|l| ts - l >= MIN_SILENCE_MS) {
                    closed.push((cp as usize, last, ts));
                }
                c.last_ts = Some(c.last_ts.map_or(ts, |l| l.max(ts)));
                counts[cp as usize].0 += 1;
                let Some(vehicle) = p.vehicle_ref() else {
                    counts[cp as usize].1 += 1;
                    continue;
                };
                known.push(p);
                vehicles.push(vehicle);
            }
        }
        for (minute, n) in city_minutes {
            *self.city_minutes.entry(minute).or_default() += n;
        }
        for ((cp, minute), n) in checkpoint_minutes {
            *self.checkpoints[cp as usize].minutes.entry(minute).or_default() += n;
        }
        // Travel times from each vehicle's latest pass (by event time) to a later one: a pass
        // arriving after a later one of its vehicle makes no trip (it would pair passes that are
        // not adjacent in time).
        let places = self.last_pass.resolve(&vehicles, || None);
        for (j, (p, &place)) in known.iter().zip(&places).enumerate() {
            self.last_pass.prefetch_ahead(&places, j);
            let (ts, cp) = (p.ts.ms(), p.checkpoint.0);
            // One look-up of the vehicle: read, then moved on.
            let last = self.last_pass.value_mut(place);
            let prev = last.filter(|(prev_ts, _)| *prev_ts >= trips_from);
            if prev.is_none_or(|(prev_ts, _)| ts > prev_ts) {
                *last = Some((ts, cp));
            }
            if let Some((prev_ts, prev_cp)) = prev {
                let dt = ts - prev_ts;
                if prev_cp != cp && dt > 0 && dt < MAX_TRIP_MS {
                    let (from, to) = (prev_cp, cp);
                    let samples = self.trips.entry((from, to)).or_default();
                    samples.push_back(dt);
                    if samples.len() > SAMPLES_PER_PAIR {
                        samples.pop_front();
                    }
                }
            }
        }
        // Judged once the whole batch is counted, so the city's traffic during the gap is known.
        for (cp, last, until) in closed {
            self.judge_silence(cp, last, until, until, &mut ctx.out.alerts);
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let watermark = ctx.watermark;
        if watermark == i64::MAX || watermark == i64::MIN {
            return;
        }
        for cp in 0..self.checkpoints.len() {
            if let Some(last) = self.checkpoints[cp].last_ts {
                self.judge_silence(cp, last, watermark, watermark, &mut ctx.out.alerts);
            }
        }
        let done: Vec<i64> = self.plates.keys().copied().take_while(|h| is_complete(h + HOUR_MS, watermark)).collect();
        for hour in done {
            let counts = self.plates.remove(&hour).expect("listed above");
            self.judge_unreadable(hour, &counts, &mut ctx.out.alerts);
        }
        let hour = tumbling_start(watermark, HOUR_MS).saturating_sub(HOUR_MS);
        if self.skew_judged.is_none_or(|h| h < hour) {
            self.judge_skew(hour, &mut ctx.out.alerts);
            self.skew_judged = Some(hour);
        }
        for c in &mut self.checkpoints {
            let keep = c.last_ts.unwrap_or(watermark).min(watermark).saturating_sub(RATE_SPAN_MS + HOUR_MS);
            while c.minutes.first_key_value().is_some_and(|(m, _)| *m < keep) {
                c.minutes.pop_first();
            }
        }
        // A sweep visits every vehicle: once per sweep interval, not at every watermark.
        if self.sweeps.due(watermark) {
            self.last_pass.retain(|_, last| last.is_some_and(|(ts, _)| ts >= watermark.saturating_sub(MAX_TRIP_MS)));
        }
        // Silences longer than a day are not judged again; nor is older city traffic kept.
        let keep = watermark.saturating_sub(26 * HOUR_MS);
        while self.city_minutes.first_key_value().is_some_and(|(m, _)| *m < keep) {
            self.city_minutes.pop_first();
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        // Health judgements need only the recent past, which a restart relearns within the
        // hour; nothing is kept.
        Ok(StateBlob { version: 1, bytes: Vec::new() })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        crate::core::check_version(self.name(), blob.version, 1)
    }
}
