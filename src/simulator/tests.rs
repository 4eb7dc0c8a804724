use super::*;
use crate::ingest::{Deduplicator, Ingest, Outcome, Validator};
use crate::model::{decode_record, PlateColorScheme};
use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};

const TZ: Tz = chrono_tz::Asia::Shanghai;
const HOUR: i64 = 3_600_000;

fn params(vehicles: u32, seed: u64) -> SimParams {
    SimParams {
        day: NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(),
        vehicles,
        seed,
        time_zone: TZ,
        local_prefixes: vec!["赣A".into(), "赣M".into()],
    }
}

struct Fixture {
    city: City,
    day: SimDay,
    /// Distinct records by pass id, first arrival wins, with their arrival time.
    records: Vec<(PassRecord, i64)>,
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let city = sample_city();
        let day = simulate_day(&city, &params(4_000, 7));
        let mut seen = FxHashSet::default();
        let records = day
            .emissions
            .iter()
            .filter_map(|e| decode_record(e.line.as_bytes(), TZ, PlateColorScheme::Police).ok().map(|r| (r, e.arrival)))
            .filter(|(r, _)| city.checkpoint_idx(&r.checkpoint).is_some())
            .filter(|(r, _)| seen.insert(r.pass_id.clone()))
            .collect();
        Fixture { city, day, records }
    })
}

fn start() -> i64 {
    day_start_ms(params(0, 0).day, TZ)
}

fn hourly_counts(f: &Fixture) -> Vec<usize> {
    let mut hours = vec![0; 24];
    for (r, _) in &f.records {
        let h = ((r.ts.ms() - start()) / HOUR).clamp(0, 23) as usize;
        hours[h] += 1;
    }
    hours
}

#[test]
fn the_same_seed_gives_the_same_day_and_another_seed_another() {
    let city = sample_city();
    let a = simulate_day(&city, &params(300, 3));
    let b = simulate_day(&city, &params(300, 3));
    let c = simulate_day(&city, &params(300, 4));
    assert_eq!(a.emissions, b.emissions);
    assert_eq!(a.labels, b.labels);
    assert_ne!(a.emissions, c.emissions);
}

#[test]
fn traffic_peaks_in_the_morning_and_evening() {
    let h = hourly_counts(fixture());
    let midday = (h[11] + h[12] + h[13]) as f64 / 3.0;
    assert!(h[8] as f64 > 1.5 * midday, "morning {} vs midday {midday}: {h:?}", h[8]);
    assert!(h[18] as f64 > 1.5 * midday, "evening {} vs midday {midday}: {h:?}", h[18]);
    assert!(((h[2] + h[3]) as f64) < 0.5 * midday, "night is quiet: {h:?}");
}

/// Speeds of each vehicle between consecutive passes at the two ends of a segment, by hour.
fn segment_speeds(f: &Fixture, skip: &FxHashSet<String>) -> Vec<(String, f64, i64)> {
    let mut by_vehicle: FxHashMap<(String, u8), Vec<&PassRecord>> = FxHashMap::default();
    for (r, _) in &f.records {
        if let PlateRead::Readable(p) = &r.plate {
            by_vehicle.entry((p.as_str().to_owned(), r.plate_color.code())).or_default().push(r);
        }
    }
    let mut out = Vec::new();
    for ((plate, _), mut passes) in by_vehicle {
        if skip.contains(&plate) {
            continue;
        }
        passes.sort_by_key(|r| (r.ts, r.pass_id.clone()));
        for w in passes.windows(2) {
            let (a, b) =
                (f.city.checkpoint_idx(&w[0].checkpoint).unwrap(), f.city.checkpoint_idx(&w[1].checkpoint).unwrap());
            if let Some(seg) = f.city.segments.iter().find(|s| s.from == a && s.to == b) {
                let dt = (w[1].ts.ms() - w[0].ts.ms()) as f64 / 1000.0;
                out.push((seg.id.to_string(), seg.length_m / dt * 3.6, w[1].ts.ms()));
            }
        }
    }
    out
}

#[test]
fn normal_vehicles_drive_at_plausible_speeds_between_every_consecutive_pass() {
    let f = fixture();
    let skew = f.day.labels.clock_skew.as_ref().unwrap();
    let mut skip: FxHashSet<String> = f.day.labels.cloned_plates.iter().map(|c| c.plate.clone()).collect();
    let mut by_vehicle: FxHashMap<(String, u8), Vec<&PassRecord>> = FxHashMap::default();
    for (r, _) in &f.records {
        if let PlateRead::Readable(p) = &r.plate {
            by_vehicle.entry((p.as_str().to_owned(), r.plate_color.code())).or_default().push(r);
        }
    }
    skip.extend(skew.affected_vehicles.iter().map(|v| v.plate.clone()));
    let mut pairs = 0;
    for ((plate, _), mut passes) in by_vehicle {
        if skip.contains(&plate) {
            continue;
        }
        passes.sort_by_key(|r| (r.ts, r.pass_id.clone()));
        for w in passes.windows(2) {
            if *w[0].checkpoint == *skew.checkpoint_id || *w[1].checkpoint == *skew.checkpoint_id {
                continue;
            }
            let pa = f.city.checkpoint(f.city.checkpoint_idx(&w[0].checkpoint).unwrap()).position();
            let pb = f.city.checkpoint(f.city.checkpoint_idx(&w[1].checkpoint).unwrap()).position();
            let d = haversine_m(pa, pb);
            let dt = (w[1].ts.ms() - w[0].ts.ms()) as f64 / 1000.0;
            if d > 0.0 {
                pairs += 1;
                assert!(
                    dt > 0.0 && d / dt * 3.6 <= 110.0,
                    "{plate}: {d:.0} m in {dt} s between {} and {}",
                    w[0].checkpoint,
                    w[1].checkpoint
                );
            }
        }
    }
    assert!(pairs > 10_000, "{pairs} pairs checked");
}

#[test]
fn central_roads_are_congested_at_peak_and_free_at_midday() {
    let f = fixture();
    let speeds = segment_speeds(f, &FxHashSet::default());
    let central: FxHashSet<&str> = f
        .city
        .segments
        .iter()
        .filter(|s| &*s.region_id == "R5" && s.road_class == crate::reference::RoadClass::Arterial)
        .map(|s| &*s.id)
        .collect();
    let mean = |from: f64, to: f64| {
        let v: Vec<f64> = speeds
            .iter()
            .filter(|(s, _, t)| {
                central.contains(s.as_str())
                    && (start() + (from * HOUR as f64) as i64..start() + (to * HOUR as f64) as i64).contains(t)
            })
            .map(|(_, v, _)| *v)
            .collect();
        v.iter().sum::<f64>() / v.len().max(1) as f64
    };
    let (peak, midday) = (mean(7.75, 8.25), mean(10.5, 12.0));
    assert!(peak < 25.0 && midday > 38.0, "central arterials: {peak:.1} km/h at 8:00, {midday:.1} km/h at midday");
}

#[test]
fn the_outage_is_delivered_hours_late_and_nothing_else_there_is() {
    let f = fixture();
    let o = f.day.labels.outage.as_ref().unwrap();
    let at: Vec<&(PassRecord, i64)> = f.records.iter().filter(|(r, _)| *r.checkpoint == *o.checkpoint_id).collect();
    let (inside, outside): (Vec<&(PassRecord, i64)>, Vec<&(PassRecord, i64)>) =
        at.into_iter().partition(|(r, _)| (o.from_ts..o.to_ts).contains(&r.ts.ms()));
    assert_eq!(inside.len() as u64, o.passes);
    assert!(o.passes > 20, "{} passes in the outage", o.passes);
    assert!(inside.iter().all(|(r, arrival)| arrival - r.ts.ms() >= 2 * HOUR && *arrival >= o.delivered_from_ts));
    assert!(outside.iter().all(|(r, arrival)| arrival - r.ts.ms() < 2 * 60_000));
}

#[test]
fn every_planted_clone_conflicts_and_only_the_skewed_clock_fakes_a_conflict() {
    let f = fixture();
    let labels = &f.day.labels;
    assert!(labels.cloned_plates.len() >= 2);
    for c in &labels.cloned_plates {
        assert!(!c.conflicting_pairs.is_empty(), "clone {} has no conflicting pair", c.plate);
    }
    let flagged = implausible_pairs(&f.city, &f.records.iter().map(|(r, _)| r.clone()).collect::<Vec<_>>());
    let skew = labels.clock_skew.as_ref().unwrap();
    let by_id: FxHashMap<&str, &PassRecord> = f.records.iter().map(|(r, _)| (&*r.pass_id, r)).collect();
    for (vehicle, pairs) in &flagged {
        if labels.cloned_plates.iter().any(|c| c.plate == vehicle.plate) {
            continue;
        }
        assert!(skew.affected_vehicles.contains(vehicle), "{vehicle:?} flagged but not labelled");
        for [a, b] in pairs {
            assert!(
                [a, b].iter().any(|id| *by_id[id.as_str()].checkpoint == *skew.checkpoint_id),
                "{vehicle:?}: {a} {b} not at the skewed camera"
            );
        }
    }
}

#[test]
fn the_surge_checkpoint_doubles_its_flow_for_consecutive_windows() {
    let f = fixture();
    let s = f.day.labels.traffic_surge.as_ref().unwrap();
    let mut windows: BTreeMap<i64, u64> = BTreeMap::new();
    for (r, _) in f.records.iter().filter(|(r, _)| *r.checkpoint == *s.checkpoint_id) {
        *windows.entry(r.ts.ms() / 300_000 * 300_000).or_default() += 1;
    }
    let count = |w: i64| windows.get(&w).copied().unwrap_or(0);
    let first = s.from_ts / 300_000 * 300_000;
    let mut prior: Vec<u64> = (1..=12).map(|k| count(first - k * 300_000)).collect();
    prior.sort();
    let median = (prior[5] + prior[6]) as f64 / 2.0;
    let threshold = (2.0 * median).max(50.0);
    let hot = (0..5).filter(|k| count(first + k * 300_000) as f64 >= threshold).count();
    assert!(
        hot >= 2,
        "windows over {threshold}: {hot}; counts {:?}",
        (0..5).map(|k| count(first + k * 300_000)).collect::<Vec<_>>()
    );
}

#[test]
fn the_incident_segment_crawls_during_the_incident_only() {
    let f = fixture();
    let i = f.day.labels.congestion_incident.as_ref().unwrap();
    let speeds: Vec<(f64, i64)> = segment_speeds(f, &FxHashSet::default())
        .into_iter()
        .filter(|(s, _, _)| *s == i.segment_id)
        .map(|(_, v, t)| (v, t))
        .collect();
    let during: Vec<f64> =
        speeds.iter().filter(|(_, t)| (i.from_ts + 120_000..i.to_ts).contains(t)).map(|x| x.0).collect();
    let before: Vec<f64> =
        speeds.iter().filter(|(_, t)| (i.from_ts - 15 * 60_000..i.from_ts).contains(t)).map(|x| x.0).collect();
    assert!(during.len() >= 10 && before.len() >= 3, "{} during, {} before", during.len(), before.len());
    assert!(during.iter().all(|v| *v < 15.0), "{during:?}");
    assert!(before.iter().sum::<f64>() / before.len() as f64 > 30.0, "{before:?}");
}

#[test]
fn high_frequency_vehicles_and_restriction_violators_are_labelled_with_their_passes() {
    let f = fixture();
    let labels = &f.day.labels;
    assert_eq!(labels.high_frequency.len(), 5);
    assert!(labels.high_frequency.iter().all(|h| h.passes >= 8), "{:?}", labels.high_frequency);
    assert!(labels.restriction_violators.len() >= 3, "{:?}", labels.restriction_violators);
    let rules = f.city.restrictions.as_ref().unwrap();
    for v in &labels.restriction_violators {
        assert!(matches!(v.plate.chars().last(), Some('1' | '6')), "Monday restricts 1 and 6: {}", v.plate);
        let rule = rules.rules.iter().find(|r| r.id == v.rule_id).unwrap();
        for id in &v.pass_ids {
            let (r, _) = f.records.iter().find(|(r, _)| &*r.pass_id == id).unwrap();
            assert!(rule.covers(f.city.checkpoint(f.city.checkpoint_idx(&r.checkpoint).unwrap())));
        }
    }
}

#[test]
fn compliant_restricted_vehicles_stay_out_of_the_zone_in_restricted_hours() {
    let f = fixture();
    let rules = f.city.restrictions.as_ref().unwrap();
    let day = params(0, 0).day;
    let violators: FxHashSet<&str> = f.day.labels.restriction_violators.iter().map(|v| v.plate.as_str()).collect();
    let mut violations = 0;
    for (r, _) in &f.records {
        let PlateRead::Readable(plate) = &r.plate else { continue };
        let cp = f.city.checkpoint(f.city.checkpoint_idx(&r.checkpoint).unwrap());
        let local = ["赣A", "赣M"].contains(&plate.prefix().unwrap_or(""));
        let rv = RestrictedVehicle { plate, color: r.plate_color, plate_type: &r.plate_type, local };
        let hour = (r.ts.ms() - start()) as f64 / HOUR as f64;
        if rules.rules.iter().any(|rule| rule.restricts(rules, day, &rv) && rule.covers(cp) && rule.in_hours(hour)) {
            violations += 1;
            assert!(violators.contains(plate.as_str()), "{plate} violates but is not labelled");
        }
    }
    assert!(violations > 0);
}

#[test]
fn ingestion_counts_exactly_the_dirt_the_labels_describe() {
    let f = fixture();
    let city = Arc::new(f.city.clone());
    let mut ingest =
        Ingest::new(Validator::new(city, TZ, PlateColorScheme::Police, 300_000), Deduplicator::new(6 * HOUR + 10_000));
    for e in &f.day.emissions {
        let _: Outcome = ingest.accept(e.line.as_bytes(), None);
    }
    let labels = &f.day.labels;
    assert_eq!(ingest.stats.records, labels.records);
    assert_eq!(ingest.stats.valid, labels.valid_passes);
    assert_eq!(ingest.stats.duplicates, labels.identical_duplicates);
    assert_eq!(ingest.stats.unreadable_plates, labels.unreadable_plates);
    assert_eq!(ingest.stats.dead_letters, labels.dead_letters);
    assert!(
        labels.identical_duplicates > 100
            && labels.unreadable_plates > 100
            && labels.delayed_beyond_out_of_orderness > 100
    );
    assert!(labels.dead_letters.len() >= 5, "{:?}", labels.dead_letters);
}

#[test]
fn the_shipped_sample_city_is_what_the_generator_writes() {
    let dir = tempfile::tempdir().unwrap();
    write_city(&sample_city(), dir.path()).unwrap();
    let shipped = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/city");
    for file in ["checkpoints.csv", "segments.csv", "regions.csv", "restrictions.toml"] {
        let want = std::fs::read_to_string(dir.path().join(file)).unwrap();
        let have = std::fs::read_to_string(shipped.join(file)).unwrap_or_default();
        assert!(
            want == have,
            "config/city/{file} differs from the generator's output: regenerate it with `passflow simulate`"
        );
    }
    let loaded = City::load(&shipped).unwrap();
    assert_eq!(loaded.checkpoints, sample_city().checkpoints);
    assert_eq!(loaded.segments, sample_city().segments);
    assert_eq!(loaded.restrictions, sample_city().restrictions);
}
