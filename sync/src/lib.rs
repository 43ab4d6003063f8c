//! `ds-sync`: mirrors Durable Streams into Postgres exactly once.
//!
//! Followers (`follow`) read streams over SSE or long-poll and hand reads to one writer
//! (`writer`), which commits rows and checkpoints in one transaction per batch. Which streams to
//! follow comes from the configuration and the server's registry (`discovery`). This module wires
//! them together and owns the worker's lifetime; `main.rs` only parses arguments.

pub mod backoff;
pub mod batch;
pub mod config;
pub mod db;
pub mod discovery;
pub mod follow;
pub mod health;
pub mod sse;
pub mod status;
pub mod writer;

use std::collections::HashSet;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::config::Config;
use crate::discovery::Selection;
use crate::follow::{FollowContext, Follower, Role};
use crate::status::Status;

/// Why the worker stopped.
#[derive(Debug, thiserror::Error)]
pub enum SyncError {
    #[error(transparent)]
    Db(#[from] db::DbError),
    #[error(transparent)]
    Config(#[from] config::ConfigError),
    #[error("the postgres writer stopped")]
    Write(#[from] writer::WriteError),
    #[error("http client: {0}")]
    Http(#[from] reqwest::Error),
    #[error("health endpoint on {addr}: {source}")]
    Health {
        addr: String,
        source: std::io::Error,
    },
    #[error("writer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
}

/// Follows a stream the registry announced, from its stored checkpoint rather than from '-1':
/// the path may have been seen before (closed, deleted, re-created), and the writer refuses reads
/// that do not start at the checkpoint. Closed or deleted streams are not followed.
async fn follow_discovered(ctx: Arc<FollowContext>, pool: deadpool_postgres::Pool, path: String) {
    let mut backoff = Backoff::new(ctx.backoff_min, ctx.backoff_max);
    let checkpoint = loop {
        match db::followable_checkpoint(&pool, &path).await {
            Ok(cp) => break cp,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream = %path, error = %e, retry_in = ?delay, "loading a discovered stream's checkpoint failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    match checkpoint {
        Some(cp) => {
            tracing::info!(stream = %path, offset = %cp.next_offset, "discovered stream; following");
            Follower::new(
                ctx,
                &cp.stream,
                cp.next_offset,
                cp.content_type,
                Role::Mirror,
            )
            .run()
            .await
        }
        None => {
            tracing::info!(stream = %path, "discovered stream is closed or deleted in ds_checkpoints; not followed")
        }
    }
}

/// Runs the worker until `shutdown` is cancelled or a fatal error occurs: migrates, loads the
/// checkpoints, follows every selected stream and discovers new ones.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), SyncError> {
    db::migrate(&config).await?;
    let pool = db::pool(&config)?;
    let selection = Arc::new(Selection::new(&config.streams, &config.registry_path));
    let explicit: Vec<String> = selection.explicit.iter().cloned().collect();
    let checkpoints =
        db::load_checkpoints(&pool, &explicit, &selection.prefixes, &selection.registry).await?;
    let status = Arc::new(Status::default());
    // Children are cancelled when the worker stops for any reason, not only on shutdown.
    let stop = shutdown.child_token();
    let _stop_guard = stop.clone().drop_guard();

    let mut tasks = JoinSet::new();
    if !config.health_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.health_addr)
            .await
            .map_err(|source| SyncError::Health {
                addr: config.health_addr.clone(),
                source,
            })?;
        let router = health::router(pool.clone(), status.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = health::serve(listener, router, stop).await {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
    }
    tasks.spawn(
        status
            .clone()
            .log_periodically(config.stats_interval, stop.clone()),
    );

    let (updates_tx, updates_rx) = mpsc::channel(config.queue_reads);
    let (discovered_tx, mut discovered_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(writer::run(
        pool.clone(),
        updates_rx,
        discovered_tx,
        writer::BatchLimits {
            rows: config.batch_rows,
            bytes: config.batch_bytes,
            linger: config.linger,
        },
        Backoff::new(config.backoff_min, config.backoff_max),
        status.clone(),
        stop.clone(),
    ));

    let mut headers = reqwest::header::HeaderMap::new();
    for (name, value) in config.request_headers() {
        // Validated by Config::load; a failure here would be a bug, reported, not a panic.
        match (
            reqwest::header::HeaderName::from_bytes(name.as_bytes()),
            reqwest::header::HeaderValue::from_str(&value),
        ) {
            (Ok(n), Ok(v)) => {
                headers.insert(n, v);
            }
            _ => tracing::error!(header = %name, "skipping invalid request header"),
        }
    }
    let http = reqwest::Client::builder()
        .default_headers(headers)
        .connect_timeout(std::time::Duration::from_secs(10))
        .build()?;
    let ctx = Arc::new(FollowContext {
        http,
        base_url: config.server_url.trim_end_matches('/').to_owned(),
        updates: updates_tx,
        slots: Arc::new(Semaphore::new(config.max_connections)),
        waiting: AtomicUsize::new(0),
        yield_after: config.yield_after,
        session_max: config.session_max,
        max_event_bytes: config.max_event_bytes,
        inflight_budget: Arc::new(Semaphore::new(config.max_inflight_bytes)),
        inflight_max: config.max_inflight_bytes,
        backoff_min: config.backoff_min,
        backoff_max: config.backoff_max,
        status: status.clone(),
        shutdown: stop.clone(),
    });

    let mut followed: HashSet<String> = HashSet::new();
    let mut followers = JoinSet::new();
    tracing::info!(
        streams = checkpoints.len(),
        patterns = ?selection.prefixes,
        server = %config.server_url,
        "ds-sync starting"
    );
    for cp in checkpoints {
        followed.insert(cp.stream.clone());
        followers.spawn(
            Follower::new(
                ctx.clone(),
                &cp.stream,
                cp.next_offset,
                cp.content_type,
                Role::Mirror,
            )
            .run(),
        );
    }
    if selection.needs_registry() {
        let registry_offset = db::registry_checkpoint(&pool, &selection.registry).await?;
        followers.spawn(
            Follower::new(
                ctx.clone(),
                &selection.registry,
                registry_offset,
                Some("application/json".to_owned()),
                Role::Registry(selection.clone()),
            )
            .run(),
        );
    }

    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            finished = &mut writer => break match finished {
                Ok(Ok(())) => Ok(()),
                Ok(Err(e)) => Err(e.into()),
                Err(e) => Err(e.into()),
            },
            Some(path) = discovered_rx.recv() => {
                if followed.insert(path.clone()) {
                    followers.spawn(follow_discovered(ctx.clone(), pool.clone(), path));
                }
            }
            Some(joined) = followers.join_next() => {
                if let Err(e) = joined {
                    tracing::error!(error = %e, "a follower task failed");
                }
            }
        }
    };
    stop.cancel();
    followers.shutdown().await;
    tasks.shutdown().await;
    result
}
