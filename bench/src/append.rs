//! Scenarios a and b: append throughput, latency and server CPU per append.
//!
//! Closed loop: each writer owns one keep-alive connection and sends its next 100-byte append as
//! soon as the previous one is answered, rotating over the cell's streams. Only requests that start
//! after the warm-up and finish before the end count; the server's CPU time is read at exactly
//! those two instants, so CPU per append covers the same window as the throughput.

use std::sync::Arc;
use std::time::Duration;

use anyhow::bail;
use bytes::Bytes;
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::Server;
use crate::process::{MachineCpu, Process};
use crate::stats::{self, Latency};

/// How one cell of the matrix is run.
#[derive(Clone, Debug)]
pub struct CellPlan {
    pub writers: usize,
    pub streams: usize,
    pub payload_bytes: usize,
    pub warmup: Duration,
    pub duration: Duration,
    /// Upper bound on requests per writer, so a cell stops even against an absurdly fast server.
    pub max_requests_per_writer: u64,
}

/// What one cell measured.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CellResult {
    pub writers: usize,
    pub streams: usize,
    pub payload_bytes: usize,
    pub measured_secs: f64,
    pub appends: u64,
    pub appends_per_sec: f64,
    /// Answers other than 2xx (or transport errors) during the measured window.
    pub errors: u64,
    pub first_error: Option<String>,
    pub latency: Latency,
    /// Server CPU time (user + system) over the measured window, per successful append.
    pub server_cpu_us_per_append: f64,
    /// This process's CPU time per append: the load generator shares the cores with the server.
    pub client_cpu_us_per_append: f64,
    /// Percent of the machine's CPU time the hypervisor gave to other guests during the window
    /// (absent in results from before it was recorded).
    #[serde(default)]
    pub steal_percent: Option<f64>,
}

struct WriterOutcome {
    samples_ns: Vec<u64>,
    errors: u64,
    first_error: Option<String>,
}

/// Runs one cell: creates its streams, runs the writers, reads the server's CPU at the window edges.
pub async fn run_cell(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    plan: &CellPlan,
) -> anyhow::Result<CellResult> {
    const CONTENT_TYPE: &str = "application/octet-stream";
    let mut setup = server.connect().await?;
    let mut uris = Vec::with_capacity(plan.streams);
    for i in 0..plan.streams {
        let path = format!(
            "/bench-{run_id}/append-w{}-s{}-{i}",
            plan.writers, plan.streams
        );
        setup.create_stream(&path, CONTENT_TYPE).await?;
        uris.push(path.parse::<Uri>()?);
    }
    drop(setup);
    let uris = Arc::new(uris);
    let payload = Bytes::from(vec![b'x'; plan.payload_bytes]);

    let mut conns = Vec::with_capacity(plan.writers);
    for _ in 0..plan.writers {
        conns.push(server.connect().await?);
    }

    // Every writer and the CPU sampler work from the same three instants.
    let start = Instant::now() + Duration::from_millis(50);
    let window_start = start + plan.warmup;
    let window_end = window_start + plan.duration;

    let mut writers = Vec::with_capacity(plan.writers);
    for (w, mut conn) in conns.into_iter().enumerate() {
        let uris = Arc::clone(&uris);
        let payload = payload.clone();
        let writers_total = plan.writers;
        let max_requests = plan.max_requests_per_writer;
        writers.push(tokio::spawn(async move {
            tokio::time::sleep_until(start).await;
            let mut out = WriterOutcome {
                samples_ns: Vec::with_capacity(64 * 1024),
                errors: 0,
                first_error: None,
            };
            let mut j: usize = 0;
            let mut sent: u64 = 0;
            while sent < max_requests {
                let t0 = Instant::now();
                if t0 >= window_end {
                    break;
                }
                let uri = uris[(w + j * writers_total) % uris.len()].clone();
                j = j.wrapping_add(1);
                sent += 1;
                let result = conn.append(uri, CONTENT_TYPE, payload.clone()).await;
                let t1 = Instant::now();
                let in_window = t0 >= window_start && t1 <= window_end;
                match result {
                    Ok(status) if status.is_success() => {
                        if in_window {
                            out.samples_ns.push((t1 - t0).as_nanos() as u64);
                        }
                    }
                    Ok(status) => {
                        if in_window {
                            out.errors += 1;
                        }
                        out.first_error
                            .get_or_insert_with(|| format!("append answered {status}"));
                    }
                    Err(e) => {
                        out.errors += 1;
                        out.first_error.get_or_insert_with(|| format!("{e:#}"));
                        // The connection is gone; this writer stops rather than spin.
                        break;
                    }
                }
            }
            out
        }));
    }

    let client_process = Process::this_process();
    tokio::time::sleep_until(window_start).await;
    let server_cpu0 = server_process.cpu_time()?;
    let client_cpu0 = client_process.cpu_time()?;
    let machine0 = MachineCpu::now().ok();
    tokio::time::sleep_until(window_end).await;
    let server_cpu1 = server_process.cpu_time()?;
    let client_cpu1 = client_process.cpu_time()?;
    let machine1 = MachineCpu::now().ok();

    let mut samples = Vec::new();
    let mut errors = 0;
    let mut first_error = None;
    for w in writers {
        let out = w.await?;
        samples.extend_from_slice(&out.samples_ns);
        errors += out.errors;
        if first_error.is_none() {
            first_error = out.first_error;
        }
    }
    let appends = samples.len() as u64;
    if appends == 0 {
        bail!(
            "no append succeeded in the measured window ({} writers, {} streams): {}",
            plan.writers,
            plan.streams,
            first_error.as_deref().unwrap_or("no error recorded")
        );
    }
    let secs = plan.duration.as_secs_f64();
    let per_append = |d: Duration| d.as_secs_f64() * 1e6 / appends as f64;
    Ok(CellResult {
        writers: plan.writers,
        streams: plan.streams,
        payload_bytes: plan.payload_bytes,
        measured_secs: secs,
        appends,
        appends_per_sec: appends as f64 / secs,
        errors,
        first_error,
        latency: stats::summarize_ns(&mut samples),
        server_cpu_us_per_append: per_append(server_cpu1.saturating_sub(server_cpu0)),
        client_cpu_us_per_append: per_append(client_cpu1.saturating_sub(client_cpu0)),
        steal_percent: machine0.zip(machine1).map(|(a, b)| a.steal_percent(&b)),
    })
}
