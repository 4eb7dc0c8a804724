//! Event time: milliseconds since the Unix epoch, and the three input formats.

use super::RejectReason;
use chrono::{DateTime, NaiveDate, NaiveDateTime, TimeZone};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::fmt;

/// 2000-01-01T00:00:00Z: passes before it are `bad_timestamp`.
pub const MIN_VALID_TS_MS: i64 = 946_684_800_000;

pub const DAY_MS: i64 = 86_400_000;

/// The time of a pass, epoch milliseconds.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct EventTime(pub i64);

impl EventTime {
    pub fn ms(self) -> i64 {
        self.0
    }

    /// The local calendar date of this instant in `tz`.
    pub fn local_date(self, tz: Tz) -> NaiveDate {
        self.to_datetime(tz).date_naive()
    }

    pub fn to_datetime(self, tz: Tz) -> DateTime<Tz> {
        // Every i64 millisecond count we accept (>= 2000, < year 262143) is representable.
        tz.timestamp_millis_opt(self.0).single().expect("valid epoch milliseconds")
    }
}

impl fmt::Display for EventTime {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match DateTime::from_timestamp_millis(self.0) {
            Some(t) => write!(f, "{}", t.format("%Y-%m-%dT%H:%M:%S%.3fZ")),
            None => write!(f, "{}ms", self.0),
        }
    }
}

/// Reads a pass time: epoch milliseconds (as a number or a numeric string), RFC 3339, or
/// `yyyy-MM-dd HH:mm:ss[.SSS]` in the city's time zone.
pub fn parse_event_time(text: &str, tz: Tz) -> Result<EventTime, RejectReason> {
    let text = text.trim();
    let ms = if is_integer(text) {
        text.parse::<i64>().map_err(|_| RejectReason::BadTimestamp)?
    } else if let Some(local) = parse_local(text) {
        tz.from_local_datetime(&local).earliest().ok_or(RejectReason::BadTimestamp)?.timestamp_millis()
    } else {
        DateTime::parse_from_rfc3339(text).map_err(|_| RejectReason::BadTimestamp)?.timestamp_millis()
    };
    check_range(ms)
}

/// Accepts epoch milliseconds given as a JSON number.
pub(crate) fn event_time_from_ms(ms: i64) -> Result<EventTime, RejectReason> {
    check_range(ms)
}

fn check_range(ms: i64) -> Result<EventTime, RejectReason> {
    // Up to the end of year 9999: every accepted time is a four-digit-year calendar date.
    const MAX_VALID_TS_MS: i64 = 253_402_300_800_000;
    if (MIN_VALID_TS_MS..MAX_VALID_TS_MS).contains(&ms) {
        Ok(EventTime(ms))
    } else {
        Err(RejectReason::BadTimestamp)
    }
}

fn is_integer(text: &str) -> bool {
    let digits = text.strip_prefix('-').unwrap_or(text);
    !digits.is_empty() && digits.bytes().all(|b| b.is_ascii_digit())
}

/// `yyyy-MM-dd HH:mm:ss` with an optional fraction of up to 9 digits, parsed by position.
fn parse_local(text: &str) -> Option<NaiveDateTime> {
    let b = text.as_bytes();
    if b.len() < 19 || b[4] != b'-' || b[7] != b'-' || b[10] != b' ' || b[13] != b':' || b[16] != b':' {
        return None;
    }
    let num = |range: std::ops::Range<usize>| -> Option<u32> {
        let part = &text[range];
        part.bytes().all(|c| c.is_ascii_digit()).then(|| part.parse().ok())?
    };
    let nanos = match &text[19..] {
        "" => 0,
        frac => {
            let digits = frac.strip_prefix('.')?;
            if digits.is_empty() || digits.len() > 9 || !digits.bytes().all(|c| c.is_ascii_digit()) {
                return None;
            }
            digits.parse::<u32>().ok()? * 10u32.pow(9 - digits.len() as u32)
        }
    };
    let date = NaiveDate::from_ymd_opt(num(0..4)? as i32, num(5..7)?, num(8..10)?)?;
    date.and_hms_nano_opt(num(11..13)?, num(14..16)?, num(17..19)?, nanos)
}

#[cfg(test)]
mod tests {
    use super::*;

    const SHANGHAI: Tz = chrono_tz::Asia::Shanghai;
    // 2026-03-02T08:00:00+08:00
    const T: i64 = 1_772_409_600_000;

    #[test]
    fn epoch_milliseconds_as_a_numeric_string() {
        assert_eq!(parse_event_time("1772409600000", SHANGHAI), Ok(EventTime(T)));
    }

    #[test]
    fn rfc3339_with_offset_or_zulu() {
        assert_eq!(parse_event_time("2026-03-02T08:00:00+08:00", SHANGHAI), Ok(EventTime(T)));
        assert_eq!(parse_event_time("2026-03-02T00:00:00.250Z", SHANGHAI), Ok(EventTime(T + 250)));
    }

    #[test]
    fn local_time_is_read_in_the_city_time_zone() {
        assert_eq!(parse_event_time("2026-03-02 08:00:00", SHANGHAI), Ok(EventTime(T)));
        assert_eq!(parse_event_time("2026-03-02 08:00:00.123", SHANGHAI), Ok(EventTime(T + 123)));
        let utc = chrono_tz::UTC;
        assert_eq!(parse_event_time("2026-03-02 00:00:00", utc), Ok(EventTime(T)));
    }

    #[test]
    fn garbage_and_impossible_dates_are_bad_timestamps() {
        for text in ["yesterday", "2026-02-30 08:00:00", "2026-03-02 25:00:00", "2026-03-02 08:00", "", "12.5"] {
            assert_eq!(parse_event_time(text, SHANGHAI), Err(RejectReason::BadTimestamp), "{text}");
        }
    }

    #[test]
    fn times_before_2000_are_bad_timestamps() {
        assert_eq!(parse_event_time("1999-12-31 23:59:59", chrono_tz::UTC), Err(RejectReason::BadTimestamp));
        assert_eq!(event_time_from_ms(0), Err(RejectReason::BadTimestamp));
        assert_eq!(event_time_from_ms(MIN_VALID_TS_MS), Ok(EventTime(MIN_VALID_TS_MS)));
    }

    #[test]
    fn local_date_crosses_midnight_in_the_city_not_in_utc() {
        // 2026-03-01T16:30Z is 00:30 on 2 March in Shanghai.
        let t = EventTime(T - 7 * 3_600_000 - 1_800_000);
        assert_eq!(t.local_date(SHANGHAI), NaiveDate::from_ymd_opt(2026, 3, 2).unwrap());
        assert_eq!(t.local_date(chrono_tz::UTC), NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
    }
}
