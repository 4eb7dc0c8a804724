//! Event-time watermarks: bounded out-of-orderness per source partition, the minimum over the
//! partitions that are active, idle partitions released after a timeout, and (live) the wall
//! clock moving the watermark when no data comes at all. Pure: every clock is passed in.

use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Partition {
    /// Highest event time seen, `None` before the first record.
    max_ts: Option<i64>,
    /// Processing time of the last record, or of the assignment.
    last_seen: i64,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct WatermarkTracker {
    out_of_orderness_ms: i64,
    idle_timeout_ms: i64,
    partitions: BTreeMap<u32, Partition>,
    /// The watermark never goes back.
    current: i64,
}

impl WatermarkTracker {
    pub fn new(out_of_orderness_ms: i64, idle_timeout_ms: i64) -> WatermarkTracker {
        WatermarkTracker { out_of_orderness_ms, idle_timeout_ms, partitions: BTreeMap::new(), current: i64::MIN }
    }

    /// A partition the source now reads (it holds the watermark back until it has data or has
    /// been idle for the timeout).
    pub fn assign(&mut self, partition: u32, now: i64) {
        self.partitions.entry(partition).or_insert(Partition { max_ts: None, last_seen: now });
    }

    /// A partition the source no longer reads.
    pub fn revoke(&mut self, partition: u32) {
        self.partitions.remove(&partition);
    }

    /// Records an event time seen on a partition at processing time `now`.
    pub fn observe(&mut self, partition: u32, ts: i64, now: i64) {
        let p = self.partitions.entry(partition).or_insert(Partition { max_ts: None, last_seen: now });
        p.max_ts = Some(p.max_ts.map_or(ts, |m| m.max(ts)));
        p.last_seen = now;
    }

    /// The watermark at processing time `now`: the minimum over active partitions of their
    /// highest time less the out-of-orderness. With `live`, when every partition is idle the
    /// wall clock (`now`, less the timeout and the out-of-orderness) moves it on.
    pub fn advance(&mut self, now: i64, live: bool) -> i64 {
        let active = self.partitions.values().filter(|p| now - p.last_seen < self.idle_timeout_ms);
        let mut candidate: Option<i64> = None;
        let mut any_active = false;
        for p in active {
            any_active = true;
            match p.max_ts {
                // An active partition without data holds everything back.
                None => return self.current,
                Some(m) => candidate = Some(candidate.map_or(m, |c: i64| c.min(m))),
            }
        }
        if !any_active {
            let seen = self.partitions.values().filter_map(|p| p.max_ts).max();
            candidate = seen;
            if live {
                candidate = Some(candidate.unwrap_or(i64::MIN).max(now - self.idle_timeout_ms));
            }
        }
        if let Some(c) = candidate {
            self.current = self.current.max(c.saturating_sub(self.out_of_orderness_ms));
        }
        self.current
    }

    /// The same partitions and watermark under other settings (a restore keeps the
    /// configuration's bound and timeout, not the snapshot's).
    pub fn with_settings(mut self, out_of_orderness_ms: i64, idle_timeout_ms: i64) -> WatermarkTracker {
        self.out_of_orderness_ms = out_of_orderness_ms;
        self.idle_timeout_ms = idle_timeout_ms;
        self
    }

    /// Each partition's own watermark (its highest event time less the out-of-orderness;
    /// `None` before its first record).
    pub fn partition_watermarks(&self) -> impl Iterator<Item = (u32, Option<i64>)> + '_ {
        self.partitions.iter().map(|(p, s)| (*p, s.max_ts.map(|m| m.saturating_sub(self.out_of_orderness_ms))))
    }

    pub fn current(&self) -> i64 {
        self.current
    }

    /// Moves the watermark to the end of time (end of input: every window closes).
    pub fn finish(&mut self) -> i64 {
        self.current = i64::MAX;
        self.current
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const OOO: i64 = 10_000;
    const IDLE: i64 = 60_000;

    #[test]
    fn one_partition_trails_its_highest_time_by_the_out_of_orderness() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.observe(0, 100_000, 0);
        assert_eq!(w.advance(0, false), 90_000);
        w.observe(0, 95_000, 1);
        assert_eq!(w.advance(1, false), 90_000, "an older record does not move it back");
    }

    #[test]
    fn the_slowest_active_partition_holds_the_watermark() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.observe(0, 100_000, 0);
        w.observe(1, 50_000, 0);
        assert_eq!(w.advance(0, false), 40_000);
        let each: Vec<_> = w.partition_watermarks().collect();
        assert_eq!(each, vec![(0, Some(90_000)), (1, Some(40_000))], "each partition's own, for its lag metric");
    }

    #[test]
    fn an_empty_partition_holds_back_until_it_has_been_idle_for_the_timeout() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.assign(1, 0);
        w.observe(0, 100_000, 0);
        assert_eq!(w.advance(30_000, false), i64::MIN);
        w.observe(0, 200_000, 61_000);
        assert_eq!(w.advance(61_000, false), 190_000);
    }

    #[test]
    fn a_partition_that_goes_quiet_stops_holding_and_one_that_comes_back_holds_again() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.observe(0, 100_000, 0);
        w.observe(1, 100_000, 0);
        w.observe(0, 400_000, 70_000);
        assert_eq!(w.advance(70_000, false), 390_000, "partition 1 has been quiet for 70 s");
        w.observe(1, 150_000, 80_000);
        assert_eq!(w.advance(80_000, false), 390_000, "it comes back behind: the watermark stays");
        w.observe(0, 500_000, 81_000);
        assert_eq!(w.advance(81_000, false), 390_000, "and holds it until it catches up");
        w.observe(1, 450_000, 82_000);
        assert_eq!(w.advance(82_000, false), 440_000);
    }

    #[test]
    fn live_the_wall_clock_moves_a_silent_source_on() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.observe(0, 1_000_000, 1_000_000);
        assert_eq!(w.advance(1_000_000, true), 990_000);
        assert_eq!(w.advance(1_030_000, true), 990_000, "not idle yet");
        assert_eq!(w.advance(2_000_000, true), 2_000_000 - IDLE - OOO);
        assert_eq!(w.advance(2_000_000, false), 2_000_000 - IDLE - OOO, "never goes back");
    }

    #[test]
    fn replay_without_a_clock_follows_the_data_and_finish_closes_everything() {
        let mut w = WatermarkTracker::new(OOO, IDLE);
        w.observe(0, 100_000, 0);
        assert_eq!(w.advance(0, false), 90_000);
        assert_eq!(w.finish(), i64::MAX);
    }
}
