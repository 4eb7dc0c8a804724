//! Scale-out's state topic (`kafka.scale_out.state_topic`): every task publishes its state there
//! at a checkpoint every `state_publish_interval` and when it lets its partition go, so that a
//! partition's state moves with it to an instance on another machine, without a shared
//! `state.dir`.
//!
//! A publication of a task (its key: `partition-N` or `aggregate`) is the checkpoint in the
//! savepoint's portable form, cut into chunks under keys of their own (`KEY/PUBLICATION/I`),
//! then a header under the task's key naming the publication and its chunk count. The header
//! goes once every chunk is acknowledged, so a publication cut short by a crash is never the
//! one a header names; then the chunks of the task's publication before are deleted
//! (tombstones), so a compacted topic (`cleanup.policy=compact`) holds about one state per task.
//! A reader takes, for each key, the last header and the chunks it names.

use super::delivery::AckedProducer;
use super::KafkaConfig;
use crate::core::checkpoint::{decode_portable, encode_portable, Checkpoint};
use anyhow::Context;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::message::Message as _;
use rdkafka::{Offset, TopicPartitionList};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::time::{Duration, Instant};

/// Bytes per chunk: well under the 1 MB a broker takes in one message by default.
const CHUNK: usize = 256 * 1024;
/// How long reading the topic may wait for the broker.
const READ_TIMEOUT: Duration = Duration::from_secs(120);
const RETRY_PAUSE: Duration = Duration::from_millis(200);

/// The message under a task's key.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
struct Header {
    publication: u64,
    chunks: u32,
    len: u64,
}

fn chunk_key(key: &str, publication: u64, i: u32) -> String {
    format!("{key}/{publication:016x}/{i}")
}

pub struct StateTopic {
    config: KafkaConfig,
    topic: String,
    producer: AckedProducer,
    /// Each task's last publication known here (read or written): its chunks go once the next
    /// one is complete.
    last: BTreeMap<String, Header>,
    /// How often a task publishes, and when each did last.
    every: Duration,
    published_at: BTreeMap<String, Instant>,
}

impl StateTopic {
    pub fn open(config: &KafkaConfig) -> anyhow::Result<Option<StateTopic>> {
        let Some(topic) = &config.scale_out.state_topic else { return Ok(None) };
        let producer = AckedProducer::open(config, "state")?;
        Ok(Some(StateTopic {
            config: config.clone(),
            topic: topic.to_owned(),
            producer,
            last: BTreeMap::new(),
            every: config.scale_out.state_publish_interval.0,
            published_at: BTreeMap::new(),
        }))
    }

    /// Whether task `key` publishes at this checkpoint: `now`, or once its interval has passed.
    pub fn due(&self, key: &str, now: bool) -> bool {
        now || self.published_at.get(key).is_none_or(|t| t.elapsed() >= self.every)
    }

    /// Publishes `checkpoint` (in portable form) as the state of task `key`; returns once the
    /// broker has acknowledged it.
    pub async fn publish(&mut self, key: &str, checkpoint: &Checkpoint) -> anyhow::Result<()> {
        let bytes = encode_portable(checkpoint)?;
        let publication = publication_id();
        let mut chunks = 0;
        for (i, chunk) in bytes.chunks(CHUNK).enumerate() {
            self.producer.send(&self.topic, &chunk_key(key, publication, i as u32), Some(chunk), None).await?;
            chunks += 1;
        }
        self.producer.flush().await?;
        let header = Header { publication, chunks, len: bytes.len() as u64 };
        self.producer.send(&self.topic, key, Some(&serde_json::to_vec(&header)?), None).await?;
        self.producer.flush().await?;
        if let Some(before) = self.last.insert(key.to_owned(), header) {
            for i in 0..before.chunks {
                self.producer.send(&self.topic, &chunk_key(key, before.publication, i), None, None).await?;
            }
            self.producer.flush().await?;
        }
        self.published_at.insert(key.to_owned(), Instant::now());
        tracing::debug!(key, bytes = bytes.len(), chunks, "state published");
        Ok(())
    }

    /// The newest published state of each of `keys` (those published at all), read from the
    /// beginning of the topic to its end.
    pub fn read(&mut self, keys: &[String]) -> anyhow::Result<BTreeMap<String, Checkpoint>> {
        let consumer: BaseConsumer<super::errors::QuietErrors> = self
            .config
            .client_config(&[
                ("group.id", "passflow-state-reader"),
                ("enable.auto.commit", "false"),
                ("enable.partition.eof", "false"),
            ])
            .create_with_context(Default::default())
            .with_context(|| format!("creating the Kafka consumer for {}", self.config.brokers))?;
        let started = Instant::now();
        let wait = |what: &str, e: &dyn std::fmt::Display| -> anyhow::Result<()> {
            anyhow::ensure!(started.elapsed() < READ_TIMEOUT, "reading the state topic {}: {what}: {e}", self.topic);
            std::thread::sleep(RETRY_PAUSE);
            Ok(())
        };
        let partitions = loop {
            match consumer.fetch_metadata(Some(&self.topic), Duration::from_secs(5)) {
                Ok(m) => match m.topics().iter().find(|t| t.name() == self.topic).map(|t| t.partitions().len()) {
                    Some(n) if n > 0 => break n as i32,
                    _ => wait("no such topic", &"it has no partitions")?,
                },
                Err(e) => wait("metadata", &e)?,
            }
        };
        let mut ends = BTreeMap::new();
        let mut tpl = TopicPartitionList::new();
        for p in 0..partitions {
            let (low, high) = loop {
                match consumer.fetch_watermarks(&self.topic, p, Duration::from_secs(5)) {
                    Ok(w) => break w,
                    Err(e) => wait("end offsets", &e)?,
                }
            };
            if high > low {
                ends.insert(p, high);
                tpl.add_partition_offset(&self.topic, p, Offset::Beginning)?;
            }
        }
        consumer.assign(&tpl)?;
        let mut headers: BTreeMap<String, Header> = BTreeMap::new();
        let mut chunks: BTreeMap<String, Vec<u8>> = BTreeMap::new();
        let prefixes: Vec<String> = keys.iter().map(|k| format!("{k}/")).collect();
        while !ends.is_empty() {
            let message = match consumer.poll(Duration::from_millis(500)) {
                None => {
                    wait("waiting for messages", &format!("{} partitions not read to their end", ends.len()))?;
                    continue;
                }
                Some(Err(e)) => {
                    wait("fetching", &e)?;
                    continue;
                }
                Some(Ok(m)) => m,
            };
            if ends.get(&message.partition()).is_some_and(|end| message.offset() + 1 >= *end) {
                ends.remove(&message.partition());
            }
            let Some(key) = message.key().and_then(|k| std::str::from_utf8(k).ok()) else { continue };
            if keys.iter().any(|k| k == key) {
                match message.payload() {
                    Some(value) => {
                        let header = serde_json::from_slice(value)
                            .with_context(|| format!("the state topic's header of `{key}` is unreadable"))?;
                        headers.insert(key.to_owned(), header);
                    }
                    None => {
                        headers.remove(key);
                    }
                }
            } else if prefixes.iter().any(|p| key.starts_with(p.as_str())) {
                match message.payload() {
                    Some(value) => chunks.insert(key.to_owned(), value.to_vec()),
                    None => chunks.remove(key),
                };
            }
        }
        let mut states = BTreeMap::new();
        for (key, header) in headers {
            let mut bytes = Vec::with_capacity(header.len as usize);
            for i in 0..header.chunks {
                let chunk = chunks
                    .get(&chunk_key(&key, header.publication, i))
                    .with_context(|| format!("the state topic lacks chunk {i} of `{key}`'s publication"))?;
                bytes.extend_from_slice(chunk);
            }
            let checkpoint = decode_portable(&bytes).with_context(|| format!("`{key}`'s state in the state topic"))?;
            self.last.insert(key.clone(), header);
            states.insert(key, checkpoint);
        }
        Ok(states)
    }
}

/// An id no other publication has: the time in ns, with the process id in the high bits.
fn publication_id() -> u64 {
    let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap_or_default().as_nanos();
    (nanos as u64) ^ ((std::process::id() as u64) << 40)
}
