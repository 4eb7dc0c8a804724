//! `passflow run`: the service. The source and ingestion, the API and the progress line are
//! sibling tasks; when one stops, or on Ctrl-C / SIGTERM, everything stops and the reason is
//! reported.

use crate::api::{self, AppState};
use crate::config::{Config, SourceKind};
use crate::ingest::{DeadLetter, Deduplicator, Ingest, Outcome, Validator};
use crate::metrics::Metrics;
use crate::reference::City;
use crate::simulator::{LiveSimulator, SimParams};
use crate::store::Store;
use anyhow::Context;
use std::io::IsTerminal;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::watch;
use tokio::task::JoinSet;

/// Records taken from the source per step.
const MAX_BATCH: usize = 20_000;
const IDLE_POLL: Duration = Duration::from_millis(50);

/// A running service.
pub struct RunHandle {
    pub api_addr: SocketAddr,
    pub metrics: Arc<Metrics>,
    stop: watch::Sender<bool>,
    tasks: JoinSet<(&'static str, anyhow::Result<()>)>,
}

impl RunHandle {
    /// Asks every task to stop.
    pub fn stop(&self) {
        let _ = self.stop.send(true);
    }

    /// Runs until Ctrl-C, SIGTERM or the end of a task, then stops the rest.
    pub async fn wait(mut self) -> anyhow::Result<()> {
        let outcome = tokio::select! {
            _ = shutdown_signal() => { tracing::info!("shutdown requested"); Ok(()) }
            Some(done) = self.tasks.join_next() => match done {
                Ok((name, Ok(()))) => { tracing::info!(task = name, "task finished"); Ok(()) }
                Ok((name, Err(e))) => Err(e.context(format!("the {name} task failed"))),
                Err(e) => Err(anyhow::anyhow!("a task panicked: {e}")),
            },
        };
        self.stop();
        while tokio::time::timeout(Duration::from_secs(10), self.tasks.join_next()).await.ok().flatten().is_some() {}
        eprintln!();
        outcome
    }
}

async fn shutdown_signal() {
    #[cfg(unix)]
    {
        let mut term = tokio::signal::unix::signal(tokio::signal::unix::SignalKind::terminate())
            .expect("SIGTERM handler installs");
        tokio::select! {
            _ = tokio::signal::ctrl_c() => {}
            _ = term.recv() => {}
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}

/// Starts the service on `config` and returns once it is serving.
pub async fn run(config: Config) -> anyhow::Result<RunHandle> {
    let city =
        Arc::new(City::load(&config.city.dir).with_context(|| format!("loading city {}", config.city.dir.display()))?);
    let tz = config.city.tz()?;
    let store = Store::open(&config.store.url).await?;
    let metrics = Arc::new(Metrics::new());
    let listener = api::bind(&config.api.listen).await?;
    let api_addr = listener.local_addr()?;
    tracing::info!(%api_addr, store = store.kind(), city = %config.city.dir.display(), "passflow serving");
    let (stop, stopped) = watch::channel(false);
    let mut tasks = JoinSet::new();
    let state = AppState { metrics: metrics.clone() };
    let mut api_stop = stopped.clone();
    tasks.spawn(async move {
        let serve = api::serve(listener, state);
        tokio::select! { r = serve => ("api", r), _ = api_stop.wait_for(|s| *s) => ("api", Ok(())) }
    });
    let validator =
        Validator::new(city.clone(), tz, config.input.plate_color_scheme, config.core.max_clock_skew.as_millis());
    let ingest = Ingest::new(
        validator,
        Deduplicator::new(config.core.allowed_lateness.as_millis() + config.core.out_of_orderness.as_millis()),
    );
    let source = match config.source.kind {
        SourceKind::Simulator => {
            let s = &config.source.simulator;
            let params = SimParams {
                day: chrono::NaiveDate::default(),
                vehicles: s.vehicles,
                seed: s.seed,
                time_zone: tz,
                local_prefixes: config.city.local_prefixes.clone(),
            };
            let (speed, city) = (s.speed, city.clone());
            tokio::task::spawn_blocking(move || {
                LiveSimulator::start(city, params, speed, chrono::Utc::now().timestamp_millis())
            })
            .await?
        }
    };
    tasks.spawn(pipeline(source, ingest, store, metrics.clone(), stopped.clone()));
    tasks.spawn(progress(metrics.clone(), stopped));
    Ok(RunHandle { api_addr, metrics, stop, tasks })
}

async fn pipeline(
    mut source: LiveSimulator,
    mut ingest: Ingest,
    store: Store,
    metrics: Arc<Metrics>,
    mut stopped: watch::Receiver<bool>,
) -> (&'static str, anyhow::Result<()>) {
    let result = async {
        while !*stopped.borrow() {
            let batch = tokio::task::block_in_place(|| source.poll(MAX_BATCH));
            if batch.is_empty() {
                tokio::select! { _ = tokio::time::sleep(IDLE_POLL) => {}, _ = stopped.changed() => {} }
                continue;
            }
            let before = ingest.stats.clone();
            let now = source.now_ms();
            let mut dead = Vec::new();
            for (seq, line) in batch {
                if let Outcome::Rejected(reason) = ingest.accept(line.as_bytes(), Some(now)) {
                    dead.push(DeadLetter {
                        id: format!("sim:{seq}"),
                        reason,
                        record: line,
                        received_at: chrono::Utc::now().timestamp_millis(),
                    });
                }
            }
            metrics.observe_ingest(&before, &ingest.stats);
            store.write_dead_letters(&dead).await?;
        }
        Ok(())
    }
    .await;
    ("pipeline", result)
}

/// One line on the terminal, rewritten every second (a plain line every 10 s when not a TTY).
async fn progress(metrics: Arc<Metrics>, mut stopped: watch::Receiver<bool>) -> (&'static str, anyhow::Result<()>) {
    let tty = std::io::stderr().is_terminal();
    let every = if tty { Duration::from_secs(1) } else { Duration::from_secs(10) };
    let mut last = metrics.passes_received.get();
    loop {
        tokio::select! { _ = tokio::time::sleep(every) => {}, _ = stopped.wait_for(|s| *s) => return ("progress", Ok(())) }
        let received = metrics.passes_received.get();
        let invalid = metrics.passes_invalid_sum.get();
        let line = format!(
            "passes {received} | {:.0}/s | valid {} | invalid {invalid} | duplicates {}",
            (received - last) as f64 / every.as_secs_f64(),
            metrics.passes_valid.get(),
            metrics.passes_duplicate.get()
        );
        last = received;
        if tty {
            eprint!("\r\x1b[2K{line}");
        } else {
            eprintln!("{line}");
        }
    }
}
