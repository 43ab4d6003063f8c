//! A client that gives up on an append mid-flight (connection dropped: a killed proxy, a timeout)
//! must not wedge later appends. ds-server directly, no Envoy: producer appends are started and
//! abandoned at random points, then the producer retries the same sequence number until it is
//! acknowledged, as the crash test's writers do after Envoy is killed; every retry must be
//! answered promptly, in every storage mode.

mod support;

use std::time::Duration;

use ds_e2e::server::{DsServer, ServerOptions};
use reqwest::{Method, StatusCode};
use support::{BINARY, Content, StreamClient};

/// Rounds of "start appends, drop them, then append until acknowledged".
const ROUNDS: u64 = 40;
/// Appends in flight per round, one per producer (and stream).
const PRODUCERS: usize = 3;
/// A healthy server answers an append on loopback in milliseconds.
const ANSWER_WITHIN: Duration = Duration::from_secs(5);

/// What still works once a retry went unanswered, from a fresh client (fresh connections): tells
/// a wedged producer from a wedged stream from a wedged server.
async fn diagnose(base_url: &str, path: &str, producer: &str, seq: u64) -> String {
    let fresh = StreamClient::new(
        reqwest::Client::builder()
            .timeout(Duration::from_secs(3))
            .build()
            .expect("client"),
        base_url,
        None,
    );
    let mut report = Vec::new();
    let same = fresh
        .request(Method::POST, path)
        .header("content-type", BINARY)
        .header("producer-id", producer)
        .header("producer-epoch", "0")
        .header("producer-seq", seq.to_string())
        .body(vec![seq as u8; 64])
        .send()
        .await;
    report.push(format!(
        "  the same retry on a new connection: {}",
        match same {
            Ok(response) => response.status().to_string(),
            Err(error) if error.is_timeout() => "no answer within 3 s".to_owned(),
            Err(error) => format!("{error}"),
        }
    ));
    let other = format!("{path}-other");
    let checks: [(&str, Method, &str, Option<&str>); 4] = [
        ("read of the same stream", Method::GET, path, None),
        ("plain append to the same stream", Method::POST, path, None),
        (
            "append by another producer to the same stream",
            Method::POST,
            path,
            Some("other"),
        ),
        ("create of another stream", Method::PUT, &other, None),
    ];
    for (what, method, target, producer) in checks {
        let mut request = fresh
            .request(
                method.clone(),
                &format!(
                    "{target}{}",
                    if method == Method::GET {
                        "?offset=-1"
                    } else {
                        ""
                    }
                ),
            )
            .header("content-type", BINARY);
        if method == Method::POST {
            request = request.body(vec![0u8; 8]);
        }
        if let Some(producer) = producer {
            request = request
                .header("producer-id", producer)
                .header("producer-epoch", "0")
                .header("producer-seq", "0");
        }
        let outcome = match request.send().await {
            Ok(response) => response.status().to_string(),
            Err(error) if error.is_timeout() => "no answer within 3 s".to_owned(),
            Err(error) => format!("{error}"),
        };
        report.push(format!("  {what}: {outcome}"));
    }
    format!("from a fresh client:\n{}", report.join("\n"))
}

async fn abandoned_appends_never_wedge_later_ones(mode: &str) {
    let work = tempfile::tempdir().expect("work dir");
    let server = DsServer::start(
        ServerOptions {
            storage_mode: mode.to_owned(),
            tls: false,
            extra_env: Vec::new(),
        },
        work.path(),
    )
    .await
    .expect("ds-server");
    let client = StreamClient::new(
        reqwest::Client::builder()
            .timeout(ANSWER_WITHIN)
            .build()
            .expect("client"),
        server.base_url(),
        None,
    );
    let paths: Vec<String> = (0..PRODUCERS)
        .map(|p| format!("/v1/stream/abandoned-{mode}-{p}"))
        .collect();
    for path in &paths {
        client.create(path, BINARY).await.expect("create");
    }

    for seq in 0..ROUNDS {
        // Start one append per producer and abandon it after a varying moment: before it is
        // sent, while the server commits it, or after it is answered.
        let abandoned: Vec<_> = paths
            .iter()
            .enumerate()
            .map(|(p, path)| {
                let request = client
                    .request(Method::POST, path)
                    .header("content-type", BINARY)
                    .header("producer-id", format!("p{p}"))
                    .header("producer-epoch", "0")
                    .header("producer-seq", seq.to_string())
                    .body(vec![seq as u8; 64]);
                tokio::spawn(async move { request.send().await })
            })
            .collect();
        // Letting a varying moment pass is the point: where the drop lands.
        tokio::time::sleep(Duration::from_micros(200 * (seq % 10))).await;
        for task in &abandoned {
            task.abort();
        }
        // Then each producer retries the same append until acknowledged: 200 (the abandoned one
        // never landed) or 204 (it did). No answer within ANSWER_WITHIN is a wedge.
        for (p, path) in paths.iter().enumerate() {
            let retry = client
                .request(Method::POST, path)
                .header("content-type", BINARY)
                .header("producer-id", format!("p{p}"))
                .header("producer-epoch", "0")
                .header("producer-seq", seq.to_string())
                .body(vec![seq as u8; 64])
                .send()
                .await;
            let response = match retry {
                Ok(response) => response,
                Err(error) => panic!(
                    "{mode}: round {seq}: retry of an abandoned append to {path} got no answer \
                     within {ANSWER_WITHIN:?}: {error:?}\n{}\nserver log:\n{}",
                    diagnose(&server.base_url(), path, &format!("p{p}"), seq).await,
                    server.log_tail(40)
                ),
            };
            assert!(
                matches!(response.status(), StatusCode::OK | StatusCode::NO_CONTENT),
                "{mode}: round {seq}: {path}: {}",
                response.status()
            );
        }
    }
    // Each append landed once.
    let expected: Vec<u8> = (0..ROUNDS).flat_map(|seq| vec![seq as u8; 64]).collect();
    for path in &paths {
        assert_eq!(
            client.read_all(path).await.expect("read"),
            Content::Bytes(expected.clone()),
            "{mode}: {path}"
        );
    }
}

/// Regression test: a client that hung up while its append was committing used to leave the
/// committed data invisible (the reveal ran in the dropped handler), wedging the producer's retry
/// until another append moved the tail. Memory mode commits without waiting; the durable modes
/// are the ones that exercised it.
#[tokio::test]
async fn abandoned_appends_never_wedge_later_ones_in_acid_mode() {
    abandoned_appends_never_wedge_later_ones("acid").await;
}

/// The same regression test in file-durable mode.
#[tokio::test]
async fn abandoned_appends_never_wedge_later_ones_in_file_durable_mode() {
    abandoned_appends_never_wedge_later_ones("file-durable").await;
}

#[tokio::test]
async fn abandoned_appends_never_wedge_later_ones_in_memory_mode() {
    abandoned_appends_never_wedge_later_ones("memory").await;
}
