use super::*;
use crate::pipelines::test_support::{self as support, checkpoint, segment};
use crate::results::{AlertRow, ResultBatch, TopNWindow};

/// A → B → C in region R1 and C → D in R2: 1 km arterials at 60 km/h free flow (60 s; a
/// traversal takes at most 360 s), and A → C directly, 2 km, a secondary road.
fn city() -> Arc<City> {
    support::city_with_segments(
        vec![checkpoint("A", "R1"), checkpoint("B", "R1"), checkpoint("C", "R1"), checkpoint("D", "R2")],
        vec![
            segment("AB", 0, 1, 1000.0, 60.0, RoadClass::Arterial, "R1"),
            segment("BC", 1, 2, 1000.0, 60.0, RoadClass::Arterial, "R1"),
            segment("AC", 0, 2, 2000.0, 60.0, RoadClass::Secondary, "R1"),
            segment("CD", 2, 3, 1000.0, 60.0, RoadClass::Arterial, "R2"),
        ],
        &["R1", "R2"],
    )
}

fn pass(plate: &str, cp: u32, ts: i64) -> Pass {
    support::pass(plate, cp, ts)
}

#[derive(Default)]
struct Out {
    segments: Vec<SegmentCongestionRow>,
    areas: Vec<AreaCongestionRow>,
    top_n: Vec<TopNWindow>,
    late: Vec<(usize, &'static str)>,
}

fn step(op: &mut Congestion, passes: &[Pass], watermark: i64, then: i64) -> Out {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 3_600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    ctx.watermark = then;
    op.on_watermark(&mut ctx);
    Out { segments: out.segment_congestion, areas: out.area_congestion, top_n: out.top_n, late }
}

fn one<'a>(rows: &'a [SegmentCongestionRow], id: &str, window_s: u32) -> Vec<&'a SegmentCongestionRow> {
    rows.iter().filter(|r| &*r.segment_id == id && r.window_s == window_s).collect()
}

#[test]
fn levels_are_intervals_open_below_and_closed_above() {
    use RoadClass::*;
    assert_eq!(congestion_level(Expressway, 65.01), 1);
    assert_eq!(congestion_level(Expressway, 65.0), 2);
    assert_eq!(congestion_level(Expressway, 50.0), 3);
    assert_eq!(congestion_level(Expressway, 20.0), 5);
    assert_eq!(congestion_level(Arterial, 40.0), 2);
    assert_eq!(congestion_level(Arterial, 15.5), 4);
    assert_eq!(congestion_level(Secondary, 35.5), 1);
    assert_eq!(congestion_level(Secondary, 10.0), 5);
    assert_eq!(congestion_level(Secondary, 0.0), 5);
}

#[test]
fn a_traversal_gives_speed_index_and_level_in_the_window_of_its_end() {
    let mut op = Congestion::new(&city(), 10);
    // A at 00:00:50, B at 00:02:30: 100 s for 1 km = 36 km/h, index 100 / 60 = 1.67, level 2.
    let out = step(&mut op, &[pass("赣A1", 0, 50_000), pass("赣A1", 1, 150_000)], i64::MIN, 400_000);
    let minute = one(&out.segments, "AB", 60);
    assert_eq!(minute.len(), 1);
    let r = minute[0];
    assert_eq!(
        (r.window_start, r.traversals, r.mean_speed_kmh, r.travel_time_index, r.congestion_level),
        (120_000, 1, 36.0, 1.67, 2)
    );
    assert_eq!(one(&out.segments, "AB", 300)[0].window_start, 0);
    assert_eq!(out.segments.len(), 2, "only AB was traversed: {:?}", out.segments);
    let city_row = out.areas.iter().find(|a| a.level == "city" && a.window_s == 60).unwrap();
    assert_eq!((city_row.mean_speed_kmh, city_row.congestion_level), (36.0, 2));
    assert!(out.areas.iter().all(|a| &*a.key_id != "R2"), "R2 has no traversal");
}

#[test]
fn the_free_flow_bound_is_inclusive_and_zero_or_repeat_passes_do_not_count() {
    let mut op = Congestion::new(&city(), 10);
    let passes = [
        // Exactly 6 × 60 s: a traversal.
        pass("赣A1", 0, 0),
        pass("赣A1", 1, 360_000),
        // 360.001 s: none.
        pass("赣A2", 0, 0),
        pass("赣A2", 1, 360_001),
        // Same time at both ends: none.
        pass("赣A3", 0, 10_000),
        pass("赣A3", 1, 10_000),
        // The same checkpoint twice, then on: only B → C (B at 20 s is adjacent to C).
        pass("赣A4", 1, 10_000),
        pass("赣A4", 1, 20_000),
        pass("赣A4", 2, 80_000),
    ];
    let out = step(&mut op, &passes, i64::MIN, 1_000_000);
    let ab: u32 = one(&out.segments, "AB", 300).iter().map(|r| r.traversals).sum();
    assert_eq!(ab, 1);
    let bc = one(&out.segments, "BC", 60);
    assert_eq!((bc.len(), bc[0].traversals, bc[0].mean_speed_kmh), (1, 1, 60.0));
}

#[test]
fn a_late_pass_between_two_paired_passes_retracts_their_traversal_and_adds_two() {
    let mut op = Congestion::new(&city(), 10);
    // A at 10 s, C at 250 s: a traversal of AC (2 km in 240 s = 30 km/h).
    let first = step(&mut op, &[pass("赣A1", 0, 10_000), pass("赣A1", 2, 250_000)], i64::MIN, 600_000);
    assert_eq!(one(&first.segments, "AC", 60)[0].traversals, 1);
    // B at 130 s arrives late: AC is retracted, AB and BC take its place.
    let second = step(&mut op, &[pass("赣A1", 1, 130_000)], 600_000, 600_001);
    assert!(second.late.is_empty());
    let ac = one(&second.segments, "AC", 60);
    assert_eq!(ac.len(), 1);
    assert!(ac[0].is_retraction(), "{:?}", ac[0]);
    assert!(ac[0].revision > one(&first.segments, "AC", 60)[0].revision);
    let ab = one(&second.segments, "AB", 60);
    let bc = one(&second.segments, "BC", 60);
    assert_eq!((ab[0].window_start, ab[0].mean_speed_kmh), (120_000, 30.0));
    assert_eq!((bc[0].window_start, bc[0].mean_speed_kmh), (240_000, 30.0));
    // Every area keeps a traversal in every window: none is retracted, and R1's minute at 240 s
    // now has BC's speed.
    assert!(second.areas.iter().all(|a| !a.is_retraction()));
    let r1 = second.areas.iter().find(|a| &*a.key_id == "R1" && a.window_s == 60 && a.window_start == 240_000);
    assert_eq!(r1.map(|a| a.mean_speed_kmh), Some(30.0));
    // The ranking of windows that held AC now holds AB and BC.
    let corrected = second.top_n.iter().find(|w| w.window_end == 255_000).unwrap();
    let names: Vec<&str> = corrected.entries.iter().map(|(k, _)| &**k).collect();
    assert_eq!(names, vec!["BC"]);
}

#[test]
fn areas_weight_by_length_and_round_the_level_half_up() {
    let mut op = Congestion::new(&city(), 10);
    let passes = [
        // AB at 36 km/h (level 2, 1 km), AC at 2 km in 240 s = 30 km/h (secondary: level 2)…
        pass("赣A1", 0, 10_000),
        pass("赣A1", 1, 110_000),
        pass("赣A2", 0, 10_000),
        pass("赣A2", 2, 250_000),
        // … BC at 1 km in 299 s = 12.04 km/h (level 5, 1 km).
        pass("赣A3", 1, 0),
        pass("赣A3", 2, 299_000),
    ];
    let out = step(&mut op, &passes, i64::MIN, 1_000_000);
    let region = out.areas.iter().find(|a| &*a.key_id == "R1" && a.window_s == 300 && a.window_start == 0).unwrap();
    // Σ L / Σ (L / v) = 4000 m / (100 + 240 + 299 s) = 22.54 km/h; index 639 / 240 = 2.66;
    // level (1000·2 + 2000·2 + 1000·5) / 4000 = 2.75 → 3.
    assert_eq!((region.mean_speed_kmh, region.travel_time_index, region.congestion_level), (22.54, 2.66, 3));
}

#[test]
fn the_streaming_result_equals_the_batch_computation_in_any_order() {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let city = city();
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
    let mut passes = Vec::new();
    for v in 0..40 {
        let mut t = rng.gen_range(0..600_000);
        let mut cp = rng.gen_range(0..4u32);
        for _ in 0..12 {
            passes.push(pass(&format!("赣A{v:05}"), cp, t));
            cp = if rng.gen_bool(0.7) { (cp + 1) % 4 } else { rng.gen_range(0..4) };
            t += rng.gen_range(20_000..300_000);
        }
    }
    let (want_segments, want_areas, want_ranking) = batch_congestion(&city, &passes, 3);
    assert!(want_segments.len() > 20);
    passes.shuffle(&mut rng);
    let mut op = Congestion::new(&city, 3);
    let (mut segments, mut areas, mut ranking) = (SegmentTable::new(), AreaTable::new(), BTreeMap::new());
    let mut watermark = i64::MIN;
    for chunk in passes.chunks(17) {
        let then = chunk.iter().map(|p| p.ts.ms()).max().unwrap().max(watermark);
        let out = step(&mut op, chunk, watermark, then);
        watermark = then;
        collect(out, &mut segments, &mut areas, &mut ranking);
    }
    collect(step(&mut op, &[], watermark, i64::MAX), &mut segments, &mut areas, &mut ranking);
    assert_eq!(segments, want_segments);
    assert_eq!(areas, want_areas);
    assert_eq!(ranking, want_ranking);
}

/// Applies rows as a store does (a retraction deletes; Top-N windows replaced whole).
fn collect(
    out: Out,
    segments: &mut SegmentTable,
    areas: &mut AreaTable,
    ranking: &mut BTreeMap<i64, Vec<(Arc<str>, u64)>>,
) {
    for r in out.segments {
        let key = (r.segment_id.to_string(), r.window_s, r.window_start);
        match r.is_retraction() {
            true => segments.remove(&key),
            false => segments.insert(key, (r.traversals, r.mean_speed_kmh, r.travel_time_index, r.congestion_level)),
        };
    }
    for r in out.areas {
        let key = (r.level.to_owned(), r.key_id.to_string(), r.window_s, r.window_start);
        match r.is_retraction() {
            true => areas.remove(&key),
            false => areas.insert(key, (r.mean_speed_kmh, r.travel_time_index, r.congestion_level)),
        };
    }
    for w in out.top_n {
        match w.entries.is_empty() {
            true => ranking.remove(&w.window_end),
            false => ranking.insert(w.window_end, w.entries),
        };
    }
}

/// AB free in 5 min window 0 and congested in windows 1 and 2.
fn free_then_congested() -> [Pass; 6] {
    [
        // 5 min window 0: AB at 60 km/h (level 1).
        pass("赣A1", 0, 100_000),
        pass("赣A1", 1, 160_000),
        // Windows 1 and 2: AB at 12 km/h (level 5).
        pass("赣A2", 0, 100_000),
        pass("赣A2", 1, 400_000),
        pass("赣A3", 0, 350_000),
        pass("赣A3", 1, 650_000),
    ]
}

/// Runs `passes` then a watermark at `then` through `op`: its sudden-congestion alerts.
fn sudden_alerts(op: &mut Congestion, passes: &[Pass], then: i64) -> Vec<AlertRow> {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(i64::MIN, 3_600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    ctx.watermark = then;
    op.on_watermark(&mut ctx);
    out.alerts.into_iter().filter(|a| a.kind == SUDDEN_CONGESTION).collect()
}

#[test]
fn two_congested_windows_right_after_a_free_one_raise_a_sudden_congestion_alert() {
    let city = city();
    let mut op = Congestion::new(&city, 10);
    let passes = free_then_congested();
    let alerts = sudden_alerts(&mut op, &passes, 2_000_000);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    assert_eq!((alerts[0].alert_id.clone(), alerts[0].status), (sudden_id("AB", 300_000), "active"));
    let details: serde_json::Value = serde_json::from_str(&alerts[0].details).unwrap();
    assert_eq!(details["windows"][0]["congestion_level"], 1);
    assert_eq!(details["windows"][2]["congestion_level"], 5);
    let (segments, _, _) = batch_congestion(&city, &passes, 10);
    assert_eq!(batch_sudden_congestion(&segments), vec![sudden_id("AB", 300_000)]);
    // Two late fast traversals in window 1 lift its mean speed to 28 km/h (level 3): the alert
    // is retracted.
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(2_000_000, 3_600_000, &mut out, &mut late);
    op.process_batch(
        &[pass("赣A4", 0, 400_000), pass("赣A4", 1, 440_000), pass("赣A5", 0, 400_000), pass("赣A5", 1, 440_000)],
        &mut ctx,
    );
    op.on_watermark(&mut ctx);
    let retracted: Vec<&AlertRow> = out.alerts.iter().filter(|a| a.kind == SUDDEN_CONGESTION).collect();
    assert_eq!(retracted.len(), 1, "{retracted:?}");
    assert_eq!((retracted[0].status, retracted[0].revision), ("retracted", 1));
}

#[test]
fn an_adopted_sudden_congestion_is_raised_again_above_its_revision_by_a_state_that_held_no_window_yet() {
    let city = city();
    let passes = free_then_congested();
    let mut stored = sudden_alerts(&mut Congestion::new(&city, 10), &passes, 2_000_000).remove(0);
    // The store holds it retracted at revision 1 (raised and retracted before a crash).
    (stored.status, stored.revision) = ("retracted", 1);
    let mut restored = Congestion::new(&city, 10);
    restored.adopt_alerts(std::slice::from_ref(&stored));
    // A first watermark comes before any window is held.
    assert!(sudden_alerts(&mut restored, &[], 50_000).is_empty());
    let again = sudden_alerts(&mut restored, &passes, 2_000_000);
    assert_eq!(again.len(), 1, "{again:?}");
    assert_eq!((&again[0].alert_id, again[0].status, again[0].revision), (&stored.alert_id, "active", 2));
}

proptest::proptest! {
    /// The level and mean speed sudden congestion judges by are those of the segment's row.
    #[test]
    fn a_segments_level_is_that_of_its_row(traversals in 0u32..50, dt_ms in 1i64..2_000_000, class in 0usize..3) {
        let class = [RoadClass::Expressway, RoadClass::Arterial, RoadClass::Secondary][class];
        let s = segment("S", 0, 1, 1234.5, 50.0, class, "R1");
        let sums = SegmentSums { traversals, dt_ms: dt_ms * i64::from(traversals), updates: traversals };
        let row = segment_row(&s, 300, 0, sums);
        let want = (traversals > 0).then_some((row.congestion_level, row.mean_speed_kmh));
        proptest::prop_assert_eq!(segment_level(&s, sums), want);
    }
}
