//! Client errors, logged at most once per [`EVERY`] for each kind: while a broker is down,
//! librdkafka reports the same error every few tens of milliseconds, which would be tens of
//! thousands of log lines an hour.

use rustc_hash::FxHashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

/// How often one kind of error is logged, at most.
pub(crate) const EVERY: Duration = Duration::from_secs(10);
/// Kinds of error remembered at once (more are forgotten, and logged when they come again).
const KINDS: usize = 64;

/// When each kind of error was last logged, and how many have come since.
#[derive(Default)]
pub(crate) struct ErrorThrottle {
    kinds: Mutex<FxHashMap<String, (Instant, u64)>>,
}

impl ErrorThrottle {
    /// Whether an error of `kind` coming at `now` is logged: `Some` with how many of its kind
    /// came since it was last logged and were not, or `None` to keep quiet.
    pub(crate) fn admit(&self, kind: &str, now: Instant) -> Option<u64> {
        let mut kinds = self.kinds.lock().unwrap_or_else(|p| p.into_inner());
        if let Some((logged, unlogged)) = kinds.get_mut(kind) {
            if now.saturating_duration_since(*logged) < EVERY {
                *unlogged += 1;
                return None;
            }
            let since = std::mem::take(unlogged);
            *logged = now;
            return Some(since);
        }
        if kinds.len() >= KINDS {
            kinds.clear();
        }
        kinds.insert(kind.to_owned(), (now, 0));
        Some(0)
    }

    /// Logs a client error of librdkafka's (`what` says whose), unless one of its kind was
    /// logged less than [`EVERY`] ago.
    pub(crate) fn client_error(&self, what: &str, error: &rdkafka::error::KafkaError, reason: &str) {
        if let Some(unlogged) = self.admit(&error.to_string(), Instant::now()) {
            tracing::error!(error = %error, reason, unlogged, "{what}");
        }
    }
}

/// A client context that logs librdkafka's errors through an [`ErrorThrottle`], for clients
/// that need no other callback.
#[derive(Default)]
pub(crate) struct QuietErrors(ErrorThrottle);

impl rdkafka::ClientContext for QuietErrors {
    fn error(&self, error: rdkafka::error::KafkaError, reason: &str) {
        self.0.client_error("Kafka client error", &error, reason);
    }
}

impl rdkafka::consumer::ConsumerContext for QuietErrors {}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_error_is_logged_once_a_period_with_how_many_were_not_and_other_kinds_apart() {
        let throttle = ErrorThrottle::default();
        let t0 = Instant::now();
        let at = |ms: u64| t0 + Duration::from_millis(ms);
        assert_eq!(throttle.admit("down", at(0)), Some(0));
        for ms in (50..EVERY.as_millis() as u64).step_by(50) {
            assert_eq!(throttle.admit("down", at(ms)), None, "{ms} ms");
        }
        assert_eq!(throttle.admit("refused", at(100)), Some(0), "another kind is logged at once");
        let quiet = EVERY.as_millis() as u64 / 50 - 1;
        assert_eq!(throttle.admit("down", at(EVERY.as_millis() as u64)), Some(quiet));
        assert_eq!(throttle.admit("down", at(EVERY.as_millis() as u64 + 1)), None);
        assert_eq!(throttle.admit("refused", at(100 + EVERY.as_millis() as u64)), Some(0));
    }

    #[test]
    fn kinds_past_the_bound_are_forgotten_and_logged_again() {
        let throttle = ErrorThrottle::default();
        let now = Instant::now();
        for k in 0..KINDS {
            assert_eq!(throttle.admit(&k.to_string(), now), Some(0));
        }
        assert_eq!(throttle.admit("0", now), None);
        assert_eq!(throttle.admit("one too many", now), Some(0));
        assert_eq!(throttle.admit("0", now), Some(0), "forgotten with the others");
    }
}
