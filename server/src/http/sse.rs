//! SSE reads (spec 5.8): `event: data` batches, each immediately followed by an
//! `event: control` carrying the resume offset, written together in one chunk.
//!
//! The body is a generator over the stream's visible-tail watch: read from our own offset, send,
//! wait for the tail to move, repeat. Idle connections get a keep-alive comment; every
//! connection is closed after the reconnect interval (for CDN collapsing) or at shutdown.

use std::sync::Arc;
use std::time::SystemTime;

use axum::body::{Body, Bytes};
use axum::http::{HeaderName, HeaderValue, header};
use axum::response::Response;
use base64::Engine;
use bytes::BytesMut;
use ds_protocol::sse::{ControlEvent, split_lines};
use ds_protocol::{MediaKind, Offset, ReadOffset};
use futures::Stream as FutStream;

use super::error::ApiError;
use super::names;
use super::request::ReadQuery;
use super::{AppState, encode_body, resolve};
use crate::live::Visible;
use crate::stream::{ReadOutcome, SharedRead, Stream};

/// Starts an SSE response for `stream` from the query's offset.
pub fn respond(
    state: AppState,
    stream: Arc<Stream>,
    query: &ReadQuery,
) -> Result<Response, ApiError> {
    let base64 = stream.kind.sse_base64();
    let stream_id = stream.meta.id;
    // Subscribe and pin the start offset (`now` is the tail at this moment) before the headers
    // go out: a client that has seen `200 OK` must receive every append made after it, however
    // late the body is first polled.
    let rx = stream.subscribe();
    let earliest = stream.earliest();
    let start = resolve(query.offset, rx.borrow().tail, earliest);
    if start < earliest {
        // Released: answered like a catch-up read (410), before any event goes out.
        return Err(crate::stream::StreamError::Released {
            offset: Offset::at(start).to_string(),
            earliest,
        }
        .into());
    }
    let from_start = matches!(query.offset.unwrap_or(ReadOffset::Start), ReadOffset::Start);
    let body = Body::from_stream(events(state, stream, rx, start, from_start, query.cursor));
    let mut response = Response::new(body);
    let hs = response.headers_mut();
    hs.insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/event-stream"),
    );
    hs.insert(header::CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    hs.insert(names::STREAM_ID, HeaderValue::from(stream_id));
    // Ask reverse proxies (nginx) not to buffer the stream.
    hs.insert(
        HeaderName::from_static("x-accel-buffering"),
        HeaderValue::from_static("no"),
    );
    if base64 {
        hs.insert(
            names::STREAM_SSE_DATA_ENCODING,
            HeaderValue::from_static("base64"),
        );
    }
    Ok(response)
}

fn push_data_event(buf: &mut BytesMut, kind: MediaKind, outcome: &ReadOutcome) {
    let payload = encode_body(kind, outcome);
    buf.extend_from_slice(b"event: data\n");
    if kind.sse_base64() {
        let text = base64::engine::general_purpose::STANDARD.encode(&payload);
        buf.extend_from_slice(b"data:");
        buf.extend_from_slice(text.as_bytes());
        buf.extend_from_slice(b"\n");
    } else {
        for line in split_lines(&payload) {
            buf.extend_from_slice(b"data:");
            buf.extend_from_slice(line);
            buf.extend_from_slice(b"\n");
        }
    }
    buf.extend_from_slice(b"\n");
}

/// The cursor for a control event, given the reader's own (spec 10.1).
fn next_cursor(now: SystemTime, client: Option<u64>) -> u64 {
    ds_protocol::cursor::next_cursor(now, client, fastrand::u64(1..=3600))
}

/// Appends a control event; `cursor` is left out once the stream is closed.
fn push_control(buf: &mut BytesMut, next: u64, closed: bool, up_to_date: bool, cursor: u64) {
    let control = ControlEvent {
        stream_next_offset: Offset::at(next).to_string(),
        stream_cursor: (!closed).then(|| cursor.to_string()),
        up_to_date: up_to_date || closed,
        stream_closed: closed,
    };
    buf.extend_from_slice(b"event: control\ndata:");
    // Serialising a struct of strings and bools cannot fail.
    buf.extend_from_slice(
        serde_json::to_string(&control)
            .unwrap_or_default()
            .as_bytes(),
    );
    buf.extend_from_slice(b"\n\n");
}

fn events(
    state: AppState,
    stream: Arc<Stream>,
    mut rx: tokio::sync::watch::Receiver<Visible>,
    start: u64,
    from_start: bool,
    cursor: Option<u64>,
) -> impl FutStream<Item = Result<Bytes, std::io::Error>> + Send + 'static {
    async_stream::stream! {
        // Counted while the body is being streamed: from its first poll until it is dropped.
        let _reader = crate::metrics::LiveReader::new(crate::metrics::LiveMode::Sse);
        let inner = &state.inner;
        let server = &inner.config.server;
        let mut pos = start;
        // Spread reconnects over ±10% of the interval, so readers that connected together do
        // not all reconnect in the same instant.
        let jitter = 0.9 + 0.2 * fastrand::f64();
        let reconnect_at =
            tokio::time::Instant::now() + server.sse_reconnect_interval.mul_f64(jitter);
        // One timer for the connection's whole life, serving both the keep-alive and the
        // reconnect: an idle reader is mostly this future, and a timer armed and cancelled on
        // every append is a real cost with many readers.
        let mut last_sent = tokio::time::Instant::now();
        let next_timer = |last_sent: tokio::time::Instant| {
            (last_sent + server.sse_keepalive_interval).min(reconnect_at)
        };
        let timer = tokio::time::sleep_until(next_timer(last_sent));
        tokio::pin!(timer);
        let mut sent_anything = false;
        loop {
            let visible = *rx.borrow_and_update();
            if visible.gone {
                break;
            }
            if pos < visible.tail {
                // Readers at the same offset share one encoding of the read.
                let read = match stream.shared_read(pos, visible) {
                    Some(shared) => shared,
                    None => {
                        // Boxed: an idle reader's future should not carry a read's size.
                        let reading = Box::pin(inner.streams.read_bounded(&stream, pos, visible));
                        let outcome = match reading.await {
                            Ok(o) => o,
                            // A reader from the start (-1) that was sent nothing yet raced
                            // a release: it starts at the new earliest offset instead.
                            Err(crate::stream::StreamError::Released { earliest, .. })
                                if from_start && !sent_anything && earliest > pos =>
                            {
                                pos = earliest;
                                continue;
                            }
                            // Released while this reader lagged: the response ends, and the
                            // reconnect at its offset is answered 410 with the earliest offset.
                            Err(crate::stream::StreamError::Released { .. }) => break,
                            Err(e) => {
                                tracing::warn!(stream = %stream.meta.path, error = %e, "sse read failed");
                                break;
                            }
                        };
                        let mut encoded = BytesMut::new();
                        if !outcome.is_empty() {
                            push_data_event(&mut encoded, stream.kind, &outcome);
                        }
                        let data_len = encoded.len();
                        let shared_cursor = next_cursor(SystemTime::now(), None);
                        push_control(
                            &mut encoded,
                            outcome.next,
                            outcome.at_end(),
                            outcome.up_to_date(),
                            shared_cursor,
                        );
                        let read = SharedRead {
                            start: pos,
                            visible,
                            next: outcome.next,
                            up_to_date: outcome.up_to_date(),
                            at_end: outcome.at_end(),
                            encoded: encoded.freeze(),
                            data_len,
                            cursor: shared_cursor,
                        };
                        stream.share_read(read.clone());
                        read
                    }
                };
                // The shared events as they are when their cursor is the one this reader gets
                // (it sent none, or one behind, and the same interval is still current), or
                // when the stream is closed (no cursor); else the shared data event and a control
                // event of its own. With a thousand readers on a stream this is one encoding per
                // append instead of one per reader.
                let own_cursor = next_cursor(SystemTime::now(), cursor);
                let chunk = if read.at_end || own_cursor == read.cursor {
                    read.encoded.clone()
                } else {
                    let mut buf = BytesMut::with_capacity(read.data_len + 160);
                    buf.extend_from_slice(&read.encoded[..read.data_len]);
                    push_control(&mut buf, read.next, read.at_end, read.up_to_date, own_cursor);
                    buf.freeze()
                };
                pos = read.next;
                sent_anything = true;
                last_sent = tokio::time::Instant::now();
                yield Ok(chunk);
                if read.at_end {
                    break;
                }
                continue;
            }
            if !sent_anything || visible.closed {
                let mut buf = BytesMut::new();
                push_control(&mut buf, pos, visible.closed, true, next_cursor(SystemTime::now(), cursor));
                sent_anything = true;
                last_sent = tokio::time::Instant::now();
                yield Ok(buf.freeze());
                if visible.closed {
                    break;
                }
            }
            tokio::select! {
                changed = rx.changed() => {
                    if changed.is_err() {
                        break;
                    }
                }
                () = &mut timer => {
                    let now = tokio::time::Instant::now();
                    if now >= reconnect_at {
                        break;
                    }
                    // Only a connection that sent nothing for a whole interval needs one.
                    if now >= last_sent + server.sse_keepalive_interval {
                        last_sent = now;
                        yield Ok(Bytes::from_static(b": keep-alive\n\n"));
                    }
                    timer.as_mut().reset(next_timer(last_sent));
                }
                () = inner.shutdown.cancelled() => break,
            }
        }
    }
}
