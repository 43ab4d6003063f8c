//! `ds read` (catch-up to the tail, optionally then live) and `ds tail` (live over SSE).
//!
//! A live read resumes from the offset of the last `control` event after every disconnect (the
//! server's periodic SSE close, a restart, a network error), and writes a data event only once
//! its control event has arrived: a connection lost between the two is read again from the
//! previous offset, so nothing is printed twice and nothing is skipped.

use base64::Engine;
use ds_protocol::ControlEvent;
use ds_protocol::headers::{
    QUERY_LIVE, QUERY_OFFSET, STREAM_CLOSED, STREAM_NEXT_OFFSET, STREAM_SSE_DATA_ENCODING,
    STREAM_UP_TO_DATE,
};
use ds_protocol::sse::{EVENT_CONTROL, EVENT_DATA};
use ds_protocol::sse_parser::{SseEvent, SseParser};
use futures::StreamExt;
use reqwest::{Method, StatusCode, Url};
use tokio::io::AsyncWrite;

use crate::error::CliError;
use crate::http::{Backoff, Client, describe_error, header, status_error};
use crate::output::{Shape, Written, message_lines, write_all};

/// The largest SSE event accepted: a read page is at most a few MiB (the server's
/// `DS_LIMITS__MAX_READ_BYTES`, 4 MiB by default), base64 makes it 4/3 larger.
const MAX_SSE_EVENT_BYTES: usize = 64 << 20;

/// Where a read starts and what it prints besides the data.
pub struct ReadOptions {
    /// `-1`, `now` or an offset the server handed out.
    pub from: String,
    /// Print `offset <next offset>` on stderr after each batch.
    pub offsets: bool,
}

/// How a read ended.
#[derive(Debug, PartialEq, Eq)]
pub enum ReadEnd {
    /// Catch-up reached the tail (or a live read saw the stream closed).
    Finished,
    /// stdout was closed by its reader.
    ReaderGone,
}

/// The stream's content type and tail, from HEAD.
pub struct Head {
    pub content_type: String,
    pub next_offset: String,
    pub closed: bool,
}

pub async fn head(client: &Client, url: &Url) -> Result<Head, CliError> {
    let what = format!("HEAD {url}");
    let attempted = client
        .send(&what, || client.request(Method::HEAD, url.clone()), warn)
        .await?;
    let response = attempted.response;
    if response.status() != StatusCode::OK {
        return Err(status_error(&what, response).await);
    }
    let content_type = header(&response, "content-type")
        .unwrap_or(ds_protocol::content_type::DEFAULT_CONTENT_TYPE)
        .to_owned();
    let next_offset = header(&response, STREAM_NEXT_OFFSET)
        .ok_or_else(|| CliError::Protocol(format!("{what}: no {STREAM_NEXT_OFFSET} header")))?
        .to_owned();
    let closed = response
        .headers()
        .get(STREAM_CLOSED)
        .is_some_and(|v| ds_protocol::headers::is_true(v.as_bytes()));
    Ok(Head {
        content_type,
        next_offset,
        closed,
    })
}

/// A retry's complaint, on stderr, so a script's stdout stays data only.
pub fn warn(message: &str) {
    eprintln!("ds: {message}; retrying");
}

/// Catch-up: pages from `options.from` until `Stream-Up-To-Date`. Returns the offset reached.
pub async fn catch_up(
    client: &Client,
    url: &Url,
    shape: Shape,
    options: &ReadOptions,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<(String, ReadEnd, bool), CliError> {
    let mut offset = options.from.clone();
    loop {
        let mut page_url = url.clone();
        page_url
            .query_pairs_mut()
            .append_pair(QUERY_OFFSET, &offset);
        let what = format!("GET {page_url}");
        let attempted = client
            .send(
                &what,
                || client.request(Method::GET, page_url.clone()),
                warn,
            )
            .await?;
        let response = attempted.response;
        if response.status() != StatusCode::OK {
            return Err(status_error(&what, response).await);
        }
        let next = header(&response, STREAM_NEXT_OFFSET)
            .ok_or_else(|| CliError::Protocol(format!("{what}: no {STREAM_NEXT_OFFSET} header")))?
            .to_owned();
        let up_to_date = response.headers().contains_key(STREAM_UP_TO_DATE);
        let closed = response
            .headers()
            .get(STREAM_CLOSED)
            .is_some_and(|v| ds_protocol::headers::is_true(v.as_bytes()));
        let body = response
            .bytes()
            .await
            .map_err(|e| CliError::Unavailable(format!("{what}: {}", describe_error(&e))))?;
        let printable = match shape {
            Shape::Messages => message_lines(&body)?,
            Shape::Bytes => body.to_vec(),
        };
        if write_all(out, &printable).await? == Written::ReaderGone {
            return Ok((next, ReadEnd::ReaderGone, closed));
        }
        if options.offsets {
            eprintln!("offset {next}");
        }
        if up_to_date || closed {
            return Ok((next, ReadEnd::Finished, closed));
        }
        if next == offset {
            return Err(CliError::Protocol(format!(
                "{what}: the page did not advance and the stream is not up to date"
            )));
        }
        offset = next;
    }
}

/// Live over SSE from `options.from` until the stream is closed (or stdout is), reconnecting
/// after every disconnect from the last control event's offset.
pub async fn follow(
    client: &Client,
    url: &Url,
    shape: Shape,
    options: &ReadOptions,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<ReadEnd, CliError> {
    let mut offset = options.from.clone();
    let mut backoff = Backoff::default();
    loop {
        match follow_once(client, url, shape, options, &mut offset, out).await {
            Ok(Some(end)) => return Ok(end),
            // The server ended the response (its periodic close): resume at once.
            Ok(None) => backoff.reset(),
            Err(Disconnect::Fatal(error)) => return Err(error),
            Err(Disconnect::Transient(message)) => {
                eprintln!("ds: {message}; reconnecting from offset {offset}");
                tokio::time::sleep(backoff.next_delay()).await;
            }
        }
    }
}

enum Disconnect {
    /// The stream is gone, the credentials were refused, the reply makes no sense: stop.
    Fatal(CliError),
    /// The server went away or stumbled: try again.
    Transient(String),
}

/// One SSE connection. `Ok(None)` when the server closed it normally.
async fn follow_once(
    client: &Client,
    url: &Url,
    shape: Shape,
    options: &ReadOptions,
    offset: &mut String,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Option<ReadEnd>, Disconnect> {
    let mut live_url = url.clone();
    live_url
        .query_pairs_mut()
        .append_pair(QUERY_OFFSET, offset)
        .append_pair(QUERY_LIVE, ds_protocol::headers::LIVE_SSE);
    let what = format!("GET {live_url}");
    let response = client
        .live_request(live_url)
        .header("accept", "text/event-stream")
        .send()
        .await
        .map_err(|e| Disconnect::Transient(format!("{what}: {}", describe_error(&e))))?;
    let status = response.status();
    if status != StatusCode::OK {
        let error = status_error(&what, response).await;
        return Err(match error {
            CliError::Unavailable(message) => Disconnect::Transient(message),
            _ if status == StatusCode::TOO_MANY_REQUESTS => {
                Disconnect::Transient(error.to_string())
            }
            other => Disconnect::Fatal(other),
        });
    }
    let base64 = header(&response, STREAM_SSE_DATA_ENCODING)
        .is_some_and(|v| v.eq_ignore_ascii_case("base64"));
    let mut parser = SseParser::new(MAX_SSE_EVENT_BYTES);
    let mut events = Vec::new();
    // A data event's output, held until its control event confirms where it ends.
    let mut pending: Vec<u8> = Vec::new();
    let mut body = response.bytes_stream();
    while let Some(chunk) = body.next().await {
        let chunk =
            chunk.map_err(|e| Disconnect::Transient(format!("{what}: {}", describe_error(&e))))?;
        parser
            .push(&chunk, &mut events)
            .map_err(|e| Disconnect::Fatal(CliError::Protocol(format!("{what}: {e}"))))?;
        for event in events.drain(..) {
            if let Some(end) =
                handle_event(event, shape, base64, options, offset, &mut pending, out)
                    .await
                    .map_err(Disconnect::Fatal)?
            {
                return Ok(Some(end));
            }
        }
    }
    Ok(None)
}

async fn handle_event(
    event: SseEvent,
    shape: Shape,
    base64: bool,
    options: &ReadOptions,
    offset: &mut String,
    pending: &mut Vec<u8>,
    out: &mut (impl AsyncWrite + Unpin),
) -> Result<Option<ReadEnd>, CliError> {
    if event.event == EVENT_DATA {
        let payload = if base64 {
            let text: String = event
                .data
                .chars()
                .filter(|c| *c != '\n' && *c != '\r')
                .collect();
            base64::engine::general_purpose::STANDARD
                .decode(text)
                .map_err(|e| {
                    CliError::Protocol(format!("a base64 data event does not decode: {e}"))
                })?
        } else {
            event.data.into_bytes()
        };
        match shape {
            Shape::Messages => pending.extend(message_lines(&payload)?),
            Shape::Bytes => pending.extend(payload),
        }
        return Ok(None);
    }
    if event.event != EVENT_CONTROL {
        return Ok(None);
    }
    let control: ControlEvent = serde_json::from_str(&event.data)
        .map_err(|e| CliError::Protocol(format!("a control event is not valid: {e}")))?;
    if !pending.is_empty() {
        if write_all(out, pending).await? == Written::ReaderGone {
            return Ok(Some(ReadEnd::ReaderGone));
        }
        pending.clear();
        if options.offsets {
            eprintln!("offset {}", control.stream_next_offset);
        }
    }
    *offset = control.stream_next_offset;
    Ok(control.stream_closed.then_some(ReadEnd::Finished))
}
