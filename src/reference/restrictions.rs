//! Last-digit restriction rules (尾号限行), `restrictions.toml`:
//!
//! ```toml
//! [[rules]]
//! id = "core-weekday"
//! hours = [7, 20]                 # local hours, [start, end)
//! regions = ["R1"]                # the zone: regions and/or checkpoints
//! checkpoints = []
//! exempt_colors = [5, 6]          # plate colour codes (green new-energy plates)
//! exempt_types = ["23", "24"]     # plate types (police)
//! non_local_only = false
//! [rules.weekdays]
//! mon = [1, 6]
//! tue = [2, 7]
//!
//! [calendar]
//! holidays = ["2026-10-01"]                 # no restriction
//! working_weekends = { "2026-09-27" = "mon" } # follows that weekday's rule
//! ```

use super::{Checkpoint, CheckpointIds, ReferenceError, Region};
use crate::model::{Plate, PlateColor};
use chrono::{Datelike, NaiveDate};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::Path;

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Weekday {
    Mon,
    Tue,
    Wed,
    Thu,
    Fri,
    Sat,
    Sun,
}

impl Weekday {
    pub fn of(date: NaiveDate) -> Weekday {
        [Weekday::Mon, Weekday::Tue, Weekday::Wed, Weekday::Thu, Weekday::Fri, Weekday::Sat, Weekday::Sun]
            [date.weekday().num_days_from_monday() as usize]
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestrictionRules {
    #[serde(default)]
    pub rules: Vec<RestrictionRule>,
    #[serde(default)]
    pub calendar: Calendar,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RestrictionRule {
    pub id: String,
    #[serde(default)]
    pub name: String,
    /// Local hours `[start, end)`.
    pub hours: [u8; 2],
    #[serde(default)]
    pub regions: Vec<String>,
    #[serde(default)]
    pub checkpoints: Vec<String>,
    #[serde(default)]
    pub exempt_colors: Vec<u8>,
    #[serde(default)]
    pub exempt_types: Vec<String>,
    #[serde(default)]
    pub non_local_only: bool,
    pub weekdays: BTreeMap<Weekday, Vec<u8>>,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Calendar {
    #[serde(default)]
    pub holidays: Vec<NaiveDate>,
    #[serde(default)]
    pub working_weekends: BTreeMap<NaiveDate, Weekday>,
}

impl RestrictionRules {
    pub fn read(
        file: &Path,
        regions: &[Region],
        checkpoints: &CheckpointIds,
    ) -> Result<RestrictionRules, ReferenceError> {
        let err = |message: String| ReferenceError::File { file: file.to_owned(), message };
        let text = std::fs::read_to_string(file).map_err(|e| err(e.to_string()))?;
        let rules: RestrictionRules =
            toml::from_str(&text).map_err(|e| err(e.to_string().trim_end().replace('\n', " ")))?;
        rules.check(regions, checkpoints).map_err(|m| err(m))?;
        Ok(rules)
    }

    fn check(&self, regions: &[Region], checkpoints: &CheckpointIds) -> Result<(), String> {
        for rule in &self.rules {
            let [start, end] = rule.hours;
            if start >= end || end > 24 {
                return Err(format!("rule `{}`: hours must be [start, end) within 0-24", rule.id));
            }
            if let Some(d) = rule.weekdays.values().flatten().find(|d| **d > 9) {
                return Err(format!("rule `{}`: digit {d} is not 0-9", rule.id));
            }
            if let Some(r) = rule.regions.iter().find(|r| !regions.iter().any(|x| &*x.id == r.as_str())) {
                return Err(format!("rule `{}`: unknown region `{r}`", rule.id));
            }
            if let Some(c) = rule.checkpoints.iter().find(|c| !checkpoints.contains_key(c.as_str())) {
                return Err(format!("rule `{}`: unknown checkpoint `{c}`", rule.id));
            }
        }
        Ok(())
    }

    /// Which weekday's rules apply on a date: none on holidays, the named weekday on working
    /// weekends, else the date's own weekday.
    pub fn effective_weekday(&self, date: NaiveDate) -> Option<Weekday> {
        if self.calendar.holidays.contains(&date) {
            return None;
        }
        Some(self.calendar.working_weekends.get(&date).copied().unwrap_or_else(|| Weekday::of(date)))
    }
}

impl RestrictionRule {
    /// The digits this rule restricts on a date (empty when it does not apply).
    pub fn digits_on(&self, rules: &RestrictionRules, date: NaiveDate) -> &[u8] {
        rules.effective_weekday(date).and_then(|w| self.weekdays.get(&w)).map_or(&[], Vec::as_slice)
    }

    /// Whether the rule restricts this vehicle on this date (digit, exemptions, non-local-only),
    /// wherever and whenever it drives.
    pub fn restricts(&self, rules: &RestrictionRules, date: NaiveDate, vehicle: &RestrictedVehicle<'_>) -> bool {
        let Some(digit) = vehicle.plate.last_digit() else { return false };
        self.digits_on(rules, date).contains(&digit)
            && !self.exempt_colors.contains(&vehicle.color.code())
            && !self.exempt_types.iter().any(|t| t == vehicle.plate_type)
            && !(self.non_local_only && vehicle.local)
    }

    /// Whether a checkpoint lies in the rule's zone.
    pub fn covers(&self, checkpoint: &Checkpoint) -> bool {
        self.regions.iter().any(|r| r.as_str() == &*checkpoint.region_id)
            || self.checkpoints.iter().any(|c| c.as_str() == &*checkpoint.id)
    }

    /// Whether a local time of day (hours, fractional) falls in the rule's hours.
    pub fn in_hours(&self, local_hour: f64) -> bool {
        (f64::from(self.hours[0])..f64::from(self.hours[1])).contains(&local_hour)
    }
}

/// What a restriction rule looks at of a vehicle.
pub struct RestrictedVehicle<'a> {
    pub plate: &'a Plate,
    pub color: PlateColor,
    pub plate_type: &'a str,
    /// Whether the plate is one of the city's own prefixes.
    pub local: bool,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn rules(text: &str) -> Result<RestrictionRules, ReferenceError> {
        let regions = vec![Region { id: "R1".into(), name: "core".into() }];
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("restrictions.toml");
        std::fs::write(&file, text).unwrap();
        RestrictionRules::read(&file, &regions, &CheckpointIds::default())
    }

    const SAMPLE: &str = r#"
[[rules]]
id = "core"
hours = [7, 20]
regions = ["R1"]
exempt_colors = [5]
[rules.weekdays]
mon = [1, 6]
sat = []
[calendar]
holidays = ["2026-10-01"]
working_weekends = { "2026-09-27" = "mon" }
"#;

    #[test]
    fn holidays_lift_and_working_weekends_borrow_a_rule() {
        let r = rules(SAMPLE).unwrap();
        let rule = &r.rules[0];
        let monday = NaiveDate::from_ymd_opt(2026, 9, 28).unwrap();
        assert_eq!(rule.digits_on(&r, monday), &[1, 6]);
        let sunday_worked = NaiveDate::from_ymd_opt(2026, 9, 27).unwrap();
        assert_eq!(rule.digits_on(&r, sunday_worked), &[1, 6]);
        let holiday = NaiveDate::from_ymd_opt(2026, 10, 1).unwrap();
        assert!(rule.digits_on(&r, holiday).is_empty());
    }

    #[test]
    fn errors_name_the_file_and_the_problem() {
        let bad_region = SAMPLE.replace("[\"R1\"]", "[\"R9\"]");
        let err = rules(&bad_region).unwrap_err().to_string();
        assert!(err.contains("restrictions.toml") && err.contains("unknown region `R9`"), "{err}");
        let unknown_key = SAMPLE.replace("exempt_colors", "exempt_colours");
        let err = rules(&unknown_key).unwrap_err().to_string();
        assert!(err.contains("exempt_colours"), "{err}");
        let bad_hours = SAMPLE.replace("[7, 20]", "[20, 7]");
        assert!(rules(&bad_hours).unwrap_err().to_string().contains("hours"));
    }
}
