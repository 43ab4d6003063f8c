//! Following one stream: HEAD for its content type, then SSE from the checkpoint (long-poll for
//! `text/*` streams and as a fallback), turning each response into `batch::Read`s for the writer.
//!
//! It owns the read side of exactly-once: a read covers exactly the bytes between two offsets the
//! server named (`streamNextOffset` of consecutive control events, or a long-poll's request offset
//! and `Stream-Next-Offset`), and the next read starts where the previous one ended. Data events
//! not yet confirmed by a control event when a connection drops are discarded and read again.
//! It never writes to Postgres; the writer does.
//!
//! It also fences incarnations: every response's `Stream-Id` is compared with the id of the
//! incarnation followed (from its checkpoint, or learned from the first response that named one).
//! A response of another stream is never turned into a read of the incarnation: the incarnation
//! ends there, and the stream that answered is mirrored as the next one, from its start. A
//! response without `Stream-Id` (an older server) is checked by offsets alone.
//!
//! Why long-poll for `text/*`: SSE splits `data:` lines on CR, LF and CRLF and rejoins them with
//! LF, so a CR in a text stream cannot survive SSE byte for byte; a long-poll body can.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime};

use base64::Engine as _;
use bytes::Bytes;
use ds_protocol::headers;
use ds_protocol::sse::{ControlEvent, EVENT_CONTROL, EVENT_DATA};
use ds_protocol::{MediaKind, content_type::media_type};
use futures::StreamExt;
use reqwest::StatusCode;
use serde_json::value::RawValue;
use tokio::sync::{OwnedSemaphorePermit, Semaphore, mpsc};
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::backoff::Backoff;
use crate::batch::{
    Announcement, Incarnation, Lifecycle, Read, Row, START_OFFSET, StreamId, Update,
};
use crate::db::StreamStart;
use crate::discovery::{RegistryEvent, Selection};
use crate::status::{Status, StreamState};
use ds_protocol::sse_parser::{SseError, SseParser};

/// Why a session with the server failed; every one of these is retried after a backoff.
#[derive(Debug, thiserror::Error)]
pub enum FollowError {
    #[error("http: {0}")]
    Http(#[from] reqwest::Error),
    #[error("unexpected status {status} for {what}")]
    Status { status: u16, what: &'static str },
    #[error(transparent)]
    Sse(#[from] SseError),
    #[error("bad payload: {0}")]
    Payload(String),
    #[error("protocol violation: {0}")]
    Protocol(String),
    #[error("response body exceeds max_event_bytes ({limit})")]
    TooLarge { limit: usize },
    /// Offsets of one stream only grow: an answer behind the offset asked for comes from
    /// another stream at the same path (deleted and created again).
    #[error(
        "the server answered offset {next:?} to a read at {offset:?}: the path holds another stream"
    )]
    Replaced { offset: String, next: String },
    /// The response named another stream instance than the incarnation's.
    #[error(
        "the server answered for stream id {seen:?}, not {expected:?}: the path holds another stream"
    )]
    OtherStream { expected: StreamId, seen: StreamId },
    /// 410 with `Stream-Earliest-Offset`: the server released (acked retention) data at the
    /// checkpoint that Postgres does not hold. Not a delete: the stream is still there.
    #[error(
        "the server released the data at offset {offset:?} before it was mirrored (its earliest \
         retained offset is {earliest:?}): another subscription's acks or a deleted ds-sync \
         subscription let it go. Nothing is skipped silently: to accept the loss and resume, \
         UPDATE ds_checkpoints SET next_offset = '{earliest}' WHERE stream = '<this stream>'"
    )]
    Released { offset: String, earliest: String },
    #[error("the writer stopped")]
    WriterGone,
    /// 401: the credentials were refused (an expired token, most likely).
    #[error("the server refused the credentials (401) for {what}")]
    Unauthorized { what: &'static str },
}

/// Shared by all followers of one worker.
#[derive(Debug)]
pub struct FollowContext {
    pub http: reqwest::Client,
    /// Server base URL without a trailing slash.
    pub base_url: String,
    pub updates: mpsc::Sender<Update>,
    /// Bounds the live reads open at once (`max_connections`).
    pub slots: Arc<Semaphore>,
    /// Followers waiting for a slot, so an idle session knows to give its slot away.
    pub waiting: AtomicUsize,
    pub yield_after: Duration,
    /// The worker ends an SSE session itself after this long, in case the server never does
    /// (a deleted stream whose SSE stays open would otherwise never be noticed).
    pub session_max: Duration,
    pub max_event_bytes: usize,
    /// Payload bytes handed to the writer and not yet committed, across all followers.
    pub inflight_budget: Arc<Semaphore>,
    pub inflight_max: usize,
    pub backoff_min: Duration,
    pub backoff_max: Duration,
    /// What a follower does when its path turns out to hold another stream: with the registry
    /// followed, end the incarnation and leave the next one to the registry's `created`
    /// announcement (starting it here too would make two); without, start it itself.
    pub restart_replaced: bool,
    pub status: Arc<Status>,
    /// Sets `Authorization` on every request; told of every 401 and every request let through.
    pub credentials: Arc<Credentials>,
    pub shutdown: CancellationToken,
}

impl FollowContext {
    /// A 401 is an error of its own; anything else means the credentials were let through.
    fn check_auth(&self, resp: &reqwest::Response, what: &'static str) -> Result<(), FollowError> {
        if resp.status() == StatusCode::UNAUTHORIZED {
            Err(FollowError::Unauthorized { what })
        } else {
            self.credentials.accepted();
            Ok(())
        }
    }

    async fn acquire_slot(&self, stop: &CancellationToken) -> Option<OwnedSemaphorePermit> {
        self.waiting.fetch_add(1, Ordering::Relaxed);
        let permit = tokio::select! {
            _ = stop.cancelled() => None,
            permit = self.slots.clone().acquire_owned() => permit.ok(),
        };
        self.waiting.fetch_sub(1, Ordering::Relaxed);
        permit
    }
}

/// What a HEAD found at a path.
#[derive(Debug, PartialEq, Eq)]
pub enum Probe {
    /// 404 or 410.
    Missing,
    Present {
        next_offset: String,
        closed: bool,
        /// `Stream-Id`, if the server sent one.
        stream_id: Option<StreamId>,
    },
}

impl FollowContext {
    /// HEAD of `path`: whether a stream is there, its tail and whether it is closed.
    pub async fn probe(&self, path: &str) -> Result<Probe, FollowError> {
        let url = reqwest::Url::parse(&format!("{}{path}", self.base_url))
            .map_err(|e| FollowError::Protocol(format!("stream url: {e}")))?;
        let resp = self
            .credentials
            .authorize(self.http.head(url))
            .send()
            .await?;
        self.check_auth(&resp, "HEAD")?;
        match resp.status() {
            StatusCode::NOT_FOUND | StatusCode::GONE => Ok(Probe::Missing),
            s if s.is_success() => Ok(Probe::Present {
                next_offset: header_str(&resp, headers::STREAM_NEXT_OFFSET)
                    .ok_or_else(|| FollowError::Protocol("HEAD without Stream-Next-Offset".into()))?
                    .to_owned(),
                closed: header_str(&resp, headers::STREAM_CLOSED)
                    .is_some_and(|v| headers::is_true(v.as_bytes())),
                stream_id: stream_id_of(&resp),
            }),
            s => Err(FollowError::Status {
                status: s.as_u16(),
                what: "HEAD",
            }),
        }
    }
}

/// What a follower does with what it reads.
#[derive(Clone, Debug)]
pub enum Role {
    /// Mirror the stream's messages into `ds_messages`.
    Mirror,
    /// Read the registry: nothing is mirrored; its create and delete events about paths that
    /// `selection` covers are handed to the writer, which starts and ends incarnations by them.
    Registry(Arc<Selection>),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Mode {
    Sse,
    LongPoll,
}

/// How a session ended without an error.
#[derive(Debug, PartialEq, Eq)]
enum SessionEnd {
    /// The server ended the response (periodic SSE close, or one long-poll answered).
    Reconnect,
    /// Up to date and other streams wait for a slot.
    Yield,
    /// End of stream: recorded, not followed any more.
    Closed,
    /// 404 or 410.
    Gone(u16),
    /// The server refused SSE for this stream: use long-poll.
    SseUnsupported,
}

/// One followed incarnation of a stream.
pub struct Follower {
    ctx: Arc<FollowContext>,
    stream: Arc<str>,
    /// The incarnation read; every update names it, so the writer can drop what is read after
    /// the incarnation ended.
    incarnation: Incarnation,
    /// The server's id of the incarnation's stream: from its checkpoint, else from the first
    /// response that names one. Responses naming another end the incarnation.
    stream_id: Option<StreamId>,
    role: Role,
    /// Cancelled when the worker stops or this incarnation is no longer to be followed.
    stop: CancellationToken,
    /// Where the next read starts: the end of the last read handed to the writer.
    offset: String,
    content_type: Option<Arc<str>>,
    /// Echoed on long-polls for CDN collapsing.
    cursor: Option<String>,
    mode: Option<Mode>,
    /// The current session got at least one valid answer (control event or long-poll response);
    /// a session that ends without one is retried with backoff.
    answered: bool,
    /// The registry follower has told the writer it reached the tail once.
    caught_up_sent: bool,
}

impl Follower {
    pub fn new(
        ctx: Arc<FollowContext>,
        start: StreamStart,
        role: Role,
        stop: CancellationToken,
    ) -> Self {
        Follower {
            ctx,
            stream: start.stream.into(),
            incarnation: start.incarnation,
            stream_id: start.stream_id,
            role,
            stop,
            offset: start.next_offset,
            content_type: start.content_type.map(Into::into),
            cursor: None,
            mode: None,
            answered: false,
            caught_up_sent: false,
        }
    }

    /// Follows until the stream closes or disappears, or `stop` is cancelled.
    pub async fn run(mut self) {
        let mut backoff = Backoff::new(self.ctx.backoff_min, self.ctx.backoff_max);
        let status = self.ctx.status.clone();
        if !status.set_incarnation(&self.stream, self.incarnation, &self.stop) {
            return;
        }
        let mut sessions = 0u64;
        loop {
            status.set_state(&self.stream, StreamState::Waiting);
            let Some(slot) = self.ctx.acquire_slot(&self.stop).await else {
                return;
            };
            status.set_state(&self.stream, StreamState::Following);
            let start_offset = self.offset.clone();
            if sessions > 0 && self.mode == Some(Mode::Sse) {
                crate::metrics::sse_reconnect();
            }
            sessions += 1;
            self.answered = false;
            let stop = self.stop.clone();
            let result = tokio::select! {
                _ = stop.cancelled() => return,
                r = self.session() => r,
            };
            drop(slot);
            let progressed = self.offset != start_offset;
            match result {
                Ok(SessionEnd::Closed) => {
                    tracing::info!(stream = %self.stream, incarnation = self.incarnation, offset = %self.offset, "stream closed; mirrored to its end");
                    return;
                }
                Ok(SessionEnd::Gone(code)) => {
                    if let Role::Registry(_) = self.role {
                        tracing::warn!(stream = %self.stream, status = code,
                            "the server has no registry stream; prefix patterns only match streams already in ds_checkpoints until it appears");
                        // Nothing to wait for before following the other streams.
                        if self.send_caught_up().await.is_err() {
                            return;
                        }
                        self.pause(self.ctx.backoff_max).await;
                        continue;
                    }
                    tracing::warn!(stream = %self.stream, incarnation = self.incarnation, status = code, "stream is gone; recorded as deleted, not retried");
                    let gone = Update::Gone {
                        stream: self.stream.clone(),
                        incarnation: self.incarnation,
                        status: Some(code),
                    };
                    // If the writer is gone the worker is stopping; the next run finds it gone.
                    let _ = self.ctx.updates.send(gone).await;
                    return;
                }
                Err(e @ (FollowError::Replaced { .. } | FollowError::OtherStream { .. }))
                    if matches!(self.role, Role::Registry(_)) || self.ctx.restart_replaced =>
                {
                    tracing::warn!(stream = %self.stream, incarnation = self.incarnation, offset = %self.offset, reason = %e,
                        "the path holds another stream now; mirroring it as the next incarnation from its start");
                    let next_id = match e {
                        FollowError::OtherStream { seen, .. } => Some(seen),
                        _ => None,
                    };
                    let restart = Update::Restart {
                        stream: self.stream.clone(),
                        incarnation: self.incarnation,
                        stream_id: next_id.clone(),
                    };
                    if self.ctx.updates.send(restart).await.is_err() {
                        return;
                    }
                    self.incarnation += 1;
                    self.stream_id = next_id;
                    self.offset = START_OFFSET.to_owned();
                    self.cursor = None;
                    self.mode = None;
                    if let Role::Mirror = self.role {
                        self.content_type = None;
                    }
                    if !status.set_incarnation(&self.stream, self.incarnation, &self.stop) {
                        return;
                    }
                    backoff.reset();
                }
                Err(e @ (FollowError::Replaced { .. } | FollowError::OtherStream { .. })) => {
                    tracing::warn!(stream = %self.stream, incarnation = self.incarnation, offset = %self.offset, reason = %e,
                        "the path holds another stream now; incarnation recorded as deleted, the registry's create announcement starts the next");
                    let gone = Update::Gone {
                        stream: self.stream.clone(),
                        incarnation: self.incarnation,
                        status: None,
                    };
                    let _ = self.ctx.updates.send(gone).await;
                    return;
                }
                Ok(SessionEnd::SseUnsupported) => {
                    tracing::info!(stream = %self.stream, "server refused SSE; following with long-poll");
                    self.mode = Some(Mode::LongPoll);
                }
                Ok(SessionEnd::Yield) => backoff.reset(),
                Ok(SessionEnd::Reconnect) if self.answered => backoff.reset(),
                // A clean end that delivered nothing: do not hammer the server.
                Ok(SessionEnd::Reconnect) => self.pause(backoff.next_delay()).await,
                Err(FollowError::WriterGone) => return,
                Err(e @ FollowError::Released { .. }) => {
                    // Loud and retried: an operator decides; the stream is not recorded deleted.
                    tracing::error!(stream = %self.stream, incarnation = self.incarnation, error = %e, retry_in = ?self.ctx.backoff_max, "data released before it was mirrored");
                    status.set_state(&self.stream, StreamState::Backoff);
                    self.pause(self.ctx.backoff_max).await;
                }
                // Re-read the token before backing off; a replaced token is tried at once.
                Err(FollowError::Unauthorized { .. }) if self.ctx.credentials.refused().await => {
                    backoff.reset();
                }
                Err(e) => {
                    if progressed {
                        backoff.reset();
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(stream = %self.stream, offset = %self.offset, error = %e, retry_in = ?delay, "read failed; will resume from the last offset");
                    status.set_state(&self.stream, StreamState::Backoff);
                    self.pause(delay).await;
                }
            }
        }
    }

    async fn pause(&self, delay: Duration) {
        tokio::select! {
            _ = self.stop.cancelled() => {}
            _ = tokio::time::sleep(delay) => {}
        }
    }

    /// Tells the writer, once, that the registry has been read to its tail: it passes the
    /// message on after committing everything sent before it.
    async fn send_caught_up(&mut self) -> Result<(), FollowError> {
        if self.caught_up_sent || !matches!(self.role, Role::Registry(_)) {
            return Ok(());
        }
        self.caught_up_sent = true;
        self.ctx
            .updates
            .send(Update::CaughtUp {
                stream: self.stream.clone(),
            })
            .await
            .map_err(|_| FollowError::WriterGone)
    }

    async fn session(&mut self) -> Result<SessionEnd, FollowError> {
        if self.content_type.is_none() {
            match self.head().await? {
                Ok(ct) => self.content_type = Some(ct.into()),
                Err(gone) => return Ok(gone),
            }
        }
        let mode = *self.mode.get_or_insert_with(|| match &self.content_type {
            Some(ct) if MediaKind::of(ct) == MediaKind::Text => Mode::LongPoll,
            _ => Mode::Sse,
        });
        match mode {
            Mode::Sse => self.sse_session().await,
            Mode::LongPoll => self.long_poll().await,
        }
    }

    fn url(&self, live: Option<&str>) -> Result<reqwest::Url, FollowError> {
        let mut url = reqwest::Url::parse(&format!("{}{}", self.ctx.base_url, self.stream))
            .map_err(|e| FollowError::Protocol(format!("stream url: {e}")))?;
        {
            let mut q = url.query_pairs_mut();
            q.append_pair(headers::QUERY_OFFSET, &self.offset);
            if let Some(live) = live {
                q.append_pair(headers::QUERY_LIVE, live);
            }
            if live == Some(headers::LIVE_LONG_POLL)
                && let Some(cursor) = &self.cursor
            {
                q.append_pair(headers::QUERY_CURSOR, cursor);
            }
        }
        Ok(url)
    }

    /// A 410 naming the earliest retained offset is released data, not a deleted stream.
    /// A read from the start of a partly released stream begins at its earliest retained offset:
    /// what came before never reaches Postgres, which is logged as an error.
    fn check_released(&self, resp: &reqwest::Response) -> Result<(), FollowError> {
        let earliest = resp
            .headers()
            .get("stream-earliest-offset")
            .and_then(|v| v.to_str().ok());
        if resp.status().is_success() {
            if let Some(earliest) = earliest
                && self.offset == START_OFFSET
                && earliest.bytes().any(|b| b.is_ascii_digit() && b != b'0')
            {
                tracing::error!(stream = %self.stream, incarnation = self.incarnation, earliest = %earliest,
                    "the server released this stream's beginning before it was mirrored; mirroring from its earliest retained offset");
            }
            return Ok(());
        }
        if resp.status() != StatusCode::GONE {
            return Ok(());
        }
        match earliest {
            Some(earliest) => Err(FollowError::Released {
                offset: self.offset.clone(),
                earliest: earliest.to_owned(),
            }),
            None => Ok(()),
        }
    }

    /// The stream's content type, or how it is gone.
    async fn head(&mut self) -> Result<Result<String, SessionEnd>, FollowError> {
        let resp = self
            .ctx
            .credentials
            .authorize(self.ctx.http.head(self.url(None)?))
            .send()
            .await?;
        self.ctx.check_auth(&resp, "HEAD")?;
        match resp.status() {
            s if s.is_success() => {
                self.check_stream_id(&resp)?;
            }
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Ok(Err(SessionEnd::Gone(resp.status().as_u16())));
            }
            s => {
                return Err(FollowError::Status {
                    status: s.as_u16(),
                    what: "HEAD",
                });
            }
        }
        Ok(Ok(header_str(
            &resp,
            reqwest::header::CONTENT_TYPE.as_str(),
        )
        .unwrap_or(ds_protocol::content_type::DEFAULT_CONTENT_TYPE)
        .to_owned()))
    }

    /// The `Stream-Id` of a successful response, checked against the incarnation's: another id
    /// is `OtherStream`; the first id seen by an incarnation that had none becomes its id.
    fn check_stream_id(
        &mut self,
        resp: &reqwest::Response,
    ) -> Result<Option<StreamId>, FollowError> {
        let seen = stream_id_of(resp);
        match (&self.stream_id, &seen) {
            (Some(expected), Some(seen)) if expected != seen => {
                return Err(FollowError::OtherStream {
                    expected: expected.clone(),
                    seen: seen.clone(),
                });
            }
            (None, Some(seen)) => {
                tracing::debug!(stream = %self.stream, incarnation = self.incarnation, stream_id = %seen, "learned the incarnation's stream id");
                self.stream_id = Some(seen.clone());
            }
            _ => {}
        }
        Ok(seen)
    }

    async fn sse_session(&mut self) -> Result<SessionEnd, FollowError> {
        let resp = self
            .ctx
            .credentials
            .authorize(self.ctx.http.get(self.url(Some(headers::LIVE_SSE))?))
            .send()
            .await?;
        self.ctx.check_auth(&resp, "SSE read")?;
        self.check_released(&resp)?;
        match resp.status() {
            StatusCode::OK => {}
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Ok(SessionEnd::Gone(resp.status().as_u16()));
            }
            StatusCode::BAD_REQUEST
            | StatusCode::METHOD_NOT_ALLOWED
            | StatusCode::NOT_IMPLEMENTED => {
                return Ok(SessionEnd::SseUnsupported);
            }
            s => {
                return Err(FollowError::Status {
                    status: s.as_u16(),
                    what: "SSE read",
                });
            }
        }
        let event_stream = header_str(&resp, reqwest::header::CONTENT_TYPE.as_str())
            .map(|ct| media_type(ct) == "text/event-stream")
            .unwrap_or(false);
        if !event_stream {
            return Err(FollowError::Protocol(
                "SSE response is not text/event-stream".into(),
            ));
        }
        // One SSE response serves one stream instance: every read of the session is its.
        let stream_id = self.check_stream_id(&resp)?;
        let base64 = header_str(&resp, headers::STREAM_SSE_DATA_ENCODING)
            .map(|v| v.eq_ignore_ascii_case("base64"))
            .unwrap_or(false);
        let json = self.is_json();

        let mut body = resp.bytes_stream();
        let mut parser = SseParser::new(self.ctx.max_event_bytes);
        let mut events = Vec::new();
        // Rows of data events not yet confirmed by a control event.
        let mut pending: Vec<Row> = Vec::new();
        let mut pending_bytes = 0usize;
        let mut idle = false;
        let mut yield_check = tokio::time::interval(self.ctx.yield_after);
        yield_check.tick().await;
        let session_end = tokio::time::sleep(self.ctx.session_max);
        tokio::pin!(session_end);
        loop {
            let chunk = tokio::select! {
                chunk = body.next() => chunk,
                _ = &mut session_end => return Ok(SessionEnd::Reconnect),
                _ = yield_check.tick() => {
                    if idle && self.ctx.waiting.load(Ordering::Relaxed) > 0 {
                        return Ok(SessionEnd::Yield);
                    }
                    continue;
                }
            };
            let Some(chunk) = chunk else {
                if !pending.is_empty() || !parser.is_between_events() {
                    tracing::debug!(stream = %self.stream, "SSE ended after data without its control event; it will be read again");
                }
                return Ok(SessionEnd::Reconnect);
            };
            parser.push(&chunk?, &mut events)?;
            for event in events.drain(..) {
                match event.event.as_str() {
                    EVENT_DATA => {
                        idle = false;
                        let rows = decode_sse_data(&event.data, json, base64)?;
                        pending_bytes += rows.iter().map(Row::len).sum::<usize>();
                        if pending_bytes > self.ctx.max_event_bytes {
                            return Err(FollowError::TooLarge {
                                limit: self.ctx.max_event_bytes,
                            });
                        }
                        pending.extend(rows);
                    }
                    EVENT_CONTROL => {
                        let control: ControlEvent = serde_json::from_str(&event.data)
                            .map_err(|e| FollowError::Protocol(format!("control event: {e}")))?;
                        if control.stream_next_offset.is_empty() {
                            return Err(FollowError::Protocol(
                                "control event without streamNextOffset".into(),
                            ));
                        }
                        self.answered = true;
                        let up_to_date = control.up_to_date || control.stream_closed;
                        self.ctx.status.set_up_to_date(&self.stream, up_to_date);
                        idle = up_to_date;
                        pending_bytes = 0;
                        self.emit(
                            std::mem::take(&mut pending),
                            control.stream_next_offset,
                            control.stream_closed,
                            stream_id.clone(),
                        )
                        .await?;
                        if up_to_date {
                            self.send_caught_up().await?;
                        }
                        if control.stream_closed {
                            return Ok(SessionEnd::Closed);
                        }
                    }
                    other => {
                        tracing::debug!(stream = %self.stream, event = other, "ignoring unknown SSE event");
                    }
                }
            }
        }
    }

    async fn long_poll(&mut self) -> Result<SessionEnd, FollowError> {
        let resp = self
            .ctx
            .credentials
            .authorize(self.ctx.http.get(self.url(Some(headers::LIVE_LONG_POLL))?))
            .send()
            .await?;
        self.ctx.check_auth(&resp, "long-poll read")?;
        self.check_released(&resp)?;
        let status = resp.status();
        match status {
            StatusCode::OK | StatusCode::NO_CONTENT => self.answered = true,
            StatusCode::NOT_FOUND | StatusCode::GONE => {
                return Ok(SessionEnd::Gone(status.as_u16()));
            }
            s => {
                return Err(FollowError::Status {
                    status: s.as_u16(),
                    what: "long-poll read",
                });
            }
        }
        let stream_id = self.check_stream_id(&resp)?;
        let next = header_str(&resp, headers::STREAM_NEXT_OFFSET)
            .map(str::to_owned)
            .ok_or_else(|| FollowError::Protocol("response without Stream-Next-Offset".into()))?;
        let closed = header_str(&resp, headers::STREAM_CLOSED)
            .is_some_and(|v| headers::is_true(v.as_bytes()));
        let up_to_date = header_str(&resp, headers::STREAM_UP_TO_DATE)
            .is_some_and(|v| headers::is_true(v.as_bytes()));
        if let Some(cursor) = header_str(&resp, headers::STREAM_CURSOR) {
            self.cursor = Some(cursor.to_owned());
        }
        self.ctx
            .status
            .set_up_to_date(&self.stream, up_to_date || closed);
        if status == StatusCode::NO_CONTENT {
            self.send_caught_up().await?;
            // A timeout carries no data, so it must not move us: a server that answered a newer
            // tail here would make us skip bytes (a bug seen in another server).
            if next != self.offset && !closed {
                tracing::warn!(stream = %self.stream, asked = %self.offset, answered = %next, "long-poll timeout named another offset; ignored");
            }
            if closed && next == self.offset {
                self.emit(Vec::new(), next, true, stream_id).await?;
                return Ok(SessionEnd::Closed);
            }
            return Ok(SessionEnd::Reconnect);
        }
        let body = read_bounded(resp, self.ctx.max_event_bytes).await?;
        let rows = if self.is_json() {
            decode_json_array(&body)?
        } else if body.is_empty() {
            Vec::new()
        } else {
            vec![Row::Bytes(body)]
        };
        self.emit(rows, next, closed, stream_id).await?;
        if up_to_date || closed {
            self.send_caught_up().await?;
        }
        if closed {
            return Ok(SessionEnd::Closed);
        }
        Ok(SessionEnd::Reconnect)
    }

    fn is_json(&self) -> bool {
        self.content_type
            .as_deref()
            .is_some_and(|ct| MediaKind::of(ct) == MediaKind::Json)
    }

    /// Hands one read to the writer and moves `offset` to its end. `stream_id` is the
    /// `Stream-Id` of the response it came from (already checked against the incarnation's).
    async fn emit(
        &mut self,
        rows: Vec<Row>,
        next: String,
        closed: bool,
        stream_id: Option<StreamId>,
    ) -> Result<(), FollowError> {
        // Offsets sort as strings in stream order (`-1` is only ever asked for, never answered).
        if self.offset != START_OFFSET && next < self.offset {
            return Err(FollowError::Replaced {
                offset: self.offset.clone(),
                next,
            });
        }
        if next == self.offset {
            if rows.is_empty() && !closed {
                return Ok(());
            }
            // Rows keyed by an offset that did not move would collide with the next read's.
            if !rows.is_empty() {
                return Err(FollowError::Protocol(format!(
                    "data delivered but the next offset stayed at {next:?}"
                )));
            }
        }
        let (rows, announcements) = match &self.role {
            Role::Mirror => (rows, Vec::new()),
            Role::Registry(selection) => (Vec::new(), announcements(&rows, selection)),
        };
        let size = rows
            .iter()
            .map(Row::len)
            .sum::<usize>()
            .min(self.ctx.inflight_max);
        // Waits while the writer holds `max_inflight_bytes` of uncommitted reads: backpressure
        // instead of memory growth. A read larger than the whole budget takes all of it.
        let budget = self
            .ctx
            .inflight_budget
            .clone()
            .acquire_many_owned(u32::try_from(size).unwrap_or(u32::MAX))
            .await
            .map_err(|_| FollowError::WriterGone)?;
        self.ctx.status.received(&self.stream, &next);
        let read = Read {
            stream: self.stream.clone(),
            incarnation: self.incarnation,
            stream_id,
            content_type: self
                .content_type
                .clone()
                .unwrap_or_else(|| ds_protocol::content_type::DEFAULT_CONTENT_TYPE.into()),
            start_offset: std::mem::replace(&mut self.offset, next.clone()),
            next_offset: next,
            rows,
            closed,
            received_at: SystemTime::now(),
            announcements,
            budget: Some(budget),
        };
        self.ctx
            .updates
            .send(Update::Read(read))
            .await
            .map_err(|_| FollowError::WriterGone)
    }
}

fn header_str<'a>(resp: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    resp.headers().get(name).and_then(|v| v.to_str().ok())
}

/// `Stream-Id` of a response, if the server sent one (an empty value counts as none).
fn stream_id_of(resp: &reqwest::Response) -> Option<StreamId> {
    header_str(resp, headers::STREAM_ID)
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .map(str::to_owned)
}

async fn read_bounded(resp: reqwest::Response, limit: usize) -> Result<Bytes, FollowError> {
    let mut body = resp.bytes_stream();
    let mut buf = Vec::new();
    while let Some(chunk) = body.next().await {
        let chunk = chunk?;
        if buf.len() + chunk.len() > limit {
            return Err(FollowError::TooLarge { limit });
        }
        buf.extend_from_slice(&chunk);
    }
    Ok(Bytes::from(buf))
}

/// Rows of one SSE data event: the messages of a JSON array, or one chunk of bytes.
fn decode_sse_data(data: &str, json: bool, base64: bool) -> Result<Vec<Row>, FollowError> {
    if base64 {
        // The server may wrap base64 over several data: lines; the joins are not data.
        let text: String = data.chars().filter(|c| *c != '\n' && *c != '\r').collect();
        let bytes = base64::engine::general_purpose::STANDARD
            .decode(text)
            .map_err(|e| FollowError::Payload(format!("base64 data event: {e}")))?;
        return Ok(if bytes.is_empty() {
            Vec::new()
        } else {
            vec![Row::Bytes(bytes.into())]
        });
    }
    if json {
        return decode_json_array(data.as_bytes());
    }
    Ok(if data.is_empty() {
        Vec::new()
    } else {
        vec![Row::Bytes(Bytes::copy_from_slice(data.as_bytes()))]
    })
}

/// One row per message of a JSON array, each kept as the server wrote it.
fn decode_json_array(body: &[u8]) -> Result<Vec<Row>, FollowError> {
    if body.iter().all(u8::is_ascii_whitespace) {
        return Ok(Vec::new());
    }
    let messages: Vec<&RawValue> = serde_json::from_slice(body)
        .map_err(|e| FollowError::Payload(format!("json data is not an array of messages: {e}")))?;
    Ok(messages
        .into_iter()
        .map(|m| Row::Json(m.get().to_owned()))
        .collect())
}

/// The registry's `created` and `deleted` events about paths the selection covers, in order.
fn announcements(rows: &[Row], selection: &Selection) -> Vec<Announcement> {
    let mut out = Vec::new();
    for row in rows {
        let Row::Json(text) = row else { continue };
        match serde_json::from_str::<RegistryEvent>(text) {
            Ok(event) if selection.covers(&event.path) => {
                let event_kind = match event.event.as_str() {
                    "created" => Lifecycle::Created,
                    "deleted" => Lifecycle::Deleted,
                    // Events the server may add later say nothing about incarnations.
                    _ => continue,
                };
                out.push(Announcement {
                    event: event_kind,
                    id: event.id(),
                    path: event.path,
                });
            }
            Ok(_) => {}
            Err(e) => {
                tracing::warn!(error = %e, message = %text, "ignoring malformed registry event")
            }
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn json_data_event_yields_one_row_per_message_kept_verbatim() {
        let rows = decode_sse_data("[\n{\"k\": \"v\"},\n\"multi\\nline\"\n, []]", true, false);
        let rows = rows.unwrap_or_else(|e| panic!("{e}"));
        assert_eq!(
            rows,
            vec![
                Row::Json("{\"k\": \"v\"}".into()),
                Row::Json("\"multi\\nline\"".into()),
                Row::Json("[]".into()),
            ]
        );
        assert_eq!(
            decode_sse_data("[]", true, false).map(|r| r.len()).ok(),
            Some(0)
        );
        assert!(decode_sse_data("{\"not\":\"array\"}", true, false).is_err());
    }

    #[test]
    fn base64_data_event_ignores_line_joins() {
        let rows = decode_sse_data("AQID\nBAUG\r\nBwgJCg==", false, true);
        assert_eq!(
            rows.ok(),
            Some(vec![Row::Bytes(Bytes::from_static(&[
                1, 2, 3, 4, 5, 6, 7, 8, 9, 10
            ]))])
        );
        assert_eq!(
            decode_sse_data("", false, true).map(|r| r.len()).ok(),
            Some(0)
        );
        assert!(decode_sse_data("not base64!", false, true).is_err());
    }
}
