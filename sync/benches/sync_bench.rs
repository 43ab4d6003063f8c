//! ds-sync benchmark: rows mirrored per second for 100-byte JSON messages on 1 stream and on
//! 1 000 streams, and end-to-end lag (append sent → row visible in Postgres) at a fixed append
//! rate. Uses the real release binaries and real Postgres, like the tests.
//!
//! Run: `cargo build --release -p ds-server && DATABASE_URL=postgres://postgres@127.0.0.1:5432/test
//! cargo bench -p ds-sync --bench sync_bench`. Optional `BENCH_SCALE` (default 1.0) scales the
//! message counts. Prints a Markdown table.

#[path = "../tests/support/mod.rs"]
mod support;

use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

use support::*;

const JSON: &str = "application/json";

/// A JSON message of exactly 100 bytes.
fn message(i: u64) -> String {
    let head = format!("{{\"i\":{i},\"pad\":\"");
    let pad = 100 - head.len() - 2;
    format!("{head}{}\"}}", "x".repeat(pad))
}

fn scale() -> f64 {
    std::env::var("BENCH_SCALE")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1.0)
}

/// Loads `per_stream` messages into each of `streams` streams, then times one worker mirroring
/// them all from scratch. Returns rows per second.
async fn throughput(streams: usize, per_stream: usize, extra: &[(&str, &str)]) -> (usize, f64) {
    let db = TestDb::create().await;
    let server = Server::start_with_env(&[
        ("DS_LIMITS__MAX_STREAM_BYTES", "1000000000"),
        ("DS_LIMITS__MAX_MEMORY_BYTES", "4000000000"),
    ])
    .await;
    let c = StreamClient::new(&server);
    let paths: Vec<String> = (0..streams)
        .map(|i| format!("/v1/stream/b{i:05}"))
        .collect();
    let mut n = 0u64;
    for p in &paths {
        c.create(p, JSON, "").await;
        // 100 messages per append: loading is not what is measured.
        for chunk in (0..per_stream).collect::<Vec<_>>().chunks(100) {
            let body = format!(
                "[{}]",
                chunk
                    .iter()
                    .map(|_| {
                        n += 1;
                        message(n)
                    })
                    .collect::<Vec<_>>()
                    .join(",")
            );
            c.append(p, JSON, body).await;
        }
    }
    let mut tails = std::collections::HashMap::new();
    for p in &paths {
        tails.insert(p.clone(), c.tail(p).await.0);
    }
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let mut env = vec![("RUST_LOG", "info"), ("DS_SYNC__STATS_INTERVAL", "5s")];
    env.extend_from_slice(extra);
    let started = Instant::now();
    let _worker = Worker::start(&server, &db, &refs, &env).await;
    let pg = db.client().await;
    wait_for("the mirror to catch up", || {
        let pg = &pg;
        let tails = &tails;
        async move {
            let cps = checkpoints(pg).await;
            tails
                .iter()
                .all(|(s, t)| cps.get(s).is_some_and(|cp| &cp.next_offset == t))
                .then_some(())
        }
    })
    .await;
    let secs = started.elapsed().as_secs_f64();
    let rows = usize::try_from(row_count(&pg).await).unwrap_or(0);
    assert_eq!(rows, streams * per_stream, "row count");
    (rows, rows as f64 / secs)
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_micros() as i64)
        .unwrap_or(0)
}

/// Appends `rate` messages per second (spread over `streams` streams) for `secs` seconds, each
/// carrying its send time, while polling Postgres every 5 ms for new rows. Lag = first seen in
/// Postgres − sent. Returns (p50, p99, max) in milliseconds.
async fn lag(streams: usize, rate: u64, secs: u64) -> (f64, f64, f64) {
    let db = TestDb::create().await;
    let server = Server::start().await;
    let c = StreamClient::new(&server);
    let paths: Vec<String> = (0..streams)
        .map(|i| format!("/v1/stream/l{i:04}"))
        .collect();
    for p in &paths {
        c.create(p, JSON, "").await;
    }
    let refs: Vec<&str> = paths.iter().map(String::as_str).collect();
    let _worker = Worker::start(&server, &db, &refs, &[("RUST_LOG", "info")]).await;
    let total = rate * secs;
    let appender = {
        let c = c.clone();
        let paths = paths.clone();
        tokio::spawn(async move {
            let mut tick = tokio::time::interval(Duration::from_micros(1_000_000 / rate));
            tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
            for i in 0..total {
                tick.tick().await;
                let p = &paths[(i as usize) % paths.len()];
                let body = format!("{{\"t\":{},\"i\":{i}}}", unix_micros());
                c.append(p, JSON, body).await;
            }
        })
    };
    let pg = db.client().await;
    let mut lags: Vec<f64> = Vec::with_capacity(total as usize);
    // Per stream, the key of the last row seen: rows of one stream commit in key order.
    let mut marks: Vec<(String, String, i32)> = paths
        .iter()
        .map(|p| (p.clone(), "-1".to_owned(), -1))
        .collect();
    let deadline = Instant::now() + Duration::from_secs(secs + 60);
    while (lags.len() as u64) < total {
        assert!(Instant::now() < deadline, "lag run did not finish");
        let s: Vec<&str> = marks.iter().map(|m| m.0.as_str()).collect();
        let o: Vec<&str> = marks.iter().map(|m| m.1.as_str()).collect();
        let i: Vec<i32> = marks.iter().map(|m| m.2).collect();
        let rows = pg
            .query(
                "SELECT m.stream, m.stream_offset, m.idx, (m.data->>'t')::bigint \
                 FROM ds_messages m \
                 JOIN unnest($1::text[], $2::text[], $3::int4[]) AS w(s, o, i) ON m.stream = w.s \
                 WHERE (m.stream_offset, m.idx) > (w.o, w.i) ORDER BY 1, 2, 3",
                &[&s, &o, &i],
            )
            .await
            .unwrap_or_else(|e| panic!("poll: {e}"));
        let now = unix_micros();
        for r in &rows {
            let (stream, offset, idx, sent): (String, String, i32, i64) =
                (r.get(0), r.get(1), r.get(2), r.get(3));
            lags.push((now - sent) as f64 / 1000.0);
            if let Some(m) = marks.iter_mut().find(|m| m.0 == stream) {
                (m.1, m.2) = (offset, idx);
            }
        }
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    appender.await.unwrap_or_else(|e| panic!("appender: {e}"));
    lags.sort_by(f64::total_cmp);
    let pct = |p: f64| lags[((lags.len() as f64 - 1.0) * p).round() as usize];
    (pct(0.50), pct(0.99), lags[lags.len() - 1])
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() {
    // `cargo bench` passes --bench; nothing to parse.
    let s = scale();
    let one = ((200_000.0 * s) as usize).max(100);
    let per = ((100.0 * s) as usize).max(1);
    println!("| scenario | rows | result |");
    println!("|---|---|---|");
    let (rows, rps) = throughput(1, one, &[]).await;
    println!("| 1 stream, catch-up, defaults | {rows} | {rps:.0} rows/s |");
    let (rows, rps) = throughput(1_000, per, &[]).await;
    println!("| 1 000 streams, catch-up, defaults (256 connections) | {rows} | {rps:.0} rows/s |");
    let (rows, rps) = throughput(1_000, per, &[("DS_SYNC__MAX_CONNECTIONS", "1000")]).await;
    println!("| 1 000 streams, catch-up, 1 000 connections | {rows} | {rps:.0} rows/s |");
    let secs = ((10.0 * s) as u64).max(2);
    let (p50, p99, max) = lag(1, 500, secs).await;
    println!(
        "| lag, 1 stream at 500 appends/s for {secs} s | {} | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |",
        500 * secs
    );
    let (p50, p99, max) = lag(100, 500, secs).await;
    println!(
        "| lag, 100 streams at 500 appends/s in all for {secs} s | {} | p50 {p50:.1} ms, p99 {p99:.1} ms, max {max:.1} ms |",
        500 * secs
    );
}
