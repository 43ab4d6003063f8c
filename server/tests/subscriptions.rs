//! Subscriptions over real HTTP against the in-process server: one test per rule of protocol
//! sections 6 and 7 (creation and re-confirmation, links, claims, acks, releases, leases,
//! fencing, webhooks with signatures and retries, SSRF checks). Waits poll a condition with a
//! deadline; nothing sleeps to wait.

use std::sync::Arc;
use std::time::Duration;

use base64::Engine;
use base64::engine::general_purpose::URL_SAFE_NO_PAD;
use ds_server::App;
use ds_server::config::{Config, StorageMode};
use parking_lot::Mutex;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use tokio::sync::oneshot;

const ROOT: &str = "/v1/stream/";

struct Server {
    base: String,
    client: Client,
    stop: Option<oneshot::Sender<()>>,
    handle: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Server {
    async fn start(tweak: impl FnOnce(&mut Config)) -> Server {
        let mut config = Config::default();
        config.server.port = 0;
        config.subscriptions.allow_local_webhooks = true;
        config.subscriptions.retry_min = Duration::from_millis(50);
        config.subscriptions.retry_max = Duration::from_millis(200);
        tweak(&mut config);
        let app = App::build(config).await.expect("server builds");
        let addr = app.local_addr().expect("bound");
        let (stop, stopped) = oneshot::channel::<()>();
        let handle = tokio::spawn(app.run(async move {
            let _ = stopped.await;
        }));
        Server {
            base: format!("http://{addr}"),
            client: Client::new(),
            stop: Some(stop),
            handle,
        }
    }

    fn url(&self, rel: &str) -> String {
        format!("{}{ROOT}{rel}", self.base)
    }

    fn sub_url(&self, id: &str) -> String {
        self.url(&format!("__ds/subscriptions/{id}"))
    }

    async fn put_stream(&self, rel: &str, body: &str) -> StatusCode {
        self.client
            .put(self.url(rel))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("put")
            .status()
    }

    /// Appends and returns the new tail offset.
    async fn append(&self, rel: &str, body: &str) -> String {
        let r = self
            .client
            .post(self.url(rel))
            .header("content-type", "application/json")
            .body(body.to_owned())
            .send()
            .await
            .expect("append");
        assert!(r.status().is_success(), "append {}", r.status());
        r.headers()
            .get("stream-next-offset")
            .and_then(|v| v.to_str().ok())
            .expect("offset")
            .to_owned()
    }

    async fn tail(&self, rel: &str) -> String {
        let r = self.client.head(self.url(rel)).send().await.expect("head");
        r.headers()
            .get("stream-next-offset")
            .and_then(|v| v.to_str().ok())
            .expect("offset")
            .to_owned()
    }

    async fn put_sub(&self, id: &str, body: Value) -> (StatusCode, Value) {
        let r = self
            .client
            .put(self.sub_url(id))
            .json(&body)
            .send()
            .await
            .expect("put sub");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn get_sub(&self, id: &str) -> (StatusCode, Value) {
        let r = self.client.get(self.sub_url(id)).send().await.expect("get");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn call(
        &self,
        id: &str,
        action: &str,
        token: Option<&str>,
        body: Value,
    ) -> (StatusCode, Value) {
        let mut req = self
            .client
            .post(format!("{}/{action}", self.sub_url(id)))
            .json(&body);
        if let Some(t) = token {
            req = req.bearer_auth(t);
        }
        let r = req.send().await.expect("call");
        let status = r.status();
        (status, r.json().await.unwrap_or(Value::Null))
    }

    async fn claim(&self, id: &str, worker: &str) -> (StatusCode, Value) {
        self.call(id, "claim", None, json!({ "worker": worker }))
            .await
    }

    async fn wake_events(&self, rel: &str) -> Vec<Value> {
        let r = self
            .client
            .get(format!("{}?offset=-1", self.url(rel)))
            .send()
            .await
            .expect("read");
        r.json().await.unwrap_or_default()
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.handle).await;
    }
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

fn link<'a>(sub: &'a Value, rel: &str) -> Option<&'a Value> {
    sub["streams"].as_array()?.iter().find(|l| l["path"] == rel)
}

fn error_code(body: &Value) -> &str {
    body["error"]["code"].as_str().unwrap_or("")
}

fn pull_sub(pattern: &str, wake: &str, lease_ms: u64) -> Value {
    json!({ "type": "pull-wake", "pattern": pattern, "wake_stream": wake, "lease_ttl_ms": lease_ms })
}

#[tokio::test]
async fn put_creates_then_reconfirms_identical_and_refuses_a_different_configuration() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/a", "[]").await;
    let body = pull_sub("ev/*", "w/a", 5_000);
    let (status, created) = s.put_sub("s1", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(created["id"], "s1");
    assert_eq!(created["type"], "pull-wake");
    assert_eq!(created["lease_ttl_ms"], 5_000);
    assert_eq!(created["status"], "active");
    let (status, _) = s.put_sub("s1", body).await;
    assert_eq!(status, StatusCode::OK);
    let (status, conflict) = s.put_sub("s1", pull_sub("ev/**", "w/a", 5_000)).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&conflict), "SUBSCRIPTION_CONFLICT");
    // The default lease is 30 s.
    let (_, d) = s
        .put_sub(
            "s2",
            json!({"type": "pull-wake", "streams": ["x"], "wake_stream": "w/a"}),
        )
        .await;
    assert_eq!(d["lease_ttl_ms"], 30_000);
    s.stop().await;
}

#[tokio::test]
async fn bad_bodies_are_refused_with_a_code_and_nothing_is_created() {
    let s = Server::start(|_| {}).await;
    let cases = [
        json!({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "extra": 1}),
        json!({"type": "pull-wake", "pattern": "a/b*", "wake_stream": "w"}),
        json!({"type": "pull-wake", "pattern": "/abs", "wake_stream": "w"}),
        json!({"type": "pull-wake", "wake_stream": "w"}),
        json!({"type": "pull-wake", "pattern": "a/*"}),
        json!({"type": "webhook", "pattern": "a/*"}),
        json!({"type": "smoke", "pattern": "a/*"}),
        json!({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 999}),
        json!({"type": "pull-wake", "pattern": "a/*", "wake_stream": "w", "lease_ttl_ms": 600_001}),
        json!({"type": "pull-wake", "streams": ["a/../b"], "wake_stream": "w"}),
        json!({"type": "pull-wake", "streams": ["__ds/x"], "wake_stream": "w"}),
        json!({"type": "pull-wake", "streams": (0..1001).map(|i| format!("s{i}")).collect::<Vec<_>>(), "wake_stream": "w"}),
    ];
    for body in cases {
        let (status, err) = s.put_sub("bad", body.clone()).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{body}");
        assert_eq!(error_code(&err), "INVALID_REQUEST", "{body}");
    }
    let r = s
        .client
        .put(s.sub_url("bad"))
        .body("{not json")
        .send()
        .await
        .expect("put");
    assert_eq!(r.status(), StatusCode::BAD_REQUEST);
    assert_eq!(s.get_sub("bad").await.0, StatusCode::NOT_FOUND);
    let (status, err) = s.put_sub("a%00b", pull_sub("a/*", "w", 5_000)).await;
    assert_eq!(status, StatusCode::BAD_REQUEST, "an id with a NUL byte");
    assert_eq!(error_code(&err), "INVALID_REQUEST");
    s.stop().await;
}

#[tokio::test]
async fn unsafe_webhook_urls_are_refused() {
    let s = Server::start(|c| c.subscriptions.allow_local_webhooks = false).await;
    for url in [
        "http://10.0.0.1/hook",
        "https://192.168.0.10/hook",
        "https://169.254.169.254/",
        "http://127.0.0.1:9/hook",
        "https://[::1]/hook",
        "https://localhost/hook",
    ] {
        let (status, err) = s
            .put_sub(
                "w",
                json!({"type": "webhook", "pattern": "a/*", "webhook": {"url": url}}),
            )
            .await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{url}");
        assert_eq!(error_code(&err), "WEBHOOK_URL_REJECTED", "{url}");
    }
    s.stop().await;
}

#[tokio::test]
async fn streams_with_a_control_segment_cannot_be_created() {
    let s = Server::start(|_| {}).await;
    // A `__ds` segment makes a control path: no stream is ever created there.
    assert_eq!(s.put_stream("a/__ds/b", "[]").await, StatusCode::NOT_FOUND);
    assert_eq!(s.put_stream("a/__ds", "[]").await, StatusCode::NOT_FOUND);
    let r = s.client.head(s.url("a/__ds/b")).send().await.expect("head");
    assert_eq!(r.status(), StatusCode::NOT_FOUND);
    s.stop().await;
}

#[tokio::test]
async fn a_pattern_backfills_existing_streams_at_their_tail_and_links_new_ones_from_their_start() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/p", "[]").await;
    s.put_stream("ev/old", r#"{"n":1}"#).await;
    s.put_stream("other/x", r#"{"n":1}"#).await;
    let old_tail = s.tail("ev/old").await;
    let (_, sub) = s.put_sub("p", pull_sub("ev/*", "w/p", 5_000)).await;
    assert_eq!(
        link(&sub, "ev/old").expect("backfilled")["acked_offset"],
        old_tail.as_str()
    );
    assert_eq!(link(&sub, "ev/old").expect("link")["link_type"], "glob");
    assert!(link(&sub, "other/x").is_none());
    // Nothing pending: no wake.
    s.put_stream("ev/new", r#"{"n":2}"#).await;
    eventually("the new stream to be linked from its start", || async {
        let (_, sub) = s.get_sub("p").await;
        link(&sub, "ev/new")
            .is_some_and(|l| l["acked_offset"] == "0000000000000000_0000000000000000")
    })
    .await;
    eventually("a wake for the new stream", || async {
        s.wake_events("w/p")
            .await
            .iter()
            .any(|e| e["stream"] == "ev/new" && e["subscription_id"] == "p" && e["type"] == "wake")
    })
    .await;
    let events = s.wake_events("w/p").await;
    assert_eq!(
        events.len(),
        1,
        "one wake while one is in flight: {events:?}"
    );
    s.stop().await;
}

#[tokio::test]
async fn explicit_links_add_and_remove_idempotently_and_explicit_wins_over_glob() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/e", "[]").await;
    s.put_stream("ev/both", "[]").await;
    s.put_sub("e", pull_sub("ev/*", "w/e", 5_000)).await;
    let add = |streams: Value| {
        let s = &s;
        async move {
            s.client
                .post(format!("{}/streams", s.sub_url("e")))
                .json(&json!({ "streams": streams }))
                .send()
                .await
                .expect("add")
                .status()
        }
    };
    assert_eq!(
        add(json!(["ev/both", "manual/a"])).await,
        StatusCode::NO_CONTENT
    );
    assert_eq!(add(json!(["manual/a"])).await, StatusCode::NO_CONTENT);
    let (_, sub) = s.get_sub("e").await;
    assert_eq!(
        link(&sub, "ev/both").expect("both")["link_type"],
        "explicit"
    );
    assert_eq!(
        link(&sub, "manual/a").expect("manual")["link_type"],
        "explicit"
    );
    let remove = |rel: &str| {
        let url = format!("{}/streams/{}", s.sub_url("e"), rel.replace('/', "%2F"));
        let client = s.client.clone();
        async move { client.delete(url).send().await.expect("remove").status() }
    };
    assert_eq!(remove("ev/both").await, StatusCode::NO_CONTENT);
    assert_eq!(remove("manual/a").await, StatusCode::NO_CONTENT);
    assert_eq!(remove("manual/a").await, StatusCode::NO_CONTENT);
    let (_, sub) = s.get_sub("e").await;
    assert_eq!(
        link(&sub, "ev/both").expect("glob stays")["link_type"],
        "glob"
    );
    assert!(link(&sub, "manual/a").is_none());
    s.stop().await;
}

/// Creates a pull-wake subscription over `ev/*` with a stream that has pending data, and
/// returns the pending stream's tail.
async fn pending_pull(s: &Server, id: &str, lease_ms: u64) -> String {
    s.put_stream(&format!("w/{id}"), "[]").await;
    s.put_sub(
        id,
        pull_sub(&format!("{id}/*"), &format!("w/{id}"), lease_ms),
    )
    .await;
    s.put_stream(&format!("{id}/s"), r#"{"n":1}"#).await;
    let tail = s.tail(&format!("{id}/s")).await;
    eventually("the wake event", || async {
        !s.wake_events(&format!("w/{id}")).await.is_empty()
    })
    .await;
    tail
}

#[tokio::test]
async fn claim_is_exclusive_while_the_lease_holds() {
    let s = Server::start(|_| {}).await;
    let tail = pending_pull(&s, "c", 60_000).await;
    let (status, claim) = s.claim("c", "worker-1").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(claim["lease_ttl_ms"], 60_000);
    assert_eq!(claim["streams"][0]["path"], "c/s");
    assert_eq!(claim["streams"][0]["tail_offset"], tail.as_str());
    assert_eq!(claim["streams"][0]["has_pending"], true);
    let wake = s.wake_events("w/c").await;
    assert_eq!(
        claim["generation"], wake[0]["generation"],
        "the claim takes the announced wake"
    );
    let (status, busy) = s.claim("c", "worker-2").await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&busy), "ALREADY_CLAIMED");
    assert_eq!(busy["error"]["current_holder"], "worker-1");
    assert_eq!(busy["error"]["generation"], claim["generation"]);
    s.stop().await;
}

#[tokio::test]
async fn acks_are_fenced_by_token_generation_and_wake_id() {
    let s = Server::start(|_| {}).await;
    let tail = pending_pull(&s, "f", 60_000).await;
    let (_, claim) = s.claim("f", "w").await;
    let token = claim["token"].as_str().expect("token").to_owned();
    let body = |wake: &Value, gen_: &Value| json!({"wake_id": wake, "generation": gen_, "acks": [{"stream": "f/s", "offset": tail}]});
    let gen1 = claim["generation"].as_u64().expect("gen");
    let cases = [
        (
            Some("not-the-token"),
            body(&claim["wake_id"], &claim["generation"]),
        ),
        (
            Some(token.as_str()),
            body(&claim["wake_id"], &json!(gen1 + 1)),
        ),
        (
            Some(token.as_str()),
            body(&json!("w_other"), &claim["generation"]),
        ),
    ];
    for (t, b) in cases {
        let (status, err) = s.call("f", "ack", t, b.clone()).await;
        assert_eq!(status, StatusCode::CONFLICT, "{b}");
        assert_eq!(error_code(&err), "FENCED", "{b}");
    }
    let (status, err) = s
        .call(
            "f",
            "ack",
            None,
            body(&claim["wake_id"], &claim["generation"]),
        )
        .await;
    assert_eq!(status, StatusCode::UNAUTHORIZED);
    assert_eq!(error_code(&err), "UNAUTHORIZED");
    // None of that moved the cursor.
    let (_, sub) = s.get_sub("f").await;
    assert_eq!(
        link(&sub, "f/s").expect("link")["acked_offset"],
        "0000000000000000_0000000000000000"
    );
    // The real one does, once; then the wake is over and the same request is stale.
    let mut done = body(&claim["wake_id"], &claim["generation"]);
    done["done"] = json!(true);
    let (status, ok) = s.call("f", "ack", Some(&token), done.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ok, json!({"ok": true, "next_wake": false}));
    let (status, err) = s.call("f", "ack", Some(&token), done).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "FENCED");
    let (_, sub) = s.get_sub("f").await;
    assert_eq!(
        link(&sub, "f/s").expect("link")["acked_offset"],
        tail.as_str()
    );
    s.stop().await;
}

#[tokio::test]
async fn bad_acks_are_refused_and_nothing_is_half_applied() {
    let s = Server::start(|_| {}).await;
    let tail = pending_pull(&s, "b", 60_000).await;
    s.put_stream("b/t", r#"{"n":1}"#).await;
    let (_, claim) = s.claim("b", "w").await;
    let token = claim["token"].as_str().expect("token").to_owned();
    let ack = |acks: Value| json!({"wake_id": claim["wake_id"], "generation": claim["generation"], "acks": acks});
    let cases = [
        (
            json!([{"stream": "b/s", "offset": tail}, {"stream": "b/s", "offset": "9999999999999999_9999999999999999"}]),
            "OFFSET_BEYOND_TAIL",
        ),
        (
            json!([{"stream": "b/s", "offset": tail}, {"stream": "nope/x", "offset": tail}]),
            "STREAM_NOT_LINKED",
        ),
        (
            json!([{"stream": "b/s", "offset": "12"}]),
            "INVALID_REQUEST",
        ),
        (
            // Inside the stream's one JSON message: no reader was ever handed this offset.
            json!([{"stream": "b/s", "offset": tail}, {"stream": "b/s", "offset": "0000000000000000_0000000000000001"}]),
            "OFFSET_MISALIGNED",
        ),
        (
            json!([{"stream": "b/s", "offset": tail, "extra": 1}]),
            "INVALID_REQUEST",
        ),
    ];
    for (acks, code) in cases {
        let (status, err) = s.call("b", "ack", Some(&token), ack(acks.clone())).await;
        assert_eq!(status, StatusCode::BAD_REQUEST, "{acks}");
        assert_eq!(error_code(&err), code, "{acks}");
    }
    let (_, sub) = s.get_sub("b").await;
    assert_eq!(
        link(&sub, "b/s").expect("link")["acked_offset"],
        "0000000000000000_0000000000000000"
    );
    s.stop().await;
}

#[tokio::test]
async fn acked_offsets_never_move_backwards_and_heartbeats_keep_the_claim() {
    let s = Server::start(|_| {}).await;
    let tail = pending_pull(&s, "m", 60_000).await;
    let (_, claim) = s.claim("m", "w").await;
    let token = claim["token"].as_str().expect("token").to_owned();
    let ack = |offset: &str| json!({"wake_id": claim["wake_id"], "generation": claim["generation"], "acks": [{"stream": "m/s", "offset": offset}]});
    assert_eq!(
        s.call("m", "ack", Some(&token), ack(&tail)).await.0,
        StatusCode::OK
    );
    assert_eq!(
        s.call(
            "m",
            "ack",
            Some(&token),
            // The stream's start: a boundary, behind what was acked.
            ack("0000000000000000_0000000000000000")
        )
        .await
        .0,
        StatusCode::OK
    );
    let (_, sub) = s.get_sub("m").await;
    assert_eq!(
        link(&sub, "m/s").expect("link")["acked_offset"],
        tail.as_str()
    );
    // Heartbeats (no `done`) keep the claim: another worker is still refused.
    assert_eq!(s.claim("m", "other").await.0, StatusCode::CONFLICT);
    s.stop().await;
}

/// The `Stream-Id` the server names for the stream at `rel` now.
async fn stream_id(s: &Server, rel: &str) -> String {
    let r = s.client.head(s.url(rel)).send().await.expect("head");
    r.headers()
        .get("stream-id")
        .and_then(|v| v.to_str().ok())
        .expect("Stream-Id")
        .to_owned()
}

#[tokio::test]
async fn an_ack_naming_a_replaced_stream_instance_is_skipped_and_the_token_may_come_in_its_own_header()
 {
    // ds-sync acks what Postgres committed, naming the stream instance: a late ack of a deleted
    // stream must not move the cursor of the stream created at its path since.
    let s = Server::start(|_| {}).await;
    let first_tail = pending_pull(&s, "i", 60_000).await;
    let old_id = stream_id(&s, "i/s").await;
    let (_, claim) = s.claim("i", "w").await;
    let token = claim["token"].as_str().expect("token").to_owned();
    let delete = s.client.delete(s.url("i/s")).send().await.expect("delete");
    assert!(delete.status().is_success());
    // The new stream is longer, so the old tail is a boundary inside it.
    assert!(s.put_stream("i/s", r#"{"n":1}"#).await.is_success());
    s.append("i/s", r#"{"n":2}"#).await;
    let new_id = stream_id(&s, "i/s").await;
    assert_ne!(old_id, new_id);
    let ack = |id: &str, offset: &str| {
        json!({"wake_id": claim["wake_id"], "generation": claim["generation"],
               "acks": [{"stream": "i/s", "offset": offset, "stream_id": id}]})
    };
    // `Subscription-Token` carries the claim token where `Authorization` holds an edge's JWT.
    let r = s
        .client
        .post(format!("{}/ack", s.sub_url("i")))
        .header("subscription-token", &token)
        .header("authorization", "Bearer not-the-claim-token")
        .json(&ack(&old_id, &first_tail))
        .send()
        .await
        .expect("ack");
    assert_eq!(
        r.status(),
        StatusCode::OK,
        "the old instance's ack is skipped, not refused"
    );
    let (_, sub) = s.get_sub("i").await;
    assert_eq!(
        link(&sub, "i/s").expect("link")["acked_offset"],
        "0000000000000000_0000000000000000",
        "an ack of the deleted stream moved the new stream's cursor"
    );
    // The current instance's ack applies.
    let (status, _) = s
        .call("i", "ack", Some(&token), ack(&new_id, &first_tail))
        .await;
    assert_eq!(status, StatusCode::OK);
    let (_, sub) = s.get_sub("i").await;
    assert_eq!(
        link(&sub, "i/s").expect("link")["acked_offset"],
        first_tail.as_str()
    );
    let (status, err) = s
        .call("i", "ack", Some(&token), ack("x", &first_tail))
        .await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "INVALID_REQUEST");
    s.stop().await;
}

#[tokio::test]
async fn links_from_start_links_existing_streams_at_their_beginning() {
    // Extension for subscribers such as ds-sync, which must process what the server held
    // before the subscription existed (the protocol's default links at the tail).
    let s = Server::start(|_| {}).await;
    assert!(s.put_stream("lf/a", r#"{"n":1}"#).await.is_success());
    assert!(s.put_stream("lf/b", r#"{"n":1}"#).await.is_success());
    assert!(s.put_stream("w/lf", "[]").await.is_success());
    let mut body = json!({"type": "pull-wake", "pattern": "lf/a", "streams": ["lf/b"],
                          "wake_stream": "w/lf", "links_from": "start"});
    let (status, sub) = s.put_sub("lf", body.clone()).await;
    assert_eq!(status, StatusCode::CREATED);
    assert_eq!(sub["links_from"], "start");
    for rel in ["lf/a", "lf/b"] {
        assert_eq!(
            link(&sub, rel).expect("link")["acked_offset"],
            "0000000000000000_0000000000000000",
            "{rel}"
        );
    }
    // Part of the configuration: the same body re-confirms, another value conflicts.
    assert_eq!(s.put_sub("lf", body.clone()).await.0, StatusCode::OK);
    body["links_from"] = json!("tail");
    assert_eq!(s.put_sub("lf", body.clone()).await.0, StatusCode::CONFLICT);
    body["links_from"] = json!("middle");
    let (status, err) = s.put_sub("lf2", body).await;
    assert_eq!(status, StatusCode::BAD_REQUEST);
    assert_eq!(error_code(&err), "INVALID_REQUEST");
    s.stop().await;
}

#[tokio::test]
async fn an_expired_lease_clears_the_holder_and_wakes_again_while_work_is_pending() {
    let s = Server::start(|_| {}).await;
    let _ = pending_pull(&s, "l", 1_000).await;
    let (_, first) = s.claim("l", "dead-worker").await;
    let gen1 = first["generation"].as_u64().expect("gen");
    eventually("a second wake after the lease expired", || async {
        s.wake_events("w/l")
            .await
            .iter()
            .any(|e| e["generation"].as_u64() == Some(gen1 + 1))
    })
    .await;
    let (status, second) = s.claim("l", "live-worker").await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(second["generation"].as_u64(), Some(gen1 + 1));
    // The dead worker's token is fenced.
    let (status, err) = s
        .call(
            "l",
            "release",
            first["token"].as_str(),
            json!({"wake_id": first["wake_id"], "generation": first["generation"]}),
        )
        .await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "FENCED");
    s.stop().await;
}

#[tokio::test]
async fn release_with_pending_work_writes_another_wake() {
    let s = Server::start(|_| {}).await;
    let _ = pending_pull(&s, "r", 60_000).await;
    let (_, claim) = s.claim("r", "w").await;
    let gen1 = claim["generation"].as_u64().expect("gen");
    let (status, _) = s
        .call(
            "r",
            "release",
            claim["token"].as_str(),
            json!({"wake_id": claim["wake_id"], "generation": claim["generation"]}),
        )
        .await;
    assert_eq!(status, StatusCode::NO_CONTENT);
    eventually("a wake of the next generation", || async {
        s.wake_events("w/r")
            .await
            .iter()
            .any(|e| e["generation"].as_u64() == Some(gen1 + 1))
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn done_with_work_left_answers_next_wake_and_wakes_again() {
    let s = Server::start(|_| {}).await;
    let first_tail = pending_pull(&s, "n", 60_000).await;
    let (_, claim) = s.claim("n", "w").await;
    s.append("n/s", r#"{"n":2}"#).await;
    let (status, ok) = s
        .call(
            "n",
            "ack",
            claim["token"].as_str(),
            json!({"wake_id": claim["wake_id"], "generation": claim["generation"],
                   "acks": [{"stream": "n/s", "offset": first_tail}], "done": true}),
        )
        .await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ok["next_wake"], true);
    let gen1 = claim["generation"].as_u64().expect("gen");
    eventually("the next wake", || async {
        s.wake_events("w/n")
            .await
            .iter()
            .any(|e| e["generation"].as_u64() == Some(gen1 + 1))
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn deleting_a_subscription_fails_its_in_flight_requests_and_a_new_life_fences_old_tokens() {
    let s = Server::start(|_| {}).await;
    let tail = pending_pull(&s, "d", 60_000).await;
    let (_, claim) = s.claim("d", "w").await;
    let r = s
        .client
        .delete(s.sub_url("d"))
        .send()
        .await
        .expect("delete");
    assert_eq!(r.status(), StatusCode::NO_CONTENT);
    let ack = json!({"wake_id": claim["wake_id"], "generation": claim["generation"],
                     "acks": [{"stream": "d/s", "offset": tail}], "done": true});
    let (status, err) = s
        .call("d", "ack", claim["token"].as_str(), ack.clone())
        .await;
    assert_eq!(status, StatusCode::NOT_FOUND);
    assert_eq!(error_code(&err), "SUBSCRIPTION_NOT_FOUND");
    s.put_sub("d", pull_sub("d/*", "w/d", 60_000)).await;
    let (status, err) = s.call("d", "ack", claim["token"].as_str(), ack).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "FENCED");
    s.stop().await;
}

#[tokio::test]
async fn a_deleted_stream_leaves_the_pattern_links() {
    let s = Server::start(|_| {}).await;
    s.put_stream("w/g", "[]").await;
    s.put_stream("g/x", "[]").await;
    s.put_sub("g", pull_sub("g/*", "w/g", 5_000)).await;
    s.client.delete(s.url("g/x")).send().await.expect("delete");
    eventually("the link to go", || async {
        link(&s.get_sub("g").await.1, "g/x").is_none()
    })
    .await;
    s.stop().await;
}

/// Claims, acks and generations survive a restart in every durable mode: the acked offset
/// stays, the lease and its token stay valid, and the next wake never reuses a generation.
#[tokio::test]
async fn subscription_state_survives_a_restart_in_every_durable_mode() {
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
        let tail = pending_pull(&s, "p", 60_000).await;
        let (_, claim) = s.claim("p", "w").await;
        let token = claim["token"].as_str().expect("token").to_owned();
        let ack = json!({"wake_id": claim["wake_id"], "generation": claim["generation"],
                         "acks": [{"stream": "p/s", "offset": tail}]});
        assert_eq!(
            s.call("p", "ack", Some(&token), ack).await.0,
            StatusCode::OK
        );
        let jwks: Value = s
            .client
            .get(s.url("__ds/jwks.json"))
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("json");
        s.stop().await;

        let s = Server::start(config).await;
        let (status, sub) = s.get_sub("p").await;
        assert_eq!(status, StatusCode::OK, "{mode:?}");
        assert_eq!(
            link(&sub, "p/s").expect("link")["acked_offset"],
            tail.as_str(),
            "{mode:?}"
        );
        assert_eq!(
            s.claim("p", "other").await.0,
            StatusCode::CONFLICT,
            "{mode:?}: the lease held"
        );
        let (status, _) = s
            .call(
                "p",
                "release",
                Some(&token),
                json!({"wake_id": claim["wake_id"], "generation": claim["generation"]}),
            )
            .await;
        assert_eq!(
            status,
            StatusCode::NO_CONTENT,
            "{mode:?}: the token still holds the lease"
        );
        let (_, next) = s.claim("p", "w").await;
        assert!(
            next["generation"].as_u64() > claim["generation"].as_u64(),
            "{mode:?}"
        );
        let again: Value = s
            .client
            .get(s.url("__ds/jwks.json"))
            .send()
            .await
            .expect("jwks")
            .json()
            .await
            .expect("json");
        assert_eq!(jwks, again, "{mode:?}: the signing key is kept");
        s.stop().await;
    }
}

// ---- webhooks ----

#[derive(Clone, Debug)]
struct Delivery {
    body: Vec<u8>,
    signature: String,
}

/// A webhook receiver on 127.0.0.1 answering with `replies` in turn (the last one repeats).
struct Receiver {
    url: String,
    seen: Arc<Mutex<Vec<Delivery>>>,
}

async fn receiver(replies: Vec<(u16, &'static str)>) -> Receiver {
    let seen: Arc<Mutex<Vec<Delivery>>> = Arc::default();
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0")
        .await
        .expect("bind");
    let addr = listener.local_addr().expect("addr");
    let log = seen.clone();
    let app = axum::Router::new().route(
        "/hook",
        axum::routing::post(
            move |headers: axum::http::HeaderMap, body: axum::body::Bytes| {
                let log = log.clone();
                let replies = replies.clone();
                async move {
                    let n = {
                        let mut log = log.lock();
                        log.push(Delivery {
                            body: body.to_vec(),
                            signature: headers
                                .get("webhook-signature")
                                .and_then(|v| v.to_str().ok())
                                .unwrap_or_default()
                                .to_owned(),
                        });
                        log.len()
                    };
                    let (status, reply) = replies[(n - 1).min(replies.len() - 1)];
                    (
                        axum::http::StatusCode::from_u16(status).expect("status"),
                        [("content-type", "application/json")],
                        reply,
                    )
                }
            },
        ),
    );
    tokio::spawn(async move {
        let _ = axum::serve(listener, app).await;
    });
    Receiver {
        url: format!("http://{addr}/hook"),
        seen,
    }
}

fn verify(jwks: &Value, d: &Delivery) -> bool {
    let mut t = "";
    let mut kid = "";
    let mut sig = "";
    for part in d.signature.split(',') {
        match part.split_once('=') {
            Some(("t", v)) => t = v,
            Some(("kid", v)) => kid = v,
            Some(("ed25519", v)) => sig = v,
            _ => {}
        }
    }
    let Some(key) = jwks["keys"]
        .as_array()
        .and_then(|k| k.iter().find(|k| k["kid"] == kid))
    else {
        return false;
    };
    let (Ok(x), Ok(sig)) = (
        URL_SAFE_NO_PAD.decode(key["x"].as_str().unwrap_or_default()),
        URL_SAFE_NO_PAD.decode(sig),
    ) else {
        return false;
    };
    let mut msg = format!("{t}.").into_bytes();
    msg.extend_from_slice(&d.body);
    ring::signature::UnparsedPublicKey::new(&ring::signature::ED25519, x)
        .verify(&msg, &sig)
        .is_ok()
}

#[tokio::test]
async fn a_webhook_is_signed_with_the_published_key_and_done_acks_its_snapshot() {
    let s = Server::start(|_| {}).await;
    let hook = receiver(vec![(200, r#"{"done": true}"#)]).await;
    let (status, sub) = s
        .put_sub(
            "h",
            json!({"type": "webhook", "pattern": "h/*", "webhook": {"url": hook.url}}),
        )
        .await;
    assert_eq!(status, StatusCode::CREATED);
    assert!(sub.get("webhook_secret").is_none());
    let jwks_url = sub["webhook"]["signing"]["jwks_url"]
        .as_str()
        .expect("jwks_url")
        .to_owned();
    assert_eq!(jwks_url, s.url("__ds/jwks.json"));
    let r = s.client.get(&jwks_url).send().await.expect("jwks");
    assert_eq!(
        r.headers()
            .get("content-type")
            .and_then(|v| v.to_str().ok()),
        Some("application/jwk-set+json")
    );
    let jwks: Value = r.json().await.expect("json");
    s.put_stream("h/x", r#"{"n":1}"#).await;
    let tail = s.tail("h/x").await;
    eventually("the delivery", || async { !hook.seen.lock().is_empty() }).await;
    let delivery = hook.seen.lock()[0].clone();
    assert!(
        verify(&jwks, &delivery),
        "signature verifies: {}",
        delivery.signature
    );
    let mut tampered = delivery.clone();
    tampered.body.push(b' ');
    assert!(!verify(&jwks, &tampered));
    let body: Value = serde_json::from_slice(&delivery.body).expect("json");
    assert_eq!(body["subscription_id"], "h");
    assert_eq!(body["callback_url"], s.url("__ds/subscriptions/h/callback"));
    assert_eq!(body["streams"][0]["tail_offset"], tail.as_str());
    eventually("the snapshot to be acked", || async {
        link(&s.get_sub("h").await.1, "h/x").is_some_and(|l| l["acked_offset"] == tail.as_str())
    })
    .await;
    s.stop().await;
}

#[tokio::test]
async fn a_failed_webhook_is_retried_and_shows_failed_meanwhile() {
    let s = Server::start(|c| {
        // Long enough to observe the `failed` status between attempts.
        c.subscriptions.retry_min = Duration::from_millis(400);
        c.subscriptions.retry_max = Duration::from_millis(400);
    })
    .await;
    let hook = receiver(vec![(500, "{}"), (500, "{}"), (200, r#"{"done": true}"#)]).await;
    s.put_sub(
        "rt",
        json!({"type": "webhook", "pattern": "rt/*", "webhook": {"url": hook.url}}),
    )
    .await;
    s.put_stream("rt/x", r#"{"n":1}"#).await;
    let tail = s.tail("rt/x").await;
    eventually("a failed status", || async {
        s.get_sub("rt").await.1["status"] == "failed"
    })
    .await;
    eventually("the snapshot to be acked after retries", || async {
        link(&s.get_sub("rt").await.1, "rt/x").is_some_and(|l| l["acked_offset"] == tail.as_str())
    })
    .await;
    assert_eq!(hook.seen.lock().len(), 3);
    assert_eq!(s.get_sub("rt").await.1["status"], "active");
    // Every attempt is the same wake, each with a fresh token.
    let bodies: Vec<Value> = hook
        .seen
        .lock()
        .iter()
        .map(|d| serde_json::from_slice(&d.body).expect("json"))
        .collect();
    assert!(bodies.iter().all(|b| b["wake_id"] == bodies[0]["wake_id"]));
    assert_ne!(bodies[0]["callback_token"], bodies[1]["callback_token"]);
    s.stop().await;
}

#[tokio::test]
async fn a_webhook_callback_acks_extends_and_fences() {
    let s = Server::start(|_| {}).await;
    let hook = receiver(vec![(200, "{}")]).await;
    s.put_sub(
        "cb",
        json!({"type": "webhook", "pattern": "cb/*", "webhook": {"url": hook.url}, "lease_ttl_ms": 60_000}),
    )
    .await;
    s.put_stream("cb/x", r#"{"n":1}"#).await;
    eventually("the delivery", || async { !hook.seen.lock().is_empty() }).await;
    let body: Value = serde_json::from_slice(&hook.seen.lock()[0].body).expect("json");
    let token = body["callback_token"].as_str().expect("token").to_owned();
    let tail = body["streams"][0]["tail_offset"].clone();
    let ack = json!({"wake_id": body["wake_id"], "generation": body["generation"],
                     "acks": [{"stream": "cb/x", "offset": tail}], "done": true});
    // A pull-wake route is not the webhook's.
    let (status, err) = s.call("cb", "ack", Some(&token), ack.clone()).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "WRONG_SUBSCRIPTION_TYPE");
    let (status, ok) = s.call("cb", "callback", Some(&token), ack.clone()).await;
    assert_eq!(status, StatusCode::OK);
    assert_eq!(ok, json!({"ok": true, "next_wake": false}));
    let (status, err) = s.call("cb", "callback", Some(&token), ack).await;
    assert_eq!(status, StatusCode::CONFLICT);
    assert_eq!(error_code(&err), "FENCED");
    s.stop().await;
}
