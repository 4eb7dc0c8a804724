//! Kafka in and out.
//!
//! - `source.rs`: the input topic as a source. Offsets live in passflow's checkpoints (nothing is
//!   auto-committed); they are committed to the group only after a checkpoint is durable, for
//!   the benefit of lag monitors. A partition resumes at its checkpointed offset whatever the
//!   group says.
//! - `sink.rs`: result, alert, first-entry, restriction, clean-pass, late and dead-letter topics.
//!   Idempotent producer; each checkpoint barrier waits until everything before it is acknowledged.
//! - `repartition.rs`: scale-out's internal topic, from the per-vehicle stage of each input
//!   partition to the aggregate stage: the passes, what they were late for, and end markers.
//! - `partials.rs`: scale-out's partial results: each input partition's flows, origins, speeds,
//!   Top-N buckets and congestion sums, by aggregate key, with watermarks; and the merge that adds them up per key.
//! - `state.rs`: scale-out's state topic, where every task publishes its state from time to
//!   time so that it moves with its partition to any instance.
//! - `delivery.rs`: the producers: the outputs' counts delivery reports instead of awaiting a
//!   future per message; the internal topics' awaits each delivery in order.
//! - `errors.rs`: librdkafka's client errors, each kind logged at most once per 10 s.
//! - `records.rs`: the messages: compactable keys, JSON values with a schema version, the epoch
//!   (one per start of the service) and the row's revision.

mod delivery;
mod errors;
mod partials;
mod records;
mod repartition;
mod sink;
mod source;
mod state;

pub use partials::{Merge, Partial, PartialSender};
pub use records::{messages, Message, Topic};
pub use repartition::{Forwarder, Repartitioned};
pub use sink::{next_epoch, KafkaSink};
pub use source::{Fetched, KafkaPosition, KafkaSource, Polled};
pub use state::StateTopic;

use rdkafka::ClientConfig;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// `[kafka]` in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaConfig {
    /// `bootstrap.servers`.
    pub brokers: String,
    /// Further librdkafka settings for every client (e.g. `security.protocol`).
    pub client: BTreeMap<String, String>,
    pub input: KafkaInputConfig,
    pub output: KafkaOutputConfig,
    pub scale_out: ScaleOutConfig,
}

/// `[kafka.scale_out]`: several instances in one consumer group (see `crate::app::cluster`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ScaleOutConfig {
    pub enabled: bool,
    /// The internal topic from the per-vehicle stage to the aggregate stage: one partition
    /// (the aggregate stage is one task, owned by one instance at a time).
    pub repartition_topic: String,
    /// The internal topic of partial results (flows, origins, spot speeds, Top-N buckets and
    /// congestion sums per input partition), by aggregate key: any number of partitions, each merged by one task.
    pub partials_topic: String,
    /// Where each task publishes its state, so that a partition's state
    /// moves with it to an instance on another machine (see `state.rs`). Without one, the
    /// instances must share `state.dir`.
    pub state_topic: Option<String>,
    /// How often each task publishes to the state topic (at the first checkpoint after this
    /// much time, and whenever it lets its partition go): an instance that takes a partition
    /// over from one that died reads the records since that publication again.
    pub state_publish_interval: crate::config::HumanDuration,
}

impl Default for ScaleOutConfig {
    fn default() -> Self {
        ScaleOutConfig {
            enabled: false,
            repartition_topic: "passflow.repartition".into(),
            partials_topic: "passflow.partials".into(),
            state_topic: None,
            state_publish_interval: crate::config::HumanDuration::from_secs(60),
        }
    }
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            client: BTreeMap::new(),
            input: KafkaInputConfig::default(),
            output: KafkaOutputConfig::default(),
            scale_out: ScaleOutConfig::default(),
        }
    }
}

/// `[kafka.input]`: the input topic, read when `source.kind = "kafka"`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaInputConfig {
    pub topic: String,
    pub group_id: String,
    /// Stop at the end offsets found when each partition is assigned, closing every window (a
    /// bounded run, e.g. a re-run of a day kept on the topic).
    pub bounded: bool,
    /// Let the wall clock move the watermark while every partition is idle (live traffic).
    /// Off for historical data, whose event times are far behind the wall clock.
    pub wall_clock: bool,
    /// Records handed to the engine per step, at most: smaller steps emit windows sooner after
    /// their data arrives, larger ones cost less per record.
    pub max_batch: usize,
}

impl Default for KafkaInputConfig {
    fn default() -> Self {
        KafkaInputConfig {
            topic: "passes".into(),
            group_id: "passflow".into(),
            bounded: false,
            wall_clock: true,
            max_batch: 20_000,
        }
    }
}

/// `[kafka.output]`: the output topics.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct KafkaOutputConfig {
    /// Write the outputs to the topics below (besides the result store).
    pub enabled: bool,
    /// Window results: flows, origins, Top-N, high-frequency vehicles, speeds, congestion,
    /// trajectories.
    pub results: String,
    pub alerts: String,
    pub first_entries: String,
    /// Restriction violations and daily summaries.
    pub restrictions: String,
    pub clean_passes: String,
    pub late_passes: String,
    pub dead_letters: String,
}

impl Default for KafkaOutputConfig {
    fn default() -> Self {
        KafkaOutputConfig {
            enabled: false,
            results: "passflow.results".into(),
            alerts: "passflow.alerts".into(),
            first_entries: "passflow.first-entries".into(),
            restrictions: "passflow.restrictions".into(),
            clean_passes: "passflow.clean-passes".into(),
            late_passes: "passflow.late-passes".into(),
            dead_letters: "passflow.dead-letters".into(),
        }
    }
}

impl KafkaOutputConfig {
    pub fn topic(&self, topic: Topic) -> &str {
        match topic {
            Topic::Results => &self.results,
            Topic::Alerts => &self.alerts,
            Topic::FirstEntries => &self.first_entries,
            Topic::Restrictions => &self.restrictions,
            Topic::CleanPasses => &self.clean_passes,
            Topic::LatePasses => &self.late_passes,
            Topic::DeadLetters => &self.dead_letters,
        }
    }
}

impl KafkaConfig {
    /// A client configuration: the brokers, passflow's defaults for `role`, then `client`
    /// (which overrides either).
    pub(crate) fn client_config(&self, defaults: &[(&str, &str)]) -> ClientConfig {
        let mut config = ClientConfig::new();
        config.set("bootstrap.servers", &self.brokers);
        for (k, v) in defaults {
            config.set(*k, *v);
        }
        for (k, v) in &self.client {
            config.set(k, v);
        }
        config
    }
}
