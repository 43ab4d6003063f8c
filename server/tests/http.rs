//! In-process HTTP tests: the real server on 127.0.0.1:0, driven over real HTTP.
//!
//! One test per protocol trap in `shared/design/LESSONS.md`, plus limits, paging, shutdown and
//! SSE framing. The upstream conformance suite covers the rest against the release binary.

use std::time::Duration;

use ds_server::App;
use ds_server::config::Config;
use reqwest::{Client, StatusCode};
use tokio::sync::oneshot;

struct TestServer {
    base: String,
    streams: std::sync::Arc<ds_server::stream::Streams>,
    client: Client,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    async fn start(tweak: impl FnOnce(&mut Config)) -> TestServer {
        let mut config = Config::default();
        config.server.port = 0;
        config.server.long_poll_timeout = Duration::from_millis(300);
        tweak(&mut config);
        let app = App::build(config).await.expect("server builds");
        let addr = app.local_addr().expect("bound");
        let streams = app.streams();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            streams,
            client: Client::new(),
            stop: Some(stop),
            handle,
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base, path)
    }

    async fn put(&self, path: &str, ct: &str, body: &'static [u8]) -> reqwest::Response {
        self.client
            .put(self.url(path))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("put")
    }

    async fn post(
        &self,
        path: &str,
        ct: &str,
        body: impl Into<reqwest::Body>,
    ) -> reqwest::Response {
        self.client
            .post(self.url(path))
            .header("content-type", ct)
            .body(body)
            .send()
            .await
            .expect("post")
    }

    async fn get(&self, path_and_query: &str) -> reqwest::Response {
        self.client
            .get(self.url(path_and_query))
            .send()
            .await
            .expect("get")
    }

    async fn read_all(&self, path: &str) -> Vec<u8> {
        self.get(&format!("{path}?offset=-1"))
            .await
            .bytes()
            .await
            .expect("body")
            .to_vec()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.handle).await;
    }
}

fn header(r: &reqwest::Response, name: &str) -> Option<String> {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

fn offset_of(r: &reqwest::Response) -> String {
    header(r, "stream-next-offset").expect("Stream-Next-Offset")
}

#[tokio::test]
async fn create_append_read_round_trip() {
    let s = TestServer::start(|_| {}).await;
    let r = s.put("/v1/stream/a", "text/plain", b"hello ").await;
    assert_eq!(r.status(), StatusCode::CREATED);
    assert!(header(&r, "location").is_some_and(|l| l.ends_with("/v1/stream/a")));
    let r = s.post("/v1/stream/a", "text/plain", "world").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset_of(&r), "0000000000000000_0000000000000011");
    assert_eq!(s.read_all("/v1/stream/a").await, b"hello world");
    s.stop().await;
}

#[tokio::test]
async fn long_poll_timeout_answers_the_requested_offset() {
    let s = TestServer::start(|_| {}).await;
    let r = s.put("/v1/stream/lp", "text/plain", b"abc").await;
    let tail = offset_of(&r);
    let r = s
        .get(&format!("/v1/stream/lp?offset={tail}&live=long-poll"))
        .await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset_of(&r), tail);
    assert_eq!(header(&r, "stream-up-to-date").as_deref(), Some("true"));
    assert!(header(&r, "stream-cursor").is_some());
    s.stop().await;
}

/// A long-poll reader that keeps following a stream while writers append must end up with exactly
/// the bytes written: no skipped offsets (the trap: a timeout answering a newer tail), no repeats.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn long_poll_readers_reassemble_exactly_what_concurrent_writers_appended() {
    let s = TestServer::start(|c| c.server.long_poll_timeout = Duration::from_millis(20)).await;
    s.put("/v1/stream/race", "application/octet-stream", b"")
        .await;
    let writer = {
        let client = s.client.clone();
        let url = s.url("/v1/stream/race");
        tokio::spawn(async move {
            let mut expected = Vec::new();
            for i in 0..300u32 {
                let chunk = format!("<{i}>");
                let r = client
                    .post(&url)
                    .header("content-type", "application/octet-stream")
                    .body(chunk.clone())
                    .send()
                    .await
                    .expect("append");
                assert_eq!(r.status(), StatusCode::NO_CONTENT);
                expected.extend_from_slice(chunk.as_bytes());
                if i % 37 == 0 {
                    tokio::time::sleep(Duration::from_millis(20)).await;
                }
            }
            expected
        })
    };
    let mut got = Vec::new();
    let mut offset = "-1".to_owned();
    let expected = loop {
        let r = s
            .get(&format!("/v1/stream/race?offset={offset}&live=long-poll"))
            .await;
        assert!(r.status() == StatusCode::OK || r.status() == StatusCode::NO_CONTENT);
        offset = offset_of(&r);
        got.extend_from_slice(&r.bytes().await.expect("body"));
        if writer.is_finished() {
            let expected = writer.await.expect("writer");
            // Drain whatever is left after the writer stopped.
            loop {
                let r = s.get(&format!("/v1/stream/race?offset={offset}")).await;
                offset = offset_of(&r);
                let up_to_date = header(&r, "stream-up-to-date").is_some();
                got.extend_from_slice(&r.bytes().await.expect("body"));
                if up_to_date {
                    break;
                }
            }
            break expected;
        }
    };
    assert_eq!(
        String::from_utf8_lossy(&got),
        String::from_utf8_lossy(&expected)
    );
    s.stop().await;
}

/// Append-and-close is one step: with writers racing, every append either lands before the
/// close (and is in the stream) or is refused with 409; the close's offset is the final tail and
/// the closing data is the last thing in the stream.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn append_and_close_is_atomic_under_racing_writers() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/close", "text/plain", b"").await;
    let mut writers = Vec::new();
    for w in 0..4 {
        let client = s.client.clone();
        let url = s.url("/v1/stream/close");
        writers.push(tokio::spawn(async move {
            let mut accepted = Vec::new();
            for i in 0..50 {
                let body = format!("[w{w}-{i}]");
                let r = client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(body.clone())
                    .send()
                    .await
                    .expect("append");
                match r.status() {
                    StatusCode::NO_CONTENT => accepted.push(body),
                    StatusCode::CONFLICT => {
                        assert_eq!(header(&r, "stream-closed").as_deref(), Some("true"));
                        break;
                    }
                    other => panic!("unexpected {other}"),
                }
            }
            accepted
        }));
    }
    tokio::time::sleep(Duration::from_millis(5)).await;
    let r = s
        .client
        .post(s.url("/v1/stream/close"))
        .header("content-type", "text/plain")
        .header("stream-closed", "true")
        .body("[FINAL]")
        .send()
        .await
        .expect("close");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "stream-closed").as_deref(), Some("true"));
    let final_offset = offset_of(&r);
    let mut accepted = Vec::new();
    for w in writers {
        accepted.extend(w.await.expect("writer"));
    }
    let content = String::from_utf8(s.read_all("/v1/stream/close").await).expect("utf8");
    assert!(content.ends_with("[FINAL]"), "{content}");
    for body in &accepted {
        assert_eq!(content.matches(body.as_str()).count(), 1, "{body} missing");
    }
    assert_eq!(
        content.len(),
        accepted.iter().map(String::len).sum::<usize>() + "[FINAL]".len()
    );
    let head = s
        .client
        .head(s.url("/v1/stream/close"))
        .send()
        .await
        .expect("head");
    assert_eq!(offset_of(&head), final_offset);
    s.stop().await;
}

#[tokio::test]
async fn producer_retry_of_the_closing_append_is_a_duplicate_and_others_conflict() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/pc", "text/plain", b"").await;
    let send = |seq: &'static str, id: &'static str, body: &'static str| {
        s.client
            .post(s.url("/v1/stream/pc"))
            .header("content-type", "text/plain")
            .header("producer-id", id)
            .header("producer-epoch", "0")
            .header("producer-seq", seq)
            .header("stream-closed", "true")
            .body(body)
            .send()
    };
    let r = send("0", "p1", "last").await.expect("close");
    assert_eq!(r.status(), StatusCode::OK);
    let r = send("0", "p1", "other body").await.expect("retry");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&r, "stream-closed").as_deref(), Some("true"));
    let r = send("1", "p1", "more").await.expect("next seq");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(header(&r, "stream-closed").as_deref(), Some("true"));
    let r = send("0", "p2", "x").await.expect("other producer");
    assert_eq!(r.status(), StatusCode::CONFLICT);
    assert_eq!(s.read_all("/v1/stream/pc").await, b"last");
    s.stop().await;
}

#[tokio::test]
async fn huge_ttl_and_far_future_expiry_are_accepted_without_overflow() {
    let s = TestServer::start(|_| {}).await;
    let r = s
        .client
        .put(s.url("/v1/stream/ttl"))
        .header("stream-ttl", u64::MAX.to_string())
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::CREATED);
    for _ in 0..2 {
        let r = s
            .post("/v1/stream/ttl", "application/octet-stream", "x")
            .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        let r = s.get("/v1/stream/ttl?offset=-1").await;
        assert_eq!(r.status(), StatusCode::OK);
    }
    let r = s
        .client
        .put(s.url("/v1/stream/far"))
        .header("stream-expires-at", "9999-12-31T23:59:59Z")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::CREATED);
    let r = s
        .client
        .head(s.url("/v1/stream/far"))
        .send()
        .await
        .expect("head");
    assert_eq!(r.status(), StatusCode::OK);
    let r = s
        .client
        .put(s.url("/v1/stream/toolong"))
        .header("stream-ttl", "18446744073709551616")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    s.stop().await;
}

#[tokio::test]
async fn expires_at_in_the_past_is_refused_with_400_not_500() {
    let s = TestServer::start(|_| {}).await;
    let r = s
        .client
        .put(s.url("/v1/stream/past"))
        .header("stream-expires-at", "2001-01-01T00:00:00Z")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let text = r.text().await.expect("body");
    assert!(text.contains("Stream-Expires-At"), "{text}");
    s.stop().await;
}

#[tokio::test]
async fn cors_preflight_allows_every_protocol_header_and_exposes_response_headers() {
    let s = TestServer::start(|_| {}).await;
    let r = s
        .client
        .request(reqwest::Method::OPTIONS, s.url("/v1/stream/any"))
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "if-none-match, producer-id",
        )
        .send()
        .await
        .expect("options");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let allow = header(&r, "access-control-allow-headers").expect("allow-headers");
    for h in [
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
        assert!(allow.contains(h), "{h} not allowed: {allow}");
    }
    let expose = header(&r, "access-control-expose-headers").expect("expose-headers");
    for h in [
        "stream-next-offset",
        "stream-cursor",
        "stream-up-to-date",
        "stream-closed",
        "etag",
        "producer-epoch",
        "producer-seq",
        "producer-expected-seq",
        "producer-received-seq",
    ] {
        assert!(expose.contains(h), "{h} not exposed: {expose}");
    }
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("*")
    );
    let r = s.get("/v1/stream/missing").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    assert_eq!(
        header(&r, "x-content-type-options").as_deref(),
        Some("nosniff")
    );
    s.stop().await;
}

#[tokio::test]
async fn cors_origin_list_echoes_only_allowed_origins() {
    let s =
        TestServer::start(|c| c.http.cors_origins = "https://a.example, https://b.example".into())
            .await;
    let ask = |origin: &'static str| {
        s.client
            .get(s.url("/healthz"))
            .header("origin", origin)
            .send()
    };
    let r = ask("https://b.example").await.expect("get");
    assert_eq!(
        header(&r, "access-control-allow-origin").as_deref(),
        Some("https://b.example")
    );
    let r = ask("https://evil.example").await.expect("get");
    assert_eq!(header(&r, "access-control-allow-origin"), None);
    s.stop().await;
}

/// The probes answer GET and HEAD, CORS preflights, and 405 naming what they allow to anything
/// else; `/healthzz` and the like are stream paths, not probes.
#[tokio::test]
async fn probes_answer_get_head_and_preflight_and_refuse_other_methods() {
    let s = TestServer::start(|_| {}).await;
    for path in ["/healthz", "/readyz"] {
        let r = s.client.get(s.url(path)).send().await.expect("get");
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        assert_eq!(
            header(&r, "access-control-allow-origin").as_deref(),
            Some("*")
        );
        let r = s.client.head(s.url(path)).send().await.expect("head");
        assert_eq!(r.status(), StatusCode::OK, "{path}");
        let r = s
            .client
            .request(reqwest::Method::OPTIONS, s.url(path))
            .header("origin", "https://a.example")
            .header("access-control-request-method", "GET")
            .send()
            .await
            .expect("options");
        assert_eq!(r.status(), StatusCode::NO_CONTENT, "{path}");
        assert!(header(&r, "access-control-allow-methods").is_some());
        let r = s
            .client
            .post(s.url(path))
            .body("x")
            .send()
            .await
            .expect("post");
        assert_eq!(r.status(), StatusCode::METHOD_NOT_ALLOWED, "{path}");
        assert_eq!(header(&r, "allow").as_deref(), Some("GET, HEAD, OPTIONS"));
    }
    let r = s.get("/healthzz").await;
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}

/// Reads an SSE response until the connection closes (the stream is closed, so it will).
async fn sse_text(s: &TestServer, path_and_query: &str) -> (reqwest::header::HeaderMap, String) {
    let r = s.get(path_and_query).await;
    let headers = r.headers().clone();
    let text = r.text().await.expect("sse body");
    (headers, text)
}

fn hdr(h: &reqwest::header::HeaderMap, name: &str) -> Option<String> {
    h.get(name).and_then(|v| v.to_str().ok()).map(str::to_owned)
}

#[tokio::test]
async fn sse_pairs_every_data_event_with_a_control_and_splits_every_line_break() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/sse", "text/plain", b"a\r\nb\rc\nd").await;
    s.client
        .post(s.url("/v1/stream/sse"))
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close");
    let (r, text) = sse_text(&s, "/v1/stream/sse?offset=-1&live=sse").await;
    assert_eq!(
        hdr(&r, "content-type").as_deref(),
        Some("text/event-stream")
    );
    assert_eq!(hdr(&r, "stream-sse-data-encoding"), None);
    assert!(
        !text.contains('\r'),
        "payload CR leaked into the frame: {text:?}"
    );
    assert!(
        !text.contains("\nid:") && !text.starts_with("id:"),
        "{text:?}"
    );
    let events: Vec<&str> = text.split("\n\n").filter(|e| !e.is_empty()).collect();
    assert_eq!(events.len(), 2, "{text:?}");
    assert_eq!(events[0], "event: data\ndata:a\ndata:b\ndata:c\ndata:d");
    assert!(events[1].starts_with("event: control\ndata:{"));
    assert!(events[1].contains("\"streamClosed\":true"));
    s.stop().await;
}

#[tokio::test]
async fn sse_on_binary_streams_is_base64() {
    let s = TestServer::start(|_| {}).await;
    s.put(
        "/v1/stream/bin",
        "application/octet-stream",
        b"\x00\x01\x02\xff",
    )
    .await;
    s.client
        .post(s.url("/v1/stream/bin"))
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close");
    let (r, text) = sse_text(&s, "/v1/stream/bin?offset=-1&live=sse").await;
    assert_eq!(
        hdr(&r, "stream-sse-data-encoding").as_deref(),
        Some("base64")
    );
    assert!(
        text.starts_with("event: data\ndata:AAEC/w==\n\nevent: control\n"),
        "{text:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn invalid_utf8_and_unbounded_nesting_in_json_are_refused_and_nothing_is_stored() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/j", "application/json", b"[]").await;
    let r = s
        .post("/v1/stream/j", "application/json", &b"[\"\xff\xfe\"]"[..])
        .await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let deep = "[".repeat(10_000) + &"]".repeat(10_000);
    let r = s.post("/v1/stream/j", "application/json", deep).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.read_all("/v1/stream/j").await, b"[]");
    s.stop().await;
}

#[tokio::test]
async fn appends_past_the_limits_get_413_naming_the_limit_and_store_nothing() {
    let s = TestServer::start(|c| {
        c.limits.max_stream_bytes = 10;
        c.limits.max_memory_bytes = 15;
        c.limits.max_request_bytes = 100;
    })
    .await;
    s.put("/v1/stream/l1", "text/plain", b"12345678").await;
    let r = s.post("/v1/stream/l1", "text/plain", "abc").await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("DS_LIMITS__MAX_STREAM_BYTES")
    );
    s.put("/v1/stream/l2", "text/plain", b"123456").await;
    let r = s.post("/v1/stream/l2", "text/plain", "abcd").await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("DS_LIMITS__MAX_MEMORY_BYTES")
    );
    let r = s.post("/v1/stream/l2", "text/plain", vec![b'x'; 101]).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("DS_LIMITS__MAX_REQUEST_BYTES")
    );
    assert_eq!(s.read_all("/v1/stream/l1").await, b"12345678");
    assert_eq!(s.read_all("/v1/stream/l2").await, b"123456");
    // Deleting frees the budget.
    s.client
        .delete(s.url("/v1/stream/l1"))
        .send()
        .await
        .expect("delete");
    let r = s.post("/v1/stream/l2", "text/plain", "abcd").await;
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    s.stop().await;
}

#[tokio::test]
async fn catch_up_pages_end_on_message_boundaries_and_only_the_last_is_up_to_date() {
    let s = TestServer::start(|c| c.limits.max_read_bytes = 20).await;
    s.put("/v1/stream/pj", "application/json", b"[]").await;
    for i in 0..10 {
        let r = s
            .post(
                "/v1/stream/pj",
                "application/json",
                format!("[{{\"n\":{i}}},{{\"m\":{i}}}]"),
            )
            .await;
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    let mut offset = "-1".to_owned();
    let mut values = Vec::new();
    let mut pages = 0;
    loop {
        let r = s.get(&format!("/v1/stream/pj?offset={offset}")).await;
        assert_eq!(r.status(), StatusCode::OK);
        offset = offset_of(&r);
        let up_to_date = header(&r, "stream-up-to-date").is_some();
        let page: Vec<serde_json::Value> = serde_json::from_slice(&r.bytes().await.expect("body"))
            .expect("each page is a JSON array");
        pages += 1;
        values.extend(page);
        if up_to_date {
            break;
        }
    }
    assert!(pages > 2, "expected paging, got {pages} pages");
    assert_eq!(values.len(), 20);
    assert_eq!(values[19], serde_json::json!({"m": 9}));
    s.stop().await;
}

#[tokio::test]
async fn etag_changes_when_the_stream_closes_and_matches_give_304() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/e", "text/plain", b"data").await;
    let r = s.get("/v1/stream/e?offset=-1").await;
    let etag = header(&r, "etag").expect("etag");
    let r = s
        .client
        .get(s.url("/v1/stream/e?offset=-1"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::NOT_MODIFIED);
    s.client
        .post(s.url("/v1/stream/e"))
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close");
    let r = s
        .client
        .get(s.url("/v1/stream/e?offset=-1"))
        .header("if-none-match", &etag)
        .send()
        .await
        .expect("get");
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "stream-closed").as_deref(), Some("true"));
    assert_ne!(header(&r, "etag").expect("etag"), etag);
    s.stop().await;
}

#[tokio::test]
async fn offsets_are_parsed_structurally_never_compared_as_strings() {
    let s = TestServer::start(|_| {}).await;
    s.put("/v1/stream/o", "text/plain", b"abc").await;
    for bad in [
        "99999999999999999_0",
        "0_99999999999999999999",
        "1",
        "abc",
        "0_0%0A",
    ] {
        let r = s.get(&format!("/v1/stream/o?offset={bad}")).await;
        assert_eq!(r.status(), StatusCode::BAD_REQUEST, "{bad}");
    }
    // A well-formed offset past the tail reads as the tail: nothing, up to date.
    let r = s
        .get("/v1/stream/o?offset=0000000000000000_0000000000000999")
        .await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(offset_of(&r), "0000000000000000_0000000000000003");
    assert!(r.bytes().await.expect("body").is_empty());
    s.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_ends_waiting_long_polls_and_readyz_reports_draining() {
    let s = TestServer::start(|c| c.server.long_poll_timeout = Duration::from_secs(600)).await;
    let r = s.get("/readyz").await;
    assert_eq!(r.status(), StatusCode::OK);
    let r = s.put("/v1/stream/sd", "text/plain", b"x").await;
    let tail = offset_of(&r);
    let poll = {
        let client = s.client.clone();
        let url = s.url(&format!("/v1/stream/sd?offset={tail}&live=long-poll"));
        tokio::spawn(async move { client.get(url).send().await })
    };
    // Wait (with a deadline) until the long-poll is parked on the stream.
    let stream = s.streams.get("/v1/stream/sd", false).expect("stream");
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while stream.live_readers() == 0 {
        assert!(
            tokio::time::Instant::now() < deadline,
            "long-poll never parked"
        );
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    s.stop().await;
    let r = tokio::time::timeout(Duration::from_secs(60), poll)
        .await
        .expect("long-poll ended by shutdown, not by its 600 s timeout")
        .expect("task")
        .expect("response");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    assert_eq!(offset_of(&r), tail);
}

#[tokio::test]
async fn direct_tls_serves_https_with_http2() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut config = Config::default();
    config.server.port = 0;
    config.tls.cert_path = Some(fixtures.join("server.pem"));
    config.tls.key_path = Some(fixtures.join("server-key.pem"));
    let app = App::build(config).await.expect("server builds with TLS");
    assert!(app.is_tls());
    let port = app.local_addr().expect("bound").port();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    let ca = std::fs::read(fixtures.join("ca.pem")).expect("ca");
    let client = Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .build()
        .expect("client");
    let base = format!("https://localhost:{port}");
    let r = client
        .put(format!("{base}/v1/stream/tls"))
        .header("content-type", "text/plain")
        .body("secret")
        .send()
        .await
        .expect("put over tls");
    assert_eq!(r.status(), StatusCode::CREATED);
    assert_eq!(r.version(), reqwest::Version::HTTP_2, "ALPN should pick h2");
    assert!(header(&r, "location").is_some_and(|l| l.starts_with("https://")));
    let r = client
        .get(format!("{base}/v1/stream/tls?offset=-1"))
        .send()
        .await
        .expect("get over tls");
    assert_eq!(r.text().await.expect("body"), "secret");
    // Plain HTTP to the TLS port does not get an answer.
    let plain = Client::new()
        .get(format!("http://127.0.0.1:{port}/healthz"))
        .send()
        .await;
    assert!(plain.is_err() || !plain.expect("response").status().is_success());
    let _ = stop.send(());
    handle.await.expect("join").expect("clean shutdown");
}

#[tokio::test]
async fn tls_with_a_missing_key_file_fails_at_start_naming_it() {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let mut config = Config::default();
    config.server.port = 0;
    config.tls.cert_path = Some(fixtures.join("server.pem"));
    config.tls.key_path = Some(fixtures.join("no-such-key.pem"));
    let err = App::build(config)
        .await
        .err()
        .expect("must fail")
        .to_string();
    assert!(err.contains("DS_TLS__KEY_PATH"), "{err}");
}

#[tokio::test]
async fn the_registry_stream_announces_creates_and_deletes_and_is_read_only() {
    let s = TestServer::start(|_| {}).await;
    let id_of = |r: &reqwest::Response| header(r, "stream-id").expect("stream-id header");
    let r1 = id_of(&s.put("/v1/stream/r1", "text/plain", b"").await);
    let r2 = id_of(&s.put("/v1/stream/r2", "application/json", b"[]").await);
    s.client
        .delete(s.url("/v1/stream/r1"))
        .send()
        .await
        .expect("delete");
    let r1_again = id_of(&s.put("/v1/stream/r1", "text/plain", b"").await);
    assert_ne!(r1, r1_again, "a re-created path is a new stream instance");
    // Every read and HEAD names the instance it served.
    assert_eq!(id_of(&s.get("/v1/stream/r1?offset=-1").await), r1_again);
    let head = s
        .client
        .head(s.url("/v1/stream/r2"))
        .send()
        .await
        .expect("head");
    assert_eq!(id_of(&head), r2);
    // Announcements are appended right after the operations; wait for all four.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    let events = loop {
        let body = s.read_all("/_ds/registry").await;
        let events: Vec<serde_json::Value> = serde_json::from_slice(&body).expect("json array");
        if events.len() >= 4 {
            break events;
        }
        assert!(tokio::time::Instant::now() < deadline, "{events:?}");
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert_eq!(
        events,
        vec![
            serde_json::json!({"event": "created", "path": "/v1/stream/r1", "id": r1, "contentType": "text/plain"}),
            serde_json::json!({"event": "created", "path": "/v1/stream/r2", "id": r2, "contentType": "application/json"}),
            serde_json::json!({"event": "deleted", "path": "/v1/stream/r1", "id": r1}),
            serde_json::json!({"event": "created", "path": "/v1/stream/r1", "id": r1_again, "contentType": "text/plain"}),
        ]
    );
    let r = s.post("/_ds/registry", "application/json", "{}").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s
        .client
        .delete(s.url("/_ds/registry"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    let r = s.put("/_ds/other", "text/plain", b"").await;
    assert_eq!(r.status(), StatusCode::FORBIDDEN);
    s.stop().await;
}

/// Live readers at the same offset share one encoded read: the server encodes an append once,
/// however many readers wait for it.
#[tokio::test]
async fn sse_readers_at_the_same_offset_share_one_encoded_read() {
    let s = TestServer::start(|_| {}).await;
    let r = s
        .put("/v1/stream/fan", "application/octet-stream", b"")
        .await;
    let tail = offset_of(&r);
    s.post("/v1/stream/fan", "application/octet-stream", "payload")
        .await;
    let stream = s.streams.get("/v1/stream/fan", false).expect("stream");
    let visible = stream.visible();
    assert!(stream.shared_read(0, visible).is_none());
    let interval = || ds_protocol::cursor::current_interval(std::time::SystemTime::now());
    let interval_before = interval();
    let mut bodies = Vec::new();
    for _ in 0..3 {
        let mut r = s
            .client
            .get(s.url(&format!("/v1/stream/fan?offset={tail}&live=sse")))
            .send()
            .await
            .expect("sse");
        let first = r.chunk().await.expect("chunk").expect("first event");
        bodies.push(first);
    }
    assert!(
        bodies
            .iter()
            .all(|b| b.starts_with(b"event: data\ndata:cGF5bG9hZA==\n\n"))
    );
    let shared = stream.shared_read(0, visible).expect("the read was shared");
    assert_eq!(shared.next, 7);
    assert!(shared.up_to_date);
    // A reader that echoes a cursor at or past the current interval must get a later one
    // (spec 10.1), so it gets the shared data event with a control event of its own.
    let future = interval_before + 100;
    let mut r = s
        .client
        .get(s.url(&format!(
            "/v1/stream/fan?offset={tail}&live=sse&cursor={future}"
        )))
        .send()
        .await
        .expect("sse");
    let own = r.chunk().await.expect("chunk").expect("first event");
    let own = std::str::from_utf8(&own).expect("utf-8");
    assert!(
        own.starts_with("event: data\ndata:cGF5bG9hZA==\n\n"),
        "{own}"
    );
    let cursor: u64 = own
        .split("\"streamCursor\":\"")
        .nth(1)
        .and_then(|rest| rest.split('"').next())
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("no cursor in {own}"));
    assert!(cursor > future, "cursor {cursor} must pass {future}");
    // Readers without a cursor were sent the shared bytes, control event and all (unless the
    // 20-second interval turned over during the test, when their cursors differ).
    if interval() == interval_before {
        assert!(bodies.iter().all(|b| *b == shared.encoded), "{bodies:?}");
        assert_eq!(shared.cursor, interval_before);
    }
    s.stop().await;
}

#[tokio::test]
async fn idle_sse_connections_get_keep_alive_comments() {
    let s =
        TestServer::start(|c| c.server.sse_keepalive_interval = Duration::from_millis(50)).await;
    s.put("/v1/stream/idle", "text/plain", b"").await;
    let mut r = s
        .client
        .get(s.url("/v1/stream/idle?offset=now&live=sse"))
        .send()
        .await
        .expect("sse");
    let mut seen = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while !String::from_utf8_lossy(&seen).contains(": keep-alive\n\n") {
        let chunk = tokio::time::timeout_at(deadline, r.chunk())
            .await
            .expect("a keep-alive before the deadline")
            .expect("chunk")
            .expect("stream open");
        seen.extend_from_slice(&chunk);
    }
    assert!(String::from_utf8_lossy(&seen).starts_with("event: control\n"));
    s.stop().await;
}

#[tokio::test]
async fn a_chunked_body_over_the_request_cap_gets_413_naming_the_limit() {
    let s = TestServer::start(|c| c.limits.max_request_bytes = 100).await;
    s.put("/v1/stream/chunked", "text/plain", b"").await;
    // No Content-Length: the cap is found while reading the body.
    let chunks: Vec<Result<Vec<u8>, std::io::Error>> = vec![Ok(vec![b'x'; 60]), Ok(vec![b'y'; 60])];
    let body = reqwest::Body::wrap_stream(futures::stream::iter(chunks));
    let r = s.post("/v1/stream/chunked", "text/plain", body).await;
    assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE);
    assert!(
        r.text()
            .await
            .expect("body")
            .contains("DS_LIMITS__MAX_REQUEST_BYTES")
    );
    assert!(s.read_all("/v1/stream/chunked").await.is_empty());
    s.stop().await;
}

/// `offset=now` is the tail when the request is answered, not when its body is first polled: a
/// reader that has seen `200 OK` receives every append made after that, however late its body
/// starts (under load the SSE body runs on another runtime, and was once polled after an append,
/// silently skipping it).
#[tokio::test]
async fn sse_from_now_delivers_appends_made_after_the_headers_even_if_the_body_starts_late() {
    use axum::body::Body;
    use axum::http::Request;
    use futures::StreamExt;
    use tower::ServiceExt;

    let mut config = Config::default();
    config.server.port = 0;
    let app = App::build(config).await.expect("server builds");
    let router = app.handler();
    let send = |req: Request<Body>| router.clone().oneshot(req);
    let text = |req: axum::http::request::Builder, body: &'static str| {
        req.header("content-type", "text/plain")
            .body(Body::from(body))
            .unwrap()
    };
    let created = send(text(Request::put("/v1/stream/late"), "before,"))
        .await
        .unwrap();
    assert_eq!(created.status(), StatusCode::CREATED.as_u16());

    let sse = send(
        Request::get("/v1/stream/late?offset=now&live=sse")
            .body(Body::empty())
            .unwrap(),
    )
    .await
    .unwrap();
    assert_eq!(sse.status(), StatusCode::OK.as_u16());
    // The headers are out; the body has not been polled yet. Now someone appends.
    let appended = send(text(Request::post("/v1/stream/late"), "after"))
        .await
        .unwrap();
    assert_eq!(appended.status(), StatusCode::NO_CONTENT.as_u16());

    let mut body = sse.into_body().into_data_stream();
    let mut text = String::new();
    while !text.contains("event: data") || !text.ends_with("\n\n") {
        let chunk = tokio::time::timeout(Duration::from_secs(10), body.next())
            .await
            .expect("an event within 10 s")
            .expect("the stream stays open")
            .expect("a chunk");
        text.push_str(std::str::from_utf8(&chunk).unwrap());
    }
    let data: Vec<&str> = text
        .lines()
        .filter_map(|l| l.strip_prefix("data:"))
        .filter(|d| !d.starts_with('{'))
        .collect();
    assert_eq!(data, ["after"], "the SSE text was {text:?}");
}

/// One timer serves both the keep-alive and the periodic close: an idle connection gets
/// keep-alives and then ends at the reconnect interval; a connection that keeps receiving data
/// gets no keep-alive in between.
#[tokio::test]
async fn sse_connections_get_keep_alives_then_end_at_the_reconnect_interval() {
    let s = TestServer::start(|c| {
        c.server.sse_keepalive_interval = Duration::from_millis(400);
        c.server.sse_reconnect_interval = Duration::from_millis(2000);
    })
    .await;
    s.put("/v1/stream/idle", "text/plain", b"").await;
    s.put("/v1/stream/busy", "text/plain", b"").await;
    let open = |path: &'static str| {
        s.client
            .get(s.url(&format!("/v1/stream/{path}?offset=now&live=sse")))
            .send()
    };
    let (mut idle, mut busy) = (open("idle").await.unwrap(), open("busy").await.unwrap());
    let writer = {
        let (client, url) = (s.client.clone(), s.url("/v1/stream/busy"));
        tokio::spawn(async move {
            for i in 0..110 {
                client
                    .post(&url)
                    .header("content-type", "text/plain")
                    .body(format!("{i},"))
                    .send()
                    .await
                    .unwrap();
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        })
    };
    let idle_text = drain_sse(&mut idle).await;
    let busy_text = drain_sse(&mut busy).await;
    writer.await.unwrap();
    assert!(
        idle_text.matches(": keep-alive\n\n").count() >= 2,
        "{idle_text:?}"
    );
    assert!(busy_text.contains("event: data\n"), "{busy_text:?}");
    assert!(!busy_text.contains(": keep-alive"), "{busy_text:?}");
    s.stop().await;
}

/// Reads an SSE response until the server ends it (10 s at most).
async fn drain_sse(r: &mut reqwest::Response) -> String {
    let mut text = Vec::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    while let Some(chunk) = tokio::time::timeout_at(deadline, r.chunk())
        .await
        .expect("the connection ends at the reconnect interval, not never")
        .expect("chunk")
    {
        text.extend_from_slice(&chunk);
    }
    String::from_utf8(text).unwrap()
}

/// Reads of large records go out as the records themselves, not copied into one buffer first
/// (`read_body`); after a restart the durable modes serve them from their files and redb.
/// Either way the client gets every byte, in order, with a `Content-Length` that matches.
#[tokio::test]
async fn large_records_read_back_whole_with_their_length_in_every_mode() {
    use ds_server::config::StorageMode;
    for mode in [
        StorageMode::Memory,
        StorageMode::FileDurable,
        StorageMode::Acid,
    ] {
        let dir = tempfile::tempdir().expect("tempdir");
        let configure = |c: &mut Config| {
            c.storage.mode = mode;
            c.storage.data_dir = dir.path().to_owned();
        };
        let s = TestServer::start(configure).await;
        assert_eq!(
            s.put("/v1/stream/big", "application/octet-stream", b"")
                .await
                .status(),
            StatusCode::CREATED
        );
        // Large records (served without a copy) and small ones (copied) in one read.
        let mut expected = Vec::new();
        for i in 0u8..6 {
            let len = if i % 2 == 0 {
                40 * 1024 + usize::from(i)
            } else {
                100
            };
            let record: Vec<u8> = (0..len).map(|j| (j as u8).wrapping_mul(31) ^ i).collect();
            expected.extend_from_slice(&record);
            let r = s
                .post("/v1/stream/big", "application/octet-stream", record)
                .await;
            assert_eq!(r.status(), StatusCode::NO_CONTENT, "{mode:?}");
        }
        let check = |r: reqwest::Response| async move {
            let length = header(&r, "content-length");
            let body = r.bytes().await.expect("body");
            (length, body)
        };
        let (length, body) = check(s.get("/v1/stream/big?offset=-1").await).await;
        assert_eq!(length, Some(expected.len().to_string()), "{mode:?}");
        assert!(body[..] == expected[..], "{mode:?}: the body differs");
        s.stop().await;
        if mode == StorageMode::Memory {
            continue;
        }
        let s = TestServer::start(configure).await;
        let (length, body) = check(s.get("/v1/stream/big?offset=-1").await).await;
        assert_eq!(
            length,
            Some(expected.len().to_string()),
            "{mode:?} after a restart"
        );
        assert!(
            body[..] == expected[..],
            "{mode:?} after a restart: the body differs"
        );
        // The whole stream came in this one response.
        let r = s.get("/v1/stream/big?offset=-1").await;
        let next = offset_of(&r);
        assert!(
            next.ends_with(&format!("{:016}", expected.len())),
            "{mode:?}: {next}"
        );
        s.stop().await;
    }
}
