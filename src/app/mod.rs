//! The commands of the `passflow` binary and their command line.

mod backfill;
mod bench;
mod cluster;
mod replay;
mod run;
mod simulate;

pub use backfill::{backfill, BackfillOptions, BackfillSummary};
pub use bench::{
    bench_core, bench_kafka, bench_store, peak_rss_mb, CoreBenchResult, KafkaBenchResult, StoreBenchResult,
};
pub use replay::{build_engine, replay, ReplayInput, ReplayOptions, ReplaySummary};
pub use run::{create_savepoint, run, RunHandle};
pub use simulate::simulate;

use crate::config::Config;
use crate::model::parse_event_time;
use anyhow::Context;
use clap::{Parser, Subcommand};
use std::path::PathBuf;

#[derive(Debug, Parser)]
#[command(name = "passflow", version, about = "Event-time streaming for road-traffic checkpoint (ANPR) data")]
pub struct Cli {
    /// TOML configuration file (defaults → this file → PASSFLOW__SECTION__KEY variables).
    #[arg(long, global = true)]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run the service: source → pipelines → stores, with the API on `api.listen`. It resumes
    /// from the newest checkpoint in `state.dir`.
    Run {
        /// Start from this savepoint instead (it becomes the newest checkpoint).
        #[arg(long)]
        from_savepoint: Option<PathBuf>,
    },
    /// Print throughput figures.
    Bench {
        #[command(subcommand)]
        command: BenchCommand,
    },
    /// Savepoints: consistent state exported to a directory, to restore after an upgrade.
    Savepoint {
        #[command(subcommand)]
        command: SavepointCommand,
    },
    /// Write a simulated city folder, a day of passes (passes.jsonl) and its labels (labels.json).
    Simulate {
        #[arg(long)]
        out: PathBuf,
        #[arg(long, default_value_t = 20_000)]
        vehicles: u32,
        /// Local day to simulate, YYYY-MM-DD.
        #[arg(long, default_value = "2026-03-02")]
        day: chrono::NaiveDate,
        #[arg(long, default_value_t = 1)]
        seed: u64,
    },
    /// Recompute one local day from the pass archive (plus the late passes the store holds)
    /// and replace that day's rows in the store.
    Backfill {
        /// Local day, YYYY-MM-DD.
        #[arg(long)]
        day: chrono::NaiveDate,
        /// sqlite://PATH or mysql://URL (default: store.url of the configuration).
        #[arg(long)]
        store: Option<String>,
        /// The archive (default: archive.dir of the configuration).
        #[arg(long)]
        archive: Option<PathBuf>,
        /// City folder (default: city.dir of the configuration).
        #[arg(long)]
        city: Option<PathBuf>,
    },
    /// Replay a JSON-lines pass file through decoding, validation, deduplication and the
    /// pipelines into the store, and print the passes/s.
    Replay {
        /// City folder (default: city.dir of the configuration).
        #[arg(long)]
        city: Option<PathBuf>,
        /// Pass file, or `-` for standard input.
        #[arg(long)]
        input: String,
        /// sqlite://PATH, mysql://URL or null:// (default: store.url of the configuration).
        #[arg(long)]
        store: Option<String>,
        /// Judge `future_timestamp` against this time (epoch ms, RFC 3339 or local time).
        #[arg(long)]
        now: Option<String>,
        /// Checkpoint into this directory as the replay goes, and resume from it when started
        /// again.
        #[arg(long)]
        checkpoint_dir: Option<PathBuf>,
        /// Run only these pipelines (comma-separated; default: pipelines.enabled of the
        /// configuration).
        #[arg(long, value_delimiter = ',')]
        pipelines: Option<Vec<String>>,
    },
}

#[derive(Debug, Subcommand)]
pub enum BenchCommand {
    /// The streaming core with flow counts on a pre-decoded simulated stream (one core).
    Core {
        #[arg(long, default_value_t = 20_000)]
        vehicles: u32,
        /// Copies of the day, each a day later.
        #[arg(long, default_value_t = 5)]
        repeat: u32,
        /// Run every pipeline, not only flow counts.
        #[arg(long)]
        all_pipelines: bool,
    },
    /// The result store alone: a simulated day's results (every pipeline), computed first, then
    /// written through the store writer; prints rows/s.
    Store {
        /// sqlite://PATH, mysql://URL or null://.
        #[arg(long)]
        store: String,
        #[arg(long, default_value_t = 20_000)]
        vehicles: u32,
    },
    /// The service end to end through Kafka: a simulated day produced to a new topic, then read
    /// as a bounded run with every pipeline (store from the configuration, e.g. null://).
    Kafka {
        /// bootstrap.servers of a running broker.
        #[arg(long)]
        brokers: String,
        #[arg(long, default_value_t = 20_000)]
        vehicles: u32,
        #[arg(long, default_value_t = 4)]
        partitions: i32,
        /// Also write every output to the Kafka topics.
        #[arg(long)]
        outputs: bool,
        /// Instances sharing the input in one consumer group (scale-out), in this process.
        #[arg(long, default_value_t = 1)]
        instances: usize,
    },
}

#[derive(Debug, Subcommand)]
pub enum SavepointCommand {
    /// Take a savepoint of the running service (or, when it is down, export its newest checkpoint).
    Create {
        #[arg(long)]
        to: PathBuf,
    },
}

pub fn init_tracing() {
    let filter = tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    tracing_subscriber::fmt().with_env_filter(filter).with_writer(std::io::stderr).init();
}

pub async fn dispatch(cli: Cli) -> anyhow::Result<()> {
    let mut config = Config::load(cli.config.as_deref())?;
    match cli.command {
        Command::Run { from_savepoint } => run(config, from_savepoint).await?.wait().await,
        Command::Bench { command: BenchCommand::Core { vehicles, repeat, all_pipelines } } => {
            let r = bench_core(&config, vehicles, repeat, all_pipelines)?;
            println!(
                "core + {}, state {:?}: {} passes in {:.3} s = {:.0} passes/s on one core; {} result rows; peak RSS {:.0} MiB",
                if all_pipelines { "every pipeline" } else { "flow_counts" },
                config.state.backend,
                r.passes,
                r.seconds,
                r.passes as f64 / r.seconds,
                r.rows,
                r.peak_rss_mb
            );
            Ok(())
        }
        Command::Bench { command: BenchCommand::Store { store, vehicles } } => {
            let r = bench_store(&config, &store, vehicles).await?;
            println!(
                "store {store}: the results of {} passes ({} batches) written as {} rows in {:.3} s = {:.0} rows/s",
                r.passes,
                r.batches,
                r.rows,
                r.seconds,
                r.rows as f64 / r.seconds
            );
            Ok(())
        }
        Command::Bench { command: BenchCommand::Kafka { brokers, vehicles, partitions, outputs, instances } } => {
            let store = config.store.url.clone();
            let r = bench_kafka(config, &brokers, vehicles, partitions, outputs, instances).await?;
            println!(
                "kafka: {} records produced in {:.3} s; group joined in {:.1} s; read end to end (every pipeline, \
                 {partitions} partitions, {instances} instance(s), store {store}, outputs to Kafka: {outputs}) \
                 in {:.3} s = {:.0} passes/s",
                r.records,
                r.produce_seconds,
                r.join_seconds,
                r.seconds,
                r.records as f64 / r.seconds
            );
            Ok(())
        }
        Command::Savepoint { command: SavepointCommand::Create { to } } => {
            let id = create_savepoint(&config, &to).await?;
            println!("savepoint of checkpoint {id} written to {}", to.display());
            Ok(())
        }
        Command::Simulate { out, vehicles, day, seed } => {
            let labels = simulate(&config, &out, vehicles, day, seed)?;
            println!(
                "wrote {} ({} records, {} vehicles, {} valid passes)",
                out.display(),
                labels.records,
                labels.vehicles,
                labels.valid_passes
            );
            Ok(())
        }
        Command::Backfill { day, store, archive, city } => {
            if let Some(city) = city {
                config.city.dir = city;
            }
            let store_url = store.unwrap_or_else(|| config.store.url.clone());
            let archive_dir = archive.unwrap_or_else(|| config.archive.dir.clone());
            let s = backfill(BackfillOptions { config, day, store_url, archive_dir }).await?;
            println!(
                "backfilled {day}: {} archived and {} late passes, {} rows written",
                s.archived_passes, s.late_passes, s.rows_written
            );
            Ok(())
        }
        Command::Replay { city, input, store, now, checkpoint_dir, pipelines } => {
            if let Some(city) = city {
                config.city.dir = city;
            }
            if let Some(pipelines) = pipelines {
                crate::pipelines::check_names(&pipelines).context("--pipelines")?;
                config.pipelines.enabled = pipelines;
            }
            let tz = config.city.tz()?;
            let now_ms = now
                .map(|t| parse_event_time(&t, tz).map(|t| t.ms()).map_err(|r| anyhow::anyhow!("--now `{t}`: {r}")))
                .transpose()?;
            let input = if input == "-" { ReplayInput::Stdin } else { ReplayInput::File(input.into()) };
            let store = store.unwrap_or_else(|| config.store.url.clone());
            let summary = replay(ReplayOptions { config, input, store_url: store, now_ms, checkpoint_dir }).await?;
            print!("{summary}");
            Ok(())
        }
    }
}
