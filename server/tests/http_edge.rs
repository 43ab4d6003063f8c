//! The server's network edge against hostile clients, over real sockets: request smuggling and
//! every lenient framing form refused, each timeout firing (and none cutting a live reader),
//! the connection cap on plaintext and TLS listeners, HTTP/1.0 with `Expect`, and an append
//! that races a storage shutdown. Timeouts are configured short; the tests wait on conditions
//! (a response, a close) with generous deadlines and assert no durations.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use ds_server::App;
use ds_server::config::Config;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

struct Server {
    addr: std::net::SocketAddr,
    stop: Option<oneshot::Sender<()>>,
}

impl Drop for Server {
    fn drop(&mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
    }
}

async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
    let mut config = Config::default();
    config.server.port = 0;
    tweak(&mut config);
    let app = App::build(config).await.expect("server builds");
    let addr = app.local_addr().expect("bound");
    let (stop, stopped) = oneshot::channel::<()>();
    tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    Server {
        addr,
        stop: Some(stop),
    }
}

/// Short timeouts, for the tests that wait for them.
fn short_timeouts(c: &mut Config) {
    c.server.header_read_timeout = Duration::from_millis(300);
    c.server.idle_timeout = Duration::from_millis(300);
    c.server.body_read_timeout = Duration::from_millis(300);
}

/// How long any test waits for something the server must do.
const PATIENCE: Duration = Duration::from_secs(20);

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

    /// Reads more; 0 at EOF (or a reset).
    async fn more(&mut self) -> usize {
        let mut chunk = [0u8; 8192];
        let n = tokio::time::timeout(PATIENCE, self.tcp.read(&mut chunk))
            .await
            .expect("the server answers or closes in time")
            .unwrap_or(0);
        self.buf.extend_from_slice(&chunk[..n]);
        n
    }

    /// The next response's status and body (responses here carry a Content-Length or are
    /// chunked); `None` if the connection closed first.
    async fn response(&mut self) -> Option<(u16, String)> {
        let head_end = loop {
            if let Some(i) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break i + 4;
            }
            if self.more().await == 0 {
                return None;
            }
        };
        let head = String::from_utf8_lossy(&self.buf[..head_end]).to_ascii_lowercase();
        self.buf.drain(..head_end);
        let status: u16 = head
            .split(' ')
            .nth(1)
            .and_then(|s| s.parse().ok())
            .expect("status");
        let length = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse::<usize>().ok());
        let mut body = Vec::new();
        if let Some(n) = length {
            while self.buf.len() < n {
                assert!(self.more().await > 0, "closed mid-body");
            }
            body = self.buf.drain(..n).collect();
        } else if head.contains("transfer-encoding: chunked") {
            loop {
                let line_end = loop {
                    if let Some(i) = self.buf.windows(2).position(|w| w == b"\r\n") {
                        break i;
                    }
                    assert!(self.more().await > 0, "closed mid-chunk");
                };
                let size = usize::from_str_radix(
                    std::str::from_utf8(&self.buf[..line_end]).expect("ascii"),
                    16,
                )
                .expect("chunk size");
                while self.buf.len() < line_end + 2 + size + 2 {
                    assert!(self.more().await > 0, "closed mid-chunk");
                }
                body.extend_from_slice(&self.buf[line_end + 2..line_end + 2 + size]);
                self.buf.drain(..line_end + 2 + size + 2);
                if size == 0 {
                    break;
                }
            }
        }
        Some((status, String::from_utf8_lossy(&body).into_owned()))
    }

    /// True once the server closed the connection, with nothing more sent.
    async fn closed_silently(&mut self) -> bool {
        self.more().await == 0 && self.buf.is_empty()
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

async fn create(server: &Server, path: &str) {
    let mut c = Raw::connect(server).await;
    c.send(&req("PUT", path, &[("Content-Type", "text/plain")], b""))
        .await;
    assert_eq!(c.response().await.map(|r| r.0), Some(201));
}

async fn read_all(server: &Server, path: &str) -> String {
    let mut c = Raw::connect(server).await;
    c.send(&req("GET", &format!("{path}?offset=-1"), &[], b""))
        .await;
    let (status, body) = c.response().await.expect("read answered");
    assert_eq!(status, 200);
    body
}

#[tokio::test]
async fn the_bare_lf_smuggle_from_issue_19_is_refused_and_the_hidden_request_never_runs() {
    let server = start(|_| {}).await;
    create(&server, "/v1/stream/a").await;
    create(&server, "/v1/stream/other").await;
    let hidden = "POST /v1/stream/other HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 8\r\n\r\nSMUGGLED";
    let raw = format!(
        "POST /v1/stream/a HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
         Transfer-Encoding: chunked\r\n\r\n2;\nXX\r\n7d\r\n0\r\n\r\n{hidden}"
    );
    let mut c = Raw::connect(&server).await;
    c.send(raw.as_bytes()).await;
    let (status, body) = c.response().await.expect("an answer");
    assert_eq!(status, 400, "{body}");
    assert!(body.contains("LF"), "{body}");
    assert!(c.closed_silently().await, "nothing else is answered");
    assert_eq!(read_all(&server, "/v1/stream/other").await, "");
    assert_eq!(read_all(&server, "/v1/stream/a").await, "");
}

#[tokio::test]
async fn every_lenient_framing_form_is_refused_and_the_connection_closed() {
    let server = start(|_| {}).await;
    create(&server, "/x").await;
    let chunked = |rest: &str| {
        format!(
            "POST /x HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
             Transfer-Encoding: chunked\r\n\r\n{rest}"
        )
        .into_bytes()
    };
    let with_head = |fields: &str| {
        format!("POST /x HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n{fields}\r\nabc")
            .into_bytes()
    };
    let big_extension = format!("3;e={}\r\nabc\r\n0\r\n\r\n", "v".repeat(400 * 1024));
    let many_extensions = format!("1;e={}\r\na\r\n", "v".repeat(9000)).repeat(2) + "0\r\n\r\n";
    let big_trailers = format!(
        "3\r\nabc\r\n0\r\n{}\r\n",
        "X-T: 0123456789012345678901234567890123456789\r\n".repeat(5000)
    );
    let many_trailers = format!(
        "3\r\nabc\r\n0\r\n{}\r\n",
        (0..101)
            .map(|i| format!("X-{i}: v\r\n"))
            .collect::<String>()
    );
    let cases: Vec<(&str, Vec<u8>, u16)> = vec![
        (
            "bare LF in an extension",
            chunked("2;\nXX\r\nab\r\n0\r\n\r\n"),
            400,
        ),
        (
            "bare LF ending a size line",
            chunked("3\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "bare LF after chunk data",
            chunked("3\r\nabc\n0\r\n\r\n"),
            400,
        ),
        (
            "bare LF ending the last chunk",
            chunked("3\r\nabc\r\n0\n\r\n"),
            400,
        ),
        (
            "CR inside an extension",
            chunked("3;a\rb\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "space before the size",
            chunked(" 3\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "space after the size",
            chunked("3 \r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "tab after the size",
            chunked("3\t\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "form feed before the size",
            chunked("\x0c3\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "form feed after the size",
            chunked("3\x0c\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "LF before the size",
            chunked("\n3\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        ("empty extension", chunked("3;\r\nabc\r\n0\r\n\r\n"), 400),
        ("0x prefix", chunked("0x3\r\nabc\r\n0\r\n\r\n"), 400),
        (
            "size overflowing 64 bits",
            chunked("10000000000000000\r\n"),
            400,
        ),
        ("400 KB extension", chunked(&big_extension), 400),
        (
            "18 KB of extensions over two chunks",
            chunked(&many_extensions),
            400,
        ),
        ("200 KB of trailers", chunked(&big_trailers), 431),
        ("101 trailer fields", chunked(&many_trailers), 431),
        (
            "trailer that is no field",
            chunked("3\r\nabc\r\n0\r\nnot a field\r\n\r\n"),
            400,
        ),
        (
            "bare LF in a trailer",
            chunked("3\r\nabc\r\n0\r\nX: 1\nY: 2\r\n\r\n"),
            400,
        ),
        (
            "chunk data longer than its size",
            chunked("2\r\nabc\r\n0\r\n\r\n"),
            400,
        ),
        (
            "Content-Length list",
            with_head("Content-Length: 3, 3\r\n"),
            400,
        ),
        (
            "Content-Length with a sign",
            with_head("Content-Length: +3\r\n"),
            400,
        ),
        (
            "conflicting Content-Lengths",
            with_head("Content-Length: 3\r\nContent-Length: 4\r\n"),
            400,
        ),
        (
            "Content-Length and Transfer-Encoding",
            with_head("Content-Length: 3\r\nTransfer-Encoding: chunked\r\n"),
            400,
        ),
        (
            "gzip before chunked",
            with_head("Transfer-Encoding: gzip, chunked\r\n"),
            501,
        ),
        (
            "chunked twice",
            with_head("Transfer-Encoding: chunked\r\nTransfer-Encoding: chunked\r\n"),
            400,
        ),
        (
            "chunked not last",
            with_head("Transfer-Encoding: chunked, identity\r\n"),
            400,
        ),
        (
            "identity",
            with_head("Transfer-Encoding: identity\r\n"),
            400,
        ),
        (
            "Transfer-Encoding on HTTP/1.0",
            b"POST /x HTTP/1.0\r\nTransfer-Encoding: chunked\r\n\r\n3\r\nabc\r\n0\r\n\r\n".to_vec(),
            400,
        ),
        (
            "bare LF between header fields",
            b"POST /x HTTP/1.1\r\nHost: t\nContent-Length: 3\r\n\r\nabc".to_vec(),
            400,
        ),
        (
            "bare LF line ends throughout the head",
            b"POST /x HTTP/1.1\nHost: t\nContent-Length: 3\n\nabc".to_vec(),
            400,
        ),
    ];
    for (what, raw, expected) in cases {
        let mut c = Raw::connect(&server).await;
        c.send(&raw).await;
        let (status, body) = c
            .response()
            .await
            .unwrap_or_else(|| panic!("{what}: no answer"));
        assert_eq!(status, expected, "{what}: {body}");
        assert!(
            !body.trim().is_empty(),
            "{what}: the refusal says what was wrong"
        );
        assert!(c.closed_silently().await, "{what}: the connection closes");
    }
    assert_eq!(read_all(&server, "/x").await, "", "nothing was appended");
}

#[tokio::test]
async fn strict_framing_still_takes_what_the_rfc_allows() {
    let server = start(|_| {}).await;
    create(&server, "/ok").await;
    let mut c = Raw::connect(&server).await;
    let extension = "v".repeat(16 * 1024 - 100);
    c.send(
        format!(
            "POST /ok HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\n\
             Transfer-Encoding: , chunked\r\n\r\n\
             003 ; name = \"quoted \\\" value\" ; flag\r\nabc\r\n\
             1;e={extension}\r\nd\r\n0\r\nX-Sum: 1\r\nX-Other: two\r\n\r\n"
        )
        .as_bytes(),
    )
    .await;
    assert_eq!(c.response().await.map(|r| r.0), Some(204));
    c.send(&req(
        "POST",
        "/ok",
        &[("Content-Type", "text/plain"), ("Content-Length", "2")],
        b"ef",
    ))
    .await;
    assert_eq!(c.response().await.map(|r| r.0), Some(204));
    assert_eq!(read_all(&server, "/ok").await, "abcdef");
}

#[tokio::test]
async fn a_partial_head_gets_408_and_a_close() {
    let server = start(short_timeouts).await;
    let mut c = Raw::connect(&server).await;
    c.send(b"GET /healthz HTTP/1.1\r\nHost: t\r\n").await;
    let (status, body) = c.response().await.expect("an answer");
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("DS_SERVER__HEADER_READ_TIMEOUT"), "{body}");
    assert!(c.closed_silently().await);
}

#[tokio::test]
async fn a_head_trickled_byte_by_byte_still_times_out() {
    let server = start(|c| {
        short_timeouts(c);
        c.server.header_read_timeout = Duration::from_millis(500);
    })
    .await;
    let mut c = Raw::connect(&server).await;
    let head = b"GET /healthz HTTP/1.1\r\nHost: t\r\nX-Slow: aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa";
    // One byte every 50 ms: each read is well within the idle timeout, the whole head is not
    // within the head timeout. The client stops writing once the server has answered.
    for byte in head {
        if c.tcp.write_all(&[*byte]).await.is_err() {
            break;
        }
        let mut peek = [0u8; 1];
        if let Ok(Ok(n)) =
            tokio::time::timeout(Duration::from_millis(50), c.tcp.peek(&mut peek)).await
            && n > 0
        {
            break;
        }
    }
    let (status, _) = c
        .response()
        .await
        .expect("an answer before the head was complete");
    assert_eq!(status, 408);
}

#[tokio::test]
async fn a_silent_connection_and_an_idle_keep_alive_connection_are_closed_without_a_word() {
    let server = start(short_timeouts).await;
    let mut silent = Raw::connect(&server).await;
    let mut idle = Raw::connect(&server).await;
    idle.send(&req("GET", "/healthz", &[], b"")).await;
    assert_eq!(idle.response().await.map(|r| r.0), Some(200));
    assert!(silent.closed_silently().await);
    assert!(idle.closed_silently().await);
}

#[tokio::test]
async fn a_stalled_body_gets_408() {
    let server = start(short_timeouts).await;
    create(&server, "/slow").await;
    let mut c = Raw::connect(&server).await;
    c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: 10\r\n\r\nabc")
        .await;
    let (status, body) = c.response().await.expect("an answer");
    assert_eq!(status, 408, "{body}");
    assert!(body.contains("DS_SERVER__BODY_READ_TIMEOUT"), "{body}");
    let mut c = Raw::connect(&server).await;
    c.send(b"POST /slow HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nab")
        .await;
    assert_eq!(c.response().await.map(|r| r.0), Some(408));
    assert_eq!(read_all(&server, "/slow").await, "");
}

#[tokio::test]
async fn a_partial_http2_preface_gets_408() {
    let server = start(short_timeouts).await;
    let mut c = Raw::connect(&server).await;
    c.send(b"PRI * HTTP/2.0\r\n").await;
    assert_eq!(c.response().await.map(|r| r.0), Some(408));
}

#[tokio::test]
async fn an_idle_http2_connection_is_closed() {
    let server = start(short_timeouts).await;
    let mut c = Raw::connect(&server).await;
    // The preface and an empty SETTINGS frame; then nothing.
    c.send(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n\x00\x00\x00\x04\x00\x00\x00\x00\x00")
        .await;
    // The server's SETTINGS, its ack, a GOAWAY, then EOF.
    while c.more().await > 0 {}
}

/// Reads until the server closes the connection.
async fn wait_for_eof(c: &mut Raw) {
    while c.more().await > 0 {}
}

#[tokio::test]
async fn live_sse_and_long_poll_readers_outlive_every_timeout() {
    let server = start(|c| {
        short_timeouts(c);
        c.server.sse_keepalive_interval = Duration::from_secs(600);
        c.server.sse_reconnect_interval = Duration::from_secs(600);
        c.server.long_poll_timeout = Duration::from_secs(60);
    })
    .await;
    create(&server, "/live").await;
    let mut sse = Raw::connect(&server).await;
    sse.send(&req("GET", "/live?offset=now&live=sse", &[], b""))
        .await;
    let mut long_poll = Raw::connect(&server).await;
    long_poll
        .send(&req("GET", "/live?offset=now&live=long-poll", &[], b""))
        .await;
    // The SSE head and its first control event.
    loop {
        if String::from_utf8_lossy(&sse.buf).contains("event: control") {
            break;
        }
        assert!(sse.more().await > 0, "the SSE stream is open");
    }
    // An HTTP/2 SSE reader too, over h2c.
    let h2 = reqwest::Client::builder()
        .http2_prior_knowledge()
        .build()
        .expect("client");
    let mut h2_sse = h2
        .get(format!("http://{}/live?offset=now&live=sse", server.addr))
        .send()
        .await
        .expect("h2 sse");
    assert_eq!(h2_sse.status(), 200);
    let first = tokio::time::timeout(PATIENCE, h2_sse.chunk())
        .await
        .expect("first event in time")
        .expect("chunk")
        .expect("some bytes");
    assert!(String::from_utf8_lossy(&first).contains("event: control"));
    // Proof that the timeouts have passed: a connection opened after the readers, idle, is
    // closed by the idle timeout.
    let mut sentinel = Raw::connect(&server).await;
    wait_for_eof(&mut sentinel).await;

    let mut w = Raw::connect(&server).await;
    w.send(&req(
        "POST",
        "/live",
        &[("Content-Type", "text/plain")],
        b"late",
    ))
    .await;
    assert_eq!(w.response().await.map(|r| r.0), Some(204));
    let (status, body) = long_poll.response().await.expect("the long-poll answers");
    assert_eq!(status, 200);
    assert_eq!(body, "late");
    loop {
        if String::from_utf8_lossy(&sse.buf).contains("data:late") {
            break;
        }
        assert!(sse.more().await > 0, "the SSE stream was not cut");
    }
    let mut seen = String::new();
    while !seen.contains("data:late") {
        let chunk = tokio::time::timeout(PATIENCE, h2_sse.chunk())
            .await
            .expect("h2 event in time")
            .expect("the h2 SSE stream was not cut")
            .expect("more bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

#[tokio::test]
async fn http10_with_expect_gets_no_100_continue() {
    let server = start(|_| {}).await;
    create(&server, "/old").await;
    let mut c = Raw::connect(&server).await;
    c.send(b"POST /old HTTP/1.0\r\nContent-Type: text/plain\r\nContent-Length: 3\r\nExpect: 100-continue\r\n\r\n")
        .await;
    // An HTTP/1.0 client waits for nothing: it sends the body, and the first answer is final.
    c.send(b"abc").await;
    assert_eq!(c.response().await.map(|r| r.0), Some(204));
    assert_eq!(read_all(&server, "/old").await, "abc");
}

#[tokio::test]
async fn over_the_connection_cap_new_connections_are_refused_and_open_ones_carry_on() {
    let server = start(|c| c.server.max_connections = 2).await;
    let mut a = Raw::connect(&server).await;
    let mut b = Raw::connect(&server).await;
    for c in [&mut a, &mut b] {
        c.send(&req("GET", "/healthz", &[], b"")).await;
        assert_eq!(c.response().await.map(|r| r.0), Some(200));
    }
    let mut over = Raw::connect(&server).await;
    // Refused at once: a 503 written without reading, then the close (or just the close).
    match over.response().await {
        None => {}
        Some((status, body)) => {
            assert_eq!(status, 503);
            assert!(body.contains("DS_SERVER__MAX_CONNECTIONS"), "{body}");
        }
    }
    a.send(&req("GET", "/healthz", &[], b"")).await;
    assert_eq!(
        a.response().await.map(|r| r.0),
        Some(200),
        "open ones carry on"
    );
    drop(b);
    // Once one closes there is room again (the server notices the close asynchronously).
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut c = Raw::connect(&server).await;
        c.send(&req("GET", "/healthz", &[], b"")).await;
        if c.response().await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "room again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

fn tls_config(c: &mut Config) {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    c.tls.cert_path = Some(fixtures.join("server.pem"));
    c.tls.key_path = Some(fixtures.join("server-key.pem"));
}

fn tls_client() -> reqwest::Client {
    let fixtures = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../fixtures");
    let ca = std::fs::read(fixtures.join("ca.pem")).expect("ca");
    reqwest::Client::builder()
        .tls_certs_only([reqwest::Certificate::from_pem(&ca).expect("ca pem")])
        .build()
        .expect("client")
}

#[tokio::test]
async fn tls_connections_are_capped_and_a_stalled_handshake_is_closed() {
    let server = start(|c| {
        tls_config(c);
        short_timeouts(c);
        c.server.max_connections = 1;
    })
    .await;
    // Holds the one place, then times out of it (no handshake within the head timeout).
    let mut stalled = Raw::connect(&server).await;
    let mut over = Raw::connect(&server).await;
    assert!(over.closed_silently().await, "over the cap: closed at once");
    assert!(
        stalled.closed_silently().await,
        "a stalled handshake is closed"
    );
    // Its place is free again.
    let client = tls_client();
    let url = format!("https://localhost:{}/healthz", server.addr.port());
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Ok(r) = client.get(&url).send().await {
            assert_eq!(r.status(), 200);
            break;
        }
        assert!(tokio::time::Instant::now() < deadline, "room again");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn an_idle_tls_connection_is_closed_but_not_one_streaming_sse() {
    let server = start(|c| {
        tls_config(c);
        short_timeouts(c);
        c.server.sse_keepalive_interval = Duration::from_secs(600);
        c.server.sse_reconnect_interval = Duration::from_secs(600);
    })
    .await;
    let base = format!("https://localhost:{}", server.addr.port());
    let client = tls_client();
    let r = client
        .put(format!("{base}/tls-live"))
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), 201);
    let mut sse = client
        .get(format!("{base}/tls-live?offset=now&live=sse"))
        .send()
        .await
        .expect("sse");
    let first = tokio::time::timeout(PATIENCE, sse.chunk())
        .await
        .expect("in time")
        .expect("chunk")
        .expect("bytes");
    assert!(String::from_utf8_lossy(&first).contains("event: control"));
    // A raw TLS-port connection that completes nothing is closed: the timeouts have passed.
    let mut sentinel = Raw::connect(&server).await;
    wait_for_eof(&mut sentinel).await;
    // A second client (its own connection) appends; the first still streams.
    let r = tls_client()
        .post(format!("{base}/tls-live"))
        .header("content-type", "text/plain")
        .body("still here")
        .send()
        .await
        .expect("append");
    assert_eq!(r.status(), 204);
    let mut seen = String::new();
    while !seen.contains("data:still here") {
        let chunk = tokio::time::timeout(PATIENCE, sse.chunk())
            .await
            .expect("event in time")
            .expect("the TLS SSE stream was not cut")
            .expect("more bytes");
        seen.push_str(&String::from_utf8_lossy(&chunk));
    }
}

/// Memory storage whose appends can be made to fail as storage does once it shuts down.
struct Stopping {
    inner: ds_server::storage::memory::MemoryStorage,
    stopped: Arc<AtomicBool>,
}

struct StoppingLog {
    inner: Arc<dyn ds_server::storage::StreamLog>,
    stopped: Arc<AtomicBool>,
}

impl ds_server::storage::Storage for Stopping {
    fn name(&self) -> &'static str {
        "stopping"
    }
    fn create(
        &self,
        meta: &std::sync::Arc<ds_server::storage::StreamMeta>,
        initial: Vec<bytes::Bytes>,
        close: Option<Option<ds_server::storage::ProducerTuple>>,
    ) -> Result<
        (
            Arc<dyn ds_server::storage::StreamLog>,
            ds_server::storage::Commit,
        ),
        ds_server::storage::StorageError,
    > {
        let (inner, commit) = self.inner.create(meta, initial, close)?;
        let log = StoppingLog {
            inner,
            stopped: self.stopped.clone(),
        };
        Ok((Arc::new(log), commit))
    }
    fn recover(
        &self,
    ) -> Result<Vec<ds_server::storage::Recovered>, ds_server::storage::StorageError> {
        self.inner.recover()
    }
}

impl ds_server::storage::StreamLog for StoppingLog {
    fn append(&self, entry: ds_server::storage::AppendEntry) -> ds_server::storage::Commit {
        if self.stopped.load(Ordering::Relaxed) {
            return Box::pin(std::future::ready(Err(
                ds_server::storage::StorageError::ShuttingDown,
            )));
        }
        self.inner.append(entry)
    }
    fn mark_soft_deleted(&self) -> ds_server::storage::Commit {
        self.inner.mark_soft_deleted()
    }
    fn remove(&self) -> ds_server::storage::Commit {
        self.inner.remove()
    }
    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> futures::future::BoxFuture<
        'static,
        Result<ds_server::storage::ReadChunk, ds_server::storage::StorageError>,
    > {
        self.inner.read(from, until, max_bytes, split)
    }
}

#[tokio::test]
async fn an_append_racing_storage_shutdown_gets_503_and_does_not_poison_its_stream() {
    use axum::body::Body;
    use axum::http::Request;
    use tower::ServiceExt;

    let stopped = Arc::new(AtomicBool::new(false));
    let storage = Arc::new(Stopping {
        inner: ds_server::storage::memory::MemoryStorage,
        stopped: stopped.clone(),
    });
    let config = Config::default();
    let limits = ds_server::stream::Limits {
        max_stream_bytes: config.limits.max_stream_bytes,
        max_total_bytes: config.limits.max_memory_bytes,
        max_read_bytes: 1 << 20,
        ..Default::default()
    };
    let streams = Arc::new(ds_server::stream::Streams::open(storage, limits).expect("streams"));
    let handler = ds_server::http::Handler::new(ds_server::http::AppState::new(
        streams.clone(),
        None,
        config,
        tokio_util::sync::CancellationToken::new(),
    ));
    let send = |method: &str, body: &'static str| {
        Request::builder()
            .method(method)
            .uri("/race")
            .header("content-type", "text/plain")
            .body(Body::from(body))
            .expect("request")
    };
    let status = |r: axum::response::Response| r.status().as_u16();
    assert_eq!(
        status(handler.clone().oneshot(send("PUT", "")).await.expect("put")),
        201
    );
    assert_eq!(
        status(
            handler
                .clone()
                .oneshot(send("POST", "kept"))
                .await
                .expect("post")
        ),
        204
    );
    stopped.store(true, Ordering::Relaxed);
    for _ in 0..2 {
        let r = handler
            .clone()
            .oneshot(send("POST", "refused"))
            .await
            .expect("post");
        assert_eq!(status(r), 503);
    }
    // Shutting down is no storage failure: the stream is not poisoned, and what was
    // acknowledged before is still served.
    let stream = streams.get("/race", false).expect("stream");
    assert!(!stream.is_poisoned());
    let r = handler
        .clone()
        .oneshot(
            Request::get("/race?offset=-1")
                .body(Body::empty())
                .expect("request"),
        )
        .await
        .expect("get");
    assert_eq!(r.status(), 200);
    let body = axum::body::to_bytes(r.into_body(), usize::MAX)
        .await
        .expect("body");
    assert_eq!(&body[..], b"kept");
}

#[tokio::test]
async fn a_client_that_stops_reading_its_responses_is_cut_off() {
    let server = start(|c| {
        short_timeouts(c);
        c.server.max_connections = 1;
    })
    .await;
    let mut stalled = Raw::connect(&server).await;
    stalled
        .send(&req(
            "PUT",
            "/big",
            &[("Content-Type", "text/plain")],
            &vec![b'x'; 1 << 20],
        ))
        .await;
    assert_eq!(stalled.response().await.map(|r| r.0), Some(201));
    // 64 MiB of responses asked for, none read: the socket buffers fill and the server's
    // writes stop moving.
    let get = req("GET", "/big?offset=-1", &[], b"");
    stalled.send(&get.repeat(64)).await;
    // The one connection place frees up once the server gives up on the stalled writes.
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let mut c = Raw::connect(&server).await;
        c.send(&req("GET", "/healthz", &[], b"")).await;
        if c.response().await.map(|r| r.0) == Some(200) {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "the stalled connection still holds its place"
        );
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    // What the stalled client can still read is what was buffered, not the 64 MiB.
    let mut total = 0usize;
    loop {
        let mut chunk = vec![0u8; 1 << 16];
        match tokio::time::timeout(PATIENCE, stalled.tcp.read(&mut chunk)).await {
            Ok(Ok(0)) | Ok(Err(_)) => break,
            Ok(Ok(n)) => total += n,
            Err(_) => panic!("the stalled connection was not closed"),
        }
    }
    assert!(total < 64 << 20, "{total} bytes arrived");
}
