//! The one place where errors become HTTP responses. Bodies are short `text/plain` messages;
//! everything a client must decide on is in the status and headers. 5xx details are logged, not
//! returned.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ds_protocol::{Offset, headers as h};

use crate::stream::StreamError;
use crate::stream::producer::ProducerError;
use crate::subscription::SubscriptionError;

/// An error answered to a client.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error("{0}")]
    BadRequest(String),
    #[error("{0}")]
    PayloadTooLarge(String),
    #[error("method {0} is not allowed on a stream")]
    MethodNotAllowed(String),
    #[error(transparent)]
    Subscription(#[from] SubscriptionError),
    #[error("method {method} is not allowed here (allowed: {allow})")]
    ControlMethodNotAllowed { method: String, allow: &'static str },
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }
}

/// `Retry-After` of backpressure answers: the retention task releases acked data within about
/// 100 ms of the ack, so a second is enough for a subscriber that keeps up.
const RETRY_AFTER_SECS: &str = "1";

fn num(v: u64) -> HeaderValue {
    HeaderValue::from(v)
}

fn offset(pos: u64) -> HeaderValue {
    // Offsets are ASCII digits and '_'.
    HeaderValue::from_bytes(Offset::at(pos).encode().as_bytes())
        .unwrap_or(HeaderValue::from_static("0"))
}

/// A subscription error as section 6/7 shapes it: a status and
/// `{"error": {"code": ..., "message": ...}}` (with `current_holder` and `generation` for
/// `ALREADY_CLAIMED`).
fn subscription_error(e: &SubscriptionError) -> Response {
    use SubscriptionError as E;
    let (status, code) = match e {
        E::Invalid(_) | E::Pattern(_) => (StatusCode::BAD_REQUEST, "INVALID_REQUEST"),
        E::WebhookUrlRejected(_) => (StatusCode::BAD_REQUEST, "WEBHOOK_URL_REJECTED"),
        E::NotLinked(_) => (StatusCode::BAD_REQUEST, "STREAM_NOT_LINKED"),
        E::AckBeyondTail { .. } => (StatusCode::BAD_REQUEST, "OFFSET_BEYOND_TAIL"),
        E::AckMisaligned { .. } => (StatusCode::BAD_REQUEST, "OFFSET_MISALIGNED"),
        E::Unauthorized => (StatusCode::UNAUTHORIZED, "UNAUTHORIZED"),
        E::NotFound => (StatusCode::NOT_FOUND, "SUBSCRIPTION_NOT_FOUND"),
        E::NoSuchRoute => (StatusCode::NOT_FOUND, "NOT_FOUND"),
        E::Disabled => (StatusCode::NOT_FOUND, "SUBSCRIPTIONS_DISABLED"),
        E::ConfigConflict => (StatusCode::CONFLICT, "SUBSCRIPTION_CONFLICT"),
        E::AlreadyClaimed { .. } => (StatusCode::CONFLICT, "ALREADY_CLAIMED"),
        E::Fenced => (StatusCode::CONFLICT, "FENCED"),
        E::WrongType { .. } => (StatusCode::CONFLICT, "WRONG_SUBSCRIPTION_TYPE"),
        E::TooManySubscriptions { .. } => {
            (StatusCode::INSUFFICIENT_STORAGE, "TOO_MANY_SUBSCRIPTIONS")
        }
        E::TooManyLinks { .. } => (StatusCode::INSUFFICIENT_STORAGE, "TOO_MANY_LINKS"),
        E::NotDurableHere(_) => (StatusCode::NOT_IMPLEMENTED, "NOT_SUPPORTED"),
        E::Stream(_) | E::Storage(_) | E::Random => (StatusCode::INTERNAL_SERVER_ERROR, "INTERNAL"),
    };
    let message = if status.is_server_error() && status != StatusCode::NOT_IMPLEMENTED {
        tracing::error!(error = %e, "subscription request failed");
        "internal error".to_owned()
    } else {
        e.to_string()
    };
    let mut error = serde_json::json!({ "code": code, "message": message });
    if let E::AlreadyClaimed { holder, generation } = e {
        error["current_holder"] = holder.as_str().into();
        error["generation"] = (*generation).into();
    }
    let mut response = (status, serde_json::json!({ "error": error }).to_string()).into_response();
    let headers = response.headers_mut();
    headers.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("application/json"),
    );
    headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
    response
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        self.respond(None)
    }
}

impl ApiError {
    /// The response; a 5xx is logged here, with the request's id when there is one.
    pub fn respond(self, request_id: Option<&HeaderValue>) -> Response {
        let mut extra: Vec<(&'static str, HeaderValue)> = Vec::new();
        let status = match &self {
            ApiError::Subscription(e) => return subscription_error(e),
            ApiError::ControlMethodNotAllowed { allow, .. } => {
                extra.push(("allow", HeaderValue::from_static(allow)));
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::BadRequest(_) => StatusCode::BAD_REQUEST,
            ApiError::PayloadTooLarge(_) => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::MethodNotAllowed(_) => {
                extra.push((
                    "allow",
                    HeaderValue::from_static("GET, HEAD, PUT, POST, DELETE, OPTIONS"),
                ));
                StatusCode::METHOD_NOT_ALLOWED
            }
            ApiError::Stream(e) => match e {
                StreamError::NotFound | StreamError::ForkSourceNotFound(_) => StatusCode::NOT_FOUND,
                StreamError::SoftDeleted => StatusCode::GONE,
                StreamError::ReservedPath => StatusCode::FORBIDDEN,
                StreamError::EmptyBody
                | StreamError::MissingContentType
                | StreamError::Json(_)
                | StreamError::ForkOffsetBeyondTail { .. }
                | StreamError::Misaligned(_)
                | StreamError::AlreadyExpired(_)
                | StreamError::SubOffsetOvershoot { .. } => StatusCode::BAD_REQUEST,
                StreamError::Closed { final_offset } => {
                    extra.push((h::STREAM_CLOSED, HeaderValue::from_static("true")));
                    extra.push((h::STREAM_NEXT_OFFSET, offset(*final_offset)));
                    StatusCode::CONFLICT
                }
                StreamError::ContentTypeMismatch { .. }
                | StreamError::SeqRegression { .. }
                | StreamError::ConfigMismatch(_)
                | StreamError::PathHeldBySoftDeleted
                | StreamError::ForkSourceDeleted(_) => StatusCode::CONFLICT,
                StreamError::Producer(p) => match p {
                    ProducerError::StaleEpoch { current, .. } => {
                        extra.push((h::PRODUCER_EPOCH, num(*current)));
                        StatusCode::FORBIDDEN
                    }
                    ProducerError::NewEpochNonZeroSeq { .. } => StatusCode::BAD_REQUEST,
                    ProducerError::Gap { expected, received } => {
                        extra.push((h::PRODUCER_EXPECTED_SEQ, num(*expected)));
                        extra.push((h::PRODUCER_RECEIVED_SEQ, num(*received)));
                        StatusCode::CONFLICT
                    }
                },
                StreamError::StreamFull { .. }
                | StreamError::MemoryFull { .. }
                | StreamError::StreamsFull { .. }
                | StreamError::ProducersFull { .. } => StatusCode::PAYLOAD_TOO_LARGE,
                StreamError::Released { earliest, .. } => {
                    extra.push((h::STREAM_EARLIEST_OFFSET, offset(*earliest)));
                    StatusCode::GONE
                }
                StreamError::Backpressure { .. } | StreamError::RegistryUnavailable { .. } => {
                    extra.push(("retry-after", HeaderValue::from_static(RETRY_AFTER_SECS)));
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StreamError::ShuttingDown | StreamError::Poisoned => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StreamError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        // Backpressure is a 503 the client must understand: it says why and what to wait for.
        let explained = matches!(
            self,
            ApiError::Stream(StreamError::Backpressure { .. })
                | ApiError::Stream(StreamError::RegistryUnavailable { .. })
        );
        let body = if status.is_server_error() && !explained {
            let request_id = request_id
                .and_then(|id| id.to_str().ok())
                .unwrap_or_default();
            tracing::error!(request_id, error = %self, "request failed");
            status
                .canonical_reason()
                .unwrap_or("server error")
                .to_ascii_lowercase()
        } else {
            self.to_string()
        };
        let mut response = (status, body).into_response();
        let headers = response.headers_mut();
        headers.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("text/plain; charset=utf-8"),
        );
        headers.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-store"));
        for (name, value) in extra {
            headers.insert(name, value);
        }
        response
    }
}
