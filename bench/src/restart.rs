//! Scenario i: restart after many appends, and what the stored appends cost in RAM afterwards.
//!
//! `run.sh` drives three steps against one data directory:
//!
//! 1. `ds-bench restart fill`: on a fresh server, one `application/octet-stream` stream gets
//!    `N` appends of `payload_bytes` (64 writers, the fill of scenario h); the stream's tail
//!    offset and the server's RSS before and after go into a state file.
//! 2. `run.sh` kills the server (`kill -9`, right after the last acknowledged append), starts it
//!    again on the same directory and at once runs `ds-bench restart check --phase crash`: it
//!    polls `HEAD` every 2 ms until the stream answers with the tail offset the fill ended at.
//!    The restart time is the server's spawn (run.sh's clock, passed in) to that answer. Then
//!    RSS once stable, then the whole stream read back from `offset=-1` and its bytes counted.
//! 3. `run.sh` stops that server cleanly (`SIGTERM`, waits for it to exit), starts it again and
//!    runs `ds-bench restart check --phase clean`, which measures the same and writes the
//!    result: both restart times, RSS of a server that holds the stored appends against the
//!    RSS of the fresh one with only the empty stream, and that growth per stored append.
//!
//! Servers that keep nothing across a restart (in-memory modes) are not run (run.sh).

use std::path::Path;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, anyhow, bail};
use bytes::Bytes;
use http::Method;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::{NEXT_OFFSET, ReadToTail, Server, header_str};
use crate::idle::wait_for_stable_rss;
use crate::process::Process;
use crate::records::{self, RecordsResult};

/// What the fill left, for the checks after each restart.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct State {
    pub path: String,
    /// `Stream-Next-Offset` after the last acknowledged append.
    pub tail: String,
    pub fill: RecordsResult,
    /// The check after the `kill -9`, once it ran.
    #[serde(default)]
    pub crash: Option<Check>,
}

/// One restart, as the check saw it.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Check {
    /// Spawn to the first `HEAD` answering with the fill's tail offset.
    pub ready_secs: f64,
    /// RSS of the restarted server once stable, before anything was read.
    pub rss_bytes: u64,
    /// Bytes the read from `offset=-1` to `Stream-Up-To-Date` returned.
    pub read_bytes: u64,
    pub read_secs: f64,
    /// Why reading the stream back failed (a server error), if it did; a read that returns
    /// other bytes than were acknowledged fails the whole check instead.
    #[serde(default)]
    pub read_error: Option<String>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct RestartResult {
    pub records: u64,
    pub payload_bytes: usize,
    pub fill_secs: f64,
    /// The fill stopped at its time cap, short of the planned appends.
    pub capped: bool,
    /// RSS of the fresh server with the empty stream, before the fill.
    pub rss_empty_bytes: u64,
    /// Restart after `kill -9`.
    pub crash: Check,
    /// Restart after a clean stop.
    pub clean: Check,
    /// (RSS after the clean restart - RSS empty) / appends stored.
    pub bytes_per_record: f64,
}

/// Step 1: fill one stream and write the state file.
pub async fn fill(
    server: &Server,
    server_process: &Process,
    run_id: &str,
    plan: &records::Plan,
    state_file: &Path,
) -> anyhow::Result<()> {
    let plan = records::Plan {
        streams: 1,
        ..plan.clone()
    };
    let fill = records::run(server, server_process, run_id, &plan).await?;
    let path = records::stream_path(run_id, 1, 0);
    let tail = server.connect().await?.tail_offset(&path).await?;
    let state = State {
        path,
        tail,
        fill,
        crash: None,
    };
    std::fs::write(state_file, serde_json::to_vec_pretty(&state)?)
        .with_context(|| format!("write {}", state_file.display()))?;
    Ok(())
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum Phase {
    /// After `kill -9`: records the check in the state file.
    Crash,
    /// After a clean stop: returns the whole result.
    Clean,
}

/// Steps 2 and 3: wait for the restarted server to serve the whole stream, then measure it.
/// `spawned_at_ms` is the server's spawn time (Unix milliseconds, run.sh's clock).
pub async fn check(
    server: &Server,
    server_process: &Process,
    state_file: &Path,
    phase: Phase,
    spawned_at_ms: u64,
    timeout: Duration,
) -> anyhow::Result<Option<RestartResult>> {
    let mut state: State = serde_json::from_slice(
        &std::fs::read(state_file).with_context(|| format!("read {}", state_file.display()))?,
    )?;
    wait_for_tail(server, &state.path, &state.tail, timeout).await?;
    let now_ms = SystemTime::now().duration_since(UNIX_EPOCH)?.as_millis() as u64;
    let ready_secs = now_ms.saturating_sub(spawned_at_ms) as f64 / 1e3;
    let rss_bytes = wait_for_stable_rss(server_process, Duration::from_secs(10)).await?;
    let expected = state.fill.records * state.fill.payload_bytes as u64;
    let started = Instant::now();
    let (read_bytes, read_error) = match read_all(server, &state.path, timeout).await? {
        Ok(n) => (n, None),
        Err(why) => (0, Some(why)),
    };
    let read_secs = started.elapsed().as_secs_f64();
    if read_error.is_none() && read_bytes != expected {
        bail!(
            "after the restart the stream holds {read_bytes} bytes, {expected} were acknowledged"
        );
    }
    let check = Check {
        ready_secs,
        rss_bytes,
        read_bytes,
        read_secs,
        read_error,
    };
    match phase {
        Phase::Crash => {
            state.crash = Some(check);
            std::fs::write(state_file, serde_json::to_vec_pretty(&state)?)?;
            Ok(None)
        }
        Phase::Clean => {
            let crash = state
                .crash
                .take()
                .ok_or_else(|| anyhow!("no check after kill -9 in {}", state_file.display()))?;
            let fill = state.fill;
            Ok(Some(RestartResult {
                records: fill.records,
                payload_bytes: fill.payload_bytes,
                fill_secs: fill.fill_secs,
                capped: fill.capped,
                rss_empty_bytes: fill.rss_before_bytes,
                bytes_per_record: (check.rss_bytes as f64 - fill.rss_before_bytes as f64)
                    / fill.records.max(1) as f64,
                crash,
                clean: check,
            }))
        }
    }
}

/// Polls `HEAD path` every 2 ms (a fresh connection while none is accepted) until it answers
/// with `tail`. A stream missing, or at another tail, for 30 s after the server first answered
/// is an error (the server kept less than it acknowledged).
async fn wait_for_tail(
    server: &Server,
    path: &str,
    tail: &str,
    timeout: Duration,
) -> anyhow::Result<()> {
    let deadline = Instant::now() + timeout;
    // When the server first answered about the stream, and what it said last.
    let mut answering_since: Option<Instant> = None;
    let mut last = "nothing".to_owned();
    let mut conn = None;
    loop {
        if conn.is_none() {
            conn = server.connect_once().await.ok();
        }
        if let Some(c) = conn.as_mut() {
            match c
                .send_collect(Method::HEAD, path.parse()?, None, Bytes::new())
                .await
            {
                Ok((parts, _)) => {
                    let next = header_str(&parts.headers, NEXT_OFFSET).unwrap_or("");
                    if parts.status.is_success() && next == tail {
                        return Ok(());
                    }
                    last = format!("{} with tail {next:?}", parts.status);
                    let since = *answering_since.get_or_insert_with(Instant::now);
                    if since.elapsed() > Duration::from_secs(30) {
                        bail!(
                            "after the restart HEAD {path} answers {last}, the fill ended at \
                             {tail:?}"
                        );
                    }
                }
                Err(_) => conn = None,
            }
        }
        if Instant::now() >= deadline {
            bail!("the restarted server did not serve {path} within {timeout:?} (last: {last})");
        }
        tokio::time::sleep(Duration::from_millis(2)).await;
    }
}

/// Reads the stream back; a read the server refuses (the Node reference server's file mode
/// answers 500 to a read of a few hundred thousand records) is `Err(why)`.
async fn read_all(
    server: &Server,
    path: &str,
    timeout: Duration,
) -> anyhow::Result<Result<u64, String>> {
    let mut conn = server.connect().await?;
    Ok(
        match conn.read_to_tail(path, Instant::now() + timeout).await? {
            ReadToTail::Read { bytes, .. } => Ok(bytes),
            ReadToTail::Refused { offset, status } => {
                Err(format!("GET at offset {offset} answered {status}"))
            }
        },
    )
}
