//! Scale-out's internal topic. The per-vehicle stage of each input partition forwards every
//! valid, first-seen pass to it — the record as it arrived, keyed by the input partition, with
//! the pipelines of that stage it was late for — and, when a bounded input partition has been
//! read to its end, an end marker. The aggregate stage reads it (see `crate::app::cluster`).
//!
//! The producer is idempotent and never times a message out, so each input partition's messages
//! keep their order; a checkpoint of the per-vehicle stage completes only after everything it
//! forwarded has been acknowledged. After a restart the stage forwards some passes again: the
//! aggregate stage deduplicates them like any resend.

use super::source::Fetched;
use super::KafkaConfig;
use crate::core::Forwarded;
use anyhow::Context;
use rdkafka::message::{Header, OwnedHeaders};
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::time::Duration;

const OFFSET: &str = "offset";
const LATE: &str = "late";
const END: &str = "end";
/// Acknowledgements awaited at most before more messages are queued.
const MAX_IN_FLIGHT: usize = 50_000;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
    producer: FutureProducer,
    topic: String,
    in_flight: Vec<DeliveryFuture>,
}

impl Forwarder {
    pub fn open(config: &KafkaConfig) -> anyhow::Result<Forwarder> {
        let producer: FutureProducer = config
            .client_config(&[("enable.idempotence", "true"), ("message.timeout.ms", "0"), ("linger.ms", "5")])
            .create()
            .with_context(|| format!("creating the Kafka producer for {}", config.brokers))?;
        Ok(Forwarder { producer, topic: config.scale_out.repartition_topic.clone(), in_flight: Vec::new() })
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
        let key = partition.to_string();
        loop {
            let mut record = FutureRecord::to(&self.topic).key(&key).headers(headers.clone());
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            match self.producer.send_result(record) {
                Ok(delivery) => {
                    self.in_flight.push(delivery);
                    if self.in_flight.len() >= MAX_IN_FLIGHT {
                        self.flush().await?;
                    }
                    return Ok(());
                }
                Err((e, _)) => {
                    tracing::debug!(error = %e, "the repartition producer's queue is full; waiting");
                    if self.in_flight.is_empty() {
                        tokio::time::sleep(RETRY_PAUSE).await;
                    }
                    self.flush().await?;
                }
            }
        }
    }

    /// Returns once the broker has acknowledged everything queued. A message the broker refused
    /// fails the run (it cannot be sent again in its place in the order).
    pub async fn flush(&mut self) -> anyhow::Result<()> {
        for delivery in std::mem::take(&mut self.in_flight) {
            match delivery.await {
                Ok(Ok(_)) => {}
                Ok(Err((e, _))) => anyhow::bail!("the repartition topic refused a message: {e}"),
                Err(_) => anyhow::bail!("the repartition producer dropped a message without a delivery report"),
            }
        }
        Ok(())
    }
}
