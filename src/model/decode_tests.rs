use super::*;
use crate::model::PlateKind;

const TZ: Tz = chrono_tz::Asia::Shanghai;
const T: i64 = 1_772_409_600_000; // 2026-03-02 08:00:00 +08:00

fn decode(json: &str) -> Result<PassRecord, RejectReason> {
    decode_record(json.as_bytes(), TZ, PlateColorScheme::Police)
}

fn canonical() -> serde_json::Value {
    serde_json::json!({
        "pass_id": "p1", "plate": "赣A12345", "plate_color": 2, "plate_type": "02",
        "checkpoint_id": "KK0001", "device_id": "D1", "direction": 2, "lane": 1,
        "ts": T, "speed_kmh": 42.5, "vehicle_type": "K33"
    })
}

fn with(field: &str, value: serde_json::Value) -> String {
    let mut v = canonical();
    v[field] = value;
    v.to_string()
}

fn without(field: &str) -> String {
    let mut v = canonical();
    v.as_object_mut().unwrap().remove(field);
    v.to_string()
}

#[test]
fn a_canonical_record_decodes_every_field() {
    let r = decode(&canonical().to_string()).unwrap();
    assert_eq!(&*r.pass_id, "p1");
    assert_eq!(r.plate.as_str(), "赣A12345");
    assert_eq!(r.plate_color, PlateColor::Blue);
    assert_eq!(&*r.plate_type, "02");
    assert_eq!(&*r.checkpoint, "KK0001");
    assert_eq!(r.device_id.as_deref(), Some("D1"));
    assert_eq!(r.direction, Direction::WEST_TO_EAST);
    assert_eq!(r.lane, 1);
    assert_eq!(r.ts, EventTime(T));
    assert_eq!(r.speed_kmh, Some(42.5));
    assert_eq!(r.vehicle_type.as_deref(), Some("K33"));
}

#[test]
fn every_upper_case_alias_decodes_to_the_same_record() {
    let aliased = serde_json::json!({
        "GCXH": "p1", "HPHM": "赣A12345", "HPYS": "2", "HPZL": 2, "KKBH": "KK0001", "SBBH": "D1",
        "FXBH": "2", "CDH": "1", "GCSJ": "2026-03-02 08:00:00", "CLSD": "42.5", "CLLX": "K33",
        "CLPP": "ignored extra field"
    });
    let a = decode(&aliased.to_string()).unwrap();
    let c = decode(&canonical().to_string()).unwrap();
    assert_eq!(a, c);
    assert_eq!(a.content_digest(), c.content_digest());
}

#[test]
fn all_three_time_formats_give_the_same_instant() {
    for ts in [
        serde_json::json!(T),
        serde_json::json!(T.to_string()),
        serde_json::json!("2026-03-02T08:00:00+08:00"),
        serde_json::json!("2026-03-02 08:00:00.000"),
    ] {
        assert_eq!(decode(&with("ts", ts.clone())).unwrap().ts, EventTime(T), "{ts}");
    }
}

#[test]
fn a_missing_or_null_colour_is_other_and_codes_may_be_strings() {
    assert_eq!(decode(&without("plate_color")).unwrap().plate_color, PlateColor::Other);
    assert_eq!(decode(&with("plate_color", serde_json::Value::Null)).unwrap().plate_color, PlateColor::Other);
    assert_eq!(decode(&with("plate_color", serde_json::json!("5"))).unwrap().plate_color, PlateColor::Green);
    assert_eq!(decode(&with("plate_color", serde_json::json!(6))).unwrap().plate_color, PlateColor::YellowGreen);
}

#[test]
fn another_colour_scheme_maps_onto_the_internal_colours() {
    let json = with("plate_color", serde_json::json!(0));
    let r = decode_record(json.as_bytes(), TZ, PlateColorScheme::Etc).unwrap();
    assert_eq!(r.plate_color, PlateColor::Blue);
}

#[test]
fn unreadable_plates_decode_as_unreadable() {
    for plate in [
        serde_json::json!("-"),
        serde_json::json!(""),
        serde_json::json!("无牌"),
        serde_json::json!("未识别"),
        serde_json::Value::Null,
    ] {
        assert_eq!(decode(&with("plate", plate.clone())).unwrap().plate, PlateRead::Unreadable, "{plate}");
    }
}

#[test]
fn zero_speed_means_no_radar() {
    assert_eq!(decode(&with("speed_kmh", serde_json::json!(0))).unwrap().speed_kmh, None);
    assert_eq!(decode(&without("speed_kmh")).unwrap().speed_kmh, None);
    assert_eq!(decode(&without("device_id")).unwrap().device_id, None);
    assert_eq!(decode(&without("vehicle_type")).unwrap().vehicle_type, None);
}

#[test]
fn new_energy_plates_keep_their_kind_through_decoding() {
    let r = decode(&with("plate", serde_json::json!("赣AD12345"))).unwrap();
    assert_eq!(r.plate.plate().unwrap().kind(), PlateKind::NewEnergySmall);
}

#[test]
fn broken_json_and_non_objects_are_malformed() {
    for text in ["{", "not json", "[1,2]", "42", "\"text\"", "{\"pass_id\": \"p1\",}"] {
        assert_eq!(decode(text), Err(RejectReason::MalformedJson), "{text}");
    }
}

#[test]
fn each_required_field_has_its_own_missing_reason() {
    for (field, alias) in [
        ("pass_id", "pass_id"),
        ("plate", "plate"),
        ("plate_type", "plate_type"),
        ("checkpoint_id", "checkpoint_id"),
        ("direction", "direction"),
        ("lane", "lane"),
        ("ts", "ts"),
    ] {
        assert_eq!(decode(&without(alias)), Err(RejectReason::MissingField(field)));
    }
    assert_eq!(
        decode(&with("checkpoint_id", serde_json::Value::Null)),
        Err(RejectReason::MissingField("checkpoint_id"))
    );
    assert_eq!(decode(&with("pass_id", serde_json::json!(""))), Err(RejectReason::MissingField("pass_id")));
    assert_eq!(RejectReason::MissingField("lane").code(), "missing_field:lane");
}

#[test]
fn wrong_types_and_ranges_are_bad_fields() {
    let cases = [
        ("plate", serde_json::json!(12345), "bad_field:plate"),
        ("plate_color", serde_json::json!(9), "bad_field:plate_color"),
        ("plate_color", serde_json::json!("blue"), "bad_field:plate_color"),
        ("checkpoint_id", serde_json::json!({"id": 1}), "bad_field:checkpoint_id"),
        ("lane", serde_json::json!(0), "bad_field:lane"),
        ("lane", serde_json::json!("left"), "bad_field:lane"),
        ("speed_kmh", serde_json::json!(-3), "bad_field:speed_kmh"),
        ("speed_kmh", serde_json::json!("fast"), "bad_field:speed_kmh"),
        ("device_id", serde_json::json!([1]), "bad_field:device_id"),
        ("pass_id", serde_json::json!("x".repeat(200)), "bad_field:pass_id"),
        ("plate", serde_json::json!("赣A".repeat(10)), "bad_field:plate"),
    ];
    for (field, value, reason) in cases {
        assert_eq!(decode(&with(field, value.clone())).unwrap_err().code(), reason, "{field}={value}");
    }
}

#[test]
fn directions_outside_one_to_eight_are_bad_directions() {
    for d in [serde_json::json!(0), serde_json::json!(9), serde_json::json!("east"), serde_json::json!(true)] {
        assert_eq!(decode(&with("direction", d.clone())), Err(RejectReason::BadDirection), "{d}");
    }
    assert_eq!(decode(&with("direction", serde_json::json!("8"))).unwrap().direction.code(), 8);
}

#[test]
fn unparseable_and_pre_2000_times_are_bad_timestamps() {
    for ts in [
        serde_json::json!("soon"),
        serde_json::json!(12),
        serde_json::json!("1999-12-31 23:00:00"),
        serde_json::json!(true),
        serde_json::json!(1.5),
    ] {
        assert_eq!(decode(&with("ts", ts.clone())), Err(RejectReason::BadTimestamp), "{ts}");
    }
}

#[test]
fn canonical_json_round_trips() {
    let r = decode(&canonical().to_string()).unwrap();
    let again = decode(&r.to_canonical_json()).unwrap();
    assert_eq!(r, again);
}

#[test]
fn content_digest_sees_a_corrected_read() {
    let a = decode(&canonical().to_string()).unwrap();
    let b = decode(&with("plate", serde_json::json!("赣A12845"))).unwrap();
    assert_ne!(a.content_digest(), b.content_digest());
}

/// The digest is kept in deduplication state across restarts and upgrades: it stays FNV-1a
/// over the fields' bytes, each text followed by 0xff, then the codes and the time.
#[test]
fn content_digest_keeps_its_layout() {
    let r = decode(&canonical().to_string()).unwrap();
    let mut bytes = Vec::new();
    let texts = [&*r.pass_id, r.plate.as_str(), &*r.plate_type, &*r.checkpoint];
    for text in texts.into_iter().chain([r.device_id.as_deref().unwrap(), r.vehicle_type.as_deref().unwrap()]) {
        bytes.extend_from_slice(text.as_bytes());
        bytes.push(0xff);
    }
    bytes.extend([r.plate_color.code(), r.direction.code(), r.lane]);
    bytes.extend(r.ts.ms().to_ne_bytes());
    bytes.extend(r.speed_kmh.unwrap().to_bits().to_ne_bytes());
    let fnv =
        bytes.iter().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(*b)).wrapping_mul(0x0000_0100_0000_01b3));
    assert_eq!(r.content_digest(), fnv);
}

#[test]
fn trimming_gives_what_str_trim_gives_with_or_without_its_ascii_shortcut() {
    for s in ["", " ", "KK0017", " KK0017", "KK0017\t", "\u{3000}KK0017", "KK0017\u{a0}", "赣A1", "a", "~", "\u{7f}"] {
        assert_eq!(super::trim(s), s.trim(), "{s:?}");
    }
}
