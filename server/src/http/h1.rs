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
//! `Content-Length` and `chunked` request bodies (extensions and trailers skipped), a message
//! with both or with an unknown transfer coding refused with 400; `Expect: 100-continue`;
//! keep-alive and pipelining for HTTP/1.1 (`Connection: close` honoured), one request per
//! connection for HTTP/1.0; responses framed by `Content-Length` when the body's size is known
//! and by chunked encoding otherwise; no body for HEAD, 1xx, 204 and 304; a `Date` header.
//! A client that hangs up while its request is in progress (a long-poll, an SSE stream) is
//! noticed at once and its handler dropped. A connection that starts with the HTTP/2 preface
//! (h2c with prior knowledge) is handed to hyper's HTTP/2 server. TLS connections never come
//! here (see `tls.rs`).

use std::io::{self, IoSlice};
use std::pin::Pin;
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::{Body, HttpBody};
use bytes::{Buf, Bytes, BytesMut};
use futures::FutureExt;
use http::{HeaderMap, HeaderName, HeaderValue, Method, Request, StatusCode, Uri, Version, header};
use http_body_util::BodyExt;
use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::runtime::Handle;
use tokio_util::sync::CancellationToken;
use tokio_util::task::TaskTracker;
use tower::Service;

use super::Handler;

/// Largest request head (request line and headers) accepted; larger gets 431.
const MAX_HEAD_BYTES: usize = 64 * 1024;
/// Most header fields in one request; more gets 431.
const MAX_HEADERS: usize = 100;
/// Bytes asked of the socket per read while a head or body arrives.
const READ_CHUNK: usize = 4096;
/// Longest chunk-size line (size, extensions) or trailer line in a chunked body.
const MAX_CHUNK_LINE: usize = 4096;
/// A response body this small is written together with its head, in one write.
const COALESCE_BYTES: usize = 16 * 1024;
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
    max_body: u64,
    live: Option<Handle>,
) {
    let tracker = TaskTracker::new();
    loop {
        let (tcp, peer) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(x) => x,
                Err(e) => {
                    // Out of file descriptors and the like: keep serving the others.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = stop.cancelled() => break,
        };
        // Small responses (appends, live events) must not wait for Nagle.
        let _ = tcp.set_nodelay(true);
        let conn = Conn {
            tcp,
            buf: BytesMut::new(),
            handler: handler.clone(),
            stop: stop.clone(),
            max_body,
            read_closed: false,
            live: live.clone(),
            tracker: tracker.clone(),
        };
        tracker.spawn(async move {
            if let Err(e) = conn.run().await {
                tracing::debug!(%peer, error = %e, "connection ended with an error");
            }
        });
    }
    drop(listener);
    tracker.close();
    tracker.wait().await;
}

struct Conn {
    tcp: TcpStream,
    /// Bytes read and not yet consumed; empty (no allocation) between requests.
    buf: BytesMut,
    handler: Handler,
    stop: CancellationToken,
    max_body: u64,
    /// The client sent EOF (or we stopped reading); nothing more will be read.
    read_closed: bool,
    /// Where streamed responses go (see [`Conn::stream_on`]).
    live: Option<Handle>,
    tracker: TaskTracker,
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
}

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

impl Conn {
    async fn run(mut self) -> io::Result<()> {
        loop {
            let head = match self.read_head().await {
                Ok(Incoming::Request(head)) => head,
                Ok(Incoming::Done) => return Ok(()),
                // Boxed: hyper's connection is large, and rare here.
                Ok(Incoming::H2) => return Box::pin(self.hand_to_h2()).await,
                Err(ReadError::Io(e)) => return Err(e),
                Err(ReadError::Truncated) => return Ok(()),
                Err(ReadError::Refused(r)) => return Box::pin(self.refuse(r)).await,
            };
            // Boxed: requests come and go, while a live reader's connection spends its life
            // in `stream_body`; only that phase should size the connection's future.
            let keep = match Box::pin(self.serve_request(head)).await {
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

    /// Reads more bytes into the buffer; `Ok(0)` is EOF.
    async fn fill(&mut self) -> io::Result<usize> {
        loop {
            self.tcp.readable().await?;
            self.buf.reserve(READ_CHUNK);
            match self.tcp.try_read_buf(&mut self.buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
                Err(e) => return Err(e),
            }
        }
    }

    async fn read_head(&mut self) -> Result<Incoming, ReadError> {
        loop {
            if !self.buf.is_empty() {
                let n = self.buf.len().min(H2_PREFACE.len());
                if self.buf[..n] == H2_PREFACE[..n] {
                    if n == H2_PREFACE.len() {
                        return Ok(Incoming::H2);
                    }
                } else if let Some(head) = parse_head(&mut self.buf)? {
                    return Ok(Incoming::Request(Box::new(head)));
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
            let n = if self.buf.is_empty() {
                // Idle between requests: close at shutdown. `fill` may find stale readiness
                // and wait again, so the whole of it races the shutdown, not just its start.
                let stop = self.stop.clone();
                tokio::select! {
                    n = self.fill() => n?,
                    () = stop.cancelled() => return Ok(Incoming::Done),
                }
            } else {
                self.fill().await?
            };
            if n == 0 {
                self.read_closed = true;
            }
        }
    }

    /// Serves one request up to its response head (and its body, when its size is known).
    async fn serve_request(&mut self, head: Box<Head>) -> Result<Written, ReadError> {
        let framing = framing(&head)?;
        let mut keep_alive = head.version == Version::HTTP_11 && !has_token(&head.headers, "close");
        let method = head.method.clone();
        let version = head.version;

        let too_large = matches!(framing, Framing::Length(n) if n > self.max_body);
        if !too_large
            && !matches!(framing, Framing::None)
            && head
                .headers
                .get(header::EXPECT)
                .is_some_and(|v| v.as_bytes().eq_ignore_ascii_case(b"100-continue"))
        {
            self.tcp.write_all(b"HTTP/1.1 100 Continue\r\n\r\n").await?;
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

        let mut request = Request::new(Body::from(body));
        let Head {
            method: m,
            uri,
            version: v,
            headers,
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
        Ok(written)
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

    /// Reads more of a message that has begun: EOF here is a truncated message.
    async fn fill_more(&mut self) -> Result<(), ReadError> {
        if self.read_closed || self.fill().await? == 0 {
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

    /// Reads one CRLF-terminated line (without the CRLF) of at most `MAX_CHUNK_LINE` bytes.
    async fn read_line(&mut self) -> Result<Bytes, ReadError> {
        let mut searched = 0;
        loop {
            if let Some(i) = self.buf[searched..].windows(2).position(|w| w == b"\r\n") {
                let line = self.buf.split_to(searched + i).freeze();
                self.buf.advance(2);
                return Ok(line);
            }
            searched = self.buf.len().saturating_sub(1);
            if self.buf.len() > MAX_CHUNK_LINE {
                return Err(
                    Refusal::bad("chunked body: a chunk-size or trailer line is too long").into(),
                );
            }
            self.fill_more().await?;
        }
    }

    /// Decodes a chunked body. Past `max_body` it stops reading and returns `max_body + 1`
    /// bytes with `complete = false`, so the handler answers 413 and the connection closes.
    async fn read_chunked_body(&mut self) -> Result<(Bytes, bool), ReadError> {
        let mut body = BytesMut::new();
        let cap = self.max_body.saturating_add(1);
        loop {
            let line = self.read_line().await?;
            let size = chunk_size(&line)?;
            if size == 0 {
                // Trailer fields, then the empty line.
                loop {
                    if self.read_line().await?.is_empty() {
                        break;
                    }
                }
                return Ok((body.freeze(), true));
            }
            let room = cap - body.len() as u64;
            let take = size.min(room) as usize;
            while self.buf.len() < take {
                self.fill_more().await?;
            }
            body.extend_from_slice(&self.buf[..take]);
            self.buf.advance(take);
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
            self.tcp.write_all(&out).await?;
            return Ok(Written::Done(keep_alive));
        }
        if exact.is_some() {
            // Usually one frame, ready at once.
            while let Some(frame) = body.frame().await {
                let Ok(frame) = frame else {
                    return Ok(Written::Done(false));
                };
                if let Ok(data) = frame.into_data() {
                    if out.len() + data.len() <= COALESCE_BYTES {
                        out.extend_from_slice(&data);
                    } else {
                        write_all_vectored(
                            &mut self.tcp,
                            &mut [IoSlice::new(&out), IoSlice::new(&data)],
                        )
                        .await?;
                        out.clear();
                    }
                }
            }
            if !out.is_empty() {
                self.tcp.write_all(&out).await?;
            }
            return Ok(Written::Done(keep_alive));
        }
        // A stream (SSE): the head goes out at once.
        self.tcp.write_all(&out).await?;
        Ok(Written::Stream {
            body,
            chunked,
            keep: keep_alive,
        })
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
                        )
                        .await?;
                    } else {
                        self.tcp.write_all(&data).await?;
                    }
                }
            }
        }
        if chunked {
            self.tcp.write_all(b"0\r\n\r\n").await?;
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
        self.tcp.write_all(&out).await?;
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
        let builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
        let conn =
            builder.serve_connection(TokioIo::new(io), TowerToHyperService::new(self.handler));
        tokio::pin!(conn);
        let result = tokio::select! {
            r = conn.as_mut() => r,
            () = self.stop.cancelled() => {
                conn.as_mut().graceful_shutdown();
                conn.await
            }
        };
        result.map_err(io::Error::other)
    }
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

/// Parses a request head at the start of `buf`; consumes it when complete.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Head>, Refusal> {
    let mut fields = [httparse::EMPTY_HEADER; MAX_HEADERS];
    let mut req = httparse::Request::new(&mut fields);
    let len = match req.parse(buf) {
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
    let method = Method::from_bytes(req.method.unwrap_or("").as_bytes())
        .map_err(|_| Refusal::bad("malformed request method"))?;
    let version = match req.version {
        Some(0) => Version::HTTP_10,
        _ => Version::HTTP_11,
    };
    // The target and header values become slices of the head's bytes rather than copies: one
    // allocation fewer per value, on every request. Positions first, while `req` borrows `buf`.
    let base = buf.as_ptr() as usize;
    let at = |part: &[u8]| {
        let start = part.as_ptr() as usize - base;
        start..start + part.len()
    };
    let target = at(req.path.unwrap_or("").as_bytes());
    let mut names = [(0usize, 0usize); MAX_HEADERS];
    let mut values = [(0usize, 0usize); MAX_HEADERS];
    let count = req.headers.len();
    for (i, field) in req.headers.iter().enumerate() {
        let n = at(field.name.as_bytes());
        let v = at(field.value);
        names[i] = (n.start, n.end);
        values[i] = (v.start, v.end);
    }
    let head = buf.split_to(len).freeze();
    let uri = Uri::from_maybe_shared(head.slice(target.clone())).map_err(|e| {
        let target = String::from_utf8_lossy(&head[target]);
        Refusal::bad(format!("malformed request target {target:?}: {e}"))
    })?;
    let mut headers = HeaderMap::with_capacity(count);
    for (&(ns, ne), &(vs, ve)) in names[..count].iter().zip(&values[..count]) {
        let field = || String::from_utf8_lossy(&head[ns..ne]);
        let name = HeaderName::from_bytes(&head[ns..ne])
            .map_err(|_| Refusal::bad(format!("malformed header name {:?}", field())))?;
        let value = HeaderValue::from_maybe_shared(head.slice(vs..ve))
            .map_err(|_| Refusal::bad(format!("malformed value of header {}", field())))?;
        headers.append(name, value);
    }
    Ok(Some(Head {
        method,
        uri,
        version,
        headers,
    }))
}

/// How the request body is delimited (RFC 9112 section 6.3).
fn framing(head: &Head) -> Result<Framing, Refusal> {
    // Iterators, not collected: a vector here would be an allocation on every request.
    let te = head.headers.get_all(header::TRANSFER_ENCODING);
    let cl = head.headers.get_all(header::CONTENT_LENGTH);
    if te.iter().next().is_some() {
        if cl.iter().next().is_some() {
            return Err(Refusal::bad(
                "request has both Transfer-Encoding and Content-Length",
            ));
        }
        if head.version != Version::HTTP_11 {
            return Err(Refusal::bad("Transfer-Encoding requires HTTP/1.1"));
        }
        let last = te
            .iter()
            .next_back()
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.rsplit(',').next())
            .map(str::trim)
            .unwrap_or("");
        if !last.eq_ignore_ascii_case("chunked") {
            return Err(Refusal::bad(
                "unsupported Transfer-Encoding: the final coding must be chunked",
            ));
        }
        return Ok(Framing::Chunked);
    }
    let mut length: Option<u64> = None;
    for v in cl.iter() {
        for part in v.as_bytes().split(|b| *b == b',') {
            let part = part.trim_ascii();
            let n = (!part.is_empty() && part.iter().all(u8::is_ascii_digit))
                .then(|| std::str::from_utf8(part).ok()?.parse::<u64>().ok())
                .flatten()
                .ok_or_else(|| Refusal::bad("malformed Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(Refusal::bad("conflicting Content-Length values"));
            }
            length = Some(n);
        }
    }
    Ok(match length {
        Some(0) | None => Framing::None,
        Some(n) => Framing::Length(n),
    })
}

/// Whether the `Connection` header lists `token`.
fn has_token(headers: &HeaderMap, token: &str) -> bool {
    headers.get_all(header::CONNECTION).iter().any(|v| {
        v.to_str()
            .is_ok_and(|v| v.split(',').any(|t| t.trim().eq_ignore_ascii_case(token)))
    })
}

/// The size of a chunk from its size line (extensions after `;` ignored).
fn chunk_size(line: &[u8]) -> Result<u64, Refusal> {
    let digits = line
        .split(|b| *b == b';')
        .next()
        .unwrap_or_default()
        .trim_ascii();
    if digits.is_empty() || digits.len() > 16 || !digits.iter().all(u8::is_ascii_hexdigit) {
        return Err(Refusal::bad("chunked body: malformed chunk size"));
    }
    std::str::from_utf8(digits)
        .ok()
        .and_then(|d| u64::from_str_radix(d, 16).ok())
        .ok_or_else(|| Refusal::bad("chunked body: malformed chunk size"))
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

async fn write_all_vectored(tcp: &mut TcpStream, mut slices: &mut [IoSlice<'_>]) -> io::Result<()> {
    while !slices.is_empty() {
        let n = tcp.write_vectored(slices).await?;
        if n == 0 {
            return Err(io::ErrorKind::WriteZero.into());
        }
        IoSlice::advance_slices(&mut slices, n);
    }
    Ok(())
}

/// The `Date` header, formatted once per second per thread.
mod date {
    use std::cell::RefCell;
    use std::time::{SystemTime, UNIX_EPOCH};

    thread_local! {
        static CACHED: RefCell<(u64, String)> = const { RefCell::new((u64::MAX, String::new())) };
    }

    pub fn push(out: &mut Vec<u8>) {
        let now = SystemTime::now();
        let secs = now.duration_since(UNIX_EPOCH).map_or(0, |d| d.as_secs());
        CACHED.with(|c| {
            let mut c = c.borrow_mut();
            if c.0 != secs {
                *c = (secs, httpdate::fmt_http_date(now));
            }
            out.extend_from_slice(b"date: ");
            out.extend_from_slice(c.1.as_bytes());
            out.extend_from_slice(b"\r\n");
        });
    }
}

/// An I/O object that yields `prefix` before reading from `io`.
struct Prefixed {
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
mod tests {
    use super::*;

    fn head_of(raw: &str) -> Result<Option<Head>, Refusal> {
        let mut buf = BytesMut::from(raw.as_bytes());
        parse_head(&mut buf)
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
        let head = parse_head(&mut buf).ok().flatten().expect("complete head");
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
            f("POST / HTTP/1.1\r\nContent-Length: 5, 5\r\n\r\n")
                .ok()
                .as_deref(),
            Some("len 5")
        );
        assert!(f("POST / HTTP/1.1\r\nContent-Length: 5, 6\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: -5\r\n\r\n").is_err());
        assert!(f("POST / HTTP/1.1\r\nContent-Length: +5\r\n\r\n").is_err());
        assert_eq!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: gzip, chunked\r\n\r\n")
                .ok()
                .as_deref(),
            Some("chunked")
        );
        assert!(f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked, gzip\r\n\r\n").is_err());
        assert!(
            f("POST / HTTP/1.1\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\n")
                .is_err()
        );
        assert!(f("POST / HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n").is_err());
    }

    #[tokio::test]
    async fn a_connection_future_stays_small() {
        // Every idle live reader is one of these futures: its size is per-reader memory.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let _client = TcpStream::connect(addr).await.expect("connect");
        let (tcp, _) = listener.accept().await.expect("accept");
        let mut config = crate::config::Config::default();
        config.server.port = 0;
        let app = crate::App::build(config).await.expect("app");
        let conn = Conn {
            tcp,
            buf: BytesMut::new(),
            handler: app.handler(),
            stop: CancellationToken::new(),
            max_body: 1,
            read_closed: false,
            live: None,
            tracker: TaskTracker::new(),
        };
        let run = conn.run();
        eprintln!("connection future: {} bytes", std::mem::size_of_val(&run));
        assert!(
            std::mem::size_of_val(&run) <= 1024,
            "{}",
            std::mem::size_of_val(&run)
        );
    }

    #[test]
    fn chunk_headers() {
        let mut buf = [0u8; 18];
        assert_eq!(chunk_header(&mut buf, 0), b"0\r\n");
        assert_eq!(chunk_header(&mut buf, 26), b"1a\r\n");
        assert_eq!(chunk_header(&mut buf, usize::MAX), b"ffffffffffffffff\r\n");
    }

    #[test]
    fn chunk_sizes() {
        assert_eq!(chunk_size(b"1a").ok(), Some(26));
        assert_eq!(chunk_size(b"A;name=value").ok(), Some(10));
        assert!(chunk_size(b"").is_err());
        assert!(chunk_size(b"zz").is_err());
        assert!(chunk_size(b"11111111111111111").is_err());
    }

    #[test]
    fn connection_tokens() {
        let head = head_of("GET / HTTP/1.1\r\nConnection: keep-alive, Close\r\n\r\n")
            .ok()
            .flatten()
            .expect("head");
        assert!(has_token(&head.headers, "close"));
        assert!(!has_token(&head.headers, "upgrade"));
    }
}
