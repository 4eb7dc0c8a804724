//! First entry into the city (首次入城): the earliest inbound pass of a vehicle at a boundary
//! checkpoint, ever, by (ts, pass_id). Exempt from lateness. The record lives in a first-entry
//! store — Redis in production (never expires; one Lua script compares and sets, so the
//! earliest pass wins whatever the arrival order) or, embedded, a RocksDB of its own beside the
//! checkpoints (the operator's checkpointed state when there is no state directory). A pass that becomes the first emits the row; an earlier pass arriving
//! later corrects it under a higher revision; the stored first offered again (a replay) is
//! emitted again unchanged, so a crash between emission and the sink loses nothing.

use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::City;
use crate::results::FirstEntryRow;
use anyhow::Context as _;
use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

const STATE_VERSION: u32 = 1;
const MAX_BACKOFF: Duration = Duration::from_secs(10);

/// An inbound boundary pass offered as a vehicle's first entry.
#[derive(Clone, Debug, PartialEq)]
pub struct Candidate {
    /// `plate:colour`
    pub vehicle: String,
    pub ts: i64,
    pub pass_id: String,
    pub checkpoint_id: String,
}

/// Where first entries are kept.
pub trait FirstEntryStore: Send {
    /// Offers candidates in order; for each, the revision of the stored first entry when the
    /// candidate is it (just set, corrected, or offered again), else `None`.
    fn offer(&mut self, candidates: &[Candidate]) -> anyhow::Result<Vec<Option<u32>>>;

    /// The store's part of a checkpoint (the embedded store's records; nothing for Redis).
    fn snapshot(&self) -> Vec<u8> {
        Vec::new()
    }

    fn restore(&mut self, _bytes: &[u8]) -> anyhow::Result<()> {
        Ok(())
    }

    /// Every record, for a savepoint: what [`FirstEntryStore::restore`] takes back (a store
    /// outside the checkpoints must still travel with a savepoint to another state folder).
    fn export(&self) -> anyhow::Result<Vec<u8>> {
        Ok(self.snapshot())
    }
}

/// A stored first entry: (ts, pass_id, checkpoint_id, revision).
type Stored = (i64, String, String, u32);

/// First entries in memory, checkpointed with the operator.
#[derive(Default)]
pub struct EmbeddedFirstEntries {
    /// vehicle → (ts, pass_id, checkpoint_id, revision)
    records: BTreeMap<String, Stored>,
}

impl FirstEntryStore for EmbeddedFirstEntries {
    fn offer(&mut self, candidates: &[Candidate]) -> anyhow::Result<Vec<Option<u32>>> {
        Ok(candidates
            .iter()
            .map(|c| match self.records.get_mut(&c.vehicle) {
                None => {
                    self.records.insert(c.vehicle.clone(), (c.ts, c.pass_id.clone(), c.checkpoint_id.clone(), 0));
                    Some(0)
                }
                Some(r) if (c.ts, c.pass_id.as_bytes()) < (r.0, r.1.as_bytes()) => {
                    *r = (c.ts, c.pass_id.clone(), c.checkpoint_id.clone(), r.3 + 1);
                    Some(r.3)
                }
                Some(r) => (r.1 == c.pass_id).then_some(r.3),
            })
            .collect())
    }

    fn snapshot(&self) -> Vec<u8> {
        serde_json::to_vec(&self.records).unwrap_or_default()
    }

    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        self.records = if bytes.is_empty() { BTreeMap::new() } else { serde_json::from_slice(bytes)? };
        Ok(())
    }
}

/// First entries in a RocksDB of their own (the embedded default with RocksDB state): like
/// Redis, a store outside the checkpoints that never expires, so the state does not grow with
/// every vehicle ever seen; compare-and-set per candidate.
pub struct RocksFirstEntries {
    db: rocksdb::DB,
}

impl RocksFirstEntries {
    pub fn open(path: &std::path::Path) -> anyhow::Result<RocksFirstEntries> {
        let mut options = rocksdb::Options::default();
        options.create_if_missing(true);
        let db = rocksdb::DB::open(&options, path)
            .map_err(|e| anyhow::anyhow!("opening the first-entry store {}: {e}", path.display()))?;
        Ok(RocksFirstEntries { db })
    }
}

impl FirstEntryStore for RocksFirstEntries {
    fn offer(&mut self, candidates: &[Candidate]) -> anyhow::Result<Vec<Option<u32>>> {
        let mut out = Vec::with_capacity(candidates.len());
        for c in candidates {
            let stored: Option<Stored> =
                self.db.get(c.vehicle.as_bytes())?.map(|v| serde_json::from_slice(&v)).transpose()?;
            let (set, revision) = match stored {
                None => (true, Some(0)),
                Some(r) if (c.ts, c.pass_id.as_bytes()) < (r.0, r.1.as_bytes()) => (true, Some(r.3 + 1)),
                Some(r) => (false, (r.1 == c.pass_id).then_some(r.3)),
            };
            if set {
                let record = (c.ts, &c.pass_id, &c.checkpoint_id, revision.unwrap_or(0));
                self.db.put(c.vehicle.as_bytes(), serde_json::to_vec(&record)?)?;
            }
            out.push(revision);
        }
        // Durable before the checkpoint that covers these passes completes.
        self.db.flush_wal(true)?;
        Ok(out)
    }

    /// Checkpoints carry nothing (the store is durable on its own); a savepoint's records are
    /// merged in, the earlier pass winning as in [`FirstEntryStore::offer`]. One that replaces a
    /// record of this store takes a revision above it, so that its row, once emitted, replaces
    /// the row written for the record it replaced.
    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let records: BTreeMap<String, Stored> =
            serde_json::from_slice(bytes).context("reading the first entries of a savepoint")?;
        for (vehicle, mut record) in records {
            let stored: Option<Stored> =
                self.db.get(vehicle.as_bytes())?.map(|v| serde_json::from_slice(&v)).transpose()?;
            match stored {
                Some(s) if (record.0, record.1.as_bytes()) >= (s.0, s.1.as_bytes()) => continue,
                Some(s) => record.3 = record.3.max(s.3 + 1),
                None => {}
            }
            self.db.put(vehicle.as_bytes(), serde_json::to_vec(&record)?)?;
        }
        self.db.flush_wal(true)?;
        Ok(())
    }

    fn export(&self) -> anyhow::Result<Vec<u8>> {
        let mut records: BTreeMap<String, Stored> = BTreeMap::new();
        for entry in self.db.iterator(rocksdb::IteratorMode::Start) {
            let (key, value) = entry?;
            records.insert(String::from_utf8(key.to_vec())?, serde_json::from_slice(&value)?);
        }
        Ok(serde_json::to_vec(&records)?)
    }
}

/// What both scripts share: the order of passes (ties on time broken by the pass ids' bytes,
/// not the locale's collation) and the writing of a record.
const PRELUDE: &str = r#"
local function bytes_less(a, b)
  local n = math.min(#a, #b)
  for i = 1, n do
    local x, y = string.byte(a, i), string.byte(b, i)
    if x ~= y then return x < y end
  end
  return #a < #b
end
-- Whether the pass (ts, id) comes before the stored one (`cur`: HMGET ts, pass_id, rev).
local function earlier(ts, id, cur)
  local cts = tonumber(cur[1])
  return ts < cts or (ts == cts and bytes_less(id, cur[2]))
end
local function put(key, ts_text, id, cp, rev)
  redis.call('HSET', key, 'ts', ts_text, 'pass_id', id, 'checkpoint_id', cp, 'rev', rev)
end
"#;

/// Compares and sets every candidate of a batch in one round trip. KEYS: one hash per
/// vehicle; ARGV: ts, pass_id, checkpoint_id per key. Returns one revision per key, or -1.
const OFFER_SCRIPT: &str = r#"
local out = {}
for i, key in ipairs(KEYS) do
  local ts, id, cp = tonumber(ARGV[3 * i - 2]), ARGV[3 * i - 1], ARGV[3 * i]
  local cur = redis.call('HMGET', key, 'ts', 'pass_id', 'rev')
  if not cur[1] then
    put(key, ARGV[3 * i - 2], id, cp, 0)
    out[i] = 0
  elseif earlier(ts, id, cur) then
    out[i] = tonumber(cur[3]) + 1
    put(key, ARGV[3 * i - 2], id, cp, out[i])
  elseif id == cur[2] then
    out[i] = tonumber(cur[3])
  else
    out[i] = -1
  end
end
return out
"#;

/// Merges a savepoint's records: KEYS one hash per vehicle; ARGV ts, pass_id, checkpoint_id,
/// revision per key. A record earlier than the stored one replaces it, under a revision above
/// the stored one's (its row, once emitted, replaces the row written for the stored one).
const MERGE_SCRIPT: &str = r#"
for i, key in ipairs(KEYS) do
  local ts, id, cp, rev = tonumber(ARGV[4 * i - 3]), ARGV[4 * i - 2], ARGV[4 * i - 1], tonumber(ARGV[4 * i])
  local cur = redis.call('HMGET', key, 'ts', 'pass_id', 'rev')
  if not cur[1] then
    put(key, ARGV[4 * i - 3], id, cp, rev)
  elseif earlier(ts, id, cur) then
    put(key, ARGV[4 * i - 3], id, cp, math.max(rev, tonumber(cur[3]) + 1))
  end
end
return #KEYS
"#;

/// Records merged per round trip when a savepoint is restored.
const RECORDS_PER_TRIP: usize = 1000;

/// How long a reply from Redis is waited for before the connection is given up and the offer
/// made again on a new one (offering the same passes again is harmless).
const REDIS_REPLY_TIMEOUT: Duration = Duration::from_secs(30);

/// First entries in Redis, under `key_prefix`. While Redis is unreachable, or does not answer,
/// the pipeline waits (retrying with back-off): nothing is dropped.
pub struct RedisFirstEntries {
    client: redis::Client,
    connection: Option<redis::Connection>,
    offer_script: redis::Script,
    merge_script: redis::Script,
    key_prefix: String,
    reply_timeout: Duration,
    /// Whether Redis's persistence has been looked at (once, on the first connection).
    durability_checked: bool,
}

impl RedisFirstEntries {
    pub fn open(url: &str, key_prefix: &str) -> anyhow::Result<RedisFirstEntries> {
        let client = redis::Client::open(url).map_err(|e| anyhow::anyhow!("first-entry Redis URL `{url}`: {e}"))?;
        Ok(RedisFirstEntries {
            client,
            connection: None,
            offer_script: redis::Script::new(&format!("{PRELUDE}{OFFER_SCRIPT}")),
            merge_script: redis::Script::new(&format!("{PRELUDE}{MERGE_SCRIPT}")),
            key_prefix: key_prefix.to_owned(),
            reply_timeout: REDIS_REPLY_TIMEOUT,
            durability_checked: false,
        })
    }

    /// Waits this long for a reply (not zero) instead of the default 30 s.
    pub fn with_reply_timeout(mut self, timeout: Duration) -> RedisFirstEntries {
        self.reply_timeout = timeout;
        self
    }

    fn key(&self, vehicle: &str) -> String {
        format!("{}first_entry:{vehicle}", self.key_prefix)
    }

    fn connect(&self) -> redis::RedisResult<redis::Connection> {
        let connection = self.client.get_connection_with_timeout(Duration::from_secs(5))?;
        // Without these, a server that stops answering (a dead host, a lost network) would
        // hold the pipeline on one read for ever.
        connection.set_read_timeout(Some(self.reply_timeout))?;
        connection.set_write_timeout(Some(self.reply_timeout))?;
        Ok(connection)
    }

    /// Warns, once, when Redis keeps no append-only file: first entries written since its last
    /// snapshot are then lost when it restarts (see the README). A server that does not allow
    /// `CONFIG GET` is not asked again.
    fn warn_unless_durable(&mut self, connection: &mut redis::Connection) {
        if std::mem::replace(&mut self.durability_checked, true) {
            return;
        }
        let appendonly: redis::RedisResult<Vec<String>> =
            redis::cmd("CONFIG").arg("GET").arg("appendonly").query(connection);
        if appendonly.is_ok_and(|answer| answer.get(1).is_some_and(|v| v == "no")) {
            tracing::warn!("the first-entry Redis keeps no append-only file (appendonly no): first entries it loses in a restart are raised again by the vehicles' next inbound passes (on the Kafka output; the first_entry table keeps the earliest)");
        }
    }

    /// `call` on a connection, made again on a new one with back-off until it succeeds (each
    /// call here may be made again harmlessly).
    fn retrying<T>(
        &mut self,
        what: &str,
        mut call: impl FnMut(&Self, &mut redis::Connection) -> redis::RedisResult<T>,
    ) -> T {
        let mut backoff = Duration::from_millis(100);
        loop {
            let connection = match self.connection.take() {
                Some(c) => Ok(c),
                None => self.connect().map(|mut c| {
                    self.warn_unless_durable(&mut c);
                    c
                }),
            };
            match connection.and_then(|mut c| call(self, &mut c).map(|answer| (c, answer))) {
                Ok((connection, answer)) => {
                    self.connection = Some(connection);
                    return answer;
                }
                Err(e) => {
                    let retry_in_ms = backoff.as_millis() as u64;
                    // Refused rather than failed: that does not pass by itself, but may be put
                    // right in Redis while the pipeline waits.
                    if e.kind() == redis::ErrorKind::AuthenticationFailed
                        || matches!(e.code(), Some("NOAUTH" | "WRONGPASS" | "NOPERM" | "WRONGTYPE"))
                    {
                        tracing::error!(error = %e, retry_in_ms, "first-entry store (Redis) refused to {what}: check its credentials, its ACL and the keys under the prefix; the pipeline waits and retries");
                    } else {
                        tracing::warn!(error = %e, retry_in_ms, "first-entry store (Redis) failed to {what}; retrying");
                    }
                    std::thread::sleep(backoff);
                    backoff = (backoff * 2).min(MAX_BACKOFF);
                }
            }
        }
    }
}

impl FirstEntryStore for RedisFirstEntries {
    fn offer(&mut self, candidates: &[Candidate]) -> anyhow::Result<Vec<Option<u32>>> {
        if candidates.is_empty() {
            return Ok(Vec::new());
        }
        let revisions: Vec<i64> = self.retrying("offer first entries", |this, connection| {
            let mut invocation = this.offer_script.prepare_invoke();
            for c in candidates {
                invocation.key(this.key(&c.vehicle));
                invocation.arg(c.ts).arg(&c.pass_id).arg(&c.checkpoint_id);
            }
            invocation.invoke(connection)
        });
        Ok(revisions.into_iter().map(|r| u32::try_from(r).ok()).collect())
    }

    /// Checkpoints and savepoints carry nothing of Redis (it is shared, and stays where it is);
    /// the records of the embedded stores that a savepoint or checkpoint carries are merged in,
    /// the earlier pass winning as in [`FirstEntryStore::offer`].
    fn restore(&mut self, bytes: &[u8]) -> anyhow::Result<()> {
        if bytes.is_empty() {
            return Ok(());
        }
        let records: Vec<(String, Stored)> = serde_json::from_slice::<BTreeMap<String, Stored>>(bytes)
            .context("reading the first entries of a savepoint")?
            .into_iter()
            .collect();
        for chunk in records.chunks(RECORDS_PER_TRIP) {
            let _: i64 = self.retrying("merge a savepoint's first entries", |this, connection| {
                let mut invocation = this.merge_script.prepare_invoke();
                for (vehicle, (ts, pass_id, checkpoint_id, revision)) in chunk {
                    invocation.key(this.key(vehicle));
                    invocation.arg(ts).arg(pass_id).arg(checkpoint_id).arg(revision);
                }
                invocation.invoke(connection)
            });
        }
        Ok(())
    }
}

pub struct FirstEntry {
    city: Arc<City>,
    store: Box<dyn FirstEntryStore>,
}

impl FirstEntry {
    pub fn new(city: &Arc<City>, store: Box<dyn FirstEntryStore>) -> FirstEntry {
        FirstEntry { city: city.clone(), store }
    }
}

impl Operator for FirstEntry {
    fn name(&self) -> &'static str {
        "first_entry"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let mut offered = Vec::new();
        for pass in passes {
            let Some(vehicle) = pass.vehicle() else { continue };
            if self.city.is_inbound(pass.checkpoint, pass.direction) != Some(true) {
                continue;
            }
            let candidate = Candidate {
                vehicle: format!("{}:{}", vehicle.plate.as_str(), vehicle.color.code()),
                ts: pass.ts.ms(),
                pass_id: pass.pass_id.to_string(),
                checkpoint_id: self.city.checkpoint(pass.checkpoint).id.to_string(),
            };
            offered.push((candidate, vehicle));
        }
        let candidates: Vec<Candidate> = offered.iter().map(|(c, _)| c.clone()).collect();
        // `offer` retries until the store answers; an error here is a bug in the store.
        let revisions = self.store.offer(&candidates).expect("the first-entry store answers every offer");
        for ((c, vehicle), revision) in offered.into_iter().zip(revisions) {
            if let Some(revision) = revision {
                ctx.out.first_entry.push(FirstEntryRow {
                    plate: vehicle.plate.as_str().into(),
                    plate_color: vehicle.color.code(),
                    ts: c.ts,
                    checkpoint_id: c.checkpoint_id.into(),
                    pass_id: c.pass_id.into(),
                    revision,
                });
            }
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: self.store.snapshot() })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        self.store.restore(&blob.bytes)
    }

    fn export(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: self.store.export()? })
    }
}

/// The batch computation: vehicle (`plate:colour`) → (ts, pass_id, checkpoint) of its earliest
/// inbound boundary pass.
pub fn batch_first_entry(city: &City, passes: &[Pass]) -> BTreeMap<String, (i64, String, String)> {
    let mut first: BTreeMap<String, (i64, String, String)> = BTreeMap::new();
    for p in passes {
        let Some(v) = p.vehicle() else { continue };
        if city.is_inbound(p.checkpoint, p.direction) != Some(true) {
            continue;
        }
        let key = format!("{}:{}", v.plate.as_str(), v.color.code());
        let candidate = (p.ts.ms(), p.pass_id.to_string(), city.checkpoint(p.checkpoint).id.to_string());
        let e = first.entry(key).or_insert_with(|| candidate.clone());
        if (candidate.0, candidate.1.as_bytes()) < (e.0, e.1.as_bytes()) {
            *e = candidate;
        }
    }
    first
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_savepoints_earlier_first_entry_replaces_a_stored_one_above_its_revision() {
        let dir = tempfile::tempdir().unwrap();
        let mut store = RocksFirstEntries::open(dir.path()).unwrap();
        let candidate = |ts: i64, id: &str| Candidate {
            vehicle: "赣A1:2".into(),
            ts,
            pass_id: id.into(),
            checkpoint_id: "KK0001".into(),
        };
        // Stored here at revision 2 (two earlier passes came in late).
        store.offer(&[candidate(300, "c")]).unwrap();
        store.offer(&[candidate(250, "b")]).unwrap();
        assert_eq!(store.offer(&[candidate(200, "a")]).unwrap(), [Some(2)]);
        // A savepoint holds an earlier pass at revision 0, and a later one of another vehicle.
        let saved: BTreeMap<String, Stored> = [
            ("赣A1:2".to_owned(), (100, "x".to_owned(), "KK0002".to_owned(), 0)),
            ("赣A2:2".to_owned(), (500, "y".to_owned(), "KK0003".to_owned(), 0)),
        ]
        .into();
        store.restore(&serde_json::to_vec(&saved).unwrap()).unwrap();
        assert_eq!(store.offer(&[candidate(100, "x")]).unwrap(), [Some(3)], "above the row written for `a`");
        assert_eq!(store.offer(&[candidate(200, "a")]).unwrap(), [None], "no longer the first");
        let second = Candidate { vehicle: "赣A2:2".into(), ..candidate(500, "y") };
        assert_eq!(store.offer(&[second]).unwrap(), [Some(0)]);
    }
}
