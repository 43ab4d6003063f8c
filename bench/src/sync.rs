//! Scenario f: ds-sync mirroring into Postgres.
//!
//! Drives the real `ds-sync` binary against the server under test and a real Postgres, and
//! measures what the issue asks for, with 100-byte JSON messages:
//! - catch-up throughput: the messages are in the server before the worker starts (100 per
//!   append, since loading is not what is measured); rows committed per second from the worker's
//!   start until every checkpoint reaches its stream's tail, on 1 stream and on many streams
//!   (with ds-sync's default connections, and with one per stream). The worker's own CPU per row
//!   comes from `/proc`.
//! - end-to-end lag at a fixed append rate: each message carries the time its append was sent; a
//!   poller reads new rows from Postgres every `LAG_POLL`, so a lag is "append sent → row seen
//!   committed", including up to one poll interval.
//!
//! Every measurement gets its own database (created here, dropped after) and its own worker
//! process, and its streams are named by the run id and the measurement, so none inherits
//! another's rows, checkpoints or streams. The worker's log goes to `Plan::log_dir`.

use std::path::{Path, PathBuf};
use std::process::Stdio;
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use anyhow::{Context, bail};
use bytes::Bytes;
use http::Uri;
use serde::{Deserialize, Serialize};
use tokio::time::Instant;

use crate::client::Server;
use crate::process::Process;
use crate::stats::{Latency, summarize_us};

const CONTENT_TYPE: &str = "application/json";
/// Size of every mirrored message, as stored (the JSON text of one message).
pub const MESSAGE_BYTES: usize = 100;
/// Messages per append when loading streams for a catch-up measurement.
const LOAD_BATCH: usize = 100;
/// How often the lag poller looks for new rows.
const LAG_POLL: Duration = Duration::from_millis(5);
/// How often a catch-up measurement checks the checkpoints.
const CATCHUP_POLL: Duration = Duration::from_millis(10);

#[derive(Clone, Debug)]
pub struct Plan {
    /// A Postgres the benchmark may create databases in (`CREATEDB`).
    pub database_url: String,
    /// The `ds-sync` binary (release build).
    pub sync_bin: PathBuf,
    /// Where each worker's log goes.
    pub log_dir: PathBuf,
    /// Catch-up on one stream: messages in it.
    pub one_stream_rows: usize,
    /// Catch-up on many streams: how many, and messages in each.
    pub many_streams: usize,
    pub rows_per_stream: usize,
    /// Lag: appends per second over all streams, for how long, on how many streams per run.
    pub lag_rate: u32,
    pub lag_for: Duration,
    pub lag_streams: Vec<usize>,
    /// Bounds every wait (a worker that never catches up fails the measurement).
    pub timeout: Duration,
    /// Each worker gets a subscription of its own (and acks to it); off: none (no acks).
    pub subscriptions: bool,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct SyncResult {
    pub message_bytes: usize,
    pub catchup: Vec<CatchupRun>,
    pub lag: Vec<LagRun>,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct CatchupRun {
    pub streams: usize,
    /// `DS_SYNC__MAX_CONNECTIONS`; `None`: ds-sync's default.
    pub max_connections: Option<usize>,
    pub rows: u64,
    pub secs: f64,
    pub rows_per_sec: f64,
    /// The worker's user + system CPU per row, in µs.
    pub worker_cpu_us_per_row: f64,
}

#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct LagRun {
    pub streams: usize,
    pub appends_per_sec: u32,
    pub secs: f64,
    /// Messages appended and seen in Postgres (all of them, or the run failed).
    pub rows: u64,
    /// Append sent → row seen committed, in µs.
    pub lag: Latency,
}

pub async fn run(server: &Server, run_id: &str, plan: &Plan) -> anyhow::Result<SyncResult> {
    let mut result = SyncResult {
        message_bytes: MESSAGE_BYTES,
        catchup: Vec::new(),
        lag: Vec::new(),
    };
    let catchups = [
        (1, plan.one_stream_rows, None),
        (plan.many_streams, plan.rows_per_stream, None),
        (
            plan.many_streams,
            plan.rows_per_stream,
            Some(plan.many_streams),
        ),
    ];
    for (streams, per_stream, connections) in catchups {
        eprintln!(
            "  sync: catch-up, {streams} stream(s) x {per_stream} messages, connections {}",
            connections.map_or("default".to_owned(), |c| c.to_string())
        );
        result.catchup.push(
            catchup(server, run_id, plan, streams, per_stream, connections)
                .await
                .with_context(|| format!("catch-up on {streams} streams"))?,
        );
    }
    for &streams in &plan.lag_streams {
        eprintln!(
            "  sync: lag, {streams} streams at {} appends/s",
            plan.lag_rate
        );
        result.lag.push(
            lag(server, run_id, plan, streams)
                .await
                .with_context(|| format!("lag on {streams} streams"))?,
        );
    }
    Ok(result)
}

/// One 100-byte JSON message: its sequence number, the send time in µs since the epoch (0 for
/// messages nobody times), and padding.
fn message(i: u64, sent_us: i64) -> String {
    let head = format!("{{\"i\":{i},\"t\":{sent_us},\"p\":\"");
    let pad = MESSAGE_BYTES.saturating_sub(head.len() + 2);
    format!("{head}{}\"}}", "x".repeat(pad))
}

fn unix_micros() -> i64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map_or(0, |d| i64::try_from(d.as_micros()).unwrap_or(i64::MAX))
}

async fn catchup(
    server: &Server,
    run_id: &str,
    plan: &Plan,
    streams: usize,
    per_stream: usize,
    connections: Option<usize>,
) -> anyhow::Result<CatchupRun> {
    let tag = format!(
        "catchup-{streams}x{per_stream}-c{}",
        connections.map_or("default".to_owned(), |c| c.to_string())
    );
    let paths: Vec<String> = (0..streams)
        .map(|n| format!("/bench-{run_id}/sync-{tag}/{n:05}"))
        .collect();
    let mut conn = server.connect().await?;
    let mut next = 0u64;
    for path in &paths {
        conn.create_stream(path, CONTENT_TYPE).await?;
        let uri: Uri = path.parse()?;
        let mut left = per_stream;
        while left > 0 {
            let n = left.min(LOAD_BATCH);
            let body: Vec<String> = (0..n)
                .map(|_| {
                    next += 1;
                    message(next, 0)
                })
                .collect();
            let status = conn
                .append(
                    uri.clone(),
                    CONTENT_TYPE,
                    Bytes::from(format!("[{}]", body.join(","))),
                )
                .await?;
            if !status.is_success() {
                bail!("loading {path}: append answered {status}");
            }
            left -= n;
        }
    }
    let mut tails = Vec::with_capacity(streams);
    for path in &paths {
        tails.push(conn.tail_offset(path).await?);
    }

    let db = Database::create(&plan.database_url, &format!("ds_bench_{tag}")).await?;
    let measured = async {
        migrate(plan, &db).await?;
        let pg = db.connect().await?;
        let mut env = Vec::new();
        if let Some(c) = connections {
            env.push(("DS_SYNC__MAX_CONNECTIONS", c.to_string()));
        }
        let started = Instant::now();
        let mut worker = Worker::start(plan, &db, server, &paths, &env, &tag)?;
        let deadline = started + plan.timeout;
        loop {
            let caught_up: i64 = pg
                .query_one(
                    "SELECT count(*) FROM ds_checkpoints c \
                     JOIN unnest($1::text[], $2::text[]) AS t(s, o) \
                       ON c.stream = t.s AND c.next_offset = t.o",
                    &[&paths, &tails],
                )
                .await?
                .get(0);
            if usize::try_from(caught_up).is_ok_and(|n| n == streams) {
                break;
            }
            worker.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{caught_up} of {streams} streams caught up after {:?}; log {}",
                    plan.timeout,
                    worker.log.display()
                );
            }
            tokio::time::sleep(CATCHUP_POLL).await;
        }
        let secs = started.elapsed().as_secs_f64();
        let cpu = worker.cpu_time()?;
        worker.stop().await;
        let rows: i64 = pg
            .query_one("SELECT count(*) FROM ds_messages", &[])
            .await?
            .get(0);
        let rows = u64::try_from(rows).unwrap_or(0);
        let expected = (streams * per_stream) as u64;
        if rows != expected {
            bail!("{rows} rows mirrored, {expected} appended");
        }
        Ok(CatchupRun {
            streams,
            max_connections: connections,
            rows,
            secs,
            rows_per_sec: rows as f64 / secs,
            worker_cpu_us_per_row: cpu.as_secs_f64() * 1e6 / rows as f64,
        })
    }
    .await;
    db.drop().await;
    measured
}

async fn lag(server: &Server, run_id: &str, plan: &Plan, streams: usize) -> anyhow::Result<LagRun> {
    let tag = format!("lag-{streams}-{}", plan.lag_rate);
    let paths: Vec<String> = (0..streams)
        .map(|n| format!("/bench-{run_id}/sync-{tag}/{n:05}"))
        .collect();
    let mut conn = server.connect().await?;
    for path in &paths {
        conn.create_stream(path, CONTENT_TYPE).await?;
    }
    let db = Database::create(&plan.database_url, &format!("ds_bench_{tag}")).await?;
    let measured = async {
        migrate(plan, &db).await?;
        let pg = db.connect().await?;
        let mut worker = Worker::start(plan, &db, server, &paths, &[], &tag)?;

        // Warm-up: one untimed message per stream, seen in Postgres, so that every stream is
        // followed live before the clock starts.
        for (n, path) in paths.iter().enumerate() {
            let status = conn
                .append(
                    path.parse()?,
                    CONTENT_TYPE,
                    Bytes::from(message(n as u64, 0)),
                )
                .await?;
            if !status.is_success() {
                bail!("warm-up append to {path} answered {status}");
            }
        }
        let deadline = Instant::now() + plan.timeout;
        loop {
            let rows: i64 = pg
                .query_one("SELECT count(*) FROM ds_messages", &[])
                .await?
                .get(0);
            if usize::try_from(rows).is_ok_and(|n| n == streams) {
                break;
            }
            worker.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "warm-up: {rows} of {streams} rows mirrored; log {}",
                    worker.log.display()
                );
            }
            tokio::time::sleep(CATCHUP_POLL).await;
        }

        let total = (f64::from(plan.lag_rate) * plan.lag_for.as_secs_f64()).round() as u64;
        let interval = Duration::from_secs_f64(1.0 / f64::from(plan.lag_rate.max(1)));
        let mut appender = Some({
            let paths = paths.clone();
            tokio::spawn(async move {
                let mut tick = tokio::time::interval(interval);
                // Late ticks are caught up, so the rate holds on average.
                tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Burst);
                for i in 0..total {
                    tick.tick().await;
                    let path = &paths[(i as usize) % paths.len()];
                    let body = Bytes::from(message(i, unix_micros()));
                    let status = conn.append(path.parse()?, CONTENT_TYPE, body).await?;
                    if !status.is_success() {
                        bail!("append to {path} answered {status}");
                    }
                }
                anyhow::Ok(())
            })
        });

        // Per stream, the key of the last row seen: a stream's rows commit in key order.
        let mut marks: Vec<(String, i32)> = vec![("-1".to_owned(), -1); streams];
        let mut lags: Vec<u32> = Vec::with_capacity(total as usize);
        let started = Instant::now();
        let deadline = started + plan.lag_for + plan.timeout;
        let mut poll = tokio::time::interval(LAG_POLL);
        poll.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Skip);
        while (lags.len() as u64) < total {
            poll.tick().await;
            let offsets: Vec<&str> = marks.iter().map(|m| m.0.as_str()).collect();
            let idxs: Vec<i32> = marks.iter().map(|m| m.1).collect();
            let rows = pg
                .query(
                    "SELECT m.stream, m.stream_offset, m.idx, (m.data->>'t')::bigint \
                     FROM ds_messages m \
                     JOIN unnest($1::text[], $2::text[], $3::int4[]) AS w(s, o, i) \
                       ON m.stream = w.s \
                     WHERE (m.stream_offset, m.idx) > (w.o, w.i) \
                     ORDER BY 1, 2, 3",
                    &[&paths, &offsets, &idxs],
                )
                .await?;
            let now = unix_micros();
            for row in &rows {
                let (stream, offset, idx, sent): (String, String, i32, i64) =
                    (row.get(0), row.get(1), row.get(2), row.get(3));
                if sent > 0 {
                    lags.push(u32::try_from((now - sent).max(0)).unwrap_or(u32::MAX));
                }
                if let Some(n) = paths.iter().position(|p| *p == stream) {
                    marks[n] = (offset, idx);
                }
            }
            if let Some(done) = appender.take_if(|a| a.is_finished()) {
                done.await??;
            }
            worker.check_running()?;
            if Instant::now() > deadline {
                bail!(
                    "{} of {total} appended messages seen in Postgres; log {}",
                    lags.len(),
                    worker.log.display()
                );
            }
        }
        if let Some(appender) = appender {
            appender.await??;
        }
        worker.stop().await;
        Ok(LagRun {
            streams,
            appends_per_sec: plan.lag_rate,
            secs: plan.lag_for.as_secs_f64(),
            rows: lags.len() as u64,
            lag: summarize_us(&mut lags),
        })
    }
    .await;
    db.drop().await;
    measured
}

/// A database of its own for one measurement.
struct Database {
    admin_url: String,
    name: String,
    url: String,
}

impl Database {
    async fn create(admin_url: &str, tag: &str) -> anyhow::Result<Database> {
        let name: String = format!("{tag}_{}", std::process::id())
            .chars()
            .map(|c| if c.is_ascii_alphanumeric() { c } else { '_' })
            .collect::<String>()
            .to_ascii_lowercase();
        let admin = connect(admin_url).await?;
        // Left behind by an interrupted run with the same pid, if at all. One statement per
        // call: several would run in one transaction, which DROP DATABASE refuses.
        admin
            .batch_execute(&format!("DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
            .await
            .with_context(|| format!("DROP DATABASE {name}"))?;
        admin
            .batch_execute(&format!("CREATE DATABASE {name}"))
            .await
            .with_context(|| format!("CREATE DATABASE {name} (the user needs CREATEDB)"))?;
        Ok(Database {
            admin_url: admin_url.to_owned(),
            url: with_database(admin_url, &name)?,
            name,
        })
    }

    async fn connect(&self) -> anyhow::Result<tokio_postgres::Client> {
        connect(&self.url).await
    }

    /// Drops the database; a failure only leaves it behind, so it is reported, not fatal.
    async fn drop(self) {
        let dropped = async {
            connect(&self.admin_url)
                .await?
                .batch_execute(&format!(
                    "DROP DATABASE IF EXISTS {} WITH (FORCE)",
                    self.name
                ))
                .await?;
            anyhow::Ok(())
        };
        if let Err(e) = dropped.await {
            eprintln!("  sync: could not drop database {}: {e:#}", self.name);
        }
    }
}

async fn connect(url: &str) -> anyhow::Result<tokio_postgres::Client> {
    let (client, connection) = tokio_postgres::connect(url, tokio_postgres::NoTls)
        .await
        .with_context(|| format!("connect to postgres at {url}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    Ok(client)
}

/// `url` with its database name replaced by `name` (the query string, if any, kept).
fn with_database(url: &str, name: &str) -> anyhow::Result<String> {
    let (base, query) = url
        .split_once('?')
        .map_or((url, None), |(b, q)| (b, Some(q)));
    let Some(authority_at) = base.find("://").map(|i| i + 3) else {
        bail!("DATABASE_URL is not a postgres:// URL: {url}");
    };
    let authority_end = base[authority_at..]
        .find('/')
        .map_or(base.len(), |i| authority_at + i);
    let mut out = format!("{}/{name}", &base[..authority_end]);
    if let Some(query) = query {
        out.push('?');
        out.push_str(query);
    }
    Ok(out)
}

async fn migrate(plan: &Plan, db: &Database) -> anyhow::Result<()> {
    let output = tokio::process::Command::new(&plan.sync_bin)
        .arg("migrate")
        .env("DATABASE_URL", &db.url)
        .env("RUST_LOG", "warn")
        .output()
        .await
        .with_context(|| format!("run {} migrate", plan.sync_bin.display()))?;
    if !output.status.success() {
        bail!(
            "ds-sync migrate failed ({}): {}",
            output.status,
            String::from_utf8_lossy(&output.stderr)
        );
    }
    Ok(())
}

/// `ds-sync run` as a child process.
struct Worker {
    child: tokio::process::Child,
    process: Process,
    log: PathBuf,
}

impl Worker {
    fn start(
        plan: &Plan,
        db: &Database,
        server: &Server,
        paths: &[String],
        env: &[(&str, String)],
        tag: &str,
    ) -> anyhow::Result<Worker> {
        let log = plan.log_dir.join(format!("ds-sync-{tag}.log"));
        let out =
            std::fs::File::create(&log).with_context(|| format!("create {}", log.display()))?;
        let err = out.try_clone()?;
        let mut cmd = tokio::process::Command::new(&plan.sync_bin);
        cmd.arg("run");
        // Only what this measurement sets, whatever the caller's environment holds.
        for (key, _) in std::env::vars() {
            if key.starts_with("DS_SYNC__") {
                cmd.env_remove(key);
            }
        }
        cmd.env("DATABASE_URL", &db.url)
            .env("DS_SYNC__SERVER_URL", format!("http://{}", server.addr))
            .env("DS_SYNC__STREAMS", paths.join(","))
            .env("DS_SYNC__HEALTH_ADDR", "")
            .env("DS_SYNC__STATS_INTERVAL", "5s")
            .env("RUST_LOG", "info")
            .envs(env.iter().map(|(k, v)| (*k, v.as_str())))
            .stdin(Stdio::null())
            .stdout(out)
            .stderr(err)
            .kill_on_drop(true);
        if plan.subscriptions {
            // One per worker: measurements differ in streams (a subscription's configuration),
            // and a killed worker's lease would keep the next one waiting.
            let nanos = SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .unwrap_or_default()
                .as_nanos();
            let id: String = format!("bench-{tag}-{nanos}")
                .chars()
                .map(|c| {
                    if c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.') {
                        c
                    } else {
                        '-'
                    }
                })
                .collect();
            cmd.env("DS_SYNC__SUBSCRIPTION", id);
        } else {
            cmd.env("DS_SYNC__SUBSCRIPTION", "");
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("start {}", plan.sync_bin.display()))?;
        let pid = child
            .id()
            .ok_or_else(|| anyhow::anyhow!("ds-sync exited at once; log {}", log.display()))?;
        Ok(Worker {
            child,
            process: Process::server(pid),
            log,
        })
    }

    fn check_running(&mut self) -> anyhow::Result<()> {
        if let Some(status) = self.child.try_wait()? {
            bail!("ds-sync exited with {status}; log {}", self.log.display());
        }
        Ok(())
    }

    fn cpu_time(&self) -> anyhow::Result<Duration> {
        self.process.cpu_time()
    }

    async fn stop(mut self) {
        let _ = self.child.kill().await;
    }
}

/// Where workers' logs go: beside the results file.
pub fn log_dir_for(results: &Path) -> PathBuf {
    results
        .parent()
        .filter(|p| !p.as_os_str().is_empty())
        .map_or_else(|| PathBuf::from("."), Path::to_path_buf)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn messages_are_exactly_100_bytes_of_json() {
        for (i, t) in [(0, 0), (1, unix_micros()), (9_999_999, i64::MAX / 2)] {
            let m = message(i, t);
            assert_eq!(m.len(), MESSAGE_BYTES, "{m}");
            let v: serde_json::Value = serde_json::from_str(&m).unwrap_or_default();
            assert_eq!(v["t"].as_i64(), Some(t), "{m}");
        }
    }

    #[test]
    fn database_name_replaces_the_path_and_keeps_the_query() {
        assert_eq!(
            with_database("postgres://u@h:5432/test?sslmode=disable", "x").ok(),
            Some("postgres://u@h:5432/x?sslmode=disable".to_owned())
        );
        assert_eq!(
            with_database("postgres://u@h", "x").ok(),
            Some("postgres://u@h/x".to_owned())
        );
        assert!(with_database("h:5432/test", "x").is_err());
    }
}
