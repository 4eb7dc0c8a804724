//! Origin of the vehicles on the road (归属地): per region and 5 min window, the number of
//! distinct vehicles by plate origin (province and city from the plate-prefix table), with the
//! scope `local` (the city's own prefixes), `province` (the rest of its province) or `other`.
//! Counts are exact: each window keeps the set of vehicles it has seen, and windows are dropped
//! once the allowed lateness has passed them.

use crate::core::vehicle_hash;
use crate::core::window::{is_complete, is_late, tumbling_start, window_runs};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::{Pass, Text, VehicleKey, VehicleRef};
use crate::reference::{City, OriginScope};
use crate::results::OriginCountRow;
use hashbrown::hash_table::Entry;
use hashbrown::HashTable;
use rustc_hash::{FxHashMap, FxHashSet};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const ORIGIN_WINDOW_S: u32 = 300;
const WINDOW_MS: i64 = ORIGIN_WINDOW_S as i64 * 1000;
const LATE_LABEL: &str = "origin_counts/5m";
const STATE_VERSION: u32 = 1;
/// Origin of plates whose prefix the table does not know.
const UNKNOWN: &str = "未知";

/// Where a plate comes from.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct PlateOrigin {
    pub province: Arc<str>,
    pub city: Arc<str>,
    pub scope: &'static str,
}

/// The origin of a plate: its prefix looked up in the city's table; a prefix the table lacks
/// keeps its province (when the table knows the province) and an unknown city. The scope
/// follows the origin: `local` for the city of the local prefixes (whichever of its letters the
/// plate has), `province` for the rest of that province, `other` beyond.
pub fn plate_origin(city: &City, local_prefixes: &[String], plate: &crate::model::Plate) -> PlateOrigin {
    let table = &city.prefixes;
    let (province, origin_city): (Arc<str>, Arc<str>) = match plate.prefix() {
        None => (UNKNOWN.into(), UNKNOWN.into()),
        Some(prefix) => match table.origin(prefix) {
            Some(o) => (o.province.clone(), o.city.clone()),
            None => {
                let head = format!("{}A", plate.province().unwrap_or('?'));
                (table.origin(&head).map_or_else(|| UNKNOWN.into(), |o| o.province.clone()), UNKNOWN.into())
            }
        },
    };
    let locals: Vec<&crate::reference::Origin> = local_prefixes.iter().filter_map(|p| table.origin(p)).collect();
    let scope = if locals.iter().any(|o| o.province == province && o.city == origin_city) {
        OriginScope::Local
    } else if locals.iter().any(|o| o.province == province) {
        OriginScope::Province
    } else {
        OriginScope::Other
    };
    PlateOrigin { province, city: origin_city, scope: scope.as_str() }
}

#[derive(Default)]
struct Window {
    /// The vehicles seen, each with its region, by [`seen_hash`]: looked up by reference, a
    /// vehicle's key is only copied when it is new to the window.
    seen: HashTable<(u32, VehicleKey)>,
    /// Distinct vehicles per (region, origin).
    counts: FxHashMap<(u32, u32), u32>,
    dirty: FxHashSet<(u32, u32)>,
    emitted: bool,
}

/// The hash of a vehicle seen in a region: the vehicle's, its strong high bits folded into the
/// low ones that place it in a table.
fn seen_hash(region: u32, vehicle: VehicleRef<'_>) -> u64 {
    let h = vehicle_hash(vehicle) ^ u64::from(region).wrapping_mul(0x9e37_79b9_7f4a_7c15);
    h ^ (h >> 29)
}

pub struct OriginCounts {
    city: Arc<City>,
    local_prefixes: Vec<String>,
    /// Region index of each checkpoint.
    region_of: Vec<u32>,
    origins: Vec<PlateOrigin>,
    origin_ids: FxHashMap<PlateOrigin, u32>,
    /// Origin index by plate prefix (or the plate itself when it has none), looked up by
    /// `Text` (inline buffers compared, no call to compare slices).
    by_prefix: FxHashMap<Text, u32>,
    /// Origin index by a plate's first four bytes, when they are a province's character and a
    /// letter (almost every plate): the prefix is then those bytes, found without reading
    /// the plate's characters or making a `Text` of them.
    by_head: FxHashMap<u32, u32>,
    windows: BTreeMap<i64, Window>,
    /// The most vehicles an open window has seen (or the last one closed): a new window's room.
    windows_len: usize,
}

impl OriginCounts {
    pub fn new(city: &Arc<City>, local_prefixes: &[String]) -> OriginCounts {
        let region_of = city
            .checkpoints
            .iter()
            .map(|c| city.regions.iter().position(|r| r.id == c.region_id).unwrap_or(0) as u32)
            .collect();
        OriginCounts {
            city: city.clone(),
            local_prefixes: local_prefixes.to_vec(),
            region_of,
            origins: Vec::new(),
            origin_ids: FxHashMap::default(),
            by_prefix: FxHashMap::default(),
            by_head: FxHashMap::default(),
            windows: BTreeMap::new(),
            windows_len: 0,
        }
    }

    fn origin_id(&mut self, plate: &crate::model::Plate) -> u32 {
        // A province's character takes three bytes and the letter one.
        let head = plate.text().as_bytes().get(..4).map(|b| u32::from_le_bytes(b.try_into().expect("four bytes")));
        if let Some(id) = head.and_then(|head| self.by_head.get(&head)) {
            return *id;
        }
        let id = self.origin_id_of_prefix(plate);
        if let Some(head) = head.filter(|_| plate.prefix().is_some_and(|p| p.len() == 4)) {
            self.by_head.insert(head, id);
        }
        id
    }

    fn origin_id_of_prefix(&mut self, plate: &crate::model::Plate) -> u32 {
        let key = Text::new(plate.prefix().unwrap_or(plate.as_str()));
        if let Some(id) = self.by_prefix.get(&key) {
            return *id;
        }
        let origin = plate_origin(&self.city, &self.local_prefixes, plate);
        let next = self.origins.len() as u32;
        let id = *self.origin_ids.entry(origin.clone()).or_insert(next);
        if id == next {
            self.origins.push(origin);
        }
        self.by_prefix.insert(key, id);
        id
    }

    /// The window that starts at `start`, taken out of the open ones while passes are counted
    /// in it; a new one is as large as the largest open one (a set grown from nothing rehashes
    /// each time it doubles).
    fn take_window(&mut self, start: i64) -> Window {
        self.windows
            .remove(&start)
            .unwrap_or_else(|| Window { seen: HashTable::with_capacity(self.windows_len.max(1)), ..Window::default() })
    }

    fn put_window(&mut self, start: i64, w: Window) {
        self.windows_len = self.windows_len.max(w.seen.len());
        self.windows.insert(start, w);
    }

    fn count(&mut self, w: &mut Window, region: u32, (plate, color): VehicleRef<'_>) {
        let hash = seen_hash(region, (plate, color));
        let same = |(r, v): &(u32, VehicleKey)| *r == region && v.color == color && v.plate == *plate;
        let Entry::Vacant(vacant) = w.seen.entry(hash, same, |(r, v)| seen_hash(*r, (&v.plate, v.color))) else {
            // A vehicle seen before in the window needs no origin.
            return;
        };
        vacant.insert((region, VehicleKey::new(plate.clone(), color)));
        let origin = self.origin_id(plate);
        *w.counts.entry((region, origin)).or_default() += 1;
        if w.emitted {
            w.dirty.insert((region, origin));
        }
    }

    fn rows(&self, start: i64, keys: impl Iterator<Item = (u32, u32)>, w: &Window, out: &mut Vec<OriginCountRow>) {
        for (region, origin) in keys {
            let n = w.counts.get(&(region, origin)).copied().unwrap_or(0);
            let o = &self.origins[origin as usize];
            out.push(OriginCountRow {
                region_id: self.city.regions[region as usize].id.clone(),
                window_s: ORIGIN_WINDOW_S,
                window_start: start,
                origin_province: o.province.clone(),
                origin_city: o.city.clone(),
                scope: o.scope,
                vehicles: u64::from(n),
                // Distinct vehicles only grow: the count orders corrections, however batched.
                revision: n.saturating_sub(1),
            });
        }
    }
}

impl Operator for OriginCounts {
    fn name(&self) -> &'static str {
        "origin_counts"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        for (at, start, run) in window_runs(passes, WINDOW_MS) {
            let vehicles = run.iter().enumerate().filter_map(|(j, p)| Some((at + j, p.checkpoint.0, p.vehicle_ref()?)));
            if is_late(start + WINDOW_MS, ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.extend(vehicles.map(|(i, _, _)| (i, LATE_LABEL)));
                continue;
            }
            let mut vehicles = vehicles.peekable();
            if vehicles.peek().is_none() {
                continue;
            }
            let mut w = self.take_window(start);
            for (_, checkpoint, vehicle) in vehicles {
                self.count(&mut w, self.region_of[checkpoint as usize], vehicle);
            }
            self.put_window(start, w);
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let mut windows = std::mem::take(&mut self.windows);
        let mut finished = Vec::new();
        for (&start, w) in windows.iter_mut() {
            if !is_complete(start + WINDOW_MS, ctx.watermark) {
                break;
            }
            if !w.emitted {
                let mut keys: Vec<(u32, u32)> = w.counts.keys().copied().collect();
                keys.sort_unstable();
                self.rows(start, keys.into_iter(), w, &mut ctx.out.origin_counts);
                w.emitted = true;
            } else if !w.dirty.is_empty() {
                let dirty = std::mem::take(&mut w.dirty);
                self.rows(start, dirty.into_iter(), w, &mut ctx.out.origin_counts);
            }
            if is_late(start + WINDOW_MS, ctx.watermark, ctx.allowed_lateness_ms) {
                finished.push(start);
            }
        }
        for start in finished {
            windows.remove(&start);
        }
        self.windows_len = windows.values().map(|w| w.seen.len()).max().unwrap_or(self.windows_len);
        self.windows = windows;
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let stored: Vec<StoredWindow> = self
            .windows
            .iter()
            .map(|(start, w)| StoredWindow {
                start: *start,
                emitted: w.emitted,
                seen: w.seen.iter().map(|(r, v)| (*r, v.plate.as_str().to_owned(), v.color.code())).collect(),
                dirty: w.dirty.iter().copied().map(|(r, o)| (r, self.origins[o as usize].clone().into())).collect(),
            })
            .collect();
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&stored)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let stored: Vec<StoredWindow> = serde_json::from_slice(&blob.bytes)?;
        self.windows.clear();
        for s in stored {
            anyhow::ensure!(
                s.seen.iter().all(|(r, _, _)| (*r as usize) < self.city.regions.len()),
                "origin_counts state names a region this city does not have"
            );
            let mut w = self.take_window(s.start);
            for (region, plate, color) in s.seen {
                let Some(vehicle) = VehicleKey::from_stored(&plate, color) else { continue };
                self.count(&mut w, region, (&vehicle.plate, vehicle.color));
            }
            self.put_window(s.start, w);
            let dirty: FxHashSet<(u32, u32)> = s
                .dirty
                .into_iter()
                .filter_map(|(r, o)| self.origin_ids.get(&PlateOrigin::from(o)).map(|id| (r, *id)))
                .collect();
            let w = self.windows.entry(s.start).or_default();
            w.emitted = s.emitted;
            w.dirty = dirty;
        }
        Ok(())
    }
}

#[derive(Serialize, Deserialize)]
struct StoredOrigin {
    province: String,
    city: String,
    scope: String,
}

impl From<PlateOrigin> for StoredOrigin {
    fn from(o: PlateOrigin) -> Self {
        StoredOrigin { province: o.province.to_string(), city: o.city.to_string(), scope: o.scope.to_owned() }
    }
}

impl From<StoredOrigin> for PlateOrigin {
    fn from(o: StoredOrigin) -> Self {
        let scope = [OriginScope::Local, OriginScope::Province, OriginScope::Other]
            .into_iter()
            .map(OriginScope::as_str)
            .find(|s| *s == o.scope)
            .unwrap_or("other");
        PlateOrigin { province: o.province.into(), city: o.city.into(), scope }
    }
}

#[derive(Serialize, Deserialize)]
struct StoredWindow {
    start: i64,
    emitted: bool,
    seen: Vec<(u32, String, u8)>,
    dirty: Vec<(u32, StoredOrigin)>,
}

/// The batch computation: distinct vehicles per region, 5 min window and origin.
pub fn batch_origin_counts(
    city: &City,
    local_prefixes: &[String],
    passes: &[Pass],
) -> BTreeMap<(String, i64, String, String, String), u64> {
    let mut seen = FxHashSet::default();
    let mut out = BTreeMap::new();
    for pass in passes {
        let Some(vehicle) = pass.vehicle() else { continue };
        let region = city.checkpoint(pass.checkpoint).region_id.to_string();
        let start = tumbling_start(pass.ts.ms(), WINDOW_MS);
        let origin = plate_origin(city, local_prefixes, &vehicle.plate);
        if seen.insert((region.clone(), start, vehicle)) {
            *out.entry((
                region,
                start,
                origin.province.to_string(),
                origin.city.to_string(),
                origin.scope.to_owned(),
            ))
            .or_insert(0) += 1;
        }
    }
    out
}

#[cfg(test)]
#[path = "origin_counts_tests.rs"]
mod tests;
