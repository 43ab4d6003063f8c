//! Stream cursors for CDN request collapsing (spec 10.1).
//!
//! A cursor is the number of 20-second intervals since 2024-10-09T00:00:00Z. When a client echoes
//! a cursor that is not behind the current interval, the answer jumps ahead by a random 1–3600 s
//! (rounded up to whole intervals, at least one) so cursors strictly advance and a cached response
//! can never loop a client.

use std::time::{Duration, SystemTime, UNIX_EPOCH};

/// 2024-10-09T00:00:00Z in Unix seconds.
pub const CURSOR_EPOCH_UNIX_SECS: u64 = 1_728_432_000;
/// Length of one cursor interval.
pub const CURSOR_INTERVAL: Duration = Duration::from_secs(20);

/// The interval number at `now`.
pub fn current_interval(now: SystemTime) -> u64 {
    let secs = now
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0);
    secs.saturating_sub(CURSOR_EPOCH_UNIX_SECS) / CURSOR_INTERVAL.as_secs()
}

/// The cursor to return, given the time, the client's echoed cursor (if any, and if it parsed)
/// and a jitter in seconds, which the caller draws uniformly from 1..=3600.
pub fn next_cursor(now: SystemTime, client_cursor: Option<u64>, jitter_secs: u64) -> u64 {
    let current = current_interval(now);
    match client_cursor {
        Some(client) if client >= current => {
            let step = jitter_secs.div_ceil(CURSOR_INTERVAL.as_secs()).max(1);
            client.saturating_add(step)
        }
        _ => current,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn at(secs_after_epoch: u64) -> SystemTime {
        UNIX_EPOCH + Duration::from_secs(CURSOR_EPOCH_UNIX_SECS + secs_after_epoch)
    }

    #[test]
    fn interval_counts_twenty_second_steps() {
        assert_eq!(current_interval(at(0)), 0);
        assert_eq!(current_interval(at(19)), 0);
        assert_eq!(current_interval(at(20)), 1);
        assert_eq!(current_interval(UNIX_EPOCH), 0);
    }

    #[test]
    fn stale_or_missing_client_cursor_gets_current_interval() {
        assert_eq!(next_cursor(at(2000), None, 1), 100);
        assert_eq!(next_cursor(at(2000), Some(99), 1), 100);
    }

    #[test]
    fn current_or_future_client_cursor_strictly_advances() {
        assert_eq!(next_cursor(at(2000), Some(100), 1), 101);
        assert_eq!(next_cursor(at(2000), Some(100), 20), 101);
        assert_eq!(next_cursor(at(2000), Some(100), 21), 102);
        assert_eq!(next_cursor(at(2000), Some(500), 3600), 680);
        assert_eq!(next_cursor(at(2000), Some(u64::MAX), 5), u64::MAX);
    }
}
