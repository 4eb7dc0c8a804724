//! The hand-over from the engine to the stores: a bounded queue (a slow store slows the
//! source, memory stays bounded), per-key coalescing, retries while the store is down, and
//! checkpoint barriers that complete only when everything before them has been written.

use crate::kafka::KafkaSink;
use crate::metrics::Metrics;
use crate::results::{FlowCountRow, ResultBatch};
use crate::store::Store;
use crate::webhooks::Webhooks;
use rustc_hash::FxHashMap;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;

/// Batches queued between the engine and the store writer.
pub const QUEUE_BATCHES: usize = 8;
const MAX_BACKOFF: Duration = Duration::from_secs(5);
/// Rows merged into one store transaction at most.
const MERGE_ROWS: usize = 200_000;

enum SinkMsg {
    Rows(ResultBatch),
    Barrier(oneshot::Sender<()>),
}

#[derive(Clone)]
pub struct SinkHandle {
    tx: mpsc::Sender<SinkMsg>,
    /// Batches queued or being written (`passflow_sink_backlog_batches`).
    backlog: prometheus::IntGauge,
}

impl SinkHandle {
    /// Queues rows for the store; waits while the queue is full.
    pub async fn send(&self, batch: ResultBatch) -> anyhow::Result<()> {
        if batch.is_empty() {
            return Ok(());
        }
        self.backlog.inc();
        self.tx.send(SinkMsg::Rows(batch)).await.map_err(|_| anyhow::anyhow!("the store writer has stopped"))
    }

    /// Returns once every row queued before it has been written.
    pub async fn barrier(&self) -> anyhow::Result<()> {
        let (ack, done) = oneshot::channel();
        self.tx.send(SinkMsg::Barrier(ack)).await.map_err(|_| anyhow::anyhow!("the store writer has stopped"))?;
        done.await.map_err(|_| anyhow::anyhow!("the store writer stopped before the barrier"))
    }
}

/// Starts the store writer; it ends when every handle is dropped. Alerts also go to the
/// webhook queue when one is given, and everything to the Kafka topics when configured (both
/// before the barrier that covers them is acknowledged).
pub fn spawn_writer(
    store: Store,
    outlets: Outlets,
    metrics: Arc<Metrics>,
) -> (SinkHandle, JoinHandle<anyhow::Result<()>>) {
    let (tx, rx) = mpsc::channel(QUEUE_BATCHES);
    (SinkHandle { tx, backlog: metrics.sink_backlog.clone() }, tokio::spawn(write_loop(store, outlets, rx, metrics)))
}

/// Where results go besides the store: alerts to the webhook queue and the live alert stream
/// (JSON), everything to the Kafka topics.
#[derive(Default)]
pub struct Outlets {
    pub webhooks: Option<Arc<Webhooks>>,
    pub live: Option<tokio::sync::broadcast::Sender<Arc<str>>>,
    pub kafka: Option<KafkaSink>,
}

async fn write_loop(
    store: Store,
    mut outlets: Outlets,
    mut rx: mpsc::Receiver<SinkMsg>,
    metrics: Arc<Metrics>,
) -> anyhow::Result<()> {
    let mut next = rx.recv().await;
    while let Some(msg) = next.take() {
        match msg {
            SinkMsg::Barrier(ack) => {
                if let Some(kafka) = &mut outlets.kafka {
                    kafka.flush().await;
                }
                let _ = ack.send(());
            }
            SinkMsg::Rows(mut batch) => {
                // Whatever else is already queued goes into the same transaction (up to a
                // barrier): fewer commits, and re-emissions of a key collapse into one row.
                let mut merged = 1;
                while batch.len() < MERGE_ROWS {
                    match rx.try_recv() {
                        Ok(SinkMsg::Rows(mut more)) => {
                            batch.append(&mut more);
                            merged += 1;
                        }
                        Ok(barrier) => {
                            next = Some(barrier);
                            break;
                        }
                        Err(_) => break,
                    }
                }
                if !matches!(store, Store::Null) || outlets.webhooks.is_some() || outlets.kafka.is_some() {
                    coalesce_batch(&mut batch);
                }
                let batch = Arc::new(batch);
                // The Kafka messages are made and queued while the store writes: the store is
                // polled first, so it has handed its work to the database (or SQLite's thread)
                // before the Kafka encoding takes this one.
                let to_kafka = async {
                    if let Some(kafka) = &mut outlets.kafka {
                        kafka.send(&batch).await;
                    }
                };
                let to_store = async {
                    if !matches!(store, Store::Null) {
                        write_with_retry(&store, &batch, &metrics).await;
                    }
                };
                tokio::join!(to_store, to_kafka);
                if let Some(webhooks) = &outlets.webhooks {
                    enqueue_with_retry(webhooks, &batch.alerts).await;
                }
                if let Some(live) = &outlets.live {
                    for a in &batch.alerts {
                        // Nobody listening is fine: the stream is for whoever is connected.
                        let _ = live.send(crate::webhooks::alert_body(a).to_string().into());
                    }
                }
                metrics.sink_backlog.sub(merged);
            }
        }
        if next.is_none() {
            next = rx.recv().await;
        }
    }
    if let Some(kafka) = &mut outlets.kafka {
        kafka.flush().await;
    }
    Ok(())
}

/// One row per key in every table of a batch: the newest.
pub fn coalesce_batch(batch: &mut ResultBatch) {
    batch.flow_counts = coalesce(std::mem::take(&mut batch.flow_counts));
    batch.top_n = latest_windows(std::mem::take(&mut batch.top_n));
    batch.checkpoint_speed = coalesce_by(std::mem::take(&mut batch.checkpoint_speed), |r| {
        ((r.checkpoint_id.clone(), r.window_s, r.window_start), r.revision)
    });
    batch.high_frequency = coalesce_by(std::mem::take(&mut batch.high_frequency), |r| {
        ((r.day.clone(), r.checkpoint_id.clone(), r.plate.clone(), r.plate_color), r.passes)
    });
    batch.segment_congestion = coalesce_by(std::mem::take(&mut batch.segment_congestion), |r| {
        ((r.segment_id.clone(), r.window_s, r.window_start), r.revision)
    });
    batch.area_congestion = coalesce_by(std::mem::take(&mut batch.area_congestion), |r| {
        ((r.level, r.key_id.clone(), r.window_s, r.window_start), r.revision)
    });
    batch.alerts = coalesce_by(std::mem::take(&mut batch.alerts), |r| (r.alert_id.clone(), r.revision));
    batch.trajectories = coalesce_by(std::mem::take(&mut batch.trajectories), |r| {
        ((r.plate.clone(), r.plate_color, r.day.clone()), r.revision)
    });
    batch.restriction_summary = coalesce_by(std::mem::take(&mut batch.restriction_summary), |r| {
        ((r.day.clone(), r.checkpoint_id.clone(), r.rule_id.clone()), r.violations)
    });
    // A vehicle's first entry is its earliest pass, whatever the revision (the store's guard).
    batch.first_entry = coalesce_by(std::mem::take(&mut batch.first_entry), |r| {
        ((r.plate.clone(), r.plate_color), std::cmp::Reverse((r.ts, r.pass_id.clone())))
    });
    batch.origin_counts = coalesce_by(std::mem::take(&mut batch.origin_counts), |r| {
        ((r.region_id.clone(), r.window_start, r.origin_province.clone(), r.origin_city.clone()), r.revision)
    });
}

/// Writes a batch, retrying with back-off until the store takes it: results are never dropped.
async fn write_with_retry(store: &Store, batch: &Arc<ResultBatch>, metrics: &Metrics) {
    let mut backoff = Duration::from_millis(100);
    loop {
        match store.write(Arc::clone(batch)).await {
            Ok(()) => {
                metrics.set_ready("store", true);
                metrics.sink_rows.inc_by(batch.len() as u64);
                return;
            }
            Err(e) => {
                metrics.set_ready("store", false);
                metrics.sink_errors.inc();
                tracing::warn!(store = store.kind(), error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "store write failed; retrying");
                tokio::time::sleep(backoff).await;
                backoff = (backoff * 2).min(MAX_BACKOFF);
            }
        }
    }
}

/// Queues alerts for the webhooks, retrying until the queue takes them.
async fn enqueue_with_retry(webhooks: &Webhooks, alerts: &[crate::results::AlertRow]) {
    let mut backoff = Duration::from_millis(100);
    while let Err(e) = webhooks.enqueue(alerts, chrono::Utc::now().timestamp_millis()).await {
        tracing::warn!(error = %format!("{e:#}"), retry_in_ms = backoff.as_millis() as u64, "webhook queue write failed; retrying");
        tokio::time::sleep(backoff).await;
        backoff = (backoff * 2).min(MAX_BACKOFF);
    }
}

/// Keeps the last emission of each Top-N window (each replaces the one before it whole).
fn latest_windows(windows: Vec<crate::results::TopNWindow>) -> Vec<crate::results::TopNWindow> {
    let mut last: FxHashMap<(&'static str, i64), crate::results::TopNWindow> = FxHashMap::default();
    for w in windows {
        last.insert((w.metric, w.window_end), w);
    }
    last.into_values().collect()
}

/// Keeps one flow-count row per key: the one with the highest revision.
pub fn coalesce(rows: Vec<FlowCountRow>) -> Vec<FlowCountRow> {
    coalesce_by(rows, |r| ((r.level, r.key_id.clone(), r.window_s, r.window_start), r.revision))
}

/// Keeps one row per key (`key_of` gives the key and the row's place in the key's order, a
/// revision say): the last in that order; of equals, the last given. The rows come in key
/// order: the stores write them in that order, and find them sorted already (sorting the rows
/// here, side by side in memory, is cheaper than sorting the stores' rows of column values).
pub fn coalesce_by<R, K: std::hash::Hash + Ord, O: Ord>(rows: Vec<R>, key_of: impl Fn(&R) -> (K, O)) -> Vec<R> {
    use std::collections::hash_map::Entry;
    // Sized for every row at once (growing it would rehash it over and again), and one look-up
    // a row.
    let mut best: FxHashMap<K, (O, R)> = FxHashMap::with_capacity_and_hasher(rows.len(), Default::default());
    for row in rows {
        let (key, revision) = key_of(&row);
        match best.entry(key) {
            Entry::Occupied(mut kept) if kept.get().0 <= revision => {
                kept.insert((revision, row));
            }
            Entry::Occupied(_) => {}
            Entry::Vacant(slot) => {
                slot.insert((revision, row));
            }
        }
    }
    let mut kept: Vec<(K, R)> = best.into_iter().map(|(key, (_, row))| (key, row)).collect();
    kept.sort_unstable_by(|a, b| a.0.cmp(&b.0));
    kept.into_iter().map(|(_, row)| row).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn row(key: &str, passes: u64, revision: u32) -> FlowCountRow {
        FlowCountRow { level: "checkpoint", key_id: key.into(), window_s: 30, window_start: 0, passes, revision }
    }

    fn batch() -> ResultBatch {
        ResultBatch { flow_counts: vec![row("a", 1, 0)], ..ResultBatch::default() }
    }

    #[tokio::test]
    async fn a_stalled_store_writer_stops_the_engine_at_a_bounded_queue() {
        use futures::FutureExt;
        let (tx, mut rx) = mpsc::channel(QUEUE_BATCHES);
        let sink = SinkHandle { tx, backlog: prometheus::IntGauge::new("backlog", "test").unwrap() };
        for _ in 0..QUEUE_BATCHES {
            sink.send(batch()).now_or_never().expect("room in the queue").unwrap();
        }
        assert!(sink.send(batch()).now_or_never().is_none(), "the engine waits once the queue is full");
        let _ = rx.recv().await;
        sink.send(batch()).now_or_never().expect("room again").unwrap();
    }

    #[test]
    fn coalescing_keeps_each_vehicles_earliest_first_entry_whatever_its_revision() {
        let entry = |ts: i64, pass_id: &str, revision: u32| crate::results::FirstEntryRow {
            plate: "赣A1".into(),
            plate_color: 2,
            ts,
            checkpoint_id: "KK1".into(),
            pass_id: pass_id.into(),
            revision,
        };
        let mut batch = ResultBatch {
            first_entry: vec![entry(200, "b", 1), entry(200, "a", 0), entry(300, "c", 5), entry(200, "a", 0)],
            ..ResultBatch::default()
        };
        coalesce_batch(&mut batch);
        assert_eq!(batch.first_entry, vec![entry(200, "a", 0)]);
    }

    #[test]
    fn coalescing_keeps_the_highest_revision_of_each_key() {
        let mut rows = coalesce(vec![
            row("a", 1, 0),
            row("a", 3, 2),
            row("a", 2, 1),
            row("b", 5, 0),
            row("c", 1, 4),
            row("c", 7, 4),
        ]);
        rows.sort();
        // Of two rows of one revision, the later stands.
        assert_eq!(rows, vec![row("a", 3, 2), row("b", 5, 0), row("c", 7, 4)]);
    }
}
