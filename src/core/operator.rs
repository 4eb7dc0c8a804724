//! The operator contract: every pipeline is an [`Operator`] driven by the engine through the
//! same lifecycle — batches of passes, watermark advances, checkpoint barriers, close — with
//! its state declared, versioned and snapshotted through [`Operator::snapshot`].

use crate::model::{fnv1a64_each, Pass};
use crate::results::ResultBatch;
use bincode::Options as _;
use std::borrow::Cow;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::OnceLock;

/// What more than one operator derives from a batch's passes, derived once for the batch by
/// the first to ask (operators of other groups may ask at the same time, on another thread).
pub struct BatchMemo<'p> {
    passes: &'p [Pass],
    id_digests: OnceLock<Vec<u64>>,
}

impl<'p> BatchMemo<'p> {
    pub const fn new(passes: &'p [Pass]) -> BatchMemo<'p> {
        BatchMemo { passes, id_digests: OnceLock::new() }
    }

    /// FNV-1a of each pass's id, in the order of `passes`: this memo's when they are the passes
    /// it was made for, else computed.
    pub fn id_digests(&self, passes: &[Pass]) -> Cow<'_, [u64]> {
        let digests = |passes: &[Pass]| fnv1a64_each(passes.iter().map(|p| p.pass_id.as_bytes()));
        if std::ptr::eq(self.passes, passes) {
            Cow::Borrowed(self.id_digests.get_or_init(|| digests(passes)))
        } else {
            Cow::Owned(digests(passes))
        }
    }
}

/// A memo of no batch: work outside a batch (watermarks, closing), and tests.
pub static NO_BATCH: BatchMemo<'static> = BatchMemo::new(&[]);

/// What an operator sees of the engine while it runs.
pub struct Context<'a> {
    /// The watermark when the batch arrived (late judgements use it).
    pub watermark: i64,
    pub allowed_lateness_ms: i64,
    /// Processing time (epoch ms) of the batch or tick: for work paced by the wall clock rather
    /// than by event time (the source's clock; a replay's is the wall clock).
    pub processing_now: i64,
    /// Rows the operator emits.
    pub out: &'a mut ResultBatch,
    /// Passes of the batch that were late for some window: (index in the batch, what missed it).
    pub late: &'a mut Vec<(usize, &'static str)>,
    /// What the batch's passes give more than one operator ([`NO_BATCH`] outside a batch).
    pub batch: &'a BatchMemo<'a>,
}

/// An operator's state as bytes, with the version of its encoding.
#[derive(Clone, Debug, PartialEq)]
pub struct StateBlob {
    pub version: u32,
    pub bytes: Vec<u8>,
}

impl StateBlob {
    /// `state` in the compact binary encoding (bincode, integers of variable length): large
    /// per-vehicle states are a third of their JSON size, and quicker to write and read.
    /// `last_len` holds the length of this state's previous encoding: the buffer starts a
    /// little larger than that, so a state of hundreds of megabytes is written once into
    /// memory instead of copied to a new buffer each time it doubles.
    pub fn encode<T: serde::Serialize + ?Sized>(
        version: u32,
        state: &T,
        last_len: &AtomicUsize,
    ) -> anyhow::Result<StateBlob> {
        let hint = last_len.load(Ordering::Relaxed);
        let mut bytes = Vec::with_capacity(hint + hint / 8);
        binary().serialize_into(&mut bytes, state)?;
        last_len.store(bytes.len(), Ordering::Relaxed);
        Ok(StateBlob { version, bytes })
    }

    /// Reads the state of `operator`: written by [`StateBlob::encode`] under `version`, or as
    /// JSON under an earlier version from `json_since` on (checkpoints and savepoints of
    /// earlier builds).
    pub fn decode<T: serde::de::DeserializeOwned>(
        &self,
        operator: &str,
        version: u32,
        json_since: u32,
    ) -> anyhow::Result<T> {
        if self.version == version {
            return Ok(binary().deserialize(&self.bytes)?);
        }
        if (json_since..version).contains(&self.version) {
            return Ok(serde_json::from_slice(&self.bytes)?);
        }
        check_version(operator, self.version, version)?;
        unreachable!("a version other than the supported one is refused")
    }
}

/// The binary encoding of states: bincode with integers of variable length.
fn binary() -> impl bincode::Options {
    bincode::DefaultOptions::new().with_varint_encoding()
}

/// The items of an iterator serialised as a sequence, without collecting them first (large
/// states are written straight from their maps). It can be serialised once.
pub struct SeqOf<I>(std::cell::Cell<Option<I>>);

impl<I> SeqOf<I> {
    pub fn new(items: I) -> SeqOf<I> {
        SeqOf(std::cell::Cell::new(Some(items)))
    }
}

impl<I: Iterator> SeqOf<Counted<I>> {
    /// A sequence of `len` items from an iterator that cannot tell its length (a flattened
    /// one, say): the binary encoding writes the length first.
    pub fn counted(items: I, len: usize) -> SeqOf<Counted<I>> {
        SeqOf::new(Counted { items, left: len })
    }
}

/// An iterator that knows how many items it has left (see [`SeqOf::counted`]).
pub struct Counted<I> {
    items: I,
    left: usize,
}

impl<I: Iterator> Iterator for Counted<I> {
    type Item = I::Item;

    fn next(&mut self) -> Option<I::Item> {
        let item = self.items.next()?;
        self.left = self.left.checked_sub(1).expect("no more items than counted");
        Some(item)
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        (self.left, Some(self.left))
    }
}

impl<I: Iterator<Item = T>, T: serde::Serialize> serde::Serialize for SeqOf<I> {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        let items = self.0.take().ok_or_else(|| serde::ser::Error::custom("a sequence serialised twice"))?;
        serializer.collect_seq(items)
    }
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

    /// A checkpoint barrier passes: everything emitted so far, this call's rows included,
    /// belongs to checkpoint `id` (rows held back for pacing go out here, so that a
    /// checkpoint's results are written when it completes).
    fn on_checkpoint(&mut self, _id: u64, _ctx: &mut Context<'_>) {}

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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::model::fnv1a64;
    use crate::pipelines::test_support::pass;

    #[test]
    fn a_batch_memo_gives_each_pass_its_id_digest_and_computes_them_for_other_passes() {
        let passes: Vec<Pass> = (0..9).map(|i| pass("赣A12345", 0, i * 1000)).collect();
        let want: Vec<u64> = passes.iter().map(|p| fnv1a64(p.pass_id.as_bytes())).collect();
        let memo = BatchMemo::new(&passes);
        let first = memo.id_digests(&passes);
        assert!(matches!(first, Cow::Borrowed(_)), "the memo's own passes are digested once");
        assert_eq!(*first, want[..]);
        assert_eq!(*memo.id_digests(&passes), want[..]);
        // A part of the batch is not the batch: its digests are its own.
        let part = memo.id_digests(&passes[3..]);
        assert!(matches!(part, Cow::Owned(_)));
        assert_eq!(*part, want[3..]);
        assert_eq!(*NO_BATCH.id_digests(&passes[..2]), want[..2]);
    }
}
