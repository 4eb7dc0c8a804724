use super::*;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::results::ResultBatch;

fn city() -> Arc<City> {
    support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R2")], &["R1", "R2"])
}

fn pass(id: &str, plate: &str, cp: u32, ts: i64) -> Pass {
    Pass { pass_id: id.into(), ..support::pass(plate, cp, ts) }
}

fn run(
    op: &mut OriginCounts,
    passes: &[Pass],
    watermark: i64,
    then: i64,
) -> (Vec<OriginCountRow>, Vec<(usize, &'static str)>) {
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = support::context(watermark, 3_600_000, &mut out, &mut late);
    op.process_batch(passes, &mut ctx);
    ctx.watermark = then;
    op.on_watermark(&mut ctx);
    (out.origin_counts, late)
}

fn local() -> Vec<String> {
    vec!["赣A".into(), "赣M".into()]
}

#[test]
fn each_vehicle_counts_once_per_region_and_window_by_origin_and_scope() {
    let mut op = OriginCounts::new(&city(), &local());
    let passes = [
        pass("1", "赣A12345", 0, 1_000),
        pass("2", "赣A12345", 0, 2_000),
        pass("3", "赣M11111", 0, 3_000),
        pass("4", "赣B22222", 0, 4_000),
        pass("5", "粤B33333", 0, 5_000),
        pass("6", "赣A12345", 1, 6_000),
        pass("7", "-", 0, 7_000),
        pass("8", "WJ12345", 0, 8_000),
    ];
    let (mut rows, _) = run(&mut op, &passes, i64::MIN, 300_000);
    rows.sort();
    let got: Vec<(&str, &str, &str, &str, u64)> =
        rows.iter().map(|r| (&*r.region_id, &*r.origin_province, &*r.origin_city, r.scope, r.vehicles)).collect();
    assert_eq!(
        got,
        vec![
            ("R1", "广东", "深圳", "other", 1),
            ("R1", "未知", "未知", "other", 1),
            ("R1", "江西", "南昌", "local", 2),
            ("R1", "江西", "赣州", "province", 1),
            ("R2", "江西", "南昌", "local", 1),
        ]
    );
}

#[test]
fn every_letter_of_the_local_city_is_local_even_when_only_one_is_configured() {
    let mut op = OriginCounts::new(&city(), &["赣A".to_string()]);
    let (rows, _) =
        run(&mut op, &[pass("1", "赣A12345", 0, 1_000), pass("2", "赣M11111", 0, 2_000)], i64::MIN, 300_000);
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].scope, rows[0].vehicles), ("local", 2));
}

#[test]
fn a_late_vehicle_re_emits_its_origin_with_a_higher_revision_and_beyond_lateness_is_late() {
    let mut op = OriginCounts::new(&city(), &local());
    run(&mut op, &[pass("1", "赣A12345", 0, 1_000)], i64::MIN, 300_000);
    let (rows, late) =
        run(&mut op, &[pass("2", "赣A54321", 0, 2_000), pass("3", "赣A12345", 0, 3_000)], 300_000, 300_001);
    assert!(late.is_empty());
    assert_eq!(rows.len(), 1);
    assert_eq!((rows[0].vehicles, rows[0].revision), (2, 1));
    let (rows, late) = run(&mut op, &[pass("4", "赣A99999", 0, 4_000)], 300_000 + 3_600_000, 300_000 + 3_600_001);
    assert_eq!(late, vec![(0, "origin_counts/5m")]);
    assert!(rows.is_empty());
}

#[test]
fn state_survives_a_snapshot() {
    let mut a = OriginCounts::new(&city(), &local());
    run(&mut a, &[pass("1", "赣A12345", 0, 1_000), pass("2", "粤B33333", 1, 310_000)], i64::MIN, 300_000);
    let mut b = OriginCounts::new(&city(), &local());
    b.restore(&a.snapshot().unwrap()).unwrap();
    let more = [pass("3", "赣A12345", 0, 2_000), pass("4", "赣A77777", 0, 2_500), pass("5", "粤B33333", 1, 320_000)];
    let (mut x, _) = run(&mut a, &more, 300_000, 600_000);
    let (mut y, _) = run(&mut b, &more, 300_000, 600_000);
    x.sort();
    y.sort();
    assert_eq!(x, y);
    assert_eq!(x.iter().find(|r| &*r.region_id == "R1").map(|r| r.vehicles), Some(2));
}

#[test]
fn the_batch_oracle_counts_distinct_vehicles() {
    let passes = [pass("1", "赣A12345", 0, 1_000), pass("2", "赣A12345", 0, 2_000), pass("3", "赣A12345", 0, 301_000)];
    let oracle = batch_origin_counts(&city(), &local(), &passes);
    assert_eq!(oracle.values().copied().collect::<Vec<_>>(), vec![1, 1]);
}

#[test]
fn plates_sharing_their_first_bytes_get_the_origin_of_their_own_prefix_as_the_oracle_does() {
    // Known prefixes, a prefix of a known province the table lacks, characters that are no
    // province (their plates have no prefix), short and ASCII plates, each head seen twice.
    let plates = [
        "赣A12345",
        "赣A54321",
        "赣Z11111",
        "赣Z22222",
        "使A1234",
        "使A5678",
        "粤B33333",
        "粤B44444",
        "WJ12345",
        "WJ12346",
        "赣",
        "赣A",
        "-",
        "领A1234",
    ];
    let passes: Vec<Pass> =
        plates.iter().enumerate().map(|(i, p)| pass(&i.to_string(), p, 0, 1_000 + i as i64)).collect();
    let mut op = OriginCounts::new(&city(), &local());
    let (rows, _) = run(&mut op, &passes, i64::MIN, 300_000);
    let got: BTreeMap<(String, i64, String, String, String), u64> = rows
        .iter()
        .map(|r| {
            let key =
                (r.region_id.to_string(), r.window_start, r.origin_province.to_string(), r.origin_city.to_string());
            ((key.0, key.1, key.2, key.3, r.scope.to_owned()), r.vehicles)
        })
        .collect();
    assert_eq!(got, batch_origin_counts(&city(), &local(), &passes));
    let unknown_city = got.iter().find(|((_, _, province, city, _), _)| province == "江西" && city == "未知");
    assert_eq!(unknown_city.map(|(_, n)| *n), Some(2), "赣Z is Jiangxi's, its city unknown");
}
