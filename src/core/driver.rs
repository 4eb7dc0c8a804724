//! Drives an engine between a source and the stores: hands each batch's results to the sink
//! queue and, on schedule, takes a checkpoint that completes only after the sink has written
//! everything emitted before its barrier.
//!
//! A scheduled checkpoint is saved on a thread of its own while the engine goes on with the
//! next batches: its state is taken, and its results written, before the engine moves on; the
//! write to RocksDB (the larger part of a large checkpoint) is what runs beside it. It
//! completes once saved — then the engine lets go of what it held for it and the source may
//! commit its position — and the next one is taken only after that.

use super::checkpoint::{Checkpoint, CheckpointStore};
use super::sink::SinkHandle;
use super::Engine;
use crate::metrics::Metrics;
use std::sync::Arc;
use std::time::{Duration, Instant};

/// State entries held in memory before a checkpoint is taken early to write them out.
const MAX_PENDING_STATE: usize = 1_000_000;

pub struct Checkpointing {
    pub store: CheckpointStore,
    pub interval: Duration,
}

/// A checkpoint that is complete: saved, with its results written.
#[derive(Clone, Debug)]
pub struct Saved {
    pub id: u64,
    pub created_at: i64,
    /// The source position it holds.
    pub source: serde_json::Value,
}

/// A checkpoint being saved in the background.
struct Saving {
    saved: Saved,
    started: Instant,
    snapshot_ms: u64,
    bytes: usize,
    writer: std::thread::JoinHandle<anyhow::Result<()>>,
}

pub struct Driver {
    pub engine: Engine,
    sink: SinkHandle,
    checkpoints: Option<Checkpointing>,
    metrics: Arc<Metrics>,
    next_id: u64,
    last_checkpoint: Instant,
    saving: Option<Saving>,
}

impl Driver {
    /// Restores the engine from the newest intact checkpoint, if there is one, and returns its
    /// source position.
    pub fn start(
        mut engine: Engine,
        sink: SinkHandle,
        checkpoints: Option<Checkpointing>,
        metrics: Arc<Metrics>,
    ) -> anyhow::Result<(Driver, Option<serde_json::Value>)> {
        let mut next_id = 1;
        let mut position = None;
        if let Some(c) = &checkpoints {
            if let Some(latest) = c.store.latest()? {
                engine.restore(&latest.engine)?;
                tracing::info!(checkpoint = latest.id, "resumed from checkpoint");
                next_id = latest.id + 1;
                position = Some(latest.source);
            }
            next_id = next_id.max(c.store.ids()?.last().map_or(1, |id| id + 1));
        }
        let last_checkpoint = Instant::now();
        Ok((Driver { engine, sink, checkpoints, metrics, next_id, last_checkpoint, saving: None }, position))
    }

    /// Hands the results so far to the sink; starts a checkpoint when one is due. Returns the
    /// checkpoint that completed meanwhile, if one did.
    pub async fn after_batch(&mut self, position: impl FnOnce() -> serde_json::Value) -> anyhow::Result<Option<Saved>> {
        self.flush().await?;
        let mut completed = None;
        if self.saving.as_ref().is_some_and(|s| s.writer.is_finished()) {
            completed = self.complete_save()?;
        }
        let Some(c) = &self.checkpoints else { return Ok(completed) };
        let pending = self.engine.pending_state();
        let due = self.last_checkpoint.elapsed() >= c.interval || pending >= MAX_PENDING_STATE;
        // Memory bounds the state held for checkpoints: past twice the bound, the engine waits
        // for the save in flight rather than take more.
        if due && (self.saving.is_none() || pending >= 2 * MAX_PENDING_STATE) {
            completed = self.complete_save()?.or(completed);
            self.begin_checkpoint(position()).await?;
        }
        Ok(completed)
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let out = self.engine.take_output();
        self.metrics.late_passes.inc_by(out.late_passes.len() as u64);
        self.metrics.observe_results(&out);
        self.sink.send(out).await
    }

    /// Takes a checkpoint now and waits until it is saved (when checkpointing is on).
    pub async fn checkpoint(&mut self, position: serde_json::Value) -> anyhow::Result<Option<Saved>> {
        if self.checkpoints.is_none() {
            return Ok(None);
        }
        self.complete_save()?;
        self.begin_checkpoint(position).await?;
        self.complete_save()
    }

    /// Takes the state and writes the results of a new checkpoint, and starts saving it.
    async fn begin_checkpoint(&mut self, position: serde_json::Value) -> anyhow::Result<()> {
        let Some(c) = &self.checkpoints else { return Ok(()) };
        let store = c.store.clone();
        let started = Instant::now();
        let id = self.next_id;
        self.engine.barrier(id);
        self.flush().await?;
        let engine = self.engine.snapshot(id)?;
        let snapshot_ms = started.elapsed().as_millis() as u64;
        self.sink.barrier().await?;
        let checkpoint = Checkpoint { id, created_at: chrono::Utc::now().timestamp_millis(), source: position, engine };
        let saved = Saved { id, created_at: checkpoint.created_at, source: checkpoint.source.clone() };
        let bytes = checkpoint.engine.parts.iter().map(|(_, b)| b.bytes.len()).sum();
        let writer = std::thread::Builder::new()
            .name("checkpoint".into())
            .spawn(move || store.save(&checkpoint))
            .map_err(|e| anyhow::anyhow!("starting the checkpoint writer: {e}"))?;
        self.saving = Some(Saving { saved, started, snapshot_ms, bytes, writer });
        self.next_id += 1;
        self.last_checkpoint = Instant::now();
        Ok(())
    }

    /// Waits for the checkpoint being saved, if any, and completes it. A failed save is an
    /// error: the engine has held on to everything since the checkpoint before, and a restart
    /// resumes from that.
    fn complete_save(&mut self) -> anyhow::Result<Option<Saved>> {
        let Some(saving) = self.saving.take() else { return Ok(None) };
        let waited = Instant::now();
        saving.writer.join().map_err(|_| anyhow::anyhow!("the checkpoint writer panicked"))??;
        let id = saving.saved.id;
        self.engine.committed(id);
        self.metrics.observe_checkpoint(saving.started, saving.saved.created_at);
        self.metrics.state_pending_ids.set(self.engine.pending_state() as i64);
        tracing::debug!(
            checkpoint = id,
            took_ms = saving.started.elapsed().as_millis() as u64,
            snapshot_ms = saving.snapshot_ms,
            waited_ms = waited.elapsed().as_millis() as u64,
            bytes = saving.bytes,
            "checkpoint complete"
        );
        Ok(Some(saving.saved))
    }

    /// Takes a checkpoint and returns it with the whole state in portable form (a savepoint).
    pub async fn savepoint(&mut self, position: serde_json::Value) -> anyhow::Result<Checkpoint> {
        let saved = self.checkpoint(position).await?.ok_or_else(|| anyhow::anyhow!("checkpointing is off"))?;
        Ok(Checkpoint {
            id: saved.id,
            created_at: saved.created_at,
            source: saved.source,
            engine: self.engine.export()?,
        })
    }
}
