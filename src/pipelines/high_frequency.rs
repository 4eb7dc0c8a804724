//! High-frequency vehicles (高频车): per checkpoint and local day, the vehicles with at least N
//! passes (default 8), with their count and first and last time. A row appears as soon as the
//! count reaches N and is updated with every further pass until the day closes (its end plus
//! the allowed lateness). `passes` only grows, so it orders a row's updates in the store.

use crate::core::window::{is_late, LocalDays};
use crate::core::{Context, Operator, SeqOf, StateBlob, VehicleTable};
use crate::model::{Pass, VehicleKey};
use crate::reference::City;
use crate::results::HighFrequencyRow;
use chrono::NaiveDate;
use chrono_tz::Tz;
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};
use smallvec::SmallVec;
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

const LATE_LABEL: &str = "high_frequency/day";
const STATE_VERSION: u32 = 2;
/// States written before the binary encoding, as JSON.
const JSON_STATE_VERSION: u32 = 1;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Tally {
    passes: u32,
    first_ts: i64,
    last_ts: i64,
}

/// A vehicle's tally at one checkpoint as held: times in ms since the day's start, so that a
/// vehicle's tallies take half the room to scan.
#[derive(Clone, Copy, Debug)]
struct Count {
    checkpoint: u32,
    passes: u32,
    first: u32,
    last: u32,
}

#[derive(Default)]
struct Day {
    /// Midnight that starts the day, epoch ms.
    start: i64,
    /// Midnight that ends the day, epoch ms.
    end: i64,
    /// Each vehicle's tally at each checkpoint it passed, by checkpoint index: one entry per
    /// vehicle (a city-day has some ten times fewer vehicles than vehicle-checkpoint pairs,
    /// and a vehicle passes a few checkpoints), so a pass probes a much smaller table. The
    /// first few lie in the table's entry, without an allocation.
    tallies: VehicleTable<SmallVec<[Count; 4]>>,
    /// Entries at or over the threshold changed since they were last written: (checkpoint,
    /// the vehicle's place in `tallies`; a day's vehicles keep their places).
    dirty: FxHashSet<(u32, u32)>,
}

impl Day {
    /// The tally of the vehicle at `place` at `checkpoint`, in epoch ms.
    fn tally(&self, place: u32, checkpoint: u32) -> Option<Tally> {
        self.tallies.value(place).iter().find(|c| c.checkpoint == checkpoint).map(|c| self.stored(c))
    }

    fn stored(&self, c: &Count) -> Tally {
        Tally { passes: c.passes, first_ts: self.start + i64::from(c.first), last_ts: self.start + i64::from(c.last) }
    }
}

pub struct HighFrequency {
    city: Arc<City>,
    days_of: LocalDays,
    threshold: u32,
    days: BTreeMap<NaiveDate, Day>,
    /// The most vehicles an open day has (or the last one closed): a new day's room.
    day_vehicles: usize,
    /// The length of the last snapshot (see [`StateBlob::encode`]).
    snapshot_len: AtomicUsize,
}

impl HighFrequency {
    pub fn new(city: &Arc<City>, tz: Tz, threshold: u32) -> HighFrequency {
        HighFrequency {
            city: city.clone(),
            days_of: LocalDays::new(tz),
            threshold: threshold.max(1),
            days: BTreeMap::new(),
            day_vehicles: 0,
            snapshot_len: AtomicUsize::new(0),
        }
    }

    /// Counts a run of passes of one day, of `start` and `end`: `run` holds their places in
    /// `passes`.
    fn tally_run(&mut self, (day, start, end): (NaiveDate, i64, i64), passes: &[Pass], run: &[usize]) {
        // A new day's table starts as large as the largest open one's: grown from nothing it
        // would be copied over each time it doubles, for every vehicle of the city.
        let room = self.day_vehicles;
        let d = self.days.entry(day).or_insert_with(|| Day {
            start,
            end,
            tallies: VehicleTable::with_capacity(room),
            ..Day::default()
        });
        let vehicles: Vec<_> =
            run.iter().map(|i| passes[*i].vehicle_ref().expect("a day's run holds known vehicles only")).collect();
        let places = d.tallies.resolve(&vehicles, SmallVec::new);
        for (j, (&i, &place)) in run.iter().zip(&places).enumerate() {
            d.tallies.prefetch_ahead_with(&places, j, |counts| counts.first());
            let (checkpoint, ts) = (passes[i].checkpoint.0, passes[i].ts.ms());
            // A day is at most 25 h long: its times fit.
            let at_ms = u32::try_from(ts - start).expect("a pass's time is within its day");
            let at = d.tallies.value_mut(place);
            let c = match at.iter().position(|c| c.checkpoint == checkpoint) {
                Some(k) => &mut at[k],
                None => {
                    at.push(Count { checkpoint, passes: 0, first: at_ms, last: at_ms });
                    at.last_mut().expect("just pushed")
                }
            };
            c.passes += 1;
            c.first = c.first.min(at_ms);
            c.last = c.last.max(at_ms);
            if c.passes >= self.threshold {
                d.dirty.insert((checkpoint, place));
            }
        }
    }

    fn emit(&mut self, out: &mut Vec<HighFrequencyRow>) {
        for (day, d) in &mut self.days {
            if d.dirty.is_empty() {
                continue;
            }
            let day = day.to_string();
            for (checkpoint, place) in std::mem::take(&mut d.dirty) {
                let t = d.tally(place, checkpoint).expect("a dirty entry is tallied");
                let vehicle = d.tallies.key(place);
                out.push(HighFrequencyRow {
                    day: day.clone(),
                    checkpoint_id: self.city.checkpoints[checkpoint as usize].id.clone(),
                    plate: vehicle.plate.as_str().into(),
                    plate_color: vehicle.color.code(),
                    passes: t.passes,
                    first_ts: t.first_ts,
                    last_ts: t.last_ts,
                });
            }
        }
    }
}

impl Operator for HighFrequency {
    fn name(&self) -> &'static str {
        "high_frequency"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let late = &mut *ctx.late;
        let runs =
            self.days_of.vehicle_runs(passes, ctx.watermark, ctx.allowed_lateness_ms, |i| late.push((i, LATE_LABEL)));
        for (day, run) in runs {
            self.tally_run(day, passes, &run);
        }
        self.emit(&mut ctx.out.high_frequency);
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        self.emit(&mut ctx.out.high_frequency);
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        self.days.retain(|_, d| !is_late(d.end, watermark, lateness));
        self.day_vehicles = self.days.values().map(|d| d.tallies.len()).max().unwrap_or(self.day_vehicles);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        // Written straight from the maps, in the shape of `StoredDay`.
        let days = self.days.iter().map(|(day, d)| StoredDayRef {
            day,
            tallies: SeqOf::counted(
                d.tallies.iter().enumerate().flat_map(move |(place, (v, at))| {
                    at.iter().map(move |c| {
                        let dirty = d.dirty.contains(&(c.checkpoint, place as u32));
                        (c.checkpoint, v.plate.as_str(), v.color.code(), d.stored(c), dirty)
                    })
                }),
                d.tallies.values().map(|at| at.len()).sum(),
            ),
        });
        StateBlob::encode(STATE_VERSION, &SeqOf::new(days), &self.snapshot_len)
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        let stored: Vec<StoredDay> = blob.decode(self.name(), STATE_VERSION, JSON_STATE_VERSION)?;
        self.days.clear();
        for s in stored {
            let (start, end) = self.days_of.bounds(s.day);
            let d = self.days.entry(s.day).or_insert_with(|| Day { start, end, ..Day::default() });
            for (cp, plate, color, tally, dirty) in s.tallies {
                anyhow::ensure!(
                    (cp as usize) < self.city.checkpoints.len(),
                    "high_frequency state names a checkpoint this city does not have"
                );
                let Some(vehicle) = VehicleKey::from_stored(&plate, color) else { continue };
                // Not bounded by `end`: a day whose next date a time zone skipped lasts past it.
                let at = |ts: i64| u32::try_from(ts - start).ok();
                let (Some(first), Some(last)) = (at(tally.first_ts), at(tally.last_ts)) else {
                    anyhow::bail!("high_frequency state holds a pass outside its day {}", s.day);
                };
                let place = d.tallies.place_or_insert_with((&vehicle.plate, vehicle.color), SmallVec::new);
                d.tallies.value_mut(place).push(Count { checkpoint: cp, passes: tally.passes, first, last });
                if dirty {
                    d.dirty.insert((cp, place));
                }
            }
        }
        Ok(())
    }
}

#[derive(Serialize)]
#[serde(bound(serialize = "SeqOf<I>: Serialize"))]
struct StoredDayRef<'a, I> {
    day: &'a NaiveDate,
    tallies: SeqOf<I>,
}

#[derive(Deserialize)]
struct StoredDay {
    day: NaiveDate,
    /// (checkpoint, plate, colour, tally, not yet written)
    tallies: Vec<(u32, String, u8, Tally, bool)>,
}

/// The batch computation: (day, checkpoint, plate, colour) → (passes, first, last) of every
/// vehicle with at least `threshold` passes.
pub fn batch_high_frequency(
    city: &City,
    tz: Tz,
    passes: &[Pass],
    threshold: u32,
) -> BTreeMap<(String, String, String, u8), (u32, i64, i64)> {
    let mut all: BTreeMap<(String, String, String, u8), (u32, i64, i64)> = BTreeMap::new();
    for p in passes {
        let Some(v) = p.vehicle() else { continue };
        let key = (
            p.ts.local_date(tz).to_string(),
            city.checkpoint(p.checkpoint).id.to_string(),
            v.plate.as_str().to_owned(),
            v.color.code(),
        );
        let e = all.entry(key).or_insert((0, i64::MAX, i64::MIN));
        *e = (e.0 + 1, e.1.min(p.ts.ms()), e.2.max(p.ts.ms()));
    }
    all.retain(|_, (n, _, _)| *n >= threshold);
    all
}

#[cfg(test)]
#[path = "high_frequency_tests.rs"]
mod tests;
