//! Retention (`DS_RETENTION__MODE=acked`) over real HTTP against the in-process server in memory
//! mode: acks of every subscription linked to a stream release its prefix; reads below the
//! earliest retained offset get 410 with `Stream-Earliest-Offset`; forks pin their source; the
//! memory budget counts retained bytes and pushes back with 503 + `Retry-After` until acks
//! arrive; the registry records every create and delete and stays bounded. Waits poll a
//! condition with a deadline; nothing sleeps to wait.

use std::time::{Duration, Instant};

use ds_server::App;
use ds_server::config::{Config, RetentionMode};
use ds_server::stream::Streams;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use std::sync::Arc;
use tokio::sync::oneshot;

const ROOT: &str = "/v1/stream/";
const START: &str = "0000000000000000_0000000000000000";

struct Server {
    base: String,
    client: Client,
    streams: Arc<Streams>,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

/// A claimed pull-wake subscription: what an ack needs.
struct Worker {
    root: String,
    id: String,
    token: String,
    wake_id: Value,
    generation: Value,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::default();
        config.server.port = 0;
        config.retention.mode = RetentionMode::Acked;
        tweak(&mut config);
        let app = App::build(config).await.expect("server builds");
        let addr = app.local_addr().expect("bound");
        let streams = app.streams();
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Server {
            base: format!("http://{addr}"),
            client: Client::new(),
            streams,
            stop: Some(stop),
            handle,
        }
    }

    fn url(&self, rel: &str) -> String {
        format!("{}{ROOT}{rel}", self.base)
    }

    async fn put_stream(&self, rel: &str) -> reqwest::Response {
        self.client
            .put(self.url(rel))
            .header("content-type", "application/json")
            .send()
            .await
            .expect("put")
    }

    async fn post(&self, rel: &str, body: &str) -> reqwest::Response {
        self.client
            .post(self.url(rel))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("append")
    }

    /// Appends and returns the new tail offset.
    async fn append(&self, rel: &str, body: &str) -> String {
        let r = self.post(rel, body).await;
        assert!(r.status().is_success(), "append {}", r.status());
        header(&r, "stream-next-offset")
    }

    async fn get(&self, rel: &str, query: &str) -> reqwest::Response {
        self.client
            .get(format!("{}?{query}", self.url(rel)))
            .send()
            .await
            .expect("get")
    }

    async fn head(&self, rel: &str) -> reqwest::Response {
        self.client.head(self.url(rel)).send().await.expect("head")
    }

    async fn earliest(&self, rel: &str) -> Option<String> {
        self.head(rel)
            .await
            .headers()
            .get("stream-earliest-offset")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned)
    }

    /// A pull-wake subscription of `root` (`/v1/stream/` or `/`), claimed at once.
    async fn subscribe(&self, root: &str, id: &str, config: Value) -> Worker {
        let sub_url = format!("{}{root}__ds/subscriptions/{id}", self.base);
        let r = self
            .client
            .put(&sub_url)
            .json(&config)
            .send()
            .await
            .expect("put sub");
        assert!(r.status().is_success(), "subscription {}", r.status());
        let r = self
            .client
            .post(format!("{sub_url}/claim"))
            .json(&json!({"worker": "w"}))
            .send()
            .await
            .expect("claim");
        assert_eq!(r.status(), StatusCode::OK, "claim");
        let claim: Value = r.json().await.expect("claim body");
        Worker {
            root: root.to_owned(),
            id: id.to_owned(),
            token: claim["token"].as_str().expect("token").to_owned(),
            wake_id: claim["wake_id"].clone(),
            generation: claim["generation"].clone(),
        }
    }

    /// Acks `offset` of `stream` (root-relative) for `w`, keeping the claim.
    async fn ack(&self, w: &Worker, stream: &str, offset: &str) {
        let r = self
            .client
            .post(format!(
                "{}{}__ds/subscriptions/{}/ack",
                self.base, w.root, w.id
            ))
            .bearer_auth(&w.token)
            .json(&json!({
                "wake_id": w.wake_id,
                "generation": w.generation,
                "acks": [{"stream": stream, "offset": offset}],
            }))
            .send()
            .await
            .expect("ack");
        let status = r.status();
        assert_eq!(
            status,
            StatusCode::OK,
            "ack: {}",
            r.text().await.unwrap_or_default()
        );
    }

    /// Waits until the subscription `w` links `stream` (links of new streams come from the
    /// delivery task).
    async fn linked(&self, w: &Worker, stream: &str) {
        let url = format!("{}{}__ds/subscriptions/{}", self.base, w.root, w.id);
        eventually("the link", || async {
            let sub: Value = self
                .client
                .get(&url)
                .send()
                .await
                .expect("get sub")
                .json()
                .await
                .unwrap_or_default();
            sub["streams"]
                .as_array()
                .is_some_and(|l| l.iter().any(|l| l["path"] == stream))
        })
        .await;
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.handle).await;
    }
}

fn header(r: &reqwest::Response, name: &str) -> String {
    r.headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned()
}

fn pull_sub(pattern: &str, wake: &str) -> Value {
    json!({"type": "pull-wake", "pattern": pattern, "wake_stream": wake, "lease_ttl_ms": 600_000})
}

/// Polls `check` until it holds, for at most 10 s.
async fn eventually<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        if check().await {
            return;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

#[tokio::test]
async fn release_waits_for_every_subscription_and_stops_at_the_lowest_ack() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a").await;
    s.put_stream("w/b").await;
    let a = s.subscribe(ROOT, "a", pull_sub("r/*", "w/a")).await;
    let b = s.subscribe(ROOT, "b", pull_sub("r/*", "w/b")).await;
    s.put_stream("r/s").await;
    s.linked(&a, "r/s").await;
    s.linked(&b, "r/s").await;
    let o1 = s.append("r/s", r#"{"n":1}"#).await;
    let _o2 = s.append("r/s", r#"{"n":2}"#).await;
    let o3 = s.append("r/s", r#"{"n":3}"#).await;

    s.ack(&a, "r/s", &o3).await;
    s.ack(&b, "r/s", &o1).await;
    eventually("the release up to b's ack", || async {
        s.earliest("r/s").await.as_deref() == Some(o1.as_str())
    })
    .await;

    // Below the earliest retained offset: 410, the offset to resume at, and where data went.
    let r = s.get("r/s", &format!("offset={START}")).await;
    assert_eq!(r.status(), StatusCode::GONE);
    assert_eq!(header(&r, "stream-earliest-offset"), o1);
    assert_eq!(header(&r, "cache-control"), "no-store");
    let body = r.text().await.expect("body");
    assert!(body.contains("Postgres"), "{body}");
    assert!(body.contains(&o1), "{body}");
    // Long-poll and SSE readers there get the same answer.
    let r = s
        .get("r/s", &format!("offset={START}&live=long-poll"))
        .await;
    assert_eq!(r.status(), StatusCode::GONE);
    let r = s.get("r/s", &format!("offset={START}&live=sse")).await;
    assert_eq!(r.status(), StatusCode::GONE);
    assert_eq!(header(&r, "stream-earliest-offset"), o1);

    // `-1` reads from the earliest retained data (what the upstream client sends by default).
    let r = s.get("r/s", "offset=-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "stream-earliest-offset"), o1);
    assert_eq!(header(&r, "stream-next-offset"), o3);
    let got: Value = r.json().await.expect("json");
    assert_eq!(got, json!([{"n": 2}, {"n": 3}]));
    // And from the earliest offset itself.
    let r = s.get("r/s", &format!("offset={o1}")).await;
    assert_eq!(r.status(), StatusCode::OK);

    // Once b catches up, everything goes; HEAD still answers with the tail.
    s.ack(&b, "r/s", &o3).await;
    eventually("the release up to the tail", || async {
        s.earliest("r/s").await.as_deref() == Some(o3.as_str())
    })
    .await;
    let h = s.head("r/s").await;
    assert_eq!(h.status(), StatusCode::OK);
    assert_eq!(header(&h, "stream-next-offset"), o3);
    let r = s.get("r/s", "offset=-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "stream-up-to-date"), "true");
    assert_eq!(r.json::<Value>().await.expect("json"), json!([]));
    // Appends go on as usual after a full release.
    let o4 = s.append("r/s", r#"{"n":4}"#).await;
    let r = s.get("r/s", &format!("offset={o3}")).await;
    assert_eq!(header(&r, "stream-next-offset"), o4);
    assert_eq!(r.json::<Value>().await.expect("json"), json!([{"n": 4}]));
    s.stop().await;
}

#[tokio::test]
async fn streams_no_subscription_links_are_never_released() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("linked/*", "w/a")).await;
    s.put_stream("alone").await;
    s.append("alone", r#"{"n":1}"#).await;
    s.put_stream("linked/s").await;
    s.linked(&a, "linked/s").await;
    let tail = s.append("linked/s", r#"{"n":1}"#).await;
    s.ack(&a, "linked/s", &tail).await;
    eventually("the linked stream's release", || async {
        s.earliest("linked/s").await.as_deref() == Some(tail.as_str())
    })
    .await;
    // The retention task has run its passes; the stream nobody links keeps everything.
    assert_eq!(s.earliest("alone").await, None);
    let r = s.get("alone", &format!("offset={START}")).await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json"), json!([{"n": 1}]));
    // The wake stream (linked by nobody) keeps its wake events too.
    assert_eq!(s.get("w/a", "offset=-1").await.status(), StatusCode::OK);
    assert_eq!(s.earliest("w/a").await, None);
    s.stop().await;
}

#[tokio::test]
async fn a_fork_pins_its_source_until_it_is_deleted() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("p/*", "w/a")).await;
    s.put_stream("p/src").await;
    s.put_stream("p/ctl").await;
    s.linked(&a, "p/src").await;
    s.linked(&a, "p/ctl").await;
    let o1 = s.append("p/src", r#"{"n":1}"#).await;
    let o2 = s.append("p/src", r#"{"n":2}"#).await;
    let r = s
        .client
        .put(s.url("fork"))
        .header("content-type", "application/json")
        .header("stream-forked-from", format!("{ROOT}p/src"))
        .header("stream-fork-offset", &o1)
        .send()
        .await
        .expect("fork");
    assert_eq!(r.status(), StatusCode::CREATED);

    s.ack(&a, "p/src", &o2).await;
    // A control stream acked after it: once it is released, the source's ack was looked at.
    let ctl = s.append("p/ctl", r#"{"n":1}"#).await;
    s.ack(&a, "p/ctl", &ctl).await;
    eventually("the control stream's release", || async {
        s.earliest("p/ctl").await.as_deref() == Some(ctl.as_str())
    })
    .await;
    // The fork references the source's data before its anchor: nothing of it went.
    assert_eq!(s.earliest("p/src").await, None);
    let r = s.get("fork", "offset=-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(r.json::<Value>().await.expect("json"), json!([{"n": 1}]));

    // Deleting the fork lifts the pin: what was acked goes.
    let r = s.client.delete(s.url("fork")).send().await.expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    eventually("the source's release", || async {
        s.earliest("p/src").await.as_deref() == Some(o2.as_str())
    })
    .await;
    // A fork below the released range is refused with the same answer as a read.
    let r = s
        .client
        .put(s.url("fork2"))
        .header("content-type", "application/json")
        .header("stream-forked-from", format!("{ROOT}p/src"))
        .header("stream-fork-offset", &o1)
        .send()
        .await
        .expect("fork2");
    assert_eq!(r.status(), StatusCode::GONE);
    assert_eq!(header(&r, "stream-earliest-offset"), o2);
    // At the earliest offset it is fine.
    let r = s
        .client
        .put(s.url("fork3"))
        .header("content-type", "application/json")
        .header("stream-forked-from", format!("{ROOT}p/src"))
        .header("stream-fork-offset", &o2)
        .send()
        .await
        .expect("fork3");
    assert_eq!(r.status(), StatusCode::CREATED);
    s.stop().await;
}

#[tokio::test]
async fn a_closed_stream_whose_data_is_all_acked_releases_everything_and_keeps_answering() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("c/*", "w/a")).await;
    s.put_stream("c/s").await;
    s.linked(&a, "c/s").await;
    s.append("c/s", r#"{"n":1}"#).await;
    let r = s
        .client
        .post(s.url("c/s"))
        .header("stream-closed", "true")
        .send()
        .await
        .expect("close");
    assert!(r.status().is_success());
    let tail = header(&r, "stream-next-offset");
    s.ack(&a, "c/s", &tail).await;
    eventually("the whole release", || async {
        s.earliest("c/s").await.as_deref() == Some(tail.as_str())
    })
    .await;
    let h = s.head("c/s").await;
    assert_eq!(header(&h, "stream-closed"), "true");
    assert_eq!(header(&h, "stream-next-offset"), tail);
    let r = s.get("c/s", "offset=-1").await;
    assert_eq!(r.status(), StatusCode::OK);
    assert_eq!(header(&r, "stream-closed"), "true");
    assert_eq!(r.json::<Value>().await.expect("json"), json!([]));
    assert_eq!(
        s.get("c/s", &format!("offset={START}")).await.status(),
        StatusCode::GONE
    );
    s.stop().await;
}

#[tokio::test]
async fn a_full_budget_pushes_back_with_503_until_acks_release_data() {
    let s = Server::start(|c| c.limits.max_memory_bytes = 1_000).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("b/*", "w/a")).await;
    s.put_stream("b/s").await;
    s.linked(&a, "b/s").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(500));
    let first = s.append("b/s", &big).await;
    let r = s.post("b/s", &big).await;
    assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(header(&r, "retry-after"), "1");
    let body = r.text().await.expect("body");
    assert!(body.contains("DS_LIMITS__MAX_MEMORY_BYTES"), "{body}");
    assert!(body.contains("acknowledge"), "{body}");
    // Nothing stored changed.
    assert_eq!(header(&s.head("b/s").await, "stream-next-offset"), first);

    s.ack(&a, "b/s", &first).await;
    let deadline = Instant::now() + Duration::from_secs(10);
    let next = loop {
        let r = s.post("b/s", &big).await;
        if r.status().is_success() {
            break header(&r, "stream-next-offset");
        }
        assert_eq!(r.status(), StatusCode::SERVICE_UNAVAILABLE);
        assert!(
            Instant::now() < deadline,
            "no append succeeded after the ack"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    };
    assert!(next > first);
    assert_eq!(s.streams.total_bytes(), big.len() as u64);
    let counters = s.streams.retention_counters();
    assert_eq!(counters.released_bytes, big.len() as u64);
    assert!(counters.backpressured >= 1);
    s.stop().await;
}

/// A byte stream takes acks at any position (a catch-up page may end inside an append), but
/// only whole records are released: an ack inside a record releases none of it, and the next
/// ack on a boundary releases up to that boundary. (The stream layer's unit test
/// `byte_stream_acks_inside_a_record_release_none_of_it` runs the same rule pass by pass.)
#[tokio::test]
async fn byte_stream_acks_inside_a_record_release_only_whole_records() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("bytes/*", "w/a")).await;
    let r = s
        .client
        .put(s.url("bytes/s"))
        .header("content-type", "application/octet-stream")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::CREATED);
    s.linked(&a, "bytes/s").await;
    let mut ends = Vec::new();
    for record in ["0123456789", "abcdefghij", "ABCDEFGHIJ"] {
        let r = s
            .client
            .post(s.url("bytes/s"))
            .header("content-type", "application/octet-stream")
            .body(record)
            .send()
            .await
            .expect("append");
        assert!(r.status().is_success(), "append {}", r.status());
        ends.push(header(&r, "stream-next-offset"));
    }
    let at = |pos: u64| format!("{:016}_{pos:016}", 0);
    assert_eq!(ends, [at(10), at(20), at(30)]);
    // What a reader sees at each step: the earliest offset is never inside a record, and what
    // is retained starts with a whole record.
    let check = || async {
        let r = s.get("bytes/s", "offset=-1").await;
        let earliest = r
            .headers()
            .get("stream-earliest-offset")
            .and_then(|v| v.to_str().ok())
            .map(str::to_owned);
        let body = r.bytes().await.expect("body");
        let all = b"0123456789abcdefghijABCDEFGHIJ";
        match earliest.as_deref() {
            None => assert_eq!(&body[..], all),
            Some(e) => {
                let pos: usize = e[17..].parse().expect("offset");
                assert!(pos.is_multiple_of(10), "released inside a record, to {e}");
                assert_eq!(&body[..], &all[pos..]);
            }
        }
        earliest
    };

    // Inside the second record.
    s.ack(&a, "bytes/s", &at(15)).await;
    s.streams.release_due().await;
    assert_eq!(check().await, None, "an ack inside a record released data");
    // On the boundary after it.
    s.ack(&a, "bytes/s", &at(20)).await;
    eventually("the release up to the boundary", || async {
        check().await.as_deref() == Some(at(20).as_str())
    })
    .await;
    // Inside the last record: it stays whole.
    s.ack(&a, "bytes/s", &at(25)).await;
    s.streams.release_due().await;
    assert_eq!(check().await.as_deref(), Some(at(20).as_str()));
    // The tail is a boundary.
    s.ack(&a, "bytes/s", &at(30)).await;
    eventually("the release up to the tail", || async {
        check().await.as_deref() == Some(at(30).as_str())
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn keep_mode_answers_a_full_budget_with_413_as_before() {
    let s = Server::start(|c| {
        c.retention.mode = RetentionMode::Keep;
        c.limits.max_memory_bytes = 1_000;
    })
    .await;
    s.put_stream("k").await;
    let big = format!(r#"{{"pad":"{}"}}"#, "x".repeat(500));
    s.append("k", &big).await;
    assert_eq!(
        s.post("k", &big).await.status(),
        StatusCode::PAYLOAD_TOO_LARGE
    );
    s.stop().await;
}

#[tokio::test]
async fn min_age_holds_acked_data_for_that_long() {
    // An hour: the acked data must still be there after the retention task looked at it.
    let s = Server::start(|c| c.retention.min_age = Duration::from_secs(3_600)).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("m/*", "w/a")).await;
    s.put_stream("m/s").await;
    s.linked(&a, "m/s").await;
    let tail = s.append("m/s", r#"{"n":1}"#).await;
    s.ack(&a, "m/s", &tail).await;
    let wait = s.streams.release_due().await.expect("a candidate waits");
    assert!(wait > 3_500_000, "due in {wait} ms");
    assert_eq!(s.earliest("m/s").await, None);
    assert_eq!(
        s.get("m/s", &format!("offset={START}")).await.status(),
        StatusCode::OK
    );
    s.stop().await;

    // 300 ms: released, and never before the hold is over.
    let hold = Duration::from_millis(300);
    let s = Server::start(|c| c.retention.min_age = hold).await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("m/*", "w/a")).await;
    s.put_stream("m/s").await;
    s.linked(&a, "m/s").await;
    let tail = s.append("m/s", r#"{"n":1}"#).await;
    let acked_at = Instant::now();
    s.ack(&a, "m/s", &tail).await;
    eventually("the release after the hold", || async {
        let released = s.earliest("m/s").await.is_some();
        assert!(
            !released || acked_at.elapsed() >= hold,
            "released before DS_RETENTION__MIN_AGE"
        );
        released
    })
    .await;
    s.stop().await;
}

/// A subscription that links the registry (as ds-sync's does), waking `w/reg`.
async fn registry_follower(s: &Server) -> Worker {
    s.put_stream("w/reg").await;
    s.subscribe(
        "/",
        "follower",
        json!({"type": "pull-wake", "streams": ["_ds/registry"], "wake_stream": "v1/stream/w/reg", "lease_ttl_ms": 600_000}),
    )
    .await
}

/// The issue's case: a 100 000-byte budget and 1 500 create-and-delete cycles of empty
/// streams, with a follower that reads the registry and acks what it read (as ds-sync does).
#[tokio::test]
async fn registry_churn_keeps_every_event_stays_bounded_and_appends_still_succeed() {
    let s = Server::start(|c| c.limits.max_memory_bytes = 100_000).await;
    let follower = registry_follower(&s).await;
    let registry = format!("{}/_ds/registry", s.base);
    let mut offset = "-1".to_owned();
    let (mut created, mut deleted) = (0, 0);
    let mut held_max = 0u64;
    for i in 0..1_500 {
        let path = format!("churn/{i}");
        assert_eq!(s.put_stream(&path).await.status(), StatusCode::CREATED);
        let r = s.client.delete(s.url(&path)).send().await.expect("delete");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
        if i % 100 == 99 {
            // Read what the registry has, then ack it.
            loop {
                let r = s
                    .client
                    .get(format!("{registry}?offset={offset}"))
                    .send()
                    .await
                    .expect("registry read");
                assert_eq!(r.status(), StatusCode::OK);
                let up_to_date = header(&r, "stream-up-to-date") == "true";
                offset = header(&r, "stream-next-offset");
                let events: Vec<Value> = r.json().await.expect("events");
                for e in events {
                    if !e["path"].as_str().is_some_and(|p| p.contains("/churn/")) {
                        continue;
                    }
                    match e["event"].as_str() {
                        Some("created") => created += 1,
                        Some("deleted") => deleted += 1,
                        _ => {}
                    }
                }
                if up_to_date {
                    break;
                }
            }
            let held = s
                .streams
                .peek("/_ds/registry")
                .map(|r| r.visible().tail - r.earliest())
                .unwrap_or_default();
            held_max = held_max.max(held);
            s.ack(&follower, "_ds/registry", &offset).await;
            let registry_earliest = || async {
                let r = s.client.head(&registry).send().await.expect("head");
                header(&r, "stream-earliest-offset")
            };
            eventually("the registry's release", || async {
                registry_earliest().await == offset
            })
            .await;
        }
    }
    assert_eq!((created, deleted), (1_500, 1_500), "every event was seen");
    eprintln!("registry: at most {held_max} bytes held between acks");
    // Bounded: at most what was written since the previous ack (200 events), not 3 000.
    assert!(held_max < 40_000, "registry held {held_max} bytes");
    // The registry is bookkeeping, outside the budget: appends still succeed.
    s.put_stream("after").await;
    s.append("after", r#"{"ok":true}"#).await;
    assert_eq!(s.streams.total_bytes(), r#"{"ok":true}"#.len() as u64);
    s.stop().await;
}

#[tokio::test]
async fn a_registry_that_cannot_record_fails_the_create_and_recovers_after_acks() {
    // acked mode holds the registry to DS_LIMITS__MAX_STREAM_BYTES until its readers ack.
    let s = Server::start(|c| c.limits.max_stream_bytes = 2_000).await;
    let follower = registry_follower(&s).await;
    let mut refused = None;
    for i in 0..100 {
        let r = s.put_stream(&format!("full/{i}")).await;
        if r.status() == StatusCode::SERVICE_UNAVAILABLE {
            assert_eq!(header(&r, "retry-after"), "1");
            let body = r.text().await.expect("body");
            assert!(body.contains("registry"), "{body}");
            refused = Some(i);
            break;
        }
        assert_eq!(r.status(), StatusCode::CREATED);
    }
    let i = refused.expect("the registry filled up");
    // Not created: nothing exists that the registry does not know of.
    assert_eq!(
        s.head(&format!("full/{i}")).await.status(),
        StatusCode::NOT_FOUND
    );
    let r = s
        .client
        .head(format!("{}/_ds/registry", s.base))
        .send()
        .await;
    let tail = header(&r.expect("head"), "stream-next-offset");
    s.ack(&follower, "_ds/registry", &tail).await;
    eventually("a create after the registry's reader acked", || async {
        s.put_stream(&format!("full/{i}")).await.status() == StatusCode::CREATED
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn keep_mode_registry_is_outside_the_budget_and_keeps_every_event() {
    let s = Server::start(|c| {
        c.retention.mode = RetentionMode::Keep;
        c.limits.max_memory_bytes = 100_000;
    })
    .await;
    for i in 0..1_500 {
        let path = format!("churn/{i}");
        assert_eq!(s.put_stream(&path).await.status(), StatusCode::CREATED);
        let r = s.client.delete(s.url(&path)).send().await.expect("delete");
        assert_eq!(r.status(), StatusCode::NO_CONTENT);
    }
    s.put_stream("after").await;
    s.append("after", r#"{"ok":true}"#).await;
    let mut offset = "-1".to_owned();
    let mut events = 0;
    loop {
        let r = s
            .client
            .get(format!("{}/_ds/registry?offset={offset}", s.base))
            .send()
            .await
            .expect("registry read");
        let up_to_date = header(&r, "stream-up-to-date") == "true";
        offset = header(&r, "stream-next-offset");
        events += r.json::<Vec<Value>>().await.expect("events").len();
        if up_to_date {
            break;
        }
    }
    // 1 500 creates, 1 500 deletes, and the create of `after`.
    assert_eq!(events, 3_001);
    s.stop().await;
}

/// An SSE reader that lags (it stops reading, so the server's writes back up) while its
/// position is released: its response ends where the data went, and resuming there gets 410.
#[tokio::test]
async fn an_sse_reader_whose_position_is_released_while_it_lags_is_ended_and_told_on_reconnect() {
    let s = Server::start(|c| {
        c.limits.max_stream_bytes = 64 << 20;
        c.limits.max_memory_bytes = 128 << 20;
        c.limits.max_read_bytes = 64 << 10;
        // Bounds the test if the reader never lagged (the body would not end before this).
        c.server.sse_reconnect_interval = Duration::from_secs(30);
    })
    .await;
    s.put_stream("w/a").await;
    let a = s.subscribe(ROOT, "a", pull_sub("lag/*", "w/a")).await;
    let r = s
        .client
        .put(s.url("lag/s"))
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::CREATED);
    s.linked(&a, "lag/s").await;
    // 32 MiB: far more than the socket buffers between a reader that stopped and the server.
    let chunk = "x".repeat(1 << 20);
    let mut tail = String::new();
    for _ in 0..32 {
        let r = s
            .client
            .post(s.url("lag/s"))
            .header("content-type", "text/plain")
            .body(chunk.clone())
            .send()
            .await
            .expect("append");
        assert!(r.status().is_success());
        tail = header(&r, "stream-next-offset");
    }
    let mut sse = s.get("lag/s", "offset=-1&live=sse").await;
    assert_eq!(sse.status(), StatusCode::OK);
    let first = sse.chunk().await.expect("first chunk").expect("data");
    assert!(!first.is_empty());

    s.ack(&a, "lag/s", &tail).await;
    eventually("the release", || async {
        s.earliest("lag/s").await.as_deref() == Some(tail.as_str())
    })
    .await;

    // Drain: what was already written arrives, then the response ends short of the tail.
    let mut text = String::from_utf8_lossy(&first).into_owned();
    let mut last = String::new();
    let drained = tokio::time::timeout(Duration::from_secs(60), async {
        while let Some(bytes) = sse.chunk().await.expect("chunk") {
            text.push_str(&String::from_utf8_lossy(&bytes));
            if let Some(i) = text.rfind("\"streamNextOffset\":\"") {
                let rest = &text[i + 20..];
                if let Some(end) = rest.find('"') {
                    last = rest[..end].to_owned();
                }
            }
            // Keep only the tail of the text: events are parsed as they come.
            if text.len() > 1 << 16 {
                text = text.split_off(text.len() - 4096);
            }
        }
    })
    .await;
    assert!(drained.is_ok(), "the SSE response did not end");
    assert!(!last.is_empty(), "no control event");
    assert!(last < tail, "the reader reached the tail: it never lagged");
    let r = s.get("lag/s", &format!("offset={last}&live=sse")).await;
    assert_eq!(r.status(), StatusCode::GONE);
    assert_eq!(header(&r, "stream-earliest-offset"), tail);
    s.stop().await;
}

/// After a restart the stored acks drive retention again, in every durable mode: nothing
/// acked is readable (whether the backend kept the bytes or not), nothing unacked is lost.
#[tokio::test]
async fn stored_acks_release_again_after_a_restart() {
    use ds_server::config::StorageMode;
    for mode in [
        StorageMode::FileFast,
        StorageMode::FileDurable,
        StorageMode::Acid,
    ] {
        let dir = tempfile::tempdir().expect("dir");
        let config = |c: &mut Config| {
            c.storage.mode = mode;
            c.storage.data_dir = dir.path().to_owned();
        };
        let s = Server::start(config).await;
        s.put_stream("w/a").await;
        let a = s.subscribe(ROOT, "a", pull_sub("d/*", "w/a")).await;
        s.put_stream("d/s").await;
        s.linked(&a, "d/s").await;
        let o1 = s.append("d/s", r#"{"n":1}"#).await;
        let o2 = s.append("d/s", r#"{"n":2}"#).await;
        s.ack(&a, "d/s", &o1).await;
        eventually("the release", || async {
            s.earliest("d/s").await.as_deref() == Some(o1.as_str())
        })
        .await;
        s.stop().await;

        let s = Server::start(config).await;
        eventually("the release after the restart", || async {
            s.earliest("d/s").await.as_deref() == Some(o1.as_str())
        })
        .await;
        assert_eq!(
            s.get("d/s", &format!("offset={START}")).await.status(),
            StatusCode::GONE,
            "{mode:?}"
        );
        let r = s.get("d/s", "offset=-1").await;
        assert_eq!(header(&r, "stream-next-offset"), o2, "{mode:?}");
        assert_eq!(
            r.json::<Value>().await.expect("json"),
            json!([{"n": 2}]),
            "{mode:?}"
        );
        s.stop().await;
    }
}
