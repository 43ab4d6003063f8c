//! A crash during the very first start-up must leave a directory the next start accepts.
//!
//! For every durable mode and every crash point of a first start (`DSTEST_CRASH_AT`, see
//! `server/STORAGE.md`, "First start"), the real binary is started on an empty directory and
//! aborts at that point; then it is started again without the hook and must come up, serve a
//! write and a read, leave no temporary file behind, and keep the write across another restart.

mod support;

use std::os::unix::process::ExitStatusExt;
use std::path::Path;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use reqwest::{Client, StatusCode};

struct Server {
    child: Child,
    base: String,
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn command(mode: &str, dir: &Path, port: u16) -> Command {
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_ds-server"));
    cmd.env_clear()
        .env("PATH", std::env::var("PATH").unwrap_or_default())
        .env("RUST_LOG", "warn")
        .env("DS_SERVER__PORT", port.to_string())
        .env("DS_STORAGE__MODE", mode)
        .env("DS_STORAGE__DATA_DIR", dir)
        .env("DS_STORAGE__ACID_SHARD_COUNT", "2")
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    cmd
}

/// Starts the server and waits (with a deadline) until it answers `/healthz`.
async fn start(mode: &str, dir: &Path) -> Server {
    let port = support::free_port();
    let mut child = command(mode, dir, port).spawn().expect("spawn ds-server");
    let base = format!("http://127.0.0.1:{port}");
    let client = Client::new();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        if let Ok(r) = client.get(format!("{base}/healthz")).send().await
            && r.status().is_success()
        {
            break;
        }
        if let Ok(Some(status)) = child.try_wait() {
            panic!("ds-server ({mode}) exited at start-up with {status}");
        }
        assert!(
            tokio::time::Instant::now() < deadline,
            "ds-server ({mode}) did not become healthy"
        );
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    Server { child, base }
}

/// Runs the first start with the crash hook at `point`; it must die there, by abort.
fn crash_at(mode: &str, dir: &Path, point: &str) {
    let status = command(mode, dir, support::free_port())
        .env("DSTEST_CRASH_AT", point)
        .status()
        .expect("run ds-server");
    assert_eq!(
        status.signal(),
        Some(6),
        "{mode}: the first start did not abort at crash point {point} ({status})"
    );
}

fn temp_files(dir: &Path) -> Vec<String> {
    let mut found = Vec::new();
    let mut pending = vec![dir.to_owned()];
    while let Some(d) = pending.pop() {
        for entry in std::fs::read_dir(&d).expect("list data dir").flatten() {
            let path = entry.path();
            if path.is_dir() {
                pending.push(path);
            } else if path.to_string_lossy().ends_with(".tmp") {
                found.push(path.display().to_string());
            }
        }
    }
    found
}

async fn write_and_read(client: &Client, base: &str, what: &str) {
    let url = format!("{base}/first-start");
    let put = client
        .put(&url)
        .header("content-type", "text/plain")
        .send()
        .await
        .expect("PUT");
    assert!(put.status().is_success(), "{what}: PUT {}", put.status());
    let post = client
        .post(&url)
        .header("content-type", "text/plain")
        .body("kept")
        .send()
        .await
        .expect("POST");
    assert!(post.status().is_success(), "{what}: POST {}", post.status());
    read_back(client, base, what).await;
}

async fn read_back(client: &Client, base: &str, what: &str) {
    let got = client
        .get(format!("{base}/first-start?offset=-1"))
        .send()
        .await
        .expect("GET");
    assert_eq!(got.status(), StatusCode::OK, "{what}: GET");
    assert_eq!(got.text().await.expect("body"), "kept", "{what}: data");
}

async fn survives(mode: &str, points: &[&str]) {
    let client = Client::new();
    for point in points {
        let what = format!("{mode} after a crash at {point}");
        let dir = tempfile::tempdir().expect("temp dir");
        // A data directory below one that does not exist yet: its creation is part of the
        // first start too.
        let data = dir.path().join("data");
        crash_at(mode, &data, point);
        let server = start(mode, &data).await;
        write_and_read(&client, &server.base, &what).await;
        assert_eq!(temp_files(&data), Vec::<String>::new(), "{what}: leftovers");
        drop(server);
        let server = start(mode, &data).await;
        read_back(&client, &server.base, &format!("{what}, restarted")).await;
    }
}

const FILE_POINTS: &[&str] = &[
    "file-format-tmp-written",
    "file-format-renamed",
    "file-wal-dir-created",
    "file-segment-created",
    "records-tmp-written",
    "records-renamed",
    "signing-key-tmp-written",
    "signing-key-renamed",
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_durable_first_start_survives_a_crash_at_every_point() {
    survives("file-durable", FILE_POINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn file_fast_first_start_survives_a_crash_at_every_point() {
    survives("file-fast", FILE_POINTS).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn acid_first_start_survives_a_crash_at_every_point() {
    survives(
        "acid",
        &[
            "acid-layout-tmp-written",
            "acid-layout-renamed",
            "acid-shard-created",
            "acid-shard-renamed",
            "acid-log-segment-created",
            "records-tmp-written",
            "records-renamed",
            "signing-key-tmp-written",
            "signing-key-renamed",
        ],
    )
    .await;
}
