//! What the server holds for clients beyond their data is bounded: streams
//! (`DS_LIMITS__MAX_STREAMS`), idempotent-producer states (`DS_LIMITS__MAX_PRODUCERS`, forgotten
//! after `DS_LIMITS__PRODUCER_IDLE_TIMEOUT`), and `Producer-Id` lengths. In-process server over
//! real HTTP, in every mode where the mode matters.

use std::time::Duration;

use ds_server::App;
use ds_server::config::{Config, StorageMode};
use reqwest::{Client, StatusCode};
use tokio::sync::oneshot;

const MODES: [StorageMode; 4] = [
    StorageMode::Memory,
    StorageMode::FileFast,
    StorageMode::FileDurable,
    StorageMode::Acid,
];

struct TestServer {
    base: String,
    client: Client,
    streams: std::sync::Arc<ds_server::stream::Streams>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl TestServer {
    async fn start(
        mode: StorageMode,
        dir: &std::path::Path,
        tweak: impl FnOnce(&mut Config),
    ) -> Self {
        let mut config = Config::default();
        config.server.port = 0;
        config.storage.mode = mode;
        config.storage.data_dir = dir.to_owned();
        config.storage.acid_shard_count = 2;
        tweak(&mut config);
        let app = App::build(config).await.expect("server builds");
        let addr = app.local_addr().expect("bound");
        let streams = app.streams();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        TestServer {
            base: format!("http://{addr}"),
            client: Client::new(),
            streams,
            stop: Some(stop),
            handle,
        }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.handle).await;
    }

    async fn put(&self, path: &str) -> reqwest::Response {
        self.client
            .put(format!("{}{path}", self.base))
            .header("content-type", "text/plain")
            .send()
            .await
            .expect("PUT")
    }

    async fn delete(&self, path: &str) -> StatusCode {
        self.client
            .delete(format!("{}{path}", self.base))
            .send()
            .await
            .expect("DELETE")
            .status()
    }

    async fn produce(&self, path: &str, id: &str, epoch: u64, seq: u64) -> reqwest::Response {
        self.client
            .post(format!("{}{path}", self.base))
            .header("content-type", "text/plain")
            .header("producer-id", id)
            .header("producer-epoch", epoch.to_string())
            .header("producer-seq", seq.to_string())
            .body(format!("{id}:{epoch}:{seq};"))
            .send()
            .await
            .expect("POST")
    }
}

#[tokio::test]
async fn a_producer_id_past_256_bytes_gets_400_naming_the_limit() {
    let dir = tempfile::tempdir().expect("tempdir");
    let s = TestServer::start(StorageMode::Memory, dir.path(), |_| {}).await;
    assert_eq!(s.put("/p").await.status(), StatusCode::CREATED);
    let long = "x".repeat(257);
    let r = s.produce("/p", &long, 0, 0).await;
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    let body = r.text().await.expect("body");
    assert!(
        body.contains("Producer-Id") && body.contains("256"),
        "{body}"
    );
    let at_limit = "y".repeat(256);
    assert_eq!(
        s.produce("/p", &at_limit, 0, 0).await.status(),
        StatusCode::OK
    );
    s.stop().await;
}

#[tokio::test]
async fn streams_past_the_limit_get_413_naming_it_in_every_mode() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TestServer::start(mode, dir.path(), |c| c.limits.max_streams = 3).await;
        for i in 0..3 {
            assert_eq!(
                s.put(&format!("/s{i}")).await.status(),
                StatusCode::CREATED,
                "{mode:?}"
            );
        }
        let r = s.put("/s3").await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{mode:?}");
        let body = r.text().await.expect("body");
        assert!(body.contains("DS_LIMITS__MAX_STREAMS"), "{mode:?}: {body}");
        // Confirming an existing stream is not a new one.
        assert_eq!(s.put("/s0").await.status(), StatusCode::OK, "{mode:?}");
        assert_eq!(s.delete("/s0").await, StatusCode::NO_CONTENT, "{mode:?}");
        assert_eq!(s.put("/s3").await.status(), StatusCode::CREATED, "{mode:?}");
        assert_eq!(
            s.put("/s4").await.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "{mode:?}"
        );
        s.stop().await;
    }
}

#[tokio::test]
async fn producers_past_the_limit_get_413_and_a_deleted_stream_frees_its_own() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TestServer::start(mode, dir.path(), |c| c.limits.max_producers = 2).await;
        assert_eq!(s.put("/a").await.status(), StatusCode::CREATED);
        assert_eq!(s.put("/b").await.status(), StatusCode::CREATED);
        assert_eq!(s.produce("/a", "p1", 0, 0).await.status(), StatusCode::OK);
        assert_eq!(s.produce("/a", "p2", 0, 0).await.status(), StatusCode::OK);
        let r = s.produce("/b", "p3", 0, 0).await;
        assert_eq!(r.status(), StatusCode::PAYLOAD_TOO_LARGE, "{mode:?}");
        let body = r.text().await.expect("body");
        assert!(
            body.contains("DS_LIMITS__MAX_PRODUCERS"),
            "{mode:?}: {body}"
        );
        // Nothing was stored for the refused append.
        let tail = s
            .client
            .head(format!("{}/b", s.base))
            .send()
            .await
            .expect("HEAD");
        assert_eq!(
            tail.headers()["stream-next-offset"],
            "0000000000000000_0000000000000000",
            "{mode:?}"
        );
        // Known producers carry on; so do retries and new epochs of known producers.
        assert_eq!(
            s.produce("/a", "p1", 0, 1).await.status(),
            StatusCode::OK,
            "{mode:?}"
        );
        assert_eq!(
            s.produce("/a", "p1", 0, 1).await.status(),
            StatusCode::NO_CONTENT,
            "{mode:?}"
        );
        assert_eq!(
            s.produce("/a", "p2", 1, 0).await.status(),
            StatusCode::OK,
            "{mode:?}"
        );
        assert_eq!(s.streams.producer_count(), 2, "{mode:?}");
        assert_eq!(s.delete("/a").await, StatusCode::NO_CONTENT);
        assert_eq!(s.streams.producer_count(), 0, "{mode:?}");
        assert_eq!(
            s.produce("/b", "p3", 0, 0).await.status(),
            StatusCode::OK,
            "{mode:?}"
        );
        s.stop().await;
        if mode == StorageMode::Memory {
            continue;
        }
        // After a restart the recovered producers count again.
        let s = TestServer::start(mode, dir.path(), |c| c.limits.max_producers = 2).await;
        assert_eq!(s.streams.producer_count(), 1, "{mode:?} after a restart");
        assert_eq!(
            s.produce("/b", "p4", 0, 0).await.status(),
            StatusCode::OK,
            "{mode:?}"
        );
        assert_eq!(
            s.produce("/b", "p5", 0, 0).await.status(),
            StatusCode::PAYLOAD_TOO_LARGE,
            "{mode:?} after a restart"
        );
        s.stop().await;
    }
}

/// An idle producer is forgotten, and then treated as new: an epoch below the one it had is
/// accepted (not fenced). Before that, and across a restart with the timeout not reached, the
/// old epoch still fences.
#[tokio::test]
async fn an_idle_producer_is_forgotten_in_every_mode_and_across_restarts() {
    for mode in MODES {
        let dir = tempfile::tempdir().expect("tempdir");
        let s = TestServer::start(mode, dir.path(), |_| {}).await;
        assert_eq!(s.put("/i").await.status(), StatusCode::CREATED);
        assert_eq!(s.produce("/i", "p", 5, 0).await.status(), StatusCode::OK);
        assert_eq!(
            s.produce("/i", "p", 0, 0).await.status(),
            StatusCode::FORBIDDEN,
            "{mode:?}: the stale epoch is fenced"
        );
        s.stop().await;
        if mode != StorageMode::Memory {
            // Restarted with the default timeout: recovered, still fencing.
            let s = TestServer::start(mode, dir.path(), |_| {}).await;
            assert_eq!(s.streams.producer_count(), 1, "{mode:?}");
            assert_eq!(
                s.produce("/i", "p", 0, 0).await.status(),
                StatusCode::FORBIDDEN,
                "{mode:?}: fenced after a restart"
            );
            s.stop().await;
            // Restarted with a timeout the producer has certainly passed (its append was
            // stored before the previous start): recovery forgets it.
            let s = TestServer::start(mode, dir.path(), |c| {
                c.limits.producer_idle_timeout = Duration::from_millis(1);
            })
            .await;
            assert_eq!(s.streams.producer_count(), 0, "{mode:?}: not recovered");
            assert_eq!(
                s.produce("/i", "p", 0, 0).await.status(),
                StatusCode::OK,
                "{mode:?}: forgotten at recovery, so new"
            );
            s.stop().await;
            continue;
        }
        // Memory mode: forgotten while running, once idle past the timeout.
        let s = TestServer::start(mode, dir.path(), |c| {
            c.limits.producer_idle_timeout = Duration::from_millis(20);
        })
        .await;
        assert_eq!(s.put("/i").await.status(), StatusCode::CREATED);
        assert_eq!(s.produce("/i", "p", 5, 0).await.status(), StatusCode::OK);
        let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
        loop {
            match s.produce("/i", "p", 0, 0).await.status() {
                StatusCode::OK => break,
                StatusCode::FORBIDDEN => {}
                other => panic!("unexpected {other}"),
            }
            assert!(tokio::time::Instant::now() < deadline, "never forgotten");
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        s.stop().await;
    }
}
