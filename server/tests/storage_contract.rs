//! The storage contract (see `server/src/storage/mod.rs`), checked against every backend.
//!
//! Each test runs once per backend; durable backends are also reopened and must come back with
//! exactly what they acknowledged.

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use ds_server::storage::acid::{AcidOptions, AcidStorage};
use ds_server::storage::file::{FileOptions, FileStorage};
use ds_server::storage::memory::MemoryStorage;
use ds_server::storage::{
    AppendEntry, ForkMeta, ProducerState, ProducerTuple, Storage, StorageError, StreamLog,
    StreamMeta,
};

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Backend {
    Memory,
    FileFast,
    FileDurable,
    /// With the commit log (the default).
    Acid,
    /// With a synced redb commit per shard (`DS_STORAGE__ACID_COMMIT_LOG=false`).
    AcidPerShard,
}

const ALL: [Backend; 5] = [
    Backend::Memory,
    Backend::FileFast,
    Backend::FileDurable,
    Backend::Acid,
    Backend::AcidPerShard,
];
const DURABLE: [Backend; 4] = [
    Backend::FileFast,
    Backend::FileDurable,
    Backend::Acid,
    Backend::AcidPerShard,
];

fn open(backend: Backend, dir: &Path) -> Arc<dyn Storage> {
    let file = |durable| FileOptions {
        durable,
        segment_bytes: 4096,
        max_open_files: 4,
        // Both read paths meet the contract: file-durable maps (the default), file-fast copies.
        map_reads: durable,
        cache_bytes: 64,
        // Short, so that the contract tests run with the syncer busy.
        fast_sync_interval: std::time::Duration::from_millis(5),
    };
    match backend {
        Backend::Memory => Arc::new(MemoryStorage),
        Backend::FileFast => Arc::new(FileStorage::open(dir, file(false)).expect("open")),
        Backend::FileDurable => Arc::new(FileStorage::open(dir, file(true)).expect("open")),
        Backend::Acid => Arc::new(
            AcidStorage::open(
                dir,
                AcidOptions {
                    // Small, so that the contract tests roll segments and checkpoint.
                    log_segment_bytes: 4096,
                    ..AcidOptions::new(4, 64)
                },
            )
            .expect("open"),
        ),
        Backend::AcidPerShard => Arc::new(
            AcidStorage::open(
                dir,
                AcidOptions {
                    commit_log: false,
                    ..AcidOptions::new(4, 64)
                },
            )
            .expect("open"),
        ),
    }
}

fn meta(id: u64) -> Arc<StreamMeta> {
    Arc::new(StreamMeta::new(
        id,
        &format!("/v1/stream/{id}"),
        "application/octet-stream",
        Some(60),
        1_700_000_000_000,
    ))
}

fn data(start: u64, bytes: &[u8]) -> AppendEntry {
    AppendEntry {
        start,
        data: Some(Bytes::copy_from_slice(bytes)),
        ..AppendEntry::default()
    }
}

async fn read_all(log: &Arc<dyn StreamLog>, from: u64, until: u64) -> Vec<u8> {
    let chunk = log.read(from, until, usize::MAX, true).await.expect("read");
    assert_eq!(chunk.end, until);
    chunk.parts.concat()
}

#[tokio::test]
async fn initial_records_and_appends_read_back_in_order() {
    for backend in ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, dir.path());
        let (log, commit) = store
            .create(&meta(1), vec![Bytes::from_static(b"abc")], None)
            .expect("create");
        commit.await.expect("create commit");
        log.append(data(3, b"de")).await.expect("append");
        log.append(data(5, b"fgh")).await.expect("append");
        assert_eq!(read_all(&log, 0, 8).await, b"abcdefgh", "{backend:?}");
        assert_eq!(read_all(&log, 4, 7).await, b"efg", "{backend:?}");
    }
}

#[tokio::test]
async fn reads_follow_the_budget_split_and_alignment_rules() {
    for backend in ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, dir.path());
        let (log, commit) = store.create(&meta(1), vec![], None).expect("create");
        commit.await.expect("commit");
        for (start, d) in [(0, &b"aaaa"[..]), (4, b"bb"), (6, b"cccccc")] {
            log.append(data(start, d)).await.expect("append");
        }
        // Whole records only, but always at least one.
        let c = log.read(0, 12, 5, false).await.expect("read");
        assert_eq!(
            (c.parts.concat(), c.end),
            (b"aaaa".to_vec(), 4),
            "{backend:?}"
        );
        let c = log.read(6, 12, 1, false).await.expect("read");
        assert_eq!(
            (c.parts.concat(), c.end),
            (b"cccccc".to_vec(), 12),
            "{backend:?}"
        );
        // Split reads stop exactly at the budget.
        let c = log.read(1, 12, 6, true).await.expect("read");
        assert_eq!(
            (c.parts.concat(), c.end),
            (b"aaabbc".to_vec(), 7),
            "{backend:?}"
        );
        // Unsplittable reads refuse positions inside a record.
        assert!(
            matches!(
                log.read(2, 12, 100, false).await,
                Err(StorageError::Misaligned { pos: 2 })
            ),
            "{backend:?}"
        );
        // Nothing in range, nothing returned.
        let c = log.read(12, 12, 100, true).await.expect("read");
        assert!(c.parts.is_empty() && c.end == 12, "{backend:?}");
    }
}

#[tokio::test]
async fn a_fork_log_starts_at_its_anchor() {
    for backend in ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, dir.path());
        let mut m = meta(2);
        Arc::make_mut(&mut m).set_fork(Some(ForkMeta {
            source_id: 1,
            source_path: "/v1/stream/1".into(),
            offset: 100,
            sub_offset: 2,
        }));
        let (log, commit) = store
            .create(
                &m,
                vec![Bytes::from_static(b"xy"), Bytes::from_static(b"z")],
                None,
            )
            .expect("create");
        commit.await.expect("commit");
        log.append(data(103, b"w")).await.expect("append");
        assert_eq!(read_all(&log, 100, 104).await, b"xyzw", "{backend:?}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_to_many_streams_all_commit_in_order() {
    for backend in ALL {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = open(backend, dir.path());
        let mut tasks = Vec::new();
        for id in 1..=16u64 {
            let (log, commit) = store.create(&meta(id), vec![], None).expect("create");
            commit.await.expect("commit");
            tasks.push(tokio::spawn(async move {
                // Submitted in order (as the stream layer does under its lock), awaited together.
                let commits: Vec<_> = (0..40u64)
                    .map(|i| log.append(data(i, &[id as u8])))
                    .collect();
                for c in commits {
                    c.await.expect("append");
                }
                log
            }));
        }
        for (i, t) in tasks.into_iter().enumerate() {
            let log = t.await.expect("task");
            let id = i as u8 + 1;
            assert_eq!(read_all(&log, 0, 40).await, vec![id; 40], "{backend:?}");
        }
    }
}

#[tokio::test]
async fn durable_backends_return_exactly_what_they_acknowledged_after_reopen() {
    for backend in DURABLE {
        let dir = tempfile::tempdir().expect("tempdir");
        {
            let store = open(backend, dir.path());
            let (a, c) = store
                .create(&meta(1), vec![Bytes::from_static(b"init")], None)
                .expect("create");
            c.await.expect("commit");
            a.append(AppendEntry {
                start: 4,
                data: Some(Bytes::from_static(b"-more")),
                close: None,
                stream_seq: Some("0007".into()),
                producer: Some((
                    "writer".into(),
                    ProducerState {
                        epoch: 2,
                        last_seq: 0,
                        last_ms: 0,
                    },
                )),
            })
            .await
            .expect("append");
            // A close-only entry carries state but no data.
            a.append(AppendEntry {
                start: 9,
                data: None,
                close: Some(Some(ProducerTuple {
                    id: "writer".into(),
                    epoch: 2,
                    seq: 1,
                })),
                stream_seq: None,
                producer: Some((
                    "writer".into(),
                    ProducerState {
                        epoch: 2,
                        last_seq: 1,
                        // The time of the producer's last append is stored with it.
                        last_ms: 1_234_567,
                    },
                )),
            })
            .await
            .expect("close");
            let (b, c) = store.create(&meta(2), vec![], Some(None)).expect("create");
            c.await.expect("commit");
            b.mark_soft_deleted().await.expect("soft delete");
            // A close with no producer (the common case) must survive too.
            let (closed_plain, c) = store.create(&meta(5), vec![], None).expect("create");
            c.await.expect("commit");
            closed_plain
                .append(AppendEntry {
                    start: 0,
                    data: Some(Bytes::from_static(b"last")),
                    close: Some(None),
                    ..AppendEntry::default()
                })
                .await
                .expect("append and close");
            let (open_one, c) = store
                .create(&meta(4), vec![Bytes::from_static(b"o")], None)
                .expect("create");
            c.await.expect("commit");
            drop(open_one);
            let (gone, c) = store.create(&meta(3), vec![], None).expect("create");
            c.await.expect("commit");
            gone.append(data(0, b"bye")).await.expect("append");
            gone.remove().await.expect("remove");
        }
        let store = open(backend, dir.path());
        let mut streams = store.recover().expect("recover");
        streams.sort_by_key(|r| r.meta.id);
        let ids: Vec<u64> = streams.iter().map(|r| r.meta.id).collect();
        assert_eq!(
            ids,
            vec![1, 2, 4, 5],
            "{backend:?}: removed streams stay removed"
        );
        assert!(
            streams[3].state.closed,
            "{backend:?}: a close without producer survives"
        );
        assert_eq!(streams[3].state.closed_by, None, "{backend:?}");
        assert_eq!(streams[3].state.tail, 4, "{backend:?}");
        let a = &streams[0];
        assert_eq!(a.meta, meta(1), "{backend:?}");
        assert_eq!(a.state.tail, 9, "{backend:?}");
        assert_eq!(a.state.own_bytes, 9, "{backend:?}");
        assert!(a.state.closed, "{backend:?}");
        assert_eq!(
            a.state.closed_by,
            Some(ProducerTuple {
                id: "writer".into(),
                epoch: 2,
                seq: 1
            }),
            "{backend:?}"
        );
        assert_eq!(a.state.last_seq.as_deref(), Some("0007"), "{backend:?}");
        assert_eq!(
            a.state.producers.get("writer"),
            Some(&ProducerState {
                epoch: 2,
                last_seq: 1,
                last_ms: 1_234_567,
            }),
            "{backend:?}"
        );
        assert_eq!(read_all(&a.log, 0, 9).await, b"init-more", "{backend:?}");
        let b = &streams[1];
        assert!(b.state.closed, "{backend:?}: created closed");
        assert!(b.state.soft_deleted, "{backend:?}");
        // A reopened log takes further appends.
        let d = &streams[2];
        d.log
            .append(data(1, b"k"))
            .await
            .expect("append after reopen");
        assert_eq!(read_all(&d.log, 0, 2).await, b"ok", "{backend:?}");
    }
}

/// Backends whose `release` frees data (memory's is the retention work's; add it here then).
const RELEASING: [Backend; 4] = DURABLE;

#[tokio::test]
async fn released_data_is_refused_and_never_comes_back_after_reopen() {
    for backend in RELEASING {
        let dir = tempfile::tempdir().expect("tempdir");
        let producer = ProducerState {
            epoch: 1,
            last_seq: 4,
            last_ms: 1_700_000_000_000,
        };
        {
            let store = open(backend, dir.path());
            let (log, c) = store
                .create(&meta(1), vec![Bytes::from_static(b"ab")], None)
                .expect("create");
            c.await.expect("commit");
            log.append(data(2, b"cd")).await.expect("append");
            log.append(AppendEntry {
                start: 4,
                data: Some(Bytes::from_static(b"efg")),
                producer: Some(("p".into(), producer)),
                stream_seq: Some("9".into()),
                ..AppendEntry::default()
            })
            .await
            .expect("append");
            log.release(4).await.expect("release");
            for from in [0, 2, 3] {
                assert!(
                    matches!(
                        log.read(from, 7, 100, true).await,
                        Err(StorageError::Released { start: 4 })
                    ),
                    "{backend:?}: read at {from}"
                );
            }
            assert_eq!(read_all(&log, 4, 7).await, b"efg", "{backend:?}");
            // Below the retained start: nothing changes.
            log.release(2).await.expect("release below");
            assert_eq!(read_all(&log, 4, 7).await, b"efg", "{backend:?}");
            // A second stream released to its tail, then appended to.
            let (other, c) = store
                .create(&meta(2), vec![Bytes::from_static(b"xyz")], None)
                .expect("create");
            c.await.expect("commit");
            other.release(3).await.expect("release all");
            other.append(data(3, b"w")).await.expect("append");
        }
        let store = open(backend, dir.path());
        let mut streams = store.recover().expect("recover");
        streams.sort_by_key(|r| r.meta.id);
        let a = &streams[0];
        assert_eq!(
            (a.state.tail, a.state.released, a.state.own_bytes),
            (7, 4, 3),
            "{backend:?}"
        );
        assert_eq!(a.state.producers.get("p"), Some(&producer), "{backend:?}");
        assert_eq!(a.state.last_seq.as_deref(), Some("9"), "{backend:?}");
        assert!(
            matches!(
                a.log.read(0, 7, 100, true).await,
                Err(StorageError::Released { start: 4 })
            ),
            "{backend:?}"
        );
        assert_eq!(read_all(&a.log, 4, 7).await, b"efg", "{backend:?}");
        a.log
            .append(data(7, b"h"))
            .await
            .expect("append after reopen");
        a.log.release(7).await.expect("release after reopen");
        assert_eq!(read_all(&a.log, 7, 8).await, b"h", "{backend:?}");
        let b = &streams[1];
        assert_eq!(
            (b.state.tail, b.state.released, b.state.own_bytes),
            (4, 3, 1),
            "{backend:?}"
        );
        assert_eq!(read_all(&b.log, 3, 4).await, b"w", "{backend:?}");
        drop(streams);
        drop(store);
        let store = open(backend, dir.path());
        let streams = store.recover().expect("recover");
        let a = streams.iter().find(|r| r.meta.id == 1).expect("stream 1");
        assert_eq!((a.state.tail, a.state.released), (8, 7), "{backend:?}");
    }
}

#[tokio::test]
async fn a_fork_releases_only_its_own_records() {
    for backend in RELEASING {
        let dir = tempfile::tempdir().expect("tempdir");
        let mut m = meta(2);
        Arc::make_mut(&mut m).set_fork(Some(ForkMeta {
            source_id: 1,
            source_path: "/v1/stream/1".into(),
            offset: 100,
            sub_offset: 0,
        }));
        {
            let store = open(backend, dir.path());
            let (log, c) = store.create(&m, vec![], None).expect("create");
            c.await.expect("commit");
            // At or below the anchor there is nothing of this log to release.
            log.release(100).await.expect("release at the anchor");
            log.append(data(100, b"ab")).await.expect("append");
            log.append(data(102, b"cd")).await.expect("append");
            log.release(102).await.expect("release");
            assert!(matches!(
                log.read(100, 104, 10, true).await,
                Err(StorageError::Released { start: 102 })
            ));
        }
        let store = open(backend, dir.path());
        let streams = store.recover().expect("recover");
        let f = &streams[0];
        assert_eq!(
            (f.state.tail, f.state.released, f.state.own_bytes),
            (104, 102, 2),
            "{backend:?}"
        );
        assert_eq!(read_all(&f.log, 102, 104).await, b"cd", "{backend:?}");
    }
}

/// Bytes of every file under `dir` (a file deleted while it is listed counts 0).
fn dir_bytes(dir: &Path) -> u64 {
    std::fs::read_dir(dir)
        .expect("read dir")
        .filter_map(Result::ok)
        .map(|e| match e.metadata() {
            Ok(md) if md.is_dir() => dir_bytes(&e.path()),
            Ok(md) => md.len(),
            Err(_) => 0,
        })
        .sum()
}

/// The soak of issue 21 in small: writers append far more than the log's segment size, their
/// readers release behind them, and the data directory stays within a stated bound.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_stays_bounded_when_releases_follow_the_writers() {
    const SEGMENT: u64 = 64 << 10;
    // 8 MiB of 1 KiB records written by default, 128 times the segment size (`DS_SOAK_APPENDS`
    // for longer runs).
    let appends: u64 = std::env::var("DS_SOAK_APPENDS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(8192);
    // acid also with 8 KiB records, which it keeps in its commit log (rows reference them):
    // the segments must go as the releases pass them.
    for (backend, record) in [
        (Backend::FileDurable, 1024),
        (Backend::FileFast, 1024),
        (Backend::Acid, 1024),
        (Backend::Acid, 8192),
        (Backend::AcidPerShard, 1024),
    ] {
        // The same number of bytes whatever the record size.
        let appends = appends * 1024 / record as u64;
        // How far the releases trail the writers: the live data.
        let lag: u64 = 16 * record as u64;
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Storage> = match backend {
            Backend::FileDurable | Backend::FileFast => Arc::new(
                FileStorage::open(
                    dir.path(),
                    FileOptions {
                        durable: backend == Backend::FileDurable,
                        segment_bytes: SEGMENT,
                        max_open_files: 4,
                        map_reads: true,
                        cache_bytes: 1 << 20,
                        fast_sync_interval: std::time::Duration::from_millis(5),
                    },
                )
                .expect("open"),
            ),
            _ => Arc::new(
                AcidStorage::open(
                    dir.path(),
                    AcidOptions {
                        log_segment_bytes: SEGMENT,
                        commit_log: backend == Backend::Acid,
                        ..AcidOptions::new(4, 1 << 20)
                    },
                )
                .expect("open"),
            ),
        };
        // A stream nobody writes to again: its creation must not pin the log.
        let (idle, c) = store
            .create(&meta(1), vec![Bytes::from_static(b"idle")], None)
            .expect("create");
        c.await.expect("commit");
        let mut writers = Vec::new();
        for id in 2..=3u64 {
            let (log, c) = store.create(&meta(id), vec![], None).expect("create");
            c.await.expect("commit");
            writers.push(tokio::spawn(async move {
                let body = Bytes::from(vec![id as u8; record]);
                for i in 0..appends / 2 {
                    let start = i * record as u64;
                    log.append(AppendEntry {
                        start,
                        data: Some(body.clone()),
                        ..AppendEntry::default()
                    })
                    .await
                    .expect("append");
                    if i % 8 == 7 {
                        let end = start + record as u64;
                        log.release(end.saturating_sub(lag)).await.expect("release");
                    }
                }
                log
            }));
        }
        let mut logs = Vec::new();
        for w in writers {
            logs.push(w.await.expect("writer"));
        }
        idle.release(4).await.expect("release idle");
        // One more operation gives the file modes' writer a turn after the last release.
        logs[0]
            .append(data(appends / 2 * record as u64, b"!"))
            .await
            .expect("append");
        let written = appends * record as u64;
        let bound = match backend {
            // Live data, the active segment, one segment whose deletion waits for the states
            // written forward, and the part of the log the releases have not reached.
            Backend::FileDurable => 8 * SEGMENT,
            // file-fast's segment files are extended to their full size at once, and their
            // deletion waits for the background sync.
            Backend::FileFast => 16 * SEGMENT,
            // redb reuses the pages of deleted rows once a durable commit has freed them; with the
            // commit log, each log segment file is also extended 1 MiB at a time.
            _ => 8 << 20,
        };
        // file-fast deletes once its background sync has passed what made a segment dead.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let mut used = dir_bytes(dir.path());
        while used > bound && std::time::Instant::now() < deadline {
            std::thread::sleep(std::time::Duration::from_millis(10));
            used = dir_bytes(dir.path());
        }
        eprintln!("{backend:?}: {written} bytes written, {used} bytes on disk (bound {bound})");
        if std::env::var_os("DS_SOAK_LIST").is_some() {
            for e in std::fs::read_dir(dir.path())
                .expect("dir")
                .filter_map(Result::ok)
            {
                let len = e.metadata().map(|m| m.len()).unwrap_or(0);
                eprintln!("  {:?} {len}", e.file_name());
            }
        }
        assert!(
            used <= bound,
            "{backend:?}: {used} bytes on disk after {written} written with {lag} live per stream"
        );
        drop(logs);
        drop(idle);
        drop(store);
        let store = open(backend, dir.path());
        let mut streams = store.recover().expect("recover");
        streams.sort_by_key(|r| r.meta.id);
        assert_eq!(streams.len(), 3, "{backend:?}");
        assert_eq!(streams[0].state.released, 4, "{backend:?}");
        assert_eq!(streams[1].state.tail, written / 2 + 1, "{backend:?}");
        assert_eq!(streams[2].state.released, written / 2 - lag, "{backend:?}");
    }
}

/// CPU seconds this process has used (user + system), from `/proc/self/stat`.
fn cpu_secs() -> f64 {
    let stat = std::fs::read_to_string("/proc/self/stat").expect("stat");
    // Fields after the command name (which is in parentheses and may hold spaces).
    let rest = &stat[stat.rfind(')').expect("comm") + 2..];
    let fields: Vec<&str> = rest.split(' ').collect();
    let ticks: f64 =
        fields[11].parse::<f64>().expect("utime") + fields[12].parse::<f64>().expect("stime");
    ticks / 100.0
}

/// What a release costs, per backend: 64 streams of 256 records of 1 KiB each, released one
/// record at a time (all streams at once, so releases share batches as appends do), then one
/// stream's releases one after another (latency). Prints wall and CPU time per release.
/// `cargo test --release -p ds-server --test storage_contract bench_release -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
#[ignore = "benchmark; prints numbers"]
async fn bench_release_cost() {
    const STREAMS: u64 = 64;
    const RECORDS: u64 = 256;
    for backend in DURABLE {
        let dir = tempfile::tempdir().expect("tempdir");
        let store: Arc<dyn Storage> = match backend {
            Backend::FileDurable | Backend::FileFast => Arc::new(
                FileStorage::open(
                    dir.path(),
                    FileOptions {
                        durable: backend == Backend::FileDurable,
                        segment_bytes: 64 << 20,
                        max_open_files: 16,
                        map_reads: true,
                        cache_bytes: 64 << 20,
                        fast_sync_interval: std::time::Duration::from_secs(1),
                    },
                )
                .expect("open"),
            ),
            _ => Arc::new(
                AcidStorage::open(
                    dir.path(),
                    AcidOptions {
                        commit_log: backend == Backend::Acid,
                        ..AcidOptions::new(16, 64 << 20)
                    },
                )
                .expect("open"),
            ),
        };
        let record = Bytes::from(vec![7u8; 1024]);
        let mut logs = Vec::new();
        for id in 1..=STREAMS {
            let (log, c) = store.create(&meta(id), vec![], None).expect("create");
            c.await.expect("commit");
            logs.push(log);
        }
        let (cpu, wall) = (cpu_secs(), std::time::Instant::now());
        let mut tasks = Vec::new();
        for log in logs.clone() {
            let record = record.clone();
            tasks.push(tokio::spawn(async move {
                for i in 0..RECORDS {
                    log.append(AppendEntry {
                        start: i * 1024,
                        data: Some(record.clone()),
                        ..AppendEntry::default()
                    })
                    .await
                    .expect("append");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let n = (STREAMS * RECORDS) as f64;
        let append = (wall.elapsed().as_secs_f64() / n, (cpu_secs() - cpu) / n);
        let (cpu, wall) = (cpu_secs(), std::time::Instant::now());
        let mut tasks = Vec::new();
        for log in logs.clone() {
            tasks.push(tokio::spawn(async move {
                for i in 1..RECORDS {
                    log.release(i * 1024).await.expect("release");
                }
            }));
        }
        for t in tasks {
            t.await.expect("task");
        }
        let n = (STREAMS * (RECORDS - 1)) as f64;
        let concurrent = (wall.elapsed().as_secs_f64() / n, (cpu_secs() - cpu) / n);
        // One stream, one release at a time.
        let log = &logs[0];
        for i in 0..RECORDS {
            log.append(data(RECORDS * 1024 + i * 1024, &record))
                .await
                .expect("append");
        }
        let (cpu, wall) = (cpu_secs(), std::time::Instant::now());
        for i in 1..=RECORDS {
            log.release(RECORDS * 1024 + i * 1024)
                .await
                .expect("release");
        }
        let n = RECORDS as f64;
        let single = (wall.elapsed().as_secs_f64() / n, (cpu_secs() - cpu) / n);
        let us = |(w, c): (f64, f64)| format!("{:.1} µs wall, {:.1} µs CPU", w * 1e6, c * 1e6);
        eprintln!(
            "{backend:?}: append (64 streams at once) {}; release (64 streams at once) {}; release (one stream, one at a time) {}",
            us(append),
            us(concurrent),
            us(single)
        );
    }
}
