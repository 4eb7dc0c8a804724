//! Checks a decoded record against the city's reference data and the clock.

use crate::model::{Pass, PassRecord, PlateColorScheme, RejectReason};
use crate::reference::City;
use chrono_tz::Tz;
use std::sync::Arc;

pub struct Validator {
    city: Arc<City>,
    tz: Tz,
    colors: PlateColorScheme,
    max_clock_skew_ms: i64,
}

impl Validator {
    pub fn new(city: Arc<City>, tz: Tz, colors: PlateColorScheme, max_clock_skew_ms: i64) -> Validator {
        Validator { city, tz, colors, max_clock_skew_ms }
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    pub fn colors(&self) -> PlateColorScheme {
        self.colors
    }

    /// Resolves the checkpoint and checks the time against `now_ms` (when there is a clock).
    pub fn validate(&self, record: PassRecord, now_ms: Option<i64>) -> Result<Pass, RejectReason> {
        let checkpoint = self.city.checkpoint_idx(&record.checkpoint).ok_or(RejectReason::UnknownCheckpoint)?;
        if now_ms.is_some_and(|now| record.ts.ms() > now + self.max_clock_skew_ms) {
            return Err(RejectReason::FutureTimestamp);
        }
        Ok(record.at(checkpoint))
    }
}
