//! What the e2e tests need of a Durable Streams client, written from the protocol text: create,
//! append (plain, or with idempotent producer headers retried until acknowledged), catch-up reads
//! to the tail, and re-assembling ds-sync's rows into the form a catch-up read has.
//!
//! Shared by several test binaries, each using a subset.
#![allow(dead_code)]

use std::time::{Duration, Instant};

use anyhow::Context;
use reqwest::{Method, StatusCode};

pub const JSON: &str = "application/json";
pub const BINARY: &str = "application/octet-stream";
pub const TEXT: &str = "text/plain";

/// What a stream holds, in the shape its content type gives it.
#[derive(Debug, Clone, PartialEq)]
pub enum Content {
    /// A JSON stream: its messages in order.
    Messages(Vec<serde_json::Value>),
    /// Any other stream: its bytes.
    Bytes(Vec<u8>),
}

impl Content {
    /// Messages or bytes, for failure messages that should not print megabytes.
    pub fn len(&self) -> usize {
        match self {
            Content::Messages(messages) => messages.len(),
            Content::Bytes(bytes) => bytes.len(),
        }
    }
}

/// Where `actual` first departs from `expected`, for an assertion message that does not print
/// whole streams.
pub fn first_difference(expected: &Content, actual: &Content) -> String {
    fn describe<T: PartialEq + std::fmt::Debug>(expected: &[T], actual: &[T]) -> String {
        let at = expected
            .iter()
            .zip(actual)
            .position(|(e, a)| e != a)
            .unwrap_or(expected.len().min(actual.len()));
        format!(
            "expected {} items, got {}; first difference at {at}: expected {:?}, got {:?}",
            expected.len(),
            actual.len(),
            &expected[at..(at + 3).min(expected.len())],
            &actual[at..(at + 3).min(actual.len())]
        )
    }
    match (expected, actual) {
        (Content::Messages(e), Content::Messages(a)) => describe(e, a),
        (Content::Bytes(e), Content::Bytes(a)) => describe(e, a),
        (e, a) => format!("expected {e:?}, got {a:?} (different kinds)"),
    }
}

/// Whether `content_type` is a JSON stream's (`application/json`, parameters ignored).
pub fn is_json(content_type: &str) -> bool {
    content_type
        .split(';')
        .next()
        .is_some_and(|media| media.trim().eq_ignore_ascii_case(JSON))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// A protocol client for one base URL, optionally presenting a bearer token.
#[derive(Clone)]
pub struct StreamClient {
    pub http: reqwest::Client,
    pub base_url: String,
    pub token: Option<String>,
}

impl StreamClient {
    pub fn new(http: reqwest::Client, base_url: impl Into<String>, token: Option<String>) -> Self {
        Self {
            http,
            base_url: base_url.into(),
            token,
        }
    }

    pub fn url(&self, path_and_query: &str) -> String {
        format!("{}{path_and_query}", self.base_url)
    }

    /// A request with the bearer token, if any.
    pub fn request(&self, method: Method, path_and_query: &str) -> reqwest::RequestBuilder {
        let builder = self.http.request(method, self.url(path_and_query));
        match &self.token {
            Some(token) => builder.bearer_auth(token),
            None => builder,
        }
    }

    /// `PUT`: 201 (created) or 200 (already there with the same configuration).
    pub async fn create(&self, path: &str, content_type: &str) -> anyhow::Result<()> {
        let response = self
            .request(Method::PUT, path)
            .header("content-type", content_type)
            .send()
            .await
            .with_context(|| format!("PUT {path}"))?;
        let status = response.status();
        anyhow::ensure!(
            status == StatusCode::CREATED || status == StatusCode::OK,
            "PUT {path}: {status} {}",
            response.text().await.unwrap_or_default()
        );
        Ok(())
    }

    /// A plain `POST` (no producer headers); returns the response whatever its status.
    pub async fn append(
        &self,
        path: &str,
        content_type: &str,
        body: impl Into<reqwest::Body>,
    ) -> anyhow::Result<reqwest::Response> {
        self.request(Method::POST, path)
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .with_context(|| format!("POST {path}"))
    }

    /// `HEAD`: the stream's content type and tail (`Stream-Next-Offset`).
    pub async fn head(&self, path: &str) -> anyhow::Result<(String, String)> {
        let response = self
            .request(Method::HEAD, path)
            .send()
            .await
            .with_context(|| format!("HEAD {path}"))?;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "HEAD {path}: {}",
            response.status()
        );
        let content_type = header(&response, "content-type")
            .context("HEAD without Content-Type")?
            .to_owned();
        let tail = header(&response, "stream-next-offset")
            .context("HEAD without Stream-Next-Offset")?
            .to_owned();
        Ok((content_type, tail))
    }

    /// Catch-up reads from the start until `Stream-Up-To-Date: true`, following
    /// `Stream-Next-Offset` across pages; JSON pages are arrays of messages.
    pub async fn read_all(&self, path: &str) -> anyhow::Result<Content> {
        let mut offset = "-1".to_owned();
        let mut messages = Vec::new();
        let mut bytes = Vec::new();
        let mut json = None;
        // A stream this test wrote fits in far fewer pages; more means the offset did not move.
        for _ in 0..10_000 {
            let response = self
                .request(Method::GET, &format!("{path}?offset={offset}"))
                .send()
                .await
                .with_context(|| format!("GET {path}?offset={offset}"))?;
            anyhow::ensure!(
                response.status() == StatusCode::OK,
                "catch-up GET {path}?offset={offset}: {}",
                response.status()
            );
            let page_is_json = is_json(header(&response, "content-type").unwrap_or_default());
            json.get_or_insert(page_is_json);
            let next = header(&response, "stream-next-offset")
                .context("catch-up read without Stream-Next-Offset")?
                .to_owned();
            let up_to_date = header(&response, "stream-up-to-date") == Some("true");
            let body = response.bytes().await?;
            if page_is_json {
                let page: Vec<serde_json::Value> = serde_json::from_slice(&body)
                    .with_context(|| format!("JSON page at {offset} is not an array"))?;
                messages.extend(page);
            } else {
                bytes.extend_from_slice(&body);
            }
            if up_to_date {
                return Ok(if json == Some(true) {
                    Content::Messages(messages)
                } else {
                    Content::Bytes(bytes)
                });
            }
            anyhow::ensure!(
                next != offset,
                "catch-up read at {offset} is not up to date and did not advance"
            );
            offset = next;
        }
        anyhow::bail!("catch-up read of {path} never reached Stream-Up-To-Date")
    }
}

/// An idempotent producer (`Producer-Id`, `Producer-Epoch`, `Producer-Seq`) that retries each
/// append with the same sequence number until the server acknowledges it, so a retry after a
/// crash anywhere on the path is deduplicated instead of written twice.
pub struct Producer {
    pub id: String,
    pub epoch: u64,
    /// The sequence number of the next new append.
    pub next_seq: u64,
    /// Attempts that did not get an answer from the server (transport errors, 502/503/504 from
    /// Envoy), over the producer's lifetime.
    pub retries: u64,
    /// Appends the server answered 204 (already had them): retries of appends whose first
    /// answer was lost.
    pub duplicates: u64,
    /// The body of the last acknowledged append, for [`Producer::resend_last`].
    last_body: Vec<u8>,
}

/// Statuses that mean "no answer from the server yet": Envoy could not reach it.
fn is_unreached(status: StatusCode) -> bool {
    matches!(
        status,
        StatusCode::BAD_GATEWAY | StatusCode::SERVICE_UNAVAILABLE | StatusCode::GATEWAY_TIMEOUT
    )
}

impl Producer {
    pub fn new(id: impl Into<String>) -> Self {
        Self {
            id: id.into(),
            epoch: 0,
            next_seq: 0,
            retries: 0,
            duplicates: 0,
            last_body: Vec::new(),
        }
    }

    /// Sends the last acknowledged append again, same sequence number and body, as a client
    /// does whose answer was lost; returns the status (the protocol says 204: a duplicate).
    pub async fn resend_last(
        &self,
        client: &StreamClient,
        path: &str,
        content_type: &str,
    ) -> anyhow::Result<StatusCode> {
        let seq = self
            .next_seq
            .checked_sub(1)
            .context("nothing acknowledged yet")?;
        let response = client
            .request(Method::POST, path)
            .header("content-type", content_type)
            .header("producer-id", &self.id)
            .header("producer-epoch", self.epoch.to_string())
            .header("producer-seq", seq.to_string())
            .body(self.last_body.clone())
            .send()
            .await
            .with_context(|| format!("resend {path} seq {seq}"))?;
        Ok(response.status())
    }

    /// Appends `body` as the next sequence number, retrying (same number, short backoff) on
    /// transport errors and 502/503/504 until the server answers 200 or 204, or `deadline`
    /// passes. Any other answer is an error: 409 here means the server lost an acknowledged
    /// append (a sequence gap), 403 a fenced epoch.
    pub async fn append_until_acknowledged(
        &mut self,
        client: &StreamClient,
        path: &str,
        content_type: &str,
        body: &[u8],
        deadline: Duration,
    ) -> anyhow::Result<()> {
        let started = Instant::now();
        let mut backoff = Duration::from_millis(20);
        let seq = self.next_seq;
        loop {
            let attempt = client
                .request(Method::POST, path)
                .header("content-type", content_type)
                .header("producer-id", &self.id)
                .header("producer-epoch", self.epoch.to_string())
                .header("producer-seq", seq.to_string())
                // One attempt must not outlive a crash: the server or Envoy may die mid-request.
                .timeout(Duration::from_secs(10))
                .body(body.to_vec())
                .send()
                .await;
            let failure = match attempt {
                Ok(response) if response.status() == StatusCode::OK => {
                    self.next_seq += 1;
                    self.last_body = body.to_vec();
                    return Ok(());
                }
                Ok(response) if response.status() == StatusCode::NO_CONTENT => {
                    self.duplicates += 1;
                    self.next_seq += 1;
                    self.last_body = body.to_vec();
                    return Ok(());
                }
                Ok(response) if is_unreached(response.status()) => {
                    format!("{}", response.status())
                }
                Ok(response) => {
                    let status = response.status();
                    let expected = header(&response, "producer-expected-seq").map(str::to_owned);
                    anyhow::bail!(
                        "append {path} producer {} epoch {} seq {seq}: {status} \
                         (producer-expected-seq {expected:?}) {}",
                        self.id,
                        self.epoch,
                        response.text().await.unwrap_or_default()
                    );
                }
                Err(error) => format!("{error:#}"),
            };
            self.retries += 1;
            anyhow::ensure!(
                started.elapsed() < deadline,
                "append {path} seq {seq} not acknowledged within {deadline:?}; last: {failure}"
            );
            // Backoff between retries of an unreached server, not a wait for a condition.
            tokio::time::sleep(backoff).await;
            backoff = (backoff * 2).min(Duration::from_millis(250));
        }
    }
}

/// ds-sync's rows of `stream` re-assembled in key order `(stream_offset, idx)`: messages for a
/// JSON stream, concatenated bytes otherwise. Fails if a row holds the other kind.
pub async fn mirrored(
    pg: &tokio_postgres::Client,
    stream: &str,
    json: bool,
) -> anyhow::Result<Content> {
    let rows = pg
        .query(
            "SELECT data::text, bytes FROM ds_messages WHERE stream = $1 \
             ORDER BY stream_offset, idx",
            &[&stream],
        )
        .await
        .with_context(|| format!("select rows of {stream}"))?;
    let mut messages = Vec::new();
    let mut bytes = Vec::new();
    for row in rows {
        let data: Option<String> = row.get(0);
        let chunk: Option<Vec<u8>> = row.get(1);
        match (json, data, chunk) {
            (true, Some(text), None) => messages.push(serde_json::from_str(&text)?),
            (false, None, Some(chunk)) => bytes.extend_from_slice(&chunk),
            (_, data, chunk) => anyhow::bail!(
                "row of {stream} (json stream: {json}) has data {data:?} and bytes {chunk:?}"
            ),
        }
    }
    Ok(if json {
        Content::Messages(messages)
    } else {
        Content::Bytes(bytes)
    })
}

/// ds-sync's checkpoint of `stream` (`next_offset`), if it has one.
pub async fn checkpoint(
    pg: &tokio_postgres::Client,
    stream: &str,
) -> anyhow::Result<Option<String>> {
    let row = pg
        .query_opt(
            "SELECT next_offset FROM ds_checkpoints WHERE stream = $1",
            &[&stream],
        )
        .await?;
    Ok(row.map(|row| row.get(0)))
}

/// One server-sent event: its `event:` name and its `data:` lines joined with `\n`.
#[derive(Debug, Clone, PartialEq)]
pub struct SseEvent {
    pub event: String,
    pub data: String,
}

/// Reads events off an open `text/event-stream` response as they arrive (LF line ends, which is
/// what ds-server writes).
pub struct SseReader {
    response: reqwest::Response,
    /// Bytes received but not yet parsed: a chunk may end inside an event or a UTF-8 sequence.
    buffer: Vec<u8>,
}

impl SseReader {
    pub fn new(response: reqwest::Response) -> Self {
        Self {
            response,
            buffer: Vec::new(),
        }
    }

    /// The next event; `Ok(None)` when the server ended the response. Comments (keep-alives)
    /// are skipped.
    pub async fn next_event(&mut self) -> anyhow::Result<Option<SseEvent>> {
        loop {
            if let Some(end) = self.buffer.windows(2).position(|w| w == b"\n\n") {
                let raw: Vec<u8> = self.buffer.drain(..end + 2).collect();
                let block = String::from_utf8(raw).context("SSE event is not UTF-8")?;
                let mut event = SseEvent {
                    event: "message".to_owned(),
                    data: String::new(),
                };
                let mut data_lines = Vec::new();
                for line in block.lines() {
                    if let Some(name) = line.strip_prefix("event:") {
                        event.event = name.trim_start().to_owned();
                    } else if let Some(data) = line.strip_prefix("data:") {
                        data_lines.push(data.strip_prefix(' ').unwrap_or(data));
                    }
                }
                if data_lines.is_empty() && !block.contains("event:") {
                    continue; // a comment-only block: keep-alive
                }
                event.data = data_lines.join("\n");
                return Ok(Some(event));
            }
            match self.response.chunk().await? {
                Some(chunk) => self.buffer.extend_from_slice(&chunk),
                None => return Ok(None),
            }
        }
    }
}
