//! The input topic. The consumer joins the group with auto-commit off; each assigned partition
//! is sought to the offset in passflow's checkpoint (or, without one, starts where the group
//! left off, else at the earliest offset), and a message before that offset is skipped, so a
//! pass is processed once per checkpoint whatever the group's committed offsets say.

use super::KafkaConfig;
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, CommitMode, Consumer, ConsumerContext, Rebalance};
use rdkafka::message::Message as _;
use rdkafka::{ClientContext, Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);
/// How often the consumer lag is measured (a request to the broker per partition).
const LAG_EVERY: Duration = Duration::from_secs(5);
/// The source counts as connected while the broker answered within this long.
const CONTACT_FRESH: Duration = Duration::from_secs(10);
/// A bounded run ends once its partitions have been at their ends this long.
const END_QUIET: Duration = Duration::from_secs(1);

/// The source position kept in checkpoints: the next offset to read per partition.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct KafkaPosition {
    pub topic: String,
    pub offsets: BTreeMap<i32, i64>,
}

/// One message read.
#[derive(Debug, Default)]
pub struct Fetched {
    pub partition: i32,
    pub offset: i64,
    /// `None`: a message without a value.
    pub payload: Option<Vec<u8>>,
    /// The key and headers, when the source keeps them ([`KafkaSource::with_headers`]).
    pub key: Option<Vec<u8>>,
    pub headers: Vec<(String, Vec<u8>)>,
}

/// What one poll brought.
#[derive(Debug, Default)]
pub struct Polled {
    pub records: Vec<Fetched>,
    /// Partitions assigned since the last poll.
    pub assigned: Vec<i32>,
    /// Partitions taken away since the last poll (only when they may move, see
    /// [`KafkaSource::allow_moves`]).
    pub revoked: Vec<i32>,
}

enum GroupEvent {
    Assigned(Vec<i32>),
    Revoked(Vec<i32>),
}

/// Collects the group's rebalances for the poll loop (callbacks run inside `poll`).
struct GroupEvents {
    topic: String,
    events: Mutex<Vec<GroupEvent>>,
    errors: super::errors::ErrorThrottle,
}

impl ClientContext for GroupEvents {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        use rdkafka::error::{KafkaError, RDKafkaErrorCode};
        match error {
            // Bounded runs ask to be told of partition ends (librdkafka reports some of them as
            // a global error): not an error.
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF) => {
                tracing::debug!(reason, "partition end reached")
            }
            e => self.errors.client_error("Kafka client error", &e, reason),
        }
    }
}

impl ConsumerContext for GroupEvents {
    fn post_rebalance(&self, _consumer: &BaseConsumer<Self>, rebalance: &Rebalance<'_>) {
        let partitions = |tpl: &TopicPartitionList| {
            tpl.elements().iter().filter(|e| e.topic() == self.topic).map(|e| e.partition()).collect()
        };
        let event = match rebalance {
            Rebalance::Assign(tpl) => GroupEvent::Assigned(partitions(tpl)),
            Rebalance::Revoke(tpl) => GroupEvent::Revoked(partitions(tpl)),
            Rebalance::Error(e) => {
                tracing::warn!(error = %e, "Kafka group rebalance failed");
                return;
            }
        };
        self.events.lock().expect("not poisoned").push(event);
    }
}

pub struct KafkaSource {
    consumer: BaseConsumer<GroupEvents>,
    config: KafkaConfig,
    /// The next offset to process, per partition: from the checkpoint, then from what was read.
    next: BTreeMap<i32, i64>,
    assigned: BTreeSet<i32>,
    /// Partitions taken away by the last rebalance; they must come back in the next assignment.
    revoked: BTreeSet<i32>,
    /// Partitions whose fetch position still has to be set to `next` (a seek is refused until
    /// the client fetches the partition); their messages are dropped until then.
    unsought: BTreeSet<i32>,
    /// Bounded runs: each partition's end offset when it was assigned.
    ends: BTreeMap<i32, i64>,
    /// Bounded runs: partitions whose end the consumer has reached (the broker's fetch answer
    /// said so) with nothing after it yet.
    eof: BTreeSet<i32>,
    /// Bounded runs: since when every partition has been at its end with nothing more coming.
    at_end_since: Option<Instant>,
    paused: bool,
    last_lag: Option<Instant>,
    /// When the broker last answered (a message, or a lag or metadata request).
    last_contact: Option<Instant>,
    /// Partitions may go to another consumer of the group (scale-out).
    moves: bool,
    /// The group has given this consumer an assignment (perhaps of no partition).
    joined: bool,
    /// Keep each message's key and headers.
    headers: bool,
}

impl KafkaSource {
    /// Lets partitions go to other consumers of the group: a revoked partition is reported in
    /// [`Polled::revoked`] and forgotten (its state belongs to whoever gets it next).
    pub fn allow_moves(mut self) -> KafkaSource {
        self.moves = true;
        self
    }

    /// Keeps each message's key and headers in [`Fetched`].
    pub fn with_headers(mut self) -> KafkaSource {
        self.headers = true;
        self
    }

    /// Resumes `partition` at `offset` (from the checkpoint of the state it was given to).
    pub fn resume_at(&mut self, partition: i32, offset: i64) {
        self.next.insert(partition, offset);
        self.unsought.insert(partition);
        self.seek_unsought();
    }

    /// The number of partitions of `topic`.
    pub fn partition_count(&self, topic: &str) -> anyhow::Result<usize> {
        let metadata = self
            .consumer
            .fetch_metadata(Some(topic), METADATA_TIMEOUT)
            .with_context(|| format!("reading the metadata of topic {topic}"))?;
        let partitions = metadata.topics().iter().find(|t| t.name() == topic).map_or(0, |t| t.partitions().len());
        anyhow::ensure!(partitions > 0, "topic {topic} does not exist or has no partitions");
        Ok(partitions)
    }

    /// Joins the consumer group on the input topic, resuming from `resume` (a checkpoint's
    /// position) when given.
    pub fn open(config: &KafkaConfig, resume: Option<KafkaPosition>) -> anyhow::Result<KafkaSource> {
        let input = &config.input;
        let context =
            GroupEvents { topic: input.topic.clone(), events: Mutex::new(Vec::new()), errors: Default::default() };
        let consumer: BaseConsumer<GroupEvents> = config
            .client_config(&[
                ("group.id", &input.group_id),
                ("enable.auto.commit", "false"),
                ("enable.auto.offset.store", "false"),
                ("auto.offset.reset", "earliest"),
                // The pipeline stops polling while a slow store holds it back: that must not
                // cost the group membership.
                ("max.poll.interval.ms", "86400000"),
                // Bounded runs end at the partitions' ends as the fetch answers give them.
                ("enable.partition.eof", if input.bounded { "true" } else { "false" }),
                // Prefetch deeper than librdkafka's 100,000 messages: the pipeline takes records
                // faster than one fetch answer's latency allows at that depth (memory stays
                // bounded by `queued.max.messages.kbytes`, 64 MiB per partition by default).
                ("queued.min.messages", "1000000"),
            ])
            .create_with_context(context)
            .with_context(|| format!("creating the Kafka consumer for {}", config.brokers))?;
        consumer.subscribe(&[&input.topic]).with_context(|| format!("subscribing to topic {}", input.topic))?;
        let next = match resume {
            Some(p) if p.topic == input.topic => p.offsets,
            Some(p) => anyhow::bail!(
                "the checkpoint holds offsets of topic `{}`, the configuration reads `{}`: \
                 start from empty state to switch topics",
                p.topic,
                input.topic
            ),
            None => BTreeMap::new(),
        };
        Ok(KafkaSource {
            consumer,
            config: config.clone(),
            next,
            assigned: BTreeSet::new(),
            revoked: BTreeSet::new(),
            unsought: BTreeSet::new(),
            ends: BTreeMap::new(),
            eof: BTreeSet::new(),
            at_end_since: None,
            paused: false,
            last_lag: None,
            last_contact: None,
            moves: false,
            joined: false,
            headers: false,
        })
    }

    /// Up to `kafka.input.max_batch` records, waiting up to `timeout` for the first.
    pub fn poll(&mut self, timeout: Duration) -> anyhow::Result<Polled> {
        let max = self.config.input.max_batch.max(1);
        let mut polled = Polled::default();
        let mut wait = timeout;
        self.seek_unsought();
        while polled.records.len() < max {
            let message = match self.consumer.poll(wait) {
                None => None,
                Some(Err(e)) => Some(Err(e)),
                Some(Ok(m)) => Some(Ok(self.fetched(&m))),
            };
            let (assigned, revoked) = self.handle_group_events()?;
            polled.assigned.extend(&assigned);
            polled.revoked.extend(&revoked);
            wait = Duration::ZERO;
            match message {
                None => break,
                Some(Err(rdkafka::error::KafkaError::PartitionEOF(p))) => {
                    self.eof.insert(p);
                }
                Some(Err(e)) => {
                    self.log_error(&e);
                    break;
                }
                // Fetched before the seek to its checkpointed offset: it comes again.
                Some(Ok(f)) if assigned.contains(&f.partition) || self.unsought.contains(&f.partition) => {
                    self.seek_unsought();
                }
                // Fetched before its partition was taken away.
                Some(Ok(f)) if !self.assigned.contains(&f.partition) => {}
                Some(Ok(f)) => {
                    self.last_contact = Some(Instant::now());
                    if self.next.get(&f.partition).is_some_and(|next| f.offset < *next) {
                        continue; // processed before the checkpoint this run resumed from
                    }
                    self.next.insert(f.partition, f.offset + 1);
                    // Records still coming: not at the end yet.
                    self.eof.remove(&f.partition);
                    self.at_end_since = None;
                    polled.records.push(f);
                }
            }
        }
        Ok(polled)
    }

    fn fetched(&self, m: &rdkafka::message::BorrowedMessage<'_>) -> Fetched {
        let mut fetched = Fetched {
            partition: m.partition(),
            offset: m.offset(),
            payload: m.payload().map(<[u8]>::to_vec),
            ..Fetched::default()
        };
        if self.headers {
            use rdkafka::message::Headers as _;
            fetched.key = m.key().map(<[u8]>::to_vec);
            if let Some(headers) = m.headers() {
                fetched.headers =
                    headers.iter().map(|h| (h.key.to_owned(), h.value.unwrap_or_default().to_vec())).collect();
            }
        }
        fetched
    }

    /// The partitions assigned and revoked by the rebalances since the last call.
    fn handle_group_events(&mut self) -> anyhow::Result<(Vec<i32>, Vec<i32>)> {
        let events = std::mem::take(&mut *self.consumer.context().events.lock().expect("not poisoned"));
        let (mut assigned, mut revoked) = (Vec::new(), Vec::new());
        for event in events {
            match event {
                GroupEvent::Revoked(partitions) if self.moves => {
                    for p in partitions {
                        self.assigned.remove(&p);
                        self.next.remove(&p);
                        self.ends.remove(&p);
                        self.eof.remove(&p);
                        self.unsought.remove(&p);
                        assigned.retain(|a| *a != p);
                        revoked.push(p);
                    }
                }
                GroupEvent::Assigned(partitions) => {
                    self.joined = true;
                    let lost: Vec<i32> = self.revoked.iter().filter(|p| !partitions.contains(p)).copied().collect();
                    anyhow::ensure!(
                        lost.is_empty(),
                        "partitions {lost:?} of `{}` went to another consumer of group `{}`. One passflow \
                         instance per consumer group is supported (its state covers every partition); \
                         this one stops, and resumes from its last checkpoint when started again",
                        self.config.input.topic,
                        self.config.input.group_id
                    );
                    self.revoked.clear();
                    for p in partitions {
                        self.on_assigned(p)?;
                        assigned.push(p);
                    }
                }
                // Taken away for a rebalance: reading stops; the state stays, for the same
                // partitions come back (they must, see above) and resume at their offsets.
                GroupEvent::Revoked(partitions) => {
                    for p in partitions {
                        self.assigned.remove(&p);
                        self.revoked.insert(p);
                    }
                }
            }
        }
        Ok((assigned, revoked))
    }

    fn on_assigned(&mut self, partition: i32) -> anyhow::Result<()> {
        let topic = self.config.input.topic.clone();
        self.assigned.insert(partition);
        self.eof.remove(&partition);
        if self.config.input.bounded {
            let (low, high) = self
                .consumer
                .fetch_watermarks(&topic, partition, METADATA_TIMEOUT)
                .with_context(|| format!("reading the offsets of {topic}/{partition}"))?;
            self.ends.insert(partition, high);
            self.next.entry(partition).or_insert(low);
        }
        self.unsought.insert(partition);
        self.seek_unsought();
        tracing::info!(topic, partition, offset = ?self.next.get(&partition), "partition assigned");
        Ok(())
    }

    /// Seeks every partition waiting for it; those the client refuses wait for the next poll.
    fn seek_unsought(&mut self) {
        for p in std::mem::take(&mut self.unsought) {
            if !self.assigned.contains(&p) {
                continue;
            }
            if let Err(e) = self.seek_to_next(p) {
                tracing::debug!(partition = p, error = %format!("{e:#}"), "seek not taken yet; trying again");
                self.unsought.insert(p);
            }
        }
    }

    /// Moves the fetch position of `partition` to the next offset to process, when known.
    fn seek_to_next(&self, partition: i32) -> anyhow::Result<()> {
        let Some(next) = self.next.get(&partition) else { return Ok(()) };
        let topic = &self.config.input.topic;
        let mut tpl = TopicPartitionList::new();
        tpl.add_partition_offset(topic, partition, Offset::Offset(*next))?;
        for element in self
            .consumer
            .seek_partitions(tpl, METADATA_TIMEOUT)
            .with_context(|| format!("seeking {topic}/{partition} to offset {next}"))?
            .elements()
        {
            element.error().with_context(|| format!("seeking {topic}/{partition} to offset {next}"))?;
        }
        Ok(())
    }

    /// Logs a consumer error, each kind at most once per [`super::errors::EVERY`].
    fn log_error(&self, e: &rdkafka::error::KafkaError) {
        if let Some(unlogged) = self.consumer.context().errors.admit(&e.to_string(), Instant::now()) {
            tracing::warn!(brokers = %self.config.brokers, error = %e, unlogged, "Kafka consumer error; waiting for the broker");
        }
    }

    pub fn position(&self) -> KafkaPosition {
        KafkaPosition { topic: self.config.input.topic.clone(), offsets: self.next.clone() }
    }

    /// A checkpoint holding [`KafkaSource::position`] is durable: the group's committed offsets
    /// follow (for lag monitors; the checkpoint stays the truth).
    pub fn checkpointed(&self) {
        self.commit(&self.next);
    }

    /// A checkpoint holding `position` is durable (taken before the offsets read since).
    pub fn checkpointed_at(&self, position: &KafkaPosition) {
        if position.topic == self.config.input.topic {
            self.commit(&position.offsets);
        }
    }

    /// Commits `offsets` of the input topic to the group.
    fn commit(&self, offsets: &BTreeMap<i32, i64>) {
        let mut tpl = TopicPartitionList::new();
        for (p, offset) in offsets {
            let _ = tpl.add_partition_offset(&self.config.input.topic, *p, Offset::Offset(*offset));
        }
        if tpl.count() > 0 {
            if let Err(e) = self.consumer.commit(&tpl, CommitMode::Async) {
                tracing::debug!(error = %e, "committing offsets to the group failed");
            }
        }
    }

    /// A bounded run has read every assigned partition past the end offset it had when
    /// assigned and to the end the broker's fetch answers give (brokers may report end offsets
    /// behind what they serve), and nothing more has come for a while.
    pub fn finished(&mut self) -> bool {
        let at_end = self
            .assigned
            .iter()
            .all(|p| self.eof.contains(p) && self.next.get(p).unwrap_or(&0) >= self.ends.get(p).unwrap_or(&0));
        if !self.config.input.bounded || self.assigned.is_empty() || !at_end {
            self.at_end_since = None;
            return false;
        }
        self.at_end_since.get_or_insert_with(Instant::now).elapsed() >= END_QUIET
    }

    /// The group has given this consumer no partition (in a group with more consumers than
    /// the topic has partitions): in a bounded run, it has nothing of its own to read.
    pub fn given_nothing(&self) -> bool {
        self.joined && self.assigned.is_empty() && self.revoked.is_empty()
    }

    /// Stops (or restarts) fetching while the pipeline behind is full.
    pub fn set_paused(&mut self, paused: bool) {
        if paused == self.paused || self.assigned.is_empty() {
            return;
        }
        let mut tpl = TopicPartitionList::new();
        for p in &self.assigned {
            tpl.add_partition(&self.config.input.topic, *p);
        }
        let result = if paused { self.consumer.pause(&tpl) } else { self.consumer.resume(&tpl) };
        match result {
            Ok(()) => self.paused = paused,
            Err(e) => tracing::warn!(error = %e, paused, "pausing or resuming the Kafka consumer failed"),
        }
        if !self.paused {
            // Fetching restarts where passflow is, not where the client's queue was.
            self.unsought.extend(self.assigned.iter().copied());
            self.seek_unsought();
        }
    }

    /// Records behind the end of each assigned partition, measured at most every few seconds
    /// (`None` in between, or while the broker does not answer).
    pub fn lag(&mut self) -> Option<Vec<(i32, i64)>> {
        if self.last_lag.is_some_and(|t| t.elapsed() < LAG_EVERY) {
            return None;
        }
        self.last_lag = Some(Instant::now());
        let topic = &self.config.input.topic;
        let timeout = Duration::from_millis(500);
        if self.assigned.is_empty() {
            // Nothing to measure (joining the group): whether the broker answers at all.
            if self.consumer.fetch_metadata(Some(topic), timeout).is_ok() {
                self.last_contact = Some(Instant::now());
            }
            return None;
        }
        let mut lag = Vec::new();
        for p in &self.assigned {
            let (low, high) = self.consumer.fetch_watermarks(topic, *p, timeout).ok()?;
            lag.push((*p, (high - self.next.get(p).copied().unwrap_or(low)).max(0)));
        }
        self.last_contact = Some(Instant::now());
        Some(lag)
    }

    /// Whether the broker has answered lately (`/readyz`).
    pub fn connected(&self) -> bool {
        self.last_contact.is_some_and(|t| t.elapsed() < CONTACT_FRESH)
    }
}
