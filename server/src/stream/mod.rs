//! The stream domain: every protocol rule about creating, appending to, closing, forking,
//! expiring and deleting streams, on top of the storage trait.
//!
//! It knows nothing of HTTP. It owns the in-memory view of every stream (configuration, writer
//! state, the visible tail that live readers watch) and decides; storage persists.
//!
//! Concurrency: the path registry is a sharded map; each stream has its own writer lock, held
//! only for validation and for *submitting* a commit, never across an await. Appends of one
//! stream are submitted in offset order and become visible (the `live` watch moves) once their
//! commit resolves, so readers only see acknowledged data. Create, delete, fork and expiry take
//! one `lifecycle` lock so fork reference counts and soft deletes stay consistent; appends and
//! reads never take it.

pub mod error;
pub mod json;
pub mod producer;

use std::collections::{HashMap, VecDeque};
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use dashmap::DashSet;
use ds_protocol::MediaKind;
use ds_protocol::content_type::same_media_type;
use futures::FutureExt;
use parking_lot::Mutex;
use tokio::sync::watch;

pub use error::StreamError;
use producer::{ProducerRequest, Verdict};

use crate::live::Visible;
use crate::storage::{
    AppendEntry, Commit, ForkMeta, ProducerState, ProducerTuple, Recovered, Storage, StreamId,
    StreamLog, StreamMeta,
};

/// Budgets the stream layer enforces.
#[derive(Clone, Copy, Debug)]
pub struct Limits {
    /// Bytes one stream may hold in its own log.
    pub max_stream_bytes: u64,
    /// Bytes all streams together may hold.
    pub max_total_bytes: u64,
    /// Largest read response, in bytes (a single larger record is still returned whole).
    pub max_read_bytes: usize,
    /// Streams clients may have (`DS_LIMITS__MAX_STREAMS`); the server's own streams (under
    /// [`RESERVED_PREFIX`]) are not counted.
    pub max_streams: usize,
    /// Idempotent-producer states all streams together may hold (`DS_LIMITS__MAX_PRODUCERS`).
    pub max_producers: u64,
    /// A producer with no accepted append for this long is forgotten, in milliseconds
    /// (`DS_LIMITS__PRODUCER_IDLE_TIMEOUT`); 0 never forgets.
    pub producer_idle_ms: u64,
}

impl Default for Limits {
    /// No limits (tests and tools); the server sets every one from its configuration.
    fn default() -> Self {
        Limits {
            max_stream_bytes: u64::MAX,
            max_total_bytes: u64::MAX,
            max_read_bytes: usize::MAX,
            max_streams: usize::MAX,
            max_producers: u64::MAX,
            producer_idle_ms: 0,
        }
    }
}

/// When a stream's acknowledged prefix is released (`DS_RETENTION__*`, README *Retention*).
#[derive(Clone, Copy, Debug, Default)]
pub struct Retention {
    /// `acked` mode: subscriptions' acks release data; `false` keeps everything (`keep`).
    pub acked: bool,
    /// How long data stays after it was acked by every subscription (`DS_RETENTION__MIN_AGE`).
    pub min_age_ms: u64,
}

/// The retention task runs a pass at most this often, so a stream's log is asked to release at
/// most once per this many milliseconds.
pub const RELEASE_INTERVAL_MS: u64 = 100;

/// How often a read from the start follows the earliest offset forward (each time, a release
/// landed while it read; the retention task releases a stream at most every
/// [`RELEASE_INTERVAL_MS`]).
const MAX_EARLIEST_RETRIES: u32 = 8;

/// Release candidates one stream keeps while they age (`DS_RETENTION__MIN_AGE`); past it the
/// newest one absorbs later acks (released a little later, never earlier).
const MAX_RELEASE_CANDIDATES: usize = 256;

/// Paths under this prefix belong to the server: clients may read them, never write.
pub const RESERVED_PREFIX: &str = "/_ds/";

/// A path segment that marks the control routes of the stream root before it (subscriptions,
/// see `server/SUBSCRIPTIONS.md`): no stream may have it.
pub const CONTROL_SEGMENT: &str = "__ds";

fn is_reserved(path: &str) -> bool {
    path.starts_with(RESERVED_PREFIX)
        || (may_hold_control_segment(path) && path.split('/').any(|seg| seg == CONTROL_SEGMENT))
}

/// False when `path` cannot contain [`CONTROL_SEGMENT`] (`__ds`): a scan for `_` without an
/// early exit (so the compiler vectorises it; memchr's set-up costs more on paths this short)
/// instead of splitting every append's path into segments (most paths hold no `_` at all).
pub fn may_hold_control_segment(path: &str) -> bool {
    let bytes = path.as_bytes();
    bytes.iter().fold(false, |seen, &b| seen | (b == b'_'))
        && bytes
            .windows(CONTROL_SEGMENT.len())
            .any(|w| w == CONTROL_SEGMENT.as_bytes())
}

/// Told about stream lifecycles, for subscriptions. Every call must return at once (it runs on
/// the append path and under the lifecycle lock): implementations queue, they do not work.
pub trait StreamEvents: Send + Sync + 'static {
    /// A stream was created; its initial data (if any) is not visible yet.
    fn created(&self, stream: &Stream);
    /// The stream's visible tail moved (or it was closed).
    fn revealed(&self, stream: &Stream);
    /// The stream is gone for good (deleted, expired or collected).
    fn removed(&self, stream: &Stream);
}

/// The [`StreamEvents`] of a server behind a thin pointer: every stream holds one, and a
/// `dyn` pointer would be twice the size.
struct Events(Arc<dyn StreamEvents>);

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// A request to create a stream (PUT), headers already parsed by the HTTP layer.
#[derive(Clone, Debug, Default)]
pub struct CreateRequest {
    pub content_type: Option<String>,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<(String, i64)>,
    pub closed: bool,
    pub fork: Option<ForkRequest>,
    pub body: Bytes,
}

/// The fork part of a PUT.
#[derive(Clone, Debug, Default)]
pub struct ForkRequest {
    pub source: String,
    pub offset: Option<u64>,
    pub sub_offset: u64,
}

/// What a PUT did.
#[derive(Clone, Debug)]
pub struct CreateOutcome {
    /// The stream instance's id (`Stream-Id`).
    pub id: u64,
    pub created: bool,
    pub content_type: String,
    pub next_offset: u64,
    pub closed: bool,
}

/// A request to append (POST), headers already parsed.
#[derive(Clone, Debug, Default)]
pub struct AppendRequest {
    pub content_type: Option<String>,
    pub body: Bytes,
    pub close: bool,
    pub stream_seq: Option<String>,
    pub producer: Option<ProducerRequest>,
}

/// What a POST did.
#[derive(Clone, Debug)]
pub struct AppendOutcome {
    pub next_offset: u64,
    pub closed: bool,
    /// New data was stored (a producer append answers 200 then, 204 otherwise).
    pub stored_data: bool,
    /// Producer headers to echo: epoch and highest accepted sequence.
    pub producer: Option<(u64, u64)>,
}

/// What HEAD reports.
#[derive(Clone, Debug)]
pub struct Metadata {
    /// The stream instance's id (`Stream-Id`).
    pub id: u64,
    pub content_type: String,
    pub next_offset: u64,
    pub ttl_secs: Option<u64>,
    pub expires_at: Option<String>,
    pub closed: bool,
    /// The earliest retained offset (0: nothing was released).
    pub earliest: u64,
}

/// A read's result.
#[derive(Clone, Debug)]
pub struct ReadOutcome {
    /// Record pieces; for JSON streams each piece is one or more comma-joined messages.
    pub parts: Vec<Bytes>,
    /// Where the read started (after resolving `-1`/`now`/beyond-tail).
    pub start: u64,
    /// The offset after the last byte returned.
    pub next: u64,
    /// The visible state the read was bounded by.
    pub visible: Visible,
}

impl ReadOutcome {
    pub fn is_empty(&self) -> bool {
        self.parts.is_empty()
    }

    /// The reader has everything the stream held when the read was made.
    pub fn up_to_date(&self) -> bool {
        self.next >= self.visible.tail
    }

    /// The stream is closed and the reader has reached its final offset.
    pub fn at_end(&self) -> bool {
        self.visible.closed && self.up_to_date()
    }
}

/// Writer-side state of one stream, behind its lock.
#[derive(Debug, Default)]
struct WriterState {
    /// Tail including submitted-but-uncommitted appends.
    tail: u64,
    closed: bool,
    /// What few streams have (a closing producer, a `Stream-Seq`, forks), boxed together and
    /// made when first needed: every stream's state is in RAM.
    rare: Option<Box<Rare>>,
    producers: Producers,
    /// Live forks reading from this stream.
    refcount: u32,
    soft_deleted: bool,
    /// Gone from the registry (deleted, expired or garbage-collected).
    removed: bool,
    /// Bytes in this stream's own log (retained bytes: released ones no longer count).
    own_bytes: u64,
    /// A commit failed; the in-memory state may be ahead of storage.
    poisoned: bool,
}

/// The part of a stream's writer state most streams never use.
#[derive(Debug, Default)]
struct Rare {
    /// The producer whose append closed the stream, if one did.
    closed_by: Option<ProducerTuple>,
    /// The last `Stream-Seq` accepted.
    last_seq: Option<Box<str>>,
    /// What each live fork reading from this stream still references (by fork id): from the
    /// fork's own earliest retained offset up to its anchor, so the lower of the two. The stream
    /// never releases past the lowest (a fork reads its data before its anchor from here).
    fork_pins: Vec<(StreamId, u64)>,
    /// Offsets every subscription acked, waiting to be released (retention); made by the
    /// first ack.
    release: Option<Box<ReleaseQueue>>,
}

impl WriterState {
    fn rare(&mut self) -> &mut Rare {
        self.rare.get_or_insert_default()
    }

    fn closed_by(&self) -> Option<&ProducerTuple> {
        self.rare.as_ref()?.closed_by.as_ref()
    }

    fn last_seq(&self) -> Option<&str> {
        self.rare.as_ref()?.last_seq.as_deref()
    }

    fn fork_pins(&self) -> &[(StreamId, u64)] {
        self.rare.as_ref().map_or(&[], |r| &r.fork_pins)
    }

    fn release_queue(&self) -> Option<&ReleaseQueue> {
        self.rare.as_ref()?.release.as_deref()
    }
}

/// A stream's idempotent-producer states, keyed by `Producer-Id` as a boxed `str` (16 bytes,
/// not a `String`'s 24: a million producers are a million entries). The map itself is boxed
/// and made by the first producer: most streams have none, and an empty map is 48 bytes.
#[derive(Debug, Default)]
// Boxed on purpose: `Option<Box<_>>` is 8 bytes in every stream, a map 48.
#[allow(clippy::box_collection)]
struct Producers(Option<Box<HashMap<Box<str>, ProducerState>>>);

impl Producers {
    fn get(&self, id: &str) -> Option<&ProducerState> {
        self.0.as_ref()?.get(id)
    }

    fn contains_key(&self, id: &str) -> bool {
        self.get(id).is_some()
    }

    fn insert(&mut self, id: Box<str>, state: ProducerState) {
        self.0.get_or_insert_with(Box::default).insert(id, state);
    }

    fn remove(&mut self, id: &str) {
        if let Some(map) = &mut self.0 {
            map.remove(id);
            if map.is_empty() {
                self.0 = None;
            }
        }
    }

    fn retain(&mut self, keep: impl FnMut(&Box<str>, &mut ProducerState) -> bool) {
        if let Some(map) = &mut self.0 {
            map.retain(keep);
            if map.is_empty() {
                self.0 = None;
            } else if map.len() * 4 < map.capacity() {
                map.shrink_to_fit();
            }
        }
    }

    fn len(&self) -> usize {
        self.0.as_ref().map_or(0, |m| m.len())
    }

    fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

impl FromIterator<(Box<str>, ProducerState)> for Producers {
    fn from_iter<I: IntoIterator<Item = (Box<str>, ProducerState)>>(iter: I) -> Self {
        let map: HashMap<Box<str>, ProducerState> = iter.into_iter().collect();
        Producers((!map.is_empty()).then(|| Box::new(map)))
    }
}

/// One stream instance.
pub struct Stream {
    /// Shared with the stream's log (one copy per stream, not one per layer).
    pub meta: Arc<StreamMeta>,
    pub kind: MediaKind,
    /// The source stream, for forks; kept alive for reads that stitch inherited data.
    source: Option<Arc<Stream>>,
    state: Mutex<WriterState>,
    /// The acknowledged tail that readers may see; live readers wait on its watch.
    visible: Mutex<VisibleCell>,
    /// For sliding TTLs.
    last_access_ms: AtomicU64,
    log: Arc<dyn StreamLog>,
    /// Told when the visible tail moves (subscriptions), if anyone listens.
    events: Option<Arc<Events>>,
    /// The earliest retained offset: reads below it get `Released` (0: nothing released).
    /// Moves only once the storage made the release durable.
    retained: AtomicU64,
}

/// A stream's acked offsets on their way to being released.
#[derive(Debug, Default)]
struct ReleaseQueue {
    /// `(offset, acked at ms)`, offsets increasing.
    candidates: VecDeque<(u64, u64)>,
    /// The highest offset ever offered (re-offered when a fork that pinned it goes away).
    acked: u64,
    /// The start a release in progress moves `retained` to: forks are refused below it at
    /// once (they would pin data on its way out), readers only once it is durable.
    releasing: u64,
}

/// A stream's visible state and the watch live readers wait on. The watch (about 500 bytes of
/// RAM) exists only while someone watches: it is made by the first `subscribe` and dropped by
/// the first change after its last receiver went, so an idle stream holds only the state.
struct VisibleCell {
    now: Visible,
    /// Boxed, made by the first live reader and dropped with the last: an idle stream has none.
    live: Option<Box<LiveCell>>,
}

/// What a stream holds only while it has live readers.
struct LiveCell {
    watch: Option<watch::Sender<Visible>>,
    /// The newest live read, encoded once and shared by every live reader at the same offset,
    /// so an append's cost does not grow with the number of readers. Dropped by the next
    /// change of the visible state (no reader can ask for it after that).
    shared_read: Option<SharedRead>,
}

impl VisibleCell {
    fn new(now: Visible) -> Mutex<VisibleCell> {
        Mutex::new(VisibleCell { now, live: None })
    }

    fn live(&mut self) -> &mut LiveCell {
        self.live.get_or_insert_with(|| {
            Box::new(LiveCell {
                watch: None,
                shared_read: None,
            })
        })
    }

    fn watch(&self) -> Option<&watch::Sender<Visible>> {
        self.live.as_ref()?.watch.as_ref()
    }
}

/// A read already encoded for the wire (the HTTP layer decides the encoding).
#[derive(Clone, Debug)]
pub struct SharedRead {
    /// The offset the read started at and the visible state it was bounded by.
    pub start: u64,
    pub visible: Visible,
    /// The offset after the read, and whether it reached the (closed) end.
    pub next: u64,
    pub up_to_date: bool,
    pub at_end: bool,
    /// The encoded bytes: the data event (the first `data_len` bytes), then a control event
    /// whose cursor is `cursor`, the interval current when it was encoded (what a reader
    /// without a cursor of its own is given), or that has none once the stream is closed.
    pub encoded: Bytes,
    pub data_len: usize,
    pub cursor: u64,
}

impl Stream {
    /// The shared encoding of the read from `start` bounded by `visible`, if one was made.
    pub fn shared_read(&self, start: u64, visible: Visible) -> Option<SharedRead> {
        self.visible
            .lock()
            .live
            .as_ref()?
            .shared_read
            .as_ref()
            .filter(|r| r.start == start && r.visible == visible)
            .cloned()
    }

    /// Offers an encoded read for other readers at the same offset.
    pub fn share_read(&self, read: SharedRead) {
        let mut cell = self.visible.lock();
        // A read of a state that has changed since is of no use to anyone.
        if cell.now == read.visible {
            cell.live().shared_read = Some(read);
        }
    }
}

impl std::fmt::Debug for Stream {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Stream").field("meta", &self.meta).finish()
    }
}

impl Stream {
    /// The current visible state.
    pub fn visible(&self) -> Visible {
        self.visible.lock().now
    }

    /// Subscribes to changes of the visible state (appends, close, removal).
    pub fn subscribe(&self) -> watch::Receiver<Visible> {
        let mut cell = self.visible.lock();
        let now = cell.now;
        cell.live()
            .watch
            .get_or_insert_with(|| watch::Sender::new(now))
            .subscribe()
    }

    /// How many live readers (long-poll, SSE, duplicate waiters) are watching this stream.
    pub fn live_readers(&self) -> usize {
        self.visible
            .lock()
            .watch()
            .map_or(0, watch::Sender::receiver_count)
    }

    /// Whether a storage failure made this stream refuse writes until a restart.
    pub fn is_poisoned(&self) -> bool {
        self.state.lock().poisoned
    }

    /// The offset where this stream's own data starts (the fork anchor, or 0).
    pub fn own_start(&self) -> u64 {
        self.meta.fork().map_or(0, |f| f.offset)
    }

    /// Where a release in progress moves the retained start (0: none started).
    fn releasing(&self) -> u64 {
        self.state.lock().release_queue().map_or(0, |q| q.releasing)
    }

    /// The highest offset every subscription acked (0: none yet).
    fn acked(&self) -> u64 {
        self.state.lock().release_queue().map_or(0, |q| q.acked)
    }

    /// The earliest offset still readable: data before it was released (0: none was).
    pub fn earliest(&self) -> u64 {
        self.retained.load(Ordering::Acquire)
    }

    fn new_stream(
        meta: Arc<StreamMeta>,
        source: Option<Arc<Stream>>,
        state: WriterState,
        visible: Visible,
        last_access_ms: u64,
        log: Arc<dyn StreamLog>,
        events: Option<Arc<Events>>,
    ) -> Stream {
        Stream {
            kind: MediaKind::of(&meta.content_type),
            source,
            state: Mutex::new(state),
            visible: VisibleCell::new(visible),
            last_access_ms: AtomicU64::new(last_access_ms),
            events,
            log,
            meta,
            retained: AtomicU64::new(0),
        }
    }

    /// Notes a live fork that references this stream's data from `from` (the lifecycle lock
    /// is held, or the fork's earliest moved).
    fn pin(&self, fork: StreamId, from: u64) {
        let mut st = self.state.lock();
        let pins = &mut st.rare().fork_pins;
        match pins.iter_mut().find(|p| p.0 == fork) {
            Some(pin) => pin.1 = from,
            None => {
                pins.push((fork, from));
                st.refcount += 1;
            }
        }
    }

    /// Refuses a fork anchored below the retained start, or below a release in progress.
    fn check_retained(&self, offset: u64) -> Result<(), StreamError> {
        let earliest = self.earliest().max(self.releasing());
        if offset < earliest {
            return Err(StreamError::Released {
                offset: ds_protocol::Offset::at(offset).to_string(),
                earliest,
            });
        }
        Ok(())
    }

    fn touch(&self, now: u64) {
        // Many requests share a millisecond: a store would take the cache line from the other
        // cores on every one of them, a load leaves it shared.
        if self.last_access_ms.load(Ordering::Relaxed) == now {
            return;
        }
        self.last_access_ms.store(now, Ordering::Relaxed);
        self.log.touch(now);
    }

    fn expired_at(&self, now: u64) -> bool {
        if let Some(e) = self.meta.expires_at()
            && (now as i128) >= (e.1 as i128)
        {
            return true;
        }
        if let Some(ttl) = self.meta.ttl_secs {
            let last = self.last_access_ms.load(Ordering::Relaxed);
            if now >= last.saturating_add(ttl.saturating_mul(1000)) {
                return true;
            }
        }
        false
    }

    fn publish(&self, f: impl FnOnce(&mut Visible) -> bool) {
        let mut cell = self.visible.lock();
        if !f(&mut cell.now) {
            return;
        }
        let now = cell.now;
        let Some(live) = &mut cell.live else {
            return;
        };
        live.shared_read = None;
        // A receiver can only be made under this lock, so none appears while the watch goes.
        match &live.watch {
            Some(w) if w.receiver_count() > 0 => {
                w.send_replace(now);
            }
            _ => cell.live = None,
        }
    }

    /// Makes everything up to `tail` (and the closed flag) visible once committed. Appends of one
    /// stream commit in order, so moving the tail forward monotonically is correct.
    fn reveal(&self, tail: u64, closed: bool) {
        let mut moved = false;
        self.publish(|v| {
            let mut changed = false;
            if tail > v.tail {
                v.tail = tail;
                changed = true;
            }
            if closed && !v.closed {
                v.closed = true;
                changed = true;
            }
            moved = changed;
            changed
        });
        if moved && let Some(events) = &self.events {
            events.0.revealed(self);
        }
    }
}

/// A registry entry: a stream, hashed and compared by its path.
#[derive(Clone)]
struct ByPath(Arc<Stream>);

impl std::borrow::Borrow<str> for ByPath {
    fn borrow(&self) -> &str {
        &self.0.meta.path
    }
}

impl std::hash::Hash for ByPath {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // As `str` hashes, so that lookups by `&str` find it (`Borrow`'s contract).
        str::hash(&self.0.meta.path, state);
    }
}

impl PartialEq for ByPath {
    fn eq(&self, other: &Self) -> bool {
        self.0.meta.path == other.0.meta.path
    }
}

impl Eq for ByPath {}

/// All streams of the server.
pub struct Streams {
    /// Every stream, found by its own path (`meta.path`): an entry is one pointer, and the
    /// path is not copied.
    registry: DashSet<ByPath>,
    /// Serialises create/delete/fork/expiry so reference counts and soft deletes stay exact.
    lifecycle: Mutex<()>,
    storage: Arc<dyn Storage>,
    limits: Limits,
    /// Bytes held by all logs together, for `max_total_bytes`.
    total_bytes: AtomicU64,
    /// Producer states held by all streams together, for `max_producers`.
    producers: AtomicU64,
    /// When the sweeper next looks for idle producers (Unix ms).
    next_producer_sweep_ms: AtomicU64,
    next_id: AtomicU64,
    /// The registry stream announcing creates and deletes (discovery for followers such as
    /// ds-sync), if enabled.
    registry_path: Option<String>,
    /// Told about creates, reveals and removals (subscriptions).
    events: Option<Arc<Events>>,
    retention: Retention,
    /// Streams with release candidates, for the retention task.
    releasing: Mutex<HashMap<StreamId, Arc<Stream>>>,
    /// Wakes the retention task when a candidate arrives.
    release_wake: tokio::sync::Notify,
    /// For metrics: bytes released, and appends refused with backpressure.
    released_bytes: AtomicU64,
    backpressured: AtomicU64,
}

/// Retention counters since start (for metrics).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct RetentionCounters {
    /// Bytes released from streams' logs (acked by every subscriber).
    pub released_bytes: u64,
    /// Appends answered with backpressure (503) because the memory budget was full.
    pub backpressured: u64,
}

impl std::fmt::Debug for Streams {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Streams")
            .field("streams", &self.registry.len())
            .field("storage", &self.storage.name())
            .finish()
    }
}

/// Whether a producer last used at `p.last_ms` is idle past `idle_ms` at `now`.
fn producer_idle(p: &ProducerState, now: u64, idle_ms: u64) -> bool {
    now >= p.last_ms.saturating_add(idle_ms)
}

fn poisoned_guard(state: &WriterState) -> Result<(), StreamError> {
    if state.poisoned {
        Err(StreamError::Poisoned)
    } else {
        Ok(())
    }
}

impl Streams {
    /// Loads every stored stream and returns the registry.
    pub fn open(storage: Arc<dyn Storage>, limits: Limits) -> Result<Self, StreamError> {
        Self::open_with_registry(storage, limits, None)
    }

    /// Like [`Streams::open`], announcing stream creates and deletes on the JSON stream at
    /// `registry` (which must be under [`RESERVED_PREFIX`]). Call [`Streams::ensure_registry`]
    /// before serving.
    pub fn open_with_registry(
        storage: Arc<dyn Storage>,
        limits: Limits,
        registry: Option<String>,
    ) -> Result<Self, StreamError> {
        Self::open_observed(storage, limits, registry, None)
    }

    /// Like [`Streams::open_with_registry`], telling `events` about every stream's lifecycle.
    pub fn open_observed(
        storage: Arc<dyn Storage>,
        limits: Limits,
        registry: Option<String>,
        events: Option<Arc<dyn StreamEvents>>,
    ) -> Result<Self, StreamError> {
        let recovered = storage.recover()?;
        let streams = Streams {
            events: events.map(|e| Arc::new(Events(e))),
            registry_path: registry,
            retention: Retention::default(),
            releasing: Mutex::new(HashMap::new()),
            release_wake: tokio::sync::Notify::new(),
            released_bytes: AtomicU64::new(0),
            backpressured: AtomicU64::new(0),
            registry: DashSet::new(),
            lifecycle: Mutex::new(()),
            storage,
            limits,
            total_bytes: AtomicU64::new(0),
            producers: AtomicU64::new(0),
            next_producer_sweep_ms: AtomicU64::new(0),
            next_id: AtomicU64::new(1),
        };
        streams.install_recovered(recovered);
        Ok(streams)
    }

    fn install_recovered(&self, mut recovered: Vec<Recovered>) {
        // Sources before forks: a fork's source always has a smaller id.
        recovered.sort_by_key(|r| r.meta.id);
        let mut by_id: HashMap<StreamId, Arc<Stream>> = HashMap::new();
        let mut max_id = 0;
        let now = now_ms();
        for mut r in recovered {
            self.recover_producers(&mut r.state.producers, now);
            max_id = max_id.max(r.meta.id);
            let source = r.meta.fork().and_then(|f| by_id.get(&f.source_id).cloned());
            if let (Some(src), Some(fork)) = (&source, r.meta.fork()) {
                let from = if r.state.released > fork.offset {
                    fork.offset
                } else {
                    0
                };
                src.pin(r.meta.id, from);
            }
            let s = &r.state;
            if !self.is_registry(&r.meta.path) {
                self.total_bytes.fetch_add(s.own_bytes, Ordering::Relaxed);
            }
            let own_start = r.meta.fork().map_or(0, |f| f.offset);
            // A fork's log starts at its anchor: a retained start there means none released.
            let retained = if s.released > own_start {
                s.released
            } else {
                0
            };
            let last_access = s.last_access_ms.max(r.meta.created_at_ms);
            let stream = Arc::new(Stream::new_stream(
                r.meta,
                source,
                WriterState {
                    tail: s.tail,
                    closed: s.closed,
                    rare: (s.closed_by.is_some() || s.last_seq.is_some()).then(|| {
                        Box::new(Rare {
                            closed_by: s.closed_by.clone(),
                            last_seq: s.last_seq.as_deref().map(Into::into),
                            fork_pins: Vec::new(),
                            release: None,
                        })
                    }),
                    producers: s
                        .producers
                        .iter()
                        .map(|(k, v)| (k.as_str().into(), *v))
                        .collect(),
                    soft_deleted: s.soft_deleted,
                    own_bytes: s.own_bytes,
                    ..WriterState::default()
                },
                Visible {
                    tail: s.tail,
                    closed: s.closed,
                    gone: false,
                },
                last_access,
                r.log,
                self.events.clone(),
            ));
            stream.retained.store(retained, Ordering::Release);
            by_id.insert(stream.meta.id, stream.clone());
            self.register(stream);
        }
        // Ids must never repeat, even across restarts of the memory store or after the highest
        // id was removed: ETags carry the id, and a reused id could answer 304 for other data.
        // Seeding from the clock (ms << 20 leaves room for a million creates per ms of uptime)
        // covers both; the recovered maximum covers a clock that went backwards.
        let seed = now_ms() << 20;
        self.next_id
            .store((max_id + 1).max(seed), Ordering::Relaxed);
    }

    /// Keeps the recovered producers that are not idle past the limit, counting them. A producer
    /// whose time is unknown (stored by an older build) counts as used now: a restart may keep
    /// a producer longer than the idle timeout, never forget one sooner (forgetting too soon
    /// could re-admit a retried append as new data).
    fn recover_producers(&self, producers: &mut HashMap<String, ProducerState>, now: u64) {
        let idle = self.limits.producer_idle_ms;
        for p in producers.values_mut() {
            if p.last_ms == 0 {
                p.last_ms = now;
            }
        }
        if idle > 0 {
            producers.retain(|_, p| !producer_idle(p, now, idle));
            producers.shrink_to_fit();
        }
        self.producers
            .fetch_add(producers.len() as u64, Ordering::Relaxed);
    }

    /// Producer states held by all streams together.
    pub fn producer_count(&self) -> u64 {
        self.producers.load(Ordering::Relaxed)
    }

    /// The state of producer `id` on a stream, forgetting it first if it has been idle past the
    /// limit (it is then treated as new, as spec 5.2.1 "Producer State Cleanup" allows).
    fn producer_state(&self, st: &mut WriterState, id: &str, now: u64) -> Option<ProducerState> {
        let idle = self.limits.producer_idle_ms;
        let state = st.producers.get(id).copied()?;
        if idle > 0 && producer_idle(&state, now, idle) {
            st.producers.remove(id);
            self.producers.fetch_sub(1, Ordering::Relaxed);
            return None;
        }
        Some(state)
    }

    /// Takes a slot for a new producer state, refusing past `max_producers`.
    fn reserve_producer(&self) -> Result<(), StreamError> {
        let limit = self.limits.max_producers;
        self.producers
            .fetch_update(Ordering::Relaxed, Ordering::Relaxed, |n| {
                (n < limit).then_some(n + 1)
            })
            .map(|_| ())
            .map_err(|used| StreamError::ProducersFull { used, limit })
    }

    /// Forgets every producer idle past the limit, in every stream; returns how many. The
    /// sweeper calls it (through [`Streams::sweep_expired`]) at most every eighth of the idle
    /// timeout, so that producers of streams nobody touches go too.
    pub fn sweep_idle_producers(&self, now: u64) -> u64 {
        let idle = self.limits.producer_idle_ms;
        if idle == 0 {
            return 0;
        }
        let mut forgotten = 0u64;
        for e in self.registry.iter() {
            let mut st = e.key().0.state.lock();
            if st.producers.is_empty() {
                continue;
            }
            let before = st.producers.len();
            st.producers.retain(|_, p| !producer_idle(p, now, idle));
            forgotten += (before - st.producers.len()) as u64;
        }
        if forgotten > 0 {
            self.producers.fetch_sub(forgotten, Ordering::Relaxed);
        }
        forgotten
    }

    /// Creates the registry stream if it does not exist yet and starts the task that appends
    /// announcements to it.
    pub async fn ensure_registry(self: &Arc<Self>) -> Result<(), StreamError> {
        let Some(path) = self.registry_path.clone() else {
            return Ok(());
        };
        if !self.registry.contains(path.as_str()) {
            self.create_any(
                &path,
                CreateRequest {
                    content_type: Some("application/json".into()),
                    ..CreateRequest::default()
                },
            )
            .await?;
        }
        Ok(())
    }

    /// Sets the retention rules (before the streams are shared).
    pub fn set_retention(&mut self, retention: Retention) {
        self.retention = retention;
    }

    /// Adds `stream` to the registry. Callers hold the lifecycle lock and have removed any
    /// stream at the path first; were one still there, the new one replaces it.
    fn register(&self, stream: Arc<Stream>) {
        if self.registry.remove(&*stream.meta.path).is_some() {
            tracing::error!(stream = %stream.meta.path, "a stream replaced one still registered");
        }
        self.registry.insert(ByPath(stream));
    }

    fn is_registry(&self, path: &str) -> bool {
        self.registry_path.as_deref() == Some(path)
    }

    /// Appends an event to the registry stream, with the lifecycle lock held so the registry
    /// has creates and deletes in their real order. Submitted before the operation it describes
    /// is answered; an event that cannot be recorded fails that operation (nothing is dropped).
    /// The registry is bookkeeping: it is outside the memory budget; in `acked` mode it is held
    /// to `max_stream_bytes` and released by the acks of the subscriptions linking it.
    fn announce(
        &self,
        event: &'static str,
        path: &str,
        id: StreamId,
        content_type: Option<&str>,
    ) -> Result<Option<Pending>, StreamError> {
        if is_reserved(path) {
            return Ok(None);
        }
        let Some(registry) = self.registry_path.as_deref().and_then(|p| self.peek(p)) else {
            return Ok(None);
        };
        // `id` tells one life of a path from the next (the same value as the `Stream-Id` header).
        let mut body = serde_json::json!({"event": event, "path": path, "id": id.to_string()});
        if let Some(ct) = content_type {
            body["contentType"] = serde_json::Value::from(ct);
        }
        let data = Bytes::from(body.to_string());
        let size = data.len() as u64;
        let unavailable = |why: String| StreamError::RegistryUnavailable { event, why };
        let mut st = registry.state.lock();
        if st.poisoned {
            return Err(unavailable("it failed to store an earlier event".into()));
        }
        if self.retention.acked && st.own_bytes + size > self.limits.max_stream_bytes {
            return Err(unavailable(format!(
                "it holds {} bytes, DS_LIMITS__MAX_STREAM_BYTES ({}), of events the subscriptions \
                 linking {} have not acknowledged",
                st.own_bytes, self.limits.max_stream_bytes, registry.meta.path
            )));
        }
        let start = st.tail;
        st.tail += size;
        st.own_bytes += size;
        let commit = registry.log.append(AppendEntry {
            start,
            data: Some(data),
            ..AppendEntry::default()
        });
        let tail = st.tail;
        drop(st);
        Ok(Some(Pending {
            stream: registry,
            commit,
            tail,
        }))
    }

    /// Every stream in the registry, without expiring or touching any (subscription backfill).
    pub fn all(&self) -> Vec<Arc<Stream>> {
        self.registry.iter().map(|e| e.key().0.clone()).collect()
    }

    /// The stream at `path`, if one is registered, without expiring or touching it.
    pub fn peek(&self, path: &str) -> Option<Arc<Stream>> {
        self.registry.get(path).map(|e| e.key().0.clone())
    }

    /// Number of streams in the registry (including soft-deleted ones).
    pub fn len(&self) -> usize {
        self.registry.len()
    }

    pub fn is_empty(&self) -> bool {
        self.registry.is_empty()
    }

    /// Retention counters since start.
    pub fn retention_counters(&self) -> RetentionCounters {
        RetentionCounters {
            released_bytes: self.released_bytes.load(Ordering::Relaxed),
            backpressured: self.backpressured.load(Ordering::Relaxed),
        }
    }

    /// Bytes held across all streams.
    pub fn total_bytes(&self) -> u64 {
        self.total_bytes.load(Ordering::Relaxed)
    }

    /// Looks a stream up for a read (GET) or an append: absent, expired → `NotFound`;
    /// soft-deleted → `SoftDeleted`. `touch` slides the TTL window.
    pub fn get(&self, path: &str, touch: bool) -> Result<Arc<Stream>, StreamError> {
        self.get_at(path, touch).map(|(stream, _)| stream)
    }

    /// [`Streams::get`], and the time it was checked at (Unix ms): one clock read serves the
    /// caller too (a read of the clock costs about as much as a small append's parsing).
    fn get_at(&self, path: &str, touch: bool) -> Result<(Arc<Stream>, u64), StreamError> {
        let stream = self.peek(path).ok_or(StreamError::NotFound)?;
        let now = now_ms();
        if stream.state.lock().soft_deleted {
            return Err(StreamError::SoftDeleted);
        }
        if stream.expired_at(now) {
            self.expire(&stream);
            return Err(StreamError::NotFound);
        }
        if touch {
            stream.touch(now);
        }
        Ok((stream, now))
    }

    /// HEAD: metadata without sliding the TTL.
    pub fn head(&self, path: &str) -> Result<Metadata, StreamError> {
        let stream = self.get(path, false)?;
        let v = stream.visible();
        Ok(Metadata {
            earliest: stream.earliest(),
            id: stream.meta.id,
            content_type: stream.meta.content_type.to_string(),
            next_offset: v.tail,
            ttl_secs: stream.meta.ttl_secs,
            expires_at: stream.meta.expires_at().map(|e| e.0.clone()),
            closed: v.closed,
        })
    }

    /// PUT: create, or confirm an identical existing stream.
    pub async fn create(
        &self,
        path: &str,
        req: CreateRequest,
    ) -> Result<CreateOutcome, StreamError> {
        if is_reserved(path) {
            return Err(StreamError::ReservedPath);
        }
        self.create_any(path, req).await
    }

    async fn create_any(
        &self,
        path: &str,
        req: CreateRequest,
    ) -> Result<CreateOutcome, StreamError> {
        let prefix = match &req.fork {
            Some(fork) => self.fork_prefix(fork).await?,
            None => None,
        };
        let (stream, commit, tail, closed, announced) =
            match self.create_locked(path, &req, prefix)? {
                Created::Existing(outcome) => return Ok(outcome),
                Created::New {
                    stream,
                    commit,
                    tail,
                    closed,
                    announced,
                } => (stream, commit, tail, closed, announced),
            };
        let created = settle(stream.clone(), commit, tail, closed).await;
        if let Some(p) = announced {
            p.settle().await?;
        }
        created?;
        Ok(CreateOutcome {
            id: stream.meta.id,
            created: true,
            content_type: stream.meta.content_type.to_string(),
            next_offset: tail,
            closed,
        })
    }

    fn create_locked(
        &self,
        path: &str,
        req: &CreateRequest,
        prefix: Option<Bytes>,
    ) -> Result<Created, StreamError> {
        let _guard = self.lifecycle.lock();
        let now = now_ms();

        if let Some(existing) = self.peek(path) {
            let soft_deleted = existing.state.lock().soft_deleted;
            if soft_deleted {
                return Err(StreamError::PathHeldBySoftDeleted);
            }
            if existing.expired_at(now) {
                spawn_commits(self.expire_locked(&existing)?, "expiry");
                if existing.state.lock().soft_deleted {
                    return Err(StreamError::PathHeldBySoftDeleted);
                }
            } else {
                return self.confirm_existing(&existing, req).map(Created::Existing);
            }
        }

        if let Some((raw, at)) = &req.expires_at
            && (*at as i128) <= (now as i128)
        {
            return Err(StreamError::AlreadyExpired(raw.clone()));
        }
        if !is_reserved(path) {
            // Exact: creates and removals both hold the lifecycle lock.
            let own = self
                .registry_path
                .as_deref()
                .is_some_and(|r| self.registry.contains(r));
            let streams = self.registry.len() - usize::from(own);
            if streams >= self.limits.max_streams {
                return Err(StreamError::StreamsFull {
                    limit: self.limits.max_streams,
                });
            }
        }
        let (source, fork_meta, content_type) = match &req.fork {
            None => (
                None,
                None,
                req.content_type
                    .clone()
                    .unwrap_or_else(|| ds_protocol::content_type::DEFAULT_CONTENT_TYPE.into()),
            ),
            Some(fork) => {
                let src = self.fork_source(&fork.source, now)?;
                let ct = match &req.content_type {
                    Some(ct) if !same_media_type(ct, &src.meta.content_type) => {
                        return Err(StreamError::ContentTypeMismatch {
                            stream: src.meta.content_type.to_string(),
                            request: ct.clone(),
                        });
                    }
                    Some(ct) => ct.clone(),
                    None => src.meta.content_type.to_string(),
                };
                let tail = src.visible().tail;
                let offset = fork.offset.unwrap_or(tail);
                if offset > tail {
                    return Err(StreamError::ForkOffsetBeyondTail {
                        offset: ds_protocol::Offset::at(offset).to_string(),
                        tail: ds_protocol::Offset::at(tail).to_string(),
                    });
                }
                // Under the lifecycle lock, where the retention task moves the retained start:
                // either the release sees this fork's anchor, or this fork sees the release.
                src.check_retained(offset)?;
                let meta = ForkMeta {
                    source_id: src.meta.id,
                    source_path: src.meta.path.to_string(),
                    offset,
                    sub_offset: fork.sub_offset,
                };
                (Some(src), Some(meta), ct)
            }
        };
        let kind = MediaKind::of(&content_type);

        // Initial records: the sub-offset prefix copied from the source, then the body.
        let mut initial: Vec<Bytes> = prefix.into_iter().collect();
        if !req.body.is_empty() {
            let data = match kind {
                MediaKind::Json => json::flatten(&req.body, true)?.joined,
                _ => self.own_copy(&req.body),
            };
            if !data.is_empty() {
                initial.push(data);
            }
        }
        let start = fork_meta.as_ref().map_or(0, |f| f.offset);
        let own_bytes: u64 = initial.iter().map(|d| d.len() as u64).sum();
        self.reserve(own_bytes, 0)?;

        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        // Recorded first: a create the registry cannot record is not made.
        let announced = match self.announce("created", path, id, Some(&content_type)) {
            Ok(a) => a,
            Err(e) => {
                self.release(own_bytes);
                return Err(e);
            }
        };
        // Forks inherit the source's expiry rule unless they set their own.
        let ttl_secs = req
            .ttl_secs
            .or_else(|| match (&source, req.expires_at.is_some()) {
                (Some(src), false) => src.meta.ttl_secs,
                _ => None,
            });
        let mut meta = StreamMeta::new(id, path, &content_type, ttl_secs, now);
        meta.set_expires_at(req.expires_at.clone().or_else(|| match &source {
            Some(src) if req.ttl_secs.is_none() && src.meta.ttl_secs.is_none() => {
                src.meta.expires_at().cloned()
            }
            _ => None,
        }));
        meta.set_fork(fork_meta);
        let close = req.closed.then_some(None);
        let meta = Arc::new(meta);
        let (log, commit) = match self.storage.create(&meta, initial, close) {
            Ok(x) => x,
            Err(e) => {
                self.release(own_bytes);
                // The registry already has the create: tell its readers it did not happen.
                if let Ok(Some(p)) = self.announce("deleted", path, id, None) {
                    spawn_commits(vec![p.into_commit()], "registry");
                }
                return Err(e.into());
            }
        };
        let tail = start + own_bytes;
        let stream = Arc::new(Stream::new_stream(
            meta,
            source.clone(),
            WriterState {
                tail,
                closed: req.closed,
                own_bytes,
                ..WriterState::default()
            },
            // Invisible until the creation commits: readers that find it wait for `reveal`.
            Visible {
                tail: start,
                closed: false,
                gone: false,
            },
            now,
            log,
            self.events.clone(),
        ));
        if let Some(src) = &source {
            src.pin(stream.meta.id, 0);
        }
        self.register(stream.clone());
        if let Some(events) = &self.events {
            events.0.created(&stream);
        }
        Ok(Created::New {
            stream,
            commit,
            tail,
            closed: req.closed,
            announced,
        })
    }

    fn fork_source(&self, source_path: &str, now: u64) -> Result<Arc<Stream>, StreamError> {
        let src = self
            .peek(source_path)
            .ok_or_else(|| StreamError::ForkSourceNotFound(source_path.to_owned()))?;
        if src.state.lock().soft_deleted {
            return Err(StreamError::ForkSourceDeleted(source_path.to_owned()));
        }
        if src.expired_at(now) {
            if let Ok(commits) = self.expire_locked(&src) {
                spawn_commits(commits, "expiry");
            }
            return Err(StreamError::ForkSourceNotFound(source_path.to_owned()));
        }
        Ok(src)
    }

    fn confirm_existing(
        &self,
        existing: &Arc<Stream>,
        req: &CreateRequest,
    ) -> Result<CreateOutcome, StreamError> {
        let meta = &existing.meta;
        let expected_ct = req.content_type.as_deref().unwrap_or(match meta.fork() {
            // A fork re-PUT without Content-Type means "inherit", which it did.
            Some(_) => &meta.content_type,
            None => ds_protocol::content_type::DEFAULT_CONTENT_TYPE,
        });
        if !same_media_type(expected_ct, &meta.content_type) {
            return Err(StreamError::ConfigMismatch("content type"));
        }
        match (&req.fork, meta.fork()) {
            (None, None) => {
                if req.ttl_secs != meta.ttl_secs {
                    return Err(StreamError::ConfigMismatch("Stream-TTL"));
                }
                if req.expires_at.as_ref().map(|e| e.1) != meta.expires_at().map(|e| e.1) {
                    return Err(StreamError::ConfigMismatch("Stream-Expires-At"));
                }
            }
            (Some(f), Some(m)) => {
                if f.source != m.source_path {
                    return Err(StreamError::ConfigMismatch("Stream-Forked-From"));
                }
                if f.offset.is_some_and(|o| o != m.offset) {
                    return Err(StreamError::ConfigMismatch("Stream-Fork-Offset"));
                }
                if f.sub_offset != m.sub_offset {
                    return Err(StreamError::ConfigMismatch("Stream-Fork-Sub-Offset"));
                }
                if req.ttl_secs.is_some() && req.ttl_secs != meta.ttl_secs {
                    return Err(StreamError::ConfigMismatch("Stream-TTL"));
                }
                if req.expires_at.is_some()
                    && req.expires_at.as_ref().map(|e| e.1) != meta.expires_at().map(|e| e.1)
                {
                    return Err(StreamError::ConfigMismatch("Stream-Expires-At"));
                }
            }
            _ => return Err(StreamError::ConfigMismatch("fork source")),
        }
        let v = existing.visible();
        if req.closed != v.closed {
            return Err(StreamError::ConfigMismatch("closure status"));
        }
        Ok(CreateOutcome {
            id: existing.meta.id,
            created: false,
            content_type: meta.content_type.to_string(),
            next_offset: v.tail,
            closed: v.closed,
        })
    }

    /// POST: append, close, or both.
    pub async fn append(
        &self,
        path: &str,
        req: AppendRequest,
    ) -> Result<AppendOutcome, StreamError> {
        self.begin_append(path, req)?.finish().await
    }

    /// An append up to the submission of its write, without waiting: [`Appending::Done`] when
    /// nothing is left to wait for (memory mode, a duplicate of an acknowledged write), else
    /// what [`Appending::finish`] waits for. The HTTP/1 path answers a `Done` append without
    /// building a future at all; a future of the whole append (a few KiB of state, moved as it
    /// is built and boxed) was most of a small append's `memmove`.
    pub fn begin_append(&self, path: &str, req: AppendRequest) -> Result<Appending, StreamError> {
        if is_reserved(path) {
            return Err(StreamError::ReservedPath);
        }
        self.begin_any(path, req)
    }

    fn begin_any(&self, path: &str, req: AppendRequest) -> Result<Appending, StreamError> {
        let internal = self.registry_path.as_deref() == Some(path);
        let (stream, now) = self.get_at(path, true)?;
        if req.body.is_empty() && !req.close {
            return Err(StreamError::EmptyBody);
        }
        let has_body = !req.body.is_empty();
        if has_body && req.content_type.is_none() {
            return Err(StreamError::MissingContentType);
        }
        // Parse JSON before taking the writer lock; report its error in protocol order below.
        let parsed = match (has_body, stream.kind) {
            (true, MediaKind::Json) => Some(json::flatten(&req.body, false).map(|m| m.joined)),
            (true, _) => Some(Ok(self.own_copy(&req.body))),
            (false, _) => None,
        };

        enum Next {
            Wait(AppendOutcome, u64),
            Commit(AppendOutcome, Commit, u64),
        }

        let next = 'decide: {
            let mut st = stream.state.lock();
            poisoned_guard(&st)?;
            if st.removed {
                return Err(StreamError::NotFound);
            }
            if st.closed {
                if let Some(p) = &req.producer {
                    let closing = st
                        .closed_by()
                        .is_some_and(|c| c.id == p.id && c.epoch == p.epoch && c.seq == p.seq);
                    if closing {
                        let outcome = AppendOutcome {
                            next_offset: st.tail,
                            closed: true,
                            stored_data: false,
                            producer: Some((p.epoch, p.seq)),
                        };
                        break 'decide Next::Wait(outcome, st.tail);
                    }
                    if let Some(ps) = self.producer_state(&mut st, &p.id, now)
                        && p.epoch < ps.epoch
                    {
                        return Err(producer::ProducerError::StaleEpoch {
                            sent: p.epoch,
                            current: ps.epoch,
                        }
                        .into());
                    }
                }
                if !has_body {
                    // Close-only on a closed stream is idempotent.
                    Next::Wait(
                        AppendOutcome {
                            next_offset: st.tail,
                            closed: true,
                            stored_data: false,
                            producer: None,
                        },
                        st.tail,
                    )
                } else {
                    return Err(StreamError::Closed {
                        final_offset: st.tail,
                    });
                }
            } else {
                if has_body {
                    let ct = req.content_type.as_deref().unwrap_or_default();
                    if !same_media_type(ct, &stream.meta.content_type) {
                        return Err(StreamError::ContentTypeMismatch {
                            stream: stream.meta.content_type.to_string(),
                            request: ct.to_owned(),
                        });
                    }
                }
                let verdict = match &req.producer {
                    Some(p) => {
                        let known = self.producer_state(&mut st, &p.id, now);
                        Some(producer::check(known, p)?)
                    }
                    None => None,
                };
                if let Some(Verdict::Duplicate { epoch, highest_seq }) = verdict {
                    Next::Wait(
                        AppendOutcome {
                            next_offset: st.tail,
                            closed: st.closed,
                            stored_data: false,
                            producer: Some((epoch, highest_seq)),
                        },
                        st.tail,
                    )
                } else {
                    if let (Some(sent), Some(last)) = (&req.stream_seq, st.last_seq())
                        && sent.as_bytes() <= last.as_bytes()
                    {
                        return Err(StreamError::SeqRegression {
                            last: last.to_string(),
                            sent: sent.clone(),
                        });
                    }
                    let data = match parsed {
                        Some(result) => Some(result?),
                        None => None,
                    };
                    let size = data.as_ref().map_or(0, |d| d.len() as u64);
                    // The registry belongs to the server; the per-stream cap is for clients.
                    let used = if internal { 0 } else { st.own_bytes };
                    let new_producer = match (&req.producer, verdict) {
                        (Some(p), Some(Verdict::Accept(_))) => {
                            !st.producers.contains_key(p.id.as_str())
                        }
                        _ => false,
                    };
                    if new_producer {
                        self.reserve_producer()?;
                    }
                    if let Err(e) = self.reserve(size, used) {
                        if new_producer {
                            self.producers.fetch_sub(1, Ordering::Relaxed);
                        }
                        return Err(e);
                    }
                    let start = st.tail;
                    st.tail += size;
                    st.own_bytes += size;
                    if let Some(seq) = &req.stream_seq {
                        st.rare().last_seq = Some(seq.as_str().into());
                    }
                    let producer_update = match (&req.producer, verdict) {
                        (Some(p), Some(Verdict::Accept(mut ps))) => {
                            ps.last_ms = now;
                            st.producers.insert(p.id.as_str().into(), ps);
                            Some((p.id.clone(), ps))
                        }
                        _ => None,
                    };
                    let close = req.close.then(|| {
                        req.producer.as_ref().map(|p| ProducerTuple {
                            id: p.id.clone(),
                            epoch: p.epoch,
                            seq: p.seq,
                        })
                    });
                    if let Some(by) = &close {
                        st.closed = true;
                        if let Some(by) = by {
                            st.rare().closed_by = Some(by.clone());
                        }
                    }
                    let commit = stream.log.append(AppendEntry {
                        start,
                        data,
                        close,
                        stream_seq: req.stream_seq.clone(),
                        producer: producer_update,
                    });
                    Next::Commit(
                        AppendOutcome {
                            next_offset: st.tail,
                            closed: st.closed,
                            stored_data: size > 0,
                            producer: req.producer.as_ref().map(|p| (p.epoch, p.seq)),
                        },
                        commit,
                        st.tail,
                    )
                }
            }
        };
        match next {
            Next::Wait(outcome, tail) => {
                // A duplicate is answered once the write it duplicates is acknowledged: most
                // often it already is.
                let visible = stream.visible();
                Ok(match duplicate_ready(&visible, tail, outcome.closed) {
                    Some(true) => Appending::Done(outcome),
                    Some(false) => return Err(StreamError::NotFound),
                    None => Appending::Duplicate {
                        stream,
                        outcome,
                        tail,
                    },
                })
            }
            Next::Commit(outcome, mut commit, tail) => {
                // A storage that is done at once (memory mode) is not waited for.
                match (&mut commit).now_or_never() {
                    Some(result) => {
                        finish(&stream, result, tail, outcome.closed)?;
                        Ok(Appending::Done(outcome))
                    }
                    None => Ok(Appending::Commit {
                        settling: Settling {
                            stream,
                            commit: Some(commit),
                            tail,
                            closed: outcome.closed,
                        },
                        outcome,
                    }),
                }
            }
        }
    }

    /// DELETE: remove, or soft-delete while forks still read from the stream.
    pub async fn delete(&self, path: &str) -> Result<(), StreamError> {
        if is_reserved(path) {
            return Err(StreamError::ReservedPath);
        }
        let commits = {
            let _guard = self.lifecycle.lock();
            let stream = self.peek(path).ok_or(StreamError::NotFound)?;
            if stream.state.lock().soft_deleted {
                return Err(StreamError::SoftDeleted);
            }
            if stream.expired_at(now_ms()) {
                spawn_commits(self.expire_locked(&stream)?, "expiry");
                return Err(StreamError::NotFound);
            }
            self.delete_locked(&stream)?
        };
        for c in commits {
            c.await?;
        }
        Ok(())
    }

    /// Expires a stream found past its TTL or expiry time.
    fn expire(&self, stream: &Arc<Stream>) {
        let commits = {
            let _guard = self.lifecycle.lock();
            self.expire_locked(stream)
        };
        match commits {
            Ok(commits) => spawn_commits(commits, "expiry"),
            // Not removed: the next sweep or access tries again.
            Err(e) => tracing::warn!(stream = %stream.meta.path, error = %e, "expiry postponed"),
        }
    }

    fn expire_locked(&self, stream: &Arc<Stream>) -> Result<Vec<Commit>, StreamError> {
        if stream.state.lock().removed {
            return Ok(Vec::new());
        }
        tracing::debug!(stream = %stream.meta.path, "stream expired");
        self.delete_locked(stream)
    }

    /// With the lifecycle lock held: soft-delete when forks exist, else remove and cascade.
    /// The registry records the delete first; if it cannot, nothing is deleted.
    fn delete_locked(&self, stream: &Arc<Stream>) -> Result<Vec<Commit>, StreamError> {
        let announced = self.announce("deleted", &stream.meta.path, stream.meta.id, None)?;
        let mut commits: Vec<Commit> = announced.map(Pending::into_commit).into_iter().collect();
        let mut st = stream.state.lock();
        if st.refcount > 0 {
            if !st.soft_deleted {
                st.soft_deleted = true;
                commits.push(stream.log.mark_soft_deleted());
            }
            return Ok(commits);
        }
        drop(st);
        commits.extend(self.remove_locked(stream));
        Ok(commits)
    }

    /// Removes a stream for good and releases its hold on its source, cascading up the chain.
    fn remove_locked(&self, stream: &Arc<Stream>) -> Vec<Commit> {
        let mut commits = Vec::new();
        let mut current = Some(stream.clone());
        while let Some(s) = current.take() {
            let own_bytes = {
                let mut st = s.state.lock();
                if st.removed {
                    break;
                }
                st.removed = true;
                let producers = std::mem::take(&mut st.producers);
                self.producers
                    .fetch_sub(producers.len() as u64, Ordering::Relaxed);
                std::mem::take(&mut st.own_bytes)
            };
            self.registry
                .remove_if(&*s.meta.path, |k| Arc::ptr_eq(&k.0, &s));
            self.releasing.lock().remove(&s.meta.id);
            self.release(own_bytes);
            s.publish(|v| {
                v.gone = true;
                true
            });
            if let Some(events) = &self.events {
                events.0.removed(&s);
            }
            commits.push(s.log.remove());
            if let Some(src) = &s.source {
                let mut st = src.state.lock();
                st.refcount = st.refcount.saturating_sub(1);
                if let Some(rare) = &mut st.rare {
                    rare.fork_pins.retain(|p| p.0 != s.meta.id);
                    if rare.fork_pins.is_empty() {
                        rare.fork_pins = Vec::new();
                        if rare.closed_by.is_none()
                            && rare.last_seq.is_none()
                            && rare.release.is_none()
                        {
                            st.rare = None;
                        }
                    }
                }
                if st.refcount == 0 && st.soft_deleted {
                    drop(st);
                    current = Some(src.clone());
                } else {
                    drop(st);
                    // The pin moved: what the source's subscriptions acked may go now.
                    let acked = src.acked();
                    self.offer_release(src, acked);
                }
            }
        }
        commits
    }

    /// Removes every expired stream; the sweeper calls this periodically so that streams nobody
    /// touches still go away.
    pub fn sweep_expired(&self) -> usize {
        let now = now_ms();
        let expired: Vec<Arc<Stream>> = self
            .registry
            .iter()
            .filter(|e| {
                let s = &e.key().0;
                !s.state.lock().soft_deleted && s.expired_at(now)
            })
            .map(|e| e.key().0.clone())
            .collect();
        let n = expired.len();
        for s in expired {
            self.expire(&s);
        }
        let idle = self.limits.producer_idle_ms;
        if idle > 0 && now >= self.next_producer_sweep_ms.load(Ordering::Relaxed) {
            self.next_producer_sweep_ms
                .store(now + idle / 8, Ordering::Relaxed);
            let forgotten = self.sweep_idle_producers(now);
            if forgotten > 0 {
                tracing::debug!(forgotten, "forgot idle producers");
            }
        }
        n
    }

    /// Reads from `from` (already resolved; beyond the tail means at the tail), stitching
    /// inherited data of forks, at most about `max_read_bytes`.
    pub async fn read(&self, stream: &Arc<Stream>, from: u64) -> Result<ReadOutcome, StreamError> {
        self.read_bounded(stream, from, stream.visible()).await
    }

    /// Like [`Streams::read`], bounded by a visible state the caller already observed.
    pub async fn read_bounded(
        &self,
        stream: &Arc<Stream>,
        from: u64,
        visible: Visible,
    ) -> Result<ReadOutcome, StreamError> {
        let split = stream.kind != MediaKind::Json;
        self.read_chain(stream, from, visible, self.limits.max_read_bytes, split)
            .await
    }

    /// Reads the earliest data still held (`offset=-1`, or no offset), bounded by `visible`.
    /// A release that lands between resolving the earliest offset and reading there (the
    /// storage drops the records before readers are told the new earliest offset) makes the
    /// read fail as released; it is read again from the new earliest offset, so a read from the
    /// start is never answered 410.
    pub async fn read_earliest(
        &self,
        stream: &Arc<Stream>,
        visible: Visible,
    ) -> Result<ReadOutcome, StreamError> {
        let mut from = stream.earliest();
        let mut visible = visible;
        for _ in 0..MAX_EARLIEST_RETRIES {
            match self.read_bounded(stream, from, visible).await {
                Err(StreamError::Released { earliest, .. }) if earliest > from => {
                    from = earliest;
                    // The release stopped at a tail at least this new.
                    visible = stream.visible();
                }
                other => return other,
            }
        }
        self.read_bounded(stream, from, visible).await
    }

    /// Refuses an offset inside a JSON record: JSON streams are read, forked and acked on
    /// the boundaries the server hands out. A byte stream accepts any position up to its tail.
    pub async fn check_boundary(
        &self,
        stream: &Arc<Stream>,
        offset: u64,
    ) -> Result<(), StreamError> {
        let visible = stream.visible();
        if stream.kind != MediaKind::Json
            || offset == 0
            || offset >= visible.tail
            || offset <= stream.earliest()
        {
            // At or below the retained start an ack changes nothing (acks never go back).
            return Ok(());
        }
        // One whole record from `offset`; fails with `Misaligned` inside a record.
        self.read_chain(stream, offset, visible, 1, false)
            .await
            .map(|_| ())
    }

    async fn read_chain(
        &self,
        stream: &Arc<Stream>,
        from: u64,
        visible: Visible,
        max_bytes: usize,
        split: bool,
    ) -> Result<ReadOutcome, StreamError> {
        let from = from.min(visible.tail);
        let earliest = stream.earliest();
        if from < earliest {
            return Err(StreamError::Released {
                offset: ds_protocol::Offset::at(from).to_string(),
                earliest,
            });
        }
        let mut outcome = ReadOutcome {
            parts: Vec::new(),
            start: from,
            next: from,
            visible,
        };
        // The chain from the root source down to this stream, each with the range it serves.
        let mut levels: Vec<(&Arc<Stream>, u64, u64)> = Vec::new();
        let mut hi = visible.tail;
        let mut cur = stream;
        loop {
            let lo = cur.own_start();
            levels.push((cur, lo, hi));
            match &cur.source {
                Some(src) => {
                    hi = lo;
                    cur = src;
                }
                None => break,
            }
        }
        let mut budget = max_bytes;
        for (s, lo, hi) in levels.into_iter().rev() {
            let pos = outcome.next;
            if pos >= hi {
                continue;
            }
            if pos < lo {
                // Only possible for offsets no server handed out.
                return Err(StreamError::Misaligned(
                    ds_protocol::Offset::at(pos).to_string(),
                ));
            }
            let chunk = s
                .log
                .read(pos, hi, budget, split)
                .await
                .map_err(|e| match e {
                    crate::storage::StorageError::Misaligned { pos } => {
                        StreamError::Misaligned(ds_protocol::Offset::at(pos).to_string())
                    }
                    // Released while this read ran.
                    crate::storage::StorageError::Released { start } => StreamError::Released {
                        offset: ds_protocol::Offset::at(pos).to_string(),
                        earliest: start.max(stream.earliest()),
                    },
                    other => other.into(),
                })?;
            let got: usize = chunk.parts.iter().map(Bytes::len).sum();
            outcome.parts.extend(chunk.parts);
            outcome.next = chunk.end;
            budget = budget.saturating_sub(got);
            if outcome.next < hi || budget == 0 {
                break;
            }
        }
        Ok(outcome)
    }

    /// Every subscription linked to `stream` acked up to `acked` (durably): in `acked` mode
    /// the prefix before it is released by the retention task, `min_age` later. Returns at
    /// once (called by the subscription layer after its acks are stored).
    pub fn offer_release(&self, stream: &Arc<Stream>, acked: u64) {
        if !self.retention.acked || acked <= stream.earliest() {
            return;
        }
        let now = now_ms();
        let mut st = stream.state.lock();
        let q = st.rare().release.get_or_insert_with(Box::default);
        q.acked = q.acked.max(acked);
        let full = q.candidates.len() >= MAX_RELEASE_CANDIDATES;
        match q.candidates.back_mut() {
            Some(last) if last.0 >= acked => return,
            // Full: the newest candidate absorbs this one and restarts its hold (released
            // later, never earlier).
            Some(last) if full => *last = (acked, now),
            _ => q.candidates.push_back((acked, now)),
        }
        self.releasing.lock().insert(stream.meta.id, stream.clone());
        drop(st);
        self.release_wake.notify_one();
    }

    /// One pass of the retention task: releases what is due. Returns how long until the next
    /// candidate is due (`None`: nothing waits).
    pub async fn release_due(&self) -> Option<u64> {
        let now = now_ms();
        let min_age = self.retention.min_age_ms;
        let streams: Vec<Arc<Stream>> = self.releasing.lock().values().cloned().collect();
        let mut next: Option<u64> = None;
        for stream in streams {
            let target = {
                let mut st = stream.state.lock();
                let mut target = None;
                let mut drained = true;
                if let Some(q) = st.rare.as_mut().and_then(|r| r.release.as_mut()) {
                    while let Some(&(offset, at)) = q.candidates.front() {
                        let due = at.saturating_add(min_age);
                        if due > now {
                            next = Some(next.map_or(due - now, |n| n.min(due - now)));
                            break;
                        }
                        target = Some(offset);
                        q.candidates.pop_front();
                    }
                    drained = q.candidates.is_empty();
                    if drained {
                        // Its buffer goes too: an idle stream keeps only `acked`.
                        q.candidates = VecDeque::new();
                    }
                }
                if drained {
                    self.releasing.lock().remove(&stream.meta.id);
                }
                target
            };
            if let Some(target) = target
                && let Err(e) = self.release_to(&stream, target).await
            {
                tracing::error!(stream = %stream.meta.path, error = %e, "release failed");
            }
        }
        next
    }

    /// Runs the retention task until `shutdown`: a pass whenever a candidate arrives or comes
    /// due, at most one pass per [`RELEASE_INTERVAL_MS`].
    pub async fn run_retention(self: Arc<Self>, shutdown: tokio_util::sync::CancellationToken) {
        if !self.retention.acked {
            return;
        }
        loop {
            let next = self.release_due().await;
            let wait = std::time::Duration::from_millis(next.unwrap_or(3_600_000));
            tokio::select! {
                () = self.release_wake.notified() => {}
                () = tokio::time::sleep(wait) => {}
                () = shutdown.cancelled() => return,
            }
            tokio::select! {
                () = tokio::time::sleep(std::time::Duration::from_millis(RELEASE_INTERVAL_MS)) => {}
                () = shutdown.cancelled() => return,
            }
        }
    }

    /// Releases `stream`'s data before `target`, clamped to its visible tail and to the lowest
    /// anchor of its live forks. Releases only at a record boundary (a target inside a record
    /// waits for a later ack); only the retention task calls this, so releases of a stream are
    /// serial and increasing.
    async fn release_to(&self, stream: &Arc<Stream>, target: u64) -> Result<(), StreamError> {
        let visible = stream.visible();
        let own_start = stream.own_start();
        let pin = |st: &WriterState| st.fork_pins().iter().map(|p| p.1).min().unwrap_or(u64::MAX);
        let target = {
            let st = stream.state.lock();
            if st.removed || st.poisoned || visible.gone {
                return Ok(());
            }
            target.min(visible.tail).min(pin(&st))
        };
        if target <= stream.earliest() {
            return Ok(());
        }
        if target < visible.tail {
            // One whole record from `target`: `Misaligned` inside a record.
            match self.read_chain(stream, target, visible, 1, false).await {
                Ok(_) => {}
                Err(StreamError::Misaligned(_)) => return Ok(()),
                Err(e) => return Err(e),
            }
        }
        {
            // Under the lifecycle lock, where forks are created: a fork either sees this
            // release (and is refused below it) or pins the data first.
            let _guard = self.lifecycle.lock();
            let mut st = stream.state.lock();
            // A fork created meanwhile pins it: the next ack or the fork's removal retries.
            if st.removed || target > pin(&st) {
                return Ok(());
            }
            let q = st.rare().release.get_or_insert_with(Box::default);
            q.releasing = q.releasing.max(target);
        }
        if target > own_start {
            stream.log.release(target).await?;
        }
        // Readers see the new start only now that the release is durable: a crash before this
        // point restarts with the data still there, and a reader that was refused below
        // `target` must never find it again.
        let freed = {
            let _guard = self.lifecycle.lock();
            let old = stream.earliest().max(own_start);
            stream.retained.fetch_max(target, Ordering::AcqRel);
            // A fork's data before its anchor is its source's: the fork no longer references
            // what it released.
            if let (Some(src), Some(fork)) = (&stream.source, stream.meta.fork())
                && !stream.state.lock().removed
            {
                src.pin(stream.meta.id, target.min(fork.offset));
            }
            target.saturating_sub(old)
        };
        if let Some(src) = &stream.source {
            let acked = src.acked();
            self.offer_release(src, acked);
        }
        let mut st = stream.state.lock();
        let freed = freed.min(st.own_bytes);
        st.own_bytes -= freed;
        if !st.removed && !self.is_registry(&stream.meta.path) {
            self.release(freed);
        }
        self.released_bytes.fetch_add(freed, Ordering::Relaxed);
        tracing::debug!(stream = %stream.meta.path, before = target, freed, "released");
        Ok(())
    }

    fn reserve(&self, size: u64, stream_used: u64) -> Result<(), StreamError> {
        if size == 0 {
            return Ok(());
        }
        if stream_used.saturating_add(size) > self.limits.max_stream_bytes {
            return Err(StreamError::StreamFull {
                size,
                used: stream_used,
                limit: self.limits.max_stream_bytes,
            });
        }
        let limit = self.limits.max_total_bytes;
        let mut used = self.total_bytes.load(Ordering::Relaxed);
        loop {
            let new = used.saturating_add(size);
            if new > limit {
                // With retention, the budget drains as subscribers ack: a retry will succeed.
                return Err(if self.retention.acked {
                    self.backpressured.fetch_add(1, Ordering::Relaxed);
                    StreamError::Backpressure { size, used, limit }
                } else {
                    StreamError::MemoryFull { size, used, limit }
                });
            }
            match self.total_bytes.compare_exchange_weak(
                used,
                new,
                Ordering::Relaxed,
                Ordering::Relaxed,
            ) {
                Ok(_) => return Ok(()),
                Err(actual) => used = actual,
            }
        }
    }

    fn release(&self, size: u64) {
        self.total_bytes.fetch_sub(size, Ordering::Relaxed);
    }
}

enum Created {
    Existing(CreateOutcome),
    New {
        stream: Arc<Stream>,
        commit: Commit,
        /// Tail and closed state as of the creation (appends may follow before it commits).
        tail: u64,
        closed: bool,
        /// The registry event, to wait for before answering.
        announced: Option<Pending>,
    },
}

/// A registry event submitted to storage, revealed to readers once it commits.
struct Pending {
    stream: Arc<Stream>,
    commit: Commit,
    tail: u64,
}

impl Pending {
    async fn settle(self) -> Result<(), StreamError> {
        settle(self.stream, self.commit, self.tail, false).await
    }

    /// As a commit, for callers that collect commits (deletes, expiry).
    fn into_commit(self) -> Commit {
        Box::pin(async move {
            self.settle().await.map_err(|e| match e {
                StreamError::Storage(e) => e,
                StreamError::ShuttingDown => crate::storage::StorageError::ShuttingDown,
                other => crate::storage::StorageError::Corrupt {
                    what: "registry stream".into(),
                    detail: other.to_string(),
                },
            })
        })
    }
}

/// Waits for a submitted write and makes it visible to readers. The reveal must happen even if
/// the caller stops waiting (a client that hangs up mid-commit drops the handler's future): the
/// write is committed either way, and an unrevealed tail would hide it from every reader and
/// stall the producer's retry. So a caller dropped mid-wait hands the commit to a task of its
/// own ([`Settling`]'s drop). The handler awaits the commit itself rather than a task that
/// awaits it: under load (thousands of live readers) every extra task hand-off waits behind
/// the whole run queue.
async fn settle(
    stream: Arc<Stream>,
    commit: Commit,
    tail: u64,
    closed: bool,
) -> Result<(), StreamError> {
    Settling {
        stream,
        commit: Some(commit),
        tail,
        closed,
    }
    .wait()
    .await
}

/// An append whose write was submitted ([`Streams::begin_append`]).
pub enum Appending {
    /// Nothing left to wait for.
    Done(AppendOutcome),
    /// Waiting for the write's commit; dropped, the commit still finishes ([`Settling`]).
    Commit {
        settling: Settling,
        outcome: AppendOutcome,
    },
    /// A duplicate, waiting for the original write it duplicates to be acknowledged.
    Duplicate {
        stream: Arc<Stream>,
        outcome: AppendOutcome,
        tail: u64,
    },
}

impl Appending {
    /// The outcome, once the write is acknowledged.
    pub async fn finish(self) -> Result<AppendOutcome, StreamError> {
        match self {
            Appending::Done(outcome) => Ok(outcome),
            Appending::Commit { settling, outcome } => {
                settling.wait().await?;
                Ok(outcome)
            }
            Appending::Duplicate {
                stream,
                outcome,
                tail,
            } => {
                let mut rx = stream.subscribe();
                let ready = rx
                    .wait_for(|v| duplicate_ready(v, tail, outcome.closed).is_some())
                    .await;
                match ready.map(|v| duplicate_ready(&v, tail, outcome.closed)) {
                    Ok(Some(true)) => Ok(outcome),
                    _ => Err(StreamError::NotFound),
                }
            }
        }
    }
}

/// Whether a duplicate of the write that made the tail `tail` can be answered, given what
/// readers see: `Some(true)` once that write is visible (and the close, if it closed the
/// stream), `Some(false)` if the stream is gone, `None` while waiting.
fn duplicate_ready(visible: &Visible, tail: u64, closed: bool) -> Option<bool> {
    if visible.gone {
        Some(false)
    } else if visible.tail >= tail && (visible.closed || !closed) {
        Some(true)
    } else {
        None
    }
}

/// A commit being waited for; if dropped before it completes, the commit finishes (and is
/// revealed) on a task of its own.
pub struct Settling {
    stream: Arc<Stream>,
    commit: Option<Commit>,
    tail: u64,
    closed: bool,
}

impl Settling {
    /// Waits for the commit and reveals the write.
    async fn wait(mut self) -> Result<(), StreamError> {
        let result = match self.commit.as_mut() {
            Some(commit) => commit.await,
            None => Ok(()),
        };
        self.commit = None;
        finish(&self.stream, result, self.tail, self.closed)
    }
}

impl Drop for Settling {
    fn drop(&mut self) {
        let Some(commit) = self.commit.take() else {
            return;
        };
        let (stream, tail, closed) = (self.stream.clone(), self.tail, self.closed);
        match tokio::runtime::Handle::try_current() {
            Ok(handle) => {
                handle.spawn(async move {
                    let _ = finish(&stream, commit.await, tail, closed);
                });
            }
            Err(_) => {
                tracing::error!(stream = %stream.meta.path, "commit abandoned outside a runtime");
            }
        }
    }
}

fn finish(
    stream: &Stream,
    result: Result<(), crate::storage::StorageError>,
    tail: u64,
    closed: bool,
) -> Result<(), StreamError> {
    match result {
        Ok(()) => {
            stream.reveal(tail, closed);
            Ok(())
        }
        // Storage refuses everything from now on (the server is stopping): the write was not
        // made, nothing later can be, and recovery at the next start reads what is stored. The
        // stream is not poisoned: that is for a failure that leaves memory and disk at odds
        // while the server goes on.
        Err(crate::storage::StorageError::ShuttingDown) => {
            tracing::debug!(stream = %stream.meta.path, "write refused: storage is shutting down");
            Err(StreamError::ShuttingDown)
        }
        Err(e) => {
            stream.state.lock().poisoned = true;
            tracing::error!(stream = %stream.meta.path, error = %e, "storage commit failed");
            Err(e.into())
        }
    }
}

impl Streams {
    /// A request body as stored data, in an allocation of its own. A body from the HTTP layer
    /// is usually a slice of the connection's read buffer; keeping that slice would pin the
    /// whole buffer (8 KiB or more) for every stored append, and the memory budget would count
    /// 100 bytes where 8 KiB are held. A storage that copies what it stores anyway (memory) is
    /// given the body as it is, so that it is copied once, not twice.
    fn own_copy(&self, body: &Bytes) -> Bytes {
        if self.storage.copies_appends() {
            body.clone()
        } else {
            Bytes::copy_from_slice(body)
        }
    }
}

/// Lifecycle commits triggered by a read (lazy expiry) finish in the background: the reader
/// has its answer (404) already.
fn spawn_commits(commits: Vec<Commit>, what: &'static str) {
    if commits.is_empty() {
        return;
    }
    if let Ok(handle) = tokio::runtime::Handle::try_current() {
        handle.spawn(async move {
            for c in commits {
                if let Err(e) = c.await {
                    tracing::error!(error = %e, "{what} commit failed");
                }
            }
        });
    }
}

/// Checks a fork request against its source before any lock is taken, and reads the data a
/// sub-offset fork inherits past its anchor: the first `n` bytes (or JSON messages) of the record
/// that starts at the anchor. Offsets are validated again under the lifecycle lock.
impl Streams {
    async fn fork_prefix(&self, fork: &ForkRequest) -> Result<Option<Bytes>, StreamError> {
        let Some(src) = self.peek(fork.source.as_str()) else {
            return Err(StreamError::ForkSourceNotFound(fork.source.clone()));
        };
        let visible = src.visible();
        let anchor = fork.offset.unwrap_or(visible.tail);
        if anchor > visible.tail {
            return Err(StreamError::ForkOffsetBeyondTail {
                offset: ds_protocol::Offset::at(anchor).to_string(),
                tail: ds_protocol::Offset::at(visible.tail).to_string(),
            });
        }
        let needs_boundary = fork.sub_offset > 0 || src.kind == MediaKind::Json;
        if !needs_boundary || anchor == visible.tail {
            return if fork.sub_offset > 0 {
                Err(StreamError::SubOffsetOvershoot {
                    requested: fork.sub_offset,
                    available: 0,
                })
            } else {
                Ok(None)
            };
        }
        // One whole record from the anchor; fails with `Misaligned` inside a record.
        let first = self.read_chain(&src, anchor, visible, 1, false).await?;
        if fork.sub_offset == 0 {
            return Ok(None);
        }
        let record = first.parts.into_iter().next().unwrap_or_default();
        let n = fork.sub_offset;
        let prefix = match src.kind {
            MediaKind::Json => json::first_messages(&record, n as usize).ok_or(
                StreamError::SubOffsetOvershoot {
                    requested: n,
                    available: json::count_messages(&record),
                },
            )?,
            _ if n > record.len() as u64 => {
                return Err(StreamError::SubOffsetOvershoot {
                    requested: n,
                    available: record.len() as u64,
                });
            }
            _ => record.slice(..n as usize),
        };
        Ok(Some(prefix))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::storage::memory::MemoryStorage;

    fn streams(limits: Limits) -> Streams {
        Streams::open(Arc::new(MemoryStorage), limits).expect("open")
    }

    #[test]
    fn reserved_paths_are_the_registry_prefix_and_a_whole_control_segment() {
        for path in [
            "/_ds/registry",
            "/v1/__ds/x",
            "/v1/stream/__ds",
            "/__ds/",
            "/a_b/__ds/c",
        ] {
            assert!(is_reserved(path), "{path} is reserved");
        }
        for path in [
            "/v1/stream/a",
            "/v1/x__ds/b",
            "/v1/__dsx/b",
            "/v1/_ds/b",
            "/v1/__d",
            "/v1/a_b_c",
            "",
        ] {
            assert!(!is_reserved(path), "{path} is not reserved");
        }
    }

    fn produce(id: &str, epoch: u64, seq: u64) -> AppendRequest {
        AppendRequest {
            content_type: Some("application/octet-stream".into()),
            body: Bytes::from_static(b"x"),
            producer: Some(ProducerRequest {
                id: id.into(),
                epoch,
                seq,
            }),
            ..AppendRequest::default()
        }
    }

    /// Memory storage whose releases take effect, and resolve, only once the test opens the
    /// gate: a durable backend between writing a release and syncing it.
    struct GatedReleases {
        gate: Arc<tokio::sync::Semaphore>,
    }

    struct GatedLog {
        inner: Arc<dyn StreamLog>,
        gate: Arc<tokio::sync::Semaphore>,
    }

    impl Storage for GatedReleases {
        fn name(&self) -> &'static str {
            "gated"
        }

        fn create(
            &self,
            meta: &Arc<StreamMeta>,
            initial: Vec<Bytes>,
            close: Option<Option<ProducerTuple>>,
        ) -> Result<(Arc<dyn StreamLog>, Commit), crate::storage::StorageError> {
            let (inner, commit) = MemoryStorage.create(meta, initial, close)?;
            let log = GatedLog {
                inner,
                gate: self.gate.clone(),
            };
            Ok((Arc::new(log), commit))
        }

        fn recover(&self) -> Result<Vec<Recovered>, crate::storage::StorageError> {
            Ok(Vec::new())
        }
    }

    impl StreamLog for GatedLog {
        fn append(&self, entry: AppendEntry) -> Commit {
            self.inner.append(entry)
        }

        fn mark_soft_deleted(&self) -> Commit {
            self.inner.mark_soft_deleted()
        }

        fn remove(&self) -> Commit {
            self.inner.remove()
        }

        fn release(&self, before: u64) -> Commit {
            let (inner, gate) = (self.inner.clone(), self.gate.clone());
            Box::pin(async move {
                gate.acquire().await.map(|permit| permit.forget()).ok();
                inner.release(before).await
            })
        }

        fn read(
            &self,
            from: u64,
            until: u64,
            max_bytes: usize,
            split: bool,
        ) -> futures::future::BoxFuture<
            'static,
            Result<crate::storage::ReadChunk, crate::storage::StorageError>,
        > {
            self.inner.read(from, until, max_bytes, split)
        }
    }

    fn bytes(body: &'static [u8]) -> AppendRequest {
        AppendRequest {
            content_type: Some("application/octet-stream".into()),
            body: Bytes::from_static(body),
            ..AppendRequest::default()
        }
    }

    fn acked(s: &mut Streams) {
        s.set_retention(Retention {
            acked: true,
            min_age_ms: 0,
        });
    }

    /// What a read from `from` returns, or the earliest offset it was refused below.
    async fn read_from(s: &Streams, stream: &Arc<Stream>, from: u64) -> Result<Vec<u8>, u64> {
        match s.read(stream, from).await {
            Ok(r) => Ok(r.parts.concat()),
            Err(StreamError::Released { earliest, .. }) => Err(earliest),
            Err(e) => panic!("read from {from}: {e}"),
        }
    }

    #[tokio::test]
    async fn readers_see_a_release_only_once_the_storage_made_it_durable() {
        let gate = Arc::new(tokio::sync::Semaphore::new(0));
        let storage = GatedReleases { gate: gate.clone() };
        let mut s = Streams::open(Arc::new(storage), Limits::default()).expect("open");
        acked(&mut s);
        let s = Arc::new(s);
        s.create("/a", CreateRequest::default()).await.unwrap();
        for body in [b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"] {
            s.append("/a", bytes(body)).await.unwrap();
        }
        let stream = s.peek("/a").unwrap();
        s.offer_release(&stream, 20);
        let pass = tokio::spawn({
            let s = s.clone();
            async move { s.release_due().await }
        });
        while stream.releasing() < 20 {
            tokio::task::yield_now().await;
        }
        // Submitted, not durable: a crash now restarts with everything, so readers must not
        // have been told otherwise.
        assert_eq!(stream.earliest(), 0);
        assert_eq!(
            read_from(&s, &stream, 0).await.unwrap(),
            b"0123456789abcdefghijABCDEFGHIJ"
        );
        // A fork there would pin data on its way out: refused at once.
        let fork = CreateRequest {
            fork: Some(ForkRequest {
                source: "/a".into(),
                offset: Some(10),
                sub_offset: 0,
            }),
            ..CreateRequest::default()
        };
        assert!(matches!(
            s.create("/f", fork).await,
            Err(StreamError::Released { earliest: 20, .. })
        ));
        gate.add_permits(1);
        pass.await.expect("retention pass");
        assert_eq!(stream.earliest(), 20);
        assert_eq!(read_from(&s, &stream, 0).await, Err(20));
        assert_eq!(read_from(&s, &stream, 20).await.unwrap(), b"ABCDEFGHIJ");
    }

    #[tokio::test]
    async fn a_read_from_the_start_that_races_a_release_reads_from_the_new_earliest_offset() {
        let mut s = streams(Limits::default());
        acked(&mut s);
        s.create("/a", CreateRequest::default()).await.unwrap();
        for body in [b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"] {
            s.append("/a", bytes(body)).await.unwrap();
        }
        let stream = s.peek("/a").unwrap();
        // The storage dropped the records, readers were not told yet (the retention task's
        // step between the two): the earliest offset a reader resolves `-1` to is gone.
        stream.log.release(20).await.unwrap();
        assert_eq!(stream.earliest(), 0);
        assert_eq!(read_from(&s, &stream, 0).await, Err(20));
        let outcome = s.read_earliest(&stream, stream.visible()).await.unwrap();
        assert_eq!(outcome.start, 20);
        assert_eq!(outcome.parts.concat(), b"ABCDEFGHIJ");
        assert_eq!(outcome.next, 30);
    }

    #[tokio::test]
    async fn byte_stream_acks_inside_a_record_release_none_of_it() {
        let mut s = streams(Limits::default());
        acked(&mut s);
        s.create("/b", CreateRequest::default()).await.unwrap();
        for body in [b"0123456789", b"abcdefghij", b"ABCDEFGHIJ"] {
            s.append("/b", bytes(body)).await.unwrap();
        }
        let stream = s.peek("/b").unwrap();
        // Inside the second record: not even the first is released (record boundaries only,
        // and the ack's own record stays whole).
        s.offer_release(&stream, 15);
        s.release_due().await;
        assert_eq!(stream.earliest(), 0);
        assert_eq!(
            read_from(&s, &stream, 0).await.unwrap(),
            b"0123456789abcdefghijABCDEFGHIJ"
        );
        // On a boundary: released up to it.
        s.offer_release(&stream, 20);
        s.release_due().await;
        assert_eq!(stream.earliest(), 20);
        // Inside the last record: it stays whole.
        s.offer_release(&stream, 25);
        s.release_due().await;
        assert_eq!(stream.earliest(), 20);
        assert_eq!(read_from(&s, &stream, 20).await.unwrap(), b"ABCDEFGHIJ");
        assert_eq!(s.total_bytes(), 10);
        // The tail is a boundary.
        s.offer_release(&stream, 30);
        s.release_due().await;
        assert_eq!(stream.earliest(), 30);
        assert_eq!(s.total_bytes(), 0);
    }

    #[tokio::test]
    async fn the_sweeper_forgets_idle_producers_and_counts_them_out() {
        let s = streams(Limits {
            producer_idle_ms: 60_000,
            ..Limits::default()
        });
        s.create("/a", CreateRequest::default()).await.unwrap();
        s.append("/a", produce("p1", 0, 0)).await.unwrap();
        s.append("/a", produce("p2", 3, 0)).await.unwrap();
        assert_eq!(s.producer_count(), 2);
        let now = now_ms();
        assert_eq!(s.sweep_idle_producers(now), 0, "not idle yet");
        assert_eq!(s.sweep_idle_producers(now + 61_000), 2);
        assert_eq!(s.producer_count(), 0);
        let stream = s.peek("/a").unwrap();
        assert!(stream.state.lock().producers.is_empty());
        // Forgotten means new: a lower epoch is accepted instead of fenced.
        s.append("/a", produce("p2", 0, 0)).await.unwrap();
        assert_eq!(s.producer_count(), 1);
    }

    #[tokio::test]
    async fn no_timeout_never_forgets() {
        let s = streams(Limits::default());
        s.create("/a", CreateRequest::default()).await.unwrap();
        s.append("/a", produce("p", 1, 0)).await.unwrap();
        assert_eq!(s.sweep_idle_producers(u64::MAX), 0);
        assert!(matches!(
            s.append("/a", produce("p", 0, 0)).await,
            Err(StreamError::Producer(
                producer::ProducerError::StaleEpoch { .. }
            ))
        ));
    }

    #[tokio::test]
    async fn a_stream_holds_a_watch_only_while_someone_watches() {
        let s = streams(Limits::default());
        s.create("/w", CreateRequest::default()).await.unwrap();
        let stream = s.peek("/w").unwrap();
        assert!(stream.visible.lock().watch().is_none(), "idle: no watch");
        let mut rx = stream.subscribe();
        assert_eq!(stream.live_readers(), 1);
        s.append(
            "/w",
            AppendRequest {
                content_type: Some("application/octet-stream".into()),
                body: Bytes::from_static(b"abc"),
                ..AppendRequest::default()
            },
        )
        .await
        .unwrap();
        // The watcher saw the change.
        let seen = *rx.wait_for(|v| v.tail == 3).await.unwrap();
        assert_eq!(seen.tail, 3);
        drop(rx);
        assert_eq!(stream.live_readers(), 0);
        s.append(
            "/w",
            AppendRequest {
                content_type: Some("application/octet-stream".into()),
                body: Bytes::from_static(b"d"),
                ..AppendRequest::default()
            },
        )
        .await
        .unwrap();
        assert!(
            stream.visible.lock().watch().is_none(),
            "the first change after the last watcher left drops the watch"
        );
        assert_eq!(stream.visible().tail, 4);
    }

    #[tokio::test]
    async fn streams_past_the_limit_are_refused_and_the_servers_own_are_not_counted() {
        let s = streams(Limits {
            max_streams: 1,
            ..Limits::default()
        });
        s.create("/one", CreateRequest::default()).await.unwrap();
        assert!(matches!(
            s.create("/two", CreateRequest::default()).await,
            Err(StreamError::StreamsFull { limit: 1 })
        ));
        s.create_any("/_ds/own", CreateRequest::default())
            .await
            .unwrap();
    }
}
#[cfg(test)]
mod size {
    #[test]
    fn common_content_types_share_one_allocation() {
        use std::sync::Arc;
        let (a, b) = (
            crate::storage::shared_content_type("application/json"),
            crate::storage::shared_content_type("application/json"),
        );
        assert!(Arc::ptr_eq(&a, &b));
        let (c, d) = (
            crate::storage::shared_content_type("application/x-mine"),
            crate::storage::shared_content_type("application/x-mine"),
        );
        assert_eq!(c, d);
        assert!(
            !Arc::ptr_eq(&c, &d),
            "an uncommon type is not kept in a table"
        );
    }

    /// Every stream's state is in RAM for as long as it exists, idle or not: with the `Arc`'s
    /// two counters it must fit jemalloc's 160-byte size class (the next is 192; before the
    /// metadata was shared with the log, 320; before the rarely used parts of the writer state
    /// were boxed together, 224; before the release queue joined them and the events hook
    /// became a thin pointer, 192). Rarely used parts (a closing producer, a `Stream-Seq`, fork
    /// pins, the release queue, producers, live readers' watch and shared read) are boxed.
    #[test]
    fn a_stream_fits_a_160_byte_allocation() {
        assert!(std::mem::size_of::<super::Stream>() + 16 <= 160);
        assert!(std::mem::size_of::<crate::storage::memory::MemoryLog>() + 16 <= 80);
    }
}
