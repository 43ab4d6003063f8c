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
//! `DS_CRASH_ROUNDS` sets the rounds per mode (default 10). acid runs twice: with the commit log
//! (small segments, so that rolls and checkpoints happen under the kills) and with per-shard syncs.

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

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("free port")
}

async fn start(mode: &str, dir: &std::path::Path) -> Server {
    let port = free_port();
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
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ds-server");
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
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
            format!("<{}:{round}:{i}:{}>", t.path, "b".repeat(i % 23))
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

async fn crash_rounds(mode: &str) {
    let rounds: usize = std::env::var("DS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(10);
    let dir = tempfile::tempdir().expect("tempdir");
    let client = Client::new();
    let mut server = start(mode, dir.path()).await;
    let mut streams: Vec<Tracked> = (0..WRITERS)
        .map(|w| Tracked {
            path: format!("/v1/stream/crash-{w}"),
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
            .put(format!("{}{}", server.base, t.path))
            .header("content-type", ct)
            .send()
            .await
            .expect("create");
        assert_eq!(r.status(), StatusCode::CREATED);
    }
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
        streams = futures::future::join_all(tasks)
            .await
            .into_iter()
            .map(|r| r.expect("writer task"))
            .collect();

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

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("acid").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_per_shard_keeps_every_acknowledged_write_across_kill_9() {
    crash_rounds("acid-per-shard").await;
}
