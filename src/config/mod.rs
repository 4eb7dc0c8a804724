//! Typed, layered configuration. Precedence, lowest first: built-in defaults → the TOML file
//! given with `--config` → environment variables `PASSFLOW__SECTION__KEY` (for example
//! `PASSFLOW__API__LISTEN=0.0.0.0:8080`). Unknown keys are rejected. Every key is documented in
//! `config/passflow.example.toml`.

mod duration;

pub use duration::HumanDuration;

use crate::model::PlateColorScheme;
use anyhow::Context;
use chrono_tz::Tz;
use figment::providers::{Env, Format, Serialized, Toml};
use figment::Figment;
use serde::{Deserialize, Serialize};
use std::path::{Path, PathBuf};

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct Config {
    pub city: CityConfig,
    pub input: InputConfig,
    pub source: SourceConfig,
    pub core: CoreConfig,
    pub state: StateConfig,
    pub store: StoreConfig,
    pub api: ApiConfig,
    pub pipelines: PipelinesConfig,
    pub webhooks: crate::webhooks::WebhookConfig,
    pub archive: ArchiveConfig,
    pub kafka: crate::kafka::KafkaConfig,
}

/// The daily archive of clean passes (written by `run`, read by `backfill`).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ArchiveConfig {
    /// Where the archive lives; empty: no archive.
    pub dir: PathBuf,
}

impl Default for ArchiveConfig {
    fn default() -> Self {
        ArchiveConfig { dir: "data/archive".into() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct PipelinesConfig {
    /// The pipelines that run (all of them by default; see `crate::pipelines::NAMES`). One
    /// left out computes nothing and its tables stay as they are.
    pub enabled: Vec<String>,
    /// How many checkpoints the Top-N ranking keeps.
    pub top_n: usize,
    /// Passes at one checkpoint in one local day that make a vehicle high-frequency.
    pub high_frequency_passes: u32,
    /// The cloned-plate rule's thresholds.
    pub cloned_plates: crate::pipelines::ClonedPlateRule,
    /// The traffic-surge rule's thresholds.
    pub traffic_surge: crate::pipelines::SurgeRule,
    /// The watch list (CSV: plate,plate_color,reason,severity); the admin API writes it back.
    pub watchlist_file: PathBuf,
    pub first_entry: FirstEntryConfig,
}

impl Default for PipelinesConfig {
    fn default() -> Self {
        PipelinesConfig {
            enabled: crate::pipelines::every_name(),
            top_n: 10,
            high_frequency_passes: 8,
            cloned_plates: Default::default(),
            traffic_surge: Default::default(),
            watchlist_file: "data/watchlist.csv".into(),
            first_entry: FirstEntryConfig::default(),
        }
    }
}

/// Where first entries into the city are kept.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct FirstEntryConfig {
    /// `embedded` (in passflow's own checkpointed state) or a Redis URL (`redis://host:port`),
    /// shared by every instance.
    pub store: String,
    /// Prefix of the Redis keys (`<prefix>first_entry:<plate>:<colour>`).
    pub key_prefix: String,
}

impl Default for FirstEntryConfig {
    fn default() -> Self {
        FirstEntryConfig { store: "embedded".into(), key_prefix: "passflow:".into() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CityConfig {
    /// The city folder (checkpoints.csv, segments.csv, regions.csv, …).
    pub dir: PathBuf,
    /// IANA time zone of the city: local times and days are read in it.
    pub time_zone: String,
    /// The city's own plate prefixes ("local" vehicles).
    pub local_prefixes: Vec<String>,
}

impl Default for CityConfig {
    fn default() -> Self {
        CityConfig {
            dir: "config/city".into(),
            time_zone: "Asia/Shanghai".into(),
            local_prefixes: vec!["赣A".into(), "赣M".into()],
        }
    }
}

impl CityConfig {
    pub fn tz(&self) -> anyhow::Result<Tz> {
        self.time_zone.parse::<Tz>().map_err(|e| anyhow::anyhow!("city.time_zone `{}`: {e}", self.time_zone))
    }
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct InputConfig {
    /// How the source numbers plate colours: `police` (default), `etc` or `vendor`.
    pub plate_color_scheme: PlateColorScheme,
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum SourceKind {
    /// The built-in city simulator, paced by the wall clock.
    #[default]
    Simulator,
    /// The input topic in `[kafka.input]`.
    Kafka,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SourceConfig {
    pub kind: SourceKind,
    pub simulator: SimulatorSourceConfig,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct SimulatorSourceConfig {
    pub vehicles: u32,
    pub seed: u64,
    /// Simulated seconds per wall-clock second (1 = real time).
    pub speed: f64,
}

impl Default for SimulatorSourceConfig {
    fn default() -> Self {
        SimulatorSourceConfig { vehicles: 20_000, seed: 1, speed: 1.0 }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct CoreConfig {
    /// Bounded out-of-orderness of the watermark.
    pub out_of_orderness: HumanDuration,
    /// A source partition silent this long stops holding the watermark back.
    pub idle_timeout: HumanDuration,
    /// How long after a window closes a late pass still corrects it.
    pub allowed_lateness: HumanDuration,
    /// Live mode: passes further than this ahead of the wall clock are `future_timestamp`.
    pub max_clock_skew: HumanDuration,
    /// How often a checkpoint is taken.
    pub checkpoint_interval: HumanDuration,
    /// How long a stop waits for the pipeline (its last checkpoint) and the other tasks; one
    /// still held by a dependency then is left, and the process exits without it.
    pub stop_timeout: HumanDuration,
    /// Threads the pipelines of a large batch run on; 0: one per core.
    pub threads: usize,
    /// Lines a replay hands the engine at a time. The watermark moves between batches, and the
    /// pipelines emit the rows a batch changed once per batch: large batches are much faster
    /// (a vehicle passing again updates its rows once a batch, not once a pass), and judge
    /// lateness more coarsely (a pass is late only against the batches before its own).
    pub replay_batch: std::num::NonZeroUsize,
}

impl CoreConfig {
    /// The threads the pipelines run on.
    pub fn pipeline_threads(&self) -> usize {
        match self.threads {
            0 => std::thread::available_parallelism().map_or(1, usize::from),
            n => n,
        }
    }
}

impl Default for CoreConfig {
    fn default() -> Self {
        CoreConfig {
            out_of_orderness: HumanDuration::from_secs(10),
            idle_timeout: HumanDuration::from_secs(60),
            allowed_lateness: HumanDuration::from_secs(6 * 3600),
            max_clock_skew: HumanDuration::from_secs(300),
            checkpoint_interval: HumanDuration::from_secs(10),
            stop_timeout: HumanDuration::from_secs(30),
            threads: 0,
            replay_batch: std::num::NonZeroUsize::new(65_536).expect("not zero"),
        }
    }
}

#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum StateBackendKind {
    #[default]
    Rocksdb,
    Memory,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StateConfig {
    pub backend: StateBackendKind,
    /// Where RocksDB keeps checkpoints of the operator state.
    pub dir: PathBuf,
}

impl Default for StateConfig {
    fn default() -> Self {
        StateConfig { backend: StateBackendKind::Rocksdb, dir: "data/state".into() }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct StoreConfig {
    /// `sqlite://PATH`, `mysql://USER:PASSWORD@HOST:PORT/DB` or `null://`.
    pub url: String,
    /// How long rows are kept, per table (by their time: window start or end, day, arrival).
    pub retention: RetentionConfig,
    /// How often the service purges rows older than their retention.
    pub purge_interval: HumanDuration,
}

impl Default for StoreConfig {
    fn default() -> Self {
        StoreConfig {
            url: "sqlite://data/passflow.db".into(),
            retention: RetentionConfig::default(),
            purge_interval: HumanDuration::from_secs(3600),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct RetentionConfig {
    pub flow_counts: HumanDuration,
    pub origin_counts: HumanDuration,
    pub top_n: HumanDuration,
    pub checkpoint_speed: HumanDuration,
    pub segment_congestion: HumanDuration,
    pub area_congestion: HumanDuration,
    pub high_frequency: HumanDuration,
    pub alerts: HumanDuration,
    pub trajectories: HumanDuration,
    pub restriction_violations: HumanDuration,
    pub restriction_summary: HumanDuration,
    pub late_passes: HumanDuration,
    pub dead_letters: HumanDuration,
}

impl Default for RetentionConfig {
    fn default() -> Self {
        let days = |d: u64| HumanDuration::from_secs(d * 86_400);
        RetentionConfig {
            flow_counts: days(90),
            origin_counts: days(90),
            top_n: days(7),
            checkpoint_speed: days(90),
            segment_congestion: days(90),
            area_congestion: days(90),
            high_frequency: days(365),
            alerts: days(365),
            trajectories: days(90),
            restriction_violations: days(365),
            restriction_summary: days(365),
            late_passes: days(30),
            dead_letters: days(30),
        }
    }
}

impl RetentionConfig {
    /// (table, retention) for every table with a retention.
    pub fn tables(&self) -> [(&'static str, HumanDuration); 13] {
        [
            ("flow_counts", self.flow_counts),
            ("origin_counts", self.origin_counts),
            ("top_n", self.top_n),
            ("checkpoint_speed", self.checkpoint_speed),
            ("segment_congestion", self.segment_congestion),
            ("area_congestion", self.area_congestion),
            ("high_frequency", self.high_frequency),
            ("alerts", self.alerts),
            ("trajectories", self.trajectories),
            ("restriction_violations", self.restriction_violations),
            ("restriction_summary", self.restriction_summary),
            ("late_passes", self.late_passes),
            ("dead_letters", self.dead_letters),
        ]
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct ApiConfig {
    pub listen: String,
    /// Bearer tokens and their roles; none: the API is open (for a local, single-user setup).
    pub tokens: Vec<ApiToken>,
    /// Every plate look-up is appended here (JSON lines: who, what, when).
    pub audit_log: PathBuf,
    /// Requests per second per client address (bursts of twice that); 0: no limit.
    pub requests_per_second: u32,
    /// Origins that may call the API from a browser (`*`: any); empty: none.
    pub cors_origins: Vec<String>,
}

impl Default for ApiConfig {
    fn default() -> Self {
        ApiConfig {
            listen: "127.0.0.1:8080".into(),
            tokens: Vec::new(),
            audit_log: "data/audit.log".into(),
            requests_per_second: 2_000,
            cors_origins: Vec::new(),
        }
    }
}

/// One API client: its bearer token, who it is, and its role.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ApiToken {
    pub token: String,
    pub name: String,
    pub role: Role,
}

/// What a client may do; each role includes the ones before it.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Role {
    /// Aggregates: flows, congestion, Top-N, origins, reference data.
    Viewer,
    /// Plate look-ups: trajectories, first entry, alerts, high-frequency vehicles, violations.
    Analyst,
    /// The watch list and savepoints.
    Admin,
}

impl Config {
    /// Defaults, then `file` (when given), then `PASSFLOW__…` variables of the process.
    pub fn load(file: Option<&Path>) -> anyhow::Result<Config> {
        let mut figment = Figment::from(Serialized::defaults(Config::default()));
        if let Some(file) = file {
            anyhow::ensure!(file.exists(), "config file {} does not exist", file.display());
            figment = figment.merge(Toml::file_exact(file));
        }
        let env = Env::prefixed("PASSFLOW__").split("__");
        let config: Config = figment.merge(env).extract().context("invalid configuration")?;
        config.city.tz()?;
        crate::pipelines::check_names(&config.pipelines.enabled).context("pipelines.enabled")?;
        // An alert's notification can change until its hour has passed by the lateness; a
        // notification's revisions are numbered from the rows kept in the queue.
        let changing = config.core.allowed_lateness.as_millis() + 3_600_000;
        anyhow::ensure!(
            config.webhooks.keep_delivered.as_millis() >= changing && config.webhooks.keep_dead.as_millis() >= changing,
            "webhooks.keep_delivered and webhooks.keep_dead must be at least core.allowed_lateness + 1h (alerts change until then)"
        );
        Ok(config)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use figment::Jail;

    fn load_in(jail: &mut Jail, file: Option<&str>, vars: &[(&str, &str)]) -> anyhow::Result<Config> {
        for (k, v) in vars {
            jail.set_env(k, v);
        }
        Config::load(file.map(Path::new))
    }

    #[test]
    fn defaults_match_the_specification() {
        let c = Config::default();
        assert_eq!(c.core.out_of_orderness.as_millis(), 10_000);
        assert_eq!(c.core.allowed_lateness.as_millis(), 6 * 3_600_000);
        assert_eq!(c.core.idle_timeout.as_millis(), 60_000);
        assert_eq!(c.core.max_clock_skew.as_millis(), 300_000);
        assert_eq!(c.city.time_zone, "Asia/Shanghai");
        assert_eq!(c.api.listen, "127.0.0.1:8080");
    }

    #[test]
    fn every_pipeline_runs_by_default_and_the_enabled_list_is_checked() {
        assert_eq!(Config::default().pipelines.enabled, crate::pipelines::NAMES);
        Jail::expect_with(|jail| {
            jail.create_file("p.toml", "[pipelines]\nenabled = [\"flow_counts\", \"top_n\"]\n")?;
            let c = load_in(jail, Some("p.toml"), &[]).unwrap();
            assert_eq!(c.pipelines.enabled, ["flow_counts", "top_n"]);
            let c = load_in(jail, Some("p.toml"), &[("PASSFLOW__PIPELINES__ENABLED", "[origin_counts]")]).unwrap();
            assert_eq!(c.pipelines.enabled, ["origin_counts"]);
            let err = load_in(jail, None, &[("PASSFLOW__PIPELINES__ENABLED", "[flow_count]")]).unwrap_err();
            assert!(format!("{err:#}").contains("pipelines.enabled: unknown pipeline `flow_count`"), "{err:#}");
            Ok(())
        });
    }

    #[test]
    fn the_file_overrides_defaults_and_the_environment_overrides_the_file() {
        Jail::expect_with(|jail| {
            jail.create_file("p.toml", "[api]\nlisten = \"127.0.0.1:9000\"\n[core]\nallowed_lateness = \"2h\"\n")?;
            let c = load_in(jail, Some("p.toml"), &[]).unwrap();
            assert_eq!(c.api.listen, "127.0.0.1:9000");
            assert_eq!(c.core.allowed_lateness.as_millis(), 7_200_000);
            let c = load_in(jail, Some("p.toml"), &[("PASSFLOW__API__LISTEN", "0.0.0.0:1")]).unwrap();
            assert_eq!(c.api.listen, "0.0.0.0:1");
            Ok(())
        });
    }

    #[test]
    fn unknown_keys_and_bad_values_are_rejected() {
        Jail::expect_with(|jail| {
            assert!(load_in(jail, None, &[("PASSFLOW__API__LISTN", "x")]).is_err());
            Ok(())
        });
        Jail::expect_with(|jail| {
            let err = load_in(jail, None, &[("PASSFLOW__CITY__TIME_ZONE", "Mars/Olympus")]).unwrap_err();
            assert!(err.to_string().contains("Mars/Olympus"), "{err}");
            Ok(())
        });
        Jail::expect_with(|jail| {
            assert!(load_in(jail, None, &[("PASSFLOW__CORE__ALLOWED_LATENESS", "soon")]).is_err());
            assert!(load_in(jail, None, &[("PASSFLOW__CORE__REPLAY_BATCH", "0")]).is_err());
            assert!(load_in(jail, Some("missing.toml"), &[]).is_err());
            Ok(())
        });
        Jail::expect_with(|jail| {
            let short = [("PASSFLOW__CORE__ALLOWED_LATENESS", "6h"), ("PASSFLOW__WEBHOOKS__KEEP_DELIVERED", "6h")];
            let err = load_in(jail, None, &short).unwrap_err();
            assert!(err.to_string().contains("keep_delivered"), "{err}");
            assert!(load_in(jail, None, &[("PASSFLOW__WEBHOOKS__KEEP_DELIVERED", "7h")]).is_ok());
            Ok(())
        });
    }

    #[test]
    fn the_example_file_is_the_defaults() {
        let example = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/passflow.example.toml");
        Jail::expect_with(|jail| {
            let c = load_in(jail, Some(example.to_str().unwrap()), &[]).unwrap();
            assert_eq!(c, Config::default());
            Ok(())
        });
    }
}
