//! `ds-server`: a Durable Streams protocol server.
//!
//! Layers: `config` (figment), `http` (the request handler, HTTP/1.1 connections), `stream` (protocol rules),
//! `storage` (backends behind one trait), `live` (what live readers wait on). [`App::build`]
//! binds (port 0 allowed) and [`App::run`] serves until the caller's shutdown future resolves,
//! so tests run the real server in-process.

pub mod config;
pub mod http;
pub mod live;
pub mod metrics;
pub mod storage;
pub mod stream;
pub mod subscription;
mod tls;

use std::future::Future;
use std::net::SocketAddr;
use std::sync::Arc;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

use config::{Config, StorageMode};
use storage::Storage;
use stream::{Limits, Streams};
use subscription::Subscriptions;

/// A bound, ready-to-run server.
pub struct App {
    listener: TcpListener,
    state: http::AppState,
    streams: Arc<Streams>,
    /// `None` when `DS_SUBSCRIPTIONS__ENABLED=false`.
    subscriptions: Option<Arc<Subscriptions>>,
    config: Config,
    /// Cancelled when shutdown begins; long-lived reads and the sweeper watch it.
    shutdown: CancellationToken,
    /// Set when the server terminates TLS itself.
    tls: Option<tokio_rustls::TlsAcceptor>,
    /// The Prometheus listener (`DS_METRICS__ADDR`), if configured.
    metrics_listener: Option<TcpListener>,
    /// For the metrics' memory budget.
    storage: Arc<dyn Storage>,
}

impl App {
    /// Opens storage and binds the listener.
    pub async fn build(config: Config) -> anyhow::Result<App> {
        let tls = match (&config.tls.cert_path, &config.tls.key_path) {
            (Some(cert), Some(key)) => Some(tls::acceptor(cert, key)?),
            _ => None,
        };
        let storage = open_storage(&config)?;
        metrics::storage_opened(storage.name());
        let limits = Limits {
            max_stream_bytes: config.limits.max_stream_bytes,
            // In durable modes data lives on disk; the memory budget sizes the read cache.
            max_total_bytes: match config.storage.mode {
                StorageMode::Memory => config.limits.max_memory_bytes,
                _ => u64::MAX,
            },
            max_read_bytes: usize::try_from(config.limits.max_read_bytes).unwrap_or(usize::MAX),
            max_streams: usize::try_from(config.limits.max_streams).unwrap_or(usize::MAX),
            max_producers: config.limits.max_producers,
            producer_idle_ms: u64::try_from(config.limits.producer_idle_timeout.as_millis())
                .unwrap_or(u64::MAX),
        };
        let registry = Some(config.server.registry_stream.clone()).filter(|r| !r.is_empty());
        let queue = config
            .subscriptions
            .enabled
            .then(subscription::NoticeQueue::new);
        let mut streams = Streams::open_observed(
            storage.clone(),
            limits,
            registry,
            queue.as_ref().map(subscription::NoticeQueue::events),
        )?;
        streams.set_retention(stream::Retention {
            acked: config.retention.mode == config::RetentionMode::Acked,
            min_age_ms: u64::try_from(config.retention.min_age.as_millis()).unwrap_or(u64::MAX),
        });
        let streams = Arc::new(streams);
        streams.ensure_registry().await?;
        let subscriptions = match queue {
            Some(queue) => Some(Arc::new(open_subscriptions(
                &config,
                streams.clone(),
                storage.clone(),
                queue,
            )?)),
            None => None,
        };
        let addr = SocketAddr::new(config.server.host, config.server.port);
        let listener = TcpListener::bind(addr)
            .await
            .map_err(|e| anyhow::anyhow!("cannot listen on {addr}: {e}"))?;
        let metrics_listener =
            match config.metrics.addr.as_str() {
                "" => None,
                addr => Some(TcpListener::bind(addr).await.map_err(|e| {
                    anyhow::anyhow!("cannot listen on {addr} (DS_METRICS__ADDR): {e}")
                })?),
            };
        let shutdown = CancellationToken::new();
        let state = http::AppState::new(
            streams.clone(),
            subscriptions.clone(),
            config.clone(),
            shutdown.clone(),
        );
        Ok(App {
            listener,
            state,
            streams,
            subscriptions,
            config,
            shutdown,
            tls,
            metrics_listener,
            storage,
        })
    }

    /// The metrics listener's address, when `DS_METRICS__ADDR` is set.
    pub fn metrics_addr(&self) -> Option<SocketAddr> {
        self.metrics_listener
            .as_ref()
            .and_then(|l| l.local_addr().ok())
    }

    /// Whether the server terminates TLS itself.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// The address actually bound (useful with port 0).
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// The request handler, for driving the server without a socket
    /// (`tower::ServiceExt::oneshot`).
    pub fn handler(&self) -> http::Handler {
        http::Handler::new(self.state.clone())
    }

    /// The stream registry (for tests and tools).
    pub fn streams(&self) -> Arc<Streams> {
        self.streams.clone()
    }

    /// Serves until `signal` resolves, then drains: `/readyz` turns 503, long-polls and SSE end,
    /// and in-flight requests get `shutdown_timeout` to finish.
    pub async fn run(
        self,
        signal: impl Future<Output = ()> + Send + 'static,
    ) -> anyhow::Result<()> {
        let App {
            listener,
            state,
            streams,
            subscriptions,
            config,
            shutdown,
            tls,
            metrics_listener,
            storage,
        } = self;
        let delivery = subscriptions
            .clone()
            .map(|subs| tokio::spawn(subscription::delivery::run(subs, shutdown.clone())));
        let retention = tokio::spawn(streams.clone().run_retention(shutdown.clone()));
        let sweeper = tokio::spawn(sweep_expired(
            streams.clone(),
            config.server.expiry_sweep_interval,
            shutdown.clone(),
        ));
        let handler = http::Handler::new(state.clone());
        let stop = shutdown.clone();
        // SSE streams run on a runtime of their own (see `http::h1::Conn::stream_on`).
        let live = LiveRuntime(Some(
            tokio::runtime::Builder::new_multi_thread()
                .worker_threads(std::thread::available_parallelism().map_or(2, |n| n.get()))
                .thread_name("ds-live")
                .enable_all()
                .build()?,
        ));
        let limits = http::edge::EdgeLimits::from_config(&config);
        let admission = connection_cap(&config);
        let metrics_server = metrics_listener.map(|listener| {
            let registry = metrics::registry(metrics::Sources {
                streams: streams.clone(),
                subscriptions: subscriptions.clone(),
                storage,
                admission: admission.clone(),
                memory_limit: (config.storage.mode == StorageMode::Memory)
                    .then_some(config.limits.max_memory_bytes),
            });
            if let Ok(addr) = listener.local_addr() {
                tracing::info!(%addr, "metrics listening (GET /metrics)");
            }
            tokio::spawn(metrics::serve(listener, registry, shutdown.clone()))
        });
        let serve: std::pin::Pin<Box<dyn Future<Output = std::io::Result<()>> + Send>> = match tls {
            Some(acceptor) => Box::pin(async move {
                tls::serve(listener, acceptor, handler, stop, limits, admission).await;
                Ok(())
            }),
            None => {
                let live = live.0.as_ref().map(|rt| rt.handle().clone());
                Box::pin(async move {
                    http::h1::serve(listener, handler, stop, limits, admission, live).await;
                    Ok(())
                })
            }
        };
        tokio::pin!(serve);
        tokio::select! {
            result = &mut serve => result?,
            () = signal => {
                tracing::info!("shutting down");
                state.begin_drain();
                shutdown.cancel();
                match tokio::time::timeout(config.server.shutdown_timeout, serve).await {
                    Ok(result) => result?,
                    Err(_) => tracing::warn!(
                        timeout = ?config.server.shutdown_timeout,
                        "connections still open at the shutdown deadline; closing them"
                    ),
                }
            }
        }
        shutdown.cancel();
        let _ = sweeper.await;
        let _ = retention.await;
        if let Some(delivery) = delivery {
            let _ = delivery.await;
        }
        // Scrapes need no drain; a scraper's idle keep-alive connection must not hold shutdown.
        if let Some(metrics_server) = metrics_server {
            metrics_server.abort();
        }
        drop(live);
        Ok(())
    }
}

/// The cap on open connections, sized from the open-file limit unless configured.
fn connection_cap(config: &Config) -> Arc<http::edge::Admission> {
    let max = config.max_connections();
    tracing::info!(max_connections = max, "accepting connections");
    http::edge::Admission::new(max)
}

/// The runtime SSE streams run on. Its streams end with the server's shutdown; a runtime cannot
/// be dropped (which blocks) inside async code, so it is shut down in the background.
struct LiveRuntime(Option<tokio::runtime::Runtime>);

impl Drop for LiveRuntime {
    fn drop(&mut self) {
        if let Some(rt) = self.0.take() {
            rt.shutdown_background();
        }
    }
}

/// Subscriptions over the opened streams, with the webhook signing key of the mode: kept in a
/// file in the durable modes, made afresh in memory mode.
fn open_subscriptions(
    config: &Config,
    streams: Arc<Streams>,
    storage: Arc<dyn Storage>,
    queue: subscription::NoticeQueue,
) -> anyhow::Result<Subscriptions> {
    let c = &config.subscriptions;
    let durable_mode = match config.storage.mode {
        StorageMode::Memory => None,
        StorageMode::FileFast => Some("file-fast"),
        StorageMode::FileDurable => Some("file-durable"),
        StorageMode::Acid => Some("acid"),
    };
    let key = match durable_mode {
        None => subscription::signing::SigningKey::generate()?,
        Some(_) => subscription::signing::SigningKey::load_or_create(
            &c.signing_key_path
                .clone()
                .unwrap_or_else(|| config.storage.data_dir.join("webhook-signing.key")),
        )?,
    };
    let settings = subscription::Settings {
        max_subscriptions: c.max_subscriptions,
        max_links: c.max_links,
        allow_local_webhooks: c.allow_local_webhooks,
        public_url: Some(c.public_url.clone()).filter(|u| !u.is_empty()),
        retry_min: c.retry_min,
        retry_max: c.retry_max,
        webhook_timeout: c.webhook_timeout,
    };
    Ok(Subscriptions::open(
        streams,
        storage,
        queue,
        settings,
        Arc::new(key),
        durable_mode,
    )?)
}

/// Opens the configured backend; blocking file work happens once, at start-up.
fn open_storage(config: &Config) -> anyhow::Result<Arc<dyn Storage>> {
    let s = &config.storage;
    let dir = &s.data_dir;
    let cache_bytes = usize::try_from(config.limits.max_memory_bytes).unwrap_or(usize::MAX);
    let file = |durable| storage::file::FileOptions {
        durable,
        segment_bytes: s.segment_bytes,
        max_open_files: s.max_open_files,
        map_reads: s.map_reads,
        cache_bytes,
        fast_sync_interval: s.fast_sync_interval,
    };
    let opened: Arc<dyn Storage> = match s.mode {
        StorageMode::Memory => Arc::new(storage::memory::MemoryStorage),
        StorageMode::FileFast => Arc::new(storage::file::FileStorage::open(dir, file(false))?),
        StorageMode::FileDurable => Arc::new(storage::file::FileStorage::open(dir, file(true))?),
        StorageMode::Acid => Arc::new(storage::acid::AcidStorage::open(
            dir,
            storage::acid::AcidOptions {
                shard_count: s.acid_shard_count,
                cache_bytes,
                commit_log: s.acid_commit_log,
                log_segment_bytes: s.segment_bytes,
                ref_min_bytes: storage::acid::REF_MIN_BYTES,
                map_reads: s.map_reads,
                max_open_files: s.max_open_files,
            },
        )?),
    };
    tracing::info!(mode = opened.name(), dir = %dir.display(), "storage opened");
    Ok(opened)
}

async fn sweep_expired(
    streams: Arc<Streams>,
    every: std::time::Duration,
    shutdown: CancellationToken,
) {
    let mut tick = tokio::time::interval(every);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tokio::select! {
            _ = tick.tick() => {
                let n = streams.sweep_expired();
                if n > 0 {
                    tracing::debug!(expired = n, "swept expired streams");
                }
            }
            () = shutdown.cancelled() => break,
        }
    }
}
