//! Last-digit restriction ETL (尾号限行): every pass of a restricted vehicle inside a rule's zone
//! and hours on a day the rule applies (holidays and working weekends from the calendar) is a
//! violation, written with its rule; per local day, checkpoint and rule, a summary of
//! violations and distinct vehicles. Violations do not depend on order, so they always take a
//! pass however late; a summary stays open until its day ends plus the allowed lateness.

use crate::core::window::{is_late, LocalDays};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::Pass;
use crate::reference::{City, RestrictedVehicle};
use crate::results::{RestrictionSummaryRow, RestrictionViolationRow};
use chrono::{NaiveDate, Timelike};
use chrono_tz::Tz;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Arc;

const SUMMARY_LATE_LABEL: &str = "restriction_summary/day";
const STATE_VERSION: u32 = 1;

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct Summary {
    violations: u32,
    /// Plates with their colour code, `plate/colour`.
    vehicles: BTreeSet<String>,
    dirty: bool,
}

pub struct Restrictions {
    city: Arc<City>,
    days_of: LocalDays,
    local_prefixes: Vec<String>,
    /// (day, checkpoint, rule index) → summary.
    summaries: BTreeMap<(NaiveDate, u32, u32), Summary>,
    /// For each checkpoint, the rules whose zone holds it (indices, in the rules' order): a
    /// pass outside every zone is looked at no further.
    zones: Vec<Vec<u32>>,
}

impl Restrictions {
    pub fn new(city: &Arc<City>, tz: Tz, local_prefixes: &[String]) -> Restrictions {
        Restrictions {
            city: city.clone(),
            days_of: LocalDays::new(tz),
            local_prefixes: local_prefixes.to_vec(),
            summaries: BTreeMap::new(),
            zones: city
                .checkpoints
                .iter()
                .map(|checkpoint| {
                    let rules = city.restrictions.iter().flat_map(|r| r.rules.iter().enumerate());
                    rules.filter(|(_, rule)| rule.covers(checkpoint)).map(|(i, _)| i as u32).collect()
                })
                .collect(),
        }
    }

    /// The local day of `ts`, when it ends, and the local time of day in hours.
    fn local(&mut self, ts: i64) -> (NaiveDate, i64, f64) {
        let (day, start, end) = self.days_of.of(ts);
        let hour = if end - start == crate::model::DAY_MS {
            (ts - start) as f64 / 3_600_000.0
        } else {
            // A day with a clock change: read the wall clock.
            let t = crate::model::EventTime(ts).to_datetime(self.days_of.tz());
            f64::from(t.hour()) + f64::from(t.minute()) / 60.0 + f64::from(t.second()) / 3600.0
        };
        (day, end, hour)
    }

    fn emit(&mut self, out: &mut Vec<RestrictionSummaryRow>) {
        let Some(rules) = &self.city.restrictions else { return };
        for ((day, cp, rule), s) in self.summaries.iter_mut().filter(|(_, s)| s.dirty) {
            s.dirty = false;
            out.push(RestrictionSummaryRow {
                day: day.to_string(),
                checkpoint_id: self.city.checkpoints[*cp as usize].id.clone(),
                rule_id: rules.rules[*rule as usize].id.as_str().into(),
                violations: s.violations,
                vehicles: s.vehicles.len() as u32,
            });
        }
    }
}

/// What the rules look at of a pass's vehicle; `None` when its plate was unreadable.
fn restricted<'p>(local_prefixes: &[String], pass: &'p Pass) -> Option<RestrictedVehicle<'p>> {
    let (plate, color) = pass.vehicle_ref()?;
    let local = local_prefixes.iter().any(|p| plate.as_str().starts_with(p.as_str()));
    Some(RestrictedVehicle { plate, color, plate_type: &pass.plate_type, local })
}

/// The rules one pass violates: (rule index, rule id), each rule judged on its own (the batch
/// computation's way; the operator looks only at the rules of the pass's checkpoint).
fn violations<'a>(
    city: &'a City,
    local_prefixes: &[String],
    pass: &Pass,
    day: NaiveDate,
    hour: f64,
) -> Vec<(u32, &'a str)> {
    let (Some(rules), Some(restricted)) = (city.restrictions.as_ref(), restricted(local_prefixes, pass)) else {
        return Vec::new();
    };
    let checkpoint = city.checkpoint(pass.checkpoint);
    rules
        .rules
        .iter()
        .enumerate()
        .filter(|(_, rule)| rule.covers(checkpoint) && rule.in_hours(hour) && rule.restricts(rules, day, &restricted))
        .map(|(i, rule)| (i as u32, rule.id.as_str()))
        .collect()
}

impl Operator for Restrictions {
    fn name(&self) -> &'static str {
        "restrictions"
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let city = self.city.clone();
        let Some(rules) = &city.restrictions else { return };
        for (i, pass) in passes.iter().enumerate() {
            let cp = pass.checkpoint.0;
            if self.zones[cp as usize].is_empty() {
                continue;
            }
            let Some(vehicle) = restricted(&self.local_prefixes, pass) else { continue };
            let (day, end, hour) = self.local(pass.ts.ms());
            let mut in_force =
                self.zones[cp as usize].iter().filter(|r| rules.rules[**r as usize].in_hours(hour)).peekable();
            if in_force.peek().is_none() {
                continue;
            }
            let (plate, color) = (vehicle.plate, vehicle.color);
            let summary_open = !is_late(end, ctx.watermark, ctx.allowed_lateness_ms);
            for &rule in in_force.filter(|r| rules.rules[**r as usize].restricts(rules, day, &vehicle)) {
                ctx.out.restriction_violations.push(RestrictionViolationRow {
                    pass_id: pass.pass_id.clone(),
                    rule_id: rules.rules[rule as usize].id.as_str().into(),
                    plate: plate.as_str().into(),
                    plate_color: color.code(),
                    checkpoint_id: city.checkpoint(pass.checkpoint).id.clone(),
                    ts: pass.ts.ms(),
                    day: day.to_string(),
                });
                if !summary_open {
                    ctx.late.push((i, SUMMARY_LATE_LABEL));
                    continue;
                }
                let s = self.summaries.entry((day, cp, rule)).or_default();
                s.violations += 1;
                s.vehicles.insert(vehicle_label(plate.as_str(), color.code()));
                s.dirty = true;
            }
        }
        self.emit(&mut ctx.out.restriction_summary);
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        self.emit(&mut ctx.out.restriction_summary);
        let (watermark, lateness, days_of) = (ctx.watermark, ctx.allowed_lateness_ms, &self.days_of);
        self.summaries.retain(|(day, _, _), _| !is_late(days_of.end(*day), watermark, lateness));
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        let stored: Vec<(&(NaiveDate, u32, u32), &Summary)> = self.summaries.iter().collect();
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&stored)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let stored: Vec<((NaiveDate, u32, u32), Summary)> = serde_json::from_slice(&blob.bytes)?;
        let rules = self.city.restrictions.as_ref().map_or(0, |r| r.rules.len());
        anyhow::ensure!(
            stored
                .iter()
                .all(|((_, cp, rule), _)| (*cp as usize) < self.city.checkpoints.len() && (*rule as usize) < rules),
            "restrictions state names a checkpoint or rule this city does not have"
        );
        self.summaries = stored.into_iter().collect();
        Ok(())
    }
}

fn vehicle_label(plate: &str, color: u8) -> String {
    format!("{plate}/{color}")
}

/// The batch computation: every violation as (pass_id, rule_id), and summaries by (day,
/// checkpoint, rule) → (violations, vehicles).
#[allow(clippy::type_complexity)]
pub fn batch_restrictions(
    city: &City,
    tz: Tz,
    local_prefixes: &[String],
    passes: &[Pass],
) -> (BTreeSet<(String, String)>, BTreeMap<(String, String, String), (u32, u32)>) {
    let mut op = Restrictions::new(&Arc::new(city.clone()), tz, local_prefixes);
    let (mut found, mut summaries) = (BTreeSet::new(), BTreeMap::<_, (u32, BTreeSet<String>)>::new());
    for p in passes {
        let Some(v) = p.vehicle() else { continue };
        let (day, _, hour) = op.local(p.ts.ms());
        for (_, rule) in violations(city, local_prefixes, p, day, hour) {
            found.insert((p.pass_id.to_string(), rule.to_owned()));
            let s = summaries
                .entry((day.to_string(), city.checkpoint(p.checkpoint).id.to_string(), rule.to_owned()))
                .or_default();
            s.0 += 1;
            s.1.insert(vehicle_label(v.plate.as_str(), v.color.code()));
        }
    }
    (found, summaries.into_iter().map(|(k, (n, v))| (k, (n, v.len() as u32))).collect())
}

#[cfg(test)]
#[path = "restrictions_tests.rs"]
mod tests;
