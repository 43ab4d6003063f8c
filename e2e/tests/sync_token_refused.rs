//! ds-sync behind the edge with a token Envoy refuses (expired, as happens when nobody rotates
//! it): every read is a 401, which must never be mistaken for the end of a stream, and `/readyz`
//! turns 503 and says why. The streams stay followable, and a worker restarted with a valid
//! token mirrors them completely.

mod support;

use std::time::Duration;

use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::sync::{DsSync, SyncOptions};
use ds_e2e::token::{TokenKind, mint};
use ds_e2e::wait::wait_until;
use reqwest::StatusCode;
use serde_json::json;
use support::{JSON, StreamClient, checkpoint, first_difference, mirrored};

const DEADLINE: Duration = Duration::from_secs(30);
const STREAM: &str = "/v1/stream/token/orders";

#[tokio::test]
async fn a_refused_token_marks_nothing_deleted_and_a_valid_one_resumes_mirroring() {
    let mut stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    let client = StreamClient::new(
        stack.client.clone(),
        stack.edge_url(),
        Some(stack.token.clone()),
    );
    client.create(STREAM, JSON).await.expect("create");
    for n in 0..3 {
        let response = client
            .append(STREAM, JSON, json!({ "n": n }).to_string())
            .await
            .expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT);
    }

    // The explicit path and the prefix (registry) are both refused.
    let refused_before = stack
        .envoy
        .stat("http.ds_public.downstream_rq_4xx")
        .await
        .expect("stat")
        .unwrap_or(0);
    let streams = format!("{STREAM},/v1/stream/token/*");
    stack
        .spawn_sync(
            &streams,
            vec![
                (
                    "DS_SYNC__BEARER_TOKEN".to_owned(),
                    mint(TokenKind::Expired).expect("mint"),
                ),
                ("DS_SYNC__BACKOFF_MAX".to_owned(), "500ms".to_owned()),
            ],
        )
        .await
        .expect("ds-sync with an expired token");
    let envoy = &stack.envoy;
    wait_until(
        "ds-sync refused by envoy several times",
        DEADLINE,
        || async {
            let refused = envoy
                .stat("http.ds_public.downstream_rq_4xx")
                .await?
                .unwrap_or(0);
            Ok((refused >= refused_before + 6).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let sync = stack.sync.as_ref().expect("sync");
    let (status, why) = wait_until("/readyz reports the refusals", DEADLINE, || async {
        let (status, body) = sync.readyz().await?;
        Ok((status == 503 && body.contains("refused the credentials")).then_some((status, body)))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(why.contains("401"), "{status}: {why}");
    // And its metrics count the refusals.
    let metrics = sync.metrics().await.expect("ds-sync metrics");
    let refusals = ds_e2e::metrics::value(&metrics, "ds_sync_auth_failures_total")
        .unwrap_or_else(|e| panic!("{e:#}"));
    assert!(refusals >= 1.0, "{metrics}");
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    let state = pg
        .query_opt(
            "SELECT closed, deleted, deleted_status FROM ds_checkpoints WHERE stream = $1",
            &[&STREAM],
        )
        .await
        .expect("checkpoint row");
    if let Some(row) = state {
        let (closed, deleted, status): (bool, bool, Option<i16>) =
            (row.get(0), row.get(1), row.get(2));
        assert!(
            !closed && !deleted,
            "a 401 ended the stream in the mirror: closed {closed}, deleted {deleted} \
             (status {status:?})"
        );
    }
    let rows: i64 = pg
        .query_one("SELECT count(*) FROM ds_messages", &[])
        .await
        .expect("count")
        .get(0);
    assert_eq!(rows, 0, "rows mirrored with a refused token");

    // The operator fixes the token: a new worker on the same database mirrors everything.
    stack
        .sync
        .take()
        .expect("sync")
        .kill()
        .expect("kill ds-sync");
    let options = SyncOptions {
        database_url: stack.database_url().expect("database").to_owned(),
        server_url: stack.edge_url(),
        streams,
        extra_env: vec![("DS_SYNC__BEARER_TOKEN".to_owned(), stack.token.clone())],
    };
    stack.sync = Some(
        DsSync::start(&options, stack.work.path())
            .await
            .expect("ds-sync with a valid token"),
    );
    let (_, tail) = client.head(STREAM).await.expect("head");
    wait_until("mirrored to the tail", DEADLINE, || async {
        Ok((checkpoint(&pg, STREAM).await?.as_deref() == Some(tail.as_str())).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    let stream = client.read_all(STREAM).await.expect("catch-up read");
    let rows = mirrored(&pg, STREAM, true).await.expect("rows");
    assert!(rows == stream, "{}", first_difference(&stream, &rows));
}
