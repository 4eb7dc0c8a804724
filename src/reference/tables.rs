//! The three required tables of a city folder: regions, checkpoints and segments.

use super::{CheckpointIds, ReferenceError};
use crate::model::{CheckpointIdx, Direction};
use rustc_hash::FxHashSet;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RoadClass {
    Expressway,
    Arterial,
    Secondary,
}

impl RoadClass {
    pub fn as_str(self) -> &'static str {
        match self {
            RoadClass::Expressway => "expressway",
            RoadClass::Arterial => "arterial",
            RoadClass::Secondary => "secondary",
        }
    }
}

impl FromStr for RoadClass {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        match s {
            "expressway" => Ok(RoadClass::Expressway),
            "arterial" => Ok(RoadClass::Arterial),
            "secondary" => Ok(RoadClass::Secondary),
            _ => Err(format!("`{s}` is not one of expressway, arterial, secondary")),
        }
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Region {
    pub id: Arc<str>,
    pub name: String,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Checkpoint {
    pub id: Arc<str>,
    pub name: String,
    pub lon: f64,
    pub lat: f64,
    pub region_id: Arc<str>,
    pub road_class: RoadClass,
    pub boundary: bool,
    /// For boundary checkpoints: the direction of travel that enters the city.
    pub inbound_direction: Option<Direction>,
    pub bus_lanes: Vec<u8>,
    pub speed_limit_kmh: u16,
}

impl Checkpoint {
    pub fn position(&self) -> (f64, f64) {
        (self.lon, self.lat)
    }
}

#[derive(Clone, Debug, PartialEq)]
pub struct Segment {
    pub id: Arc<str>,
    pub from: CheckpointIdx,
    pub to: CheckpointIdx,
    pub length_m: f64,
    pub free_flow_kmh: f64,
    pub road_class: RoadClass,
    pub region_id: Arc<str>,
}

impl Segment {
    /// Travel time at free flow, milliseconds.
    pub fn free_flow_ms(&self) -> f64 {
        // m · 3600 / (km/h) is ms, exact for whole lengths and speeds.
        self.length_m * 3600.0 / self.free_flow_kmh
    }
}

pub const REGION_COLUMNS: [&str; 2] = ["region_id", "name"];
pub const CHECKPOINT_COLUMNS: [&str; 10] = [
    "checkpoint_id",
    "name",
    "lon",
    "lat",
    "region_id",
    "road_class",
    "boundary",
    "inbound_direction",
    "bus_lanes",
    "speed_limit_kmh",
];
pub const SEGMENT_COLUMNS: [&str; 7] =
    ["segment_id", "from_checkpoint", "to_checkpoint", "length_m", "free_flow_kmh", "road_class", "region_id"];

pub(super) fn read_regions(file: &Path) -> Result<Vec<Region>, ReferenceError> {
    let mut seen = FxHashSet::default();
    read_rows(file, &REGION_COLUMNS, |row| {
        let id: Arc<str> = row.text("region_id")?.into();
        if !seen.insert(id.clone()) {
            return Err(row.error("region_id", format!("duplicate region `{id}`")));
        }
        Ok(Region { id, name: row.text("name")?.to_owned() })
    })
}

pub(super) fn read_checkpoints(file: &Path, regions: &[Region]) -> Result<Vec<Checkpoint>, ReferenceError> {
    let mut seen = FxHashSet::default();
    read_rows(file, &CHECKPOINT_COLUMNS, |row| {
        let id: Arc<str> = row.text("checkpoint_id")?.into();
        if !seen.insert(id.clone()) {
            return Err(row.error("checkpoint_id", format!("duplicate checkpoint `{id}`")));
        }
        let boundary = row.parse_with("boundary", parse_bool)?;
        let inbound_direction = match row.get("inbound_direction") {
            "" if boundary => {
                return Err(
                    row.error("inbound_direction", "a boundary checkpoint needs its inbound direction (1-8)".into())
                )
            }
            "" => None,
            text => Some(
                text.parse()
                    .ok()
                    .and_then(Direction::new)
                    .ok_or_else(|| row.error("inbound_direction", format!("`{text}` is not a direction 1-8")))?,
            ),
        };
        Ok(Checkpoint {
            id,
            name: row.get("name").to_owned(),
            lon: row.parse_with("lon", |s| parse_range(s, -180.0, 180.0))?,
            lat: row.parse_with("lat", |s| parse_range(s, -90.0, 90.0))?,
            region_id: row.region(regions)?,
            road_class: row.parse("road_class")?,
            boundary,
            inbound_direction,
            bus_lanes: row.parse_with("bus_lanes", parse_lanes)?,
            speed_limit_kmh: row
                .parse_with("speed_limit_kmh", |s| parse_range(s, 0.0, 300.0).map(|v| v.round() as u16))?,
        })
    })
}

pub(super) fn read_segments(
    file: &Path,
    checkpoints: &CheckpointIds,
    regions: &[Region],
) -> Result<Vec<Segment>, ReferenceError> {
    let mut seen = FxHashSet::default();
    let lookup = |row: &Row, field: &str| -> Result<CheckpointIdx, ReferenceError> {
        let id = row.text(field)?;
        checkpoints.get(id).copied().ok_or_else(|| row.error(field, format!("unknown checkpoint `{id}`")))
    };
    read_rows(file, &SEGMENT_COLUMNS, |row| {
        let id: Arc<str> = row.text("segment_id")?.into();
        if !seen.insert(id.clone()) {
            return Err(row.error("segment_id", format!("duplicate segment `{id}`")));
        }
        let (from, to) = (lookup(row, "from_checkpoint")?, lookup(row, "to_checkpoint")?);
        if from == to {
            return Err(row.error("to_checkpoint", "a segment must join two different checkpoints".into()));
        }
        Ok(Segment {
            id,
            from,
            to,
            length_m: row.parse_with("length_m", |s| parse_range(s, 1.0, 1e6))?,
            free_flow_kmh: row.parse_with("free_flow_kmh", |s| parse_range(s, 1.0, 300.0))?,
            road_class: row.parse("road_class")?,
            region_id: row.region(regions)?,
        })
    })
}

/// Reads every data row of a CSV file whose header has exactly `columns`.
fn read_rows<T>(
    file: &Path,
    columns: &[&str],
    mut each: impl FnMut(&Row) -> Result<T, ReferenceError>,
) -> Result<Vec<T>, ReferenceError> {
    let file_error = |message: String| ReferenceError::File { file: file.to_owned(), message };
    let mut reader =
        csv::ReaderBuilder::new().trim(csv::Trim::All).from_path(file).map_err(|e| file_error(e.to_string()))?;
    let headers = reader.headers().map_err(|e| file_error(e.to_string()))?.clone();
    let found: Vec<String> = headers.iter().map(|h| h.trim_start_matches('\u{feff}').to_owned()).collect();
    // Columns may come in any order, and extra columns are ignored.
    let positions: Vec<usize> =
        columns.iter().map(|c| found.iter().position(|f| f == c)).collect::<Option<_>>().ok_or_else(|| {
            ReferenceError::Line {
                file: file.to_owned(),
                line: 1,
                message: format!("header must have the columns `{}`, found `{}`", columns.join(","), found.join(",")),
            }
        })?;
    let mut out = Vec::new();
    for record in reader.records() {
        let record = record.map_err(|e| ReferenceError::Line {
            file: file.to_owned(),
            line: e.position().map_or(0, |p| p.line()),
            message: e.to_string(),
        })?;
        let line = record.position().map_or(0, |p| p.line());
        out.push(each(&Row { file: file.to_owned(), line, columns, positions: &positions, record })?);
    }
    Ok(out)
}

struct Row<'a> {
    file: PathBuf,
    line: u64,
    columns: &'a [&'a str],
    /// Where each of `columns` is in the file's rows.
    positions: &'a [usize],
    record: csv::StringRecord,
}

impl Row<'_> {
    fn error(&self, field: &str, message: String) -> ReferenceError {
        ReferenceError::Field { file: self.file.clone(), line: self.line, field: field.to_owned(), message }
    }

    fn get(&self, field: &str) -> &str {
        // Callers name only columns of this table, whose presence the header check ensured.
        let i = self.columns.iter().position(|c| *c == field).expect("known column");
        self.record.get(self.positions[i]).unwrap_or("")
    }

    fn text(&self, field: &str) -> Result<&str, ReferenceError> {
        match self.get(field) {
            "" => Err(self.error(field, "must not be empty".into())),
            text => Ok(text),
        }
    }

    fn parse<T: FromStr>(&self, field: &str) -> Result<T, ReferenceError>
    where
        T::Err: std::fmt::Display,
    {
        self.parse_with(field, |s| s.parse::<T>().map_err(|e| e.to_string()))
    }

    fn parse_with<T>(&self, field: &str, parse: impl Fn(&str) -> Result<T, String>) -> Result<T, ReferenceError> {
        let text = self.get(field);
        parse(text).map_err(|e| self.error(field, format!("`{text}`: {e}")))
    }

    fn region(&self, regions: &[Region]) -> Result<Arc<str>, ReferenceError> {
        let id = self.text("region_id")?;
        let region = regions.iter().find(|r| &*r.id == id);
        region
            .map(|r| r.id.clone())
            .ok_or_else(|| self.error("region_id", format!("unknown region `{id}` (not in regions.csv)")))
    }
}

fn parse_bool(s: &str) -> Result<bool, String> {
    match s.to_ascii_lowercase().as_str() {
        "true" | "1" | "yes" => Ok(true),
        "false" | "0" | "no" | "" => Ok(false),
        _ => Err("must be true or false".into()),
    }
}

fn parse_range(s: &str, min: f64, max: f64) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| "not a number".to_string())?;
    (min..=max).contains(&v).then_some(v).ok_or_else(|| format!("must be between {min} and {max}"))
}

fn parse_lanes(s: &str) -> Result<Vec<u8>, String> {
    s.split(';')
        .map(str::trim)
        .filter(|l| !l.is_empty())
        .map(|l| l.parse::<u8>().ok().filter(|n| *n >= 1).ok_or_else(|| format!("lane `{l}` is not a lane number")))
        .collect()
}

#[cfg(test)]
mod tests {
    use crate::reference::City;
    use std::path::Path;

    const REGIONS: &str = "region_id,name\nR1,北区\nR2,南区\n";
    const CHECKPOINTS: &str =
        "checkpoint_id,name,lon,lat,region_id,road_class,boundary,inbound_direction,bus_lanes,speed_limit_kmh\n\
        K1,一号,115.90,28.70,R1,arterial,false,,3,60\n\
        K2,二号,115.91,28.70,R1,secondary,false,,,40\n\
        B1,入城,115.80,28.70,R2,expressway,true,2,,100\n";
    const SEGMENTS: &str = "segment_id,from_checkpoint,to_checkpoint,length_m,free_flow_kmh,road_class,region_id\nS1,K1,K2,980,50,arterial,R1\nS2,K2,K1,980,50,arterial,R1\n";

    fn city_with(file: &str, text: &str) -> Result<City, String> {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [("regions.csv", REGIONS), ("checkpoints.csv", CHECKPOINTS), ("segments.csv", SEGMENTS)] {
            std::fs::write(dir.path().join(name), if name == file { text } else { body }).unwrap();
        }
        City::load(dir.path()).map_err(|e| e.to_string().replace(&format!("{}/", dir.path().display()), ""))
    }

    #[test]
    fn a_valid_city_loads_with_boundaries_bus_lanes_and_segments() {
        let city = city_with("", "").unwrap();
        assert_eq!(city.checkpoints.len(), 3);
        let b1 = city.checkpoint_idx("B1").unwrap();
        assert!(city.checkpoint(b1).boundary);
        assert_eq!(city.is_inbound(b1, crate::model::Direction::WEST_TO_EAST), Some(true));
        assert_eq!(city.is_inbound(b1, crate::model::Direction::EAST_TO_WEST), Some(false));
        assert_eq!(city.is_inbound(city.checkpoint_idx("K1").unwrap(), crate::model::Direction::EAST_TO_WEST), None);
        assert_eq!(city.checkpoint(city.checkpoint_idx("K1").unwrap()).bus_lanes, vec![3]);
        assert_eq!(city.segments[0].from, city.checkpoint_idx("K1").unwrap());
        assert!((city.segments[0].free_flow_ms() - 70_560.0).abs() < 1.0);
        assert!(city.restrictions.is_none());
        assert!(city.prefixes.origin("赣A").is_some(), "the shipped prefix table is the default");
    }

    #[test]
    fn errors_name_file_line_and_field() {
        let bad_lat = CHECKPOINTS.replace("28.70,R1,arterial", "north,R1,arterial");
        assert_eq!(
            city_with("checkpoints.csv", &bad_lat).unwrap_err(),
            "checkpoints.csv:2: field `lat`: `north`: not a number"
        );
        let bad_class = CHECKPOINTS.replace("secondary", "alley");
        assert_eq!(
            city_with("checkpoints.csv", &bad_class).unwrap_err(),
            "checkpoints.csv:3: field `road_class`: `alley`: `alley` is not one of expressway, arterial, secondary"
        );
        let no_inbound = CHECKPOINTS.replace("true,2,", "true,,");
        assert!(city_with("checkpoints.csv", &no_inbound)
            .unwrap_err()
            .starts_with("checkpoints.csv:4: field `inbound_direction`"));
        let unknown_region = CHECKPOINTS.replace("K2,二号,115.91,28.70,R1", "K2,二号,115.91,28.70,R9");
        assert_eq!(
            city_with("checkpoints.csv", &unknown_region).unwrap_err(),
            "checkpoints.csv:3: field `region_id`: unknown region `R9` (not in regions.csv)"
        );
        let dangling = SEGMENTS.replace("S2,K2,K1", "S2,K2,K7");
        assert_eq!(
            city_with("segments.csv", &dangling).unwrap_err(),
            "segments.csv:3: field `to_checkpoint`: unknown checkpoint `K7`"
        );
        let dup = format!("{REGIONS}R1,again\n");
        assert_eq!(
            city_with("regions.csv", &dup).unwrap_err(),
            "regions.csv:4: field `region_id`: duplicate region `R1`"
        );
        let header = SEGMENTS.replace("length_m", "length");
        assert!(city_with("segments.csv", &header)
            .unwrap_err()
            .starts_with("segments.csv:1: header must have the columns"));
    }

    #[test]
    fn columns_may_come_in_any_order_with_extras() {
        let reordered = "name,region_id,extra\n北区,R1,x\n南区,R2,y\n";
        let city = city_with("regions.csv", reordered).unwrap();
        assert_eq!(city.regions[1].id.as_ref(), "R2");
        assert_eq!(city.regions[1].name, "南区");
    }

    #[test]
    fn a_missing_file_is_named() {
        let err = City::load(Path::new("/nonexistent/city")).unwrap_err().to_string();
        assert!(err.starts_with("/nonexistent/city/regions.csv:"), "{err}");
    }

    #[test]
    fn a_city_prefix_table_replaces_the_shipped_one() {
        let dir = tempfile::tempdir().unwrap();
        for (name, body) in [
            ("regions.csv", REGIONS),
            ("checkpoints.csv", CHECKPOINTS),
            ("segments.csv", SEGMENTS),
            ("plate_prefixes.csv", "prefix,province,city\n赣A,江西,南昌\n"),
        ] {
            std::fs::write(dir.path().join(name), body).unwrap();
        }
        let city = City::load(dir.path()).unwrap();
        assert_eq!(city.prefixes.len(), 1);
        assert!(city.prefixes.origin("京A").is_none());
    }
}
