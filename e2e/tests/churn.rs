//! Churn through the hot buffer (issue 21): short-lived streams, one per chat session (create,
//! a few appends, delete once the mirror holds them), against ds-server in memory mode with
//! `DS_RETENTION__MODE=acked` and a 1 MB budget, with ds-sync following their prefix as a
//! subscriber (it discovers them through the registry, mirrors them, acks what Postgres
//! committed, and the server releases it). It proves that:
//!
//! - every stream that received data is in Postgres exactly once (its messages in order, in its
//!   first incarnation), and its checkpoint says it was deleted;
//! - no append is refused: the budget holds only what ds-sync has not committed yet;
//! - the bookkeeping does not grow with the number of streams that lived: the server's streams,
//!   the subscription's links, the registry's retained events and the wake stream come back to
//!   where they were before the churn, and ds-sync's followed streams and `/status` entries too.
//!
//! A session deletes its stream once `Stream-Earliest-Offset` reaches its tail (everything
//! released, so acked by ds-sync, so committed in Postgres): data deleted before the mirror read
//! it is gone with the stream, by design (README, ds-sync *Limits*).
//!
//! Memory is sampled over the run (RSS of both processes from `/proc`, and the counters above)
//! and printed as `churn-sample` lines. `DS_CHURN_CYCLES` (default 3 000) and
//! `DS_CHURN_CONCURRENCY` (default 32) scale it, `DS_CHURN_STORAGE` runs it in another storage
//! mode; `bench/churn.sh` runs the long form (a million cycles, release builds) and README
//! *Retention* has its numbers.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::{Duration, Instant};

use anyhow::Context;
use ds_e2e::metrics;
use ds_e2e::postgres::{Postgres, connect};
use ds_e2e::server::{DsServer, ServerOptions};
use ds_e2e::sync::{DsSync, SyncOptions};
use ds_e2e::wait::wait_until;
use futures::StreamExt;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};

const PREFIX: &str = "/v1/stream/chat/";
const JSON: &str = "application/json";
/// ds-sync's subscription (its default id) and wake stream.
const SUBSCRIPTION: &str = "/__ds/subscriptions/ds-sync";
const WAKE_STREAM: &str = "/_ds-sync/ds-sync/wake";
const REGISTRY: &str = "/_ds/registry";
/// The memory budget: small, so that anything the churn leaves behind in it would show.
const BUDGET_BYTES: u64 = 1_000_000;
/// How many samples the run takes (at evenly spaced cycle counts).
const SAMPLES: u64 = 20;
/// Deadlines for conditions; generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(120);
/// ds-sync's lease: long, so that a loaded machine's slow heartbeat never hands the lease over
/// (which would write a wake event) in the middle of the churn.
const LEASE_TTL: &str = "60s";
/// ds-sync's `/status` keeps listing this many ended streams (`ds_sync::status::ENDED_KEPT`).
const ENDED_KEPT: usize = 1_000;

fn env_u64(name: &str, default: u64) -> u64 {
    match std::env::var(name) {
        Ok(value) => value
            .parse()
            .unwrap_or_else(|_| panic!("{name}={value:?} is not a number")),
        Err(_) => default,
    }
}

/// How many messages session `i` appends (0 to 3: a quarter of the sessions never write).
fn messages_of(i: u64) -> u64 {
    i % 4
}

/// Message `n` of session `i`.
fn message(i: u64, n: u64) -> Value {
    json!({ "session": i, "n": n, "text": "a reply of a chat session, a few words long" })
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// Counts shared by the sessions.
#[derive(Default)]
struct Tally {
    /// The next session number to run.
    next: AtomicU64,
    done: AtomicU64,
    appends: AtomicU64,
    /// Appends answered anything but success (503 backpressure included).
    refused: AtomicU64,
}

/// One chat session: create, append, wait until the mirror holds everything, delete.
async fn session(client: &Client, base: &str, i: u64, tally: &Tally) -> anyhow::Result<()> {
    let url = format!("{base}{PREFIX}{i}");
    let response = client
        .put(&url)
        .header("content-type", JSON)
        .send()
        .await
        .with_context(|| format!("PUT {url}"))?;
    anyhow::ensure!(
        response.status() == StatusCode::CREATED,
        "PUT {url}: {}",
        response.status()
    );
    let mut tail = None;
    for n in 0..messages_of(i) {
        loop {
            let response = client
                .post(&url)
                .header("content-type", JSON)
                .body(message(i, n).to_string())
                .send()
                .await
                .with_context(|| format!("POST {url}"))?;
            if response.status().is_success() {
                tally.appends.fetch_add(1, Ordering::Relaxed);
                tail = header(&response, "stream-next-offset");
                break;
            }
            tally.refused.fetch_add(1, Ordering::Relaxed);
            anyhow::ensure!(
                response.status() == StatusCode::SERVICE_UNAVAILABLE,
                "POST {url}: {} {}",
                response.status(),
                response.text().await.unwrap_or_default()
            );
            // Backpressure says when to come back (the test fails on it anyway, at the end).
            tokio::time::sleep(Duration::from_secs(1)).await;
        }
    }
    if let Some(tail) = tail {
        wait_until(
            &format!("{url} released to its tail {tail}"),
            DEADLINE,
            || async {
                let response = client.head(&url).send().await?;
                Ok(
                    (header(&response, "stream-earliest-offset").as_deref() == Some(&tail))
                        .then_some(()),
                )
            },
        )
        .await?;
    }
    let response = client
        .delete(&url)
        .send()
        .await
        .with_context(|| format!("DELETE {url}"))?;
    anyhow::ensure!(
        response.status() == StatusCode::NO_CONTENT,
        "DELETE {url}: {}",
        response.status()
    );
    tally.done.fetch_add(1, Ordering::Relaxed);
    Ok(())
}

/// Resident set size of a process, from `/proc/<pid>/status`.
fn rss_bytes(pid: Option<u32>) -> u64 {
    let Some(pid) = pid else { return 0 };
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|status| {
            status
                .lines()
                .find_map(|line| line.strip_prefix("VmRSS:"))
                .and_then(|kb| kb.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(0, |kb| kb * 1024)
}

/// What the run watches for growth.
#[derive(Debug, Clone, Copy, Default)]
struct Sample {
    server_rss: u64,
    sync_rss: u64,
    /// `ds_streams`: streams the server holds.
    streams: f64,
    /// `ds_memory_budget_used_bytes`.
    budget_used: f64,
    /// Links of ds-sync's subscription.
    links: usize,
    /// Bytes the registry holds (its tail less its earliest retained offset).
    registry_held: u64,
    /// The wake stream's tail (bytes ever written to it).
    wake_bytes: u64,
    /// `ds_sync_streams_followed`.
    followed: f64,
    /// Entries of ds-sync's `/status`.
    status_entries: usize,
}

/// The byte position of an offset (`{seq}_{pos}`).
fn position(offset: &str) -> u64 {
    offset
        .rsplit('_')
        .next()
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

struct Watch {
    client: Client,
    base: String,
}

impl Watch {
    async fn head(&self, path: &str) -> anyhow::Result<(u64, u64)> {
        let response = self
            .client
            .head(format!("{}{path}", self.base))
            .send()
            .await?;
        anyhow::ensure!(
            response.status() == StatusCode::OK,
            "HEAD {path}: {}",
            response.status()
        );
        let tail = position(&header(&response, "stream-next-offset").unwrap_or_default());
        let earliest = header(&response, "stream-earliest-offset").map_or(0, |o| position(&o));
        Ok((earliest, tail))
    }

    async fn sample(&self, server: &DsServer, sync: &DsSync) -> anyhow::Result<Sample> {
        let server_metrics = server.metrics().await?;
        let sync_metrics = sync.metrics().await?;
        let subscription: Value = self
            .client
            .get(format!("{}{SUBSCRIPTION}", self.base))
            .send()
            .await?
            .json()
            .await?;
        let (registry_earliest, registry_tail) = self.head(REGISTRY).await?;
        let (_, wake_bytes) = self.head(WAKE_STREAM).await?;
        let status: Value = sync.status().await?;
        Ok(Sample {
            server_rss: rss_bytes(server.pid()),
            sync_rss: rss_bytes(sync.pid()),
            streams: metrics::value(&server_metrics, "ds_streams")?,
            budget_used: metrics::value(&server_metrics, "ds_memory_budget_used_bytes")?,
            links: subscription["streams"].as_array().map_or(0, Vec::len),
            registry_held: registry_tail - registry_earliest,
            wake_bytes,
            followed: metrics::value(&sync_metrics, "ds_sync_streams_followed")?,
            status_entries: status["streams"].as_object().map_or(0, |s| s.len()),
        })
    }
}

fn print_sample(cycles: u64, started: Instant, s: &Sample) {
    eprintln!(
        "churn-sample cycles={cycles} secs={:.1} server_rss_kb={} sync_rss_kb={} streams={} \
         budget_used={} links={} registry_held={} wake_bytes={} followed={} status_entries={}",
        started.elapsed().as_secs_f64(),
        s.server_rss / 1024,
        s.sync_rss / 1024,
        s.streams,
        s.budget_used,
        s.links,
        s.registry_held,
        s.wake_bytes,
        s.followed,
        s.status_entries
    );
}

/// Every row mirrored under the prefix, streamed in key order, checked against what the sessions
/// wrote: returns how many streams had rows.
async fn check_mirror(pg: &tokio_postgres::Client, cycles: u64) -> anyhow::Result<u64> {
    let rows = pg
        .query_raw(
            "SELECT stream, incarnation, data::text FROM ds_messages \
             WHERE stream LIKE '/v1/stream/chat/%' ORDER BY stream, incarnation, stream_offset, idx",
            std::iter::empty::<&(dyn tokio_postgres::types::ToSql + Sync)>(),
        )
        .await?;
    futures::pin_mut!(rows);
    // The stream being re-assembled: its session and the messages seen so far.
    let mut current: Option<(u64, u64)> = None;
    let mut streams = 0u64;
    let finish = |current: Option<(u64, u64)>| -> anyhow::Result<()> {
        if let Some((i, seen)) = current {
            anyhow::ensure!(
                seen == messages_of(i),
                "session {i}: {seen} messages mirrored of {}",
                messages_of(i)
            );
        }
        Ok(())
    };
    while let Some(row) = rows.next().await {
        let row = row?;
        let stream: &str = row.get(0);
        let incarnation: i32 = row.get(1);
        let data: Option<&str> = row.get(2);
        let i: u64 = stream
            .strip_prefix(PREFIX)
            .and_then(|n| n.parse().ok())
            .with_context(|| format!("row of an unexpected stream {stream}"))?;
        anyhow::ensure!(i < cycles, "row of a session never run: {stream}");
        anyhow::ensure!(incarnation == 1, "{stream}: incarnation {incarnation}");
        if current.is_none_or(|(c, _)| c != i) {
            finish(current)?;
            current = Some((i, 0));
            streams += 1;
        }
        let Some((_, seen)) = current.as_mut() else {
            unreachable!("set above")
        };
        let got: Value = serde_json::from_str(data.context("a JSON row without data")?)?;
        anyhow::ensure!(
            got == message(i, *seen),
            "{stream}: row {seen} is {got}, expected {}",
            message(i, *seen)
        );
        *seen += 1;
    }
    finish(current)?;
    Ok(streams)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_churn_of_short_lived_streams_is_mirrored_exactly_once_and_leaves_nothing_behind() {
    let cycles = env_u64("DS_CHURN_CYCLES", 3_000);
    let concurrency = env_u64("DS_CHURN_CONCURRENCY", 32);
    // The mode the churn proof is about is memory (the budget); the durable modes may be tried.
    let mode = std::env::var("DS_CHURN_STORAGE").unwrap_or_else(|_| "memory".to_owned());
    let work = tempfile::Builder::new()
        .prefix("ds-e2e-churn-")
        .disable_cleanup(std::env::var_os("DS_E2E_KEEP_WORK").is_some())
        .tempdir()
        .expect("work dir");
    let quiet = ("RUST_LOG".to_owned(), "warn".to_owned());
    let server = DsServer::start(
        ServerOptions {
            storage_mode: mode.clone(),
            tls: false,
            extra_env: vec![
                ("DS_RETENTION__MODE".to_owned(), "acked".to_owned()),
                (
                    "DS_LIMITS__MAX_MEMORY_BYTES".to_owned(),
                    BUDGET_BYTES.to_string(),
                ),
                quiet.clone(),
            ],
        },
        work.path(),
    )
    .await
    .expect("ds-server");
    let postgres = Postgres::start().await.expect("postgres");
    let mut sync = DsSync::start(
        &SyncOptions {
            database_url: postgres.url.clone(),
            server_url: server.base_url(),
            streams: format!("{PREFIX}*"),
            extra_env: vec![
                ("DS_SYNC__LEASE_TTL".to_owned(), LEASE_TTL.to_owned()),
                quiet,
            ],
        },
        work.path(),
    )
    .await
    .expect("ds-sync");
    let logs = |server: &DsServer, sync: &DsSync| {
        format!(
            "--- ds-server ---\n{}\n--- ds-sync ---\n{}",
            server.log_tail(40),
            sync.log_tail(40)
        )
    };
    let client = Client::builder()
        .timeout(Duration::from_secs(30))
        .build()
        .expect("client");
    let base = server.base_url();
    let watch = Watch {
        client: client.clone(),
        base: base.clone(),
    };
    // ds-sync holds its lease, has linked the registry and follows it: the state before any
    // session.
    wait_until(
        "ds-sync's subscription, wake stream and registry follower",
        DEADLINE,
        || async {
            Ok(watch
                .sample(&server, &sync)
                .await
                .ok()
                .filter(|s| s.links == 1 && s.followed == 1.0))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&server, &sync)));
    let before = watch.sample(&server, &sync).await.expect("sample");
    let started = Instant::now();
    print_sample(0, started, &before);

    let tally = Arc::new(Tally::default());
    let mut sessions = tokio::task::JoinSet::new();
    for _ in 0..concurrency {
        let (client, base, tally) = (client.clone(), base.clone(), tally.clone());
        sessions.spawn(async move {
            loop {
                let i = tally.next.fetch_add(1, Ordering::Relaxed);
                if i >= cycles {
                    return Ok::<(), anyhow::Error>(());
                }
                session(&client, &base, i, &tally).await?;
            }
        });
    }
    let mut samples = vec![before];
    let mut next_sample = cycles / SAMPLES;
    while !sessions.is_empty() {
        // Sampling points are cycle counts, checked a few times a second; nothing waits on time.
        tokio::select! {
            joined = sessions.join_next() => {
                if let Some(outcome) = joined {
                    outcome
                        .expect("session task")
                        .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&server, &sync)));
                }
            }
            () = tokio::time::sleep(Duration::from_millis(200)) => {}
        }
        let done = tally.done.load(Ordering::Relaxed);
        if done >= next_sample && done < cycles {
            let sample = watch.sample(&server, &sync).await.expect("sample");
            print_sample(done, started, &sample);
            samples.push(sample);
            next_sample += (cycles / SAMPLES).max(1);
        }
    }
    let churn_secs = started.elapsed().as_secs_f64();

    // ds-sync has every delete: each session's checkpoint says so.
    let pg = connect(&postgres.url).await.expect("connect");
    wait_until(
        "every session's delete in ds_checkpoints",
        DEADLINE,
        || async {
            let row = pg
                .query_one(
                    "SELECT count(*) FILTER (WHERE deleted), count(*) FROM ds_checkpoints \
                 WHERE stream LIKE '/v1/stream/chat/%'",
                    &[],
                )
                .await?;
            let (deleted, all): (i64, i64) = (row.get(0), row.get(1));
            Ok((deleted as u64 == cycles && all as u64 == cycles).then_some(()))
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e:#}\n{}", logs(&server, &sync)));
    // Quiet again: the links of deleted streams are gone, the registry acked to its tail, no
    // follower left.
    let after = wait_until("the bookkeeping back to its start", DEADLINE, || async {
        let s = watch.sample(&server, &sync).await?;
        Ok(
            (s.links == before.links && s.registry_held == 0 && s.followed == before.followed)
                .then_some(s),
        )
    })
    .await;
    let after = match after {
        Ok(after) => after,
        Err(e) => {
            let now = watch.sample(&server, &sync).await.ok();
            panic!(
                "{e:#}\nbefore {before:?}\nnow {now:?}\n{}",
                logs(&server, &sync)
            )
        }
    };
    print_sample(cycles, started, &after);
    samples.push(after);
    sync.ensure_running().expect("ds-sync alive");

    let appends = tally.appends.load(Ordering::Relaxed);
    let expected_appends: u64 = (0..cycles).map(messages_of).sum();
    assert_eq!(appends, expected_appends);
    assert_eq!(tally.refused.load(Ordering::Relaxed), 0, "appends refused");
    let mirrored = check_mirror(&pg, cycles).await.expect("mirror");
    let with_data = (0..cycles).filter(|&i| messages_of(i) > 0).count() as u64;
    assert_eq!(mirrored, with_data, "streams with rows");

    // Nothing grows with the number of streams that lived.
    assert_eq!(after.streams, before.streams, "streams the server holds");
    if mode == "memory" {
        assert_eq!(
            after.budget_used, 0.0,
            "budget used once every session is gone"
        );
    }
    assert_eq!(after.links, before.links, "subscription links");
    assert_eq!(
        after.wake_bytes, before.wake_bytes,
        "wake events (one per lease handover, none here)"
    );
    assert!(
        after.status_entries <= ENDED_KEPT + 1,
        "ds-sync /status lists {} streams",
        after.status_entries
    );
    let max = |f: fn(&Sample) -> u64| samples.iter().map(f).max().unwrap_or(0);
    eprintln!(
        "churn ({mode}): {cycles} cycles ({concurrency} at a time) in {churn_secs:.1} s \
         ({:.0}/s), {appends} appends, {with_data} streams mirrored; max RSS server {} KB \
         (start {} KB, end {} KB), ds-sync {} KB (start {} KB, end {} KB); max registry held {} B, \
         max links {}, max followed {}",
        cycles as f64 / churn_secs,
        max(|s| s.server_rss) / 1024,
        before.server_rss / 1024,
        after.server_rss / 1024,
        max(|s| s.sync_rss) / 1024,
        before.sync_rss / 1024,
        after.sync_rss / 1024,
        max(|s| s.registry_held),
        max(|s| s.links as u64),
        max(|s| s.followed as u64),
    );
}
