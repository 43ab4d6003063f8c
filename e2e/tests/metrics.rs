//! Metrics of the real binaries after real traffic through Envoy: ds-server's appends, bytes and
//! live-reader gauge move as they should; ds-sync's rows and bytes committed grow with the
//! mirror and its lag returns to 0 once Postgres holds everything; Envoy's admin stats are
//! Prometheus text; and no request through Envoy reaches a metrics listener.

mod support;

use std::time::Duration;

use ds_e2e::metrics::{sample, value};
use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{JSON, SseReader, StreamClient, checkpoint};

const DEADLINE: Duration = Duration::from_secs(30);
const STREAM: &str = "/v1/stream/metrics/orders";

const SSE_READERS: &str = "ds_live_readers{mode=\"sse\"}";

#[tokio::test]
async fn metrics_move_with_traffic_and_stay_off_the_public_listener() {
    let mut stack = EdgeStack::start(ServerOptions {
        storage_mode: "file-durable".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let server = &stack.server;
    let before = server.metrics().await.expect("ds-server metrics");
    let appends_before = value(&before, "ds_appends_total").expect("appends");
    let bytes_before = value(&before, "ds_appended_bytes_total").expect("bytes");
    assert_eq!(value(&before, SSE_READERS).expect("sse gauge"), 0.0);

    client.create(STREAM, JSON).await.expect("create");
    let bodies: Vec<String> = (0..5)
        .map(|n| json!({ "order": n, "item": "x".repeat(n * 10) }).to_string())
        .collect();
    for body in &bodies {
        let response = client
            .append(STREAM, JSON, body.clone())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let after = server.metrics().await.expect("ds-server metrics");
    let sent: usize = bodies.iter().map(String::len).sum();
    assert_eq!(
        value(&after, "ds_appends_total").expect("appends"),
        appends_before + 5.0
    );
    assert_eq!(
        value(&after, "ds_appended_bytes_total").expect("bytes"),
        bytes_before + sent as f64
    );
    assert!(
        value(
            &after,
            "ds_http_requests_total{operation=\"append\",status=\"204\"}"
        )
        .expect("append requests")
            >= 5.0
    );
    assert!(
        value(
            &after,
            "ds_storage_sync_duration_seconds_count{mode=\"file-durable\"}"
        )
        .expect("syncs")
            >= 5.0
    );

    // A live SSE reader through Envoy is counted while connected, and not after.
    let response = client
        .request(Method::GET, &format!("{STREAM}?offset=-1&live=sse"))
        .send()
        .await
        .expect("sse");
    assert_eq!(response.status(), StatusCode::OK);
    let mut reader = SseReader::new(response);
    let first = reader.next_event().await.expect("an event").expect("open");
    assert_eq!(first.event, "data");
    wait_until("the SSE reader to be counted", DEADLINE, || async {
        let text = server.metrics().await?;
        Ok((sample(&text, SSE_READERS) == Some(1.0)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    drop(reader);
    wait_until("the SSE reader to be gone", DEADLINE, || async {
        let text = server.metrics().await?;
        Ok((sample(&text, SSE_READERS) == Some(0.0)).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    // Through Envoy, /metrics is a stream path: 401 without a token, 404 with one; never metrics.
    let anonymous = stack
        .client
        .get(format!("{}/metrics", stack.edge_url()))
        .send()
        .await
        .expect("GET /metrics via envoy");
    assert_eq!(anonymous.status(), StatusCode::UNAUTHORIZED);
    let authorized = client
        .request(Method::GET, "/metrics")
        .send()
        .await
        .expect("GET /metrics via envoy");
    assert_eq!(authorized.status(), StatusCode::NOT_FOUND);
    let body = authorized.text().await.unwrap_or_default();
    assert!(!body.contains("ds_appends"), "{body}");

    // Envoy's admin stats, as compose's Prometheus scrapes them.
    let envoy_stats = stack.envoy.prometheus_stats().await.expect("envoy stats");
    assert!(
        envoy_stats.contains("# TYPE envoy_http_downstream_rq_xx counter"),
        "{}",
        &envoy_stats[..envoy_stats.len().min(2000)]
    );

    // ds-sync mirrors the stream: rows and bytes committed grow, lag returns to 0.
    stack
        .start_sync("/v1/stream/metrics/*", Vec::new())
        .await
        .expect("ds-sync");
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    let (_, tail) = client.head(STREAM).await.expect("head");
    let sync = stack.sync.as_ref().expect("sync");
    wait_until("mirrored to the tail", DEADLINE, || async {
        Ok((checkpoint(&pg, STREAM).await?.as_deref() == Some(tail.as_str())).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let lag = format!("ds_sync_stream_lag_seconds{{stream=\"{STREAM}\"}}");
    let caught_up = wait_until("ds-sync's lag to be 0", DEADLINE, || async {
        let text = sync.metrics().await?;
        Ok((sample(&text, &lag) == Some(0.0)
            && sample(&text, "ds_sync_streams_behind") == Some(0.0))
        .then_some(text))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rows = value(&caught_up, "ds_sync_rows_committed_total").expect("rows");
    assert_eq!(rows, 5.0, "{caught_up}");
    let committed = value(&caught_up, "ds_sync_committed_bytes_total").expect("bytes");
    assert!(committed > 0.0, "{caught_up}");
    assert!(value(&caught_up, "ds_sync_pg_transaction_duration_seconds_count").expect("pg") >= 1.0);
    // The stream and the registry.
    assert!(value(&caught_up, "ds_sync_streams_followed").expect("followed") >= 2.0);
    assert_eq!(
        value(&caught_up, "ds_sync_auth_failures_total").expect("401s"),
        0.0
    );

    // More appends: the counters follow, and the lag settles at 0 again.
    for n in 5..8 {
        let response = client
            .append(STREAM, JSON, json!({ "order": n }).to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let later = wait_until("8 rows committed and no lag", DEADLINE, || async {
        let text = sync.metrics().await?;
        Ok((sample(&text, "ds_sync_rows_committed_total") == Some(8.0)
            && sample(&text, &lag) == Some(0.0))
        .then_some(text))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(value(&later, "ds_sync_committed_bytes_total").expect("bytes") > committed);
    assert_eq!(
        value(&later, "ds_sync_lag_max_seconds").expect("max lag"),
        0.0
    );
    let server_after = stack.server.metrics().await.expect("ds-server metrics");
    assert_eq!(
        value(&server_after, "ds_appends_total").expect("appends"),
        appends_before + 8.0
    );
}
