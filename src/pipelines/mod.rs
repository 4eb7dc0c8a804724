//! The pipelines, one file each, written against the operator contract of `crate::core`.
//!
//! - `flow_counts.rs`: passes per checkpoint, direction, region, city, boundary and bus lane,
//!   in 30 s / 1 min / 5 min windows.

mod flow_counts;

pub use flow_counts::{batch_flow_counts, FlowCounts, FLOW_WINDOWS_S};

use crate::core::Operator;
use crate::reference::City;
use std::sync::Arc;

/// Every pipeline of the service, in the order they run.
pub fn all(city: &Arc<City>) -> Vec<Box<dyn Operator>> {
    vec![Box::new(FlowCounts::new(city))]
}
