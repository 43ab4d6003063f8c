//! Prometheus metrics, served on a listener of their own (`DS_METRICS__ADDR`, off by default),
//! never on the public one: Envoy routes only to the public port, and the metrics say how busy
//! and how full the server is.
//!
//! Two kinds of series:
//!
//! - **Recorded** where things happen (requests, appends, live readers, storage batches and
//!   syncs): process-wide atomics in [`ServerMetrics`], a relaxed `fetch_add` or two per event,
//!   with no lock, no label hashing and no allocation. Labels are indices into fixed arrays
//!   (operation, status code), resolved when the scrape encodes them. They are recorded whether
//!   or not a listener serves them: the cost is a few atomic adds per request (measured: no
//!   difference in append throughput, see the README's *Metrics* section).
//! - **Sampled** at scrape time from what the server already counts ([`Sources`]): open and
//!   refused connections, memory budget, streams, subscriptions.
//!
//! `prometheus-client` writes the exposition format; its own `Histogram` and `Family` take a lock
//! per observation or lookup, so the hot-path values here are plain atomics encoded through its
//! collector interface.

use std::sync::atomic::{AtomicI64, AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, OnceLock};
use std::time::{Duration, Instant};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use crate::http::edge::Admission;
use crate::storage::Storage;
use crate::stream::Streams;
use crate::subscription::Subscriptions;

/// A histogram of whole numbers (nanoseconds, operations) with fixed bucket bounds: an
/// observation is two relaxed atomic adds (its bucket and the sum); the count is the buckets'
/// total, added up when scraped.
pub struct Histogram {
    /// Upper bounds (inclusive), ascending; one more bucket holds everything above the last.
    bounds: &'static [u64],
    buckets: Box<[AtomicU64]>,
    sum: AtomicU64,
}

impl Histogram {
    pub fn new(bounds: &'static [u64]) -> Histogram {
        Histogram {
            bounds,
            buckets: (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect(),
            sum: AtomicU64::new(0),
        }
    }

    pub fn observe(&self, value: u64) {
        let i = self.bounds.partition_point(|&b| b < value);
        self.buckets[i].fetch_add(1, Ordering::Relaxed);
        self.sum.fetch_add(value, Ordering::Relaxed);
    }

    pub fn observe_duration(&self, took: Duration) {
        self.observe(u64::try_from(took.as_nanos()).unwrap_or(u64::MAX));
    }

    /// `(sum, count, [(upper bound, observations in this bucket)])`, values times `scale`.
    pub fn snapshot(&self, scale: f64) -> (f64, u64, Vec<(f64, u64)>) {
        let mut buckets = Vec::with_capacity(self.buckets.len());
        let mut count = 0;
        for (i, b) in self.buckets.iter().enumerate() {
            let n = b.load(Ordering::Relaxed);
            count += n;
            let bound = self
                .bounds
                .get(i)
                .map_or(f64::INFINITY, |&b| b as f64 * scale);
            buckets.push((bound, n));
        }
        let sum = self.sum.load(Ordering::Relaxed) as f64 * scale;
        (sum, count, buckets)
    }
}

const MS: u64 = 1_000_000;
/// Request latency, in nanoseconds: 100 µs to 30 s.
const LATENCY_NS: &[u64] = &[
    MS / 10,
    MS / 4,
    MS / 2,
    MS,
    5 * MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    500 * MS,
    1000 * MS,
    2500 * MS,
    5000 * MS,
    10_000 * MS,
    30_000 * MS,
];
/// A storage sync (`fdatasync`, a redb commit), in nanoseconds: 50 µs to 2.5 s.
const SYNC_NS: &[u64] = &[
    MS / 20,
    MS / 10,
    MS / 4,
    MS / 2,
    MS,
    5 * MS / 2,
    5 * MS,
    10 * MS,
    25 * MS,
    50 * MS,
    100 * MS,
    250 * MS,
    1000 * MS,
    2500 * MS,
];
/// Operations in one storage batch (group commit).
const BATCH_OPS: &[u64] = &[1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 1024, 4096];
const NANOS: f64 = 1e-9;

/// What a request did, as the `operation` label says it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Operation {
    Create,
    Append,
    /// A catch-up GET.
    Read,
    LongPoll,
    Sse,
    Head,
    Delete,
    /// A CORS preflight.
    Options,
    /// Any request under `__ds/subscriptions`.
    Subscription,
    /// A method no stream supports (405).
    Other,
}

impl Operation {
    const ALL: [Operation; 10] = [
        Operation::Create,
        Operation::Append,
        Operation::Read,
        Operation::LongPoll,
        Operation::Sse,
        Operation::Head,
        Operation::Delete,
        Operation::Options,
        Operation::Subscription,
        Operation::Other,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Operation::Create => "create",
            Operation::Append => "append",
            Operation::Read => "read",
            Operation::LongPoll => "long_poll",
            Operation::Sse => "sse",
            Operation::Head => "head",
            Operation::Delete => "delete",
            Operation::Options => "options",
            Operation::Subscription => "subscription",
            Operation::Other => "other",
        }
    }

    fn index(self) -> usize {
        self as usize
    }
}

/// Status codes 100 to 599, one counter each per operation.
const STATUSES: usize = 500;
const FIRST_STATUS: u16 = 100;

/// Which live readers a [`LiveReader`] counts.
#[derive(Clone, Copy, Debug)]
pub enum LiveMode {
    Sse,
    LongPoll,
}

/// The series recorded as things happen; one per process ([`get`]).
pub struct ServerMetrics {
    /// `[operation][status - 100]`.
    requests: Box<[AtomicU64]>,
    latency: Vec<Histogram>,
    appends: AtomicU64,
    appended_bytes: AtomicU64,
    sse_readers: AtomicI64,
    long_poll_readers: AtomicI64,
    storage_batch: Histogram,
    storage_sync: Histogram,
    /// The storage mode's name, the `mode` label of the storage series.
    storage_mode: OnceLock<&'static str>,
}

static METRICS: LazyLock<ServerMetrics> = LazyLock::new(|| ServerMetrics {
    requests: (0..Operation::ALL.len() * STATUSES)
        .map(|_| AtomicU64::new(0))
        .collect(),
    latency: Operation::ALL
        .iter()
        .map(|_| Histogram::new(LATENCY_NS))
        .collect(),
    appends: AtomicU64::new(0),
    appended_bytes: AtomicU64::new(0),
    sse_readers: AtomicI64::new(0),
    long_poll_readers: AtomicI64::new(0),
    storage_batch: Histogram::new(BATCH_OPS),
    storage_sync: Histogram::new(SYNC_NS),
    storage_mode: OnceLock::new(),
});

/// The process's recorded series.
pub fn get() -> &'static ServerMetrics {
    &METRICS
}

/// A request was answered with `status`, `started` when it arrived. Returns the time it read to measure the request (callers that need the time use it rather
/// than read the clock again).
pub fn request(op: Operation, status: u16, started: Instant) -> Instant {
    let m = get();
    let slot = usize::from(status.clamp(FIRST_STATUS, FIRST_STATUS + STATUSES as u16 - 1))
        - usize::from(FIRST_STATUS);
    m.requests[op.index() * STATUSES + slot].fetch_add(1, Ordering::Relaxed);
    let now = Instant::now();
    m.latency[op.index()].observe_duration(now.saturating_duration_since(started));
    now
}

/// An append stored `bytes` of request body.
pub fn appended(bytes: usize) {
    let m = get();
    m.appends.fetch_add(1, Ordering::Relaxed);
    m.appended_bytes.fetch_add(bytes as u64, Ordering::Relaxed);
}

/// Storage opened in `mode` (the label of the storage series).
pub fn storage_opened(mode: &'static str) {
    let _ = get().storage_mode.set(mode);
}

/// The storage writer wrote one batch (group commit) of `operations`.
pub fn storage_batch(operations: usize) {
    get().storage_batch.observe(operations as u64);
}

/// One storage sync (`fdatasync` of the log, a durable redb commit) took `took`.
pub fn storage_sync(took: Duration) {
    get().storage_sync.observe_duration(took);
}

/// Counts one live reader for as long as it is held.
pub struct LiveReader(&'static AtomicI64);

impl LiveReader {
    pub fn new(mode: LiveMode) -> LiveReader {
        let m = get();
        let gauge = match mode {
            LiveMode::Sse => &m.sse_readers,
            LiveMode::LongPoll => &m.long_poll_readers,
        };
        gauge.fetch_add(1, Ordering::Relaxed);
        LiveReader(gauge)
    }
}

impl Drop for LiveReader {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

/// What the scrape samples from the running server.
pub struct Sources {
    pub streams: Arc<Streams>,
    pub subscriptions: Option<Arc<Subscriptions>>,
    pub storage: Arc<dyn Storage>,
    pub admission: Arc<Admission>,
    /// `memory` mode's `DS_LIMITS__MAX_MEMORY_BYTES` (the streams' bytes count against it);
    /// `None` in the durable modes, whose storage reports its cache budget itself.
    pub memory_limit: Option<u64>,
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

fn gauge(enc: &mut DescriptorEncoder, name: &str, help: &str, value: i64) -> Encoded {
    enc.encode_descriptor(name, help, None, MetricType::Gauge)?
        .encode_gauge(&value)
}

fn histogram(
    enc: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    labels: &[(&str, &str)],
    h: &Histogram,
    scale: f64,
) -> Encoded {
    let (sum, count, buckets) = h.snapshot(scale);
    let mut metric = enc.encode_descriptor(name, help, None, MetricType::Histogram)?;
    metric
        .encode_family(&labels)?
        .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)
}

fn saturating_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

impl Collector for Sources {
    fn encode(&self, mut enc: DescriptorEncoder) -> Encoded {
        let m = get();
        // Requests, by operation and status (only the pairs seen).
        {
            let mut metric = enc.encode_descriptor(
                "ds_http_requests",
                "Requests answered, by operation and HTTP status.",
                None,
                MetricType::Counter,
            )?;
            for op in Operation::ALL {
                for slot in 0..STATUSES {
                    let n = m.requests[op.index() * STATUSES + slot].load(Ordering::Relaxed);
                    if n == 0 {
                        continue;
                    }
                    let status = (usize::from(FIRST_STATUS) + slot).to_string();
                    metric
                        .encode_family(&[("operation", op.label()), ("status", &status)])?
                        .encode_counter::<NoLabelSet, _, u64>(&n, None)?;
                }
            }
        }
        {
            let mut metric = enc.encode_descriptor(
                "ds_http_request_duration_seconds",
                "From a request's arrival to its response head (long-polls include their wait; SSE ends at the head).",
                None,
                MetricType::Histogram,
            )?;
            for op in Operation::ALL {
                let (sum, count, buckets) = m.latency[op.index()].snapshot(NANOS);
                if count == 0 {
                    continue;
                }
                metric
                    .encode_family(&[("operation", op.label())])?
                    .encode_histogram::<NoLabelSet>(sum, count, &buckets, None)?;
            }
        }
        counter(
            &mut enc,
            "ds_appends",
            "Appends that stored data (a duplicate producer append stores none).",
            m.appends.load(Ordering::Relaxed),
        )?;
        counter(
            &mut enc,
            "ds_appended_bytes",
            "Request body bytes of the appends counted in ds_appends_total.",
            m.appended_bytes.load(Ordering::Relaxed),
        )?;
        {
            let mut metric = enc.encode_descriptor(
                "ds_live_readers",
                "Live readers connected now: SSE responses being streamed and long-polls waiting.",
                None,
                MetricType::Gauge,
            )?;
            for (mode, value) in [("sse", &m.sse_readers), ("long_poll", &m.long_poll_readers)] {
                metric
                    .encode_family(&[("mode", mode)])?
                    .encode_gauge(&value.load(Ordering::Relaxed))?;
            }
        }
        gauge(
            &mut enc,
            "ds_connections_open",
            "Client connections open now (all listeners).",
            saturating_i64(self.admission.open() as u64),
        )?;
        gauge(
            &mut enc,
            "ds_connections_max",
            "The cap on open connections (DS_SERVER__MAX_CONNECTIONS, or sized from the open-file limit).",
            saturating_i64(self.admission.max() as u64),
        )?;
        counter(
            &mut enc,
            "ds_connections_refused",
            "Connections closed at once because the cap was reached.",
            self.admission.refused(),
        )?;
        let mode = m.storage_mode.get().copied().unwrap_or("memory");
        histogram(
            &mut enc,
            "ds_storage_batch_operations",
            "Operations written per storage batch (group commit); file modes and acid.",
            &[("mode", mode)],
            &m.storage_batch,
            1.0,
        )?;
        histogram(
            &mut enc,
            "ds_storage_sync_duration_seconds",
            "Duration of each storage sync: fdatasync of the log (file-durable per batch, file-fast in the background), of acid's commit log, or a durable redb commit.",
            &[("mode", mode)],
            &m.storage_sync,
            NANOS,
        )?;
        let (used, limit) = match self.memory_limit {
            Some(limit) => (self.streams.total_bytes(), limit),
            None => self.storage.memory_budget().unwrap_or((0, 0)),
        };
        gauge(
            &mut enc,
            "ds_memory_budget_used_bytes",
            "DS_LIMITS__MAX_MEMORY_BYTES in use: memory mode, bytes of all streams; durable modes, the live readers' record cache (each record's bytes plus 64 for its entry).",
            saturating_i64(used),
        )?;
        gauge(
            &mut enc,
            "ds_memory_budget_free_bytes",
            "DS_LIMITS__MAX_MEMORY_BYTES not in use (limit less used).",
            saturating_i64(limit.saturating_sub(used)),
        )?;
        gauge(
            &mut enc,
            "ds_streams",
            "Streams held (including the registry stream).",
            saturating_i64(self.streams.len() as u64),
        )?;
        if let Some(subs) = &self.subscriptions {
            gauge(
                &mut enc,
                "ds_subscriptions",
                "Subscriptions held (0 series when DS_SUBSCRIPTIONS__ENABLED=false).",
                saturating_i64(subs.len() as u64),
            )?;
        }
        let retention = self.streams.retention_counters();
        counter(
            &mut enc,
            "ds_retention_released_bytes",
            "Bytes released by retention (DS_RETENTION__MODE=acked) since start.",
            retention.released_bytes,
        )?;
        counter(
            &mut enc,
            "ds_appends_backpressured",
            "Appends answered 503 + Retry-After because unacknowledged data filled the memory budget (DS_RETENTION__MODE=acked).",
            retention.backpressured,
        )?;
        Ok(())
    }
}

/// The registry served at `/metrics`.
pub fn registry(sources: Sources) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(sources));
    registry
}

/// The exposition text of `registry`.
pub fn render(registry: &Registry) -> String {
    let mut out = String::new();
    // Writing into a String cannot fail.
    let _ = prometheus_client::encoding::prometheus_text::encode(&mut out, registry);
    out
}

/// Serves `GET /metrics` on `listener` until `stop` is cancelled; every other path is 404.
pub async fn serve(listener: TcpListener, registry: Registry, stop: CancellationToken) {
    use axum::http::{StatusCode, header};
    use axum::response::IntoResponse;
    let registry = Arc::new(registry);
    let app = axum::Router::new()
        .route(
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
        )
        .fallback(|| async {
            (StatusCode::NOT_FOUND, "only GET /metrics is served here\n").into_response()
        });
    let served = axum::serve(listener, app)
        .with_graceful_shutdown(async move { stop.cancelled().await })
        .await;
    if let Err(e) = served {
        tracing::error!(error = %e, "metrics listener failed");
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_histogram_puts_each_value_in_the_first_bucket_that_holds_it() {
        let h = Histogram::new(&[1, 10, 100]);
        for v in [0, 1, 2, 10, 11, 100, 101, 5000] {
            h.observe(v);
        }
        let (sum, count, buckets) = h.snapshot(1.0);
        assert_eq!(count, 8);
        assert_eq!(sum, 5225.0);
        assert_eq!(
            buckets,
            vec![(1.0, 2), (10.0, 2), (100.0, 2), (f64::INFINITY, 2)]
        );
        let (sum, _, buckets) = h.snapshot(0.5);
        assert_eq!(sum, 2612.5);
        assert_eq!(buckets[0].0, 0.5);
    }

    #[test]
    fn live_reader_guards_count_while_held() {
        let before = get().long_poll_readers.load(Ordering::Relaxed);
        let a = LiveReader::new(LiveMode::LongPoll);
        let b = LiveReader::new(LiveMode::LongPoll);
        // Other tests may hold readers too; ours are at least counted.
        assert!(get().long_poll_readers.load(Ordering::Relaxed) >= before + 2);
        drop(a);
        drop(b);
    }

    #[test]
    fn statuses_outside_100_to_599_are_clamped_not_lost() {
        let started = Instant::now();
        let idx = |status: usize| Operation::Other.index() * STATUSES + status - 100;
        let low = get().requests[idx(100)].load(Ordering::Relaxed);
        let high = get().requests[idx(599)].load(Ordering::Relaxed);
        request(Operation::Other, 42, started);
        request(Operation::Other, 999, started);
        assert!(get().requests[idx(100)].load(Ordering::Relaxed) > low);
        assert!(get().requests[idx(599)].load(Ordering::Relaxed) > high);
    }
}
