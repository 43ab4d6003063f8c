//! The file modes at scale: RAM per stored append and restart time of a real server on a log of
//! millions of appends (README, "The store at scale").
//!
//! ```text
//! cargo build --release -p ds-server --bin ds-server --example store_at_scale
//! # a file-durable log of N appends of SIZE bytes to one stream, written through the storage API
//! # (N more if DIR holds one already)
//! target/release/examples/store_at_scale fill DIR N SIZE
//! # start SERVER on DIR (file-durable) ROUNDS times: time to healthy, RSS, a few exact reads
//! target/release/examples/store_at_scale restart SERVER DIR ROUNDS
//! ```
//!
//! `restart` first starts the server on an empty directory for the baseline RSS; each round
//! then starts it on DIR, waits until `/healthz` answers (the restart time), lets it settle 2 s,
//! reads its RSS, checks reads at the first, a middle and the last record (exact bytes and
//! offsets), and stops it with SIGTERM (a clean shutdown).

use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use ds_server::storage::file::{FileOptions, FileStorage};
use ds_server::storage::{AppendEntry, Storage, StreamMeta};

const PATH: &str = "/v1/stream/scale";

/// The record at position `i`: `size` bytes, its index in ASCII at the front.
fn record(i: u64, size: usize) -> Bytes {
    let mut v = format!("{i:012}|").into_bytes();
    v.resize(size.max(13), b'.');
    Bytes::from(v)
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

async fn fill(dir: &Path, count: u64, size: usize) {
    let storage = FileStorage::open(
        dir,
        FileOptions {
            durable: true,
            segment_bytes: 64 << 20,
            max_open_files: 64,
            map_reads: true,
            cache_bytes: 64 << 20,
            fast_sync_interval: Duration::from_secs(1),
        },
    )
    .expect("open");
    let meta = StreamMeta::new(1, PATH, "application/octet-stream", None, 1);
    // An existing stream (a directory filled before) is continued.
    let found = storage
        .recover()
        .expect("recover")
        .into_iter()
        .find(|r| r.meta.id == 1);
    let (log, first) = match found {
        Some(r) => (r.log, r.state.tail / size.max(13) as u64),
        None => {
            let (log, commit) = storage
                .create(&std::sync::Arc::new(meta), Vec::new(), None)
                .expect("create");
            commit.await.expect("create commit");
            (log, 0)
        }
    };
    let started = Instant::now();
    let mut pending = futures::stream::FuturesOrdered::new();
    use futures::StreamExt;
    let size = size.max(13);
    for i in first..first + count {
        pending.push_back(log.append(AppendEntry {
            start: i * size as u64,
            data: Some(record(i, size)),
            ..AppendEntry::default()
        }));
        if pending.len() >= 8192 {
            pending.next().await.expect("pending").expect("append");
        }
        if i % 1_000_000 == 0 && i > first {
            eprintln!("{i} appends, {:.1} s", started.elapsed().as_secs_f64());
        }
    }
    while let Some(r) = pending.next().await {
        r.expect("append");
    }
    println!(
        "filled {count} appends of {size} B in {:.1} s",
        started.elapsed().as_secs_f64()
    );
}

struct Server {
    child: Child,
    base: String,
}

fn spawn(server: &str, dir: &Path) -> Server {
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .and_then(|l| l.local_addr())
        .map(|a| a.port())
        .expect("port");
    let child = Command::new(server)
        .env("DS_SERVER__PORT", port.to_string())
        .env("DS_STORAGE__MODE", "file-durable")
        .env("DS_STORAGE__DATA_DIR", dir)
        .env(
            "RUST_LOG",
            std::env::var("RUST_LOG").unwrap_or("info".into()),
        )
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn server");
    Server {
        child,
        base: format!("http://127.0.0.1:{port}"),
    }
}

async fn healthy(client: &reqwest::Client, s: &mut Server) {
    let deadline = Instant::now() + Duration::from_secs(600);
    loop {
        if let Ok(r) = client.get(format!("{}/healthz", s.base)).send().await
            && r.status().is_success()
        {
            return;
        }
        if let Ok(Some(status)) = s.child.try_wait() {
            panic!("server exited: {status}");
        }
        assert!(Instant::now() < deadline, "server did not become healthy");
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
}

fn stop(mut s: Server) {
    let _ = Command::new("kill")
        .arg("-TERM")
        .arg(s.child.id().to_string())
        .status();
    let _ = s.child.wait();
}

async fn restart(server: &str, dir: &Path, rounds: usize) {
    let client = reqwest::Client::new();
    let empty = tempfile::tempdir().expect("tempdir");
    let mut s = spawn(server, empty.path());
    healthy(&client, &mut s).await;
    tokio::time::sleep(Duration::from_secs(2)).await;
    let baseline = rss_bytes(s.child.id());
    stop(s);
    println!("baseline RSS {:.1} MB", baseline as f64 / 1e6);
    for round in 0..rounds {
        let started = Instant::now();
        let mut s = spawn(server, dir);
        healthy(&client, &mut s).await;
        let ready = started.elapsed();
        tokio::time::sleep(Duration::from_secs(2)).await;
        let rss = rss_bytes(s.child.id());
        // The stream's length and record size from a HEAD, then exact reads.
        let head = client
            .head(format!("{}{PATH}", s.base))
            .send()
            .await
            .expect("HEAD");
        let tail: u64 = head
            .headers()
            .get("stream-next-offset")
            .and_then(|v| v.to_str().ok())
            .and_then(|v| v.split_once('_'))
            .and_then(|(_, p)| p.parse().ok())
            .expect("Stream-Next-Offset");
        let first = client
            .get(format!("{}{PATH}?offset={:016}_{:016}", s.base, 0, 0))
            .send()
            .await
            .expect("GET")
            .bytes()
            .await
            .expect("body");
        let size = first
            .iter()
            .skip(13)
            .position(|&b| b != b'.')
            .map_or(first.len(), |p| p + 13) as u64;
        let count = tail / size;
        for i in [0, count / 2 + 7, count - 1] {
            let body = client
                .get(format!(
                    "{}{PATH}?offset={:016}_{:016}",
                    s.base,
                    0,
                    i * size
                ))
                .send()
                .await
                .expect("GET")
                .bytes()
                .await
                .expect("body");
            assert_eq!(
                &body[..size as usize],
                &record(i, size as usize)[..],
                "record {i}"
            );
        }
        println!(
            "round {round}: healthy after {:.3} s, RSS {:.1} MB, {:.2} B per stored append over the baseline ({count} appends of {size} B)",
            ready.as_secs_f64(),
            rss as f64 / 1e6,
            (rss.saturating_sub(baseline)) as f64 / count as f64
        );
        stop(s);
    }
}

#[tokio::main]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    match args.get(1).map(String::as_str) {
        Some("fill") if args.len() == 5 => {
            fill(
                Path::new(&args[2]),
                args[3].parse().expect("count"),
                args[4].parse().expect("size"),
            )
            .await
        }
        Some("restart") if args.len() == 5 => {
            restart(
                &args[2],
                Path::new(&args[3]),
                args[4].parse().expect("rounds"),
            )
            .await
        }
        _ => {
            eprintln!("usage: store_at_scale fill DIR N SIZE | restart SERVER DIR ROUNDS");
            std::process::exit(2);
        }
    }
}
