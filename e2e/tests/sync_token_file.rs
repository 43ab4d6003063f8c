//! ds-sync with `DS_SYNC__TOKEN_FILE` behind the real Envoy, mirroring into real Postgres: the
//! token in the file expires (here: is replaced by an expired one, which Envoy refuses the same
//! way), reads get 401 and `/readyz` says so; once the file holds a fresh token the worker picks
//! it up without a restart and mirrors everything written meanwhile, each row exactly once.

mod support;

use std::path::Path;
use std::time::Duration;

use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::token::{TokenKind, mint};
use ds_e2e::wait::wait_until;
use reqwest::StatusCode;
use serde_json::json;
use support::{JSON, StreamClient, checkpoint, first_difference, mirrored};

const DEADLINE: Duration = Duration::from_secs(60);
const STREAM: &str = "/v1/stream/rotated/orders";

/// Replaces the file in one step (write aside, rename), as a secret mount or a sidecar does.
fn replace_token(path: &Path, token: &str) {
    let aside = path.with_extension("new");
    std::fs::write(&aside, format!("{token}\n")).expect("write token");
    std::fs::rename(&aside, path).expect("rename token");
}

#[tokio::test]
async fn a_replaced_token_file_resumes_mirroring_without_loss_or_duplicates() {
    let mut stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        // Short SSE sessions, so the worker asks Envoy (and meets the refused token) often.
        extra_env: vec![(
            "DS_SERVER__SSE_RECONNECT_INTERVAL".to_owned(),
            "1s".to_owned(),
        )],
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
    let append = |n: u32| {
        let client = client.clone();
        async move {
            let response = client
                .append(STREAM, JSON, json!({ "n": n }).to_string())
                .await
                .expect("append");
            assert_eq!(response.status(), StatusCode::NO_CONTENT);
        }
    };
    for n in 0..10 {
        append(n).await;
    }

    let token_file = stack.work.path().join("ds-sync.token");
    replace_token(&token_file, &stack.token);
    stack
        .start_sync(
            "/v1/stream/rotated/*",
            vec![
                (
                    "DS_SYNC__TOKEN_FILE".to_owned(),
                    token_file.display().to_string(),
                ),
                ("DS_SYNC__SESSION_MAX".to_owned(), "1s".to_owned()),
                ("DS_SYNC__BACKOFF_MAX".to_owned(), "500ms".to_owned()),
            ],
        )
        .await
        .expect("ds-sync with a token file");
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    let mirrored_to_tail = || async {
        let (_, tail) = client.head(STREAM).await?;
        Ok((checkpoint(&pg, STREAM).await?.as_deref() == Some(tail.as_str())).then_some(()))
    };
    wait_until("the first rows mirrored", DEADLINE, mirrored_to_tail)
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.log_tails()));

    // The token expires: every new read is refused, while writers (with their own valid
    // tokens) go on appending.
    replace_token(
        &token_file,
        &mint(TokenKind::Expired).expect("mint expired"),
    );
    let sync = stack.sync.as_ref().expect("sync");
    let why = wait_until("/readyz reports the refusals", DEADLINE, || async {
        let (status, body) = sync.readyz().await?;
        Ok((status == 503 && body.contains("refused the credentials")).then_some(body))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.log_tails()));
    assert!(why.contains("ds-sync.token"), "names the file: {why}");
    for n in 10..20 {
        append(n).await;
    }

    // A fresh token lands in the file: no restart.
    replace_token(&token_file, &mint(TokenKind::Valid).expect("mint valid"));
    wait_until(
        "the rows written meanwhile mirrored",
        DEADLINE,
        mirrored_to_tail,
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", stack.log_tails()));
    wait_until("/readyz ready again", DEADLINE, || async {
        let (status, _) = sync.readyz().await?;
        Ok((status == 200).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));

    let stream = client.read_all(STREAM).await.expect("catch-up read");
    assert_eq!(stream.len(), 20);
    let rows = mirrored(&pg, STREAM, true).await.expect("rows");
    assert!(rows == stream, "{}", first_difference(&stream, &rows));
}
