//! What every listener does to survive hostile clients, whatever the protocol: the bounds on a
//! connection's waits ([`EdgeLimits`]), the cap on open connections ([`Admission`]), an accept
//! loop that backs off when the system refuses ([`Acceptor`]), and serving a connection with
//! hyper (TLS, and h2c handed over by the plaintext loop) under the same bounds
//! ([`serve_hyper`]). HTTP/1.1 framing on plaintext connections is `h1.rs`'s.

use std::io;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::task::{Context, Poll};
use std::time::Duration;

use axum::body::Body;
use axum::response::Response;
use futures::FutureExt;
use futures::future::BoxFuture;
use http::Request;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::service::TowerToHyperService;
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use super::Handler;
use crate::config::Config;

/// The bounds of one connection, shared by all connections of a listener.
#[derive(Clone, Debug)]
pub struct EdgeLimits {
    /// Largest request body (`DS_LIMITS__MAX_REQUEST_BYTES`).
    pub max_body: u64,
    /// From a request head's first byte to its end (`DS_SERVER__HEADER_READ_TIMEOUT`).
    pub header_read_timeout: Duration,
    /// Waiting for a request, no byte of it yet (`DS_SERVER__IDLE_TIMEOUT`).
    pub idle_timeout: Duration,
    /// Waiting for the next bytes of a request body (`DS_SERVER__BODY_READ_TIMEOUT`).
    pub body_read_timeout: Duration,
}

impl EdgeLimits {
    pub fn from_config(config: &Config) -> EdgeLimits {
        EdgeLimits {
            max_body: config.limits.max_request_bytes,
            header_read_timeout: config.server.header_read_timeout,
            idle_timeout: config.server.idle_timeout,
            body_read_timeout: config.server.body_read_timeout,
        }
    }
}

/// How many connections are open, against `DS_SERVER__MAX_CONNECTIONS`. One for all listeners.
#[derive(Debug)]
pub struct Admission {
    max: usize,
    open: AtomicUsize,
    /// Connections closed at once because `max` were open, since start.
    refused: AtomicU64,
}

impl Admission {
    pub fn new(max: usize) -> Arc<Admission> {
        Arc::new(Admission {
            max,
            open: AtomicUsize::new(0),
            refused: AtomicU64::new(0),
        })
    }

    /// A place for one more connection, if there is one; it is given back when dropped.
    pub fn try_admit(self: &Arc<Self>) -> Option<Admitted> {
        let mut open = self.open.load(Ordering::Relaxed);
        loop {
            if open >= self.max {
                self.refused.fetch_add(1, Ordering::Relaxed);
                return None;
            }
            match self.open.compare_exchange_weak(
                open,
                open + 1,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Some(Admitted(self.clone())),
                Err(actual) => open = actual,
            }
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.load(Ordering::Relaxed)
    }

    /// Connections refused since start.
    pub fn refused(&self) -> u64 {
        self.refused.load(Ordering::Relaxed)
    }

    pub fn max(&self) -> usize {
        self.max
    }
}

/// One admitted connection's place; the connection owns it for its whole life.
#[derive(Debug)]
pub struct Admitted(Arc<Admission>);

impl Drop for Admitted {
    fn drop(&mut self) {
        self.0.open.fetch_sub(1, Ordering::Relaxed);
    }
}

/// Longest pause after a failed `accept`.
const MAX_ACCEPT_BACKOFF: Duration = Duration::from_secs(1);
/// Shortest pause after a failed `accept`; doubles while failures go on.
const MIN_ACCEPT_BACKOFF: Duration = Duration::from_millis(10);
/// At most one log line this often about refused connections or failed accepts: a flood of
/// connections must not become a flood of log lines.
const REPORT_EVERY: Duration = Duration::from_secs(1);

/// Accepts connections within the cap.
pub struct Acceptor {
    listener: TcpListener,
    admission: Arc<Admission>,
    /// What a refused connection is told before it is closed (plaintext HTTP only).
    refusal: Option<&'static [u8]>,
    backoff: Duration,
    last_report: Option<Instant>,
}

/// The answer written (without waiting) to a plaintext connection over the cap.
pub const HTTP_REFUSAL: &[u8] = b"HTTP/1.1 503 Service Unavailable\r\nconnection: close\r\n\
content-type: text/plain; charset=utf-8\r\ncontent-length: 66\r\n\r\n\
too many open connections (DS_SERVER__MAX_CONNECTIONS); try again\n";

impl Acceptor {
    pub fn new(
        listener: TcpListener,
        admission: Arc<Admission>,
        refusal: Option<&'static [u8]>,
    ) -> Acceptor {
        Acceptor {
            listener,
            admission,
            refusal,
            backoff: MIN_ACCEPT_BACKOFF,
            last_report: None,
        }
    }

    /// The next admitted connection, or `None` once `stop` is cancelled. Connections over the
    /// cap are closed here; when `accept` itself fails (out of file descriptors: the pending
    /// connection stays queued, so retrying at once would spin) it pauses, longer while the
    /// failures go on.
    pub async fn next(
        &mut self,
        stop: &CancellationToken,
    ) -> Option<(TcpStream, SocketAddr, Admitted)> {
        loop {
            let accepted = tokio::select! {
                accepted = self.listener.accept() => accepted,
                () = stop.cancelled() => return None,
            };
            match accepted {
                Ok((tcp, peer)) => {
                    self.backoff = MIN_ACCEPT_BACKOFF;
                    if let Some(admitted) = self.admission.try_admit() {
                        return Some((tcp, peer, admitted));
                    }
                    if let Some(refusal) = self.refusal {
                        // Best effort, never waiting: the socket's buffer is empty.
                        let _ = tcp.try_write(refusal);
                    }
                    drop(tcp);
                    if self.due_report() {
                        tracing::warn!(
                            max = self.admission.max(),
                            refused_total = self.admission.refused(),
                            "connection refused: DS_SERVER__MAX_CONNECTIONS connections are open"
                        );
                    }
                }
                Err(e) => {
                    if self.due_report() {
                        tracing::warn!(error = %e, pause = ?self.backoff, "accept failed");
                    }
                    tokio::select! {
                        () = tokio::time::sleep(self.backoff) => {}
                        () = stop.cancelled() => return None,
                    }
                    self.backoff = (self.backoff * 2).min(MAX_ACCEPT_BACKOFF);
                }
            }
        }
    }

    fn due_report(&mut self) -> bool {
        let now = Instant::now();
        if self
            .last_report
            .is_some_and(|last| now.duration_since(last) < REPORT_EVERY)
        {
            return false;
        }
        self.last_report = Some(now);
        true
    }
}

/// When a hyper-served connection last moved a byte, and how many of its requests are in
/// progress: what tells an idle connection from one serving a quiet live response.
struct Activity {
    start: Instant,
    /// Milliseconds from `start` to the last read or write that moved bytes.
    last_ms: AtomicU64,
    /// Requests whose response (body included) is not finished.
    active: AtomicUsize,
}

impl Activity {
    fn touch(&self) {
        let ms = u64::try_from(self.start.elapsed().as_millis()).unwrap_or(u64::MAX);
        self.last_ms.store(ms, Ordering::Relaxed);
    }

    /// When the connection becomes idle for `idle`, if nothing moves meanwhile.
    fn idle_at(&self, idle: Duration) -> Instant {
        self.start + Duration::from_millis(self.last_ms.load(Ordering::Relaxed)) + idle
    }
}

/// An I/O object that records when it last moved bytes.
struct Watched<T> {
    io: T,
    activity: Arc<Activity>,
}

impl<T: AsyncRead + Unpin> AsyncRead for Watched<T> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<io::Result<()>> {
        let before = buf.filled().len();
        let polled = Pin::new(&mut self.io).poll_read(cx, buf);
        if buf.filled().len() > before {
            self.activity.touch();
        }
        polled
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Watched<T> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write(cx, buf);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
    }
    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        let polled = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        if matches!(polled, Poll::Ready(Ok(n)) if n > 0) {
            self.activity.touch();
        }
        polled
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

/// The handler, counting the requests in progress on one connection: a request counts from
/// its call until its response body is finished or dropped.
#[derive(Clone)]
struct Counted {
    handler: Handler,
    activity: Arc<Activity>,
}

/// Holds one request's place in [`Activity::active`].
struct InProgress(Arc<Activity>);

impl Drop for InProgress {
    fn drop(&mut self) {
        self.0.active.fetch_sub(1, Ordering::Relaxed);
        // A response that just finished starts the idle clock, however long it streamed.
        self.0.touch();
    }
}

impl<B> tower::Service<Request<B>> for Counted
where
    B: axum::body::HttpBody<Data = bytes::Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = BoxFuture<'static, Result<Response, std::convert::Infallible>>;

    fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: Request<B>) -> Self::Future {
        self.activity.active.fetch_add(1, Ordering::Relaxed);
        let guard = InProgress(self.activity.clone());
        let answer = tower::Service::call(&mut self.handler, req);
        answer
            .map(move |response| {
                response.map(|r| {
                    r.map(|body| {
                        Body::new(GuardedBody {
                            body,
                            _guard: guard,
                        })
                    })
                })
            })
            .boxed()
    }
}

/// A response body that holds its request's place until it is finished or dropped.
struct GuardedBody {
    body: Body,
    _guard: InProgress,
}

impl http_body::Body for GuardedBody {
    type Data = bytes::Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<http_body::Frame<Self::Data>, Self::Error>>> {
        Pin::new(&mut self.body).poll_frame(cx)
    }
    fn is_end_stream(&self) -> bool {
        self.body.is_end_stream()
    }
    fn size_hint(&self) -> http_body::SizeHint {
        self.body.size_hint()
    }
}

/// Where a hyper-served connection is in its life.
enum Ending {
    Serving,
    /// The server is shutting down; its `DS_SERVER__SHUTDOWN_TIMEOUT` bounds the rest.
    Draining,
    /// Idle, asked to close (HTTP/2: GOAWAY); dropped if it has not by `by`.
    ClosingIdle {
        by: Instant,
    },
}

/// Serves one connection (TLS, or h2c after the plaintext loop saw the preface) with hyper,
/// under the same bounds as the plaintext loop: hyper's own header read timeout for HTTP/1.1,
/// and for both protocols a close once no request is in progress and no byte has moved for
/// `idle_timeout` (which also ends a connection stuck in a partial HTTP/2 preface). Ends
/// gracefully when `stop` is cancelled.
pub async fn serve_hyper<T>(
    io: T,
    handler: Handler,
    limits: &EdgeLimits,
    stop: &CancellationToken,
) -> Result<(), Box<dyn std::error::Error + Send + Sync>>
where
    T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let activity = Arc::new(Activity {
        start: Instant::now(),
        last_ms: AtomicU64::new(0),
        active: AtomicUsize::new(0),
    });
    let mut builder = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout);
    builder.http2().timer(TokioTimer::new());
    let io = Watched {
        io,
        activity: activity.clone(),
    };
    let service = TowerToHyperService::new(Counted {
        handler,
        activity: activity.clone(),
    });
    let conn = builder.serve_connection_with_upgrades(TokioIo::new(io), service);
    tokio::pin!(conn);
    let mut state = Ending::Serving;
    loop {
        let idle_at = activity.idle_at(limits.idle_timeout);
        let serving = matches!(state, Ending::Serving);
        let gone_by = match state {
            Ending::ClosingIdle { by } => Some(by),
            _ => None,
        };
        tokio::select! {
            result = conn.as_mut() => return result,
            () = stop.cancelled(), if serving => {
                conn.as_mut().graceful_shutdown();
                state = Ending::Draining;
            }
            () = tokio::time::sleep_until(idle_at), if serving => {
                if activity.active.load(Ordering::Relaxed) > 0 {
                    // A response is in progress (it may be a quiet live one): look again
                    // one idle period from now; its end starts the idle clock anyway.
                    activity.touch();
                } else if Instant::now() >= activity.idle_at(limits.idle_timeout) {
                    tracing::debug!("closing an idle connection");
                    conn.as_mut().graceful_shutdown();
                    state = Ending::ClosingIdle {
                        by: Instant::now() + limits.header_read_timeout,
                    };
                }
            }
            () = async {
                match gone_by {
                    Some(at) => tokio::time::sleep_until(at).await,
                    None => std::future::pending().await,
                }
            } => return Ok(()),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_refusal_declares_its_own_length() {
        let text = std::str::from_utf8(HTTP_REFUSAL).expect("ascii");
        let (head, body) = text.split_once("\r\n\r\n").expect("head and body");
        let declared = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length: "))
            .and_then(|n| n.parse::<usize>().ok());
        assert_eq!(declared, Some(body.len()));
    }

    #[test]
    fn admission_counts_places_and_refusals() {
        let admission = Admission::new(2);
        let a = admission.try_admit();
        let b = admission.try_admit();
        assert!(a.is_some() && b.is_some());
        assert!(admission.try_admit().is_none());
        assert_eq!(admission.refused(), 1);
        drop(a);
        assert_eq!(admission.open(), 1);
        assert!(admission.try_admit().is_some());
    }
}
