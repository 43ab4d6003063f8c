//! A stream's end reaches the mirror through Envoy: streams created after ds-sync started are
//! discovered by prefix (the server's registry, read through Envoy with a bearer token); a stream
//! closed with an atomic final append is mirrored to its last message and checkpointed `closed`;
//! a deleted stream is checkpointed `deleted` and the rows mirrored before the delete stay; a
//! stream re-created at a deleted path is mirrored again, as the path's next incarnation (fenced
//! by the stream id the server names through Envoy), and blocks no other stream.

mod support;

use std::time::Duration;

use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode};
use serde_json::json;
use support::{BINARY, Content, JSON, StreamClient, checkpoint, first_difference, mirrored};

const DEADLINE: Duration = Duration::from_secs(30);

/// `(closed, deleted)` of a stream's checkpoint row, once it has one.
async fn end_state(
    pg: &tokio_postgres::Client,
    stream: &str,
) -> anyhow::Result<Option<(bool, bool)>> {
    let row = pg
        .query_opt(
            "SELECT closed, deleted FROM ds_checkpoints WHERE stream = $1",
            &[&stream],
        )
        .await?;
    Ok(row.map(|row| (row.get(0), row.get(1))))
}

#[tokio::test]
async fn closed_and_deleted_streams_end_in_the_mirror_as_they_ended_on_the_server() {
    let mut stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    stack
        .start_sync("/v1/stream/life/*", Vec::new())
        .await
        .expect("ds-sync following through envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");

    // Closed with its final message in the same request.
    let closed = "/v1/stream/life/closed";
    client.create(closed, JSON).await.expect("create");
    for n in 0..3 {
        let response = client
            .append(closed, JSON, json!({ "n": n }).to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let response = client
        .request(Method::POST, closed)
        .header("content-type", JSON)
        .header("stream-closed", "true")
        .body(json!({ "n": "last" }).to_string())
        .send()
        .await
        .expect("append and close");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    // Written, then deleted once the mirror has it.
    let deleted = "/v1/stream/life/deleted";
    client.create(deleted, BINARY).await.expect("create");
    let written: Vec<u8> = (0..=255u8).chain((0..=255u8).rev()).collect();
    for chunk in written.chunks(100) {
        let response = client
            .append(deleted, BINARY, chunk.to_vec())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }
    let (_, tail) = client.head(deleted).await.expect("head");
    wait_until(
        "the deleted-to-be stream mirrored to its tail",
        DEADLINE,
        || async {
            Ok((checkpoint(&pg, deleted).await?.as_deref() == Some(tail.as_str())).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let response = client
        .request(Method::DELETE, deleted)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    wait_until("closed checkpoint", DEADLINE, || async {
        Ok((end_state(&pg, closed).await? == Some((true, false))).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let stream = client.read_all(closed).await.expect("catch-up read");
    let expected = Content::Messages(vec![
        json!({ "n": 0 }),
        json!({ "n": 1 }),
        json!({ "n": 2 }),
        json!({ "n": "last" }),
    ]);
    assert_eq!(stream, expected);
    let rows = mirrored(&pg, closed, true).await.expect("rows");
    assert!(rows == stream, "{}", first_difference(&stream, &rows));

    wait_until("deleted checkpoint", DEADLINE, || async {
        Ok((end_state(&pg, deleted).await? == Some((false, true))).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let rows = mirrored(&pg, deleted, false).await.expect("rows");
    let expected = Content::Bytes(written);
    assert!(rows == expected, "{}", first_difference(&expected, &rows));
}

/// `(incarnation, closed, deleted)` of a stream's checkpoint row, once it has one.
async fn incarnation_state(
    pg: &tokio_postgres::Client,
    stream: &str,
) -> anyhow::Result<Option<(i32, bool, bool)>> {
    let row = pg
        .query_opt(
            "SELECT incarnation, closed, deleted FROM ds_checkpoints WHERE stream = $1",
            &[&stream],
        )
        .await?;
    Ok(row.map(|row| (row.get(0), row.get(1), row.get(2))))
}

/// The `Stream-Id` the server (through Envoy) names for the stream at `path` now.
async fn served_stream_id(client: &StreamClient, path: &str) -> anyhow::Result<String> {
    let response = client.request(Method::HEAD, path).send().await?;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "HEAD {path}: {}",
        response.status()
    );
    let id = response
        .headers()
        .get("stream-id")
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| anyhow::anyhow!("HEAD {path} without Stream-Id"))?;
    Ok(id.to_owned())
}

/// The stream id recorded for the latest incarnation of `stream`.
async fn recorded_stream_id(
    pg: &tokio_postgres::Client,
    stream: &str,
) -> anyhow::Result<Option<String>> {
    let row = pg
        .query_one(
            "SELECT stream_id FROM ds_checkpoints WHERE stream = $1",
            &[&stream],
        )
        .await?;
    Ok(row.get(0))
}

/// The messages of every incarnation of a JSON stream, oldest incarnation first, each in key
/// order: `(incarnation, message)`.
async fn every_incarnation(
    pg: &tokio_postgres::Client,
    stream: &str,
) -> anyhow::Result<Vec<(i32, serde_json::Value)>> {
    let rows = pg
        .query(
            "SELECT incarnation, data::text FROM ds_messages WHERE stream = $1 \
             ORDER BY incarnation, stream_offset, idx",
            &[&stream],
        )
        .await?;
    rows.iter()
        .map(|row| {
            let text: String = row.get(1);
            Ok((row.get(0), serde_json::from_str(&text)?))
        })
        .collect()
}

/// A path deleted and created again holds a new stream whose offsets start again: ds-sync
/// mirrors it as the path's second incarnation (the registry's `created` event starts it at the
/// new stream's beginning), keeps the first incarnation's rows, and `ds_current_messages` shows
/// the stream the server holds now.
#[tokio::test]
async fn a_stream_recreated_at_a_deleted_path_is_mirrored_and_blocks_no_other_stream() {
    let mut stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    stack
        .start_sync("/v1/stream/again/*", Vec::new())
        .await
        .expect("ds-sync following through envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    let path = "/v1/stream/again/reused";

    client.create(path, JSON).await.expect("create");
    let first_id = served_stream_id(&client, path)
        .await
        .expect("first life's id");
    let response = client
        .append(path, JSON, json!({ "life": 1 }).to_string())
        .await
        .expect("append");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let (_, tail) = client.head(path).await.expect("head");
    wait_until("first life mirrored", DEADLINE, || async {
        Ok((checkpoint(&pg, path).await?.as_deref() == Some(tail.as_str())).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let response = client
        .request(Method::DELETE, path)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    wait_until("deleted checkpoint", DEADLINE, || async {
        Ok((end_state(&pg, path).await? == Some((false, true))).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    // Second life at the same path, and a bystander stream created after it.
    client.create(path, JSON).await.expect("re-create");
    let response = client
        // Longer than the first life's message, so that the second life's tail differs.
        .append(path, JSON, json!({ "life": 2, "again": true }).to_string())
        .await
        .expect("append");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let bystander = "/v1/stream/again/bystander";
    client
        .create(bystander, JSON)
        .await
        .expect("create bystander");
    let response = client
        .append(bystander, JSON, json!({ "other": true }).to_string())
        .await
        .expect("append");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);

    let (_, bystander_tail) = client.head(bystander).await.expect("head");
    wait_until("bystander mirrored", DEADLINE, || async {
        Ok(
            (checkpoint(&pg, bystander).await?.as_deref() == Some(bystander_tail.as_str()))
                .then_some(()),
        )
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.log_tails()));
    let (_, tail) = client.head(path).await.expect("head");
    wait_until("second life mirrored", DEADLINE, || async {
        Ok((checkpoint(&pg, path).await?.as_deref() == Some(tail.as_str())).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    // Rows mirrored before a delete stay: the path's rows are both lives, each in its own
    // incarnation.
    assert_eq!(
        every_incarnation(&pg, path).await.expect("rows"),
        vec![
            (1, json!({ "life": 1 })),
            (2, json!({ "life": 2, "again": true })),
        ]
    );
    assert_eq!(
        incarnation_state(&pg, path).await.expect("state"),
        Some((2, false, false))
    );
    // Each incarnation is fenced by the id of its stream, which reaches ds-sync through Envoy.
    let second_id = served_stream_id(&client, path)
        .await
        .expect("second life's id");
    assert_ne!(first_id, second_id, "a re-created stream has another id");
    assert_eq!(
        recorded_stream_id(&pg, path).await.expect("stream id"),
        Some(second_id)
    );
    // The current incarnation, the README's way, equals a catch-up read of the stream.
    let current: Vec<serde_json::Value> = pg
        .query(
            "SELECT data::text FROM ds_current_messages WHERE stream = $1 \
             ORDER BY stream_offset, idx",
            &[&path],
        )
        .await
        .expect("current rows")
        .iter()
        .map(|row| serde_json::from_str(row.get::<_, &str>(0)).expect("stored json"))
        .collect();
    let stream = client.read_all(path).await.expect("catch-up read");
    let current = Content::Messages(current);
    assert!(current == stream, "{}", first_difference(&stream, &current));
}
