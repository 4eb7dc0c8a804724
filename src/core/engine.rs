//! The engine: records in, results out. It runs ingestion, judges lateness against the
//! watermark, drives every operator through its lifecycle and snapshots the lot.

use super::operator::{BatchMemo, Context, Operator, StateBlob, NO_BATCH};
use super::parallel::{Parallel, Phase, Step};
use super::watermark::WatermarkTracker;
use crate::ingest::{Admitted, DeadLetter, Ingest, IngestStats, Judged, Validator};
use crate::model::{Pass, Text};
use crate::reference::City;
use crate::results::{LatePassRow, ResultBatch};
use serde::{Deserialize, Serialize};
use std::sync::Arc;

/// Raw records longer than this are stored cut, with a marker (result tables bound them).
const MAX_STORED_RECORD_BYTES: usize = 64 * 1024;

/// A raw record as it is kept in `dead_letters` and `late_passes`.
fn stored_record(bytes: &[u8]) -> String {
    let cut = bytes.len() > MAX_STORED_RECORD_BYTES;
    let mut text = String::from_utf8_lossy(&bytes[..bytes.len().min(MAX_STORED_RECORD_BYTES)]).into_owned();
    if cut {
        text.push_str(&format!("…[{} bytes in all]", bytes.len()));
    }
    text
}

/// One raw record from a source.
pub struct Record<'a> {
    pub partition: u32,
    /// The record's place in its partition (a line number, a sequence number, an offset): with
    /// the source's name and the partition it is the stable id of a dead letter.
    pub seq: u64,
    pub bytes: &'a [u8],
}

/// The clocks a batch is judged by.
#[derive(Clone, Copy, Debug)]
pub struct Clocks {
    /// `future_timestamp` is judged against this (`None`: no check, as in a replay).
    pub future_now: Option<i64>,
    /// Processing time: idle partitions, `arrived_at` and `received_at`.
    pub processing_now: i64,
}

#[derive(Clone, Copy, Debug)]
pub struct EngineSettings {
    pub out_of_orderness_ms: i64,
    pub idle_timeout_ms: i64,
    pub allowed_lateness_ms: i64,
    /// Live mode: the wall clock moves the watermark when no data comes.
    pub live: bool,
    /// Threads the operators of a large batch run on (1: the engine's own thread only).
    pub threads: usize,
}

/// Everything the engine needs to resume: the input to a checkpoint. `writes` go to RocksDB in
/// the same atomic write as the checkpoint (state kept there rather than in the parts).
#[derive(Clone, Debug, Default, PartialEq)]
pub struct EngineSnapshot {
    pub parts: Vec<(String, StateBlob)>,
    pub writes: Vec<StateWrite>,
}

/// One write to keyed state in RocksDB.
#[derive(Clone, Debug, PartialEq)]
pub enum StateWrite {
    Put(Vec<u8>, Vec<u8>),
    Delete(Vec<u8>),
    /// Keys in `[from, to)`.
    DeleteRange(Vec<u8>, Vec<u8>),
}

/// Applies writes (and `more`, when given) to RocksDB in one atomic, synced write.
pub fn apply_writes(db: &rocksdb::DB, writes: &[StateWrite], more: Option<rocksdb::WriteBatch>) -> anyhow::Result<()> {
    write_batch(db, writes, more, true)
}

/// Applies writes in one atomic write; `durable`: through the write-ahead log, synced.
pub fn write_batch(
    db: &rocksdb::DB,
    writes: &[StateWrite],
    more: Option<rocksdb::WriteBatch>,
    durable: bool,
) -> anyhow::Result<()> {
    let mut batch = more.unwrap_or_default();
    for w in writes {
        match w {
            StateWrite::Put(k, v) => batch.put(k, v),
            StateWrite::Delete(k) => batch.delete(k),
            StateWrite::DeleteRange(from, to) => batch.delete_range(from, to),
        }
    }
    let mut options = rocksdb::WriteOptions::default();
    options.set_sync(durable);
    options.disable_wal(!durable);
    db.write_opt(batch, &options)?;
    Ok(())
}

/// A valid, first-seen record passed on to another engine (scale-out: the per-vehicle stage
/// forwards every pass to the aggregate stage), with the pipelines of this engine it was late for.
#[derive(Clone, Debug, PartialEq)]
pub struct Forwarded {
    pub partition: u32,
    pub seq: u64,
    pub bytes: Vec<u8>,
    pub late: Vec<&'static str>,
}

/// The `&'static` form of a late label read back from a forwarded record (labels are a small
/// fixed set; anything past a bound is ignored).
fn static_label(label: &str) -> Option<&'static str> {
    static KNOWN: std::sync::Mutex<Vec<&'static str>> = std::sync::Mutex::new(Vec::new());
    let mut known = KNOWN.lock().expect("not poisoned");
    if let Some(l) = known.iter().find(|l| **l == label) {
        return Some(l);
    }
    if known.len() >= 64 {
        return None;
    }
    let leaked: &'static str = Box::leak(label.to_owned().into_boxed_str());
    known.push(leaked);
    Some(leaked)
}

#[derive(Serialize, Deserialize)]
struct CoreState {
    watermarks: WatermarkTracker,
    stats: IngestStats,
    /// The operators that ran when the checkpoint was taken (absent from checkpoints of earlier
    /// builds, which did not record them).
    #[serde(default)]
    operators: Option<Vec<String>>,
}

const CORE_STATE_VERSION: u32 = 1;
const DEDUP_STATE_VERSION: u32 = 1;

pub struct Engine {
    city: Arc<City>,
    ingest: Ingest,
    watermarks: WatermarkTracker,
    operators: Vec<Box<dyn Operator>>,
    settings: EngineSettings,
    parallel: Parallel,
    out: ResultBatch,
    /// The processing time of the newest batch or tick.
    processing_now: i64,
    /// Scale-out's per-vehicle stage: valid passes are forwarded (with what they were late for)
    /// instead of written to `late_passes`.
    forwarded: Option<Vec<Forwarded>>,
    /// The room of the last batch's passes (see [`Engine::process_judged`]).
    passes: Vec<Pass>,
}

impl Engine {
    pub fn new(city: Arc<City>, ingest: Ingest, operators: Vec<Box<dyn Operator>>, settings: EngineSettings) -> Engine {
        let watermarks = WatermarkTracker::new(settings.out_of_orderness_ms, settings.idle_timeout_ms);
        let parallel = Parallel::new(settings.threads);
        let out = ResultBatch::default();
        Engine {
            city,
            ingest,
            watermarks,
            operators,
            settings,
            parallel,
            out,
            processing_now: i64::MIN,
            forwarded: None,
            passes: Vec::new(),
        }
    }

    /// Runs every batch, however small, on the engine's threads (tests cover the parallel path
    /// with small batches this way).
    #[cfg(test)]
    pub fn parallel_from(&mut self, passes: usize) {
        self.parallel.min_passes = passes;
    }

    /// Keeps only the named operators (a scale-out stage runs its share of the pipelines).
    pub fn keep_operators(&mut self, names: &[&str]) {
        self.operators.retain(|op| names.contains(&op.name()));
    }

    /// Puts `operator` in the place of the one of the same name (scale-out's per-vehicle stage
    /// runs Top-N's partial form).
    pub fn replace_operator(&mut self, operator: Box<dyn Operator>) {
        if let Some(op) = self.operators.iter_mut().find(|op| op.name() == operator.name()) {
            *op = operator;
        }
    }

    /// Forwards every valid, first-seen record (see [`Engine::take_forwarded`]); lateness is
    /// then recorded by the engine they are forwarded to.
    pub fn forward_passes(&mut self) {
        self.forwarded.get_or_insert_with(Vec::new);
    }

    /// The records forwarded since the last call.
    pub fn take_forwarded(&mut self) -> Vec<Forwarded> {
        self.forwarded.as_mut().map(std::mem::take).unwrap_or_default()
    }

    /// Takes records forwarded by other engines, each with the pipelines it was late for there:
    /// judged without a future-timestamp check (the forwarding engine made it), deduplicated
    /// (a forwarding engine that restarted sends some again), and late rows name both engines'
    /// pipelines.
    pub fn process_forwarded<'a>(
        &mut self,
        source: &str,
        forwarded: Vec<(Record<'a>, Vec<&str>)>,
        processing_now: i64,
    ) {
        let mut judged = Vec::with_capacity(forwarded.len());
        self.ingest.validator().judge_all(forwarded.iter().map(|(r, _)| r.bytes), None, &mut judged);
        let (records, late): (Vec<Record<'a>>, Vec<Vec<&str>>) = forwarded.into_iter().unzip();
        let prior = late.into_iter().map(|labels| labels.into_iter().filter_map(static_label).collect()).collect();
        self.admit_and_run(source, records, &mut judged, prior, processing_now);
    }

    /// Drops the named operators (scale-out runs them in another stage).
    pub fn drop_operators(&mut self, names: &[&str]) {
        self.operators.retain(|op| !names.contains(&op.name()));
    }

    /// A validator to judge records with before [`Engine::process_judged`].
    pub fn validator(&self) -> Validator {
        self.ingest.validator().clone()
    }

    pub fn stats(&self) -> &IngestStats {
        &self.ingest.stats
    }

    pub fn watermark(&self) -> i64 {
        self.watermarks.current()
    }

    /// Each source partition's own watermark (`None` before its first record).
    pub fn partition_watermarks(&self) -> impl Iterator<Item = (u32, Option<i64>)> + '_ {
        self.watermarks.partition_watermarks()
    }

    /// A partition the source now reads.
    pub fn assign(&mut self, partition: u32, processing_now: i64) {
        self.watermarks.assign(partition, processing_now);
    }

    /// Takes a batch of records from the source named `source`.
    pub fn process<'a>(&mut self, source: &str, records: impl IntoIterator<Item = Record<'a>>, clocks: Clocks) {
        let records: Vec<Record<'a>> = records.into_iter().collect();
        let validator = self.ingest.validator();
        let mut judged = self
            .parallel
            .map_runs(&records, |run, out| validator.judge_all(run.iter().map(|r| r.bytes), clocks.future_now, out));
        self.process_judged(source, records, &mut judged, clocks);
    }

    /// Takes a batch of records already judged (decoded and validated, e.g. on a reader thread
    /// with [`Engine::validator`]); `judged[i]` belongs to `records[i]`. `judged` is emptied,
    /// its room kept for the caller's next batch.
    pub fn process_judged<'a>(
        &mut self,
        source: &str,
        records: Vec<Record<'a>>,
        judged: &mut Vec<Judged>,
        clocks: Clocks,
    ) {
        self.admit_and_run(source, records, judged, Vec::new(), clocks.processing_now);
    }

    /// `prior[i]`, when given, is what `records[i]` was already late for elsewhere.
    fn admit_and_run<'a>(
        &mut self,
        source: &str,
        records: Vec<Record<'a>>,
        judged: &mut Vec<Judged>,
        mut prior: Vec<Vec<&'static str>>,
        processing_now: i64,
    ) {
        let watermark = self.watermarks.current();
        // The passes buffer of the last batch, reused: a batch's passes are tens of megabytes.
        let mut passes = std::mem::take(&mut self.passes);
        let mut raw: Vec<&'a [u8]> = Vec::with_capacity(records.len());
        let mut late = Vec::new();
        let Engine { ingest, watermarks, forwarded, out, .. } = self;
        ingest.admit_into(judged, &mut passes, |i, admitted, passes| {
            let record = &records[i];
            match admitted {
                Admitted::Valid => {
                    let (at, pass) = (passes.len() - 1, passes.last().expect("a valid record's pass is the last"));
                    watermarks.observe(record.partition, pass.ts.ms(), processing_now);
                    if let Some(labels) = prior.get_mut(i) {
                        late.extend(std::mem::take(labels).into_iter().map(|l| (at, l)));
                    }
                    if let Some(forwarded) = forwarded {
                        let (partition, seq, bytes) = (record.partition, record.seq, record.bytes.to_vec());
                        forwarded.push(Forwarded { partition, seq, bytes, late: Vec::new() });
                    }
                    raw.push(record.bytes);
                }
                Admitted::Duplicate => {}
                Admitted::Rejected(reason) => out.dead_letters.push(DeadLetter {
                    id: match record.partition {
                        0 => format!("{source}:{}", record.seq),
                        p => format!("{source}:{p}:{}", record.seq),
                    },
                    reason,
                    record: stored_record(record.bytes),
                    received_at: processing_now,
                }),
            }
        });
        self.run_operators(watermark, &passes, &raw, late, processing_now);
        passes.clear();
        self.passes = passes;
    }

    /// Takes passes decoded and validated elsewhere, each with its content digest (benchmarks
    /// measure the core without decoding this way). They are deduplicated like any record.
    pub fn process_decoded(&mut self, partition: u32, decoded: &[(Pass, u64)], clocks: Clocks) {
        let watermark = self.watermarks.current();
        let keys: Vec<(Text, u64, i64)> = decoded.iter().map(|(p, d)| (p.pass_id.clone(), *d, p.ts.ms())).collect();
        let verdicts = self.ingest.dedup_mut().check_batch(&keys);
        let mut passes = Vec::with_capacity(decoded.len());
        for ((pass, _), verdict) in decoded.iter().zip(verdicts) {
            if verdict == crate::ingest::DedupVerdict::First {
                self.watermarks.observe(partition, pass.ts.ms(), clocks.processing_now);
                passes.push(pass.clone());
            }
        }
        let raw = vec![&b""[..]; passes.len()];
        self.run_operators(watermark, &passes, &raw, Vec::new(), clocks.processing_now);
    }

    /// Runs the operators on a batch; `late` holds what its passes were already late for. The
    /// watermark the batch moves to is known once its passes are admitted, so the operators
    /// take the batch and then that watermark in one run on the engine's threads: a group goes
    /// on to emit its windows without waiting for the other groups to finish the batch.
    fn run_operators(
        &mut self,
        watermark: i64,
        passes: &[Pass],
        raw: &[&[u8]],
        mut late: Vec<(usize, &'static str)>,
        processing_now: i64,
    ) {
        self.processing_now = self.processing_now.max(processing_now);
        let memo = BatchMemo::new(passes);
        let moved = self.watermarks.advance(processing_now, self.settings.live);
        let process = Phase { watermark, batch: &memo, step: &|op, ctx| op.process_batch(passes, ctx) };
        let emit = Phase { watermark: moved, batch: &NO_BATCH, step: &|op, ctx| op.on_watermark(ctx) };
        let phases = if moved > watermark { &[process, emit][..] } else { &[process][..] };
        late.extend(self.with_operators(passes.len(), phases));
        self.record_late(late, passes, raw, processing_now);
    }

    /// Runs the `phases` on every operator, on the engine's threads when the work is for a
    /// large `batch` of passes; returns the passes they marked late.
    fn with_operators(&mut self, batch: usize, phases: &[Phase<'_>]) -> Vec<(usize, &'static str)> {
        let mut late = Vec::new();
        let mut ctx = Context {
            // Each phase gives its own watermark and batch.
            watermark: self.watermarks.current(),
            allowed_lateness_ms: self.settings.allowed_lateness_ms,
            processing_now: self.processing_now,
            out: &mut self.out,
            late: &mut late,
            batch: &NO_BATCH,
        };
        if self.parallel.takes(batch) {
            self.parallel.run(&mut self.operators, &mut ctx, phases);
        } else {
            for phase in phases {
                (ctx.watermark, ctx.batch) = (phase.watermark, phase.batch);
                for op in &mut self.operators {
                    (phase.step)(op.as_mut(), &mut ctx);
                }
            }
        }
        late
    }

    /// One phase: `step` with a context at `watermark`, outside a batch.
    fn step_at(watermark: i64, step: Step<'_>) -> Phase<'_> {
        Phase { watermark, batch: &NO_BATCH, step }
    }

    /// Moves the watermark without data (live: the wall clock).
    pub fn tick(&mut self, processing_now: i64) {
        self.processing_now = self.processing_now.max(processing_now);
        let before = self.watermarks.current();
        let watermark = self.watermarks.advance(processing_now, self.settings.live);
        if watermark > before {
            self.with_operators(0, &[Self::step_at(watermark, &|op, ctx| op.on_watermark(ctx))]);
        }
    }

    /// End of input: the watermark goes to the end of time and every window is emitted.
    pub fn finish(&mut self) {
        let watermark = self.watermarks.finish();
        // Every open window is emitted: as much work as the largest batch.
        let close: Step<'_> = &|op, ctx| {
            op.on_watermark(ctx);
            op.on_close(ctx);
        };
        self.with_operators(usize::MAX, &[Self::step_at(watermark, close)]);
    }

    /// The rows emitted since the last call.
    pub fn take_output(&mut self) -> ResultBatch {
        std::mem::take(&mut self.out)
    }

    /// Tells the operators a checkpoint barrier passes.
    pub fn barrier(&mut self, id: u64) {
        let barrier: Step<'_> = &|op, ctx| op.on_checkpoint(id, ctx);
        let late = self.with_operators(0, &[Self::step_at(self.watermarks.current(), barrier)]);
        debug_assert!(late.is_empty(), "a barrier carries no passes");
    }

    /// The state for checkpoint `id` (state kept in RocksDB comes as writes to apply with it).
    pub fn snapshot(&mut self, id: u64) -> anyhow::Result<EngineSnapshot> {
        // The deduplication ids and the operators' states are written at the same time, on two
        // threads: each takes about half of a large checkpoint.
        let (ingest, operators) = (&mut self.ingest, &mut self.operators);
        let (dedup, states) = std::thread::scope(|scope| {
            let states =
                scope.spawn(move || operators.iter().map(|op| op.snapshot()).collect::<anyhow::Result<Vec<_>>>());
            let dedup = ingest.dedup_mut().checkpoint(id);
            (dedup, states.join().unwrap_or_else(|panic| std::panic::resume_unwind(panic)))
        });
        let (dedup, writes) = dedup?;
        let mut snapshot = self.snapshot_with(dedup, states?)?;
        snapshot.writes = writes;
        Ok(snapshot)
    }

    /// Checkpoint `id` has been saved: state held for it can be let go.
    pub fn committed(&mut self, id: u64) {
        self.ingest.dedup_mut().committed(id);
    }

    /// The whole state in portable form, for a savepoint (call right after a checkpoint).
    pub fn export(&mut self) -> anyhow::Result<EngineSnapshot> {
        let dedup = self.ingest.dedup_mut().export()?;
        let states = self.operators.iter().map(|op| op.export()).collect::<anyhow::Result<_>>()?;
        self.snapshot_with(dedup, states)
    }

    /// Alerts the sinks hold from after the restored checkpoint (see [`Operator::adopt_alerts`]).
    pub fn adopt_alerts(&mut self, alerts: &[crate::results::AlertRow]) {
        for op in &mut self.operators {
            op.adopt_alerts(alerts);
        }
    }

    /// Ids held in memory until the next checkpoint (RocksDB state): the driver checkpoints
    /// early when there are many, to keep memory bounded.
    pub fn pending_state(&self) -> usize {
        self.ingest.dedup_pending()
    }

    /// The core's parts and each operator's state (`states`, in the order of the operators).
    fn snapshot_with(&self, dedup: Vec<u8>, states: Vec<StateBlob>) -> anyhow::Result<EngineSnapshot> {
        let core = CoreState {
            watermarks: self.watermarks.clone(),
            stats: self.ingest.stats.clone(),
            operators: Some(self.operators.iter().map(|op| op.name().to_owned()).collect()),
        };
        let mut parts = vec![
            ("core".to_owned(), StateBlob { version: CORE_STATE_VERSION, bytes: serde_json::to_vec(&core)? }),
            ("dedup".to_owned(), StateBlob { version: DEDUP_STATE_VERSION, bytes: dedup }),
        ];
        parts.extend(self.operators.iter().map(|op| op.name().to_owned()).zip(states));
        Ok(EngineSnapshot { parts, writes: Vec::new() })
    }

    pub fn restore(&mut self, snapshot: &EngineSnapshot) -> anyhow::Result<()> {
        let find = |name: &str| snapshot.parts.iter().find(|(n, _)| n == name).map(|(_, b)| b);
        let part = |name: &str| find(name).ok_or_else(|| anyhow::anyhow!("the snapshot has no state for `{name}`"));
        let core = part("core")?;
        super::check_version("core", core.version, CORE_STATE_VERSION)?;
        let core: CoreState = serde_json::from_slice(&core.bytes)?;
        let dedup = part("dedup")?;
        super::check_version("dedup", dedup.version, DEDUP_STATE_VERSION)?;
        // Every part is accounted for before any state is touched: a refused snapshot leaves
        // the state (the deduplication ids and first entries in RocksDB) as it was.
        let mut parts = Vec::with_capacity(self.operators.len());
        for op in &self.operators {
            let name = op.name();
            parts.push(match (find(name), &core.operators) {
                (Some(blob), _) => Some(blob),
                // A pipeline enabled since the checkpoint was taken has no state in it; any other
                // missing part is a damaged checkpoint, or one of another build or stage.
                (None, Some(ran)) if !ran.iter().any(|n| n == name) => {
                    tracing::warn!(
                        pipeline = name,
                        "the checkpoint holds no state for this pipeline (it was not enabled then): it starts empty"
                    );
                    None
                }
                (None, Some(_)) => anyhow::bail!("the snapshot has no state for `{name}`, which ran when it was taken"),
                (None, None) => anyhow::bail!(
                    "the snapshot has no state for `{name}` and does not say which pipelines ran (an earlier build \
                     or another stage wrote it): enable only the pipelines that ran then, or start from an empty state"
                ),
            });
        }
        self.ingest.dedup_mut().restore(&dedup.bytes)?;
        for (op, blob) in self.operators.iter_mut().zip(parts) {
            if let Some(blob) = blob {
                op.restore(blob)?;
            }
        }
        self.watermarks =
            core.watermarks.with_settings(self.settings.out_of_orderness_ms, self.settings.idle_timeout_ms);
        self.ingest.stats = core.stats;
        Ok(())
    }

    /// One `late_passes` row per late pass, naming everything it missed.
    fn record_late(&mut self, mut late: Vec<(usize, &'static str)>, passes: &[Pass], raw: &[&[u8]], arrived_at: i64) {
        late.sort_unstable();
        late.dedup();
        if let Some(forwarded) = &mut self.forwarded {
            // The batch's passes are the last ones forwarded; the engine they go to records it.
            let first = forwarded.len() - passes.len();
            for (idx, label) in late {
                forwarded[first + idx].late.push(label);
            }
            return;
        }
        let mut i = 0;
        while i < late.len() {
            let idx = late[i].0;
            let mut pipelines = Vec::new();
            while i < late.len() && late[i].0 == idx {
                pipelines.push(late[i].1);
                i += 1;
            }
            let pass = &passes[idx];
            self.ingest.stats.late += 1;
            self.out.late_passes.push(LatePassRow {
                pass_id: pass.pass_id.clone(),
                pipelines,
                checkpoint_id: self.city.checkpoint(pass.checkpoint).id.clone(),
                ts: pass.ts.ms(),
                arrived_at,
                record: stored_record(raw[idx]),
            });
        }
    }
}
