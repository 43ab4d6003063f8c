//! A small incremental Server-Sent Events parser: bytes in, `(event, data)` pairs out.
//!
//! Lines end in CR, LF or CRLF; `data:` lines of one event are joined with `\n`; one space after
//! the colon is dropped; comments (`:`) are ignored. Nothing else of the SSE spec matters here.

/// One dispatched event.
#[derive(Debug, PartialEq, Eq)]
pub struct Event {
    pub kind: String,
    pub data: Vec<u8>,
}

/// Accumulates bytes across body frames.
#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    kind: String,
    data: Vec<u8>,
    has_data: bool,
    /// The last byte fed was a CR: an LF that starts the next frame belongs to it.
    after_cr: bool,
}

impl Parser {
    /// Feeds bytes; pushes every event completed by them onto `out`.
    pub fn feed(&mut self, bytes: &[u8], out: &mut Vec<Event>) {
        // Taken out while lines are handled, so a line can borrow it without a copy.
        let mut buf = std::mem::take(&mut self.buf);
        buf.extend_from_slice(bytes);
        let mut start = 0;
        if self.after_cr && !buf.is_empty() {
            // The LF of a CRLF split across two frames.
            if buf[0] == b'\n' {
                start = 1;
            }
            self.after_cr = false;
        }
        let mut i = start;
        while i < buf.len() {
            let b = buf[i];
            if b == b'\n' || b == b'\r' {
                self.line(&buf[start..i], out);
                i += 1;
                if b == b'\r' {
                    if i == buf.len() {
                        self.after_cr = true;
                    } else if buf[i] == b'\n' {
                        i += 1;
                    }
                }
                start = i;
            } else {
                i += 1;
            }
        }
        buf.drain(..start);
        self.buf = buf;
    }

    fn line(&mut self, line: &[u8], out: &mut Vec<Event>) {
        if line.is_empty() {
            if self.has_data || !self.kind.is_empty() {
                out.push(Event {
                    kind: std::mem::take(&mut self.kind),
                    data: std::mem::take(&mut self.data),
                });
            }
            self.has_data = false;
            return;
        }
        if line[0] == b':' {
            return;
        }
        let (field, value) = match line.iter().position(|&c| c == b':') {
            Some(p) => {
                let v = &line[p + 1..];
                (&line[..p], v.strip_prefix(b" ").unwrap_or(v))
            }
            None => (line, &[][..]),
        };
        match field {
            b"event" => self.kind = String::from_utf8_lossy(value).into_owned(),
            b"data" => {
                if self.has_data {
                    self.data.push(b'\n');
                }
                self.data.extend_from_slice(value);
                self.has_data = true;
            }
            _ => {}
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<Event> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            p.feed(chunk, &mut out);
        }
        out
    }

    #[test]
    fn events_survive_any_split_and_line_ending() {
        let input =
            b"event: data\r\ndata:ab\r\ndata: cd\r\n\r\n: keepalive\n\nevent:control\rdata:{}\r\r";
        for piece in 1..input.len() {
            let events = parse_in_pieces(input, piece);
            assert_eq!(
                events,
                vec![
                    Event {
                        kind: "data".into(),
                        data: b"ab\ncd".to_vec()
                    },
                    Event {
                        kind: "control".into(),
                        data: b"{}".to_vec()
                    },
                ],
                "split every {piece} bytes"
            );
        }
    }
}
