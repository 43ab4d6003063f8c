//! Client → Envoy over TLS → ds-server over TLS (fixtures CA on both hops, ds-server terminating
//! TLS itself, HTTP/2 on both hops): create, append, catch-up, long-poll (waiting and timing out),
//! and an SSE read held open past 20 s (beyond Envoy's 15 s default route timeout) that delivers
//! every append made meanwhile as it happens, on one connection.

mod support;

use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode, Version};
use serde_json::{Value, json};
use support::{Content, JSON, SseReader, StreamClient};

/// Short enough that the timeout case costs little, long enough to see the poll pending.
const LONG_POLL_TIMEOUT: &str = "2s";

async fn stack() -> EdgeStack {
    EdgeStack::start(ServerOptions {
        extra_env: vec![(
            "DS_SERVER__LONG_POLL_TIMEOUT".to_owned(),
            LONG_POLL_TIMEOUT.to_owned(),
        )],
        // file-durable and TLS: what compose runs.
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server (TLS) behind envoy (TLS)")
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[tokio::test]
async fn create_append_catch_up_and_long_poll_over_tls_on_both_hops() {
    let stack = stack().await;
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let stream = "/v1/stream/tls-both-hops";
    assert!(stack.edge_url().starts_with("https://"));
    assert!(stack.server.base_url().starts_with("https://"));

    client.create(stream, JSON).await.expect("create");
    for n in 0..3 {
        let response = client
            .append(stream, JSON, json!({ "n": n }).to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    // A JSON array appends its elements as separate messages.
    let response = client
        .append(stream, JSON, "[{\"n\":3},{\"n\":4}]")
        .await
        .expect("append array");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let expected: Vec<Value> = (0..5).map(|n| json!({ "n": n })).collect();
    assert_eq!(
        client.read_all(stream).await.expect("catch-up"),
        Content::Messages(expected.clone())
    );
    let response = client
        .request(Method::GET, &format!("{stream}?offset=-1"))
        .send()
        .await
        .expect("catch-up");
    // The client hop negotiated HTTP/2 over TLS (ALPN), as browsers will.
    assert_eq!(response.version(), Version::HTTP_2);
    let tail = header(&response, "stream-next-offset").expect("Stream-Next-Offset");
    assert_eq!(
        header(&response, "stream-up-to-date").as_deref(),
        Some("true")
    );

    // Long-poll at the tail: pending at the server (Envoy counts it as an active upstream
    // request) until an append arrives, then answered with exactly that append.
    let active_before = stack
        .envoy
        .stat("cluster.ds_server.upstream_rq_active")
        .await
        .expect("stat")
        .unwrap_or(0);
    let poll = {
        let client = client.clone();
        let path = format!("{stream}?offset={tail}&live=long-poll");
        tokio::spawn(async move {
            let response = client
                .request(Method::GET, &path)
                .send()
                .await
                .expect("long-poll");
            let status = response.status();
            let next = header(&response, "stream-next-offset");
            let body = response.bytes().await.expect("long-poll body");
            (status, next, body)
        })
    };
    wait_until(
        "long-poll pending at the server",
        Duration::from_secs(10),
        || async {
            let active = stack
                .envoy
                .stat("cluster.ds_server.upstream_rq_active")
                .await?
                .unwrap_or(0);
            Ok((active > active_before).then_some(()))
        },
    )
    .await
    .expect("long-poll reached the server");
    let response = client
        .append(stream, JSON, "{\"n\":5}")
        .await
        .expect("append while polling");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let new_tail = header(&response, "stream-next-offset").expect("append's next offset");
    let (status, next, body) = poll.await.expect("long-poll task");
    assert_eq!(status, StatusCode::OK);
    assert_eq!(next.as_deref(), Some(new_tail.as_str()));
    let delivered: Vec<Value> = serde_json::from_slice(&body).expect("JSON array");
    assert_eq!(delivered, [json!({ "n": 5 })]);

    // Nothing more arrives: the poll times out with 204 at the offset it asked for, through
    // Envoy, not a gateway timeout.
    let started = Instant::now();
    let response = client
        .request(
            Method::GET,
            &format!("{stream}?offset={new_tail}&live=long-poll"),
        )
        .send()
        .await
        .expect("idle long-poll");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    assert_eq!(header(&response, "stream-next-offset"), Some(new_tail));
    assert_eq!(
        header(&response, "stream-up-to-date").as_deref(),
        Some("true")
    );
    assert!(
        started.elapsed() >= Duration::from_millis(1500),
        "204 after {:?}: did it wait?",
        started.elapsed()
    );

    // Both hops are TLS: Envoy completed handshakes with ds-server (which serves nothing else).
    let handshakes = stack
        .envoy
        .stat("cluster.ds_server.ssl.handshake")
        .await
        .expect("stat")
        .unwrap_or(0);
    assert!(handshakes > 0, "no TLS handshake with the upstream");
    // ALPN on the upstream hop: ds-server offers h2, Envoy's auto_config takes it.
    let http2 = stack
        .envoy
        .stat("cluster.ds_server.upstream_cx_http2_total")
        .await
        .expect("stat")
        .unwrap_or(0);
    let http1 = stack
        .envoy
        .stat("cluster.ds_server.upstream_cx_http1_total")
        .await
        .expect("stat")
        .unwrap_or(0);
    assert!(
        http2 > 0 && http1 == 0,
        "upstream connections: {http2} HTTP/2, {http1} HTTP/1.1"
    );
}

/// Appends made while the SSE read is open, one every [`APPEND_EVERY`]: the last lands after
/// 22 s, past 20 s and beyond Envoy's 15 s default route timeout.
const APPENDS: usize = 11;
const APPEND_EVERY: Duration = Duration::from_secs(2);
/// An append must reach the SSE reader within this: not buffered until the response ends.
const DELIVERY_BOUND: Duration = Duration::from_secs(3);

#[tokio::test]
async fn sse_through_envoy_stays_open_past_20_seconds_and_delivers_appends_as_they_happen() {
    let stack = stack().await;
    let client = StreamClient::new(
        stack
            .client_with_timeout(Duration::from_secs(60))
            .expect("client"),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let stream = "/v1/stream/tls-sse-held";
    client.create(stream, JSON).await.expect("create");
    let response = client
        .append(stream, JSON, "{\"n\":0}")
        .await
        .expect("first append");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let opened = Instant::now();
    let response = client
        .request(Method::GET, &format!("{stream}?offset=-1&live=sse"))
        .send()
        .await
        .expect("open SSE");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        header(&response, "content-type").as_deref(),
        Some("text/event-stream")
    );
    let mut events = SseReader::new(response);

    // Appends n = 1..=APPENDS, noting when each was acknowledged.
    let appended_at: Arc<Mutex<Vec<Instant>>> = Arc::default();
    let writer = {
        let client = client.clone();
        let appended_at = appended_at.clone();
        tokio::spawn(async move {
            for n in 1..=APPENDS {
                // Letting time pass with the read open is the point of this test.
                tokio::time::sleep(APPEND_EVERY).await;
                let response = client
                    .append(stream, JSON, json!({ "n": n }).to_string())
                    .await
                    .expect("append while SSE is open");
                assert_eq!(response.status(), StatusCode::NO_CONTENT);
                appended_at.lock().expect("lock").push(Instant::now());
            }
        })
    };

    let mut received: Vec<(Value, Instant)> = Vec::new();
    let mut last_control: Option<Value> = None;
    while received.len() < APPENDS + 1 {
        // Keep-alives come every 15 s and appends every 2 s: 20 s of silence is a hang.
        let event = tokio::time::timeout(Duration::from_secs(20), events.next_event())
            .await
            .expect("an event within 20 s")
            .expect("SSE read failed")
            .unwrap_or_else(|| {
                panic!(
                    "SSE response ended after {:?} with {} of {} messages",
                    opened.elapsed(),
                    received.len(),
                    APPENDS + 1
                )
            });
        match event.event.as_str() {
            "data" => {
                let batch: Vec<Value> =
                    serde_json::from_str(&event.data).expect("data event is a JSON array");
                let now = Instant::now();
                received.extend(batch.into_iter().map(|m| (m, now)));
            }
            "control" => {
                let control: Value = serde_json::from_str(&event.data).expect("control JSON");
                assert!(
                    control.get("streamClosed").is_none(),
                    "stream closed? {control}"
                );
                last_control = Some(control);
            }
            other => panic!("unexpected SSE event {other:?}: {event:?}"),
        }
    }
    writer.await.expect("writer");

    let messages: Vec<Value> = received.iter().map(|(m, _)| m.clone()).collect();
    let expected: Vec<Value> = (0..=APPENDS).map(|n| json!({ "n": n })).collect();
    assert_eq!(messages, expected, "SSE delivered something else");
    // Every append arrived on this one response, promptly: not buffered, not cut and resumed.
    let appended_at = appended_at.lock().expect("lock").clone();
    assert_eq!(appended_at.len(), APPENDS);
    for (n, (at, (_, got))) in appended_at.iter().zip(&received[1..]).enumerate() {
        let delay = got.saturating_duration_since(*at);
        assert!(
            delay < DELIVERY_BOUND,
            "message {} reached the reader {delay:?} after it was acknowledged",
            n + 1
        );
    }
    let last = received.last().expect("messages").1.duration_since(opened);
    assert!(
        last > Duration::from_secs(20),
        "last message only {last:?} after the read opened"
    );
    let control = last_control.expect("a control event");
    assert!(control.get("streamNextOffset").is_some(), "{control}");
}

/// The server ends SSE responses on purpose every `DS_SERVER__SSE_RECONNECT_INTERVAL` (so CDNs can
/// collapse readers): through Envoy that must arrive as a clean end of the response, after a
/// control event, and a client resuming from that event's `streamNextOffset` misses nothing and
/// gets nothing twice.
#[tokio::test]
async fn sse_closed_by_the_server_ends_cleanly_through_envoy_and_resumes_without_gaps() {
    let stack = EdgeStack::start(ServerOptions {
        extra_env: vec![(
            "DS_SERVER__SSE_RECONNECT_INTERVAL".to_owned(),
            "2s".to_owned(),
        )],
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    let client = StreamClient::new(
        stack
            .client_with_timeout(Duration::from_secs(30))
            .expect("client"),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let stream = "/v1/stream/tls-sse-reconnect";
    client.create(stream, JSON).await.expect("create");

    let mut offset = "-1".to_owned();
    let mut received: Vec<Value> = Vec::new();
    let mut next = 0;
    // Three sessions, each ended by the server; an append before each.
    for session in 0..3 {
        let response = client
            .append(stream, JSON, json!({ "n": next }).to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
        next += 1;
        let response = client
            .request(Method::GET, &format!("{stream}?offset={offset}&live=sse"))
            .send()
            .await
            .expect("open SSE");
        assert_eq!(response.status(), StatusCode::OK);
        let mut events = SseReader::new(response);
        let mut last_event = None;
        while let Some(event) = events
            .next_event()
            .await
            .unwrap_or_else(|e| panic!("session {session}: SSE cut instead of ended: {e:#}"))
        {
            match event.event.as_str() {
                "data" => {
                    let batch: Vec<Value> = serde_json::from_str(&event.data).expect("array");
                    received.extend(batch);
                }
                "control" => {
                    let control: Value = serde_json::from_str(&event.data).expect("control");
                    offset = control["streamNextOffset"]
                        .as_str()
                        .expect("streamNextOffset")
                        .to_owned();
                }
                other => panic!("unexpected SSE event {other:?}"),
            }
            last_event = Some(event.event);
        }
        assert_eq!(
            last_event.as_deref(),
            Some("control"),
            "session {session} did not end after a control event"
        );
    }
    let expected: Vec<Value> = (0..next).map(|n| json!({ "n": n })).collect();
    assert_eq!(received, expected);
}
