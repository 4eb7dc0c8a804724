//! Writing a simulated city folder and day to files.

use super::{SimDay, SAMPLE_RESTRICTIONS};
use crate::reference::City;
use anyhow::Context;
use std::fs::File;
use std::io::{BufWriter, Write};
use std::path::Path;

/// Writes `checkpoints.csv`, `segments.csv`, `regions.csv` and, when the city has rules, the
/// sample `restrictions.toml`.
pub fn write_city(city: &City, dir: &Path) -> anyhow::Result<()> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut regions = String::from("region_id,name\n");
    for r in &city.regions {
        regions += &format!("{},{}\n", r.id, r.name);
    }
    let mut checkpoints = String::from(
        "checkpoint_id,name,lon,lat,region_id,road_class,boundary,inbound_direction,bus_lanes,speed_limit_kmh\n",
    );
    for c in &city.checkpoints {
        let lanes: Vec<String> = c.bus_lanes.iter().map(u8::to_string).collect();
        let inbound = c.inbound_direction.map_or(String::new(), |d| d.code().to_string());
        checkpoints += &format!(
            "{},{},{:.6},{:.6},{},{},{},{},{},{}\n",
            c.id,
            c.name,
            c.lon,
            c.lat,
            c.region_id,
            c.road_class.as_str(),
            c.boundary,
            inbound,
            lanes.join(";"),
            c.speed_limit_kmh
        );
    }
    let mut segments =
        String::from("segment_id,from_checkpoint,to_checkpoint,length_m,free_flow_kmh,road_class,region_id\n");
    for s in &city.segments {
        segments += &format!(
            "{},{},{},{},{},{},{}\n",
            s.id,
            city.checkpoint(s.from).id,
            city.checkpoint(s.to).id,
            s.length_m,
            s.free_flow_kmh,
            s.road_class.as_str(),
            s.region_id
        );
    }
    let mut files = vec![("regions.csv", regions), ("checkpoints.csv", checkpoints), ("segments.csv", segments)];
    if city.restrictions.is_some() {
        files.push(("restrictions.toml", SAMPLE_RESTRICTIONS.to_string()));
    }
    for (name, text) in files {
        std::fs::write(dir.join(name), text).with_context(|| format!("writing {}", dir.join(name).display()))?;
    }
    Ok(())
}

/// Writes the passes (JSON lines, arrival order) and the labels (pretty JSON).
pub fn write_day(day: &SimDay, passes: &Path, labels: &Path) -> anyhow::Result<()> {
    let file = File::create(passes).with_context(|| format!("creating {}", passes.display()))?;
    let mut out = BufWriter::with_capacity(1 << 20, file);
    for e in &day.emissions {
        out.write_all(e.line.as_bytes())?;
        out.write_all(b"\n")?;
    }
    out.flush()?;
    std::fs::write(labels, serde_json::to_string_pretty(&day.labels)?)
        .with_context(|| format!("writing {}", labels.display()))?;
    Ok(())
}
