//! Reference data of a city: checkpoints, road segments, regions, plate prefixes and
//! restriction rules, loaded from a city folder with errors that name the file, line and field.
//!
//! `tables.rs` reads the three required CSV files, `prefixes.rs` the plate-prefix table (a
//! complete table ships with passflow), `restrictions.rs` the optional restriction rules.

mod prefixes;
mod restrictions;
mod tables;

pub use prefixes::{Origin, OriginScope, PrefixTable};
pub use restrictions::{Calendar, RestrictedVehicle, RestrictionRule, RestrictionRules, Weekday};
pub use tables::{Checkpoint, Region, RoadClass, Segment};

use crate::model::{CheckpointIdx, Direction, Text};
use rustc_hash::FxHashMap;
use std::path::{Path, PathBuf};

/// A reference-data error, naming where it is.
#[derive(Debug, thiserror::Error)]
pub enum ReferenceError {
    #[error("{file}:{line}: field `{field}`: {message}")]
    Field { file: PathBuf, line: u64, field: String, message: String },
    #[error("{file}:{line}: {message}")]
    Line { file: PathBuf, line: u64, message: String },
    #[error("{file}: {message}")]
    File { file: PathBuf, message: String },
}

/// Everything passflow knows about a city's roads.
#[derive(Clone, Debug)]
pub struct City {
    pub checkpoints: Vec<Checkpoint>,
    pub segments: Vec<Segment>,
    pub regions: Vec<Region>,
    pub prefixes: PrefixTable,
    pub restrictions: Option<RestrictionRules>,
    /// Why `restrictions.toml` could not be used, when it could not: the restriction pipeline
    /// reports it; everything else runs.
    pub restrictions_error: Option<String>,
    by_id: CheckpointIds,
}

impl City {
    /// Loads a city folder: `checkpoints.csv`, `segments.csv`, `regions.csv`, and optionally
    /// `plate_prefixes.csv` (replacing the shipped table) and `restrictions.toml`.
    pub fn load(dir: &Path) -> Result<City, ReferenceError> {
        let regions = tables::read_regions(&dir.join("regions.csv"))?;
        let checkpoints = tables::read_checkpoints(&dir.join("checkpoints.csv"), &regions)?;
        let by_id = index(&checkpoints);
        let segments = tables::read_segments(&dir.join("segments.csv"), &by_id, &regions)?;
        let prefix_file = dir.join("plate_prefixes.csv");
        let prefixes = if prefix_file.exists() { PrefixTable::read(&prefix_file)? } else { PrefixTable::shipped() };
        let restriction_file = dir.join("restrictions.toml");
        let (restrictions, restrictions_error) = match restriction_file.exists() {
            false => (None, None),
            true => match RestrictionRules::read(&restriction_file, &regions, &by_id) {
                Ok(rules) => (Some(rules), None),
                Err(e) => {
                    tracing::error!(error = %e, "restriction rules not loaded; every other pipeline runs");
                    (None, Some(e.to_string()))
                }
            },
        };
        Ok(City { checkpoints, segments, regions, prefixes, restrictions, restrictions_error, by_id })
    }

    /// Builds a city from tables already in memory (the simulator does this).
    pub fn from_parts(
        checkpoints: Vec<Checkpoint>,
        segments: Vec<Segment>,
        regions: Vec<Region>,
        restrictions: Option<RestrictionRules>,
    ) -> City {
        let by_id = index(&checkpoints);
        City {
            checkpoints,
            segments,
            regions,
            prefixes: PrefixTable::shipped(),
            restrictions,
            restrictions_error: None,
            by_id,
        }
    }

    /// The checkpoint of an id given as `&str`, or as [`Text`] (a decoded pass's, then compared
    /// inline).
    pub fn checkpoint_idx<Q>(&self, id: &Q) -> Option<CheckpointIdx>
    where
        Text: std::borrow::Borrow<Q>,
        Q: std::hash::Hash + Eq + ?Sized,
    {
        self.by_id.get(id).copied()
    }

    pub fn checkpoint(&self, idx: CheckpointIdx) -> &Checkpoint {
        &self.checkpoints[idx.0 as usize]
    }

    /// Whether a pass in `direction` at this checkpoint enters the city (`Some(true)`), leaves it
    /// (`Some(false)`), or the checkpoint is not on the boundary (`None`).
    pub fn is_inbound(&self, idx: CheckpointIdx, direction: Direction) -> Option<bool> {
        let cp = self.checkpoint(idx);
        cp.boundary.then(|| cp.inbound_direction == Some(direction))
    }
}

/// Checkpoints by id. Keyed by [`Text`], so a decoded pass's id (a `Text` too) is looked up
/// comparing inline buffers, not by a call to compare slices; `&str` look-ups work as well.
pub type CheckpointIds = FxHashMap<Text, CheckpointIdx>;

fn index(checkpoints: &[Checkpoint]) -> CheckpointIds {
    checkpoints.iter().enumerate().map(|(i, c)| (Text::new(&c.id), CheckpointIdx(i as u32))).collect()
}

/// Great-circle distance in metres (haversine, Earth radius 6,371,008.8 m).
pub fn haversine_m(a: (f64, f64), b: (f64, f64)) -> f64 {
    const R: f64 = 6_371_008.8;
    let (lon1, lat1) = (a.0.to_radians(), a.1.to_radians());
    let (lon2, lat2) = (b.0.to_radians(), b.1.to_radians());
    let h = ((lat2 - lat1) / 2.0).sin().powi(2) + lat1.cos() * lat2.cos() * ((lon2 - lon1) / 2.0).sin().powi(2);
    2.0 * R * h.sqrt().asin()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn haversine_of_one_degree_of_latitude_is_about_111_km() {
        let d = haversine_m((116.0, 39.0), (116.0, 40.0));
        assert!((d - 111_195.0).abs() < 10.0, "{d}");
        assert_eq!(haversine_m((116.0, 39.0), (116.0, 39.0)), 0.0);
    }
}
