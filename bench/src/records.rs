//! Scenario h: what a stored record costs the server in resident memory.
//!
//! `N` records of `payload_bytes` each (100 by default) are appended to `streams` fresh
//! `application/octet-stream` streams, round-robin, by 64 writers on connections of their own.
//! RSS is read once stable before the first append and once stable after the last; the
//! difference divided by `N` is the RAM one stored record costs, payload included (100 bytes
//! of it are the payload itself). In memory mode that is the memory budget's honesty; in the
//! file modes it is what the index and caches keep per record.
//!
//! The fill stops at `max_fill` (a slow server, such as the Node reference server's file mode
//! at ~1 700 appends/s, would otherwise take tens of minutes): the figure is then per record
//! actually stored, and the report marks the row as capped.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::Server;
use crate::idle::wait_for_stable_rss;
use crate::process::Process;

#[derive(Clone, Debug)]
pub struct Plan {
    pub records: u64,
    pub streams: usize,
    pub payload_bytes: usize,
    pub writers: usize,
    /// Longest fill; the writers stop at it.
    pub max_fill: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RecordsResult {
    pub records: u64,
    pub streams: usize,
    pub payload_bytes: usize,
    pub fill_secs: f64,
    pub rss_before_bytes: u64,
    pub rss_after_bytes: u64,
    /// RSS growth per stored record, payload included.
    pub bytes_per_record: f64,
    /// The fill stopped at its time cap, short of the planned records.
    #[serde(default)]
    pub capped: bool,
}

/// The path of stream `i` of a fill over `streams` streams.
pub fn stream_path(run_id: &str, streams: usize, i: usize) -> String {
    format!("/bench-{run_id}/records-{streams}-{i}")
}

pub async fn run(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    plan: &Plan,
) -> anyhow::Result<RecordsResult> {
    const CONTENT_TYPE: &str = "application/octet-stream";
    let mut setup = server.connect().await?;
    let mut uris = Vec::with_capacity(plan.streams);
    for i in 0..plan.streams {
        let path = stream_path(run_id, plan.streams, i);
        setup.create_stream(&path, CONTENT_TYPE).await?;
        uris.push(path.parse::<Uri>()?);
    }
    drop(setup);
    let rss_before = wait_for_stable_rss(server_process, Duration::from_secs(5)).await?;
    let uris = Arc::new(uris);
    let next = Arc::new(AtomicU64::new(0));
    let stored = Arc::new(AtomicU64::new(0));
    let started = Instant::now();
    let deadline = started + plan.max_fill;
    let mut writers = Vec::new();
    for _ in 0..plan.writers {
        let mut conn = server.connect().await?;
        let (uris, next, stored) = (uris.clone(), next.clone(), stored.clone());
        let (records, payload_bytes) = (plan.records, plan.payload_bytes);
        writers.push(tokio::spawn(async move {
            loop {
                if Instant::now() >= deadline {
                    return Ok(());
                }
                let i = next.fetch_add(1, Ordering::Relaxed);
                if i >= records {
                    return Ok::<(), anyhow::Error>(());
                }
                // Each record different (its number in front), none all zeros.
                let mut body = vec![b'x'; payload_bytes];
                let tag = i.to_le_bytes();
                let n = tag.len().min(payload_bytes);
                body[..n].copy_from_slice(&tag[..n]);
                let uri = uris[(i % uris.len() as u64) as usize].clone();
                let status = conn.append(uri, CONTENT_TYPE, Bytes::from(body)).await?;
                if !status.is_success() {
                    bail!("append {i} answered {status}");
                }
                stored.fetch_add(1, Ordering::Relaxed);
            }
        }));
    }
    for w in writers {
        w.await??;
    }
    let fill_secs = started.elapsed().as_secs_f64();
    let records = stored.load(Ordering::Relaxed);
    let rss_after = wait_for_stable_rss(server_process, Duration::from_secs(10)).await?;
    Ok(RecordsResult {
        records,
        streams: plan.streams,
        payload_bytes: plan.payload_bytes,
        fill_secs,
        rss_before_bytes: rss_before,
        rss_after_bytes: rss_after,
        bytes_per_record: (rss_after as f64 - rss_before as f64) / records.max(1) as f64,
        capped: records < plan.records,
    })
}
