//! `passflow replay`: a pass file through the same ingestion as the live service, with dead
//! letters written to the store and a summary at the end.

use crate::config::Config;
use crate::ingest::{DeadLetter, Deduplicator, Ingest, IngestStats, Outcome, Validator};
use crate::reference::City;
use crate::store::Store;
use anyhow::Context;
use std::fmt;
use std::io::{BufRead, BufReader, Read};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// Lines handed from the reader thread to ingestion at a time.
const LINES_PER_BATCH: usize = 4_096;
/// Batches in flight between the reader and ingestion (backpressure beyond that).
const BATCHES_IN_FLIGHT: usize = 8;
/// Dead letters written to the store at a time.
const DEAD_LETTERS_PER_WRITE: usize = 5_000;

pub enum ReplayInput {
    File(PathBuf),
    Stdin,
}

pub struct ReplayOptions {
    pub config: Config,
    pub input: ReplayInput,
    pub store_url: String,
    /// The clock for `future_timestamp`; `None` checks nothing.
    pub now_ms: Option<i64>,
}

#[derive(Debug)]
pub struct ReplaySummary {
    pub stats: IngestStats,
    pub elapsed: Duration,
}

impl ReplaySummary {
    pub fn passes_per_second(&self) -> f64 {
        self.stats.records as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "records            {:>12}", s.records)?;
        writeln!(f, "valid              {:>12}", s.valid)?;
        writeln!(f, "  unreadable plate {:>12}", s.unreadable_plates)?;
        writeln!(f, "duplicates         {:>12}", s.duplicates)?;
        writeln!(f, "dead letters       {:>12}", s.invalid())?;
        for (reason, n) in &s.dead_letters {
            writeln!(f, "  {reason:<16} {n:>12}")?;
        }
        writeln!(f, "elapsed            {:>12.3} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "passes/s           {:>12.0}", self.passes_per_second())
    }
}

/// A run of lines read from the input: `first_line` is the 1-based number of the first.
struct LineBatch {
    first_line: u64,
    lines: Vec<Vec<u8>>,
}

pub async fn replay(options: ReplayOptions) -> anyhow::Result<ReplaySummary> {
    let config = &options.config;
    let city =
        Arc::new(City::load(&config.city.dir).with_context(|| format!("loading city {}", config.city.dir.display()))?);
    let tz = config.city.tz()?;
    let store = Store::open(&options.store_url).await?;
    let validator = Validator::new(city, tz, config.input.plate_color_scheme, config.core.max_clock_skew.as_millis());
    let horizon = config.core.allowed_lateness.as_millis() + config.core.out_of_orderness.as_millis();
    let mut ingest = Ingest::new(validator, Deduplicator::new(horizon));
    let (source_name, reader) = open_input(&options.input)?;
    let (tx, mut rx) = mpsc::channel::<LineBatch>(BATCHES_IN_FLIGHT);
    let reader_thread = std::thread::spawn(move || read_lines(reader, tx));
    let started = Instant::now();
    let mut dead = Vec::new();
    while let Some(batch) = rx.recv().await {
        for (i, line) in batch.lines.iter().enumerate() {
            if let Outcome::Rejected(reason) = ingest.accept(line, options.now_ms) {
                let id = format!("{source_name}:{}", batch.first_line + i as u64);
                dead.push(DeadLetter {
                    id,
                    reason,
                    record: String::from_utf8_lossy(line).into_owned(),
                    received_at: chrono::Utc::now().timestamp_millis(),
                });
            }
        }
        if dead.len() >= DEAD_LETTERS_PER_WRITE {
            store.write_dead_letters(&std::mem::take(&mut dead)).await?;
        }
    }
    store.write_dead_letters(&dead).await?;
    reader_thread.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    Ok(ReplaySummary { stats: ingest.stats, elapsed: started.elapsed() })
}

fn open_input(input: &ReplayInput) -> anyhow::Result<(String, Box<dyn Read + Send>)> {
    match input {
        ReplayInput::Stdin => Ok(("stdin".into(), Box::new(std::io::stdin()))),
        ReplayInput::File(path) => {
            let file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            let name =
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
            Ok((name, Box::new(file)))
        }
    }
}

/// Reads non-empty lines in batches until the input ends or ingestion stops listening.
fn read_lines(reader: Box<dyn Read + Send>, tx: mpsc::Sender<LineBatch>) -> anyhow::Result<()> {
    let mut reader = BufReader::with_capacity(1 << 20, reader);
    let mut line_no = 0u64;
    let mut batch = LineBatch { first_line: 1, lines: Vec::with_capacity(LINES_PER_BATCH) };
    loop {
        let mut line = Vec::with_capacity(256);
        let n = reader.read_until(b'\n', &mut line).context("reading the input")?;
        if n == 0 {
            break;
        }
        line_no += 1;
        while line.last().is_some_and(|b| *b == b'\n' || *b == b'\r') {
            line.pop();
        }
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        if batch.lines.is_empty() {
            batch.first_line = line_no;
        }
        // Lines of a batch are consecutive non-empty lines; a blank line starts a new batch so
        // that line numbers stay exact.
        if !batch.lines.is_empty() && batch.first_line + batch.lines.len() as u64 != line_no {
            let full = std::mem::replace(
                &mut batch,
                LineBatch { first_line: line_no, lines: Vec::with_capacity(LINES_PER_BATCH) },
            );
            if tx.blocking_send(full).is_err() {
                return Ok(());
            }
        }
        batch.lines.push(line);
        if batch.lines.len() == LINES_PER_BATCH {
            let full = std::mem::replace(
                &mut batch,
                LineBatch { first_line: line_no + 1, lines: Vec::with_capacity(LINES_PER_BATCH) },
            );
            if tx.blocking_send(full).is_err() {
                return Ok(());
            }
        }
    }
    if !batch.lines.is_empty() {
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}
