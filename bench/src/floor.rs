//! The loopback floor of scenario c: the same fan-out with no server at all.
//!
//! A plain thread plays the server: it accepts N loopback TCP connections and, at the scenario's
//! rate, writes one fixed-size frame (as long as one SSE data event plus its control event) to
//! each of them in turn with blocking `write`s. The readers are the scenario's own: tokio tasks in
//! this process, reading and timing the records exactly as the SSE readers do, minus HTTP and SSE
//! parsing. What it measures is what the kernel's loopback TCP and the load generator cost on this
//! machine, which no server can go below: a server's fan-out latency is only as good as its
//! distance from this row.

use std::io::Write;
use std::net::TcpListener;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use anyhow::{Context, anyhow};
use http::HeaderValue;
use tokio::io::AsyncReadExt;
use tokio::sync::Semaphore;
use tokio::time::Instant;

use crate::client::Server;
use crate::fanout::{FanoutResult, Plan, ReaderOutcome, take_records, tally};

/// Bytes written per message per reader: about one SSE `data` event carrying one record plus
/// its `control` event, as servers send them.
pub const FRAME_LEN: usize = 160;

pub async fn run(plan: &Plan) -> anyhow::Result<FanoutResult> {
    let listener = TcpListener::bind("127.0.0.1:0").context("binding the floor's listener")?;
    let addr = listener.local_addr()?;
    let messages = u64::from(plan.messages_per_sec) * plan.send_for.as_secs().max(1);
    let base = std::time::Instant::now();
    let stop = Arc::new(AtomicBool::new(false));

    let writer = std::thread::Builder::new()
        .name("floor-writer".into())
        .spawn({
            let (readers, rate, stop) = (plan.readers, plan.messages_per_sec, stop.clone());
            move || write_all(listener, readers, rate, messages, base, &stop)
        })?;

    let server = Server {
        addr,
        host: HeaderValue::from_static("floor"),
    };
    let gate = Arc::new(Semaphore::new(plan.connect_concurrency.max(1)));
    let deadline = Instant::now()
        + plan.connect_timeout
        + plan.send_for
        + plan.drain_timeout
        + Duration::from_secs(1);
    let mut tasks = Vec::with_capacity(plan.readers);
    for _ in 0..plan.readers {
        let (server, gate) = (server.clone(), gate.clone());
        tasks.push(tokio::spawn(async move {
            let mut outcome = ReaderOutcome {
                latencies_us: Vec::with_capacity(messages as usize),
                ..ReaderOutcome::default()
            };
            let read = async {
                let mut stream = {
                    let _permit = gate.acquire().await?;
                    server.tcp_connect().await?
                };
                outcome.connected = true;
                let mut carry = Vec::with_capacity(16 << 10);
                while outcome.received < messages {
                    carry.reserve(16 << 10);
                    if stream.read_buf(&mut carry).await? == 0 {
                        break;
                    }
                    let now_ns = base.elapsed().as_nanos() as u64;
                    // Frames are fixed-size and each starts with its record.
                    take_records(&mut outcome, &mut carry, FRAME_LEN, now_ns)?;
                }
                anyhow::Ok(())
            };
            match tokio::time::timeout_at(deadline, read).await {
                Ok(Err(e)) => outcome.error = Some(format!("{e:#}")),
                Err(_) => outcome.error = Some("timed out".into()),
                Ok(Ok(())) => {}
            }
            outcome
        }));
    }

    let mut outcomes = Vec::with_capacity(tasks.len());
    for t in tasks {
        outcomes.push(t.await?);
    }
    let result = tally(plan, messages, None, Default::default(), outcomes);
    stop.store(true, Ordering::Relaxed);
    // The writer has finished once every reader has; a failed reader may leave it blocked in
    // accept, so it is not joined then (the process ends soon after).
    if result.first_error.is_none() {
        writer
            .join()
            .map_err(|_| anyhow!("the floor's writer panicked"))??;
    }
    Ok(result)
}

/// The stand-in server: accepts `readers` connections, then writes `messages` frames to each.
fn write_all(
    listener: TcpListener,
    readers: usize,
    rate: u32,
    messages: u64,
    base: std::time::Instant,
    stop: &AtomicBool,
) -> anyhow::Result<()> {
    let mut conns = Vec::with_capacity(readers);
    while conns.len() < readers {
        let (conn, _) = listener.accept()?;
        conn.set_nodelay(true)?;
        conns.push(conn);
    }
    let period = Duration::from_secs_f64(1.0 / f64::from(rate.max(1)));
    let start = std::time::Instant::now();
    let mut frame = [b' '; FRAME_LEN];
    for seq in 0..messages {
        if stop.load(Ordering::Relaxed) {
            break;
        }
        let due = start + period.mul_f64(seq as f64);
        if let Some(wait) = due.checked_duration_since(std::time::Instant::now()) {
            std::thread::sleep(wait);
        }
        let sent_ns = base.elapsed().as_nanos() as u64;
        let record = format!("{seq:012}@{sent_ns:019}");
        frame[..record.len()].copy_from_slice(record.as_bytes());
        for conn in &mut conns {
            conn.write_all(&frame)?;
        }
    }
    Ok(())
}
