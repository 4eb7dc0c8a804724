//! Alert webhooks: every alert is POSTed as JSON to each configured endpoint whose kinds it
//! matches, signed with HMAC-SHA256, retried with exponential back-off while the receiver
//! fails or is down, and dead-lettered once it has failed for longer than the give-up time.
//!
//! Deliveries live in a durable queue (an SQLite file) before the checkpoint that covers their
//! alerts completes, so an alert survives a restart; a replay enqueues the same (endpoint,
//! alert id, revision) once. Cloned-plate notifications are throttled to one per vehicle per
//! hour: the pairs found in that hour join the pending notification, and a change to a pair it
//! lists (a retraction) is sent as its next revision. A delivery is marked as being sent while
//! its request is out, so a change made meanwhile is never folded into a body already sent.
//!
//! Each request carries `X-Passflow-Alert-Id` (the stable alert id), `X-Passflow-Alert-Revision`,
//! `Idempotency-Key` (`<alert id>/<revision>`), `X-Passflow-Timestamp` (ms) and
//! `X-Passflow-Signature: sha256=<hex HMAC-SHA256(secret, "<timestamp>.<body>")>`.

use crate::config::HumanDuration;
use crate::model::stable_id;
use crate::results::AlertRow;
use hmac::{Hmac, Mac};
use serde::{Deserialize, Serialize};
use sha2::Sha256;
use sqlx::sqlite::{SqliteConnectOptions, SqliteJournalMode, SqlitePoolOptions};
use sqlx::SqlitePool;
use std::path::PathBuf;
use std::str::FromStr;
use std::sync::Arc;
use std::time::Duration;

pub const SCHEMA_VERSION: u32 = 1;
const BASE_BACKOFF_MS: i64 = 500;
const MAX_BACKOFF_MS: i64 = 5 * 60_000;
const HOUR_MS: i64 = 3_600_000;
/// Deliveries to one endpoint in one round at most.
const ROUND: usize = 200;
/// How often the queue is pruned of deliveries kept long enough.
const PRUNE_EVERY_MS: i64 = 10 * 60_000;

/// `[webhooks]` in the configuration.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub struct WebhookConfig {
    /// The durable delivery queue.
    pub queue: PathBuf,
    /// A delivery failing for longer than this (since its first failure) is dead-lettered.
    pub give_up_after: HumanDuration,
    /// Delivered deliveries (and revisions a later one replaced) are deleted from the queue
    /// this long after they were sent. A replay of input older than that sends its alerts
    /// again (under the same idempotency keys).
    pub keep_delivered: HumanDuration,
    /// Dead-lettered deliveries are deleted this long after they were given up, unless sent
    /// again before (`POST /api/v1/admin/webhooks/redrive`).
    pub keep_dead: HumanDuration,
    pub endpoints: Vec<EndpointConfig>,
}

impl Default for WebhookConfig {
    fn default() -> Self {
        WebhookConfig {
            queue: "data/webhooks.db".into(),
            give_up_after: HumanDuration::from_secs(24 * 3600),
            keep_delivered: HumanDuration::from_secs(7 * 24 * 3600),
            keep_dead: HumanDuration::from_secs(30 * 24 * 3600),
            endpoints: Vec::new(),
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct EndpointConfig {
    /// A short name: the queue's key for this endpoint.
    pub name: String,
    pub url: String,
    /// The HMAC-SHA256 key of the signature header.
    pub secret: String,
    /// Alert kinds sent here; empty: every kind.
    #[serde(default)]
    pub kinds: Vec<String>,
    /// Deliveries per minute at most (0: no limit); the rest wait their turn.
    #[serde(default)]
    pub per_minute: u32,
}

/// The signature header value of a body sent at `timestamp_ms`.
pub fn signature(secret: &str, timestamp_ms: i64, body: &str) -> String {
    let mut mac = Hmac::<Sha256>::new_from_slice(secret.as_bytes()).expect("HMAC takes keys of any length");
    mac.update(timestamp_ms.to_string().as_bytes());
    mac.update(b".");
    mac.update(body.as_bytes());
    let bytes = mac.finalize().into_bytes();
    let hex: String = bytes.iter().map(|b| format!("{b:02x}")).collect();
    format!("sha256={hex}")
}

/// The JSON body of an alert.
pub fn alert_body(a: &AlertRow) -> serde_json::Value {
    serde_json::json!({
        "schema_version": SCHEMA_VERSION,
        "alert_id": a.alert_id,
        "kind": a.kind,
        "ts": a.ts,
        "plate": a.plate.as_deref(),
        "plate_color": a.plate_color,
        "checkpoint_id": a.checkpoint_id.as_deref(),
        "segment_id": a.segment_id.as_deref(),
        "severity": a.severity,
        "status": a.status,
        "revision": a.revision,
        "details": serde_json::from_str::<serde_json::Value>(&a.details).unwrap_or(serde_json::Value::Null),
    })
}

const SCHEMA: &str = "
CREATE TABLE IF NOT EXISTS deliveries (
    endpoint TEXT NOT NULL,
    alert_id TEXT NOT NULL,
    revision INTEGER NOT NULL,
    body TEXT NOT NULL,
    created_at INTEGER NOT NULL,
    attempts INTEGER NOT NULL DEFAULT 0,
    next_at INTEGER NOT NULL,
    state TEXT NOT NULL DEFAULT 'pending',
    last_error TEXT,
    failing_since INTEGER,
    PRIMARY KEY (endpoint, alert_id, revision)
);
CREATE INDEX IF NOT EXISTS deliveries_due ON deliveries (state, next_at);
";

/// The durable delivery queue and its endpoints.
pub struct Webhooks {
    pool: SqlitePool,
    config: WebhookConfig,
    client: reqwest::Client,
    pub delivered: prometheus::IntCounter,
    pub failed: prometheus::IntCounter,
    pub dead: prometheus::IntCounter,
}

/// What is in the queue, by state.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct QueueCounts {
    pub pending: i64,
    pub delivered: i64,
    pub dead: i64,
}

impl Webhooks {
    pub async fn open(config: &WebhookConfig, metrics: &crate::metrics::Metrics) -> anyhow::Result<Arc<Webhooks>> {
        if let Some(dir) = config.queue.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir)?;
        }
        let options = SqliteConnectOptions::from_str(&format!("sqlite://{}", config.queue.display()))?
            .create_if_missing(true)
            .journal_mode(SqliteJournalMode::Wal);
        let pool = SqlitePoolOptions::new().max_connections(2).connect_with(options).await?;
        sqlx::raw_sql(SCHEMA).execute(&pool).await?;
        // A queue made before deliveries recorded when they began to fail.
        let (has_failing_since,): (i64,) =
            sqlx::query_as("SELECT COUNT(*) FROM pragma_table_info('deliveries') WHERE name = 'failing_since'")
                .fetch_one(&pool)
                .await?;
        if has_failing_since == 0 {
            sqlx::query("ALTER TABLE deliveries ADD COLUMN failing_since INTEGER").execute(&pool).await?;
        }
        // Sends a stop or crash interrupted are made again.
        sqlx::query("UPDATE deliveries SET state = 'pending' WHERE state = 'sending'").execute(&pool).await?;
        Webhooks::dead_letter_unconfigured(&pool, config, chrono::Utc::now().timestamp_millis()).await?;
        let client = reqwest::Client::builder().timeout(Duration::from_secs(10)).build()?;
        Ok(Arc::new(Webhooks {
            pool,
            config: config.clone(),
            client,
            delivered: metrics.webhook_deliveries.with_label_values(&["delivered"]),
            failed: metrics.webhook_deliveries.with_label_values(&["failed"]),
            dead: metrics.webhook_deliveries.with_label_values(&["dead"]),
        }))
    }

    /// Queues the alerts for every endpoint that takes their kind. Cloned-plate alerts join
    /// their vehicle's notification of the hour.
    pub async fn enqueue(&self, alerts: &[AlertRow], now_ms: i64) -> anyhow::Result<()> {
        if self.config.endpoints.is_empty() || alerts.is_empty() {
            return Ok(());
        }
        let mut tx = self.pool.begin().await?;
        for endpoint in &self.config.endpoints {
            for a in alerts.iter().filter(|a| endpoint.kinds.is_empty() || endpoint.kinds.iter().any(|k| k == a.kind)) {
                if a.kind == crate::pipelines::CLONED_PLATE {
                    self.join_notice(&mut tx, &endpoint.name, a, now_ms).await?;
                    continue;
                }
                self.insert_delivery(
                    &mut tx,
                    &endpoint.name,
                    &a.alert_id,
                    i64::from(a.revision),
                    &alert_body(a),
                    now_ms,
                )
                .await?;
            }
        }
        tx.commit().await?;
        Ok(())
    }

    /// One notification per vehicle and hour (of the alert's time) lists its pairs: a pair
    /// joins the notification while it waits to be sent; once it has gone out, later pairs of
    /// the hour stay in the alerts table only. A pair it lists that changes (retracted, or
    /// raised again) changes the notification: where it waits, when it has never been tried,
    /// or else as its next revision (which replaces one waiting for a retry).
    async fn join_notice(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        endpoint: &str,
        a: &AlertRow,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let hour = a.ts - a.ts.rem_euclid(HOUR_MS);
        let vehicle = format!("{}/{}", a.plate.as_deref().unwrap_or(""), a.plate_color.unwrap_or(0));
        let id = stable_id("cloned_plate_notice", &[vehicle.as_bytes(), hour.to_string().as_bytes()]);
        let latest: Option<(i64, String, String, i64)> = sqlx::query_as(
            "SELECT revision, body, state, attempts FROM deliveries WHERE endpoint = ? AND alert_id = ? \
             ORDER BY revision DESC LIMIT 1",
        )
        .bind(endpoint)
        .bind(&id)
        .fetch_optional(&mut **tx)
        .await?;
        let pair = alert_body(a);
        let Some((revision, body, state, attempts)) = latest else {
            let body = serde_json::json!({
                "schema_version": SCHEMA_VERSION,
                "alert_id": id,
                "kind": "cloned_plate",
                "ts": a.ts,
                "plate": a.plate.as_deref(),
                "plate_color": a.plate_color,
                "severity": a.severity,
                "status": a.status,
                "revision": 0,
                "hour_start": hour,
                "pairs": [pair],
            });
            return self.insert_delivery(tx, endpoint, &id, 0, &body, now_ms).await;
        };
        let mut body: serde_json::Value = serde_json::from_str(&body)?;
        let pairs = body["pairs"].as_array_mut().ok_or_else(|| anyhow::anyhow!("a notice without pairs"))?;
        match pairs.iter().position(|p| p["alert_id"] == pair["alert_id"]) {
            // Known already (a replay).
            Some(i) if pairs[i]["revision"].as_i64() >= pair["revision"].as_i64() => return Ok(()),
            Some(i) => pairs[i] = pair,
            None if state == "delivered" || state == "dead" => return Ok(()),
            None => pairs.push(pair),
        }
        let active = pairs.iter().any(|p| p["status"] == "active");
        body["status"] = serde_json::json!(if active { "active" } else { "retracted" });
        if state == "pending" && attempts == 0 {
            sqlx::query("UPDATE deliveries SET body = ? WHERE endpoint = ? AND alert_id = ? AND revision = ?")
                .bind(body.to_string())
                .bind(endpoint)
                .bind(&id)
                .bind(revision)
                .execute(&mut **tx)
                .await?;
            return Ok(());
        }
        // Tried, sent or being sent: the receiver may hold this revision already.
        if state == "pending" {
            sqlx::query(
                "UPDATE deliveries SET state = 'superseded' WHERE endpoint = ? AND alert_id = ? AND revision = ?",
            )
            .bind(endpoint)
            .bind(&id)
            .bind(revision)
            .execute(&mut **tx)
            .await?;
        }
        body["revision"] = serde_json::json!(revision + 1);
        self.insert_delivery(tx, endpoint, &id, revision + 1, &body, now_ms).await
    }

    async fn insert_delivery(
        &self,
        tx: &mut sqlx::Transaction<'_, sqlx::Sqlite>,
        endpoint: &str,
        alert_id: &str,
        revision: i64,
        body: &serde_json::Value,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        sqlx::query(
            "INSERT OR IGNORE INTO deliveries (endpoint, alert_id, revision, body, created_at, next_at) \
             VALUES (?, ?, ?, ?, ?, ?)",
        )
        .bind(endpoint)
        .bind(alert_id)
        .bind(revision)
        .bind(body.to_string())
        .bind(now_ms)
        .bind(now_ms)
        .execute(&mut **tx)
        .await?;
        Ok(())
    }

    /// Delivers what is due until `stop` turns true; sleeps while nothing is. An error of the
    /// queue itself (its disk, say) is logged and the round tried again a little later: the
    /// service goes on, and the deliveries wait in the queue.
    pub async fn run(self: Arc<Self>, mut stop: tokio::sync::watch::Receiver<bool>) -> anyhow::Result<()> {
        let mut sent: Vec<Vec<i64>> = vec![Vec::new(); self.config.endpoints.len()];
        let mut failing = Duration::ZERO;
        let mut pruned_at = None;
        while !*stop.borrow() {
            let now_ms = chrono::Utc::now().timestamp_millis();
            let round = async {
                if pruned_at.is_none_or(|t| now_ms - t >= PRUNE_EVERY_MS) {
                    self.prune(now_ms).await?;
                    pruned_at = Some(now_ms);
                }
                self.deliver_due(&mut sent, now_ms).await
            };
            let pause = match round.await {
                Ok(true) => {
                    failing = Duration::ZERO;
                    continue;
                }
                Ok(false) => {
                    failing = Duration::ZERO;
                    Duration::from_millis(200)
                }
                Err(e) => {
                    failing = (failing * 2).clamp(Duration::from_secs(1), Duration::from_secs(60));
                    tracing::error!(error = %format!("{e:#}"), retry_in_s = failing.as_secs(), "the webhook queue failed");
                    failing
                }
            };
            tokio::select! {
                _ = tokio::time::sleep(pause) => {}
                _ = stop.changed() => {}
            }
        }
        Ok(())
    }

    /// One round over the due deliveries; returns whether any was attempted. The endpoints are
    /// served at the same time, each its due deliveries in turn (as many as its rate allows),
    /// so one that is slow, down or rate-limited holds up no other.
    pub async fn deliver_due(&self, sent: &mut [Vec<i64>], now_ms: i64) -> anyhow::Result<bool> {
        let rounds = self
            .config
            .endpoints
            .iter()
            .zip(sent.iter_mut())
            .map(|(endpoint, window)| self.deliver_to(endpoint, window, now_ms));
        let mut attempted = false;
        for round in futures::future::join_all(rounds).await {
            attempted |= round?;
        }
        Ok(attempted)
    }

    /// Deliveries waiting for an endpoint no longer configured are dead-lettered (on opening:
    /// the endpoints are those of the configuration).
    async fn dead_letter_unconfigured(pool: &SqlitePool, config: &WebhookConfig, now_ms: i64) -> anyhow::Result<()> {
        let waiting: Vec<(String,)> =
            sqlx::query_as("SELECT DISTINCT endpoint FROM deliveries WHERE state = 'pending'").fetch_all(pool).await?;
        for (name,) in waiting {
            if config.endpoints.iter().all(|e| e.name != name) {
                sqlx::query(
                    "UPDATE deliveries SET state = 'dead', last_error = 'endpoint no longer configured', next_at = ? \
                     WHERE endpoint = ? AND state = 'pending'",
                )
                .bind(now_ms)
                .bind(&name)
                .execute(pool)
                .await?;
            }
        }
        Ok(())
    }

    /// One round of `endpoint`'s due deliveries, within its rate (`window`: its sends of the
    /// last minute).
    async fn deliver_to(&self, endpoint: &EndpointConfig, window: &mut Vec<i64>, now_ms: i64) -> anyhow::Result<bool> {
        window.retain(|t| *t > now_ms - 60_000);
        let room = match endpoint.per_minute {
            0 => ROUND,
            n => (n as usize).saturating_sub(window.len()).min(ROUND),
        };
        if room == 0 {
            return Ok(false);
        }
        let due: Vec<(String, i64, String, Option<i64>, i64)> = sqlx::query_as(
            "SELECT alert_id, revision, body, failing_since, attempts FROM deliveries \
             WHERE endpoint = ? AND state = 'pending' AND next_at <= ? ORDER BY next_at LIMIT ?",
        )
        .bind(&endpoint.name)
        .bind(now_ms)
        .bind(room as i64)
        .fetch_all(&self.pool)
        .await?;
        let name = endpoint.name.as_str();
        let mut attempted = false;
        for (alert_id, revision, body, failing_since, attempts) in due {
            // Marked as being sent, unless a notification changed since it was read (it is sent
            // as it is now in a later round); a change from now on becomes its next revision.
            let claimed = sqlx::query(
                "UPDATE deliveries SET state = 'sending' \
                 WHERE endpoint = ? AND alert_id = ? AND revision = ? AND state = 'pending' AND body = ?",
            )
            .bind(name)
            .bind(&alert_id)
            .bind(revision)
            .bind(&body)
            .execute(&self.pool)
            .await?;
            if claimed.rows_affected() == 0 {
                continue;
            }
            window.push(now_ms);
            attempted = true;
            let (state, error, next_at, failing) = match self.post(endpoint, &alert_id, revision, &body, now_ms).await {
                Ok(()) => {
                    self.delivered.inc();
                    ("delivered", None, now_ms, None)
                }
                Err(e) => {
                    self.failed.inc();
                    // Failing for the give-up time, counted from the first failure (not from when
                    // it was queued: the service may have been down meanwhile).
                    let since = failing_since.unwrap_or(now_ms);
                    let error = format!("{e:#}");
                    if since + self.config.give_up_after.as_millis() <= now_ms {
                        self.dead.inc();
                        tracing::error!(endpoint = %name, alert_id, error, "webhook delivery given up: dead-lettered");
                        ("dead", Some(error), now_ms, Some(since))
                    } else {
                        let backoff = (BASE_BACKOFF_MS << attempts.clamp(0, 20)).min(MAX_BACKOFF_MS);
                        tracing::warn!(endpoint = %name, alert_id, error, retry_in_ms = backoff, "webhook delivery failed");
                        ("pending", Some(error), now_ms + backoff, Some(since))
                    }
                }
            };
            sqlx::query(
                "UPDATE deliveries SET state = ?, last_error = ?, attempts = ?, next_at = ?, failing_since = ? \
                 WHERE endpoint = ? AND alert_id = ? AND revision = ?",
            )
            .bind(state)
            .bind(error)
            .bind(attempts + 1)
            .bind(next_at)
            .bind(failing)
            .bind(name)
            .bind(&alert_id)
            .bind(revision)
            .execute(&self.pool)
            .await?;
        }
        Ok(attempted)
    }

    async fn post(
        &self,
        endpoint: &EndpointConfig,
        alert_id: &str,
        revision: i64,
        body: &str,
        now_ms: i64,
    ) -> anyhow::Result<()> {
        let response = self
            .client
            .post(&endpoint.url)
            .header("Content-Type", "application/json")
            .header("X-Passflow-Alert-Id", alert_id)
            .header("X-Passflow-Alert-Revision", revision.to_string())
            .header("Idempotency-Key", format!("{alert_id}/{revision}"))
            .header("X-Passflow-Timestamp", now_ms.to_string())
            .header("X-Passflow-Signature", signature(&endpoint.secret, now_ms, body))
            .body(body.to_owned())
            .send()
            .await?;
        anyhow::ensure!(response.status().is_success(), "the receiver answered {}", response.status());
        Ok(())
    }

    /// Deletes the deliveries kept long enough (see [`WebhookConfig::keep_delivered`] and
    /// [`WebhookConfig::keep_dead`]); returns how many. A delivery's `next_at` is when it ended.
    pub async fn prune(&self, now_ms: i64) -> anyhow::Result<u64> {
        let mut deleted = 0;
        for (states, kept) in
            [("'delivered', 'superseded'", &self.config.keep_delivered), ("'dead'", &self.config.keep_dead)]
        {
            deleted += sqlx::query(&format!("DELETE FROM deliveries WHERE state IN ({states}) AND next_at < ?"))
                .bind(now_ms.saturating_sub(kept.as_millis()))
                .execute(&self.pool)
                .await?
                .rows_affected();
        }
        if deleted > 0 {
            tracing::info!(deleted, "webhook queue pruned of deliveries kept long enough");
        }
        Ok(deleted)
    }

    /// Sends dead-lettered deliveries again, from now on, their give-up time counted afresh:
    /// those of `endpoint`, or of every configured endpoint. Only an alert's latest revision
    /// is sent again (an earlier dead one is superseded by it), and a redriven delivery keeps
    /// its attempts: it was tried, so a change to it becomes its next revision. Returns how
    /// many are sent again.
    pub async fn redrive(&self, endpoint: Option<&str>, now_ms: i64) -> anyhow::Result<u64> {
        let mut tx = self.pool.begin().await?;
        let mut redriven = 0;
        for e in self.config.endpoints.iter().filter(|e| endpoint.is_none_or(|name| e.name == name)) {
            sqlx::query(
                "UPDATE deliveries SET state = 'superseded' WHERE endpoint = ? AND state = 'dead' AND EXISTS \
                 (SELECT 1 FROM deliveries later WHERE later.endpoint = deliveries.endpoint \
                  AND later.alert_id = deliveries.alert_id AND later.revision > deliveries.revision)",
            )
            .bind(&e.name)
            .execute(&mut *tx)
            .await?;
            redriven += sqlx::query(
                "UPDATE deliveries SET state = 'pending', next_at = ?, failing_since = NULL \
                 WHERE endpoint = ? AND state = 'dead'",
            )
            .bind(now_ms)
            .bind(&e.name)
            .execute(&mut *tx)
            .await?
            .rows_affected();
        }
        tx.commit().await?;
        Ok(redriven)
    }

    /// Whether `name` is a configured endpoint.
    pub fn has_endpoint(&self, name: &str) -> bool {
        self.config.endpoints.iter().any(|e| e.name == name)
    }

    /// Deliveries by state.
    pub async fn counts(&self) -> anyhow::Result<QueueCounts> {
        let rows: Vec<(String, i64)> =
            sqlx::query_as("SELECT state, COUNT(*) FROM deliveries GROUP BY state").fetch_all(&self.pool).await?;
        let get = |s: &str| rows.iter().find(|(k, _)| k == s).map_or(0, |(_, n)| *n);
        Ok(QueueCounts { pending: get("pending") + get("sending"), delivered: get("delivered"), dead: get("dead") })
    }
}
