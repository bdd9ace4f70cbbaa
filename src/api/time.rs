//! Timestamps in status fields: RFC 3339 in UTC with whole seconds (`2026-12-01T23:32:19Z`),
//! the form Kubernetes itself writes. One time library for the whole product: the `jiff`
//! that `k8s-openapi` already uses for its own time types.

use std::time::Duration;

pub use k8s_openapi::jiff::Timestamp;
use k8s_openapi::jiff::{RoundMode, TimestampRound, Unit};

/// Now, as a status timestamp.
pub fn now_rfc3339() -> String {
    format_rfc3339(Timestamp::now())
}

/// A timestamp in the status form, truncated to whole seconds.
pub fn format_rfc3339(t: Timestamp) -> String {
    let whole = t
        .round(
            TimestampRound::new()
                .smallest(Unit::Second)
                .mode(RoundMode::Trunc),
        )
        .unwrap_or(t);
    whole.to_string()
}

/// Reads an RFC 3339 timestamp (any offset, with or without fractions); `None` when malformed.
pub fn parse_rfc3339(text: &str) -> Option<Timestamp> {
    text.parse::<Timestamp>().ok()
}

/// How long ago `then` was, as of `now`; zero when `then` is in the future.
pub fn elapsed(then: Timestamp, now: Timestamp) -> Duration {
    let span = now.duration_since(then);
    Duration::try_from(span).unwrap_or_default()
}

/// Seconds from `then` to `now`, negative when `then` is later (for logs and status figures).
pub fn seconds_between(then: Timestamp, now: Timestamp) -> f64 {
    now.duration_since(then).as_secs_f64()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_timestamps_have_whole_seconds_in_utc() {
        let t = parse_rfc3339("2026-12-01T23:32:19.987654+01:00").unwrap();
        assert_eq!(format_rfc3339(t), "2026-12-01T22:32:19Z");
        let now = now_rfc3339();
        assert!(now.ends_with('Z') && !now.contains('.'), "{now}");
        assert_eq!(parse_rfc3339(&now).map(format_rfc3339), Some(now));
    }

    #[test]
    fn malformed_timestamps_are_none_and_the_future_is_no_time_ago() {
        assert_eq!(parse_rfc3339("yesterday"), None);
        assert_eq!(parse_rfc3339(""), None);
        let a = parse_rfc3339("2026-01-01T00:00:00Z").unwrap();
        let b = parse_rfc3339("2026-01-01T00:01:30Z").unwrap();
        assert_eq!(elapsed(a, b), Duration::from_secs(90));
        assert_eq!(elapsed(b, a), Duration::ZERO);
        assert_eq!(seconds_between(b, a), -90.0);
    }
}
