//! `passflow run`: the service. The pipeline (source → engine → stores, with checkpoints), the
//! API and the progress line are sibling tasks; when one stops, or on Ctrl-C / SIGTERM,
//! everything stops (the pipeline with a last checkpoint) and the reason is reported.

use super::replay::build_engine;
use crate::api::{self, AdminCommand, AppState};
use crate::config::{Config, SourceKind};
use crate::core::checkpoint::{read_savepoint, write_savepoint, CheckpointStore};
use crate::core::driver::{Checkpointing, Driver, Saved};
use crate::core::sink::{spawn_writer, QUEUE_BATCHES};
use crate::core::{Clocks, Record};
use crate::kafka::{KafkaPosition, KafkaSink, KafkaSource};
use crate::metrics::Metrics;
use crate::reference::City;
use crate::simulator::{LiveSimulator, SimParams, SimPosition};
use crate::store::Store;
use anyhow::Context;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, watch};
use tokio::task::JoinSet;

/// Records taken from the source per step.
const MAX_BATCH: usize = 20_000;
pub(super) const IDLE_POLL: Duration = Duration::from_millis(50);

/// A running service.
pub struct RunHandle {
    pub api_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
    /// The store writer (awaited by the pipeline task).
    writer: tokio::task::AbortHandle,
    /// How long a stop waits for the tasks.
    stop_timeout: Duration,
    signals: StopSignals,
}

impl RunHandle {
    /// Asks every task to stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Stops every task where it stands, with no last checkpoint and nothing more written, as a
    /// crash would (for tests inside one process).
    /// Returns the errors of tasks that had failed before.
    pub async fn crash(mut self) -> Vec<String> {
        self.tasks.abort_all();
        let mut failed = Vec::new();
        while let Some(done) = self.tasks.join_next().await {
            if let Ok((name, Err(e))) = done {
                failed.push(format!("{name}: {e:#}"));
            }
        }
        self.writer.abort();
        failed
    }

    /// Runs until Ctrl-C, SIGTERM or the end of a task, then stops the rest.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            _ = self.signals.received() => { tracing::info!("shutdown requested"); Ok(()) }
            Some(done) = self.tasks.join_next() => match done {
                Ok((name, Ok(()))) => { tracing::info!(task = name, "task finished"); Ok(()) }
                Ok((name, Err(e))) => Err(e.context(format!("the {name} task failed"))),
                Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
            },
        };
        self.stop();
        let deadline = tokio::time::Instant::now() + self.stop_timeout;
        while let Ok(Some(done)) = tokio::time::timeout_at(deadline, self.tasks.join_next()).await {
            if let Ok((name, Err(e))) = done {
                tracing::error!(task = name, error = %format!("{e:#}"), "task failed while stopping");
            }
        }
        eprintln!();
        if !self.tasks.is_empty() {
            // A task held by a dependency (a store call that retries until it answers) does
            // not see the stop; its work since the last checkpoint is done again on start.
            let left = anyhow::anyhow!(
                "{} task(s) did not stop within {:?} (core.stop_timeout): exiting without them and without a last checkpoint; the input since the last completed checkpoint is read again on start",
                self.tasks.len(),
                self.stop_timeout
            );
            return Err(match outcome {
                Ok(()) => left,
                Err(e) => e.context(left),
            });
        }
        outcome
    }
}

/// Ctrl-C and SIGTERM, listened for from the start on a task of their own. Until the service
/// has started (a restore, say, can wait long for Redis) one ends the process at once, as it
/// would without a handler: there is nothing to checkpoint yet. From then on it asks for a
/// stop.
struct StopSignals {
    started: Arc<AtomicBool>,
    requested: mpsc::UnboundedReceiver<()>,
}

impl StopSignals {
    fn listen() -> anyhow::Result<StopSignals> {
        use tokio::signal::unix::{signal, SignalKind};
        let listening = |kind| signal(kind).context("listening for Ctrl-C and SIGTERM");
        let (mut interrupt, mut terminate) = (listening(SignalKind::interrupt())?, listening(SignalKind::terminate())?);
        let started = Arc::new(AtomicBool::new(false));
        let (request, requested) = mpsc::unbounded_channel();
        let has_started = started.clone();
        tokio::spawn(async move {
            loop {
                tokio::select! {
                    _ = interrupt.recv() => {}
                    _ = terminate.recv() => {}
                }
                if !has_started.load(Ordering::SeqCst) {
                    eprintln!("error: stopped while starting");
                    std::process::exit(1);
                }
                if request.send(()).is_err() {
                    return;
                }
            }
        });
        Ok(StopSignals { started, requested })
    }

    /// From now on a signal asks for a stop.
    fn started(&self) {
        self.started.store(true, Ordering::SeqCst);
    }

    async fn received(&mut self) {
        self.requested.recv().await;
    }
}

pub(super) fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

/// Starts the service on `config` (resuming from a savepoint when given) and returns once it
/// is serving.
pub async fn run(config: Config, from_savepoint: Option<PathBuf>) -> anyhow::Result<RunHandle> {
    let signals = StopSignals::listen()?;
    let city =
        Arc::new(City::load(&config.city.dir).with_context(|| format!("loading city {}", config.city.dir.display()))?);
    let store = Store::open_waiting(&config.store.url).await?;
    let metrics = Arc::new(Metrics::new());
    let watchlist = super::replay::load_watchlist(&config)?;
    let scale_out = config.source.kind == SourceKind::Kafka && config.kafka.scale_out.enabled;
    anyhow::ensure!(
        !(scale_out && from_savepoint.is_some()),
        "savepoints are not available in scale-out mode (each partition has its own state)"
    );
    // Scale-out keeps its state per partition, in folders of `state.dir` (see `cluster`).
    let checkpoints = match scale_out {
        true => None,
        false => Some(CheckpointStore::open(&config.state.dir)?),
    };
    if let (Some(dir), Some(checkpoints)) = (from_savepoint, &checkpoints) {
        let mut savepoint = read_savepoint(&dir)?;
        savepoint.id = checkpoints.ids()?.last().map_or(savepoint.id, |last| last + 1).max(savepoint.id);
        let mut engine = build_engine(&config, &city, true, Some(checkpoints), &watchlist)?;
        engine
            .restore(&savepoint.engine)
            .with_context(|| format!("savepoint {} does not fit this build", dir.display()))?;
        // Re-snapshot: state kept in RocksDB is written with the checkpoint it belongs to.
        savepoint.engine = engine.snapshot(savepoint.id)?;
        checkpoints.save(&savepoint)?;
        tracing::info!(savepoint = %dir.display(), "restoring from savepoint");
    }
    let listener = api::bind(&config.api.listen).await?;
    let api_addr = listener.local_addr()?;
    tracing::info!(%api_addr, store = store.kind(), city = %config.city.dir.display(), "passflow serving");
    let (stop, stopped) = watch::channel(false);
    let (admin_tx, admin_rx) = mpsc::channel(4);
    let mut tasks = JoinSet::new();
    let (live_alerts, _) = tokio::sync::broadcast::channel(1024);
    let webhooks = match config.webhooks.endpoints.is_empty() {
        true => None,
        false => Some(crate::webhooks::Webhooks::open(&config.webhooks, &metrics).await?),
    };
    let api_store = Arc::new(Store::open(&config.store.url).await?);
    let state = AppState {
        live_alerts: live_alerts.clone(),
        metrics: metrics.clone(),
        admin: admin_tx,
        watchlist: watchlist.clone(),
        store: api_store.clone(),
        city: city.clone(),
        auth: Arc::new(crate::api::Auth::new(config.api.tokens.clone(), config.api.audit_log.clone())),
        limits: Arc::new(crate::api::Limits::new(config.api.requests_per_second, config.api.cors_origins.clone())),
        webhooks: webhooks.clone(),
    };
    let mut api_stop = stopped.clone();
    tasks.spawn(async move {
        tokio::select! { r = api::serve(listener, state) => ("api", r), _ = api_stop.wait_for(|s| *s) => ("api", Ok(())) }
    });
    if let Some(webhooks) = &webhooks {
        let (webhooks, stopped) = (webhooks.clone(), stopped.clone());
        tasks.spawn(async move { ("webhooks", webhooks.run(stopped).await) });
    }
    let kafka = match config.kafka.output.enabled {
        true => Some(KafkaSink::open(
            &config.kafka,
            crate::kafka::next_epoch(&config.state.dir)?,
            metrics.component_ready.with_label_values(&["kafka_sink"]),
        )?),
        false => None,
    };
    let outlets = crate::core::sink::Outlets { webhooks, live: Some(live_alerts), kafka };
    let (sink, writer) = spawn_writer(store, outlets, metrics.clone());
    let writer_abort = writer.abort_handle();
    let work: std::pin::Pin<Box<dyn std::future::Future<Output = anyhow::Result<()>> + Send>> = match checkpoints {
        None => {
            let shared = super::cluster::Shared {
                config: config.clone(),
                city: city.clone(),
                watchlist: watchlist.clone(),
                store: api_store.clone(),
                sink,
                metrics: metrics.clone(),
            };
            Box::pin(super::cluster::pipeline(shared, admin_rx, stopped.clone()))
        }
        Some(checkpoints) => {
            let (source, driver) = single(&config, &city, &watchlist, &api_store, checkpoints, sink, &metrics).await?;
            Box::pin(pipeline(source, driver, admin_rx, metrics.clone(), stopped.clone()))
        }
    };
    let purger = Store::open(&config.store.url).await?;
    // From here a signal asks for a stop. Set before the pipeline is spawned: it may be seen at
    // work (a log line, a metric) before this function returns, and a stop asked for then is a
    // stop of a running service.
    signals.started();
    tasks.spawn(async move {
        let result = work.await;
        // The writer ends once the driver, which holds the last sink handle, is gone.
        let written = match writer.await {
            Ok(r) => r,
            Err(e) => Err(anyhow::anyhow!("the store writer panicked: {e}")),
        };
        ("pipeline", result.and(written))
    });
    tasks.spawn(purge(purger, config.store.clone(), stopped.clone()));
    tasks.spawn(progress(metrics.clone(), stopped));
    Ok(RunHandle {
        api_addr,
        metrics,
        stop,
        tasks,
        writer: writer_abort,
        stop_timeout: config.core.stop_timeout.0,
        signals,
    })
}

/// The single-instance pipeline's engine, restored from the newest checkpoint, and its source
/// at the checkpoint's position.
async fn single(
    config: &Config,
    city: &Arc<City>,
    watchlist: &Arc<crate::pipelines::WatchList>,
    api_store: &Store,
    checkpoints: CheckpointStore,
    sink: crate::core::sink::SinkHandle,
    metrics: &Arc<Metrics>,
) -> anyhow::Result<(Source, Driver)> {
    let engine = build_engine(config, city, true, Some(&checkpoints), watchlist)?;
    let checkpointing = Checkpointing { store: checkpoints, interval: config.core.checkpoint_interval.0 };
    let (mut driver, resumed) = Driver::start(engine, sink, Some(checkpointing), metrics.clone())?;
    if resumed.is_some() {
        let lateness_ms = config.core.allowed_lateness.as_millis();
        super::replay::adopt_stored_alerts(&mut driver.engine, api_store, lateness_ms).await?;
    }
    let source = match config.source.kind {
        SourceKind::Simulator => {
            driver.engine.assign(0, wall_ms());
            let resume: Option<SimPosition> = resumed
                .map(serde_json::from_value)
                .transpose()
                .context("the checkpoint's source position is not a simulator position")?;
            let s = &config.source.simulator;
            let params = SimParams {
                day: chrono::NaiveDate::default(),
                vehicles: s.vehicles,
                seed: s.seed,
                time_zone: config.city.tz()?,
                local_prefixes: config.city.local_prefixes.clone(),
            };
            let (speed, city) = (s.speed, city.clone());
            let simulator =
                tokio::task::spawn_blocking(move || LiveSimulator::start(city, params, speed, wall_ms(), resume))
                    .await?;
            Source::Simulator(simulator)
        }
        SourceKind::Kafka => {
            let resume: Option<KafkaPosition> = resumed
                .map(serde_json::from_value)
                .transpose()
                .context("the checkpoint's source position is not a Kafka position")?;
            Source::Kafka(KafkaSource::open(&config.kafka, resume)?)
        }
    };
    Ok((source, driver))
}

/// What the service reads.
enum Source {
    Simulator(LiveSimulator),
    Kafka(KafkaSource),
}

/// Records from a source: (partition, place in the partition, bytes).
type Records = Vec<(u32, u64, Vec<u8>)>;

impl Source {
    fn name(&self) -> &'static str {
        match self {
            Source::Simulator(_) => "sim",
            Source::Kafka(_) => "kafka",
        }
    }

    /// The next records; partitions newly assigned are handed to the engine first.
    fn poll(&mut self, engine: &mut crate::core::Engine, max: usize) -> anyhow::Result<Records> {
        match self {
            Source::Simulator(s) => {
                Ok(s.poll(max).into_iter().map(|(seq, line)| (0, seq, line.into_bytes())).collect())
            }
            Source::Kafka(k) => {
                let polled = k.poll(IDLE_POLL)?;
                for p in polled.assigned {
                    engine.assign(p as u32, wall_ms());
                }
                Ok(polled
                    .records
                    .into_iter()
                    .map(|f| (f.partition as u32, f.offset as u64, f.payload.unwrap_or_default()))
                    .collect())
            }
        }
    }

    /// The source's clock: simulated time (faster when accelerated), or the wall clock.
    fn now_ms(&self) -> i64 {
        match self {
            Source::Simulator(s) => s.now_ms(),
            Source::Kafka(_) => wall_ms(),
        }
    }

    fn position(&self) -> serde_json::Value {
        match self {
            Source::Simulator(s) => serde_json::json!(s.position()),
            Source::Kafka(k) => serde_json::json!(k.position()),
        }
    }

    /// A checkpoint is durable.
    fn checkpointed(&self, checkpoint: &Saved) {
        if let Source::Kafka(k) = self {
            match serde_json::from_value(checkpoint.source.clone()) {
                Ok(position) => k.checkpointed_at(&position),
                Err(e) => tracing::warn!(error = %e, "a checkpoint's source position is not a Kafka position"),
            }
        }
    }

    /// A bounded source has been read to its end.
    fn finished(&mut self) -> bool {
        match self {
            Source::Kafka(k) => k.finished(),
            Source::Simulator(_) => false,
        }
    }

    /// Backpressure and lag, once per turn of the loop.
    fn observe(&mut self, metrics: &Metrics) {
        match self {
            Source::Kafka(k) => observe_kafka(k, metrics),
            Source::Simulator(_) => metrics.set_ready("source", true),
        }
    }
}

async fn pipeline(
    mut source: Source,
    mut driver: Driver,
    mut admin: mpsc::Receiver<AdminCommand>,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) -> anyhow::Result<()> {
    while !*stopped.borrow() {
        metrics.pipeline_heartbeat_ms.set(wall_ms());
        tokio::task::block_in_place(|| source.observe(&metrics));
        let batch = tokio::task::block_in_place(|| source.poll(&mut driver.engine, MAX_BATCH))?;
        let now = source.now_ms();
        if batch.is_empty() {
            if source.finished() {
                tracing::info!("the bounded source has been read to its end; closing every window");
                tokio::task::block_in_place(|| driver.engine.finish());
                break;
            }
            tokio::task::block_in_place(|| driver.engine.tick(now));
            observe_watermarks(&metrics, &driver.engine, now);
            if let Some(saved) = driver.after_batch(|| source.position()).await? {
                source.checkpointed(&saved);
            }
            // The Kafka consumer has waited for data already.
            let pause = if matches!(source, Source::Kafka(_)) { Duration::ZERO } else { IDLE_POLL };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stopped.changed() => {}
                Some(command) = admin.recv() => handle_admin(command, &mut driver, &source).await,
            }
            continue;
        }
        let before = driver.engine.stats().clone();
        let records = batch.iter().map(|(partition, seq, bytes)| Record { partition: *partition, seq: *seq, bytes });
        // The engine runs off the runtime's workers (block_in_place), here and below: a batch
        // takes a while, and a first-entry store that retries until Redis answers can hold it
        // for long. A worker held that long can leave the runtime's I/O unpolled, and with it
        // the API, the signals that stop the service, and the stop timeout.
        tokio::task::block_in_place(|| {
            driver.engine.process(source.name(), records, Clocks { future_now: Some(now), processing_now: now })
        });
        metrics.observe_ingest(&before, driver.engine.stats());
        observe_watermarks(&metrics, &driver.engine, now);
        if let Some(saved) = driver.after_batch(|| source.position()).await? {
            source.checkpointed(&saved);
        }
        while let Ok(command) = admin.try_recv() {
            handle_admin(command, &mut driver, &source).await;
        }
    }
    if let Some(saved) = driver.checkpoint(source.position()).await? {
        source.checkpointed(&saved);
    }
    Ok(())
}

/// Pauses a Kafka input while the store writer's queue is full; reports its lag and whether
/// its broker answers.
pub(super) fn observe_kafka(k: &mut KafkaSource, metrics: &Metrics) {
    k.set_paused(metrics.sink_backlog.get() >= QUEUE_BATCHES as i64);
    if let Some(lag) = k.lag() {
        metrics.kafka_consumer_lag.set(lag.iter().map(|(_, n)| n).sum());
        for (p, n) in lag {
            metrics.kafka_partition_lag.with_label_values(&[&p.to_string()]).set(n);
        }
    }
    metrics.set_ready("source", k.connected());
}

/// How far the watermark, and each source partition's own, trails the source's clock.
pub(super) fn observe_watermarks(metrics: &Metrics, engine: &crate::core::Engine, now: i64) {
    metrics.watermark_lag_seconds.set(watermark_lag_s(now, engine.watermark()));
    observe_partition_watermarks(metrics, engine, now);
}

/// Each source partition's own watermark lag.
pub(super) fn observe_partition_watermarks(metrics: &Metrics, engine: &crate::core::Engine, now: i64) {
    for (partition, watermark) in engine.partition_watermarks() {
        if let Some(w) = watermark {
            let lag = watermark_lag_s(now, w);
            metrics.partition_watermark_lag_seconds.with_label_values(&[&partition.to_string()]).set(lag);
        }
    }
}

/// Seconds from `watermark` to `now` (none before the first watermark, `i64::MIN`).
fn watermark_lag_s(now: i64, watermark: i64) -> f64 {
    if watermark == i64::MIN {
        0.0
    } else {
        (now - watermark).max(0) as f64 / 1000.0
    }
}

async fn handle_admin(command: AdminCommand, driver: &mut Driver, source: &Source) {
    match command {
        AdminCommand::Savepoint { to, reply } => {
            let result = async {
                let checkpoint = driver.savepoint(source.position()).await?;
                write_savepoint(&checkpoint, &to)?;
                Ok::<u64, anyhow::Error>(checkpoint.id)
            }
            .await;
            let _ = reply.send(result.map_err(|e| format!("{e:#}")));
        }
    }
}

/// Deletes rows older than their table's retention, now and every `store.purge_interval`. A
/// failed purge is logged and tried again next time.
async fn purge(
    store: Store,
    config: crate::config::StoreConfig,
    mut stopped: watch::Receiver<bool>,
) -> (&'static str, anyhow::Result<()>) {
    loop {
        for (table, keep) in config.retention.tables() {
            match store.purge(table, wall_ms() - keep.as_millis()).await {
                Ok(0) => {}
                Ok(rows) => tracing::info!(table, rows, "purged rows past their retention"),
                Err(e) => tracing::warn!(table, error = %format!("{e:#}"), "purge failed; trying again later"),
            }
        }
        tokio::select! { _ = tokio::time::sleep(config.purge_interval.0) => {}, _ = stopped.wait_for(|s| *s) => return ("purge", Ok(())) }
    }
}

/// One line on the terminal, rewritten every second (a plain line every 10 s when not a TTY).
async fn progress(metrics: Arc<Metrics>, mut stopped: watch::Receiver<bool>) -> (&'static str, anyhow::Result<()>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut last = metrics.passes_received.get();
    loop {
        tokio::select! { _ = tokio::time::sleep(every) => {}, _ = stopped.wait_for(|s| *s) => return ("progress", Ok(())) }
        let received = metrics.passes_received.get();
        let line = format!(
            "passes {received} | {:.0}/s | valid {} | invalid {} | duplicates {} | late {} | watermark lag {:.0} s | checkpoints {}",
            (received - last) as f64 / every.as_secs_f64(),
            metrics.passes_valid.get(),
            metrics.passes_invalid_sum.get(),
            metrics.passes_duplicate.get(),
            metrics.late_passes.get(),
            metrics.watermark_lag_seconds.get(),
            metrics.checkpoints.get(),
        );
        last = received;
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}

/// Exports a savepoint of the service in `config`: through the running service's API when it
/// is up, else from the newest checkpoint in the state directory.
pub async fn create_savepoint(config: &Config, to: &std::path::Path) -> anyhow::Result<u64> {
    let to = std::path::absolute(to)?;
    match api::request_savepoint(&config.api.listen, &to).await {
        Ok(id) => Ok(id),
        Err(api::SavepointRequestError::Unreachable) => {
            let store = CheckpointStore::open(&config.state.dir)?;
            let latest = store.latest()?.ok_or_else(|| {
                anyhow::anyhow!(
                    "no service at {} and no checkpoint in {}",
                    config.api.listen,
                    config.state.dir.display()
                )
            })?;
            let city = Arc::new(City::load(&config.city.dir)?);
            let mut engine = build_engine(config, &city, true, Some(&store), &super::replay::load_watchlist(config)?)?;
            engine.restore(&latest.engine)?;
            let portable = crate::core::checkpoint::Checkpoint { engine: engine.export()?, ..latest };
            write_savepoint(&portable, &to)?;
            Ok(portable.id)
        }
        Err(api::SavepointRequestError::Failed(e)) => Err(anyhow::anyhow!("the service refused the savepoint: {e}")),
    }
}
