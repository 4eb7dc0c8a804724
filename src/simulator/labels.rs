//! Ground truth of a simulated day: what dirt went in and which anomalies were planted, written
//! next to the pass file so that tests and users can check what passflow finds.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Labels {
    pub seed: u64,
    pub day: String,
    pub time_zone: String,
    /// Vehicles on the road, including planted ones.
    pub vehicles: u64,
    /// Lines in the pass file.
    pub records: u64,
    /// Distinct passes that are valid (what a correct deduplicating reader accepts).
    pub valid_passes: u64,
    pub identical_duplicates: u64,
    pub conflicting_duplicates: u64,
    pub unreadable_plates: u64,
    /// Invalid records written on purpose, by the reason a reader must give.
    pub dead_letters: BTreeMap<String, u64>,
    /// Passes (outside the outage) delivered more than the out-of-orderness after their time.
    pub delayed_beyond_out_of_orderness: u64,
    pub outage: Option<OutageLabel>,
    pub clock_skew: Option<ClockSkewLabel>,
    pub cloned_plates: Vec<CloneLabel>,
    pub traffic_surge: Option<SurgeLabel>,
    pub congestion_incident: Option<IncidentLabel>,
    pub high_frequency: Vec<HighFrequencyLabel>,
    pub restriction_violators: Vec<ViolatorLabel>,
}

/// A checkpoint whose uplink was down: its passes were buffered and delivered late.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct OutageLabel {
    pub checkpoint_id: String,
    pub from_ts: i64,
    pub to_ts: i64,
    /// Buffered passes arrive from this time on.
    pub delivered_from_ts: i64,
    pub passes: u64,
}

/// A camera whose clock runs ahead: its `ts` are `skew_ms` later than the truth.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ClockSkewLabel {
    pub checkpoint_id: String,
    pub skew_ms: i64,
    pub passes: u64,
    /// Vehicles that only look implausibly fast because of the skewed clock.
    pub affected_vehicles: Vec<VehicleLabel>,
}

#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct VehicleLabel {
    pub plate: String,
    pub plate_color: u8,
}

/// Two vehicles on one plate, and every pair of their passes that the cloned-plate rule flags.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct CloneLabel {
    pub plate: String,
    pub plate_color: u8,
    /// Pass ids of each conflicting pair, in byte order.
    pub conflicting_pairs: Vec<[String; 2]>,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SurgeLabel {
    pub checkpoint_id: String,
    pub from_ts: i64,
    pub to_ts: i64,
    pub extra_vehicles: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct IncidentLabel {
    pub segment_id: String,
    pub from_ts: i64,
    pub to_ts: i64,
    /// Travel times on the segment are this many times the free-flow time.
    pub slowdown: f64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct HighFrequencyLabel {
    pub plate: String,
    pub plate_color: u8,
    pub checkpoint_id: String,
    pub passes: u64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ViolatorLabel {
    pub plate: String,
    pub plate_color: u8,
    pub rule_id: String,
    /// The passes that violate the rule.
    pub pass_ids: Vec<String>,
}
