//! Every Prometheus metric passflow exports, in one place, prefixed `passflow_`. Labels are
//! bounded sets (reject reasons), never plates or pass ids.

use crate::ingest::IngestStats;
use prometheus::{Encoder, IntCounter, IntCounterVec, Opts, Registry, TextEncoder};

pub struct Metrics {
    registry: Registry,
    pub passes_received: IntCounter,
    pub passes_valid: IntCounter,
    pub passes_invalid: IntCounterVec,
    pub passes_duplicate: IntCounter,
    pub passes_unreadable: IntCounter,
    pub sink_rows: IntCounter,
    pub sink_backlog: prometheus::IntGauge,
    pub sink_errors: IntCounter,
    pub late_passes: IntCounter,
    pub checkpoints: IntCounter,
    pub watermark_lag_seconds: prometheus::Gauge,
    /// Webhook delivery attempts by outcome: delivered, failed (retried), dead (given up).
    pub webhook_deliveries: IntCounterVec,
    /// Checkpoint duration (barrier to saved).
    pub checkpoint_seconds: prometheus::Histogram,
    /// When the last checkpoint completed, epoch seconds (its age: `time() - this`).
    pub checkpoint_last_seconds: prometheus::Gauge,
    /// Deduplication ids held in memory until the next checkpoint (RocksDB state).
    pub state_pending_ids: prometheus::IntGauge,
    /// Scale-out: the (key, window)s this instance's merge tasks hold (partial results of
    /// windows that may still change).
    pub merge_held: prometheus::IntGauge,
    /// Scale-out: partial results the merge tasks ignored because their window had been let go.
    pub merge_ignored: prometheus::IntCounter,
    /// Result rows emitted (first emissions and corrections), by table.
    pub result_rows: IntCounterVec,
    /// HTTP request latency by route (the matched path pattern, so the label set is bounded).
    pub http_seconds: prometheus::HistogramVec,
    /// Wall-clock ms of the pipeline loop's last turn (0: not running); for `/readyz`.
    pub pipeline_heartbeat_ms: prometheus::IntGauge,
    /// Records on the Kafka input topic not yet processed (summed over assigned partitions).
    pub kafka_consumer_lag: prometheus::IntGauge,
    /// The same by partition (partitions are few: a bounded label).
    pub kafka_partition_lag: prometheus::IntGaugeVec,
    /// Wall clock minus each source partition's own watermark (its highest event time less the
    /// out-of-orderness): which partition holds the watermark back.
    pub partition_watermark_lag_seconds: prometheus::GaugeVec,
    /// 1 while a part the service depends on works, 0 while it does not: `source` (the Kafka
    /// broker answers), `store` (the last write went through), `kafka_sink` (no message waits
    /// long for its acknowledgement). `/readyz` reports them; absent parts have no series.
    pub component_ready: prometheus::IntGaugeVec,
    /// The sum of `passes_invalid` over reasons (not exported; for the progress line).
    pub passes_invalid_sum: IntCounter,
}

impl Metrics {
    pub fn new() -> Metrics {
        let registry = Registry::new();
        let counter = |name: &str, help: &str| {
            let c = IntCounter::new(name, help).expect("valid metric name");
            registry.register(Box::new(c.clone())).expect("metric registered once");
            c
        };
        let passes_received = counter("passflow_passes_received_total", "Records received from sources.");
        let passes_valid = counter("passflow_passes_valid_total", "Distinct valid passes accepted.");
        let passes_duplicate = counter("passflow_passes_duplicate_total", "Identical resends dropped.");
        let passes_unreadable =
            counter("passflow_passes_unreadable_plate_total", "Valid passes whose plate was unreadable.");
        let passes_invalid = IntCounterVec::new(
            Opts::new("passflow_passes_invalid_total", "Records dead-lettered, by reason."),
            &["reason"],
        )
        .expect("valid metric");
        registry.register(Box::new(passes_invalid.clone())).expect("metric registered once");
        let passes_invalid_sum = IntCounter::new("passes_invalid_sum", "unexported").expect("valid metric name");
        let sink_rows = counter("passflow_sink_rows_total", "Result rows written to the store.");
        let sink_backlog =
            prometheus::IntGauge::new("passflow_sink_backlog_batches", "Result batches waiting for the store.")
                .expect("valid metric name");
        registry.register(Box::new(sink_backlog.clone())).expect("metric registered once");
        let sink_errors = counter("passflow_sink_errors_total", "Failed store writes (each is retried).");
        let late_passes = counter("passflow_passes_late_total", "Passes late for at least one window.");
        let checkpoints = counter("passflow_checkpoints_total", "Completed checkpoints.");
        let watermark_lag_seconds =
            prometheus::Gauge::new("passflow_watermark_lag_seconds", "Wall clock minus the watermark.")
                .expect("valid metric name");
        registry.register(Box::new(watermark_lag_seconds.clone())).expect("metric registered once");
        let webhook_deliveries = IntCounterVec::new(
            Opts::new("passflow_webhook_deliveries_total", "Webhook delivery attempts, by outcome."),
            &["outcome"],
        )
        .expect("valid metric");
        registry.register(Box::new(webhook_deliveries.clone())).expect("metric registered once");
        // Every label value known in advance is exported from the start (at 0), so dashboards
        // and alerts see the series before the first event.
        for outcome in ["delivered", "failed", "dead"] {
            webhook_deliveries.with_label_values(&[outcome]);
        }
        for reason in crate::model::RejectReason::KINDS {
            passes_invalid.with_label_values(&[reason]);
        }
        let pipeline_heartbeat_ms = prometheus::IntGauge::new(
            "passflow_pipeline_heartbeat_timestamp_ms",
            "Wall-clock time of the pipeline loop's last turn, epoch ms.",
        )
        .expect("valid metric name");
        registry.register(Box::new(pipeline_heartbeat_ms.clone())).expect("metric registered once");
        let http_seconds = prometheus::HistogramVec::new(
            prometheus::HistogramOpts::new("passflow_http_request_duration_seconds", "HTTP request latency, by route.")
                .buckets(vec![0.001, 0.0025, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5]),
            &["route"],
        )
        .expect("valid metric");
        registry.register(Box::new(http_seconds.clone())).expect("metric registered once");
        let checkpoint_seconds = prometheus::Histogram::with_opts(
            prometheus::HistogramOpts::new(
                "passflow_checkpoint_duration_seconds",
                "Checkpoint duration, barrier to saved.",
            )
            .buckets(vec![0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0]),
        )
        .expect("valid metric");
        registry.register(Box::new(checkpoint_seconds.clone())).expect("metric registered once");
        let checkpoint_last_seconds =
            prometheus::Gauge::new("passflow_checkpoint_last_timestamp_seconds", "When the last checkpoint completed.")
                .expect("valid metric name");
        registry.register(Box::new(checkpoint_last_seconds.clone())).expect("metric registered once");
        let state_pending_ids = prometheus::IntGauge::new(
            "passflow_state_pending_dedup_ids",
            "Deduplication ids held in memory until the next checkpoint.",
        )
        .expect("valid metric name");
        registry.register(Box::new(state_pending_ids.clone())).expect("metric registered once");
        let merge_held = prometheus::IntGauge::new(
            "passflow_merge_held_windows",
            "Scale-out: (key, window)s this instance's merge tasks hold, their partial results still open to change.",
        )
        .expect("valid metric name");
        registry.register(Box::new(merge_held.clone())).expect("metric registered once");
        let merge_ignored = prometheus::IntCounter::new(
            "passflow_merge_partials_ignored_total",
            "Scale-out: partial results this instance's merge tasks ignored because their window had been let go (sent again after a restart; without one, partials that came after their partition's end or its idle timeout).",
        )
        .expect("valid metric name");
        registry.register(Box::new(merge_ignored.clone())).expect("metric registered once");
        let result_rows = IntCounterVec::new(
            Opts::new("passflow_result_rows_total", "Result rows emitted (first emissions and corrections), by table."),
            &["table"],
        )
        .expect("valid metric");
        registry.register(Box::new(result_rows.clone())).expect("metric registered once");
        for table in crate::results::ResultBatch::default().counts().map(|(t, _)| t) {
            result_rows.with_label_values(&[table]);
        }
        let kafka_consumer_lag = prometheus::IntGauge::new(
            "passflow_kafka_consumer_lag_records",
            "Records on the Kafka input topic not yet processed, over all assigned partitions.",
        )
        .expect("valid metric name");
        registry.register(Box::new(kafka_consumer_lag.clone())).expect("metric registered once");
        let kafka_partition_lag = prometheus::IntGaugeVec::new(
            Opts::new("passflow_kafka_partition_lag_records", "Records on a Kafka input partition not yet processed."),
            &["partition"],
        )
        .expect("valid metric");
        registry.register(Box::new(kafka_partition_lag.clone())).expect("metric registered once");
        let partition_watermark_lag_seconds = prometheus::GaugeVec::new(
            Opts::new(
                "passflow_partition_watermark_lag_seconds",
                "Wall clock minus a source partition's watermark (its highest event time less the out-of-orderness).",
            ),
            &["partition"],
        )
        .expect("valid metric");
        registry.register(Box::new(partition_watermark_lag_seconds.clone())).expect("metric registered once");
        let component_ready = prometheus::IntGaugeVec::new(
            Opts::new(
                "passflow_component_ready",
                "1 while a part the service depends on works (source, store, kafka_sink).",
            ),
            &["component"],
        )
        .expect("valid metric");
        registry.register(Box::new(component_ready.clone())).expect("metric registered once");
        Metrics {
            registry,
            partition_watermark_lag_seconds,
            component_ready,
            kafka_consumer_lag,
            kafka_partition_lag,
            checkpoint_seconds,
            checkpoint_last_seconds,
            state_pending_ids,
            merge_held,
            merge_ignored,
            result_rows,
            http_seconds,
            pipeline_heartbeat_ms,
            passes_received,
            passes_valid,
            passes_invalid,
            passes_duplicate,
            passes_unreadable,
            sink_rows,
            sink_backlog,
            sink_errors,
            late_passes,
            checkpoints,
            watermark_lag_seconds,
            webhook_deliveries,
            passes_invalid_sum,
        }
    }

    /// Adds what ingestion counted since `before`.
    pub fn observe_ingest(&self, before: &IngestStats, now: &IngestStats) {
        self.passes_received.inc_by(now.records - before.records);
        self.passes_valid.inc_by(now.valid - before.valid);
        self.passes_duplicate.inc_by(now.duplicates - before.duplicates);
        self.passes_unreadable.inc_by(now.unreadable_plates - before.unreadable_plates);
        for (reason, n) in &now.dead_letters {
            let kind = reason.split(':').next().unwrap_or(reason);
            let delta = n - before.dead_letters.get(reason).copied().unwrap_or(0);
            if delta > 0 {
                self.passes_invalid.with_label_values(&[kind]).inc_by(delta);
                self.passes_invalid_sum.inc_by(delta);
            }
        }
    }

    /// A checkpoint begun at `started` completed, created at `created_at_ms`.
    pub fn observe_checkpoint(&self, started: std::time::Instant, created_at_ms: i64) {
        self.checkpoints.inc();
        self.checkpoint_seconds.observe(started.elapsed().as_secs_f64());
        self.checkpoint_last_seconds.set(created_at_ms as f64 / 1000.0);
    }

    /// Marks a part the service depends on as working or not (see `component_ready`).
    pub fn set_ready(&self, component: &str, ready: bool) {
        self.component_ready.with_label_values(&[component]).set(ready as i64);
    }

    /// Every part that has reported whether it works, by name.
    pub fn components(&self) -> Vec<(String, bool)> {
        use prometheus::core::Collector;
        let mut parts = Vec::new();
        for family in self.component_ready.collect() {
            for m in family.get_metric() {
                let name = m.get_label().iter().find(|l| l.name() == "component").map(|l| l.value());
                if let Some(name) = name {
                    parts.push((name.to_owned(), m.get_gauge().get_value() > 0.0));
                }
            }
        }
        parts
    }

    /// Counts a batch of results by table.
    pub fn observe_results(&self, batch: &crate::results::ResultBatch) {
        for (table, n) in batch.counts() {
            if n > 0 {
                self.result_rows.with_label_values(&[table]).inc_by(n as u64);
            }
        }
    }

    /// The Prometheus text exposition of every metric.
    pub fn render(&self) -> String {
        let mut out = Vec::new();
        // Encoding registered metrics into a Vec cannot fail.
        TextEncoder::new().encode(&self.registry.gather(), &mut out).expect("text encoding");
        String::from_utf8(out).expect("prometheus text is UTF-8")
    }
}

impl Default for Metrics {
    fn default() -> Self {
        Metrics::new()
    }
}
