//! Checkpoints and savepoints.
//!
//! A checkpoint is a consistent snapshot of all operator state plus the source positions,
//! written to RocksDB in one atomic, synced write once the sinks have accepted every result
//! emitted before its barrier. The last few are kept; each part carries a digest, so a torn or
//! corrupt checkpoint is detected and the one before it is used. A savepoint is a checkpoint
//! exported to a directory (`manifest.json` + one file per part) to restore after an upgrade.

use super::{EngineSnapshot, StateBlob};
use crate::model::fnv1a64;
use anyhow::Context as _;
use rocksdb::{Options, WriteBatch, DB};
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

/// Checkpoints kept in the store.
pub const RETAINED: usize = 3;
const SAVEPOINT_FORMAT: &str = "passflow-savepoint";
const SAVEPOINT_FORMAT_VERSION: u32 = 1;
/// How a part's digest names its algorithm: a checkpoint holds hundreds of megabytes of state
/// at city scale, and CRC-32 runs at memory speed where a byte-at-a-time hash does not.
const DIGEST_PREFIX: &str = "crc32:";

fn digest(bytes: &[u8]) -> String {
    format!("{DIGEST_PREFIX}{:08x}", crc32fast::hash(bytes))
}

/// A complete checkpoint.
#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub id: u64,
    pub created_at: i64,
    /// The source positions, in the source's own terms.
    pub source: serde_json::Value,
    pub engine: EngineSnapshot,
}

#[derive(Serialize, Deserialize)]
struct Meta {
    id: u64,
    created_at: i64,
    source: serde_json::Value,
    parts: Vec<PartMeta>,
}

#[derive(Serialize, Deserialize)]
struct PartMeta {
    name: String,
    version: u32,
    len: u64,
    digest: String,
}

impl PartMeta {
    fn of(name: &str, blob: &StateBlob) -> PartMeta {
        PartMeta {
            name: name.to_owned(),
            version: blob.version,
            len: blob.bytes.len() as u64,
            digest: digest(&blob.bytes),
        }
    }

    fn verify(&self, bytes: &[u8]) -> anyhow::Result<()> {
        // Parts written before digests were CRC-32 carry a 64-bit FNV-1a digest.
        let matches = match self.digest.strip_prefix(DIGEST_PREFIX) {
            Some(_) => digest(bytes) == self.digest,
            None => format!("{:016x}", fnv1a64(bytes)) == self.digest,
        };
        anyhow::ensure!(
            bytes.len() as u64 == self.len && matches,
            "part `{}` is corrupt (length or digest mismatch)",
            self.name
        );
        Ok(())
    }
}

fn meta_key(id: u64) -> String {
    format!("ckpt/{id:020}/meta")
}

fn part_key(id: u64, name: &str) -> String {
    format!("ckpt/{id:020}/part/{name}")
}

#[derive(Clone)]
pub struct CheckpointStore {
    db: Arc<DB>,
    cutoff: Arc<AtomicI64>,
    dir: std::path::PathBuf,
}

impl CheckpointStore {
    /// Opens (or creates) the checkpoint store in `dir`.
    pub fn open(dir: &Path) -> anyhow::Result<CheckpointStore> {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
        let cutoff = Arc::new(AtomicI64::new(i64::MIN));
        let db = open_state_db(&dir.join("checkpoints"), cutoff.clone())
            .with_context(|| format!("opening the checkpoint store in {}", dir.display()))?;
        Ok(CheckpointStore { db: Arc::new(db), cutoff, dir: dir.to_owned() })
    }

    /// The folder the store lives in (state kept beside the checkpoints goes here too).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// The expiry cutoff of deduplication state in this store's database.
    pub fn dedup_cutoff(&self) -> Arc<AtomicI64> {
        self.cutoff.clone()
    }

    /// The RocksDB instance, shared with state kept in RocksDB (written with the checkpoints).
    pub fn db(&self) -> Arc<DB> {
        self.db.clone()
    }

    /// Writes a checkpoint atomically (synced), then drops all but the last [`RETAINED`].
    pub fn save(&self, checkpoint: &Checkpoint) -> anyhow::Result<()> {
        let id = checkpoint.id;
        let mut batch = WriteBatch::default();
        let parts: Vec<PartMeta> = checkpoint.engine.parts.iter().map(|(n, b)| PartMeta::of(n, b)).collect();
        for (name, blob) in &checkpoint.engine.parts {
            batch.put(part_key(id, name), &blob.bytes);
        }
        let meta = Meta { id, created_at: checkpoint.created_at, source: checkpoint.source.clone(), parts };
        batch.put(meta_key(id), serde_json::to_vec(&meta)?);
        for old in self.ids()?.into_iter().filter(|old| *old + RETAINED as u64 <= id) {
            batch.delete_range(format!("ckpt/{old:020}/"), format!("ckpt/{old:020}0"));
        }
        super::apply_writes(&self.db, &checkpoint.engine.writes, Some(batch)).context("writing a checkpoint")
    }

    /// Ids of the stored checkpoints, oldest first.
    pub fn ids(&self) -> anyhow::Result<Vec<u64>> {
        let mut ids = Vec::new();
        // Keys only: the parts under the same prefix are large.
        let mut keys = self.db.raw_iterator();
        keys.seek(b"ckpt/");
        while let Some(key) = keys.key() {
            // Without a prefix extractor the iterator runs past the prefix.
            if !key.starts_with(b"ckpt/") {
                break;
            }
            let key = String::from_utf8_lossy(key);
            if let Some(id) = key.strip_prefix("ckpt/").and_then(|k| k.strip_suffix("/meta")) {
                ids.push(id.parse()?);
            }
            keys.next();
        }
        keys.status()?;
        Ok(ids)
    }

    /// The newest checkpoint that reads back intact; corrupt ones are reported and skipped.
    pub fn latest(&self) -> anyhow::Result<Option<Checkpoint>> {
        for id in self.ids()?.into_iter().rev() {
            match self.load(id) {
                Ok(checkpoint) => return Ok(Some(checkpoint)),
                Err(e) => tracing::warn!(checkpoint = id, error = %format!("{e:#}"), "skipping a corrupt checkpoint"),
            }
        }
        Ok(None)
    }

    pub fn load(&self, id: u64) -> anyhow::Result<Checkpoint> {
        let meta = self.db.get(meta_key(id))?.ok_or_else(|| anyhow::anyhow!("checkpoint {id} has no metadata"))?;
        let meta: Meta =
            serde_json::from_slice(&meta).with_context(|| format!("checkpoint {id}: unreadable metadata"))?;
        let mut parts = Vec::new();
        for p in &meta.parts {
            let bytes = self
                .db
                .get(part_key(id, &p.name))?
                .ok_or_else(|| anyhow::anyhow!("checkpoint {id}: part `{}` is missing", p.name))?;
            p.verify(&bytes).with_context(|| format!("checkpoint {id}"))?;
            parts.push((p.name.clone(), StateBlob { version: p.version, bytes }));
        }
        Ok(Checkpoint {
            id,
            created_at: meta.created_at,
            source: meta.source,
            engine: EngineSnapshot { parts, writes: Vec::new() },
        })
    }

    /// Overwrites part of a stored checkpoint (tests use it to corrupt one).
    pub fn put_raw_part(&self, id: u64, name: &str, bytes: &[u8]) -> anyhow::Result<()> {
        Ok(self.db.put(part_key(id, name), bytes)?)
    }
}

#[derive(Serialize, Deserialize)]
struct SavepointManifest {
    format: String,
    format_version: u32,
    checkpoint_id: u64,
    created_at: i64,
    source: serde_json::Value,
    parts: Vec<PartMeta>,
}

impl SavepointManifest {
    fn of(checkpoint: &Checkpoint) -> SavepointManifest {
        SavepointManifest {
            format: SAVEPOINT_FORMAT.into(),
            format_version: SAVEPOINT_FORMAT_VERSION,
            checkpoint_id: checkpoint.id,
            created_at: checkpoint.created_at,
            source: checkpoint.source.clone(),
            parts: checkpoint.engine.parts.iter().map(|(n, b)| PartMeta::of(n, b)).collect(),
        }
    }
}

/// Exports a checkpoint as a savepoint directory.
pub fn write_savepoint(checkpoint: &Checkpoint, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir.join("parts")).with_context(|| format!("creating {}", dir.display()))?;
    for (name, blob) in &checkpoint.engine.parts {
        std::fs::write(part_file(dir, name), &blob.bytes)?;
    }
    let manifest = SavepointManifest::of(checkpoint);
    // The manifest goes last: a directory without one is not a savepoint.
    std::fs::write(dir.join("manifest.json"), serde_json::to_vec_pretty(&manifest)?)?;
    Ok(())
}

/// A checkpoint in the savepoint's portable form as one byte string (to publish it, e.g. to
/// scale-out's state topic): the manifest's length (u32, little-endian), the manifest as JSON,
/// then every part in the manifest's order.
pub fn encode_portable(checkpoint: &Checkpoint) -> anyhow::Result<Vec<u8>> {
    let manifest = serde_json::to_vec(&SavepointManifest::of(checkpoint))?;
    let parts: usize = checkpoint.engine.parts.iter().map(|(_, b)| b.bytes.len()).sum();
    let mut out = Vec::with_capacity(4 + manifest.len() + parts);
    out.extend_from_slice(&(manifest.len() as u32).to_le_bytes());
    out.extend_from_slice(&manifest);
    for (_, blob) in &checkpoint.engine.parts {
        out.extend_from_slice(&blob.bytes);
    }
    Ok(out)
}

/// Reads what [`encode_portable`] wrote, checking every part.
pub fn decode_portable(bytes: &[u8]) -> anyhow::Result<Checkpoint> {
    let len = bytes.get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")) as usize);
    let manifest = len.and_then(|len| bytes.get(4..4 + len)).context("a portable checkpoint is cut short")?;
    let m: SavepointManifest = serde_json::from_slice(manifest).context("a portable checkpoint's manifest")?;
    anyhow::ensure!(m.format == SAVEPOINT_FORMAT, "not a passflow checkpoint");
    anyhow::ensure!(
        m.format_version == SAVEPOINT_FORMAT_VERSION,
        "checkpoint format version {} is not supported (this build reads {})",
        m.format_version,
        SAVEPOINT_FORMAT_VERSION
    );
    let mut at = 4 + manifest.len();
    let mut parts = Vec::with_capacity(m.parts.len());
    for p in &m.parts {
        let part = bytes.get(at..at + p.len as usize).with_context(|| format!("part `{}` is cut short", p.name))?;
        p.verify(part)?;
        parts.push((p.name.clone(), StateBlob { version: p.version, bytes: part.to_vec() }));
        at += part.len();
    }
    anyhow::ensure!(at == bytes.len(), "a portable checkpoint has bytes after its last part");
    Ok(Checkpoint {
        id: m.checkpoint_id,
        created_at: m.created_at,
        source: m.source,
        engine: EngineSnapshot { parts, writes: Vec::new() },
    })
}

/// Reads a savepoint directory back, checking every part.
pub fn read_savepoint(dir: &Path) -> anyhow::Result<Checkpoint> {
    let text = std::fs::read(dir.join("manifest.json"))
        .with_context(|| format!("{} is not a savepoint (no manifest.json)", dir.display()))?;
    let m: SavepointManifest =
        serde_json::from_slice(&text).with_context(|| format!("{}/manifest.json is unreadable", dir.display()))?;
    anyhow::ensure!(m.format == SAVEPOINT_FORMAT, "{}: not a passflow savepoint", dir.display());
    anyhow::ensure!(
        m.format_version == SAVEPOINT_FORMAT_VERSION,
        "savepoint format version {} is not supported (this build reads {})",
        m.format_version,
        SAVEPOINT_FORMAT_VERSION
    );
    let mut parts = Vec::new();
    for p in &m.parts {
        let bytes = std::fs::read(part_file(dir, &p.name)).with_context(|| format!("savepoint part `{}`", p.name))?;
        p.verify(&bytes).with_context(|| format!("savepoint {}", dir.display()))?;
        parts.push((p.name.clone(), StateBlob { version: p.version, bytes }));
    }
    Ok(Checkpoint {
        id: m.checkpoint_id,
        created_at: m.created_at,
        source: m.source,
        engine: EngineSnapshot { parts, writes: Vec::new() },
    })
}

/// Opens a RocksDB for passflow's state (with a handle on its default column family, for
/// batched reads).
pub fn open_state_db(path: &Path, dedup_cutoff: Arc<AtomicI64>) -> anyhow::Result<DB> {
    let mut options = Options::default();
    options.create_if_missing(true);
    options.set_keep_log_file_num(2);
    // The family is opened with its options given: `DB::open_cf` opens the families it names
    // with default options, without the compaction filter (ids would never expire on disk).
    let family =
        rocksdb::ColumnFamilyDescriptor::new(rocksdb::DEFAULT_COLUMN_FAMILY_NAME, family_options(dedup_cutoff));
    Ok(DB::open_cf_descriptors(&options, path, [family])?)
}

/// RocksDB options for the family of passflow's state: bloom filters for fast misses, a block
/// cache for hot keys, LZ4, and a compaction filter that drops deduplication ids older than
/// `dedup_cutoff`.
fn family_options(dedup_cutoff: Arc<AtomicI64>) -> Options {
    use crate::ingest::{parse_dedup_value, DEDUP_ID_PREFIX};
    let mut options = Options::default();
    options.set_compaction_filter("passflow-dedup-expiry", move |_level: u32, key: &[u8], value: &[u8]| {
        let cutoff = dedup_cutoff.load(Ordering::Relaxed);
        match parse_dedup_value(value) {
            Some((_, ts)) if key.starts_with(DEDUP_ID_PREFIX) && ts < cutoff => rocksdb::CompactionDecision::Remove,
            _ => rocksdb::CompactionDecision::Keep,
        }
    });
    // Ids come in roughly in key order (pass ids grow with time), so a compaction seldom
    // reaches the files of older ids again: the ids still within the horizon when their file
    // was written would stay on disk. Files a day old are compacted again, through the filter.
    options.set_periodic_compaction_seconds(24 * 3600);
    options.set_write_buffer_size(64 << 20);
    options.set_compression_type(rocksdb::DBCompressionType::Lz4);
    let mut table = rocksdb::BlockBasedOptions::default();
    table.set_bloom_filter(10.0, false);
    table.set_block_cache(&rocksdb::Cache::new_lru_cache(64 << 20));
    table.set_cache_index_and_filter_blocks(true);
    options.set_block_based_table_factory(&table);
    options
}

fn part_file(dir: &Path, name: &str) -> PathBuf {
    dir.join("parts").join(format!("{name}.bin"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_state_family_is_opened_with_its_filter_compression_and_bloom_filters() {
        let dir = tempfile::tempdir().unwrap();
        let db = open_state_db(dir.path(), Arc::new(AtomicI64::new(i64::MIN))).unwrap();
        drop(db);
        // RocksDB writes the options each family was opened with to an OPTIONS file.
        let file = std::fs::read_dir(dir.path())
            .unwrap()
            .map(|e| e.unwrap().path())
            .find(|p| p.file_name().unwrap().to_string_lossy().starts_with("OPTIONS-"))
            .expect("an options file");
        let text = std::fs::read_to_string(file).unwrap();
        let family = &text[text.find("[CFOptions \"default\"]").expect("the default family")..];
        for setting in [
            "compaction_filter=passflow-dedup-expiry",
            "compression=kLZ4Compression",
            "periodic_compaction_seconds=86400",
            "filter_policy=bloomfilter",
        ] {
            assert!(family.lines().any(|l| l.trim() == setting), "{setting} is not among\n{family}");
        }
    }

    #[test]
    fn parts_digested_before_crc32_still_verify_and_any_change_is_caught() {
        let bytes = b"operator state".to_vec();
        let current = PartMeta::of("a", &StateBlob { version: 1, bytes: bytes.clone() });
        assert!(current.digest.starts_with(DIGEST_PREFIX));
        let legacy = PartMeta {
            digest: format!("{:016x}", fnv1a64(&bytes)),
            ..PartMeta::of("a", &StateBlob { version: 1, bytes: bytes.clone() })
        };
        let mut changed = bytes.clone();
        changed[3] ^= 1;
        for meta in [&current, &legacy] {
            assert!(meta.verify(&bytes).is_ok(), "{} verifies", meta.digest);
            assert!(meta.verify(&changed).is_err(), "{} catches a flipped bit", meta.digest);
        }
    }

    #[test]
    fn the_portable_form_reads_back_and_refuses_a_cut_or_changed_copy() {
        let mut c = checkpoint(7);
        c.source = serde_json::json!({"topic": "passes", "offsets": {"3": 42}});
        let bytes = encode_portable(&c).unwrap();
        assert_eq!(decode_portable(&bytes).unwrap(), c);
        assert!(decode_portable(&bytes[..bytes.len() - 1]).is_err(), "a copy cut short");
        let mut longer = bytes.clone();
        longer.push(0);
        assert!(decode_portable(&longer).is_err(), "a copy with bytes after its parts");
        let mut changed = bytes.clone();
        *changed.last_mut().unwrap() ^= 1;
        let err = format!("{:#}", decode_portable(&changed).unwrap_err());
        assert!(err.contains("part `b` is corrupt"), "{err}");
    }

    fn checkpoint(id: u64) -> Checkpoint {
        let parts = vec![
            ("a".to_owned(), StateBlob { version: 1, bytes: vec![id as u8; 10] }),
            ("b".to_owned(), StateBlob { version: 2, bytes: b"state".to_vec() }),
        ];
        Checkpoint {
            id,
            created_at: 5,
            source: serde_json::json!({ "offset": id * 100 }),
            engine: EngineSnapshot { parts, writes: Vec::new() },
        }
    }

    #[test]
    fn the_latest_checkpoint_reads_back_and_only_the_last_few_are_kept() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(store.latest().unwrap(), None);
        for id in 1..=5 {
            store.save(&checkpoint(id)).unwrap();
        }
        assert_eq!(store.ids().unwrap(), vec![3, 4, 5]);
        assert_eq!(store.latest().unwrap(), Some(checkpoint(5)));
        drop(store);
        let reopened = CheckpointStore::open(dir.path()).unwrap();
        assert_eq!(reopened.latest().unwrap(), Some(checkpoint(5)));
    }

    #[test]
    fn a_corrupt_checkpoint_is_skipped_for_the_one_before() {
        let dir = tempfile::tempdir().unwrap();
        let store = CheckpointStore::open(dir.path()).unwrap();
        store.save(&checkpoint(1)).unwrap();
        store.save(&checkpoint(2)).unwrap();
        store.put_raw_part(2, "b", b"stale").unwrap();
        assert!(store.load(2).is_err());
        assert_eq!(store.latest().unwrap(), Some(checkpoint(1)));
    }

    #[test]
    fn a_savepoint_round_trips_and_a_damaged_one_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_savepoint(&checkpoint(7), dir.path()).unwrap();
        assert_eq!(read_savepoint(dir.path()).unwrap(), checkpoint(7));
        std::fs::write(dir.path().join("parts/a.bin"), b"xx").unwrap();
        let err = format!("{:#}", read_savepoint(dir.path()).unwrap_err());
        assert!(err.contains("part `a` is corrupt"), "{err}");
        let err = format!("{:#}", read_savepoint(Path::new("/nonexistent")).unwrap_err());
        assert!(err.contains("not a savepoint"), "{err}");
    }
}
