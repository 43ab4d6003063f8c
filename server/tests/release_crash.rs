//! `kill -9` while releasing, at the storage level (issue 21's crash proof, before the domain
//! drives releases over HTTP): a child process (this test binary, re-run as a child) appends to
//! a few streams from concurrent tasks and releases behind itself, printing every
//! acknowledgement; the parent kills it at a random moment, reopens the directory in-process and
//! checks, per stream:
//! - every acknowledged append is there (the tail is at least the acknowledged end), and every
//!   byte of the retained range is the byte written at that position (data is a function of the
//!   stream and the position, so nothing can come back at the wrong place);
//! - the retained start is at least every acknowledged release (acked offsets never move
//!   backwards) and never below what an earlier restart recovered;
//! - a read below the retained start is refused as released: released bytes never reappear.
//!
//! Segments are small, so the file modes delete segments and write states forward, and acid
//! rolls its commit log and checkpoints, under the kills. `DS_CRASH_ROUNDS` sets the rounds per
//! mode (default 6).

use std::collections::HashMap;
use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::sync::Arc;

use bytes::Bytes;
use ds_server::storage::acid::{AcidOptions, AcidStorage};
use ds_server::storage::file::{FileOptions, FileStorage};
use ds_server::storage::{AppendEntry, Storage, StorageError, StreamLog, StreamMeta};

const CHILD_ENV: &str = "DS_RELEASE_CRASH_CHILD";
const STREAMS: u64 = 4;

fn byte_at(id: u64, pos: u64) -> u8 {
    ((id * 31 + pos * 7 + pos / 251) % 251) as u8
}

fn open(mode: &str, dir: &Path) -> Arc<dyn Storage> {
    let file = |durable| FileOptions {
        durable,
        segment_bytes: 16 << 10,
        max_open_files: 8,
        map_reads: true,
        cache_bytes: 64 << 10,
        fast_sync_interval: std::time::Duration::from_millis(5),
    };
    match mode {
        "file-fast" => Arc::new(FileStorage::open(dir, file(false)).expect("open")),
        "file-durable" => Arc::new(FileStorage::open(dir, file(true)).expect("open")),
        "acid" => Arc::new(
            AcidStorage::open(
                dir,
                AcidOptions {
                    log_segment_bytes: 16 << 10,
                    ..AcidOptions::new(4, 64 << 10)
                },
            )
            .expect("open"),
        ),
        "acid-per-shard" => Arc::new(
            AcidStorage::open(
                dir,
                AcidOptions {
                    commit_log: false,
                    ..AcidOptions::new(4, 64 << 10)
                },
            )
            .expect("open"),
        ),
        other => panic!("unknown mode {other}"),
    }
}

fn meta(id: u64) -> Arc<StreamMeta> {
    Arc::new(StreamMeta::new(
        id,
        &format!("/crash/{id}"),
        "application/octet-stream",
        None,
        1,
    ))
}

/// The child: appends and releases until killed, printing `A id end` once an append ending at
/// `end` is acknowledged and `R id before` once a release is.
async fn child(mode: &str, dir: &Path) {
    let store = open(mode, dir);
    let mut logs: HashMap<u64, (Arc<dyn StreamLog>, u64)> = store
        .recover()
        .expect("recover")
        .into_iter()
        .map(|r| (r.meta.id, (r.log, r.state.tail)))
        .collect();
    for id in 1..=STREAMS {
        if let std::collections::hash_map::Entry::Vacant(slot) = logs.entry(id) {
            let (log, c) = store.create(&meta(id), vec![], None).expect("create");
            c.await.expect("create");
            println!("A {id} 0");
            slot.insert((log, 0));
        }
    }
    let mut tasks = Vec::new();
    for (id, (log, tail)) in logs {
        tasks.push(tokio::spawn(async move {
            let mut rng = fastrand::Rng::with_seed(id ^ tail);
            let mut pos = tail;
            // Record ends acknowledged but not yet released (a release must be on a boundary).
            let mut ends = std::collections::VecDeque::from([tail]);
            for _ in 0..200_000 {
                // A few appends in flight at once, submitted in order, as the stream layer does.
                let mut commits = Vec::new();
                for _ in 0..rng.usize(1..4) {
                    let len = rng.u64(1..3000);
                    let data: Vec<u8> = (pos..pos + len).map(|p| byte_at(id, p)).collect();
                    commits.push((
                        pos + len,
                        log.append(AppendEntry {
                            start: pos,
                            data: Some(Bytes::from(data)),
                            ..AppendEntry::default()
                        }),
                    ));
                    pos += len;
                }
                for (end, c) in commits {
                    c.await.expect("append");
                    println!("A {id} {end}");
                    ends.push_back(end);
                }
                if rng.u8(0..3) == 0 {
                    // Keep a random number of the newest records.
                    let keep = rng.usize(0..ends.len().min(6));
                    let before = ends[ends.len() - 1 - keep];
                    log.release(before).await.expect("release");
                    println!("R {id} {before}");
                    while ends.front().is_some_and(|&e| e < before) {
                        ends.pop_front();
                    }
                }
            }
        }));
    }
    for t in tasks {
        t.await.expect("task");
    }
}

#[derive(Default, Clone, Copy, Debug)]
struct Acked {
    end: u64,
    released: u64,
}

async fn check(mode: &str, dir: &Path, acked: &HashMap<u64, Acked>, floor: &mut HashMap<u64, u64>) {
    let store = open(mode, dir);
    let streams = store.recover().expect("recover after kill -9");
    for r in &streams {
        let id = r.meta.id;
        let a = acked.get(&id).copied().unwrap_or_default();
        let (tail, released) = (r.state.tail, r.state.released);
        assert!(
            tail >= a.end,
            "{mode}: stream {id} tail {tail} < acked {}",
            a.end
        );
        assert!(
            released >= a.released,
            "{mode}: stream {id} released {released} < acked release {}",
            a.released
        );
        let was = floor.get(&id).copied().unwrap_or(0);
        assert!(
            released >= was,
            "{mode}: stream {id} released went back from {was} to {released}"
        );
        floor.insert(id, released);
        assert!(released <= tail);
        assert_eq!(r.state.own_bytes, tail - released, "{mode}: stream {id}");
        if released > 0 {
            assert!(
                matches!(
                    r.log.read(0, tail, 1 << 20, true).await,
                    Err(StorageError::Released { start }) if start == released
                ),
                "{mode}: stream {id}: a read below {released} must be refused"
            );
        }
        let mut pos = released;
        while pos < tail {
            let chunk = r.log.read(pos, tail, 1 << 20, true).await.expect("read");
            assert!(chunk.end > pos);
            let bytes = chunk.parts.concat();
            for (i, b) in bytes.iter().enumerate() {
                let p = pos + i as u64;
                assert_eq!(*b, byte_at(id, p), "{mode}: stream {id} byte {p}");
            }
            pos = chunk.end;
        }
    }
    for id in acked.keys() {
        assert!(
            streams.iter().any(|r| r.meta.id == *id),
            "{mode}: acknowledged stream {id} is missing"
        );
    }
}

fn run_mode(mode: &str) {
    let rounds: usize = std::env::var("DS_CRASH_ROUNDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(6);
    let dir = tempfile::tempdir().expect("tempdir");
    let mut acked: HashMap<u64, Acked> = HashMap::new();
    let mut floor: HashMap<u64, u64> = HashMap::new();
    let mut rng = fastrand::Rng::with_seed(0x5eed ^ mode.len() as u64);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    for round in 0..rounds {
        let mut child = Command::new(std::env::current_exe().expect("test binary"))
            .args([
                "--exact",
                "child_entry_point",
                "--nocapture",
                "--test-threads=1",
            ])
            .env(CHILD_ENV, format!("{mode}:{}", dir.path().display()))
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .expect("spawn child");
        let stdout = child.stdout.take().expect("stdout");
        let kill_after = rng.usize(100..3000);
        let mut seen = 0;
        // The pipe stays open until the child is killed: closed first, the child's next line
        // would fail with EPIPE (a panic in its output, and an end the test did not choose).
        let mut lines = BufReader::new(stdout).lines();
        for line in lines.by_ref() {
            let Ok(line) = line else { break };
            let mut parts = line.split(' ');
            let (Some(kind), Some(id), Some(pos)) = (parts.next(), parts.next(), parts.next())
            else {
                continue;
            };
            let (Ok(id), Ok(pos)) = (id.parse::<u64>(), pos.parse::<u64>()) else {
                continue;
            };
            let a = acked.entry(id).or_default();
            match kind {
                "A" => a.end = a.end.max(pos),
                "R" => a.released = a.released.max(pos),
                _ => continue,
            }
            seen += 1;
            if seen >= kill_after {
                break;
            }
        }
        // SIGKILL: whatever the child was doing, it stops there.
        child.kill().expect("kill -9");
        let status = child.wait().expect("wait");
        drop(lines);
        assert!(
            !status.success(),
            "{mode} round {round}: the child ended by itself"
        );
        assert!(
            seen >= kill_after,
            "{mode} round {round}: the child stopped early ({seen} lines)"
        );
        rt.block_on(check(mode, dir.path(), &acked, &mut floor));
    }
}

#[test]
fn child_entry_point() {
    // Only does something when the parent re-runs this binary as the child.
    let Ok(spec) = std::env::var(CHILD_ENV) else {
        return;
    };
    let (mode, dir) = spec.split_once(':').expect("mode:dir");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(child(mode, Path::new(dir)));
}

#[test]
fn kill_9_while_releasing_file_fast() {
    run_mode("file-fast");
}

#[test]
fn kill_9_while_releasing_file_durable() {
    run_mode("file-durable");
}

#[test]
fn kill_9_while_releasing_acid() {
    run_mode("acid");
}

#[test]
fn kill_9_while_releasing_acid_per_shard() {
    run_mode("acid-per-shard");
}
