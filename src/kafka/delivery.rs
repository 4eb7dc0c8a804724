//! A producer whose delivery reports are counted, not awaited one future per message: the
//! output topics take hundreds of thousands of messages a second, and a checkpoint only needs
//! to know that none is still unacknowledged.

use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message as _};
use rdkafka::producer::{BaseRecord, Producer as _, ProducerContext, ThreadedProducer};
use rdkafka::{ClientConfig, ClientContext};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::Duration;

/// How long a full producer queue is waited on before trying again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);

/// A message the broker refused.
pub struct Refused {
    pub topic: String,
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
    pub error: KafkaError,
}

/// What the delivery reports tell (they arrive on the producer's polling thread): how many
/// messages still await one, and the refused ones.
#[derive(Default)]
pub struct Deliveries {
    outstanding: AtomicUsize,
    refused: Mutex<Vec<Refused>>,
    reported: tokio::sync::Notify,
}

impl ClientContext for Deliveries {}

impl ProducerContext for Deliveries {
    type DeliveryOpaque = ();

    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((error, message)) = result {
            let refused = Refused {
                topic: message.topic().to_owned(),
                key: message.key().unwrap_or_default().to_vec(),
                value: message.payload().map(<[u8]>::to_vec),
                error: error.clone(),
            };
            self.refused.lock().unwrap_or_else(|p| p.into_inner()).push(refused);
        }
        // Counted down only after a refusal is kept: see `CountingProducer::reported`.
        self.outstanding.fetch_sub(1, Ordering::AcqRel);
        self.reported.notify_one();
    }
}

pub struct CountingProducer {
    producer: ThreadedProducer<Deliveries>,
}

impl CountingProducer {
    pub fn create(config: &ClientConfig) -> Result<CountingProducer, KafkaError> {
        Ok(CountingProducer { producer: config.create_with_context(Deliveries::default())? })
    }

    fn deliveries(&self) -> &Deliveries {
        self.producer.context()
    }

    /// Hands one message to the producer, waiting while its queue is full; any other error is
    /// returned (nothing was queued then).
    pub async fn send(&self, topic: &str, key: &[u8], value: Option<&[u8]>) -> Result<(), KafkaError> {
        loop {
            let mut record = BaseRecord::<[u8], [u8]>::to(topic).key(key);
            if let Some(value) = value {
                record = record.payload(value);
            }
            // Counted before the send: its report may come before `send` returns.
            self.deliveries().outstanding.fetch_add(1, Ordering::AcqRel);
            let Err((e, _)) = self.producer.send(record) else { return Ok(()) };
            self.deliveries().outstanding.fetch_sub(1, Ordering::AcqRel);
            match e {
                KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull) => {
                    let _ = tokio::time::timeout(QUEUE_FULL_PAUSE, self.deliveries().reported.notified()).await;
                }
                e => return Err(e),
            }
        }
    }

    /// Whether every message sent so far has its report, and the refused ones (taken). A
    /// report is counted only after its refusal is kept, so when this says all are reported
    /// the list is complete.
    pub fn reported(&self) -> (bool, Vec<Refused>) {
        let all = self.deliveries().outstanding.load(Ordering::Acquire) == 0;
        (all, std::mem::take(&mut *self.deliveries().refused.lock().unwrap_or_else(|p| p.into_inner())))
    }

    /// Waits up to `timeout` for the next report; false when none came.
    pub async fn next_report(&self, timeout: Duration) -> bool {
        tokio::time::timeout(timeout, self.deliveries().reported.notified()).await.is_ok()
    }
}
