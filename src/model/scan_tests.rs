use super::*;
use proptest::prelude::*;

/// What `serde_json` reads from `json`, printed (an f64 prints the shortest text that reads back
/// to the same bits, so equal prints are equal values).
fn by_serde(json: &str) -> Option<String> {
    serde_json::from_str::<RawPass<'_>>(json).ok().map(|raw| format!("{raw:?}"))
}

/// The scanner either leaves `json` to `serde_json` or reads exactly what it reads.
fn agrees(json: &str) -> bool {
    match scan(json.as_bytes()) {
        None => true,
        Some(raw) => by_serde(json).as_deref() == Some(&*format!("{raw:?}")),
    }
}

#[test]
fn a_simulated_day_reads_as_serde_json_reads_it_and_nearly_all_on_the_fast_path() {
    let city = crate::simulator::sample_city();
    let params = crate::simulator::SimParams {
        day: chrono::NaiveDate::from_ymd_opt(2026, 3, 2).unwrap(),
        vehicles: 2_000,
        seed: 5,
        time_zone: chrono_tz::Asia::Shanghai,
        local_prefixes: vec!["赣A".into()],
    };
    let day = crate::simulator::simulate_day(&city, &params);
    let mut fast = 0;
    for e in &day.emissions {
        assert!(agrees(&e.line), "{}", e.line);
        fast += usize::from(scan(e.line.as_bytes()).is_some());
    }
    assert!(fast * 100 >= day.emissions.len() * 99, "{fast} of {} on the fast path", day.emissions.len());
}

#[test]
fn the_common_shape_is_read_field_by_field() {
    let json = r#" {"pass_id":"p1","plate":"赣A12345","HPYS":2,"lane":"1","ts":1772409600000,"speed_kmh":46.9,"device_id":null,"x":true} "#;
    let raw = scan(json.as_bytes()).expect("the common shape");
    assert!(matches!(raw.pass_id, Scalar::Str(Cow::Borrowed("p1"))));
    assert!(matches!(raw.plate, Scalar::Str(Cow::Borrowed("赣A12345"))));
    assert!(matches!(raw.plate_color, Scalar::Int(2)));
    assert!(matches!(raw.lane, Scalar::Str(Cow::Borrowed("1"))));
    assert!(matches!(raw.ts, Scalar::Int(1_772_409_600_000)));
    assert!(matches!(raw.speed_kmh, Scalar::Float(v) if v == 46.9));
    assert!(matches!(raw.device_id, Scalar::Null));
    assert!(matches!(raw.direction, Scalar::Absent));
}

#[test]
fn anything_unusual_is_left_to_serde_json() {
    for json in [
        r#"{"pass_id":"p\"1"}"#,
        r#"{"pass_id":"p\u0031"}"#,
        r#"{"pass_\u0069d":"p1"}"#,
        "{\"pass_id\":\"p\t1\"}",
        r#"{"pass_id":"p1","pass_id":"p2"}"#,
        r#"{"pass_id":"p1","GCXH":"p2"}"#,
        r#"{"lane":-1}"#,
        r#"{"lane":-0}"#,
        r#"{"lane":01}"#,
        r#"{"speed_kmh":1.}"#,
        r#"{"speed_kmh":1e2}"#,
        r#"{"speed_kmh":4.5E-1}"#,
        r#"{"ts":1234567890123456789}"#,
        r#"{"speed_kmh":0.1234567890123456}"#,
        r#"{"lane":[1]}"#,
        r#"{"extra":{"a":1}}"#,
        r#"{"pass_id":"p1",}"#,
        r#"{"pass_id":"p1"} x"#,
        "\x0c{\"pass_id\":\"p1\"}",
        r#"{"lane":nul}"#,
        r#"{"lane":1 2}"#,
        r#"{"pass_id" "p1"}"#,
        "{",
        "",
    ] {
        assert!(scan(json.as_bytes()).is_none(), "{json}");
    }
    assert!(scan(b"{\"pass_id\":\"\xff\"}").is_none(), "invalid UTF-8");
    assert!(scan(b"{\"pass_id\":\"p1\",\"x\xff\":1}").is_none(), "invalid UTF-8 in an ignored key");
    assert!(scan(b"{\"pass_id\":\"p1\"} \xe8").is_none(), "invalid UTF-8 after the record");
    let long = "{\"plate\":\"赣A12345\",\"vehicle_type\":\"货车\"}";
    let raw = scan(long.as_bytes()).expect("valid UTF-8 beyond ASCII");
    assert!(matches!(raw.plate, Scalar::Str(ref p) if p == "赣A12345"));
    assert!(matches!(raw.vehicle_type, Scalar::Str(ref v) if v == "货车"));
}

/// Records of sources that order their fields differently, read in turn: each is read as
/// `serde_json` reads it, whatever order the reader was predicting from the one before.
#[test]
fn records_whose_fields_come_in_other_orders_read_the_same_in_any_sequence() {
    let fields = [
        r#""checkpoint_id":"KK0017""#,
        r#""device_id":"KK0017-4""#,
        r#""direction":4"#,
        r#""lane":1"#,
        r#""pass_id":"X20260302000023""#,
        r#""plate":"赣A04209""#,
        r#""plate_color":2"#,
        r#""plate_type":"02""#,
        r#""speed_kmh":46.9"#,
        r#""ts":1772380836688"#,
        r#""vehicle_type":"K33""#,
    ];
    let record = |order: &[usize]| format!("{{{}}}", order.iter().map(|i| fields[*i]).collect::<Vec<_>>().join(","));
    let sorted: Vec<usize> = (0..fields.len()).collect();
    let reversed: Vec<usize> = sorted.iter().rev().copied().collect();
    let canonical = [4, 5, 6, 7, 0, 1, 2, 3, 9, 8, 10];
    let partial = [9, 4, 2];
    let with_alias = record(&sorted).replace("\"ts\"", "\"GCSJ\"").replace("\"plate\"", "\"HPHM\"");
    let twice = record(&sorted).replace("\"lane\":1", "\"lane\":1,\"lane\":2");
    let records = [record(&sorted), record(&reversed), record(&canonical), record(&partial), with_alias, twice];
    for round in 0..3 {
        for (i, json) in records.iter().enumerate() {
            assert!(agrees(json), "round {round}: {json}");
            assert_eq!(scan(json.as_bytes()).is_some(), i != records.len() - 1, "{json}");
        }
    }
    let raw = scan(records[1].as_bytes()).unwrap();
    assert!(matches!(raw.ts, Scalar::Int(1_772_380_836_688)));
    assert!(matches!(raw.checkpoint_id, Scalar::Str(Cow::Borrowed("KK0017"))));
}

/// Pieces of records, tricky and plain, for the property below.
fn piece() -> impl Strategy<Value = String> {
    let keys = prop::sample::select(vec![
        "\"pass_id\"",
        "\"GCXH\"",
        "\"plate\"",
        "\"lane\"",
        "\"ts\"",
        "\"speed_kmh\"",
        "\"CLSD\"",
        "\"other\"",
        "\"p\\u0031\"",
    ]);
    let values = prop::sample::select(vec![
        "\"p1\"",
        "\"赣A1\"",
        "\"a\\\"b\"",
        "0",
        "7",
        "-3",
        "-0",
        "01",
        "1.5",
        "0.25",
        "12.",
        "3e2",
        "46.90",
        "123456789012345678",
        "1234567890123456789",
        "0.000000000000001",
        "99999.9999999999",
        "null",
        "true",
        "false",
        "[1]",
        "{}",
        "nulls",
        "\"\"",
    ]);
    let space = prop::sample::select(vec!["", " ", "\n", "\t", "\x0c"]);
    (keys, space.clone(), values, space).prop_map(|(k, s1, v, s2)| format!("{k}{s1}:{s2}{v}"))
}

proptest! {
    #[test]
    fn any_record_reads_as_serde_json_reads_it(
        members in prop::collection::vec(piece(), 0..6),
        open in prop::sample::select(vec!["{", " {", "[", ""]),
        close in prop::sample::select(vec!["}", "} ", ",}", "}x", ""]),
    ) {
        let json = format!("{open}{}{close}", members.join(","));
        prop_assert!(agrees(&json), "{}", json);
    }

    #[test]
    fn any_plain_decimal_reads_to_the_same_f64(whole in 0u64..1_000_000, fraction in 0u64..1_000_000_000, places in 1usize..10) {
        let json = format!("{{\"speed_kmh\":{whole}.{:0places$}}}", fraction % 10u64.pow(places as u32));
        prop_assert!(scan(json.as_bytes()).is_some(), "{}", json);
        prop_assert!(agrees(&json), "{}", json);
    }
}

proptest! {
    #[test]
    fn a_plain_string_ends_at_its_first_quote_backslash_or_control_byte(
        bytes in proptest::collection::vec(prop_oneof![Just(b'"'), Just(b'\\'), 0u8..0x20, 0x20u8..=0xff], 0..40),
        from in 0usize..40,
    ) {
        // Every offset, so that the stop falls in every place of a word and past the words.
        let from = from.min(bytes.len());
        let rest = &bytes[from..];
        let naive = rest.iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20);
        prop_assert_eq!(plain_len(rest), naive);
    }
}
