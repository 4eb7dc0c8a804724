//! `passflow bench`: throughput figures, printed (not asserted).
//!
//! `bench core` measures the streaming core with the flow-count pipeline on a pre-decoded
//! stream of a simulated day (repeated, each copy a day later with its own pass ids):
//! deduplication, watermarks, lateness and windows, without JSON decoding or a store.

use super::replay::build_engine;
use crate::config::Config;
use crate::core::Clocks;
use crate::ingest::Validator;
use crate::model::{decode_record, Pass, DAY_MS};
use crate::simulator::{sample_city, simulate_day, SimParams};
use std::sync::Arc;
use std::time::Instant;

/// Passes handed to the engine at a time.
const BATCH: usize = 4_096;

pub struct CoreBenchResult {
    pub passes: u64,
    pub seconds: f64,
    pub peak_rss_mb: f64,
    pub rows: u64,
}

/// The sample city and a simulated day of it (seed 1, 2026-03-02) for a benchmark.
fn bench_day(
    config: &Config,
    vehicles: u32,
) -> anyhow::Result<(Arc<crate::reference::City>, crate::simulator::SimDay)> {
    let city = Arc::new(sample_city());
    let params = SimParams {
        day: chrono::NaiveDate::from_ymd_opt(2026, 3, 2).expect("valid date"),
        vehicles,
        seed: 1,
        time_zone: config.city.tz()?,
        local_prefixes: config.city.local_prefixes.clone(),
    };
    let day = simulate_day(&city, &params);
    Ok((city, day))
}

/// `all_pipelines`: every pipeline instead of flow counts alone, whatever the configuration
/// enables.
pub fn bench_core(config: &Config, vehicles: u32, repeat: u32, all_pipelines: bool) -> anyhow::Result<CoreBenchResult> {
    let tz = config.city.tz()?;
    let (city, day) = bench_day(config, vehicles)?;
    let validator =
        Validator::new(city.clone(), tz, config.input.plate_color_scheme, config.core.max_clock_skew.as_millis());
    let base: Vec<(Pass, u64)> = day
        .emissions
        .iter()
        .filter_map(|e| decode_record(e.line.as_bytes(), tz, config.input.plate_color_scheme).ok())
        .filter_map(|r| {
            let digest = r.content_digest();
            validator.validate(r, None).ok().map(|p| (p, digest))
        })
        .collect();
    let stream: Vec<(Pass, u64)> = (0..i64::from(repeat))
        .flat_map(|k| {
            base.iter().map(move |(p, d)| {
                let mut p = p.clone();
                p.pass_id = format!("{k}-{}", p.pass_id).into();
                p.ts = crate::model::EventTime(p.ts.ms() + k * DAY_MS);
                (p, *d)
            })
        })
        .collect();
    let mut config = config.clone();
    config.pipelines.enabled =
        if all_pipelines { crate::pipelines::every_name() } else { vec!["flow_counts".to_owned()] };
    let mut engine = build_engine(&config, &city, false, None, &crate::pipelines::WatchList::in_memory())?;
    let clocks = Clocks { future_now: None, processing_now: 0 };
    let started = Instant::now();
    let mut rows = 0;
    for chunk in stream.chunks(BATCH) {
        engine.process_decoded(0, chunk, clocks);
        rows += engine.take_output().len() as u64;
    }
    engine.finish();
    rows += engine.take_output().len() as u64;
    Ok(CoreBenchResult {
        passes: stream.len() as u64,
        seconds: started.elapsed().as_secs_f64(),
        peak_rss_mb: peak_rss_mb(),
        rows,
    })
}

/// Peak resident memory of this process (VmHWM), MiB.
pub fn peak_rss_mb() -> f64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmHWM:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<f64>().ok())
        .map_or(0.0, |kb| kb / 1024.0)
}

pub struct StoreBenchResult {
    pub passes: u64,
    /// Batches as the engine handed them over.
    pub batches: usize,
    /// Rows written (after coalescing per key).
    pub rows: u64,
    pub seconds: f64,
}

/// `bench store`: every pipeline's results of a simulated day, computed first, then handed to
/// the store writer batch by batch as a replay hands them over (per-key coalescing, merged
/// transactions, retries); the figure is rows written per second of writing alone.
pub async fn bench_store(config: &Config, store_url: &str, vehicles: u32) -> anyhow::Result<StoreBenchResult> {
    use crate::core::sink::{spawn_writer, Outlets};
    use crate::core::Record;
    let (city, day) = bench_day(config, vehicles)?;
    let mut engine = build_engine(config, &city, false, None, &crate::pipelines::WatchList::in_memory())?;
    let clocks = Clocks { future_now: None, processing_now: 0 };
    let mut batches = Vec::new();
    for (n, chunk) in day.emissions.chunks(BATCH).enumerate() {
        let records = chunk.iter().enumerate().map(|(i, e)| Record {
            partition: 0,
            seq: (n * BATCH + i) as u64,
            bytes: e.line.as_bytes(),
        });
        engine.process("bench", records, clocks);
        batches.push(engine.take_output());
    }
    engine.finish();
    batches.push(engine.take_output());
    let batch_count = batches.len();

    let store = crate::store::Store::open(store_url).await?;
    let metrics = Arc::new(crate::metrics::Metrics::new());
    let (sink, writer) = spawn_writer(store, Outlets::default(), Arc::clone(&metrics));
    let started = Instant::now();
    for batch in batches {
        sink.send(batch).await?;
    }
    sink.barrier().await?;
    let seconds = started.elapsed().as_secs_f64();
    drop(sink);
    writer.await??;
    Ok(StoreBenchResult {
        passes: day.emissions.len() as u64,
        batches: batch_count,
        rows: metrics.sink_rows.get(),
        seconds,
    })
}

pub struct KafkaBenchResult {
    pub records: u64,
    pub produce_seconds: f64,
    /// From the start of the service to its first record (joining the group).
    pub join_seconds: f64,
    /// From the first record to the end of the bounded run.
    pub seconds: f64,
}

/// `bench kafka`: a simulated day produced to a new topic on `brokers` (keyed by plate), then
/// read by the service end to end (decode, every pipeline, the Kafka outputs when
/// `outputs`, the store in `config`) as a bounded run; the figure is records per second from
/// the first record read to the end (the group join is reported apart).
pub async fn bench_kafka(
    mut config: Config,
    brokers: &str,
    vehicles: u32,
    partitions: i32,
    outputs: bool,
    instances: usize,
) -> anyhow::Result<KafkaBenchResult> {
    use rdkafka::admin::{AdminClient, AdminOptions, NewTopic, TopicReplication};
    use rdkafka::producer::{FutureProducer, FutureRecord};
    let (city, day) = bench_day(&config, vehicles)?;
    let topic = format!("passflow-bench-{}", chrono::Utc::now().timestamp_millis());
    let mut client = rdkafka::ClientConfig::new();
    client.set("bootstrap.servers", brokers);
    let admin: AdminClient<rdkafka::client::DefaultClientContext> = client.create()?;
    for r in admin
        .create_topics(&[NewTopic::new(&topic, partitions, TopicReplication::Fixed(1))], &AdminOptions::new())
        .await?
    {
        r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
    }
    if instances > 1 {
        // Scale-out: the instances share the input partitions and the merge of the partial
        // flows, origins, speeds, Top-N and congestion; one runs the aggregate stage.
        config.kafka.scale_out.enabled = true;
        config.kafka.scale_out.repartition_topic = format!("{topic}.repartition");
        config.kafka.scale_out.partials_topic = format!("{topic}.partials");
        let internal = [
            NewTopic::new(&config.kafka.scale_out.repartition_topic, 1, TopicReplication::Fixed(1)),
            NewTopic::new(&config.kafka.scale_out.partials_topic, partitions, TopicReplication::Fixed(1)),
        ];
        for r in admin.create_topics(&internal, &AdminOptions::new()).await? {
            r.map_err(|(t, e)| anyhow::anyhow!("creating topic {t}: {e}"))?;
        }
    }
    let producer: FutureProducer = client.clone().set("linger.ms", "20").create()?;
    let started = Instant::now();
    let keyed: Vec<(String, &str)> = day
        .emissions
        .iter()
        .map(|e| {
            let plate = serde_json::from_str::<serde_json::Value>(&e.line)
                .ok()
                .and_then(|v| v.get("plate").and_then(|p| p.as_str()).map(str::to_owned))
                .unwrap_or_default();
            (plate, e.line.as_str())
        })
        .collect();
    let mut deliveries = Vec::with_capacity(keyed.len());
    for (plate, line) in &keyed {
        let record = FutureRecord::to(&topic).key(plate).payload(*line);
        deliveries.push(producer.send(record, rdkafka::util::Timeout::Never));
    }
    for d in futures::future::join_all(deliveries).await {
        d.map_err(|(e, _)| anyhow::anyhow!("producing the bench day: {e}"))?;
    }
    let produce_seconds = started.elapsed().as_secs_f64();

    let state = tempfile::tempdir()?;
    config.city.dir = state.path().join("city");
    crate::simulator::write_city(&city, &config.city.dir)?;
    config.state.dir = state.path().join("state");
    config.archive.dir = Default::default();
    config.api.listen = "127.0.0.1:0".into();
    config.api.audit_log = state.path().join("audit.log");
    config.pipelines.watchlist_file = state.path().join("watchlist.csv");
    config.webhooks.queue = state.path().join("webhooks.db");
    config.source.kind = crate::config::SourceKind::Kafka;
    config.kafka.brokers = brokers.to_owned();
    config.kafka.input.topic = topic.clone();
    config.kafka.input.group_id = topic.clone();
    config.kafka.input.bounded = true;
    config.kafka.input.wall_clock = false;
    config.kafka.output.enabled = outputs;
    let started = Instant::now();
    // Several instances run in this process as they would in several: each its own service.
    let mut handles = Vec::new();
    for _ in 0..instances.max(1) {
        handles.push(super::run(config.clone(), None).await?);
    }
    // Joining the group can take the broker's rebalance delay: the figure starts at the first
    // record read.
    while handles.iter().all(|h| h.metrics.passes_received.get() == 0) && started.elapsed().as_secs() < 120 {
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    let first = Instant::now();
    for handle in handles {
        handle.wait().await?;
    }
    Ok(KafkaBenchResult {
        records: day.emissions.len() as u64,
        produce_seconds,
        join_seconds: (first - started).as_secs_f64(),
        seconds: first.elapsed().as_secs_f64(),
    })
}
