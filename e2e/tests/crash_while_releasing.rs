//! kill -9 of ds-server while it releases data, through HTTP (issue 21's crash proof): the real
//! binary in `file-durable` and in `acid`, with `DS_RETENTION__MODE=acked` and small log
//! segments (so that releases delete segments and write live state forward), under write load
//! from idempotent producers, with a subscriber that reads every stream, checks what it read and
//! acks it through the subscription API, so that the server keeps releasing. The server is killed
//! repeatedly, each time after releases moved every stream (plus a random moment, to land inside
//! one), and restarted on the same data dir. Throughout, and after each restart:
//!
//! - nothing acknowledged is lost: every append the server acknowledged is still there (the tail
//!   is at least its end) and everything from the earliest retained offset to it reads back as
//!   written, exactly once (each byte is a function of the stream and its position, so a lost,
//!   doubled or misplaced append shows);
//! - nothing unacknowledged is released: the earliest retained offset never passes what the
//!   subscription acked;
//! - acked offsets never move backwards: the subscription's stored `acked_offset` is at least
//!   every ack the server answered 200;
//! - a released range never reappears: `Stream-Earliest-Offset` never decreases (watched by a
//!   reader that HEADs every stream over and over, across the restarts), a read below the
//!   highest earliest offset ever seen gets 410, and no offset is ever served with other bytes.
//!
//! `DS_CRASH_ROUNDS` sets the kills per mode (default 8).

mod support;

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

use anyhow::Context;
use ds_e2e::server::{DsServer, ServerOptions};
use ds_e2e::wait::wait_until;
use reqwest::{Client, StatusCode};
use serde_json::{Value, json};
use support::{BINARY, Producer, StreamClient};

const STREAMS: usize = 3;
const ROOT: &str = "/v1/stream/";
const SUBSCRIPTION: &str = "release-crash";
/// Small segments: a few hundred appends fill one, so segments are deleted (and live state
/// written forward) between kills.
const SEGMENT_BYTES: &str = "16384";
/// Appends every writer gets acknowledged after a restart before the next kill.
const PROGRESS_PER_ROUND: u64 = 20;
/// Deadlines for conditions (recovery, progress); generous for a loaded 2-core machine.
const DEADLINE: Duration = Duration::from_secs(60);

fn path(s: usize) -> String {
    format!("{ROOT}crash/{s}")
}

/// The byte every stream holds at each position: any append lost, doubled or put elsewhere,
/// and any stale byte served again, reads back wrong.
fn byte_at(s: usize, pos: u64) -> u8 {
    (pos.wrapping_mul(131) ^ (pos >> 7).wrapping_mul(29) ^ (s as u64 * 71)) as u8
}

fn offset(pos: u64) -> String {
    format!("{:016}_{pos:016}", 0)
}

fn position(offset: &str) -> anyhow::Result<u64> {
    offset
        .rsplit('_')
        .next()
        .and_then(|p| p.parse().ok())
        .with_context(|| format!("offset {offset:?}"))
}

fn header(response: &reqwest::Response, name: &str) -> Option<String> {
    response
        .headers()
        .get(name)
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

/// What the clients saw, per stream (positions).
#[derive(Default)]
struct Seen {
    /// The end of the last append the server acknowledged.
    appended: [AtomicU64; STREAMS],
    /// The highest ack the server answered 200.
    acked: [AtomicU64; STREAMS],
    /// The highest `Stream-Earliest-Offset` any response carried.
    earliest: [AtomicU64; STREAMS],
    /// Appends acknowledged, and raises of the earliest offset seen.
    appends: AtomicU64,
    releases: AtomicU64,
    /// Broken promises, for the failure message; the test fails if there is any.
    violations: std::sync::Mutex<Vec<String>>,
}

impl Seen {
    fn violation(&self, what: String) {
        eprintln!("violation: {what}");
        if let Ok(mut v) = self.violations.lock() {
            v.push(what);
        }
    }

    /// The highest earliest offset seen so far: what a request sent now must see at least.
    fn floor(&self, s: usize) -> u64 {
        self.earliest[s].load(Ordering::Acquire)
    }

    /// A response to a request sent when [`Seen::floor`] was `floor` said the stream's
    /// earliest retained offset is `earliest`. (Responses to requests on other connections
    /// may arrive in any order; only what was seen before this request was sent binds it.)
    fn earliest_is(&self, s: usize, floor: u64, earliest: u64, from: &str) {
        if earliest < floor {
            self.violation(format!(
                "{} {from}: Stream-Earliest-Offset {earliest} after {floor} was seen",
                path(s)
            ));
        }
        if self.earliest[s].fetch_max(earliest, Ordering::AcqRel) < earliest {
            self.releases.fetch_add(1, Ordering::Relaxed);
        }
    }

    /// Checks bytes served from `from`.
    fn served(&self, s: usize, from: u64, bytes: &[u8], what: &str) {
        if let Some(k) = (0..bytes.len()).find(|&k| bytes[k] != byte_at(s, from + k as u64)) {
            self.violation(format!(
                "{} {what}: byte at {} is {}, written {}",
                path(s),
                from + k as u64,
                bytes[k],
                byte_at(s, from + k as u64)
            ));
        }
    }
}

/// One idempotent producer per stream, appending 1 to 1 000 bytes at a time until `stop`.
async fn write(client: StreamClient, s: usize, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    let mut producer = Producer::new(format!("crash-writer-{s}"));
    let mut pos = 0u64;
    let mut n = 0u64;
    while !stop.load(Ordering::Relaxed) {
        let len = 1 + (n * 37 % 1000);
        let body: Vec<u8> = (pos..pos + len).map(|p| byte_at(s, p)).collect();
        if let Err(e) = producer
            .append_until_acknowledged(&client, &path(s), BINARY, &body, DEADLINE)
            .await
        {
            seen.violation(format!("writer of {}: {e:#}", path(s)));
            return;
        }
        pos += len;
        n += 1;
        seen.appended[s].store(pos, Ordering::Release);
        seen.appends.fetch_add(1, Ordering::Relaxed);
    }
}

/// The claim a subscriber holds.
#[derive(Clone)]
struct Claim {
    token: String,
    wake_id: Value,
    generation: Value,
}

fn subscription_url(base: &str) -> String {
    format!("{base}{ROOT}__ds/subscriptions/{SUBSCRIPTION}")
}

/// Reads every stream from where it got to, checks the bytes, and acks them; again and again
/// until `stop`. Failed requests (the server is down) are tried again.
async fn read_and_ack(
    http: Client,
    base: String,
    claim: Claim,
    seen: Arc<Seen>,
    stop: Arc<AtomicBool>,
) {
    let mut read = [0u64; STREAMS];
    while !stop.load(Ordering::Relaxed) {
        for (s, at) in read.iter_mut().enumerate() {
            let url = format!("{base}{}?offset={}", path(s), offset(*at));
            let floor = seen.floor(s);
            let Ok(response) = http.get(&url).send().await else {
                // Down; the loop comes back to it.
                tokio::time::sleep(Duration::from_millis(20)).await;
                continue;
            };
            if response.status() != StatusCode::OK {
                if response.status() != StatusCode::SERVICE_UNAVAILABLE {
                    seen.violation(format!("GET {url}: {}", response.status()));
                }
                continue;
            }
            if let Some(earliest) = header(&response, "stream-earliest-offset") {
                seen.earliest_is(s, floor, position(&earliest).unwrap_or(0), "catch-up read");
            }
            let Some(next) = header(&response, "stream-next-offset") else {
                seen.violation(format!("GET {url}: no Stream-Next-Offset"));
                continue;
            };
            let Ok(bytes) = response.bytes().await else {
                continue;
            };
            seen.served(s, *at, &bytes, "catch-up read");
            let next = position(&next).unwrap_or(*at);
            if next != *at + bytes.len() as u64 {
                seen.violation(format!(
                    "GET {url}: {} bytes but next offset {next}",
                    bytes.len()
                ));
            }
            *at = next;
            if next <= seen.acked[s].load(Ordering::Acquire) {
                continue;
            }
            let ack = http
                .post(format!("{}/ack", subscription_url(&base)))
                .bearer_auth(&claim.token)
                .json(&json!({
                    "wake_id": claim.wake_id,
                    "generation": claim.generation,
                    "acks": [{ "stream": format!("crash/{s}"), "offset": offset(next) }],
                }))
                .send()
                .await;
            match ack {
                Ok(r) if r.status() == StatusCode::OK => {
                    seen.acked[s].fetch_max(next, Ordering::AcqRel);
                }
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {}
                Ok(r) => seen.violation(format!(
                    "ack of {} at {next}: {} {}",
                    path(s),
                    r.status(),
                    r.text().await.unwrap_or_default()
                )),
                Err(_) => {}
            }
        }
    }
}

/// HEADs every stream over and over until `stop`, across restarts: `Stream-Earliest-Offset`
/// must never go down.
async fn watch_earliest(http: Client, base: String, seen: Arc<Seen>, stop: Arc<AtomicBool>) {
    while !stop.load(Ordering::Relaxed) {
        for s in 0..STREAMS {
            let floor = seen.floor(s);
            match http.head(format!("{base}{}", path(s))).send().await {
                Ok(r) if r.status() == StatusCode::OK => {
                    let earliest = header(&r, "stream-earliest-offset")
                        .and_then(|o| position(&o).ok())
                        .unwrap_or(0);
                    seen.earliest_is(s, floor, earliest, "HEAD");
                }
                Ok(r) if r.status() == StatusCode::SERVICE_UNAVAILABLE => {}
                Ok(r) => seen.violation(format!("HEAD {}: {}", path(s), r.status())),
                Err(_) => tokio::time::sleep(Duration::from_millis(20)).await,
            }
        }
    }
}

/// The subscription's stored acked offset of each stream.
async fn stored_acks(http: &Client, base: &str) -> anyhow::Result<[u64; STREAMS]> {
    let view: Value = http
        .get(subscription_url(base))
        .send()
        .await?
        .error_for_status()?
        .json()
        .await?;
    let mut acked = [0u64; STREAMS];
    for link in view["streams"].as_array().context("no streams")? {
        let path = link["path"].as_str().context("link without path")?;
        if let Some(s) = path
            .strip_prefix("crash/")
            .and_then(|s| s.parse::<usize>().ok())
        {
            acked[s] = position(link["acked_offset"].as_str().context("no acked_offset")?)?;
        }
    }
    Ok(acked)
}

/// The checks after a restart, against what the clients saw before the kill.
async fn check_after_restart(
    http: &Client,
    base: &str,
    appended: [u64; STREAMS],
    acked: [u64; STREAMS],
    earliest_seen: [u64; STREAMS],
) -> anyhow::Result<()> {
    for s in 0..STREAMS {
        let p = path(s);
        let head = http.head(format!("{base}{p}")).send().await?;
        anyhow::ensure!(
            head.status() == StatusCode::OK,
            "HEAD {p}: {}",
            head.status()
        );
        let tail = position(&header(&head, "stream-next-offset").context("no tail")?)?;
        let earliest = header(&head, "stream-earliest-offset")
            .map(|o| position(&o))
            .transpose()?
            .unwrap_or(0);
        anyhow::ensure!(
            earliest >= earliest_seen[s],
            "{p}: released range reappeared: earliest {earliest} after {} was seen",
            earliest_seen[s]
        );
        // Asked after the HEAD: a release needs its ack stored first.
        let stored = stored_acks(http, base).await?[s];
        anyhow::ensure!(
            stored >= acked[s],
            "{p}: stored ack {stored} is behind the ack answered 200 at {}",
            acked[s]
        );
        anyhow::ensure!(
            earliest <= stored,
            "{p}: released to {earliest}, past what was acked ({stored})"
        );
        anyhow::ensure!(
            tail >= appended[s],
            "{p}: tail {tail} lost acknowledged appends up to {}",
            appended[s]
        );
        if earliest_seen[s] > 0 {
            let below = offset(earliest_seen[s] - 1);
            let r = http.get(format!("{base}{p}?offset={below}")).send().await?;
            anyhow::ensure!(
                r.status() == StatusCode::GONE,
                "{p}: a read at released {below} got {}",
                r.status()
            );
        }
        // Everything retained that was acknowledged reads back as written.
        let mut at = earliest;
        while at < appended[s] {
            let r = http
                .get(format!("{base}{p}?offset={}", offset(at)))
                .send()
                .await?;
            if r.status() == StatusCode::GONE {
                // Released meanwhile (the subscriber goes on acking): carry on from the new
                // start, which must have moved forward and stay within the acks.
                let moved = position(
                    &header(&r, "stream-earliest-offset")
                        .context("410 without Stream-Earliest-Offset")?,
                )?;
                anyhow::ensure!(moved > at, "{p} at {at}: 410 naming earliest {moved}");
                at = moved;
                continue;
            }
            anyhow::ensure!(r.status() == StatusCode::OK, "{p} at {at}: {}", r.status());
            let next = position(&header(&r, "stream-next-offset").context("no next")?)?;
            let bytes = r.bytes().await?;
            anyhow::ensure!(
                !bytes.is_empty() && next == at + bytes.len() as u64,
                "{p} at {at}: {} bytes, next {next}",
                bytes.len()
            );
            if let Some(k) = (0..bytes.len()).find(|&k| bytes[k] != byte_at(s, at + k as u64)) {
                anyhow::bail!("{p}: byte at {} reads back wrong", at + k as u64);
            }
            at = next;
        }
    }
    Ok(())
}

fn snapshot(values: &[AtomicU64; STREAMS]) -> [u64; STREAMS] {
    std::array::from_fn(|s| values[s].load(Ordering::Acquire))
}

async fn kill_9_while_releasing(mode: &str) {
    let rounds: u32 = std::env::var("DS_CRASH_ROUNDS")
        .ok()
        .and_then(|r| r.parse().ok())
        .unwrap_or(8);
    let work = tempfile::Builder::new()
        .prefix("ds-e2e-release-crash-")
        .disable_cleanup(std::env::var_os("DS_E2E_KEEP_WORK").is_some())
        .tempdir()
        .expect("work dir");
    let mut server = DsServer::start(
        ServerOptions {
            storage_mode: mode.to_owned(),
            tls: false,
            extra_env: vec![
                ("DS_RETENTION__MODE".to_owned(), "acked".to_owned()),
                (
                    "DS_STORAGE__SEGMENT_BYTES".to_owned(),
                    SEGMENT_BYTES.to_owned(),
                ),
                ("RUST_LOG".to_owned(), "warn".to_owned()),
            ],
        },
        work.path(),
    )
    .await
    .expect("ds-server");
    let base = server.base_url();
    let http = Client::builder()
        .timeout(Duration::from_secs(10))
        .build()
        .expect("client");
    let client = StreamClient::new(http.clone(), base.clone(), None);

    // A pull-wake subscription of every stream under crash/, claimed for the whole test (the
    // claim is stored, so it outlives the restarts).
    client
        .create(&format!("{ROOT}wake/crash"), BINARY)
        .await
        .expect("wake stream");
    let r = http
        .put(subscription_url(&base))
        .json(&json!({
            "type": "pull-wake", "pattern": "crash/*", "wake_stream": "wake/crash",
            "lease_ttl_ms": 600_000,
        }))
        .send()
        .await
        .expect("subscription");
    assert!(r.status().is_success(), "subscription: {}", r.status());
    for s in 0..STREAMS {
        client.create(&path(s), BINARY).await.expect("create");
    }
    wait_until("every stream linked", DEADLINE, || async {
        let view: Value = http
            .get(subscription_url(&base))
            .send()
            .await?
            .json()
            .await?;
        Ok((view["streams"].as_array().map_or(0, Vec::len) == STREAMS).then_some(()))
    })
    .await
    .expect("links");
    let r = http
        .post(format!("{}/claim", subscription_url(&base)))
        .json(&json!({ "worker": "release-crash" }))
        .send()
        .await
        .expect("claim");
    assert_eq!(r.status(), StatusCode::OK, "claim");
    let claimed: Value = r.json().await.expect("claim body");
    let claim = Claim {
        token: claimed["token"].as_str().expect("token").to_owned(),
        wake_id: claimed["wake_id"].clone(),
        generation: claimed["generation"].clone(),
    };

    let seen = Arc::new(Seen::default());
    let stop = Arc::new(AtomicBool::new(false));
    let mut tasks = tokio::task::JoinSet::new();
    for s in 0..STREAMS {
        tasks.spawn(write(client.clone(), s, seen.clone(), stop.clone()));
    }
    tasks.spawn(read_and_ack(
        http.clone(),
        base.clone(),
        claim,
        seen.clone(),
        stop.clone(),
    ));
    tasks.spawn(watch_earliest(
        http.clone(),
        base.clone(),
        seen.clone(),
        stop.clone(),
    ));

    let mut seed = std::process::id() as u64;
    for round in 0..rounds {
        // Releases moved every stream since the last restart, and the writers got on.
        let (earliest_before, appends_before) = (
            snapshot(&seen.earliest),
            seen.appends.load(Ordering::Relaxed),
        );
        wait_until(
            &format!("releases and appends in round {round}"),
            DEADLINE,
            || async {
                let earliest = snapshot(&seen.earliest);
                let moved = (0..STREAMS).all(|s| earliest[s] > earliest_before[s]);
                let appended = seen.appends.load(Ordering::Relaxed)
                    >= appends_before + PROGRESS_PER_ROUND * STREAMS as u64;
                Ok((moved && appended).then_some(()))
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e:#}\n{}", server.log_tail(40)));
        // A random moment within a few retention passes (100 ms apart), to land inside one.
        seed = seed
            .wrapping_mul(6364136223846793005)
            .wrapping_add(1442695040888963407);
        tokio::time::sleep(Duration::from_millis((seed >> 33) % 250)).await;

        server.kill().expect("kill -9");
        let (appended, acked, earliest_seen) = (
            snapshot(&seen.appended),
            snapshot(&seen.acked),
            snapshot(&seen.earliest),
        );
        server
            .restart()
            .await
            .unwrap_or_else(|e| panic!("restart in round {round}: {e:#}\n{}", server.log_tail(40)));
        check_after_restart(&http, &base, appended, acked, earliest_seen)
            .await
            .unwrap_or_else(|e| panic!("{mode}, round {round}: {e:#}\n{}", server.log_tail(40)));
    }
    stop.store(true, Ordering::Relaxed);
    while let Some(joined) = tasks.join_next().await {
        joined.expect("client task");
    }
    let violations = seen
        .violations
        .lock()
        .map(|v| v.clone())
        .unwrap_or_default();
    assert!(violations.is_empty(), "{mode}: {violations:#?}");
    eprintln!(
        "{mode}: {rounds} kills, {} appends acknowledged, {} raises of the earliest offset seen, \
         earliest {:?} of tails {:?}",
        seen.appends.load(Ordering::Relaxed),
        seen.releases.load(Ordering::Relaxed),
        snapshot(&seen.earliest),
        snapshot(&seen.appended)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_releasing_file_durable() {
    kill_9_while_releasing("file-durable").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn kill_9_while_releasing_acid() {
    kill_9_while_releasing("acid").await;
}
