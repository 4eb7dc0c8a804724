//! Drives an engine between a source and the stores: hands each batch's results to the sink
//! queue and, on schedule, takes a checkpoint that completes only after the sink has written
//! everything emitted before its barrier.

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

pub struct Driver {
    pub engine: Engine,
    sink: SinkHandle,
    checkpoints: Option<Checkpointing>,
    metrics: Arc<Metrics>,
    next_id: u64,
    last_checkpoint: Instant,
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
        Ok((Driver { engine, sink, checkpoints, metrics, next_id, last_checkpoint: Instant::now() }, position))
    }

    /// Hands the results so far to the sink; checkpoints when one is due. True when it did.
    pub async fn after_batch(&mut self, position: impl FnOnce() -> serde_json::Value) -> anyhow::Result<bool> {
        self.flush().await?;
        let due = self.checkpoints.as_ref().is_some_and(|c| {
            self.last_checkpoint.elapsed() >= c.interval || self.engine.pending_state() >= MAX_PENDING_STATE
        });
        if due {
            self.checkpoint(position()).await?;
        }
        Ok(due)
    }

    pub async fn flush(&mut self) -> anyhow::Result<()> {
        let out = self.engine.take_output();
        self.metrics.late_passes.inc_by(out.late_passes.len() as u64);
        self.metrics.observe_results(&out);
        self.sink.send(out).await
    }

    /// Takes a checkpoint now (when checkpointing is on) and returns it.
    pub async fn checkpoint(&mut self, position: serde_json::Value) -> anyhow::Result<Option<Checkpoint>> {
        if self.checkpoints.is_none() {
            return Ok(None);
        }
        let started = Instant::now();
        let id = self.next_id;
        self.engine.barrier(id);
        self.flush().await?;
        let engine = self.engine.snapshot(id)?;
        let snapshot_ms = started.elapsed().as_millis() as u64;
        self.sink.barrier().await?;
        let checkpoint = Checkpoint { id, created_at: chrono::Utc::now().timestamp_millis(), source: position, engine };
        let saving = Instant::now();
        if let Some(c) = &self.checkpoints {
            c.store.save(&checkpoint)?;
            self.engine.committed(id);
        }
        let save_ms = saving.elapsed().as_millis() as u64;
        self.next_id += 1;
        self.last_checkpoint = Instant::now();
        self.metrics.observe_checkpoint(started, checkpoint.created_at);
        self.metrics.state_pending_ids.set(self.engine.pending_state() as i64);
        let bytes: usize = checkpoint.engine.parts.iter().map(|(_, b)| b.bytes.len()).sum();
        tracing::debug!(
            checkpoint = id,
            took_ms = started.elapsed().as_millis() as u64,
            snapshot_ms,
            save_ms,
            bytes,
            "checkpoint complete"
        );
        Ok(Some(checkpoint))
    }

    /// Takes a checkpoint and returns it with the whole state in portable form (a savepoint).
    pub async fn savepoint(&mut self, position: serde_json::Value) -> anyhow::Result<Checkpoint> {
        let mut checkpoint = self.checkpoint(position).await?.ok_or_else(|| anyhow::anyhow!("checkpointing is off"))?;
        checkpoint.engine = self.engine.export()?;
        Ok(checkpoint)
    }
}
