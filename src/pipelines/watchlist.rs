//! The watch list: plates (with a reason and a severity) whose every pass raises a `watchlist`
//! alert, id derived from the pass. The list is a CSV file (`plate,plate_color,reason,severity`;
//! an empty colour matches every colour), changed at run time through the admin API, which
//! writes the file back so a restart keeps the changes. Passes are matched however late they
//! arrive.

use crate::core::{Context, Operator, StateBlob};
use crate::model::{stable_id, Pass, PlateRead, VehicleRef};
use crate::reference::City;
use crate::results::AlertRow;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

pub const WATCHLIST: &str = "watchlist";
pub const SEVERITIES: [&str; 3] = ["low", "medium", "high"];

/// One listed plate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchEntry {
    pub plate: String,
    /// Plate colour code; `None` matches every colour.
    #[serde(default)]
    pub plate_color: Option<u8>,
    pub reason: String,
    pub severity: String,
}

impl WatchEntry {
    /// Checks the entry: a readable plate, a known severity, a reason of sensible length.
    pub fn validate(&self) -> Result<(), String> {
        match PlateRead::parse(&self.plate) {
            PlateRead::Readable(p) if p.as_str() == self.plate => {}
            _ => return Err(format!("`{}` is not a plate", self.plate)),
        }
        if !SEVERITIES.contains(&self.severity.as_str()) {
            return Err(format!("severity `{}` is not one of low, medium, high", self.severity));
        }
        if self.reason.trim().is_empty() || self.reason.chars().count() > 200 {
            return Err("reason must be 1 to 200 characters".into());
        }
        Ok(())
    }
}

/// The shared watch list: read by the pipeline, changed by the admin API.
#[derive(Debug)]
pub struct WatchList {
    file: Option<PathBuf>,
    /// plate → entries (one per colour, or one for every colour)
    entries: RwLock<BTreeMap<String, Vec<WatchEntry>>>,
}

impl WatchList {
    /// An empty list kept in memory only.
    pub fn in_memory() -> Arc<WatchList> {
        Arc::new(WatchList { file: None, entries: RwLock::new(BTreeMap::new()) })
    }

    /// Loads `file` (a missing file is an empty list, created on the first change).
    pub fn load(file: &Path) -> anyhow::Result<Arc<WatchList>> {
        let mut entries: BTreeMap<String, Vec<WatchEntry>> = BTreeMap::new();
        if file.exists() {
            let mut reader = csv::Reader::from_path(file)?;
            for (i, row) in reader.deserialize::<WatchEntry>().enumerate() {
                let entry = row.map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), i + 2))?;
                entry.validate().map_err(|e| anyhow::anyhow!("{}:{}: {e}", file.display(), i + 2))?;
                entries.entry(entry.plate.clone()).or_default().push(entry);
            }
        }
        Ok(Arc::new(WatchList { file: Some(file.to_owned()), entries: RwLock::new(entries) }))
    }

    pub fn entries(&self) -> Vec<WatchEntry> {
        self.entries.read().expect("watch list lock").values().flatten().cloned().collect()
    }

    /// Adds or replaces the entry for its plate and colour; writes the file.
    pub fn put(&self, entry: WatchEntry) -> anyhow::Result<()> {
        entry.validate().map_err(|e| anyhow::anyhow!(e))?;
        let mut entries = self.entries.write().expect("watch list lock");
        let list = entries.entry(entry.plate.clone()).or_default();
        list.retain(|e| e.plate_color != entry.plate_color);
        list.push(entry);
        self.save(&entries)
    }

    /// Removes a plate's entries (of one colour, or all); returns how many went.
    pub fn remove(&self, plate: &str, plate_color: Option<u8>) -> anyhow::Result<usize> {
        let mut entries = self.entries.write().expect("watch list lock");
        let Some(list) = entries.get_mut(plate) else { return Ok(0) };
        let before = list.len();
        list.retain(|e| plate_color.is_some_and(|c| e.plate_color != Some(c)));
        let removed = before - list.len();
        if list.is_empty() {
            entries.remove(plate);
        }
        self.save(&entries)?;
        Ok(removed)
    }

    fn save(&self, entries: &BTreeMap<String, Vec<WatchEntry>>) -> anyhow::Result<()> {
        let Some(file) = &self.file else { return Ok(()) };
        if let Some(dir) = file.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let tmp = file.with_extension("csv.tmp");
        let mut writer = csv::Writer::from_path(&tmp)?;
        for e in entries.values().flatten() {
            writer.serialize(e)?;
        }
        writer.flush()?;
        drop(writer);
        std::fs::rename(&tmp, file)?;
        Ok(())
    }

    /// Each pass of `passes` whose vehicle the list holds, with the entry it matches (the
    /// colour's own, else the one for every colour). The list is read under one lock a batch,
    /// and an empty one is not looked at pass by pass.
    fn matches<'p>(&self, passes: &'p [Pass]) -> Vec<(&'p Pass, VehicleRef<'p>, WatchEntry)> {
        let entries = self.entries.read().expect("watch list lock");
        if entries.is_empty() {
            return Vec::new();
        }
        passes
            .iter()
            .filter_map(|pass| {
                let (plate, color) = pass.vehicle_ref()?;
                let list = entries.get(plate.as_str())?;
                let entry = list
                    .iter()
                    .find(|e| e.plate_color == Some(color.code()))
                    .or_else(|| list.iter().find(|e| e.plate_color.is_none()))?;
                Some((pass, (plate, color), entry.clone()))
            })
            .collect()
    }
}

pub struct Watch {
    city: Arc<City>,
    list: Arc<WatchList>,
}

impl Watch {
    pub fn new(city: &Arc<City>, list: Arc<WatchList>) -> Watch {
        Watch { city: city.clone(), list }
    }
}

impl Operator for Watch {
    fn name(&self) -> &'static str {
        WATCHLIST
    }

    fn state_version(&self) -> u32 {
        1
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        for (pass, (plate, color), entry) in self.list.matches(passes) {
            let checkpoint = self.city.checkpoint(pass.checkpoint);
            let details = serde_json::json!({
                "reason": entry.reason,
                "pass_id": &*pass.pass_id,
                "checkpoint_id": &*checkpoint.id,
                "checkpoint_name": &*checkpoint.name,
                "direction": pass.direction.code(),
                "lane": pass.lane,
            });
            ctx.out.alerts.push(AlertRow {
                alert_id: stable_id(WATCHLIST, &[pass.pass_id.as_bytes()]),
                kind: WATCHLIST,
                ts: pass.ts.ms(),
                plate: Some(plate.as_str().into()),
                plate_color: Some(color.code()),
                checkpoint_id: Some(checkpoint.id.clone()),
                segment_id: None,
                severity: SEVERITIES.iter().find(|s| **s == entry.severity).copied().unwrap_or("medium"),
                details: details.to_string(),
                status: "active",
                revision: 0,
            });
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        // The list is its file; the operator keeps nothing else.
        Ok(StateBlob { version: 1, bytes: Vec::new() })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        crate::core::check_version(self.name(), blob.version, 1)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::PlateColor;
    use crate::pipelines::test_support::{self as support, checkpoint};
    use crate::results::ResultBatch;

    #[test]
    fn a_listed_plate_raises_one_alert_per_pass_and_changes_persist_in_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let file = dir.path().join("watchlist.csv");
        let list = WatchList::load(&file).unwrap();
        let entry = WatchEntry {
            plate: "赣A12345".into(),
            plate_color: None,
            reason: "stolen".into(),
            severity: "high".into(),
        };
        list.put(entry.clone()).unwrap();
        assert!(list.put(WatchEntry { plate: "not a plate".into(), ..entry.clone() }).is_err());
        assert!(list.put(WatchEntry { severity: "urgent".into(), ..entry.clone() }).is_err());
        assert_eq!(WatchList::load(&file).unwrap().entries(), vec![entry.clone()], "the file holds the change");

        let city = support::city(vec![checkpoint("A", "R1")], &["R1"]);
        let mut op = Watch::new(&city, list.clone());
        let (mut out, mut late) = (ResultBatch::default(), Vec::new());
        let mut ctx = support::context(i64::MAX, 0, &mut out, &mut late);
        op.process_batch(&[support::pass("赣A12345", 0, 1_000), support::pass("赣A54321", 0, 2_000)], &mut ctx);
        assert_eq!(out.alerts.len(), 1);
        let a = &out.alerts[0];
        assert_eq!((a.kind, a.severity, a.ts, a.plate.as_deref()), (WATCHLIST, "high", 1_000, Some("赣A12345")));
        assert!(a.details.contains("stolen"));

        assert_eq!(list.remove("赣A12345", None).unwrap(), 1);
        assert!(WatchList::load(&file).unwrap().entries().is_empty());
        let (mut out, mut late) = (ResultBatch::default(), Vec::new());
        let mut ctx = support::context(i64::MAX, 0, &mut out, &mut late);
        op.process_batch(&[support::pass("赣A12345", 0, 3_000)], &mut ctx);
        assert!(out.alerts.is_empty());
    }

    #[test]
    fn a_colour_of_its_own_comes_before_the_entry_for_every_colour_and_unreadable_plates_match_nothing() {
        let list = WatchList::in_memory();
        let entry = |color: Option<u8>, reason: &str| WatchEntry {
            plate: "赣A12345".into(),
            plate_color: color,
            reason: reason.into(),
            severity: "low".into(),
        };
        list.put(entry(None, "any colour")).unwrap();
        list.put(entry(Some(PlateColor::Blue.code()), "blue")).unwrap();
        let city = support::city(vec![checkpoint("A", "R1")], &["R1"]);
        let mut op = Watch::new(&city, list);
        let blue = support::pass("赣A12345", 0, 1_000);
        let yellow = Pass { plate_color: PlateColor::Yellow, ..support::pass("赣A12345", 0, 2_000) };
        let unreadable = Pass { plate: PlateRead::Unreadable, ..support::pass("赣A12345", 0, 3_000) };
        let (mut out, mut late) = (ResultBatch::default(), Vec::new());
        let mut ctx = support::context(i64::MAX, 0, &mut out, &mut late);
        op.process_batch(&[blue, yellow, unreadable], &mut ctx);
        let reasons: Vec<(i64, bool)> = out.alerts.iter().map(|a| (a.ts, a.details.contains("\"blue\""))).collect();
        assert_eq!(reasons, [(1_000, true), (2_000, false)]);
        assert!(out.alerts[1].details.contains("any colour"));
    }
}
