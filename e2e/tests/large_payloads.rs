//! Appends larger than a read page (ds-server caps a read at `DS_LIMITS__MAX_READ_BYTES`, 4 MiB by
//! default) go through Envoy, come back whole from paged catch-up reads, and are mirrored by
//! ds-sync byte for byte (binary: one SSE event of base64) and message for message (JSON: one
//! message larger than a page, which a page must not split).

mod support;

use std::time::Duration;

use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::StatusCode;
use serde_json::json;
use support::{BINARY, Content, JSON, StreamClient, checkpoint, first_difference, mirrored};

const DEADLINE: Duration = Duration::from_secs(45);
/// Above the 4 MiB read page, below the 10 MB default per-stream limit.
const LARGE: usize = 6 * 1024 * 1024;

#[tokio::test]
async fn appends_larger_than_a_read_page_are_read_and_mirrored_whole() {
    let mut stack = EdgeStack::start(ServerOptions::default())
        .await
        .expect("ds-server behind envoy");
    stack
        .start_sync("/v1/stream/large/*", Vec::new())
        .await
        .expect("ds-sync following through envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );

    let binary = "/v1/stream/large/blob";
    client.create(binary, BINARY).await.expect("create");
    let small: Vec<u8> = (0..=255u8).collect();
    let big: Vec<u8> = (0..LARGE).map(|i| (i * 7 + i / 251) as u8).collect();
    for body in [&small, &big, &small] {
        let response = client
            .append(binary, BINARY, body.clone())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let expected_bytes = Content::Bytes([small.clone(), big, small].concat());

    let json_stream = "/v1/stream/large/doc";
    client.create(json_stream, JSON).await.expect("create");
    let huge_message = json!({ "blob": "x".repeat(LARGE) });
    let messages = vec![json!({ "n": 0 }), huge_message, json!({ "n": 2 })];
    for message in &messages {
        let response = client
            .append(json_stream, JSON, message.to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let expected_messages = Content::Messages(messages);

    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    for (path, expected, json) in [
        (binary, &expected_bytes, false),
        (json_stream, &expected_messages, true),
    ] {
        let stream = client.read_all(path).await.expect("catch-up read");
        assert!(
            &stream == expected,
            "{path}: read back {}",
            first_difference(expected, &stream)
        );
        let (_, tail) = client.head(path).await.expect("head");
        wait_until(&format!("{path} mirrored to {tail}"), DEADLINE, || async {
            Ok((checkpoint(&pg, path).await?.as_deref() == Some(tail.as_str())).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{e:#}"));
        let rows = mirrored(&pg, path, json).await.expect("rows");
        assert!(
            &rows == expected,
            "{path}: mirror {}",
            first_difference(expected, &rows)
        );
    }
}
