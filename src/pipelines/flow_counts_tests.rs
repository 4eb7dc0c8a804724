use super::*;
use crate::model::Direction;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::reference::Checkpoint;
use crate::results::ResultBatch;

const H: i64 = 3_600_000;

fn city() -> Arc<City> {
    let boundary =
        Checkpoint { boundary: true, inbound_direction: Some(Direction::WEST_TO_EAST), ..checkpoint("B", "R1") };
    support::city(vec![Checkpoint { bus_lanes: vec![3], ..checkpoint("A", "R1") }, boundary], &["R1"])
}

fn pass(id: &str, cp: u32, ts: i64, direction: u8, lane: u8) -> Pass {
    Pass {
        pass_id: id.into(),
        direction: Direction::new(direction.into()).unwrap(),
        lane,
        ..support::pass("赣A12345", cp, ts)
    }
}

struct Harness {
    op: FlowCounts,
    out: ResultBatch,
    late: Vec<(usize, &'static str)>,
}

impl Harness {
    fn new() -> Harness {
        Harness { op: FlowCounts::new(&city()), out: ResultBatch::default(), late: Vec::new() }
    }

    fn batch(&mut self, passes: &[Pass], watermark: i64) {
        let mut ctx = support::context(watermark, H, &mut self.out, &mut self.late);
        self.op.process_batch(passes, &mut ctx);
    }

    fn watermark(&mut self, watermark: i64) -> Vec<FlowCountRow> {
        let mut ctx = support::context(watermark, H, &mut self.out, &mut self.late);
        self.op.on_watermark(&mut ctx);
        std::mem::take(&mut self.out.flow_counts)
    }
}

fn find<'a>(rows: &'a [FlowCountRow], level: &str, key: &str, window_s: u32) -> Vec<&'a FlowCountRow> {
    rows.iter().filter(|r| r.level == level && &*r.key_id == key && r.window_s == window_s).collect()
}

#[test]
fn a_window_is_emitted_once_the_watermark_passes_its_end() {
    let mut h = Harness::new();
    h.batch(&[pass("1", 0, 29_999, 2, 1), pass("2", 0, 30_000, 2, 1)], i64::MIN);
    assert!(h.watermark(29_999).is_empty());
    let rows = h.watermark(30_000);
    let w = find(&rows, "checkpoint", "A", 30);
    assert_eq!(w.len(), 1);
    assert_eq!((w[0].window_start, w[0].passes, w[0].revision), (0, 1, 0));
    assert_eq!(find(&h.watermark(30_000), "checkpoint", "A", 30).len(), 0, "emitted once");
    let rows = h.watermark(60_000);
    assert_eq!(find(&rows, "checkpoint", "A", 30)[0].window_start, 30_000);
    assert_eq!(find(&rows, "checkpoint", "A", 60)[0].passes, 2);
}

#[test]
fn every_level_counts_the_pass() {
    let mut h = Harness::new();
    h.batch(&[pass("1", 0, 1_000, 2, 3), pass("2", 1, 2_000, 2, 1), pass("3", 1, 3_000, 1, 1)], i64::MIN);
    let rows = h.watermark(300_000);
    let count = |level: &str, key: &str| find(&rows, level, key, 300).first().map_or(0, |r| r.passes);
    assert_eq!(count("checkpoint", "A"), 1);
    assert_eq!(count("checkpoint_direction", "A:2"), 1);
    assert_eq!(count("checkpoint_direction", "B:1"), 1);
    assert_eq!(count("region", "R1"), 3);
    assert_eq!(count("city", "all"), 3);
    assert_eq!(count("boundary", "in"), 1);
    assert_eq!(count("boundary", "out"), 1);
    assert_eq!(count("bus_lane", "A"), 1);
    assert_eq!(count("bus_lane", "B"), 0);
}

#[test]
fn a_late_pass_within_lateness_re_emits_the_window_with_a_higher_revision() {
    let mut h = Harness::new();
    h.batch(&[pass("1", 0, 1_000, 2, 1)], i64::MIN);
    h.watermark(40_000);
    h.batch(&[pass("2", 0, 2_000, 2, 1)], 40_000);
    let rows = h.watermark(41_000);
    let w = find(&rows, "checkpoint", "A", 30);
    assert_eq!((w[0].passes, w[0].revision), (2, 1));
    assert!(find(&rows, "checkpoint", "B", 30).is_empty(), "untouched keys are not re-emitted");
    assert!(h.late.is_empty());
}

#[test]
fn a_pass_beyond_lateness_misses_only_the_windows_that_closed_for_good() {
    let mut h = Harness::new();
    h.batch(&[pass("1", 0, 1_000, 2, 1)], i64::MIN);
    // [0, 30 s) is final at 30 s + 1 h, [0, 1 min) at 1 min + 1 h, [0, 5 min) at 5 min + 1 h.
    let wm = 60_000 + H + 10_000;
    h.watermark(wm);
    h.batch(&[pass("2", 0, 2_000, 2, 1)], wm);
    assert_eq!(h.late, vec![(0, "flow_counts/30s"), (0, "flow_counts/1m")]);
    let rows = h.watermark(wm + 1);
    assert_eq!(find(&rows, "checkpoint", "A", 300)[0].passes, 2);
    assert!(find(&rows, "checkpoint", "A", 30).is_empty());
}

#[test]
fn state_survives_a_snapshot_and_a_wrong_version_is_refused() {
    let mut h = Harness::new();
    h.batch(&[pass("1", 0, 1_000, 2, 1), pass("2", 0, 40_000, 2, 1)], i64::MIN);
    h.watermark(30_000);
    let blob = h.op.snapshot().unwrap();
    let mut g = Harness::new();
    g.op.restore(&blob).unwrap();
    h.batch(&[pass("3", 0, 2_000, 2, 1)], 30_000);
    g.batch(&[pass("3", 0, 2_000, 2, 1)], 30_000);
    let (mut a, mut b) = (h.watermark(400_000), g.watermark(400_000));
    a.sort();
    b.sort();
    assert_eq!(a, b);
    let err = g.op.restore(&StateBlob { version: 99, ..blob }).unwrap_err().to_string();
    assert!(err.contains("version 99") && err.contains("flow_counts"), "{err}");
}

#[test]
fn the_batch_oracle_agrees_on_a_small_example() {
    let passes = [pass("1", 0, 1_000, 2, 3), pass("2", 1, 31_000, 2, 1)];
    let oracle = batch_flow_counts(&city(), &passes);
    assert_eq!(oracle.get(&("city".into(), "all".into(), 300, 0)), Some(&2));
    assert_eq!(oracle.get(&("boundary".into(), "in".into(), 30, 30_000)), Some(&1));
    assert_eq!(oracle.get(&("bus_lane".into(), "A".into(), 60, 0)), Some(&1));
}
