//! What the worker reports about itself: throughput and per-stream lag, as log lines every
//! `stats_interval` and as JSON on `/status`.
//!
//! Followers and the writer record into it; it never influences what is written.

use std::collections::VecDeque;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime};

use dashmap::DashMap;
use serde::Serialize;
use tokio_util::sync::CancellationToken;

use crate::batch::Update;

/// Where a followed stream stands.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize)]
#[serde(rename_all = "snake_case")]
pub enum StreamState {
    /// Waiting for a connection slot.
    #[default]
    Waiting,
    /// A live read is open.
    Following,
    /// Retrying after an error.
    Backoff,
    /// The server signalled end of stream; no longer followed.
    Closed,
    /// The server answered 404 or 410; no longer followed.
    Deleted,
}

/// One stream's numbers.
#[derive(Clone, Debug, Default, Serialize)]
pub struct StreamStatus {
    /// The incarnation followed (see `batch`); the numbers below are about it.
    pub incarnation: i32,
    pub state: StreamState,
    /// The last control event or long-poll said the reader has everything the server held.
    pub up_to_date: bool,
    /// The checkpoint as last committed by this worker.
    pub committed_offset: Option<String>,
    pub rows_committed: u64,
    /// From receiving a read to committing it, for the last batch that held this stream.
    pub commit_lag_ms: u64,
    /// Since when the mirror has been behind the server (not everything the server held is
    /// committed); `None`: current. The `ds_sync_stream_lag_seconds` metric.
    #[serde(skip)]
    pub behind_since: Option<Instant>,
    /// The next offset of the last read handed to the writer.
    #[serde(skip)]
    pub read_offset: Option<String>,
}

impl StreamStatus {
    /// Everything read has been committed.
    fn all_committed(&self) -> bool {
        self.read_offset.is_none() || self.read_offset == self.committed_offset
    }
}

/// Totals since start, for metrics.
#[derive(Clone, Copy, Debug)]
pub struct Totals {
    pub rows: u64,
    pub commits: u64,
    pub commit_failures: u64,
}

/// Ended streams (closed or deleted) that `/status` keeps listing: the most recent this many.
/// A worker following a pattern sees every stream ever created under it end (one per chat
/// session, say); keeping each would grow its memory and `/status` without bound.
pub const ENDED_KEPT: usize = 1_000;

/// Shared counters.
#[derive(Debug)]
pub struct Status {
    started: Instant,
    rows: AtomicU64,
    commits: AtomicU64,
    commit_failures: AtomicU64,
    /// Streams followed now, and the last [`ENDED_KEPT`] that ended.
    streams: DashMap<Arc<str>, StreamStatus>,
    /// The ended streams of `streams` (path, incarnation), oldest first: the next to forget.
    ended: Mutex<VecDeque<(Arc<str>, i32)>>,
}

impl Default for Status {
    fn default() -> Self {
        Status {
            started: Instant::now(),
            rows: AtomicU64::new(0),
            commits: AtomicU64::new(0),
            commit_failures: AtomicU64::new(0),
            streams: DashMap::new(),
            ended: Mutex::new(VecDeque::new()),
        }
    }
}

/// The `/status` document.
#[derive(Debug, Serialize)]
pub struct Snapshot {
    pub uptime_secs: u64,
    pub rows_committed: u64,
    pub commits: u64,
    pub commit_failures: u64,
    pub streams: std::collections::BTreeMap<String, StreamStatus>,
}

impl Status {
    /// A follower starts on `incarnation` of `stream`: the numbers of an earlier one are reset.
    /// Returns `false`, recording nothing, once `stop` (the follower's) is cancelled: its
    /// stream ended before it started, and [`Status::ended`] may have looked for an entry
    /// already. (The check is made under the entry's lock, which `ended` takes after the stop,
    /// so one of the two always sees the other: no entry of an ended stream is left "following".)
    pub fn set_incarnation(
        &self,
        stream: &Arc<str>,
        incarnation: i32,
        stop: &CancellationToken,
    ) -> bool {
        let entry = self.streams.entry(stream.clone());
        if stop.is_cancelled() {
            return false;
        }
        let mut entry = entry.or_default();
        if entry.incarnation != incarnation {
            // Behind until its reader first reaches the tail with everything committed.
            *entry = StreamStatus {
                incarnation,
                behind_since: Some(Instant::now()),
                ..StreamStatus::default()
            };
        }
        true
    }

    /// A read ending at `next_offset` was handed to the writer.
    pub fn received(&self, stream: &Arc<str>, next_offset: &str) {
        let Some(mut entry) = self.following(stream) else {
            return;
        };
        entry.read_offset = Some(next_offset.to_owned());
        entry.behind_since.get_or_insert_with(Instant::now);
    }

    pub fn set_state(&self, stream: &Arc<str>, state: StreamState) {
        if let Some(mut entry) = self.following(stream) {
            entry.state = state;
        }
    }

    pub fn set_up_to_date(&self, stream: &Arc<str>, up_to_date: bool) {
        let Some(mut entry) = self.following(stream) else {
            return;
        };
        entry.up_to_date = up_to_date;
        if !up_to_date {
            entry.behind_since.get_or_insert_with(Instant::now);
        } else if entry.all_committed() {
            entry.behind_since = None;
        }
    }

    /// The entry of a stream whose follower runs: a follower's last words after its stream
    /// ended (it is stopped while a read is in flight) neither revive an ended entry nor
    /// recreate a forgotten one. [`Status::set_incarnation`] starts an entry.
    fn following(
        &self,
        stream: &Arc<str>,
    ) -> Option<dashmap::mapref::one::RefMut<'_, Arc<str>, StreamStatus>> {
        self.streams
            .get_mut(stream)
            .filter(|e| !matches!(e.state, StreamState::Closed | StreamState::Deleted))
    }

    /// `incarnation` of `stream` ended (`Closed` or `Deleted`): no longer followed. It stays
    /// in `/status` until [`ENDED_KEPT`] later ones ended. An entry about another incarnation
    /// (a newer one is followed already) is left alone.
    pub fn ended(&self, stream: &Arc<str>, incarnation: i32, state: StreamState) {
        {
            let Some(mut entry) = self.streams.get_mut(stream) else {
                return;
            };
            if entry.incarnation != incarnation {
                return;
            }
            entry.state = state;
        }
        let Ok(mut ended) = self.ended.lock() else {
            return;
        };
        ended.push_back((stream.clone(), incarnation));
        while ended.len() > ENDED_KEPT {
            let Some((old, inc)) = ended.pop_front() else {
                break;
            };
            self.streams.remove_if(&old, |_, e| {
                e.incarnation == inc
                    && matches!(e.state, StreamState::Closed | StreamState::Deleted)
            });
        }
    }

    pub fn commit_failed(&self) {
        self.commit_failures.fetch_add(1, Ordering::Relaxed);
    }

    /// Records a committed batch: `applied` are the positions of the updates that took effect.
    pub fn committed(&self, batch: &[Update], applied: &[usize], rows: usize) {
        self.rows.fetch_add(rows as u64, Ordering::Relaxed);
        self.commits.fetch_add(1, Ordering::Relaxed);
        let now = SystemTime::now();
        let mut bytes = 0u64;
        for update in applied.iter().filter_map(|&i| batch.get(i)) {
            match update {
                Update::Read(read) => {
                    bytes += read.rows.iter().map(|r| r.len() as u64).sum::<u64>();
                    if let Some(mut entry) = self
                        .streams
                        .get_mut(&read.stream)
                        .filter(|e| e.incarnation == read.incarnation)
                    {
                        entry.committed_offset = Some(read.next_offset.clone());
                        if entry.up_to_date && entry.all_committed() {
                            entry.behind_since = None;
                        }
                        entry.rows_committed += read.rows.len() as u64;
                        let lag = now.duration_since(read.received_at).unwrap_or_default();
                        entry.commit_lag_ms = u64::try_from(lag.as_millis()).unwrap_or(u64::MAX);
                    }
                    if read.closed {
                        self.ended(&read.stream, read.incarnation, StreamState::Closed);
                    }
                }
                Update::Gone {
                    stream,
                    incarnation,
                    ..
                } => self.ended(stream, *incarnation, StreamState::Deleted),
                Update::Restart { .. } | Update::CaughtUp { .. } => {}
            }
        }
        crate::metrics::committed_bytes(bytes);
    }

    pub fn totals(&self) -> Totals {
        Totals {
            rows: self.rows.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
        }
    }

    /// Every followed stream (not closed or deleted) with its lag, largest first.
    pub fn lags(&self) -> Vec<(Arc<str>, Duration)> {
        let mut lags: Vec<(Arc<str>, Duration)> = self
            .streams
            .iter()
            .filter(|e| !matches!(e.state, StreamState::Closed | StreamState::Deleted))
            .map(|e| {
                let lag = e.behind_since.map(|t| t.elapsed()).unwrap_or_default();
                (e.key().clone(), lag)
            })
            .collect();
        lags.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| a.0.cmp(&b.0)));
        lags
    }

    pub fn snapshot(&self) -> Snapshot {
        Snapshot {
            uptime_secs: self.started.elapsed().as_secs(),
            rows_committed: self.rows.load(Ordering::Relaxed),
            commits: self.commits.load(Ordering::Relaxed),
            commit_failures: self.commit_failures.load(Ordering::Relaxed),
            streams: self
                .streams
                .iter()
                .map(|e| (e.key().to_string(), e.value().clone()))
                .collect(),
        }
    }

    /// Logs throughput and the worst lag every `interval` until shutdown.
    pub async fn log_periodically(
        self: Arc<Self>,
        interval: Duration,
        shutdown: CancellationToken,
    ) {
        let mut ticker = tokio::time::interval(interval);
        ticker.tick().await;
        let mut last_rows = self.rows.load(Ordering::Relaxed);
        let mut last_at = Instant::now();
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = ticker.tick() => {}
            }
            let rows = self.rows.load(Ordering::Relaxed);
            let secs = last_at.elapsed().as_secs_f64().max(1e-3);
            let rows_per_sec = (rows - last_rows) as f64 / secs;
            (last_rows, last_at) = (rows, Instant::now());
            let (mut followed, mut up_to_date, mut behind) = (0usize, 0usize, Vec::new());
            let mut worst: Option<(Arc<str>, u64)> = None;
            for entry in self.streams.iter() {
                let s = entry.value();
                if matches!(s.state, StreamState::Closed | StreamState::Deleted) {
                    continue;
                }
                followed += 1;
                if s.up_to_date {
                    up_to_date += 1;
                } else if behind.len() < 5 {
                    behind.push(entry.key().to_string());
                }
                if worst.as_ref().is_none_or(|w| s.commit_lag_ms > w.1) {
                    worst = Some((entry.key().clone(), s.commit_lag_ms));
                }
                tracing::debug!(stream = %entry.key(), state = ?s.state, up_to_date = s.up_to_date,
                    offset = ?s.committed_offset, commit_lag_ms = s.commit_lag_ms, "stream lag");
            }
            tracing::info!(
                rows_per_sec = format_args!("{rows_per_sec:.0}"),
                rows_total = rows,
                streams_followed = followed,
                streams_up_to_date = up_to_date,
                behind = ?behind,
                worst_commit_lag_ms = worst.as_ref().map(|w| w.1).unwrap_or(0),
                worst_stream = worst.as_ref().map(|w| w.0.to_string()).unwrap_or_default(),
                commit_failures = self.commit_failures.load(Ordering::Relaxed),
                "sync stats"
            );
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ended_streams_are_listed_until_many_later_ones_ended() {
        let status = Status::default();
        let path = |i: usize| -> Arc<str> { format!("/chat/{i}").into() };
        for i in 0..ENDED_KEPT * 3 {
            status.set_incarnation(&path(i), 1, &CancellationToken::new());
            status.set_state(&path(i), StreamState::Following);
            status.ended(&path(i), 1, StreamState::Deleted);
        }
        let snapshot = status.snapshot();
        assert_eq!(snapshot.streams.len(), ENDED_KEPT);
        // The most recent are kept, as deleted; none counts as followed.
        let last = path(ENDED_KEPT * 3 - 1);
        assert_eq!(snapshot.streams[&*last].state, StreamState::Deleted);
        assert!(!snapshot.streams.contains_key(&*path(0)));
        assert!(status.lags().is_empty());
    }

    #[test]
    fn a_follower_stopped_before_it_started_records_nothing() {
        let status = Status::default();
        let p: Arc<str> = "/p".into();
        let stop = CancellationToken::new();
        // The registry's delete came first: stopped, and the end found no entry to mark.
        stop.cancel();
        status.ended(&p, 1, StreamState::Deleted);
        assert!(!status.set_incarnation(&p, 1, &stop));
        assert!(status.snapshot().streams.is_empty());
        assert!(status.lags().is_empty());
    }

    #[test]
    fn a_stopped_followers_last_words_neither_revive_nor_recreate_its_entry() {
        let status = Status::default();
        let p: Arc<str> = "/p".into();
        status.set_incarnation(&p, 1, &CancellationToken::new());
        status.ended(&p, 1, StreamState::Deleted);
        status.set_state(&p, StreamState::Following);
        status.set_up_to_date(&p, false);
        status.received(&p, "0_10");
        assert_eq!(status.snapshot().streams["/p"].state, StreamState::Deleted);
        assert!(status.lags().is_empty());
        // Never followed: nothing is made up.
        let q: Arc<str> = "/q".into();
        status.set_state(&q, StreamState::Following);
        status.ended(&q, 1, StreamState::Deleted);
        assert!(!status.snapshot().streams.contains_key("/q"));
        // An end of an older incarnation leaves the newer one followed.
        status.set_incarnation(&p, 2, &CancellationToken::new());
        status.ended(&p, 1, StreamState::Deleted);
        assert_eq!(status.lags().len(), 1);
    }
}
