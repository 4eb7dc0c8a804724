//! Code tables of pass records: plate colours and directions of travel.

use serde::{Deserialize, Serialize};

/// Plate colour, passflow's one internal enum (the police code table's numbering).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[repr(u8)]
pub enum PlateColor {
    White = 0,
    Yellow = 1,
    Blue = 2,
    Black = 3,
    Other = 4,
    Green = 5,
    /// New-energy trucks.
    YellowGreen = 6,
}

impl PlateColor {
    pub const ALL: [PlateColor; 7] = [
        PlateColor::White,
        PlateColor::Yellow,
        PlateColor::Blue,
        PlateColor::Black,
        PlateColor::Other,
        PlateColor::Green,
        PlateColor::YellowGreen,
    ];

    /// The internal (police-table) code.
    pub fn code(self) -> u8 {
        self as u8
    }

    /// Reads an internal code.
    pub fn from_code(code: u8) -> Option<PlateColor> {
        PlateColor::ALL.get(usize::from(code)).copied()
    }
}

/// How a source numbers plate colours: vendors disagree, so each source maps its codes onto
/// [`PlateColor`].
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum PlateColorScheme {
    /// 0 white, 1 yellow, 2 blue, 3 black, 4 other, 5 green, 6 yellow-green.
    #[default]
    Police,
    /// Toll (ETC) style: 0 blue, 1 yellow, 2 black, 3 white, 4 gradient green, 5 yellow-green.
    Etc,
    /// 1 blue, 2 yellow, 3 black, 4 white, 5 yellow-green, 6 green.
    Vendor,
}

impl PlateColorScheme {
    /// Maps a source code onto the internal colour; `None` for a code the scheme does not have.
    pub fn map(self, code: i64) -> Option<PlateColor> {
        use PlateColor::*;
        let table: &[PlateColor] = match self {
            PlateColorScheme::Police => &[White, Yellow, Blue, Black, Other, Green, YellowGreen],
            PlateColorScheme::Etc => &[Blue, Yellow, Black, White, Green, YellowGreen],
            PlateColorScheme::Vendor => &[Other, Blue, Yellow, Black, White, YellowGreen, Green],
        };
        usize::try_from(code).ok().and_then(|i| table.get(i)).copied()
    }
}

/// Direction of travel past a checkpoint: 1 E→W, 2 W→E, 3 S→N, 4 N→S; 5 towards the north-east,
/// 6 towards the south-west, 7 towards the north-west, 8 towards the south-east.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Direction(u8);

impl Direction {
    pub const EAST_TO_WEST: Direction = Direction(1);
    pub const WEST_TO_EAST: Direction = Direction(2);
    pub const SOUTH_TO_NORTH: Direction = Direction(3);
    pub const NORTH_TO_SOUTH: Direction = Direction(4);

    /// A direction code, which must be 1–8.
    pub fn new(code: i64) -> Option<Direction> {
        (1..=8).contains(&code).then(|| Direction(code as u8))
    }

    pub fn code(self) -> u8 {
        self.0
    }

    /// The direction of travel the other way along the same road.
    pub fn opposite(self) -> Direction {
        let code = self.0;
        Direction(if code % 2 == 1 { code + 1 } else { code - 1 })
    }

    /// The direction of travel from one point to another (longitude/latitude degrees): one of the
    /// four axes when the move is mostly along it, else a diagonal.
    pub fn of_travel(from: (f64, f64), to: (f64, f64)) -> Direction {
        let dx = (to.0 - from.0) * from.1.to_radians().cos();
        let dy = to.1 - from.1;
        let code = if dx.abs() > 2.0 * dy.abs() {
            if dx < 0.0 {
                1
            } else {
                2
            }
        } else if dy.abs() > 2.0 * dx.abs() {
            if dy > 0.0 {
                3
            } else {
                4
            }
        } else {
            match (dx > 0.0, dy > 0.0) {
                (true, true) => 5,
                (false, false) => 6,
                (false, true) => 7,
                (true, false) => 8,
            }
        };
        Direction(code)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_scheme_maps_its_green_code_to_green() {
        assert_eq!(PlateColorScheme::Police.map(5), Some(PlateColor::Green));
        assert_eq!(PlateColorScheme::Etc.map(4), Some(PlateColor::Green));
        assert_eq!(PlateColorScheme::Vendor.map(6), Some(PlateColor::Green));
        assert_eq!(PlateColorScheme::Etc.map(0), Some(PlateColor::Blue));
        assert_eq!(PlateColorScheme::Police.map(7), None);
        assert_eq!(PlateColorScheme::Police.map(-1), None);
    }

    #[test]
    fn opposite_directions_pair_up() {
        for code in 1..=8 {
            let d = Direction::new(code).unwrap();
            assert_ne!(d, d.opposite());
            assert_eq!(d, d.opposite().opposite());
        }
        assert_eq!(Direction::EAST_TO_WEST.opposite(), Direction::WEST_TO_EAST);
        assert_eq!(Direction::SOUTH_TO_NORTH.opposite(), Direction::NORTH_TO_SOUTH);
    }

    #[test]
    fn direction_codes_outside_one_to_eight_are_refused() {
        assert!(Direction::new(0).is_none());
        assert!(Direction::new(9).is_none());
        assert!(Direction::new(8).is_some());
    }

    #[test]
    fn travel_direction_follows_the_dominant_axis() {
        let here = (115.9, 28.7);
        assert_eq!(Direction::of_travel(here, (115.8, 28.7)), Direction::EAST_TO_WEST);
        assert_eq!(Direction::of_travel(here, (116.0, 28.7)), Direction::WEST_TO_EAST);
        assert_eq!(Direction::of_travel(here, (115.9, 28.8)), Direction::SOUTH_TO_NORTH);
        assert_eq!(Direction::of_travel(here, (115.9, 28.6)), Direction::NORTH_TO_SOUTH);
        assert_eq!(Direction::of_travel(here, (116.0, 28.8)).code(), 5);
    }
}
