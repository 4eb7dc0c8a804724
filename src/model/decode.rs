//! Decoding one JSON pass record: canonical names and platform aliases, scalar codes given as
//! numbers or strings, the three time formats. Checks that need reference data or a clock come
//! later, in `crate::ingest`.

use super::time::event_time_from_ms;
use super::{parse_event_time, Direction, EventTime, PlateColor, PlateColorScheme, PlateRead, RejectReason, Text};
use chrono_tz::Tz;
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, SeqAccess, Visitor};
use serde::{Deserialize, Serialize};
use std::borrow::Cow;
use std::fmt;

/// Highest spot speed accepted as a reading, km/h.
const MAX_SPEED_KMH: f64 = 400.0;
/// Longest identifier accepted (pass, checkpoint, device ids, codes), bytes: result tables
/// hold them in bounded columns.
const MAX_ID_BYTES: usize = 128;
/// Longest plate accepted, characters.
const MAX_PLATE_CHARS: usize = 16;

/// A vehicle pass, every field typed. `C` is how its checkpoint is known: by id as decoded
/// ([`PassRecord`]), or by its place in the city's table once validated (`Pass`).
#[derive(Clone, Debug, PartialEq)]
pub struct PassOf<C> {
    pub pass_id: Text,
    pub plate: PlateRead,
    pub plate_color: PlateColor,
    pub plate_type: Text,
    pub checkpoint: C,
    pub device_id: Option<Text>,
    pub direction: Direction,
    pub lane: u8,
    pub ts: EventTime,
    pub speed_kmh: Option<f32>,
    pub vehicle_type: Option<Text>,
}

/// A decoded pass record, its checkpoint not yet looked up.
pub type PassRecord = PassOf<Text>;

impl<C> PassOf<C> {
    /// The same pass with its checkpoint known another way.
    pub fn at<D>(self, checkpoint: D) -> PassOf<D> {
        PassOf {
            pass_id: self.pass_id,
            plate: self.plate,
            plate_color: self.plate_color,
            plate_type: self.plate_type,
            checkpoint,
            device_id: self.device_id,
            direction: self.direction,
            lane: self.lane,
            ts: self.ts,
            speed_kmh: self.speed_kmh,
            vehicle_type: self.vehicle_type,
        }
    }
}

impl PassRecord {
    /// A stable 64-bit digest of the record's content (not its spelling): a resend that decodes
    /// to the same record has the same digest, whatever aliases or time format it used.
    pub fn content_digest(&self) -> u64 {
        super::digest::digest(self, self.checkpoint.as_bytes())
    }

    /// The canonical JSON form (canonical field names, `ts` in epoch milliseconds).
    pub fn to_canonical_json(&self) -> String {
        let out = CanonicalPass {
            pass_id: &self.pass_id,
            plate: self.plate.as_str(),
            plate_color: self.plate_color.code(),
            plate_type: &self.plate_type,
            checkpoint_id: &self.checkpoint,
            device_id: self.device_id.as_deref(),
            direction: self.direction.code(),
            lane: self.lane,
            ts: self.ts.ms(),
            speed_kmh: self.speed_kmh,
            vehicle_type: self.vehicle_type.as_deref(),
        };
        // Serialising plain strings and numbers into a String cannot fail.
        serde_json::to_string(&out).expect("canonical pass serialises")
    }
}

#[derive(Serialize)]
struct CanonicalPass<'a> {
    pass_id: &'a str,
    plate: &'a str,
    plate_color: u8,
    plate_type: &'a str,
    checkpoint_id: &'a str,
    #[serde(skip_serializing_if = "Option::is_none")]
    device_id: Option<&'a str>,
    direction: u8,
    lane: u8,
    ts: i64,
    #[serde(skip_serializing_if = "Option::is_none")]
    speed_kmh: Option<f32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    vehicle_type: Option<&'a str>,
}

/// Decodes one record. `tz` reads local times; `colors` maps the source's colour codes.
pub fn decode_record(json: &[u8], tz: Tz, colors: PlateColorScheme) -> Result<PassRecord, RejectReason> {
    if json.iter().find(|b| !b.is_ascii_whitespace()) != Some(&b'{') {
        return Err(RejectReason::MalformedJson);
    }
    let raw = match super::scan::scan(json) {
        Some(raw) => raw,
        None => serde_json::from_slice(json).map_err(|_| RejectReason::MalformedJson)?,
    };
    Ok(PassRecord {
        pass_id: raw.pass_id.text("pass_id")?.into(),
        plate: match raw.plate {
            Scalar::Null => PlateRead::Unreadable,
            Scalar::Str(s) if s.chars().count() > MAX_PLATE_CHARS => return Err(RejectReason::BadField("plate")),
            Scalar::Str(s) => PlateRead::parse(&s),
            Scalar::Absent => return Err(RejectReason::MissingField("plate")),
            _ => return Err(RejectReason::BadField("plate")),
        },
        plate_color: match raw.plate_color {
            Scalar::Absent | Scalar::Null => PlateColor::Other,
            code => code
                .integer("plate_color")
                .ok()
                .and_then(|c| colors.map(c))
                .ok_or(RejectReason::BadField("plate_color"))?,
        },
        plate_type: raw.plate_type.code("plate_type")?.into(),
        checkpoint: raw.checkpoint_id.text("checkpoint_id")?.into(),
        device_id: raw.device_id.optional_text("device_id")?.map(Into::into),
        direction: match raw.direction {
            Scalar::Absent | Scalar::Null => return Err(RejectReason::MissingField("direction")),
            code => code.integer("direction").ok().and_then(Direction::new).ok_or(RejectReason::BadDirection)?,
        },
        lane: raw.lane.integer("lane").and_then(|l| {
            u8::try_from(l).ok().filter(|l| (1..100).contains(l)).ok_or(RejectReason::BadField("lane"))
        })?,
        ts: decode_ts(raw.ts, tz)?,
        speed_kmh: decode_speed(raw.speed_kmh)?,
        vehicle_type: raw.vehicle_type.optional_text("vehicle_type")?.map(Into::into),
    })
}

fn decode_ts(ts: Scalar<'_>, tz: Tz) -> Result<EventTime, RejectReason> {
    match ts {
        Scalar::Absent | Scalar::Null => Err(RejectReason::MissingField("ts")),
        Scalar::Int(ms) => event_time_from_ms(ms),
        Scalar::Float(ms) if ms.fract() == 0.0 && ms.abs() < 1e17 => event_time_from_ms(ms as i64),
        Scalar::Str(text) => parse_event_time(&text, tz),
        _ => Err(RejectReason::BadTimestamp),
    }
}

/// Spot speed: 0 means the device has no radar, so it reads as missing.
fn decode_speed(speed: Scalar<'_>) -> Result<Option<f32>, RejectReason> {
    let kmh = match speed {
        Scalar::Absent | Scalar::Null => return Ok(None),
        Scalar::Int(v) => v as f64,
        Scalar::Float(v) => v,
        Scalar::Str(s) if s.trim().is_empty() => return Ok(None),
        Scalar::Str(s) => s.trim().parse::<f64>().map_err(|_| RejectReason::BadField("speed_kmh"))?,
        _ => return Err(RejectReason::BadField("speed_kmh")),
    };
    match kmh {
        v if v == 0.0 => Ok(None),
        v if v > 0.0 && v <= MAX_SPEED_KMH => Ok(Some(v as f32)),
        _ => Err(RejectReason::BadField("speed_kmh")),
    }
}

/// A record's fields as they came, before each is judged.
#[derive(Debug, Default, Deserialize)]
pub(super) struct RawPass<'a> {
    #[serde(default, borrow, alias = "GCXH")]
    pub(super) pass_id: Scalar<'a>,
    #[serde(default, borrow, alias = "HPHM")]
    pub(super) plate: Scalar<'a>,
    #[serde(default, borrow, alias = "HPYS")]
    pub(super) plate_color: Scalar<'a>,
    #[serde(default, borrow, alias = "HPZL")]
    pub(super) plate_type: Scalar<'a>,
    #[serde(default, borrow, alias = "KKBH")]
    pub(super) checkpoint_id: Scalar<'a>,
    #[serde(default, borrow, alias = "SBBH")]
    pub(super) device_id: Scalar<'a>,
    #[serde(default, borrow, alias = "FXBH")]
    pub(super) direction: Scalar<'a>,
    #[serde(default, borrow, alias = "CDH")]
    pub(super) lane: Scalar<'a>,
    #[serde(default, borrow, alias = "GCSJ")]
    pub(super) ts: Scalar<'a>,
    #[serde(default, borrow, alias = "CLSD")]
    pub(super) speed_kmh: Scalar<'a>,
    #[serde(default, borrow, alias = "CLLX")]
    pub(super) vehicle_type: Scalar<'a>,
}

/// Any JSON value of a field, kept as it came so each field can give its own reason.
#[derive(Default, Debug)]
pub(super) enum Scalar<'a> {
    #[default]
    Absent,
    Null,
    Bool,
    Int(i64),
    Float(f64),
    Str(Cow<'a, str>),
    Compound,
}

/// `s` without leading and trailing whitespace, as `str::trim`, which decodes characters at
/// both ends: text that begins and ends with a visible ASCII character, as nearly every id
/// and code does, is returned as it is (no whitespace character is an ASCII byte above space).
fn trim(s: &str) -> &str {
    let visible = |b: &u8| (b'!'..0x80).contains(b);
    match (s.as_bytes().first(), s.as_bytes().last()) {
        (Some(first), Some(last)) if visible(first) && visible(last) => s,
        _ => s.trim(),
    }
}

impl<'a> Scalar<'a> {
    /// A required identifier: a non-empty string, or an integer written out.
    fn text(self, field: &'static str) -> Result<Cow<'a, str>, RejectReason> {
        self.optional_text(field)?.ok_or(RejectReason::MissingField(field))
    }

    fn optional_text(self, field: &'static str) -> Result<Option<Cow<'a, str>>, RejectReason> {
        let text = self.unbounded_text(field)?;
        match text {
            Some(t) if t.len() > MAX_ID_BYTES => Err(RejectReason::BadField(field)),
            other => Ok(other),
        }
    }

    fn unbounded_text(self, field: &'static str) -> Result<Option<Cow<'a, str>>, RejectReason> {
        match self {
            Scalar::Absent | Scalar::Null => Ok(None),
            Scalar::Str(s) => Ok(match trim(&s) {
                "" => None,
                trimmed if trimmed.len() == s.len() => Some(s),
                trimmed => Some(Cow::Owned(trimmed.to_owned())),
            }),
            Scalar::Int(i) => Ok(Some(Cow::Owned(i.to_string()))),
            _ => Err(RejectReason::BadField(field)),
        }
    }

    /// A two-digit code such as a plate type: `"02"`, `"2"` and `2` are all `02`.
    fn code(self, field: &'static str) -> Result<Cow<'a, str>, RejectReason> {
        match self {
            Scalar::Int(i) if (0..100).contains(&i) => Ok(Cow::Owned(format!("{i:02}"))),
            Scalar::Str(s) if s.len() == 1 && s.as_bytes()[0].is_ascii_digit() => Ok(Cow::Owned(format!("0{s}"))),
            other => other.text(field),
        }
    }

    /// An integer code given as a number or a numeric string.
    fn integer(self, field: &'static str) -> Result<i64, RejectReason> {
        match self {
            Scalar::Absent | Scalar::Null => Err(RejectReason::MissingField(field)),
            Scalar::Int(i) => Ok(i),
            Scalar::Float(f) if f.fract() == 0.0 && f.abs() < 1e15 => Ok(f as i64),
            Scalar::Str(s) => trim(&s).parse().map_err(|_| RejectReason::BadField(field)),
            _ => Err(RejectReason::BadField(field)),
        }
    }
}

impl<'de: 'a, 'a> Deserialize<'de> for Scalar<'a> {
    fn deserialize<D: Deserializer<'de>>(deserializer: D) -> Result<Self, D::Error> {
        deserializer.deserialize_any(ScalarVisitor)
    }
}

struct ScalarVisitor;

impl<'de> Visitor<'de> for ScalarVisitor {
    type Value = Scalar<'de>;

    fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
        f.write_str("a JSON value")
    }
    fn visit_unit<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_none<E: de::Error>(self) -> Result<Self::Value, E> {
        Ok(Scalar::Null)
    }
    fn visit_bool<E: de::Error>(self, _: bool) -> Result<Self::Value, E> {
        Ok(Scalar::Bool)
    }
    fn visit_i64<E: de::Error>(self, v: i64) -> Result<Self::Value, E> {
        Ok(Scalar::Int(v))
    }
    fn visit_u64<E: de::Error>(self, v: u64) -> Result<Self::Value, E> {
        Ok(i64::try_from(v).map_or(Scalar::Float(v as f64), Scalar::Int))
    }
    fn visit_f64<E: de::Error>(self, v: f64) -> Result<Self::Value, E> {
        Ok(Scalar::Float(v))
    }
    fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Borrowed(v)))
    }
    fn visit_str<E: de::Error>(self, v: &str) -> Result<Self::Value, E> {
        Ok(Scalar::Str(Cow::Owned(v.to_owned())))
    }
    fn visit_seq<A: SeqAccess<'de>>(self, mut seq: A) -> Result<Self::Value, A::Error> {
        while seq.next_element::<IgnoredAny>()?.is_some() {}
        Ok(Scalar::Compound)
    }
    fn visit_map<A: MapAccess<'de>>(self, mut map: A) -> Result<Self::Value, A::Error> {
        while map.next_entry::<IgnoredAny, IgnoredAny>()?.is_some() {}
        Ok(Scalar::Compound)
    }
}

#[cfg(test)]
#[path = "decode_tests.rs"]
mod tests;
