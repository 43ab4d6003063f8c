//! Real Envoy with the e2e config (envoy/e2e.yaml.tmpl) in front of an in-test TLS upstream that
//! stands in for ds-server and records what reaches it.
//!
//! Checks the edge's promises: bad tokens are 401 and never reach the server, a valid token does,
//! reads may carry the token in `?access_token=` (and the server never sees it), writes may not,
//! identity headers cannot be spoofed, preflights and `/healthz` need no token.

use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use axum::Router;
use axum::extract::Request;
use axum::response::IntoResponse;
use ds_e2e::envoy::{Envoy, EnvoyMode};
use ds_e2e::tls;
use ds_e2e::token::{DEFAULT_SUBJECT, TokenKind, mint, mint_for};
use hyper_util::rt::{TokioExecutor, TokioIo};
use reqwest::{Method, StatusCode};
use tokio::net::TcpListener;
use tokio_rustls::TlsAcceptor;
use tower::ServiceExt;

/// What the upstream saw of one request.
#[derive(Debug, Clone)]
struct Seen {
    method: String,
    path_and_query: String,
    headers: Vec<(String, String)>,
}

impl Seen {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A TLS server with `fixtures/server.pem`, answering 200 to everything and recording it.
struct Upstream {
    addr: SocketAddr,
    seen: Arc<Mutex<Vec<Seen>>>,
}

impl Upstream {
    async fn start() -> Self {
        let listener = TcpListener::bind("127.0.0.1:0")
            .await
            .expect("bind upstream");
        let addr = listener.local_addr().expect("upstream addr");
        let seen = Arc::new(Mutex::new(Vec::new()));
        let recorder = seen.clone();
        let app = Router::new().fallback(move |request: Request| {
            let recorder = recorder.clone();
            async move {
                let seen = Seen {
                    method: request.method().to_string(),
                    path_and_query: request
                        .uri()
                        .path_and_query()
                        .map(|pq| pq.to_string())
                        .unwrap_or_default(),
                    headers: request
                        .headers()
                        .iter()
                        .map(|(n, v)| {
                            (
                                n.to_string(),
                                String::from_utf8_lossy(v.as_bytes()).into_owned(),
                            )
                        })
                        .collect(),
                };
                let slow = seen.path_and_query.starts_with(SLOW_SSE);
                recorder.lock().expect("recorder lock").push(seen);
                if slow {
                    return slow_sse_response();
                }
                "upstream-ok".into_response()
            }
        });
        let acceptor = TlsAcceptor::from(tls::upstream_server_config().expect("tls config"));
        tokio::spawn(async move {
            loop {
                let Ok((tcp, _)) = listener.accept().await else {
                    continue;
                };
                let acceptor = acceptor.clone();
                let app = app.clone();
                tokio::spawn(async move {
                    let Ok(tls_stream) = acceptor.accept(tcp).await else {
                        return;
                    };
                    let service = hyper::service::service_fn(move |request| {
                        app.clone().oneshot(request.map(axum::body::Body::new))
                    });
                    let _ = hyper_util::server::conn::auto::Builder::new(TokioExecutor::new())
                        .serve_connection(TokioIo::new(tls_stream), service)
                        .await;
                });
            }
        });
        Self { addr, seen }
    }

    fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("recorder lock").clone()
    }
}

/// Path on which the upstream sends one SSE event at once and the next after [`SLOW_GAP`].
const SLOW_SSE: &str = "/v1/stream/slow-sse";
/// Longer than Envoy's default route timeout (15 s), which `timeout: 0s` must lift.
const SLOW_GAP: Duration = Duration::from_secs(17);

fn slow_sse_response() -> axum::response::Response {
    let events = futures::stream::unfold(0u8, |step| async move {
        match step {
            0 => Some((Ok::<_, std::io::Error>("event: data\ndata: first\n\n"), 1)),
            1 => {
                tokio::time::sleep(SLOW_GAP).await;
                Some((Ok("event: data\ndata: second\n\n"), 2))
            }
            _ => None,
        }
    });
    axum::response::Response::builder()
        .header("content-type", "text/event-stream")
        .body(axum::body::Body::from_stream(events))
        .expect("static response")
}

struct Stack {
    upstream: Upstream,
    envoy: Envoy,
    client: reqwest::Client,
    /// Holds Envoy's rendered config and log for the test's lifetime.
    _work: tempfile::TempDir,
}

impl Stack {
    async fn start() -> Self {
        let work = tempfile::tempdir().expect("work dir");
        let upstream = Upstream::start().await;
        let envoy = Envoy::start(EnvoyMode::Authenticated, upstream.addr.port(), work.path())
            .await
            .expect("start envoy");
        Self {
            upstream,
            envoy,
            client: tls::client().expect("client"),
            _work: work,
        }
    }

    fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.envoy.base_url())
    }

    async fn get_with_bearer(&self, path: &str, token: &str) -> reqwest::Response {
        self.client
            .get(self.url(path))
            .bearer_auth(token)
            .send()
            .await
            .expect("request through envoy")
    }
}

const STREAM: &str = "/v1/stream/e2e-auth";

#[tokio::test]
async fn request_without_token_is_401_and_never_reaches_the_server() {
    let stack = Stack::start().await;
    for method in [
        Method::GET,
        Method::POST,
        Method::PUT,
        Method::DELETE,
        Method::HEAD,
    ] {
        let response = stack
            .client
            .request(method.clone(), stack.url(STREAM))
            .send()
            .await
            .expect("request");
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{method}");
    }
    assert!(
        stack.upstream.seen().is_empty(),
        "{:?}",
        stack.upstream.seen()
    );
}

#[tokio::test]
async fn every_kind_of_bad_token_is_401_and_never_reaches_the_server() {
    let stack = Stack::start().await;
    for kind in [
        TokenKind::Expired,
        TokenKind::WrongIssuer,
        TokenKind::WrongAudience,
        TokenKind::BadSignature,
    ] {
        let token = mint(kind).expect("mint");
        let response = stack.get_with_bearer(STREAM, &token).await;
        assert_eq!(response.status(), StatusCode::UNAUTHORIZED, "{kind:?}");
        assert!(
            response.headers().contains_key("www-authenticate"),
            "{kind:?}: 401 without WWW-Authenticate"
        );
    }
    // A token that is not a JWT at all, too.
    let response = stack.get_with_bearer(STREAM, "not-a-jwt").await;
    assert_eq!(response.status(), StatusCode::UNAUTHORIZED);
    assert!(
        stack.upstream.seen().is_empty(),
        "{:?}",
        stack.upstream.seen()
    );
}

#[tokio::test]
async fn valid_token_reaches_the_server_with_subject_and_without_the_token() {
    let stack = Stack::start().await;
    let token = mint_for("alice", TokenKind::Valid).expect("mint");
    let response = stack
        .client
        .post(stack.url(STREAM))
        .bearer_auth(&token)
        .header("content-type", "text/plain")
        .header("x-ds-subject", "mallory")
        .body("hello")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(response.text().await.expect("body"), "upstream-ok");

    let seen = stack.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].method, "POST");
    assert_eq!(seen[0].path_and_query, STREAM);
    // The spoofed header is gone and the token's `sub` is in its place, once.
    let subjects: Vec<_> = seen[0]
        .headers
        .iter()
        .filter(|(n, _)| n == "x-ds-subject")
        .collect();
    assert_eq!(subjects.len(), 1, "{seen:?}");
    assert_eq!(seen[0].header("x-ds-subject"), Some("alice"));
    // ds-server is auth-agnostic: the token stays at the edge.
    assert_eq!(seen[0].header("authorization"), None, "{seen:?}");
}

#[tokio::test]
async fn read_with_token_in_query_parameter_works_and_the_token_is_not_forwarded() {
    let stack = Stack::start().await;
    let token = mint(TokenKind::Valid).expect("mint");
    let response = stack
        .client
        .get(stack.url(&format!("{STREAM}?offset=-1&access_token={token}&live=sse")))
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let seen = stack.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    let forwarded = &seen[0].path_and_query;
    assert!(!forwarded.contains("access_token"), "{forwarded}");
    assert!(!forwarded.contains(&token), "{forwarded}");
    // The other parameters survive (Envoy may reorder them).
    assert!(forwarded.starts_with(&format!("{STREAM}?")), "{forwarded}");
    let mut params: Vec<&str> = forwarded
        .split_once('?')
        .map(|(_, q)| q.split('&').collect())
        .unwrap_or_default();
    params.sort_unstable();
    assert_eq!(params, ["live=sse", "offset=-1"]);
    assert_eq!(seen[0].header("x-ds-subject"), Some(DEFAULT_SUBJECT));
}

#[tokio::test]
async fn query_parameter_token_is_refused_for_writes_and_when_invalid() {
    let stack = Stack::start().await;
    let valid = mint(TokenKind::Valid).expect("mint");
    let response = stack
        .client
        .post(stack.url(&format!("{STREAM}?access_token={valid}")))
        .header("content-type", "text/plain")
        .body("x")
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "write with query token"
    );

    let expired = mint(TokenKind::Expired).expect("mint");
    let response = stack
        .client
        .get(stack.url(&format!("{STREAM}?offset=-1&access_token={expired}")))
        .send()
        .await
        .expect("request");
    assert_eq!(
        response.status(),
        StatusCode::UNAUTHORIZED,
        "expired query token"
    );
    assert!(
        stack.upstream.seen().is_empty(),
        "{:?}",
        stack.upstream.seen()
    );
}

#[tokio::test]
async fn cors_preflight_succeeds_without_a_token_and_allows_the_protocol_headers() {
    let stack = Stack::start().await;
    let response = stack
        .client
        .request(Method::OPTIONS, stack.url(STREAM))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, producer-id, producer-epoch, producer-seq",
        )
        .send()
        .await
        .expect("preflight");
    assert!(response.status().is_success(), "{}", response.status());
    let header = |name: &str| {
        response
            .headers()
            .get(name)
            .and_then(|v| v.to_str().ok())
            .unwrap_or_default()
            .to_ascii_lowercase()
    };
    assert_eq!(header("access-control-allow-origin"), "https://app.example");
    let allowed_methods = header("access-control-allow-methods");
    for method in ["get", "head", "post", "put", "delete"] {
        assert!(
            allowed_methods.contains(method),
            "{method} not in {allowed_methods}"
        );
    }
    let allowed = header("access-control-allow-headers");
    for name in [
        "content-type",
        "authorization",
        "if-none-match",
        "stream-seq",
        "stream-ttl",
        "stream-expires-at",
        "stream-closed",
        "producer-id",
        "producer-epoch",
        "producer-seq",
        "stream-forked-from",
        "stream-fork-offset",
        "stream-fork-sub-offset",
    ] {
        assert!(allowed.contains(name), "{name} not in {allowed}");
    }
    // Answered at the edge: nothing reached the server.
    assert!(
        stack.upstream.seen().is_empty(),
        "{:?}",
        stack.upstream.seen()
    );
}

#[tokio::test]
async fn cross_origin_response_exposes_the_protocol_headers() {
    let stack = Stack::start().await;
    let token = mint(TokenKind::Valid).expect("mint");
    let response = stack
        .client
        .get(stack.url(STREAM))
        .bearer_auth(&token)
        .header("origin", "https://app.example")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let exposed = response
        .headers()
        .get("access-control-expose-headers")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_ascii_lowercase();
    for name in [
        "stream-next-offset",
        "stream-cursor",
        "stream-up-to-date",
        "stream-closed",
        "producer-epoch",
        "producer-seq",
        "producer-expected-seq",
        "producer-received-seq",
        "etag",
        "location",
        "content-type",
    ] {
        assert!(exposed.contains(name), "{name} not in {exposed}");
    }
}

#[tokio::test]
async fn healthz_needs_no_token_and_drops_a_spoofed_subject() {
    let stack = Stack::start().await;
    let response = stack
        .client
        .get(stack.url("/healthz"))
        .header("x-ds-subject", "mallory")
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);
    let seen = stack.upstream.seen();
    assert_eq!(seen.len(), 1, "{seen:?}");
    assert_eq!(seen[0].path_and_query, "/healthz");
    assert_eq!(seen[0].header("x-ds-subject"), None, "{seen:?}");
}

#[tokio::test]
async fn sse_streams_unbuffered_past_the_default_route_timeout() {
    let stack = Stack::start().await;
    let token = mint(TokenKind::Valid).expect("mint");
    let client = tls::client_builder()
        .expect("client builder")
        .timeout(SLOW_GAP + Duration::from_secs(20))
        .build()
        .expect("client");
    let started = Instant::now();
    let mut response = client
        .get(stack.url(&format!("{SLOW_SSE}?offset=-1&live=sse")))
        .bearer_auth(&token)
        .send()
        .await
        .expect("request");
    assert_eq!(response.status(), StatusCode::OK);

    let mut body = String::new();
    let mut first_event_after = None;
    while let Some(chunk) = response.chunk().await.expect("stream not cut") {
        body.push_str(&String::from_utf8_lossy(&chunk));
        if first_event_after.is_none() && body.contains("data: first") {
            first_event_after = Some(started.elapsed());
        }
    }
    // Not buffered: the first event arrived long before the upstream sent the second.
    let first = first_event_after.expect("first event delivered");
    assert!(
        first < SLOW_GAP / 2,
        "first event took {first:?}: buffered?"
    );
    // Not cut: the second event, sent after the default route timeout, arrived too.
    assert!(
        body.contains("data: second"),
        "stream ended early: {body:?}"
    );
    assert!(started.elapsed() >= SLOW_GAP, "{:?}", started.elapsed());
}
