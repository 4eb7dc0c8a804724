//! The domain model: what a vehicle pass is, parsed once at the boundary.
//!
//! Raw JSON becomes a [`PassRecord`] (decoding: field names, aliases, time formats, codes); a
//! record checked against the city's reference data and the clock becomes a [`Pass`]
//! (validation, in `crate::ingest`). Pipelines only ever see `Pass`: plates are [`Plate`]s,
//! vehicles are [`VehicleKey`]s, times are [`EventTime`]s. Every record that cannot become a
//! `Pass` carries a [`RejectReason`].

mod codes;
mod decode;
mod digest;
mod plate;
mod reject;
mod scan;
mod text;
mod time;

pub use codes::{Direction, PlateColor, PlateColorScheme};
pub use decode::{decode_record, PassOf, PassRecord};
pub use digest::{fill_digests, fnv1a64, fnv1a64_each};
pub use plate::{Plate, PlateKind, PlateRead, VehicleKey, VehicleRef, PROVINCES};
pub use reject::RejectReason;
pub use text::Text;
pub use time::{parse_event_time, EventTime, DAY_MS, MIN_VALID_TS_MS};

/// A checkpoint, by its position in the city's checkpoint table (resolved during validation).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct CheckpointIdx(pub u32);

/// A valid vehicle pass as the pipelines see it: its checkpoint resolved.
pub type Pass = PassOf<CheckpointIdx>;

impl Pass {
    /// The vehicle this pass belongs to; `None` when the plate was unreadable.
    pub fn vehicle(&self) -> Option<VehicleKey> {
        match &self.plate {
            PlateRead::Readable(plate) => Some(VehicleKey::new(plate.clone(), self.plate_color)),
            PlateRead::Unreadable => None,
        }
    }

    /// The vehicle this pass belongs to, borrowed; `None` when the plate was unreadable.
    pub fn vehicle_ref(&self) -> Option<VehicleRef<'_>> {
        Some((self.plate.plate()?, self.plate_color))
    }
}

/// A stable id for something derived from `parts` (pass ids, keys, window starts): `kind`, a
/// dash, and the first 16 bytes of SHA-256 over the length-prefixed parts in hex. Replays
/// derive the same id, so sinks and webhook receivers can use it as an idempotency key.
pub fn stable_id(kind: &str, parts: &[&[u8]]) -> String {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update(kind.as_bytes());
    for p in parts {
        h.update((p.len() as u64).to_be_bytes());
        h.update(p);
    }
    let digest = h.finalize();
    let mut id = String::with_capacity(kind.len() + 33);
    id.push_str(kind);
    id.push('-');
    for b in &digest[..16] {
        id.push_str(&format!("{b:02x}"));
    }
    id
}
