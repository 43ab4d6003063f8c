//! The fan-out readers' SSE client: a GET written by hand on a raw TCP connection, the response
//! head parsed with `httparse`, the body de-chunked in place, and events handed to a callback as
//! borrowed slices.
//!
//! Every reader runs on the same two cores as the server under test, so whatever CPU a reader
//! spends per event is taken from the server and shows up as delivery latency. A general HTTP
//! client (a connection task, a body channel, a frame and an allocation per event) cost about as
//! much per event as the server itself; this one is one task, one `read` and no allocation per
//! event. It understands exactly what a Durable Streams SSE response can be: `200` with a
//! chunked or close-delimited (or, for an empty body, `Content-Length`) body.
//!
//! The event parser: lines end in CR, LF or CRLF; `data:` lines of one event are joined with
//! `\n`; one space after the colon is dropped; comments (`:`) are ignored. Nothing else of the
//! SSE spec matters here.

use anyhow::{Context, anyhow, bail};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

use crate::client::Server;

/// Bytes read from the socket at once.
const READ_BUF: usize = 16 << 10;
/// The most a response head may take.
const MAX_HEAD: usize = 16 << 10;

/// One open SSE response.
pub struct SseConn {
    stream: TcpStream,
    /// Raw bytes read and not yet decoded.
    raw: Vec<u8>,
    /// Decoded body bytes of the last [`SseConn::read`].
    body: Vec<u8>,
    framing: Framing,
}

#[derive(Debug, PartialEq, Eq)]
enum Framing {
    /// Chunked: the state of the chunk decoder.
    Chunked(Chunk),
    /// Everything until the server closes the connection.
    UntilClose,
    /// `Content-Length`: this many bytes are left.
    Length(u64),
}

impl Framing {
    /// The whole body has been decoded.
    fn done(&self) -> bool {
        matches!(self, Framing::Chunked(Chunk::Done) | Framing::Length(0))
    }
}

#[derive(Debug, PartialEq, Eq, Clone, Copy)]
enum Chunk {
    /// At a chunk-size line.
    Size,
    /// Inside a chunk's data; this many bytes to go.
    Data(u64),
    /// At the CRLF after a chunk's data.
    DataEnd,
    /// After the last chunk: trailers up to an empty line.
    Trailer,
    Done,
}

impl SseConn {
    /// Connects, sends `GET target`, and reads the response head; anything but `200` is an
    /// error naming the status.
    pub async fn open(server: &Server, target: &str) -> anyhow::Result<SseConn> {
        let mut stream = server.tcp_connect().await?;
        let request = format!(
            "GET {target} HTTP/1.1\r\nHost: {}\r\nAccept: text/event-stream\r\n\r\n",
            server.host.to_str().unwrap_or("localhost")
        );
        stream.write_all(request.as_bytes()).await?;
        let mut raw = Vec::with_capacity(READ_BUF);
        loop {
            let mut headers = [httparse::EMPTY_HEADER; 32];
            let mut resp = httparse::Response::new(&mut headers);
            match resp.parse(&raw).context("bad response head")? {
                httparse::Status::Complete(len) => {
                    let code = resp.code.unwrap_or(0);
                    if code != 200 {
                        bail!("SSE GET answered {code}");
                    }
                    let framing = framing_of(resp.headers)?;
                    raw.drain(..len);
                    return Ok(SseConn {
                        stream,
                        raw,
                        body: Vec::with_capacity(READ_BUF),
                        framing,
                    });
                }
                httparse::Status::Partial if raw.len() >= MAX_HEAD => {
                    bail!("response head over {MAX_HEAD} bytes")
                }
                httparse::Status::Partial => {
                    if read_more(&mut stream, &mut raw).await? == 0 {
                        bail!("connection closed inside the response head");
                    }
                }
            }
        }
    }

    /// Reads until some body bytes are decoded; `false` when the body has ended (the server
    /// closed it or sent the last chunk). The bytes are in [`SseConn::body`].
    pub async fn read(&mut self) -> anyhow::Result<bool> {
        loop {
            self.body.clear();
            self.decode()?;
            if !self.body.is_empty() {
                return Ok(true);
            }
            if self.framing.done() {
                return Ok(false);
            }
            if read_more(&mut self.stream, &mut self.raw).await? == 0 {
                if self.framing == Framing::UntilClose {
                    return Ok(false);
                }
                bail!("connection closed inside the body");
            }
        }
    }

    /// The body bytes decoded by the last [`SseConn::read`].
    pub fn body(&self) -> &[u8] {
        &self.body
    }

    fn decode(&mut self) -> anyhow::Result<()> {
        decode_into(&mut self.framing, &mut self.raw, &mut self.body)
    }
}

/// Moves whatever of `raw` can be decoded into `body`.
fn decode_into(framing: &mut Framing, raw: &mut Vec<u8>, body: &mut Vec<u8>) -> anyhow::Result<()> {
    let mut at = 0;
    match framing {
        Framing::UntilClose => {
            body.extend_from_slice(raw);
            at = raw.len();
        }
        Framing::Length(left) => {
            let n = raw.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
            body.extend_from_slice(&raw[..n]);
            *left -= n as u64;
            at = n;
        }
        Framing::Chunked(state) => loop {
            let rest = &raw[at..];
            match *state {
                Chunk::Done => break,
                Chunk::Size | Chunk::Trailer => {
                    let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                        break;
                    };
                    let line = &rest[..eol];
                    at += eol + 2;
                    *state = if *state == Chunk::Trailer {
                        if line.is_empty() {
                            Chunk::Done
                        } else {
                            Chunk::Trailer
                        }
                    } else {
                        match chunk_size(line)? {
                            0 => Chunk::Trailer,
                            n => Chunk::Data(n),
                        }
                    };
                }
                Chunk::Data(left) => {
                    if rest.is_empty() {
                        break;
                    }
                    let n = rest.len().min(usize::try_from(left).unwrap_or(usize::MAX));
                    body.extend_from_slice(&rest[..n]);
                    at += n;
                    *state = match left - n as u64 {
                        0 => Chunk::DataEnd,
                        left => Chunk::Data(left),
                    };
                }
                Chunk::DataEnd => {
                    if rest.len() < 2 {
                        break;
                    }
                    if &rest[..2] != b"\r\n" {
                        bail!("chunk data not followed by CRLF");
                    }
                    at += 2;
                    *state = Chunk::Size;
                }
            }
        },
    }
    raw.drain(..at);
    Ok(())
}

async fn read_more(stream: &mut TcpStream, raw: &mut Vec<u8>) -> anyhow::Result<usize> {
    raw.reserve(READ_BUF);
    Ok(stream.read_buf(raw).await?)
}

fn framing_of(headers: &[httparse::Header<'_>]) -> anyhow::Result<Framing> {
    let mut framing = Framing::UntilClose;
    for h in headers {
        if h.name.eq_ignore_ascii_case("transfer-encoding") {
            if !h.value.eq_ignore_ascii_case(b"chunked") {
                bail!(
                    "unsupported Transfer-Encoding {:?}",
                    String::from_utf8_lossy(h.value)
                );
            }
            return Ok(Framing::Chunked(Chunk::Size));
        }
        if h.name.eq_ignore_ascii_case("content-length") {
            let len = std::str::from_utf8(h.value)
                .ok()
                .and_then(|v| v.trim().parse().ok())
                .ok_or_else(|| anyhow!("bad Content-Length"))?;
            framing = Framing::Length(len);
        }
    }
    Ok(framing)
}

fn chunk_size(line: &[u8]) -> anyhow::Result<u64> {
    let hex = line.split(|&b| b == b';').next().unwrap_or_default();
    let hex = std::str::from_utf8(hex).map_err(|_| anyhow!("bad chunk size line"))?;
    u64::from_str_radix(hex.trim(), 16)
        .map_err(|_| anyhow!("bad chunk size line {:?}", String::from_utf8_lossy(line)))
}

/// Accumulates bytes across reads and dispatches whole events.
#[derive(Default)]
pub struct Parser {
    buf: Vec<u8>,
    kind: Vec<u8>,
    data: Vec<u8>,
    has_data: bool,
    /// The last byte fed was a CR: an LF that starts the next piece belongs to it.
    after_cr: bool,
}

impl Parser {
    /// Feeds bytes; calls `on_event(kind, data)` for every event completed by them.
    pub fn feed(&mut self, bytes: &[u8], mut on_event: impl FnMut(&[u8], &[u8])) {
        // Whole lines are taken straight from `bytes`; only a line split across two calls is
        // copied into `buf`.
        let mut start = 0;
        if self.after_cr {
            // The LF of a CRLF split across two pieces.
            if bytes.first() == Some(&b'\n') {
                start = 1;
            }
            self.after_cr = bytes.is_empty();
        }
        let mut i = start;
        while i < bytes.len() {
            let b = bytes[i];
            if b == b'\n' || b == b'\r' {
                if self.buf.is_empty() {
                    self.line(&bytes[start..i], &mut on_event);
                } else {
                    let mut line = std::mem::take(&mut self.buf);
                    line.extend_from_slice(&bytes[start..i]);
                    self.line(&line, &mut on_event);
                    line.clear();
                    self.buf = line;
                }
                i += 1;
                if b == b'\r' {
                    if i == bytes.len() {
                        self.after_cr = true;
                    } else if bytes[i] == b'\n' {
                        i += 1;
                    }
                }
                start = i;
            } else {
                i += 1;
            }
        }
        self.buf.extend_from_slice(&bytes[start..]);
    }

    fn line(&mut self, line: &[u8], on_event: &mut impl FnMut(&[u8], &[u8])) {
        if line.is_empty() {
            if self.has_data || !self.kind.is_empty() {
                on_event(&self.kind, &self.data);
            }
            self.kind.clear();
            self.data.clear();
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
            b"event" => {
                self.kind.clear();
                self.kind.extend_from_slice(value);
            }
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

    fn parse_in_pieces(input: &[u8], piece: usize) -> Vec<(String, String)> {
        let mut p = Parser::default();
        let mut out = Vec::new();
        for chunk in input.chunks(piece) {
            p.feed(chunk, |kind, data| {
                out.push((
                    String::from_utf8_lossy(kind).into_owned(),
                    String::from_utf8_lossy(data).into_owned(),
                ));
            });
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
                    ("data".to_owned(), "ab\ncd".to_owned()),
                    ("control".to_owned(), "{}".to_owned()),
                ],
                "split every {piece} bytes"
            );
        }
    }

    fn decode_in_pieces(framing: Framing, input: &[u8], piece: usize) -> (Vec<u8>, bool) {
        let mut raw_out = Vec::new();
        let (mut framing, mut raw, mut body) = (framing, Vec::new(), Vec::new());
        for chunk in input.chunks(piece) {
            raw.extend_from_slice(chunk);
            body.clear();
            decode_into(&mut framing, &mut raw, &mut body).unwrap();
            raw_out.extend_from_slice(&body);
        }
        (raw_out, framing.done())
    }

    #[test]
    fn chunked_bodies_decode_across_any_split() {
        let input = b"5;ext=1\r\nhello\r\n1a\r\nabcdefghijklmnopqrstuvwxyz\r\n0\r\nX-T: 1\r\n\r\n";
        for piece in 1..input.len() {
            let (body, done) = decode_in_pieces(Framing::Chunked(Chunk::Size), input, piece);
            assert_eq!(
                body, b"helloabcdefghijklmnopqrstuvwxyz",
                "split every {piece}"
            );
            assert!(done, "split every {piece}");
        }
    }

    #[test]
    fn bad_chunk_framing_is_an_error() {
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut raw = b"zz\r\n".to_vec();
        assert!(decode_into(&mut framing, &mut raw, &mut Vec::new()).is_err());
        let mut framing = Framing::Chunked(Chunk::Size);
        let mut raw = b"2\r\nabXY".to_vec();
        assert!(decode_into(&mut framing, &mut raw, &mut Vec::new()).is_err());
    }

    #[test]
    fn length_bodies_stop_at_the_length() {
        let (body, done) = decode_in_pieces(Framing::Length(3), b"abcdef", 2);
        assert_eq!(body, b"abc");
        assert!(done);
    }
}
