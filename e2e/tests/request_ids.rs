//! Log lines and request ids, with the real binaries and the real Envoy: `DS_LOG__FORMAT=json`
//! writes one JSON object per line; the id Envoy gives a request (`x-request-id`) reaches
//! ds-server, is echoed to the client and is on the request's log line; a request without one
//! gets an id of the server's own; text logs to a file carry no ANSI colour codes.

use std::time::Duration;

use ds_e2e::server::{DsServer, ServerOptions};
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode};

const DEADLINE: Duration = Duration::from_secs(30);
const STREAM: &str = "/v1/stream/request-ids";

fn json_logging() -> Vec<(String, String)> {
    vec![
        ("DS_LOG__FORMAT".to_owned(), "json".to_owned()),
        (
            "RUST_LOG".to_owned(),
            "info,ds_server::access=debug".to_owned(),
        ),
    ]
}

/// Every line of the log, parsed: the test fails on the first line that is not a JSON object.
fn log_lines(server: &DsServer) -> Vec<serde_json::Value> {
    server
        .log_tail(10_000)
        .lines()
        .filter(|line| !line.trim().is_empty())
        .map(|line| {
            let value: serde_json::Value = serde_json::from_str(line)
                .unwrap_or_else(|e| panic!("log line is not JSON ({e}): {line}"));
            assert!(value.is_object(), "log line is not an object: {line}");
            value
        })
        .collect()
}

/// Waits for the access line of `id` and returns it.
async fn access_line(server: &DsServer, id: &str) -> serde_json::Value {
    wait_until("the request's log line", DEADLINE, || async {
        Ok(log_lines(server)
            .into_iter()
            .find(|line| line["request_id"] == id && line["target"] == "ds_server::access"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log_tail(40)))
}

#[tokio::test]
async fn envoys_request_id_reaches_the_log_and_the_client() {
    let stack = EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        extra_env: json_logging(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy");
    let response = stack
        .client
        .request(Method::PUT, format!("{}{STREAM}", stack.edge_url()))
        .bearer_auth(&stack.token)
        .header("content-type", "application/json")
        .send()
        .await
        .expect("PUT through envoy");
    assert_eq!(response.status(), StatusCode::CREATED);
    let id = response
        .headers()
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .expect("x-request-id on the response")
        .to_owned();
    // Envoy's ids are UUIDs (36 characters); the server's own are 25: the edge's id was used.
    assert_eq!(id.len(), 36, "envoy's id, not one the server made: {id}");
    let line = access_line(&stack.server, &id).await;
    assert_eq!(line["path"], STREAM);
    assert_eq!(line["method"], "PUT");
    assert_eq!(line["status"], 201);
    assert!(
        line["timestamp"].is_string() && line["level"] == "DEBUG",
        "{line}"
    );
}

#[tokio::test]
async fn a_clients_id_is_kept_and_a_missing_one_is_made() {
    let work = tempfile::tempdir().expect("temp dir");
    let server = DsServer::start(
        ServerOptions {
            storage_mode: "memory".to_owned(),
            tls: false,
            extra_env: json_logging(),
        },
        work.path(),
    )
    .await
    .expect("ds-server");
    let http = reqwest::Client::new();
    let url = format!("{}{STREAM}", server.base_url());
    let response = http
        .put(&url)
        .header("x-request-id", "client-chosen-1")
        .send()
        .await
        .expect("PUT");
    assert_eq!(response.headers()["x-request-id"], "client-chosen-1");
    access_line(&server, "client-chosen-1").await;

    // A 404 is a request too, and without an id of its own it gets one.
    let response = http
        .get(format!("{url}-missing"))
        .send()
        .await
        .expect("GET");
    assert_eq!(response.status(), StatusCode::NOT_FOUND);
    let made = response.headers()["x-request-id"]
        .to_str()
        .expect("ascii")
        .to_owned();
    assert_eq!(made.len(), 25, "{made}");
    let line = access_line(&server, &made).await;
    assert_eq!(line["status"], 404);
}

#[tokio::test]
async fn text_logs_to_a_file_have_no_colour_codes() {
    let work = tempfile::tempdir().expect("temp dir");
    let server = DsServer::start(
        ServerOptions {
            storage_mode: "memory".to_owned(),
            tls: false,
            extra_env: Vec::new(),
        },
        work.path(),
    )
    .await
    .expect("ds-server");
    let log = server.log_tail(100);
    assert!(log.contains("listening"), "{log}");
    assert!(
        !log.contains('\u{1b}'),
        "ANSI escape in a log file: {log:?}"
    );
}
