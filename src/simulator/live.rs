//! The simulator as a live source: the day's records released as the (possibly accelerated)
//! clock reaches their arrival times, day after day. Its position (day, records released that
//! day) is checkpointed; resuming regenerates the day and releases what arrived meanwhile.

use super::{day_start_ms, simulate_day, Emission, SimParams};
use crate::model::{EventTime, DAY_MS};
use crate::reference::City;
use chrono::NaiveDate;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use std::time::Instant;

/// Where the live simulator is: for each day it has released records of, the number of the
/// next record of that day to release (records of a day are released in order).
#[derive(Clone, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct SimPosition {
    pub next: BTreeMap<NaiveDate, u64>,
}

impl SimPosition {
    fn released(&self, day: NaiveDate, n: u64) -> bool {
        match self.next.get(&day) {
            Some(next) => n < *next,
            None => self.next.keys().next_back().is_some_and(|last| day < *last),
        }
    }
}

pub struct LiveSimulator {
    city: Arc<City>,
    params: SimParams,
    speed: f64,
    wall_origin: Instant,
    sim_origin_ms: i64,
    next_day_start: i64,
    /// (day, number within the day, record), in arrival order.
    pending: VecDeque<(NaiveDate, u64, Emission)>,
    position: SimPosition,
}

impl LiveSimulator {
    /// Starts at `now_ms` on the simulated clock, which then runs `speed` times as fast as the
    /// wall clock. Fresh, it releases the current day from `now_ms` on; resumed, from `resume`.
    pub fn start(
        city: Arc<City>,
        mut params: SimParams,
        speed: f64,
        now_ms: i64,
        resume: Option<SimPosition>,
    ) -> LiveSimulator {
        let today = EventTime(now_ms).local_date(params.time_zone);
        params.day = resume.as_ref().and_then(|r| r.next.keys().next().copied()).map_or(today, |d| d.min(today));
        let day_start = day_start_ms(params.day, params.time_zone);
        let position = resume.clone().unwrap_or_default();
        let mut sim = LiveSimulator {
            city,
            params,
            speed,
            wall_origin: Instant::now(),
            sim_origin_ms: now_ms,
            next_day_start: day_start,
            pending: VecDeque::new(),
            position,
        };
        sim.generate_due_days();
        match resume {
            Some(r) => sim.pending.retain(|(day, n, _)| !r.released(*day, *n)),
            None => sim.pending.retain(|(_, _, e)| e.arrival >= now_ms),
        }
        sim
    }

    /// The simulated clock, epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.sim_origin_ms + (self.wall_origin.elapsed().as_secs_f64() * 1000.0 * self.speed) as i64
    }

    pub fn position(&self) -> &SimPosition {
        &self.position
    }

    /// Records whose arrival time the clock has reached (at most `max`), each with its number
    /// in its day.
    pub fn poll(&mut self, max: usize) -> Vec<(u64, String)> {
        self.generate_due_days();
        let now = self.now_ms();
        let mut out = Vec::new();
        while out.len() < max && self.pending.front().is_some_and(|(_, _, e)| e.arrival <= now) {
            let (day, n, e) = self.pending.pop_front().expect("front exists");
            self.position.next.insert(day, n + 1);
            // Days with nothing left pending need no position but the newest.
            while self.position.next.len() > 2 {
                self.position.next.pop_first();
            }
            out.push((day_seq(day, n), e.line));
        }
        out
    }

    fn generate_due_days(&mut self) {
        while self.now_ms() >= self.next_day_start {
            self.params.day = EventTime(self.next_day_start + DAY_MS / 2).local_date(self.params.time_zone);
            let day = self.params.day;
            let emissions = simulate_day(&self.city, &self.params).emissions;
            self.pending.extend(emissions.into_iter().enumerate().map(|(n, e)| (day, n as u64, e)));
            self.pending.make_contiguous().sort_by_key(|(_, _, e)| e.arrival);
            self.next_day_start = day_start_ms(day.succ_opt().expect("a next day"), self.params.time_zone);
        }
    }
}

/// A stable number for record `n` of `day`: yyyymmdd × 10⁹ + n.
fn day_seq(day: NaiveDate, n: u64) -> u64 {
    let ymd = day.format("%Y%m%d").to_string().parse::<u64>().unwrap_or(0);
    ymd * 1_000_000_000 + n
}
