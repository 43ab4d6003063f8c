//! Storage: where stream bytes and writer state live, behind a narrow trait.
//!
//! The `stream` layer owns the protocol rules and keeps every stream's metadata in memory; a
//! backend only has to (1) persist what the stream layer decided, atomically per call, and
//! (2) read back byte ranges. Backends never see HTTP and never make protocol decisions.
//!
//! Contract every backend keeps (checked by the shared contract tests):
//! - `StreamLog::append` commits the data, the producer state, the `Stream-Seq` value and the
//!   closed flag of one entry together: after a crash either all of it is there or none of it.
//! - Commits of one log complete in submission order. The stream layer assigns offsets under its
//!   own lock and submits in that order, then makes data visible to readers only once the returned
//!   [`Commit`] resolves, so readers see only acknowledged data.
//! - The returned future does no work the caller must drive for correctness of *other* commits:
//!   dropping it (a client hung up) does not cancel the write.
//! - `read` returns bytes of `[from, until)` only, at most about `max_bytes` of them but always at
//!   least one record when any is in range, cut only at record boundaries unless `split` allows
//!   cutting inside a record (byte streams may be cut anywhere; JSON streams may not).
//! - Blocking I/O never runs on the caller's async worker thread.

/// Logs that sync (`file-durable`'s segments, `acid`'s commit log) write zeros ahead of what
/// they append, so that a sync overwrites allocated blocks instead of also growing the file,
/// but only for writes smaller than this. Zeros pay off where a sync's fixed cost dominates
/// (small writes); they double the bytes written, which bulk appends (bound by disk bandwidth)
/// would feel: 1 MiB appends filled a stream at 284 MB/s with zeros everywhere against 590
/// without in `file-durable`, and at 175 against 276 MB/s in `acid`. A larger write only
/// lengthens the file.
pub(crate) const ZERO_FILL_BELOW: u64 = 64 << 10;

pub mod acid;
pub mod file;
pub mod fsutil;
mod mapped;
pub mod memory;
pub mod records;
mod tail_cache;

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;
use futures::future::BoxFuture;
use serde::{Deserialize, Serialize};

/// A stream instance's identity. A path that is deleted and re-created gets a new id.
pub type StreamId = u64;

/// What a backend failed at. Never shown to clients in detail (it becomes a 500 and a log line).
#[derive(Debug, thiserror::Error)]
pub enum StorageError {
    #[error("i/o error on {what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    #[error("corrupt data in {what}: {detail}")]
    Corrupt { what: String, detail: String },
    #[error("offset {pos} is not on a record boundary")]
    Misaligned { pos: u64 },
    #[error("stream {0} is no longer stored")]
    Removed(StreamId),
    /// The read starts before the stream's retained start: that prefix was released
    /// ([`StreamLog::release`]). `start` is the earliest position still stored.
    #[error("data before position {start} was released")]
    Released { start: u64 },
    #[error("storage is shutting down")]
    ShuttingDown,
    /// The backend cannot start with this configuration (e.g. a shard count that differs from
    /// the one the data directory was created with).
    #[error("storage configuration: {0}")]
    Config(String),
}

/// A durable write in flight. Resolves once the write is acknowledged by the backend's promise
/// (in RAM, in the page cache, or fsynced, depending on the mode).
pub type Commit = BoxFuture<'static, Result<(), StorageError>>;

/// A commit that is already complete. Its future has no state, so boxing it allocates
/// nothing (memory mode makes one per append).
pub fn done() -> Commit {
    struct Done;
    impl Future for Done {
        type Output = Result<(), StorageError>;
        fn poll(
            self: std::pin::Pin<&mut Self>,
            _: &mut std::task::Context<'_>,
        ) -> std::task::Poll<Self::Output> {
            std::task::Poll::Ready(Ok(()))
        }
    }
    Box::pin(Done)
}

/// Idempotent-producer state for one `(stream, producer id)`.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerState {
    pub epoch: u64,
    pub last_seq: u64,
    /// When the producer's last append was accepted (Unix ms): a producer idle longer than
    /// `DS_LIMITS__PRODUCER_IDLE_TIMEOUT` is forgotten. 0: unknown (written by a build that did
    /// not store it); recovery then counts the idle time from the start-up.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub last_ms: u64,
}

fn is_zero(v: &u64) -> bool {
    *v == 0
}

/// The producer request that closed a stream, so that its retry is recognised as a duplicate.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ProducerTuple {
    pub id: String,
    pub epoch: u64,
    pub seq: u64,
}

/// Where a fork diverges from its source.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ForkMeta {
    pub source_id: StreamId,
    pub source_path: String,
    /// The anchor: data before it is read from the source.
    pub offset: u64,
    /// Messages (JSON) or bytes (others) of the source inherited past the anchor; they were copied
    /// into the fork's own first record when it was created.
    pub sub_offset: u64,
}

/// A stream's configuration, fixed at creation. Every stream's is in RAM, so it is kept to
/// 64 bytes (an 80-byte allocation with its `Arc`): the content type behind a thin pointer,
/// `Stream-Expires-At` and the fork's anchor boxed together. Stored as JSON with the fields of
/// [`MetaRef`], the same in every layout version.
#[derive(Clone, Debug, PartialEq, Eq, Deserialize)]
#[serde(from = "MetaOwned")]
pub struct StreamMeta {
    pub id: StreamId,
    /// The registry finds the stream by this (no copy of the path is kept elsewhere).
    pub path: Box<str>,
    /// The `Content-Type` exactly as given at creation (echoed on reads).
    /// Common types share one allocation ([`shared_content_type`]).
    pub content_type: Arc<String>,
    pub ttl_secs: Option<u64>,
    pub created_at_ms: u64,
    /// What few streams have; `None` when they have neither.
    extra: Option<Box<MetaExtra>>,
}

#[derive(Clone, Debug, PartialEq, Eq)]
struct MetaExtra {
    /// `Stream-Expires-At` as sent (echoed on HEAD) and as Unix milliseconds.
    expires_at: Option<(String, i64)>,
    fork: Option<ForkMeta>,
}

impl StreamMeta {
    /// A stream's configuration with neither `Stream-Expires-At` nor a fork source.
    pub fn new(
        id: StreamId,
        path: &str,
        content_type: &str,
        ttl_secs: Option<u64>,
        created_at_ms: u64,
    ) -> StreamMeta {
        StreamMeta {
            id,
            path: path.into(),
            content_type: shared_content_type(content_type),
            ttl_secs,
            created_at_ms,
            extra: None,
        }
    }

    pub fn expires_at(&self) -> Option<&(String, i64)> {
        self.extra.as_ref()?.expires_at.as_ref()
    }

    /// Where this stream diverges from its source, if it is a fork.
    pub fn fork(&self) -> Option<&ForkMeta> {
        self.extra.as_ref()?.fork.as_ref()
    }

    pub fn set_expires_at(&mut self, expires_at: Option<(String, i64)>) {
        let fork = self.extra.take().and_then(|e| e.fork);
        self.extra = MetaExtra::boxed(expires_at, fork);
    }

    pub fn set_fork(&mut self, fork: Option<ForkMeta>) {
        let expires_at = self.extra.take().and_then(|e| e.expires_at);
        self.extra = MetaExtra::boxed(expires_at, fork);
    }
}

impl MetaExtra {
    fn boxed(expires_at: Option<(String, i64)>, fork: Option<ForkMeta>) -> Option<Box<MetaExtra>> {
        (expires_at.is_some() || fork.is_some()).then(|| Box::new(MetaExtra { expires_at, fork }))
    }
}

/// A content type to keep: the common ones share one allocation each (a fixed list, so
/// client-chosen types never grow a table), others get their own.
pub fn shared_content_type(content_type: &str) -> Arc<String> {
    static COMMON: std::sync::LazyLock<Vec<Arc<String>>> = std::sync::LazyLock::new(|| {
        [
            "application/octet-stream",
            "application/json",
            "application/x-ndjson",
            "text/plain",
            "text/plain; charset=utf-8",
            "text/event-stream",
        ]
        .into_iter()
        .map(|c| Arc::new(c.to_owned()))
        .collect()
    });
    COMMON
        .iter()
        .find(|c| c.as_str() == content_type)
        .cloned()
        .unwrap_or_else(|| Arc::new(content_type.to_owned()))
}

/// [`StreamMeta`] as stored (JSON): these field names are the format.
#[derive(Serialize)]
struct MetaRef<'a> {
    id: StreamId,
    path: &'a str,
    content_type: &'a str,
    ttl_secs: Option<u64>,
    expires_at: Option<&'a (String, i64)>,
    created_at_ms: u64,
    fork: Option<&'a ForkMeta>,
}

/// [`MetaRef`], read back.
#[derive(Deserialize)]
struct MetaOwned {
    id: StreamId,
    path: Box<str>,
    content_type: String,
    ttl_secs: Option<u64>,
    expires_at: Option<(String, i64)>,
    created_at_ms: u64,
    fork: Option<ForkMeta>,
}

impl Serialize for StreamMeta {
    fn serialize<S: serde::Serializer>(&self, serializer: S) -> Result<S::Ok, S::Error> {
        MetaRef {
            id: self.id,
            path: &self.path,
            content_type: &self.content_type,
            ttl_secs: self.ttl_secs,
            expires_at: self.expires_at(),
            created_at_ms: self.created_at_ms,
            fork: self.fork(),
        }
        .serialize(serializer)
    }
}

impl From<MetaOwned> for StreamMeta {
    fn from(m: MetaOwned) -> StreamMeta {
        StreamMeta {
            id: m.id,
            path: m.path,
            // Recovered streams share the common types too.
            content_type: shared_content_type(&m.content_type),
            ttl_secs: m.ttl_secs,
            created_at_ms: m.created_at_ms,
            extra: MetaExtra::boxed(m.expires_at, m.fork),
        }
    }
}

/// Everything one append commits together.
#[derive(Clone, Debug, Default)]
pub struct AppendEntry {
    /// Position where `data` starts: the tail before this append.
    pub start: u64,
    /// The bytes (for JSON streams: the append's messages joined by commas). `None` for a
    /// close-only request.
    pub data: Option<Bytes>,
    /// Set when this entry closes the stream; carries the closing producer tuple, if any.
    pub close: Option<Option<ProducerTuple>>,
    pub stream_seq: Option<String>,
    pub producer: Option<(String, ProducerState)>,
}

/// Writer state as recovered from storage at start-up.
#[derive(Clone, Debug, Default)]
pub struct WriterSnapshot {
    pub tail: u64,
    pub closed: bool,
    pub closed_by: Option<ProducerTuple>,
    pub last_seq: Option<String>,
    pub producers: HashMap<String, ProducerState>,
    pub soft_deleted: bool,
    /// Last access time, for sliding TTLs (best effort: persisted lazily by some backends).
    pub last_access_ms: u64,
    /// Bytes held by this stream's own log (not counting inherited data or released bytes).
    pub own_bytes: u64,
    /// The retained start: everything before it was released ([`StreamLog::release`]) and is
    /// gone. 0 (or the fork anchor) when nothing was released.
    pub released: u64,
}

/// One stream found by [`Storage::recover`].
pub struct Recovered {
    pub meta: Arc<StreamMeta>,
    pub state: WriterSnapshot,
    pub log: Arc<dyn StreamLog>,
}

/// A read's result: record pieces in order and the position after the last byte.
#[derive(Clone, Debug, Default)]
pub struct ReadChunk {
    pub parts: Vec<Bytes>,
    pub end: u64,
}

/// One piece of a planned read: `len` bytes of record `record`, starting `skip` bytes into it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Piece {
    pub record: usize,
    pub skip: usize,
    pub len: usize,
}

/// Plans a read of `[from, until)` over `count` records ordered by position, where `span(i)`
/// gives record `i`'s start position and length. Shared by every backend so that the contract's
/// read rules (budget, at least one record, `split`, `Misaligned`) are implemented once.
pub fn plan_read(
    count: usize,
    span: impl Fn(usize) -> (u64, u64),
    log_start: u64,
    from: u64,
    until: u64,
    max_bytes: usize,
    split: bool,
) -> Result<(Vec<Piece>, u64), StorageError> {
    let mut pieces = Vec::new();
    let mut end = from;
    if from >= until {
        return Ok((pieces, end));
    }
    // First record that ends after `from` (binary search over the ordered records).
    let (mut lo, mut hi) = (0usize, count);
    while lo < hi {
        let mid = lo + (hi - lo) / 2;
        let (s, l) = span(mid);
        if s + l <= from {
            lo = mid + 1;
        } else {
            hi = mid;
        }
    }
    let mut budget = max_bytes;
    for i in lo..count {
        let (record_start, record_len) = span(i);
        let record_end = record_start + record_len;
        if record_start >= until {
            break;
        }
        let lo_pos = from.max(record_start);
        if lo_pos != record_start && !split {
            return Err(StorageError::Misaligned { pos: from });
        }
        let hi_pos = record_end.min(until);
        if hi_pos != record_end && !split {
            // `until` inside a record can only come from a client-made fork offset.
            return Err(StorageError::Misaligned { pos: until });
        }
        let mut len = (hi_pos - lo_pos) as usize;
        if !pieces.is_empty() || split {
            if budget == 0 {
                break;
            }
            if len > budget {
                if !split {
                    break;
                }
                len = budget;
            }
        }
        pieces.push(Piece {
            record: i,
            skip: (lo_pos - record_start) as usize,
            len,
        });
        end = lo_pos + len as u64;
        budget = budget.saturating_sub(len);
        if end < hi_pos {
            break;
        }
    }
    if pieces.is_empty() && from < log_start {
        return Err(StorageError::Misaligned { pos: from });
    }
    Ok((pieces, end))
}

/// A storage backend: creates and recovers per-stream logs.
pub trait Storage: Send + Sync + 'static {
    /// The mode's name, for logs.
    fn name(&self) -> &'static str;

    /// `(used, limit)` bytes of the RAM budget this backend keeps (`DS_LIMITS__MAX_MEMORY_BYTES`
    /// sizes the durable modes' record cache), for metrics; `None` where the streams' own bytes
    /// are the budget (memory).
    fn memory_budget(&self) -> Option<(u64, u64)> {
        None
    }

    /// Creates a stream's log holding `initial` records (positions from the fork anchor, or 0),
    /// closed at once when `close` is set. The log is usable immediately; the commit says when
    /// the creation is durable.
    fn create(
        &self,
        meta: &Arc<StreamMeta>,
        initial: Vec<Bytes>,
        close: Option<Option<ProducerTuple>>,
    ) -> Result<(Arc<dyn StreamLog>, Commit), StorageError>;

    /// Every stream stored, for start-up. Memory storage returns none.
    fn recover(&self) -> Result<Vec<Recovered>, StorageError>;

    /// Whether [`StreamLog::append`] and [`Storage::create`] copy the records they are given
    /// into storage of their own (memory packs small records into chunks). The stream layer
    /// then hands over the request's bytes as they are; otherwise it first copies them into an
    /// allocation of their own, so that a stored record never pins a connection's buffer.
    fn copies_appends(&self) -> bool {
        false
    }

    /// Whether [`Storage::write_records`] keeps records with this mode's promise. Memory
    /// storage keeps nothing (its records live in the owners' own maps, in RAM like its
    /// streams); a durable backend that does not implement records yet says `false` too, and
    /// the features that need records refuse to run on it rather than quietly keep RAM state.
    fn keeps_records(&self) -> bool {
        false
    }

    /// Writes small keyed records beside the streams (subscription state), all of `batch` or
    /// none of it, with the same promise as an append in this mode (`None` deletes the key).
    /// Writes complete in submission order.
    fn write_records(&self, _batch: Vec<RecordWrite>) -> Commit {
        done()
    }

    /// Every record stored, for start-up.
    fn recover_records(&self) -> Result<Vec<Record>, StorageError> {
        Ok(Vec::new())
    }
}

/// A stored record: key and value.
pub type Record = (Vec<u8>, Vec<u8>);

/// One write of [`Storage::write_records`]: set `key` to `value`, or delete it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct RecordWrite {
    pub key: Vec<u8>,
    pub value: Option<Vec<u8>>,
}

/// One stream's log.
pub trait StreamLog: Send + Sync + 'static {
    /// Submits an append; see the module contract.
    fn append(&self, entry: AppendEntry) -> Commit;

    /// Records that the stream is soft-deleted (deleted while forks still read from it).
    fn mark_soft_deleted(&self) -> Commit;

    /// Removes the stream's data for good.
    fn remove(&self) -> Commit;

    /// Notes the last access time for sliding TTLs. Backends may persist it lazily.
    fn touch(&self, _now_ms: u64) {}

    /// Releases the stream's data before `before`, a record boundary at or below the
    /// acknowledged tail (the retention decision is the stream layer's: every subscription
    /// linked to the stream acked past it and no fork pins it). Afterwards a read starting
    /// below `before` fails with [`StorageError::Released`] naming the retained start; once the
    /// returned commit resolves, a restart recovers `released >= before` with this mode's
    /// promise, and never shows released bytes again. Space is given back as the backend can
    /// (memory: at once; acid: rows deleted, pages reused; file modes: a segment is removed once
    /// nothing in it is live). Releasing at or below the current retained start does nothing.
    /// The default keeps the data (a backend that cannot release yet); the stream layer still
    /// refuses reads below the retained start it recorded.
    fn release(&self, _before: u64) -> Commit {
        done()
    }

    /// Reads `[from, until)`, see the module contract.
    fn read(
        &self,
        from: u64,
        until: u64,
        max_bytes: usize,
        split: bool,
    ) -> BoxFuture<'static, Result<ReadChunk, StorageError>>;
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The metadata's stored form is the one every layout version wrote (it was a derived
    /// `Serialize` of these fields), so directories written before read on, and back.
    #[test]
    fn stream_meta_is_stored_as_it_always_was() {
        let mut m = StreamMeta::new(3, "/a/b", "application/json", Some(60), 1_000);
        m.set_expires_at(Some(("2099-01-01T00:00:00Z".into(), 4_070_908_800_000)));
        m.set_fork(Some(ForkMeta {
            source_id: 2,
            source_path: "/a".into(),
            offset: 10,
            sub_offset: 1,
        }));
        let stored = r#"{"id":3,"path":"/a/b","content_type":"application/json","ttl_secs":60,"expires_at":["2099-01-01T00:00:00Z",4070908800000],"created_at_ms":1000,"fork":{"source_id":2,"source_path":"/a","offset":10,"sub_offset":1}}"#;
        assert_eq!(serde_json::to_string(&m).unwrap(), stored);
        let back: StreamMeta = serde_json::from_str(stored).unwrap();
        assert_eq!(back, m);
        // Recovered metadata shares the common content types like new metadata does.
        assert!(Arc::ptr_eq(
            &back.content_type,
            &shared_content_type("application/json")
        ));

        let plain = StreamMeta::new(4, "/c", "x/y", None, 5);
        let stored = r#"{"id":4,"path":"/c","content_type":"x/y","ttl_secs":null,"expires_at":null,"created_at_ms":5,"fork":null}"#;
        assert_eq!(serde_json::to_string(&plain).unwrap(), stored);
        assert_eq!(serde_json::from_str::<StreamMeta>(stored).unwrap(), plain);
        assert!(plain.fork().is_none() && plain.expires_at().is_none());

        // Setting one of the rare parts keeps the other; clearing both frees their box.
        m.set_fork(None);
        assert_eq!(m.expires_at().map(|e| e.1), Some(4_070_908_800_000));
        m.set_expires_at(None);
        assert!(m.extra.is_none());
    }

    /// Every stream's metadata is in RAM: with its `Arc`'s counters it fits jemalloc's 80-byte
    /// class (96 before the content type became a thin pointer and the rare parts one box).
    #[test]
    fn stream_meta_fits_an_80_byte_allocation() {
        assert!(std::mem::size_of::<StreamMeta>() + 16 <= 80);
    }
}
