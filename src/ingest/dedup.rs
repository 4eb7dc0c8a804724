//! Deduplication by `pass_id` within the lateness horizon: the first copy stands; an identical
//! resend is dropped, a resend with other content is a `conflicting_duplicate`.

use crate::model::Text;
use rustc_hash::FxHashMap;
use std::collections::hash_map::Entry;
use std::collections::BTreeMap;

/// Entries are grouped by the minute of their event time, so expiry drops whole minutes.
const BUCKET_MS: i64 = 60_000;

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum DedupVerdict {
    First,
    Identical,
    Conflicting,
}

/// The deduplication state behind one interface, in memory ([`Deduplicator`]) or in RocksDB
/// (`RocksDedup`), chosen by `state.backend`.
pub trait DedupBackend: Send {
    /// Judges a batch of (pass id, content digest, event time), in order.
    fn check_batch(&mut self, items: &[(Text, u64, i64)]) -> Vec<DedupVerdict>;

    /// The state's part of checkpoint `id`: bytes for the checkpoint, and writes to apply
    /// atomically with it.
    fn checkpoint(&mut self, id: u64) -> anyhow::Result<(Vec<u8>, Vec<crate::core::StateWrite>)>;

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()>;

    /// Checkpoint `id` is durable: what it wrote no longer needs holding in memory.
    fn committed(&mut self, _id: u64) {}

    /// Every remembered id, in the portable form savepoints carry.
    fn export(&mut self) -> anyhow::Result<Vec<u8>>;

    /// Ids held in memory waiting for the next checkpoint.
    fn pending(&self) -> usize;
}

/// Tag of the portable form: every id listed.
const FULL: u8 = 0;

/// Remembers the pass ids seen within the horizon behind the latest event time.
pub struct Deduplicator {
    horizon_ms: i64,
    seen: FxHashMap<Text, u64>,
    by_minute: BTreeMap<i64, Vec<Text>>,
    max_ts: i64,
}

impl Deduplicator {
    /// `horizon_ms`: how far behind the latest event time ids are remembered (the allowed
    /// lateness plus the out-of-orderness).
    pub fn new(horizon_ms: i64) -> Deduplicator {
        Deduplicator { horizon_ms, seen: FxHashMap::default(), by_minute: BTreeMap::new(), max_ts: i64::MIN }
    }

    pub fn check(&mut self, pass_id: &Text, digest: u64, ts: i64) -> DedupVerdict {
        match self.seen.entry(pass_id.clone()) {
            Entry::Occupied(first) if *first.get() == digest => return DedupVerdict::Identical,
            Entry::Occupied(_) => return DedupVerdict::Conflicting,
            Entry::Vacant(slot) => {
                slot.insert(digest);
            }
        }
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

    /// The remembered ids as bytes: per minute bucket, its ids with their content digests.
    pub fn snapshot(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(17 + self.seen.len() * 32);
        out.push(FULL);
        out.extend_from_slice(&self.max_ts.to_le_bytes());
        for (bucket, ids) in &self.by_minute {
            out.extend_from_slice(&bucket.to_le_bytes());
            out.extend_from_slice(&(ids.len() as u32).to_le_bytes());
            for id in ids {
                let digest = self.seen.get(id).copied().unwrap_or_default();
                out.extend_from_slice(&(id.len() as u32).to_le_bytes());
                out.extend_from_slice(id.as_bytes());
                out.extend_from_slice(&digest.to_le_bytes());
            }
        }
        out
    }

    /// Restores what [`Deduplicator::snapshot`] wrote.
    pub fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        match bytes.first() {
            Some(&FULL) => {}
            Some(1) => anyhow::bail!(
                "this checkpoint keeps its deduplication state in RocksDB: run with state.backend = \"rocksdb\""
            ),
            _ => anyhow::bail!("deduplication state is unreadable"),
        }
        let mut r = Reader { bytes, at: 1 };
        self.seen.clear();
        self.by_minute.clear();
        self.max_ts = r.i64()?;
        while !r.done() {
            let bucket = r.i64()?;
            let n = r.u32()?;
            let ids = self.by_minute.entry(bucket).or_default();
            for _ in 0..n {
                let len = r.u32()? as usize;
                let id: Text = std::str::from_utf8(r.take(len)?)?.into();
                let digest = r.u64()?;
                self.seen.insert(id.clone(), digest);
                ids.push(id);
            }
        }
        Ok(())
    }

    /// Every remembered id with its digest and minute bucket start.
    pub fn entries(&self) -> impl Iterator<Item = (Text, u64, i64)> + '_ {
        self.by_minute.iter().flat_map(move |(bucket, ids)| {
            ids.iter().map(move |id| (id.clone(), self.seen.get(id).copied().unwrap_or_default(), bucket * BUCKET_MS))
        })
    }

    pub fn max_ts(&self) -> i64 {
        self.max_ts
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

impl DedupBackend for Deduplicator {
    fn check_batch(&mut self, items: &[(Text, u64, i64)]) -> Vec<DedupVerdict> {
        items.iter().map(|(id, digest, ts)| self.check(id, *digest, *ts)).collect()
    }

    fn checkpoint(&mut self, _id: u64) -> anyhow::Result<(Vec<u8>, Vec<crate::core::StateWrite>)> {
        Ok((self.snapshot(), Vec::new()))
    }

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        Deduplicator::restore(self, bytes)
    }

    fn export(&mut self) -> anyhow::Result<Vec<u8>> {
        Ok(self.snapshot())
    }

    fn pending(&self) -> usize {
        0
    }
}

struct Reader<'a> {
    bytes: &'a [u8],
    at: usize,
}

impl<'a> Reader<'a> {
    fn done(&self) -> bool {
        self.at >= self.bytes.len()
    }

    fn take(&mut self, n: usize) -> anyhow::Result<&'a [u8]> {
        let end = self
            .at
            .checked_add(n)
            .filter(|e| *e <= self.bytes.len())
            .ok_or_else(|| anyhow::anyhow!("deduplication state is truncated"))?;
        let out = &self.bytes[self.at..end];
        self.at = end;
        Ok(out)
    }

    fn u32(&mut self) -> anyhow::Result<u32> {
        Ok(u32::from_le_bytes(self.take(4)?.try_into()?))
    }

    fn u64(&mut self) -> anyhow::Result<u64> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into()?))
    }

    fn i64(&mut self) -> anyhow::Result<i64> {
        Ok(i64::from_le_bytes(self.take(8)?.try_into()?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_copy_stands_and_resends_are_judged_by_content() {
        let mut d = Deduplicator::new(3_600_000);
        let id: Text = "p1".into();
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::First);
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::Identical);
        assert_eq!(d.check(&id, 8, 1_000), DedupVerdict::Conflicting);
        assert_eq!(d.check(&id, 7, 1_000), DedupVerdict::Identical);
    }

    #[test]
    fn a_snapshot_restores_every_remembered_id() {
        let mut d = Deduplicator::new(3_600_000);
        for (i, id) in ["a", "b", "长ID"].iter().enumerate() {
            d.check(&Text::from(*id), i as u64, i as i64 * 70_000);
        }
        let mut e = Deduplicator::new(3_600_000);
        e.restore(&d.snapshot()).unwrap();
        assert_eq!(e.len(), 3);
        assert_eq!(e.check(&"长ID".into(), 2, 140_000), DedupVerdict::Identical);
        assert_eq!(e.check(&"a".into(), 9, 0), DedupVerdict::Conflicting);
        assert_eq!(e.snapshot(), {
            let mut d2 = d;
            d2.check(&"长ID".into(), 2, 140_000);
            d2.check(&"a".into(), 9, 0);
            d2.snapshot()
        });
        assert!(e.restore(&[1, 2, 3]).is_err());
    }

    #[test]
    fn ids_older_than_the_horizon_are_forgotten() {
        let mut d = Deduplicator::new(600_000);
        let old: Text = "old".into();
        d.check(&old, 1, 0);
        d.check(&"mid".into(), 1, 500_000);
        assert_eq!(d.len(), 2);
        d.check(&"new".into(), 1, 1_000_000);
        assert_eq!(d.len(), 2, "the id at t=0 is more than 10 min behind");
        assert_eq!(d.check(&old, 1, 0), DedupVerdict::First);
    }
}
