//! RAM per stream and per idempotent producer, measured on a running server (RSS from /proc).
//!
//! ```text
//! cargo build --release -p ds-server --bin ds-server --example ram_probe
//! target/release/ds-server &   # any mode; raise DS_LIMITS__MAX_STREAMS / MAX_PRODUCERS as needed
//! target/release/examples/ram_probe http://127.0.0.1:4437 <server pid> streams 100000
//! target/release/examples/ram_probe http://127.0.0.1:4437 <server pid> producers 1000000
//! ```
//!
//! `streams N` creates N empty streams; `producers N` makes N distinct producers append one byte
//! each to one stream. Prints the server's RSS before and after and the difference per item
//! (after a short settle, read once more: allocator caches are part of what the process holds).

use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .map_or(0, |kb| kb * 1024)
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    let args: Vec<String> = std::env::args().collect();
    if args.len() != 5 {
        eprintln!("usage: ram_probe <base url> <server pid> streams|producers <count>");
        std::process::exit(2);
    }
    let base = args[1].trim_end_matches('/').to_owned();
    let pid: u32 = args[2].parse().expect("pid");
    let what = args[3].clone();
    let count: usize = args[4].parse().expect("count");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(64)
        .build()
        .expect("client");
    let run = format!("{:x}", std::process::id());
    if what == "producers" {
        let r = client
            .put(format!("{base}/probe-{run}/p"))
            .header("content-type", "application/octet-stream")
            .send()
            .await
            .expect("PUT");
        assert!(r.status().is_success(), "PUT: {}", r.status());
    }
    let before = rss_bytes(pid);
    let next = Arc::new(AtomicUsize::new(0));
    let failed = Arc::new(AtomicUsize::new(0));
    let started = std::time::Instant::now();
    let workers: Vec<_> = (0..64)
        .map(|_| {
            let (client, base, what, run) =
                (client.clone(), base.clone(), what.clone(), run.clone());
            let (next, failed) = (next.clone(), failed.clone());
            tokio::spawn(async move {
                loop {
                    let i = next.fetch_add(1, Ordering::Relaxed);
                    if i >= count {
                        break;
                    }
                    let req = if what == "streams" {
                        client
                            .put(format!("{base}/probe-{run}/s{i}"))
                            .header("content-type", "application/octet-stream")
                    } else {
                        client
                            .post(format!("{base}/probe-{run}/p"))
                            .header("content-type", "application/octet-stream")
                            .header("producer-id", format!("producer-{i}"))
                            .header("producer-epoch", "0")
                            .header("producer-seq", "0")
                            .body("x")
                    };
                    match req.send().await {
                        Ok(r) if r.status().is_success() => {}
                        Ok(r) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!(
                                    "{i}: {} {}",
                                    r.status(),
                                    r.text().await.unwrap_or_default()
                                );
                            }
                        }
                        Err(e) => {
                            if failed.fetch_add(1, Ordering::Relaxed) < 3 {
                                eprintln!("{i}: {e}");
                            }
                        }
                    }
                }
            })
        })
        .collect();
    for w in workers {
        w.await.expect("worker");
    }
    let elapsed = started.elapsed();
    let after = rss_bytes(pid);
    let failed = failed.load(Ordering::Relaxed);
    let grown = after.saturating_sub(before);
    println!(
        "{what}: {count} in {:.1} s ({failed} failed); RSS {:.1} MB -> {:.1} MB: +{:.1} MB, {:.0} B per item",
        elapsed.as_secs_f64(),
        before as f64 / 1e6,
        after as f64 / 1e6,
        grown as f64 / 1e6,
        grown as f64 / count.max(1) as f64
    );
}
