use super::*;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::results::ResultBatch;

/// A and B are 5.0 km apart (0.045° of latitude), A and C 1.5 km.
fn city() -> Arc<City> {
    let at = |id: &str, lat: f64| {
        let mut c = checkpoint(id, "R1");
        c.lat = lat;
        c
    };
    support::city(vec![at("A", 28.700), at("B", 28.745), at("C", 28.7135)], &["R1"])
}

fn pass(plate: &str, cp: u32, ts: i64) -> Pass {
    support::pass(plate, cp, ts)
}

fn run(op: &mut ClonedPlates, passes: &[Pass], watermark: i64) -> (Vec<AlertRow>, Vec<(usize, &'static str)>) {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 3_600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    op.on_watermark(&mut ctx);
    (out.alerts, late)
}

#[test]
fn a_pair_too_far_apart_for_its_time_is_one_alert_at_the_later_pass() {
    let mut op = ClonedPlates::new(&city(), ClonedPlateRule::default(), Default::default());
    // 5 km in 60 s (+30 s tolerance): 200 km/h.
    let mut later = pass("赣A1", 1, 1_060_000);
    later.vehicle_type = Some("K33".into());
    let (alerts, _) = run(&mut op, &[pass("赣A1", 0, 1_000_000), later.clone()], i64::MIN);
    assert_eq!(alerts.len(), 1);
    let a = &alerts[0];
    assert_eq!(a.alert_id, pair_id("赣A1-0-1000000", &later.pass_id));
    assert_eq!(
        (a.ts, a.checkpoint_id.as_deref(), a.plate.as_deref(), a.kind),
        (1_060_000, Some("B"), Some("赣A1"), CLONED_PLATE)
    );
    let details: serde_json::Value = serde_json::from_str(&a.details).unwrap();
    assert_eq!(details["attributes_differ"], true);
    assert_eq!(details["passes"][0]["checkpoint_id"], "A");
    let speed = details["implied_speed_kmh"].as_f64().unwrap();
    assert!((199.0..201.0).contains(&speed), "{speed}");
    assert!((4990.0..5010.0).contains(&details["distance_m"].as_f64().unwrap()));
}

#[test]
fn plausible_or_short_trips_raise_nothing() {
    let mut op = ClonedPlates::new(&city(), ClonedPlateRule::default(), Default::default());
    let passes = [
        // 5 km in 110 s: 5000 / 140 s = 129 km/h.
        pass("赣A1", 0, 0),
        pass("赣A1", 1, 110_000),
        // 1.5 km in 1 s: under the minimum distance.
        pass("赣A2", 0, 0),
        pass("赣A2", 2, 1_000),
        // The same checkpoint at once.
        pass("赣A3", 1, 0),
        pass("赣A3", 1, 0),
    ];
    let (alerts, _) = run(&mut op, &passes, i64::MIN);
    assert!(alerts.is_empty(), "{alerts:?}");
}

#[test]
fn every_conflicting_pair_is_found_once_in_any_arrival_order() {
    use rand::seq::SliceRandom;
    use rand::SeedableRng;
    let city = city();
    // A vehicle seen at A and B at nearly the same times, three times over: 3 × 3 − 3 pairs
    // between A and B passes closer than the rule allows... plus normal traffic.
    let mut passes = Vec::new();
    for k in 0..3 {
        passes.push(pass("赣A9", 0, k * 20_000));
        passes.push(pass("赣A9", 1, k * 20_000 + 5_000));
    }
    for v in 0..20 {
        passes.push(pass(&format!("赣B{v}"), 0, v * 1_000));
        passes.push(pass(&format!("赣B{v}"), 1, v * 1_000 + 200_000));
    }
    let want = batch_cloned_plates(&city, &passes, ClonedPlateRule::default());
    assert_eq!(want.len(), 9, "every A pass conflicts with every B pass of 赣A9");
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(3);
    for _ in 0..5 {
        passes.shuffle(&mut rng);
        let mut op = ClonedPlates::new(&city, ClonedPlateRule::default(), Default::default());
        let mut got = Vec::new();
        for chunk in passes.chunks(4) {
            got.extend(run(&mut op, chunk, i64::MIN).0.into_iter().map(|a| a.alert_id));
        }
        got.sort();
        assert_eq!(got, want.keys().cloned().collect::<Vec<_>>());
    }
}

#[test]
fn state_survives_a_snapshot_and_a_late_pass_is_reported() {
    let city = city();
    let mut op = ClonedPlates::new(&city, ClonedPlateRule::default(), Default::default());
    run(&mut op, &[pass("赣A1", 0, 10_000_000)], i64::MIN);
    let mut restored = ClonedPlates::new(&city, ClonedPlateRule::default(), Default::default());
    restored.restore(&op.snapshot().unwrap()).unwrap();
    let (alerts, _) = run(&mut restored, &[pass("赣A1", 1, 10_030_000)], 10_000_000);
    assert_eq!(alerts.len(), 1);
    let (alerts, late) = run(&mut restored, &[pass("赣A1", 2, 1_000)], 10_000_000);
    assert!(alerts.is_empty());
    assert_eq!(late, vec![(0, LATE_LABEL)]);
}

#[test]
fn a_camera_found_skewed_takes_back_the_alerts_only_its_clock_made() {
    let skews: Arc<ClockSkews> = Default::default();
    let mut op = ClonedPlates::new(&city(), ClonedPlateRule::default(), skews.clone());
    // B's clock runs 90 s behind: A at 0 and B at 60 s are really 150 s apart (5 km: 100 km/h).
    let (alerts, _) = run(&mut op, &[pass("赣A1", 0, 1_000_000), pass("赣A1", 1, 1_060_000)], i64::MIN);
    assert_eq!(alerts.len(), 1);
    skews.set(1, -90_000);
    let (taken_back, _) = run(&mut op, &[], 1_000_000);
    assert_eq!(taken_back.len(), 1);
    assert_eq!(
        (taken_back[0].alert_id.as_str(), taken_back[0].status, taken_back[0].revision),
        (alerts[0].alert_id.as_str(), "retracted", 1)
    );
    // From now on B's passes are judged on corrected times: the same trip raises nothing.
    let (later, _) = run(&mut op, &[pass("赣A2", 0, 2_000_000), pass("赣A2", 1, 2_060_000)], 1_000_000);
    assert!(later.is_empty(), "{later:?}");
}

#[test]
fn a_partner_within_the_span_widened_by_a_skew_is_kept_whenever_the_lists_are_trimmed() {
    // B's clock runs 10 min ahead: A at T and B at T + 660 s on the cameras' clocks are 60 s
    // apart (5 km: 200 km/h), further apart than the span without the skew.
    let t = 10_000_000;
    let (a, b) = (pass("赣A1", 0, t), pass("赣A1", 1, t + 660_000));
    // A watermark at which B is on time and A is behind the horizon the skew does not widen.
    let watermark = t + 300_000 + 3_600_000;
    for sweep_first in [false, true] {
        let skews: Arc<ClockSkews> = Default::default();
        skews.set(1, 600_000);
        let mut op = ClonedPlates::new(&city(), ClonedPlateRule::default(), skews);
        run(&mut op, std::slice::from_ref(&a), i64::MIN);
        if sweep_first {
            run(&mut op, &[], watermark);
        }
        let (alerts, late) = run(&mut op, std::slice::from_ref(&b), watermark);
        assert!(late.is_empty());
        assert_eq!(alerts.len(), 1, "swept first: {sweep_first}");
    }
}

#[test]
fn the_slab_reads_every_pass_back_across_chunks_and_slot_wrap_and_lets_go_of_old_chunks() {
    let mut slab = Slab { first: u32::MAX - 10, ..Slab::default() };
    let seen = |i: usize| Seen::of(&pass("赣A12345", 0, i as i64 * 1000));
    let marks: Vec<Mark> = (0..3 * CHUNK + 5).map(|i| slab.put(seen(i))).collect();
    assert_eq!(slab.chunks.len(), 4);
    for (i, m) in marks.iter().enumerate() {
        assert_eq!((slab.get(m).ts, m.ts), (i as i64 * 1000, i as i64 * 1000));
    }
    // The first two chunks hold passes before the horizon; the third does not, all of it.
    slab.sweep((2 * CHUNK) as i64 * 1000 + 1);
    assert_eq!(slab.chunks.len(), 2);
    for (i, m) in marks.iter().enumerate().skip(2 * CHUNK) {
        assert_eq!(slab.get(m).ts, i as i64 * 1000);
    }
    // The chunk being filled is kept, whatever the horizon.
    slab.sweep(i64::MAX);
    assert_eq!(slab.chunks.len(), 1);
    assert_eq!(slab.get(&marks[3 * CHUNK + 4]).ts, (3 * CHUNK + 4) as i64 * 1000);
}
