//! The streaming core: event time, watermarks, windows, lateness, operator state, checkpoints
//! and savepoints. Its contract: for any input in which no record is later than the allowed
//! lateness, the final result tables equal a batch computation over the same deduplicated
//! records, whatever the arrival order, batch boundaries or restarts in between.
//!
//! - `window.rs`, `watermark.rs`: pure functions of event time, unit-tested.
//! - `operator.rs`: the [`Operator`] contract every pipeline implements.
//! - `engine.rs`: ingestion, lateness, operators and snapshots for one stream.
//! - `checkpoint.rs`: checkpoints in RocksDB, savepoints in a directory.
//! - `sink.rs`: the bounded hand-over to the stores, with checkpoint barriers.
//! - `driver.rs`: an engine between a source and the sink, checkpointing on schedule.
//! - `vehicle_table.rs`: state keyed by vehicle, looked up a batch at a time.

pub mod checkpoint;
pub mod driver;
mod engine;
mod operator;
mod parallel;
pub mod sink;
mod vehicle_table;
pub mod watermark;
pub mod window;

pub use engine::{
    apply_writes, write_batch, Clocks, Engine, EngineSettings, EngineSnapshot, Forwarded, Record, StateWrite,
};
pub use operator::{check_version, pairs, BatchMemo, Context, Operator, SeqOf, StateBlob, NO_BATCH};
pub use vehicle_table::{hash_of as vehicle_hash, prefetch, VehicleTable};

#[cfg(test)]
mod convergence_tests;
