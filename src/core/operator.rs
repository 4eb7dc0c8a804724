//! The operator contract: every pipeline is an [`Operator`] driven by the engine through the
//! same lifecycle — batches of passes, watermark advances, checkpoint barriers, close — with
//! its state declared, versioned and snapshotted through [`Operator::snapshot`].

use crate::model::Pass;
use crate::results::ResultBatch;

/// What an operator sees of the engine while it runs.
pub struct Context<'a> {
    /// The watermark when the batch arrived (late judgements use it).
    pub watermark: i64,
    pub allowed_lateness_ms: i64,
    /// Rows the operator emits.
    pub out: &'a mut ResultBatch,
    /// Passes of the batch that were late for some window: (index in the batch, what missed it).
    pub late: &'a mut Vec<(usize, &'static str)>,
}

/// An operator's state as bytes, with the version of its encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct StateBlob {
    pub version: u32,
    pub bytes: Vec<u8>,
}

pub trait Operator: Send {
    /// Stable name: the key of its state in checkpoints and savepoints.
    fn name(&self) -> &'static str;

    /// The version of the state encoding this build writes.
    fn state_version(&self) -> u32;

    /// Operators run on several threads; those that share state in-process return the same
    /// group and run in their listed order on one thread. By default an operator is alone.
    fn thread_group(&self) -> &'static str {
        self.name()
    }

    /// Takes a batch of valid, deduplicated passes.
    fn process_batch(&mut self, passes: &[Pass], ctx: &mut Context<'_>);

    /// The watermark has advanced to `ctx.watermark`: emit what it completes.
    fn on_watermark(&mut self, _ctx: &mut Context<'_>) {}

    /// A checkpoint barrier passes: everything emitted so far belongs to checkpoint `id`.
    fn on_checkpoint(&mut self, _id: u64) {}

    /// The input has ended (after a final watermark at the end of time).
    fn on_close(&mut self, _ctx: &mut Context<'_>) {}

    fn snapshot(&self) -> anyhow::Result<StateBlob>;

    /// Restores a snapshot; a version this build cannot read is a clear error.
    fn restore(&mut self, blob: &StateBlob) -> anyhow::Result<()>;

    /// The whole state for a savepoint, which [`Operator::restore`] takes: the snapshot, plus
    /// whatever the operator keeps outside checkpoints.
    fn export(&self) -> anyhow::Result<StateBlob> {
        self.snapshot()
    }

    /// Alerts the sinks hold, some raised or retracted after the checkpoint this state was
    /// restored from (the state does not know them): an operator that retracts alerts takes
    /// them in, so that one the replayed input does not raise again is retracted, and what it
    /// emits outranks the stored revisions.
    fn adopt_alerts(&mut self, _alerts: &[crate::results::AlertRow]) {}
}

/// Checks a stored state version against the one this build supports.
pub fn check_version(operator: &str, stored: u32, supported: u32) -> anyhow::Result<()> {
    anyhow::ensure!(
        stored == supported,
        "state of operator `{operator}` has version {stored}, this build reads version {supported}: \
         restore with a build of the same state version, or start from empty state"
    );
    Ok(())
}

/// Serialises a map whose keys are not strings (tuples, say) as a list of pairs: JSON objects
/// only take string keys. Use as `#[serde(with = "crate::core::pairs")]`.
pub mod pairs {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    use std::collections::BTreeMap;

    pub fn serialize<S: Serializer, K: Serialize, V: Serialize>(map: &BTreeMap<K, V>, s: S) -> Result<S::Ok, S::Error> {
        s.collect_seq(map.iter())
    }

    pub fn deserialize<'de, D, K, V>(d: D) -> Result<BTreeMap<K, V>, D::Error>
    where
        D: Deserializer<'de>,
        K: Deserialize<'de> + Ord,
        V: Deserialize<'de>,
    {
        Vec::<(K, V)>::deserialize(d).map(|pairs| pairs.into_iter().collect())
    }
}
