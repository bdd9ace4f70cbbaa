//! Per-object retry delays: after each consecutive failure of an object the delay doubles,
//! from one second up to five minutes; a success (or a wait for a change) forgets them.

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::Duration;

/// First retry delay after a retriable failure.
pub const FIRST_RETRY: Duration = Duration::from_secs(1);
/// Longest retry delay.
pub const MAX_RETRY: Duration = Duration::from_secs(300);

/// Consecutive failures per object, for capped exponential retry delays.
#[derive(Default)]
pub struct Backoff {
    failures: Mutex<HashMap<String, u32>>,
}

impl Backoff {
    /// Records one more failure of `key` and returns the delay before its next try.
    pub fn next_delay(&self, key: &str) -> Duration {
        let mut failures = self.failures.lock().unwrap_or_else(|p| p.into_inner());
        let n = failures.entry(key.to_string()).or_insert(0);
        *n = n.saturating_add(1);
        let doublings = (*n - 1).min(16);
        (FIRST_RETRY * 2u32.pow(doublings)).min(MAX_RETRY)
    }

    /// Forgets the failures of `key` (it reconciled, or waits for a change).
    pub fn reset(&self, key: &str) {
        self.failures
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(key);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn retry_delays_double_from_one_second_to_five_minutes_per_object() {
        let b = Backoff::default();
        let delays: Vec<u64> = (0..12).map(|_| b.next_delay("a").as_secs()).collect();
        assert_eq!(delays, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300, 300, 300]);
        assert_eq!(b.next_delay("b"), FIRST_RETRY, "per object");
        b.reset("a");
        assert_eq!(b.next_delay("a"), FIRST_RETRY, "a success starts over");
        for _ in 0..100 {
            b.next_delay("c");
        }
        assert_eq!(
            b.next_delay("c"),
            MAX_RETRY,
            "no overflow after many failures"
        );
    }
}
