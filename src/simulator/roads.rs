//! Driving on the city's road graph: shortest routes, travel times under the day's congestion
//! (two peaks, worse towards the centre) and the passes a drive leaves at each checkpoint.

use crate::model::{CheckpointIdx, Direction};
use crate::reference::{haversine_m, City, RoadClass};
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use std::cmp::Reverse;
use std::collections::BinaryHeap;

const HOUR_MS: f64 = 3_600_000.0;

/// A pass as it truly happened (before any camera or network trouble).
#[derive(Clone, Debug, PartialEq)]
pub struct TruePass {
    pub vehicle: usize,
    pub checkpoint: CheckpointIdx,
    pub ts: i64,
    pub direction: Direction,
    /// Speed of the vehicle at the camera, km/h.
    pub speed_kmh: f64,
}

/// A segment slowed down over a time range (a congestion incident).
#[derive(Clone, Debug)]
pub struct Incident {
    pub segment: usize,
    pub from_ms: i64,
    pub to_ms: i64,
    pub slowdown: f64,
}

pub struct Roads<'a> {
    pub city: &'a City,
    /// Outgoing segments of each checkpoint.
    out: Vec<Vec<usize>>,
    /// How strongly each segment suffers at peak time (0 = not at all).
    peak_amplitude: Vec<f64>,
    day_start_ms: i64,
    pub incidents: Vec<Incident>,
}

impl<'a> Roads<'a> {
    pub fn new(city: &'a City, day_start_ms: i64) -> Roads<'a> {
        let mut out = vec![Vec::new(); city.checkpoints.len()];
        for (i, s) in city.segments.iter().enumerate() {
            out[s.from.0 as usize].push(i);
        }
        let centre = centroid(city);
        let radius = city.checkpoints.iter().map(|c| haversine_m(c.position(), centre)).fold(1.0, f64::max);
        let peak_amplitude = city
            .segments
            .iter()
            .map(|s| {
                let base = match s.road_class {
                    RoadClass::Expressway => 0.8,
                    RoadClass::Arterial => 1.3,
                    RoadClass::Secondary => 1.1,
                };
                let centrality = 1.0 - haversine_m(city.checkpoint(s.to).position(), centre) / radius;
                base * (0.5 + centrality)
            })
            .collect();
        Roads { city, out, peak_amplitude, day_start_ms, incidents: Vec::new() }
    }

    pub fn neighbours(&self, cp: CheckpointIdx) -> impl Iterator<Item = CheckpointIdx> + '_ {
        self.out[cp.0 as usize].iter().map(|s| self.city.segments[*s].to)
    }

    pub fn segment_between(&self, from: CheckpointIdx, to: CheckpointIdx) -> Option<usize> {
        self.out[from.0 as usize].iter().copied().find(|s| self.city.segments[*s].to == to)
    }

    /// Local hour of day (fractional) of an instant of the simulated day.
    pub fn hour(&self, ts: i64) -> f64 {
        (ts - self.day_start_ms) as f64 / HOUR_MS
    }

    /// How many times the free-flow travel time a traversal starting at `ts` takes.
    pub fn slowdown(&self, segment: usize, ts: i64) -> f64 {
        let h = self.hour(ts);
        let peak = gauss(h, 8.0, 0.7).max(gauss(h, 18.0, 0.9));
        let incident = self
            .incidents
            .iter()
            .filter(|i| i.segment == segment && (i.from_ms..i.to_ms).contains(&ts))
            .map(|i| i.slowdown)
            .fold(1.0, f64::max);
        (1.0 + self.peak_amplitude[segment] * peak).max(incident)
    }

    /// The quickest route at free flow, each segment's cost jittered a little so that vehicles
    /// spread over equally good streets. Returns the segments in order (empty if `from == to`
    /// or there is no way).
    pub fn route(&self, from: CheckpointIdx, to: CheckpointIdx, rng: &mut ChaCha8Rng) -> Vec<usize> {
        let n = self.city.checkpoints.len();
        let mut best = vec![f64::INFINITY; n];
        let mut via: Vec<Option<usize>> = vec![None; n];
        let mut heap = BinaryHeap::new();
        best[from.0 as usize] = 0.0;
        heap.push((Reverse(0u64), from.0 as usize));
        while let Some((Reverse(cost), node)) = heap.pop() {
            let cost = cost as f64;
            if node == to.0 as usize {
                break;
            }
            if cost > best[node] {
                continue;
            }
            for &s in &self.out[node] {
                let seg = &self.city.segments[s];
                let next = seg.to.0 as usize;
                let c = cost + seg.free_flow_ms() * rng.gen_range(1.0..1.25);
                if c < best[next] {
                    best[next] = c;
                    via[next] = Some(s);
                    heap.push((Reverse(c as u64), next));
                }
            }
        }
        let mut path = Vec::new();
        let mut at = to.0 as usize;
        while let Some(s) = via[at] {
            path.push(s);
            at = self.city.segments[s].from.0 as usize;
        }
        path.reverse();
        if at == from.0 as usize {
            path
        } else {
            Vec::new()
        }
    }

    /// Drives a route departing at `depart`; `pace` ≥ 0.87 scales the vehicle's travel times
    /// (so it never exceeds free flow by more than 15 %). Returns the passes and the arrival.
    pub fn drive(&self, vehicle: usize, route: &[usize], depart: i64, pace: f64) -> (Vec<TruePass>, i64) {
        let Some(&first) = route.first() else { return (Vec::new(), depart) };
        let segs = &self.city.segments;
        let start = segs[first].from;
        let start_dir = match self.city.checkpoint(start).inbound_direction {
            Some(inbound) if self.city.checkpoint(start).boundary => inbound,
            _ => self.travel_direction(start, segs[first].to),
        };
        let mut passes = vec![TruePass {
            vehicle,
            checkpoint: start,
            ts: depart,
            direction: start_dir,
            speed_kmh: segs[first].free_flow_kmh / self.slowdown(first, depart) / pace,
        }];
        let mut t = depart;
        for &s in route {
            let seg = &segs[s];
            let dt = (seg.free_flow_ms() * self.slowdown(s, t) * pace).round() as i64;
            t += dt.max(1_000);
            let cp = self.city.checkpoint(seg.to);
            let direction = match cp.inbound_direction {
                Some(inbound) if cp.boundary => inbound.opposite(),
                _ => self.travel_direction(seg.from, seg.to),
            };
            passes.push(TruePass {
                vehicle,
                checkpoint: seg.to,
                ts: t,
                direction,
                speed_kmh: seg.length_m / (dt as f64 / 1000.0) * 3.6,
            });
        }
        (passes, t)
    }

    fn travel_direction(&self, from: CheckpointIdx, to: CheckpointIdx) -> Direction {
        Direction::of_travel(self.city.checkpoint(from).position(), self.city.checkpoint(to).position())
    }
}

pub fn centroid(city: &City) -> (f64, f64) {
    let n = city.checkpoints.len().max(1) as f64;
    let (lon, lat) = city.checkpoints.iter().fold((0.0, 0.0), |(a, b), c| (a + c.lon, b + c.lat));
    (lon / n, lat / n)
}

fn gauss(x: f64, mean: f64, sd: f64) -> f64 {
    (-((x - mean) / sd).powi(2) / 2.0).exp()
}
