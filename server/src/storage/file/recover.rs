//! Start-up recovery: replay every segment in order into stream states and record indexes.
//!
//! A frame that is cut short or fails its checksum at the very end of the newest segment is a
//! torn write from a crash: the file is truncated there and recovery goes on. Anything else that
//! does not decode is corruption, and start-up stops with the file and byte position, rather
//! than guess.

use std::collections::HashMap;
use std::path::Path;

use super::Loc;
use super::frame::{self, Decoded, FrameError};
use super::wal::{Segment, segment_path, sync_dir};
use crate::storage::{StorageError, StreamId, StreamMeta, WriterSnapshot};

/// One live stream found in the log.
pub(crate) struct RecoveredStream {
    pub meta: StreamMeta,
    pub state: WriterSnapshot,
    pub records: Vec<Loc>,
    pub touched: Vec<u32>,
}

pub(crate) struct Recovery {
    pub streams: Vec<RecoveredStream>,
    pub segments: Vec<Segment>,
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
    let ids = segment_ids(dir)?;
    let mut streams: HashMap<StreamId, RecoveredStream> = HashMap::new();
    let mut segments = Vec::with_capacity(ids.len());
    for (n, &id) in ids.iter().enumerate() {
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
                    live: 0,
                    len: frame::SEGMENT_HEADER_LEN,
                });
                continue;
            }
            return Err(corrupt(&path, 0, "segment shorter than its header"));
        }
        if &data[..8] != frame::MAGIC {
            return Err(corrupt(&path, 0, "not a ds-server log segment (bad magic)"));
        }
        let version = u32::from_le_bytes([data[8], data[9], data[10], data[11]]);
        if version != frame::VERSION {
            return Err(corrupt(
                &path,
                8,
                format!(
                    "segment format version {version}; this build reads {}",
                    frame::VERSION
                ),
            ));
        }
        let mut pos = header_len;
        while pos < data.len() {
            // The writer extends a segment's file ahead of its frames, so a file may end in
            // zeros: free space, not data (a frame is never all zeros: its kind byte is not 0).
            if data[pos..].iter().all(|&b| b == 0) {
                break;
            }
            match frame::decode(&data[pos..]) {
                Ok((decoded, len)) => {
                    apply(&mut streams, decoded, id, pos as u64, &path)?;
                    pos += len;
                }
                Err(err) => {
                    let torn = last && reaches_end(&data[pos..], &err);
                    if !torn {
                        let why = match err {
                            FrameError::Truncated => "frame cut short".to_owned(),
                            FrameError::Bad(why) => why,
                        };
                        return Err(corrupt(&path, pos as u64, why));
                    }
                    tracing::warn!(
                        file = %path.display(),
                        at = pos,
                        dropped = data.len() - pos,
                        "truncating torn write at the end of the log"
                    );
                    truncate(&path, pos as u64, durable)?;
                    break;
                }
            }
        }
        segments.push(Segment {
            id,
            live: 0,
            len: pos.min(data.len()) as u64,
        });
    }
    for s in streams.values() {
        for seg in &s.touched {
            if let Some(segment) = segments.iter_mut().find(|x| x.id == *seg) {
                segment.live += 1;
            }
        }
    }
    let mut streams: Vec<RecoveredStream> = streams.into_values().collect();
    streams.sort_by_key(|s| s.meta.id);
    Ok(Recovery { streams, segments })
}

/// Whether an undecodable frame is the torn end of the log: no decodable frame starts anywhere
/// after it. A crash can only damage the end of the last batch written, so a valid frame after
/// the damage means the damage is corruption, not a torn write.
fn reaches_end(rest: &[u8], _err: &FrameError) -> bool {
    // A frame's kind byte (its 9th) is never 0, so no frame starts more than 8 bytes before
    // the last non-zero byte: the zeros the file was extended with need no search.
    let last = rest.iter().rposition(|&b| b != 0).unwrap_or(0);
    !(1..=last.min(rest.len().saturating_sub(1))).any(|q| frame::decode(&rest[q..]).is_ok())
}

fn touch(touched: &mut Vec<u32>, seg: u32) {
    if touched.last() != Some(&seg) {
        touched.push(seg);
    }
}

fn apply(
    streams: &mut HashMap<StreamId, RecoveredStream>,
    decoded: Decoded,
    seg: u32,
    frame_off: u64,
    path: &Path,
) -> Result<(), StorageError> {
    let payload_off = frame_off + frame::FRAME_HEADER_LEN as u64;
    match decoded {
        Decoded::Create { meta, records } => {
            let id = meta.meta.id;
            let start = meta.meta.fork.as_ref().map_or(0, |f| f.offset);
            let mut locs = Vec::with_capacity(records.len());
            let mut pos = start;
            for (rel, len) in records {
                locs.push(Loc {
                    start: pos,
                    len: len as u32,
                    seg,
                    off: payload_off + rel as u64,
                });
                pos += len as u64;
            }
            let state = WriterSnapshot {
                tail: pos,
                closed: meta.closed,
                own_bytes: pos - start,
                last_access_ms: 0,
                ..WriterSnapshot::default()
            };
            streams.insert(
                id,
                RecoveredStream {
                    meta: meta.meta,
                    state,
                    records: locs,
                    touched: vec![seg],
                },
            );
        }
        Decoded::Append {
            id,
            start,
            state,
            data,
        } => {
            // A stream removed earlier may have lost its CREATE frame to segment clean-up while
            // later frames of it remain (segments are deleted oldest first); ids are never
            // reused, so its leftover frames are skipped.
            let Some(s) = streams.get_mut(&id) else {
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
            if let Some((rel, len)) = data {
                s.records.push(Loc {
                    start,
                    len: len as u32,
                    seg,
                    off: payload_off + rel as u64,
                });
                s.state.tail += len as u64;
                s.state.own_bytes += len as u64;
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
        }
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
