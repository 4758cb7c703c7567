//! How often a delivery is tried, and when: the retry budget (time, count, or both), capped
//! exponential backoff with full jitter, the target's `Retry-After`, and what an answer means
//! for the next attempt. Durable delivery and queue consumers share it.

use std::time::Duration;

/// Unix time in milliseconds, as the store keeps it.
type Millis = i64;

/// What to do after an attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RetryAction {
    /// Delivered.
    Done,
    /// A passing failure: try again later.
    Retry,
    /// A permanent failure: retrying cannot help.
    Drop,
}

/// Classifies an answered status: 2xx is done; 408, 429 and 5xx are worth retrying; any
/// other status is permanent. A called flow's reply status reads the same way.
pub fn classify_status(status: u16) -> RetryAction {
    match status {
        200..=299 => RetryAction::Done,
        408 | 429 | 500..=599 => RetryAction::Retry,
        _ => RetryAction::Drop,
    }
}

/// The longest a target's `Retry-After` counts for: longer asks are read as this.
const MAX_RETRY_AFTER: Duration = Duration::from_secs(3600);

/// How durable delivery retries: until the target takes the message, within a budget of
/// time (`for`), of attempts, or both (whichever ends first).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RetryPolicy {
    /// Attempts before a dead letter; `None`: as many as the time budget allows.
    pub attempts: Option<u32>,
    /// How long after it was queued a delivery is still tried; `None`: until the attempts
    /// run out.
    pub budget: Option<Duration>,
    /// Backoff before the second attempt.
    pub initial: Duration,
    /// Longest backoff.
    pub max: Duration,
}

/// The time budget of a flow that sets none: long enough for a partner to be down over a
/// weekend, with attempts every few minutes at most (the backoff cap) meanwhile.
pub const DEFAULT_RETRY_BUDGET: Duration = Duration::from_secs(72 * 3600);

impl Default for RetryPolicy {
    fn default() -> Self {
        Self {
            attempts: None,
            budget: Some(DEFAULT_RETRY_BUDGET),
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
        }
    }
}

impl RetryPolicy {
    /// The wait after failed attempt number `attempt` (1-based): a random time up to
    /// `initial · 2^(attempt-1)`, capped at `max` ("full jitter"), but never less than the
    /// target asked for with `Retry-After`.
    pub fn backoff(&self, attempt: u32, retry_after: Option<Duration>) -> Duration {
        let jittered = self.ceiling(attempt).mul_f64(fastrand::f64());
        match retry_after {
            Some(asked) => jittered.max(asked),
            None => jittered,
        }
    }

    /// The longest wait after failed attempt number `attempt`.
    fn ceiling(&self, attempt: u32) -> Duration {
        let exponent = attempt.saturating_sub(1).min(30);
        self.initial.saturating_mul(1 << exponent).min(self.max)
    }

    /// When to try again after failed attempt number `attempt`, made at `now`, of a
    /// delivery queued at `queued_at`; `None` when the budget is spent (a dead letter). A
    /// last attempt is made when the time budget ends, unless the target's `Retry-After`
    /// asks for a later one.
    pub fn next_attempt(
        &self,
        attempt: u32,
        queued_at: Millis,
        now: Millis,
        retry_after: Option<Duration>,
    ) -> Option<Millis> {
        if self.attempts.is_some_and(|most| attempt >= most) {
            return None;
        }
        let at = now.saturating_add(millis(self.backoff(attempt, retry_after)));
        let Some(budget) = self.budget else {
            return Some(at);
        };
        let deadline = queued_at.saturating_add(millis(budget));
        if now >= deadline {
            return None;
        }
        let asked = retry_after.map_or(now, |r| now.saturating_add(millis(r)));
        Some(at.min(deadline).max(asked))
    }

    /// The longest a delivery may be retried for: the time budget, or the sum of the longest
    /// backoffs of a count-only budget.
    pub fn span(&self) -> Duration {
        match (self.budget, self.attempts) {
            (Some(budget), _) => budget,
            (None, Some(attempts)) => (1..attempts).map(|a| self.ceiling(a)).sum(),
            (None, None) => Duration::MAX,
        }
    }
}

fn millis(duration: Duration) -> Millis {
    Millis::try_from(duration.as_millis()).unwrap_or(Millis::MAX)
}

/// Parses `Retry-After`: seconds, or an HTTP date; at most an hour, so every reader of a
/// target's ask (durable delivery, a sync flow's caller, a queue consumer) holds off as long.
pub fn parse_retry_after(value: &str) -> Option<Duration> {
    let value = value.trim();
    let asked = match value.parse::<u64>() {
        Ok(seconds) => Duration::from_secs(seconds),
        Err(_) => httpdate::parse_http_date(value)
            .ok()?
            .duration_since(std::time::SystemTime::now())
            .unwrap_or_default(),
    };
    Some(asked.min(MAX_RETRY_AFTER))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_time_budget_keeps_retrying_until_it_ends_then_gives_up() {
        let policy = RetryPolicy {
            attempts: None,
            budget: Some(Duration::from_secs(3600)),
            initial: Duration::from_millis(500),
            max: Duration::from_secs(300),
        };
        let queued = 1_000_000;
        let hour = 3_600_000;
        // Attempt 500, ten minutes in: still tried, at most five minutes later.
        let next = policy
            .next_attempt(500, queued, queued + 600_000, None)
            .unwrap();
        assert!(next <= queued + 600_000 + 300_000, "{next}");
        // Close to the end: the last attempt is at the end, not after it.
        let next = policy
            .next_attempt(9, queued, queued + hour - 10, None)
            .unwrap();
        assert!(next <= queued + hour, "{next}");
        // A Retry-After past the end is honoured with one more attempt.
        let asked =
            policy.next_attempt(9, queued, queued + hour - 10, Some(Duration::from_secs(60)));
        assert_eq!(asked, Some(queued + hour - 10 + 60_000));
        // At the end: a dead letter.
        assert_eq!(policy.next_attempt(10, queued, queued + hour, None), None);
        assert_eq!(policy.span(), Duration::from_secs(3600));
        // A count budget ends at its count, whatever the time.
        let counted = RetryPolicy {
            attempts: Some(3),
            budget: None,
            ..policy
        };
        assert!(
            counted
                .next_attempt(2, queued, queued + 10 * hour, None)
                .is_some()
        );
        assert_eq!(counted.next_attempt(3, queued, queued, None), None);
        assert_eq!(counted.span(), Duration::from_millis(500 + 1000));
    }

    #[test]
    fn backoff_is_capped_exponential_with_full_jitter() {
        let policy = RetryPolicy {
            attempts: Some(10),
            budget: None,
            initial: Duration::from_millis(100),
            max: Duration::from_secs(1),
        };
        for _ in 0..200 {
            assert!(policy.backoff(1, None) <= Duration::from_millis(100));
            assert!(policy.backoff(3, None) <= Duration::from_millis(400));
            assert!(policy.backoff(30, None) <= Duration::from_secs(1));
        }
        let spread: std::collections::HashSet<_> =
            (0..50).map(|_| policy.backoff(5, None)).collect();
        assert!(spread.len() > 10, "jitter spreads retries");
        assert_eq!(
            policy.backoff(1, Some(Duration::from_secs(7))),
            Duration::from_secs(7)
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_dates() {
        assert_eq!(parse_retry_after(" 120 "), Some(Duration::from_secs(120)));
        let later = std::time::SystemTime::now() + Duration::from_secs(60);
        let parsed = parse_retry_after(&httpdate::fmt_http_date(later)).unwrap();
        assert!(
            parsed > Duration::from_secs(55) && parsed <= Duration::from_secs(60),
            "{parsed:?}"
        );
        assert_eq!(parse_retry_after("soon"), None);
        assert_eq!(parse_retry_after("86400"), Some(MAX_RETRY_AFTER));
    }
}
