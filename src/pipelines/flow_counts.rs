//! Flow counts: the number of distinct valid passes per level, key and window.
//!
//! Levels: `checkpoint` (checkpoint id), `checkpoint_direction` (`id:direction`), `region`,
//! `city` (`all`), `boundary` (`in` / `out` at boundary checkpoints), `bus_lane` (checkpoint id,
//! passes in a bus lane). Windows: 30 s, 1 min, 5 min, epoch-aligned. Each key is a slot in a
//! dense array, so a pass costs a handful of increments.

use crate::core::window::{is_complete, is_late, tumbling_start};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::City;
use crate::results::FlowCountRow;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const FLOW_WINDOWS_S: [u32; 3] = [30, 60, 300];
const LATE_LABELS: [&str; 3] = ["flow_counts/30s", "flow_counts/1m", "flow_counts/5m"];
const STATE_VERSION: u32 = 1;

/// Slot layout: checkpoints, then 8 directions per checkpoint, regions, the city, boundary in
/// and out, then bus lanes per checkpoint.
struct KeySpace {
    keys: Vec<(&'static str, Arc<str>)>,
    /// Per checkpoint: its region slot and its bus lanes.
    region_slot: Vec<u32>,
    bus_lanes: Vec<Vec<u8>>,
    boundary: Vec<Option<u8>>,
    n: u32,
    city_slot: u32,
}

impl KeySpace {
    fn new(city: &City) -> KeySpace {
        let n = city.checkpoints.len() as u32;
        let mut keys: Vec<(&'static str, Arc<str>)> =
            city.checkpoints.iter().map(|c| ("checkpoint", c.id.clone())).collect();
        for c in &city.checkpoints {
            keys.extend((1..=8).map(|d| ("checkpoint_direction", Arc::from(format!("{}:{d}", c.id)))));
        }
        keys.extend(city.regions.iter().map(|r| ("region", r.id.clone())));
        let city_slot = keys.len() as u32;
        keys.push(("city", "all".into()));
        keys.push(("boundary", "in".into()));
        keys.push(("boundary", "out".into()));
        keys.extend(city.checkpoints.iter().map(|c| ("bus_lane", c.id.clone())));
        let region_slot = city
            .checkpoints
            .iter()
            .map(|c| 9 * n + city.regions.iter().position(|r| r.id == c.region_id).unwrap_or(0) as u32)
            .collect();
        KeySpace {
            keys,
            region_slot,
            bus_lanes: city.checkpoints.iter().map(|c| c.bus_lanes.clone()).collect(),
            boundary: city
                .checkpoints
                .iter()
                .map(|c| if c.boundary { c.inbound_direction.map(|d| d.code()) } else { None })
                .collect(),
            n,
            city_slot,
        }
    }

    /// The slots a pass counts in (at most six).
    fn slots(&self, pass: &Pass, out: &mut [u32; 6]) -> usize {
        let cp = pass.checkpoint.0;
        let i = cp as usize;
        out[0] = cp;
        out[1] = self.n + cp * 8 + u32::from(pass.direction.code() - 1);
        out[2] = self.region_slot[i];
        out[3] = self.city_slot;
        let mut k = 4;
        if let Some(inbound) = self.boundary[i] {
            out[k] = self.city_slot + if pass.direction.code() == inbound { 1 } else { 2 };
            k += 1;
        }
        if self.bus_lanes[i].contains(&pass.lane) {
            out[k] = self.city_slot + 3 + cp;
            k += 1;
        }
        k
    }
}

/// One window's counts. A row's `revision` is the number of passes it reflects beyond the
/// first (count − 1): it grows with every correction, and, unlike a count of emissions, it
/// does not depend on how the input was batched, so a re-emission after a restart never loses
/// to a stale row in the store.
#[derive(Clone, Debug, Default)]
struct Window {
    counts: Vec<u32>,
    /// Slots changed since the window was last emitted.
    dirty: Vec<u32>,
    /// Which slots `dirty` holds, by slot (empty until the window's first correction).
    marked: Vec<bool>,
    emitted: bool,
}

impl Window {
    /// Notes a change to `slot` of a window already emitted.
    fn mark(&mut self, slot: u32) {
        if self.marked.is_empty() {
            self.marked = vec![false; self.counts.len()];
            for d in &self.dirty {
                self.marked[*d as usize] = true;
            }
        }
        if !std::mem::replace(&mut self.marked[slot as usize], true) {
            self.dirty.push(slot);
        }
    }
}

#[derive(Clone, Debug, Default)]
struct WindowSet {
    size_ms: i64,
    open: BTreeMap<i64, Window>,
}

/// A window as stored in a snapshot: only the slots that counted something.
#[derive(Serialize, Deserialize)]
struct StoredWindow {
    start: i64,
    emitted: bool,
    /// (slot, count)
    slots: Vec<(u32, u32)>,
    dirty: Vec<u32>,
}

impl StoredWindow {
    fn from_window(start: i64, w: &Window) -> StoredWindow {
        let slots = (0..w.counts.len()).filter(|s| w.counts[*s] > 0).map(|s| (s as u32, w.counts[s])).collect();
        StoredWindow { start, emitted: w.emitted, slots, dirty: w.dirty.clone() }
    }

    fn into_window(self, width: usize) -> anyhow::Result<(i64, Window)> {
        let mut w = Window { counts: vec![0; width], dirty: self.dirty, marked: Vec::new(), emitted: self.emitted };
        for (slot, count) in self.slots {
            let s = slot as usize;
            anyhow::ensure!(
                s < width,
                "flow_counts state names slot {s} of {width}: the city changed since the snapshot"
            );
            w.counts[s] = count;
        }
        Ok((self.start, w))
    }
}

pub struct FlowCounts {
    keys: KeySpace,
    sets: Vec<WindowSet>,
}

impl FlowCounts {
    pub fn new(city: &Arc<City>) -> FlowCounts {
        let sets =
            FLOW_WINDOWS_S.iter().map(|s| WindowSet { size_ms: i64::from(*s) * 1000, open: BTreeMap::new() }).collect();
        FlowCounts { keys: KeySpace::new(city), sets }
    }

    fn emit(&self, size_ms: i64, start: i64, w: &mut Window, out: &mut Vec<FlowCountRow>) {
        let window_s = (size_ms / 1000) as u32;
        // Room made for every row at once (grown as they come, the list is copied each time
        // it doubles).
        out.reserve(if w.emitted { w.dirty.len() } else { w.counts.iter().filter(|n| **n > 0).count() });
        let mut row = |slot: u32, w: &mut Window| {
            let s = slot as usize;
            let (level, key_id) = &self.keys.keys[s];
            out.push(FlowCountRow {
                level,
                key_id: key_id.clone(),
                window_s,
                window_start: start,
                passes: u64::from(w.counts[s]),
                revision: w.counts[s].saturating_sub(1),
            });
        };
        if !w.emitted {
            for slot in 0..w.counts.len() as u32 {
                if w.counts[slot as usize] > 0 {
                    row(slot, w);
                }
            }
            w.emitted = true;
        } else {
            for slot in std::mem::take(&mut w.dirty) {
                row(slot, w);
            }
        }
        w.dirty.clear();
        w.marked.fill(false);
    }
}

impl Operator for FlowCounts {
    fn name(&self) -> &'static str {
        "flow_counts"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let width = self.keys.keys.len();
        let mut slots = [0u32; 6];
        for (set_idx, set) in self.sets.iter_mut().enumerate() {
            let mut current: Option<(i64, &mut Window)> = None;
            for (i, pass) in passes.iter().enumerate() {
                // The current window's start, without a division, when the pass is in it.
                let start = match &current {
                    Some((s, _)) if (*s..s + set.size_ms).contains(&pass.ts.ms()) => *s,
                    _ => tumbling_start(pass.ts.ms(), set.size_ms),
                };
                if is_late(start + set.size_ms, ctx.watermark, ctx.allowed_lateness_ms) {
                    ctx.late.push((i, LATE_LABELS[set_idx]));
                    continue;
                }
                let w = match current.take() {
                    Some((s, w)) if s == start => w,
                    _ => {
                        set.open.entry(start).or_insert_with(|| Window { counts: vec![0; width], ..Window::default() })
                    }
                };
                let n = self.keys.slots(pass, &mut slots);
                for &slot in &slots[..n] {
                    let s = slot as usize;
                    if w.emitted {
                        w.mark(slot);
                    }
                    w.counts[s] += 1;
                }
                current = Some((start, w));
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let mut sets = std::mem::take(&mut self.sets);
        for set in &mut sets {
            let mut finished = Vec::new();
            for (&start, w) in set.open.iter_mut() {
                let end = start + set.size_ms;
                if !is_complete(end, ctx.watermark) {
                    break;
                }
                if !w.emitted || !w.dirty.is_empty() {
                    self.emit(set.size_ms, start, w, &mut ctx.out.flow_counts);
                }
                if is_late(end, ctx.watermark, ctx.allowed_lateness_ms) {
                    finished.push(start);
                }
            }
            for start in finished {
                set.open.remove(&start);
            }
        }
        self.sets = sets;
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let sets: Vec<Vec<StoredWindow>> = self
            .sets
            .iter()
            .map(|set| set.open.iter().map(|(start, w)| StoredWindow::from_window(*start, w)).collect())
            .collect();
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&sets)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let stored: Vec<Vec<StoredWindow>> = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(
            stored.len() == self.sets.len(),
            "flow_counts state has {} window sizes, expected {}",
            stored.len(),
            self.sets.len()
        );
        let width = self.keys.keys.len();
        for (set, windows) in self.sets.iter_mut().zip(stored) {
            set.open = windows.into_iter().map(|w| w.into_window(width)).collect::<anyhow::Result<_>>()?;
        }
        Ok(())
    }
}

#[cfg(test)]
#[path = "flow_counts_tests.rs"]
mod tests;

/// The batch computation the streaming result must equal: every distinct pass counted in every
/// window it falls in, written independently of the operator (string keys, no slots).
pub fn batch_flow_counts(city: &City, passes: &[Pass]) -> BTreeMap<(String, String, u32, i64), u64> {
    let mut out = BTreeMap::new();
    for pass in passes {
        let cp = city.checkpoint(pass.checkpoint);
        let mut keys = vec![
            ("checkpoint", cp.id.to_string()),
            ("checkpoint_direction", format!("{}:{}", cp.id, pass.direction.code())),
            ("region", cp.region_id.to_string()),
            ("city", "all".to_owned()),
        ];
        if let Some(inbound) = city.is_inbound(pass.checkpoint, pass.direction) {
            keys.push(("boundary", if inbound { "in" } else { "out" }.to_owned()));
        }
        if cp.bus_lanes.contains(&pass.lane) {
            keys.push(("bus_lane", cp.id.to_string()));
        }
        for window_s in FLOW_WINDOWS_S {
            let start = tumbling_start(pass.ts.ms(), i64::from(window_s) * 1000);
            for (level, key) in &keys {
                *out.entry((level.to_string(), key.clone(), window_s, start)).or_insert(0) += 1;
            }
        }
    }
    out
}
