//! Deduplication state in RocksDB, for ids beyond what memory should hold: the ids seen since
//! the last checkpoint stay in memory (the hot set), the rest are read from RocksDB in batches
//! (bloom filters answer most misses). Pending ids reach RocksDB in the same atomic write as
//! the checkpoint they belong to, so the stored set always matches the newest checkpoint.

use super::dedup::{DedupBackend, DedupVerdict, Deduplicator};
use crate::core::StateWrite;
use rocksdb::{IteratorMode, DB};
use rustc_hash::FxHashMap;
use std::sync::Arc;

const BUCKET_MS: i64 = 60_000;
const ID_PREFIX: &[u8] = b"dedup/id/";
const INDEX_PREFIX: &[u8] = b"dedup/ix/";
const COMMITTED_KEY: &[u8] = b"dedup/committed";
/// Ids a scratch database takes at a time.
const AUTOFLUSH: usize = 200_000;

pub struct RocksDedup {
    db: Arc<DB>,
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

fn index_key(bucket: i64, id: &str) -> Vec<u8> {
    // Sign-flipped big-endian buckets sort in time order.
    [INDEX_PREFIX, &((bucket as u64) ^ (1 << 63)).to_be_bytes(), id.as_bytes()].concat()
}

impl RocksDedup {
    /// `autoflush`: for runs without checkpoints, write ids through after this many.
    pub fn new(db: Arc<DB>, horizon_ms: i64, autoflush: Option<usize>) -> RocksDedup {
        RocksDedup { db, _scratch: None, horizon_ms, pending: FxHashMap::default(), max_ts: i64::MIN, autoflush }
    }

    /// A throw-away database for runs without checkpoints; ids are written through in batches.
    pub fn scratch(horizon_ms: i64) -> anyhow::Result<RocksDedup> {
        let dir = tempfile::Builder::new().prefix("passflow-state-").tempdir()?;
        let db = DB::open(&crate::core::checkpoint::state_options(), dir.path())?;
        let mut dedup = RocksDedup::new(Arc::new(db), horizon_ms, Some(AUTOFLUSH));
        dedup._scratch = Some(dir);
        Ok(dedup)
    }

    /// The writes that persist the pending ids and expire old ones; pending is emptied.
    fn drain_writes(&mut self) -> anyhow::Result<Vec<StateWrite>> {
        let oldest_kept = self.max_ts.saturating_sub(self.horizon_ms).div_euclid(BUCKET_MS);
        let mut writes = Vec::with_capacity(self.pending.len() * 2);
        for (id, (digest, ts)) in self.pending.drain() {
            let bucket = ts.div_euclid(BUCKET_MS);
            if bucket < oldest_kept {
                continue;
            }
            let mut value = digest.to_le_bytes().to_vec();
            value.extend_from_slice(&ts.to_le_bytes());
            writes.push(StateWrite::Put(id_key(&id), value));
            writes.push(StateWrite::Put(index_key(bucket, &id), Vec::new()));
        }
        let end = index_key(oldest_kept, "");
        for item in self.db.iterator(IteratorMode::From(INDEX_PREFIX, rocksdb::Direction::Forward)) {
            let (key, _) = item?;
            if !key.starts_with(INDEX_PREFIX) || key.as_ref() >= end.as_slice() {
                break;
            }
            writes.push(StateWrite::Delete([ID_PREFIX, &key[INDEX_PREFIX.len() + 8..]].concat()));
            writes.push(StateWrite::Delete(key.to_vec()));
        }
        Ok(writes)
    }

    fn lookup(&self, ids: &[&Arc<str>]) -> Vec<Option<u64>> {
        let keys: Vec<Vec<u8>> = ids.iter().map(|id| id_key(id)).collect();
        // A read error is treated as "not seen": the pass is kept rather than lost.
        self.db.multi_get(keys).into_iter().map(|r| r.ok().flatten().and_then(|v| v.get(..8).map(|d| u64::from_le_bytes(d.try_into().expect("8 bytes"))))).collect()
    }
}

impl DedupBackend for RocksDedup {
    fn check_batch(&mut self, items: &[(Arc<str>, u64, i64)]) -> Vec<DedupVerdict> {
        let unknown: Vec<&Arc<str>> = items.iter().map(|(id, _, _)| id).filter(|id| !self.pending.contains_key(*id)).collect();
        let stored: FxHashMap<&str, u64> = unknown.iter().map(|id| &***id).zip(self.lookup(&unknown)).filter_map(|(id, d)| d.map(|d| (id, d))).collect();
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
            if let Ok(writes) = self.drain_writes() {
                let _ = crate::core::apply_writes(&self.db, &writes, None);
            }
        }
        verdicts
    }

    fn checkpoint(&mut self, checkpoint_id: u64) -> anyhow::Result<(Vec<u8>, Vec<StateWrite>)> {
        let mut writes = self.drain_writes()?;
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
                let mut writes = vec![StateWrite::DeleteRange(ID_PREFIX.to_vec(), b"dedup/id0".to_vec()), StateWrite::DeleteRange(INDEX_PREFIX.to_vec(), b"dedup/ix0".to_vec())];
                for (id, digest, ts) in memory.entries() {
                    let mut value = digest.to_le_bytes().to_vec();
                    value.extend_from_slice(&ts.to_le_bytes());
                    writes.push(StateWrite::Put(index_key(ts.div_euclid(BUCKET_MS), &id), Vec::new()));
                    writes.push(StateWrite::Put(id_key(&id), value));
                }
                self.max_ts = memory.max_ts();
                crate::core::apply_writes(&self.db, &writes, None)
            }
        }
    }

    fn export(&mut self) -> anyhow::Result<Vec<u8>> {
        let mut memory = Deduplicator::new(self.horizon_ms);
        for item in self.db.prefix_iterator(INDEX_PREFIX) {
            let (key, _) = item?;
            if !key.starts_with(INDEX_PREFIX) {
                break;
            }
            let id: Arc<str> = std::str::from_utf8(&key[INDEX_PREFIX.len() + 8..])?.into();
            if let Some(value) = self.db.get(id_key(&id))? {
                let digest = u64::from_le_bytes(value[..8].try_into()?);
                let ts = i64::from_le_bytes(value[8..16].try_into()?);
                memory.check(&id, digest, ts);
            }
        }
        for (id, (digest, ts)) in &self.pending {
            memory.check(id, *digest, *ts);
        }
        memory.export()
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}
