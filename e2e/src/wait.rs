//! Waiting on a condition with a deadline: the only way e2e tests wait for anything.

use std::future::Future;
use std::time::{Duration, Instant};

/// How often a condition is re-checked. Short, because every check is cheap (a connect, a GET).
const POLL_INTERVAL: Duration = Duration::from_millis(50);

/// Re-checks `check` until it returns `Ok(Some(value))` or `deadline` passes.
///
/// `Ok(None)` and `Err(_)` both mean "not yet"; the last error is reported on timeout so a failure
/// says what was wrong (connection refused, 503, ...), not just that time ran out.
pub async fn wait_until<T, F, Fut>(
    what: &str,
    deadline: Duration,
    mut check: F,
) -> Result<T, anyhow::Error>
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Result<Option<T>, anyhow::Error>>,
{
    let started = Instant::now();
    loop {
        let last_error = match check().await {
            Ok(Some(value)) => return Ok(value),
            Ok(None) => None,
            Err(error) => Some(error),
        };
        if started.elapsed() >= deadline {
            return Err(match last_error {
                Some(error) => {
                    error.context(format!("timed out after {deadline:?} waiting for {what}"))
                }
                None => anyhow::anyhow!("timed out after {deadline:?} waiting for {what}"),
            });
        }
        tokio::time::sleep(POLL_INTERVAL).await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU32, Ordering};

    #[tokio::test]
    async fn returns_the_value_once_the_condition_holds() {
        let calls = AtomicU32::new(0);
        let value = wait_until("third call", Duration::from_secs(5), || async {
            let n = calls.fetch_add(1, Ordering::SeqCst) + 1;
            Ok((n == 3).then_some(n))
        })
        .await
        .expect("condition holds on the third call");
        assert_eq!(value, 3);
    }

    #[tokio::test]
    async fn reports_the_last_error_on_timeout() {
        let error = wait_until::<(), _, _>("never", Duration::from_millis(120), || async {
            Err(anyhow::anyhow!("connection refused"))
        })
        .await
        .expect_err("times out");
        let text = format!("{error:#}");
        assert!(text.contains("waiting for never"), "{text}");
        assert!(text.contains("connection refused"), "{text}");
    }
}
