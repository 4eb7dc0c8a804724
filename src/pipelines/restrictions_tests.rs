use super::*;
use crate::model::PlateColor;
use crate::pipelines::test_support::{self as support, checkpoint};
use crate::reference::{Calendar, RestrictionRule, RestrictionRules, Weekday};
use crate::results::ResultBatch;

const TZ: Tz = chrono_tz::Asia::Shanghai;
/// Monday 2026-03-02, 00:00 in Shanghai.
const MONDAY: i64 = 1_772_380_800_000;
const HOUR: i64 = 3_600_000;

fn at(day: i64, hour: i64) -> i64 {
    MONDAY + day * 24 * HOUR + hour * HOUR
}

/// A in the restricted core R1, B on the ring (R2). `core`: weekdays 7–20 h in R1, green plates
/// and police plates exempt. `outsiders`: non-local plates at B all weekend. Wednesday is a
/// holiday; Saturday is a working day that follows Friday's rule.
fn city() -> Arc<City> {
    let digits = |pairs: &[(Weekday, &[u8])]| pairs.iter().map(|(w, d)| (*w, d.to_vec())).collect();
    let rules = RestrictionRules {
        rules: vec![
            RestrictionRule {
                id: "core".into(),
                name: String::new(),
                hours: [7, 20],
                regions: vec!["R1".into()],
                checkpoints: vec![],
                exempt_colors: vec![5, 6],
                exempt_types: vec!["23".into()],
                non_local_only: false,
                weekdays: digits(&[
                    (Weekday::Mon, &[1, 6]),
                    (Weekday::Tue, &[2, 7]),
                    (Weekday::Wed, &[3, 8]),
                    (Weekday::Thu, &[4, 9]),
                    (Weekday::Fri, &[5, 0]),
                ]),
            },
            RestrictionRule {
                id: "outsiders".into(),
                name: String::new(),
                hours: [0, 24],
                regions: vec![],
                checkpoints: vec!["B".into()],
                exempt_colors: vec![],
                exempt_types: vec![],
                non_local_only: true,
                weekdays: digits(&[
                    (Weekday::Sat, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
                    (Weekday::Sun, &[0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
                ]),
            },
        ],
        calendar: Calendar {
            holidays: vec![chrono::NaiveDate::from_ymd_opt(2026, 3, 4).unwrap()],
            working_weekends: [(chrono::NaiveDate::from_ymd_opt(2026, 3, 7).unwrap(), Weekday::Fri)].into(),
        },
    };
    let base = support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R2")], &["R1", "R2"]);
    let mut city = (*base).clone();
    city.restrictions = Some(rules);
    Arc::new(city)
}

fn pass(plate: &str, cp: u32, ts: i64) -> Pass {
    support::pass(plate, cp, ts)
}

/// A context with the restrictions' lateness at `watermark`.
fn context<'a>(watermark: i64, out: &'a mut ResultBatch, late: &'a mut Vec<(usize, &'static str)>) -> Context<'a> {
    support::context(watermark, 6 * HOUR, out, late)
}

#[test]
fn a_week_of_rules_with_a_holiday_a_working_weekend_exemptions_and_a_non_local_rule() {
    let city = city();
    let mut green = pass("赣AD12341", 0, at(0, 9));
    green.plate_color = PlateColor::Green;
    let mut police = pass("赣A12341", 0, at(0, 10));
    police.plate_type = "23".into();
    let cases: Vec<(Pass, Option<&str>)> = vec![
        (pass("赣A12341", 0, at(0, 8)), Some("core")),       // Monday, digit 1
        (pass("赣A12341", 0, at(0, 7) - 1), None),           // 06:59:59.999
        (pass("赣A12341", 0, at(0, 20)), None),              // 20:00 is outside [7, 20)
        (pass("赣A1234F", 0, at(0, 8)), None),               // letter-final counts as 0: not Monday
        (pass("赣A1234F", 0, at(4, 8)), Some("core")),       // … but Friday
        (green, None),                                       // green plates are exempt
        (police, None),                                      // police plates are exempt
        (pass("赣A12347", 0, at(1, 9)), Some("core")),       // Tuesday, digit 7
        (pass("赣A12343", 0, at(2, 9)), None),               // Wednesday is a holiday
        (pass("赣A12344", 1, at(3, 9)), None),               // Thursday, but B is outside the zone
        (pass("赣A12345", 0, at(5, 9)), Some("core")),       // Saturday follows Friday
        (pass("粤B12345", 1, at(6, 10)), Some("outsiders")), // Sunday at B, not local
        (pass("赣A12345", 1, at(6, 10)), None),              // local plates may drive there
    ];
    let passes: Vec<Pass> = cases.iter().map(|(p, _)| p.clone()).collect();
    let mut op = Restrictions::new(&city, TZ, &["赣A".to_string()]);
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = context(i64::MIN, &mut out, &mut late);
    op.process_batch(&passes, &mut ctx);
    let got: BTreeSet<(String, String)> =
        out.restriction_violations.iter().map(|v| (v.pass_id.to_string(), v.rule_id.to_string())).collect();
    let want: BTreeSet<(String, String)> =
        cases.iter().filter_map(|(p, rule)| rule.map(|r| (p.pass_id.to_string(), r.to_owned()))).collect();
    assert_eq!(got, want);
    assert_eq!(batch_restrictions(&city, TZ, &["赣A".to_string()], &passes).0, want);
    let saturday = out.restriction_violations.iter().find(|v| v.rule_id.as_ref() == "core" && v.ts == at(5, 9));
    assert_eq!(saturday.map(|v| v.day.as_str()), Some("2026-03-07"));
}

#[test]
fn summaries_count_violations_and_distinct_vehicles_per_day_checkpoint_and_rule() {
    let city = city();
    let mut op = Restrictions::new(&city, TZ, &["赣A".to_string()]);
    let passes = [pass("赣A12341", 0, at(0, 8)), pass("赣A12341", 0, at(0, 9)), pass("赣A99996", 0, at(0, 9))];
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = context(i64::MIN, &mut out, &mut late);
    op.process_batch(&passes, &mut ctx);
    let s = out.restriction_summary.last().unwrap();
    assert_eq!(
        (s.day.as_str(), &*s.checkpoint_id, &*s.rule_id, s.violations, s.vehicles),
        ("2026-03-02", "A", "core", 3, 2)
    );
    // A violation after the day closed is still written, but the summary is closed: late.
    let (mut out, mut late) = (ResultBatch::default(), Vec::new());
    let mut ctx = context(at(1, 7), &mut out, &mut late);
    op.process_batch(&[pass("赣A12346", 0, at(0, 10))], &mut ctx);
    assert_eq!(out.restriction_violations.len(), 1);
    assert!(out.restriction_summary.is_empty());
    assert_eq!(late, vec![(0, SUMMARY_LATE_LABEL)]);
}
