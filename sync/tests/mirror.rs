//! End-to-end tests of `ds-sync` against real Postgres and the real server binary. Every scenario
//! ends with the same check (`assert_mirrored`): for every stream, the rows re-assembled in key
//! order equal a catch-up read of the stream, so a duplicate, a gap or a reordering fails it.
//!
//! Run: `cargo build -p ds-server && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo test -p ds-sync`.

mod support;

use serde_json::json;
use support::*;

const JSON: &str = "application/json";
const BIN: &str = "application/octet-stream";
const TEXT: &str = "text/plain; charset=utf-8";

fn random_bytes(n: usize) -> Vec<u8> {
    (0..n).map(|_| fastrand::u8(..)).collect()
}

/// Appends `count` small JSON and binary messages to each stream, one request each.
async fn append_load(client: StreamClient, streams: Vec<(String, &'static str)>, count: usize) {
    for i in 0..count {
        for (path, ct) in &streams {
            if *ct == JSON {
                client
                    .append(
                        path,
                        JSON,
                        json!({"i": i, "pad": "x".repeat(i % 50)}).to_string(),
                    )
                    .await;
            } else {
                client.append(path, BIN, random_bytes(1 + i % 300)).await;
            }
        }
    }
}

/// Waits until the worker has committed more rows than `than`, or the load is over (then the
/// rows may all be in already). Returns the row count.
async fn wait_progress<T>(db: &TestDb, than: i64, load: &tokio::task::JoinHandle<T>) -> i64 {
    let pg = db.client().await;
    wait_for("the worker to commit more rows", || {
        let pg = &pg;
        let done = load.is_finished();
        async move {
            let n = row_count(pg).await;
            (n > than || done).then_some(n)
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_binary_and_text_streams_mirror_exactly() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);

    // JSON: objects, a multi-line string, an empty string, an empty array as a message, unicode,
    // a batch of several messages in one append, and a large append of 5 000 messages.
    c.create("/v1/stream/json", JSON, r#"{"first":true}"#).await;
    c.append(
        "/v1/stream/json",
        JSON,
        r#"["line one\nline two\r\nthree", "", [[]], {"ü":"✓"}]"#,
    )
    .await;
    c.append("/v1/stream/json", JSON, r#"[[]]"#).await;
    // jsonb cannot hold a NUL character; such a message must not block the mirror.
    c.append("/v1/stream/json", JSON, r#"{"nul":"a\u0000b"}"#)
        .await;
    let big: Vec<_> = (0..5_000)
        .map(|i| json!({"n": i, "s": "y".repeat(i % 100)}))
        .collect();
    c.append(
        "/v1/stream/json",
        JSON,
        serde_json::to_vec(&big).unwrap_or_default(),
    )
    .await;

    // Binary: every byte value, CR/LF inside, and a 3 MiB append.
    c.create("/v1/stream/bin", BIN, (0..=255u8).collect::<Vec<_>>())
        .await;
    c.append(
        "/v1/stream/bin",
        BIN,
        b"\r\n\r\rdata: fake\n\nevent: control\n".to_vec(),
    )
    .await;
    c.append("/v1/stream/bin", BIN, random_bytes(3 << 20)).await;

    // Text with every line ending, which SSE framing could not carry byte for byte.
    c.create("/v1/stream/text", TEXT, "one\r\ntwo\rthree\n\nfour")
        .await;
    c.append("/v1/stream/text", TEXT, "\r\n  indented\r").await;

    // Empty streams: created without a body, and closed without ever holding data.
    c.create("/v1/stream/empty-json", JSON, "").await;
    c.create("/v1/stream/empty-bin", BIN, Vec::new()).await;
    c.create("/v1/stream/closed-empty", BIN, Vec::new()).await;
    c.close("/v1/stream/closed-empty", BIN, None).await;

    let streams = [
        "/v1/stream/json",
        "/v1/stream/bin",
        "/v1/stream/text",
        "/v1/stream/empty-json",
        "/v1/stream/empty-bin",
        "/v1/stream/closed-empty",
    ];
    let worker = Worker::start(&server, &db, &streams, &[]).await;
    assert_mirrored(&server, &db, &streams).await;

    // Live: appends after the worker caught up arrive too.
    c.append("/v1/stream/json", JSON, r#"{"live":1}"#).await;
    c.append("/v1/stream/bin", BIN, b"live".to_vec()).await;
    c.append("/v1/stream/text", TEXT, "live\r\n").await;
    c.append("/v1/stream/empty-json", JSON, r#"{"no longer":"empty"}"#)
        .await;
    assert_mirrored(&server, &db, &streams).await;

    let pg = db.client().await;
    let types: Vec<(String, String)> = pg
        .query(
            "SELECT DISTINCT stream, content_type FROM ds_messages ORDER BY 1",
            &[],
        )
        .await
        .unwrap_or_else(|e| panic!("{e}"))
        .iter()
        .map(|r| (r.get(0), r.get(1)))
        .collect();
    assert!(
        types
            .iter()
            .any(|(s, ct)| s == "/v1/stream/json" && ct.starts_with(JSON)),
        "content type recorded per row: {types:?}"
    );
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn worker_restart_resumes_from_its_checkpoint() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let streams = ["/v1/stream/a", "/v1/stream/b"];
    c.create(streams[0], JSON, "").await;
    c.create(streams[1], BIN, Vec::new()).await;
    append_load(
        c.clone(),
        vec![(streams[0].into(), JSON), (streams[1].into(), BIN)],
        50,
    )
    .await;

    let mut worker = Worker::start(&server, &db, &streams, &[]).await;
    assert_mirrored(&server, &db, &streams).await;
    worker.stop();

    // Written while no worker runs: picked up from the checkpoint, nothing read twice.
    append_load(
        c.clone(),
        vec![(streams[0].into(), JSON), (streams[1].into(), BIN)],
        50,
    )
    .await;
    let mut worker = Worker::start(&server, &db, &streams, &[]).await;
    assert_mirrored(&server, &db, &streams).await;
    worker.stop();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_mid_batch_neither_duplicates_nor_skips() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let streams: Vec<(String, &str)> = (0..4)
        .map(|i| {
            (
                format!("/v1/stream/k{i}"),
                if i % 2 == 0 { JSON } else { BIN },
            )
        })
        .collect();
    for (path, ct) in &streams {
        c.create(path, ct, Vec::new()).await;
    }
    let paths: Vec<&str> = streams.iter().map(|(p, _)| p.as_str()).collect();
    // Large batches and a long linger keep transactions open long enough to be killed inside.
    let extra = [("DS_SYNC__BATCH_ROWS", "400"), ("DS_SYNC__LINGER", "50ms")];
    let mut worker = Worker::start(&server, &db, &paths, &extra).await;
    let load = tokio::spawn(append_load(c.clone(), streams.clone(), 1_000));

    let (mut seen, mut kills_under_load) = (0, 0);
    for _ in 0..6 {
        seen = wait_progress(&db, seen, &load).await;
        kills_under_load += usize::from(!load.is_finished());
        worker.restart().await; // SIGKILL, then start again
    }
    load.await.unwrap_or_else(|e| panic!("load task: {e}"));
    assert!(
        kills_under_load > 0,
        "the load ended before the first kill: the test proved little"
    );
    assert_mirrored(&server, &db, &paths).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn postgres_connections_cut_mid_run_neither_duplicate_nor_skip() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let streams: Vec<(String, &str)> = (0..4)
        .map(|i| {
            (
                format!("/v1/stream/p{i}"),
                if i % 2 == 0 { JSON } else { BIN },
            )
        })
        .collect();
    for (path, ct) in &streams {
        c.create(path, ct, Vec::new()).await;
    }
    let paths: Vec<&str> = streams.iter().map(|(p, _)| p.as_str()).collect();
    let mut worker = Worker::start(&server, &db, &paths, &[]).await;
    let load = tokio::spawn(append_load(c.clone(), streams.clone(), 1_000));

    let mut seen = 0;
    let mut cut = 0;
    for _ in 0..6 {
        seen = wait_progress(&db, seen, &load).await;
        cut += db.terminate_connections().await;
    }
    load.await.unwrap_or_else(|e| panic!("load task: {e}"));
    assert!(
        cut > 0,
        "no connection was terminated: the test proved nothing"
    );
    assert_mirrored(&server, &db, &paths).await;
    assert!(
        worker.is_running(),
        "the worker must survive Postgres outages; log {}",
        worker.log.display()
    );
    assert!(
        worker.log_text().contains("batch commit failed"),
        "cutting connections should have failed at least one commit (log {})",
        worker.log.display()
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn server_restart_mid_run_neither_duplicates_nor_skips() {
    let db = TestDb::create().await;
    let mut server = Server::start_durable().await;
    let c = StreamClient::new(&server);
    let streams: Vec<(String, &str)> = (0..3)
        .map(|i| {
            (
                format!("/v1/stream/r{i}"),
                if i % 2 == 0 { JSON } else { BIN },
            )
        })
        .collect();
    for (path, ct) in &streams {
        c.create(path, ct, Vec::new()).await;
    }
    let paths: Vec<&str> = streams.iter().map(|(p, _)| p.as_str()).collect();
    let worker = Worker::start(&server, &db, &paths, &[]).await;
    // Appends keep coming while the server goes down and up; those refused while it is down are
    // simply not in the stream, and the mirror is compared with what the server kept.
    let load = {
        let (c, streams) = (c.clone(), streams.clone());
        tokio::spawn(async move {
            let mut acknowledged = 0usize;
            for i in 0..1_500usize {
                let (path, ct) = &streams[i % streams.len()];
                let body = if *ct == JSON {
                    json!({ "i": i }).to_string().into_bytes()
                } else {
                    random_bytes(1 + i % 200)
                };
                acknowledged += usize::from(c.try_append(path, ct, body).await);
            }
            acknowledged
        })
    };
    let (mut seen, mut restarts_under_load) = (0, 0);
    for _ in 0..3 {
        seen = wait_progress(&db, seen, &load).await;
        restarts_under_load += usize::from(!load.is_finished());
        server.restart().await; // SIGKILL, then start on the same port and data
    }
    let acknowledged = load.await.unwrap_or_else(|e| panic!("load task: {e}"));
    assert!(
        acknowledged > 0 && restarts_under_load > 0,
        "the test proved little"
    );
    assert_mirrored(&server, &db, &paths).await;
    drop(worker);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn closed_stream_is_recorded_and_no_longer_followed() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let (json_path, bin_path) = ("/v1/stream/done-json", "/v1/stream/done-bin");
    c.create(json_path, JSON, r#"{"a":1}"#).await;
    c.create(bin_path, BIN, b"abc".to_vec()).await;
    let worker = Worker::start(&server, &db, &[json_path, bin_path], &[]).await;
    assert_mirrored(&server, &db, &[json_path, bin_path]).await;

    // One closes with a final append, the other with a close-only request.
    c.close(json_path, JSON, Some(br#"{"final":true}"#.to_vec()))
        .await;
    c.append(bin_path, BIN, b"def".to_vec()).await;
    c.close(bin_path, BIN, None).await;
    assert_mirrored(&server, &db, &[json_path, bin_path]).await;

    let pg = db.client().await;
    let cps = checkpoints(&pg).await;
    for path in [json_path, bin_path] {
        assert!(
            cps.get(path).is_some_and(|cp| cp.closed),
            "{path} not recorded closed"
        );
    }
    let status = worker.status_json().await;
    for path in [json_path, bin_path] {
        assert_eq!(status["streams"][path]["state"], "closed", "{status}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn deleted_stream_is_recorded_and_not_retried() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let (kept, doomed, never) = (
        "/v1/stream/kept",
        "/v1/stream/doomed",
        "/v1/stream/never-existed",
    );
    c.create(kept, JSON, r#"{"k":1}"#).await;
    c.create(doomed, JSON, r#"[{"d":1},{"d":2}]"#).await;
    let mut worker = Worker::start(&server, &db, &[kept, doomed, never], &[]).await;
    assert_mirrored(&server, &db, &[kept, doomed]).await;

    c.delete(doomed).await;
    c.append(kept, JSON, r#"{"k":2}"#).await;
    let pg = db.client().await;
    wait_for("the deleted and the missing stream to be recorded", || {
        let pg = &pg;
        async move {
            let cps = checkpoints(pg).await;
            let gone = |p: &str| cps.get(p).is_some_and(|cp| cp.deleted);
            (gone(doomed) && gone(never)).then_some(())
        }
    })
    .await;
    let cps = checkpoints(&pg).await;
    assert!(
        matches!(
            cps.get(never).and_then(|c| c.deleted_status),
            Some(404 | 410)
        ),
        "{cps:?}"
    );
    // The rows mirrored before the delete stay.
    assert_eq!(mirrored(&pg, doomed).await.len(), 2);
    assert_mirrored(&server, &db, &[kept]).await;
    let status = worker.status_json().await;
    assert_eq!(status["streams"][doomed]["state"], "deleted", "{status}");

    // Not retried after a restart either: the worker does not follow it again.
    worker.restart().await;
    c.append(kept, JSON, r#"{"k":3}"#).await;
    assert_mirrored(&server, &db, &[kept]).await;
    let status = worker.status_json().await;
    assert!(status["streams"].get(doomed).is_none(), "{status}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn many_streams_take_turns_on_few_connections() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let paths: Vec<String> = (0..40).map(|i| format!("/v1/stream/m{i:02}")).collect();
    for p in &paths {
        c.create(p, JSON, r#"{"hello":1}"#).await;
    }
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let extra = [
        ("DS_SYNC__MAX_CONNECTIONS", "4"),
        ("DS_SYNC__YIELD_AFTER", "100ms"),
    ];
    let _worker = Worker::start(&server, &db, &refs, &extra).await;
    assert_mirrored(&server, &db, &refs).await;
    // Appends to every stream again: each must get a turn while others wait.
    for p in &paths {
        c.append(p, JSON, r#"{"again":2}"#).await;
    }
    assert_mirrored(&server, &db, &refs).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prefix_pattern_discovers_streams_through_the_registry() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    c.create("/v1/stream/orders/early", JSON, r#"{"o":1}"#)
        .await;
    c.create("/v1/stream/other", JSON, r#"{"x":1}"#).await;
    let mut worker = Worker::start(&server, &db, &["/v1/stream/orders/*"], &[]).await;
    assert_mirrored(&server, &db, &["/v1/stream/orders/early"]).await;

    // Created while the worker runs, and while it is down: both found.
    c.create("/v1/stream/orders/late", BIN, b"late".to_vec())
        .await;
    assert_mirrored(&server, &db, &["/v1/stream/orders/late"]).await;
    worker.kill9();
    c.create("/v1/stream/orders/while-down", JSON, r#"{"w":1}"#)
        .await;
    worker.restart().await;
    let all = [
        "/v1/stream/orders/early",
        "/v1/stream/orders/late",
        "/v1/stream/orders/while-down",
    ];
    assert_mirrored(&server, &db, &all).await;
    let pg = db.client().await;
    assert!(
        !checkpoints(&pg).await.contains_key("/v1/stream/other"),
        "a stream outside the pattern was followed"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_workers_on_the_same_streams_never_write_twice() {
    // A misconfiguration, not a supported setup: the checkpoint fence must turn it into at most
    // a stopped worker, never a duplicate or a gap.
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let streams: Vec<(String, &str)> = (0..2)
        .map(|i| (format!("/v1/stream/t{i}"), if i == 0 { JSON } else { BIN }))
        .collect();
    for (path, ct) in &streams {
        c.create(path, ct, Vec::new()).await;
    }
    let paths: Vec<&str> = streams.iter().map(|(p, _)| p.as_str()).collect();
    let mut a = Worker::start(&server, &db, &paths, &[]).await;
    let mut b = Worker::start(&server, &db, &paths, &[]).await;
    append_load(c.clone(), streams.clone(), 300).await;
    // Whichever worker the fence stopped, one that runs must finish the job.
    if !a.is_running() && !b.is_running() {
        a.restart().await;
    }
    assert_mirrored(&server, &db, &paths).await;
    for w in [&mut a, &mut b] {
        if !w.is_running() {
            assert!(
                w.log_text().contains("checkpoint is at"),
                "a worker stopped for another reason; log {}",
                w.log.display()
            );
        }
    }
}
