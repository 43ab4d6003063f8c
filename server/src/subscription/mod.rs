//! Subscriptions (protocol sections 6 and 7): durable cursors over streams that wake workers by
//! webhook or by events on a wake stream. Design: `server/SUBSCRIPTIONS.md`.
//!
//! Owns every subscription's configuration, links (per stream: how it is linked and the acked
//! offset), generation and current wake, and the rules of claims, acks, releases, callbacks,
//! leases and fencing. Knows nothing of HTTP. Side effects (wake events, webhook POSTs) are
//! returned as [`Effect`]s and run by the delivery task (`delivery`), never on the append path:
//! the stream layer only tells [`Notices`] that a linked stream moved, which costs a map lookup
//! and at most one channel send per wake cycle.
//!
//! Concurrency: one mutex guards the whole state. Control requests and the delivery task take
//! it, appends never do. No await happens under it: an operation decides under the lock and
//! returns the records to persist and the effects to run, which the caller awaits afterwards
//! (persist first, so nothing is announced that a crash could take back).

pub mod delivery;
pub mod error;
pub mod glob;
pub mod signing;
pub mod webhook_target;

use std::collections::{BTreeMap, BTreeSet, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use dashmap::DashMap;
use ds_protocol::Offset;
use parking_lot::Mutex;
use serde::{Deserialize, Serialize};
use tokio::sync::mpsc;

pub use error::SubscriptionError;
use glob::Glob;
use signing::SigningKey;

use crate::storage::{RecordWrite, Storage, StreamId};
use crate::stream::{Stream, StreamError, StreamEvents, Streams, now_ms};

/// Shortest and longest `lease_ttl_ms`, and the default (section 6.2).
pub const MIN_LEASE_MS: u64 = 1_000;
pub const MAX_LEASE_MS: u64 = 600_000;
pub const DEFAULT_LEASE_MS: u64 = 30_000;
/// Most stream paths in one `streams[]` list.
pub const MAX_STREAMS_PER_REQUEST: usize = 1_000;
/// Most pending streams one wake names; the rest stay pending and wake again.
pub const MAX_WAKE_STREAMS: usize = 1_000;
/// Longest subscription id, worker name, description and stream path.
pub const MAX_ID_BYTES: usize = 256;
pub const MAX_DESCRIPTION_BYTES: usize = 4_096;
pub const MAX_PATH_BYTES: usize = 1_024;

/// Settings from `DS_SUBSCRIPTIONS__*`.
#[derive(Clone, Debug)]
pub struct Settings {
    pub max_subscriptions: u64,
    pub max_links: u64,
    pub allow_local_webhooks: bool,
    /// Origin for `callback_url` and `jwks_url`; `None` takes it from the creating request.
    pub public_url: Option<String>,
    pub retry_min: Duration,
    pub retry_max: Duration,
    pub webhook_timeout: Duration,
}

/// How a subscription delivers its wakes.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub enum Delivery {
    Webhook {
        url: String,
    },
    /// The root-relative path of the wake stream.
    PullWake {
        wake_stream: String,
    },
}

impl Delivery {
    pub fn type_name(&self) -> &'static str {
        match self {
            Delivery::Webhook { .. } => "webhook",
            Delivery::PullWake { .. } => "pull-wake",
        }
    }
}

/// A subscription's configuration as requested (root-relative paths).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Spec {
    pub delivery: Delivery,
    pub pattern: Option<String>,
    pub streams: Vec<String>,
    pub lease_ttl_ms: u64,
    pub description: Option<String>,
    /// Extension (`"links_from": "start"`): explicit links and the pattern's backfill start at
    /// each existing stream's beginning instead of its tail, so that what the subscriber has
    /// not processed yet stays pending (and unreleased under acked retention). ds-sync asks for
    /// it: Postgres must get what the server held before the subscription existed. Not
    /// serialized when off, so hashes of subscriptions without it are unchanged.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub links_from_start: bool,
}

impl Spec {
    /// Checks every field and normalises `streams` (sorted, no duplicates).
    fn validate(&mut self, settings: &Settings) -> Result<Option<Glob>, SubscriptionError> {
        if self.pattern.is_none() && self.streams.is_empty() {
            return Err(SubscriptionError::Invalid(
                "a subscription needs a pattern, streams, or both".into(),
            ));
        }
        let glob = self.pattern.as_deref().map(Glob::parse).transpose()?;
        self.streams = normalise_paths(std::mem::take(&mut self.streams))?;
        if !(MIN_LEASE_MS..=MAX_LEASE_MS).contains(&self.lease_ttl_ms) {
            return Err(SubscriptionError::Invalid(format!(
                "lease_ttl_ms {} is outside {MIN_LEASE_MS}..={MAX_LEASE_MS}",
                self.lease_ttl_ms
            )));
        }
        if self
            .description
            .as_ref()
            .is_some_and(|d| d.len() > MAX_DESCRIPTION_BYTES)
        {
            return Err(SubscriptionError::Invalid(format!(
                "description is longer than {MAX_DESCRIPTION_BYTES} bytes"
            )));
        }
        match &self.delivery {
            Delivery::Webhook { url } => {
                webhook_target::check(url, settings.allow_local_webhooks)
                    .map_err(SubscriptionError::WebhookUrlRejected)?;
            }
            Delivery::PullWake { wake_stream } => {
                check_relative_path(wake_stream, "wake_stream")?;
            }
        }
        Ok(glob)
    }

    /// SHA-256 of the normalised configuration (section 6.2's re-confirmation rule).
    fn hash(&self) -> [u8; 32] {
        let canonical = serde_json::to_vec(self).unwrap_or_default();
        let d = ring::digest::digest(&ring::digest::SHA256, &canonical);
        let mut out = [0u8; 32];
        out.copy_from_slice(d.as_ref());
        out
    }
}

/// Checks a root-relative stream path from a request body.
pub fn check_relative_path(path: &str, what: &str) -> Result<(), SubscriptionError> {
    let bad = |why: &str| SubscriptionError::Invalid(format!("{what} {path:?}: {why}"));
    if path.is_empty() {
        return Err(bad("is empty"));
    }
    if path.len() > MAX_PATH_BYTES {
        return Err(bad(&format!("is longer than {MAX_PATH_BYTES} bytes")));
    }
    if path.starts_with('/') {
        return Err(bad("must be relative to the stream root (no leading '/')"));
    }
    if path
        .split('/')
        .any(|s| s.is_empty() || s == "." || s == ".." || s == crate::stream::CONTROL_SEGMENT)
    {
        return Err(bad("has an empty, '.', '..' or '__ds' segment"));
    }
    if path
        .bytes()
        .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#')
    {
        return Err(bad("has a character that is not allowed in a URL path"));
    }
    Ok(())
}

fn normalise_paths(paths: Vec<String>) -> Result<Vec<String>, SubscriptionError> {
    if paths.len() > MAX_STREAMS_PER_REQUEST {
        return Err(SubscriptionError::Invalid(format!(
            "streams lists at most {MAX_STREAMS_PER_REQUEST} paths"
        )));
    }
    for p in &paths {
        check_relative_path(p, "stream")?;
    }
    let set: BTreeSet<String> = paths.into_iter().collect();
    Ok(set.into_iter().collect())
}

/// A subscription's identity: its stream root (ending in `/`) and its id.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct SubKey {
    pub root: String,
    pub id: String,
}

impl SubKey {
    fn record_key(&self) -> Vec<u8> {
        let mut k = SUBSCRIPTION_PREFIX.to_vec();
        k.extend_from_slice(self.root.as_bytes());
        k.push(0);
        k.extend_from_slice(self.id.as_bytes());
        k
    }

    /// One record per link, so an ack writes the links it moves, not the whole subscription.
    fn link_key(&self, full: &str) -> Vec<u8> {
        let mut k = LINK_PREFIX.to_vec();
        k.extend_from_slice(self.root.as_bytes());
        k.push(0);
        k.extend_from_slice(self.id.as_bytes());
        k.push(0);
        k.extend_from_slice(full.as_bytes());
        k
    }

    /// The subscription and stream path of a link record's key.
    fn parse_link_key(key: &[u8]) -> Option<(SubKey, String)> {
        let rest = key.strip_prefix(LINK_PREFIX)?;
        let text = std::str::from_utf8(rest).ok()?;
        let mut parts = text.splitn(3, '\0');
        let root = parts.next()?.to_owned();
        let id = parts.next()?.to_owned();
        let full = parts.next()?.to_owned();
        Some((SubKey { root, id }, full))
    }
}

/// Record key prefixes (`storage::records`).
const SUBSCRIPTION_PREFIX: &[u8] = b"subscription\0";
const LINK_PREFIX: &[u8] = b"link\0";

/// One stream linked to a subscription.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Link {
    explicit: bool,
    glob: bool,
    /// Last processed offset, inclusive: the next read starts here.
    acked: u64,
    /// The stream instance the acked offset belongs to (`None`: no such stream yet).
    stream_id: Option<StreamId>,
}

/// The wake in flight.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
struct Wake {
    id: String,
    generation: u64,
    /// SHA-256 of the bearer token that may act on this wake (none before a pull-wake claim).
    token: Option<[u8; 32]>,
    holder: Option<String>,
    lease_until_ms: Option<u64>,
    /// Full paths and tails the wake announced; a webhook's `{"done": true}` acks these.
    snapshot: Vec<(String, u64)>,
    /// Webhooks: failed attempts so far and when the next one is due.
    attempt: u32,
    next_attempt_ms: Option<u64>,
}

/// A subscription with its state; one durable record.
#[derive(Clone, Debug, Serialize, Deserialize)]
struct Subscription {
    key: SubKey,
    spec: Spec,
    hash: [u8; 32],
    /// Origin (`scheme://host`) for the absolute URLs this subscription hands out.
    origin: String,
    created_at_ms: u64,
    /// Persisted as records of their own (`link_write`).
    #[serde(skip)]
    links: BTreeMap<String, Link>,
    generation: u64,
    wake: Option<Wake>,
    #[serde(skip)]
    glob: Option<Glob>,
}

impl Subscription {
    fn full_path(&self, rel: &str) -> String {
        format!("{}{rel}", self.key.root)
    }

    fn relative<'a>(&self, full: &'a str) -> &'a str {
        full.strip_prefix(self.key.root.as_str()).unwrap_or(full)
    }

    fn wake_stream_full(&self) -> Option<String> {
        match &self.spec.delivery {
            Delivery::PullWake { wake_stream } => Some(self.full_path(wake_stream)),
            Delivery::Webhook { .. } => None,
        }
    }

    /// Whether a stream at `full` belongs to this subscription's pattern.
    fn pattern_matches(&self, full: &str) -> bool {
        let Some(glob) = &self.glob else {
            return false;
        };
        let Some(rel) = full.strip_prefix(self.key.root.as_str()) else {
            return false;
        };
        Some(full.to_owned()) != self.wake_stream_full() && glob.matches(rel)
    }

    fn status(&self) -> &'static str {
        match &self.wake {
            Some(w) if w.next_attempt_ms.is_some() => "failed",
            _ => "active",
        }
    }

    /// The subscription's own record (configuration and delivery state, not its links).
    fn record(&self) -> RecordWrite {
        RecordWrite {
            key: self.key.record_key(),
            value: Some(serde_json::to_vec(self).unwrap_or_default()),
        }
    }

    /// The record of the link to `full` as it is now (absent: deleted).
    fn link_write(&self, full: &str) -> RecordWrite {
        RecordWrite {
            key: self.key.link_key(full),
            value: self
                .links
                .get(full)
                .map(|l| serde_json::to_vec(l).unwrap_or_default()),
        }
    }
}

/// A linked stream as shown to clients (section 6.3 and the wake snapshots of section 7).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct LinkView {
    /// Root-relative.
    pub path: String,
    pub explicit: bool,
    pub acked: u64,
    /// Present in wake snapshots.
    pub tail: Option<u64>,
}

impl LinkView {
    pub fn link_type(&self) -> &'static str {
        if self.explicit { "explicit" } else { "glob" }
    }

    /// JSON as section 7 shows it (offsets in their wire form).
    pub fn to_json(&self) -> serde_json::Value {
        let mut v = serde_json::json!({
            "path": self.path,
            "link_type": self.link_type(),
            "acked_offset": Offset::at(self.acked).to_string(),
        });
        if let Some(tail) = self.tail {
            v["tail_offset"] = Offset::at(tail).to_string().into();
            v["has_pending"] = (tail > self.acked).into();
        }
        v
    }
}

/// A subscription as shown to clients.
#[derive(Clone, Debug)]
pub struct View {
    pub key: SubKey,
    pub spec: Spec,
    pub links: Vec<LinkView>,
    pub created_at_ms: u64,
    pub status: &'static str,
    pub generation: u64,
    /// For webhooks: the active key's id and the JWKS URL.
    pub signing: Option<(String, String)>,
}

/// A successful claim.
#[derive(Clone, Debug)]
pub struct Claim {
    pub wake_id: String,
    pub generation: u64,
    pub token: String,
    pub streams: Vec<LinkView>,
    pub lease_ttl_ms: u64,
}

/// An ack or a callback, with offsets already parsed.
#[derive(Clone, Debug)]
pub struct AckRequest {
    pub wake_id: String,
    pub generation: u64,
    /// Root-relative paths and offsets.
    pub acks: Vec<(String, u64)>,
    /// Parallel to `acks` (missing entries are `None`): the stream instance (`Stream-Id`) each
    /// ack is about. An ack naming an instance that is no longer the link's (deleted, or the
    /// path re-created) is skipped, never applied to the newer stream: a subscriber such as
    /// ds-sync acking a deleted incarnation late must not move the cursor of its successor.
    pub stream_ids: Vec<Option<StreamId>>,
    pub done: bool,
}

impl AckRequest {
    /// The stream instance ack `i` names, if any.
    fn stream_id(&self, i: usize) -> Option<StreamId> {
        self.stream_ids.get(i).copied().flatten()
    }
}

/// What the delivery task must do once the state change is durable.
#[derive(Debug)]
pub enum Effect {
    /// Append a wake event to a wake stream (full path).
    WakeEvent { stream: String, body: bytes::Bytes },
    /// POST a signed webhook.
    Post {
        key: SubKey,
        wake_id: String,
        url: String,
        body: Vec<u8>,
    },
}

/// A state change: the records to persist, then the effects to run.
#[derive(Debug, Default)]
struct Changes {
    writes: Vec<RecordWrite>,
    effects: Vec<Effect>,
    /// A deadline was added or moved: the delivery task must recompute its sleep.
    rescheduled: bool,
}

/// Changes whose records are submitted to storage, with the effects to run once they are
/// durable.
struct Submitted {
    commit: Option<crate::storage::Commit>,
    effects: Vec<Effect>,
}

/// What the stream layer tells subscriptions.
#[derive(Debug)]
enum Notice {
    Created {
        path: String,
        id: StreamId,
        start: u64,
    },
    Moved(String),
    Removed {
        path: String,
        id: StreamId,
    },
}

/// The stream layer's side: a map lookup and at most one send per wake cycle.
pub struct Notices {
    /// Paths linked to at least one subscription, each with "a notice is already queued".
    linked: DashMap<String, AtomicBool>,
    /// Whether `linked` has any entry: a server without subscriptions (or whose subscriptions
    /// link nothing) answers an append without hashing its path for the lookup. Set after an
    /// entry is added and recomputed after one is removed, both under the subscriptions' state
    /// lock; an append that reads it just before a link lands is the append that would have
    /// missed the entry in the map.
    any_linked: AtomicBool,
    tx: mpsc::UnboundedSender<Notice>,
}

impl StreamEvents for Notices {
    fn created(&self, stream: &Stream) {
        let _ = self.tx.send(Notice::Created {
            path: stream.meta.path.to_string(),
            id: stream.meta.id,
            start: stream.own_start(),
        });
    }

    fn revealed(&self, stream: &Stream) {
        if !self.any_linked.load(Ordering::Acquire) {
            return;
        }
        if let Some(queued) = self.linked.get(&*stream.meta.path)
            && !queued.swap(true, Ordering::AcqRel)
        {
            let _ = self.tx.send(Notice::Moved(stream.meta.path.to_string()));
        }
    }

    fn removed(&self, stream: &Stream) {
        let _ = self.tx.send(Notice::Removed {
            path: stream.meta.path.to_string(),
            id: stream.meta.id,
        });
    }
}

/// Created with the stream layer, before [`Subscriptions::open`]: the stream layer needs the
/// notices at open, and subscriptions need the opened streams.
pub struct NoticeQueue {
    notices: Arc<Notices>,
    rx: mpsc::UnboundedReceiver<Notice>,
}

impl NoticeQueue {
    pub fn new() -> NoticeQueue {
        let (tx, rx) = mpsc::unbounded_channel();
        NoticeQueue {
            notices: Arc::new(Notices {
                linked: DashMap::new(),
                any_linked: AtomicBool::new(false),
                tx,
            }),
            rx,
        }
    }

    /// What to give [`Streams::open_observed`].
    pub fn events(&self) -> Arc<dyn StreamEvents> {
        self.notices.clone()
    }
}

impl Default for NoticeQueue {
    fn default() -> Self {
        Self::new()
    }
}

#[derive(Default)]
struct State {
    subs: HashMap<SubKey, Subscription>,
    /// Full stream path -> subscriptions linking it.
    by_path: HashMap<String, BTreeSet<SubKey>>,
    /// Lease expiries and webhook retries: (due at ms, subscription). Stale entries are
    /// skipped when they come due.
    timers: BTreeSet<(u64, SubKey)>,
}

/// Every subscription of the server.
pub struct Subscriptions {
    streams: Arc<Streams>,
    storage: Arc<dyn Storage>,
    settings: Settings,
    key: Arc<SigningKey>,
    state: Mutex<State>,
    notices: Arc<Notices>,
    /// Set when the storage mode promises durability the backend cannot give records yet.
    unsupported_mode: Option<&'static str>,
    /// Wakes the delivery task when a deadline moved.
    reschedule: tokio::sync::Notify,
    /// The queue's receiving end, taken once by the delivery task.
    inbox: Mutex<Option<mpsc::UnboundedReceiver<Notice>>>,
    webhooks: delivery::Webhooks,
    /// Milliseconds since the Unix epoch; a test clock in the model tests.
    clock: Clock,
}

/// Where subscriptions read the time (leases, retries, wake timestamps).
pub type Clock = Arc<dyn Fn() -> u64 + Send + Sync>;

impl std::fmt::Debug for Subscriptions {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Subscriptions")
            .field("count", &self.state.lock().subs.len())
            .finish()
    }
}

/// A fresh random identifier with a prefix (wake ids).
fn random_id(prefix: &str) -> Result<String, SubscriptionError> {
    let bytes = signing::random_bytes::<16>().ok_or(SubscriptionError::Random)?;
    let mut s = String::with_capacity(prefix.len() + 32);
    s.push_str(prefix);
    for b in bytes {
        s.push_str(&format!("{b:02x}"));
    }
    Ok(s)
}

impl Subscriptions {
    /// Loads stored subscriptions. `durable_mode` names a storage mode that promises durability
    /// (`None` for memory); if its backend cannot keep records, control requests are refused.
    pub fn open(
        streams: Arc<Streams>,
        storage: Arc<dyn Storage>,
        queue: NoticeQueue,
        settings: Settings,
        key: Arc<SigningKey>,
        durable_mode: Option<&'static str>,
    ) -> Result<Subscriptions, SubscriptionError> {
        let unsupported_mode = durable_mode.filter(|_| !storage.keeps_records());
        let mut state = State::default();
        if storage.keeps_records() {
            let corrupt =
                |what: &str, e: serde_json::Error| crate::storage::StorageError::Corrupt {
                    what: what.into(),
                    detail: e.to_string(),
                };
            let mut links = Vec::new();
            for (k, v) in storage.recover_records()? {
                if k.starts_with(SUBSCRIPTION_PREFIX) {
                    let mut sub: Subscription = serde_json::from_slice(&v)
                        .map_err(|e| corrupt("subscription record", e))?;
                    sub.glob = sub.spec.pattern.as_deref().map(Glob::parse).transpose()?;
                    state.subs.insert(sub.key.clone(), sub);
                } else if let Some((key, full)) = SubKey::parse_link_key(&k) {
                    let link: Link =
                        serde_json::from_slice(&v).map_err(|e| corrupt("link record", e))?;
                    links.push((key, full, link));
                }
            }
            for (key, full, link) in links {
                // A link whose subscription is gone was left by a crash between the two
                // records' batches; it is dropped (and rewritten away at the next compaction).
                if let Some(sub) = state.subs.get_mut(&key) {
                    sub.links.insert(full, link);
                }
            }
        }
        let subs = Subscriptions {
            streams,
            storage,
            key,
            state: Mutex::new(State::default()),
            notices: queue.notices,
            unsupported_mode,
            reschedule: tokio::sync::Notify::new(),
            inbox: Mutex::new(Some(queue.rx)),
            webhooks: delivery::Webhooks::new(
                settings.allow_local_webhooks,
                settings.webhook_timeout,
            )
            .map_err(|e| SubscriptionError::Invalid(format!("webhook client: {e}")))?,
            settings,
            clock: Arc::new(now_ms),
        };
        // Rebuild the indexes and deadlines of what was recovered.
        let keys: Vec<SubKey> = state.subs.keys().cloned().collect();
        for key in keys {
            subs.index_links(&mut state, &key);
            if let Some(sub) = state.subs.get(&key)
                && let Some(w) = &sub.wake
            {
                for due in [w.lease_until_ms, w.next_attempt_ms].into_iter().flatten() {
                    state.timers.insert((due, key.clone()));
                }
                if w.token.is_some() && w.holder.is_none() && w.lease_until_ms.is_none() {
                    // A webhook wake whose delivery was in flight at the crash: retry now.
                    state.timers.insert((0, key.clone()));
                }
            }
        }
        // Retention resumes where the stored acks left it (a restart forgets what was queued).
        let paths: Vec<String> = state.by_path.keys().cloned().collect();
        let floors = subs.release_floors(&state, &paths);
        *subs.state.lock() = state;
        subs.offer_releases(floors);
        Ok(subs)
    }

    /// Replaces the clock (tests drive leases and retries with a clock of their own).
    pub fn with_clock(mut self, clock: Clock) -> Subscriptions {
        self.clock = clock;
        self
    }

    fn now(&self) -> u64 {
        (self.clock)()
    }

    /// The webhook signing key.
    pub fn signing_key(&self) -> &Arc<SigningKey> {
        &self.key
    }

    pub fn settings(&self) -> &Settings {
        &self.settings
    }

    /// Refuses control requests in a mode whose durability the backend cannot give records.
    pub fn check_available(&self) -> Result<(), SubscriptionError> {
        match self.unsupported_mode {
            Some(mode) => Err(SubscriptionError::NotDurableHere(mode)),
            None => Ok(()),
        }
    }

    /// Number of subscriptions.
    pub fn len(&self) -> usize {
        self.state.lock().subs.len()
    }

    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The origin used for absolute URLs: the configured public URL, else `request_origin`.
    fn origin_for(&self, request_origin: &str) -> String {
        self.settings
            .public_url
            .clone()
            .unwrap_or_else(|| request_origin.to_owned())
            .trim_end_matches('/')
            .to_owned()
    }

    /// The JWKS URL of a root.
    pub fn jwks_url(&self, origin: &str, root: &str) -> String {
        format!(
            "{}{root}{}/jwks.json",
            self.origin_for(origin),
            crate::stream::CONTROL_SEGMENT
        )
    }

    fn callback_url(sub: &Subscription) -> String {
        format!(
            "{}{}{}/subscriptions/{}/callback",
            sub.origin,
            sub.key.root,
            crate::stream::CONTROL_SEGMENT,
            sub.key.id
        )
    }

    /// The visible tail of the stream instance a link refers to.
    fn tail_of(&self, full: &str, link: &Link) -> Option<u64> {
        let stream = self.streams.peek(full)?;
        if Some(stream.meta.id) != link.stream_id {
            return None;
        }
        let v = stream.visible();
        (!v.gone).then_some(v.tail)
    }

    /// The current tail and id of the stream at `full`, if any.
    fn current(&self, full: &str) -> Option<(StreamId, u64)> {
        let stream = self.streams.peek(full)?;
        let v = stream.visible();
        (!v.gone).then_some((stream.meta.id, v.tail))
    }

    fn view(&self, sub: &Subscription) -> View {
        View {
            key: sub.key.clone(),
            spec: sub.spec.clone(),
            links: sub
                .links
                .iter()
                .map(|(full, l)| LinkView {
                    path: sub.relative(full).to_owned(),
                    explicit: l.explicit,
                    acked: l.acked,
                    tail: None,
                })
                .collect(),
            created_at_ms: sub.created_at_ms,
            status: sub.status(),
            generation: sub.generation,
            signing: matches!(sub.spec.delivery, Delivery::Webhook { .. }).then(|| {
                (
                    self.key.kid().to_owned(),
                    format!(
                        "{}{}{}/jwks.json",
                        sub.origin,
                        sub.key.root,
                        crate::stream::CONTROL_SEGMENT
                    ),
                )
            }),
        }
    }

    /// Pending links with their tails, at most [`MAX_WAKE_STREAMS`].
    fn pending(&self, sub: &Subscription) -> Vec<LinkView> {
        let mut out = Vec::new();
        for (full, link) in &sub.links {
            if let Some(tail) = self.tail_of(full, link)
                && tail > link.acked
            {
                out.push(LinkView {
                    path: sub.relative(full).to_owned(),
                    explicit: link.explicit,
                    acked: link.acked,
                    tail: Some(tail),
                });
                if out.len() == MAX_WAKE_STREAMS {
                    break;
                }
            }
        }
        out
    }

    /// Updates the path index and the stream layer's "linked" map for all of `key`'s links
    /// (a new subscription, or one recovered at start-up).
    fn index_links(&self, st: &mut State, key: &SubKey) {
        let Some(sub) = st.subs.get(key) else {
            return;
        };
        let paths: Vec<String> = sub.links.keys().cloned().collect();
        for p in paths {
            self.index_path(st, key, p);
        }
    }

    /// Indexes one link of `key`: O(log subscriptions of that path), whatever the number of
    /// links (a stream created under 1 000 pattern subscriptions is linked 1 000 times).
    fn index_path(&self, st: &mut State, key: &SubKey, full: String) {
        let subs = st.by_path.entry(full.clone()).or_default();
        if !subs.contains(key) {
            subs.insert(key.clone());
        }
        // Cleared: the subscription may be idle, so appends must send notices.
        self.notices
            .linked
            .entry(full)
            .or_insert_with(|| AtomicBool::new(false))
            .store(false, Ordering::Release);
        self.notices.any_linked.store(true, Ordering::Release);
    }

    /// A wake ended: appends to the subscription's streams must send notices again. (While
    /// every subscription linking a stream has a wake in flight, its notice flag stays set and
    /// an append costs a map lookup and an atomic swap, nothing more; each ending wake checks
    /// for pending work itself.)
    fn reopen_notices(&self, sub: &Subscription) {
        for full in sub.links.keys() {
            if let Some(flag) = self.notices.linked.get(full) {
                flag.store(false, Ordering::Release);
            }
        }
    }

    /// Drops `full` from the index for `key` (the link is gone).
    fn unindex(&self, st: &mut State, key: &SubKey, full: &str) {
        if let Some(set) = st.by_path.get_mut(full) {
            set.remove(key);
            if set.is_empty() {
                st.by_path.remove(full);
                self.notices.linked.remove(full);
                self.notices
                    .any_linked
                    .store(!self.notices.linked.is_empty(), Ordering::Release);
            }
        }
    }

    /// Submits the changes' records. Called with the state lock held, so records reach the
    /// storage in the order the state changed (each record is a whole subscription: a later
    /// version landing first would be overwritten by an older one).
    fn submit(&self, changes: Changes) -> Submitted {
        if changes.rescheduled {
            self.reschedule.notify_one();
        }
        let commit = (self.storage.keeps_records() && !changes.writes.is_empty())
            .then(|| self.storage.write_records(changes.writes));
        Submitted {
            commit,
            effects: changes.effects,
        }
    }

    /// Waits until the submitted records are durable, then hands the effects to the caller:
    /// nothing is announced (a wake, an answer) that a crash could take back.
    async fn commit(&self, submitted: Submitted) -> Result<Vec<Effect>, SubscriptionError> {
        if let Some(commit) = submitted.commit {
            commit.await?;
        }
        Ok(submitted.effects)
    }

    /// For retention: each of `paths` whose stream every linked subscription acked, with the
    /// lowest acked offset (what may be released). A stream no subscription links, or one a
    /// subscription links for another instance (its create notice is still queued), has none.
    fn release_floors(&self, st: &State, paths: &[String]) -> Vec<(Arc<Stream>, u64)> {
        let mut out = Vec::new();
        for full in paths {
            let (Some(stream), Some(keys)) = (self.streams.peek(full), st.by_path.get(full)) else {
                continue;
            };
            let id = Some(stream.meta.id);
            let floor = keys.iter().try_fold(u64::MAX, |floor, key| {
                let link = st.subs.get(key)?.links.get(full)?;
                (link.stream_id == id).then_some(floor.min(link.acked))
            });
            if let Some(floor) = floor.filter(|f| *f != u64::MAX) {
                out.push((stream, floor));
            }
        }
        out
    }

    /// Hands release floors to the stream layer, once the acks behind them are stored.
    fn offer_releases(&self, floors: Vec<(Arc<Stream>, u64)>) {
        for (stream, floor) in floors {
            self.streams.offer_release(&stream, floor);
        }
    }

    // ---- control requests (section 6) ----

    /// PUT: create, or re-confirm an identical subscription. `Ok((view, created))`.
    pub async fn put(
        &self,
        key: SubKey,
        mut spec: Spec,
        request_origin: &str,
    ) -> Result<(View, bool, Vec<Effect>), SubscriptionError> {
        self.check_available()?;
        if key.id.is_empty()
            || key.id.len() > MAX_ID_BYTES
            || key.id.chars().any(|c| c.is_control() || c == '/')
        {
            return Err(SubscriptionError::Invalid(format!(
                "subscription id must be 1 to {MAX_ID_BYTES} bytes without '/' or control characters"
            )));
        }
        let glob = spec.validate(&self.settings)?;
        let hash = spec.hash();
        let (view, changes) = {
            let mut st = self.state.lock();
            if let Some(existing) = st.subs.get(&key) {
                if existing.hash != hash {
                    return Err(SubscriptionError::ConfigConflict);
                }
                return Ok((self.view(existing), false, Vec::new()));
            }
            if st.subs.len() as u64 >= self.settings.max_subscriptions {
                return Err(SubscriptionError::TooManySubscriptions {
                    limit: self.settings.max_subscriptions,
                });
            }
            let mut sub = Subscription {
                key: key.clone(),
                origin: self.origin_for(request_origin),
                created_at_ms: self.now(),
                links: BTreeMap::new(),
                generation: 0,
                wake: None,
                glob,
                hash,
                spec,
            };
            // Explicit streams at their current tail (an absent one from its start, when made),
            // or at their start with `links_from_start`.
            let from_start = sub.spec.links_from_start;
            for rel in sub.spec.streams.clone() {
                let full = sub.full_path(&rel);
                let (stream_id, acked) = match self.current(&full) {
                    Some((id, tail)) => (Some(id), if from_start { 0 } else { tail }),
                    None => (None, 0),
                };
                sub.links.insert(
                    full,
                    Link {
                        explicit: true,
                        glob: false,
                        acked,
                        stream_id,
                    },
                );
            }
            // Eager backfill of matching streams at their current tail (section 6.2).
            if sub.glob.is_some() {
                for stream in self.streams.all() {
                    let full = &stream.meta.path;
                    if !sub.pattern_matches(full) {
                        continue;
                    }
                    let v = stream.visible();
                    if v.gone {
                        continue;
                    }
                    let link = sub.links.entry(full.to_string()).or_insert(Link {
                        explicit: false,
                        glob: true,
                        acked: if from_start { 0 } else { v.tail },
                        stream_id: Some(stream.meta.id),
                    });
                    link.glob = true;
                    if sub.links.len() as u64 > self.settings.max_links {
                        return Err(SubscriptionError::TooManyLinks {
                            limit: self.settings.max_links,
                        });
                    }
                }
            }
            if sub.links.len() as u64 > self.settings.max_links {
                return Err(SubscriptionError::TooManyLinks {
                    limit: self.settings.max_links,
                });
            }
            let mut writes = vec![sub.record()];
            writes.extend(sub.links.keys().map(|full| sub.link_write(full)));
            let changes = Changes {
                writes,
                ..Changes::default()
            };
            let view = self.view(&sub);
            st.subs.insert(key.clone(), sub);
            self.index_links(&mut st, &key);
            (view, self.submit(changes))
        };
        let effects = self.commit(changes).await?;
        Ok((view, true, effects))
    }

    pub fn get(&self, key: &SubKey) -> Result<View, SubscriptionError> {
        self.check_available()?;
        let st = self.state.lock();
        let sub = st.subs.get(key).ok_or(SubscriptionError::NotFound)?;
        Ok(self.view(sub))
    }

    /// DELETE: the subscription and its links go; requests for its wakes fail from now on.
    pub async fn delete(&self, key: &SubKey) -> Result<(), SubscriptionError> {
        self.check_available()?;
        let floors;
        let changes = {
            let mut st = self.state.lock();
            let sub = st.subs.remove(key).ok_or(SubscriptionError::NotFound)?;
            for full in sub.links.keys() {
                self.unindex(&mut st, key, full);
            }
            // The others linking these streams may have acked further.
            let paths: Vec<String> = sub.links.keys().cloned().collect();
            floors = self.release_floors(&st, &paths);
            let mut writes = vec![RecordWrite {
                key: key.record_key(),
                value: None,
            }];
            writes.extend(sub.links.keys().map(|full| RecordWrite {
                key: key.link_key(full),
                value: None,
            }));
            self.submit(Changes {
                writes,
                ..Changes::default()
            })
        };
        self.commit(changes).await?;
        self.offer_releases(floors);
        Ok(())
    }

    /// POST `.../streams`: explicit links, idempotent.
    pub async fn add_streams(
        &self,
        key: &SubKey,
        streams: Vec<String>,
    ) -> Result<Vec<Effect>, SubscriptionError> {
        self.check_available()?;
        let streams = normalise_paths(streams)?;
        let changes = {
            let mut st = self.state.lock();
            let sub = st.subs.get_mut(key).ok_or(SubscriptionError::NotFound)?;
            let new = streams
                .iter()
                .filter(|rel| !sub.links.contains_key(&sub.full_path(rel)))
                .count();
            if (sub.links.len() + new) as u64 > self.settings.max_links {
                return Err(SubscriptionError::TooManyLinks {
                    limit: self.settings.max_links,
                });
            }
            let from_start = sub.spec.links_from_start;
            for rel in &streams {
                let full = sub.full_path(rel);
                let current = self.current(&full);
                let link = sub.links.entry(full).or_insert_with(|| {
                    let (stream_id, acked) = match current {
                        Some((id, tail)) => (Some(id), if from_start { 0 } else { tail }),
                        None => (None, 0),
                    };
                    Link {
                        explicit: true,
                        glob: false,
                        acked,
                        stream_id,
                    }
                });
                link.explicit = true;
            }
            let fulls: Vec<String> = streams.iter().map(|rel| sub.full_path(rel)).collect();
            let changes = Changes {
                writes: fulls.iter().map(|full| sub.link_write(full)).collect(),
                ..Changes::default()
            };
            for full in fulls {
                self.index_path(&mut st, key, full);
            }
            self.submit(changes)
        };
        self.commit(changes).await
    }

    /// DELETE `.../streams/:path`: removes only the explicit link, idempotent.
    pub async fn remove_stream(&self, key: &SubKey, rel: &str) -> Result<(), SubscriptionError> {
        self.check_available()?;
        check_relative_path(rel, "stream")?;
        let changes = {
            let mut st = self.state.lock();
            let sub = st.subs.get_mut(key).ok_or(SubscriptionError::NotFound)?;
            let full = sub.full_path(rel);
            let mut gone = false;
            if let Some(link) = sub.links.get_mut(&full) {
                link.explicit = false;
                if !link.glob {
                    sub.links.remove(&full);
                    gone = true;
                }
            }
            let changes = Changes {
                writes: vec![sub.link_write(&full)],
                ..Changes::default()
            };
            if gone {
                self.unindex(&mut st, key, &full);
            }
            self.submit(changes)
        };
        self.commit(changes).await?;
        Ok(())
    }

    // ---- delivery rules (section 7) ----

    /// Starts a new wake: the next generation, a fresh id. Webhooks get a token now (it goes in
    /// the POST); pull-wake wakes get theirs when claimed.
    fn start_wake(&self, sub: &mut Subscription) -> Result<(), SubscriptionError> {
        sub.generation += 1;
        sub.wake = Some(Wake {
            id: random_id("w_")?,
            generation: sub.generation,
            token: None,
            holder: None,
            lease_until_ms: None,
            snapshot: Vec::new(),
            attempt: 0,
            next_attempt_ms: None,
        });
        Ok(())
    }

    /// The webhook POST for the current wake, with a fresh token (each attempt gets its own,
    /// so no token is ever stored in a durable record).
    fn webhook_post(
        &self,
        sub: &mut Subscription,
        pending: &[LinkView],
    ) -> Result<Option<Effect>, SubscriptionError> {
        let Delivery::Webhook { url } = &sub.spec.delivery else {
            return Ok(None);
        };
        let url = url.clone();
        let callback_url = Self::callback_url(sub);
        let token = signing::random_token().ok_or(SubscriptionError::Random)?;
        let Some(wake) = sub.wake.as_mut() else {
            return Ok(None);
        };
        wake.token = Some(signing::token_digest(&token));
        let body = serde_json::json!({
            "subscription_id": sub.key.id,
            "wake_id": wake.id,
            "generation": wake.generation,
            "streams": pending.iter().map(LinkView::to_json).collect::<Vec<_>>(),
            "callback_url": callback_url,
            "callback_token": token,
        });
        Ok(Some(Effect::Post {
            key: sub.key.clone(),
            wake_id: wake.id.clone(),
            url,
            body: serde_json::to_vec(&body).unwrap_or_default(),
        }))
    }

    /// If `key` is idle with pending work, starts a wake and says how to announce it.
    fn poke(&self, st: &mut State, key: &SubKey, changes: &mut Changes) {
        let Some(sub) = st.subs.get_mut(key) else {
            return;
        };
        if sub.wake.is_some() {
            return;
        }
        let pending = self.pending(sub);
        if pending.is_empty() {
            return;
        }
        if let Err(e) = self.start_wake(sub) {
            tracing::error!(error = %e, subscription = %key.id, "cannot start a wake");
            return;
        }
        if let Some(w) = sub.wake.as_mut() {
            w.snapshot = pending
                .iter()
                .filter_map(|l| l.tail.map(|t| (format!("{}{}", key.root, l.path), t)))
                .collect();
        }
        match sub.spec.delivery.clone() {
            Delivery::PullWake { wake_stream } => {
                let body = serde_json::json!({
                    "type": "wake",
                    "subscription_id": key.id,
                    "stream": pending[0].path,
                    "generation": sub.generation,
                    "ts": self.now(),
                });
                changes.effects.push(Effect::WakeEvent {
                    stream: sub.full_path(&wake_stream),
                    body: bytes::Bytes::from(body.to_string()),
                });
            }
            Delivery::Webhook { .. } => match self.webhook_post(sub, &pending) {
                Ok(Some(effect)) => changes.effects.push(effect),
                Ok(None) => {}
                Err(e) => tracing::error!(error = %e, subscription = %key.id, "cannot sign a wake"),
            },
        }
        changes.writes.push(sub.record());
    }

    /// Checks that a request may act on the current wake (section 7.3). Expires a lapsed lease
    /// first: its holder no longer holds anything.
    fn fence(
        sub: &Subscription,
        token: &str,
        wake_id: &str,
        generation: u64,
        now: u64,
    ) -> Result<(), SubscriptionError> {
        let digest = signing::token_digest(token);
        let wake = sub.wake.as_ref().ok_or(SubscriptionError::Fenced)?;
        if wake.token != Some(digest) || wake.generation != generation || wake.id != wake_id {
            return Err(SubscriptionError::Fenced);
        }
        if wake.lease_until_ms.is_some_and(|t| t <= now) {
            return Err(SubscriptionError::Fenced);
        }
        Ok(())
    }

    fn set_lease(st: &mut State, key: &SubKey, until: u64, changes: &mut Changes) {
        if let Some(w) = st.subs.get_mut(key).and_then(|s| s.wake.as_mut()) {
            w.lease_until_ms = Some(until);
        }
        st.timers.insert((until, key.clone()));
        changes.rescheduled = true;
    }

    /// POST `.../claim` (pull-wake).
    pub async fn claim(
        &self,
        key: &SubKey,
        worker: &str,
    ) -> Result<(Claim, Vec<Effect>), SubscriptionError> {
        self.check_available()?;
        if worker.is_empty() || worker.len() > MAX_ID_BYTES {
            return Err(SubscriptionError::Invalid(format!(
                "worker must be 1 to {MAX_ID_BYTES} bytes"
            )));
        }
        let now = self.now();
        let (claim, changes) = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let sub = st.subs.get_mut(key).ok_or(SubscriptionError::NotFound)?;
            if !matches!(sub.spec.delivery, Delivery::PullWake { .. }) {
                return Err(SubscriptionError::WrongType {
                    expected: "pull-wake",
                });
            }
            if let Some(w) = &sub.wake
                && let Some(holder) = &w.holder
            {
                if w.lease_until_ms.is_some_and(|t| t > now) {
                    return Err(SubscriptionError::AlreadyClaimed {
                        holder: holder.clone(),
                        generation: w.generation,
                    });
                }
                // The lease lapsed and its timer has not run yet: the wake is over.
                sub.wake = None;
            }
            if sub.wake.is_none() {
                // Claiming an idle subscription starts a wake on the spot: the claimer may be
                // ahead of the wake event of the append it saw, or may want the lease itself.
                self.start_wake(sub)?;
            }
            let token = signing::random_token().ok_or(SubscriptionError::Random)?;
            let streams = self.pending(sub);
            let lease_ttl_ms = sub.spec.lease_ttl_ms;
            let Some(wake) = sub.wake.as_mut() else {
                return Err(SubscriptionError::Fenced);
            };
            wake.token = Some(signing::token_digest(&token));
            wake.holder = Some(worker.to_owned());
            wake.snapshot = streams
                .iter()
                .filter_map(|l| l.tail.map(|t| (format!("{}{}", key.root, l.path), t)))
                .collect();
            let claim = Claim {
                wake_id: wake.id.clone(),
                generation: wake.generation,
                token,
                streams,
                lease_ttl_ms,
            };
            Self::set_lease(&mut st, key, now + lease_ttl_ms, &mut changes);
            if let Some(sub) = st.subs.get(key) {
                changes.writes.push(sub.record());
            }
            (claim, self.submit(changes))
        };
        let effects = self.commit(changes).await?;
        Ok((claim, effects))
    }

    /// Refuses acks at offsets inside a JSON record before any state is touched (the check
    /// reads storage, so it runs before the state lock; data below a tail never changes, and a
    /// stream replaced meanwhile is caught by the link's stream id under the lock).
    async fn check_ack_boundaries(
        &self,
        key: &SubKey,
        req: &AckRequest,
    ) -> Result<(), SubscriptionError> {
        let targets: Vec<(String, Arc<Stream>, u64)> = {
            let st = self.state.lock();
            let Some(sub) = st.subs.get(key) else {
                return Ok(());
            };
            req.acks
                .iter()
                .enumerate()
                .filter_map(|(i, (rel, offset))| {
                    let stream = self.streams.peek(&sub.full_path(rel))?;
                    // An ack of another instance is skipped below, whatever its offset.
                    if req.stream_id(i).is_some_and(|id| id != stream.meta.id) {
                        return None;
                    }
                    Some((rel.clone(), stream, *offset))
                })
                .collect()
        };
        for (path, stream, offset) in targets {
            match self.streams.check_boundary(&stream, offset).await {
                Ok(()) => {}
                Err(StreamError::Misaligned(_)) => {
                    return Err(SubscriptionError::AckMisaligned { path, offset });
                }
                Err(e) => return Err(e.into()),
            }
        }
        Ok(())
    }

    /// POST `.../ack` (pull-wake) and `.../callback` (webhook): applies acks (never
    /// backwards), extends the lease, and with `done` ends the wake. Returns `next_wake`.
    pub async fn ack(
        &self,
        key: &SubKey,
        token: Option<&str>,
        req: AckRequest,
        webhook: bool,
    ) -> Result<(bool, Vec<Effect>), SubscriptionError> {
        self.check_available()?;
        let token = token.ok_or(SubscriptionError::Unauthorized)?;
        self.check_ack_boundaries(key, &req).await?;
        let now = self.now();
        let (next_wake, changes, floors) = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let sub = st.subs.get_mut(key).ok_or(SubscriptionError::NotFound)?;
            let is_webhook = matches!(sub.spec.delivery, Delivery::Webhook { .. });
            if is_webhook != webhook {
                return Err(SubscriptionError::WrongType {
                    expected: if is_webhook { "pull-wake" } else { "webhook" },
                });
            }
            // A stale request is fenced whatever it carries.
            Self::fence(sub, token, &req.wake_id, req.generation, now)?;
            // Every ack is checked before any is applied: nothing is half applied.
            let mut resolved = Vec::with_capacity(req.acks.len());
            // Links this request makes (see `early_link`), added once every ack passed.
            let mut early: Vec<(String, Link)> = Vec::new();
            for (i, (rel, offset)) in req.acks.iter().enumerate() {
                check_relative_path(rel, "stream")?;
                let full = sub.full_path(rel);
                let expected = req.stream_id(i);
                let link = match sub.links.get(&full) {
                    Some(link) => link.clone(),
                    None => match self.early_link(sub, &full, expected, early.len()) {
                        Some(link) => {
                            early.push((full.clone(), link.clone()));
                            link
                        }
                        // The instance acked is gone and its link with it: nothing to move.
                        None if expected.is_some() => continue,
                        None => return Err(SubscriptionError::NotLinked(rel.clone())),
                    },
                };
                if expected.is_some() && link.stream_id != expected {
                    continue;
                }
                let tail = self.tail_of(&full, &link).unwrap_or(link.acked);
                if *offset > tail {
                    return Err(SubscriptionError::AckBeyondTail {
                        path: rel.clone(),
                        offset: *offset,
                        tail,
                    });
                }
                resolved.push((full, *offset));
            }
            let lease_ttl_ms = sub.spec.lease_ttl_ms;
            let acked_paths: Vec<String> = resolved.iter().map(|(f, _)| f.clone()).collect();
            let mut linked_early = Vec::with_capacity(early.len());
            for (full, link) in early {
                sub.links.entry(full.clone()).or_insert(link);
                changes.writes.push(sub.link_write(&full));
                linked_early.push(full);
            }
            for (full, offset) in resolved {
                if let Some(link) = sub.links.get_mut(&full)
                    && offset > link.acked
                {
                    link.acked = offset;
                    changes.writes.push(sub.link_write(&full));
                }
            }
            let next_wake = if req.done {
                sub.wake = None;
                self.reopen_notices(sub);
                let pending = !self.pending(sub).is_empty();
                self.poke(&mut st, key, &mut changes);
                pending
            } else {
                Self::set_lease(&mut st, key, now + lease_ttl_ms, &mut changes);
                false
            };
            for full in linked_early {
                self.index_path(&mut st, key, full);
            }
            if let Some(sub) = st.subs.get(key) {
                changes.writes.push(sub.record());
            }
            let floors = self.release_floors(&st, &acked_paths);
            (next_wake, self.submit(changes), floors)
        };
        let effects = self.commit(changes).await?;
        self.offer_releases(floors);
        Ok((next_wake, effects))
    }

    /// The link an ack naming stream instance `expected` at `full` makes, where the
    /// subscription has none yet: the stream at `full` is that instance and the pattern covers
    /// it, so its create notice (which links it) is still queued behind other notices (the
    /// delivery task stores each change before the next, so it may trail a busy server). A
    /// subscriber that learned of the stream elsewhere (ds-sync: the registry) and acks it must
    /// not have that ack skipped: nothing would ack it again, and its data would never be
    /// released. Linked as the notice would link it (from the stream's start), then acked.
    /// `pending`: links this request makes already (they count against the limit).
    fn early_link(
        &self,
        sub: &Subscription,
        full: &str,
        expected: Option<StreamId>,
        pending: usize,
    ) -> Option<Link> {
        let id = expected?;
        let stream = self.streams.peek(full)?;
        let fits = ((sub.links.len() + pending) as u64) < self.settings.max_links;
        (stream.meta.id == id && sub.pattern_matches(full) && fits).then(|| Link {
            explicit: false,
            glob: true,
            acked: stream.own_start(),
            stream_id: Some(id),
        })
    }

    /// POST `.../release` (pull-wake): ends the wake without acks; pending work wakes again.
    pub async fn release(
        &self,
        key: &SubKey,
        token: Option<&str>,
        wake_id: &str,
        generation: u64,
    ) -> Result<Vec<Effect>, SubscriptionError> {
        self.check_available()?;
        let token = token.ok_or(SubscriptionError::Unauthorized)?;
        let now = self.now();
        let changes = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let sub = st.subs.get_mut(key).ok_or(SubscriptionError::NotFound)?;
            if !matches!(sub.spec.delivery, Delivery::PullWake { .. }) {
                return Err(SubscriptionError::WrongType {
                    expected: "pull-wake",
                });
            }
            Self::fence(sub, token, wake_id, generation, now)?;
            sub.wake = None;
            self.reopen_notices(sub);
            changes.writes.push(sub.record());
            self.poke(&mut st, key, &mut changes);
            self.submit(changes)
        };
        self.commit(changes).await
    }

    // ---- the delivery task's side ----

    /// The outcome of a webhook POST for wake `wake_id`.
    async fn webhook_outcome(
        &self,
        key: &SubKey,
        wake_id: &str,
        outcome: Result<bool, String>,
    ) -> Result<Vec<Effect>, SubscriptionError> {
        let now = self.now();
        let mut floors = Vec::new();
        let changes = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let Some(sub) = st.subs.get_mut(key) else {
                return Ok(Vec::new());
            };
            let Some(wake) = sub.wake.as_mut().filter(|w| w.id == wake_id) else {
                // Superseded (a callback ended it, the lease lapsed, or it was deleted).
                return Ok(Vec::new());
            };
            match outcome {
                Ok(true) => {
                    // `{"done": true}`: ack the snapshot, end the wake (section 7.1).
                    let snapshot = std::mem::take(&mut wake.snapshot);
                    let acked_paths: Vec<String> =
                        snapshot.iter().map(|(f, _)| f.clone()).collect();
                    sub.wake = None;
                    self.reopen_notices(sub);
                    for (full, tail) in snapshot {
                        if let Some(link) = sub.links.get_mut(&full)
                            && tail > link.acked
                        {
                            link.acked = tail;
                            changes.writes.push(sub.link_write(&full));
                        }
                    }
                    changes.writes.push(sub.record());
                    self.poke(&mut st, key, &mut changes);
                    floors = self.release_floors(&st, &acked_paths);
                }
                Ok(false) => {
                    wake.attempt = 0;
                    wake.next_attempt_ms = None;
                    let until = now + sub.spec.lease_ttl_ms;
                    Self::set_lease(&mut st, key, until, &mut changes);
                    if let Some(sub) = st.subs.get(key) {
                        changes.writes.push(sub.record());
                    }
                }
                Err(why) => {
                    wake.attempt = wake.attempt.saturating_add(1);
                    let delay = self.backoff(wake.attempt);
                    let due = now + delay.as_millis() as u64;
                    wake.next_attempt_ms = Some(due);
                    tracing::warn!(
                        subscription = %key.id, attempt = wake.attempt, error = %why,
                        retry_in = ?delay, "webhook delivery failed"
                    );
                    changes.writes.push(sub.record());
                    st.timers.insert((due, key.clone()));
                    changes.rescheduled = true;
                }
            }
            self.submit(changes)
        };
        let effects = self.commit(changes).await?;
        self.offer_releases(floors);
        Ok(effects)
    }

    /// Exponential backoff from `retry_min` to `retry_max` with ±20% jitter (section 7.1).
    fn backoff(&self, attempt: u32) -> Duration {
        let min = self.settings.retry_min.as_millis() as u64;
        let max = self.settings.retry_max.as_millis() as u64;
        let base = min
            .saturating_mul(1u64 << attempt.saturating_sub(1).min(30))
            .min(max);
        let jitter = base / 5;
        Duration::from_millis(base - jitter + fastrand::u64(0..=jitter * 2))
    }

    /// Runs what is due: lease expiries (section 7.3) and webhook retries. Returns the next
    /// deadline.
    async fn run_timers(&self) -> (Vec<Effect>, Option<u64>) {
        let now = self.now();
        let (changes, next) = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let mut due = Vec::new();
            while let Some(first) = st.timers.first().cloned() {
                if first.0 > now {
                    break;
                }
                st.timers.pop_first();
                due.push(first.1);
            }
            for key in due {
                let Some(sub) = st.subs.get_mut(&key) else {
                    continue;
                };
                let Some(wake) = sub.wake.as_mut() else {
                    continue;
                };
                if wake.lease_until_ms.is_some_and(|t| t <= now) {
                    // Lease expired: clear the holder and token; wake again if work is pending.
                    sub.wake = None;
                    self.reopen_notices(sub);
                    changes.writes.push(sub.record());
                    self.poke(&mut st, &key, &mut changes);
                } else if wake.lease_until_ms.is_none()
                    && wake.next_attempt_ms.is_none_or(|t| t <= now)
                    && matches!(sub.spec.delivery, Delivery::Webhook { .. })
                    && wake.token.is_some()
                {
                    wake.next_attempt_ms = None;
                    let pending = self.pending(sub);
                    if pending.is_empty() {
                        // Someone acked it all meanwhile: nothing to deliver.
                        sub.wake = None;
                        self.reopen_notices(sub);
                    } else {
                        if let Some(w) = sub.wake.as_mut() {
                            w.snapshot = pending
                                .iter()
                                .filter_map(|l| {
                                    l.tail.map(|t| (format!("{}{}", key.root, l.path), t))
                                })
                                .collect();
                        }
                        match self.webhook_post(sub, &pending) {
                            Ok(Some(e)) => changes.effects.push(e),
                            Ok(None) => {}
                            Err(e) => tracing::error!(error = %e, "cannot sign a webhook retry"),
                        }
                    }
                    changes.writes.push(sub.record());
                }
            }
            let next = st.timers.first().map(|t| t.0);
            (self.submit(changes), next)
        };
        match self.commit(changes).await {
            Ok(effects) => (effects, next),
            Err(e) => {
                tracing::error!(error = %e, "cannot persist subscription timers");
                (Vec::new(), next)
            }
        }
    }

    /// Wakes every idle subscription with pending work: at start-up, where appends made
    /// before a restart may have had no wake yet.
    async fn poke_all(&self) -> Vec<Effect> {
        let submitted = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            let keys: Vec<SubKey> = st.subs.keys().cloned().collect();
            for key in keys {
                self.poke(&mut st, &key, &mut changes);
            }
            self.submit(changes)
        };
        self.commit(submitted).await.unwrap_or_else(|e| {
            tracing::error!(error = %e, "cannot persist start-up wakes");
            Vec::new()
        })
    }

    /// Handles one notice from the stream layer.
    async fn on_notice(&self, notice: Notice) -> Vec<Effect> {
        let changes = {
            let mut st = self.state.lock();
            let mut changes = Changes::default();
            match notice {
                Notice::Moved(path) => {
                    // Cleared before looking, so an append after this point queues again.
                    if let Some(q) = self.notices.linked.get(&path) {
                        q.store(false, Ordering::Release);
                    }
                    let keys: Vec<SubKey> = st
                        .by_path
                        .get(&path)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default();
                    for key in &keys {
                        self.poke(&mut st, key, &mut changes);
                    }
                    // Every subscription of this stream has a wake in flight: appends need send
                    // nothing until one of those wakes ends (which clears the flag again).
                    if keys
                        .iter()
                        .all(|k| st.subs.get(k).is_some_and(|s| s.wake.is_some()))
                        && let Some(q) = self.notices.linked.get(&path)
                    {
                        q.store(true, Ordering::Release);
                    }
                }
                Notice::Created { path, id, start } => {
                    // Linked before its first data counts: acked at its start, so everything
                    // it holds is pending (section 6.2).
                    let keys: Vec<SubKey> = st
                        .subs
                        .values()
                        .filter(|s| s.links.contains_key(&path) || s.pattern_matches(&path))
                        .map(|s| s.key.clone())
                        .collect();
                    for key in keys {
                        let max_links = self.settings.max_links;
                        let Some(sub) = st.subs.get_mut(&key) else {
                            continue;
                        };
                        let glob = sub.pattern_matches(&path);
                        if !sub.links.contains_key(&path) && sub.links.len() as u64 >= max_links {
                            tracing::error!(
                                subscription = %key.id, stream = %path, limit = max_links,
                                "subscription is at DS_SUBSCRIPTIONS__MAX_LINKS; stream not linked"
                            );
                            continue;
                        }
                        let link = sub.links.entry(path.clone()).or_insert(Link {
                            explicit: false,
                            glob,
                            acked: start,
                            stream_id: Some(id),
                        });
                        link.glob |= glob;
                        if link.stream_id != Some(id) {
                            link.stream_id = Some(id);
                            link.acked = start;
                        }
                        let acked = link.acked;
                        // Only this link is new: the subscription needs a wake only if this
                        // stream already holds data (its other links were looked at before).
                        let has_data = self
                            .current(&path)
                            .is_some_and(|(sid, tail)| sid == id && tail > acked);
                        changes.writes.push(sub.link_write(&path));
                        self.index_path(&mut st, &key, path.clone());
                        if has_data {
                            self.poke(&mut st, &key, &mut changes);
                        }
                    }
                }
                Notice::Removed { path, id } => {
                    let keys: Vec<SubKey> = st
                        .by_path
                        .get(&path)
                        .map(|s| s.iter().cloned().collect())
                        .unwrap_or_default();
                    for key in keys {
                        let Some(sub) = st.subs.get_mut(&key) else {
                            continue;
                        };
                        let Some(link) = sub.links.get_mut(&path) else {
                            continue;
                        };
                        if link.stream_id != Some(id) {
                            continue;
                        }
                        let gone = if link.explicit {
                            // The explicit link waits for the path's next life, from its start.
                            link.glob = false;
                            link.stream_id = None;
                            link.acked = 0;
                            false
                        } else {
                            sub.links.remove(&path);
                            true
                        };
                        changes.writes.push(sub.link_write(&path));
                        if gone {
                            self.unindex(&mut st, &key, &path);
                        }
                    }
                }
            }
            self.submit(changes)
        };
        match self.commit(changes).await {
            Ok(effects) => effects,
            Err(e) => {
                tracing::error!(error = %e, "cannot persist a subscription change");
                Vec::new()
            }
        }
    }
}

#[cfg(test)]
mod tests;
