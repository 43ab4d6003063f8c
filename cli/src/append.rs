//! `ds append` and `ds write`: data from arguments or stdin, sent in batches with idempotent
//! producer headers, each batch retried until the server has it.
//!
//! Every POST carries `Producer-Id`, `Producer-Epoch` and `Producer-Seq` (spec 5.2.1). A batch
//! whose answer was lost (the connection broke, the server was killed, a proxy answered 502) is
//! sent again with the same sequence number: the server either appends it (200) or recognises
//! it (204), so it lands exactly once. The epoch is the start time in milliseconds, so a later
//! run with the same `--producer-id` takes over and fences an earlier one still running.
//!
//! Input from stdin is read on a thread of its own (blocking reads stay off the runtime) and
//! handed over through a bounded channel, so memory stays bounded whatever the input's size.

use std::io::Read;
use std::time::{SystemTime, UNIX_EPOCH};

use bytes::Bytes;
use ds_protocol::headers::{
    PRODUCER_EPOCH, PRODUCER_EXPECTED_SEQ, PRODUCER_ID, PRODUCER_SEQ, STREAM_CLOSED,
    STREAM_NEXT_OFFSET,
};
use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};
use reqwest::{Method, StatusCode, Url};
use serde_json::value::RawValue;
use tokio::sync::mpsc;

use crate::error::CliError;
use crate::http::{Client, header, status_error};
use crate::output::Shape;

/// How much stdin is read at a time.
const READ_CHUNK: usize = 64 << 10;
/// Chunks read ahead of the batch being sent.
const READ_AHEAD_CHUNKS: usize = 16;
/// One JSON line may not grow past this while `ds` looks for its end: a file without newlines
/// piped into a JSON stream must fail, not fill memory.
const MAX_LINE_BYTES: usize = 64 << 20;

/// What `append` sends and how.
pub struct AppendOptions {
    pub producer_id: String,
    pub producer_epoch: u64,
    /// A batch is sent once it holds this many bytes (a single larger message goes alone).
    pub batch_bytes: usize,
    /// Close the stream with the last batch.
    pub close: bool,
    /// Draw a progress bar on stderr (only when it is a terminal).
    pub progress: bool,
}

impl AppendOptions {
    /// A producer id for one run: unique enough that two runs never share one by chance.
    pub fn fresh_producer_id() -> String {
        format!("ds-{:016x}", fastrand::u64(..))
    }

    /// The default epoch: now, in milliseconds (below 2^53 until the year 287 396).
    pub fn default_epoch() -> u64 {
        SystemTime::now()
            .duration_since(UNIX_EPOCH)
            .map(|d| d.as_millis() as u64)
            .unwrap_or(0)
    }
}

/// Where the data comes from.
pub enum Input {
    /// Each argument is one message (JSON streams) or appended as is, one after the other.
    Arguments(Vec<String>),
    /// Lines (JSON streams) or bytes from stdin.
    Stdin,
    /// One request body, sent as it is (`write --batch-json`: the server flattens the array).
    Body(Vec<u8>),
}

/// What an append run did, for the summary on stdout.
#[derive(Debug, Default)]
pub struct Appended {
    pub next_offset: Option<String>,
    pub batches: u64,
    pub bytes: u64,
}

/// The producer state of one run.
struct Producer<'a> {
    client: &'a Client,
    url: &'a Url,
    content_type: &'a str,
    options: &'a AppendOptions,
    seq: u64,
    appended: Appended,
    progress: Option<ProgressBar>,
}

impl Producer<'_> {
    /// Sends one batch (retried as needed) and advances the sequence number.
    async fn send(&mut self, body: Bytes, close: bool) -> Result<(), CliError> {
        let seq = self.seq;
        let what = format!("POST {} (producer seq {seq})", self.url);
        let progress = self.progress.clone();
        let attempted = self
            .client
            .send(
                &what,
                || {
                    let mut request = self
                        .client
                        .request(Method::POST, self.url.clone())
                        .header(PRODUCER_ID, &self.options.producer_id)
                        .header(PRODUCER_EPOCH, self.options.producer_epoch)
                        .header(PRODUCER_SEQ, seq)
                        .body(body.clone());
                    if !body.is_empty() {
                        request = request.header("content-type", self.content_type);
                    }
                    if close {
                        request = request.header(STREAM_CLOSED, "true");
                    }
                    request
                },
                |failure| match &progress {
                    Some(bar) => bar.set_message(format!("retrying: {failure}")),
                    None => crate::read::warn(failure),
                },
            )
            .await?;
        let response = attempted.response;
        match response.status() {
            StatusCode::OK => {}
            // A duplicate: an earlier attempt of this batch landed although its answer was lost.
            StatusCode::NO_CONTENT if attempted.attempts > 1 || close && body.is_empty() => {}
            StatusCode::NO_CONTENT => {
                // Only possible when the caller chose the producer id and epoch of an earlier run:
                // the server already had this batch, so it was not appended again.
                eprintln!(
                    "ds: batch {seq} of producer {} epoch {} was already appended; not appended again",
                    self.options.producer_id, self.options.producer_epoch
                );
            }
            StatusCode::CONFLICT if response.headers().contains_key(PRODUCER_EXPECTED_SEQ) => {
                let expected = header(&response, PRODUCER_EXPECTED_SEQ)
                    .unwrap_or("?")
                    .to_owned();
                return Err(CliError::Conflict(format!(
                    "{what}: the server expected producer seq {expected}: another process \
                     appends with producer id {} and epoch {}",
                    self.options.producer_id, self.options.producer_epoch
                )));
            }
            _ => return Err(status_error(&what, response).await),
        }
        if let Some(next) = header(&response, STREAM_NEXT_OFFSET) {
            self.appended.next_offset = Some(next.to_owned());
        }
        self.seq += 1;
        self.appended.batches += 1;
        self.appended.bytes += body.len() as u64;
        if let Some(bar) = &self.progress {
            bar.set_message(String::new());
        }
        Ok(())
    }
}

pub async fn append(
    client: &Client,
    url: &Url,
    content_type: &str,
    input: Input,
    options: &AppendOptions,
) -> Result<Appended, CliError> {
    let shape = Shape::of(content_type);
    let mut producer = Producer {
        client,
        url,
        content_type,
        options,
        seq: 0,
        appended: Appended::default(),
        progress: None,
    };
    match input {
        input @ (Input::Arguments(_) | Input::Body(_)) => {
            let body = match (input, shape) {
                (Input::Arguments(values), Shape::Messages) => {
                    json_batch(values.iter().map(String::as_bytes).enumerate())?
                }
                (Input::Arguments(values), Shape::Bytes) => values.concat().into_bytes(),
                (Input::Body(body), _) => body,
                (Input::Stdin, _) => Vec::new(),
            };
            if body.is_empty() && !options.close {
                return Err(CliError::Usage(
                    "nothing to append: the data is empty".to_owned(),
                ));
            }
            producer.send(Bytes::from(body), options.close).await?;
        }
        Input::Stdin => {
            producer.progress = options.progress.then(progress_bar).flatten();
            let result = append_stdin(&mut producer, shape).await;
            if let Some(bar) = &producer.progress {
                bar.finish_and_clear();
            }
            result?;
        }
    }
    Ok(producer.appended)
}

/// A progress bar on stderr, if stderr is a terminal: bytes sent, and a total when stdin is a
/// file whose size is known.
fn progress_bar() -> Option<ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let total = stdin_file_size();
    let bar = match total {
        Some(total) => ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stderr())
            .with_style(
                ProgressStyle::with_template(
                    "{bar:30} {binary_bytes}/{binary_total_bytes} {binary_bytes_per_sec} eta {eta} {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            ),
        None => ProgressBar::with_draw_target(None, ProgressDrawTarget::stderr()).with_style(
            ProgressStyle::with_template("{spinner} {binary_bytes} {binary_bytes_per_sec} {msg}")
                .unwrap_or_else(|_| ProgressStyle::default_spinner()),
        ),
    };
    Some(bar)
}

/// The size of stdin when it is a regular file (`ds append s < big.jsonl`).
fn stdin_file_size() -> Option<u64> {
    use std::os::fd::AsFd;
    let fd = std::io::stdin().as_fd().try_clone_to_owned().ok()?;
    let metadata = std::fs::File::from(fd).metadata().ok()?;
    metadata.is_file().then_some(metadata.len())
}

/// Reads stdin on its own thread; `None` in the channel never comes: the end is the channel
/// closing, an error is sent as `Err`.
fn spawn_stdin_reader() -> mpsc::Receiver<std::io::Result<Vec<u8>>> {
    let (tx, rx) = mpsc::channel(READ_AHEAD_CHUNKS);
    std::thread::spawn(move || {
        let mut stdin = std::io::stdin().lock();
        loop {
            let mut chunk = vec![0u8; READ_CHUNK];
            match stdin.read(&mut chunk) {
                Ok(0) => return,
                Ok(n) => {
                    chunk.truncate(n);
                    if tx.blocking_send(Ok(chunk)).is_err() {
                        return;
                    }
                }
                Err(e) if e.kind() == std::io::ErrorKind::Interrupted => {}
                Err(e) => {
                    let _ = tx.blocking_send(Err(e));
                    return;
                }
            }
        }
    });
    rx
}

/// Batches stdin: a batch is sent when it is full or when stdin has nothing more to give right
/// now (so `tail -f log | ds append s` appends each line as it comes, not at the end).
async fn append_stdin(producer: &mut Producer<'_>, shape: Shape) -> Result<(), CliError> {
    let mut chunks = spawn_stdin_reader();
    let batch_bytes = producer.options.batch_bytes;
    // Bytes read but not yet sent; for JSON, the tail after the last newline is kept for later.
    let mut buffered: Vec<u8> = Vec::new();
    let mut line_number = 0usize;
    let mut eof = false;
    let mut sent_any = false;
    loop {
        // Wait for input, then take whatever else is already there, up to a batch.
        if !eof {
            match chunks.recv().await {
                Some(chunk) => buffered.extend(chunk.map_err(|e| CliError::io("read stdin", e))?),
                None => eof = true,
            }
            while !eof && buffered.len() < batch_bytes {
                match chunks.try_recv() {
                    Ok(chunk) => buffered.extend(chunk.map_err(|e| CliError::io("read stdin", e))?),
                    Err(mpsc::error::TryRecvError::Empty) => break,
                    Err(mpsc::error::TryRecvError::Disconnected) => eof = true,
                }
            }
        }
        // Send full batches, then (at a pause or the end) what is left.
        loop {
            let (body, consumed) = match shape {
                Shape::Bytes => {
                    let take = buffered.len().min(batch_bytes);
                    (buffered[..take].to_vec(), take)
                }
                Shape::Messages => {
                    let complete = if eof {
                        buffered.len()
                    } else {
                        match buffered.iter().rposition(|&b| b == b'\n') {
                            Some(i) => i + 1,
                            None if buffered.len() > MAX_LINE_BYTES => {
                                return Err(CliError::Refused(format!(
                                    "line {} of stdin is longer than {MAX_LINE_BYTES} bytes",
                                    line_number + 1
                                )));
                            }
                            None => 0,
                        }
                    };
                    let (take, lines) = lines_for_batch(&buffered[..complete], batch_bytes);
                    let body = json_batch(
                        lines
                            .into_iter()
                            .enumerate()
                            .map(|(i, line)| (line_number + i, line)),
                    )?;
                    (body, take)
                }
            };
            let last = eof && consumed == buffered.len();
            if consumed == 0 {
                break;
            }
            if shape == Shape::Messages {
                line_number += buffered[..consumed].iter().filter(|&&b| b == b'\n').count();
            }
            buffered.drain(..consumed);
            if body.is_empty() {
                // Only blank lines: nothing to send.
                continue;
            }
            let close = last && producer.options.close;
            producer.send(Bytes::from(body), close).await?;
            sent_any = true;
            if let Some(bar) = &producer.progress {
                bar.inc(consumed as u64);
            }
            if close {
                return Ok(());
            }
            if !eof && buffered.len() < batch_bytes {
                break;
            }
        }
        if eof && buffered.is_empty() {
            break;
        }
        if eof && shape == Shape::Messages && buffered.iter().all(u8::is_ascii_whitespace) {
            break;
        }
    }
    if producer.options.close {
        // Everything was sent without the close (the input ended on blank lines, or was empty).
        producer.send(Bytes::new(), true).await?;
    } else if !sent_any {
        return Err(CliError::Usage(
            "nothing to append: stdin was empty".to_owned(),
        ));
    }
    Ok(())
}

/// The leading complete lines of `text` that fit in one batch (at least one line), and how many
/// bytes they span (newlines included).
fn lines_for_batch(text: &[u8], batch_bytes: usize) -> (usize, Vec<&[u8]>) {
    let mut lines = Vec::new();
    let mut taken = 0;
    while taken < text.len() {
        let rest = &text[taken..];
        let end = rest
            .iter()
            .position(|&b| b == b'\n')
            .map_or(rest.len(), |i| i + 1);
        if taken > 0 && taken + end > batch_bytes {
            break;
        }
        lines.push(&rest[..end]);
        taken += end;
    }
    (taken, lines)
}

/// A JSON array with one element per non-blank line, each checked to be one JSON value (so a
/// line that is itself an array stays one message: the server flattens only the outer array).
fn json_batch<'a>(lines: impl Iterator<Item = (usize, &'a [u8])>) -> Result<Vec<u8>, CliError> {
    let mut body = vec![b'['];
    for (index, line) in lines {
        let text = std::str::from_utf8(line)
            .map_err(|_| CliError::Refused(format!("message {} is not valid UTF-8", index + 1)))?;
        let text = text.trim();
        if text.is_empty() {
            continue;
        }
        serde_json::from_str::<&RawValue>(text).map_err(|e| {
            CliError::Refused(format!("message {} is not one JSON value: {e}", index + 1))
        })?;
        if body.len() > 1 {
            body.push(b',');
        }
        body.extend_from_slice(text.as_bytes());
    }
    if body.len() == 1 {
        return Ok(Vec::new());
    }
    body.push(b']');
    Ok(body)
}

/// The upstream CLI's escapes in a `write` argument: `\n`, `\t`, `\r` and `\\`; any other
/// backslash is kept as it is.
pub fn unescape(text: &str) -> String {
    let mut out = String::with_capacity(text.len());
    let mut chars = text.chars();
    while let Some(c) = chars.next() {
        if c != '\\' {
            out.push(c);
            continue;
        }
        match chars.next() {
            Some('n') => out.push('\n'),
            Some('t') => out.push('\t'),
            Some('r') => out.push('\r'),
            Some('\\') => out.push('\\'),
            Some(other) => {
                out.push('\\');
                out.push(other);
            }
            None => out.push('\\'),
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_line_is_one_message_even_an_array() {
        let body = json_batch(
            [&b"{\"a\":1}\n"[..], b"\n", b"[1,2]\r\n", b"  \"x\"  "]
                .into_iter()
                .enumerate(),
        )
        .unwrap_or_default();
        assert_eq!(
            String::from_utf8(body).unwrap_or_default(),
            "[{\"a\":1},[1,2],\"x\"]"
        );
    }

    #[test]
    fn a_bad_line_is_named() {
        let error = json_batch([&b"1\n"[..], b"{oops\n"].into_iter().enumerate());
        assert!(matches!(error, Err(CliError::Refused(m)) if m.contains("message 2")));
        let two = json_batch([&b"1 2\n"[..]].into_iter().enumerate());
        assert!(two.is_err(), "two values on one line are refused");
    }

    #[test]
    fn batches_end_on_line_boundaries_and_hold_at_least_one_line() {
        let text = b"aaaa\nbbbb\ncccc\n";
        let (taken, lines) = lines_for_batch(text, 10);
        assert_eq!((taken, lines.len()), (10, 2));
        let (taken, lines) = lines_for_batch(text, 3);
        assert_eq!((taken, lines.len()), (5, 1));
        let (taken, lines) = lines_for_batch(b"tail-without-newline", 100);
        assert_eq!((taken, lines.len()), (20, 1));
    }

    #[test]
    fn upstream_escapes() {
        assert_eq!(unescape(r"a\nb\tc\rd\\e\qf\"), "a\nb\tc\rd\\e\\qf\\");
    }
}
