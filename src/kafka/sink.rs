//! The output topics. An idempotent producer that never times a message out: while the broker
//! is down, messages wait in the producer (and the store writer waits at the next barrier), so
//! a dead broker pauses the pipeline instead of losing output. A checkpoint completes only after
//! every message emitted before its barrier has been acknowledged by the broker.

use super::records::{messages, Message};
use super::{KafkaConfig, KafkaOutputConfig};
use crate::results::ResultBatch;
use anyhow::Context;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::Message as _;
use rdkafka::producer::{DeliveryFuture, FutureProducer, FutureRecord};
use std::path::Path;
use std::time::Duration;

/// Acknowledgements awaited at most before more messages are queued.
const MAX_IN_FLIGHT: usize = 100_000;
const RETRY_PAUSE: Duration = Duration::from_millis(200);

pub struct KafkaSink {
    producer: FutureProducer,
    topics: KafkaOutputConfig,
    epoch: u64,
    /// Numbers the messages of rows without a revision of their own, within the epoch.
    seq: i64,
    in_flight: Vec<DeliveryFuture>,
}

impl KafkaSink {
    /// A producer for the output topics under `epoch` (see [`next_epoch`]).
    pub fn open(config: &KafkaConfig, epoch: u64) -> anyhow::Result<KafkaSink> {
        let producer: FutureProducer = config
            .client_config(&[
                ("enable.idempotence", "true"),
                // Never give up on a message: a dead broker pauses the pipeline instead.
                ("message.timeout.ms", "0"),
                ("linger.ms", "20"),
            ])
            .create()
            .with_context(|| format!("creating the Kafka producer for {}", config.brokers))?;
        Ok(KafkaSink { producer, topics: config.output.clone(), epoch, seq: 0, in_flight: Vec::new() })
    }

    /// Queues a batch's messages (the batch already coalesced to one row per key).
    pub async fn send(&mut self, batch: &ResultBatch) {
        for message in messages(batch, self.epoch, &mut self.seq) {
            self.queue(&message).await;
        }
    }

    async fn queue(&mut self, message: &Message) {
        loop {
            let topic = self.topics.topic(message.topic);
            match self.try_send(topic, message.key.as_bytes(), message.value.as_deref().map(str::as_bytes)) {
                Ok(delivery) => {
                    self.in_flight.push(delivery);
                    if self.in_flight.len() >= MAX_IN_FLIGHT {
                        self.flush().await;
                    }
                    return;
                }
                Err(KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull)) => self.flush().await,
                Err(e) => {
                    tracing::warn!(topic, error = %e, "producing to Kafka failed; retrying");
                    tokio::time::sleep(RETRY_PAUSE).await;
                }
            }
        }
    }

    fn try_send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> Result<DeliveryFuture, KafkaError> {
        let mut record = FutureRecord::to(topic).key(key);
        if let Some(value) = value {
            record = record.payload(value);
        }
        self.producer.send_result(record).map_err(|(e, _)| e)
    }

    /// Returns once the broker has acknowledged every message queued so far; a message it
    /// refused is sent again.
    pub async fn flush(&mut self) {
        while !self.in_flight.is_empty() {
            let pending = std::mem::take(&mut self.in_flight);
            for delivery in pending {
                match delivery.await {
                    Ok(Ok(_)) => {}
                    Ok(Err((e, refused))) => {
                        tracing::warn!(topic = refused.topic(), error = %e, "Kafka refused a message; sending it again");
                        loop {
                            tokio::time::sleep(RETRY_PAUSE).await;
                            match self.try_send(refused.topic(), refused.key().unwrap_or_default(), refused.payload()) {
                                Ok(again) => break self.in_flight.push(again),
                                Err(e) => {
                                    tracing::warn!(error = %e, "sending a refused message again failed; retrying")
                                }
                            }
                        }
                    }
                    // The producer dropped the message: it cannot be told apart from a loss,
                    // so the pipeline stops rather than complete a checkpoint over it.
                    Err(_) => panic!("the Kafka producer dropped a message without a delivery report"),
                }
            }
        }
    }
}

/// The next output epoch of the service whose state is in `dir`: one more than the last, kept
/// in a file there (written and synced before any message of the new epoch is sent).
pub fn next_epoch(dir: &Path) -> anyhow::Result<u64> {
    let file = dir.join("kafka-epoch");
    let last = match std::fs::read_to_string(&file) {
        Ok(text) => text.trim().parse::<u64>().with_context(|| format!("{} is not a number", file.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => 0,
        Err(e) => return Err(e).with_context(|| format!("reading {}", file.display())),
    };
    std::fs::create_dir_all(dir)?;
    let tmp = dir.join("kafka-epoch.tmp");
    let mut f = std::fs::File::create(&tmp)?;
    std::io::Write::write_all(&mut f, format!("{}\n", last + 1).as_bytes())?;
    f.sync_all()?;
    std::fs::rename(&tmp, &file)?;
    Ok(last + 1)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_gets_a_higher_epoch() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_epoch(dir.path()).unwrap(), 1);
        assert_eq!(next_epoch(dir.path()).unwrap(), 2);
        std::fs::write(dir.path().join("kafka-epoch"), "x").unwrap();
        assert!(next_epoch(dir.path()).unwrap_err().to_string().contains("not a number"));
    }
}
