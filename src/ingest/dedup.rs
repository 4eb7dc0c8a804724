//! Deduplication by `pass_id` within the lateness horizon: the first copy stands; an identical
//! resend is dropped, a resend with other content is a `conflicting_duplicate`.

use rustc_hash::FxHashMap;
use std::collections::BTreeMap;
use std::sync::Arc;

/// Entries are grouped by the minute of their event time, so expiry drops whole minutes.
const BUCKET_MS: i64 = 60_000;

#[derive(Debug, PartialEq, Eq)]
pub enum DedupVerdict {
    First,
    Identical,
    Conflicting,
}

/// Remembers the pass ids seen within the horizon behind the latest event time.
pub struct Deduplicator {
    horizon_ms: i64,
    seen: FxHashMap<Arc<str>, u64>,
    by_minute: BTreeMap<i64, Vec<Arc<str>>>,
    max_ts: i64,
}

impl Deduplicator {
    /// `horizon_ms`: how far behind the latest event time ids are remembered (the allowed
    /// lateness plus the out-of-orderness).
    pub fn new(horizon_ms: i64) -> Deduplicator {
        Deduplicator { horizon_ms, seen: FxHashMap::default(), by_minute: BTreeMap::new(), max_ts: i64::MIN }
    }

    pub fn check(&mut self, pass_id: &Arc<str>, digest: u64, ts: i64) -> DedupVerdict {
        if let Some(first) = self.seen.get(pass_id) {
            return if *first == digest { DedupVerdict::Identical } else { DedupVerdict::Conflicting };
        }
        self.seen.insert(pass_id.clone(), digest);
        self.by_minute.entry(ts.div_euclid(BUCKET_MS)).or_default().push(pass_id.clone());
        if ts > self.max_ts {
            self.max_ts = ts;
            self.expire();
        }
        DedupVerdict::First
    }

    /// How many ids are remembered now.
    pub fn len(&self) -> usize {
        self.seen.len()
    }

    pub fn is_empty(&self) -> bool {
        self.seen.is_empty()
    }

    fn expire(&mut self) {
        let oldest_kept = (self.max_ts - self.horizon_ms).div_euclid(BUCKET_MS);
        while let Some(entry) = self.by_minute.first_entry() {
            if *entry.key() >= oldest_kept {
                break;
            }
            for id in entry.remove() {
                self.seen.remove(&id);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_copy_stands_and_resends_are_judged_by_content() {
        let mut d = Deduplicator::new(3_600_000);
        let id: Arc<str> = "p1".into();
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::First);
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::Identical);
        assert_eq!(d.check(&id, 8, 1_000), DedupVerdict::Conflicting);
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::Identical);
    }

    #[test]
    fn ids_older_than_the_horizon_are_forgotten() {
        let mut d = Deduplicator::new(600_000);
        let old: Arc<str> = "old".into();
        d.check(&old, 1, 0);
        d.check(&"mid".into(), 1, 500_000);
        assert_eq!(d.len(), 2);
        d.check(&"new".into(), 1, 1_000_000);
        assert_eq!(d.len(), 2, "the id at t=0 is more than 10 min behind");
        assert_eq!(d.check(&old, 1, 0), DedupVerdict::First);
    }
}
