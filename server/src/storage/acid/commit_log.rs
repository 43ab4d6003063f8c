//! The commit log of `acid` mode (with `DS_STORAGE__ACID_COMMIT_LOG`, the default): one
//! append-only file for all shards. The engine ([`super::engine`]) writes each batch of
//! operations, whatever shards they touch, as one checksummed record and syncs it before
//! acknowledging any of them; redb catches up afterwards and is made durable only at
//! checkpoints. The records are logical (the operations themselves), so replaying them after a
//! crash runs the same code that applied them.
//!
//! Segment format (`commit-NNNNNNNNNNNNNNNN.log`, the number increasing): the 8-byte magic
//! `DSACLOG1`, then records: payload length (u32), CRC-32C of the payload (u32), payload.
//! Payload: the record number (u64; each record's is one more than the previous one's), the
//! operation count (u32), then the operations ([`encode_op`]). Integers are little-endian.

use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use bytes::Bytes;

use super::writer::Op;
use crate::storage::{AppendEntry, ProducerState, ProducerTuple, StorageError};

pub(super) const MAGIC: &[u8; 8] = b"DSACLOG1";
const HEADER: usize = 8;
/// A record longer than this is corruption, not data (batches are capped far below).
const MAX_RECORD: usize = 1 << 30;

/// The segment file of number `n`.
pub(super) fn segment_path(dir: &Path, n: u64) -> PathBuf {
    dir.join(format!("commit-{n:016}.log"))
}

/// The log segments in `dir`, oldest first.
pub(super) fn segments(dir: &Path) -> Result<Vec<(u64, PathBuf)>, StorageError> {
    let io = |source| StorageError::Io {
        what: format!("listing {}", dir.display()),
        source,
    };
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let entry = entry.map_err(io)?;
        let name = entry.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(n) = name
            .strip_prefix("commit-")
            .and_then(|r| r.strip_suffix(".log"))
            .and_then(|n| n.parse::<u64>().ok())
        {
            found.push((n, entry.path()));
        }
    }
    found.sort_unstable();
    Ok(found)
}

pub(super) fn sync_dir(dir: &Path) -> Result<(), StorageError> {
    File::open(dir)
        .and_then(|d| d.sync_all())
        .map_err(|source| StorageError::Io {
            what: format!("syncing directory {}", dir.display()),
            source,
        })
}

/// Creates segment `n` (magic written and synced, directory synced).
pub(super) fn create_segment(dir: &Path, n: u64) -> Result<File, StorageError> {
    let path = segment_path(dir, n);
    let io = |source| StorageError::Io {
        what: format!("creating {}", path.display()),
        source,
    };
    let mut file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(&path)
        .map_err(io)?;
    crate::storage::fsutil::crash_point("acid-log-segment-created");
    file.write_all(MAGIC).map_err(io)?;
    file.sync_all().map_err(io)?;
    sync_dir(dir)?;
    Ok(file)
}

/// Frames a payload as a record. `firsts` gets, for each operation, where in the record its first
/// record's bytes are (see [`encode_op`]).
pub(super) fn frame(lsn: u64, ops: &[&Op], firsts: &mut Vec<Option<u64>>) -> Vec<u8> {
    let mut out = vec![0u8; HEADER];
    out.extend_from_slice(&lsn.to_le_bytes());
    out.extend_from_slice(&(ops.len() as u32).to_le_bytes());
    for op in ops {
        firsts.push(encode_op(&mut out, op).map(|at| at as u64));
    }
    let len = (out.len() - HEADER) as u32;
    let crc = crc32c::crc32c(&out[HEADER..]);
    out[..4].copy_from_slice(&len.to_le_bytes());
    out[4..8].copy_from_slice(&crc.to_le_bytes());
    out
}

const CREATE: u8 = 1;
const APPEND: u8 = 2;
const SOFT_DELETE: u8 = 3;
const REMOVE: u8 = 4;
const TOUCH: u8 = 5;
const RELEASE: u8 = 6;

fn put_u32(out: &mut Vec<u8>, v: u32) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}

fn put_bytes(out: &mut Vec<u8>, b: &[u8]) {
    // Appends are bounded by the request limit, far below 4 GiB.
    put_u32(out, b.len() as u32);
    out.extend_from_slice(b);
}

fn put_tuple(out: &mut Vec<u8>, t: &ProducerTuple) {
    put_bytes(out, t.id.as_bytes());
    put_u64(out, t.epoch);
    put_u64(out, t.seq);
}

/// `None` as 0, `Some(None)` as 1, `Some(Some(t))` as 2 and `t`.
fn put_close(out: &mut Vec<u8>, close: &Option<Option<ProducerTuple>>) {
    match close {
        None => out.push(0),
        Some(None) => out.push(1),
        Some(Some(t)) => {
            out.push(2);
            put_tuple(out, t);
        }
    }
}

/// One operation: a tag byte, then its fields in declaration order (optional fields behind a
/// presence byte, byte strings behind a u32 length). Returns where in `out` the operation's
/// first record's bytes are (an append's data, a create's first initial record; a create's
/// later records follow, each behind its 4-byte length), if it has any: reference rows of
/// `records` point there ([`super::writer::LogAt`]).
fn encode_op(out: &mut Vec<u8>, op: &Op) -> Option<usize> {
    let mut first = None;
    match op {
        Op::Create {
            id,
            meta,
            start,
            initial,
            close,
            created_at_ms,
        } => {
            out.push(CREATE);
            put_u64(out, *id);
            put_bytes(out, meta);
            put_u64(out, *start);
            put_u32(out, initial.len() as u32);
            if !initial.is_empty() {
                first = Some(out.len() + 4);
            }
            for d in initial {
                put_bytes(out, d);
            }
            put_close(out, close);
            put_u64(out, *created_at_ms);
        }
        Op::Append { id, entry } => {
            out.push(APPEND);
            put_u64(out, *id);
            put_u64(out, entry.start);
            match &entry.data {
                Some(d) => {
                    out.push(1);
                    first = Some(out.len() + 4);
                    put_bytes(out, d);
                }
                None => out.push(0),
            }
            put_close(out, &entry.close);
            match &entry.stream_seq {
                Some(s) => {
                    out.push(1);
                    put_bytes(out, s.as_bytes());
                }
                None => out.push(0),
            }
            match &entry.producer {
                // 2: with the time of the append (1, without it, is still read).
                Some((p, ps)) => {
                    out.push(2);
                    put_bytes(out, p.as_bytes());
                    put_u64(out, ps.epoch);
                    put_u64(out, ps.last_seq);
                    put_u64(out, ps.last_ms);
                }
                None => out.push(0),
            }
        }
        Op::SoftDelete { id } => {
            out.push(SOFT_DELETE);
            put_u64(out, *id);
        }
        Op::Remove { id } => {
            out.push(REMOVE);
            put_u64(out, *id);
        }
        Op::Release { id, before } => {
            out.push(RELEASE);
            put_u64(out, *id);
            put_u64(out, *before);
        }
        Op::Touch { id, at_ms } => {
            out.push(TOUCH);
            put_u64(out, *id);
            put_u64(out, *at_ms);
        }
    }
    first
}

/// A bounds-checked cursor over a record's payload; running past the end is an error. The
/// second field is where the operation being read has its first record (offset in the payload).
struct Cursor<'a>(&'a [u8], Option<usize>, usize);

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        if self.0.len() < n {
            return None;
        }
        let (head, rest) = self.0.split_at(n);
        self.0 = rest;
        Some(head)
    }
    fn u8(&mut self) -> Option<u8> {
        Some(self.take(1)?[0])
    }
    fn u32(&mut self) -> Option<u32> {
        Some(u32::from_le_bytes(self.take(4)?.try_into().ok()?))
    }
    fn u64(&mut self) -> Option<u64> {
        Some(u64::from_le_bytes(self.take(8)?.try_into().ok()?))
    }
    fn bytes(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        self.take(n)
    }
    /// Where the next byte is, from the payload's start.
    fn pos(&self) -> usize {
        self.2 - self.0.len()
    }
    /// A record's bytes, noting where the operation's first one is.
    fn record(&mut self) -> Option<&'a [u8]> {
        let n = self.u32()? as usize;
        if self.1.is_none() {
            self.1 = Some(self.pos());
        }
        self.take(n)
    }
    fn string(&mut self) -> Option<String> {
        String::from_utf8(self.bytes()?.to_vec()).ok()
    }
    fn tuple(&mut self) -> Option<ProducerTuple> {
        Some(ProducerTuple {
            id: self.string()?,
            epoch: self.u64()?,
            seq: self.u64()?,
        })
    }
    fn close(&mut self) -> Option<Option<Option<ProducerTuple>>> {
        Some(match self.u8()? {
            0 => None,
            1 => Some(None),
            2 => Some(Some(self.tuple()?)),
            _ => return None,
        })
    }
    fn op(&mut self) -> Option<Op> {
        Some(match self.u8()? {
            CREATE => {
                let id = self.u64()?;
                let meta = self.bytes()?.to_vec();
                let start = self.u64()?;
                let n = self.u32()? as usize;
                let mut initial = Vec::with_capacity(n.min(1024));
                for _ in 0..n {
                    initial.push(Bytes::copy_from_slice(self.record()?));
                }
                Op::Create {
                    id,
                    meta,
                    start,
                    initial,
                    close: self.close()?,
                    created_at_ms: self.u64()?,
                }
            }
            APPEND => {
                let id = self.u64()?;
                let start = self.u64()?;
                let data = match self.u8()? {
                    0 => None,
                    1 => Some(Bytes::copy_from_slice(self.record()?)),
                    _ => return None,
                };
                let close = self.close()?;
                let stream_seq = match self.u8()? {
                    0 => None,
                    1 => Some(self.string()?),
                    _ => return None,
                };
                let producer = match self.u8()? {
                    0 => None,
                    flag @ (1 | 2) => Some((
                        self.string()?,
                        ProducerState {
                            epoch: self.u64()?,
                            last_seq: self.u64()?,
                            last_ms: if flag == 2 { self.u64()? } else { 0 },
                        },
                    )),
                    _ => return None,
                };
                Op::Append {
                    id,
                    entry: AppendEntry {
                        start,
                        data,
                        close,
                        stream_seq,
                        producer,
                    },
                }
            }
            SOFT_DELETE => Op::SoftDelete { id: self.u64()? },
            REMOVE => Op::Remove { id: self.u64()? },
            RELEASE => Op::Release {
                id: self.u64()?,
                before: self.u64()?,
            },
            TOUCH => Op::Touch {
                id: self.u64()?,
                at_ms: self.u64()?,
            },
            _ => return None,
        })
    }
}

/// One record read back from the log.
pub(super) struct Record {
    /// The record's number: one more than the record before it.
    pub lsn: u64,
    pub ops: Vec<Op>,
    /// For each operation, where its first record's bytes are in the log.
    pub firsts: Vec<Option<super::writer::LogAt>>,
    /// Where the record starts, for error messages.
    pub file: PathBuf,
    pub pos: u64,
}

/// Reads every segment from number `from` on in order and hands each intact record to `apply`
/// (earlier segments are kept for the records rows reference, not replayed). A record that is cut
/// short or fails its checksum ends the log if it is in the last segment (a crash tore the
/// write; nothing after it was acknowledged, because acknowledging waits for the sync that
/// covers everything written before) and the file is truncated there; anywhere else it is
/// corruption, refused with the file and position.
pub(super) fn read_all(
    dir: &Path,
    from: u64,
    mut apply: impl FnMut(Record) -> Result<(), StorageError>,
) -> Result<Option<u64>, StorageError> {
    let segs = segments(dir)?;
    let last = segs.last().map(|(n, _)| *n);
    for (n, path) in segs.iter().filter(|(n, _)| *n >= from) {
        let raw = std::fs::read(path).map_err(|source| StorageError::Io {
            what: format!("reading {}", path.display()),
            source,
        })?;
        let is_last = Some(*n) == last;
        let corrupt = |pos: usize, detail: &str| StorageError::Corrupt {
            what: format!("{} at byte {pos}", path.display()),
            detail: detail.to_owned(),
        };
        if raw.len() < MAGIC.len() {
            if is_last {
                // Torn while being created: it holds nothing.
                continue;
            }
            return Err(corrupt(0, "shorter than its header"));
        }
        if &raw[..MAGIC.len()] != MAGIC {
            return Err(corrupt(0, "not an acid commit log segment (bad magic)"));
        }
        let mut pos = MAGIC.len();
        while pos < raw.len() {
            let torn = |detail: &str| -> Result<(), StorageError> {
                if !is_last {
                    return Err(corrupt(pos, detail));
                }
                tracing::warn!(file = %path.display(), pos, dropped = raw.len() - pos, reason = detail,
                    "acid commit log: truncating a torn tail (never acknowledged)");
                OpenOptions::new()
                    .write(true)
                    .open(path)
                    .and_then(|f| {
                        f.set_len(pos as u64)?;
                        f.sync_all()
                    })
                    .map_err(|source| StorageError::Io {
                        what: format!("truncating {}", path.display()),
                        source,
                    })
            };
            if raw.len() - pos < HEADER {
                torn("record header cut short")?;
                break;
            }
            let len = u32::from_le_bytes(raw[pos..pos + 4].try_into().unwrap_or_default()) as usize;
            let crc = u32::from_le_bytes(raw[pos + 4..pos + 8].try_into().unwrap_or_default());
            if len == 0 && crc == 0 {
                // The zeros written ahead of the records: the end of what was written.
                break;
            }
            if len > MAX_RECORD || raw.len() - pos - HEADER < len {
                torn("record cut short")?;
                break;
            }
            let payload = &raw[pos + HEADER..pos + HEADER + len];
            if crc32c::crc32c(payload) != crc {
                torn("record checksum mismatch")?;
                break;
            }
            let mut c = Cursor(payload, None, payload.len());
            let parsed = (|| {
                let lsn = c.u64()?;
                let count = c.u32()? as usize;
                let mut ops = Vec::with_capacity(count.min(4096));
                let mut firsts = Vec::with_capacity(count.min(4096));
                for _ in 0..count {
                    c.1 = None;
                    ops.push(c.op()?);
                    firsts.push(c.1.map(|at| super::writer::LogAt {
                        segment: *n,
                        offset: (pos + HEADER + at) as u64,
                    }));
                }
                c.0.is_empty().then_some((lsn, ops, firsts))
            })();
            let Some((lsn, ops, firsts)) = parsed else {
                return Err(corrupt(
                    pos,
                    "record does not decode (its checksum matched)",
                ));
            };
            apply(Record {
                lsn,
                ops,
                firsts,
                file: path.clone(),
                pos: pos as u64,
            })?;
            pos += HEADER + len;
        }
    }
    Ok(last)
}
