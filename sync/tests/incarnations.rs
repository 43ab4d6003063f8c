//! A path deleted and created again holds a new stream whose offsets start again: ds-sync mirrors
//! it as the path's next incarnation, from its first message, and keeps the rows of the earlier
//! one. Each scenario checks both: the latest incarnation equals a catch-up read of the stream
//! (`assert_mirrored`), and the earlier incarnation holds exactly what the first stream held, not
//! one message of the second.
//!
//! Run: `cargo build -p ds-server && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo test -p ds-sync --test incarnations`.

mod support;

use serde_json::{Value, json};
use support::*;

const JSON: &str = "application/json";

fn messages(life: u32, count: u32) -> Vec<Value> {
    (0..count)
        .map(|n| json!({ "life": life, "n": n }))
        .collect()
}

/// Appends `messages` in one request.
async fn append_all(c: &StreamClient, path: &str, messages: &[Value]) {
    c.append(path, JSON, Value::Array(messages.to_vec()).to_string())
        .await;
}

async fn checkpoint_of(db: &TestDb, path: &str) -> CheckpointRow {
    let pg = db.client().await;
    checkpoints(&pg)
        .await
        .remove(path)
        .unwrap_or_else(|| panic!("{path} has no checkpoint row"))
}

async fn wait_deleted(db: &TestDb, path: &str) {
    let pg = db.client().await;
    wait_for(&format!("{path} recorded deleted"), || {
        let pg = &pg;
        async move {
            let cps = checkpoints(pg).await;
            cps.get(path).is_some_and(|cp| cp.deleted).then_some(())
        }
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_recreated_under_a_pattern_is_mirrored_as_the_next_incarnation() {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let path = "/v1/stream/re/reused";
    let first = messages(1, 3);
    c.create(path, JSON, "").await;
    append_all(&c, path, &first).await;
    let _worker = Worker::start(&server, &db, &["/v1/stream/re/*"], &[]).await;
    assert_mirrored(&server, &db, &[path]).await;

    c.delete(path).await;
    wait_deleted(&db, path).await;
    // Longer than the first stream, so that no offset of the second one looks like a repeat.
    let second = messages(2, 5);
    c.create(path, JSON, "").await;
    append_all(&c, path, &second).await;
    let bystander = "/v1/stream/re/bystander";
    c.create(bystander, JSON, r#"{"other":true}"#).await;
    assert_mirrored(&server, &db, &[path, bystander]).await;

    let cp = checkpoint_of(&db, path).await;
    assert_eq!((cp.incarnation, cp.deleted), (2, false), "{cp:?}");
    let pg = db.client().await;
    assert_eq!(
        mirrored_incarnation(&pg, path, 1).await,
        Content::Json(first)
    );
    assert_eq!(mirrored(&pg, path).await, Content::Json(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_recreated_while_the_worker_was_down_is_not_read_into_the_old_incarnation() {
    // The worker's checkpoint of the first stream is a valid offset inside the second, longer
    // one; only the registry's events (read to the tail before any stream is followed) say that
    // the stream there is another one.
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let path = "/v1/stream/down/reused";
    let first = messages(1, 2);
    c.create(path, JSON, "").await;
    append_all(&c, path, &first).await;
    let mut worker = Worker::start(&server, &db, &["/v1/stream/down/*"], &[]).await;
    assert_mirrored(&server, &db, &[path]).await;
    worker.stop();

    c.delete(path).await;
    let second = messages(2, 20);
    c.create(path, JSON, "").await;
    append_all(&c, path, &second).await;
    let _worker = Worker::start(&server, &db, &["/v1/stream/down/*"], &[]).await;
    assert_mirrored(&server, &db, &[path]).await;

    let cp = checkpoint_of(&db, path).await;
    assert_eq!(cp.incarnation, 2, "{cp:?}");
    let pg = db.client().await;
    assert_eq!(
        mirrored_incarnation(&pg, path, 1).await,
        Content::Json(first)
    );
    assert_eq!(mirrored(&pg, path).await, Content::Json(second));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_explicit_path_that_holds_a_new_stream_is_mirrored_as_the_next_incarnation() {
    // No pattern, so no registry: the worker finds new streams at its explicit paths itself.
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let (shorter, deleted) = ("/v1/stream/x/shorter", "/v1/stream/x/deleted");
    let shorter_first = messages(1, 6);
    let deleted_first = messages(1, 2);
    c.create(shorter, JSON, "").await;
    append_all(&c, shorter, &shorter_first).await;
    c.create(deleted, JSON, "").await;
    append_all(&c, deleted, &deleted_first).await;
    let mut worker = Worker::start(&server, &db, &[shorter, deleted], &[]).await;
    assert_mirrored(&server, &db, &[shorter, deleted]).await;

    // Deleted while followed: recorded, then created again.
    c.delete(deleted).await;
    wait_deleted(&db, deleted).await;
    let deleted_second = messages(2, 3);
    c.create(deleted, JSON, "").await;
    append_all(&c, deleted, &deleted_second).await;
    // Replaced while the worker is down by a shorter stream: the follower resumes at an offset
    // beyond the new stream's tail, which the server answers with the (earlier) tail.
    worker.stop();
    c.delete(shorter).await;
    let shorter_second = messages(2, 1);
    c.create(shorter, JSON, "").await;
    append_all(&c, shorter, &shorter_second).await;

    // On start the worker looks at the deleted path again and finds the new stream.
    let _worker = Worker::start(&server, &db, &[shorter, deleted], &[]).await;
    assert_mirrored(&server, &db, &[shorter, deleted]).await;
    let pg = db.client().await;
    for (path, first, second) in [
        (shorter, shorter_first, shorter_second),
        (deleted, deleted_first, deleted_second),
    ] {
        let cp = checkpoint_of(&db, path).await;
        assert_eq!((cp.incarnation, cp.deleted), (2, false), "{path}: {cp:?}");
        assert_eq!(
            mirrored_incarnation(&pg, path, 1).await,
            Content::Json(first),
            "{path}"
        );
        assert_eq!(mirrored(&pg, path).await, Content::Json(second), "{path}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_stream_recreated_and_grown_past_the_checkpoint_is_fenced_by_its_stream_id() {
    // The race the stream id closes: no pattern, so no registry to say what happened while the
    // worker was down, and the new stream is longer than the old one, so the old checkpoint is a
    // valid offset inside it and no offset goes backwards. Only the `Stream-Id` of the responses
    // tells that the stream behind the path is another one.
    const BINARY: &str = "application/octet-stream";
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let path = "/v1/stream/fence/reused";
    let first: Vec<u8> = (0..=255u8).cycle().take(300).collect();
    c.create(path, BINARY, "").await;
    for chunk in first.chunks(100) {
        c.append(path, BINARY, chunk.to_vec()).await;
    }
    let mut worker = Worker::start(&server, &db, &[path], &[]).await;
    assert_mirrored(&server, &db, &[path]).await;
    let old = checkpoint_of(&db, path).await;
    worker.stop();

    c.delete(path).await;
    c.create(path, BINARY, "").await;
    let second: Vec<u8> = (0..=255u8).rev().cycle().take(1000).collect();
    for chunk in second.chunks(250) {
        c.append(path, BINARY, chunk.to_vec()).await;
    }
    let (new_tail, _) = c.tail(path).await;
    assert!(
        new_tail > old.next_offset,
        "the new stream must grow past the old checkpoint ({new_tail} vs {})",
        old.next_offset
    );

    let _worker = Worker::start(&server, &db, &[path], &[]).await;
    // The current incarnation equals a catch-up read of the new stream, byte for byte.
    assert_mirrored(&server, &db, &[path]).await;
    let cp = checkpoint_of(&db, path).await;
    assert_eq!(
        (cp.incarnation, cp.deleted),
        (old.incarnation + 1, false),
        "{cp:?}"
    );
    let pg = db.client().await;
    assert_eq!(
        mirrored_incarnation(&pg, path, old.incarnation).await,
        Content::Bytes(first),
        "the old incarnation holds exactly the old stream"
    );
    assert_eq!(mirrored(&pg, path).await, Content::Bytes(second));
    // The new incarnation is recorded as the stream the server names now.
    let head = reqwest::Client::new()
        .head(server.url(path))
        .send()
        .await
        .unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
    let served_id = head
        .headers()
        .get("stream-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned);
    assert!(served_id.is_some(), "the server sends Stream-Id");
    let recorded_id: Option<String> = pg
        .query_one(
            "SELECT stream_id FROM ds_checkpoints WHERE stream = $1",
            &[&path],
        )
        .await
        .unwrap_or_else(|e| panic!("stream_id of {path}: {e}"))
        .get(0);
    assert_eq!(recorded_id, served_id);
}
