//! Domain errors of the stream layer. No status codes here: `http::error` maps each variant.

use crate::storage::StorageError;

use super::json::JsonError;
use super::producer::ProducerError;

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("stream not found")]
    NotFound,
    #[error("stream was deleted and is kept only for its forks")]
    SoftDeleted,
    #[error("path is reserved for the server")]
    ReservedPath,
    #[error("append body is empty; send data, or Stream-Closed: true to close")]
    EmptyBody,
    #[error("append with a body needs a Content-Type")]
    MissingContentType,
    #[error("stream is closed")]
    Closed { final_offset: u64 },
    #[error("content type {request:?} does not match the stream's {stream:?}")]
    ContentTypeMismatch { stream: String, request: String },
    #[error("Stream-Seq {sent:?} is not greater than the last accepted {last:?}")]
    SeqRegression { last: String, sent: String },
    #[error(transparent)]
    Producer(#[from] ProducerError),
    #[error(transparent)]
    Json(#[from] JsonError),
    #[error("Stream-Expires-At {0:?} is already in the past")]
    AlreadyExpired(String),
    #[error("stream already exists with a different {0}")]
    ConfigMismatch(&'static str),
    #[error("a deleted stream with live forks still holds this path")]
    PathHeldBySoftDeleted,
    #[error("fork source {0:?} not found")]
    ForkSourceNotFound(String),
    #[error("fork source {0:?} was deleted")]
    ForkSourceDeleted(String),
    #[error("Stream-Fork-Offset {offset} is beyond the source's tail {tail}")]
    ForkOffsetBeyondTail { offset: String, tail: String },
    #[error("offset {0} does not fall on a message boundary")]
    Misaligned(String),
    #[error(
        "Stream-Fork-Sub-Offset {requested} goes past the next data boundary ({available} available)"
    )]
    SubOffsetOvershoot { requested: u64, available: u64 },
    #[error(
        "append of {size} bytes would take the stream past DS_LIMITS__MAX_STREAM_BYTES ({limit} bytes; {used} used)"
    )]
    StreamFull { size: u64, used: u64, limit: u64 },
    #[error(
        "append of {size} bytes would take the server past DS_LIMITS__MAX_MEMORY_BYTES ({limit} bytes; {used} used)"
    )]
    MemoryFull { size: u64, used: u64, limit: u64 },
    #[error(
        "append of {size} bytes would take the server past DS_LIMITS__MAX_MEMORY_BYTES ({limit} bytes; {used} held): the data held is waiting for subscribers (ds-sync) to acknowledge it; retry after the Retry-After delay"
    )]
    Backpressure { size: u64, used: u64, limit: u64 },
    /// The read starts before the stream's earliest retained offset (retention released it).
    #[error(
        "offset {offset} is before this stream's earliest retained offset {e}: the data before it was acknowledged by every subscription linked to the stream (with ds-sync: mirrored to Postgres; read it there) and released from this server; read from {e} (or offset=-1) to resume",
        e = ds_protocol::Offset::at(*.earliest)
    )]
    Released { offset: String, earliest: u64 },
    #[error(
        "the stream registry cannot record this {event}: {why}; nothing was changed, retry later"
    )]
    RegistryUnavailable { event: &'static str, why: String },
    #[error(
        "creating the stream would take the server past DS_LIMITS__MAX_STREAMS ({limit} streams)"
    )]
    StreamsFull { limit: usize },
    #[error(
        "a new idempotent producer would take the server past DS_LIMITS__MAX_PRODUCERS ({limit} producer states; {used} held); idle producers are forgotten after DS_LIMITS__PRODUCER_IDLE_TIMEOUT"
    )]
    ProducersFull { used: u64, limit: u64 },
    #[error("server is shutting down")]
    ShuttingDown,
    #[error("stream is unavailable after a storage failure; restart to recover")]
    Poisoned,
    #[error(transparent)]
    Storage(StorageError),
}

impl From<StorageError> for StreamError {
    /// Storage that stopped accepting work because the server is stopping is not a failure
    /// of the stream: it is answered like any request that races the shutdown (503).
    fn from(e: StorageError) -> Self {
        match e {
            StorageError::ShuttingDown => StreamError::ShuttingDown,
            e => StreamError::Storage(e),
        }
    }
}
