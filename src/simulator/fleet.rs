//! The vehicles of a simulated day: unique plates of many origins, colours and types.

use crate::model::{PlateColor, PROVINCES};
use crate::reference::PrefixTable;
use rand::seq::SliceRandom;
use rand::Rng;
use rand_chacha::ChaCha8Rng;
use rustc_hash::FxHashSet;

/// Serial characters: digits and letters without I and O.
const SERIAL_LETTERS: &[u8] = b"ABCDEFGHJKLMNPQRSTUVWXYZ";
const NEW_ENERGY_SMALL: &[u8] = b"DF";

#[derive(Clone, Debug, PartialEq)]
pub struct Vehicle {
    pub plate: String,
    pub color: PlateColor,
    pub plate_type: &'static str,
    pub vehicle_type: &'static str,
    pub local: bool,
    /// Buses keep to the bus lane.
    pub bus: bool,
}

/// What kind of plate to issue.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Make {
    Car,
    NewEnergyCar,
    Truck,
    Bus,
    Police,
    Learner,
}

impl Make {
    fn draw(rng: &mut ChaCha8Rng) -> Make {
        match rng.gen_range(0..1000) {
            0..=779 => Make::Car,
            780..=889 => Make::NewEnergyCar,
            890..=959 => Make::Truck,
            960..=979 => Make::Bus,
            980..=989 => Make::Police,
            _ => Make::Learner,
        }
    }
}

/// Issues plates that are unique within the day.
pub struct PlateIssuer<'a> {
    prefixes: &'a PrefixTable,
    local: Vec<String>,
    province_others: Vec<String>,
    issued: FxHashSet<(String, PlateColor)>,
}

impl<'a> PlateIssuer<'a> {
    pub fn new(prefixes: &'a PrefixTable, local: &[String]) -> PlateIssuer<'a> {
        let province =
            local.first().and_then(|p| prefixes.origin(p)).map(|o| o.province.to_string()).unwrap_or_default();
        let province_others = prefixes
            .prefixes_of(&province)
            .into_iter()
            .filter(|p| !local.iter().any(|l| l == p))
            .map(String::from)
            .collect();
        PlateIssuer { prefixes, local: local.to_vec(), province_others, issued: FxHashSet::default() }
    }

    /// A vehicle of the usual mix: about 70 % local, 12 % from the rest of the province, 18 % from
    /// other provinces.
    pub fn vehicle(&mut self, rng: &mut ChaCha8Rng) -> Vehicle {
        let make = Make::draw(rng);
        let roll = rng.gen_range(0..100);
        let local = roll < 70 || matches!(make, Make::Police | Make::Learner | Make::Bus) || self.local.is_empty();
        let prefix = if local {
            pick_weighted_first(&self.local, rng)
        } else if roll < 82 && !self.province_others.is_empty() {
            self.province_others.choose(rng).cloned().unwrap_or_default()
        } else {
            self.other_province_prefix(rng)
        };
        self.issue(rng, &prefix, make, local)
    }

    /// A vehicle with a local plate of a given make.
    pub fn local_vehicle(&mut self, rng: &mut ChaCha8Rng, make: Make) -> Vehicle {
        let prefix = pick_weighted_first(&self.local, rng);
        self.issue(rng, &prefix, make, true)
    }

    fn other_province_prefix(&self, rng: &mut ChaCha8Rng) -> String {
        let local_province = self.local.first().and_then(|p| p.chars().next());
        loop {
            let province = *PROVINCES.choose(rng).expect("31 provinces");
            if Some(province) == local_province {
                continue;
            }
            let options = self.prefixes.prefixes_of(
                &self.prefixes.origin(&format!("{province}A")).map(|o| o.province.to_string()).unwrap_or_default(),
            );
            if let Some(p) = options.choose(rng) {
                return (*p).to_owned();
            }
        }
    }

    fn issue(&mut self, rng: &mut ChaCha8Rng, prefix: &str, make: Make, local: bool) -> Vehicle {
        loop {
            let (plate, color, plate_type, vehicle_type) = match make {
                Make::Car => (format!("{prefix}{}", serial(rng, 5)), PlateColor::Blue, "02", "K33"),
                Make::NewEnergyCar => {
                    let first = NEW_ENERGY_SMALL[rng.gen_range(0..NEW_ENERGY_SMALL.len())] as char;
                    (format!("{prefix}{first}{}", serial(rng, 5)), PlateColor::Green, "52", "K33")
                }
                Make::Truck => (format!("{prefix}{}", serial(rng, 5)), PlateColor::Yellow, "01", "H11"),
                Make::Bus => (format!("{prefix}{}", digits(rng, 5)), PlateColor::Yellow, "01", "K11"),
                Make::Police => (format!("{prefix}{}警", digits(rng, 4)), PlateColor::White, "23", "K33"),
                Make::Learner => (format!("{prefix}{}学", digits(rng, 4)), PlateColor::Yellow, "16", "K33"),
            };
            if self.issued.insert((plate.clone(), color)) {
                return Vehicle { plate, color, plate_type, vehicle_type, local, bus: make == Make::Bus };
            }
        }
    }
}

/// The first local prefix is the main one (85 %).
fn pick_weighted_first(prefixes: &[String], rng: &mut ChaCha8Rng) -> String {
    match prefixes {
        [] => "赣A".into(),
        [only] => only.clone(),
        [first, rest @ ..] if rng.gen_bool(0.85) => {
            let _ = rest;
            first.clone()
        }
        [_, rest @ ..] => rest.choose(rng).cloned().unwrap_or_default(),
    }
}

/// A regular serial: mostly digits, sometimes a letter or two, never I or O.
fn serial(rng: &mut ChaCha8Rng, len: usize) -> String {
    (0..len)
        .map(|i| {
            if i < 2 && rng.gen_bool(0.25) {
                SERIAL_LETTERS[rng.gen_range(0..SERIAL_LETTERS.len())] as char
            } else {
                char::from(b'0' + rng.gen_range(0..10))
            }
        })
        .collect()
}

fn digits(rng: &mut ChaCha8Rng, len: usize) -> String {
    (0..len).map(|_| char::from(b'0' + rng.gen_range(0..10))).collect()
}

/// A corrected read of a plate: one serial digit changed.
pub fn misread(plate: &str, rng: &mut ChaCha8Rng) -> String {
    let chars: Vec<char> = plate.chars().collect();
    let digits: Vec<usize> = (2..chars.len()).filter(|i| chars[*i].is_ascii_digit()).collect();
    let Some(&i) = digits.choose(rng) else { return format!("{plate}1") };
    let mut out = chars.clone();
    out[i] = char::from(b'0' + ((chars[i] as u8 - b'0' + rng.gen_range(1..10)) % 10));
    out.into_iter().collect()
}
