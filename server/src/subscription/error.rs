//! Domain errors of subscriptions. No status codes here: `http::error` maps each variant (and
//! gives each its protocol error code).

use crate::storage::StorageError;
use crate::stream::StreamError;

use super::glob::GlobError;

#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error("{0}")]
    Invalid(String),
    #[error("bad pattern: {0}")]
    Pattern(#[from] GlobError),
    #[error("webhook url rejected: {0}")]
    WebhookUrlRejected(String),
    #[error("subscription not found")]
    NotFound,
    #[error(
        "no such control route: paths with a __ds segment are reserved for the routes of protocol section 6"
    )]
    NoSuchRoute,
    #[error("subscription exists with a different configuration")]
    ConfigConflict,
    #[error("subscription is already claimed by {holder:?}")]
    AlreadyClaimed { holder: String, generation: u64 },
    #[error("wake is no longer current (stale token, generation or wake_id)")]
    Fenced,
    #[error("missing bearer token (Authorization: Bearer <token>)")]
    Unauthorized,
    #[error("this operation is for {expected} subscriptions")]
    WrongType { expected: &'static str },
    #[error("stream {0:?} is not linked to this subscription")]
    NotLinked(String),
    #[error("ack offset for {path:?} is beyond the stream's tail")]
    AckBeyondTail {
        path: String,
        offset: u64,
        tail: u64,
    },
    #[error("ack offset for {path:?} is inside a message; ack an offset the server handed out")]
    AckMisaligned { path: String, offset: u64 },
    #[error(
        "the server holds its maximum of {limit} subscriptions (DS_SUBSCRIPTIONS__MAX_SUBSCRIPTIONS)"
    )]
    TooManySubscriptions { limit: u64 },
    #[error("a subscription may link at most {limit} streams (DS_SUBSCRIPTIONS__MAX_LINKS)")]
    TooManyLinks { limit: u64 },
    #[error("subscriptions are not durable in storage mode {0} yet; use memory, or wait for it")]
    NotDurableHere(&'static str),
    #[error("subscriptions are disabled (DS_SUBSCRIPTIONS__ENABLED=false)")]
    Disabled,
    #[error(transparent)]
    Stream(#[from] StreamError),
    #[error(transparent)]
    Storage(#[from] StorageError),
    #[error("no randomness available for tokens")]
    Random,
}
