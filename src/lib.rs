//! passflow: an event-time streaming service for road-traffic checkpoint data (卡口过车数据).
//!
//! # Layout
//! - [`model`]: the domain — pass records, plates, vehicles, event time, reject reasons.
//! - [`reference`]: a city's reference data — checkpoints, segments, regions, plate prefixes,
//!   restriction rules.
//! - [`core`]: the streaming core — event time, watermarks, windows, lateness, operator
//!   state, checkpoints, savepoints, the sink hand-over.
//! - [`pipelines`]: the pipelines, one file each, on the core's operator contract.
//! - [`results`]: the result rows.
//! - [`ingest`]: decode → validate → deduplicate; everything rejected becomes a dead letter.
//! - [`simulator`]: a realistic, labelled city-day of passes, also a live source.
//! - [`store`]: result stores (SQLite, MySQL, `null://`), upserted by key.
//! - [`kafka`]: the Kafka source (offsets in checkpoints) and the output topics.
//! - [`webhooks`]: alert webhooks with a durable, signed, retried delivery queue.
//! - [`api`]: the HTTP API (`/healthz`, `/metrics`).
//! - [`metrics`]: every Prometheus metric, in one place.
//! - [`config`]: typed, layered configuration.
//! - [`app`]: the commands — `run`, `replay`, `simulate`.

pub mod api;
pub mod app;
pub mod config;
pub mod core;
pub mod ingest;
pub mod kafka;
pub mod metrics;
pub mod model;
pub mod pipelines;
pub mod reference;
pub mod results;
pub mod simulator;
pub mod store;
pub mod webhooks;
