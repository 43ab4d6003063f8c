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

fn meta(id: u64) -> StreamMeta {
    StreamMeta {
        id,
        path: format!("/v1/stream/{id}"),
        content_type: "application/octet-stream".into(),
        ttl_secs: Some(60),
        expires_at: None,
        created_at_ms: 1_700_000_000_000,
        fork: None,
    }
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
        m.fork = Some(ForkMeta {
            source_id: 1,
            source_path: "/v1/stream/1".into(),
            offset: 100,
            sub_offset: 2,
        });
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
