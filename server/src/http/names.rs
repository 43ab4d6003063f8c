//! The protocol's response header names as `HeaderName` constants. Inserting a header by a
//! `&'static str` name that is not a standard one allocates a fresh `HeaderName` every time;
//! these are built once, at compile time.

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
