//! The Durable Streams protocol vocabulary, shared by the server, the sync worker and the tests.
//!
//! Everything here is pure: no I/O, no clocks except where a caller passes one in. A header name,
//! the offset format and the cursor rule are each spelled exactly once, in this crate.

pub mod content_type;
pub mod cursor;
pub mod headers;
pub mod offset;
pub mod sse;
pub mod sse_parser;

pub use content_type::MediaKind;
pub use offset::{Offset, OffsetParseError, ReadOffset};
pub use sse::ControlEvent;
