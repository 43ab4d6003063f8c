//! HTTP: the axum router, request handlers, live reads, CORS and security headers.
//!
//! Handlers translate between HTTP and the `stream` layer; they never touch storage types.
//! Any path is a stream except `/healthz` and `/readyz`.

pub mod edge;
pub mod error;
pub(crate) mod h1;
mod names;
pub mod request;
pub mod request_id;
mod sse;
mod subscriptions;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::extract::Request;
use axum::http::{HeaderMap, HeaderName, HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use bytes::BytesMut;
use ds_protocol::{MediaKind, Offset, ReadOffset, cursor, headers as h};
use futures::FutureExt;
use futures::future::BoxFuture;
use tokio_util::sync::CancellationToken;

use crate::config::Config;
use crate::metrics::{self, Operation};
use crate::stream::{
    AppendOutcome, AppendRequest, Appending, CreateRequest, ReadOutcome, Stream, Streams,
};
use crate::subscription::Subscriptions;
use error::ApiError;
use request::LiveMode;

/// Shared by all handlers.
#[derive(Clone)]
pub struct AppState {
    inner: Arc<Inner>,
}

struct Inner {
    streams: Arc<Streams>,
    /// `None` when subscriptions are disabled.
    subscriptions: Option<Arc<Subscriptions>>,
    config: Config,
    /// Cancelled when shutdown begins: long-polls and SSE end at once.
    shutdown: CancellationToken,
    /// Set when shutdown begins, so `/readyz` turns 503 for load balancers.
    draining: AtomicBool,
    /// Allowed CORS origins; `None` means `*`.
    cors_origins: Option<Vec<String>>,
    /// The fixed browser headers of every response, encoded for an HTTP/1.1 head (see
    /// [`Handler::fixed_head`]): the CORS ones first, `cors_head_len` bytes.
    fixed_head: Vec<u8>,
    cors_head_len: usize,
    cache_control: HeaderValue,
    /// The server terminates TLS itself (for `Location` URLs).
    tls: bool,
}

impl AppState {
    pub fn new(
        streams: Arc<Streams>,
        subscriptions: Option<Arc<Subscriptions>>,
        config: Config,
        shutdown: CancellationToken,
    ) -> Self {
        let cors_origins = config.cors_origins();
        let tls = config.tls.cert_path.is_some();
        let cache_control = HeaderValue::from_str(&config.http.cache_control)
            .unwrap_or(HeaderValue::from_static("no-store"));
        let mut fixed_head = Vec::new();
        let mut cors_head_len = 0;
        for (name, value) in fixed_headers(cors_origins.is_none()) {
            fixed_head.extend_from_slice(name.as_str().as_bytes());
            fixed_head.extend_from_slice(b": ");
            fixed_head.extend_from_slice(value.as_bytes());
            fixed_head.extend_from_slice(b"\r\n");
            if is_cors(&name) {
                cors_head_len = fixed_head.len();
            }
        }
        AppState {
            inner: Arc::new(Inner {
                streams,
                subscriptions,
                config,
                shutdown,
                draining: AtomicBool::new(false),
                cors_origins,
                fixed_head,
                cors_head_len,
                cache_control,
                tls,
            }),
        }
    }

    /// Marks the server as draining (`/readyz` answers 503).
    pub fn begin_drain(&self) {
        self.inner.draining.store(true, Ordering::Relaxed);
    }
}

/// Every request the server answers: the two probes, else a stream request.
///
/// A plain `tower` service rather than an axum `Router`: a router boxes its fallback's future
/// again, clones the boxed service and inserts a path-parameters extension on every request,
/// four allocations and a route lookup per append for two fixed paths; and a handler's
/// extractor wrapper would keep a copy of the request in the future an idle long-poll holds.
#[derive(Clone)]
pub struct Handler {
    state: AppState,
    /// Whether the connection's writer adds the fixed browser headers (plaintext HTTP/1.1):
    /// responses then leave them out of their header map.
    writer_adds_fixed: bool,
}

impl Handler {
    pub fn new(state: AppState) -> Handler {
        Handler {
            state,
            writer_adds_fixed: false,
        }
    }

    /// The handler of a connection whose writer adds [`Handler::fixed_head`] to every head.
    /// Four header-map inserts per response (hashing, probing, and with a producer's two
    /// headers a map that grows) cost more than copying their pre-encoded bytes.
    pub(crate) fn writing_fixed_headers(&self) -> Handler {
        Handler {
            state: self.state.clone(),
            writer_adds_fixed: true,
        }
    }

    /// The fixed browser headers for an HTTP/1.1 head, when this handler leaves them to the
    /// writer; else empty. Without `cors`, only the security headers (spec 12.7): a stored
    /// append's answer to a request without `Origin` (no browser sent it) leaves out the CORS
    /// headers, which were two thirds of its head (604 bytes in all, 237 without them) and as
    /// much for every client to read.
    pub(crate) fn fixed_head(&self, cors: bool) -> &[u8] {
        let inner = &self.state.inner;
        match (self.writer_adds_fixed, cors) {
            (false, _) => &[],
            (true, true) => &inner.fixed_head,
            (true, false) => &inner.fixed_head[inner.cors_head_len..],
        }
    }
}

type Answer = futures::future::Map<
    BoxFuture<'static, Response>,
    fn(Response) -> Result<Response, std::convert::Infallible>,
>;

/// Any request body: hyper's for HTTP/2 and TLS, ours (already a `Body`, not boxed again)
/// for plaintext HTTP/1.1.
impl<B> tower::Service<axum::http::Request<B>> for Handler
where
    B: axum::body::HttpBody<Data = Bytes> + Send + 'static,
    B::Error: Into<axum::BoxError>,
{
    type Response = Response;
    type Error = std::convert::Infallible;
    type Future = Answer;

    fn poll_ready(
        &mut self,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), Self::Error>> {
        std::task::Poll::Ready(Ok(()))
    }

    fn call(&mut self, req: axum::http::Request<B>) -> Answer {
        let req = req.map(Body::new);
        let state = self.state.clone();
        let id = request_id::of(req.headers());
        let fixed = !self.writer_adds_fixed;
        let answer = match req.uri().path() {
            "/healthz" => probe(state, req, id, fixed, false),
            "/readyz" => probe(state, req, id, fixed, true),
            path if subscriptions::is_control_path(path) => {
                let started = std::time::Instant::now();
                Box::pin(
                    subscriptions::request(state, req, id, fixed).map(move |response| {
                        metrics::request(
                            Operation::Subscription,
                            response.status().as_u16(),
                            started,
                        );
                        response
                    }),
                )
            }
            _ => stream_request(state, req, id, fixed),
        };
        answer.map(Ok)
    }
}

/// `/healthz` (alive) and `/readyz` (ready; 503 while draining): GET and HEAD, and CORS
/// preflights.
fn probe(
    state: AppState,
    req: Request,
    id: HeaderValue,
    fixed: bool,
    ready: bool,
) -> BoxFuture<'static, Response> {
    let origin = req.headers().get(header::ORIGIN).cloned();
    let response = match *req.method() {
        Method::GET | Method::HEAD => {
            if !ready {
                "ok".into_response()
            } else if state.inner.draining.load(Ordering::Relaxed) {
                (StatusCode::SERVICE_UNAVAILABLE, "draining").into_response()
            } else {
                "ready".into_response()
            }
        }
        Method::OPTIONS => preflight(),
        ref other => {
            let mut r = ApiError::MethodNotAllowed(other.to_string()).into_response();
            r.headers_mut().insert(
                header::ALLOW,
                HeaderValue::from_static("GET, HEAD, OPTIONS"),
            );
            r
        }
    };
    Box::pin(std::future::ready(browser_headers(
        &state, origin, id, fixed, response,
    )))
}

/// The answer to a CORS preflight, for any path.
fn preflight() -> Response {
    let mut r = StatusCode::NO_CONTENT.into_response();
    let hs = r.headers_mut();
    hs.insert(
        header::ACCESS_CONTROL_ALLOW_METHODS,
        HeaderValue::from_static("GET, POST, PUT, DELETE, HEAD, OPTIONS"),
    );
    hs.insert(
        header::ACCESS_CONTROL_ALLOW_HEADERS,
        HeaderValue::from_static(h::CORS_ALLOW_HEADERS),
    );
    hs.insert(
        header::ACCESS_CONTROL_MAX_AGE,
        HeaderValue::from_static("86400"),
    );
    r
}

/// The browser headers every response carries whatever the request (spec 12.7's security
/// headers, CORS' exposed headers, and `Access-Control-Allow-Origin: *` when any origin is
/// allowed), the CORS ones first; a stored append's answer to a request without `Origin` leaves
/// those out ([`Handler::fixed_head`]).
fn fixed_headers(any_origin: bool) -> impl Iterator<Item = (HeaderName, HeaderValue)> {
    let allow_any = any_origin.then_some((
        header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    ));
    allow_any.into_iter().chain([
        (
            header::ACCESS_CONTROL_EXPOSE_HEADERS,
            HeaderValue::from_static(h::CORS_EXPOSE_HEADERS),
        ),
        (
            header::X_CONTENT_TYPE_OPTIONS,
            HeaderValue::from_static("nosniff"),
        ),
        (
            names::CROSS_ORIGIN_RESOURCE_POLICY,
            HeaderValue::from_static("cross-origin"),
        ),
    ])
}

/// CORS, the browser security headers of spec 12.7 and the request id, added to every
/// response. Done in the handlers rather than as a middleware layer: a layer boxes every
/// request's future, and this is the hot path of every append. With `fixed` false the
/// connection's writer adds the fixed ones ([`Handler::fixed_head`]).
fn browser_headers(
    state: &AppState,
    origin: Option<HeaderValue>,
    id: HeaderValue,
    fixed: bool,
    mut response: Response,
) -> Response {
    // A stored append's answer to a request without `Origin` leaves out the CORS headers
    // (see [`Handler::fixed_head`]); the writer is told by [`WithoutCors`].
    let cors = origin.is_some() || response.extensions().get::<StoredAppend>().is_none();
    if !cors && !fixed {
        response.extensions_mut().insert(WithoutCors);
    }
    let hs = response.headers_mut();
    hs.insert(request_id::REQUEST_ID, id);
    if let Some(allowed) = &state.inner.cors_origins {
        if let Some(origin) = origin.filter(|o| origin_allowed(allowed, o.as_bytes())) {
            hs.insert(header::ACCESS_CONTROL_ALLOW_ORIGIN, origin);
        }
        hs.append(header::VARY, HeaderValue::from_static("origin"));
    }
    if fixed {
        for (name, value) in fixed_headers(state.inner.cors_origins.is_none()) {
            if cors || !is_cors(&name) {
                hs.insert(name, value);
            }
        }
    }
    response
}

/// A CORS response header (those [`fixed_headers`] lists first).
fn is_cors(name: &HeaderName) -> bool {
    name.as_str().starts_with("access-control-")
}

/// Marks a stored append's response for [`browser_headers`].
#[derive(Clone, Copy)]
struct StoredAppend;

/// Marks a response whose head the HTTP/1.1 writer writes without the CORS headers.
#[derive(Clone, Copy)]
pub(crate) struct WithoutCors;

/// Any request to a stream path. Each kind of request gets a future of its own size: an idle
/// long-poll reader holds its future for as long as it waits, and should not pay for the
/// largest (an append's).
fn stream_request(
    state: AppState,
    req: Request,
    id: HeaderValue,
    fixed: bool,
) -> BoxFuture<'static, Response> {
    let started = std::time::Instant::now();
    let origin = req.headers().get(header::ORIGIN).cloned();
    // The access line is opt-in (debug): the path is copied only when it will be logged.
    let access = tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG)
        .then(|| (req.method().clone(), req.uri().path().to_owned()));
    let finish = move |state: &AppState, op: Operation, result: Result<Response, ApiError>| {
        let response = match result {
            Ok(response) => response,
            Err(e) => e.respond(Some(&id)),
        };
        metrics::request(op, response.status().as_u16(), started);
        if let Some((method, path)) = access {
            tracing::debug!(
                target: ACCESS_LOG,
                request_id = id.to_str().unwrap_or_default(),
                %method,
                path,
                status = response.status().as_u16(),
                "request"
            );
        }
        browser_headers(state, origin, id, fixed, response)
    };
    match *req.method() {
        Method::GET => match plan_read(&state, req) {
            Ok(ReadPlan::LongPoll(stream, query)) => Box::pin(async move {
                let result = long_poll(&state, &stream, &query).await;
                finish(&state, Operation::LongPoll, result)
            }),
            Ok(ReadPlan::Sse(stream, query)) => {
                let response = sse::respond(state.clone(), stream, &query);
                Box::pin(std::future::ready(finish(&state, Operation::Sse, response)))
            }
            Ok(ReadPlan::CatchUp(stream, query, headers)) => Box::pin(async move {
                let result = catch_up(&state, &stream, &query, &headers).await;
                finish(&state, Operation::Read, result)
            }),
            Err(e) => Box::pin(std::future::ready(finish(&state, Operation::Read, Err(e)))),
        },
        Method::HEAD => {
            let result = head(&state, req);
            Box::pin(std::future::ready(finish(&state, Operation::Head, result)))
        }
        Method::PUT => Box::pin(async move {
            let result = create(&state, req).await;
            finish(&state, Operation::Create, result)
        }),
        Method::POST => Box::pin(async move {
            let result = append(&state, req).await;
            finish(&state, Operation::Append, result)
        }),
        Method::DELETE => Box::pin(async move {
            let result = delete(&state, req).await;
            finish(&state, Operation::Delete, result)
        }),
        Method::OPTIONS => Box::pin(std::future::ready(finish(
            &state,
            Operation::Options,
            Ok(preflight()),
        ))),
        ref other => {
            let e = ApiError::MethodNotAllowed(other.to_string());
            Box::pin(std::future::ready(finish(&state, Operation::Other, Err(e))))
        }
    }
}

/// The target of the one line per stream request (`RUST_LOG=info,ds_server::access=debug`).
const ACCESS_LOG: &str = "ds_server::access";

fn offset_value(pos: u64) -> HeaderValue {
    HeaderValue::from_bytes(Offset::at(pos).encode().as_bytes())
        .unwrap_or(HeaderValue::from_static("0"))
}

fn ct_value(ct: &str) -> HeaderValue {
    HeaderValue::from_str(ct).unwrap_or(HeaderValue::from_static("application/octet-stream"))
}

const TRUE: HeaderValue = HeaderValue::from_static("true");
const NO_STORE: HeaderValue = HeaderValue::from_static("no-store");

/// Whether `origin` (as sent) is one of the allowed CORS origins.
fn origin_allowed(allowed: &[String], origin: &[u8]) -> bool {
    request::visible_text(origin).is_some_and(|o| allowed.iter().any(|a| a.eq_ignore_ascii_case(o)))
}

/// Reads the request body, refusing one larger than the configured cap with 413. Frame by
/// frame rather than through `to_bytes`: an HTTP/1 body arrives as one frame, which is returned
/// as it is, without the limit wrapper's and the collector's buffers (a measurable part of a
/// small append's CPU).
async fn body_bytes(state: &AppState, mut body: Body) -> Result<Bytes, ApiError> {
    use http_body_util::BodyExt;
    let limit = state.inner.config.limits.max_request_bytes;
    let too_large = || {
        ApiError::PayloadTooLarge(format!(
            "request body is larger than DS_LIMITS__MAX_REQUEST_BYTES ({limit} bytes)"
        ))
    };
    let mut first: Option<Bytes> = None;
    let mut joined: Option<bytes::BytesMut> = None;
    let mut total: u64 = 0;
    while let Some(frame) = body.frame().await {
        let frame = frame
            .map_err(|e| ApiError::bad_request(format!("could not read request body: {e}")))?;
        let Ok(data) = frame.into_data() else {
            continue; // trailers carry nothing an operation uses
        };
        if data.is_empty() {
            continue;
        }
        total = total.saturating_add(data.len() as u64);
        if total > limit {
            return Err(too_large());
        }
        match (&mut first, &mut joined) {
            (None, None) => first = Some(data),
            (Some(_), None) => {
                let head = first.take().unwrap_or_default();
                let mut buf = bytes::BytesMut::with_capacity(head.len() + data.len());
                buf.extend_from_slice(&head);
                buf.extend_from_slice(&data);
                joined = Some(buf);
            }
            (_, Some(buf)) => buf.extend_from_slice(&data),
        }
    }
    Ok(match joined {
        Some(buf) => buf.freeze(),
        None => first.unwrap_or_default(),
    })
}

fn declared_too_large(
    state: &AppState,
    headers: &(impl request::Fields + ?Sized),
) -> Result<(), ApiError> {
    let limit = state.inner.config.limits.max_request_bytes;
    let declared = headers
        .field(&header::CONTENT_LENGTH)
        .and_then(request::visible_text)
        .and_then(|v| v.parse::<u64>().ok());
    match declared {
        Some(len) if len > limit => Err(ApiError::PayloadTooLarge(format!(
            "request body of {len} bytes is larger than DS_LIMITS__MAX_REQUEST_BYTES ({limit} bytes)"
        ))),
        _ => Ok(()),
    }
}

/// An absolute URL for `Location`, from the Host the client used.
fn location(
    headers: &HeaderMap,
    uri: &axum::http::Uri,
    path: &str,
    tls: bool,
) -> Option<HeaderValue> {
    HeaderValue::from_str(&format!("{}{path}", request_origin(headers, uri, tls)?)).ok()
}

/// `scheme://host` as the client addressed the server: the forwarded headers a proxy sets
/// (`X-Forwarded-Proto`, `X-Forwarded-Host`), else `Host` (or HTTP/2's authority) and the
/// server's own scheme.
fn request_origin(headers: &HeaderMap, uri: &axum::http::Uri, tls: bool) -> Option<String> {
    // HTTP/2 carries the host in the URI's authority, HTTP/1.1 in `Host`.
    let host = match headers
        .get("x-forwarded-host")
        .or_else(|| headers.get(header::HOST))
    {
        Some(h) => h.to_str().ok()?.to_owned(),
        None => uri.authority()?.to_string(),
    };
    let scheme = headers
        .get("x-forwarded-proto")
        .and_then(|v| v.to_str().ok())
        .filter(|p| *p == "https" || *p == "http")
        .unwrap_or(if tls { "https" } else { "http" });
    Some(format!("{scheme}://{host}"))
}

async fn create(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let path = request::stream_path(parts.uri.path())?;
    let headers = &parts.headers;
    let (ttl_secs, expires_at) = request::expiry(headers)?;
    let fork = request::fork(headers)?;
    let content_type = request::content_type(headers)?;
    declared_too_large(state, headers)?;
    let body = body_bytes(state, body).await?;
    let outcome = state
        .inner
        .streams
        .create(
            path,
            CreateRequest {
                content_type,
                ttl_secs,
                expires_at,
                closed: request::closed(headers),
                fork,
                body,
            },
        )
        .await?;
    let status = if outcome.created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    let mut response = status.into_response();
    let hs = response.headers_mut();
    hs.insert(header::CONTENT_TYPE, ct_value(&outcome.content_type));
    hs.insert(names::STREAM_ID, HeaderValue::from(outcome.id));
    hs.insert(names::STREAM_NEXT_OFFSET, offset_value(outcome.next_offset));
    if outcome.closed {
        hs.insert(names::STREAM_CLOSED, TRUE);
    }
    if outcome.created
        && let Some(loc) = location(headers, &parts.uri, path, state.inner.tls)
    {
        hs.insert(header::LOCATION, loc);
    }
    Ok(response)
}

async fn append(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let (parts, body) = req.into_parts();
    let headers = &request::AppendFields::of(&parts.headers);
    let appended = append_with(state, parts.uri.path(), headers, body_bytes(state, body)).await?;
    let mut response = appended.status.into_response();
    response.extensions_mut().insert(StoredAppend);
    let hs = response.headers_mut();
    hs.insert(
        names::STREAM_NEXT_OFFSET,
        offset_value(appended.next_offset),
    );
    if appended.closed {
        hs.insert(names::STREAM_CLOSED, TRUE);
    }
    if let Some((epoch, seq)) = appended.producer {
        hs.insert(names::PRODUCER_EPOCH, HeaderValue::from(epoch));
        hs.insert(names::PRODUCER_SEQ, HeaderValue::from(seq));
    }
    Ok(response)
}

/// What an append did, before it becomes an answer: a `Response` ([`append`]), or the lines of
/// an HTTP/1.1 head ([`AppendReply`]).
struct Appended {
    status: StatusCode,
    next_offset: u64,
    closed: bool,
    producer: Option<(u64, u64)>,
}

/// An append, whatever carried it. `body` is awaited only once the head passed its checks: a
/// body declared larger than the limit is refused unread.
async fn append_with(
    state: &AppState,
    path: &str,
    headers: &(impl request::Fields + ?Sized),
    body: impl Future<Output = Result<Bytes, ApiError>>,
) -> Result<Appended, ApiError> {
    let checked = check_append(state, path, headers)?;
    let body = body.await?;
    begin_append(state, checked, body)?.finish().await
}

/// An append's head, checked: what it asks for, short of the body.
struct CheckedAppend<'a> {
    path: &'a str,
    request: AppendRequest,
}

fn check_append<'a>(
    state: &AppState,
    path: &'a str,
    headers: &(impl request::Fields + ?Sized),
) -> Result<CheckedAppend<'a>, ApiError> {
    let path = request::stream_path(path)?;
    let producer = request::producer(headers)?;
    let stream_seq = request::stream_seq(headers)?;
    let content_type = request::content_type(headers)?;
    declared_too_large(state, headers)?;
    Ok(CheckedAppend {
        path,
        request: AppendRequest {
            content_type,
            body: Bytes::new(),
            close: request::closed(headers),
            stream_seq,
            producer,
        },
    })
}

/// Submits a checked append with its body ([`Streams::begin_append`]).
fn begin_append(
    state: &AppState,
    checked: CheckedAppend<'_>,
    body: Bytes,
) -> Result<BegunAppend, ApiError> {
    let CheckedAppend { path, mut request } = checked;
    let body_len = body.len();
    let has_producer = request.producer.is_some();
    request.body = body;
    let appending = state.inner.streams.begin_append(path, request)?;
    Ok(BegunAppend {
        appending,
        body_len,
        has_producer,
    })
}

/// An append submitted to its stream: answered once [`Appending`] is.
struct BegunAppend {
    appending: Appending,
    body_len: usize,
    has_producer: bool,
}

impl BegunAppend {
    /// The answer now, if nothing is left to wait for; else `self` back.
    fn now(self) -> Result<Appended, Self> {
        match self.appending {
            Appending::Done(outcome) => Ok(Self::appended_from(
                outcome,
                self.body_len,
                self.has_producer,
            )),
            appending => Err(BegunAppend { appending, ..self }),
        }
    }

    async fn finish(self) -> Result<Appended, ApiError> {
        let outcome = self.appending.finish().await?;
        Ok(Self::appended_from(
            outcome,
            self.body_len,
            self.has_producer,
        ))
    }

    fn appended_from(outcome: AppendOutcome, body_len: usize, has_producer: bool) -> Appended {
        if outcome.stored_data {
            metrics::appended(body_len);
        }
        let status = if has_producer && outcome.stored_data {
            StatusCode::OK
        } else {
            StatusCode::NO_CONTENT
        };
        Appended {
            status,
            next_offset: outcome.next_offset,
            closed: outcome.closed,
            producer: outcome.producer,
        }
    }
}

/// A plain append (a POST to a stream path) from a plaintext HTTP/1.1 connection, whose head
/// was parsed without a header map, a URI or a request: the fields an append reads, as sent.
/// Building those for every append (hashing and inserting each field, then dropping them all)
/// was a fifth of a small append's instructions, and the two boxed futures of the general path
/// (the connection's and the handler's) another tenth in moves.
pub(crate) struct RawAppend<'a> {
    pub path: &'a str,
    pub fields: request::AppendFields<'a>,
    /// `x-request-id` as sent (a slice of the head, not a copy).
    pub request_id: Option<Bytes>,
    pub origin: Option<&'a [u8]>,
}

/// How far a [`RawAppend`] got without waiting.
pub(crate) enum AppendStep {
    Answered(Answered),
    /// Waiting for storage (a durable commit, or the original of a duplicate).
    Waiting(BoxFuture<'static, Answered>),
}

/// A [`RawAppend`]'s answer.
pub(crate) struct Answered {
    pub answer: AppendAnswer,
    /// When it was answered: the clock read that timed the request, which the connection's
    /// next idle wait counts from rather than read the clock again.
    pub at: std::time::Instant,
}

/// How a [`RawAppend`] was answered.
pub(crate) enum AppendAnswer {
    /// Stored (or a duplicate): the connection writes the head from [`AppendReply::push_lines`].
    Reply(AppendReply),
    /// Refused: a response like any request's.
    Response(Response),
}

/// A successful append's answer, as lines of an HTTP/1.1 head.
pub(crate) struct AppendReply {
    appended: Appended,
    id: request_id::RequestId,
    /// The request's `Origin`, when it is one of `DS_HTTP__CORS_ORIGINS`.
    allow_origin: Option<HeaderValue>,
    /// `Vary: origin`: origins are configured, so the answer depends on the origin.
    vary: bool,
}

impl AppendReply {
    pub(crate) fn status(&self) -> StatusCode {
        self.appended.status
    }

    /// The head's lines the handler decides, each ending in CRLF: the fields [`append`] and
    /// [`browser_headers`] put in the `Response` of the other transports, in their order. The
    /// connection adds the status line, the fixed browser headers, `Date` and the framing.
    pub(crate) fn push_lines(&self, out: &mut Vec<u8>) {
        let a = &self.appended;
        push_field(
            out,
            &names::STREAM_NEXT_OFFSET,
            Offset::at(a.next_offset).encode().as_bytes(),
        );
        if a.closed {
            push_field(out, &names::STREAM_CLOSED, TRUE.as_bytes());
        }
        if let Some((epoch, seq)) = a.producer {
            push_field(
                out,
                &names::PRODUCER_EPOCH,
                HeaderValue::from(epoch).as_bytes(),
            );
            push_field(out, &names::PRODUCER_SEQ, HeaderValue::from(seq).as_bytes());
        }
        out.extend_from_slice(request_id::REQUEST_ID.as_str().as_bytes());
        out.extend_from_slice(b": ");
        self.id.push(out);
        out.extend_from_slice(b"\r\n");
        if let Some(origin) = &self.allow_origin {
            push_field(out, &header::ACCESS_CONTROL_ALLOW_ORIGIN, origin.as_bytes());
        }
        if self.vary {
            push_field(out, &header::VARY, b"origin");
        }
    }
}

fn push_field(out: &mut Vec<u8>, name: &HeaderName, value: &[u8]) {
    out.extend_from_slice(name.as_str().as_bytes());
    out.extend_from_slice(b": ");
    out.extend_from_slice(value);
    out.extend_from_slice(b"\r\n");
}

impl Handler {
    /// Answers a [`RawAppend`] as [`stream_request`] answers a POST: the same append, metrics,
    /// access line and browser headers.
    pub(crate) fn append_raw(&self, raw: RawAppend<'_>, body: Bytes) -> AppendStep {
        let started = std::time::Instant::now();
        let id = request_id::from_sent(raw.request_id);
        let begun = check_append(&self.state, raw.path, &raw.fields)
            .and_then(|checked| begin_append(&self.state, checked, body));
        let waiting = match begun.map(BegunAppend::now) {
            Ok(Ok(appended)) => Ok(appended),
            Err(e) => Err(e),
            Ok(Err(waiting)) => {
                // Waiting for storage: the rest owns what it answers with.
                let handler = self.clone();
                let path: Box<str> = raw.path.into();
                let origin: Option<Box<[u8]>> = raw.origin.map(Into::into);
                return AppendStep::Waiting(Box::pin(async move {
                    let result = waiting.finish().await;
                    handler.answer_raw(result, &path, origin.as_deref(), id, started)
                }));
            }
        };
        AppendStep::Answered(self.answer_raw(waiting, raw.path, raw.origin, id, started))
    }

    /// A plain append's answer, counted and logged.
    fn answer_raw(
        &self,
        result: Result<Appended, ApiError>,
        path: &str,
        origin: Option<&[u8]>,
        id: request_id::RequestId,
        started: std::time::Instant,
    ) -> Answered {
        let state = &self.state;
        let answer = match result {
            Ok(appended) => {
                let allowed = state.inner.cors_origins.as_deref();
                let allow_origin = match (allowed, origin) {
                    (Some(allowed), Some(origin)) if origin_allowed(allowed, origin) => {
                        HeaderValue::from_bytes(origin).ok()
                    }
                    _ => None,
                };
                AppendAnswer::Reply(AppendReply {
                    appended,
                    id,
                    allow_origin,
                    vary: allowed.is_some(),
                })
            }
            Err(e) => {
                let id = id.to_header();
                let response = e.respond(Some(&id));
                let origin = origin.and_then(|o| HeaderValue::from_bytes(o).ok());
                let fixed = !self.writer_adds_fixed;
                AppendAnswer::Response(browser_headers(state, origin, id, fixed, response))
            }
        };
        let status = match &answer {
            AppendAnswer::Reply(reply) => reply.status(),
            AppendAnswer::Response(response) => response.status(),
        };
        let at = metrics::request(Operation::Append, status.as_u16(), started);
        if tracing::enabled!(target: ACCESS_LOG, tracing::Level::DEBUG) {
            let id = match &answer {
                AppendAnswer::Reply(reply) => Some(reply.id.to_header()),
                AppendAnswer::Response(response) => {
                    response.headers().get(request_id::REQUEST_ID).cloned()
                }
            };
            tracing::debug!(
                target: ACCESS_LOG,
                request_id = id.as_ref().and_then(|id| id.to_str().ok()).unwrap_or_default(),
                method = %Method::POST,
                path,
                status = status.as_u16(),
                "request"
            );
        }
        Answered { answer, at }
    }
}

async fn delete(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let path = request::stream_path(req.uri().path())?;
    state.inner.streams.delete(path).await?;
    Ok(StatusCode::NO_CONTENT.into_response())
}

fn head(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let path = request::stream_path(req.uri().path())?;
    let meta = state.inner.streams.head(path)?;
    let mut response = StatusCode::OK.into_response();
    let hs = response.headers_mut();
    hs.insert(header::CONTENT_TYPE, ct_value(&meta.content_type));
    hs.insert(names::STREAM_ID, HeaderValue::from(meta.id));
    hs.insert(names::STREAM_NEXT_OFFSET, offset_value(meta.next_offset));
    hs.insert(header::CACHE_CONTROL, NO_STORE);
    if let Some(ttl) = meta.ttl_secs {
        hs.insert(names::STREAM_TTL, HeaderValue::from(ttl));
    }
    if let Some(at) = meta.expires_at
        && let Ok(v) = HeaderValue::from_str(&at)
    {
        hs.insert(names::STREAM_EXPIRES_AT, v);
    }
    if meta.closed {
        hs.insert(names::STREAM_CLOSED, TRUE);
    }
    if meta.earliest > 0 {
        hs.insert(names::STREAM_EARLIEST_OFFSET, offset_value(meta.earliest));
    }
    Ok(response)
}

/// Where a read starts, in bytes, for a stream whose visible tail is `tail` and whose data
/// before `earliest` was released: `-1` (the start) is the earliest data still held, so a
/// reader without an offset (the upstream client's default) reads what there is; an explicit
/// offset below it is answered 410 by the read.
fn resolve(offset: Option<ReadOffset>, tail: u64, earliest: u64) -> u64 {
    match offset.unwrap_or(ReadOffset::Start) {
        ReadOffset::Start => earliest,
        ReadOffset::Now => tail,
        ReadOffset::At(o) => request::concrete_pos(o).min(tail),
    }
}

/// Whether a read asks for the earliest data still held (`-1`, or no offset).
fn reads_from_start(offset: Option<ReadOffset>) -> bool {
    matches!(offset.unwrap_or(ReadOffset::Start), ReadOffset::Start)
}

fn cursor_value(client: Option<u64>) -> HeaderValue {
    let jitter = fastrand::u64(1..=3600);
    HeaderValue::from(cursor::next_cursor(SystemTime::now(), client, jitter))
}

/// A GET, parsed: which kind of read, of which stream.
enum ReadPlan {
    CatchUp(Arc<Stream>, request::ReadQuery, HeaderMap),
    LongPoll(Arc<Stream>, request::ReadQuery),
    Sse(Arc<Stream>, request::ReadQuery),
}

fn plan_read(state: &AppState, req: Request) -> Result<ReadPlan, ApiError> {
    let (parts, _body) = req.into_parts();
    let path = request::stream_path(parts.uri.path())?;
    let query = request::read_query(parts.uri.query())?;
    let stream = state.inner.streams.get(path, true)?;
    Ok(match query.live {
        LiveMode::CatchUp => ReadPlan::CatchUp(stream, query, parts.headers),
        LiveMode::LongPoll => ReadPlan::LongPoll(stream, query),
        LiveMode::Sse => ReadPlan::Sse(stream, query),
    })
}

/// Records at least this large on average are sent as they are stored, one body frame each,
/// rather than copied into one buffer first (the HTTP writer hands up to 256 frames to the
/// kernel in one `writev`). Smaller ones are copied: a catch-up of 4 KiB records read 1.59 GB/s
/// copied and 1.17 GB/s sent as 256-buffer `writev`s (memory mode, 1 GiB, 2026-12-06).
const PARTS_BODY_MIN_AVERAGE: usize = 16 * 1024;

/// The response body of a read: JSON streams as one array, others as the bytes. A read of large
/// records is not copied: its records go out as they are held (a catch-up page of 1 MiB records
/// is 4 MiB that would otherwise be copied once more before the kernel copies it).
fn read_body(kind: MediaKind, outcome: &ReadOutcome) -> Body {
    let size: usize = outcome.parts.iter().map(Bytes::len).sum();
    let parts = outcome.parts.len();
    if kind != MediaKind::Json && parts > 1 && size / parts >= PARTS_BODY_MIN_AVERAGE {
        return Body::new(PartsBody(outcome.parts.iter().cloned().collect()));
    }
    Body::from(encode_body(kind, outcome))
}

/// A body of several buffers, sent in order, with a known total length (so it is sent with
/// `Content-Length`).
struct PartsBody(std::collections::VecDeque<Bytes>);

impl http_body::Body for PartsBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        _: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<http_body::Frame<Bytes>, Self::Error>>> {
        let part = self.get_mut().0.pop_front();
        std::task::Poll::Ready(part.map(|p| Ok(http_body::Frame::data(p))))
    }

    fn is_end_stream(&self) -> bool {
        self.0.is_empty()
    }

    fn size_hint(&self) -> http_body::SizeHint {
        http_body::SizeHint::with_exact(self.0.iter().map(|p| p.len() as u64).sum())
    }
}

/// The response body of a read as one buffer: JSON streams as one array, others as the bytes.
fn encode_body(kind: MediaKind, outcome: &ReadOutcome) -> Bytes {
    let size: usize = outcome.parts.iter().map(Bytes::len).sum();
    if kind != MediaKind::Json {
        if outcome.parts.len() == 1 {
            return outcome.parts[0].clone();
        }
        let mut buf = BytesMut::with_capacity(size);
        for p in &outcome.parts {
            buf.extend_from_slice(p);
        }
        return buf.freeze();
    }
    let mut buf = BytesMut::with_capacity(size + outcome.parts.len() + 2);
    buf.extend_from_slice(b"[");
    for (i, p) in outcome.parts.iter().enumerate() {
        if i > 0 {
            buf.extend_from_slice(b",");
        }
        buf.extend_from_slice(p);
    }
    buf.extend_from_slice(b"]");
    buf.freeze()
}

fn etag(stream: &Stream, outcome: &ReadOutcome) -> HeaderValue {
    let closed = if outcome.at_end() { ":c" } else { "" };
    HeaderValue::from_str(&format!(
        "\"{}:{}:{}{}\"",
        stream.meta.id, outcome.start, outcome.next, closed
    ))
    .unwrap_or(HeaderValue::from_static("\"\""))
}

/// Headers every data-bearing read response carries.
fn read_headers(hs: &mut HeaderMap, stream: &Stream, outcome: &ReadOutcome) {
    hs.insert(header::CONTENT_TYPE, ct_value(&stream.meta.content_type));
    hs.insert(names::STREAM_ID, HeaderValue::from(stream.meta.id));
    hs.insert(names::STREAM_NEXT_OFFSET, offset_value(outcome.next));
    let earliest = stream.earliest();
    if earliest > 0 {
        hs.insert(names::STREAM_EARLIEST_OFFSET, offset_value(earliest));
    }
    if outcome.up_to_date() {
        hs.insert(names::STREAM_UP_TO_DATE, TRUE);
    }
    if outcome.at_end() {
        hs.insert(names::STREAM_CLOSED, TRUE);
    }
}

async fn catch_up(
    state: &AppState,
    stream: &Arc<Stream>,
    query: &request::ReadQuery,
    req_headers: &HeaderMap,
) -> Result<Response, ApiError> {
    let visible = stream.visible();
    let streams = &state.inner.streams;
    let outcome = if reads_from_start(query.offset) {
        streams.read_earliest(stream, visible).await?
    } else {
        let from = resolve(query.offset, visible.tail, stream.earliest());
        streams.read_bounded(stream, from, visible).await?
    };
    let is_now = query.offset == Some(ReadOffset::Now);
    let tag = (!is_now).then(|| etag(stream, &outcome));
    if let (Some(tag), Some(inm)) = (&tag, req_headers.get(header::IF_NONE_MATCH))
        && inm == tag
    {
        let mut r = StatusCode::NOT_MODIFIED.into_response();
        r.headers_mut().insert(header::ETAG, tag.clone());
        return Ok(r);
    }
    let mut response = Response::new(read_body(stream.kind, &outcome));
    let hs = response.headers_mut();
    read_headers(hs, stream, &outcome);
    if let Some(tag) = tag {
        hs.insert(header::ETAG, tag);
    }
    let cacheable = !is_now && !outcome.is_empty();
    hs.insert(
        header::CACHE_CONTROL,
        if cacheable {
            state.inner.cache_control.clone()
        } else {
            NO_STORE
        },
    );
    Ok(response)
}

async fn long_poll(
    state: &AppState,
    stream: &Arc<Stream>,
    query: &request::ReadQuery,
) -> Result<Response, ApiError> {
    let _reader = metrics::LiveReader::new(metrics::LiveMode::LongPoll);
    let mut rx = stream.subscribe();
    let initial = *rx.borrow_and_update();
    let from = resolve(query.offset, initial.tail, stream.earliest());
    let deadline = tokio::time::Instant::now() + state.inner.config.server.long_poll_timeout;
    let mut visible = initial;
    loop {
        if visible.gone {
            return Err(crate::stream::StreamError::NotFound.into());
        }
        if from < visible.tail {
            let streams = &state.inner.streams;
            // Boxed: it runs once, at the end of the wait.
            let outcome = if reads_from_start(query.offset) {
                Box::pin(streams.read_earliest(stream, visible)).await?
            } else {
                Box::pin(streams.read_bounded(stream, from, visible)).await?
            };
            let mut response = Response::new(read_body(stream.kind, &outcome));
            let hs = response.headers_mut();
            read_headers(hs, stream, &outcome);
            hs.insert(header::ETAG, etag(stream, &outcome));
            hs.insert(header::CACHE_CONTROL, state.inner.cache_control.clone());
            if !outcome.at_end() {
                hs.insert(names::STREAM_CURSOR, cursor_value(query.cursor));
            }
            return Ok(response);
        }
        if visible.closed {
            break;
        }
        tokio::select! {
            changed = rx.changed() => {
                if changed.is_err() {
                    return Err(crate::stream::StreamError::NotFound.into());
                }
                visible = *rx.borrow_and_update();
            }
            () = tokio::time::sleep_until(deadline) => break,
            () = state.inner.shutdown.cancelled() => break,
        }
    }
    // Timed out, closed, or shutting down, with nothing after `from`: answer the offset asked
    // for (never a newer tail this reader was not given).
    let mut response = StatusCode::NO_CONTENT.into_response();
    let hs = response.headers_mut();
    hs.insert(names::STREAM_ID, HeaderValue::from(stream.meta.id));
    hs.insert(names::STREAM_NEXT_OFFSET, offset_value(from));
    hs.insert(names::STREAM_UP_TO_DATE, TRUE);
    hs.insert(header::CACHE_CONTROL, NO_STORE);
    if visible.closed {
        hs.insert(names::STREAM_CLOSED, TRUE);
    } else {
        hs.insert(names::STREAM_CURSOR, cursor_value(query.cursor));
    }
    Ok(response)
}
