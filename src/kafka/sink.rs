//! The output topics. An idempotent producer that never times a message out: while the broker
//! is down, messages wait in the producer (and the store writer waits at the next barrier), so
//! a dead broker pauses the pipeline instead of losing output. A checkpoint completes only after
//! every message emitted before its barrier has been acknowledged by the broker.

use super::delivery::CountingProducer;
use super::records::messages;
use super::{KafkaConfig, KafkaOutputConfig};
use crate::results::ResultBatch;
use anyhow::Context;
use std::path::Path;
use std::time::Duration;

const RETRY_PAUSE: Duration = Duration::from_millis(200);
/// A message unacknowledged this long marks the sink not ready (it is still awaited).
const ACK_SLOW: Duration = Duration::from_secs(5);

pub struct KafkaSink {
    producer: CountingProducer,
    topics: KafkaOutputConfig,
    epoch: u64,
    /// Numbers the messages of rows without a revision of their own, within the epoch.
    seq: i64,
    /// 1 while the broker acknowledges in time (`passflow_component_ready{component="kafka_sink"}`).
    ready: prometheus::IntGauge,
}

impl KafkaSink {
    /// A producer for the output topics under `epoch` (see [`next_epoch`]).
    pub fn open(config: &KafkaConfig, epoch: u64, ready: prometheus::IntGauge) -> anyhow::Result<KafkaSink> {
        let producer = CountingProducer::create(&config.client_config(&[
            ("enable.idempotence", "true"),
            // Never give up on a message: a dead broker pauses the pipeline instead.
            ("message.timeout.ms", "0"),
            ("linger.ms", "20"),
        ]))
        .with_context(|| format!("creating the Kafka producer for {}", config.brokers))?;
        ready.set(1);
        Ok(KafkaSink { producer, topics: config.output.clone(), epoch, seq: 0, ready })
    }

    /// Queues a batch's messages (the batch already coalesced to one row per key).
    pub async fn send(&mut self, batch: &ResultBatch) {
        for message in messages(batch, self.epoch, &mut self.seq).iter() {
            self.queue(self.topics.topic(message.topic), message.key, message.value).await;
        }
    }

    async fn queue(&self, topic: &str, key: &[u8], value: Option<&[u8]>) {
        while let Err(e) = self.producer.send(topic, key, value).await {
            self.ready.set(0);
            if let Some(unlogged) = self.producer.admit_error(&e.to_string()) {
                tracing::warn!(topic, error = %e, unlogged, "producing to Kafka failed; retrying");
            }
            tokio::time::sleep(RETRY_PAUSE).await;
        }
    }

    /// Returns once the broker has acknowledged every message queued so far; a message it
    /// refused is sent again.
    pub async fn flush(&mut self) {
        loop {
            let (all_reported, refused) = self.producer.reported();
            if refused.is_empty() && all_reported {
                break;
            }
            if !refused.is_empty() {
                tokio::time::sleep(RETRY_PAUSE).await;
                for m in &refused {
                    tracing::warn!(topic = m.topic, error = %m.error, "Kafka refused a message; sending it again");
                    self.queue(&m.topic, &m.key, m.value.as_deref()).await;
                }
            } else if !self.producer.next_report(ACK_SLOW).await {
                self.ready.set(0);
                tracing::warn!(
                    "Kafka has not acknowledged a message for {ACK_SLOW:?} (is the broker down?); still waiting"
                );
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
