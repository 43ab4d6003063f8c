//! Test harness: a fresh Postgres database per test, the real `ds-server` and `ds-sync` binaries
//! as child processes (so they can be killed with SIGKILL), a small protocol client, waiting on
//! conditions with deadlines, and the equality check every scenario ends with.
//!
//! Environment:
//! - `DATABASE_URL` (required): a Postgres the tests may create and drop databases in.
//! - `DS_SERVER_BIN` (optional): the server binary; default `ds-server` beside the test binary's
//!   target dir (`cargo build -p ds-server` first).
//! - `DS_SYNC_TEST_SERVER_CMD` (optional, development only): a shell command that starts another
//!   protocol server instead, with `{port}` and `{data_dir}` replaced.

#![allow(dead_code)] // each test binary uses a different part of the harness

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use serde_json::Value;

/// How long any condition may take before the test fails.
pub const DEADLINE: Duration = Duration::from_secs(60);

/// Polls `check` until it returns `Some`, failing the test with `what` after `DEADLINE`.
pub async fn wait_for<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let start = Instant::now();
    loop {
        if let Some(v) = check().await {
            return v;
        }
        assert!(start.elapsed() < DEADLINE, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

/// A free TCP port on loopback (bound, read, released).
pub fn free_port() -> u16 {
    // Never the same port twice in one test process: the kernel may hand a released port out
    // again at once, and tests that start servers run concurrently.
    static GIVEN: std::sync::Mutex<std::collections::BTreeSet<u16>> =
        std::sync::Mutex::new(std::collections::BTreeSet::new());
    loop {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")
            .unwrap_or_else(|e| panic!("cannot bind a free port: {e}"));
        let port = listener
            .local_addr()
            .unwrap_or_else(|e| panic!("no local addr: {e}"))
            .port();
        if GIVEN.lock().expect("ports").insert(port) {
            return port;
        }
    }
}

fn log_dir() -> PathBuf {
    let dir = std::env::temp_dir().join("ds-sync-tests");
    let _ = std::fs::create_dir_all(&dir);
    dir
}

fn log_file(name: &str) -> (std::fs::File, PathBuf) {
    let path = log_dir().join(format!("{name}-{}.log", fastrand::u64(..)));
    let file = std::fs::File::create(&path)
        .unwrap_or_else(|e| panic!("cannot create log {}: {e}", path.display()));
    (file, path)
}

// ---------------------------------------------------------------------------------------------
// Postgres

/// A database created for one test and dropped (with FORCE) when the test ends.
pub struct TestDb {
    pub name: String,
    pub url: String,
    admin_url: String,
}

fn database_url() -> String {
    std::env::var("DATABASE_URL").unwrap_or_else(|_| {
        panic!(
            "DATABASE_URL is not set: the ds-sync tests need a real Postgres they may create \
             databases in, e.g. DATABASE_URL=postgres://postgres@127.0.0.1:5432/test"
        )
    })
}

fn with_database(url: &str, db: &str) -> String {
    let (head, query) = match url.split_once('?') {
        Some((h, q)) => (h, format!("?{q}")),
        None => (url, String::new()),
    };
    // postgres://user@host:port/dbname → replace the path after the authority.
    let scheme_end = head.find("://").map(|i| i + 3).unwrap_or(0);
    let base = match head[scheme_end..].find('/') {
        Some(i) => &head[..scheme_end + i],
        None => head,
    };
    format!("{base}/{db}{query}")
}

pub async fn pg_connect(url: &str) -> tokio_postgres::Client {
    let (client, conn) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .unwrap_or_else(|e| panic!("cannot connect to postgres at {url}: {e}"));
    tokio::spawn(async move {
        let _ = conn.await;
    });
    client
}

impl TestDb {
    pub async fn create() -> TestDb {
        let admin_url = database_url();
        let name = format!("ds_sync_test_{:016x}", fastrand::u64(..));
        let admin = pg_connect(&admin_url).await;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .unwrap_or_else(|e| panic!("CREATE DATABASE {name}: {e}"));
        TestDb {
            url: with_database(&admin_url, &name),
            name,
            admin_url,
        }
    }

    pub async fn client(&self) -> tokio_postgres::Client {
        pg_connect(&self.url).await
    }

    /// Terminates every connection to this database except the caller's.
    pub async fn terminate_connections(&self) -> u64 {
        let admin = pg_connect(&self.admin_url).await;
        let rows = admin
            .query(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity \
                 WHERE datname = $1 AND pid <> pg_backend_pid()",
                &[&self.name],
            )
            .await
            .unwrap_or_else(|e| panic!("pg_terminate_backend: {e}"));
        rows.len() as u64
    }
}

impl Drop for TestDb {
    fn drop(&mut self) {
        let admin_url = self.admin_url.clone();
        let name = self.name.clone();
        // Drop runs inside the test's runtime; a separate thread with its own runtime avoids
        // blocking it.
        let dropper = std::thread::spawn(move || {
            let rt = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build();
            if let Ok(rt) = rt {
                rt.block_on(async {
                    if let Ok((client, conn)) =
                        tokio_postgres::connect(&admin_url, tokio_postgres::NoTls).await
                    {
                        tokio::spawn(async move {
                            let _ = conn.await;
                        });
                        let _ = client
                            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
                            .await;
                    }
                });
            }
        });
        let _ = dropper.join();
    }
}

// ---------------------------------------------------------------------------------------------
// The protocol server

/// The server under test, as a child process.
pub struct Server {
    child: Option<Child>,
    pub port: u16,
    pub base_url: String,
    /// Where a durable server keeps its data, kept across restarts.
    data_dir: Option<tempfile::TempDir>,
    /// Extra environment of the real server (e.g. limits for a benchmark).
    env: Vec<(String, String)>,
    pub log: PathBuf,
}

fn server_bin() -> PathBuf {
    if let Ok(bin) = std::env::var("DS_SERVER_BIN") {
        return PathBuf::from(bin);
    }
    // target/<profile>/deps/<test binary> → target/<profile>/ds-server
    let exe = std::env::current_exe().unwrap_or_else(|e| panic!("current_exe: {e}"));
    let profile_dir = exe
        .parent()
        .and_then(Path::parent)
        .unwrap_or_else(|| panic!("unexpected test binary path {}", exe.display()));
    profile_dir.join("ds-server")
}

impl Server {
    /// An in-memory server.
    pub async fn start() -> Server {
        Self::spawn(None, &[]).await
    }

    /// An in-memory server with extra `DS_*` settings.
    pub async fn start_with_env(env: &[(&str, &str)]) -> Server {
        Self::spawn(None, env).await
    }

    /// A server that keeps its data in a directory across restarts.
    pub async fn start_durable() -> Server {
        let dir = tempfile::tempdir().unwrap_or_else(|e| panic!("tempdir: {e}"));
        Self::spawn(Some(dir), &[]).await
    }

    async fn spawn(data_dir: Option<tempfile::TempDir>, env: &[(&str, &str)]) -> Server {
        let mut server = Server {
            child: None,
            port: free_port(),
            base_url: String::new(),
            data_dir,
            env: env
                .iter()
                .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
                .collect(),
            log: PathBuf::new(),
        };
        server.base_url = format!("http://127.0.0.1:{}", server.port);
        server.launch().await;
        server
    }

    async fn launch(&mut self) {
        let (log, log_path) = log_file("server");
        let stderr = log.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let data_dir = self
            .data_dir
            .as_ref()
            .map(|d| d.path().display().to_string())
            .unwrap_or_default();
        let mut cmd = match std::env::var("DS_SYNC_TEST_SERVER_CMD") {
            Ok(template) => {
                let line = template
                    .replace("{port}", &self.port.to_string())
                    .replace("{data_dir}", &data_dir);
                let mut c = Command::new("sh");
                c.arg("-c").arg(format!("exec {line}"));
                c
            }
            Err(_) => {
                let bin = server_bin();
                assert!(
                    bin.exists(),
                    "the ds-server binary is missing at {}: run `cargo build -p ds-server` first \
                     (or set DS_SERVER_BIN)",
                    bin.display()
                );
                let mut c = Command::new(bin);
                c.env("DS_SERVER__HOST", "127.0.0.1")
                    .env("DS_SERVER__PORT", self.port.to_string())
                    .env("DS_SERVER__LONG_POLL_TIMEOUT", "500ms")
                    .env("DS_SERVER__SSE_RECONNECT_INTERVAL", "2s");
                if self.data_dir.is_some() {
                    c.env("DS_STORAGE__MODE", "file-durable")
                        .env("DS_STORAGE__DATA_DIR", &data_dir);
                } else {
                    c.env("DS_STORAGE__MODE", "memory");
                }
                c.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
                c
            }
        };
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start the server: {e}"));
        self.child = Some(child);
        self.log = log_path;
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", self.base_url);
        let log = self.log.clone();
        let child = self.child.as_mut();
        let mut exited = None;
        if let Some(child) = child {
            let start = Instant::now();
            loop {
                if let Ok(Some(status)) = child.try_wait() {
                    exited = Some(status);
                    break;
                }
                // Any HTTP answer means it listens (a development server may lack /healthz).
                if http.get(&url).send().await.is_ok() {
                    break;
                }
                assert!(
                    start.elapsed() < DEADLINE,
                    "server did not answer {url}; log: {}",
                    log.display()
                );
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        }
        if let Some(status) = exited {
            panic!(
                "server exited at start with {status}; log {}:\n{}",
                log.display(),
                std::fs::read_to_string(&log).unwrap_or_default()
            );
        }
    }

    /// SIGKILL, as a crash would.
    pub fn kill(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// Kill and start again on the same port and data directory.
    pub async fn restart(&mut self) {
        self.kill();
        self.launch().await;
    }

    pub fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill();
    }
}

// ---------------------------------------------------------------------------------------------
// The worker

/// `ds-sync run` as a child process.
pub struct Worker {
    child: Option<Child>,
    env: Vec<(String, String)>,
    pub health_url: String,
    pub log: PathBuf,
}

impl Worker {
    /// Starts a worker mirroring `streams` from `server` into `db`; `extra` overrides settings.
    pub async fn start(
        server: &Server,
        db: &TestDb,
        streams: &[&str],
        extra: &[(&str, &str)],
    ) -> Worker {
        let health_port = free_port();
        let mut env: Vec<(String, String)> = vec![
            ("DATABASE_URL".into(), db.url.clone()),
            ("DS_SYNC__SERVER_URL".into(), server.base_url.clone()),
            ("DS_SYNC__STREAMS".into(), streams.join(",")),
            (
                "DS_SYNC__HEALTH_ADDR".into(),
                format!("127.0.0.1:{health_port}"),
            ),
            ("DS_SYNC__BACKOFF_MIN".into(), "20ms".into()),
            ("DS_SYNC__BACKOFF_MAX".into(), "300ms".into()),
            ("DS_SYNC__LINGER".into(), "10ms".into()),
            ("DS_SYNC__STATS_INTERVAL".into(), "1s".into()),
            // Short sessions exercise reconnecting from the checkpoint and notice deletes fast.
            ("DS_SYNC__SESSION_MAX".into(), "2s".into()),
            // A worker killed with SIGKILL holds the subscription's lease until it lapses; a
            // restarted (or standby) worker waits that long before it mirrors.
            ("DS_SYNC__LEASE_TTL".into(), "3s".into()),
            ("RUST_LOG".into(), "info,ds_sync=debug".into()),
        ];
        for (k, v) in extra {
            env.retain(|(key, _)| key != k);
            env.push(((*k).into(), (*v).into()));
        }
        let mut worker = Worker {
            child: None,
            env,
            health_url: format!("http://127.0.0.1:{health_port}"),
            log: PathBuf::new(),
        };
        worker.launch().await;
        worker
    }

    async fn launch(&mut self) {
        let (log, log_path) = log_file("worker");
        let stderr = log.try_clone().unwrap_or_else(|e| panic!("log file: {e}"));
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_ds-sync"));
        cmd.arg("run");
        for (k, _) in std::env::vars() {
            if k.starts_with("DS_SYNC__") || k == "DATABASE_URL" {
                cmd.env_remove(k);
            }
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k.as_str(), v.as_str())));
        let child = cmd
            .stdin(Stdio::null())
            .stdout(log)
            .stderr(stderr)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start ds-sync: {e}"));
        self.child = Some(child);
        self.log = log_path;
        let http = reqwest::Client::new();
        let url = format!("{}/healthz", self.health_url);
        wait_for("the worker's /healthz", || {
            let http = http.clone();
            let url = url.clone();
            let exited = self
                .child
                .as_mut()
                .and_then(|c| c.try_wait().ok().flatten());
            let log = self.log.clone();
            async move {
                if let Some(status) = exited {
                    panic!(
                        "ds-sync exited with {status}; log:\n{}",
                        std::fs::read_to_string(log).unwrap_or_default()
                    );
                }
                match http.get(&url).send().await {
                    Ok(r) if r.status().is_success() => Some(()),
                    _ => None,
                }
            }
        })
        .await;
    }

    /// SIGKILL: no chance to finish a batch.
    pub fn kill9(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self) {
        if let Some(mut child) = self.child.take() {
            let _ = Command::new("kill")
                .arg("-TERM")
                .arg(child.id().to_string())
                .status();
            let start = Instant::now();
            loop {
                match child.try_wait() {
                    Ok(Some(status)) => {
                        assert!(
                            status.success(),
                            "ds-sync exited with {status} on SIGTERM; log {}",
                            self.log.display()
                        );
                        return;
                    }
                    _ if start.elapsed() > DEADLINE => {
                        let _ = child.kill();
                        panic!(
                            "ds-sync did not stop on SIGTERM; log {}",
                            self.log.display()
                        );
                    }
                    _ => std::thread::sleep(Duration::from_millis(20)),
                }
            }
        }
    }

    pub async fn restart(&mut self) {
        self.kill9();
        self.launch().await;
    }

    /// Whether the process is still running (it must survive e.g. Postgres outages).
    pub fn is_running(&mut self) -> bool {
        self.child
            .as_mut()
            .is_some_and(|c| matches!(c.try_wait(), Ok(None)))
    }

    pub async fn status_json(&self) -> Value {
        let resp = reqwest::get(format!("{}/status", self.health_url))
            .await
            .unwrap_or_else(|e| panic!("GET /status: {e}"));
        resp.json()
            .await
            .unwrap_or_else(|e| panic!("/status is not JSON: {e}"))
    }

    pub fn log_text(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill9();
    }
}

/// The subscription `id` as the server shows it (`GET {root}__ds/subscriptions/{id}` at root
/// `/`): `None` while it does not exist.
pub async fn subscription(server: &Server, id: &str) -> Option<Value> {
    let resp = reqwest::get(server.url(&format!("/__ds/subscriptions/{id}")))
        .await
        .ok()?;
    if !resp.status().is_success() {
        return None;
    }
    resp.json().await.ok()
}

/// The acked offset of each stream linked to a subscription, by absolute path.
pub fn acked_offsets(sub: &Value) -> HashMap<String, String> {
    sub["streams"]
        .as_array()
        .map(|links| {
            links
                .iter()
                .filter_map(|l| {
                    Some((
                        format!("/{}", l["path"].as_str()?),
                        l["acked_offset"].as_str()?.to_owned(),
                    ))
                })
                .collect()
        })
        .unwrap_or_default()
}

// ---------------------------------------------------------------------------------------------
// A small protocol client for writing to streams

#[derive(Clone)]
pub struct StreamClient {
    http: reqwest::Client,
    base_url: String,
}

impl StreamClient {
    pub fn new(server: &Server) -> Self {
        StreamClient {
            http: reqwest::Client::new(),
            base_url: server.base_url.clone(),
        }
    }

    fn url(&self, path: &str) -> String {
        format!("{}{}", self.base_url, path)
    }

    pub async fn create(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) {
        let resp = self
            .http
            .put(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("PUT {path}: {e}"));
        assert!(resp.status().is_success(), "PUT {path}: {}", resp.status());
    }

    /// Appends, and says whether the server acknowledged it (for loads that run across a server
    /// restart: what the server kept is what the mirror is compared with).
    pub async fn try_append(&self, path: &str, content_type: &str, body: Vec<u8>) -> bool {
        self.http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .is_ok_and(|r| r.status().is_success())
    }

    pub async fn append(&self, path: &str, content_type: &str, body: impl Into<reqwest::Body>) {
        let resp = self
            .http
            .post(self.url(path))
            .header("content-type", content_type)
            .body(body)
            .send()
            .await
            .unwrap_or_else(|e| panic!("POST {path}: {e}"));
        assert!(resp.status().is_success(), "POST {path}: {}", resp.status());
    }

    /// Appends `body` (if any) and closes the stream in one request.
    pub async fn close(&self, path: &str, content_type: &str, body: Option<Vec<u8>>) {
        let mut req = self
            .http
            .post(self.url(path))
            .header("stream-closed", "true");
        if let Some(body) = body {
            req = req.header("content-type", content_type).body(body);
        }
        let resp = req
            .send()
            .await
            .unwrap_or_else(|e| panic!("close {path}: {e}"));
        assert!(
            resp.status().is_success(),
            "close {path}: {}",
            resp.status()
        );
    }

    pub async fn delete(&self, path: &str) {
        let resp = self
            .http
            .delete(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("DELETE {path}: {e}"));
        assert!(
            resp.status().is_success(),
            "DELETE {path}: {}",
            resp.status()
        );
    }

    /// The tail offset and closed flag (HEAD).
    pub async fn tail(&self, path: &str) -> (String, bool) {
        let resp = self
            .http
            .head(self.url(path))
            .send()
            .await
            .unwrap_or_else(|e| panic!("HEAD {path}: {e}"));
        assert!(resp.status().is_success(), "HEAD {path}: {}", resp.status());
        let h = |name: &str| {
            resp.headers()
                .get(name)
                .and_then(|v| v.to_str().ok())
                .map(str::to_owned)
        };
        (
            h("stream-next-offset").unwrap_or_else(|| panic!("HEAD {path}: no Stream-Next-Offset")),
            h("stream-closed").is_some_and(|v| v.eq_ignore_ascii_case("true")),
        )
    }

    /// The whole stream by catch-up reads: JSON messages, or bytes.
    pub async fn catch_up(&self, path: &str) -> Content {
        let mut offset = "-1".to_owned();
        let mut json: Option<Vec<Value>> = None;
        let mut bytes = Vec::new();
        loop {
            let resp = self
                .http
                .get(
                    reqwest::Url::parse_with_params(&self.url(path), [("offset", offset.as_str())])
                        .unwrap_or_else(|e| panic!("url of {path}: {e}")),
                )
                .send()
                .await
                .unwrap_or_else(|e| panic!("GET {path}: {e}"));
            assert!(resp.status().is_success(), "GET {path}: {}", resp.status());
            let header = |name: &str| {
                resp.headers()
                    .get(name)
                    .and_then(|v| v.to_str().ok())
                    .map(str::to_owned)
            };
            let is_json = header("content-type")
                .is_some_and(|ct| ct.to_ascii_lowercase().starts_with("application/json"));
            let next = header("stream-next-offset")
                .unwrap_or_else(|| panic!("GET {path}: no Stream-Next-Offset"));
            let up_to_date = header("stream-up-to-date").is_some_and(|v| v == "true");
            let body = resp
                .bytes()
                .await
                .unwrap_or_else(|e| panic!("GET {path} body: {e}"));
            if is_json {
                let page: Vec<Value> = serde_json::from_slice(&body)
                    .unwrap_or_else(|e| panic!("GET {path}: body is not a JSON array: {e}"));
                json.get_or_insert_with(Vec::new).extend(page);
            } else {
                bytes.extend_from_slice(&body);
            }
            if up_to_date || next == offset {
                break;
            }
            offset = next;
        }
        match json {
            Some(messages) => Content::Json(messages),
            None => Content::Bytes(bytes),
        }
    }
}

/// A stream's content, as the server serves it or as re-assembled from Postgres.
#[derive(Debug, PartialEq)]
pub enum Content {
    Json(Vec<Value>),
    Bytes(Vec<u8>),
}

impl Content {
    pub fn len(&self) -> usize {
        match self {
            Content::Json(v) => v.len(),
            Content::Bytes(b) => b.len(),
        }
    }
}

// ---------------------------------------------------------------------------------------------
// The checks

/// One stream's checkpoint row (its latest incarnation).
#[derive(Debug, Clone, PartialEq)]
pub struct CheckpointRow {
    pub incarnation: i32,
    pub next_offset: String,
    pub closed: bool,
    pub deleted: bool,
    pub deleted_status: Option<i16>,
}

pub async fn checkpoints(db: &tokio_postgres::Client) -> HashMap<String, CheckpointRow> {
    let rows = db
        .query(
            "SELECT stream, incarnation, next_offset, closed, deleted, deleted_status \
             FROM ds_checkpoints",
            &[],
        )
        .await
        .unwrap_or_default(); // before the migration ran: no rows yet
    rows.iter()
        .map(|r| {
            (
                r.get::<_, String>(0),
                CheckpointRow {
                    incarnation: r.get(1),
                    next_offset: r.get(2),
                    closed: r.get(3),
                    deleted: r.get(4),
                    deleted_status: r.get(5),
                },
            )
        })
        .collect()
}

pub async fn row_count(db: &tokio_postgres::Client) -> i64 {
    db.query_one("SELECT count(*) FROM ds_messages", &[])
        .await
        .map(|r| r.get::<_, i64>(0))
        .unwrap_or(0)
}

/// The stream's latest incarnation re-assembled from its rows in key order (the README's query,
/// through the `ds_current_messages` view).
pub async fn mirrored(db: &tokio_postgres::Client, stream: &str) -> Content {
    let rows = db
        .query(
            "SELECT data::text, bytes, content_type FROM ds_current_messages WHERE stream = $1 \
             ORDER BY stream_offset, idx",
            &[&stream],
        )
        .await
        .unwrap_or_else(|e| panic!("reading rows of {stream}: {e}"));
    assemble(stream, &rows)
}

/// One incarnation of the stream re-assembled from its rows in key order.
pub async fn mirrored_incarnation(
    db: &tokio_postgres::Client,
    stream: &str,
    incarnation: i32,
) -> Content {
    let rows = db
        .query(
            "SELECT data::text, bytes, content_type FROM ds_messages \
             WHERE stream = $1 AND incarnation = $2 ORDER BY stream_offset, idx",
            &[&stream, &incarnation],
        )
        .await
        .unwrap_or_else(|e| panic!("reading rows of {stream} incarnation {incarnation}: {e}"));
    assemble(stream, &rows)
}

fn assemble(stream: &str, rows: &[tokio_postgres::Row]) -> Content {
    let mut json = Vec::new();
    let mut bytes = Vec::new();
    for r in rows {
        let data: Option<String> = r.get(0);
        let raw: Option<Vec<u8>> = r.get(1);
        let content_type: String = r.get(2);
        let is_json = content_type
            .split(';')
            .next()
            .is_some_and(|m| m.trim().eq_ignore_ascii_case("application/json"));
        match (data, raw) {
            (Some(text), None) => json
                .push(serde_json::from_str(&text).unwrap_or_else(|e| panic!("stored jsonb: {e}"))),
            // A JSON message jsonb cannot hold is kept as its exact text in `bytes`.
            (None, Some(b)) if is_json => json.push(
                serde_json::from_slice(&b).unwrap_or_else(|e| panic!("stored JSON text: {e}")),
            ),
            (None, Some(b)) => bytes.extend_from_slice(&b),
            other => panic!("row of {stream} has data and bytes both or neither: {other:?}"),
        }
    }
    assert!(
        json.is_empty() || bytes.is_empty(),
        "{stream} has both JSON and byte rows"
    );
    if !json.is_empty() {
        Content::Json(json)
    } else {
        Content::Bytes(bytes)
    }
}

/// Waits until the worker's checkpoint for every stream reached the server's tail (and records
/// closure), then asserts that the re-assembled rows equal a catch-up read, byte for byte
/// (JSON: message for message).
pub async fn assert_mirrored(server: &Server, db: &TestDb, streams: &[&str]) {
    let client = StreamClient::new(server);
    let pg = db.client().await;
    for &stream in streams {
        let (tail, closed) = client.tail(stream).await;
        wait_for(
            &format!("{stream} to be mirrored up to {tail} (closed: {closed})"),
            || {
                let pg = &pg;
                let tail = tail.clone();
                async move {
                    let cps = checkpoints(pg).await;
                    let cp = cps.get(stream)?;
                    (cp.next_offset == tail && (!closed || cp.closed)).then_some(())
                }
            },
        )
        .await;
        let expected = client.catch_up(stream).await;
        let got = mirrored(&pg, stream).await;
        let expected_empty = expected.len() == 0;
        if expected_empty {
            assert_eq!(got.len(), 0, "{stream}: rows exist for an empty stream");
        } else {
            assert!(
                got == expected,
                "{stream}: mirror differs from the stream: {} vs {} items",
                got.len(),
                expected.len()
            );
        }
    }
}
