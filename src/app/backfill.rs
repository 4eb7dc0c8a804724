//! `passflow backfill --day D`: recomputes one local day from the pass archive plus the late
//! passes the store holds for it, with the same engine and pipelines as the live path, and
//! replaces that day's rows — the correction for data later than any lateness.
//!
//! Passes of the two hours around the day are read too, so that windows, traversals and
//! baselines at its edges have their context; only rows of the day itself are written: every
//! windowed or daily row of the day is deleted and the recomputed rows written, in one
//! transaction. Alerts are upserted (never deleted); first entries are left alone (they always
//! took late passes).

use super::replay::build_engine;
use crate::config::{Config, StateBackendKind};
use crate::core::{Clocks, Record};
use crate::model::{decode_record, PlateColorScheme};
use crate::pipelines::{read_archive_day, WatchList};
use crate::reference::City;
use crate::results::ResultBatch;
use crate::store::Store;
use anyhow::Context;
use chrono::NaiveDate;
use std::path::PathBuf;
use std::sync::Arc;

/// Context read on each side of the day.
const MARGIN_MS: i64 = 2 * 3_600_000;

pub struct BackfillOptions {
    pub config: Config,
    pub day: NaiveDate,
    pub store_url: String,
    pub archive_dir: PathBuf,
}

#[derive(Debug)]
pub struct BackfillSummary {
    pub archived_passes: usize,
    pub late_passes: usize,
    pub rows_written: usize,
}

pub async fn backfill(options: BackfillOptions) -> anyhow::Result<BackfillSummary> {
    let mut config = options.config.clone();
    let tz = config.city.tz()?;
    let city =
        Arc::new(City::load(&config.city.dir).with_context(|| format!("loading city {}", config.city.dir.display()))?);
    let (start, end) = crate::core::window::LocalDays::new(tz).bounds(options.day);
    let (from, to) = (start - MARGIN_MS, end + MARGIN_MS);
    let store = Store::open(&options.store_url).await?;

    // The archive holds canonical lines (police colour codes); late records are in the
    // source's own form: both become canonical here.
    let source_scheme = config.input.plate_color_scheme;
    let mut lines: Vec<(i64, String)> = Vec::new();
    let days = [options.day.pred_opt(), Some(options.day), options.day.succ_opt()];
    for day in days.into_iter().flatten() {
        for line in read_archive_day(&options.archive_dir, day)? {
            if let Ok(r) = decode_record(line.as_bytes(), tz, PlateColorScheme::Police) {
                lines.push((r.ts.ms(), line));
            }
        }
    }
    let archived_passes = lines.len();
    let mut late_passes = 0;
    for (_, record) in store.late_records(from, to).await? {
        if let Ok(r) = decode_record(record.as_bytes(), tz, source_scheme) {
            lines.push((r.ts.ms(), r.to_canonical_json()));
            late_passes += 1;
        }
    }
    lines.retain(|(ts, _)| (from..to).contains(ts));
    lines.sort();

    config.input.plate_color_scheme = PlateColorScheme::Police;
    config.state.backend = StateBackendKind::Memory;
    config.pipelines.first_entry.store = "embedded".into();
    // The day's rows of every table are replaced: every pipeline recomputes its own.
    config.pipelines.enabled = crate::pipelines::every_name();
    let mut engine = build_engine(&config, &city, false, None, &WatchList::in_memory())?;
    engine.assign(0, 0);
    let clocks = Clocks { future_now: None, processing_now: chrono::Utc::now().timestamp_millis() };
    for (n, chunk) in lines.chunks(4096).enumerate() {
        let records = chunk.iter().enumerate().map(|(i, (_, line))| Record {
            partition: 0,
            seq: (n * 4096 + i) as u64,
            bytes: line.as_bytes(),
        });
        engine.process("backfill", records, clocks);
    }
    engine.finish();
    let mut batch = engine.take_output();
    crate::core::sink::coalesce_batch(&mut batch);
    keep_day(&mut batch, &options.day.to_string(), start, end);
    let rows_written = batch.len();
    store.replace_day(&options.day.to_string(), start, end, batch).await?;
    Ok(BackfillSummary { archived_passes, late_passes, rows_written })
}

/// Keeps only the rows of the day [start, end) (`day` as a local date).
fn keep_day(b: &mut ResultBatch, day: &str, start: i64, end: i64) {
    let within = |t: i64| (start..end).contains(&t);
    b.flow_counts.retain(|r| within(r.window_start));
    b.origin_counts.retain(|r| within(r.window_start));
    b.checkpoint_speed.retain(|r| within(r.window_start));
    b.segment_congestion.retain(|r| within(r.window_start) && !r.is_retraction());
    b.area_congestion.retain(|r| within(r.window_start) && !r.is_retraction());
    b.top_n.retain(|w| w.window_end > start && w.window_end <= end && !w.entries.is_empty());
    b.high_frequency.retain(|r| r.day == day);
    b.trajectories.retain(|r| &*r.day == day);
    b.restriction_violations.retain(|r| r.day == day);
    b.restriction_summary.retain(|r| r.day == day);
    b.alerts.retain(|a| within(a.ts));
    b.first_entry.clear();
    b.late_passes.clear();
    b.dead_letters.clear();
}
