//! The Prometheus listener (`DS_METRICS__ADDR`) over real sockets: the series move with real
//! traffic (appends, a live long-poll reader, storage batches and syncs, the connection cap),
//! and the public listener does not serve them. One test: the recorded series are per process.

use std::time::Duration;

use ds_server::App;
use ds_server::config::{Config, StorageMode};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;
use tokio::sync::oneshot;

const PATIENCE: Duration = Duration::from_secs(20);

/// The value of the sample `series` (name with its labels, as written) in `text`, if present.
fn sample(text: &str, series: &str) -> Option<f64> {
    text.lines()
        .find_map(|line| line.strip_prefix(series)?.strip_prefix(' '))
        .and_then(|v| v.trim().parse().ok())
}

fn value(text: &str, series: &str) -> f64 {
    sample(text, series).unwrap_or_else(|| panic!("no sample {series} in:\n{text}"))
}

async fn scrape(client: &reqwest::Client, metrics: std::net::SocketAddr) -> String {
    let response = client
        .get(format!("http://{metrics}/metrics"))
        .send()
        .await
        .expect("scrape");
    assert_eq!(response.status(), 200);
    let ct = response.headers()["content-type"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    assert!(ct.starts_with("text/plain; version=0.0.4"), "{ct}");
    response.text().await.expect("metrics body")
}

/// Polls the metrics until `done` holds for them, for at most [`PATIENCE`].
async fn scrape_until(
    client: &reqwest::Client,
    metrics: std::net::SocketAddr,
    what: &str,
    done: impl Fn(&str) -> bool,
) -> String {
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        let text = scrape(client, metrics).await;
        if done(&text) {
            return text;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "waited in vain for {what}:\n{text}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn series_move_with_traffic_and_only_the_metrics_listener_serves_them() {
    let dir = tempfile::tempdir().expect("tempdir");
    let mut config = Config::default();
    config.server.port = 0;
    config.metrics.addr = "127.0.0.1:0".into();
    config.storage.mode = StorageMode::FileDurable;
    config.storage.data_dir = dir.path().to_owned();
    config.server.max_connections = 4;
    let app = App::build(config).await.expect("server builds");
    let addr = app.local_addr().expect("bound");
    let metrics = app.metrics_addr().expect("metrics listener bound");
    let (stop, stopped) = oneshot::channel::<()>();
    let server = tokio::spawn(app.run(async move {
        let _ = stopped.await;
    }));
    let client = reqwest::Client::new();
    let base = format!("http://{addr}");

    let before = scrape(&client, metrics).await;
    assert_eq!(value(&before, "ds_appends_total"), 0.0);
    assert_eq!(value(&before, "ds_live_readers{mode=\"long_poll\"}"), 0.0);
    assert!(before.contains("# TYPE ds_http_request_duration_seconds histogram"));

    let created = client
        .put(format!("{base}/m/a"))
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("create");
    assert_eq!(created.status(), 201);
    for body in ["hello", "world!"] {
        let r = client
            .post(format!("{base}/m/a"))
            .header("content-type", "text/plain")
            .body(body)
            .send()
            .await
            .expect("append");
        assert_eq!(r.status(), 204);
    }
    let missing = client
        .get(format!("{base}/m/none"))
        .send()
        .await
        .expect("get");
    assert_eq!(missing.status(), 404);

    let after = scrape(&client, metrics).await;
    assert_eq!(value(&after, "ds_appends_total"), 2.0);
    assert_eq!(value(&after, "ds_appended_bytes_total"), 11.0);
    assert_eq!(
        value(
            &after,
            "ds_http_requests_total{operation=\"append\",status=\"204\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "ds_http_requests_total{operation=\"create\",status=\"201\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ds_http_requests_total{operation=\"read\",status=\"404\"}"
        ),
        1.0
    );
    assert_eq!(
        value(
            &after,
            "ds_http_request_duration_seconds_count{operation=\"append\"}"
        ),
        2.0
    );
    assert_eq!(
        value(
            &after,
            "ds_http_request_duration_seconds_bucket{operation=\"append\",le=\"+Inf\"}"
        ),
        2.0
    );
    // file-durable syncs every batch: at least the appends' and the create's.
    let batches = value(
        &after,
        "ds_storage_batch_operations_count{mode=\"file-durable\"}",
    );
    assert!(batches >= 3.0, "{after}");
    assert!(
        value(
            &after,
            "ds_storage_sync_duration_seconds_count{mode=\"file-durable\"}"
        ) >= 3.0
    );
    assert!(value(&after, "ds_streams") >= 1.0);
    assert!(value(&after, "ds_memory_budget_used_bytes") > 0.0);
    assert!(value(&after, "ds_memory_budget_free_bytes") > 0.0);
    assert_eq!(value(&after, "ds_subscriptions"), 0.0);

    // A long-poll at the tail is a live reader until an append answers it.
    let tail = client
        .head(format!("{base}/m/a"))
        .send()
        .await
        .expect("head")
        .headers()["stream-next-offset"]
        .to_str()
        .unwrap_or_default()
        .to_owned();
    let poll = tokio::spawn({
        let client = client.clone();
        let url = format!("{base}/m/a?offset={tail}&live=long-poll");
        async move { client.get(url).send().await.expect("long-poll").status() }
    });
    scrape_until(&client, metrics, "the long-poll reader", |t| {
        sample(t, "ds_live_readers{mode=\"long_poll\"}") == Some(1.0)
    })
    .await;
    let r = client
        .post(format!("{base}/m/a"))
        .header("content-type", "text/plain")
        .body("wake")
        .send()
        .await
        .expect("append");
    assert_eq!(r.status(), 204);
    assert_eq!(poll.await.expect("poll task"), 200);
    let done = scrape_until(&client, metrics, "the long-poll reader to leave", |t| {
        sample(t, "ds_live_readers{mode=\"long_poll\"}") == Some(0.0)
    })
    .await;
    assert_eq!(
        value(
            &done,
            "ds_http_requests_total{operation=\"long_poll\",status=\"200\"}"
        ),
        1.0
    );

    // The public listener has no metrics: /metrics there is a stream path like any other.
    let public = client
        .get(format!("{base}/metrics"))
        .send()
        .await
        .expect("public");
    assert_eq!(public.status(), 404);
    assert!(
        !public
            .text()
            .await
            .unwrap_or_default()
            .contains("ds_appends")
    );
    // And the metrics listener serves nothing else.
    let other = client
        .get(format!("http://{metrics}/m/a"))
        .send()
        .await
        .expect("other path");
    assert_eq!(other.status(), 404);

    // Past the cap (4), connections are refused and counted.
    let mut held = Vec::new();
    let mut refused = false;
    for _ in 0..8 {
        let mut tcp = TcpStream::connect(addr).await.expect("connect");
        tcp.write_all(b"GET /healthz HTTP/1.1\r\nhost: x\r\n\r\n")
            .await
            .expect("write");
        let mut buf = [0u8; 64];
        let n = tcp.read(&mut buf).await.unwrap_or(0);
        if buf[..n].starts_with(b"HTTP/1.1 503") {
            refused = true;
            break;
        }
        held.push(tcp);
    }
    assert!(refused, "no connection was refused past the cap");
    let capped = scrape(&client, metrics).await;
    assert!(value(&capped, "ds_connections_refused_total") >= 1.0);
    assert_eq!(value(&capped, "ds_connections_max"), 4.0);
    assert!(value(&capped, "ds_connections_open") >= held.len() as f64);
    drop(held);

    let _ = stop.send(());
    let _ = server.await;
}
