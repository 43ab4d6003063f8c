//! The plaintext HTTP/1.1 connection layer (`server/src/http/h1.rs`), driven over raw TCP:
//! message framing, pipelining, `Expect: 100-continue`, refusals, connection persistence,
//! hang-up detection for live readers, and the hand-off of h2c connections to HTTP/2.

use std::time::Duration;

use ds_server::App;
use ds_server::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Server {
    addr: std::net::SocketAddr,
    streams: std::sync::Arc<ds_server::stream::Streams>,
    stop: oneshot::Sender<()>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    /// Stops the server and waits for it to finish cleanly.
    async fn stop(self) {
        let _ = self.stop.send(());
        self.handle.await.expect("server task").expect("server run");
    }
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::default();
    config.server.port = 0;
    config.server.long_poll_timeout = Duration::from_secs(30);
    tweak(&mut config);
    let app = App::build(config).await.expect("server builds");
    let addr = app.local_addr().expect("bound");
    let streams = app.streams();
    let (stop, stopped) = oneshot::channel::<()>();
    let handle = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        streams,
        stop,
        handle,
    }
}

/// One parsed response: status, lower-cased headers, body (de-chunked).
#[derive(Debug)]
struct Resp {
    status: u16,
    headers: Vec<(String, String)>,
    body: Vec<u8>,
}

impl Resp {
    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(n, _)| n == name)
            .map(|(_, v)| v.as_str())
    }
}

/// A raw connection that reads responses off the wire.
struct Raw {
    tcp: TcpStream,
    buf: Vec<u8>,
}

impl Raw {
    async fn connect(server: &Server) -> Raw {
        Raw {
            tcp: TcpStream::connect(server.addr).await.expect("connect"),
            buf: Vec::new(),
        }
    }

    async fn send(&mut self, bytes: &[u8]) {
        self.tcp.write_all(bytes).await.expect("write");
    }

    async fn more(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(Duration::from_secs(10), self.tcp.read(&mut chunk))
            .await
            .expect("the server answers within 10 s")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    async fn line(&mut self) -> String {
        loop {
            if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                let line = String::from_utf8_lossy(&self.buf[..i]).into_owned();
                self.buf.drain(..i + 2);
                return line;
            }
            assert!(self.more().await > 0, "connection closed mid-line");
        }
    }

    async fn exact(&mut self, n: usize) -> Vec<u8> {
        while self.buf.len() < n {
            assert!(self.more().await > 0, "connection closed mid-body");
        }
        self.buf.drain(..n).collect()
    }

    /// Reads one response head (skipping nothing: a 100 Continue is returned as itself).
    async fn head(&mut self) -> Resp {
        let status_line = self.line().await;
        let status = status_line
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("bad status line {status_line:?}"));
        let mut headers = Vec::new();
        loop {
            let line = self.line().await;
            if line.is_empty() {
                break;
            }
            let (n, v) = line.split_once(':').expect("header line");
            headers.push((n.trim().to_ascii_lowercase(), v.trim().to_owned()));
        }
        Resp {
            status,
            headers,
            body: Vec::new(),
        }
    }

    /// Reads one whole response to a request of `method`.
    async fn response(&mut self, method: &str) -> Resp {
        let mut r = self.head().await;
        let bodiless = method == "HEAD" || r.status == 204 || r.status == 304;
        if bodiless {
            return r;
        }
        if r.header("transfer-encoding") == Some("chunked") {
            loop {
                let size = usize::from_str_radix(&self.line().await, 16).expect("chunk size");
                let data = self.exact(size).await;
                assert_eq!(self.line().await, "", "chunk ends with CRLF");
                if size == 0 {
                    break;
                }
                r.body.extend(data);
            }
        } else if let Some(n) = r.header("content-length") {
            let n: usize = n.parse().expect("content-length");
            r.body = self.exact(n).await;
        } else {
            while self.more().await > 0 {}
            r.body = std::mem::take(&mut self.buf);
        }
        r
    }

    /// True once the server closed the connection (EOF).
    async fn closed(&mut self) -> bool {
        self.more().await == 0
    }
}

fn req(method: &str, path: &str, headers: &[(&str, &str)], body: &[u8]) -> Vec<u8> {
    let mut out = format!("{method} {path} HTTP/1.1\r\nHost: test\r\n");
    for (n, v) in headers {
        out.push_str(&format!("{n}: {v}\r\n"));
    }
    if !body.is_empty() {
        out.push_str(&format!("Content-Length: {}\r\n", body.len()));
    }
    out.push_str("\r\n");
    let mut out = out.into_bytes();
    out.extend_from_slice(body);
    out
}

#[tokio::test]
async fn pipelined_requests_are_answered_in_order() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    let mut all = req("PUT", "/p", &[("Content-Type", "text/plain")], b"");
    all.extend(req("POST", "/p", &[("Content-Type", "text/plain")], b"one"));
    all.extend(req("POST", "/p", &[("Content-Type", "text/plain")], b"two"));
    all.extend(req("GET", "/p?offset=-1", &[], b""));
    c.send(&all).await;
    assert_eq!(c.response("PUT").await.status, 201);
    assert_eq!(c.response("POST").await.status, 204);
    assert_eq!(c.response("POST").await.status, 204);
    let read = c.response("GET").await;
    assert_eq!(read.status, 200);
    assert_eq!(read.body, b"onetwo");
    assert!(read.header("date").is_some(), "responses carry Date");
}

#[tokio::test]
async fn chunked_bodies_with_extensions_and_trailers_are_stored_exactly() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req("PUT", "/c", &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response("PUT").await.status, 201);
    c.send(
        b"POST /c HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n\
          5;ext=1\r\nhello\r\n1\r\n \r\n5\r\nworld\r\n0\r\nX-Trailer: yes\r\n\r\n",
    )
    .await;
    assert_eq!(c.response("POST").await.status, 204);
    c.send(&req("GET", "/c?offset=-1", &[], b"")).await;
    assert_eq!(c.response("GET").await.body, b"hello world");
}

#[tokio::test]
async fn expect_100_continue_gets_an_interim_response() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req("PUT", "/e", &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response("PUT").await.status, 201);
    c.send(b"POST /e HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .await;
    assert_eq!(c.head().await.status, 100);
    c.send(b"abc").await;
    assert_eq!(c.response("POST").await.status, 204);
}

#[tokio::test]
async fn ambiguous_or_malformed_framing_is_refused_with_400_and_closed() {
    let server = start(|_| {}).await;
    let cases: [&[u8]; 4] = [
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\nContent-Length: 3\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nHost: t\r\nContent-Length: 3, 4\r\n\r\nabc",
        b"POST /x HTTP/1.1\r\nHost: t\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
        b"GET /x HTTP/1.1\r\nHo st: t\r\n\r\n",
    ];
    for raw in cases {
        let mut c = Raw::connect(&server).await;
        c.send(raw).await;
        let r = c.response("POST").await;
        assert_eq!(r.status, 400, "{}", String::from_utf8_lossy(raw));
        assert!(!r.body.is_empty(), "the refusal says what was wrong");
        assert_eq!(r.header("connection"), Some("close"));
        assert!(c.closed().await);
    }
}

#[tokio::test]
async fn an_oversized_head_gets_431() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    let big = "a".repeat(70 * 1024);
    c.send(format!("GET /x HTTP/1.1\r\nHost: t\r\nX-Big: {big}\r\n\r\n").as_bytes())
        .await;
    assert_eq!(c.response("GET").await.status, 431);
}

#[tokio::test]
async fn a_chunked_body_over_the_request_cap_gets_413_and_stores_nothing() {
    let server = start(|c| c.limits.max_request_bytes = 10).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req("PUT", "/big", &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response("PUT").await.status, 201);
    c.send(b"POST /big HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n8\r\n12345678\r\n8\r\n12345678\r\n0\r\n\r\n")
        .await;
    let r = c.response("POST").await;
    assert_eq!(r.status, 413);
    assert!(String::from_utf8_lossy(&r.body).contains("DS_LIMITS__MAX_REQUEST_BYTES"));
    let mut d = Raw::connect(&server).await;
    d.send(&req("GET", "/big?offset=-1", &[], b"")).await;
    assert_eq!(d.response("GET").await.body, b"");
}

#[tokio::test]
async fn http10_and_connection_close_end_the_connection() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(b"GET /healthz HTTP/1.0\r\n\r\n").await;
    let r = c.response("GET").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.header("connection"), Some("close"));
    assert!(c.closed().await);

    let mut c = Raw::connect(&server).await;
    c.send(&req("GET", "/healthz", &[("Connection", "close")], b""))
        .await;
    assert_eq!(c.response("GET").await.status, 200);
    assert!(c.closed().await);
}

#[tokio::test]
async fn head_and_204_carry_no_body() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req(
        "PUT",
        "/h",
        &[("Content-Type", "text/plain")],
        b"data",
    ))
    .await;
    assert_eq!(c.response("PUT").await.status, 201);
    c.send(&req("HEAD", "/h", &[], b"")).await;
    let head = c.response("HEAD").await;
    assert_eq!(head.status, 200);
    c.send(&req("POST", "/h", &[("Content-Type", "text/plain")], b"x"))
        .await;
    let append = c.response("POST").await;
    assert_eq!(append.status, 204);
    assert_eq!(append.header("content-length"), None);
    // Had HEAD or 204 carried a body, this response would not parse.
    c.send(&req("GET", "/h?offset=-1", &[], b"")).await;
    assert_eq!(c.response("GET").await.body, b"datax");
}

/// Waits (up to 5 s) until a stream has `n` live readers; whether it got there.
async fn live_readers_reach(server: &Server, path: &str, n: usize) -> bool {
    let stream = server.streams.get(path, false).expect("stream exists");
    for _ in 0..200 {
        if stream.live_readers() == n {
            return true;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    false
}

#[tokio::test]
async fn a_client_that_hangs_up_on_sse_or_long_poll_is_noticed_at_once() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req("PUT", "/live", &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response("PUT").await.status, 201);

    let mut sse = Raw::connect(&server).await;
    sse.send(&req("GET", "/live?offset=now&live=sse", &[], b""))
        .await;
    let head = sse.head().await;
    assert_eq!(head.status, 200);
    assert_eq!(head.header("transfer-encoding"), Some("chunked"));
    let mut lp = Raw::connect(&server).await;
    lp.send(&req("GET", "/live?offset=now&live=long-poll", &[], b""))
        .await;
    assert!(
        live_readers_reach(&server, "/live", 2).await,
        "both readers are waiting"
    );
    drop(sse);
    drop(lp);
    // No append, no keep-alive tick: only noticing the hang-up frees them.
    assert!(live_readers_reach(&server, "/live", 0).await);
}

#[tokio::test]
async fn sse_events_arrive_as_chunks_and_the_connection_ends_with_the_stream() {
    let server = start(|_| {}).await;
    let mut c = Raw::connect(&server).await;
    c.send(&req(
        "PUT",
        "/s",
        &[("Content-Type", "text/plain"), ("Stream-Closed", "true")],
        b"first",
    ))
    .await;
    assert_eq!(c.response("PUT").await.status, 201);
    let mut sse = Raw::connect(&server).await;
    sse.send(&req("GET", "/s?offset=-1&live=sse", &[], b""))
        .await;
    let head = sse.head().await;
    assert_eq!(head.status, 200);
    // Streams run on the live runtime and end their connection.
    assert_eq!(head.header("connection"), Some("close"));
    let mut text = String::new();
    loop {
        let size = usize::from_str_radix(&sse.line().await, 16).expect("chunk size");
        text.push_str(&String::from_utf8_lossy(&sse.exact(size).await));
        assert_eq!(sse.line().await, "");
        if size == 0 {
            break;
        }
    }
    assert!(text.contains("event: data\ndata:first\n"), "{text}");
    assert!(text.contains("\"streamClosed\":true"), "{text}");
    assert!(sse.closed().await, "the server closes after the last chunk");
}

#[tokio::test]
async fn h2c_with_prior_knowledge_is_served_over_http2() {
    let server = start(|_| {}).await;
    let client = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let base = format!("http://{}", server.addr);
    let r = client
        .put(format!("{base}/h2"))
        .header("content-type", "text/plain")
        .body("over h2")
        .send()
        .await
        .expect("put");
    assert_eq!(r.version(), reqwest::Version::HTTP_2);
    assert_eq!(r.status(), 201);
    let r = client
        .get(format!("{base}/h2?offset=-1"))
        .send()
        .await
        .expect("get");
    assert_eq!(r.text().await.expect("body"), "over h2");
}

/// The fixed browser headers come from the HTTP/1.1 writer's pre-encoded bytes, and from the
/// header map on HTTP/2: either way every response has each exactly once.
#[tokio::test]
async fn every_response_carries_the_browser_headers_once_over_http1_and_http2() {
    for origins in ["*", "https://a.example"] {
        let server = start(|c| c.http.cors_origins = origins.into()).await;
        let base = format!("http://{}", server.addr);
        let h1 = reqwest::Client::builder().http1_only().build().expect("h1");
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("h2");
        for (client, version, path) in [
            (&h1, reqwest::Version::HTTP_11, "/bh1"),
            (&h2, reqwest::Version::HTTP_2, "/bh2"),
        ] {
            let url = format!("{base}{path}");
            let producer = |r: reqwest::RequestBuilder| {
                r.header("content-type", "text/plain")
                    .header("producer-id", "p")
                    .header("producer-epoch", "0")
                    .header("producer-seq", "0")
            };
            let responses = [
                client.put(&url).header("content-type", "text/plain"),
                producer(client.post(&url)).body("a"),
                client.get(format!("{url}?offset=-1")),
                client.head(&url),
                client.get(format!("{base}/missing")),
                client.get(format!("{base}/healthz")),
                client.request(reqwest::Method::OPTIONS, &url),
                client.delete(&url),
            ];
            for request in responses {
                let r = request
                    .header("origin", "https://a.example")
                    .send()
                    .await
                    .expect("send");
                assert_eq!(r.version(), version);
                let what = format!("{origins}: {} {}", r.status(), r.url());
                let once = |name: &str| {
                    let values: Vec<_> = r.headers().get_all(name).iter().collect();
                    assert_eq!(values.len(), 1, "{what}: {name} {values:?}");
                    values[0].to_str().expect("ascii").to_owned()
                };
                assert_eq!(once("x-content-type-options"), "nosniff", "{what}");
                assert_eq!(
                    once("cross-origin-resource-policy"),
                    "cross-origin",
                    "{what}"
                );
                assert!(once("access-control-expose-headers").contains("stream-next-offset"));
                assert_eq!(once("x-request-id").len(), 25, "{what}");
                if origins == "*" {
                    assert_eq!(once("access-control-allow-origin"), "*", "{what}");
                    assert!(r.headers().get("vary").is_none(), "{what}");
                } else {
                    assert_eq!(once("access-control-allow-origin"), "https://a.example");
                    assert_eq!(once("vary"), "origin", "{what}");
                }
            }
        }
        server.stop().await;
    }
}

/// No browser sent a request without `Origin`: a stored append's answer to one carries the
/// security headers but not the CORS ones (a third of the bytes). With `Origin`, or when the
/// append is refused, it carries them all (above).
#[tokio::test]
async fn an_append_without_origin_is_answered_without_cors_headers() {
    for origins in ["*", "https://a.example"] {
        let server = start(|c| c.http.cors_origins = origins.into()).await;
        let h1 = reqwest::Client::builder().http1_only().build().expect("h1");
        let h2 = reqwest::Client::builder()
            .http2_prior_knowledge()
            .build()
            .expect("h2");
        for (client, path) in [(&h1, "no-origin-1"), (&h2, "no-origin-2")] {
            let url = format!("http://{}/v1/stream/{path}", server.addr);
            let r = client
                .put(&url)
                .header("content-type", "text/plain")
                .send()
                .await
                .expect("put");
            assert_eq!(r.status(), 201);
            for producer in [false, true] {
                let mut request = client.post(&url).header("content-type", "text/plain");
                if producer {
                    request = request
                        .header("producer-id", "p")
                        .header("producer-epoch", "0")
                        .header("producer-seq", "0");
                }
                let r = request.body("a").send().await.expect("post");
                let what = format!("{origins} {path}, producer {producer}: {}", r.status());
                assert!(r.status().is_success(), "{what}");
                assert_eq!(r.headers()["x-content-type-options"], "nosniff", "{what}");
                assert_eq!(
                    r.headers()["cross-origin-resource-policy"],
                    "cross-origin",
                    "{what}"
                );
                assert!(r.headers().contains_key("stream-next-offset"), "{what}");
                let cors: Vec<_> = r
                    .headers()
                    .keys()
                    .filter(|k| k.as_str().starts_with("access-control-"))
                    .collect();
                assert!(cors.is_empty(), "{what}: {cors:?}");
            }
            // A refused append (wrong content type) is answered like any response.
            let r = client
                .post(&url)
                .header("content-type", "application/json")
                .body("[1]")
                .send()
                .await
                .expect("post");
            assert_eq!(r.status(), 409);
            assert!(r.headers().contains_key("access-control-expose-headers"));
        }
        server.stop().await;
    }
}

#[tokio::test]
async fn shutdown_ends_sse_streams_on_the_live_runtime() {
    let server = start(|c| {
        // Neither the reconnect interval nor a keep-alive may be what ends the stream.
        c.server.sse_reconnect_interval = Duration::from_secs(600);
        c.server.sse_keepalive_interval = Duration::from_secs(600);
    })
    .await;
    let mut c = Raw::connect(&server).await;
    c.send(&req("PUT", "/sd", &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response("PUT").await.status, 201);
    let mut sse = Raw::connect(&server).await;
    sse.send(&req("GET", "/sd?offset=now&live=sse", &[], b""))
        .await;
    assert_eq!(sse.head().await.status, 200);
    // The first control event says the reader is up to date; then the stream waits.
    let size = usize::from_str_radix(&sse.line().await, 16).expect("chunk size");
    let first = String::from_utf8_lossy(&sse.exact(size).await).into_owned();
    assert!(first.contains("event: control"), "{first}");
    assert_eq!(sse.line().await, "");

    let _ = server.stop.send(());
    // The stream ends with its last chunk and the connection closes (`more` fails the test
    // if nothing arrives for 10 s).
    assert_eq!(sse.line().await, "0");
    assert_eq!(sse.line().await, "");
    assert!(sse.closed().await);
    server
        .handle
        .await
        .expect("server task")
        .expect("server ran cleanly");
}

/// A plain append (a POST to a bare stream path) is parsed and answered without a header map
/// (`AppendHead` in h1.rs); the same append with a query string takes the general path. Two
/// streams given the same requests, one each way, must get the same answers, byte for byte
/// apart from `Date` and made-up request ids: status, every header in order, body, and
/// whether the connection stays open.
#[tokio::test]
async fn plain_appends_are_answered_as_the_general_path_answers_them() {
    for origins in ["*", "https://a.example"] {
        let server = start(|c| {
            c.http.cors_origins = origins.into();
            c.limits.max_request_bytes = 1024;
        })
        .await;
        let long_id = "p".repeat(300);
        let producer = |seq: &'static str| {
            vec![
                ("Content-Type", "text/plain"),
                ("Producer-Id", "p"),
                ("Producer-Epoch", "0"),
                ("Producer-Seq", seq),
            ]
        };
        let text = vec![("Content-Type", "text/plain")];
        // (headers, body): each sent to /plain-N and to /general-N?via=general.
        let cases: Vec<(Fields, &[u8])> = vec![
            (text.clone(), b"a"),
            (producer("0"), b"b"),
            (producer("0"), b"b"),
            (producer("5"), b"c"),
            (vec![("Content-Type", "application/json")], b"[1]"),
            (
                vec![("Content-Type", "text/plain"), ("Stream-Seq", "b")],
                b"d",
            ),
            (
                vec![("Content-Type", "text/plain"), ("Stream-Seq", "a")],
                b"e",
            ),
            (text.clone(), b""),
            (
                vec![("content-type", "text/plain"), ("X-Request-Id", "edge-7")],
                b"f",
            ),
            (
                vec![
                    ("Content-Type", "text/plain"),
                    ("Origin", "https://a.example"),
                ],
                b"g",
            ),
            (
                vec![
                    ("Content-Type", "text/plain"),
                    ("Origin", "https://b.example"),
                ],
                b"h",
            ),
            (
                vec![
                    ("Content-Type", "text/plain"),
                    ("Producer-Id", &long_id),
                    ("Producer-Epoch", "0"),
                    ("Producer-Seq", "0"),
                ],
                b"i",
            ),
            (
                vec![("Content-Type", "text/plain"), ("Producer-Id", "q")],
                b"j",
            ),
            (
                vec![("Content-Type", "text/plain"), ("Stream-Closed", "true")],
                b"k",
            ),
            (text.clone(), b"l"),
        ];
        let mut plain = Raw::connect(&server).await;
        let mut general = Raw::connect(&server).await;
        for (c, path) in [(&mut plain, "/plain"), (&mut general, "/general")] {
            c.send(&req("PUT", path, &text, b"")).await;
            assert_eq!(c.response("PUT").await.status, 201);
        }
        for (i, (headers, body)) in cases.iter().enumerate() {
            plain.send(&req("POST", "/plain", headers, body)).await;
            general
                .send(&req("POST", "/general?via=general", headers, body))
                .await;
            let a = plain.response("POST").await;
            let b = general.response("POST").await;
            assert_same_answer(&a, &b, &format!("{origins} case {i}"));
        }
        // A missing stream, `Connection: close`, and a body declared over the limit (refused
        // unread, then the connection closes).
        let ends: Vec<(&str, Fields, bool)> = vec![
            ("/missing", text.clone(), false),
            (
                "/plain",
                vec![
                    ("Content-Type", "text/plain"),
                    ("Connection", "keep-alive, close"),
                ],
                true,
            ),
        ];
        for (path, headers, closes) in ends {
            let mut plain = Raw::connect(&server).await;
            let mut general = Raw::connect(&server).await;
            plain.send(&req("POST", path, &headers, b"m")).await;
            general
                .send(&req("POST", &format!("{path}?via=general"), &headers, b"m"))
                .await;
            let a = plain.response("POST").await;
            let b = general.response("POST").await;
            assert_same_answer(&a, &b, &format!("{origins} {path}"));
            for c in [&mut plain, &mut general] {
                if closes {
                    assert!(c.closed().await, "{path}");
                } else {
                    c.send(&req("GET", "/healthz", &[], b"")).await;
                    assert_eq!(c.response("GET").await.status, 200, "{path}");
                }
            }
        }
        let mut plain = Raw::connect(&server).await;
        let mut general = Raw::connect(&server).await;
        let oversized = b"POST /plain HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 2048\r\n\r\n";
        plain.send(oversized).await;
        general
            .send(&[&b"POST /plain?via=general"[..], &oversized[11..]].concat())
            .await;
        let a = plain.response("POST").await;
        let b = general.response("POST").await;
        assert_eq!(a.status, 413);
        assert_same_answer(&a, &b, "declared too large");
        assert!(plain.closed().await && general.closed().await);
        server.stop().await;
    }
}

/// Header fields of a request, in order.
type Fields<'a> = Vec<(&'a str, &'a str)>;

fn assert_same_answer(a: &Resp, b: &Resp, what: &str) {
    let strip = |r: &Resp| -> Vec<(String, String)> {
        r.headers
            .iter()
            .filter(|(n, _)| n != "date")
            .map(|(n, v)| {
                // Made-up ids differ; one sent is echoed by both.
                let v = if n == "x-request-id" && v.len() == 25 {
                    "(made up)".to_owned()
                } else {
                    v.clone()
                };
                (n.clone(), v)
            })
            .collect()
    };
    assert_eq!(a.status, b.status, "{what}");
    assert_eq!(strip(a), strip(b), "{what}");
    assert_eq!(
        String::from_utf8_lossy(&a.body),
        String::from_utf8_lossy(&b.body),
        "{what}"
    );
    assert!(
        a.header("date").is_some() && a.header("x-request-id").is_some(),
        "{what}"
    );
}
