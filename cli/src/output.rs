//! How stream data is written to stdout: the bytes of byte and text streams as they are, the
//! messages of JSON streams one per line (compact, so `jq`, `wc -l` and `while read` work).

use serde_json::value::RawValue;
use tokio::io::{AsyncWrite, AsyncWriteExt};

use crate::error::CliError;

/// What a read returns, by the stream's content type.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Shape {
    /// `application/json`: bodies and SSE data events are JSON arrays of messages.
    Messages,
    /// Anything else: bytes.
    Bytes,
}

impl Shape {
    pub fn of(content_type: &str) -> Self {
        match ds_protocol::MediaKind::of(content_type) {
            ds_protocol::MediaKind::Json => Shape::Messages,
            ds_protocol::MediaKind::Text | ds_protocol::MediaKind::Binary => Shape::Bytes,
        }
    }
}

/// The output lines of one JSON array of messages, each followed by `\n`.
pub fn message_lines(array: &[u8]) -> Result<Vec<u8>, CliError> {
    let messages: Vec<&RawValue> = serde_json::from_slice(array).map_err(|e| {
        CliError::Protocol(format!("a JSON stream's read is not a JSON array: {e}"))
    })?;
    let mut out = Vec::with_capacity(array.len() + messages.len());
    for message in messages {
        compact_into(message.get(), &mut out);
        out.push(b'\n');
    }
    Ok(out)
}

/// Valid JSON text without its insignificant whitespace. The server keeps each message's exact
/// text (number formatting included); dropping whitespace outside strings is the only change,
/// so numbers are never rounded through a float.
pub fn compact_into(json: &str, out: &mut Vec<u8>) {
    let mut in_string = false;
    let mut escaped = false;
    for &b in json.as_bytes() {
        if in_string {
            out.push(b);
            if escaped {
                escaped = false;
            } else if b == b'\\' {
                escaped = true;
            } else if b == b'"' {
                in_string = false;
            }
        } else if !matches!(b, b' ' | b'\t' | b'\n' | b'\r') {
            if b == b'"' {
                in_string = true;
            }
            out.push(b);
        }
    }
}

/// Writes and flushes, so a reader of a live tail sees each batch as it arrives. A closed pipe
/// (`ds read s | head`) is the reader's way of saying it has enough: [`Written::ReaderGone`].
pub async fn write_all(
    out: &mut (impl AsyncWrite + Unpin),
    bytes: &[u8],
) -> Result<Written, CliError> {
    let result = async {
        out.write_all(bytes).await?;
        out.flush().await
    }
    .await;
    match result {
        Ok(()) => Ok(Written::Done),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(Written::ReaderGone),
        Err(e) => Err(CliError::io("write stdout", e)),
    }
}

#[derive(Debug, PartialEq, Eq)]
pub enum Written {
    Done,
    ReaderGone,
}

#[cfg(test)]
mod tests {
    use super::*;

    fn compact(json: &str) -> String {
        let mut out = Vec::new();
        compact_into(json, &mut out);
        String::from_utf8(out).unwrap_or_default()
    }

    #[test]
    fn compacting_keeps_strings_and_numbers_exactly() {
        assert_eq!(
            compact("{ \"a b\" : [ 1.50 , 2e10 ],\n \"c\\\" d\": \"x\\\\\" }"),
            "{\"a b\":[1.50,2e10],\"c\\\" d\":\"x\\\\\"}"
        );
        assert_eq!(compact(" 12345678901234567890 "), "12345678901234567890");
    }

    #[test]
    fn messages_become_lines() {
        let lines = message_lines(b"[{\"a\": 1},\n [1, 2], \"s\\nt\"]").unwrap_or_default();
        assert_eq!(
            String::from_utf8(lines).unwrap_or_default(),
            "{\"a\":1}\n[1,2]\n\"s\\nt\"\n"
        );
        assert!(message_lines(b"{\"not\":\"an array\"}").is_err());
        assert_eq!(message_lines(b"[]").unwrap_or_default(), b"");
    }

    #[test]
    fn shapes() {
        assert_eq!(
            Shape::of("application/json; charset=utf-8"),
            Shape::Messages
        );
        assert_eq!(Shape::of("text/plain"), Shape::Bytes);
        assert_eq!(Shape::of("application/octet-stream"), Shape::Bytes);
    }
}
