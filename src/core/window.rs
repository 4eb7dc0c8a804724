//! Window assignment and lateness: pure functions of event time.
//!
//! Windows are epoch-aligned: a window of `size` ms starts at a multiple of `size`. Sliding
//! windows of `size` every `slide` start at multiples of `slide`. Day windows follow the city's
//! local calendar.

use chrono::NaiveDate;
use chrono_tz::Tz;

use crate::model::{EventTime, Pass};

/// The start of the tumbling window of `size_ms` that contains `ts`.
pub fn tumbling_start(ts: i64, size_ms: i64) -> i64 {
    ts.div_euclid(size_ms) * size_ms
}

/// A batch's passes in runs of one tumbling window of `size_ms` (passes come mostly in time
/// order, so a run's window is looked up once): (the place of the run's first pass in the
/// batch, the window's start, the run).
pub fn window_runs(passes: &[Pass], size_ms: i64) -> impl Iterator<Item = (usize, i64, &[Pass])> {
    let mut first = 0;
    std::iter::from_fn(move || {
        let rest = &passes[first..];
        let start = tumbling_start(rest.first()?.ts.ms(), size_ms);
        // A run ends at the first pass outside its window (one division a run, not a pass).
        let len = rest.iter().position(|p| !(start..start + size_ms).contains(&p.ts.ms())).unwrap_or(rest.len());
        first += len;
        Some((first - len, start, &rest[..len]))
    })
}

/// The starts of every sliding window (`size_ms` long, every `slide_ms`) that contains `ts`,
/// earliest first.
pub fn sliding_starts(ts: i64, size_ms: i64, slide_ms: i64) -> impl Iterator<Item = i64> {
    let last = tumbling_start(ts, slide_ms);
    let first = last - (size_ms - slide_ms).div_euclid(slide_ms) * slide_ms;
    (0..).map(move |k| first + k * slide_ms).take_while(move |s| *s <= last).filter(move |s| ts < s + size_ms)
}

/// The local day of `ts` in the city's time zone.
pub fn local_day(ts: i64, tz: Tz) -> NaiveDate {
    EventTime(ts).local_date(tz)
}

/// A pass is late for a window when, on its arrival, the watermark has already reached the
/// window's end plus the allowed lateness (Flink's rule).
pub fn is_late(window_end: i64, watermark: i64, allowed_lateness_ms: i64) -> bool {
    watermark >= window_end.saturating_add(allowed_lateness_ms)
}

/// A window is emitted once the watermark has passed its end.
pub fn is_complete(window_end: i64, watermark: i64) -> bool {
    watermark >= window_end
}

/// Work repeated in event time (a sweep of state): due once the time it is asked at has moved
/// `every_ms` past the last time it was due.
#[derive(Clone, Copy, Debug)]
pub struct Every {
    every_ms: i64,
    last: i64,
}

impl Every {
    pub const fn new(every_ms: i64) -> Every {
        Every { every_ms, last: i64::MIN }
    }

    /// Whether the work is due at `now` (then it counts as done at `now`).
    pub fn due(&mut self, now: i64) -> bool {
        let due = now.saturating_sub(self.last) >= self.every_ms;
        if due {
            self.last = now;
        }
        due
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tumbling_windows_are_epoch_aligned_and_half_open() {
        assert_eq!(tumbling_start(0, 30_000), 0);
        assert_eq!(tumbling_start(29_999, 30_000), 0);
        assert_eq!(tumbling_start(30_000, 30_000), 30_000);
        assert_eq!(tumbling_start(1_772_409_612_345, 300_000), 1_772_409_600_000);
        assert_eq!(tumbling_start(-1, 30_000), -30_000);
    }

    #[test]
    fn a_time_falls_in_size_over_slide_sliding_windows() {
        let starts: Vec<i64> = sliding_starts(62_000, 60_000, 5_000).collect();
        assert_eq!(starts.len(), 12);
        assert_eq!(starts.first(), Some(&5_000));
        assert_eq!(starts.last(), Some(&60_000));
        assert!(starts.iter().all(|s| *s <= 62_000 && 62_000 < s + 60_000));
        let on_boundary: Vec<i64> = sliding_starts(60_000, 60_000, 5_000).collect();
        assert_eq!(on_boundary.first(), Some(&5_000));
        assert_eq!(on_boundary.last(), Some(&60_000));
    }

    #[test]
    fn window_runs_cut_a_batch_wherever_a_pass_leaves_the_window_of_the_run() {
        use crate::pipelines::test_support::pass;
        // A window's last ms, the next window's first, a pass back in the first window, and
        // one two windows on, before the epoch too.
        let times = [-1, 0, 29_999, 30_000, 59_999, 10, 95_000, 95_001];
        let passes: Vec<Pass> = times.iter().map(|ts| pass("赣A12345", 1, *ts)).collect();
        let runs: Vec<(usize, i64, usize)> = window_runs(&passes, 30_000).map(|(at, s, r)| (at, s, r.len())).collect();
        assert_eq!(runs, [(0, -30_000, 1), (1, 0, 2), (3, 30_000, 2), (5, 0, 1), (6, 90_000, 2)]);
        assert_eq!(window_runs(&[], 30_000).count(), 0);
    }

    #[test]
    fn vehicle_runs_group_a_batch_by_local_day_and_leave_out_unreadable_plates_and_closed_days() {
        use crate::model::DAY_MS;
        use crate::pipelines::test_support::pass;
        use chrono::Datelike;
        let tz = chrono_tz::Asia::Shanghai;
        let midnight = 1_772_380_800_000; // 2 March 2026 in Shanghai
        let passes: Vec<Pass> = [
            ("赣A1", midnight - 1),
            ("-", midnight - 2),
            ("赣A2", midnight),
            ("赣A3", midnight + 5),
            ("赣A4", midnight - DAY_MS - 5),
            ("赣A5", midnight - 3),
        ]
        .iter()
        .map(|(plate, ts)| pass(plate, 1, *ts))
        .collect();
        let mut late = Vec::new();
        // The watermark has closed 28 February (its end plus an hour's lateness).
        let runs = LocalDays::new(tz).vehicle_runs(&passes, midnight - DAY_MS + 3_600_000, 3_600_000, |i| late.push(i));
        let days: Vec<(u32, Vec<usize>)> = runs.iter().map(|((d, _, _), run)| (d.day(), run.clone())).collect();
        assert_eq!(days, [(1, vec![0]), (2, vec![2, 3]), (1, vec![5])]);
        assert_eq!(late, [4]);
        assert_eq!(runs[1].0 .1, midnight);
    }

    #[test]
    fn lateness_is_judged_against_window_end_plus_allowed_lateness() {
        assert!(!is_late(60_000, 59_999, 0));
        assert!(is_late(60_000, 60_000, 0));
        assert!(!is_late(60_000, 60_000 + 3_599_999, 3_600_000));
        assert!(is_late(60_000, 60_000 + 3_600_000, 3_600_000));
        assert!(is_complete(60_000, 60_000) && !is_complete(60_000, 59_999));
    }

    #[test]
    fn local_days_turn_at_midnight_in_the_city() {
        let tz = chrono_tz::Asia::Shanghai;
        // 2026-03-01T15:59:59.999Z is 23:59:59.999 on 1 March in Shanghai.
        assert_eq!(local_day(1_772_380_799_999, tz), NaiveDate::from_ymd_opt(2026, 3, 1).unwrap());
        assert_eq!(local_day(1_772_380_800_000, tz), NaiveDate::from_ymd_opt(2026, 3, 2).unwrap());
    }
}

/// Local days of a time zone: the day of a time, when it starts and ends. Remembers the last
/// day looked up, since time-zone math is slow and passes come in runs of the same day.
#[derive(Clone, Debug)]
pub struct LocalDays {
    tz: Tz,
    /// The last day looked up: [start, end) and its date.
    recent: Option<(i64, i64, NaiveDate)>,
}

impl LocalDays {
    pub fn new(tz: Tz) -> LocalDays {
        LocalDays { tz, recent: None }
    }

    pub fn tz(&self) -> Tz {
        self.tz
    }

    /// The local day of `ts`, the instant it starts and the instant it ends.
    pub fn of(&mut self, ts: i64) -> (NaiveDate, i64, i64) {
        if let Some((start, end, day)) = self.recent.filter(|(start, end, _)| (*start..*end).contains(&ts)) {
            return (day, start, end);
        }
        let day = local_day(ts, self.tz);
        let (start, end) = self.bounds(day);
        self.recent = Some((start, end, day));
        (day, start, end)
    }

    /// A batch's passes of a known vehicle whose local day is still open, in runs of one day:
    /// (the day with its start and end, the places of its passes in the batch). The places of
    /// the others of a known vehicle, late for their day, go to `late`.
    pub fn vehicle_runs(
        &mut self,
        passes: &[Pass],
        watermark: i64,
        allowed_lateness_ms: i64,
        mut late: impl FnMut(usize),
    ) -> Vec<((NaiveDate, i64, i64), Vec<usize>)> {
        let mut runs: Vec<((NaiveDate, i64, i64), Vec<usize>)> = Vec::new();
        for (i, pass) in passes.iter().enumerate() {
            if pass.plate.plate().is_none() {
                continue;
            }
            let day = self.of(pass.ts.ms());
            if is_late(day.2, watermark, allowed_lateness_ms) {
                late(i);
                continue;
            }
            match runs.last_mut() {
                Some((d, run)) if d.0 == day.0 => run.push(i),
                _ => runs.push((day, vec![i])),
            }
        }
        runs
    }

    /// The instants `day` starts and ends (its local midnight and the next).
    pub fn bounds(&self, day: NaiveDate) -> (i64, i64) {
        (crate::simulator::day_start_ms(day, self.tz), self.end(day))
    }

    /// The instant `day` ends (the next local midnight).
    pub fn end(&self, day: NaiveDate) -> i64 {
        day.succ_opt().map_or(i64::MAX, |next| crate::simulator::day_start_ms(next, self.tz))
    }
}
