//! The pipelines, one file each, written against the operator contract of `crate::core`.
//!
//! - `flow_counts.rs`: passes per checkpoint, direction, region, city, boundary and bus lane,
//!   in 30 s / 1 min / 5 min windows.
//! - `origin_counts.rs`: distinct vehicles per region and 5 min window by plate origin.
//! - `top_n.rs`: the N busiest checkpoints in a 1 min window sliding every 5 s.
//! - `high_frequency.rs`: vehicles with at least N passes at one checkpoint in one local day.
//! - `checkpoint_speed.rs`: radar spot speeds per checkpoint in 1 min and 5 min windows.

mod checkpoint_speed;
mod flow_counts;
mod high_frequency;
mod origin_counts;
#[cfg(test)]
mod test_support;
mod top_n;

pub use checkpoint_speed::{batch_checkpoint_speed, CheckpointSpeed, SPEED_WINDOWS_S};
pub use flow_counts::{batch_flow_counts, FlowCounts, FLOW_WINDOWS_S};
pub use high_frequency::{batch_high_frequency, HighFrequency};
pub use origin_counts::{batch_origin_counts, plate_origin, OriginCounts, PlateOrigin, ORIGIN_WINDOW_S};
pub use top_n::{batch_top_n, TopN, CHECKPOINT_METRIC, TOP_N_SLIDE_S, TOP_N_WINDOW_S};

use crate::core::Operator;
use crate::reference::City;
use std::sync::Arc;

/// Every pipeline of the service, in the order they run.
pub fn all(city: &Arc<City>, settings: &PipelineSettings) -> Vec<Box<dyn Operator>> {
    vec![
        Box::new(FlowCounts::new(city)),
        Box::new(OriginCounts::new(city, &settings.local_prefixes)),
        Box::new(TopN::new(city, settings.top_n)),
        Box::new(HighFrequency::new(city, settings.time_zone, settings.high_frequency_passes)),
        Box::new(CheckpointSpeed::new(city)),
    ]
}

/// What the pipelines take from the configuration.
#[derive(Clone, Debug)]
pub struct PipelineSettings {
    /// The city's own plate prefixes.
    pub local_prefixes: Vec<String>,
    /// How many checkpoints Top-N ranks.
    pub top_n: usize,
    /// Passes at one checkpoint in one day that make a vehicle high-frequency.
    pub high_frequency_passes: u32,
    /// The city's time zone (local days).
    pub time_zone: chrono_tz::Tz,
}
