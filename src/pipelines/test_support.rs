//! Small hand-made cities and passes for the pipelines' unit tests.

use crate::core::{Context, NO_BATCH};
use crate::model::{CheckpointIdx, Direction, EventTime, Pass, PlateColor, PlateRead};
use crate::reference::{Checkpoint, City, Region, RoadClass, Segment};
use crate::results::ResultBatch;
use std::sync::Arc;

/// An operator's context at `watermark`, allowing `lateness_ms`, at processing time 0 (set
/// `processing_now` for pipelines paced by the wall clock).
pub fn context<'a>(
    watermark: i64,
    lateness_ms: i64,
    out: &'a mut ResultBatch,
    late: &'a mut Vec<(usize, &'static str)>,
) -> Context<'a> {
    Context { watermark, allowed_lateness_ms: lateness_ms, processing_now: 0, out, late, batch: &NO_BATCH }
}

/// An arterial checkpoint in `region`, not on the boundary, without bus lanes.
pub fn checkpoint(id: &str, region: &str) -> Checkpoint {
    Checkpoint {
        id: id.into(),
        name: id.into(),
        lon: 115.9,
        lat: 28.7,
        region_id: region.into(),
        road_class: RoadClass::Arterial,
        boundary: false,
        inbound_direction: None,
        bus_lanes: vec![],
        speed_limit_kmh: 60,
    }
}

pub fn city(checkpoints: Vec<Checkpoint>, regions: &[&str]) -> Arc<City> {
    city_with_segments(checkpoints, vec![], regions)
}

pub fn city_with_segments(checkpoints: Vec<Checkpoint>, segments: Vec<Segment>, regions: &[&str]) -> Arc<City> {
    let regions = regions.iter().map(|r| Region { id: (*r).into(), name: (*r).into() }).collect();
    Arc::new(City::from_parts(checkpoints, segments, regions, None))
}

/// Segment `id` from checkpoint index `from` to `to`, `length_m` long, free flow at `free_kmh`.
pub fn segment(id: &str, from: u32, to: u32, length_m: f64, free_kmh: f64, class: RoadClass, region: &str) -> Segment {
    Segment {
        id: id.into(),
        from: CheckpointIdx(from),
        to: CheckpointIdx(to),
        length_m,
        free_flow_kmh: free_kmh,
        road_class: class,
        region_id: region.into(),
    }
}

/// A blue-plate pass at checkpoint `cp`, west to east in lane 1, its id made of the rest.
pub fn pass(plate: &str, cp: u32, ts: i64) -> Pass {
    Pass {
        pass_id: format!("{plate}-{cp}-{ts}").into(),
        plate: PlateRead::parse(plate),
        plate_color: PlateColor::Blue,
        plate_type: "02".into(),
        checkpoint: CheckpointIdx(cp),
        device_id: None,
        direction: Direction::WEST_TO_EAST,
        lane: 1,
        ts: EventTime(ts),
        speed_kmh: None,
        vehicle_type: None,
    }
}
