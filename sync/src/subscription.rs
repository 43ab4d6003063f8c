//! The worker as a subscriber (issue 21): it creates or re-confirms a pull-wake subscription
//! covering the streams it mirrors, holds the subscription's lease while it works, and acks to
//! the server what Postgres committed, so that a server with `DS_RETENTION__MODE=acked` can
//! release it.
//!
//! - Where: root `/` of the server, `PUT {server_url}/__ds/subscriptions/{subscription}`. Explicit
//!   paths go to `streams[]`, the prefix patterns become one glob (`/v1/stream/orders/*` ->
//!   `v1/stream/orders/**`; several prefixes, or one ending inside a segment, become the glob of
//!   their longest common directory: linking more streams than are mirrored only keeps their
//!   data in the server longer, it never loses any). With a pattern the registry is linked too,
//!   so that its prefix can be released once committed. The wake stream, which pull-wake needs,
//!   is `/_ds-sync/{subscription}/wake`; the worker creates it.
//! - The lease decides who works: a worker claims the subscription and mirrors only while it
//!   holds the claim; another worker with the same subscription gets `ALREADY_CLAIMED` and
//!   claims again every tenth of the lease until the holder stops heartbeating (dies) or
//!   releases (stops cleanly). Postgres checkpoints keep rows exactly-once whoever works; the
//!   lease only keeps two workers from racing.
//! - Acks never lead Postgres: the writer records a stream's committed checkpoint in the
//!   [`AckBook`] after its transaction commits, and the holder sends the latest of each as one
//!   heartbeat-ack (one request in flight, coalesced). Each ack names the stream instance
//!   (`stream_id`), so a late ack of a deleted incarnation never moves the cursor of the stream
//!   created at its path since. After a crash the server's acked offset may trail Postgres; the
//!   next commit moves it on.
//! - A lost lease (the server answers `FENCED` or `SUBSCRIPTION_NOT_FOUND`, e.g. a memory-mode
//!   server restarted, or no heartbeat got through for a whole lease) stops the work; the worker
//!   then re-confirms the subscription and claims again.
//! - A server without subscriptions (404 on the route, or `SUBSCRIPTIONS_DISABLED`) is mirrored
//!   without one, as before: no lease, no acks (logged once as a warning).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use reqwest::StatusCode;
use serde::Deserialize;
use serde_json::json;
use tokio::sync::Notify;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;

use crate::auth::Credentials;
use crate::backoff::Backoff;
use crate::config::Config;
use crate::discovery::Selection;

/// The header carrying a claim token beside `Authorization` (which Envoy takes for the JWT).
pub const TOKEN_HEADER: &str = "subscription-token";

/// Most acks or explicit streams in one request (the server's per-request limit).
const MAX_PER_REQUEST: usize = 1_000;

/// Why the subscription could not be used.
#[derive(Debug, thiserror::Error)]
pub enum SubscriptionError {
    #[error(
        "subscription {id:?} exists with another configuration (streams, lease_ttl or version); \
         delete it (DELETE {url}) or choose another DS_SYNC__SUBSCRIPTION"
    )]
    Conflict { id: String, url: String },
    #[error("subscription {id:?} refused: {status} {body}")]
    Refused {
        id: String,
        status: StatusCode,
        body: String,
    },
}

/// Checkpoints committed to Postgres and not yet acked: per path, the stream id and offset.
#[derive(Debug, Default)]
pub struct AckBook {
    pending: Mutex<HashMap<String, (String, String)>>,
    notify: Notify,
}

impl AckBook {
    /// Records checkpoints a transaction just committed (path, stream id, next offset). Called
    /// only after COMMIT: what is recorded here is in Postgres.
    pub fn committed(&self, acks: Vec<(String, String, String)>) {
        if acks.is_empty() {
            return;
        }
        if let Ok(mut pending) = self.pending.lock() {
            for (path, id, offset) in acks {
                pending.insert(path, (id, offset));
            }
        }
        self.notify.notify_one();
    }

    fn take(&self) -> HashMap<String, (String, String)> {
        self.pending
            .lock()
            .map(|mut p| std::mem::take(&mut *p))
            .unwrap_or_default()
    }

    /// Puts back acks a request failed to deliver, unless a newer commit replaced them.
    fn put_back(&self, acks: HashMap<String, (String, String)>) {
        if let Ok(mut pending) = self.pending.lock() {
            for (path, ack) in acks {
                pending.entry(path).or_insert(ack);
            }
        }
    }
}

/// A claim held.
#[derive(Clone, Debug, Deserialize)]
pub struct Lease {
    wake_id: String,
    generation: u64,
    token: String,
}

/// The outcome of a claim attempt.
enum Claim {
    Held(Lease),
    /// Another worker holds the lease.
    Busy(String),
    /// The subscription is gone (a memory-mode server restarted): create it again.
    Missing,
}

/// What a lease-holding request found.
enum Held {
    Ok,
    /// The lease is over (fenced, or the subscription is gone).
    Lost(String),
    /// The request did not get through; try again.
    Failed(String),
    /// The server refused the acks themselves (400: e.g. an offset beyond a tail a crashed
    /// server lost); sending them again would fail the same way.
    Refused(String),
}

/// The worker's subscription client.
pub struct Subscriber {
    http: reqwest::Client,
    credentials: Arc<Credentials>,
    base_url: String,
    id: String,
    url: String,
    wake_stream: String,
    spec: serde_json::Value,
    worker: String,
    lease_ttl: Duration,
    backoff_min: Duration,
    backoff_max: Duration,
}

/// Root-relative form of an absolute path, if the server accepts it as a subscription path.
fn relative(path: &str) -> Option<&str> {
    let rel = path.strip_prefix('/')?;
    let ok = !rel.is_empty()
        && rel
            .split('/')
            .all(|s| !s.is_empty() && s != "." && s != ".." && s != "__ds" && !s.contains('*'))
        && !rel
            .bytes()
            .any(|b| b.is_ascii_control() || b == b' ' || b == b'?' || b == b'#');
    ok.then_some(rel)
}

/// The one glob covering every prefix: their longest common directory, then `**`.
pub fn glob_for(prefixes: &[String]) -> Option<String> {
    let dirs: Vec<Vec<&str>> = prefixes
        .iter()
        .map(|p| {
            // The directory part: up to the last '/' (a prefix ending inside a segment covers
            // every sibling starting with it, so its directory is the narrowest glob).
            let dir = &p[..p.rfind('/').map_or(0, |i| i + 1)];
            dir.split('/').filter(|s| !s.is_empty()).collect()
        })
        .collect();
    let first = dirs.first()?;
    let mut common: Vec<&str> = Vec::new();
    for (i, seg) in first.iter().enumerate() {
        if *seg == "__ds" || !dirs.iter().all(|d| d.get(i) == Some(seg)) {
            break;
        }
        common.push(seg);
    }
    common.push("**");
    Some(common.join("/"))
}

/// Whether the glob covers exactly the prefixes (else some linked streams are not mirrored).
fn glob_is_exact(prefixes: &[String]) -> bool {
    prefixes.len() == 1 && prefixes[0].ends_with('/')
}

impl Subscriber {
    /// The subscription the configuration asks for; `None` when `subscription` is empty or
    /// nothing is mirrored.
    pub fn new(
        config: &Config,
        selection: &Selection,
        http: reqwest::Client,
        credentials: Arc<Credentials>,
    ) -> Option<Subscriber> {
        let id = config.subscription.trim();
        if id.is_empty() {
            return None;
        }
        let mut streams: Vec<&str> = Vec::new();
        for path in &selection.explicit {
            match relative(path) {
                Some(rel) => streams.push(rel),
                None => {
                    tracing::warn!(stream = %path, "path cannot be linked to a subscription; mirrored, but never acked")
                }
            }
        }
        let pattern = glob_for(&selection.prefixes);
        if pattern.is_some() {
            if !glob_is_exact(&selection.prefixes) {
                tracing::warn!(
                    prefixes = ?selection.prefixes, glob = ?pattern,
                    "the prefixes are not one glob; the subscription links every stream under the glob, and streams not mirrored stay unacked (kept by retention)"
                );
            }
            if let Some(rel) = relative(&selection.registry) {
                streams.push(rel);
            }
        }
        streams.sort_unstable();
        streams.dedup();
        if streams.len() > MAX_PER_REQUEST {
            tracing::warn!(
                streams = streams.len(),
                linked = MAX_PER_REQUEST,
                "more explicit streams than one subscription request takes; the rest are mirrored but never acked"
            );
            streams.truncate(MAX_PER_REQUEST);
        }
        if pattern.is_none() && streams.is_empty() {
            return None;
        }
        let base_url = config.server_url.trim_end_matches('/').to_owned();
        let wake_rel = format!("_ds-sync/{id}/wake");
        let mut spec = json!({
            "type": "pull-wake",
            "wake_stream": wake_rel,
            "lease_ttl_ms": u64::try_from(config.lease_ttl.as_millis()).unwrap_or(u64::MAX),
            "description": "ds-sync: mirrors these streams into Postgres",
            // What the server held before the subscription existed is not in Postgres yet.
            "links_from": "start",
        });
        if let Some(p) = &pattern {
            spec["pattern"] = json!(p);
        }
        if !streams.is_empty() {
            spec["streams"] = json!(streams);
        }
        let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
            .map(|h| h.trim().to_owned())
            .ok()
            .filter(|h| !h.is_empty())
            .unwrap_or_else(|| "ds-sync".to_owned());
        let nonce = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.subsec_nanos())
            .unwrap_or(0);
        Some(Subscriber {
            http,
            credentials,
            url: format!("{base_url}/__ds/subscriptions/{id}"),
            wake_stream: format!("/{wake_rel}"),
            base_url,
            id: id.to_owned(),
            spec,
            worker: format!("{host}:{}:{nonce:08x}", std::process::id()),
            lease_ttl: config.lease_ttl,
            backoff_min: config.backoff_min,
            backoff_max: config.backoff_max,
        })
    }

    /// The wake stream's path (never mirrored).
    pub fn wake_stream(&self) -> &str {
        &self.wake_stream
    }

    async fn send(&self, request: reqwest::RequestBuilder) -> Result<(StatusCode, String), String> {
        let resp = self
            .credentials
            .authorize(request.timeout(self.lease_ttl / 2))
            .send()
            .await
            .map_err(|e| e.to_string())?;
        let status = resp.status();
        if status == StatusCode::UNAUTHORIZED {
            self.credentials.refused().await;
        } else {
            self.credentials.accepted();
        }
        let body = resp.text().await.map_err(|e| e.to_string())?;
        Ok((status, body))
    }

    fn error_code(body: &str) -> String {
        serde_json::from_str::<serde_json::Value>(body)
            .ok()
            .and_then(|v| v["error"]["code"].as_str().map(str::to_owned))
            .unwrap_or_default()
    }

    /// Creates or re-confirms the subscription (and its wake stream). `Ok(false)`: the server
    /// has no subscriptions; the worker runs without one.
    async fn ensure(&self) -> Result<Result<bool, SubscriptionError>, String> {
        let wake = self
            .http
            .put(format!("{}{}", self.base_url, self.wake_stream))
            .header("content-type", "application/json");
        let (status, body) = self.send(wake).await?;
        // 409: it exists (perhaps closed); a wake stream needs only to exist.
        if !status.is_success() && status != StatusCode::CONFLICT {
            return Err(format!(
                "creating the wake stream {}: {status} {body}",
                self.wake_stream
            ));
        }
        let put = self.http.put(&self.url).json(&self.spec);
        let (status, body) = self.send(put).await?;
        if status.is_success() {
            return Ok(Ok(true));
        }
        let code = Self::error_code(&body);
        Ok(match (status, code.as_str()) {
            (StatusCode::CONFLICT, "SUBSCRIPTION_CONFLICT") => Err(SubscriptionError::Conflict {
                id: self.id.clone(),
                url: self.url.clone(),
            }),
            (
                StatusCode::NOT_FOUND
                | StatusCode::METHOD_NOT_ALLOWED
                | StatusCode::NOT_IMPLEMENTED,
                _,
            ) => {
                tracing::warn!(status = %status, body = %body, "the server offers no subscriptions here; mirroring without one (no lease, no acks)");
                Ok(false)
            }
            (s, _) if s.is_server_error() || s == StatusCode::UNAUTHORIZED => {
                return Err(format!("subscription {}: {status} {body}", self.id));
            }
            _ => Err(SubscriptionError::Refused {
                id: self.id.clone(),
                status,
                body,
            }),
        })
    }

    async fn claim(&self) -> Result<Claim, String> {
        let req = self
            .http
            .post(format!("{}/claim", self.url))
            .json(&json!({ "worker": self.worker }));
        let (status, body) = self.send(req).await?;
        if status.is_success() {
            return serde_json::from_str::<Lease>(&body)
                .map(Claim::Held)
                .map_err(|e| format!("claim answer {body:?}: {e}"));
        }
        match (status, Self::error_code(&body).as_str()) {
            (StatusCode::CONFLICT, "ALREADY_CLAIMED") => {
                let holder = serde_json::from_str::<serde_json::Value>(&body)
                    .ok()
                    .and_then(|v| v["error"]["current_holder"].as_str().map(str::to_owned))
                    .unwrap_or_default();
                Ok(Claim::Busy(holder))
            }
            (StatusCode::NOT_FOUND, "SUBSCRIPTION_NOT_FOUND") => Ok(Claim::Missing),
            _ => Err(format!("claim: {status} {body}")),
        }
    }

    /// Makes sure the subscription exists and waits until this worker holds its lease.
    /// `Ok(None)`: the server has no subscriptions (work without). Returns early (with
    /// `Ok(None)` too) only if `shutdown` fires, which the caller checks.
    pub async fn acquire(
        &self,
        shutdown: &CancellationToken,
    ) -> Result<Option<Lease>, SubscriptionError> {
        let mut backoff = Backoff::new(self.backoff_min, self.backoff_max);
        let mut ensured = false;
        let mut standby_logged = false;
        loop {
            let delay = if !ensured {
                match self.ensure().await {
                    Ok(Ok(true)) => {
                        ensured = true;
                        backoff.reset();
                        continue;
                    }
                    Ok(Ok(false)) => return Ok(None),
                    Ok(Err(e)) => return Err(e),
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(subscription = %self.id, error = %e, retry_in = ?delay, "creating or re-confirming the subscription failed");
                        delay
                    }
                }
            } else {
                match self.claim().await {
                    Ok(Claim::Held(lease)) => {
                        tracing::info!(subscription = %self.id, worker = %self.worker, generation = lease.generation, "holding the subscription's lease; mirroring");
                        return Ok(Some(lease));
                    }
                    Ok(Claim::Busy(holder)) => {
                        if !standby_logged {
                            tracing::info!(subscription = %self.id, holder = %holder, "another worker holds the subscription's lease; standing by");
                            standby_logged = true;
                        }
                        backoff.reset();
                        self.lease_ttl / 10
                    }
                    Ok(Claim::Missing) => {
                        ensured = false;
                        continue;
                    }
                    Err(e) => {
                        let delay = backoff.next_delay();
                        tracing::warn!(subscription = %self.id, error = %e, retry_in = ?delay, "claiming the subscription failed");
                        delay
                    }
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(None),
                _ = tokio::time::sleep(delay) => {}
            }
        }
    }

    async fn ack(&self, lease: &Lease, acks: &HashMap<String, (String, String)>) -> Held {
        let items: Vec<serde_json::Value> = acks
            .iter()
            .filter_map(|(path, (id, offset))| {
                let rel = relative(path)?;
                Some(json!({ "stream": rel, "offset": offset, "stream_id": id }))
            })
            .collect();
        let mut chunks: Vec<&[serde_json::Value]> = items.chunks(MAX_PER_REQUEST).collect();
        if chunks.is_empty() {
            chunks.push(&[]);
        }
        for chunk in chunks {
            let req = self
                .http
                .post(format!("{}/ack", self.url))
                .header(TOKEN_HEADER, &lease.token)
                .json(&json!({
                    "wake_id": lease.wake_id,
                    "generation": lease.generation,
                    "acks": chunk,
                }));
            match self.send(req).await {
                Ok((status, _)) if status.is_success() => {}
                Ok((status, body)) => {
                    return match (status, Self::error_code(&body).as_str()) {
                        (StatusCode::CONFLICT, "FENCED")
                        | (StatusCode::NOT_FOUND, "SUBSCRIPTION_NOT_FOUND") => {
                            Held::Lost(format!("{status} {body}"))
                        }
                        (StatusCode::BAD_REQUEST, _) => Held::Refused(format!("{status} {body}")),
                        _ => Held::Failed(format!("{status} {body}")),
                    };
                }
                Err(e) => return Held::Failed(e),
            }
        }
        Held::Ok
    }

    async fn release(&self, lease: &Lease) {
        let req = self
            .http
            .post(format!("{}/release", self.url))
            .header(TOKEN_HEADER, &lease.token)
            .json(&json!({ "wake_id": lease.wake_id, "generation": lease.generation }));
        match self.send(req).await {
            Ok((status, _)) if status.is_success() => {
                tracing::info!(subscription = %self.id, "released the subscription's lease")
            }
            Ok((status, body)) => {
                tracing::warn!(subscription = %self.id, status = %status, body = %body, "releasing the lease failed; it lapses on its own")
            }
            Err(e) => {
                tracing::warn!(subscription = %self.id, error = %e, "releasing the lease failed; it lapses on its own")
            }
        }
    }

    /// Holds `lease` while the worker works: acks what `book` collects (at once, one request
    /// at a time) and heartbeats every third of the lease. Cancels `work` when the lease is
    /// lost (or cannot be confirmed for a whole lease); on `shutdown` waits for the work to have
    /// `finished` (its last commit), sends the last acks and releases the lease, so a standby
    /// takes over at once.
    pub async fn hold(
        self: Arc<Self>,
        lease: Lease,
        book: Arc<AckBook>,
        work: CancellationToken,
        shutdown: CancellationToken,
        finished: CancellationToken,
    ) {
        let heartbeat = self.lease_ttl / 3;
        let mut confirmed = Instant::now();
        let mut backoff = Backoff::new(self.backoff_min, self.backoff_max.min(heartbeat));
        let mut retry_at: Option<Instant> = None;
        loop {
            let wake_at = retry_at.unwrap_or(confirmed + heartbeat);
            tokio::select! {
                biased;
                _ = shutdown.cancelled() => {
                    // The batch being committed lands first; its acks go with the last request.
                    tokio::select! {
                        _ = finished.cancelled() => {}
                        _ = tokio::time::sleep(self.lease_ttl) => {}
                    }
                    let acks = book.take();
                    if !acks.is_empty() {
                        let _ = self.ack(&lease, &acks).await;
                    }
                    self.release(&lease).await;
                    return;
                }
                _ = work.cancelled() => return,
                _ = book.notify.notified(), if retry_at.is_none() => {}
                _ = tokio::time::sleep_until(wake_at) => {}
            }
            let acks = book.take();
            let sent = Instant::now();
            match self.ack(&lease, &acks).await {
                Held::Ok => {
                    confirmed = sent;
                    retry_at = None;
                    backoff.reset();
                }
                Held::Lost(why) => {
                    tracing::warn!(subscription = %self.id, reason = %why, "lost the subscription's lease; stopping work to claim again");
                    work.cancel();
                    return;
                }
                Held::Refused(why) => {
                    // Dropped (they trail Postgres; the next commit of each stream acks it
                    // again); a heartbeat without them follows at once.
                    tracing::error!(subscription = %self.id, reason = %why, acks = acks.len(), "the server refused these acks; dropped");
                    retry_at = Some(Instant::now());
                }
                Held::Failed(why) => {
                    book.put_back(acks);
                    if confirmed.elapsed() >= self.lease_ttl {
                        tracing::warn!(subscription = %self.id, reason = %why, "no heartbeat got through for a whole lease; stopping work to claim again");
                        work.cancel();
                        return;
                    }
                    let delay = backoff.next_delay();
                    tracing::warn!(subscription = %self.id, error = %why, retry_in = ?delay, "ack or heartbeat failed");
                    retry_at = Some(Instant::now() + delay);
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefixes_become_one_glob() {
        let g = |ps: &[&str]| glob_for(&ps.iter().map(|s| s.to_string()).collect::<Vec<_>>());
        assert_eq!(g(&[]), None);
        assert_eq!(
            g(&["/v1/stream/orders/"]).as_deref(),
            Some("v1/stream/orders/**")
        );
        assert_eq!(g(&["/"]).as_deref(), Some("**"));
        assert_eq!(g(&["/v1/stream/ord"]).as_deref(), Some("v1/stream/**"));
        assert_eq!(
            g(&["/v1/stream/a/", "/v1/stream/b/x/"]).as_deref(),
            Some("v1/stream/**")
        );
        assert_eq!(g(&["/a/", "/b/"]).as_deref(), Some("**"));
        assert!(glob_is_exact(&["/v1/stream/orders/".to_owned()]));
        assert!(!glob_is_exact(&["/v1/stream/ord".to_owned()]));
    }

    #[test]
    fn only_linkable_paths_are_relative() {
        assert_eq!(relative("/v1/stream/a"), Some("v1/stream/a"));
        assert_eq!(relative("/_ds/registry"), Some("_ds/registry"));
        assert_eq!(relative("/"), None);
        assert_eq!(relative("/a//b"), None);
        assert_eq!(relative("/a b"), None);
        assert_eq!(relative("v1/a"), None);
    }

    #[test]
    fn acks_put_back_never_replace_newer_ones() {
        let book = AckBook::default();
        book.committed(vec![("/a".into(), "1".into(), "o1".into())]);
        let taken = book.take();
        book.committed(vec![("/a".into(), "1".into(), "o2".into())]);
        book.put_back(taken);
        assert_eq!(book.take().get("/a").map(|a| a.1.as_str()), Some("o2"));
    }
}
