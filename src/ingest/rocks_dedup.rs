//! Deduplication state in RocksDB, for ids beyond what memory should hold: the ids seen since
//! the last checkpoint stay in memory (the hot set), the rest are read from RocksDB in batches
//! (bloom filters answer most misses). Pending ids reach RocksDB in the same atomic write as
//! the checkpoint they belong to, so the stored set always matches the newest checkpoint.
//! Each stored id carries its event time: one older than the horizon reads as absent, and
//! compaction drops it (`crate::core::checkpoint::state_options` installs the filter), so the
//! set stays bounded without an index to maintain.

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
    /// `autoflush`: for runs without checkpoints, write ids through after this many.
    pub fn new(db: Arc<DB>, cutoff: Arc<AtomicI64>, horizon_ms: i64, autoflush: Option<usize>) -> RocksDedup {
        RocksDedup {
            db,
            cutoff,
            _scratch: None,
            horizon_ms,
            pending: FxHashMap::default(),
            max_ts: i64::MIN,
            autoflush,
        }
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
        let mut dedup = RocksDedup::new(Arc::new(db), cutoff, horizon_ms, Some(AUTOFLUSH));
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
        let unknown: Vec<&Arc<str>> =
            items.iter().map(|(id, _, _)| id).filter(|id| !self.pending.contains_key(*id)).collect();
        let stored: FxHashMap<&str, u64> = unknown
            .iter()
            .map(|id| &***id)
            .zip(self.lookup(&unknown))
            .filter_map(|(id, d)| d.map(|d| (id, d)))
            .collect();
        let mut verdicts = Vec::with_capacity(items.len());
        for (id, digest, ts) in items {
            let first = self.pending.get(id).map(|(d, _)| *d).or_else(|| stored.get(&**id).copied());
            verdicts.push(match first {
                Some(d) if d == *digest => DedupVerdict::Identical,
                Some(_) => DedupVerdict::Conflicting,
                None => {
                    self.pending.insert(id.clone(), (*digest, *ts));
                    self.max_ts = self.max_ts.max(*ts);
                    DedupVerdict::First
                }
            });
        }
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
                Ok(())
            }
            // A full list (a savepoint, or a checkpoint of the in-memory backend): load it all.
            _ => {
                let mut memory = Deduplicator::new(self.horizon_ms);
                memory.restore(bytes)?;
                let mut writes = vec![StateWrite::DeleteRange(ID_PREFIX.to_vec(), b"dedup/id0".to_vec())];
                writes.extend(memory.entries().map(|(id, digest, ts)| StateWrite::Put(id_key(&id), value(digest, ts))));
                self.max_ts = memory.max_ts();
                crate::core::apply_writes(&self.db, &writes, None)
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
