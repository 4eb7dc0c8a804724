//! Plates (GA 36-2018) and the vehicle identity, plate + colour.

use super::text::Text;
use super::PlateColor;
use std::borrow::Cow;
use std::fmt;

/// The 31 province-level abbreviations of mainland China.
pub const PROVINCES: [char; 31] = [
    '京', '津', '沪', '渝', '冀', '豫', '云', '辽', '黑', '湘', '皖', '鲁', '新', '苏', '浙', '赣', '鄂', '桂', '甘',
    '晋', '蒙', '陕', '吉', '闽', '贵', '粤', '青', '藏', '川', '宁', '琼',
];

/// What cameras write when they could not read a plate.
const UNREADABLE: [&str; 7] = ["", "-", "无牌", "未识别", "无车牌", "未知", "车牌"];

/// Trailing characters of special plates, ignored when reading the restriction digit.
const SPECIAL_SUFFIXES: [(char, PlateKind); 8] = [
    ('警', PlateKind::Police),
    ('学', PlateKind::Learner),
    ('挂', PlateKind::Trailer),
    ('领', PlateKind::Consulate),
    ('使', PlateKind::Embassy),
    ('港', PlateKind::HongKong),
    ('澳', PlateKind::Macau),
    ('试', PlateKind::Test),
];

/// Serial letters that mark a new-energy plate (first letter: small car; last: large vehicle).
const NEW_ENERGY_LETTERS: [char; 10] = ['D', 'A', 'B', 'C', 'E', 'F', 'G', 'H', 'J', 'K'];

/// The series a plate belongs to.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum PlateKind {
    Regular,
    NewEnergySmall,
    NewEnergyLarge,
    Police,
    Learner,
    Trailer,
    Embassy,
    Consulate,
    HongKong,
    Macau,
    Test,
    /// Readable, but not in a mainland format (e.g. armed police `WJ…`, foreign plates).
    Unrecognised,
}

/// A plate as a camera read it: a plate, or nothing usable.
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub enum PlateRead {
    Readable(Plate),
    Unreadable,
}

impl PlateRead {
    /// Parses a camera's plate string; the unreadable markers (`-`, empty, `无牌`, `未识别`, …)
    /// become [`PlateRead::Unreadable`].
    pub fn parse(raw: &str) -> PlateRead {
        let kept = |c: &char| !c.is_whitespace() && *c != '·' && *c != '•';
        // Almost every plate comes normalised already: it is then taken as it is.
        let text: Cow<'_, str> = match raw.chars().all(|c| kept(&c) && !c.is_ascii_lowercase()) {
            true => raw.into(),
            false => raw.chars().filter(kept).map(|c| c.to_ascii_uppercase()).collect::<String>().into(),
        };
        if UNREADABLE.contains(&&*text) || text.chars().all(|c| c == '-' || c == '*') {
            return PlateRead::Unreadable;
        }
        PlateRead::Readable(Plate { text: text.into() })
    }

    pub fn plate(&self) -> Option<&Plate> {
        match self {
            PlateRead::Readable(plate) => Some(plate),
            PlateRead::Unreadable => None,
        }
    }

    /// The text to write back out: the plate, or `-` when unreadable.
    pub fn as_str(&self) -> &str {
        self.plate().map_or("-", Plate::as_str)
    }

    /// [`PlateRead::as_str`]'s bytes, unchecked (see [`Text::as_bytes`]).
    pub fn as_bytes(&self) -> &[u8] {
        self.plate().map_or(b"-", |p| p.text.as_bytes())
    }
}

/// A readable plate number, normalised (no spaces or separators, upper-case letters).
///
/// Compared, hashed and ordered as its text, which is held inline (every plate of the national
/// standard takes at most 14 bytes): plates are the keys of every per-vehicle map.
#[derive(Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Plate {
    text: Text,
}

impl Plate {
    pub fn as_str(&self) -> &str {
        self.text.as_str()
    }

    pub fn text(&self) -> &Text {
        &self.text
    }

    /// The province abbreviation, when the plate starts with one.
    pub fn province(&self) -> Option<char> {
        self.as_str().chars().next().filter(|c| PROVINCES.contains(c))
    }

    /// Province + issuing-authority letter (`赣A`), the key of the plate-prefix table.
    pub fn prefix(&self) -> Option<&str> {
        let text = self.as_str();
        let mut chars = text.char_indices();
        let (_, first) = chars.next()?;
        let (i, letter) = chars.next()?;
        (PROVINCES.contains(&first) && letter.is_ascii_uppercase()).then(|| &text[..i + letter.len_utf8()])
    }

    /// The characters after the prefix (the whole text for plates without one).
    pub fn serial(&self) -> &str {
        self.prefix().map_or(self.as_str(), |p| &self.as_str()[p.len()..])
    }

    pub fn kind(&self) -> PlateKind {
        if let Some(kind) = self.special_kind() {
            return kind;
        }
        let Some(_) = self.prefix() else {
            return PlateKind::Unrecognised;
        };
        let serial: Vec<char> = self.serial().chars().collect();
        match serial.len() {
            5 => PlateKind::Regular,
            6 if NEW_ENERGY_LETTERS.contains(&serial[0]) => PlateKind::NewEnergySmall,
            6 if NEW_ENERGY_LETTERS.contains(&serial[5]) => PlateKind::NewEnergyLarge,
            _ => PlateKind::Unrecognised,
        }
    }

    pub fn is_new_energy(&self) -> bool {
        matches!(self.kind(), PlateKind::NewEnergySmall | PlateKind::NewEnergyLarge)
    }

    fn special_kind(&self) -> Option<PlateKind> {
        if self.as_str().starts_with('使') {
            return Some(PlateKind::Embassy);
        }
        let last = self.as_str().chars().last()?;
        SPECIAL_SUFFIXES.iter().find(|(c, _)| *c == last).map(|(_, kind)| *kind)
    }

    /// The restriction digit (尾号): the last character of the serial, ignoring a trailing
    /// special character; a letter counts as 0. `None` when that character is neither.
    pub fn last_digit(&self) -> Option<u8> {
        let mut chars = self.as_str().chars().rev();
        let mut last = chars.next()?;
        if SPECIAL_SUFFIXES.iter().any(|(c, _)| *c == last) {
            last = chars.next()?;
        }
        match last {
            '0'..='9' => Some(last as u8 - b'0'),
            'A'..='Z' => Some(0),
            _ => None,
        }
    }
}

impl fmt::Debug for Plate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Plate({})", self.as_str())
    }
}

impl fmt::Display for Plate {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A vehicle: the same plate string on plates of two colours is two vehicles.
#[derive(Clone, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct VehicleKey {
    pub plate: Plate,
    pub color: PlateColor,
}

/// A vehicle as a pass holds it: its plate and colour, borrowed.
pub type VehicleRef<'a> = (&'a Plate, PlateColor);

impl VehicleKey {
    pub fn new(plate: Plate, color: PlateColor) -> VehicleKey {
        VehicleKey { plate, color }
    }

    /// A vehicle from its stored plate text and colour code (operator state, alert records);
    /// `None` when either no longer reads.
    pub fn from_stored(plate: &str, color: u8) -> Option<VehicleKey> {
        match (PlateRead::parse(plate), PlateColor::from_code(color)) {
            (PlateRead::Readable(plate), Some(color)) => Some(VehicleKey { plate, color }),
            _ => None,
        }
    }

    /// The plate with all but its prefix and last character hidden, for logs.
    pub fn masked(&self) -> String {
        let text = self.plate.as_str();
        let keep_front = self.plate.prefix().map_or(1, |p| p.chars().count());
        let n = text.chars().count();
        text.chars().enumerate().map(|(i, c)| if i < keep_front || i + 1 == n { c } else { '*' }).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn plate(s: &str) -> Plate {
        match PlateRead::parse(s) {
            PlateRead::Readable(p) => p,
            PlateRead::Unreadable => panic!("{s} should be readable"),
        }
    }

    #[test]
    fn plates_held_inline_and_on_the_heap_compare_hash_and_order_as_their_text() {
        use std::hash::BuildHasher;
        let long = "赣A12345挂挂挂挂挂挂挂挂";
        assert!(long.len() > 22, "held on the heap");
        let texts = ["赣A12345", "赣A1234学", long, "赣A12345挂挂"];
        let plates: Vec<Plate> = texts.iter().map(|t| plate(t)).collect();
        let hasher = rustc_hash::FxBuildHasher;
        for (a, ta) in plates.iter().zip(texts) {
            assert_eq!(a.as_str(), ta);
            assert_eq!(a.to_string(), ta);
            for (b, tb) in plates.iter().zip(texts) {
                assert_eq!(a == b, ta == tb);
                assert_eq!(a.cmp(b), ta.cmp(tb), "{ta} against {tb}");
            }
            assert_eq!(hasher.hash_one(a), hasher.hash_one(ta), "hashed as its text");
            assert_eq!(hasher.hash_one(a), hasher.hash_one(a.clone()));
        }
        assert_eq!(plates[2].prefix(), Some("赣A"), "a heap plate reads like any other");
    }

    #[test]
    fn unreadable_markers_are_not_plates() {
        for raw in ["", "-", "无牌", "未识别", "  ", "---", "****"] {
            assert_eq!(PlateRead::parse(raw), PlateRead::Unreadable, "{raw:?}");
        }
    }

    #[test]
    fn plates_are_normalised() {
        assert_eq!(plate("赣a·12345").as_str(), "赣A12345");
        assert_eq!(plate(" 赣A 12345 ").as_str(), "赣A12345");
    }

    #[test]
    fn a_regular_plate_has_prefix_serial_and_last_digit() {
        let p = plate("赣A12345");
        assert_eq!(p.province(), Some('赣'));
        assert_eq!(p.prefix(), Some("赣A"));
        assert_eq!(p.serial(), "12345");
        assert_eq!(p.kind(), PlateKind::Regular);
        assert_eq!(p.last_digit(), Some(5));
    }

    #[test]
    fn a_trailing_letter_counts_as_zero() {
        assert_eq!(plate("京A1234B").last_digit(), Some(0));
        assert_eq!(plate("京NB123X").last_digit(), Some(0));
    }

    #[test]
    fn new_energy_plates_are_recognised_small_and_large() {
        let small = plate("粤BD12345");
        assert_eq!(small.kind(), PlateKind::NewEnergySmall);
        assert!(small.is_new_energy());
        assert_eq!(small.last_digit(), Some(5));
        let large = plate("粤B12345D");
        assert_eq!(large.kind(), PlateKind::NewEnergyLarge);
        assert_eq!(large.last_digit(), Some(0));
    }

    #[test]
    fn special_plates_ignore_their_trailing_character_for_the_digit() {
        assert_eq!(plate("赣A1234警").kind(), PlateKind::Police);
        assert_eq!(plate("赣A1234警").last_digit(), Some(4));
        assert_eq!(plate("赣A1235学").kind(), PlateKind::Learner);
        assert_eq!(plate("赣A1236挂").kind(), PlateKind::Trailer);
        assert_eq!(plate("粤Z1234港").kind(), PlateKind::HongKong);
        assert_eq!(plate("粤Z1237澳").last_digit(), Some(7));
        assert_eq!(plate("京A1238领").kind(), PlateKind::Consulate);
        assert_eq!(plate("使123459").kind(), PlateKind::Embassy);
        assert_eq!(plate("使123459").last_digit(), Some(9));
    }

    #[test]
    fn plates_without_a_province_are_readable_but_unrecognised() {
        let p = plate("WJ12345");
        assert_eq!(p.province(), None);
        assert_eq!(p.prefix(), None);
        assert_eq!(p.kind(), PlateKind::Unrecognised);
        assert_eq!(p.last_digit(), Some(5));
    }

    #[test]
    fn the_same_plate_in_two_colours_is_two_vehicles() {
        let blue = VehicleKey::new(plate("赣A12345"), PlateColor::Blue);
        let yellow = VehicleKey::new(plate("赣A12345"), PlateColor::Yellow);
        assert_ne!(blue, yellow);
        assert_eq!(blue, VehicleKey::new(plate("赣A12345"), PlateColor::Blue));
    }

    #[test]
    fn masking_keeps_only_prefix_and_last_character() {
        let key = VehicleKey::new(plate("赣A12345"), PlateColor::Blue);
        assert_eq!(key.masked(), "赣A****5");
    }
}
