//! The city simulator: a realistic day of checkpoint passes with the field's dirt and planted
//! anomalies, all labelled.
//!
//! - `city_gen.rs`: the sample grid city (roads of three classes, boundary checkpoints, districts).
//! - `fleet.rs`: vehicles with unique plates of many origins.
//! - `roads.rs`: routes and travel times under peak-hour congestion.
//! - `traffic.rs`: each vehicle's day, and the planted anomalies.
//! - `dirt.rs`: delays, resends, unreadable plates, an outage, a skewed clock, bad records.
//! - `labels.rs`: the ground truth written beside the passes.
//! - `output.rs`: writing a city folder and a day; `live.rs`: the simulator as a live source.

mod city_gen;
mod dirt;
mod fleet;
mod labels;
mod live;
mod output;
mod roads;
mod traffic;

pub use dirt::Emission;
pub use labels::*;
pub use live::{LiveSimulator, SimPosition};
pub use output::{write_city, write_day};

use crate::model::{PassRecord, PlateRead, DAY_MS};
use crate::reference::{haversine_m, City, RestrictedVehicle, RestrictionRules};
use chrono::{NaiveDate, TimeZone};
use chrono_tz::Tz;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rustc_hash::{FxHashMap, FxHashSet};
use std::path::Path;

/// The restriction rules of the sample city.
pub const SAMPLE_RESTRICTIONS: &str = include_str!("sample_restrictions.toml");

/// What to simulate.
#[derive(Clone, Debug)]
pub struct SimParams {
    pub day: NaiveDate,
    pub vehicles: u32,
    pub seed: u64,
    pub time_zone: Tz,
    pub local_prefixes: Vec<String>,
}

/// A simulated day: the records in arrival order, and the truth about them.
pub struct SimDay {
    pub emissions: Vec<Emission>,
    pub labels: Labels,
}

/// The sample city that ships in `config/city`.
pub fn sample_city() -> City {
    // The sample rules are a constant checked by the tests; they always parse.
    let rules: RestrictionRules = toml::from_str(SAMPLE_RESTRICTIONS).expect("sample restrictions parse");
    city_gen::grid_city(Some(rules))
}

/// The first instant of `day` in `tz`, epoch milliseconds: local midnight, or, where a clock
/// change skips midnight, the first local time that exists.
pub fn day_start_ms(day: NaiveDate, tz: Tz) -> i64 {
    (0..24 * 60)
        .filter_map(|minute| day.and_hms_opt(minute / 60, minute % 60, 0))
        .find_map(|t| tz.from_local_datetime(&t).earliest())
        .map_or_else(
            || day.and_hms_opt(0, 0, 0).map_or(0, |t| t.and_utc().timestamp_millis()),
            |t| t.timestamp_millis(),
        )
}

/// Simulates one day of traffic on `city`.
pub fn simulate_day(city: &City, params: &SimParams) -> SimDay {
    let day_start = day_start_ms(params.day, params.time_zone);
    let day_seed = params.seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ (day_start / DAY_MS) as u64;
    let traffic = traffic::simulate_traffic(
        city,
        params.day,
        day_start,
        params.vehicles,
        &params.local_prefixes,
        ChaCha8Rng::seed_from_u64(day_seed),
    );
    let inner: Vec<_> = (0..city.checkpoints.len() as u32)
        .map(crate::model::CheckpointIdx)
        .filter(|c| !city.checkpoint(*c).boundary)
        .collect();
    let ranked = traffic::rank_central(city, &inner);
    let mut labels = Labels {
        seed: params.seed,
        day: params.day.to_string(),
        time_zone: params.time_zone.name().into(),
        vehicles: traffic.vehicles.len() as u64,
        ..Labels::default()
    };
    let mut spoiler = dirt::Spoiler {
        city,
        vehicles: &traffic.vehicles,
        protected: traffic.plants.protected.iter().copied().collect(),
        faults: dirt::Faults::choose(city, &ranked, day_start),
        day_tag: params.day.format("%Y%m%d").to_string(),
        rng: ChaCha8Rng::seed_from_u64(day_seed ^ 0xD1B5),
    };
    let (mut emissions, records) = spoiler.spoil(&traffic.passes, &mut labels);
    if let Some(template) = records.first() {
        let n = (records.len() / 5000).max(5);
        emissions.extend(spoiler.garbage(n, day_start, &mut labels, template));
    }
    emissions.sort_by_key(|e| e.arrival);
    labels.records = emissions.len() as u64;
    label_anomalies(city, params, &traffic, &records, &mut labels);
    SimDay { emissions, labels }
}

fn label_anomalies(
    city: &City,
    params: &SimParams,
    traffic: &traffic::Traffic,
    records: &[PassRecord],
    labels: &mut Labels,
) {
    let plants = &traffic.plants;
    let cp_id = |c: crate::model::CheckpointIdx| city.checkpoint(c).id.to_string();
    let vehicle_label = |v: usize| VehicleLabel {
        plate: traffic.vehicles[v].plate.clone(),
        plate_color: traffic.vehicles[v].color.code(),
    };
    let flagged = implausible_pairs(city, records);
    let clone_keys: FxHashSet<VehicleLabel> = plants.clones.iter().map(|(o, _)| vehicle_label(*o)).collect();
    for key in &clone_keys {
        let pairs = flagged.get(key).cloned().unwrap_or_default();
        labels.cloned_plates.push(CloneLabel {
            plate: key.plate.clone(),
            plate_color: key.plate_color,
            conflicting_pairs: pairs,
        });
    }
    labels.cloned_plates.sort_by(|a, b| a.plate.cmp(&b.plate));
    if let Some(skew) = labels.clock_skew.as_mut() {
        let mut affected: Vec<VehicleLabel> = flagged.keys().filter(|k| !clone_keys.contains(*k)).cloned().collect();
        affected.sort();
        skew.affected_vehicles = affected;
    }
    if let Some((cp, from, to, n)) = plants.surge {
        labels.traffic_surge =
            Some(SurgeLabel { checkpoint_id: cp_id(cp), from_ts: from, to_ts: to, extra_vehicles: n });
    }
    if let Some(i) = &plants.incident {
        labels.congestion_incident = Some(IncidentLabel {
            segment_id: city.segments[i.segment].id.to_string(),
            from_ts: i.from_ms,
            to_ts: i.to_ms,
            slowdown: i.slowdown,
        });
    }
    for &(v, cp) in &plants.shuttles {
        let key = vehicle_label(v);
        let passes = records
            .iter()
            .filter(|r| {
                r.plate.as_str() == key.plate
                    && r.plate_color.code() == key.plate_color
                    && *r.checkpoint == *city.checkpoint(cp).id
            })
            .count() as u64;
        labels.high_frequency.push(HighFrequencyLabel {
            plate: key.plate,
            plate_color: key.plate_color,
            checkpoint_id: cp_id(cp),
            passes,
        });
    }
    label_violators(city, params, traffic, records, labels);
}

fn label_violators(
    city: &City,
    params: &SimParams,
    traffic: &traffic::Traffic,
    records: &[PassRecord],
    labels: &mut Labels,
) {
    let Some(rules) = &city.restrictions else { return };
    let day_start = day_start_ms(params.day, params.time_zone);
    for &(v, rule_idx) in &traffic.plants.violators {
        let vehicle = &traffic.vehicles[v];
        let rule = &rules.rules[rule_idx];
        let PlateRead::Readable(plate) = PlateRead::parse(&vehicle.plate) else { continue };
        let rv = RestrictedVehicle {
            plate: &plate,
            color: vehicle.color,
            plate_type: vehicle.plate_type,
            local: vehicle.local,
        };
        if !rule.restricts(rules, params.day, &rv) {
            continue;
        }
        let pass_ids: Vec<String> = records
            .iter()
            .filter(|r| r.plate.as_str() == vehicle.plate && r.plate_color == vehicle.color)
            .filter(|r| city.checkpoint_idx(&r.checkpoint).is_some_and(|c| rule.covers(city.checkpoint(c))))
            .filter(|r| rule.in_hours((r.ts.ms() - day_start) as f64 / 3_600_000.0))
            .map(|r| r.pass_id.to_string())
            .collect();
        if !pass_ids.is_empty() {
            labels.restriction_violators.push(ViolatorLabel {
                plate: vehicle.plate.clone(),
                plate_color: vehicle.color.code(),
                rule_id: rule.id.clone(),
                pass_ids,
            });
        }
    }
}

/// Every pair of passes of one vehicle that the cloned-plate rule (defaults: ≥ 2 km apart,
/// implied speed over 180 km/h with 30 s clock tolerance) flags, by vehicle.
pub fn implausible_pairs(city: &City, records: &[PassRecord]) -> FxHashMap<VehicleLabel, Vec<[String; 2]>> {
    let mut by_vehicle: FxHashMap<VehicleLabel, Vec<&PassRecord>> = FxHashMap::default();
    for r in records {
        if let PlateRead::Readable(p) = &r.plate {
            by_vehicle
                .entry(VehicleLabel { plate: p.as_str().into(), plate_color: r.plate_color.code() })
                .or_default()
                .push(r);
        }
    }
    let position = |r: &PassRecord| city.checkpoint_idx(&r.checkpoint).map(|c| city.checkpoint(c).position());
    let mut out = FxHashMap::default();
    for (key, passes) in by_vehicle {
        let mut pairs = Vec::new();
        for (i, a) in passes.iter().enumerate() {
            for b in &passes[i + 1..] {
                let (Some(pa), Some(pb)) = (position(a), position(b)) else { continue };
                let d = haversine_m(pa, pb);
                let dt_s = (a.ts.ms() - b.ts.ms()).abs() as f64 / 1000.0;
                if d >= 2_000.0 && d / (dt_s + 30.0) > 50.0 {
                    let mut ids = [a.pass_id.to_string(), b.pass_id.to_string()];
                    ids.sort();
                    pairs.push(ids);
                }
            }
        }
        if !pairs.is_empty() {
            pairs.sort();
            out.insert(key, pairs);
        }
    }
    out
}

/// Writes a simulated day's city folder, passes and labels into `dir`.
pub fn simulate_to(dir: &Path, city: &City, params: &SimParams) -> anyhow::Result<Labels> {
    let day = simulate_day(city, params);
    write_city(city, dir)?;
    write_day(&day, &dir.join("passes.jsonl"), &dir.join("labels.json"))?;
    Ok(day.labels)
}

#[cfg(test)]
#[path = "tests.rs"]
mod tests;

#[cfg(test)]
mod day_tests {
    use super::*;

    #[test]
    fn a_day_whose_midnight_is_skipped_starts_at_its_first_real_minute() {
        // Santiago moved its clocks from 00:00 to 01:00 on 2022-09-11.
        let tz: Tz = "America/Santiago".parse().unwrap();
        let day = NaiveDate::from_ymd_opt(2022, 9, 11).unwrap();
        let start = day_start_ms(day, tz);
        assert_eq!(crate::model::EventTime(start).local_date(tz), day);
        assert!(start > day_start_ms(day.pred_opt().unwrap(), tz));
        assert_eq!(
            day_start_ms(NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(), chrono_tz::Asia::Shanghai),
            1_772_380_800_000
        );
    }
}
