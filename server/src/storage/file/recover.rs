//! Start-up recovery: replay the segments in order into stream states and record blocks, all
//! of them or those from a usable checkpoint's point on (`super::checkpoint`).
//!
//! A batch that is cut short or damaged where no later batch's durable mark covers it was never
//! synced: a torn write from a crash or power loss. The file is truncated at the batch's start,
//! any later segments are removed, and recovery goes on. Anything else that does not decode is
//! corruption, and start-up stops with the file and byte position, rather than guess.

use std::collections::HashMap;
use std::path::Path;

use super::blocks::{Block, Blocks};
use super::checkpoint;
use super::frame::{self, Decoded, FrameError, LogPos};
use super::wal::{Segment, segment_path, sync_dir};
use crate::storage::{StorageError, StreamId, StreamMeta, WriterSnapshot};

/// One live stream found in the log.
pub(crate) struct RecoveredStream {
    pub meta: StreamMeta,
    pub state: WriterSnapshot,
    pub blocks: Blocks,
    pub touched: Vec<u32>,
    /// The segment of the stream's newest CREATE or STATE frame.
    pub base: u32,
}

/// Frames of a stream met before any CREATE or STATE frame of it: the segment holding that
/// frame was deleted. Either the stream was removed (a REMOVE frame follows, or nothing of it
/// remains at the end) or its state was written forward (a STATE frame follows, which adopts
/// the records kept here).
#[derive(Default)]
struct Orphan {
    blocks: Blocks,
    touched: Vec<u32>,
}

pub(crate) struct Recovery {
    pub streams: Vec<RecoveredStream>,
    pub segments: Vec<Segment>,
    /// The sequence number of the last batch in the log (0: none); the writer goes on from it.
    pub last_batch: u64,
    /// Where that batch's BATCH frame is (for the writer's checkpoints).
    pub last_batch_at: Option<LogPos>,
    /// The segment the checkpoint used (if one was) starts replay in: it must not be deleted
    /// before a newer checkpoint replaces it.
    pub checkpoint_seg: Option<u32>,
    /// Bytes of log replayed.
    pub replayed: u64,
    /// Whether the newest segment has this build's format; if not, the writer starts a new one
    /// rather than mix batches into an older format.
    pub newest_is_current: bool,
}

fn corrupt(path: &Path, pos: u64, detail: impl Into<String>) -> StorageError {
    StorageError::Corrupt {
        what: format!("{} at byte {pos}", path.display()),
        detail: detail.into(),
    }
}

fn segment_ids(dir: &Path) -> Result<Vec<u32>, StorageError> {
    let mut ids = Vec::new();
    let entries = std::fs::read_dir(dir).map_err(|source| StorageError::Io {
        what: dir.display().to_string(),
        source,
    })?;
    for entry in entries.filter_map(Result::ok) {
        let name = entry.file_name();
        let name = name.to_string_lossy();
        if let Some(id) = name
            .strip_suffix(".seg")
            .and_then(|n| n.parse::<u32>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

pub(crate) fn recover(dir: &Path, durable: bool) -> Result<Recovery, StorageError> {
    let started = std::time::Instant::now();
    let ids = segment_ids(dir)?;
    let mut streams: HashMap<StreamId, RecoveredStream> = HashMap::new();
    let mut orphans: HashMap<StreamId, Orphan> = HashMap::new();
    let mut segments = Vec::with_capacity(ids.len());
    let mut last_batch: Option<u64> = None;
    let mut last_batch_at: Option<LogPos> = None;
    let mut newest_version = frame::VERSION;
    // Start from the checkpoint, if there is one that matches the log: its streams, and the
    // segments before its replay point as it knew them (less those deleted since).
    let checkpoint = checkpoint::load(dir, &ids);
    let resume = checkpoint.as_ref().map(|c| c.from);
    if let Some(c) = checkpoint {
        for (id, len) in c.segments {
            if ids.binary_search(&id).is_ok() {
                segments.push(Segment {
                    id,
                    len,
                    ..Segment::default()
                });
            }
        }
        for st in c.streams {
            let s = st.state;
            streams.insert(
                s.meta.id,
                RecoveredStream {
                    state: WriterSnapshot {
                        tail: s.tail,
                        closed: s.closed,
                        closed_by: s.closed_by,
                        last_seq: s.last_seq,
                        producers: s.producers.into_iter().collect(),
                        soft_deleted: s.soft_deleted,
                        last_access_ms: 0,
                        own_bytes: 0,
                        released: s.released,
                    },
                    meta: s.meta,
                    blocks: Blocks {
                        list: st.blocks.into(),
                    },
                    touched: st.touched,
                    base: st.base,
                },
            );
        }
        last_batch = Some(c.last_batch);
        last_batch_at = Some(c.last_batch_at);
    }
    let mut replayed = 0u64;
    // Set when a torn write was cut off: the segments after it are gone.
    let mut cut = false;
    for (n, &id) in ids.iter().enumerate() {
        if cut {
            break;
        }
        if resume.is_some_and(|(from, _)| id < from) {
            continue;
        }
        let last = n + 1 == ids.len();
        let path = segment_path(dir, id);
        let data = std::fs::read(&path).map_err(|source| StorageError::Io {
            what: path.display().to_string(),
            source,
        })?;
        let header_len = frame::SEGMENT_HEADER_LEN as usize;
        if data.len() < header_len {
            if last {
                // Created but its header never fully reached the disk: start it again.
                rewrite_header(&path, durable)?;
                segments.push(Segment {
                    id,
                    len: frame::SEGMENT_HEADER_LEN,
                    ..Segment::default()
                });
                continue;
            }
            return Err(corrupt(&path, 0, "segment shorter than its header"));
        }
        if &data[..8] != frame::MAGIC {
            return Err(corrupt(&path, 0, "not a ds-server log segment (bad magic)"));
        }
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if !(frame::OLDEST_VERSION..=frame::VERSION).contains(&version) {
            return Err(corrupt(
                &path,
                8,
                format!(
                    "segment format version {version}; this build reads {} to {}",
                    frame::OLDEST_VERSION,
                    frame::VERSION
                ),
            ));
        }
        if last {
            newest_version = version;
        }
        let mut pos = header_len;
        let mut damage = None;
        let mut batches = 0usize;
        // The checkpoint covers this segment up to its replay point (the end of a batch).
        if let Some((from, off)) = resume
            && from == id
            && off > frame::SEGMENT_HEADER_LEN
        {
            pos = (off as usize).min(data.len());
            batches = 1;
        }
        let replay_from = pos;
        while pos < data.len() {
            // The writer extends a segment's file ahead of its frames, so a file may end in
            // zeros: free space, not data (a frame is never all zeros: its kind byte is not 0).
            if data[pos..].iter().all(|&b| b == 0) {
                break;
            }
            // Version 1 has no batches: each frame stands alone.
            let step = if version == 1 {
                frame::decode(&data[pos..])
                    .map(|(decoded, len)| (vec![(decoded, pos, len)], pos + len, None))
                    .map_err(|err| (pos, err))
            } else {
                read_batch(&data, pos, last_batch)
            };
            match step {
                Ok((frames, end, seq)) => {
                    if seq.is_some() {
                        last_batch_at = Some((id, pos as u64));
                    }
                    for (decoded, at, len) in frames {
                        let at = (at as u64, len as u64);
                        apply(&mut streams, &mut orphans, decoded, id, at, &path)?;
                    }
                    last_batch = seq.or(last_batch);
                    batches += 1;
                    pos = end;
                }
                Err(e) => {
                    damage = Some(e);
                    break;
                }
            }
        }
        replayed += pos.saturating_sub(replay_from) as u64;
        // A segment is rotated only after a batch went into it, so one with none before a newer
        // segment lost its batches (file-fast: never synced) or was damaged.
        if damage.is_none() && version >= 2 && !last && batches == 0 {
            damage = Some((
                header_len,
                FrameError::Bad("a segment with no batch before a newer segment".into()),
            ));
        }
        if let Some((at, err)) = damage {
            let torn = if version == 1 {
                last && !frame_after(&data[at..])
            } else {
                !vouched(&data[at..], (id, at as u64), dir, &ids[n + 1..])?
            };
            if !torn {
                let why = match err {
                    FrameError::Truncated => "frame cut short".to_owned(),
                    FrameError::Bad(why) => why,
                };
                return Err(corrupt(&path, at as u64, why));
            }
            // Never synced, so never acknowledged in file-durable (acknowledgement comes after
            // the batch's sync); in file-fast, acknowledged after the last background sync,
            // which is what the mode's promise lets a power loss take.
            tracing::warn!(
                file = %path.display(),
                at = pos,
                damaged_at = at,
                dropped = data.len() - pos,
                "truncating a torn write at the end of the log"
            );
            truncate(&path, pos as u64, durable)?;
            // Later segments hold only batches written after the torn one (file-fast, whose
            // marks show they were never synced): they go with it.
            for &later in &ids[n + 1..] {
                let later = segment_path(dir, later);
                tracing::warn!(file = %later.display(), "removing a segment written after a torn write");
                std::fs::remove_file(&later).map_err(|source| StorageError::Io {
                    what: later.display().to_string(),
                    source,
                })?;
            }
            if n + 1 < ids.len() {
                sync_dir(dir)?;
                newest_version = version;
            }
            cut = true;
        }
        segments.push(Segment {
            id,
            len: pos.min(data.len()) as u64,
            ..Segment::default()
        });
    }
    // Every stream's retained records must run from its retained start to its tail.
    for s in streams.values_mut() {
        let log_start = s.meta.fork().map_or(0, |f| f.offset);
        let released = s.state.released.max(log_start);
        s.blocks.drop_released(released, |_| {});
        let b = &s.blocks;
        let contiguous = b
            .list
            .iter()
            .zip(b.list.iter().skip(1))
            .all(|(x, y)| x.end == y.start);
        let covered = contiguous
            && match (b.first(), b.last()) {
                (Some(first), Some(last)) => first.start <= released && last.end == s.state.tail,
                _ => released == s.state.tail,
            };
        if !covered {
            return Err(StorageError::Corrupt {
                what: dir.display().to_string(),
                detail: format!(
                    "stream {} should hold [{released}, {}) but its records cover {:?}",
                    s.meta.id,
                    s.state.tail,
                    b.first().map(|f| (f.start, b.last().map(|l| l.end)))
                ),
            });
        }
        s.state.released = released;
        s.state.own_bytes = s.state.tail - released;
    }
    let mut streams: Vec<RecoveredStream> = streams.into_values().collect();
    streams.sort_by_key(|s| s.meta.id);
    tracing::info!(
        streams = streams.len(),
        segments = segments.len(),
        checkpoint = ?resume,
        replayed_bytes = replayed,
        ms = started.elapsed().as_millis() as u64,
        "log recovered"
    );
    Ok(Recovery {
        streams,
        segments,
        last_batch: last_batch.unwrap_or(0),
        last_batch_at,
        checkpoint_seg: resume.map(|(seg, _)| seg),
        replayed,
        newest_is_current: newest_version == frame::VERSION,
    })
}

/// The frames of the batch at `pos`, where it ends and its sequence number; or where and why it
/// does not decode. A batch must open with a BATCH frame numbered one after the previous batch
/// (any number for the first batch read) and its frames must fill exactly its declared length.
#[allow(clippy::type_complexity)]
fn read_batch(
    data: &[u8],
    pos: usize,
    previous: Option<u64>,
) -> Result<(Vec<(Decoded, usize, usize)>, usize, Option<u64>), (usize, FrameError)> {
    let (seq, len) = match frame::decode(&data[pos..]) {
        Ok((Decoded::Batch { seq, len, .. }, _)) => (seq, len as usize),
        Ok(_) => {
            return Err((pos, FrameError::Bad("a frame outside any batch".into())));
        }
        Err(err) => return Err((pos, err)),
    };
    if let Some(previous) = previous
        && Some(seq) != previous.checked_add(1)
    {
        return Err((
            pos,
            FrameError::Bad(format!("batch {seq} follows batch {previous}")),
        ));
    }
    let start = pos + frame::BATCH_FRAME_LEN;
    let end = start
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or((pos, FrameError::Truncated))?;
    let mut frames = Vec::new();
    let mut at = start;
    while at < end {
        match frame::decode(&data[at..end]) {
            Ok((Decoded::Batch { .. }, _)) => {
                return Err((at, FrameError::Bad("a batch inside a batch".into())));
            }
            Ok((decoded, n)) => {
                frames.push((decoded, at, n));
                at += n;
            }
            Err(err) => return Err((at, err)),
        }
    }
    Ok((frames, end, Some(seq)))
}

/// Version 1: whether any decodable frame starts after the damage at the start of `rest`. A
/// crash can only damage the end of the last write, so a valid frame after the damage means
/// the damage is corruption, not a torn write.
fn frame_after(rest: &[u8]) -> bool {
    candidates(rest).any(|q| frame::decode(&rest[q..]).is_ok())
}

/// Version 2: whether the damage at `damaged` (whose bytes start `rest`) lies in synced data:
/// whether a BATCH frame after it, in `rest` or in a later segment, carries a durable mark past
/// it. Each batch records how far the log had been synced when it was written (in file-durable,
/// everything before it; in file-fast, what the background sync had reached). Damage no mark
/// covers was never synced: a torn write, whatever intact frames follow it, since the pages of
/// unsynced writes reach the disk in any order.
fn vouched(rest: &[u8], damaged: LogPos, dir: &Path, later: &[u32]) -> Result<bool, StorageError> {
    // A mark counts only if it lies between the damage and the frame carrying it: a batch
    // never vouches for bytes after itself, so a frame that stream data merely resembles
    // cannot claim more than the log before it.
    let covers = |bytes: &[u8], seg: u32, base: u64| {
        candidates(bytes).any(|q| {
            matches!(
                frame::decode(&bytes[q..]),
                Ok((Decoded::Batch { durable, .. }, _))
                    if durable > damaged && durable <= (seg, base + q as u64)
            )
        })
    };
    if covers(rest, damaged.0, damaged.1) {
        return Ok(true);
    }
    for &id in later {
        let path = segment_path(dir, id);
        let data = std::fs::read(&path).map_err(|source| StorageError::Io {
            what: path.display().to_string(),
            source,
        })?;
        let body = data
            .get(frame::SEGMENT_HEADER_LEN as usize..)
            .unwrap_or_default();
        if covers(body, id, frame::SEGMENT_HEADER_LEN) {
            return Ok(true);
        }
    }
    Ok(false)
}

/// Positions at which a frame could start. The damage itself is included: a batch whose own
/// BATCH frame decodes but is out of place (inside another batch, numbered out of order) is a
/// later batch too. A frame's kind byte (its 9th) is never 0, so no frame starts more than 8
/// bytes before the last non-zero byte: the zeros the file was extended with need no search.
fn candidates(rest: &[u8]) -> std::ops::RangeInclusive<usize> {
    let last = rest.iter().rposition(|&b| b != 0).unwrap_or(0);
    0..=last.min(rest.len().saturating_sub(1))
}

fn touch(touched: &mut Vec<u32>, seg: u32) {
    if touched.last() != Some(&seg) {
        touched.push(seg);
    }
}

/// A CREATE or STATE frame's records `[start, ...)` as one packed block, if it has any.
fn packed(seg: u32, frame: (u64, u64), start: u64, records: &[(usize, usize)]) -> Option<Block> {
    let bytes: u64 = records.iter().map(|(_, l)| *l as u64).sum();
    (!records.is_empty()).then_some(Block {
        start,
        end: start + bytes,
        off: frame.0,
        span: frame.1 as u32,
        seg,
        count: records.len() as u32,
        packed: true,
    })
}

fn apply(
    streams: &mut HashMap<StreamId, RecoveredStream>,
    orphans: &mut HashMap<StreamId, Orphan>,
    decoded: Decoded,
    seg: u32,
    frame: (u64, u64),
    path: &Path,
) -> Result<(), StorageError> {
    let frame_off = frame.0;
    match decoded {
        Decoded::Create { meta, records } => {
            let id = meta.meta.id;
            let start = meta.meta.fork().map_or(0, |f| f.offset);
            let mut blocks = Blocks::default();
            let block = packed(seg, frame, start, &records);
            let tail = block.map_or(start, |b| b.end);
            blocks.list.extend(block);
            let state = WriterSnapshot {
                tail,
                closed: meta.closed,
                own_bytes: tail - start,
                last_access_ms: 0,
                released: start,
                ..WriterSnapshot::default()
            };
            orphans.remove(&id);
            streams.insert(
                id,
                RecoveredStream {
                    meta: meta.meta,
                    state,
                    blocks,
                    touched: vec![seg],
                    base: seg,
                },
            );
        }
        Decoded::Append {
            id,
            start,
            state,
            data,
        } => {
            let len = data.map(|(_, len)| len as u64);
            // The stream's CREATE frame went with a deleted segment: it was removed (a REMOVE
            // follows) or its state was written forward (a STATE frame follows).
            let Some(s) = streams.get_mut(&id) else {
                let orphan = orphans.entry(id).or_default();
                touch(&mut orphan.touched, seg);
                if let Some(len) = len {
                    if let Some(last) = orphan.blocks.last()
                        && last.end != start
                    {
                        return Err(corrupt(
                            path,
                            frame_off,
                            format!("append at {start} but stream {id} ends at {}", last.end),
                        ));
                    }
                    orphan
                        .blocks
                        .push_append(start, len, seg, frame_off, frame.1);
                }
                return Ok(());
            };
            if start != s.state.tail {
                return Err(corrupt(
                    path,
                    frame_off,
                    format!("append at {start} but stream {id} ends at {}", s.state.tail),
                ));
            }
            touch(&mut s.touched, seg);
            if let Some(len) = len {
                s.state.tail += len;
                s.state.own_bytes += len;
                s.blocks.push_append(start, len, seg, frame_off, frame.1);
            }
            if state.closes {
                s.state.closed = true;
                s.state.closed_by = state.closed_by;
            }
            if let Some(seq) = state.stream_seq {
                s.state.last_seq = Some(seq);
            }
            if let Some((pid, ps)) = state.producer {
                s.state.producers.insert(pid, ps);
            }
        }
        Decoded::SoftDelete(id) => {
            if let Some(s) = streams.get_mut(&id) {
                s.state.soft_deleted = true;
                touch(&mut s.touched, seg);
            }
        }
        Decoded::Remove(id) => {
            streams.remove(&id);
            orphans.remove(&id);
        }
        Decoded::Release { id, before } => match streams.get_mut(&id) {
            Some(s) => {
                if before > s.state.tail {
                    return Err(corrupt(
                        path,
                        frame_off,
                        format!(
                            "release before {before} but stream {id} ends at {}",
                            s.state.tail
                        ),
                    ));
                }
                s.state.released = s.state.released.max(before);
                s.blocks.drop_released(before, |_| {});
                touch(&mut s.touched, seg);
            }
            None => {
                let orphan = orphans.entry(id).or_default();
                orphan.blocks.drop_released(before, |_| {});
                touch(&mut orphan.touched, seg);
            }
        },
        Decoded::State { state: st, records } => {
            let st = *st;
            let id = st.meta.id;
            let (mut kept, mut touched) = match streams.remove(&id) {
                Some(s) => {
                    if s.state.tail != st.tail {
                        return Err(corrupt(
                            path,
                            frame_off,
                            format!(
                                "state of stream {id} says tail {} but its frames end at {}",
                                st.tail, s.state.tail
                            ),
                        ));
                    }
                    (s.blocks, s.touched)
                }
                None => {
                    let orphan = orphans.remove(&id).unwrap_or_default();
                    if let Some(last) = orphan.blocks.last()
                        && last.end != st.tail
                    {
                        return Err(corrupt(
                            path,
                            frame_off,
                            format!(
                                "state of stream {id} says tail {} but its frames end at {}",
                                st.tail, last.end
                            ),
                        ));
                    }
                    (orphan.blocks, orphan.touched)
                }
            };
            // Moved records take the place of their older copies (which may be gone with their
            // segment, or still there after a crash before that segment was deleted).
            if let Some(block) = packed(seg, frame, st.moved_from, &records) {
                if block.end > st.tail {
                    return Err(corrupt(
                        path,
                        frame_off,
                        format!(
                            "state of stream {id} moves records past its tail {}",
                            st.tail
                        ),
                    ));
                }
                kept.replace(block, |_| {})
                    .map_err(|e| corrupt(path, frame_off, format!("stream {id}: {e}")))?;
            }
            kept.drop_released(st.released, |_| {});
            touch(&mut touched, seg);
            streams.insert(
                id,
                RecoveredStream {
                    state: WriterSnapshot {
                        tail: st.tail,
                        closed: st.closed,
                        closed_by: st.closed_by,
                        last_seq: st.last_seq,
                        producers: st.producers.into_iter().collect(),
                        soft_deleted: st.soft_deleted,
                        last_access_ms: 0,
                        own_bytes: 0,
                        released: st.released,
                    },
                    meta: st.meta,
                    blocks: kept,
                    touched,
                    base: seg,
                },
            );
        }
        // Batches are taken apart by the caller.
        Decoded::Batch { .. } => {}
    }
    Ok(())
}

fn truncate(path: &Path, len: u64, durable: bool) -> Result<(), StorageError> {
    let io = |source| StorageError::Io {
        what: path.display().to_string(),
        source,
    };
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .map_err(io)?;
    f.set_len(len).map_err(io)?;
    if durable {
        f.sync_all().map_err(io)?;
    }
    Ok(())
}

fn rewrite_header(path: &Path, durable: bool) -> Result<(), StorageError> {
    use std::os::unix::fs::FileExt;
    let io = |source| StorageError::Io {
        what: path.display().to_string(),
        source,
    };
    let f = std::fs::File::options()
        .write(true)
        .open(path)
        .map_err(io)?;
    f.set_len(0).map_err(io)?;
    f.write_all_at(&frame::segment_header(), 0).map_err(io)?;
    if durable {
        f.sync_all().map_err(io)?;
        if let Some(parent) = path.parent() {
            sync_dir(parent)?;
        }
    }
    Ok(())
}
