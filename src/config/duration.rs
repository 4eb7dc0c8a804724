//! Human-readable durations in configuration: `500ms`, `10s`, `5m`, `6h`, `1d`.

use serde::{Deserialize, Deserializer, Serialize, Serializer};
use std::fmt;
use std::time::Duration;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub struct HumanDuration(pub Duration);

impl HumanDuration {
    pub const fn from_secs(secs: u64) -> HumanDuration {
        HumanDuration(Duration::from_secs(secs))
    }

    pub fn as_millis(self) -> i64 {
        self.0.as_millis() as i64
    }

    pub fn parse(text: &str) -> Result<HumanDuration, String> {
        let text = text.trim();
        let split = text.find(|c: char| !c.is_ascii_digit()).unwrap_or(text.len());
        let (number, unit) = text.split_at(split);
        let n: u64 = number.parse().map_err(|_| format!("`{text}` is not a duration like 500ms, 10s, 5m, 6h or 1d"))?;
        let ms = match unit.trim() {
            "ms" => 1,
            "s" => 1_000,
            "m" | "min" => 60_000,
            "h" => 3_600_000,
            "d" => 86_400_000,
            _ => return Err(format!("`{text}` has no unit: write 500ms, 10s, 5m, 6h or 1d")),
        };
        Ok(HumanDuration(Duration::from_millis(n * ms)))
    }
}

impl fmt::Display for HumanDuration {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let ms = self.0.as_millis();
        let (n, unit) = match ms {
            0 => (0, "s"),
            _ if ms % 86_400_000 == 0 => (ms / 86_400_000, "d"),
            _ if ms % 3_600_000 == 0 => (ms / 3_600_000, "h"),
            _ if ms % 60_000 == 0 => (ms / 60_000, "m"),
            _ if ms % 1_000 == 0 => (ms / 1_000, "s"),
            _ => (ms, "ms"),
        };
        write!(f, "{n}{unit}")
    }
}

impl Serialize for HumanDuration {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_string())
    }
}

impl<'de> Deserialize<'de> for HumanDuration {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let text = String::deserialize(d)?;
        HumanDuration::parse(&text).map_err(serde::de::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_unit_parses_and_prints_back() {
        for (text, ms) in [("500ms", 500), ("10s", 10_000), ("5m", 300_000), ("6h", 21_600_000), ("1d", 86_400_000)] {
            let d = HumanDuration::parse(text).unwrap();
            assert_eq!(d.as_millis(), ms);
            assert_eq!(d.to_string(), text);
        }
    }

    #[test]
    fn numbers_without_units_are_refused() {
        assert!(HumanDuration::parse("10").is_err());
        assert!(HumanDuration::parse("ten s").is_err());
        assert!(HumanDuration::parse("10 parsecs").is_err());
    }
}
