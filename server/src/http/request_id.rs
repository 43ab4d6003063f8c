//! `x-request-id`: every request the handler answers has one, taken from the request when it
//! carries a sensible one (Envoy sets it at the edge) or made here. It is echoed on the response
//! and carried by the request's log lines, so one id follows a request from the edge through the
//! server's logs to the client.
//!
//! Making an id is on every append's path, so it costs 25 bytes of formatting: a per-process
//! random prefix (so ids of two processes or two runs differ) and a counter, not a UUID's
//! randomness per request. Each thread takes the counter's values in blocks, so that the
//! threads serving requests do not pass one shared counter's cache line back and forth.

use std::hash::{BuildHasher, Hasher};
use std::sync::OnceLock;
use std::sync::atomic::{AtomicU64, Ordering};

use axum::http::{HeaderMap, HeaderName, HeaderValue};

pub const REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");

/// An id longer than this from a client is replaced: it is logged on every line of its request.
const MAX_ID_BYTES: usize = 128;

static NEXT: AtomicU64 = AtomicU64::new(0);
static PREFIX: OnceLock<u32> = OnceLock::new();
/// Counter values a thread takes at a time.
const BLOCK: u64 = 4096;

thread_local! {
    /// This thread's next counter value and the end of its block.
    static OWN: std::cell::Cell<(u64, u64)> = const { std::cell::Cell::new((0, 0)) };
}

/// A counter value no other call of this process gets.
fn next() -> u64 {
    OWN.with(|own| {
        let (mut n, mut end) = own.get();
        if n == end {
            n = NEXT.fetch_add(BLOCK, Ordering::Relaxed);
            end = n + BLOCK;
        }
        own.set((n + 1, end));
        n
    })
}

/// A request's id as a plain append carries it: the one it was sent, or a made one that is
/// written out only where it is needed (a stored append's head gets its 25 characters
/// formatted in place, without the allocation of a `HeaderValue`).
pub enum RequestId {
    Sent(HeaderValue),
    Made(u64),
}

impl RequestId {
    /// The id's characters, appended to `out`.
    pub fn push(&self, out: &mut Vec<u8>) {
        match self {
            RequestId::Sent(id) => out.extend_from_slice(id.as_bytes()),
            RequestId::Made(n) => out.extend_from_slice(&made_text(*n)),
        }
    }

    pub fn to_header(&self) -> HeaderValue {
        match self {
            RequestId::Sent(id) => id.clone(),
            RequestId::Made(n) => made_header(*n),
        }
    }
}

/// The id of a request whose head was parsed without a header map: its `x-request-id` as sent
/// (a slice of the head), kept if sensible as [`of`] keeps it, else a new one.
pub fn from_sent(sent: Option<bytes::Bytes>) -> RequestId {
    // Visible ASCII: a valid header value, taken without a copy.
    match sent
        .filter(|id| acceptable(id))
        .and_then(|id| HeaderValue::from_maybe_shared(id).ok())
    {
        Some(id) => RequestId::Sent(id),
        None => RequestId::Made(next()),
    }
}

/// The request's id: its own `x-request-id` if that is 1 to 128 visible ASCII characters,
/// else a new one.
pub fn of(headers: &HeaderMap) -> HeaderValue {
    match headers.get(&REQUEST_ID) {
        Some(id) if acceptable(id.as_bytes()) => id.clone(),
        _ => generate(),
    }
}

fn acceptable(id: &[u8]) -> bool {
    !id.is_empty() && id.len() <= MAX_ID_BYTES && id.iter().all(|b| b.is_ascii_graphic())
}

fn generate() -> HeaderValue {
    made_header(next())
}

/// `pppppppp-nnnnnnnnnnnnnnnn`: prefix and counter `n` in hex.
fn made_text(n: u64) -> [u8; 25] {
    let prefix = *PREFIX.get_or_init(|| {
        // RandomState is seeded from the OS once per process: randomness without a crate.
        std::collections::hash_map::RandomState::new()
            .build_hasher()
            .finish() as u32
    });
    let mut text = [0u8; 25];
    hex_into(u64::from(prefix), &mut text[..8]);
    text[8] = b'-';
    hex_into(n, &mut text[9..]);
    text
}

fn made_header(n: u64) -> HeaderValue {
    // Only hex digits and '-': always a valid header value.
    HeaderValue::from_bytes(&made_text(n)).unwrap_or(HeaderValue::from_static("-"))
}

fn hex_into(mut n: u64, out: &mut [u8]) {
    for slot in out.iter_mut().rev() {
        *slot = b"0123456789abcdef"[(n & 0xf) as usize];
        n >>= 4;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_sensible_id_is_kept_and_anything_else_replaced() {
        let mut headers = HeaderMap::new();
        headers.insert(REQUEST_ID, HeaderValue::from_static("edge-7f3a"));
        assert_eq!(of(&headers), "edge-7f3a");
        for bad in ["", "has space", &"x".repeat(MAX_ID_BYTES + 1)] {
            headers.insert(
                REQUEST_ID,
                HeaderValue::from_str(bad).unwrap_or(HeaderValue::from_static("")),
            );
            let id = of(&headers);
            assert_ne!(id, bad);
            assert_eq!(id.len(), 25, "{id:?}");
        }
    }

    #[test]
    fn ids_made_on_many_threads_are_distinct() {
        let made: Vec<Vec<HeaderValue>> = std::thread::scope(|scope| {
            let threads: Vec<_> = (0..4)
                .map(|_| scope.spawn(|| (0..3 * BLOCK).map(|_| generate()).collect()))
                .collect();
            threads
                .into_iter()
                .map(|t| t.join().expect("thread"))
                .collect()
        });
        let all: std::collections::HashSet<_> = made.iter().flatten().collect();
        assert_eq!(all.len(), made.iter().map(Vec::len).sum::<usize>());
    }

    #[test]
    fn made_ids_are_distinct_and_share_the_process_prefix() {
        let a = generate();
        let b = generate();
        assert_ne!(a, b);
        assert_eq!(a.as_bytes()[..9], b.as_bytes()[..9]);
        assert!(
            a.to_str()
                .is_ok_and(|s| s.bytes().all(|c| c.is_ascii_hexdigit() || c == b'-'))
        );
    }
}
