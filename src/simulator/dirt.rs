//! The field's dirt: network delays and out-of-order delivery, resends (identical and
//! corrected), unreadable plates, a device outage delivered hours late, a camera with a skewed
//! clock, and a few records that no reader can accept. Every bit of it is counted in the labels.

use super::fleet::{misread, Vehicle};
use super::labels::{ClockSkewLabel, Labels, OutageLabel};
use super::roads::TruePass;
use crate::model::{CheckpointIdx, EventTime, PassRecord, PlateColor, PlateRead, Text};
use crate::reference::{City, RoadClass};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashSet;

const SECOND: i64 = 1_000;
const MIN: i64 = 60_000;
const HOUR: i64 = 3_600_000;
/// Delays beyond this are labelled as beyond the default out-of-orderness.
const OUT_OF_ORDERNESS_MS: i64 = 10_000;

/// One line of the pass file and when it reaches passflow.
#[derive(Clone, Debug, PartialEq)]
pub struct Emission {
    pub arrival: i64,
    pub line: String,
}

/// Where the outage and the skewed clock are.
pub struct Faults {
    pub outage: CheckpointIdx,
    pub outage_from: i64,
    pub outage_to: i64,
    pub delivered_from: i64,
    pub skewed: CheckpointIdx,
    pub skew_ms: i64,
}

impl Faults {
    /// Outage 10:00–12:00 delivered from 14:00 at a busy checkpoint; a +90 s clock on a
    /// secondary-road camera.
    pub fn choose(city: &City, ranked: &[CheckpointIdx], day_start: i64) -> Faults {
        let outage = ranked[1.min(ranked.len() - 1)];
        let skewed = ranked
            .iter()
            .rev()
            .copied()
            .find(|c| city.checkpoint(*c).road_class == RoadClass::Secondary)
            .unwrap_or(ranked[ranked.len() - 1]);
        Faults {
            outage,
            outage_from: day_start + 10 * HOUR,
            outage_to: day_start + 12 * HOUR,
            delivered_from: day_start + 14 * HOUR,
            skewed,
            skew_ms: 90 * SECOND,
        }
    }
}

pub struct Spoiler<'a> {
    pub city: &'a City,
    pub vehicles: &'a [Vehicle],
    pub protected: FxHashSet<usize>,
    pub faults: Faults,
    pub day_tag: String,
    pub rng: ChaCha8Rng,
}

impl Spoiler<'_> {
    /// The emitted records of every true pass, with the ids they were given (`None` for a pass
    /// whose emission is not a valid readable pass of its vehicle).
    pub fn spoil(&mut self, passes: &[TruePass], labels: &mut Labels) -> (Vec<Emission>, Vec<PassRecord>) {
        let mut out = Vec::with_capacity(passes.len() * 102 / 100);
        let mut records = Vec::with_capacity(passes.len());
        let mut outage = OutageLabel {
            checkpoint_id: self.cp_id(self.faults.outage),
            from_ts: self.faults.outage_from,
            to_ts: self.faults.outage_to,
            delivered_from_ts: self.faults.delivered_from,
            passes: 0,
        };
        let mut skewed = 0;
        for (i, p) in passes.iter().enumerate() {
            let record = self.record(i, p);
            labels.unreadable_plates += u64::from(record.plate == PlateRead::Unreadable);
            let in_outage =
                p.checkpoint == self.faults.outage && (self.faults.outage_from..self.faults.outage_to).contains(&p.ts);
            let arrival = if in_outage {
                outage.passes += 1;
                self.faults.delivered_from + self.rng.gen_range(0..10 * MIN)
            } else {
                p.ts + self.network_delay()
            };
            labels.delayed_beyond_out_of_orderness +=
                u64::from(!in_outage && arrival - record.ts.ms() > OUT_OF_ORDERNESS_MS);
            skewed += u64::from(p.checkpoint == self.faults.skewed);
            let line = record.to_canonical_json();
            if self.rng.gen_bool(0.01) {
                labels.identical_duplicates += 1;
                out.push(Emission { arrival: arrival + self.rng.gen_range(SECOND..15 * MIN), line: line.clone() });
            } else if record.plate != PlateRead::Unreadable && self.rng.gen_bool(0.0005) {
                labels.conflicting_duplicates += 1;
                let mut corrected = record.clone();
                corrected.plate = PlateRead::parse(&misread(record.plate.as_str(), &mut self.rng));
                out.push(Emission {
                    arrival: arrival + self.rng.gen_range(5 * SECOND..5 * MIN),
                    line: corrected.to_canonical_json(),
                });
            }
            out.push(Emission { arrival, line });
            records.push(record);
        }
        labels.valid_passes = passes.len() as u64;
        labels.outage = Some(outage);
        labels.clock_skew = Some(ClockSkewLabel {
            checkpoint_id: self.cp_id(self.faults.skewed),
            skew_ms: self.faults.skew_ms,
            passes: skewed,
            affected_vehicles: Vec::new(),
        });
        if labels.conflicting_duplicates > 0 {
            labels.dead_letters.insert("conflicting_duplicate".into(), labels.conflicting_duplicates);
        }
        (out, records)
    }

    fn cp_id(&self, c: CheckpointIdx) -> String {
        self.city.checkpoint(c).id.to_string()
    }

    /// Usually a fraction of a second to a few seconds; 2 % of passes are held up for 10 s to
    /// 2 min (out of order beyond the default bound).
    fn network_delay(&mut self) -> i64 {
        if self.rng.gen_bool(0.02) {
            return self.rng.gen_range(OUT_OF_ORDERNESS_MS + SECOND..2 * MIN);
        }
        let u: f64 = self.rng.gen_range(f64::EPSILON..1.0);
        300 + (-u.ln() * 1_500.0).min(8_000.0) as i64
    }

    fn record(&mut self, i: usize, p: &TruePass) -> PassRecord {
        let v = &self.vehicles[p.vehicle];
        let cp = self.city.checkpoint(p.checkpoint);
        let unreadable = !self.protected.contains(&p.vehicle) && self.rng.gen_bool(0.015);
        let plate = if unreadable {
            PlateRead::parse(["-", "-", "-", "", "无牌", "未识别"][self.rng.gen_range(0..6)])
        } else {
            PlateRead::parse(&v.plate)
        };
        let has_radar = (p.checkpoint.0 % 10) < 7;
        let lanes: u8 = match cp.road_class {
            RoadClass::Expressway => 4,
            RoadClass::Arterial => 3,
            RoadClass::Secondary => 2,
        };
        let lane = match cp.bus_lanes.first() {
            Some(bus) if v.bus => *bus,
            _ => self.rng.gen_range(1..=lanes.saturating_sub(cp.bus_lanes.len() as u8).max(1)),
        };
        let ts = p.ts + if p.checkpoint == self.faults.skewed { self.faults.skew_ms } else { 0 };
        PassRecord {
            pass_id: format!("{}{:09}", self.day_tag, i).into(),
            plate,
            plate_color: if unreadable { PlateColor::Other } else { v.color },
            plate_type: v.plate_type.into(),
            checkpoint: Text::new(&cp.id),
            device_id: Some(format!("{}-{}", cp.id, p.direction.code()).into()),
            direction: p.direction,
            lane,
            ts: EventTime(ts),
            speed_kmh: has_radar
                .then(|| ((p.speed_kmh * self.rng.gen_range(0.95..1.05)) * 10.0).round() as f32 / 10.0)
                .filter(|s| *s > 0.0),
            vehicle_type: Some(v.vehicle_type.into()),
        }
    }

    /// Records no reader can accept, one of each kind in turn, `n` in all.
    pub fn garbage(&mut self, n: usize, day_start: i64, labels: &mut Labels, template: &PassRecord) -> Vec<Emission> {
        (0..n)
            .map(|i| {
                let arrival = day_start + self.rng.gen_range(0..24 * HOUR);
                let mut json: serde_json::Value =
                    serde_json::from_str(&template.to_canonical_json()).expect("canonical json parses");
                json["pass_id"] = format!("X{}{:06}", self.day_tag, i).into();
                json["ts"] = arrival.into();
                let (reason, line) = match i % 5 {
                    0 => ("malformed_json", json.to_string()[..40].to_string()),
                    1 => {
                        json["checkpoint_id"] = "KK-UNKNOWN".into();
                        ("unknown_checkpoint", json.to_string())
                    }
                    2 => {
                        json["direction"] = 0.into();
                        ("bad_direction", json.to_string())
                    }
                    3 => {
                        json["ts"] = "2026-13-45 99:00:00".into();
                        ("bad_timestamp", json.to_string())
                    }
                    _ => {
                        json.as_object_mut().expect("object").remove("plate");
                        ("missing_field:plate", json.to_string())
                    }
                };
                *labels.dead_letters.entry(reason.into()).or_default() += 1;
                Emission { arrival, line }
            })
            .collect()
    }
}
