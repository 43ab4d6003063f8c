//! The subscription control routes under `{root}__ds/` (protocol sections 6 and 7): the root is
//! whatever precedes the first `__ds` segment (see `server/SUBSCRIPTIONS.md`). JSON in, JSON
//! out; errors are `{"error": {"code": ..., "message": ...}}`.

use std::sync::Arc;

use axum::body::Body;
use axum::extract::Request;
use axum::http::{HeaderValue, Method, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ds_protocol::Offset;
use futures::future::BoxFuture;
use serde::Deserialize;

use super::error::ApiError;
use super::{AppState, browser_headers, preflight, request_origin};
use crate::stream::CONTROL_SEGMENT;
use crate::subscription::{
    AckRequest, DEFAULT_LEASE_MS, Delivery, Spec, SubKey, SubscriptionError, Subscriptions, View,
    delivery,
};

/// Largest control request body (a `streams` list of 1 000 long paths fits).
const MAX_CONTROL_BODY: usize = 2 << 20;

/// Whether `path` has a `__ds` segment (a control route, never a stream).
pub fn is_control_path(path: &str) -> bool {
    crate::stream::may_hold_control_segment(path)
        && (path.contains("/__ds/") || path.ends_with("/__ds"))
}

/// A control route, parsed.
enum Route {
    Jwks,
    Subscription(SubKey),
    Streams(SubKey),
    Stream(SubKey, String),
    Action(SubKey, Action),
}

#[derive(Clone, Copy)]
enum Action {
    Claim,
    Ack,
    Release,
    Callback,
}

fn percent_decode(raw: &str) -> Result<String, ApiError> {
    let bytes = raw.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i] == b'%' {
            let hex = bytes
                .get(i + 1..i + 3)
                .and_then(|h| std::str::from_utf8(h).ok())
                .and_then(|h| u8::from_str_radix(h, 16).ok())
                .ok_or_else(|| ApiError::bad_request(format!("bad percent-encoding in {raw:?}")))?;
            out.push(hex);
            i += 3;
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    String::from_utf8(out)
        .map_err(|_| ApiError::bad_request(format!("{raw:?} is not UTF-8 once decoded")))
}

fn not_found() -> ApiError {
    ApiError::Subscription(SubscriptionError::NoSuchRoute)
}

fn parse_route(path: &str) -> Result<Route, ApiError> {
    let marker = format!("/{CONTROL_SEGMENT}/");
    let at = path.find(&marker).ok_or_else(not_found)?;
    let root = path[..=at].to_owned();
    let rest = &path[at + marker.len()..];
    if rest == "jwks.json" {
        return Ok(Route::Jwks);
    }
    let rest = rest.strip_prefix("subscriptions/").ok_or_else(not_found)?;
    let (id, tail) = match rest.split_once('/') {
        Some((id, tail)) => (id, Some(tail)),
        None => (rest, None),
    };
    let key = SubKey {
        root,
        id: percent_decode(id)?,
    };
    Ok(match tail {
        None => Route::Subscription(key),
        Some("streams") => Route::Streams(key),
        Some("claim") => Route::Action(key, Action::Claim),
        Some("ack") => Route::Action(key, Action::Ack),
        Some("release") => Route::Action(key, Action::Release),
        Some("callback") => Route::Action(key, Action::Callback),
        Some(other) => match other.strip_prefix("streams/") {
            Some(enc) if !enc.is_empty() => Route::Stream(key, percent_decode(enc)?),
            _ => return Err(not_found()),
        },
    })
}

/// Any request to a control path.
pub fn request(
    state: AppState,
    req: Request,
    id: HeaderValue,
    fixed: bool,
) -> BoxFuture<'static, Response> {
    let origin_header = req.headers().get(header::ORIGIN).cloned();
    Box::pin(async move {
        let response = if req.method() == Method::OPTIONS {
            preflight()
        } else {
            handle(&state, req)
                .await
                .unwrap_or_else(IntoResponse::into_response)
        };
        browser_headers(&state, origin_header, id, fixed, response)
    })
}

fn json_response(status: StatusCode, body: &serde_json::Value) -> Response {
    let mut r = (status, body.to_string()).into_response();
    let hs = r.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    r
}

async fn json_body<T: serde::de::DeserializeOwned>(body: Body) -> Result<T, ApiError> {
    let bytes = axum::body::to_bytes(body, MAX_CONTROL_BODY)
        .await
        .map_err(|_| {
            ApiError::PayloadTooLarge(format!(
                "control request bodies are at most {MAX_CONTROL_BODY} bytes"
            ))
        })?;
    serde_json::from_slice(&bytes).map_err(|e| {
        ApiError::Subscription(SubscriptionError::Invalid(format!("bad JSON body: {e}")))
    })
}

/// The header that may carry a claim or callback token instead of `Authorization: Bearer`
/// (an extension): behind an edge such as Envoy, `Authorization` carries the service JWT the
/// edge checks and removes, so a worker there sends the wake's token in this header.
pub const TOKEN_HEADER: &str = "subscription-token";

fn bearer(req: &Request) -> Option<String> {
    if let Some(token) = req
        .headers()
        .get(TOKEN_HEADER)
        .and_then(|v| v.to_str().ok())
        .map(str::trim)
        .filter(|t| !t.is_empty())
    {
        return Some(token.to_owned());
    }
    let v = req.headers().get(header::AUTHORIZATION)?.to_str().ok()?;
    let (scheme, token) = v.split_once(' ')?;
    scheme
        .eq_ignore_ascii_case("bearer")
        .then(|| token.trim().to_owned())
}

fn method_not_allowed(method: &Method, allow: &'static str) -> ApiError {
    ApiError::ControlMethodNotAllowed {
        method: method.to_string(),
        allow,
    }
}

async fn handle(state: &AppState, req: Request) -> Result<Response, ApiError> {
    let subs = state
        .inner
        .subscriptions
        .clone()
        .ok_or(ApiError::Subscription(SubscriptionError::Disabled))?;
    let route = parse_route(req.uri().path())?;
    let method = req.method().clone();
    match route {
        Route::Jwks => {
            if method != Method::GET && method != Method::HEAD {
                return Err(method_not_allowed(&method, "GET, HEAD"));
            }
            let mut r = json_response(StatusCode::OK, &subs.signing_key().jwks());
            let hs = r.headers_mut();
            hs.insert(
                header::CONTENT_TYPE,
                HeaderValue::from_static("application/jwk-set+json"),
            );
            hs.insert(
                header::CACHE_CONTROL,
                HeaderValue::from_static("public, max-age=300"),
            );
            Ok(r)
        }
        Route::Subscription(key) => match method {
            Method::PUT => put(state, &subs, key, req).await,
            Method::GET => Ok(json_response(StatusCode::OK, &view_json(&subs.get(&key)?))),
            Method::DELETE => {
                subs.delete(&key).await?;
                Ok(StatusCode::NO_CONTENT.into_response())
            }
            _ => Err(method_not_allowed(&method, "GET, PUT, DELETE")),
        },
        Route::Streams(key) => {
            if method != Method::POST {
                return Err(method_not_allowed(&method, "POST"));
            }
            let body: StreamsBody = json_body(req.into_body()).await?;
            let effects = subs.add_streams(&key, body.streams).await?;
            delivery::spawn_effects(&subs, effects);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Route::Stream(key, rel) => {
            if method != Method::DELETE {
                return Err(method_not_allowed(&method, "DELETE"));
            }
            subs.remove_stream(&key, &rel).await?;
            Ok(StatusCode::NO_CONTENT.into_response())
        }
        Route::Action(key, action) => {
            if method != Method::POST {
                return Err(method_not_allowed(&method, "POST"));
            }
            act(&subs, key, action, req).await
        }
    }
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct WebhookBody {
    url: String,
    /// Echoed from a GET; the server's own, never configuration.
    #[serde(default, rename = "signing")]
    _signing: Option<serde_json::Value>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct PutBody {
    #[serde(rename = "type")]
    kind: String,
    pattern: Option<String>,
    streams: Option<Vec<String>>,
    webhook: Option<WebhookBody>,
    wake_stream: Option<String>,
    lease_ttl_ms: Option<u64>,
    description: Option<String>,
    /// Extension: `"start"` links existing streams at their beginning, `"tail"` (the
    /// protocol's rule, the default) at their tail.
    links_from: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct StreamsBody {
    streams: Vec<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ClaimBody {
    worker: String,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckItem {
    stream: String,
    offset: String,
    /// Extension: the `Stream-Id` of the instance acked (decimal text); an ack of an instance
    /// that is no longer linked at the path is skipped (see `AckRequest::stream_ids`).
    #[serde(default)]
    stream_id: Option<String>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct AckBody {
    wake_id: String,
    generation: u64,
    #[serde(default)]
    acks: Vec<AckItem>,
    #[serde(default)]
    done: bool,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct ReleaseBody {
    wake_id: String,
    generation: u64,
}

fn invalid(msg: impl Into<String>) -> ApiError {
    ApiError::Subscription(SubscriptionError::Invalid(msg.into()))
}

async fn put(
    state: &AppState,
    subs: &Arc<Subscriptions>,
    key: SubKey,
    req: Request,
) -> Result<Response, ApiError> {
    let origin = request_origin(req.headers(), req.uri(), state.inner.tls).unwrap_or_default();
    let body: PutBody = json_body(req.into_body()).await?;
    let delivery = match (body.kind.as_str(), body.webhook, body.wake_stream) {
        ("webhook", Some(w), None) => Delivery::Webhook { url: w.url },
        ("webhook", None, _) => return Err(invalid("type webhook needs webhook.url")),
        ("webhook", Some(_), Some(_)) => {
            return Err(invalid("type webhook takes no wake_stream"));
        }
        ("pull-wake", None, Some(wake_stream)) => Delivery::PullWake { wake_stream },
        ("pull-wake", _, None) => return Err(invalid("type pull-wake needs wake_stream")),
        ("pull-wake", Some(_), Some(_)) => return Err(invalid("type pull-wake takes no webhook")),
        (other, _, _) => {
            return Err(invalid(format!(
                "type {other:?} is not webhook or pull-wake"
            )));
        }
    };
    let links_from_start = match body.links_from.as_deref() {
        None | Some("tail") => false,
        Some("start") => true,
        Some(other) => {
            return Err(invalid(format!(
                "links_from {other:?} is not \"start\" or \"tail\""
            )));
        }
    };
    let spec = Spec {
        delivery,
        pattern: body.pattern,
        streams: body.streams.unwrap_or_default(),
        lease_ttl_ms: body.lease_ttl_ms.unwrap_or(DEFAULT_LEASE_MS),
        description: body.description,
        links_from_start,
    };
    let (view, created, effects) = subs.put(key, spec, &origin).await?;
    delivery::spawn_effects(subs, effects);
    let status = if created {
        StatusCode::CREATED
    } else {
        StatusCode::OK
    };
    Ok(json_response(status, &view_json(&view)))
}

fn parse_offset(stream: &str, raw: &str) -> Result<u64, ApiError> {
    let o: Offset = raw
        .parse()
        .map_err(|e| invalid(format!("ack offset {raw:?} for {stream:?}: {e}")))?;
    // Offsets of a later segment are past every tail the server has.
    Ok(super::request::concrete_pos(o))
}

async fn act(
    subs: &Arc<Subscriptions>,
    key: SubKey,
    action: Action,
    req: Request,
) -> Result<Response, ApiError> {
    let token = bearer(&req);
    match action {
        Action::Claim => {
            let body: ClaimBody = json_body(req.into_body()).await?;
            let (claim, effects) = subs.claim(&key, &body.worker).await?;
            delivery::spawn_effects(subs, effects);
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({
                    "wake_id": claim.wake_id,
                    "generation": claim.generation,
                    "token": claim.token,
                    "streams": claim.streams.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
                    "lease_ttl_ms": claim.lease_ttl_ms,
                }),
            ))
        }
        Action::Ack | Action::Callback => {
            let body: AckBody = json_body(req.into_body()).await?;
            let mut acks = Vec::with_capacity(body.acks.len());
            let mut stream_ids = Vec::with_capacity(body.acks.len());
            if body.acks.len() > crate::subscription::MAX_STREAMS_PER_REQUEST {
                return Err(invalid(format!(
                    "acks lists at most {} streams",
                    crate::subscription::MAX_STREAMS_PER_REQUEST
                )));
            }
            for a in body.acks {
                let pos = parse_offset(&a.stream, &a.offset)?;
                let id = match &a.stream_id {
                    None => None,
                    Some(raw) => Some(raw.parse::<u64>().map_err(|_| {
                        invalid(format!(
                            "ack stream_id {raw:?} for {:?} is not a Stream-Id (a decimal number)",
                            a.stream
                        ))
                    })?),
                };
                acks.push((a.stream, pos));
                stream_ids.push(id);
            }
            let request = AckRequest {
                wake_id: body.wake_id,
                generation: body.generation,
                acks,
                stream_ids,
                done: body.done,
            };
            let webhook = matches!(action, Action::Callback);
            let (next_wake, effects) = subs.ack(&key, token.as_deref(), request, webhook).await?;
            delivery::spawn_effects(subs, effects);
            Ok(json_response(
                StatusCode::OK,
                &serde_json::json!({ "ok": true, "next_wake": next_wake }),
            ))
        }
        Action::Release => {
            let body: ReleaseBody = json_body(req.into_body()).await?;
            let effects = subs
                .release(&key, token.as_deref(), &body.wake_id, body.generation)
                .await?;
            delivery::spawn_effects(subs, effects);
            Ok(StatusCode::NO_CONTENT.into_response())
        }
    }
}

fn rfc3339_ms(ms: u64) -> String {
    time::OffsetDateTime::from_unix_timestamp_nanos(i128::from(ms) * 1_000_000)
        .ok()
        .and_then(|t| {
            t.format(&time::format_description::well_known::Rfc3339)
                .ok()
        })
        .unwrap_or_default()
}

/// A subscription as section 6.3 shows it.
fn view_json(view: &View) -> serde_json::Value {
    let (webhook, wake_stream) = match &view.spec.delivery {
        Delivery::Webhook { url } => {
            let mut w = serde_json::json!({ "url": url });
            if let Some((kid, jwks_url)) = &view.signing {
                w["signing"] = serde_json::json!({
                    "alg": "ed25519",
                    "kid": kid,
                    "jwks_url": jwks_url,
                });
            }
            (w, serde_json::Value::Null)
        }
        Delivery::PullWake { wake_stream } => {
            (serde_json::Value::Null, serde_json::json!(wake_stream))
        }
    };
    serde_json::json!({
        "id": view.key.id,
        "subscription_id": view.key.id,
        "type": view.spec.delivery.type_name(),
        "pattern": view.spec.pattern,
        "streams": view.links.iter().map(|l| l.to_json()).collect::<Vec<_>>(),
        "webhook": webhook,
        "wake_stream": wake_stream,
        "lease_ttl_ms": view.spec.lease_ttl_ms,
        "created_at": rfc3339_ms(view.created_at_ms),
        "status": view.status,
        "generation": view.generation,
        "description": view.spec.description,
        "links_from": if view.spec.links_from_start { "start" } else { "tail" },
    })
}

#[cfg(test)]
mod tests {
    #[test]
    fn control_paths_hold_a_whole_control_segment() {
        for path in [
            "/s/__ds/subscriptions/a",
            "/s/__ds",
            "/__ds/jwks",
            "/a_b/__ds/x",
        ] {
            assert!(is_control_path(path), "{path}");
        }
        for path in ["/s/x__ds", "/s/a_b", "/s/__dsx/a", "/v1/stream/a", ""] {
            assert!(!is_control_path(path), "{path}");
        }
    }

    use super::*;

    #[test]
    fn routes_are_found_relative_to_any_root() {
        assert!(matches!(
            parse_route("/v1/stream/__ds/jwks.json"),
            Ok(Route::Jwks)
        ));
        match parse_route("/v1/stream/__ds/subscriptions/s%2D1") {
            Ok(Route::Subscription(k)) => {
                assert_eq!(k.root, "/v1/stream/");
                assert_eq!(k.id, "s-1");
            }
            _ => panic!("subscription route"),
        }
        match parse_route("/__ds/subscriptions/a/streams/manual%2Fb") {
            Ok(Route::Stream(k, p)) => {
                assert_eq!(k.root, "/");
                assert_eq!(p, "manual/b");
            }
            _ => panic!("stream route"),
        }
        assert!(matches!(
            parse_route("/x/__ds/subscriptions/a/claim"),
            Ok(Route::Action(_, Action::Claim))
        ));
        assert!(parse_route("/x/__ds/other").is_err());
        assert!(parse_route("/x/__ds/subscriptions/a/nope").is_err());
        assert!(parse_route("/x/__ds/subscriptions/%zz").is_err());
    }
}
