//! Traffic-surge alerts (突变流量): a checkpoint's 5 min flow at least max(50, 2 × the median of
//! its previous 12 windows) for 2 consecutive windows — and, once a week of history exists,
//! also at least 2 × the same window a week earlier. A run of such windows is one alert, its id
//! a hash of the kind, the checkpoint and the run's first window; a run that grows is updated,
//! and one that a correction removes is marked `retracted`, never deleted. Windows without a
//! pass count 0.

use crate::core::window::{is_late, tumbling_start, window_runs};
use crate::core::{check_version, Context, Operator, StateBlob};
use crate::model::{stable_id, Pass};
use crate::reference::City;
use crate::results::AlertRow;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

pub const TRAFFIC_SURGE: &str = "traffic_surge";
const WINDOW_MS: i64 = 300_000;
const WEEK_MS: i64 = 7 * 86_400_000;
const LATE_LABEL: &str = "traffic_surge/5m";
const STATE_VERSION: u32 = 1;

/// The surge rule's thresholds.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SurgeRule {
    /// A window below this many passes never surges.
    pub min_passes: u32,
    /// … nor one below this many times the median of the previous windows …
    pub factor: f64,
    pub baseline_windows: usize,
    /// … nor below this many times the same window a week earlier (once a week is known).
    pub week_factor: f64,
    /// Consecutive windows that make an alert.
    pub consecutive: usize,
}

impl Default for SurgeRule {
    fn default() -> Self {
        SurgeRule { min_passes: 50, factor: 2.0, baseline_windows: 12, week_factor: 2.0, consecutive: 2 }
    }
}

/// What a window's judgement rests on.
#[derive(Clone, Copy, Debug, PartialEq)]
struct Judgement {
    passes: u32,
    median: f64,
    threshold: f64,
    week_before: Option<u32>,
    surges: bool,
}

/// Per-checkpoint 5 min counts: the input of the rule, for the live operator and the batch.
struct Counts<'a> {
    by_window: &'a BTreeMap<i64, Vec<u32>>,
    history_from: i64,
}

impl Counts<'_> {
    fn get(&self, cp: usize, w: i64) -> u32 {
        self.by_window.get(&w).map_or(0, |c| c[cp])
    }

    fn judge(&self, rule: &SurgeRule, cp: usize, w: i64) -> Judgement {
        let passes = self.get(cp, w);
        let n = rule.baseline_windows as i64;
        let mut previous: Vec<u32> = (1..=n).map(|k| self.get(cp, w - k * WINDOW_MS)).collect();
        previous.sort_unstable();
        let median = match previous.len() {
            0 => 0.0,
            len if len % 2 == 1 => f64::from(previous[len / 2]),
            len => (f64::from(previous[len / 2 - 1]) + f64::from(previous[len / 2])) / 2.0,
        };
        let threshold = f64::from(rule.min_passes).max(rule.factor * median);
        let week_before = (w - WEEK_MS >= self.history_from).then(|| self.get(cp, w - WEEK_MS));
        let surges = f64::from(passes) >= threshold
            && week_before.is_none_or(|before| f64::from(passes) >= rule.week_factor * f64::from(before));
        Judgement { passes, median, threshold, week_before, surges }
    }

    /// The runs of surging windows of `cp` from `from` to `to` (window starts, inclusive) that
    /// are long enough, each with its judgements. A run that began before `from` is found whole.
    fn runs(&self, rule: &SurgeRule, cp: usize, from: i64, to: i64) -> Vec<Vec<(i64, Judgement)>> {
        let mut start = from;
        while start - WINDOW_MS >= self.first_window() && self.judge(rule, cp, start - WINDOW_MS).surges {
            start -= WINDOW_MS;
        }
        let (mut runs, mut run) = (Vec::new(), Vec::new());
        let mut w = start;
        while w <= to {
            let j = self.judge(rule, cp, w);
            if j.surges {
                run.push((w, j));
            } else if !run.is_empty() {
                runs.push(std::mem::take(&mut run));
            }
            w += WINDOW_MS;
        }
        runs.push(run);
        runs.retain(|r| r.len() >= rule.consecutive.max(1));
        runs
    }

    fn first_window(&self) -> i64 {
        self.by_window.keys().next().copied().unwrap_or(i64::MAX)
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Raised {
    /// The windows of the run when last emitted.
    windows: Vec<i64>,
    active: bool,
    revision: u32,
}

#[derive(Clone, Debug, Default, Serialize, Deserialize)]
struct State {
    counts: BTreeMap<i64, Vec<u32>>,
    history_from: Option<i64>,
    /// The next window start to judge for the first time.
    next: Option<i64>,
    /// Per checkpoint: the earliest judged window whose count changed since.
    dirty_from: BTreeMap<u32, i64>,
    /// (checkpoint, first window of the run) → what was raised.
    #[serde(with = "crate::core::pairs")]
    raised: BTreeMap<(u32, i64), Raised>,
}

pub struct TrafficSurge {
    city: Arc<City>,
    rule: SurgeRule,
    state: State,
}

impl TrafficSurge {
    pub fn new(city: &Arc<City>, rule: SurgeRule) -> TrafficSurge {
        TrafficSurge { city: city.clone(), rule, state: State::default() }
    }

    /// Judges `cp` from `from` to `to` and emits what changed among the runs from there on.
    fn judge(&mut self, cp: u32, from: i64, to: i64, out: &mut Vec<AlertRow>) {
        let counts =
            Counts { by_window: &self.state.counts, history_from: self.state.history_from.unwrap_or(i64::MAX) };
        let runs = counts.runs(&self.rule, cp as usize, from, to);
        let scan_from = runs.first().map_or(from, |r| r[0].0.min(from));
        let checkpoint_id = self.city.checkpoints[cp as usize].id.clone();
        let mut seen = Vec::new();
        for run in &runs {
            let start = run[0].0;
            seen.push(start);
            let windows: Vec<i64> = run.iter().map(|(w, _)| *w).collect();
            let raised = self.state.raised.get(&(cp, start));
            if raised.is_some_and(|r| r.active && r.windows == windows) {
                continue;
            }
            let revision = raised.map_or(0, |r| r.revision + 1);
            self.state.raised.insert((cp, start), Raised { windows, active: true, revision });
            out.push(surge_alert(&checkpoint_id, &self.rule, run, "active", revision));
        }
        let gone: Vec<(u32, i64)> = self
            .state
            .raised
            .range((cp, scan_from)..=(cp, to))
            .filter(|(k, r)| r.active && !seen.contains(&k.1))
            .map(|(k, _)| *k)
            .collect();
        for key in gone {
            let r = self.state.raised.get_mut(&key).expect("listed above");
            r.active = false;
            r.revision += 1;
            let run: Vec<(i64, Judgement)> =
                r.windows.iter().map(|w| (*w, counts.judge(&self.rule, cp as usize, *w))).collect();
            out.push(surge_alert(&checkpoint_id, &self.rule, &run, "retracted", r.revision));
        }
    }
}

fn surge_alert(
    checkpoint_id: &Arc<str>,
    rule: &SurgeRule,
    run: &[(i64, Judgement)],
    status: &'static str,
    revision: u32,
) -> AlertRow {
    let start = run[0].0;
    let windows: Vec<serde_json::Value> = run
        .iter()
        .map(|(w, j)| {
            serde_json::json!({
                "window_start": w,
                "passes": j.passes,
                "median_previous": j.median,
                "threshold": j.threshold,
                "week_before": j.week_before,
            })
        })
        .collect();
    let details = serde_json::json!({
        "checkpoint_id": &**checkpoint_id,
        "window_s": WINDOW_MS / 1000,
        "windows": windows,
        "rule": rule,
    });
    AlertRow {
        alert_id: surge_id(checkpoint_id, start),
        kind: TRAFFIC_SURGE,
        ts: start + rule.consecutive.max(1) as i64 * WINDOW_MS,
        plate: None,
        plate_color: None,
        checkpoint_id: Some(checkpoint_id.clone()),
        segment_id: None,
        severity: "medium",
        details: details.to_string(),
        status,
        revision,
    }
}

/// The id of the surge at `checkpoint_id` whose run starts at `window_start`.
pub fn surge_id(checkpoint_id: &str, window_start: i64) -> String {
    stable_id(TRAFFIC_SURGE, &[checkpoint_id.as_bytes(), window_start.to_string().as_bytes()])
}

impl Operator for TrafficSurge {
    fn name(&self) -> &'static str {
        TRAFFIC_SURGE
    }

    fn state_version(&self) -> u32 {
        STATE_VERSION
    }

    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>) {
        let width = self.city.checkpoints.len();
        // Runs of one window: its counts looked up once a run, not once a pass.
        for (first, w, run) in window_runs(passes, WINDOW_MS) {
            if is_late(w + WINDOW_MS, ctx.watermark, ctx.allowed_lateness_ms) {
                ctx.late.extend((first..first + run.len()).map(|i| (i, LATE_LABEL)));
                continue;
            }
            let counts = self.state.counts.entry(w).or_insert_with(|| vec![0; width]);
            for pass in run {
                counts[pass.checkpoint.0 as usize] += 1;
            }
            self.state.history_from = Some(self.state.history_from.map_or(w, |h| h.min(w)));
            if self.state.next.is_some_and(|next| w < next) {
                for pass in run {
                    let d = self.state.dirty_from.entry(pass.checkpoint.0).or_insert(w);
                    *d = (*d).min(w);
                }
            }
        }
    }

    fn on_watermark(&mut self, ctx: &mut Context<'_>) {
        let Some(first) = self.state.counts.keys().next().copied() else { return };
        // The last window the watermark has completed.
        let last = tumbling_start(ctx.watermark.saturating_sub(WINDOW_MS), WINDOW_MS).min(
            self.state.counts.keys().next_back().copied().unwrap_or(first) + self.rule.consecutive as i64 * WINDOW_MS,
        );
        let next = self.state.next.unwrap_or(first);
        let mut dirty = std::mem::take(&mut self.state.dirty_from);
        if last >= next {
            for cp in 0..self.city.checkpoints.len() as u32 {
                let d = dirty.entry(cp).or_insert(next);
                *d = (*d).min(next);
            }
            self.state.next = Some(last + WINDOW_MS);
        }
        let to = self.state.next.map_or(last, |n| n - WINDOW_MS);
        for (cp, from) in dirty {
            self.judge(cp, from, to, &mut ctx.out.alerts);
        }
        // Keep a week of counts behind the oldest window that can still change, plus the
        // windows its baseline reads.
        let keep = ctx
            .watermark
            .saturating_sub(ctx.allowed_lateness_ms)
            .saturating_sub(WEEK_MS + (self.rule.baseline_windows as i64 + 2) * WINDOW_MS);
        self.state.counts.retain(|w, _| *w >= keep);
        self.state.raised.retain(|(_, start), _| *start >= keep);
    }

    /// A surge raised or retracted after the restored checkpoint is taken as such (with its
    /// revision, so what the replay emits supersedes it), and its checkpoint is judged again
    /// from the run's first window: the replay raises the same run (nothing to emit), changes
    /// it, raises it again or retracts it.
    fn adopt_alerts(&mut self, alerts: &[AlertRow]) {
        for alert in alerts.iter().filter(|a| a.kind == TRAFFIC_SURGE) {
            let Some(cp) = alert.checkpoint_id.as_deref().and_then(|id| self.city.checkpoint_idx(id)) else { continue };
            let Ok(details) = serde_json::from_str::<serde_json::Value>(&alert.details) else { continue };
            let windows: Vec<i64> = details["windows"]
                .as_array()
                .map(|ws| ws.iter().filter_map(|w| w["window_start"].as_i64()).collect())
                .unwrap_or_default();
            let Some(&start) = windows.first() else { continue };
            // Counts no longer held cannot judge it again.
            if self.state.counts.keys().next().is_none_or(|first| start < *first) {
                continue;
            }
            let key = (cp.0, start);
            if self.state.raised.get(&key).is_none_or(|r| r.revision < alert.revision) {
                let active = alert.status == "active";
                self.state.raised.insert(key, Raised { windows, active, revision: alert.revision });
            }
            // Windows not judged yet are judged anyway, with everything raised among them.
            if self.state.next.is_some_and(|next| start < next) {
                let d = self.state.dirty_from.entry(cp.0).or_insert(start);
                *d = (*d).min(start);
            }
        }
    }

    fn snapshot(&self) -> anyhow::Result<StateBlob> {
        Ok(StateBlob { version: STATE_VERSION, bytes: serde_json::to_vec(&self.state)? })
    }

    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()> {
        check_version(self.name(), blob.version, STATE_VERSION)?;
        let state: State = serde_json::from_slice(&blob.bytes)?;
        anyhow::ensure!(
            state.counts.values().all(|c| c.len() == self.city.checkpoints.len()),
            "traffic_surge state was taken with another number of checkpoints"
        );
        self.state = state;
        Ok(())
    }
}

/// The batch computation: the ids of every surge over all passes (the runs of the whole span).
pub fn batch_traffic_surge(city: &City, passes: &[Pass], rule: SurgeRule) -> Vec<String> {
    let mut by_window: BTreeMap<i64, Vec<u32>> = BTreeMap::new();
    for p in passes {
        by_window.entry(tumbling_start(p.ts.ms(), WINDOW_MS)).or_insert_with(|| vec![0; city.checkpoints.len()])
            [p.checkpoint.0 as usize] += 1;
    }
    let (Some(first), Some(last)) = (by_window.keys().next().copied(), by_window.keys().next_back().copied()) else {
        return Vec::new();
    };
    let counts = Counts { by_window: &by_window, history_from: first };
    let mut ids: Vec<String> = (0..city.checkpoints.len())
        .flat_map(|cp| {
            counts
                .runs(&rule, cp, first, last + rule.consecutive as i64 * WINDOW_MS)
                .into_iter()
                .map(move |run| surge_id(&city.checkpoints[cp].id, run[0].0))
        })
        .collect();
    ids.sort();
    ids
}

#[cfg(test)]
#[path = "traffic_surge_tests.rs"]
mod tests;
