//! The content digest of a pass: FNV-1a, 64 bit, over its fields' bytes. It is kept in the
//! deduplication state across restarts and upgrades, so its value never changes; only how fast
//! it is computed may.
//!
//! Each FNV-1a step multiplies the last step's result: one pass's digest waits on one
//! multiplication per byte. [`fill_digests`] therefore lays out the bytes of four passes and
//! runs their four chains side by side, as long as all four have bytes.

use super::text::INLINE;
use super::{PassOf, Text};

const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
const PRIME: u64 = 0x0000_0100_0000_01b3;

/// Passes digested side by side.
const LANES: usize = 4;

/// Room for a pass's digested bytes on the stack: six texts of up to 128 bytes (the longest
/// id or code accepted) with their ends, the codes, time and speed, and a whole inline buffer
/// written past the last text. A pass that needs more is laid out on the heap.
const ROOM: usize = 1024;

/// Bytes after the texts: plate colour, direction, lane, time (8) and speed (4).
const TAIL: usize = 15;

#[inline(always)]
fn step(h: u64, byte: u8) -> u64 {
    (h ^ u64::from(byte)).wrapping_mul(PRIME)
}

/// FNV-1a, 64 bit, of some bytes: a digest that never changes between builds (it is stored).
pub fn fnv1a64(bytes: &[u8]) -> u64 {
    bytes.iter().fold(OFFSET, |h, b| step(h, *b))
}

/// A text the digest reads, and its inline buffer when it has one.
struct Part<'a>(&'a [u8], Option<&'a [u8; INLINE]>);

impl<'a> Part<'a> {
    fn text(text: &'a Text) -> Part<'a> {
        Part(text.as_bytes(), text.inline_buffer())
    }

    fn optional(text: &'a Option<Text>) -> Part<'a> {
        text.as_ref().map_or(Part(b"", None), Part::text)
    }
}

/// The texts of `pass` in the order digested; `checkpoint` is its checkpoint's id.
fn parts<'a, C>(pass: &'a PassOf<C>, checkpoint: &'a [u8]) -> [Part<'a>; 6] {
    [
        Part::text(&pass.pass_id),
        match pass.plate.plate() {
            Some(plate) => Part::text(plate.text()),
            None => Part(pass.plate.as_bytes(), None),
        },
        Part::text(&pass.plate_type),
        Part(checkpoint, None),
        Part::optional(&pass.device_id),
        Part::optional(&pass.vehicle_type),
    ]
}

/// How many bytes the digest reads of a pass whose texts are `parts`.
fn digested_len(parts: &[Part<'_>; 6]) -> usize {
    parts.iter().map(|p| p.0.len() + 1).sum::<usize>() + TAIL
}

/// Lays out the bytes the digest reads in `out` and gives their length: each text followed by
/// 0xff (which no UTF-8 text holds), then the plate colour, direction and lane, the time and
/// the speed (`u32::MAX` for none), in native byte order. `out` holds at least
/// [`digested_len`] + [`INLINE`] bytes: an inline text is copied as its whole buffer, and what
/// follows overwrites its zeros.
fn lay_out<C>(pass: &PassOf<C>, parts: &[Part<'_>; 6], out: &mut [u8]) -> usize {
    let mut at = 0;
    for Part(bytes, inline) in parts {
        match inline {
            Some(buffer) => out[at..at + INLINE].copy_from_slice(*buffer),
            None => out[at..at + bytes.len()].copy_from_slice(bytes),
        }
        at += bytes.len();
        out[at] = 0xff;
        at += 1;
    }
    let mut tail = [0; TAIL];
    tail[..3].copy_from_slice(&[pass.plate_color.code(), pass.direction.code(), pass.lane]);
    tail[3..11].copy_from_slice(&pass.ts.ms().to_ne_bytes());
    tail[11..].copy_from_slice(&pass.speed_kmh.map_or(u32::MAX, f32::to_bits).to_ne_bytes());
    out[at..at + TAIL].copy_from_slice(&tail);
    at + TAIL
}

/// The content digest of `pass`, whose checkpoint's id is `checkpoint`.
pub(super) fn digest<C>(pass: &PassOf<C>, checkpoint: &[u8]) -> u64 {
    let parts = parts(pass, checkpoint);
    let mut room = [0; ROOM];
    let mut heap = Vec::new();
    let out = match digested_len(&parts) + INLINE {
        need if need <= ROOM => &mut room[..],
        need => {
            heap.resize(need, 0);
            &mut heap[..]
        }
    };
    let len = lay_out(pass, &parts, out);
    fnv1a64(&out[..len])
}

/// FNV-1a of four byte strings at once: the four chains step together over the bytes all of
/// them have, then each ends alone.
fn fnv1a64_lanes(inputs: [&[u8]; LANES]) -> [u64; LANES] {
    let common = inputs.iter().map(|i| i.len()).min().unwrap_or(0);
    let [a, b, c, d] = inputs.map(|i| &i[..common]);
    let mut h = [OFFSET; LANES];
    for (((a, b), c), d) in a.iter().zip(b).zip(c).zip(d) {
        h = [step(h[0], *a), step(h[1], *b), step(h[2], *c), step(h[3], *d)];
    }
    for (h, input) in h.iter_mut().zip(inputs) {
        *h = input[common..].iter().fold(*h, |h, b| step(h, *b));
    }
    h
}

/// [`fnv1a64`] of each of `inputs`, in order, four side by side.
pub fn fnv1a64_each<'a>(inputs: impl IntoIterator<Item = &'a [u8]>) -> Vec<u64> {
    let mut inputs = inputs.into_iter();
    let mut out = Vec::with_capacity(inputs.size_hint().0);
    loop {
        match std::array::from_fn::<_, LANES, _>(|_| inputs.next()) {
            [Some(a), Some(b), Some(c), Some(d)] => out.extend(fnv1a64_lanes([a, b, c, d])),
            rest => {
                out.extend(rest.into_iter().flatten().map(fnv1a64));
                return out;
            }
        }
    }
}

/// Sets the digest of every `(pass, digest)` of `passes`, as [`digest`] gives it;
/// `checkpoint(c)` is the id of the checkpoint known as `c`. Four passes at a time.
pub fn fill_digests<'a, C: 'a, I: AsRef<[u8]>>(
    passes: impl IntoIterator<Item = &'a mut (PassOf<C>, u64)>,
    checkpoint: impl Fn(&C) -> I,
) {
    let mut passes = passes.into_iter();
    let mut rooms = [[0u8; ROOM]; LANES];
    loop {
        let group: [Option<&mut (PassOf<C>, u64)>; LANES] = std::array::from_fn(|_| passes.next());
        if group[0].is_none() {
            return;
        }
        let ids: [Option<I>; LANES] =
            std::array::from_fn(|l| group[l].as_ref().map(|(p, _)| checkpoint(&p.checkpoint)));
        let mut lens = [None; LANES];
        for ((len, (entry, id)), room) in lens.iter_mut().zip(group.iter().zip(&ids)).zip(rooms.iter_mut()) {
            if let (Some((pass, _)), Some(id)) = (entry, id) {
                let parts = parts(pass, id.as_ref());
                if digested_len(&parts) + INLINE <= ROOM {
                    *len = Some(lay_out(pass, &parts, room));
                }
            }
        }
        if let [Some(a), Some(b), Some(c), Some(d)] = lens {
            let inputs = [&rooms[0][..a], &rooms[1][..b], &rooms[2][..c], &rooms[3][..d]];
            for (entry, h) in group.into_iter().zip(fnv1a64_lanes(inputs)) {
                entry.expect("a full group").1 = h;
            }
            continue;
        }
        // The last passes, or a group with one too long for the stack: each on its own.
        for (entry, id) in group.into_iter().zip(ids) {
            if let (Some((pass, h)), Some(id)) = (entry, id) {
                *h = digest(pass, id.as_ref());
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::{decode_record, PassRecord, PlateColorScheme};

    /// Records whose texts run from empty to longer than an inline buffer (and, made by hand,
    /// longer than the stack's room), with and without the optional fields.
    fn records() -> Vec<PassRecord> {
        let mut records: Vec<PassRecord> = (0..40)
            .map(|i| {
                let plate = ["赣A12345", "-", "粤B1234学", "京AD12345"][i % 4];
                let mut v = serde_json::json!({
                    "pass_id": "p".repeat(1 + i % 30), "plate": plate,
                    "plate_color": 2, "plate_type": "0".repeat(1 + i % 3), "checkpoint_id": format!("KK{i:04}"),
                    "direction": 1 + i % 4, "lane": 1 + i % 4, "ts": 1_772_409_600_000i64 + i as i64 * 977,
                });
                if i % 3 != 0 {
                    v["device_id"] = format!("device-{}", "d".repeat(i % 25)).into();
                    v["speed_kmh"] = (i as f64 * 3.5).into();
                }
                if i % 2 == 0 {
                    v["vehicle_type"] = "K33".into();
                }
                decode_record(v.to_string().as_bytes(), chrono_tz::Asia::Shanghai, PlateColorScheme::Police)
                    .expect("a valid record")
            })
            .collect();
        let mut long = records[5].clone();
        long.vehicle_type = Some(Text::new(&"v".repeat(ROOM)));
        records.insert(17, long);
        records
    }

    #[test]
    fn digests_four_at_a_time_equal_each_alone_in_groups_of_every_size() {
        let records = records();
        let alone: Vec<u64> = records.iter().map(PassRecord::content_digest).collect();
        assert_eq!(alone.iter().collect::<std::collections::BTreeSet<_>>().len(), alone.len(), "distinct records");
        for n in 0..records.len() {
            let mut entries: Vec<(PassRecord, u64)> = records[..n].iter().map(|r| (r.clone(), 0)).collect();
            fill_digests(&mut entries, |checkpoint: &Text| checkpoint.as_bytes().to_vec());
            let filled: Vec<u64> = entries.iter().map(|(_, d)| *d).collect();
            assert_eq!(filled, alone[..n], "{n} records");
        }
    }

    #[test]
    fn lanes_equal_one_chain_each_whatever_their_lengths() {
        let inputs: [&[u8]; LANES] = [b"", b"a pass", b"a longer pass id", b"\xff\x00\x7f"];
        assert_eq!(fnv1a64_lanes(inputs), inputs.map(fnv1a64));
        assert_eq!(fnv1a64(b""), OFFSET);
        assert_eq!(fnv1a64(b"a"), 0xaf63_dc4c_8601_ec8c, "the published FNV-1a 64 of \"a\"");
        let ids: Vec<String> = (0..11).map(|i| "x".repeat(i * 3)).collect();
        for n in 0..ids.len() {
            let each = fnv1a64_each(ids[..n].iter().map(|id| id.as_bytes()));
            assert_eq!(each, ids[..n].iter().map(|id| fnv1a64(id.as_bytes())).collect::<Vec<_>>(), "{n} ids");
        }
    }
}
