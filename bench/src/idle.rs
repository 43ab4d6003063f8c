//! Scenario d: what an idle live reader costs the server in resident memory.
//!
//! Readers are spread over idle `text/plain` streams. RSS is read before any reader connects and
//! again once all are parked and the RSS has stopped moving; the difference divided by the number
//! of readers is the cost of one. An SSE reader counts as parked when its response head arrived; a
//! long-poll reader has no response until data or timeout, so it is parked once its request is
//! written and the server's RSS is stable. A long-poll that answers before the end means the
//! server's long-poll timeout is too short for the measurement, and is reported.

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::{Method, StatusCode, Uri};
use http_body_util::BodyExt;
use serde::{Deserialize, Serialize};
use tokio::sync::{Semaphore, watch};
use tokio::time::Instant;

use crate::client::{Server, encode_query_value};
use crate::process::Process;

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum ReaderKind {
    Sse,
    LongPoll,
}

#[derive(Clone, Debug)]
pub struct Plan {
    pub kind: ReaderKind,
    pub readers: usize,
    pub streams: usize,
    pub connect_timeout: Duration,
    pub connect_concurrency: usize,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct IdleResult {
    pub kind: ReaderKind,
    pub readers: usize,
    pub streams: usize,
    /// Readers parked on the server when RSS was read.
    pub parked: usize,
    /// Long-polls answered (or SSE connections ended) before the end: should be 0.
    pub answered_early: usize,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    pub bytes_per_reader: f64,
    pub first_error: Option<String>,
}

pub async fn run(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    plan: &Plan,
) -> anyhow::Result<IdleResult> {
    let kind_name = match plan.kind {
        ReaderKind::Sse => "sse",
        ReaderKind::LongPoll => "long-poll",
    };
    let mut setup = server.connect().await?;
    let mut uris = Vec::with_capacity(plan.streams);
    for i in 0..plan.streams {
        let path = format!("/bench-{run_id}/idle-{kind_name}-{i}");
        setup.create_stream(&path, "text/plain").await?;
        let offset = match plan.kind {
            ReaderKind::Sse => "now".to_owned(),
            // The tail as of now: a long-poll there waits for the next append.
            ReaderKind::LongPoll => setup.tail_offset(&path).await?,
        };
        let live = match plan.kind {
            ReaderKind::Sse => "sse",
            ReaderKind::LongPoll => "long-poll",
        };
        let uri: Uri =
            format!("{path}?offset={}&live={live}", encode_query_value(&offset)).parse()?;
        uris.push(uri);
    }
    drop(setup);

    let rss_before = wait_for_stable_rss(server_process, Duration::from_secs(5)).await?;

    let (stop_tx, stop_rx) = watch::channel(false);
    let parked = Arc::new(AtomicUsize::new(0));
    let answered_early = Arc::new(AtomicUsize::new(0));
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let mut tasks = Vec::with_capacity(plan.readers);
    for r in 0..plan.readers {
        let uri = uris[r % uris.len()].clone();
        let server = server.clone();
        let mut stop_rx = stop_rx.clone();
        let parked = Arc::clone(&parked);
        let answered_early = Arc::clone(&answered_early);
        let gate = Arc::clone(&gate);
        let kind = plan.kind;
        tasks.push(tokio::spawn(async move {
            let permit = gate.acquire_owned().await?;
            let mut conn = server.connect().await?;
            let request = conn.send(Method::GET, uri, None, Bytes::new());
            tokio::pin!(request);
            if kind == ReaderKind::LongPoll {
                // Give the request a moment to be written before it counts as parked.
                tokio::select! {
                    resp = &mut request => {
                        drop(permit);
                        answered_early.fetch_add(1, Ordering::Relaxed);
                        let resp = resp?;
                        bail!("long-poll answered {} before any append", resp.status());
                    }
                    () = tokio::time::sleep(Duration::from_millis(5)) => {}
                }
                drop(permit);
                parked.fetch_add(1, Ordering::Relaxed);
                tokio::select! {
                    resp = &mut request => {
                        answered_early.fetch_add(1, Ordering::Relaxed);
                        let resp = resp?;
                        bail!("long-poll answered {} before the end", resp.status());
                    }
                    _ = stop_rx.wait_for(|stop| *stop) => return Ok(()),
                }
            }
            let resp = request.await?;
            drop(permit);
            if resp.status() != StatusCode::OK {
                answered_early.fetch_add(1, Ordering::Relaxed);
                bail!("SSE GET answered {}", resp.status());
            }
            parked.fetch_add(1, Ordering::Relaxed);
            let mut body = resp.into_body();
            loop {
                tokio::select! {
                    frame = body.frame() => match frame {
                        Some(Ok(_)) => {}
                        _ => {
                            answered_early.fetch_add(1, Ordering::Relaxed);
                            bail!("SSE connection ended before the end");
                        }
                    },
                    _ = stop_rx.wait_for(|stop| *stop) => return Ok(()),
                }
            }
        }));
    }

    let deadline = Instant::now() + plan.connect_timeout;
    while parked.load(Ordering::Relaxed) + answered_early.load(Ordering::Relaxed) < plan.readers
        && Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let rss_after = wait_for_stable_rss(server_process, Duration::from_secs(10)).await?;
    let parked_now = parked.load(Ordering::Relaxed);
    let _ = stop_tx.send(true);

    let mut first_error = None;
    for t in tasks {
        if let Err(e) = t.await? {
            first_error.get_or_insert_with(|| format!("{e:#}"));
        }
    }
    if parked_now == 0 {
        bail!(
            "no idle reader parked: {}",
            first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    Ok(IdleResult {
        kind: plan.kind,
        readers: plan.readers,
        streams: plan.streams,
        parked: parked_now,
        answered_early: answered_early.load(Ordering::Relaxed),
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_reader: (rss_after as f64 - rss_before as f64) / parked_now as f64,
        first_error,
    })
}

/// Reads RSS every 250 ms until three readings in a row agree within 0.5 %, or the time is up.
pub(crate) async fn wait_for_stable_rss(
    process: &Process,
    max_wait: Duration,
) -> anyhow::Result<u64> {
    let deadline = Instant::now() + max_wait;
    let mut last = process.rss_bytes()?;
    let mut stable = 0;
    loop {
        tokio::time::sleep(Duration::from_millis(250)).await;
        let now = process.rss_bytes()?;
        let moved = (now as f64 - last as f64).abs() / (last.max(1) as f64);
        stable = if moved < 0.005 { stable + 1 } else { 0 };
        last = now;
        if stable >= 3 || Instant::now() >= deadline {
            return Ok(now);
        }
    }
}
