use super::*;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::results::ResultBatch;

fn city() -> Arc<City> {
    support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"])
}

/// `n` passes at checkpoint `cp` spread over the 5 min window `k`.
fn window(cp: u32, k: i64, n: usize, tag: &str) -> Vec<Pass> {
    (0..n).map(|i| support::pass(&format!("赣A{tag}{i:04}"), cp, k * WINDOW_MS + i as i64 * 1_000)).collect()
}

fn step(op: &mut TrafficSurge, passes: &[Pass], watermark: i64, then: i64) -> Vec<AlertRow> {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 6 * 3_600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    ctx.watermark = then;
    op.on_watermark(&mut ctx);
    out.alerts
}

#[test]
fn two_windows_over_twice_the_median_raise_one_alert_and_a_single_one_none() {
    let mut passes: Vec<Pass> = (0..12).flat_map(|k| window(0, k, 20, &format!("a{k}"))).collect();
    passes.extend(window(0, 12, 60, "x"));
    passes.extend(window(0, 13, 70, "y"));
    // B: the same baseline with a single high window.
    passes.extend((0..12).flat_map(|k| window(1, k, 20, &format!("b{k}"))));
    passes.extend(window(1, 12, 90, "z"));
    let mut op = TrafficSurge::new(&city(), SurgeRule::default());
    let alerts = step(&mut op, &passes, i64::MIN, 20 * WINDOW_MS);
    assert_eq!(alerts.len(), 1, "{alerts:?}");
    let a = &alerts[0];
    assert_eq!(
        (a.alert_id.as_str(), a.status, a.ts),
        (surge_id("A", 12 * WINDOW_MS).as_str(), "active", 14 * WINDOW_MS)
    );
    let details: serde_json::Value = serde_json::from_str(&a.details).unwrap();
    assert_eq!(details["windows"][0]["passes"], 60);
    assert_eq!(details["windows"][0]["median_previous"], 20.0);
    assert_eq!(details["windows"][1]["threshold"], 50.0);
    assert_eq!(batch_traffic_surge(&city(), &passes, SurgeRule::default()), vec![a.alert_id.clone()]);
}

#[test]
fn a_correction_that_raises_the_baseline_retracts_the_alert() {
    let mut passes: Vec<Pass> = (0..12).flat_map(|k| window(0, k, 20, &format!("a{k}"))).collect();
    passes.extend(window(0, 12, 60, "x"));
    passes.extend(window(0, 13, 70, "y"));
    let mut op = TrafficSurge::new(&city(), SurgeRule::default());
    let first = step(&mut op, &passes, i64::MIN, 20 * WINDOW_MS);
    assert_eq!(first.len(), 1);
    // Late passes double the baseline: the median is 40, the threshold 80.
    let late: Vec<Pass> = (0..12).flat_map(|k| window(0, k, 20, &format!("late{k}"))).collect();
    let second = step(&mut op, &late, 20 * WINDOW_MS, 20 * WINDOW_MS + 1);
    assert_eq!(second.len(), 1, "{second:?}");
    assert_eq!((second[0].alert_id.as_str(), second[0].status), (first[0].alert_id.as_str(), "retracted"));
    assert!(second[0].revision > first[0].revision);
}

#[test]
fn the_streaming_alerts_equal_the_batch_ones_in_any_order() {
    use rand::seq::SliceRandom;
    use rand::{Rng, SeedableRng};
    let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
    let mut passes = Vec::new();
    for cp in 0..2 {
        for k in 0..60 {
            let n = if rng.gen_bool(0.15) { rng.gen_range(50..120) } else { rng.gen_range(5..40) };
            passes.extend(window(cp, k, n, &format!("{cp}-{k}-")));
        }
    }
    let want = batch_traffic_surge(&city(), &passes, SurgeRule::default());
    assert!(!want.is_empty());
    passes.shuffle(&mut rng);
    let mut op = TrafficSurge::new(&city(), SurgeRule::default());
    let mut active: BTreeMap<String, (u32, &'static str)> = BTreeMap::new();
    let mut watermark = i64::MIN;
    for chunk in passes.chunks(500) {
        let then = chunk.iter().map(|p| p.ts.ms()).max().unwrap().max(watermark);
        for a in step(&mut op, chunk, watermark, then) {
            let e = active.entry(a.alert_id).or_insert((a.revision, a.status));
            if a.revision >= e.0 {
                *e = (a.revision, a.status);
            }
        }
        watermark = then;
    }
    for a in step(&mut op, &[], watermark, i64::MAX) {
        let e = active.entry(a.alert_id).or_insert((a.revision, a.status));
        if a.revision >= e.0 {
            *e = (a.revision, a.status);
        }
    }
    let got: Vec<String> = active.into_iter().filter(|(_, (_, s))| *s == "active").map(|(id, _)| id).collect();
    assert_eq!(got, want);
}
