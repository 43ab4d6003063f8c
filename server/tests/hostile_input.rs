//! Property tests: whatever a client sends in offsets, headers and bodies, the server answers
//! with a 2xx or a 4xx — never a 5xx, never a panic — and stored data does not change on a 4xx.

use axum::body::Body;
use axum::http::{Request, StatusCode};
use ds_server::App;
use ds_server::config::Config;
use proptest::prelude::*;
use tower::ServiceExt;

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime")
}

async fn app() -> ds_server::http::Handler {
    let mut config = Config::default();
    config.server.port = 0;
    config.server.long_poll_timeout = std::time::Duration::from_millis(1);
    let app = App::build(config).await.expect("app");
    let router = app.handler();
    // The listener is not used: requests go straight to the router.
    drop(app);
    router
}

async fn send(router: &ds_server::http::Handler, req: Request<Body>) -> (StatusCode, Vec<u8>) {
    let response = router.clone().oneshot(req).await.expect("infallible");
    let status = response.status();
    let body = axum::body::to_bytes(response.into_body(), usize::MAX)
        .await
        .expect("body");
    (status, body.to_vec())
}

fn put(path: &str, ct: &str, body: &'static str) -> Request<Body> {
    Request::put(path)
        .header("content-type", ct)
        .body(Body::from(body))
        .expect("request")
}

fn header_value() -> impl Strategy<Value = String> {
    prop_oneof![
        "[ -~]{0,24}",
        "[0-9]{0,25}",
        Just("-1".to_owned()),
        Just("18446744073709551616".to_owned()),
        Just("9007199254740992".to_owned()),
        Just("true".to_owned()),
        Just("9999-12-31T23:59:59Z".to_owned()),
    ]
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 256, .. ProptestConfig::default() })]

    #[test]
    fn any_read_offset_gets_2xx_or_4xx(offset in "[ -~]{0,40}", live in prop_oneof![Just(""), Just("&live=long-poll"), Just("&live=sse")]) {
        runtime().block_on(async {
            let router = app().await;
            send(&router, put("/v1/stream/p", "text/plain", "abc")).await;
            let q: String = form_urlencoded::byte_serialize(offset.as_bytes()).collect();
            let uri = format!("/v1/stream/p?offset={q}{live}");
            let req = Request::get(&uri).body(Body::empty()).expect("request");
            let response = router.clone().oneshot(req).await.expect("infallible");
            let status = response.status();
            prop_assert!(status.is_success() || status.is_client_error(), "{uri} -> {status}");
            Ok(())
        })?;
    }

    #[test]
    fn any_protocol_header_values_get_2xx_or_4xx_and_failures_store_nothing(
        ttl in header_value(), expires in header_value(), seq in header_value(),
        epoch in header_value(), pseq in header_value(), closed in header_value(),
        fork_offset in header_value(), sub in header_value(),
        body in prop_oneof![Just("x"), Just(""), Just("[]"), Just("{\"a\":1}"), Just("[1,2]")],
        json in any::<bool>(),
    ) {
        runtime().block_on(async {
            let router = app().await;
            let ct = if json { "application/json" } else { "text/plain" };
            let (st, _) = send(&router, put("/v1/stream/src", ct, if json { "[1]" } else { "abc" })).await;
            prop_assert_eq!(st, StatusCode::CREATED);

            let req = Request::put("/v1/stream/new")
                .header("content-type", ct)
                .header("stream-ttl", ttl.as_str())
                .header("stream-expires-at", expires.as_str())
                .header("stream-closed", closed.as_str())
                .body(Body::from(body))
                .expect("request");
            let (st, _) = send(&router, req).await;
            prop_assert!(st.is_success() || st.is_client_error(), "put -> {}", st);

            let req = Request::put("/v1/stream/fork")
                .header("stream-forked-from", "/v1/stream/src")
                .header("stream-fork-offset", fork_offset.as_str())
                .header("stream-fork-sub-offset", sub.as_str())
                .body(Body::empty())
                .expect("request");
            let (st, _) = send(&router, req).await;
            prop_assert!(st.is_success() || st.is_client_error(), "fork -> {}", st);

            let before = send(&router, Request::get("/v1/stream/src?offset=-1").body(Body::empty()).expect("request")).await;
            let req = Request::post("/v1/stream/src")
                .header("content-type", ct)
                .header("stream-seq", seq.as_str())
                .header("producer-id", "p")
                .header("producer-epoch", epoch.as_str())
                .header("producer-seq", pseq.as_str())
                .header("stream-closed", closed.as_str())
                .body(Body::from(body))
                .expect("request");
            let (st, _) = send(&router, req).await;
            prop_assert!(st.is_success() || st.is_client_error(), "post -> {}", st);
            if st.is_client_error() {
                let after = send(&router, Request::get("/v1/stream/src?offset=-1").body(Body::empty()).expect("request")).await;
                prop_assert_eq!(before.1, after.1);
            }
            Ok(())
        })?;
    }
}
