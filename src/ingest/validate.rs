//! Checks a decoded record against the city's reference data and the clock.

use crate::model::{Pass, PassRecord, PlateColorScheme, RejectReason};
use crate::reference::City;
use chrono_tz::Tz;
use std::sync::Arc;

/// A record decoded and validated: the pass and its content digest, or why it is not one.
pub type Judged = Result<(Pass, u64), RejectReason>;

#[derive(Clone)]
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

    /// Decodes and validates raw records, appending to `out`, in order, each one's pass with its
    /// content digest, or the reason it is not one. Stateless, so it can run on another thread
    /// than the engine. The digests are computed once the batch is decoded, several side by
    /// side.
    pub fn judge_all<'r>(&self, raws: impl IntoIterator<Item = &'r [u8]>, now_ms: Option<i64>, out: &mut Vec<Judged>) {
        let from = out.len();
        out.extend(raws.into_iter().map(|raw| {
            let record = crate::model::decode_record(raw, self.tz, self.colors)?;
            self.validate(record, now_ms).map(|pass| (pass, 0))
        }));
        // A valid pass's checkpoint id is the one its record gave: it was looked up exactly.
        let valid = out[from..].iter_mut().filter_map(|judged| judged.as_mut().ok());
        crate::model::fill_digests(valid, |checkpoint| self.city.checkpoint(*checkpoint).id.as_bytes());
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
