//! `ds-sync`: mirrors Durable Streams into Postgres exactly once.
//!
//! Followers (`follow`) read streams over SSE or long-poll and hand reads to one writer
//! (`writer`), which commits rows and checkpoints in one transaction per batch. Which streams to
//! follow comes from the configuration and the server's registry (`discovery`). This module wires
//! them together and owns the worker's lifetime; `main.rs` only parses arguments.

pub mod auth;
pub mod backoff;
pub mod batch;
pub mod config;
pub mod db;
pub mod discovery;
pub mod follow;
pub mod health;
pub mod metrics;
pub mod status;
pub mod subscription;
pub mod writer;

use std::collections::HashMap;
use std::sync::Arc;
use std::sync::atomic::AtomicUsize;

use deadpool_postgres::Pool;
use tokio::sync::{Semaphore, mpsc};
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::backoff::Backoff;
use crate::batch::{Checkpoint, Incarnation, Notice};
use crate::config::Config;
use crate::db::StreamStart;
use crate::discovery::Selection;
use crate::follow::{FollowContext, Follower, Probe, Role};
use crate::status::{Status, StreamState};
use crate::subscription::{AckBook, Subscriber};

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
    #[error("metrics endpoint on {addr}: {source}")]
    Metrics {
        addr: String,
        source: std::io::Error,
    },
    #[error("writer task failed: {0}")]
    Join(#[from] tokio::task::JoinError),
    #[error(transparent)]
    Auth(#[from] auth::AuthError),
    #[error(transparent)]
    Subscription(#[from] subscription::SubscriptionError),
}

/// Which incarnation of each path a follower runs for, and the token that stops it.
///
/// Holds the streams followed now, not every stream ever followed: an entry goes when its
/// follower is stopped (the registry announced the end) or ends on its own (closed, gone). A
/// worker following a pattern sees every stream ever created under it come and go (one per chat
/// session, say), so entries of ended streams would grow without bound.
#[derive(Debug, Default)]
struct Followed {
    by_path: HashMap<String, (Incarnation, CancellationToken)>,
}

impl Followed {
    /// Makes `incarnation` the one followed at `path`, stopping the follower of an earlier one,
    /// unless that or a later incarnation is followed already. Returns the new follower's stop
    /// token (a child of `parent`).
    fn claim(
        &mut self,
        path: &str,
        incarnation: Incarnation,
        parent: &CancellationToken,
    ) -> Option<CancellationToken> {
        if let Some((followed, stop)) = self.by_path.get(path) {
            if *followed >= incarnation {
                return None;
            }
            stop.cancel();
        }
        let stop = parent.child_token();
        self.by_path
            .insert(path.to_owned(), (incarnation, stop.clone()));
        Some(stop)
    }

    /// Stops the follower of `incarnation` of `path` (its end was announced). Returns whether
    /// one ran.
    fn stop(&mut self, path: &str, incarnation: Incarnation) -> bool {
        match self.by_path.get(path) {
            Some((followed, stop)) if *followed == incarnation => {
                stop.cancel();
                self.by_path.remove(path);
                true
            }
            _ => false,
        }
    }

    /// The follower started for `incarnation` of `path` returned: forgets it, unless a later
    /// incarnation is followed there since.
    fn finished(&mut self, path: &str, incarnation: Incarnation) {
        if self
            .by_path
            .get(path)
            .is_some_and(|(followed, _)| *followed == incarnation)
        {
            self.by_path.remove(path);
        }
    }

    #[cfg(test)]
    fn len(&self) -> usize {
        self.by_path.len()
    }
}

/// The followers of mirrored streams: at most one per path, for its latest incarnation.
struct Followers {
    ctx: Arc<FollowContext>,
    pool: Pool,
    /// Each returns the path and incarnation it was started for.
    tasks: JoinSet<(String, Incarnation)>,
    followed: Followed,
}

impl Followers {
    /// Follows a stream from a checkpoint just loaded.
    fn start(&mut self, start: StreamStart) {
        let (path, incarnation) = (start.stream.clone(), start.incarnation);
        if let Some(stop) = self.followed.claim(&path, incarnation, &self.ctx.shutdown) {
            let follower = Follower::new(self.ctx.clone(), start, Role::Mirror, stop);
            self.tasks.spawn(async move {
                follower.run().await;
                (path, incarnation)
            });
        }
    }

    /// Follows an incarnation a committed batch announced, from its stored checkpoint.
    fn follow(&mut self, path: String, incarnation: Incarnation) {
        if let Some(stop) = self.followed.claim(&path, incarnation, &self.ctx.shutdown) {
            let (ctx, pool) = (self.ctx.clone(), self.pool.clone());
            self.tasks.spawn(async move {
                follow_announced(ctx, pool, path.clone(), incarnation, stop).await;
                (path, incarnation)
            });
        }
    }

    /// Stops following `incarnation` of `path`: it ended deleted (the registry said so, or a
    /// read of another stream fenced it).
    fn stop(&mut self, path: &str, incarnation: Incarnation) {
        self.followed.stop(path, incarnation);
        self.ctx
            .status
            .ended(&Arc::from(path), incarnation, StreamState::Deleted);
    }
}

/// Follows an announced incarnation from its stored checkpoint rather than from '-1': the
/// writer refuses reads that do not start at the checkpoint. An incarnation that ended (or was
/// superseded) before this runs is not followed.
async fn follow_announced(
    ctx: Arc<FollowContext>,
    pool: Pool,
    path: String,
    incarnation: Incarnation,
    stop: CancellationToken,
) {
    let mut backoff = Backoff::new(ctx.backoff_min, ctx.backoff_max);
    let checkpoint = loop {
        match db::followable_checkpoint(&pool, &path).await {
            Ok(cp) => break cp,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream = %path, error = %e, retry_in = ?delay, "loading an announced stream's checkpoint failed");
                tokio::select! {
                    _ = stop.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    match checkpoint {
        Some(cp) if cp.incarnation == incarnation => {
            tracing::info!(stream = %path, incarnation, offset = %cp.next_offset, "following a discovered or re-created stream");
            Follower::new(ctx, cp, Role::Mirror, stop).run().await
        }
        _ => {
            tracing::info!(stream = %path, incarnation, "announced incarnation already ended in ds_checkpoints; not followed")
        }
    }
}

/// Where no registry is followed: looks once whether an explicit path that is no longer followed
/// (deleted, or closed) holds a new stream now, and if so starts its next incarnation and has it
/// followed. A stream id other than the ended incarnation's is a new stream; without ids, a
/// closed stream never changes, so a stream there that is open, or closed at another tail, is a
/// new one.
async fn revive_if_reappeared(
    ctx: Arc<FollowContext>,
    pool: Pool,
    stream: String,
    ended: Checkpoint,
    notices: mpsc::UnboundedSender<Notice>,
) {
    let mut backoff = Backoff::new(ctx.backoff_min, ctx.backoff_max);
    let probe = loop {
        match ctx.probe(&stream).await {
            Ok(probe) => break probe,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream = %stream, error = %e, retry_in = ?delay, "looking whether an ended stream reappeared failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    };
    let (reappeared, stream_id) = match probe {
        Probe::Missing => (false, None),
        Probe::Present { stream_id, .. } if ended.deleted => (true, stream_id),
        // Both ids known: the same id is the same (closed) stream, another id a new one.
        Probe::Present {
            stream_id: Some(seen),
            ..
        } if ended.stream_id.is_some() => (ended.stream_id.as_deref() != Some(&seen), Some(seen)),
        Probe::Present {
            next_offset,
            closed,
            stream_id,
        } => (!closed || next_offset != ended.next_offset, stream_id),
    };
    if !reappeared {
        return;
    }
    loop {
        match db::start_next_incarnation(&pool, &stream, ended.incarnation, stream_id.as_deref())
            .await
        {
            Ok(Some(start)) => {
                tracing::info!(stream = %stream, incarnation = start.incarnation, "the path holds a new stream; mirroring it as the next incarnation");
                let _ = notices.send(Notice::Follow {
                    path: start.stream,
                    incarnation: start.incarnation,
                });
                return;
            }
            Ok(None) => return,
            Err(e) => {
                let delay = backoff.next_delay();
                tracing::warn!(stream = %stream, error = %e, retry_in = ?delay, "starting the next incarnation failed");
                tokio::select! {
                    _ = ctx.shutdown.cancelled() => return,
                    _ = tokio::time::sleep(delay) => {}
                }
            }
        }
    }
}

/// Runs the worker until `shutdown` is cancelled or a fatal error occurs: migrates, then
/// (with a subscription) waits to hold the subscription's lease, and mirrors while it holds it
/// (see `subscription`). A lost lease stops the mirroring, which starts again from the
/// checkpoints once the lease is held again.
pub async fn run(config: Config, shutdown: CancellationToken) -> Result<(), SyncError> {
    db::migrate(&config).await?;
    let pool = db::pool(&config)?;
    let selection = Arc::new(Selection::new(&config.streams, &config.registry_path));
    let explicit: Vec<String> = selection.explicit.iter().cloned().collect();
    db::ensure_checkpoints(&pool, &explicit).await?;
    let status = Arc::new(Status::default());
    let credentials = Arc::new(match &config.token_file {
        Some(path) => auth::Credentials::from_file(path).await?,
        None => auth::Credentials::fixed(None)?,
    });
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
        let router = health::router(pool.clone(), status.clone(), credentials.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = health::serve(listener, router, stop).await {
                tracing::error!(error = %e, "health endpoint failed");
            }
        });
    }
    if !config.metrics_addr.is_empty() {
        let listener = tokio::net::TcpListener::bind(&config.metrics_addr)
            .await
            .map_err(|source| SyncError::Metrics {
                addr: config.metrics_addr.clone(),
                source,
            })?;
        if let Ok(addr) = listener.local_addr() {
            tracing::info!(%addr, "metrics listening (GET /metrics)");
        }
        let registry = metrics::registry(status.clone());
        let stop = stop.clone();
        tasks.spawn(async move {
            if let Err(e) = metrics::serve(listener, registry, stop).await {
                tracing::error!(error = %e, "metrics endpoint failed");
            }
        });
    }
    tasks.spawn(
        status
            .clone()
            .log_periodically(config.stats_interval, stop.clone()),
    );
    tasks.spawn(credentials.clone().watch(stop.clone()));

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
    let subscriber =
        Subscriber::new(&config, &selection, http.clone(), credentials.clone()).map(Arc::new);

    let result = loop {
        let lease = match &subscriber {
            Some(sub) => match sub.acquire(&stop).await {
                Ok(lease) => lease,
                Err(e) => break Err(e.into()),
            },
            None => None,
        };
        if stop.is_cancelled() {
            break Ok(());
        }
        let work = stop.child_token();
        let finished = CancellationToken::new();
        let mut holder = None;
        let mut book = None;
        if let (Some(sub), Some(lease)) = (&subscriber, lease) {
            let b = Arc::new(AckBook::default());
            holder = Some(tokio::spawn(sub.clone().hold(
                lease,
                b.clone(),
                work.clone(),
                stop.clone(),
                finished.clone(),
            )));
            book = Some(b);
        }
        let worked = mirror(
            &config,
            &pool,
            &selection,
            &explicit,
            &status,
            Mirror {
                http: http.clone(),
                credentials: credentials.clone(),
                acks: book,
            },
            work.clone(),
        )
        .await;
        if worked.is_err() {
            work.cancel();
        }
        finished.cancel();
        if let Some(holder) = holder {
            // On shutdown it sends the last acks and releases the lease first.
            if let Err(e) = holder.await {
                tracing::error!(error = %e, "the lease task failed");
            }
        }
        match worked {
            Err(e) => break Err(e),
            Ok(()) if stop.is_cancelled() || subscriber.is_none() => break Ok(()),
            // The lease was lost: claim it again, then resume from the checkpoints.
            Ok(()) => {}
        }
    };
    stop.cancel();
    tasks.shutdown().await;
    result
}

/// What one mirroring session shares with the worker around it.
struct Mirror {
    http: reqwest::Client,
    credentials: Arc<auth::Credentials>,
    /// Where committed checkpoints go to be acked (with a subscription).
    acks: Option<Arc<AckBook>>,
}

/// Mirrors until `shutdown` is cancelled (the worker stops, or its lease was lost) or a fatal
/// error occurs: loads the checkpoints, follows every selected stream and discovers new ones.
///
/// With a pattern configured, the registry is read to its tail (and committed) before any other
/// stream is followed: its events since the last run may have ended incarnations or started new
/// ones, and a follower started from an ended incarnation's checkpoint would read the new stream
/// at the path into the old incarnation.
async fn mirror(
    config: &Config,
    pool: &Pool,
    selection: &Arc<Selection>,
    explicit: &[String],
    status: &Arc<Status>,
    shared: Mirror,
    shutdown: CancellationToken,
) -> Result<(), SyncError> {
    let pool = pool.clone();
    let explicit = explicit.to_vec();
    let status = status.clone();
    let stop = shutdown.child_token();
    let _stop_guard = stop.clone().drop_guard();
    let mut tasks = JoinSet::new();

    let (updates_tx, updates_rx) = mpsc::channel(config.queue_reads);
    let (notices_tx, mut notices_rx) = mpsc::unbounded_channel();
    let mut writer = tokio::spawn(writer::run(
        pool.clone(),
        updates_rx,
        writer::AfterCommit {
            notices: notices_tx.clone(),
            acks: shared.acks,
        },
        writer::BatchLimits {
            rows: config.batch_rows,
            bytes: config.batch_bytes,
            linger: config.linger,
        },
        Backoff::new(config.backoff_min, config.backoff_max),
        status.clone(),
        stop.clone(),
    ));

    let ctx = Arc::new(FollowContext {
        http: shared.http,
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
        restart_replaced: !selection.needs_registry(),
        status: status.clone(),
        credentials: shared.credentials,
        shutdown: stop.clone(),
    });

    let mut followers = Followers {
        ctx: ctx.clone(),
        pool: pool.clone(),
        tasks: JoinSet::new(),
        followed: Followed::default(),
    };
    tracing::info!(
        streams = explicit.len(),
        patterns = ?selection.prefixes,
        server = %config.server_url,
        "ds-sync starting"
    );
    // Whether the streams' followers have started (see above for why they may wait).
    let mut started = false;
    if selection.needs_registry() {
        let registry = db::registry_checkpoint(&pool, &selection.registry).await?;
        tracing::info!(registry = %registry.stream, offset = %registry.next_offset, "reading the registry to its tail before following streams");
        let (path, incarnation) = (registry.stream.clone(), registry.incarnation);
        let follower = Follower::new(
            ctx.clone(),
            registry,
            Role::Registry(selection.clone()),
            stop.child_token(),
        );
        followers.tasks.spawn(async move {
            follower.run().await;
            (path, incarnation)
        });
    } else {
        for (stream, ended) in db::ended_checkpoints(&pool, &explicit).await? {
            tasks.spawn(revive_if_reappeared(
                ctx.clone(),
                pool.clone(),
                stream,
                ended,
                notices_tx.clone(),
            ));
        }
        for start in
            db::followable_checkpoints(&pool, &explicit, &selection.prefixes, &selection.registry)
                .await?
        {
            followers.start(start);
        }
        started = true;
    }
    drop(notices_tx);

    let mut writer_done = false;
    let result = loop {
        tokio::select! {
            _ = shutdown.cancelled() => break Ok(()),
            finished = &mut writer => break {
                writer_done = true;
                match finished {
                    Ok(Ok(())) => Ok(()),
                    Ok(Err(e)) => Err(e.into()),
                    Err(e) => Err(e.into()),
                }
            },
            Some(notice) = notices_rx.recv() => match notice {
                Notice::RegistryCaughtUp if !started => {
                    started = true;
                    let starts = db::followable_checkpoints(
                        &pool, &explicit, &selection.prefixes, &selection.registry,
                    );
                    match starts.await {
                        Ok(starts) => {
                            tracing::info!(streams = starts.len(), "registry read to its tail; following streams");
                            for start in starts {
                                followers.start(start);
                            }
                        }
                        Err(e) => break Err(e.into()),
                    }
                }
                // Before the streams' followers start, their checkpoints (loaded after the
                // registry's catch-up committed) already reflect these.
                _ if !started => {}
                Notice::RegistryCaughtUp => {}
                Notice::Follow { path, incarnation } => followers.follow(path, incarnation),
                Notice::Stop { path, incarnation } => followers.stop(&path, incarnation),
            },
            Some(joined) = followers.tasks.join_next() => match joined {
                Ok((path, incarnation)) => followers.followed.finished(&path, incarnation),
                Err(e) => tracing::error!(error = %e, "a follower task failed"),
            },
        }
    };
    stop.cancel();
    followers.tasks.shutdown().await;
    tasks.shutdown().await;
    // A batch being committed lands (or not) before the next session loads the checkpoints:
    // two writers of one worker must never overlap.
    if !writer_done && let Err(e) = writer.await {
        tracing::error!(error = %e, "writer task failed");
    }
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn followed_paths_are_forgotten_once_their_followers_end() {
        let root = CancellationToken::new();
        let mut followed = Followed::default();
        // A stream per session: followed, then ended, a thousand times over.
        for i in 0..1_000 {
            let path = format!("/chat/{i}");
            let stop = followed.claim(&path, 1, &root).expect("not followed yet");
            if i % 2 == 0 {
                // The registry announced its delete.
                assert!(followed.stop(&path, 1));
                assert!(stop.is_cancelled());
            }
            // Its follower returns (stopped, or the stream closed or went away).
            followed.finished(&path, 1);
        }
        assert_eq!(followed.len(), 0);
    }

    #[test]
    fn a_later_incarnation_replaces_the_followed_one_and_outlives_its_end() {
        let root = CancellationToken::new();
        let mut followed = Followed::default();
        let first = followed.claim("/p", 1, &root).expect("first");
        assert!(followed.claim("/p", 1, &root).is_none(), "already followed");
        let second = followed.claim("/p", 2, &root).expect("second");
        assert!(first.is_cancelled());
        assert!(
            followed.claim("/p", 1, &root).is_none(),
            "older than followed"
        );
        // The first follower's end and a late stop of it leave the second alone.
        followed.finished("/p", 1);
        assert!(!followed.stop("/p", 1));
        assert!(!second.is_cancelled());
        assert_eq!(followed.len(), 1);
        followed.finished("/p", 2);
        assert_eq!(followed.len(), 0);
    }
}
