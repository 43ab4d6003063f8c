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
//! 2. **ds-sync is killed** (SIGKILL). Memory mode: the writers stop pacing themselves and fill
//!    the budget; the server must answer `503` with `Retry-After`, which the writers honour
//!    (retrying the same producer sequence number), and must hold the unacknowledged data. File
//!    modes (no budget there): the writers pace themselves to one whole budget of unreleased data.
//! 3. **ds-sync restarts.** The writers (paced as in phase 1) write two more budgets: appends must
//!    succeed again and the server must drain.
//!
//! At the end, for every stream, Postgres holds exactly the acknowledged messages, each once, in
//! order; the server has released everything (its earliest offset is its tail); the SSE reader
//! got every message of its stream, in order. Memory mode: the server's RSS (sampled from
//! `/proc/<pid>/status`, and its high-water mark `VmHWM`) stays under the budget plus a fixed
//! overhead ([`RSS_OVERHEAD`]). File modes: the data directory's disk use (sampled) stays under
//! the bound of `server/STORAGE.md` (*Space*), see [`disk_bound`].
//!
//! The volume is set by environment variables (defaults: the CI variant), always ten budgets or
//! more in phase 1: `DS_SOAK_BUDGET` (bytes, default 8 000 000), `DS_SOAK_WRITERS` (20),
//! `DS_SOAK_MESSAGE_BYTES` (2 048), `DS_SOAK_BUDGETS` (budgets written in phase 1, 10 at least),
//! `DS_SOAK_SEGMENT_BYTES` (file modes' log segment size, 1 MiB), `DS_SOAK_DEADLINE_SECS` (how
//! long one phase may take before the test gives up, 900). `bench/soak.sh` runs the long form in
//! a release build and prints the table the README shows. Every run prints one `soak result`
//! line per mode.

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

/// RSS a memory-mode ds-server may use beyond its budget: what it holds whatever the volume
/// (code, the runtime, TLS sessions, connection and read buffers, the per-stream and per-record
/// bookkeeping of at most a budget's worth of records, jemalloc's caches). Measured on this soak
/// (see the README's hot-buffer section): ... The assertion can fail: without retention the
/// server would hold every byte written, ten budgets and more.
const RSS_OVERHEAD: u64 = 48 * 1024 * 1024;

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
            budget: env_u64("DS_SOAK_BUDGET", 8_000_000),
            writers: env_u64("DS_SOAK_WRITERS", 20) as usize,
            message_bytes: env_u64("DS_SOAK_MESSAGE_BYTES", 2048) as usize,
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

/// Bytes the files under `dir` occupy on disk (allocated blocks, as `du` counts them).
fn disk_use(dir: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    let Ok(entries) = std::fs::read_dir(dir) else {
        return 0;
    };
    let mut total = 0;
    for entry in entries.flatten() {
        // A file deleted between the listing and the look is simply not counted.
        let Ok(meta) = entry.metadata() else {
            continue;
        };
        if meta.is_dir() {
            total += disk_use(&entry.path());
        } else {
            total += meta.blocks() * 512;
        }
    }
    total
}

/// Samples the disk use of `dir` every 100 ms, keeping the highest.
fn spawn_disk_sampler(
    dir: std::path::PathBuf,
    max: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        while !stop.load(Ordering::Relaxed) {
            let dir = dir.clone();
            if let Ok(used) = tokio::task::spawn_blocking(move || disk_use(&dir)).await {
                max.fetch_max(used, Ordering::Relaxed);
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    })
}

/// The most a file-mode or acid data directory may use in this soak. At most one budget of
/// unreleased data is live at any time (the writers pace themselves to it; phase 2). The file
/// modes' log holds at most about twice its live bytes plus three segments (`server/STORAGE.md`,
/// *Space*, rule 2: a segment is rewritten forward whenever the log passes twice its live bytes
/// plus two segments; one more waits for its deletion); `records.log` (acks) stays under twice
/// its live records plus 1 MiB. acid: released rows are deleted and redb reuses their pages, its
/// commit log is checkpointed every segment; its shards' files add a fixed size. The 4 MiB of
/// fixed overhead cover the state frames, `records.log`, the format and key files, and acid's
/// empty shards.
fn disk_bound(settings: &Settings) -> u64 {
    2 * settings.budget + 3 * settings.segment_bytes + 4 * 1024 * 1024
}

/// Waits until every writer has `acked` at least `more` beyond `since` (or `written` reached the
/// target); fails at once, with its error, if a writer stopped.
async fn wait_for_target(control: &Control, writers: &mut [Writer], deadline: Duration, what: &str) {
    let view: &[Writer] = writers;
    let stopped = wait_until(what, deadline, || async move {
        if let Some(index) = view.iter().position(|w| w.task.is_finished()) {
            return Ok(Some(Some(index)));
        }
        Ok((control.written.load(Ordering::Relaxed) >= control.target.load(Ordering::Relaxed))
            .then_some(None))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(index) = stopped {
        fail_with_writer(writers, index, what).await;
    }
}

async fn fail_with_writer(writers: &mut [Writer], index: usize, what: &str) -> ! {
    let writer = &mut writers[index];
    let outcome = (&mut writer.task).await.expect("writer task");
    panic!(
        "writer of {} stopped during {what}: {:#}",
        writer.path,
        outcome
            .err()
            .unwrap_or_else(|| anyhow::anyhow!("without an error"))
    );
}

/// Waits until `condition` holds of every writer's stats; fails at once if a writer stopped.
async fn wait_for_writers(
    writers: &mut [Writer],
    deadline: Duration,
    what: &str,
    condition: impl Fn(&WriterStats) -> bool,
) {
    let view: &[Writer] = writers;
    let condition = &condition;
    let stopped = wait_until(what, deadline, || async move {
        if let Some(index) = view.iter().position(|w| w.task.is_finished()) {
            return Ok(Some(Some(index)));
        }
        Ok(view.iter().all(|w| condition(&w.stats)).then_some(None))
    })
    .await
    .unwrap_or_else(|e| panic!("{e:#}"));
    if let Some(index) = stopped {
        fail_with_writer(writers, index, what).await;
    }
}

fn sum(writers: &[Writer], field: impl Fn(&WriterStats) -> &AtomicU64) -> u64 {
    writers
        .iter()
        .map(|w| field(&w.stats).load(Ordering::Relaxed))
        .sum()
}

const MB: f64 = 1_000_000.0;

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
    let settings = Settings::from_env();
    let memory = mode == "memory";
    let started = Instant::now();
    let mut server_env = vec![("DS_RETENTION__MODE".to_owned(), "acked".to_owned())];
    if memory {
        server_env.push((
            "DS_LIMITS__MAX_MEMORY_BYTES".to_owned(),
            settings.budget.to_string(),
        ));
    } else {
        // Small segments, so that the log's bound (a few segments beyond the live bytes) is far
        // below what the soak writes and the assertion means something.
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
    let pid = stack.server.pid().expect("server pid");

    for index in 0..settings.writers {
        client
            .create(&format!("{PREFIX}/w{index}"), JSON)
            .await
            .expect("create");
    }
    let rss_at_start = proc_status_kb(pid, "VmRSS:").expect("VmRSS") * 1024;
    let disk_at_start = disk_use(&stack.server.data_dir);

    let stop_sampling = Arc::new(AtomicBool::new(false));
    let rss_max = Arc::new(AtomicU64::new(rss_at_start));
    let disk_max = Arc::new(AtomicU64::new(disk_at_start));
    let samplers = [
        spawn_rss_sampler(pid, rss_max.clone(), stop_sampling.clone()),
        spawn_disk_sampler(
            stack.server.data_dir.clone(),
            disk_max.clone(),
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

    // Phase 1: ds-sync keeps up.
    let phase_one_bytes = settings.budgets * settings.budget;
    let control = Arc::new(Control {
        stop: AtomicBool::new(false),
        window: AtomicU64::new(settings.keeping_up_window()),
        target: AtomicU64::new(phase_one_bytes),
        written: AtomicU64::new(0),
    });
    let mut writers: Vec<Writer> = (0..settings.writers)
        .map(|index| spawn_writer(client.clone(), index, settings.message_bytes, control.clone()))
        .collect();
    wait_for_target(
        &control,
        &mut writers,
        settings.phase_deadline,
        "phase 1: ten budgets written while ds-sync keeps up",
    )
    .await;
    let phase_one_secs = started.elapsed().as_secs_f64();
    let written_one = control.written.load(Ordering::Relaxed);
    let refused_one = sum(&writers, |s| &s.refused);
    let paced_one = sum(&writers, |s| &s.paced);
    let rss_phase_one = rss_max.load(Ordering::Relaxed);
    assert_eq!(
        refused_one, 0,
        "{mode}: appends were refused while ds-sync kept up (writers held at most half the budget)"
    );

    // A reader at a released offset: 410, the earliest offset, and where the data went.
    let probe = format!("{PREFIX}/w0");
    let (earliest, tail) = retained_range(&client, &probe).await.expect("head");
    assert!(
        earliest > 0,
        "{mode}: nothing of {probe} was released after ten budgets ({tail} bytes)"
    );
    let response = client
        .request(
            Method::GET,
            &format!("{probe}?offset=0000000000000000_0000000000000000"),
        )
        .send()
        .await
        .expect("read at a released offset");
    assert_eq!(response.status(), StatusCode::GONE, "{mode}: read at 0");
    let gone_earliest = header(&response, "stream-earliest-offset")
        .map(position)
        .transpose()
        .expect("offset")
        .expect("410 without Stream-Earliest-Offset");
    assert!(gone_earliest >= earliest, "{mode}: earliest went backwards");
    assert_eq!(header(&response, "cache-control"), Some("no-store"));
    let body = response.text().await.expect("410 body");
    for words in ["earliest retained offset", "acknowledged", "Postgres"] {
        assert!(body.contains(words), "{mode}: 410 body lacks {words:?}: {body}");
    }
    // offset=-1: the data still held, from the earliest retained offset.
    let response = client
        .request(Method::GET, &format!("{probe}?offset=-1"))
        .send()
        .await
        .expect("read at -1");
    assert_eq!(response.status(), StatusCode::OK, "{mode}: read at -1");
    let from = header(&response, "stream-earliest-offset")
        .map(position)
        .transpose()
        .expect("offset")
        .expect("-1 read without Stream-Earliest-Offset");
    let page: Vec<Value> = response.json().await.expect("JSON page");
    if let Some(first) = page.first() {
        assert!(
            first["seq"].as_u64().is_some_and(|seq| seq > 0),
            "{mode}: offset=-1 read from the start of a released stream ({from}): {}",
            first["seq"]
        );
    }

    // Phase 2: ds-sync dies; the server holds what it has not acked.
    stack.sync.as_mut().expect("sync").kill().expect("kill ds-sync");
    let refused_before = refused_one;
    if memory {
        control.window.store(u64::MAX, Ordering::Relaxed);
    } else {
        control
            .window
            .store(settings.budget / settings.writers as u64, Ordering::Relaxed);
    }
    control.target.store(u64::MAX, Ordering::Relaxed);
    let message_len = message(0, 0, settings.message_bytes).len() as u64;
    let held_memory = if memory {
        // Every writer refused twice: it waited Retry-After after the first and was refused
        // again, so the budget stayed full while nobody acked.
        wait_for_writers(
            &mut writers,
            settings.phase_deadline,
            "phase 2: every writer refused twice at the full budget",
            |s| s.refused.load(Ordering::Relaxed) >= 2,
        )
        .await;
        let used = wait_until("the budget full", DEADLINE, || async {
            let text = stack.server.metrics().await?;
            let used = metrics::value(&text, "ds_memory_budget_used_bytes")? as u64;
            Ok((used + 2 * message_len > settings.budget).then_some(used))
        })
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
        assert!(used <= settings.budget, "{mode}: {used} bytes held, past the budget");
        used
    } else {
        let window = settings.budget / settings.writers as u64;
        wait_for_writers(
            &mut writers,
            settings.phase_deadline,
            "phase 2: every writer holding a full window of unreleased data",
            |s| s.held.load(Ordering::Relaxed) + 2 * message_len > window,
        )
        .await;
        0
    };
    let mut held_streams = 0;
    for writer in &writers {
        let (earliest, tail) = retained_range(&client, &writer.path).await.expect("head");
        held_streams += tail - earliest;
    }
    assert!(
        held_streams + settings.writers as u64 * 2 * message_len > settings.budget,
        "{mode}: the streams hold {held_streams} unreleased bytes while ds-sync is down"
    );
    let refused_two = sum(&writers, |s| &s.refused) - refused_before;
    if memory {
        let text = stack.server.metrics().await.expect("metrics");
        let counted = metrics::value(&text, "ds_appends_backpressured_total").expect("series") as u64;
        assert!(
            counted >= refused_two,
            "{mode}: the server counted {counted} backpressured appends, the writers {refused_two}"
        );
    }

    // Phase 3: ds-sync returns; the server drains and appends succeed again.
    let acked_before_restart: Vec<u64> = writers
        .iter()
        .map(|w| w.stats.acked.load(Ordering::Relaxed))
        .collect();
    stack
        .sync
        .as_mut()
        .expect("sync")
        .restart()
        .await
        .expect("restart ds-sync");
    control
        .window
        .store(settings.keeping_up_window(), Ordering::Relaxed);
    let written_before_three = control.written.load(Ordering::Relaxed);
    control.target.store(
        written_before_three + 2 * settings.budget,
        Ordering::Relaxed,
    );
    wait_for_target(
        &control,
        &mut writers,
        settings.phase_deadline,
        "phase 3: two more budgets after ds-sync restarted",
    )
    .await;
    for (writer, before) in writers.iter().zip(&acked_before_restart) {
        assert!(
            writer.stats.acked.load(Ordering::Relaxed) > *before,
            "{mode}: {} got no append acknowledged after ds-sync restarted",
            writer.path
        );
    }
    control.stop.store(true, Ordering::Relaxed);
    let mut acked = Vec::new();
    for writer in &mut writers {
        (&mut writer.task)
            .await
            .expect("writer task")
            .unwrap_or_else(|e| panic!("writer of {}: {e:#}", writer.path));
        acked.push(writer.stats.acked.load(Ordering::Relaxed));
    }
    let written = control.written.load(Ordering::Relaxed);
    let refused = sum(&writers, |s| &s.refused);
    let transport_errors = sum(&writers, |s| &s.transport_errors);
    if !memory {
        assert_eq!(refused, 0, "{mode}: no budget, yet appends were refused");
    } else {
        assert!(refused_two > 0, "{mode}: the full budget refused nothing");
    }

    // Drained: ds-sync committed every stream to its tail and the server released it all.
    let pg = connect(stack.database_url().expect("database"))
        .await
        .expect("connect to the mirror");
    for writer in &writers {
        let path = writer.path.as_str();
        let (_, tail) = retained_range(&client, path).await.expect("head");
        wait_until(
            &format!("{path}: ds-sync checkpoint at the tail and everything released"),
            DEADLINE,
            || async {
                let committed = checkpoint(&pg, path).await?;
                let (earliest, _) = retained_range(&client, path).await?;
                let at_tail = committed.as_deref().map(position).transpose()? == Some(tail);
                Ok((at_tail && earliest == tail).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
    }

    // Postgres: every acknowledged message exactly once, in order, and nothing else.
    let mut rows_total = 0u64;
    for (index, (writer, &count)) in writers.iter().zip(&acked).enumerate() {
        let rows = pg
            .query(
                "SELECT (data->>'w')::bigint, (data->>'seq')::bigint, data->>'pad' \
                 FROM ds_messages WHERE stream = $1 ORDER BY incarnation, stream_offset, idx",
                &[&writer.path],
            )
            .await
            .expect("rows");
        let mismatch = rows.iter().enumerate().find(|(seq, row)| {
            let w: i64 = row.get(0);
            let s: i64 = row.get(1);
            let p: &str = row.get(2);
            w != index as i64
                || s != *seq as i64
                || p != pad(index, *seq as u64, pad_len(settings.message_bytes))
        });
        assert!(
            mismatch.is_none() && rows.len() as u64 == count,
            "{mode}: {}: Postgres holds {} rows for {count} acknowledged messages; first row out \
             of place: {:?}",
            writer.path,
            rows.len(),
            mismatch.map(|(at, row)| (at, row.get::<_, i64>(0), row.get::<_, i64>(1)))
        );
        rows_total += count;
    }

    // The live reader got its stream, in order (checked as it went), to the end.
    let reader_goal = acked[0];
    let received = reader.received.clone();
    let reader_task = &reader.task;
    wait_until("the SSE reader at the tail", DEADLINE, || async {
        if reader_task.is_finished() {
            return Ok(Some(()));
        }
        Ok((received.load(Ordering::Relaxed) >= reader_goal).then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{mode}: {e:#}"));
    if reader.task.is_finished() {
        let outcome = reader.task.await.expect("reader task");
        panic!("{mode}: the SSE reader stopped: {outcome:?}");
    }
    reader.task.abort();
    assert_eq!(
        received.load(Ordering::Relaxed),
        reader_goal,
        "{mode}: SSE reader"
    );

    stop_sampling.store(true, Ordering::Relaxed);
    for sampler in samplers {
        sampler.await.expect("sampler");
    }
    let rss_hwm = proc_status_kb(pid, "VmHWM:").expect("VmHWM") * 1024;
    let rss_end = proc_status_kb(pid, "VmRSS:").expect("VmRSS") * 1024;
    let rss_sampled = rss_max.load(Ordering::Relaxed);
    let disk_sampled = disk_max.load(Ordering::Relaxed);
    let disk_end = disk_use(&stack.server.data_dir);
    let secs = started.elapsed().as_secs_f64();
    eprintln!(
        "soak result: mode={mode} writers={} message_bytes={message_len} budget={} \
         written={written} ({:.1} budgets) appends={rows_total} secs={secs:.1} \
         phase1_secs={phase_one_secs:.1} phase1_MBps={:.2} phase1_written={written_one} \
         phase1_refused={refused_one} phase1_paced={paced_one} phase2_refused={refused_two} \
         phase2_held_streams={held_streams} phase2_budget_used={held_memory} \
         refused_total={refused} transport_errors={transport_errors} \
         rss_start={rss_at_start} rss_max_phase1={rss_phase_one} rss_max_sampled={rss_sampled} \
         rss_hwm={rss_hwm} rss_end={rss_end} disk_start={disk_at_start} \
         disk_max_sampled={disk_sampled} disk_end={disk_end} disk_bound={} sse_received={reader_goal}",
        settings.writers,
        settings.budget,
        written as f64 / settings.budget as f64,
        written_one as f64 / MB / phase_one_secs,
        disk_bound(&settings),
    );
    if memory {
        let bound = settings.budget + RSS_OVERHEAD;
        assert!(
            rss_hwm <= bound && rss_sampled <= bound,
            "{mode}: server RSS {rss_sampled} (sampled), {rss_hwm} (VmHWM) past the budget {} + \
             {RSS_OVERHEAD} overhead",
            settings.budget
        );
    } else {
        let bound = disk_bound(&settings);
        assert!(
            disk_sampled <= bound,
            "{mode}: the data dir used {disk_sampled} bytes, past the bound {bound}"
        );
    }
}
