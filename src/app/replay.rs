//! `passflow replay`: a pass file through the same engine as the live service, in event time,
//! with every window flushed at the end of input and the results in the store. With a
//! checkpoint directory it checkpoints as it goes and, started again, resumes where the last
//! checkpoint was taken.

use crate::config::{Config, SourceKind, StateBackendKind};
use crate::core::checkpoint::CheckpointStore;
use crate::core::driver::{Checkpointing, Driver};
use crate::core::sink::spawn_writer;
use crate::core::{Clocks, Engine, EngineSettings, Record};
use crate::ingest::{Deduplicator, Ingest, IngestStats, Judged, RocksDedup, Validator};
use crate::metrics::Metrics;
use crate::pipelines;
use crate::reference::City;
use crate::store::Store;
use anyhow::Context;
use std::fmt;
use std::io::{Read, Seek, SeekFrom};
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::sync::mpsc;

/// The longest window any pipeline keeps open: a local day, 25 h when the clocks go back.
const LONGEST_WINDOW_MS: i64 = 25 * 3_600_000;
/// Batches in flight between the reader and the engine (backpressure beyond that; one of the
/// default `core.replay_batch` lines holds some 30 MB).
const BATCHES_IN_FLIGHT: usize = 2;

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
    /// Checkpoint here and resume from here (files only).
    pub checkpoint_dir: Option<PathBuf>,
}

#[derive(Debug)]
pub struct ReplaySummary {
    pub stats: IngestStats,
    pub elapsed: Duration,
    /// Records read in this run (after a resume, only those after the checkpoint).
    pub records_this_run: u64,
    /// Result rows written to the store in this run (after coalescing per key).
    pub rows_written: u64,
}

impl ReplaySummary {
    pub fn passes_per_second(&self) -> f64 {
        self.records_this_run as f64 / self.elapsed.as_secs_f64().max(1e-9)
    }
}

impl fmt::Display for ReplaySummary {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        let s = &self.stats;
        writeln!(f, "records            {:>12}", s.records)?;
        writeln!(f, "valid              {:>12}", s.valid)?;
        writeln!(f, "  unreadable plate {:>12}", s.unreadable_plates)?;
        writeln!(f, "  late             {:>12}", s.late)?;
        writeln!(f, "duplicates         {:>12}", s.duplicates)?;
        writeln!(f, "dead letters       {:>12}", s.invalid())?;
        for (reason, n) in &s.dead_letters {
            writeln!(f, "  {reason:<16} {n:>12}")?;
        }
        writeln!(f, "elapsed            {:>12.3} s", self.elapsed.as_secs_f64())?;
        writeln!(f, "passes/s           {:>12.0}", self.passes_per_second())?;
        writeln!(f, "rows written       {:>12}", self.rows_written)?;
        writeln!(f, "rows/s             {:>12.0}", self.rows_written as f64 / self.elapsed.as_secs_f64().max(1e-9))
    }
}

/// A run of consecutive lines: `first_line` is the 1-based number of the first; `end` the byte
/// offset just after the last. The engine hands a batch back once done with it, and the reader
/// fills it again (its buffers are tens of megabytes, which fresh pages would cost again).
#[derive(Default)]
struct LineBatch {
    first_line: u64,
    /// The input the lines were read from, line ends and blank lines included (and, while the
    /// reader fills it, input not yet split into lines).
    text: ReadBuf,
    /// Where each line is in `text`.
    lines: Vec<std::ops::Range<usize>>,
    /// Each line decoded and validated on the reader thread.
    judged: Vec<Judged>,
    end: u64,
    /// Number of the line that ends at `end` (blank lines count).
    end_line: u64,
}

impl LineBatch {
    /// Empty, its lines to start after line `line_no`, which ends at `offset`, with room for
    /// `lines` lines of `text` bytes in all (a buffer grown as it fills is copied each time it
    /// doubles, into fresh pages).
    fn reset(&mut self, line_no: u64, offset: u64, lines: usize, text: usize) {
        self.text.clear();
        self.lines.clear();
        self.judged.clear();
        self.text.reserve(text);
        self.lines.reserve(lines);
        self.judged.reserve(lines);
        (self.first_line, self.end, self.end_line) = (line_no + 1, offset, line_no);
    }
}

/// Where a replay is in its input: the checkpointed source position.
#[derive(Clone, Copy, Debug, Default, serde::Serialize, serde::Deserialize)]
struct FilePosition {
    offset: u64,
    line: u64,
}

/// Loads the configured watch list.
pub fn load_watchlist(config: &Config) -> anyhow::Result<Arc<pipelines::WatchList>> {
    let file = &config.pipelines.watchlist_file;
    pipelines::WatchList::load(file).with_context(|| format!("loading the watch list {}", file.display()))
}

/// Builds the engine with every pipeline for `config`. With the RocksDB state backend, state
/// lives in the checkpoint store's database, or in a scratch database when there is none.
pub fn build_engine(
    config: &Config,
    city: &Arc<City>,
    live: bool,
    store: Option<&CheckpointStore>,
    watchlist: &Arc<pipelines::WatchList>,
) -> anyhow::Result<Engine> {
    let core = &config.core;
    let validator = Validator::new(
        city.clone(),
        config.city.tz()?,
        config.input.plate_color_scheme,
        core.max_clock_skew.as_millis(),
    );
    // A resend must be recognised as long as any window holding the first copy can still take
    // it: the longest window is a local day (up to 25 h with a clock change).
    let horizon = core.allowed_lateness.as_millis() + core.out_of_orderness.as_millis() + LONGEST_WINDOW_MS;
    let ingest = match (config.state.backend, store) {
        (StateBackendKind::Memory, _) => Ingest::new(validator, Deduplicator::new(horizon)),
        (StateBackendKind::Rocksdb, Some(store)) => {
            Ingest::new(validator, RocksDedup::new(store.db(), store.dedup_cutoff(), horizon, None)?)
        }
        (StateBackendKind::Rocksdb, None) => Ingest::new(validator, RocksDedup::scratch(horizon)?),
    };
    let settings = EngineSettings {
        out_of_orderness_ms: core.out_of_orderness.as_millis(),
        idle_timeout_ms: core.idle_timeout.as_millis(),
        allowed_lateness_ms: core.allowed_lateness.as_millis(),
        // Historical data on a Kafka topic: event time alone moves the watermark.
        live: live && (config.source.kind != SourceKind::Kafka || config.kafka.input.wall_clock),
        threads: core.pipeline_threads(),
    };
    let pipeline_settings = pipelines::PipelineSettings {
        local_prefixes: config.city.local_prefixes.clone(),
        top_n: config.pipelines.top_n,
        high_frequency_passes: config.pipelines.high_frequency_passes,
        cloned_plates: config.pipelines.cloned_plates,
        surge: config.pipelines.traffic_surge,
        watchlist: watchlist.clone(),
        // The live service archives what it receives; a replay's input is its own archive.
        archive_dir: (live && !config.archive.dir.as_os_str().is_empty()).then(|| config.archive.dir.clone()),
        clean_passes: config.kafka.output.enabled,
        // Embedded with RocksDB state: a RocksDB of its own beside the checkpoints.
        first_entry_store: match (config.pipelines.first_entry.store.as_str(), store, config.state.backend) {
            ("embedded", Some(store), StateBackendKind::Rocksdb) => {
                format!("rocksdb:{}", store.dir().join("first_entry").display())
            }
            (other, _, _) => other.to_owned(),
        },
        first_entry_key_prefix: config.pipelines.first_entry.key_prefix.clone(),
        time_zone: config.city.tz()?,
        enabled: config.pipelines.enabled.clone(),
    };
    let pipelines = pipelines::all(city, &pipeline_settings)?;
    Ok(Engine::new(city.clone(), ingest, pipelines, settings))
}

/// How far behind the restored watermark (less the lateness) stored alerts are adopted: a
/// surge is dated by its run's first windows.
const ADOPT_SPAN_MS: i64 = 6 * 3_600_000;

/// After a restore from a checkpoint, hands the engine the alerts the store holds that may
/// have been raised after it (see `Operator::adopt_alerts`), so that one the replayed input
/// does not raise again is retracted rather than left active.
pub(super) async fn adopt_stored_alerts(engine: &mut Engine, store: &Store, lateness_ms: i64) -> anyhow::Result<()> {
    engine.adopt_alerts(&stored_alerts(store, engine.watermark(), lateness_ms).await?);
    Ok(())
}

/// The alerts stored since a state at `watermark` (restored) may have raised them: for it to
/// adopt, and judge again.
pub(super) async fn stored_alerts(
    store: &Store,
    watermark: i64,
    lateness_ms: i64,
) -> anyhow::Result<Vec<crate::results::AlertRow>> {
    let since = watermark.saturating_sub(lateness_ms).saturating_sub(ADOPT_SPAN_MS);
    let alerts = store.alerts_to_adopt(since).await.context("reading the alerts raised before the restart")?;
    if !alerts.is_empty() {
        tracing::info!(alerts = alerts.len(), "stored alerts adopted, to be judged again");
    }
    Ok(alerts)
}

pub async fn replay(options: ReplayOptions) -> anyhow::Result<ReplaySummary> {
    let config = &options.config;
    let city =
        Arc::new(City::load(&config.city.dir).with_context(|| format!("loading city {}", config.city.dir.display()))?);
    let store = Store::open(&options.store_url).await?;
    let metrics = Arc::new(Metrics::new());
    let (sink, writer) = spawn_writer(store, Default::default(), metrics.clone());
    let metrics_for_summary = metrics.clone();
    let checkpointing = match &options.checkpoint_dir {
        Some(dir) => {
            anyhow::ensure!(
                matches!(options.input, ReplayInput::File(_)),
                "--checkpoint-dir needs a file input (standard input cannot be resumed)"
            );
            Some(Checkpointing { store: CheckpointStore::open(dir)?, interval: config.core.checkpoint_interval.0 })
        }
        None => None,
    };
    let mut engine =
        build_engine(config, &city, false, checkpointing.as_ref().map(|c| &c.store), &load_watchlist(config)?)?;
    engine.assign(0, wall_ms());
    let (mut driver, resumed) = Driver::start(engine, sink, checkpointing, metrics)?;
    if resumed.is_some() {
        let store = Store::open(&options.store_url).await?;
        adopt_stored_alerts(&mut driver.engine, &store, config.core.allowed_lateness.as_millis()).await?;
    }
    let start: FilePosition = resumed
        .map(serde_json::from_value)
        .transpose()
        .context("the checkpoint's source position is not a file position")?
        .unwrap_or_default();
    let (source_name, reader) = open_input(&options.input, start.offset)?;
    let (tx, mut rx) = mpsc::channel::<LineBatch>(BATCHES_IN_FLIGHT);
    let (done_tx, done_rx) = std::sync::mpsc::channel::<LineBatch>();
    let (validator, now_ms) = (driver.engine.validator(), options.now_ms);
    let batch_lines = config.core.replay_batch.get();
    let reader_thread = std::thread::Builder::new()
        .name("passflow-reader".into())
        .spawn(move || read_lines(reader, start, batch_lines, validator, now_ms, tx, done_rx))
        .context("starting the input reader")?;
    let started = Instant::now();
    let mut position = start;
    let mut records_this_run = 0;
    while let Some(mut batch) = rx.recv().await {
        let LineBatch { first_line, text, lines, judged, .. } = &mut batch;
        let records = lines
            .iter()
            .enumerate()
            .map(|(i, line)| Record { partition: 0, seq: *first_line + i as u64, bytes: &text[line.clone()] })
            .collect();
        let clocks = Clocks { future_now: options.now_ms, processing_now: wall_ms() };
        driver.engine.process_judged(&source_name, records, judged, clocks);
        records_this_run += batch.lines.len() as u64;
        position = FilePosition { offset: batch.end, line: batch.end_line };
        // The reader may have ended: the batch is then dropped.
        let _ = done_tx.send(batch);
        driver.after_batch(|| serde_json::json!(position)).await?;
    }
    reader_thread.join().map_err(|_| anyhow::anyhow!("the input reader panicked"))??;
    driver.engine.finish();
    driver.flush().await?;
    driver.checkpoint(serde_json::json!(position)).await?;
    let stats = driver.engine.stats().clone();
    drop(driver);
    writer.await??;
    Ok(ReplaySummary {
        stats,
        elapsed: started.elapsed(),
        records_this_run,
        rows_written: metrics_for_summary.sink_rows.get(),
    })
}

fn wall_ms() -> i64 {
    chrono::Utc::now().timestamp_millis()
}

fn open_input(input: &ReplayInput, offset: u64) -> anyhow::Result<(String, Box<dyn Read + Send>)> {
    match input {
        ReplayInput::Stdin => Ok(("stdin".into(), Box::new(std::io::stdin()))),
        ReplayInput::File(path) => {
            let mut file = std::fs::File::open(path).with_context(|| format!("opening {}", path.display()))?;
            file.seek(SeekFrom::Start(offset)).with_context(|| format!("seeking {} to {offset}", path.display()))?;
            let name =
                path.file_name().map_or_else(|| path.display().to_string(), |n| n.to_string_lossy().into_owned());
            Ok((name, Box::new(file)))
        }
    }
}

/// Bytes read from the input at a time, at most.
const READ_CHUNK: usize = 1 << 20;

/// Bytes read from the input: the first `filled` of a buffer whose rest stays zeroed from its
/// first use, so that a read goes straight into it. (A `Vec` emptied and grown again would be
/// zeroed again before every read: a megabyte a read, 2% of a replay's instructions.)
#[derive(Default)]
struct ReadBuf {
    bytes: Vec<u8>,
    filled: usize,
}

impl std::ops::Deref for ReadBuf {
    type Target = [u8];

    fn deref(&self) -> &[u8] {
        &self.bytes[..self.filled]
    }
}

impl ReadBuf {
    fn clear(&mut self) {
        self.filled = 0;
    }

    /// Makes room for `more` bytes after those filled.
    fn reserve(&mut self, more: usize) {
        if self.bytes.len() < self.filled + more {
            self.bytes.resize(self.filled + more, 0);
        }
    }

    fn extend_from_slice(&mut self, more: &[u8]) {
        self.reserve(more.len());
        self.bytes[self.filled..self.filled + more.len()].copy_from_slice(more);
        self.filled += more.len();
    }

    /// Appends what one read of `reader` gives (up to [`READ_CHUNK`] bytes: a slow pipe's
    /// lines are not held back until a whole chunk has come); returns how many bytes, 0 at the
    /// end.
    fn read_more(&mut self, reader: &mut dyn Read) -> std::io::Result<usize> {
        self.reserve(READ_CHUNK);
        let room = &mut self.bytes[self.filled..self.filled + READ_CHUNK];
        let read = loop {
            match reader.read(room) {
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                read => break read?,
            }
        };
        self.filled += read;
        Ok(read)
    }
}

/// Reads non-empty lines in batches of consecutive lines, decoding and validating them here (so
/// that the engine's thread only deduplicates and runs the pipelines), until the input ends or
/// the engine stops listening. Batches the engine is `done` with are filled again.
fn read_lines(
    mut reader: Box<dyn Read + Send>,
    start: FilePosition,
    batch_lines: usize,
    validator: Validator,
    now_ms: Option<i64>,
    tx: mpsc::Sender<LineBatch>,
    done: std::sync::mpsc::Receiver<LineBatch>,
) -> anyhow::Result<()> {
    let (mut offset, mut line_no) = (start.offset, start.line);
    // Batches in circulation: those in flight, the engine's and the one being filled. Past
    // that many the reader waits for one back rather than make another: a new batch's buffers
    // are tens of megabytes of fresh pages for the kernel to fault in and zero.
    let mut made = 0;
    // The text a batch is given room for: the last full batch's and an eighth more (at first,
    // none: the first batch's text grows as it is read).
    let mut text_room = 0;
    let mut next = |line_no: u64, offset: u64, text_room: usize| {
        let batch = match done.try_recv() {
            Ok(batch) => Some(batch),
            Err(_) if made < BATCHES_IN_FLIGHT + 2 => {
                made += 1;
                Some(LineBatch::default())
            }
            // `None`: the engine has stopped.
            Err(_) => done.recv().ok(),
        };
        batch.map(|mut batch| {
            batch.reset(line_no, offset, batch_lines, text_room);
            batch
        })
    };
    let judge = |batch: &mut LineBatch| {
        let LineBatch { text, lines, judged, .. } = batch;
        validator.judge_all(lines.iter().map(|line| &text[line.clone()]), now_ms, judged);
    };
    let Some(mut batch) = next(line_no, offset, text_room) else { return Ok(()) };
    // The input is read straight into the batch's text, a chunk at a time, and split into lines
    // there; what follows the last line of a full batch starts the next one. `unread`: where
    // the bytes not yet split into lines start; `scanned`: how far they hold no line end.
    let (mut unread, mut scanned, mut ended) = (0, 0, false);
    let mut carry = Vec::new();
    loop {
        let line_end = loop {
            if let Some(i) = memchr::memchr(b'\n', &batch.text[scanned..]) {
                break Some(scanned + i + 1);
            }
            scanned = batch.text.len();
            if ended {
                // A last line without a line end.
                break (batch.text.len() > unread).then_some(batch.text.len());
            }
            ended = batch.text.read_more(&mut reader).context("reading the input")? == 0;
        };
        let Some(line_end) = line_end else { break };
        offset += (line_end - unread) as u64;
        line_no += 1;
        let mut end = line_end;
        while end > unread && matches!(batch.text[end - 1], b'\n' | b'\r') {
            end -= 1;
        }
        let blank = batch.text[unread..end].iter().all(u8::is_ascii_whitespace);
        if !blank {
            if batch.lines.is_empty() {
                batch.first_line = line_no;
            }
            batch.lines.push(unread..end);
        }
        (unread, scanned) = (line_end, line_end);
        batch.end = offset;
        batch.end_line = line_no;
        // A blank line ends a batch too, so that the lines of a batch are consecutive.
        if batch.lines.len() == batch_lines || (blank && !batch.lines.is_empty()) {
            let mut full = std::mem::take(&mut batch);
            text_room = text_room.max(full.text.len() + full.text.len() / 8 + READ_CHUNK);
            carry.clear();
            carry.extend_from_slice(&full.text[unread..]);
            judge(&mut full);
            if tx.blocking_send(full).is_err() {
                return Ok(());
            }
            let Some(empty) = next(line_no, offset, text_room) else { return Ok(()) };
            batch = empty;
            batch.text.extend_from_slice(&carry);
            (unread, scanned) = (0, 0);
        }
    }
    if !batch.lines.is_empty() {
        judge(&mut batch);
        let _ = tx.blocking_send(batch);
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every batch the reader makes of `input`: (first line, lines, end offset, end line).
    fn batches(input: &str, batch_lines: usize) -> Vec<(u64, Vec<String>, u64, u64)> {
        let city = Arc::new(crate::simulator::sample_city());
        let validator = Validator::new(city, chrono_tz::Asia::Shanghai, crate::model::PlateColorScheme::Police, 0);
        let (tx, mut rx) = mpsc::channel(BATCHES_IN_FLIGHT);
        let (done_tx, done_rx) = std::sync::mpsc::channel();
        let input: Box<dyn Read + Send> = Box::new(std::io::Cursor::new(input.as_bytes().to_vec()));
        let start = FilePosition::default();
        let reader = std::thread::spawn(move || read_lines(input, start, batch_lines, validator, None, tx, done_rx));
        let mut out = Vec::new();
        while let Some(batch) = rx.blocking_recv() {
            let text = |l: &std::ops::Range<usize>| String::from_utf8(batch.text[l.clone()].to_vec()).unwrap();
            assert_eq!(batch.judged.len(), batch.lines.len(), "every line judged");
            out.push((batch.first_line, batch.lines.iter().map(text).collect(), batch.end, batch.end_line));
            let _ = done_tx.send(batch);
        }
        reader.join().unwrap().unwrap();
        out
    }

    fn lines(l: &[&str]) -> Vec<String> {
        l.iter().map(|s| s.to_string()).collect()
    }

    #[test]
    fn lines_lose_their_ends_a_full_batch_passes_the_rest_on_and_the_last_line_needs_no_end() {
        assert_eq!(
            batches("a\r\nbb\n\n  \nccc\nd\ne", 2),
            vec![(1, lines(&["a", "bb"]), 6, 2), (5, lines(&["ccc", "d"]), 16, 6), (7, lines(&["e"]), 17, 7)]
        );
    }

    #[test]
    fn a_blank_line_ends_a_batch_so_that_its_lines_are_consecutive() {
        assert_eq!(batches("a\nb\n\nc\n", 10), vec![(1, lines(&["a", "b"]), 5, 3), (4, lines(&["c"]), 7, 4)]);
        assert_eq!(batches("\n\n", 10), vec![], "blank lines alone make no batch");
    }
}
