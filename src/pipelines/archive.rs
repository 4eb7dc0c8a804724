//! Clean-pass ETL and the daily archive: every valid, deduplicated pass in canonical JSON
//! (canonical field names, `ts` in epoch ms, police colour codes), one gzip-compressed part
//! file per local day and checkpoint interval: `<dir>/<YYYY-MM-DD>/part-<run>-<n>.jsonl.gz`.
//! Parts are finished at every checkpoint barrier, so a completed checkpoint never covers a
//! pass that is not in a complete part. A crash can leave a truncated last part and passes that
//! are archived again after the restart; `passflow backfill` reads what a truncated part holds
//! and deduplicates by pass id.

use crate::core::{Context, Operator, StateBlob};
use crate::model::{Pass, Text};
use crate::reference::City;
use crate::results::CleanPassRow;
use chrono::NaiveDate;
use chrono_tz::Tz;
use flate2::write::GzEncoder;
use flate2::Compression;
use std::collections::BTreeMap;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;

type Part = GzEncoder<BufWriter<std::fs::File>>;

pub struct Archive {
    city: Arc<City>,
    tz: Tz,
    dir: PathBuf,
    /// Distinguishes this run's parts from earlier runs'.
    run: i64,
    parts_written: u64,
    open: BTreeMap<NaiveDate, Part>,
}

impl Archive {
    /// Finishes the open files (at a checkpoint and at the end of input).
    fn close_files(&mut self) {
        if let Err(e) = self.finish() {
            panic!("finishing the pass archive under {}: {e}", self.dir.display());
        }
    }

    pub fn new(city: &Arc<City>, tz: Tz, dir: &Path) -> Archive {
        Archive {
            city: city.clone(),
            tz,
            dir: dir.to_owned(),
            run: chrono::Utc::now().timestamp_millis(),
            parts_written: 0,
            open: BTreeMap::new(),
        }
    }

    fn part(&mut self, day: NaiveDate) -> std::io::Result<&mut Part> {
        if !self.open.contains_key(&day) {
            let dir = self.dir.join(day.to_string());
            std::fs::create_dir_all(&dir)?;
            self.parts_written += 1;
            let file =
                std::fs::File::create(dir.join(format!("part-{}-{:06}.jsonl.gz", self.run, self.parts_written)))?;
            self.open.insert(day, GzEncoder::new(BufWriter::new(file), Compression::fast()));
        }
        Ok(self.open.get_mut(&day).expect("inserted above"))
    }

    fn write(&mut self, passes: &[Pass]) -> std::io::Result<()> {
        for p in passes {
            let line = p.clone().at(Text::new(&self.city.checkpoint(p.checkpoint).id)).to_canonical_json();
            let part = self.part(p.ts.local_date(self.tz))?;
            part.write_all(line.as_bytes())?;
            part.write_all(b"\n")?;
        }
        Ok(())
    }

    /// Finishes every open part and syncs it to disk.
    fn finish(&mut self) -> std::io::Result<()> {
        for (_, part) in std::mem::take(&mut self.open) {
            let file = part.finish()?.into_inner().map_err(|e| e.into_error())?;
            file.sync_all()?;
        }
        Ok(())
    }
}

impl Operator for Archive {
    fn name(&self) -> &'static str {
        "archive"
    }

    fn state_version(&self) -> u32 {
        1
    }

    fn process_batch(&mut self, passes: &[Pass], _ctx: &mut Context<'_>) {
        // Losing the archive silently would break backfills later: stop instead.
        if let Err(e) = self.write(passes) {
            panic!("writing the pass archive under {}: {e}", self.dir.display());
        }
    }

    fn on_checkpoint(&mut self, _id: u64, _ctx: &mut Context<'_>) {
        self.close_files();
    }

    fn on_close(&mut self, _ctx: &mut Context<'_>) {
        self.close_files();
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: 1, bytes: Vec::new() })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        crate::core::check_version(self.name(), blob.version, 1)
    }
}

/// Every valid, deduplicated pass in canonical JSON to the output (the clean-pass topic).
/// Stateless: exempt from lateness, and a replay after a restart sends a pass again under the
/// same key (its id).
pub struct CleanPasses {
    city: Arc<City>,
}

impl CleanPasses {
    pub fn new(city: &Arc<City>) -> CleanPasses {
        CleanPasses { city: city.clone() }
    }
}

impl Operator for CleanPasses {
    fn name(&self) -> &'static str {
        "clean_passes"
    }

    fn state_version(&self) -> u32 {
        1
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        ctx.out.clean_passes.extend(passes.iter().map(|p| CleanPassRow {
            pass_id: p.pass_id.clone(),
            line: p.clone().at(Text::new(&self.city.checkpoint(p.checkpoint).id)).to_canonical_json(),
        }));
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: 1, bytes: Vec::new() })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        crate::core::check_version(self.name(), blob.version, 1)
    }
}

/// The canonical lines archived for `day`, in file order; a truncated part gives what it holds.
pub fn read_archive_day(dir: &Path, day: NaiveDate) -> anyhow::Result<Vec<String>> {
    use std::io::BufRead;
    let day_dir = dir.join(day.to_string());
    let mut lines = Vec::new();
    if !day_dir.exists() {
        return Ok(lines);
    }
    let mut files: Vec<PathBuf> = std::fs::read_dir(&day_dir)?.filter_map(|e| e.ok().map(|e| e.path())).collect();
    files.sort();
    for file in files.iter().filter(|f| f.to_string_lossy().ends_with(".jsonl.gz")) {
        let reader = std::io::BufReader::new(flate2::read::MultiGzDecoder::new(std::fs::File::open(file)?));
        for line in reader.lines() {
            match line {
                Ok(l) if !l.is_empty() => lines.push(l),
                Ok(_) => {}
                Err(e) => {
                    tracing::warn!(file = %file.display(), error = %e, "archive part ends early (a crash while writing); its complete lines are used");
                    break;
                }
            }
        }
    }
    Ok(lines)
}
