//! The pipelines, one file each, written against the operator contract of `crate::core`.
//!
//! - `flow_counts.rs`: passes per checkpoint, direction, region, city, boundary and bus lane,
//!   in 30 s / 1 min / 5 min windows.
//! - `origin_counts.rs`: distinct vehicles per region and 5 min window by plate origin.

mod flow_counts;
mod origin_counts;

pub use flow_counts::{batch_flow_counts, FlowCounts, FLOW_WINDOWS_S};
pub use origin_counts::{batch_origin_counts, plate_origin, OriginCounts, PlateOrigin, ORIGIN_WINDOW_S};

use crate::core::Operator;
use crate::reference::City;
use std::sync::Arc;

/// Every pipeline of the service, in the order they run. `local_prefixes`: the city's own
/// plate prefixes.
pub fn all(city: &Arc<City>, local_prefixes: &[String]) -> Vec<Box<dyn Operator>> {
    vec![Box::new(FlowCounts::new(city)), Box::new(OriginCounts::new(city, local_prefixes))]
}
