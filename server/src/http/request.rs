//! Parsing of request headers and query parameters into typed values. Every refusal names the
//! header or parameter and what was wrong with it.

use axum::http::{HeaderMap, HeaderName, HeaderValue, header};
use ds_protocol::headers::{self as h, parse_canonical_u64, parse_js_safe_u64};
use ds_protocol::{Offset, ReadOffset};

use super::error::ApiError;
use super::names;
use crate::stream::producer::ProducerRequest;

/// Longest stream path accepted.
const MAX_PATH_BYTES: usize = 1024;
/// Longest `Stream-Seq` accepted.
const MAX_TOKEN_BYTES: usize = 1024;
/// Longest `Producer-Id` accepted: the server keeps one per producer and stream (and stores it
/// with every append that names it), so it is kept short.
pub const MAX_PRODUCER_ID_BYTES: usize = 256;

/// Where a request's header fields are looked up: the request's [`HeaderMap`], or the fields
/// an append reads, found in one pass ([`AppendFields`]).
pub trait Fields {
    /// The first value of `name`, if the request has it.
    fn field(&self, name: &HeaderName) -> Option<&[u8]>;
}

impl Fields for HeaderMap {
    fn field(&self, name: &HeaderName) -> Option<&[u8]> {
        self.get(name).map(HeaderValue::as_bytes)
    }
}

pub const APPEND_FIELD_COUNT: usize = 7;
/// `Content-Length`'s slot in [`APPEND_FIELDS`] (the connection frames the body by it).
pub const CONTENT_LENGTH_SLOT: usize = 1;

/// The header fields an append reads, looked up in [`AppendFields`].
static APPEND_FIELDS: [HeaderName; APPEND_FIELD_COUNT] = [
    header::CONTENT_TYPE,
    header::CONTENT_LENGTH,
    names::PRODUCER_ID,
    names::PRODUCER_EPOCH,
    names::PRODUCER_SEQ,
    names::STREAM_SEQ,
    names::STREAM_CLOSED,
];

/// [`APPEND_FIELDS`] as text, in the same order (a test holds them equal).
const APPEND_FIELD_NAMES: [&str; APPEND_FIELD_COUNT] = [
    "content-type",
    "content-length",
    "producer-id",
    "producer-epoch",
    "producer-seq",
    "stream-seq",
    "stream-closed",
];

/// The header fields an append reads ([`APPEND_FIELDS`]), found in one pass over the request's
/// fields. A lookup by name hashes the name and probes the map, once per name: seven of them
/// per append, most absent from most appends, cost more than one walk over the few fields a
/// request has.
pub struct AppendFields<'a> {
    /// Where any other field is looked up; `None` for a head parsed without a header map
    /// (plaintext HTTP/1.1's appends), which carries only the append's fields.
    map: Option<&'a HeaderMap>,
    values: [Option<&'a [u8]>; APPEND_FIELD_COUNT],
}

impl<'a> AppendFields<'a> {
    pub fn of(map: &'a HeaderMap) -> Self {
        let mut values = [None; APPEND_FIELD_COUNT];
        for (name, value) in map {
            // The first value, as `HeaderMap::get` returns.
            if let Some(i) = APPEND_FIELDS.iter().position(|n| n == name)
                && values[i].is_none()
            {
                values[i] = Some(value.as_bytes());
            }
        }
        AppendFields {
            map: Some(map),
            values,
        }
    }

    /// The fields of a head parsed without a header map: `values[i]` is the first value of
    /// the field [`AppendFields::slot`] numbers `i`.
    pub fn from_slots(values: [Option<&'a [u8]>; APPEND_FIELD_COUNT]) -> Self {
        AppendFields { map: None, values }
    }

    /// Which slot of [`AppendFields::from_slots`] a field name (any case, as sent) fills.
    pub fn slot(name: &[u8]) -> Option<usize> {
        // Names as text: `HeaderName::as_str` of a standard header is a lookup of its own.
        APPEND_FIELD_NAMES
            .iter()
            .position(|n| n.len() == name.len() && n.as_bytes().eq_ignore_ascii_case(name))
    }
}

impl Fields for AppendFields<'_> {
    fn field(&self, name: &HeaderName) -> Option<&[u8]> {
        match APPEND_FIELDS.iter().position(|n| n == name) {
            Some(i) => self.values[i],
            None => {
                // An append that reads a field not in `APPEND_FIELDS` would find it absent in
                // a head parsed without a map: add the field to the table instead.
                debug_assert!(self.map.is_some(), "{name} is not one of APPEND_FIELDS");
                self.map.and_then(|map| map.field(name))
            }
        }
    }
}

/// `value` as text if it is visible ASCII (and tabs), as `HeaderValue::to_str` takes it.
pub fn visible_text(value: &[u8]) -> Option<&str> {
    // Every byte, without an early exit, so that the compiler vectorises the check.
    let visible = value.iter().fold(true, |ok, &b| {
        ok & ((b == b'\t') | (b' '..=b'~').contains(&b))
    });
    if visible {
        std::str::from_utf8(value).ok()
    } else {
        None
    }
}

/// A header as UTF-8 text, if present. Non-UTF-8 values are refused.
pub fn text<'a>(
    headers: &'a (impl Fields + ?Sized),
    name: &HeaderName,
) -> Result<Option<&'a str>, ApiError> {
    match headers.field(name) {
        None => Ok(None),
        Some(v) => visible_text(v)
            .map(Some)
            .ok_or_else(|| ApiError::bad_request(format!("header {name} is not visible ASCII"))),
    }
}

/// `Stream-Closed: true` (case-insensitive); any other value counts as absent.
pub fn closed(headers: &(impl Fields + ?Sized)) -> bool {
    headers.field(&names::STREAM_CLOSED).is_some_and(h::is_true)
}

/// The stream's identity: the request path, checked for sanity.
pub fn stream_path(path: &str) -> Result<&str, ApiError> {
    if path.len() > MAX_PATH_BYTES {
        return Err(ApiError::bad_request(format!(
            "stream path is longer than {MAX_PATH_BYTES} bytes"
        )));
    }
    if path.is_empty() || path == "/" {
        return Err(ApiError::bad_request("stream path is empty"));
    }
    // Most paths have no dot at all: found with memchr, they skip the split.
    if memchr::memchr(b'.', path.as_bytes()).is_some()
        && path.split('/').any(|seg| seg == ".." || seg == ".")
    {
        return Err(ApiError::bad_request(
            "stream path must not contain '.' or '..' segments",
        ));
    }
    Ok(path)
}

/// `Content-Type` of a request, `None` when absent or empty.
pub fn content_type(headers: &(impl Fields + ?Sized)) -> Result<Option<String>, ApiError> {
    Ok(text(headers, &header::CONTENT_TYPE)?
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(str::to_owned))
}

/// `Stream-Expires-At` as sent and as Unix milliseconds.
pub type ExpiresAt = (String, i64);

/// `Stream-TTL` and `Stream-Expires-At` (mutually exclusive).
pub fn expiry(headers: &HeaderMap) -> Result<(Option<u64>, Option<ExpiresAt>), ApiError> {
    let ttl = match text(headers, &names::STREAM_TTL)? {
        None => None,
        Some(v) => Some(parse_canonical_u64(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Stream-TTL {v:?} must be a non-negative whole number of seconds without sign or leading zeros"
            ))
        })?),
    };
    let expires = match text(headers, &names::STREAM_EXPIRES_AT)? {
        None => None,
        Some(v) => {
            let at = time::OffsetDateTime::parse(v, &time::format_description::well_known::Rfc3339)
                .map_err(|_| {
                    ApiError::bad_request(format!(
                        "Stream-Expires-At {v:?} is not an RFC 3339 timestamp"
                    ))
                })?;
            let ms = at.unix_timestamp_nanos() / 1_000_000;
            let ms = i64::try_from(ms).map_err(|_| {
                ApiError::bad_request(format!("Stream-Expires-At {v:?} is out of range"))
            })?;
            Some((v.to_owned(), ms))
        }
    };
    if ttl.is_some() && expires.is_some() {
        return Err(ApiError::bad_request(
            "Stream-TTL and Stream-Expires-At are mutually exclusive",
        ));
    }
    Ok((ttl, expires))
}

/// `Stream-Seq`, opaque, compared byte-wise.
pub fn stream_seq(headers: &(impl Fields + ?Sized)) -> Result<Option<String>, ApiError> {
    match text(headers, &names::STREAM_SEQ)? {
        Some(v) if v.len() > MAX_TOKEN_BYTES => Err(ApiError::bad_request(format!(
            "Stream-Seq is longer than {MAX_TOKEN_BYTES} bytes"
        ))),
        other => Ok(other.map(str::to_owned)),
    }
}

/// The three producer headers: all or none.
pub fn producer(headers: &(impl Fields + ?Sized)) -> Result<Option<ProducerRequest>, ApiError> {
    let id = text(headers, &names::PRODUCER_ID)?;
    let epoch = text(headers, &names::PRODUCER_EPOCH)?;
    let seq = text(headers, &names::PRODUCER_SEQ)?;
    match (id, epoch, seq) {
        (None, None, None) => Ok(None),
        (Some(id), Some(epoch), Some(seq)) => {
            if id.is_empty() {
                return Err(ApiError::bad_request("Producer-Id must not be empty"));
            }
            if id.len() > MAX_PRODUCER_ID_BYTES {
                return Err(ApiError::bad_request(format!(
                    "Producer-Id is {} bytes; the limit is {MAX_PRODUCER_ID_BYTES} bytes",
                    id.len()
                )));
            }
            let epoch = parse_js_safe_u64(epoch).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Producer-Epoch {epoch:?} must be an integer from 0 to 2^53-1"
                ))
            })?;
            let seq = parse_js_safe_u64(seq).ok_or_else(|| {
                ApiError::bad_request(format!(
                    "Producer-Seq {seq:?} must be an integer from 0 to 2^53-1"
                ))
            })?;
            Ok(Some(ProducerRequest {
                id: id.to_owned(),
                epoch,
                seq,
            }))
        }
        _ => Err(ApiError::bad_request(
            "Producer-Id, Producer-Epoch and Producer-Seq must be sent together",
        )),
    }
}

/// Fork headers of a PUT.
pub fn fork(headers: &HeaderMap) -> Result<Option<crate::stream::ForkRequest>, ApiError> {
    let source = text(headers, &names::STREAM_FORKED_FROM)?;
    let offset = text(headers, &names::STREAM_FORK_OFFSET)?;
    let sub = text(headers, &names::STREAM_FORK_SUB_OFFSET)?;
    let Some(source) = source else {
        if offset.is_some() || sub.is_some() {
            return Err(ApiError::bad_request(
                "Stream-Fork-Offset and Stream-Fork-Sub-Offset need Stream-Forked-From",
            ));
        }
        return Ok(None);
    };
    let source = stream_path(source.trim())
        .map_err(|e| ApiError::bad_request(format!("Stream-Forked-From: {e}")))?;
    let offset = match offset {
        None => None,
        Some(v) => {
            let o: Offset = v.parse().map_err(|e| {
                ApiError::bad_request(format!("Stream-Fork-Offset {v:?} is invalid: {e}"))
            })?;
            Some(concrete_pos(o))
        }
    };
    let sub_offset = match sub {
        None => 0,
        Some(v) => parse_canonical_u64(v).ok_or_else(|| {
            ApiError::bad_request(format!(
                "Stream-Fork-Sub-Offset {v:?} must be a non-negative whole number without sign or leading zeros"
            ))
        })?,
    };
    Ok(Some(crate::stream::ForkRequest {
        source: source.to_owned(),
        offset,
        sub_offset,
    }))
}

/// The byte position of an offset; offsets of later segments (never handed out) lie beyond
/// every tail.
pub fn concrete_pos(o: Offset) -> u64 {
    if o.seq == 0 { o.pos } else { u64::MAX }
}

/// How a GET reads.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum LiveMode {
    CatchUp,
    LongPoll,
    Sse,
}

/// The query of a GET.
#[derive(Clone, Debug)]
pub struct ReadQuery {
    pub offset: Option<ReadOffset>,
    pub live: LiveMode,
    pub cursor: Option<u64>,
}

/// Parses `offset`, `live` and `cursor`; other parameters are ignored.
pub fn read_query(query: Option<&str>) -> Result<ReadQuery, ApiError> {
    let mut offset: Option<String> = None;
    let mut live: Option<String> = None;
    let mut cursor: Option<String> = None;
    for (k, v) in form_urlencoded::parse(query.unwrap_or_default().as_bytes()) {
        let slot = match k.as_ref() {
            h::QUERY_OFFSET => &mut offset,
            h::QUERY_LIVE => &mut live,
            h::QUERY_CURSOR => &mut cursor,
            _ => continue,
        };
        if slot.is_some() {
            return Err(ApiError::bad_request(format!(
                "query parameter {k} appears more than once"
            )));
        }
        *slot = Some(v.into_owned());
    }
    let offset = match offset {
        None => None,
        Some(v) => Some(
            v.parse::<ReadOffset>()
                .map_err(|e| ApiError::bad_request(format!("offset {v:?} is invalid: {e}")))?,
        ),
    };
    let live = match live.as_deref() {
        None => LiveMode::CatchUp,
        Some(h::LIVE_LONG_POLL) => LiveMode::LongPoll,
        Some(h::LIVE_SSE) => LiveMode::Sse,
        Some(other) => {
            return Err(ApiError::bad_request(format!(
                "live {other:?} is not supported; use long-poll or sse"
            )));
        }
    };
    if live != LiveMode::CatchUp && offset.is_none() {
        return Err(ApiError::bad_request(
            "live reads need an offset (use -1 for the start or now for the tail)",
        ));
    }
    // A cursor is only a cache key; an unparseable one is treated as absent.
    let cursor = cursor.and_then(|c| c.parse::<u64>().ok());
    Ok(ReadQuery {
        offset,
        live,
        cursor,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn append_field_names_are_the_append_fields() {
        for (i, name) in APPEND_FIELDS.iter().enumerate() {
            assert_eq!(APPEND_FIELD_NAMES[i], name.as_str());
            assert_eq!(
                AppendFields::slot(name.as_str().to_uppercase().as_bytes()),
                Some(i)
            );
        }
        assert_eq!(AppendFields::slot(b"content-typ"), None);
        assert_eq!(
            APPEND_FIELD_NAMES[CONTENT_LENGTH_SLOT],
            header::CONTENT_LENGTH.as_str()
        );
    }

    #[test]
    fn append_fields_answer_as_the_header_map_does() {
        let mut map = HeaderMap::new();
        map.append(header::CONTENT_TYPE, HeaderValue::from_static("text/plain"));
        map.append(header::CONTENT_TYPE, HeaderValue::from_static("text/html"));
        map.append(names::PRODUCER_ID, HeaderValue::from_static("p1"));
        map.append(names::PRODUCER_EPOCH, HeaderValue::from_static("0"));
        map.append(names::PRODUCER_SEQ, HeaderValue::from_static("7"));
        map.append(names::PRODUCER_SEQ, HeaderValue::from_static("8"));
        map.append(names::STREAM_CLOSED, HeaderValue::from_static("true"));
        map.append(
            header::ORIGIN,
            HeaderValue::from_static("https://a.example"),
        );
        let fields = AppendFields::of(&map);
        for name in APPEND_FIELDS
            .iter()
            .cloned()
            .chain([header::ORIGIN, header::HOST])
        {
            assert_eq!(
                fields.field(&name),
                map.get(&name).map(HeaderValue::as_bytes),
                "{name}"
            );
        }
        let producer = producer(&fields).unwrap().expect("producer");
        assert_eq!(
            (producer.id.as_str(), producer.epoch, producer.seq),
            ("p1", 0, 7)
        );
        assert!(closed(&fields));
        assert_eq!(
            content_type(&fields).unwrap().as_deref(),
            Some("text/plain")
        );
        assert_eq!(stream_seq(&fields).unwrap(), None);
    }

    #[test]
    fn query_rejects_duplicate_and_empty_offsets() {
        assert!(read_query(Some("offset=-1&offset=now")).is_err());
        assert!(read_query(Some("offset=")).is_err());
        assert!(read_query(Some("offset=0%2C1")).is_err());
        assert!(read_query(Some("offset=%00")).is_err());
        assert!(read_query(Some("offset=0_0%0A")).is_err());
        let q = read_query(Some("offset=now&live=sse&cursor=12&x=y")).unwrap();
        assert_eq!(q.offset, Some(ReadOffset::Now));
        assert_eq!(q.live, LiveMode::Sse);
        assert_eq!(q.cursor, Some(12));
        assert_eq!(read_query(None).unwrap().offset, None);
    }

    #[test]
    fn live_reads_need_an_offset() {
        assert!(read_query(Some("live=long-poll")).is_err());
        assert!(read_query(Some("live=sse")).is_err());
        assert!(read_query(Some("offset=-1&live=poll")).is_err());
    }

    #[test]
    fn producer_headers_all_or_none() {
        let mut hm = HeaderMap::new();
        assert_eq!(producer(&hm).unwrap(), None);
        hm.insert(h::PRODUCER_ID, HeaderValue::from_static("p"));
        assert!(producer(&hm).is_err());
        hm.insert(h::PRODUCER_EPOCH, HeaderValue::from_static("0"));
        hm.insert(h::PRODUCER_SEQ, HeaderValue::from_static("1e3"));
        assert!(producer(&hm).is_err());
        hm.insert(h::PRODUCER_SEQ, HeaderValue::from_static("3"));
        assert_eq!(
            producer(&hm).unwrap(),
            Some(ProducerRequest {
                id: "p".into(),
                epoch: 0,
                seq: 3
            })
        );
    }

    #[test]
    fn expiry_rules() {
        let mut hm = HeaderMap::new();
        hm.insert(h::STREAM_TTL, HeaderValue::from_static("00060"));
        assert!(expiry(&hm).is_err());
        hm.insert(h::STREAM_TTL, HeaderValue::from_static("60"));
        assert_eq!(expiry(&hm).unwrap().0, Some(60));
        hm.insert(
            h::STREAM_EXPIRES_AT,
            HeaderValue::from_static("2026-01-01T00:00:00.000Z"),
        );
        assert!(expiry(&hm).is_err());
        hm.remove(h::STREAM_TTL);
        assert_eq!(expiry(&hm).unwrap().1.map(|e| e.1), Some(1_767_225_600_000));
        hm.insert(
            h::STREAM_EXPIRES_AT,
            HeaderValue::from_static("2026-01-01T00:00:00.000+00:00"),
        );
        assert!(expiry(&hm).is_ok());
        hm.insert(
            h::STREAM_EXPIRES_AT,
            HeaderValue::from_static("not-a-timestamp"),
        );
        assert!(expiry(&hm).is_err());
        hm.remove(h::STREAM_EXPIRES_AT);
        hm.insert(
            h::STREAM_TTL,
            HeaderValue::from_static("18446744073709551615"),
        );
        assert_eq!(expiry(&hm).unwrap().0, Some(u64::MAX));
    }

    #[test]
    fn fork_headers_need_a_source() {
        let mut hm = HeaderMap::new();
        hm.insert(h::STREAM_FORK_SUB_OFFSET, HeaderValue::from_static("0"));
        assert!(fork(&hm).is_err());
        hm.insert(
            h::STREAM_FORKED_FROM,
            HeaderValue::from_static("/v1/stream/a"),
        );
        hm.insert(h::STREAM_FORK_SUB_OFFSET, HeaderValue::from_static("05"));
        assert!(fork(&hm).is_err());
        hm.insert(h::STREAM_FORK_SUB_OFFSET, HeaderValue::from_static("5"));
        hm.insert(h::STREAM_FORK_OFFSET, HeaderValue::from_static("abc"));
        assert!(fork(&hm).is_err());
        hm.insert(
            h::STREAM_FORK_OFFSET,
            HeaderValue::from_static("0000000000000000_0000000000000003"),
        );
        let f = fork(&hm).unwrap().unwrap();
        assert_eq!((f.offset, f.sub_offset), (Some(3), 5));
    }

    #[test]
    fn paths_are_checked() {
        assert!(stream_path("/v1/stream/a").is_ok());
        assert!(stream_path("/v1/../a").is_err());
        assert!(stream_path("/").is_err());
        assert!(stream_path(&"/a".repeat(1000)).is_err());
    }
}
