//! Cloned-plate alerts (套牌车): every pair of passes of one vehicle at checkpoints at least
//! 2 km apart whose implied speed, distance / (|Δt| + clock tolerance), is strictly above the
//! maximum plausible speed (180 km/h). One alert per pair, its id a hash of the two pass ids in
//! byte order, its time and checkpoint the later pass's. A pair is found when its second pass
//! arrives, whichever that is, so arrival order does not matter.
//!
//! Only passes close enough in time can conflict: |Δt| < longest distance in the city / speed
//! − tolerance. Each vehicle keeps its passes of that span behind the lateness horizon.

use crate::core::window::is_late;
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::{Pass, PlateColor, PlateRead, VehicleKey};
use crate::reference::{haversine_m, City};
use crate::results::AlertRow;
use rustc_hash::FxHashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const CLONED_PLATE: &str = "cloned_plate";
const LATE_LABEL: &str = "cloned_plate";
const STATE_VERSION: u32 = 1;
const SWEEP_EVERY_MS: i64 = 10 * 60_000;

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
    pass_id: Arc<str>,
    cp: u32,
    plate_type: Arc<str>,
    vehicle_type: Option<Arc<str>>,
}

impl Seen {
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

pub struct ClonedPlates {
    city: Arc<City>,
    rule: ClonedPlateRule,
    /// Passes further apart in time than this never conflict.
    span_ms: i64,
    seen: FxHashMap<VehicleKey, Vec<Seen>>,
    swept_at: i64,
}

impl ClonedPlates {
    pub fn new(city: &Arc<City>, rule: ClonedPlateRule) -> ClonedPlates {
        let points: Vec<(f64, f64)> = city.checkpoints.iter().map(|c| (c.lon, c.lat)).collect();
        let longest = points
            .iter()
            .enumerate()
            .flat_map(|(i, a)| points[i + 1..].iter().map(move |b| haversine_m(*a, *b)))
            .fold(0.0f64, f64::max);
        let span_s = (longest / (rule.max_speed_kmh / 3.6) - rule.clock_tolerance_s).max(0.0);
        ClonedPlates {
            city: city.clone(),
            rule,
            span_ms: (span_s * 1000.0).ceil() as i64 + 1,
            seen: FxHashMap::default(),
            swept_at: i64::MIN,
        }
    }

    fn horizon(&self, watermark: i64, lateness_ms: i64) -> i64 {
        watermark.saturating_sub(lateness_ms).saturating_sub(self.span_ms)
    }

    fn alert(&self, vehicle: &VehicleKey, a: &Seen, b: &Seen) -> AlertRow {
        let (first, later) = if (a.ts, a.pass_id.as_bytes()) <= (b.ts, b.pass_id.as_bytes()) { (a, b) } else { (b, a) };
        let (ca, cb) = (&self.city.checkpoints[a.cp as usize], &self.city.checkpoints[b.cp as usize]);
        let distance = haversine_m((ca.lon, ca.lat), (cb.lon, cb.lat));
        let dt = later.ts - first.ts;
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

/// The id of the alert for a pair of passes: a hash of both ids in byte order.
pub fn pair_id(a: &str, b: &str) -> String {
    let (lo, hi) = if a.as_bytes() <= b.as_bytes() { (a, b) } else { (b, a) };
    crate::model::stable_id(CLONED_PLATE, &[lo.as_bytes(), hi.as_bytes()])
}

impl Operator for ClonedPlates {
    fn name(&self) -> &'static str {
        CLONED_PLATE
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let horizon = self.horizon(ctx.watermark, ctx.allowed_lateness_ms);
        for (i, pass) in passes.iter().enumerate() {
            let Some(vehicle) = pass.vehicle() else { continue };
            // The partners of a pass this late may already be forgotten.
            if is_late(pass.ts.ms(), ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.push((i, LATE_LABEL));
                continue;
            }
            let x = Seen::of(pass);
            let mut found = Vec::new();
            if let Some(list) = self.seen.get(&vehicle) {
                let from = list.partition_point(|s| s.ts <= x.ts - self.span_ms);
                for y in list[from..].iter().take_while(|s| s.ts < x.ts + self.span_ms) {
                    if y.pass_id == x.pass_id {
                        continue;
                    }
                    let (a, b) = (&self.city.checkpoints[x.cp as usize], &self.city.checkpoints[y.cp as usize]);
                    if self.rule.conflicts(haversine_m((a.lon, a.lat), (b.lon, b.lat)), x.ts - y.ts) {
                        found.push(self.alert(&vehicle, &x, y));
                    }
                }
            }
            ctx.out.alerts.extend(found);
            let list = self.seen.entry(vehicle).or_default();
            let at = list.partition_point(|s| s.ts <= x.ts);
            list.insert(at, x);
            let old = list.partition_point(|s| s.ts < horizon);
            list.drain(..old);
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let horizon = self.horizon(ctx.watermark, ctx.allowed_lateness_ms);
        if horizon.saturating_sub(self.swept_at) >= SWEEP_EVERY_MS {
            self.seen.retain(|_, list| {
                let old = list.partition_point(|s| s.ts < horizon);
                list.drain(..old);
                !list.is_empty()
            });
            self.swept_at = horizon;
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let stored: Vec<(&str, u8, &Vec<Seen>)> =
            self.seen.iter().map(|(v, list)| (v.plate.as_str(), v.color.code(), list)).collect();
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&stored)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let stored: Vec<(String, u8, Vec<Seen>)> = serde_json::from_slice(&blob.bytes)?;
        let n = self.city.checkpoints.len();
        anyhow::ensure!(
            stored.iter().flat_map(|s| &s.2).all(|p| (p.cp as usize) < n),
            "cloned_plate state names a checkpoint this city does not have"
        );
        self.seen.clear();
        for (plate, color, list) in stored {
            if let (PlateRead::Readable(plate), Some(color)) = (PlateRead::parse(&plate), PlateColor::from_code(color))
            {
                self.seen.insert(VehicleKey::new(plate, color), list);
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
