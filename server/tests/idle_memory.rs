//! An idle keep-alive connection holds what a fresh one holds, whatever the size of its last
//! request body: measured as the resident memory (`/proc/PID/status`) of the real binary, run
//! alone in this test binary so nothing else moves the numbers. jemalloc is told to give freed
//! pages back at once, so what stays resident is what is still held.

mod support;

use std::process::{Child, Command, Stdio};
use std::time::Duration;

use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

struct Server {
    child: Child,
    port: u16,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

async fn start() -> Server {
    let port = support::free_port();
    // Freed pages go back to the system at once (the names with and without the prefix of
    // tikv-jemallocator's symbols).
    let purge = "dirty_decay_ms:0,muzzy_decay_ms:0,tcache:false";
    let child = Command::new(env!("CARGO_BIN_EXE_ds-server"))
        .env_clear()
        .env("RUST_LOG", "warn")
        .env("DS_SERVER__PORT", port.to_string())
        .env("_RJEM_MALLOC_CONF", purge)
        .env("MALLOC_CONF", purge)
        .stdout(Stdio::null())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("spawn ds-server");
    let server = Server { child, port };
    let deadline = tokio::time::Instant::now() + Duration::from_secs(30);
    loop {
        if let Ok(mut c) = TcpStream::connect(("127.0.0.1", port)).await
            && exchange(&mut c, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await == 200
        {
            break;
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ds-server did not start"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    server
}

/// Sends a request and reads its whole response (a Content-Length one); the status.
async fn exchange(c: &mut TcpStream, request: &[u8]) -> u16 {
    c.write_all(request).await.expect("write");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_ascii_lowercase();
            let length: usize = head
                .lines()
                .find_map(|l| l.strip_prefix("content-length:"))
                .and_then(|v| v.trim().parse().ok())
                .unwrap_or(0);
            if buf.len() >= end + 4 + length {
                return head
                    .split(' ')
                    .nth(1)
                    .and_then(|s| s.parse().ok())
                    .expect("status");
            }
        }
        let n = tokio::time::timeout(Duration::from_secs(30), c.read(&mut chunk))
            .await
            .expect("answered in time")
            .expect("read");
        assert!(n > 0, "connection closed");
        buf.extend_from_slice(&chunk[..n]);
    }
}

fn rss_bytes(pid: u32) -> u64 {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).expect("proc status");
    let kb: u64 = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("VmRSS");
    kb * 1024
}

#[tokio::test]
async fn idle_connections_after_large_bodies_hold_what_fresh_ones_hold() {
    const CONNECTIONS: usize = 32;
    const BODY: usize = 4 << 20;
    let server = start().await;
    let pid = server.child.id();
    let connect = || TcpStream::connect(("127.0.0.1", server.port));

    let before = rss_bytes(pid);
    let mut fresh = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = connect().await.expect("connect");
        let status = exchange(&mut c, b"GET /healthz HTTP/1.1\r\nHost: t\r\n\r\n").await;
        assert_eq!(status, 200);
        fresh.push(c);
    }
    let with_fresh = rss_bytes(pid);

    let mut request = format!(
        "POST /no-such-stream HTTP/1.1\r\nHost: t\r\nContent-Type: text/plain\r\nContent-Length: {BODY}\r\n\r\n"
    )
    .into_bytes();
    request.resize(request.len() + BODY, b'x');
    let mut used = Vec::new();
    for _ in 0..CONNECTIONS {
        let mut c = connect().await.expect("connect");
        // The whole body is read before the stream is looked up: 404, the connection stays.
        assert_eq!(exchange(&mut c, &request).await, 404);
        used.push(c);
    }
    let with_used = rss_bytes(pid);

    let fresh_cost = with_fresh.saturating_sub(before);
    let used_cost = with_used.saturating_sub(with_fresh);
    eprintln!(
        "RSS: {before} at start; +{fresh_cost} for {CONNECTIONS} fresh idle connections; \
         +{used_cost} for {CONNECTIONS} idle connections after a {BODY}-byte body each"
    );
    // Pinned bodies would be 128 MiB. What stays beyond the fresh connections' cost does not
    // grow with the number of connections (about one body, 3-4 MiB, with 8, 16 or 32: the
    // allocator's, not the connections'); 8 MiB is a quarter of a MiB per
    // connection, far from a body each.
    assert!(
        used_cost <= fresh_cost + (8 << 20),
        "idle connections after large bodies hold {used_cost} bytes, fresh ones {fresh_cost}"
    );
    drop(fresh);
    drop(used);
}
