//! ds-sync as a subscriber (issue 21), against the real server binary and real Postgres: the
//! worker creates its subscription, acks what Postgres committed (never more), discovers new
//! streams under its pattern, re-creates the subscription after a memory-mode server restart,
//! and a standby worker takes over the lease after the working one is killed, with every
//! message in Postgres exactly once.
//!
//! Run: `cargo build -p ds-server && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo test -p ds-sync --test subscription`.

mod support;

use serde_json::json;
use support::*;

const JSON: &str = "application/json";
const BIN: &str = "application/octet-stream";
/// A stream's first offset, as the server writes it.
const ZERO: &str = "0000000000000000_0000000000000000";
const HOLDING: &str = "holding the subscription's lease";

/// A checkpoint's offset as the server writes it (`-1` is the start).
fn position(offset: &str) -> &str {
    if offset == "-1" { ZERO } else { offset }
}

async fn load(c: StreamClient, paths: Vec<(String, &'static str)>, count: usize) {
    for i in 0..count {
        for (path, ct) in &paths {
            if *ct == JSON {
                c.append(path, JSON, json!({"i": i}).to_string()).await;
            } else {
                c.append(path, BIN, format!("b{i};").into_bytes()).await;
            }
        }
    }
}

/// Waits until the worker's log says it holds the lease (`times` times in all).
async fn wait_holding(worker: &Worker, times: usize) {
    wait_for("the worker to hold the subscription's lease", || {
        let n = worker.log_text().matches(HOLDING).count();
        async move { (n >= times).then_some(()) }
    })
    .await;
}

/// Asserts the server's acked offset of every linked stream is at most its checkpoint in
/// Postgres. The acks are read first: both only move forward, so an ack that ever led
/// Postgres shows here.
async fn assert_acks_trail_postgres(server: &Server, pg: &tokio_postgres::Client) -> usize {
    let sub = subscription(server, "ds-sync")
        .await
        .unwrap_or_else(|| panic!("the subscription ds-sync exists"));
    let acked = acked_offsets(&sub);
    let cps = checkpoints(pg).await;
    let mut moved = 0;
    for (path, offset) in &acked {
        if offset == ZERO {
            continue;
        }
        moved += 1;
        let cp = cps
            .get(path)
            .unwrap_or_else(|| panic!("{path} is acked at {offset} but has no checkpoint"));
        assert!(
            offset.as_str() <= position(&cp.next_offset),
            "{path}: the server's acked offset {offset} leads Postgres' checkpoint {}",
            cp.next_offset
        );
    }
    moved
}

/// Waits until the server's acked offset of every `path` equals its checkpoint in Postgres.
async fn wait_acked_up_to_postgres(server: &Server, db: &TestDb, paths: &[&str]) {
    let pg = db.client().await;
    for &path in paths {
        wait_for(&format!("{path} acked up to its checkpoint"), || {
            let pg = &pg;
            async move {
                let sub = subscription(server, "ds-sync").await?;
                let acked = acked_offsets(&sub).get(path).cloned()?;
                let cp = checkpoints(pg).await.get(path)?.next_offset.clone();
                (acked == position(&cp)).then_some(())
            }
        })
        .await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acks_reach_the_server_after_commit_and_never_lead_postgres() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    // Held before the subscription exists: linked from its start, so it stays pending.
    let early = "/v1/stream/acked/early";
    c.create(early, JSON, r#"[{"early":1},{"early":2}]"#).await;
    let worker = Worker::start(&server, &db, &["/v1/stream/acked/*"], &[]).await;
    wait_holding(&worker, 1).await;
    let sub = subscription(&server, "ds-sync")
        .await
        .unwrap_or_else(|| panic!("the worker created its subscription"));
    assert_eq!(sub["pattern"], "v1/stream/acked/**");
    assert_eq!(sub["wake_stream"], "_ds-sync/ds-sync/wake");
    let links = acked_offsets(&sub);
    assert!(
        links.contains_key("/_ds/registry"),
        "the registry is linked so that it can be released once committed: {sub}"
    );

    // Created after the worker started: discovered through the pattern.
    let paths = ["/v1/stream/acked/a", "/v1/stream/acked/b"];
    c.create(paths[0], JSON, "").await;
    c.create(paths[1], BIN, Vec::new()).await;
    let writer = tokio::spawn(load(
        c.clone(),
        vec![(paths[0].into(), JSON), (paths[1].into(), BIN)],
        300,
    ));
    let pg = db.client().await;
    let mut samples = 0;
    let mut moved = 0;
    while !writer.is_finished() || samples < 10 {
        moved = moved.max(assert_acks_trail_postgres(&server, &pg).await);
        samples += 1;
    }
    writer
        .await
        .unwrap_or_else(|e| panic!("the writer failed: {e}"));
    let all = [paths[0], paths[1], early];
    assert_mirrored(&server, &db, &all).await;
    let mut linked = all.to_vec();
    linked.push("/_ds/registry");
    wait_acked_up_to_postgres(&server, &db, &linked).await;
    assert_acks_trail_postgres(&server, &pg).await;
    let sub = subscription(&server, "ds-sync")
        .await
        .unwrap_or_else(|| panic!("subscription"));
    let links = acked_offsets(&sub);
    for path in all {
        assert_ne!(links.get(path).map(String::as_str), Some(ZERO), "{path}");
    }
    assert!(samples >= 10 && moved <= linked.len());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_standby_worker_takes_over_after_the_working_one_is_killed() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let pattern = ["/v1/stream/failover/*"];
    let mut a = Worker::start(&server, &db, &pattern, &[]).await;
    wait_holding(&a, 1).await;
    let mut b = Worker::start(&server, &db, &pattern, &[]).await;
    wait_for("the second worker to stand by", || {
        let text = b.log_text();
        async move { text.contains("standing by").then_some(()) }
    })
    .await;
    assert!(
        !b.log_text().contains(HOLDING),
        "two workers hold one lease"
    );

    let streams: Vec<(String, &str)> = (0..3)
        .map(|i| {
            (
                format!("/v1/stream/failover/s{i}"),
                if i == 0 { JSON } else { BIN },
            )
        })
        .collect();
    for (path, ct) in &streams {
        c.create(path, ct, Vec::new()).await;
    }
    let writer = tokio::spawn(load(c.clone(), streams.clone(), 400));
    // Mid-stream: some rows are in, the writer is still going.
    let pg = db.client().await;
    wait_for("the first worker to commit rows", || {
        let pg = &pg;
        async move { (row_count(pg).await > 0).then_some(()) }
    })
    .await;
    a.kill9();
    wait_holding(&b, 1).await;
    writer
        .await
        .unwrap_or_else(|e| panic!("the writer failed: {e}"));
    let paths: Vec<&str> = streams.iter().map(|(p, _)| p.as_str()).collect();
    // Every message exactly once: the mirror equals the stream, message for message.
    assert_mirrored(&server, &db, &paths).await;
    let expected: usize = {
        let mut n = 0;
        for p in &paths {
            n += match c.catch_up(p).await {
                Content::Json(v) => v.len(),
                // One row per read for byte streams: compare bytes instead (assert_mirrored did).
                Content::Bytes(_) => 0,
            };
        }
        n
    };
    let json_rows: i64 = pg
        .query_one(
            "SELECT count(*) FROM ds_messages WHERE content_type LIKE 'application/json%'",
            &[],
        )
        .await
        .map(|r| r.get(0))
        .unwrap_or(-1);
    assert_eq!(
        json_rows, expected as i64,
        "JSON rows in Postgres vs messages"
    );
    wait_acked_up_to_postgres(&server, &db, &paths).await;
    assert!(b.is_running());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_subscription_is_created_again_after_a_memory_server_restart() {
    let db = TestDb::create().await;
    let mut server = Server::start().await;
    let c = StreamClient::new(&server);
    let path = "/v1/stream/restart/x";
    c.create(path, JSON, r#"{"n":1}"#).await;
    let worker = Worker::start(&server, &db, &[path], &[]).await;
    wait_holding(&worker, 1).await;
    assert_mirrored(&server, &db, &[path]).await;
    wait_acked_up_to_postgres(&server, &db, &[path]).await;

    // Memory mode: the subscription (and the stream) are gone after the restart. The worker's
    // next heartbeat meets 404, and it creates the subscription and claims it again.
    server.restart().await;
    wait_holding(&worker, 2).await;
    let sub = subscription(&server, "ds-sync").await;
    assert!(sub.is_some(), "the subscription exists again");
    assert!(worker.log_text().contains("lost the subscription's lease"));
}
