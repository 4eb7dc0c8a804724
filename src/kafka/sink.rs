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
/// A message unacknowledged this long marks the sink not ready (it is still awaited).
const ACK_SLOW: Duration = Duration::from_secs(5);

pub struct KafkaSink {
    producer: FutureProducer,
    topics: KafkaOutputConfig,
    epoch: u64,
    /// Numbers the messages of rows without a revision of their own, within the epoch.
    seq: i64,
    in_flight: Vec<DeliveryFuture>,
    /// 1 while the broker acknowledges in time (`passflow_component_ready{component="kafka_sink"}`).
    ready: prometheus::IntGauge,
}

impl KafkaSink {
    /// A producer for the output topics under `epoch` (see [`next_epoch`]).
    pub fn open(config: &KafkaConfig, epoch: u64, ready: prometheus::IntGauge) -> anyhow::Result<KafkaSink> {
        let producer: FutureProducer = config
            .client_config(&[
                ("enable.idempotence", "true"),
                // Never give up on a message: a dead broker pauses the pipeline instead.
                ("message.timeout.ms", "0"),
                ("linger.ms", "20"),
            ])
            .create()
            .with_context(|| format!("creating the Kafka producer for {}", config.brokers))?;
        ready.set(1);
        Ok(KafkaSink { producer, topics: config.output.clone(), epoch, seq: 0, in_flight: Vec::new(), ready })
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
                    self.ready.set(0);
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
            for mut delivery in pending {
                let outcome = loop {
                    match tokio::time::timeout(ACK_SLOW, &mut delivery).await {
                        Ok(outcome) => break outcome,
                        Err(_) => {
                            self.ready.set(0);
                            tracing::warn!("Kafka has not acknowledged a message for {ACK_SLOW:?} (is the broker down?); still waiting");
                        }
                    }
                };
                match outcome {
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
        self.ready.set(1);
    }
}

/// The next output epoch of the service whose state is in `dir`: one more than the last, kept
/// in a file there (written and synced before any message of the new epoch is sent).
pub fn next_epoch(dir: &Path) -> anyhow::Result<u64> {
    // Each epoch is claimed by creating its file, which fails when another process sharing the
    // folder (scale-out) claimed it first: no two processes ever write under the same epoch.
    let claims = dir.join("kafka-epochs");
    std::fs::create_dir_all(&claims).with_context(|| format!("creating {}", claims.display()))?;
    let legacy = match std::fs::read_to_string(dir.join("kafka-epoch")) {
        Ok(text) => text.trim().parse::<u64>().unwrap_or(0),
        Err(_) => 0,
    };
    let claimed =
        |entry: std::io::Result<std::fs::DirEntry>| -> Option<u64> { entry.ok()?.file_name().to_str()?.parse().ok() };
    let last = std::fs::read_dir(&claims)?.filter_map(claimed).max().unwrap_or(0).max(legacy);
    let mut epoch = last + 1;
    loop {
        match std::fs::OpenOptions::new().write(true).create_new(true).open(claims.join(epoch.to_string())) {
            Ok(f) => {
                f.sync_all()?;
                std::fs::File::open(&claims)?.sync_all()?;
                break;
            }
            Err(e) if e.kind() == std::io::ErrorKind::AlreadyExists => epoch += 1,
            Err(e) => return Err(e).with_context(|| format!("claiming epoch {epoch} in {}", claims.display())),
        }
    }
    // Older claims are not needed to find the newest.
    for old in std::fs::read_dir(&claims)?.filter_map(claimed).filter(|n| *n + 16 < epoch) {
        let _ = std::fs::remove_file(claims.join(old.to_string()));
    }
    Ok(epoch)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_start_gets_a_higher_epoch() {
        let dir = tempfile::tempdir().unwrap();
        assert_eq!(next_epoch(dir.path()).unwrap(), 1);
        assert_eq!(next_epoch(dir.path()).unwrap(), 2);
        // A folder of an earlier build, which kept the last epoch in one file.
        std::fs::write(dir.path().join("kafka-epoch"), "7\n").unwrap();
        assert_eq!(next_epoch(dir.path()).unwrap(), 8);
    }

    #[test]
    fn processes_sharing_a_folder_never_get_the_same_epoch() {
        let dir = tempfile::tempdir().unwrap();
        let claims: Vec<u64> = std::thread::scope(|s| {
            let workers: Vec<_> = (0..8)
                .map(|_| s.spawn(|| (0..5).map(|_| next_epoch(dir.path()).unwrap()).collect::<Vec<_>>()))
                .collect();
            workers.into_iter().flat_map(|w| w.join().unwrap()).collect()
        });
        let distinct: std::collections::BTreeSet<u64> = claims.iter().copied().collect();
        assert_eq!(distinct.len(), claims.len(), "{claims:?}");
    }
}
