//! The simulator as a live source: the day's records released as the (possibly accelerated)
//! clock reaches their arrival times, day after day.

use super::{day_start_ms, simulate_day, Emission, SimParams};
use crate::model::{EventTime, DAY_MS};
use crate::reference::City;
use std::collections::VecDeque;
use std::sync::Arc;
use std::time::Instant;

pub struct LiveSimulator {
    city: Arc<City>,
    params: SimParams,
    speed: f64,
    wall_origin: Instant,
    sim_origin_ms: i64,
    next_day_start: i64,
    pending: VecDeque<Emission>,
    /// Records released so far, the source position.
    released: u64,
}

impl LiveSimulator {
    /// Starts at `now_ms` on the simulated clock, which then runs `speed` times as fast as the
    /// wall clock. The day containing `now_ms` is generated and released from `now_ms` on.
    pub fn start(city: Arc<City>, mut params: SimParams, speed: f64, now_ms: i64) -> LiveSimulator {
        params.day = EventTime(now_ms).local_date(params.time_zone);
        let day_start = day_start_ms(params.day, params.time_zone);
        let mut sim = LiveSimulator {
            city,
            params,
            speed,
            wall_origin: Instant::now(),
            sim_origin_ms: now_ms,
            next_day_start: day_start,
            pending: VecDeque::new(),
            released: 0,
        };
        sim.generate_due_days();
        while sim.pending.front().is_some_and(|e| e.arrival < now_ms) {
            sim.pending.pop_front();
        }
        sim
    }

    /// The simulated clock, epoch milliseconds.
    pub fn now_ms(&self) -> i64 {
        self.sim_origin_ms + (self.wall_origin.elapsed().as_secs_f64() * 1000.0 * self.speed) as i64
    }

    /// Records released so far.
    pub fn released(&self) -> u64 {
        self.released
    }

    /// Every record whose arrival time the clock has reached, with its sequence number.
    pub fn poll(&mut self, max: usize) -> Vec<(u64, String)> {
        self.generate_due_days();
        let now = self.now_ms();
        let mut out = Vec::new();
        while out.len() < max && self.pending.front().is_some_and(|e| e.arrival <= now) {
            let e = self.pending.pop_front().expect("front exists");
            out.push((self.released, e.line));
            self.released += 1;
        }
        out
    }

    fn generate_due_days(&mut self) {
        while self.now_ms() >= self.next_day_start {
            self.params.day = EventTime(self.next_day_start + DAY_MS / 2).local_date(self.params.time_zone);
            let day = simulate_day(&self.city, &self.params);
            self.pending.extend(day.emissions);
            self.pending.make_contiguous().sort_by_key(|e| e.arrival);
            self.next_day_start = day_start_ms(self.params.day.succ_opt().expect("a next day"), self.params.time_zone);
        }
    }
}
