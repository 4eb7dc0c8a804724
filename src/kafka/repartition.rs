//! Scale-out's internal topic. The per-vehicle stage of each input partition forwards every
//! valid, first-seen pass to it — the record as it arrived, keyed by the input partition, with
//! the pipelines of that stage it was late for — and, when a bounded input partition has been
//! read to its end, an end marker. The aggregate stage reads it (see `crate::app::cluster`).
//!
//! The producer is idempotent and never times a message out, so each input partition's messages
//! keep their order; a checkpoint of the per-vehicle stage completes only after everything it
//! forwarded has been acknowledged. After a restart the stage forwards some passes again: the
//! aggregate stage deduplicates them like any resend.

use super::delivery::AckedProducer;
use super::source::Fetched;
use super::KafkaConfig;
use crate::core::Forwarded;
use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};

const OFFSET: &str = "offset";
const LATE: &str = "late";
const END: &str = "end";

/// A message of the internal topic, read back.
#[derive(Debug, PartialEq)]
pub enum Repartitioned {
    Pass {
        partition: u32,
        offset: u64,
        bytes: Vec<u8>,
        late: Vec<String>,
    },
    /// Input partition `partition` has been read to its end (bounded runs).
    End {
        partition: u32,
    },
}

impl Repartitioned {
    pub fn read(message: Fetched) -> anyhow::Result<Repartitioned> {
        let partition: u32 = message
            .key
            .as_deref()
            .and_then(|k| std::str::from_utf8(k).ok())
            .and_then(|k| k.parse().ok())
            .with_context(|| {
                format!("message {} of the repartition topic has no input partition as its key", message.offset)
            })?;
        let header = |name: &str| message.headers.iter().find(|(k, _)| k == name).map(|(_, v)| v.as_slice());
        if header(END).is_some() {
            return Ok(Repartitioned::End { partition });
        }
        let offset = header(OFFSET)
            .and_then(|v| std::str::from_utf8(v).ok())
            .and_then(|v| v.parse().ok())
            .with_context(|| format!("message {} of the repartition topic has no input offset", message.offset))?;
        let late = header(LATE)
            .map(|v| String::from_utf8_lossy(v).split(',').filter(|l| !l.is_empty()).map(str::to_owned).collect())
            .unwrap_or_default();
        Ok(Repartitioned::Pass { partition, offset, bytes: message.payload.unwrap_or_default(), late })
    }
}

pub struct Forwarder {
    producer: AckedProducer,
    topic: String,
}

impl Forwarder {
    pub fn open(config: &KafkaConfig) -> anyhow::Result<Forwarder> {
        let producer = AckedProducer::open(config, "repartition")?;
        Ok(Forwarder { producer, topic: config.scale_out.repartition_topic.clone() })
    }

    /// Queues the passes of one step.
    pub async fn forward(&mut self, passes: &[Forwarded]) -> anyhow::Result<()> {
        for pass in passes {
            let mut headers = OwnedHeaders::new().insert(Header { key: OFFSET, value: Some(&pass.seq.to_string()) });
            if !pass.late.is_empty() {
                headers = headers.insert(Header { key: LATE, value: Some(&pass.late.join(",")) });
            }
            self.send(pass.partition, Some(&pass.bytes), headers).await?;
        }
        Ok(())
    }

    /// Queues the end marker of input partition `partition`.
    pub async fn end(&mut self, partition: u32) -> anyhow::Result<()> {
        self.send(partition, None, OwnedHeaders::new().insert(Header { key: END, value: Some("1") })).await
    }

    async fn send(&mut self, partition: u32, payload: Option<&[u8]>, headers: OwnedHeaders) -> anyhow::Result<()> {
        self.producer.send(&self.topic, &partition.to_string(), payload, Some(&headers)).await
    }

    /// Returns once the broker has acknowledged everything queued (see [`AckedProducer::flush`]).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        self.producer.flush().await
    }
}
