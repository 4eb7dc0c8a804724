use super::*;
use crate::pipelines::test_support::{self as support, checkpoint, pass};
use crate::results::ResultBatch;

const TZ: Tz = chrono_tz::Asia::Shanghai;
/// 2026-03-02 00:00 in Shanghai.
const DAY: i64 = 1_772_380_800_000;
const H: i64 = 3_600_000;

fn city() -> Arc<City> {
    support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"])
}

fn step(
    op: &mut HighFrequency,
    passes: &[Pass],
    watermark: i64,
) -> (Vec<HighFrequencyRow>, Vec<(usize, &'static str)>) {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 6 * H, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    op.on_watermark(&mut ctx);
    (out.high_frequency, late)
}

#[test]
fn a_row_appears_when_the_count_reaches_n_and_follows_every_further_pass() {
    let mut op = HighFrequency::new(&city(), TZ, 3);
    let (rows, _) = step(&mut op, &[pass("赣A1", 0, DAY + H), pass("赣A1", 0, DAY + 2 * H)], i64::MIN);
    assert!(rows.is_empty());
    let (rows, _) = step(&mut op, &[pass("赣A1", 0, DAY + 3 * H), pass("赣A1", 1, DAY + 3 * H)], i64::MIN);
    assert_eq!(rows.len(), 1);
    assert_eq!(
        (rows[0].passes, rows[0].first_ts, rows[0].last_ts, &*rows[0].checkpoint_id),
        (3, DAY + H, DAY + 3 * H, "A")
    );
    assert_eq!(rows[0].day, "2026-03-02");
    let (rows, _) = step(&mut op, &[pass("赣A1", 0, DAY + 30 * 60_000)], i64::MIN);
    assert_eq!(
        (rows[0].passes, rows[0].first_ts),
        (4, DAY + 30 * 60_000),
        "an earlier pass arriving later moves the first time"
    );
}

#[test]
fn days_follow_the_city_calendar_and_close_after_the_lateness() {
    let mut op = HighFrequency::new(&city(), TZ, 2);
    // 23:30 and 00:30 local are two days.
    let (rows, _) = step(&mut op, &[pass("赣A1", 0, DAY - 30 * 60_000), pass("赣A1", 0, DAY + 30 * 60_000)], i64::MIN);
    assert!(rows.is_empty());
    let closed = DAY + 24 * H + 6 * H;
    let (_, late) = step(&mut op, &[pass("赣A1", 0, DAY + H)], closed);
    assert_eq!(late, vec![(0, "high_frequency/day")]);
}

#[test]
fn state_survives_a_snapshot_and_matches_the_batch_result() {
    let passes: Vec<Pass> =
        (0..60).map(|i| pass(["赣A1", "赣A2", "粤B3"][i % 3], (i % 2) as u32, DAY + i as i64 * 600_000)).collect();
    let mut a = HighFrequency::new(&city(), TZ, 4);
    step(&mut a, &passes[..30], i64::MIN);
    let mut b = HighFrequency::new(&city(), TZ, 4);
    b.restore(&a.snapshot().unwrap()).unwrap();
    let (rows, _) = step(&mut b, &passes[30..], i64::MIN);
    let want = batch_high_frequency(&city(), TZ, &passes, 4);
    let mut got: BTreeMap<(String, String, String, u8), (u32, i64, i64)> = BTreeMap::new();
    for r in rows {
        got.insert(
            (r.day, r.checkpoint_id.to_string(), r.plate.to_string(), r.plate_color),
            (r.passes, r.first_ts, r.last_ts),
        );
    }
    assert_eq!(got, want);
}

#[test]
fn a_state_an_earlier_build_wrote_as_json_restores_and_the_binary_one_is_smaller() {
    let mut op = HighFrequency::new(&city(), TZ, 4);
    let json = format!(
        r#"[{{"day":"2026-03-02","tallies":[[0,"赣A1",2,{{"passes":3,"first_ts":{},"last_ts":{}}},false]]}}]"#,
        DAY + H,
        DAY + 3 * H
    );
    op.restore(&StateBlob { version: JSON_STATE_VERSION, bytes: json.clone().into_bytes() }).unwrap();
    let (rows, _) = step(&mut op, &[pass("赣A1", 0, DAY + 4 * H)], i64::MIN);
    assert_eq!(
        rows.iter().map(|r| (&*r.checkpoint_id, &*r.plate, r.passes, r.first_ts, r.last_ts)).collect::<Vec<_>>(),
        vec![("A", "赣A1", 4, DAY + H, DAY + 4 * H)],
        "the restored tally went on counting"
    );
    let binary = op.snapshot().unwrap();
    assert_eq!(binary.version, STATE_VERSION);
    assert!(binary.bytes.len() * 2 < json.len(), "{} binary bytes against {} of JSON", binary.bytes.len(), json.len());
    let refused = op.restore(&StateBlob { version: STATE_VERSION + 1, bytes: binary.bytes.clone() }).unwrap_err();
    assert!(refused.to_string().contains("has version"), "{refused}");
}

#[test]
fn a_state_with_a_pass_outside_its_day_is_refused() {
    let mut op = HighFrequency::new(&city(), TZ, 4);
    for (first, last) in [(DAY - 1, DAY + H), (DAY + H, DAY + 50 * 24 * H)] {
        let json = format!(
            r#"[{{"day":"2026-03-02","tallies":[[0,"赣A1",2,{{"passes":3,"first_ts":{first},"last_ts":{last}}},false]]}}]"#
        );
        let refused = op.restore(&StateBlob { version: JSON_STATE_VERSION, bytes: json.into_bytes() }).unwrap_err();
        assert!(refused.to_string().contains("outside its day 2026-03-02"), "{refused}");
    }
}
