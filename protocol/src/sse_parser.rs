//! An incremental Server-Sent Events parser over a byte stream.
//!
//! It owns only the framing: lines ended by CR, LF or CRLF (also when a CRLF is split between two
//! network chunks), `event:` and `data:` fields, a blank line ending an event. It knows nothing of
//! the protocol's meaning of events; its users (ds-sync's `follow`, the `ds` client) do. Written
//! by hand rather than taken from an SSE client crate so that the raw `data:` lines, the size
//! bound and the error on a torn event are under our control.

/// One dispatched event: its type (`message` when the server named none) and its data lines
/// joined with `\n`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Why the byte stream could not be parsed.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SseError {
    #[error("sse event exceeds the limit of {limit} bytes")]
    TooLarge { limit: usize },
    #[error("sse event is not valid utf-8")]
    NotUtf8,
}

/// Parser state between chunks.
#[derive(Debug)]
pub struct SseParser {
    /// Bytes of the current, not yet terminated line.
    line: Vec<u8>,
    /// A CR ended the previous chunk: a leading LF in the next one belongs to it.
    after_cr: bool,
    /// `event:` of the event being built.
    event: Option<String>,
    /// `data:` lines of the event being built, each followed by `\n`.
    data: Vec<u8>,
    /// Whether the event being built had any `data:` line (an empty one counts).
    has_data: bool,
    /// Bound on `line` + `data`, so a hostile or broken server cannot exhaust memory.
    limit: usize,
}

impl SseParser {
    pub fn new(limit: usize) -> Self {
        SseParser {
            line: Vec::new(),
            after_cr: false,
            event: None,
            data: Vec::new(),
            has_data: false,
            limit,
        }
    }

    /// Feeds one chunk and appends every event it completes to `out`.
    pub fn push(&mut self, mut chunk: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if self.after_cr {
            self.after_cr = false;
            if let [b'\n', rest @ ..] = chunk {
                chunk = rest;
            }
        }
        while let Some(end) = chunk.iter().position(|&b| b == b'\r' || b == b'\n') {
            self.line.extend_from_slice(&chunk[..end]);
            self.check_size()?;
            let line = std::mem::take(&mut self.line);
            self.line_complete(&line, out)?;
            let mut skip = end + 1;
            if chunk[end] == b'\r' {
                match chunk.get(end + 1) {
                    Some(b'\n') => skip += 1,
                    Some(_) => {}
                    None => self.after_cr = true,
                }
            }
            chunk = &chunk[skip..];
        }
        self.line.extend_from_slice(chunk);
        self.check_size()
    }

    /// Whether the stream ended cleanly: nothing buffered of an unfinished event.
    pub fn is_between_events(&self) -> bool {
        self.line.is_empty() && !self.has_data && self.event.is_none()
    }

    fn check_size(&self) -> Result<(), SseError> {
        if self.line.len() + self.data.len() > self.limit {
            return Err(SseError::TooLarge { limit: self.limit });
        }
        Ok(())
    }

    fn line_complete(&mut self, line: &[u8], out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        if line.is_empty() {
            return self.dispatch(out);
        }
        if line[0] == b':' {
            return Ok(()); // comment, e.g. a keep-alive
        }
        let (field, value) = match line.iter().position(|&b| b == b':') {
            Some(i) => {
                let value = &line[i + 1..];
                (&line[..i], value.strip_prefix(b" ").unwrap_or(value))
            }
            None => (line, &b""[..]),
        };
        match field {
            b"event" => {
                let name = std::str::from_utf8(value).map_err(|_| SseError::NotUtf8)?;
                self.event = Some(name.to_owned());
            }
            b"data" => {
                self.data.extend_from_slice(value);
                self.data.push(b'\n');
                self.has_data = true;
            }
            // `id:` and `retry:` are not used by this protocol; unknown fields are ignored as
            // the SSE standard requires.
            _ => {}
        }
        Ok(())
    }

    fn dispatch(&mut self, out: &mut Vec<SseEvent>) -> Result<(), SseError> {
        let event = self.event.take();
        if !std::mem::take(&mut self.has_data) {
            return Ok(());
        }
        let mut data = std::mem::take(&mut self.data);
        data.pop(); // the `\n` after the last data line
        let data = String::from_utf8(data).map_err(|_| SseError::NotUtf8)?;
        out.push(SseEvent {
            event: event.unwrap_or_else(|| "message".to_owned()),
            data,
        });
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_chunks(input: &[u8], chunk: usize) -> Vec<SseEvent> {
        let mut parser = SseParser::new(1 << 20);
        let mut out = Vec::new();
        for piece in input.chunks(chunk) {
            if let Err(e) = parser.push(piece, &mut out) {
                panic!("parse failed: {e}");
            }
        }
        assert!(parser.is_between_events());
        out
    }

    fn ev(event: &str, data: &str) -> SseEvent {
        SseEvent {
            event: event.into(),
            data: data.into(),
        }
    }

    #[test]
    fn parses_events_whatever_the_chunking_and_line_endings() {
        let input = b"event: data\r\ndata:[\r\ndata: {\"k\":\"v\"}\r\ndata:]\r\n\r\n\
            event:control\rdata:{\"streamNextOffset\":\"1\"}\r\r\
            : keep-alive\n\nevent: data\ndata:\n\n";
        let expected = vec![
            ev("data", "[\n{\"k\":\"v\"}\n]"),
            ev("control", "{\"streamNextOffset\":\"1\"}"),
            ev("data", ""),
        ];
        for chunk in 1..=input.len() {
            assert_eq!(
                parse_in_chunks(input, chunk),
                expected,
                "chunk size {chunk}"
            );
        }
    }

    #[test]
    fn strips_exactly_one_leading_space() {
        assert_eq!(
            parse_in_chunks(b"data:  two\n\n", 64),
            vec![ev("message", " two")]
        );
    }

    #[test]
    fn event_without_data_is_not_dispatched() {
        assert_eq!(parse_in_chunks(b"event: data\n\n", 64), vec![]);
    }

    #[test]
    fn oversized_event_is_an_error_not_an_allocation() {
        let mut parser = SseParser::new(8);
        let mut out = Vec::new();
        assert_eq!(
            parser.push(b"data: 0123456789\n", &mut out),
            Err(SseError::TooLarge { limit: 8 })
        );
    }

    #[test]
    fn torn_event_is_visible() {
        let mut parser = SseParser::new(64);
        let mut out = Vec::new();
        assert_eq!(parser.push(b"event: data\ndata: x\n", &mut out), Ok(()));
        assert!(out.is_empty());
        assert!(!parser.is_between_events());
    }
}
