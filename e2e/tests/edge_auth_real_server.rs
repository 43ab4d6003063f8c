//! The edge's auth promises against the REAL ds-server (TLS) behind Envoy (envoy/e2e.yaml.tmpl):
//! without a token, or with an expired, wrong-issuer, wrong-audience or badly signed one, every
//! method is 401 and leaves the stream exactly as it was (checked on the server directly, past
//! Envoy); a valid token creates, appends, reads and deletes; a CORS preflight needs no token.
//!
//! envoy_auth.rs proves the same against a recording stand-in; this file proves that the real
//! server behind the real config behaves as a client expects end to end.

mod support;

use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::tls;
use ds_e2e::token::{TokenKind, mint};
use reqwest::{Method, StatusCode};
use support::{Content, StreamClient, TEXT};

const STREAM: &str = "/v1/stream/edge-auth";

async fn stack() -> EdgeStack {
    EdgeStack::start(ServerOptions {
        storage_mode: "memory".to_owned(),
        ..ServerOptions::default()
    })
    .await
    .expect("ds-server behind envoy")
}

/// A client of ds-server itself, bypassing Envoy: what the server holds, whatever the edge says.
fn direct(stack: &EdgeStack) -> StreamClient {
    StreamClient::new(
        tls::client().expect("client"),
        stack.server.base_url(),
        None,
    )
}

/// Through Envoy with `token` (or none).
fn edge(stack: &EdgeStack, token: Option<String>) -> StreamClient {
    StreamClient::new(stack.client.clone(), stack.edge_url(), token)
}

/// Every method a client uses, each refused with 401 for `client`'s credentials; afterwards the
/// existing stream is unchanged and a stream the refused PUT named does not exist.
async fn assert_everything_refused(stack: &EdgeStack, client: &StreamClient, what: &str) {
    let server = direct(stack);
    let before = server.read_all(STREAM).await.expect("read before");
    let never_created = format!("{STREAM}-never-{}", what.replace(' ', "-"));
    let attempts: Vec<(Method, String)> = vec![
        (Method::PUT, never_created.clone()),
        (Method::POST, STREAM.to_owned()),
        (Method::GET, format!("{STREAM}?offset=-1")),
        (Method::GET, format!("{STREAM}?offset=-1&live=sse")),
        (Method::GET, format!("{STREAM}?offset=-1&live=long-poll")),
        (Method::HEAD, STREAM.to_owned()),
        (Method::DELETE, STREAM.to_owned()),
    ];
    for (method, path) in attempts {
        let response = client
            .request(method.clone(), &path)
            .header("content-type", TEXT)
            .body(if method == Method::POST {
                "smuggled"
            } else {
                ""
            })
            .send()
            .await
            .expect("request through envoy");
        assert_eq!(
            response.status(),
            StatusCode::UNAUTHORIZED,
            "{what}: {method} {path}"
        );
        if method != Method::HEAD {
            let challenge = response
                .headers()
                .get("www-authenticate")
                .and_then(|v| v.to_str().ok())
                .unwrap_or_default();
            assert!(
                challenge.starts_with("Bearer"),
                "{what}: {method} {path}: WWW-Authenticate {challenge:?}"
            );
        }
    }
    assert_eq!(
        server.read_all(STREAM).await.expect("read after"),
        before,
        "{what}: the stream changed although every request was refused"
    );
    let response = server
        .request(Method::HEAD, &never_created)
        .send()
        .await
        .expect("HEAD on the server");
    assert_eq!(
        response.status(),
        StatusCode::NOT_FOUND,
        "{what}: a refused PUT created {never_created}"
    );
}

#[tokio::test]
async fn requests_without_a_token_are_401_and_change_nothing_on_the_server() {
    let stack = stack().await;
    let server = direct(&stack);
    server.create(STREAM, TEXT).await.expect("create directly");
    server
        .append(STREAM, TEXT, "before")
        .await
        .expect("append directly");
    assert_everything_refused(&stack, &edge(&stack, None), "no token").await;
}

#[tokio::test]
async fn every_kind_of_bad_token_is_401_and_changes_nothing_on_the_server() {
    let stack = stack().await;
    let server = direct(&stack);
    server.create(STREAM, TEXT).await.expect("create directly");
    server
        .append(STREAM, TEXT, "before")
        .await
        .expect("append directly");
    for (kind, what) in [
        (TokenKind::Expired, "expired"),
        (TokenKind::WrongIssuer, "wrong issuer"),
        (TokenKind::WrongAudience, "wrong audience"),
        (TokenKind::BadSignature, "bad signature"),
    ] {
        let client = edge(&stack, Some(mint(kind).expect("mint")));
        assert_everything_refused(&stack, &client, what).await;
    }
}

#[tokio::test]
async fn a_valid_token_creates_appends_reads_and_deletes_through_envoy() {
    let stack = stack().await;
    let client = edge(&stack, Some(stack.token.clone()));
    client.create(STREAM, TEXT).await.expect("create");
    for part in ["hello ", "through ", "envoy"] {
        let response = client.append(STREAM, TEXT, part).await.expect("append");
        assert_eq!(response.status(), StatusCode::NO_CONTENT, "append {part:?}");
    }
    let expected = Content::Bytes(b"hello through envoy".to_vec());
    assert_eq!(client.read_all(STREAM).await.expect("read"), expected);
    // The server holds what the client wrote through the edge.
    assert_eq!(
        direct(&stack).read_all(STREAM).await.expect("direct read"),
        expected
    );

    // A read may carry the token as ?access_token= (browsers' EventSource), and works.
    let token_in_query = StreamClient::new(stack.client.clone(), stack.edge_url(), None);
    let response = token_in_query
        .request(
            Method::GET,
            &format!("{STREAM}?offset=-1&access_token={}", stack.token),
        )
        .send()
        .await
        .expect("read with query token");
    assert_eq!(response.status(), StatusCode::OK);
    assert_eq!(
        response.bytes().await.expect("body").as_ref(),
        b"hello through envoy"
    );

    let response = client
        .request(Method::DELETE, STREAM)
        .send()
        .await
        .expect("delete");
    assert_eq!(response.status(), StatusCode::NO_CONTENT);
    let response = direct(&stack)
        .request(Method::HEAD, STREAM)
        .send()
        .await
        .expect("HEAD on the server");
    assert!(
        matches!(response.status(), StatusCode::NOT_FOUND | StatusCode::GONE),
        "deleted stream answers {}",
        response.status()
    );
}

#[tokio::test]
async fn cors_preflight_through_envoy_succeeds_without_a_token() {
    let stack = stack().await;
    let anonymous = edge(&stack, None);
    let response = anonymous
        .request(Method::OPTIONS, STREAM)
        .header("origin", "https://app.example")
        .header("access-control-request-method", "POST")
        .header(
            "access-control-request-headers",
            "authorization, content-type, producer-id, producer-epoch, producer-seq",
        )
        .send()
        .await
        .expect("preflight");
    assert!(response.status().is_success(), "{}", response.status());
    let allow_origin: Vec<_> = response
        .headers()
        .get_all("access-control-allow-origin")
        .iter()
        .collect();
    assert_eq!(allow_origin, ["https://app.example"], "preflight");

    // The request the preflight announced then works with the token, and a browser can read the
    // protocol headers from it: exactly one Allow-Origin (a browser rejects two), and
    // Stream-Next-Offset exposed.
    let client = edge(&stack, Some(stack.token.clone()));
    client.create(STREAM, TEXT).await.expect("create");
    let response = client
        .request(Method::POST, STREAM)
        .header("origin", "https://app.example")
        .header("content-type", TEXT)
        .header("producer-id", "browser")
        .header("producer-epoch", "0")
        .header("producer-seq", "0")
        .body("from a browser")
        .send()
        .await
        .expect("cross-origin append");
    assert_eq!(response.status(), StatusCode::OK);
    let allow_origin: Vec<_> = response
        .headers()
        .get_all("access-control-allow-origin")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect();
    assert_eq!(allow_origin.len(), 1, "Allow-Origin {allow_origin:?}");
    let exposed = response
        .headers()
        .get_all("access-control-expose-headers")
        .iter()
        .filter_map(|v| v.to_str().ok())
        .collect::<Vec<_>>()
        .join(",")
        .to_ascii_lowercase();
    assert!(exposed.contains("stream-next-offset"), "{exposed}");
    assert!(response.headers().contains_key("stream-next-offset"));
}
