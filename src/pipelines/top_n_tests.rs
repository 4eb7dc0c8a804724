use super::*;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::results::ResultBatch;

fn city() -> Arc<City> {
    support::city(vec![checkpoint("B", "R1"), checkpoint("A", "R1"), checkpoint("C", "R1")], &["R1"])
}

fn pass(cp: u32, ts: i64) -> Pass {
    support::pass("赣A12345", cp, ts)
}

fn step(op: &mut TopN, passes: &[Pass], watermark: i64, then: i64) -> (Vec<TopNWindow>, Vec<(usize, &'static str)>) {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    ctx.watermark = then;
    op.on_watermark(&mut ctx);
    (out.top_n, late)
}

fn names(w: &TopNWindow) -> Vec<(&str, u64)> {
    w.entries.iter().map(|(k, v)| (&**k, *v)).collect()
}

#[test]
fn windows_rank_by_count_then_id_and_leave_out_zeros() {
    let mut op = TopN::new(&city(), 2);
    // B (idx 0) and A (idx 1) tie at 2, C has 1: A wins the tie, C is cut by N = 2.
    let passes = [pass(0, 1_000), pass(0, 2_000), pass(1, 3_000), pass(1, 4_000), pass(2, 5_000)];
    let (windows, _) = step(&mut op, &passes, i64::MIN, 10_000);
    let first = windows.iter().find(|w| w.window_end == 5_000).unwrap();
    assert_eq!(names(first), vec![("A", 2), ("B", 2)]);
    let second = windows.iter().find(|w| w.window_end == 10_000).unwrap();
    assert_eq!(names(second), vec![("A", 2), ("B", 2)]);
    assert_eq!(windows.len(), 2);
}

#[test]
fn a_late_pass_replaces_every_open_window_it_falls_in() {
    let mut op = TopN::new(&city(), 3);
    step(&mut op, &[pass(0, 1_000), pass(1, 61_000)], i64::MIN, 70_000);
    let (windows, late) = step(&mut op, &[pass(2, 2_000), pass(2, 2_500)], 70_000, 70_001);
    assert!(late.is_empty());
    let ends: Vec<i64> = windows.iter().map(|w| w.window_end).collect();
    assert_eq!(ends, (1..=12).map(|k| k * 5_000).collect::<Vec<_>>(), "every emitted window holding the 0-5 s bucket");
    assert_eq!(names(&windows[0]), vec![("C", 2), ("B", 1)]);
}

#[test]
fn the_streaming_result_equals_the_batch_ranking() {
    let passes: Vec<Pass> = (0..400).map(|i| pass((i * 7 % 3) as u32, i64::from(i) * 1_300)).collect();
    let mut op = TopN::new(&city(), 2);
    let (mut got, _) = step(&mut op, &passes, i64::MIN, i64::MAX);
    got.sort_by_key(|w| w.window_end);
    let want = batch_top_n(&city(), &passes, 2);
    assert_eq!(got.len(), want.len());
    for w in &got {
        assert_eq!(&w.entries, &want[&w.window_end], "window ending {}", w.window_end);
    }
}

proptest::proptest! {
    /// Ranking by index agrees with ranking the named values whole: ties to the smaller name
    /// (names here are out of index order), zeros left out, at most N.
    #[test]
    fn ranking_by_index_equals_the_plain_ranking(
        values in proptest::collection::vec(0u64..4, 0..120),
        n in proptest::prop_oneof![0usize..12, 30usize..40, 60usize..130],
        wide in proptest::option::of(0usize..120),
    ) {
        // Now and then one value too large for the ranking's words.
        let mut values = values;
        if let Some(v) = wide.and_then(|i| values.get_mut(i)) {
            *v += u64::from(u32::MAX);
        }
        let names: Vec<Arc<str>> = (0..values.len()).map(|i| Arc::from(format!("K{}", (i * 7) % 127))).collect();
        let keys = RankedKeys::new(names.clone());
        let plain = rank(names.into_iter().zip(values.iter().copied()), n);
        proptest::prop_assert_eq!(keys.rank(&values, n), plain);
    }
}

proptest::proptest! {
    /// Adding a batch's changes by runs of one bucket and delta leaves the ranking as adding
    /// them one at a time does, and finds the same changes late.
    #[test]
    fn changes_added_by_runs_are_added_as_one_by_one(
        changes in proptest::collection::vec((0i64..90_000, 0usize..3, proptest::bool::ANY), 0..60),
        watermark in 0i64..60_000,
        then in 60_000i64..200_000,
    ) {
        let changes: Vec<(i64, usize, i32)> =
            changes.into_iter().map(|(ts, key, add)| (ts, key, if add { 1 } else { -1 })).collect();
        let (lateness, keys) = (20_000, RankedKeys::new(vec!["A".into(), "B".into(), "C".into()]));
        let (mut by_runs, mut one_by_one) = (SlidingRanking::default(), SlidingRanking::default());
        // Both first see the same earlier change and emit, so that later ones mark windows dirty.
        for r in [&mut by_runs, &mut one_by_one] {
            r.add(10_000, 1, 1, 3, i64::MIN, lateness);
            r.emit("m", &keys, 3, watermark, lateness, &mut Vec::new());
        }
        let mut late_by_runs = Vec::new();
        by_runs.add_all(&changes, |c| *c, 3, (watermark, lateness), |c| late_by_runs.push(*c));
        let late_one_by_one: Vec<(i64, usize, i32)> = changes
            .iter()
            .filter(|&&(ts, key, delta)| !one_by_one.add(ts, key, delta, 3, watermark, lateness))
            .copied()
            .collect();
        proptest::prop_assert_eq!(late_by_runs, late_one_by_one);
        let (mut a, mut b) = (Vec::new(), Vec::new());
        by_runs.emit("m", &keys, 3, then, lateness, &mut a);
        one_by_one.emit("m", &keys, 3, then, lateness, &mut b);
        proptest::prop_assert_eq!(a, b);
    }
}
