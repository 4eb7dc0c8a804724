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

/// `all_pipelines`: every pipeline instead of flow counts alone.
pub fn bench_core(config: &Config, vehicles: u32, repeat: u32, all_pipelines: bool) -> anyhow::Result<CoreBenchResult> {
    let tz = config.city.tz()?;
    let city = Arc::new(sample_city());
    let params = SimParams {
        day: chrono::NaiveDate::from_ymd_opt(2026, 3, 2).expect("valid date"),
        vehicles,
        seed: 1,
        time_zone: tz,
        local_prefixes: config.city.local_prefixes.clone(),
    };
    let day = simulate_day(&city, &params);
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
    let mut engine = build_engine(config, &city, false, None, &crate::pipelines::WatchList::in_memory())?;
    if !all_pipelines {
        engine.keep_operators(&["flow_counts"]);
    }
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
