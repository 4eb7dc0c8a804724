//! State keyed by vehicle, looked up a batch at a time.
//!
//! A city-day has some hundred thousand vehicles, and a pass's vehicle is rarely the last one
//! looked up: in a hash map each look-up waits on a cache miss for its slot, then another for
//! its entry. [`VehicleTable::resolve`] looks up a whole batch's vehicles with the memory of
//! the coming ones requested ahead ([`prefetch`]), so the misses overlap instead of following
//! one another, and hands back each vehicle's place in a dense array of entries; the caller
//! then works through its passes in order, prefetching the entries a few places ahead.

use crate::model::{VehicleKey, VehicleRef};
use std::hash::Hasher;

/// How many look-ups ahead a slot is requested (half as many ahead, its entry).
const AHEAD: usize = 16;

/// Asks for the cache line holding `value` to be brought in; never faults, whatever the
/// address, and does nothing where the processor has no such instruction.
#[inline(always)]
pub fn prefetch<T: ?Sized>(value: &T) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch is a hint: it reads nothing the program sees and cannot fault.
    unsafe {
        std::arch::x86_64::_mm_prefetch::<{ std::arch::x86_64::_MM_HINT_T0 }>((value as *const T).cast());
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = value;
}

/// A map from vehicle to `V`, open-addressed: `slots` hold a tag of the hash and the entry's
/// place, the entries lie one after another (in the order they were first inserted, less the
/// removed ones).
pub struct VehicleTable<V> {
    /// A power of two long, at most half full; 0 is empty, else (tag << 32) | (place + 1).
    slots: Vec<u64>,
    entries: Vec<(VehicleKey, V)>,
}

impl<V> Default for VehicleTable<V> {
    fn default() -> Self {
        VehicleTable::with_capacity(0)
    }
}

/// A vehicle's hash, from its plate's inline words (or bytes) and colour: its high bits are the
/// strong ones.
pub fn hash_of((plate, color): VehicleRef<'_>) -> u64 {
    let mut h = rustc_hash::FxHasher::default();
    // A plate held inline hashes as its three words (equal plates, equal words).
    match plate.text().inline_words() {
        Some(words) => words.iter().for_each(|w| h.write_u64(*w)),
        None => h.write(plate.text().as_bytes()),
    }
    h.write_u8(color.code());
    // FxHash's high bits are weak for short keys: mixed once more, they pick the slot.
    h.finish().wrapping_mul(0x9e37_79b9_7f4a_7c15)
}

fn tag(hash: u64) -> u64 {
    // The low half: the slot comes from the high bits, so the two are independent.
    hash & 0xffff_ffff
}

impl<V> VehicleTable<V> {
    pub fn with_capacity(vehicles: usize) -> VehicleTable<V> {
        let slots = (vehicles * 2).next_power_of_two().max(16);
        VehicleTable { slots: vec![0; slots], entries: Vec::with_capacity(vehicles) }
    }

    pub fn len(&self) -> usize {
        self.entries.len()
    }

    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    fn home(&self, hash: u64) -> usize {
        // The top bits, as many as the slots need (there are at least 16).
        (hash >> (64 - self.slots.len().trailing_zeros())) as usize
    }

    /// The slot holding `vehicle`, or the empty one where it would go.
    fn probe(&self, hash: u64, vehicle: VehicleRef<'_>) -> (usize, Option<u32>) {
        let mask = self.slots.len() - 1;
        let mut i = self.home(hash);
        loop {
            let slot = self.slots[i];
            if slot == 0 {
                return (i, None);
            }
            if slot >> 32 == tag(hash) {
                let at = (slot & 0xffff_ffff) as u32 - 1;
                let key = &self.entries[at as usize].0;
                if key.color == vehicle.1 && key.plate == *vehicle.0 {
                    return (i, Some(at));
                }
            }
            i = (i + 1) & mask;
        }
    }

    /// The place of `vehicle`'s entry.
    pub fn find(&self, vehicle: VehicleRef<'_>) -> Option<u32> {
        self.probe(hash_of(vehicle), vehicle).1
    }

    pub fn get(&self, vehicle: VehicleRef<'_>) -> Option<&V> {
        self.find(vehicle).map(|at| &self.entries[at as usize].1)
    }

    /// The place of `vehicle`'s entry, made with `make` if it has none.
    fn find_or_insert(&mut self, hash: u64, vehicle: VehicleRef<'_>, make: impl FnOnce() -> V) -> u32 {
        let (slot, found) = self.probe(hash, vehicle);
        if let Some(at) = found {
            return at;
        }
        let at = u32::try_from(self.entries.len()).expect("fewer than 4 billion vehicles");
        self.entries.push((VehicleKey::new(vehicle.0.clone(), vehicle.1), make()));
        self.slots[slot] = (tag(hash) << 32) | u64::from(at + 1);
        if self.entries.len() * 2 > self.slots.len() {
            self.rebuild(self.slots.len() * 2);
        }
        at
    }

    /// The place of `vehicle`'s entry, made with `make` if it has none.
    pub fn place_or_insert_with(&mut self, vehicle: VehicleRef<'_>, make: impl FnOnce() -> V) -> u32 {
        self.find_or_insert(hash_of(vehicle), vehicle, make)
    }

    /// Puts `value` under `vehicle`, in place of any value it had.
    pub fn insert(&mut self, vehicle: VehicleKey, value: V) {
        let held = (&vehicle.plate, vehicle.color);
        match self.find(held) {
            Some(at) => self.entries[at as usize].1 = value,
            None => {
                self.place_or_insert_with(held, || value);
            }
        }
    }

    /// The places of the entries of `vehicles`, in order, each made with `make` if it has
    /// none: a batch's look-ups with their memory requested ahead.
    pub fn resolve(&mut self, vehicles: &[VehicleRef<'_>], mut make: impl FnMut() -> V) -> Vec<u32> {
        let hashes: Vec<u64> = vehicles.iter().map(|v| hash_of(*v)).collect();
        let mut places = Vec::with_capacity(vehicles.len());
        for (i, (&hash, &vehicle)) in hashes.iter().zip(vehicles).enumerate() {
            if let Some(&ahead) = hashes.get(i + AHEAD) {
                prefetch(&self.slots[self.home(ahead)]);
            }
            if let Some(&near) = hashes.get(i + AHEAD / 2) {
                // The slot asked for before is in by now: its entry, if it is the one.
                let slot = self.slots[self.home(near)];
                if slot >> 32 == tag(near) {
                    prefetch(&self.entries[(slot & 0xffff_ffff) as usize - 1]);
                }
            }
            places.push(self.find_or_insert(hash, vehicle, &mut make));
        }
        places
    }

    /// Asks for the entry at `at` to be brought into the cache.
    pub fn prefetch(&self, at: u32) {
        if let Some(entry) = self.entries.get(at as usize) {
            prefetch(entry);
        }
    }

    /// At step `j` of a walk through `places`: asks for the entry `AHEAD` places on.
    pub fn prefetch_ahead(&self, places: &[u32], j: usize) {
        if let Some(&ahead) = places.get(j + AHEAD) {
            self.prefetch(ahead);
        }
    }

    /// [`VehicleTable::prefetch_ahead`], and asks for what `inner` finds in the entry half as
    /// far on (asked for before: a value's own heap memory, say).
    pub fn prefetch_ahead_with<T>(&self, places: &[u32], j: usize, inner: impl Fn(&V) -> Option<&T>) {
        self.prefetch_ahead(places, j);
        if let Some(held) = places.get(j + AHEAD / 2).and_then(|at| inner(self.value(*at))) {
            prefetch(held);
        }
    }

    pub fn key(&self, at: u32) -> &VehicleKey {
        &self.entries[at as usize].0
    }

    pub fn value(&self, at: u32) -> &V {
        &self.entries[at as usize].1
    }

    pub fn value_mut(&mut self, at: u32) -> &mut V {
        &mut self.entries[at as usize].1
    }

    /// Keeps the entries for which `keep` holds (their places change).
    pub fn retain(&mut self, mut keep: impl FnMut(&VehicleKey, &mut V) -> bool) {
        let before = self.entries.len();
        self.entries.retain_mut(|(k, v)| keep(k, v));
        if self.entries.len() != before {
            self.rebuild(self.slots.len());
        }
    }

    pub fn clear(&mut self) {
        self.entries.clear();
        self.slots.fill(0);
    }

    pub fn iter(&self) -> impl ExactSizeIterator<Item = (&VehicleKey, &V)> {
        self.entries.iter().map(|(k, v)| (k, v))
    }

    pub fn values(&self) -> impl ExactSizeIterator<Item = &V> {
        self.entries.iter().map(|(_, v)| v)
    }

    /// The slots again for the entries, `slots` of them.
    fn rebuild(&mut self, slots: usize) {
        self.slots.clear();
        self.slots.resize(slots, 0);
        let mask = slots - 1;
        for (at, (key, _)) in self.entries.iter().enumerate() {
            let hash = hash_of((&key.plate, key.color));
            let mut i = self.home(hash);
            while self.slots[i] != 0 {
                i = (i + 1) & mask;
            }
            self.slots[i] = (tag(hash) << 32) | (at as u64 + 1);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{PlateColor, PlateRead};
    use std::collections::HashMap;

    fn vehicle(n: u32, color: PlateColor) -> VehicleKey {
        match PlateRead::parse(&format!("赣A{n:05}")) {
            PlateRead::Readable(plate) => VehicleKey::new(plate, color),
            PlateRead::Unreadable => unreachable!("a plate of a letter and five digits reads"),
        }
    }

    #[test]
    fn a_table_agrees_with_a_hash_map_through_inserts_batches_and_removals() {
        let mut table: VehicleTable<u32> = VehicleTable::default();
        let mut model: HashMap<VehicleKey, u32> = HashMap::new();
        let colors = [PlateColor::Blue, PlateColor::Yellow];
        for round in 0..6u32 {
            // A batch with repeats within it and vehicles from earlier rounds, on both colours.
            let batch: Vec<VehicleKey> =
                (0..3000u32).map(|i| vehicle((i * 7 + round * 1000) % 5000, colors[(i % 3 == 0) as usize])).collect();
            let refs: Vec<VehicleRef<'_>> = batch.iter().map(|v| (&v.plate, v.color)).collect();
            let places = table.resolve(&refs, || 0);
            for (v, at) in batch.iter().zip(&places) {
                assert_eq!(table.key(*at), v);
                *table.value_mut(*at) += 1;
                *model.entry(v.clone()).or_default() += 1;
            }
            table.insert(vehicle(99_999, PlateColor::Green), round);
            model.insert(vehicle(99_999, PlateColor::Green), round);
            table.retain(|v, n| (v.plate.as_str().len() + *n as usize + round as usize) % 5 != 0);
            model.retain(|v, n| (v.plate.as_str().len() + *n as usize + round as usize) % 5 != 0);
            assert_eq!(table.len(), model.len(), "round {round}");
            for (v, n) in &model {
                assert_eq!(table.get((&v.plate, v.color)), Some(n), "round {round}");
            }
            let held: HashMap<VehicleKey, u32> = table.iter().map(|(k, v)| (k.clone(), *v)).collect();
            assert_eq!(held, model);
        }
        assert_eq!(table.get((&vehicle(4_999, PlateColor::White).plate, PlateColor::White)), None);
        table.clear();
        assert!(table.is_empty() && table.get((&vehicle(7, PlateColor::Blue).plate, PlateColor::Blue)).is_none());
    }

    #[test]
    fn the_same_plate_on_two_colours_is_two_vehicles() {
        let mut table = VehicleTable::default();
        let (blue, yellow) = (vehicle(1, PlateColor::Blue), vehicle(1, PlateColor::Yellow));
        for (v, first) in [(&blue, 0), (&yellow, 10), (&blue, 0)] {
            let at = table.place_or_insert_with((&v.plate, v.color), || first);
            *table.value_mut(at) += 1;
        }
        assert_eq!(table.get((&blue.plate, blue.color)), Some(&2));
        assert_eq!(table.get((&yellow.plate, yellow.color)), Some(&11));
        assert_eq!(table.len(), 2);
    }
}
