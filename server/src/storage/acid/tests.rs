//! Unit tests of the `acid` backend: durability across reopen, ordering under concurrency, the
//! layout checks, the read rules and group commit.

use std::collections::HashMap;
use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::storage::tail_cache::RECORD_OVERHEAD;
use crate::storage::{ForkMeta, ProducerState, ProducerTuple, Storage, StreamMeta};

fn options(shard_count: u32) -> AcidOptions {
    AcidOptions::new(shard_count, 1 << 20)
}

/// Per-shard syncs: an acknowledged record is in redb at once (tests that damage redb rows
/// right after a write need that; with the commit log the flusher would overwrite the damage).
fn per_shard(options: AcidOptions) -> AcidOptions {
    AcidOptions {
        commit_log: false,
        ..options
    }
}

fn meta(id: StreamId, path: &str) -> Arc<StreamMeta> {
    Arc::new(StreamMeta::new(id, path, "text/plain", None, 1_000))
}

fn data(s: &str) -> Option<Bytes> {
    Some(Bytes::copy_from_slice(s.as_bytes()))
}

fn entry(start: u64, s: &str) -> AppendEntry {
    AppendEntry {
        start,
        data: data(s),
        ..AppendEntry::default()
    }
}

fn joined(chunk: &ReadChunk) -> String {
    chunk
        .parts
        .iter()
        .map(|p| String::from_utf8_lossy(p).into_owned())
        .collect()
}

async fn read_all(log: &Arc<dyn StreamLog>, from: u64, until: u64) -> String {
    let chunk = log.read(from, until, usize::MAX, false).await.unwrap();
    assert_eq!(chunk.end, until);
    joined(&chunk)
}

fn recovered_by_id(storage: &AcidStorage) -> HashMap<StreamId, Recovered> {
    storage
        .recover()
        .unwrap()
        .into_iter()
        .map(|r| (r.meta.id, r))
        .collect()
}

/// Rows of the `records` table holding `id`'s records.
fn record_rows(storage: &AcidStorage, id: StreamId) -> usize {
    let txn = storage.shard_of(id).db.begin_read().unwrap();
    let records = txn.open_table(RECORDS).unwrap();
    records.range((id, 0)..=(id, u64::MAX)).unwrap().count()
}

/// Rows any table of the stream's shard still holds for `id`.
fn rows_left(storage: &AcidStorage, id: StreamId) -> usize {
    let txn = storage.shard_of(id).db.begin_read().unwrap();
    let producers = txn.open_table(PRODUCERS).unwrap();
    let mut n = record_rows(storage, id);
    n += producers
        .range((id, "")..)
        .unwrap()
        .take_while(|i| i.as_ref().unwrap().0.value().0 == id)
        .count();
    n += usize::from(txn.open_table(STREAMS).unwrap().get(id).unwrap().is_some());
    n += usize::from(txn.open_table(STATE).unwrap().get(id).unwrap().is_some());
    n
}

#[tokio::test]
async fn create_append_read_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(4)).unwrap();
    assert_eq!(storage.name(), "acid");
    let (log, commit) = storage
        .create(&meta(1, "/a"), vec![Bytes::from_static(b"hello ")], None)
        .unwrap();
    commit.await.unwrap();
    log.append(entry(6, "world")).await.unwrap();
    assert_eq!(read_all(&log, 0, 11).await, "hello world");
    assert_eq!(read_all(&log, 6, 11).await, "world");
}

#[tokio::test]
async fn reopen_restores_meta_tail_producers_closure_seq_and_soft_delete() {
    let dir = tempfile::tempdir().unwrap();
    let mut source_meta = meta(7, "/source");
    Arc::make_mut(&mut source_meta).ttl_secs = Some(60);
    Arc::make_mut(&mut source_meta).content_type =
        crate::storage::shared_content_type("application/json");
    let mut fork_meta = meta(9, "/fork");
    Arc::make_mut(&mut fork_meta)
        .set_expires_at(Some(("2099-01-01T00:00:00Z".into(), 4_070_908_800_000)));
    Arc::make_mut(&mut fork_meta).set_fork(Some(ForkMeta {
        source_id: 7,
        source_path: "/source".into(),
        offset: 4,
        sub_offset: 1,
    }));
    let closer = ProducerTuple {
        id: "p1".into(),
        epoch: 1,
        seq: 1,
    };
    {
        let storage = AcidStorage::open(dir.path(), options(8)).unwrap();
        let (source, c) = storage
            .create(&source_meta, vec![Bytes::from_static(b"ab")], None)
            .unwrap();
        c.await.unwrap();
        source
            .append(AppendEntry {
                start: 2,
                data: data("cd"),
                stream_seq: Some("001".into()),
                producer: Some((
                    "p1".into(),
                    ProducerState {
                        epoch: 1,
                        last_seq: 0,
                        last_ms: 0,
                    },
                )),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
        let (fork, c) = storage
            .create(
                &fork_meta,
                vec![Bytes::from_static(b"c"), Bytes::from_static(b"XY")],
                None,
            )
            .unwrap();
        c.await.unwrap();
        source
            .append(AppendEntry {
                start: 4,
                data: data("ef"),
                producer: Some((
                    "p2".into(),
                    ProducerState {
                        epoch: 2,
                        last_seq: 5,
                        last_ms: 0,
                    },
                )),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
        // Close-only, by producer p1: the closing tuple and p1's new state land together.
        source
            .append(AppendEntry {
                start: 6,
                data: None,
                close: Some(Some(closer.clone())),
                stream_seq: Some("002".into()),
                producer: Some((
                    "p1".into(),
                    ProducerState {
                        epoch: 1,
                        last_seq: 1,
                        last_ms: 0,
                    },
                )),
            })
            .await
            .unwrap();
        source.touch(50_000);
        source.mark_soft_deleted().await.unwrap();
        fork.append(entry(7, "Z")).await.unwrap();
    }

    let storage = AcidStorage::open(dir.path(), options(8)).unwrap();
    let mut found = recovered_by_id(&storage);
    assert_eq!(found.len(), 2);
    let source = found.remove(&7).unwrap();
    assert_eq!(source.meta, source_meta);
    let s = &source.state;
    assert_eq!((s.tail, s.own_bytes), (6, 6));
    assert!(s.closed && s.soft_deleted);
    assert_eq!(s.closed_by, Some(closer));
    assert_eq!(s.last_seq.as_deref(), Some("002"));
    assert_eq!(s.last_access_ms, 50_000);
    assert_eq!(
        s.producers,
        HashMap::from([
            (
                "p1".to_owned(),
                ProducerState {
                    epoch: 1,
                    last_seq: 1,
                    last_ms: 0
                }
            ),
            (
                "p2".to_owned(),
                ProducerState {
                    epoch: 2,
                    last_seq: 5,
                    last_ms: 0
                }
            ),
        ])
    );
    assert_eq!(read_all(&source.log, 0, 6).await, "abcdef");

    let fork = found.remove(&9).unwrap();
    assert_eq!(fork.meta, fork_meta);
    let f = &fork.state;
    assert_eq!((f.tail, f.own_bytes), (8, 4));
    assert!(!f.closed && !f.soft_deleted && f.closed_by.is_none() && f.last_seq.is_none());
    assert!(f.producers.is_empty());
    assert_eq!(f.last_access_ms, 1_000);
    assert_eq!(read_all(&fork.log, 4, 8).await, "cXYZ");
}

#[tokio::test]
async fn removed_streams_stay_removed_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
        for id in [1, 2] {
            let (log, c) = storage
                .create(
                    &meta(id, &format!("/s{id}")),
                    vec![Bytes::from_static(b"x")],
                    None,
                )
                .unwrap();
            c.await.unwrap();
            log.append(AppendEntry {
                start: 1,
                data: data("yz"),
                producer: Some((
                    "p".into(),
                    ProducerState {
                        epoch: 0,
                        last_seq: 0,
                        last_ms: 0,
                    },
                )),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
            if id == 1 {
                log.mark_soft_deleted().await.unwrap();
                log.remove().await.unwrap();
                assert_eq!(rows_left(&storage, 1), 0);
            }
        }
    }
    let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(found.keys().copied().collect::<Vec<_>>(), vec![2]);
    assert_eq!(rows_left(&storage, 1), 0);
    // Its two records (in one row when the flusher took both in one transaction, else two),
    // one producer, the metadata and the state row.
    let record_rows = record_rows(&storage, 2);
    assert!((1..=2).contains(&record_rows), "{record_rows}");
    assert_eq!(rows_left(&storage, 2), record_rows + 3);
}

/// Appends of one stream submitted in offset order, as the stream layer does: the offset is
/// taken and the write submitted under the stream's lock, then awaited outside it.
struct Writer {
    log: Arc<dyn StreamLog>,
    tail: parking_lot::Mutex<u64>,
}

impl Writer {
    fn submit(&self, s: &str) -> Commit {
        let mut tail = self.tail.lock();
        let commit = self.log.append(entry(*tail, s));
        *tail += s.len() as u64;
        commit
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_appends_commit_in_order_and_survive_reopen() {
    const STREAMS: u64 = 16;
    const TASKS: usize = 8;
    const APPENDS: usize = 25;
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = AcidStorage::open(dir.path(), options(4)).unwrap();
        let mut writers = Vec::new();
        for id in 1..=STREAMS {
            let (log, c) = storage
                .create(&meta(id, &format!("/s{id}")), Vec::new(), None)
                .unwrap();
            c.await.unwrap();
            writers.push(Arc::new(Writer {
                log,
                tail: parking_lot::Mutex::new(0),
            }));
        }
        let mut tasks = Vec::new();
        for writer in &writers {
            for task in 0..TASKS {
                let writer = writer.clone();
                tasks.push(tokio::spawn(async move {
                    for i in 0..APPENDS {
                        writer.submit(&format!("{task:02}-{i:03};")).await.unwrap();
                    }
                }));
            }
        }
        for t in tasks {
            t.await.unwrap();
        }
        let stats = storage.stats();
        let appends = STREAMS * (TASKS * APPENDS) as u64;
        assert!(stats.operations >= appends + STREAMS);
        assert!(
            stats.transactions < appends,
            "no batching: {stats:?} for {appends} appends"
        );
    }
    let storage = AcidStorage::open(dir.path(), options(4)).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(found.len(), STREAMS as usize);
    let record_len = "00-000;".len() as u64;
    for r in found.values() {
        let tail = (TASKS * APPENDS) as u64 * record_len;
        assert_eq!(r.state.tail, tail);
        let text = read_all(&r.log, 0, tail).await;
        let mut next = [0usize; TASKS];
        for item in text.split_terminator(';') {
            let (task, i) = item.split_once('-').unwrap();
            let (task, i): (usize, usize) = (task.parse().unwrap(), i.parse().unwrap());
            assert_eq!(i, next[task], "task {task} out of order in {}", r.meta.path);
            next[task] += 1;
        }
        assert_eq!(next, [APPENDS; TASKS]);
    }
}

#[tokio::test]
async fn shard_count_change_on_existing_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(AcidStorage::open(dir.path(), options(4)).unwrap());
    let err = AcidStorage::open(dir.path(), options(8)).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, StorageError::Config(_)), "{err:?}");
    assert!(
        msg.contains("4 acid shards") && msg.contains("8 are configured"),
        "{msg}"
    );
    // The original count still opens.
    drop(AcidStorage::open(dir.path(), options(4)).unwrap());
}

#[test]
fn shard_files_without_a_layout_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    drop(AcidStorage::open(dir.path(), options(2)).unwrap());
    std::fs::remove_file(dir.path().join(layout::LAYOUT_FILE)).unwrap();
    let err = AcidStorage::open(dir.path(), options(2)).unwrap_err();
    assert!(matches!(err, StorageError::Config(_)), "{err:?}");
}

#[test]
fn a_directory_of_another_mode_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("FORMAT"), "ds-server file storage v1\n").unwrap();
    let err = AcidStorage::open(dir.path(), options(2)).unwrap_err();
    assert!(err.to_string().contains("not acid-mode storage"), "{err}");
    assert!(!dir.path().join(layout::LAYOUT_FILE).exists());
}

#[test]
fn bad_shard_counts_are_refused_before_touching_the_directory() {
    let dir = tempfile::tempdir().unwrap();
    for n in [0, 3, 12, 257, 1024] {
        let err = AcidStorage::open(dir.path(), options(n)).unwrap_err();
        assert!(matches!(err, StorageError::Config(_)), "{n}: {err:?}");
        assert!(err.to_string().contains("power of two"), "{err}");
    }
    assert!(!dir.path().join(layout::LAYOUT_FILE).exists());
    for n in [1, 256] {
        let sub = dir.path().join(n.to_string());
        drop(AcidStorage::open(&sub, options(n)).unwrap());
    }
}

/// Read tests run twice: served by redb (no cache) and by the tail cache.
const CACHE_SIZES: [usize; 2] = [0, 1 << 20];

#[tokio::test]
async fn reads_respect_budget_split_and_record_boundaries() {
    for cache_bytes in CACHE_SIZES {
        reads_respect_budget_split_and_record_boundaries_with(cache_bytes).await;
    }
}

async fn reads_respect_budget_split_and_record_boundaries_with(cache_bytes: usize) {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), AcidOptions::new(1, cache_bytes)).unwrap();
    let (log, c) = storage
        .create(
            &meta(1, "/r"),
            vec![
                Bytes::from_static(b"abc"),
                Bytes::from_static(b"de"),
                Bytes::from_static(b"fghi"),
            ],
            None,
        )
        .unwrap();
    c.await.unwrap();
    let read = |from, until, max, split| log.read(from, until, max, split);

    let c = read(0, 9, 4, false).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("abc", 3));
    let c = read(3, 9, 100, false).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("defghi", 9));
    // At least one whole record even over budget.
    let c = read(0, 9, 2, false).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("abc", 3));
    // Bounded by `until` at a record boundary.
    let c = read(0, 5, 100, false).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("abcde", 5));
    // Split reads may cut inside records, at both ends and at the budget.
    let c = read(1, 5, 100, true).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("bcde", 5));
    let c = read(0, 9, 4, true).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("abcd", 4));
    let c = read(6, 9, 100, true).await.unwrap();
    assert_eq!((joined(&c).as_str(), c.end), ("ghi", 9));
    // Unsplittable reads refuse positions inside records.
    assert!(matches!(
        read(1, 9, 100, false).await,
        Err(StorageError::Misaligned { pos: 1 })
    ));
    assert!(matches!(
        read(0, 4, 100, false).await,
        Err(StorageError::Misaligned { pos: 4 })
    ));
    // Empty range.
    let c = read(9, 9, 100, false).await.unwrap();
    assert_eq!((c.parts.len(), c.end), (0, 9));

    // A fork's log starts at its anchor; before it is no record boundary of this log.
    let mut fork = meta(2, "/f");
    Arc::make_mut(&mut fork).set_fork(Some(ForkMeta {
        source_id: 1,
        source_path: "/r".into(),
        offset: 10,
        sub_offset: 0,
    }));
    let (flog, c) = storage
        .create(&fork, vec![Bytes::from_static(b"xyz")], None)
        .unwrap();
    c.await.unwrap();
    assert_eq!(read_all(&flog, 10, 13).await, "xyz");
    assert!(matches!(
        flog.read(5, 13, 100, false).await,
        Err(StorageError::Misaligned { pos: 5 })
    ));
}

#[tokio::test]
async fn reads_of_a_large_stream_stop_at_the_budget() {
    for cache_bytes in CACHE_SIZES {
        let dir = tempfile::tempdir().unwrap();
        let storage = AcidStorage::open(dir.path(), AcidOptions::new(1, cache_bytes)).unwrap();
        let records: Vec<Bytes> = (0..1000).map(|_| Bytes::from(vec![b'r'; 100])).collect();
        let (log, c) = storage.create(&meta(1, "/big"), records, None).unwrap();
        c.await.unwrap();
        let c = log.read(250 * 100, 100_000, 1_000, false).await.unwrap();
        assert_eq!((c.parts.len(), c.end), (10, 26_000));
    }
}

#[tokio::test]
async fn concurrent_appends_share_transactions() {
    const N: u64 = 200;
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(1)).unwrap();
    let mut logs = Vec::new();
    for id in 1..=N {
        let (log, c) = storage
            .create(&meta(id, &format!("/g{id}")), Vec::new(), None)
            .unwrap();
        c.await.unwrap();
        logs.push(log);
    }
    let before = storage.stats();
    let tasks: Vec<_> = logs
        .iter()
        .map(|log| {
            let log = log.clone();
            tokio::spawn(async move { log.append(entry(0, "payload")).await })
        })
        .collect();
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let after = storage.stats();
    let transactions = after.transactions - before.transactions;
    assert_eq!(after.operations - before.operations, N);
    assert!(
        transactions < N,
        "{N} concurrent appends took {transactions} transactions"
    );
}

#[tokio::test]
async fn a_dropped_commit_future_still_writes() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(1)).unwrap();
    let (log, c) = storage.create(&meta(1, "/d"), Vec::new(), None).unwrap();
    drop(c);
    drop(log.append(entry(0, "ab")));
    log.append(entry(2, "cd")).await.unwrap();
    assert_eq!(read_all(&log, 0, 4).await, "abcd");
}

#[tokio::test]
async fn a_misplaced_append_is_refused_alone() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(1)).unwrap();
    let (log, c) = storage.create(&meta(1, "/m"), Vec::new(), None).unwrap();
    let (other, c2) = storage.create(&meta(2, "/n"), Vec::new(), None).unwrap();
    // Likely in one batch: the bad append fails, its neighbours commit.
    let bad = log.append(entry(5, "gap"));
    let good = other.append(entry(0, "ok"));
    let next = log.append(entry(0, "fine"));
    c.await.unwrap();
    c2.await.unwrap();
    assert!(matches!(bad.await, Err(StorageError::Corrupt { .. })));
    good.await.unwrap();
    next.await.unwrap();
    assert_eq!(read_all(&log, 0, 4).await, "fine");
    // Appending to a closed stream is refused too (the stream layer never does it).
    log.append(AppendEntry {
        start: 4,
        close: Some(None),
        ..AppendEntry::default()
    })
    .await
    .unwrap();
    assert!(log.append(entry(4, "late")).await.is_err());
}

/// Overwrites the row of stream `id` at `start` in redb (one record of three bytes) with a
/// well-formed row whose checksum does not match, so that a read served by redb fails and one
/// served by the tail cache does not.
fn damage_record(storage: &AcidStorage, id: StreamId, start: u64) {
    let records: [&[u8]; 1] = [b"abX"];
    let mut raw = vec![0u8; codec::row_value_len(&records)];
    // Sealed as if it belonged to another stream: the structure holds, the checksum does not.
    codec::write_row(&mut raw, id + 1, start, &records, codec::Joins::default());
    let txn = storage.shard_of(id).db.begin_write().unwrap();
    txn.open_table(RECORDS)
        .unwrap()
        .insert((id, start), raw.as_slice())
        .unwrap();
    txn.commit().unwrap();
}

/// Records gathered into one row read exactly as records stored alone: from any record
/// boundary inside the row, within a budget that ends inside it, split or refused when `from` is
/// inside a record.
#[tokio::test]
async fn records_sharing_a_row_read_one_by_one() {
    let dir = tempfile::tempdir().unwrap();
    // No tail cache: every read below is served by redb.
    let uncached = per_shard(AcidOptions::new(1, 0));
    let storage = AcidStorage::open(dir.path(), uncached).unwrap();
    let records = ["a", "bb", "ccc", "dddd"].map(|r| Bytes::from_static(r.as_bytes()));
    let (log, c) = storage
        .create(&meta(1, "/r"), records.to_vec(), None)
        .unwrap();
    c.await.unwrap();
    assert_eq!(record_rows(&storage, 1), 1);
    let read = |from, until, budget, split| log.read(from, until, budget, split);
    let parts = |chunk: ReadChunk| {
        let parts: Vec<String> = chunk
            .parts
            .iter()
            .map(|p| String::from_utf8_lossy(p).into_owned())
            .collect();
        (parts, chunk.end)
    };
    let all = parts(read(0, 10, 100, false).await.unwrap());
    assert_eq!(
        all,
        (
            vec!["a".into(), "bb".into(), "ccc".into(), "dddd".into()],
            10
        )
    );
    let from_third = parts(read(3, 10, 100, false).await.unwrap());
    assert_eq!(from_third, (vec!["ccc".into(), "dddd".into()], 10));
    // The budget ends inside the row: whole records only, at least one.
    let budgeted = parts(read(1, 10, 4, false).await.unwrap());
    assert_eq!(budgeted, (vec!["bb".into()], 3));
    let at_least_one = parts(read(6, 10, 1, false).await.unwrap());
    assert_eq!(at_least_one, (vec!["dddd".into()], 10));
    // Inside a record: refused unless the stream may split records.
    assert!(matches!(
        read(4, 10, 100, false).await,
        Err(StorageError::Misaligned { pos: 4 })
    ));
    let split = parts(read(4, 10, 3, true).await.unwrap());
    assert_eq!(split, (vec!["cc".into(), "d".into()], 7));
}

/// A transaction's records of one stream fill a row up to its byte and record caps, then start
/// the next; a restart finds where the last row ends and reads everything back.
#[tokio::test]
async fn rows_are_capped_and_reopen_whole() {
    let dir = tempfile::tempdir().unwrap();
    let big = vec![b'x'; 20 << 10];
    let mut records = vec![Bytes::from(big.clone()); 3];
    records.extend((0..2000).map(|i| Bytes::from(vec![b'0' + (i % 10) as u8])));
    let expected: Vec<u8> = records.iter().flat_map(|r| r.iter().copied()).collect();
    let tail = expected.len() as u64;
    {
        let storage = AcidStorage::open(dir.path(), per_shard(AcidOptions::new(1, 0))).unwrap();
        let (_log, c) = storage.create(&meta(1, "/caps"), records, None).unwrap();
        c.await.unwrap();
        // The three 20 KiB records and the first 810 one-byte ones (what fits the 64 KiB page),
        // then 1 024 one-byte records (the count cap), then the other 166.
        assert_eq!(codec::ROW_PAGE_BYTES, 64 << 10);
        assert!(codec::row_fits_page(813, 3 * (20 << 10) + 810));
        assert!(!codec::row_fits_page(814, 3 * (20 << 10) + 811));
        assert_eq!(codec::ROW_RECORDS, 1024);
        assert_eq!(record_rows(&storage, 1), 3);
    }
    let storage = AcidStorage::open(dir.path(), AcidOptions::new(1, 0)).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(found[&1].state.tail, tail);
    let chunk = found[&1]
        .log
        .read(0, tail, usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(chunk.parts.len(), 2003);
    assert_eq!(chunk.parts.concat(), expected);
    // From the first one-byte record, inside the first row.
    let chunk = found[&1]
        .log
        .read(3 * (20 << 10), tail, 5, false)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), b"01234");
}

/// Rows are as large as fits a 64 KiB redb page, not 64 KiB of data: sixteen 4 KiB records would
/// make a leaf just over 64 KiB, which redb rounds up to a 128 KiB page read whole.
#[tokio::test]
async fn rows_of_4_kib_records_fit_a_64_kib_page() {
    let dir = tempfile::tempdir().unwrap();
    let records: Vec<Bytes> = (0..70u8).map(|i| Bytes::from(vec![i; 4096])).collect();
    let expected: Vec<u8> = records.iter().flat_map(|r| r.iter().copied()).collect();
    let storage = AcidStorage::open(dir.path(), per_shard(AcidOptions::new(1, 0))).unwrap();
    let (log, c) = storage.create(&meta(1, "/pages"), records, None).unwrap();
    c.await.unwrap();
    assert!(codec::row_fits_page(15, 15 * 4096));
    assert!(!codec::row_fits_page(16, 16 * 4096));
    assert_eq!(record_rows(&storage, 1), 5);
    let tail = expected.len() as u64;
    let chunk = log.read(0, tail, usize::MAX, false).await.unwrap();
    assert_eq!(chunk.parts.len(), 70);
    assert_eq!(chunk.parts.concat(), expected);
    // From inside a row to inside a later one, split (a partly served row is copied, a whole one
    // is not: both read the same).
    let chunk = log
        .read(4096 * 5 + 100, tail, 4096 * 9, true)
        .await
        .unwrap();
    let from = 4096 * 5 + 100;
    assert_eq!(chunk.parts.concat(), &expected[from..from + 4096 * 9]);
}

/// A record larger than a row can hold is split across rows (format version 3) and reads back
/// exactly as a record stored whole: from each record boundary, within any budget, split or not,
/// after a restart and after a release that leaves the first row starting inside a record.
#[tokio::test]
async fn records_larger_than_a_row_are_split_across_rows_and_read_whole() {
    let dir = tempfile::tempdir().unwrap();
    let sizes = [65536usize, 10, 100_000, 65536, 3, 200_000, 65536];
    let records: Vec<Bytes> = sizes
        .iter()
        .enumerate()
        .map(|(i, &n)| Bytes::from((0..n).map(|j| (i * 31 + j * 7) as u8).collect::<Vec<u8>>()))
        .collect();
    let expected: Vec<u8> = records.iter().flat_map(|r| r.iter().copied()).collect();
    let bounds: Vec<usize> = std::iter::once(0)
        .chain(sizes.iter().scan(0, |at, n| {
            *at += n;
            Some(*at)
        }))
        .collect();
    let tail = expected.len() as u64;
    {
        let storage = AcidStorage::open(dir.path(), per_shard(AcidOptions::new(1, 0))).unwrap();
        let (_log, c) = storage
            .create(&meta(1, "/split"), records.clone(), None)
            .unwrap();
        c.await.unwrap();
        // Every row fits a page: about one row per page of data.
        let rows = record_rows(&storage, 1);
        let pages = expected.len() / codec::ROW_PAGE_BYTES;
        assert!(rows > pages && rows <= pages + 3, "{rows} rows");
    }
    let storage = AcidStorage::open(dir.path(), AcidOptions::new(1, 0)).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(found[&1].state.tail, tail);
    let log = &found[&1].log;
    for (i, &at) in bounds[..sizes.len()].iter().enumerate() {
        // Whole records from each boundary: a budget below the record still serves it whole.
        for budget in [1, 40_000, 150_000, usize::MAX] {
            let chunk = log.read(at as u64, tail, budget, false).await.unwrap();
            let got = chunk.parts.concat();
            assert_eq!(
                got,
                &expected[at..chunk.end as usize],
                "from {at}, budget {budget}"
            );
            assert!(
                bounds.contains(&(chunk.end as usize)),
                "ends at {}",
                chunk.end
            );
            assert_eq!(chunk.parts[0].len(), sizes[i]);
        }
        // Split reads from inside the record.
        let from = at + sizes[i] / 2;
        let chunk = log.read(from as u64, tail, 50_000, true).await.unwrap();
        let n = (tail as usize - from).min(50_000);
        assert_eq!(chunk.parts.concat(), &expected[from..from + n]);
        if sizes[i] > 1 {
            assert!(matches!(
                log.read(from as u64, tail, 50_000, false).await,
                Err(StorageError::Misaligned { .. })
            ));
        }
    }
    // `until` inside a split record refuses a whole-record read that reaches it.
    let until = (bounds[2] + 70_000) as u64;
    assert!(matches!(
        log.read(bounds[2] as u64, until, usize::MAX, false).await,
        Err(StorageError::Misaligned { .. })
    ));
    let chunk = log
        .read(bounds[2] as u64, until, usize::MAX, true)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), &expected[bounds[2]..until as usize]);
    // Release up to the 3-byte record: the rows of the records before it go, and the row left
    // first starts with the rest of the 65 536-byte record before it.
    log.release(bounds[4] as u64).await.unwrap();
    drop(found);
    drop(storage);
    let storage = AcidStorage::open(dir.path(), AcidOptions::new(1, 0)).unwrap();
    let found = recovered_by_id(&storage);
    let log = &found[&1].log;
    let chunk = log
        .read(bounds[4] as u64, tail, usize::MAX, false)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), &expected[bounds[4]..]);
    assert_eq!(chunk.parts.len(), 3);
}

#[tokio::test]
async fn damaged_records_are_refused_on_read() {
    let dir = tempfile::tempdir().unwrap();
    let uncached = per_shard(AcidOptions::new(1, 0));
    let storage = AcidStorage::open(dir.path(), uncached).unwrap();
    let (log, c) = storage
        .create(&meta(1, "/x"), vec![Bytes::from_static(b"abc")], None)
        .unwrap();
    c.await.unwrap();
    damage_record(&storage, 1, 0);
    assert!(matches!(
        log.read(0, 3, 100, false).await,
        Err(StorageError::Corrupt { .. })
    ));
}

#[tokio::test]
async fn tail_reads_come_from_ram_and_older_ones_from_redb() {
    let dir = tempfile::tempdir().unwrap();
    {
        let storage = AcidStorage::open(dir.path(), per_shard(options(1))).unwrap();
        let (log, c) = storage.create(&meta(1, "/t"), Vec::new(), None).unwrap();
        c.await.unwrap();
        log.append(entry(0, "abc")).await.unwrap();
        log.append(entry(3, "def")).await.unwrap();
        assert_eq!(storage.cache.used(), 6 + 2 * RECORD_OVERHEAD);
        // Damaged on disk, yet the tail read still answers: it never reached redb.
        damage_record(&storage, 1, 3);
        assert_eq!(read_all(&log, 3, 6).await, "def");
        // Removing the stream gives its cache back.
        log.remove().await.unwrap();
        assert_eq!(storage.cache.used(), 0);
    }
    {
        let storage = AcidStorage::open(dir.path(), per_shard(options(1))).unwrap();
        let (log, c) = storage.create(&meta(2, "/u"), Vec::new(), None).unwrap();
        c.await.unwrap();
        log.append(entry(0, "abc")).await.unwrap();
        damage_record(&storage, 2, 0);
    }
    // After a restart nothing is cached: the same read goes to redb and finds the damage.
    let storage = AcidStorage::open(dir.path(), per_shard(options(1))).unwrap();
    let found = recovered_by_id(&storage);
    assert!(matches!(
        found[&2].log.read(0, 3, 100, false).await,
        Err(StorageError::Corrupt { .. })
    ));
    // New appends are cached again, from the recovered tail on.
    found[&2].log.append(entry(3, "xyz")).await.unwrap();
    assert_eq!(read_all(&found[&2].log, 3, 6).await, "xyz");
    assert_eq!(storage.cache.used(), 3 + RECORD_OVERHEAD);
}

/// The stream layer on top of this backend: what a client was told before a restart holds after
/// it, including duplicate detection of a retried closing append.
#[tokio::test]
async fn streams_over_acid_keep_their_promises_across_a_restart() {
    use crate::stream::producer::ProducerRequest;
    use crate::stream::{AppendRequest, CreateRequest, Limits, Streams};
    let limits = Limits {
        max_stream_bytes: 1 << 20,
        max_total_bytes: 1 << 30,
        max_read_bytes: 1 << 20,
        ..Default::default()
    };
    let dir = tempfile::tempdir().unwrap();
    let closing = |body: &'static str| AppendRequest {
        content_type: Some("text/plain".into()),
        body: Bytes::from_static(body.as_bytes()),
        close: true,
        stream_seq: Some("b".into()),
        producer: Some(ProducerRequest {
            id: "w".into(),
            epoch: 1,
            seq: 1,
        }),
    };
    {
        let storage = Arc::new(AcidStorage::open(dir.path(), options(4)).unwrap());
        let streams = Streams::open(storage, limits).unwrap();
        let created = streams
            .create(
                "/s",
                CreateRequest {
                    content_type: Some("text/plain".into()),
                    ttl_secs: Some(3600),
                    body: Bytes::from_static(b"one,"),
                    ..CreateRequest::default()
                },
            )
            .await
            .unwrap();
        assert!(created.created);
        streams
            .append(
                "/s",
                AppendRequest {
                    content_type: Some("text/plain".into()),
                    body: Bytes::from_static(b"two,"),
                    stream_seq: Some("a".into()),
                    producer: Some(ProducerRequest {
                        id: "w".into(),
                        epoch: 1,
                        seq: 0,
                    }),
                    ..AppendRequest::default()
                },
            )
            .await
            .unwrap();
        let out = streams.append("/s", closing("three")).await.unwrap();
        assert_eq!((out.next_offset, out.closed), (13, true));
        streams
            .create("/gone", CreateRequest::default())
            .await
            .unwrap();
        streams.delete("/gone").await.unwrap();
    }
    let storage = Arc::new(AcidStorage::open(dir.path(), options(4)).unwrap());
    let streams = Streams::open(storage, limits).unwrap();
    assert_eq!(streams.len(), 1);
    let head = streams.head("/s").unwrap();
    assert_eq!((head.next_offset, head.closed), (13, true));
    assert_eq!(head.ttl_secs, Some(3600));
    // The retried closing append is recognised as a duplicate, not a write to a closed stream.
    let retry = streams.append("/s", closing("three")).await.unwrap();
    assert!(!retry.stored_data && retry.closed);
    let stream = streams.get("/s", false).unwrap();
    let read = streams.read(&stream, 0).await.unwrap();
    assert_eq!(read.parts.concat(), b"one,two,three");
    assert!(read.at_end());
}

/// Throughput of request/response appends (each task awaits its commit before the next, like an
/// HTTP client) and of tail reads. Run it in release:
/// `cargo test --release -p ds-server --lib acid::tests::bench -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; prints numbers"]
async fn bench_appends_and_tail_reads() {
    const RECORD: usize = 128;
    const SECS: f64 = 2.0;
    // `ACID_BENCH=16x64,1x64` runs only those shards×tasks cells.
    let only: Option<Vec<(u32, usize)>> = std::env::var("ACID_BENCH").ok().map(|cells| {
        cells
            .split(',')
            .filter_map(|c| c.split_once('x'))
            .filter_map(|(s, t)| Some((s.parse().ok()?, t.parse().ok()?)))
            .collect()
    });
    for shards in [1u32, 16] {
        for tasks in [1usize, 16, 64, 256] {
            if only.as_ref().is_some_and(|o| !o.contains(&(shards, tasks))) {
                continue;
            }
            let dir = tempfile::tempdir().unwrap();
            let storage = AcidStorage::open(dir.path(), options(shards)).unwrap();
            let mut logs = Vec::new();
            for id in 1..=tasks as u64 {
                let (log, c) = storage
                    .create(&meta(id, &format!("/b{id}")), Vec::new(), None)
                    .unwrap();
                c.await.unwrap();
                logs.push(log);
            }
            let before = storage.stats();
            let started = std::time::Instant::now();
            let deadline = started + std::time::Duration::from_secs_f64(SECS);
            let handles: Vec<_> = logs
                .iter()
                .map(|log| {
                    let log = log.clone();
                    tokio::spawn(async move {
                        let payload = Bytes::from(vec![b'x'; RECORD]);
                        let mut tail = 0u64;
                        while std::time::Instant::now() < deadline {
                            log.append(AppendEntry {
                                start: tail,
                                data: Some(payload.clone()),
                                ..AppendEntry::default()
                            })
                            .await
                            .unwrap();
                            tail += RECORD as u64;
                        }
                        tail
                    })
                })
                .collect();
            let mut tails = Vec::new();
            for h in handles {
                tails.push(h.await.unwrap());
            }
            let elapsed = started.elapsed().as_secs_f64();
            let after = storage.stats();
            let appends = after.operations - before.operations;
            let txns = after.transactions - before.transactions;
            let per_txn = |micros: u64| micros as f64 / txns.max(1) as f64;
            println!(
                "shards={shards:3} tasks={tasks:3}: {:8.0} appends/s, {:6.1} appends/transaction, \
                 {:6.0} transactions/s, per transaction {:6.0} us apply + {:6.0} us commit",
                appends as f64 / elapsed,
                appends as f64 / txns.max(1) as f64,
                txns as f64 / elapsed,
                per_txn(after.apply_micros - before.apply_micros),
                per_txn(after.commit_micros - before.commit_micros),
            );
            if shards == 16 && tasks == 16 {
                // Live-reader pattern: read the last record of each stream, many times.
                let started = std::time::Instant::now();
                let mut reads = 0u64;
                while started.elapsed().as_secs_f64() < 1.0 {
                    for (log, tail) in logs.iter().zip(&tails) {
                        let c = log
                            .read(tail - RECORD as u64, *tail, 1 << 20, false)
                            .await
                            .unwrap();
                        assert_eq!(c.end, *tail);
                        reads += 1;
                    }
                }
                let per_s = reads as f64 / started.elapsed().as_secs_f64();
                println!("tail reads, one task: {per_s:8.0} reads/s");
                let started = std::time::Instant::now();
                let c = logs[0].read(0, tails[0], 4 << 20, false).await.unwrap();
                println!(
                    "catch-up read of {} bytes in {} records: {:?}",
                    c.end,
                    c.parts.len(),
                    started.elapsed()
                );
            }
        }
    }
}

/// Catch-up from redb (nothing cached): a stream of 1 MiB records read from the start in 4 MiB
/// pages, like `bench/run.sh --scenarios catchup`. Run it in release:
/// `cargo test --release -p ds-server --lib acid::tests::bench_catch_up -- --ignored --nocapture`
#[tokio::test(flavor = "multi_thread")]
#[ignore = "benchmark; prints numbers"]
async fn bench_catch_up_reads() {
    const RECORD: usize = 1 << 20;
    const RECORDS: u64 = 64;
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), AcidOptions::new(16, 0)).unwrap();
    let (log, c) = storage.create(&meta(1, "/c"), Vec::new(), None).unwrap();
    c.await.unwrap();
    let record = Bytes::from(vec![b'c'; RECORD]);
    for i in 0..RECORDS {
        log.append(AppendEntry {
            start: i * RECORD as u64,
            data: Some(record.clone()),
            ..AppendEntry::default()
        })
        .await
        .unwrap();
    }
    let tail = RECORDS * RECORD as u64;
    for pass in 0..4 {
        let started = std::time::Instant::now();
        let mut pos = 0;
        while pos < tail {
            let c = log.read(pos, tail, 4 << 20, true).await.unwrap();
            assert!(c.end > pos);
            pos = c.end;
        }
        let secs = started.elapsed().as_secs_f64();
        println!("catch-up pass {pass}: {:.2} GB/s", tail as f64 / secs / 1e9);
    }
}

/// Random operations, clean reopens and crash-reopens against an in-memory model.
///
/// A crash is simulated by copying the shard files while the store runs, possibly while one
/// more append is being committed, and opening the copy: the copy holds what a `kill -9` at
/// that moment would have left in the page cache, so redb has to repair it on open. Every
/// acknowledged operation must come back; the one in flight must be there whole (data,
/// producer state and `Stream-Seq` together) or not at all.
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    const SLOTS: u64 = 4;
    const PRODUCERS: [&str; 2] = ["p0", "p1"];

    #[derive(Clone, Debug)]
    enum Step {
        Append {
            slot: u64,
            len: usize,
            byte: u8,
            producer: Option<usize>,
            seq: bool,
        },
        Close {
            slot: u64,
        },
        SoftDelete {
            slot: u64,
        },
        Remove {
            slot: u64,
        },
        /// Releases before one of the stream's record boundaries (picked by `at`).
        Release {
            slot: u64,
            at: usize,
        },
        Read {
            slot: u64,
            from: usize,
            max: usize,
        },
        Reopen,
        Crash {
            in_flight: Option<(u64, usize, u8)>,
            /// Whether that append had committed when the process died.
            committed: bool,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0..SLOTS, 1..300usize, any::<u8>(), proptest::option::of(0..PRODUCERS.len()), any::<bool>())
                .prop_map(|(slot, len, byte, producer, seq)| Step::Append { slot, len, byte, producer, seq }),
            1 => (0..SLOTS).prop_map(|slot| Step::Close { slot }),
            1 => (0..SLOTS).prop_map(|slot| Step::SoftDelete { slot }),
            1 => (0..SLOTS).prop_map(|slot| Step::Remove { slot }),
            3 => (0..SLOTS, any::<usize>()).prop_map(|(slot, at)| Step::Release { slot, at }),
            3 => (0..SLOTS, any::<usize>(), 1..2000usize)
                .prop_map(|(slot, from, max)| Step::Read { slot, from, max }),
            1 => Just(Step::Reopen),
            2 => (proptest::option::of((0..SLOTS, 1..300usize, any::<u8>())), any::<bool>())
                .prop_map(|(in_flight, committed)| Step::Crash { in_flight, committed }),
        ]
    }

    #[derive(Clone, Debug, Default, PartialEq)]
    struct ModelStream {
        content: Vec<u8>,
        /// Record boundaries, for unsplittable reads.
        starts: Vec<usize>,
        closed: bool,
        soft_deleted: bool,
        producers: BTreeMap<String, ProducerState>,
        last_seq: Option<String>,
        /// Appends so far, for the next `Stream-Seq` (zero-padded so that it sorts).
        appends: u64,
        /// The retained start.
        released: usize,
    }

    impl ModelStream {
        /// The entry of the next append of `len` bytes of `byte`, and the model after it.
        fn next(
            &self,
            len: usize,
            byte: u8,
            producer: Option<usize>,
            seq: bool,
        ) -> (AppendEntry, ModelStream) {
            let mut after = self.clone();
            let data = vec![byte; len];
            after.starts.push(after.content.len());
            after.content.extend_from_slice(&data);
            after.appends += 1;
            let stream_seq = seq.then(|| format!("{:08}", after.appends));
            if stream_seq.is_some() {
                after.last_seq = stream_seq.clone();
            }
            let producer = producer.map(|p| {
                let id = PRODUCERS[p].to_owned();
                let state = after.producers.get(&id).map_or(
                    ProducerState {
                        epoch: 0,
                        last_seq: 0,
                        last_ms: 0,
                    },
                    |s| ProducerState {
                        epoch: s.epoch,
                        last_seq: s.last_seq + 1,
                        last_ms: 0,
                    },
                );
                after.producers.insert(id.clone(), state);
                (id, state)
            });
            let entry = AppendEntry {
                start: self.content.len() as u64,
                data: Some(Bytes::from(data)),
                close: None,
                stream_seq,
                producer,
            };
            (entry, after)
        }
    }

    struct Live {
        dir: tempfile::TempDir,
        store: AcidStorage,
        logs: BTreeMap<u64, Arc<dyn StreamLog>>,
    }

    fn opts() -> AcidOptions {
        // Small enough that reads are served partly by the tail cache, partly by redb; records
        // of 150 bytes or more referenced in the log, smaller ones copied into rows; segments
        // small enough that they roll, checkpoint, compact and go within a case.
        AcidOptions {
            ref_min_bytes: 150,
            log_segment_bytes: 4096,
            ..AcidOptions::new(2, 700)
        }
    }

    fn open(dir: tempfile::TempDir) -> (Live, Vec<Recovered>) {
        let store = AcidStorage::open(dir.path(), opts()).unwrap();
        let recovered = store.recover().unwrap();
        let live = Live {
            dir,
            store,
            logs: BTreeMap::new(),
        };
        (live, recovered)
    }

    /// A copy of a running store's directory taken while no commit is in progress: what a
    /// process crash at this moment leaves (every write the store issued is in the page cache).
    /// A copy taken during a commit is not one: it reads some pages before the commit writes
    /// them and some after, an image no process crash produces (see
    /// `a_torn_copy_of_a_commit_in_progress_reopens`).
    fn copy_dir(live: &Live) -> tempfile::TempDir {
        // A crash stops everything at once: no segment may be deleted half-way through a copy.
        let _held = live.store.hold_background();
        let from = live.dir.path();
        let to = tempfile::tempdir().unwrap();
        for entry in std::fs::read_dir(from).unwrap() {
            let path = entry.unwrap().path();
            std::fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
        }
        to
    }

    fn snapshot_of(
        m: &ModelStream,
    ) -> (
        u64,
        bool,
        bool,
        BTreeMap<String, ProducerState>,
        Option<String>,
    ) {
        (
            m.content.len() as u64,
            m.closed,
            m.soft_deleted,
            m.producers.clone(),
            m.last_seq.clone(),
        )
    }

    /// Checks the recovered streams against the model, accepting for `maybe` (the stream of an
    /// append in flight at a crash) either its model or the model after that append, and
    /// adopting whichever came back.
    async fn check(
        recovered: Vec<Recovered>,
        model: &mut BTreeMap<u64, ModelStream>,
        maybe: Option<(u64, ModelStream)>,
    ) -> BTreeMap<u64, Arc<dyn StreamLog>> {
        let mut ids: Vec<u64> = recovered.iter().map(|r| r.meta.id).collect();
        ids.sort_unstable();
        let want: Vec<u64> = model.keys().copied().collect();
        assert_eq!(ids, want, "recovered streams");
        let mut logs = BTreeMap::new();
        for r in recovered {
            let id = r.meta.id;
            let s = &r.state;
            let got = (
                s.tail,
                s.closed,
                s.soft_deleted,
                s.producers.clone().into_iter().collect::<BTreeMap<_, _>>(),
                s.last_seq.clone(),
            );
            let m = match &maybe {
                Some((maybe_id, after)) if *maybe_id == id && got == snapshot_of(after) => {
                    model.insert(id, after.clone());
                    after
                }
                _ => &model[&id],
            };
            assert_eq!(
                got,
                snapshot_of(m),
                "stream {id}: all of an append or none of it"
            );
            let tail = m.content.len() as u64;
            let released = m.released as u64;
            assert_eq!(s.released, released, "stream {id}: the retained start");
            assert_eq!(s.own_bytes, tail - released);
            if released > 0 {
                assert!(matches!(
                    r.log.read(0, tail, usize::MAX, true).await,
                    Err(StorageError::Released { start }) if start == released
                ));
            }
            let (read, end) = read_all_bytes(&r.log, released, tail, usize::MAX, true).await;
            assert_eq!((read.as_slice(), end), (&m.content[m.released..], tail));
            logs.insert(id, r.log);
        }
        logs
    }

    async fn read_all_bytes(
        log: &Arc<dyn StreamLog>,
        from: u64,
        until: u64,
        max: usize,
        split: bool,
    ) -> (Vec<u8>, u64) {
        let chunk = log.read(from, until, max, split).await.unwrap();
        (chunk.parts.concat(), chunk.end)
    }

    /// A copy taken while a commit is being written holds, page by page, either the old or the
    /// new bytes: like the disk after a power loss, where any subset of unsynced writes may have
    /// landed. redb should then open it at the last synced commit or the new one. redb 4.5.0
    /// refused about 1 copy in 300 ("Page r0.256/0 extends past the end of its region, which has
    /// 255 pages", from its allocator rebuild), which once failed the model test in CI while its
    /// crash step still raced the commit; redb 4.6.0 opened 3 000 of 3 000. A failure is rare and
    /// slow to find, so this stays out of the default run.
    /// `ACID_TORN_ITERS=2000 cargo test -p ds-server --lib a_torn_copy -- --ignored`
    #[test]
    #[ignore = "slow: loops torn mid-commit images (redb 4.5.0 failed 1 in 300); see the doc comment"]
    fn a_torn_copy_of_a_commit_in_progress_reopens() {
        let iters: usize = std::env::var("ACID_TORN_ITERS")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(300);
        let rt = tokio::runtime::Builder::new_multi_thread()
            .worker_threads(2)
            .enable_all()
            .build()
            .unwrap();
        let mut failures = Vec::new();
        rt.block_on(async {
            for iter in 0..iters {
                let (live, recovered) = open(tempfile::tempdir().unwrap());
                assert!(recovered.is_empty());
                let mut model: BTreeMap<u64, ModelStream> = BTreeMap::new();
                let mut logs = BTreeMap::new();
                // Enough data that the shard file grows while the test runs.
                for id in 1..=3u64 {
                    let (log, c) = live
                        .store
                        .create(&meta(id, &format!("/t{id}")), Vec::new(), None)
                        .unwrap();
                    c.await.unwrap();
                    let mut m = ModelStream::default();
                    for k in 0..(iter % 40) {
                        let (entry, after) = m.next(64 + k * 7, k as u8, Some(k % 2), k % 3 == 0);
                        log.append(entry).await.unwrap();
                        m = after;
                    }
                    logs.insert(id, log);
                    model.insert(id, m);
                }
                let id = 1 + (iter as u64 % 3);
                let (entry, after) = model[&id].next(200, 7, Some(0), true);
                let commit = logs[&id].append(entry);
                let copy = copy_dir(&live);
                commit.await.unwrap();
                drop(logs);
                drop(live);
                match AcidStorage::open(copy.path(), opts()).and_then(|s| {
                    let r = s.recover()?;
                    Ok((s, r))
                }) {
                    Ok((_store, recovered)) => {
                        check(recovered, &mut model, Some((id, after))).await;
                    }
                    Err(e) => failures.push(format!("iteration {iter}: {e}")),
                }
            }
        });
        assert!(
            failures.is_empty(),
            "{} of {iters}: {failures:#?}",
            failures.len()
        );
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn acid_always_recovers_what_it_acknowledged(steps in proptest::collection::vec(step(), 1..50)) {
            let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
            rt.block_on(async {
                let mut model: BTreeMap<u64, ModelStream> = BTreeMap::new();
                let (mut live, recovered) = open(tempfile::tempdir().unwrap());
                assert!(recovered.is_empty());
                // Ids are never reused, like the stream layer's.
                let mut next_id = 1u64;
                let mut slot: BTreeMap<u64, u64> = BTreeMap::new();
                for step in steps {
                    match step {
                        Step::Append { slot: s, len, byte, producer, seq } => {
                            let id = match slot.get(&s) {
                                Some(id) if model.get(id).is_some_and(|m| !m.closed) => *id,
                                Some(id) if model.contains_key(id) => continue,
                                _ => {
                                    let id = next_id;
                                    next_id += 1;
                                    let (log, c) = live.store.create(&meta(id, &format!("/m{id}")), Vec::new(), None).unwrap();
                                    c.await.unwrap();
                                    live.logs.insert(id, log);
                                    model.insert(id, ModelStream::default());
                                    slot.insert(s, id);
                                    id
                                }
                            };
                            let (entry, after) = model[&id].next(len, byte, producer, seq);
                            live.logs[&id].append(entry).await.unwrap();
                            model.insert(id, after);
                        }
                        Step::Close { slot: s } => {
                            let Some(id) = slot.get(&s).copied() else { continue };
                            let Some(m) = model.get_mut(&id) else { continue };
                            if m.closed { continue; }
                            live.logs[&id].append(AppendEntry {
                                start: m.content.len() as u64,
                                close: Some(None),
                                ..AppendEntry::default()
                            }).await.unwrap();
                            m.closed = true;
                        }
                        Step::SoftDelete { slot: s } => {
                            let Some(id) = slot.get(&s).copied() else { continue };
                            let Some(m) = model.get_mut(&id) else { continue };
                            live.logs[&id].mark_soft_deleted().await.unwrap();
                            m.soft_deleted = true;
                        }
                        Step::Remove { slot: s } => {
                            let Some(id) = slot.get(&s).copied() else { continue };
                            if model.remove(&id).is_none() { continue; }
                            live.logs.remove(&id).unwrap().remove().await.unwrap();
                        }
                        Step::Release { slot: s, at } => {
                            let Some(id) = slot.get(&s).copied() else { continue };
                            let Some(m) = model.get_mut(&id) else { continue };
                            if m.starts.is_empty() { continue; }
                            // A record boundary: a record's start, or the tail.
                            let before = if at % (m.starts.len() + 1) == m.starts.len() {
                                m.content.len()
                            } else {
                                m.starts[at % m.starts.len()]
                            };
                            live.logs[&id].release(before as u64).await.unwrap();
                            m.released = m.released.max(before);
                        }
                        Step::Read { slot: s, from, max } => {
                            let Some(id) = slot.get(&s).copied() else { continue };
                            let Some(m) = model.get(&id) else { continue };
                            if m.content.len() <= m.released { continue; }
                            let tail = m.content.len();
                            let log = &live.logs[&id];
                            if m.released > 0 {
                                assert!(matches!(
                                    log.read((from % m.released) as u64, tail as u64, max, true).await,
                                    Err(StorageError::Released { start }) if start == m.released as u64
                                ));
                            }
                            // A byte read from anywhere retained, cut at the budget.
                            let from = m.released + from % (tail - m.released);
                            let (got, end) = read_all_bytes(log, from as u64, tail as u64, max, true).await;
                            assert_eq!(end as usize, from + got.len());
                            assert_eq!(got, &m.content[from..from + got.len()]);
                            assert!(got.len() == max.min(tail - from));
                            // A whole-record read from a record boundary: at least one record.
                            let kept: Vec<usize> = m.starts.iter().copied().filter(|&st| st >= m.released).collect();
                            let start = kept[from % kept.len()];
                            let (got, end) = read_all_bytes(log, start as u64, tail as u64, max, false).await;
                            assert!(m.starts.contains(&(end as usize)) || end as usize == tail);
                            assert_eq!(got, &m.content[start..end as usize]);
                            assert!(end as usize > start);
                        }
                        Step::Reopen => {
                            let Live { dir, store, logs } = live;
                            drop(logs);
                            drop(store);
                            let (reopened, recovered) = open(dir);
                            live = reopened;
                            live.logs = check(recovered, &mut model, None).await;
                        }
                        Step::Crash { in_flight, committed } => {
                            // An append racing the crash, if its stream can take one: either it
                            // committed before the process died (the image must hold it) or it
                            // had not (the image must not, though the live store acknowledges
                            // it after the image was taken).
                            let pending = in_flight.and_then(|(s, len, byte)| {
                                let id = *slot.get(&s)?;
                                let m = model.get(&id).filter(|m| !m.closed)?;
                                let (entry, after) = m.next(len, byte, Some(0), true);
                                Some((id, entry, after))
                            });
                            let copy = match pending {
                                Some((id, entry, after)) if committed => {
                                    live.logs[&id].append(entry).await.unwrap();
                                    model.insert(id, after);
                                    copy_dir(&live)
                                }
                                Some((id, entry, _)) => {
                                    let copy = copy_dir(&live);
                                    live.logs[&id].append(entry).await.unwrap();
                                    copy
                                }
                                None => copy_dir(&live),
                            };
                            let Live { dir, store, logs } = live;
                            drop(logs);
                            drop(store);
                            drop(dir);
                            let (reopened, recovered) = open(copy);
                            live = reopened;
                            live.logs = check(recovered, &mut model, None).await;
                        }
                    }
                }
                // Whatever happened, a final clean restart finds the model.
                let Live { dir, store, logs } = live;
                drop(logs);
                drop(store);
                let (reopened, recovered) = open(dir);
                check(recovered, &mut model, None).await;
                drop(reopened);
            });
        }
    }
}

/// Copies a running store's files: what `kill -9` would leave (every write the store issued is
/// in the page cache; the commit log is written before anything is acknowledged).
fn crash_copy(from: &std::path::Path) -> tempfile::TempDir {
    let to = tempfile::tempdir().unwrap();
    for entry in std::fs::read_dir(from).unwrap() {
        let path = entry.unwrap().path();
        std::fs::copy(&path, to.path().join(path.file_name().unwrap())).unwrap();
    }
    to
}

/// Streams 1..=`streams` (paths `/s<id>`), each with `appends` appends of 3 bytes: the id
/// and the append's number (`numbered`).
async fn numbered_streams(
    storage: &AcidStorage,
    streams: u64,
    appends: u64,
) -> Vec<Arc<dyn StreamLog>> {
    let mut logs = Vec::new();
    for id in 1..=streams {
        let (log, c) = storage
            .create(&meta(id, &format!("/s{id}")), Vec::new(), None)
            .unwrap();
        c.await.unwrap();
        for i in 0..appends {
            log.append(entry(i * 3, &format!("{id}{i:02}")))
                .await
                .unwrap();
        }
        logs.push(log);
    }
    logs
}

/// What [`numbered_streams`] wrote to stream `id`.
fn numbered(id: u64, appends: u64) -> String {
    (0..appends).map(|i| format!("{id}{i:02}")).collect()
}

fn log_segments(dir: &std::path::Path) -> Vec<std::path::PathBuf> {
    commit_log::segments(dir)
        .unwrap()
        .into_iter()
        .map(|(_, p)| p)
        .collect()
}

#[tokio::test]
async fn the_commit_log_replays_after_a_crash_cuts_a_torn_tail_and_refuses_corruption() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
    let logs = numbered_streams(&storage, 4, 10).await;
    let image = crash_copy(dir.path());
    drop(logs);
    drop(storage);
    let segments = log_segments(image.path());
    assert_eq!(segments.len(), 1, "one segment, not yet checkpointed");
    let clean_len = std::fs::metadata(&segments[0]).unwrap().len();

    // A write the crash tore: half a record at the end.
    let torn = crash_copy(image.path());
    let torn_segment = log_segments(torn.path()).pop().unwrap();
    let mut raw = std::fs::read(&torn_segment).unwrap();
    raw.extend_from_slice(&[40, 0, 0, 0, 1, 2, 3, 4, 9, 9]);
    std::fs::write(&torn_segment, &raw).unwrap();
    {
        let reopened = AcidStorage::open(torn.path(), options(2)).unwrap();
        let found = recovered_by_id(&reopened);
        assert_eq!(found.len(), 4);
        for id in 1..=4u64 {
            let want = numbered(id, 10);
            assert_eq!(read_all(&found[&id].log, 0, 30).await, want, "stream {id}");
            assert_eq!(found[&id].state.tail, 30);
        }
        // Replayed, checkpointed and deleted; a fresh segment took its place.
        assert!(!torn_segment.exists());
        assert_eq!(log_segments(torn.path()).len(), 1);
    }

    // A flipped byte inside a record of a segment that is not the last: refused, with the file.
    let corrupt = crash_copy(image.path());
    let first = log_segments(corrupt.path()).pop().unwrap();
    let mut raw = std::fs::read(&first).unwrap();
    // Inside the first record's payload (the file also holds zeros ahead of the records).
    let at = commit_log::MAGIC.len() + 12;
    raw[at] ^= 0x55;
    std::fs::write(&first, &raw).unwrap();
    std::fs::write(
        commit_log::segment_path(corrupt.path(), u64::MAX / 2),
        commit_log::MAGIC,
    )
    .unwrap();
    let err = AcidStorage::open(corrupt.path(), options(2)).unwrap_err();
    let message = err.to_string();
    assert!(
        matches!(err, StorageError::Corrupt { .. }) && message.contains("commit-"),
        "{message}"
    );
    assert!(clean_len > commit_log::MAGIC.len() as u64);
}

#[tokio::test]
async fn full_commit_log_segments_are_checkpointed_and_deleted() {
    let dir = tempfile::tempdir().unwrap();
    let small = AcidOptions {
        log_segment_bytes: 2048,
        ..options(4)
    };
    let mut want = Vec::new();
    {
        let storage = AcidStorage::open(dir.path(), small).unwrap();
        let (log, c) = storage.create(&meta(7, "/big"), Vec::new(), None).unwrap();
        c.await.unwrap();
        for i in 0..300u64 {
            let piece = format!("{i:05}-");
            log.append(entry(want.len() as u64, &piece)).await.unwrap();
            want.extend_from_slice(piece.as_bytes());
        }
        // The engine deletes a full segment once every shard has checkpointed past it.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while log_segments(dir.path()).len() > 2 && std::time::Instant::now() < deadline {
            tokio::time::sleep(std::time::Duration::from_millis(20)).await;
        }
        assert!(
            log_segments(dir.path()).len() <= 2,
            "{:?}",
            log_segments(dir.path())
        );
        // Reads reach across what redb has and what is still only in RAM.
        let (read, end) = {
            let chunk = log
                .read(0, want.len() as u64, usize::MAX, true)
                .await
                .unwrap();
            (chunk.parts.concat(), chunk.end)
        };
        assert_eq!((read, end), (want.clone(), want.len() as u64));
    }
    let storage = AcidStorage::open(dir.path(), small).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(found[&7].state.tail, want.len() as u64);
    let chunk = found[&7]
        .log
        .read(0, want.len() as u64, usize::MAX, true)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), want);
}

/// A large record lengthens the segment without zeros (a hole past it reads as zeros, the end
/// of the records); small records after it go on writing zeros ahead, and crash images taken
/// after either replay everything.
#[tokio::test]
async fn large_records_lengthen_the_commit_log_without_zeros_and_replay() {
    let dir = tempfile::tempdir().unwrap();
    let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
    let (log, c) = storage.create(&meta(3, "/bulk"), Vec::new(), None).unwrap();
    c.await.unwrap();
    let mut want = String::new();
    let mut images = Vec::new();
    for (i, len) in [10usize, 1_500_000, 7, 5].into_iter().enumerate() {
        let piece: String = std::iter::repeat_n((b'a' + i as u8) as char, len).collect();
        log.append(entry(want.len() as u64, &piece)).await.unwrap();
        want.push_str(&piece);
        if len > 1000 {
            // Zeros would have reached the next MiB; the file ends within a page of the data.
            let segment = log_segments(dir.path()).pop().unwrap();
            let on_disk = std::fs::metadata(&segment).unwrap().len();
            let slack = on_disk - want.len() as u64;
            assert!(slack < 8192, "{slack} bytes past the records");
        }
        images.push((crash_copy(dir.path()), want.clone()));
    }
    drop(log);
    drop(storage);
    for (image, want) in images {
        let reopened = AcidStorage::open(image.path(), options(2)).unwrap();
        let found = recovered_by_id(&reopened);
        assert_eq!(found[&3].state.tail, want.len() as u64);
        assert_eq!(read_all(&found[&3].log, 0, want.len() as u64).await, want);
    }
}

/// Rows of `id` that reference the commit log, and rows that hold their records.
fn row_kinds(storage: &AcidStorage, id: StreamId) -> (usize, usize) {
    let txn = storage.shard_of(id).db.begin_read().unwrap();
    let records = txn.open_table(RECORDS).unwrap();
    let mut kinds = (0, 0);
    for item in records.range((id, 0)..=(id, u64::MAX)).unwrap() {
        let (k, v) = item.unwrap();
        let row = codec::read_row(id, k.value().1, v.value()).unwrap();
        if row.segment().is_some() {
            kinds.0 += 1;
        } else {
            kinds.1 += 1;
        }
    }
    kinds
}

/// `n` records of `len` bytes, each of one byte value from `seed` on.
fn records_of(n: usize, len: usize, seed: u8) -> Vec<Bytes> {
    (0..n)
        .map(|i| Bytes::from(vec![seed.wrapping_add(i as u8); len]))
        .collect()
}

async fn append_all(log: &Arc<dyn StreamLog>, from: u64, records: &[Bytes]) -> u64 {
    let mut pos = from;
    for r in records {
        log.append(AppendEntry {
            start: pos,
            data: Some(r.clone()),
            close: None,
            stream_seq: None,
            producer: None,
        })
        .await
        .unwrap();
        pos += r.len() as u64;
    }
    pos
}

async fn read_whole(log: &Arc<dyn StreamLog>, from: u64, until: u64) -> Vec<u8> {
    let chunk = log.read(from, until, usize::MAX, false).await.unwrap();
    assert_eq!(chunk.end, until);
    chunk.parts.concat()
}

async fn wait_for(what: &str, mut done: impl FnMut() -> bool) {
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
    while !done() {
        assert!(
            std::time::Instant::now() < deadline,
            "timed out waiting for {what}"
        );
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn large_records_stay_in_the_commit_log_and_are_read_from_it_mapped_or_copied() {
    let dir = tempfile::tempdir().unwrap();
    let opts = AcidOptions {
        log_segment_bytes: 256 << 10,
        ..options(2)
    };
    // Small records are copied into rows; records of REF_MIN_BYTES or more are referenced.
    let small = records_of(10, 100, 1);
    let large = records_of(40, 16 << 10, 50);
    let mut want = Vec::new();
    {
        let storage = AcidStorage::open(dir.path(), opts).unwrap();
        let (log, c) = storage.create(&meta(1, "/a"), Vec::new(), None).unwrap();
        c.await.unwrap();
        let mut pos = append_all(&log, 0, &small).await;
        pos = append_all(&log, pos, &large).await;
        append_all(&log, pos, &small).await;
        for r in small.iter().chain(&large).chain(&small) {
            want.extend_from_slice(r);
        }
    }
    // A create's initial records are referenced too (each behind its length in the log; an
    // empty one in between).
    let initial = vec![
        Bytes::from(vec![b'x'; 5000]),
        Bytes::new(),
        Bytes::from(vec![b'y'; 6000]),
        Bytes::from(vec![b'z'; 100]),
    ];
    let initial_bytes: Vec<u8> = initial.concat();
    {
        let storage = AcidStorage::open(dir.path(), opts).unwrap();
        let (log, c) = storage
            .create(&meta(2, "/init"), initial.clone(), None)
            .unwrap();
        c.await.unwrap();
        assert_eq!(read_whole(&log, 0, 11_100).await, initial_bytes);
    }
    // 640 KiB of large records: the shards hold references, the log segments the bytes.
    let storage = AcidStorage::open(dir.path(), opts).unwrap();
    assert!(row_kinds(&storage, 2).0 >= 1);
    let (refs, inline) = row_kinds(&storage, 1);
    assert!(
        refs >= 1 && inline >= 1,
        "{refs} reference rows, {inline} others"
    );
    let row_bytes = {
        let txn = storage.shard_of(1).db.begin_read().unwrap();
        let records = txn.open_table(RECORDS).unwrap();
        records
            .range((1, 0)..=(1, u64::MAX))
            .unwrap()
            .map(|item| item.unwrap().1.value().len())
            .sum::<usize>()
    };
    assert!(
        row_bytes < 8 << 10,
        "rows of 640 KiB of large records hold {row_bytes} bytes"
    );
    assert!(log_segments(dir.path()).len() >= 3, "segments are kept");
    let found = recovered_by_id(&storage);
    assert_eq!(found[&1].state.tail, want.len() as u64);
    assert_eq!(read_whole(&found[&2].log, 0, 11_100).await, initial_bytes);
    assert_eq!(
        read_whole(&found[&2].log, 5000, 11_100).await,
        initial_bytes[5000..]
    );
    let log = &found[&1].log;
    assert_eq!(read_whole(log, 0, want.len() as u64).await, want);
    // From inside the large ones, on record boundaries, with budgets that cut reads short.
    let at = 1000 + 5 * (16 << 10);
    assert_eq!(
        read_whole(log, at as u64, want.len() as u64).await,
        want[at..]
    );
    let chunk = log
        .read(at as u64, want.len() as u64, 1, false)
        .await
        .unwrap();
    assert_eq!(chunk.end, at as u64 + (16 << 10), "one whole record");
    assert_eq!(chunk.parts.concat(), want[at..at + (16 << 10)]);
    let chunk = log
        .read(at as u64 + 7, at as u64 + 99, 1000, true)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), want[at + 7..at + 99]);
    drop(found);
    drop(storage);
    // The same with reads copied rather than mapped.
    let copied = AcidOptions {
        map_reads: false,
        ..opts
    };
    let storage = AcidStorage::open(dir.path(), copied).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(read_whole(&found[&1].log, 0, want.len() as u64).await, want);
    let chunk = found[&1]
        .log
        .read(at as u64 + 7, at as u64 + 99, 1000, true)
        .await
        .unwrap();
    assert_eq!(chunk.parts.concat(), want[at + 7..at + 99]);
}

#[tokio::test]
async fn segments_are_deleted_once_unreferenced_and_compacted_once_mostly_dead() {
    let dir = tempfile::tempdir().unwrap();
    let opts = AcidOptions {
        log_segment_bytes: 128 << 10,
        ..options(2)
    };
    let storage = AcidStorage::open(dir.path(), opts).unwrap();
    let (keep, c) = storage.create(&meta(1, "/keep"), Vec::new(), None).unwrap();
    c.await.unwrap();
    let (gone, c) = storage.create(&meta(2, "/gone"), Vec::new(), None).unwrap();
    c.await.unwrap();
    let (trim, c) = storage.create(&meta(3, "/trim"), Vec::new(), None).unwrap();
    c.await.unwrap();
    // Each segment holds a little of `keep` and much of the others: without compaction,
    // `keep` would pin every segment.
    let (mut kpos, mut gpos, mut tpos) = (0, 0, 0);
    let mut want = Vec::new();
    let mut trim_starts = Vec::new();
    for round in 0..12u8 {
        let k = records_of(1, 8 << 10, round);
        kpos = append_all(&keep, kpos, &k).await;
        want.extend_from_slice(&k[0]);
        gpos = append_all(&gone, gpos, &records_of(4, 16 << 10, round)).await;
        trim_starts.push(tpos);
        tpos = append_all(&trim, tpos, &records_of(2, 16 << 10, round)).await;
    }
    let total = u64::from(12u32) * ((8 + 64 + 32) << 10);
    let segment_bytes = |dir: &std::path::Path| -> u64 {
        log_segments(dir)
            .iter()
            .map(|p| std::fs::metadata(p).map_or(0, |m| m.len()))
            .sum()
    };
    assert!(
        segment_bytes(dir.path()) >= total,
        "the log holds every record"
    );
    // Remove one stream, release most of another.
    gone.remove().await.unwrap();
    trim.release(trim_starts[10]).await.unwrap();
    // What is left referenced: `keep` (96 KiB) and the last 2 rounds of `trim` (64 KiB), a
    // little of each segment. The flusher checkpoints, compacts the segments now mostly dead,
    // checkpoints again and the engine deletes them: the log shrinks to the open segment.
    // (The open segment's file is longer than its records: zeros are written ahead.)
    let before = log_segments(dir.path()).len();
    assert!(before >= 9, "{before} segments");
    wait_for("dead segments to go", || {
        log_segments(dir.path()).len() <= 2
    })
    .await;
    assert_eq!(read_whole(&keep, 0, kpos).await, want);
    let trimmed = read_whole(&trim, trim_starts[10], tpos).await;
    assert_eq!(trimmed.len(), 64 << 10);
    assert!(trimmed[..16 << 10].iter().all(|&b| b == 10));
    let (refs, inline) = row_kinds(&storage, 1);
    assert!(
        inline >= 1,
        "compaction copied records into rows ({refs} still reference)"
    );
    drop((keep, gone, trim));
    drop(storage);
    // Across a restart, and after a crash-like copy of the directory.
    let storage = AcidStorage::open(dir.path(), opts).unwrap();
    let found = recovered_by_id(&storage);
    assert!(!found.contains_key(&2));
    assert_eq!(read_whole(&found[&1].log, 0, kpos).await, want);
    assert_eq!(found[&3].state.released, trim_starts[10]);
    let copy = {
        let _held = storage.hold_background();
        crash_copy(dir.path())
    };
    drop(found);
    drop(storage);
    let storage = AcidStorage::open(copy.path(), opts).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(read_whole(&found[&1].log, 0, kpos).await, want);
    assert_eq!(
        read_whole(&found[&3].log, trim_starts[10], tpos).await,
        trimmed
    );
}

#[tokio::test]
async fn a_store_written_without_references_reads_on_with_them() {
    // Rows written with every record copied in (as layout version 3 wrote them, and as the
    // per-shard mode writes them) and rows referencing the log, in one stream.
    let dir = tempfile::tempdir().unwrap();
    let inline = AcidOptions {
        ref_min_bytes: usize::MAX,
        ..options(2)
    };
    let first = records_of(5, 100 << 10, 1);
    let second = records_of(5, 100 << 10, 9);
    let mut want = Vec::new();
    let pos = {
        let storage = AcidStorage::open(dir.path(), inline).unwrap();
        let (log, c) = storage.create(&meta(4, "/s"), Vec::new(), None).unwrap();
        c.await.unwrap();
        append_all(&log, 0, &first).await
    };
    for r in first.iter().chain(&second) {
        want.extend_from_slice(r);
    }
    let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
    assert_eq!(row_kinds(&storage, 4).0, 0);
    let found = recovered_by_id(&storage);
    let end = append_all(&found[&4].log, pos, &second).await;
    drop(found);
    drop(storage);
    let storage = AcidStorage::open(dir.path(), options(2)).unwrap();
    let (refs, inline_rows) = row_kinds(&storage, 4);
    assert!(refs >= 1 && inline_rows >= 5, "{refs} / {inline_rows}");
    let found = recovered_by_id(&storage);
    assert_eq!(read_whole(&found[&4].log, 0, end).await, want);
    // Per-shard mode (no commit log written) still reads the referenced records.
    drop(found);
    drop(storage);
    let storage = AcidStorage::open(dir.path(), per_shard(options(2))).unwrap();
    let found = recovered_by_id(&storage);
    assert_eq!(read_whole(&found[&4].log, 0, end).await, want);
}

/// After a crash, a shard whose last durable commit is a checkpoint (commit-log mode) opens
/// from the allocator state that commit saved; redb rebuilds it only for shards whose last
/// durable commit saved none (per-shard mode's), reading the whole file. Either way every
/// acknowledged append is there.
#[tokio::test]
async fn after_a_crash_checkpointed_shards_open_without_a_full_repair() {
    for commit_log in [true, false] {
        let opts = AcidOptions {
            commit_log,
            ..options(4)
        };
        let dir = tempfile::tempdir().unwrap();
        let storage = AcidStorage::open(dir.path(), opts).unwrap();
        assert_eq!(storage.repaired_shards(), 0, "a new store");
        let logs = numbered_streams(&storage, 8, 20).await;
        if commit_log {
            // Let the flusher apply them (commits without a sync, after the checkpoint).
            for _ in 0..500 {
                if storage.stats().operations >= 8 * 21 {
                    break;
                }
                tokio::time::sleep(std::time::Duration::from_millis(10)).await;
            }
            assert!(storage.stats().operations >= 8 * 21, "flushed into redb");
        }
        let image = {
            let _held = storage.hold_background();
            crash_copy(dir.path())
        };
        let reopened = AcidStorage::open(image.path(), opts).unwrap();
        if commit_log {
            assert_eq!(
                reopened.repaired_shards(),
                0,
                "checkpoints saved the allocator"
            );
        } else {
            assert!(
                reopened.repaired_shards() > 0,
                "per-shard commits save none"
            );
        }
        let found = recovered_by_id(&reopened);
        assert_eq!(found.len(), 8);
        for id in 1..=8u64 {
            assert_eq!(
                read_all(&found[&id].log, 0, 60).await,
                numbered(id, 20),
                "stream {id}"
            );
        }
        drop(logs);
    }
}
