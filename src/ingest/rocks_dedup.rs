//! Deduplication state in RocksDB, for ids beyond what memory should hold: the ids seen since
//! the last checkpoint stay in memory (the hot set), the rest are read from RocksDB in batches
//! (bloom filters answer most misses). Pending ids reach RocksDB in the same atomic write as
//! the checkpoint they belong to, so the stored set always matches the newest checkpoint.
//! Each stored id carries its event time: one older than the horizon reads as absent, and
//! compaction drops it (`crate::core::checkpoint::state_options` installs the filter), so the
//! set stays bounded without an index to maintain.
//!
//! A pass id is looked up in RocksDB only when it may be there: memory holds a 64-bit hash of
//! every id within the horizon ([`IdHashes`], about 30 bytes an id), and an id whose hash is
//! not there has not been seen. Almost every pass is new, so almost no pass costs a read.

use super::dedup::{DedupBackend, DedupVerdict, Deduplicator};
use crate::core::StateWrite;
use rocksdb::DB;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

pub const ID_PREFIX: &[u8] = b"dedup/id/";
const COMMITTED_KEY: &[u8] = b"dedup/committed";
/// Ids a scratch database takes at a time.
const AUTOFLUSH: usize = 200_000;
/// The hashes of ids are grouped by the minute of their event time, so expiry drops whole
/// minutes.
const HASH_BUCKET_MS: i64 = 60_000;

/// The hashes of every id stored or pending within the horizon: a filter with no false
/// negatives (an id whose hash is absent is new) and rare false positives (two ids with one
/// hash, settled by a read). Ids of the same hash are counted, so expiring one keeps the other.
#[derive(Default)]
struct IdHashes {
    count: FxHashMap<u64, u32>,
    by_minute: std::collections::BTreeMap<i64, Vec<u64>>,
}

impl IdHashes {
    fn hash(id: &str) -> u64 {
        crate::model::fnv1a64(id.as_bytes())
    }

    fn may_hold(&self, hash: u64) -> bool {
        self.count.contains_key(&hash)
    }

    fn insert(&mut self, hash: u64, ts: i64) {
        *self.count.entry(hash).or_default() += 1;
        self.by_minute.entry(ts.div_euclid(HASH_BUCKET_MS)).or_default().push(hash);
    }

    /// Forgets the minutes wholly before `oldest_kept` (ids there read as absent anyway).
    fn expire(&mut self, oldest_kept: i64) {
        while let Some(entry) = self.by_minute.first_entry() {
            if (*entry.key() + 1) * HASH_BUCKET_MS > oldest_kept {
                break;
            }
            for hash in entry.remove() {
                if let std::collections::hash_map::Entry::Occupied(mut n) = self.count.entry(hash) {
                    *n.get_mut() -= 1;
                    if *n.get() == 0 {
                        n.remove();
                    }
                }
            }
        }
    }

    /// The hashes of the ids stored in `db` from `oldest_kept` on.
    fn load(db: &DB, oldest_kept: i64) -> anyhow::Result<IdHashes> {
        let mut hashes = IdHashes::default();
        for item in db.prefix_iterator(ID_PREFIX) {
            let (key, v) = item?;
            if !key.starts_with(ID_PREFIX) {
                break;
            }
            if let Some((_, ts)) = parse_value(&v).filter(|(_, ts)| *ts >= oldest_kept) {
                hashes.insert(crate::model::fnv1a64(&key[ID_PREFIX.len()..]), ts);
            }
        }
        Ok(hashes)
    }
}

pub struct RocksDedup {
    db: Arc<DB>,
    /// Event time before which stored ids are expired (shared with the compaction filter).
    cutoff: Arc<AtomicI64>,
    /// A scratch database's folder, removed with it.
    _scratch: Option<tempfile::TempDir>,
    horizon_ms: i64,
    /// Ids accepted since the last commit: (digest, ts).
    pending: FxHashMap<Arc<str>, (u64, i64)>,
    max_ts: i64,
    /// Without checkpoints: write pending ids through once there are this many.
    autoflush: Option<usize>,
    /// Which ids may be stored or pending.
    hashes: IdHashes,
}

fn id_key(id: &str) -> Vec<u8> {
    [ID_PREFIX, id.as_bytes()].concat()
}

fn value(digest: u64, ts: i64) -> Vec<u8> {
    [digest.to_le_bytes(), ts.to_le_bytes()].concat()
}

/// (digest, ts) of a stored value.
pub fn parse_value(v: &[u8]) -> Option<(u64, i64)> {
    Some((u64::from_le_bytes(v.get(..8)?.try_into().ok()?), i64::from_le_bytes(v.get(8..16)?.try_into().ok()?)))
}

impl RocksDedup {
    /// `autoflush`: for runs without checkpoints, write ids through after this many. Ids
    /// already in `db` are read once, for their hashes.
    pub fn new(
        db: Arc<DB>,
        cutoff: Arc<AtomicI64>,
        horizon_ms: i64,
        autoflush: Option<usize>,
    ) -> anyhow::Result<RocksDedup> {
        let hashes = IdHashes::load(&db, i64::MIN)?;
        Ok(RocksDedup {
            db,
            cutoff,
            _scratch: None,
            horizon_ms,
            pending: FxHashMap::default(),
            max_ts: i64::MIN,
            autoflush,
            hashes,
        })
    }

    /// Ids with an event time before this are expired.
    fn oldest_kept(&self) -> i64 {
        self.max_ts.saturating_sub(self.horizon_ms)
    }

    /// A throw-away database for runs without checkpoints; ids are written through in batches.
    pub fn scratch(horizon_ms: i64) -> anyhow::Result<RocksDedup> {
        let dir = tempfile::Builder::new().prefix("passflow-state-").tempdir()?;
        let cutoff = Arc::new(AtomicI64::new(i64::MIN));
        let db = crate::core::checkpoint::open_state_db(dir.path(), cutoff.clone())?;
        let mut dedup = RocksDedup::new(Arc::new(db), cutoff, horizon_ms, Some(AUTOFLUSH))?;
        dedup._scratch = Some(dir);
        Ok(dedup)
    }

    /// The writes that persist the pending ids; pending is emptied and the expiry moves on.
    fn drain_writes(&mut self) -> Vec<StateWrite> {
        let oldest_kept = self.oldest_kept();
        self.cutoff.fetch_max(oldest_kept, Ordering::Relaxed);
        let mut pending: Vec<(Arc<str>, (u64, i64))> = self.pending.drain().collect();
        // Sorted, the memtable inserts each key next to the one before (much cheaper).
        pending.sort_unstable_by(|a, b| a.0.cmp(&b.0));
        pending
            .into_iter()
            .filter(|(_, (_, ts))| *ts >= oldest_kept)
            .map(|(id, (digest, ts))| StateWrite::Put(id_key(&id), value(digest, ts)))
            .collect()
    }

    /// Digests of stored ids that are still within the horizon.
    fn lookup(&self, ids: &[&Arc<str>]) -> Vec<Option<u64>> {
        let mut keys: Vec<(usize, Vec<u8>)> = ids.iter().map(|id| id_key(id)).enumerate().collect();
        keys.sort_unstable_by(|a, b| a.1.cmp(&b.1));
        let oldest_kept = self.oldest_kept();
        let found: Vec<Result<Option<Vec<u8>>, rocksdb::Error>> =
            match self.db.cf_handle(rocksdb::DEFAULT_COLUMN_FAMILY_NAME) {
                Some(cf) => self
                    .db
                    .batched_multi_get_cf(cf, keys.iter().map(|(_, k)| k), true)
                    .into_iter()
                    .map(|r| r.map(|v| v.map(|v| v.to_vec())))
                    .collect(),
                None => self.db.multi_get(keys.iter().map(|(_, k)| k)),
            };
        let mut out = vec![None; ids.len()];
        // A read error is treated as "not seen": the pass is kept rather than lost.
        for ((i, _), r) in keys.iter().zip(found) {
            out[*i] =
                r.ok().flatten().and_then(|v| parse_value(&v)).filter(|(_, ts)| *ts >= oldest_kept).map(|(d, _)| d);
        }
        out
    }
}

impl DedupBackend for RocksDedup {
    fn check_batch(&mut self, items: &[(Arc<str>, u64, i64)]) -> Vec<DedupVerdict> {
        let hashes: Vec<u64> = items.iter().map(|(id, _, _)| IdHashes::hash(id)).collect();
        // Only an id whose hash is known and that is not pending can be in RocksDB.
        let unknown: Vec<&Arc<str>> = items
            .iter()
            .zip(&hashes)
            .filter(|((id, _, _), hash)| self.hashes.may_hold(**hash) && !self.pending.contains_key(id))
            .map(|((id, _, _), _)| id)
            .collect();
        let stored: FxHashMap<&str, u64> = unknown
            .iter()
            .map(|id| &***id)
            .zip(self.lookup(&unknown))
            .filter_map(|(id, d)| d.map(|d| (id, d)))
            .collect();
        let mut verdicts = Vec::with_capacity(items.len());
        for ((id, digest, ts), hash) in items.iter().zip(hashes) {
            let first = self.pending.get(id).map(|(d, _)| *d).or_else(|| stored.get(&**id).copied());
            verdicts.push(match first {
                Some(d) if d == *digest => DedupVerdict::Identical,
                Some(_) => DedupVerdict::Conflicting,
                None => {
                    self.pending.insert(id.clone(), (*digest, *ts));
                    self.hashes.insert(hash, *ts);
                    self.max_ts = self.max_ts.max(*ts);
                    DedupVerdict::First
                }
            });
        }
        self.hashes.expire(self.oldest_kept());
        if self.autoflush.is_some_and(|n| self.pending.len() >= n) {
            let writes = self.drain_writes();
            // A scratch database needs no durability.
            if let Err(e) = crate::core::write_batch(&self.db, &writes, None, false) {
                tracing::error!(error = %e, "writing deduplication state to the scratch database failed");
            }
        }
        verdicts
    }

    fn checkpoint(&mut self, checkpoint_id: u64) -> anyhow::Result<(Vec<u8>, Vec<StateWrite>)> {
        // Pending ids stay in memory, and the expiry stays where it is, until the checkpoint is
        // durable (`committed`): a failed or abandoned checkpoint loses nothing.
        let oldest_kept = self.oldest_kept();
        let mut pending: Vec<(&Arc<str>, &(u64, i64))> =
            self.pending.iter().filter(|(_, (_, ts))| *ts >= oldest_kept).collect();
        pending.sort_unstable_by(|a, b| a.0.cmp(b.0));
        let mut writes: Vec<StateWrite> =
            pending.into_iter().map(|(id, (digest, ts))| StateWrite::Put(id_key(id), value(*digest, *ts))).collect();
        writes.push(StateWrite::Put(COMMITTED_KEY.to_vec(), checkpoint_id.to_le_bytes().to_vec()));
        let mut marker = vec![1u8];
        marker.extend_from_slice(&checkpoint_id.to_le_bytes());
        marker.extend_from_slice(&self.max_ts.to_le_bytes());
        Ok((marker, writes))
    }

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.pending.clear();
        match bytes.first() {
            Some(1) if bytes.len() == 17 => {
                let id = u64::from_le_bytes(bytes[1..9].try_into()?);
                let committed = self.db.get(COMMITTED_KEY)?.and_then(|v| v.try_into().ok()).map(u64::from_le_bytes);
                anyhow::ensure!(
                    committed == Some(id),
                    "the deduplication state in RocksDB belongs to checkpoint {committed:?}, not {id}: it can only resume from that checkpoint"
                );
                self.max_ts = i64::from_le_bytes(bytes[9..17].try_into()?);
                self.hashes = IdHashes::load(&self.db, self.oldest_kept())?;
                Ok(())
            }
            // A full list (a savepoint, or a checkpoint of the in-memory backend): load it all.
            _ => {
                let mut memory = Deduplicator::new(self.horizon_ms);
                memory.restore(bytes)?;
                let mut writes = vec![StateWrite::DeleteRange(ID_PREFIX.to_vec(), b"dedup/id0".to_vec())];
                writes.extend(memory.entries().map(|(id, digest, ts)| StateWrite::Put(id_key(&id), value(digest, ts))));
                self.max_ts = memory.max_ts();
                crate::core::apply_writes(&self.db, &writes, None)?;
                self.hashes = IdHashes::load(&self.db, self.oldest_kept())?;
                Ok(())
            }
        }
    }

    fn export(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut memory = Deduplicator::new(self.horizon_ms);
        let oldest_kept = self.oldest_kept();
        for item in self.db.prefix_iterator(ID_PREFIX) {
            let (key, v) = item?;
            if !key.starts_with(ID_PREFIX) {
                break;
            }
            if let Some((digest, ts)) = parse_value(&v).filter(|(_, ts)| *ts >= oldest_kept) {
                memory.check(&std::str::from_utf8(&key[ID_PREFIX.len()..])?.into(), digest, ts);
            }
        }
        for (id, (digest, ts)) in &self.pending {
            memory.check(id, *digest, *ts);
        }
        memory.export()
    }

    fn committed(&mut self, _checkpoint_id: u64) {
        self.pending.clear();
        self.cutoff.fetch_max(self.oldest_kept(), Ordering::Relaxed);
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Arc<DB> {
        Arc::new(crate::core::checkpoint::open_state_db(dir, Arc::new(AtomicI64::new(i64::MIN))).expect("opens"))
    }

    fn items(ids: &[(&str, u64, i64)]) -> Vec<(Arc<str>, u64, i64)> {
        ids.iter().map(|(id, digest, ts)| (Arc::from(*id), *digest, *ts)).collect()
    }

    #[test]
    fn resends_are_found_after_their_ids_left_memory_and_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        let mut dedup =
            RocksDedup::new(db.clone(), Arc::new(AtomicI64::new(i64::MIN)), 3_600_000, Some(2)).expect("empty state");
        let first = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 2, 2_000), ("c", 3, 3_000)]));
        assert_eq!(first, [DedupVerdict::First, DedupVerdict::First, DedupVerdict::First]);
        assert_eq!(dedup.pending(), 0, "written through to RocksDB");
        let again = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 9, 2_000), ("d", 4, 4_000)]));
        assert_eq!(again, [DedupVerdict::Identical, DedupVerdict::Conflicting, DedupVerdict::First]);
        drop(dedup);
        let mut reopened =
            RocksDedup::new(db, Arc::new(AtomicI64::new(i64::MIN)), 3_600_000, None).expect("state readable");
        let verdicts = reopened.check_batch(&items(&[("c", 3, 3_000), ("c", 7, 3_000), ("e", 5, 5_000)]));
        assert_eq!(verdicts, [DedupVerdict::Identical, DedupVerdict::Conflicting, DedupVerdict::First]);
    }

    #[test]
    fn a_hash_shared_by_two_ids_is_kept_until_both_expire() {
        let mut hashes = IdHashes::default();
        hashes.insert(42, 10_000);
        hashes.insert(42, 130_000);
        hashes.insert(7, 130_000);
        hashes.expire(120_000);
        assert!(hashes.may_hold(42), "the second id of hash 42 is still within the horizon");
        hashes.expire(179_999);
        assert!(hashes.may_hold(42) && hashes.may_hold(7), "their minute is not over before the horizon");
        hashes.expire(180_000);
        assert!(!hashes.may_hold(42) && !hashes.may_hold(7));
        assert!(hashes.by_minute.is_empty());
    }

    #[test]
    fn an_id_older_than_the_horizon_reads_as_new_in_memory_as_in_rocksdb() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dedup = RocksDedup::new(open(dir.path()), Arc::new(AtomicI64::new(i64::MIN)), 60_000, Some(1))
            .expect("empty state");
        dedup.check_batch(&items(&[("old", 1, 0), ("new", 2, 600_000)]));
        assert!(!dedup.hashes.may_hold(IdHashes::hash("old")), "expired from memory");
        assert!(dedup.hashes.may_hold(IdHashes::hash("new")));
        assert_eq!(dedup.check_batch(&items(&[("old", 1, 0)])), [DedupVerdict::First]);
    }
}
