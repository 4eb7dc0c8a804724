//! Scale-out's partial results. Each input partition's per-vehicle task counts flows, origins,
//! spot speeds and Top-N's 5 s buckets over its own passes, and sums its vehicles' segment
//! traversals per segment and window; it sends every row it emits — a partial result, the
//! task's total so far for that (key, window) — to the internal topic
//! `kafka.scale_out.partials_topic`, to the partition its aggregate key hashes to (so one key's
//! partials from every input partition meet in one partition of the topic), with the task's
//! watermark to every partition after them; a step's partials for one partition travel in one
//! message. A merge task per partition of that topic ([`Merge`]) adds the partials up and
//! writes a (key, window) once every input partition's watermark has passed the window's end,
//! and again whenever a late partial changes the sum. Top-N checkpoints is one key (the city's
//! ranking), and so is congestion (areas, Top-N segments and sudden congestion need every
//! segment): their merge tasks rank and judge the sums as one instance does
//! ([`SlidingRanking`], [`CongestionWindows`]).
//!
//! Adding up is exact: a vehicle's passes are all in one input partition, so a flow (passes),
//! an origin count (distinct vehicles) or a segment's traversals is the sum of the partitions'
//! own, and speeds and travel times are summed in whole thousandths of a km/h and milliseconds,
//! so their means do not depend on the order either. A partial is the task's total, not an
//! increment: a task that restarts from an earlier checkpoint sends totals again, the same or
//! older ones, and the merge keeps each partition's latest — the largest count, or for
//! congestion (whose totals also shrink when a late pass splits a traversal) the one with the
//! most updates — never counting anything twice nor going back.

use super::delivery::AckedProducer;
use super::source::Fetched;
use super::KafkaConfig;
use crate::pipelines::{
    mean_kmh, CongestionEnv, CongestionWindows, RankedKeys, SegmentSums, SlidingRanking, CHECKPOINT_METRIC,
    SEGMENT_METRIC, TOP_N_WINDOW_S,
};
use crate::reference::City;
use crate::results::AlertRow;
use crate::results::{CheckpointSpeedRow, FlowCountRow, OriginCountRow, ResultBatch};
use anyhow::Context;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;

const SCHEMA: u32 = 1;

/// A message of the partials topic.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "snake_case")]
pub enum Partial {
    /// Input partition `from`'s flow count so far.
    Flow { from: u32, level: String, key_id: String, window_s: u32, window_start: i64, passes: u64 },
    /// Input partition `from`'s distinct vehicles so far.
    Origin {
        from: u32,
        region_id: String,
        window_start: i64,
        origin_province: String,
        origin_city: String,
        scope: String,
        vehicles: u64,
    },
    /// Input partition `from`'s spot speeds so far: how many, and their sum in thousandths of
    /// a km/h.
    Speed { from: u32, checkpoint_id: String, window_s: u32, window_start: i64, samples: u32, sum_milli: i64 },
    /// Input partition `from`'s passes at a checkpoint in one 5 s bucket so far (Top-N).
    TopN { from: u32, metric: String, key_id: String, bucket_start: i64, count: u64, updates: u64 },
    /// Input partition `from`'s traversal sums of a segment in one window so far (congestion).
    Segment {
        from: u32,
        segment_id: String,
        window_s: u32,
        window_start: i64,
        traversals: u32,
        dt_ms: i64,
        updates: u32,
    },
    /// Input partition `from`'s watermark: every partial of a window ending by then was sent
    /// before it.
    Watermark { from: u32, watermark: i64 },
    /// Input partition `from` has been read to its end and every window of it closed (bounded runs).
    End { from: u32 },
}

/// A message: one input partition's partials of one step for one partition of the topic, in
/// their order.
#[derive(Serialize, Deserialize)]
struct Envelope<'a> {
    schema: u32,
    partials: std::borrow::Cow<'a, [Partial]>,
}

/// The most partials one message carries (a step that closes many windows sends several).
const PER_MESSAGE: usize = 2000;

impl Partial {
    /// The partials a message of the topic carries, in their order.
    pub fn read(message: &Fetched) -> anyhow::Result<Vec<Partial>> {
        let bytes = message.payload.as_deref().unwrap_or_default();
        let envelope: Envelope = serde_json::from_slice(bytes)
            .with_context(|| format!("message {} of the partials topic is not a partial result", message.offset))?;
        anyhow::ensure!(
            envelope.schema == SCHEMA,
            "message {} of the partials topic has schema {}; this build reads {SCHEMA}",
            message.offset,
            envelope.schema
        );
        Ok(envelope.partials.into_owned())
    }

    /// Takes the flow, origin, spot speed and Top-N bucket rows out of `batch`: input partition
    /// `from`'s partials.
    pub fn take_rows(from: u32, batch: &mut ResultBatch) -> Vec<Partial> {
        let flows = std::mem::take(&mut batch.flow_counts).into_iter().map(|r| Partial::Flow {
            from,
            level: r.level.to_owned(),
            key_id: r.key_id.to_string(),
            window_s: r.window_s,
            window_start: r.window_start,
            passes: r.passes,
        });
        let origins = std::mem::take(&mut batch.origin_counts).into_iter().map(|r| Partial::Origin {
            from,
            region_id: r.region_id.to_string(),
            window_start: r.window_start,
            origin_province: r.origin_province.to_string(),
            origin_city: r.origin_city.to_string(),
            scope: r.scope.to_owned(),
            vehicles: r.vehicles,
        });
        let speeds = std::mem::take(&mut batch.checkpoint_speed).into_iter().map(|r| Partial::Speed {
            from,
            checkpoint_id: r.checkpoint_id.to_string(),
            window_s: r.window_s,
            window_start: r.window_start,
            samples: r.samples,
            sum_milli: r.speed_sum_milli,
        });
        let buckets = std::mem::take(&mut batch.top_n_buckets).into_iter().map(|r| Partial::TopN {
            from,
            metric: r.metric.to_owned(),
            key_id: r.key_id.to_string(),
            bucket_start: r.bucket_start,
            count: r.count,
            updates: r.updates,
        });
        let segments = std::mem::take(&mut batch.segment_sums).into_iter().map(|r| Partial::Segment {
            from,
            segment_id: r.segment_id.to_string(),
            window_s: r.window_s,
            window_start: r.window_start,
            traversals: r.traversals,
            dt_ms: r.dt_ms,
            updates: r.updates,
        });
        flows.chain(origins).chain(speeds).chain(buckets).chain(segments).collect()
    }

    /// The end of the window a partial result counts towards (Top-N: of the last sliding
    /// window its bucket is in); `None` for the markers.
    fn window_end(&self) -> Option<i64> {
        let end = |start: i64, seconds: u32| start + i64::from(seconds) * 1000;
        match self {
            Partial::Flow { window_s, window_start, .. }
            | Partial::Speed { window_s, window_start, .. }
            | Partial::Segment { window_s, window_start, .. } => Some(end(*window_start, *window_s)),
            Partial::Origin { window_start, .. } => Some(end(*window_start, ORIGIN_WINDOW_S)),
            Partial::TopN { bucket_start, .. } => Some(end(*bucket_start, TOP_N_WINDOW_S)),
            Partial::Watermark { .. } | Partial::End { .. } => None,
        }
    }

    /// The aggregate key the topic's partition is chosen by (markers go to every partition).
    fn key(&self) -> String {
        match self {
            Partial::Flow { level, key_id, window_s, window_start, .. } => {
                format!("flow/{level}/{key_id}/{window_s}/{window_start}")
            }
            Partial::Origin { region_id, window_start, .. } => format!("origin/{region_id}/{window_start}"),
            Partial::Speed { checkpoint_id, window_s, window_start, .. } => {
                format!("speed/{checkpoint_id}/{window_s}/{window_start}")
            }
            // Top-N checkpoints is one key (the ranking); congestion is one too: areas, Top-N
            // segments and sudden congestion need every segment.
            Partial::TopN { metric, .. } if metric == SEGMENT_METRIC => "congestion".to_owned(),
            Partial::TopN { .. } => "top_n".to_owned(),
            Partial::Segment { .. } => "congestion".to_owned(),
            Partial::Watermark { from, .. } => format!("watermark/{from}"),
            Partial::End { from } => format!("end/{from}"),
        }
    }
}

/// The partition of a topic of `partitions` that `key` goes to (FNV-1a: the same on every
/// instance and build).
fn partition_of(key: &str, partitions: usize) -> i32 {
    let hash = key.bytes().fold(0xcbf2_9ce4_8422_2325u64, |h, b| (h ^ u64::from(b)).wrapping_mul(0x0100_0000_01b3));
    (hash % partitions as u64) as i32
}

/// The per-vehicle tasks' side: sends partials and markers.
pub struct PartialSender {
    producer: AckedProducer,
    topic: String,
    partitions: usize,
}

impl PartialSender {
    pub fn open(config: &KafkaConfig, partitions: usize) -> anyhow::Result<PartialSender> {
        let producer = AckedProducer::open(config, "partials")?;
        Ok(PartialSender { producer, topic: config.scale_out.partials_topic.clone(), partitions })
    }

    /// Queues input partition `from`'s partials of one step, each to the partition its
    /// aggregate key goes to, then `marker` (its watermark, or its end) to every partition.
    pub async fn send(&mut self, from: u32, partials: Vec<Partial>, marker: Option<Partial>) -> anyhow::Result<()> {
        let mut by_partition: Vec<Vec<Partial>> = vec![Vec::new(); self.partitions];
        for partial in partials {
            by_partition[partition_of(&partial.key(), self.partitions) as usize].push(partial);
        }
        if let Some(marker) = marker {
            for list in &mut by_partition {
                list.push(marker.clone());
            }
        }
        let key = from.to_string();
        for (p, list) in by_partition.iter().enumerate() {
            for chunk in list.chunks(PER_MESSAGE) {
                let value = serde_json::to_vec(&Envelope { schema: SCHEMA, partials: chunk.into() })?;
                self.producer.send_to(&self.topic, Some(p as i32), &key, Some(&value), None).await?;
            }
        }
        Ok(())
    }

    /// Returns once the broker has acknowledged everything queued.
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.producer.flush().await
    }
}

/// A flow count's key: (window end, level, key, window size, window start).
type FlowKey = (i64, String, String, u32, i64);
/// An origin count's key: (window end, region, window start, province, city, scope).
type OriginKey = (i64, String, i64, String, String, String);
/// A spot speed's key: (window end, checkpoint, window size, window start).
type SpeedKey = (i64, String, u32, i64);

/// A partition's total for a (key, window): a count, and (spot speeds) the sum of what was
/// counted. A later total has the larger count.
type Total = (u64, i64);

/// One (key, window)'s partials: each input partition's total, and the sum written last.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
struct Parts {
    by_partition: BTreeMap<u32, Total>,
    written: Option<Total>,
}

impl Parts {
    /// Input partition `from`'s total: a smaller one than it sent before is one sent again.
    fn take(&mut self, from: u32, total: Total) {
        let t = self.by_partition.entry(from).or_default();
        *t = (*t).max(total);
    }

    fn sum(&self) -> Total {
        self.by_partition.values().fold((0, 0), |(n, s), (pn, ps)| (n + pn, s + ps))
    }
}

/// What the origin windows are (5 min).
const ORIGIN_WINDOW_S: u32 = 300;

/// An input partition's watermark, and the processing time it last moved at (or the merge
/// started at, before its first).
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
struct Source {
    watermark: i64,
    moved_at: i64,
}

/// What the merge reads of the city: the checkpoints Top-N ranks (and how many it keeps), and
/// the segments.
#[derive(Clone, Debug)]
struct Env {
    keys: RankedKeys,
    index: HashMap<Arc<str>, u32>,
    n: usize,
    congestion: CongestionEnv,
}

/// A merge task's state: the partials of the windows that may still change, and where each
/// input partition stands.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Merge {
    input_partitions: u32,
    allowed_lateness_ms: i64,
    idle_timeout_ms: i64,
    sources: BTreeMap<u32, Source>,
    ended: BTreeSet<u32>,
    /// The merged watermark, which never goes back.
    current: i64,
    flows: BTreeMap<FlowKey, Parts>,
    origins: BTreeMap<OriginKey, Parts>,
    speeds: BTreeMap<SpeedKey, Parts>,
    /// Top-N: each input partition's (changes, count) per (segments?, bucket start, key), and
    /// the ranking of the checkpoints' sums (the segments' is congestion's).
    top_n_parts: BTreeMap<(bool, i64, u32), BTreeMap<u32, (u64, u64)>>,
    ranking: SlidingRanking,
    /// Congestion: each input partition's sums per (window end, segment, window size, window
    /// start), and the windows over their sums.
    segment_parts: BTreeMap<(i64, u32, u32, i64), BTreeMap<u32, SegmentSums>>,
    congestion: CongestionWindows,
    /// Set by [`Merge::attach`] (the city's, not part of the state).
    #[serde(skip)]
    env: Option<Env>,
    /// Partials taken since this process opened the merge, and those ignored because their
    /// window had been let go (sent again after a restart): for the log.
    #[serde(skip)]
    counted: PartialCounts,
}

/// How many partials a merge has taken and ignored (see [`Merge::counts`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct PartialCounts {
    pub taken: u64,
    pub ignored: u64,
}

impl Merge {
    /// A merge of `input_partitions` partitions' partials, started at processing time `now`.
    pub fn new(input_partitions: u32, allowed_lateness_ms: i64, idle_timeout_ms: i64, now: i64) -> Merge {
        let sources = (0..input_partitions).map(|p| (p, Source { watermark: i64::MIN, moved_at: now })).collect();
        Merge {
            input_partitions,
            allowed_lateness_ms,
            idle_timeout_ms,
            sources,
            ended: BTreeSet::new(),
            current: i64::MIN,
            flows: BTreeMap::new(),
            origins: BTreeMap::new(),
            speeds: BTreeMap::new(),
            top_n_parts: BTreeMap::new(),
            ranking: SlidingRanking::default(),
            segment_parts: BTreeMap::new(),
            congestion: CongestionWindows::default(),
            env: None,
            counted: PartialCounts::default(),
        }
    }

    /// The city whose checkpoints Top-N ranks (keeping `top_n`) and whose segments congestion
    /// has: set on a new merge and on one restored, before any message. A restored state that
    /// names more checkpoints or segments than the city has is refused.
    pub fn attach(&mut self, city: &Arc<City>, top_n: usize) -> anyhow::Result<()> {
        let names: Vec<Arc<str>> = city.checkpoints.iter().map(|c| c.id.clone()).collect();
        let index = names.iter().enumerate().map(|(i, name)| (name.clone(), i as u32)).collect();
        let congestion = CongestionEnv::new(city, top_n);
        let (checkpoints, segments) = (names.len(), congestion.segments());
        let fits = self.ranking.fits(checkpoints)
            && self.congestion.fits(segments)
            && self.top_n_parts.keys().all(|(s, _, i)| (*i as usize) < if *s { segments } else { checkpoints })
            && self.segment_parts.keys().all(|(_, i, _, _)| (*i as usize) < segments);
        anyhow::ensure!(fits, "the merge state was taken with another city (checkpoints or segments differ)");
        self.env = Some(Env { keys: RankedKeys::new(names), index, n: top_n, congestion });
        Ok(())
    }

    /// Sudden congestion raised or retracted after the restored state (see
    /// [`CongestionWindows::adopt_alerts`]).
    pub fn adopt_alerts(&mut self, alerts: &[AlertRow]) {
        if let Some(env) = &self.env {
            self.congestion.adopt_alerts(&env.congestion, alerts);
        }
    }

    /// Resumes the merge (restored from a checkpoint) at processing time `now`, under the
    /// configuration's lateness and idle timeout (not the snapshot's): every input partition
    /// has the idle timeout again to be heard from before it stops holding the watermark back
    /// (the time the merge was down is not theirs).
    pub fn resume(&mut self, now: i64, allowed_lateness_ms: i64, idle_timeout_ms: i64) {
        (self.allowed_lateness_ms, self.idle_timeout_ms) = (allowed_lateness_ms, idle_timeout_ms);
        for s in self.sources.values_mut() {
            s.moved_at = now;
        }
    }

    /// The merged watermark at processing time `now`, as one engine's over the input partitions
    /// (`crate::core::WatermarkTracker`): the lowest of the partitions' whose watermark has
    /// moved within the idle timeout, or, when none has, the highest; an ended partition no
    /// longer holds it back.
    fn advance_watermark(&mut self, now: i64) -> i64 {
        let open = self.sources.iter().filter(|(p, _)| !self.ended.contains(p)).map(|(_, s)| s);
        let active = open.clone().filter(|s| now - s.moved_at < self.idle_timeout_ms).map(|s| s.watermark).min();
        let candidate = match active {
            Some(w) => w,
            None if self.finished() => i64::MAX,
            None => open.map(|s| s.watermark).max().unwrap_or(i64::MIN),
        };
        self.current = self.current.max(candidate);
        self.current
    }

    /// The merged watermark, as of the last [`Merge::advance`].
    pub fn watermark(&self) -> i64 {
        self.current
    }

    /// Every input partition has ended (bounded runs): every window has been written.
    pub fn finished(&self) -> bool {
        self.ended.len() as u32 >= self.input_partitions
    }

    /// Takes one message. A partial of a window the merge has already let go of (every input
    /// partition was past its lateness) is one sent again after a restart: it was merged.
    pub fn apply(&mut self, partial: Partial, now: i64) -> anyhow::Result<()> {
        let end = partial.window_end();
        if let Some(end) = end {
            if self.watermark() >= end.saturating_add(self.allowed_lateness_ms) {
                self.counted.ignored += 1;
                return Ok(());
            }
            self.counted.taken += 1;
        }
        // (The markers have no window.)
        let end = end.unwrap_or(i64::MAX);
        match partial {
            Partial::Flow { from, level, key_id, window_s, window_start, passes } => {
                let key = (end, level, key_id, window_s, window_start);
                self.flows.entry(key).or_default().take(from, (passes, 0));
            }
            Partial::Origin { from, region_id, window_start, origin_province, origin_city, scope, vehicles } => {
                let key = (end, region_id, window_start, origin_province, origin_city, scope);
                self.origins.entry(key).or_default().take(from, (vehicles, 0));
            }
            Partial::Speed { from, checkpoint_id, window_s, window_start, samples, sum_milli } => {
                let key = (end, checkpoint_id, window_s, window_start);
                self.speeds.entry(key).or_default().take(from, (u64::from(samples), sum_milli));
            }
            Partial::TopN { from, metric, key_id, bucket_start, count, updates } => {
                let env = self.env.as_ref().context("a partial reached a merge without its city")?;
                let segments = metric == SEGMENT_METRIC;
                let idx =
                    if segments { env.congestion.segment(&key_id) } else { env.index.get(key_id.as_str()).copied() };
                let idx =
                    idx.with_context(|| format!("a Top-N partial names {key_id}, which this city does not have"))?;
                let parts = self.top_n_parts.entry((segments, bucket_start, idx)).or_default();
                // A bucket first seen counts as changed (one instance writes a window a count
                // was taken back from, empty).
                let new = parts.is_empty();
                let before: u64 = parts.values().map(|(_, c)| c).sum();
                let seen = parts.entry(from).or_default();
                *seen = (*seen).max((updates, count));
                let after: u64 = parts.values().map(|(_, c)| c).sum();
                let delta = i32::try_from(after as i64 - before as i64).context("a Top-N bucket moved by 2^31")?;
                let (watermark, lateness) = (self.current, self.allowed_lateness_ms);
                match (delta, segments) {
                    (0, _) if !new => {}
                    (_, true) => self.congestion.rank(&env.congestion, idx, bucket_start, delta, watermark, lateness),
                    (_, false) => {
                        let width = env.keys.names.len();
                        self.ranking.add(bucket_start, idx as usize, delta, width, watermark, lateness);
                    }
                }
            }
            Partial::Segment { from, segment_id, window_s, window_start, traversals, dt_ms, updates } => {
                let env = self.env.as_ref().context("a partial reached a merge without its city")?;
                let idx = env.congestion.segment(&segment_id).with_context(|| {
                    format!("a congestion partial names segment {segment_id}, which this city does not have")
                })?;
                let parts = self.segment_parts.entry((end, idx, window_s, window_start)).or_default();
                let seen = parts.entry(from).or_default();
                if updates >= seen.updates {
                    *seen = SegmentSums { traversals, dt_ms, updates };
                }
                let sum = parts.values().fold(SegmentSums::default(), |a, s| SegmentSums {
                    traversals: a.traversals + s.traversals,
                    dt_ms: a.dt_ms + s.dt_ms,
                    updates: a.updates + s.updates,
                });
                self.congestion.set(idx, window_s, window_start, sum);
            }
            Partial::Watermark { from, watermark } => {
                let s = self.sources.entry(from).or_insert(Source { watermark: i64::MIN, moved_at: now });
                if watermark > s.watermark {
                    *s = Source { watermark, moved_at: now };
                }
            }
            Partial::End { from } => {
                self.ended.insert(from);
            }
        }
        Ok(())
    }

    /// Writes to `out` every (key, window) the merged watermark has passed whose sum is new,
    /// and lets go of the windows no partial can change any more. A row's revision is its
    /// count − 1, as a single instance writes it.
    pub fn advance(&mut self, now: i64, out: &mut ResultBatch) -> anyhow::Result<()> {
        let watermark = self.advance_watermark(now);
        let lateness = self.allowed_lateness_ms;
        for ((end, level, key_id, window_s, window_start), parts) in self.flows.iter_mut() {
            if *end > watermark {
                break;
            }
            if let Some((passes, _)) = due(parts) {
                out.flow_counts.push(FlowCountRow {
                    level: static_name(
                        level,
                        &["checkpoint", "checkpoint_direction", "region", "city", "boundary", "bus_lane"],
                    )?,
                    key_id: Arc::from(key_id.as_str()),
                    window_s: *window_s,
                    window_start: *window_start,
                    passes,
                    revision: passes.saturating_sub(1) as u32,
                });
            }
        }
        for ((end, region_id, window_start, province, city, scope), parts) in self.origins.iter_mut() {
            if *end > watermark {
                break;
            }
            if let Some((vehicles, _)) = due(parts) {
                out.origin_counts.push(OriginCountRow {
                    region_id: Arc::from(region_id.as_str()),
                    window_s: ORIGIN_WINDOW_S,
                    window_start: *window_start,
                    origin_province: Arc::from(province.as_str()),
                    origin_city: Arc::from(city.as_str()),
                    scope: static_name(scope, &["local", "province", "other"])?,
                    vehicles,
                    revision: vehicles.saturating_sub(1) as u32,
                });
            }
        }
        for ((end, checkpoint_id, window_s, window_start), parts) in self.speeds.iter_mut() {
            if *end > watermark {
                break;
            }
            if let Some((samples, sum_milli)) = due(parts) {
                let samples = samples as u32;
                out.checkpoint_speed.push(CheckpointSpeedRow {
                    checkpoint_id: Arc::from(checkpoint_id.as_str()),
                    window_s: *window_s,
                    window_start: *window_start,
                    samples,
                    mean_speed_kmh: mean_kmh(sum_milli, samples),
                    speed_sum_milli: sum_milli,
                    revision: samples.saturating_sub(1),
                });
            }
        }
        if let Some(env) = &self.env {
            self.ranking.emit(CHECKPOINT_METRIC, &env.keys, env.n, watermark, lateness, &mut out.top_n);
            self.congestion.emit(&env.congestion, watermark, lateness, out);
        }
        let done = |end: i64| watermark >= end.saturating_add(lateness);
        let bucket_done = |start: i64| done(start + i64::from(TOP_N_WINDOW_S) * 1000);
        self.top_n_parts.retain(|(_, start, _), _| !bucket_done(*start));
        self.segment_parts.retain(|k, _| !done(k.0));
        self.flows.retain(|k, _| !done(k.0));
        self.origins.retain(|k, _| !done(k.0));
        self.speeds.retain(|k, _| !done(k.0));
        Ok(())
    }

    /// The partials taken and ignored since this process opened the merge.
    pub fn counts(&self) -> PartialCounts {
        self.counted
    }

    /// The (key, window)s held.
    pub fn held(&self) -> usize {
        self.flows.len() + self.origins.len() + self.speeds.len() + self.top_n_parts.len() + self.segment_parts.len()
    }
}

/// The sum to write for `parts`, when it differs from the one written last.
fn due(parts: &mut Parts) -> Option<Total> {
    let sum = parts.sum();
    (parts.written != Some(sum)).then(|| {
        parts.written = Some(sum);
        sum
    })
}

/// `name` as the `'static` name the result rows carry.
fn static_name(name: &str, known: &[&'static str]) -> anyhow::Result<&'static str> {
    known
        .iter()
        .find(|k| **k == name)
        .copied()
        .with_context(|| format!("a partial result names `{name}`, unknown here"))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pipelines::test_support::{self as support, checkpoint};

    fn flow(from: u32, key: &str, window_start: i64, passes: u64) -> Partial {
        Partial::Flow { from, level: "checkpoint".into(), key_id: key.into(), window_s: 30, window_start, passes }
    }

    fn watermark(from: u32, watermark: i64) -> Partial {
        Partial::Watermark { from, watermark }
    }

    /// Input partition `from`'s count of `count` passes at checkpoint `cp` in a 5 s bucket.
    fn bucket(from: u32, cp: &str, bucket_start: i64, count: u64) -> Partial {
        let (metric, key_id) = (CHECKPOINT_METRIC.into(), cp.into());
        Partial::TopN { from, metric, key_id, bucket_start, count, updates: count }
    }

    const IDLE: i64 = 600_000;

    fn written(merge: &mut Merge) -> Vec<(String, i64, u64, u32)> {
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        out.flow_counts.into_iter().map(|r| (r.key_id.to_string(), r.window_start, r.passes, r.revision)).collect()
    }

    #[test]
    fn a_window_is_written_once_every_partition_has_passed_it_with_the_sum_of_their_partials() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        merge.apply(flow(0, "k1", 0, 3), 0).unwrap();
        merge.apply(watermark(0, 30_000), 0).unwrap();
        assert_eq!(written(&mut merge), vec![], "partition 1 has not passed the window");
        merge.apply(flow(1, "k1", 0, 4), 0).unwrap();
        merge.apply(flow(1, "k2", 0, 1), 0).unwrap();
        merge.apply(watermark(1, 29_999), 0).unwrap();
        assert_eq!(written(&mut merge), vec![]);
        merge.apply(watermark(1, 31_000), 0).unwrap();
        assert_eq!(written(&mut merge), vec![("k1".into(), 0, 7, 6), ("k2".into(), 0, 1, 0)]);
        assert_eq!(written(&mut merge), vec![], "nothing new");
    }

    #[test]
    fn a_late_partial_rewrites_the_sum_and_totals_sent_again_change_nothing() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        for p in [0, 1] {
            merge.apply(flow(p, "k", 0, 2), 0).unwrap();
            merge.apply(watermark(p, 40_000), 0).unwrap();
        }
        assert_eq!(written(&mut merge), vec![("k".into(), 0, 4, 3)]);
        // Partition 1 corrects its total (a late pass); then, restarted from an earlier
        // checkpoint, partition 1 sends its totals again from before the correction on, and
        // partition 0 its total and a watermark behind the one it had sent.
        merge.apply(flow(1, "k", 0, 3), 0).unwrap();
        assert_eq!(written(&mut merge), vec![("k".into(), 0, 5, 4)]);
        merge.apply(flow(1, "k", 0, 2), 0).unwrap();
        merge.apply(flow(0, "k", 0, 2), 0).unwrap();
        merge.apply(watermark(0, 10_000), 0).unwrap();
        assert_eq!(written(&mut merge), vec![], "totals sent again change nothing");
        merge.apply(flow(1, "k", 0, 3), 0).unwrap();
        assert_eq!(written(&mut merge), vec![]);
        assert_eq!(merge.watermark(), 40_000, "a watermark never goes back");
    }

    #[test]
    fn a_window_past_every_partitions_lateness_is_let_go_and_a_resend_for_it_ignored() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        merge.apply(flow(0, "k", 0, 1), 0).unwrap();
        merge.apply(flow(1, "k", 30_000, 1), 0).unwrap();
        merge.apply(watermark(0, 90_000), 0).unwrap();
        merge.apply(watermark(1, 89_999), 0).unwrap();
        assert_eq!(written(&mut merge), vec![("k".into(), 0, 1, 0), ("k".into(), 30_000, 1, 0)]);
        assert_eq!(merge.held(), 2, "window 0 may still change: partition 1 is not past its lateness");
        merge.apply(watermark(1, 90_000), 0).unwrap();
        written(&mut merge);
        assert_eq!(merge.held(), 1);
        merge.apply(flow(0, "k", 0, 1), 0).unwrap();
        assert_eq!(written(&mut merge), vec![]);
        assert_eq!(merge.held(), 1, "the resend of a window let go is not taken as a new window");
        assert_eq!(merge.counts(), PartialCounts { taken: 2, ignored: 1 }, "markers are not counted");
    }

    #[test]
    fn ended_partitions_no_longer_hold_the_watermark_and_origins_merge_like_flows() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        let origin = |from, vehicles| Partial::Origin {
            from,
            region_id: "r1".into(),
            window_start: 0,
            origin_province: "粤".into(),
            origin_city: "粤B".into(),
            scope: "province".into(),
            vehicles,
        };
        merge.apply(origin(0, 5), 0).unwrap();
        merge.apply(origin(1, 2), 0).unwrap();
        merge.apply(Partial::End { from: 0 }, 0).unwrap();
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        assert!(out.origin_counts.is_empty(), "partition 1 has neither ended nor passed the window");
        assert!(!merge.finished());
        merge.apply(Partial::End { from: 1 }, 0).unwrap();
        merge.advance(0, &mut out).unwrap();
        assert!(merge.finished());
        let rows: Vec<_> = out.origin_counts.iter().map(|r| (r.scope, r.vehicles, r.revision)).collect();
        assert_eq!(rows, vec![("province", 7, 6)]);
        assert_eq!(merge.held(), 0);
    }

    #[test]
    fn spot_speeds_merge_into_the_mean_of_every_partitions_samples() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        let speed = |from, samples, sum_milli| Partial::Speed {
            from,
            checkpoint_id: "KK1".into(),
            window_s: 60,
            window_start: 0,
            samples,
            sum_milli,
        };
        merge.apply(speed(0, 2, 80_500), 0).unwrap();
        merge.apply(speed(1, 1, 40_200), 0).unwrap();
        merge.apply(speed(0, 1, 40_100), 0).unwrap();
        for p in [0, 1] {
            merge.apply(watermark(p, 60_000), 0).unwrap();
        }
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        let rows: Vec<_> = out.checkpoint_speed.iter().map(|r| (r.samples, r.mean_speed_kmh, r.revision)).collect();
        assert_eq!(rows, vec![(3, 40.23, 2)], "(80.5 + 40.2) / 3, rounded; the older total of partition 0 ignored");
    }

    #[test]
    fn top_n_ranks_the_sums_of_every_partitions_buckets() {
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        let city = support::city(vec![checkpoint("B", "R1"), checkpoint("A", "R1"), checkpoint("C", "R1")], &["R1"]);
        merge.attach(&city, 2).unwrap();
        // B: 1 + 1, A: 2, C: 1 in the first bucket; A once more, sent again by a restarted
        // partition 1 (its older total, then the same one).
        for partial in [bucket(0, "B", 0, 1), bucket(0, "A", 0, 2), bucket(1, "B", 0, 1), bucket(1, "C", 0, 1)] {
            merge.apply(partial, 0).unwrap();
        }
        merge.apply(bucket(1, "A", 5_000, 1), 0).unwrap();
        merge.apply(bucket(1, "B", 0, 1), 0).unwrap();
        merge.apply(bucket(1, "A", 5_000, 1), 0).unwrap();
        merge.apply(watermark(0, 10_000), 0).unwrap();
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        assert!(out.top_n.is_empty(), "partition 1 has not passed any window");
        merge.apply(watermark(1, 10_000), 0).unwrap();
        merge.advance(0, &mut out).unwrap();
        let windows: Vec<(i64, Vec<(String, u64)>)> = out
            .top_n
            .iter()
            .map(|w| (w.window_end, w.entries.iter().map(|(k, v)| (k.to_string(), *v)).collect()))
            .collect();
        let ranked = |a: &[(&str, u64)]| a.iter().map(|(k, v)| (k.to_string(), *v)).collect::<Vec<_>>();
        assert_eq!(
            windows,
            vec![(5_000, ranked(&[("A", 2), ("B", 2)])), (10_000, ranked(&[("A", 3), ("B", 2)]))],
            "ties to the smaller id, C cut by N = 2"
        );
        let unknown = merge.apply(bucket(0, "Z", 10_000, 1), 0).unwrap_err();
        assert!(format!("{unknown:#}").contains("names Z"), "{unknown:#}");
    }

    #[test]
    fn congestion_merges_every_partitions_segment_sums_and_writes_areas_over_them() {
        let mut merge = Merge::new(2, 600_000, IDLE, 0);
        let segment = support::segment("S1", 0, 1, 1_000.0, 60.0, crate::reference::RoadClass::Arterial, "R1");
        let city =
            support::city_with_segments(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], vec![segment], &["R1"]);
        merge.attach(&city, 10).unwrap();
        let sums = |from, traversals, dt_ms, updates| Partial::Segment {
            from,
            segment_id: "S1".into(),
            window_s: 60,
            window_start: 0,
            traversals,
            dt_ms,
            updates,
        };
        // Partition 0: two traversals (120 s in all), sent again after a restart with an older
        // total; partition 1: one added and taken back (a late pass split it), then one of 60 s.
        for partial in [sums(0, 2, 120_000, 2), sums(1, 0, 0, 2), sums(0, 1, 50_000, 1), sums(1, 1, 60_000, 3)] {
            merge.apply(partial, 0).unwrap();
        }
        for p in [0, 1] {
            merge.apply(watermark(p, 60_000), 0).unwrap();
        }
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        let rows: Vec<_> =
            out.segment_congestion.iter().map(|r| (r.traversals, r.mean_speed_kmh, r.revision)).collect();
        assert_eq!(rows, vec![(3, 60.0, 4)], "3 traversals of 1 km in 180 s; 5 updates in all");
        let areas: Vec<_> = out.area_congestion.iter().map(|r| (r.level, r.mean_speed_kmh)).collect();
        assert_eq!(areas, vec![("city", 60.0), ("region", 60.0)]);
        let unknown = Partial::Segment {
            from: 0,
            segment_id: "S9".into(),
            window_s: 60,
            window_start: 0,
            traversals: 1,
            dt_ms: 1,
            updates: 1,
        };
        assert!(format!("{:#}", merge.apply(unknown, 0).unwrap_err()).contains("segment S9"));
    }

    #[test]
    fn a_merge_restored_from_its_snapshot_goes_on_where_it_was() {
        let city = support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"]);
        let mut merge = Merge::new(2, 60_000, IDLE, 0);
        merge.attach(&city, 10).unwrap();
        for partial in
            [flow(0, "k", 0, 2), bucket(0, "A", 0, 2), watermark(0, 30_000), flow(1, "k", 0, 1), bucket(1, "B", 0, 3)]
        {
            merge.apply(partial, 0).unwrap();
        }
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        let blob = crate::core::StateBlob::encode(1, &merge, &Default::default()).unwrap();
        let mut restored: Merge = blob.decode("merge", 1, 1).unwrap();
        restored.resume(0, 60_000, IDLE);
        restored.attach(&city, 10).unwrap();
        for m in [&mut merge, &mut restored] {
            m.apply(watermark(1, 30_000), 0).unwrap();
        }
        let (mut want, mut got) = (ResultBatch::default(), ResultBatch::default());
        merge.advance(0, &mut want).unwrap();
        restored.advance(0, &mut got).unwrap();
        assert_eq!(got.flow_counts, want.flow_counts);
        assert_eq!(got.top_n, want.top_n);
        assert_eq!(want.flow_counts.len(), 1, "{:?}", want.flow_counts);
        assert_eq!(want.top_n.len(), 6, "the windows ending 5 s to 30 s: {:?}", want.top_n);
        let mut elsewhere: Merge = blob.decode("merge", 1, 1).unwrap();
        let smaller = support::city(vec![checkpoint("A", "R1")], &["R1"]);
        let refused = elsewhere.attach(&smaller, 10).unwrap_err();
        assert!(format!("{refused:#}").contains("another city"), "{refused:#}");
    }

    #[test]
    fn top_n_windows_before_the_first_bucket_seen_wait_for_the_watermark() {
        let city = support::city(vec![checkpoint("A", "R1"), checkpoint("B", "R1")], &["R1"]);
        let mut merge = Merge::new(2, 600_000, IDLE, 0);
        merge.attach(&city, 10).unwrap();
        // Partition 0's first bucket (100 s) reaches the merge before partition 1's (0 s).
        for partial in [bucket(0, "A", 100_000, 1), watermark(0, 200_000), bucket(1, "B", 0, 1), watermark(1, 30_000)] {
            merge.apply(partial, 0).unwrap();
        }
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        let ends: Vec<i64> = out.top_n.iter().map(|w| w.window_end).collect();
        assert_eq!(ends, vec![5_000, 10_000, 15_000, 20_000, 25_000, 30_000], "none past the watermark");
        merge.apply(watermark(1, 60_000), 0).unwrap();
        let mut out = ResultBatch::default();
        merge.advance(0, &mut out).unwrap();
        assert_eq!(
            out.top_n.iter().map(|w| w.window_end).collect::<Vec<_>>(),
            vec![35_000, 40_000, 45_000, 50_000, 55_000, 60_000]
        );
    }

    #[test]
    fn a_partition_whose_watermark_has_not_moved_for_the_idle_timeout_no_longer_holds_it_back() {
        let mut merge = Merge::new(3, 60_000, IDLE, 0);
        merge.apply(flow(0, "k", 0, 2), 0).unwrap();
        merge.apply(watermark(0, 40_000), 10).unwrap();
        merge.apply(watermark(1, 35_000), 20).unwrap();
        let mut out = ResultBatch::default();
        merge.advance(IDLE - 1, &mut out).unwrap();
        assert!(out.flow_counts.is_empty(), "partition 2 has sent nothing yet, but is not idle");
        merge.advance(IDLE, &mut out).unwrap();
        assert_eq!(merge.watermark(), 35_000, "partition 2 is idle: the lowest of the others");
        assert_eq!(out.flow_counts.len(), 1);
        merge.advance(IDLE + 20, &mut out).unwrap();
        assert_eq!(merge.watermark(), 40_000, "every partition idle: the highest");
        merge.apply(watermark(2, 1_000), IDLE + 30).unwrap();
        merge.advance(IDLE + 30, &mut out).unwrap();
        assert_eq!(merge.watermark(), 40_000, "it never goes back");
    }

    #[test]
    fn a_partial_goes_through_its_message_form_unchanged_and_one_key_to_one_partition() {
        let partials = vec![flow(3, "k", 30_000, 9), watermark(3, 60_000)];
        let bytes = serde_json::to_vec(&Envelope { schema: SCHEMA, partials: partials.as_slice().into() }).unwrap();
        let message = Fetched { partition: 0, offset: 7, payload: Some(bytes), key: None, headers: vec![] };
        assert_eq!(Partial::read(&message).unwrap(), partials);
        let garbage = Fetched { payload: Some(b"{}".to_vec()), ..message };
        assert!(format!("{:#}", Partial::read(&garbage).unwrap_err()).contains("message 7 of the partials topic"));
        // Every input partition's partial of one (key, window) meets in one partition.
        assert_eq!(partition_of(&flow(0, "k", 0, 1).key(), 5), partition_of(&flow(3, "k", 0, 8).key(), 5));
        let spread: BTreeSet<i32> = (0..50).map(|i| partition_of(&flow(0, &format!("k{i}"), 0, 1).key(), 5)).collect();
        assert_eq!(spread.len(), 5, "keys spread over every partition");
    }
}
