//! Scenario c: live fan-out over SSE.
//!
//! N readers follow one `text/plain` stream from `offset=now`; once all are connected, one writer
//! appends fixed-size records at a fixed rate. Each record carries its sequence number and its send
//! time (nanoseconds since a process-wide base instant), so every reader can measure delivery
//! latency and check that it saw every record exactly once, in order. A reader whose connection the
//! server closes (periodic SSE close) resumes from the last control event's `streamNextOffset`, as
//! a real client must.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::{anyhow, bail};
use bytes::Bytes;
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::sync::{Notify, Semaphore, watch};
use tokio::time::Instant;

use crate::client::{Server, encode_query_value};
use crate::sse::{self, SseConn};
use crate::stats::{self, Latency};

/// `SSSSSSSSSSSS@TTTTTTTTTTTTTTTTTTT`: 12-digit sequence, `@`, 19-digit send time in ns.
const RECORD_LEN: usize = 32;
const CONTENT_TYPE: &str = "text/plain";

#[derive(Clone, Debug)]
pub struct Plan {
    pub readers: usize,
    pub messages_per_sec: u32,
    pub send_for: Duration,
    /// How long readers may take to connect before the writer starts anyway.
    pub connect_timeout: Duration,
    /// How long after the last append readers may take to receive everything.
    pub drain_timeout: Duration,
    /// Connections opened at once while connecting (the server's accept backlog is finite).
    pub connect_concurrency: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct FanoutResult {
    pub readers: usize,
    pub connected: usize,
    pub messages: u64,
    pub messages_per_sec: u32,
    /// Readers that received every record exactly once and in order.
    pub complete_readers: usize,
    pub delivered: u64,
    pub expected: u64,
    pub out_of_order: u64,
    pub reconnects: u64,
    pub first_error: Option<String>,
    /// Append-to-delivery latency over every (reader, record) pair.
    pub latency: Latency,
    /// The writer's own append latency at this fan-out.
    pub append_latency: Latency,
}

#[derive(Default)]
pub(crate) struct ReaderOutcome {
    pub connected: bool,
    pub received: u64,
    pub out_of_order: u64,
    pub reconnects: u64,
    pub latencies_us: Vec<u32>,
    pub error: Option<String>,
}

struct Shared {
    server: Server,
    path: String,
    base: std::time::Instant,
    expected: u64,
    connected: AtomicUsize,
    all_connected: Notify,
    readers: usize,
    connect_gate: Semaphore,
    /// Turns true when the drain time after the last append is up: readers report what they have.
    stop: watch::Receiver<bool>,
}

pub async fn run(server: &Server, run_id: &str, plan: &Plan) -> anyhow::Result<FanoutResult> {
    let path = format!("/bench-{run_id}/fanout-{}", plan.readers);
    server
        .connect()
        .await?
        .create_stream(&path, CONTENT_TYPE)
        .await?;
    let messages = u64::from(plan.messages_per_sec) * plan.send_for.as_secs().max(1);

    let (stop_tx, stop) = watch::channel(false);
    let shared = Arc::new(Shared {
        server: server.clone(),
        path: path.clone(),
        base: std::time::Instant::now(),
        expected: messages,
        connected: AtomicUsize::new(0),
        all_connected: Notify::new(),
        readers: plan.readers,
        connect_gate: Semaphore::new(plan.connect_concurrency.max(1)),
        stop,
    });
    let hard_deadline = Instant::now()
        + plan.connect_timeout
        + plan.send_for
        + plan.drain_timeout
        + Duration::from_secs(1);

    let mut tasks = Vec::with_capacity(plan.readers);
    for _ in 0..plan.readers {
        let shared = Arc::clone(&shared);
        tasks.push(tokio::spawn(async move {
            let mut outcome = ReaderOutcome {
                latencies_us: Vec::with_capacity(shared.expected as usize),
                ..ReaderOutcome::default()
            };
            if let Err(e) = read_all(&shared, &mut outcome, hard_deadline).await {
                outcome.error = Some(format!("{e:#}"));
            }
            if !outcome.connected {
                // Count it anyway so the writer does not wait for a reader that will never come.
                mark_connected(&shared);
            }
            outcome
        }));
    }

    // Start writing once every reader is connected (or failed), or when the connect time is up.
    let notified = shared.all_connected.notified();
    if shared.connected.load(Ordering::Acquire) < plan.readers {
        let _ = tokio::time::timeout(plan.connect_timeout, notified).await;
    }

    // Connected only now: connecting thousands of readers can outlast a server's keep-alive idle
    // timeout (Node's is 5 s), which would close a writer connection opened earlier.
    let mut writer = server.connect().await?;
    let mut append_samples = Vec::with_capacity(messages as usize);
    let period = Duration::from_secs_f64(1.0 / f64::from(plan.messages_per_sec.max(1)));
    let writer_start = Instant::now();
    let mut first_error = None;
    let path_uri: Uri = path.parse()?;
    for seq in 0..messages {
        tokio::time::sleep_until(writer_start + period.mul_f64(seq as f64)).await;
        let sent_ns = shared.base.elapsed().as_nanos() as u64;
        let record = format!("{seq:012}@{sent_ns:019}");
        debug_assert_eq!(record.len(), RECORD_LEN);
        let t0 = Instant::now();
        match writer
            .append(path_uri.clone(), CONTENT_TYPE, Bytes::from(record))
            .await
        {
            Ok(s) if s.is_success() => append_samples.push((Instant::now() - t0).as_nanos() as u64),
            Ok(s) => {
                first_error.get_or_insert_with(|| format!("writer append answered {s}"));
            }
            Err(e) => {
                // The record may or may not have landed, so readers may miss it and the result
                // shows that; the writer goes on over a new connection.
                first_error.get_or_insert_with(|| format!("writer: {e:#}"));
                match server.connect().await {
                    Ok(c) => writer = c,
                    Err(_) => break,
                }
            }
        }
    }

    // Readers get `drain_timeout` after the last append; those done earlier end the wait earlier.
    let drain_deadline = Instant::now() + plan.drain_timeout;
    let stopper = tokio::spawn(async move {
        tokio::time::sleep_until(drain_deadline).await;
        let _ = stop_tx.send(true);
    });

    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    let result = tally(
        plan,
        messages,
        first_error,
        stats::summarize_ns(&mut append_samples),
        outcomes,
    );
    stopper.abort();
    Ok(result)
}

/// Sums the readers' outcomes into the scenario's result.
pub(crate) fn tally(
    plan: &Plan,
    messages: u64,
    first_error: Option<String>,
    append_latency: Latency,
    outcomes: Vec<ReaderOutcome>,
) -> FanoutResult {
    let mut result = FanoutResult {
        readers: plan.readers,
        connected: 0,
        messages,
        messages_per_sec: plan.messages_per_sec,
        complete_readers: 0,
        delivered: 0,
        expected: messages * plan.readers as u64,
        out_of_order: 0,
        reconnects: 0,
        first_error,
        latency: Latency::default(),
        append_latency,
    };
    let mut all_latencies: Vec<u32> = Vec::new();
    for o in outcomes {
        result.connected += usize::from(o.connected);
        result.delivered += o.received;
        result.out_of_order += o.out_of_order;
        result.reconnects += o.reconnects;
        if o.received == messages && o.out_of_order == 0 {
            result.complete_readers += 1;
        }
        if result.first_error.is_none() {
            result.first_error = o.error;
        }
        all_latencies.extend_from_slice(&o.latencies_us);
    }
    result.latency = stats::summarize_us(&mut all_latencies);
    result
}

fn mark_connected(shared: &Shared) {
    if shared.connected.fetch_add(1, Ordering::AcqRel) + 1 == shared.readers {
        shared.all_connected.notify_one();
    }
}

/// The part of a control event a reader needs.
#[derive(Deserialize)]
struct Control<'a> {
    #[serde(borrow, rename = "streamNextOffset")]
    next_offset: Option<std::borrow::Cow<'a, str>>,
    #[serde(rename = "streamClosed")]
    closed: Option<bool>,
}

/// Follows the stream until every record arrived, the stream closed, or the deadline passed.
async fn read_all(
    shared: &Shared,
    outcome: &mut ReaderOutcome,
    deadline: Instant,
) -> anyhow::Result<()> {
    let mut offset = "now".to_owned();
    let mut carry: Vec<u8> = Vec::with_capacity(RECORD_LEN * 4);
    let mut stop = shared.stop.clone();
    let stopped = stop.wait_for(|stop| *stop);
    let expired = tokio::time::sleep_until(deadline);
    tokio::pin!(stopped, expired);
    while outcome.received < shared.expected {
        let target = format!(
            "{}?offset={}&live=sse",
            shared.path,
            encode_query_value(&offset)
        );
        let mut conn = {
            let _permit = if outcome.connected {
                None
            } else {
                Some(shared.connect_gate.acquire().await?)
            };
            tokio::time::timeout_at(deadline, SseConn::open(&shared.server, &target))
                .await
                .map_err(|_| anyhow!("SSE request timed out"))??
        };
        if outcome.connected {
            outcome.reconnects += 1;
        } else {
            outcome.connected = true;
            mark_connected(shared);
        }
        let mut parser = sse::Parser::default();
        let mut closed = false;
        let mut failed = None;
        loop {
            let more = tokio::select! {
                biased;
                more = conn.read() => more?,
                _ = &mut expired => return Ok(()),
                _ = &mut stopped => return Ok(()),
            };
            if !more {
                break;
            }
            let now_ns = shared.base.elapsed().as_nanos() as u64;
            parser.feed(conn.body(), |kind, data| {
                if failed.is_some() {
                    return;
                }
                let handled = match kind {
                    b"data" => on_records(outcome, &mut carry, data, now_ns),
                    b"control" => serde_json::from_slice::<Control<'_>>(data)
                        .map(|control| {
                            if let Some(next) = control.next_offset {
                                next.as_ref().clone_into(&mut offset);
                            }
                            closed |= control.closed == Some(true);
                        })
                        .map_err(anyhow::Error::from),
                    _ => Ok(()),
                };
                if let Err(e) = handled {
                    failed = Some(e);
                }
            });
            if let Some(e) = failed {
                return Err(e);
            }
            if outcome.received >= shared.expected || closed {
                return Ok(());
            }
        }
        if offset == "now" {
            bail!("SSE connection ended before the first control event");
        }
    }
    Ok(())
}

/// Takes the whole records out of one data event (a record may span events).
fn on_records(
    outcome: &mut ReaderOutcome,
    carry: &mut Vec<u8>,
    data: &[u8],
    now_ns: u64,
) -> anyhow::Result<()> {
    carry.extend_from_slice(data);
    take_records(outcome, carry, RECORD_LEN, now_ns)
}

/// Counts the record at the start of each whole `stride` bytes of `carry` and drains them;
/// a partial stride stays for the next read.
pub(crate) fn take_records(
    outcome: &mut ReaderOutcome,
    carry: &mut Vec<u8>,
    stride: usize,
    now_ns: u64,
) -> anyhow::Result<()> {
    let whole = carry.len() / stride * stride;
    for piece in carry[..whole].chunks_exact(stride) {
        record_received(outcome, &piece[..RECORD_LEN], now_ns)?;
    }
    carry.drain(..whole);
    Ok(())
}

/// Counts one record received at `now_ns` and keeps its latency.
fn record_received(outcome: &mut ReaderOutcome, rec: &[u8], now_ns: u64) -> anyhow::Result<()> {
    let (seq, sent_ns) = parse_record(rec)?;
    if seq != outcome.received {
        outcome.out_of_order += 1;
    }
    outcome.received += 1;
    let lat_us = now_ns.saturating_sub(sent_ns) / 1_000;
    outcome
        .latencies_us
        .push(u32::try_from(lat_us).unwrap_or(u32::MAX));
    Ok(())
}

fn parse_record(rec: &[u8]) -> anyhow::Result<(u64, u64)> {
    let text = std::str::from_utf8(rec)?;
    let (seq, sent) = text
        .split_once('@')
        .ok_or_else(|| anyhow!("record without '@': {text:?}"))?;
    Ok((seq.parse()?, sent.parse()?))
}
