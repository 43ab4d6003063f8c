//! The hot buffer drains (issue 21), through the real stack: Envoy (JWT, TLS), ds-server with
//! `DS_RETENTION__MODE=acked`, ds-sync mirroring into a real Postgres and acking what it commits.
//!
//! Twenty writers (idempotent producers, one JSON stream each, through Envoy) append at least ten
//! times the budget while a live SSE reader follows one stream through Envoy. The soak runs in
//! three phases:
//!
//! 1. **ds-sync keeps up.** Each writer holds at most `budget / writers / 2` unreleased bytes in
//!    its stream (it looks at `Stream-Earliest-Offset` with HEAD before passing that), so all of
//!    them together hold at most half the budget: no append may be refused. Once ten budgets are
//!    written, a read at a released offset must get `410` with `Stream-Earliest-Offset` and the
//!    documented body, and `offset=-1` must read from the earliest retained offset.
//! 2. **ds-sync is killed** (SIGKILL) while the writers append. Memory mode: the writers stop
//!    pacing themselves and fill the budget; the server must answer `503` with `Retry-After`,
//!    which the writers honour (retrying the same producer sequence number), and must hold the
//!    unacknowledged data. File modes (no budget there): the writers pace themselves to one
//!    whole budget of unreleased data.
//! 3. **ds-sync restarts.** The writers (paced as in phase 1) write two more budgets: appends must
//!    succeed again and the server must drain.
//!
//! At the end, for every stream, Postgres holds exactly the acknowledged messages, each once, in
//! order; the server has released everything (its earliest offset is its tail); the SSE reader
//! got every message of its stream, in order. Memory mode: the server's RSS (sampled from
//! `/proc/<pid>/status`, and its high-water mark `VmHWM`) stays under its RSS at start plus
//! three budgets plus a fixed overhead, see [`rss_bound`]. File-durable and acid: the data
//! directory's disk use (sampled) stays under the bounds `server/STORAGE.md` gives, see
//! [`disk_bound`].
//!
//! The volume is set by environment variables (defaults: the CI variant), always ten budgets or
//! more in phase 1: `DS_SOAK_BUDGET` (bytes, default 2 000 000), `DS_SOAK_WRITERS` (20),
//! `DS_SOAK_MESSAGE_BYTES` (8 192), `DS_SOAK_BUDGETS` (budgets written in phase 1, 10 at least),
//! `DS_SOAK_SEGMENT_BYTES` (the log segment size of the durable modes, 1 MiB),
//! `DS_SOAK_DEADLINE_SECS` (how long a phase may take before the test gives up, 900);
//! `DS_SOAK_LIST=1` lists the data dir's files at its largest. `bench/soak.sh` runs the long form
//! (an 8 MB budget) in a release build and prints the table the README shows. Every run prints
//! one `soak result` line per mode.

mod support;

use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ds_e2e::metrics;
use ds_e2e::postgres::connect;
use ds_e2e::server::ServerOptions;
use ds_e2e::stack::EdgeStack;
use ds_e2e::wait::wait_until;
use reqwest::{Method, StatusCode};
use serde_json::Value;
use support::{JSON, SseReader, StreamClient, checkpoint};
use tokio::task::JoinHandle;

const PREFIX: &str = "/v1/stream/soak";
const PATTERN: &str = "/v1/stream/soak/*";

/// RSS a memory-mode ds-server may use beyond its RSS at start and three budgets (see
/// [`rss_bound`]): allocator caches, connection and TLS buffers. Measured: 2 MB budget (debug
/// build), at most start + 7.2 MB; 8 MB budget, start + 20.2 MB (debug) and + 20.7 MB (release,
/// the README's hot-buffer section). The assertion can fail: without retention the server would
/// hold every byte written, thirteen budgets in the CI variant.
const RSS_OVERHEAD: u64 = 8 * 1024 * 1024;

/// Time for what the test waits on besides phases (a restart, the final drain).
const DEADLINE: Duration = Duration::from_secs(120);

/// How a soak is sized (see the module docs).
#[derive(Debug, Clone)]
struct Settings {
    budget: u64,
    writers: usize,
    message_bytes: usize,
    budgets: u64,
    segment_bytes: u64,
    phase_deadline: Duration,
}

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .trim()
            .replace('_', "")
            .parse()
            .unwrap_or_else(|e| panic!("{name}={value:?} is not a whole number: {e}")),
        Err(_) => default,
    }
}

impl Settings {
    fn from_env() -> Self {
        let settings = Self {
            budget: env_u64("DS_SOAK_BUDGET", 2_000_000),
            writers: env_u64("DS_SOAK_WRITERS", 20) as usize,
            message_bytes: env_u64("DS_SOAK_MESSAGE_BYTES", 8192) as usize,
            budgets: env_u64("DS_SOAK_BUDGETS", 10),
            segment_bytes: env_u64("DS_SOAK_SEGMENT_BYTES", 1024 * 1024),
            phase_deadline: Duration::from_secs(env_u64("DS_SOAK_DEADLINE_SECS", 900)),
        };
        assert!(
            settings.budgets >= 10,
            "DS_SOAK_BUDGETS={}: the soak writes ten budgets at least",
            settings.budgets
        );
        assert!(settings.writers >= 1, "DS_SOAK_WRITERS must be 1 or more");
        // A writer's half-window holds several messages, so pacing never stalls a writer for good.
        assert!(
            (settings.budget / settings.writers as u64 / 2) >= 4 * settings.message_bytes as u64,
            "DS_SOAK_BUDGET {} is too small for {} writers of {}-byte messages",
            settings.budget,
            settings.writers,
            settings.message_bytes
        );
        settings
    }

    /// Unreleased bytes one writer allows itself in its stream while ds-sync keeps up.
    fn keeping_up_window(&self) -> u64 {
        self.budget / self.writers as u64 / 2
    }
}

/// The `pad` of message `seq` of writer `writer`: varied printable ASCII, so that neither
/// Postgres's TOAST nor anything else compresses it away.
fn pad(writer: usize, seq: u64, len: usize) -> String {
    let mut x = (writer as u64 + 1).wrapping_mul(0x9e37_79b9_7f4a_7c15) ^ seq;
    (0..len)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            char::from(b'a' + (x % 26) as u8)
        })
        .collect()
}

/// The length of the `pad` that makes a message about `bytes` long.
fn pad_len(bytes: usize) -> usize {
    bytes.saturating_sub(48).max(1)
}

/// Message `seq` of writer `writer`: a JSON object of about `bytes` bytes.
fn message(writer: usize, seq: u64, bytes: usize) -> Vec<u8> {
    format!(
        "{{\"w\":{writer},\"seq\":{seq},\"pad\":\"{}\"}}",
        pad(writer, seq, pad_len(bytes))
    )
    .into_bytes()
}

/// The byte position of an offset (`<seq>_<pos>`).
fn position(offset: &str) -> anyhow::Result<u64> {
    offset
        .rsplit('_')
        .next()
        .and_then(|pos| pos.parse().ok())
        .with_context(|| format!("offset {offset:?} has no byte position"))
}

fn header<'a>(response: &'a reqwest::Response, name: &str) -> Option<&'a str> {
    response.headers().get(name).and_then(|v| v.to_str().ok())
}

/// HEAD: the stream's `(earliest retained position, tail position)`.
async fn retained_range(client: &StreamClient, path: &str) -> anyhow::Result<(u64, u64)> {
    let response = client
        .request(Method::HEAD, path)
        .send()
        .await
        .with_context(|| format!("HEAD {path}"))?;
    anyhow::ensure!(
        response.status() == StatusCode::OK,
        "HEAD {path}: {}",
        response.status()
    );
    let tail = position(header(&response, "stream-next-offset").context("no Stream-Next-Offset")?)?;
    // Absent until something was released.
    let earliest = header(&response, "stream-earliest-offset")
        .map(position)
        .transpose()?
        .unwrap_or(0);
    Ok((earliest, tail))
}

/// What the test tells the writers, changed between phases.
struct Control {
    /// Writers stop starting appends (one under way is finished).
    stop: AtomicBool,
    /// Unreleased bytes a writer allows in its stream before it waits (`u64::MAX`: no limit).
    window: AtomicU64,
    /// Writers start appends while `written` is below this.
    target: AtomicU64,
    /// Bytes acknowledged, all streams together.
    written: AtomicU64,
}

/// One writer's counters, read by the test while it runs.
#[derive(Default)]
struct WriterStats {
    /// Appends acknowledged: sequence numbers `0..acked` are in the stream.
    acked: AtomicU64,
    /// 503 answers (each honoured: the writer waited `Retry-After` and sent the same append).
    refused: AtomicU64,
    /// Other answers that were not an acknowledgement and were retried (transport errors).
    transport_errors: AtomicU64,
    /// Times the writer waited for releases before appending (its window was full).
    paced: AtomicU64,
    /// Unreleased bytes of its stream at its last look (HEAD).
    held: AtomicU64,
}

struct Writer {
    path: String,
    stats: Arc<WriterStats>,
    task: JoinHandle<anyhow::Result<()>>,
}

fn spawn_writer(
    client: StreamClient,
    index: usize,
    message_bytes: usize,
    control: Arc<Control>,
) -> Writer {
    let path = format!("{PREFIX}/w{index}");
    let stats = Arc::new(WriterStats::default());
    let task = tokio::spawn(write(
        client,
        path.clone(),
        index,
        message_bytes,
        control,
        stats.clone(),
    ));
    Writer { path, stats, task }
}

/// Appends messages `0, 1, ...` to `path` as one idempotent producer until told to stop.
async fn write(
    client: StreamClient,
    path: String,
    index: usize,
    message_bytes: usize,
    control: Arc<Control>,
    stats: Arc<WriterStats>,
) -> anyhow::Result<()> {
    let producer = format!("soak-w{index}");
    let (mut earliest, mut tail) = retained_range(&client, &path).await?;
    let mut seq = 0u64;
    while !control.stop.load(Ordering::Relaxed) {
        if control.written.load(Ordering::Relaxed) >= control.target.load(Ordering::Relaxed) {
            // Between phases: the test is looking at the stack.
            tokio::time::sleep(Duration::from_millis(20)).await;
            continue;
        }
        let body = message(index, seq, message_bytes);
        let window = control.window.load(Ordering::Relaxed);
        if (tail - earliest).saturating_add(body.len() as u64) > window {
            earliest = retained_range(&client, &path).await?.0;
            stats.held.store(tail - earliest, Ordering::Relaxed);
            if (tail - earliest).saturating_add(body.len() as u64) > window {
                stats.paced.fetch_add(1, Ordering::Relaxed);
                // Waiting for ds-sync's acks to release data; re-checked by HEAD.
                tokio::time::sleep(Duration::from_millis(50)).await;
                continue;
            }
        }
        // Once sent, an append is retried until acknowledged, stop or not: a transport error may
        // hide an append the server stored, and the producer sequence number deduplicates it.
        loop {
            let attempt = client
                .request(Method::POST, &path)
                .header("content-type", JSON)
                .header("producer-id", &producer)
                .header("producer-epoch", "0")
                .header("producer-seq", seq.to_string())
                .body(body.clone())
                .send()
                .await;
            let response = match attempt {
                Ok(response) => response,
                Err(error) => {
                    stats.transport_errors.fetch_add(1, Ordering::Relaxed);
                    note_retry(&path, seq, &format!("{error:#}"));
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            };
            let status = response.status();
            if status == StatusCode::OK || status == StatusCode::NO_CONTENT {
                let next = position(
                    header(&response, "stream-next-offset")
                        .context("append answered without Stream-Next-Offset")?,
                )?;
                control
                    .written
                    .fetch_add(next.saturating_sub(tail), Ordering::Relaxed);
                tail = next;
                break;
            }
            if status == StatusCode::SERVICE_UNAVAILABLE {
                let retry_after = header(&response, "retry-after").map(str::to_owned);
                let text = response.text().await.unwrap_or_default();
                let seconds: u64 = retry_after
                    .as_deref()
                    .and_then(|v| v.trim().parse().ok())
                    .with_context(|| {
                        format!(
                            "append {path} seq {seq}: 503 without a Retry-After in seconds \
                             ({retry_after:?}): {text}"
                        )
                    })?;
                anyhow::ensure!(
                    text.contains("DS_LIMITS__MAX_MEMORY_BYTES"),
                    "append {path} seq {seq}: 503 that does not name the budget: {text}"
                );
                stats.refused.fetch_add(1, Ordering::Relaxed);
                tokio::time::sleep(Duration::from_secs(seconds)).await;
                continue;
            }
            anyhow::bail!(
                "append {path} seq {seq}: {status} {}",
                response.text().await.unwrap_or_default()
            );
        }
        seq += 1;
        stats.acked.store(seq, Ordering::Relaxed);
    }
    Ok(())
}

/// Transport errors are retried; they are printed so that a run shows them.
fn note_retry(path: &str, seq: u64, error: &str) {
    eprintln!("soak: append {path} seq {seq} retried after: {error}");
}

/// The live SSE reader of one stream: it checks, as messages arrive, that they are the writer's
/// `0, 1, 2, ...` with nothing missing or repeated, resuming after every reconnect from the last
/// control event's `streamNextOffset`.
struct LiveReader {
    received: Arc<AtomicU64>,
    task: JoinHandle<anyhow::Result<()>>,
}

fn spawn_reader(client: StreamClient, path: String, writer: usize) -> LiveReader {
    let received = Arc::new(AtomicU64::new(0));
    let count = received.clone();
    let task = tokio::spawn(async move {
        let mut offset = "-1".to_owned();
        let mut sessions = 0u32;
        loop {
            sessions += 1;
            let response = client
                .request(Method::GET, &format!("{path}?offset={offset}&live=sse"))
                .send()
                .await
                .with_context(|| format!("SSE {path} at {offset}"))?;
            if response.status() != StatusCode::OK {
                anyhow::bail!(
                    "SSE {path} at {offset} (session {sessions}): {} {}",
                    response.status(),
                    response.text().await.unwrap_or_default()
                );
            }
            let mut events = SseReader::new(response);
            // Messages of data events not yet confirmed by a control event.
            let mut pending: Vec<Value> = Vec::new();
            while let Some(event) = events.next_event().await? {
                match event.event.as_str() {
                    "data" => {
                        let batch: Vec<Value> = serde_json::from_str(&event.data)
                            .context("SSE data event is not a JSON array")?;
                        pending.extend(batch);
                    }
                    "control" => {
                        let control: Value = serde_json::from_str(&event.data)?;
                        for m in pending.drain(..) {
                            let expected = count.load(Ordering::Relaxed);
                            anyhow::ensure!(
                                m["w"] == writer && m["seq"] == expected,
                                "SSE {path}: expected message {expected} of writer {writer}, \
                                 got w={} seq={}",
                                m["w"],
                                m["seq"]
                            );
                            count.store(expected + 1, Ordering::Relaxed);
                        }
                        offset = control["streamNextOffset"]
                            .as_str()
                            .context("control event without streamNextOffset")?
                            .to_owned();
                    }
                    other => anyhow::bail!("SSE {path}: unexpected event {other:?}"),
                }
            }
        }
    });
    LiveReader { received, task }
}

/// Samples `VmRSS` of a process every 100 ms, keeping the highest.
fn spawn_rss_sampler(pid: u32, max: Arc<AtomicU64>, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            if let Ok(rss) = proc_status_kb(pid, "VmRSS:") {
                max.fetch_max(rss * 1024, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// A field of `/proc/<pid>/status` given in kB (`VmRSS:`, `VmHWM:`).
fn proc_status_kb(pid: u32, field: &str) -> anyhow::Result<u64> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status"))?;
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| rest.trim().trim_end_matches("kB").trim().parse().ok())
        .with_context(|| format!("no {field} in /proc/{pid}/status"))
}

/// Bytes the files under `dir` occupy on disk (allocated blocks, as `du` counts them), and each
/// file's share (relative path, bytes).
fn disk_use(dir: &Path) -> (u64, Vec<(String, u64)>) {
    fn walk(root: &Path, dir: &Path, files: &mut Vec<(String, u64)>) {
        use std::os::unix::fs::MetadataExt;
        let Ok(entries) = std::fs::read_dir(dir) else {
            return;
        };
        for entry in entries.flatten() {
            // A file deleted between the listing and the look is simply not counted.
            let Ok(meta) = entry.metadata() else {
                continue;
            };
            let path = entry.path();
            if meta.is_dir() {
                walk(root, &path, files);
            } else {
                let name = path
                    .strip_prefix(root)
                    .unwrap_or(&path)
                    .display()
                    .to_string();
                files.push((name, meta.blocks() * 512));
            }
        }
    }
    let mut files = Vec::new();
    walk(dir, dir, &mut files);
    files.sort();
    (files.iter().map(|(_, bytes)| bytes).sum(), files)
}

/// The highest disk use seen, and the files at that moment.
#[derive(Default)]
struct DiskPeak {
    bytes: u64,
    files: Vec<(String, u64)>,
}

/// Samples the disk use of `dir` every 100 ms, keeping the highest.
fn spawn_disk_sampler(
    dir: std::path::PathBuf,
    peak: Arc<std::sync::Mutex<DiskPeak>>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let dir = dir.clone();
            if let Ok((bytes, files)) = tokio::task::spawn_blocking(move || disk_use(&dir)).await {
                let mut peak = peak.lock().expect("disk peak");
                if bytes > peak.bytes {
                    *peak = DiskPeak { bytes, files };
                }
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

const MIB: u64 = 1024 * 1024;

/// The most the data directory of `mode` (`file-durable` or `acid`) may use in this soak.
///
/// At most one budget of unreleased data is live at any time: the writers pace themselves to
/// half of it while ds-sync keeps up and to all of it while ds-sync is down (their windows are
/// measured from `Stream-Earliest-Offset`, i.e. released data only). Then (`server/STORAGE.md`):
/// - file modes, *Space*: the log holds at most about twice its live bytes plus three segments
///   (a segment is rewritten forward whenever the log passes twice its live bytes plus two
///   segments; one more may wait for its deletion to be durable);
/// - acid, *Release*: a stream keeps at most one partly released row (32 KiB, or one larger
///   record) beyond its live data; redb reuses freed pages only after a checkpoint, which comes
///   once per commit-log segment, and allocates in power-of-two orders (up to twice what a row
///   needs): twice (live + one segment) for the shards; the commit log holds the active segment
///   and up to two waiting for their checkpoint, each extended up to 1 MiB of zeros beyond the
///   segment size;
/// - both: `records.log` (subscription state, acks) is rewritten whenever it passes twice its
///   live records (a few hundred bytes per stream) plus 1 MiB, and the format and key files are
///   a few KiB: 2 MiB.
fn disk_bound(mode: &str, settings: &Settings) -> u64 {
    let segment = settings.segment_bytes;
    let small_files = 2 * MIB;
    if mode == "acid" {
        let partly_released =
            settings.writers as u64 * (32 * 1024).max(settings.message_bytes as u64);
        let live = settings.budget + partly_released;
        2 * (live + segment) + 3 * (segment + MIB) + small_files
    } else {
        2 * settings.budget + 3 * segment + small_files
    }
}

/// The most RSS a memory-mode server may reach in this soak: its RSS once the stack is up and the
/// streams exist, plus the data (one budget), plus ds-sync's catch-up after its restart (up to
/// a budget of backlog read at once by its twenty sessions, copied about twice on the way out:
/// the SSE event, then TLS), plus [`RSS_OVERHEAD`].
fn rss_bound(rss_at_start: u64, settings: &Settings) -> u64 {
    rss_at_start + 3 * settings.budget + RSS_OVERHEAD
}

/// Waits until `done` holds; fails at once, with its error, if a writer stopped.
async fn wait_for(writers: &mut [Writer], deadline: Duration, what: &str, done: impl Fn() -> bool) {
    let view: &[Writer] = writers;
    let done = &done;
    let stopped = wait_until(what, deadline, || async move {
        if let Some(index) = view.iter().position(|w| w.task.is_finished()) {
            return Ok(Some(Some(index)));
        }
        Ok(done().then_some(None))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(index) = stopped {
        let writer = &mut writers[index];
        let outcome = (&mut writer.task).await.expect("writer task");
        panic!(
            "writer of {} stopped while waiting for {what}: {:#}",
            writer.path,
            outcome
                .err()
                .unwrap_or_else(|| anyhow::anyhow!("without an error"))
        );
    }
}

fn sum(writers: &[Writer], field: impl Fn(&WriterStats) -> &AtomicU64) -> u64 {
    writers
        .iter()
        .map(|w| field(&w.stats).load(Ordering::Relaxed))
        .sum()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_mode_drains_into_postgres_and_pushes_back_at_the_budget() {
    soak("memory").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_durable_disk_stays_bounded_while_the_buffer_drains() {
    soak("file-durable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_disk_stays_bounded_while_the_buffer_drains() {
    soak("acid").await;
}

async fn soak(mode: &str) {
    let mut soak = Soak::start(mode, Settings::from_env()).await;
    soak.while_sync_keeps_up().await;
    soak.while_sync_is_down().await;
    // While ds-sync is down nothing more is acknowledged: each stream keeps a released prefix
    // (phase 1) and an unreleased suffix (phase 2), so the reads below cannot race a release of
    // everything (right after phase 1 ds-sync may have drained and released a stream whole).
    soak.read_at_released_offsets().await;
    soak.after_sync_returns().await;
    soak.finish().await;
}

/// One soak's stack, load and measurements.
struct Soak {
    mode: String,
    memory: bool,
    settings: Settings,
    stack: EdgeStack,
    client: StreamClient,
    control: Arc<Control>,
    writers: Vec<Writer>,
    reader: LiveReader,
    pid: u32,
    rss_at_start: u64,
    /// The highest RSS of the phase under way (the sampler raises it, each phase takes it).
    rss_phase: Arc<AtomicU64>,
    rss_phases: Vec<u64>,
    disk_peak: Arc<std::sync::Mutex<DiskPeak>>,
    stop_sampling: Arc<AtomicBool>,
    samplers: Vec<JoinHandle<()>>,
    started: Instant,
    /// The `soak result` line's fields, in order.
    results: Vec<(&'static str, String)>,
}

impl Soak {
    /// The stack (ds-sync following the soak's prefix), the streams, the samplers, the live
    /// reader and the writers (idle until a phase gives them a target).
    async fn start(mode: &str, settings: Settings) -> Self {
        let memory = mode == "memory";
        let mut server_env = vec![("DS_RETENTION__MODE".to_owned(), "acked".to_owned())];
        if memory {
            server_env.push((
                "DS_LIMITS__MAX_MEMORY_BYTES".to_owned(),
                settings.budget.to_string(),
            ));
        } else {
            // Small segments, so that the log's bound (a few segments beyond the live bytes) is
            // far below what the soak writes and the assertion means something.
            server_env.push((
                "DS_STORAGE__SEGMENT_BYTES".to_owned(),
                settings.segment_bytes.to_string(),
            ));
        }
        let mut stack = EdgeStack::start(ServerOptions {
            storage_mode: mode.to_owned(),
            extra_env: server_env,
            ..ServerOptions::default()
        })
        .await
        .expect("ds-server behind envoy");
        stack
            .start_sync(
                PATTERN,
                vec![
                    // Back within a second of the restart, not after up to 30 s of backoff.
                    ("DS_SYNC__BACKOFF_MAX".to_owned(), "1s".to_owned()),
                    ("DS_SYNC__STATS_INTERVAL".to_owned(), "5s".to_owned()),
                ],
            )
            .await
            .expect("ds-sync following through envoy");
        let client = StreamClient::new(
            stack.client.clone(),
            stack.edge_url(),
            Some(stack.token.clone()),
        );
        for index in 0..settings.writers {
            client
                .create(&format!("{PREFIX}/w{index}"), JSON)
                .await
                .expect("create");
        }

        let pid = stack.server.pid().expect("server pid");
        let rss_at_start = proc_status_kb(pid, "VmRSS:").expect("VmRSS") * 1024;
        let stop_sampling = Arc::new(AtomicBool::new(false));
        let rss_phase = Arc::new(AtomicU64::new(rss_at_start));
        let disk_peak = Arc::new(std::sync::Mutex::new(DiskPeak::default()));
        let samplers = vec![
            spawn_rss_sampler(pid, rss_phase.clone(), stop_sampling.clone()),
            spawn_disk_sampler(
                stack.server.data_dir.clone(),
                disk_peak.clone(),
                stop_sampling.clone(),
            ),
        ];

        let reader_client = StreamClient::new(
            stack
                .client_with_timeout(Duration::from_secs(24 * 3600))
                .expect("client"),
            stack.edge_url(),
            Some(stack.token.clone()),
        );
        let reader = spawn_reader(reader_client, format!("{PREFIX}/w0"), 0);

        let control = Arc::new(Control {
            stop: AtomicBool::new(false),
            window: AtomicU64::new(settings.keeping_up_window()),
            target: AtomicU64::new(0),
            written: AtomicU64::new(0),
        });
        let writers = (0..settings.writers)
            .map(|index| {
                spawn_writer(
                    client.clone(),
                    index,
                    settings.message_bytes,
                    control.clone(),
                )
            })
            .collect();
        let results = vec![
            ("mode", mode.to_owned()),
            ("writers", settings.writers.to_string()),
            (
                "message_bytes",
                message(0, 0, settings.message_bytes).len().to_string(),
            ),
            ("budget", settings.budget.to_string()),
            ("rss_start", rss_at_start.to_string()),
        ];
        Self {
            mode: mode.to_owned(),
            memory,
            settings,
            stack,
            client,
            control,
            writers,
            reader,
            pid,
            rss_at_start,
            rss_phase,
            rss_phases: Vec::new(),
            disk_peak,
            stop_sampling,
            samplers,
            started: Instant::now(),
            results,
        }
    }

    fn note(&mut self, key: &'static str, value: impl ToString) {
        self.results.push((key, value.to_string()));
    }

    fn written(&self) -> u64 {
        self.control.written.load(Ordering::Relaxed)
    }

    /// Lets the writers append until `bytes` more are acknowledged.
    async fn write(&mut self, bytes: u64, what: &str) {
        let target = self.written() + bytes;
        self.control.target.store(target, Ordering::Relaxed);
        let control = self.control.clone();
        wait_for(
            &mut self.writers,
            self.settings.phase_deadline,
            what,
            || control.written.load(Ordering::Relaxed) >= target,
        )
        .await;
    }

    /// Ends a phase: notes the highest RSS seen in it.
    fn end_phase(&mut self, key: &'static str) {
        let rss = self.rss_phase.swap(0, Ordering::Relaxed);
        self.rss_phases.push(rss);
        self.note(key, rss);
    }

    /// Phase 1: ten budgets (or more) written with every writer holding at most its share of
    /// half the budget unreleased: not one append may be refused.
    async fn while_sync_keeps_up(&mut self) {
        let started = Instant::now();
        let bytes = self.settings.budgets * self.settings.budget;
        self.write(bytes, "phase 1: ten budgets written while ds-sync keeps up")
            .await;
        let secs = started.elapsed().as_secs_f64();
        let refused = sum(&self.writers, |s| &s.refused);
        let errors = sum(&self.writers, |s| &s.transport_errors);
        let written = self.written();
        self.note("phase1_written", written);
        self.note("phase1_secs", format!("{secs:.1}"));
        self.note("phase1_MBps", format!("{:.2}", written as f64 / 1e6 / secs));
        self.note("phase1_refused", refused);
        self.note("phase1_paced", sum(&self.writers, |s| &s.paced));
        self.end_phase("rss_max_phase1");
        assert_eq!(
            (refused, errors),
            (0, 0),
            "{}: appends were refused (503s, transport errors) while ds-sync kept up (the writers \
             held at most half the budget)",
            self.mode
        );
    }

    /// A reader at a released offset gets 410 with the earliest offset and where the data went;
    /// `offset=-1` reads what is left. Run while ds-sync is down, on the stream holding the most
    /// unreleased data after a released prefix.
    async fn read_at_released_offsets(&mut self) {
        let mode = &self.mode;
        let mut probe = None;
        let mut released = 0;
        for writer in &self.writers {
            let (earliest, tail) = retained_range(&self.client, &writer.path)
                .await
                .expect("head");
            if earliest > 0 {
                released += 1;
                if probe
                    .as_ref()
                    .is_none_or(|(_, _, held)| tail - earliest > *held)
                {
                    probe = Some((writer.path.clone(), earliest, tail - earliest));
                }
            }
        }
        let (probe, earliest, held) =
            probe.unwrap_or_else(|| panic!("{mode}: no stream had anything released"));
        assert!(
            held > 0,
            "{mode}: {released} streams released something, none holds an unreleased suffix \
             while ds-sync is down"
        );
        let response = self
            .client
            .request(
                Method::GET,
                &format!("{probe}?offset=0000000000000000_0000000000000000"),
            )
            .send()
            .await
            .expect("read at a released offset");
        assert_eq!(response.status(), StatusCode::GONE, "{mode}: read at 0");
        let named = header(&response, "stream-earliest-offset")
            .expect("410 without Stream-Earliest-Offset")
            .to_owned();
        assert!(
            position(&named).expect("offset") >= earliest,
            "{mode}: the earliest offset went backwards"
        );
        assert_eq!(header(&response, "cache-control"), Some("no-store"));
        let body = response.text().await.expect("410 body");
        for words in [
            named.as_str(),
            "earliest retained offset",
            "acknowledged by every subscription",
            "Postgres",
        ] {
            assert!(
                body.contains(words),
                "{mode}: the 410 body does not say {words:?}: {body}"
            );
        }
        let response = self
            .client
            .request(Method::GET, &format!("{probe}?offset=-1"))
            .send()
            .await
            .expect("read at -1");
        assert_eq!(response.status(), StatusCode::OK, "{mode}: read at -1");
        assert!(
            header(&response, "stream-earliest-offset").is_some(),
            "{mode}: a read at -1 of a released stream names no Stream-Earliest-Offset"
        );
        let page: Vec<Value> = response.json().await.expect("JSON page");
        let first = page.first().map(|m| m["seq"].clone());
        assert!(
            first
                .as_ref()
                .and_then(Value::as_u64)
                .is_some_and(|seq| seq > 0),
            "{mode}: offset=-1 of a released stream starts at message {first:?}, not at the \
             earliest retained one"
        );
    }

    /// Phase 2: ds-sync is killed while the writers append. Memory mode: the writers fill the
    /// budget and are refused with 503 + Retry-After (each twice: it waited and was refused
    /// again). File modes: the writers fill one budget of their own. Either way the server holds
    /// it all unreleased.
    async fn while_sync_is_down(&mut self) {
        let mode = self.mode.clone();
        // Killed under load: the writers are appending and ds-sync is reading, committing and
        // acking when it dies.
        self.control.target.store(u64::MAX, Ordering::Relaxed);
        let under_way = self.written() + self.settings.budget / 2;
        let control = self.control.clone();
        wait_for(
            &mut self.writers,
            self.settings.phase_deadline,
            "phase 2: writing again before ds-sync is killed",
            || control.written.load(Ordering::Relaxed) >= under_way,
        )
        .await;
        self.stack
            .sync
            .as_mut()
            .expect("sync")
            .kill()
            .expect("kill ds-sync");
        let message_len = message(0, 0, self.settings.message_bytes).len() as u64;
        let budget = self.settings.budget;
        let window = if self.memory {
            u64::MAX
        } else {
            budget / self.settings.writers as u64
        };
        self.control.window.store(window, Ordering::Relaxed);
        if self.memory {
            let stats: Vec<_> = self.writers.iter().map(|w| w.stats.clone()).collect();
            wait_for(
                &mut self.writers,
                self.settings.phase_deadline,
                "phase 2: every writer refused twice at the full budget",
                || stats.iter().all(|s| s.refused.load(Ordering::Relaxed) >= 2),
            )
            .await;
            let server = &self.stack.server;
            let used = wait_until("the budget full", DEADLINE, || async {
                let text = server.metrics().await?;
                let used = metrics::value(&text, "ds_memory_budget_used_bytes")? as u64;
                Ok((used + 2 * message_len > budget).then_some(used))
            })
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
            assert!(used <= budget, "{mode}: {used} bytes held, past the budget");
            let text = server.metrics().await.expect("metrics");
            let counted = metrics::value(&text, "ds_appends_backpressured_total").expect("series");
            let refused = sum(&self.writers, |s| &s.refused);
            assert!(
                counted as u64 >= refused,
                "{mode}: the server counted {counted} backpressured appends, the writers {refused}"
            );
            self.note("phase2_refused", refused);
            self.note("phase2_budget_used", used);
        } else {
            let stats: Vec<_> = self.writers.iter().map(|w| w.stats.clone()).collect();
            wait_for(
                &mut self.writers,
                self.settings.phase_deadline,
                "phase 2: every writer holding a full window of unreleased data",
                || {
                    stats
                        .iter()
                        .all(|s| s.held.load(Ordering::Relaxed) + 2 * message_len > window)
                },
            )
            .await;
            self.note("phase2_refused", 0);
        }
        let mut held = 0;
        for writer in &self.writers {
            let (earliest, tail) = retained_range(&self.client, &writer.path)
                .await
                .expect("head");
            held += tail - earliest;
        }
        assert!(
            held + self.settings.writers as u64 * 2 * message_len > budget,
            "{mode}: the streams hold {held} unreleased bytes while ds-sync is down"
        );
        self.note("phase2_held", held);
        self.end_phase("rss_max_phase2");
    }

    /// Phase 3: ds-sync restarts; the server drains, and appends succeed again (two more
    /// budgets, paced as in phase 1).
    async fn after_sync_returns(&mut self) {
        let before: Vec<u64> = self
            .writers
            .iter()
            .map(|w| w.stats.acked.load(Ordering::Relaxed))
            .collect();
        self.stack
            .sync
            .as_mut()
            .expect("sync")
            .restart()
            .await
            .expect("restart ds-sync");
        self.control
            .window
            .store(self.settings.keeping_up_window(), Ordering::Relaxed);
        self.write(
            2 * self.settings.budget,
            "phase 3: two more budgets after ds-sync restarted",
        )
        .await;
        for (writer, before) in self.writers.iter().zip(before) {
            assert!(
                writer.stats.acked.load(Ordering::Relaxed) > before,
                "{}: {} got no append acknowledged after ds-sync restarted",
                self.mode,
                writer.path
            );
        }
        self.end_phase("rss_max_phase3");
    }

    /// Stops the writers, waits for the drain, and checks Postgres, the live reader, RSS and
    /// disk.
    async fn finish(mut self) {
        let mode = self.mode.clone();
        self.control.stop.store(true, Ordering::Relaxed);
        let mut acked = Vec::new();
        for writer in &mut self.writers {
            (&mut writer.task)
                .await
                .expect("writer task")
                .unwrap_or_else(|e| panic!("writer of {}: {e:#}", writer.path));
            acked.push(writer.stats.acked.load(Ordering::Relaxed));
        }
        let refused = sum(&self.writers, |s| &s.refused);
        if self.memory {
            assert!(refused > 0, "{mode}: the full budget refused nothing");
        } else {
            assert_eq!(refused, 0, "{mode}: appends refused without a budget");
        }

        // Drained: ds-sync committed every stream to its tail and the server released it all.
        let pg = connect(self.stack.database_url().expect("database"))
            .await
            .expect("connect to the mirror");
        let client = &self.client;
        for writer in &self.writers {
            let path = writer.path.as_str();
            let (_, tail) = retained_range(client, path).await.expect("head");
            wait_until(
                &format!("{path}: ds-sync's checkpoint at the tail and everything released"),
                DEADLINE,
                || async {
                    let committed = checkpoint(&pg, path).await?;
                    let (earliest, _) = retained_range(client, path).await?;
                    let at_tail = committed.as_deref().map(position).transpose()? == Some(tail);
                    Ok((at_tail && earliest == tail).then_some(()))
                },
            )
            .await
            .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        }

        // Postgres: every acknowledged message exactly once, in order, and nothing else.
        let pad_len = pad_len(self.settings.message_bytes);
        for (index, (writer, &count)) in self.writers.iter().zip(&acked).enumerate() {
            let rows = pg
                .query(
                    "SELECT (data->>'w')::bigint, (data->>'seq')::bigint, data->>'pad' \
                     FROM ds_messages WHERE stream = $1 \
                     ORDER BY incarnation, stream_offset, idx",
                    &[&writer.path],
                )
                .await
                .expect("rows");
            let misplaced = rows.iter().enumerate().find(|(seq, row)| {
                let w: i64 = row.get(0);
                let s: i64 = row.get(1);
                let p: &str = row.get(2);
                w != index as i64 || s != *seq as i64 || p != pad(index, *seq as u64, pad_len)
            });
            assert!(
                misplaced.is_none() && rows.len() as u64 == count,
                "{mode}: {}: Postgres holds {} rows for {count} acknowledged messages; first \
                 row out of place: {:?}",
                writer.path,
                rows.len(),
                misplaced.map(|(at, row)| (at, row.get::<_, i64>(0), row.get::<_, i64>(1)))
            );
        }

        // The live reader got its stream to the end, in order (checked as it went).
        let goal = acked[0];
        let received = self.reader.received.clone();
        let reader = &self.reader.task;
        wait_until("the SSE reader at the tail", DEADLINE, || async {
            Ok((reader.is_finished() || received.load(Ordering::Relaxed) >= goal).then_some(()))
        })
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        if self.reader.task.is_finished() {
            let outcome = (&mut self.reader.task).await.expect("reader task");
            panic!("{mode}: the SSE reader stopped: {outcome:?}");
        }
        self.reader.task.abort();
        assert_eq!(received.load(Ordering::Relaxed), goal, "{mode}: SSE reader");

        self.stop_sampling.store(true, Ordering::Relaxed);
        for sampler in std::mem::take(&mut self.samplers) {
            sampler.await.expect("sampler");
        }
        let pid = self.pid;
        let hwm = proc_status_kb(pid, "VmHWM:").expect("VmHWM") * 1024;
        let rss_max = self.rss_phases.iter().copied().max().unwrap_or(0).max(hwm);
        let disk = std::mem::take(&mut *self.disk_peak.lock().expect("disk peak"));
        let disk_bound = disk_bound(&mode, &self.settings);
        let rss_bound = rss_bound(self.rss_at_start, &self.settings);
        let written = self.written();
        self.note("written", written);
        self.note(
            "budgets",
            format!("{:.1}", written as f64 / self.settings.budget as f64),
        );
        self.note("appends", acked.iter().sum::<u64>());
        self.note("refused_total", refused);
        self.note(
            "transport_errors",
            sum(&self.writers, |s| &s.transport_errors),
        );
        self.note("sse_received", goal);
        self.note("rss_hwm", hwm);
        self.note("rss_max", rss_max);
        self.note("rss_bound", rss_bound);
        self.note(
            "rss_end",
            proc_status_kb(pid, "VmRSS:").expect("VmRSS") * 1024,
        );
        self.note("disk_max", disk.bytes);
        self.note("disk_bound", disk_bound);
        self.note("disk_end", disk_use(&self.stack.server.data_dir).0);
        self.note(
            "secs",
            format!("{:.1}", self.started.elapsed().as_secs_f64()),
        );
        let line: Vec<String> = self
            .results
            .iter()
            .map(|(key, value)| format!("{key}={value}"))
            .collect();
        eprintln!("soak result: {}", line.join(" "));

        if self.memory {
            assert!(
                rss_max <= rss_bound,
                "{mode}: server RSS reached {rss_max} bytes, past {rss_bound} (at start {} + 3 \
                 budgets of {} + {RSS_OVERHEAD})",
                self.rss_at_start,
                self.settings.budget
            );
        } else {
            let listing: Vec<String> = disk
                .files
                .iter()
                .map(|(name, bytes)| format!("{name} {bytes}"))
                .collect();
            if std::env::var_os("DS_SOAK_LIST").is_some() {
                eprintln!(
                    "{mode}: the data dir at its largest:\n{}",
                    listing.join("\n")
                );
            }
            assert!(
                disk.bytes <= disk_bound,
                "{mode}: the data dir used {} bytes, past the bound {disk_bound}; its files \
                 then:\n{}",
                disk.bytes,
                listing.join("\n")
            );
        }
    }
}
