//! The one place where errors become HTTP responses. Bodies are short `text/plain` messages;
//! everything a client must decide on is in the status and headers. 5xx details are logged, not
//! returned.

use axum::http::{HeaderValue, StatusCode, header};
use axum::response::{IntoResponse, Response};
use ds_protocol::{Offset, headers as h};

use crate::stream::StreamError;
use crate::stream::producer::ProducerError;

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
}

impl ApiError {
    pub fn bad_request(msg: impl Into<String>) -> Self {
        ApiError::BadRequest(msg.into())
    }
}

fn num(v: u64) -> HeaderValue {
    HeaderValue::from(v)
}

fn offset(pos: u64) -> HeaderValue {
    // Offsets are ASCII digits and '_'.
    HeaderValue::from_bytes(Offset::at(pos).encode().as_bytes())
        .unwrap_or(HeaderValue::from_static("0"))
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
                StreamError::StreamFull { .. } | StreamError::MemoryFull { .. } => {
                    StatusCode::PAYLOAD_TOO_LARGE
                }
                StreamError::ShuttingDown | StreamError::Poisoned => {
                    StatusCode::SERVICE_UNAVAILABLE
                }
                StreamError::Storage(_) => StatusCode::INTERNAL_SERVER_ERROR,
            },
        };
        let body = if status.is_server_error() {
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
