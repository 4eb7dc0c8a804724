//! Scale-out (`kafka.scale_out.enabled`): several instances share the input topic's partitions
//! in one consumer group, Kafka doing the distribution. Each instance runs three stages:
//!
//! - **Per-vehicle stage**: one task per assigned input partition. The input is keyed by
//!   vehicle, so all of a vehicle's passes are in one partition: decoding, validation,
//!   deduplication and the pipelines whose state is per vehicle (trajectories, high-frequency
//!   vehicles, first entry) run here, each task with its own state and checkpoints in
//!   `state.dir/partition-N`. A revoked partition is checkpointed and dropped; an assigned one
//!   is restored from its newest checkpoint and resumes at its offset: a partition's state moves
//!   with it. Flows, origins, spot speeds, Top-N's buckets and congestion's traversals (per
//!   vehicle) are counted here too, over the partition's own passes: their rows, partial
//!   results, go to the partials topic by aggregate key, followed by the task's watermark.
//!   Every valid pass is forwarded, with what it was late for here, to the repartition topic.
//! - **Merge stage**: one task per partition of the partials topic (a consumer group of its
//!   own, so the instances share them), with its state in `state.dir/merge-N`: it adds up each
//!   (key, window)'s partials from every input partition and writes the flow, origin, speed,
//!   Top-N or congestion rows once every input partition's watermark has passed the window
//!   (see `crate::kafka::Merge`).
//! - **Aggregate stage**: one task for the whole city, run by the instance that holds the
//!   repartition topic's one partition (a consumer group of its own), with its state in
//!   `state.dir/aggregate`: every other pipeline — cloned plates, surges, restrictions, the
//!   watch list, device health, archive — over all the forwarded passes. Each input
//!   partition's passes arrive in their order, so the aggregate stage's watermark is the
//!   minimum over the input partitions, as on one instance; a pass a
//!   restarted task forwards again is deduplicated like any resend.
//!
//! Where a task's state lives when its partition moves:
//!
//! - **A state topic** (`kafka.scale_out.state_topic`): every task publishes its state there at
//!   a checkpoint every `state_publish_interval` and when it lets its partition go (see
//!   `crate::kafka::StateTopic`), and an instance given a partition takes
//!   the published state when it has read further than what its own `state.dir` holds. Each
//!   instance has a `state.dir` of its own, on any machine. An instance that gets a partition
//!   before its last owner has published its final state resumes from the one before and reads
//!   the records since again: results are idempotent and the aggregate stage deduplicates the
//!   passes forwarded twice. A bounded run's instances learn that the aggregate stage has
//!   finished from its published state.
//! - **Without one**, `state.dir` is shared by the instances (one machine, or a shared volume):
//!   the RocksDB lock of a task's state keeps two instances from running the same partition at
//!   once (an instance given a partition waits until the one that had it has let go).
//!
//! A bounded run (`kafka.input.bounded`): a task closes its windows once its partition has been
//! read to the end, checkpoints there and sends an end marker on both internal topics; the
//! aggregate stage and each merge task close every window once they have every input
//! partition's marker, and leave `state.dir/aggregate.finished` (`merge-N.finished`). Each
//! instance stops once its partitions are read (or the group gave it none) and every merge
//! task and the aggregate stage have finished.

use super::replay::{adopt_stored_alerts, build_engine, stored_alerts};
use super::run::{observe_kafka, observe_partition_watermarks, observe_watermarks, wall_ms, IDLE_POLL};
use crate::api::AdminCommand;
use crate::config::Config;
use crate::core::checkpoint::{Checkpoint, CheckpointStore};
use crate::core::sink::{SinkHandle, QUEUE_BATCHES};
use crate::core::EngineSnapshot;
use crate::core::{Clocks, Engine, Record};
use crate::kafka::{
    Fetched, Forwarder, KafkaPosition, KafkaSource, Merge, Partial, PartialSender, Repartitioned, StateTopic,
};
use crate::metrics::Metrics;
use crate::pipelines::{partial_forms, WatchList, PARTIAL, PER_VEHICLE};
use crate::reference::City;
use crate::results::ResultBatch;
use crate::store::Store;
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::{mpsc, watch};

/// How often an instance that has read its partitions of a bounded input looks in the state
/// topic for the aggregate stage's end.
const FINISH_CHECK_EVERY: Duration = Duration::from_secs(2);
/// How long an instance waits for another to let go of a partition's state.
const LOCK_WAIT: Duration = Duration::from_secs(120);

/// What the stages send to Kafka besides results: the passes for the aggregate stage, the
/// partial results for the merge tasks, and the tasks' states (with a state topic).
struct Producers {
    forwarder: Forwarder,
    partials: PartialSender,
    states: Option<StateTopic>,
}

/// One input partition's per-vehicle task.
struct Task {
    engine: Engine,
    checkpoints: CheckpointStore,
    next_id: u64,
    /// The next input offset to process (`None` before the first record of a fresh task).
    next: Option<i64>,
    /// The end marker has been forwarded (bounded runs).
    ended: bool,
    /// The watermark last sent to the partials topic.
    watermark_sent: i64,
    /// Partial results sent since this process opened the task (for the log).
    partials_sent: u64,
}

/// Where the aggregate stage stands: its place in the repartition topic and the input
/// partitions whose end markers it has read.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct AggregatePosition {
    offset: Option<i64>,
    ended: BTreeSet<u32>,
    finished: bool,
}

struct Aggregate {
    engine: Engine,
    checkpoints: CheckpointStore,
    next_id: u64,
    position: AggregatePosition,
}

/// Where a merge task stands: its place in its partition of the partials topic.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct MergePosition {
    offset: Option<i64>,
    finished: bool,
}

/// One partition of the partials topic's merge task.
struct MergeTask {
    merge: Merge,
    checkpoints: CheckpointStore,
    next_id: u64,
    position: MergePosition,
}

/// A merge task's state, as a checkpoint part.
const MERGE_PART: &str = "merge";
const MERGE_STATE_VERSION: u32 = 1;

/// What the stages share.
pub struct Shared {
    pub config: Config,
    pub city: Arc<City>,
    pub watchlist: Arc<WatchList>,
    /// The result store (read for alerts to adopt after a restore).
    pub store: Arc<Store>,
    pub sink: SinkHandle,
    pub metrics: Arc<Metrics>,
}

impl Shared {
    /// Opens the state in `dir` for an engine of the operators `select` leaves, waiting while
    /// another instance still holds it.
    ///
    /// `published`: the task's state from the state topic, taken instead of the one in `dir`
    /// when it has read further (`progress`: the offset its position has reached).
    async fn open_state(
        &self,
        dir: &Path,
        select: impl FnOnce(&mut Engine),
        published: Option<Checkpoint>,
        progress: impl Fn(&Checkpoint) -> anyhow::Result<Option<i64>>,
    ) -> anyhow::Result<(Engine, CheckpointStore, Option<Checkpoint>, u64)> {
        let checkpoints = open_checkpoints(dir).await?;
        let live = self.config.kafka.input.wall_clock;
        let mut engine = build_engine(&self.config, &self.city, live, Some(&checkpoints), &self.watchlist)?;
        select(&mut engine);
        let local = checkpoints.latest()?;
        let mut next_id = checkpoints.ids()?.last().map_or(1, |id| id + 1);
        let latest = match (local, published) {
            (local, Some(published))
                if progress(&published)? > local.as_ref().map(&progress).transpose()?.flatten() =>
            {
                engine
                    .restore(&published.engine)
                    .with_context(|| format!("restoring {}'s published state", dir.display()))?;
                // Made this instance's own checkpoint at once (a crash now resumes from it).
                let adopted = Checkpoint {
                    id: next_id,
                    created_at: chrono::Utc::now().timestamp_millis(),
                    source: published.source,
                    engine: engine.snapshot(next_id)?,
                };
                checkpoints.save(&adopted)?;
                engine.committed(next_id);
                next_id += 1;
                tracing::info!(dir = %dir.display(), "state taken from the state topic");
                Some(adopted)
            }
            (Some(local), _) => {
                engine.restore(&local.engine).with_context(|| format!("restoring {}", dir.display()))?;
                Some(local)
            }
            (None, _) => None,
        };
        Ok((engine, checkpoints, latest, next_id))
    }

    async fn open_task(&self, partition: i32, published: Option<Checkpoint>) -> anyhow::Result<Task> {
        let dir = self.config.state.dir.join(task_key(partition));
        let progress = |c: &Checkpoint| task_offset(c, partition);
        let city = self.city.clone();
        let select = move |e: &mut Engine| {
            e.keep_operators(&partition_stage());
            for op in partial_forms(&city) {
                e.replace_operator(op);
            }
        };
        let (mut engine, checkpoints, latest, next_id) = self.open_state(&dir, select, published, progress).await?;
        engine.forward_passes();
        engine.assign(partition as u32, wall_ms());
        let next = latest.as_ref().map(progress).transpose()?.flatten();
        tracing::info!(partition, offset = ?next, "per-vehicle task opened");
        Ok(Task { engine, checkpoints, next_id, next, ended: false, watermark_sent: i64::MIN, partials_sent: 0 })
    }

    /// Opens the merge task of partition `partition` of the partials topic: the state in
    /// `state.dir` or the published one, whichever has read further.
    async fn open_merge(
        &self,
        partition: i32,
        input_partitions: usize,
        published: Option<Checkpoint>,
    ) -> anyhow::Result<MergeTask> {
        let dir = self.config.state.dir.join(merge_key(partition));
        let checkpoints = open_checkpoints(&dir).await?;
        let local = checkpoints.latest()?;
        let mut next_id = checkpoints.ids()?.last().map_or(1, |id| id + 1);
        let offset = |c: &Option<Checkpoint>| -> anyhow::Result<Option<i64>> {
            Ok(c.as_ref().map(merge_position).transpose()?.and_then(|p| p.offset))
        };
        let latest = if offset(&published)? > offset(&local)? {
            let adopted = Checkpoint { id: next_id, ..published.expect("further than nothing") };
            checkpoints.save(&adopted)?;
            next_id += 1;
            tracing::info!(dir = %dir.display(), "state taken from the state topic");
            Some(adopted)
        } else {
            local
        };
        let lateness = self.config.core.allowed_lateness.as_millis();
        let idle = self.config.core.idle_timeout.as_millis();
        let (mut merge, position) = match latest {
            Some(c) => {
                let (_, blob) = c
                    .engine
                    .parts
                    .iter()
                    .find(|(name, _)| name == MERGE_PART)
                    .with_context(|| format!("{}'s checkpoint has no merge state", dir.display()))?;
                let mut merge: Merge = blob.decode(MERGE_PART, MERGE_STATE_VERSION, MERGE_STATE_VERSION)?;
                merge.resume(wall_ms(), lateness, idle);
                (merge, merge_position(&c)?)
            }
            None => (Merge::new(input_partitions as u32, lateness, idle, wall_ms()), MergePosition::default()),
        };
        merge
            .attach(&self.city, self.config.pipelines.top_n)
            .with_context(|| format!("restoring {}", dir.display()))?;
        if position.offset.is_some() {
            merge.adopt_alerts(&stored_alerts(&self.store, merge.watermark(), lateness).await?);
        }
        tracing::info!(partition, offset = ?position.offset, "merge task opened");
        Ok(MergeTask { merge, checkpoints, next_id, position })
    }

    async fn open_aggregate(
        &self,
        input_partitions: usize,
        published: Option<Checkpoint>,
    ) -> anyhow::Result<Aggregate> {
        let dir = self.config.state.dir.join(AGGREGATE_KEY);
        let progress = |c: &Checkpoint| Ok(aggregate_position(c)?.offset);
        let (mut engine, checkpoints, latest, next_id) =
            self.open_state(&dir, |e| e.drop_operators(&partition_stage()), published, progress).await?;
        // Every input partition holds the watermark back until it has data or has been idle.
        for p in 0..input_partitions {
            engine.assign(p as u32, wall_ms());
        }
        let position = match latest {
            Some(c) => {
                adopt_stored_alerts(&mut engine, &self.store, self.config.core.allowed_lateness.as_millis()).await?;
                aggregate_position(&c)?
            }
            None => AggregatePosition::default(),
        };
        tracing::info!(offset = ?position.offset, "aggregate stage opened");
        Ok(Aggregate { engine, checkpoints, next_id, position })
    }

    /// Hands an engine's results to the store writer.
    async fn flush(&self, engine: &mut Engine) -> anyhow::Result<()> {
        self.send(engine.take_output()).await
    }

    /// Hands results to the store writer.
    async fn send(&self, out: ResultBatch) -> anyhow::Result<()> {
        self.metrics.late_passes.inc_by(out.late_passes.len() as u64);
        self.metrics.observe_results(&out);
        self.sink.send(out).await
    }

    /// Where the stage or task `key` marks that it has finished a bounded run.
    fn finished_marker(&self, key: &str) -> PathBuf {
        self.config.state.dir.join(format!("{key}.finished"))
    }
}

/// The scale-out pipeline of one instance, until it is stopped (or, bounded, done).
pub async fn pipeline(
    shared: Shared,
    mut admin: mpsc::Receiver<AdminCommand>,
    stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    let config = shared.config.clone();
    let kafka = &config.kafka;
    let bounded = kafka.input.bounded;
    let mut input = KafkaSource::open(kafka, None)?.allow_moves();
    let mut aggregate_config = kafka.clone();
    aggregate_config.input.topic = kafka.scale_out.repartition_topic.clone();
    aggregate_config.input.group_id = format!("{}.aggregate", kafka.input.group_id);
    aggregate_config.input.bounded = false;
    // The aggregate stage takes what the per-vehicle tasks of every instance forward: it reads
    // in large steps whatever the input's step size.
    aggregate_config.input.max_batch = kafka.input.max_batch.max(crate::kafka::KafkaInputConfig::default().max_batch);
    let mut repartition = KafkaSource::open(&aggregate_config, None)?.allow_moves().with_headers();
    let mut merge_config = aggregate_config.clone();
    merge_config.input.topic = kafka.scale_out.partials_topic.clone();
    merge_config.input.group_id = format!("{}.merge", kafka.input.group_id);
    let mut partials = KafkaSource::open(&merge_config, None)?.allow_moves();
    let input_partitions = input.partition_count(&kafka.input.topic)?;
    let repartition_partitions = repartition.partition_count(&kafka.scale_out.repartition_topic)?;
    anyhow::ensure!(
        repartition_partitions == 1,
        "the repartition topic {} has {repartition_partitions} partitions; the aggregate stage needs exactly one",
        kafka.scale_out.repartition_topic
    );
    let merge_partitions = partials.partition_count(&kafka.scale_out.partials_topic).with_context(|| {
        format!(
            "the partials topic {}: create it, with as many partitions as the merge should have tasks",
            kafka.scale_out.partials_topic
        )
    })?;
    let mut producers = Producers {
        forwarder: Forwarder::open(kafka)?,
        partials: PartialSender::open(kafka, merge_partitions)?,
        states: StateTopic::open(kafka)?,
    };
    let metrics = shared.metrics.clone();
    let mut tasks: BTreeMap<i32, Task> = BTreeMap::new();
    let mut merges: BTreeMap<i32, MergeTask> = BTreeMap::new();
    let mut aggregate: Option<Aggregate> = None;
    let mut last_checkpoint = Instant::now();
    let mut aggregate_busy = false;
    let mut merge_busy = false;
    let mut finish_checked: Option<Instant> = None;
    let interval = config.core.checkpoint_interval.0;

    while !*stopped.borrow() {
        metrics.pipeline_heartbeat_ms.set(wall_ms());
        tokio::task::block_in_place(|| {
            observe_kafka(&mut input, &metrics);
            let full = metrics.sink_backlog.get() >= QUEUE_BATCHES as i64;
            repartition.set_paused(full);
            partials.set_paused(full);
        });

        // The per-vehicle stage (waiting for input only while the other stages are idle too).
        let wait = if aggregate_busy || merge_busy { Duration::ZERO } else { IDLE_POLL };
        let polled = tokio::task::block_in_place(|| input.poll(wait))?;
        for p in polled.revoked.iter().filter(|p| !polled.assigned.contains(p)) {
            if let Some(mut task) = tasks.remove(p) {
                checkpoint_tasks(&shared, &mut producers, &mut [(*p, &mut task)], true).await?;
                tracing::info!(partition = p, "partition revoked: checkpointed and let go");
            }
        }
        // The state topic is read once for every partition newly given.
        let opening: Vec<String> =
            polled.assigned.iter().filter(|p| !tasks.contains_key(p)).map(|p| task_key(*p)).collect();
        let mut published = read_published(&mut producers.states, &opening)?;
        for p in &polled.assigned {
            if !tasks.contains_key(p) {
                tasks.insert(*p, shared.open_task(*p, published.remove(&task_key(*p))).await?);
            }
            if let Some(next) = tasks[p].next {
                input.resume_at(*p, next);
            }
        }
        let now = wall_ms();
        let mut by_partition: BTreeMap<i32, Vec<Fetched>> = BTreeMap::new();
        for f in polled.records {
            by_partition.entry(f.partition).or_default().push(f);
        }
        for (p, task) in tasks.iter_mut() {
            match by_partition.remove(p) {
                Some(records) => {
                    task.next = records.last().map(|f| f.offset + 1);
                    let before = task.engine.stats().clone();
                    let records = records.iter().map(|f| Record {
                        partition: *p as u32,
                        seq: f.offset as u64,
                        bytes: f.payload.as_deref().unwrap_or_default(),
                    });
                    tokio::task::block_in_place(|| {
                        task.engine.process("kafka", records, Clocks { future_now: Some(now), processing_now: now })
                    });
                    metrics.observe_ingest(&before, task.engine.stats());
                }
                None => tokio::task::block_in_place(|| task.engine.tick(now)),
            }
            observe_partition_watermarks(&metrics, &task.engine, now);
            task_output(&shared, &mut producers, *p, task).await?;
        }
        // A partition read to its end has its windows closed and is checkpointed before its
        // end markers go: they say its results are durable (a task killed before that is run
        // again).
        if bounded && tasks.values().any(|t| !t.ended) && input.finished() {
            for (p, task) in tasks.iter_mut().filter(|(_, t)| !t.ended) {
                tokio::task::block_in_place(|| task.engine.finish());
                task_output(&shared, &mut producers, *p, task).await?;
            }
            let mut all: Vec<(i32, &mut Task)> = tasks.iter_mut().map(|(p, t)| (*p, t)).collect();
            let durable = checkpoint_tasks(&shared, &mut producers, &mut all, true).await?;
            input.checkpointed_at(&durable);
            for (p, task) in tasks.iter_mut().filter(|(_, t)| !t.ended) {
                producers.forwarder.end(*p as u32).await?;
                producers.partials.send(*p as u32, Vec::new(), Some(Partial::End { from: *p as u32 })).await?;
                task.ended = true;
                let stats = task.engine.stats();
                tracing::info!(
                    partition = p,
                    offset = ?task.next,
                    valid = stats.valid,
                    duplicates = stats.duplicates,
                    late = stats.late,
                    partials = task.partials_sent,
                    "partition read to its end; every window closed, end markers sent"
                );
            }
            producers.forwarder.flush().await?;
            producers.partials.flush().await?;
        }

        // The merge stage.
        let polled = tokio::task::block_in_place(|| partials.poll(Duration::ZERO))?;
        merge_busy = !polled.records.is_empty();
        for p in polled.revoked.iter().filter(|p| !polled.assigned.contains(p)) {
            if let Some(mut task) = merges.remove(p) {
                checkpoint_merges(&shared, &mut producers.states, &mut [(*p, &mut task)], &partials, true).await?;
                tracing::info!(partition = p, "merge task revoked: checkpointed and let go");
            }
        }
        let opening: Vec<String> =
            polled.assigned.iter().filter(|p| !merges.contains_key(p)).map(|p| merge_key(*p)).collect();
        let mut published = read_published(&mut producers.states, &opening)?;
        for p in &polled.assigned {
            if !merges.contains_key(p) {
                merges.insert(*p, shared.open_merge(*p, input_partitions, published.remove(&merge_key(*p))).await?);
            }
            if let Some(offset) = merges[p].position.offset {
                partials.resume_at(*p, offset);
            }
        }
        for f in polled.records {
            let Some(task) = merges.get_mut(&f.partition) else { continue };
            task.position.offset = Some(f.offset + 1);
            let ignored = task.merge.counts().ignored;
            for partial in Partial::read(&f)? {
                task.merge.apply(partial, now)?;
            }
            metrics.merge_ignored.inc_by(task.merge.counts().ignored - ignored);
        }
        for (p, task) in merges.iter_mut() {
            let mut out = ResultBatch::default();
            task.merge.advance(now, &mut out)?;
            shared.send(out).await?;
            if bounded && task.merge.finished() && !task.position.finished {
                let counts = task.merge.counts();
                tracing::info!(
                    partition = p,
                    partials = counts.taken,
                    ignored = counts.ignored,
                    "every input partition has ended; every merged window is written"
                );
                task.position.finished = true;
                checkpoint_merges(&shared, &mut producers.states, &mut [(*p, task)], &partials, true).await?;
                std::fs::write(shared.finished_marker(&merge_key(*p)), b"")?;
            }
        }
        metrics.merge_held.set(merges.values().map(|t| t.merge.held() as i64).sum());

        // The aggregate stage.
        let polled = tokio::task::block_in_place(|| repartition.poll(Duration::ZERO))?;
        aggregate_busy = !polled.records.is_empty();
        if polled.revoked.iter().any(|p| !polled.assigned.contains(p)) {
            if let Some(mut agg) = aggregate.take() {
                checkpoint_aggregate(&shared, &mut producers.states, &mut agg, &repartition, true).await?;
                tracing::info!("aggregate stage revoked: checkpointed and let go");
            }
        }
        if let Some(p) = polled.assigned.first() {
            if aggregate.is_none() {
                let published =
                    read_published(&mut producers.states, &[AGGREGATE_KEY.to_owned()])?.remove(AGGREGATE_KEY);
                aggregate = Some(shared.open_aggregate(input_partitions, published).await?);
            }
            if let Some(offset) = aggregate.as_ref().and_then(|a| a.position.offset) {
                repartition.resume_at(*p, offset);
            }
        }
        if let Some(agg) = &mut aggregate {
            let mut passes = Vec::new();
            for f in polled.records {
                agg.position.offset = Some(f.offset + 1);
                match Repartitioned::read(f)? {
                    Repartitioned::Pass { partition, offset, bytes, late } => {
                        passes.push((partition, offset, bytes, late))
                    }
                    Repartitioned::End { partition } => {
                        agg.position.ended.insert(partition);
                    }
                }
            }
            if passes.is_empty() {
                tokio::task::block_in_place(|| agg.engine.tick(now));
            } else {
                let forwarded = passes
                    .iter()
                    .map(|(partition, offset, bytes, late)| {
                        let record = Record { partition: *partition, seq: *offset, bytes };
                        (record, late.iter().map(String::as_str).collect())
                    })
                    .collect();
                tokio::task::block_in_place(|| agg.engine.process_forwarded("kafka", forwarded, now));
            }
            let all_ended = agg.position.ended.len() >= input_partitions;
            if bounded && all_ended && !agg.position.finished {
                tracing::info!("every input partition has been read to its end; closing every window");
                tokio::task::block_in_place(|| agg.engine.finish());
                agg.position.finished = true;
                shared.flush(&mut agg.engine).await?;
                checkpoint_aggregate(&shared, &mut producers.states, agg, &repartition, true).await?;
                std::fs::write(shared.finished_marker(AGGREGATE_KEY), b"")?;
            }
            observe_watermarks(&metrics, &agg.engine, now);
            shared.flush(&mut agg.engine).await?;
        }

        if last_checkpoint.elapsed() >= interval {
            let mut stages = Running { tasks: &mut tasks, merges: &mut merges, aggregate: aggregate.as_mut() };
            checkpoint_all(&shared, &mut producers, &mut stages, [&input, &partials, &repartition], false).await?;
            last_checkpoint = Instant::now();
        }
        while let Ok(command) = admin.try_recv() {
            let AdminCommand::Savepoint { reply, .. } = command;
            let _ = reply
                .send(Err("savepoints are not available in scale-out mode (each partition has its own state)".into()));
        }
        // An instance the group gave no input partition (more instances than partitions) has
        // no stage one of its own: it ends once the stages it may run have finished.
        let stage_one_done = if tasks.is_empty() { input.given_nothing() } else { tasks.values().all(|t| t.ended) };
        if bounded
            && stage_one_done
            && stages_finished(&shared, merge_partitions, &mut producers.states, &mut finish_checked)?
        {
            tracing::info!("the bounded input has been processed");
            break;
        }
    }
    let mut stages = Running { tasks: &mut tasks, merges: &mut merges, aggregate: aggregate.as_mut() };
    checkpoint_all(&shared, &mut producers, &mut stages, [&input, &partials, &repartition], true).await
}

/// The tasks this instance runs.
struct Running<'a> {
    tasks: &'a mut BTreeMap<i32, Task>,
    merges: &'a mut BTreeMap<i32, MergeTask>,
    aggregate: Option<&'a mut Aggregate>,
}

/// Sends what a per-vehicle task has emitted: its passes to the repartition topic, its flows
/// and origins to the partials topic followed by its watermark (when it has moved), the rest to
/// the store writer.
async fn task_output(
    shared: &Shared,
    producers: &mut Producers,
    partition: i32,
    task: &mut Task,
) -> anyhow::Result<()> {
    producers.forwarder.forward(&task.engine.take_forwarded()).await?;
    let mut out = task.engine.take_output();
    let from = partition as u32;
    let partials = Partial::take_rows(from, &mut out);
    let watermark = task.engine.watermark();
    let moved = watermark > task.watermark_sent;
    if moved || !partials.is_empty() {
        task.partials_sent += partials.len() as u64;
        let marker = moved.then_some(Partial::Watermark { from, watermark });
        producers.partials.send(from, partials, marker).await?;
        task.watermark_sent = watermark;
    }
    shared.send(out).await
}

/// Checkpoints every task of every stage, after one barrier for all of them. `sources`: the
/// input, partials and repartition topics, whose groups' offsets follow.
async fn checkpoint_all(
    shared: &Shared,
    producers: &mut Producers,
    running: &mut Running<'_>,
    [input, partials, repartition]: [&KafkaSource; 3],
    publish_now: bool,
) -> anyhow::Result<()> {
    let mut all: Vec<(i32, &mut Task)> = running.tasks.iter_mut().map(|(p, t)| (*p, t)).collect();
    let durable = checkpoint_tasks(shared, producers, &mut all, publish_now).await?;
    input.checkpointed_at(&durable);
    let mut merges: Vec<(i32, &mut MergeTask)> = running.merges.iter_mut().map(|(p, t)| (*p, t)).collect();
    checkpoint_merges(shared, &mut producers.states, &mut merges, partials, publish_now).await?;
    if let Some(agg) = running.aggregate.as_deref_mut() {
        checkpoint_aggregate(shared, &mut producers.states, agg, repartition, publish_now).await?;
    }
    Ok(())
}

/// Checkpoints per-vehicle tasks: complete once their results are written and their forwarded
/// passes acknowledged. Returns the input offsets another instance would resume from, for the
/// group to commit: every task's with a shared `state.dir`; with a state topic, those of the
/// tasks published now (a committed offset ahead of the published state would have an
/// instance given the partition without it start there, the records before lost to it).
async fn checkpoint_tasks(
    shared: &Shared,
    producers: &mut Producers,
    tasks: &mut [(i32, &mut Task)],
    publish_now: bool,
) -> anyhow::Result<KafkaPosition> {
    let mut durable = KafkaPosition { topic: shared.config.kafka.input.topic.clone(), offsets: BTreeMap::new() };
    let started = Instant::now();
    let mut snapshots = Vec::with_capacity(tasks.len());
    for (p, task) in tasks.iter_mut() {
        task.engine.barrier(task.next_id);
        task_output(shared, producers, *p, task).await?;
        snapshots.push(task.engine.snapshot(task.next_id)?);
    }
    shared.sink.barrier().await?;
    producers.forwarder.flush().await?;
    producers.partials.flush().await?;
    for ((p, task), engine) in tasks.iter_mut().zip(snapshots) {
        let position = KafkaPosition {
            topic: shared.config.kafka.input.topic.clone(),
            offsets: task.next.map(|next| (*p, next)).into_iter().collect(),
        };
        let checkpoint = Checkpoint {
            id: task.next_id,
            created_at: chrono::Utc::now().timestamp_millis(),
            source: serde_json::to_value(position)?,
            engine,
        };
        task.checkpoints.save(&checkpoint)?;
        task.engine.committed(task.next_id);
        task.next_id += 1;
        if hand_over(&mut producers.states, &task_key(*p), checkpoint, || task.engine.export(), publish_now).await? {
            durable.offsets.extend(task.next.map(|next| (*p, next)));
        }
    }
    shared.metrics.observe_checkpoint(started, chrono::Utc::now().timestamp_millis());
    Ok(durable)
}

async fn checkpoint_aggregate(
    shared: &Shared,
    states: &mut Option<StateTopic>,
    agg: &mut Aggregate,
    repartition: &KafkaSource,
    publish_now: bool,
) -> anyhow::Result<()> {
    let started = Instant::now();
    agg.engine.barrier(agg.next_id);
    shared.flush(&mut agg.engine).await?;
    let engine = agg.engine.snapshot(agg.next_id)?;
    shared.sink.barrier().await?;
    let checkpoint = Checkpoint {
        id: agg.next_id,
        created_at: chrono::Utc::now().timestamp_millis(),
        source: serde_json::to_value(&agg.position)?,
        engine,
    };
    agg.checkpoints.save(&checkpoint)?;
    agg.engine.committed(agg.next_id);
    agg.next_id += 1;
    shared.metrics.observe_checkpoint(started, checkpoint.created_at);
    // The group's offset follows the state another instance would take the stage with (see
    // `checkpoint_tasks`): an instance that opens the stage without state reads from there.
    if hand_over(states, AGGREGATE_KEY, checkpoint, || agg.engine.export(), publish_now).await? {
        repartition.checkpointed();
    }
    Ok(())
}

/// Checkpoints merge tasks: complete once what they have written is. The group's offsets follow
/// as for the per-vehicle tasks (see `checkpoint_tasks`).
async fn checkpoint_merges(
    shared: &Shared,
    states: &mut Option<StateTopic>,
    merges: &mut [(i32, &mut MergeTask)],
    partials: &KafkaSource,
    publish_now: bool,
) -> anyhow::Result<()> {
    if merges.is_empty() {
        return Ok(());
    }
    let started = Instant::now();
    shared.sink.barrier().await?;
    let mut durable =
        KafkaPosition { topic: shared.config.kafka.scale_out.partials_topic.clone(), offsets: BTreeMap::new() };
    for (p, task) in merges.iter_mut() {
        let blob = crate::core::StateBlob::encode(MERGE_STATE_VERSION, &task.merge, &Default::default())?;
        let checkpoint = Checkpoint {
            id: task.next_id,
            created_at: chrono::Utc::now().timestamp_millis(),
            source: serde_json::to_value(&task.position)?,
            engine: EngineSnapshot { parts: vec![(MERGE_PART.to_owned(), blob)], writes: Vec::new() },
        };
        task.checkpoints.save(&checkpoint)?;
        task.next_id += 1;
        let portable = checkpoint.engine.clone();
        if hand_over(states, &merge_key(*p), checkpoint, || Ok(portable), publish_now).await? {
            durable.offsets.extend(task.position.offset.map(|next| (*p, next)));
        }
    }
    partials.checkpointed_at(&durable);
    shared.metrics.observe_checkpoint(started, chrono::Utc::now().timestamp_millis());
    Ok(())
}

/// After task `key`'s checkpoint is saved: publishes its state (in the portable form `export`
/// gives) when a state topic is set and a publication is due. True when another instance given
/// the task would resume from this checkpoint (it has been published, or the instances share
/// `state.dir`).
async fn hand_over(
    states: &mut Option<StateTopic>,
    key: &str,
    checkpoint: Checkpoint,
    export: impl FnOnce() -> anyhow::Result<EngineSnapshot>,
    publish_now: bool,
) -> anyhow::Result<bool> {
    match states.as_mut() {
        None => Ok(true),
        Some(states) if states.due(key, publish_now) => {
            states.publish(key, &Checkpoint { engine: export()?, ..checkpoint }).await?;
            Ok(true)
        }
        Some(_) => Ok(false),
    }
}

/// The name of an input partition's task: its state's folder and its key in the state topic.
fn task_key(partition: i32) -> String {
    format!("partition-{partition}")
}

/// The name of a merge task (partition `partition` of the partials topic), as [`task_key`].
fn merge_key(partition: i32) -> String {
    format!("merge-{partition}")
}

/// The aggregate stage's name, as [`task_key`] gives a task's.
const AGGREGATE_KEY: &str = "aggregate";

/// The pipelines of the per-vehicle stage: per vehicle, and the partial ones.
fn partition_stage() -> Vec<&'static str> {
    [PER_VEHICLE.as_slice(), PARTIAL.as_slice()].concat()
}

/// Opens the checkpoints in `dir`, waiting while another instance still holds them.
async fn open_checkpoints(dir: &Path) -> anyhow::Result<CheckpointStore> {
    let started = Instant::now();
    loop {
        match CheckpointStore::open(dir) {
            Ok(store) => return Ok(store),
            Err(e) if started.elapsed() < LOCK_WAIT => {
                tracing::debug!(dir = %dir.display(), error = %format!("{e:#}"), "state still held elsewhere; waiting");
                tokio::time::sleep(Duration::from_millis(200)).await;
            }
            Err(e) => return Err(e).with_context(|| format!("{} is still held after {LOCK_WAIT:?}", dir.display())),
        }
    }
}

/// The input offset a task's checkpoint has reached (`None` before its first record).
fn task_offset(checkpoint: &Checkpoint, partition: i32) -> anyhow::Result<Option<i64>> {
    let position: KafkaPosition =
        serde_json::from_value(checkpoint.source.clone()).context("a partition task's position")?;
    Ok(position.offsets.get(&partition).copied())
}

/// Where the aggregate stage's checkpoint stands.
fn aggregate_position(checkpoint: &Checkpoint) -> anyhow::Result<AggregatePosition> {
    serde_json::from_value(checkpoint.source.clone()).context("the aggregate stage's position")
}

/// Where a merge task's checkpoint stands.
fn merge_position(checkpoint: &Checkpoint) -> anyhow::Result<MergePosition> {
    serde_json::from_value(checkpoint.source.clone()).context("a merge task's position")
}

/// Whether the aggregate stage and every merge task of a bounded run have closed every window:
/// their markers are in `state.dir`, or (instances that do not share it) their states
/// published last say so, looked up every few seconds.
fn stages_finished(
    shared: &Shared,
    merge_partitions: usize,
    states: &mut Option<StateTopic>,
    checked: &mut Option<Instant>,
) -> anyhow::Result<bool> {
    let keys: Vec<String> =
        std::iter::once(AGGREGATE_KEY.to_owned()).chain((0..merge_partitions as i32).map(merge_key)).collect();
    let pending: Vec<String> = keys.into_iter().filter(|k| !shared.finished_marker(k).exists()).collect();
    if pending.is_empty() {
        return Ok(true);
    }
    if states.is_none() || checked.is_some_and(|t| t.elapsed() < FINISH_CHECK_EVERY) {
        return Ok(false);
    }
    *checked = Some(Instant::now());
    let published = read_published(states, &pending)?;
    let finished = |c: &Checkpoint| c.source.get("finished").and_then(serde_json::Value::as_bool) == Some(true);
    Ok(pending.iter().all(|k| published.get(k).is_some_and(finished)))
}

/// The newest state in the state topic of each of the tasks `keys` (those published at all).
fn read_published(states: &mut Option<StateTopic>, keys: &[String]) -> anyhow::Result<BTreeMap<String, Checkpoint>> {
    match states {
        Some(states) if !keys.is_empty() => tokio::task::block_in_place(|| states.read(keys)),
        _ => Ok(BTreeMap::new()),
    }
}
