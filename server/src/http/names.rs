//! The protocol's header names as `HeaderName` constants. Inserting a header by a
//! `&'static str` name that is not a standard one allocates a fresh `HeaderName` every time,
//! and looking one up by `&str` parses the name again on every call; these are built once, at
//! compile time.

use axum::http::HeaderName;
use ds_protocol::headers as h;

pub const STREAM_NEXT_OFFSET: HeaderName = HeaderName::from_static(h::STREAM_NEXT_OFFSET);
pub const STREAM_CURSOR: HeaderName = HeaderName::from_static(h::STREAM_CURSOR);
pub const STREAM_UP_TO_DATE: HeaderName = HeaderName::from_static(h::STREAM_UP_TO_DATE);
pub const STREAM_CLOSED: HeaderName = HeaderName::from_static(h::STREAM_CLOSED);
pub const STREAM_TTL: HeaderName = HeaderName::from_static(h::STREAM_TTL);
pub const STREAM_EXPIRES_AT: HeaderName = HeaderName::from_static(h::STREAM_EXPIRES_AT);
pub const STREAM_ID: HeaderName = HeaderName::from_static(h::STREAM_ID);
pub const STREAM_EARLIEST_OFFSET: HeaderName = HeaderName::from_static(h::STREAM_EARLIEST_OFFSET);
pub const PRODUCER_EPOCH: HeaderName = HeaderName::from_static(h::PRODUCER_EPOCH);
pub const PRODUCER_SEQ: HeaderName = HeaderName::from_static(h::PRODUCER_SEQ);
pub const STREAM_SSE_DATA_ENCODING: HeaderName =
    HeaderName::from_static(h::STREAM_SSE_DATA_ENCODING);

// Request headers, looked up on every append.
pub const STREAM_SEQ: HeaderName = HeaderName::from_static(h::STREAM_SEQ);
pub const PRODUCER_ID: HeaderName = HeaderName::from_static(h::PRODUCER_ID);
pub const STREAM_FORKED_FROM: HeaderName = HeaderName::from_static(h::STREAM_FORKED_FROM);
pub const STREAM_FORK_OFFSET: HeaderName = HeaderName::from_static(h::STREAM_FORK_OFFSET);
pub const STREAM_FORK_SUB_OFFSET: HeaderName = HeaderName::from_static(h::STREAM_FORK_SUB_OFFSET);
/// `Cross-Origin-Resource-Policy` (not among `http`'s standard names).
pub const CROSS_ORIGIN_RESOURCE_POLICY: HeaderName =
    HeaderName::from_static("cross-origin-resource-policy");
