//! The pipelines, one file each, written against the operator contract of `crate::core`.
//!
//! - `flow_counts.rs`: passes per checkpoint, direction, region, city, boundary and bus lane,
//!   in 30 s / 1 min / 5 min windows.
//! - `origin_counts.rs`: distinct vehicles per region and 5 min window by plate origin.
//! - `top_n.rs`: the N busiest checkpoints in a 1 min window sliding every 5 s.
//! - `high_frequency.rs`: vehicles with at least N passes at one checkpoint in one local day.
//! - `congestion.rs`: segment traversals, congestion per segment, region and city, and the
//!   Top-N segments.
//! - `cloned_plates.rs`: cloned-plate alerts, pairs of passes too far apart for their time.
//! - `trajectories.rs`: each vehicle's passes of a local day in time order.
//! - `restrictions.rs`: last-digit restriction violations and their daily summaries.
//! - `first_entry.rs`: each vehicle's earliest inbound pass at a boundary checkpoint.
//! - `traffic_surge.rs`: traffic-surge alerts on 5 min checkpoint flows.
//! - `watchlist.rs`: an alert for every pass of a watched plate.
//! - `device_health.rs`: silent checkpoints, skewed camera clocks, unreadable-plate rates.
//! - `archive.rs`: every valid pass in canonical form to a daily compressed archive, and to the
//!   clean-pass output.
//! - `checkpoint_speed.rs`: radar spot speeds per checkpoint in 1 min and 5 min windows.

mod archive;
mod checkpoint_speed;
mod cloned_plates;
mod congestion;
mod device_health;
mod first_entry;
mod flow_counts;
mod high_frequency;
mod origin_counts;
mod restrictions;
#[cfg(test)]
pub(crate) mod test_support;
mod top_n;
mod traffic_surge;
mod trajectories;
mod watchlist;

pub use archive::{read_archive_day, Archive, CleanPasses};
pub use checkpoint_speed::{batch_checkpoint_speed, mean_kmh, CheckpointSpeed, SPEED_WINDOWS_S};
pub use cloned_plates::{batch_cloned_plates, pair_id, ClonedPlateRule, ClonedPlates, CLONED_PLATE};
pub use congestion::{
    batch_congestion, batch_sudden_congestion, congestion_level, sudden_id, AreaTable, Congestion, CongestionEnv,
    CongestionPartial, CongestionWindows, SegmentSums, SegmentTable, SEGMENT_METRIC, SUDDEN_CONGESTION,
};
pub use device_health::{ClockSkews, DeviceHealth, CLOCK_SKEW, DEVICE_SILENT, UNREADABLE_PLATES};
pub use first_entry::{
    batch_first_entry, Candidate, EmbeddedFirstEntries, FirstEntry, FirstEntryStore, RedisFirstEntries,
    RocksFirstEntries,
};
pub use flow_counts::{batch_flow_counts, FlowCounts, FLOW_WINDOWS_S};
pub use high_frequency::{batch_high_frequency, HighFrequency};
pub use origin_counts::{batch_origin_counts, plate_origin, OriginCounts, PlateOrigin, ORIGIN_WINDOW_S};
pub use restrictions::{batch_restrictions, Restrictions};
pub use top_n::{
    batch_top_n, RankedKeys, SlidingRanking, TopN, TopNBuckets, CHECKPOINT_METRIC, TOP_N_SLIDE_S, TOP_N_WINDOW_S,
};
pub use traffic_surge::{batch_traffic_surge, surge_id, SurgeRule, TrafficSurge, TRAFFIC_SURGE};
pub use trajectories::{batch_trajectories, Trajectories};
pub use watchlist::{Watch, WatchEntry, WatchList, WATCHLIST};

use crate::core::Operator;
use crate::reference::City;
use std::sync::Arc;

/// The pipelines whose state is per vehicle: scale-out runs them beside each input partition
/// (keyed by vehicle).
pub const PER_VEHICLE: [&str; 3] = ["high_frequency", "trajectories", "first_entry"];

/// The pipelines whose results add up over input partitions (a vehicle's passes are all in
/// one): scale-out runs them beside each input partition too and merges their partial results
/// per key (see `crate::kafka::Merge`): Top-N runs there as [`TopNBuckets`], congestion as
/// [`CongestionPartial`] (traversals are per vehicle; areas, Top-N segments and sudden
/// congestion are the merge's). Every other pipeline runs in the aggregate stage.
pub const PARTIAL: [&str; 5] = ["flow_counts", "origin_counts", "checkpoint_speed", "top_n", "segment_congestion"];

/// The operators the partition stage runs in place of their one-instance forms.
pub fn partial_forms(city: &Arc<City>) -> Vec<Box<dyn Operator>> {
    vec![Box::new(TopNBuckets::new(city)), Box::new(CongestionPartial::new(city))]
}

/// Every analytic pipeline of the service, in the order they run: what `pipelines.enabled`
/// names. (The archive and the clean-pass output are turned on by their own settings.)
pub const NAMES: [&str; 13] = [
    "flow_counts",
    "origin_counts",
    "top_n",
    "high_frequency",
    "checkpoint_speed",
    "segment_congestion",
    "cloned_plate",
    "trajectories",
    "restrictions",
    "first_entry",
    "traffic_surge",
    "watchlist",
    "device_health",
];

/// [`NAMES`] as `pipelines.enabled` holds them: every pipeline enabled.
pub fn every_name() -> Vec<String> {
    NAMES.map(String::from).to_vec()
}

/// Checks a list of pipeline names: each one known, none twice.
pub fn check_names(names: &[String]) -> anyhow::Result<()> {
    for (i, name) in names.iter().enumerate() {
        anyhow::ensure!(
            NAMES.contains(&name.as_str()),
            "unknown pipeline `{name}` (the pipelines are: {})",
            NAMES.join(", ")
        );
        anyhow::ensure!(!names[..i].contains(name), "pipeline `{name}` is named twice");
    }
    Ok(())
}

/// The enabled pipelines of the service, in the order they run.
pub fn all(city: &Arc<City>, settings: &PipelineSettings) -> anyhow::Result<Vec<Box<dyn Operator>>> {
    let skews: Arc<ClockSkews> = Default::default();
    let mut all: Vec<Box<dyn Operator>> = Vec::new();
    for name in NAMES.into_iter().filter(|n| settings.enabled.iter().any(|e| e == n)) {
        all.push(match name {
            "flow_counts" => Box::new(FlowCounts::new(city)),
            "origin_counts" => Box::new(OriginCounts::new(city, &settings.local_prefixes)),
            "top_n" => Box::new(TopN::new(city, settings.top_n)),
            "high_frequency" => Box::new(HighFrequency::new(city, settings.time_zone, settings.high_frequency_passes)),
            "checkpoint_speed" => Box::new(CheckpointSpeed::new(city)),
            "segment_congestion" => Box::new(Congestion::new(city, settings.top_n)),
            "cloned_plate" => Box::new(ClonedPlates::new(city, settings.cloned_plates, skews.clone())),
            "trajectories" => Box::new(Trajectories::new(city, settings.time_zone)),
            "restrictions" => Box::new(Restrictions::new(city, settings.time_zone, &settings.local_prefixes)),
            // The first-entry store (Redis, say) is opened only when the pipeline runs.
            "first_entry" => Box::new(FirstEntry::new(city, first_entry_store(settings)?)),
            "traffic_surge" => Box::new(TrafficSurge::new(city, settings.surge)),
            "watchlist" => Box::new(Watch::new(city, settings.watchlist.clone())),
            "device_health" => Box::new(DeviceHealth::new(city, skews.clone())),
            other => unreachable!("`{other}` is listed in NAMES and built above"),
        });
    }
    if let Some(dir) = &settings.archive_dir {
        all.push(Box::new(Archive::new(city, settings.time_zone, dir)));
    }
    if settings.clean_passes {
        all.push(Box::new(CleanPasses::new(city)));
    }
    Ok(all)
}

fn first_entry_store(settings: &PipelineSettings) -> anyhow::Result<Box<dyn FirstEntryStore>> {
    Ok(match settings.first_entry_store.as_str() {
        "embedded" => Box::new(EmbeddedFirstEntries::default()),
        other => match other.strip_prefix("rocksdb:") {
            Some(path) => Box::new(RocksFirstEntries::open(std::path::Path::new(path))?),
            None => Box::new(RedisFirstEntries::open(other, &settings.first_entry_key_prefix)?),
        },
    })
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
    pub cloned_plates: ClonedPlateRule,
    pub surge: SurgeRule,
    /// The watch list, shared with the admin API.
    pub watchlist: Arc<WatchList>,
    /// Where clean passes are archived, if anywhere.
    pub archive_dir: Option<std::path::PathBuf>,
    /// Emit every clean pass (for the clean-pass topic).
    pub clean_passes: bool,
    /// `embedded` (checkpointed with the operator), `rocksdb:PATH` or a Redis URL.
    pub first_entry_store: String,
    pub first_entry_key_prefix: String,
    /// The city's time zone (local days).
    pub time_zone: chrono_tz::Tz,
    /// The pipelines that run (names of [`NAMES`]).
    pub enabled: Vec<String>,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn settings(enabled: &[&str]) -> PipelineSettings {
        PipelineSettings {
            local_prefixes: vec!["赣A".into()],
            top_n: 10,
            high_frequency_passes: 8,
            cloned_plates: Default::default(),
            surge: Default::default(),
            watchlist: WatchList::in_memory(),
            archive_dir: None,
            clean_passes: false,
            // Not a store: opening it fails.
            first_entry_store: "nonsense://".into(),
            first_entry_key_prefix: String::new(),
            time_zone: chrono_tz::Asia::Shanghai,
            enabled: enabled.iter().map(|n| n.to_string()).collect(),
        }
    }

    fn names(operators: &[Box<dyn Operator>]) -> Vec<&'static str> {
        operators.iter().map(|op| op.name()).collect()
    }

    #[test]
    fn every_name_builds_its_pipeline_and_only_the_enabled_ones_are_built_in_their_order() {
        let city = test_support::city(vec![test_support::checkpoint("KK0001", "r1")], &["r1"]);
        let mut all_but_first_entry = NAMES.to_vec();
        all_but_first_entry.retain(|n| *n != "first_entry");
        let built = all(&city, &settings(&all_but_first_entry)).expect("no first-entry store is opened");
        assert_eq!(names(&built), all_but_first_entry);
        let built = all(&city, &settings(&["top_n", "flow_counts"])).unwrap();
        assert_eq!(names(&built), ["flow_counts", "top_n"]);
        assert!(all(&city, &settings(&["first_entry"])).is_err(), "its store is opened, and is not one");
        let mut embedded = settings(&NAMES);
        embedded.first_entry_store = "embedded".into();
        assert_eq!(names(&all(&city, &embedded).unwrap()), NAMES);
    }

    #[test]
    fn an_unknown_or_repeated_name_is_refused_with_the_known_ones() {
        let list = |names: &[&str]| names.iter().map(|n| n.to_string()).collect::<Vec<_>>();
        assert!(check_names(&list(&NAMES)).is_ok());
        assert!(check_names(&[]).is_ok());
        let err = check_names(&list(&["flow_counts", "flows"])).unwrap_err().to_string();
        assert!(err.contains("unknown pipeline `flows`") && err.contains("device_health"), "{err}");
        let err = check_names(&list(&["top_n", "top_n"])).unwrap_err().to_string();
        assert!(err.contains("`top_n` is named twice"), "{err}");
    }
}
