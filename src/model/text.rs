//! Short text held inline: the codes and ids of a pass (plate, plate type, device, vehicle
//! type, pass id) are a few bytes each, and every pass carries several.

use std::fmt;
use std::sync::Arc;

/// Bytes held inline (longer text goes to the heap).
pub(crate) const INLINE: usize = 22;

/// Text compared, hashed and ordered as a `str`. Up to 22 bytes it is held inline: making one
/// allocates nothing, a copy is a copy with no shared reference count for threads to contend
/// on, and a map look-up compares keys without following a pointer to another cache line.
#[derive(Clone)]
pub struct Text(Repr);

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE] },
    Heap(Arc<str>),
}

impl Text {
    pub fn new(text: &str) -> Text {
        Text(match text.len() {
            len if len <= INLINE => Repr::Inline { len: len as u8, bytes: padded(text.as_bytes()) },
            _ => Repr::Heap(text.into()),
        })
    }

    /// The bytes, unchecked: what keys compare and hash (a map look-up need not check UTF-8 on
    /// every key it meets).
    pub fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..*len as usize],
            Repr::Heap(text) => text.as_bytes(),
        }
    }

    /// The bytes followed by zeros to [`INLINE`] bytes, when they are held inline: copied as one
    /// buffer of fixed size, they move without a call to `memcpy`.
    pub(crate) fn inline_buffer(&self) -> Option<&[u8; INLINE]> {
        match &self.0 {
            Repr::Inline { bytes, .. } => Some(bytes),
            Repr::Heap(_) => None,
        }
    }

    /// [`Text::inline_buffer`] as three little-endian words (the last holds bytes 16..22):
    /// equal texts held inline have equal words, read at fixed places without a loop over
    /// their length.
    pub(crate) fn inline_words(&self) -> Option<[u64; 3]> {
        self.inline_buffer().map(|bytes| {
            let word = |at: usize| u64::from_le_bytes(bytes[at..at + 8].try_into().expect("eight bytes"));
            let tail = u64::from(u32::from_le_bytes(bytes[16..20].try_into().expect("four bytes")))
                | u64::from(u16::from_le_bytes(bytes[20..22].try_into().expect("two bytes"))) << 32;
            [word(0), word(8), tail]
        })
    }

    pub fn as_str(&self) -> &str {
        match &self.0 {
            // SAFETY: inline bytes are only ever written by `Text::new`, which copies a whole
            // `str` (cut at its end, a character boundary) and sets `len` to its length; they
            // are never changed after. Checking them again on every read cost 3-4% of a
            // replay's instructions (plates, ids and codes are read through here).
            Repr::Inline { len, bytes } => unsafe { std::str::from_utf8_unchecked(&bytes[..*len as usize]) },
            Repr::Heap(text) => text,
        }
    }
}

/// `src` (at most [`INLINE`] bytes), zero-padded. Read as at most three little-endian words
/// (overlapping loads, the bytes past its end shifted out) and written at fixed places: a copy
/// of a length known only at run time would be a call to `memcpy`, or stores at a varying
/// place that the processor cannot forward to the wider loads that move the text on, each of
/// which then waits for them to land.
#[inline]
fn padded(src: &[u8]) -> [u8; INLINE] {
    let len = src.len();
    let word = |at: usize| u64::from_le_bytes(src[at..at + 8].try_into().expect("eight bytes"));
    let half = |at: usize| u64::from(u32::from_le_bytes(src[at..at + 4].try_into().expect("four bytes")));
    // Bytes 0..8, 8..16 and 16..22.
    let (a, b, c) = match len {
        17.. => (word(0), word(8), word(len - 8) >> (8 * (24 - len))),
        9..=16 => (word(0), word(len - 8) >> (8 * (16 - len)), 0),
        8 => (word(0), 0, 0),
        4..=7 => (half(0) | (half(len - 4) >> (8 * (8 - len))) << 32, 0, 0),
        _ => (src.iter().rev().fold(0, |w, b| w << 8 | u64::from(*b)), 0, 0),
    };
    let mut bytes = [0; INLINE];
    bytes[..8].copy_from_slice(&a.to_le_bytes());
    bytes[8..16].copy_from_slice(&b.to_le_bytes());
    bytes[16..].copy_from_slice(&c.to_le_bytes()[..INLINE - 16]);
    bytes
}

impl std::ops::Deref for Text {
    type Target = str;

    fn deref(&self) -> &str {
        self.as_str()
    }
}

/// Text hashes, compares and orders as its `str` does, so maps keyed by it are looked up by
/// `&str`.
impl std::borrow::Borrow<str> for Text {
    fn borrow(&self) -> &str {
        self.as_str()
    }
}

impl From<&str> for Text {
    fn from(text: &str) -> Text {
        Text::new(text)
    }
}

impl From<String> for Text {
    fn from(text: String) -> Text {
        Text::new(&text)
    }
}

impl From<std::borrow::Cow<'_, str>> for Text {
    fn from(text: std::borrow::Cow<'_, str>) -> Text {
        Text::new(&text)
    }
}

impl PartialEq for Text {
    fn eq(&self, other: &Text) -> bool {
        match (&self.0, &other.0) {
            // Inline bytes past the length are zero, so whole buffers compare as the texts do,
            // in a few vector compares instead of a call to compare slices.
            (Repr::Inline { len: a, bytes: x }, Repr::Inline { len: b, bytes: y }) => a == b && x == y,
            _ => self.as_bytes() == other.as_bytes(),
        }
    }
}

impl Eq for Text {}

impl PartialEq<str> for Text {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl std::hash::Hash for Text {
    /// As `str` hashes (its bytes, then a 0xff that no UTF-8 text holds).
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        state.write(self.as_bytes());
        state.write_u8(0xff);
    }
}

impl PartialOrd for Text {
    fn partial_cmp(&self, other: &Text) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Text {
    fn cmp(&self, other: &Text) -> std::cmp::Ordering {
        // UTF-8 orders as its bytes do.
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl fmt::Debug for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        fmt::Debug::fmt(self.as_str(), f)
    }
}

impl fmt::Display for Text {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl serde::Serialize for Text {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_str(self.as_str())
    }
}

impl<'de> serde::Deserialize<'de> for Text {
    fn deserialize<D: serde::Deserializer<'de>>(deserializer: D) -> Result<Text, D::Error> {
        Ok(Text::new(&<std::borrow::Cow<'de, str>>::deserialize(deserializer)?))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::hash::BuildHasher;

    /// Every inline length, each byte in its place and the rest of the buffer zero (equality
    /// compares whole buffers).
    #[test]
    fn inline_text_of_every_length_holds_its_bytes_and_zeros_after() {
        let source: String = ('a'..='z').collect();
        for len in 0..=INLINE {
            let text = Text::new(&source[..len]);
            assert_eq!(text.as_str(), &source[..len]);
            let Repr::Inline { bytes, .. } = &text.0 else { panic!("{len} bytes are held inline") };
            assert!(bytes[len..].iter().all(|b| *b == 0), "{len}: {bytes:?}");
            assert_eq!(text, Text::new(&source[..len].to_owned()));
        }
        assert!(matches!(Text::new(&source[..INLINE + 1]).0, Repr::Heap(_)));
    }

    #[test]
    fn inline_and_heap_text_compare_hash_and_order_as_their_str() {
        let short = "赣A12345";
        let long = "a pass id far longer than twenty-two bytes";
        let hasher = rustc_hash::FxBuildHasher;
        for (a, b) in [(short, long), (long, short), ("", short), (short, "赣A12346"), ("KK0017-4", "X2026030200036")]
        {
            let (ta, tb) = (Text::new(a), Text::new(b));
            assert_eq!(&*ta, a);
            assert_eq!(ta == tb, a == b);
            assert_eq!(ta.cmp(&tb), a.cmp(b), "{a} vs {b}");
            assert_eq!(hasher.hash_one(&ta), hasher.hash_one(a), "hashed as its str");
            let json = serde_json::to_string(&ta).unwrap();
            assert_eq!(json, serde_json::to_string(a).unwrap());
            assert_eq!(serde_json::from_str::<Text>(&json).unwrap(), ta);
        }
    }
}
