//! Trajectories (车辆轨迹): per vehicle and local day, its passes in time order as three lists —
//! times (ms), checkpoints, and the n − 1 intervals between consecutive passes in seconds —
//! upserted as passes arrive; a late pass is put in its place. A day stays open until its end
//! plus the allowed lateness, so a pass hours late still joins its trajectory. `revision` is
//! the number of passes − 1: it only grows.
//!
//! A row holds the whole day, so writing it after every pass would cost the square of a
//! vehicle's passes: the vehicles changed are written at most every few seconds of processing
//! time (sooner when very many have changed, and always before their day closes and at the
//! end of input), each with all its changes since. A live service's rows are then seconds
//! old; a replay writes each vehicle-day a few times instead of once a minute of its data.

use crate::core::window::{is_late, LocalDays};
use crate::core::{Context, Operator, SeqOf, StateBlob, VehicleTable};
use crate::model::{fnv1a64, Pass, Text, VehicleKey};
use crate::reference::City;
use crate::results::TrajectoryRow;
use chrono::NaiveDate;
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::atomic::AtomicUsize;
use std::sync::Arc;

const LATE_LABEL: &str = "trajectories/day";
const STATE_VERSION: u32 = 2;
/// States written before the binary encoding, as JSON.
const JSON_STATE_VERSION: u32 = 1;
/// Changed trajectories are written at most once per this much processing time...
const EMIT_EVERY_MS: i64 = 5_000;
/// ...unless this many vehicle-days have changed (it bounds the rows of one write).
const MAX_CHANGED: usize = 500_000;

/// One pass of a trajectory: ties on `ts` are ordered by a hash of the pass id.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
struct Stop {
    ts: i64,
    tie: u64,
    cp: u32,
}

/// A vehicle's passes of a day.
#[derive(Default)]
struct Track {
    stops: Vec<Stop>,
    /// Changed since it was last written (and listed in [`Day::dirty`]).
    dirty: bool,
}

#[derive(Default)]
struct Day {
    end: i64,
    vehicles: VehicleTable<Track>,
    /// The places in `vehicles` of the vehicles changed since they were last written, once
    /// each (a day's vehicles keep their places).
    dirty: Vec<u32>,
}

pub struct Trajectories {
    city: Arc<City>,
    /// Each checkpoint's id as a row holds it (made once, not once a stop written).
    checkpoint_ids: Vec<Text>,
    days_of: LocalDays,
    days: BTreeMap<NaiveDate, Day>,
    /// The processing time of the last emission (`None`: none since start or restore).
    emitted_at: Option<i64>,
    /// The length of the last snapshot (see [`StateBlob::encode`]).
    snapshot_len: AtomicUsize,
}

impl Trajectories {
    pub fn new(city: &Arc<City>, tz: Tz) -> Trajectories {
        Trajectories {
            city: city.clone(),
            checkpoint_ids: city.checkpoints.iter().map(|c| Text::new(&c.id)).collect(),
            days_of: LocalDays::new(tz),
            days: BTreeMap::new(),
            emitted_at: None,
            snapshot_len: AtomicUsize::new(0),
        }
    }

    /// Writes every vehicle changed since it was last written.
    fn emit(&mut self, ctx: &mut Context<'_>) {
        for (day, d) in &mut self.days {
            d.emit(&self.checkpoint_ids, day, &mut ctx.out.trajectories);
        }
        self.emitted_at = Some(ctx.processing_now);
    }
}

impl Day {
    /// Writes the vehicles changed since they were last written.
    fn emit(&mut self, checkpoint_ids: &[Text], day: &NaiveDate, out: &mut Vec<TrajectoryRow>) {
        if self.dirty.is_empty() {
            return;
        }
        let day = Text::new(&day.to_string());
        for place in self.dirty.drain(..) {
            let track = self.vehicles.value_mut(place);
            track.dirty = false;
            out.push(trajectory_row(checkpoint_ids, &day, self.vehicles.key(place), &self.vehicles.value(place).stops));
        }
    }
}

fn trajectory_row(checkpoint_ids: &[Text], day: &Text, vehicle: &VehicleKey, stops: &[Stop]) -> TrajectoryRow {
    TrajectoryRow {
        plate: vehicle.plate.text().clone(),
        plate_color: vehicle.color.code(),
        day: day.clone(),
        times: stops.iter().map(|s| s.ts).collect(),
        checkpoints: stops.iter().map(|s| checkpoint_ids[s.cp as usize].clone()).collect(),
        revision: stops.len().saturating_sub(1) as u32,
    }
}

impl Operator for Trajectories {
    fn name(&self) -> &'static str {
        "trajectories"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let ties = ctx.batch.id_digests(passes);
        let late = &mut *ctx.late;
        let runs =
            self.days_of.vehicle_runs(passes, ctx.watermark, ctx.allowed_lateness_ms, |i| late.push((i, LATE_LABEL)));
        for ((day, _, end), run) in runs {
            let d = self.days.entry(day).or_insert_with(|| Day { end, ..Day::default() });
            let vehicles: Vec<_> =
                run.iter().map(|i| passes[*i].vehicle_ref().expect("a day's run holds known vehicles only")).collect();
            let places = d.vehicles.resolve(&vehicles, Track::default);
            for (j, (&i, &place)) in run.iter().zip(&places).enumerate() {
                d.vehicles.prefetch_ahead_with(&places, j, |t| t.stops.last());
                let pass = &passes[i];
                let stop = Stop { ts: pass.ts.ms(), tie: ties[i], cp: pass.checkpoint.0 };
                let track = d.vehicles.value_mut(place);
                if let Err(at) = track.stops.binary_search(&stop) {
                    track.stops.insert(at, stop);
                    if !track.dirty {
                        track.dirty = true;
                        d.dirty.push(place);
                    }
                }
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let due = self.emitted_at.is_none_or(|at| ctx.processing_now.saturating_sub(at) >= EMIT_EVERY_MS);
        if due || self.days.values().map(|d| d.dirty.len()).sum::<usize>() >= MAX_CHANGED {
            self.emit(ctx);
        }
        let (watermark, lateness) = (ctx.watermark, ctx.allowed_lateness_ms);
        let (checkpoint_ids, out) = (&self.checkpoint_ids, &mut ctx.out.trajectories);
        self.days.retain(|day, d| {
            let closed = is_late(d.end, watermark, lateness);
            if closed {
                d.emit(checkpoint_ids, day, out);
            }
            !closed
        });
    }

    fn on_checkpoint(&mut self, _id: u64, ctx: &mut Context<'_>) {
        self.emit(ctx);
    }

    fn on_close(&mut self, ctx: &mut Context<'_>) {
        self.emit(ctx);
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        // Written straight from the maps, in the shape of `StoredDay`.
        let days = self.days.iter().map(|(day, d)| StoredDayRef {
            day,
            vehicles: SeqOf::new(d.vehicles.iter().map(|(v, t)| (v.plate.as_str(), v.color.code(), &t.stops, t.dirty))),
        });
        StateBlob::encode(STATE_VERSION, &SeqOf::new(days), &self.snapshot_len)
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        let stored: Vec<StoredDay> = blob.decode(self.name(), STATE_VERSION, JSON_STATE_VERSION)?;
        let n = self.city.checkpoints.len();
        anyhow::ensure!(
            stored.iter().flat_map(|d| &d.vehicles).flat_map(|v| &v.2).all(|s| (s.cp as usize) < n),
            "trajectories state names a checkpoint this city does not have"
        );
        self.days.clear();
        self.emitted_at = None;
        for s in stored {
            let end = self.days_of.end(s.day);
            let d = self.days.entry(s.day).or_insert_with(|| Day { end, ..Day::default() });
            for (plate, color, stops, dirty) in s.vehicles {
                let Some(vehicle) = VehicleKey::from_stored(&plate, color) else { continue };
                let place = d.vehicles.place_or_insert_with((&vehicle.plate, vehicle.color), || Track { stops, dirty });
                if dirty {
                    d.dirty.push(place);
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
    vehicles: SeqOf<I>,
}

#[derive(Deserialize)]
struct StoredDay {
    day: NaiveDate,
    /// (plate, colour, stops in time order, not yet written)
    vehicles: Vec<(String, u8, Vec<Stop>, bool)>,
}

/// The batch computation: (plate, colour, day) → (times, checkpoints) of every vehicle-day.
pub fn batch_trajectories(
    city: &City,
    tz: Tz,
    passes: &[Pass],
) -> BTreeMap<(String, u8, String), (Vec<i64>, Vec<Arc<str>>)> {
    let mut all: BTreeMap<(String, u8, String), Vec<Stop>> = BTreeMap::new();
    for p in passes {
        let Some(v) = p.vehicle() else { continue };
        let key = (v.plate.as_str().to_owned(), v.color.code(), p.ts.local_date(tz).to_string());
        all.entry(key).or_default().push(Stop {
            ts: p.ts.ms(),
            tie: fnv1a64(p.pass_id.as_bytes()),
            cp: p.checkpoint.0,
        });
    }
    all.into_iter()
        .map(|(k, mut stops)| {
            stops.sort();
            let times = stops.iter().map(|s| s.ts).collect();
            let checkpoints = stops.iter().map(|s| city.checkpoints[s.cp as usize].id.clone()).collect();
            (k, (times, checkpoints))
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::test_support::{self as support, checkpoint};
    use crate::results::ResultBatch;

    const TZ: Tz = chrono_tz::Asia::Shanghai;
    /// 2026-03-02 00:00 in Shanghai.
    const MIDNIGHT: i64 = 1_772_380_800_000;

    /// A batch at `watermark`, `now` being its processing time.
    fn run_at(op: &mut Trajectories, passes: &[Pass], watermark: i64, now: i64) -> (Vec<TrajectoryRow>, usize) {
        let (mut out, mut late) = (ResultBatch::default(), Vec::new());
        let mut ctx = Context { processing_now: now, ..support::context(watermark, 3_600_000, &mut out, &mut late) };
        op.process_batch(passes, &mut ctx);
        op.on_watermark(&mut ctx);
        (out.trajectories, late.len())
    }

    /// A batch processed a full emission period after the one before.
    fn run(op: &mut Trajectories, passes: &[Pass], watermark: i64) -> (Vec<TrajectoryRow>, usize) {
        let now = op.emitted_at.map_or(0, |at| at + EMIT_EVERY_MS);
        run_at(op, passes, watermark, now)
    }

    #[test]
    fn a_late_pass_is_put_in_place_and_midnight_starts_a_new_day() {
        let city = support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"]);
        let mut op = Trajectories::new(&city, TZ);
        let p = |cp, ts| support::pass("赣A1", cp, ts);
        let (rows, _) =
            run(&mut op, &[p(0, MIDNIGHT - 60_000), p(0, MIDNIGHT + 1_000), p(1, MIDNIGHT + 61_500)], i64::MIN);
        assert_eq!(rows.len(), 2, "one row for each local day");
        let today = rows.iter().find(|r| &*r.day == "2026-03-02").unwrap();
        assert_eq!(today.times, vec![MIDNIGHT + 1_000, MIDNIGHT + 61_500]);
        assert_eq!(today.intervals_s(), vec![60.5]);
        // Two hours later a pass between the two arrives: it is put in its place.
        let (rows, late) = run(&mut op, &[p(1, MIDNIGHT + 30_000)], MIDNIGHT + 7_200_000);
        assert_eq!(late, 0);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].checkpoints.iter().map(|c| &**c).collect::<Vec<_>>(), vec!["A", "B", "B"]);
        assert_eq!(rows[0].intervals_s(), vec![29.0, 31.5]);
        assert_eq!(rows[0].revision, 2);
        // The day before closed an hour after midnight: a pass for it is late.
        let (rows, late) = run(&mut op, &[p(1, MIDNIGHT - 1_000)], MIDNIGHT + 7_200_000);
        assert_eq!((rows.len(), late), (0, 1));
    }

    #[test]
    fn changed_trajectories_are_written_every_few_seconds_before_their_day_closes_and_at_the_end() {
        let city = support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"]);
        let mut op = Trajectories::new(&city, TZ);
        let p = |cp, ts| support::pass("赣A1", cp, ts);
        let (rows, _) = run_at(&mut op, &[p(0, MIDNIGHT + 1_000)], MIDNIGHT + 10_000, 0);
        assert_eq!(rows.len(), 1, "the first watermark writes");
        // Two more passes within the same few seconds of processing time: nothing yet, however
        // far the watermark moves.
        let (rows, _) = run_at(&mut op, &[p(1, MIDNIGHT + 20_000)], MIDNIGHT + 30_000, 1_000);
        assert!(rows.is_empty());
        let (rows, _) = run_at(&mut op, &[p(0, MIDNIGHT + 40_000)], MIDNIGHT + 600_000, EMIT_EVERY_MS - 1);
        assert!(rows.is_empty());
        // Once the period is over the vehicle is written once, with both passes.
        let (rows, _) = run_at(&mut op, &[], MIDNIGHT + 600_001, EMIT_EVERY_MS);
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].times, vec![MIDNIGHT + 1_000, MIDNIGHT + 20_000, MIDNIGHT + 40_000]);
        assert_eq!(rows[0].revision, 2);
        // A pass whose day closes before the next period is written as the day closes.
        let (rows, _) = run_at(&mut op, &[p(1, MIDNIGHT + 61_000)], MIDNIGHT + 65_000, EMIT_EVERY_MS + 1);
        assert!(rows.is_empty());
        let day_closed = MIDNIGHT + 86_400_000 + 3_600_000 + 1;
        let (rows, _) = run_at(&mut op, &[p(0, day_closed)], day_closed, EMIT_EVERY_MS + 2);
        assert_eq!(rows.len(), 1, "the closing day's vehicle, not yet the new day's");
        assert_eq!((&*rows[0].day, rows[0].revision), ("2026-03-02", 3));
        // The new day's pass is written at the end of input.
        let mut out = ResultBatch::default();
        let mut late = Vec::new();
        let mut ctx = Context {
            processing_now: EMIT_EVERY_MS + 3,
            ..support::context(day_closed, 3_600_000, &mut out, &mut late)
        };
        op.on_close(&mut ctx);
        assert_eq!(out.trajectories.len(), 1);
        assert_eq!((&*out.trajectories[0].day, out.trajectories[0].revision), ("2026-03-03", 0));
    }
}
