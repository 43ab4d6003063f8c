//! Live reads: what long-poll and SSE readers wait on.
//!
//! Each stream carries a `tokio::sync::watch` of its [`Visible`] state. The watch carries only
//! "the tail moved" (never data): a reader subscribes, reads from storage from its *own* offset,
//! and when it has caught up waits for the next change. A slow reader therefore never misses
//! data, an append costs one notification however many readers wait, and a long-poll that times
//! out answers with the offset it was asked for, never a tail it did not deliver.

/// The part of a stream's state that readers may observe: only acknowledged data.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct Visible {
    /// Offset just past the last acknowledged byte.
    pub tail: u64,
    /// Closed, and the close is acknowledged.
    pub closed: bool,
    /// Deleted, expired or garbage-collected: readers should stop.
    pub gone: bool,
}
