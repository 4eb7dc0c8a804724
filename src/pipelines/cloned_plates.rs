//! Cloned-plate alerts (套牌车): every pair of passes of one vehicle at checkpoints at least
//! 2 km apart whose implied speed, distance / (|Δt| + clock tolerance), is strictly above the
//! maximum plausible speed (180 km/h). One alert per pair, its id a hash of the two pass ids in
//! byte order, its time and checkpoint the later pass's. A pair is found when its second pass
//! arrives, whichever that is, so arrival order does not matter.
//!
//! Only passes close enough in time can conflict: |Δt| < longest distance in the city / speed
//! − tolerance. Each vehicle keeps its passes of that span behind the lateness horizon.

use super::device_health::ClockSkews;
use crate::core::window::{is_late, Every};
use crate::core::{Context, Operator, SeqOf, StateBlob, VehicleTable};
use crate::model::{Pass, Text, VehicleKey, DAY_MS};
use crate::reference::{haversine_m, City};
use crate::results::AlertRow;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

pub const CLONED_PLATE: &str = "cloned_plate";
const LATE_LABEL: &str = "cloned_plate";
const STATE_VERSION: u32 = 3;
/// States written before the binary encoding, as JSON.
const JSON_STATE_VERSION: u32 = 2;
/// How far the horizon moves between sweeps of every vehicle's passes. Passes before the
/// horizon pair with no pass that is not late, so a sweep only frees memory: each one visits
/// every vehicle, and the horizon is hours long, so an hour's more passes are kept instead.
const SWEEP_EVERY_MS: i64 = 60 * 60_000;

/// The rule's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ClonedPlateRule {
    pub min_distance_m: f64,
    pub max_speed_kmh: f64,
    pub clock_tolerance_s: f64,
}

impl Default for ClonedPlateRule {
    fn default() -> Self {
        ClonedPlateRule { min_distance_m: 2_000.0, max_speed_kmh: 180.0, clock_tolerance_s: 30.0 }
    }
}

impl ClonedPlateRule {
    /// The implied speed of two passes `distance_m` and `dt_ms` apart, km/h.
    pub fn implied_kmh(&self, distance_m: f64, dt_ms: i64) -> f64 {
        distance_m / (dt_ms.unsigned_abs() as f64 / 1000.0 + self.clock_tolerance_s) * 3.6
    }

    pub fn conflicts(&self, distance_m: f64, dt_ms: i64) -> bool {
        let implied_ms = distance_m / (dt_ms.unsigned_abs() as f64 / 1000.0 + self.clock_tolerance_s);
        distance_m >= self.min_distance_m && implied_ms > self.max_speed_kmh / 3.6
    }
}

/// A pass as the rule needs it.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Seen {
    ts: i64,
    pass_id: Text,
    cp: u32,
    plate_type: Text,
    vehicle_type: Option<Text>,
}

impl Seen {
    /// A pass as an alert's details describe it.
    fn described(city: &City, pass: &serde_json::Value) -> Option<Seen> {
        Some(Seen {
            ts: pass["ts"].as_i64()?,
            pass_id: pass["pass_id"].as_str()?.into(),
            cp: city.checkpoint_idx(pass["checkpoint_id"].as_str()?)?.0,
            plate_type: pass["plate_type"].as_str()?.into(),
            vehicle_type: pass["vehicle_type"].as_str().map(Into::into),
        })
    }

    /// Its time and checkpoint: what judging it takes.
    fn mark(&self, slot: u32) -> Mark {
        Mark { ts: self.ts, cp: self.cp, slot }
    }

    fn of(p: &Pass) -> Seen {
        Seen {
            ts: p.ts.ms(),
            pass_id: p.pass_id.clone(),
            cp: p.checkpoint.0,
            plate_type: p.plate_type.clone(),
            vehicle_type: p.vehicle_type.clone(),
        }
    }
}

/// A pass in a vehicle's list: its time and checkpoint, and its slot in [`Slab`], which holds
/// the rest (read only for an alert). A vehicle's list is searched and shifted on each of its
/// passes, so it is kept a few cache lines long.
#[derive(Clone, Copy, Debug)]
struct Mark {
    ts: i64,
    cp: u32,
    slot: u32,
}

/// Passes a slab chunk holds.
const CHUNK: usize = 1 << 16;

/// The passes of every vehicle's list in the order they came, in chunks: written one after
/// another (a slot reused at random would cost a cache miss a pass), and a chunk let go at a
/// sweep once every pass in it is behind the horizon — the sweep has then dropped its marks.
/// Slots count on from the first chunk's, wrapping: the passes held at once are far fewer
/// than 2^32.
#[derive(Default)]
struct Slab {
    chunks: std::collections::VecDeque<Chunk>,
    /// The slot of the first pass of the first chunk.
    first: u32,
}

struct Chunk {
    passes: Vec<Seen>,
    /// The newest time of a pass in it.
    newest: i64,
}

impl Slab {
    fn put(&mut self, seen: Seen) -> Mark {
        if self.chunks.back().is_none_or(|c| c.passes.len() == CHUNK) {
            self.chunks.push_back(Chunk { passes: Vec::with_capacity(CHUNK), newest: i64::MIN });
        }
        let held = (self.chunks.len() - 1) * CHUNK;
        let chunk = self.chunks.back_mut().expect("one was pushed above");
        let mark = seen.mark(self.first.wrapping_add((held + chunk.passes.len()) as u32));
        chunk.newest = chunk.newest.max(seen.ts);
        chunk.passes.push(seen);
        mark
    }

    fn get(&self, mark: &Mark) -> &Seen {
        let at = mark.slot.wrapping_sub(self.first) as usize;
        &self.chunks[at / CHUNK].passes[at % CHUNK]
    }

    /// Lets go of the full chunks, oldest first, whose passes are all before `horizon` (call
    /// once no mark before it is left).
    fn sweep(&mut self, horizon: i64) {
        while self.chunks.len() > 1 && self.chunks.front().is_some_and(|c| c.newest < horizon) {
            self.chunks.pop_front();
            self.first = self.first.wrapping_add(CHUNK as u32);
        }
    }
}

/// A vehicle's list as stored: its passes in full, in the shape the state has always had.
struct StoredList<'a>(&'a [Mark], &'a Slab);

impl Serialize for StoredList<'_> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.collect_seq(self.0.iter().map(|m| self.1.get(m)))
    }
}

/// An alert raised, kept so that a camera found skewed later can take it back.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Raised {
    plate: String,
    color: u8,
    a: Seen,
    b: Seen,
    active: bool,
    revision: u32,
}

/// Checkpoint distances, one lookup each: a table for cities of up to this many checkpoints
/// (8 MB of distances), computed on the fly beyond.
const DISTANCE_TABLE_MAX: usize = 1024;

/// What judging a pair of passes takes: the rule, the distances and the known clock skews.
struct Judge {
    city: Arc<City>,
    rule: ClonedPlateRule,
    /// `distances[a * n + b]`: the distance in metres between checkpoints a and b (empty for
    /// cities beyond [`DISTANCE_TABLE_MAX`]).
    distances: Vec<f64>,
    /// Each checkpoint's known clock skew, ms, as of the skews' generation last read.
    skews: Vec<i64>,
    /// The largest of them.
    largest_skew: i64,
}

impl Judge {
    fn new(city: &Arc<City>, rule: ClonedPlateRule) -> Judge {
        let n = city.checkpoints.len();
        let point = |i: usize| (city.checkpoints[i].lon, city.checkpoints[i].lat);
        let distances = match n <= DISTANCE_TABLE_MAX {
            true => (0..n * n).map(|i| haversine_m(point(i / n), point(i % n))).collect(),
            false => Vec::new(),
        };
        Judge { city: city.clone(), rule, distances, skews: vec![0; n], largest_skew: 0 }
    }

    fn distance_m(&self, a: u32, b: u32) -> f64 {
        let n = self.skews.len();
        match self.distances.get(a as usize * n + b as usize) {
            Some(d) => *d,
            None => {
                let (ca, cb) = (&self.city.checkpoints[a as usize], &self.city.checkpoints[b as usize]);
                haversine_m((ca.lon, ca.lat), (cb.lon, cb.lat))
            }
        }
    }

    /// The pass's time with its camera's known clock skew taken off.
    fn true_ts(&self, (ts, cp): (i64, u32)) -> i64 {
        ts - self.skew(cp)
    }

    fn skew(&self, checkpoint: u32) -> i64 {
        self.skews[checkpoint as usize]
    }

    /// Takes in the skews known now.
    fn set_skews(&mut self, known: &BTreeMap<u32, i64>) {
        self.skews.iter_mut().for_each(|s| *s = 0);
        for (cp, skew) in known {
            if let Some(s) = self.skews.get_mut(*cp as usize) {
                *s = *skew;
            }
        }
        self.largest_skew = self.skews.iter().map(|s| s.abs()).max().unwrap_or(0);
    }

    /// Whether two passes of one vehicle conflict, on skew-corrected times.
    fn conflicting(&self, a: (i64, u32), b: (i64, u32)) -> bool {
        self.rule.conflicts(self.distance_m(a.1, b.1), self.true_ts(a) - self.true_ts(b))
    }

    fn alert(&self, vehicle: &VehicleKey, a: &Seen, b: &Seen) -> AlertRow {
        let (first, later) = if (a.ts, a.pass_id.as_bytes()) <= (b.ts, b.pass_id.as_bytes()) { (a, b) } else { (b, a) };
        let distance = self.distance_m(a.cp, b.cp);
        let dt = self.true_ts((later.ts, later.cp)) - self.true_ts((first.ts, first.cp));
        let corrections: BTreeMap<&str, f64> = [a, b]
            .iter()
            .filter(|s| self.skew(s.cp) != 0)
            .map(|s| (&*self.city.checkpoints[s.cp as usize].id, self.skew(s.cp) as f64 / 1000.0))
            .collect();
        let describe = |s: &Seen| {
            serde_json::json!({
                "pass_id": &*s.pass_id,
                "checkpoint_id": &*self.city.checkpoints[s.cp as usize].id,
                "ts": s.ts,
                "plate_type": &*s.plate_type,
                "vehicle_type": s.vehicle_type.as_deref(),
            })
        };
        let details = serde_json::json!({
            "passes": [describe(first), describe(later)],
            "distance_m": (distance * 10.0).round() / 10.0,
            "dt_s": dt as f64 / 1000.0,
            "implied_speed_kmh": (self.rule.implied_kmh(distance, dt) * 100.0).round() / 100.0,
            "max_speed_kmh": self.rule.max_speed_kmh,
            "clock_tolerance_s": self.rule.clock_tolerance_s,
            "attributes_differ": first.plate_type != later.plate_type || first.vehicle_type != later.vehicle_type,
            "clock_skew_corrections_s": corrections,
        });
        AlertRow {
            alert_id: pair_id(&a.pass_id, &b.pass_id),
            kind: CLONED_PLATE,
            ts: later.ts,
            plate: Some(vehicle.plate.as_str().into()),
            plate_color: Some(vehicle.color.code()),
            checkpoint_id: Some(self.city.checkpoints[later.cp as usize].id.clone()),
            segment_id: None,
            severity: "high",
            details: details.to_string(),
            status: "active",
            revision: 0,
        }
    }
}

pub struct ClonedPlates {
    judge: Judge,
    skews: Arc<ClockSkews>,
    /// The skews' generation last read (skews are read once per change, not per pass).
    judged_generation: u64,
    /// New skews were read: raised alerts are judged again at the next watermark.
    rejudge: bool,
    raised: BTreeMap<String, Raised>,
    /// Passes further apart in time than this never conflict.
    span_ms: i64,
    /// A vehicle's passes within the span behind the horizon: a few, held in the table's entry.
    seen: VehicleTable<SmallVec<[Mark; 4]>>,
    slab: Slab,
    /// The partners of the pass being judged (kept to reuse its allocation).
    partners: Vec<Seen>,
    sweeps: Every,
    /// The length of the last snapshot (see [`StateBlob::encode`]).
    snapshot_len: AtomicUsize,
}

impl ClonedPlates {
    pub fn new(city: &Arc<City>, rule: ClonedPlateRule, skews: Arc<ClockSkews>) -> ClonedPlates {
        let judge = Judge::new(city, rule);
        let n = city.checkpoints.len() as u32;
        let longest = (0..n).flat_map(|a| (a + 1..n).map(move |b| (a, b))).map(|(a, b)| judge.distance_m(a, b));
        let span_s = (longest.fold(0.0f64, f64::max) / (rule.max_speed_kmh / 3.6) - rule.clock_tolerance_s).max(0.0);
        ClonedPlates {
            judge,
            span_ms: (span_s * 1000.0).ceil() as i64 + 1,
            skews,
            judged_generation: 0,
            rejudge: false,
            raised: BTreeMap::new(),
            seen: VehicleTable::default(),
            slab: Slab::default(),
            partners: Vec::new(),
            sweeps: Every::new(SWEEP_EVERY_MS),
            snapshot_len: AtomicUsize::new(0),
        }
    }

    /// How far back a pass that is on time may find a partner: as far as a pass is read back
    /// (the span, widened by the camera clock skews known), so that whether a partner is still
    /// held never depends on when lists were last trimmed.
    fn span(&self) -> i64 {
        self.span_ms + 2 * self.judge.largest_skew
    }

    fn horizon(&self, watermark: i64, lateness_ms: i64) -> i64 {
        watermark.saturating_sub(lateness_ms).saturating_sub(self.span())
    }

    /// Takes in skews found since the last look (and marks the raised alerts for judging).
    fn refresh_skews(&mut self) {
        let generation = self.skews.generation();
        if generation == self.judged_generation {
            return;
        }
        self.judged_generation = generation;
        self.judge.set_skews(&self.skews.all());
        self.rejudge = true;
    }
}

/// The id of the alert for a pair of passes: a hash of both ids in byte order.
pub fn pair_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a.as_bytes() <= b.as_bytes() { (a, b) } else { (b, a) };
    crate::model::stable_id(CLONED_PLATE, &[lo.as_bytes(), hi.as_bytes()])
}

impl Operator for ClonedPlates {
    fn name(&self) -> &'static str {
        CLONED_PLATE
    }

    /// Device health finds the clock skews this operator corrects by: they run in turn.
    fn thread_group(&self) -> &'static str {
        super::device_health::SKEW_GROUP
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        self.refresh_skews();
        let horizon = self.horizon(ctx.watermark, ctx.allowed_lateness_ms);
        // Skew corrections can bring passes further apart on their cameras' clocks together.
        let span = self.span();
        let mut partners = std::mem::take(&mut self.partners);
        let (mut taken, mut vehicles) = (Vec::with_capacity(passes.len()), Vec::with_capacity(passes.len()));
        for (i, pass) in passes.iter().enumerate() {
            let Some(vehicle) = pass.vehicle_ref() else { continue };
            // The partners of a pass this late may already be forgotten.
            if is_late(pass.ts.ms(), ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.push((i, LATE_LABEL));
                continue;
            }
            taken.push(i);
            vehicles.push(vehicle);
        }
        let places = self.seen.resolve(&vehicles, SmallVec::new);
        for (j, (&i, &place)) in taken.iter().zip(&places).enumerate() {
            // A list is searched from its middle and cut at its start: both its ends are asked for.
            self.seen.prefetch_ahead_with(&places, j, |list| list.first());
            self.seen.prefetch_ahead_with(&places, j, |list| list.last());
            let pass = &passes[i];
            let x = Seen::of(pass);
            // One look-up of the vehicle's passes: judged against, then joined.
            let list = self.seen.value_mut(place);
            let from = list.partition_point(|m| m.ts <= x.ts - span);
            for m in list[from..].iter().take_while(|m| m.ts < x.ts + span) {
                if self.judge.conflicting((x.ts, x.cp), (m.ts, m.cp)) {
                    // The same pass again has the same time (a resend with another is refused).
                    let y = self.slab.get(m);
                    if y.ts != x.ts || y.pass_id != x.pass_id {
                        partners.push(y.clone());
                    }
                }
            }
            let old = list.partition_point(|m| m.ts < horizon);
            list.drain(..old);
            let at = list.partition_point(|m| m.ts <= x.ts);
            if partners.is_empty() {
                list.insert(at, self.slab.put(x));
                continue;
            }
            list.insert(at, self.slab.put(x.clone()));
            let vehicle = self.seen.key(place);
            for y in partners.drain(..) {
                let mut alert = self.judge.alert(vehicle, &x, &y);
                // Found again (the input replayed after a restart): the same alert, or raised
                // again above the revision that retracted it.
                alert.revision = match self.raised.get(&alert.alert_id) {
                    Some(r) if r.active => r.revision,
                    Some(r) => r.revision + 1,
                    None => 0,
                };
                let raised = Raised {
                    plate: vehicle.plate.as_str().to_owned(),
                    color: vehicle.color.code(),
                    a: x.clone(),
                    b: y,
                    active: true,
                    revision: alert.revision,
                };
                self.raised.insert(alert.alert_id.clone(), raised);
                ctx.out.alerts.push(alert);
            }
        }
        self.partners = partners;
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        // A camera found skewed since: alerts that only its clock made are taken back.
        self.refresh_skews();
        if std::mem::take(&mut self.rejudge) {
            let gone: Vec<String> = self
                .raised
                .iter()
                .filter(|(_, r)| r.active && !self.judge.conflicting((r.a.ts, r.a.cp), (r.b.ts, r.b.cp)))
                .map(|(id, _)| id.clone())
                .collect();
            for id in gone {
                let r = self.raised.get_mut(&id).expect("listed above");
                r.active = false;
                r.revision += 1;
                let r = r.clone();
                let Some(vehicle) = VehicleKey::from_stored(&r.plate, r.color) else { continue };
                let mut alert = self.judge.alert(&vehicle, &r.a, &r.b);
                alert.status = "retracted";
                alert.revision = r.revision;
                ctx.out.alerts.push(alert);
            }
        }
        // Raised alerts are kept a day, for cameras found skewed hours later.
        let keep = ctx.watermark.saturating_sub(ctx.allowed_lateness_ms).saturating_sub(DAY_MS);
        self.raised.retain(|_, r| r.a.ts.max(r.b.ts) >= keep);
        let horizon = self.horizon(ctx.watermark, ctx.allowed_lateness_ms);
        if self.sweeps.due(horizon) {
            self.seen.retain(|_, list| {
                let old = list.partition_point(|m| m.ts < horizon);
                list.drain(..old);
                !list.is_empty()
            });
            self.slab.sweep(horizon);
        }
    }

    /// Cloned-plate alerts raised or retracted after the restored checkpoint are taken in and
    /// judged again on the skews known: one a skew explains is retracted, and one the replay
    /// finds again keeps (or outranks) its stored revision.
    fn adopt_alerts(&mut self, alerts: &[AlertRow]) {
        for alert in alerts.iter().filter(|a| a.kind == CLONED_PLATE) {
            if self.raised.get(&alert.alert_id).is_some_and(|r| r.revision >= alert.revision) {
                continue;
            }
            let (Some(plate), Some(color)) = (alert.plate.as_deref(), alert.plate_color) else { continue };
            let Ok(details) = serde_json::from_str::<serde_json::Value>(&alert.details) else { continue };
            let passes = (
                Seen::described(&self.judge.city, &details["passes"][0]),
                Seen::described(&self.judge.city, &details["passes"][1]),
            );
            let (Some(a), Some(b)) = passes else { continue };
            let (active, revision) = (alert.status == "active", alert.revision);
            self.raised
                .insert(alert.alert_id.clone(), Raised { plate: plate.to_owned(), color, a, b, active, revision });
            self.rejudge = true;
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let lists = self.seen.iter().map(|(v, list)| (v.plate.as_str(), v.color.code(), StoredList(list, &self.slab)));
        let seen = SeqOf::new(lists);
        StateBlob::encode(STATE_VERSION, &(seen, &self.raised), &self.snapshot_len)
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        let (stored, raised): (Vec<(String, u8, Vec<Seen>)>, BTreeMap<String, Raised>) =
            blob.decode(self.name(), STATE_VERSION, JSON_STATE_VERSION)?;
        let n = self.judge.city.checkpoints.len();
        anyhow::ensure!(
            stored.iter().flat_map(|s| &s.2).all(|p| (p.cp as usize) < n),
            "cloned_plate state names a checkpoint this city does not have"
        );
        self.seen.clear();
        self.slab = Slab::default();
        self.raised = raised;
        for (plate, color, mut list) in stored {
            if let Some(vehicle) = VehicleKey::from_stored(&plate, color) {
                // Lists are trimmed from the front: they must be in time order.
                list.sort_by_key(|s| s.ts);
                let marks = list.into_iter().map(|s| self.slab.put(s)).collect();
                self.seen.insert(vehicle, marks);
            }
        }
        Ok(())
    }
}

/// The batch computation: every conflicting pair as (plate, colour, [id, id] in byte order).
pub fn batch_cloned_plates(
    city: &City,
    passes: &[Pass],
    rule: ClonedPlateRule,
) -> BTreeMap<String, (String, u8, [String; 2])> {
    let mut by_vehicle: FxHashMap<VehicleKey, Vec<&Pass>> = FxHashMap::default();
    for p in passes {
        if let Some(v) = p.vehicle() {
            by_vehicle.entry(v).or_default().push(p);
        }
    }
    let mut out = BTreeMap::new();
    for (v, list) in by_vehicle {
        for (i, a) in list.iter().enumerate() {
            for b in &list[i + 1..] {
                let (ca, cb) = (city.checkpoint(a.checkpoint), city.checkpoint(b.checkpoint));
                if rule.conflicts(haversine_m((ca.lon, ca.lat), (cb.lon, cb.lat)), a.ts.ms() - b.ts.ms()) {
                    let mut ids = [a.pass_id.to_string(), b.pass_id.to_string()];
                    ids.sort();
                    out.insert(pair_id(&ids[0], &ids[1]), (v.plate.as_str().to_owned(), v.color.code(), ids));
                }
            }
        }
    }
    out
}

#[cfg(test)]
#[path = "cloned_plates_tests.rs"]
mod tests;
