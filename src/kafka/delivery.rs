//! The producers and how they learn of deliveries.
//!
//! - [`CountingProducer`] counts delivery reports instead of awaiting a future per message: the
//!   output topics take hundreds of thousands of messages a second, and a checkpoint only needs
//!   to know that none is still unacknowledged.
//! - [`AckedProducer`] awaits each message's delivery, in order, and fails on a refusal: for
//!   the internal topics (repartition, state), whose messages cannot be sent again out of their
//!   place.

use super::errors::{ErrorThrottle, QuietErrors};
use super::KafkaConfig;
use anyhow::Context as _;
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{DeliveryResult, Message as _, OwnedHeaders};
use rdkafka::producer::{
    BaseRecord, DeliveryFuture, FutureProducer, FutureRecord, Producer as _, ProducerContext, ThreadedProducer,
};
use rdkafka::{ClientConfig, ClientContext};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How long a full producer queue is waited on before trying again.
const QUEUE_FULL_PAUSE: Duration = Duration::from_millis(5);
/// Acknowledgements an [`AckedProducer`] awaits at most before it queues more messages.
const MAX_IN_FLIGHT: usize = 50_000;
/// How long an [`AckedProducer`] with nothing in flight waits on a full queue.
const RETRY_PAUSE: Duration = Duration::from_millis(200);

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
    errors: ErrorThrottle,
}

impl ClientContext for Deliveries {
    fn error(&self, error: KafkaError, reason: &str) {
        self.errors.client_error("Kafka producer error", &error, reason);
    }
}

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

    /// Whether an error of `kind` is logged now, each kind at most once per
    /// [`super::errors::EVERY`]: `Some` with how many of its kind were not logged since.
    pub fn admit_error(&self, kind: &str) -> Option<u64> {
        self.deliveries().errors.admit(kind, Instant::now())
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

/// An idempotent producer that never times a message out (a dead broker pauses it) and awaits
/// every delivery: [`AckedProducer::flush`] returns once the broker has acknowledged everything
/// queued, and fails if it refused anything.
pub struct AckedProducer {
    producer: FutureProducer<QuietErrors>,
    in_flight: Vec<DeliveryFuture>,
    /// Which topic it writes, for messages: `repartition`, `partials`, `state`.
    what: &'static str,
}

impl AckedProducer {
    pub fn open(config: &KafkaConfig, what: &'static str) -> anyhow::Result<AckedProducer> {
        let producer: FutureProducer<QuietErrors> = config
            .client_config(&[("enable.idempotence", "true"), ("message.timeout.ms", "0"), ("linger.ms", "5")])
            .create_with_context(QuietErrors::default())
            .with_context(|| format!("creating the Kafka producer for {}", config.brokers))?;
        Ok(AckedProducer { producer, in_flight: Vec::new(), what })
    }

    /// Queues one message (`payload` `None`: a tombstone), waiting while the queue is full.
    pub async fn send(
        &mut self,
        topic: &str,
        key: &str,
        payload: Option<&[u8]>,
        headers: Option<&OwnedHeaders>,
    ) -> anyhow::Result<()> {
        self.send_to(topic, None, key, payload, headers).await
    }

    /// [`AckedProducer::send`] to `partition` (`None`: the one the key hashes to).
    pub async fn send_to(
        &mut self,
        topic: &str,
        partition: Option<i32>,
        key: &str,
        payload: Option<&[u8]>,
        headers: Option<&OwnedHeaders>,
    ) -> anyhow::Result<()> {
        loop {
            let mut record = FutureRecord::to(topic).key(key);
            if let Some(partition) = partition {
                record = record.partition(partition);
            }
            if let Some(payload) = payload {
                record = record.payload(payload);
            }
            if let Some(headers) = headers {
                record = record.headers(headers.clone());
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
                    tracing::debug!(error = %e, "the {} producer's queue is full; waiting", self.what);
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
                Ok(Err((e, _))) => anyhow::bail!("the {} topic refused a message: {e}", self.what),
                Err(_) => anyhow::bail!("the {} producer dropped a message without a delivery report", self.what),
            }
        }
        Ok(())
    }
}
