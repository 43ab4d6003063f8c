//! Scenario e: catch-up read throughput.
//!
//! One `application/octet-stream` stream is filled with large appends, then read from `offset=-1`
//! on one keep-alive connection, following `Stream-Next-Offset` page by page until
//! `Stream-Up-To-Date`, several passes. The body bytes are counted, not copied, so the client's
//! cost is the socket read and little else.

use std::time::Duration;

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{ReadToTail, Server};

#[derive(Clone, Debug)]
pub struct Plan {
    pub fill_bytes: u64,
    pub append_bytes: usize,
    pub passes: u32,
    /// Stops a pass that somehow never reaches the tail.
    pub pass_timeout: Duration,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CatchupResult {
    pub stream_bytes: u64,
    pub append_bytes: usize,
    /// Fill throughput with large sequential appends (MB/s, 1 MB = 10^6 bytes).
    pub fill_mb_per_sec: f64,
    pub passes: u32,
    pub pages_per_pass: u64,
    /// GB/s (10^9 bytes per second) of each pass.
    pub pass_gb_per_sec: Vec<f64>,
    pub mean_gb_per_sec: f64,
    pub best_gb_per_sec: f64,
}

pub async fn run(server: &Server, run_id: &str, plan: &Plan) -> anyhow::Result<CatchupResult> {
    const CONTENT_TYPE: &str = "application/octet-stream";
    let path = format!("/bench-{run_id}/catchup");
    let mut conn = server.connect().await?;
    conn.create_stream(&path, CONTENT_TYPE).await?;
    let uri: Uri = path.parse()?;

    // Not all zeros, so no layer can get away with compressing it.
    let chunk: Bytes = (0..plan.append_bytes)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect::<Vec<u8>>()
        .into();
    let appends = plan.fill_bytes.div_ceil(plan.append_bytes as u64);
    let fill_start = Instant::now();
    for _ in 0..appends {
        let status = conn
            .append(uri.clone(), CONTENT_TYPE, chunk.clone())
            .await?;
        if !status.is_success() {
            bail!("fill append answered {status}");
        }
    }
    let stream_bytes = appends * plan.append_bytes as u64;
    let fill_mb_per_sec = stream_bytes as f64 / fill_start.elapsed().as_secs_f64() / 1e6;

    let mut pass_gb_per_sec = Vec::new();
    let mut pages_per_pass = 0;
    for _ in 0..plan.passes {
        let start = Instant::now();
        let pass = conn
            .read_to_tail(&path, start + plan.pass_timeout)
            .await
            .with_context(|| format!("catch-up pass (at most {:?})", plan.pass_timeout))?;
        let (read, pages) = match pass {
            ReadToTail::Read { bytes, pages } => (bytes, pages),
            ReadToTail::Refused { status, .. } => bail!("catch-up GET answered {status}"),
        };
        let secs = start.elapsed().as_secs_f64();
        if read != stream_bytes {
            bail!("catch-up pass read {read} bytes, the stream holds {stream_bytes}");
        }
        pages_per_pass = pages;
        pass_gb_per_sec.push(read as f64 / secs / 1e9);
    }
    let mean = pass_gb_per_sec.iter().sum::<f64>() / pass_gb_per_sec.len().max(1) as f64;
    let best = pass_gb_per_sec.iter().copied().fold(0.0, f64::max);
    Ok(CatchupResult {
        stream_bytes,
        append_bytes: plan.append_bytes,
        fill_mb_per_sec,
        passes: plan.passes,
        pages_per_pass,
        pass_gb_per_sec,
        mean_gb_per_sec: mean,
        best_gb_per_sec: best,
    })
}
