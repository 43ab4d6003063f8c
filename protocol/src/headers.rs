//! Header names of the protocol, lowercase as HTTP/2 sends them. Spelled only here.

pub const STREAM_NEXT_OFFSET: &str = "stream-next-offset";
pub const STREAM_CURSOR: &str = "stream-cursor";
pub const STREAM_UP_TO_DATE: &str = "stream-up-to-date";
pub const STREAM_CLOSED: &str = "stream-closed";
pub const STREAM_SEQ: &str = "stream-seq";
pub const STREAM_TTL: &str = "stream-ttl";
pub const STREAM_EXPIRES_AT: &str = "stream-expires-at";
pub const STREAM_FORKED_FROM: &str = "stream-forked-from";
pub const STREAM_FORK_OFFSET: &str = "stream-fork-offset";
pub const STREAM_FORK_SUB_OFFSET: &str = "stream-fork-sub-offset";
pub const STREAM_SSE_DATA_ENCODING: &str = "stream-sse-data-encoding";
/// Not in the protocol: this server's id of the stream instance behind a path, on HEAD, reads
/// and creates. A path deleted and created again gets a new id, so a follower can tell the new
/// stream from the old one (ds-sync fences its incarnations with it).
pub const STREAM_ID: &str = "stream-id";
/// The earliest offset a stream still holds, once retention released data before it (on 410
/// answers to reads below it, on HEAD and on reads).
pub const STREAM_EARLIEST_OFFSET: &str = "stream-earliest-offset";
pub const PRODUCER_ID: &str = "producer-id";
pub const PRODUCER_EPOCH: &str = "producer-epoch";
pub const PRODUCER_SEQ: &str = "producer-seq";
pub const PRODUCER_EXPECTED_SEQ: &str = "producer-expected-seq";
pub const PRODUCER_RECEIVED_SEQ: &str = "producer-received-seq";

/// Query parameters.
pub const QUERY_OFFSET: &str = "offset";
pub const QUERY_LIVE: &str = "live";
pub const QUERY_CURSOR: &str = "cursor";
pub const LIVE_LONG_POLL: &str = "long-poll";
pub const LIVE_SSE: &str = "sse";

/// Request headers a browser may send, for `Access-Control-Allow-Headers`.
pub const CORS_ALLOW_HEADERS: &str = "content-type, authorization, if-none-match, \
    stream-seq, stream-ttl, stream-expires-at, stream-closed, producer-id, producer-epoch, \
    producer-seq, stream-forked-from, stream-fork-offset, stream-fork-sub-offset";

/// Response headers a browser client reads, for `Access-Control-Expose-Headers`.
pub const CORS_EXPOSE_HEADERS: &str = "stream-next-offset, stream-cursor, stream-up-to-date, \
    stream-closed, stream-ttl, stream-expires-at, stream-sse-data-encoding, producer-epoch, \
    producer-seq, producer-expected-seq, producer-received-seq, etag, location, content-type, \
    content-encoding, vary, stream-id, stream-earliest-offset, retry-after";

/// `Stream-Closed` counts only when its value is `true`, case-insensitively; any other value is
/// the same as the header being absent (spec 4.1).
pub fn is_true(value: &[u8]) -> bool {
    value.eq_ignore_ascii_case(b"true")
}

/// A JavaScript-safe non-negative integer (`^[0-9]+$`, at most 2^53-1), as producer epochs and
/// sequence numbers must be.
pub fn parse_js_safe_u64(value: &str) -> Option<u64> {
    const MAX_SAFE: u64 = (1 << 53) - 1;
    if value.is_empty() || !value.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    value.parse::<u64>().ok().filter(|v| *v <= MAX_SAFE)
}

/// A non-negative decimal without leading zeros, sign, point or exponent (`^(0|[1-9][0-9]*)$`),
/// as `Stream-TTL` and `Stream-Fork-Sub-Offset` must be. Values past `u64` are refused.
pub fn parse_canonical_u64(value: &str) -> Option<u64> {
    let bytes = value.as_bytes();
    match bytes {
        [] => None,
        [b'0'] => Some(0),
        [b'0', ..] => None,
        _ if bytes.iter().all(u8::is_ascii_digit) => value.parse().ok(),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stream_closed_only_true_counts() {
        assert!(is_true(b"true"));
        assert!(is_true(b"TRUE"));
        assert!(is_true(b"True"));
        for v in [&b"false"[..], b"yes", b"1", b"", b" true"] {
            assert!(!is_true(v));
        }
    }

    #[test]
    fn canonical_integers() {
        assert_eq!(parse_canonical_u64("0"), Some(0));
        assert_eq!(parse_canonical_u64("3600"), Some(3600));
        for bad in [
            "",
            "00060",
            "+60",
            "-1",
            "60.5",
            "1e3",
            "abc",
            " 1",
            "05",
            "99999999999999999999999",
        ] {
            assert_eq!(parse_canonical_u64(bad), None, "{bad:?}");
        }
    }

    #[test]
    fn js_safe_integers() {
        assert_eq!(parse_js_safe_u64("0"), Some(0));
        assert_eq!(parse_js_safe_u64("007"), Some(7));
        assert_eq!(
            parse_js_safe_u64("9007199254740991"),
            Some(9007199254740991)
        );
        for bad in ["9007199254740992", "1abc", "0xyz", "1e3", "-1", ""] {
            assert_eq!(parse_js_safe_u64(bad), None, "{bad:?}");
        }
    }
}
