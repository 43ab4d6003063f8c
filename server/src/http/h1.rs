//! Plaintext HTTP/1.1 connections, served by our own connection loop around the server's
//! request handler.
//!
//! Why not hyper's HTTP/1 server here: a live reader (SSE or long-poll) is mostly an idle
//! connection, and with hyper each one keeps a 16 KiB read buffer, an 8 KiB header buffer and
//! a cached header map for its whole life (about 24 KB of RSS per reader, measured with
//! heaptrack). This loop holds no buffer while it waits: it reads a request head into a small
//! buffer, hands an owned `http::Request` to the same handler every other transport uses,
//! writes the response, and frees the buffer whenever it is empty. Everything protocol-specific
//! stays in the handlers; this file only frames HTTP/1.1 messages.
//!
//! What it implements (RFC 9112): request heads parsed by `httparse` (the parser hyper uses);
//! `Content-Length` and `chunked` request bodies; `Expect: 100-continue` (HTTP/1.1 only);
//! keep-alive and pipelining for HTTP/1.1 (`Connection: close` honoured), one request per
//! connection for HTTP/1.0; responses framed by `Content-Length` when the body's size is known
//! and by chunked encoding otherwise; no body for HEAD, 1xx, 204 and 304; a `Date` header.
//! A client that hangs up while its request is in progress (a long-poll, an SSE stream) is
//! noticed at once and its handler dropped. A connection that starts with the HTTP/2 preface
//! (h2c with prior knowledge) is handed to hyper's HTTP/2 server. TLS connections never come
//! here (see `tls.rs`).
//!
//! The network is hostile, so framing is at least as strict as hyper's wherever the two could
//! disagree about where a message ends (a differential test, `h1/differential.rs`, holds us to
//! it): lines end with CRLF only (a bare LF or CR anywhere in a head or a chunked body's lines
//! is refused); a chunk size is hex digits right at the start of its line, followed by nothing
//! or by extensions of RFC 9112's grammar, 16 KiB of extensions per body at most; trailers are
//! parsed as header fields, at most 100 of them and 16 KiB; `Content-Length` is one decimal
//! number (repeated headers must agree); `Transfer-Encoding` must be exactly `chunked` (501 for
//! any other coding), never with `Content-Length` or on HTTP/1.0. Every wait is bounded
//! ([`EdgeLimits`]): a request head must arrive within `header_read_timeout` of its first byte
//! (408), a connection waiting for a request is closed after `idle_timeout` without a byte, and
//! a body must keep arriving (`body_read_timeout` at most between reads, 408). A live response
//! is never cut by any of them. After a request, a buffer grown for a large body is given back.

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::edge::{Acceptor, Admission, Admitted, EdgeLimits, HTTP_REFUSAL};
use super::request;
use super::{AppendAnswer, AppendReply, AppendStep, Handler, RawAppend};

/// Largest request head (request line and headers) accepted; larger gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request; more gets 431.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read while a head or body arrives.
const READ_CHUNK: usize = 4096;
/// Chunk extension bytes one body may carry, all its chunks together (hyper's bound: a body
/// whose extensions reach it is refused).
const MAX_CHUNK_EXTENSION_BYTES: usize = 16 * 1024;
/// Longest chunk-size line: room for the extensions and a size with some leading zeros.
const MAX_CHUNK_LINE: usize = MAX_CHUNK_EXTENSION_BYTES + 64;
/// Bytes of a body's trailer section, its lines' CRLFs and the final CRLF included (hyper's
/// bound: a section that reaches it is refused); more gets 431.
const MAX_TRAILER_BYTES: usize = 16 * 1024;
/// Largest read buffer a connection keeps after a request; a larger one (grown for a large
/// body, or a view of a body's allocation) is replaced, so an idle connection holds what a
/// fresh one holds whatever its last body was.
const KEPT_BUFFER_BYTES: usize = 16 * 1024;
/// A response body this small is written together with its head, in one write.
const COALESCE_BYTES: usize = 16 * 1024;
/// Body frames gathered into one `writev` at most (Linux takes up to 1024 buffers per call).
const MAX_WRITE_FRAMES: usize = 256;
/// After refusing a request whose body we did not read, how long to drain what the client still
/// sends, so that closing does not reset the connection before the client reads the answer.
const LINGER: Duration = Duration::from_secs(1);
const LINGER_BYTES: usize = 1 << 20;
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Serves plaintext connections until `stop` is cancelled, then waits for every connection to
/// finish the request it is serving (idle keep-alive connections close at once).
///
/// `live`, if given, is the runtime that streamed responses (SSE) move to: see
/// [`Conn::stream_on`].
pub async fn serve(
    listener: TcpListener,
    handler: Handler,
    stop: CancellationToken,
    limits: EdgeLimits,
    admission: std::sync::Arc<Admission>,
    live: Option<Handle>,
) {
    let tracker = TaskTracker::new();
    let limits = std::sync::Arc::new(limits);
    // Responses leave the fixed browser headers to `write_head`.
    let handler = handler.writing_fixed_headers();
    let mut incoming = Acceptor::new(listener, admission, Some(HTTP_REFUSAL));
    while let Some((tcp, peer, admitted)) = incoming.next(&stop).await {
        // Small responses (appends, live events) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        // A token of its own, cancelled with the server's: each connection waits on it between
        // requests, and waiting registers with the token's lock, which a token shared by every
        // connection made a lock both cores took on every request.
        let conn = Conn::new(
            tcp,
            handler.clone(),
            stop.child_token(),
            limits.clone(),
            live.clone(),
            tracker.clone(),
            Some(admitted),
        );
        tracker.spawn(async move {
            if let Err(e) = conn.run().await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(incoming);
    tracker.close();
    tracker.wait().await;
}

/// What a connection hands its requests to: the server's [`Handler`], or a recorder in the
/// differential test.
pub(crate) trait ConnService:
    Service<
        Request<Body>,
        Response = axum::response::Response,
        Error = std::convert::Infallible,
        Future: Send + Unpin + 'static,
    > + Clone
    + Send
    + Sync
    + 'static
{
    /// Serves a connection that began with the HTTP/2 preface; `io` yields the bytes read
    /// so far first.
    fn serve_h2(
        self,
        io: Prefixed,
        limits: &EdgeLimits,
        stop: &CancellationToken,
    ) -> impl Future<Output = io::Result<()>> + Send;

    /// Header lines (each ending in CRLF) `write_head` adds to every response of the service;
    /// without `cors`, those a stored append's answer to a request without `Origin` carries.
    fn fixed_head(&self, cors: bool) -> &[u8];

    /// Answers a plain append parsed without a header map ([`AppendHead`]), whose body has
    /// been read: at once when nothing is left to wait for, else with what to wait for.
    fn append(&self, head: &AppendHead, body: Bytes) -> AppendStep;
}

impl ConnService for Handler {
    async fn serve_h2(
        self,
        io: Prefixed,
        limits: &EdgeLimits,
        stop: &CancellationToken,
    ) -> io::Result<()> {
        // hyper writes the head from the header map: the responses must carry them all.
        let handler = Handler {
            writer_adds_fixed: false,
            ..self
        };
        super::edge::serve_hyper(io, handler, limits, stop)
            .await
            .map_err(io::Error::other)
    }

    fn fixed_head(&self, cors: bool) -> &[u8] {
        self.fixed_head(cors)
    }

    fn append(&self, head: &AppendHead, body: Bytes) -> AppendStep {
        self.append_raw(head.raw(), body)
    }
}

struct Conn<S = Handler> {
    tcp: TcpStream,
    /// Bytes read and not yet consumed; empty (no allocation) between requests.
    buf: BytesMut,
    handler: S,
    stop: CancellationToken,
    /// Body size and timeouts, shared by every connection of the listener.
    limits: std::sync::Arc<EdgeLimits>,
    /// The client sent EOF (or we stopped reading); nothing more will be read.
    read_closed: bool,
    /// Where streamed responses go (see [`Conn::stream_on`]).
    live: Option<Handle>,
    tracker: TaskTracker,
    /// This connection's place under `DS_SERVER__MAX_CONNECTIONS`, given back when it ends.
    _admitted: Option<Admitted>,
    /// The timer of the waits for a request (idle and head timeouts), one for the connection's
    /// life and moved forward for each wait: moving a registered timer later is an atomic
    /// store, while a new timer per wait cost a timer-wheel insertion and removal (a lock
    /// each) per request, and made every connection's future larger by a timer. Dropped while
    /// a live response waits, like the read buffer.
    timer: Option<Pin<Box<tokio::time::Sleep>>>,
}

/// A request the connection loop refuses itself, before any handler sees it.
struct Refusal {
    status: StatusCode,
    message: String,
}

impl Refusal {
    fn new(status: StatusCode, message: impl Into<String>) -> Self {
        Refusal {
            status,
            message: message.into(),
        }
    }
    fn bad(message: impl Into<String>) -> Self {
        Refusal::new(StatusCode::BAD_REQUEST, message)
    }
}

enum ReadError {
    Io(io::Error),
    Refused(Refusal),
    /// The client closed the connection in the middle of a request.
    Truncated,
}

impl From<io::Error> for ReadError {
    fn from(e: io::Error) -> Self {
        ReadError::Io(e)
    }
}

impl From<Refusal> for ReadError {
    fn from(r: Refusal) -> Self {
        ReadError::Refused(r)
    }
}

/// What arrived at the start of a message.
enum Incoming {
    Request(Box<Head>),
    /// A plain append, parsed without a header map ([`AppendHead`]).
    Append(Box<AppendHead>),
    /// The client speaks HTTP/2 with prior knowledge.
    H2,
    /// The client closed the connection between requests, or the server is stopping.
    Done,
}

/// A parsed request head, owning its data (it never pins the read buffer).
struct Head {
    method: Method,
    uri: Uri,
    version: Version,
    headers: HeaderMap,
    /// Which of the fields the connection itself reads the head has (`HAS_*`), noted while
    /// parsing: most requests have few of them, and a lookup by name per field costs more.
    has: u8,
    /// The `Content-Length` fields, read while parsing (no lookup by name afterwards).
    content_length: ContentLength,
}

/// The head of a plain append: a POST whose target is a stream path (no query, only bytes
/// any URI parser takes as they are), framed by `Content-Length` or nothing, without
/// `Transfer-Encoding` or `Expect`. The handler reads only a few of its fields
/// ([`request::AppendFields`]), so they are found while parsing and kept as positions in the
/// head's bytes: no header map, URI or `http::Request` is built ([`super::RawAppend`]). Any
/// other request, and any append outside those bounds, takes the general path ([`Head`]).
///
/// httparse admits exactly the field names and values `HeaderName` and `HeaderValue` admit
/// (tokens; visible ASCII, tabs and obs-text), so skipping them refuses nothing the general
/// path would have refused.
pub(crate) struct AppendHead {
    head: Bytes,
    path: std::ops::Range<usize>,
    version: Version,
    content_length: ContentLength,
    /// A `Connection` field has the `close` token.
    close: bool,
    /// Per slot of [`request::AppendFields::from_slots`], the first value's position.
    fields: [Option<std::ops::Range<usize>>; request::APPEND_FIELD_COUNT],
    request_id: Option<std::ops::Range<usize>>,
    origin: Option<std::ops::Range<usize>>,
}

impl AppendHead {
    /// The stream path (checked to be ASCII while parsing).
    pub(crate) fn path(&self) -> &str {
        std::str::from_utf8(&self.head[self.path.clone()]).unwrap_or_default()
    }

    /// The append as the handler takes it.
    pub(crate) fn raw(&self) -> RawAppend<'_> {
        let at = |r: &Option<std::ops::Range<usize>>| r.clone().map(|r| &self.head[r]);
        RawAppend {
            path: self.path(),
            fields: request::AppendFields::from_slots(self.fields.each_ref().map(at)),
            request_id: self.request_id.clone().map(|r| self.head.slice(r)),
            origin: at(&self.origin),
        }
    }
}

/// What the head's `Content-Length` fields say, in the order they came.
#[derive(Clone, Debug, PartialEq)]
enum ContentLength {
    Absent,
    /// Every field holds this one number.
    Valid(u64),
    /// The first field that is not one decimal number (hyper refuses a list such as "5, 5").
    Malformed(Bytes),
    /// Two fields hold different numbers.
    Conflict,
}

impl ContentLength {
    fn add(&mut self, value: &[u8]) {
        *self = match (&*self, decimal(value)) {
            (ContentLength::Malformed(_) | ContentLength::Conflict, _) => return,
            (_, None) => ContentLength::Malformed(Bytes::copy_from_slice(value)),
            (ContentLength::Valid(l), Some(n)) if *l != n => ContentLength::Conflict,
            (_, Some(n)) => ContentLength::Valid(n),
        };
    }
}

const HAS_TRANSFER_ENCODING: u8 = 1;
const HAS_CONTENT_LENGTH: u8 = 2;
const HAS_CONNECTION: u8 = 4;
const HAS_EXPECT: u8 = 8;

/// What [`Conn::write_head`] left to do.
enum Written {
    /// The response is complete; whether the connection may carry another.
    Done(bool),
    /// The head is out; the body streams.
    Stream {
        body: Body,
        chunked: bool,
        keep: bool,
    },
}

enum Framing {
    None,
    Length(u64),
    Chunked,
}

impl<S: ConnService> Conn<S> {
    fn new(
        tcp: TcpStream,
        handler: S,
        stop: CancellationToken,
        limits: std::sync::Arc<EdgeLimits>,
        live: Option<Handle>,
        tracker: TaskTracker,
        admitted: Option<Admitted>,
    ) -> Self {
        Conn {
            tcp,
            buf: BytesMut::new(),
            handler,
            stop,
            limits,
            read_closed: false,
            live,
            tracker,
            _admitted: admitted,
            timer: None,
        }
    }

    async fn run(mut self) -> io::Result<()> {
        // When the last append was answered: the next idle wait counts from there.
        let mut answered_at = None;
        loop {
            let served = match self.read_head(answered_at.take()).await {
                // Boxed: requests come and go, while a live reader's connection spends its
                // life in `stream_body`; only that phase should size the connection's future.
                Ok(Incoming::Request(head)) => Box::pin(self.serve_request(head)).await,
                Ok(Incoming::Append(head)) => {
                    Box::pin(self.serve_append(head, &mut answered_at)).await
                }
                Ok(Incoming::Done) => return Ok(()),
                // Boxed: hyper's connection is large, and rare here.
                Ok(Incoming::H2) => return Box::pin(self.hand_to_h2()).await,
                Err(ReadError::Io(e)) => return Err(e),
                Err(ReadError::Truncated) => return Ok(()),
                Err(ReadError::Refused(r)) => return Box::pin(self.refuse(r)).await,
            };
            let keep = match served {
                Ok(Written::Done(keep)) => keep,
                Ok(Written::Stream {
                    body,
                    chunked,
                    keep,
                }) => {
                    // A stream may live for minutes: it holds no read buffer meanwhile.
                    self.release_buffer();
                    if let Some(live) = self.live.clone() {
                        return self.stream_on(&live, body, chunked);
                    }
                    self.stream_body(body, chunked).await? && keep
                }
                Err(ReadError::Io(e)) => return Err(e),
                Err(ReadError::Truncated) => return Ok(()),
                Err(ReadError::Refused(r)) => return Box::pin(self.refuse(r)).await,
            };
            if !keep {
                return Ok(());
            }
        }
    }

    /// Frees the read buffer if it holds nothing. A busy connection keeps its buffer between
    /// requests (allocating one per request costs more than the request's parsing); a
    /// connection about to wait for a long time gives it back.
    fn release_buffer(&mut self) {
        if self.buf.is_empty() {
            self.buf = BytesMut::new();
        }
    }

    /// After a request: a large body's bytes were read into the buffer (a `Content-Length`
    /// body is even a view of its allocation), so the connection must not keep them while it
    /// waits; what is left of the buffer (a pipelined request) moves to one of its size.
    fn shed_large_buffer(&mut self, large_body: bool) {
        if large_body || self.buf.capacity() > KEPT_BUFFER_BYTES {
            self.buf = if self.buf.is_empty() {
                BytesMut::new()
            } else {
                BytesMut::from(&self.buf[..])
            };
        }
    }

    /// Reads more bytes into the buffer; `Ok(0)` is EOF. Through `AsyncRead` rather than
    /// `readable` and `try_read_buf`: a read that fills less than the room it was given shows
    /// the socket drained, and tokio then waits for the next readiness event instead of
    /// trying a read that fails with `WouldBlock` (0.41 such reads per request at 64 writers
    /// before, by `strace -c`).
    async fn fill(&mut self) -> io::Result<usize> {
        fill(&mut self.tcp, &mut self.buf).await
    }

    /// Reads the next request's head. `answered_at`: when the previous request was answered,
    /// if the caller knows (a clock read costs about as much as a small append's parsing, and
    /// the idle timeout does not need the microseconds the answer's write took).
    async fn read_head(
        &mut self,
        mut answered_at: Option<std::time::Instant>,
    ) -> Result<Incoming, ReadError> {
        // Set when the head's first byte is in: the whole head must be in by then, however
        // it trickles.
        let mut deadline: Option<tokio::time::Instant> = None;
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        return Ok(Incoming::H2);
                    }
                } else if let Some(parsed) = parse_head(&mut self.buf, true)? {
                    return Ok(match parsed {
                        Parsed::Head(head) => Incoming::Request(Box::new(head)),
                        Parsed::Append(head) => Incoming::Append(Box::new(head)),
                    });
                }
                if self.buf.len() >= MAX_HEAD_BYTES {
                    return Err(Refusal::new(
                        StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                        format!("request head is larger than {MAX_HEAD_BYTES} bytes"),
                    )
                    .into());
                }
            }
            if self.read_closed {
                return if self.buf.is_empty() {
                    Ok(Incoming::Done)
                } else {
                    Err(ReadError::Truncated)
                };
            }
            // Idle between requests (nothing of a request yet): close at shutdown, and silently
            // after the idle timeout, since there is nothing to answer. A head begun must end
            // by its deadline: 408. `fill` may find stale readiness and wait again, so the
            // whole of it races the timer and the shutdown, not just its start.
            let idle = self.buf.is_empty();
            let at = if idle {
                answered_at
                    .take()
                    .map_or_else(tokio::time::Instant::now, tokio::time::Instant::from_std)
                    + self.limits.idle_timeout
            } else {
                *deadline.get_or_insert_with(|| {
                    tokio::time::Instant::now() + self.limits.header_read_timeout
                })
            };
            let mut timer = match self.timer.take() {
                Some(mut timer) => {
                    timer.as_mut().reset(at);
                    timer
                }
                None => Box::pin(tokio::time::sleep_until(at)),
            };
            // In this order: bytes that are in are read even if the timer is due too.
            let filled = tokio::select! {
                biased;
                n = fill(&mut self.tcp, &mut self.buf) => Some(n),
                () = timer.as_mut() => None,
                () = self.stop.cancelled(), if idle => None,
            };
            self.timer = Some(timer);
            let n = match filled {
                Some(n) => n?,
                None if idle => return Ok(Incoming::Done),
                None => {
                    let timeout = self.limits.header_read_timeout;
                    return Err(Refusal::new(
                        StatusCode::REQUEST_TIMEOUT,
                        format!(
                            "request head not complete within \
                             DS_SERVER__HEADER_READ_TIMEOUT ({timeout:?})"
                        ),
                    )
                    .into());
                }
            };
            if n == 0 {
                self.read_closed = true;
            }
        }
    }

    /// Serves one request up to its response head (and its body, when its size is known).
    async fn serve_request(&mut self, head: Box<Head>) -> Result<Written, ReadError> {
        let framing = framing(&head)?;
        let mut keep_alive = head.version == Version::HTTP_11
            && (head.has & HAS_CONNECTION == 0 || !has_close(&head.headers));
        let method = head.method.clone();
        let version = head.version;

        let too_large = matches!(framing, Framing::Length(n) if n > self.limits.max_body);
        // HTTP/1.0 clients do not know 100 Continue: RFC 9110 10.1.1 says to ignore their
        // expectation.
        if !too_large
            && version == Version::HTTP_11
            && !matches!(framing, Framing::None)
            && head.has & HAS_EXPECT != 0
            && head
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            // Boxed: a write's timer would otherwise be part of this future, which a long-poll
            // holds for its whole wait.
            Box::pin(write_all_vectored(
                &mut self.tcp,
                &mut [IoSlice::new(b"HTTP/1.1 100 Continue\r\n\r\n")],
                self.limits.idle_timeout,
            ))
            .await?;
        }
        let (body, complete) = match framing {
            Framing::None => (Bytes::new(), true),
            // The handler refuses it by its declared length; the body stays unread.
            Framing::Length(_) if too_large => (Bytes::new(), false),
            // Boxed, like the other phases that do not wait for long: a connection future is
            // as large as its largest phase, and live readers spend their life in the smallest.
            Framing::Length(n) => (Box::pin(self.read_exact_body(n as usize)).await?, true),
            Framing::Chunked => Box::pin(self.read_chunked_body()).await?,
        };
        if !complete {
            keep_alive = false;
        }
        let large_body = body.len() > KEPT_BUFFER_BYTES;

        let mut request = Request::new(Body::from(body));
        let Head {
            method: m,
            uri,
            version: v,
            headers,
            ..
        } = *head;
        *request.method_mut() = m;
        *request.uri_mut() = uri;
        *request.version_mut() = v;
        *request.headers_mut() = headers;
        // The handler boxes each request's future (an append's is large), so a connection
        // does not carry that size for its whole life.
        let mut call = self.handler.clone().call(request);
        // Most requests are answered in their first poll. A read that waits (a long-poll) may
        // wait for minutes: it holds no read buffer meanwhile. A write that waits is waiting
        // for a durable commit, a millisecond or so: it keeps the buffer, since freeing and
        // allocating it again for every durable append cost more CPU than the append's parsing.
        let response = match (&mut call).now_or_never() {
            Some(response) => response,
            None => {
                if method == Method::GET {
                    self.release_buffer();
                    self.timer = None;
                }
                let Some(response) = self.until_hangup(call).await? else {
                    return Ok(Written::Done(false));
                };
                response
            }
        };
        let response = match response {
            Ok(r) => r,
            Err(never) => match never {},
        };
        let written = Box::pin(self.write_head(response, &method, version, keep_alive)).await?;
        if !complete && matches!(written, Written::Done(_)) {
            Box::pin(self.linger()).await;
        }
        self.shed_large_buffer(large_body);
        Ok(written)
    }

    /// Serves a plain append: its body, the handler's answer, and (unless refused) a head
    /// written from the answer's lines, as [`Conn::write_head`] would write it from a
    /// `Response` holding them.
    async fn serve_append(
        &mut self,
        head: Box<AppendHead>,
        answered_at: &mut Option<std::time::Instant>,
    ) -> Result<Written, ReadError> {
        let framing = length_framing(&head.content_length)?;
        let version = head.version;
        let mut keep_alive = version == Version::HTTP_11 && !head.close;
        let (body, complete) = match framing {
            Framing::Length(n) if n > self.limits.max_body => (Bytes::new(), false),
            // A small append's body came with its head: no future for the reading of the rest
            // (its timer made this future a third larger).
            Framing::Length(n) if self.buf.len() >= n as usize => {
                (self.buf.split_to(n as usize).freeze(), true)
            }
            Framing::Length(n) => (Box::pin(self.read_exact_body(n as usize)).await?, true),
            Framing::None | Framing::Chunked => (Bytes::new(), true),
        };
        if !complete {
            keep_alive = false;
        }
        let large_body = body.len() > KEPT_BUFFER_BYTES;
        // Answered at once, or (boxed: memory mode never waits, and its appends should not
        // carry this wait's state) once storage is done; meanwhile the read buffer stays (see
        // `serve_request`).
        let step = self.handler.append(&head, body);
        let answered = match step {
            AppendStep::Answered(answered) => answered,
            AppendStep::Waiting(call) => match Box::pin(self.until_hangup(call)).await? {
                Some(answered) => answered,
                None => return Ok(Written::Done(false)),
            },
        };
        *answered_at = Some(answered.at);
        let written = match answered.answer {
            AppendAnswer::Response(response) => {
                Box::pin(self.write_head(response, &Method::POST, version, keep_alive)).await?
            }
            AppendAnswer::Reply(reply) => {
                let out = self.reply_head(reply, keep_alive, head.origin.is_some());
                write_all_vectored(
                    &mut self.tcp,
                    &mut [IoSlice::new(&out)],
                    self.limits.idle_timeout,
                )
                .await?;
                Written::Done(keep_alive)
            }
        };
        if !complete {
            Box::pin(self.linger()).await;
        }
        self.shed_large_buffer(large_body);
        Ok(written)
    }

    /// A stored append's response head, as [`Conn::write_head`] would write it from a
    /// `Response` holding the reply's lines.
    /// The CORS headers go only to a request with `Origin` ([`Handler::fixed_head`]).
    fn reply_head(&self, reply: AppendReply, keep_alive: bool, cors: bool) -> Vec<u8> {
        let mut out = Vec::with_capacity(1024);
        push_status_line(&mut out, reply.status());
        reply.push_lines(&mut out);
        out.extend_from_slice(self.handler.fixed_head(cors));
        date::push(&mut out);
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        // 200 (a producer's append) has an empty body; 204 has none.
        if reply.status() != StatusCode::NO_CONTENT {
            out.extend_from_slice(b"content-length: 0\r\n");
        }
        out.extend_from_slice(b"\r\n");
        out
    }

    /// Waits for `fut` while watching the socket: bytes that arrive (a pipelined request) are
    /// kept for later; EOF or a reset means the client is gone, and `None` is returned.
    async fn until_hangup<F: Future>(&mut self, fut: F) -> io::Result<Option<F::Output>> {
        tokio::pin!(fut);
        loop {
            let watch = !self.read_closed && self.buf.len() < MAX_HEAD_BYTES;
            tokio::select! {
                out = &mut fut => return Ok(Some(out)),
                ready = self.tcp.readable(), if watch => {
                    ready?;
                    let mut scratch = [0u8; 512];
                    match self.tcp.try_read(&mut scratch) {
                        Ok(0) => return Ok(None),
                        Ok(n) => self.buf.extend_from_slice(&scratch[..n]),
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                        Err(e) if is_disconnect(&e) => return Ok(None),
                        Err(e) => return Err(e),
                    }
                }
            }
        }
    }

    /// Reads more of a body that has begun: EOF here is a truncated message, and a client that
    /// sends nothing for `body_read_timeout` gets 408.
    async fn fill_more(&mut self) -> Result<(), ReadError> {
        if self.read_closed {
            return Err(ReadError::Truncated);
        }
        let timeout = self.limits.body_read_timeout;
        let n = match tokio::time::timeout(timeout, self.fill()).await {
            Ok(n) => n?,
            Err(_) => {
                return Err(Refusal::new(
                    StatusCode::REQUEST_TIMEOUT,
                    format!(
                        "no bytes of the request body for DS_SERVER__BODY_READ_TIMEOUT ({timeout:?})"
                    ),
                )
                .into());
            }
        };
        if n == 0 {
            self.read_closed = true;
            return Err(ReadError::Truncated);
        }
        Ok(())
    }

    async fn read_exact_body(&mut self, n: usize) -> Result<Bytes, ReadError> {
        while self.buf.len() < n {
            self.buf.reserve(n - self.buf.len());
            self.fill_more().await?;
        }
        Ok(self.buf.split_to(n).freeze())
    }

    /// The length of the line at the start of the buffer, once its CRLF is in (the line is
    /// `buf[..len]`, its CRLF the two bytes after). Lines end with CRLF only: a bare LF, or a
    /// CR not followed by LF, is refused, since a front end that ends lines differently would
    /// see other messages in the same bytes (request smuggling). At most `limit` bytes.
    async fn line_len(
        &mut self,
        limit: usize,
        too_long: fn() -> Refusal,
    ) -> Result<usize, ReadError> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..]
                .iter()
                .position(|&b| b == b'\r' || b == b'\n')
            {
                let at = searched + i;
                if at > limit {
                    return Err(too_long().into());
                }
                if self.buf[at] == b'\n' {
                    return Err(Refusal::bad(
                        "chunked body: bare LF ending a line (lines end with CRLF)",
                    )
                    .into());
                }
                match self.buf.get(at + 1) {
                    Some(b'\n') => return Ok(at),
                    Some(_) => {
                        return Err(Refusal::bad(
                            "chunked body: CR not followed by LF (lines end with CRLF)",
                        )
                        .into());
                    }
                    // The CR is the last byte in: look at it again with more.
                    None => searched = at,
                }
            } else {
                searched = self.buf.len();
                if searched > limit {
                    return Err(too_long().into());
                }
            }
            self.fill_more().await?;
        }
    }

    /// Decodes a chunked body. Past `max_body` it stops reading and returns `max_body + 1`
    /// bytes with `complete = false`, so the handler answers 413 and the connection closes.
    async fn read_chunked_body(&mut self) -> Result<(Bytes, bool), ReadError> {
        let mut body = BytesMut::new();
        let cap = self.limits.max_body.saturating_add(1);
        let mut extension_bytes = 0usize;
        loop {
            let len = self
                .line_len(MAX_CHUNK_LINE, || {
                    Refusal::bad(format!(
                        "chunked body: a chunk-size line is longer than {MAX_CHUNK_LINE} bytes"
                    ))
                })
                .await?;
            let (size, extensions) = parse_chunk_line(&self.buf[..len])?;
            self.buf.advance(len + 2);
            extension_bytes += extensions;
            if extension_bytes >= MAX_CHUNK_EXTENSION_BYTES {
                return Err(Refusal::bad(format!(
                    "chunked body: chunk extensions reach {MAX_CHUNK_EXTENSION_BYTES} bytes"
                ))
                .into());
            }
            if size == 0 {
                Box::pin(self.read_trailers()).await?;
                return Ok((body.freeze(), true));
            }
            let room = cap - body.len() as u64;
            let take = size.min(room) as usize;
            // Moved out of the read buffer as it comes, so the buffer stays small.
            let mut left = take;
            while left > 0 {
                if self.buf.is_empty() {
                    self.fill_more().await?;
                }
                let n = left.min(self.buf.len());
                body.extend_from_slice(&self.buf[..n]);
                self.buf.advance(n);
                left -= n;
            }
            if size > room {
                return Ok((body.freeze(), false));
            }
            while self.buf.len() < 2 {
                self.fill_more().await?;
            }
            if &self.buf[..2] != b"\r\n" {
                return Err(
                    Refusal::bad("chunked body: chunk data is not followed by CRLF").into(),
                );
            }
            self.buf.advance(2);
        }
    }

    /// Reads the trailer section after the last chunk, through its final CRLF, and checks it
    /// as header fields; the fields themselves are dropped (no handler reads trailers).
    async fn read_trailers(&mut self) -> Result<(), ReadError> {
        let too_large = || {
            Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("chunked body: trailer section reaches {MAX_TRAILER_BYTES} bytes"),
            )
        };
        // Kept only when there are trailers, for the parser.
        let mut section: Option<BytesMut> = None;
        let mut count = 0usize;
        loop {
            let used = section.as_ref().map_or(0, BytesMut::len);
            let len = self
                .line_len(MAX_TRAILER_BYTES.saturating_sub(used + 2), too_large)
                .await?;
            if len == 0 {
                self.buf.advance(2);
                let Some(mut section) = section else {
                    return Ok(());
                };
                section.extend_from_slice(b"\r\n");
                if section.len() >= MAX_TRAILER_BYTES {
                    return Err(too_large().into());
                }
                return check_trailers(&section).map_err(Into::into);
            }
            count += 1;
            if count > MAX_HEADERS {
                return Err(Refusal::new(
                    StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                    format!("chunked body: more than {MAX_HEADERS} trailer fields"),
                )
                .into());
            }
            let section = section.get_or_insert_with(BytesMut::new);
            section.extend_from_slice(&self.buf[..len + 2]);
            self.buf.advance(len + 2);
            if section.len() >= MAX_TRAILER_BYTES {
                return Err(too_large().into());
            }
        }
    }

    /// Writes the response head, and the body when its size is known; a body of unknown size
    /// (SSE) is returned for [`Conn::stream_body`].
    async fn write_head(
        &mut self,
        response: axum::response::Response,
        method: &Method,
        version: Version,
        keep_alive: bool,
    ) -> io::Result<Written> {
        let (parts, mut body) = response.into_parts();
        let status = parts.status;
        let bodiless = *method == Method::HEAD
            || status.is_informational()
            || status == StatusCode::NO_CONTENT
            || status == StatusCode::NOT_MODIFIED;
        let exact = HttpBody::size_hint(&body).exact();
        let chunked = !bodiless && exact.is_none() && version == Version::HTTP_11;
        let streamed = !bodiless && exact.is_none();
        // An HTTP/1.0 stream of unknown length ends when the connection closes, and so does one
        // that moves to the live runtime.
        let keep_alive = keep_alive && !(streamed && (!chunked || self.live.is_some()));

        // A protocol response head with the CORS and security headers is 500-600 bytes.
        let mut out = Vec::with_capacity(1024);
        push_status_line(&mut out, status);
        let mut has_length = false;
        for (name, value) in &parts.headers {
            if name == header::TRANSFER_ENCODING || name == header::CONNECTION {
                continue;
            }
            if name == header::CONTENT_LENGTH {
                if !bodiless && exact.is_none() {
                    continue;
                }
                has_length = true;
            }
            out.extend_from_slice(name.as_str().as_bytes());
            out.extend_from_slice(b": ");
            out.extend_from_slice(value.as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        let cors = parts.extensions.get::<super::WithoutCors>().is_none();
        out.extend_from_slice(self.handler.fixed_head(cors));
        date::push(&mut out);
        if !keep_alive {
            out.extend_from_slice(b"connection: close\r\n");
        }
        if chunked {
            out.extend_from_slice(b"transfer-encoding: chunked\r\n");
        } else if !bodiless
            && !has_length
            && let Some(n) = exact
        {
            out.extend_from_slice(b"content-length: ");
            out.extend_from_slice(n.to_string().as_bytes());
            out.extend_from_slice(b"\r\n");
        }
        out.extend_from_slice(b"\r\n");

        if bodiless {
            write_all_vectored(
                &mut self.tcp,
                &mut [IoSlice::new(&out)],
                self.limits.idle_timeout,
            )
            .await?;
            return Ok(Written::Done(keep_alive));
        }
        if exact.is_some() {
            // Usually one frame, ready at once; a catch-up read of many records is many frames,
            // all ready at once: they go out in few `writev`s of up to `MAX_WRITE_FRAMES`
            // frames, not a system call (or a copy) each. Small frames that fit beside the head
            // are copied into it.
            let mut frames: Vec<Bytes> = Vec::new();
            loop {
                let frame = match body.frame().now_or_never() {
                    Some(frame) => frame,
                    None => {
                        self.write_frames(&mut out, &mut frames).await?;
                        body.frame().await
                    }
                };
                let Some(frame) = frame else { break };
                let Ok(frame) = frame else {
                    return Ok(Written::Done(false));
                };
                let Ok(data) = frame.into_data() else {
                    continue;
                };
                if data.is_empty() {
                    continue;
                }
                if frames.is_empty() && out.len() + data.len() <= COALESCE_BYTES {
                    out.extend_from_slice(&data);
                } else {
                    frames.push(data);
                    if frames.len() >= MAX_WRITE_FRAMES {
                        self.write_frames(&mut out, &mut frames).await?;
                    }
                }
            }
            self.write_frames(&mut out, &mut frames).await?;
            return Ok(Written::Done(keep_alive));
        }
        // A stream (SSE): the head goes out at once.
        write_all_vectored(
            &mut self.tcp,
            &mut [IoSlice::new(&out)],
            self.limits.idle_timeout,
        )
        .await?;
        Ok(Written::Stream {
            body,
            chunked,
            keep: keep_alive,
        })
    }

    /// Writes `out` (if not empty) and then `frames` in one vectored write, and empties both.
    async fn write_frames(&mut self, out: &mut Vec<u8>, frames: &mut Vec<Bytes>) -> io::Result<()> {
        if out.is_empty() && frames.is_empty() {
            return Ok(());
        }
        let mut slices: Vec<IoSlice<'_>> = Vec::with_capacity(frames.len() + 1);
        if !out.is_empty() {
            slices.push(IoSlice::new(out));
        }
        slices.extend(frames.iter().map(|f| IoSlice::new(f)));
        write_all_vectored(&mut self.tcp, &mut slices, self.limits.idle_timeout).await?;
        drop(slices);
        out.clear();
        frames.clear();
        Ok(())
    }

    /// Moves the connection, for the rest of its life, to the live runtime and streams the body
    /// there. Thousands of SSE readers woken by one append are thousands of tasks; on the
    /// runtime that serves requests they would queue the next append (and, in durable modes,
    /// its commit's completion) behind all of their writes, and a slower append makes readers
    /// coalesce less, which makes the next append slower still. On a runtime of their own the
    /// OS shares the cores between the two, and a write never waits for a pass over every
    /// reader. The response said `Connection: close`: the connection ends with the stream.
    fn stream_on(self, live: &Handle, body: Body, chunked: bool) -> io::Result<()> {
        let tcp = {
            // Registers the socket with the live runtime's I/O driver, here rather than in the
            // task, so that the task holds one connection and not its parts as well.
            let _live = live.enter();
            TcpStream::from_std(self.tcp.into_std()?)?
        };
        let tracker = self.tracker.clone();
        let mut conn = Conn {
            tcp,
            live: None,
            timer: None,
            ..self
        };
        tracker.spawn_on(
            async move {
                if let Ok(true) = conn.stream_body(body, chunked).await {
                    let _ = conn.tcp.shutdown().await;
                }
            },
            live,
        );
        Ok(())
    }

    /// Writes a body of unknown length frame by frame as it comes; `Ok(false)` when the client
    /// went away or the body failed. This is where an SSE reader spends its life, so this
    /// future holds nothing but the body.
    async fn stream_body(&mut self, mut body: Body, chunked: bool) -> io::Result<bool> {
        loop {
            let Some(frame) = self.until_hangup(body.frame()).await? else {
                return Ok(false);
            };
            match frame {
                None => break,
                Some(Err(e)) => {
                    tracing::debug!(error = %e, "response body failed; closing the connection");
                    return Ok(false);
                }
                Some(Ok(frame)) => {
                    let Ok(data) = frame.into_data() else {
                        continue;
                    };
                    if data.is_empty() {
                        continue;
                    }
                    if chunked {
                        let mut size = [0u8; 18];
                        let size = chunk_header(&mut size, data.len());
                        write_all_vectored(
                            &mut self.tcp,
                            &mut [
                                IoSlice::new(size),
                                IoSlice::new(&data),
                                IoSlice::new(b"\r\n"),
                            ],
                            self.limits.idle_timeout,
                        )
                        .await?;
                    } else {
                        write_all_vectored(
                            &mut self.tcp,
                            &mut [IoSlice::new(&data)],
                            self.limits.idle_timeout,
                        )
                        .await?;
                    }
                }
            }
        }
        if chunked {
            write_all_vectored(
                &mut self.tcp,
                &mut [IoSlice::new(b"0\r\n\r\n")],
                self.limits.idle_timeout,
            )
            .await?;
        }
        Ok(true)
    }

    /// Answers a request the loop could not accept, then closes.
    async fn refuse(mut self, refusal: Refusal) -> io::Result<()> {
        let body = format!("{}\n", refusal.message);
        let mut out = Vec::with_capacity(256 + body.len());
        push_status_line(&mut out, refusal.status);
        out.extend_from_slice(b"content-type: text/plain; charset=utf-8\r\n");
        date::push(&mut out);
        out.extend_from_slice(b"connection: close\r\ncontent-length: ");
        out.extend_from_slice(body.len().to_string().as_bytes());
        out.extend_from_slice(b"\r\n\r\n");
        out.extend_from_slice(body.as_bytes());
        write_all_vectored(
            &mut self.tcp,
            &mut [IoSlice::new(&out)],
            self.limits.idle_timeout,
        )
        .await?;
        self.linger().await;
        Ok(())
    }

    /// Closes our side and drains (briefly, boundedly) what the client still sends, so the
    /// answer is not lost to a reset.
    async fn linger(&mut self) {
        let _ = self.tcp.shutdown().await;
        if self.read_closed {
            return;
        }
        let drain = async {
            // On the heap: an array here would be part of every connection's future.
            let mut scratch = vec![0u8; 4096];
            let mut total = 0;
            while total < LINGER_BYTES {
                if self.tcp.readable().await.is_err() {
                    return;
                }
                match self.tcp.try_read(&mut scratch) {
                    Ok(0) => return,
                    Ok(n) => total += n,
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                    Err(_) => return,
                }
            }
        };
        let _ = tokio::time::timeout(LINGER, drain).await;
    }

    /// Hands the connection, with what was already read, to hyper's HTTP/2 server.
    async fn hand_to_h2(mut self) -> io::Result<()> {
        let prefix = self.buf.split().freeze();
        let io = Prefixed {
            prefix,
            io: self.tcp,
        };
        self.handler.serve_h2(io, &self.limits, &self.stop).await
    }
}

/// [`Conn::fill`], on the parts it reads into (so that the connection's other fields stay free
/// to borrow meanwhile).
async fn fill(tcp: &mut TcpStream, buf: &mut BytesMut) -> io::Result<usize> {
    buf.reserve(READ_CHUNK);
    tokio::io::AsyncReadExt::read_buf(tcp, buf).await
}

fn push_status_line(out: &mut Vec<u8>, status: StatusCode) {
    out.extend_from_slice(b"HTTP/1.1 ");
    out.extend_from_slice(status.as_str().as_bytes());
    out.push(b' ');
    out.extend_from_slice(status.canonical_reason().unwrap_or("").as_bytes());
    out.extend_from_slice(b"\r\n");
}

fn is_disconnect(e: &io::Error) -> bool {
    matches!(
        e.kind(),
        io::ErrorKind::ConnectionReset
            | io::ErrorKind::ConnectionAborted
            | io::ErrorKind::BrokenPipe
    )
}

/// A complete request head.
enum Parsed {
    Head(Head),
    Append(AppendHead),
}

/// Parses a request head at the start of `buf`; consumes it when complete. With `appends`, a
/// plain append's head is parsed as an [`AppendHead`].
fn parse_head(buf: &mut BytesMut, appends: bool) -> Result<Option<Parsed>, Refusal> {
    // Uninitialised slots: httparse fills only as many as the head has fields, and zeroing a
    // hundred of them (3.2 KB) on every request was a measurable part of a small append's CPU.
    let mut fields =
        [const { std::mem::MaybeUninit::<httparse::Header<'_>>::uninit() }; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut []);
    let len = match req.parse_with_uninit_headers(buf, &mut fields) {
        Ok(httparse::Status::Complete(len)) => len,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(httparse::Error::TooManyHeaders) => {
            return Err(Refusal::new(
                StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
                format!("more than {MAX_HEADERS} header fields"),
            ));
        }
        Err(e) => return Err(Refusal::bad(format!("malformed request head: {e}"))),
    };
    // httparse (like hyper) takes a bare LF for a line end; a front end that does not would
    // read other header fields, or another message, out of the same bytes.
    if has_bare_lf(&buf[..len]) {
        return Err(Refusal::bad(
            "bare LF in the request head (lines end with CRLF)",
        ));
    }
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::bad("malformed request method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The target and header values become slices of the head's bytes rather than copies: one
    // allocation fewer per value, on every request. Positions first, while `req` borrows `buf`
    // (inline for the usual few dozen fields: no allocation and no zeroing).
    let base = buf.as_ptr() as usize;
    let at = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        start..start + part.len()
    };
    let target = at(req.path.unwrap_or("").as_bytes());
    let plain = appends && method == Method::POST && is_plain_target(req.path.unwrap_or(""));
    // A plain append's fields are found straight from httparse's list, with no list of our
    // own in between (copying one, 768 bytes, was a visible part of a small append's CPU).
    if plain
        && let Some(mut append) = plain_append(
            req.headers.iter().map(|f| (f.name.as_bytes(), f.value)),
            at,
            target.clone(),
            version,
        )
    {
        append.head = buf.split_to(len).freeze();
        return Ok(Some(Parsed::Append(append)));
    }
    let spans: smallvec::SmallVec<[(std::ops::Range<usize>, std::ops::Range<usize>); 24]> = req
        .headers
        .iter()
        .map(|field| (at(field.name.as_bytes()), at(field.value)))
        .collect();
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.clone())).map_err(|e| {
        let target = String::from_utf8_lossy(&head[target]);
        Refusal::bad(format!("malformed request target {target:?}: {e}"))
    })?;
    let mut headers = HeaderMap::with_capacity(spans.len());
    let mut has = 0;
    let mut content_length = ContentLength::Absent;
    for (name_at, value_at) in spans {
        let field = || String::from_utf8_lossy(&head[name_at.clone()]);
        let name = HeaderName::from_bytes(&head[name_at.clone()])
            .map_err(|_| Refusal::bad(format!("malformed header name {:?}", field())))?;
        let value = head.slice(value_at);
        if name == header::CONTENT_LENGTH {
            content_length.add(&value);
        }
        let value = HeaderValue::from_maybe_shared(value)
            .map_err(|_| Refusal::bad(format!("malformed value of header {}", field())))?;
        has |= if name == header::TRANSFER_ENCODING {
            HAS_TRANSFER_ENCODING
        } else if name == header::CONTENT_LENGTH {
            HAS_CONTENT_LENGTH
        } else if name == header::CONNECTION {
            HAS_CONNECTION
        } else if name == header::EXPECT {
            HAS_EXPECT
        } else {
            0
        };
        headers.append(name, value);
    }
    Ok(Some(Parsed::Head(Head {
        method,
        uri,
        version,
        headers,
        has,
        content_length,
    })))
}

/// The positions of a POST head's parts, when it is a plain append ([`AppendHead`]); `None`
/// sends it down the general path. `fields` are the head's (name, value) pairs, `at` a part's
/// position in the head; the caller sets the head's bytes.
fn plain_append<'h>(
    fields: impl Iterator<Item = (&'h [u8], &'h [u8])>,
    at: impl Fn(&[u8]) -> std::ops::Range<usize>,
    target: std::ops::Range<usize>,
    version: Version,
) -> Option<AppendHead> {
    let mut append = AppendHead {
        head: Bytes::new(),
        path: target,
        version,
        content_length: ContentLength::Absent,
        close: false,
        fields: Default::default(),
        request_id: None,
        origin: None,
    };
    for (name, value) in fields {
        let value_at = at(value);
        if let Some(slot) = request::AppendFields::slot(name) {
            append.fields[slot].get_or_insert_with(|| value_at.clone());
            if slot == request::CONTENT_LENGTH_SLOT {
                append.content_length.add(value);
            }
            continue;
        }
        // Names as text (`HeaderName::as_str` of a standard header is a lookup of its own),
        // by length first: most fields are none of these.
        let is = |known: &str| name.eq_ignore_ascii_case(known.as_bytes());
        match name.len() {
            6 if is("expect") => return None,
            17 if is("transfer-encoding") => return None,
            12 if is("x-request-id") => {
                append.request_id.get_or_insert_with(|| value_at.clone());
            }
            6 if is("origin") => {
                append.origin.get_or_insert_with(|| value_at.clone());
            }
            10 if is("connection") => append.close |= connection_has_close(value),
            _ => {}
        }
    }
    Some(append)
}

/// Whether a POST to `target` may be a plain append: a plain path that is neither a probe nor
/// a subscription's control path.
fn is_plain_target(target: &str) -> bool {
    is_plain_path(target.as_bytes())
        && target != "/healthz"
        && target != "/readyz"
        && !super::subscriptions::is_control_path(target)
}

/// A request target that is a path any URI parser takes as it is (`Uri::path` returns it
/// unchanged): it starts with `/` and holds only unreserved characters, sub-delimiters, `:`,
/// `@`, `/` and `%`. No query, no fragment, nothing to normalise.
fn is_plain_path(target: &[u8]) -> bool {
    const PLAIN: [bool; 256] = {
        let mut table = [false; 256];
        let extra = b"-._~!$&'()*+,;=:@/%";
        let mut b = 0;
        while b < 256 {
            let c = b as u8;
            table[b] = c.is_ascii_alphanumeric();
            b += 1;
        }
        let mut i = 0;
        while i < extra.len() {
            table[extra[i] as usize] = true;
            i += 1;
        }
        table
    };
    target.first() == Some(&b'/')
        && target.len() <= u16::MAX as usize / 2
        && target.iter().all(|&b| PLAIN[b as usize])
}

/// Whether a `Connection` field's value has the `close` token.
fn connection_has_close(value: &[u8]) -> bool {
    request::visible_text(value)
        .is_some_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case("close")))
}

/// Whether `bytes` hold an LF not preceded by CR.
fn has_bare_lf(bytes: &[u8]) -> bool {
    // Every byte pair, without an early exit, so that the compiler vectorises the scan: a head
    // is a few hundred bytes, where memchr's set-up per line end cost more than the scan.
    let rest = bytes.get(1..).unwrap_or_default();
    bytes.first() == Some(&b'\n')
        || bytes.iter().zip(rest).fold(false, |bare, (&before, &b)| {
            bare | ((b == b'\n') & (before != b'\r'))
        })
}

/// How the request body is delimited (RFC 9112 section 6.3).
fn framing(head: &Head) -> Result<Framing, Refusal> {
    if head.has & (HAS_TRANSFER_ENCODING | HAS_CONTENT_LENGTH) == 0 {
        return Ok(Framing::None);
    }
    if head.has & HAS_TRANSFER_ENCODING != 0 {
        if head.has & HAS_CONTENT_LENGTH != 0 {
            return Err(Refusal::bad(
                "request has both Transfer-Encoding and Content-Length",
            ));
        }
        if head.version != Version::HTTP_11 {
            return Err(Refusal::bad("Transfer-Encoding requires HTTP/1.1"));
        }
        // An iterator, not collected: a vector here would be an allocation per request.
        let te = head.headers.get_all(header::TRANSFER_ENCODING);
        return transfer_codings(&te).map(|()| Framing::Chunked);
    }
    length_framing(&head.content_length)
}

/// How a body without `Transfer-Encoding` is delimited: by its `Content-Length` fields.
fn length_framing(content_length: &ContentLength) -> Result<Framing, Refusal> {
    match content_length {
        ContentLength::Absent | ContentLength::Valid(0) => Ok(Framing::None),
        ContentLength::Valid(n) => Ok(Framing::Length(*n)),
        ContentLength::Malformed(v) => Err(Refusal::bad(format!(
            "malformed Content-Length {:?}: one decimal number expected",
            String::from_utf8_lossy(v)
        ))),
        ContentLength::Conflict => Err(Refusal::bad("conflicting Content-Length values")),
    }
}

/// Checks that `Transfer-Encoding` is `chunked` alone: the final coding must be chunked, or
/// nothing tells where the body ends (400, RFC 9112 6.3); chunked twice is malformed (400); any
/// other coding is one we do not decode (501), and storing encoded bytes as the data would be
/// wrong. Empty list elements are allowed (RFC 9110 5.6.1).
fn transfer_codings(te: &http::header::GetAll<'_, HeaderValue>) -> Result<(), Refusal> {
    let mut codings = te
        .iter()
        .flat_map(|v| v.as_bytes().split(|b| *b == b','))
        .map(<[u8]>::trim_ascii);
    let last = codings.next_back().unwrap_or_default();
    if !last.eq_ignore_ascii_case(b"chunked") {
        return Err(Refusal::bad(
            "the final Transfer-Encoding must be chunked: the body's end cannot be known",
        ));
    }
    match codings.find(|c| !c.is_empty()) {
        None => Ok(()),
        Some(coding) if coding.eq_ignore_ascii_case(b"chunked") => Err(Refusal::bad(
            "Transfer-Encoding lists chunked more than once",
        )),
        Some(coding) => Err(Refusal::new(
            StatusCode::NOT_IMPLEMENTED,
            format!(
                "Transfer-Encoding {:?} is not supported: send the body chunked, uncompressed",
                String::from_utf8_lossy(coding)
            ),
        )),
    }
}

/// A decimal number of digits only (no sign, no spaces), if it fits 64 bits.
fn decimal(bytes: &[u8]) -> Option<u64> {
    if bytes.is_empty() {
        return None;
    }
    bytes.iter().try_fold(0u64, |n, &b| {
        if b.is_ascii_digit() {
            n.checked_mul(10)?.checked_add(u64::from(b - b'0'))
        } else {
            None
        }
    })
}

/// Whether the `Connection` header lists `token`.
fn has_close(headers: &HeaderMap) -> bool {
    headers
        .get_all(header::CONNECTION)
        .iter()
        .any(|v| connection_has_close(v.as_bytes()))
}

/// A chunk-size line (without its CRLF): the size, and how many bytes of extensions follow
/// its first `;` (they count against `MAX_CHUNK_EXTENSION_BYTES`). The size is hex digits from
/// the first byte, ended by the line's end or by extensions (RFC 9112 7.1.1): nothing before
/// it, no whitespace after it unless extensions follow.
fn parse_chunk_line(line: &[u8]) -> Result<(u64, usize), Refusal> {
    let digits = line.iter().take_while(|b| b.is_ascii_hexdigit()).count();
    if digits == 0 {
        return Err(Refusal::bad(
            "chunked body: a chunk-size line must start with the size in hex digits",
        ));
    }
    let size = line[..digits]
        .iter()
        .try_fold(0u64, |n, &b| {
            let digit = char::from(b).to_digit(16).map(u64::from)?;
            n.checked_mul(16)?.checked_add(digit)
        })
        .ok_or_else(|| Refusal::bad("chunked body: chunk size does not fit 64 bits"))?;
    let rest = &line[digits..];
    if rest.is_empty() {
        return Ok((size, 0));
    }
    let blank = rest
        .iter()
        .take_while(|b| matches!(b, b' ' | b'\t'))
        .count();
    if rest.get(blank) != Some(&b';') {
        return Err(Refusal::bad(
            "chunked body: unexpected bytes after the chunk size (whitespace or other)",
        ));
    }
    let extensions = &rest[blank + 1..];
    if !chunk_extensions_are_valid(extensions) {
        return Err(Refusal::bad(
            "chunked body: malformed chunk extension (RFC 9112 7.1.1 grammar)",
        ));
    }
    Ok((size, extensions.len()))
}

/// `chunk-ext` after its first `;`: `BWS name [ BWS "=" BWS value ]`, then more of the same
/// each after `BWS ";"`; a name is a token, a value a token or a quoted string.
fn chunk_extensions_are_valid(ext: &[u8]) -> bool {
    let blank = |i: usize| {
        i + ext[i..]
            .iter()
            .take_while(|b| matches!(b, b' ' | b'\t'))
            .count()
    };
    let token = |i: usize| i + ext[i..].iter().take_while(|b| is_tchar(**b)).count();
    let mut i = 0;
    loop {
        i = blank(i);
        let end = token(i);
        if end == i {
            return false;
        }
        i = blank(end);
        if ext.get(i) == Some(&b'=') {
            i = blank(i + 1);
            let end = if ext.get(i) == Some(&b'"') {
                match quoted_string_end(ext, i) {
                    Some(end) => end,
                    None => return false,
                }
            } else {
                token(i)
            };
            if end == i {
                return false;
            }
            i = blank(end);
        }
        match ext.get(i) {
            None => return true,
            Some(b';') => i += 1,
            Some(_) => return false,
        }
    }
}

/// RFC 9110 5.6.2 `tchar`.
fn is_tchar(b: u8) -> bool {
    b.is_ascii_alphanumeric() || b"!#$%&'*+-.^_`|~".contains(&b)
}

/// The index just past the quoted string that opens at `ext[start]` (RFC 9110 5.6.4).
fn quoted_string_end(ext: &[u8], start: usize) -> Option<usize> {
    let mut i = start + 1;
    loop {
        match *ext.get(i)? {
            b'"' => return Some(i + 1),
            b'\\' => {
                let quoted = *ext.get(i + 1)?;
                if !(quoted == b'\t'
                    || quoted == b' '
                    || quoted.is_ascii_graphic()
                    || quoted >= 0x80)
                {
                    return None;
                }
                i += 2;
            }
            b => {
                if !(b == b'\t' || b == b' ' || b.is_ascii_graphic() || b >= 0x80) {
                    return None;
                }
                i += 1;
            }
        }
    }
}

/// Checks a trailer section (its lines and the final CRLF) as header fields, as hyper does.
fn check_trailers(section: &[u8]) -> Result<(), Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    match httparse::parse_headers(section, &mut fields) {
        Ok(httparse::Status::Complete((_, fields))) => {
            for field in fields {
                if HeaderName::from_bytes(field.name.as_bytes()).is_err()
                    || HeaderValue::from_bytes(field.value).is_err()
                {
                    return Err(Refusal::bad(format!(
                        "chunked body: malformed trailer field {:?}",
                        field.name
                    )));
                }
            }
            Ok(())
        }
        Ok(httparse::Status::Partial) => {
            Err(Refusal::bad("chunked body: malformed trailer section"))
        }
        Err(e) => Err(Refusal::bad(format!(
            "chunked body: malformed trailer field: {e}"
        ))),
    }
}

/// `{len:x}\r\n` in `buf`, without allocating.
fn chunk_header(buf: &mut [u8; 18], len: usize) -> &[u8] {
    const HEX: &[u8; 16] = b"0123456789abcdef";
    let mut i = 16;
    let mut n = len;
    loop {
        i -= 1;
        buf[i] = HEX[n & 0xf];
        n >>= 4;
        if n == 0 {
            break;
        }
    }
    buf[16] = b'\r';
    buf[17] = b'\n';
    &buf[i..]
}

/// Writes all of `slices`. A client that takes none of it for `stall` (it stopped reading:
/// the socket's buffer stays full) fails the write with `TimedOut`, which ends the connection,
/// so a reader that never reads cannot hold one forever. A slow reader that keeps taking bytes
/// is never cut.
async fn write_all_vectored(
    tcp: &mut TcpStream,
    mut slices: &mut [IoSlice<'_>],
    stall: Duration,
) -> io::Result<()> {
    while !slices.is_empty() {
        // Written at once when the socket's buffer has room (almost always); only a full
        // buffer is waited for, under the timer, so a write costs no timer. One buffer (a
        // small append's answer) goes by send(2), which the kernel takes straight to the
        // socket, where writev(2) first goes through the file layer and imports the vector.
        let written = match slices {
            [one] => tcp.try_write(one),
            _ => tcp.try_write_vectored(slices),
        };
        let n = match written {
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                // Polled readiness and a boxed timer: `writable()`'s waiter and a timer inline
                // would make this future, which every live reader holds, 250 bytes larger.
                let stalled = Box::pin(tokio::time::sleep(stall));
                let ready = std::future::poll_fn(|cx| tcp.poll_write_ready(cx));
                tokio::select! {
                    ready = ready => ready?,
                    () = stalled => {
                        return Err(io::Error::new(
                            io::ErrorKind::TimedOut,
                            "the client stopped reading",
                        ));
                    }
                }
                continue;
            }
            Err(e) => return Err(e),
        };
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The `Date` header. A clock read costs about as much as parsing a small append's head
/// (~90 ns on a VM's TSC clock), so responses do not read the clock: a thread of its own
/// stores the current second once a second, just after the second begins, and each thread
/// formats the header once per second it sees.
mod date {
    use std::cell::RefCell;
    use std::sync::Once;
    use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
    use std::time::{Duration, SystemTime, UNIX_EPOCH};

    /// Seconds since the epoch, as of the ticker's last tick.
    static SECS: AtomicU64 = AtomicU64::new(0);
    /// The ticker could not start: read the clock per response instead.
    static NO_TICKER: AtomicBool = AtomicBool::new(false);
    static START: Once = Once::new();

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    fn now() -> Duration {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .unwrap_or_default()
    }

    fn start() {
        SECS.store(now().as_secs(), Ordering::Relaxed);
        let ticker = std::thread::Builder::new()
            .name("ds-date".into())
            .stack_size(64 * 1024)
            .spawn(|| {
                loop {
                    // Wake 1 ms into the next second (a sleep never ends early).
                    let into = now().subsec_nanos();
                    let left = 1_000_000_000 - u64::from(into) + 1_000_000;
                    std::thread::sleep(Duration::from_nanos(left));
                    SECS.store(now().as_secs(), Ordering::Relaxed);
                }
            });
        if let Err(e) = ticker {
            tracing::warn!(error = %e, "no Date ticker thread: reading the clock per response");
            NO_TICKER.store(true, Ordering::Relaxed);
        }
    }

    /// The current second, as the `Date` header shows it.
    fn secs() -> u64 {
        START.call_once(start);
        if NO_TICKER.load(Ordering::Relaxed) {
            now().as_secs()
        } else {
            SECS.load(Ordering::Relaxed)
        }
    }

    pub fn push(out: &mut Vec<u8>) {
        let secs = secs();
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                let at = UNIX_EPOCH + Duration::from_secs(secs);
                *c = (secs, httpdate::fmt_http_date(at));
            }
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(c.1.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
    }

    #[cfg(test)]
    mod tests {
        #[test]
        fn the_date_is_the_current_second() {
            let mut out = Vec::new();
            super::push(&mut out);
            let line = String::from_utf8(out).expect("ascii");
            let value = line
                .strip_prefix("date: ")
                .and_then(|l| l.strip_suffix("\r\n"))
                .expect("a date line");
            let shown = httpdate::parse_http_date(value).expect("an HTTP date");
            let now = std::time::SystemTime::now();
            let behind = now.duration_since(shown).expect("not in the future");
            // The ticker's second, at most one tick behind (plus a busy machine's delay).
            assert!(
                behind < std::time::Duration::from_secs(3),
                "{behind:?} behind"
            );
            // It moves on with the next second (waited for with a deadline).
            let line = line.into_bytes();
            let deadline = now + std::time::Duration::from_secs(5);
            loop {
                let mut later = Vec::new();
                super::push(&mut later);
                if later != line {
                    break;
                }
                assert!(
                    std::time::SystemTime::now() < deadline,
                    "the Date header did not move on"
                );
                std::thread::sleep(std::time::Duration::from_millis(50));
            }
        }
    }
}

/// An I/O object that yields `prefix` before reading from `io`.
pub(crate) struct Prefixed {
    prefix: Bytes,
    io: TcpStream,
}

impl AsyncRead for Prefixed {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        if !self.prefix.is_empty() {
            let n = self.prefix.len().min(buf.remaining());
            buf.put_slice(&self.prefix[..n]);
            self.prefix.advance(n);
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut self.io).poll_read(cx, buf)
    }
}

impl AsyncWrite for Prefixed {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }
    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }
    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }
    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod differential;

#[cfg(test)]
mod tests {
    use super::*;

    fn head_of(raw: &str) -> Result<Option<Head>, Refusal> {
        let mut buf = BytesMut::from(raw.as_bytes());
        general_head(&mut buf)
    }

    fn head_of_buf(buf: &mut BytesMut) -> Option<Head> {
        general_head(buf).ok().flatten()
    }

    fn general_head(buf: &mut BytesMut) -> Result<Option<Head>, Refusal> {
        parse_head(buf, false).map(|parsed| {
            parsed.map(|parsed| match parsed {
                Parsed::Head(head) => head,
                Parsed::Append(_) => unreachable!("parsed without appends"),
            })
        })
    }

    #[test]
    fn partial_heads_wait_and_complete_heads_are_consumed() {
        assert!(
            head_of("GET /a HTTP/1.1\r\nHost: x\r\n")
                .ok()
                .flatten()
                .is_none()
        );
        let mut buf = BytesMut::from(&b"GET /a?offset=-1 HTTP/1.1\r\nHost: x\r\n\r\nNEXT"[..]);
        let head = head_of_buf(&mut buf).expect("complete head");
        assert_eq!(head.method, Method::GET);
        assert_eq!(head.uri.path(), "/a");
        assert_eq!(head.uri.query(), Some("offset=-1"));
        assert_eq!(
            head.headers.get("host").map(|v| v.as_bytes()),
            Some(&b"x"[..])
        );
        assert_eq!(&buf[..], b"NEXT");
    }

    #[test]
    fn framing_rules() {
        let f = |raw: &str| {
            let head = head_of(raw).ok().flatten().expect("head");
            framing(&head).map(|f| match f {
                Framing::None => "none".to_owned(),
                Framing::Length(n) => format!("len {n}"),
                Framing::Chunked => "chunked".to_owned(),
            })
        };
        assert_eq!(f("POST / HTTP/1.1\r\n\r\n").ok().as_deref(), Some("none"));
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 12\r\n\r\n")
                .ok()
                .as_deref(),
            Some("len 12")
        );
        assert_eq!(
            f("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 5\r\n\r\n")
                .ok()
                .as_deref(),
            Some("len 5")
        );
        assert!(f("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: 99999999999999999999\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n").is_err());
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: , Chunked\r\n\r\n")
                .ok()
                .as_deref(),
            Some("chunked")
        );
        assert!(f("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, chunked\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked,\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").is_err());
        assert!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
                .is_err()
        );
        assert!(f("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    /// A connection of the real handler, accepted from a client that sends nothing (the client
    /// and the app are returned to live as long as it).
    async fn idle_conn(admitted: Option<Admitted>) -> (Conn, TcpStream, crate::App) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut config = crate::config::Config::default();
        config.server.port = 0;
        let app = crate::App::build(config).await.expect("app");
        let limits = EdgeLimits::from_config(&crate::config::Config::default());
        let conn = Conn::new(
            tcp,
            app.handler(),
            CancellationToken::new(),
            std::sync::Arc::new(limits),
            None,
            TaskTracker::new(),
            admitted,
        );
        (conn, client, app)
    }

    #[tokio::test]
    async fn a_connection_future_stays_small() {
        // Every idle live reader is one of these futures: its size is per-reader memory.
        let admission = Admission::new(1);
        let (conn, _client, _app) = idle_conn(admission.try_admit()).await;
        let run = conn.run();
        eprintln!("connection future: {} bytes", std::mem::size_of_val(&run));
        assert!(
            std::mem::size_of_val(&run) <= 1024,
            "{}",
            std::mem::size_of_val(&run)
        );
    }

    #[tokio::test]
    async fn a_plain_append_builds_no_large_future() {
        // Every small append moves its serving future into a box: the handler's part is not a
        // future unless it waits for storage (it was 1.6 KiB, the whole 2.4 KiB), nor is the
        // reading of a body that came with the head.
        let (mut conn, _client, _app) = idle_conn(None).await;
        let mut buf = BytesMut::from(
            &b"POST /v1/stream/a HTTP/1.1\r\ncontent-type: text/plain\r\ncontent-length: 1\r\n\r\n"
                [..],
        );
        let Ok(Some(Parsed::Append(head))) = parse_head(&mut buf, true) else {
            panic!("not parsed as a plain append");
        };
        let mut answered_at = None;
        let serving = conn.serve_append(Box::new(head), &mut answered_at);
        let size = std::mem::size_of_val(&serving);
        drop(serving);
        // 592 bytes when written.
        assert!(size <= 768, "serve_append's future is {size} bytes");
    }

    #[test]
    fn chunk_headers() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_header(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_header(&mut buf, 26), b"1a\r\n");
        assert_eq!(chunk_header(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn chunk_size_lines() {
        let size = |line: &[u8]| parse_chunk_line(line).ok().map(|(n, _)| n);
        assert_eq!(size(b"1a"), Some(26));
        assert_eq!(size(b"001A"), Some(26));
        assert_eq!(size(b"A;name=value"), Some(10));
        assert_eq!(size(b"A ; name = \"quoted \\\" value\" ;other"), Some(10));
        assert_eq!(parse_chunk_line(b"5;a=b").ok(), Some((5, 3)));
        assert_eq!(size(b"ffffffffffffffff"), Some(u64::MAX));
        for refused in [
            &b""[..],
            b"zz",
            b"10000000000000000",
            b" 5",
            b"5 ",
            b"5\t",
            b"\x0c5",
            b"5\x0c",
            b"5;",
            b"5;a=",
            b"5;a b",
            b"5;a=\"open",
            b"5;a=\"bad\x01\"",
            b"5;\x0c",
            b"0x5",
            b"-5",
            b"+5",
        ] {
            assert!(
                parse_chunk_line(refused).is_err(),
                "{}",
                String::from_utf8_lossy(refused)
            );
        }
    }

    #[test]
    fn trailer_sections_are_header_fields() {
        assert!(check_trailers(b"X-A: 1\r\nX-B: two\r\n\r\n").is_ok());
        assert!(check_trailers(b"X A: 1\r\n\r\n").is_err());
        assert!(check_trailers(b"no colon\r\n\r\n").is_err());
        assert!(check_trailers(b" folded: 1\r\n\r\n").is_err());
    }

    #[test]
    fn bare_line_feeds() {
        assert!(!has_bare_lf(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\nHost: x\r\n\r\n"));
        assert!(has_bare_lf(b"\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: x\r\n\n"));
        assert!(has_bare_lf(b"GET / HTTP/1.1\r\nHost: x\n\r\n"));
        assert!(!has_bare_lf(b""));
        assert!(!has_bare_lf(b"\r"));
        assert!(!has_bare_lf(b"\r\n"));
        assert!(head_of("GET / HTTP/1.1\r\nA: b\nContent-Length: 5\r\n\r\n").is_err());
    }

    #[test]
    fn only_plain_appends_skip_the_header_map() {
        let parsed = |raw: &str| {
            let mut buf = BytesMut::from(raw.as_bytes());
            match parse_head(&mut buf, true) {
                Ok(Some(Parsed::Append(head))) => Some(head),
                Ok(Some(Parsed::Head(_))) => None,
                _ => panic!("not a complete head: {raw:?}"),
            }
        };
        let head = parsed(
            "POST /v1/s-1_~!$&'()*+,;=:@%20 HTTP/1.1\r\nHost: x\r\nCONTENT-type: text/plain\r\n\
             Producer-Id: p\r\nx-request-id: r1\r\nOrigin: o\r\nContent-Length: 3\r\n\
             Content-Length: 3\r\nConnection: keep-alive\r\nConnection: Close\r\n\
             Content-Type: text/html\r\n\r\n",
        )
        .expect("a plain append");
        assert_eq!(head.path(), "/v1/s-1_~!$&'()*+,;=:@%20");
        assert_eq!(head.content_length, ContentLength::Valid(3));
        assert!(head.close);
        let raw = head.raw();
        assert_eq!(
            request::content_type(&raw.fields).ok().flatten().as_deref(),
            Some("text/plain"),
            "the first value, as a header map's get answers"
        );
        assert_eq!(raw.request_id.as_deref(), Some(&b"r1"[..]));
        assert_eq!(raw.origin, Some(&b"o"[..]));
        for general in [
            "POST /s?x=1 HTTP/1.1\r\n\r\n",
            "POST /s#f HTTP/1.1\r\n\r\n",
            "POST http://h/s HTTP/1.1\r\n\r\n",
            "POST * HTTP/1.1\r\n\r\n",
            "POST /s\"q HTTP/1.1\r\n\r\n",
            "POST /healthz HTTP/1.1\r\n\r\n",
            "POST /readyz HTTP/1.1\r\n\r\n",
            "POST /a/__ds/subscriptions HTTP/1.1\r\n\r\n",
            "POST /s HTTP/1.1\r\nTransfer-Encoding: chunked\r\n\r\n",
            "POST /s HTTP/1.1\r\nexpect: 100-continue\r\nContent-Length: 1\r\n\r\n",
            "PUT /s HTTP/1.1\r\n\r\n",
            "GET /s HTTP/1.1\r\n\r\n",
        ] {
            assert!(parsed(general).is_none(), "{general:?}");
        }
        assert!(parsed("POST /s HTTP/1.0\r\n\r\n").is_some_and(|h| h.version == Version::HTTP_10));
        assert_eq!(
            parsed("POST /s HTTP/1.1\r\nContent-Length: 1, 1\r\n\r\n").map(|h| h.content_length),
            Some(ContentLength::Malformed(Bytes::from_static(b"1, 1")))
        );
    }

    #[test]
    fn connection_tokens() {
        let head = head_of("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n")
            .ok()
            .flatten()
            .expect("head");
        assert!(has_close(&head.headers));
        let head = head_of("GET / HTTP/1.1\r\nConnection: keep-alive, upgrade\r\n\r\n")
            .ok()
            .flatten()
            .expect("head");
        assert!(!has_close(&head.headers));
        assert!(connection_has_close(b" close "));
        assert!(!connection_has_close(b"closed"));
    }
}
