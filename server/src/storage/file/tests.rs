use std::sync::Arc;

use bytes::Bytes;

use super::*;
use crate::storage::{AppendEntry, ProducerState, ProducerTuple, Storage, StreamMeta};

fn options(durable: bool) -> FileOptions {
    FileOptions {
        durable,
        segment_bytes: 64 << 20,
        max_open_files: 8,
        map_reads: true,
        cache_bytes: 1 << 20,
        fast_sync_interval: std::time::Duration::from_secs(1),
    }
}

/// Writes a segment's bytes as a crash, a power loss or an older build left them: with no
/// checkpoint (one is written only once the log it covers is durable, so a state of the disk
/// with unsynced damage has none that covers it; and start-up does not read what a checkpoint
/// covers, so damage to it is found by reads, not at start-up).
fn write_damaged(
    path: impl AsRef<std::path::Path>,
    bytes: impl AsRef<[u8]>,
) -> std::io::Result<()> {
    let path = path.as_ref();
    std::fs::write(path, bytes)?;
    match std::fs::remove_file(path.with_file_name(checkpoint::FILE)) {
        Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
        _ => Ok(()),
    }
}

fn meta(id: u64) -> Arc<StreamMeta> {
    Arc::new(StreamMeta::new(
        id,
        &format!("/s/{id}"),
        "text/plain",
        None,
        1,
    ))
}

async fn read_all(log: &Arc<dyn StreamLog>, until: u64) -> Vec<u8> {
    let chunk = log.read(0, until, usize::MAX, true).await.unwrap();
    chunk.parts.iter().flat_map(|p| p.iter().copied()).collect()
}

fn append(start: u64, data: &'static [u8]) -> AppendEntry {
    AppendEntry {
        start,
        data: Some(Bytes::from_static(data)),
        ..AppendEntry::default()
    }
}

#[tokio::test]
async fn everything_comes_back_after_reopen() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        assert!(store.recover().unwrap().is_empty());
        let (log, commit) = store
            .create(&meta(1), vec![Bytes::from_static(b"ab")], None)
            .unwrap();
        commit.await.unwrap();
        log.append(AppendEntry {
            start: 2,
            data: Some(Bytes::from_static(b"cd")),
            stream_seq: Some("s9".into()),
            producer: Some((
                "p".into(),
                ProducerState {
                    epoch: 3,
                    last_seq: 4,
                    last_ms: 0,
                },
            )),
            close: Some(Some(ProducerTuple {
                id: "p".into(),
                epoch: 3,
                seq: 4,
            })),
        })
        .await
        .unwrap();
        let (log2, c2) = store.create(&meta(2), vec![], None).unwrap();
        c2.await.unwrap();
        log2.mark_soft_deleted().await.unwrap();
        let (log3, c3) = store.create(&meta(3), vec![], None).unwrap();
        c3.await.unwrap();
        log3.append(append(0, b"gone")).await.unwrap();
        log3.remove().await.unwrap();
    }
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let mut recovered = store.recover().unwrap();
    recovered.sort_by_key(|r| r.meta.id);
    assert_eq!(recovered.len(), 2, "removed stream must stay removed");
    let r1 = &recovered[0];
    assert_eq!(r1.meta, meta(1));
    assert_eq!(r1.state.tail, 4);
    assert!(r1.state.closed);
    assert_eq!(r1.state.closed_by.as_ref().map(|c| c.seq), Some(4));
    assert_eq!(r1.state.last_seq.as_deref(), Some("s9"));
    assert_eq!(
        r1.state.producers.get("p"),
        Some(&ProducerState {
            epoch: 3,
            last_seq: 4,
            last_ms: 0
        })
    );
    assert_eq!(read_all(&r1.log, 4).await, b"abcd");
    assert!(recovered[1].state.soft_deleted);
}

#[tokio::test]
async fn a_torn_tail_is_truncated_and_earlier_data_kept() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(false)).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"hello")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let good_len = data_end(&bytes);
    // The file was extended ahead of its frames: zeros follow them.
    assert_eq!(bytes.len() as u64, wal::GROW_STEP);
    // Half of another frame where the next batch goes, as if the process died mid-write.
    let partial = frame::encode_append(1, &append(5, b"world"));
    put_at(
        &mut bytes,
        good_len,
        &partial.bytes[..partial.bytes.len() - 3],
    );
    write_damaged(&seg, bytes).unwrap();
    let good_len = good_len as u64;

    let store = FileStorage::open(dir.path(), options(false)).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, 5);
    assert_eq!(read_all(&recovered[0].log, 5).await, b"hello");
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), good_len);
    // And the log keeps working after the truncation.
    recovered[0].log.append(append(5, b"!")).await.unwrap();
    assert_eq!(read_all(&recovered[0].log, 6).await, b"hello!");
}

/// Where the frames of a segment end (the zeros it was extended with follow).
fn data_end(data: &[u8]) -> usize {
    let mut pos = frame::SEGMENT_HEADER_LEN as usize;
    while let Ok((_, n)) = frame::decode(&data[pos..]) {
        pos += n;
    }
    pos
}

/// Writes `bytes` over `data` at `at`, extending it if they run past its end.
fn put_at(data: &mut Vec<u8>, at: usize, bytes: &[u8]) {
    if data.len() < at + bytes.len() {
        data.resize(at + bytes.len(), 0);
    }
    data[at..at + bytes.len()].copy_from_slice(bytes);
}

/// The sequence number of the last BATCH frame of a segment's bytes.
fn last_batch_seq(data: &[u8]) -> u64 {
    let mut pos = frame::SEGMENT_HEADER_LEN as usize;
    let mut last = 0;
    while let Ok((d, n)) = frame::decode(&data[pos..]) {
        if let frame::Decoded::Batch { seq, .. } = d {
            last = seq;
        }
        pos += n;
    }
    last
}

/// A power loss can leave any subset of the pages of the last batch (written, never synced,
/// never acknowledged) on disk: its later frames without its earlier ones. Recovery drops that
/// batch whole and keeps every batch before it, which were synced before it was written.
#[tokio::test]
async fn a_last_batch_with_any_page_missing_is_dropped_whole() {
    // Which part of the unsynced batch never reached the disk.
    for damage in ["its first page", "a frame in its middle", "its last bytes"] {
        let dir = tempfile::tempdir().unwrap();
        {
            let store = FileStorage::open(dir.path(), options(true)).unwrap();
            let (log, c) = store.create(&meta(1), vec![], None).unwrap();
            c.await.unwrap();
            log.append(append(0, b"hello")).await.unwrap();
        }
        let seg = wal::segment_path(&wal_dir(dir.path()), 1);
        let mut bytes = std::fs::read(&seg).unwrap();
        let end = data_end(&bytes);
        // The batch the writer would write next: three appends, the first longer than a page.
        let first: &'static [u8] = Box::leak(vec![b'x'; 5000].into_boxed_slice());
        let mut frames = Vec::new();
        for (start, data) in [(5, first), (5005, &b"second"[..]), (5011, &b"third"[..])] {
            frames.extend_from_slice(&frame::encode_append(1, &append(start, data)).bytes);
        }
        let mut batch =
            // Its durable mark, as file-durable writes it: everything before this batch.
            frame::encode_batch(last_batch_seq(&bytes) + 1, frames.len() as u32, (1, end as u64))
                .to_vec();
        batch.extend_from_slice(&frames);
        match damage {
            "its first page" => batch[..4096].fill(0),
            "a frame in its middle" => {
                let at = batch.windows(6).position(|w| w == b"second").unwrap();
                batch[at] ^= 0x20;
            }
            _ => {
                let n = batch.len();
                batch[n - 3..].fill(0);
            }
        }
        put_at(&mut bytes, end, &batch);
        write_damaged(&seg, &bytes).unwrap();

        {
            let store = FileStorage::open(dir.path(), options(true)).unwrap_or_else(|e| {
                panic!("{damage}: a torn last batch must not stop start-up: {e}")
            });
            let recovered = store.recover().unwrap();
            assert_eq!(recovered[0].state.tail, 5, "{damage}");
            assert_eq!(read_all(&recovered[0].log, 5).await, b"hello", "{damage}");
            // Truncated at the batch's start: none of its frames is left behind.
            assert_eq!(
                std::fs::metadata(&seg).unwrap().len(),
                end as u64,
                "{damage}"
            );
            recovered[0].log.append(append(5, b"!")).await.unwrap();
        }
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(read_all(&recovered[0].log, 6).await, b"hello!", "{damage}");
    }
}

/// Damage in a batch that a later batch follows cannot be a torn write (the writer writes a
/// batch only after the one before it is synced): start-up stops and names the place.
#[tokio::test]
async fn a_damaged_batch_before_a_later_batch_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"first")).await.unwrap();
        log.append(append(5, b"second")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    // Zero the BATCH frame that opens the batch of "first", as if that write was lost: the batch
    // of "second" after it proves the batch of "first" had been synced, so this is corruption.
    let at = bytes.windows(5).position(|w| w == b"first").unwrap();
    let batch_start = at - 20 - frame::FRAME_HEADER_LEN - frame::BATCH_FRAME_LEN;
    bytes[batch_start..batch_start + frame::BATCH_FRAME_LEN].fill(0);
    write_damaged(&seg, bytes).unwrap();
    let err = FileStorage::open(dir.path(), options(true))
        .err()
        .expect("damage before a later batch must stop start-up")
        .to_string();
    assert!(err.contains("0000000001.seg"), "{err}");
    assert!(err.contains(&format!("at byte {batch_start}")), "{err}");
}

/// file-fast with a background sync that never comes during the test.
fn fast_unsynced() -> FileOptions {
    FileOptions {
        fast_sync_interval: std::time::Duration::from_secs(3600),
        ..options(false)
    }
}

/// Start positions of the BATCH frames of a segment's bytes, with their durable marks.
fn batches(data: &[u8]) -> Vec<(usize, frame::LogPos)> {
    let mut pos = frame::SEGMENT_HEADER_LEN as usize;
    let mut out = Vec::new();
    while let Ok((d, n)) = frame::decode(&data[pos..]) {
        if let frame::Decoded::Batch { durable, .. } = d {
            out.push((pos, durable));
        }
        pos += n;
    }
    out
}

/// file-fast never syncs an append before acknowledging it, so after a power loss the log may
/// hold damage with intact batches after it (the OS writes pages back in any order). Their
/// durable marks show the damage was never synced: recovery drops the damaged batch and all
/// after it, and starts.
#[tokio::test]
async fn file_fast_after_a_power_loss_drops_everything_from_the_first_unsynced_damage() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), fast_unsynced()).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"a")).await.unwrap();
        log.append(append(1, b"b")).await.unwrap();
        log.append(append(2, b"c")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let marks = batches(&bytes);
    assert_eq!(marks.len(), 4, "create, a, b, c");
    assert!(
        marks
            .iter()
            .all(|(_, m)| *m == (1, frame::SEGMENT_HEADER_LEN)),
        "nothing was synced after the start: {marks:?}"
    );
    // The page holding "b" never reached the disk; the one holding "c" did.
    let (b_start, _) = marks[2];
    bytes[b_start..marks[3].0].fill(0);
    write_damaged(&seg, &bytes).unwrap();
    {
        let store = FileStorage::open(dir.path(), fast_unsynced())
            .unwrap_or_else(|e| panic!("an unsynced tear must not stop start-up: {e}"));
        let recovered = store.recover().unwrap();
        assert_eq!(recovered[0].state.tail, 1);
        assert_eq!(read_all(&recovered[0].log, 1).await, b"a");
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), b_start as u64);
        recovered[0].log.append(append(1, b"B")).await.unwrap();
    }
    let store = FileStorage::open(dir.path(), fast_unsynced()).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(read_all(&recovered[0].log, 2).await, b"aB");
}

/// What a restart found is synced at start-up, so a batch written after it vouches for it:
/// damage there is corruption, not a torn write.
#[tokio::test]
async fn file_fast_damage_before_a_later_durable_mark_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), fast_unsynced()).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"a")).await.unwrap();
    }
    {
        let store = FileStorage::open(dir.path(), fast_unsynced()).unwrap();
        let recovered = store.recover().unwrap();
        recovered[0].log.append(append(1, b"b")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let marks = batches(&bytes);
    let (a_start, _) = marks[1];
    assert!(marks[2].1 > (1, a_start as u64), "{marks:?}");
    bytes[a_start + frame::BATCH_FRAME_LEN + frame::FRAME_HEADER_LEN + 20] ^= 0x01;
    write_damaged(&seg, &bytes).unwrap();
    let err = FileStorage::open(dir.path(), fast_unsynced())
        .err()
        .expect("damage to synced data must stop start-up")
        .to_string();
    assert!(err.contains("0000000001.seg"), "{err}");
}

/// The background sync moves the durable mark that later batches carry.
#[tokio::test]
async fn file_fast_syncs_in_the_background_and_later_batches_say_so() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileOptions {
        fast_sync_interval: std::time::Duration::from_millis(5),
        ..options(false)
    };
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let (log, c) = store.create(&meta(1), vec![], None).unwrap();
    c.await.unwrap();
    log.append(append(0, b"x")).await.unwrap();
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let first_end = {
        let bytes = std::fs::read(&seg).unwrap();
        data_end(&bytes) as u64
    };
    // Liveness, not speed: give the syncer up to 10 s to pass the first appends.
    let mut tail = 1;
    let covered = loop {
        log.append(append(tail, b"y")).await.unwrap();
        tail += 1;
        let bytes = std::fs::read(&seg).unwrap();
        let last_mark = batches(&bytes).last().unwrap().1;
        if last_mark >= (1, first_end) {
            break true;
        }
        if tail > 1000 {
            break false;
        }
        tokio::time::sleep(std::time::Duration::from_millis(10)).await;
    };
    assert!(covered, "no batch carried a mark past the first appends");
}

/// Creates stream 1 and appends eight 1 500-byte chunks of `byte` (with 4 KiB segments: two
/// chunks a segment, so several segments); returns the chunk.
async fn one_stream_over_segments(
    dir: &std::path::Path,
    opts: &FileOptions,
    byte: u8,
) -> &'static [u8] {
    let chunk: &'static [u8] = Box::leak(vec![byte; 1500].into_boxed_slice());
    let store = FileStorage::open(dir, opts.clone()).unwrap();
    let (log, c) = store.create(&meta(1), vec![], None).unwrap();
    c.await.unwrap();
    for i in 0..8u64 {
        log.append(append(i * 1500, chunk)).await.unwrap();
    }
    chunk
}

/// In file-fast a torn write can sit in an older segment (rotated, not yet synced) with newer
/// segments after it; their marks show they were never synced either: they are removed.
#[tokio::test]
async fn file_fast_tear_in_an_older_segment_removes_the_segments_after_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileOptions {
        segment_bytes: 4096,
        ..fast_unsynced()
    };
    let chunk = one_stream_over_segments(dir.path(), &opts, b'z').await;
    let wal_dir = wal_dir(dir.path());
    let count = || seg_ids(&wal_dir).len();
    assert!(count() >= 3, "the appends span several segments");
    let seg1 = wal::segment_path(&wal_dir, 1);
    let mut bytes = std::fs::read(&seg1).unwrap();
    let marks = batches(&bytes);
    // Damage the second append (the third batch) of the first segment.
    let (start, _) = marks[2];
    bytes[start + frame::BATCH_FRAME_LEN + 40] ^= 0x10;
    write_damaged(&seg1, &bytes).unwrap();
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, 1500);
    assert_eq!(read_all(&recovered[0].log, 1500).await, chunk);
    assert_eq!(count(), 1, "the segments after the tear are gone");
    assert_eq!(std::fs::metadata(&seg1).unwrap().len(), start as u64);
}

/// A file-fast segment whose batches never reached the disk (its header did: it is synced at
/// rotation) reads as empty; the newer segments after it hold later appends of the same
/// streams. Recovery must not keep those without what came before them.
#[tokio::test]
async fn file_fast_an_older_segment_that_lost_its_batches_takes_the_later_ones_with_it() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileOptions {
        segment_bytes: 4096,
        ..fast_unsynced()
    };
    one_stream_over_segments(dir.path(), &opts, b'q').await;
    let wal_dir = wal_dir(dir.path());
    let count = || seg_ids(&wal_dir).len();
    assert!(count() >= 3);
    let seg1 = wal::segment_path(&wal_dir, 1);
    let mut bytes = std::fs::read(&seg1).unwrap();
    bytes[frame::SEGMENT_HEADER_LEN as usize..].fill(0);
    write_damaged(&seg1, &bytes).unwrap();
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let recovered = store.recover().unwrap();
    assert!(
        recovered.is_empty(),
        "the stream's creation was lost with segment 1"
    );
    assert_eq!(count(), 1, "the segments after the lost one are gone");
}

/// In file-durable every later batch vouches for all before it: damage in an older segment is
/// corruption.
#[tokio::test]
async fn file_durable_damage_in_an_older_segment_refuses_to_start() {
    let dir = tempfile::tempdir().unwrap();
    let opts = FileOptions {
        segment_bytes: 4096,
        ..options(true)
    };
    one_stream_over_segments(dir.path(), &opts, b'r').await;
    let seg1 = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg1).unwrap();
    let (start, _) = batches(&bytes)[2];
    bytes[start + frame::BATCH_FRAME_LEN + 40] ^= 0x10;
    write_damaged(&seg1, &bytes).unwrap();
    let err = FileStorage::open(dir.path(), opts)
        .err()
        .expect("damage to synced data must stop start-up")
        .to_string();
    assert!(err.contains("0000000001.seg"), "{err}");
}

/// Stream data may contain bytes that decode as a BATCH frame. Its mark is believed only up to
/// its own position, so a crafted frame cannot turn a torn write into a refusal to start.
#[tokio::test]
async fn a_batch_frame_inside_stream_data_cannot_vouch_for_the_log() {
    let dir = tempfile::tempdir().unwrap();
    let forged: &'static [u8] = Box::leak(
        frame::encode_batch(u64::MAX, 0, (u32::MAX, u64::MAX))
            .to_vec()
            .into_boxed_slice(),
    );
    {
        let store = FileStorage::open(dir.path(), fast_unsynced()).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"a")).await.unwrap();
        log.append(append(1, b"b")).await.unwrap();
        log.append(append(2, forged)).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let marks = batches(&bytes);
    // "b" never reached the disk; the batch holding the forged frame did.
    let (b_start, _) = marks[2];
    bytes[b_start..marks[3].0].fill(0);
    write_damaged(&seg, &bytes).unwrap();
    let store = FileStorage::open(dir.path(), fast_unsynced())
        .unwrap_or_else(|e| panic!("a forged mark must not stop start-up: {e}"));
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, 1);
}

/// file-fast deletes a dead segment only once the REMOVE that killed it is durable: a power
/// loss must never keep the deletion and lose what allowed it.
#[tokio::test]
async fn file_fast_deletes_a_dead_segment_only_after_its_remove_is_synced() {
    for (interval, deleted) in [(3_600_000u64, false), (5, true)] {
        let dir = tempfile::tempdir().unwrap();
        let opts = FileOptions {
            segment_bytes: 4096,
            fast_sync_interval: std::time::Duration::from_millis(interval),
            ..options(false)
        };
        let chunk: &'static [u8] = Box::leak(vec![b's'; 1500].into_boxed_slice());
        let store = FileStorage::open(dir.path(), opts).unwrap();
        let (doomed, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        // Two chunks fill segment 1; the third starts segment 2, where the other stream lives.
        for i in 0..3u64 {
            doomed.append(append(i * 1500, chunk)).await.unwrap();
        }
        let (other, c) = store.create(&meta(2), vec![], None).unwrap();
        c.await.unwrap();
        other.append(append(0, chunk)).await.unwrap();
        doomed.remove().await.unwrap();
        let seg1 = wal::segment_path(&wal_dir(dir.path()), 1);
        // Keep writing; with a short interval the syncer passes the REMOVE and a later batch
        // runs the clean-up (liveness: up to 1000 appends, 10 ms apart).
        let mut tail = 1500;
        for _ in 0..1000 {
            other.append(append(tail, b"x")).await.unwrap();
            tail += 1;
            if !seg1.exists() {
                break;
            }
            if !deleted && tail > 1520 {
                break;
            }
            tokio::time::sleep(std::time::Duration::from_millis(10)).await;
        }
        assert_eq!(!seg1.exists(), deleted, "sync interval {interval} ms");
    }
}

/// Segments written by a build before batches (format version 1: frames without BATCH frames)
/// are read; new batches go to a new segment of the current version.
#[tokio::test]
async fn a_version_1_log_is_read_and_continued_in_a_new_segment() {
    let dir = tempfile::tempdir().unwrap();
    drop(FileStorage::open(dir.path(), options(true)).unwrap());
    let seg1 = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut v1 = frame::segment_header().to_vec();
    v1[8..12].copy_from_slice(&1u32.to_le_bytes());
    let create = frame::CreateMeta {
        meta: StreamMeta::clone(&meta(1)),
        closed: false,
    };
    v1.extend_from_slice(&frame::encode_create(&create, &[]).bytes);
    v1.extend_from_slice(&frame::encode_append(1, &append(0, b"old")).bytes);
    write_damaged(&seg1, &v1).unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(read_all(&recovered[0].log, 3).await, b"old");
        recovered[0].log.append(append(3, b"new")).await.unwrap();
    }
    assert_eq!(
        std::fs::read(&seg1).unwrap(),
        v1,
        "a version 1 segment is not written to"
    );
    let seg2 = std::fs::read(wal::segment_path(&wal_dir(dir.path()), 2)).unwrap();
    assert_eq!(&seg2[8..12], &frame::VERSION.to_le_bytes());
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, 6);
    assert_eq!(read_all(&recovered[0].log, 6).await, b"oldnew");
}

/// Segments are extended in steps ahead of their frames; recovery takes the zeros after the last
/// frame for free space, and a frame whose own bytes end in zeros for data.
#[tokio::test]
async fn zeros_after_the_frames_are_free_space_and_zeros_in_a_frame_are_data() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"a\0\0")).await.unwrap();
        log.append(append(3, b"\0\0\0\0")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), wal::GROW_STEP);
    // Written zeros, not a hole: a sync into allocated blocks writes no metadata.
    use std::os::unix::fs::MetadataExt;
    let allocated = std::fs::metadata(&seg).unwrap().blocks() * 512;
    assert!(
        allocated >= wal::GROW_STEP,
        "only {allocated} bytes allocated"
    );
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(recovered[0].state.tail, 7);
        assert_eq!(read_all(&recovered[0].log, 7).await, b"a\0\0\0\0\0\0");
        // Nothing was taken for a torn write, and the next append lands after the last frame.
        assert_eq!(std::fs::metadata(&seg).unwrap().len(), wal::GROW_STEP);
        recovered[0].log.append(append(7, b"\0")).await.unwrap();
        assert_eq!(read_all(&recovered[0].log, 8).await, b"a\0\0\0\0\0\0\0");
    }
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, 8);
    assert_eq!(read_all(&recovered[0].log, 8).await, b"a\0\0\0\0\0\0\0");
}

/// A batch larger than the step extends the file past it, in whole steps.
#[tokio::test]
async fn a_batch_past_the_extended_end_extends_the_file_again() {
    let dir = tempfile::tempdir().unwrap();
    let big: &'static [u8] =
        Box::leak(vec![7u8; (wal::GROW_STEP + 10) as usize].into_boxed_slice());
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, big)).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    assert_eq!(std::fs::metadata(&seg).unwrap().len(), 2 * wal::GROW_STEP);
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let recovered = store.recover().unwrap();
    assert_eq!(recovered[0].state.tail, big.len() as u64);
}

#[tokio::test]
async fn a_corrupt_byte_before_the_tail_refuses_to_start_naming_file_and_position() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        log.append(append(0, b"first")).await.unwrap();
        log.append(append(5, b"second")).await.unwrap();
    }
    let seg = wal::segment_path(&wal_dir(dir.path()), 1);
    let mut bytes = std::fs::read(&seg).unwrap();
    let at = bytes.windows(5).position(|w| w == b"first").unwrap();
    bytes[at] ^= 0xff;
    write_damaged(&seg, bytes).unwrap();
    let err = FileStorage::open(dir.path(), options(true))
        .err()
        .expect("corruption must stop start-up")
        .to_string();
    assert!(err.contains("0000000001.seg"), "{err}");
    assert!(err.contains("at byte"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn concurrent_appends_share_syncs() {
    let dir = tempfile::tempdir().unwrap();
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let mut logs = Vec::new();
    for id in 0..8 {
        let (log, c) = store.create(&meta(id), vec![], None).unwrap();
        c.await.unwrap();
        logs.push(log);
    }
    let (batches_before, ops_before) = store.commit_stats();
    let mut tasks = Vec::new();
    for log in &logs {
        // Submit in order per stream (as the stream layer does), await together.
        let commits: Vec<_> = (0..50u64).map(|i| log.append(append(i, b"x"))).collect();
        tasks.push(tokio::spawn(futures::future::try_join_all(commits)));
    }
    for t in tasks {
        t.await.unwrap().unwrap();
    }
    let (batches, ops) = store.commit_stats();
    let (batches, ops) = (batches - batches_before, ops - ops_before);
    assert_eq!(ops, 400);
    assert!(batches < ops / 4, "{batches} batches for {ops} appends");
    for log in &logs {
        assert_eq!(read_all(log, 50).await, vec![b'x'; 50]);
    }
}

#[tokio::test]
async fn segments_rotate_and_dead_ones_are_deleted_oldest_first() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(true);
    opts.segment_bytes = 256;
    let wal = wal_dir(dir.path());
    let count = |wal: &std::path::Path| seg_ids(wal).len();
    {
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        let (keep, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        let mut doomed = Vec::new();
        for id in 2..10 {
            let (log, c) = store.create(&meta(id), vec![], None).unwrap();
            c.await.unwrap();
            log.append(append(0, &[7u8; 100])).await.unwrap();
            doomed.push(log);
        }
        keep.append(append(0, b"kept")).await.unwrap();
        assert!(count(&wal) > 3, "expected rotation");
        for log in doomed {
            log.remove().await.unwrap();
        }
        // Segment 1 holds stream 1's CREATE frame and 4 live bytes. With 256-byte segments its
        // state is too large to be worth moving for one segment, but the log stays within
        // twice its live bytes plus two segments (`Writer::forward`).
        wait_for_segments(&wal, 4);
        drop(store);
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        let recovered = store.recover().unwrap();
        assert_eq!(recovered.len(), 1);
        assert_eq!(read_all(&recovered[0].log, 4).await, b"kept");
        let keep = recovered[0].log.clone();
        keep.remove().await.unwrap();
        // Clean-up runs on the writer thread right after the acknowledgement.
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while count(&wal) > 1 {
            assert!(
                std::time::Instant::now() < deadline,
                "{} segments left",
                count(&wal)
            );
            std::thread::sleep(std::time::Duration::from_millis(5));
        }
        assert!(!wal::segment_path(&wal, 1).exists());
    }
    let store = FileStorage::open(dir.path(), opts).unwrap();
    assert!(store.recover().unwrap().is_empty());
}

/// Waits (with a deadline) until the log directory holds at most `n` segments.
fn wait_for_segments(wal: &std::path::Path, n: usize) {
    let count = || seg_ids(wal).len();
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while count() > n {
        assert!(
            std::time::Instant::now() < deadline,
            "{} segments left, expected at most {n}",
            count()
        );
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
}

fn seg_ids(wal: &std::path::Path) -> Vec<u32> {
    let mut ids: Vec<u32> = std::fs::read_dir(wal)
        .unwrap()
        .filter_map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .strip_suffix(".seg")?
                .parse()
                .ok()
        })
        .collect();
    ids.sort_unstable();
    ids
}

#[tokio::test]
async fn released_segments_go_and_idle_streams_states_are_written_forward() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(durable);
        opts.segment_bytes = 4096;
        opts.fast_sync_interval = std::time::Duration::from_millis(2);
        let wal = wal_dir(dir.path());
        let producer = ProducerState {
            epoch: 3,
            last_seq: 9,
            last_ms: 0,
        };
        {
            let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
            // An idle stream: its CREATE frame and a state-only append sit in segment 1.
            let (idle, c) = store.create(&meta(1), vec![], None).unwrap();
            c.await.unwrap();
            idle.append(AppendEntry {
                start: 0,
                close: Some(None),
                stream_seq: Some("s-1".into()),
                producer: Some(("p".into(), producer)),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
            let (soft, c) = store.create(&meta(3), vec![], None).unwrap();
            c.await.unwrap();
            soft.mark_soft_deleted().await.unwrap();
            // A busy stream whose readers release everything right behind the writer.
            let (busy, c) = store.create(&meta(2), vec![], None).unwrap();
            c.await.unwrap();
            let mut tail = 0u64;
            for i in 0..400u64 {
                busy.append(append(tail, &[b'b'; 100])).await.unwrap();
                tail += 100;
                if i % 3 == 0 && i < 390 {
                    busy.release(tail).await.unwrap();
                }
            }
            busy.release(tail - 100).await.unwrap();
            assert!(matches!(
                busy.read(0, tail, 100, true).await,
                Err(StorageError::Released { start }) if start == tail - 100
            ));
            assert_eq!(
                busy.read(tail - 100, tail, 1000, true)
                    .await
                    .unwrap()
                    .parts
                    .concat(),
                vec![b'b'; 100]
            );
            // 40 000 bytes went through 4 KiB segments: only the newest few remain, and the
            // first (the idle streams' CREATE frames) is among the deleted.
            wait_for_segments(&wal, 4);
            assert!(!wal::segment_path(&wal, 1).exists());
            // Releasing below the retained start changes nothing.
            busy.release(100).await.unwrap();
        }
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        let mut streams = store.recover().unwrap();
        streams.sort_by_key(|r| r.meta.id);
        assert_eq!(
            streams.iter().map(|r| r.meta.id).collect::<Vec<_>>(),
            vec![1, 2, 3]
        );
        let idle = &streams[0];
        assert_eq!(idle.meta, meta(1));
        assert!(idle.state.closed);
        assert_eq!(idle.state.last_seq.as_deref(), Some("s-1"));
        assert_eq!(idle.state.producers.get("p"), Some(&producer));
        assert!(streams[2].state.soft_deleted);
        let busy = &streams[1];
        assert_eq!(
            (busy.state.tail, busy.state.released, busy.state.own_bytes),
            (40_000, 39_900, 100),
            "durable: {durable}"
        );
        assert!(matches!(
            busy.log.read(39_800, 40_000, 1000, true).await,
            Err(StorageError::Released { start: 39_900 })
        ));
        assert_eq!(
            busy.log
                .read(39_900, 40_000, 1000, true)
                .await
                .unwrap()
                .parts
                .concat(),
            vec![b'b'; 100]
        );
        // It goes on: appends, a release to the tail, and another reopen.
        busy.log.append(append(40_000, b"more")).await.unwrap();
        busy.log.release(40_004).await.unwrap();
        drop(streams);
        drop(store);
        let store = FileStorage::open(dir.path(), opts).unwrap();
        let streams = store.recover().unwrap();
        let busy = streams.iter().find(|r| r.meta.id == 2).unwrap();
        assert_eq!((busy.state.tail, busy.state.released), (40_004, 40_004));
        let c = busy.log.read(40_004, 40_004, 10, true).await.unwrap();
        assert!(c.parts.is_empty());
    }
}

/// A stream that is never released (no subscription) must not keep every later segment on
/// the disk: its few retained records are moved forward with its state.
#[tokio::test]
async fn retained_records_of_a_stream_never_released_are_moved_forward() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(true);
    opts.segment_bytes = 4096;
    let wal = wal_dir(dir.path());
    {
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        let (slow, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        slow.append(append(0, b"never released")).await.unwrap();
        let (busy, c) = store.create(&meta(2), vec![], None).unwrap();
        c.await.unwrap();
        for i in 0..400u64 {
            busy.append(append(i * 100, &[b'x'; 100])).await.unwrap();
            busy.release((i + 1) * 100).await.unwrap();
        }
        slow.append(append(14, b"!")).await.unwrap();
        wait_for_segments(&wal, 4);
        assert!(seg_ids(&wal)[0] > 1, "{:?}", seg_ids(&wal));
        assert_eq!(
            slow.read(0, 15, 100, true).await.unwrap().parts.concat(),
            b"never released!"
        );
    }
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let mut streams = store.recover().unwrap();
    streams.sort_by_key(|r| r.meta.id);
    assert_eq!(read_all(&streams[0].log, 15).await, b"never released!");
    assert_eq!(streams[0].state.released, 0);
    assert_eq!(
        (streams[1].state.tail, streams[1].state.released),
        (40_000, 40_000)
    );
}

#[tokio::test]
async fn a_version_2_log_is_read_and_continued_in_a_version_3_segment() {
    let dir = tempfile::tempdir().unwrap();
    {
        let store = FileStorage::open(dir.path(), options(true)).unwrap();
        let (log, c) = store
            .create(&meta(1), vec![Bytes::from_static(b"old")], None)
            .unwrap();
        c.await.unwrap();
        log.append(append(3, b"-data")).await.unwrap();
    }
    // The frames of version 2 are those of version 3 without RELEASE and STATE: relabel the
    // segment as a version 2 build would have written it.
    let wal = wal_dir(dir.path());
    let path = wal::segment_path(&wal, 1);
    let mut data = std::fs::read(&path).unwrap();
    data[8..12].copy_from_slice(&2u32.to_le_bytes());
    write_damaged(&path, data).unwrap();
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let streams = store.recover().unwrap();
    assert_eq!(read_all(&streams[0].log, 8).await, b"old-data");
    assert_eq!(
        seg_ids(&wal),
        vec![1, 2],
        "a new segment of this build's format"
    );
    let header = std::fs::read(wal::segment_path(&wal, 2)).unwrap();
    assert_eq!(&header[8..12], &frame::VERSION.to_le_bytes());
    assert_eq!(frame::VERSION, 3);
    streams[0].log.release(3).await.unwrap();
    drop(streams);
    drop(store);
    let store = FileStorage::open(dir.path(), options(true)).unwrap();
    let streams = store.recover().unwrap();
    assert_eq!(streams[0].state.released, 3);
    assert_eq!(
        streams[0]
            .log
            .read(3, 8, 100, true)
            .await
            .unwrap()
            .parts
            .concat(),
        b"-data"
    );
}

#[tokio::test]
async fn reads_past_the_cache_come_from_disk() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(false);
    opts.cache_bytes = 0;
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let (log, c) = store
        .create(&meta(1), vec![Bytes::from_static(b"abc")], None)
        .unwrap();
    c.await.unwrap();
    log.append(append(3, b"defg")).await.unwrap();
    assert_eq!(read_all(&log, 7).await, b"abcdefg");
    let chunk = log.read(2, 7, 2, true).await.unwrap();
    assert_eq!(chunk.parts.concat(), b"cd");
    assert_eq!(chunk.end, 4);
    assert!(matches!(
        log.read(1, 7, 100, false).await,
        Err(StorageError::Misaligned { pos: 1 })
    ));
}

#[test]
fn a_second_server_on_the_same_directory_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let _first = FileStorage::open(dir.path(), options(false)).unwrap();
    let err = FileStorage::open(dir.path(), options(false))
        .err()
        .expect("second open must fail")
        .to_string();
    assert!(err.contains("another ds-server"), "{err}");
}

#[test]
fn a_directory_with_other_content_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    std::fs::write(dir.path().join("something"), b"x").unwrap();
    assert!(FileStorage::open(dir.path(), options(false)).is_err());
}

/// Random operations, reopens, torn tails and corrupt bytes against an in-memory model.
mod model {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;
    use crate::storage::file::frame;

    #[derive(Clone, Debug)]
    enum Step {
        Append {
            stream: u64,
            len: usize,
            byte: u8,
        },
        Close {
            stream: u64,
        },
        Remove {
            stream: u64,
        },
        /// Releases the stream before one of its record boundaries (picked by `at`).
        Release {
            stream: u64,
            at: usize,
        },
        Reopen,
        TornTail {
            garbage: Vec<u8>,
        },
        CorruptByte {
            frame: usize,
            at: usize,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            6 => (0..4u64, 1..120usize, any::<u8>())
                .prop_map(|(stream, len, byte)| Step::Append { stream, len, byte }),
            1 => (0..4u64).prop_map(|stream| Step::Close { stream }),
            1 => (0..4u64).prop_map(|stream| Step::Remove { stream }),
            3 => (0..4u64, any::<usize>()).prop_map(|(stream, at)| Step::Release { stream, at }),
            2 => Just(Step::Reopen),
            1 => proptest::collection::vec(any::<u8>(), 1..40)
                .prop_map(|garbage| Step::TornTail { garbage }),
            1 => (any::<usize>(), any::<usize>())
                .prop_map(|(frame, at)| Step::CorruptByte { frame, at }),
        ]
    }

    #[derive(Default, Debug, Clone, PartialEq)]
    struct ModelStream {
        content: Vec<u8>,
        closed: bool,
        /// The retained start.
        released: u64,
        /// Where each record ends.
        ends: Vec<u64>,
    }

    struct Live {
        store: FileStorage,
        logs: BTreeMap<u64, Arc<dyn StreamLog>>,
    }

    // file-durable: every batch's durable mark covers all before it, so damage anywhere before
    // the last batch is corruption. (file-fast's marks lag; its tears have their own tests.)
    fn opts() -> FileOptions {
        FileOptions {
            durable: true,
            segment_bytes: 600,
            max_open_files: 3,
            map_reads: true,
            cache_bytes: 256,
            fast_sync_interval: std::time::Duration::from_millis(2),
        }
    }

    async fn check(
        live: &Live,
        recovered: Vec<Recovered>,
        model: &BTreeMap<u64, ModelStream>,
    ) -> BTreeMap<u64, Arc<dyn StreamLog>> {
        let mut logs = BTreeMap::new();
        let ids: Vec<u64> = recovered.iter().map(|r| r.meta.id).collect();
        let want: Vec<u64> = model.keys().copied().collect();
        assert_eq!(ids, want, "recovered streams");
        for r in recovered {
            let m = &model[&r.meta.id];
            let tail = m.content.len() as u64;
            assert_eq!(r.state.tail, tail);
            assert_eq!(r.state.closed, m.closed);
            assert_eq!(r.state.released, m.released, "released");
            assert_eq!(r.state.own_bytes, tail - m.released);
            if m.released > 0 {
                assert!(matches!(
                    r.log.read(0, tail, usize::MAX, true).await,
                    Err(StorageError::Released { start }) if start == m.released
                ));
            }
            let got = r
                .log
                .read(m.released, tail, usize::MAX, true)
                .await
                .unwrap();
            assert_eq!(got.end, tail);
            assert_eq!(got.parts.concat(), m.content[m.released as usize..]);
            logs.insert(r.meta.id, r.log);
        }
        let _ = &live.store;
        logs
    }

    /// Frames of all segments as (segment path, start, len, opens a batch), in log order.
    fn frames(dir: &std::path::Path) -> Vec<(std::path::PathBuf, usize, usize, bool)> {
        let mut segs: Vec<_> = std::fs::read_dir(wal_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        let mut out = Vec::new();
        for path in segs {
            let data = std::fs::read(&path).unwrap();
            let mut pos = frame::SEGMENT_HEADER_LEN as usize;
            while let Ok((d, n)) = frame::decode(&data[pos..]) {
                out.push((
                    path.clone(),
                    pos,
                    n,
                    matches!(d, frame::Decoded::Batch { .. }),
                ));
                pos += n;
            }
        }
        out
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 64, .. ProptestConfig::default() })]

        #[test]
        fn the_log_always_recovers_to_the_model_or_refuses_corruption(steps in proptest::collection::vec(step(), 1..60)) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                let mut model: BTreeMap<u64, ModelStream> = BTreeMap::new();
                let mut live = Live { store: FileStorage::open(dir.path(), opts()).unwrap(), logs: BTreeMap::new() };
                // Ids are never reused, like the stream layer's.
                let mut next_id = 1u64;
                let mut slot: BTreeMap<u64, u64> = BTreeMap::new();
                for step in steps {
                    match step {
                        Step::Append { stream, len, byte } => {
                            let id = match slot.get(&stream) {
                                Some(id) if model.get(id).is_some_and(|m| !m.closed) => *id,
                                Some(id) if model.contains_key(id) => continue,
                                _ => {
                                    let id = next_id;
                                    next_id += 1;
                                    let (log, c) = live.store.create(&meta(id), vec![], None).unwrap();
                                    c.await.unwrap();
                                    live.logs.insert(id, log);
                                    model.insert(id, ModelStream::default());
                                    slot.insert(stream, id);
                                    id
                                }
                            };
                            let m = model.get_mut(&id).unwrap();
                            let data = vec![byte; len];
                            live.logs[&id].append(AppendEntry {
                                start: m.content.len() as u64,
                                data: Some(Bytes::from(data.clone())),
                                ..AppendEntry::default()
                            }).await.unwrap();
                            m.content.extend_from_slice(&data);
                            m.ends.push(m.content.len() as u64);
                        }
                        Step::Release { stream, at } => {
                            let Some(id) = slot.get(&stream).copied() else { continue };
                            let Some(m) = model.get_mut(&id) else { continue };
                            if m.ends.is_empty() { continue; }
                            let before = m.ends[at % m.ends.len()];
                            live.logs[&id].release(before).await.unwrap();
                            m.released = m.released.max(before);
                            let tail = m.content.len() as u64;
                            assert!(matches!(
                                live.logs[&id].read(0, tail, usize::MAX, true).await,
                                Err(StorageError::Released { start }) if start == m.released
                            ));
                        }
                        Step::Close { stream } => {
                            let Some(id) = slot.get(&stream).copied() else { continue };
                            let Some(m) = model.get_mut(&id) else { continue };
                            if m.closed { continue; }
                            live.logs[&id].append(AppendEntry {
                                start: m.content.len() as u64,
                                close: Some(None),
                                ..AppendEntry::default()
                            }).await.unwrap();
                            m.closed = true;
                        }
                        Step::Remove { stream } => {
                            let Some(id) = slot.get(&stream).copied() else { continue };
                            if model.remove(&id).is_none() { continue; }
                            live.logs.remove(&id).unwrap().remove().await.unwrap();
                        }
                        Step::Reopen => {
                            drop(std::mem::take(&mut live.logs));
                            drop(live);
                            let store = FileStorage::open(dir.path(), opts()).unwrap();
                            let recovered = store.recover().unwrap();
                            live = Live { store, logs: BTreeMap::new() };
                            live.logs = check(&live, recovered, &model).await;
                        }
                        Step::TornTail { garbage } => {
                            drop(std::mem::take(&mut live.logs));
                            drop(live);
                            let mut segs: Vec<_> = std::fs::read_dir(wal_dir(dir.path())).unwrap().map(|e| e.unwrap().path()).filter(|p| p.extension().is_some_and(|e| e == "seg")).collect();
                            segs.sort();
                            let newest = segs.last().unwrap();
                            let mut data = std::fs::read(newest).unwrap();
                            // A partial frame where the next batch goes (over the zeros the
                            // file was extended with): a length that runs past the garbage.
                            let end = super::data_end(&data);
                            let mut torn = (garbage.len() as u32 + 100).to_le_bytes().to_vec();
                            torn.extend_from_slice(&garbage);
                            super::put_at(&mut data, end, &torn);
                            write_damaged(newest, data).unwrap();
                            let store = FileStorage::open(dir.path(), opts()).unwrap();
                            let recovered = store.recover().unwrap();
                            live = Live { store, logs: BTreeMap::new() };
                            live.logs = check(&live, recovered, &model).await;
                        }
                        Step::CorruptByte { frame, at } => {
                            drop(std::mem::take(&mut live.logs));
                            drop(live);
                            let all = frames(dir.path());
                            // Damage confined to the last batch is indistinguishable from a
                            // torn write (see STORAGE.md); damage anywhere before it must stop
                            // start-up.
                            let last_batch = all.iter().rposition(|f| f.3).unwrap_or(0);
                            if last_batch == 0 {
                                return;
                            }
                            let (path, start, len, _) = all[frame % last_batch].clone();
                            let mut data = std::fs::read(&path).unwrap();
                            data[start + at % len] ^= 0x5a;
                            write_damaged(&path, data).unwrap();
                            let err = FileStorage::open(dir.path(), opts()).err();
                            assert!(err.is_some(), "corruption before the tail must refuse to start");
                            let err = err.unwrap().to_string();
                            assert!(err.contains(".seg"), "{err}");
                            return;
                        }
                    }
                }
            });
        }
    }
}

/// file-fast power losses at random points against an in-memory history: recovery must always
/// come back with a prefix of the log (in the order appends were acknowledged) that keeps at
/// least everything synced before the loss, and the store must go on working.
mod fast_power_loss {
    use std::collections::BTreeMap;

    use proptest::prelude::*;

    use super::*;

    #[derive(Clone, Debug)]
    enum Step {
        Append {
            stream: u64,
            len: usize,
        },
        /// Releases the stream before one of its record ends (picked by `at`).
        Release {
            stream: u64,
            at: usize,
        },
        Reopen,
        /// Sectors after the last synced position that never reached the disk: which segment
        /// (from the first written since the last start), where in it, how many.
        PowerLoss {
            segment: usize,
            at: u64,
            sectors: u64,
        },
    }

    fn step() -> impl Strategy<Value = Step> {
        prop_oneof![
            8 => (0..3u64, 1..300usize).prop_map(|(stream, len)| Step::Append { stream, len }),
            3 => (0..3u64, any::<usize>()).prop_map(|(stream, at)| Step::Release { stream, at }),
            1 => Just(Step::Reopen),
            2 => (0..4usize, any::<u64>(), 1..4u64)
                .prop_map(|(segment, at, sectors)| Step::PowerLoss { segment, at, sectors }),
        ]
    }

    fn opts() -> FileOptions {
        FileOptions {
            durable: false,
            segment_bytes: 1024,
            max_open_files: 3,
            map_reads: true,
            cache_bytes: 256,
            // Never during a case: what is synced is what the last start synced.
            fast_sync_interval: std::time::Duration::from_secs(3600),
        }
    }

    /// One acknowledged operation: a stream's creation, an append, or a release.
    #[derive(Clone, Debug)]
    enum Op {
        Create,
        Data(Vec<u8>),
        Release(u64),
    }

    /// A stream as recovered: its retained start, tail and retained bytes.
    type Got = BTreeMap<u64, (u64, u64, Vec<u8>)>;

    /// Streams after the first `k` operations of the history: (released, tail, retained bytes).
    fn state(history: &[(u64, Op)], k: usize) -> Got {
        let mut all: BTreeMap<u64, (u64, Vec<u8>)> = BTreeMap::new();
        for (id, op) in &history[..k] {
            let s = all.entry(*id).or_default();
            match op {
                Op::Create => {}
                Op::Data(d) => s.1.extend_from_slice(d),
                Op::Release(before) => s.0 = s.0.max(*before),
            }
        }
        all.into_iter()
            .map(|(id, (released, content))| {
                let tail = content.len() as u64;
                (id, (released, tail, content[released as usize..].to_vec()))
            })
            .collect()
    }

    /// Where the records of stream `id` end, after the whole history.
    fn ends(history: &[(u64, Op)], id: u64) -> Vec<u64> {
        let mut pos = 0;
        let mut out = Vec::new();
        for (i, op) in history {
            if *i == id
                && let Op::Data(d) = op
            {
                pos += d.len() as u64;
                out.push(pos);
            }
        }
        out
    }

    /// The newest segment and where its frames end: the log's end, synced at start-up.
    fn log_end(dir: &std::path::Path) -> (u32, u64) {
        let mut segs: Vec<_> = std::fs::read_dir(wal_dir(dir))
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == "seg"))
            .collect();
        segs.sort();
        let newest = segs.last().unwrap();
        let id: u32 = newest
            .file_stem()
            .unwrap()
            .to_str()
            .unwrap()
            .parse()
            .unwrap();
        (id, data_end(&std::fs::read(newest).unwrap()) as u64)
    }

    async fn reopen(
        dir: &std::path::Path,
    ) -> (FileStorage, BTreeMap<u64, Arc<dyn StreamLog>>, Got) {
        let store = FileStorage::open(dir, opts()).expect("a power loss must never stop start-up");
        let mut logs = BTreeMap::new();
        let mut got = BTreeMap::new();
        for r in store.recover().unwrap() {
            let (released, tail) = (r.state.released, r.state.tail);
            let chunk = r.log.read(released, tail, usize::MAX, true).await.unwrap();
            got.insert(r.meta.id, (released, tail, chunk.parts.concat()));
            logs.insert(r.meta.id, r.log);
        }
        (store, logs, got)
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, .. ProptestConfig::default() })]

        #[test]
        fn recovery_after_a_power_loss_is_a_prefix_keeping_everything_synced(
            steps in proptest::collection::vec(step(), 1..50)
        ) {
            let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
            rt.block_on(async {
                let dir = tempfile::tempdir().unwrap();
                // Every acknowledged operation in log order: (stream id, appended data or None
                // for its creation).
                let mut history: Vec<(u64, Op)> = Vec::new();
                let (mut store, mut logs, _) = reopen(dir.path()).await;
                let mut synced_ops = 0;
                let mut synced_at = log_end(dir.path());
                let mut slot: BTreeMap<u64, u64> = BTreeMap::new();
                let mut next_id = 1;
                for step in steps {
                    match step {
                        Step::Append { stream, len } => {
                            let id = match slot.get(&stream) {
                                Some(id) if logs.contains_key(id) => *id,
                                _ => {
                                    let id = next_id;
                                    next_id += 1;
                                    let (log, c) = store.create(&meta(id), vec![], None).unwrap();
                                    c.await.unwrap();
                                    logs.insert(id, log);
                                    history.push((id, Op::Create));
                                    slot.insert(stream, id);
                                    id
                                }
                            };
                            let tail = state(&history, history.len())[&id].1;
                            let data = vec![(history.len() % 251) as u8 + 1; len];
                            logs[&id].append(AppendEntry {
                                start: tail,
                                data: Some(Bytes::from(data.clone())),
                                ..AppendEntry::default()
                            }).await.unwrap();
                            history.push((id, Op::Data(data)));
                        }
                        Step::Release { stream, at } => {
                            let Some(id) = slot.get(&stream).copied() else { continue };
                            let Some(log) = logs.get(&id) else { continue };
                            let ends = ends(&history, id);
                            if ends.is_empty() { continue; }
                            let before = ends[at % ends.len()];
                            log.release(before).await.unwrap();
                            history.push((id, Op::Release(before)));
                        }
                        Step::Reopen => {
                            drop(std::mem::take(&mut logs));
                            drop(store);
                            let (s, l, got) = reopen(dir.path()).await;
                            assert_eq!(got, state(&history, history.len()), "a clean restart keeps everything");
                            (store, logs) = (s, l);
                            synced_ops = history.len();
                            synced_at = log_end(dir.path());
                        }
                        Step::PowerLoss { segment, at, sectors } => {
                            drop(std::mem::take(&mut logs));
                            drop(store);
                            // Lose sectors written after the last start (its sync covered the
                            // rest), in that segment or a later one.
                            let seg = synced_at.0 + segment as u32;
                            let path = wal::segment_path(&wal_dir(dir.path()), seg);
                            if let Ok(mut bytes) = std::fs::read(&path) {
                                let from = if seg == synced_at.0 { synced_at.1 } else { frame::SEGMENT_HEADER_LEN };
                                let end = data_end(&bytes) as u64;
                                if end > from {
                                    let start = (from + at % (end - from)) / 512 * 512;
                                    let start = start.max(from);
                                    let stop = ((start / 512 + sectors) * 512).min(bytes.len() as u64);
                                    bytes[start as usize..stop as usize].fill(0);
                                    write_damaged(&path, &bytes).unwrap();
                                }
                            }
                            let (s, l, got) = reopen(dir.path()).await;
                            let k = (synced_ops..=history.len())
                                .find(|&k| {
                                    state(&history, k) == got
                                });
                            let Some(k) = k else {
                                panic!("recovered {got:?} is no prefix of the log keeping the {synced_ops} synced operations");
                            };
                            history.truncate(k);
                            slot.retain(|_, id| got.contains_key(id));
                            (store, logs) = (s, l);
                            synced_ops = history.len();
                            synced_at = log_end(dir.path());
                        }
                    }
                }
            });
        }
    }
}

/// A read is planned (where each record lies) when it is made, and reads the segments after:
/// a segment deleted in between, its records released or the live ones written forward, must
/// not fail the read with an i/o error (a 500 to the client). Planned again, the read finds the
/// records where they are now, or is refused as released.
#[tokio::test]
async fn a_read_planned_before_its_segment_was_deleted_is_planned_again() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(true);
    opts.segment_bytes = 4096;
    // Nothing cached: reads go to the segments.
    opts.cache_bytes = 0;
    let wal = wal_dir(dir.path());
    let store = FileStorage::open(dir.path(), opts).unwrap();
    // Two streams with a record each in segment 1: one stays, one will be released.
    let (idle, c) = store.create(&meta(1), vec![], None).unwrap();
    c.await.unwrap();
    idle.append(append(0, &[b'i'; 100])).await.unwrap();
    let (acked, c) = store.create(&meta(2), vec![], None).unwrap();
    c.await.unwrap();
    acked.append(append(0, &[b'a'; 100])).await.unwrap();
    let idle_read = idle.read(0, 100, 1000, true);
    let acked_read = acked.read(0, 100, 1000, true);
    // Segment 1 goes: one record released, the other written forward by a busy stream that
    // fills segments and releases behind itself.
    acked.release(100).await.unwrap();
    let (busy, c) = store.create(&meta(3), vec![], None).unwrap();
    c.await.unwrap();
    let mut tail = 0u64;
    for _ in 0..200 {
        busy.append(append(tail, &[b'b'; 100])).await.unwrap();
        tail += 100;
        busy.release(tail).await.unwrap();
    }
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
    while wal::segment_path(&wal, 1).exists() {
        assert!(std::time::Instant::now() < deadline, "segment 1 was kept");
        tokio::time::sleep(std::time::Duration::from_millis(5)).await;
    }
    assert_eq!(idle_read.await.unwrap().parts.concat(), vec![b'i'; 100]);
    assert!(matches!(
        acked_read.await,
        Err(StorageError::Released { start: 100 })
    ));
}

/// The sparse index (one block per run of records, the rest found in the log): reads from any
/// record boundary, with any budget, return exactly the records a per-record index would, a
/// read inside a record is refused unless split, and so after a reopen and after a release,
/// with another stream's frames between every few records and segments rotating under them.
#[tokio::test]
async fn reads_at_any_offset_stay_exact_across_blocks() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(false);
    opts.cache_bytes = 0;
    opts.segment_bytes = 400 << 10;
    let n = 9_000usize;
    let len_of = |i: usize| 1 + (i * 7919) % 23;
    let mut content = Vec::new();
    let mut bounds = vec![0u64];
    for i in 0..n {
        let l = len_of(i);
        content.extend((0..l).map(|j| b'a' + ((i + j) % 26) as u8));
        bounds.push(content.len() as u64);
    }
    let tail = content.len() as u64;
    {
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        let (log, c) = store.create(&meta(1), vec![], None).unwrap();
        c.await.unwrap();
        let (other, c) = store.create(&meta(2), vec![], None).unwrap();
        c.await.unwrap();
        let mut other_tail = 0;
        for i in 0..n {
            let (a, b) = (bounds[i] as usize, bounds[i + 1] as usize);
            log.append(AppendEntry {
                start: a as u64,
                data: Some(Bytes::copy_from_slice(&content[a..b])),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
            if i % 3 == 0 {
                other
                    .append(append(other_tail, b"interleaved"))
                    .await
                    .unwrap();
                other_tail += 11;
            }
        }
        check_reads(&log, &content, &bounds, 0).await;
    }
    let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
    let mut streams = store.recover().unwrap();
    streams.sort_by_key(|r| r.meta.id);
    assert_eq!(streams[0].state.tail, tail);
    check_reads(&streams[0].log, &content, &bounds, 0).await;
    let released = bounds[n / 2];
    streams[0].log.release(released).await.unwrap();
    check_reads(&streams[0].log, &content, &bounds, n / 2).await;
    assert!(matches!(
        streams[0].log.read(bounds[n / 2 - 1], tail, 100, false).await,
        Err(StorageError::Released { start }) if start == released
    ));
    drop(streams);
    drop(store);
    let store = FileStorage::open(dir.path(), opts).unwrap();
    let mut streams = store.recover().unwrap();
    streams.sort_by_key(|r| r.meta.id);
    check_reads(&streams[0].log, &content, &bounds, n / 2).await;
}

/// Reads from record boundaries `first..` (sampled) and from inside records.
async fn check_reads(log: &Arc<dyn StreamLog>, content: &[u8], bounds: &[u64], first: usize) {
    let tail = content.len() as u64;
    let n = bounds.len() - 1;
    for k in (first..n).step_by(331).chain([n - 1]) {
        let from = bounds[k];
        for budget in [1usize, 37, 5000] {
            // Whole records: the first always, then while they fit.
            let mut end = k + 1;
            while end < n && bounds[end + 1] - from <= budget as u64 {
                end += 1;
            }
            let chunk = log.read(from, tail, budget, false).await.unwrap();
            assert_eq!(chunk.end, bounds[end], "from record {k}, budget {budget}");
            assert_eq!(
                chunk.parts.concat(),
                &content[from as usize..bounds[end] as usize]
            );
            assert_eq!(chunk.parts.len(), end - k, "one part per record");
        }
        if bounds[k + 1] - from > 1 {
            assert!(matches!(
                log.read(from + 1, tail, 100, false).await,
                Err(StorageError::Misaligned { .. })
            ));
            let chunk = log.read(from + 1, tail, 50, true).await.unwrap();
            let to = (from + 51).min(tail);
            assert_eq!(chunk.end, to);
            assert_eq!(
                chunk.parts.concat(),
                &content[from as usize + 1..to as usize]
            );
        }
    }
}

/// What every stream holds: (id, released, tail, closed, producers, retained bytes).
type Contents = Vec<(u64, u64, u64, bool, Vec<(String, u64)>, Vec<u8>)>;

async fn contents(store: &FileStorage) -> Contents {
    let mut out = Vec::new();
    for r in store.recover().unwrap() {
        let (released, tail) = (r.state.released, r.state.tail);
        let data = r.log.read(released, tail, usize::MAX, true).await.unwrap();
        let mut producers: Vec<(String, u64)> = r
            .state
            .producers
            .iter()
            .map(|(k, v)| (k.clone(), v.last_seq))
            .collect();
        producers.sort();
        out.push((
            r.meta.id,
            released,
            tail,
            r.state.closed,
            producers,
            data.parts.concat(),
        ));
    }
    out.sort_by_key(|c| c.0);
    out
}

/// Writes a history across many small segments: appends (some with a producer), releases, a
/// removal, a close, with segments written forward and deleted on the way.
async fn busy_history(store: &FileStorage, first_id: u64) {
    let mut logs = Vec::new();
    for id in first_id + 1..=first_id + 4 {
        let (log, c) = store.create(&meta(id), vec![], None).unwrap();
        c.await.unwrap();
        logs.push(log);
    }
    let mut tails = [0u64; 4];
    for i in 0..600u64 {
        let s = (i % 4) as usize;
        let data = vec![b'a' + (i % 26) as u8; 20 + (i % 50) as usize];
        let len = data.len() as u64;
        logs[s]
            .append(AppendEntry {
                start: tails[s],
                data: Some(Bytes::from(data)),
                producer: (s == 1).then(|| {
                    (
                        "p".to_owned(),
                        ProducerState {
                            epoch: 0,
                            last_seq: i,
                            last_ms: 1,
                        },
                    )
                }),
                close: (s == 3 && i == 599).then_some(None),
                ..AppendEntry::default()
            })
            .await
            .unwrap();
        tails[s] += len;
        if s == 0 && i % 40 == 0 {
            logs[0].release(tails[0]).await.unwrap();
        }
    }
    logs[2].remove().await.unwrap();
}

/// A restart after a clean shutdown replays nothing (the shutdown wrote a checkpoint); one with
/// an older checkpoint (as a crash before the next one leaves it) replays only what followed
/// it; both recover exactly what a replay of the whole log does.
#[tokio::test]
async fn start_up_replays_only_what_follows_the_checkpoint() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(durable);
        opts.segment_bytes = 4096;
        opts.fast_sync_interval = std::time::Duration::from_millis(5);
        let wal = wal_dir(dir.path());
        let path = wal.join(checkpoint::FILE);
        let log_bytes = |wal: &std::path::Path| -> u64 {
            seg_ids(wal)
                .iter()
                .map(|&id| std::fs::metadata(wal::segment_path(wal, id)).unwrap().len())
                .sum()
        };
        {
            let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
            busy_history(&store, 0).await;
        }
        let older = std::fs::read(&path).unwrap();
        {
            let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
            assert_eq!(store.replayed_bytes(), 0, "durable {durable}");
            busy_history(&store, 10).await;
        }
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        assert_eq!(store.replayed_bytes(), 0, "durable {durable}");
        let expected = contents(&store).await;
        assert_eq!(expected.len(), 6);
        assert!(expected[2].3, "stream 4 closed");
        drop(store);
        // The older checkpoint: what the second history wrote is replayed.
        let total = log_bytes(&wal);
        std::fs::write(&path, &older).unwrap();
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        assert!(
            store.replayed_bytes() > 0 && store.replayed_bytes() < total,
            "replayed {} of {total}",
            store.replayed_bytes()
        );
        assert_eq!(contents(&store).await, expected);
        drop(store);
        // Without a checkpoint: the whole log, the same result.
        std::fs::remove_file(&path).unwrap();
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        assert!(store.replayed_bytes() > 0);
        assert_eq!(contents(&store).await, expected);
    }
}

/// A checkpoint that is torn, damaged, or no longer matches the log (here: the log was cut below
/// the batch it names) is not used: start-up says why, removes it, and replays the whole log.
#[tokio::test]
async fn a_torn_or_stale_checkpoint_falls_back_to_a_full_replay() {
    let dir = tempfile::tempdir().unwrap();
    let mut opts = options(true);
    opts.segment_bytes = 4096;
    {
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        busy_history(&store, 0).await;
    }
    let wal = wal_dir(dir.path());
    let path = wal.join(checkpoint::FILE);
    let good = std::fs::read(&path).unwrap();
    let expected = contents(&FileStorage::open(dir.path(), opts.clone()).unwrap()).await;
    let cut = good[..good.len() / 2].to_vec();
    let mut flipped = good.clone();
    let at = flipped.len() - 10;
    flipped[at] ^= 0x20;
    for bad in [cut, flipped, b"DSCKPT".to_vec()] {
        std::fs::write(&path, &bad).unwrap();
        let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
        assert!(store.replayed_bytes() > 0, "a bad checkpoint is not used");
        assert!(!path.exists(), "a bad checkpoint is removed");
        assert_eq!(contents(&store).await, expected);
    }
    // Stale: the checkpoint names a batch the log no longer has at that place (a log cut short
    // below it, as only damage could: a checkpoint covers synced batches only).
    let store = FileStorage::open(dir.path(), opts.clone()).unwrap();
    drop(store);
    let good = std::fs::read(&path).unwrap();
    let c = checkpoint::load(&wal, &seg_ids(&wal)).expect("valid");
    let (seg, off) = c.last_batch_at;
    let seg_path = wal::segment_path(&wal, seg);
    let bytes = std::fs::read(&seg_path).unwrap();
    let mut other = bytes.clone();
    // The batch's sequence number changed: not the batch the checkpoint saw.
    other[off as usize + 9] ^= 1;
    std::fs::write(&seg_path, &other).unwrap();
    assert!(checkpoint::load(&wal, &seg_ids(&wal)).is_none());
    assert!(!path.exists());
    std::fs::write(&seg_path, &bytes).unwrap();
    std::fs::write(&path, &good).unwrap();
    assert!(
        checkpoint::load(&wal, &seg_ids(&wal)).is_some(),
        "intact again"
    );
}

/// An idle writer settles: with small segments, file-fast once rewrote forward on every idle
/// tick (the dead segments waiting for the background sync counted as slack, and each rewrite
/// moved the awaited sync further), writing forever.
#[tokio::test]
async fn an_idle_writer_stops_writing() {
    for durable in [true, false] {
        let dir = tempfile::tempdir().unwrap();
        let mut opts = options(durable);
        opts.segment_bytes = 4096;
        opts.fast_sync_interval = std::time::Duration::from_millis(5);
        let store = FileStorage::open(dir.path(), opts).unwrap();
        busy_history(&store, 0).await;
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
        let (mut last, mut quiet) = (store.commit_stats().0, 0);
        while quiet < 5 {
            assert!(
                std::time::Instant::now() < deadline,
                "durable {durable}: still writing ({last} batches)"
            );
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
            let now = store.commit_stats().0;
            quiet = if now == last { quiet + 1 } else { 0 };
            last = now;
        }
    }
}
