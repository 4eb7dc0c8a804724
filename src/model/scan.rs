//! A fast reader for the common shape of a pass record: one flat JSON object whose strings hold
//! no escapes and whose numbers are plain. It gives exactly what `serde_json` gives for such a
//! record, or `None` for anything else (escapes, nested values, exponents, negative or long
//! numbers, repeated fields, anything malformed), which `serde_json` then reads and judges.
//! Most records take this path, so decoding is a single pass over the bytes without a visitor
//! per field.

use super::decode::{RawPass, Scalar};
use std::borrow::Cow;

/// Significands up to this many digits are exact in an f64 (10^15 < 2^53).
const MAX_DIGITS: usize = 15;
/// Integers up to this many digits fit an i64.
const MAX_INT_DIGITS: usize = 18;
/// Powers of ten exact in an f64.
const POW10: [f64; 16] = [1e0, 1e1, 1e2, 1e3, 1e4, 1e5, 1e6, 1e7, 1e8, 1e9, 1e10, 1e11, 1e12, 1e13, 1e14, 1e15];

/// The record's fields, when it has the common shape (see the module's note).
pub(super) fn scan(json: &[u8]) -> Option<RawPass<'_>> {
    // The whole record is checked as UTF-8 once (`serde_json` judges one that is not); its
    // strings are then cut from it at their quotes, which are character boundaries. A plate's
    // Chinese character in every record keeps the standard check off its ASCII fast path, so
    // the check is the vectorised one.
    let text = simdutf8::basic::from_utf8(json).ok()?;
    let mut s = Scanner { text, at: 0 };
    let mut raw = RawPass::default();
    // The field that came last, and what has followed each field (see [`FOLLOWS`]).
    let (mut last, mut follows) = (START, FOLLOWS.get());
    s.skip_ws();
    s.expect(b'{')?;
    s.skip_ws();
    if s.peek()? == b'}' {
        s.at += 1;
    } else {
        loop {
            let predicted = follows[last] as usize;
            let field = if s.field_name(predicted) {
                Some(predicted)
            } else {
                let key = s.string()?;
                s.skip_ws();
                s.expect(b':')?;
                field_of(key)
            };
            s.skip_ws();
            let value = s.value()?;
            // Other fields are ignored, as `serde_json` ignores them.
            if let Some(field) = field {
                let slot = slot(&mut raw, field);
                // A field given twice is an error `serde_json` reports.
                if !matches!(slot, Scalar::Absent) {
                    return None;
                }
                *slot = value;
                follows[last] = field as u8;
                last = field;
            }
            s.skip_ws();
            if !s.next_member()? {
                break;
            }
        }
    }
    s.skip_ws();
    if follows != FOLLOWS.get() {
        FOLLOWS.set(follows);
    }
    (s.at == json.len()).then_some(raw)
}

/// The fields the reader fills, by their canonical names (their platform aliases are in
/// [`field_of`]), in the order passflow writes them.
const FIELDS: [&str; 11] = [
    "pass_id",
    "plate",
    "plate_color",
    "plate_type",
    "checkpoint_id",
    "device_id",
    "direction",
    "lane",
    "ts",
    "speed_kmh",
    "vehicle_type",
];

/// The place in [`FIELDS`] of a record's key, canonical name or alias.
fn field_of(key: &str) -> Option<usize> {
    Some(match key {
        "pass_id" | "GCXH" => 0,
        "plate" | "HPHM" => 1,
        "plate_color" | "HPYS" => 2,
        "plate_type" | "HPZL" => 3,
        "checkpoint_id" | "KKBH" => 4,
        "device_id" | "SBBH" => 5,
        "direction" | "FXBH" => 6,
        "lane" | "CDH" => 7,
        "ts" | "GCSJ" => 8,
        "speed_kmh" | "CLSD" => 9,
        "vehicle_type" | "CLLX" => 10,
        _ => return None,
    })
}

/// Where field `field` of [`FIELDS`] goes.
fn slot<'r, 'a>(raw: &'r mut RawPass<'a>, field: usize) -> &'r mut Scalar<'a> {
    match field {
        0 => &mut raw.pass_id,
        1 => &mut raw.plate,
        2 => &mut raw.plate_color,
        3 => &mut raw.plate_type,
        4 => &mut raw.checkpoint_id,
        5 => &mut raw.device_id,
        6 => &mut raw.direction,
        7 => &mut raw.lane,
        8 => &mut raw.ts,
        9 => &mut raw.speed_kmh,
        _ => &mut raw.vehicle_type,
    }
}

/// A field's name as it starts a member, `"name":`, as the 16 bytes it is compared with (a
/// little-endian word, zero-padded) and the mask of its length.
struct Name {
    word: u128,
    mask: u128,
    len: usize,
}

const fn name(field: &str) -> Name {
    let field = field.as_bytes();
    let len = field.len() + 3;
    assert!(len <= 16, "a name the reader predicts fits one word");
    let mut bytes = [0u8; 16];
    bytes[0] = b'"';
    let mut i = 0;
    while i < field.len() {
        bytes[i + 1] = field[i];
        i += 1;
    }
    bytes[len - 2] = b'"';
    bytes[len - 1] = b':';
    let mask = if len == 16 { u128::MAX } else { (1 << (8 * len)) - 1 };
    Name { word: u128::from_le_bytes(bytes), mask, len }
}

const NAMES: [Name; FIELDS.len()] = {
    let mut names = [const { name("") }; FIELDS.len()];
    let mut i = 0;
    while i < FIELDS.len() {
        names[i] = name(FIELDS[i]);
        i += 1;
    }
    names
};

/// [`FOLLOWS`]' place for the start of a record.
const START: usize = FIELDS.len();

/// [`FIELDS`]' own order as [`FOLLOWS`] holds it: each field followed by the next, the start
/// by the first.
const FIELDS_ORDER: [u8; START + 1] = {
    let mut order = [0; START + 1];
    let mut i = 0;
    while i + 1 < FIELDS.len() {
        order[i] = (i + 1) as u8;
        i += 1;
    }
    order
};

thread_local! {
    /// For each field (and the start of a record, at [`START`]), the field that followed it in
    /// the last record this thread read. A source writes its fields in one order, so the next
    /// record's keys are first compared whole with the names this predicts, a word compare
    /// each instead of reading the key as a string and matching it against every name; a key
    /// that is not the predicted one is read as before. What a record reads as does not depend
    /// on it. It starts as [`FIELDS`]' own order.
    static FOLLOWS: std::cell::Cell<[u8; START + 1]> = const { std::cell::Cell::new(FIELDS_ORDER) };
}

/// The length of the plain string that starts `bytes`: the place of its first quote, backslash
/// or control character (`None` when there is none). Eight bytes a step, each word tested for
/// all three at once: for each test, the lowest byte it flags is a true match (a false flag
/// only ever comes above a true one), so the lowest flag of the three is the answer.
fn plain_len(bytes: &[u8]) -> Option<usize> {
    const ONES: u64 = 0x0101_0101_0101_0101;
    const HIGH: u64 = 0x8080_8080_8080_8080;
    // Flags the bytes of `x` that are zero.
    let zero = |x: u64| x.wrapping_sub(ONES) & !x & HIGH;
    let mut at = 0;
    while let Some(word) = bytes.get(at..at + 8) {
        let x = u64::from_le_bytes(word.try_into().expect("eight bytes"));
        let below_space = x.wrapping_sub(ONES * 0x20) & !x & HIGH;
        let found = zero(x ^ (ONES * u64::from(b'"'))) | zero(x ^ (ONES * u64::from(b'\\'))) | below_space;
        if found != 0 {
            return Some(at + found.trailing_zeros() as usize / 8);
        }
        at += 8;
    }
    bytes[at..].iter().position(|&b| b == b'"' || b == b'\\' || b < 0x20).map(|i| at + i)
}

struct Scanner<'a> {
    text: &'a str,
    at: usize,
}

impl<'a> Scanner<'a> {
    fn bytes(&self) -> &'a [u8] {
        self.text.as_bytes()
    }

    /// When field `field`'s canonical name, `"name":`, is next, steps past it.
    fn field_name(&mut self, field: usize) -> bool {
        let name = &NAMES[field];
        let Some(word) = self.bytes().get(self.at..self.at + 16) else { return false };
        let word = u128::from_le_bytes(word.try_into().expect("sixteen bytes"));
        let named = (word ^ name.word) & name.mask == 0;
        if named {
            self.at += name.len;
        }
        named
    }

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// JSON's whitespace (not every ASCII space: a form feed is an error).
    #[inline(always)]
    fn skip_ws(&mut self) {
        // A compact record has none: a byte above the space ends it at once (one compare
        // instead of four, some thirty times a record).
        if self.peek().is_some_and(|b| b > b' ') {
            return;
        }
        self.skip_ws_run();
    }

    #[inline(never)]
    fn skip_ws_run(&mut self) {
        let bytes = self.bytes();
        // Counted in a local: the scanner's own field would be stored at every byte.
        let mut at = self.at;
        while matches!(bytes.get(at), Some(b' ' | b'\t' | b'\n' | b'\r')) {
            at += 1;
        }
        self.at = at;
    }

    /// After a member: `true` at a comma (another member follows), `false` at the closing brace.
    fn next_member(&mut self) -> Option<bool> {
        match self.peek()? {
            b',' => {
                self.at += 1;
                self.skip_ws();
                Some(true)
            }
            b'}' => {
                self.at += 1;
                Some(false)
            }
            _ => None,
        }
    }

    /// A string without escapes or control characters.
    fn string(&mut self) -> Option<&'a str> {
        self.expect(b'"')?;
        let from = self.at;
        let len = plain_len(&self.bytes()[from..])?;
        self.at = from + len;
        self.expect(b'"')?;
        self.text.get(from..from + len)
    }

    fn value(&mut self) -> Option<Scalar<'a>> {
        match self.peek()? {
            b'"' => self.string().map(|s| Scalar::Str(Cow::Borrowed(s))),
            b'0'..=b'9' => self.number(),
            b'n' => self.literal(b"null", Scalar::Null),
            b't' => self.literal(b"true", Scalar::Bool),
            b'f' => self.literal(b"false", Scalar::Bool),
            _ => None,
        }
    }

    fn literal(&mut self, word: &[u8], value: Scalar<'a>) -> Option<Scalar<'a>> {
        self.bytes()[self.at..].starts_with(word).then(|| self.at += word.len())?;
        Some(value)
    }

    /// The run of digits at the scanner: its value (exact up to 19 digits; longer runs are
    /// refused by the callers) and its length, read in one pass.
    fn digits(&mut self) -> (u64, usize) {
        let rest = &self.bytes()[self.at..];
        let (mut value, mut len) = (0u64, 0);
        while let Some(digit) = rest.get(len).map(|b| b.wrapping_sub(b'0')).filter(|d| *d < 10) {
            value = value.wrapping_mul(10).wrapping_add(u64::from(digit));
            len += 1;
        }
        self.at += len;
        (value, len)
    }

    /// A non-negative number without an exponent: an integer of up to 18 digits, or a decimal of
    /// up to 15 significant digits (its value is then exactly the division `serde_json` does).
    fn number(&mut self) -> Option<Scalar<'a>> {
        let leading = self.peek();
        let (whole, whole_len) = self.digits();
        // A leading zero stands alone (`01` is not JSON).
        if whole_len > 1 && leading == Some(b'0') {
            return None;
        }
        let (fraction, fraction_len) = match self.peek() {
            Some(b'.') => {
                self.at += 1;
                let (fraction, len) = self.digits();
                (len > 0).then_some((fraction, len))?
            }
            _ => (0, 0),
        };
        if matches!(self.peek(), Some(b'e' | b'E')) {
            return None;
        }
        if fraction_len == 0 {
            return (whole_len <= MAX_INT_DIGITS).then_some(Scalar::Int(whole as i64));
        }
        if whole_len + fraction_len > MAX_DIGITS {
            return None;
        }
        let significand = whole * 10u64.pow(fraction_len as u32) + fraction;
        Some(Scalar::Float(significand as f64 / POW10[fraction_len]))
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
