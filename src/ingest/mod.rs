//! From raw bytes to valid passes: decode, validate against the city and the clock, and drop
//! duplicates. Whatever fails becomes a [`DeadLetter`] with its reason; nothing here can stop
//! the stream.

mod dedup;
mod rocks_dedup;
mod validate;

pub use dedup::{DedupBackend, DedupVerdict, Deduplicator};
pub use rocks_dedup::{parse_value as parse_dedup_value, RocksDedup, ID_PREFIX as DEDUP_ID_PREFIX};
pub use validate::{Judged, Validator};

use crate::model::{Pass, RejectReason, Text};
use std::collections::BTreeMap;

/// A record that could not be accepted, with the reason and the record as it came.
#[derive(Clone, Debug, PartialEq)]
pub struct DeadLetter {
    /// Stable id of the record's place in its source (`file:line`, `sim:seq`,
    /// `kafka:partition:offset`, with partition 0 left out), so that a replay writes the same
    /// row again instead of a second one.
    pub id: String,
    pub reason: RejectReason,
    pub record: String,
    pub received_at: i64,
}

/// What became of one record.
#[derive(Debug)]
pub enum Outcome {
    Valid(Pass),
    Duplicate,
    Rejected(RejectReason),
}

/// What became of one record admitted into a batch of passes ([`Ingest::admit_into`]): a valid
/// one is the batch's last pass.
#[derive(Debug)]
pub enum Admitted {
    Valid,
    Duplicate,
    Rejected(RejectReason),
}

/// Counts of what ingestion saw.
#[derive(Clone, Debug, Default, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct IngestStats {
    pub records: u64,
    pub valid: u64,
    pub duplicates: u64,
    pub unreadable_plates: u64,
    pub dead_letters: BTreeMap<String, u64>,
    /// Valid passes late for at least one window (counted by the engine).
    #[serde(default)]
    pub late: u64,
}

impl IngestStats {
    pub fn invalid(&self) -> u64 {
        self.dead_letters.values().sum()
    }

    /// Counts a record; a valid one is the last of `passes`.
    fn count(&mut self, admitted: &Admitted, passes: &[Pass]) {
        self.records += 1;
        match admitted {
            Admitted::Valid => {
                self.valid += 1;
                self.unreadable_plates += u64::from(passes.last().is_some_and(|p| p.plate.plate().is_none()));
            }
            Admitted::Duplicate => self.duplicates += 1,
            Admitted::Rejected(reason) => *self.dead_letters.entry(reason.code()).or_default() += 1,
        }
    }
}

/// Decode → validate → deduplicate, with counts.
pub struct Ingest {
    validator: Validator,
    dedup: Box<dyn DedupBackend>,
    pub stats: IngestStats,
}

impl Ingest {
    pub fn new(validator: Validator, dedup: impl DedupBackend + 'static) -> Ingest {
        Ingest { validator, dedup: Box::new(dedup), stats: IngestStats::default() }
    }

    pub fn dedup_mut(&mut self) -> &mut dyn DedupBackend {
        &mut *self.dedup
    }

    pub fn dedup_pending(&self) -> usize {
        self.dedup.pending()
    }

    /// Takes one raw record. `now_ms` is the clock that `future_timestamp` is judged against
    /// (the wall clock live, `--now` in a replay, `None` for no check).
    pub fn accept(&mut self, raw: &[u8], now_ms: Option<i64>) -> Outcome {
        self.accept_batch(&[raw], now_ms).pop().expect("one outcome per record")
    }

    /// Takes a batch of raw records; the deduplication state is consulted once for all.
    pub fn accept_batch(&mut self, raws: &[&[u8]], now_ms: Option<i64>) -> Vec<Outcome> {
        let mut judged = Vec::with_capacity(raws.len());
        self.validator.judge_all(raws.iter().copied(), now_ms, &mut judged);
        let (mut passes, mut admitted) = (Vec::new(), Vec::with_capacity(judged.len()));
        self.admit_into(&mut judged, &mut passes, |_, a, _| admitted.push(a));
        let mut passes = passes.into_iter();
        admitted
            .into_iter()
            .map(|a| match a {
                Admitted::Valid => Outcome::Valid(passes.next().expect("a pass for every valid record")),
                Admitted::Duplicate => Outcome::Duplicate,
                Admitted::Rejected(reason) => Outcome::Rejected(reason),
            })
            .collect()
    }

    /// A validator for judging records elsewhere (another thread) before [`Ingest::admit_into`].
    pub fn validator(&self) -> &Validator {
        &self.validator
    }

    /// Deduplicates the records judged in `judged`, emptying it (its room is kept for the next
    /// batch), and counts them; each valid pass is moved onto `passes` (once: a pass is some
    /// 150 bytes, and handed on by value it would be copied at every step). `each` is told, in
    /// order, every record's place in the batch and what became of it, with `passes` so far.
    pub fn admit_into(
        &mut self,
        judged: &mut Vec<Judged>,
        passes: &mut Vec<Pass>,
        mut each: impl FnMut(usize, Admitted, &[Pass]),
    ) {
        let keys: Vec<(Text, u64, i64)> =
            judged.iter().filter_map(|j| j.as_ref().ok()).map(|(p, d)| (p.pass_id.clone(), *d, p.ts.ms())).collect();
        let mut verdicts = self.dedup.check_batch(&keys).into_iter();
        for (i, j) in judged.drain(..).enumerate() {
            let admitted = match j {
                Err(reason) => Admitted::Rejected(reason),
                Ok((pass, _)) => match verdicts.next() {
                    Some(DedupVerdict::Identical) => Admitted::Duplicate,
                    Some(DedupVerdict::Conflicting) => Admitted::Rejected(RejectReason::ConflictingDuplicate),
                    _ => {
                        passes.push(pass);
                        Admitted::Valid
                    }
                },
            };
            self.stats.count(&admitted, passes);
            each(i, admitted, passes);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PlateColorScheme;
    use crate::simulator::sample_city;

    const LINE: &str = r#"{"pass_id":"p1","plate":"赣A12345","plate_color":2,"plate_type":"02","checkpoint_id":"KK0001","direction":2,"lane":1,"ts":1772409600000}"#;

    fn ingest() -> Ingest {
        let validator = Validator::new(
            std::sync::Arc::new(sample_city()),
            chrono_tz::Asia::Shanghai,
            PlateColorScheme::Police,
            300_000,
        );
        Ingest::new(validator, Deduplicator::new(3_600_000))
    }

    fn reason(outcome: Outcome) -> String {
        match outcome {
            Outcome::Rejected(r) => r.code(),
            other => format!("{other:?}"),
        }
    }

    #[test]
    fn an_unknown_checkpoint_is_rejected() {
        assert_eq!(reason(ingest().accept(LINE.replace("KK0001", "KK9999").as_bytes(), None)), "unknown_checkpoint");
    }

    #[test]
    fn a_time_beyond_the_allowed_skew_is_in_the_future_only_with_a_clock() {
        let now = 1_772_409_600_000 - 300_001;
        assert_eq!(reason(ingest().accept(LINE.as_bytes(), Some(now))), "future_timestamp");
        assert!(matches!(ingest().accept(LINE.as_bytes(), Some(now + 1)), Outcome::Valid(_)));
        assert!(matches!(ingest().accept(LINE.as_bytes(), None), Outcome::Valid(_)));
    }

    #[test]
    fn a_batch_is_judged_as_each_record_alone_digests_included() {
        let lines: Vec<String> = (0..11)
            .map(|i| {
                let line = LINE.replace("\"p1\"", &format!("\"p{}\"", "1".repeat(i + 1)));
                if i == 6 {
                    line.replace("KK0001", "KK9999")
                } else {
                    line.replace("12345", &format!("1234{i}"))
                }
            })
            .collect();
        let validator = ingest().validator().clone();
        let mut judged = Vec::new();
        validator.judge_all(lines.iter().map(|l| l.as_bytes()), None, &mut judged);
        assert_eq!(judged.len(), lines.len());
        for (line, judged) in lines.iter().zip(&judged) {
            let record = crate::model::decode_record(line.as_bytes(), validator.tz(), validator.colors()).unwrap();
            match judged {
                Ok((pass, digest)) => {
                    assert_eq!(*digest, record.content_digest(), "{line}");
                    assert_eq!(pass.pass_id, record.pass_id);
                }
                Err(reason) => {
                    assert_eq!((reason.code(), &*record.checkpoint), ("unknown_checkpoint".into(), "KK9999"))
                }
            }
        }
    }

    #[test]
    fn resends_are_dropped_when_identical_and_dead_lettered_when_different() {
        let mut i = ingest();
        assert!(matches!(i.accept(LINE.as_bytes(), None), Outcome::Valid(_)));
        let aliased =
            LINE.replace("\"pass_id\"", "\"GCXH\"").replace("\"ts\":1772409600000", "\"ts\":\"2026-03-02 08:00:00\"");
        assert!(matches!(i.accept(aliased.as_bytes(), None), Outcome::Duplicate), "same content, other spelling");
        assert_eq!(reason(i.accept(LINE.replace("12345", "12845").as_bytes(), None)), "conflicting_duplicate");
        assert_eq!((i.stats.records, i.stats.valid, i.stats.duplicates, i.stats.invalid()), (3, 1, 1, 1));
    }
}
