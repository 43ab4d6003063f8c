//! Prometheus metrics of the worker, served on a listener of their own (`DS_SYNC__METRICS_ADDR`,
//! or `DS_METRICS__ADDR`; off by default) at `GET /metrics`.
//!
//! Counts recorded as things happen (Postgres transactions, SSE reconnects, 401s, committed
//! bytes) are process-wide atomics here; the rest is sampled from [`Status`] when scraped.
//!
//! Lag per stream has a path label, and a worker following a prefix pattern follows every
//! stream ever created under it: one series per stream would grow without bound. So only the
//! [`LAG_TOP_N`] streams with the largest lag get a series of their own, and two aggregates
//! (`ds_sync_lag_max_seconds`, `ds_sync_streams_behind`) cover every stream.

use std::sync::Arc;
use std::sync::LazyLock;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio_util::sync::CancellationToken;

use crate::status::Status;

/// Streams whose lag gets a series of its own (the largest lags).
pub const LAG_TOP_N: usize = 10;

/// Postgres transaction time, in nanoseconds: 1 ms to 30 s.
const PG_NS: &[u64] = &[
    1_000_000,
    2_500_000,
    5_000_000,
    10_000_000,
    25_000_000,
    50_000_000,
    100_000_000,
    250_000_000,
    500_000_000,
    1_000_000_000,
    2_500_000_000,
    5_000_000_000,
    10_000_000_000,
    30_000_000_000,
];

/// A histogram with fixed bounds recorded with relaxed atomic adds.
struct Histogram {
    bounds: &'static [u64],
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    fn snapshot(&self, scale: f64) -> (f64, u64, Vec<(f64, u64)>) {
        let mut count = 0;
        let buckets = self
            .buckets
            .iter()
            .enumerate()
            .map(|(i, b)| {
                let n = b.load(Ordering::Relaxed);
                count += n;
                let bound = self
                    .bounds
                    .get(i)
                    .map_or(f64::INFINITY, |&b| b as f64 * scale);
                (bound, n)
            })
            .collect();
        (
            self.sum.load(Ordering::Relaxed) as f64 * scale,
            count,
            buckets,
        )
    }
}

struct Recorded {
    pg_transactions: Histogram,
    sse_reconnects: AtomicU64,
    auth_failures: AtomicU64,
    committed_bytes: AtomicU64,
}

static RECORDED: LazyLock<Recorded> = LazyLock::new(|| Recorded {
    pg_transactions: Histogram::new(PG_NS),
    sse_reconnects: AtomicU64::new(0),
    auth_failures: AtomicU64::new(0),
    committed_bytes: AtomicU64::new(0),
});

/// One attempt at committing a batch (successful or not) took `took`.
pub fn pg_transaction(took: Duration) {
    RECORDED
        .pg_transactions
        .observe(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
}

/// A follower opened an SSE session again after one ended.
pub fn sse_reconnect() {
    RECORDED.sse_reconnects.fetch_add(1, Ordering::Relaxed);
}

/// The server (or Envoy) answered 401.
pub fn auth_failure() {
    RECORDED.auth_failures.fetch_add(1, Ordering::Relaxed);
}

/// A batch committed `bytes` of row payload.
pub fn committed_bytes(bytes: u64) {
    RECORDED.committed_bytes.fetch_add(bytes, Ordering::Relaxed);
}

/// What the scrape samples.
pub struct Sources {
    pub status: Arc<Status>,
}

impl std::fmt::Debug for Sources {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Sources").finish_non_exhaustive()
    }
}

type Encoded = Result<(), std::fmt::Error>;

fn counter(enc: &mut DescriptorEncoder, name: &str, help: &str, value: u64) -> Encoded {
    enc.encode_descriptor(name, help, None, MetricType::Counter)?
        .encode_counter::<NoLabelSet, _, u64>(&value, None)
}

fn gauge<V: prometheus_client::encoding::EncodeGaugeValue>(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    value: V,
) -> Encoded {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> Encoded {
        let r = &*RECORDED;
        let totals = self.status.totals();
        counter(
            &mut enc,
            "ds_sync_rows_committed",
            "Rows committed to Postgres.",
            totals.rows,
        )?;
        counter(
            &mut enc,
            "ds_sync_committed_bytes",
            "Payload bytes of the rows committed (JSON text or bytes as read).",
            r.committed_bytes.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "ds_sync_pg_commits",
            "Postgres transactions committed (one per batch).",
            totals.commits,
        )?;
        counter(
            &mut enc,
            "ds_sync_pg_transaction_failures",
            "Postgres transactions that failed and were rolled back (the batch is retried).",
            totals.commit_failures,
        )?;
        {
            let (sum, count, buckets) = r.pg_transactions.snapshot(1e-9);
            enc.encode_descriptor(
                "ds_sync_pg_transaction_duration_seconds",
                "Duration of each attempt at committing a batch, successful or not.",
                None,
                MetricType::Histogram,
            )?
            .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
        }
        counter(
            &mut enc,
            "ds_sync_sse_reconnects",
            "SSE sessions opened again after one ended (server closed it, an error, a yield to a waiting stream).",
            r.sse_reconnects.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "ds_sync_auth_failures",
            "Requests the server or Envoy refused with 401.",
            r.auth_failures.load(Ordering::Relaxed),
        )?;
        let lags = self.status.lags();
        gauge(
            &mut enc,
            "ds_sync_streams_followed",
            "Streams followed now (the registry stream included).",
            lags.len() as i64,
        )?;
        gauge(
            &mut enc,
            "ds_sync_streams_behind",
            "Followed streams whose mirror is behind (lag above 0).",
            lags.iter().filter(|(_, lag)| !lag.is_zero()).count() as i64,
        )?;
        gauge(
            &mut enc,
            "ds_sync_lag_max_seconds",
            "The largest lag of any followed stream.",
            lags.first().map_or(0.0, |(_, lag)| lag.as_secs_f64()),
        )?;
        {
            let mut metric = enc.encode_descriptor(
                "ds_sync_stream_lag_seconds",
                "Per stream, for the 10 largest lags: how long since everything the server held was committed to Postgres (0: current).",
                None,
                MetricType::Gauge,
            )?;
            for (stream, lag) in lags.iter().take(LAG_TOP_N) {
                metric
                    .encode_family(&[("stream", &**stream)])?
                    .encode_gauge(&lag.as_secs_f64())?;
            }
        }
        Ok(())
    }
}

/// The registry served at `/metrics`.
pub fn registry(status: Arc<Status>) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(Sources { status }));
    registry
}

/// The exposition text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled.
pub async fn serve(
    listener: tokio::net::TcpListener,
    registry: Registry,
    stop: CancellationToken,
) -> std::io::Result<()> {
    use axum::http::header;
    let registry = Arc::new(registry);
    let app = axum::Router::new().route(
        "/metrics",
        axum::routing::get(move || {
            let registry = registry.clone();
            async move {
                (
                    [(
                        header::CONTENT_TYPE,
                        prometheus_client::encoding::prometheus_text::CONTENT_TYPE,
                    )],
                    render(&registry),
                )
            }
        }),
    );
    axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_hold_values_up_to_their_bound() {
        let h = Histogram::new(&[10, 20]);
        for v in [1, 10, 11, 25] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot(1.0);
        assert_eq!((sum, count), (47.0, 4));
        assert_eq!(buckets, vec![(10.0, 2), (20.0, 1), (f64::INFINITY, 1)]);
    }

    #[test]
    fn only_the_largest_lags_get_a_series() {
        let status = Arc::new(Status::default());
        for i in 0..(LAG_TOP_N + 5) {
            let stream: Arc<str> = format!("/s/{i}").into();
            status.set_incarnation(&stream, 1, &tokio_util::sync::CancellationToken::new());
        }
        let text = render(&registry(status));
        let per_stream = text
            .lines()
            .filter(|l| l.starts_with("ds_sync_stream_lag_seconds{"))
            .count();
        assert_eq!(per_stream, LAG_TOP_N, "{text}");
        assert!(text.contains(&format!("ds_sync_streams_followed {}", LAG_TOP_N + 5)));
        assert!(text.contains(&format!("ds_sync_streams_behind {}", LAG_TOP_N + 5)));
    }
}
