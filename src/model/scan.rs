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
    s.skip_ws();
    s.expect(b'{')?;
    s.skip_ws();
    if s.peek()? == b'}' {
        s.at += 1;
    } else {
        loop {
            let key = s.string()?;
            s.skip_ws();
            s.expect(b':')?;
            s.skip_ws();
            let value = s.value()?;
            let slot = match key {
                "pass_id" | "GCXH" => Some(&mut raw.pass_id),
                "plate" | "HPHM" => Some(&mut raw.plate),
                "plate_color" | "HPYS" => Some(&mut raw.plate_color),
                "plate_type" | "HPZL" => Some(&mut raw.plate_type),
                "checkpoint_id" | "KKBH" => Some(&mut raw.checkpoint_id),
                "device_id" | "SBBH" => Some(&mut raw.device_id),
                "direction" | "FXBH" => Some(&mut raw.direction),
                "lane" | "CDH" => Some(&mut raw.lane),
                "ts" | "GCSJ" => Some(&mut raw.ts),
                "speed_kmh" | "CLSD" => Some(&mut raw.speed_kmh),
                "vehicle_type" | "CLLX" => Some(&mut raw.vehicle_type),
                // Other fields are ignored, as `serde_json` ignores them.
                _ => None,
            };
            if let Some(slot) = slot {
                // A field given twice is an error `serde_json` reports.
                if !matches!(slot, Scalar::Absent) {
                    return None;
                }
                *slot = value;
            }
            s.skip_ws();
            if !s.next_member()? {
                break;
            }
        }
    }
    s.skip_ws();
    (s.at == json.len()).then_some(raw)
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

    fn peek(&self) -> Option<u8> {
        self.bytes().get(self.at).copied()
    }

    fn expect(&mut self, byte: u8) -> Option<()> {
        (self.peek()? == byte).then(|| self.at += 1)
    }

    /// JSON's whitespace (not every ASCII space: a form feed is an error).
    fn skip_ws(&mut self) {
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

    /// A non-negative number without an exponent: an integer of up to 18 digits, or a decimal of
    /// up to 15 significant digits (its value is then exactly the division `serde_json` does).
    fn number(&mut self) -> Option<Scalar<'a>> {
        let digits = |s: &mut Scanner<'a>| {
            let rest = &s.bytes()[s.at..];
            let len = rest.iter().position(|b| !b.is_ascii_digit()).unwrap_or(rest.len());
            s.at += len;
            &rest[..len]
        };
        let whole = digits(self);
        // A leading zero stands alone (`01` is not JSON).
        if whole.len() > 1 && whole[0] == b'0' {
            return None;
        }
        let fraction = match self.peek() {
            Some(b'.') => {
                self.at += 1;
                let fraction = digits(self);
                (!fraction.is_empty()).then_some(fraction)?
            }
            _ => &[][..],
        };
        if matches!(self.peek(), Some(b'e' | b'E')) {
            return None;
        }
        let value = |digits: &[u8]| digits.iter().fold(0u64, |v, d| v * 10 + u64::from(d - b'0'));
        if fraction.is_empty() {
            return (whole.len() <= MAX_INT_DIGITS).then(|| Scalar::Int(value(whole) as i64));
        }
        if whole.len() + fraction.len() > MAX_DIGITS {
            return None;
        }
        let significand = value(whole) * 10u64.pow(fraction.len() as u32) + value(fraction);
        Some(Scalar::Float(significand as f64 / POW10[fraction.len()]))
    }
}

#[cfg(test)]
#[path = "scan_tests.rs"]
mod tests;
