//! Deduplication state in RocksDB, for ids beyond what memory should hold: the ids seen since
//! the last checkpoint stay in memory (the hot set), the rest are read from RocksDB in batches
//! (bloom filters answer most misses). Pending ids reach RocksDB in the same atomic write as
//! the checkpoint they belong to, so the stored set always matches the newest checkpoint.
//! Each stored id carries its event time: one older than the horizon reads as absent, and
//! compaction drops it (`crate::core::checkpoint::open_state_db` installs the filter), so the
//! set stays bounded without an index to maintain.
//!
//! A pass id is looked up in RocksDB only when it may be there: a Bloom filter of the ids
//! within the horizon ([`IdFilter`], about 10 bits an id) says which are surely new, and
//! almost every pass is new, so almost no pass costs a read.
//!
//! Without checkpoints (a scratch database), pending ids are written through in the
//! background: a full set of pending ids is handed to a writer thread and stays readable in
//! memory until it is in RocksDB, so the engine's thread neither sorts nor inserts them.

use super::dedup::{DedupBackend, DedupVerdict, Deduplicator};
use crate::core::StateWrite;
use crate::model::Text;
use rocksdb::DB;
use rustc_hash::FxHashMap;
use std::sync::atomic::{AtomicI64, Ordering};
use std::sync::Arc;

pub const ID_PREFIX: &[u8] = b"dedup/id/";
const COMMITTED_KEY: &[u8] = b"dedup/committed";
/// Ids a scratch database holds in memory before it writes them through: what an index of 2^22
/// slots takes with room for a replay batch before it would grow (some 190 MB with the ids);
/// while one set is being written, the next fills another. Writing ids costs more CPU than
/// holding them, so a replay of a few million passes writes none.
const AUTOFLUSH: usize = 3_400_000;
/// Ids written through in one write: a write's batch and sorting stay small.
const WRITE_CHUNK: usize = 200_000;
/// Filter bits per id: about 1% of new ids cost a read.
const BITS_PER_ID: usize = 10;
/// Ids a filter is first sized for (1.25 MB): a city's day then needs one or two more
/// generations, and a new id is probed in each.
const MIN_FILTER_IDS: usize = 1 << 20;

/// How many ids ahead a batch's filter probes ask for their blocks.
const FILTER_AHEAD: usize = 16;

/// A blocked Bloom filter: an id sets 8 bits in one 512-bit block (one cache line).
struct Bloom {
    blocks: Vec<[u64; 8]>,
    /// The ids it was sized for (past them, false positives climb fast).
    capacity: usize,
    ids: usize,
    /// The newest event time of an id in it.
    newest: i64,
    /// The newest event time seen when it was opened (`i64::MIN` until then, for the first).
    opened_at: i64,
}

impl Bloom {
    fn new(ids: usize, opened_at: i64) -> Bloom {
        let capacity = ids.max(MIN_FILTER_IDS);
        let blocks = (capacity * BITS_PER_ID).div_ceil(512);
        Bloom { blocks: written_zeros(blocks), capacity, ids: 0, newest: i64::MIN, opened_at }
    }

    fn is_full(&self) -> bool {
        self.ids >= self.capacity
    }

    /// The block and the 8 bits (word, bit) of `hash`: the block from one mix of it, seven
    /// bits from 9-bit pieces of a second and the eighth from the first.
    fn probes(&self, hash: u64) -> (usize, impl Iterator<Item = (usize, u64)>) {
        let x = mix(hash);
        let block = (((x >> 32) * self.blocks.len() as u64) >> 32) as usize;
        let y = mix(x);
        let bits = (0..8u32).map(move |i| {
            let bit = if i < 7 { (y >> (9 * i)) & 511 } else { x & 511 };
            ((bit / 64) as usize, 1u64 << (bit % 64))
        });
        (block, bits)
    }

    fn insert(&mut self, hash: u64, ts: i64) {
        let (block, bits) = self.probes(hash);
        let block = &mut self.blocks[block];
        for (word, bit) in bits {
            block[word] |= bit;
        }
        if self.opened_at == i64::MIN {
            // The first generation dates from its first id.
            self.opened_at = ts;
        }
        self.ids += 1;
        self.newest = self.newest.max(ts);
    }

    /// Asks for the block of `hash` to be brought into the cache.
    fn prefetch(&self, hash: u64) {
        crate::core::prefetch(&self.blocks[self.probes(hash).0]);
    }

    fn may_hold(&self, hash: u64) -> bool {
        let (block, mut bits) = self.probes(hash);
        let block = &self.blocks[block];
        bits.all(|(word, bit)| block[word] & bit != 0)
    }
}

/// `n` zeros, written now. Zeroed lazily (as `vec![0; n]` is, by fresh pages), a table read
/// before its page was ever written (a probe for an id not there) would map the kernel's
/// shared page of zeros there, and the first write after it would fault a second time: in a
/// set of millions of ids, tens of thousands of page faults more.
fn written_zeros<T: Clone + Default>(n: usize) -> Vec<T> {
    let mut zeros = Vec::with_capacity(n);
    zeros.resize(n, T::default());
    zeros
}

/// SplitMix64's finaliser: every bit of the result depends on every bit of `z`.
fn mix(mut z: u64) -> u64 {
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// Which ids may be stored or pending: a filter with no false negatives (an id it does not
/// hold is new) and about 1% false positives a full generation (settled by a read), some 10
/// bits an id. Ids go into the newest generation. A new one opens when that one is full (four
/// times the size of all that are kept, so a growing city needs few) or has been open for a
/// horizon; a generation is dropped once its newest id has expired, so every live id is
/// always held.
struct IdFilter {
    horizon_ms: i64,
    /// Oldest first; never empty.
    generations: Vec<Bloom>,
}

impl IdFilter {
    fn new(horizon_ms: i64) -> IdFilter {
        IdFilter { horizon_ms, generations: vec![Bloom::new(0, i64::MIN)] }
    }

    fn hash(id: &[u8]) -> u64 {
        // Eight bytes a step; the probes mix the result further.
        std::hash::BuildHasher::hash_one(&rustc_hash::FxBuildHasher, id)
    }

    fn may_hold(&self, hash: u64) -> bool {
        self.generations.iter().rev().any(|g| g.may_hold(hash))
    }

    /// Asks for the blocks of `hash` in every generation to be brought into the cache (a new
    /// id is probed in each).
    fn prefetch(&self, hash: u64) {
        self.generations.iter().for_each(|g| g.prefetch(hash));
    }

    fn current(&mut self) -> &mut Bloom {
        self.generations.last_mut().expect("a filter has a generation")
    }

    fn insert(&mut self, hash: u64, ts: i64) {
        if self.current().is_full() {
            let kept: usize = self.generations.iter().map(|g| g.ids).sum();
            let opened_at = self.current().opened_at;
            self.generations.push(Bloom::new(kept * 4, opened_at));
        }
        self.current().insert(hash, ts);
    }

    /// Drops the generations expired before `oldest_kept` and opens a new one when due.
    fn advance(&mut self, max_ts: i64, oldest_kept: i64) {
        let current = self.generations.pop().expect("a filter has a generation");
        self.generations.retain(|g| g.newest >= oldest_kept);
        self.generations.push(current);
        let (opened_at, ids) = (self.current().opened_at, self.current().ids);
        if max_ts.saturating_sub(opened_at) >= self.horizon_ms {
            self.generations.push(Bloom::new(ids + ids / 4, max_ts));
        }
    }

    /// A filter of every id stored in `db`.
    fn load(db: &DB, horizon_ms: i64) -> anyhow::Result<IdFilter> {
        let mut stored = Vec::new();
        for_each_stored(db, |id, _, ts| {
            stored.push((IdFilter::hash(id), ts));
            Ok(())
        })?;
        let mut filter = IdFilter::new(horizon_ms);
        filter.generations[0] = Bloom::new(stored.len() * 2, i64::MIN);
        for (hash, ts) in stored {
            filter.insert(hash, ts);
        }
        Ok(filter)
    }
}

/// How many ids ahead a batch's new ids ask for the slots they will take.
const SET_AHEAD: usize = 16;

/// Ids with their (digest, event time), in the order they came, found through a table of their
/// places: open addressing with linear probing, each slot a word holding a tag of the id's hash
/// and its place in `ids` (0 is empty), the table at most three quarters full. A new id costs
/// an append and one slot: a map of the ids themselves would move 40-byte entries each time it
/// grew, and a new id would miss the cache twice in it. A batch's new ids go in by the regions
/// of their slots, each asking ahead for the slot of the one [`SET_AHEAD`] places on, so that
/// their cache misses overlap instead of following one another.
struct IdSet {
    ids: Vec<(Text, (u64, i64))>,
    /// (tag << 32) | (place + 1), or 0.
    slots: Vec<u64>,
}

impl Default for IdSet {
    fn default() -> Self {
        IdSet::with_capacity(0)
    }
}

/// The slots that hold `n` ids at most three quarters full.
fn slots_for(n: usize) -> usize {
    (n * 4).div_ceil(3).max(16)
}

impl IdSet {
    fn with_capacity(n: usize) -> IdSet {
        IdSet { ids: Vec::with_capacity(n), slots: written_zeros(slots_for(n)) }
    }

    fn len(&self) -> usize {
        self.ids.len()
    }

    fn clear(&mut self) {
        self.ids.clear();
        self.slots.fill(0);
    }

    fn iter(&self) -> impl Iterator<Item = (&Text, &(u64, i64))> {
        self.ids.iter().map(|(id, v)| (id, v))
    }

    /// Where a search for an id whose [`IdFilter::hash`] is `hash` starts: from the high bits of
    /// the hash mixed once more (FxHash's own are weak), scaled to the table. Its low half is
    /// the tag.
    fn home(&self, mixed: u64) -> usize {
        ((u128::from(mixed) * self.slots.len() as u128) >> 64) as usize
    }

    /// The region of the table (of [`REGIONS`]) where `mixed` starts: its top bits, in the
    /// order of [`IdSet::home`] whatever the table's size.
    fn region(mixed: u64) -> usize {
        (mixed >> (64 - REGIONS.trailing_zeros())) as usize
    }

    /// The slot holding `id`, and its place, or the empty slot where it would go.
    fn probe(&self, mixed: u64, id: &[u8]) -> (usize, Option<u32>) {
        let tag = mixed & 0xffff_ffff;
        let mut i = self.home(mixed);
        loop {
            match self.slots[i] {
                0 => return (i, None),
                slot if slot >> 32 == tag && self.ids[(slot as u32 - 1) as usize].0.as_bytes() == id => {
                    return (i, Some(slot as u32 - 1));
                }
                _ => i = self.after(i),
            }
        }
    }

    /// The first empty slot from where `mixed` starts.
    fn vacant(&self, mixed: u64) -> usize {
        let mut i = self.home(mixed);
        while self.slots[i] != 0 {
            i = self.after(i);
        }
        i
    }

    /// The slot after slot `i`, the first after the last.
    fn after(&self, i: usize) -> usize {
        if i + 1 == self.slots.len() {
            0
        } else {
            i + 1
        }
    }

    /// The (digest, ts) of `id`, whose [`IdFilter::hash`] is `hash`.
    fn get(&self, id: &str, hash: u64) -> Option<&(u64, i64)> {
        let (_, found) = self.probe(mix(hash), id.as_bytes());
        found.map(|at| &self.ids[at as usize].1)
    }

    /// Room for `more` ids besides those held, the table made anew twice as large (or more)
    /// when it would be too full.
    fn reserve(&mut self, more: usize) {
        let want = self.ids.len() + more;
        if want * 4 <= self.slots.len() * 3 {
            return;
        }
        self.ids.reserve(more);
        self.slots = written_zeros(slots_for(want.max(self.slots.len() * 3 / 2)));
        for at in 0..self.ids.len() {
            let mixed = mix(IdFilter::hash(self.ids[at].0.as_bytes()));
            let slot = self.vacant(mixed);
            self.slots[slot] = (mixed << 32) | (at as u64 + 1);
        }
    }

    /// Puts in a batch's ids the filter did not hold, (id, hash, (digest, ts)): a live id is
    /// always held, so one found here has expired and is taken over. They go in by the regions
    /// of their places in the table (see [`by_region`]).
    fn insert_new<'a>(&mut self, new: impl Iterator<Item = (&'a Text, u64, (u64, i64))>) {
        // Made at the batch's size: a filter's size hint has no lower bound, and collected as
        // they come the ids would be copied each time the list doubled.
        let mut all = Vec::with_capacity(new.size_hint().1.unwrap_or(0));
        all.extend(new.map(|(id, hash, value)| (id.clone(), mix(hash), value)));
        self.reserve(all.len());
        let mut coming = by_region(all, |(_, mixed, _)| IdSet::region(*mixed), (Text::new(""), 0, (0, 0))).into_iter();
        // The ids to put in next, each one's slot asked for as it joins them.
        let mut queued = std::collections::VecDeque::with_capacity(SET_AHEAD);
        loop {
            while queued.len() < SET_AHEAD {
                let Some(item) = coming.next() else { break };
                crate::core::prefetch(&self.slots[self.home(item.1)]);
                queued.push_back(item);
            }
            let Some((id, mixed, value)) = queued.pop_front() else { break };
            // Any held copy is taken over.
            self.put(id, mixed, value, i64::MAX);
        }
    }

    /// Puts `id` in, or gives the (digest, ts) it holds already; one held with a time before
    /// `oldest_kept` has expired and is taken over.
    fn insert(&mut self, id: &Text, hash: u64, value: (u64, i64), oldest_kept: i64) -> Option<(u64, i64)> {
        self.reserve(1);
        self.put(id.clone(), mix(hash), value, oldest_kept)
    }

    /// [`IdSet::insert`] of an id of one's own, with room for it, by its mixed hash.
    fn put(&mut self, id: Text, mixed: u64, value: (u64, i64), oldest_kept: i64) -> Option<(u64, i64)> {
        match self.probe(mixed, id.as_bytes()) {
            (_, Some(at)) => {
                let held = &mut self.ids[at as usize].1;
                if held.1 >= oldest_kept {
                    return Some(*held);
                }
                *held = value;
                None
            }
            (slot, None) => {
                let at =
                    u32::try_from(self.ids.len()).ok().filter(|at| *at < u32::MAX).expect("fewer than 2^32 ids a set");
                self.slots[slot] = (mixed << 32) | u64::from(at + 1);
                self.ids.push((id, value));
                None
            }
        }
    }
}

/// The regions [`by_region`] cuts a table's slots into.
const REGIONS: usize = 1024;

/// `new`, in the order of the regions (of [`REGIONS`]) that `region` gives, and in the order
/// they came within one: put in in that order, one after the next lands near the one before,
/// where in the order they came each would miss the cache. Two passes of a counting sort, where
/// a sort by place would compare each id some sixteen times; the items themselves are moved,
/// each to its place in the result (`fill` holds the places until then), so that neither the
/// sort nor the caller reads a batch of megabytes out of order.
fn by_region<T: Clone>(new: Vec<T>, region: impl Fn(&T) -> usize, fill: T) -> Vec<T> {
    let mut starts = vec![0u32; REGIONS + 1];
    for item in &new {
        starts[region(item) + 1] += 1;
    }
    for r in 1..starts.len() {
        starts[r] += starts[r - 1];
    }
    let mut out = vec![fill; new.len()];
    for item in new {
        let next = &mut starts[region(&item)];
        out[*next as usize] = item;
        *next += 1;
    }
    out
}

/// A checkpoint taken and not yet saved: its ids, and the expiry it was taken at.
struct Committing {
    checkpoint_id: u64,
    ids: IdSet,
    oldest_kept: i64,
}

pub struct RocksDedup {
    db: Arc<DB>,
    /// Event time before which stored ids are expired (shared with the compaction filter).
    cutoff: Arc<AtomicI64>,
    /// A scratch database's folder, removed with it.
    _scratch: Option<tempfile::TempDir>,
    horizon_ms: i64,
    /// Ids accepted since the last checkpoint: (digest, ts).
    pending: IdSet,
    /// The ids of checkpoints taken and not yet saved (at most one while the driver saves in
    /// the background), held in memory until [`DedupBackend::committed`].
    committing: Vec<Committing>,
    max_ts: i64,
    /// Without checkpoints: write pending ids through once there are this many.
    autoflush: Option<usize>,
    /// Which ids may be stored or pending.
    filter: IdFilter,
    /// Ids being written through to a scratch database in the background (see [`Flush`]).
    flushing: Option<Flush>,
}

/// A set of ids a writer thread is putting in RocksDB; they are read from here until it is done.
struct Flush {
    ids: Arc<IdSet>,
    writer: std::thread::JoinHandle<()>,
}

impl Flush {
    /// Writes `ids` (those not expired before `oldest_kept`) to `db` on a thread of its own.
    fn start(db: Arc<DB>, ids: IdSet, oldest_kept: i64) -> Flush {
        let ids = Arc::new(ids);
        let to_write = ids.clone();
        let writer = std::thread::Builder::new().name("passflow-dedup".into()).spawn(move || {
            let mut live = live(to_write.iter(), oldest_kept).peekable();
            let mut key = ID_PREFIX.to_vec();
            while live.peek().is_some() {
                // Each chunk in key order, straight into one write batch, with one key buffer.
                let mut batch = rocksdb::WriteBatch::default();
                for (id, (digest, ts)) in in_order(live.by_ref().take(WRITE_CHUNK)) {
                    key.truncate(ID_PREFIX.len());
                    key.extend_from_slice(id.as_bytes());
                    batch.put(&key, value(*digest, *ts));
                }
                // A scratch database needs no durability.
                if let Err(e) = crate::core::write_batch(&db, &[], Some(batch), false) {
                    tracing::error!(error = %e, "writing deduplication state to the scratch database failed");
                }
            }
        });
        // As with `std::thread::spawn`, a thread that cannot start is fatal.
        Flush { ids, writer: writer.expect("the deduplication writer starts") }
    }

    fn wait(self) {
        if self.writer.join().is_err() {
            tracing::error!("the deduplication writer panicked");
        }
    }
}

/// Calls `f` with every id stored in `db` (its bytes, digest and time), in key order, without
/// copying them out of RocksDB.
fn for_each_stored(db: &DB, mut f: impl FnMut(&[u8], u64, i64) -> anyhow::Result<()>) -> anyhow::Result<()> {
    let mut stored = db.raw_iterator();
    stored.seek(ID_PREFIX);
    while let (Some(key), Some(value)) = (stored.key(), stored.value()) {
        // Without a prefix extractor the iterator runs past the prefix.
        if !key.starts_with(ID_PREFIX) {
            break;
        }
        if let Some((digest, ts)) = parse_value(value) {
            f(&key[ID_PREFIX.len()..], digest, ts)?;
        }
        stored.next();
    }
    Ok(stored.status()?)
}

/// Puts of the ids not expired before `oldest_kept`, in key order.
fn sorted_writes<'a>(ids: impl Iterator<Item = (&'a Text, &'a (u64, i64))>, oldest_kept: i64) -> Vec<StateWrite> {
    in_order(live(ids, oldest_kept))
        .into_iter()
        .map(|(id, (digest, ts))| StateWrite::Put(id_key(id), value(*digest, *ts).to_vec()))
        .collect()
}

/// The ids not expired before `oldest_kept`.
fn live<'a>(
    ids: impl Iterator<Item = (&'a Text, &'a (u64, i64))>,
    oldest_kept: i64,
) -> impl Iterator<Item = (&'a Text, &'a (u64, i64))> {
    ids.filter(move |(_, (_, ts))| *ts >= oldest_kept)
}

/// `ids` in key order (the memtable then inserts each key next to the one before, much
/// cheaper). They are sorted by their first 32 bytes as two numbers first: a comparison of
/// registers settles almost every pair, also for ids that share a long prefix (a date, a
/// checkpoint).
fn in_order<'a>(ids: impl Iterator<Item = (&'a Text, &'a (u64, i64))>) -> Vec<(&'a Text, &'a (u64, i64))> {
    let mut ids: Vec<_> = ids.map(|(id, v)| (leading_bytes(id.as_bytes()), id, v)).collect();
    ids.sort_unstable_by(|a, b| a.0.cmp(&b.0).then_with(|| a.1.cmp(b.1)));
    ids.into_iter().map(|(_, id, v)| (id, v)).collect()
}

/// The first 32 bytes of `bytes` (zeros past its end) as two big-endian numbers: pairs in the
/// order of their byte strings, except that strings equal in their first 32 bytes (or
/// differing only by trailing zero bytes) tie.
fn leading_bytes(bytes: &[u8]) -> (u128, u128) {
    let mut lead = [0; 32];
    let n = bytes.len().min(32);
    lead[..n].copy_from_slice(&bytes[..n]);
    let (high, low) = lead.split_at(16);
    (u128::from_be_bytes(high.try_into().expect("16 bytes")), u128::from_be_bytes(low.try_into().expect("16 bytes")))
}

fn id_key(id: &str) -> Vec<u8> {
    [ID_PREFIX, id.as_bytes()].concat()
}

fn value(digest: u64, ts: i64) -> [u8; 16] {
    let mut v = [0; 16];
    v[..8].copy_from_slice(&digest.to_le_bytes());
    v[8..].copy_from_slice(&ts.to_le_bytes());
    v
}

/// (digest, ts) of a stored value.
pub fn parse_value(v: &[u8]) -> Option<(u64, i64)> {
    Some((u64::from_le_bytes(v.get(..8)?.try_into().ok()?), i64::from_le_bytes(v.get(8..16)?.try_into().ok()?)))
}

impl RocksDedup {
    /// `autoflush`: for runs without checkpoints, write ids through after this many. Ids
    /// already in `db` are read once, into the filter (a restore then needs no second read:
    /// ids reach `db` only through this value, which puts them in the filter too).
    pub fn new(
        db: Arc<DB>,
        cutoff: Arc<AtomicI64>,
        horizon_ms: i64,
        autoflush: Option<usize>,
    ) -> anyhow::Result<RocksDedup> {
        let filter = IdFilter::load(&db, horizon_ms)?;
        Ok(RocksDedup {
            db,
            cutoff,
            _scratch: None,
            horizon_ms,
            pending: IdSet::default(),
            committing: Vec::new(),
            max_ts: i64::MIN,
            autoflush,
            filter,
            flushing: None,
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
        // Room for a full set at once: the pages are touched only as ids arrive.
        dedup.pending = IdSet::with_capacity(AUTOFLUSH);
        Ok(dedup)
    }

    /// Hands the pending ids to a background writer (after the one before has finished) and
    /// moves the expiry on.
    fn start_flush(&mut self) {
        self.settle();
        let oldest_kept = self.oldest_kept();
        self.cutoff.fetch_max(oldest_kept, Ordering::Relaxed);
        // The next set is made as large at once (growing it rehashes it over and again).
        let next = IdSet::with_capacity(self.pending.len());
        let ids = std::mem::replace(&mut self.pending, next);
        self.flushing = Some(Flush::start(self.db.clone(), ids, oldest_kept));
    }

    /// Waits until ids being written in the background are in RocksDB.
    fn settle(&mut self) {
        if let Some(flush) = self.flushing.take() {
            flush.wait();
        }
    }

    /// The digest of an id held in memory (pending, in a checkpoint being saved, or being
    /// written) and not expired; `hash` is its [`IdFilter::hash`].
    fn in_memory(&self, id: &str, hash: u64) -> Option<u64> {
        self.pending
            .get(id, hash)
            .or_else(|| self.committing.iter().find_map(|c| c.ids.get(id, hash)))
            .or_else(|| self.flushing.as_ref().and_then(|f| f.ids.get(id, hash)))
            .filter(|(_, ts)| *ts >= self.oldest_kept())
            .map(|(digest, _)| *digest)
    }

    /// Digests of stored ids that are still within the horizon.
    fn lookup(&self, ids: &[&Text]) -> Vec<Option<u64>> {
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
    fn check_batch(&mut self, items: &[(Text, u64, i64)]) -> Vec<DedupVerdict> {
        let hashes: Vec<u64> = items.iter().map(|(id, _, _)| IdFilter::hash(id.as_bytes())).collect();
        // Each id is probed once in the filter (a probe is a cache miss), before the batch:
        // every id in memory, and every live one stored, is in it. An id it does not hold is
        // new and goes into it at once, while its block is at hand (a later copy in the batch
        // is then held, and found pending).
        let held: Vec<bool> = items
            .iter()
            .zip(&hashes)
            .enumerate()
            .map(|(i, ((_, _, ts), hash))| {
                // The blocks of the ids a few places on are asked for ahead, so that the
                // probes' cache misses overlap.
                if let Some(ahead) = hashes.get(i + FILTER_AHEAD) {
                    self.filter.prefetch(*ahead);
                }
                let held = self.filter.may_hold(*hash);
                if !held {
                    self.filter.insert(*hash, *ts);
                }
                held
            })
            .collect();
        // The ids it did not hold are new: they are pending at once (a later copy in the batch
        // finds its first there).
        let new = items.iter().zip(&hashes).zip(&held).filter(|(_, held)| !**held);
        self.pending.insert_new(new.map(|(((id, digest, ts), hash), _)| (id, *hash, (*digest, *ts))));
        // Only an id the filter may hold and that is not in memory can be in RocksDB.
        let unknown: Vec<&Text> = items
            .iter()
            .zip(&hashes)
            .zip(&held)
            .filter(|(((id, _, _), hash), held)| **held && self.in_memory(id, **hash).is_none())
            .map(|(((id, _, _), _), _)| id)
            .collect();
        let stored: FxHashMap<&str, u64> = unknown
            .iter()
            .map(|id| &***id)
            .zip(self.lookup(&unknown))
            .filter_map(|(id, d)| d.map(|d| (id, d)))
            .collect();
        let mut verdicts = Vec::with_capacity(items.len());
        for (((id, digest, ts), hash), held) in items.iter().zip(hashes).zip(held) {
            // An id the filter did not hold is new (almost every pass) and pending already.
            if !held {
                self.max_ts = self.max_ts.max(*ts);
                verdicts.push(DedupVerdict::First);
                continue;
            }
            // One it held may have an earlier copy pending (from this batch or an earlier
            // one) or stored. Putting an id in pending finds a pending copy; an expired entry
            // is taken over.
            let earlier = self.in_memory(id, hash).or_else(|| stored.get(&**id).copied());
            let oldest_kept = self.oldest_kept();
            let first = earlier.or_else(|| self.pending.insert(id, hash, (*digest, *ts), oldest_kept).map(|(d, _)| d));
            verdicts.push(match first {
                Some(d) if d == *digest => DedupVerdict::Identical,
                Some(_) => DedupVerdict::Conflicting,
                None => {
                    // A new id the filter seemed to hold is put in the newest generation too:
                    // the one that seemed to hold it may be dropped before it expires.
                    self.filter.insert(hash, *ts);
                    self.max_ts = self.max_ts.max(*ts);
                    DedupVerdict::First
                }
            });
        }
        self.filter.advance(self.max_ts, self.oldest_kept());
        if self.autoflush.is_some_and(|n| self.pending.len() >= n) {
            self.start_flush();
        }
        verdicts
    }

    fn checkpoint(&mut self, checkpoint_id: u64) -> anyhow::Result<(Vec<u8>, Vec<StateWrite>)> {
        // Pending ids stay in memory, and the expiry stays where it is, until the checkpoint is
        // durable (`committed`); the ids of an earlier one not saved yet are written again
        // with this one: a failed or abandoned checkpoint loses nothing.
        self.settle();
        let room = self.pending.len();
        let ids = std::mem::replace(&mut self.pending, IdSet::with_capacity(room));
        let earlier = self.committing.iter().flat_map(|c| c.ids.iter());
        let oldest_kept = self.oldest_kept();
        let mut writes = sorted_writes(ids.iter().chain(earlier), oldest_kept);
        self.committing.push(Committing { checkpoint_id, ids, oldest_kept });
        writes.push(StateWrite::Put(COMMITTED_KEY.to_vec(), checkpoint_id.to_le_bytes().to_vec()));
        let mut marker = vec![1u8];
        marker.extend_from_slice(&checkpoint_id.to_le_bytes());
        marker.extend_from_slice(&self.max_ts.to_le_bytes());
        Ok((marker, writes))
    }

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.settle();
        self.pending.clear();
        self.committing.clear();
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
                for (id, digest, ts) in memory.entries() {
                    self.filter.insert(IdFilter::hash(id.as_bytes()), ts);
                    writes.push(StateWrite::Put(id_key(&id), value(digest, ts).to_vec()));
                }
                self.max_ts = memory.max_ts();
                crate::core::apply_writes(&self.db, &writes, None)
            }
        }
    }

    fn export(&mut self) -> anyhow::Result<Vec<u8>> {
        self.settle();
        let mut memory = Deduplicator::new(self.horizon_ms);
        let oldest_kept = self.oldest_kept();
        for_each_stored(&self.db, |id, digest, ts| {
            if ts >= oldest_kept {
                memory.check(&std::str::from_utf8(id)?.into(), digest, ts);
            }
            Ok(())
        })?;
        // Only the live ones, as from RocksDB: what is exported then does not depend on the
        // order ids are held in (expiry in `memory` follows the order they are checked in).
        let held = self.committing.iter().flat_map(|c| c.ids.iter()).chain(self.pending.iter());
        for (id, (digest, ts)) in live(held, oldest_kept) {
            memory.check(id, *digest, *ts);
        }
        memory.export()
    }

    fn committed(&mut self, checkpoint_id: u64) {
        // The expiry moves to the saved checkpoint's, not to where the input has got to since:
        // a restart resumes from that checkpoint and needs every id it holds as live.
        let saved = self.committing.iter().filter(|c| c.checkpoint_id <= checkpoint_id).map(|c| c.oldest_kept).max();
        self.committing.retain(|c| c.checkpoint_id > checkpoint_id);
        if let Some(oldest_kept) = saved {
            self.cutoff.fetch_max(oldest_kept, Ordering::Relaxed);
        }
    }

    fn pending(&self) -> usize {
        self.pending.len()
    }
}

impl Drop for RocksDedup {
    fn drop(&mut self) {
        // Before a scratch database's folder goes.
        self.settle();
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn open(dir: &std::path::Path) -> Arc<DB> {
        Arc::new(crate::core::checkpoint::open_state_db(dir, Arc::new(AtomicI64::new(i64::MIN))).expect("opens"))
    }

    fn stored_times(db: &DB) -> Vec<i64> {
        let mut times = Vec::new();
        for_each_stored(db, |_, _, ts| Ok(times.push(ts))).expect("reads");
        times.sort_unstable();
        times
    }

    #[test]
    fn a_compaction_drops_the_ids_expired_before_the_cutoff_and_keeps_the_rest() {
        let dir = tempfile::tempdir().unwrap();
        let cutoff = Arc::new(AtomicI64::new(i64::MIN));
        let db = crate::core::checkpoint::open_state_db(dir.path(), cutoff.clone()).expect("opens");
        let ids: Vec<(Text, (u64, i64))> =
            (0..1_000i64).map(|i| (Text::new(&format!("p{i:05}")), (i as u64, i * 1_000))).collect();
        let mut writes = sorted_writes(ids.iter().map(|(id, v)| (id, v)), i64::MIN);
        writes.push(StateWrite::Put(b"other/key".to_vec(), b"kept".to_vec()));
        crate::core::apply_writes(&db, &writes, None).unwrap();
        db.flush().unwrap();
        cutoff.store(500_000, Ordering::Relaxed);
        db.compact_range::<&[u8], &[u8]>(None, None);
        assert_eq!(stored_times(&db), (500..1_000).map(|i| i * 1_000).collect::<Vec<_>>());
        assert_eq!(db.get(b"other/key").unwrap().as_deref(), Some(&b"kept"[..]));
    }

    #[test]
    fn new_ids_are_put_in_by_the_region_of_their_place_and_in_the_order_they_came_within_one() {
        let new: Vec<(u64, u32)> =
            (0..5_000u64).map(|i| (mix(i).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ (i << 40), i as u32)).collect();
        let sorted = by_region(new.clone(), |(mixed, _)| IdSet::region(*mixed), (0, u32::MAX));
        let mut seen: Vec<(u64, u32)> = sorted.clone();
        seen.sort_unstable_by_key(|(_, at)| *at);
        assert_eq!(seen, new, "every id once, as it was");
        for pair in sorted.windows(2) {
            let ((a, i), (b, j)) = ((IdSet::region(pair[0].0), pair[0].1), (IdSet::region(pair[1].0), pair[1].1));
            assert!(a < b || (a == b && i < j), "{pair:?} out of order");
        }
        for slots in [16usize, 1 << 10, 1 << 16, 100_003] {
            let set = IdSet { ids: Vec::new(), slots: vec![0; slots] };
            // Each region's slots (least, most) lie at or after the ones of the region before.
            let mut spans: std::collections::BTreeMap<usize, (usize, usize)> = Default::default();
            for (mixed, _) in &sorted {
                let (home, span) = (set.home(*mixed), spans.entry(IdSet::region(*mixed)).or_insert((usize::MAX, 0)));
                *span = (span.0.min(home), span.1.max(home));
            }
            let spans: Vec<(usize, usize)> = spans.into_values().collect();
            assert!(spans.windows(2).all(|w| w[0].1 <= w[1].0), "regions in the order of their slots ({slots} slots)");
        }
    }

    #[test]
    fn an_id_set_finds_each_id_it_holds_through_growth_and_takes_over_expired_ones() {
        let mut set = IdSet::with_capacity(4);
        let id = |i: u32| Text::from(format!("pass-{i}").as_str());
        let hash = |t: &Text| IdFilter::hash(t.as_bytes());
        let first: Vec<Text> = (0..3_000).map(id).collect();
        set.insert_new(first.iter().map(|t| (t, hash(t), (u64::from(t.as_bytes()[5]), 10))));
        for i in 3_000..6_000 {
            let t = id(i);
            assert_eq!(set.insert(&t, hash(&t), (7, 20), 0), None, "{t} is new");
        }
        assert_eq!(set.len(), 6_000);
        assert!(set.slots.len() * 3 >= set.len() * 4, "at most three quarters full");
        for i in 0..6_000 {
            let t = id(i);
            let want = if i < 3_000 { (u64::from(t.as_bytes()[5]), 10) } else { (7, 20) };
            assert_eq!(set.get(&t, hash(&t)), Some(&want), "{t}");
        }
        assert_eq!(set.get("pass-6000", hash(&id(6_000))), None);
        let t = id(5);
        assert_eq!(set.insert(&t, hash(&t), (9, 30), 10), Some((u64::from(b'5'), 10)), "live: the held copy stands");
        assert_eq!(set.insert(&t, hash(&t), (9, 30), 11), None, "expired: taken over");
        assert_eq!(set.get(&t, hash(&t)), Some(&(9, 30)));
        assert_eq!(set.len(), 6_000, "taken over in place");
        set.clear();
        assert_eq!((set.len(), set.get(&t, hash(&t))), (0, None));
    }

    /// What an id set is asked to do, on ids drawn from a small pool (so that they repeat).
    #[derive(Clone, Debug)]
    enum SetOp {
        /// A batch of new ids: the last copy of an id in it wins.
        New(Vec<(u16, i64)>),
        /// One id with its time, and the oldest time still kept.
        Insert(u16, i64, i64),
        Get(u16),
    }

    fn set_op() -> impl proptest::strategy::Strategy<Value = SetOp> {
        use proptest::prelude::*;
        let id = 0u16..600;
        prop_oneof![
            proptest::collection::vec((id.clone(), 0i64..100), 0..300).prop_map(SetOp::New),
            (id.clone(), 0i64..100, 0i64..100).prop_map(|(i, ts, kept)| SetOp::Insert(i, ts, kept)),
            id.prop_map(SetOp::Get),
        ]
    }

    proptest::proptest! {
        #[test]
        fn an_id_set_answers_as_a_map_of_its_ids_would_through_growth(
            ops in proptest::collection::vec(set_op(), 1..40),
            first_room in 0usize..64,
        ) {
            let mut set = IdSet::with_capacity(first_room);
            let mut model: std::collections::HashMap<u16, (u64, i64)> = Default::default();
            let text = |i: u16| Text::from(format!("id-{i}").repeat(usize::from(i % 5) + 1).as_str());
            let hash = |t: &Text| IdFilter::hash(t.as_bytes());
            for (n, op) in ops.into_iter().enumerate() {
                let digest = n as u64;
                match op {
                    SetOp::New(batch) => {
                        let ids: Vec<(Text, i64)> = batch.iter().map(|(i, ts)| (text(*i), *ts)).collect();
                        set.insert_new(ids.iter().map(|(t, ts)| (t, hash(t), (digest, *ts))));
                        for (i, ts) in batch {
                            model.insert(i, (digest, ts));
                        }
                    }
                    SetOp::Insert(i, ts, kept) => {
                        let t = text(i);
                        let want = match model.get(&i) {
                            Some(held) if held.1 >= kept => Some(*held),
                            _ => {
                                model.insert(i, (digest, ts));
                                None
                            }
                        };
                        proptest::prop_assert_eq!(set.insert(&t, hash(&t), (digest, ts), kept), want);
                    }
                    SetOp::Get(i) => {
                        let t = text(i);
                        proptest::prop_assert_eq!(set.get(&t, hash(&t)).copied(), model.get(&i).copied());
                    }
                }
                proptest::prop_assert_eq!(set.len(), model.len());
                proptest::prop_assert!(set.slots.len() * 3 >= set.len() * 4, "at most three quarters full");
            }
            for (i, held) in &model {
                let t = text(*i);
                proptest::prop_assert_eq!(set.get(&t, hash(&t)), Some(held));
            }
        }
    }

    #[test]
    fn writes_come_in_the_byte_order_of_the_ids() {
        let ids = [
            "b",
            "ab",
            "ab\u{0}",
            "ab\u{0}x",
            "abc",
            "0123456789abcdefX",
            "0123456789abcdef",
            "0123456789abcdef\u{0}",
            "0123456789abcdeé",
            "0123456789abcdeeé",
            "0123456789abcdef0123456789abcdef",
            "0123456789abcdef0123456789abcdef\u{0}",
            "0123456789abcdef0123456789abcdef-2",
            "0123456789abcdef0123456789abcde",
            "0123456789abcdef0123456789abcdf",
            "长ID",
            "",
        ];
        let values: Vec<(Text, (u64, i64))> = ids.iter().map(|id| (Text::from(*id), (1, 5))).collect();
        let keys: Vec<Vec<u8>> = sorted_writes(values.iter().map(|(id, v)| (id, v)), 0)
            .into_iter()
            .map(|w| match w {
                StateWrite::Put(key, _) => key,
                other => panic!("{other:?}"),
            })
            .collect();
        let mut want: Vec<Vec<u8>> = ids.iter().map(|id| id_key(id)).collect();
        want.sort();
        assert_eq!(keys, want);
    }

    fn items(ids: &[(&str, u64, i64)]) -> Vec<(Text, u64, i64)> {
        ids.iter().map(|(id, digest, ts)| (Text::from(*id), *digest, *ts)).collect()
    }

    #[test]
    fn resends_are_found_after_their_ids_left_memory_and_after_a_reopen() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        let mut dedup =
            RocksDedup::new(db.clone(), Arc::new(AtomicI64::new(i64::MIN)), 3_600_000, Some(2)).expect("empty state");
        let first = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 2, 2_000), ("c", 3, 3_000)]));
        assert_eq!(first, [DedupVerdict::First, DedupVerdict::First, DedupVerdict::First]);
        assert_eq!(dedup.pending(), 0, "handed to the writer");
        assert!(
            dedup.flushing.as_ref().is_some_and(|f| f.ids.get("c", IdFilter::hash(b"c")).is_some()),
            "readable while written"
        );
        dedup.settle();
        let again = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 9, 2_000), ("d", 4, 4_000)]));
        assert_eq!(again, [DedupVerdict::Identical, DedupVerdict::Conflicting, DedupVerdict::First]);
        drop(dedup);
        let mut reopened =
            RocksDedup::new(db, Arc::new(AtomicI64::new(i64::MIN)), 3_600_000, None).expect("state readable");
        let verdicts = reopened.check_batch(&items(&[("c", 3, 3_000), ("c", 7, 3_000), ("e", 5, 5_000)]));
        assert_eq!(verdicts, [DedupVerdict::Identical, DedupVerdict::Conflicting, DedupVerdict::First]);
    }

    #[test]
    fn an_export_holds_the_live_ids_whatever_order_they_came_in() {
        let hour = 3_600_000;
        // One batch: an id then one a horizon later (the first has expired), and the reverse.
        for batch in [[("old", 1, 0), ("new", 2, hour + 120_000)], [("new", 2, hour + 120_000), ("old", 1, 0)]] {
            let dir = tempfile::tempdir().expect("temp dir");
            let mut dedup =
                RocksDedup::new(open(dir.path()), Arc::new(AtomicI64::new(i64::MIN)), hour, None).expect("empty state");
            dedup.check_batch(&items(&batch));
            let mut memory = Deduplicator::new(hour);
            memory.restore(&dedup.export().expect("exports")).expect("reads back");
            assert_eq!(memory.len(), 1, "only the live id: {batch:?}");
            assert_eq!(memory.check(&Text::from("new"), 2, hour + 120_000), DedupVerdict::Identical);
        }
    }

    #[test]
    fn an_id_repeated_in_one_batch_is_judged_by_its_first_copy_even_past_a_full_generation() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dedup =
            RocksDedup::new(open(dir.path()), Arc::new(AtomicI64::new(i64::MIN)), i64::MAX / 4, None).expect("empty");
        // One batch that fills the first generation: its repeats come after a new one opened.
        let n = MIN_FILTER_IDS + 10;
        let ids: Vec<String> = (0..n).map(|i| format!("id-{i}")).collect();
        let mut batch: Vec<(Text, u64, i64)> = ids.iter().map(|id| (Text::from(id.as_str()), 1, 1_000)).collect();
        for i in [0, 1, MIN_FILTER_IDS - 1, MIN_FILTER_IDS + 5] {
            batch.push((Text::from(ids[i].as_str()), 1, 1_000));
            batch.push((Text::from(ids[i].as_str()), 2, 1_000));
        }
        let verdicts = dedup.check_batch(&batch);
        assert!(dedup.filter.generations.len() > 1, "a second generation opened in the batch");
        assert!(verdicts[..n].iter().all(|v| *v == DedupVerdict::First));
        let repeats = [DedupVerdict::Identical, DedupVerdict::Conflicting];
        assert_eq!(verdicts[n..], repeats.repeat(4));
    }

    #[test]
    fn the_filter_holds_every_id_until_it_expires_and_few_others() {
        let mut filter = IdFilter::new(1_000);
        let hash = |i: u64| IdFilter::hash(format!("pass-{i}").as_bytes());
        // One id per ms of event time; the newest time is i, so ids before i - 1000 expire.
        for i in 0..5_000u64 {
            filter.insert(hash(i), i as i64);
            filter.advance(i as i64, i as i64 - 1_000);
            let oldest_live = i.saturating_sub(1_000);
            for j in [oldest_live, (oldest_live + i) / 2, i] {
                assert!(filter.may_hold(hash(j)), "id {j} is live at {i}");
            }
        }
        let kept = &filter.generations[..filter.generations.len() - 1];
        assert!(kept.iter().all(|g| g.newest >= 5_000 - 1 - 1_000), "expired generations go");
        // Filled to what it was sized for, about 1% of unseen ids pass.
        let n = MIN_FILTER_IDS as u64;
        let mut full = Bloom::new(n as usize, 0);
        (0..n).for_each(|i| full.insert(hash(i), 0));
        assert!(full.is_full());
        assert!((0..n).all(|i| full.may_hold(hash(i))));
        let false_positives = (n..n + 200_000).filter(|i| full.may_hold(hash(*i))).count();
        assert!(false_positives < 4_000, "{false_positives} of 200000 unseen ids pass the filter");
    }

    #[test]
    fn a_filter_given_many_more_ids_than_its_first_size_still_passes_few_unseen_ones() {
        // A day's ids all within one horizon: 4 times the first size.
        let mut filter = IdFilter::new(i64::MAX);
        let hash = |i: u64| IdFilter::hash(format!("pass-{i}").as_bytes());
        let ids = 4 * MIN_FILTER_IDS as u64;
        for i in 0..ids {
            filter.insert(hash(i), 0);
            if i % 4096 == 0 {
                filter.advance(0, 0);
            }
        }
        assert!((0..ids).step_by(7).all(|i| filter.may_hold(hash(i))), "no seen id is missing");
        assert_eq!(filter.generations.len(), 2, "the second, four times the first, takes the rest");
        let unseen = 200_000u64;
        let false_positives = (ids..ids + unseen).filter(|i| filter.may_hold(hash(*i))).count();
        // About 1% for each generation filled (the first), less for one three quarters full.
        assert!(false_positives < 4_000, "{false_positives} of {unseen} unseen ids pass the filter");
    }

    #[test]
    fn a_scratch_set_larger_than_one_write_reaches_rocksdb_whole_and_is_read_back() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        let n = WRITE_CHUNK + WRITE_CHUNK / 2;
        let mut dedup =
            RocksDedup::new(db.clone(), Arc::new(AtomicI64::new(i64::MIN)), i64::MAX / 4, Some(n)).expect("empty");
        let ids: Vec<(Text, u64, i64)> =
            (0..n).map(|i| (Text::from(format!("pass-{i:07}")), i as u64, 1_000)).collect();
        for batch in ids.chunks(4096) {
            assert!(dedup.check_batch(batch).iter().all(|v| *v == DedupVerdict::First));
        }
        // Written in two writes; once done, the ids are read from RocksDB alone.
        dedup.settle();
        assert_eq!(dedup.pending(), 0);
        let mut stored = 0;
        for_each_stored(&db, |_, _, _| {
            stored += 1;
            Ok(())
        })
        .expect("readable");
        assert_eq!(stored, n);
        let again: Vec<(Text, u64, i64)> = ids.iter().step_by(997).cloned().collect();
        assert!(dedup.check_batch(&again).iter().all(|v| *v == DedupVerdict::Identical));
        let changed: Vec<(Text, u64, i64)> = again.iter().map(|(id, d, ts)| (id.clone(), d + 1, *ts)).collect();
        assert!(dedup.check_batch(&changed).iter().all(|v| *v == DedupVerdict::Conflicting));
    }

    #[test]
    fn an_id_older_than_the_horizon_reads_as_new_in_memory_as_in_rocksdb() {
        let dir = tempfile::tempdir().expect("temp dir");
        let mut dedup = RocksDedup::new(open(dir.path()), Arc::new(AtomicI64::new(i64::MIN)), 60_000, Some(1))
            .expect("empty state");
        dedup.check_batch(&items(&[("old", 1, 0), ("new", 2, 600_000)]));
        assert!(dedup.filter.may_hold(IdFilter::hash(b"new")));
        assert_eq!(dedup.check_batch(&items(&[("old", 1, 0)])), [DedupVerdict::First]);
    }

    #[test]
    fn the_expiry_moves_to_the_horizon_of_the_checkpoint_saved_not_past_it() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        let cutoff = Arc::new(AtomicI64::new(i64::MIN));
        let mut dedup = RocksDedup::new(db.clone(), cutoff.clone(), 1_000, None).expect("empty state");
        dedup.check_batch(&items(&[("a", 1, 10_000)]));
        let (_, writes) = dedup.checkpoint(1).expect("checkpoint 1");
        // The input goes on while checkpoint 1 is saved: a restart would resume from 1, for
        // which ids from 9 s on are live.
        dedup.check_batch(&items(&[("b", 2, 50_000)]));
        crate::core::apply_writes(&db, &writes, None).expect("checkpoint 1 saved");
        dedup.committed(1);
        assert_eq!(cutoff.load(Ordering::Relaxed), 9_000);
        let (_, writes) = dedup.checkpoint(2).expect("checkpoint 2");
        crate::core::apply_writes(&db, &writes, None).expect("checkpoint 2 saved");
        dedup.committed(2);
        assert_eq!(cutoff.load(Ordering::Relaxed), 49_000);
    }

    #[test]
    fn ids_taken_while_a_checkpoint_is_saved_stay_held_until_the_next_one_and_an_unsaved_one_is_written_again() {
        let dir = tempfile::tempdir().expect("temp dir");
        let db = open(dir.path());
        let mut dedup =
            RocksDedup::new(db.clone(), Arc::new(AtomicI64::new(i64::MIN)), 3_600_000, None).expect("empty state");
        let put_keys = |writes: &[StateWrite]| -> Vec<Vec<u8>> {
            writes.iter().filter_map(|w| if let StateWrite::Put(k, _) = w { Some(k.clone()) } else { None }).collect()
        };
        dedup.check_batch(&items(&[("a", 1, 1_000)]));
        let (_, first) = dedup.checkpoint(1).expect("checkpoint 1");
        assert_eq!(put_keys(&first)[0], id_key("a"));
        // While checkpoint 1 is saved, `b` arrives; `a` is still known.
        let verdicts = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 2, 2_000)]));
        assert_eq!(verdicts, [DedupVerdict::Identical, DedupVerdict::First]);
        // Checkpoint 2 is taken before 1 is saved: it writes `a` again with `b`.
        let (_, second) = dedup.checkpoint(2).expect("checkpoint 2");
        assert_eq!(put_keys(&second)[..2], [id_key("a"), id_key("b")]);
        // 1 is saved: `b` (in checkpoint 2, not yet saved) stays held; `c` comes after both.
        crate::core::apply_writes(&db, &first, None).expect("checkpoint 1 saved");
        dedup.committed(1);
        let verdicts = dedup.check_batch(&items(&[("b", 2, 2_000), ("c", 3, 3_000)]));
        assert_eq!(verdicts, [DedupVerdict::Identical, DedupVerdict::First]);
        crate::core::apply_writes(&db, &second, None).expect("checkpoint 2 saved");
        dedup.committed(2);
        assert_eq!(dedup.pending(), 1, "only `c` waits for a checkpoint");
        assert!(dedup.committing.is_empty());
        let verdicts = dedup.check_batch(&items(&[("a", 1, 1_000), ("b", 2, 2_000), ("c", 3, 3_000)]));
        assert_eq!(
            verdicts,
            [DedupVerdict::Identical, DedupVerdict::Identical, DedupVerdict::Identical],
            "`c` from memory"
        );
    }
}
