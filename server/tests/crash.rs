//! Crash harness: the real `ds-server` binary, `kill -9` at random moments under concurrent write
//! load, restart, and check every acknowledged write.
//!
//! Per durable mode, several kill/restart rounds run on one data directory. Writers append with
//! and without idempotent-producer headers (one to a JSON stream), one stream is closed with a
//! final append, and forks are created along the way. After every restart:
//! - every acknowledged append is present exactly once, at its acknowledged offset;
//! - an append in flight at the kill is either wholly present or wholly absent;
//! - a producer's retry of its in-flight append after the restart is deduplicated (204) when the
//!   append had landed, and accepted (200) when it had not;
//! - an acknowledged close survives, and a close in flight is all or nothing;
//! - an acknowledged fork exists with exactly the source's data up to its fork offset.
//!
//! Subscriptions get rounds of their own: a worker claims, heartbeats and acks a pull-wake
//! subscription while writers append, and a webhook subscription's receiver keeps failing, when
//! the server is killed. After every restart:
//! - every acknowledged ack is still there (acked offsets never move backwards);
//! - the next claim's generation is above every generation a claim was answered with;
//! - the webhook's retry schedule survived: the same wake is delivered again.
//!
//! `DS_CRASH_ROUNDS` sets the rounds per mode (default 10). acid runs twice: with the commit log
//! (small segments, so that rolls and checkpoints happen under the kills) and with per-shard syncs.

mod support;

use std::process::{Child, Command, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use reqwest::{Client, StatusCode};

const WRITERS: usize = 6;

struct Server {
    child: Child,
    base: String,
}

async fn start(mode: &str, dir: &std::path::Path) -> Server {
    start_with(mode, dir, &[]).await
}

/// [`start`] with more environment variables (which win over the defaults).
async fn start_with(mode: &str, dir: &std::path::Path, extra: &[(&str, &str)]) -> Server {
    let port = support::free_port();
    // "acid" runs with the commit log (the default) and segments small enough to roll and
    // checkpoint many times per round; "acid-per-shard" syncs each shard's redb commits.
    let (storage_mode, commit_log, segment_bytes) = match mode {
        "acid" => ("acid", "true", "16384"),
        "acid-per-shard" => ("acid", "false", "67108864"),
        other => (other, "true", "67108864"),
    };
    let child = Command::new(env!("CARGO_BIN_EXE_ds-server"))
        .env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("DS_SERVER__PORT", port.to_string())
        .env("DS_STORAGE__MODE", storage_mode)
        .env("DS_STORAGE__ACID_COMMIT_LOG", commit_log)
        .env("DS_STORAGE__SEGMENT_BYTES", segment_bytes)
        .env("DS_STORAGE__DATA_DIR", dir)
        .env("DS_STORAGE__ACID_SHARD_COUNT", "4")
        .env("DS_SERVER__LONG_POLL_TIMEOUT", "500ms")
        // The subscription rounds' webhook receiver is on 127.0.0.1, and fails on purpose:
        // quick retries keep several attempts inside a round.
        .env("DS_SUBSCRIPTIONS__ALLOW_LOCAL_WEBHOOKS", "true")
        .env("DS_SUBSCRIPTIONS__RETRY_MIN", "100ms")
        .env("DS_SUBSCRIPTIONS__RETRY_MAX", "400ms")
        .envs(extra.iter().copied())
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ds-server");
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    let mut child = child;
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("ds-server ({mode}) exited at start-up: {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ds-server ({mode}) did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server { child, base }
}

/// What the harness knows about one stream.
#[derive(Clone, Debug, Default)]
struct Tracked {
    path: String,
    json: bool,
    producer: Option<String>,
    /// Everything acknowledged, in order (JSON: the messages).
    content: Vec<u8>,
    messages: Vec<serde_json::Value>,
    next_seq: u64,
    closed: bool,
    /// Sent when the server died, answer unknown.
    in_flight: Option<InFlight>,
}

#[derive(Clone, Debug)]
struct InFlight {
    body: String,
    seq: Option<u64>,
    closes: bool,
}

fn offset_pos(value: &str) -> u64 {
    value
        .split_once('_')
        .and_then(|(_, p)| p.parse().ok())
        .expect("offset")
}

async fn send_append(
    client: &Client,
    base: &str,
    t: &Tracked,
    body: &str,
    seq: Option<u64>,
    close: bool,
) -> reqwest::Result<reqwest::Response> {
    let mut req = client
        .post(format!("{base}{}", t.path))
        .header(
            "content-type",
            if t.json {
                "application/json"
            } else {
                "application/octet-stream"
            },
        )
        .body(body.to_owned());
    if let (Some(id), Some(seq)) = (&t.producer, seq) {
        req = req
            .header("producer-id", id)
            .header("producer-epoch", "0")
            .header("producer-seq", seq.to_string());
    }
    if close {
        req = req.header("stream-closed", "true");
    }
    req.timeout(Duration::from_secs(10)).send().await
}

fn record_ack(t: &mut Tracked, body: &str, next: u64) {
    if t.json {
        t.messages
            .push(serde_json::from_str(body).expect("json body"));
    } else {
        let start = t.content.len() as u64;
        assert_eq!(
            start + body.len() as u64,
            next,
            "{}: acknowledged offset does not match the bytes acknowledged so far",
            t.path
        );
        t.content.extend_from_slice(body.as_bytes());
    }
}

/// One writer: appends until `stop` or until the server goes away.
async fn write_until_killed(
    client: Client,
    base: String,
    mut t: Tracked,
    round: usize,
    stop: Arc<AtomicBool>,
    close_after: Option<usize>,
) -> Tracked {
    let mut i = 0usize;
    while !stop.load(Ordering::Relaxed) && !t.closed {
        let body = if t.json {
            format!(
                "{{\"round\":{round},\"i\":{i},\"pad\":\"{}\"}}",
                "j".repeat(i % 17)
            )
        } else {
            // Every seventh append is over 4 KiB: acid keeps those in its commit log and
            // references them from redb, so kills land while such segments roll, are kept,
            // checkpointed and deleted.
            let pad = if i % 7 == 6 { 4200 } else { i % 23 };
            format!("<{}:{round}:{i}:{}>", t.path, "b".repeat(pad))
        };
        let seq = t.producer.as_ref().map(|_| t.next_seq);
        let closes = close_after == Some(i);
        match send_append(&client, &base, &t, &body, seq, closes).await {
            Ok(r) if r.status().is_success() => {
                let next = offset_pos(
                    r.headers()
                        .get("stream-next-offset")
                        .and_then(|v| v.to_str().ok())
                        .expect("Stream-Next-Offset"),
                );
                if t.producer.is_some() {
                    assert_eq!(
                        r.status(),
                        StatusCode::OK,
                        "{}: new producer append",
                        t.path
                    );
                    t.next_seq += 1;
                }
                record_ack(&mut t, &body, next);
                if closes {
                    t.closed = true;
                }
            }
            Ok(r) => panic!("{}: unexpected status {}", t.path, r.status()),
            Err(_) => {
                t.in_flight = Some(InFlight { body, seq, closes });
                break;
            }
        }
        i += 1;
    }
    t
}

/// Reads a whole stream page by page: the status, the pages, and whether it is closed.
async fn read_stream(client: &Client, base: &str, path: &str) -> (StatusCode, Vec<Vec<u8>>, bool) {
    let mut out = Vec::new();
    let mut offset = "-1".to_owned();
    loop {
        let r = client
            .get(format!("{base}{path}?offset={offset}"))
            .send()
            .await
            .expect("read");
        let status = r.status();
        if !status.is_success() {
            return (status, out, false);
        }
        let up_to_date = r.headers().contains_key("stream-up-to-date");
        let closed = r.headers().contains_key("stream-closed");
        offset = r
            .headers()
            .get("stream-next-offset")
            .and_then(|v| v.to_str().ok())
            .expect("next offset")
            .to_owned();
        out.push(r.bytes().await.expect("body").to_vec());
        if up_to_date {
            return (status, out, closed);
        }
    }
}

/// Reconciles a stream after a restart: the in-flight append is all or nothing, then everything
/// acknowledged must be there exactly.
async fn verify(client: &Client, base: &str, t: &mut Tracked, mode: &str) {
    let (status, raw, closed) = read_stream(client, base, &t.path).await;
    assert_eq!(status, StatusCode::OK, "{mode} {}: stream lost", t.path);
    if t.json {
        // A JSON stream reads back as one array per page.
        let got: Vec<serde_json::Value> = raw
            .iter()
            .flat_map(|page| {
                serde_json::from_slice::<Vec<serde_json::Value>>(page).expect("json array page")
            })
            .collect();
        let mut expected = t.messages.clone();
        if let Some(f) = &t.in_flight
            && got.len() == expected.len() + 1
        {
            expected.push(serde_json::from_str(&f.body).expect("json"));
        }
        assert_eq!(got, expected, "{mode} {}: JSON content differs", t.path);
        t.messages = got;
    } else {
        let raw = raw.concat();
        let mut expected = t.content.clone();
        if let Some(f) = &t.in_flight
            && raw.len() == expected.len() + f.body.len()
        {
            expected.extend_from_slice(f.body.as_bytes());
        }
        assert_eq!(
            String::from_utf8_lossy(&raw),
            String::from_utf8_lossy(&expected),
            "{mode} {}: content differs from what was acknowledged",
            t.path
        );
        t.content = raw;
    }
    let landed = match (&t.in_flight, t.json) {
        (Some(f), true) => {
            serde_json::from_str::<serde_json::Value>(&f.body)
                .ok()
                .as_ref()
                == t.messages.last()
        }
        (Some(f), false) => t.content.ends_with(f.body.as_bytes()),
        (None, _) => false,
    };
    if let Some(f) = t.in_flight.take() {
        if f.closes {
            assert_eq!(
                closed, landed,
                "{mode} {}: a close in flight must land together with its final data",
                t.path
            );
            t.closed = landed;
        }
        // A producer's retry after the restart must be recognised exactly when it landed.
        if let Some(seq) = f.seq {
            let r = send_append(client, base, t, &f.body, Some(seq), f.closes)
                .await
                .expect("retry");
            let want = if landed {
                StatusCode::NO_CONTENT
            } else {
                StatusCode::OK
            };
            assert_eq!(
                r.status(),
                want,
                "{mode} {}: producer retry of seq {seq}",
                t.path
            );
            if !landed {
                if t.json {
                    t.messages
                        .push(serde_json::from_str(&f.body).expect("json"));
                } else {
                    t.content.extend_from_slice(f.body.as_bytes());
                }
                t.closed |= f.closes;
            }
            t.next_seq = seq + 1;
        }
    }
    if t.closed {
        assert!(closed, "{mode} {}: acknowledged close lost", t.path);
    }
}

/// Creates the `WRITERS` streams `/v1/stream/{prefix}-{w}` the crash tests write: stream 1 is
/// JSON, the odd ones write with an idempotent producer.
async fn create_tracked(client: &Client, base: &str, prefix: &str) -> Vec<Tracked> {
    let streams: Vec<Tracked> = (0..WRITERS)
        .map(|w| Tracked {
            path: format!("/v1/stream/{prefix}-{w}"),
            json: w == 1,
            producer: (w % 2 == 1).then(|| format!("producer-{w}")),
            ..Tracked::default()
        })
        .collect();
    for t in &streams {
        let ct = if t.json {
            "application/json"
        } else {
            "application/octet-stream"
        };
        let r = client
            .put(format!("{base}{}", t.path))
            .header("content-type", ct)
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    streams
}

/// What each writer task acknowledged, once the server is gone and they stopped.
async fn join_writers(tasks: Vec<tokio::task::JoinHandle<Tracked>>) -> Vec<Tracked> {
    futures::future::join_all(tasks)
        .await
        .into_iter()
        .map(|r| r.expect("writer task"))
        .collect()
}

async fn crash_rounds(mode: &str) {
    let rounds: usize = std::env::var("DS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();
    let mut server = start(mode, dir.path()).await;
    let mut streams = create_tracked(&client, &server.base, "crash").await;
    let mut forks: Vec<(String, usize)> = Vec::new();
    for round in 0..rounds {
        // A fork of stream 0 at its acknowledged tail, taken while nothing writes to it.
        let fork_path = format!("/v1/stream/crash-fork-{round}");
        let fork_at = streams[0].content.len();
        let r = client
            .put(format!("{}{fork_path}", server.base))
            .header("stream-forked-from", &streams[0].path)
            .header("stream-fork-offset", format!("{:016}_{:016}", 0, fork_at))
            .send()
            .await
            .expect("fork");
        assert_eq!(r.status(), StatusCode::CREATED, "{mode}: fork");
        forks.push((fork_path, fork_at));

        let stop = Arc::new(AtomicBool::new(false));
        let mut tasks = Vec::new();
        for (w, t) in streams.iter().enumerate() {
            // Stream 2 is closed with a final append in the third round.
            let close_after = (w == 2 && round == 2).then_some(fastrand::usize(0..40));
            tasks.push(tokio::spawn(write_until_killed(
                client.clone(),
                server.base.clone(),
                t.clone(),
                round,
                stop.clone(),
                close_after,
            )));
        }
        tokio::time::sleep(Duration::from_millis(fastrand::u64(100..700))).await;
        server.child.kill().expect("kill -9");
        let _ = server.child.wait();
        stop.store(true, Ordering::Relaxed);
        streams = join_writers(tasks).await;

        server = start(mode, dir.path()).await;
        for t in &mut streams {
            verify(&client, &server.base, t, mode).await;
        }
        for (fork_path, fork_at) in &forks {
            let (status, raw, _) = read_stream(&client, &server.base, fork_path).await;
            assert_eq!(
                status,
                StatusCode::OK,
                "{mode} {fork_path}: acknowledged fork lost"
            );
            assert_eq!(
                String::from_utf8_lossy(&raw.concat()),
                String::from_utf8_lossy(&streams[0].content[..*fork_at]),
                "{mode} {fork_path}: fork content"
            );
        }
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_fast_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("file-fast").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_durable_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("file-durable").await;
}

/// The file modes' checkpoints (`server/STORAGE.md`, "Checkpoints"): with small segments a
/// checkpoint is written every 16 KiB of log; the server is made to abort while writing one
/// (`DSTEST_CRASH_AT`: the temporary file written, not synced; renamed, the directory not
/// synced) under the writers' load, and must restart with every acknowledged append, then
/// again after a clean shutdown (which leaves a checkpoint of everything).
async fn killed_while_checkpointing(mode: &str, point: &str) {
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();
    let small = ("DS_STORAGE__SEGMENT_BYTES", "16384");
    let mut server = start_with(mode, dir.path(), &[small, ("DSTEST_CRASH_AT", point)]).await;
    let mut streams = create_tracked(&client, &server.base, "ckpt").await;
    let stop = Arc::new(AtomicBool::new(false));
    let tasks: Vec<_> = streams
        .iter()
        .map(|t| {
            tokio::spawn(write_until_killed(
                client.clone(),
                server.base.clone(),
                t.clone(),
                0,
                stop.clone(),
                None,
            ))
        })
        .collect();
    // The server aborts by itself at the crash point.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    let status = loop {
        if let Ok(Some(status)) = server.child.try_wait() {
            break status;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "{mode}: never reached {point}"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    };
    use std::os::unix::process::ExitStatusExt;
    assert_eq!(status.signal(), Some(6), "{mode}: aborted at {point}");
    stop.store(true, Ordering::Relaxed);
    streams = join_writers(tasks).await;
    // The log passed 16 KiB (frames and batch headers included) before the abort.
    assert!(
        streams.iter().map(|t| t.content.len()).sum::<usize>() > 1000,
        "{mode}: appends were acknowledged before the checkpoint: {:?}",
        streams.iter().map(|t| t.content.len()).collect::<Vec<_>>()
    );
    server = start_with(mode, dir.path(), &[small]).await;
    for t in &mut streams {
        verify(&client, &server.base, t, mode).await;
    }
    // SIGTERM: a clean shutdown, which writes a checkpoint of everything.
    let _ = Command::new("kill")
        .arg(server.child.id().to_string())
        .status();
    let _ = server.child.wait();
    assert!(
        dir.path().join("wal/checkpoint").exists(),
        "{mode}: a clean shutdown leaves a checkpoint"
    );
    server = start_with(mode, dir.path(), &[small]).await;
    for t in &mut streams {
        verify(&client, &server.base, t, mode).await;
    }
    let _ = server.child.kill();
    let _ = server.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_modes_keep_every_acknowledged_write_when_killed_while_checkpointing() {
    for mode in ["file-durable", "file-fast"] {
        for point in ["checkpoint-tmp-written", "checkpoint-renamed"] {
            killed_while_checkpointing(mode, point).await;
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("acid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_per_shard_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("acid-per-shard").await;
}

// ---- subscriptions ----

/// What the subscription rounds know: per stream the highest acknowledged ack, and the highest
/// generation a claim was answered with.
#[derive(Default)]
struct SubTracked {
    acked: std::collections::HashMap<String, u64>,
    max_generation: u64,
}

async fn sub_json(
    req: reqwest::RequestBuilder,
) -> reqwest::Result<(StatusCode, serde_json::Value)> {
    let r = req.send().await?;
    let status = r.status();
    Ok((status, r.json().await.unwrap_or(serde_json::Value::Null)))
}

/// Appends to the `sub/*` streams and claims, heartbeats and acks until the server dies.
async fn work_until_killed(
    client: Client,
    base: String,
    mut tracked: SubTracked,
    round: usize,
) -> SubTracked {
    let sub = format!("{base}/v1/stream/__ds/subscriptions/crash-pull");
    let mut n = 0u64;
    loop {
        n += 1;
        let stream = format!("sub/s{}", n % 3);
        let r = client
            .post(format!("{base}/v1/stream/{stream}"))
            .header("content-type", "application/json")
            .body(format!(r#"{{"round":{round},"n":{n}}}"#))
            .send()
            .await;
        if r.is_err() {
            return tracked;
        }
        let Ok((status, claim)) = sub_json(
            client
                .post(format!("{sub}/claim"))
                .json(&serde_json::json!({"worker": "w"})),
        )
        .await
        else {
            return tracked;
        };
        if status != StatusCode::OK {
            // A lease of an earlier life may still be held: wait for it to lapse.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let generation = claim["generation"].as_u64().expect("generation");
        tracked.max_generation = tracked.max_generation.max(generation);
        let token = claim["token"].as_str().expect("token").to_owned();
        let streams = claim["streams"].as_array().cloned().unwrap_or_default();
        let acks: Vec<(String, String)> = streams
            .iter()
            .map(|s| {
                (
                    s["path"].as_str().expect("path").to_owned(),
                    s["tail_offset"].as_str().expect("tail").to_owned(),
                )
            })
            .collect();
        // A heartbeat with the acks, then done (or release on odd rounds).
        let body = serde_json::json!({
            "wake_id": claim["wake_id"], "generation": generation,
            "acks": acks.iter().map(|(s, o)| serde_json::json!({"stream": s, "offset": o})).collect::<Vec<_>>(),
        });
        let Ok((status, _)) = sub_json(
            client
                .post(format!("{sub}/ack"))
                .bearer_auth(&token)
                .json(&body),
        )
        .await
        else {
            return tracked;
        };
        if status != StatusCode::OK {
            // Fenced: the lease lapsed on a slow machine. Nothing was acknowledged.
            continue;
        }
        for (s, o) in &acks {
            let pos = offset_pos(o);
            let e = tracked.acked.entry(s.clone()).or_default();
            *e = (*e).max(pos);
        }
        let end = if n.is_multiple_of(2) {
            client
                .post(format!("{sub}/ack"))
                .bearer_auth(&token)
                .json(&serde_json::json!({
                    "wake_id": claim["wake_id"], "generation": generation, "done": true
                }))
        } else {
            client
                .post(format!("{sub}/release"))
                .bearer_auth(&token)
                .json(&serde_json::json!({
                    "wake_id": claim["wake_id"], "generation": generation
                }))
        };
        if sub_json(end).await.is_err() {
            return tracked;
        }
    }
}

/// A webhook receiver that always fails, remembering every wake id it was sent.
async fn failing_receiver() -> (String, Arc<parking_lot::Mutex<Vec<String>>>) {
    let seen: Arc<parking_lot::Mutex<Vec<String>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(move |body: axum::body::Bytes| {
            let log = log.clone();
            async move {
                if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                    log.lock()
                        .push(v["wake_id"].as_str().unwrap_or_default().to_owned());
                }
                axum::http::StatusCode::SERVICE_UNAVAILABLE
            }
        }),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    (format!("http://{addr}/hook"), seen)
}

async fn subscription_crash_rounds(mode: &str) {
    let rounds: usize = std::env::var("DS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10)
        .min(6);
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();
    let mut server = start(mode, dir.path()).await;
    let put = |base: &str, path: &str, body: &str| {
        client
            .put(format!("{base}/v1/stream/{path}"))
            .header("content-type", "application/json")
            .body(body.to_owned())
    };
    put(&server.base, "sub-wake", "[]")
        .send()
        .await
        .expect("wake stream");
    let (status, _) = sub_json(put(
        &server.base,
        "__ds/subscriptions/crash-pull",
        r#"{"type":"pull-wake","pattern":"sub/*","wake_stream":"sub-wake","lease_ttl_ms":1000}"#,
    ))
    .await
    .expect("subscribe");
    assert_eq!(status, StatusCode::CREATED, "{mode}");
    for i in 0..3 {
        put(&server.base, &format!("sub/s{i}"), "[]")
            .send()
            .await
            .expect("stream");
    }
    let (hook_url, hook_seen) = failing_receiver().await;
    let (status, _) = sub_json(put(
        &server.base,
        "__ds/subscriptions/crash-hook",
        &format!(r#"{{"type":"webhook","pattern":"hook/*","webhook":{{"url":"{hook_url}"}}}}"#),
    ))
    .await
    .expect("subscribe");
    assert_eq!(status, StatusCode::CREATED, "{mode}");
    put(&server.base, "hook/x", r#"{"n":1}"#)
        .send()
        .await
        .expect("stream");

    let mut tracked = SubTracked::default();
    for round in 0..rounds {
        let worker = tokio::spawn(work_until_killed(
            client.clone(),
            server.base.clone(),
            tracked,
            round,
        ));
        tokio::time::sleep(Duration::from_millis(fastrand::u64(150..600))).await;
        server.child.kill().expect("kill -9");
        let _ = server.child.wait();
        tracked = worker.await.expect("worker");
        let wakes_before: Vec<String> = hook_seen.lock().clone();

        server = start(mode, dir.path()).await;
        let (status, sub) = sub_json(client.get(format!(
            "{}/v1/stream/__ds/subscriptions/crash-pull",
            server.base
        )))
        .await
        .expect("get");
        assert_eq!(status, StatusCode::OK, "{mode}: subscription lost");
        for (path, acked) in &tracked.acked {
            let link = sub["streams"]
                .as_array()
                .and_then(|l| l.iter().find(|l| l["path"] == path.as_str()))
                .unwrap_or_else(|| panic!("{mode}: link {path} lost"));
            let now = offset_pos(link["acked_offset"].as_str().expect("offset"));
            assert!(
                now >= *acked,
                "{mode} {path}: acked offset went back from {acked} to {now}"
            );
        }
        // The next claim (once any pre-crash lease lapsed) has a generation never seen before.
        let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
        loop {
            let (status, claim) = sub_json(
                client
                    .post(format!(
                        "{}/v1/stream/__ds/subscriptions/crash-pull/claim",
                        server.base
                    ))
                    .json(&serde_json::json!({"worker": "checker"})),
            )
            .await
            .expect("claim");
            if status == StatusCode::OK {
                let generation = claim["generation"].as_u64().expect("generation");
                assert!(
                    generation > tracked.max_generation,
                    "{mode}: generation {generation} repeats (highest answered {})",
                    tracked.max_generation
                );
                tracked.max_generation = generation;
                let r = client
                    .post(format!(
                        "{}/v1/stream/__ds/subscriptions/crash-pull/release",
                        server.base
                    ))
                    .bearer_auth(claim["token"].as_str().expect("token"))
                    .json(
                        &serde_json::json!({"wake_id": claim["wake_id"], "generation": generation}),
                    )
                    .send()
                    .await
                    .expect("release");
                assert_eq!(r.status(), StatusCode::NO_CONTENT, "{mode}");
                break;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "{mode}: no claim after restart"
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        // The failing webhook's wake is retried after the restart.
        if let Some(last) = wakes_before.last().cloned() {
            let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
            while hook_seen.lock().len() <= wakes_before.len() {
                assert!(
                    tokio::time::Instant::now() < deadline,
                    "{mode}: webhook not retried after restart"
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            let after = hook_seen.lock()[wakes_before.len()].clone();
            assert_eq!(after, last, "{mode}: the retried delivery is the same wake");
        }
    }
    assert!(
        !tracked.acked.is_empty(),
        "{mode}: the rounds acknowledged no ack"
    );
    assert!(
        !hook_seen.lock().is_empty(),
        "{mode}: the webhook was never tried"
    );
    let _ = server.child.kill();
    let _ = server.child.wait();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn subscriptions_keep_acked_acks_and_fresh_generations_across_kill_9() {
    for mode in ["file-fast", "file-durable", "acid"] {
        subscription_crash_rounds(mode).await;
    }
}
